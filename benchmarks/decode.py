"""Decode benchmark (issue 18): ms per generated token of converted SmolLM2-135M models (bf16) under
CUDA graphs, against the teacher run the fast way (static key/value cache, the decode step under
torch.compile(mode="reduce-overhead", fullgraph=True)) and the teacher's eager `generate`, in one run,
at batch sizes 1 and 16 and contexts of 1k to 32k tokens.

    python benchmarks/decode.py --out benchmarks/results/decode_h200.json [--model path/to/smollm2.gguf]
    python benchmarks/decode.py --smoke --out /tmp/decode.json   # CPU: tiny random model, eager steps

Plans: all-converted `lolcats` and `gla`, `heads`, `make convert`'s head-level default
(configs/smollm2-135m.yaml: 12 KV heads keep softmax from a preallocated key/value cache), and `layers`,
every other layer kept softmax whole (decoded from a preallocated cache the same way). For each
(B, T): random prompts of T tokens. `ours`: prefill (in chunks), capture one decode step, time
`--steps` replays with CUDA events (median over `--repeats`), the step as it is (mode `graph`) and
compiled by torch.compile before capture (mode `compiled`; `fused`: the same after
`fuse_projections`, q/k/v and gate/up each one matrix product; `kernels`: stacked projections and the
step's dense parts on the skinny kernels, `GraphedDecoder(fused_layers=True)`; `kernels_compiled`: that
compiled). `teacher_compiled`: prefill into a `StaticCache` sized T + the steps, then the compiled
one-token forward and argmax in a loop, timed the same way after three warm-up calls (compilation). `teacher_eager`: (generate(N+1) - generate(1)) / N,
medians over `--repeats`, as a user runs it. New parameters stay at their initialization (speed does
not depend on them). `floor_ms`: bytes a step must read (weights, plus states or caches read and
written) at the measured copy bandwidth. Records {"impl", "name", "plan", "B", "T", "ms", "peak_gib", ...}
and a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import transformers

import linearize
from linearize.eval.bench import graphed_decode_ms, static_cache_decode_ms, timed_ms as timed
from linearize.fusion import fuse_projections
from linearize.info import CacheMeter

from kernel_bench import copy_bandwidth, header  # noqa: E402  (the script's folder is on sys.path)

PLANS = {"lolcats": "*:lolcats(window=64)", "gla": "*:gla", "heads": "configs/smollm2-135m.yaml",
         "layers": "0-/2:lolcats(window=64),1-/2:softmax"}  # layers: issue 17's 50% plan, every other layer softmax whole
OURS = {  # GraphedDecoder's arguments in each mode; fused and kernels* run on stacked projections (fuse_projections)
    "graph": {"compile": False}, "compiled": {"compile": True}, "frozen": {"compile": {"freezing": True}}, "fused": {"compile": True},
    "kernels": {"fused_layers": True}, "kernels_compiled": {"fused_layers": True, "compile": True},
}
STACKED = {"fused", "kernels", "kernels_compiled"}  # the modes that run on stacked projections (fuse_projections)
SMOKE_HEADS = "0:lolcats(window=64, sinks=4, softmax_heads=[1]),1:lolcats(window=64, sinks=4)"  # the 2-layer smoke model
GIB = 2**30


def smollm2_shaped(device: torch.device, layers: int = 30, vocab: int = 49152, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """Random weights of SmolLM2-135M's config (9 heads, 3 KV heads, head_dim 64, tied embeddings; the smoke
    test takes 2 layers and a small vocabulary): as good as the trained model for speed and memory."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return transformers.AutoModelForCausalLM.from_config(config).to(device, dtype).eval()


def plan_of(name: str, smoke: bool) -> str:
    """The plan string of `name` (a recipe file's plan for `heads`)."""
    if name != "heads":
        return PLANS[name]
    if smoke:
        return SMOKE_HEADS
    import yaml

    return yaml.safe_load((Path(__file__).resolve().parent.parent / PLANS[name]).read_text())["plan"]


def ours_decode(model, ids: torch.Tensor, steps: int, repeats: int, chunk: int, how: dict) -> dict:
    """ms per graphed decode step after prefilling `ids` (`how`: GraphedDecoder's compile= and fused_layers=), and the
    bytes of the cache (states, softmax heads' keys/values)."""
    ms, cache_bytes = graphed_decode_ms(model, ids, steps, repeats, chunk=chunk, **how)
    return {"ms": ms, "cache_bytes": cache_bytes}


def teacher_compiled_decode(model, ids: torch.Tensor, steps: int, repeats: int, chunk: int, frozen: bool = False) -> dict:
    """ms per token of the teacher's fast path: a StaticCache and the one-token forward compiled with
    mode="reduce-overhead" (CUDA graphs), fullgraph=True, or with Inductor's freezing and CUDA graphs if `frozen`;
    eager on CPU (smoke runs check the script)."""
    how = {"options": {"triton.cudagraphs": True, "freezing": True}} if frozen else None  # one or the other
    return {"ms": static_cache_decode_ms(model, ids, steps, repeats, chunk=chunk, compile=how)}


