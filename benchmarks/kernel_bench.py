"""Kernel benchmark: our ops against PyTorch SDPA and flash-linear-attention (when installed) on the
same inputs, plus the bytes floor (inputs read once, output written once, at the measured copy
bandwidth). Writes JSON records {"op", "impl", "T", "pass", "ms"} and prints a markdown table.

    python benchmarks/kernel_bench.py --out benchmarks/results/kernels_h100.json        # on a GPU
    python benchmarks/kernel_bench.py --smoke --out /tmp/k.json                         # CPU: tiny shapes, references only
"""

from __future__ import annotations

import argparse
import contextlib
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
from linearize.kernels.conv import causal_conv1d_ref
from linearize.kernels.gla.naive import chunk_gla_ref
from linearize.kernels.hybrid.naive import hedgehog_features, hybrid_attn_ref


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


def header(cuda: bool, extra_packages: tuple[str, ...] = ()) -> dict:
    """`command`, `date`, `device` and `versions` of a results file (packages only when installed)."""
    import importlib.metadata as md

    versions = {"linearize": linearize.__version__, "torch": torch.__version__}
    for name in ("triton", "fla-core", *extra_packages):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return {
        "command": "python " + " ".join(sys.argv), "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if cuda else "cpu", "versions": versions,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, references only (checks the script)")
    ap.add_argument("--ops", nargs="*", help="time only these ops (linear_attn, simple_gla, gla, lolcats_hybrid, softmax_attn, causal_conv1d, hedgehog_map)")
    ap.add_argument("--impls", nargs="*", help="time only these implementations (ours, ours_sinks4, fla, sdpa, reference, torch_window)")
    ap.add_argument("--lengths", nargs="*", type=int, help="sequence lengths (default 2048 8192 32768 on a GPU)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    h, d, tokens = (32, 128, 16384) if cuda else (2, 16, 256)
    lengths = args.lengths or ([2048, 8192, 32768] if cuda else [64, 128])
    bw = copy_bandwidth(device)
    records = []
    out = {
        **header(cuda),
        "shapes": {"heads": h, "head_dim": d, "tokens_per_batch": tokens, "dtype": str(dtype)},
        "copy_bandwidth_GBps": round(bw / 1e6, 1), "records": records,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every record: a call cut short keeps what it measured
        Path(args.out).write_text(json.dumps(out, indent=1))

    def record(op: str, impl: str, t: int, pas: str, fn: Callable[[], object]) -> None:
        if (args.ops and op not in args.ops) or (args.impls and impl not in args.impls):
            return
        try:
            ms = bench(fn, cuda)
        except Exception as e:  # an implementation that cannot run this shape is reported, not fatal
            print(f"{op} {impl} T={t} {pas}: {type(e).__name__}: {e}", file=sys.stderr)
            return
        records.append({"op": op, "impl": impl, "T": t, "pass": pas, "ms": round(ms, 4)})
        print(f"{op} {impl} T={t} {pas}: {ms:.4f} ms", file=sys.stderr, flush=True)
        save()

    try:  # the public peers, on the same inputs (flash-linear-attention's wheels carried to the device)
        from fla.ops.gla import chunk_gla as fla_gla
        from fla.ops.linear_attn import chunk_linear_attn as fla_linear
        from fla.ops.simple_gla import chunk_simple_gla as fla_simple_gla
    except ImportError:
        fla_gla = fla_linear = fla_simple_gla = None
    from linearize.kernels import chunk_gla as ours

    for t in lengths:
        b = max(1, tokens // t)
        q, k, v = (torch.randn(b, t, h, d, device=device, dtype=dtype) * 0.1 for _ in range(3))
        do = torch.randn_like(q)
        decays = {  # log-decays as the layers produce them: fp32, per channel (gla) or per head (mamba2)
            "linear_attn": None,
            "gla": F.logsigmoid(torch.randn(b, t, h, d, device=device)) / 16,
            "simple_gla": F.logsigmoid(torch.randn(b, t, h, device=device)),
        }
        peers = {
            "linear_attn": fla_linear and (lambda q, k, v, g: fla_linear(q, k, v, normalize=False, output_final_state=True)),
            "gla": fla_gla and (lambda q, k, v, g: fla_gla(q, k, v, g, output_final_state=True)),
            "simple_gla": fla_simple_gla and (lambda q, k, v, g: fla_simple_gla(q, k, v, g, output_final_state=True)),
        }
        for op, g in decays.items():
            nbytes = 4 * q.numel() * q.element_size() + (0 if g is None else g.numel() * g.element_size())
            if not args.ops or op in args.ops:
                records.append({"op": op, "impl": "floor", "T": t, "pass": "fwd", "ms": round(nbytes / bw, 4)})
            impls = {"ours": lambda q, k, v, g: ours(q, k, v, g)} if cuda else {}
            if cuda and peers[op] is not None:
                impls["fla"] = peers[op]
            for impl, fn in impls.items():
                leaves = [x.clone().requires_grad_() for x in (q, k, v)] + [None if g is None else g.clone().requires_grad_()]
                record(op, impl, t, "fwd", lambda: fn(q, k, v, g))
                record(op, impl, t, "fwdbwd", lambda: torch.autograd.backward(fn(*leaves)[0], do))
        record("linear_attn", "reference", t, "fwd", lambda: chunk_gla_ref(q, k, v))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        record("softmax_attn", "sdpa", t, "fwd", lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
        lt = [x.clone().requires_grad_() for x in (qt, kt, vt)]
        record("softmax_attn", "sdpa", t, "fwdbwd",
               lambda: torch.autograd.backward(F.scaled_dot_product_attention(*lt, is_causal=True), do.transpose(1, 2)))

        # the lolcats hybrid (window 64 + linear part on feature dim 128)
        # as the layers call it, kernels.hybrid_attn (window kernel + linear scan + combine), against the
        # reference and against the window in PyTorch with the Triton scan (the path before the window kernel)
        fq, fk = (torch.rand(b, t, h, 128, device=device, dtype=dtype) for _ in range(2))
        mix = torch.full((h,), 0.5, device=device)
        hybrid_kw = dict(window=64, scale=d**-0.5)
        record("lolcats_hybrid", "reference", t, "fwd", lambda: hybrid_attn_ref(q, k, v, fq, fk, None, mix, **hybrid_kw))
        if cuda:
            hybrid_leaves = [x.clone().requires_grad_() for x in (q, k, v, fq, fk, mix)]
            torch_window = lambda *a: hybrid_attn_ref(*a, scan=kernels.chunk_gla, **hybrid_kw)  # noqa: E731
            sinks = lambda *a: kernels.hybrid_attn(*a, sinks=4, **hybrid_kw)  # noqa: E731  (4 sink tokens in the window kernel)
            for impl, hybrid in (("ours", lambda *a: kernels.hybrid_attn(*a, **hybrid_kw)), ("ours_sinks4", sinks),
                                 ("torch_window", torch_window)):
                record("lolcats_hybrid", impl, t, "fwd", lambda: hybrid(q, k, v, fq, fk, None, mix))
                record("lolcats_hybrid", impl, t, "fwdbwd",
                       lambda: torch.autograd.backward(hybrid(*hybrid_leaves[:5], None, hybrid_leaves[5])[0], do))

        # Mamba-2's short conv over x, B, C (Llama-3-8B: 3 x 32 heads x 128 channels, width 4), as the mamba2 layers
        # call it, against the PyTorch reference (F.conv1d, as the layers ran it before, under stage 1's bf16 autocast)
        xbc = torch.randn(b, t, 3 * h * d, device=device, dtype=dtype)
        taps = torch.randn(3 * h * d, 4, device=device)
        conv_leaves = [xbc.clone().requires_grad_(), taps.clone().requires_grad_()]
        if not args.ops or "causal_conv1d" in args.ops:
            records.append({"op": "causal_conv1d", "impl": "floor", "T": t, "pass": "fwd", "ms": round(2 * xbc.numel() * xbc.element_size() / bw, 4)})
        auto = lambda: torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()  # noqa: E731
        for impl, conv in (("ours", kernels.causal_conv1d), ("reference", causal_conv1d_ref)):
            if impl == "ours" and not cuda:
                continue
            def fwd(conv=conv):
                with auto():
                    return conv(xbc, taps)
            def fwdbwd(conv=conv):
                with auto():
                    y = conv(*conv_leaves)[0]
                torch.autograd.backward(y, xbc)
            record("causal_conv1d", impl, t, "fwd", fwd)
            record("causal_conv1d", impl, t, "fwdbwd", fwdbwd)

        # Hedgehog's feature map of the queries (feature dim 64, as the 7-8B recipes), as the kinds call it, against the
        # PyTorch reference (a batched product, bias, two softmaxes and a concatenation, under bf16 autocast)
        wmap, bmap = torch.randn(h, d, 64, device=device) * 0.1, torch.zeros(h, 64, device=device)
        map_leaves = [q.clone().requires_grad_(), wmap.clone().requires_grad_(), bmap.clone().requires_grad_()]
        dphi = torch.randn(b, t, h, 128, device=device, dtype=dtype)
        for impl, fmap in (("ours", kernels.hedgehog_features), ("reference", hedgehog_features)):
            if impl == "ours" and not cuda:
                continue
            def map_fwd(fmap=fmap):
                with auto():
                    return fmap(q, wmap, bmap)
            def map_fwdbwd(fmap=fmap):
                with auto():
                    phi = fmap(*map_leaves)
                torch.autograd.backward(phi, dphi.to(phi.dtype))
            record("hedgehog_map", impl, t, "fwd", map_fwd)
            record("hedgehog_map", impl, t, "fwdbwd", map_fwdbwd)

    save()
    print("| op | impl | T | pass | ms |\n|---|---|---:|---|---:|")
    for r in records:
        print(f"| {r['op']} | {r['impl']} | {r['T']} | {r['pass']} | {r['ms']} |")


if __name__ == "__main__":
    main()
