"""Distillation on SmolLM2 with two converted layers: losses fall, only the intended parameters
move, runs resume exactly, data loaders pack correctly, the CLI writes a complete folder."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import linearize
from linearize.distill import load_config
from linearize.distill.config import ConfigError, DataConfig
from linearize.distill.data import DataError, pack, read_texts, split
from linearize.adapters import ADAPTERS
from linearize.errors import LinearizeError
from linearize.distill.stages import (Checkpoint, attention_mode, lm_loss, new_parameters, set_checkpointing, train_loop,
                                      transfer_losses)

from conftest import perturb_new_params, rel_err, tiny_model

TEXT = (
    "The river runs through the old town and past the mill. Children play on its banks in summer. "
    "In winter the water freezes and the town holds a market on the ice. Merchants sell bread, wool "
    "and hot wine. The mill has stood for three hundred years and still grinds grain every autumn. "
)


@pytest.fixture
def rows(smollm2):
    _, tok = smollm2
    return pack([TEXT * 3, TEXT[::-1], TEXT.upper()], tok, 48)


@pytest.fixture
def two_layers(smollm2):
    model, tok = smollm2
    return linearize.convert(model, "3:lolcats(window=8),7:gla"), tok


def _loop(params, fn, rows, steps, tmp_path, name="s", lr=1e-2, save_every=100, **kw):
    return train_loop(name, params, fn, rows, steps=steps, batch_size=2, lr=lr, weight_decay=0.0, save_every=save_every,
                      ckpt=Checkpoint(tmp_path / name), seed=0, device=torch.device("cpu"), log=lambda s: None, **kw)


def test_stage1_reduces_transfer_loss_and_moves_only_new_parameters(two_layers, rows, tmp_path):
    model, _ = two_layers
    model.requires_grad_(False)
    params = {k: p.requires_grad_(True) for k, p in new_parameters(model).items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = rows[:2]
    loss0 = sum(v[0] for v in transfer_losses(model, probe, train=False).values())
    assert set(transfer_losses(model, probe, train=False)) == {3, 7}
    _loop(params, lambda b: sum(v[0] for v in transfer_losses(model, b, train=True).values()), rows, 12, tmp_path)
    loss1 = sum(v[0] for v in transfer_losses(model, probe, train=False).values())
    assert loss1 < 0.8 * loss0
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed == set(params)


def test_stage2_lora_reduces_lm_loss_and_freezes_base_weights(two_layers, rows, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, _ = two_layers
    model.requires_grad_(False)
    targets = [f"model.layers.{i}.self_attn.{p}" for i in (3, 7) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    for p in new_parameters(peft_model).values():
        p.requires_grad_(True)
    params = {k: p for k, p in peft_model.named_parameters() if p.requires_grad}
    assert {k.split("self_attn.")[1].split(".")[0] for k in params} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "feature_map_q", "feature_map_k", "window_logit", "gate"}
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    with torch.no_grad():
        loss0 = lm_loss(peft_model, rows[:2], 1.0, 0.5).item()

    def step(b):
        loss = lm_loss(peft_model, b, 1.0, 0.5)
        loss.backward()
        return loss.item()

    _loop(params, step, rows, 8, tmp_path, lr=2e-3)
    with torch.no_grad():
        loss1 = lm_loss(peft_model, rows[:2], 1.0, 0.5).item()
    assert loss1 < loss0
    changed = {k for k, v in peft_model.state_dict().items() if not torch.equal(v, before[k])}
    assert all("lora_" in k or any(n in k for n in ("feature_map", "window_logit", "gate")) for k in changed)
    assert any("lora_B" in k for k in changed)


@pytest.mark.parametrize("model_type", sorted(ADAPTERS))
def test_chunked_lm_loss_equals_the_whole_logits_loss(model_type):
    """CE + KL through the final hidden states, 5 tokens of logits at a time (Gemma 2: soft-capped
    logits), gives the loss and LoRA/new-parameter gradients of the model's own whole logits."""
    from peft import LoraConfig, get_peft_model

    model = linearize.convert(tiny_model(model_type), "*:lolcats(window=3)")
    perturb_new_params(model)
    if getattr(model.config, "final_logit_softcapping", None):
        model.config.final_logit_softcapping = 0.5  # a cap the tiny model's logits reach
    model.requires_grad_(False)
    targets = [n for n, m in model.named_modules() if n.endswith(("o_proj", "v_proj"))]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    for name, p in model.named_parameters():
        if "lora_" in name or "feature_map" in name:
            p.requires_grad_(True)
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)  # B = 0 would leave the student equal to the teacher
    params = [p for p in model.parameters() if p.requires_grad]
    batch = torch.randint(3, 128, (2, 13), generator=torch.Generator().manual_seed(0))
    chunked = lm_loss(model, batch, 0.7, 0.5, chunk=5)
    grads = torch.autograd.grad(chunked, params)
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # the whole-logits loss
    with torch.no_grad(), model.disable_adapter(), attention_mode(model, "teacher"):
        teacher = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
    whole = 0.7 * F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)) + 0.5 * F.kl_div(
        logits.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()
    refs = torch.autograd.grad(whole, params, retain_graph=True)  # the CE-only check below reuses the logits
    assert abs(chunked.item() - whole.item()) < 1e-5 * whole.item()
    assert all(rel_err(g, r) < 1e-4 for g, r in zip(grads, refs))
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))  # without the teacher
    chunked = lm_loss(model, batch, 1.0, 0.0, chunk=7)
    assert abs(chunked.item() - ce.item()) < 1e-5 * ce.item()
    assert all(rel_err(g, r) < 1e-4 for g, r in zip(torch.autograd.grad(chunked, params), torch.autograd.grad(ce, params)))


