"""Triton helpers shared by the ops' kernels."""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton's CPU interpreter (3.9) multiplies 16-bit dot operands wrongly (relative error ~4e9 on a
# 16x16 product): upcast them there only, so the GPU keeps its 16-bit tensor-core products
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def dot(a, b):
    """tl.dot with fp32 accumulation; under the interpreter on fp32 copies of the operands."""
    if _INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)
