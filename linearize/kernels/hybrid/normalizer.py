"""Triton normalizer of the undecayed hybrids' linear part (`naive.linear_normalizer`'s maths), forward and backward.

den_t = phi(q_t) . (z0 + the sum of phi(k_s) over the earlier tokens s of t's sequence), z = z0 + the sum over all.
Tiles of BT tokens, every tile in parallel: one program per (row, KV head, tile, block of BF feature columns).
 - within a tile the exclusive sums are one product M @ phi(k) with the 0/1 matrix M_ts = [first_t <= s < t]
   (first_t: the start of t's sequence, 0 unless packed) on the tensor cores;
 - across tiles, a first pass writes each tile's sum over its last sequence (fp32); their prefix, restarted where a
   sequence starts (fp64 differences, a [rows, heads, F, tiles] tensor), is the carry a tile's tokens add when their
   sequence began before the tile;
 - the query heads of the KV head's group read the same sums; each feature block writes its partial dot products,
   summed afterwards (no atomics).
Backward: dphi(q_t) = dden_t excl_t (the forward's sums again); dphi(k_s) = sum over the later tokens t of its sequence
of u_t = sum_g dden_tg phi(q_tg): M^T U within a tile plus the suffix sums of later tiles (the reverse carry), which also
give dz0 = sum_t u_t + dz. Two sweeps over phi(q) and phi(k), where a cumulative sum over T (PyTorch's scan over a
non-innermost dimension is serial in T: 1.5 ms at 4k tokens x 32 heads on an H200) and the ones column in the scan
(129 value columns, three 64-wide blocks) cost more. On a GPU fp32 products run in TF32 (as the other kernels').
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..triton_utils import check_offsets
from ..triton_utils import dot as _dot

BT = 64  # tokens per tile


@triton.jit
def _tile(x, first, b, t0, T, s_b, s_t, s_h, h, rf, mf, PACKED: tl.constexpr, BT: tl.constexpr, OFF: tl.constexpr = 0):
    """One tile of x [B,T,*,F] (head h, feature columns rf; position t reads token t - OFF, zeros before the first), the
    positions, their mask and sequence starts."""
    rt = t0 + tl.arange(0, BT)
    mt = rt < T
    mx = mt & (rt - OFF >= 0)
    tile = tl.load(x + b * s_b + (rt - OFF)[:, None] * s_t + h * s_h + rf[None, :], mask=mx[:, None] & mf[None, :], other=0.0)
    if PACKED:
        fst = tl.load(first + rt, mask=mt, other=0)
    else:
        fst = tl.zeros([BT], dtype=tl.int32)
    return tile, rt, mt, fst


@triton.jit
def _program(HK: tl.constexpr, F_: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr):
    """Program (row x KV head, tile, feature block): row, KV head, tile, block, feature columns, their mask, first token."""
    pid, n, fb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rf = fb * BF + tl.arange(0, BF)
    return pid // HK, pid % HK, n, fb, rf, rf < F_, n * BT


@triton.jit
def _last(x, t0, T, BT: tl.constexpr):
    """The entry of a [BT] vector at the tile's last token."""
    return tl.sum(tl.where(tl.arange(0, BT) == tl.minimum(T - t0, BT) - 1, x, 0), 0)


@triton.jit
def _sums_kernel(fk, first, out, T, NT, s_kb, s_kt, s_kh,
                 HK: tl.constexpr, F_: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr, PACKED: tl.constexpr,
                 OFF: tl.constexpr = 0):
    """Each tile's sum of phi(k) over its last sequence's tokens -> out [B,HK,F,NT] (fp32)."""
    b, hk, n, fb, rf, mf, t0 = _program(HK, F_, BF, BT)
    k, rt, mt, fst = _tile(fk, first, b, t0, T, s_kb, s_kt, s_kh, hk, rf, mf, PACKED, BT, OFF)
    tail = tl.sum(tl.where((rt >= _last(fst, t0, T, BT))[:, None], k.to(tl.float32), 0.0), 0)
    tl.store(out + ((b * HK + hk) * F_ + rf) * NT + n, tail, mask=mf)


