"""Triton sliding-window softmax of the hybrid kinds (`lolcats`, `lizard`), forward and backward,
alone (`window_softmax`, same maths as `window_softmax_ref`) or fused with the combine against the
linear part (`window_combine`, same maths as `window_combine_ref`).

Query t sees the ext tokens [t, t+W-1] (W-1 context tokens, then the T new ones) that
`naive.visible` allows (ext_valid: validity, or segment ids for packed sequences), with
a_tj = exp(s_tj - m_t), m_t = max over its visible keys (LoLCATs' shift, not cancelled: the linear
part is unshifted, so the max carries gradient); num_t = sum_j a_tj v_j, den_t = sum_j a_tj, and
rows with no visible key give 0 (m_t = 0). Layout [B, T, H, D]; maths in fp32.

Forward: one program per (query head, block of BM queries) walks its block's key span, ext tokens
[t0, t0+BM+W-1), in chunks of BN keys with a running max (the sums are rescaled when it grows, so
they end shifted by the exact row max; no tile of the whole span). It saves m_t and the key holding
it. Fused, it also reads the linear part (num_l, den_l) and writes the hybrid's output
y = (mix num + (1-mix) num_l) / (mix den + (1-mix) den_l + EPS) instead of num and den.
Backward, without atomics, with dnum_t, dden_t the gradients of num_t, den_t (fused: dnum = mix/N dy,
dden = -mix/N dy.y, N the shared normalizer), dP_tj = dnum_t.v_j + dden_t,
delta_t = sum_j a_tj dP_tj (= dnum_t.num_t + dden_t den_t) and
dS_tj = a_tj dP_tj - [j = argmax_t] delta_t (the max's gradient, -delta_t, goes to the key holding it):
 - query-centric pass, the forward's programs: a first walk over the span sums delta (fused, it also
   recomputes num and den, for y, the linear part's gradient and each row's share of mix's
   gradient); a second walk gives dq = scale sum_j dS_tj k_j. delta is summed from the very products
   it is then subtracted from (not taken as dnum.num + dden den), so their rounding (TF32 on a GPU)
   cancels too: each row's dS sums to 0 as it must (exactly 0 for a row with one visible key),
   where a peaked row would otherwise keep a ~1e-3 error of its largest term;
 - key-centric pass: one program per (KV head, block of BM keys) walks the queries that see them,
   [j0-W+1, j0+BM-1], in chunks of BN, for each query head of the group: dv_j = sum_t a_tj dnum_t,
   dk_j = scale sum_t dS_tj q_t, with dP formed as in the query pass.
Sinks (fused only): a table of sink slots (keys, values, positions [B,S]) and, per query, its
position and first slot; a query sees its sequence's slots [base, base+NS) that are at least W
tokens behind it. They enter the running max and sums as one more chunk of keys, before the window
(in the max's bookkeeping a sink slot is key -2 - slot); the query pass also sums their gradients
over its block's queries (a matrix product) and adds them to dsk, dsv with atomics.
GQA: a query head reads its KV head's rows (no repeated k/v); the key pass sums the group.
Softcap: s = c tanh(x / c) (tanh from exp), gradient factor 1 - (s/c)^2.
A fresh window (no state) needs no concatenation: with OFF = W-1 the kernels take the T new tokens as the ext tokens
from W-1 on and treat the first W-1 as missing; their gradients go to the new tokens' rows.
On a GPU, fp32 products run in TF32 (Triton's default): relative error ~1e-3 against fp32. 16-bit
inputs stay 16-bit as product operands (the weights a_tj and gradients are rounded to that dtype before
their products, as in flash attention); sums, statistics and accumulators are fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_utils import check_offsets
from ..triton_utils import dot as _dot
from .naive import EPS


@triton.jit
def _rows(ptr, row, mrow, STRIDE: tl.constexpr, rc, mc):
    """Tile of the rows `row` (row index of a [..., STRIDE] tensor), columns rc, in the tensor's dtype
    (matrix-product operands: 16-bit ones stay 16-bit); zeros outside the masks."""
    return tl.load(ptr + row.to(tl.int64)[:, None] * STRIDE + rc[None, :], mask=mrow[:, None] & mc[None, :], other=0.0)


@triton.jit
def _store_rows(ptr, val, row, mrow, STRIDE: tl.constexpr, rc, mc):
    tl.store(ptr + row.to(tl.int64)[:, None] * STRIDE + rc[None, :], val.to(ptr.dtype.element_ty), mask=mrow[:, None] & mc[None, :])


@triton.jit
def _add_rows(ptr, val, row, mrow, STRIDE: tl.constexpr, rc, mc):
    tl.atomic_add(ptr + row.to(tl.int64)[:, None] * STRIDE + rc[None, :], val, mask=mrow[:, None] & mc[None, :], sem="relaxed")


@triton.jit
def _scores(a, b, scale, cap, HAS_CAP: tl.constexpr):
    """scale * a b^T, soft-capped to cap * tanh(. / cap) (tanh from exp of a non-positive number)."""
    s = _dot(a, tl.trans(b)) * scale
    if HAS_CAP:
        e = tl.exp(-2.0 * tl.abs(s) / cap)
        s = tl.where(s >= 0, cap, -cap) * (1.0 - e) / (1.0 + e)
    return s


@triton.jit
def _keys(k, v, valid, b, j, L, HK: tl.constexpr, hk, D: tl.constexpr, V: tl.constexpr, rd, md, rv, mv, OFF: tl.constexpr):
    """Ext tokens j of KV head hk: keys, values and segment ids (0 where missing or padding). The tensors hold ext
    tokens from OFF on (the first OFF are missing: a fresh window read from the new tokens in place)."""
    mj = (j >= OFF) & (j < L)
    r = b * (L - OFF) + j - OFF
    row = r * HK + hk
    return _rows(k, row, mj, D, rd, md), _rows(v, row, mj, V, rv, mv), tl.load(valid + r, mask=mj, other=0)


@triton.jit
def _visible(qseg, kseg):
    """As `naive.visible`: a valid key of the query's segment (a padding query sees every valid key)."""
    return (kseg != 0) & ((qseg == 0) | (kseg == qseg))


