"""Triton matrix products of a few rows (decode: one token a sequence) with the layer's glue fused in.

At batch 1 a decoder layer's step is bound by launches, not bytes (benchmarks/RESULTS.md, "Decode against the
compiled teacher"): the projections are matrix-vector products of ~1 MB each, and the RMSNorm before them, the
rotary, bias, SiLU gate and residual add after them are launches of their own. Here each product reads its RMSNorm's
input whole (a few KB) and normalizes it on the way in, and applies what follows on its tile before the store:
`_rms_linear_kernel` (norm, bias, gate, residual) and `_qkv_rope_kernel` (norm, bias, per-head q/k norm, rotary, the
q/k/v split, the normed input for kinds that read it). Programs split the output columns. Up to `GEMV_ROWS` rows
(batch-1 decoding) the `_gemv` kernels give each program a few output columns and the whole reduction, multiplying
elementwise: a narrow product then runs on hundreds of programs with one pass over the input dimension (on an H200
the tensor-core form below took 7 us for a 576 x 576 product on 36 programs, the gemv form 3.8 us). More rows are one
tile, padded to 16 for the tensor cores (the products read each weight once, so the padding costs no bandwidth).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_utils import dot

BK = 64  # input columns a loop iteration reads
GEMV_ROWS = 4  # up to this many rows the elementwise kernels run
TILE = 8192  # weight elements a gemv program multiplies per loop iteration (64 fp32 registers a thread at 4 warps)
PROGRAMS = 512  # about how many programs a gemv launch aims for (a few per SM: one wave)


@triton.jit
def _inv_rms(x, rm, mm, K, eps, NORM: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of rows rm of x [M, K] (ones without a norm)."""
    if NORM:
        ss = tl.zeros([BM], tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            xt = tl.load(x + rm[:, None] * K + rk[None, :], mask=mm[:, None] & (rk < K)[None, :], other=0.0).to(tl.float32)
            ss += tl.sum(xt * xt, 1)
        return 1.0 / tl.sqrt((ss / K + eps).to(tl.float32))  # Inductor passes Python floats as fp64
    return tl.full([BM], 1.0, tl.float32)


@triton.jit
def _normed(x, nw, rm, mm, rk, mk, inv, K, NORM: tl.constexpr):
    """Tile [BM, BK] of the normed input, fp32."""
    xt = tl.load(x + rm[:, None] * K + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0).to(tl.float32)
    if NORM:
        xt = xt * inv[:, None] * tl.load(nw + rk, mask=mk, other=0.0).to(tl.float32)[None, :]
    return xt


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation; fp32 operands multiplied in full precision (IEEE), not TF32."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return dot(a, b)


@triton.jit
def _rms_linear_kernel(
    x, w, bias, nw, res, y, M, N, K, eps,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    NORM: tl.constexpr, HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, HAS_RES: tl.constexpr, IEEE: tl.constexpr,
):
    """y [M, N] = [res +] act(RMSNorm(x) W^T + b); with SWIGLU, W's rows N.. 2N are the up projection's."""
    pn, pm = tl.program_id(0), tl.program_id(1)
    rm, rn = pm * BM + tl.arange(0, BM), pn * BN + tl.arange(0, BN)
    mm, mn = rm < M, rn < N
    inv = _inv_rms(x, rm, mm, K, eps, NORM, BM, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    up = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mk = rk < K
        xt = _normed(x, nw, rm, mm, rk, mk, inv, K, NORM).to(w.dtype.element_ty)
        wm = mn[:, None] & mk[None, :]
        acc += _mm(xt, tl.trans(tl.load(w + rn[:, None] * K + rk[None, :], mask=wm, other=0.0)), IEEE)
        if SWIGLU:
            up += _mm(xt, tl.trans(tl.load(w + (N + rn)[:, None] * K + rk[None, :], mask=wm, other=0.0)), IEEE)
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        if SWIGLU:
            up += tl.load(bias + N + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        acc = acc / (1.0 + tl.exp(-acc)) * up
    out = rm[:, None] * N + rn[None, :]
    if HAS_RES:
        acc += tl.load(res + out, mask=mm[:, None] & mn[None, :], other=0.0).to(tl.float32)
    tl.store(y + out, acc.to(y.dtype.element_ty), mask=mm[:, None] & mn[None, :])


@triton.jit
def _qkv_rope_kernel(
    x, w, bias, nw, cos, sin, qkn, q, k, v, xn, M, K, eps, qk_eps,
    H: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, BH: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    HAS_BIAS: tl.constexpr, QK_NORM: tl.constexpr, IEEE: tl.constexpr,
):
    """Program (head slot j of the H + 2 Hk stacked heads, block of BH rotary pairs, rows): columns c and c + D/2 of
    head j, so the rotary pair (and, with QK_NORM, BH = D/2: the whole head) is in one program."""
    j, pi, pm = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    HALF: tl.constexpr = D // 2
    rm, ri = pm * BM + tl.arange(0, BM), pi * BH + tl.arange(0, BH)
    mm, mi = rm < M, ri < HALF
    inv = _inv_rms(x, rm, mm, K, eps, True, BM, BK)
    lo, hi = tl.zeros([BM, BH], tl.float32), tl.zeros([BM, BH], tl.float32)
    r_lo, r_hi = j * D + ri, j * D + HALF + ri
    mx = mm & (rm * 0 + j + pi == 0)  # the first program of these rows stores the normed input
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mk = rk < K
        xt = _normed(x, nw, rm, mm, rk, mk, inv, K, True)
        tl.store(xn + rm[:, None] * K + rk[None, :], xt.to(xn.dtype.element_ty), mask=mx[:, None] & mk[None, :])
        xt = xt.to(w.dtype.element_ty)
        wm = mi[:, None] & mk[None, :]
        lo += _mm(xt, tl.trans(tl.load(w + r_lo[:, None] * K + rk[None, :], mask=wm, other=0.0)), IEEE)
        hi += _mm(xt, tl.trans(tl.load(w + r_hi[:, None] * K + rk[None, :], mask=wm, other=0.0)), IEEE)
    if HAS_BIAS:
        lo += tl.load(bias + r_lo, mask=mi, other=0.0).to(tl.float32)[None, :]
        hi += tl.load(bias + r_hi, mask=mi, other=0.0).to(tl.float32)[None, :]
    cols = ri[None, :]
    if j < H + HK:  # q or k: per-head norm, then rotary
        if QK_NORM:
            r = 1.0 / tl.sqrt(((tl.sum(lo * lo, 1) + tl.sum(hi * hi, 1)) / D + qk_eps).to(tl.float32))
            wq = qkn + (j >= H).to(tl.int32) * D
            lo = lo * r[:, None] * tl.load(wq + ri, mask=mi, other=0.0).to(tl.float32)[None, :]
            hi = hi * r[:, None] * tl.load(wq + HALF + ri, mask=mi, other=0.0).to(tl.float32)[None, :]
        tab = rm[:, None] * HALF + cols
        mt = mm[:, None] & mi[None, :]
        c = tl.load(cos + tab, mask=mt, other=0.0)
        s = tl.load(sin + tab, mask=mt, other=0.0)
        lo, hi = lo * c - hi * s, hi * c + lo * s
    mo = mm[:, None] & mi[None, :]
    if j < H:
        base = q + (rm[:, None] * H + j) * D
    elif j < H + HK:
        base = k + (rm[:, None] * HK + j - H) * D
    else:
        base = v + (rm[:, None] * HK + j - H - HK) * D
    tl.store(base + cols, lo.to(q.dtype.element_ty), mask=mo)
    tl.store(base + HALF + cols, hi.to(q.dtype.element_ty), mask=mo)


@triton.jit
def _rms_linear_gemv_kernel(
    x, w, bias, nw, res, y, M, N, K, eps,
    BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr,
    HAS_RES: tl.constexpr,
):
    """`_rms_linear_kernel` for a few rows: program pn owns outputs pn*BN.. of every row (rows looped, the weight block
    served from cache after the first), products elementwise in fp32 on the input rounded to the weights' dtype."""
    pn = tl.program_id(0)
    rn = pn * BN + tl.arange(0, BN)
    mn = rn < N
    for m in range(M):
        rm = m + tl.arange(0, 1)  # the row as a one-row tile of the shared norm helpers
        inv = _inv_rms(x, rm, rm < M, K, eps, NORM, 1, BK)
        acc = tl.zeros([BN], tl.float32)
        up = tl.zeros([BN], tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            mk = rk < K
            xt = _normed(x, nw, rm, rm < M, rk, mk, inv, K, NORM).to(w.dtype.element_ty).to(tl.float32)
            wm = mn[:, None] & mk[None, :]
            acc += tl.sum(tl.load(w + rn[:, None] * K + rk[None, :], mask=wm, other=0.0).to(tl.float32) * xt, 1)
            if SWIGLU:
                up += tl.sum(tl.load(w + (N + rn)[:, None] * K + rk[None, :], mask=wm, other=0.0).to(tl.float32) * xt, 1)
        if HAS_BIAS:
            acc += tl.load(bias + rn, mask=mn, other=0.0).to(tl.float32)
            if SWIGLU:
                up += tl.load(bias + N + rn, mask=mn, other=0.0).to(tl.float32)
        if SWIGLU:
            acc = acc / (1.0 + tl.exp(-acc)) * up
        if HAS_RES:
            acc += tl.load(res + m * N + rn, mask=mn, other=0.0).to(tl.float32)
        tl.store(y + m * N + rn, acc.to(y.dtype.element_ty), mask=mn)


@triton.jit
def _qkv_rope_gemv_kernel(
    x, w, bias, nw, cos, sin, qkn, q, k, v, xn, M, K, eps, qk_eps,
    H: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
    HAS_BIAS: tl.constexpr, QK_NORM: tl.constexpr,
):
    """`_qkv_rope_kernel` for a few rows: program (head slot j, block of BH rotary pairs) over every row, products
    elementwise as in `_rms_linear_gemv_kernel`."""
    j, pi = tl.program_id(0), tl.program_id(1)
    HALF: tl.constexpr = D // 2
    ri = pi * BH + tl.arange(0, BH)
    mi = ri < HALF
    r_lo, r_hi = j * D + ri, j * D + HALF + ri
    for m in range(M):
        rm = m + tl.arange(0, 1)  # the row as a one-row tile of the shared norm helpers
        mm = rm < M
        mx = mm & (rm * 0 + j + pi == 0)  # the first program stores the normed input
        inv = _inv_rms(x, rm, mm, K, eps, True, 1, BK)
        lo, hi = tl.zeros([BH], tl.float32), tl.zeros([BH], tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            mk = rk < K
            xt = _normed(x, nw, rm, mm, rk, mk, inv, K, True)
            tl.store(xn + rm[:, None] * K + rk[None, :], xt.to(xn.dtype.element_ty), mask=mx[:, None] & mk[None, :])
            xt = xt.to(w.dtype.element_ty).to(tl.float32)
            wm = mi[:, None] & mk[None, :]
            lo += tl.sum(tl.load(w + r_lo[:, None] * K + rk[None, :], mask=wm, other=0.0).to(tl.float32) * xt, 1)
            hi += tl.sum(tl.load(w + r_hi[:, None] * K + rk[None, :], mask=wm, other=0.0).to(tl.float32) * xt, 1)
        if HAS_BIAS:
            lo += tl.load(bias + r_lo, mask=mi, other=0.0).to(tl.float32)
            hi += tl.load(bias + r_hi, mask=mi, other=0.0).to(tl.float32)
        if j < H + HK:  # q or k: per-head norm, then rotary
            if QK_NORM:
                r = 1.0 / tl.sqrt(((tl.sum(lo * lo, 0) + tl.sum(hi * hi, 0)) / D + qk_eps).to(tl.float32))
                wq = qkn + (j >= H).to(tl.int32) * D
                lo = lo * r * tl.load(wq + ri, mask=mi, other=0.0).to(tl.float32)
                hi = hi * r * tl.load(wq + HALF + ri, mask=mi, other=0.0).to(tl.float32)
            c = tl.load(cos + m * HALF + ri, mask=mi, other=0.0)
            s = tl.load(sin + m * HALF + ri, mask=mi, other=0.0)
            lo, hi = lo * c - hi * s, hi * c + lo * s
        if j < H:
            base = q + (m * H + j) * D
        elif j < H + HK:
            base = k + (m * HK + j - H) * D
        else:
            base = v + (m * HK + j - H - HK) * D
        tl.store(base + ri, lo.to(q.dtype.element_ty), mask=mi)
        tl.store(base + HALF + ri, hi.to(q.dtype.element_ty), mask=mi)


def _gemv_width(outputs: int, most: int) -> int:
    """Outputs a gemv program takes: about PROGRAMS programs, at most `most` outputs each."""
    return min(most, triton.next_power_of_2(triton.cdiv(outputs, PROGRAMS)))


def _gemv_depth(k: int, rows: int) -> int:
    """Input columns a gemv loop iteration reads: the weight block of `rows` rows within TILE elements."""
    return min(triton.next_power_of_2(k), max(BK, TILE // rows))


def _block_m(m: int) -> int:
    return min(64, max(16, triton.next_power_of_2(m)))


def rms_linear_triton(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, *, norm: Tensor | None = None, eps: float = 1e-6,
    act: str | None = None, residual: Tensor | None = None,
) -> Tensor:
    """`rms_linear_ref` in one launch (x [M, K], W [N, K] contiguous)."""
    if act not in (None, "swiglu"):
        raise ValueError(f"act must be None or 'swiglu', got {act!r}")
    m, kdim = x.shape
    n = weight.shape[0] // 2 if act == "swiglu" else weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    args = (x.contiguous(), weight, bias if bias is not None else weight, norm if norm is not None else weight,
            residual.contiguous() if residual is not None else y, y, m, n, kdim, float(eps))
    if m <= GEMV_ROWS:
        bn = _gemv_width(n, 16)  # wider blocks of few columns took 208+ registers a thread for sm_90 (16 x 256: 66)
        bk = _gemv_depth(kdim, 2 * bn if act == "swiglu" else bn)
        _rms_linear_gemv_kernel[(triton.cdiv(n, bn),)](*args, bn, bk, norm is not None, bias is not None, act == "swiglu",
                                                       residual is not None)
        return y
    bm = _block_m(m)
    bn = 16 if n <= 4096 else 64  # ~100+ programs on the narrow products, fewer and larger on a vocabulary's
    _rms_linear_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](
        *args, bm, bn, BK, norm is not None, bias is not None, act == "swiglu", residual is not None, weight.dtype == torch.float32,
    )
    return y


def qkv_rope_triton(
    x: Tensor, weight: Tensor, bias: Tensor | None, *, norm: Tensor, eps: float, heads: tuple[int, int], cos: Tensor,
    sin: Tensor, qk_norm: Tensor | None = None, qk_eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`qkv_rope_ref` in one launch."""
    h, hk = heads
    m, c = x.shape
    d = weight.shape[0] // (h + 2 * hk)
    q = torch.empty(m, h, d, dtype=x.dtype, device=x.device)
    k, v = (torch.empty(m, hk, d, dtype=x.dtype, device=x.device) for _ in range(2))
    xn = torch.empty_like(x)
    half = triton.next_power_of_2(d // 2)
    if m <= GEMV_ROWS:  # a per-head norm needs the whole head in its program
        bh = half if qk_norm is not None else _gemv_width((h + 2 * hk) * (d // 2), half)
        bk = _gemv_depth(c, 2 * bh)
        _qkv_rope_gemv_kernel[(h + 2 * hk, triton.cdiv(d // 2, bh))](
            x.contiguous(), weight, bias if bias is not None else weight, norm, cos.contiguous(), sin.contiguous(),
            qk_norm if qk_norm is not None else norm, q, k, v, xn, m, c, float(eps), float(qk_eps),
            h, hk, d, bh, bk, bias is not None, qk_norm is not None,
        )
        return q, k, v, xn
    bh = max(16, half if qk_norm is not None else min(16, half))  # a per-head norm needs the whole head in its program
    bm = _block_m(m)
    _qkv_rope_kernel[(h + 2 * hk, triton.cdiv(d // 2, bh), triton.cdiv(m, bm))](
        x.contiguous(), weight, bias if bias is not None else weight, norm, cos.contiguous(), sin.contiguous(),
        qk_norm if qk_norm is not None else norm, q, k, v, xn, m, c, float(eps), float(qk_eps),
        h, hk, d, bh, bm, BK, bias is not None, qk_norm is not None, weight.dtype == torch.float32,
    )
    return q, k, v, xn
