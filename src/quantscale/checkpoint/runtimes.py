"""Which tensors of an FP8 block checkpoint a given runtime will refuse or load wrongly.

Rules come from running the runtime here, and each is pinned by a test
(tests/test_transformers_fp8.py):
- transformers FineGrainedFP8 (checked on 5.24.0; 5.17 reported the same error) derives the
  block size of each weight as shape // scale grid instead of reading weight_block_size. A
  dimension not divisible by its grid raises `Weight shape (r, c) not divisible by scale
  grid (gr, gc)` at load; one that divides but gives another block (1000 rows, 8 tiles ->
  125) loads without complaint and dequantizes with the wrong tiles.
"""

from __future__ import annotations

from typing import NamedTuple

from quantscale.checkpoint.layouts import HF_FP8_METHOD, config_block, scale_name_for
from quantscale.checkpoint.read import Checkpoint
from quantscale.formats.fp8 import DEFAULT_BLOCK

TRANSFORMERS = "transformers (FineGrainedFP8)"
TRANSFORMERS_VERSIONS = "5.17-5.24"


class Refusal(NamedTuple):
    tensor: str
    runtime: str
    version: str
    reason: str


def transformers_block_rule(
    shape: tuple[int, int], grid: tuple[int, int], block: tuple[int, int]
) -> str | None:
    """Why transformers mishandles a weight of `shape` with scale `grid`, or None if it is fine."""
    rows, cols = shape
    if rows % grid[0] or cols % grid[1]:
        return (
            f"refuses to load: Weight shape ({rows}, {cols}) not divisible by scale grid "
            f"({grid[0]}, {grid[1]})"
        )
    derived = (rows // grid[0], cols // grid[1])
    if derived != tuple(block):
        return (
            f"loads without error but dequantizes with {derived[0]}x{derived[1]} tiles instead "
            f"of {block[0]}x{block[1]}: silently wrong weights"
        )
    return None


def runtime_refusals(checkpoint: Checkpoint | str) -> list[Refusal]:
    """(tensor, runtime, version, reason) for every FP8 weight a known runtime mishandles."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    qc = ckpt.quantization_config or {}
    if qc.get("quant_method") != HF_FP8_METHOD:
        return []
    block = config_block(ckpt.config) or DEFAULT_BLOCK
    found = []
    for name, info in ckpt.tensors.items():
        scale = scale_name_for(ckpt.tensors, name) if info.dtype.startswith("F8") else None
        if scale is None or len(info.shape) != 2:
            continue
        grid = ckpt.tensors[scale].shape
        if len(grid) != 2:
            continue
        reason = transformers_block_rule(info.shape, grid, block)
        if reason:
            found.append(Refusal(name, TRANSFORMERS, TRANSFORMERS_VERSIONS, reason))
    return found
