"""Command line: `linearize convert` runs a recipe (load, convert, distill, save)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def cmd_convert(args: argparse.Namespace) -> None:
    """Convert by the recipe's plan, distill (stage 1 + 2), save model + plan + recipe + metrics."""
    from .distill import distill, load_config

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model={args.model}")
    if args.plan:
        overrides.append(f"plan={args.plan}")
    s = distill(load_config(args.config, overrides), args.out, resume=args.resume)  # checks the plan before loading
    if int(os.environ.get("RANK", "0")):
        return  # several processes: the first one reports
    print(f"\nplan: {s['plan']}")
    print(f"validation perplexity: teacher {s['teacher_val_ppl']:.3f}, converted {s['student_val_ppl']:.3f} "
          f"(after stage 1: {s['stage1_val_ppl']:.3f}; {s['student_val_ppl'] / s['teacher_val_ppl'] - 1:+.1%} vs teacher)")
    print(f"trained on {s['train_tokens']['stage1']:,} + {s['train_tokens']['stage2']:,} tokens in {s['seconds']:.0f}s")
    print(f"saved to {Path(args.out).resolve()}")


def main(argv: list[str] | None = None) -> int:
    from .errors import LinearizeError

    parser = argparse.ArgumentParser(prog="linearize", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="convert a model by a recipe, distill it and save it")
    p.add_argument("--config", default=None, help="YAML recipe (configs/*.yaml); default: built-in defaults")
    p.add_argument("--model", default=None, help="overrides the recipe: smollm2-135m, a .gguf, a folder or a Hub id")
    p.add_argument("--plan", default=None, help="overrides the recipe's plan, e.g. '2-27:lolcats(window=64)'")
    p.add_argument("--out", required=True, help="output folder (appears only when complete)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in OUT.ckpt/")
    p.add_argument("overrides", nargs="*", help="recipe overrides as section.key=value, e.g. stage1.steps=100")
    p.set_defaults(func=cmd_convert)
    args, extra = parser.parse_known_args(argv)  # overrides may come before or after the flags
    bad = [e for e in extra if e.startswith("-") or "=" not in e]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = [*args.overrides, *extra]
    try:
        args.func(args)
    except LinearizeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