@triton.jit
def _excl(k, rt, fst, carry, t0):
    """Exclusive sums of phi(k) within each token's sequence: the tile's part as a product, the carry where the
    sequence began before the tile (at the first tile the carry is z0, or 0)."""
    m = tl.where((rt[None, :] < rt[:, None]) & (rt[None, :] >= fst[:, None]), 1.0, 0.0)  # (bool to bf16 fails interpreted)
    keep = (fst < t0) | (t0 == 0)
    return _dot(m.to(k.dtype), k) + tl.where(keep[:, None], carry[None, :], 0.0)


@triton.jit
def _den_kernel(fq, fk, first, carry, den, T, NT, s_qb, s_qt, s_qh, s_kb, s_kt, s_kh,
                HK: tl.constexpr, G: tl.constexpr, F_: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr,
                PACKED: tl.constexpr, OFF: tl.constexpr = 0):
    """den [NFB,B,T,H] (fp32 partial dot products of each feature block)."""
    b, hk, n, fb, rf, mf, t0 = _program(HK, F_, BF, BT)
    B = tl.num_programs(0) // HK
    k, rt, mt, fst = _tile(fk, first, b, t0, T, s_kb, s_kt, s_kh, hk, rf, mf, PACKED, BT, OFF)
    c = tl.load(carry + ((b * HK + hk) * F_ + rf) * NT + n, mask=mf, other=0.0)
    excl = _excl(k, rt, fst, c, t0)
    for g in tl.static_range(G):
        h = hk * G + g
        q = _tile(fq, first, b, t0, T, s_qb, s_qt, s_qh, h, rf, mf, False, BT)[0]
        tl.store(den + ((fb * B + b) * T + rt) * (HK * G) + h, tl.sum(q.to(tl.float32) * excl, 1), mask=mt)


@triton.jit
def _dsums_kernel(fq, dden, first, out, T, NT, s_qb, s_qt, s_qh,
                  HK: tl.constexpr, G: tl.constexpr, F_: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr,
                  PACKED: tl.constexpr):
    """Each tile's sum of u_t over the tokens whose sequence began before it (all of the first tile) -> out [B,HK,F,NT]."""
    b, hk, n, fb, rf, mf, t0 = _program(HK, F_, BF, BT)
    rt = t0 + tl.arange(0, BT)
    mt = rt < T
    fst = tl.load(first + rt, mask=mt, other=0) if PACKED else tl.zeros([BT], dtype=tl.int32)
    u = tl.zeros([BT, BF], dtype=tl.float32)
    for g in tl.static_range(G):
        h = hk * G + g
        q = _tile(fq, first, b, t0, T, s_qb, s_qt, s_qh, h, rf, mf, False, BT)[0]
        u += tl.load(dden + (b * T + rt) * (HK * G) + h, mask=mt, other=0.0)[:, None] * q.to(tl.float32)
    keep = (fst < t0) | (t0 == 0)
    tl.store(out + ((b * HK + hk) * F_ + rf) * NT + n, tl.sum(tl.where(keep[:, None], u, 0.0), 0), mask=mf)


