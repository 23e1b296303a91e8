"""`hedgehog`: normalized causal linear attention with learnable Hedgehog feature maps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import PlanError
from . import register
from .base import KindOptions, LinearizedAttention
from .feature_maps import make_feature_maps


@dataclass(frozen=True)
class HedgehogOptions(KindOptions):
    feature_dim: int | None = None  # per-half size of phi; default: head_dim

    def check(self) -> None:
        super().check()
        if self.feature_dim is not None and self.feature_dim < 1:
            raise PlanError(f"feature_dim must be >= 1, got {self.feature_dim}")


@register
class HedgehogAttention(LinearizedAttention):
    """y_i = sum_j<=i phi(q_i).phi(k_j) v_j / sum_j<=i phi(q_i).phi(k_j); phi_k per KV head."""

    kind = "hedgehog"
    Options = HedgehogOptions

    def build(self, options: HedgehogOptions) -> None:
        self.feature_map_q, self.feature_map_k, self.feature_size = make_feature_maps(
            "hedgehog", self.mixer_heads, self.mixer_kv_heads, self.head_dim, options.feature_dim, self.scaling
        )

    def attention_weights(self, q: Tensor, k: Tensor) -> Tensor:
        """The causal attention matrix [B,H,T,T] this layer applies: phi(q_i).phi(k_j), rows normalized."""
        fq = self.feature_map_q(q).float()
        fk = self.feature_map_k(k).float().repeat_interleave(self.num_heads // self.num_kv_heads, 2)
        a = torch.einsum("bihf,bjhf->bhij", fq, fk).tril()
        return a / a.sum(-1, keepdim=True).clamp_min(1e-12)

    def mix(self, q, k, v, x, valid, state):
        return self.linear_attend(self.feature_map_q(q), self.feature_map_k(k), v, None, valid, state)
