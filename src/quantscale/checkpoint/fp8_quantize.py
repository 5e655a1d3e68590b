"""Quantize a bf16/fp16/fp32 checkpoint to HF fine-grained FP8 (block-wise E4M3), streaming.

Every 2-D `<m>.weight` of a module that is not ignored becomes `<m>.weight` (float8_e4m3fn)
plus `<m>.weight_scale_inv` (float32, the dequantization multiplier amax/448 per tile). The
rest is copied unchanged; config.json gains the `quantization_config` transformers reads.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch

from quantscale import progress
from quantscale.checkpoint.layouts import CT_SCALE, HF_SCALE, FP8Facts, hf_fp8_config, hf_scale_name
from quantscale.checkpoint.read import Checkpoint, TensorInfo
from quantscale.checkpoint.runtimes import merged_block_warnings
from quantscale.checkpoint.transform import ShardRunner, TensorPlan, transform_checkpoint
from quantscale.errors import QuantscaleError
from quantscale.formats.fp8 import DEFAULT_BLOCK, E4M3, block_grid
from quantscale.formats.fp8_fast import choose_backend, quantize_fp8_block_fast
from quantscale.naming import is_ignored, module_path

FLOAT_DTYPES = {"BF16", "F16", "F32"}
# tensor names that only a quantized checkpoint holds
QUANTIZED_SUFFIXES = (f".{HF_SCALE}", f".{CT_SCALE}")


def check_not_quantized(ckpt: Checkpoint) -> None:
    """Raise if `ckpt` already holds a quantization_config, FP8 tensors or weight scales."""
    qc = ckpt.quantization_config
    if qc:
        method = qc.get("quant_method", "?")
        raise QuantscaleError(
            f"{ckpt.path / 'config.json'}: already quantized (quant_method {method!r}); "
            "dequantize it first (`quantscale dequantize`)"
        )
    for name, info in ckpt.tensors.items():
        if info.dtype.startswith("F8") or name.endswith(QUANTIZED_SUFFIXES):
            raise QuantscaleError(
                f"{ckpt.path / info.shard}: tensor {name!r} ({info.dtype}) is already quantized; "
                "expected a bf16/fp16/fp32 checkpoint"
            )


def quantizable(info: TensorInfo, ignore: tuple[str, ...] | list[str] = ()) -> bool:
    """Whether a tensor is the 2-D float weight of a module that FP8 quantization converts."""
    if not info.name.endswith(".weight") or len(info.shape) != 2:
        return False
    return info.dtype in FLOAT_DTYPES and not is_ignored(module_path(info.name), tuple(ignore))


def unconverted_modules(ckpt: Checkpoint, ignore: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Module names of 2-D weights left unquantized (plus a tied, absent `lm_head`)."""
    modules = [
        module_path(i.name)
        for i in ckpt.tensors.values()
        if i.name.endswith(".weight") and len(i.shape) == 2 and not quantizable(i, ignore)
    ]
    config = ckpt.config or {}
    has_head = any(module_path(n).split(".")[-1] == "lm_head" for n in ckpt.tensors)
    if config.get("tie_word_embeddings") and not has_head:
        modules.append("lm_head")
    return sorted(set(modules))


def quantize_checkpoint_fp8(
    src: str | os.PathLike,
    out: str | os.PathLike,
    block: tuple[int, int] = DEFAULT_BLOCK,
    ignore: tuple[str, ...] | list[str] = (),
    scale_fmt: str | None = None,
    overwrite: bool = False,
    backend: str = "auto",
    runner: ShardRunner | None = None,
) -> Path | None:
    """Write an FP8 block-wise copy of checkpoint `src` to `out`; returns `out` (None: a
    `runner`'s other ranks still write shards)."""
    ckpt = Checkpoint(src)
    check_not_quantized(ckpt)
    if scale_fmt not in (None, "ue8m0"):
        raise QuantscaleError(f"unknown scale format {scale_fmt!r}; expected 'ue8m0' or none")
    block = (int(block[0]), int(block[1]))
    targets = {n for n, i in ckpt.tensors.items() if quantizable(i, ignore)}
    if not targets:
        raise QuantscaleError(f"{ckpt.path}: no 2-D weight left to quantize after ignores")
    merged_block_warnings({module_path(n): ckpt.tensors[n].shape[0] for n in targets}, block)
    if backend == "auto":
        total = sum(math.prod(ckpt.tensors[n].shape) for n in targets)
        backend = choose_backend(total)

    def rows_fn(name: str, band: torch.Tensor, first: int) -> dict[str, tuple]:
        q, scale = quantize_fp8_block_fast(band, block, scale_fmt, backend=backend)
        return {name: (q, first), hf_scale_name(name): (scale, first // block[0])}

    def plan_fn(name: str, info: TensorInfo) -> TensorPlan:
        if name not in targets:
            return TensorPlan.copy(name, info)
        outputs = (
            (name, E4M3, info.shape),
            (hf_scale_name(name), torch.float32, block_grid(info.shape, block)),
        )
        return TensorPlan(outputs, "rows", rows=block[0])

    config = copy.deepcopy(ckpt.config) if ckpt.config is not None else {}
    facts = FP8Facts(list(block), unconverted_modules(ckpt, ignore), scale_fmt)
    config["quantization_config"] = hf_fp8_config(facts)
    return transform_checkpoint(
        ckpt,
        out,
        None,
        config,
        overwrite,
        progress.track,
        plan_fn=plan_fn,
        rows_fn=rows_fn,
        runner=runner,
    )
