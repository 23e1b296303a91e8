"""Triton causal depthwise conv1d (`naive.causal_conv1d_ref`'s maths), forward and backward.

One program per (block of BN channels, tile of BT tokens, row): tap j reads the [BT, BN] tile of inputs W-1-j tokens
earlier (the earlier call's last inputs where that reaches before token 0), times the channel's weight, summed in fp32;
one write in the input's dtype. Backward, in one kernel: dx_s = sum_j w_j dy_{s+W-1-j} (shifted tiles of dy), and
each program's [W, BN] partial sums of dy_t x_{t-W+1+j} for the weights' gradient, summed afterwards (no atomics).
PyTorch's depthwise conv1d runs on fp32 copies of the input, through CUDA kernels reported ~10x slower than a direct
one (pytorch/pytorch#75747); this reads the input once, in its own dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_utils import check_offsets

FWD = dict(BT=32, BN=128, num_warps=8)  # tokens and channels per program; no spills compiled for sm_90
BWD = dict(BT=32, BN=64, num_warps=8)  # (benchmarks/kernel_resources.py: 64 and 104 registers a thread)


@triton.jit
def _tap(x, init, b, rt, rn, mt, mn, shift, s_xb, s_xt, s_ib, s_it, W: tl.constexpr, HAS_INIT: tl.constexpr):
    """[BT, BN] inputs at tokens rt - shift in fp32; a token s < 0 is the earlier call's, row W-1+s of init [B,W-1,N]
    (zeros without one)."""
    s = rt - shift
    v = tl.load(x + b * s_xb + s[:, None] * s_xt + rn[None, :], mask=(mt & (s >= 0))[:, None] & mn[None, :], other=0.0)
    v = v.to(tl.float32)
    if HAS_INIT:
        p = s + (W - 1)
        v += tl.load(init + b * s_ib + p[:, None] * s_it + rn[None, :], mask=(mt & (s < 0))[:, None] & mn[None, :],
                     other=0.0).to(tl.float32)
    return v


@triton.jit
def _fwd_kernel(x, w, init, y, T, N, s_xb, s_xt, s_ib, s_it, s_yb, s_yt,
                W: tl.constexpr, HAS_INIT: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr):
    """y [B,T,N] = sum_j w[:, j] x_{t-W+1+j}."""
    pn, pt, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn, rt = pn * BN + tl.arange(0, BN), pt * BT + tl.arange(0, BT)
    mn, mt = rn < N, rt < T
    acc = tl.zeros([BT, BN], dtype=tl.float32)
    for j in tl.static_range(W):
        wj = tl.load(w + rn * W + j, mask=mn, other=0.0).to(tl.float32)
        acc += _tap(x, init, b, rt, rn, mt, mn, W - 1 - j, s_xb, s_xt, s_ib, s_it, W, HAS_INIT) * wj[None, :]
    tl.store(y + b * s_yb + rt[:, None] * s_yt + rn[None, :], acc.to(y.dtype.element_ty), mask=mt[:, None] & mn[None, :])


@triton.jit
def _bwd_kernel(x, w, init, dy, dx, dw, T, N, NT, s_xb, s_xt, s_ib, s_it, s_db, s_dt,
                W: tl.constexpr, HAS_INIT: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, NEED_DX: tl.constexpr = True):
    """dx [B,T,N] (contiguous; NEED_DX) = sum_j w[:, j] dy_{s+W-1-j}; dw [B*NT, W, N] (fp32) this tile's
    sum_t dy_t x_{t-W+1+j}."""
    pn, pt, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn, rt = pn * BN + tl.arange(0, BN), pt * BT + tl.arange(0, BT)
    mn, mt = rn < N, rt < T
    g = tl.load(dy + b * s_db + rt[:, None] * s_dt + rn[None, :], mask=mt[:, None] & mn[None, :], other=0.0).to(tl.float32)
    acc = tl.zeros([BT, BN], dtype=tl.float32)
    part = dw + ((b * NT + pt) * W) * N + rn
    for j in tl.static_range(W):
        wj = tl.load(w + rn * W + j, mask=mn, other=0.0).to(tl.float32)
        xj = _tap(x, init, b, rt, rn, mt, mn, W - 1 - j, s_xb, s_xt, s_ib, s_it, W, HAS_INIT)
        tl.store(part + j * N, tl.sum(g * xj, 0), mask=mn)
        if NEED_DX:
            s = rt + (W - 1 - j)  # the output that read token rt through tap j
            gs = tl.load(dy + b * s_db + s[:, None] * s_dt + rn[None, :], mask=(s < T)[:, None] & mn[None, :], other=0.0)
            acc += gs.to(tl.float32) * wj[None, :]
    if NEED_DX:  # not in stage 1, where x comes from frozen projections
        tl.store(dx + (b * T + rt[:, None]) * N + rn[None, :], acc.to(dx.dtype.element_ty), mask=mt[:, None] & mn[None, :])


def _grid(b: int, t: int, n: int, cfg: dict) -> tuple[int, int, int]:
    return triton.cdiv(n, cfg["BN"]), triton.cdiv(t, cfg["BT"]), b


class CausalConv1dFunction(torch.autograd.Function):
    """y [B,T,N] in x's dtype on the Triton kernels; gradients for x, the weights and the earlier call's inputs."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, initial: Tensor | None) -> Tensor:
        b, t, n = x.shape
        width = weight.shape[1]
        x = x if x.stride(-1) == 1 else x.contiguous()
        weight = weight.contiguous()
        init = initial.contiguous() if initial is not None else None
        y = torch.empty(b, t, n, dtype=x.dtype, device=x.device)
        _fwd_kernel[_grid(b, t, n, FWD)](x, weight, init if init is not None else x, y, t, n, x.stride(0), x.stride(1),
                                    *(init.stride()[:2] if init is not None else (0, 0)), y.stride(0), y.stride(1),
                                    W=width, HAS_INIT=init is not None, **FWD)
        ctx.save_for_backward(x, weight, init)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, init = ctx.saved_tensors
        b, t, n = x.shape
        width = weight.shape[1]
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        nt = triton.cdiv(t, BWD["BT"])
        need_dx = ctx.needs_input_grad[0]
        dx = torch.empty(b, t, n, dtype=x.dtype, device=x.device) if need_dx else x
        parts = torch.empty(b * nt, width, n, dtype=torch.float32, device=x.device)
        _bwd_kernel[_grid(b, t, n, BWD)](x, weight, init if init is not None else x, dy, dx, parts, t, n, nt,
                                    x.stride(0), x.stride(1), *(init.stride()[:2] if init is not None else (0, 0)),
                                    dy.stride(0), dy.stride(1), W=width, HAS_INIT=init is not None, NEED_DX=need_dx, **BWD)
        dw = parts.sum(0).T.to(weight.dtype)
        dinit = None
        if init is not None and ctx.needs_input_grad[2]:  # entry p of the earlier inputs fed outputs p - j, j <= p
            w, g = weight.float(), dy.float()
            dinit = torch.stack([sum(w[:, j] * g[:, p - j] for j in range(p + 1) if p - j < t) for p in range(width - 1)], 1)
            dinit = dinit.to(init.dtype)
        return dx if need_dx else None, dw, dinit


def causal_conv1d_triton(x: Tensor, weight: Tensor, initial: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`naive.causal_conv1d_ref` on the Triton kernels: y [B,T,N] in x's dtype and the last W-1 inputs [B,W-1,N] (fp32)."""
    b, t, n = x.shape
    width = weight.shape[1]
    if weight.shape[0] != n or (initial is not None and tuple(initial.shape) != (b, width - 1, n)):
        raise ValueError(f"x {tuple(x.shape)}, weight {tuple(weight.shape)} and initial "
                         f"{None if initial is None else tuple(initial.shape)} must be [B,T,N], [N,W] and [B,W-1,N]")
    check_offsets("causal conv1d", x=x.numel())
    y = CausalConv1dFunction.apply(x, weight, initial)
    past = initial.float() if initial is not None else x.new_zeros(b, width - 1, n, dtype=torch.float32)
    tail = torch.cat([past, x[:, max(t - (width - 1), 0) :].float()], 1)
    return y, tail[:, tail.shape[1] - (width - 1) :]
