"""The on-disk checkpoint layouts quantscale reads and writes, in one registry.

Each `Layout` says how a checkpoint in it is recognised (config.json, side files) and what
its per-module tensors are called: the stored weight, its scale, the per-tensor (global)
scale and the activation scales. `detect_layout` answers "which layout is this?" for inspect,
validate, dequantize, convert and the exporters; `config_block` is the one parser of a
declared block size; the FP8 conventions' quantization configs are built here, from
format-neutral `FP8Facts`, by the converter and the exporters alike. Tensor names, dtypes
and scale conventions of every layout are described in docs/formats.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Container
from dataclasses import dataclass
from pathlib import Path

import torch

from quantscale.checkpoint.read import Checkpoint
from quantscale.errors import QuantscaleError
from quantscale.formats.fp4 import NVFP4_GROUP
from quantscale.formats.fp8 import DEFAULT_BLOCK
from quantscale.naming import module_path
from quantscale.scheme import QuantScheme
from quantscale.version import __version__

# config.json keys, quant_method values and side files
HF_FP8_METHOD = "fp8"
CT_METHOD = "compressed-tensors"
MODELOPT_METHOD = "modelopt"
QUAMBA_METHOD = "quamba"  # Quamba INT8 Mamba checkpoints (mamba/quantize.py)
NEURON_KEY = "neuron_quantization"  # AWS Neuron: replaces quantization_config
FAKE_QUANT_KEY, FAKE_QUANT_FORMAT = "quantscale", "fake-quant"  # our fake-quantized save
HF_QUANT_CONFIG = "hf_quant_config.json"  # ModelOpt's side file
QUANTIZE_CONFIG = "quantize_config.json"  # the pseudo-quantized layout's side file
PSEUDO_FORMAT = "pseudo_quantized"  # its checkpoint_format
# compressed-tensors formats (config groups' "format")
CT_NVFP4, CT_MXFP4 = "nvfp4-pack-quantized", "mxfp4-pack-quantized"
CT_PACKED, CT_FLOAT, CT_INT = "pack-quantized", "float-quantized", "int-quantized"
CT_FORMATS = (CT_NVFP4, CT_MXFP4, CT_PACKED, CT_FLOAT, CT_INT)
# ModelOpt quant_algo values
MODELOPT_NVFP4, MODELOPT_W4A16, MODELOPT_FP8 = "NVFP4", "W4A16_NVFP4", "FP8"
# static activation scales any FP8 layout may carry beside a weight
ACTIVATION_SCALES = ("input_scale", "activation_scale")
# an FP8 weight's scale (the dequantization multiplier) by convention
HF_SCALE, CT_SCALE, NEURON_SCALE = "weight_scale_inv", "weight_scale", "scale"


@dataclass(frozen=True)
class Layout:
    """One on-disk convention: how to recognise it and what its module tensors are called
    (local names; None where the layout has no such tensor)."""

    name: str
    convention: str  # whose convention: hf, compressed-tensors, modelopt, neuron, pseudo...
    number_format: str  # fp8, int, nvfp4, mxfp4, dense (weights stored dequantized)
    detect: Callable[[Checkpoint], bool]
    weight: str = "weight"
    weight_scale: str | None = None
    global_scale: str | None = None
    input_scale: str | None = None
    input_global_scale: str | None = None
    # FP8 block conventions the converter rewrites: config.json -> neutral facts, and
    # facts (+ Neuron's unprefixed top-level modules) -> (config.json key, its value)
    fp8_facts: Callable[[dict], FP8Facts] | None = None
    fp8_config: Callable[[FP8Facts, list[str]], tuple[str, dict]] | None = None


def _read_json(path: Path) -> dict | None:
    """A side file's JSON object, None when absent or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _qc(ckpt: Checkpoint) -> dict:
    qc = ckpt.quantization_config
    return qc if isinstance(qc, dict) else {}


