"""The embedded SmolLM2-135M-Instruct: exactness, generation, constant-memory decoding, save/load, errors."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import linearize

from conftest import rel_err

PROMPT = "The capital of France is Paris. The capital of Italy is"


def test_default_model_is_smollm2(smollm2):
    model, tok = smollm2
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size) == ("llama", 30, 9, 3, 576)
    out = model.generate(**tok(PROMPT, return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert "Rome" in tok.decode(out[0, -3:])  # a real pretrained model, not random weights


def test_the_gguf_is_read_once_then_loaded_from_its_copy(smollm2_base, monkeypatch, tmp_path):
    """`load` keeps the GGUF's dequantized model and tokenizer (LINEARIZE_CACHE; conftest points it at this session's
    folder, where the first load kept it): the same weights, config and tokenizer from the copy without reading the
    file; a damaged copy is dropped and the file read again, the next load keeps a new one; a folder that cannot be
    written costs a warning, not a second read; LINEARIZE_CACHE=off keeps none."""
    import copy

    from linearize import loading

    path = loading.default_gguf()
    assert loading.gguf_cache(path).is_dir()
    monkeypatch.setattr(loading, "_read_gguf", lambda *a: pytest.fail("the file was read again"))
    model, tok = linearize.load(dtype=torch.bfloat16)
    base, base_tok = smollm2_base
    weights, expected = model.state_dict(), base.state_dict()
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k].bfloat16()) for k in expected)
    assert model.config.dtype == torch.bfloat16 and model.name_or_path == base.name_or_path == str(path.parent)
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    assert tok.apply_chat_template(chat, tokenize=False) == base_tok.apply_chat_template(chat, tokenize=False)
    assert tok("a test, with ünïcode")["input_ids"] == base_tok("a test, with ünïcode")["input_ids"]
    assert (tok.eos_token, tok.pad_token, tok.name_or_path) == (base_tok.eos_token, base_tok.pad_token, base_tok.name_or_path)

    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path))
    damaged = loading.gguf_cache(path)
    damaged.mkdir(parents=True)
    (damaged / "config.json").write_text("{")
    reads = []
    monkeypatch.setattr(loading, "_read_gguf", lambda p, dtype: reads.append(dtype) or (copy.deepcopy(base).to(dtype), base_tok))
    linearize.load(dtype=torch.bfloat16)
    assert reads == [torch.bfloat16] and not damaged.exists()
    model = linearize.load(dtype=torch.bfloat16)[0]
    assert reads == [torch.bfloat16, torch.float32] and damaged.is_dir()  # kept in full precision, loaded in the dtype asked
    assert model.config.dtype == torch.bfloat16 and torch.equal(model.lm_head.weight, base.lm_head.weight.bfloat16())
    (tmp_path / "file").write_text("")  # a copy that cannot be written: one read, a warning, the model in the dtype asked
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "file"))
    with pytest.warns(UserWarning, match="no copy of the GGUF kept"):
        model = linearize.load(dtype=torch.bfloat16)[0]
    assert reads == [torch.bfloat16, torch.float32, torch.float32] and model.config.dtype == model.dtype == torch.bfloat16
    monkeypatch.setenv("LINEARIZE_CACHE", "off")
    assert loading.gguf_cache(path) is None


def test_tokenizer_alone_loads_without_weights(smollm2_base, monkeypatch):
    """`load_tokenizer` (checks that need only the tokenizer, before an 8B model loads) gives `load`'s tokenizer, from
    the GGUF's copy or from the file itself, without building a model."""
    from linearize import loading

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    base_tok = smollm2_base[1]
    text = "a test, with ünïcode: 12345"
    for cache in ("session copy", "off"):
        if cache == "off":
            monkeypatch.setenv("LINEARIZE_CACHE", "off")
        tok = loading.load_tokenizer()
        assert tok(text)["input_ids"] == base_tok(text)["input_ids"], cache
        assert (tok.eos_token, tok.name_or_path) == (base_tok.eos_token, base_tok.name_or_path), cache


