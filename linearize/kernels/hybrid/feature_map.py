"""Triton Hedgehog feature map (`naive.hedgehog_features`' maths), forward and backward.

phi(x) = [softmax(z), softmax(-z)], z = x W_h + b_h per head h. One program per (head, block of BM rows): the product
on the tensor cores in x's dtype (W cast to it, as under autocast), both softmaxes in fp32 on the tile, one write of
phi in x's dtype. In PyTorch the same map is a batched product, a bias add that promotes z to fp32, a negation, two
softmaxes and a concatenation, each a pass over [tokens, heads, 2 FD] tensors, mirrored in backward. Backward
recomputes z, then dz = s1 (d1 - <d1, s1>) - s2 (d2 - <d2, s2>), dx = dz W^T, and each program's partial x^T dz and
sum of dz over its rows for W's and b's gradients (summed afterwards; no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_utils import check_offsets
from ..triton_utils import dot as _dot

FWD = dict(BM=64, num_warps=8)  # rows (tokens) per tile; no spills compiled for sm_90 at D, FD <= 128
BWD = dict(BM=32, num_warps=8)  # (benchmarks/kernel_resources.py: 96-189 and 160-250 registers a thread)
PROGRAMS = 512  # backward: about this many programs, each walking its share of rows (W's gradient: a partial sum each)


@triton.jit
def _weights(w, b, h, D: tl.constexpr, FD: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):
    """Head h's W [BD, BF] (as stored) and b [BF] (fp32), zero-padded."""
    rd, rf = tl.arange(0, BD), tl.arange(0, BF)
    md, mf = rd < D, rf < FD
    wt = tl.load(w + (h * D + rd[:, None]) * FD + rf[None, :], mask=md[:, None] & mf[None, :], other=0.0)
    return wt, tl.load(b + h * FD + rf, mask=mf, other=0.0).to(tl.float32)


@triton.jit
def _z(x, wt, bt, h, rm, mm, s_xm, s_xh, D: tl.constexpr, BD: tl.constexpr):
    """z = x W_h + b_h on the tile of rows rm (fp32 [BM, BF]) and that tile of x ([BM, BD], x's dtype)."""
    rd = tl.arange(0, BD)
    xt = tl.load(x + rm[:, None] * s_xm + h * s_xh + rd[None, :], mask=mm[:, None] & (rd < D)[None, :], other=0.0)
    return _dot(xt, wt.to(xt.dtype)) + bt[None, :], xt


@triton.jit
def _softmaxes(z, FD: tl.constexpr, BF: tl.constexpr):
    """softmax(z) and softmax(-z) over the FD columns (fp32; padded columns 0)."""
    mf = (tl.arange(0, BF) < FD)[None, :]
    e1 = tl.where(mf, tl.exp(z - tl.max(tl.where(mf, z, float("-inf")), 1)[:, None]), 0.0)
    e2 = tl.where(mf, tl.exp(-z - tl.max(tl.where(mf, -z, float("-inf")), 1)[:, None]), 0.0)
    return e1 / tl.sum(e1, 1)[:, None], e2 / tl.sum(e2, 1)[:, None]


