"""Graphed decoding: the static decode step against model.generate, cache states that keep their
addresses, refusals, the decode benchmark's smoke mode, and (on a GPU) CUDA-graph replay."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import linearize
from linearize import GraphedDecoder, LinearizeError, generate_graphed

from conftest import perturb_new_params, rel_err, tiny_model

ROOT = Path(__file__).resolve().parent.parent
PLANS = {
    "hedgehog": "*:hedgehog",
    "lolcats": "*:lolcats(window=4)",
    "gla": "*:gla",
    "gla-identity": "*:gla(feature_map=identity)",
    "lizard": "*:lizard(window=3)",
    "lolcats-w1": "*:lolcats(window=1)",
    "lolcats-sinks": "*:lolcats(window=3, sinks=2)",  # sink slots filled and read in place
    "mamba2": "*:mamba2",
    # softmax heads beside converted ones: a preallocated key/value cache written in place
    "heads": "0:lolcats(window=3, softmax_heads=[0]),1:gla(softmax_heads=[1]),2:lolcats(window=3, sinks=2, softmax_heads=[1])",
    # a layer kept softmax whole beside converted ones and softmax heads: its keys/values preallocated too
    "layers": "0:softmax,1:lolcats(window=3),2:gla(softmax_heads=[1])",
}


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


def converted(base, plan):
    model = linearize.convert(copy.deepcopy(base), plan)
    perturb_new_params(model)
    model.generation_config.eos_token_id = None  # generate_graphed does not stop at EOS either
    return model


def prompt(b=1, t=7, device="cpu"):
    return torch.randint(3, 128, (b, t), generator=torch.Generator().manual_seed(1)).to(device)


@pytest.mark.parametrize("name", PLANS)
def test_static_decode_step_matches_generate(base, name):
    model, ids = converted(base, PLANS[name]), prompt()
    decoder = GraphedDecoder(model, ids, max_new_tokens=12)
    tokens = [decoder.tokens.clone()] + [decoder.step().clone() for _ in range(11)]
    assert decoder.graph is None  # CPU: the same step, eagerly
    assert int(decoder.positions) == 7 + 11 and decoder.cache.get_seq_length() == 7 + 11
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(torch.cat([ids, *tokens], 1), expected)
    assert torch.equal(generate_graphed(model, ids, 12), expected)


@pytest.mark.parametrize("name", ["lolcats", "lizard", "gla", "mamba2", "heads", "layers"])
def test_left_padded_batch_with_chunked_prefill_matches_generate(base, name):
    model = converted(base, PLANS[name])
    ids = prompt(2, 9)
    ids[1, :4] = 0
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ours = generate_graphed(model, ids, 8, attention_mask=mask, prefill_chunk=4)
    assert torch.equal(ours, model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0))


@pytest.mark.parametrize("name", ["hedgehog", "lolcats", "gla", "lizard", "mamba2"])
def test_cache_states_keep_their_addresses_through_decode_and_prefill(base, name):
    """Decode steps update every state tensor in place and a later prefill (from a rotated ring) copies
    into them, so a captured graph stays valid; the logits still equal one pass over the sequence."""
    model, ids = converted(base, PLANS[name]), prompt(2, 16)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model.new_cache()
        run = lambda a, b: model(ids[:, a:b], past_key_values=cache, use_cache=True).logits  # noqa: E731
        logits = [run(0, 5)]
        ptrs = [t.data_ptr() for layer in cache.layers for t in layer.state.values()]
        logits += [run(i, i + 1) for i in range(5, 9)] + [run(9, 13)] + [run(i, i + 1) for i in range(13, 16)]
    assert [t.data_ptr() for layer in cache.layers for t in layer.state.values()] == ptrs
    assert rel_err(torch.cat(logits, 1), full) < 1e-4


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2"])
def test_whole_softmax_layers_decode_as_the_original_attention(model_type):
    """Layers a plan keeps softmax decode graphed from a preallocated cache with the original attention's result
    (rotary, q/k norms, soft-cap, Gemma 2's and Mistral's sliding windows, shorter than prompt + new tokens here):
    the tokens and logits of model.generate, whose softmax layers are HF's own, on a left-padded batch with a
    chunked prefill; the model keeps its own modules."""
    from conftest import EXTRA, TINY
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    torch.manual_seed(0)
    extra = {**EXTRA.get(model_type, {}), **({"sliding_window": 6} if model_type == "mistral" else {})}
    base = AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type](**TINY, **extra)).eval()
    model = converted(base, "0:softmax,1:gla,2:softmax")
    originals = [layer.self_attn for layer in model.model.layers]
    ids = prompt(2, 9)
    ids[1, :3] = 0
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    decoder = GraphedDecoder(model, ids, attention_mask=mask, prefill_chunk=4, max_new_tokens=8)
    assert [layer.self_attn for layer in model.model.layers] == originals  # swapped in only for the decoder's calls
    assert all(int(decoder.cache.layers[i].state["sm_n"]) == 9 for i in (0, 2))
    tokens, logits = [decoder.tokens.clone()], [decoder.logits.clone()]
    for _ in range(7):
        tokens.append(decoder.step().clone())
        logits.append(decoder.logits.clone())
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
    assert torch.equal(torch.cat([ids, *tokens], 1), expected.sequences)
    assert rel_err(torch.stack(logits, 1), torch.stack(expected.logits, 1)) < 1e-4


def test_softmax_heads_decode_from_a_preallocated_cache_with_softcap():
    """Gemma-2 (soft-capped logits, a sliding window): the static cache's masked attention path."""
    model, ids = converted(tiny_model("gemma2"), "*:lizard(window=3, softmax_heads=[1])"), prompt(2, 9)
    ids[0, :3] = 0
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    decoder = GraphedDecoder(model, ids, attention_mask=mask, max_new_tokens=6)
    assert all(layer.state["sm_k"].shape[1] == 9 + 6 + 1 and int(layer.state["sm_n"]) == 9 for layer in decoder.cache.layers)
    tokens, logits = [decoder.tokens.clone()], [decoder.logits.clone()]
    for _ in range(5):
        tokens.append(decoder.step().clone())
        logits.append(decoder.logits.clone())
    assert all(int(layer.state["sm_n"]) == 9 + 5 for layer in decoder.cache.layers)
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(torch.cat([ids, *tokens], 1), expected)
    full_mask = torch.cat([mask, torch.ones_like(ids[:, :5])], 1)
    with torch.no_grad():  # each step's logits: those of one pass over the whole sequence (positions as generate's)
        full = model(expected[:, :-1], attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp_min(0),
                     use_cache=False).logits
    assert rel_err(torch.stack(logits, 1), full[:, 8:]) < 1e-4
    with pytest.raises(LinearizeError, match="max_new_tokens=6 and has decoded them all"):
        decoder.step()


