"""Triton decode step of the sliding-window softmax + linear attention hybrid (`lolcats`, `lizard`).

Same maths and ring semantics as `hybrid_step_ref`, but the state is updated in place, so every
tensor keeps its address and a captured CUDA graph replays the step. One program per (batch, query
head) computes the max-shifted softmax over the W-1 ring slots and this token, the read of the
(decayed) linear memory, the shared normalizer and the mix. The state moves on once every reader is
done, counted by tickets (`tick` [B, HK+1], atomic counts that the last taker resets): the last
query head of a KV group adds the oldest window token to that head's memory and writes this token
into its ring slot; the row's last KV head advances the slots its heads share (`valid`, `pos`). A
step is one launch of B x H programs (with one program per KV head, three at B = 1 on SmolLM2, the
step took 18 us of a 48 us layer on an H200). Sink slots (when the state has them) are NS more
window rows, seen once they are W tokens back; a real token that finds a free slot writes its
key/value there and, with the advance, its position.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...errors import LinearizeError
from .naive import EPS, HedgehogMaps


@triton.jit
def _sinks_taken(spos, b, now, NS: tl.constexpr, BS: tl.constexpr):
    """How many of row b's sink slots hold a token (a filled slot's position is before `now`; free: NO_SINK)."""
    rs = tl.arange(0, BS)
    return tl.sum(((rs < NS) & (tl.load(spos + b * NS + rs, mask=rs < NS, other=0) < now)).to(tl.int32), axis=0)


@triton.jit
def _hedgehog(x, w, bias, rd, rf, md, mf, FD: tl.constexpr):
    """One head's phi(x) = [softmax(xW + b), softmax(-(xW + b))]: x [BD] fp32, W [D,FD], b [FD] -> [BF]."""
    col, first = rf % FD, rf < FD
    wt = tl.load(w + rd[:, None] * FD + col[None, :], mask=md[:, None] & mf[None, :], other=0.0).to(tl.float32)
    z = tl.sum(x[:, None] * wt, axis=0) + tl.load(bias + col, mask=mf, other=0.0).to(tl.float32)
    z = tl.where(first, z, -z)
    m1 = tl.max(tl.where(first & mf, z, float("-inf")), axis=0)  # each half's own max and sum
    m2 = tl.max(tl.where(first | ~mf, float("-inf"), z), axis=0)
    e = tl.where(mf, tl.exp(z - tl.where(first, m1, m2)), 0.0)
    return e / tl.where(first, tl.sum(tl.where(first, e, 0.0), axis=0), tl.sum(tl.where(first, 0.0, e), axis=0))


