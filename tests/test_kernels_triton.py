"""Triton kernels against their PyTorch references: on CPU under TRITON_INTERPRET=1 (set by
`make test`), or on a GPU. Fresh random inputs every run, outputs poisoned with NaN first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()):
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1 (make test sets it)", allow_module_level=True)
triton_ops = pytest.importorskip("linearize.kernels.gla.fused_recurrent")

from linearize.kernels.gla.naive import gla_step_ref  # noqa: E402

from conftest import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # bf16: rounding of inputs and of the output


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("b,h,hk,kd,vd", [(1, 4, 4, 16, 16), (2, 9, 3, 128, 64), (3, 6, 2, 64, 65)])
def test_gla_step_kernel_matches_reference(dtype, gated, b, h, hk, kd, vd):
    r = lambda *s: torch.randn(*s, device=DEVICE)  # noqa: E731  (fresh inputs, no fixed seed)
    q, k, v = r(b, h, kd).to(dtype), r(b, hk, kd).to(dtype), r(b, hk, vd).to(dtype)
    g = F.logsigmoid(r(b, hk, kd) + 2) if gated else None
    state = r(b, hk, kd, vd)
    out = torch.full((b, h, vd), float("nan"), dtype=dtype, device=DEVICE)
    out_state = torch.full_like(state, float("nan"))
    o, s = triton_ops.gla_step_triton(q, k, v, g, state, out_state=out_state, out=out)
    o_ref, s_ref = gla_step_ref(q.float(), k.float(), v.float(), g, state)
    assert o.data_ptr() == out.data_ptr() and s.data_ptr() == out_state.data_ptr()
    assert not torch.isnan(o).any() and not torch.isnan(s).any()
    assert rel_err(o, o_ref) < TOL[dtype] and rel_err(s, s_ref) < 1e-5


def test_gla_step_kernel_updates_in_place():
    q, k, v = torch.randn(1, 2, 16, device=DEVICE), torch.randn(1, 1, 16, device=DEVICE), torch.randn(1, 1, 8, device=DEVICE)
    state = torch.randn(1, 1, 16, 8, device=DEVICE)
    expected = gla_step_ref(q, k, v, None, state)[1]
    _, s = triton_ops.gla_step_triton(q, k, v, None, state, out_state=state)
    assert s.data_ptr() == state.data_ptr() and rel_err(state, expected) < 1e-6


hybrid_ops = pytest.importorskip("linearize.kernels.hybrid.fused_recurrent")
from linearize.kernels.hybrid.naive import HedgehogMaps, hedgehog_features, hybrid_attn_ref, hybrid_step_ref  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize(
    "window,prefix,steps,softcap,vd,f,sinks",
    [(1, 3, 3, None, 24, 32, 0), (5, 2, 11, None, 24, 32, 0), (8, 11, 3, 30.0, 24, 32, 0), (64, 70, 2, None, 24, 32, 0),
     (4, 6, 5, None, 130, 128, 0), (1, 1, 5, None, 24, 32, 2), (5, 2, 11, 30.0, 24, 32, 4)],
)
def test_hybrid_step_kernel_matches_reference(dtype, gated, window, prefix, steps, softcap, vd, f, sinks):
    """Prefill with the reference, then decode: the kernel updates the ring state in place (wrapping
    around for short windows; value channels in several blocks for vd=130) like the reference step;
    with sinks the prompt is shorter than them, so decode steps fill the free slots (not padded ones)."""
    b, h, hk, d = 2, 6, 2, 16
    r = lambda *s: torch.randn(*s, device=DEVICE)  # noqa: E731
    t = prefix + steps
    q, k, v = r(b, t, h, d).to(dtype), r(b, t, hk, d).to(dtype), r(b, t, hk, vd).to(dtype)
    fq, fk = r(b, t, h, f).softmax(-1).to(dtype), r(b, t, hk, f).softmax(-1).to(dtype)  # model dtype, like the window ring
    g = F.logsigmoid(r(b, t, hk, f) + 2) if gated else None
    mix = torch.rand(h, device=DEVICE)
    valid = torch.ones(b, t, dtype=torch.bool, device=DEVICE)
    valid[1, :2] = False  # a left-padded row: invalid slots in the window ring
    valid[0, prefix + 1 :: 3] = False  # padded decode tokens (they must not enter window or memory)
    cut = lambda x: None if x is None else x[:, :prefix]  # noqa: E731
    kw = dict(window=window, scale=d**-0.5, softcap=softcap)
    _, state = hybrid_attn_ref(*(cut(x) for x in (q, k, v, fq, fk, g)), mix, valid=valid[:, :prefix], sinks=sinks, **kw)
    state = {name: x.clone() for name, x in state.items()}  # compact: the kernel writes in place
    ref_state = {name: x.clone() for name, x in state.items()}
    ptrs = {name: x.data_ptr() for name, x in state.items()}
    for i in range(prefix, t):
        step = (q[:, i], k[:, i], v[:, i], fq[:, i], fk[:, i], None if g is None else g[:, i], mix)
        out = torch.full((b, h, vd), float("nan"), dtype=dtype, device=DEVICE)
        y, new = hybrid_ops.hybrid_step_triton(*step, valid=valid[:, i], state=state, out=out, **kw)
        y_ref, ref_state = hybrid_step_ref(*step, valid=valid[:, i], state=ref_state, **kw)
        assert new is state and {name: x.data_ptr() for name, x in state.items()} == ptrs
        assert y.data_ptr() == out.data_ptr() and not torch.isnan(y).any()
        assert rel_err(y, y_ref) < TOL[dtype]
        for name in ref_state:
            assert torch.allclose(state[name].float(), ref_state[name].float(), atol=1e-5), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated,window,sinks,fd", [(False, 5, 0, 16), (True, 4, 2, 16), (False, 1, 0, 12)])
def test_hybrid_step_kernel_applies_hedgehog_maps(dtype, gated, window, sinks, fd):
    """With the feature maps' weights (fmaps) the kernel forms phi(q), phi(k) itself: the same outputs and
    ring (phi(k) of the new token) as the reference given the maps, including a feature size not a power of 2; the
    window weight given as its logit in the layer's dtype (logit=True), as the layers' decode step passes it."""
    b, h, hk, d, vd, steps = 2, 6, 2, 16, 24, 9
    r = lambda *s: torch.randn(*s, device=DEVICE)  # noqa: E731
    fmaps = HedgehogMaps(r(h, d, fd).to(dtype), r(h, fd).to(dtype), r(hk, d, fd).to(dtype), r(hk, fd).to(dtype))
    q, k, v = r(b, 3 + steps, h, d).to(dtype), r(b, 3 + steps, hk, d).to(dtype), r(b, 3 + steps, hk, vd).to(dtype)
    fq, fk = hedgehog_features(q, fmaps.wq, fmaps.bq), hedgehog_features(k, fmaps.wk, fmaps.bk)
    g = F.logsigmoid(r(b, 3 + steps, hk, 2 * fd) + 2) if gated else None
    logit, kw = r(h).to(dtype), dict(window=window, scale=d**-0.5)
    valid = torch.ones(b, 3 + steps, dtype=torch.bool, device=DEVICE)
    valid[1, 5] = False
    _, state = hybrid_attn_ref(q[:, :3], k[:, :3], v[:, :3], fq[:, :3], fk[:, :3], None if g is None else g[:, :3],
                               torch.sigmoid(logit.float()), valid=valid[:, :3], sinks=sinks, **kw)
    state = {name: x.clone() for name, x in state.items()}
    ref_state = {name: x.clone() for name, x in state.items()}
    for i in range(3, 3 + steps):
        step = (q[:, i], k[:, i], v[:, i], None, None, None if g is None else g[:, i], logit)
        y, _ = hybrid_ops.hybrid_step_triton(*step, valid=valid[:, i], state=state, fmaps=fmaps, logit=True, **kw)
        y_ref, ref_state = hybrid_step_ref(*step, valid=valid[:, i], state=ref_state, fmaps=fmaps, logit=True, **kw)
        assert rel_err(y, y_ref) < TOL[dtype]
        for name in ref_state:  # phi(k) rounded to bf16 in the ring on both sides, from fp32 maps computed differently
            assert rel_err(state[name].float(), ref_state[name].float()) < TOL[dtype], name


chunk_ops = pytest.importorskip("linearize.kernels.gla.chunk")
import linearize.kernels as kernels_api  # noqa: E402
from linearize.kernels.gla.naive import chunk_gla_ref  # noqa: E402

# (T, chunk, K, V, exclusive, initial state): T below, at and across chunks; chunks of 32 and 64 have
# 2 and 4 of the per-channel kernels' 16-token sub-blocks
CHUNK_CASES = [
    (1, 16, 16, 16, False, False), (9, 16, 64, 40, False, True), (47, 16, 16, 16, True, True),
    (33, 32, 16, 24, False, False), (70, 32, 64, 40, True, True), (100, 64, 16, 16, False, True),
    (40, 16, 16, 1, True, True),  # one value column
    (70, 64, 64, 64, True, True),  # K = V = 64 in chunks of 64: the undecayed hybrids' scan at SmolLM2's head dim
]
# per-channel decays in the interpreter (its sub-block loops are slow there) run bf16 only (fp32 inputs take the same
# code: its products are fp32 either way) and skip five cases: value width 1 and K = V = 64 concern the undecayed scan,
# no initial state the state walks (both run with every decay kind on the others), and exclusive several-chunk runs
# (packed in the strong-decay test; K = 64: (9, 16, ...)). A GPU runs them all.
INTERPRETER_SKIPS_CHANNEL = {(33, 32, 16, 24), (40, 16, 16, 1), (70, 64, 64, 64), (70, 32, 64, 40), (47, 16, 16, 16)}


def _skip_slow_in_interpreter(gate: str, dtype: torch.dtype, case: tuple = ()) -> None:
    if DEVICE == "cpu" and gate == "channel" and (dtype == torch.float32 or case in INTERPRETER_SKIPS_CHANNEL):
        pytest.skip("interpreter time: the same paths run in the other cases (all of them on a GPU)")


def _decay(gate: str, b: int, t: int, hk: int, kd: int, strength: float = 1.0):
    """Log-decays <= 0: None, one per head ([B,T,Hk]) or one per channel ([B,T,Hk,K])."""
    if gate == "none":
        return None
    shape = (b, t, hk) if gate == "scalar" else (b, t, hk, kd)
    return (F.logsigmoid(torch.randn(*shape, device=DEVICE) + 2) * strength).requires_grad_()


def _tols(dtype):
    """(outputs and input gradients, decay gradient): fp32 exact on CPU, TF32 on a GPU; bf16 inputs keep
    the per-chunk states in bf16 and round the intra-chunk weights to bf16 before their products."""
    if dtype == torch.float32:
        return (1e-5, 1e-5) if DEVICE == "cpu" else (3e-3, 3e-3)
    return 2e-2, 3e-2


def _compare(dtype, gate, q, k, v, g, s0, op=None, **kw):
    """Forward (into a NaN-poisoned buffer) and gradients of q, k, v, g, s0 against the reference; `op`: through
    that function instead of the kernels' own entry points."""
    o_ref, s_ref = chunk_gla_ref(*(x.float() for x in (q, k, v)), g, initial_state=s0, **kw)
    tol, tol_g = _tols(dtype)
    if op is None:
        out = torch.full(q.shape[:3] + v.shape[-1:], float("nan"), dtype=dtype, device=DEVICE)
        o, s = chunk_ops.chunk_gla_fwd(q, k, v, g, initial_state=s0, out=out, **kw)
        assert o.data_ptr() == out.data_ptr() and not torch.isnan(o).any()
        assert rel_err(o, o_ref) < tol and rel_err(s, s_ref) < tol
    inputs = [x for x in (q, k, v, g, s0) if x is not None]
    o, s = (op or chunk_ops.chunk_gla_triton)(q, k, v, g, initial_state=s0, **kw)
    assert o.shape == o_ref.shape and rel_err(o, o_ref) < tol and rel_err(s, s_ref) < tol
    do, ds = torch.randn_like(o_ref), torch.randn_like(s_ref)
    grads = torch.autograd.grad((o.float() * do).sum() + (s * ds).sum(), inputs)
    refs = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), inputs)
    for x, got, ref in zip(inputs, grads, refs):
        assert got.dtype == x.dtype and not torch.isnan(got).any()
        err = rel_err(got, ref)
        if x is g:  # dg sums q dq - k dk, terms that can cancel (to exactly 0 at T = 1 without a state):
            kdk = k.float() * refs[1]  # its rounding error scales with them
            scale = max(ref.norm().item(), (kdk.sum(-1) if g.dim() == 3 else kdk).norm().item())
            err = (got.float() - ref).norm().item() / scale
        assert err < (tol_g if x is g else tol), (x.shape, err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate", ["none", "scalar", "channel"])
@pytest.mark.parametrize("t,chunk,kd,vd,exclusive,with_state", CHUNK_CASES)
def test_chunk_gla_kernels_match_reference(dtype, gate, t, chunk, kd, vd, exclusive, with_state):
    _skip_slow_in_interpreter(gate, dtype, (t, chunk, kd, vd))
    b, h, hk = (2 if t < 50 else 1), 6, 2  # long cases with one sequence: the interpreter is slow
    leaf = lambda *s: torch.randn(*s, device=DEVICE).to(dtype).requires_grad_()  # noqa: E731
    q, k, v = leaf(b, t, h, kd), leaf(b, t, hk, kd), leaf(b, t, hk, vd)
    s0 = torch.randn(b, hk, kd, vd, device=DEVICE).requires_grad_() if with_state else None
    _compare(dtype, gate, q, k, v, _decay(gate, b, t, hk, kd), s0, exclusive=exclusive, chunk_size=chunk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate", ["none", "scalar", "channel"])
def test_chunk_gla_kernels_packed_sequences_and_strong_decay(dtype, gate):
    """cu_seqlens: every sequence from its own state, none reading its neighbour; decays far past exp's
    range over one chunk (exp(-16 * 30) underflows to 0) stay finite."""
    _skip_slow_in_interpreter(gate, dtype)
    lens = [5, 33, 1, 20]
    cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0)
    t, h, hk, kd, vd = sum(lens), 6, 2, 32, 40
    leaf = lambda *s: torch.randn(*s, device=DEVICE).to(dtype).requires_grad_()  # noqa: E731
    q, k, v = leaf(1, t, h, kd), leaf(1, t, hk, kd), leaf(1, t, hk, vd)
    s0 = torch.randn(len(lens), hk, kd, vd, device=DEVICE).requires_grad_()
    _compare(dtype, gate, q, k, v, _decay(gate, 1, t, hk, kd, 30.0), s0, exclusive=True, chunk_size=32, cu_seqlens=cu)


@pytest.mark.skipif(DEVICE != "cuda", reason="the kernels' path of kernels.chunk_gla (CPU tensors take the reference)")
@pytest.mark.parametrize("walk_programs", [256, 1])  # walk tiles of 16 and 64
@pytest.mark.parametrize("gate,dtype,kd,vd", [(g, torch.bfloat16, kd, vd) for g in ("none", "scalar", "channel")
                                              for kd in (128, 256) for vd in (64, 128)]
                         + [(g, torch.float32, 128, 64) for g in ("none", "scalar", "channel")])
def test_chunk_gla_ones_column_at_the_kinds_shapes(gate, dtype, kd, vd, walk_programs, monkeypatch):
    """`kernels.chunk_gla(..., ones=True)`, the normalized kinds' scan, at 64-token chunks and K = 2 x feature_dim
    (several key blocks, M = 64 tensor-core products): a version carrying the ones column inside the kernels passed
    the small-shape tests and gave NaNs, wrong outputs and an illegal address here on an H100."""
    from linearize import kernels

    monkeypatch.setattr(chunk_ops, "WALK_PROGRAMS", walk_programs)
    b, t, h, hk = 2, 300, 8, 4
    leaf = lambda *s: torch.randn(*s, device=DEVICE).to(dtype).requires_grad_()  # noqa: E731
    q, k, v = leaf(b, t, h, kd), leaf(b, t, hk, kd), leaf(b, t, hk, vd)
    s0 = torch.randn(b, hk, kd, vd + 1, device=DEVICE).requires_grad_()
    _compare(dtype, gate, q, k, v, _decay(gate, b, t, hk, kd), s0, op=kernels.chunk_gla, exclusive=gate == "channel",
             ones=True)


@pytest.mark.parametrize("gate", ["scalar", "channel"])
def test_chunk_gla_walk_tiles_do_not_change_results(gate, monkeypatch):
    """The walks over the chunks take smaller tiles when too few programs would run (few long sequences): the same
    outputs and gradients with every tile size, 64 (the benchmark's short sequences) down to 16 (a test's shapes)."""
    leaf = lambda *s: torch.randn(*s, device=DEVICE).to(torch.bfloat16).requires_grad_()  # noqa: E731
    q, k, v = leaf(1, 24, 2, 64), leaf(1, 24, 1, 64), leaf(1, 24, 1, 64)
    g = _decay(gate, 1, 24, 1, 64)
    results = []
    for programs in (1, 10**9):  # tiles of 64, of 16
        monkeypatch.setattr(chunk_ops, "WALK_PROGRAMS", programs)
        assert chunk_ops._Launch(q, k, v, g, None, 16).WK == (64 if programs == 1 else 16)
        o, s = chunk_ops.chunk_gla_triton(q, k, v, g, exclusive=True, chunk_size=16)
        results.append([o, s, *torch.autograd.grad((o.float() ** 2).sum() + s.sum(), (q, k, v, g))])
    for a, b in zip(*results):
        assert rel_err(a.float(), b.float()) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,chunk,offset,exclusive,packed", [
    (70, 32, 9, True, False), (40, 16, 40, False, False),  # a lag across chunks; one as long as the sequence
    (100, 64, 63, True, False), (58, 16, 5, True, True),  # the hybrids' W-1 = 63 at chunks of 64; packed sequences
])
def test_chunk_gla_key_offset_reads_earlier_keys_in_place(dtype, t, chunk, offset, exclusive, packed):
    """key_offset: position i's key and value are token i - offset's (none before a sequence's start), read from the
    tensors as they are: outputs, final states and gradients of q, k, v and the initial state against the reference,
    which shifts copies of k and v; the last `offset` keys of each sequence get no gradient."""
    b, h, hk, kd, vd = (1 if packed else 2), 6, 2, 32, 24
    cu = torch.tensor([0, 11, 40, t], device=DEVICE) if packed else None
    leaf = lambda *s: torch.randn(*s, device=DEVICE).to(dtype).requires_grad_()  # noqa: E731
    q, k, v = leaf(b, t, h, kd), leaf(b, t, hk, kd), leaf(b, t, hk, vd)
    s0 = torch.randn(3 if packed else b, hk, kd, vd, device=DEVICE).requires_grad_()
    kw = dict(initial_state=s0, exclusive=exclusive, chunk_size=chunk, cu_seqlens=cu, key_offset=offset)
    o, s = chunk_ops.chunk_gla_triton(q, k, v, **kw)
    o_ref, s_ref = chunk_gla_ref(q.float(), k.float(), v.float(), **kw)
    tol = _tols(dtype)[0]
    assert rel_err(o, o_ref) < tol and rel_err(s, s_ref) < tol
    do, ds = torch.randn_like(o_ref), torch.randn_like(s_ref)
    grads = torch.autograd.grad((o.float() * do).sum() + (s * ds).sum(), [q, k, v, s0])
    refs = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), [q, k, v, s0])
    for x, got, ref in zip([q, k, v, s0], grads, refs):
        assert got.dtype == x.dtype and not torch.isnan(got).any() and rel_err(got, ref) < tol
    assert (grads[1][:, t - offset:] == 0).all() and (grads[2][:, t - offset:] == 0).all()
    with pytest.raises(ValueError, match="key_offset needs g None"):
        chunk_ops.chunk_gla_triton(q, k, v, F.logsigmoid(torch.randn(b, t, hk, device=DEVICE)), key_offset=offset)


