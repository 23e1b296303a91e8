"""Triton helpers shared by the ops' kernels."""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ..errors import SizeLimitError

# Triton's CPU interpreter (3.9) multiplies 16-bit dot operands wrongly (relative error ~4e9 on a
# 16x16 product): upcast them there only, so the GPU keeps its 16-bit tensor-core products
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def dot(a, b):
    """tl.dot with fp32 accumulation; under the interpreter on fp32 copies of the operands."""
    if _INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


def check_offsets(op: str, **numels: int) -> None:
    """The kernels address their tensors with 32-bit offsets: a one-line error (not a wrong result or a crash) for a
    tensor of 2^31 elements or more, naming the ways to split the work."""
    for name, n in numels.items():
        if n >= 2**31:
            raise SizeLimitError(
                f"{op}: {name} would have {n:,} elements, past the 2^31 its Triton kernels address; split the work: "
                "a smaller batch or shorter rows, or generate(..., prefill_chunk=N) for a long prompt")