@triton.jit
def _hybrid_step_kernel(
    q, k, v, fq, fk, g, valid, mix,  # this token: q [B,H,D], k [B,HK,D], v [B,HK,V], fq [B,H,F], fk/g [B,HK,F], valid [B]
    s, rk, rv, rfk, rg, rvalid, pos, tick,  # state: S [B,HK,F,V+1], ring k/v/fk/g [B,P,HK,*], ring valid [B,P], pos [B], tick [B,HK+1]
    sk, sv, spos, n,  # sinks: k/v [B,NS,HK,*], positions [B,NS] (empty: NO_SINK), n [B] this token's position
    wq, bq, wk, bk,  # Hedgehog maps (FMAP): weights [H,D,F/2] and [HK,D,F/2], biases [H,F/2] and [HK,F/2]
    y, scale, softcap,
    H: tl.constexpr, HK: tl.constexpr, P: tl.constexpr, D: tl.constexpr, F: tl.constexpr, V: tl.constexpr, NS: tl.constexpr,
    BW: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, BS: tl.constexpr,
    HAS_G: tl.constexpr, HAS_VALID: tl.constexpr, HAS_CAP: tl.constexpr, FMAP: tl.constexpr, EPS_: tl.constexpr,
    MIX_LOGIT: tl.constexpr,
):
    pid = tl.program_id(0)  # b * H + query head
    b = pid // H
    G: tl.constexpr = H // HK
    hq = pid % H
    hk = hq // G
    bh = b * HK + hk
    rw, rd, rf = tl.arange(0, BW), tl.arange(0, BD), tl.arange(0, BF)
    md, mf = rd < D, rf < F
    in_ring, is_new = rw < P, rw == P  # window rows: the P ring slots, then this token
    ring_row = (b * P + rw) * HK + hk
    keep = tl.load(valid + b).to(tl.float32) if HAS_VALID else 1.0  # 0: this token is padding
    old = 0
    if P > 0:
        old = (b * P + tl.load(pos + b) % P) * HK + hk  # ring row of the oldest token
    # window keys [BW, BD] and validity [BW]
    kn = tl.load(k + bh * D + rd, mask=md, other=0.0).to(tl.float32)
    kw = tl.load(rk + ring_row[:, None] * D + rd[None, :], mask=in_ring[:, None] & md[None, :], other=0.0).to(tl.float32)
    kw = tl.where(is_new[:, None], kn[None, :], kw)
    ok = tl.load(rvalid + b * P + rw, mask=in_ring, other=0) != 0
    ok = tl.where(is_new, keep > 0, ok)
    taken, to_sink = 0, False
    if NS > 0:  # sink rows P+1 .. P+NS; a free slot (position beyond this token's) takes a real token
        is_sink = (rw > P) & (rw <= P + NS)
        sink_row = (b * NS + rw - P - 1) * HK + hk
        now = tl.load(n + b)
        ks = tl.load(sk + sink_row[:, None] * D + rd[None, :], mask=is_sink[:, None] & md[None, :], other=0.0).to(tl.float32)
        kw = tl.where(is_sink[:, None], ks, kw)
        ok = tl.where(is_sink, now - tl.load(spos + b * NS + rw - P - 1, mask=is_sink, other=0) > P, ok)
        taken = _sinks_taken(spos, b, now, NS, BS)
        to_sink = (keep > 0) & (taken < NS)
    # this query's window weights, its features (decayed over the window) and the two normalizers
    qq = tl.load(q + pid * D + rd, mask=md, other=0.0).to(tl.float32)
    sc = tl.sum(kw * qq[None, :], axis=1) * scale
    if HAS_CAP:
        t = tl.exp(-2.0 * tl.abs(sc / softcap))
        sc = softcap * tl.where(sc >= 0, 1.0, -1.0) * (1.0 - t) / (1.0 + t)
    sc = tl.where(ok, sc, float("-inf"))
    m = tl.max(sc, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    a = tl.where(ok, tl.exp(sc - m), 0.0)
    if FMAP:
        ff = _hedgehog(qq, wq + hq * D * (F // 2), bq + hq * (F // 2), rd, rf, md, mf, F // 2)
    else:
        ff = tl.load(fq + pid * F + rf, mask=mf, other=0.0).to(tl.float32)
    gn = 0.0
    if HAS_G:
        gn = tl.load(g + bh * F + rf, mask=mf, other=0.0).to(tl.float32) * keep
        gw = tl.load(rg + ring_row[:, None] * F + rf[None, :], mask=in_ring[:, None] & mf[None, :], other=0.0)
        ff = ff * tl.exp(tl.sum(gw, axis=0) + gn)
    s_base = s + bh * F * (V + 1)
    den_w = tl.sum(a, axis=0)
    den_l = tl.sum(ff * tl.load(s_base + rf * (V + 1) + V, mask=mf, other=0.0), axis=0)  # the memory's normalizer column
    w = tl.load(mix + hq).to(tl.float32)
    if MIX_LOGIT:
        w = 1.0 / (1.0 + tl.exp(-w))
    for v_start in range(0, V, BV):
        rv_ = v_start + tl.arange(0, BV)
        mv = rv_ < V
        vn = tl.load(v + bh * V + rv_, mask=mv, other=0.0).to(tl.float32)
        vw = tl.load(rv + ring_row[:, None] * V + rv_[None, :], mask=in_ring[:, None] & mv[None, :], other=0.0).to(tl.float32)
        vw = tl.where(is_new[:, None], vn[None, :], vw)
        if NS > 0:
            vs = tl.load(sv + sink_row[:, None] * V + rv_[None, :], mask=is_sink[:, None] & mv[None, :], other=0.0).to(tl.float32)
            vw = tl.where(is_sink[:, None], vs, vw)
        mem = tl.load(s_base + rf[:, None] * (V + 1) + rv_[None, :], mask=mf[:, None] & mv[None, :], other=0.0)
        num_w = tl.sum(a[:, None] * vw, axis=0)
        num_l = tl.sum(ff[:, None] * mem, axis=0)
        out = (w * num_w + (1.0 - w) * num_l) / (w * den_w + (1.0 - w) * den_l + EPS_)
        tl.store(y + pid * V + rv_, out.to(y.dtype.element_ty), mask=mv)
    tl.debug_barrier()  # every thread of this program is done reading the KV head's state
    if tl.atomic_add(tick + b * (HK + 1) + 1 + hk, 1) == G - 1:  # acq_rel: the group's last program moves its state on
        _advance_head(k, v, fk, s_base, rk, rv, rfk, rg, sk, sv, wk, bk, kn, keep, bh, hk, b, old, taken, to_sink, gn,
                      rd, rf, md, mf, HK, P, D, F, V, NS, BV, HAS_G, FMAP)
        tl.store(tick + b * (HK + 1) + 1 + hk, 0)
        tl.debug_barrier()
        if tl.atomic_add(tick + b * (HK + 1), 1) == HK - 1:  # and the row's last head its shared slots
            _advance_row(valid, rvalid, pos, spos, n, b, P, NS, BS, HAS_VALID)
            tl.store(tick + b * (HK + 1), 0)


@triton.jit
def _advance_head(
    k, v, fk, s_base, rk, rv, rfk, rg, sk, sv, wk, bk, kn, keep, bh, hk, b, old, taken, to_sink, gn, rd, rf, md, mf,
    HK: tl.constexpr, P: tl.constexpr, D: tl.constexpr, F: tl.constexpr, V: tl.constexpr, NS: tl.constexpr,
    BV: tl.constexpr, HAS_G: tl.constexpr, FMAP: tl.constexpr,
):
    """KV head bh's state after this token, once its query heads have read it: the oldest window token enters the
    (decayed) memory and its normalizer, this token takes its ring slot (or a free sink slot)."""
    if FMAP:
        fkn = _hedgehog(kn, wk + hk * D * (F // 2), bk + hk * (F // 2), rd, rf, md, mf, F // 2) * keep
    else:
        fkn = tl.load(fk + bh * F + rf, mask=mf, other=0.0).to(tl.float32) * keep
    if NS > 0:
        fkn = tl.where(to_sink, 0.0, fkn)  # a sink never enters the linear memory
    f0 = tl.load(rfk + old * F + rf, mask=mf, other=0.0).to(tl.float32) if P > 0 else fkn
    if HAS_G:
        d0 = tl.exp(tl.load(rg + old * F + rf, mask=mf, other=0.0)) if P > 0 else tl.exp(gn)
    for v_start in range(0, V, BV):
        rv_ = v_start + tl.arange(0, BV)
        mv = rv_ < V
        s_off = rf[:, None] * (V + 1) + rv_[None, :]
        mem = tl.load(s_base + s_off, mask=mf[:, None] & mv[None, :], other=0.0)
        if P > 0:
            v0 = tl.load(rv + old * V + rv_, mask=mv, other=0.0).to(tl.float32)
        else:
            v0 = tl.load(v + bh * V + rv_, mask=mv, other=0.0).to(tl.float32)
        if HAS_G:
            mem = mem * d0[:, None]
        tl.store(s_base + s_off, mem + f0[:, None] * v0[None, :], mask=mf[:, None] & mv[None, :])
    z = tl.load(s_base + rf * (V + 1) + V, mask=mf, other=0.0)
    if HAS_G:
        z = z * d0
    tl.store(s_base + rf * (V + 1) + V, z + f0, mask=mf)
    if NS > 0:  # a free sink slot takes this token (no thread reads a free slot)
        slot = (b * NS + taken) * HK + hk
        tl.store(sk + slot * D + rd, kn.to(sk.dtype.element_ty), mask=rd < tl.where(to_sink, D, 0))
        for v_start in range(0, V, BV):
            rv_ = v_start + tl.arange(0, BV)
            mv = rv_ < V
            tl.store(sv + slot * V + rv_, tl.load(v + bh * V + rv_, mask=mv, other=0.0).to(sv.dtype.element_ty), mask=rv_ < tl.where(to_sink, V, 0))
    if P > 0:  # this token takes the oldest token's slot, once every thread has read it
        tl.debug_barrier()
        tl.store(rk + old * D + rd, kn.to(rk.dtype.element_ty), mask=md)
        tl.store(rfk + old * F + rf, fkn.to(rfk.dtype.element_ty), mask=mf)
        if HAS_G:
            tl.store(rg + old * F + rf, gn, mask=mf)
        for v_start in range(0, V, BV):
            rv_ = v_start + tl.arange(0, BV)
            mv = rv_ < V
            tl.store(rv + old * V + rv_, tl.load(v + bh * V + rv_, mask=mv, other=0.0).to(rv.dtype.element_ty), mask=mv)


@triton.jit
def _advance_row(valid, rvalid, pos, spos, n, b, P: tl.constexpr, NS: tl.constexpr, BS: tl.constexpr, HAS_VALID: tl.constexpr):
    """Row b's shared slots after its token: ring validity at the oldest slot, pos + 1, a sink position, n + 1."""
    p = tl.load(pos + b)
    if HAS_VALID:
        real = tl.load(valid + b)
    else:
        real = tl.full((), 1, tl.int1)
    if P > 0:
        tl.store(rvalid + b * P + p % P, real)
    tl.store(pos + b, p + 1)
    if NS > 0:
        now = tl.load(n + b)
        taken = _sinks_taken(spos, b, now, NS, BS)
        tl.store(spos + b * NS + taken, now, mask=tl.where(real != 0, taken, NS) < NS)
        tl.store(n + b, now + 1)


def hybrid_step_triton(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor | None, fk: Tensor | None, g: Tensor | None, mix: Tensor,
    *, window: int, scale: float, softcap: float | None = None, valid: Tensor | None = None,
    state: dict[str, Tensor], out: Tensor | None = None, fmaps: HedgehogMaps | None = None, logit: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`hybrid_step_ref` updating `state` in place (same arguments; returns y and `state` itself).
    Pass a preallocated `out` [B,H,V] to write y there; with `fmaps` the kernel applies the Hedgehog
    maps to q and k itself (no separate launches for phi)."""
    b, h, d = q.shape
    hk, vd = k.shape[1], v.shape[-1]
    f = 2 * fmaps.wq.shape[-1] if fmaps is not None else fk.shape[-1]
    if fmaps is not None:
        fq = fk = q  # placeholders, never read
        maps = [t.contiguous() for t in fmaps]
    else:
        maps = [q] * 4
    p = window - 1
    if state["k"].shape[1] != p or ("g" in state) != (g is not None):
        raise LinearizeError(f"state does not fit window={window}, gated={g is not None} (ring of {state['k'].shape[1]} slots)")
    if not all(t.is_contiguous() for t in state.values()):
        raise LinearizeError("the decode step updates its state in place and needs contiguous state tensors")
    if state["tick"].shape != (b, hk + 1):
        raise LinearizeError(f"state['tick'] must be [batch, kv heads + 1] = [{b}, {hk + 1}], got {list(state['tick'].shape)}: "
                             "make the state with empty_state")
    y = torch.empty(b, h, vd, dtype=v.dtype, device=v.device) if out is None else out
    # placeholders stand in for pointers that are never read: no ring (W = 1), no decay, no validity
    ring = {name: state[name] if p else state["S"] for name in ("k", "v", "fk", "g", "valid") if name in state}
    rvalid = ring["valid"]  # bool pointers go to Triton as they are (a uint8 view defeats Inductor)
    new_valid = valid.contiguous() if valid is not None else rvalid
    rg = ring.get("g", ring["fk"])
    ns = state["sink_k"].shape[1] if "sink_k" in state else 0
    sinks = [state[name] if ns else state["pos"] for name in ("sink_k", "sink_v", "sink_pos", "n")]
    bf = triton.next_power_of_2(f)
    bv = min(triton.next_power_of_2(vd), max(16, 8192 // bf))  # keep the [BF, BV] memory tile in registers
    _hybrid_step_kernel[(b * h,)](
        q.contiguous(), k.contiguous(), v.contiguous(), fq.contiguous(), fk.contiguous(),
        g.contiguous() if g is not None else fk, new_valid, mix.contiguous(),
        state["S"], ring["k"], ring["v"], ring["fk"], rg, rvalid, state["pos"], state["tick"], *sinks, *maps,
        y, float(scale), float(softcap or 1.0),
        h, hk, p, d, f, vd, ns,
        triton.next_power_of_2(window + ns), triton.next_power_of_2(d), bf, bv, triton.next_power_of_2(max(ns, 1)),
        g is not None, valid is not None, bool(softcap), fmaps is not None, EPS, logit,
        num_warps=4 if bf * bv + triton.next_power_of_2(window + ns) * (triton.next_power_of_2(d) + bv) <= 8192 else 8,
    )
    return y, state