def modelopt_algo(ckpt: Checkpoint) -> str | None:
    """ModelOpt's quant_algo (config.json, else hf_quant_config.json); None: not ModelOpt."""
    qc = _qc(ckpt)
    side = ckpt.path / HF_QUANT_CONFIG
    if qc.get("quant_method") != MODELOPT_METHOD and not side.exists():
        return None
    if qc.get("quant_algo"):
        return qc["quant_algo"]
    quantization = (_read_json(side) or {}).get("quantization")
    return quantization.get("quant_algo") if isinstance(quantization, dict) else None


def ct_formats(ckpt: Checkpoint) -> set[str]:
    """compressed-tensors formats the config names (top level and per group); empty when
    the checkpoint is not compressed-tensors."""
    qc = _qc(ckpt)
    if qc.get("quant_method") != CT_METHOD:
        return set()
    found = [qc.get("format")] + [g.get("format") for g in _groups(qc)]
    return {f for f in found if isinstance(f, str)}


def _is_fake_quant(ckpt: Checkpoint) -> bool:
    meta = (ckpt.config or {}).get(FAKE_QUANT_KEY)
    return isinstance(meta, dict) and meta.get("format") == FAKE_QUANT_FORMAT


def _is_pseudo(ckpt: Checkpoint) -> bool:
    side = _read_json(ckpt.path / QUANTIZE_CONFIG) or {}
    return side.get("checkpoint_format") == PSEUDO_FORMAT


def _is_quamba(ckpt: Checkpoint) -> bool:
    return _qc(ckpt).get("quant_method") == QUAMBA_METHOD


def _is_ct(ckpt: Checkpoint) -> bool:
    return _qc(ckpt).get("quant_method") == CT_METHOD


def _is_ct_int(ckpt: Checkpoint) -> bool:
    formats = ct_formats(ckpt)
    return bool(formats & {CT_PACKED, CT_INT}) and CT_FLOAT not in formats


def module_format(scheme: QuantScheme) -> str:
    """The compressed-tensors format of one scheme (declared, else inferred)."""
    w = scheme.weights
    if w is None:
        raise QuantscaleError("a scheme without weights has no compressed-tensors format")
    if scheme.format in CT_FORMATS:
        return scheme.format
    if w.is_nvfp4:
        return CT_NVFP4
    if w.is_mx:
        return CT_MXFP4
    if w.type == "float":
        return CT_FLOAT
    act = scheme.input_activations
    return CT_INT if act is not None and w.num_bits == 8 else CT_PACKED


# ------------------------------------------------------------------ block sizes


def parse_block(raw: object) -> tuple[int, int] | None:
    """A block size as configs spell it: two positive ints ([128, 128]); else None."""
    if not isinstance(raw, (list, tuple)) or len(raw) != 2:
        return None
    if not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in raw):
        return None
    return raw[0], raw[1]


def config_block(config: dict | None) -> tuple[int, int] | None:
    """The block size a config declares in any FP8 layout (HF `weight_block_size`,
    compressed-tensors `block_structure`, Neuron `quantization_block_size`), or None."""
    config = config or {}
    qc = config.get("quantization_config") or {}
    found = [qc.get("weight_block_size")]
    found += [(g.get("weights") or {}).get("block_structure") for g in _groups(qc)]
    found.append((config.get(NEURON_KEY) or {}).get("quantization_block_size"))
    return next((b for raw in found if (b := parse_block(raw)) is not None), None)


def _groups(qc: dict) -> list[dict]:
    groups = qc.get("config_groups") or {}
    return [g for g in groups.values() if isinstance(g, dict)]


# ------------------------------------------------------------------ FP8 configs


@dataclass(frozen=True)
class FP8Facts:
    """What every FP8 block convention's config says, in neutral form."""

    block: list[int]
    ignore: list[str]
    scale_fmt: str | None = None


