"""Speed and memory of a model as users run it: `generate` on random prompts of growing length.

Per (batch, context): prefill tokens/s = batch * context / time of generate(1 new token); decode
tokens/s = batch * N / (time of generate(N + 1 tokens) - time of generate(1 token)), both medians
of `repeats`; peak memory = the most the device held during generate(N + 1) (GPU only; CPU runs
report none). A context the device cannot hold is recorded as "oom" and longer ones are skipped.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

GIB = 2**30


def _seconds(fn: Callable[[], Any], cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


@torch.no_grad()
def bench_model(
    model: Any, *, lengths: list[int], batch_sizes: list[int], decode_tokens: int = 64, repeats: int = 3,
    seed: int = 0, progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Rows {"batch", "context", "status", "prefill_tok_s", "decode_tok_s", "peak_mem_gib"} (greedy decoding)."""
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
                first = statistics.median(_seconds(lambda: generate(1), cuda) for _ in range(repeats))
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                full = statistics.median(_seconds(lambda: generate(decode_tokens + 1), cuda) for _ in range(repeats))
            except torch.cuda.OutOfMemoryError:
                failed = True
                rows.append({**row, "status": "oom"})
                torch.cuda.empty_cache()  # only CUDA raises this error
                continue
            row.update(status="ok", prefill_tok_s=batch * context / first,
                       decode_tok_s=batch * decode_tokens / max(full - first, 1e-9),
                       peak_mem_gib=torch.cuda.max_memory_allocated(device) / GIB if cuda else None)
            rows.append(row)
            if progress:
                progress(f"batch {batch} context {context}: prefill {row['prefill_tok_s']:,.0f} tok/s, "
                         f"decode {row['decode_tok_s']:,.1f} tok/s")
    return rows
