"""Quantized checkpoints (compressed-tensors, ModelOpt NVFP4, HF fine-grained FP8) loaded by our
own reader as QuantLinear models, so `eval` scores exactly what the file holds.

Each weight the file stores quantized is dequantized by `checkpoint.source` (the codes and
scales as written, whatever wrote them) into a QuantLinear whose scheme comes from the
checkpoint's config; its static activation qparams (`input_scale`, ...) are loaded as the
buffers the fake-quant model used, so activations are quantized the same way in the forward.
Transformers cannot run some of these layouts on a CPU (packed asymmetric int4, ragged groups,
FP8 blocks off its grid, ModelOpt without a GPU); this reader needs no runtime. The weights'
own qparams are not restored: such a model evaluates, it is not re-exported. A
`kv_cache_scheme` with `k_scale` / `v_scale` tensors quantizes keys and values as the FP8
cache would (runtime/kv_cache.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantscale.checkpoint.layouts import (
    CT_METHOD,
    HF_FP8_METHOD,
    MODELOPT_METHOD,
    MODELOPT_NVFP4,
    reciprocal,
)
from quantscale.checkpoint.source import TensorSource, open_source
from quantscale.errors import CheckpointError
from quantscale.models.loader import load_state_checked
from quantscale.models.moe import linearize_experts
from quantscale.naming import module_path
from quantscale.runtime.hadamard import add_online_hadamards
from quantscale.runtime.kv_cache import SCALES as KV_SCALES
from quantscale.runtime.kv_cache import load_kv_scales
from quantscale.runtime.qlinear import BUFFERS, QuantLinear
from quantscale.scheme import QuantScheme, Recipe, preset_scheme

# quant_method values this reader applies
READ_METHODS = (CT_METHOD, MODELOPT_METHOD, HF_FP8_METHOD)
_ACT_BUFFERS = tuple(b for b in BUFFERS if b.startswith(("input_", "output_")))


def checkpoint_recipe(qc: dict[str, Any], source: TensorSource) -> Recipe:
    """The recipe a quantization_config stands for (activations included)."""
    method = qc.get("quant_method")
    if method == CT_METHOD:
        return Recipe.from_quantization_config(qc)
    if method == MODELOPT_METHOD:
        name = "NVFP4" if qc.get("quant_algo") == MODELOPT_NVFP4 else "NVFP4A16"
        return Recipe(config_groups={"group_0": preset_scheme(name)}, ignore=[])
    if method == HF_FP8_METHOD:
        return Recipe(config_groups={"group_0": _hf_fp8_scheme(qc, source)}, ignore=[])
    raise CheckpointError(f"{source.path}: quant_method {method!r} is not read here")


def _hf_fp8_scheme(qc: dict[str, Any], source: TensorSource) -> QuantScheme:
    """FP8 block weights with dynamic 1x128 inputs (DeepSeek-V3); without a block, per-tensor
    weights with static inputs when the file has `input_scale`s, else dynamic per-token."""
    if qc.get("weight_block_size"):
        return preset_scheme("FP8_BLOCK")
    static = any(n.endswith(".input_scale") for n in source.checkpoint.tensors)
    return preset_scheme("FP8" if static else "FP8_DYNAMIC")


def load_quantized_checkpoint(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A quantized checkpoint as a transformers model whose quantized Linears are QuantLinears
    (weights dequantized to `dtype`, static activation scales loaded), in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    source = open_source(path)
    qc = source.checkpoint.quantization_config or {}
    recipe = checkpoint_recipe(qc, source)
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    linearize_experts(model)  # per-expert Linears, as the quantized checkpoint stores them
    quantized = {module_path(n) for n in source.names() if source.is_quantized(n)}
    _replace(model, recipe, quantized, path)
    add_online_hadamards(model, recipe)
    state = {n: source.get(n, dtype if source.is_quantized(n) else None) for n in source.names()}
    for module in quantized:
        state.update(_activation_qparams(source, module, qc.get("quant_method")))
    kv = {n: t for n, t in state.items() if n.rpartition(".")[2] in KV_SCALES}
    if recipe.kv_cache_scheme is not None:
        load_kv_scales(model, recipe.kv_cache_scheme, kv, str(path))
    load_state_checked(model, state, path, "the model of its config.json")
    model.quantscale_recipe = recipe
    return model.eval()


def _replace(model: nn.Module, recipe: Recipe, quantized: set[str], path: Path) -> None:
    """Swap each Linear whose weight the file stores quantized for a QuantLinear."""
    for name in sorted(quantized):
        linear = model.get_submodule(name) if _has(model, name) else None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(
                f"{path}: tensor {name}.weight is quantized but {name!r} is not a Linear "
                "of the model its config.json builds"
            )
        scheme = recipe.scheme_for(name, "Linear")
        if scheme is None:
            raise CheckpointError(
                f"{path}: tensor {name}.weight is stored quantized but quantization_config "
                f"gives module {name!r} no scheme (it is ignored or matches no target)"
            )
        model.set_submodule(name, QuantLinear.from_linear(linear, scheme))


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _activation_qparams(source: TensorSource, module: str, method: str | None) -> dict:
    """`module`'s static activation qparams as QuantLinear buffers (float32); ModelOpt's
    `input_scale` (amax / (6*448)) is the reciprocal of our input global scale."""
    out = {}
    tensors = source.checkpoint.tensors
    if method == MODELOPT_METHOD:
        stored = f"{module}.input_scale"
        if stored in tensors:
            out[f"{module}.input_global_scale"] = reciprocal(source.read(stored)).reshape(1)
        return out
    for buffer in _ACT_BUFFERS:
        stored = f"{module}.{buffer}"
        if stored in tensors:
            value = source.read(stored).float()
            out[stored] = value.reshape(value.shape or (1,))
    return out
