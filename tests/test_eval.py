"""Evaluation: perplexity by hand, the offline lm-eval tasks (loaders, our wrapper, `lm_eval --model linearize`),
recovery, recall items and scoring, and the `eval` / `bench` commands end to end on SmolLM2."""

from __future__ import annotations

import copy
import glob
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import linearize
from linearize import cli
from linearize.eval import recall as recall_mod
from linearize.eval import text_perplexity
from linearize.eval.harness import expand_tasks
from linearize.eval.report import compare, compare_table, records_table, recovery
from linearize.eval.tasks import loaders

from conftest import tiny_model


class ByteTokenizer:
    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = torch.tensor([[3 + b % 120 for b in text.encode()]])
        return type("Enc", (), {"input_ids": ids})()


@pytest.mark.parametrize("context, stride", [(16, 16), (16, 6), (50, 50)])
def test_text_perplexity_matches_hand_computation(tmp_path, context, stride):
    model = tiny_model("llama")
    text = "a quick brown fox jumps over the lazy dog; " * 3
    (tmp_path / "t.txt").write_text(text)
    ids = ByteTokenizer()(text).input_ids[0]
    got = text_perplexity(model, ByteTokenizer(), tmp_path / "t.txt", context=context, stride=stride, batch_size=2)
    nll, n, done = 0.0, 0, 0  # score token j (j >= 1) once, from the first window that holds it with the most context
    context = min(context, len(ids))
    with torch.no_grad():
        for s in range(0, len(ids) - context + 1, stride):
            logp = F.log_softmax(model(ids[None, s : s + context]).logits[0].float(), -1)
            for j in range(max(s + 1, done), s + context):
                nll -= logp[j - s - 1, ids[j]].item()
                n += 1
            done = s + context
    assert got["tokens"] == n
    assert math.isclose(got["ppl"], math.exp(nll / n), rel_tol=1e-5)


@pytest.mark.parametrize("stride, message", [(32, "--stride 32 is larger than --context 16"),
                                             (-2, "--stride -2: must be a positive number")])
def test_text_perplexity_refuses_a_stride_it_cannot_use(tmp_path, stride, message):
    (tmp_path / "t.txt").write_text("text")  # the same check as `linearize eval`, before the text is read
    with pytest.raises(linearize.LinearizeError, match=message):
        text_perplexity(None, ByteTokenizer(), tmp_path / "t.txt", context=16, stride=stride)


def test_text_that_is_not_utf8_says_so(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"text\n\xff\xfe")
    with pytest.raises(linearize.LinearizeError, match=r"'.*t.txt' is not UTF-8 text \(invalid start byte at byte 5\)"):
        text_perplexity(None, ByteTokenizer(), tmp_path / "t.txt")


# --- offline lm-eval tasks -----------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
WIKI = """ 
 = Alpha Bravo = 
 
 Alpha Bravo is a 1 @,@ 200 @-@ page novel . It was written in 1990 ; critics called it " quiet " . 
 
 = = Plot = = 
 
 The story follows a sailor who loses his ship ( and his map ) . 
 
 = Charlie Delta = 
 
 Charlie Delta was a river boat built in 1850 . It sank in 1851 , after a fire . 
"""


