"""Head-level hybrids (`softmax_heads`), the `streaming` kind, the copy recall task and cache accounting,
on tiny random models (no weights loaded)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import linearize
from linearize import LayerPlan, PlanError, cli
from linearize.adapters import ADAPTERS
from linearize.cache import StateLayer
from linearize.eval import recall as recall_mod
from linearize.info import cache_summary, format_cache, layer_cache, plan_cache, skeleton
from linearize.plan import LayerSpec

from conftest import (
    TINY, assert_left_padding_changes_nothing, assert_state_dtypes, bf16_parallel_and_stepwise, perturb_new_params, rel_err, tiny_model,
)

# tiny llama: 4 query heads, 2 KV heads (2 query heads each), head_dim 16, hidden 64, 3 layers
PLANS = {
    "hedgehog": "*:hedgehog(softmax_heads=[1])",
    "lolcats": "*:lolcats(window=4, softmax_heads=[0])",
    "gla": "*:gla(softmax_heads=[1])",
    "gla-identity": "*:gla(feature_map=identity, softmax_heads=[0])",
    "lizard": "*:lizard(window=5, softmax_heads=[1])",
    "mamba2": "*:mamba2(softmax_heads=[0])",
    "streaming": "*:streaming(window=4, sinks=2, softmax_heads=[1])",
    "streaming-plain": "*:streaming(window=4, sinks=2)",
    "mixed": "0:lolcats(window=3, softmax_heads=[1]),1:softmax,2:streaming(window=3, sinks=1, softmax_heads=[0])",
}
# 8 query heads on 4 KV heads: kept heads that are not one contiguous range, listed out of order
WIDE = "0:gla(softmax_heads=[0,2]),1:lizard(window=3, softmax_heads=[3, 1]),2:mamba2(softmax_heads=[1,2])"
KINDS = ["hedgehog", "lolcats", "gla", "lizard", "mamba2", "streaming", "mixed"]  # every kind with softmax heads


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def wide():
    torch.manual_seed(0)
    config = CONFIG_MAPPING["llama"](**{**TINY, "num_attention_heads": 8, "num_key_value_heads": 4})
    return AutoModelForCausalLM.from_config(config).eval()


def converted(teacher, plan, seed=0):
    model = linearize.convert(copy.deepcopy(teacher), plan)
    perturb_new_params(model, seed=seed)
    return model


def word_tokenizer(bos=True):
    """A fast word-level tokenizer over the tiny models' 128 ids (0 pad, 1 bos, 2 eos, 3 unk), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(124)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   **({"bos_token": "<s>"} if bos else {}))


@pytest.fixture(scope="module")
def folder(base, tmp_path_factory):
    """The tiny teacher saved as a model folder (with a tokenizer): what `linearize.load` and the CLI read."""
    path = tmp_path_factory.mktemp("tiny") / "teacher"
    base.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def qkv(model, layer=0, b=2, t=11, seed=3):
    attn = model.model.layers[layer].self_attn
    x = torch.randn(b, t, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    cos, sin = model.model.rotary_emb(x, torch.arange(t)[None])
    return attn, x, *attn.adapter.project(attn, x, (cos, sin))


def layer_bytes(layer) -> int:
    if isinstance(layer, StateLayer):
        return layer.nbytes()
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))


# --- head-level plans ---------------------------------------------------------------------------------


