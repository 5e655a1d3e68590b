"""Dequantize an FP8 checkpoint (HF, compressed-tensors, ModelOpt or Neuron layout), streaming.

Every convention stores the same thing under a different name: the dequantization
multiplier, W = fp8.float() * scale per tile. Names by layout, for a module `<m>`:
HF `<m>.weight_scale_inv`, compressed-tensors / ModelOpt `<m>.weight_scale` (ModelOpt's
block scale is 4-D [out/bh, 1, in/bw, 1]; compressed-tensors may store it in bf16), Neuron
`<m>.scale`. None of them is a reciprocal. One input tensor and the outputs still being
written are in memory at a time.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import cast

import torch

from quantscale import progress
from quantscale.checkpoint.layouts import (
    ACTIVATION_SCALES,
    FP8_SCALES,
    NEURON_KEY,
    config_block,
    scale_name_for,
)
from quantscale.checkpoint.read import Checkpoint, TensorInfo
from quantscale.checkpoint.transform import TensorPlan, transform_checkpoint
from quantscale.errors import CheckpointError, QuantscaleError
from quantscale.formats.fp8 import DEFAULT_BLOCK, block_grid, dequantize_fp8_block
from quantscale.naming import module_path

DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    """`bf16`/`bfloat16`, `fp16`/`float16`, `fp32`/`float32` -> torch dtype."""
    aliases = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32"}
    key = aliases.get(name, name)
    if key not in DTYPE_NAMES:
        raise QuantscaleError(f"unknown dtype {name!r}; expected bf16, fp16 or fp32")
    return DTYPE_NAMES[key]


def as_block_scale(
    scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int] | None, where: str
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Bring any FP8 scale layout to a float32 [rows, cols] grid and the block it tiles.

    Accepts a per-tensor scalar, a per-channel [out, 1] column, a 2-D block grid and
    ModelOpt's 4-D [rows, 1, cols, 1]. `where` names the tensor in errors.
    """
    scale = scale.float()
    if scale.ndim == 4 and scale.shape[1] == 1 and scale.shape[3] == 1:
        scale = scale.reshape(scale.shape[0], scale.shape[2])
    if scale.numel() == 1:
        return scale.reshape(1, 1), shape
    if scale.ndim == 2 and tuple(scale.shape) == (shape[0], 1):
        return scale, (1, shape[1])
    if scale.ndim != 2:
        raise CheckpointError(f"{where}: scale of shape {tuple(scale.shape)} is not a block grid")
    if block:
        candidates = [block]
    else:  # undeclared: 128x128, else the power-of-two tile the grid implies
        implied = (-(-shape[0] // scale.shape[0]), -(-shape[1] // scale.shape[1]))
        pow2 = all(d & (d - 1) == 0 for d in implied)
        candidates = [DEFAULT_BLOCK, implied] if pow2 else [DEFAULT_BLOCK]
    for cand in candidates:
        if block_grid(shape, cand) == tuple(scale.shape):
            return scale, (cand[0], cand[1])
    raise CheckpointError(
        f"{where}: scale grid {tuple(scale.shape)} does not match weight {tuple(shape)} "
        f"with block {block or DEFAULT_BLOCK}: expected {block_grid(shape, block or DEFAULT_BLOCK)}"
    )


def dequantize_weight(
    q: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int] | None,
    dtype: torch.dtype,
    where: str,
) -> torch.Tensor:
    """fp8 weight x scale (any layout `as_block_scale` accepts) -> `dtype`."""
    grid, tile = as_block_scale(scale, cast(tuple[int, int], tuple(q.shape)), block, where)
    return dequantize_fp8_block(q, grid, tile, dtype)


def _plain_config(config: dict | None, dtype: torch.dtype) -> dict | None:
    """config.json without quantization_config (or Neuron's block), with the new dtype."""
    if config is None:
        return None
    config = copy.deepcopy(config)
    config.pop("quantization_config", None)
    config.pop(NEURON_KEY, None)
    name = str(dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = name
    return config


def fp8_weight_scales(ckpt: Checkpoint) -> dict[str, str]:
    """FP8 weight -> the name of its scale, for every FP8 `<m>.weight` of `ckpt`."""
    scales: dict[str, str] = {}
    for name, info in ckpt.tensors.items():
        if info.dtype.startswith("F8") and name.endswith(".weight"):
            scale = scale_name_for(ckpt.tensors, name)
            if scale is None:
                raise CheckpointError(
                    f"{ckpt.path / info.shard}: FP8 tensor {name!r} has no scale "
                    f"(looked for {', '.join(FP8_SCALES)} beside it)"
                )
            scales[name] = scale
    if not scales:
        raise QuantscaleError(f"{ckpt.path}: no FP8 weights to dequantize")
    return scales


def dequantize_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    dtype: torch.dtype | str = torch.bfloat16,
    overwrite: bool = False,
) -> Path:
    """Write a plain (unquantized) copy of FP8 checkpoint `src` to `out`; returns `out`.

    config.json loses `quantization_config` (and Neuron's block), so loaders read plain weights.
    """
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    ckpt = Checkpoint(src)
    block = config_block(ckpt.config)
    scales = fp8_weight_scales(ckpt)
    dropped = set(scales.values())
    for weight in scales:
        dropped.update(f"{module_path(weight)}.{s}" for s in ACTIVATION_SCALES)

    def tensor_fn(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if name in dropped:
            return {}
        if name not in scales:
            return {name: tensor}
        where = f"{ckpt.path / ckpt.tensors[name].shard}: tensor {name!r}"
        return {name: dequantize_weight(tensor, ckpt.get(scales[name]), block, dtype, where)}

    def plan_fn(name: str, info: TensorInfo) -> TensorPlan:
        if name in dropped:
            return TensorPlan(())
        if name not in scales:
            return TensorPlan.copy(name, info)
        return TensorPlan(((name, dtype, info.shape),))

    config = _plain_config(ckpt.config, dtype)
    return transform_checkpoint(
        ckpt, out, tensor_fn, config, overwrite, progress.track, plan_fn=plan_fn
    )