def write_samples(root: Path) -> Path:
    """Tiny files in each benchmark's published layout (ARC in both of its layouts)."""
    def jsonl(path: str, rows: list[dict]) -> None:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("".join(json.dumps(r) + "\n" for r in rows))

    (root / "wikitext2").mkdir(parents=True)
    (root / "wikitext2" / "test.txt").write_text(WIKI)
    jsonl("hellaswag/hellaswag_val.jsonl", [
        {"ind": i, "activity_label": "Making tea", "ctx_a": "A woman fills a kettle with water.", "ctx_b": "she",
         "ctx": "", "split": "val", "split_type": "indomain", "label": i % 4, "source_id": "s",
         "endings": ["puts the kettle on the stove.", "[title] throws the kettle away.", "paints the kettle red.",
                     "sings a song to the kettle."]} for i in range(4)])
    q = "Which of these is a source of light?"
    jsonl("arc/ARC-Easy/ARC-Easy-Test.jsonl", [
        {"id": f"e{i}", "question": {"stem": q, "choices": [{"text": t, "label": lab} for t, lab in
                                                            zip(["a rock", "the Sun", "a spoon", "a shoe"], "ABCD")]},
         "answerKey": "B"} for i in range(3)])
    jsonl("arc/ARC-Challenge/ARC-Challenge-Test.jsonl", [
        {"id": "c0", "question": q, "choices": {"text": ["a rock", "the Sun", "a spoon"], "label": ["1", "2", "3"]},
         "answerKey": "2"}])
    jsonl("piqa/valid.jsonl", [{"goal": "To dry wet hands,", "sol1": "rub them with a towel.", "sol2": "dip them in a lake."},
                               {"goal": "To keep bread fresh,", "sol1": "leave it in the sun.", "sol2": "wrap it in a bag."},
                               {"goal": "To open a jar,", "sol1": "twist the lid.", "sol2": "shout at the jar."}])
    (root / "piqa" / "valid-labels.lst").write_text("0\n1\n0\n")
    jsonl("lambada/lambada_test.jsonl", [{"text": "He opened the door and called his dog. The dog ran to the door"},
                                         {"text": "She picked up the phone and said hello to her mother"}])
    return root


def test_loaders_read_each_published_layout(tmp_path):
    root = write_samples(tmp_path)
    docs = loaders.wikitext2(data_dir=str(root))["test"]
    assert [d["page"].splitlines()[0] for d in docs] == [" = Alpha Bravo = ", " = Charlie Delta = "]
    assert "= = Plot = =" in docs[0]["page"]  # sections stay inside their article
    text = loaders.wikitext_text(docs[0])
    assert "1,200-page novel. It was written in 1990; critics" in text and "(and his map)." in text
    hs = loaders.hellaswag(data_dir=str(root))["validation"]
    assert hs[1]["gold"] == 1 and hs[0]["query"] == "Making tea: A woman fills a kettle with water. She"
    assert hs[0]["choices"][1] == ". throws the kettle away." or "[title]" not in hs[0]["choices"][1]
    easy, hard = loaders.arc_easy(data_dir=str(root))["test"], loaders.arc_challenge(data_dir=str(root))["test"]
    assert easy[0]["gold"] == 1 and hard[0]["gold"] == 1 and easy[0]["choices"][1] == "the Sun"
    assert easy[0]["query"] == "Question: Which of these is a source of light?\nAnswer:"
    assert [d["gold"] for d in loaders.piqa(data_dir=str(root))["validation"]] == [0, 1, 0]
    assert loaders.lambada(data_dir=str(root))["test"][1]["text"].endswith("mother")


