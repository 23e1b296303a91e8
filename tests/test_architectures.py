"""Every supported architecture, as a tiny random model built offline: convert, decode, save, reload."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import linearize
from linearize.adapters import ADAPTERS

from conftest import perturb_new_params, rel_err, tiny_model

PLANS = ["0:lolcats(window=3),1:softmax,2:lizard(window=4)", "0:hedgehog,1:gla,2:mamba2"]  # every kind


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("model_type", sorted(ADAPTERS))
def test_convert_decode_save_reload(model_type, plan, tmp_path):
    model = linearize.convert(tiny_model(model_type), plan)
    perturb_new_params(model)
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model.new_cache()
        steps = torch.cat([model(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(11)], 1)
    assert rel_err(steps, full) < 1e-4
    out = model.generate(ids[:, :4], max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 9)

    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(reloaded) is type(model)
    assert reloaded.config.linearize["plan"] == model.config.linearize["plan"]
    with torch.no_grad():
        assert torch.equal(reloaded(ids, use_cache=False).logits, full)


@pytest.mark.parametrize("model_type", sorted(ADAPTERS))
def test_hybrid_with_full_window_reproduces_the_teacher(model_type):
    teacher = tiny_model(model_type)
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(1))  # < gemma2's sliding window 8
    with torch.no_grad():
        ref = teacher(ids).logits
        student = linearize.convert(teacher, "*:lolcats(window=16)")
        assert rel_err(student(ids, use_cache=False).logits, ref) < 1e-5


def test_unsupported_architecture_lists_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(linearize.UnsupportedModelError, match="supported: gemma2, llama, mistral, phi3, qwen2, qwen3"):
        linearize.convert(gpt2, "0:hedgehog")
