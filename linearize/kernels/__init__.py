"""Sequence-mixing ops of the converted layers, layout [B, T, H, D].

Each op folder holds its Triton kernels beside the pure-PyTorch reference (`naive.py`), which is
the ground truth every kernel is tested against (on CPU under TRITON_INTERPRET=1). The attention
kinds call the names exported here. CUDA tensors go to a Triton kernel where one exists (the
kernel tests pass on an H100 too); LINEARIZE_KERNELS=reference sends everything to the references.
The decode steps update their state in place on either path, so a captured CUDA graph replays them.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .attention import cached_attention_ref
from .conv import causal_conv1d_ref
from .dense import qkv_rope_ref, rms_linear_ref, rope_tables
from .gla import chunk_gla_ref, gla_step_ref, with_ones
from .hybrid import EPS, empty_state
from .hybrid import hedgehog_features as hedgehog_features_ref
from .hybrid import hybrid_attn_ref
from .hybrid import hybrid_step_ref

try:  # Triton is Linux-only; without it everything runs on the references
    from .attention.decode import cached_attention_triton
    from .conv.depthwise import causal_conv1d_triton
    from .dense.skinny import qkv_rope_triton, rms_linear_triton
    from .gla.chunk import chunk_gla_triton
    from .gla.fused_recurrent import gla_step_triton
    from .hybrid.feature_map import hedgehog_features_triton
    from .hybrid.fused_recurrent import hybrid_step_triton
    from .hybrid.normalizer import linear_normalizer_triton
    from .hybrid.window import window_combine
except ImportError:  # pragma: no cover - depends on the platform
    cached_attention_triton = causal_conv1d_triton = chunk_gla_triton = gla_step_triton = hybrid_step_triton = window_combine = None
    hedgehog_features_triton = linear_normalizer_triton = qkv_rope_triton = rms_linear_triton = None

# The sequence ops' Triton kernels are opaque to torch.compile: a graph break each, their glue compiled around them
# (whether Dynamo can trace a Triton launch inside an autograd Function depends on the torch/Triton pair; torch 2.13 with
# Triton 3.9 cannot). The decode steps' kernels stay traceable: the compiled decode step holds them in one graph.
causal_conv1d_triton, chunk_gla_triton, hedgehog_features_triton, linear_normalizer_triton, window_combine = (
    fn and torch.compiler.disable(fn)
    for fn in (causal_conv1d_triton, chunk_gla_triton, hedgehog_features_triton, linear_normalizer_triton, window_combine))


def use_triton(x: Tensor) -> bool:
    """Whether `x`'s op goes to a Triton kernel."""
    return gla_step_triton is not None and x.is_cuda and os.environ.get("LINEARIZE_KERNELS", "triton") != "reference"


def chunk_gla(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *, initial_state: Tensor | None = None,
    exclusive: bool = False, chunk_size: int = 64, cu_seqlens: Tensor | None = None, key_offset: int = 0,
    ones: bool = False,
) -> tuple[Tensor, Tensor]:
    """Chunked causal (gated) linear attention (see `chunk_gla_ref`; g None, per head or per channel; `ones`: v with a
    ones column, the normalizer), forward and backward on the Triton kernels for CUDA tensors. The kernels take the
    ones column written out (carried inside them, as a tail of their tensor-core products, it failed on an H100)."""
    kw = dict(initial_state=initial_state, exclusive=exclusive, chunk_size=chunk_size, cu_seqlens=cu_seqlens, key_offset=key_offset)
    if use_triton(q):
        return chunk_gla_triton(q, k, with_ones(v) if ones else v, g, **kw)
    return chunk_gla_ref(q, k, v, g, ones=ones, **kw)


