"""The tiny random Llama that unit tests build from a config (one place for its settings)."""

from __future__ import annotations

import torch


def make_tiny_llama(
    vocab_size: int = 128,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    dtype: torch.dtype = torch.float32,
    **config,
):
    """A deterministic 2-layer LlamaForCausalLM (4 heads, 2 KV heads) in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    settings = {
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        **config,
    }
    llama = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        **settings,
    )
    return LlamaForCausalLM(llama).to(dtype).eval()