def test_chunk_gla_kernel_rejects_bad_shapes():
    q, k, v = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 3, 16), torch.randn(1, 8, 3, 16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        chunk_ops.chunk_gla_triton(q, k, v)
    with pytest.raises(ValueError, match="g must be"):
        chunk_ops.chunk_gla_triton(q[:, :, :3], k, v, torch.zeros(1, 8, 3, 5))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_ops.chunk_gla_triton(q[:, :, :3], k, v, chunk_size=24)
    with pytest.raises(ValueError, match=r"initial_state must be \[N, Hk, K, V\] = \(1, 3, 16, 17\)"):
        kernels_api.chunk_gla(q[:, :, :3].to(DEVICE), k.to(DEVICE), v.to(DEVICE), ones=True,
                              initial_state=torch.zeros(1, 3, 16, 16, device=DEVICE))  # ones: V + 1 columns


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("t,window", [(7, 4), (40, 9)])
def test_hybrid_on_the_triton_scan_matches_reference_with_gradients(gated, t, window):
    b, h, hk, d, f = 2, 4, 2, 16, 32
    leaf = lambda *s: torch.randn(*s, device=DEVICE).requires_grad_()  # noqa: E731
    q, k, v = leaf(b, t, h, d), leaf(b, t, hk, d), leaf(b, t, hk, d)
    fq, fk, gl = leaf(b, t, h, f), leaf(b, t, hk, f), leaf(b, t, hk, f)
    g = (lambda: F.logsigmoid(gl + 2)) if gated else (lambda: None)  # `lizard`: a decayed linear memory
    mix = torch.rand(h, device=DEVICE)
    kw = dict(window=window, scale=0.25, chunk_size=16)
    y, st = hybrid_attn_ref(q.softmax(-1), k, v, fq.softmax(-1), fk.softmax(-1), g(), mix, scan=chunk_ops.chunk_gla_triton, **kw)
    y_ref, st_ref = hybrid_attn_ref(q.softmax(-1), k, v, fq.softmax(-1), fk.softmax(-1), g(), mix, **kw)
    dy = torch.randn_like(y)
    inputs = [q, k, v, fq, fk] + ([gl] if gated else [])
    grads = torch.autograd.grad((y * dy).sum(), inputs)
    refs = torch.autograd.grad((y_ref * dy).sum(), inputs)
    tol = 1e-5 if DEVICE == "cpu" else 3e-3
    assert rel_err(y, y_ref) < tol and rel_err(st["S"], st_ref["S"]) < tol
    assert all(rel_err(a, r) < tol for a, r in zip(grads, refs))


window_ops = pytest.importorskip("linearize.kernels.hybrid.window")
normalizer_ops = pytest.importorskip("linearize.kernels.hybrid.normalizer")
from linearize.kernels.hybrid.naive import NO_SINK, window_combine_ref, window_softmax_ref  # noqa: E402


def _tf32(x):
    """x rounded to TF32 (10 mantissa bits), the precision of a GPU's fp32 matrix products."""
    return ((x.float().view(torch.int32) + 0x1000) & -8192).view(torch.float32)


def _window_inputs(b, t, h, hk, d, vd, window, dtype, pad):
    """q and the ext tokens (W-1 context, then T new) as leaves; with `pad`, invalid slots incl. rows
    that see no valid key (the first W+2 ext tokens of batch 0) and scattered ones.

    q and k are TF32 numbers: the gradient through LoLCATs' max goes to the argmax key, so where a
    GPU's TF32 products reorder two near-equal scores it lands on another key (a jump, not a bug; seen
    as 2-4e-2 errors in q's and k's gradients on an H100 and with TF32 emulated on CPU); with
    representable q and k both sides rank the same products."""
    leaf = lambda *s: _tf32(torch.randn(*s, device=DEVICE)).to(dtype).requires_grad_()  # noqa: E731
    n = window - 1 + t
    q, ek, ev = leaf(b, t, h, d), leaf(b, n, hk, d), leaf(b, n, hk, vd)
    valid = torch.ones(b, n, dtype=torch.bool, device=DEVICE)
    if pad:
        valid[0, : window + 2] = False
        valid[-1, 3::4] = False
    return q, ek, ev, valid


def _window_err(got, ref):
    # relative to the reference's norm, or to 1 where it vanishes (W = 1: no gradient for q and k)
    return ((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1.0)).item()


@pytest.mark.parametrize(
    "window,t,d,vd,dtype,softcap,pad",
    [
        (1, 9, 16, 16, torch.float32, None, False),
        (5, 70, 16, 24, torch.bfloat16, 30.0, True),  # T across three query blocks of 32
        (64, 70, 64, 64, torch.float32, None, True),
        (64, 1, 16, 16, torch.bfloat16, None, True),
        (128, 9, 16, 40, torch.float32, 20.0, True),  # span of 159 keys, 5 chunks
        (17, 33, 64, 16, torch.float32, None, False),
    ],
)
def test_window_softmax_kernel_matches_reference_with_gradients(window, t, d, vd, dtype, softcap, pad):
    b, h, hk = 2, 6, 2
    q, ek, ev, valid = _window_inputs(b, t, h, hk, d, vd, window, dtype, pad)
    num, den = window_ops.window_softmax(q, ek, ev, valid, window, d**-0.5, softcap)
    dnum, dden = torch.randn_like(num), torch.randn_like(den)
    grads = torch.autograd.grad((num * dnum).sum() + (den * dden).sum(), [q, ek, ev])
    num_ref, den_ref = window_softmax_ref(q.float(), ek.float(), ev.float(), valid, window, d**-0.5, softcap)
    refs = torch.autograd.grad((num_ref * dnum).sum() + (den_ref * dden).sum(), [q, ek, ev])
    fp32_cpu = dtype == torch.float32 and DEVICE == "cpu"
    tol = 1e-5 if fp32_cpu else (3e-3 if dtype == torch.float32 else 1e-2)  # GPU: TF32 products
    assert num.dtype == den.dtype == torch.float32 and not torch.isnan(num).any() and not torch.isnan(den).any()
    assert rel_err(num, num_ref) < tol and rel_err(den, den_ref) < tol
    if pad:  # rows that see no valid key: 0, like the reference
        assert num[0, : min(t, 3)].abs().max() == 0 and den[0, : min(t, 3)].abs().max() == 0
    gtol = 1e-5 if fp32_cpu else (5e-3 if dtype == torch.float32 else 2e-2)  # bf16: rounding of the gradients
    for got, ref in zip(grads, refs):
        assert got.dtype == dtype and not torch.isnan(got).any()
        assert _window_err(got, ref) < gtol


@pytest.mark.parametrize(
    "dtype,softcap,columns,sinks",
    [(torch.float32, None, True, 0), (torch.bfloat16, 30.0, False, 0), (torch.float32, None, False, 3), (torch.bfloat16, 30.0, True, 3)],
)
def test_window_combine_kernel_matches_reference_with_gradients(dtype, softcap, columns, sinks):
    """The linear part as two tensors, or (columns) as column views of one [..., V+1] tensor, read in
    place; with sinks, a table of filled and empty slots seen by the later queries only."""
    b, t, h, hk, d, vd, window = 2, 21, 6, 2, 16, 24, 8
    q, ek, ev, valid = _window_inputs(b, t, h, hk, d, vd, window, dtype, pad=True)
    sink, sink_inputs = None, []
    if sinks:
        sk, sv = (_tf32(torch.randn(b, sinks + 1, hk, n, device=DEVICE)).to(dtype).requires_grad_() for n in (d, vd))
        pos = torch.tensor([[0, 1, NO_SINK, NO_SINK], [2, 3, 5, NO_SINK]], device=DEVICE)  # row 0: one slot empty
        at = 4 + torch.arange(t, device=DEVICE).expand(b, t)  # a query at p sees sinks at <= p - 8
        sink = dict(k=sk, v=sv, pos=pos, at=at, group=torch.zeros(b, t, dtype=torch.long, device=DEVICE))
        sink_inputs = [sk, sv]
    lin = torch.cat([torch.randn(b, t, h, vd, device=DEVICE), torch.rand(b, t, h, 1, device=DEVICE) * 5], -1).to(dtype)
    if columns:
        lin.requires_grad_()
        num_l, den_l = lin[..., :vd], lin[..., vd]
        lin_inputs = [lin]
    else:
        num_l, den_l = lin[..., :vd].contiguous().requires_grad_(), lin[..., vd].contiguous().requires_grad_()
        lin_inputs = [num_l, den_l]
    mix = torch.rand(h, device=DEVICE).requires_grad_()
    inputs = [q, ek, ev, *lin_inputs, mix, *sink_inputs]
    kw = dict(window=window, scale=d**-0.5, softcap=softcap, dtype=dtype, sink=sink, sinks=sinks)
    out = window_ops.window_combine(q, ek, ev, valid, num_l, den_l, mix, **kw)
    dy = torch.randn_like(out, dtype=torch.float32)
    grads = torch.autograd.grad((out.float() * dy).sum(), inputs)
    if sinks:
        kw["sink"] = {**sink, "k": sink["k"].float(), "v": sink["v"].float()}
    ref = window_combine_ref(q.float(), ek.float(), ev.float(), valid, num_l, den_l, mix, **kw)
    refs = torch.autograd.grad((ref.float() * dy).sum(), inputs)
    fp32_cpu = dtype == torch.float32 and DEVICE == "cpu"
    assert out.dtype == dtype and not torch.isnan(out).any()
    assert rel_err(out, ref) < (1e-5 if fp32_cpu else (3e-3 if dtype == torch.float32 else 1e-2))
    for got, r in zip(grads, refs):
        assert got.dtype == r.dtype and not torch.isnan(got).any()
        assert _window_err(got, r) < (1e-5 if fp32_cpu else (5e-3 if dtype == torch.float32 else 2e-2))


@pytest.mark.parametrize("t,window,softcap,sinks", [(40, 9, None, 0), (13, 4, 30.0, 0), (40, 9, None, 3), (13, 4, 30.0, 2)])  # both parts non-empty
def test_hybrid_on_the_window_kernel_matches_reference_with_gradients(t, window, softcap, sinks):
    """With sinks (in the window kernel): the first segment holds fewer real tokens than the sinks in
    one row, so the second one takes the rest; the gradients reach the sinks' tokens through both."""
    b, h, hk, d, f = 2, 6, 2, 16, 32
    leaf = lambda *s: torch.randn(*s, device=DEVICE).requires_grad_()  # noqa: E731
    q, k, v = leaf(b, t, h, d), leaf(b, t, hk, d), leaf(b, t, hk, d)
    fq, fk = leaf(b, t, h, f), leaf(b, t, hk, f)
    mix = torch.rand(h, device=DEVICE).requires_grad_()
    valid = torch.ones(b, t, dtype=torch.bool, device=DEVICE)
    cut = t // 2
    valid[1, : cut - 1] = False  # left padding, into the W-1 window tokens of the state
    kw = dict(window=window, scale=0.25, softcap=softcap, chunk_size=16, sinks=sinks)
    # a first segment gives the state (the W-1 window tokens, through which the gradients reach its
    # k and v); the second continues from it on the kernels and on the references
    args = lambda a, z: [x[:, a:z] for x in (q, k, v)] + [fq[:, a:z].softmax(-1), fk[:, a:z].softmax(-1), None, mix]  # noqa: E731
    _, state = hybrid_attn_ref(*args(0, cut), valid=valid[:, :cut], **kw)
    kernels = dict(scan=chunk_ops.chunk_gla_triton, combine=window_ops.window_combine,
                   normalizer=normalizer_ops.linear_normalizer_triton, offsets=True)
    y, st = hybrid_attn_ref(*args(cut, t), valid=valid[:, cut:], state=state, **kernels, **kw)
    y_ref, st_ref = hybrid_attn_ref(*args(cut, t), valid=valid[:, cut:], state=state, **kw)
    dy = torch.randn_like(y)
    inputs = [q, k, v, fq, fk, mix]
    grads = torch.autograd.grad((y * dy).sum(), inputs, retain_graph=True)  # the state's graph is shared
    refs = torch.autograd.grad((y_ref * dy).sum(), inputs)
    tol = 1e-5 if DEVICE == "cpu" else 5e-3
    assert rel_err(y, y_ref) < tol and rel_err(st["S"], st_ref["S"]) < tol
    assert all(_window_err(a, r) < tol for a, r in zip(grads, refs))


@pytest.mark.parametrize("t,window,sinks,pad", [(40, 9, 0, True), (5, 9, 0, False), (36, 16, 2, True)])
def test_fresh_hybrid_reads_the_new_tokens_in_place(t, window, sinks, pad):
    """With `offsets` and no state, the kernels read the new tokens W-1 positions late instead of the empty context's
    concatenation (fewer than W-1 tokens too): outputs, the state after them and the gradients equal the reference's."""
    b, h, hk, d, f = 2, 6, 2, 16, 32
    leaf = lambda *s: _tf32(torch.randn(*s, device=DEVICE)).requires_grad_()  # noqa: E731  (see _window_inputs)
    q, k, v, fq, fk = leaf(b, t, h, d), leaf(b, t, hk, d), leaf(b, t, hk, d), leaf(b, t, h, f), leaf(b, t, hk, f)
    mix = torch.rand(h, device=DEVICE).requires_grad_()
    valid = torch.ones(b, t, dtype=torch.bool, device=DEVICE)
    if pad:
        valid[1, : t // 3] = False  # left padding
    kw = dict(window=window, scale=0.25, chunk_size=16, sinks=sinks, valid=valid)
    args = lambda: (q, k, v, fq.softmax(-1), fk.softmax(-1), None, mix)  # noqa: E731
    fast = dict(scan=chunk_ops.chunk_gla_triton, combine=window_ops.window_combine,
                normalizer=normalizer_ops.linear_normalizer_triton, offsets=True)
    y, st = hybrid_attn_ref(*args(), **fast, **kw)
    y_ref, st_ref = hybrid_attn_ref(*args(), **kw)
    tol = 1e-5 if DEVICE == "cpu" else 5e-3
    assert rel_err(y, y_ref) < tol
    assert st.keys() == st_ref.keys()
    for name in st_ref:
        assert st[name].dtype == st_ref[name].dtype and rel_err(st[name].float(), st_ref[name].float()) < tol, name
    dy = torch.randn_like(y)
    # with T < W there is no linear part and mix's gradient (~1e-5, from EPS alone) is rounding on both sides
    inputs = [q, k, v, fq, fk] + ([mix] if t > window else [])
    grads = torch.autograd.grad((y * dy).sum() + st["S"].sum(), inputs)
    refs = torch.autograd.grad((y_ref * dy).sum() + st_ref["S"].sum(), inputs)
    # gradients: fp32 sums over rows in another order (mix's over every row: up to ~1e-5 either way, with or without
    # offsets); an indexing error would be O(1)
    gtol = 1e-3 if DEVICE == "cpu" else 5e-3
    assert all(_window_err(a, r) < gtol for a, r in zip(grads, refs))


@pytest.mark.skipif(DEVICE != "cuda", reason="the dispatch picks the kernels on CUDA only")
@pytest.mark.parametrize("gated", [False, True])
def test_hybrid_dispatch_on_cuda_matches_reference_at_model_shapes(gated):
    from linearize import kernels

    b, t, h, hk, d, f, window = 2, 300, 8, 4, 128, 64, 64  # head dim 128: the 8-warp configuration
    leaf = lambda *s: torch.randn(*s, device=DEVICE).to(torch.bfloat16).requires_grad_()  # noqa: E731
    q, k, v, fq, fk = leaf(b, t, h, d), leaf(b, t, hk, d), leaf(b, t, hk, d), leaf(b, t, h, f), leaf(b, t, hk, f)
    g = F.logsigmoid(torch.randn(b, t, hk, f, device=DEVICE) + 4) if gated else None
    mix = torch.rand(h, device=DEVICE).requires_grad_()
    valid = torch.ones(b, t, dtype=torch.bool, device=DEVICE)
    valid[1, :100] = False
    args = lambda: (q, k, v, fq.softmax(-1), fk.softmax(-1), g, mix)  # noqa: E731
    kw = dict(window=window, scale=d**-0.5, softcap=50.0, valid=valid)
    y, _ = kernels.hybrid_attn(*args(), **kw)
    y_ref, _ = hybrid_attn_ref(*(x.float() if x is not None and x.is_floating_point() else x for x in args()), **kw)
    dy = torch.randn_like(y_ref)
    inputs = [q, k, v, fq, fk, mix]
    grads = torch.autograd.grad((y.float() * dy).sum(), inputs)
    refs = torch.autograd.grad((y_ref * dy).sum(), inputs)
    assert y.dtype == torch.bfloat16 and rel_err(y, y_ref) < 1e-2
    assert all(_window_err(a, r) < 2e-2 for a, r in zip(grads, refs))


@pytest.mark.parametrize("gated,sinks", [(False, 0), (True, 0), (False, 2)])
def test_packed_hybrid_on_the_kernels_matches_reference_with_gradients(gated, sinks):
    """cu_seqlens: windows, linear memories and sinks stop at sequence boundaries, on the kernels as on the reference."""
    lens, h, hk, d, f = [5, 30, 1, 12], 4, 2, 16, 32
    cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0)
    t = sum(lens)
    leaf = lambda *s: _tf32(torch.randn(*s, device=DEVICE)).requires_grad_()  # noqa: E731  (see _window_inputs)
    q, k, v = leaf(1, t, h, d), leaf(1, t, hk, d), leaf(1, t, hk, d)
    fq, fk, gl = leaf(1, t, h, f), leaf(1, t, hk, f), leaf(1, t, hk, f)
    mix = torch.rand(h, device=DEVICE)
    valid = torch.ones(1, t, dtype=torch.bool, device=DEVICE)
    valid[0, 7:9] = False  # padding inside a packed sequence too
    kw = dict(window=9, scale=0.25, chunk_size=16, valid=valid, cu_seqlens=cu, sinks=sinks)
    args = lambda: (q, k, v, fq.softmax(-1), fk.softmax(-1), F.logsigmoid(gl + 2) if gated else None, mix)  # noqa: E731
    fast = dict(scan=chunk_ops.chunk_gla_triton, combine=window_ops.window_combine,
                normalizer=normalizer_ops.linear_normalizer_triton)
    y, state = hybrid_attn_ref(*args(), **fast, **kw)
    y_ref, _ = hybrid_attn_ref(*args(), **kw)
    assert state is None
    dy = torch.randn_like(y)
    inputs = [q, k, v, fq, fk] + ([gl] if gated else [])
    grads = torch.autograd.grad((y * dy).sum(), inputs)
    refs = torch.autograd.grad((y_ref * dy).sum(), inputs)
    tol = 1e-5 if DEVICE == "cpu" else 5e-3
    assert rel_err(y, y_ref) < tol
    assert all(_window_err(a, r) < tol for a, r in zip(grads, refs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,t,h,hk,f,starts", [
    (2, 150, 6, 2, 32, None),  # a partial last tile, GQA groups of 3
    (1, 64, 4, 4, 100, None),  # one tile; 100 features: two blocks, the second masked
    (1, 200, 3, 1, 16, [0, 5, 9, 70, 130, 131, 199]),  # packed: several starts in a tile, a sequence over two tiles
    (1, 300, 2, 2, 64, [0, 64, 190]),  # packed: a start on a tile's first token; the last sequence spans two tiles
])
def test_linear_normalizer_kernel_matches_reference_with_gradients(dtype, b, t, h, hk, f, starts):
    """The tiled normalizer (per-tile products, carries across tiles restarted at sequence starts) against the running
    sum in fp64, with a starting memory z0 when not packed; gradients for phi(q), phi(k), z0 through den and z."""
    from linearize.kernels.hybrid.naive import linear_normalizer

    r = lambda *s: torch.rand(*s, device=DEVICE, dtype=torch.float64)  # noqa: E731  (features are positive)
    fq, fk = r(b, t, h, f).softmax(-1), r(b, t, hk, f).softmax(-1)
    fq, fk = fq.to(dtype).double().requires_grad_(), fk.to(dtype).double().requires_grad_()  # same numbers both sides
    first = None
    z0 = None if starts is not None else (r(b, hk, f) * 3).requires_grad_()
    if starts is not None:
        lens = torch.tensor(starts[1:] + [t]) - torch.tensor(starts)
        first = torch.tensor(starts).repeat_interleave(lens).to(DEVICE)
    den, z = normalizer_ops.linear_normalizer_triton(fq.detach().to(dtype).requires_grad_(), fk.detach().to(dtype).requires_grad_(),
                                                     None if z0 is None else z0.detach().float().requires_grad_(), first)
    den_ref, z_ref = linear_normalizer(fq, fk, z0, first)
    assert den.dtype == dtype and z.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 and DEVICE == "cpu" else (3e-3 if dtype == torch.float32 else 1e-2)
    assert rel_err(den, den_ref) < tol and rel_err(z, z_ref) < (1e-5 if dtype == torch.float32 else 4e-3)
    dden, dz = torch.randn_like(den_ref), torch.randn_like(z_ref)
    leaves = [fq, fk] + ([] if z0 is None else [z0])
    refs = torch.autograd.grad((den_ref * dden).sum() + (z_ref * dz).sum(), leaves)
    mine = [x.detach().to(dtype if i < 2 else torch.float32).requires_grad_() for i, x in enumerate(leaves)]
    den, z = normalizer_ops.linear_normalizer_triton(mine[0], mine[1], mine[2] if z0 is not None else None, first)
    grads = torch.autograd.grad((den.double() * dden).sum() + (z.double() * dz).sum(), mine)
    for got, ref in zip(grads, refs):
        assert got.dtype == (dtype if got.shape != z.shape else torch.float32) and not torch.isnan(got).any()
        assert rel_err(got, ref) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,offset", [(150, 63), (40, 9), (30, 30)])
def test_linear_normalizer_kernel_key_offset(dtype, t, offset):
    """key_offset: position t's key features are token t - offset's, read in place: against the reference's shifted
    copy, with a starting memory, gradients included; the last `offset` tokens' features get none."""
    from linearize.kernels.hybrid.naive import linear_normalizer

    r = lambda *s: torch.rand(*s, device=DEVICE)  # noqa: E731
    fq, fk = r(2, t, 6, 32).softmax(-1).to(dtype).requires_grad_(), r(2, t, 2, 32).softmax(-1).to(dtype).requires_grad_()
    z0 = r(2, 2, 32).requires_grad_()
    den, z = normalizer_ops.linear_normalizer_triton(fq, fk, z0, key_offset=offset)
    den_ref, z_ref = linear_normalizer(fq.double(), fk.double(), z0.double(), key_offset=offset)
    tol = 1e-5 if dtype == torch.float32 and DEVICE == "cpu" else (3e-3 if dtype == torch.float32 else 1e-2)
    assert rel_err(den, den_ref) < tol and rel_err(z, z_ref) < tol
    dden, dz = torch.randn_like(den_ref), torch.randn_like(z_ref)
    grads = torch.autograd.grad((den.double() * dden).sum() + (z.double() * dz).sum(), [fq, fk, z0])
    refs = torch.autograd.grad((den_ref * dden).sum() + (z_ref * dz).sum(), [fq, fk, z0])
    assert all(rel_err(a, b) < tol for a, b in zip(grads, refs))
    assert (grads[1][:, t - offset:] == 0).all()


fmap_ops = pytest.importorskip("linearize.kernels.hybrid.feature_map")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,h,d,fd", [((2, 70), 3, 16, 8), ((1, 1100), 2, 64, 64), ((3,), 4, 32, 20)])
def test_hedgehog_feature_map_kernel_matches_reference_with_gradients(dtype, lead, h, d, fd):
    """The fused Hedgehog map (product, both softmaxes, one write) against the reference, with the gradients of x, W
    and b: rows across tiles and across the backward's programs, feature sizes not a power of two."""
    x = torch.randn(*lead, h, d, device=DEVICE).to(dtype)
    w, b = torch.randn(h, d, fd, device=DEVICE) * 0.3, torch.randn(h, fd, device=DEVICE) * 0.3
    leaves = [x.requires_grad_(), w.requires_grad_(), b.requires_grad_()]
    ref_leaves = [a.detach().double().requires_grad_() for a in leaves]
    tol = 2e-3 if dtype == torch.float32 and DEVICE == "cuda" else TOL[dtype]  # a GPU's fp32 products are TF32
    phi, phi_ref = fmap_ops.hedgehog_features_triton(*leaves), hedgehog_features(*ref_leaves)
    assert phi.dtype == dtype and phi.shape == phi_ref.shape and rel_err(phi, phi_ref) < tol
    dphi = torch.randn_like(phi_ref)
    grads = torch.autograd.grad((phi.double() * dphi).sum(), leaves)
    refs = torch.autograd.grad((phi_ref * dphi).sum(), ref_leaves)
    assert all(rel_err(a, r) < 2 * tol for a, r in zip(grads, refs))  # bf16: dz and W rounded for the products
    frozen = fmap_ops.hedgehog_features_triton(x.detach(), *leaves[1:])  # stage 1: no gradient for x, none computed
    # the same sums (a GPU compiles the kernel without dx differently: fp32 rounding apart)
    assert all(rel_err(a, r) < 1e-5 for a, r in zip(torch.autograd.grad((frozen.double() * dphi).sum(), leaves[1:]), grads[1:]))


conv_ops = pytest.importorskip("linearize.kernels.conv.depthwise")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,t,n,width,initial", [(2, 70, 200, 4, False), (1, 3, 130, 4, True), (3, 65, 64, 2, True),
                                                  (1, 5, 16, 1, False), (2, 1, 40, 4, True)])
