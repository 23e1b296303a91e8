"""Errors raised for bad user input: each message names the problem and the fix."""


class LinearizeError(Exception):
    """Base class of every error linearize raises on purpose."""


class PlanError(LinearizeError, ValueError):
    """A layer plan that cannot apply: bad syntax, unknown kind or option, bad layer index."""


class UnsupportedModelError(LinearizeError, ValueError):
    """A model whose architecture linearize has no adapter for."""


class ModelLoadError(LinearizeError, OSError):
    """A model that cannot be loaded: missing file, unreadable GGUF, Hub unreachable."""


class OutputError(LinearizeError, OSError):
    """An output path that cannot or must not be written: another's folder, the input, the current folder."""


class SizeLimitError(LinearizeError, ValueError):
    """A tensor past what the Triton kernels address (32-bit offsets): split the batch or the sequence."""
