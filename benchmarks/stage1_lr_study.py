"""Stage-1 learning-rate study on CPU: SmolLM2-135M with a few `lolcats` layers, attention transfer
on WikiText-2 *valid* (the tuning split), relative output error per layer on held-out sequences.

    python benchmarks/stage1_lr_study.py --data ../shared/evaldata/wikitext2/valid.txt \
        --out benchmarks/results/stage1_lr_smollm2.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

import linearize
from linearize.distill.data import pack, split
from linearize.distill.stages import Checkpoint, new_parameters, train_loop, transfer_losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", default="6,14,22")
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lrs", default="0.001,0.01,0.03")
    args = ap.parse_args()

    base, tok = linearize.load()
    lines = [t for t in Path(args.data).read_text().split("\n") if t.strip()]
    train, val = split(pack(lines, tok, args.seq_len), 0.02, seed=0)
    val = val[:12]
    layers = [int(i) for i in args.layers.split(",")]
    plan = ",".join(f"{i}:lolcats(window={args.window})" for i in layers)

    def val_error(model) -> dict[int, float]:
        errs: dict[int, list[float]] = {}
        for j in range(0, len(val), 4):
            for layer, (_, rel) in transfer_losses(model, val[j : j + 4], train=False).items():
                errs.setdefault(layer, []).append(rel)
        return {layer: sum(v) / len(v) for layer, v in sorted(errs.items())}

    records = []
    for lr in map(float, args.lrs.split(",")):
        model = linearize.convert(copy.deepcopy(base), plan)
        model.requires_grad_(False)
        params = {k: p.requires_grad_(True) for k, p in new_parameters(model).items()}
        before = val_error(model)
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            train_loop(f"lr={lr}", params, lambda b: sum(v[0] for v in transfer_losses(model, b, train=True).values()),
                       train, steps=args.steps, batch_size=args.batch, lr=lr, weight_decay=0.0, save_every=10**9,
                       ckpt=Checkpoint(Path(tmp) / "c"), seed=0, device=torch.device("cpu"), log=lambda s: None)
        after = val_error(model)
        for layer in layers:
            records.append({"lr": lr, "layer": layer, "rel_err_init": round(before[layer], 4), "rel_err": round(after[layer], 4)})
        print(f"lr {lr}: " + ", ".join(f"layer {i}: {before[i]:.3f} -> {after[i]:.3f}" for i in layers) + f" ({time.time() - t0:.0f}s)", flush=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "command": "python " + " ".join(sys.argv), "date": datetime.date.today().isoformat(),
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": {"linearize": linearize.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "settings": {"plan": plan, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
                     "train_tokens": args.steps * args.batch * args.seq_len, "val_sequences": len(val)},
        "records": records,
    }, indent=1))


if __name__ == "__main__":
    main()
