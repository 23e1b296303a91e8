"""linearize: turn a pretrained Hugging Face causal LM into a subquadratic one.

  inspect  what a model is, which adapter applies, what each attention kind would add
  plan     resolve a layer plan against a model, or choose one from layer scores under a budget
  convert  convert by a recipe, distill (stage 1 attention transfer + stage 2 LoRA), save
  eval     lm-eval tasks, perplexity and recall; teacher vs converted
  bench    prefill/decode speed and memory vs context
  push     upload a converted model with its model card and remote code to the Hub"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import LinearizeError


def _plan_arg(text: str) -> str | dict:
    """A plan string, or the `plan` of a YAML file (as `linearize plan --out` writes)."""
    if text.endswith((".yaml", ".yml")):
        from .plan import LayerPlan, read_plan_file

        plan = read_plan_file(text)
        LayerPlan.coerce(plan)  # checks its syntax
        return plan
    return text


def cmd_convert(args: argparse.Namespace) -> None:
    """Convert by the recipe's plan, distill (stage 1 + 2), save model + plan + recipe + metrics."""
    from .distill import distill, load_config

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model={args.model}")
    cfg = load_config(args.config, overrides)
    if args.plan is not None:
        cfg.plan = _plan_arg(args.plan)
    s = distill(cfg, args.out, resume=args.resume, force=args.force)  # checks the plan and --out before loading
    if int(os.environ.get("RANK", "0")):
        return  # several processes: the first one reports
    print(f"\nplan: {s['plan']}")
    print(f"validation perplexity: teacher {s['teacher_val_ppl']:.3f}, converted {s['student_val_ppl']:.3f} "
          f"(after stage 1: {s['stage1_val_ppl']:.3f}; {s['student_val_ppl'] / s['teacher_val_ppl'] - 1:+.1%} vs teacher)")
    print(f"trained on {s['train_tokens']['stage1']:,} + {s['train_tokens']['stage2']:,} tokens in {s['seconds']:.0f}s")
    print(f"saved to {Path(args.out).resolve()}")


def cmd_inspect(args: argparse.Namespace) -> None:
    """Architecture, sizes, adapter, parameter counts and what each kind would add (no weights loaded); with
    --config, the memory each stage of that recipe needs on each GPU."""
    from .info import describe, format_description, resolve_plan

    if args.config is None:
        if args.set or args.gpus != 1:
            raise LinearizeError("--set and --gpus describe a run: give its recipe too (--config RECIPE)")
        print(format_description(describe(args.model)))
        return
    if args.gpus < 1:
        raise LinearizeError(f"--gpus {args.gpus}: give the number of GPUs the run shards over (1 or more)")
    from .distill import load_config
    from .distill.memory import estimate, format_estimate
    from .loading import load_config as model_config

    cfg = load_config(args.config, [*args.set, *([f"model={args.model}"] if args.model else [])])
    cfg.check()
    raw = model_config(cfg.model)  # read once (a Hub id: one lookup)
    config, _ = resolve_plan(cfg.model, cfg.plan, raw)  # the plan must fit the model before anything is estimated
    print(format_description(describe(cfg.model, raw)))
    print(format_estimate(estimate(config, cfg, args.gpus), cfg, args.gpus))


def cmd_plan(args: argparse.Namespace) -> None:
    """A plan resolved against the model (--plan), or chosen from layer scores under --budget; per-layer
    table; --out writes the plan as YAML for convert, --report the scores (json, table, plot)."""
    import yaml

    from .outputs import check_out, write_file
    from .plan import SOFTMAX, specs_to_string

    if bool(args.plan) == bool(args.budget):
        raise LinearizeError("give either --plan (a plan to resolve) or --budget (choose one from layer scores)")
    output = dict(force=args.force, inputs=[args.model])
    for path in (args.out, args.report):
        if path:
            check_out(path, "plan", **output)  # before any model loads
    if args.budget:
        specs, costs = _auto_plan(args, output)
    else:
        from .info import plan_rows

        specs, costs = plan_rows(args.model, _plan_arg(args.plan))
    from .info import format_cache, plan_cache

    plan = specs_to_string(specs)
    print(f"plan: {plan}")
    cache, summary = plan_cache(args.model, specs)
    if costs is not None:
        print(f"{'layer':>5}  {'kind':<10} {'new parameters':>15} {'cache B/token':>14} {'fixed cache B':>14}  options")
        for i, (spec, n, (grow, fixed)) in enumerate(zip(specs, costs, cache)):
            opts = spec.to_string().partition("(")[2].rstrip(")")
            print(f"{i:>5}  {spec.kind:<10} {'-' if spec.kind == SOFTMAX else f'{n:,}':>15} {grow:>14,} {fixed:>14,}  {opts}")
        print(f"{sum(s.kind != SOFTMAX for s in specs)} of {len(specs)} layers converted, {sum(costs):,} parameters added")
    print(format_cache(summary))
    if args.out:
        write_file(args.out, yaml.safe_dump({"model": args.model, "plan": plan}, sort_keys=False), "plan", **output)
        print(f"wrote {args.out} (use: linearize convert --plan {args.out} ...)")


