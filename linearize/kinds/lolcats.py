"""`lolcats`: exact softmax over the last `window` tokens + Hedgehog linear attention before them."""

from __future__ import annotations

from dataclasses import dataclass

from . import register
from .base import WindowOptions
from .hedgehog import HedgehogAttention, HedgehogOptions


@dataclass(frozen=True)
class LolcatsOptions(WindowOptions, HedgehogOptions):
    pass


@register
class LolcatsAttention(HedgehogAttention):
    """LoLCATs hybrid (Zhang et al. 2024): one normalizer, per-head learnable window/linear mix."""

    kind = "lolcats"
    Options = LolcatsOptions

    def build(self, options: LolcatsOptions) -> None:
        super().build(options)
        self.build_window_mix()

    def mix(self, q, k, v, x, valid, state):
        return self.windowed_attend(q, k, v, None, valid, state)
