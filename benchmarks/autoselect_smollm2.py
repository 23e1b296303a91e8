"""Automatic layer selection against two fixed patterns on SmolLM2-135M-Instruct, at an equal number of
softmax layers and an equal distillation budget; WikiText-2 test perplexity of each.

    python benchmarks/autoselect_smollm2.py --model PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf \
        --wikitext ../shared/evaldata/wikitext2/test.txt --out benchmarks/results/autoselect_smollm2.json

Selectors (each keeps --softmax-layers softmax layers; the others get --kind, or for `auto` the
planner's choice among --auto-kinds):
  auto        `linearize.autoplan` on calibration rows taken from the distillation training data
  every_k     softmax in layers 0, k, 2k, ... (k = ceil(layers / softmax layers))
  first_last  softmax in the first and last layers (half each)
Each plan is then distilled with the same recipe (teacher-sampled data, cached once). Records go to
--out after each plan; --resume skips finished selectors and continues an interrupted one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import time
from pathlib import Path

import torch

import linearize
from linearize.autoplan import autoplan, write_report
from linearize.distill.config import DataConfig, DistillConfig, Stage1Config, Stage2Config
from linearize.distill.data import pack, split, teacher_texts
from linearize.distill.run import distill
from linearize.eval import text_perplexity


def fixed_plans(num_layers: int, softmax: int, kind: str) -> dict[str, str]:
    """The every_k and first_last plans with exactly `softmax` softmax layers."""
    k = -(-num_layers // softmax)
    every = list(range(0, num_layers, k))
    first_last = list(range(softmax // 2)) + list(range(num_layers - (softmax - softmax // 2), num_layers))
    plans = {}
    for name, keep in (("every_k", every), ("first_last", first_last)):
        assert len(keep) == softmax, (name, keep)
        plans[name] = f"*:{kind}," + ",".join(f"{i}:softmax" for i in keep)
    return plans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--wikitext", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reports", default=None, help="folder for the auto planner's scores.json, report.md, scores.png")
    ap.add_argument("--selectors", nargs="+", default=["auto", "every_k", "first_last"])
    ap.add_argument("--softmax-layers", type=int, default=8)
    ap.add_argument("--kind", default="lolcats(window=64)", help="the converted layers' kind in the fixed plans")
    ap.add_argument("--auto-kinds", default="lolcats(window=64);lizard(window=64)", help="candidate kinds, ';'-separated")
    ap.add_argument("--calibration-sequences", type=int, default=64, help="rows of the training data the planner scores on")
    ap.add_argument("--score-steps", type=int, default=100)
    ap.add_argument("--score-batch", type=int, default=8)
    ap.add_argument("--score-lr", type=float, default=3e-2)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--teacher-sequences", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--stage1-steps", type=int, default=150)
    ap.add_argument("--stage2-steps", type=int, default=100)
    ap.add_argument("--stage1-lr", type=float, default=3e-2)
    ap.add_argument("--stage2-lr", type=float, default=5e-4)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=None, help="score only the first N tokens (smoke runs)")
    ap.add_argument("--workdir", default="/tmp/linearize-autoselect")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()

    import peft
    import transformers

    out, work = Path(args.out), Path(args.workdir)
    result = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {"linearize": linearize.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "records": [],
    }
    if args.resume and out.is_file():
        result["records"] = json.loads(out.read_text())["records"]
    done = {r.get("selector") for r in result["records"]}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")

    data = DataConfig(source="teacher", seq_len=args.seq_len, teacher_sequences=args.teacher_sequences, val_fraction=0.02,
                      cache_dir=str(work / "cache"))
    cfg = dict(model=args.model, seed=0, data=data,
               stage1=Stage1Config(steps=args.stage1_steps, batch_size=args.batch, lr=args.stage1_lr),
               stage2=Stage2Config(steps=args.stage2_steps, batch_size=args.batch, lr=args.stage2_lr, kl_weight=1.0,
                                   ce_weight=0.0))
    tokens = (args.stage1_steps + args.stage2_steps) * args.batch * args.seq_len
    device = "cuda" if torch.cuda.is_available() else "cpu"

    plan_file = work / "auto_plan.txt"
    if "auto" in args.selectors and "auto" not in done and not plan_file.is_file():
        t0 = time.time()
        model, tok = linearize.load(args.model, device=device)
        rows, _ = split(pack(teacher_texts(model, tok, data, 0, model_id=args.model), tok, args.seq_len), 0.02, 0)
        plan, scores = autoplan(model, rows[: args.calibration_sequences], f"softmax={args.softmax_layers}",
                                kinds=args.auto_kinds.split(";"), window=64, steps=args.score_steps,
                                batch_size=args.score_batch, lr=args.score_lr, seed=0)
        specs = plan.resolve(scores.num_layers)
        scores.settings["seconds"] = round(time.time() - t0, 1)
        if args.reports:
            write_report(args.reports, scores, specs, f"# Automatic plan for SmolLM2-135M-Instruct, {args.softmax_layers} "
                         f"softmax layers\n\n- command: `{result['command']}`\n- settings: {scores.settings}\n\n")
        work.mkdir(parents=True, exist_ok=True)
        plan_file.write_text(linearize.plan.specs_to_string(specs))
        print(f"auto plan ({time.time() - t0:.0f}s): {plan_file.read_text()}", flush=True)
        del model
        torch.cuda.empty_cache()

    plans = fixed_plans(30, args.softmax_layers, args.kind)
    for selector in args.selectors:
        if selector in done:
            continue
        plan = plan_file.read_text() if selector == "auto" else plans[selector]
        t0 = time.time()
        evals = []

        def evaluate(model, tok):
            ppl = text_perplexity(model, tok, args.wikitext, context=args.context, stride=args.stride,
                                  max_tokens=args.eval_tokens)["ppl"]
            evals.append(ppl)
            print(f"{selector}: WikiText-2 ppl {ppl:.3f} ({time.time() - t0:.0f}s)", flush=True)
            return {"ppl": ppl}

        run_dir = work / selector
        if run_dir.exists():
            shutil.rmtree(run_dir)
        if not args.resume:
            shutil.rmtree(Path(str(run_dir) + ".ckpt"), ignore_errors=True)
        s = distill(DistillConfig(plan=plan, **cfg), run_dir, evaluate=evaluate, resume=args.resume)
        if not any(r.get("selector") == "teacher" for r in result["records"]):
            result["records"].insert(0, {"selector": "teacher", "plan": "teacher", "softmax_layers": 30, "wikitext2_ppl": evals[0]})
        softmax = sum(spec.kind == "softmax" for spec in linearize.LayerPlan.from_string(s["plan"]).resolve(30))
        result["records"].append({"selector": selector, "plan": s["plan"], "softmax_layers": softmax,
                                  "wikitext2_ppl": evals[-1], "stage1_wikitext2_ppl": evals[1], "train_tokens": tokens,
                                  "seconds": round(time.time() - t0, 1)})
        save()
    rows = [r for r in result["records"] if r["selector"] != "teacher"]
    print("\n| selector | softmax layers | WikiText-2 ppl (stage 1) | WikiText-2 ppl | plan |\n| --- | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['selector']} | {r['softmax_layers']} | {r['stage1_wikitext2_ppl']:.3f} | {r['wikitext2_ppl']:.3f} | `{r['plan']}` |")


if __name__ == "__main__":
    main()
