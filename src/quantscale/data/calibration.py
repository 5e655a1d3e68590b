"""Token tensors for calibration and evaluation: tokenization, calibration windows, eval tokens.

- `calibration_batches()`: `[n_samples, seq_len]` random windows over the calibration text
  (the calibration Wikipedia articles by default, or a text file, articles or strings).
- `eval_tokens()`: the held-out articles' token stream.
- `tokenize_text()` / `bos_token_id()`: how every caller turns text into ids.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from quantscale.data import assets
from quantscale.data.text import Article
from quantscale.errors import QuantscaleError

CalibrationSource = str | os.PathLike[str] | Sequence[Article] | Sequence[str] | None


class Tokenizer(Protocol):
    """What these functions use of a (Hugging Face) tokenizer."""

    bos_token_id: Any

    def __call__(self, text: str, add_special_tokens: bool = True) -> Mapping[str, Any]: ...


def bos_token_id(tokenizer: Tokenizer) -> int | None:
    """The BOS id if this tokenizer adds one by default (Gemma), else None (SmolLM2)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def _join(articles: Sequence[Article]) -> str:
    return "\n\n".join(a.text for a in articles)


def tokenize_text(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """Token ids of `text` without special tokens, as a 1-D LongTensor."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _source_text(source: CalibrationSource) -> str:
    """Text of a calibration source: None (calibration articles), a text file, articles or
    strings (joined by blank lines)."""
    if source is None:
        return _join(assets.wiki_split()[0])
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise QuantscaleError(f"calibration text file {path} does not exist")
        return path.read_text(encoding="utf-8")
    texts = [item if isinstance(item, str) else item.text for item in source]
    return "\n\n".join(texts)


def token_ids(ids: torch.Tensor) -> torch.Tensor:
    """Calibration token ids given directly: a 2-D integer tensor `[N, L]` (as long)."""
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise QuantscaleError(
            f"calibration token ids must be an integer tensor [N, L]; got {ids.dtype} "
            f"of shape {list(ids.shape)}"
        )
    return ids.long()


def calibration_batches(
    tokenizer: Tokenizer,
    n_samples: int = 512,
    seq_len: int = 512,
    seed: int = 0,
    source: CalibrationSource = None,
) -> torch.Tensor:
    """`[n_samples, seq_len]` LongTensor of random windows over the calibration text.

    Window starts are drawn with `torch.Generator().manual_seed(seed)` over the token stream
    of the joined source articles; tokenizers that add a BOS get it as each row's first token.
    """
    stream = tokenize_text(tokenizer, _source_text(source))
    bos = bos_token_id(tokenizer)
    width = seq_len - (bos is not None)
    if len(stream) <= width:
        raise QuantscaleError(
            f"calibration text has {len(stream)} tokens, fewer than seq_len={seq_len} + 1"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - width, (n_samples,), generator=gen)
    rows = torch.stack([stream[s : s + width] for s in starts.tolist()])
    if bos is not None:
        rows = torch.cat([torch.full((n_samples, 1), bos, dtype=torch.long), rows], dim=1)
    return rows


def eval_tokens(tokenizer: Tokenizer, n_tokens: int | None = None, seed: int = 0) -> torch.Tensor:
    """1-D LongTensor of the held-out articles' tokens (the first `n_tokens` if given)."""
    stream = tokenize_text(tokenizer, _join(assets.wiki_split(seed)[1]))
    return stream if n_tokens is None else stream[:n_tokens]
