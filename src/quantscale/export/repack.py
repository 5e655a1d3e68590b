"""Read the pseudo-quantized layout (fp16 weights + `_scales` file, export/pseudo.py) back as a
QuantLinear model, and repack it into a real packed checkpoint (compressed-tensors or ModelOpt).

The dense fp16 weights are the codes times their scales, so the codes come back by quantizing
each weight with the stored scales; the reader checks that every weight lies on that grid
(to fp16 rounding) and names the first module whose does not. NVFP4's per-tensor scale is
stored as `scale_2` = 1/global_scale; its float32 reciprocal is the global scale the repacked
file carries (the original's or one float32 ulp from it, see checkpoint/convert.py), while
the codes and E4M3 block scales are the original ones, bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from quantscale.checkpoint.layouts import PSEUDO, PSEUDO_FORMAT, QUANTIZE_CONFIG, reciprocal
from quantscale.errors import CheckpointError
from quantscale.export.base import per_column_qparams
from quantscale.qdq import QParams, dequantize, quantize
from quantscale.runtime.qlinear import QuantLinear
from quantscale.scheme import QuantArgs, QuantScheme, Recipe, preset_scheme

FP16_TOLERANCE = 2.0**-10  # a dense fp16 weight is its float32 value to this relative error


def pseudo_config(path: Path) -> dict:
    """quantize_config.json of a pseudo-quantized checkpoint (refused if it is not one)."""
    file = path / QUANTIZE_CONFIG
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: cannot read: {exc}") from exc
    if not isinstance(cfg, dict) or cfg.get("checkpoint_format") != PSEUDO_FORMAT:
        raise CheckpointError(
            f"{file}: checkpoint_format is not {PSEUDO_FORMAT!r}; not a pseudo-quantized checkpoint"
        )
    return cfg


def pseudo_scheme(cfg: dict, where: Path) -> QuantScheme:
    """The weight-only scheme quantize_config.json describes (`format` nvfp4, int4, int8)."""
    fmt = str(cfg.get("format", "")).lower()
    if fmt == "nvfp4":
        return preset_scheme("NVFP4A16")
    if fmt not in ("int4", "int8", "int2", "int3"):
        raise CheckpointError(
            f"{where / QUANTIZE_CONFIG}: format {fmt!r}; expected 'nvfp4' or intN"
        )
    group = cfg.get("group_size")
    args = QuantArgs(
        num_bits=int(cfg["bits"]),
        type="int",
        symmetric=bool(cfg.get("sym", True)),
        group_size=None if group in (None, 0) else int(group),
        strategy=cfg.get("strategy"),
        actorder="group" if cfg.get("desc_act") else None,
    )
    return QuantScheme(weights=args)


def _scales_file(path: Path) -> Path:
    found = sorted(path.glob("pseudo_quantized_model-*_scales.safetensors"))
    if len(found) != 1:
        raise CheckpointError(
            f"{path}: expected one pseudo_quantized_model-*_scales.safetensors, found "
            f"{[p.name for p in found]}"
        )
    return found[0]


def _module_scales(scales: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Scales file tensors grouped by module: {module: {per_block_scale: ..., ...}}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in scales.items():
        module, _, leaf = name.rpartition(".")
        out.setdefault(module, {})[leaf] = t
    return out


def _qparams(local: dict[str, torch.Tensor], module: str, file: Path) -> QParams:
    scale = local.get(str(PSEUDO.weight_scale))
    if scale is None:
        raise CheckpointError(f"{file}: {module} has no {PSEUDO.weight_scale}")
    scale_2 = local.get(str(PSEUDO.global_scale))
    gs = None if scale_2 is None else reciprocal(scale_2.float().reshape(())).reshape(1)
    zp = local.get("zero_point")
    return QParams(scale.float(), None if zp is None else zp.float(), gs)


def _on_grid(
    w: torch.Tensor, args: QuantArgs, qp: QParams, g_idx: torch.Tensor | None, where: str
) -> None:
    """Refuse a dense weight that its stored scales do not reproduce."""
    grid_qp = per_column_qparams(qp, g_idx) if g_idx is not None else qp
    back = dequantize(quantize(w, args, grid_qp), args, grid_qp)
    err = float(((back - w).abs() / w.abs().clamp_min(1e-30)).max()) if w.numel() else 0.0
    if err > FP16_TOLERANCE and not torch.allclose(back, w, rtol=FP16_TOLERANCE, atol=1e-6):
        raise CheckpointError(
            f"{where}: the dense weight is not on the grid of its stored scales (relative "
            f"error up to {err:.3g}, expected <= {FP16_TOLERANCE:.3g} from fp16 rounding)"
        )


def load_pseudo_checkpoint(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A pseudo-quantized checkpoint as a QuantLinear model: each module of the scales file
    holds its stored dense weight (in `dtype`) with the stored qparams, so exporters re-derive
    the original codes."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    cfg = pseudo_config(path)
    scheme = pseudo_scheme(cfg, path)
    file = _scales_file(path)
    try:
        scales = _module_scales(load_file(str(file)))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{file}: cannot read: {exc}") from exc
    model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    for module, local in sorted(scales.items()):
        linear = model.get_submodule(module) if module else None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{file}: {module!r} has scales but is not a Linear of the model")
        ql = QuantLinear.from_linear(linear, scheme)
        qp, g_idx = _qparams(local, module, file), local.get("g_idx")
        assert scheme.weights is not None
        if g_idx is not None and not scheme.weights.actorder:
            g_idx = None  # column // group_size, what the scheme implies anyway
        _on_grid(linear.weight.detach().float(), scheme.weights, qp, g_idx, f"{file}: {module}")
        ql.set_weight(linear.weight.detach(), qp, g_idx)
        model.set_submodule(module, ql)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ignore = [n for n in linears if not isinstance(model.get_submodule(n), QuantLinear)]
    model.quantscale_recipe = Recipe(config_groups={"group_0": scheme}, ignore=ignore)
    return model.eval()


def repack_pseudo(
    path: str | os.PathLike, out: str | os.PathLike, to: str, overwrite: bool = False
) -> Path:
    """Write pseudo-quantized checkpoint `path` as a packed `to` checkpoint
    ('compressed-tensors' or 'modelopt', NVFP4 only for the latter)."""
    from quantscale.export import export_model

    model = load_pseudo_checkpoint(path)
    return export_model(
        model, out, to, recipe=model.quantscale_recipe, overwrite=overwrite, source_dir=path
    )