@pytest.mark.parametrize("which, plan", [("base", PLANS[n]) for n in KINDS] + [("wide", WIDE)], ids=[*KINDS, "wide"])
def test_parallel_equals_token_by_token_decoding(request, which, plan):
    model = converted(request.getfixturevalue(which), plan)
    ids = torch.randint(3, 128, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model.new_cache()
        steps = [model(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(13)]
        split = model.new_cache()
        first = model(ids[:, :6], past_key_values=split, use_cache=True).logits
        rest = model(ids[:, 6:], past_key_values=split, use_cache=True).logits
    assert rel_err(torch.cat(steps, 1), full) < 1e-4
    assert rel_err(torch.cat([first, rest], 1), full) < 1e-4


@pytest.mark.parametrize("which, plan", [("base", PLANS[n]) for n in [*KINDS[1:], "streaming-plain"]] + [("wide", WIDE)],
                         ids=[*KINDS[1:], "streaming-plain", "wide"])
def test_left_padded_batch_generates_like_single_sequences(request, which, plan):
    model = converted(request.getfixturevalue(which), plan)
    assert_left_padding_changes_nothing(model)


@pytest.mark.parametrize("spec", ["hedgehog", "lolcats(window=2)", "gla", "gla(feature_map=identity)", "lizard(window=2)",
                                  "mamba2", "streaming(window=2, sinks=1)"])
@pytest.mark.parametrize("which, heads", [("base", [1]), ("base", [0]), ("wide", [0, 2]), ("wide", [3, 1, 2])])
def test_softmax_heads_are_exactly_the_teachers_attention(request, spec, which, heads):
    opts = spec.partition("(")[2].rstrip(")")
    plan = f"0:{spec.partition('(')[0]}({opts + ', ' if opts else ''}softmax_heads=[{','.join(map(str, heads))}])"
    model = converted(request.getfixturevalue(which), plan)
    with torch.no_grad():
        attn, x, q, k, v = qkv(model)
        y, state = attn.student_mix(q, k, v, x, None, None)
        teacher = attn.softmax_attend(q, k, v, None)
    rep = attn.num_heads // attn.num_kv_heads
    kept = [h * rep + r for h in sorted(heads) for r in range(rep)]
    other = [i for i in range(attn.num_heads) if i not in kept]
    assert attn.softmax_kv == tuple(sorted(heads)) and attn.mixer_heads == len(other)
    assert y.shape == teacher.shape
    assert rel_err(y[:, :, kept], teacher[:, :, kept]) < 1e-5
    assert rel_err(y[:, :, other], teacher[:, :, other]) > 1e-2  # the mixer's heads are not softmax
    assert state["sm_k"].shape == (2, 11, len(heads), attn.head_dim) and state["sm_valid"].all()
    assert torch.equal(state["sm_k"], k[:, :, sorted(heads)]) and torch.equal(state["sm_v"], v[:, :, sorted(heads)])


@pytest.mark.parametrize("plan", ["*:lolcats(window=16, softmax_heads=[1])", "*:streaming(window=16, sinks=2, softmax_heads=[0])"])
@pytest.mark.parametrize("model_type", sorted(ADAPTERS))
def test_head_level_plan_with_the_whole_context_in_reach_is_the_teacher_on_every_architecture(model_type, plan):
    teacher = tiny_model(model_type)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))  # < gemma2's sliding window 8
    with torch.no_grad():
        ref = teacher(ids).logits
        student = linearize.convert(teacher, plan)
        assert rel_err(student(ids, use_cache=False).logits, ref) < 1e-5


def test_mixer_heads_run_the_kind_unchanged(wide):
    """The mixer's heads get the same output as a layer of the same kind given only those heads' q/k/v."""
    model = converted(wide, "0:lolcats(window=3, softmax_heads=[0,2])")
    with torch.no_grad():
        attn, x, q, k, v = qkv(model)
        y, _ = attn.student_mix(q, k, v, x, None, None)
        mq, mk, mv = attn.mixer_qkv(q, k, v)
        alone, _ = attn.mix(mq, mk, mv, x, None, None)
    assert mq.shape[2] == 4 and mk.shape[2] == mv.shape[2] == 2
    assert torch.equal(mq, q[:, :, [2, 3, 6, 7]]) and torch.equal(mk, k[:, :, [1, 3]])
    assert rel_err(y[:, :, [2, 3, 6, 7]], alone) < 1e-6


