"""`streaming`: exact softmax over a few attention-sink tokens plus the last `window` tokens, no new
parameters (StreamingLLM, Xiao et al. 2024). The training-free baseline of head-level hybrids: heads
that do not keep softmax see only the sinks and their neighbourhood.

Sinks are the first `sinks` real (non-padding) tokens of each sequence. The cache holds them and the
last window - 1 tokens (with their absolute positions), so its size does not grow with the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import PlanError
from . import register
from .base import KindOptions, LinearizedAttention


@dataclass(frozen=True)
class StreamingOptions(KindOptions):
    window: int = 64  # tokens (including the current one) a query sees besides the sinks
    sinks: int = 4  # first tokens every query sees

    def check(self) -> None:
        super().check()
        if self.window < 1 or self.sinks < 0:
            raise PlanError(f"streaming needs window >= 1 and sinks >= 0, got window={self.window}, sinks={self.sinks}")


@register
class StreamingAttention(LinearizedAttention):
    """Softmax over sink tokens + a sliding window; the state is a fixed set of cached keys/values."""

    kind = "streaming"
    Options = StreamingOptions

    def build(self, options: StreamingOptions) -> None:
        pass

    def empty_state(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        b, hk, d, dev = k.shape[0], k.shape[2], k.shape[3], k.device
        out = {"t": torch.zeros(1, dtype=torch.long, device=dev)}
        for name, n in (("sink", self.options.sinks), ("win", self.options.window - 1)):
            out[f"{name}_k"], out[f"{name}_v"] = k.new_zeros(b, n, hk, d), v.new_zeros(b, n, hk, v.shape[-1])
            out[f"{name}_pos"] = torch.zeros(b, n, dtype=torch.long, device=dev)
            out[f"{name}_valid"] = torch.zeros(b, n, dtype=torch.bool, device=dev)
        out["win_sink"] = torch.zeros(b, self.options.window - 1, dtype=torch.bool, device=dev)
        return out

    def mix(self, q, k, v, x, valid, state):
        b, t = q.shape[:2]
        st = state if state is not None else self.empty_state(k, v)
        valid = valid if valid is not None else torch.ones(b, t, dtype=torch.bool, device=q.device)
        pos = st["t"] + torch.arange(t, device=q.device)  # absolute positions of the new tokens
        seen_sinks = st["sink_valid"].sum(1, keepdim=True)
        new_sink = valid & (seen_sinks + valid.cumsum(1) <= self.options.sinks)
        keys_k = torch.cat([st["sink_k"], st["win_k"], k], 1)
        keys_v = torch.cat([st["sink_v"], st["win_v"], v], 1)
        kpos = torch.cat([st["sink_pos"], st["win_pos"], pos.expand(b, t)], 1)
        kvalid = torch.cat([st["sink_valid"], st["win_valid"] & ~st["win_sink"], valid], 1)  # a sink counts once
        ksink = torch.cat([st["sink_valid"], torch.zeros_like(st["win_sink"]), new_sink], 1)
        rel = pos[None, :, None] - kpos[:, None, :]  # [B,T,S] query position - key position
        mask = kvalid[:, None, :] & (rel >= 0) & ((rel < self.options.window) | ksink[:, None, :])
        y = self.attend_masked(q, keys_k, keys_v, mask)
        return y, self._next_state(st, k, v, pos.expand(b, t), valid, new_sink, t)

    def _next_state(self, st, k, v, pos, valid, new_sink, t) -> dict[str, Tensor]:
        """Sinks: the first `sinks` flagged tokens by position; window: the last window - 1 tokens."""
        n = self.options.sinks
        out = {"t": st["t"] + t}
        flag = torch.cat([st["sink_valid"], new_sink], 1)
        cpos = torch.cat([st["sink_pos"], pos], 1)
        order = torch.where(flag, cpos, cpos.new_full((), 2**62)).argsort(1)[:, :n]
        for name, new in (("k", k), ("v", v)):
            cand = torch.cat([st[f"sink_{name}"], new], 1)
            out[f"sink_{name}"] = cand.gather(1, order[..., None, None].expand(-1, -1, *cand.shape[2:]))
        out["sink_pos"], out["sink_valid"] = cpos.gather(1, order), flag.gather(1, order)
        for name, new in (("k", k), ("v", v), ("pos", pos), ("valid", valid), ("sink", new_sink)):
            out[f"win_{name}"] = torch.cat([st[f"win_{name}"], new], 1)[:, t:]
        return out
