"""Reference: exact softmax attention of T queries over a static key/value cache of S slots."""

from __future__ import annotations

import torch
from torch import Tensor


def visible_slots(slots: Tensor, keys: int, window: int | None = None) -> Tensor:
    """[T, keys] bool: which cache slots the queries at `slots` [T] see, causally and, with `window`, within the
    sliding window as HF masks it (key slot > query slot - window)."""
    j = torch.arange(keys, device=slots.device)[None, :]
    seen = j <= slots[:, None]
    return seen & (j > slots[:, None] - window) if window else seen


def cached_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, valid: Tensor, slots: Tensor, *, scale: float, softcap: float | None = None,
    window: int | None = None,
) -> Tensor:
    """q [B,T,H,D] at cache slots `slots` [T] over k/v [B,S,Hk,D] whose slots hold a key where `valid` [B,S] (bool):
    each query sees the valid slots at or before its own and, with `window`, after its slot - window (HF's sliding
    window); scores scaled, soft-capped to softcap * tanh(s / softcap); fp32 maths, output in v's dtype. A query that
    may see no slot sees all of them (a padding row: finite output), as the layers' masked attention does."""
    rep = q.shape[2] // k.shape[2]
    mask = visible_slots(slots, k.shape[1], window)[None] & valid[:, None, :]  # [B,T,S]
    mask = (mask | ~mask.any(-1, keepdim=True))[:, None]  # [B,1,T,S]
    kh, vh = (x.transpose(1, 2).repeat_interleave(rep, 1).float() for x in (k, v))
    s = torch.einsum("bhtd,bhsd->bhts", q.transpose(1, 2).float(), kh) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    w = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    return torch.einsum("bhts,bhsd->bhtd", w, vh).transpose(1, 2).to(v.dtype)