def test_stage2_gradient_checkpointing_gives_the_same_gradients(two_layers, rows):
    model, _ = two_layers
    model.requires_grad_(False)
    params = {k: p.requires_grad_(True) for k, p in new_parameters(model).items()}
    calls = []
    hook = model.model.layers[3].self_attn.register_forward_hook(lambda *a: calls.append(1))
    model.train()
    grads, forwards = [], []
    for checkpointing in (False, True):
        if checkpointing:
            set_checkpointing(model, True)
        calls.clear()
        lm_loss(model, rows[:2], 1.0, 0.0).backward()
        grads.append({k: p.grad.clone() for k, p in params.items()})
        forwards.append(len(calls))
        for p in params.values():
            p.grad = None
    hook.remove()
    set_checkpointing(model, False)
    model.eval()
    assert forwards == [1, 2]  # recomputed in backward
    assert sum(g.abs().sum() for g in grads[0].values()) > 0
    assert all(rel_err(grads[1][k], grads[0][k]) < 1e-5 for k in params)


def _transfer_run(model):
    """Stage 1's trainable parameters of `model`, its step function, and a way back to their initial values
    (what a fresh process starts from)."""
    model.requires_grad_(False)
    params = {k: p.requires_grad_(True) for k, p in new_parameters(model).items()}
    init = {k: p.detach().clone() for k, p in params.items()}

    def restore() -> None:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(init[k])

    return params, lambda b: sum(v[0] for v in transfer_losses(model, b, train=True).values()), restore


def test_interrupted_stage_resumes_exactly(two_layers, rows, tmp_path):
    params, fn, restore = _transfer_run(two_layers[0])
    straight = _loop(params, fn, rows, 6, tmp_path, name="a")
    final = {k: p.detach().clone() for k, p in params.items()}

    restore()
    calls = []

    def crashing(b):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return fn(b)

    with pytest.raises(KeyboardInterrupt):
        _loop(params, crashing, rows, 6, tmp_path, name="b")
    assert Checkpoint(tmp_path / "b").load()["step"] == 3
    restore()  # a fresh process would start from the initial weights again
    resumed = _loop(params, fn, rows, 6, tmp_path, name="b")
    assert resumed["resumed_from"] == 3 and resumed["history"] == straight["history"]
    for k, p in params.items():
        assert torch.allclose(p, final[k], atol=1e-6), k
    again = _loop(params, fn, rows, 6, tmp_path, name="b")  # finished earlier: loaded, same token count
    assert again["resumed_from"] == 6 and again["train_tokens"] == straight["train_tokens"]


