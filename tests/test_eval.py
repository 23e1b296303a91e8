"""Perplexity on a text file against a hand computation over the same windows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from linearize.eval import text_perplexity

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
