"""Which tensors of an FP8 block checkpoint a given runtime will refuse or load wrongly.

Rules come from running the runtime here, and each is pinned by a test
(tests/test_transformers_fp8.py):
- transformers FineGrainedFP8 (checked on 5.24.0; 5.17 reported the same error) derives the
  block size of each weight as shape // scale grid instead of reading weight_block_size. A
  dimension not divisible by its grid raises `Weight shape (r, c) not divisible by scale
  grid (gr, gc)` at load; one that divides but gives another block (1000 rows, 8 tiles ->
  125) loads without complaint and dequantizes with the wrong tiles.
- compressed-tensors (checked on 0.20 under transformers 5.24) loads a group-quantized weight
  whose in_features is not a multiple of its group size (SmolLM2's 576 with group 128) but
  raises `tensor column shape must be divisble by the given group_size` when it decompresses
  it (the first forward), so such a checkpoint cannot run there
  (tests/test_loader.py::test_compressed_tensors_ragged_groups_are_refused).
"""

from __future__ import annotations

from typing import NamedTuple

from quantscale.checkpoint.layouts import (
    CT_METHOD,
    HF_FP8_METHOD,
    config_block,
    scale_name_for,
)
from quantscale.checkpoint.read import Checkpoint
from quantscale.formats.fp8 import DEFAULT_BLOCK

TRANSFORMERS = "transformers (FineGrainedFP8)"
TRANSFORMERS_VERSIONS = "5.17-5.24"
CT_RUNTIME = "transformers (compressed-tensors)"
CT_VERSIONS = "0.20"


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
    if qc.get("quant_method") == CT_METHOD:
        return ct_group_refusals(ckpt, qc)
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


def ct_group_sizes(qc: dict) -> set[int]:
    """The group sizes of a compressed-tensors config's group-strategy weight schemes."""
    sizes = set()
    for group in (qc.get("config_groups") or {}).values():
        weights = group.get("weights") or {} if isinstance(group, dict) else {}
        if weights.get("strategy") in ("group", "tensor_group") and weights.get("group_size"):
            sizes.add(int(weights["group_size"]))
    return sizes


def ct_group_refusals(ckpt: Checkpoint, qc: dict) -> list[Refusal]:
    """Group-quantized compressed-tensors weights whose in_features their group does not divide."""
    sizes = ct_group_sizes(qc)
    found = []
    for name in sorted(n for n in ckpt.tensors if n.endswith(".weight_shape")):
        module = name[: -len(".weight_shape")]
        scale = ckpt.tensors.get(f"{module}.weight_scale")
        if scale is None or len(scale.shape) != 2 or not sizes:
            continue
        cols = int(ckpt.get(name).flatten()[-1])
        for g in sizes:
            if -(-cols // g) == scale.shape[1] and cols % g:
                reason = (
                    f"fails at the first forward: tensor column shape must be divisble by the "
                    f"given group_size {g} but got {cols} (in_features not a multiple of the "
                    "group); re-export with a group size dividing in_features or ignore those "
                    "modules"
                )
                found.append(Refusal(f"{module}.weight_packed", CT_RUNTIME, CT_VERSIONS, reason))
    return found