@triton.jit
def _window_tile(k, v, valid, b, t0, c, rm, qseg, L, HK: tl.constexpr, hk, D: tl.constexpr, V: tl.constexpr,
                 W: tl.constexpr, BN: tl.constexpr, rd, md, rv, mv, OFF: tl.constexpr):
    """Chunk c of a query block's key span (ext tokens j from t0 + c*BN): keys, values, their ext
    index, and which of the block's queries see them (query row i sees offsets [i, i+W-1])."""
    rel = c * BN + tl.arange(0, BN)
    j = t0 + rel
    kt, vt, kseg = _keys(k, v, valid, b, j, L, HK, hk, D, V, rd, md, rv, mv, OFF)
    see = (rel[None, :] >= rm[:, None]) & (rel[None, :] < rm[:, None] + W) & _visible(qseg[:, None], kseg[None, :])
    return kt, vt, j, see


@triton.jit
def _sink_tile(sk, sv, spos, b, S, c0, tpos, base, HK: tl.constexpr, hk, D: tl.constexpr, V: tl.constexpr,
               W: tl.constexpr, NS: tl.constexpr, BS: tl.constexpr, rd, md, rv, mv):
    """Sink slots [c0, c0+BS) of KV head hk: keys, values, their key index (-2 - slot), which queries
    (positions tpos, first slots base) see them, and their rows."""
    slot = c0 + tl.arange(0, BS)
    ms = slot < S
    row = (b * S + slot) * HK + hk
    p = tl.load(spos + b * S + slot, mask=ms, other=0)
    see = ms[None, :] & (slot[None, :] >= base[:, None]) & (slot[None, :] < base[:, None] + NS) & (tpos[:, None] - p[None, :] >= W)
    return _rows(sk, row, ms, D, rd, md), _rows(sv, row, ms, V, rv, mv), -2 - slot, see, row, ms


@triton.jit
def _sink_span(at, sbase, b, T, t, mt, S, NS: tl.constexpr):
    """The block's query positions and first sink slots, and the slots [lo, hi) any of them reads."""
    tpos = tl.load(at + b * T + t, mask=mt, other=0)
    base = tl.load(sbase + b * T + t, mask=mt, other=0)
    return tpos, base, tl.min(tl.where(mt, base, S)), tl.max(tl.where(mt, base + NS, 0))