@pytest.mark.parametrize("how", [True, {"freezing": True}, "fused", "layers"], ids=["compiled", "frozen", "fused", "layers"])
def test_decode_step_compiles_whole_and_matches_eager(base, how):
    """torch.compile(fullgraph=True) takes the whole decode step: no graph break and no host sync in it,
    the softmax heads' preallocated cache and the sinks included (here on the references, Inductor on CPU);
    also with Inductor options (freezing), on stacked projections (fused, against the unfused model) and with a
    layer kept softmax whole."""
    from linearize.fusion import fuse_projections

    model, ids = converted(base, PLANS["layers" if how == "layers" else "heads"]), prompt(2, 7)
    how = True if how == "layers" else how
    eager = GraphedDecoder(model, ids, max_new_tokens=9)
    if how == "fused":
        model, how = fuse_projections(copy.deepcopy(model)), True
    compiled = GraphedDecoder(model, ids, max_new_tokens=9, compile=how)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1):  # one compilation serves every token
        for _ in range(8):
            assert torch.equal(compiled.step(), eager.step())
            assert rel_err(compiled.logits, eager.logits) < 1e-5


def test_each_compiled_decoder_compiles_on_its_own(base):
    """Decoders of other batch sizes and cache lengths in one process do not add up against torch.compile's
    recompile limit (fullgraph fails hard past it; the H200 suite hit it after 8 plans); one of a shape seen
    before reuses its compilation."""
    model = converted(base, PLANS["heads"])
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1):
        for b, new in ((1, 3), (2, 3), (2, 5)):
            eager = generate_graphed(model, prompt(b), new)
            assert torch.equal(generate_graphed(model, prompt(b), new, compile=True), eager)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch.equal(generate_graphed(model, prompt(2), 5, compile=True), eager)  # a shape seen before: no new compilation
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "phi3", "gemma2"])
def test_fused_projections_keep_outputs_and_refuse_saving(model_type, tmp_path):
    """q/k/v stacked into qkv_proj and gate/up into gate_up_proj (Phi-3 has both already): the same logits and
    decoded tokens, no parameter added or lost, whole softmax layers left alone; a fused model refuses to save."""
    from linearize.fusion import GateUpMLP, fuse_projections

    model = converted(tiny_model(model_type), "0:lolcats(window=3, sinks=2, softmax_heads=[1]),1:gla")
    ids = prompt(2, 9)
    with torch.no_grad():
        before = model(ids).logits
    decoded = model.generate(ids, max_new_tokens=6, do_sample=False)
    count = sum(p.numel() for p in model.parameters())
    assert fuse_projections(model) is model
    layers = model.model.layers
    assert all(hasattr(layer.self_attn, "qkv_proj") and not hasattr(layer.self_attn, "q_proj") for layer in layers[:2])
    assert hasattr(layers[2].self_attn, "q_proj") != (model_type == "phi3")  # kind softmax: HF's own attention, as it was
    assert all(isinstance(layer.mlp, GateUpMLP) != (model_type == "phi3") for layer in layers)
    assert sum(p.numel() for p in model.parameters()) == count
    with torch.no_grad():
        assert rel_err(model(ids).logits, before) < 1e-5
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), decoded)
    with pytest.raises(LinearizeError, match="save the model before fusing"):
        model.save_pretrained(tmp_path / "fused")
    assert not (tmp_path / "fused").exists()
    with pytest.raises(LinearizeError, match="converted with linearize.convert"):
        fuse_projections(tiny_model("llama"))
    if model_type != "phi3":  # (Phi-3 has nothing to stack)
        other = converted(tiny_model(model_type), "*:gla")
        mlp = other.model.layers[2].mlp
        mlp.up_proj = torch.nn.utils.parametrizations.weight_norm(mlp.up_proj)  # not a plain Linear any more
        with pytest.raises(LinearizeError, match="merge the adapters first"):
            fuse_projections(other)
        assert all(hasattr(layer.self_attn, "q_proj") for layer in other.model.layers)  # nothing was stacked


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "phi3"])
def test_fused_layers_decode_as_the_model(model_type):
    """fused_layers=True: the step's dense parts on the skinny kernels (their references on CPU: RMSNorm folded into the
    products, q/k norm and rotary after q/k/v, SiLU gate, residual adds) decode the model's own tokens and logits,
    for converted kinds, softmax heads and layers kept softmax whole, on a left-padded batch."""
    from linearize.fusion import fuse_projections

    ids = prompt(2, 9)
    ids[1, :3] = 0
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    for plan in (PLANS["heads"], PLANS["layers"], "0:mamba2,1:lizard(window=3),2:hedgehog"):
        model = converted(tiny_model(model_type), plan)
        decoders = [GraphedDecoder(model, ids, attention_mask=mask, max_new_tokens=10)]
        decoders.append(GraphedDecoder(fuse_projections(model), ids, attention_mask=mask, max_new_tokens=10, fused_layers=True))
        tokens, logits = [], []
        for d in decoders:
            tokens.append([d.step().clone() for _ in range(9)])
            logits.append(d.logits.clone())
        assert torch.equal(torch.cat(tokens[0], 1), torch.cat(tokens[1], 1)), plan
        assert rel_err(logits[1], logits[0]) < 1e-5