@pytest.mark.parametrize(
    "spec, shapes",
    [
        ("hedgehog(softmax_heads=[1])", {"feature_map_q.weight": (2, 16, 16), "feature_map_q.bias": (2, 16),
                                         "feature_map_k.weight": (1, 16, 16), "feature_map_k.bias": (1, 16)}),
        ("lolcats(softmax_heads=[0], feature_dim=8)", {"feature_map_q.weight": (2, 16, 8), "feature_map_q.bias": (2, 8),
                                                       "feature_map_k.weight": (1, 16, 8), "feature_map_k.bias": (1, 8),
                                                       "window_logit": (2,)}),
        ("gla(feature_map=elu, softmax_heads=[1])", {"gate.down.weight": (16, 64), "gate.up.weight": (16, 16), "gate.up.bias": (16,)}),
        ("lizard(feature_map=elu, softmax_heads=[0])", {"gate.down.weight": (16, 64), "gate.up.weight": (16, 16),
                                                        "gate.up.bias": (16,), "window_logit": (2,)}),
        ("mamba2(softmax_heads=[1])", {"conv": (3 * 2 * 16, 4), "dt_proj.weight": (2, 64), "dt_bias": (2,), "A_log": (2,),
                                       "D": (2,), "z_proj.weight": (2 * 16, 64)}),
        ("streaming(softmax_heads=[0])", {}),
    ],
)
def test_new_parameters_are_sized_by_the_mixer_heads_and_pretrained_weights_stay(base, spec, shapes):
    model = linearize.convert(copy.deepcopy(base), f"1:{spec}")
    before, after = dict(base.named_parameters()), dict(model.named_parameters())
    prefix = "model.layers.1.self_attn."
    assert {n[len(prefix):]: tuple(p.shape) for n, p in after.items() if n not in before} == shapes
    for name, p in before.items():
        assert torch.equal(after[name], p), name
    attn = model.model.layers[1].self_attn
    assert (attn.mixer_heads, attn.mixer_kv_heads, attn.num_heads, attn.num_kv_heads) == (2, 1, 4, 2)
    assert attn.new_parameters() == sum(torch.Size(s).numel() for s in shapes.values())


@pytest.mark.parametrize("plan", [PLANS["mixed"], PLANS["mamba2"]])
def test_save_and_load_keep_the_softmax_heads(base, plan, tmp_path):
    model = converted(base, plan)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    model.save_pretrained(tmp_path / "m")
    word_tokenizer().save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    reloaded, tok = linearize.load(tmp_path / "m")
    assert type(reloaded) is type(model) and len(tok) == 128
    assert reloaded.layer_plan == model.layer_plan
    heads = [s.options.get("softmax_heads") for s in reloaded.layer_plan]
    assert heads == [d.get("softmax_heads") and tuple(d["softmax_heads"]) for d in config["linearize"]["layers"]]
    assert any(heads) and all(isinstance(h, tuple) for h in heads if h is not None)
    for got, want in zip(reloaded.model.layers, model.model.layers):
        assert getattr(got.self_attn, "softmax_kv", None) == getattr(want.self_attn, "softmax_kv", None)
    with torch.no_grad():
        assert torch.equal(reloaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)


def test_plan_string_dict_and_yaml_keep_softmax_heads(tmp_path):
    plan = LayerPlan.from_string("*:lolcats(window=4, softmax_heads=[0, 2]),1:softmax,2:gla(gate_rank=4,softmax_heads=[ 1 ])")
    specs = plan.resolve(4)
    assert specs[0] == LayerSpec("lolcats", {"window": 4, "softmax_heads": (0, 2)})
    assert specs[2].options == {"gate_rank": 4, "softmax_heads": (1,)}
    text = plan.to_string(4)
    assert text == ("0:lolcats(softmax_heads=[0,2], window=4),1:softmax,2:gla(gate_rank=4, softmax_heads=[1]),"
                    "3:lolcats(softmax_heads=[0,2], window=4)")
    assert LayerPlan.from_string(text).resolve(4) == specs
    assert plan.to_dict(4)["layers"]["2"] == {"kind": "gla", "gate_rank": 4, "softmax_heads": [1]}  # a list: YAML/JSON-safe
    assert LayerPlan.from_dict(plan.to_dict(4)).resolve(4) == specs
    assert LayerPlan.from_dict(yaml.safe_load(yaml.safe_dump(plan.to_dict(4)))).resolve(4) == specs  # lists, not tuples
    assert LayerPlan.from_dict(json.loads(json.dumps(plan.to_dict(4)))).resolve(4) == specs
    recipe = tmp_path / "r.yaml"
    recipe.write_text("plan:\n  default: {kind: lolcats, window: 4, softmax_heads: [0, 2]}\n  layers:\n    '1': softmax\n"
                      "    '2': {kind: gla, gate_rank: 4, softmax_heads: [1]}\n")
    assert LayerPlan.from_file(recipe).resolve(4) == specs
    assert len(set(specs)) == 3  # specs with list options stay hashable
    assert LayerPlan.from_string("*:gla(softmax_heads=[])").resolve(1)[0].options == {"softmax_heads": ()}


