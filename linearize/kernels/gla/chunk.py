"""Triton chunked causal linear attention (the `hedgehog` kind and the linear part of `lolcats`),
forward and backward, and the forward with a per-channel log-decay g (the `gla` kind; its backward
is still the reference's). Same maths as `chunk_gla_ref`.

Forward: one program per (batch, KV head, block of value channels) walks the chunks in order,
keeping its [K, BV] slice of the fp32 state on chip: for each query head of the group,
o = q S + tril(q k^T) v (strictly lower for the exclusive scan), then S += k^T v.
Backward: dq = dO S^T + tril(dO v^T) k is the forward scan again (dO as queries, v as keys, k as
values, the transposed initial state); dk, dv and the initial state's gradient walk backward, one
program per (batch, KV head, block of value channels), with dS = dS_final + sum of later q^T dO
(dk = v dS^T + ..., dv = k dS + ...); dk sums over value channels, so the blocks' parts are added.
Query heads of a GQA group accumulate into their KV head's dk, dv without repeated k/v.
Gated forward, with b the running sum of g from the chunk start: o_i = (q_i * exp(b_i)) S +
sum_{j<=i} (sum_c q_ic k_jc exp(b_ic - b_jc)) v_j, then S = exp(b_last) S + (k exp(b_last - b))^T v.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _tile(ptr, b, T, t, mt, NH: tl.constexpr, head, D: tl.constexpr, rd, md):
    """Rows t of head `head` of a [B, T, NH, D] tensor, as fp32 (zeros outside the masks)."""
    return tl.load(ptr + ((b * T + t[:, None]) * NH + head) * D + rd[None, :], mask=mt[:, None] & md[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, val, b, T, t, mt, NH: tl.constexpr, head, D: tl.constexpr, rd, md):
    tl.store(ptr + ((b * T + t[:, None]) * NH + head) * D + rd[None, :], val.to(ptr.dtype.element_ty), mask=mt[:, None] & md[None, :])


@triton.jit
def _state(ptr, bh, K: tl.constexpr, V: tl.constexpr, rk, rv, mk, mv, BK: tl.constexpr, BV: tl.constexpr, PRESENT: tl.constexpr):
    """The [BK, BV] fp32 state tile of (batch, KV head) `bh`, or zeros."""
    if PRESENT:
        return tl.load(ptr + bh * K * V + rk[:, None] * V + rv[None, :], mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
    return tl.zeros([BK, BV], dtype=tl.float32)


@triton.jit
def _block(HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Program (batch x KV head, block of value channels): its indices, chunk rows and masks."""
    bh, iv = tl.program_id(0), tl.program_id(1)
    rc, rk = tl.arange(0, C), tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    return bh, iv, bh // HK, bh % HK, rc, rk, rv, rk < K, rv < V


