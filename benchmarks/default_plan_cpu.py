"""`make convert`'s default recipe on a CPU (issue 17): its old layer plan against head-level plans at the
same cache, trained on the recipe's CPU budget, and the training-free baseline; WikiText-2 perplexity and
recall (copy, passkey, MQAR) at 512 tokens, in records of `{"run", "plan", "cache_fraction", "metric",
"context", "teacher", "converted", "train_tokens"}` (and `val_ppl`, the recipe's held-out teacher samples: what
choices were made on).

    python benchmarks/default_plan_cpu.py --out benchmarks/results/default_plan_cpu.json
    python benchmarks/default_plan_cpu.py --out benchmarks/results/default_plan_cpu.json --runs heads-w128-recall

(`--runs`: those runs only; the records of the others are kept from --out, the new ones listed under "additions".)

The head plan keeps softmax in the best KV heads of the head scores measured on the GPU
(`results/recall_smollm2.json`, `head_scores`: WikiText-2 valid.txt and copy rows) while the plan's cache
at 4k stays within the old default's. Each run is `linearize convert` + `linearize eval` into
--workdir, skipped when its folder is there (a cut-off run resumes).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import linearize
from linearize.autoplan import Budget, HeadScores, choose_heads, with_kind
from linearize.eval.report import run_info
from linearize.info import CacheMeter
from linearize.plan import LayerPlan, specs_to_string

RECIPE = "configs/smollm2-135m.yaml"
OLD_DEFAULT = "0-1:softmax,2-27:lolcats(window=64),28-:softmax"
EVAL = ["--perplexity", "{data}/wikitext2/test.txt", "--context", "512", "--stride", "256", "--max-tokens", "4096",
        "--recall", "copy,passkey,mqar", "--recall-lengths", "512", "--recall-items", "20"]


def head_plan(scores_file: str, kind: str, fraction: float, meter: CacheMeter) -> str:
    """Softmax in the best-scored KV heads while the cache fraction stays <= `fraction`, `kind` elsewhere."""
    saved = json.loads(Path(scores_file).read_text())["head_scores"]
    scores = HeadScores(**{k: v for k, v in saved.items() if k != "score"})
    return specs_to_string(choose_heads(scores, Budget("cache", fraction), kind, meter.fraction))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default="out/cpu_study")
    ap.add_argument("--data-dir", default="../shared/evaldata")
    ap.add_argument("--scores", default="benchmarks/results/recall_smollm2.json")
    ap.add_argument("--runs", nargs="+", help="run only these (default: all)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model, _ = linearize.load()
    meter = CacheMeter(model.config)
    budget = meter.fraction(LayerPlan.from_string(OLD_DEFAULT).resolve(model.config.num_hidden_layers))
    heads = head_plan(args.scores, "lolcats(window=64, sinks=4)", budget, meter)
    # the same heads kept, a window with sinks elsewhere, no training
    free = specs_to_string(with_kind(LayerPlan.from_string(heads).resolve(model.config.num_hidden_layers), "streaming(window=64, sinks=4)"))
    runs = {  # name: (plan, extra convert arguments)
        "layers": (OLD_DEFAULT, []),
        "layers-sinks": (OLD_DEFAULT.replace("window=64)", "window=64, sinks=4)"), []),
        "heads-sinks": (heads, []),
        "heads-free": (free, ["stage1.steps=0", "stage2.steps=0"]),
        # the hybrid started at the window's side (sigmoid(3) = 0.95: nearly the training-free plan)
        "heads-sinks-init3": (head_plan(args.scores, "lolcats(window=64, sinks=4, window_init=3)", budget, meter), []),
        # twice the window at half the feature dimension: the same cache per head (the GPU's ours-w128)
        "heads-w128": (w128 := head_plan(args.scores, "lolcats(window=128, sinks=4, window_init=3, feature_dim=32)", budget, meter), []),
        # ablations of the default: a quarter of the rows recall-rich (distill/recall_data.py), a decay in the linear part
        "heads-w128-recall": (w128, ["data.recall_mix=0.25"]),
        "heads-w128-lizard": (specs_to_string(with_kind(LayerPlan.from_string(w128).resolve(model.config.num_hidden_layers),
                                                        "lizard(window=128, sinks=4, window_init=3, feature_dim=32)")), []),
    }
    unknown = set(args.runs or ()) - set(runs)
    if unknown:
        ap.error(f"unknown runs {sorted(unknown)}; choose from {', '.join(runs)}")
    runs = {name: run for name, run in runs.items() if not args.runs or name in args.runs}
    cli = [sys.executable, "-m", "linearize.cli"]
    evals = [a.format(data=args.data_dir) for a in EVAL]
    commands = []

    def run(cmd: list[str], out: Path, log: Path) -> None:
        """`cmd` (recorded) unless its output folder is there already."""
        commands.append(shlex.join(["linearize", *cmd[3:]]))
        if not out.is_dir():
            with log.open("a") as f:
                subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)

    run([*cli, "eval", "smollm2-135m", "--out", str(work / "teacher-eval"), *evals], work / "teacher-eval", work / "teacher.log")
    results = {"teacher": json.loads((work / "teacher-eval" / "results.json").read_text())}
    for name, (plan, extra) in runs.items():
        run([*cli, "convert", "--config", RECIPE, "--plan", plan, "--out", str(work / name), *extra], work / name, work / f"{name}.log")
        run([*cli, "eval", str(work / name), "--out", str(work / f"{name}-eval"), *evals], work / f"{name}-eval", work / f"{name}.log")
        results[name] = json.loads((work / f"{name}-eval" / "results.json").read_text())

    def values(res: dict) -> dict[tuple[str, int | None], float]:
        out = {}
        for r in res["records"]:
            task, _, ctx = r["task"].partition("@")
            out[("wikitext2_ppl", 512) if task.startswith("ppl:") else (task, int(ctx))] = r["value"]
        return out

    teacher = values(results["teacher"])
    records = []
    for name, (plan, _) in runs.items():
        summary = json.loads((work / name / "metrics" / "summary.json").read_text())
        specs = LayerPlan.from_string(plan).resolve(model.config.num_hidden_layers)
        got = {**values(results[name]), ("val_ppl", 256): summary["student_val_ppl"]}  # held-out teacher samples: the tuning data
        teacher[("val_ppl", 256)] = summary["teacher_val_ppl"]
        for (metric, ctx), value in got.items():
            records.append({"run": name, "plan": plan, "cache_fraction": round(meter.fraction(specs), 4), "metric": metric,
                            "context": ctx, "teacher": teacher[(metric, ctx)], "converted": value,
                            "train_tokens": sum(summary["train_tokens"].values())})
    out = {**run_info(shlex.join(["python", *sys.argv])), "recipe": RECIPE, "budget_cache_fraction": round(budget, 4),
           "commands": commands, "records": records}
    if args.runs and Path(args.out).is_file():  # a subset: the other runs' records stay, this call is an addition
        old = json.loads(Path(args.out).read_text())
        added = {k: out[k] for k in ("command", "date", "device", "versions", "commands")}
        out = {**old, "records": [r for r in old["records"] if r["run"] not in runs] + records,
               "additions": [*old.get("additions", []), {**added, "runs": list(runs)}]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("| run | cache | metric | teacher | converted |\n| --- | ---: | --- | ---: | ---: |")
    for r in records:
        print(f"| {r['run']} | {r['cache_fraction']} | {r['metric']}@{r['context']} | {r['teacher']:.4f} | {r['converted']:.4f} |")


if __name__ == "__main__":
    main()
