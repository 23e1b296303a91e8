"""Triton chunked forward of causal linear attention without decay (the `hedgehog` kind and the
linear part of `lolcats`), for inference and prefill: no autograd (training uses the reference).

One program per (batch, KV head, block of value channels) walks the chunks in order, keeping its
[K, BV] slice of the fp32 state on chip: for each query head of the group, o = q S + tril(q k^T) v
(strictly lower for the exclusive scan), then S += k^T v. Same maths as `chunk_gla_ref` with g=None.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _chunk_linear_fwd_kernel(
    q, k, v, s0, o, s_out, T,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EXCLUSIVE: tl.constexpr, HAS_S0: tl.constexpr,
):
    bh = tl.program_id(0)
    iv = tl.program_id(1)
    b = bh // HK
    hk = bh % HK
    G: tl.constexpr = H // HK
    rc, rk = tl.arange(0, C), tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    s_off = bh * K * V + rk[:, None] * V + rv[None, :]
    if HAS_S0:
        state = tl.load(s0 + s_off, mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    if EXCLUSIVE:
        causal = rc[:, None] > rc[None, :]
    else:
        causal = rc[:, None] >= rc[None, :]
    for start in range(0, T, C):
        t = start + rc
        mt = t < T
        kc = tl.load(k + ((b * T + t[:, None]) * HK + hk) * K + rk[None, :], mask=mt[:, None] & mk[None, :], other=0.0).to(tl.float32)
        vc = tl.load(v + ((b * T + t[:, None]) * HK + hk) * V + rv[None, :], mask=mt[:, None] & mv[None, :], other=0.0).to(tl.float32)
        for j in range(G):
            h = hk * G + j
            qc = tl.load(q + ((b * T + t[:, None]) * H + h) * K + rk[None, :], mask=mt[:, None] & mk[None, :], other=0.0).to(tl.float32)
            a = tl.where(causal, tl.dot(qc, tl.trans(kc)), 0.0)
            out = tl.dot(qc, state) + tl.dot(a, vc)
            tl.store(o + ((b * T + t[:, None]) * H + h) * V + rv[None, :], out.to(o.dtype.element_ty), mask=mt[:, None] & mv[None, :])
        state += tl.dot(tl.trans(kc), vc)
    tl.store(s_out + s_off, state, mask=mk[:, None] & mv[None, :])


def chunk_linear_attn_triton(
    q: Tensor, k: Tensor, v: Tensor, *, initial_state: Tensor | None = None, exclusive: bool = False,
    chunk_size: int = 64, out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """q [B,T,H,K], k [B,T,Hk,K], v [B,T,Hk,V] -> (o [B,T,H,V] in v's dtype, final state [B,Hk,K,V] fp32).

    On a GPU, fp32 products run in TF32 (Triton's default): relative error ~1e-3 against fp32.
    """
    b, t, h, kd = q.shape
    hk, vd = k.shape[2], v.shape[-1]
    if h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty(b, t, h, vd, dtype=v.dtype, device=v.device) if out is None else out
    s_out = torch.empty(b, hk, kd, vd, dtype=torch.float32, device=v.device)
    s0 = initial_state.float().contiguous() if initial_state is not None else s_out
    bk = max(16, triton.next_power_of_2(kd))
    bv = max(16, min(64, triton.next_power_of_2(vd)))
    grid = (b * hk, triton.cdiv(vd, bv))
    _chunk_linear_fwd_kernel[grid](
        q, k, v, s0, o, s_out, t, h, hk, kd, vd, chunk_size, bk, bv, exclusive, initial_state is not None,
    )
    return o, s_out
