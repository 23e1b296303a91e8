"""Teacher vs converted SmolLM2-135M: every offline lm-eval task with data, WikiText-2 perplexity, recall
(MQAR, passkey) up to 16k and the speed/memory bench up to 32k, through `linearize eval` / `linearize bench`.

    python benchmarks/eval_smollm2.py --converted out/smollm2-135m-lolcats --teacher smollm2-135m \
        --data-dir ../shared/evaldata --out benchmarks/results/eval_smollm2.json --reports benchmarks/eval_smollm2

Writes the two runs' folders (results.json, report.md, bench.png) under --reports and one JSON of
records {"model": "teacher" | <plan>, "task", "metric", "value"} with command, date, device, versions.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from linearize.eval import run_bench, run_eval


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--converted", required=True, help="a converted model folder (from `linearize convert`)")
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--data-dir", required=True, help="the evaluation data folder (../shared/evaldata)")
    ap.add_argument("--out", required=True, help="the records JSON")
    ap.add_argument("--reports", required=True, help="folder for the eval/ and bench/ reports")
    ap.add_argument("--recall-lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--recall-items", type=int, default=20)
    ap.add_argument("--bench-lengths", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--bench-batch-sizes", default="1,8")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024, help="perplexity window (the distillation runs' setting)")
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, default=None, help="lm-eval: first N documents per task (smoke runs)")
    args = ap.parse_args()

    command = shlex.join(["python", *sys.argv])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    reports = Path(args.reports)
    ev = run_eval(args.converted, reports / "eval", compare_with=args.teacher, command=command, tasks=["local"],
                  data_dir=args.data_dir, perplexity=[Path(args.data_dir) / "wikitext2" / "test.txt"],
                  context=args.context, stride=args.stride, recall=["mqar", "passkey"],
                  recall_lengths=ints(args.recall_lengths), recall_items=args.recall_items, batch_size=args.batch_size,
                  limit=args.limit)
    bench = run_bench(args.converted, reports / "bench", compare_with=args.teacher, command=command,
                      lengths=ints(args.bench_lengths), batch_sizes=ints(args.bench_batch_sizes),
                      decode_tokens=args.decode_tokens)
    out = {k: ev[k] for k in ("command", "date", "device", "versions")}
    out.update(teacher=args.teacher, converted=args.converted, settings={"eval": ev["settings"], "bench": bench["settings"]},
               records=ev["records"] + bench["records"], bench_rows=bench["rows"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
