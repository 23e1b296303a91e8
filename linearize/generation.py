"""Decoding with one step of the whole model captured as a CUDA graph and replayed per token.

A converted model decodes from fixed-size states that the kernels update in place, so one
step (embedding, every layer, head, next-token choice, position advance) can be recorded once with
`torch.cuda.graphs` and replayed without Python or launch overhead. The token and the rotary
positions live in static tensors that the step itself advances, so each replay sees the next
position. Softmax heads (`softmax_heads`) and the layers a plan keeps softmax whole decode from a
key/value cache preallocated for the prompt plus `max_new_tokens`, written in place (whole layers
through `ExactAttention`, swapped in for the decoder's own calls only). On CPU (or with graph=False)
the same step runs eagerly.

    tokens = linearize.generate_graphed(model, input_ids, max_new_tokens=64)
"""

from __future__ import annotations

import contextlib
import types
import weakref
from typing import Any, Callable, Hashable, Iterator

import torch
from torch import Tensor, nn

from .adapters import adapter_for, decoder_layers
from .cache import StateLayer
from .convert import is_converted
from .errors import LinearizeError
from .fusion import FusedStep
from .kinds.base import LinearizedAttention, State, static_softmax_cache
from .plan import SOFTMAX

Sampler = Callable[[Tensor], Tensor]  # logits [B, V] -> token ids [B]; runs inside the captured step


def greedy(logits: Tensor) -> Tensor:
    """The most likely token of each row."""
    return logits.argmax(-1)


_CODES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(code, key): its copy}