@pytest.mark.parametrize("kind", ["lolcats", "lizard"])
def test_hybrids_with_window_over_sequence_reproduce_the_teacher(smollm2, kind):
    model, tok = smollm2
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids.shape[1] < 64
    with torch.no_grad():
        teacher = model(ids).logits
        linearize.convert(model, f"*:{kind}(window=64)")
        student = model(ids, use_cache=False).logits
    assert (student - teacher).abs().max().item() < 1e-4


def test_any_subset_of_layers_converts_and_generates(smollm2_base):
    import copy

    base, tok = smollm2_base
    inputs = tok(PROMPT, return_tensors="pt")
    rng = random.Random(0)
    kinds = ["hedgehog", "lolcats", "gla", "lizard"]
    subsets = [[0], [29], list(range(30)), sorted(rng.sample(range(30), 7))]
    for n, layers in enumerate(subsets):
        plan = ",".join(f"{i}:{kinds[(i + n) % 4]}(window=8)" if kinds[(i + n) % 4] in ("lolcats", "lizard") else f"{i}:{kinds[(i + n) % 4]}" for i in layers)
        model = linearize.convert(copy.deepcopy(base), plan)
        out = model.generate(**inputs, max_new_tokens=20, min_new_tokens=20, do_sample=False)
        assert out.shape[1] == inputs.input_ids.shape[1] + 20


def test_all_hedgehog_decode_cache_does_not_grow(smollm2):
    model, tok = smollm2
    linearize.convert(model, "*:hedgehog")
    inputs = tok(PROMPT, return_tensors="pt")
    sizes = []
    for n in (10, 60):  # past the prompt's length: a cache that grew would show
        cache = model.new_cache()
        model.generate(**inputs, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert cache.get_seq_length() == inputs.input_ids.shape[1] + n - 1
        sizes.append(cache.nbytes())
    assert sizes[0] == sizes[1] > 0


def test_save_and_reload_give_identical_logits(smollm2, tmp_path):
    model, tok = smollm2
    linearize.convert(model, "0-1:softmax,2-9:lolcats(window=16),10-19:gla,20-27:lizard(window=8),28-:hedgehog")
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    model.save_pretrained(tmp_path / "conv")
    tok.save_pretrained(tmp_path / "conv")
    for reloaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "conv"), linearize.load(tmp_path / "conv")[0]):
        with torch.no_grad():
            assert torch.equal(reloaded.eval()(ids, use_cache=False).logits, ref)


def test_failed_save_leaves_no_folder(smollm2, tmp_path, monkeypatch):
    model, _ = smollm2
    linearize.convert(model, "3:gla")
    from transformers import PreTrainedModel

    def broken(self, save_directory, *a, **k):
        Path(save_directory, "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "out")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "plan, message",
    [("0-1:softmax,30:lolcats", "layer 30 .* this model has 30 layers"), ("2-27:notakind", "unknown attention kind"), ("2-27;lolcats", "cannot parse")],
)
def test_bad_plans_on_smollm2(smollm2, plan, message):
    model, _ = smollm2
    before = type(model)
    with pytest.raises(linearize.PlanError, match=message):
        linearize.convert(model, plan)
    assert type(model) is before and not linearize.is_converted(model)  # nothing changed


def test_bad_model_inputs(tmp_path, monkeypatch):
    with pytest.raises(linearize.ModelLoadError, match="no such file"):
        linearize.load(tmp_path / "missing.gguf")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(linearize.ModelLoadError, match="not a .gguf"):
        linearize.load(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(linearize.ModelLoadError, match="no config.json"):
        linearize.load(tmp_path / "empty")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(linearize.ModelLoadError, match="cannot read the GGUF file"):
        linearize.load(tmp_path / "broken.gguf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(linearize.ModelLoadError, match="HF_HUB_OFFLINE is set"):
        linearize.load("some-org/some-model")