def test_ctrl_c_during_the_parameter_update_still_resumes_exactly(two_layers, rows, tmp_path):
    """A Ctrl-C that lands after the optimizer moved the parameters but before the step was counted
    must not leave a checkpoint that replays that step: the update and its bookkeeping finish first."""
    import signal

    params, fn, restore = _transfer_run(two_layers[0])
    straight = _loop(params, fn, rows, 5, tmp_path, name="a")
    restore()
    calls = []

    class Loss(float):  # read once the update is done, before the step is counted
        def __float__(self):
            if len(calls) == 3:  # the 3rd training step: what Python runs on Ctrl-C (a real os.kill was flaky in make test)
                signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
            return float(self.real)

    def step(batch):
        calls.append(1)
        return Loss(fn(batch))

    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background `make test &` starts with SIGINT ignored
    try:
        with pytest.raises(KeyboardInterrupt):
            _loop(params, step, rows, 5, tmp_path, name="b")
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert len(calls) == 3 and Checkpoint(tmp_path / "b").load()["step"] == 3  # the interrupted step counted, its update kept
    restore()
    resumed = _loop(params, fn, rows, 5, tmp_path, name="b")
    assert resumed["resumed_from"] == 3 and resumed["history"] == straight["history"]


def test_speed_leaves_out_the_checkpoint_writes(tmp_path, monkeypatch):
    """tokens/s is the training rate: a short run's final save is reported in checkpoint_s, not charged to its steps."""
    w = torch.nn.Parameter(torch.zeros(3))
    save = Checkpoint.save

    def slow_save(self, *a, **kw):
        time.sleep(0.5)
        save(self, *a, **kw)

    def step(batch):
        time.sleep(0.02)
        loss = (w - 1).square().sum()
        loss.backward()
        return loss.item()

    monkeypatch.setattr(Checkpoint, "save", slow_save)
    m = _loop({"w": w}, step, torch.zeros(4, 8, dtype=torch.long), 5, tmp_path, save_every=2)  # saves after steps 2, 4, 5
    assert m["checkpoint_s"] >= 1.5
    assert m["tokens_per_s"] > 0.5 * 16 / 0.02  # 16 tokens a step at ~20 ms; with the saves in it would be under 40% of that


def test_out_of_memory_is_one_line_that_names_the_fix_and_keeps_the_checkpoint(two_layers, rows, tmp_path):
    params, fn, restore = _transfer_run(two_layers[0])
    calls = []

    def step(batch):  # the 4th step runs out of memory, after a checkpoint at step 2
        calls.append(1)
        if len(calls) == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 139.8 GiB")
        return fn(batch)

    try:
        with pytest.raises(LinearizeError) as err:
            _loop(params, step, rows, 6, tmp_path, name="stage2", save_every=2)
    finally:
        restore()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("stage2 ran out of CPU memory (tried to allocate 2.50 GiB)")
    assert "stage2.batch_size (now 2)" in msg and f"data.seq_len (now {rows.shape[1]})" in msg and "gradient_checkpointing" in msg
    assert f"the last checkpoint is in {tmp_path / 'stage2'}" in msg and Checkpoint(tmp_path / "stage2").load()["step"] == 2