def _auto_plan(args: argparse.Namespace, output: dict) -> tuple[list, None]:
    """Load the model, score its layers on calibration data, choose under the budget, print the table."""
    from .autoplan import Budget, autoplan, calibration_rows, report_table, write_report
    from .eval.run import _positive, pick_device
    from .loading import load
    from .plan import split_top_level

    budget = Budget.parse(args.budget)  # bad input fails before the model loads
    _positive(sequences=args.sequences, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, window=args.window,
              copy_length=args.copy_length)
    if args.steps < 0:  # 0: the candidate kinds are scored without a stage-1 transfer
        raise LinearizeError(f"--steps {args.steps}: must be 0 or more (stage-1 steps per candidate kind)")
    kinds = [k.strip() for k in split_top_level(args.kinds) if k.strip()]
    model, tok = load(args.model, device=pick_device(args.device))
    rows = calibration_rows(model, tok, args.data, sequences=args.sequences, seq_len=args.seq_len, seed=args.seed,
                            model_id=str(args.model))
    if budget.kind == "cache":
        return _head_plan(args, model, rows, budget, kinds[0], output)
    plan, scores = autoplan(model, rows, budget, kinds=kinds, window=args.window, scores=args.scores, steps=args.steps,
                            batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    specs = plan.resolve(scores.num_layers)
    print(report_table(scores, specs))
    if args.report:
        header = f"# Layer scores of {args.model} (budget {budget})\n\n- settings: {scores.settings}\n\n"
        print(f"wrote {write_report(args.report, scores, specs, header, **output).resolve()}/ (scores.json, report.md, scores.png)")
    return specs, None


def _head_plan(args: argparse.Namespace, model: Any, rows: Any, budget: Any, kind: str, output: dict) -> tuple[list, None]:
    """Head-level plan under a cache budget: per-head ablation scores, the kept heads, the report."""
    from .autoplan import autoplan_heads, head_table, write_head_report

    plan, scores = autoplan_heads(model, rows, budget, kind=kind, copy_length=args.copy_length, window=args.window,
                                  batch_size=args.batch_size, seed=args.seed)
    specs = plan.resolve(len(scores.score))
    print(head_table(scores, specs))
    if args.report:
        header = f"# Head scores of {args.model} (budget {budget})\n\n- settings: {scores.settings}\n\n"
        print(f"wrote {write_head_report(args.report, scores, specs, header, **output).resolve()}/ (head_scores.json, report.md)")
    return specs, None


def cmd_push(args: argparse.Namespace) -> None:
    """Stage the Hub layout (model, code, card, plan, recipe, eval) and upload it in one commit."""
    from .hub import push

    ops = push(args.model_dir, args.repo_id, private=args.private, revision=args.revision, dry_run=args.dry_run,
               out=args.out, eval_dir=args.eval, base_model=args.base_model, license=args.license, force=args.force)
    for op in ops:
        size = getattr(op, "upload_info", None)
        print(f"  {'delete' if size is None else 'add'}  {op.path_in_repo}" + (f"  ({size.size:,} bytes)" if size else ""))
    if args.dry_run:
        out = args.out or str(Path(args.model_dir).with_name(Path(args.model_dir).name + "-hub"))
        print(f"dry run: {len(ops)} files staged in {Path(out).resolve()} (README.md is the model card); nothing uploaded")
    else:
        print(f"pushed to https://huggingface.co/{args.repo_id}" + (f" (branch {args.revision})" if args.revision else ""))


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _count_or_fraction(text: str) -> int | float:
    """--limit: N documents (an int) or a fraction of them."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    return int(value) if value.is_integer() else value


def _names(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def cmd_eval(args: argparse.Namespace) -> None:
    """lm-eval tasks, perplexity and recall of MODEL (and of --compare); results.json + report.md in --out."""
    from .eval.run import run_eval

    run_eval(args.model, args.out, compare_with=args.compare, device=args.device, dtype=args.dtype, tasks=args.tasks,
             data_dir=args.data_dir, limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
             max_length=args.max_length, perplexity=args.perplexity, context=args.context, stride=args.stride,
             max_tokens=args.max_tokens, force=args.force,
             recall=args.recall, recall_lengths=args.recall_lengths, recall_items=args.recall_items)
    print(f"wrote {Path(args.out).resolve()}/results.json and report.md")


def cmd_bench(args: argparse.Namespace) -> None:
    """Prefill/decode tokens/s and peak memory vs context of MODEL (and of --compare)."""
    import torch

    from .eval.run import run_bench

    gpu = torch.cuda.is_available() and args.device != "cpu"
    run_bench(args.model, args.out, compare_with=args.compare, device=args.device, dtype=args.dtype,
              lengths=args.lengths or ([1024, 2048, 4096, 8192, 16384, 32768] if gpu else [128, 256, 512]),
              batch_sizes=args.batch_sizes, decode_tokens=args.decode_tokens, repeats=args.repeats, force=args.force)
    print(f"wrote {Path(args.out).resolve()}/results.json, report.md and bench.png")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a converted model folder (or any model: smollm2-135m, a .gguf, a folder, a Hub id)")
    p.add_argument("--compare", metavar="TEACHER", default=None,
                   help="also run TEACHER (e.g. smollm2-135m) and report converted vs teacher")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is a GPU)")
    p.add_argument("--dtype", default="auto", help="bfloat16, float16 or float32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--out", required=True, help="output folder for results.json and report.md (appears when complete)")
    _force_arg(p)


def _force_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="let --out replace an existing folder that this command did not "
                   "write (never the input model or the current folder)")


def _recipes_help() -> str:
    from .recipes import recipes

    known = recipes()
    width = max((len(n) for n in known), default=0)
    lines = [f"  {name:<{width}}  {desc}" for name, (_, desc) in known.items()]
    return "recipes (--config NAME; configs/*.yaml):\n" + "\n".join(lines) if lines else ""


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(prog="linearize", description=__doc__, epilog=_recipes_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"linearize {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="architecture, sizes, adapter and what each kind would add (no weights loaded); "
                                       "with --config, each stage's GPU memory")
    p.add_argument("model", nargs="?", default=None,
                   help="smollm2-135m (default; with --config, the recipe's model), a .gguf, a folder or a Hub id")
    p.add_argument("--config", default=None, help="a recipe (name or YAML file): print the memory each stage needs")
    p.add_argument("--gpus", type=int, default=1, help="with --config: the GPUs FSDP shards over (configs/accelerate/fsdp.yaml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="with --config: recipe overrides, e.g. stage2.batch_size=8 data.seq_len=4096")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plan", help="resolve a layer plan against a model; --out writes it as YAML for convert")
    p.add_argument("model", nargs="?", default="smollm2-135m", help="smollm2-135m (default), a .gguf, a folder or a Hub id")
    p.add_argument("--plan", default=None, help="a plan to resolve: '0-1:softmax,2-27:lolcats(window=64),28-:softmax' or a YAML file")
    p.add_argument("--budget", default=None, help="choose the plan from layer scores: softmax=K (keep K softmax layers), "
                   "ratio=R (R converted per softmax layer), ppl=X%% (calibration ppl after stage 1 at most X%% up) or "
                   "cache=X%% (head level: softmax kept in the KV heads whose loss most hurts copy recall and text, "
                   "the plan's cache at 4k tokens at most X%% of the teacher's KV cache)")
    p.add_argument("--out", default=None, help="write the plan here (YAML; convert --plan FILE reads it)")
    g = p.add_argument_group("with --budget")
    g.add_argument("--kinds", default="lolcats(window=64),lizard(window=64)",
                   help="candidate kinds, comma-separated (cache=X%%: the first is every converted head's kind)")
    g.add_argument("--scores", choices=["transfer", "stats"], default="transfer",
                   help="transfer: short stage 1 per kind (error and impact per layer); stats: attention statistics only")
    g.add_argument("--window", type=int, default=64, help="window of the locality statistic and of the head ablation")
    g.add_argument("--copy-length", type=int, default=256, help="cache=X%%: copy sequences scoring recall (shown twice)")
    g.add_argument("--data", default="teacher", help="calibration text: teacher samples (default) or a txt/jsonl file")
    g.add_argument("--sequences", type=int, default=32, help="calibration sequences (a quarter held out)")
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--steps", type=int, default=30, help="stage-1 steps per candidate kind")
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--lr", type=float, default=0.01)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is a GPU)")
    g.add_argument("--report", default=None, metavar="DIR", help="write scores.json, report.md and scores.png here")
    _force_arg(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("convert", help="convert a model by a recipe, distill it and save it",
                       epilog=_recipes_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="recipe: a name listed below or a YAML file; default: built-in defaults")
    p.add_argument("--model", default=None, help="overrides the recipe: smollm2-135m, a .gguf, a folder or a Hub id")
    p.add_argument("--plan", default=None, help="overrides the recipe's plan: '2-27:lolcats(window=64)' or a YAML file")
    p.add_argument("--out", required=True, help="output folder (appears only when complete)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in OUT.ckpt/")
    _force_arg(p)
    p.add_argument("overrides", nargs="*", help="recipe overrides as section.key=value, e.g. stage1.steps=100")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("push", help="upload a converted model folder to the Hugging Face Hub with a model card")
    p.add_argument("model_dir", help="a converted model folder (the --out of convert)")
    p.add_argument("repo_id", help="user/name or org/name on the Hub")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, help="push to this branch (created if missing)")
    p.add_argument("--dry-run", action="store_true", help="write the repo layout locally (with README.md) and list it; upload nothing")
    p.add_argument("--out", default=None, help="--dry-run: where to write the layout (default MODEL_DIR-hub)")
    p.add_argument("--eval", default=None, metavar="DIR", help="eval results to publish (default: MODEL_DIR/eval or MODEL_DIR-eval)")
    p.add_argument("--base-model", default=None, help="Hub id of the original model (default: from recipe.yaml)")
    p.add_argument("--license", default=None, help="the model card's license, a Hub license id (default: the base "
                   "model's for the embedded SmolLM2, else 'other' with a link to the base model)")
    p.add_argument("--force", action="store_true", help="replace the files of a Hub repo that holds other content "
                   "(--dry-run: let --out replace a folder that push did not write)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("eval", help="lm-eval tasks, perplexity and recall; teacher vs converted with --compare")
    _model_args(p)
    p.add_argument("--tasks", type=_names, default=[], help="comma-separated lm-eval tasks: lm-eval's own names "
                   "(piqa, hellaswag, ...: need the Hub), offline ones (local_wikitext2, local_hellaswag, local_arc_easy, "
                   "local_arc_challenge, local_piqa, local_lambada) or 'local' for every offline task with data")
    p.add_argument("--data-dir", default=None,
                   help="folder of the offline tasks' files (default: $LINEARIZE_EVAL_DATA)")
    p.add_argument("--limit", type=_count_or_fraction, default=None, help="lm-eval: at most N documents per task (or a fraction)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None, help="lm-eval: window of rolling loglikelihoods (default: the model's)")
    p.add_argument("--perplexity", nargs="+", default=[], metavar="FILE", help="text files to score")
    p.add_argument("--context", type=int, default=1024, help="perplexity window (tokens)")
    p.add_argument("--stride", type=int, default=None, help="perplexity stride (default: the window)")
    p.add_argument("--max-tokens", type=int, default=None, help="perplexity: score only the first N tokens of each file")
    p.add_argument("--recall", type=_names, default=[], help="recall tasks: mqar, passkey, copy (copy: the length is the sequence shown twice)")
    p.add_argument("--recall-lengths", type=_ints, help="context lengths of the recall items (default 1024,2048,4096)")
    p.add_argument("--recall-items", type=int, default=20, help="items per recall task and length")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="prefill/decode tokens/s and peak memory vs context; teacher too with --compare")
    _model_args(p)
    p.add_argument("--lengths", type=_ints, default=None, help="contexts (default: 1k..32k on GPU, 128..512 on CPU)")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 8])
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=cmd_bench)
    args, extra = parser.parse_known_args(argv)  # convert's overrides may come before or after the flags
    bad = [e for e in extra if e.startswith("-") or "=" not in e or args.command != "convert"]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if args.command == "convert":
        args.overrides = [*args.overrides, *extra]
    try:
        args.func(args)
    except LinearizeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted" + (" (continue with --resume)" if args.command == "convert" else ""), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
