"""Greedy text generation from an in-memory causal LM (`quantscale eval --prompt`)."""

from __future__ import annotations

import torch
from torch import nn

from quantscale.data.calibration import bos_token_id
from quantscale.errors import QuantscaleError


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids [1, L] of `prompt`, with the BOS token first where the tokenizer adds one."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = bos_token_id(tokenizer)
    if bos is not None:
        ids = [bos, *ids]
    if not ids:
        raise QuantscaleError(f"prompt {prompt!r} has no tokens")
    return torch.tensor([ids], dtype=torch.long)


@torch.inference_mode()
def generate_ids(
    model: nn.Module, ids: torch.Tensor, max_new_tokens: int = 64, use_cache: bool = True
) -> torch.Tensor:
    """The greedy continuation (token ids [1, <= max_new_tokens]; it stops at EOS) of ids."""
    if max_new_tokens < 1:
        raise QuantscaleError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    generate = getattr(model, "generate", None)
    if generate is None:
        raise QuantscaleError(f"{type(model).__name__} cannot generate (no .generate method)")
    device = next(model.parameters()).device
    ids = ids.to(device)
    config = getattr(model, "generation_config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(config, "eos_token_id", None)
    if isinstance(pad, list):
        pad = pad[0] if pad else None
    out = generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=pad,
    )
    return out[:, ids.shape[1] :].cpu()


def generate_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64) -> str:
    """The greedy continuation of `prompt`, decoded (generated with the model's cache)."""
    new = generate_ids(model, prompt_ids(tokenizer, prompt), max_new_tokens)
    return tokenizer.decode(new[0], skip_special_tokens=True)
