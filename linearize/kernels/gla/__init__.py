"""Gated linear attention op (per-channel log-decay, or none for plain linear attention)."""

from .naive import chunk_gla_ref, gla_step_ref, recurrent_gla_ref, with_ones

__all__ = ["chunk_gla_ref", "gla_step_ref", "recurrent_gla_ref", "with_ones"]
