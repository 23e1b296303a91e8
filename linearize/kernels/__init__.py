"""Sequence-mixing ops of the converted layers, layout [B, T, H, D].

Each op folder holds the implementation beside its pure-PyTorch reference (`naive.py`), which
is the ground truth every faster implementation is tested against. The attention kinds call
the names exported here.
"""

from .gla import chunk_gla_ref as chunk_gla
from .gla import gla_step_ref as gla_step
from .hybrid import EPS, empty_state
from .hybrid import hybrid_attn_ref as hybrid_attn
from .hybrid import hybrid_step_ref as hybrid_step

__all__ = ["EPS", "chunk_gla", "empty_state", "gla_step", "hybrid_attn", "hybrid_step"]