@pytest.mark.parametrize(
    "plan, message",
    [
        ("0:lolcats(softmax_heads=[5])", r"layer 0: softmax_heads \[5\] out of range, this model has 2 KV heads \(0-1\)"),
        ("1:gla(softmax_heads=[0, 2, 1])", r"softmax_heads \[2\] out of range"),
        ("0:gla(softmax_heads=[1,0])", "softmax_heads lists every KV head; give the layer kind 'softmax' instead"),
        ("0:streaming(softmax_heads=[0,1])", "give the layer kind 'softmax'"),
        ("0:gla(softmax_heads=[1,1])", r"distinct KV head indices >= 0, got \[1, 1\]"),
        ("0:mamba2(softmax_heads=[-1])", r"distinct KV head indices >= 0, got \[-1\]"),
        ("0:gla(softmax_heads=3)", "option softmax_heads=3 of kind 'gla' must be a list of int"),
        ("0:hedgehog(softmax_heads=[a])", "must be a list of int"),
        ("0:lizard(softmax_heads=[0.5])", "must be a list of int"),
        ("0:lolcats(softmax_heads=[true])", "must be a list of int"),
        ("0:lolcats(softmax_heads=[0)", "must be a list of int"),
        ("0:softmax(softmax_heads=[0])", "takes no options"),
        ("0:streaming(window=0)", "streaming needs window >= 1"),
        ("0:streaming(sinks=-1)", "sinks >= 0"),
    ],
)
def test_bad_softmax_heads_are_clear_errors(base, plan, message):
    model = copy.deepcopy(base)
    with pytest.raises(PlanError, match=message):
        linearize.convert(model, plan)
    assert type(model) is type(base) and not hasattr(model.config, "linearize")  # nothing changed


@pytest.mark.parametrize(
    "which, plan, grow",  # bytes per token: kept KV heads x head_dim x (k, v) x 4 (fp32) + 1 validity byte, per layer
    [
        ("base", PLANS["gla"], 3 * (1 * 16 * 2 * 4 + 1)),
        ("base", PLANS["streaming"], 3 * (1 * 16 * 2 * 4 + 1)),
        ("base", PLANS["mixed"], (16 * 2 * 4 + 1) + 2 * 16 * 2 * 4 + (16 * 2 * 4 + 1)),  # layer 1: all of softmax
        ("wide", WIDE, 3 * (2 * 8 * 2 * 4 + 1)),
        ("base", "*:lolcats(window=4)", 0),
        ("base", PLANS["streaming-plain"], 0),
        ("base", "*:mamba2(softmax_heads=[])", 0),
    ],
)
def test_cache_grows_only_by_the_softmax_heads(request, which, plan, grow):
    model = converted(request.getfixturevalue(which), plan)
    sizes = []
    for n in (3, 11):
        cache = model.new_cache()
        model.generate(torch.tensor([[5, 6, 7]]), past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0)
        sizes.append(cache.nbytes())
    assert sizes[0] > 0 and sizes[1] - sizes[0] == 8 * grow


@pytest.mark.parametrize("name", ["lolcats", "mamba2", "streaming", "mixed"])
def test_bf16_model_runs_and_decodes_consistently(base, name):
    full, steps, cache = bf16_parallel_and_stepwise(converted(base, PLANS[name]))
    state = cache.layers[0].state
    assert state["sm_k"].shape[1] == 9
    assert_state_dtypes(state, torch.bfloat16)
    assert rel_err(steps, full) < 2e-2


# --- streaming ----------------------------------------------------------------------------------------


def streaming_reference(q, k, v, valid, window, sinks, scaling):
    """Key j visible to query i iff j is real, j <= i and (i - j < window or j is among the first `sinks` real tokens)."""
    rep = q.shape[2] // k.shape[2]
    t = q.shape[1]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    sink = valid & (valid.long().cumsum(1) <= sinks)
    mask = valid[:, None, :] & (j <= i) & ((i - j < window) | sink[:, None, :])  # [B, T, T]
    s = torch.einsum("bihd,bjhd->bhij", q.double(), k.repeat_interleave(rep, 2).double()) * scaling
    w = s.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
    return torch.einsum("bhij,bjhd->bihd", w, v.repeat_interleave(rep, 2).double()).float()


