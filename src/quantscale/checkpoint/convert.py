"""Convert FP8 block checkpoints between HF, compressed-tensors and AWS Neuron conventions.

All three store the same numbers: fp8 weights and a float32 dequantization multiplier per
tile (W = fp8 * scale). Conversion renames tensors and rewrites config.json; it never takes a
reciprocal of a scale (`1/weight_scale_inv` would scale every weight by about (amax/448)^-2).
It streams: tensors whose bytes do not change are copied as raw bytes, a few MB at a time.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from quantscale import progress
from quantscale.checkpoint.dequantize import NEURON_KEY, config_block, scale_name_for
from quantscale.checkpoint.read import Checkpoint, TensorInfo
from quantscale.checkpoint.transform import TensorPlan, transform_checkpoint
from quantscale.errors import QuantscaleError
from quantscale.formats.fp8 import DEFAULT_BLOCK

FORMATS = ("hf", "compressed-tensors", "neuron")
SCALE_SUFFIX = {"hf": "weight_scale_inv", "compressed-tensors": "weight_scale", "neuron": "scale"}
NEURON_ATTN = {
    "q_proj": "qkv_proj.q_proj",
    "k_proj": "qkv_proj.k_proj",
    "v_proj": "qkv_proj.v_proj",
}
PREFIX = "model."

RULES = {
    "fp8 weight (<m>.weight, float8_e4m3fn)": "bytes copied unchanged",
    "block scale": (
        "renamed only, same float32 values: HF weight_scale_inv == compressed-tensors "
        "weight_scale == Neuron scale (all = tile amax/448, the dequant multiplier; "
        "no reciprocal); bf16 scales from compressed-tensors are widened to float32 exactly"
    ),
    "other tensors (embeddings, norms, router, lm_head)": "copied unchanged",
    "neuron names": (
        "leading 'model.' stripped; self_attn.{q,k,v}_proj -> self_attn.qkv_proj.{q,k,v}_proj; "
        "self_attn.o_proj -> self_attn.o_proj.o_proj (reversed by --to hf)"
    ),
    "config.json": (
        "hf: quantization_config quant_method 'fp8' (weight_block_size, modules_to_not_convert); "
        "compressed-tensors: quant_method 'compressed-tensors', format float-quantized, block "
        "weights, dynamic per-group-128 fp8 activations, ignore = unconverted modules; "
        "neuron: quantization_config replaced by a 'neuron_quantization' block holding the "
        "NeuronConfig settings (blockwise_symmetric, f8e4m3, block size, modules_to_not_convert)"
    ),
}


def detect_format(ckpt: Checkpoint) -> str:
    """Which FP8 convention a checkpoint uses: 'hf', 'compressed-tensors' or 'neuron'."""
    config = ckpt.config or {}
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method == "fp8":
        return "hf"
    if method == "compressed-tensors":
        return "compressed-tensors"
    if NEURON_KEY in config:
        return "neuron"
    raise QuantscaleError(
        f"{ckpt.path / 'config.json'}: not an FP8 block checkpoint this tool converts "
        f"(quant_method {method!r}; expected 'fp8', 'compressed-tensors' or a Neuron block)"
    )


def to_neuron_name(name: str, scale_from: str) -> str:
    """HF-style parameter name -> Neuron name (attention renames, no `model.` prefix)."""
    module, _, leaf = name.rpartition(".")
    if leaf == scale_from:
        leaf = "scale"
    parts = module.split(".")
    if len(parts) >= 2 and parts[-2] == "self_attn":
        if parts[-1] in NEURON_ATTN:
            parts[-1] = NEURON_ATTN[parts[-1]]
        elif parts[-1] == "o_proj":
            parts[-1] = "o_proj.o_proj"
    module = ".".join(parts)
    return f"{module}.{leaf}".removeprefix(PREFIX)


def from_neuron_name(name: str, scale_to: str, unprefixed: list[str]) -> str:
    """Neuron parameter name -> HF-style name; `unprefixed` top-level modules get no `model.`."""
    for short, long in NEURON_ATTN.items():
        name = name.replace(f"self_attn.{long}.", f"self_attn.{short}.")
    name = name.replace("self_attn.o_proj.o_proj.", "self_attn.o_proj.")
    module, _, leaf = name.rpartition(".")
    if leaf == "scale":
        leaf = scale_to
    name = f"{module}.{leaf}" if module else leaf
    return name if name.split(".")[0] in unprefixed else PREFIX + name


def _hf_fields(ckpt: Checkpoint, fmt: str) -> dict:
    """The format-neutral facts: block, modules left unquantized, scale_fmt."""
    config = ckpt.config or {}
    qc = config.get("quantization_config") or {}
    block = list(config_block(config) or DEFAULT_BLOCK)
    if fmt == "hf":
        return {
            "block": block,
            "ignore": list(qc.get("modules_to_not_convert") or []),
            "scale_fmt": qc.get("scale_fmt"),
        }
    if fmt == "compressed-tensors":
        return {"block": block, "ignore": list(qc.get("ignore") or []), "scale_fmt": None}
    neuron = config[NEURON_KEY]
    hf = neuron.get("hf_quantization_config") or {}
    return {
        "block": block,
        "ignore": list(
            hf.get("modules_to_not_convert") or neuron.get("modules_to_not_convert", [])
        ),
        "scale_fmt": hf.get("scale_fmt"),
    }


def hf_quantization_config(fields: dict) -> dict:
    """HF fine-grained FP8 quantization_config."""
    qc = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": fields["block"],
        "modules_to_not_convert": fields["ignore"],
    }
    if fields.get("scale_fmt"):
        qc["scale_fmt"] = fields["scale_fmt"]
    return qc


def ct_quantization_config(fields: dict) -> dict:
    """compressed-tensors quantization_config as llm-compressor's FP8_BLOCK preset saves it."""
    weights = {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "group_size": None,
        "strategy": "block",
        "block_structure": fields["block"],
        "dynamic": False,
    }
    activations = {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "group_size": 128,
        "strategy": "group",
        "dynamic": True,
    }
    group = {
        "targets": ["Linear"],
        "weights": weights,
        "input_activations": activations,
        "output_activations": None,
        "format": "float-quantized",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": fields["ignore"],
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }


def neuron_block(fields: dict, unprefixed: list[str]) -> dict:
    """Settings for NxD Inference's NeuronConfig, plus what --to hf needs to undo renames."""
    modules = [to_neuron_name(f"{m}.weight", "").rpartition(".")[0] for m in fields["ignore"]]
    return {
        "quantized": True,
        "quantization_dtype": "f8e4m3",
        "quantization_type": "blockwise_symmetric",
        "quantization_block_size": fields["block"],
        "modules_to_not_convert": modules,
        "unprefixed_modules": unprefixed,
        "hf_quantization_config": hf_quantization_config(fields),
    }


def _rename(name: str, is_scale: bool, src_fmt: str, to: str, unprefixed: list[str]) -> str:
    """Tensor name in `src_fmt` -> name in `to` (through HF names); scales get `to`'s suffix."""
    hf_scale = SCALE_SUFFIX["hf"]
    if src_fmt == "neuron":
        name = from_neuron_name(name, hf_scale if is_scale else "scale", unprefixed)
    elif is_scale:
        name = f"{name.rpartition('.')[0]}.{hf_scale}"
    if to == "neuron":
        return to_neuron_name(name, hf_scale)
    if is_scale:
        return f"{name.rpartition('.')[0]}.{SCALE_SUFFIX[to]}"
    return name


def convert_checkpoint(
    src: str | os.PathLike, out: str | os.PathLike, to: str, overwrite: bool = False
) -> Path:
    """Write checkpoint `src` in convention `to` ('hf', 'compressed-tensors', 'neuron')."""
    if to not in FORMATS:
        raise QuantscaleError(f"unknown target {to!r}; expected one of {', '.join(FORMATS)}")
    ckpt = Checkpoint(src)
    src_fmt = detect_format(ckpt)
    fields = _hf_fields(ckpt, src_fmt)
    config = copy.deepcopy(ckpt.config)
    neuron = config.pop(NEURON_KEY, None)
    unprefixed = (neuron or {}).get("unprefixed_modules")
    if unprefixed is None:
        tops = {n.split(".")[0] for n in ckpt.tensors}
        unprefixed = sorted(tops - {PREFIX.rstrip(".")})
    scales = {
        scale_name_for(ckpt, n) for n, i in ckpt.tensors.items() if i.dtype.startswith("F8")
    } - {None}

    def out_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
        """Scales widen to float32 (exactly) unless compressed-tensors keeps them as they are."""
        widen = name in scales and dtype != torch.float32 and to != "compressed-tensors"
        return torch.float32 if widen else dtype

    def tensor_fn(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        tensor = tensor.to(out_dtype(name, tensor.dtype))
        return {_rename(name, name in scales, src_fmt, to, unprefixed): tensor}

    def plan_fn(name: str, info: TensorInfo) -> TensorPlan:
        """Raw byte copies under the new name, except scales that widen to float32."""
        new = _rename(name, name in scales, src_fmt, to, unprefixed)
        dtype = out_dtype(name, info.torch_dtype)
        if dtype == info.torch_dtype:
            return TensorPlan.copy(new, info)
        return TensorPlan(((new, dtype, info.shape),))

    config.pop("quantization_config", None)
    if to == "hf":
        config["quantization_config"] = hf_quantization_config(fields)
    elif to == "compressed-tensors":
        config["quantization_config"] = ct_quantization_config(fields)
    else:
        config[NEURON_KEY] = neuron_block(fields, unprefixed)
    return transform_checkpoint(
        ckpt, out, tensor_fn, config, overwrite, progress.track, plan_fn=plan_fn
    )


def explain(to: str) -> str:
    """The rule applied to each tensor kind, as printable text."""
    lines = [f"convert --to {to}: rules by tensor kind"]
    lines += [f"  {kind}: {rule}" for kind, rule in RULES.items()]
    lines.append(f"  scale name written: <module>.{SCALE_SUFFIX[to]}")
    return "\n".join(lines)
