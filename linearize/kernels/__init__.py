"""Sequence-mixing ops of the converted layers, layout [B, T, H, D].

Each op folder holds its Triton kernels beside the pure-PyTorch reference (`naive.py`), which is
the ground truth every kernel is tested against (on CPU under TRITON_INTERPRET=1). The attention
kinds call the names exported here. CUDA tensors go to a Triton kernel where one exists (the
kernel tests pass on an H100 too); LINEARIZE_KERNELS=reference sends everything to the references.
"""

from __future__ import annotations

import os

from torch import Tensor

from .gla import chunk_gla_ref, gla_step_ref
from .hybrid import EPS, empty_state
from .hybrid import hybrid_attn_ref
from .hybrid import hybrid_step_ref
from .hybrid import window_combine_ref

try:  # Triton is Linux-only; without it everything runs on the references
    from .gla.chunk import chunk_linear_attn
    from .gla.fused_recurrent import gla_step_triton
    from .hybrid.fused_recurrent import hybrid_step_triton
    from .hybrid.window import window_combine
except ImportError:  # pragma: no cover - depends on the platform
    chunk_linear_attn = gla_step_triton = hybrid_step_triton = window_combine = None


def use_triton(x: Tensor) -> bool:
    """Whether `x`'s op goes to a Triton kernel."""
    return gla_step_triton is not None and x.is_cuda and os.environ.get("LINEARIZE_KERNELS", "triton") != "reference"


def chunk_gla(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *, initial_state: Tensor | None = None,
    exclusive: bool = False, chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Chunked causal (gated) linear attention (see `chunk_gla_ref`). Triton covers the no-decay case,
    forward and backward; decays use the reference."""
    if use_triton(q) and g is None:
        return chunk_linear_attn(q, k, v, initial_state=initial_state, exclusive=exclusive, chunk_size=chunk_size)
    return chunk_gla_ref(q, k, v, g, initial_state=initial_state, exclusive=exclusive, chunk_size=chunk_size)


def hybrid_attn(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, g: Tensor | None, mix: Tensor, **kw):
    """Window + linear hybrid over a sequence (see `hybrid_attn_ref`); its linear part goes through
    `chunk_gla`, so the Triton scan serves it when there is no decay, and on Triton the window part
    and the combine run in one kernel (`window_combine`)."""
    combine = window_combine if use_triton(q) else window_combine_ref
    return hybrid_attn_ref(q, k, v, fq, fk, g, mix, scan=chunk_gla, combine=combine, **kw)


def gla_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, state: Tensor) -> tuple[Tensor, Tensor]:
    """One decode step of (gated) linear attention (see `gla_step_ref`)."""
    if use_triton(q):
        return gla_step_triton(q, k, v, g, state)
    return gla_step_ref(q, k, v, g, state)


def hybrid_step(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, g: Tensor | None, mix: Tensor, **kw):
    """One decode step of the window + linear hybrid (see `hybrid_step_ref`)."""
    if use_triton(q):
        return hybrid_step_triton(q, k, v, fq, fk, g, mix, **kw)
    return hybrid_step_ref(q, k, v, fq, fk, g, mix, **kw)


__all__ = ["EPS", "chunk_gla", "empty_state", "gla_step", "hybrid_attn", "hybrid_step", "use_triton"]
