"""What `linearize eval` and `linearize bench` run: one model's records, then the model and its teacher in
turn (one in memory at a time), written as results.json + report.md (+ bench.png) under an output folder."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..convert import is_converted
from ..errors import LinearizeError
from ..loading import load, load_tokenizer, read_config_json
from ..outputs import check_out
from .bench import bench_model
from .perplexity import check_stride, text_perplexity
from .recall import TASKS as RECALL_TASKS, make_items, recall_accuracy
from .report import bench_plot, compare, compare_table, records, records_table, run_info, table, write_run

RECALL_LENGTHS = (1024, 2048, 4096)  # `eval --recall` contexts unless given


def pick_device(device: str | torch.device | None) -> torch.device:
    """The device asked for, else CUDA when there is one; a CUDA request without a GPU is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise LinearizeError(f"unknown device {device!r}: use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LinearizeError("device 'cuda' was asked for but torch sees no GPU: pass --device cpu")
    return device


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on GPU and fp32 on CPU unless a dtype is named ("bfloat16", "float16", "float32")."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype) or not getattr(torch, dtype).is_floating_point:
        raise LinearizeError(f"unknown dtype {dtype!r}: use bfloat16, float16 or float32")
    return getattr(torch, dtype)


def label(model: Any) -> str:
    """How records name a model: its plan when converted, else "teacher"."""
    return model.config.linearize["plan"] if is_converted(model) else "teacher"


def evaluate(
    model: Any, tokenizer: Any, *, tasks: Sequence[str] = (), data_dir: str | os.PathLike | None = None,
    perplexity: Sequence[str | os.PathLike] = (), context: int = 1024, stride: int | None = None,
    max_tokens: int | None = None,
    recall: Sequence[str] = (), recall_lengths: Sequence[int] | None = None, recall_items: int = 20,
    batch_size: int = 8, limit: int | float | None = None, num_fewshot: int | None = None,
    max_length: int | None = None, seed: int = 0, progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Records of one model: lm-eval `tasks`, perplexity of each text file, `recall` accuracy per length."""
    results: dict[str, dict[str, float]] = {}
    if tasks:
        from .harness import LinearizeLM, run_tasks

        lm = LinearizeLM(model, tokenizer, batch_size=batch_size, max_length=max_length)
        results.update(run_tasks(lm, list(tasks), data_dir=data_dir, limit=limit, num_fewshot=num_fewshot))
    for path in perplexity:
        r = text_perplexity(model, tokenizer, path, context=context, stride=stride, batch_size=batch_size,
                            max_tokens=max_tokens)
        results[f"ppl:{Path(path).parent.name}/{Path(path).name}"] = {"ppl": r["ppl"]}
    lengths = list(recall_lengths or RECALL_LENGTHS)
    for task, by_length in recall_accuracy(model, tokenizer, list(recall), lengths, items=recall_items, seed=seed,
                                           progress=progress).items():
        results.update({f"{task}@{n}": {"acc": acc} for n, acc in by_length.items()})
    return records(label(model), results)


def _positive(**values: Any) -> None:
    """Refuse sizes and counts below 1 (None: not given) before any model loads."""
    bad = [f"--{k.replace('_', '-')} {v}" for k, v in values.items()
           if any(x is not None and x <= 0 for x in (v if isinstance(v, (list, tuple)) else [v]))]
    if bad:
        raise LinearizeError(f"{', '.join(bad)}: must be positive")


def _saved_plan(spec: str) -> str:
    """The plan recorded in a model folder's config.json; "teacher" for anything else."""
    folder = Path(spec).expanduser()
    plan = read_config_json(folder).get("linearize", {}).get("plan") if (folder / "config.json").is_file() else None
    return plan or "teacher"


def _each_model(spec: str, compare_with: str | None, device: torch.device, dtype: torch.dtype, work: Callable) -> list[str]:
    """Run `work(model, tokenizer)` on `spec`, then on `compare_with`, one model in memory at a time;
    return their labels. Two models of one label (two teachers, say) are refused before any loading."""
    names = [spec] + ([compare_with] if compare_with else [])
    if len(names) == 2 and _saved_plan(spec) == _saved_plan(compare_with):
        raise LinearizeError(f"{spec!r} and {compare_with!r} are both {_saved_plan(spec)!r}: compare a converted "
                             "model with its teacher")
    if len(names) == 2 and _saved_plan(spec) == "teacher":
        raise LinearizeError(f"{spec!r} is not converted and --compare {compare_with!r} is: swap them "
                             "(MODEL is the converted one, --compare its teacher)")
    labels = []
    for name in names:
        model, tok = load(name)
        labels.append(label(model))
        work(model.to(device=device, dtype=dtype).eval(), tok)
        del model, tok
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return labels


def _header(title: str, info: dict[str, Any], settings: dict[str, Any]) -> str:
    lines = [f"# {title}", "", f"- command: `{info['command']}`", f"- date: {info['date']}; device: {info['device']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items())]
    lines += [f"- {k}: {v}" for k, v in settings.items() if v not in (None, [], ())]
    return "\n".join(lines) + "\n"


def run_eval(
    spec: str, out: str | os.PathLike, *, compare_with: str | None = None, device: str | None = None,
    dtype: str | None = "auto", command: str | None = None, progress: Callable[[str], None] | None = print,
    force: bool = False, **options: Any,
) -> dict[str, Any]:
    """Evaluate `spec` (and `compare_with`, its teacher) with `evaluate(**options)`; write OUT/results.json
    and OUT/report.md (the teacher-vs-converted table with recovery when comparing). `force`: `out` may
    replace a folder another command wrote."""
    output = dict(command="eval", force=force, inputs=[spec, compare_with])
    check_out(out, **output)
    _positive(**{k: options.get(k) for k in ("context", "stride", "max_tokens", "batch_size", "limit", "max_length",
                                             "recall_lengths", "recall_items")})
    check_stride(options.get("context") or 1024, options.get("stride"))
    if options.get("num_fewshot") is not None and options["num_fewshot"] < 0:
        raise LinearizeError(f"--num-fewshot {options['num_fewshot']}: must be 0 or more (examples in each prompt)")
    unknown = [t for t in options.get("recall", ()) if t not in RECALL_TASKS]
    if unknown:
        raise LinearizeError(f"unknown recall task {unknown[0]!r}: use {', '.join(RECALL_TASKS)}")
    if not any(options.get(k) for k in ("tasks", "perplexity", "recall")):
        raise LinearizeError("nothing to evaluate: give --tasks, --perplexity and/or --recall")
    for path in options.get("perplexity", ()):
        if not Path(path).is_file():
            raise LinearizeError(f"text file {str(path)!r} does not exist")
    if options.get("tasks"):
        from .harness import expand_tasks

        options["tasks"] = expand_tasks(list(options["tasks"]), options.get("data_dir"))  # fails before any loading
    if options.get("recall"):  # a length a task cannot fill (mqar's lines) fails before the weights load
        options["recall_lengths"] = list(options.get("recall_lengths") or RECALL_LENGTHS)
        tok = load_tokenizer(spec)
        for task in options["recall"]:
            make_items(task, tok, options["recall_lengths"], 1)
    dev = pick_device(device)
    recs: list[dict[str, Any]] = []

    def work(model: Any, tok: Any) -> None:
        if progress:
            progress(f"evaluating {label(model)}")
        recs.extend(evaluate(model, tok, progress=progress, **options))

    labels = _each_model(spec, compare_with, dev, pick_dtype(dtype, dev), work)
    info = run_info(command)
    recall = ("recall_items", "recall_lengths") if options.get("recall") else ()
    settings = {"plan": labels[0], **{k: options.get(k) for k in ("tasks", "data_dir", "limit", "num_fewshot", *recall)}}
    if options.get("perplexity"):
        context = options.get("context", 1024)
        settings["perplexity"] = f"context {context}, stride {options.get('stride') or context}" + (
            f", first {options['max_tokens']} tokens" if options.get("max_tokens") else "")
    report = _header(f"Evaluation of {spec}" + (f" against {compare_with}" if compare_with else ""), info, settings)
    rows = compare(recs, teacher=labels[1]) if compare_with else []
    report += "\n" + (compare_table(rows) if compare_with else records_table(recs)) + "\n"
    results = {**info, "model": spec, "teacher": compare_with, "settings": settings, "records": recs}
    if rows:
        results["comparison"] = [{k: v for k, v in r.items() if k != "stderr"} for r in rows]
    write_run(out, results, report, **output)
    if progress:
        progress(report)
    return results


def run_bench(
    spec: str, out: str | os.PathLike, *, compare_with: str | None = None, lengths: Sequence[int], batch_sizes: Sequence[int],
    decode_tokens: int = 64, repeats: int = 3, device: str | None = None, dtype: str | None = "auto",
    command: str | None = None, progress: Callable[[str], None] | None = print, force: bool = False,
) -> dict[str, Any]:
    """Prefill/decode tokens/s and peak memory vs context of `spec` (and `compare_with`); writes
    OUT/results.json, OUT/report.md and OUT/bench.png (`force`: as in `run_eval`)."""
    output = dict(command="bench", force=force, inputs=[spec, compare_with])
    check_out(out, **output)
    _positive(lengths=lengths, batch_sizes=batch_sizes, decode_tokens=decode_tokens, repeats=repeats)
    dev = pick_device(device)
    rows: list[dict[str, Any]] = []

    def work(model: Any, tok: Any) -> None:
        if progress:
            progress(f"benchmarking {label(model)}")
        rows.extend({"model": label(model), **r} for r in bench_model(
            model, lengths=list(lengths), batch_sizes=list(batch_sizes), decode_tokens=decode_tokens, repeats=repeats,
            progress=progress))

    labels = _each_model(spec, compare_with, dev, pick_dtype(dtype, dev), work)
    recs = [{"model": r["model"], "task": f"bench_b{r['batch']}@{r['context']}", "metric": m, "value": r[m]}
            for r in rows if r["status"] == "ok" for m in ("prefill_tok_s", "decode_tok_s", "fast_decode_tok_s", "peak_mem_gib")
            if r[m] is not None]
    info = run_info(command)
    settings = {"plan": labels[0], "lengths": list(lengths), "batch_sizes": list(batch_sizes),
                "decode_tokens": decode_tokens, "repeats": repeats}
    report = _header(f"Speed and memory of {spec}" + (f" against {compare_with}" if compare_with else ""), info, settings)
    report += "\n" + table(["model", "batch", "context", "prefill tok/s", "decode tok/s", "fast decode tok/s", "peak memory GiB",
                            "status"], [
        ["teacher" if r["model"] == "teacher" else "converted", str(r["batch"]), str(r["context"]),
         *(f"{r[k]:,.{d}f}" if r.get(k) is not None else "—" for k, d in (("prefill_tok_s", 0), ("decode_tok_s", 1),
                                                                            ("fast_decode_tok_s", 1), ("peak_mem_gib", 2))),
         r["status"]] for r in rows]) + "\n"
    fast = sorted({f"{'teacher' if r['model'] == 'teacher' else 'converted'}: {r['fast_decode']}" for r in rows if r.get("fast_decode")})
    report += f"\nFast decode (the fastest path each model has): {'; '.join(fast)}.\n" if fast else ""
    plot = bench_plot(rows)
    report += "\n![prefill, decode and memory vs context](bench.png)\n" if plot is not None else "\n(no plot: matplotlib is not installed)\n"
    results = {**info, "model": spec, "teacher": compare_with, "settings": settings, "rows": rows, "records": recs}
    write_run(out, results, report, plot, **output)
    if progress:
        progress(report)
    return results
