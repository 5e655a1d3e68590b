"""Logits of a causal LM computed a slice at a time, so that 262k-vocab models fit in memory."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from quantscale.models.adapter import causal_lm


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def final_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Last hidden states `[batch, seq, hidden]` of a `*ForCausalLM`, before the LM head."""
    base = causal_lm(model).base_model
    out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return cast(torch.Tensor, out.last_hidden_state)


def project(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits of `hidden` through the LM head, with the model's final soft-capping.

    The hidden states are cast to the head's dtype first, as the models' own forward does (a
    bf16 Mamba with residual_in_fp32 hands float32 hidden states to a bf16 head).
    """
    head = causal_lm(model).get_output_embeddings()
    weight = getattr(head, "weight", None)
    logits = head(hidden if weight is None else hidden.to(weight.dtype)).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def sum_nll(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 128):
    """Summed next-token NLL of `targets` `[batch, n]` given `hidden` `[batch, n, dim]`."""
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, targets.shape[1], chunk):
        logits = project(model, hidden[:, start : start + chunk])
        part = targets[:, start : start + chunk]
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), part.flatten(), reduction="sum")
        total += loss.double().cpu()
    return total