@triton.jit
def _bwd_kernel(fq, fk, dden, first, carry, rcarry, dfq, dfk, T, NT, s_qb, s_qt, s_qh, s_kb, s_kt, s_kh,
                HK: tl.constexpr, G: tl.constexpr, F_: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr,
                PACKED: tl.constexpr, OFF: tl.constexpr = 0):
    """dfq [B,T,H,F] = dden excl; dfk [B,T,HK,F] = M^T U + the reverse carry (contiguous outputs; position t's at
    token t - OFF)."""
    b, hk, n, fb, rf, mf, t0 = _program(HK, F_, BF, BT)
    k, rt, mt, fst = _tile(fk, first, b, t0, T, s_kb, s_kt, s_kh, hk, rf, mf, PACKED, BT, OFF)
    at = ((b * HK + hk) * F_ + rf) * NT + n
    excl = _excl(k, rt, fst, tl.load(carry + at, mask=mf, other=0.0), t0)
    u = tl.zeros([BT, BF], dtype=tl.float32)
    for g in tl.static_range(G):
        h = hk * G + g
        q = _tile(fq, first, b, t0, T, s_qb, s_qt, s_qh, h, rf, mf, False, BT)[0]
        dd = tl.load(dden + (b * T + rt) * (HK * G) + h, mask=mt, other=0.0)
        u += dd[:, None] * q.to(tl.float32)
        tl.store(dfq + ((b * T + rt[:, None]) * (HK * G) + h) * F_ + rf[None, :], (dd[:, None] * excl).to(dfq.dtype.element_ty),
                 mask=mt[:, None] & mf[None, :])
    mt_ = tl.where((rt[:, None] < rt[None, :]) & (rt[:, None] >= fst[None, :]), 1.0, 0.0)  # M^T: [s, t]
    dk = _dot(mt_, u)
    dk += tl.where((rt >= _last(fst, t0, T, BT))[:, None], tl.load(rcarry + at, mask=mf, other=0.0)[None, :], 0.0)
    mk = mt & (rt - OFF >= 0)
    tl.store(dfk + ((b * T + rt[:, None] - OFF) * HK + hk) * F_ + rf[None, :], dk.to(dfk.dtype.element_ty),
             mask=mk[:, None] & mf[None, :])


def _restarts(first: Tensor, t: int, nt: int) -> Tensor:
    """[NT] bool: whether the sequence of a tile's last token starts inside the tile (always at the first tile)."""
    t0 = torch.arange(nt, device=first.device) * BT
    return first[torch.clamp(t0 + BT, max=t) - 1] >= t0


def _carries(sums: Tensor, restart: Tensor | None, z0: Tensor | None) -> Tensor:
    """Carry into each tile [B,HK,F,NT]: the tiles' sums since the latest restart before it (restart None: not packed,
    all earlier tiles, + z0)."""
    nt = sums.shape[-1]
    if restart is None:
        carry = F.pad(sums[..., :-1].cumsum(-1), (1, 0))
        return carry if z0 is None else carry + z0[..., None]
    idx = torch.arange(nt, device=sums.device)
    cs = F.pad(sums.double().cumsum(-1), (1, 0))
    since = F.pad(torch.where(restart, idx, 0).cummax(0).values[:-1], (1, 0))  # latest restart tile <= n-1
    carry = cs[..., :nt] - cs[..., since]
    return (carry if z0 is None else carry + z0[..., None]).float()


def _rcarries(dsums: Tensor, restart: Tensor | None, dz: Tensor | None) -> tuple[Tensor, Tensor]:
    """Reverse carry into each tile [B,HK,F,NT] (later tiles' sums up to and including the next restart, + dz where
    there is none; restart None: not packed, all later tiles) and dz0 = every tile's sum + dz."""
    nt = dsums.shape[-1]
    if restart is None:
        cs = dsums.cumsum(-1)
        rcarry, dz0 = cs[..., -1:] - cs, cs[..., -1]
        return (rcarry, dz0) if dz is None else (rcarry + dz[..., None], dz0 + dz)
    idx = torch.arange(nt, device=dsums.device)
    rs = F.pad(dsums.double().flip(-1).cumsum(-1).flip(-1), (0, 1))  # suffix sums, rs[NT] = 0
    nxt = torch.where(restart, idx, nt).flip(0).cummin(0).values.flip(0)  # first restart tile >= m
    until = F.pad(nxt[1:], (0, 1), value=nt)  # first restart after tile n
    rcarry = rs[..., 1:] - rs[..., torch.clamp(until + 1, max=nt)]
    dz0 = rs[..., 0]
    if dz is not None:
        rcarry = rcarry + torch.where(until == nt, 1.0, 0.0).double() * dz[..., None]
        dz0 = dz0 + dz
    return rcarry.float(), dz0.float()


def _blocks(f: int) -> tuple[int, int]:
    bf = min(64, max(16, triton.next_power_of_2(f)))
    return bf, triton.cdiv(f, bf)


