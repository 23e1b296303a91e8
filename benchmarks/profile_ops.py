"""Where an op's time goes on a GPU: torch.profiler's per-kernel table for one op, pass and length, on
the inputs of `benchmarks/kernel_bench.py` (bf16, H=32, D=128, 16k tokens per batch), or (`--op decode`) for the
replays of one graphed decode step of a random SmolLM2-135M-shaped model (`benchmarks/decode.py`'s).

    python benchmarks/profile_ops.py --op lolcats_hybrid --T 8192 --pass fwdbwd
    python benchmarks/profile_ops.py --op decode --plan lolcats --mode kernels --T 8192 --batch 1
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from linearize import kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", choices=["linear_attn", "simple_gla", "gla", "lolcats_hybrid", "decode"], required=True)
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--pass", dest="pas", choices=["fwd", "fwdbwd"], default="fwd")
    ap.add_argument("--impl", choices=["ours", "fla"], default="ours", help="fla: flash-linear-attention's op (linear_attn, gla)")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--plan", default="lolcats", help="decode: a plan name of benchmarks/decode.py")
    ap.add_argument("--mode", default="kernels", help="decode: a mode of benchmarks/decode.py --ours")
    ap.add_argument("--batch", type=int, default=1, help="decode: batch size")
    args = ap.parse_args()
    if args.op == "decode":
        return profile_decode(args)
    if args.impl == "fla" and args.op not in ("linear_attn", "gla"):
        ap.error("--impl fla profiles linear_attn or gla")
    dev, dt, h, d, t = "cuda", torch.bfloat16, 32, 128, args.T
    b = max(1, 16384 // t)
    leaves = [torch.randn(b, t, h, d, device=dev, dtype=dt) * 0.1 for _ in range(3)]
    g = None  # log-decays as benchmarks/kernel_bench.py draws them: per channel (gla) or per head (simple_gla)
    if args.op == "gla":
        g = F.logsigmoid(torch.randn(b, t, h, d, device=dev)) / 16
    elif args.op == "simple_gla":
        g = F.logsigmoid(torch.randn(b, t, h, device=dev))
    if args.op == "lolcats_hybrid":
        leaves += [torch.rand(b, t, h, 128, device=dev, dtype=dt) for _ in range(2)] + [torch.full((h,), 0.5, device=dev)]
        run = lambda x: kernels.hybrid_attn(*x[:5], None, x[5], window=64, scale=d**-0.5)[0]  # noqa: E731
    elif args.impl == "fla":
        from fla.ops.gla import chunk_gla
        from fla.ops.linear_attn import chunk_linear_attn

        leaves.append(g)
        run = (lambda x: chunk_linear_attn(*x[:3], normalize=False)[0]) if g is None else (lambda x: chunk_gla(*x)[0])  # noqa: E731
    else:
        leaves.append(g)
        run = lambda x: kernels.chunk_gla(*x)[0]  # noqa: E731
    grad = args.pas == "fwdbwd"
    leaves = [None if x is None else x.clone().requires_grad_(grad) for x in leaves]
    do = torch.randn(b, t, h, d, device=dev, dtype=dt)

    def step() -> None:
        y = run(leaves)
        if grad:
            torch.autograd.backward(y, do)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(f"== {args.op} {args.impl} T={t} {args.pas} (10 steps; per-step ms = total / 10)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


def profile_decode(args: argparse.Namespace) -> None:
    """Kernels of 20 replays of a captured decode step after a prefill of T random tokens."""
    import linearize
    from decode import OURS, STACKED, plan_of, smollm2_shaped  # noqa: E402  (the script's folder is on sys.path)
    from linearize.eval.bench import _per_step
    from linearize.fusion import fuse_projections
    from linearize.generation import GraphedDecoder

    teacher = smollm2_shaped(torch.device("cuda"), dtype=torch.bfloat16)
    model = linearize.convert(copy.deepcopy(teacher), plan_of(args.plan, False))
    if args.mode in STACKED:
        model = fuse_projections(model)
    ids = torch.randint(3, teacher.config.vocab_size, (args.batch, args.T), device="cuda")
    with torch.no_grad():
        decoder = GraphedDecoder(model, ids, prefill_chunk=8192, max_new_tokens=128, **OURS[args.mode])
        ms = _per_step(decoder.step, 20, 1, True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                decoder.step()
            torch.cuda.synchronize()
    print(f"== decode {args.plan} {args.mode} B={args.batch} T={args.T}: {ms:.3f} ms a step "
          "(20 replays; per-step kernel time = total / 20)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