def test_fused_layers_refuse_what_they_cannot_run():
    from linearize.fusion import fuse_projections

    ids = prompt()
    with pytest.raises(LinearizeError, match="fused_layers runs pre-norm RMSNorm layers.*gemma2"):
        GraphedDecoder(fuse_projections(converted(tiny_model("gemma2"), "*:gla")), ids, fused_layers=True)
    model = converted(tiny_model("llama"), "*:gla")
    with pytest.raises(LinearizeError, match=r"stacked projections: call linearize.fusion.fuse_projections\(model\) first"):
        GraphedDecoder(model, ids, fused_layers=True)
    fuse_projections(model)
    model.model.layers[1].self_attn.o_proj = torch.nn.utils.parametrizations.weight_norm(model.model.layers[1].self_attn.o_proj)
    with pytest.raises(LinearizeError, match="layer 1's o_proj is a ParametrizedLinear: merge the adapters first"):
        GraphedDecoder(model, ids, fused_layers=True)


def test_graphed_decoding_refuses_bad_input(base):
    ids = prompt()
    with pytest.raises(LinearizeError, match=r"layers \[0, 1, 2\] keep softmax heads or attention.*give max_new_tokens"):
        GraphedDecoder(converted(base, PLANS["heads"]), ids)
    with pytest.raises(LinearizeError, match=r"layers \[1\] keep softmax heads or attention.*give max_new_tokens"):
        GraphedDecoder(converted(base, "0:lolcats,1:softmax,2:gla"), ids)
    with pytest.raises(LinearizeError, match="converted with linearize.convert"):
        generate_graphed(base, ids, 3)
    model = converted(base, "*:gla")
    with pytest.raises(LinearizeError, match="max_new_tokens must be >= 1"):
        generate_graphed(model, ids, 0)
    with pytest.raises(LinearizeError, match="prefill_chunk"):
        generate_graphed(model, ids, 2, prefill_chunk=0)
    with pytest.raises(LinearizeError, match=r"\[batch, tokens\]"):
        generate_graphed(model, ids[0], 2)
    with pytest.raises(LinearizeError, match="CUDA device"):
        generate_graphed(model, ids, 2, graph=True)


