"""`mamba2`: a Mamba-2 (SSD) mixer initialized from the attention layer (Mamba-in-the-Llama).

Mapping (per layer; H query heads, Hk key/value heads, head size D, hidden size C):

    C_t = q_t * scaling     (q_proj, rotary applied; Mamba-2's C, one per query head)
    B_t = k_t               (k_proj, rotary applied; each KV head expanded to its H/Hk query heads)
    x_t = v_t               (v_proj; expanded the same way)
    out = o_proj(y * 2 sigmoid(z_t)),  z_t = W_z h_t   (the output gate; W_z is new)

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T,   y_t = C_t h_t + D x_t      (per head; state [D, D])
    dt_t = softplus(W_dt h_t + dt_bias),  A = -exp(A_log)                     (per head)

A short depthwise causal conv1d (width `conv_size`) runs over x, B and C, as in Mamba-2. New
parameters and their initialization, chosen so that the converted layer starts as decayed,
unnormalized linear attention on the teacher's own q/k/v (then distillation takes over):
conv1d = identity (last tap 1, others 0; Mamba-2's SiLU after it is left out, it would change the
teacher's projections), W_dt = 0 and dt_bias with softplus(dt_bias) spread log-uniformly over
[dt_min, dt_max] across heads, A_log = 0 (A = -1: per-step decay exp(-dt)), D = 0, W_z = 0
(gate 1). The projections q/k/v/o are the teacher's modules themselves, not copies.

Parallel form: the chunked scan with one decay per head (`kernels.chunk_gla`, Triton on CUDA).
Recurrent form: the state h and the last conv_size - 1 inputs of the conv live in the cache. The conv runs on
`kernels.causal_conv1d` (Triton on CUDA, in the input's dtype; fp32 inside).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..kernels import causal_conv1d, chunk_gla, gla_step
from ..errors import PlanError
from . import register
from .base import KindOptions, LinearizedAttention


@dataclass(frozen=True)
class Mamba2Options(KindOptions):
    conv_size: int = 4  # width of the causal conv1d over x, B, C
    dt_min: float = 0.001  # initial step sizes spread over [dt_min, dt_max] across heads (Mamba's defaults)
    dt_max: float = 0.1

    def check(self) -> None:
        super().check()
        if self.conv_size < 1:
            raise PlanError(f"conv_size must be >= 1, got {self.conv_size}")
        if not 0 < self.dt_min <= self.dt_max:
            raise PlanError(f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")


@register
class Mamba2Attention(LinearizedAttention):
    """Mamba-2 mixer whose x/B/C/out projections are the attention layer's v/k/q/o (see the module doc)."""

    kind = "mamba2"
    Options = Mamba2Options

    def build(self, options: Mamba2Options) -> None:
        h, d = self.mixer_heads, self.head_dim
        self.conv = nn.Parameter(torch.zeros(3 * h * d, options.conv_size))  # x, B, C after expanding the KV heads
        self.dt_proj = nn.Linear(self.hidden_size, h, bias=False)
        nn.init.zeros_(self.dt_proj.weight)
        self.dt_bias = nn.Parameter(torch.zeros(h))
        dt = torch.exp(torch.linspace(math.log(options.dt_min), math.log(options.dt_max), h, dtype=torch.float64))
        with torch.no_grad():  # in place: the parameters may live on the meta device (from_pretrained)
            self.conv[:, -1] = 1.0
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.zeros(h))
        self.D = nn.Parameter(torch.zeros(h))
        self.z_proj = nn.Linear(self.hidden_size, h * d, bias=False)
        nn.init.zeros_(self.z_proj.weight)

    def mix(self, q, k, v, x, valid, state):
        b, t, h, d = q.shape
        rep = h // k.shape[2]
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        xbc = torch.cat([v, k, q * self.scaling], -1).reshape(b, t, -1)
        if valid is not None:  # padding writes nothing: no input to the conv or the state, no decay
            xbc = xbc * valid[..., None].to(xbc.dtype)
        xbc, conv_state = causal_conv1d(xbc, self.conv, None if state is None else state["conv"])
        xs, bs, cs = xbc.view(b, t, h, 3 * d).split(d, -1)
        dt = nn.functional.softplus(self.dt_proj(x).float() + self.dt_bias.float())  # [B,T,H]
        g = -dt * torch.exp(self.A_log.float())  # log decay per head
        if valid is not None:
            dt, g = dt * valid[..., None], g * valid[..., None]
        xdt = xs * dt[..., None].to(xs.dtype)
        if state is not None and t == 1:
            y, mem = gla_step(cs[:, 0], bs[:, 0], xdt[:, 0], g[:, 0], state["S"])
            y = y[:, None]
        else:
            y, mem = chunk_gla(cs, bs, xdt, g, initial_state=None if state is None else state["S"])
        y = y + self.D.to(y.dtype)[:, None] * xs
        y = y * (2 * torch.sigmoid(self.z_proj(x))).view(b, t, h, d).to(y.dtype)
        return y, {"S": mem, "conv": conv_state}
