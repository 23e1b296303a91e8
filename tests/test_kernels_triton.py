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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 9, 16, 47])  # below, at and across the chunk of 16
@pytest.mark.parametrize("kd,vd", [(16, 16), (64, 40)])
@pytest.mark.parametrize("exclusive,with_state", [(False, False), (False, True), (True, True)])
def test_chunk_linear_attn_kernel_matches_reference(dtype, t, kd, vd, exclusive, with_state):
    b, h, hk = 2, 6, 2
    r = lambda *s: torch.randn(*s, device=DEVICE)  # noqa: E731
    q, k, v = r(b, t, h, kd).to(dtype), r(b, t, hk, kd).to(dtype), r(b, t, hk, vd).to(dtype)
    s0 = r(b, hk, kd, vd) if with_state else None
    out = torch.full((b, t, h, vd), float("nan"), dtype=dtype, device=DEVICE)
    o, s = chunk_ops.chunk_linear_attn_triton(q, k, v, initial_state=s0, exclusive=exclusive, chunk_size=16, out=out)
    o_ref, s_ref = chunk_gla_ref(q.float(), k.float(), v.float(), None, initial_state=s0, exclusive=exclusive)
    tol = 1e-5 if dtype == torch.float32 and DEVICE == "cpu" else (3e-3 if dtype == torch.float32 else 1e-2)
    assert o.data_ptr() == out.data_ptr() and not torch.isnan(o).any()
    assert rel_err(o, o_ref) < tol and rel_err(s, s_ref) < max(tol, 3e-3 if DEVICE == "cuda" else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 9, 16, 47])
@pytest.mark.parametrize("kd,vd", [(16, 16), (64, 40)])
@pytest.mark.parametrize("exclusive,with_state", [(False, False), (False, True), (True, True)])
def test_chunk_linear_attn_gradients_match_reference(dtype, t, kd, vd, exclusive, with_state):
    b, h, hk = 2, 6, 2
    leaf = lambda *s: torch.randn(*s, device=DEVICE).to(dtype).requires_grad_()  # noqa: E731
    q, k, v = leaf(b, t, h, kd), leaf(b, t, hk, kd), leaf(b, t, hk, vd)
    s0 = torch.randn(b, hk, kd, vd, device=DEVICE).requires_grad_() if with_state else None
    do, ds = torch.randn(b, t, h, vd, device=DEVICE), torch.randn(b, hk, kd, vd, device=DEVICE)
    inputs = [q, k, v] + ([s0] if with_state else [])
    o, s = chunk_ops.chunk_linear_attn(q, k, v, initial_state=s0, exclusive=exclusive, chunk_size=16)
    grads = torch.autograd.grad((o.float() * do).sum() + (s * ds).sum(), inputs)
    o_ref, s_ref = chunk_gla_ref(*(x.float() for x in (q, k, v)), None, initial_state=s0, exclusive=exclusive)
    refs = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), inputs)
    tol = 1e-5 if dtype == torch.float32 and DEVICE == "cpu" else (3e-3 if dtype == torch.float32 else 2e-2)
    for got, ref in zip(grads, refs):
        assert got.dtype == ref.dtype and not torch.isnan(got).any()
        assert rel_err(got, ref) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 9, 16, 47])  # below, at and across the kernel's chunk of 16
@pytest.mark.parametrize("kd,vd", [(16, 16), (64, 40)])
@pytest.mark.parametrize("exclusive,with_state", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("decay", ["channel", "scalar", "strong"])
def test_chunk_gla_forward_kernel_matches_reference(dtype, t, kd, vd, exclusive, with_state, decay):
    b, h, hk = 2, 6, 2
    r = lambda *s: torch.randn(*s, device=DEVICE)  # noqa: E731
    q, k, v = r(b, t, h, kd).to(dtype), r(b, t, hk, kd).to(dtype), r(b, t, hk, vd).to(dtype)
    if decay == "scalar":  # one decay per head and token (the mamba2 case), broadcast over channels
        g = F.logsigmoid(r(b, t, hk, 1) + 3).expand(b, t, hk, kd)
    else:  # "strong": decays far past exp's range over one chunk (exp(-16 * 30) underflows to 0)
        g = F.logsigmoid(r(b, t, hk, kd) + 2) * (30 if decay == "strong" else 1)
    s0 = r(b, hk, kd, vd) if with_state else None
    out = torch.full((b, t, h, vd), float("nan"), dtype=dtype, device=DEVICE)
    o, s = chunk_ops.chunk_linear_attn_triton(q, k, v, g=g, initial_state=s0, exclusive=exclusive, out=out)
    o_ref, s_ref = chunk_gla_ref(q.float(), k.float(), v.float(), g, initial_state=s0, exclusive=exclusive)
    tol = 1e-5 if dtype == torch.float32 and DEVICE == "cpu" else (3e-3 if dtype == torch.float32 else 1e-2)
    assert o.data_ptr() == out.data_ptr() and not torch.isnan(o).any()
    assert rel_err(o, o_ref) < tol and rel_err(s, s_ref) < max(tol, 3e-3 if DEVICE == "cuda" else 1e-5)


def _triton_scan(q, k, v, g, *, initial_state=None, exclusive=False, chunk_size=64):
    assert g is None
    return chunk_ops.chunk_linear_attn(q, k, v, initial_state=initial_state, exclusive=exclusive, chunk_size=16)


@pytest.mark.parametrize("t,window", [(7, 4), (40, 9)])
def test_hybrid_on_the_triton_scan_matches_reference_with_gradients(t, window):
    b, h, hk, d, f = 2, 4, 2, 16, 32
    leaf = lambda *s: torch.randn(*s, device=DEVICE).requires_grad_()  # noqa: E731
    q, k, v = leaf(b, t, h, d), leaf(b, t, hk, d), leaf(b, t, hk, d)
    fq, fk = leaf(b, t, h, f), leaf(b, t, hk, f)
    mix = torch.rand(h, device=DEVICE)
    kw = dict(window=window, scale=0.25, chunk_size=16)
    y, st = hybrid_attn_ref(q.softmax(-1), k, v, fq.softmax(-1), fk.softmax(-1), None, mix, scan=_triton_scan, **kw)
    y_ref, st_ref = hybrid_attn_ref(q.softmax(-1), k, v, fq.softmax(-1), fk.softmax(-1), None, mix, **kw)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad((y * dy).sum(), [q, k, v, fq, fk])
    refs = torch.autograd.grad((y_ref * dy).sum(), [q, k, v, fq, fk])
    tol = 1e-5 if DEVICE == "cpu" else 3e-3
    assert rel_err(y, y_ref) < tol and rel_err(st["S"], st_ref["S"]) < tol
    assert all(rel_err(a, r) < tol for a, r in zip(grads, refs))
