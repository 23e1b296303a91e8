"""Causal depthwise convolution over time (Mamba-2's short conv on x, B, C)."""

from .naive import causal_conv1d_ref

__all__ = ["causal_conv1d_ref"]
