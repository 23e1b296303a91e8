"""Dense parts of a decode step (RMSNorm + projection + epilogue) for a few rows: fewer launches per token."""

from .naive import qkv_rope_ref, rms_linear_ref, rope_tables

__all__ = ["qkv_rope_ref", "rms_linear_ref", "rope_tables"]