def test_decode_benchmark_runs_in_smoke_mode(tmp_path):
    out = tmp_path / "decode.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--smoke", "--out", str(out)],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {"command", "date", "device", "versions", "records"} <= set(data)
    records = data["records"]
    runs = {(r["impl"], r["name"], r["mode"], r["B"]) for r in records}
    ours = [("ours", name, mode) for name in ("lolcats", "gla", "heads", "layers") for mode in ("graph", "compiled")]
    assert runs == {(*run, 2) for run in ours + [("teacher_compiled", "teacher", "compiled"), ("teacher_eager", "teacher", "eager")]}
    heads_plan = data["setup"]["plans"]["heads"]
    assert "softmax_heads" in heads_plan and all(r["plan"] == heads_plan for r in records if r["name"] == "heads")
    assert all(isinstance(r["ms"], float) and r["T"] == 80 and r["floor_ms"] > 0 for r in records)
    # the eager teacher's time is a difference of two generate timings: on a busy CPU it can come out <= 0
    assert all(r["ms"] > 0 for r in records if r["impl"] != "teacher_eager")
    assert "| impl | name | mode | B | T |" in run.stdout


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@cuda
@pytest.mark.parametrize(
    "model_type,name", [("llama", name) for name in PLANS] + [("gemma2", "lizard"), ("gemma2", "heads"), ("qwen3", "lolcats")]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_eager_decoding(model_type, name, dtype):
    model = converted(tiny_model(model_type), PLANS[name]).to("cuda", dtype)
    ids = prompt(device="cuda")

    def decode(graph):
        decoder = GraphedDecoder(model, ids, graph=graph, max_new_tokens=25)
        tokens, logits = [decoder.tokens.clone()], [decoder.logits.clone()]
        for _ in range(24):  # past every window: the ring wraps around on replay
            tokens.append(decoder.step().clone())
            logits.append(decoder.logits.clone())
        return decoder, torch.cat(tokens, 1), torch.stack(logits, 1)

    graphed, tokens, logits = decode(True)
    eager, eager_tokens, eager_logits = decode(False)
    assert graphed.graph is not None and eager.graph is None
    assert int(graphed.positions[0]) == 7 + 24 and graphed.cache.get_seq_length() == 7 + 24
    assert torch.equal(tokens, eager_tokens)
    assert rel_err(logits, eager_logits) < (1e-5 if dtype == torch.float32 else 1e-2)
    if dtype == torch.float32:  # bf16 logits of a random model have near-ties
        assert torch.equal(torch.cat([ids, tokens], 1), model.generate(ids, max_new_tokens=25, do_sample=False))


@cuda
@pytest.mark.parametrize("how", [True, {"freezing": True}, "fused", "kernels", "kernels_compiled"])
@pytest.mark.parametrize("name", ["lolcats-sinks", "lizard", "gla", "mamba2", "heads", "layers"])
def test_compiled_cuda_graph_decoding_equals_eager(base, name, how):
    """The decode step through Inductor with the Triton step kernels inside (fullgraph: no graph break), then captured
    (fused: on stacked projections; kernels: the dense parts on the skinny kernels, captured as they are or compiled;
    all against the unfused model's eager decoding)."""
    from linearize.fusion import fuse_projections

    model = converted(base, PLANS[name]).cuda()
    ids = prompt(2, 7, device="cuda")
    ids[1, :3] = 0
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=20)
    eager = generate_graphed(model, ids, graph=False, **kw)
    if how in ("fused", "kernels", "kernels_compiled"):
        model, kw = fuse_projections(model), {**kw, "fused_layers": how != "fused"}
        how = how != "kernels"
    assert torch.equal(generate_graphed(model, ids, compile=how, **kw), eager)