class LinearNormalizerFunction(torch.autograd.Function):
    """den [B,T,H] (phi(q)'s dtype) and z [B,HK,F] (fp32) on the Triton kernels; gradients for phi(q), phi(k), z0."""

    @staticmethod
    def forward(ctx, fq: Tensor, fk: Tensor, z0: Tensor | None, first: Tensor | None, key_offset: int = 0):
        b, t, h, f = fq.shape
        hk = fk.shape[2]
        fq, fk = (x if x.stride(-1) == 1 else x.contiguous() for x in (fq, fk))
        first = None if first is None else first.to(torch.int32).contiguous()
        bf, nfb = _blocks(f)
        nt = triton.cdiv(t, BT)
        grid = (b * hk, nt, nfb)
        shape = dict(HK=hk, F_=f, BF=bf, BT=BT, PACKED=first is not None, OFF=key_offset)
        sums = torch.empty(b, hk, f, nt, dtype=torch.float32, device=fq.device)
        _sums_kernel[grid](fk, first if first is not None else fk, sums, t, nt, *fk.stride()[:3], **shape)
        restart = None if first is None else _restarts(first, t, nt)
        carry = _carries(sums, restart, None if z0 is None else z0.float())
        parts = torch.empty(nfb, b, t, h, dtype=torch.float32, device=fq.device)
        _den_kernel[grid](fq, fk, first if first is not None else fk, carry, parts, t, nt, *fq.stride()[:3],
                          *fk.stride()[:3], G=h // hk, **shape)
        # the last tile's own sum (over its last sequence) plus its carry, unless that sequence starts inside it
        z = sums[..., -1] + (carry[..., -1] if restart is None else carry[..., -1] * ~restart[-1])
        ctx.save_for_backward(fq, fk, first, carry, restart)
        ctx.has_z0, ctx.key_offset = z0 is not None, key_offset
        return parts.sum(0).to(fq.dtype), z

    @staticmethod
    def backward(ctx, dden: Tensor, dz: Tensor):
        fq, fk, first, carry, restart = ctx.saved_tensors
        b, t, h, f = fq.shape
        hk = fk.shape[2]
        bf, nfb = _blocks(f)
        nt = carry.shape[-1]
        grid = (b * hk, nt, nfb)
        shape = dict(HK=hk, G=h // hk, F_=f, BF=bf, BT=BT, PACKED=first is not None)
        off = ctx.key_offset
        dden = dden.float().contiguous()
        dsums = torch.empty_like(carry)
        _dsums_kernel[grid](fq, dden, first if first is not None else fq, dsums, t, nt, *fq.stride()[:3], **shape)
        rcarry, dz0 = _rcarries(dsums, restart, dz)
        dfq = torch.empty(fq.shape, dtype=fq.dtype, device=fq.device)
        dfk = (torch.zeros if off else torch.empty)(fk.shape, dtype=fk.dtype, device=fk.device)  # the last `off` keys: none
        _bwd_kernel[grid](fq, fk, dden, first if first is not None else fq, carry, rcarry, dfq, dfk, t, nt, *fq.stride()[:3],
                          *fk.stride()[:3], **shape, OFF=off)
        return dfq, dfk, dz0 if ctx.has_z0 else None, None, None


def linear_normalizer_triton(
    fq: Tensor, fk: Tensor, z0: Tensor | None, first: Tensor | None = None, key_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """`naive.linear_normalizer` on the Triton kernels: den [B,T,H] in phi(q)'s dtype and z [B,HK,F] in fp32 (with
    `first`, packed sequences, z is the last sequence's sum; with key_offset, position t's key is token t - key_offset's,
    read in place)."""
    if fq.shape[2] % fk.shape[2] or fq.shape[:2] != fk.shape[:2] or fq.shape[-1] != fk.shape[-1]:
        raise ValueError(f"phi(q) {tuple(fq.shape)} and phi(k) {tuple(fk.shape)} must be [B,T,H,F] and [B,T,Hk,F], H a multiple of Hk")
    if first is not None and (fq.shape[0] != 1 or key_offset):
        raise ValueError("packed sequences (first) need batch size 1 and no key_offset")
    check_offsets("linear normalizer", phi_q=fq.numel(), phi_k=fk.numel())
    return LinearNormalizerFunction.apply(fq, fk.to(fq.dtype), z0, first, key_offset)
