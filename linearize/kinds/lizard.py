"""`lizard`: gated linear attention for the global part + sliding-window softmax for the local part."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PlanError
from . import register
from .base import WindowOptions
from .gla import GLAAttention, GLAOptions


@dataclass(frozen=True)
class LizardOptions(WindowOptions, GLAOptions):
    def check(self) -> None:
        super().check()
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
        self.build_window_mix()

    def mix(self, q, k, v, x, valid, state):
        return self.windowed_attend(q, k, v, self.gate(x), valid, state)