def test_causal_conv1d_kernel_matches_reference_with_gradients(dtype, b, t, n, width, initial):
    """The Triton depthwise conv against the fp32 reference, output, continuation state and the gradients of x, the
    weights and the earlier call's inputs: tokens and channels across tile edges, shorter than the width, one token."""
    from linearize.kernels.conv import causal_conv1d_ref

    x = torch.randn(b, t, n, device=DEVICE).to(dtype)
    w = torch.randn(n, width, device=DEVICE)
    init = torch.randn(b, width - 1, n, device=DEVICE) if initial else None
    dy, dtail = torch.randn(b, t, n, device=DEVICE), torch.randn(b, width - 1, n, device=DEVICE)
    leaves = [x.detach().requires_grad_(), w.detach().requires_grad_()] + ([init.requires_grad_()] if initial else [])
    ref_leaves = [a.detach().double().requires_grad_() for a in leaves]
    y, tail = conv_ops.causal_conv1d_triton(*leaves, *([] if initial else [None]))
    y_ref, tail_ref = causal_conv1d_ref(*ref_leaves, *([] if initial else [None]))
    assert y.dtype == dtype and tail.dtype == torch.float32
    assert rel_err(y, y_ref) < TOL[dtype] and rel_err(tail, tail_ref) == 0
    grads = torch.autograd.grad((y.double() * dy).sum() + (tail.double() * dtail).sum(), leaves)
    refs = torch.autograd.grad((y_ref * dy).sum() + (tail_ref * dtail).sum(), ref_leaves)
    assert all(rel_err(a, r) < TOL[dtype] for a, r in zip(grads, refs))
    frozen = conv_ops.causal_conv1d_triton(x.detach(), leaves[1], None)[0]  # stage 1: no gradient for x, none computed
    y_w = conv_ops.causal_conv1d_triton(leaves[0], leaves[1], None)[0]
    assert torch.equal(*(torch.autograd.grad((z.double() * dy).sum(), leaves[1])[0] for z in (frozen, y_w)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,h,hk,d,s", [(1, 9, 3, 64, 100), (2, 4, 4, 16, 33), (3, 8, 2, 128, 300)])
@pytest.mark.parametrize("softcap,window", [(None, None), (30.0, None), (None, 17)])
def test_decode_attention_kernel_matches_reference(dtype, b, h, hk, d, s, softcap, window):
    """The split-K decode kernel against the reference: GQA groups, empty and padded slots, the query's slot
    anywhere in the cache (spans before it, after it, and cut by the sliding window), soft-capped scores."""
    from linearize.kernels.attention.decode import cached_attention_triton
    from linearize.kernels.attention.naive import cached_attention_ref

    g = torch.Generator().manual_seed(b * s + h)
    q, k, v = (torch.randn(b, t, n, d, generator=g).to(DEVICE, dtype) for t, n in ((1, h), (s, hk), (s, hk)))
    for pos in (0, s // 2, s - 1):
        valid = torch.rand(b, s, generator=g).to(DEVICE) > 0.2
        valid[:, pos] = True  # a decode step has just written its own slot
        valid[:, pos + 1 :] = False  # not written yet (garbage keys there must not count)
        slots = torch.tensor([pos], device=DEVICE)
        kw = dict(scale=d**-0.5, softcap=softcap, window=window)
        got = cached_attention_triton(q, k, v, valid, slots, **kw)
        ref = cached_attention_ref(q, k, v, valid, slots, **kw)
        assert got.dtype == dtype and rel_err(got, ref) < TOL[dtype], (pos, rel_err(got, ref))


def test_decode_attention_merges_many_spans():
    """A long cache at one KV head splits into 125 spans, merged in tiles of 32 (the last one partial); the query
    in the middle leaves the later spans with no visible slot, which must weigh nothing."""
    from linearize.kernels.attention.decode import cached_attention_triton
    from linearize.kernels.attention.naive import cached_attention_ref

    g = torch.Generator().manual_seed(7)
    b, h, hk, d, s = 1, 3, 1, 16, 4000
    q, k, v = (torch.randn(b, t, n, d, generator=g).to(DEVICE) for t, n in ((1, h), (s, hk), (s, hk)))
    valid = torch.rand(b, s, generator=g).to(DEVICE) > 0.3
    for pos in (2500, s - 1):
        valid[:, pos] = True
        slots = torch.tensor([pos], device=DEVICE)
        got = cached_attention_triton(q, k, v, valid, slots, scale=d**-0.5)
        assert rel_err(got, cached_attention_ref(q, k, v, valid, slots, scale=d**-0.5)) < TOL[torch.float32], pos


# Compiles the decode kernels for sm_90 in a process without TRITON_INTERPRET (the interpreter patches triton.language).
dense_ops = pytest.importorskip("linearize.kernels.dense.skinny")
from linearize.kernels.dense import qkv_rope_ref, rms_linear_ref, rope_tables  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 20])
def test_dense_decode_kernels_match_their_references(dtype, m):
    """The decode step's skinny products against their references (the elementwise kernels up to GEMV_ROWS rows, the
    tensor-core ones above), every epilogue: norm + bias + SiLU gate, residual, a plain product; q/k/v with bias and
    rotary, with and without Qwen3's per-head norm (a whole head a program), the normed input stored once. Inputs
    widths not multiples of the kernels' blocks; outputs poisoned with NaN first."""
    torch.manual_seed(m)  # bf16 outputs sit near the tolerance on some draws (one ulp is 0.4%): a fixed draw
    r = lambda *s: torch.randn(*s, device=DEVICE)  # noqa: E731
    c, n, h, hk, d = 72, 40, 3, 1, 32
    x, nw = r(m, c).to(dtype), (1 + r(c) / 4).to(dtype)
    w, bias, res = (r(2 * n, c) / 8).to(dtype), r(2 * n).to(dtype), r(m, n).to(dtype)
    cases = [dict(weight=w, bias=bias, norm=nw, act="swiglu"), dict(weight=w[:n], bias=None, residual=res),
             dict(weight=w[:n], bias=bias[:n], norm=nw)]
    for kw in cases:
        y = dense_ops.rms_linear_triton(x, eps=1e-5, **kw)
        assert not torch.isnan(y).any() and rel_err(y, rms_linear_ref(x, eps=1e-5, **kw)) < TOL[dtype]
    for fn in (dense_ops.rms_linear_triton, rms_linear_ref):  # an unknown epilogue is refused, not run as none
        with pytest.raises(ValueError, match="act must be None or 'swiglu', got 'gelu'"):
            fn(x, w[:n], act="gelu")
    wqkv, bqkv = (r((h + 2 * hk) * d, c) / 8).to(dtype), r((h + 2 * hk) * d).to(dtype)
    cos, sin = rope_tables(torch.arange(m, device=DEVICE) * 37 + 5, 1.0 / 1e4 ** (torch.arange(0, d, 2, device=DEVICE) / d))
    for qk_norm in (None, (1 + r(2, d) / 4).to(dtype)):
        kw = dict(norm=nw, eps=1e-5, heads=(h, hk), cos=cos, sin=sin, qk_norm=qk_norm)
        for out, ref in zip(dense_ops.qkv_rope_triton(x, wqkv, bqkv, **kw), qkv_rope_ref(x, wqkv, bqkv, **kw)):
            assert out.shape == ref.shape and rel_err(out, ref) < TOL[dtype]


SM90_DECODE = """
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from linearize.kernels.attention.decode import _merge_kernel, _span_kernel

def compile_sm90(kernel, pointers, constants):
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: pointers.get(n, "constexpr") for n in names}
    source = ASTSource(kernel, signature, {(names.index(n),): v for n, v in constants.items()})
    triton.compile(source, target=GPUTarget("cuda", 90, 32))

for scalar in ("fp32", "fp64"):
    compile_sm90(_span_kernel, {"q": "*bf16", "k": "*bf16", "v": "*bf16", "valid": "*i1", "slots": "*i64",
                                "m_out": "*fp32", "l_out": "*fp32", "acc_out": "*fp32", "scale": scalar, "cap": scalar,
                                "S": "i32"},
                 {"HK": 3, "REP": 3, "D": 64, "SPAN": 128, "NSPAN": 8, "BR": 4, "BD": 64, "BS": 32, "WINDOW": 17,
                  "HAS_CAP": True})
compile_sm90(_merge_kernel, {"m_in": "*fp32", "l_in": "*fp32", "acc_in": "*fp32", "y": "*bf16"},
             {"HK": 3, "REP": 3, "D": 64, "NSPAN": 85, "BR": 4, "BD": 64, "BN": 128, "BT": 32})
"""

SM90_NORMALIZER = SM90_DECODE.split("for scalar")[0].replace(
    "from linearize.kernels.attention.decode import _merge_kernel, _span_kernel",
    "from linearize.kernels.hybrid import normalizer as n",
) + """
ints = {s: "i32" for s in ("T", "NT", "s_qb", "s_qt", "s_qh", "s_kb", "s_kt", "s_kh")}
for packed in (False, True):
    shape = {"HK": 3, "G": 3, "F_": 64, "BF": 64, "BT": 64, "PACKED": packed, "OFF": 0 if packed else 63}
    io = {"fq": "*bf16", "fk": "*bf16", "first": "*i32", "carry": "*fp32", "rcarry": "*fp32", "den": "*fp32", "dden": "*fp32",
          "out": "*fp32", "dfq": "*bf16", "dfk": "*bf16", **ints}
    for kernel in (n._sums_kernel, n._den_kernel, n._dsums_kernel, n._bwd_kernel):
        names = set(inspect.signature(kernel.fn).parameters)
        compile_sm90(kernel, {k: v for k, v in io.items() if k in names}, {k: v for k, v in shape.items() if k in names})
"""

SM90_WINDOW = SM90_DECODE.split("for scalar")[0].replace(
    "from linearize.kernels.attention.decode import _merge_kernel, _span_kernel",
    "from linearize.kernels.hybrid import window as w",
) + """
for off in (0, 63):  # the window read from the new tokens in place (a fresh state): OFF = W-1
    for kernel in (w._window_fwd_kernel, w._window_dq_kernel, w._window_dkv_kernel):
        names = inspect.signature(kernel.fn).parameters
        types = {n: "*bf16" if n in ("q", "k", "v", "lnum", "sk", "sv", "out", "do", "dq", "dk", "dv", "dlnum") else
                 "*i32" if n in ("valid", "rarg", "at", "sbase") else "*i64" if n == "spos" else
                 "i32" if n in ("T", "L", "S", "LNS", "LDS") else "fp32" if n in ("scale", "cap") else "*fp32" for n in names}
        cfg = w._config(64, 128, 128, backward=kernel is not w._window_fwd_kernel, dtype=__import__("torch").bfloat16)
        constants = dict(H=9, HK=3, D=128, V=128, W=64, HAS_CAP=False, MIX=True, EPS_=1e-6, NS=4, BS=16, OFF=off,
                         **{k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")})
        constants = {k: v for k, v in constants.items() if k in names}
        compile_sm90(kernel, {n: t for n, t in types.items() if n not in constants}, constants)
"""

SM90_DENSE = SM90_DECODE.split("for scalar")[0].replace(
    "from linearize.kernels.attention.decode import _merge_kernel, _span_kernel",
    "from linearize.kernels.dense import skinny as s",
) + """
for scalar, ty in (("fp64", "*bf16"), ("fp32", "*fp32")):  # IEEE products for fp32 weights
    for norm, bias, swiglu, res in ((True, True, True, False), (False, False, False, True))[: 2 if ty == "*bf16" else 1]:
        compile_sm90(s._rms_linear_kernel, {**{n: ty for n in ("x", "w", "bias", "nw", "res", "y")}, "M": "i32", "N": "i32",
                     "K": "i32", "eps": scalar}, dict(BM=16, BN=16, BK=64, NORM=norm, HAS_BIAS=bias, SWIGLU=swiglu,
                     HAS_RES=res, IEEE=ty == "*fp32"))
    for qkn in (False, True)[: 2 if ty == "*bf16" else 1]:
        compile_sm90(s._qkv_rope_kernel, {**{n: ty for n in ("x", "w", "bias", "nw", "qkn", "q", "k", "v", "xn")}, "cos": "*fp32",
                     "sin": "*fp32", "M": "i32", "K": "i32", "eps": scalar, "qk_eps": scalar},
                     dict(H=9, HK=3, D=64, BH=32 if qkn else 16, BM=16, BK=64, HAS_BIAS=True, QK_NORM=qkn,
                          IEEE=ty == "*fp32"))
    for norm, bias, swiglu, res in ((True, True, True, False), (False, False, False, True)):  # one-token rows
        compile_sm90(s._rms_linear_gemv_kernel, {**{n: ty for n in ("x", "w", "bias", "nw", "res", "y")}, "M": "i32",
                     "N": "i32", "K": "i32", "eps": scalar}, dict(BN=2, BK=1024, NORM=norm, HAS_BIAS=bias, SWIGLU=swiglu,
                     HAS_RES=res))
    for qkn in (False, True):
        compile_sm90(s._qkv_rope_gemv_kernel, {**{n: ty for n in ("x", "w", "bias", "nw", "qkn", "q", "k", "v", "xn")},
                     "cos": "*fp32", "sin": "*fp32", "M": "i32", "K": "i32", "eps": scalar, "qk_eps": scalar},
                     dict(H=9, HK=3, D=64, BH=32 if qkn else 2, BK=1024, HAS_BIAS=True, QK_NORM=qkn))

from linearize.kernels.hybrid import fused_recurrent as h  # the hybrid's step, SmolLM2's shape, with and without sinks
ptrs = {n: "*bf16" for n in ("q", "k", "v", "fq", "fk", "rk", "rv", "rfk", "sk", "sv", "y")}
ptrs.update({n: "*fp32" for n in ("g", "mix", "s", "rg", "wq", "bq", "wk", "bk")})
ptrs.update(valid="*i1", rvalid="*i1", pos="*i64", tick="*i32", spos="*i64", n="*i64", scale="fp32", softcap="fp32")
for gated, ns, fmap in ((False, 4, True), (True, 0, False)):
    compile_sm90(h._hybrid_step_kernel, ptrs, dict(H=9, HK=3, P=63, D=64, F=128, V=64, NS=ns, BW=128 if ns else 64, BD=64,
                 BF=128, BV=64, BS=4 if ns else 1, HAS_G=gated, HAS_VALID=True, HAS_CAP=False, FMAP=fmap, EPS_=1e-12,
                 MIX_LOGIT=True))
"""

SM90_CONV = SM90_DECODE.split("for scalar")[0].replace(
    "from linearize.kernels.attention.decode import _merge_kernel, _span_kernel",
    "from linearize.kernels.conv import depthwise as c",
) + """
ints = {n: "i32" for n in ("T", "N", "NT", "s_xb", "s_xt", "s_ib", "s_it", "s_yb", "s_yt", "s_db", "s_dt")}
for kernel in (c._fwd_kernel, c._bwd_kernel):  # with the earlier call's inputs: the branch without them is a subset
    names = set(inspect.signature(kernel.fn).parameters)
    io = {"x": "*bf16", "w": "*fp32", "init": "*fp32", "y": "*bf16", "dy": "*bf16", "dx": "*bf16", "dw": "*fp32", **ints}
    cfg = c.FWD if kernel is c._fwd_kernel else c.BWD
    compile_sm90(kernel, {k: v for k, v in io.items() if k in names}, dict(W=4, HAS_INIT=True, BT=cfg["BT"], BN=cfg["BN"]))

from linearize.kernels.hybrid import feature_map as f
ints.update(M="i32", ROWS="i32", s_xm="i32", s_xh="i32", s_pm="i32", s_ph="i32")
for kernel, cfg in ((f._fwd_kernel, f.FWD), (f._bwd_kernel, f.BWD)):
    names = set(inspect.signature(kernel.fn).parameters)
    io = {"x": "*bf16", "w": "*fp32", "b": "*fp32", "phi": "*bf16", "dphi": "*bf16", "dx": "*bf16", "dw": "*fp32",
          "db": "*fp32", **ints}
    compile_sm90(kernel, {k: v for k, v in io.items() if k in names}, dict(D=128, FD=64, BD=128, BF=64, BM=cfg["BM"]))
"""

SM90_CHUNK_DQK = """
import inspect
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from linearize.kernels.gla.chunk import _Launch, _dqk_kernel

names = list(inspect.signature(_dqk_kernel.fn).parameters)
for dtype, ty in ((torch.float32, "*fp32"), (torch.bfloat16, "*bf16")):
    for gate in (0, 1, 2):
        x = torch.zeros(1, 64, 9, 64, dtype=dtype)
        kv = x[:, :, :3]
        L = _Launch(x, kv, kv, [None, kv[..., 0], kv][gate], None, 64)
        pointers = {n: ty for n in ("q", "k", "v", "h", "do", "dh", "dq", "dk")}
        pointers.update(b="*fp32", cu="*i32", cidx="*i32", T="i32", NT="i32", dqi="*fp32", dki="*fp32", dg="*fp32")
        constants = dict(H=9, HK=3, K=64, V=64, KG=64 if gate == 2 else 1, C=64, BK=L.dqk_BK, BV=L.BV, GATE=gate, EXCLUSIVE=True,
                         IS_VARLEN=False, LAG=63 if gate == 0 else 0)  # the hybrids' keys read W-1 = 63 positions late
        source = ASTSource(_dqk_kernel, {n: pointers.get(n, "constexpr") for n in names},
                           {(names.index(n),): v for n, v in constants.items()})
        options = {"num_stages": L.dqk_stages, "num_warps": L.warps}
        shared = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).metadata.shared
        assert shared <= 232448, (dtype, gate, shared)  # an H100/H200's shared memory per block
"""


KERNEL_RESOURCES = """
import sys
sys.path.insert(0, "benchmarks")
import torch
import kernel_resources as kr
from linearize.kernels.gla import chunk
const = dict(H=32, HK=32, K=128, V=128, KG=1, C=64, BK=64, BV=64, GATE=0, EXCLUSIVE=True, IS_VARLEN=False, LAG=0)
four, eight = (kr.resources(chunk._output_kernel, const, 90, {"num_warps": w, "num_stages": 3}) for w in (4, 8))
assert four["stack_bytes"] > 0 and eight["stack_bytes"] == 0 and eight["registers"] <= 255, (four, eight)
"""


def test_kernel_resources_reads_registers_and_spills():
    """benchmarks/kernel_resources.py's reading of a compiled kernel: the scan's output kernel spills at 4 warps and
    not at 8, compiled for sm_90 without a GPU (the scan still launches 4: at 8 it computed wrong results on the H200)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", KERNEL_RESOURCES], env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr[-3000:]


def test_kernels_compile_for_hopper():
    """Kernels through Triton's real compiler for an H100/H200 (no GPU needed): the interpreter misses type errors and
    shared-memory overflows only compilation sees. The decode kernels' float scalars as fp32 and as fp64, which is how
    Inductor passes Python floats under torch.compile (the online softmax once changed type in its loop there and
    failed only on the GPU)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for script in (SM90_DECODE, SM90_NORMALIZER, SM90_WINDOW, SM90_CHUNK_DQK, SM90_DENSE, SM90_CONV):  # the hybrid normalizer's kernels; the scan's dq/dk
        # kernel as launched within a Hopper's shared memory (fp32 at V = 64 overflowed it: found on the H200)
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]