def test_txt_and_jsonl_loaders_pack_exactly(smollm2, tmp_path):
    _, tok = smollm2
    (tmp_path / "a.txt").write_text("first line of text\n\n  second line here  \nthird\n")
    assert read_texts(DataConfig(source=str(tmp_path / "a.txt"))) == ["first line of text", "second line here", "third"]
    recs = [{"instruction": "Add", "input": "2 and 3", "output": "5"}, {"instruction": "Greet", "input": "", "output": "Hello!"}]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    texts = read_texts(DataConfig(source=str(tmp_path / "b.jsonl"), template="{instruction}\n{input}\n{output}"))
    assert texts == ["Add\n2 and 3\n5", "Greet\n\nHello!"]
    stream = []
    for t in texts * 5:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    packed = pack(texts * 5, tok, 7)
    assert packed.shape == (len(stream) // 7, 7)
    assert packed.flatten().tolist() == stream[: packed.numel()]
    train, val = split(packed, 0.25, seed=0)
    assert len(val) == round(len(packed) * 0.25) and len(train) + len(val) == len(packed)
    assert sorted(map(tuple, torch.cat([train, val]).tolist())) == sorted(map(tuple, packed.tolist()))
    with pytest.raises(DataError, match="no column 'text'"):
        read_texts(DataConfig(source=str(tmp_path / "b.jsonl")))
    with pytest.raises(DataError, match="does not exist"):
        read_texts(DataConfig(source=str(tmp_path / "missing.jsonl")))
    with pytest.raises(DataError, match="not one sequence"):
        pack(["hi"], tok, 512)


def test_data_files_that_cannot_be_read_say_why(tmp_path):
    files = {"bin.txt": b"ok\n\xff\xfe\n", "bad.jsonl": b'{"text": "a"}\n{bad\n', "str.jsonl": b'"text"\n',
             "bad.json": b'{"text": ', "ints.json": b"[1, 2]"}
    messages = {"bin.txt": "is not UTF-8 text (invalid start byte at byte 3)", "bad.jsonl": "line 2 of",
                "str.jsonl": "holds a str where a record belongs", "bad.json": "is not valid JSON",
                "ints.json": "holds a int where a record belongs"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=re.escape(messages[name])):
            read_texts(DataConfig(source=str(tmp_path / name)))
    (tmp_path / "ok.jsonl").write_text('{"text": "a"}\n')
    for template in ("{", "{0}", "{text!z}"):
        with pytest.raises(DataError, match="is not a format string of column names"):
            read_texts(DataConfig(source=str(tmp_path / "ok.jsonl"), template=template))


def test_teacher_samples_are_kept_under_the_one_cache_root(tmp_path, monkeypatch):
    from linearize.distill.data import teacher_cache

    cfg = DataConfig()
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "root"))
    assert teacher_cache(cfg, 0, "m").parent == tmp_path / "root" / "teacher"
    for off in ("off", ""):  # `off` stops only the optional GGUF copies; the samples a run resumes on are still kept
        monkeypatch.setenv("LINEARIZE_CACHE", off)
        assert teacher_cache(cfg, 0, "m").parent == Path.home() / ".cache" / "linearize" / "teacher"
    assert teacher_cache(DataConfig(cache_dir=str(tmp_path / "own")), 0, "m").parent == tmp_path / "own" / "teacher"


