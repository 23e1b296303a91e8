"""Triton chunked (gated) linear attention, forward and backward: the `hedgehog` and `gla` kinds, the
linear part of the hybrids, and the scalar-decay scan of `mamba2`. Same maths as `chunk_gla_ref`.

Decay modes (constexpr GATE): 0 none, 1 one log-decay per head and token (g [B,T,Hk]), 2 one per key
channel (g [B,T,Hk,K]). b is the running sum of g inside each chunk of C tokens (`_cumsum_kernel`);
every exponent below is a difference b_i - b_j with i after j, so it is <= 0 and never overflows.

Forward, chunk-parallel as in flash-linear-attention:
1. `_state_kernel`: one program per (sequence, KV head, block of K, block of V) walks the chunks in
   order and stores the state entering each chunk, h[n] = exp(b_last) h[n-1] + (k exp(b_last - b))^T v.
2. per-channel decay only, `_intra_kernel`: the intra-chunk weights A_ij = sum_c q_ic k_jc exp(bq_ic - b_jc)
   in 16-token sub-blocks: between sub-blocks a matrix product of q and k rescaled to the sub-block
   boundary, inside a diagonal sub-block one key at a time.
3. `_output_kernel`, every chunk in parallel: o = (q exp(bq)) h[n] + A v, with A = tril(q k^T) (times
   exp(bq_i - b_j) for a per-head decay) computed in place or, per channel, read from step 2.
Backward, the same pattern transposed: `_dstate_kernel` walks the chunks backward for the gradient of
the state leaving each chunk (dh = exp(b_last) dh + (q exp(bq))^T dO); `_dv_kernel` gives
dv = (k exp(b_last - b)) dh + A^T dO; `_dqk_kernel` gives dq = exp(bq) dO h^T + dA k and
dk = exp(b_last - b) v dh^T + dA^T q with dA = tril(dO v^T) (per channel: `_dA_kernel` stores dA and
`_intra_grad_kernel` gives its terms in sub-blocks, which `_dqk_kernel` adds); the decay's gradient is a reverse
cumulative sum of q dq - k dk: per channel within each chunk in `_dqk_kernel`, the later chunks standing in as the
gradient of the chunk's last cumulative decay (exp(b_last) sum_v h dh + sum k dk through the states), as fla does;
per head (a sum over every channel) by `_decay_grad_kernel`, walking the chunks backward. GQA: query heads of a group read and accumulate into their KV
head's k, v, states and gradients; k and v are never repeated. Exclusive scans (o_i reads the state
before token i) shift bq by one token and make the diagonal strict. Packed sequences (cu_seqlens):
a table maps each program to its (sequence, chunk); no chunk crosses a sequence boundary. A key offset (no decay)
makes position t read token t - offset's key and value in place, none before a sequence's start (the hybrids' fresh
window: their linear keys lag the queries by W-1, without a shifted copy).
States are fp32 at the ends; the per-chunk states are stored in the inputs' dtype for 16-bit inputs
(as flash-linear-attention does), so matrix products run on bf16/fp16 tensor cores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..triton_utils import check_offsets
from ..triton_utils import dot as _dot
from .naive import check_initial_state

SUB = 16  # sub-block of the per-channel intra-chunk weights
WALK_PROGRAMS = 256  # programs the walks over the chunks aim at: about two per SM of an H100/H200
# warps of the [C, 64]-tile kernels (state, output, dstate, dv, dq/dk): 4. At 8 they spill less when compiled for
# sm_90 (benchmarks/kernel_resources.py), but on the H200 (Triton 3.6) 8 warps gave wrong results: chunks of 64 at
# K = V = 16 off by 74% (tests/test_kernels_triton.py, 2026-12-05), and an illegal address in a longer run
CHUNK_WARPS = 4


@triton.jit
def _chunk_of(pid, cidx, NT, IS_VARLEN: tl.constexpr):
    """(sequence, chunk within it) of chunk program `pid`."""
    if IS_VARLEN:
        return tl.load(cidx + 2 * pid), tl.load(cidx + 2 * pid + 1)
    return pid // NT, pid % NT


@triton.jit
def _bounds(i_n, cu, T, IS_VARLEN: tl.constexpr):
    """First token and end (exclusive) of sequence i_n in the flattened [B*T] token axis."""
    if IS_VARLEN:
        return tl.load(cu + i_n).to(tl.int64), tl.load(cu + i_n + 1).to(tl.int64)
    bos = i_n.to(tl.int64) * T
    return bos, bos + T


@triton.jit
def _chunk_rows(pid, cidx, cu, T, NT, C: tl.constexpr, EXCLUSIVE: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Chunk program `pid`: its first and last token, its C rows (tokens, in-sequence mask) and which
    row sees which (causal; strictly when exclusive)."""
    i_n, i_t = _chunk_of(pid, cidx, NT, IS_VARLEN)
    bos, eos = _bounds(i_n, cu, T, IS_VARLEN)
    rc = tl.arange(0, C)
    first = bos + i_t * C
    tok = first + rc
    sees = (rc[:, None] > rc[None, :]) if EXCLUSIVE else (rc[:, None] >= rc[None, :])
    return first, tl.minimum(first + C, eos) - 1, tok, tok < eos, rc, sees


