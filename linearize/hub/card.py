"""The model card (README.md) of a pushed model: YAML metadata, usage, the plan, the recipe, results.

Everything comes from files the folder already holds (config.json, the weights' headers,
recipe.yaml, metrics/summary.json) and, when given, an eval run's results.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from safetensors import safe_open

from .._version import __version__
from ..adapters import ADAPTERS
from ..eval.report import compare, compare_table, table
from ..plan import SOFTMAX, LayerSpec
from .code import ENTRY


def new_parameters(model_dir: Path, config: dict[str, Any]) -> dict[int, int]:
    """Parameters each converted layer adds to the teacher's, read from the safetensors headers."""
    taken = set(ADAPTERS[config["linearize"]["base_model_type"]].modules)
    counts: dict[int, int] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                parts = key.split(".")
                if "self_attn" not in parts or "layers" not in parts:
                    continue
                i = parts.index("self_attn")
                if parts[i + 1] not in taken:
                    layer = int(parts[parts.index("layers") + 1])
                    n = 1
                    for d in f.get_slice(key).get_shape():
                        n *= d
                    counts[layer] = counts.get(layer, 0) + n
    return counts


def _front_matter(meta: dict[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def model_card(model_dir: str | Path, repo_id: str, *, base_model: str | None = None,
               eval_results: dict[str, Any] | None = None, license: str = "other") -> str:
    """README.md text for the converted model in `model_dir`, to be pushed as `repo_id`; `license`: a Hub
    license id (a converted model keeps its base model's license; "other" links to the base model)."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    lin = config["linearize"]
    specs = [LayerSpec.from_dict(d) for d in lin["layers"]]
    converted = [i for i, s in enumerate(specs) if s.kind != SOFTMAX]
    kinds = sorted({s.kind for s in specs if s.kind != SOFTMAX})
    added = new_parameters(model_dir, config)
    recipe_file, summary_file = model_dir / "recipe.yaml", model_dir / "metrics" / "summary.json"
    recipe = recipe_file.read_text() if recipe_file.is_file() else None
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None

    meta: dict[str, Any] = {"license": license}
    if license == "other" and base_model:
        meta.update(license_name="same-as-base-model", license_link=f"https://huggingface.co/{base_model}")
    if base_model:
        meta["base_model"] = base_model
    meta.update({"library_name": "transformers", "pipeline_tag": "text-generation",
                 "tags": ["linearize", "linear-attention", "subquadratic", "distillation", *kinds]})
    base = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else f"A {lin['base_model_type']} model"
    parts = [
        _front_matter(meta),
        f"# {repo_id.split('/')[-1]}\n",
        f"{base} with {len(converted)} of its {len(specs)} attention layers replaced by subquadratic attention "
        f"({', '.join(kinds) or 'none'}) and distilled from the original softmax attention with "
        f"linearize {lin.get('linearize_version', __version__)}. Converted layers decode from a "
        "constant-size recurrent state (plus a fixed window for the hybrid kinds) instead of a growing KV cache.\n",
        "## Use\n",
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        "# with linearize installed (`import linearize` first): its classes and Triton kernels\n"
        f'import linearize\ntok = AutoTokenizer.from_pretrained("{repo_id}")\n'
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n'
        f"# without linearize: the code shipped in this repo ({ENTRY} and linearize_*.py)\n"
        f'tok = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)\n'
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)\n```\n',
        "The shipped code is generated from the linearize package at push time. It needs torch and "
        "transformers (and triton on Linux, for the GPU kernels).\n",
        "## Layer plan\n",
        f"`{lin['plan']}`\n",
        table(["layer", "kind", "options", "new parameters"],
              [[str(i), s.kind, ", ".join(f"{k}={v}" for k, v in s.options.items() if v is not None) or "—",
                f"{added.get(i, 0):,}" if s.kind != SOFTMAX else "—"] for i, s in enumerate(specs)]) + "\n",
        f"New parameters in all: {sum(added.values()):,}.\n",
    ]
    if recipe or summary:
        parts.append("## Training recipe\n")
    if summary:
        tokens = summary.get("train_tokens", {})
        parts.append(
            f"Distilled on {sum(tokens.values()):,} tokens: stage 1 (attention transfer, new parameters only) "
            f"{tokens.get('stage1', 0):,}, stage 2 (LoRA) {tokens.get('stage2', 0):,}. Validation perplexity on held-out "
            f"distillation data: teacher {summary['teacher_val_ppl']:.3f}, after stage 1 {summary['stage1_val_ppl']:.3f}, "
            f"converted {summary['student_val_ppl']:.3f}.\n")
    if recipe:
        parts.append(f"The recipe (`recipe.yaml`; re-run with `linearize convert --config recipe.yaml --out DIR`):\n\n"
                     f"```yaml\n{recipe.rstrip()}\n```\n")
    if eval_results:
        parts += ["## Evaluation\n",
                  f"Teacher vs converted, from `eval/results.json` ({eval_results.get('date', '?')}, "
                  f"{eval_results.get('device', '?')}):\n\n`{eval_results.get('command', '')}`\n",
                  compare_table(compare(eval_results["records"])) + "\n"]
    return "\n".join(parts)