@cuda
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "phi3"])
def test_fused_layers_on_the_gpu_in_bf16(model_type):
    """The skinny kernels in bf16 under a captured graph, a batch of 3 (rows padded to a tile of 16): logits within bf16
    rounding of the model's own eager step (each kernel rounds once where HF rounds between ops)."""
    from linearize.fusion import fuse_projections

    model = converted(tiny_model(model_type), PLANS["heads"]).to("cuda", torch.bfloat16)
    ids = prompt(3, 7, device="cuda")
    eager = GraphedDecoder(model, ids, graph=False, max_new_tokens=12)
    fused = GraphedDecoder(fuse_projections(model), ids, max_new_tokens=12, fused_layers=True)
    assert fused.graph is not None
    errors = []
    for _ in range(11):  # both fed the eager step's tokens: at a near-tie the two could choose differently
        fused.tokens.copy_(eager.tokens)
        eager.step()
        fused.step()
        errors.append(rel_err(fused.logits.float(), eager.logits.float()))
    assert max(errors) < 2e-2, errors


@cuda
def test_cuda_graph_left_padded_batch_with_chunked_prefill_matches_generate(base):
    model = converted(base, PLANS["lizard"]).cuda()
    ids = prompt(2, 9, device="cuda")
    ids[1, :4] = 0
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ours = generate_graphed(model, ids, 16, attention_mask=mask, prefill_chunk=4)
    assert torch.equal(ours, model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0))
