"""Bad inputs: each is refused with a one-line error before any model loads, and nothing the user wrote is lost.

The table runs every command in a scratch folder (the current folder) holding a model folder `model/`
(a tiny Llama's config), a folder `existing/` and a file `notes.yaml` that linearize did not write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import linearize
from linearize import cli
from linearize.distill.stages import Checkpoint
from linearize.errors import LinearizeError
from linearize.outputs import MARKER, atomic_dir

from conftest import tiny_model


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """The current folder, with a model folder, a text file and content linearize did not write."""
    monkeypatch.chdir(tmp_path)
    tiny_model("llama").config.save_pretrained(tmp_path / "model")
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "important.txt").write_text("keep me")
    (tmp_path / "notes.yaml").write_text("mine: true\n")
    (tmp_path / "d.txt").write_text("some text\n")
    return tmp_path


def _forbid_loading(monkeypatch):
    """Any model load fails the test: each refusal must come first."""
    import linearize.loading

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the bad input was refused")

    for name in ("load", "load_config"):
        monkeypatch.setattr(linearize.loading, name, refuse)
    for module in ("linearize.distill.run", "linearize.eval.run", "linearize.info"):
        monkeypatch.setattr(f"{module}.{'load' if module != 'linearize.info' else 'load_config'}", refuse)


PPL = ["--perplexity", "d.txt"]
BAD = [
    # 1, 2: output folders
    (["convert", "--out", "existing", "stage1.steps=2"], "'existing' already exists and was not written by `linearize convert`"),
    (["convert", "--out", "."], "is (or contains) the current folder"),
    (["convert", "--out", ".."], "is (or contains) the current folder"),
    (["convert", "--model", "model", "--out", "model"], "is, contains or lies inside the input 'model'"),
    (["convert", "--model", "model", "--out", "model/sub"], "lies inside the input 'model'"),
    (["eval", "model", *PPL, "--out", "existing"], "was not written by `linearize eval`"),
    (["eval", "model", *PPL, "--out", "model"], "lies inside the input 'model'"),
    (["bench", "model", "--out", "existing"], "was not written by `linearize bench`"),
    (["bench", "model", "--out", "."], "the current folder"),
    (["push", "model", "me/x", "--dry-run", "--out", "existing"], "was not written by `linearize push`"),
    (["push", "model", "me/x", "--dry-run", "--out", "model"], "lies inside the input 'model'"),
    (["push", "model", "me/x", "--dry-run", "--out", "model/.."], "the current folder"),
    (["plan", "model", "--plan", "0:gla", "--out", "notes.yaml"], "'notes.yaml' already exists and was not written by `linearize plan`"),
    (["plan", "model", "--plan", "0:gla", "--out", "existing"], "was not written by `linearize plan`"),
    (["plan", "model", "--budget", "softmax=1", "--report", "existing"], "was not written by `linearize plan`"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_before_loading(scratch, monkeypatch, capsys, argv, message):
    _forbid_loading(monkeypatch)
    before = sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*")) == before  # nothing written or lost
    assert (scratch / "existing" / "important.txt").read_text() == "keep me"


def test_output_folder_rule(tmp_path, monkeypatch):
    """A command replaces only a folder it wrote (or an empty one); --force replaces another's."""
    monkeypatch.chdir(tmp_path)
    with atomic_dir("out", "eval") as tmp:
        Path(tmp, "a.txt").write_text("1")
    assert json.loads((tmp_path / "out" / MARKER).read_text())["command"] == "eval"
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


def test_resume_needs_the_checkpoints_recipe(scratch, monkeypatch, capsys):
    _forbid_loading(monkeypatch)
    (scratch / "out.ckpt" / "stage1").mkdir(parents=True)
    torch.save({}, scratch / "out.ckpt" / "stage1" / "state.pt")
    assert cli.main(["convert", "--out", "out", "--resume"]) == 2
    assert "have no recipe.yaml" in capsys.readouterr().err
