"""Convert quantized checkpoints between the conventions of other runtimes, streaming.

FP8 block checkpoints convert between HF, compressed-tensors and AWS Neuron; all three store
the same numbers, fp8 weights and a float32 dequantization multiplier per tile (W = fp8 *
scale). Conversion renames tensors and rewrites config.json; it never takes a reciprocal of
a scale (`1/weight_scale_inv` would scale every weight by about (amax/448)^-2). Tensors
whose bytes do not change are copied as raw bytes, a few MB at a time.

NVFP4 checkpoints convert between compressed-tensors and ModelOpt. Both store the same
packed E2M1 bytes and E4M3 block scales; they differ in names and in the per-tensor scale:
compressed-tensors `weight_global_scale` [1] = 448*6/amax, ModelOpt `weight_scale_2` scalar
= amax/(6*448) (likewise `input_global_scale` <-> `input_scale`). The reciprocal of a
float32 is not always invertible in float32 (about 12% of values do not come back), so a
converted checkpoint carries `quantscale_nvfp4_convert.json` with the source's exact
per-tensor values and quantization config; converting back restores them, so ModelOpt ->
compressed-tensors -> ModelOpt (and the reverse) is byte for byte unchanged. Loaders ignore
that file.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import struct
from pathlib import Path

import torch

from quantscale import progress
from quantscale.checkpoint.layouts import (
    CT_METHOD,
    FP8_CONVENTIONS,
    HF_FP8,
    HF_QUANT_CONFIG,
    MODELOPT_METHOD,
    MODELOPT_NVFP4,
    MODELOPT_W4A16,
    NEURON_FP8,
    NEURON_KEY,
    NEURON_PREFIX,
    NVFP4_CONVENTIONS,
    Layout,
    detect_layout,
    from_neuron_name,
    hf_quant_config,
    modelopt_quantization_config,
    reciprocal,
    scale_name_for,
    to_neuron_name,
)
from quantscale.checkpoint.read import Checkpoint, TensorInfo
from quantscale.checkpoint.transform import ShardRunner, TensorPlan, transform_checkpoint
from quantscale.errors import CheckpointError, QuantscaleError
from quantscale.scheme import Recipe, preset_scheme

log = logging.getLogger(__name__)

TARGETS = (*FP8_CONVENTIONS, MODELOPT_METHOD)
SIDECAR = "quantscale_nvfp4_convert.json"

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
NVFP4_RULES = {
    "packed e2m1 weight and e4m3 block scales": (
        "bytes copied unchanged; compressed-tensors weight_packed <-> ModelOpt weight"
    ),
    "per-tensor scales": (
        "compressed-tensors weight_global_scale / input_global_scale (448*6/amax) <-> ModelOpt "
        f"weight_scale_2 / input_scale (their float32 reciprocal); {SIDECAR} keeps the source's "
        "exact values so converting back is byte for byte unchanged"
    ),
    "config.json": "quantization_config rewritten; ModelOpt also gets hf_quant_config.json",
}


def convert_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    to: str,
    overwrite: bool = False,
    runner: ShardRunner | None = None,
) -> Path | None:
    """Write checkpoint `src` in convention `to`: FP8 block checkpoints as 'hf',
    'compressed-tensors' or 'neuron', NVFP4 ones as 'compressed-tensors' or 'modelopt'.
    A `runner` spreads an FP8 conversion's shards over processes (None: others still write)."""
    if to not in TARGETS:
        raise QuantscaleError(f"unknown target {to!r}; expected one of {', '.join(TARGETS)}")
    ckpt = Checkpoint(src)
    layout = detect_layout(ckpt)
    if layout is not None and layout in NVFP4_CONVENTIONS.values():
        if runner is not None:
            raise QuantscaleError(
                f"{ckpt.path}: NVFP4 conversion keeps exact scales across shards in one sidecar; "
                "it runs in one process (drop --ray / --rank)"
            )
        return convert_nvfp4(ckpt, layout, out, to, overwrite)
    if to == MODELOPT_METHOD:
        raise QuantscaleError(f"{os.fspath(src)}: --to modelopt converts NVFP4 checkpoints only")
    if layout is None or layout not in FP8_CONVENTIONS.values():
        method = (ckpt.quantization_config or {}).get("quant_method")
        raise QuantscaleError(
            f"{ckpt.path / 'config.json'}: not an FP8 block checkpoint this tool converts "
            f"(quant_method {method!r}; expected 'fp8', 'compressed-tensors' or a Neuron block)"
        )
    return convert_fp8(ckpt, layout, out, to, overwrite, runner)