@triton.jit
def _absorb(m, arg, den_w, num_w, s, idx, vt):
    """Fold the scores s [BM, BN] of keys idx (values vt) into the running max, its key and the sums."""
    mc = tl.max(s, axis=1)
    first = tl.min(tl.where(s == mc[:, None], idx[None, :], 2147483647), axis=1)
    arg = tl.where(mc > m, first, arg)
    m_new = tl.maximum(m, mc)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp(m - shift)
    p = tl.exp(s - shift[:, None])
    return m_new, arg, den_w * alpha + tl.sum(p, axis=1), num_w * alpha[:, None] + _dot(p.to(vt.dtype), vt)


@triton.jit
def _reweigh(e, den_w, num_w, s, m, dot_, vt, MIX: tl.constexpr):
    """First backward walk over a chunk (s masked with -inf): e += sum_j a_tj (do_t . v_j), den and,
    fused (the output needs it), num again."""
    p = tl.exp(s - m[:, None])
    if MIX:
        num_w += _dot(p.to(vt.dtype), vt)
    return e + tl.sum(p * _dot(dot_, tl.trans(vt)), axis=1), den_w + tl.sum(p, axis=1), num_w


@triton.jit
def _dscores(s, see, m, dp, dden, dlt, idx, arg, cap, HAS_CAP: tl.constexpr):
    """The weights a_tj of a chunk and dS_tj = a_tj (dP_tj + dden_t) - [j = argmax_t] delta_t (soft-capped)."""
    p = tl.exp(tl.where(see, s - m[:, None], float("-inf")))
    ds = p * (dp + dden[:, None]) - tl.where(idx[None, :] == arg[:, None], dlt[:, None], 0.0)
    if HAS_CAP:
        ds = ds * (1.0 - (s / cap) * (s / cap))
    return p, ds


@triton.jit
def _query_block(q, valid, T, L, H: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
                 BM: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, OFF: tl.constexpr):
    """Program (batch x query head, block of BM queries): batch, head, KV head, query rows and masks,
    the queries [BM, BD] and their segment ids (of their own ext tokens)."""
    bh, n = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rm, rd, rv = tl.arange(0, BM), tl.arange(0, BD), tl.arange(0, BV)
    t = n * BM + rm
    row, mt, md = (b * T + t) * H + h, t < T, rd < D
    qseg = tl.load(valid + b * (L - OFF) + t + W - 1 - OFF, mask=mt, other=0)
    return b, h, h // (H // HK), n * BM, rm, row, mt, rd, rv, md, rv < V, _rows(q, row, mt, D, rd, md), qseg


@triton.jit
def _window_fwd_kernel(
    q, k, v, valid, lnum, lden, mix, sk, sv, spos, at, sbase, out, den, rmax, rarg, T, L, S, scale, cap, LNS, LDS,
    H: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, NC: tl.constexpr,
    HAS_CAP: tl.constexpr, MIX: tl.constexpr, EPS_: tl.constexpr, NS: tl.constexpr, BS: tl.constexpr, OFF: tl.constexpr = 0,
):
    # out: num (den beside it), or y when fused
    b, h, hk, t0, rm, row, mt, rd, rv, md, mv, qt, qseg = _query_block(q, valid, T, L, H, HK, D, V, W, BM, BD, BV, OFF)
    m = tl.full([BM], float("-inf"), tl.float32)
    arg = tl.full([BM], -1, tl.int32)  # ext index of the key holding the max (sink slot: -2 - slot); -1: no visible key
    den_w = tl.zeros([BM], dtype=tl.float32)
    num_w = tl.zeros([BM, BV], dtype=tl.float32)
    if NS > 0:
        tpos, base, lo, hi = _sink_span(at, sbase, b, T, t0 + rm, mt, S, NS)
        for c0 in range(lo, hi, BS):
            kt, vt, idx, see, _, _ = _sink_tile(sk, sv, spos, b, S, c0, tpos, base, HK, hk, D, V, W, NS, BS, rd, md, rv, mv)
            s = tl.where(see, _scores(qt, kt, scale, cap, HAS_CAP), float("-inf"))
            m, arg, den_w, num_w = _absorb(m, arg, den_w, num_w, s, idx, vt)
    for c in range(NC):
        kt, vt, j, see = _window_tile(k, v, valid, b, t0, c, rm, qseg, L, HK, hk, D, V, W, BN, rd, md, rv, mv, OFF)
        s = tl.where(see, _scores(qt, kt, scale, cap, HAS_CAP), float("-inf"))
        m, arg, den_w, num_w = _absorb(m, arg, den_w, num_w, s, j, vt)
    tl.store(rmax + row, tl.where(m == float("-inf"), 0.0, m), mask=mt)
    tl.store(rarg + row, arg, mask=mt)
    if MIX:
        a = tl.load(mix + h)
        den_l = tl.load(lden + row.to(tl.int64) * LDS, mask=mt, other=0.0).to(tl.float32)
        norm = a * den_w + (1 - a) * den_l + EPS_
        _store_rows(out, (a * num_w + (1 - a) * _rows(lnum, row, mt, LNS, rv, mv).to(tl.float32)) / norm[:, None], row, mt, V, rv, mv)
    else:
        _store_rows(out, num_w, row, mt, V, rv, mv)
        tl.store(den + row, den_w, mask=mt)


