"""lm-eval integration: our model class (registered as `--model linearize`), the offline tasks, records.

`LinearizeLM` is lm-eval's HF model class over an instantiated model: a converted one, the teacher,
or anything `linearize.load` reads (converted folder, GGUF, the embedded default, Hub id). The
offline tasks (YAML in `tasks/`) read benchmark files from a data folder; see `tasks/loaders.py`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hf_constants

from ..errors import LinearizeError
from ..loading import load
from .run import pick_device, pick_dtype

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # an optional dependency
    raise LinearizeError("lm-eval is not installed: pip install 'linearize[eval]' (or run `make setup`)") from e

from .tasks import loaders

TASKS_DIR = Path(__file__).parent / "tasks"
LOCAL_TASKS = tuple(loaders.FILES)


@register_model("linearize")
class LinearizeLM(HFLM):
    """lm-eval's HF causal-LM wrapper around a model object (used where it is), or around what `load`
    reads from `pretrained` (a converted folder, a GGUF, the default, a Hub id), placed on `device` in
    `dtype` (default: bf16 on GPU, fp32 on CPU). Scoring runs without a generation cache and takes
    the log-probabilities from fp32 logits.
    """

    def __init__(self, pretrained: Any = None, tokenizer: Any = None, device: str | None = None,
                 dtype: str | torch.dtype | None = "auto", **kwargs: Any):
        if pretrained is None or isinstance(pretrained, (str, os.PathLike)):
            # lm_eval's CLI asks for cuda by default: like HFLM, take what there is
            dev = pick_device(device if torch.cuda.is_available() else "cpu")
            pretrained, loaded_tok = load(pretrained)
            pretrained.to(device=dev, dtype=pick_dtype(dtype, dev))
            tokenizer = tokenizer or loaded_tok
        if tokenizer is None:
            raise LinearizeError("LinearizeLM needs the tokenizer along with a model object")
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, backend="causal", **kwargs)

    def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> torch.Tensor:
        with torch.no_grad():
            return self.model(inps, use_cache=False).logits.float()


def expand_tasks(tasks: list[str], data_dir: str | os.PathLike | None) -> list[str]:
    """Task names for lm-eval: "local" becomes every offline task whose files are in `data_dir` (else
    $LINEARIZE_EVAL_DATA); an offline task without its files, or without a data folder, is an error naming
    what is missing."""
    data_dir = data_dir or os.environ.get(loaders.DATA_ENV)
    out: list[str] = []
    for name in tasks:
        if name != "local" and name not in LOCAL_TASKS:  # lm-eval's own task: its data comes from the Hub
            if hf_constants.HF_HUB_OFFLINE:
                local = f"local_{name}"
                raise LinearizeError(f"task {name!r} downloads its data from the Hub, but HF_HUB_OFFLINE is set"
                                     + (f": use {local!r}, which reads the offline copy in --data-dir" if local in LOCAL_TASKS else ""))
            out.append(name)
            continue
        if data_dir is None:
            raise LinearizeError(f"task {name!r} reads local files: pass --data-dir DIR (or set ${loaders.DATA_ENV})")
        if not Path(data_dir).is_dir():
            raise LinearizeError(f"data folder {str(data_dir)!r} does not exist")
        if name == "local":
            found = [t for t in LOCAL_TASKS if not loaders.missing(t, data_dir)]
            if not found:
                raise LinearizeError(f"no offline task has its files in {str(data_dir)!r}; layouts: {loaders.FILES}")
            out += found
        elif gone := loaders.missing(name, data_dir):
            raise LinearizeError(f"task {name!r} needs {', '.join(map(str, gone))}: put the benchmark's file there")
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def run_tasks(
    lm: HFLM, tasks: list[str], *, data_dir: str | os.PathLike | None = None, limit: int | float | None = None,
    num_fewshot: int | None = None, bootstrap_iters: int = 1000,
) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval (stderrs as `<metric>_stderr`); offline tasks read `data_dir`."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    data_dir = data_dir or os.environ.get(loaders.DATA_ENV)
    names = expand_tasks(tasks, data_dir)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=any(t not in LOCAL_TASKS for t in names),
                          metadata={"data_dir": str(data_dir)} if data_dir else None)  # indexing lm-eval's own: ~15 s
    out = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                          log_samples=False, bootstrap_iters=bootstrap_iters)
    results: dict[str, dict[str, float]] = {}
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if type(value) in (int, float) and metric != "sample_len":  # not aliases, "N/A" or sample counts
                results.setdefault(task, {})[metric if filt in ("", "none") else f"{metric}[{filt}]"] = float(value)
    return results