def test_recipe_loading_and_overrides(tmp_path):
    cfg = load_config("configs/smollm2-135m.yaml", ["stage1.steps=7", "stage2.merge=false", "data.template={a} {b}", "plan=0:gla"])
    assert (cfg.stage1.steps, cfg.stage2.merge, cfg.data.template, cfg.plan) == (7, False, "{a} {b}", "0:gla")
    assert cfg.stage2.lora_r == 8
    for bad, msg in [("stage1.stpes=3", "unknown recipe key 'stage1.stpes'"), ("stage1.steps=many", "does not fit"), ("stage1=3", "is a section")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_recipe_lists_and_plan_dicts_keep_their_type(tmp_path):
    """A list (lora_targets) is a list of names, not a string matched by substring; a plan mapping stays a mapping."""
    assert load_config(None, ["stage2.lora_targets=q_proj,v_proj"]).stage2.lora_targets == ["q_proj", "v_proj"]
    assert load_config(None, ["stage2.lora_targets=[o_proj]"]).stage2.lora_targets == ["o_proj"]
    (tmp_path / "r.yaml").write_text('plan:\n  layers:\n    "1": gla\n')
    assert linearize.LayerPlan.coerce(load_config(tmp_path / "r.yaml").plan).resolve(3)[1].kind == "gla"
    (tmp_path / "t.yaml").write_text("data:\n  template: {a: 1}\n")
    with pytest.raises(ConfigError, match="does not fit the type"):
        load_config(tmp_path / "t.yaml")
    assert load_config(None, ["data.template={instruction}"]).data.template == "{instruction}"  # YAML reads a mapping


def test_cli_convert_end_to_end_with_resume(smollm2_base, tmp_path, monkeypatch, capsys):
    from linearize import cli
    from linearize.distill import run

    monkeypatch.setattr(run, "load", lambda *a, **k: (copy.deepcopy(smollm2_base[0]), smollm2_base[1]))
    (tmp_path / "d.txt").write_text("\n".join([TEXT, TEXT[::-1], TEXT.lower(), TEXT.upper()] * 2))
    out = tmp_path / "out"
    args = ["convert", "--config", "configs/smollm2-135m.yaml", "--plan", "4:lolcats(window=16),9:hedgehog", "--out", str(out),
            f"data.source={tmp_path / 'd.txt'}", "data.seq_len=64", "stage1.steps=3", "stage2.steps=2"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "validation perplexity: teacher" in printed and str(out) in printed
    assert {"config.json", "model.safetensors", "plan.yaml", "recipe.yaml", "metrics", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "metrics" / "summary.json").read_text())
    assert summary["plan"].startswith("0-3:softmax,4:lolcats(window=16)") and summary["student_val_ppl"] > 1
    layers = json.loads((out / "metrics" / "stage1.json").read_text())["val_layer_loss"]
    assert [r["layer"] for r in layers] == [4, 9]
    for stage, steps in (("stage1", 3), ("stage2", 2)):  # each stage's own speed, logged and kept
        m = json.loads((out / "metrics" / f"{stage}.json").read_text())
        assert m["steps"] == steps and m["tokens_per_s"] > 0 and "peak_gib" not in m  # CPU: no device peak
        assert f"{stage}: {m['tokens_per_s']:,.0f} tokens/s" in printed
    model = linearize.load(out)[0]
    assert model.config.linearize["layers"][9]["kind"] == "hedgehog"

    assert cli.main(args + ["--resume"]) == 0  # both stages load from their final checkpoints
    assert "finished earlier" in capsys.readouterr().out
    assert cli.main(args + ["--resume", "stage2.steps=3"]) == 2
    assert "another recipe" in capsys.readouterr().err
    (out.parent / "out.ckpt" / "complete").unlink()  # as if the run had been interrupted
    assert cli.main(args) == 2
    assert "--resume" in capsys.readouterr().err
    (out.parent / "out.ckpt" / "complete").write_text("")
    assert cli.main(args) == 0  # a finished run's checkpoints give way to a fresh run
    assert "finished earlier" not in capsys.readouterr().out


def _tiny_llama_run(tmp_path, tok, fsdp: bool) -> tuple[list[str], dict]:
    """A 2-layer random Llama folder and a text file in tmp_path: convert's arguments for them, and the environment
    of its processes (one thread each; FSDP2 when two of them run and `fsdp`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    (tmp_path / "d.txt").write_text("\n".join([TEXT, TEXT[::-1], TEXT.lower(), TEXT.upper()] * 3))
    common = ["--model", str(tmp_path / "tiny"), "--plan", "0:lolcats(window=4),1:gla", f"data.source={tmp_path / 'd.txt'}",
              "data.seq_len=32", "stage1.steps=3", "stage2.steps=2", "stage2.lr=0.001"]
    return common, {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_FSDP": str(fsdp).lower()}


def test_a_run_resumes_on_another_number_of_processes(smollm2_base, tmp_path):
    """FSDP2 on 2 processes (gloo) at batch 1 trains the model and losses of 1 process at batch 2; its checkpoints
    continue on 1 process with the same rows a step (batch_size doubled), and the reverse: the model equals the
    uninterrupted run's. Another global batch is a one-line error naming the fix."""
    from safetensors.torch import load_file

    common, env = _tiny_llama_run(tmp_path, smollm2_base[1], fsdp=True)

    def convert(out, processes, batch, *extra):
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if processes == 2 else []
        cmd = [sys.executable, *launch, "-m", "linearize.cli", "convert", "--out", str(tmp_path / out), *common,
               f"stage1.batch_size={batch}", f"stage2.batch_size={batch}", *extra]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)

    def stop_after_stage1(out):  # as a run interrupted in stage 2 leaves it (its checkpoints there removed)
        shutil.rmtree(tmp_path / out)
        shutil.rmtree(tmp_path / f"{out}.ckpt" / "stage2")
        (tmp_path / f"{out}.ckpt" / "complete").unlink()

    for out, processes, batch in (("one", 1, 2), ("two", 2, 1)):
        assert (run := convert(out, processes, batch)).returncode == 0, run.stderr[-3000:]
    reference = load_file(tmp_path / "one" / "model.safetensors")
    sharded = load_file(tmp_path / "two" / "model.safetensors")  # FSDP on 2 processes: the 1-process model
    assert sharded.keys() == reference.keys() and any("feature_map" in k or "gate" in k for k in reference)
    assert all(torch.allclose(sharded[k], reference[k], atol=1e-5, rtol=1e-4) for k in reference)
    for stage in ("stage1", "stage2"):  # the logged losses are the whole batch's too
        one_h, two_h = (json.loads((tmp_path / d / "metrics" / f"{stage}.json").read_text())["history"] for d in ("one", "two"))
        assert two_h == pytest.approx(one_h, rel=1e-4)
    stop_after_stage1("two")
    wrong = convert("two", 1, 1, "--resume")
    assert wrong.returncode == 2 and "made on 2 process(es) drawing 2 rows a stage1 step" in wrong.stderr
    assert "resume with stage1.batch_size=2" in wrong.stderr
    stop_after_stage1("one")
    for out, processes, batch in (("two", 1, 2), ("one", 2, 1)):
        run = convert(out, processes, batch, "--resume")
        assert run.returncode == 0, run.stderr[-3000:]
        assert "stage1: finished earlier" in run.stdout + run.stderr
        resumed = load_file(tmp_path / out / "model.safetensors")
        assert all(torch.allclose(resumed[k], reference[k], atol=1e-5, rtol=1e-4) for k in reference), out