@triton.jit
def _window_dq_kernel(
    q, k, v, valid, lnum, lden, mix, sk, sv, spos, at, sbase, do, dd, cw, rmax, rarg, delta, dq, dlnum, dlden, dmix, dsk, dsv,
    T, L, S, scale, cap, LNS, LDS,
    H: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, NC: tl.constexpr,
    HAS_CAP: tl.constexpr, MIX: tl.constexpr, EPS_: tl.constexpr, NS: tl.constexpr, BS: tl.constexpr, OFF: tl.constexpr = 0,
):
    # do: dnum, or dy when fused (then dnum = cw dy). dd: dden, an input, or written here when fused.
    b, h, hk, t0, rm, row, mt, rd, rv, md, mv, qt, qseg = _query_block(q, valid, T, L, H, HK, D, V, W, BM, BD, BV, OFF)
    m = tl.load(rmax + row, mask=mt, other=0.0)
    arg = tl.load(rarg + row, mask=mt, other=-1)
    dot_ = _rows(do, row, mt, V, rv, mv)
    dof, dot_ = dot_.to(tl.float32), dot_.to(v.dtype.element_ty)  # for sums; as a product operand
    # first walk: e = sum_j a_tj (do_t . v_j), den (and num, fused) again
    e = tl.zeros([BM], dtype=tl.float32)
    den_w = tl.zeros([BM], dtype=tl.float32)
    num_w = tl.zeros([BM, BV], dtype=tl.float32)
    if NS > 0:
        tpos, base, lo, hi = _sink_span(at, sbase, b, T, t0 + rm, mt, S, NS)
        for c0 in range(lo, hi, BS):
            kt, vt, idx, see, _, _ = _sink_tile(sk, sv, spos, b, S, c0, tpos, base, HK, hk, D, V, W, NS, BS, rd, md, rv, mv)
            s = tl.where(see, _scores(qt, kt, scale, cap, HAS_CAP), float("-inf"))
            e, den_w, num_w = _reweigh(e, den_w, num_w, s, m, dot_, vt, MIX)
    for c in range(NC):
        kt, vt, j, see = _window_tile(k, v, valid, b, t0, c, rm, qseg, L, HK, hk, D, V, W, BN, rd, md, rv, mv, OFF)
        s = tl.where(see, _scores(qt, kt, scale, cap, HAS_CAP), float("-inf"))
        e, den_w, num_w = _reweigh(e, den_w, num_w, s, m, dot_, vt, MIX)
    c_win = tl.full([BM], 1.0, tl.float32)
    if MIX:
        a = tl.load(mix + h)
        num_l = _rows(lnum, row, mt, LNS, rv, mv).to(tl.float32)
        den_l = tl.load(lden + row.to(tl.int64) * LDS, mask=mt, other=0.0).to(tl.float32)
        norm = a * den_w + (1 - a) * den_l + EPS_
        dyy = tl.sum(dof * (a * num_w + (1 - a) * num_l), axis=1) / norm  # dy . y
        c_lin = (1 - a) / norm
        _store_rows(dlnum, dof * c_lin[:, None], row, mt, V, rv, mv)
        tl.store(dlden + row, -c_lin * dyy, mask=mt)
        tl.store(dmix + row, (tl.sum(dof * (num_w - num_l), axis=1) - dyy * (den_w - den_l)) / norm, mask=mt)
        c_win = a / norm
        dden = -c_win * dyy
        tl.store(dd + row, dden, mask=mt)
        tl.store(cw + row, c_win, mask=mt)
        e = e * c_win
    else:
        dden = tl.load(dd + row, mask=mt, other=0.0)
    # delta = sum_j a_tj dP_tj from the very products it cancels in dS (so the rounding of the
    # products, TF32 on a GPU, cancels too: a row with one visible key gets dS = 0)
    dlt = e + dden * den_w
    tl.store(delta + row, dlt, mask=mt)
    dqt = tl.zeros([BM, BD], dtype=tl.float32)
    if NS > 0:  # the sinks' dq, and their dk, dv summed over this block's queries
        for c0 in range(lo, hi, BS):
            kt, vt, idx, see, srow, ms = _sink_tile(sk, sv, spos, b, S, c0, tpos, base, HK, hk, D, V, W, NS, BS, rd, md, rv, mv)
            s = _scores(qt, kt, scale, cap, HAS_CAP)
            p, ds = _dscores(s, see, m, _dot(dot_, tl.trans(vt)) * c_win[:, None], dden, dlt, idx, arg, cap, HAS_CAP)
            dqt += _dot(ds.to(kt.dtype), kt)
            _add_rows(dsk, _dot(tl.trans(ds).to(qt.dtype), qt) * scale, srow, ms, D, rd, md)
            _add_rows(dsv, _dot(tl.trans(p * c_win[:, None]).to(dot_.dtype), dot_), srow, ms, V, rv, mv)
    for c in range(NC):  # second walk: dq
        kt, vt, j, see = _window_tile(k, v, valid, b, t0, c, rm, qseg, L, HK, hk, D, V, W, BN, rd, md, rv, mv, OFF)
        s = _scores(qt, kt, scale, cap, HAS_CAP)
        _, ds = _dscores(s, see, m, _dot(dot_, tl.trans(vt)) * c_win[:, None], dden, dlt, j, arg, cap, HAS_CAP)
        dqt += _dot(ds.to(kt.dtype), kt)
    _store_rows(dq, dqt * scale, row, mt, D, rd, md)


