"""Reference ops: the chunked parallel forms against the token-by-token recurrences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linearize.kernels.gla.naive import chunk_gla_ref, recurrent_gla_ref
from linearize.kernels.hybrid.naive import empty_state, hybrid_attn_ref, hybrid_step_ref, linear_normalizer, token_order, window_sums

from conftest import rel_err

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _qkvg(b, t, h, hk, kd, vd, dtype, gated, seed):
    """gated: False, True (per channel) or "scalar" (one decay per head)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v = r(b, t, h, kd), r(b, t, hk, kd), r(b, t, hk, vd)
    gate = F.logsigmoid(r(b, t, hk, *([] if gated == "scalar" else [kd])) + 2) if gated else None
    return q.to(dtype), k.to(dtype), v.to(dtype), gate


@pytest.mark.parametrize("n,width,extra", [(70, 64, 63), (5, 3, 2), (64, 64, 63), (1, 1, 0), (100, 7, 6), (9, 4, 10)])
def test_window_sums_are_sums_over_each_window(n, width, extra):
    """The gated hybrids' window decays: sums of `width` consecutive log-decays, from block-local cumulative sums."""
    x = torch.randn(2, n + extra, 3, 5, dtype=torch.float64)
    expected = torch.stack([x[:, i : i + width].sum(1) for i in range(n)], 1)
    assert torch.allclose(window_sums(x, width, n), expected, rtol=0, atol=1e-12)


def test_window_sums_keep_their_digits_over_long_sequences():
    """fp32 over 32k tokens: within 1e-7 of the exact sums, where differences of one running sum lose ~100x more."""
    x = F.logsigmoid(torch.randn(1, 32768 + 63, 1, 16, generator=torch.Generator().manual_seed(0)) + 4) / 16
    exact = x.double().cumsum(1)
    exact = exact[:, 63:] - torch.cat([exact.new_zeros(1, 1, 1, 16), exact[:, :-64]], 1)
    assert (window_sums(x, 64, 32768).double() - exact).abs().max() < 1e-7


def test_linear_normalizer_is_the_memory_ones_column():
    """The undecayed normalizer as a running sum equals an exclusive scan of a ones column (GQA, a starting memory,
    and packed sequences restarting at each boundary)."""
    g = torch.Generator().manual_seed(3)
    fq, fk = torch.rand(2, 45, 4, 8, generator=g), torch.rand(2, 45, 2, 8, generator=g)
    z0 = torch.rand(2, 2, 8, generator=g)
    ones = torch.ones(2, 45, 2, 1)
    want, state = chunk_gla_ref(fq, fk, ones, initial_state=z0[..., None], exclusive=True, chunk_size=16)
    den, z = linear_normalizer(fq, fk, z0)
    assert rel_err(den, want[..., 0]) < 1e-6 and rel_err(z, state[..., 0]) < 1e-6
    cu = torch.tensor([0, 5, 30, 45])
    den, _ = linear_normalizer(fq[:1], fk[:1], None, cu[:-1].repeat_interleave(cu.diff()))  # each token's sequence start
    parts = [chunk_gla_ref(fq[:1, a:b], fk[:1, a:b], ones[:1, a:b], exclusive=True)[0] for a, b in zip(cu[:-1], cu[1:])]
    assert rel_err(den, torch.cat(parts, 1)[..., 0]) < 1e-6


