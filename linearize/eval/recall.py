"""Recall checks where linear attention is known to be weak, at growing context lengths.

- `mqar`: multi-query associative recall in text. A list of "name: number" lines (two-word names,
  4-digit numbers) fills the context; then a subset of the names is asked again, each followed by
  its number. Every number asked is one answer.
- `passkey`: a 5-digit pass key hidden at a set depth inside repeated filler text, asked at the end.
- `copy`: L random ordinary tokens shown twice (after BOS); every token of the second copy but its
  first is one answer (the first cannot be known). Pure in-context retrieval: nothing to recall
  from training, and a fixed-size state cannot hold L random tokens once L is large.

Answers are scored by teacher forcing: an answer counts as recalled when every one of its tokens is
the model's argmax given everything before it, which is exactly what greedy decoding would produce.
Items are seeded, and each keeps its text and the character and token spans of its answers, so
anyone can check an item by reading it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import LinearizeError
from .perplexity import autocast

ADJECTIVES = (
    "amber", "ancient", "bitter", "bold", "brave", "bright", "broken", "calm", "clever", "cold", "copper", "crimson",
    "curious", "dark", "deep", "distant", "dusty", "eager", "early", "empty", "faint", "fast", "fierce", "gentle",
    "giant", "golden", "grand", "gray", "green", "hidden", "hollow", "humble", "icy", "idle", "iron", "jolly", "keen",
    "late", "lazy", "little", "lonely", "loud", "lucky", "mellow", "misty", "modern", "narrow", "noble", "old", "pale",
    "patient", "plain", "polite", "proud", "purple", "quick", "quiet", "rapid", "rough", "round", "royal", "rusty",
    "sandy", "scarlet", "secret", "sharp", "shiny", "silent", "silver", "simple", "sleepy", "slow", "small", "smooth",
    "soft", "solid", "sour", "spare", "steady", "stormy", "strange", "sunny", "sweet", "swift", "tall", "tender",
    "thin", "tidy", "tiny", "twin", "vast", "violet", "warm", "wild", "wise", "young",
)
NOUNS = (
    "anchor", "apple", "arrow", "badge", "basket", "bell", "bridge", "brook", "button", "cabin", "candle", "canyon",
    "castle", "cedar", "cloud", "comet", "compass", "coral", "cottage", "crown", "desert", "dragon", "engine",
    "falcon", "feather", "fern", "forest", "fountain", "garden", "glacier", "harbor", "hammer", "helmet", "island",
    "jacket", "kettle", "ladder", "lantern", "lemon", "lighthouse", "lizard", "meadow", "mirror", "monkey", "needle",
    "oak", "ocean", "orchard", "otter", "owl", "palace", "panther", "pebble", "pepper", "pillow", "pine", "planet",
    "pond", "quill", "rabbit", "raven", "river", "rocket", "saddle", "sailor", "shell", "shield", "spider", "statue",
    "storm", "sparrow", "temple", "thunder", "tiger", "tower", "tulip", "tunnel", "valley", "violin", "wagon", "whale",
    "willow", "window", "wizard", "wolf",
)
FILLER = ("The morning was calm and the river moved slowly past the town. People walked to the market, "
          "talked about the weather and went home again. ")


@dataclass
class RecallItem:
    """One scored sequence: its text, its token ids and where each answer sits in both."""

    task: str
    length: int  # the context length asked for (the bucket); len(input_ids) is close to it
    text: str
    input_ids: torch.Tensor  # [T]
    answers: list[str]
    char_spans: list[tuple[int, int]]  # text[a:b] == answer (empty for copy: its answers are token ids)
    token_spans: list[tuple[int, int]]  # input_ids[a:b] are the answer's tokens
    info: dict[str, Any] = field(default_factory=dict)


def _tokenize(tokenizer: Any, text: str, answers: list[str], char_spans: list[tuple[int, int]]):
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if "offset_mapping" not in enc:
        raise LinearizeError("recall items need a fast tokenizer (one that returns character offsets)")
    offsets = enc["offset_mapping"]
    spans = []
    for a, b in char_spans:  # the tokens overlapping the answer's characters
        toks = [i for i, (s, e) in enumerate(offsets) if s < b and e > a]
        spans.append((toks[0], toks[-1] + 1))
    return torch.tensor(enc["input_ids"]), spans


def _tokens_per(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def mqar_item(tokenizer: Any, length: int, rng: random.Random, queries: int = 32) -> RecallItem:
    """Name: number lines filling about `length` tokens, then up to `queries` of the names asked again
    (a quarter of the lines at most, for short contexts)."""
    head = "Here is a list of names, each with its own number.\n"
    ask = "Now the numbers again, for some of the names.\n"
    names = [f"{a} {n}" for a in ADJECTIVES for n in NOUNS]
    sample = "".join(f"{rng.choice(names)}: {rng.randint(1000, 9999)}\n" for _ in range(64))
    per_line = _tokens_per(tokenizer, sample) / 64
    budget = length - _tokens_per(tokenizer, head + ask)
    lines = round(budget / per_line)
    queries = min(queries, lines // 4)
    pairs = lines - queries
    if queries < 2:
        raise LinearizeError(f"mqar: {length} tokens hold too few name/number lines: use a longer length")
    if pairs > len(names):
        raise LinearizeError(f"mqar: {length} tokens need {pairs} distinct names, more than the {len(names)} there are")
    keys = rng.sample(names, pairs)
    values = {k: str(rng.randint(1000, 9999)) for k in keys}
    text = head + "".join(f"{k}: {values[k]}\n" for k in keys) + ask
    answers, spans = [], []
    for k in rng.sample(keys, queries):
        text += f"{k}: "
        spans.append((len(text), len(text) + 4))
        answers.append(values[k])
        text += values[k] + "\n"
    ids, token_spans = _tokenize(tokenizer, text, answers, spans)
    return RecallItem("mqar", length, text, ids, answers, spans, token_spans, {"pairs": pairs, "values": values})


def passkey_item(tokenizer: Any, length: int, rng: random.Random, depth: float) -> RecallItem:
    """A 5-digit pass key at `depth` (0 = start, 1 = end) of filler text filling about `length` tokens."""
    key = str(rng.randint(10000, 99999))
    head = "A pass key is hidden in the long text below. Find it and remember it: you will be asked for it.\n"
    needle = f"The pass key is {key}. Remember it: {key} is the pass key. "
    question = "What is the pass key? The pass key is "
    budget = length - _tokens_per(tokenizer, head + needle + question + key)
    repeats = max(1, round(budget / _tokens_per(tokenizer, FILLER * 8) * 8))
    at = round(depth * repeats)
    text = head + FILLER * at + needle + FILLER * (repeats - at) + question
    span = (len(text), len(text) + len(key))
    text += key
    ids, token_spans = _tokenize(tokenizer, text, [key], [span])
    return RecallItem("passkey", length, text, ids, [key], [span], token_spans, {"depth": depth})


def copy_item(tokenizer: Any, length: int, rng: random.Random) -> RecallItem:
    """`length` random tokens (ids that are not special tokens) shown twice; length = L, the context is 2L + 1."""
    special = set(tokenizer.all_special_ids)
    vocab = len(tokenizer)
    seq: list[int] = []
    while len(seq) < length:
        i = rng.randrange(vocab)
        if i not in special:
            seq.append(i)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([bos, *seq, *seq])
    spans = [(length + 1 + i, length + 2 + i) for i in range(1, length)]
    text = tokenizer.decode(ids[1 : length + 1])
    return RecallItem("copy", length, text, ids, [tokenizer.decode([t]) for t in seq[1:]], [], spans, {"copied": length})


TASKS = ("mqar", "passkey", "copy")


def make_items(task: str, tokenizer: Any, lengths: list[int], n: int, seed: int = 0) -> list[RecallItem]:
    """`n` items of `task` (one of TASKS) per length; passkey depths spread evenly over 0..1."""
    rng = random.Random(seed)
    if task == "copy":
        return [copy_item(tokenizer, length, rng) for length in lengths for _ in range(n)]
    if task == "mqar":
        return [mqar_item(tokenizer, length, rng) for length in lengths for _ in range(n)]
    if task == "passkey":
        return [passkey_item(tokenizer, length, rng, i / max(n - 1, 1)) for length in lengths for i in range(n)]
    raise LinearizeError(f"unknown recall task {task!r}: use {', '.join(TASKS)}")


@torch.no_grad()
def answers_recalled(model: Any, item: RecallItem) -> list[bool]:
    """For each answer of `item`: is every one of its tokens the argmax under teacher forcing?"""
    device = next(model.parameters()).device
    ids = item.input_ids.to(device)
    positions = torch.cat([torch.arange(a - 1, b - 1) for a, b in item.token_spans]).to(device)  # predict token p+1
    with autocast(device):
        logits = model(input_ids=ids[None], use_cache=False, logits_to_keep=positions).logits[0]
    hit = logits.argmax(-1) == ids[positions + 1]
    out, i = [], 0
    for a, b in item.token_spans:
        out.append(bool(hit[i : i + b - a].all()))
        i += b - a
    return out


def recall_accuracy(
    model: Any, tokenizer: Any, tasks: list[str], lengths: list[int], *, items: int = 20, seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[int, float]]:
    """{task: {length: accuracy}}: the fraction of answers recalled (mqar: over all queries; copy: over tokens)."""
    out: dict[str, dict[int, float]] = {}
    for task in tasks:
        for length in lengths:
            hits = [h for item in make_items(task, tokenizer, [length], items, seed) for h in answers_recalled(model, item)]
            out.setdefault(task, {})[length] = sum(hits) / len(hits)
            if progress:
                progress(f"{task} @ {length}: {out[task][length]:.3f}")
    return out
