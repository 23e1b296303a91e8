"""Every attention kind inside a (tiny, random) model: parallel vs recurrent, padding, parameters."""

from __future__ import annotations

import copy

import pytest
import torch

import linearize
from linearize.kinds.base import LinearizedAttention

from conftest import (assert_left_padding_changes_nothing, assert_state_dtypes, bf16_parallel_and_stepwise, compiled_and_eager_training,
                      perturb_new_params, rel_err, tiny_model)

PLANS = {
    "hedgehog": "*:hedgehog",
    "lolcats": "*:lolcats(window=4)",
    "gla": "*:gla",
    "gla-elu": "*:gla(feature_map=elu)",
    "gla-identity": "*:gla(feature_map=identity)",
    "lizard": "*:lizard(window=5)",
    "lolcats-sinks": "*:lolcats(window=3, sinks=2)",
    "lizard-sinks": "*:lizard(window=2, sinks=3, softmax_heads=[0])",
    "mamba2": "*:mamba2",
    "mamba2-conv1": "*:mamba2(conv_size=1)",
    "mixed": "0:lolcats(window=3),1:softmax,2:lizard(window=2, feature_dim=8)",
}


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


def converted(base, plan, seed=0):
    model = linearize.convert(copy.deepcopy(base), plan)
    perturb_new_params(model, seed=seed)
    return model


def test_registry_lists_every_kind():
    assert linearize.kind_names() == ["softmax", "gla", "hedgehog", "lizard", "lolcats", "mamba2", "streaming"]


@pytest.mark.parametrize("name", PLANS)
def test_parallel_equals_token_by_token_decoding(base, name):
    model = converted(base, PLANS[name])
    ids = torch.randint(3, 128, (2, 13), generator=torch.Generator().manual_seed(1))  # 13: not a multiple of any window
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache, steps = model.new_cache(), []
        for i in range(ids.shape[1]):
            steps.append(model(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits)
        split_cache = model.new_cache()
        first = model(ids[:, :6], past_key_values=split_cache, use_cache=True).logits
        rest = model(ids[:, 6:], past_key_values=split_cache, use_cache=True).logits
    assert rel_err(torch.cat(steps, 1), full) < 1e-4
    assert rel_err(torch.cat([first, rest], 1), full) < 1e-4


@pytest.mark.parametrize("name", ["hedgehog", "lolcats", "gla", "lizard", "mamba2", "lolcats-sinks"])
def test_left_padded_batch_generates_like_single_sequences(base, name):
    model = converted(base, PLANS[name])
    assert_left_padding_changes_nothing(model)


@pytest.mark.parametrize(
    "plan, new_names",
    [
        ("0:hedgehog", {"feature_map_q.weight", "feature_map_q.bias", "feature_map_k.weight", "feature_map_k.bias"}),
        ("0:lolcats", {"feature_map_q.weight", "feature_map_q.bias", "feature_map_k.weight", "feature_map_k.bias", "window_logit"}),
        ("0:gla(feature_map=elu)", {"gate.down.weight", "gate.up.weight", "gate.up.bias"}),
        ("0:lizard(feature_map=elu)", {"gate.down.weight", "gate.up.weight", "gate.up.bias", "window_logit"}),
        ("0:mamba2", {"conv", "dt_proj.weight", "dt_bias", "A_log", "D", "z_proj.weight"}),
    ],
)
def test_conversion_keeps_pretrained_weights_and_adds_only_the_kind_parameters(base, plan, new_names):
    model = linearize.convert(copy.deepcopy(base), plan)
    before = dict(base.named_parameters())
    after = dict(model.named_parameters())
    prefix = "model.layers.0.self_attn."
    assert {n[len(prefix):] for n in set(after) - set(before)} == new_names
    assert set(before) <= set(after)
    for name, p in before.items():
        assert torch.equal(after[name], p), name
    assert isinstance(model.model.layers[0].self_attn, LinearizedAttention)
    assert not isinstance(model.model.layers[1].self_attn, LinearizedAttention)


def test_gla_gate_starts_with_decay_near_one(base):
    model = linearize.convert(copy.deepcopy(base), "0:gla")
    decay = model.model.layers[0].self_attn.gate(torch.randn(1, 5, 64)).exp()
    assert decay.min() > 0.98 and decay.max() < 1.0


def test_linear_cache_does_not_grow(base):
    model = converted(base, "*:hedgehog")
    sizes = []
    for n in (10, 60):
        cache = model.new_cache()
        model.generate(torch.tensor([[5, 6, 7]]), past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sizes.append(cache.nbytes())
    assert sizes[0] == sizes[1] > 0
    softmax_model = converted(base, "0:hedgehog")  # two softmax layers keep growing keys/values
    grow = []
    for n in (10, 60):
        cache = softmax_model.new_cache()
        softmax_model.generate(torch.tensor([[5, 6, 7]]), past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        grow.append(cache.nbytes())
    assert grow[1] > grow[0]


def test_converting_twice_and_foreign_cache_are_clear_errors(base):
    model = converted(base, "0:gla")
    with pytest.raises(linearize.LinearizeError, match="already converted"):
        linearize.convert(model, "1:gla")
    from transformers import DynamicCache

    with pytest.raises(linearize.LinearizeError, match="LinearizeCache"):
        model(torch.tensor([[4, 5]]), past_key_values=DynamicCache(), use_cache=True)


@pytest.mark.parametrize("name", ["hedgehog", "lolcats", "gla", "lizard", "mamba2"])
def test_bf16_model_runs_and_decodes_consistently(base, name):
    full, steps, cache = bf16_parallel_and_stepwise(converted(base, PLANS[name]))
    assert_state_dtypes(cache.layers[0].state, torch.bfloat16)
    assert rel_err(steps, full) < 2e-2  # bf16 projections; the mixing itself runs in fp32


def test_converting_leaves_the_config_object_it_was_built_from_alone():
    """convert gives the model its own config: another model built from the same config object afterwards is a
    plain one (and converts); `converted` hands the original config back."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from linearize.convert import converted as converted_block

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    first = linearize.convert(LlamaForCausalLM(cfg), "*:gla")
    assert first.config is not cfg and cfg.model_type == "llama" and not hasattr(cfg, "linearize")
    second = LlamaForCausalLM(cfg)
    assert linearize.convert(second, "0:lolcats(window=2)").config.linearize["plan"].startswith("0:lolcats")
    third = LlamaForCausalLM(cfg)
    with converted_block(third, "1:gla") as model:
        assert model.config.model_type == "linearize_llama"
    assert third.config is cfg and type(third) is LlamaForCausalLM and not hasattr(cfg, "linearize")


COMPILED = ["0:hedgehog,1:gla(feature_map=elu),2:gla(feature_map=identity, softmax_heads=[0])",
            "0:lolcats(window=4, sinks=2, softmax_heads=[1]),1:lizard(window=3),2:mamba2"]


@pytest.mark.parametrize("plan", COMPILED, ids=["linear", "hybrids"])
def test_training_forward_compiles_whole_and_matches_eager(base, plan):
    """torch.compile(fullgraph=True) takes a converted model's whole training forward and backward on the references
    (every kind's glue without a graph break, left padding included): logits and every trained parameter's gradient as
    eager. (AOTAutograd's graphs run as they are: Inductor's CPU code generation takes minutes on CI's 2 cores.)"""
    (logits, grads), (ref, ref_grads) = compiled_and_eager_training(converted(base, plan), dict(backend="aot_eager", fullgraph=True))
    assert rel_err(logits, ref) < 1e-6 and all(rel_err(a, b) < 1e-5 for a, b in zip(grads, ref_grads))