@triton.jit
def _chunk_fwd_kernel(
    q, k, v, g, s0, o, s_out, T,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EXCLUSIVE: tl.constexpr, HAS_S0: tl.constexpr,
    GATED: tl.constexpr,
):
    bh, iv, b, hk, rc, rk, rv, mk, mv = _block(HK, K, V, C, BK, BV)
    G: tl.constexpr = H // HK
    state = _state(s0, bh, K, V, rk, rv, mk, mv, BK, BV, HAS_S0)
    causal = (rc[:, None] > rc[None, :]) if EXCLUSIVE else (rc[:, None] >= rc[None, :])
    for start in range(0, T, C):
        t = start + rc
        mt = t < T
        kc = _tile(k, b, T, t, mt, HK, hk, K, rk, mk)
        vc = _tile(v, b, T, t, mt, HK, hk, V, rv, mv)
        if GATED:  # b: running sum of log-decays from the chunk start; 0 past T (k is 0 there too)
            gc = _tile(g, b, T, t, mt, HK, hk, K, rk, mk)
            bc = tl.cumsum(gc, axis=0)
            bq = bc - gc if EXCLUSIVE else bc  # the exclusive query reads the state before its own token
            blast = tl.sum(gc, axis=0)
            # log decay from key j to query i; -inf where i does not see j (exp gives 0, never inf)
            rel = tl.where(causal[:, :, None], bq[:, None, :] - bc[None, :, :], float("-inf"))
        for j in range(G):
            qc = _tile(q, b, T, t, mt, H, hk * G + j, K, rk, mk)
            if GATED:
                a = tl.sum(qc[:, None, :] * kc[None, :, :] * tl.exp(rel), axis=2)
                qc = qc * tl.exp(bq)
            else:
                a = tl.where(causal, tl.dot(qc, tl.trans(kc)), 0.0)
            _store_tile(o, tl.dot(qc, state) + tl.dot(a, vc), b, T, t, mt, H, hk * G + j, V, rv, mv)
        if GATED:
            state = state * tl.exp(blast)[:, None] + tl.dot(tl.trans(kc * tl.exp(blast[None, :] - bc)), vc)
        else:
            state += tl.dot(tl.trans(kc), vc)
    tl.store(s_out + bh * K * V + rk[:, None] * V + rv[None, :], state, mask=mk[:, None] & mv[None, :])


