"""Decode benchmark: one token per step of a fully converted SmolLM2-135M (batch 1, bf16) replayed as a
CUDA graph, against the teacher's Hugging Face `generate`, at contexts of 1k to 32k tokens.

    python benchmarks/decode.py --out benchmarks/results/decode_h100.json [--model path/to/smollm2.gguf]
    python benchmarks/decode.py --smoke --out /tmp/decode.json   # CPU: tiny random model, eager steps

For each context T: random prompt of T tokens; ours prefills it (in chunks), captures one decode
step and times `--steps` replays with CUDA events (median over `--repeats`), new parameters at their
initialization (speed does not depend on them). The teacher's per-token time is
(time of generate(T prompt, N+1 tokens) - time of generate(T prompt, 1 token)) / N, medians over
`--repeats`: both runs include the same prefill, so the difference is N decode steps of generate's
loop as a user runs it. `floor`: the bytes a step must read (weights, plus the states twice / the
key-value cache) at the measured copy bandwidth. Peak memory (whole run: prefill + decode) per
context. Writes JSON records {"op", "impl", "T", "pass": "decode", "ms", ...} and a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import transformers

import linearize
from linearize import GraphedDecoder

from kernels import copy_bandwidth, header  # noqa: E402  (the script's folder is on sys.path)

PLANS = {"lolcats": "*:lolcats(window=64)", "gla": "*:gla"}
GIB = 2**30


def tiny_smollm2_shaped(device: torch.device) -> transformers.PreTrainedModel:
    """Two random layers with SmolLM2-135M's attention geometry (9 heads, 3 KV heads, head_dim 64)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return transformers.AutoModelForCausalLM.from_config(config).to(device).eval()


def timed(fn: Callable[[], object], cuda: bool) -> float:
    """Milliseconds of one call of `fn`, device work included."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def ours_decode(model, ids: torch.Tensor, steps: int, repeats: int, chunk: int, cuda: bool) -> dict:
    """ms per graphed decode step after prefilling `ids`, peak memory, bytes of the recurrent state."""
    decoder = GraphedDecoder(model, ids, prefill_chunk=chunk, graph=cuda)
    for _ in range(3):
        decoder.step()

    def run() -> None:
        for _ in range(steps):
            decoder.step()

    ms = statistics.median(timed(run, cuda) / steps for _ in range(repeats))
    return {"ms": ms, "cache_bytes": decoder.cache.nbytes()}


def teacher_decode(model, ids: torch.Tensor, steps: int, repeats: int, cuda: bool) -> dict:
    """ms per decode step of HF generate: (generate N+1 tokens - generate 1 token) / N."""
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=model.config.pad_token_id or 0)

    def gen(n: int) -> Callable[[], object]:
        return lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)

    timed(gen(2), cuda)  # warm-up
    long = statistics.median(timed(gen(steps + 1), cuda) for _ in range(repeats))
    short = statistics.median(timed(gen(1), cuda) for _ in range(repeats))
    c = model.config
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * ids.shape[1]
    return {"ms": (long - short) / steps, "cache_bytes": kv * next(model.parameters()).element_size()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="GGUF file or model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--plans", nargs="+", choices=sorted(PLANS), default=["lolcats", "gla"])
    ap.add_argument("--steps", type=int, default=64, help="decode steps per timing")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefill-chunk", type=int, default=8192)
    ap.add_argument("--no-teacher", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny random SmolLM2-shaped model, short contexts (checks the script)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if args.smoke:
        args.contexts, args.steps, args.repeats, args.prefill_chunk = [80], 2, 2, 32  # past the window of 64
        teacher, model_name = tiny_smollm2_shaped(device), "tiny random SmolLM2-shaped Llama (2 layers)"
    else:
        teacher = linearize.load(args.model, dtype=torch.bfloat16 if cuda else torch.float32, device=device)[0]
        model_name = args.model or linearize.DEFAULT_MODEL
    weight_bytes = sum({p.data_ptr(): p.numel() * p.element_size() for p in teacher.parameters()}.values())  # tied once
    bandwidth = copy_bandwidth(device)  # bytes per ms
    students = {name: linearize.convert(copy.deepcopy(teacher), PLANS[name]) for name in args.plans}
    records = []

    def record(op: str, impl: str, t: int, ms: float, **extra) -> None:
        records.append({"op": op, "impl": impl, "T": t, "pass": "decode", "ms": round(ms, 4), **extra})

    for t in args.contexts:
        ids = torch.randint(3, teacher.config.vocab_size, (1, t), generator=torch.Generator().manual_seed(t)).to(device)
        runs = {f"smollm2_decode_{name}": (lambda m=m: ours_decode(m, ids, args.steps, args.repeats, args.prefill_chunk, cuda), "ours")
                for name, m in students.items()}
        if not args.no_teacher:
            runs["smollm2_decode_teacher"] = (lambda: teacher_decode(teacher, ids, args.steps, args.repeats, cuda), "hf_generate")
        for op, (run, impl) in runs.items():
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                with torch.no_grad():
                    out = run()
            except torch.OutOfMemoryError as e:  # reported, not fatal: the other contexts still run
                print(f"{op} T={t}: out of memory ({e})", file=sys.stderr)
                continue
            peak = {"peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 3)} if cuda else {}
            record(op, impl, t, out["ms"], cache_mib=round(out["cache_bytes"] / 2**20, 2), **peak)
            read = weight_bytes + (out["cache_bytes"] if impl == "hf_generate" else 2 * out["cache_bytes"])
            record(op, "floor", t, read / bandwidth)
            print(f"{op} {impl} T={t}: {out['ms']:.3f} ms/step", file=sys.stderr)

    out = {
        **header(cuda, ("transformers",)),
        "setup": {"model": model_name, "dtype": str(next(teacher.parameters()).dtype), "batch": 1, "plans": {n: PLANS[n] for n in args.plans},
                  "steps": args.steps, "repeats": args.repeats, "prefill_chunk": args.prefill_chunk, "cuda_graphs": cuda},
        "copy_bandwidth_GBps": round(bandwidth / 1e6, 1), "records": records,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("| op | impl | T | ms/step | tokens/s | peak GiB | cache MiB |\n|---|---|---:|---:|---:|---:|---:|")
    for r in records:
        print(f"| {r['op']} | {r['impl']} | {r['T']} | {r['ms']} | {1e3 / r['ms']:.0f} | {r.get('peak_gib', '')} | {r.get('cache_mib', '')} |")


if __name__ == "__main__":
    main()
