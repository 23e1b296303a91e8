"""The `mamba2` kind: its initialization is the documented mapping from the attention layer, it runs
on SmolLM2 (generate, save, reload) and distillation trains it; on a GPU the Triton path equals the reference."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import linearize
from linearize.distill import load_config
from linearize.distill.stages import Checkpoint, new_parameters, train_loop, transfer_losses

from conftest import perturb_new_params, rel_err, tiny_model

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "smollm2-135m-mamba2.yaml"


def decayed_linear_attention(q, k, v, dt, scaling):
    """y_t = sum_{s<=t} exp(-dt (t - s)) dt (scaling q_t . k_s) v_s per head, KV heads shared by their
    query heads: what the docstring says a freshly converted layer computes."""
    b, t, h, d = q.shape
    rep = h // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    y = torch.zeros_like(q, dtype=torch.float64)
    for i in range(t):
        for s in range(i + 1):
            w = torch.exp(-dt * (i - s)) * dt * scaling * (q[:, i] * k[:, s]).sum(-1)  # [B, H]
            y[:, i] += w[..., None] * v[:, s]
    return y


def test_initialization_is_the_documented_mapping():
    base = tiny_model("llama")
    teacher = base.model.layers[0].self_attn
    model = linearize.convert(copy.deepcopy(base), "0:mamba2(dt_min=0.01, dt_max=0.2)")
    layer = model.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):  # C, B, x and the output: the attention's weights
        assert torch.equal(getattr(layer, name).weight, getattr(teacher, name).weight), name
    h, d = layer.num_heads, layer.head_dim
    assert layer.conv.shape == (3 * h * d, 4) and torch.equal(layer.conv[:, -1], torch.ones(3 * h * d))
    assert not layer.conv[:, :-1].any() and not layer.dt_proj.weight.any() and not layer.z_proj.weight.any()
    assert not layer.A_log.any() and not layer.D.any()
    dt = F.softplus(layer.dt_bias.double())
    assert dt[0].item() == pytest.approx(0.01) and dt[-1].item() == pytest.approx(0.2)
    assert torch.allclose(dt.log().diff(), torch.full((h - 1,), math.log(20) / (h - 1), dtype=torch.float64))

    g = torch.Generator().manual_seed(0)
    q, x = torch.randn(2, 11, h, d, generator=g), torch.randn(2, 11, layer.hidden_size, generator=g)
    k, v = torch.randn(2, 11, layer.num_kv_heads, d, generator=g), torch.randn(2, 11, layer.num_kv_heads, d, generator=g)
    y, state = layer.mix(q, k, v, x, None, None)
    expected = decayed_linear_attention(q.double(), k.double(), v.double(), dt.view(1, h), layer.scaling)
    assert rel_err(y, expected) < 1e-5
    assert state["S"].shape == (2, h, d, d) and state["conv"].shape == (2, 3, 3 * h * d)


def test_conv_and_gate_act_once_trained():
    """Moved off their initialization, the conv mixes earlier tokens and the gate scales the output."""
    base = tiny_model("llama")
    model = linearize.convert(copy.deepcopy(base), "0:mamba2")
    layer = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(1)
    q, x = torch.randn(1, 6, 4, 16, generator=g), torch.randn(1, 6, 64, generator=g)
    k, v = torch.randn(1, 6, 2, 16, generator=g), torch.randn(1, 6, 2, 16, generator=g)
    y0, _ = layer.mix(q, k, v, x, None, None)
    with torch.no_grad():
        layer.conv[:, -2] = 0.5
    y1, _ = layer.mix(q, k, v, x, None, None)
    assert rel_err(y1, y0) > 0.05 and torch.allclose(y1[:, 0], y0[:, 0], atol=1e-6)  # the first token has no past
    perturb_new_params(model)
    y2, _ = layer.mix(q, k, v, x, None, None)
    assert rel_err(y2, y1) > 0.05


def test_smollm2_half_mamba2_generates_saves_and_reloads(smollm2, tmp_path):
    model, tok = smollm2
    linearize.convert(model, load_config(RECIPE).plan)
    assert model.config.linearize["plan"] == ",".join(f"{i}:mamba2,{i + 1}:softmax" for i in range(0, 30, 2))
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    assert torch.isfinite(ref).all()
    model.save_pretrained(tmp_path / "m2")
    tok.save_pretrained(tmp_path / "m2")
    for reloaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "m2"), linearize.load(tmp_path / "m2")[0]):
        with torch.no_grad():
            assert torch.equal(reloaded.eval()(ids, use_cache=False).logits, ref)


def test_stage1_reduces_the_transfer_loss_of_mamba2_layers(smollm2, tmp_path):
    from linearize.distill.data import pack

    model, tok = smollm2
    linearize.convert(model, "4:mamba2,9:mamba2")
    text = "The river runs through the old town and past the mill. Children play on its banks in summer. " * 6
    rows = pack([text, text.upper(), text[::-1]], tok, 48)
    model.requires_grad_(False)
    params = {k: p.requires_grad_(True) for k, p in new_parameters(model).items()}
    probe = rows[:2]
    loss0 = sum(v[0] for v in transfer_losses(model, probe, train=False).values())
    train_loop("s1", params, lambda b: sum(v[0] for v in transfer_losses(model, b, train=True).values()), rows,
               steps=12, batch_size=2, lr=1e-2, weight_decay=0.0, save_every=100, ckpt=Checkpoint(tmp_path / "s1"),
               seed=0, device=torch.device("cpu"), log=lambda s: None)
    loss1 = sum(v[0] for v in transfer_losses(model, probe, train=False).values())
    assert loss1 < 0.8 * loss0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_equal_the_reference_and_decoding(dtype, monkeypatch):
    model = linearize.convert(tiny_model("llama"), "*:mamba2(dt_min=0.01, dt_max=0.3)")
    perturb_new_params(model, scale=0.1)
    model = model.cuda().to(dtype)
    ids = torch.randint(3, 128, (2, 150), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        fast = model(ids, use_cache=False).logits
        cache = model.new_cache()
        prefill = model(ids[:, :130], past_key_values=cache, use_cache=True).logits
        steps = [model(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(130, 150)]
        monkeypatch.setenv("LINEARIZE_KERNELS", "reference")
        ref = model(ids, use_cache=False).logits
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    assert rel_err(fast, ref) < tol and rel_err(torch.cat([prefill, *steps], 1), ref) < tol
