"""LAMBADA-style last-word prediction built from held-out Wikipedia articles.

Item construction (deterministic, `cloze_items`):
1. Each article is split into paragraphs and sentences (a sentence ends in . ! or ?
   followed by whitespace and an upper-case letter, digit or quote).
2. A sentence is a candidate when it ends in a word of letters only, at least 3 long,
   directly followed by its final punctuation, and that exact word already occurs in the
   preceding context (as in LAMBADA, the context makes the word guessable).
3. The context is the candidate sentence without its last word and final punctuation,
   preceded by as many whole earlier sentences of the same paragraph and earlier
   paragraphs of the article as fit in `context_words` words; it must hold at least
   `min_context_words` words.
4. `n_items` candidates are drawn with `random.Random(seed).sample` over all candidates of
   all articles in article order.
Scoring: the model sees context tokens and must predict each token of " " + word greedily
(argmax, teacher-forced, which equals greedy generation of those tokens), and then predict a
token that does not continue the word (its text starts with neither a letter nor a digit).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from quantscale.data.calibration import bos_token_id
from quantscale.data.text import Article
from quantscale.eval.scoring import final_hidden, model_device, project
from quantscale.progress import track

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'])")
_LAST_WORD = re.compile(r"(?<=\s)([A-Za-z]{3,})[.!?]$")


@dataclass(frozen=True)
class ClozeItem:
    """A passage and the word that ends it."""

    context: str
    target: str


def _sentences(article: Article) -> list[str]:
    """The article's sentences, in order, across paragraphs."""
    out: list[str] = []
    for paragraph in article.text.split("\n\n"):
        out.extend(s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip())
    return out


def _article_items(article: Article, context_words: int, min_context_words: int) -> list[ClozeItem]:
    """All cloze candidates of one article (see the module docstring)."""
    sentences = _sentences(article)
    items = []
    for i, sentence in enumerate(sentences):
        match = _LAST_WORD.search(sentence)
        if not match:
            continue
        head = sentence[: match.start()].rstrip()
        budget = context_words - len(head.split())
        start = i
        while start > 0 and len(sentences[start - 1].split()) <= budget:
            start -= 1
            budget -= len(sentences[start].split())
        context = " ".join([*sentences[start:i], head])
        word = match.group(1)
        seen = re.search(rf"\b{word}\b", context) is not None
        if seen and len(context.split()) >= min_context_words:
            items.append(ClozeItem(context, word))
    return items


def cloze_items(
    articles: Sequence[Article],
    n_items: int = 200,
    seed: int = 0,
    context_words: int = 120,
    min_context_words: int = 40,
) -> list[ClozeItem]:
    """`n_items` deterministic cloze items from `articles` (all of them if fewer exist)."""
    pool = [it for a in articles for it in _article_items(a, context_words, min_context_words)]
    if len(pool) <= n_items:
        return pool
    return random.Random(seed).sample(pool, n_items)


def _encode(tokenizer, item: ClozeItem, max_len: int) -> tuple[list[int], list[int]]:
    """(context ids, target ids) with BOS if the tokenizer uses one; context cut on the left."""
    target = tokenizer(" " + item.target, add_special_tokens=False)["input_ids"]
    context = tokenizer(item.context, add_special_tokens=False)["input_ids"]
    context = context[-(max_len - len(target)) :]
    bos = bos_token_id(tokenizer)
    return ([bos] if bos is not None else []) + context, target


def _continues_word(tokenizer, token_id: int) -> bool:
    """Whether a predicted next token would extend the word (no space/punctuation first)."""
    text = tokenizer.decode([token_id])
    return bool(text) and text[0].isalnum()


@torch.inference_mode()
def cloze_accuracy(
    model: nn.Module,
    tokenizer,
    n_items: int = 200,
    articles: Sequence[Article] | None = None,
    batch_size: int = 8,
    max_len: int = 512,
) -> float:
    """Fraction of cloze items whose last word the model predicts exactly and greedily.

    `articles` defaults to the held-out Wikipedia articles of `quantscale.data.assets.wiki_split`.
    """
    if articles is None:
        from quantscale.data.assets import wiki_split

        articles = wiki_split()[1]
    items = cloze_items(articles, n_items)
    encoded = [_encode(tokenizer, it, max_len) for it in items]
    batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    correct = 0
    for batch in track(batches, total=len(batches), description="cloze"):
        correct += _score_batch(model, tokenizer, batch)
    return correct / len(items)


def _score_batch(model: nn.Module, tokenizer, batch: list[tuple[list[int], list[int]]]) -> int:
    """How many (context, target) pairs of a right-padded batch the model gets right."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [c + t for c, t in batch]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    device = model_device(model)
    hidden = final_hidden(model, ids.to(device), mask.to(device))
    correct = 0
    for i, (context, target) in enumerate(batch):
        positions = torch.arange(len(context) - 1, len(context) + len(target), device=device)
        predicted = project(model, hidden[i, positions]).argmax(-1).tolist()
        exact = predicted[:-1] == target
        correct += int(exact and not _continues_word(tokenizer, predicted[-1]))
    return correct
