"""`gla`: gated linear attention, a data-dependent per-channel decay on the linear memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import PlanError
from . import register
from .base import KindOptions, LinearizedAttention
from .feature_maps import FEATURE_MAPS, make_feature_maps


@dataclass(frozen=True)
class GLAOptions(KindOptions):
    feature_map: str = "hedgehog"  # hedgehog | elu (normalized) | identity (unnormalized GLA)
    feature_dim: int | None = None  # hedgehog only; default head_dim
    gate_rank: int = 16  # low-rank gate projection, as in GLA
    gate_norm: float = 16.0  # GLA's temperature: g = logsigmoid(.) / gate_norm

    def check(self) -> None:
        super().check()
        if self.feature_map not in FEATURE_MAPS:
            raise PlanError(f"unknown feature_map {self.feature_map!r}; choose one of {', '.join(FEATURE_MAPS)}")
        if self.feature_dim is not None and self.feature_dim < 1:
            raise PlanError(f"feature_dim must be >= 1, got {self.feature_dim}")
        if self.gate_rank < 1 or self.gate_norm <= 0:
            raise PlanError(f"gate_rank must be >= 1 and gate_norm > 0, got {self.gate_rank}, {self.gate_norm}")


class DecayGate(nn.Module):
    """g = logsigmoid(x W_down W_up + b) / gate_norm, per KV head and feature channel.

    W_up starts at zero and b so that the per-step decay exp(g) spans 0.99 .. 0.9999 across
    channels: at initialization the layer is (near) plain linear attention with the teacher's maps.
    """

    def __init__(self, hidden_size: int, num_kv_heads: int, feature_size: int, rank: int, norm: float):
        super().__init__()
        self.num_kv_heads, self.feature_size, self.norm = num_kv_heads, feature_size, norm
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, num_kv_heads * feature_size, bias=True)
        nn.init.zeros_(self.up.weight)
        rates = torch.logspace(-4, -2, feature_size)  # -log(decay) per step
        p = torch.exp(-norm * rates)  # sigmoid(b) such that logsigmoid(b) / norm = -rate
        with torch.no_grad():
            self.up.bias.copy_(torch.log(p / (1 - p)).repeat(num_kv_heads))

    def forward(self, x: Tensor) -> Tensor:
        g = nn.functional.logsigmoid(self.up(self.down(x)).float()) / self.norm
        return g.view(*x.shape[:-1], self.num_kv_heads, self.feature_size)


@register
class GLAAttention(LinearizedAttention):
    """S_t = diag(exp(g_t)) S_{t-1} + phi(k_t) v_t^T; y_t = phi(q_t) S_t / phi(q_t) z_t (normalized maps)."""

    kind = "gla"
    Options = GLAOptions

    def build(self, options: GLAOptions) -> None:
        self.feature_map_q, self.feature_map_k, self.feature_size = make_feature_maps(
            options.feature_map, self.mixer_heads, self.mixer_kv_heads, self.head_dim, options.feature_dim,
            self.scaling,
        )
        self.gate = DecayGate(self.hidden_size, self.mixer_kv_heads, self.feature_size, options.gate_rank, options.gate_norm)

    def mix(self, q, k, v, x, valid, state):
        fq, fk, g = self.feature_map_q(q), self.feature_map_k(k), self.gate(x)
        return self.linear_attend(fq, fk, v, g, valid, state, normalize=self.options.feature_map != "identity")