def test_two_processes_match_one_process_with_double_batch(smollm2_base, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo on CPU) runs the same code replicated (DDP-style): averaged gradients
    over two ranks of batch 1 give the weights of one process with batch 2 (FSDP2, the same: the test above)."""
    from safetensors.torch import load_file

    common, env = _tiny_llama_run(tmp_path, smollm2_base[1], False)
    one = subprocess.run([sys.executable, "-m", "linearize.cli", "convert", "--out", str(tmp_path / "one"), *common, "stage1.batch_size=2", "stage2.batch_size=2"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "linearize.cli", "convert",
               "--out", str(tmp_path / "two"), *common, "stage1.batch_size=1", "stage2.batch_size=1"]
    two = subprocess.run(two_cmd, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    moved = [k for k in a if "feature_map" in k or "gate" in k]
    assert moved
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    for stage in ("stage1", "stage2"):  # the logged losses are the whole batch's too
        one_h, two_h = (json.loads((tmp_path / d / "metrics" / f"{stage}.json").read_text())["history"] for d in ("one", "two"))
        assert two_h == pytest.approx(one_h, rel=1e-4)


def test_hedgehog_attention_weights_match_its_outputs_and_ce_trains(smollm2, rows, tmp_path):
    from linearize.distill.stages import attention_ce

    model, _ = smollm2
    linearize.convert(model, "5:hedgehog")
    attn = model.model.layers[5].self_attn
    x = torch.randn(2, 9, 576)
    cos, sin = model.model.rotary_emb(x, torch.arange(9)[None])
    q, k, v = attn.adapter.project(attn, x, (cos, sin))
    weights = attn.attention_weights(q, k)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 9, 9)) and torch.equal(weights, weights.tril())
    y, _ = attn.mix(q, k, v, x, None, None)
    assert rel_err(torch.einsum("bhij,bjhd->bihd", weights, v.repeat_interleave(3, 2)), y) < 1e-5

    model.requires_grad_(False)
    params = {n: p.requires_grad_(True) for n, p in new_parameters(model).items()}
    probe = rows[:2]

    def ce() -> float:  # on layer 5's real inputs, captured from a forward pass
        captured = {}
        hook = attn.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
        with torch.no_grad():
            model(input_ids=probe, use_cache=False)
            hook.remove()
            q2, k2, _ = attn.adapter.project(attn, captured["hidden_states"], captured["position_embeddings"])
            return attention_ce(attn, q2, k2).item()

    ce0 = ce()
    _loop(params, lambda b: sum(v[0] for v in transfer_losses(model, b, train=True, attn_ce_weight=1.0).values()), rows, 10, tmp_path)
    assert ce() < ce0


def test_cli_convert_of_a_plan_without_new_parameters(smollm2_base, tmp_path, monkeypatch, capsys):
    """A streaming plan adds no parameters: stage 1 is skipped (not an empty optimizer's traceback), stage 2
    trains its LoRA; with no steps at all the folder holds the training-free model."""
    from linearize import cli
    from linearize.distill import run

    monkeypatch.setattr(run, "load", lambda *a, **k: (copy.deepcopy(smollm2_base[0]), smollm2_base[1]))
    (tmp_path / "d.txt").write_text("\n".join([TEXT, TEXT[::-1], TEXT.lower(), TEXT.upper()] * 2))
    base = ["convert", "--config", "configs/smollm2-135m.yaml", "--plan", "4:streaming(window=8, sinks=2, softmax_heads=[1])",
            f"data.source={tmp_path / 'd.txt'}", "data.seq_len=64", "stage1.steps=2"]
    assert cli.main(base + ["--out", str(tmp_path / "a"), "stage2.steps=2"]) == 0
    assert "stage1: nothing to train" in capsys.readouterr().out
    assert json.loads((tmp_path / "a" / "metrics" / "stage2.json").read_text())["steps"] == 2
    assert cli.main(base + ["--out", str(tmp_path / "b"), "stage1.steps=0", "stage2.steps=0"]) == 0
    assert linearize.load(tmp_path / "b")[0].config.linearize["layers"][4]["kind"] == "streaming"


def test_weights_and_trained_parameters_dtypes(tmp_path, capsys):
    """dtype auto: a bfloat16 checkpoint stays bfloat16 on a GPU, float32 otherwise; bfloat16 on a CPU and unknown
    dtypes are one-line errors before anything loads or any folder appears."""
    from linearize import cli
    from linearize.distill.run import resolve_dtypes
    from conftest import tiny_folder

    bf16 = tiny_folder(tmp_path / "bf16")
    linearize.load(bf16)[0].to(torch.bfloat16).save_pretrained(bf16)
    fp32 = tiny_folder(tmp_path / "fp32")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cases = [(bf16, [], cuda, (torch.bfloat16, torch.float32)), (bf16, [], cpu, (torch.float32, torch.float32)),
             (fp32, [], cuda, (torch.float32, torch.float32)), (fp32, ["dtype=bfloat16", "train_dtype=bfloat16"], cuda,
                                                                 (torch.bfloat16, torch.bfloat16))]
    for folder, overrides, device, expected in cases:
        cfg = load_config(None, [f"model={folder}", *overrides])
        assert resolve_dtypes(cfg, device, linearize.loading.load_config(folder)) == expected
    capsys.readouterr()
    for overrides, msg in [(["dtype=bfloat16"], "dtype=bfloat16 needs a GPU"), (["train_dtype=bfloat16"], "train_dtype=bfloat16 needs"),
                           (["dtype=float16"], "dtype='float16' is not a dtype")]:
        assert cli.main(["convert", "--model", str(fp32), "--plan", "1:gla", "--out", str(tmp_path / "out"), *overrides]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.ckpt").exists()


def test_compiled_norms_and_mlps_train_as_eager_and_bad_backends_are_refused(tmp_path, capsys):
    """compile=BACKEND compiles each decoder layer's norms and MLP (one graph per module class, shared by the layers):
    both stages' losses as the eager run's; an unknown backend is a one-line error before anything loads."""
    from linearize import cli
    from linearize.distill import distill
    from conftest import tiny_folder

    folder = tiny_folder(tmp_path / "m")
    (tmp_path / "d.txt").write_text("\n".join(" ".join(f"w{(7 * i + j) % 120 + 4}" for j in range(200)) for i in range(20)))
    common = [f"model={folder}", "plan=1:lolcats(window=4)", f"data.source={tmp_path / 'd.txt'}", "data.seq_len=32",
              "stage1.steps=2", "stage2.steps=2"]
    logs: list[str] = []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    distill(load_config(None, [*common, "compile=aot_eager"]), tmp_path / "c", log=logs.append)
    assert "compile: 9 norms and MLPs through torch.compile (aot_eager)" in logs
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 8  # per class and shape, not per layer
    distill(load_config(None, common), tmp_path / "e", log=lambda s: None)
    for stage in ("stage1", "stage2"):
        got, ref = (json.loads((tmp_path / run / "metrics" / f"{stage}.json").read_text())["history"] for run in ("c", "e"))
        assert len(got) == 2 and all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, ref))
    capsys.readouterr()
    assert cli.main(["convert", "--model", str(folder), "--plan", "1:gla", "--out", str(tmp_path / "out"), "compile=fast"]) == 2
    err = capsys.readouterr().err
    assert "compile='fast' is not a torch.compile backend" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 weights train under CUDA's autocast")
def test_bfloat16_weights_with_float32_trained_parameters_on_a_gpu(tmp_path):
    from linearize.distill import distill
    from conftest import tiny_folder

    folder = tiny_folder(tmp_path / "m")
    (tmp_path / "d.txt").write_text("\n".join(" ".join(f"w{(7 * i + j) % 120 + 4}" for j in range(200)) for i in range(20)))
    cfg = load_config(None, [f"model={folder}", "plan=1:lolcats(window=4)", "dtype=bfloat16", f"data.source={tmp_path / 'd.txt'}",
                             "data.seq_len=32", "stage1.steps=3", "stage2.steps=3", "stage2.merge=false"])
    summary = distill(cfg, tmp_path / "out", log=lambda s: None)
    assert summary["student_val_ppl"] < float("inf")
    from safetensors.torch import load_file

    base = load_file(tmp_path / "out" / "model.safetensors")
    lora = load_file(tmp_path / "out" / "lora" / "adapter_model.safetensors")
    assert base["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert {t.dtype for k, t in base.items() if "feature_map" in k or "mix" in k} == {torch.float32}
    assert {t.dtype for t in lora.values()} == {torch.float32}


@pytest.mark.parametrize("model_type", sorted(ADAPTERS))
def test_teacher_mode_is_the_original_model(model_type):
    """Converted layers in teacher mode (stage 1's targets, stage 2's KL teacher) compute the original attention
    (grouped key/value heads read in place where there is no mask): the original model's logits, packed rows and a
    left-padded batch."""
    base = tiny_model(model_type)
    model = linearize.convert(copy.deepcopy(base), "*:lolcats(window=3)")
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    padded = torch.ones_like(ids)
    padded[1, :3] = 0
    for mask in (None, padded):
        with torch.no_grad():
            expected = base(input_ids=ids, attention_mask=mask).logits
            with attention_mode(model, "teacher"):
                got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        assert rel_err(got[keep], expected[keep]) < 1e-5