@pytest.mark.parametrize("t", [1, 7, 16, 45])
@pytest.mark.parametrize("gated", [False, True, "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_gla_matches_recurrence(t, gated, dtype):
    q, k, v, g = _qkvg(2, t, 4, 2, 16, 8, dtype, gated, seed=t)
    s0 = torch.randn(2, 2, 16, 8)
    o1, s1 = chunk_gla_ref(q, k, v, g, initial_state=s0, chunk_size=16)
    o2, s2 = recurrent_gla_ref(q, k, v, g, initial_state=s0)
    assert rel_err(o1, o2) < TOL[dtype] and rel_err(s1, s2) < TOL[dtype]


@pytest.mark.parametrize("gated", [False, True, "scalar"])
def test_packed_sequences_run_each_from_its_own_state(gated):
    q, k, v, g = _qkvg(1, 30, 4, 2, 8, 4, torch.float32, gated, seed=5)
    cu = torch.tensor([0, 7, 8, 30])
    s0 = torch.randn(3, 2, 8, 4)
    o, s = chunk_gla_ref(q, k, v, g, initial_state=s0, cu_seqlens=cu, chunk_size=8)
    for n, (a, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        ref, st = recurrent_gla_ref(q[:, a:e], k[:, a:e], v[:, a:e], None if g is None else g[:, a:e], initial_state=s0[n : n + 1])
        assert rel_err(o[:, a:e], ref) < 1e-5 and rel_err(s[n : n + 1], st) < 1e-5


@pytest.mark.parametrize("gated", [False, True])
def test_exclusive_scan_is_inclusive_on_shifted_keys(gated):
    q, k, v, g = _qkvg(1, 21, 2, 1, 8, 4, torch.float32, gated, seed=3)
    s0 = torch.randn(1, 1, 8, 4)
    o, _ = chunk_gla_ref(q, k, v, g, initial_state=s0, exclusive=True, chunk_size=8)
    shift = lambda x: None if x is None else F.pad(x, (0, 0, 0, 0, 1, 0))[:, :-1]  # noqa: E731
    ref, _ = recurrent_gla_ref(q, shift(k), shift(v), shift(g), initial_state=s0)
    assert rel_err(o, ref) < 1e-5


def _hybrid_inputs(t, gated, seed, b=2, h=4, hk=2, d=8, f=12):
    q, k, v, _ = _qkvg(b, t, h, hk, d, d, torch.float32, False, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    fq, fk = torch.rand(b, t, h, f, generator=gen), torch.rand(b, t, hk, f, generator=gen)
    g = F.logsigmoid(torch.randn(b, t, hk, f, generator=gen) + 2) if gated else None
    mix = torch.rand(h, generator=gen)
    return q, k, v, fq, fk, g, mix


@pytest.mark.parametrize("t,window", [(1, 4), (13, 4), (40, 7), (9, 1), (20, 32)])
@pytest.mark.parametrize("gated", [False, True])
def test_hybrid_parallel_matches_steps(t, window, gated):
    q, k, v, fq, fk, g, mix = _hybrid_inputs(t, gated, seed=t + window)
    kw = dict(window=window, scale=0.35)
    y, final = hybrid_attn_ref(q, k, v, fq, fk, g, mix, chunk_size=8, **kw)
    state = empty_state(2, window, 2, 8, 8, 12, gated, q.device)
    ys = []
    for i in range(t):
        yi, state = hybrid_step_ref(q[:, i], k[:, i], v[:, i], fq[:, i], fk[:, i], None if g is None else g[:, i], mix, state=state, **kw)
        ys.append(yi)
    assert rel_err(y, torch.stack(ys, 1)) < 1e-5
    state = token_order(state)  # the steps leave their window ring rotated
    for name in final:
        assert torch.allclose(final[name].float(), state[name].float(), atol=1e-5), name


@pytest.mark.parametrize("gated", [False, True])
def test_hybrid_continuation_equals_one_pass(gated):
    q, k, v, fq, fk, g, mix = _hybrid_inputs(29, gated, seed=5)
    kw = dict(window=6, scale=0.35, chunk_size=8)
    y, _ = hybrid_attn_ref(q, k, v, fq, fk, g, mix, **kw)
    cut = lambda x, a, b: None if x is None else x[:, a:b]  # noqa: E731
    y1, st = hybrid_attn_ref(*(cut(x, 0, 11) for x in (q, k, v, fq, fk, g)), mix, **kw)
    y2, _ = hybrid_attn_ref(*(cut(x, 11, 29) for x in (q, k, v, fq, fk, g)), mix, state=st, **kw)
    assert rel_err(torch.cat([y1, y2], 1), y) < 1e-5


def test_hybrid_with_window_covering_everything_is_softmax_attention():
    q, k, v, fq, fk, _, mix = _hybrid_inputs(19, False, seed=9)
    y, _ = hybrid_attn_ref(q, k, v, fq, fk, None, mix, window=19, scale=0.35)
    rep = lambda x: x.repeat_interleave(2, 2).transpose(1, 2)  # noqa: E731
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), rep(k), rep(v), is_causal=True, scale=0.35).transpose(1, 2)
    assert rel_err(y, ref) < 1e-5
    y_short, _ = hybrid_attn_ref(q, k, v, fq, fk, None, mix, window=4, scale=0.35)
    assert rel_err(y_short, ref) > 1e-2  # a shorter window really mixes in the linear part


@pytest.mark.parametrize("gated", [False, True])
def test_hybrid_ignores_padding(gated):
    q, k, v, fq, fk, g, mix = _hybrid_inputs(17, gated, seed=11, b=1)
    kw = dict(window=5, scale=0.35, chunk_size=8)
    y, _ = hybrid_attn_ref(q, k, v, fq, fk, g, mix, **kw)
    pad = lambda x: None if x is None else torch.cat([torch.randn_like(x[:, :3]).abs(), x], 1)  # noqa: E731
    valid = torch.tensor([[False] * 3 + [True] * 17])
    yp, _ = hybrid_attn_ref(*(pad(x) for x in (q, k, v, fq, fk, g)), mix, valid=valid, **kw)
    assert rel_err(yp[:, 3:], y) < 1e-5


@pytest.mark.parametrize("window", [1, 2, 5])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("sinks", [0, 4])
def test_hybrid_ring_prefill_decode_prefill_equals_one_pass(window, gated, sinks):
    """Prefill 3 tokens, decode 26 (the ring wraps around many times), prefill 9 more from the rotated
    ring: outputs and final state equal one pass; the in-place steps keep every state tensor's address.
    With 4 sinks the prompt is too short to fill them: decode steps take the rest (row 1 later, padded)."""
    from linearize import kernels

    q, k, v, fq, fk, g, mix = _hybrid_inputs(38, gated, seed=window)
    valid = torch.ones(2, 38, dtype=torch.bool)
    valid[1, :2] = False  # left padding: invalid ring slots
    valid[0, [7, 20]] = False  # padded decode tokens enter neither the window nor the memory
    kw = dict(window=window, scale=0.35)
    y, final = hybrid_attn_ref(q, k, v, fq, fk, g, mix, valid=valid, chunk_size=8, sinks=sinks, **kw)
    cut = lambda x, a, b: None if x is None else x[:, a:b]  # noqa: E731
    y1, state = hybrid_attn_ref(*(cut(x, 0, 3) for x in (q, k, v, fq, fk, g)), mix, valid=valid[:, :3], chunk_size=8, sinks=sinks, **kw)
    state = {name: t.clone() for name, t in state.items()}
    ptrs = {name: t.data_ptr() for name, t in state.items()}
    ys = [y1]
    for i in range(3, 29):
        yi, new = kernels.hybrid_step(q[:, i], k[:, i], v[:, i], fq[:, i], fk[:, i], None if g is None else g[:, i], mix,
                                      valid=valid[:, i], state=state, **kw)
        assert new is state and {name: t.data_ptr() for name, t in state.items()} == ptrs
        ys.append(yi[:, None])
    assert window == 1 or int(state["pos"][0]) > 3 * (window - 1)
    y3, end = hybrid_attn_ref(*(cut(x, 29, 38) for x in (q, k, v, fq, fk, g)), mix, valid=valid[:, 29:], state=state,
                              chunk_size=8, sinks=sinks, **kw)
    assert rel_err(torch.cat(ys + [y3], 1), y) < 1e-5
    assert set(final) == set(end) and sinks == 0 or final["sink_pos"].tolist() == [[0, 1, 2, 3], [2, 3, 4, 5]]
    for name in final:
        assert torch.allclose(final[name].float(), end[name].float(), atol=1e-5), name


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("window,sinks", [(1, 0), (4, 0), (9, 0), (4, 3)])
def test_packed_hybrid_equals_separate_sequences(gated, window, sinks):
    """cu_seqlens: one packed pass gives each sequence what it gets alone (no window, memory or sinks cross)."""
    lens = [5, 30, 1, 12]
    cu = torch.tensor([0] + lens).cumsum(0)
    t, h, hk, d, f = sum(lens), 4, 2, 16, 32
    q, k, v = torch.randn(1, t, h, d), torch.randn(1, t, hk, d), torch.randn(1, t, hk, d)
    fq, fk = torch.randn(1, t, h, f).softmax(-1), torch.randn(1, t, hk, f).softmax(-1)
    g = F.logsigmoid(torch.randn(1, t, hk, f) + 2) if gated else None
    mix = torch.rand(h)
    kw = dict(window=window, scale=0.25, chunk_size=16, sinks=sinks)
    y, state = hybrid_attn_ref(q, k, v, fq, fk, g, mix, cu_seqlens=cu, **kw)
    cut = lambda x, a, e: None if x is None else x[:, a:e]  # noqa: E731
    parts = [hybrid_attn_ref(*(cut(x, a, e) for x in (q, k, v, fq, fk, g)), mix, **kw)[0] for a, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
    assert state is None and rel_err(y, torch.cat(parts, 1)) < 1e-5


def _hybrid_brute_force(q, k, v, fq, fk, mix, valid, window, sinks, scale):
    """The hybrid with sinks token by token: query i's softmax sees the real keys in (i-W, i] and the
    first `sinks` real tokens further back, under one max; its linear part every other real key <= i-W."""
    b, t, h, _ = q.shape
    rep, j = h // k.shape[2], torch.arange(t)
    y = torch.zeros(b, t, h, v.shape[-1])
    for n in range(b):
        real = valid[n]
        sink = real & (real.long().cumsum(0) <= sinks)
        for i in range(t):
            far = i - j >= window
            soft, lin = (j <= i) & ~far & real | far & sink, far & real & ~sink
            for hh in range(h):
                kv = hh // rep
                s = (k[n, :, kv] @ q[n, i, hh] * scale).masked_fill(~soft, float("-inf"))
                a, w = (s - s.max()).exp(), (fk[n, :, kv] @ fq[n, i, hh]) * lin
                num = mix[hh] * a @ v[n, :, kv] + (1 - mix[hh]) * w @ v[n, :, kv]
                y[n, i, hh] = num / (mix[hh] * a.sum() + (1 - mix[hh]) * w.sum())
    return y


@pytest.mark.parametrize("window,sinks", [(5, 3), (1, 2), (6, 40)])
def test_hybrid_sinks_match_a_brute_force_reference(window, sinks):
    """Sinks: seen by the window softmax once they left the window, never in the linear memory; left
    padding and a padded token among the sinks do not count as sinks."""
    q, k, v, fq, fk, _, mix = _hybrid_inputs(30, False, seed=3)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :3] = False
    valid[0, 1] = False
    y, _ = hybrid_attn_ref(q, k, v, fq, fk, None, mix, window=window, scale=0.4, valid=valid, sinks=sinks, chunk_size=8)
    ref = _hybrid_brute_force(q, k, v, fq, fk, mix, valid, window, sinks, 0.4)
    assert rel_err(y[valid], ref[valid]) < 1e-5
    without, _ = hybrid_attn_ref(q, k, v, fq, fk, None, mix, window=window, scale=0.4, valid=valid, chunk_size=8)
    assert rel_err(without[valid], ref[valid]) > 1e-2  # the sinks change the output
