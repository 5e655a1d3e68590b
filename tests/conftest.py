"""Shared fixtures: tiny random models built from configs (the real model lives in slow tests)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("QUANTSCALE_PROGRESS", "0")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def tiny_llama():
    """A 2-layer random LlamaForCausalLM (hidden 64), deterministic, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()
