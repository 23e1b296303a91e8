"""Kernel benchmark: our ops against PyTorch SDPA and flash-linear-attention (when installed) on the
same inputs, plus the bytes floor (inputs read once, output written once, at the measured copy
bandwidth). Writes JSON records {"op", "impl", "T", "pass", "ms"} and prints a markdown table.

    python benchmarks/kernels.py --out benchmarks/results/kernels_h100.json        # on a GPU
    python benchmarks/kernels.py --smoke --out /tmp/k.json                         # CPU: tiny shapes, references only
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import linearize
from linearize import kernels
from linearize.kernels.gla.naive import chunk_gla_ref
from linearize.kernels.hybrid.naive import hybrid_attn_ref


def bench(fn: Callable[[], object], cuda: bool, reps: int = 20) -> float:
    """Median milliseconds of `fn` (CUDA: events via triton.testing.do_bench)."""
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per ms of a large device-to-device copy (read + write counted)."""
    x = torch.empty(256 * 2**20 if device.type == "cuda" else 16 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), device.type == "cuda")
    return 2 * x.numel() / ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, references only (checks the script)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    h, d, tokens = (32, 128, 16384) if cuda else (2, 16, 256)
    lengths = [2048, 8192, 32768] if cuda else [64, 128]
    bw = copy_bandwidth(device)
    records = []

    def record(op: str, impl: str, t: int, pas: str, fn: Callable[[], object]) -> None:
        try:
            ms = bench(fn, cuda)
        except Exception as e:  # an implementation that cannot run this shape is reported, not fatal
            print(f"{op} {impl} T={t} {pas}: {type(e).__name__}: {e}", file=sys.stderr)
            return
        records.append({"op": op, "impl": impl, "T": t, "pass": pas, "ms": round(ms, 4)})

    try:
        from fla.ops.linear_attn import chunk_linear_attn as fla_linear  # noqa: F401
    except ImportError:
        fla_linear = None
    from linearize.kernels import chunk_linear_attn as ours_linear

    for t in lengths:
        b = max(1, tokens // t)
        q, k, v = (torch.randn(b, t, h, d, device=device, dtype=dtype) * 0.1 for _ in range(3))
        grads = [x.clone().requires_grad_() for x in (q, k, v)]
        do = torch.randn_like(q)
        floor_ms = 4 * q.numel() * q.element_size() / bw  # q, k, v read once, o written once
        records.append({"op": "linear_attn", "impl": "floor", "T": t, "pass": "fwd", "ms": round(floor_ms, 4)})
        record("linear_attn", "reference", t, "fwd", lambda: chunk_gla_ref(q, k, v))
        if cuda and ours_linear is not None:
            record("linear_attn", "ours", t, "fwd", lambda: ours_linear(q, k, v))
            record("linear_attn", "ours", t, "fwdbwd", lambda: torch.autograd.backward(ours_linear(*grads)[0], do))
        if cuda and fla_linear is not None:
            record("linear_attn", "fla", t, "fwd", lambda: fla_linear(q, k, v, normalize=False))
            record("linear_attn", "fla", t, "fwdbwd", lambda: torch.autograd.backward(fla_linear(*grads, normalize=False)[0], do))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        record("softmax_attn", "sdpa", t, "fwd", lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))

        # softmax attention with gradients; the lolcats hybrid (window 64 + linear part on feature dim 128)
        # as the layers call it, kernels.hybrid_attn (window kernel + linear scan + combine), against the
        # reference and against the window in PyTorch with the Triton scan (the path before the window kernel)
        qg, kg, vg = (x.transpose(1, 2) for x in grads)
        record("softmax_attn", "sdpa", t, "fwdbwd",
               lambda: torch.autograd.backward(F.scaled_dot_product_attention(qg, kg, vg, is_causal=True), do.transpose(1, 2)))
        fq, fk = (torch.rand(b, t, h, 128, device=device, dtype=dtype) for _ in range(2))
        mix = torch.full((h,), 0.5, device=device)
        hybrid_kw = dict(window=64, scale=d**-0.5)
        record("lolcats_hybrid", "reference", t, "fwd", lambda: hybrid_attn_ref(q, k, v, fq, fk, None, mix, **hybrid_kw))
        if cuda:
            hybrid_leaves = [x.clone().requires_grad_() for x in (q, k, v, fq, fk, mix)]
            torch_window = lambda *a: hybrid_attn_ref(*a, scan=kernels.chunk_gla, **hybrid_kw)  # noqa: E731
            for impl, hybrid in (("ours", lambda *a: kernels.hybrid_attn(*a, **hybrid_kw)), ("torch_window", torch_window)):
                record("lolcats_hybrid", impl, t, "fwd", lambda: hybrid(q, k, v, fq, fk, None, mix))
                record("lolcats_hybrid", impl, t, "fwdbwd",
                       lambda: torch.autograd.backward(hybrid(*hybrid_leaves[:5], None, hybrid_leaves[5])[0], do))

    out = {
        "command": "python " + " ".join(sys.argv), "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": {"linearize": linearize.__version__, "torch": torch.__version__},
        "shapes": {"heads": h, "head_dim": d, "tokens_per_batch": tokens, "dtype": str(dtype)},
        "copy_bandwidth_GBps": round(bw / 1e6, 1), "records": records,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("| op | impl | T | pass | ms |\n|---|---|---:|---|---:|")
    for r in records:
        print(f"| {r['op']} | {r['impl']} | {r['T']} | {r['pass']} | {r['ms']} |")


if __name__ == "__main__":
    main()