def explain(to: str) -> str:
    """The rule applied to each tensor kind, as printable text."""
    lines = [f"convert --to {to}: rules by tensor kind"]
    if to in FP8_CONVENTIONS:
        lines += [f"  {kind}: {rule}" for kind, rule in RULES.items()]
        lines.append(f"  scale name written: <module>.{FP8_CONVENTIONS[to].weight_scale}")
    if to in NVFP4_CONVENTIONS:
        lines.append("  NVFP4 checkpoints (compressed-tensors <-> modelopt):")
        lines += [f"    {kind}: {rule}" for kind, rule in NVFP4_RULES.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------ FP8


def _rename(name: str, is_scale: bool, src: Layout, to: Layout, unprefixed: list[str]) -> str:
    """Tensor name in `src` -> name in `to` (through HF names); scales get `to`'s name."""
    hf_scale = str(HF_FP8.weight_scale)
    if src is NEURON_FP8:
        name = from_neuron_name(name, hf_scale if is_scale else str(src.weight_scale), unprefixed)
    elif is_scale:
        name = f"{name.rpartition('.')[0]}.{hf_scale}"
    if to is NEURON_FP8:
        return to_neuron_name(name, hf_scale)
    if is_scale:
        return f"{name.rpartition('.')[0]}.{to.weight_scale}"
    return name


def _target_fp8_config(ckpt: Checkpoint, src: Layout, to: Layout) -> tuple[dict, list[str]]:
    """(config.json of the converted checkpoint, top-level modules Neuron names keep)."""
    if src.fp8_facts is None or to.fp8_config is None:
        raise QuantscaleError(f"{src.name} -> {to.name}: not an FP8 block conversion")
    facts = src.fp8_facts(ckpt.config or {})
    config = copy.deepcopy(ckpt.config) or {}
    neuron = config.pop(NEURON_KEY, None)
    unprefixed = (neuron or {}).get("unprefixed_modules")
    if unprefixed is None:
        tops = {n.split(".")[0] for n in ckpt.tensors}
        unprefixed = sorted(tops - {NEURON_PREFIX.rstrip(".")})
    config.pop("quantization_config", None)
    key, value = to.fp8_config(facts, unprefixed)
    config[key] = value
    return config, unprefixed


def convert_fp8(
    ckpt: Checkpoint,
    src: Layout,
    out: str | os.PathLike,
    to_name: str,
    overwrite: bool,
    runner: ShardRunner | None = None,
) -> Path | None:
    """Write FP8 block checkpoint `ckpt` (in layout `src`) in convention `to_name`."""
    to = FP8_CONVENTIONS[to_name]
    config, unprefixed = _target_fp8_config(ckpt, src, to)
    scales = {
        scale_name_for(ckpt.tensors, n) for n, i in ckpt.tensors.items() if i.dtype.startswith("F8")
    } - {None}

    def out_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
        """Scales widen to float32 (exactly) unless compressed-tensors keeps them as they are."""
        widen = name in scales and dtype != torch.float32 and to.convention != CT_METHOD
        return torch.float32 if widen else dtype

    def tensor_fn(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        tensor = tensor.to(out_dtype(name, tensor.dtype))
        return {_rename(name, name in scales, src, to, unprefixed): tensor}

    def plan_fn(name: str, info: TensorInfo) -> TensorPlan:
        """Raw byte copies under the new name, except scales that widen to float32."""
        new = _rename(name, name in scales, src, to, unprefixed)
        dtype = out_dtype(name, info.torch_dtype)
        if dtype == info.torch_dtype:
            return TensorPlan.copy(new, info)
        return TensorPlan(((new, dtype, info.shape),))

    written = transform_checkpoint(
        ckpt, out, tensor_fn, config, overwrite, progress.track, plan_fn=plan_fn, runner=runner
    )
    log.info(
        "converted %d FP8 scale parameters (%s -> %s, renamed, values unchanged: no reciprocal)",
        len(scales),
        src.weight_scale,
        to.weight_scale,
    )
    return written


# ------------------------------------------------------------------ NVFP4


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from exc


def _bits(x: torch.Tensor) -> int:
    return struct.unpack("<I", struct.pack("<f", float(x.reshape(-1)[0])))[0]


def _from_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _flip(t: torch.Tensor, to: Layout, exact: int | None) -> torch.Tensor:
    """The reciprocal per-tensor scale in the target's shape ([1] vs scalar)."""
    r = reciprocal(t.reshape(()))
    if exact is not None and _bits(reciprocal(torch.tensor(_from_bits(exact)))) == _bits(t):
        r = torch.tensor(_from_bits(exact), dtype=torch.float32)
    return r.reshape(1) if to.convention == CT_METHOD else r.reshape(())


def _nvfp4_renames(src: Layout, to: Layout) -> dict[str, tuple[str, bool]]:
    """Local name in `src` -> (name in `to`, whether the value is a reciprocal scale)."""
    fields = ("weight", "global_scale", "input_global_scale")
    return {
        str(getattr(src, f)): (str(getattr(to, f)), f != "weight")
        for f in fields
        if getattr(src, f) != getattr(to, f)
    }


def _rename_nvfp4(
    name: str, renames: dict[str, tuple[str, bool]], quantized: set[str]
) -> tuple[str, bool]:
    """(target name, whether the value is a reciprocal scale); only quantized modules'
    tensors are renamed (a ModelOpt `weight` is also every unquantized module's)."""
    module, _, leaf = name.rpartition(".")
    if module not in quantized or leaf not in renames:
        return name, False
    new, flips = renames[leaf]
    return f"{module}.{new}", flips


def _modelopt_target(ckpt: Checkpoint, qc: dict, sidecar: dict) -> tuple[dict, dict]:
    """(quantization_config, hf_quant_config) of a ModelOpt target."""
    hf_cfg = sidecar.get(HF_QUANT_CONFIG)
    if hf_cfg is None:
        has_inputs = any(n.endswith(".input_global_scale") for n in ckpt.tensors)
        algo = MODELOPT_NVFP4 if has_inputs else MODELOPT_W4A16
        hf_cfg = hf_quant_config(algo, list(qc.get("ignore") or []))
    return sidecar.get("quantization_config") or modelopt_quantization_config(hf_cfg), hf_cfg


def _ct_target(ckpt: Checkpoint, qc: dict, sidecar: dict) -> dict:
    """quantization_config of a compressed-tensors target."""
    q = _read_json(ckpt.path / HF_QUANT_CONFIG)["quantization"] if not qc else qc
    preset = "NVFP4" if q.get("quant_algo") == MODELOPT_NVFP4 else "NVFP4A16"
    recipe = Recipe(
        config_groups={"group_0": preset_scheme(preset)},
        ignore=list(q.get("exclude_modules") or []),
    )
    return sidecar.get("quantization_config") or recipe.to_quantization_config("compressed")


def _target_nvfp4_config(ckpt: Checkpoint, to: Layout, sidecar: dict) -> tuple[dict, dict]:
    """(config.json, hf_quant_config or {}) of the converted checkpoint."""
    config = copy.deepcopy(ckpt.config or {})
    qc = config.pop("quantization_config", {}) or {}
    if to.convention == MODELOPT_METHOD:
        config["quantization_config"], hf_cfg = _modelopt_target(ckpt, qc, sidecar)
        return config, hf_cfg
    config["quantization_config"] = _ct_target(ckpt, qc, sidecar)
    return config, {}


def convert_nvfp4(
    ckpt: Checkpoint, src: Layout, out: str | os.PathLike, to_name: str, overwrite: bool
) -> Path:
    """Write NVFP4 checkpoint `ckpt` (in layout `src`) in convention `to_name`."""
    if to_name not in NVFP4_CONVENTIONS:
        raise QuantscaleError(
            f"unknown NVFP4 target {to_name!r}; expected one of {', '.join(NVFP4_CONVENTIONS)}"
        )
    to = NVFP4_CONVENTIONS[to_name]
    if src is to:
        raise QuantscaleError(f"{ckpt.path} is already in {to_name} format")
    side_path = ckpt.path / SIDECAR
    sidecar = _read_json(side_path) if side_path.exists() else {}
    if sidecar.get("format") != to_name:
        sidecar = {}
    exact = sidecar.get("scales", {})
    back: dict[str, int] = {}
    marker = f".{src.global_scale}"
    quantized = {n[: -len(marker)] for n in ckpt.tensors if n.endswith(marker)}
    renames = _nvfp4_renames(src, to)

    def tensor_fn(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        new, flips = _rename_nvfp4(name, renames, quantized)
        if not flips:
            return {new: tensor}
        back[new] = _bits(tensor)
        return {new: _flip(tensor, to, exact.get(name))}

    config, hf_cfg = _target_nvfp4_config(ckpt, to, sidecar)
    result = transform_checkpoint(ckpt, out, tensor_fn, config, overwrite, progress.track)
    assert result is not None, "one process always commits"
    _finish(result, src, ckpt, back, hf_cfg, restoring=bool(sidecar))
    return result


def _finish(
    out: Path, src: Layout, ckpt: Checkpoint, back: dict, hf_cfg: dict, restoring: bool
) -> None:
    """Write hf_quant_config.json and the sidecar that restores the source exactly (none
    when this conversion restored a checkpoint from its own sidecar)."""
    (out / HF_QUANT_CONFIG).unlink(missing_ok=True)
    (out / SIDECAR).unlink(missing_ok=True)
    if hf_cfg:
        (out / HF_QUANT_CONFIG).write_text(json.dumps(hf_cfg, indent=2) + "\n")
    if restoring:
        return
    sidecar = {
        "format": src.convention,
        "scales": back,
        "quantization_config": (ckpt.config or {}).get("quantization_config"),
    }
    if src.convention == MODELOPT_METHOD:
        sidecar[HF_QUANT_CONFIG] = _read_json(ckpt.path / HF_QUANT_CONFIG)
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=1) + "\n")