@triton.jit
def _window_dkv_kernel(
    q, k, v, valid, do, dd, cw, rmax, rarg, delta, dk, dv, T, L, scale, cap,
    H: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, NC: tl.constexpr,
    HAS_CAP: tl.constexpr, MIX: tl.constexpr, OFF: tl.constexpr = 0,
):
    # the forward's loop transposed: BM keys, the BM+W-1 queries that see them in chunks of BN
    bh, n = tl.program_id(0), tl.program_id(1)
    b, hk = bh // HK, bh % HK
    G: tl.constexpr = H // HK
    rk, rd, rv = tl.arange(0, BM), tl.arange(0, BD), tl.arange(0, BV)
    md, mv = rd < D, rv < V
    j = n * BM + rk
    kt, vt, kseg = _keys(k, v, valid, b, j, L, HK, hk, D, V, rd, md, rv, mv, OFF)
    dkt = tl.zeros([BM, BD], dtype=tl.float32)
    dvt = tl.zeros([BM, BV], dtype=tl.float32)
    for g in range(G):
        h = hk * G + g
        for c in range(NC):
            rel = c * BN + tl.arange(0, BN)  # query offset from j0-W+1: key row r is seen by offsets [r, r+W-1]
            t = n * BM - (W - 1) + rel
            mt = (t >= 0) & (t < T)
            row = (b * T + t) * H + h
            qt = _rows(q, row, mt, D, rd, md)
            dot_ = _rows(do, row, mt, V, rv, mv).to(v.dtype.element_ty)
            m = tl.load(rmax + row, mask=mt, other=0.0)
            arg = tl.load(rarg + row, mask=mt, other=-1)
            dlt = tl.load(delta + row, mask=mt, other=0.0)
            dden = tl.load(dd + row, mask=mt, other=0.0)
            qseg = tl.load(valid + b * (L - OFF) + t + W - 1 - OFF, mask=mt, other=0)
            see = (rel[None, :] >= rk[:, None]) & (rel[None, :] < rk[:, None] + W) & _visible(qseg[None, :], kseg[:, None]) & mt[None, :]
            s = _scores(kt, qt, scale, cap, HAS_CAP)  # [keys, queries]
            p = tl.exp(tl.where(see, s - m[None, :], float("-inf")))
            dp = _dot(vt, tl.trans(dot_))  # scaled after the product, as in the dq pass
            if MIX:
                cwt = tl.load(cw + row, mask=mt, other=0.0)
                dp = dp * cwt[None, :]
                dvt += _dot((p * cwt[None, :]).to(dot_.dtype), dot_)
            else:
                dvt += _dot(p.to(dot_.dtype), dot_)
            ds = p * (dp + dden[None, :]) - tl.where(j[:, None] == arg[None, :], dlt[None, :], 0.0)
            if HAS_CAP:
                ds = ds * (1.0 - (s / cap) * (s / cap))
            dkt += _dot(ds.to(qt.dtype), qt)
    mj = (j >= OFF) & (j < L)
    _store_rows(dk, dkt * scale, (b * (L - OFF) + j - OFF) * HK + hk, mj, D, rd, md)
    _store_rows(dv, dvt, (b * (L - OFF) + j - OFF) * HK + hk, mj, V, rv, mv)