def hybrid_attn(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, g: Tensor | None, mix: Tensor, **kw):
    """Window + linear hybrid over a sequence (see `hybrid_attn_ref`); its linear part goes through
    `chunk_gla` and, on CUDA, its normalizer (undecayed) through `linear_normalizer_triton`, the window part (with its
    sinks) and the combine in one kernel (`window_combine`), all on q's dtype (16-bit operands, fp32 accumulation)
    where the references work in fp32."""
    fast = {"combine": window_combine, "normalizer": linear_normalizer_triton, "compute_dtype": None, "offsets": True}
    fast = fast if use_triton(q) else {}
    return hybrid_attn_ref(q, k, v, fq, fk, g, mix, scan=chunk_gla, **fast, **kw)


def cached_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, slots: Tensor, **kw) -> Tensor:
    """Softmax attention over a static key/value cache (see `cached_attention_ref`): a decode token on CUDA goes to
    the split-K kernel (its own slot is valid: the step has just written it), anything else to the reference."""
    fn = cached_attention_triton if use_triton(q) and q.shape[1] == 1 else cached_attention_ref
    return fn(q, k, v, valid, slots, **kw)


def gla_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, state: Tensor) -> tuple[Tensor, Tensor]:
    """One decode step of (gated) linear attention (see `gla_step_ref`; g None, per head or per channel);
    updates `state` in place and returns it."""
    if use_triton(q):
        if g is not None and g.dim() == 2:  # the kernel reads a decay per channel
            g = g[..., None].expand_as(k).contiguous()
        return gla_step_triton(q, k, v, g, state, out_state=state)
    o, new = gla_step_ref(q, k, v, g, state)
    return o, state.copy_(new.detach())


def hybrid_step(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, g: Tensor | None, mix: Tensor, *, state: dict[str, Tensor], **kw
) -> tuple[Tensor, dict[str, Tensor]]:
    """One decode step of the window + linear hybrid (see `hybrid_step_ref`); updates `state` in place and returns it."""
    if use_triton(q):
        return hybrid_step_triton(q, k, v, fq, fk, g, mix, state=state, **kw)
    y, new = hybrid_step_ref(q, k, v, fq, fk, g, mix, state=state, **kw)
    for name, t in new.items():
        state[name].copy_(t.detach())
    return y, state


def causal_conv1d(x: Tensor, weight: Tensor, initial: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv1d over time (see `causal_conv1d_ref`): y in x's dtype and the last W-1 inputs (fp32); a
    sequence on CUDA goes to the Triton kernels, a decode token to the reference's few elementwise ops (which Inductor
    fuses into the compiled step)."""
    fn = causal_conv1d_triton if use_triton(x) and x.shape[1] > 1 else causal_conv1d_ref
    return fn(x, weight, initial)


def hedgehog_features(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Hedgehog's feature map per head (see `hedgehog_features_ref`); a sequence x [B,T,H,D] on CUDA goes to the Triton
    kernels (phi in x's dtype), a decode token to the reference (fused into the compiled step)."""
    fn = hedgehog_features_triton if use_triton(x) and x.dim() == 4 and x.shape[1] > 1 else hedgehog_features_ref
    return fn(x, weight, bias)


def rms_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, **kw) -> Tensor:
    """A few rows' [residual +] act(RMSNorm(x) W^T + b) (see `rms_linear_ref`), one launch on CUDA."""
    return (rms_linear_triton if use_triton(x) else rms_linear_ref)(x, weight, bias, **kw)


def qkv_rope(x: Tensor, weight: Tensor, bias: Tensor | None, **kw) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One token a row's normed, projected, q/k-normed and rotated q, k, v and normed input (see `qkv_rope_ref`),
    one launch on CUDA."""
    return (qkv_rope_triton if use_triton(x) else qkv_rope_ref)(x, weight, bias, **kw)


__all__ = ["EPS", "causal_conv1d", "chunk_gla", "empty_state", "gla_step", "hedgehog_features", "hybrid_attn", "hybrid_step", "qkv_rope", "rms_linear", "rope_tables", "use_triton"]
