"""Recall on SmolLM2-135M (issue 17): the teacher, head-level plans under a cache budget (training-free
and distilled), the 50% `lolcats` layer plan, each with copy, passkey, MQAR, WikiText-2 perplexity and
the zero-shot tasks, in records of `{"plan", "cache_fraction", "metric", "context", "teacher",
"converted", "train_tokens"}`.

    python benchmarks/recall_smollm2.py --model /tmp/m/smollm2.gguf --data-dir .evaldata/evaldata \
        --out benchmarks/results/recall_smollm2.json --workdir /tmp/recall --steps teacher heads free ours

Steps (each skipped when --workdir already holds its result, so a cut-off call resumes; --resume-from
an earlier results file carries its finished runs, calls and notes into the workdir, so a later session adds rows):
- teacher: every metric of the teacher;
- heads: per-KV-head ablation scores and the plan under --budget (`linearize.autoplan.autoplan_heads`)
  with --plan-kind as the converted heads' kind (their cache cost); heads-NAME: another plan from the
  same scores (another kind or budget);
- free (free-NAME): that plan's softmax heads, every other head `streaming(window=64, sinks=4)`, no training;
- ours / ours-short / lolcats50 / ...: a distillation run from RUNS (plan, data, sequence length,
  tokens), then every metric.
Training data: text sampled from the teacher (cached), plus synthetic recall rows where a run says so.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import linearize
from linearize.autoplan import Budget, HeadScores, autoplan_heads, calibration_rows, choose_heads, head_table, with_kind
from linearize.distill.config import DataConfig, DistillConfig, Stage1Config, Stage2Config
from linearize.distill.run import distill
from linearize.eval.perplexity import text_perplexity
from linearize.eval.recall import recall_accuracy
from linearize.eval.report import run_info
from linearize.eval.run import label
from linearize.info import CacheMeter
from linearize.plan import LayerSpec, specs_to_string

RECALL = {"copy": [256, 1024], "passkey": [1024, 4096, 8192], "mqar": [1024, 4096]}
TASKS = {"local_hellaswag": ("hellaswag_acc_norm", "acc_norm"), "local_arc_easy": ("arc_easy_acc", "acc"),
         "local_arc_challenge": ("arc_challenge_acc_norm", "acc_norm"), "local_piqa": ("piqa_acc", "acc"),
         "local_lambada": ("lambada_acc", "acc")}
# name: (plan: "heads[-NAME]:KIND" = that head plan's softmax heads with KIND elsewhere, or a plan string;
#        seq_len, batch, stage-1 steps, stage-2 steps (0: none), recall_mix, stage-2 learning rate[, recipe keys])
V2 = "heads-v2:lolcats(window=64, sinks=4, window_init=3)"
# window 128 at feature_dim 32 (Hedgehog's 2*32 features = the head dim, LoLCATs' ratio): the same cache as window 64 at 64
W128 = "heads-v2:lolcats(window=128, sinks=4, window_init=3, feature_dim=32)"
RUNS = {
    "ours": ("heads:lolcats(window=64)", 4096, 4, 150, 150, 0.25, 5e-4),
    "ours-short": ("heads:lolcats(window=64)", 1024, 16, 150, 150, 0.0, 5e-4),
    "ours-norecall": ("heads:lolcats(window=64)", 4096, 4, 150, 150, 0.0, 5e-4),
    "ours-sinks": ("heads:lolcats(window=64, sinks=4)", 4096, 4, 150, 150, 0.25, 5e-4),
    "ours-sinks-v2": (V2, 4096, 4, 150, 150, 0.25, 5e-4),
    "ours-sinks-v2-s1": (V2, 4096, 4, 300, 0, 0.25, 5e-4),
    "ours-sinks-v2-lr2": (V2, 4096, 4, 150, 150, 0.25, 2e-4),  # a gentler LoRA stage (it cost LAMBADA)
    "ours-sinks-v2-20m": (V2, 4096, 4, 600, 600, 0.25, 5e-4),  # 19.7M tokens: the budget (two calls, --resume)
    "ours-w128": (W128, 4096, 4, 150, 150, 0.25, 5e-4),
    "ours-w128-lr2": (W128, 4096, 4, 150, 150, 0.25, 2e-4),
    # the same tokens on 8192-token rows: passkey-8k is twice the 4096-token rows of ours-w128 (0.20 vs the baseline's 0.35)
    "ours-w128-8k": (W128, 8192, 2, 150, 150, 0.25, 5e-4),
    "ours-w128-8k-norecall": (W128, 8192, 2, 150, 150, 0.0, 5e-4),  # the recall rows' share of it (teacher text alone)
    "ours-w128-8k-seed1": (W128, 8192, 2, 150, 150, 0.25, 5e-4, {"seed": 1}),  # another seed: teacher samples, rows, init
    # a decay in the linear part: lizard's per-channel gates (GLA) in place of lolcats' undecayed memory, same heads and window
    "ours-w128-8k-lizard": (W128.replace("lolcats(", "lizard("), 8192, 2, 150, 150, 0.25, 5e-4),
    # issue 20's precision study: the frozen weights in bfloat16 (new parameters and LoRA float32), then everything bfloat16
    "ours-w128-bf16": (W128, 4096, 4, 150, 150, 0.25, 5e-4, {"dtype": "bfloat16"}),
    "ours-w128-bf16-all": (W128, 4096, 4, 150, 150, 0.25, 5e-4, {"dtype": "bfloat16", "train_dtype": "bfloat16"}),
    "lolcats50": (",".join(f"{i}:lolcats(window=64)" for i in range(0, 30, 2)), 1024, 16, 125, 125, 0.0, 5e-4),
}


def measure(model, tok, args, log) -> dict[str, float]:
    """Every metric of one model: {"metric@context": value} (context "" for the zero-shot tasks)."""
    from linearize.eval.harness import LinearizeLM, run_tasks

    out: dict[str, float] = {}
    t0 = time.time()
    for task, lengths in RECALL.items():
        items = args.copy_items if task == "copy" else args.recall_items
        for n, acc in recall_accuracy(model, tok, [task], lengths, items=items)[task].items():
            out[f"{task}@{n}"] = acc
    out["wikitext2_ppl@1024"] = text_perplexity(model, tok, Path(args.data_dir) / "wikitext2" / "test.txt", context=1024,
                                                stride=512, batch_size=16, max_tokens=args.ppl_tokens)["ppl"]
    log(f"  recall + ppl {time.time() - t0:.0f}s: {json.dumps({k: round(v, 4) for k, v in out.items()})}")
    res = run_tasks(LinearizeLM(model, tok, batch_size=args.batch_size), list(TASKS), data_dir=args.data_dir,
                    limit=args.limit, bootstrap_iters=0)
    for task, (name, metric) in TASKS.items():
        out[f"{name}@"] = res[task][metric]
    log(f"  all metrics {time.time() - t0:.0f}s: {json.dumps({k: round(v, 4) for k, v in out.items()})}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the teacher (a GGUF path, a folder or smollm2-135m)")
    ap.add_argument("--data-dir", required=True, help="the evaluation data folder (../shared/evaldata layout)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default="/tmp/recall")
    ap.add_argument("--steps", nargs="+", default=["teacher", "heads", "free", "ours"])
    ap.add_argument("--budget", default="cache=25%")
    ap.add_argument("--plan-kind", default="lolcats(window=64)", help="the kind whose cache the head planner counts")
    ap.add_argument("--copy-items", type=int, default=20)
    ap.add_argument("--recall-items", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64, help="lm-eval batch")
    ap.add_argument("--limit", type=int, default=None, help="lm-eval: first N documents per task (smoke runs only)")
    ap.add_argument("--ppl-tokens", type=int, default=None, help="perplexity: first N tokens (smoke runs only)")
    ap.add_argument("--teacher-sequences", type=int, default=512)
    ap.add_argument("--scale-steps", type=float, default=1.0, help="multiply every run's steps (smoke runs)")
    ap.add_argument("--smoke", action="store_true", help="tiny recall lengths for a CPU check of the whole script")
    ap.add_argument("--resume-from", help="an earlier --out file whose finished runs (and head plan) this one keeps")
    args = ap.parse_args()
    if args.smoke:
        RECALL.update(copy=[32], passkey=[256], mqar=[256])
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    state_file = work / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"metrics": {}, "plans": {}, "log": []}
    if args.resume_from and not state["metrics"]:
        state = earlier_state(json.loads(Path(args.resume_from).read_text()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def save() -> None:
        state_file.write_text(json.dumps(state, indent=1))

    def log(msg: str) -> None:
        print(msg, flush=True)
        state["log"].append(msg)

    meter = None
    for step in args.steps:
        if step in state["metrics"]:
            log(f"{step}: done earlier")
            continue
        t0 = time.time()
        if step == "teacher" or step.startswith(("heads", "free")):
            model, tok = linearize.load(args.model)
            model.to(device=device, dtype=dtype).eval()
            meter = meter or CacheMeter(model.config)
            if step.startswith("heads") and "heads" in state["plans"]:  # another kind or budget: the same scores
                scores = HeadScores(**{k: v for k, v in state["plans"]["heads"]["scores"].items() if k != "score"})
                specs = choose_heads(scores, Budget.parse(args.budget), args.plan_kind, meter.fraction)
                scores.settings.update({"budget": args.budget, "kind": args.plan_kind, "cache": meter.summary(specs)})
            elif step.startswith("heads"):
                small = args.smoke  # CPU check: few short rows
                rows = calibration_rows(model, tok, str(Path(args.data_dir) / "wikitext2" / "valid.txt"),
                                        sequences=4 if small else 16, seq_len=128 if small else 512)
                plan, scores = autoplan_heads(model, rows, args.budget, kind=args.plan_kind,
                                              copy_length=32 if small else 256, copy_items=4 if small else 16, log=log)
                specs = plan.resolve(len(scores.score))
            if step.startswith("heads"):
                state["plans"][step] = {"specs": [s.to_dict() for s in specs], "scores": scores.to_dict(), "kind": args.plan_kind}
                log(head_table(scores, specs))
                state["metrics"][step] = {}
            else:
                free = step.startswith("free")
                if free:
                    model = linearize.convert(model, head_plan(state, "heads" + step[4:], "streaming(window=64, sinks=4)"))
                state["plans"][step] = {"plan": label(model), "train_tokens": 0,
                                        "cache_fraction": meter.fraction(model.layer_plan) if free else 1.0}
                state["metrics"][step] = measure(model, tok, args, log)
        else:
            plan_s, seq, batch, s1, s2, mix, lr2, *keys = RUNS[step]
            keys = keys[0] if keys else {}  # recipe keys beyond the columns
            s1, s2 = (max(1, round(s * args.scale_steps)) if s else 0 for s in (s1, s2))  # 0: the stage is skipped
            if plan_s.startswith("heads"):
                plan_s = head_plan(state, *plan_s.split(":", 1))
            cfg = DistillConfig(
                model=args.model, plan=plan_s,
                data=DataConfig(source="teacher", seq_len=seq, teacher_len=1024, teacher_sequences=args.teacher_sequences,
                                val_fraction=0.05, recall_mix=mix, cache_dir=str(work / "cache")),
                stage1=Stage1Config(steps=s1, batch_size=batch, lr=3e-2, save_every=50),
                stage2=Stage2Config(steps=s2, batch_size=batch, lr=lr2, kl_weight=1.0, ce_weight=0.0, save_every=50),
                **{"seed": 0, **keys},
            )
            out_dir = work / step
            if not out_dir.is_dir():
                distill(cfg, out_dir, resume=(work / f"{step}.ckpt").is_dir(), log=log)
            model, tok = linearize.load(out_dir)
            model.to(device=device, dtype=dtype).eval()
            meter = meter or CacheMeter(model.config)
            state["plans"][step] = {"plan": label(model), "cache_fraction": meter.fraction(model.layer_plan),
                                    "train_tokens": (s1 + s2) * batch * seq, "seq_len": seq, "recall_mix": mix, "stage2_lr": lr2,
                                    **keys}
            state["metrics"][step] = measure(model, tok, args, log)
        log(f"{step}: {time.time() - t0:.0f}s")
        save()
        del model
        gc.collect()
        torch.cuda.empty_cache() if device == "cuda" else None
    write_results(state, args)


def earlier_state(results: dict) -> dict:
    """The workdir state of an earlier results file: each run's metrics, the teacher's, the plans, the log."""
    metrics: dict[str, dict[str, float]] = {"teacher": {}}
    for r in results["records"]:
        key = f"{r['metric']}@{'' if r['context'] is None else r['context']}"  # measure()'s keys
        metrics.setdefault(r["run"], {})[key] = r["converted"]
        if r["teacher"] is not None:
            metrics["teacher"][key] = r["teacher"]
    plans = dict(results["runs"])
    heads = results.get("head_plans") or {"heads": {"specs": results["head_plan"], "scores": results["head_scores"]}}
    for name, plan in heads.items():
        plans[name], metrics[name] = plan, {}
    return {"metrics": metrics, "plans": plans, "log": [f"(from {results['date']}) {m}" for m in results["log"]],
            "calls": results.get("calls", []), "notes": results.get("notes")}


def head_plan(state: dict, source: str, kind: str) -> str:
    """The head plan `source`'s softmax heads with `kind` in place of its converted kind."""
    return specs_to_string(with_kind([LayerSpec.from_dict(d) for d in state["plans"][source]["specs"]], kind))


def write_results(state: dict, args: argparse.Namespace) -> None:
    """The records of every run against the teacher's values, with the run's information."""
    teacher = state["metrics"].get("teacher", {})
    records = []
    for name, metrics in state["metrics"].items():
        if name == "teacher" or name.startswith("heads"):
            continue
        info = state["plans"][name]
        for key, value in metrics.items():
            metric, _, ctx = key.partition("@")
            records.append({"run": name, "plan": info["plan"], "cache_fraction": round(info["cache_fraction"], 4),
                            "metric": metric, "context": int(ctx) if ctx else None, "teacher": teacher.get(key),
                            "converted": value, "train_tokens": info["train_tokens"]})
    command = shlex.join(["python", *sys.argv])
    out = {**run_info(command), "settings": {k: v for k, v in vars(args).items() if k != "out"},
           "runs": {k: v for k, v in state["plans"].items() if not k.startswith("heads")},
           "head_scores": state["plans"].get("heads", {}).get("scores"), "head_plan": state["plans"].get("heads", {}).get("specs"),
           "head_plans": {k: v for k, v in state["plans"].items() if k.startswith("heads")},
           "records": records, "log": state["log"], "calls": state.get("calls", []) + [command], "notes": state.get("notes")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
