"""Recall-rich training rows, generated offline: long-range retrieval the teacher's attention does and
a converted layer must learn to keep. Mixed into distillation (`data.recall_mix`).

Three forms, none of them the evaluation tasks' templates (those are scored, not trained on):
- `copy`: a span of random ordinary tokens, later repeated (induction over any distance);
- `codes`: a table of "ID-xxxx => word word" entries, later some IDs asked again with their entries;
- `needle`: a "Code word N is xxxx." line inside the teacher's own text, repeated near the end.
Each row is filled with such documents (EOS between them) up to `seq_len` tokens.
"""

from __future__ import annotations

import random
import string
from typing import Any

import torch

FORMS = ("copy", "codes", "needle")


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7))) for _ in range(n))


def _copy(rng: random.Random, tok: Any, budget: int, ordinary: list[int]) -> list[int]:
    span = rng.randint(8, max(8, budget // 2))
    seq = [rng.choice(ordinary) for _ in range(span)]
    return seq + seq


def _codes(rng: random.Random, tok: Any, budget: int, ordinary: list[int]) -> list[int]:
    entries = {f"ID-{rng.randint(0, 99999):05d}": _words(rng, 2) for _ in range(max(2, budget // 24))}
    keys = list(entries)
    asked = rng.sample(keys, max(1, len(keys) // 4))
    text = "".join(f"{k} => {entries[k]}\n" for k in keys) + "Lookup:\n" + "".join(f"{k} => {entries[k]}\n" for k in asked)
    return tok(text, add_special_tokens=False)["input_ids"]


def _needle(rng: random.Random, tok: Any, budget: int, ordinary: list[int], texts: list[str]) -> list[int]:
    n, word = rng.randint(1, 999), _words(rng, 1)
    fact = tok(f" Code word {n} is {word}.", add_special_tokens=False)["input_ids"]
    filler: list[int] = []
    while len(filler) < budget - 2 * len(fact):
        filler += tok(rng.choice(texts), add_special_tokens=False)["input_ids"]
    filler = filler[: max(0, budget - 2 * len(fact))]
    at = rng.randint(0, len(filler))
    return filler[:at] + fact + filler[at:] + fact


def recall_rows(tok: Any, texts: list[str], n: int, seq_len: int, seed: int) -> torch.Tensor:
    """[n, seq_len] token rows of recall documents (forms in turn, random sizes), EOS between documents."""
    rng = random.Random(seed)
    special = set(tok.all_special_ids)
    ordinary = [i for i in range(len(tok)) if i not in special]
    eos = tok.eos_token_id
    rows = []
    for r in range(n):
        ids: list[int] = []
        while len(ids) < seq_len:
            budget = rng.randint(min(64, seq_len), seq_len)
            form = FORMS[(r + len(ids)) % len(FORMS)] if texts else rng.choice(FORMS[:2])
            doc = _needle(rng, tok, budget, ordinary, texts) if form == "needle" else (_copy if form == "copy" else _codes)(rng, tok, budget, ordinary)
            ids += doc + ([eos] if eos is not None else [])
        rows.append(ids[:seq_len])
    return torch.tensor(rows, dtype=torch.long)