@pytest.mark.parametrize("window, sinks", [(3, 0), (3, 2), (1, 1), (1, 0), (4, 3), (5, 20), (20, 2)])
@pytest.mark.parametrize("padded", [False, True])
def test_streaming_matches_a_brute_force_reference_in_parallel_and_recurrently(base, window, sinks, padded):
    model = converted(base, f"0:streaming(window={window}, sinks={sinks})")
    t = 11
    valid = torch.ones(2, t, dtype=torch.bool)
    if padded:
        valid[1, :4] = False  # left padding: the sinks are row 1's first real tokens
    with torch.no_grad():
        attn, x, q, k, v = qkv(model, t=t)
        ref = streaming_reference(q, k, v, valid, window, sinks, attn.scaling)
        m = valid if padded else None
        par, _ = attn.mix(q, k, v, x, m, None)
        outs, state = [], None
        for a, b in [(0, 1), (1, 2), (2, 5), (5, 6), (6, 7), (7, 11)]:  # single tokens and chunks
            y, state = attn.mix(q[:, a:b], k[:, a:b], v[:, a:b], x[:, a:b], None if m is None else m[:, a:b], state)
            outs.append(y)
    rec = torch.cat(outs, 1)
    assert rel_err(par[valid], ref[valid]) < 1e-5
    assert rel_err(rec[valid], ref[valid]) < 1e-5
    assert all(s.shape[1] == n for s, n in ((state["sink_k"], sinks), (state["win_k"], window - 1)))


@pytest.mark.parametrize("kind", ["lolcats", "lizard"])
@pytest.mark.parametrize("padded", [False, True])
def test_window_hybrids_with_their_linear_part_off_are_streaming(base, kind, padded):
    """lolcats/lizard(window, sinks) with the mix all on the window (window_init): the streaming kind (same sinks,
    same window), in parallel and token by token; with the mix open the linear part (and its sinks rule) counts."""
    plan = f"0:{kind}(window=3, sinks=2, window_init=100)"  # sigmoid(100): exactly 1 in fp32
    model, stream = converted(base, plan), converted(base, "0:streaming(window=3, sinks=2)")
    attn = model.model.layers[0].self_attn
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, :4] = padded
    m = valid if padded else None
    with torch.no_grad():
        assert attn.window_logit.min() > 90  # window_init (perturbed a little)
        _, x, q, k, v = qkv(model, t=11)
        want, _ = stream.model.layers[0].self_attn.mix(q, k, v, x, m, None)
        par, _ = attn.mix(q, k, v, x, m, None)
        state, outs = None, []
        for a in range(11):
            y, state = attn.mix(q[:, a : a + 1], k[:, a : a + 1], v[:, a : a + 1], x[:, a : a + 1], None if m is None else m[:, a : a + 1], state)
            outs.append(y)
        attn.window_logit.fill_(0.0)
        mixed, _ = attn.mix(q, k, v, x, m, None)
    assert rel_err(par[valid], want[valid]) < 1e-5 and rel_err(torch.cat(outs, 1)[valid], want[valid]) < 1e-5
    assert rel_err(mixed[valid], want[valid]) > 1e-2


@pytest.mark.parametrize("plan", ["*:streaming(window=16, sinks=0)", "*:streaming(window=13, sinks=4)",
                                  "*:streaming(window=16, sinks=0, softmax_heads=[1])"])