def test_loaders_name_missing_files_and_bad_labels(tmp_path, monkeypatch):
    root = write_samples(tmp_path)
    (root / "piqa" / "valid-labels.lst").write_text("0\n")
    with pytest.raises(ValueError, match="3 rows but its labels file 1"):
        loaders.piqa(data_dir=str(root))
    (root / "lambada" / "lambada_test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="lambada_test.jsonl"):
        loaders.lambada(data_dir=str(root))
    monkeypatch.setenv(loaders.DATA_ENV, str(root))  # the variable stands in for the metadata and --data-dir
    assert len(loaders.arc_easy()["test"]) == 3
    assert expand_tasks(["local_arc_easy"], None) == ["local_arc_easy"]
    monkeypatch.delenv(loaders.DATA_ENV)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        loaders.arc_easy()


def test_recovery_on_a_crafted_result():
    recs = [{"model": "teacher", "task": "piqa", "metric": "acc", "value": 0.60},
            {"model": "teacher", "task": "piqa", "metric": "acc_stderr", "value": 0.02},
            {"model": "teacher", "task": "wiki", "metric": "ppl", "value": 10.0},
            {"model": "*:gla", "task": "piqa", "metric": "acc", "value": 0.45},
            {"model": "*:gla", "task": "piqa", "metric": "acc_stderr", "value": 0.03},
            {"model": "*:gla", "task": "wiki", "metric": "ppl", "value": 12.5},
            {"model": "*:gla", "task": "mqar@1024", "metric": "acc", "value": 0.5}]
    rows = compare(recs)
    assert [(r["task"], r["metric"]) for r in rows] == [("piqa", "acc"), ("wiki", "ppl"), ("mqar@1024", "acc")]
    assert rows[0]["recovery"] == pytest.approx(75.0) and rows[0]["stderr"] == (0.02, 0.03)
    assert rows[1]["recovery"] == pytest.approx(80.0)  # lower is better: teacher / converted
    assert rows[2]["teacher"] is None and rows[2]["recovery"] is None
    table = compare_table(rows)
    assert "| piqa | acc | 0.6000 ± 0.0200 | 0.4500 ± 0.0300 | 75.0 |" in table
    assert "| wiki | ppl | 10.0000 | 12.5000 | 80.0 |" in table
    assert recovery(0.0, 0.3, "acc") is None and recovery(2.0, 4.0, "bits_per_byte") == pytest.approx(50.0)
    one = records_table([r for r in recs if r["model"] == "*:gla"])  # one model: named in the header, not every row
    assert one.splitlines()[0] == "| task | metric | value |" and "| piqa | acc | 0.4500 ± 0.0300 |" in one
    both = records_table(recs)
    assert both.splitlines()[0] == "| model | task | metric | value |" and "| teacher | wiki | ppl | 10.0000 |" in both


# --- recall --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(smollm2_base):
    return smollm2_base[1]


@pytest.mark.parametrize("length", [300, 2048])
def test_mqar_items_are_verifiable(tok, length):
    item = recall_mod.make_items("mqar", tok, [length], 1, seed=length)[0]
    listed, asked = item.text.split("Now the numbers again, for some of the names.\n")
    table = dict(line.split(": ") for line in listed.splitlines()[1:])
    assert len(table) == item.info["pairs"] and abs(len(item.input_ids) - length) <= max(15, 0.03 * length)
    queries = [line.split(": ") for line in asked.splitlines()]
    assert len(queries) == len(item.answers) >= 2
    for (name, value), answer, (a, b), (s, e) in zip(queries, item.answers, item.char_spans, item.token_spans):
        assert table[name] == value == answer == item.text[a:b]
        assert tok.decode(item.input_ids[s:e]).strip() == answer
    assert recall_mod.make_items("mqar", tok, [length], 1, seed=length)[0].text == item.text
    assert recall_mod.make_items("mqar", tok, [length], 1, seed=length + 1)[0].text != item.text


def test_passkey_items_hide_the_key_at_their_depth(tok):
    items = recall_mod.make_items("passkey", tok, [1024], 3, seed=0)
    assert [it.info["depth"] for it in items] == [0.0, 0.5, 1.0]
    for it in items:
        key = it.answers[0]
        assert re.fullmatch(r"\d{5}", key) and it.text.endswith(f"The pass key is {key}")
        needle = it.text.index(f"The pass key is {key}. Remember it")
        assert it.text[it.char_spans[0][0] : it.char_spans[0][1]] == key
        assert tok.decode(it.input_ids[slice(*it.token_spans[0])]).strip() == key
        assert abs(needle / len(it.text) - it.info["depth"]) < 0.12 and abs(len(it.input_ids) - 1024) < 60


class Oracle(torch.nn.Module):
    """Logits that put the next token of `ids` (shifted by `shift`) on top: a perfect or a wrong model."""

    def __init__(self, ids: torch.Tensor, shift: int = 0):
        super().__init__()
        self.ids, self.shift, self.w = ids, shift, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False, logits_to_keep=None):
        nxt = torch.roll(self.ids, -1 - self.shift)[logits_to_keep]
        return type("Out", (), {"logits": F.one_hot(nxt, 50000).float()[None]})()


