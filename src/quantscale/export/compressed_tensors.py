"""compressed-tensors checkpoints (vLLM / SGLang / transformers), written and read back.

Per quantized Linear `<m>` (docs/formats.md, compressed-tensors):
- nvfp4-pack-quantized: `weight_packed` uint8 [out, in/2] (element 2k low nibble),
  `weight_scale` float8_e4m3fn [out, in/16], `weight_global_scale` float32 [1] (448*6/amax).
- mxfp4-pack-quantized: `weight_packed` as above, `weight_scale` uint8 E8M0 [out, in/32].
- pack-quantized (int1-8): `weight_packed` int32 [out, ceil(in*b/32)], `weight_scale`
  float32 [out, groups] or [out, 1], `weight_shape` int64 [2], `weight_zero_point` packed
  int32 along the output dim when asymmetric, `weight_g_idx` int32 [in] with act-order groups.
- float-quantized (FP8): `weight` float8_e4m3fn, `weight_scale` float32 ([1], [out, 1] or the
  block grid). int-quantized (INT8 with activations): `weight` int8, `weight_scale`.
Static activation qparams present on the module are written as `input_scale`,
`input_zero_point`, `input_global_scale` (and `output_*`). Scales are float32 unless the scheme
declares a `scale_dtype` (the quantizers round them to it first), always exactly the values the
fake-quantized model used, so reading a file back gives exactly the model's weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from quantscale.checkpoint.layouts import (
    CT_FLOAT,
    CT_INT,
    CT_METHOD,
    CT_MXFP4,
    CT_NVFP4,
    CT_PACKED,
    module_format,
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
from quantscale.formats.intq import pack_int32
from quantscale.formats.mxfp4 import mx_scale_to_exponent
from quantscale.scheme import Recipe, declared_scale_dtype

_ACT_FIELDS = ("scale", "zero_point", "global_scale")


def _check(mc: ModuleCodes, fmt: str) -> None:
    a = mc.args
    ok = {
        CT_NVFP4: a.is_nvfp4,
        CT_MXFP4: a.is_mx,
        CT_PACKED: a.type == "int" and a.num_bits <= 8,
        CT_FLOAT: a.type == "float" and a.num_bits == 8,
        CT_INT: a.type == "int" and a.num_bits <= 8,
    }[fmt]
    if not ok:
        raise QuantscaleError(
            f"{mc.name}: format {fmt!r} cannot hold {a.type}{a.num_bits} / {a.strategy} weights"
        )
    if a.superblock:
        raise QuantscaleError(
            f"{mc.name}: GGUF {a.kquant} weights (two-level superblock scales) are written by "
            "--format gguf only"
        )
    if mc.g_idx is not None and fmt != CT_PACKED:
        raise QuantscaleError(f"{mc.name}: act-order g_idx is only stored by {CT_PACKED!r}")


def weight_tensors(mc: ModuleCodes, fmt: str) -> dict[str, torch.Tensor]:
    """Local-name tensors of one module's weight in format `fmt`."""
    _check(mc, fmt)
    qp, codes = mc.qparams, mc.codes
    scale = qp.scale.float()
    if fmt == CT_NVFP4:
        assert qp.global_scale is not None, "NVFP4 codes come with a global scale"
        return {
            "weight_packed": pack_fp4(codes),
            "weight_scale": scale.to(E4M3),
            "weight_global_scale": qp.global_scale.float().reshape(1),
        }
    if fmt == CT_MXFP4:
        return {"weight_packed": pack_fp4(codes), "weight_scale": mx_scale_to_exponent(scale)}
    out = {"weight_scale": scale.to(declared_scale_dtype(mc.args) or torch.float32)}
    if fmt == CT_PACKED:
        out["weight_packed"] = pack_int32(codes, mc.args.num_bits)
        out["weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
        if qp.zero_point is not None:
            zp = qp.zero_point.to(torch.int8)
            out["weight_zero_point"] = pack_int32(zp, mc.args.num_bits, dim=0)
        if mc.g_idx is not None:
            out["weight_g_idx"] = mc.g_idx.to(torch.int32)
        return out
    out["weight"] = codes
    if qp.zero_point is not None:
        out["weight_zero_point"] = qp.zero_point.to(torch.int8)
    return out


def activation_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Static input / output qparams the module carries (float32)."""
    out = {}
    for role in ("input", "output"):
        for f in _ACT_FIELDS:
            t = module._buffers.get(f"{role}_{f}")
            if t is not None:
                out[f"{role}_{f}"] = t.detach().float().cpu()
    return out


def module_tensors(mc: ModuleCodes) -> dict[str, torch.Tensor]:
    """Full-name tensors of one quantized module: weight codes and scales, static activation
    qparams, bias (on the CPU, contiguous)."""
    fmt = module_format(mc.module.scheme)
    local = {**weight_tensors(mc, fmt), **activation_tensors(mc.module)}
    if mc.module.bias is not None:
        local["bias"] = mc.module.bias.detach()
    return {f"{mc.name}.{k}": v.cpu().contiguous() for k, v in local.items()}


def compressed_tensors(
    mods: dict[str, ModuleCodes], plain: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The tensors of a compressed-tensors checkpoint (or of one part of one): the `plain`
    ones and those of every quantized module."""
    tensors = dict(plain)
    for mc in mods.values():
        tensors.update(module_tensors(mc))
    return tensors


def quantization_config(model: nn.Module, recipe: Recipe | None = None) -> dict:
    """config.json `quantization_config` of the model's recipe (validated by compressed-tensors'
    own schema in the tests)."""
    recipe = recipe or getattr(model, "quantscale_recipe", None)
    if recipe is None:
        raise QuantscaleError(
            "compressed-tensors export needs the recipe the model was quantized with"
        )
    return recipe.to_quantization_config("compressed")


def save_compressed_tensors(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    recipe: Recipe | None = None,
    overwrite: bool = False,
    source_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a quantized model as a compressed-tensors checkpoint."""
    mods = quantized_modules(model)
    if not mods:
        raise QuantscaleError("the model has no quantized Linear modules to export")
    warn_unshared(mods)
    tensors = compressed_tensors(mods, plain_tensors(model, mods))
    config = model_config(model)
    config["quantization_config"] = quantization_config(model, recipe)
    return write_checkpoint(out, tensors, config, overwrite=overwrite, source_dir=source_dir)


# ------------------------------------------------------------------ reader


def read_compressed_tensors(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Dense state dict of a compressed-tensors checkpoint: quantized weights dequantized
    (to `dtype`), qparam tensors dropped, everything else as stored."""
    source = open_source(path)
    qc = source.checkpoint.quantization_config
    if not qc or qc.get("quant_method") != CT_METHOD:
        raise CheckpointError(
            f"{source.path}: config.json has no compressed-tensors quantization_config"
        )
    return read_dense(source, dtype)
