"""Registers, spill stack and shared memory of the window kernels (`kernels/hybrid/window.py`) with
the block sizes `_config` picks, compiled for a GPU architecture on any machine (no GPU needed: Triton
compiles ahead of time and its bundled cuobjdump reads the cubin). A STACK above 0 means spills; the
shared memory must stay under the device's limit per block (227 KB on an H100). Run it without
TRITON_INTERPRET (the interpreter does not compile).

    python benchmarks/kernel_resources.py                # sm_90, the shapes below
    python benchmarks/kernel_resources.py --arch 80      # A100
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from linearize.kernels.hybrid import window
from linearize.kernels.hybrid.naive import EPS

# (window, head dim, query heads, KV heads, softcap, fused): the benchmark's shape, GQA, gemma2's head dim, small ones
SHAPES = [(64, 128, 32, 32, False, True), (128, 128, 32, 8, True, True), (64, 64, 16, 4, True, False),
          (64, 256, 8, 4, True, True), (5, 16, 6, 2, False, False)]


def usage(fn: triton.JITFunction, types: dict[str, str], const: dict[str, object], arch: int, options: dict[str, int]) -> str:
    """Compile `fn` for sm_`arch` and return its resource line."""
    sig = {n: "constexpr" if n in const else types[n] for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v for n, v in const.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs, stack = next(line for line in out.splitlines() if "REG:" in line).split()[:2]
    return f"{regs} {stack} smem={compiled.metadata.shared}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of q, k, v, lin and their gradients")
    args = ap.parse_args()
    x = f"*{args.dtype}"  # as kernels.hybrid_attn calls them: everything in the model's dtype, statistics in fp32
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    rows = dict(
        valid="*i8", lnum=x, lden=x, dlnum=x, dlden="*fp32", LNS="i32", LDS="i32", mix="*fp32", den="*fp32", rmax="*fp32",
        rarg="*i32", dd="*fp32", cw="*fp32", delta="*fp32", dmix="*fp32", dk=x, dv=x, k=x, v=x, q=x, do=x, dq=x,
        T="i32", L="i32", scale="fp32", cap="fp32",
    )
    for w, d, h, hk, cap, fused in SHAPES:
        report = []
        for name, fn, backward in (("fwd", window._window_fwd_kernel, False), ("dq", window._window_dq_kernel, True),
                                   ("dkv", window._window_dkv_kernel, True)):
            cfg = window._config(w, d, d, backward=backward, dtype=dtype)
            options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
            const = dict(H=h, HK=hk, D=d, V=d, W=w, HAS_CAP=cap, MIX=fused, **cfg)
            if "EPS_" in fn.arg_names:
                const["EPS_"] = EPS
            types = dict(rows, out=x if fused else "*fp32")
            report.append(f"{name} {cfg} {options} {usage(fn, types, const, args.arch, options)}")
        print(f"W={w} D={d} H={h}/{hk} softcap={cap} fused={fused}: " + " | ".join(report), flush=True)

if __name__ == "__main__":
    main()
