"""Perplexity of a causal LM on a text file: tokenized once, scored in windows of `context` tokens.

With stride == context the windows do not overlap; with a smaller stride each window scores only
its last `stride` tokens, conditioned on the `context - stride` tokens before them (the usual
sliding-window evaluation). Converted layers are scored from the window start, like softmax ones.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import LinearizeError


def autocast(device: torch.device):
    """bf16 autocast on GPU; full precision on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def token_nll(model: Any, batch: torch.Tensor) -> torch.Tensor:
    """[B, T-1] negative log-likelihood of each next token of `batch` (bf16 autocast on GPU)."""
    with autocast(batch.device):
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")


def check_stride(context: int, stride: int | None) -> int:
    """The stride a perplexity run uses (default: the context); each window scores its last `stride` tokens, so at most all."""
    stride = stride or context
    if stride < 0:
        raise LinearizeError(f"--stride {stride}: must be a positive number of tokens (at most --context {context})")
    if stride > context:
        raise LinearizeError(f"--stride {stride} is larger than --context {context}: give a stride of at most the context")
    return stride


@torch.no_grad()
def text_perplexity(
    model: Any, tokenizer: Any, path: str | Path, *, context: int = 1024, stride: int | None = None,
    batch_size: int = 8, max_tokens: int | None = None,
) -> dict[str, float]:
    """{"ppl", "nll", "tokens", "context", "stride"} for the text in `path`."""
    p = Path(path)
    if not p.is_file():
        raise LinearizeError(f"text file {str(p)!r} does not exist")
    stride = check_stride(context, stride)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LinearizeError(f"text file {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start:,}): save it as UTF-8") from None
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if max_tokens:
        ids = ids[:max_tokens]
    device = next(model.parameters()).device
    if len(ids) < 2:
        raise LinearizeError(f"{str(p)!r} holds fewer than 2 tokens")
    context = min(context, len(ids))
    starts = list(range(0, len(ids) - context + 1, stride))
    nll, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        batch = torch.stack([ids[s : s + context] for s in starts[i : i + batch_size]]).to(device)
        # target u predicts token s+u+1; a window scores only tokens no earlier window scored
        first = torch.tensor([0 if s == 0 else context - stride - 1 for s in starts[i : i + batch_size]], device=device)
        mask = torch.arange(context - 1, device=device)[None] >= first[:, None]
        nll += (token_nll(model, batch) * mask).sum().item()
        count += int(mask.sum())
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "context": context, "stride": stride}
