"""HF fine-grained FP8 (`quant_method: "fp8"`, DeepSeek-V3 layout) from a model quantized
with FP8 block weights (docs/formats.md, HF fine-grained FP8): `<m>.weight` float8_e4m3fn and
`<m>.weight_scale_inv` float32 [ceil(out/bh), ceil(in/bw)], the dequantization multiplier."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from quantscale.checkpoint.layouts import FP8Facts, hf_fp8_config, hf_scale_name
from quantscale.errors import QuantscaleError
from quantscale.export.base import model_config, plain_tensors, quantized_modules, write_checkpoint
from quantscale.runtime.qlinear import QuantLinear


def save_hf_fp8(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    recipe=None,
    overwrite: bool = False,
    source_dir: str | os.PathLike | None = None,
) -> Path:
    """Write an FP8-block-quantized model in transformers' fine-grained FP8 format."""
    mods = quantized_modules(model)
    blocks = {tuple(mc.args.block_structure or ()) for mc in mods.values()}
    kinds = {(mc.args.type, mc.args.num_bits, mc.args.strategy) for mc in mods.values()}
    if not mods or kinds != {("float", 8, "block")} or len(blocks) != 1:
        raise QuantscaleError(
            "--format hf holds FP8 block-quantized weights only (one block size); this model "
            f"has {sorted(kinds)}; use --format compressed-tensors"
        )
    tensors = plain_tensors(model, mods)
    for name, mc in mods.items():
        tensors[f"{name}.weight"] = mc.codes
        tensors[hf_scale_name(f"{name}.weight")] = mc.qparams.scale.float()
        if mc.module.bias is not None:
            tensors[f"{name}.bias"] = mc.module.bias.detach().cpu()
    ignore = [
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, QuantLinear)) and n and n not in mods
    ]
    config = model_config(model)
    config["quantization_config"] = hf_fp8_config(FP8Facts(list(blocks.pop()), ignore))
    return write_checkpoint(out, tensors, config, overwrite=overwrite, source_dir=source_dir)
