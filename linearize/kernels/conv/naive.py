"""Reference: causal depthwise conv1d over time, y_t = sum_j w[:, j] x_{t-W+1+j}, in fp32, continuing from the last
W-1 inputs of an earlier call (zeros at the start)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_conv1d_ref(x: Tensor, weight: Tensor, initial: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x [B,T,N], weight [N,W], initial [B,W-1,N] (or None: zeros) -> y [B,T,N] in x's dtype and the last W-1
    inputs [B,W-1,N] in fp32 (the state the next call continues from)."""
    b, t, n = x.shape
    width = weight.shape[1]
    past = initial.float() if initial is not None else x.new_zeros(b, width - 1, n, dtype=torch.float32)
    full = torch.cat([past, x.float()], 1)  # [B, W-1+T, N]
    if t == 1:  # a decode step: one multiply-add per tap (what a captured graph replays)
        y = (full * weight.T.float()).sum(1, keepdim=True)
    else:
        y = F.conv1d(full.transpose(1, 2), weight.float()[:, None], groups=n).transpose(1, 2)
    return y.to(x.dtype), full[:, full.shape[1] - (width - 1) :]
