"""The README's Python example runs as written; the CLI refuses bad plans before loading anything.

The CLI's full `convert` run is tested in test_distill.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM

from linearize import cli

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_example_runs(tmp_path):
    code = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 10
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2-27:lolcats(window=64)" in run.stdout
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "my-model").config.linearize["layers"][2]["kind"] == "lolcats"


def test_cli_reports_plan_errors_without_a_traceback(tmp_path, capsys):
    assert cli.main(["convert", "--plan", "0:nokind", "--out", str(tmp_path / "x")]) == 2
    assert "unknown attention kind 'nokind'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_kernel_benchmark_script_runs_in_smoke_mode(tmp_path):
    import json

    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--smoke", "--out", str(tmp_path / "k.json")],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads((tmp_path / "k.json").read_text())
    assert {"command", "date", "device", "versions", "records"} <= set(data)
    assert {(r["op"], r["impl"]) for r in data["records"]} >= {("linear_attn", "floor"), ("linear_attn", "reference"), ("softmax_attn", "sdpa")}
    assert all(r["ms"] > 0 for r in data["records"])
