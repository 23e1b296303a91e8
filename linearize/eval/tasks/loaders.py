"""Datasets of the offline lm-eval tasks (the YAML files beside this one), read from a local data folder.

Each task reads one benchmark's public file layout under the folder named by the task metadata
`data_dir` (linearize passes `--data-dir`; with `lm_eval`, `--metadata '{"data_dir": ...}'`) or else
by $LINEARIZE_EVAL_DATA. lm-eval imports this file by path, so it imports nothing from linearize.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import datasets

DATA_ENV = "LINEARIZE_EVAL_DATA"

# task -> {split: file under the data folder}: the layout each benchmark's authors publish
FILES = {
    "local_wikitext2": {"test": "wikitext2/test.txt"},  # pytorch/examples word_language_model (tokenized v1)
    "local_hellaswag": {"validation": "hellaswag/hellaswag_val.jsonl"},  # rowanz/hellaswag data/
    "local_arc_easy": {"test": "arc/ARC-Easy/ARC-Easy-Test.jsonl"},  # ARC-V1-Feb2018 release
    "local_arc_challenge": {"test": "arc/ARC-Challenge/ARC-Challenge-Test.jsonl"},
    "local_piqa": {"validation": "piqa/valid.jsonl"},  # ybisk/piqa: labels in valid-labels.lst beside it
    "local_lambada": {"test": "lambada/lambada_test.jsonl"},  # OpenAI's LAMBADA test set
}


def data_dir(meta: dict[str, Any]) -> Path:
    """The data folder from the task metadata, else from $LINEARIZE_EVAL_DATA."""
    folder = meta.get("data_dir") or os.environ.get(DATA_ENV)
    if not folder:
        raise FileNotFoundError(f"offline tasks read their data from a folder: pass --data-dir or set ${DATA_ENV}")
    return Path(folder).expanduser()


def missing(task: str, folder: str | os.PathLike) -> list[Path]:
    """The files `task` needs that `folder` lacks (empty when it can run)."""
    need = [Path(folder, f) for f in FILES[task].values()]
    if task == "local_piqa":
        need += [p.with_name(p.stem + "-labels.lst") for p in need]
    return [p for p in need if not p.is_file()]


def _splits(task: str, meta: dict[str, Any], read) -> datasets.DatasetDict:
    folder = data_dir(meta)
    if gone := missing(task, folder):
        raise FileNotFoundError(f"{task} needs {', '.join(map(str, gone))} (layout: {FILES[task]})")
    return datasets.DatasetDict({s: datasets.Dataset.from_list(read(folder / f)) for s, f in FILES[task].items()})


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- WikiText-2: one document per article, scored with a rolling loglikelihood ---------------------------

_TITLE = re.compile(r"^ = [^=].* = $")


def wikitext2(**meta: Any) -> datasets.DatasetDict:
    def read(path: Path) -> list[dict]:
        docs: list[list[str]] = []
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            if _TITLE.match(line.rstrip("\n")) or not docs:
                docs.append([])
            docs[-1].append(line)
        return [{"page": "".join(d).strip("\n")} for d in docs if "".join(d).strip()]

    return _splits("local_wikitext2", meta, read)


_DETOK = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" ,", ","), (" .", "."), (" ;", ";"), (" :", ":"),
          (" !", "!"), (" ?", "?"), (" 's", "'s"), (" n't", "n't"), ("( ", "("), (" )", ")"), (" \n", "\n"), ("\n ", "\n")]


def wikitext_text(doc: dict) -> str:
    """The article with the tokenized release's spacing undone (number separators, punctuation)."""
    text = doc["page"]
    for old, new in _DETOK:
        text = text.replace(old, new)
    return text


def wikitext_results(doc: dict, results: list[float]) -> dict[str, tuple[float, int]]:
    """Per-word and per-byte perplexity weights; words and bytes counted on the original article."""
    (loglikelihood,) = results
    words, nbytes = len(doc["page"].split()), len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, nbytes),
            "bits_per_byte": (loglikelihood, nbytes)}


# --- multiple choice: each loader yields {"query", "choices", "gold"} --------------------------------------


def _clean(text: str) -> str:  # WikiHow artifacts of HellaSwag: "[title]" markers and other [tags]
    text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
    return text.replace("  ", " ")


def hellaswag(**meta: Any) -> datasets.DatasetDict:
    def read(path: Path) -> list[dict]:
        return [{"query": _clean(f"{d['activity_label']}: {d['ctx_a']} {d['ctx_b'].capitalize()}"),
                 "choices": [_clean(e) for e in d["endings"]], "gold": int(d["label"])} for d in _jsonl(path)]

    return _splits("local_hellaswag", meta, read)


def _arc_rows(path: Path) -> list[dict]:
    rows = []
    for d in _jsonl(path):  # the AI2 release nests the question; the HF export flattens it
        q = d["question"]
        stem, choices = (q["stem"], q["choices"]) if isinstance(q, dict) else (q, [
            {"text": t, "label": lab} for t, lab in zip(d["choices"]["text"], d["choices"]["label"])])
        labels = [c["label"] for c in choices]
        rows.append({"query": f"Question: {stem}\nAnswer:", "choices": [c["text"] for c in choices],
                     "gold": labels.index(d["answerKey"])})
    return rows


def arc_easy(**meta: Any) -> datasets.DatasetDict:
    return _splits("local_arc_easy", meta, _arc_rows)


def arc_challenge(**meta: Any) -> datasets.DatasetDict:
    return _splits("local_arc_challenge", meta, _arc_rows)


def piqa(**meta: Any) -> datasets.DatasetDict:
    def read(path: Path) -> list[dict]:
        labels = path.with_name(path.stem + "-labels.lst").read_text().split()
        rows = _jsonl(path)
        if len(labels) != len(rows):
            raise ValueError(f"{path} has {len(rows)} rows but its labels file {len(labels)} labels")
        return [{"query": f"Question: {d['goal']}\nAnswer:", "choices": [d["sol1"], d["sol2"]], "gold": int(y)}
                for d, y in zip(rows, labels)]

    return _splits("local_piqa", meta, read)


def lambada(**meta: Any) -> datasets.DatasetDict:
    return _splits("local_lambada", meta, lambda p: [{"text": d["text"]} for d in _jsonl(p)])