def test_decode_attention_dispatch_and_refusals():
    from linearize import kernels
    from linearize.kernels.attention.decode import cached_attention_triton

    q, k = torch.randn(1, 2, 4, 16, device=DEVICE), torch.randn(1, 8, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="one query token"):
        cached_attention_triton(q, k, k, torch.ones(1, 8, dtype=torch.bool, device=DEVICE), torch.tensor([3, 4], device=DEVICE), scale=0.25)
    # several query tokens (a prefill into a static cache) take the reference on any device
    valid = torch.ones(1, 8, dtype=torch.bool, device=DEVICE)
    got = kernels.cached_attention(q, k, k, valid, torch.tensor([3, 4], device=DEVICE), scale=0.25)
    assert rel_err(got, kernels.cached_attention_ref(q, k, k, valid, torch.tensor([3, 4], device=DEVICE), scale=0.25)) == 0


def test_training_forward_compiles_around_the_kernels(monkeypatch):
    """torch.compile of a converted model's training forward and backward with the sequence ops on their Triton kernels
    (on CPU forced onto them, interpreted): each kernel a graph break, the glue compiled around it; logits and the
    trained parameters' gradients as the same model run eagerly."""
    import linearize
    from linearize import kernels
    from conftest import compiled_and_eager_training, perturb_new_params, tiny_model

    if DEVICE == "cpu":
        monkeypatch.setattr(kernels, "use_triton", lambda x: True)
    model = linearize.convert(tiny_model("llama"), "0:lolcats(window=4, sinks=2, softmax_heads=[1]),1:mamba2,2:softmax")
    perturb_new_params(model)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    (logits, grads), (ref, ref_grads) = compiled_and_eager_training(model.to(DEVICE), dict(backend=backend), DEVICE)
    tol = 1e-3 if DEVICE == "cuda" else 1e-4  # H200: up to 2e-4 (Inductor's fusions in fp32 beside TF32 products)
    assert rel_err(logits, ref) < 1e-5 and all(rel_err(a, b) < tol for a, b in zip(grads, ref_grads))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts the interpreter's launches (CPU tensors)")