def test_streaming_with_the_whole_context_in_its_window_is_the_teacher(base, plan):
    ids = torch.randint(3, 128, (2, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        teacher = base(ids).logits
        model = linearize.convert(copy.deepcopy(base), plan)
        assert rel_err(model(ids, use_cache=False).logits, teacher) < 1e-5
        cache = model.new_cache()
        steps = torch.cat([model(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(13)], 1)
    assert rel_err(steps, teacher) < 1e-5
    short = linearize.convert(copy.deepcopy(base), "*:streaming(window=4, sinks=1)")
    with torch.no_grad():
        assert rel_err(short(ids, use_cache=False).logits, teacher) > 1e-3  # a short window does differ


# --- the copy recall task -----------------------------------------------------------------------------


@pytest.mark.parametrize("bos", [True, False])
def test_copy_items_show_a_random_sequence_twice_and_ask_its_second_copy(bos):
    tok = word_tokenizer(bos)
    items = recall_mod.make_items("copy", tok, [5, 40], 3, seed=7)
    assert "copy" in recall_mod.TASKS and [it.length for it in items] == [5] * 3 + [40] * 3
    first = tok.bos_token_id if bos else tok.eos_token_id
    for it in items:
        n, ids = it.length, it.input_ids.tolist()
        seq = ids[1 : n + 1]
        assert it.task == "copy" and ids == [first, *seq, *seq] and len(ids) == 2 * n + 1
        assert not set(seq) & set(tok.all_special_ids) and all(0 <= i < 128 for i in seq)
        assert it.token_spans == [(p, p + 1) for p in range(n + 2, 2 * n + 1)]  # the second copy but its first token
        assert it.answers == [tok.decode([ids[a]]) for a, _ in it.token_spans] and it.char_spans == []
        assert it.text == tok.decode(seq)
    assert len({tuple(it.input_ids.tolist()) for it in items}) == 6  # each item its own sequence
    again = recall_mod.make_items("copy", tok, [5, 40], 3, seed=7)
    other = recall_mod.make_items("copy", tok, [5, 40], 3, seed=8)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(items, again))
    assert not all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(items, other))
    with pytest.raises(linearize.LinearizeError, match="use mqar, passkey, copy"):
        recall_mod.make_items("kopy", tok, [5], 1)


class Copier(torch.nn.Module):
    """A model that reads [bos] + seq + seq: at position p it predicts token p + 1 - L (a perfect copier,
    it never looks ahead), or always `const` (never right: a special token)."""

    def __init__(self, const: int | None = None):
        super().__init__()
        self.const, self.w = const, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False, logits_to_keep=None):
        ids = input_ids[0]
        n = (len(ids) - 1) // 2
        pos = torch.arange(len(ids)) if logits_to_keep is None else logits_to_keep
        guess = ids[pos + 1 - n] if self.const is None else torch.full_like(pos, self.const)
        return type("Out", (), {"logits": F.one_hot(guess, 128).float()[None]})()


def test_copy_scoring_of_a_perfect_and_a_useless_copier():
    tok = word_tokenizer()
    item = recall_mod.make_items("copy", tok, [12], 1, seed=1)[0]
    assert recall_mod.answers_recalled(Copier(), item) == [True] * 11
    assert recall_mod.answers_recalled(Copier(const=tok.bos_token_id), item) == [False] * 11
    assert recall_mod.recall_accuracy(Copier(), tok, ["copy"], [6, 30], items=3) == {"copy": {6: 1.0, 30: 1.0}}
    assert recall_mod.recall_accuracy(Copier(const=2), tok, ["copy"], [6, 30], items=3) == {"copy": {6: 0.0, 30: 0.0}}


# --- cache accounting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("plan", [PLANS["lolcats"], "0:mamba2(conv_size=3, softmax_heads=[1]),1:softmax,2:streaming(window=4, sinks=2)",
                                  "0:hedgehog(softmax_heads=[0],feature_dim=4),1:lizard(window=6),2:gla(feature_map=elu)"])
def test_layer_cache_is_what_a_prefill_leaves_in_the_cache(base, plan, dtype):
    rows = layer_cache(skeleton(base.config), LayerPlan.from_string(plan).resolve(3), dtype=dtype)
    model = converted(base, plan).to(dtype)
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(6))
    for t in (2, 9):
        cache = model.new_cache()
        with torch.no_grad():
            model(ids[:, :t], past_key_values=cache, use_cache=True)
        assert [layer_bytes(layer) for layer in cache.layers] == [grow * t + fixed for grow, fixed in rows], t


