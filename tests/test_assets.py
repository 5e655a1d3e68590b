"""Markup stripping, article splits and token batches (fast); the real checkpoint (slow)."""

from __future__ import annotations

import pytest
import torch

from quantscale import cache
from quantscale.data import assets, calibration
from quantscale.data.text import Article, split_articles, strip_wiki_markup
from quantscale.errors import QuantscaleError

MARKUP = """{{Infobox animal|name=Aardvark|image={{nested|x}}}}
'''Aardvark''' is a [[mammal]] native to [[Africa|the African continent]].<ref name="a">{{cite
web|url=http://x.org}}</ref> It eats ''ants''<ref name="b"/> and termites.
<!-- a hidden comment -->
[[File:Aardvark.jpg|thumb|An [[aardvark]] at night]]
==Behaviour==
{| class="wikitable"
|-
| cell || cell
|}
* It digs [http://example.org burrows] quickly &amp; quietly.
==References==
{{reflist}}
Some reference text that must vanish.
[[Category:Mammals]]
"""


def test_strip_wiki_markup_keeps_prose_only():
    text = strip_wiki_markup(MARKUP)
    assert text.splitlines()[0] == (
        "Aardvark is a mammal native to the African continent. It eats ants and termites."
    )
    assert "It digs burrows quickly & quietly." in text
    for debris in (
        "{{",
        "}}",
        "[[",
        "]]",
        "<ref",
        "cite",
        "hidden",
        "Behaviour",
        "cell",
        "wikitable",
        "Aardvark.jpg",
        "night",
        "Category",
        "vanish",
        "'''",
        "http",
    ):
        assert debris not in text, debris


class CharTokenizer:
    """A tokenizer stand-in: one id per character, optional BOS."""

    def __init__(self, bos: int | None = None):
        self.bos_token_id = bos

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [ord(c) % 1000 + 10 for c in text]
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return {"input_ids": ids}


def _articles(n: int) -> list[Article]:
    return [Article(f"title {i:02d}", f"text of article {i} " * 20) for i in range(n)]


def test_split_is_deterministic_and_by_article():
    articles = _articles(30)
    calib, held_out = split_articles(articles, eval_fraction=0.2, seed=0)
    assert len(held_out) == 6 and len(calib) == 24
    assert {a.title for a in calib}.isdisjoint({a.title for a in held_out})
    assert split_articles(list(reversed(articles)), 0.2, seed=0) == (calib, held_out)
    other = split_articles(articles, 0.2, seed=1)[1]
    assert {a.title for a in other} != {a.title for a in held_out}


@pytest.mark.parametrize("bos", [None, 2])
def test_calibration_batches_are_windows_of_the_stream(bos):
    tok = CharTokenizer(bos)
    source = _articles(5)
    rows = calibration.calibration_batches(tok, n_samples=8, seq_len=32, seed=3, source=source)
    assert rows.shape == (8, 32) and rows.dtype == torch.long
    assert torch.equal(rows, calibration.calibration_batches(tok, 8, 32, seed=3, source=source))
    assert not torch.equal(rows, calibration.calibration_batches(tok, 8, 32, seed=4, source=source))
    stream = calibration.tokenize_text(tok, "\n\n".join(a.text for a in source)).tolist()
    body = rows[:, 1:] if bos is not None else rows
    if bos is not None:
        assert (rows[:, 0] == bos).all()
    for row in body.tolist():
        starts = [i for i in range(len(stream)) if stream[i : i + len(row)] == row]
        assert starts, "every row is a contiguous window of the token stream"


def test_calibration_text_file_source(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("abcdefghij" * 10, encoding="utf-8")
    rows = calibration.calibration_batches(CharTokenizer(), n_samples=4, seq_len=16, source=path)
    assert rows.shape == (4, 16)
    with pytest.raises(QuantscaleError, match="does not exist"):
        calibration.calibration_batches(CharTokenizer(), 4, 16, source=tmp_path / "missing.txt")
    with pytest.raises(QuantscaleError, match="fewer than"):
        calibration.calibration_batches(CharTokenizer(), 4, 512, source=path)


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTSCALE_CACHE", str(tmp_path / "c"))
    assert cache.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_bos_token_id_only_when_the_tokenizer_adds_it():
    assert calibration.bos_token_id(CharTokenizer(None)) is None
    assert calibration.bos_token_id(CharTokenizer(2)) == 2

    class DeclaredOnly(CharTokenizer):
        def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
            return super().__call__(text, add_special_tokens=False)

    assert calibration.bos_token_id(DeclaredOnly(2)) is None


def test_default_sources_are_the_wiki_split(monkeypatch):
    calib, held_out = _articles(4), [Article("held", "held out text " * 10)]
    monkeypatch.setattr(assets, "wiki_split", lambda seed=0: (calib, held_out))
    tok = CharTokenizer()
    stream = calibration.tokenize_text(tok, held_out[0].text)
    assert torch.equal(calibration.eval_tokens(tok), stream)
    assert torch.equal(calibration.eval_tokens(tok, n_tokens=7), stream[:7])
    rows = calibration.calibration_batches(tok, n_samples=3, seq_len=16)
    assert torch.equal(rows, calibration.calibration_batches(tok, 3, 16, source=calib))


@pytest.mark.slow
def test_real_wikipedia_split_and_smollm2_held_out_tokens():
    from transformers import AutoTokenizer

    calib, held_out = assets.wiki_split()
    assert (len(calib), len(held_out)) == (80, 20)
    assert {a.title for a in calib}.isdisjoint({a.title for a in held_out})
    tokenizer = AutoTokenizer.from_pretrained(str(assets.smollm2_checkpoint()))
    assert calibration.bos_token_id(tokenizer) is None
    assert len(calibration.eval_tokens(tokenizer)) == 137_710