def teacher_eager_decode(model, ids: torch.Tensor, steps: int, repeats: int, cuda: bool) -> dict:
    """ms per decode step of HF generate: (generate N+1 tokens - generate 1 token) / N."""
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=model.config.pad_token_id or 0)

    def gen(n: int) -> Callable[[], object]:
        return lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)

    timed(gen(2), cuda)  # warm-up
    long = statistics.median(timed(gen(steps + 1), cuda) for _ in range(repeats))
    short = statistics.median(timed(gen(1), cuda) for _ in range(repeats))
    return {"ms": (long - short) / steps}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="GGUF file or model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--random", action="store_true", help="random weights of SmolLM2-135M's config instead of the GGUF (same speed)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--plans", nargs="+", choices=sorted(PLANS), default=["lolcats", "gla", "heads", "layers"])
    ap.add_argument("--ours", nargs="+", choices=sorted(OURS), default=["graph", "compiled"],
                    help="our decode step as captured (graph), compiled with torch.compile before capture (compiled), "
                    "the same with Inductor's freezing (frozen), compiled on stacked q/k/v and gate/up projections (fused), "
                    "the step's dense parts on our skinny kernels (kernels; kernels_compiled: and compiled)")
    ap.add_argument("--teachers", nargs="*", choices=["compiled", "frozen", "eager"], default=["compiled", "eager"],
                    help="the teacher's static cache + compiled step (compiled; frozen: with freezing), its eager generate")
    ap.add_argument("--steps", type=int, default=64, help="decode steps per timing")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefill-chunk", type=int, default=8192)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny random SmolLM2-shaped model, short contexts (checks the script)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if args.smoke:
        args.contexts, args.batches, args.steps, args.repeats, args.prefill_chunk = [80], [2], 2, 2, 32  # past the window of 64
        teacher, model_name = smollm2_shaped(device, layers=2, vocab=512), "tiny random SmolLM2-shaped Llama (2 layers)"
    elif args.random:
        teacher, model_name = smollm2_shaped(device, dtype=torch.bfloat16 if cuda else torch.float32), "random SmolLM2-135M config"
    else:
        teacher = linearize.load(args.model, dtype=torch.bfloat16 if cuda else torch.float32, device=device)[0]
        model_name = args.model or linearize.DEFAULT_MODEL
    weight_bytes = sum({p.data_ptr(): p.numel() * p.element_size() for p in teacher.parameters()}.values())  # tied once
    kv_per_token = CacheMeter(teacher.config, dtype=next(teacher.parameters()).dtype).teacher_per_token * teacher.config.num_hidden_layers
    bandwidth = copy_bandwidth(device)  # bytes per ms
    plans = {name: plan_of(name, args.smoke) for name in args.plans}
    students = {name: linearize.convert(copy.deepcopy(teacher), plan) for name, plan in plans.items()}
    fused = {name: fuse_projections(copy.deepcopy(m)) for name, m in students.items()} if STACKED & set(args.ours) else {}
    records = []

    def save() -> None:  # after every record: a run cut short keeps what it measured
        out = {
            **header(cuda, ("transformers",)),
            "setup": {"model": model_name, "dtype": str(next(teacher.parameters()).dtype), "plans": plans,
                      "steps": args.steps, "repeats": args.repeats, "prefill_chunk": args.prefill_chunk, "cuda_graphs": cuda},
            "copy_bandwidth_GBps": round(bandwidth / 1e6, 1), "records": records,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))

    for b in args.batches:
        for t in args.contexts:
            ids = torch.randint(3, teacher.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(t)).to(device)
            runs = [("ours", name, mode, lambda m=(fused[name] if mode in STACKED else m), c=OURS[mode]:
                     ours_decode(m, ids, args.steps, args.repeats, args.prefill_chunk, c))
                    for name, m in students.items() for mode in args.ours]
            for mode in [m for m in ("compiled", "frozen") if m in args.teachers]:
                runs.append(("teacher_compiled", "teacher", mode, lambda f=(mode == "frozen"):
                             teacher_compiled_decode(teacher, ids, args.steps, args.repeats, args.prefill_chunk, f)))
            if "eager" in args.teachers:
                runs.append(("teacher_eager", "teacher", "eager", lambda: teacher_eager_decode(teacher, ids, args.steps, args.repeats, cuda)))
            for impl, name, mode, run in runs:
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                try:
                    with torch.no_grad():
                        out = run()
                except torch.OutOfMemoryError as e:  # reported, not fatal: the other shapes still run
                    print(f"{impl} {name} {mode} B={b} T={t}: out of memory ({e})", file=sys.stderr)
                    continue
                out.setdefault("cache_bytes", kv_per_token * ids.numel())  # the teacher's key/value cache
                read = weight_bytes + (out["cache_bytes"] if impl != "ours" else 2 * out["cache_bytes"])
                records.append({"impl": impl, "name": name, "mode": mode, "plan": plans.get(name, name), "B": b, "T": t, "ms": round(out["ms"], 4),
                                "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 3) if cuda else None,
                                "cache_mib": round(out["cache_bytes"] / 2**20, 2), "floor_ms": round(read / bandwidth, 4)})
                print(f"{impl} {name} {mode} B={b} T={t}: {out['ms']:.3f} ms/step", file=sys.stderr)
                save()
    save()
    print("| impl | name | mode | B | T | ms/token | tokens/s | floor ms | peak GiB | cache MiB |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in records:
        print(f"| {r['impl']} | {r['name']} | {r['mode']} | {r['B']} | {r['T']} | {r['ms']} | {r['B'] * 1e3 / r['ms'] if r['ms'] > 0 else float('nan'):.0f} | {r['floor_ms']} "
              f"| {r['peak_gib'] or ''} | {r['cache_mib']} |")


if __name__ == "__main__":
    main()
