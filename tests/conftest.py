"""Shared fixtures: tiny random models built from configs (the real model lives in slow tests)."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import make_tiny_llama

os.environ.setdefault("QUANTSCALE_PROGRESS", "0")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def tiny_llama():
    """A 2-layer random LlamaForCausalLM (hidden 64), deterministic, in eval mode."""
    return make_tiny_llama()