def test_recall_scoring_counts_answers_of_a_perfect_and_a_wrong_model(tok):
    item = recall_mod.make_items("mqar", tok, [400], 1)[0]
    assert recall_mod.answers_recalled(Oracle(item.input_ids), item) == [True] * len(item.answers)
    assert not any(recall_mod.answers_recalled(Oracle(item.input_ids, shift=1), item))


# --- end to end on SmolLM2: our wrapper, lm_eval's own CLI, the eval and bench commands --------------------

PLAN = "0-1:softmax,2-27:lolcats(window=8),28-29:softmax"  # a short window: differs from the teacher on short texts
SLICE = ["local_piqa", "local_arc_easy", "local_lambada"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, smollm2_base):
    """The teacher and a (stage-free) converted SmolLM2 saved as folders, and the sample data."""
    root = tmp_path_factory.mktemp("eval")
    model, tok = copy.deepcopy(smollm2_base[0]), smollm2_base[1]
    model.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    linearize.convert(model, PLAN).save_pretrained(root / "converted")
    tok.save_pretrained(root / "converted")
    return {"teacher": root / "teacher", "converted": root / "converted", "data": write_samples(root / "data")}


def lm_eval_cli(model_dir: Path, data: Path, out: Path) -> dict:
    """Run `lm_eval --model linearize` in a fresh process; {task: {metric: value}} from its results file."""
    exe = Path(sys.executable).with_name("lm_eval")
    run = subprocess.run(
        [str(exe), "--model", "linearize", "--model_args", f"pretrained={model_dir},dtype=float32",
         "--include_path", str(Path(loaders.__file__).parent), "--metadata", json.dumps({"data_dir": str(data)}),
         "--tasks", ",".join(SLICE), "--batch_size", "4", "--device", "cpu", "--output_path", str(out)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (path,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    results = json.loads(Path(path).read_text())["results"]
    return {t: {k.split(",")[0]: v for k, v in m.items() if k.endswith(",none")} for t, m in results.items()}


def test_lm_eval_slice_same_through_our_wrapper_and_lm_eval_cli(saved, tmp_path):
    """A converted model scores the same through `linearize.eval.evaluate` and `lm_eval --model linearize` (the
    wrapper's teacher path: test_eval_command_compares_converted_with_teacher)."""
    from linearize.eval import evaluate

    model, tok = linearize.load(saved["converted"])
    assert linearize.is_converted(model)
    recs = evaluate(model, tok, tasks=SLICE, data_dir=saved["data"], batch_size=4)
    ours = {(r["task"], r["metric"]): r["value"] for r in recs}
    assert {r["model"] for r in recs} == {PLAN}
    assert 0 <= ours["local_piqa", "acc"] <= 1 and ours["local_lambada", "perplexity"] > 1
    theirs = lm_eval_cli(saved["converted"], saved["data"], tmp_path)
    for task in SLICE:
        for metric, value in theirs[task].items():
            if metric == "perplexity_stderr":
                continue  # bootstrapped, with another number of resamples
            assert ours[task, metric] == pytest.approx(value, rel=1e-4), (task, metric)


def test_wikitext_task_word_perplexity_matches_hand_computation(saved, smollm2_base):
    from linearize.eval.harness import LinearizeLM, run_tasks

    model, tok = smollm2_base
    got = run_tasks(LinearizeLM(model, tok, max_length=512), ["local_wikitext2"], data_dir=saved["data"])["local_wikitext2"]
    ll, words, nbytes = 0.0, 0, 0
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        for doc in loaders.wikitext2(data_dir=str(saved["data"]))["test"]:
            ids = torch.tensor([prefix] + tok(loaders.wikitext_text(doc), add_special_tokens=False).input_ids)
            logp = F.log_softmax(model(ids[None]).logits[0].float(), -1)
            ll += logp[torch.arange(len(ids) - 1), ids[1:]].sum().item()
            words, nbytes = words + len(doc["page"].split()), nbytes + len(doc["page"].encode())
    assert got["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(-ll / nbytes / math.log(2), rel=1e-4)


def test_eval_command_compares_converted_with_teacher(saved, tmp_path):
    out = tmp_path / "eval"
    rc = cli.main(["eval", str(saved["converted"]), "--compare", str(saved["teacher"]), "--tasks", "local_piqa",
                   "--data-dir", str(saved["data"]), "--perplexity", str(saved["data"] / "wikitext2" / "test.txt"),
                   "--context", "32", "--recall", "mqar,passkey", "--recall-lengths", "256", "--recall-items", "2",
                   "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert {"command", "date", "device", "versions", "records", "comparison"} <= set(res)
    assert {r["model"] for r in res["records"]} == {"teacher", PLAN}
    tasks = {(r["task"], r["metric"]) for r in res["comparison"]}
    assert tasks == {("local_piqa", "acc"), ("local_piqa", "acc_norm"), ("ppl:wikitext2/test.txt", "ppl"),
                     ("mqar@256", "acc"), ("passkey@256", "acc")}
    ppl = next(r for r in res["comparison"] if r["metric"] == "ppl")
    assert ppl["recovery"] == pytest.approx(100 * ppl["teacher"] / ppl["converted"])
    assert "| task | metric | teacher | converted | recovery % |" in (out / "report.md").read_text()


def test_bench_command_writes_json_table_and_plot(saved, tmp_path):
    out = tmp_path / "bench"
    assert cli.main(["bench", str(saved["converted"]), "--compare", str(saved["teacher"]), "--lengths", "32,64",
                     "--batch-sizes", "2", "--decode-tokens", "3", "--repeats", "1", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [(r["model"], r["batch"], r["context"]) for r in res["rows"]] == [
        (m, 2, c) for m in (PLAN, "teacher") for c in (32, 64)]
    assert all(r["status"] == "ok" and r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 for r in res["rows"])
    # the fastest path each has: the teacher's static cache; the graphed step for a plan that keeps whole softmax layers
    assert all(r["fast_decode_tok_s"] > 0 and r["fast_decode"] == "static cache" for r in res["rows"] if r["model"] == "teacher")
    assert all(r["fast_decode_tok_s"] > 0 and r["fast_decode"] == "graphed step" for r in res["rows"] if r["model"] == PLAN)
    report = (out / "report.md").read_text()
    assert (out / "bench.png").stat().st_size > 1000 and "| model | batch | context |" in report and "fast decode tok/s" in report


def test_fast_decode_of_a_converted_model_is_its_graphed_step():
    """bench's fast decode of an all-converted model runs GraphedDecoder (eager step on a CPU), timed per token."""
    from linearize.eval.bench import bench_model

    model = linearize.convert(tiny_model("llama"), "*:lolcats(window=4, sinks=2)")
    rows = bench_model(model, lengths=[9], batch_sizes=[2], decode_tokens=3, repeats=1)
    assert rows[0]["fast_decode"] == "graphed step" and rows[0]["fast_decode_tok_s"] > 0


def test_eval_errors_name_the_problem_before_loading(saved, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(loaders.DATA_ENV, raising=False)
    out = tmp_path / "x"
    cases = [
        (["--tasks", "local_piqa"], "pass --data-dir"),
        (["--tasks", "local_hellaswag", "--data-dir", str(tmp_path)], "hellaswag/hellaswag_val.jsonl"),
        (["--perplexity", str(tmp_path / "none.txt")], "does not exist"),
        ([], "nothing to evaluate"),
        (["--recall", "mqar", "--compare", str(saved["teacher"])], "both 'teacher'"),
    ]
    for extra, message in cases:
        assert cli.main(["eval", str(saved["teacher"]), *extra, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not out.exists()