def own_code(fn: Callable, model: nn.Module, key: Hashable) -> Callable:
    """`fn` (a function or bound method) on the copy of its code object kept for `model` and `key` (the shapes it
    runs on): torch.compile caches compiled graphs, and counts recompilations against its limit (8; fullgraph
    fails past it), per code object, so a model's steps of one batch and cache length reuse their compilation
    while other models and shapes, each on their own code, do not use up the limit."""
    f = getattr(fn, "__func__", fn)
    code = _CODES.setdefault(model, {}).setdefault((f.__code__, key), f.__code__.replace())
    g = types.FunctionType(code, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return types.MethodType(g, fn.__self__) if hasattr(fn, "__self__") else g


class ExactAttention(LinearizedAttention):
    """A layer the plan keeps softmax, for graphed decoding: the original attention (its projections, rotary,
    scale, soft-cap and sliding window) over a key/value cache held like softmax heads' in the layer's
    StateLayer, which the decoder preallocates and the step writes in place (HF's growing cache cannot be
    captured)."""

    kind = SOFTMAX

    def __init__(self, attn: nn.Module, config: Any):
        super().__init__(attn, config, adapter_for(config.linearize["base_model_type"]), types.SimpleNamespace())

    def build(self, options: Any) -> None:
        """No new parameters: the layer is the original one."""

    def student_mix(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, valid: Tensor | None, state: State | None) -> tuple[Tensor, State]:
        return self.cached_softmax(q, k, v, valid, state)


class GraphedDecoder:
    """Prefills a prompt eagerly, then decodes one token per `step()` from static buffers.

    `tokens` [B,1] holds the last generated token (the next step's input), `logits` [B,V] the logits
    that chose it; both are overwritten by every step. `sample` must be capturable (no host syncs).
    `max_new_tokens` bounds the tokens it decodes (the first comes from the prefill); plans with
    softmax heads or layers need it, to size their key/value cache. `compile=True` puts the step under
    torch.compile(fullgraph=True) before capture: Inductor fuses the glue between the kernels
    (norms, rotary, projections' epilogues), so a replay launches fewer kernels; a dict instead of True
    gives Inductor options. The weights stay inputs of the compiled step (Inductor's freezing finds no
    constants to fold); `linearize.fusion.fuse_projections` stacks the projections that share an input.
    `fused_layers=True` (after `fuse_projections`) runs the step's dense parts on our skinny kernels instead of the
    model's modules (`linearize.fusion.FusedStep`: five launches a layer with the mixer's step); the prefill is the same.
    """

    def __init__(
        self, model: nn.Module, input_ids: Tensor, *, attention_mask: Tensor | None = None,
        sample: Sampler = greedy, prefill_chunk: int | None = None, graph: bool | None = None,
        max_new_tokens: int | None = None, compile: bool | dict = False, fused_layers: bool = False,
    ):
        heads = check_decodable(model)
        if heads and max_new_tokens is None:
            raise LinearizeError(
                f"layers {heads} keep softmax heads or attention, which decode from a preallocated key/value cache: "
                "give max_new_tokens (generate_graphed does) to size it"
            )
        if max_new_tokens is not None and max_new_tokens < 1:
            raise LinearizeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise LinearizeError(f"input_ids must be [batch, tokens] with at least one token, got shape {tuple(input_ids.shape)}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise LinearizeError(f"prefill_chunk must be >= 1 token, got {prefill_chunk}")
        use_graph = input_ids.is_cuda if graph is None else graph
        if use_graph and not input_ids.is_cuda:
            raise LinearizeError("graph=True needs the model and input_ids on a CUDA device")
        self.model, self.sample = model, sample
        self.cache = model.new_cache()
        self._exact = {i: ExactAttention(decoder_layers(model)[i].self_attn, model.config) for i in whole_softmax_layers(model)}
        for i in self._exact:  # their keys/values go where softmax heads keep theirs
            self.cache.layers[i] = StateLayer()
        self._layers = [layer for layer in self.cache.layers if isinstance(layer, StateLayer)]
        attns = [self._exact.get(i, layer.self_attn) for i, layer in enumerate(decoder_layers(model))]
        self._fused = FusedStep(model, attns) if fused_layers else None
        b, t = input_ids.shape
        if attention_mask is None:  # left padding: positions count from each row's first real token
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        chunk = prefill_chunk or t
        with torch.no_grad(), self._exact_layers():
            for s in range(0, t, chunk):
                mask = None if attention_mask is None else attention_mask[:, : s + chunk]
                logits = self._forward(input_ids[:, s : s + chunk], positions[:, s : s + chunk], mask)
            self.logits = logits
            self.tokens = sample(logits)[:, None]
        self.positions = positions[:, -1:] + 1
        self.seen = t
        self.prompt_len, self.max_new_tokens = t, max_new_tokens
        if heads:  # one slot more: the capture's warm-up runs two steps before restoring the state
            for layer in self._layers:
                if "sm_k" in layer.state:
                    layer.state = static_softmax_cache(layer.state, t + max_new_tokens + 1)
        if compile:
            options = compile if isinstance(compile, dict) else None
            key = (tuple(self.tokens.shape), self.prompt_len + max_new_tokens if heads else None, repr(options), fused_layers)
            self._step = torch.compile(own_code(self._step, model, key), fullgraph=True, dynamic=False, options=options)
        self.graph = None
        if use_graph:
            self._capture()

    @contextlib.contextmanager
    def _exact_layers(self) -> Iterator[None]:
        """The whole softmax layers as `ExactAttention` for the decoder's own calls; the model is left as it was."""
        layers = decoder_layers(self.model)
        original = {i: layers[i].self_attn for i in self._exact}
        try:
            for i, module in self._exact.items():
                layers[i].self_attn = module
            yield
        finally:
            for i, module in original.items():
                layers[i].self_attn = module

    def _forward(self, ids: Tensor, positions: Tensor, mask: Tensor | None = None) -> Tensor:
        kw = {self.model._cache_kwarg: self.cache}
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, logits_to_keep=1, **kw)
        return out.logits[:, -1]

    def _step(self) -> None:
        """One token from the static buffers, advancing them in place: what the graph records."""
        if self._fused is not None:
            self.logits = self._fused(self.tokens, self.positions, self.cache)
        else:
            self.logits = self._forward(self.tokens, self.positions)
        self.tokens.copy_(self.sample(self.logits)[:, None])
        self.positions.add_(1)

    def _run_step(self) -> None:
        """`_step` with every layer's token count at the prompt's: the step reads positions and fill counts from
        the device, never this host count, and a fixed value keeps a compiled step from recompiling per token."""
        for layer in self._layers:
            layer.seen = self.prompt_len
        with torch.no_grad(), self._exact_layers():
            self._step()

    def _static_tensors(self) -> list[Tensor]:
        return [self.tokens, self.positions] + [t for layer in self._layers for t in layer.state.values()]

    def _capture(self) -> None:
        """Warm up on a side stream (kernel compilation, cuBLAS set-up), restore the state, record one step."""
        static, prefill_logits = self._static_tensors(), self.logits
        saved = [t.clone() for t in static]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._run_step()
        torch.cuda.current_stream().wait_stream(stream)
        if [t.data_ptr() for t in self._static_tensors()] != [t.data_ptr() for t in static]:
            raise LinearizeError("a decode step replaced its state tensors instead of updating them in place; it cannot be captured")
        for t, s in zip(static, saved):
            t.copy_(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._run_step()
        self.logits.copy_(prefill_logits)  # the graph's output buffer: nothing ran in it yet
        self._sync_seen()

    def _sync_seen(self) -> None:
        for layer in self._layers:  # the token count HF reads from the cache (a replay runs no Python)
            layer.seen = self.seen

    def step(self) -> Tensor:
        """Decode one token; returns the static `tokens` buffer [B,1] now holding it."""
        if self.max_new_tokens is not None and self.seen >= self.prompt_len + self.max_new_tokens - 1:
            raise LinearizeError(f"this decoder was made for max_new_tokens={self.max_new_tokens} and has decoded them all")
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run_step()
        self.seen += 1
        self._sync_seen()
        return self.tokens


def whole_softmax_layers(model: nn.Module) -> list[int]:
    """The layers of a converted model that keep HF's own softmax attention (kind `softmax`)."""
    return [i for i, spec in enumerate(model.layer_plan) if spec.kind == SOFTMAX]


def check_decodable(model: nn.Module) -> list[int]:
    """Raise unless `model` was converted; returns the layers that keep softmax heads or whole softmax attention
    (they decode from a preallocated key/value cache)."""
    if not is_converted(model):
        raise LinearizeError("graphed decoding needs a model converted with linearize.convert")
    return [i for i, spec in enumerate(model.layer_plan) if spec.kind == SOFTMAX or spec.options.get("softmax_heads")]


def generate_graphed(
    model: nn.Module, input_ids: Tensor, max_new_tokens: int, *, attention_mask: Tensor | None = None,
    sample: Sampler = greedy, prefill_chunk: int | None = None, graph: bool | None = None, compile: bool | dict = False,
    fused_layers: bool = False,
) -> Tensor:
    """The prompt followed by exactly `max_new_tokens` tokens, [B, T + max_new_tokens] (no stop at EOS).

    The decode step is a replayed CUDA graph on CUDA (graph=None), eager elsewhere; `prefill_chunk`
    prefills long prompts in chunks of that many tokens; `compile` compiles the step and `fused_layers` runs it on the
    skinny kernels (see GraphedDecoder).
    """
    decoder = GraphedDecoder(model, input_ids, attention_mask=attention_mask, sample=sample, prefill_chunk=prefill_chunk,
                             graph=graph, max_new_tokens=max_new_tokens, compile=compile, fused_layers=fused_layers)
    out = [input_ids, decoder.tokens.clone()]
    for _ in range(max_new_tokens - 1):
        out.append(decoder.step().clone())
    return torch.cat(out, 1)
