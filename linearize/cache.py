"""Generation cache of converted models: fixed-size recurrent states where layers were converted.

`LinearizeCache` is a `DynamicCache` (softmax layers keep their growing keys/values, sliding
layers their window) whose converted layers hold a `StateLayer`: the recurrent memory plus, for
hybrid kinds, the last W-1 tokens. Its size does not depend on how many tokens were generated, and
its tensors keep their addresses once allocated (CUDA graphs capture them; see `generation.py`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin, DynamicCache, DynamicLayer

from .errors import LinearizeError


class StateLayer(CacheLayerMixin):
    """Cache slot of one converted layer; counts tokens so positions and masks stay right."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.state: dict[str, Tensor] | None = None
        self.seen = 0

    def store(self, state: dict[str, Tensor], num_tokens: int) -> None:
        """Keep the state after `num_tokens` more tokens. The first store takes compact copies; later ones
        copy into those tensors (decode steps already updated them in place), so addresses never change."""
        old = self.state
        if old is not None and old.keys() == state.keys() and all(old[n].shape == t.shape for n, t in state.items()):
            for name, t in state.items():
                if t is not old[name]:
                    old[name].copy_(t.detach())
        else:  # copies: a prefill's state tensors can be views of much larger buffers
            self.state = {n: t.detach().clone(memory_format=torch.contiguous_format) for n, t in state.items()}
        self.seen += num_tokens
        self.is_initialized = True

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.state or {}).values())

    # -- the CacheLayerMixin interface ----------------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        pass

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any):
        raise LinearizeError("a converted layer keeps a recurrent state, not keys/values")

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _apply(self, fn: Callable[[Tensor], Tensor]) -> None:
        if self.state is not None:
            self.state = {k: fn(v) for k, v in self.state.items()}

    def reset(self) -> None:
        self.state, self.seen, self.is_initialized = None, 0, False

    def reorder_cache(self, beam_idx) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices) -> None:
        self._apply(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise LinearizeError(
                "a recurrent state cannot be rolled back (crop), so assisted/speculative decoding and "
                "contrastive search are not available for converted layers; use greedy, sampling or beam search"
            )

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass

    @property
    def batch_size(self) -> int:
        return next(iter(self.state.values())).shape[0] if self.state else -1


class LinearizeCache(DynamicCache):
    """A DynamicCache with `StateLayer`s at the converted layers of `config.linearize`."""

    def __init__(self, config: Any):
        super().__init__(config=config)
        kinds = [layer["kind"] for layer in config.linearize["layers"]]
        if len(self.layers) != len(kinds):  # built lazily by this transformers version
            self.layers = [DynamicLayer() for _ in kinds]
            self.layer_class_to_replicate = None
        for i, kind in enumerate(kinds):
            if kind != "softmax":
                self.layers[i] = StateLayer()

    def nbytes(self) -> int:
        """Bytes held by every layer: recurrent states plus softmax layers' keys and values."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, StateLayer):
                total += layer.nbytes()
            else:
                total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if isinstance(t, Tensor))
        return total


def state_slot(cache: Any, layer_idx: int) -> StateLayer:
    """The StateLayer of `layer_idx`, or a clear error for a cache that has none."""
    if not isinstance(cache, LinearizeCache):
        raise LinearizeError(
            f"converted layer {layer_idx} got a {type(cache).__name__}; converted models need a "
            "linearize.LinearizeCache: let generate() create it, or pass model.new_cache()"
        )
    return cache.layers[layer_idx]