def test_cache_fraction_of_softmax_converted_and_head_level_plans(base, folder):
    meta = skeleton(base.config)
    teacher = layer_cache(meta, [LayerSpec("softmax")])[0][0] * 3
    assert teacher == 3 * 2 * 16 * 2 * 2  # bf16 keys and values of 2 KV heads, every layer

    def summary(plan, context=4096):
        return cache_summary(layer_cache(meta, LayerPlan.from_string(plan).resolve(3)), teacher, context)

    soft = summary("*:softmax")
    assert soft["cache_fraction"] == 1.0 and soft["fixed_bytes"] == 0 and soft["bytes"] == soft["teacher_bytes"]
    linear = [summary("*:lolcats(window=8)", c) for c in (4096, 16384)]
    assert linear[0]["bytes_per_token"] == 0 and linear[0]["bytes"] == linear[1]["bytes"] == linear[0]["fixed_bytes"] > 0
    assert linear[1]["cache_fraction"] * 4 == linear[0]["cache_fraction"] < 1  # a fixed size: its share falls with context
    half = summary("*:gla(softmax_heads=[0])")
    assert half["bytes_per_token"] == 3 * (16 * 2 * 2 + 1)
    assert half["cache_fraction"] == (half["bytes_per_token"] * 4096 + half["fixed_bytes"]) / (teacher * 4096)
    assert 0.5 < half["cache_fraction"] < 0.6 and f"cache_fraction {half['cache_fraction']:.3f}" in format_cache(half)
    rows, from_folder = plan_cache(folder, LayerPlan.from_string("*:gla(softmax_heads=[0])").resolve(3))
    assert from_folder == half


def test_plan_command_prints_each_layers_cache_and_the_cache_fraction(folder, capsys):
    plan = "*:lolcats(window=4, softmax_heads=[0]),1:softmax"
    assert cli.main(["plan", str(folder), "--plan", plan]) == 0
    out = capsys.readouterr().out
    assert "plan: 0:lolcats(softmax_heads=[0], window=4),1:softmax,2:lolcats(softmax_heads=[0], window=4)" in out
    rows, summary = plan_cache(folder, LayerPlan.from_string(plan).resolve(3))
    assert [line for line in out.splitlines() if "cache_fraction" in line] == [format_cache(summary)]
    table = {line.split()[0]: line.split() for line in out.splitlines() if line.split() and line.split()[0] in "012"}
    assert table["1"][1:5] == ["softmax", "-", "128", "0"]  # the whole KV cache: 2 heads x 16 x (k, v) x 2 bytes
    assert table["0"][1] == "lolcats" and table["0"][3] == f"{16 * 2 * 2 + 1:,}" and int(table["0"][4].replace(",", "")) > 0
    assert cli.main(["plan", str(folder), "--plan", "*:gla(softmax_heads=[2])"]) == 2
    assert "out of range, this model has 2 KV heads" in capsys.readouterr().err


@pytest.mark.parametrize("name", [k for k in KINDS if k != "mixed"] + ["wide"])
def test_graphed_decoding_with_softmax_heads_matches_one_pass(base, wide, name):
    """Every kind's softmax heads (WIDE: kept heads out of order) decode from the preallocated cache:
    each step's logits are those of one pass over the whole sequence."""
    model = converted(wide, WIDE) if name == "wide" else converted(base, PLANS[name])
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    decoder = linearize.GraphedDecoder(model, ids, max_new_tokens=10)
    tokens, logits = [decoder.tokens.clone()], [decoder.logits.clone()]
    for _ in range(9):
        tokens.append(decoder.step().clone())
        logits.append(decoder.logits.clone())
    seq = torch.cat([ids, *tokens], 1)
    with torch.no_grad():
        full = model(seq[:, :-1], use_cache=False).logits[:, 6:]
    assert rel_err(torch.stack(logits, 1), full) < 1e-4
    assert torch.equal(seq, model.generate(ids, max_new_tokens=10, do_sample=False))


@pytest.mark.parametrize("text, ok", [("cache=25%", True), ("cache=0.5", True), ("cache=0%", False), ("cache=150%", False)])
def test_cache_budget_parses_and_refuses_impossible_fractions(text, ok):
    from linearize.autoplan import Budget

    if ok:
        b = Budget.parse(text)
        assert b.kind == "cache" and 0 < b.value <= 1 and b.softmax_layers(30) is None
    else:
        with pytest.raises(PlanError, match="cache fraction"):
            Budget.parse(text)