def chunk_linear_attn_triton(
    q: Tensor, k: Tensor, v: Tensor, *, g: Tensor | None = None, initial_state: Tensor | None = None,
    exclusive: bool = False, chunk_size: int = 64, out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """q [B,T,H,K], k [B,T,Hk,K], v [B,T,Hk,V] -> (o [B,T,H,V] in v's dtype, final state [B,Hk,K,V] fp32).

    g [B,T,Hk,K]: log-decay (<= 0; a scalar-per-head decay is g broadcast over K), forward only (no
    autograd for it yet). Gated chunks are 16 tokens whatever `chunk_size`: the intra-chunk weights are
    formed channel by channel ([16, 16, K]), each exponent a sum of log-decays over a stretch of
    tokens (<= 0), so strong decays underflow, never overflow.
    On a GPU, fp32 products run in TF32 (Triton's default): relative error ~1e-3 against fp32.
    """
    b, t, h, kd = q.shape
    hk, vd = k.shape[2], v.shape[-1]
    if h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    if g is not None and g.shape != k.shape:
        raise ValueError(f"g must have k's shape {tuple(k.shape)}, got {tuple(g.shape)}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty(b, t, h, vd, dtype=v.dtype, device=v.device) if out is None else out
    s_out = torch.empty(b, hk, kd, vd, dtype=torch.float32, device=v.device)
    s0 = initial_state.float().contiguous() if initial_state is not None else s_out
    bk = max(16, triton.next_power_of_2(kd))
    bv = max(16, min(64, triton.next_power_of_2(vd)))
    gated = g is not None
    _chunk_fwd_kernel[(b * hk, triton.cdiv(vd, bv))](
        q, k, v, g.float().contiguous() if gated else q, s0, o, s_out, t, h, hk, kd, vd, 16 if gated else chunk_size,
        bk, bv, exclusive, initial_state is not None, gated,
    )
    return o, s_out


@triton.jit
def _chunk_linear_dkv_kernel(
    q, k, v, do, ds_final, dk, dv, ds0, T, NC,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EXCLUSIVE: tl.constexpr, HAS_DS: tl.constexpr,
):
    # walking the chunks backward, dS = (gradient of the final state) + sum over later queries of q^T dO.
    # Program (bh, iv) owns a BV-wide slice of V: its dv slice is exact; dk is a sum over V, so each
    # slice writes its part to dk[iv] and the caller adds the parts.
    bh, iv, b, hk, rc, rk, rv, mk, mv = _block(HK, K, V, C, BK, BV)
    G: tl.constexpr = H // HK
    dstate = _state(ds_final, bh, K, V, rk, rv, mk, mv, BK, BV, HAS_DS)
    dk_part = dk + iv.to(tl.int64) * tl.num_programs(0) * T * K  # dk is [NV, B, T, HK, K]
    later = (rc[:, None] < rc[None, :]) if EXCLUSIVE else (rc[:, None] <= rc[None, :])  # [j, i]: i sees j
    for n in range(NC):
        start = (NC - 1 - n) * C
        t = start + rc
        mt = t < T
        kc = _tile(k, b, T, t, mt, HK, hk, K, rk, mk)
        vc = _tile(v, b, T, t, mt, HK, hk, V, rv, mv)
        dkc = tl.dot(vc, tl.trans(dstate))
        dvc = tl.dot(kc, dstate)
        for j in range(G):
            qc = _tile(q, b, T, t, mt, H, hk * G + j, K, rk, mk)
            doc = _tile(do, b, T, t, mt, H, hk * G + j, V, rv, mv)
            dkc += tl.dot(tl.where(later, tl.dot(vc, tl.trans(doc)), 0.0), qc)
            dvc += tl.dot(tl.where(later, tl.dot(kc, tl.trans(qc)), 0.0), doc)
            dstate += tl.dot(tl.trans(qc), doc)
        _store_tile(dk_part, dkc, b, T, t, mt, HK, hk, K, rk, mk)
        _store_tile(dv, dvc, b, T, t, mt, HK, hk, V, rv, mv)
    tl.store(ds0 + bh * K * V + rk[:, None] * V + rv[None, :], dstate, mask=mk[:, None] & mv[None, :])


class ChunkLinearAttnFunction(torch.autograd.Function):
    """Forward and backward on the Triton kernels; gradients for q, k, v and the initial state."""

    @staticmethod
    def forward(ctx, q, k, v, initial_state, exclusive: bool, chunk_size: int):
        o, state = chunk_linear_attn_triton(q, k, v, initial_state=initial_state, exclusive=exclusive, chunk_size=chunk_size)
        ctx.save_for_backward(q, k, v, initial_state)
        ctx.exclusive, ctx.chunk_size = exclusive, chunk_size
        return o, state

    @staticmethod
    def backward(ctx, do, dstate):
        q, k, v, s0 = ctx.saved_tensors
        b, t, h, kd = q.shape
        hk, vd = k.shape[2], v.shape[-1]
        c = ctx.chunk_size
        bk, bv = max(16, triton.next_power_of_2(kd)), max(16, min(64, triton.next_power_of_2(vd)))
        nv = triton.cdiv(vd, bv)
        q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
        dk_parts = torch.empty(nv, *k.shape, dtype=torch.float32 if nv > 1 else k.dtype, device=k.device)
        dv = torch.empty_like(v)
        # dq_i = dO_i S_i^T is the forward scan itself, with dO as queries, v as keys, k as values
        dq = chunk_linear_attn_triton(
            do, v, k, initial_state=None if s0 is None else s0.transpose(-1, -2), exclusive=ctx.exclusive, chunk_size=c,
        )[0].to(q.dtype)
        ds0 = torch.empty(b, hk, kd, vd, dtype=torch.float32, device=q.device)
        dsf = dstate.float().contiguous() if dstate is not None else ds0
        _chunk_linear_dkv_kernel[(b * hk, nv)](
            q, k, v, do, dsf, dk_parts, dv, ds0, t, triton.cdiv(t, c), h, hk, kd, vd, c, bk, bv, ctx.exclusive, dstate is not None,
        )
        dk = dk_parts[0] if nv == 1 else dk_parts.sum(0).to(k.dtype)
        return dq, dk, dv, (ds0.to(s0.dtype) if s0 is not None else None), None, None


def chunk_linear_attn(
    q: Tensor, k: Tensor, v: Tensor, *, initial_state: Tensor | None = None, exclusive: bool = False, chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Differentiable chunked causal linear attention on the Triton kernels (same maths as `chunk_gla_ref`, g=None)."""
    return ChunkLinearAttnFunction.apply(q, k, v, initial_state, exclusive, chunk_size)