@triton.jit
def _key_rows(pid, cidx, cu, T, NT, tok, mt, LAG: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Rows of the keys and values at positions `tok`: LAG tokens earlier, none before the sequence's start."""
    i_n, _ = _chunk_of(pid, cidx, NT, IS_VARLEN)
    bos, _ = _bounds(i_n, cu, T, IS_VARLEN)
    return tok - LAG, mt & (tok - LAG >= bos)


@triton.jit
def _load(ptr, tok, mt, NH: tl.constexpr, head, D: tl.constexpr, rd, md):
    """Rows `tok` of head `head` of a [tokens, NH, D] tensor (zeros outside the masks)."""
    return tl.load(ptr + (tok[:, None] * NH + head) * D + rd[None, :], mask=mt[:, None] & md[None, :], other=0.0)


@triton.jit
def _store(ptr, val, tok, mt, NH: tl.constexpr, head, D: tl.constexpr, rd, md):
    tl.store(ptr + (tok[:, None] * NH + head) * D + rd[None, :], val.to(ptr.dtype.element_ty), mask=mt[:, None] & md[None, :])


@triton.jit
def _decays(b, tok, mt, head, ck, mk, first, last, EXCLUSIVE: tl.constexpr, HK: tl.constexpr, KG: tl.constexpr, GATE: tl.constexpr):
    """Cumulative log-decays (from the chunk's first token) of rows `tok` for keys (bk), queries (bq,
    one token earlier when exclusive; 0 before the chunk) and at the chunk's last token (bl):
    [rows, BK] / [BK] per channel, [rows] / scalar per head."""
    prev = tok - 1
    mp = mt & (prev >= first)
    if GATE == 2:
        bk = _load(b, tok, mt, HK, head, KG, ck, mk)
        bq = _load(b, prev, mp, HK, head, KG, ck, mk) if EXCLUSIVE else bk
        bl = tl.load(b + (last * HK + head) * KG + ck, mask=mk, other=0.0)
    else:
        bk = tl.load(b + tok * HK + head, mask=mt, other=0.0)
        bq = tl.load(b + prev * HK + head, mask=mp, other=0.0) if EXCLUSIVE else bk
        bl = tl.load(b + last * HK + head)
    return bk, bq, bl


@triton.jit
def _walk_program(init, cu, coff, T, NT, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, HAS_INIT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Program (block of K, block of V, sequence x KV head) of a walk over the chunks: its sequence,
    first chunk, rows, channel ranges, tile offsets and starting [BK, BV] tile (`init`'s, or zeros)."""
    ik, iv, nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, hk = nh // HK, nh % HK
    bos, eos = _bounds(i_n, cu, T, IS_VARLEN)
    c0 = tl.load(coff + i_n) if IS_VARLEN else i_n * NT
    rc, rk, rv = tl.arange(0, C), ik * BK + tl.arange(0, BK), iv * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    s_off = rk[:, None] * V + rv[None, :]
    ms = mk[:, None] & mv[None, :]
    if HAS_INIT:
        tile = tl.load(init + nh.to(tl.int64) * K * V + s_off, mask=ms, other=0.0).to(tl.float32)
    else:
        tile = tl.zeros([BK, BV], dtype=tl.float32)
    return nh, hk, bos, eos, c0, rc, rk, mk, rk if GATE == 2 else rk * 0, rv, mv, s_off, ms, tile


@triton.jit
def _cumsum_kernel(g, b, cu, cidx, T, NT, HK: tl.constexpr, KG: tl.constexpr, C: tl.constexpr, BKG: tl.constexpr, IS_VARLEN: tl.constexpr):
    pid, hk = tl.program_id(0), tl.program_id(1)
    _first, _last, tok, mt, _rc, _sees = _chunk_rows(pid, cidx, cu, T, NT, C, False, IS_VARLEN)
    rg = tl.arange(0, BKG)
    x = _load(g, tok, mt, HK, hk, KG, rg, rg < KG).to(tl.float32)
    _store(b, tl.cumsum(x, axis=0), tok, mt, HK, hk, KG, rg, rg < KG)


@triton.jit
def _state_kernel(
    k, v, b, h, s0, s_out, cu, coff, T, NT,
    HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KG: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, HAS_S0: tl.constexpr, IS_VARLEN: tl.constexpr,
    LAG: tl.constexpr = 0,
):
    nh, hk, bos, eos, c0, rc, rk, mk, ck, rv, mv, s_off, ms, state = _walk_program(
        s0, cu, coff, T, NT, HK, K, V, C, BK, BV, GATE, HAS_S0, IS_VARLEN)
    for i_t in range(tl.cdiv(eos - bos, C)):
        tl.store(h + ((c0 + i_t).to(tl.int64) * HK + hk) * K * V + s_off, state.to(h.dtype.element_ty), mask=ms)
        tok = bos + i_t * C + rc
        mt = tok < eos
        kc = _load(k, tok - LAG, mt & (tok - LAG >= bos), HK, hk, K, rk, mk)
        vc = _load(v, tok - LAG, mt & (tok - LAG >= bos), HK, hk, V, rv, mv)
        if GATE != 0:
            bk, _bq, bl = _decays(b, tok, mt, hk, ck, mk, bos + i_t * C, tl.minimum(bos + i_t * C + C, eos) - 1, False, HK, KG, GATE)
            if GATE == 2:
                kc = (kc * tl.exp(bl[None, :] - bk)).to(vc.dtype)
                state = state * tl.exp(bl)[:, None]
            else:
                kc = (kc * tl.exp(bl - bk)[:, None]).to(vc.dtype)
                state = state * tl.exp(bl)
        state += _dot(tl.trans(kc), vc)
    tl.store(s_out + nh.to(tl.int64) * K * V + s_off, state, mask=ms)


@triton.jit
def _intra_kernel(
    q, k, b, A, cu, cidx, T, NT,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    S: tl.constexpr, EXCLUSIVE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # per-channel decay: rows of sub-block I of A [tokens, H, C] (entries j > i are never read);
    # channels in slices of BK, so the diagonal's [S, S, BK] weights stay small
    isub, pid, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    hk = head // (H // HK)
    c_start, last, _tok, _mt, _rc, _sees = _chunk_rows(pid, cidx, cu, T, NT, C, EXCLUSIVE, IS_VARLEN)
    eos = last + 1  # the chunk's end: every token a sub-block program touches lies in its chunk
    if c_start + isub * S < eos:
        rs = tl.arange(0, S)
        tok = c_start + isub * S + rs
        mt = tok < eos
        sees = (rs[:, None] > rs[None, :]) if EXCLUSIVE else (rs[:, None] >= rs[None, :])
        for jsub in range(isub):  # earlier sub-blocks: q and k rescaled to the boundary before this one
            tj = c_start + jsub * S + rs
            acc = tl.zeros([S, S], dtype=tl.float32)
            for ik in range(tl.cdiv(K, BK)):
                rk = ik * BK + tl.arange(0, BK)
                mk = rk < K
                _bk, bq, _bl = _decays(b, tok, mt, hk, rk, mk, c_start, eos - 1, EXCLUSIVE, HK, K, 2)
                bref = tl.load(b + ((c_start + isub * S - 1) * HK + hk) * K + rk, mask=mk, other=0.0)
                qr = _load(q, tok, mt, H, head, K, rk, mk) * tl.exp(tl.minimum(bq - bref[None, :], 0.0))
                kr = _load(k, tj, tj < eos, HK, hk, K, rk, mk) * tl.exp(bref[None, :] - _load(b, tj, tj < eos, HK, hk, K, rk, mk))
                acc += _dot(qr.to(q.dtype.element_ty), tl.trans(kr.to(k.dtype.element_ty)))
            _store(A, acc, tok, mt, H, head, C, jsub * S + rs, rs < S)
        a = tl.zeros([S, S], dtype=tl.float32)
        for ik in range(tl.cdiv(K, BK)):  # the diagonal sub-block, channel by channel
            rk = ik * BK + tl.arange(0, BK)
            mk = rk < K
            bk, bq, _bl = _decays(b, tok, mt, hk, rk, mk, c_start, eos - 1, EXCLUSIVE, HK, K, 2)
            qi = _load(q, tok, mt, H, head, K, rk, mk).to(tl.float32)
            ki = _load(k, tok, mt, HK, hk, K, rk, mk).to(tl.float32)
            w = tl.exp(tl.minimum(bq[:, None, :] - bk[None, :, :], 0.0))
            a += tl.sum(qi[:, None, :] * ki[None, :, :] * w, axis=2)
        _store(A, tl.where(sees, a, 0.0), tok, mt, H, head, C, isub * S + rs, rs < S)


@triton.jit
def _output_kernel(
    q, k, v, b, h, A, o, cu, cidx, T, NT,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KG: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, EXCLUSIVE: tl.constexpr, IS_VARLEN: tl.constexpr,
    LAG: tl.constexpr = 0,
):
    iv, pid, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    hk = head // (H // HK)
    first, last, tok, mt, rc, sees = _chunk_rows(pid, cidx, cu, T, NT, C, EXCLUSIVE, IS_VARLEN)
    ktok, km = _key_rows(pid, cidx, cu, T, NT, tok, mt, LAG, IS_VARLEN)
    rv = iv * BV + tl.arange(0, BV)
    mv = rv < V
    acc = tl.zeros([C, BV], dtype=tl.float32)
    a = tl.zeros([C, C], dtype=tl.float32)
    h_base = h + (pid.to(tl.int64) * HK + hk) * K * V
    for ik in range(tl.cdiv(K, BK)):
        rk = ik * BK + tl.arange(0, BK)
        mk = rk < K
        qc = _load(q, tok, mt, H, head, K, rk, mk)
        hc = tl.load(h_base + rk[:, None] * V + rv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        if GATE == 2:
            _bk, bq, _bl = _decays(b, tok, mt, hk, rk, mk, first, last, EXCLUSIVE, HK, KG, 2)
            acc += _dot((qc * tl.exp(bq)).to(hc.dtype), hc)
        else:
            acc += _dot(qc.to(hc.dtype), hc)
            a += _dot(qc, tl.trans(_load(k, ktok, km, HK, hk, K, rk, mk)))
    if GATE == 1:
        bk, bq, _bl = _decays(b, tok, mt, hk, rc, mt, first, last, EXCLUSIVE, HK, KG, 1)
        acc *= tl.exp(bq)[:, None]
        a *= tl.exp(tl.where(sees, tl.minimum(bq[:, None] - bk[None, :], 0.0), float("-inf")))
    if GATE == 2:
        a = tl.load(A + (tok[:, None] * H + head) * C + rc[None, :], mask=mt[:, None] & sees, other=0.0)
    vc = _load(v, ktok, km, HK, hk, V, rv, mv)
    acc += _dot(tl.where(sees, a, 0.0).to(vc.dtype), vc)
    _store(o, acc, tok, mt, H, head, V, rv, mv)


@triton.jit
def _dstate_kernel(
    q, do, b, dh, ds_final, ds0, cu, coff, T, NT,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KG: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, EXCLUSIVE: tl.constexpr,
    HAS_DS: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # walking backward, dh[n] is the gradient of the state leaving chunk n
    G: tl.constexpr = H // HK
    nh, hk, bos, eos, c0, rc, rk, mk, ck, rv, mv, s_off, ms, dstate = _walk_program(
        ds_final, cu, coff, T, NT, HK, K, V, C, BK, BV, GATE, HAS_DS, IS_VARLEN)
    nt = tl.cdiv(eos - bos, C)
    for n in range(nt):
        i_t = nt - 1 - n
        tl.store(dh + ((c0 + i_t).to(tl.int64) * HK + hk) * K * V + s_off, dstate.to(dh.dtype.element_ty), mask=ms)
        tok = bos + i_t * C + rc
        mt = tok < eos
        if GATE != 0:
            _bk, bq, bl = _decays(b, tok, mt, hk, ck, mk, bos + i_t * C, tl.minimum(bos + i_t * C + C, eos) - 1, EXCLUSIVE, HK, KG, GATE)
            dstate = dstate * (tl.exp(bl)[:, None] if GATE == 2 else tl.exp(bl))
        for j in range(G):
            qc = _load(q, tok, mt, H, hk * G + j, K, rk, mk)
            doc = _load(do, tok, mt, H, hk * G + j, V, rv, mv)
            if GATE == 2:
                qc = qc * tl.exp(bq)
            elif GATE == 1:
                qc = qc * tl.exp(bq)[:, None]
            dstate += _dot(tl.trans(qc.to(doc.dtype)), doc)
    tl.store(ds0 + nh.to(tl.int64) * K * V + s_off, dstate, mask=ms)


@triton.jit
def _dv_kernel(
    q, k, b, A, do, dh, dv, cu, cidx, T, NT,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KG: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, EXCLUSIVE: tl.constexpr, IS_VARLEN: tl.constexpr,
    LAG: tl.constexpr = 0,
):
    iv, pid, hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    G: tl.constexpr = H // HK
    first, last, tok, mt, rc, sees = _chunk_rows(pid, cidx, cu, T, NT, C, EXCLUSIVE, IS_VARLEN)
    ktok, km = _key_rows(pid, cidx, cu, T, NT, tok, mt, LAG, IS_VARLEN)
    rv = iv * BV + tl.arange(0, BV)
    mv = rv < V
    acc = tl.zeros([C, BV], dtype=tl.float32)
    dh_base = dh + (pid.to(tl.int64) * HK + hk) * K * V
    for ik in range(tl.cdiv(K, BK)):  # through the state leaving the chunk
        rk = ik * BK + tl.arange(0, BK)
        mk = rk < K
        kc = _load(k, ktok, km, HK, hk, K, rk, mk)
        dhc = tl.load(dh_base + rk[:, None] * V + rv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        if GATE == 2:
            bk, _bq, bl = _decays(b, tok, mt, hk, rk, mk, first, last, EXCLUSIVE, HK, KG, 2)
            kc = kc * tl.exp(bl[None, :] - bk)
        acc += _dot(kc.to(dhc.dtype), dhc)
    if GATE == 1:
        bk, bq, bl = _decays(b, tok, mt, hk, rc, mt, first, last, EXCLUSIVE, HK, KG, 1)
        acc *= tl.exp(bl - bk)[:, None]
    for j in range(G):  # through the outputs of the same chunk
        head = hk * G + j
        doc = _load(do, tok, mt, H, head, V, rv, mv)
        if GATE == 2:
            a = tl.load(A + (tok[:, None] * H + head) * C + rc[None, :], mask=mt[:, None] & sees, other=0.0)
        else:
            a = tl.zeros([C, C], dtype=tl.float32)
            for ik in range(tl.cdiv(K, BK)):
                rk = ik * BK + tl.arange(0, BK)
                mk = rk < K
                a += _dot(_load(q, tok, mt, H, head, K, rk, mk), tl.trans(_load(k, ktok, km, HK, hk, K, rk, mk)))
            if GATE == 1:
                a *= tl.exp(tl.where(sees, tl.minimum(bq[:, None] - bk[None, :], 0.0), float("-inf")))
        acc += _dot(tl.trans(tl.where(sees, a, 0.0).to(doc.dtype)), doc)
    _store(dv, acc, ktok, km, HK, hk, V, rv, mv)


@triton.jit
def _dqk_kernel(
    q, k, v, b, h, do, dh, dq, dk, dqi, dki, dg, cu, cidx, T, NT,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KG: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, EXCLUSIVE: tl.constexpr, IS_VARLEN: tl.constexpr,
    LAG: tl.constexpr = 0,
):
    # dq and dk through the states, and (no decay or per head) through the intra-chunk weights. Per channel, the
    # intra-chunk terms come in (dqi, dki, from `_intra_grad_kernel`) and the decay's gradient goes out, chunk by
    # chunk: dg_t = sum_{u>=t in the chunk} (sum_heads q_u dq_u - k_u dk_u) + the chunk's last cumulative decay's term,
    # exp(b_last) sum_v h dh + sum_u k_u dk_u (through the states), which stands for every later chunk
    ik, pid, hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    G: tl.constexpr = H // HK
    first, last, tok, mt, rc, sees = _chunk_rows(pid, cidx, cu, T, NT, C, EXCLUSIVE, IS_VARLEN)
    ktok, km = _key_rows(pid, cidx, cu, T, NT, tok, mt, LAG, IS_VARLEN)
    rk = ik * BK + tl.arange(0, BK)
    mk = rk < K
    ck = rk if GATE == 2 else rc
    if GATE != 0:
        bk, bq, bl = _decays(b, tok, mt, hk, ck, mk if GATE == 2 else mt, first, last, EXCLUSIVE, HK, KG, GATE)
    kc = _load(k, ktok, km, HK, hk, K, rk, mk)
    dkc = tl.zeros([C, BK], dtype=tl.float32)
    hdh = tl.zeros([BK], dtype=tl.float32)  # sum_v h dh (per channel)
    base = (pid.to(tl.int64) * HK + hk) * K * V
    for iv in range(tl.cdiv(V, BV)):
        rv = iv * BV + tl.arange(0, BV)
        mv = rv < V
        vc = _load(v, ktok, km, HK, hk, V, rv, mv)
        dhc = tl.load(dh + base + rk[:, None] * V + rv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        dkc += _dot(vc, tl.trans(dhc.to(vc.dtype)))
        if GATE == 2:
            hc = tl.load(h + base + rk[:, None] * V + rv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
            hdh += tl.sum(hc.to(tl.float32) * dhc.to(tl.float32), axis=1)
    if GATE == 2:
        dkc *= tl.exp(bl[None, :] - bk)
        tail = tl.exp(bl) * hdh + tl.sum(kc.to(tl.float32) * dkc, axis=0)  # the chunk's last decay's term, through the states
        dkc += _load(dki, tok, mt, HK, hk, K, rk, mk)
        r = tl.zeros([C, BK], dtype=tl.float32)  # sum_heads q dq
    elif GATE == 1:
        dkc *= tl.exp(bl - bk)[:, None]
        decay = tl.exp(tl.where(sees, tl.minimum(bq[:, None] - bk[None, :], 0.0), float("-inf")))
    for j in range(G):
        head = hk * G + j
        dqc = tl.zeros([C, BK], dtype=tl.float32)
        da = tl.zeros([C, C], dtype=tl.float32)
        for iv in range(tl.cdiv(V, BV)):
            rv = iv * BV + tl.arange(0, BV)
            mv = rv < V
            doc = _load(do, tok, mt, H, head, V, rv, mv)
            hc = tl.load(h + base + rk[:, None] * V + rv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
            dqc += _dot(doc, tl.trans(hc.to(doc.dtype)))
            if GATE != 2:
                da += _dot(doc, tl.trans(_load(v, ktok, km, HK, hk, V, rv, mv)))
        if GATE == 2:
            dqc = dqc * tl.exp(bq) + _load(dqi, tok, mt, H, head, K, rk, mk)
            r += _load(q, tok, mt, H, head, K, rk, mk).to(tl.float32) * dqc
        else:
            if GATE == 1:
                dqc *= tl.exp(bq)[:, None]
                da *= decay
            da = tl.where(sees, da, 0.0).to(kc.dtype)
            qc = _load(q, tok, mt, H, head, K, rk, mk)
            dqc += _dot(da, kc)
            dkc += _dot(tl.trans(da), qc)
        _store(dq, dqc, tok, mt, H, head, K, rk, mk)
    _store(dk, dkc, ktok, km, HK, hk, K, rk, mk)
    if GATE == 2:
        dgc = tl.cumsum(r - kc.to(tl.float32) * dkc, axis=0, reverse=True) + tail[None, :]
        if EXCLUSIVE:  # q's decay stops one token earlier
            dgc -= r
        _store(dg, dgc, tok, mt, HK, hk, K, rk, mk)


@triton.jit
def _dA_kernel(
    v, do, dA, cu, cidx, T, NT,
    H: tl.constexpr, HK: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # per-channel decay: dA = dO v^T of each chunk [tokens, H, C] (the mask is applied by its reader)
    pid, head = tl.program_id(0), tl.program_id(1)
    hk = head // (H // HK)
    _first, _last, tok, mt, rc, _sees = _chunk_rows(pid, cidx, cu, T, NT, C, False, IS_VARLEN)
    da = tl.zeros([C, C], dtype=tl.float32)
    for iv in range(tl.cdiv(V, BV)):
        rv = iv * BV + tl.arange(0, BV)
        mv = rv < V
        da += _dot(_load(do, tok, mt, H, head, V, rv, mv), tl.trans(_load(v, tok, mt, HK, hk, V, rv, mv)))
    _store(dA, da, tok, mt, H, head, C, rc, rc < C)


@triton.jit
def _intra_grad_kernel(
    q, k, b, dA, dq, dk, cu, cidx, T, NT,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    S: tl.constexpr, EXCLUSIVE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # per-channel decay, channels ik*BK.. of sub-block I: the intra-chunk terms dq_i = sum_{j<=i} dA_ij k_j exp(bq_i - b_j)
    # of its queries and dk_j = sum_{i>=j} dA_ij q_i exp(bq_i - b_j) of its keys (all query heads of the group).
    # The other sub-blocks in one product each: keys before this one rescaled to the row before it, queries after it
    # to its last row (every exponent <= 0); the diagonal sub-block one key at a time, on [S, BK] tiles
    isub, pid, hkk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NK: tl.constexpr = (K + BK - 1) // BK
    hk, ik = hkk // NK, hkk % NK
    G: tl.constexpr = H // HK
    c_start, last, _tok, _mt, _rc, _sees = _chunk_rows(pid, cidx, cu, T, NT, C, EXCLUSIVE, IS_VARLEN)
    eos = last + 1  # the chunk's end: every token a sub-block program touches lies in its chunk
    i0 = c_start + isub * S
    if i0 < eos:
        rs, rc, rk = tl.arange(0, S), tl.arange(0, C), ik * BK + tl.arange(0, BK)
        mk = rk < K
        tok, ta = i0 + rs, c_start + rc  # this sub-block's rows, the chunk's
        mt = tok < eos
        earlier, later = rc < isub * S, (rc >= isub * S + S) & (ta < eos)
        bi, bqi, _bl = _decays(b, tok, mt, hk, rk, mk, c_start, eos - 1, EXCLUSIVE, HK, K, 2)
        bref = tl.load(b + ((i0 - 1) * HK + hk) * K + rk, mask=mk & (rk * 0 + isub > 0), other=0.0)
        bn = tl.load(b + ((i0 + S - 1) * HK + hk) * K + rk, mask=mk & (rk * 0 + i0 + S - 1 < eos), other=0.0)
        ke = _load(k, ta, earlier, HK, hk, K, rk, mk).to(tl.float32)
        ke *= tl.exp(tl.minimum(bref[None, :] - _load(b, ta, earlier, HK, hk, K, rk, mk), 0.0))
        _ba, bqa, _bla = _decays(b, ta, later, hk, rk, mk, c_start, eos - 1, EXCLUSIVE, HK, K, 2)
        eq = tl.exp(tl.minimum(bqa - bn[None, :], 0.0))
        dk_acc = tl.zeros([S, BK], dtype=tl.float32)
        for j in range(G):
            head = hk * G + j
            qi = _load(q, tok, mt, H, head, K, rk, mk).to(tl.float32)
            da = tl.load(dA + (tok[:, None] * H + head) * C + rc[None, :], mask=mt[:, None] & earlier[None, :], other=0.0)
            dq_acc = _dot(da, ke) * tl.exp(tl.minimum(bqi - bref[None, :], 0.0))
            qa = _load(q, ta, later, H, head, K, rk, mk).to(tl.float32) * eq
            da = tl.load(dA + (ta[:, None] * H + head) * C + isub * S + rs[None, :], mask=later[:, None], other=0.0)
            dk_acc += _dot(tl.trans(da), qa) * tl.exp(tl.minimum(bn[None, :] - bi, 0.0))
            for jj in range(S):  # key jj of the diagonal sub-block against its queries
                mj = mk & (rk * 0 + i0 + jj < eos)
                kj = tl.load(k + ((i0 + jj) * HK + hk) * K + rk, mask=mj, other=0.0).to(tl.float32)
                bj = tl.load(b + ((i0 + jj) * HK + hk) * K + rk, mask=mj, other=0.0)
                w = tl.exp(tl.minimum(bqi - bj[None, :], 0.0))
                seen = (rs > jj) if EXCLUSIVE else (rs >= jj)
                dcol = tl.load(dA + (tok * H + head) * C + isub * S + jj, mask=mt & seen, other=0.0)
                dq_acc += dcol[:, None] * kj[None, :] * w
                dk_acc += tl.where(rs[:, None] == jj, tl.sum(dcol[:, None] * qi * w, axis=0)[None, :], 0.0)
            _store(dq, dq_acc, tok, mt, H, head, K, rk, mk)
        _store(dk, dk_acc, tok, mt, HK, hk, K, rk, mk)


@triton.jit
def _decay_grad_kernel(
    q, k, dq, dk, fin, dg, cu, T,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, EXCLUSIVE: tl.constexpr, HAS_FIN: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # one decay per head (per channel it is formed in `_dqk_kernel`): dg_t = sum_{u>=t} sum_c (sum_heads q_u dq_u -
    # k_u dk_u) + fin (q's term from u > t when exclusive); one program per (sequence, KV head), all K channels in
    # BK >= K, walks its chunks backward with a carry
    nh = tl.program_id(0)
    i_n, hk = nh // HK, nh % HK
    G: tl.constexpr = H // HK
    bos, eos = _bounds(i_n, cu, T, IS_VARLEN)
    rc, rk = tl.arange(0, C), tl.arange(0, BK)
    mk = rk < K
    carry = tl.load(fin + nh) if HAS_FIN else tl.full((), 0.0, tl.float32)  # the final state's term sum_{c,v} S_T dS_T
    nt = tl.cdiv(eos - bos, C)
    for n in range(nt):
        tok = bos + (nt - 1 - n) * C + rc
        mt = tok < eos
        r = tl.zeros([C, BK], dtype=tl.float32)
        for j in range(G):
            r += _load(q, tok, mt, H, hk * G + j, K, rk, mk).to(tl.float32) * _load(dq, tok, mt, H, hk * G + j, K, rk, mk)
        x = r - _load(k, tok, mt, HK, hk, K, rk, mk).to(tl.float32) * _load(dk, tok, mt, HK, hk, K, rk, mk)
        xs, rs = tl.sum(x, axis=1), tl.sum(r, axis=1)
        out = tl.cumsum(xs, axis=0, reverse=True) + carry
        carry += tl.sum(xs, axis=0)
        if EXCLUSIVE:
            out -= rs
        tl.store(dg + tok * HK + hk, out, mask=mt)


def _chunk_table(cu_seqlens: Tensor | None, batch: int, t: int, c: int) -> tuple[Tensor | None, Tensor | None, int, int]:
    """(chunk -> (sequence, chunk) table, first chunk of each sequence, chunks per sequence, total chunks).

    Without cu_seqlens every sequence has ceil(T / C) chunks and the kernels need no table."""
    if cu_seqlens is None:
        nt = triton.cdiv(t, c)
        return None, None, nt, batch * nt
    counts = (cu_seqlens[1:] - cu_seqlens[:-1] + c - 1) // c
    offsets = torch.nn.functional.pad(counts.cumsum(0), (1, 0))
    seq = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    table = torch.stack([seq, torch.arange(len(seq), device=seq.device) - offsets[seq]], 1)
    return table.to(torch.int32).contiguous(), offsets.to(torch.int32).contiguous(), 0, len(seq)


class _Launch:
    """Shapes, block sizes and the chunk table shared by the forward and backward launches."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, cu_seqlens: Tensor | None, chunk_size: int):
        self.B, self.T, self.H, self.K = q.shape
        self.HK, self.V = k.shape[2], v.shape[-1]
        self.gate = 0 if g is None else (1 if g.dim() == 3 else 2)
        self.KG = self.K if self.gate == 2 else 1
        self.C = chunk_size
        self.N = self.B if cu_seqlens is None else len(cu_seqlens) - 1
        self.cu = cu_seqlens.to(torch.int32).contiguous() if cu_seqlens is not None else None
        self.cidx, self.coff, self.NT, self.NTtot = _chunk_table(cu_seqlens, self.B, self.T, self.C)
        # key/value blocks 64 wide even for fewer channels (the masks cover the padding): with 16 or 32 Triton 3.6
        # compiled the output and dq/dk kernels for sm_90 into shared-memory reads out of bounds (compute-sanitizer;
        # an illegal address at K or V <= 32). The per-channel dq/dk kernel's 32-wide slice below ran clean.
        self.BK = self.BV = 64
        self.BKS = min(32, max(16, triton.next_power_of_2(self.K)))  # channel slice of the sub-block kernels
        # the walks over the chunks (states, their gradients, the decay's gradient): one program per tile walks a
        # sequence's chunks in order, so few long sequences (T = 32k at batch 1) take smaller tiles to fill the GPU
        self.WK, self.WV = self.BK, self.BV
        while self.WK > 16 and triton.cdiv(self.K, self.WK) * triton.cdiv(self.V, self.WV) * self.N * self.HK < WALK_PROGRAMS:
            self.WK, self.WV = self.WK // 2, max(16, self.WV // 2)
        self.varlen = cu_seqlens is not None
        # per-chunk states in the inputs' dtype for 16-bit inputs (tensor cores), fp32 otherwise
        self.state_dtype = v.dtype if v.dtype in (torch.bfloat16, torch.float16) else torch.float32
        # fp32 tiles of the dq/dk kernel pipelined in Triton's default 3 stages need 256 KB of shared memory at
        # V <= 64 compiled for sm_90 (an H100/H200 has 227 KB): one stage for them (48 KB)
        self.dqk_stages = 1 if self.state_dtype == torch.float32 else 3
        self.warps = CHUNK_WARPS
        # the dq/dk kernel with per-channel decays (it also forms the decay's gradient) spills at 64 channels a block
        self.dqk_BK = 32 if self.gate == 2 else self.BK
        self.dummy = torch.empty(1, dtype=torch.int32, device=q.device)  # pointer for unused arguments

    def seq_args(self) -> tuple[Tensor, Tensor, Tensor]:
        """cu_seqlens, the chunk table and each sequence's first chunk (placeholders without packing)."""
        return (self.cu, self.cidx, self.coff) if self.varlen else (self.dummy,) * 3

    def cumsum(self, g: Tensor) -> Tensor:
        b = torch.empty(g.shape, dtype=torch.float32, device=g.device)
        cu, cidx, _ = self.seq_args()
        _cumsum_kernel[(self.NTtot, self.HK)](
            g, b, cu, cidx, self.T, self.NT, self.HK, self.KG, self.C, triton.next_power_of_2(self.KG), self.varlen,
        )
        return b


def _check(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, initial_state: Tensor | None, chunk_size: int,
           cu_seqlens: Tensor | None) -> None:
    b, t, h, kd = q.shape
    if k.shape[:2] != (b, t) or v.shape[:3] != k.shape[:3] or k.shape[-1] != kd:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected [B,T,H,K], [B,T,Hk,K], [B,T,Hk,V]")
    if h % k.shape[2]:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({k.shape[2]})")
    if g is not None and g.shape not in (k.shape, k.shape[:3]):
        raise ValueError(f"g must be [B,T,Hk,K] {tuple(k.shape)} or [B,T,Hk] {tuple(k.shape[:3])}, got {tuple(g.shape)}")
    if chunk_size < SUB or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= {SUB}, got {chunk_size}")
    if cu_seqlens is not None and b != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {b}")
    check_initial_state(initial_state, k, v, cu_seqlens)
    n, hk, vd = b if cu_seqlens is None else len(cu_seqlens) - 1, k.shape[2], v.shape[-1]
    check_offsets("chunk_gla", q=q.numel(), k=k.numel(), v=v.numel(), output=b * t * h * vd,
                  chunk_states=(b * t // chunk_size + n) * hk * kd * vd)


def _forward(q, k, v, g, initial_state, exclusive, chunk_size, cu_seqlens, out=None, key_offset=0):
    """The launch set-up, contiguous q, k, v, the cumulative decays b, o, the final states [N,Hk,K,V]
    fp32, the per-chunk states and (per-channel decay) the intra weights."""
    L = _Launch(q, k, v, g, cu_seqlens, chunk_size)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b = L.cumsum(g.contiguous()) if g is not None else None
    cu, cidx, coff = L.seq_args()
    h = torch.empty(L.NTtot, L.HK, L.K, L.V, dtype=L.state_dtype, device=q.device)
    s_out = torch.empty(L.N, L.HK, L.K, L.V, dtype=torch.float32, device=q.device)
    s0 = initial_state.float().contiguous() if initial_state is not None else s_out
    bb = b if b is not None else q
    _state_kernel[(triton.cdiv(L.K, L.WK), triton.cdiv(L.V, L.WV), L.N * L.HK)](
        k, v, bb, h, s0, s_out, cu, coff, L.T, L.NT, L.HK, L.K, L.V, L.KG, L.C, L.WK, L.WV, L.gate,
        initial_state is not None, L.varlen, key_offset, num_warps=L.warps,
    )
    A = None
    if L.gate == 2:
        A = torch.empty(L.B, L.T, L.H, L.C, dtype=torch.float32, device=q.device)
        _intra_kernel[(L.C // SUB, L.NTtot, L.H)](
            q, k, b, A, cu, cidx, L.T, L.NT, L.H, L.HK, L.K, L.C, L.BKS, SUB, exclusive, L.varlen,
        )
    o = torch.empty(L.B, L.T, L.H, L.V, dtype=v.dtype, device=v.device) if out is None else out
    _output_kernel[(triton.cdiv(L.V, L.BV), L.NTtot, L.H)](
        q, k, v, bb, h, A if A is not None else q, o, cu, cidx, L.T, L.NT, L.H, L.HK, L.K, L.V, L.KG, L.C,
        L.BK, L.BV, L.gate, exclusive, L.varlen, key_offset, num_warps=L.warps,
    )
    return L, q, k, v, b, o, s_out, h, A


def _decay_grad(L: _Launch, q, k, dq, dk, final_state, dfinal, exclusive, dtype) -> Tensor:
    """dL/dg of a per-head decay from dq, dk (fp32): g_t enters every cumulative decay from t on, so
    dg_t = sum_{u>=t} sum_c (q_u dq_u - k_u dk_u) + sum_{c,v} S_T dS_T (q's term one token later when exclusive)."""
    fin = None if dfinal is None else (final_state * dfinal.float()).sum((-2, -1)).contiguous()  # [N, Hk]
    dg = torch.empty(q.shape[:2] + (L.HK,), dtype=dtype, device=q.device)
    cu, _, _ = L.seq_args()
    _decay_grad_kernel[(L.N * L.HK,)](
        q, k, dq, dk, fin if fin is not None else dq, dg, cu, L.T, L.H, L.HK, L.K, L.C,
        max(16, triton.next_power_of_2(L.K)), exclusive, fin is not None, L.varlen,
    )
    return dg


class ChunkGLAFunction(torch.autograd.Function):
    """Chunked (gated) linear attention on the Triton kernels; gradients for q, k, v, g and the initial state."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, exclusive: bool, chunk_size: int, cu_seqlens, key_offset: int = 0):
        L, q, k, v, b, o, s_out, h, A = _forward(q, k, v, g, initial_state, exclusive, chunk_size, cu_seqlens, key_offset=key_offset)
        ctx.save_for_backward(q, k, v, b, initial_state, h, A, s_out)
        ctx.L, ctx.exclusive, ctx.g_dtype, ctx.key_offset = L, exclusive, None if g is None else g.dtype, key_offset
        return o, s_out

    @staticmethod
    def backward(ctx, do, dstate):
        q, k, v, b, s0, h, A, s_out = ctx.saved_tensors
        L, exclusive = ctx.L, ctx.exclusive
        cu, cidx, coff = L.seq_args()
        do = do.contiguous()
        bb = b if b is not None else q
        dh = torch.empty_like(h)
        ds0 = torch.empty(L.N, L.HK, L.K, L.V, dtype=torch.float32, device=q.device)
        dsf = dstate.float().contiguous() if dstate is not None else ds0
        _dstate_kernel[(triton.cdiv(L.K, L.WK), triton.cdiv(L.V, L.WV), L.N * L.HK)](
            q, do, bb, dh, dsf, ds0, cu, coff, L.T, L.NT, L.H, L.HK, L.K, L.V, L.KG, L.C, L.WK, L.WV, L.gate,
            exclusive, dstate is not None, L.varlen, num_warps=L.warps,
        )
        lag = ctx.key_offset
        new = torch.zeros_like if lag else torch.empty_like  # the last `lag` keys reach no position: no gradient
        dv = new(v)
        _dv_kernel[(triton.cdiv(L.V, L.BV), L.NTtot, L.HK)](
            q, k, bb, A if A is not None else q, do, dh, dv, cu, cidx, L.T, L.NT, L.H, L.HK, L.K, L.V, L.KG, L.C,
            L.BK, L.BV, L.gate, exclusive, L.varlen, lag, num_warps=L.warps,
        )
        gdt = torch.float32 if L.gate == 1 else None  # the per-head decay's gradient needs dq, dk unrounded
        dq = torch.empty(q.shape, dtype=gdt or q.dtype, device=q.device)
        dk = new(k, dtype=gdt or k.dtype)
        dqi = dki = dg = None
        if L.gate == 2:  # the intra-chunk terms first: the dq/dk kernel adds them and gives dg chunk by chunk
            dA = torch.empty(L.B, L.T, L.H, L.C, dtype=torch.float32, device=q.device)
            _dA_kernel[(L.NTtot, L.H)](v, do, dA, cu, cidx, L.T, L.NT, L.H, L.HK, L.V, L.C, L.BV, L.varlen)
            dqi, dki = torch.empty(q.shape, dtype=torch.float32, device=q.device), torch.empty(k.shape, dtype=torch.float32, device=q.device)
            _intra_grad_kernel[(L.C // SUB, L.NTtot, L.HK * triton.cdiv(L.K, L.BKS))](
                q, k, b, dA, dqi, dki, cu, cidx, L.T, L.NT, L.H, L.HK, L.K, L.C, L.BKS, SUB, exclusive, L.varlen,
            )
            dg = torch.empty(k.shape, dtype=ctx.g_dtype, device=q.device)
        _dqk_kernel[(triton.cdiv(L.K, L.dqk_BK), L.NTtot, L.HK)](
            q, k, v, bb, h, do, dh, dq, dk, dqi if dqi is not None else dq, dki if dki is not None else dk,
            dg if dg is not None else dq, cu, cidx, L.T, L.NT, L.H, L.HK, L.K, L.V, L.KG, L.C, L.dqk_BK, L.BV,
            L.gate, exclusive, L.varlen, lag, num_stages=L.dqk_stages, num_warps=L.warps,
        )
        if L.gate == 1:
            dg = _decay_grad(L, q, k, dq, dk, s_out, dstate, exclusive, ctx.g_dtype)
        ds0 = ds0.to(s0.dtype) if s0 is not None else None
        return dq.to(q.dtype), dk.to(k.dtype), dv, dg, ds0, None, None, None, None


def chunk_gla_triton(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *, initial_state: Tensor | None = None,
    exclusive: bool = False, chunk_size: int = 64, cu_seqlens: Tensor | None = None, key_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """Differentiable chunked (gated) linear attention: same arguments and results as `chunk_gla_ref`.

    q [B,T,H,K], k [B,T,Hk,K], v [B,T,Hk,V]; g None, [B,T,Hk] (per head) or [B,T,Hk,K] (per channel)
    log-decays <= 0; initial_state [N,Hk,K,V]; cu_seqlens [N+1] int (B = 1) for packed sequences;
    key_offset (no decay): position t's key and value are token t - key_offset's, read in place (none before a start).
    Returns o [B,T,H,V] in v's dtype and the final states [N,Hk,K,V] fp32. On a GPU, fp32 products
    run in TF32 (Triton's default) and 16-bit inputs keep the per-chunk states in 16 bits.
    """
    _check(q, k, v, g, initial_state, chunk_size, cu_seqlens)
    if key_offset and g is not None:
        raise ValueError("key_offset needs g None (the decays would have to be offset too)")
    width = _narrow(v)
    if width:
        o, s = ChunkGLAFunction.apply(q, k, *_widen(v, initial_state, g), exclusive, chunk_size, cu_seqlens, key_offset)
        return o[..., :width], s[..., :width]
    return ChunkGLAFunction.apply(q, k, v, g, initial_state, exclusive, chunk_size, cu_seqlens, key_offset)


def chunk_gla_fwd(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *, initial_state: Tensor | None = None,
    exclusive: bool = False, chunk_size: int = 64, cu_seqlens: Tensor | None = None, out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The forward alone (no graph kept), optionally into a preallocated `out` [B,T,H,V]."""
    _check(q, k, v, g, initial_state, chunk_size, cu_seqlens)
    width = _narrow(v)
    if width:
        o, s_out = _forward(q, k, *_widen(v, initial_state, g), exclusive, chunk_size, cu_seqlens)[5:7]
        return (o[..., :width] if out is None else out.copy_(o[..., :width])), s_out[..., :width]
    o, s_out = _forward(q, k, v, g, initial_state, exclusive, chunk_size, cu_seqlens, out)[5:7]
    return o, s_out


def _narrow(v: Tensor) -> int:
    """16-bit values under 16 columns: their width (0 otherwise). On an H100 (Triton 3.6) the forward
    writes wrong outputs for bf16 values of 1 column (relative error 0.4; states and gradients right;
    fine in fp32 and from 16 columns on), so such values are zero-padded to 16 columns."""
    return v.shape[-1] if v.shape[-1] < 16 and v.dtype in (torch.bfloat16, torch.float16) else 0


def _widen(v: Tensor, initial_state: Tensor | None, g: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """v and the initial state zero-padded to 16 value columns, with g between them (argument order)."""
    pad = (0, 16 - v.shape[-1])
    return F.pad(v, pad), g, None if initial_state is None else F.pad(initial_state, pad)
