"""Training throughput of the two distillation stages (tokens/s), on a SmolLM2-135M-shaped Llama with
random weights (no model file needed), through the same step functions `distill` runs; `--shape` takes one of
scale.py's 7-8B configs instead (random bf16 weights: where a kind's step time goes at the scale users convert).

    python benchmarks/distill_throughput.py --out benchmarks/results/distill_throughput.json \
        [--plans lolcats-all gla-all] [--batch 16] [--seq-len 1024] [--profile]
    python benchmarks/distill_throughput.py --shape llama3-8b --plans "*:mamba2" --batch 8 --profile --out /tmp/p.json

Each plan: warm-up steps, then timed stage-1 steps (attention transfer, per-layer backward) and
stage-2 steps (LoRA, cross-entropy, optionally + KL to the teacher); the device is synchronized
around the timed region. `--profile` adds the top GPU (or CPU) ops of one step of each stage.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

import linearize
from linearize.convert import convert
from linearize.distill.run import _lora_targets
from linearize.distill.stages import lm_loss, new_parameters, transfer_losses

from distill_smollm2 import PLANS  # noqa: E402  (the script's folder is on sys.path)
from scale import SHAPES  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True)


def timed(fn, steps: int, device: torch.device) -> float:
    """Seconds per call of `fn` over `steps` calls, device synchronized."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def profile_table(fn, device: torch.device, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plans", nargs="+", default=["lolcats-all"], help=f"names from {', '.join(PLANS)}, or plan strings")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--kl-weight", type=float, default=0.0)
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a quick CPU check)")
    ap.add_argument("--shape", default="smollm2", choices=["smollm2", *sorted(SHAPES)],
                    help="SmolLM2-135M's config, or one of scale.py's (random weights in bf16)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--rows", type=int, default=12, help="rows of each --profile table")
    args = ap.parse_args()

    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "versions": {"linearize": linearize.__version__, "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "records": [],
    }
    for name in args.plans:
        torch.manual_seed(0)
        if args.shape == "smollm2":
            model = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2, "num_hidden_layers": args.layers or 30})).to(device)
        else:
            kw = {k: v for k, v in SHAPES[args.shape].items() if k != "model_type"}
            kw["num_hidden_layers"] = args.layers or kw["num_hidden_layers"]
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[SHAPES[args.shape]["model_type"]](**kw), dtype=torch.bfloat16)
        model.requires_grad_(False)
        convert(model, PLANS.get(name, name))
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=_lora_targets(model, ["q_proj", "k_proj", "v_proj", "o_proj"])))
        batch = torch.randint(model.config.vocab_size, (args.batch, args.seq_len), device=device)
        params = list(new_parameters(model).values())

        def stage1() -> None:
            for p in params:
                p.requires_grad_(True)
            with model.disable_adapter():
                transfer_losses(model, batch, train=True)

        def stage2() -> None:
            model.train()
            lm_loss(model, batch, 1.0, args.kl_weight).backward()

        rec = {"shape": args.shape, "plan": name, "batch": args.batch, "seq_len": args.seq_len, "kl_weight": args.kl_weight}
        for stage, fn in (("stage1", stage1), ("stage2", stage2)):
            fn()  # warm-up (kernel compilation, allocator)
            s = timed(fn, args.steps, device)
            rec[f"{stage}_tok_s"] = round(args.batch * args.seq_len / s)
            if device.type == "cuda":
                rec[f"{stage}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                torch.cuda.reset_peak_memory_stats()
            model.zero_grad(set_to_none=True)
            if args.profile:
                print(f"--- {name} {stage}\n{profile_table(fn, device, args.rows)}", flush=True)
                model.zero_grad(set_to_none=True)
        result["records"].append(rec)
        print(json.dumps(rec), flush=True)
        del model
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
