"""HF fine-grained FP8 (`quant_method: "fp8"`, DeepSeek-V3 layout) from a model quantized
with FP8 block weights (docs/formats.md, HF fine-grained FP8): `<m>.weight` float8_e4m3fn and
`<m>.weight_scale_inv` float32 [ceil(out/bh), ceil(in/bw)], the dequantization multiplier.

`hf_fp8_tensors` (the tensors of some modules) and `hf_fp8_model_config` (config.json, from the
schemes alone) are shared by `save_hf_fp8` and the streamed writer (export/stream.py)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from quantscale.checkpoint.layouts import FP8Facts, hf_fp8_config, hf_scale_name
from quantscale.errors import QuantscaleError
from quantscale.export.base import (
    ModuleCodes,
    model_config,
    plain_tensors,
    quantized_modules,
    write_checkpoint,
)
from quantscale.runtime.qlinear import QuantLinear, quant_linears


def _block(model: nn.Module) -> list[int]:
    """The one FP8 block size of the model's quantized Linears (else a clear error)."""
    args = [q.scheme.weights for q in quant_linears(model).values() if q.scheme.weights]
    blocks = {tuple(a.block_structure or ()) for a in args}
    kinds = {(a.type, a.num_bits, a.strategy) for a in args}
    if not args or kinds != {("float", 8, "block")} or len(blocks) != 1:
        raise QuantscaleError(
            "--format hf holds FP8 block-quantized weights only (one block size); this model "
            f"has {sorted(kinds)}; use --format compressed-tensors"
        )
    return list(blocks.pop())


def hf_fp8_tensors(
    mods: dict[str, ModuleCodes], tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`tensors` (the other tensors) plus every module's FP8 weight, scale and bias."""
    for name, mc in mods.items():
        tensors[f"{name}.weight"] = mc.codes
        tensors[hf_scale_name(f"{name}.weight")] = mc.qparams.scale.float()
        if mc.module.bias is not None:
            tensors[f"{name}.bias"] = mc.module.bias.detach().cpu()
    return tensors


def hf_fp8_model_config(model: nn.Module) -> dict:
    """config.json of the FP8-block model (block size and unquantized Linears from the
    schemes; the weights need not be loaded)."""
    block = _block(model)
    quantized = {n for n, q in quant_linears(model).items() if q.scheme.weights is not None}
    ignore = [
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, QuantLinear)) and n and n not in quantized
    ]
    config = model_config(model)
    config["quantization_config"] = hf_fp8_config(FP8Facts(block, ignore))
    return config


def save_hf_fp8(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    recipe=None,
    overwrite: bool = False,
    source_dir: str | os.PathLike | None = None,
) -> Path:
    """Write an FP8-block-quantized model in transformers' fine-grained FP8 format."""
    config = hf_fp8_model_config(model)
    mods = quantized_modules(model)
    tensors = hf_fp8_tensors(mods, plain_tensors(model, mods))
    return write_checkpoint(out, tensors, config, overwrite=overwrite, source_dir=source_dir)
