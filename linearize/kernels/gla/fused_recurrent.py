"""Triton decode step of (gated) linear attention: decay, write and read the state in one launch.

One program per (batch, KV head, block of value channels): it loads its [K, BV] slice of the fp32
state once, applies the per-channel decay exp(g) (if any), adds k v^T, stores the new state (in
place when `out_state` is the input state, which keeps addresses fixed for CUDA graphs) and reads
it out for every query head of the group (GQA without repeating k/v). Same maths as `gla_step_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _gla_step_kernel(
    q, k, v, g, s_in, s_out, o,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr,
):
    bh = tl.program_id(0)  # b * HK + kv head
    iv = tl.program_id(1)
    b = bh // HK
    hk = bh % HK
    G: tl.constexpr = H // HK
    rk = tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    mk = rk < K
    mv = rv < V
    ms = mk[:, None] & mv[None, :]
    s_off = bh * K * V + rk[:, None] * V + rv[None, :]
    state = tl.load(s_in + s_off, mask=ms, other=0.0).to(tl.float32)
    kk = tl.load(k + bh * K + rk, mask=mk, other=0.0).to(tl.float32)
    vv = tl.load(v + bh * V + rv, mask=mv, other=0.0).to(tl.float32)
    if HAS_G:
        gg = tl.load(g + bh * K + rk, mask=mk, other=0.0).to(tl.float32)
        state = state * tl.exp(gg)[:, None]
    state = state + kk[:, None] * vv[None, :]
    tl.store(s_out + s_off, state, mask=ms)
    for j in range(G):
        h = b * H + hk * G + j
        qq = tl.load(q + h * K + rk, mask=mk, other=0.0).to(tl.float32)
        out = tl.sum(qq[:, None] * state, axis=0)
        tl.store(o + h * V + rv, out.to(o.dtype.element_ty), mask=mv)


def gla_step_triton(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, state: Tensor,
    out_state: Tensor | None = None, out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One decode step: q [B,H,K], k [B,Hk,K], v [B,Hk,V], g [B,Hk,K] or None, state [B,Hk,K,V] fp32.

    Returns (o [B,H,V] in v's dtype, new state). Pass `out_state=state` to update in place and
    preallocated `out` / `out_state` buffers to keep addresses fixed (CUDA graphs).
    """
    b, h, kd = q.shape
    hk, vd = k.shape[1], v.shape[-1]
    if h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    state = state.float().contiguous()
    out_state = torch.empty_like(state) if out_state is None else out_state
    o = torch.empty(b, h, vd, dtype=v.dtype, device=v.device) if out is None else out
    bk = triton.next_power_of_2(kd)
    bv = min(triton.next_power_of_2(vd), max(16, 8192 // bk))  # keep the [BK, BV] tile in registers
    gg = g.contiguous() if g is not None else k  # placeholder pointer when there is no decay
    grid = (b * hk, triton.cdiv(vd, bv))
    _gla_step_kernel[grid](q, k, v, gg, state, out_state, o, h, hk, kd, vd, bk, bv, g is not None)
    return o, out_state
