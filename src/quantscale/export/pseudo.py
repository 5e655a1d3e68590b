"""The pseudo-quantized layout of the seed document (docs/formats.md, pseudo-quantized).

- `pseudo_quantized_model-{bits}bit-{group}g.safetensors`: the whole model in float16, each
  quantized weight replaced by its dequantized value (so it loads as a plain fp16 model; a
  `model.safetensors.index.json` points transformers at it);
- `pseudo_quantized_model-{bits}bit-{group}g_scales.safetensors`: per quantized module
  `<m>.per_block_scale` (float32; for NVFP4 the E4M3 block scales), `<m>.scale_2` (float32
  scalar amax/(6*448), NVFP4 only), `<m>.zero_point` (asymmetric int only) and `<m>.g_idx`
  (int32 group of every input column: act-order's, or column // group_size);
- config.json (dtype float16, no quantization_config) and quantize_config.json (bits,
  group_size, desc_act, sym, quant_method, format, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from quantscale.checkpoint.layouts import PSEUDO, PSEUDO_FORMAT, QUANTIZE_CONFIG, reciprocal
from quantscale.checkpoint.write import CheckpointWriter
from quantscale.errors import QuantscaleError
from quantscale.export.base import (
    ModuleCodes,
    checkpoint_names,
    copy_side_files,
    model_config,
    per_column_qparams,
    plain_tensors,
    quantized_modules,
)
from quantscale.qdq import dequantize


def _group_label(mods: dict[str, ModuleCodes]) -> tuple[int, str]:
    args = {(mc.args.num_bits, mc.args.strategy, mc.args.group_size) for mc in mods.values()}
    if len(args) > 1:
        raise QuantscaleError(
            f"pseudo-quantized export needs one weight scheme for all modules, found {sorted(args)}"
        )
    bits, strategy, group = args.pop()
    return bits, f"{group}g" if group else str(strategy)


def file_stem(mods: dict[str, ModuleCodes]) -> str:
    """`pseudo_quantized_model-4bit-16g` for the modules' scheme."""
    bits, label = _group_label(mods)
    return f"pseudo_quantized_model-{bits}bit-{label}"


def dense_weight(mc: ModuleCodes, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The dequantized weight, computed in float32 from the codes, in `dtype`."""
    qp = per_column_qparams(mc.qparams, mc.g_idx) if mc.g_idx is not None else mc.qparams
    return dequantize(mc.codes, mc.args, qp).to(dtype)


def scale_tensors(mc: ModuleCodes) -> dict[str, torch.Tensor]:
    """per_block_scale, scale_2, zero_point, g_idx of one module (local names)."""
    qp, cols = mc.qparams, mc.codes.shape[1]
    out = {str(PSEUDO.weight_scale): qp.scale.float()}
    if qp.global_scale is not None:
        out[str(PSEUDO.global_scale)] = reciprocal(qp.global_scale.reshape(()))
    if qp.zero_point is not None:
        out["zero_point"] = qp.zero_point.to(torch.int8)
    if mc.g_idx is not None:
        out["g_idx"] = mc.g_idx.to(torch.int32)
    elif mc.args.group_size and mc.args.group_size > 0:
        out["g_idx"] = (torch.arange(cols) // mc.args.group_size).to(torch.int32)
    return out


def quantize_config(mods: dict[str, ModuleCodes], info: dict | None) -> dict:
    args = next(iter(mods.values())).args
    return {
        "bits": args.num_bits,
        "group_size": args.group_size if args.group_size else -1,
        "desc_act": any(mc.g_idx is not None for mc in mods.values()) or bool(args.actorder),
        "sym": args.symmetric,
        "format": "nvfp4" if args.is_nvfp4 else f"{args.type}{args.num_bits}",
        "strategy": args.strategy,
        "checkpoint_format": PSEUDO_FORMAT,
        "quant_method": "unknown",
        **(info or {}),
    }


def save_pseudo_quantized(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    recipe=None,
    overwrite: bool = False,
    source_dir: str | os.PathLike | None = None,
    quantize_info: dict | None = None,
) -> Path:
    """Write the fp16 pseudo-quantized model, its scales file and quantize_config.json.

    `quantize_info` (e.g. {"quant_method": "gptq", "damp_percent": 0.01}) joins
    quantize_config.json.
    """
    mods = quantized_modules(model)
    if not mods:
        raise QuantscaleError("the model has no quantized Linear modules to export")
    stem = file_stem(mods)
    tensors = {
        k: v.to(torch.float16) if v.is_floating_point() else v
        for k, v in plain_tensors(model, mods).items()
    }
    scales: dict[str, torch.Tensor] = {}
    for name, mc in mods.items():
        tensors[f"{name}.weight"] = dense_weight(mc)
        if mc.module.bias is not None:
            tensors[f"{name}.bias"] = mc.module.bias.detach().cpu().to(torch.float16)
        scales.update({f"{name}.{k}": v for k, v in scale_tensors(mc).items()})
    config = model_config(model, torch.float16)
    tensors, scales = checkpoint_names(tensors, config), checkpoint_names(scales, config)
    with CheckpointWriter(out, overwrite=overwrite) as writer:
        writer.write_shard(f"{stem}.safetensors", tensors)
        save_file(
            {k: v.contiguous() for k, v in scales.items()},
            str(writer.tmp / f"{stem}_scales.safetensors"),
        )
        writer.write_json("config.json", config)
        writer.write_json(QUANTIZE_CONFIG, quantize_config(mods, quantize_info))
        copy_side_files(source_dir, writer)
        return writer.commit(write_index=True)
