"""Shared fixtures: the embedded SmolLM2 (loaded once) and tiny random models of each architecture."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import linearize

# every cache of linearize (the embedded GGUF's dequantized copy, teacher samples) goes to this session's own folder:
# every run reads the GGUF once (that path stays tested), the tests' subprocesses load the copy, ~/.cache is left alone
GGUF_CACHE = tempfile.mkdtemp(prefix="linearize-test-cache-")
os.environ["LINEARIZE_CACHE"] = GGUF_CACHE


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(GGUF_CACHE, ignore_errors=True)


TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
EXTRA = {
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, attn_logit_softcapping=50.0),
    "qwen3": dict(head_dim=16),
}


def tiny_model(model_type: str, seed: int = 0):
    """A randomly initialized 3-layer causal LM of `model_type`, built offline."""
    torch.manual_seed(seed)
    config = CONFIG_MAPPING[model_type](**TINY, **EXTRA.get(model_type, {}))
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_folder(folder, model_type: str = "llama", seed: int = 0):
    """`tiny_model` saved with a word-level tokenizer ("w0" .. "w127") to `folder`; returns the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny_model(model_type, seed).save_pretrained(folder)
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(TINY["vocab_size"])}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", eos_token="w2", bos_token="w1").save_pretrained(folder)
    return folder


def perturb_new_params(model, scale: float = 0.3, seed: int = 0) -> None:
    """Move every converted layer's new parameters away from their initialization."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            if isinstance(attn, linearize.kinds.base.LinearizedAttention):
                for _, p in attn.new_named_parameters():
                    p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def assert_left_padding_changes_nothing(model) -> None:
    """A left-padded batch of two prompts generates what each prompt generates alone (greedy)."""
    a = torch.tensor([[5, 9, 33, 17, 8, 60, 7]])
    b = torch.tensor([[40, 41, 90]])
    ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = (torch.arange(7)[None] >= torch.tensor([[0], [4]])).long()
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    batched = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(batched[0:1, 7:], model.generate(input_ids=a, **kw)[:, 7:])
    assert torch.equal(batched[1:2, 7:], model.generate(input_ids=b, **kw)[:, 3:])


def bf16_parallel_and_stepwise(model):
    """`model` in bf16 on 9 tokens: (parallel logits, token-by-token logits, the cache after the steps);
    checks the logits are bf16 and finite."""
    model = model.to(torch.bfloat16)
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model.new_cache()
        steps = torch.cat([model(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(9)], 1)
    assert full.dtype == torch.bfloat16 and torch.isfinite(full).all()
    return full, steps, cache


# decode state tensors kept in the model's dtype (inputs the model made: keys, values, key features);
# memories, log-decays and conv inputs stay fp32
MODEL_DTYPE_STATE = ("k", "v", "fk", "sink_k", "sink_v", "win_k", "win_v", "sm_k", "sm_v")


def assert_state_dtypes(state: dict, model_dtype: torch.dtype) -> None:
    for name, t in state.items():
        if t.is_floating_point():
            assert t.dtype == (model_dtype if name in MODEL_DTYPE_STATE else torch.float32), (name, t.dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.fixture(scope="session")
def smollm2_base():
    return linearize.load()


@pytest.fixture
def smollm2(smollm2_base):
    """A fresh copy of the embedded SmolLM2-135M-Instruct and its tokenizer."""
    model, tok = smollm2_base
    return copy.deepcopy(model), tok


def compiled_and_eager_training(model, compile_kw: dict, device: str = "cpu"):
    """One training forward and backward of a converted `model` (its new parameters trained, a left-padded batch of 2 x
    20) through torch.compile(model, **compile_kw), then eagerly: (logits, grads) of each, to compare."""
    from linearize.distill.stages import new_parameters

    model.requires_grad_(False)
    params = list(new_parameters(model).values())
    for p in params:
        p.requires_grad_(True)
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0

    def run(m):
        model.zero_grad(set_to_none=True)
        logits = m(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logits.square().mean().backward()
        return logits.detach(), [p.grad for p in params]

    torch._dynamo.reset()
    return run(torch.compile(model, **compile_kw)), run(model)