def test_fused_decode_step_is_five_launches_a_layer(monkeypatch):
    """Issue 18's launch budget: one `fused_layers` decode step of an all-converted model runs, per layer, q/k/v with
    its norm and rotary, the kind's step, o with the residual, gate/up with the norm and SiLU, and down with the
    residual: five kernels and no other op (what else runs is per step: embedding, rotary tables, head, sampling)."""
    import copy
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    import linearize
    from conftest import tiny_model
    from linearize import GraphedDecoder, kernels
    from linearize.fusion import fuse_projections

    monkeypatch.setattr(kernels, "use_triton", lambda x: True)
    free = {"empty.memory_format", "empty_like.default", "view.default", "unsqueeze.default", "select.int", "slice.Tensor",
            "alias.default"}  # allocations and views: no kernel

    def one_step(layers: int) -> tuple[Counter, int]:
        model = copy.deepcopy(tiny_model("llama"))
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        model = fuse_projections(linearize.convert(model, "*:lolcats(window=3)"))
        decoder = GraphedDecoder(model, torch.randint(0, 100, (1, 6)), graph=False, fused_layers=True, max_new_tokens=4)
        decoder.step()  # the first step allocates what later ones reuse
        launches, ops, inside = Counter(), [0], [False]
        kernel_class = type(kernels.dense.skinny._rms_linear_gemv_kernel)
        run = kernel_class.run

        def counted(self, *a, **kw):
            launches[self.fn.__name__] += 1
            inside[0] = True
            try:
                return run(self, *a, **kw)
            finally:
                inside[0] = False

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not inside[0] and func.__name__ not in free:
                    ops[0] += 1
                return func(*args, **(kwargs or {}))

        monkeypatch.setattr(kernel_class, "run", counted)
        with Ops():
            decoder.step()
        monkeypatch.setattr(kernel_class, "run", run)
        return launches, ops[0]

    (one, ops1), (three, ops3) = one_step(1), one_step(3)
    assert three == {"_qkv_rope_gemv_kernel": 3, "_hybrid_step_kernel": 3, "_rms_linear_gemv_kernel": 3 * 3 + 1}
    assert sum(three.values()) - sum(one.values()) == 2 * 5 and ops3 == ops1  # nothing else grows with the layers


