"""Perplexity over non-overlapping windows of a token stream."""

from __future__ import annotations

import math

import torch
from torch import nn

from quantscale.errors import QuantscaleError
from quantscale.eval.scoring import final_hidden, model_device, sum_nll
from quantscale.progress import track


def _windows(tokens: torch.Tensor, seq_len: int, bos_id: int | None) -> list[torch.Tensor]:
    """Non-overlapping windows; with a BOS each window is BOS + (seq_len - 1) tokens."""
    width = seq_len - (bos_id is not None)
    pieces = [tokens[i : i + width] for i in range(0, len(tokens), width)]
    if bos_id is not None:
        bos = torch.tensor([bos_id], dtype=tokens.dtype)
        return [torch.cat([bos, p]) for p in pieces if len(p) >= 1]
    return [p for p in pieces if len(p) >= 2]


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seq_len: int = 512,
    batch_size: int = 4,
    bos_id: int | None = None,
) -> float:
    """exp(mean next-token NLL) of a 1-D token stream, in windows of `seq_len` tokens.

    Each window is scored on its own (no context carried over); every token of the stream
    except the first of each window is predicted, or all of them when `bos_id` is given.
    """
    windows = _windows(tokens.flatten().long(), seq_len, bos_id)
    if not windows:
        raise QuantscaleError(f"perplexity needs at least 2 tokens, got {tokens.numel()}")
    device = model_device(model)
    nll, count = 0.0, 0
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    for batch in track(batches, total=len(batches), description="perplexity"):
        for group in _same_length(batch):
            ids = torch.stack(group).to(device)
            hidden = final_hidden(model, ids)[:, :-1]
            nll += float(sum_nll(model, hidden, ids[:, 1:]))
            count += ids[:, 1:].numel()
    return math.exp(nll / count)


def _same_length(batch: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Split a batch so that each group stacks (only the stream's last window is shorter)."""
    groups: dict[int, list[torch.Tensor]] = {}
    for window in batch:
        groups.setdefault(len(window), []).append(window)
    return list(groups.values())
