"""ModelOpt NVFP4 checkpoints (TensorRT-LLM, vLLM `modelopt_fp4`, SGLang), written and read.

Per quantized Linear `<m>` (docs/formats.md, ModelOpt): `weight` uint8 [out, in/2] (element 2k in
the low nibble), `weight_scale` float8_e4m3fn [out, in/16], `weight_scale_2` float32 scalar
= amax/(6*448) (the reciprocal of compressed-tensors' global scale), `input_scale` float32
scalar (amax/(6*448) of the input) when the input is NVFP4-quantized. Dequantization:
e2m1 * weight_scale * weight_scale_2.
hf_quant_config.json: {"producer", "quantization": {"quant_algo": "NVFP4" (W4A4) or
"W4A16_NVFP4" (weights only), "kv_cache_quant_algo": null, "group_size": 16,
"exclude_modules": [...]}}; config.json's quantization_config repeats it with
quant_method "modelopt" (without it loaders read the model as unquantized).
`modelopt_tensors` / `modelopt_config` are shared by `save_modelopt` and the streamed writer.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable
from pathlib import Path

import torch
from torch import nn

from quantscale.checkpoint.layouts import (
    HF_QUANT_CONFIG,
    MODELOPT_METHOD,
    MODELOPT_NVFP4,
    MODELOPT_W4A16,
    hf_quant_config,
    modelopt_quantization_config,
    reciprocal,
)
from quantscale.checkpoint.source import open_source, read_dense
from quantscale.errors import CheckpointError, QuantscaleError
from quantscale.export.base import (
    ModuleCodes,
    model_config,
    plain_tensors,
    quantized_modules,
    warn_unshared,
    write_checkpoint,
)
from quantscale.formats.fp4 import pack_fp4
from quantscale.formats.fp8 import E4M3
from quantscale.runtime.qlinear import QuantLinear, quant_linears


def _unquantized_linears(model: nn.Module, quantized: Collection[str]) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, QuantLinear)) and n and n not in quantized
    ]


def modelopt_tensors(
    mods: dict[str, ModuleCodes], tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`tensors` (the other tensors) plus every module's NVFP4 weight, scales and bias
    (refused for a module that is not NVFP4)."""
    for name, mc in mods.items():
        if not mc.args.is_nvfp4:
            raise QuantscaleError(
                f"{name}: ModelOpt export writes NVFP4 only; this module is "
                f"{mc.args.type}{mc.args.num_bits}/{mc.args.strategy} "
                "(use --format compressed-tensors)"
            )
        tensors[f"{name}.weight"] = pack_fp4(mc.codes)
        tensors[f"{name}.weight_scale"] = mc.qparams.scale.to(E4M3)
        gs = mc.qparams.global_scale
        assert gs is not None, "NVFP4 codes come with a global scale"
        tensors[f"{name}.weight_scale_2"] = reciprocal(gs.reshape(()))
        igs = mc.module._buffers.get("input_global_scale")
        if igs is not None:
            tensors[f"{name}.input_scale"] = reciprocal(igs.reshape(()))
        if mc.module.bias is not None:
            tensors[f"{name}.bias"] = mc.module.bias.detach().cpu()
    return tensors


def modelopt_config(model: nn.Module, with_inputs: bool) -> tuple[dict, dict]:
    """config.json and hf_quant_config.json (`with_inputs`: some tensor is an input_scale)."""
    quantized = {n for n, q in quant_linears(model).items() if q.scheme.weights is not None}
    algo = MODELOPT_NVFP4 if with_inputs else MODELOPT_W4A16
    hf_cfg = hf_quant_config(algo, _unquantized_linears(model, quantized))
    config = model_config(model)
    config["quantization_config"] = modelopt_quantization_config(hf_cfg)
    return config, hf_cfg


def has_input_scales(names: Iterable[str]) -> bool:
    """Whether a ModelOpt checkpoint with these tensor names quantizes inputs."""
    return any(n.endswith(".input_scale") for n in names)


def save_modelopt(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    recipe=None,
    overwrite: bool = False,
    source_dir: str | os.PathLike | None = None,
) -> Path:
    """Write an NVFP4-quantized model as a ModelOpt checkpoint (`recipe` is not needed)."""
    mods = quantized_modules(model)
    if not mods:
        raise QuantscaleError("the model has no quantized Linear modules to export")
    warn_unshared(mods)
    tensors = modelopt_tensors(mods, plain_tensors(model, mods))
    config, hf_cfg = modelopt_config(model, has_input_scales(tensors))
    return write_checkpoint(
        out,
        tensors,
        config,
        overwrite=overwrite,
        source_dir=source_dir,
        extra_json={HF_QUANT_CONFIG: hf_cfg},
    )


def read_modelopt(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Dense state dict of a ModelOpt NVFP4 checkpoint (weights dequantized to `dtype`,
    scale tensors dropped, everything else as stored)."""
    source = open_source(path)
    if (source.checkpoint.quantization_config or {}).get("quant_method") != MODELOPT_METHOD:
        raise CheckpointError(f"{source.path}: config.json quant_method is not 'modelopt'")
    return read_dense(source, dtype)
