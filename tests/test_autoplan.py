"""Automatic layer selection: budgets, the planner on crafted scores, attention statistics against the
model's own attention weights, determinism, and the CLI's plan YAML that convert reads."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

import linearize
from linearize import cli
from linearize.autoplan import Budget, Scores, attention_statistics, autoplan, choose, measure_plan, score_layers
from linearize.convert import converted
from linearize.errors import PlanError

from conftest import tiny_folder, tiny_model

KINDS = ["lolcats(window=4)", "gla"]


def rows_for(seed: int = 0, n: int = 12, t: int = 24) -> torch.Tensor:
    return torch.randint(3, 128, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("text, kind, value, softmax_of_30", [
    ("softmax=8", "softmax", 8, 8), ("ratio=3", "ratio", 3, 8), ("ratio=1", "ratio", 1, 15),
    ("ppl=10%", "ppl", 0.1, None), ("ppl=0.05", "ppl", 0.05, None),
])
def test_budget_forms(text, kind, value, softmax_of_30):
    b = Budget.parse(text)
    assert (b.kind, b.value) == (kind, pytest.approx(value)) and b.softmax_layers(30) == softmax_of_30


@pytest.mark.parametrize("text, message", [("layers=3", "cannot parse"), ("softmax=2.5", "whole number"),
                                           ("ratio=0", "> 0"), ("softmax=31", "has 30 layers")])
def test_bad_budgets_name_the_problem(text, message):
    with pytest.raises(PlanError, match=message):
        Budget.parse(text).softmax_layers(30)


def crafted(n: int = 10) -> Scores:
    """Layer i's impact for kind a is (i * 7 % n) / 100; kind b is better on even layers."""
    a = [(i * 7 % n) / 100 for i in range(n)]
    b = [v - 0.001 if i % 2 == 0 else v + 0.001 for i, v in enumerate(a)]
    return Scores(kinds=["a", "b"], window=4, entropy=[[0.5]] * n, locality=[[1 - v] for v in a],
                  transfer={"a": a, "b": b}, impact={"a": a, "b": b}, teacher_ppl=10.0)


def test_planner_keeps_softmax_where_impact_is_highest_and_picks_the_best_kind():
    s = crafted()
    hardest = sorted(range(10), key=lambda i: -s.impact["a"][i])
    for budget, k in (("softmax=3", 3), ("ratio=4", 2), ("softmax=0", 0), ("softmax=10", 10)):
        kinds = [spec.kind for spec in choose(s, Budget.parse(budget))]
        assert sorted(i for i, x in enumerate(kinds) if x == "softmax") == sorted(hardest[:k])
        assert all(x == ("b" if i % 2 == 0 else "a") for i, x in enumerate(kinds) if x != "softmax")

    def ppl(kinds):  # the crafted impacts add up
        return 10.0 * (1 + sum(s.impact[k][i] for i, k in enumerate(kinds) if k != "softmax"))

    for limit in (0.0, 0.05, 0.2, 1.0):
        kinds = [spec.kind for spec in choose(s, Budget.parse(f"ppl={limit}"), ppl)]
        assert ppl(kinds) <= 10.0 * (1 + limit) + 1e-12
        rest = [i for i, x in enumerate(kinds) if x == "softmax"]
        if rest:  # converting the easiest remaining layer too would break the budget
            easiest = min(rest, key=lambda i: min(s.impact["a"][i], s.impact["b"][i]))
            more = list(kinds)
            more[easiest] = "b" if easiest % 2 == 0 else "a"
            assert ppl(more) > 10.0 * (1 + limit)

    stats = Scores(kinds=["a"], window=4, entropy=[[0.5]] * 4, locality=[[0.9], [0.2], [0.7], [0.4]])
    assert [x.kind for x in choose(stats, Budget.parse("softmax=2"))] == ["a", "softmax", "a", "softmax"]
    with pytest.raises(PlanError, match="needs measurements"):
        choose(stats, Budget.parse("ppl=5%"))


