"""Triton decode step of the sliding-window softmax + linear attention hybrid (`lolcats`, `lizard`).

One program per (batch, KV head, block of value channels) computes, for every query head of the
group, the max-shifted window softmax over the W window tokens, the read of the (decayed) linear
memory, the shared normalizer and the mix; then it writes the memory updated with the token that
leaves the window. Same maths as `hybrid_step_ref`; the window buffers are shifted by the caller.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .naive import EPS, extend_window, shift_window


@triton.jit
def _hybrid_step_kernel(
    q, fq, mix, ek, ev, evalid, fk0, v0, gsum, g0, s_in, s_out, y,
    scale, softcap,
    H: tl.constexpr, HK: tl.constexpr, W: tl.constexpr, D: tl.constexpr, F: tl.constexpr, V: tl.constexpr,
    BW: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
    HAS_G: tl.constexpr, HAS_CAP: tl.constexpr, EPS_: tl.constexpr,
):
    bh = tl.program_id(0)
    iv = tl.program_id(1)
    b = bh // HK
    hk = bh % HK
    G: tl.constexpr = H // HK
    rw, rd, rf = tl.arange(0, BW), tl.arange(0, BD), tl.arange(0, BF)
    rv = iv * BV + tl.arange(0, BV)
    mw, md, mf, mv = rw < W, rd < D, rf < F, rv < V
    # window tokens of this KV head: keys [W, D], values [W, BV], validity [W]
    kw = tl.load(ek + ((b * W + rw[:, None]) * HK + hk) * D + rd[None, :], mask=mw[:, None] & md[None, :], other=0.0)
    vw = tl.load(ev + ((b * W + rw[:, None]) * HK + hk) * V + rv[None, :], mask=mw[:, None] & mv[None, :], other=0.0)
    ok = (tl.load(evalid + b * W + rw, mask=mw, other=0) != 0) & mw
    # linear memory [F, BV] and its normalizer column z [F]
    s_row = bh * F * (V + 1) + rf[:, None] * (V + 1)
    mem = tl.load(s_in + s_row + rv[None, :], mask=mf[:, None] & mv[None, :], other=0.0)
    z = tl.load(s_in + bh * F * (V + 1) + rf * (V + 1) + V, mask=mf, other=0.0)
    if HAS_G:
        decay_q = tl.exp(tl.load(gsum + bh * F + rf, mask=mf, other=0.0))
    for j in range(G):
        h = b * H + hk * G + j
        qq = tl.load(q + h * D + rd, mask=md, other=0.0).to(tl.float32)
        s = tl.sum(kw.to(tl.float32) * qq[None, :], axis=1) * scale
        if HAS_CAP:
            t = tl.exp(-2.0 * tl.abs(s / softcap))
            s = softcap * tl.where(s >= 0, 1.0, -1.0) * (1.0 - t) / (1.0 + t)
        s = tl.where(ok, s, float("-inf"))
        m = tl.max(s, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)
        a = tl.where(ok, tl.exp(s - m), 0.0)
        num_w = tl.sum(a[:, None] * vw.to(tl.float32), axis=0)
        den_w = tl.sum(a, axis=0)
        ff = tl.load(fq + h * F + rf, mask=mf, other=0.0).to(tl.float32)
        if HAS_G:
            ff = ff * decay_q
        num_l = tl.sum(ff[:, None] * mem, axis=0)
        den_l = tl.sum(ff * z, axis=0)
        w = tl.load(mix + hk * G + j).to(tl.float32)
        out = (w * num_w + (1.0 - w) * num_l) / (w * den_w + (1.0 - w) * den_l + EPS_)
        tl.store(y + h * V + rv, out.to(y.dtype.element_ty), mask=mv)
    # the oldest window token enters the memory
    f0 = tl.load(fk0 + bh * F + rf, mask=mf, other=0.0).to(tl.float32)
    vv = tl.load(v0 + bh * V + rv, mask=mv, other=0.0).to(tl.float32)
    if HAS_G:
        d0 = tl.exp(tl.load(g0 + bh * F + rf, mask=mf, other=0.0))
        mem = mem * d0[:, None]
        z = z * d0
    tl.store(s_out + s_row + rv[None, :], mem + f0[:, None] * vv[None, :], mask=mf[:, None] & mv[None, :])
    if iv == 0:
        tl.store(s_out + bh * F * (V + 1) + rf * (V + 1) + V, z + f0, mask=mf)


def hybrid_step_triton(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, g: Tensor | None, mix: Tensor,
    *, window: int, scale: float, softcap: float | None = None, valid: Tensor | None = None,
    state: dict[str, Tensor], out: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Drop-in for `hybrid_step_ref` (same arguments and state layout)."""
    b, h, d = q.shape
    hk, vd, f = k.shape[1], v.shape[-1], fk.shape[-1]
    ext = extend_window(state, k[:, None], v[:, None], fk[:, None], None if g is None else g[:, None],
                        None if valid is None else valid[:, None])  # [B,W,...]
    ext_g = ext.get("g")
    mem = state["S"].float().contiguous()
    new_mem = torch.empty_like(mem)
    y = torch.empty(b, h, vd, dtype=v.dtype, device=v.device) if out is None else out
    bv = min(triton.next_power_of_2(vd), 64)
    gsum = ext_g.sum(1).contiguous() if ext_g is not None else mem  # placeholder pointers without decay
    g0 = ext_g[:, 0].contiguous() if ext_g is not None else mem
    _hybrid_step_kernel[(b * hk, triton.cdiv(vd, bv))](
        q.contiguous(), fq.contiguous(), mix.float().contiguous(), ext["k"].contiguous(), ext["v"].contiguous(),
        ext["valid"].to(torch.int8).contiguous(), ext["fk"][:, 0].contiguous(), ext["v"][:, 0].contiguous(),
        gsum, g0, mem, new_mem, y, float(scale), float(softcap or 1.0),
        h, hk, window, d, f, vd,
        triton.next_power_of_2(window), triton.next_power_of_2(d), triton.next_power_of_2(f), bv,
        ext_g is not None, bool(softcap), EPS,
    )
    return y, shift_window(ext, new_mem, 1)
