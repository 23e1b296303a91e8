"""Reference: the dense parts of one decode token through a pre-norm decoder layer, each with the RMSNorm before it
and the elementwise work after it folded in (what the skinny kernels fuse; fp32 maths, one cast at the end)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dimension in fp32: x / sqrt(mean(x^2) + eps) * weight."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def rms_linear_ref(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, *, norm: Tensor | None = None, eps: float = 1e-6,
    act: str | None = None, residual: Tensor | None = None,
) -> Tensor:
    """[residual +] act(RMSNorm(x) @ W^T + b): x [M, K], W [N, K] -> [M, N]; act "swiglu" takes W as gate rows over up
    rows and returns silu(gate) * up, [M, N/2]. No norm when `norm` (its weight) is None."""
    h = rms(x, norm, eps) if norm is not None else x.float()
    y = h.to(weight.dtype).float() @ weight.float().T  # the product's input in the weights' dtype, as HF's
    if bias is not None:
        y = y + bias.float()
    if act == "swiglu":
        gate, up = y.chunk(2, -1)
        y = F.silu(gate) * up
    elif act is not None:
        raise ValueError(f"act must be None or 'swiglu', got {act!r}")
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)


def rope_tables(positions: Tensor, inv_freq: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """cos and sin [M, D/2] (fp32, times the rotary's attention scaling) of positions [M] at frequencies inv_freq [D/2],
    the angles computed as HF's rotary embedding computes them."""
    angle = positions[:, None].float() * inv_freq.float()
    return (angle.cos(), angle.sin()) if scale == 1.0 else (angle.cos() * scale, angle.sin() * scale)


def qkv_rope_ref(
    x: Tensor, weight: Tensor, bias: Tensor | None, *, norm: Tensor, eps: float, heads: tuple[int, int], cos: Tensor,
    sin: Tensor, qk_norm: Tensor | None = None, qk_eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The attention's input of one token a row: x [M, C] normed, projected by W [(H + 2 Hk) D, C] (q, k, v stacked),
    q and k normed per head by qk_norm [2, D] (Qwen3; q's weight, then k's) and rotated (HF's half-split rotary, cos/sin
    from `rope_tables`). Returns q [M,H,D], k and v [M,Hk,D] and the normed x [M, C] (what gated kinds read)."""
    h, hk = heads
    xn = rms(x, norm, eps)
    y = xn.to(weight.dtype).float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    y = y.view(x.shape[0], h + 2 * hk, -1)
    q, k, v = y.split([h, hk, hk], 1)
    if qk_norm is not None:
        q, k = rms(q, qk_norm[0], qk_eps), rms(k, qk_norm[1], qk_eps)

    def rotate(t: Tensor) -> Tensor:
        t1, t2 = t.chunk(2, -1)
        c, s = cos[:, None], sin[:, None]
        return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], -1)

    return rotate(q).to(x.dtype), rotate(k).to(x.dtype), v.to(x.dtype), xn.to(x.dtype)
