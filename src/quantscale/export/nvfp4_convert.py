"""Convert NVFP4 checkpoints between compressed-tensors and ModelOpt, shard by shard.

Both store the same packed E2M1 bytes and E4M3 block scales; they differ in names and in the
per-tensor scale: compressed-tensors `weight_global_scale` [1] = 448*6/amax, ModelOpt
`weight_scale_2` scalar = amax/(6*448) (likewise `input_global_scale` <-> `input_scale`).
The reciprocal of a float32 is not always invertible in float32 (about 12% of values do not
come back), so a converted checkpoint carries `quantscale_nvfp4_convert.json` with the
source's exact per-tensor values and quantization config; converting back restores them, so
ModelOpt -> compressed-tensors -> ModelOpt (and the reverse) is byte for byte unchanged.
Loaders ignore that file.
"""

from __future__ import annotations

import copy
import json
import os
import struct
from pathlib import Path

import torch

from quantscale import progress
from quantscale.checkpoint.read import Checkpoint
from quantscale.checkpoint.transform import transform_checkpoint
from quantscale.errors import CheckpointError, QuantscaleError
from quantscale.export.modelopt import (
    HF_QUANT_CONFIG,
    W4A4,
    W4A16,
    config_quantization,
    hf_quant_config,
    reciprocal,
)
from quantscale.scheme import Recipe, preset_scheme

SIDECAR = "quantscale_nvfp4_convert.json"
TARGETS = ("compressed-tensors", "modelopt")
# (compressed-tensors name, ModelOpt name)
_RENAMES = (
    ("weight_packed", "weight"),
    ("weight_global_scale", "weight_scale_2"),
    ("input_global_scale", "input_scale"),
)


def detect_nvfp4_format(ckpt: Checkpoint) -> str:
    """'compressed-tensors' or 'modelopt' for an NVFP4 checkpoint, else CheckpointError."""
    qc = ckpt.quantization_config or {}
    method = qc.get("quant_method")
    if method == "modelopt" or (ckpt.path / HF_QUANT_CONFIG).exists():
        algo = qc.get("quant_algo") or _read_json(ckpt.path / HF_QUANT_CONFIG)["quantization"].get(
            "quant_algo"
        )
        if algo in (W4A4, W4A16):
            return "modelopt"
        raise CheckpointError(f"{ckpt.path}: ModelOpt quant_algo {algo!r} is not NVFP4")
    if method == "compressed-tensors":
        formats = {qc.get("format")} | {
            g.get("format") for g in (qc.get("config_groups") or {}).values()
        }
        if "nvfp4-pack-quantized" in formats:
            return "compressed-tensors"
    raise CheckpointError(
        f"{ckpt.path}: not an NVFP4 checkpoint (quant_method {method!r}); expected "
        "compressed-tensors nvfp4-pack-quantized or ModelOpt NVFP4"
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from exc


def _bits(x: torch.Tensor) -> int:
    return struct.unpack("<I", struct.pack("<f", float(x.reshape(-1)[0])))[0]


def _from_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _flip(t: torch.Tensor, to: str, exact: int | None) -> torch.Tensor:
    """The reciprocal per-tensor scale in the target's shape ([1] vs scalar)."""
    r = reciprocal(t.reshape(()))
    if exact is not None and _bits(reciprocal(torch.tensor(_from_bits(exact)))) == _bits(t):
        r = torch.tensor(_from_bits(exact), dtype=torch.float32)
    return r.reshape(1) if to == "compressed-tensors" else r.reshape(())


def _quantized_modules(ckpt: Checkpoint, src: str) -> set[str]:
    marker = ".weight_global_scale" if src == "compressed-tensors" else ".weight_scale_2"
    return {n[: -len(marker)] for n in ckpt.tensors if n.endswith(marker)}


def _rename(name: str, src: str, quantized: set[str]) -> tuple[str, bool]:
    """(target name, whether the value is a reciprocal scale); only quantized modules'
    tensors are renamed (a ModelOpt `weight` is also every unquantized module's)."""
    module, _, leaf = name.rpartition(".")
    if module not in quantized:
        return name, False
    for ct, mo in _RENAMES:
        old, new = (ct, mo) if src == "compressed-tensors" else (mo, ct)
        if leaf == old:
            return f"{module}.{new}", old not in ("weight_packed", "weight")
    return name, False


def _target_config(ckpt: Checkpoint, src: str, to: str, sidecar: dict) -> tuple[dict, dict]:
    """(config.json, hf_quant_config or {}) of the converted checkpoint."""
    config = copy.deepcopy(ckpt.config or {})
    qc = config.pop("quantization_config", {}) or {}
    restored = sidecar.get("quantization_config")
    if to == "modelopt":
        hf_cfg = sidecar.get(HF_QUANT_CONFIG)
        if hf_cfg is None:
            has_inputs = any(n.endswith(".input_global_scale") for n in ckpt.tensors)
            hf_cfg = hf_quant_config(W4A4 if has_inputs else W4A16, list(qc.get("ignore") or []))
        config["quantization_config"] = restored or config_quantization(hf_cfg)
        return config, hf_cfg
    q = _read_json(ckpt.path / HF_QUANT_CONFIG)["quantization"] if not qc else qc
    preset = "NVFP4" if q.get("quant_algo") == W4A4 else "NVFP4A16"
    recipe = Recipe(
        config_groups={"group_0": preset_scheme(preset)},
        ignore=list(q.get("exclude_modules") or []),
    )
    config["quantization_config"] = restored or recipe.to_quantization_config("compressed")
    return config, {}


def convert_nvfp4(
    src: str | os.PathLike, out: str | os.PathLike, to: str, overwrite: bool = False
) -> Path:
    """Write NVFP4 checkpoint `src` in convention `to` ('compressed-tensors' or 'modelopt')."""
    if to not in TARGETS:
        raise QuantscaleError(f"unknown NVFP4 target {to!r}; expected one of {', '.join(TARGETS)}")
    ckpt = Checkpoint(src)
    fmt = detect_nvfp4_format(ckpt)
    if fmt == to:
        raise QuantscaleError(f"{ckpt.path} is already in {to} format")
    side_path = ckpt.path / SIDECAR
    sidecar = _read_json(side_path) if side_path.exists() else {}
    if sidecar.get("format") != to:
        sidecar = {}
    exact = sidecar.get("scales", {})
    back: dict[str, int] = {}
    quantized = _quantized_modules(ckpt, fmt)

    def tensor_fn(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        new, flips = _rename(name, fmt, quantized)
        if not flips:
            return {new: tensor}
        back[new] = _bits(tensor)
        return {new: _flip(tensor, to, exact.get(name))}

    config, hf_cfg = _target_config(ckpt, fmt, to, sidecar)
    result = transform_checkpoint(ckpt, out, tensor_fn, config, overwrite, progress.track)
    _finish(result, fmt, ckpt, back, hf_cfg, restoring=bool(sidecar))
    return result


def _finish(
    out: Path, src_fmt: str, ckpt: Checkpoint, back: dict, hf_cfg: dict, restoring: bool
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
        "format": src_fmt,
        "scales": back,
        "quantization_config": (ckpt.config or {}).get("quantization_config"),
    }
    if src_fmt == "modelopt":
        sidecar[HF_QUANT_CONFIG] = _read_json(ckpt.path / HF_QUANT_CONFIG)
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=1) + "\n")
