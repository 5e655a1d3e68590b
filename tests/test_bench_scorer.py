"""The benchmarks' zero-shot scorer (benchmarks/common.py ZS_CODE, run by ours and the peers'
jobs) against a plain reference: one unpadded full-logit forward per choice."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common  # noqa: E402
from conftest import make_tiny_llama  # noqa: E402


class CharTokenizer:
    """Stub HF-style tokenizer: one id per character (ids 3..122), so choices differ in length."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [3 + ord(c) % 120 for c in text]}


def reference_scores(model, tok, head, query, choices) -> list[float]:
    ctx = head + tok(query)["input_ids"]
    out = []
    for choice in choices:
        ids = torch.tensor([head + tok(query + " " + choice)["input_ids"]])
        logp = model(input_ids=ids).logits.float().log_softmax(-1)[0]
        target = ids[0, len(ctx) :]
        out.append(float(logp[len(ctx) - 1 : -1].gather(-1, target[:, None]).sum()))
    return out


ROWS = {
    "toy": [
        {"query": "Which is red?\nAnswer:", "choices": ["a rose", "grass", "sky"], "gold": 0},
        {"query": "Two plus two is", "choices": ["four", "a very long wrong answer"], "gold": 1},
        {"query": "Pick", "choices": ["x", "yy", "zzz", "w"], "gold": 3},
    ]
}


@pytest.mark.parametrize("bos", [None, 2])
def test_scorer_equals_unpadded_full_logit_forward(tmp_path, monkeypatch, bos):
    model = make_tiny_llama()
    tok = CharTokenizer()
    ns: dict = {}
    exec(common.ZS_CODE, ns)
    head = [] if bos is None else [bos]
    for row in ROWS["toy"]:
        with torch.inference_mode():
            got = ns["_choice_scores"](model, tok, head, row["query"], row["choices"])
            want = reference_scores(model, tok, head, row["query"], row["choices"])
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS))
    monkeypatch.setenv(common.ZS_ENV, str(path))
    if bos is None:
        monkeypatch.delenv(common.BOS_ENV, raising=False)
    else:
        monkeypatch.setenv(common.BOS_ENV, str(bos))
    result = ns["zeroshot"](model, tok)
    hits = hits_norm = 0
    for row in ROWS["toy"]:
        with torch.inference_mode():
            ll = reference_scores(model, tok, head, row["query"], row["choices"])
        norm = [x / len(c) for x, c in zip(ll, row["choices"])]
        hits += ll.index(max(ll)) == row["gold"]
        hits_norm += norm.index(max(norm)) == row["gold"]
    assert result == {"toy": hits / 3, "toy_norm": hits_norm / 3}


def test_scorer_without_rows_file_scores_nothing(monkeypatch):
    ns: dict = {}
    exec(common.ZS_CODE, ns)
    monkeypatch.delenv(common.ZS_ENV, raising=False)
    assert ns["zeroshot"](make_tiny_llama(), CharTokenizer()) == {}