@triton.jit
def _fwd_kernel(x, w, b, phi, M, s_xm, s_xh, s_pm, s_ph,
                D: tl.constexpr, FD: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BM: tl.constexpr):
    h, pm = tl.program_id(0), tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    mm = rm < M
    wt, bt = _weights(w, b, h, D, FD, BD, BF)
    z, _ = _z(x, wt, bt, h, rm, mm, s_xm, s_xh, D, BD)
    s1, s2 = _softmaxes(z, FD, BF)
    rf = tl.arange(0, BF)
    at = phi + rm[:, None] * s_pm + h * s_ph + rf[None, :]
    mask = mm[:, None] & (rf < FD)[None, :]
    tl.store(at, s1.to(phi.dtype.element_ty), mask=mask)
    tl.store(at + FD, s2.to(phi.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(x, w, b, dphi, dx, dw, db, M, ROWS, s_xm, s_xh, s_pm, s_ph,
                D: tl.constexpr, FD: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BM: tl.constexpr,
                NEED_DX: tl.constexpr = True):
    """dx [M,H,D] (contiguous; NEED_DX); dw [P,H,D,FD] and db [P,H,FD] (fp32): program p's sums over its ROWS rows."""
    h, p = tl.program_id(0), tl.program_id(1)
    H = tl.num_programs(0)
    rd, rf = tl.arange(0, BD), tl.arange(0, BF)
    md, mf = rd < D, rf < FD
    wt, bt = _weights(w, b, h, D, FD, BD, BF)
    acc_w = tl.zeros([BD, BF], dtype=tl.float32)
    acc_b = tl.zeros([BF], dtype=tl.float32)
    for m0 in range(p * ROWS, tl.minimum(p * ROWS + ROWS, M), BM):
        rm = m0 + tl.arange(0, BM)
        mm = rm < M
        z, xt = _z(x, wt, bt, h, rm, mm, s_xm, s_xh, D, BD)
        s1, s2 = _softmaxes(z, FD, BF)
        at = dphi + rm[:, None] * s_pm + h * s_ph + rf[None, :]
        mask = mm[:, None] & mf[None, :]
        d1 = tl.load(at, mask=mask, other=0.0).to(tl.float32)
        d2 = tl.load(at + FD, mask=mask, other=0.0).to(tl.float32)
        dz = s1 * (d1 - tl.sum(d1 * s1, 1)[:, None]) - s2 * (d2 - tl.sum(d2 * s2, 1)[:, None])
        if NEED_DX:  # not in stage 1, where q and k come from frozen projections
            dxt = _dot(dz.to(xt.dtype), tl.trans(wt.to(xt.dtype)))
            tl.store(dx + (rm[:, None] * H + h) * D + rd[None, :], dxt.to(dx.dtype.element_ty), mask=mm[:, None] & md[None, :])
        acc_w += _dot(tl.trans(xt), dz.to(xt.dtype))
        acc_b += tl.sum(dz, 0)
    tl.store(dw + ((p * H + h) * D + rd[:, None]) * FD + rf[None, :], acc_w, mask=md[:, None] & mf[None, :])
    tl.store(db + (p * H + h) * FD + rf, acc_b, mask=mf)


def _rows(x: Tensor) -> Tensor:
    """x [..., H, D] as [M, H, D] with unit stride over D (a view where the layout allows)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x.reshape(-1, *x.shape[-2:])  # reshape copies only where a view cannot be had


def _blocks(d: int, fd: int) -> dict[str, int]:
    return dict(D=d, FD=fd, BD=max(16, triton.next_power_of_2(d)), BF=max(16, triton.next_power_of_2(fd)))


class HedgehogFunction(torch.autograd.Function):
    """phi [..., H, 2 FD] in x's dtype on the Triton kernels; gradients for x, W and b."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        h, d, fd = weight.shape
        xm = _rows(x)
        m = xm.shape[0]
        weight, bias = weight.contiguous(), bias.contiguous()
        phi = torch.empty(m, h, 2 * fd, dtype=x.dtype, device=x.device)
        _fwd_kernel[(h, triton.cdiv(m, FWD["BM"]))](xm, weight, bias, phi, m, xm.stride(0), xm.stride(1), phi.stride(0),
                                                   phi.stride(1), **_blocks(d, fd), **FWD)
        ctx.save_for_backward(xm, weight, bias)
        ctx.shape = x.shape
        return phi.view(*x.shape[:-1], 2 * fd)

    @staticmethod
    def backward(ctx, dphi: Tensor):
        xm, weight, bias = ctx.saved_tensors
        h, d, fd = weight.shape
        m = xm.shape[0]
        dphi = _rows(dphi)
        rows = triton.cdiv(triton.cdiv(m, triton.cdiv(PROGRAMS, h)), BWD["BM"]) * BWD["BM"]
        parts = triton.cdiv(m, rows)
        need_dx = ctx.needs_input_grad[0]
        dx = torch.empty(m, h, d, dtype=xm.dtype, device=xm.device) if need_dx else xm
        dw = torch.empty(parts, h, d, fd, dtype=torch.float32, device=xm.device)
        db = torch.empty(parts, h, fd, dtype=torch.float32, device=xm.device)
        _bwd_kernel[(h, parts)](xm, weight, bias, dphi, dx, dw, db, m, rows, xm.stride(0), xm.stride(1), dphi.stride(0),
                                dphi.stride(1), **_blocks(d, fd), **BWD, NEED_DX=need_dx)
        return dx.view(ctx.shape) if need_dx else None, dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype)


def hedgehog_features_triton(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """`naive.hedgehog_features` on the Triton kernels: x [..., H, D], W [H, D, FD], b [H, FD] -> [..., H, 2 FD] in x's
    dtype (fp32 softmaxes inside)."""
    if weight.dim() != 3 or x.shape[-2:] != weight.shape[:2] or bias.shape != (weight.shape[0], weight.shape[2]):
        raise ValueError(f"x {tuple(x.shape)}, W {tuple(weight.shape)} and b {tuple(bias.shape)} must be [..., H, D], "
                         "[H, D, FD] and [H, FD]")
    check_offsets("hedgehog features", features=x.numel() // x.shape[-1] * 2 * weight.shape[2])
    return HedgehogFunction.apply(x, weight, bias)