def test_kernels_refuse_tensors_past_32_bit_offsets():
    """2^31 elements or more: a one-line SizeLimitError before any launch (the kernels' offsets would wrap), checked
    on expanded views that take no memory."""
    from linearize.errors import SizeLimitError

    big = lambda *s: torch.zeros(1, device=DEVICE).expand(*s)  # noqa: E731
    t = 2**21  # x 16 heads x 64 = 2^31
    calls = {
        "chunk_gla": lambda: chunk_ops.chunk_gla_triton(big(1, t, 16, 64), big(1, t, 16, 64), big(1, t, 16, 64)),
        "window attention": lambda: window_ops.window_softmax(big(1, t, 16, 64), big(1, t + 3, 16, 64), big(1, t + 3, 16, 64),
                                                              torch.ones(1, 1, dtype=torch.bool).expand(1, t + 3), 4, 0.1),
        "linear normalizer": lambda: normalizer_ops.linear_normalizer_triton(big(1, t, 16, 64), big(1, t, 16, 64), None),
        "hedgehog features": lambda: fmap_ops.hedgehog_features_triton(big(1, t, 16, 8), torch.zeros(16, 8, 32),
                                                                       torch.zeros(16, 32)),
        "causal conv1d": lambda: conv_ops.causal_conv1d_triton(big(1, t * 16, 64), torch.zeros(64, 4)),
    }
    for op, call in calls.items():
        with pytest.raises(SizeLimitError, match=f"^{op}: .* past the 2\\^31 .*prefill_chunk"):
            call()
    chunk_ops.chunk_gla_triton(*(torch.randn(1, 8, 2, 16, device=DEVICE) for _ in range(3)))  # small: runs