def test_choose_heads_keeps_the_best_scored_heads_that_fit():
    from linearize.autoplan import Budget, HeadScores, choose_heads, with_kind

    # 3 layers x 2 KV heads; each kept head costs 0.25 of the teacher's cache, converted ones nothing
    scores = HeadScores(copy=[[0.9, 0.0], [0.1, 0.5], [0.8, 0.7]], text=[[0.0] * 2] * 3, teacher_copy_loss=1.0, teacher_text_loss=1.0)

    def cache_of(specs):
        return sum(2 if s.kind == "softmax" else len(s.options.get("softmax_heads", ())) for s in specs) * 0.25

    specs = choose_heads(scores, Budget.parse("cache=75%"), "lolcats(window=8)", cache_of)
    assert [s.to_string() for s in specs] == [
        "lolcats(softmax_heads=[0], window=8)", "lolcats(window=8)", "softmax"]  # 0.9, then 0.8 and 0.7 (layer 2 whole)
    with pytest.raises(PlanError, match="even with every head converted"):
        choose_heads(scores, Budget.parse("cache=10%"), "lolcats", lambda specs: 0.5)
    # the same kept heads with another kind for the rest (the training-free twin of a head plan)
    assert [s.to_string() for s in with_kind(specs, "streaming(window=64, sinks=4)")] == [
        "streaming(sinks=4, softmax_heads=[0], window=64)", "streaming(sinks=4, window=64)", "softmax"]


def test_autoplan_heads_fits_the_budget_and_keeps_the_costliest_heads(base, tmp_path):
    from linearize.autoplan import autoplan_heads, write_head_report
    from linearize.info import CacheMeter

    rows = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(0))
    plan, scores = autoplan_heads(copy.deepcopy(base), rows, "cache=50%", kind="lolcats(window=4)", copy_length=12,
                                  copy_items=2, window=4, sinks=1, log=lambda _: None)
    specs = plan.resolve(3)
    kept = {(i, h) for i, s in enumerate(specs) for h in s.options.get("softmax_heads", ())}
    assert kept
    assert CacheMeter(base.config).fraction(specs) == scores.settings["cache"]["cache_fraction"] <= 0.5
    flat = sorted(((v, i, h) for i, row in enumerate(scores.score) for h, v in enumerate(row)), reverse=True)
    assert (flat[0][1], flat[0][2]) in kept  # the head whose loss costs most stays softmax
    assert all(s.kind == "lolcats" and s.options["window"] == 4 for s in specs)
    report = write_head_report(tmp_path / "report", scores, specs, "# heads\n\n")
    assert json.loads((report / "head_scores.json").read_text())["plan"] == plan.to_string(3)
    assert (report / "report.md").read_text().startswith("# heads") and "| head 0: copy / text |" in (report / "report.md").read_text()


def test_recall_rows_are_seeded_token_rows_with_repeats():
    from linearize.distill.recall_data import recall_rows

    tok = word_tokenizer()
    texts = ["alpha beta gamma delta " * 8, "one two three four " * 8]
    a, b = recall_rows(tok, texts, 6, 96, seed=0), recall_rows(tok, texts, 6, 96, seed=0)
    assert a.shape == (6, 96) and torch.equal(a, b) and not torch.equal(a, recall_rows(tok, texts, 6, 96, seed=1))
    assert all(len(set(r.tolist())) < len(r) for r in a)  # every row repeats what it showed


def test_inspect_reports_a_converted_models_cache_and_a_teachers_kv_cache(base, folder, tmp_path, capsys):
    model = linearize.convert(copy.deepcopy(base), "*:gla(softmax_heads=[0])")
    model.save_pretrained(tmp_path / "conv")
    assert cli.main(["inspect", str(tmp_path / "conv")]) == 0
    _, summary = plan_cache(folder, LayerPlan.from_string("*:gla(softmax_heads=[0])").resolve(3))
    assert format_cache(summary) in capsys.readouterr().out
    assert cli.main(["inspect", str(folder)]) == 0
    assert f"KV cache: {3 * 2 * 16 * 2 * 2:,} bytes per token (bf16)" in capsys.readouterr().out
