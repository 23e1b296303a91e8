"""Evaluation: lm-eval tasks (offline ones included), perplexity, recall, speed and memory; teacher vs converted.

`evaluate` gives one model's records; `run_eval` / `run_bench` (the `linearize eval` / `bench`
commands) run a converted model and its teacher in turn and write results.json + report.md. The
lm-eval wrapper (`harness.LinearizeLM`, `--model linearize`) needs the optional `lm-eval` package.
"""

from .bench import bench_model
from .perplexity import text_perplexity
from .recall import make_items, recall_accuracy
from .report import compare, recovery
from .run import evaluate, run_bench, run_eval

__all__ = ["bench_model", "compare", "evaluate", "make_items", "recall_accuracy", "recovery", "run_bench",
           "run_eval", "text_perplexity"]
