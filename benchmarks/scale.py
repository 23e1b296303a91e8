"""7-8B recipes through `linearize convert` on one GPU (issue 20): stage speed and peak memory.

    python benchmarks/scale.py --out benchmarks/results/scale_h200.json --workdir /tmp/scale \
        [--shape llama3-8b] [--recipes llama3-8b-lolcats llama3-8b-lizard llama3-8b-instruct-mamba2-50] [--seq-lens 1024 4096] \
        [--dtype auto] [--gpus 1] [--resume-check [--resume-gpus N]] [--set stage2.gradient_checkpointing=false ...]
    python benchmarks/scale.py --smoke --out /tmp/scale.json --workdir /tmp/scale   # CPU: a tiny shape, checks the script

Pretrained 8B weights cannot be downloaded here, and speed and memory do not depend on the values: the
shape's exact config with random bf16 weights is written once as a Hugging Face folder (with a
word-level tokenizer over its whole vocabulary), and random word text as the data. Each (recipe, seq
len) then runs as a user runs it, `linearize convert --config RECIPE --model FOLDER` in its own
process, with the data, sequence length, batch and step counts overridden; each stage's tokens/s
(past its first step, without its checkpoint writes: the run saves once, at the end), the seconds those writes took
and peak GPU memory come from the run's own metrics/stage{1,2}.json. The output folder is deleted after each run (an
8B model per run would fill the disk). Records {"shape", "recipe", "plan", "stage", "seq_len", "batch", "gpus": 1,
"via": "convert", "dtype", "tokens_per_s", "peak_gib", "checkpoint_s"};
with --resume-check, "resume": the first run again, stopped by Ctrl-C in stage 1 and resumed (on --resume-gpus
processes, the batch scaled to keep the rows a step), its losses against the first's. --gpus N runs each recipe on N
processes sharded by FSDP2 (`accelerate launch --config_file configs/accelerate/fsdp.yaml`; torchrun in smoke mode).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from kernel_bench import header  # noqa: E402  (the script's folder is on sys.path)
from linearize.distill import load_config

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # the published configs' sizes (untied embeddings)
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=8192, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, rope_theta=1000000.0,
                       max_position_embeddings=32768, sliding_window=None, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0,
                       max_position_embeddings=32768, tie_word_embeddings=False),
    "smoke": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=False),
}


def write_model(shape: str, folder: Path, device: torch.device) -> None:
    """A random bf16 model of `shape` and a word-level tokenizer ("w0".."wV-1") saved to `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    kw = dict(SHAPES[shape])
    config = CONFIG_MAPPING[kw.pop("model_type")](**kw, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: minutes faster than on the CPU at 8B
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the runs are other processes: leave them the whole GPU
    vocab = {f"w{i}": i for i in range(config.vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w3", pad_token="w0", bos_token="w1", eos_token="w2").save_pretrained(tmp)
    tmp.rename(folder)  # whole or absent: a later run reuses it


def write_text(path: Path, vocab: int, tokens: int) -> None:
    """Random word text ("w4".. ids) of about `tokens` tokens, one 1,000-word line at a time."""
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(tokens // 1000 + 1):
            f.write(" ".join(f"w{rng.randrange(4, vocab)}" for _ in range(1000)) + "\n")


def launch(gpus: int, cuda: bool) -> list[str]:
    """The command that starts `-m linearize.cli ...` on `gpus` processes: accelerate with the FSDP config on GPUs,
    torchrun on CPUs (the smoke run; ACCELERATE_USE_FSDP, what the config sets, comes from the environment)."""
    if gpus == 1:
        return [sys.executable]
    if cuda:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml"),
                "--num_processes", str(gpus)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)]


def convert_run(recipe: str, folder: Path, text: Path, out: Path, seq: int, rows: int, steps: int, dtype: str = "auto",
                gpus: int = 1, cuda: bool = True, resume_gpus: int | None = None, extra: tuple[str, ...] = ()) -> dict:
    """One `linearize convert` run on `gpus` processes drawing `rows` sequences a step (batch_size rows / gpus); its
    stage metrics and the plan it ran. `resume_gpus`: stopped by Ctrl-C (SIGINT) as soon as stage 1 has written a
    checkpoint (one per step), then continued with --resume on that many processes, as a user would."""
    interrupt = resume_gpus is not None
    ckpt = out.with_name(out.name + ".ckpt")
    for path in (out, ckpt):
        shutil.rmtree(path, ignore_errors=True)
    overrides = [f"data.source={text}", "data.template=null", f"data.seq_len={seq}", "data.val_fraction=0.02",
                 f"data.cache_dir={out.parent / 'cache'}", f"dtype={dtype}", *extra]
    for stage in ("stage1", "stage2"):
        overrides += [f"{stage}.steps={steps}", f"{stage}.save_every={1 if interrupt else 10 * steps}"]

    def cmd(n: int) -> list[str]:
        batch = [f"{stage}.batch_size={rows // n}" for stage in ("stage1", "stage2")]
        return [*launch(n, cuda), "-m", "linearize.cli", "convert", "--config", recipe, "--model", str(folder), "--out", str(out),
                *overrides, *batch]

    env = {**os.environ, "ACCELERATE_USE_FSDP": "true"}  # FSDP2 wherever several processes run
    t0 = time.time()
    if interrupt:
        # Ctrl-C's default action in the run even where this one inherited it ignored (a background job: `make test &`)
        proc = subprocess.Popen(cmd(gpus), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        while proc.poll() is None and not (ckpt / "stage1" / "state.pt").is_file():
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate()[1]
        if proc.returncode == 0 or (ckpt / "complete").is_file():
            raise SystemExit(f"{recipe} seq {seq}: finished before it could be interrupted (raise --steps):\n{err[-3000:]}")
    run = subprocess.run(cmd(resume_gpus or gpus) + ["--resume"] * interrupt, cwd=ROOT, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{recipe} seq {seq}: convert failed ({run.returncode}):\n{run.stderr[-3000:]}")
    metrics = {s: json.loads((out / "metrics" / f"{s}.json").read_text()) for s in ("stage1", "stage2", "summary")}
    for path in (out, ckpt):
        shutil.rmtree(path, ignore_errors=True)
    how = f" (interrupted on {gpus}, resumed on {resume_gpus})" if interrupt else ""
    print(f"{recipe} seq {seq} x {rows} rows on {gpus} process(es){how}: {time.time() - t0:.0f}s", file=sys.stderr)
    return metrics


def resume_check(first: dict, resumed: dict) -> dict:
    """How an interrupted and resumed run's losses compare with the uninterrupted run's, step by step."""
    diff = {s: max(abs(a - b) for a, b in zip(first[s]["history"], resumed[s]["history"])) for s in ("stage1", "stage2")}
    same_length = all(len(first[s]["history"]) == len(resumed[s]["history"]) for s in diff)
    return {"interrupted_at_step": resumed["stage1"]["resumed_from"], "max_abs_loss_diff": diff, "same_steps": same_length}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", required=True, help="holds the written model folder (reused), the text and the runs")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--recipes", nargs="+", default=["llama3-8b-lolcats", "llama3-8b-lizard", "llama3-8b-instruct-mamba2-50"])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--tokens-per-step", type=int, default=8192, help="rows a step = this / seq len (at least 1 per GPU)")
    ap.add_argument("--gpus", type=int, default=1, help="processes (GPUs) per run: FSDP through accelerate when more than 1")
    ap.add_argument("--steps", type=int, default=8, help="steps per stage (the first is not timed)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="the recipe's dtype for the frozen weights (auto: bfloat16 here, the folder's dtype, on a GPU)")
    ap.add_argument("--resume-check", action="store_true",
                    help="then the first recipe at the first length again, interrupted in stage 1 and resumed: its losses vs the first run's")
    ap.add_argument("--resume-gpus", type=int, default=None, help="--resume-check continues on this many processes (default --gpus)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more recipe overrides for every run, as `linearize convert` takes them (stage2.gradient_checkpointing=false)")
    ap.add_argument("--smoke", action="store_true", help="CPU, a tiny shape, short runs (checks the script)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if args.smoke:
        args.shape, args.seq_lens, args.tokens_per_step, args.steps = "smoke", [32], 64, 3 + 27 * args.resume_check
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    folder = work / f"{args.shape}-random"
    if not folder.is_dir():
        write_model(args.shape, folder, torch.device("cuda" if cuda else "cpu"))
    vocab = SHAPES[args.shape]["vocab_size"]
    text = work / "text.txt"
    need = 2 * args.steps * max(args.tokens_per_step, max(args.seq_lens)) * 2  # both stages, with room for validation
    if not text.is_file() or text.stat().st_size < need * 6:
        write_text(text, vocab, need)
    records, runs = [], {}
    out = {**header(cuda, ("transformers", "peft")), "setup": {"shape": SHAPES[args.shape], "steps": args.steps,
           "tokens_per_step": args.tokens_per_step, "dtype": args.dtype, "set": args.set}, "records": records}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save = lambda: Path(args.out).write_text(json.dumps(out, indent=1))  # noqa: E731  (after every run: a cut-off call keeps what ran)
    unit = math.lcm(args.gpus, args.resume_gpus or args.gpus)
    rows_of = lambda seq: max(unit, args.tokens_per_step // seq // unit * unit)  # noqa: E731  (a multiple of every process count)
    for recipe in args.recipes:
        checkpointing = load_config(recipe, args.set).stage2.gradient_checkpointing
        for seq in args.seq_lens:
            rows = rows_of(seq)
            m = runs[recipe, seq] = convert_run(recipe, folder, text, work / "run", seq, rows, args.steps, args.dtype, args.gpus, cuda,
                                                  extra=tuple(args.set))
            for stage in ("stage1", "stage2"):
                records.append({"shape": args.shape, "recipe": recipe, "plan": m["summary"]["plan"], "stage": stage,
                                "seq_len": seq, "batch": rows // args.gpus, "gpus": args.gpus, "via": "convert", "dtype": args.dtype, "steps": m[stage]["steps"],
                                "tokens_per_s": m[stage].get("tokens_per_s"), "peak_gib": m[stage].get("peak_gib"),
                                "checkpoint_s": m[stage].get("checkpoint_s"),
                                "stage2_gradient_checkpointing": checkpointing,
                                **({"set": args.set} if args.set else {})})
            save()
    if args.resume_check:
        recipe, seq = args.recipes[0], args.seq_lens[0]
        again = args.resume_gpus or args.gpus
        resumed = convert_run(recipe, folder, text, work / "run", seq, rows_of(seq), args.steps, args.dtype, args.gpus, cuda, again,
                             tuple(args.set))
        out["resume"] = {"recipe": recipe, "seq_len": seq, "gpus": args.gpus, "resumed_on_gpus": again, **resume_check(runs[recipe, seq], resumed)}
        print(f"resumed at stage-1 step {out['resume']['interrupted_at_step']}: largest loss difference {out['resume']['max_abs_loss_diff']}")
    save()
    print("| recipe | stage | seq x batch | tokens/s | peak GiB |\n|---|---|---|---:|---:|")
    for r in records:
        print(f"| {r['recipe']} | {r['stage']} | {r['seq_len']} x {r['batch']} | {r['tokens_per_s']} | {r['peak_gib'] or ''} |")


if __name__ == "__main__":
    main()
