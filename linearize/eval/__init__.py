"""Evaluation: perplexity on text (more checks join here)."""

from .perplexity import text_perplexity

__all__ = ["text_perplexity"]
