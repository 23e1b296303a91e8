"""`lizard`: gated linear attention for the global part + sliding-window softmax for the local part."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PlanError
from . import register
from .gla import GLAAttention, GLAOptions


@dataclass(frozen=True)
class LizardOptions(GLAOptions):
    window: int = 64  # tokens (including the current one) under exact softmax
    sinks: int = 0  # first tokens every query's window softmax also sees (attention sinks, kept out of the linear part)
    window_init: float = 0.0  # initial logit of the window part's weight (sigmoid): 0 halves; large starts as the window alone

    def check(self) -> None:
        super().check()
        if self.window < 1 or self.sinks < 0:
            raise PlanError(f"window must be >= 1 and sinks >= 0, got window={self.window}, sinks={self.sinks}")
        if self.feature_map == "identity":
            raise PlanError("lizard shares one normalizer between its parts: use feature_map=hedgehog or elu")


@register
class LizardAttention(GLAAttention):
    """Lizard-style hybrid (Van Nguyen et al. 2025): tokens beyond the window live in a decayed
    GLA memory, the window is exact softmax, mixed per head like `lolcats`."""

    kind = "lizard"
    Options = LizardOptions

    def build(self, options: LizardOptions) -> None:
        super().build(options)
        self.window_logit = nn.Parameter(torch.full((self.mixer_heads,), float(options.window_init)))

    def mix(self, q, k, v, x, valid, state):
        fq, fk, g = self.feature_map_q(q), self.feature_map_k(k), self.gate(x)
        return self.windowed_attend(q, k, v, fq, fk, g, valid, state)
