"""Sliding-window softmax + (gated) linear attention with one shared normalizer."""

from .naive import (
    EPS, HedgehogMaps, empty_state, hedgehog_features, hybrid_attn_ref, hybrid_step_ref, token_order,
    window_combine_ref, window_softmax_ref,
)

__all__ = [
    "EPS", "HedgehogMaps", "empty_state", "hedgehog_features", "hybrid_attn_ref", "hybrid_step_ref", "token_order",
    "window_combine_ref", "window_softmax_ref",
]
