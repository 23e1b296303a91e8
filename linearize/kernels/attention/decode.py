"""Triton split-K decode attention over a static key/value cache (flash-decoding).

One query token per row. The first kernel gives each (batch row, KV head, span of slots) a program: it
reads its keys and values once for every query head of the group (GQA without repeated k/v), masks
slots that are empty, in the future or out of the sliding window, and keeps an online softmax (max,
sum, weighted values) in fp32; the second merges the spans' partial results per query head in one reduction. Two
launches in place of the mask, the repeated keys/values and SDPA; no host sync, so a CUDA graph or
torch.compile(fullgraph) holds it. Same maths as `cached_attention_ref` where the query's own slot is
valid (a decode step writes it before attending).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 32  # slots a loop iteration reads
PROGRAMS = 256  # programs the spans aim at over (rows x KV heads): enough to fill an H100/H200


@triton.jit
def _span_kernel(
    q, k, v, valid, slots, m_out, l_out, acc_out, scale, cap, S,
    HK: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, SPAN: tl.constexpr, NSPAN: tl.constexpr,
    BR: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, WINDOW: tl.constexpr, HAS_CAP: tl.constexpr,
):
    bh = tl.program_id(0)  # b * HK + KV head
    sp = tl.program_id(1)
    b, hk = bh // HK, bh % HK
    rr, rd = tl.arange(0, BR), tl.arange(0, BD)
    mr, md = rr < REP, rd < D
    qq = tl.load(q + (b * HK * REP + hk * REP + rr)[:, None] * D + rd[None, :], mask=mr[:, None] & md[None, :], other=0.0)
    qq = (qq.to(tl.float32) * scale).to(tl.float32)  # Inductor passes Python floats as fp64: keep the loop in fp32
    pos = tl.load(slots)
    m = tl.full([BR], float("-inf"), tl.float32)
    l = tl.zeros([BR], tl.float32)
    acc = tl.zeros([BR, BD], tl.float32)
    base = b.to(tl.int64) * S * HK * D + hk * D
    for s0 in range(sp * SPAN, sp * SPAN + SPAN, BS):
        rs = s0 + tl.arange(0, BS)
        ms = rs < S
        ok = ms & (rs <= pos) & (tl.load(valid + b.to(tl.int64) * S + rs, mask=ms, other=0) != 0)
        if WINDOW > 0:
            ok = ok & (rs > pos - WINDOW)
        off = base + rs.to(tl.int64)[:, None] * HK * D + rd[None, :]
        kk = tl.load(k + off, mask=ms[:, None] & md[None, :], other=0.0).to(tl.float32)
        s = tl.sum(qq[:, None, :] * kk[None, :, :], 2)  # [BR, BS]
        if HAS_CAP:  # cap * tanh(s / cap), tanh from the exp of a non-positive number
            e = tl.exp(-2.0 * tl.abs(s) / cap)
            s = (tl.where(s >= 0, cap, -cap) * (1.0 - e) / (1.0 + e)).to(tl.float32)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: no NaN from -inf - -inf
        alpha = tl.exp(m - shift)
        p = tl.exp(s - shift[:, None])
        vv = tl.load(v + off, mask=ms[:, None] & md[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vv[None, :, :], 1)
        l = l * alpha + tl.sum(p, 1)
        m = m_new
    part = bh * NSPAN + sp
    tl.store(m_out + part * BR + rr, m)
    tl.store(l_out + part * BR + rr, l)
    tl.store(acc_out + (part * BR + rr)[:, None] * BD + rd[None, :], acc)


@triton.jit
def _merge_kernel(
    m_in, l_in, acc_in, y, HK: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, NSPAN: tl.constexpr,
    BR: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr,
):
    """One program per (row, KV head, query head of the group): the spans' maxima and sums at once, then their
    values in tiles of BT under the one shift: independent loads, not NSPAN dependent steps."""
    bh, r = tl.program_id(0), tl.program_id(1)
    b, hk = bh // HK, bh % HK
    base = bh * NSPAN * BR + r  # span sp of this query head: base + sp * BR
    rn, rd = tl.arange(0, BN), tl.arange(0, BD)
    mn = rn < NSPAN
    ms = tl.load(m_in + base + rn * BR, mask=mn, other=float("-inf"))
    top = tl.max(ms, 0)
    shift = tl.where(top == float("-inf"), 0.0, top)
    l = tl.sum(tl.load(l_in + base + rn * BR, mask=mn, other=0.0) * tl.exp(ms - shift), 0)  # a span seeing no slot: 0
    acc = tl.zeros([BD], tl.float32)
    for s0 in range(0, NSPAN, BT):
        rt = s0 + tl.arange(0, BT)
        mt = rt < NSPAN
        c = tl.exp(tl.load(m_in + base + rt * BR, mask=mt, other=float("-inf")) - shift)
        part = tl.load(acc_in + (base + rt * BR)[:, None] * BD + rd[None, :], mask=mt[:, None], other=0.0)
        acc += tl.sum(part * c[:, None], 0)
    tl.store(y + (b * HK * REP + hk * REP + r) * D + rd, (acc / l).to(y.dtype.element_ty), mask=rd < D)


def cached_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, valid: Tensor, slots: Tensor, *, scale: float, softcap: float | None = None,
    window: int | None = None,
) -> Tensor:
    """`cached_attention_ref` for one query token a row (q [B,1,H,D]) whose own slot is valid."""
    b, t, h, d = q.shape
    s, hk = k.shape[1], k.shape[2]
    if t != 1 or v.shape[-1] != d:
        raise ValueError(f"the decode kernel takes one query token and values of the keys' size, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    rep = h // hk
    br, bd = triton.next_power_of_2(rep), triton.next_power_of_2(d)
    blocks = triton.cdiv(s, BLOCK)
    span = BLOCK * triton.cdiv(blocks, max(1, min(blocks, PROGRAMS // (b * hk))))
    nspan = triton.cdiv(s, span)
    m = torch.empty(b * hk * nspan * br, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(b * hk * nspan * br * bd, dtype=torch.float32, device=q.device)
    _span_kernel[(b * hk, nspan)](
        q.contiguous(), k.contiguous(), v.contiguous(), valid.contiguous(), slots, m, l, acc, float(scale),
        float(softcap or 1.0), s, hk, rep, d, span, nspan, br, bd, BLOCK, int(window or 0), bool(softcap),
    )
    y = torch.empty_like(q)
    bn = triton.next_power_of_2(nspan)
    _merge_kernel[(b * hk, rep)](m, l, acc, y, hk, rep, d, nspan, br, bd, bn, min(bn, 32))
    return y
