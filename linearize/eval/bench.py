"""Speed and memory of a model as users run it: `generate` on random prompts of growing length, and
the fastest decoding each model has.

Per (batch, context): prefill tokens/s = batch * context / time of generate(1 new token); decode
tokens/s = batch * N / (time of generate(N + 1 tokens) - time of generate(1 token)), both medians
of `repeats`; peak memory = the most the device held during generate(N + 1) (GPU only; CPU runs
report none). A context the device cannot hold is recorded as "oom" and longer ones are skipped.
Fast decode tokens/s: N steps of the fastest path (`fast_decode_ms`): a converted model's graphed
step (compiled and captured on CUDA), the teacher's static key/value cache with its one-token
forward under torch.compile(mode="reduce-overhead") (transformers' own fast path; eager on CPU).
"""

from __future__ import annotations

import inspect
import statistics
import time
from typing import Any, Callable

import torch
import transformers

from ..convert import is_converted

GIB = 2**30


def timed_ms(fn: Callable[[], Any], cuda: bool) -> float:
    """Milliseconds of one call of `fn`, device work included (CUDA events on a GPU)."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _per_step(step: Callable[[], Any], steps: int, repeats: int, cuda: bool) -> float:
    """Median over `repeats` of the ms per call of `step`, timed `steps` calls at a time, after 3 warm-up calls."""
    for _ in range(3):  # compilation, CUDA-graph recording
        step()

    def run() -> None:
        for _ in range(steps):
            step()

    return statistics.median(timed_ms(run, cuda) / steps for _ in range(repeats))


@torch.no_grad()
def graphed_decode_ms(model: Any, ids: torch.Tensor, steps: int, repeats: int, *, chunk: int | None = None,
                      compile: bool | dict = False, fused_layers: bool = False) -> tuple[float, int]:
    """ms per step of `GraphedDecoder` after prefilling `ids` (captured on CUDA; `compile` and `fused_layers` as the
    decoder takes them), and the bytes of its cache."""
    from ..generation import GraphedDecoder

    decoder = GraphedDecoder(model, ids, prefill_chunk=chunk, max_new_tokens=4 + steps * repeats, compile=compile,
                             fused_layers=fused_layers)
    return _per_step(decoder.step, steps, repeats, ids.is_cuda), decoder.cache.nbytes()


@torch.no_grad()
def static_cache_decode_ms(model: Any, ids: torch.Tensor, steps: int, repeats: int, *, chunk: int | None = None,
                           compile: dict | None = None) -> float:
    """ms per greedy token of an unconverted model's fast path: a StaticCache and the one-token forward under
    torch.compile(fullgraph=True, **compile) (default mode="reduce-overhead": CUDA graphs); eager on CPU."""
    from ..generation import own_code

    b, t = ids.shape
    chunk = chunk or t
    length = t + 3 + steps * repeats
    cache = transformers.StaticCache(config=model.config, max_cache_len=length)
    params = inspect.signature(model.forward).parameters  # transformers renamed the cache and dropped cache_position in 5.2x

    def call(tok: torch.Tensor, pos: torch.Tensor, **kw: Any) -> torch.Tensor:
        kw |= {"cache" if "cache" in params else "past_key_values": cache, "position_ids": pos.expand(b, -1)}
        if "cache_position" in params:
            kw["cache_position"] = pos
        return model(tok, use_cache=True, **kw).logits[:, -1]

    for s in range(0, t, chunk):  # prefill
        logits = call(ids[:, s : s + chunk], torch.arange(s, min(s + chunk, t), device=ids.device), logits_to_keep=1)

    def forward(tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return call(tok, pos).argmax(-1, keepdim=True)

    step = torch.compile(own_code(forward, model, (b, length, repr(compile))), fullgraph=True, **(compile or {"mode": "reduce-overhead"})) if ids.is_cuda else forward
    state = {"tok": logits.argmax(-1, keepdim=True)}
    pos = torch.full((1,), t, device=ids.device)  # advanced on the device: no host-to-device copy a token

    def one() -> None:
        state["tok"] = step(state["tok"], pos).clone()  # the graph's output buffer is reused by the next call
        pos.add_(1)

    return _per_step(one, steps, repeats, ids.is_cuda)


def fast_decode_ms(model: Any, ids: torch.Tensor, steps: int, repeats: int) -> tuple[float, str]:
    """ms per token of the fastest decoding `model` has, and its name: a converted model's graphed step
    (compiled on CUDA), an unconverted one's static cache + compiled step."""
    compiled = " + torch.compile" * ids.is_cuda
    if not is_converted(model):
        return static_cache_decode_ms(model, ids, steps, repeats), "static cache" + compiled
    return graphed_decode_ms(model, ids, steps, repeats, compile=ids.is_cuda)[0], "graphed step" + compiled


@torch.no_grad()
def bench_model(
    model: Any, *, lengths: list[int], batch_sizes: list[int], decode_tokens: int = 64, repeats: int = 3,
    seed: int = 0, progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Rows {"batch", "context", "status", "prefill_tok_s", "decode_tok_s", "peak_mem_gib", "fast_decode_tok_s",
    "fast_decode"} (greedy decoding)."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    vocab = model.config.vocab_size
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for batch in batch_sizes:
        failed = False
        for context in lengths:
            row: dict[str, Any] = {"batch": batch, "context": context}
            if failed:
                rows.append({**row, "status": "skipped"})
                continue
            ids = torch.randint(3, vocab, (batch, context), generator=gen).to(device)

            def generate(n: int) -> None:
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=pad)

            try:
                generate(2)  # warm-up: kernels compiled and tuned for this shape
                first = statistics.median(timed_ms(lambda: generate(1), cuda) / 1e3 for _ in range(repeats))
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                full = statistics.median(timed_ms(lambda: generate(decode_tokens + 1), cuda) / 1e3 for _ in range(repeats))
                peak = torch.cuda.max_memory_allocated(device) / GIB if cuda else None  # generate's, before the fast path
                fast_ms, fast = fast_decode_ms(model, ids, decode_tokens, repeats)
            except torch.cuda.OutOfMemoryError:
                failed = True
                rows.append({**row, "status": "oom"})
                torch.cuda.empty_cache()  # only CUDA raises this error
                continue
            row.update(status="ok", prefill_tok_s=batch * context / first,
                       decode_tok_s=batch * decode_tokens / max(full - first, 1e-9),
                       peak_mem_gib=peak,
                       fast_decode_tok_s=batch * 1e3 / fast_ms, fast_decode=fast)
            rows.append(row)
            if progress:
                progress(f"batch {batch} context {context}: prefill {row['prefill_tok_s']:,.0f} tok/s, "
                         f"decode {row['decode_tok_s']:,.1f} tok/s, fast decode ({fast}) "
                         f"{row['fast_decode_tok_s']:,.1f} tok/s")
    return rows
