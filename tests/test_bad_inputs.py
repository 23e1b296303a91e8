"""Bad inputs: each is refused with a one-line error before any weights load, and nothing the user wrote is lost.

The table runs every command in a scratch folder (the current folder) holding a model folder `model/`
(a tiny Llama's config only), a converted model's config `converted/`, a folder `existing/` and a file
`notes.yaml` that linearize did not write, broken YAML and JSON files, and a text file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import linearize
from linearize import cli
from linearize.distill.stages import Checkpoint
from linearize.errors import LinearizeError, ModelLoadError
from linearize.outputs import MARKER, atomic_dir

from conftest import tiny_folder, tiny_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """The current folder, with model folders, a text file, bad files and content linearize did not write."""
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    tiny_model("llama").config.save_pretrained(tmp_path / "model")
    (tmp_path / "converted").mkdir()
    (tmp_path / "converted" / "config.json").write_text(json.dumps({"model_type": "linearize_llama",
                                                                    "linearize": {"plan": "0:gla,1-:softmax"}}))
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text('{"model_type": "llama",')
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "important.txt").write_text("keep me")
    (tmp_path / "notes.yaml").write_text("mine: true\n")
    (tmp_path / "bad.yaml").write_text("plan: [0:gla\nstage1: {steps: 2}\n")
    (tmp_path / "list.yaml").write_text("- stage1\n- stage2\n")
    (tmp_path / "binary.yaml").write_bytes(b"\x00\xff\xfe")
    (tmp_path / "d.txt").write_text("some text\n")
    return tmp_path


def _forbid_loading(monkeypatch) -> None:
    """Loading any weights fails the test: each refusal must come first."""
    import linearize.loading

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the bad input was refused")

    monkeypatch.setattr(linearize.loading, "_load_gguf", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


PPL = ["--perplexity", "d.txt"]
BAD = [
    # 1, 2: output folders: another's content, the current folder, the input
    (["convert", "--out", "existing", "stage1.steps=2"], "'existing' already exists and was not written by `linearize convert`"),
    (["convert", "--out", "."], "is (or contains) the current folder"),
    (["convert", "--out", ".."], "is (or contains) the current folder"),
    (["convert", "--model", "model", "--out", "model"], "is, contains or lies inside the input 'model'"),
    (["convert", "--model", "model", "--out", "model/sub"], "lies inside the input 'model'"),
    (["convert", "--out", "data", "data.source=data/d.txt", "--force"], "contains or lies inside the input 'data/d.txt'"),
    (["eval", "model", *PPL, "--out", "existing"], "was not written by `linearize eval`"),
    (["eval", "model", *PPL, "--out", "model"], "lies inside the input 'model'"),
    (["bench", "model", "--out", "existing"], "was not written by `linearize bench`"),
    (["bench", "model", "--out", ".", "--force"], "the current folder"),
    (["push", "model", "me/x", "--dry-run", "--out", "existing"], "was not written by `linearize push`"),
    (["push", "model", "me/x", "--dry-run", "--out", "model"], "lies inside the input 'model'"),
    (["push", "model", "me/x", "--dry-run", "--out", "model/.."], "the current folder"),
    (["push", "converted", "me/x", "--dry-run", "--out", "o"], "has no valid 'linearize' entry (base_model_type, and layers"),
    (["push", "converted", "me/x", "--dry-run", "--out", "o", "--license", "bad license"], "license 'bad license' is not a Hub license id"),
    (["push", "converted", "me/x", "--out", "o", "--license", "Apache-2.0"], "license 'Apache-2.0' is not a Hub license id"),
    (["plan", "model", "--plan", "0:gla", "--out", "notes.yaml"], "'notes.yaml' already exists and was not written by `linearize plan`"),
    (["plan", "model", "--plan", "0:gla", "--out", "existing"], "was not written by `linearize plan`"),
    (["plan", "model", "--budget", "softmax=1", "--report", "existing"], "was not written by `linearize plan`"),
    # 4: config.json that is not JSON
    (["inspect", "badjson"], "badjson/config.json' is not valid JSON"),
    (["inspect", "model", "--gpus", "2"], "give its recipe too (--config RECIPE)"),
    (["inspect", "model", "--config", "bad.yaml"], "recipe 'bad.yaml' is not valid YAML"),
    (["inspect", "model", "--config", "smollm2-135m-recall", "--gpus", "0"], "--gpus 0: give the number of GPUs"),
    (["inspect", "model", "--config", "smollm2-135m-recall", "--set", "stage2.batch_size=0"], "stage2.batch_size=0"),
    (["convert", "--model", "badjson", "--out", "o"], "is not valid JSON"),
    (["push", "badjson", "me/x", "--dry-run", "--out", "o"], "is not valid JSON"),
    (["eval", "badjson", *PPL, "--out", "o"], "is not valid JSON"),
    (["plan", "badjson", "--plan", "0:gla"], "is not valid JSON"),
    # 6: YAML that does not parse, or is not a mapping
    (["convert", "--config", "bad.yaml", "--out", "o"], "recipe 'bad.yaml' is not valid YAML"),
    (["convert", "--config", "list.yaml", "--out", "o"], "is not a YAML mapping"),
    (["convert", "--plan", "bad.yaml", "--out", "o"], "plan file 'bad.yaml' is not valid YAML"),
    (["plan", "model", "--plan", "bad.yaml"], "plan file 'bad.yaml' is not valid YAML"),
    (["convert", "--config", "binary.yaml", "--out", "o"], "recipe 'binary.yaml' is not UTF-8 text (invalid start byte at byte 1)"),
    (["plan", "model", "--plan", "binary.yaml"], "plan file 'binary.yaml' is not UTF-8 text"),
    # 7, 18: recipe values no run can use; a type error names the type
    (["convert", "--out", "o", "data.seq_len=0"], "data.seq_len=0"),
    (["convert", "--out", "o", "data.recall_mix=1"], "data.recall_mix=1"),
    (["convert", "--out", "o", "stage1.batch_size=0"], "stage1.batch_size=0"),
    (["convert", "--out", "o", "stage1.steps=-5"], "stage1.steps=-5"),
    (["convert", "--out", "o", "stage2.save_every=0"], "stage2.save_every=0"),
    (["convert", "--out", "o", "stage1.steps=many"], "stage1.steps='many' does not fit the type int"),
    (["convert", "--out", "o", "stage1.lr=-1"], "stage1.lr=-1.0"),
    (["convert", "--out", "o", "stage2.lr=.nan"], "stage2.lr=nan"),
    (["convert", "--out", "o", "stage1.weight_decay=-0.1"], "stage1.weight_decay=-0.1"),
    (["convert", "--out", "o", "stage2.lora_r=0"], "stage2.lora_r=0"),
    (["convert", "--out", "o", "stage2.lora_dropout=1.5"], "stage2.lora_dropout=1.5"),
    (["convert", "--out", "o", "data.max_texts=-1"], "data.max_texts=-1"),
    # 8: an lm-eval task that needs the Hub, offline
    (["eval", "model", "--tasks", "piqa", "--out", "o"], "use 'local_piqa', which reads the offline copy"),
    # 11: an empty plan
    (["convert", "--plan", "", "--out", "o"], "empty layer plan"),
    # 12: converted model and teacher swapped
    (["eval", "model", "--compare", "converted", *PPL, "--out", "o"], "swap them"),
    # 13: a plan that does not fit the model, sizes below 1
    (["convert", "--model", "model", "--plan", "99:gla", "--out", "o"], "this model has 3 layers"),
    (["convert", "--model", "model", "--plan", "0-2:lolcats,1:gla", "--out", "o"], "layer 1 is assigned twice"),
    (["convert", "--model", "model", "--plan", "*:softmax", "--out", "o"], "converts no layer, so there is nothing to distill"),
    (["plan", "model", "--plan", "*:gla,0:softmax,*:lolcats"], "the default '*' is given twice (the second: '*:lolcats')"),
    (["convert", "--model", "model", "--plan", "1:gla", "--out", "o", "stage2.lora_targets=q_norm"],
     "stage2.lora_targets=q_norm names none of the converted layers' projections"),
    (["eval", "model", *PPL, "--context", "0", "--out", "o"], "--context 0: must be positive"),
    (["eval", "model", *PPL, "--context", "32", "--stride", "64", "--out", "o"], "--stride 64 is larger than --context 32"),
    (["eval", "model", "--recall", "mqar", "--recall-lengths", "0", "--out", "o"], "--recall-lengths [0]: must be positive"),
    (["eval", "model", *PPL, "--num-fewshot", "-1", "--out", "o"], "--num-fewshot -1: must be 0 or more"),
    (["eval", "model", "--recall", "mqar,passkeys", "--out", "o"], "unknown recall task 'passkeys': use mqar, passkey, copy"),
    (["bench", "model", "--lengths", "0,64", "--out", "o"], "--lengths [0, 64]: must be positive"),
    (["eval", "model", *PPL, "--device", "gpu", "--out", "o"], "unknown device 'gpu': use cuda, cuda:N or cpu"),
    (["bench", "model", "--dtype", "int8", "--out", "o"], "unknown dtype 'int8': use bfloat16, float16 or float32"),
    (["plan", "model", "--budget", "softmax=1", "--device", "gpu"], "unknown device 'gpu'"),
    (["plan", "model", "--budget", "softmax=1", "--seq-len", "0", "--batch-size", "-1"], "--seq-len 0, --batch-size -1: must be positive"),
    (["plan", "model", "--budget", "cache=50%", "--copy-length", "0", "--window", "0"], "--window 0, --copy-length 0: must be"),
    (["plan", "model", "--budget", "ratio=3", "--lr", "-1"], "--lr -1.0: must be positive"),
    (["plan", "model", "--budget", "softmax=1", "--steps", "-1"], "--steps -1: must be 0 or more"),
    (["plan", "model", "--budget", "cache=50"], "must be in (0, 100%]: for 50 percent write cache=50%"),
    (["plan", "model", "--budget", "cache=150%"], "must be in (0, 100%]\n"),
    # 14: a model folder without its tokenizer
    (["eval", "model", *PPL, "--out", "o"], "has no tokenizer files: save the tokenizer there too"),
    # a Hub id offline: transformers' message of several lines becomes one
    (["inspect", "some-org/some-model"], "cannot load 'some-org/some-model' from the Hugging Face Hub"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_before_loading(scratch, monkeypatch, capsys, argv, message):
    _forbid_loading(monkeypatch)
    (scratch / "data").mkdir()
    (scratch / "data" / "d.txt").write_text("more text\n")
    before = sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*")) == before  # nothing written or lost
    assert (scratch / "existing" / "important.txt").read_text() == "keep me"


def test_recall_length_a_task_cannot_fill_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    """mqar needs a few name/number lines: a length too short for them fails from the tokenizer alone, before the weights."""
    monkeypatch.chdir(tmp_path)
    tiny_folder(tmp_path / "tiny")
    _forbid_loading(monkeypatch)
    capsys.readouterr()
    assert cli.main(["eval", "tiny", "--recall", "mqar", "--recall-lengths", "1024,16", "--device", "cpu", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert "mqar: 16 tokens hold too few name/number lines" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_output_folder_rule(tmp_path, monkeypatch):
    """A command replaces only a folder it wrote (or an empty one); --force replaces another's; files get normal modes."""
    monkeypatch.chdir(tmp_path)
    with atomic_dir("out", "eval") as tmp:
        Path(tmp, "a.txt").write_text("1")
        os.chmod(Path(tmp, "a.txt"), 0o600)  # as transformers writes model.safetensors
    assert json.loads((tmp_path / "out" / MARKER).read_text())["command"] == "eval"
    assert (tmp_path / "out" / "a.txt").stat().st_mode & 0o777 == 0o666 & ~_umask()
    with atomic_dir("out", "eval") as tmp:  # its own folder: replaced
        Path(tmp, "b.txt").write_text("2")
    assert sorted(os.listdir(tmp_path / "out")) == [MARKER, "b.txt"]
    with pytest.raises(LinearizeError, match="not written by `linearize bench`"), atomic_dir("out", "bench"):
        pass
    with atomic_dir("out", "bench", force=True) as tmp:
        Path(tmp, "c.txt").write_text("3")
    assert sorted(os.listdir(tmp_path / "out")) == [MARKER, "c.txt"]
    (tmp_path / "empty").mkdir()
    with atomic_dir("empty", "eval"):
        pass
    assert os.listdir(tmp_path / "empty") == [MARKER]
    assert sorted(os.listdir(tmp_path)) == ["empty", "out"]  # no temporary folder left


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_read_only_output_is_one_line(tmp_path, monkeypatch, capsys):
    import linearize.outputs

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(linearize.outputs.tempfile, "mkdtemp", read_only)
    _forbid_loading(monkeypatch)
    for argv in (["convert", "--out", str(tmp_path / "o")], ["plan", "--plan", "0:gla", "--out", str(tmp_path / "p.yaml")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert f"cannot write {str(tmp_path / argv[-1].split('/')[-1])!r}: Read-only file system" in err, err
        assert err.count("\n") == 1


def test_save_pretrained_into_an_existing_folder_keeps_its_files(tmp_path):
    model = linearize.convert(tiny_model("llama"), "1:gla")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    model.save_pretrained(tmp_path / "m")
    assert {"tokenizer.json", "config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "m"))


class _Payload:
    """Unpickling this runs code: it creates the file `path`."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_checkpoint_loads_tensors_and_plain_values_only(tmp_path):
    from linearize.distill.stages import _schedule

    w = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([w], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(10))
    w.sum().backward()
    opt.step()
    sched.step()
    Checkpoint(tmp_path / "real").save({"w": w}, opt, sched, 1, False, [0.5])
    state = Checkpoint(tmp_path / "real").load()  # what linearize writes loads without unpickling objects
    assert state["step"] == 1 and torch.equal(state["params"]["w"], w.detach()) and state["history"] == [0.5]
    assert state["optimizer"]["state"][0]["exp_avg"].shape == (4,) and state["scheduler"]["last_epoch"] == 1

    ran = tmp_path / "code-ran"
    (tmp_path / "crafted").mkdir()
    torch.save({"params": _Payload(str(ran))}, tmp_path / "crafted" / "state.pt")
    with pytest.raises(LinearizeError, match="objects other than tensors"):
        Checkpoint(tmp_path / "crafted").load()
    assert not ran.exists()
    assert "weights_only=False" not in "".join(p.read_text() for p in (ROOT / "linearize").rglob("*.py"))


def test_resume_needs_the_checkpoints_recipe(scratch, monkeypatch, capsys):
    _forbid_loading(monkeypatch)
    (scratch / "out.ckpt" / "stage1").mkdir(parents=True)
    torch.save({}, scratch / "out.ckpt" / "stage1" / "state.pt")
    assert cli.main(["convert", "--out", "out", "--resume"]) == 2
    assert "have no recipe.yaml" in capsys.readouterr().err


def test_resume_with_a_damaged_recipe_or_checkpoint_is_one_line(scratch, monkeypatch, capsys):
    """An edited recipe.yaml beside the checkpoints was a KeyError traceback; a cut-off state.pt gave torch's advice too."""
    _forbid_loading(monkeypatch)
    (scratch / "out.ckpt" / "stage1").mkdir(parents=True)
    torch.save({}, scratch / "out.ckpt" / "stage1" / "state.pt")
    for recipe in ("model: x\n", "- a\n", "stage1: {batch_size: two}\nstage2: {batch_size: 2}\n", "plan: [0:gla\n"):
        (scratch / "out.ckpt" / "recipe.yaml").write_text(recipe)
        assert cli.main(["convert", "--out", "out", "--resume"]) == 2
        err = capsys.readouterr().err
        assert "out.ckpt/recipe.yaml is damaged" in err and "restore it, or delete out.ckpt" in err, err
        assert err.count("\n") == 1, err
    torch.save({"step": 1}, scratch / "state.pt")
    data = (scratch / "state.pt").read_bytes()
    (scratch / "out.ckpt" / "stage1" / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(LinearizeError) as e:
        Checkpoint(scratch / "out.ckpt" / "stage1").load()
    assert "state.pt is damaged (PytorchStreamReader failed reading zip archive: failed finding central directory): " \
           "delete" in str(e.value) and "corrupted" not in str(e.value), str(e.value)


def test_a_run_that_never_trained_leaves_no_checkpoints_or_ones_a_rerun_accepts(scratch, monkeypatch, capsys):
    from linearize.distill import run

    def unreachable(*a, **k):
        raise ModelLoadError("the Hub cannot be reached")

    monkeypatch.setattr(run, "load", unreachable)
    args = ["convert", "--model", "model", "--plan", "1:gla", "--out", "out"]
    assert cli.main(args) == 2
    assert "cannot be reached" in capsys.readouterr().err and not (scratch / "out.ckpt").exists()
    (scratch / "out.ckpt").mkdir()  # what an earlier failed run left
    (scratch / "out.ckpt" / "recipe.yaml").write_text("model: another\n")
    for extra in ([], ["--resume"]):
        assert cli.main(args + extra) == 2
        assert "cannot be reached" in capsys.readouterr().err  # not "pass --resume" or "another recipe"


def test_ctrl_c_exits_130_in_one_line(scratch, monkeypatch, capsys):
    import linearize.info

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(linearize.info, "describe", interrupted)
    assert cli.main(["inspect", "model"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_truncated_gguf_says_so(tmp_path, capsys):
    from linearize.loading import default_gguf

    data = default_gguf().read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    assert cli.main(["inspect", str(tmp_path / "cut.gguf")]) == 2
    err = capsys.readouterr().err
    assert f"truncated or corrupt ({len(data) // 2:,} of {len(data):,} bytes)" in err and err.count("\n") == 1


def test_module_entry_version_and_fast_help():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = lambda *a: subprocess.run([sys.executable, *a], env=env, capture_output=True, text=True, timeout=120)  # noqa: E731
    helped = run("-m", "linearize", "--help")
    assert helped.returncode == 0 and "convert" in helped.stdout
    assert run("-m", "linearize", "--version").stdout.strip() == f"linearize {linearize.__version__}"
    probe = run("-c", "import sys\nfrom linearize import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
                "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert probe.stdout.strip().endswith("[]"), probe.stdout[-300:]  # --help imports neither (it took 5-8 s)


def test_eval_report_lists_only_what_ran(tmp_path):
    folder = tiny_folder(tmp_path / "tiny")
    (tmp_path / "t.txt").write_text(" ".join(f"w{i % 100}" for i in range(200)))
    assert cli.main(["eval", str(folder), "--perplexity", str(tmp_path / "t.txt"), "--context", "32", "--limit", "8",
                     "--device", "cpu", "--out", str(tmp_path / "e")]) == 0
    report = (tmp_path / "e" / "report.md").read_text()
    assert "- limit: 8\n" in report and "recall" not in report


def test_convert_of_a_tiny_model_runs_without_warnings(tmp_path):
    import warnings

    folder = tiny_folder(tmp_path / "tiny")
    (tmp_path / "t.txt").write_text("\n".join(" ".join(f"w{(i * 7 + j) % 120 + 3}" for j in range(40)) for i in range(20)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["convert", "--model", str(folder), "--plan", "1:gla", "--out", str(tmp_path / "out"),
                         f"data.source={tmp_path / 't.txt'}", "data.seq_len=16", "stage1.steps=1", "stage2.steps=1"]) == 0
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))], [str(w.message) for w in caught]
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_load_reports_that_are_not_errors_still_reach_the_log(tmp_path):
    """Weight-load reports are held back only to shorten a shape-mismatch error: a folder missing a weight still loads
    (transformers initializes it) and its report reaches transformers' log handlers afterwards."""
    import logging

    from safetensors.torch import load_file, save_file

    tiny_folder(tmp_path / "tiny")
    weights = tmp_path / "tiny" / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if k != "model.norm.weight"}, weights, metadata={"format": "pt"})
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        linearize.load(tmp_path / "tiny")
    finally:
        logger.removeHandler(handler)
    assert any("LOAD REPORT" in m and "model.norm.weight" in m and "MISSING" in m for m in seen), seen


def test_damaged_model_folder_is_one_line(tmp_path, monkeypatch, capsys):
    """Weights missing, cut off or of other shapes than config.json, a tokenizer that cannot be built: one line, no output."""
    import shutil

    monkeypatch.chdir(tmp_path)
    tiny_folder(tmp_path / "tiny")
    (tmp_path / "d.txt").write_text("w3 w4 w5 w6\n")
    weights = tmp_path / "tiny" / "model.safetensors"
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    capsys.readouterr()
    damage = {
        "no weights": lambda f: (f / "model.safetensors").unlink(),
        "cut off": lambda f: (f / "model.safetensors").write_bytes(weights.read_bytes()[: weights.stat().st_size * 9 // 10]),
        "other shapes": lambda f: (f / "config.json").write_text(json.dumps({**config, "hidden_size": 32})),
        "no tokenizer.json": lambda f: (f / "tokenizer.json").unlink(),
        "tokenizer.json cut off": lambda f: (f / "tokenizer.json").write_text("{"),  # said 'upgrade transformers'
    }
    messages = {"no weights": "they are missing or cut off", "cut off": "they are missing or cut off",
                "other shapes": "do not have the shapes its config.json gives (lm_head.weight: [128, 64] in the weights, [128, 32] from config.json)", "no tokenizer.json": "tokenizer",
                "tokenizer.json cut off": "its tokenizer files are damaged (or of a kind transformers"}
    for name, how in damage.items():
        shutil.copytree(tmp_path / "tiny", tmp_path / name)
        how(tmp_path / name)
        assert cli.main(["eval", name, "--perplexity", "d.txt", "--device", "cpu", "--out", "o"]) == 2, name
        err = "".join(line for line in capsys.readouterr().err.splitlines(True) if "it/s]" not in line)  # no progress bars
        last = err.splitlines()[-1]
        assert last.startswith("error: ") and messages[name] in last and "Traceback" not in err, err
        assert err.count("\n") == 1, err
        assert not (tmp_path / "o").exists()


def test_push_license_must_be_a_hub_license_id(tmp_path, capsys):
    """--license 'bad license' went into the model card as it was; Hub ids (openrail++, llama3.1, other) still pass."""
    linearize.convert(tiny_model("llama"), "1:gla").save_pretrained(tmp_path / "m")
    capsys.readouterr()  # save_pretrained's progress bar
    assert cli.main(["push", str(tmp_path / "m"), "me/x", "--dry-run", "--out", str(tmp_path / "h"), "--license", "bad license"]) == 2
    err = capsys.readouterr().err
    assert "license 'bad license' is not a Hub license id: give one such as apache-2.0" in err and err.count("\n") == 1, err
    assert not (tmp_path / "h").exists()
    for license in ("openrail++", "llama3.1", "cc-by-nc-4.0"):
        assert cli.main(["push", str(tmp_path / "m"), "me/x", "--dry-run", "--out", str(tmp_path / "h"), "--license", license]) == 0
        assert f"license: {license}\n" in (tmp_path / "h" / "README.md").read_text()


def test_converted_folder_with_an_edited_config_is_one_line(tmp_path):
    """A converted model's config.json without its plan, with a plan for another number of layers, or of a type no
    converted class has: one line that says to restore it (was AttributeError, TypeError or a silent partial load)."""
    import shutil

    base = tiny_folder(tmp_path / "base")
    linearize.convert(AutoModelForCausalLM.from_pretrained(base), "1:gla").save_pretrained(tmp_path / "m")
    for f in base.glob("*.json"):  # the tokenizer's files
        if f.name not in ("config.json", "generation_config.json"):
            shutil.copy(f, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    edits = {
        "no plan": ({k: v for k, v in config.items() if k != "linearize"}, "has no valid 'linearize' entry"),
        "two of three layers": ({**config, "linearize": {**config["linearize"], "layers": config["linearize"]["layers"][:2]}},
                                "one spec for each of its 3 layers"),
        "plan a string": ({**config, "linearize": "0:gla"}, "has no valid 'linearize' entry"),
        "unknown type": ({**config, "model_type": "linearize_gpt2"}, "converted models load as linearize_llama"),
    }
    for name, (edited, message) in edits.items():
        shutil.copytree(tmp_path / "m", tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps(edited))
        with pytest.raises(LinearizeError, match=re.escape(message)):
            linearize.load(tmp_path / name)
