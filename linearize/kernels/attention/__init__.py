"""Softmax attention of decode queries over a preallocated key/value cache (softmax heads, whole softmax layers)."""

from .naive import cached_attention_ref, visible_slots

__all__ = ["cached_attention_ref", "visible_slots"]
