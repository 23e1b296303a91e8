"""FSDP demo: distill a randomly initialized Llama-architecture model of about 1B parameters with
`accelerate launch --config_file configs/accelerate/fsdp.yaml` (a few steps of each stage), check
that the losses are finite, the checkpoints were written, and the saved model reloads and scores.

    python benchmarks/fsdp_demo.py --gpus 2 --out benchmarks/results/fsdp_demo.json      # 2 GPUs
    python benchmarks/fsdp_demo.py --gpus 2 --cpu --small --out /tmp/fsdp_demo.json      # CPU, gloo, tiny model

The model gets the embedded SmolLM2 tokenizer (vocabulary 49,152) and random weights; the training
text is WikiText-2 validation when given (--text), else a generated placeholder corpus.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # ~1.1B (TinyLlama-like shape) and a tiny one for a CPU check
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    "small": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2, help="processes (one per GPU)")
    ap.add_argument("--cpu", action="store_true", help="run the processes on the CPU (gloo)")
    ap.add_argument("--small", action="store_true", help="a tiny model instead of ~1B parameters")
    ap.add_argument("--text", default=None, help="training text file (default: a placeholder corpus)")
    ap.add_argument("--workdir", default="/tmp/linearize-fsdp")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import linearize
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    _, tok = linearize.load()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), eos_token_id=tok.eos_token_id, **SIZES["small" if args.small else "1b"])
    base = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in base.parameters())
    base.save_pretrained(work / "base")
    tok.save_pretrained(work / "base")
    del base
    text = Path(args.text) if args.text else work / "corpus.txt"
    if not args.text:
        text.write_text("\n".join(f"Line {i}: the quick brown fox {i % 7} jumps over the lazy dog {i % 11}." for i in range(600)))

    n = cfg.num_hidden_layers
    plan = ",".join(f"{i}:lolcats(window=64)" for i in range(0, n, 2))  # every other layer
    out = work / "converted"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/fsdp.yaml"),
              "--num_processes", str(args.gpus), *(["--cpu"] if args.cpu else []), "-m", "linearize.cli", "convert",
              "--model", str(work / "base"), "--plan", plan, "--out", str(out), f"data.source={text}", "data.seq_len=256",
              "data.val_fraction=0.05", "stage1.steps=4", "stage1.batch_size=1", "stage2.steps=4", "stage2.batch_size=1",
              "stage2.save_every=2", "stage2.gradient_checkpointing=true"]
    for d in (out, Path(str(out) + ".ckpt")):
        subprocess.run(["rm", "-rf", str(d)], check=True)
    print(" ".join(launch), flush=True)
    run = subprocess.run(launch, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    if run.returncode:
        sys.exit(f"the FSDP run failed (exit {run.returncode})")

    stage1 = json.loads((out / "metrics/stage1.json").read_text())
    stage2 = json.loads((out / "metrics/stage2.json").read_text())
    ckpts = sorted(str(p.relative_to(out.parent)) for p in Path(str(out) + ".ckpt").rglob("state.pt"))
    model = AutoModelForCausalLM.from_pretrained(out)  # reload the saved, converted model
    ids = tok(text.read_text()[:4000], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        reload_loss = float(model(input_ids=ids, labels=ids).loss)
    losses = stage1["history"] + stage2["history"]
    result = {
        "command": "python " + " ".join(sys.argv), "launch": " ".join(launch[1:]),
        "date": datetime.date.today().isoformat(),
        "device": f"{args.gpus} x " + ("cpu" if args.cpu else torch.cuda.get_device_name()),
        "versions": {"linearize": linearize.__version__, "torch": torch.__version__},
        "parameters": n_params, "plan": plan, "stage1_losses": stage1["history"], "stage2_losses": stage2["history"],
        "checkpoints": ckpts, "reloaded_loss": reload_loss,
        "ok": all(math.isfinite(x) for x in losses + [reload_loss]) and len(ckpts) == 2,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("parameters", "stage1_losses", "stage2_losses", "checkpoints", "reloaded_loss", "ok")}, indent=1))
    if not result["ok"]:
        sys.exit("non-finite loss or missing checkpoint")


if __name__ == "__main__":
    main()