def _config(window: int, kd: int, vd: int, backward: bool = False, dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Block sizes: BM queries (or keys) per program, key (or query) chunks of BN, padded head dims.

    16-bit inputs, head dims up to 128: the fastest of 8 forward and 8 backward candidates timed on an
    H100 (W=64, D=128, T=4k: forward 0.34 ms at 64/64/4 warps against 0.81 at 32/32/8; backward 1.37
    ms at 64/32/4 against 2.38), although the compiler reports spills for them. Otherwise chosen by
    compiling for sm_90 (no spills, under 140 KB of shared memory): fp32 tiles of [64, 128] spill,
    and 3 pipeline stages of them overflow the shared memory."""
    bd, bv = max(16, triton.next_power_of_2(kd)), max(16, triton.next_power_of_2(vd))
    if dtype in (torch.bfloat16, torch.float16) and max(bd, bv) <= 128:
        bm, bn, warps = 64, min(32 if backward else 64, max(16, triton.next_power_of_2(window))), 4
    else:
        bm = 32 if max(bd, bv) <= 128 else 16
        bn, warps = min(32, max(16, triton.next_power_of_2(window))), 8 if max(bd, bv) >= 64 else 4
    return dict(BM=bm, BN=bn, BD=bd, BV=bv, NC=triton.cdiv(bm + window - 1, bn), num_warps=warps, num_stages=2)


class WindowSoftmaxFunction(torch.autograd.Function):
    """The window softmax (num_l, den_l, mix None: returns num, den) or the fused hybrid output
    (returns y, with sinks when sk is given) on the Triton kernels; gradients for q, ext_k, ext_v and,
    fused, num_l, den_l, mix and the sinks' keys and values."""

    @staticmethod
    def forward(ctx, q, k, v, valid, num_l, den_l, mix, sk, sv, spos, at, sbase, sinks: int, window: int, scale: float,
                softcap: float | None, dtype: torch.dtype, key_offset: int = 0):
        b, t, h, kd = q.shape
        hk, vd, length = k.shape[2], v.shape[-1], k.shape[1] + key_offset
        cfg = _config(window, kd, vd, dtype=q.dtype)
        fused = num_l is not None
        q, k, v, valid = q.contiguous(), k.contiguous(), v.contiguous(), valid.to(torch.int32).contiguous()
        ctx.mix_dtype = None if mix is None else mix.dtype
        strides = (0, 0)
        if fused:
            (num_l, lns), (den_l, lds), mix = _row_view(num_l), _row_view(den_l), mix.float().contiguous()
            strides = (lns, lds)
        if sinks:
            sk, sv, spos, at, sbase = sk.contiguous(), sv.contiguous(), spos.contiguous(), at.contiguous(), sbase.contiguous()
        else:
            sk = sv = spos = at = sbase = q  # not read
        out = torch.empty(b, t, h, vd, dtype=dtype, device=q.device)  # y, or num
        den = out if fused else torch.empty(b, t, h, dtype=torch.float32, device=q.device)
        rmax = torch.empty(b, t, h, dtype=torch.float32, device=q.device)
        rarg = torch.empty(b, t, h, dtype=torch.int32, device=q.device)
        _window_fwd_kernel[(b * h, triton.cdiv(t, cfg["BM"]))](
            q, k, v, valid, num_l if fused else q, den_l if fused else q, mix if fused else q, sk, sv, spos, at, sbase,
            out, den, rmax, rarg, t, length, sk.shape[1] if sinks else 0, scale, softcap or 1.0, *strides, h, hk, kd, vd,
            window, **cfg, HAS_CAP=bool(softcap), MIX=fused, EPS_=EPS, NS=sinks, BS=16, OFF=key_offset,
        )
        ctx.save_for_backward(q, k, v, valid, num_l, den_l, mix, sk, sv, spos, at, sbase, rmax, rarg)
        ctx.window, ctx.scale, ctx.softcap, ctx.strides, ctx.sinks = window, scale, softcap, strides, sinks
        ctx.key_offset = key_offset
        return out if fused else (out, den)

    @staticmethod
    def backward(ctx, *grads):
        q, k, v, valid, num_l, den_l, mix, sk, sv, spos, at, sbase, rmax, rarg = ctx.saved_tensors
        b, t, h, kd = q.shape
        off = ctx.key_offset
        hk, vd, length = k.shape[2], v.shape[-1], k.shape[1] + off
        cfg = _config(ctx.window, kd, vd, backward=True, dtype=q.dtype)
        fused, sinks = num_l is not None, ctx.sinks
        delta = torch.empty_like(rmax)
        do = grads[0].contiguous()
        if fused:
            dd, cw, dlden, dmix = (torch.empty_like(rmax) for _ in range(4))
            dlnum = torch.empty(b, t, h, vd, dtype=num_l.dtype, device=q.device)
        else:  # dd: the gradient of den; cw, dlnum, dlden, dmix unused
            dd = grads[1].float().contiguous()
            cw = dlnum = dlden = dmix = delta
        dsk, dsv = (torch.zeros_like(x, dtype=torch.float32) for x in (sk, sv)) if sinks else (delta, delta)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        shared = dict(HAS_CAP=bool(ctx.softcap), MIX=fused)
        common = (t, length, ctx.scale, ctx.softcap or 1.0, h, hk, kd, vd, ctx.window)
        _window_dq_kernel[(b * h, triton.cdiv(t, cfg["BM"]))](
            q, k, v, valid, num_l if fused else q, den_l if fused else q, mix if fused else q, sk, sv, spos, at, sbase,
            do, dd, cw, rmax, rarg, delta, dq, dlnum, dlden, dmix, dsk, dsv, t, length, sk.shape[1] if sinks else 0,
            *common[2:4], *ctx.strides, *common[4:], **cfg, **shared, EPS_=EPS, NS=sinks, BS=16, OFF=off,
        )
        _window_dkv_kernel[(b * hk, triton.cdiv(length, cfg["BM"]))](
            q, k, v, valid, do, dd, cw, rmax, rarg, delta, dk, dv, *common, **cfg, **shared, OFF=off,
        )
        if not fused:
            return dq, dk, dv, *[None] * 15
        dsk, dsv = (dsk.to(sk.dtype), dsv.to(sv.dtype)) if sinks else (None, None)
        return (dq, dk, dv, None, dlnum, dlden.to(den_l.dtype), dmix.sum((0, 1)).to(ctx.mix_dtype), dsk, dsv,
                *[None] * 9)


def _row_view(x: Tensor) -> tuple[Tensor, int]:
    """x [B,T,H(,V)] and the stride between its (b, t, h) rows, copied only when the rows are not evenly
    strided with contiguous columns (a column slice of a wider tensor is read in place)."""
    width = x.shape[3] if x.dim() == 4 else 1
    for rows in {x.stride(2), width}:
        want = (x.shape[1] * x.shape[2] * rows, x.shape[2] * rows, rows, 1)
        if all(s == w for s, w, n in zip(x.stride(), want, x.shape) if n > 1):  # size-1 dims: any stride
            return x, rows
    return x.contiguous(), width


def _check(q: Tensor, ext_k: Tensor, ext_v: Tensor, ext_valid: Tensor, window: int, key_offset: int = 0) -> None:
    b, t, h, _ = q.shape
    if window < 1 or not 0 <= key_offset <= window - 1:
        raise ValueError(f"window must be >= 1 and key_offset in [0, W-1], got {window} and {key_offset}")
    if h % ext_k.shape[2]:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({ext_k.shape[2]})")
    n = window - 1 + t - key_offset
    if ext_k.shape[:2] != (b, n) or ext_v.shape[:3] != ext_k.shape[:3] or ext_valid.shape != ext_k.shape[:2]:
        raise ValueError(f"ext_k, ext_v, ext_valid must hold W-1+T-key_offset = {n} tokens of batch {b}")
    check_offsets("window attention", q=q.numel(), ext_k=ext_k.numel(), output=b * t * h * ext_v.shape[-1])


def window_softmax(
    q: Tensor, ext_k: Tensor, ext_v: Tensor, ext_valid: Tensor, window: int, scale: float, softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Differentiable banded softmax numerator [B,T,H,V] and normalizer [B,T,H] (fp32) on the Triton
    kernels: `window_softmax_ref`'s maths, for q [B,T,H,D] and ext_* [B,W-1+T,Hk,*]."""
    _check(q, ext_k, ext_v, ext_valid, window)
    ext_k, ext_v = ext_k.to(q.dtype), ext_v.to(q.dtype)  # the products take one operand dtype
    none = (None,) * 8
    return WindowSoftmaxFunction.apply(q, ext_k, ext_v, ext_valid, *none, 0, window, scale, softcap, torch.float32)


def window_combine(
    q: Tensor, ext_k: Tensor, ext_v: Tensor, ext_valid: Tensor, num_l: Tensor, den_l: Tensor, mix: Tensor,
    window: int, scale: float, softcap: float | None = None, dtype: torch.dtype = torch.float32,
    sink: dict[str, Tensor] | None = None, sinks: int = 0, key_offset: int = 0,
) -> Tensor:
    """Differentiable hybrid output y [B,T,H,V] in `dtype` from the window softmax (with the sinks of
    `naive.sink_table`, `sinks` per sequence) and the linear part num_l [B,T,H,V], den_l [B,T,H], in one
    pass (`window_combine_ref`'s maths). num_l and den_l may be column views of one [..., V+1] tensor (read in place).
    key_offset: the ext tensors start that many tokens in (those are missing: with W-1, a fresh window read from the
    new tokens themselves, no concatenation)."""
    _check(q, ext_k, ext_v, ext_valid, window, key_offset)
    if num_l.shape != (*q.shape[:3], ext_v.shape[-1]) or den_l.shape != q.shape[:3] or mix.shape != (q.shape[2],):
        raise ValueError(f"num_l must be [B,T,H,V] = {(*q.shape[:3], ext_v.shape[-1])}, den_l [B,T,H] and mix [H]")
    ext_k, ext_v = ext_k.to(q.dtype), ext_v.to(q.dtype)
    tables = (None,) * 5
    if sink is not None and sinks:
        base = (sink["group"] * sinks).to(torch.int32)  # each query's first sink slot: its sequence's
        tables = (sink["k"].to(q.dtype), sink["v"].to(q.dtype), sink["pos"], sink["at"], base)
    return WindowSoftmaxFunction.apply(q, ext_k, ext_v, ext_valid, num_l, den_l, mix, *tables, sinks if sink is not None else 0,
                                       window, scale, softcap, dtype, key_offset)
