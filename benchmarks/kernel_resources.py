"""Registers, spill stack and shared memory of the training/prefill kernels as they are launched, compiled for a GPU
architecture on any machine (no GPU needed: Triton compiles ahead of time and its bundled cuobjdump reads the cubin).
The window kernels (`kernels/hybrid/window.py`, block sizes from `_config`), the chunked scan's kernels
(`kernels/gla/chunk.py`, block sizes, warps and stages from `_Launch`, bf16 at the kernel benchmark's shape: H = 32,
K = V = 128, chunks of 64, GQA groups of 1 and 4; `--warps` adds other warp counts), the Hedgehog feature map's
(`kernels/hybrid/feature_map.py`, head dims 64 and 128) and Mamba-2's conv (`kernels/conv/depthwise.py`, width 4). A stack above 0 means spills
(accumulators in local memory: a cause of slow kernels that shows before any timing, not a timing); the shared memory
must stay under the device's limit per block (227 KB on an H100/H200). Run it without TRITON_INTERPRET.

    python benchmarks/kernel_resources.py --out benchmarks/results/kernel_resources_sm90.json
    python benchmarks/kernel_resources.py --arch 80      # A100
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from linearize.kernels.conv import depthwise
from linearize.kernels.gla import chunk
from linearize.kernels.hybrid import feature_map, window
from linearize.kernels.hybrid.naive import EPS

from kernel_bench import header  # noqa: E402  (the script's folder is on sys.path)

# (window, head dim, query heads, KV heads, softcap, fused): the benchmark's shape, GQA, gemma2's head dim, small ones
SHAPES = [(64, 128, 32, 32, False, True), (128, 128, 32, 8, True, True), (64, 64, 16, 4, True, False),
          (64, 256, 8, 4, True, True), (5, 16, 6, 2, False, False)]
INTS = {"cu", "cidx", "coff", "valid", "rarg", "at", "sbase"}
STATS = {"T", "NT", "L", "S", "LNS", "LDS", "M", "N", "ROWS", "s_xb", "s_xt", "s_ib", "s_it", "s_yb", "s_yt", "s_db", "s_dt",
         "s_xm", "s_xh", "s_pm", "s_ph"}
FP32 = {"b", "A", "s0", "s_out", "ds_final", "ds0", "dA", "dqi", "dki", "dg", "mix", "den", "rmax", "dd", "cw", "delta",
        "dmix", "dlden"}


def resources(fn: triton.JITFunction, const: dict, arch: int, options: dict, x: str = "*bf16", fp32: set = frozenset()) -> dict:
    """Compile `fn` for sm_`arch` (pointers in `x` unless listed above or in `fp32`); registers, stack bytes a thread
    and shared memory."""
    const = {n: v for n, v in const.items() if n in fn.arg_names}
    types = {n: "constexpr" if n in const else "i32" if n in STATS else "*i32" if n in INTS else "*i64" if n == "spos"
             else "fp32" if n in ("scale", "cap") else "*fp32" if n in FP32 | fp32 else x for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=types, constexprs={(fn.arg_names.index(n),): v for n, v in const.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        out = subprocess.run([tool, "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    regs, stack = (int(re.search(rf"{key}:(\d+)", out).group(1)) for key in ("REG", "STACK"))
    return {"registers": regs, "stack_bytes": stack, "shared_bytes": compiled.metadata.shared, **options}


def window_rows(arch: int, dtype: torch.dtype) -> list[dict]:
    """The window kernels (forward, dq, dk/dv) at each of SHAPES, as `kernels.hybrid_attn` launches them."""
    x = "*bf16" if dtype == torch.bfloat16 else "*fp32"
    rows = []
    for w, d, h, hk, cap, fused in SHAPES:
        for name, fn, backward in (("window_fwd", window._window_fwd_kernel, False),
                                   ("window_dq", window._window_dq_kernel, True), ("window_dkv", window._window_dkv_kernel, True)):
            cfg = window._config(w, d, d, backward=backward, dtype=dtype)
            options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
            const = dict(H=h, HK=hk, D=d, V=d, W=w, HAS_CAP=cap, MIX=fused, EPS_=EPS, NS=0, BS=16, OFF=0, **cfg)
            rows.append({"kernel": name, "shape": f"W={w} D={d} H={h}/{hk} softcap={cap} fused={fused}", "launched": True,
                         **resources(fn, const, arch, options, x, set() if fused else {"out"})})
    return rows


def chunk_rows(arch: int, extra_warps: list[int]) -> list[dict]:
    """The chunked scan's kernels of a forward + backward, bf16, H = 32, K = V = 128, each decay kind, groups 1 and 4,
    8 sequences (the walks' tile sizes depend on how many)."""
    rows = []
    for gate in (0, 1, 2):
        for hk in (32, 8):
            q = torch.zeros(8, 64, 32, 128, dtype=torch.bfloat16)  # 8 sequences: the walks' tiles of 16k tokens at T = 2k
            k = q[:, :, :hk]
            L = chunk._Launch(q, k, k, [None, k[..., 0], k][gate], None, 64)
            common = dict(H=32, HK=hk, K=128, V=128, KG=L.KG, C=L.C, GATE=gate, EXCLUSIVE=True, IS_VARLEN=False, LAG=0,
                          HAS_S0=False, HAS_DS=False, S=chunk.SUB)
            launches = [("state", chunk._state_kernel, L.WK, L.WV, L.warps, 3), ("output", chunk._output_kernel, L.BK, L.BV, L.warps, 3),
                        ("dstate", chunk._dstate_kernel, L.WK, L.WV, L.warps, 3), ("dv", chunk._dv_kernel, L.BK, L.BV, L.warps, 3),
                        ("dqk", chunk._dqk_kernel, L.dqk_BK, L.BV, L.warps, L.dqk_stages)]
            if gate == 2:
                launches += [("intra", chunk._intra_kernel, L.BKS, L.BV, 4, 3), ("intra_grad", chunk._intra_grad_kernel, L.BKS, L.BV, 4, 3)]
            for name, fn, bk, bv, warps, stages in launches:
                fp32 = {"dq", "dk"} if name == "intra_grad" or (name == "dqk" and gate == 1) else set()
                for w in sorted({warps, *extra_warps}):
                    rows.append({"kernel": name, "shape": f"decay={['none', 'head', 'channel'][gate]} group={32 // hk}",
                                 "launched": w == warps, **resources(fn, {**common, "BK": bk, "BV": bv}, arch,
                                                                     {"num_warps": w, "num_stages": stages}, fp32=fp32)})
    return rows


def map_and_conv_rows(arch: int) -> list[dict]:
    """The Hedgehog feature map's kernels (bf16 x, fp32 W and b; head dim 64 and 128, feature dim 64 and 128) and the
    conv's (bf16 x, fp32 taps, width 4), with the warps and tiles they are launched with."""
    rows = []
    for d, fd in ((128, 64), (64, 64), (128, 128)):
        for name, fn, cfg in (("map_fwd", feature_map._fwd_kernel, feature_map.FWD), ("map_bwd", feature_map._bwd_kernel, feature_map.BWD)):
            const = {**feature_map._blocks(d, fd), "BM": cfg["BM"]}
            rows.append({"kernel": name, "shape": f"D={d} FD={fd}", "launched": True,
                         **resources(fn, const, arch, {"num_warps": cfg["num_warps"], "num_stages": 3}, fp32={"w", "b", "dw", "db"})})
    for name, fn, cfg in (("conv_fwd", depthwise._fwd_kernel, depthwise.FWD), ("conv_bwd", depthwise._bwd_kernel, depthwise.BWD)):
        const = dict(W=4, HAS_INIT=True, BT=cfg["BT"], BN=cfg["BN"])
        rows.append({"kernel": name, "shape": "W=4", "launched": True,
                     **resources(fn, const, arch, {"num_warps": cfg["num_warps"], "num_stages": 3}, fp32={"w", "dw", "init"})})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="the window kernels' inputs")
    ap.add_argument("--warps", type=int, nargs="*", default=[4, 8], help="the scan's kernels also at these warp counts")
    ap.add_argument("--out", default=None, help="JSON of the rows")
    args = ap.parse_args(argv)
    rows = window_rows(args.arch, {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]) + chunk_rows(args.arch, args.warps)
    rows += map_and_conv_rows(args.arch)
    print("| kernel | shape | launched | warps | stages | registers | stack bytes | shared KB |\n|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kernel']} | {r['shape']} | {'yes' if r['launched'] else ''} | {r['num_warps']} | {r['num_stages']} | "
              f"{r['registers']} | {r['stack_bytes']} | {r['shared_bytes'] / 1024:.0f} |")
    if args.out:
        info = {**header(False, ()), "device": f"none: compiled for sm_{args.arch} on the CPU"}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**info, "setup": {"arch": args.arch, "window_dtype": args.dtype}, "records": rows}, indent=1))


if __name__ == "__main__":
    main()