def test_attention_statistics_match_the_models_own_attention_weights():
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    rows, window = rows_for(t=20), 5
    entropy, locality = attention_statistics(model, rows, window, batch_size=5)
    with torch.no_grad():
        weights = model(rows, output_attentions=True).attentions  # per layer [B,H,T,T]
    t = rows.shape[1]
    pos = torch.arange(t)
    for layer, p in enumerate(weights):
        p = p.double()
        ent = (-(p * p.clamp_min(1e-300).log()).sum(-1)[..., 1:] / torch.log(pos[1:] + 1.0)).mean((0, 2))
        near = (pos[None, :] > pos[:, None] - window) & (pos[None, :] <= pos[:, None])
        loc = (p * near).sum(-1)[..., window:].mean((0, 2))
        assert entropy[layer] == pytest.approx(ent.tolist(), abs=1e-5)
        assert locality[layer] == pytest.approx(loc.tolist(), abs=1e-5)
    assert all(0 < v <= 1 for head in locality for v in head)


def test_converted_block_restores_the_model():
    model = tiny_model("qwen2")
    ids = rows_for(n=2)
    with torch.no_grad():
        before = model(ids).logits
        with converted(model, "*:gla") as m:
            assert linearize.is_converted(m) and m.config.linearize["layers"][0]["kind"] == "gla"
        assert not linearize.is_converted(model) and not hasattr(model.config, "linearize")
        assert type(model).__name__ == "Qwen2ForCausalLM" and torch.equal(model(ids).logits, before)


def test_scores_are_deterministic_for_a_seed_and_budgets_hold_on_a_real_model():
    model = tiny_model("llama")
    kw = dict(kinds=KINDS, window=4, steps=3, batch_size=4, log=lambda *a: None)
    first, _, _ = score_layers(model, rows_for(), seed=0, **kw)
    again, _, _ = score_layers(model, rows_for(), seed=0, **kw)
    other, _, _ = score_layers(model, rows_for(), seed=1, **kw)
    assert first.to_dict() == again.to_dict()
    assert first.transfer != other.transfer
    assert set(first.transfer) == set(first.impact) == set(KINDS) and all(len(v) == 3 for v in first.transfer.values())

    plan, scores = autoplan(model, rows_for(), "softmax=1", seed=0, **kw)
    assert [s.kind for s in plan.resolve(3)].count("softmax") == 1 and scores.settings["budget"] == "softmax=1"
    for limit in (0.0, 0.5):
        plan, scores = autoplan(model, rows_for(), f"ppl={limit}", seed=0, **kw)
        _, trained, val_rows = score_layers(model, rows_for(), seed=0, **kw)
        kinds = [s.to_string() for s in plan.resolve(3)]
        assert measure_plan(model, kinds, trained, val_rows, 4) <= scores.teacher_ppl * (1 + limit) + 1e-9
    stats_plan, stats = autoplan(model, rows_for(), "ratio=2", seed=0, scores="stats", **kw)
    assert stats.transfer == {} and [s.kind for s in stats_plan.resolve(3)].count("softmax") == 1


def test_plan_command_writes_scores_report_and_a_yaml_that_convert_reads(tmp_path, capsys):
    folder = tiny_folder(tmp_path / "tiny", "mistral")
    text = tmp_path / "calib.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text("\n".join(" ".join(f"w{int(i)}" for i in torch.randint(3, 128, (40,), generator=g)) for _ in range(30)))
    args = ["plan", str(folder), "--budget", "softmax=1", "--kinds", ",".join(KINDS), "--window", "4", "--data", str(text),
            "--sequences", "12", "--seq-len", "24", "--steps", "2", "--out", str(tmp_path / "plan.yaml"),
            "--report", str(tmp_path / "report")]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    assert f"plan: {saved['plan']}" in printed
    specs = linearize.LayerPlan.from_file(tmp_path / "plan.yaml").resolve(3)
    assert [s.kind for s in specs].count("softmax") == 1
    assert linearize.convert(tiny_model("mistral"), linearize.LayerPlan.from_file(tmp_path / "plan.yaml")).config.linearize["plan"] \
        == saved["plan"]
    scores = json.loads((tmp_path / "report" / "scores.json").read_text())
    assert scores["plan"] == saved["plan"] and set(scores["impact"]) == set(KINDS)
    table = (tmp_path / "report" / "report.md").read_text()
    assert len([line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]) == 3
    assert (tmp_path / "report" / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(math.isfinite(v) for k in KINDS for v in scores["transfer"][k])

    assert cli.main(["plan", str(folder), "--budget", "softmax=9", "--out", str(tmp_path / "bad.yaml")]) == 2
    assert "has 3 layers" in capsys.readouterr().err and not (tmp_path / "bad.yaml").exists()
    assert cli.main(["plan", str(folder)]) == 2
    assert "either --plan" in capsys.readouterr().err
