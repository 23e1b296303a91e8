"""Records, the teacher-vs-converted table with recovery, and the files each eval/bench run writes.

A record is {"model": "teacher" | <plan>, "task": str, "metric": str, "value": float}. Recovery of a
converted model on a metric is 100 * converted / teacher where higher is better (accuracy, tokens/s)
and 100 * teacher / converted where lower is better (perplexity, memory): 100% = no loss.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from ..outputs import atomic_dir

LOWER_IS_BETTER = ("perplexity", "ppl", "bits_per_byte", "nll", "mem_gib")  # metric names containing these


def higher_is_better(metric: str) -> bool:
    return not any(word in metric for word in LOWER_IS_BETTER)


def records(model: str, results: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Flatten {task: {metric: value}} into records of `model`."""
    return [{"model": model, "task": t, "metric": m, "value": v} for t, ms in results.items() for m, v in ms.items()]


def recovery(teacher: float, converted: float, metric: str) -> float | None:
    """Percent of the teacher's score the converted model keeps (None where a ratio means nothing)."""
    if higher_is_better(metric):
        return 100.0 * converted / teacher if teacher > 0 else None
    return 100.0 * teacher / converted if converted > 0 else None


def compare(recs: list[dict[str, Any]], teacher: str = "teacher") -> list[dict[str, Any]]:
    """One row per (task, metric) of the non-teacher model: teacher value, converted value, recovery %."""
    values = {(r["model"], r["task"], r["metric"]): r["value"] for r in recs}
    rows = []
    for r in recs:
        if r["model"] == teacher or r["metric"].endswith("_stderr"):
            continue
        t = values.get((teacher, r["task"], r["metric"]))
        rows.append({"task": r["task"], "metric": r["metric"], "teacher": t, "converted": r["value"],
                     "recovery": None if t is None else recovery(t, r["value"], r["metric"]),
                     "stderr": (values.get((teacher, r["task"], r["metric"] + "_stderr")),
                                values.get((r["model"], r["task"], r["metric"] + "_stderr")))})
    return rows


def _num(x: float | None, stderr: float | None = None) -> str:
    if x is None:
        return "—"
    s = f"{x:,.4f}" if abs(x) < 100 else f"{x:,.1f}"
    return s + (f" ± {stderr:.4f}" if stderr else "")


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def compare_table(rows: list[dict[str, Any]]) -> str:
    return table(["task", "metric", "teacher", "converted", "recovery %"], [
        [r["task"], r["metric"], _num(r["teacher"], r["stderr"][0]), _num(r["converted"], r["stderr"][1]),
         "—" if r["recovery"] is None else f"{r['recovery']:.1f}"] for r in rows])


def records_table(recs: list[dict[str, Any]]) -> str:
    """task, metric, value (± stderr); a model column only where the records hold several (the header names one: a
    plan's string, repeated on every row, made the table unreadable)."""
    errs = {(r["model"], r["task"], r["metric"]): r["value"] for r in recs}
    several = len({r["model"] for r in recs}) > 1
    return table(["model"] * several + ["task", "metric", "value"], [
        [r["model"]] * several + [r["task"], r["metric"], _num(r["value"], errs.get((r["model"], r["task"], r["metric"] + "_stderr")))]
        for r in recs if not r["metric"].endswith("_stderr")])


def run_info(command: str | None = None) -> dict[str, Any]:
    """command, date, device and package versions of this run."""
    versions = {"python": platform.python_version()}
    for pkg in ("linearize", "torch", "transformers", "triton", "lm_eval", "peft"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    return {"command": command or shlex.join(["linearize", *sys.argv[1:]]), "date": datetime.date.today().isoformat(),
            "device": device, "versions": versions}


def write_run(out: str | Path, results: dict[str, Any], report: str, plot: Any = None, **output: Any) -> Path:
    """Write OUT/results.json, OUT/report.md and (given a matplotlib figure) OUT/bench.png, all or nothing;
    `output`: `atomic_dir`'s command, force and inputs."""
    with atomic_dir(out, **output) as tmp:
        Path(tmp, "results.json").write_text(json.dumps(results, indent=1) + "\n")
        Path(tmp, "report.md").write_text(report)
        if plot is not None:
            plot.savefig(Path(tmp, "bench.png"), dpi=120, bbox_inches="tight")
    return Path(out)


def bench_plot(rows: list[dict[str, Any]]) -> Any:
    """Prefill tokens/s, decode tokens/s and peak memory vs context, one line per (model, batch); None
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = [("prefill_tok_s", "prefill tokens/s"), ("decode_tok_s", "decode tokens/s"), ("peak_mem_gib", "peak memory (GiB)")]
    for ax, (key, title) in zip(axes, panels):
        for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
            pts = [(r["context"], r[key]) for r in rows
                   if r["model"] == model and r["batch"] == batch and r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{'teacher' if model == 'teacher' else 'converted'} b={batch}")
        if not ax.lines:
            ax.text(0.5, 0.5, "measured on GPU only", ha="center", transform=ax.transAxes)
        ax.set(xlabel="context (tokens)", title=title)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend()
    return fig