def hf_fp8_config(facts: FP8Facts) -> dict:
    """HF fine-grained FP8 quantization_config (what transformers' FineGrainedFP8 reads)."""
    qc: dict = {
        "quant_method": HF_FP8_METHOD,
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [int(b) for b in facts.block],
        "modules_to_not_convert": facts.ignore,
    }
    if facts.scale_fmt:
        qc["scale_fmt"] = facts.scale_fmt
    return qc


def ct_fp8_block_config(facts: FP8Facts) -> dict:
    """compressed-tensors quantization_config as llm-compressor's FP8_BLOCK preset saves it."""
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True}
    weights = {
        **fp8,
        "group_size": None,
        "strategy": "block",
        "block_structure": facts.block,
        "dynamic": False,
    }
    activations = {**fp8, "group_size": 128, "strategy": "group", "dynamic": True}
    group = {
        "targets": ["Linear"],
        "weights": weights,
        "input_activations": activations,
        "output_activations": None,
        "format": CT_FLOAT,
    }
    return {
        "quant_method": CT_METHOD,
        "format": CT_FLOAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": facts.ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }


# ------------------------------------------------------------------ Neuron names

NEURON_ATTN = {
    "q_proj": "qkv_proj.q_proj",
    "k_proj": "qkv_proj.k_proj",
    "v_proj": "qkv_proj.v_proj",
}
NEURON_PREFIX = "model."


def to_neuron_name(name: str, scale_from: str) -> str:
    """HF-style parameter name -> Neuron name (attention renames, no `model.` prefix)."""
    module, _, leaf = name.rpartition(".")
    if leaf == scale_from:
        leaf = NEURON_SCALE
    parts = module.split(".")
    if len(parts) >= 2 and parts[-2] == "self_attn":
        if parts[-1] in NEURON_ATTN:
            parts[-1] = NEURON_ATTN[parts[-1]]
        elif parts[-1] == "o_proj":
            parts[-1] = "o_proj.o_proj"
    module = ".".join(parts)
    return f"{module}.{leaf}".removeprefix(NEURON_PREFIX)


def from_neuron_name(name: str, scale_to: str, unprefixed: list[str]) -> str:
    """Neuron parameter name -> HF-style name; `unprefixed` top-level modules get no `model.`."""
    for short, long in NEURON_ATTN.items():
        name = name.replace(f"self_attn.{long}.", f"self_attn.{short}.")
    name = name.replace("self_attn.o_proj.o_proj.", "self_attn.o_proj.")
    module, _, leaf = name.rpartition(".")
    if leaf == NEURON_SCALE:
        leaf = scale_to
    name = f"{module}.{leaf}" if module else leaf
    return name if name.split(".")[0] in unprefixed else NEURON_PREFIX + name


def neuron_block(facts: FP8Facts, unprefixed: list[str]) -> dict:
    """Settings for NxD Inference's NeuronConfig (the field names its loader reads:
    `quantized`, `quantization_type`, `quantization_dtype`, `modules_to_not_convert`,
    `quantized_mlp_kernel_enabled`, `kv_cache_quant`, `activation_quantization_type`), plus
    what --to hf needs to undo renames."""
    modules = [to_neuron_name(f"{m}.weight", "").rpartition(".")[0] for m in facts.ignore]
    return {
        "quantized": True,
        "quantization_dtype": "f8e4m3",
        "quantization_type": "blockwise_symmetric",
        "quantization_block_size": facts.block,
        "quantized_mlp_kernel_enabled": True,  # the MLP kernel reads fp8 weight + .scale
        "kv_cache_quant": False,
        "activation_quantization_type": None,  # weights only: activations stay bf16
        "modules_to_not_convert": modules,
        "unprefixed_modules": unprefixed,
        "hf_quantization_config": hf_fp8_config(facts),
    }


def _block(config: dict) -> list[int]:
    return list(config_block(config) or DEFAULT_BLOCK)


def hf_fp8_facts(config: dict) -> FP8Facts:
    """HF: modules_to_not_convert and scale_fmt from quantization_config."""
    qc = config.get("quantization_config") or {}
    ignore = list(qc.get("modules_to_not_convert") or [])
    return FP8Facts(_block(config), ignore, qc.get("scale_fmt"))


def ct_fp8_facts(config: dict) -> FP8Facts:
    """compressed-tensors: its ignore list (no scale_fmt)."""
    qc = config.get("quantization_config") or {}
    return FP8Facts(_block(config), list(qc.get("ignore") or []))


def neuron_fp8_facts(config: dict) -> FP8Facts:
    """Neuron: the HF config it keeps, else its own modules_to_not_convert."""
    neuron = config[NEURON_KEY]
    hf = neuron.get("hf_quantization_config") or {}
    ignore = hf.get("modules_to_not_convert") or neuron.get("modules_to_not_convert", [])
    return FP8Facts(_block(config), list(ignore), hf.get("scale_fmt"))


def _hf_entry(facts: FP8Facts, unprefixed: list[str]) -> tuple[str, dict]:
    return "quantization_config", hf_fp8_config(facts)


def _ct_entry(facts: FP8Facts, unprefixed: list[str]) -> tuple[str, dict]:
    return "quantization_config", ct_fp8_block_config(facts)


def _neuron_entry(facts: FP8Facts, unprefixed: list[str]) -> tuple[str, dict]:
    return NEURON_KEY, neuron_block(facts, unprefixed)


# ------------------------------------------------------------------ ModelOpt configs


def reciprocal(x: torch.Tensor) -> torch.Tensor:
    """1/x in float32 (IEEE division, correctly rounded): ModelOpt's per-tensor scale from
    compressed-tensors' global scale and back."""
    return torch.ones((), dtype=torch.float32) / x.float()


def hf_quant_config(quant_algo: str, exclude: list[str]) -> dict:
    """The hf_quant_config.json ModelOpt writes beside an NVFP4 checkpoint."""
    return {
        "producer": {"name": "quantscale", "version": __version__},
        "quantization": {
            "quant_algo": quant_algo,
            "kv_cache_quant_algo": None,
            "group_size": NVFP4_GROUP,
            "exclude_modules": exclude,
        },
    }


def modelopt_quantization_config(hf_cfg: dict) -> dict:
    """config.json quantization_config for an hf_quant_config (quant_method 'modelopt')."""
    q = hf_cfg["quantization"]
    return {
        "quant_method": MODELOPT_METHOD,
        "quant_algo": q["quant_algo"],
        "kv_cache_quant_algo": q.get("kv_cache_quant_algo"),
        "group_size": q.get("group_size", NVFP4_GROUP),
        "exclude_modules": list(q.get("exclude_modules") or []),
        "producer": hf_cfg.get("producer"),
    }


# ------------------------------------------------------------------ the registry

FAKE_QUANT = Layout(
    "fake-quant",
    "fake-quant",
    "dense",
    _is_fake_quant,
    weight_scale="weight_scale",
    global_scale="weight_global_scale",
    input_scale="input_scale",
    input_global_scale="input_global_scale",
)
QUAMBA = Layout("quamba", QUAMBA_METHOD, "int", _is_quamba)
PSEUDO = Layout(
    "pseudo", "pseudo", "dense", _is_pseudo, weight_scale="per_block_scale", global_scale="scale_2"
)
MODELOPT_NVFP4_LAYOUT = Layout(
    "modelopt-nvfp4",
    MODELOPT_METHOD,
    "nvfp4",
    lambda c: modelopt_algo(c) in (MODELOPT_NVFP4, MODELOPT_W4A16),
    weight_scale="weight_scale",
    global_scale="weight_scale_2",
    input_global_scale="input_scale",
)
MODELOPT_FP8_LAYOUT = Layout(
    "modelopt-fp8",
    MODELOPT_METHOD,
    "fp8",
    lambda c: modelopt_algo(c) == MODELOPT_FP8,
    weight_scale="weight_scale",
    input_scale="input_scale",
)
HF_FP8 = Layout(
    "hf-fp8",
    "hf",
    "fp8",
    lambda c: _qc(c).get("quant_method") == HF_FP8_METHOD,
    weight_scale=HF_SCALE,
    input_scale="activation_scale",
    fp8_facts=hf_fp8_facts,
    fp8_config=_hf_entry,
)
CT_NVFP4_LAYOUT = Layout(
    "ct-nvfp4",
    CT_METHOD,
    "nvfp4",
    lambda c: CT_NVFP4 in ct_formats(c),
    weight="weight_packed",
    weight_scale="weight_scale",
    global_scale="weight_global_scale",
    input_global_scale="input_global_scale",
)
CT_MXFP4_LAYOUT = Layout(
    "ct-mxfp4",
    CT_METHOD,
    "mxfp4",
    lambda c: CT_MXFP4 in ct_formats(c),
    weight="weight_packed",
    weight_scale="weight_scale",
)
CT_INT_LAYOUT = Layout(
    "ct-int", CT_METHOD, "int", _is_ct_int, weight="weight_packed", weight_scale="weight_scale"
)
CT_FP8_LAYOUT = Layout(
    "ct-fp8",
    CT_METHOD,
    "fp8",
    _is_ct,
    weight_scale=CT_SCALE,
    input_scale="input_scale",
    fp8_facts=ct_fp8_facts,
    fp8_config=_ct_entry,
)
NEURON_FP8 = Layout(
    "neuron-fp8",
    "neuron",
    "fp8",
    lambda c: NEURON_KEY in (c.config or {}),
    weight_scale=NEURON_SCALE,
    fp8_facts=neuron_fp8_facts,
    fp8_config=_neuron_entry,
)

# detection order: the first layout whose `detect` says yes is the checkpoint's
LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        FAKE_QUANT,
        QUAMBA,
        PSEUDO,
        MODELOPT_NVFP4_LAYOUT,
        MODELOPT_FP8_LAYOUT,
        HF_FP8,
        CT_NVFP4_LAYOUT,
        CT_MXFP4_LAYOUT,
        CT_INT_LAYOUT,
        CT_FP8_LAYOUT,
        NEURON_FP8,
    )
}
# The FP8 block conventions `convert` rewrites into one another, by target name.
FP8_CONVENTIONS: dict[str, Layout] = {"hf": HF_FP8, CT_METHOD: CT_FP8_LAYOUT, "neuron": NEURON_FP8}
# The NVFP4 conventions `convert` rewrites into one another, by target name.
NVFP4_CONVENTIONS: dict[str, Layout] = {
    CT_METHOD: CT_NVFP4_LAYOUT,
    MODELOPT_METHOD: MODELOPT_NVFP4_LAYOUT,
}
# Where an FP8 weight's scale may be, looked up in this order (HF, compressed-tensors, Neuron).
FP8_SCALES = (HF_SCALE, CT_SCALE, NEURON_SCALE)


def detect_layout(ckpt: Checkpoint) -> Layout | None:
    """The layout of `ckpt` (first match in `LAYOUTS` order); None for a plain checkpoint."""
    return next((layout for layout in LAYOUTS.values() if layout.detect(ckpt)), None)


def scale_name_for(tensors: Container[str], weight_name: str) -> str | None:
    """Name of the FP8 scale stored beside `<m>.weight`, in whichever layout is present."""
    module = module_path(weight_name)
    return next((f"{module}.{s}" for s in FP8_SCALES if f"{module}.{s}" in tensors), None)


def hf_scale_name(weight: str) -> str:
    """`<m>.weight` -> `<m>.weight_scale_inv`, the HF FP8 scale beside it."""
    return f"{module_path(weight)}.{HF_SCALE}"


def weight_of_scale(name: str) -> str | None:
    """`<m>.weight_scale_inv` (or `.weight_scale`, Neuron `.scale`) -> `<m>.weight`."""
    for suffix in FP8_SCALES:
        if name.endswith("." + suffix):
            return name[: -len(suffix)] + "weight"
    return None
