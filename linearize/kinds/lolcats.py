"""`lolcats`: exact softmax over the last `window` tokens + Hedgehog linear attention before them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PlanError
from . import register
from .hedgehog import HedgehogAttention, HedgehogOptions


@dataclass(frozen=True)
class LolcatsOptions(HedgehogOptions):
    window: int = 64  # tokens (including the current one) under exact softmax
    sinks: int = 0  # first tokens every query's window softmax also sees (attention sinks, kept out of the linear part)
    window_init: float = 0.0  # initial logit of the window part's weight (sigmoid): 0 halves; large starts as the window alone

    def check(self) -> None:
        super().check()
        if self.window < 1 or self.sinks < 0:
            raise PlanError(f"window must be >= 1 and sinks >= 0, got window={self.window}, sinks={self.sinks}")


@register
class LolcatsAttention(HedgehogAttention):
    """LoLCATs hybrid (Zhang et al. 2024): one normalizer, per-head learnable window/linear mix."""

    kind = "lolcats"
    Options = LolcatsOptions

    def build(self, options: LolcatsOptions) -> None:
        super().build(options)
        self.window_logit = nn.Parameter(torch.full((self.mixer_heads,), float(options.window_init)))  # sigmoid: weight of the window part

    def mix(self, q, k, v, x, valid, state):
        fq, fk = self.feature_map_q(q), self.feature_map_k(k)
        return self.windowed_attend(q, k, v, fq, fk, None, valid, state)
