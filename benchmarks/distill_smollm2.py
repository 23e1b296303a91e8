"""Distill SmolLM2-135M-Instruct with several plans on one GPU; WikiText-2 test perplexity of the
teacher, after stage 1 and after stage 1+2, at a stated token budget.

    python benchmarks/distill_smollm2.py --model PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf \
        --wikitext ../shared/evaldata/wikitext2/test.txt --out benchmarks/results/distill_smollm2.json

Training data: text sampled from the teacher (the project's offline default), generated once and
cached. Perplexity: windows of --context tokens with stride --stride (each token scored once).
Records are appended to --out after each plan, so a partial run keeps what finished.
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
from linearize.distill.config import DataConfig, DistillConfig, Stage1Config, Stage2Config
from linearize.distill.run import distill
from linearize.eval import text_perplexity

PLANS = {
    "lolcats-all": "*:lolcats(window=64)",
    "lolcats-50": ",".join(f"{i}:lolcats(window=64)" for i in range(0, 30, 2)),
    "gla-all": "*:gla",
    "hedgehog-all": "*:hedgehog",
    "mamba2-50": "0-/2:mamba2",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--wikitext", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plans", nargs="+", default=list(PLANS), help=f"names from {', '.join(PLANS)}, or plan strings")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--data", default="teacher", help="training data: teacher samples (default) or a text file")
    ap.add_argument("--teacher-sequences", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--stage1-steps", type=int, default=100)
    ap.add_argument("--stage2-steps", type=int, default=100)
    ap.add_argument("--stage1-lr", type=float, default=1e-2)
    ap.add_argument("--stage2-lr", type=float, default=1e-4)
    ap.add_argument("--kl-weight", type=float, default=0.0, help="stage 2: weight of KL(teacher || student)")
    ap.add_argument("--ce-weight", type=float, default=1.0, help="stage 2: weight of next-token cross-entropy")
    ap.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (a killed call resumes from there)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="stage 2 recomputes each layer in backward (less memory)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=None, help="score only the first N tokens (smoke runs)")
    ap.add_argument("--workdir", default="/tmp/linearize-bench")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoints an earlier run left in --workdir")
    args = ap.parse_args()

    out = Path(args.out)
    import peft
    import transformers

    result = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {"linearize": linearize.__version__, "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "records": [],
    }
    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))

    for name in args.plans:
        plan = PLANS.get(name, name)
        cfg = DistillConfig(
            model=args.model, plan=plan, seed=0,
            data=DataConfig(source=args.data, seq_len=args.seq_len, teacher_sequences=args.teacher_sequences,
                            val_fraction=0.02, cache_dir=f"{args.workdir}/cache"),
            stage1=Stage1Config(steps=args.stage1_steps, batch_size=args.batch, lr=args.stage1_lr, save_every=args.save_every),
            stage2=Stage2Config(steps=args.stage2_steps, batch_size=args.batch, lr=args.stage2_lr, kl_weight=args.kl_weight,
                                ce_weight=args.ce_weight, gradient_checkpointing=args.gradient_checkpointing,
                                save_every=args.save_every),
        )
        tokens1 = args.stage1_steps * args.batch * args.seq_len
        tokens2 = args.stage2_steps * args.batch * args.seq_len
        stages = iter([("teacher", 0), ("stage1", tokens1), ("stage2", tokens1 + tokens2)])
        t0 = time.time()

        def evaluate(model, tok):
            """Called after loading, after stage 1 and at the end: each result is recorded at once."""
            ppl = text_perplexity(model, tok, args.wikitext, context=args.context, stride=args.stride, max_tokens=args.eval_tokens)
            stage, tokens = next(stages)
            if stage != "teacher":
                result["records"].append({"plan": model.config.linearize["plan"], "name": name, "stage": stage,
                                          "train_tokens": tokens, "wikitext2_ppl": ppl["ppl"], "seconds": round(time.time() - t0, 1)})
            elif not result["records"]:
                result["records"].append({"plan": "teacher", "stage": "teacher", "train_tokens": 0, "wikitext2_ppl": ppl["ppl"]})
            save()
            print(f"{name} {stage}: WikiText-2 ppl {ppl['ppl']:.3f} after {tokens:,} tokens ({time.time() - t0:.0f}s)", flush=True)
            return ppl

        run_dir = Path(args.workdir) / name.replace("*", "all").replace(":", "_")[:60]
        for d in (run_dir, Path(str(run_dir) + ".ckpt")):
            if d.exists() and not (args.resume and d.name.endswith(".ckpt")):
                shutil.rmtree(d)
        s = distill(cfg, run_dir, evaluate=evaluate, resume=args.resume)
        teacher = result["records"][0]["wikitext2_ppl"]
        print(f"{name}: teacher {teacher:.3f} | stage1 {s['stage1_eval']['ppl']:.3f} | stage1+2 {s['final_eval']['ppl']:.3f} "
              f"({s['final_eval']['ppl'] / teacher - 1:+.1%}) | {tokens1 + tokens2:,} tokens | {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
