"""Plain text from MediaWiki markup, and deterministic splits of article lists.

The stripper is deliberately small: it handles what Wikipedia dumps use in article bodies
(templates, tables, references, links, files and categories, headings, HTML comments and
tags, bold/italic quotes, list markers) and drops the trailing reference sections.
"""

from __future__ import annotations

import html
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Article:
    """One article of plain text."""

    title: str
    text: str


# Sections after which a Wikipedia article is lists of sources and links, not prose.
_TAIL_SECTIONS = (
    "see also",
    "references",
    "notes",
    "external links",
    "further reading",
    "bibliography",
    "sources",
    "footnotes",
    "citations",
)
_NON_TEXT_LINKS = ("file:", "image:", "category:", "media:")
_DROPPED_ELEMENTS = (
    "ref",
    "math",
    "gallery",
    "timeline",
    "score",
    "syntaxhighlight",
    "source",
    "imagemap",
    "templatedata",
    "chem",
    "hiero",
)

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_SELF_CLOSING_REF = re.compile(r"<ref\b[^>/]*/>", re.I)
_ELEMENT = re.compile(r"<(" + "|".join(_DROPPED_ELEMENTS) + r")\b[^>]*>.*?</\1\s*>", re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_INNER_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_INNER_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\n\|\}", re.S)
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:)?//[^\s\]]+(?:\s([^\]]*))?\]")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_QUOTES = re.compile(r"'{2,}")
_LIST_MARKER = re.compile(r"^[*#:;]+\s*", re.M)
_SPACES = re.compile(r"[ \t\u00a0]+")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?)])")


def _until_stable(
    pattern: re.Pattern[str], repl: str | Callable[[re.Match[str]], str], text: str
) -> str:
    """Apply a substitution until nothing changes (resolves nesting from the inside out)."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _link_text(match: re.Match[str]) -> str:
    """Replace `[[target|label]]` by its label; drop file, image and category links."""
    inner = match.group(1)
    target = inner.split("|", 1)[0].strip().lower()
    if target.startswith(_NON_TEXT_LINKS) or re.match(r"^[a-z-]{2,12}:", target):
        return ""
    return inner.rsplit("|", 1)[-1]


def _cut_tail_sections(text: str) -> str:
    """Drop everything from the first 'See also' / 'References'-like heading on."""
    for match in _HEADING.finditer(text):
        if match.group(2).strip().lower() in _TAIL_SECTIONS:
            return text[: match.start()]
    return text


def _keep_line(line: str) -> bool:
    """Lines that are prose, not table or template debris."""
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith(("|", "!", "{", "}"))


def strip_wiki_markup(markup: str) -> str:
    """Return the prose of a MediaWiki article body as paragraphs separated by blank lines."""
    text = _COMMENT.sub("", markup)
    text = _cut_tail_sections(text)
    text = _SELF_CLOSING_REF.sub("", text)
    text = _ELEMENT.sub("", text)
    text = _until_stable(_INNER_TEMPLATE, "", text)
    text = _until_stable(_INNER_TABLE, "", text)
    text = _until_stable(_INNER_LINK, _link_text, text)
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    text = _HEADING.sub("", text)
    text = _TAG.sub("", text)
    text = html.unescape(_QUOTES.sub("", text))
    text = _LIST_MARKER.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.splitlines()]
    paragraphs = [_SPACE_BEFORE_PUNCT.sub(r"\1", line) for line in lines if _keep_line(line)]
    return "\n\n".join(paragraphs)


def split_articles(
    articles: Sequence[Article], eval_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Article], list[Article]]:
    """Split articles into (calibration, evaluation) lists, whole articles on each side.

    Articles are ordered by title, shuffled with `random.Random(seed)`, and the last
    `round(eval_fraction * n)` (at least one) go to evaluation; both halves keep title order.
    The result depends only on the titles, the fraction and the seed.
    """
    ordered = _by_title(articles)
    random.Random(seed).shuffle(ordered)
    n_eval = max(1, round(eval_fraction * len(ordered))) if ordered else 0
    cut = len(ordered) - n_eval
    return _by_title(ordered[:cut]), _by_title(ordered[cut:])


def _by_title(articles: Sequence[Article]) -> list[Article]:
    return sorted(articles, key=lambda a: a.title)
