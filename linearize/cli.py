"""Command line: `linearize convert --model M --plan P --out DIR` (more subcommands join as they land)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml


def _plan_arg(text: str):
    from .plan import LayerPlan

    plan = LayerPlan.from_file(text) if text.endswith((".yaml", ".yml")) else LayerPlan.from_string(text)
    return plan.check_kinds()


def cmd_convert(args: argparse.Namespace) -> None:
    """Load, convert by plan, save model + tokenizer + plan into one folder (complete or absent)."""
    from . import convert, load
    from .convert import atomic_dir
    from .kinds import kind_names

    plan = _plan_arg(args.plan)
    t0 = time.time()
    model, tok = load(args.model)
    before = sum(p.numel() for p in model.parameters())
    convert(model, plan)
    added = sum(p.numel() for p in model.parameters()) - before
    kinds = [s.kind for s in model.layer_plan]
    with atomic_dir(args.out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (Path(tmp) / "plan.yaml").write_text(yaml.safe_dump({"model": str(args.model), "plan": model.config.linearize["plan"]}))
    counts = ", ".join(f"{k}: {kinds.count(k)}" for k in kind_names() if k in kinds)
    print(f"converted {args.model} in {time.time() - t0:.0f}s: {len(kinds)} layers ({counts}), +{added:,} parameters")
    print(f"plan: {model.config.linearize['plan']}")
    print(f"saved to {Path(args.out).resolve()}")
    print("note: the new layers are at their initialization (no distillation has run on them)")


def main(argv: list[str] | None = None) -> int:
    from .errors import LinearizeError

    parser = argparse.ArgumentParser(prog="linearize", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="convert a model's layers by a plan and save it")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a .gguf, a folder or a Hub id")
    p.add_argument("--plan", required=True, help="a plan string like '2-27:lolcats' or a YAML recipe with a plan key")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.set_defaults(func=cmd_convert)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except LinearizeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
