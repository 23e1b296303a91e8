"""Layer plans: parsing, helpers, resolution and every kind of bad plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from linearize import LayerPlan, PlanError, every, keep_softmax, ratio

N = 30


def kinds(plan, n=N):
    return [s.kind for s in LayerPlan.coerce(plan).resolve(n)]


def test_string_with_open_range_and_options():
    specs = LayerPlan.from_string("0-1:softmax,2-27:lolcats(window=64),28-:softmax").resolve(N)
    assert [s.kind for s in specs] == ["softmax"] * 2 + ["lolcats"] * 26 + ["softmax"] * 2
    assert dict(specs[2].options) == {"window": 64}


def test_unlisted_layers_stay_softmax_and_star_sets_default():
    assert kinds("5:gla", 8) == ["softmax"] * 5 + ["gla"] + ["softmax"] * 2
    assert kinds("*:hedgehog,0:softmax", 4) == ["softmax", "hedgehog", "hedgehog", "hedgehog"]


def test_a_step_after_a_range_takes_every_nth_layer():
    assert kinds("0-/2:mamba2", 6) == ["mamba2", "softmax"] * 3
    assert kinds("*:gla,1-6/3:softmax", 8) == ["gla", "softmax", "gla", "gla", "softmax", "gla", "gla", "gla"]


def test_option_values_are_typed():
    spec = LayerPlan.from_string("0:gla(feature_map=elu, gate_norm=8, gate_rank=4)").resolve(2)[0]
    assert dict(spec.options) == {"feature_map": "elu", "gate_norm": 8, "gate_rank": 4}


def test_canonical_string_and_dict_round_trip():
    plan = LayerPlan.from_string("*:lolcats(window=32),0-1:softmax,29:softmax")
    text = plan.to_string(N)
    assert text == "0-1:softmax,2-28:lolcats(window=32),29:softmax"
    assert LayerPlan.from_string(text).resolve(N) == plan.resolve(N)
    assert LayerPlan.from_dict(plan.to_dict(N)).resolve(N) == plan.resolve(N)


def test_helpers():
    assert kinds(every(2, "lolcats"), 6) == ["lolcats", "softmax"] * 3
    assert kinds(every(3, "gla", start=1), 7) == ["softmax", "gla", "softmax", "softmax", "gla", "softmax", "softmax"]
    assert kinds(keep_softmax([0, 5], "hedgehog"), 6) == ["softmax"] + ["hedgehog"] * 4 + ["softmax"]
    assert kinds(ratio(linear_to_full=3, kind="lizard"), 9) == (["lizard"] * 3 + ["softmax"]) * 2 + ["lizard"]
    assert kinds(ratio(3), 3) == ["lolcats"] * 3  # the pattern's first softmax lies past a short model


def test_yaml_recipe_round_trip(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("plan:\n  default: lolcats\n  layers:\n    0-1: softmax\n    '29': {kind: softmax}\n")
    assert kinds(LayerPlan.from_file(recipe)) == ["softmax"] * 2 + ["lolcats"] * 27 + ["softmax"]


def test_shipped_recipes_resolve_for_smollm2():
    recipes = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
    assert recipes
    for r in recipes:
        LayerPlan.from_file(r).resolve(N)


@pytest.mark.parametrize(
    "plan, message",
    [
        ("0-1:softmax,30:lolcats", "layer 30"),
        ("28-31:gla", "layer 31"),
        ("30-:gla", "layer 30"),
        ("0-5:gla,5:hedgehog", "layer 5 is assigned twice"),
        ("2-27:mamba3", "unknown attention kind 'mamba3'"),
        ("2-27 lolcats", "cannot parse plan entry"),
        ("a-b:gla", "cannot parse plan entry"),
        ("5-2:gla", "is empty"),
        ("", "empty layer plan"),
        ("0:lolcats(windw=3)", "unknown option 'windw'"),
        ("0:lolcats(window=big)", "window='big'"),
        ("0:lolcats(window=0)", "window must be >= 1"),
        ("0:gla(feature_map=relu)", "unknown feature_map"),
        ("0:lizard(feature_map=identity)", "normalizer"),
        ("0:softmax(window=3)", "takes no options"),
        ("0:lolcats(window)", "key=value"),
        ("3/2:gla", "a step follows a range"),
        ("0-/0:gla", "is >= 1"),
        ("0:mamba2(conv_size=0)", "conv_size must be >= 1"),
        ("0:mamba2(dt_min=0.5)", "dt_min <= dt_max"),
    ],
)
def test_bad_plans_raise_clear_errors(plan, message):
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LayerPlan.coerce(plan).resolve(N)
