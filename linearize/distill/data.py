"""Distillation data: read texts (teacher samples, local files, Hub datasets), pack them into
fixed-length token sequences, split train/validation.

Local txt/json/jsonl read with the standard library; parquet and Hub datasets go through
`datasets` (imported only then). The teacher corpus is sampled once and cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import LinearizeError
from ..home import cache_root
from .config import DataConfig

PROMPTS = [
    "", "The", "In", "Once upon a time,", "Today", "Here is", "A new study", "The history of",
    "How to", "Why", "My favorite", "Scientists", "The city", "In mathematics,", "Dear", "Chapter 1",
]


class DataError(LinearizeError, ValueError):
    """Training data that cannot be read or is too small."""


def _record_text(rec: dict[str, Any], cfg: DataConfig, where: str) -> str:
    if not isinstance(rec, dict):
        raise DataError(f"{where} holds a {type(rec).__name__} where a record belongs: give records like "
                        f"{{{cfg.text_column!r}: ...}}, or a .txt file of one text a line")
    if cfg.template:
        try:
            return cfg.template.format(**{k: ("" if v is None else v) for k, v in rec.items()})
        except KeyError as e:
            raise DataError(f"template field {e} is not a column of {where}; columns: {sorted(rec)}") from None
        except (ValueError, IndexError) as e:
            raise DataError(f"data.template {cfg.template!r} is not a format string of column names ({e}): "
                            "write columns as {name}, literal braces as {{ and }}") from None
    if cfg.text_column not in rec:
        raise DataError(f"{where} has no column {cfg.text_column!r}; columns: {sorted(rec)}. Set data.text_column or data.template")
    return str(rec[cfg.text_column])


def read_texts(cfg: DataConfig) -> list[str]:
    """Texts from a local file (.txt: one per non-empty line; .json/.jsonl/.parquet: records) or a Hub dataset."""
    src = cfg.source
    path = Path(src).expanduser()
    if path.suffix in (".txt", ".json", ".jsonl", ".parquet") or path.exists():
        if not path.is_file():
            raise DataError(f"data file {src!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8") if path.suffix in (".txt", ".json", ".jsonl") else ""
        except UnicodeDecodeError as e:
            raise DataError(f"data file {src!r} is not UTF-8 text ({e.reason} at byte {e.start:,}): save it as UTF-8") from None
        if path.suffix == ".txt":
            texts = [line.strip() for line in text.splitlines() if line.strip()]
        elif path.suffix == ".jsonl":
            recs = [_json(line, f"line {n} of {src!r}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]
            texts = [_record_text(r, cfg, src) for r in recs]
        elif path.suffix == ".json":
            data = _json(text, f"data file {src!r}")
            recs = data if isinstance(data, list) else data.get("data", data.get(cfg.split, [])) if isinstance(data, dict) else [data]
            texts = [_record_text(r, cfg, src) for r in recs]
        elif path.suffix == ".parquet":
            texts = [_record_text(r, cfg, src) for r in _datasets().load_dataset("parquet", data_files=str(path), split="train")]
        else:
            raise DataError(f"unsupported data file {src!r}: use .txt, .json, .jsonl or .parquet")
    else:
        try:
            ds = _datasets().load_dataset(src, cfg.hub_config, split=cfg.split)
        except Exception as e:
            raise DataError(f"cannot load the Hub dataset {src!r} ({type(e).__name__}: {e}); offline, pass a local file") from e
        texts = [_record_text(r, cfg, src) for r in ds]
    return texts[: cfg.max_texts] if cfg.max_texts else texts


def _json(text: str, where: str) -> Any:
    """`text` parsed as JSON; anything else is an error that names `where`."""
    try:
        return json.loads(text)
    except ValueError as e:
        raise DataError(f"{where} is not valid JSON ({e}): fix or remove it") from None


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise DataError("parquet files and Hub datasets need the package `datasets`: pip install datasets") from e
    return datasets


def pack(texts: list[str], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """Tokenize, join with EOS, cut into [N, seq_len] rows (the ragged tail is dropped)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"only {len(ids)} tokens of data: not one sequence of seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def split(rows: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle rows with `seed`; the last `val_fraction` (at least one row) is validation."""
    if len(rows) < 2:
        raise DataError(f"{len(rows)} packed sequence(s): need at least 2 for a train/validation split")
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    n_val = min(len(rows) - 1, max(1, round(len(rows) * val_fraction)))
    return rows[perm[n_val:]], rows[perm[:n_val]]


def teacher_cache(cfg: DataConfig, seed: int, model_id: str) -> Path:
    """Where the teacher corpus of this model and data recipe is cached."""
    key = json.dumps(["full-length", model_id, cfg.teacher_sequences, cfg.teacher_len or cfg.seq_len, cfg.teacher_temperature, seed, PROMPTS])
    return (Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root()) / "teacher" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"


def teacher_texts(model: Any, tokenizer: Any, cfg: DataConfig, seed: int, model_id: str) -> list[str]:
    """Sample `teacher_sequences` texts from the (teacher) model from short neutral prompts; cached on disk."""
    cache = teacher_cache(cfg, seed, model_id)
    if cache.is_file():
        return [json.loads(line)["text"] for line in cache.read_text().splitlines()]
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    texts: list[str] = []
    batch = 512 if device.type == "cuda" else 16
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for start in range(0, cfg.teacher_sequences, batch):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(start, min(start + batch, cfg.teacher_sequences))]
        seqs = [[bos] + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        width = max(map(len, seqs))
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.teacher_temperature,
                top_p=0.95, max_new_tokens=cfg.teacher_len or cfg.seq_len, min_new_tokens=cfg.teacher_len or cfg.seq_len, pad_token_id=pad,
            )
        for p, row in zip(prompts, out[:, width:]):
            texts.append(p + tokenizer.decode(row, skip_special_tokens=True))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")  # one per process: concurrent samplers never share it
    tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    os.replace(tmp, cache)
    return texts
