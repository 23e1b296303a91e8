"""Triton kernels against their PyTorch references: on CPU under TRITON_INTERPRET=1 (set by
`make test`), or on a GPU. Fresh random inputs every run, outputs poisoned with NaN first."""

from __future__ import annotations

import os

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
from linearize.kernels.hybrid.naive import hybrid_attn_ref, hybrid_step_ref  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize(
    "window,prefix,steps,softcap,vd,f",
    [(1, 3, 3, None, 24, 32), (5, 2, 11, None, 24, 32), (8, 11, 3, 30.0, 24, 32), (64, 70, 2, None, 24, 32), (4, 6, 5, None, 130, 128)],
)
def test_hybrid_step_kernel_matches_reference(dtype, gated, window, prefix, steps, softcap, vd, f):
    """Prefill with the reference, then decode: the kernel updates the ring state in place (wrapping
    around for short windows; value channels in several blocks for vd=130) like the reference step."""
    b, h, hk, d = 2, 6, 2, 16
    r = lambda *s: torch.randn(*s, device=DEVICE)  # noqa: E731
    t = prefix + steps
    q, k, v = r(b, t, h, d).to(dtype), r(b, t, hk, d).to(dtype), r(b, t, hk, vd).to(dtype)
    fq, fk = r(b, t, h, f).softmax(-1), r(b, t, hk, f).softmax(-1)
    g = F.logsigmoid(r(b, t, hk, f) + 2) if gated else None
    mix = torch.rand(h, device=DEVICE)
    valid = torch.ones(b, t, dtype=torch.bool, device=DEVICE)
    valid[1, :2] = False  # a left-padded row: invalid slots in the window ring
    valid[0, prefix + 1 :: 3] = False  # padded decode tokens (they must not enter window or memory)
    cut = lambda x: None if x is None else x[:, :prefix]  # noqa: E731
    kw = dict(window=window, scale=d**-0.5, softcap=softcap)
    _, state = hybrid_attn_ref(*(cut(x) for x in (q, k, v, fq, fk, g)), mix, valid=valid[:, :prefix], **kw)
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


chunk_ops = pytest.importorskip("linearize.kernels.gla.chunk")
from linearize.kernels.gla.naive import chunk_gla_ref  # noqa: E402

# (T, chunk, K, V, exclusive, initial state): T below, at and across chunks; chunks of 32 and 64 have
# 2 and 4 of the per-channel kernels' 16-token sub-blocks
CHUNK_CASES = [
    (1, 16, 16, 16, False, False), (9, 16, 64, 40, False, True), (47, 16, 16, 16, True, True),
    (33, 32, 16, 24, False, False), (70, 32, 64, 40, True, True), (100, 64, 16, 16, False, True),
]


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


def _compare(dtype, gate, q, k, v, g, s0, **kw):
    """Forward (into a NaN-poisoned buffer) and gradients of q, k, v, g, s0 against the reference."""
    out = torch.full(q.shape[:3] + v.shape[-1:], float("nan"), dtype=dtype, device=DEVICE)
    o, s = chunk_ops.chunk_gla_fwd(q, k, v, g, initial_state=s0, out=out, **kw)
    o_ref, s_ref = chunk_gla_ref(*(x.float() for x in (q, k, v)), g, initial_state=s0, **kw)
    tol, tol_g = _tols(dtype)
    assert o.data_ptr() == out.data_ptr() and not torch.isnan(o).any()
    assert rel_err(o, o_ref) < tol and rel_err(s, s_ref) < tol
    inputs = [x for x in (q, k, v, g, s0) if x is not None]
    o, s = chunk_ops.chunk_gla_triton(q, k, v, g, initial_state=s0, **kw)
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
    lens = [5, 33, 1, 20]
    cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0)
    t, h, hk, kd, vd = sum(lens), 6, 2, 64, 40
    leaf = lambda *s: torch.randn(*s, device=DEVICE).to(dtype).requires_grad_()  # noqa: E731
    q, k, v = leaf(1, t, h, kd), leaf(1, t, hk, kd), leaf(1, t, hk, vd)
    s0 = torch.randn(len(lens), hk, kd, vd, device=DEVICE).requires_grad_()
    _compare(dtype, gate, q, k, v, _decay(gate, 1, t, hk, kd, 30.0), s0, exclusive=True, chunk_size=32, cu_seqlens=cu)


def test_chunk_gla_kernel_rejects_bad_shapes():
    q, k, v = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 3, 16), torch.randn(1, 8, 3, 16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        chunk_ops.chunk_gla_triton(q, k, v)
    with pytest.raises(ValueError, match="g must be"):
        chunk_ops.chunk_gla_triton(q[:, :, :3], k, v, torch.zeros(1, 8, 3, 5))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_ops.chunk_gla_triton(q[:, :, :3], k, v, chunk_size=24)


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
