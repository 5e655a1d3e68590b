"""Library entry points behind `quantscale quantize ... --method gptq --format ...` and
`quantscale convert ... --to {compressed-tensors,modelopt}` for NVFP4 checkpoints.

`quantize_checkpoint` loads a checkpoint, calibrates on Wikipedia windows (or a text file),
quantizes with RTN or GPTQ per a preset / recipe, and writes one of the `EXPORTERS` formats.
`add_quantize_arguments` / `run_quantize` and `run_convert_nvfp4` are the argparse glue.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import torch

from quantscale.errors import QuantscaleError
from quantscale.export import EXPORTERS, export_model

log = logging.getLogger(__name__)


def quantize_checkpoint(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    scheme: str,
    *,
    method: str = "gptq",
    fmt: str = "compressed-tensors",
    calib_samples: int = 128,
    calib_seq_len: int = 512,
    calib_batch_size: int = 4,
    calib_data: str | os.PathLike | None = None,
    dtype: str = "bfloat16",
    actorder: str | None = None,
    dampening_frac: float = 0.01,
    block_size: int = 128,
    calibrate_all_experts: bool = True,
    true_sequential: bool | None = None,
    overwrite: bool = False,
) -> Path:
    """Quantize the checkpoint in `model_dir` with `scheme` (preset name or recipe file) by
    `method` ('rtn' | 'gptq') and write it to `out` in format `fmt`."""
    from quantscale.data.calibration import calibration_batches
    from quantscale.models.moe import calibrate_all_experts as all_experts
    from quantscale.models.moe import linearize_experts, log_expert_coverage
    from quantscale.pipeline import load_model, quantize_model
    from quantscale.scheme import load_recipe

    if fmt not in EXPORTERS:
        raise QuantscaleError(f"unknown --format {fmt!r}; known: {', '.join(EXPORTERS)}")
    if Path(out).exists() and not overwrite:
        raise QuantscaleError(f"{out}: already exists (pass --overwrite to replace it)")
    recipe = load_recipe(scheme)
    if actorder and actorder != "none":
        for group in recipe.config_groups.values():
            if group.weights is not None:
                group.weights = group.weights.model_copy(update={"actorder": actorder})
    model, tokenizer = load_model(model_dir, getattr(torch, dtype))
    if tokenizer is None:
        raise QuantscaleError(f"{model_dir}: no tokenizer found; calibration needs one")
    moe = linearize_experts(model)
    batches = None
    if method != "rtn" or _static_activations(recipe):
        batches = calibration_batches(tokenizer, calib_samples, calib_seq_len, source=calib_data)
    kwargs = {}
    if method == "gptq":
        kwargs = {"dampening_frac": dampening_frac, "block_size": block_size}
        if actorder == "none":
            kwargs["actorder"] = None
    start = time.perf_counter()
    with all_experts(model, enabled=calibrate_all_experts and bool(moe)):
        quantize_model(
            model,
            recipe,
            batches,
            method=method,
            batch_size=calib_batch_size,
            true_sequential=true_sequential,
            **kwargs,
        )
    if moe:
        log_expert_coverage(model, all_tokens=calibrate_all_experts)
    log.info("quantized with %s in %.1f s", method, time.perf_counter() - start)
    info = {"quant_method": method, "damp_percent": dampening_frac, "calib_samples": calib_samples}
    extra = {"quantize_info": info} if fmt == "pseudo" else {}
    return export_model(model, out, fmt, source_dir=model_dir, overwrite=overwrite, **extra)


def _static_activations(recipe) -> bool:
    from quantscale.calibration.activations import is_static

    groups = list(recipe.config_groups.values())
    return any(is_static(g.input_activations) or is_static(g.output_activations) for g in groups)


def run_convert_nvfp4(args: argparse.Namespace) -> int:
    """`quantscale convert CKPT OUT --to {compressed-tensors,modelopt}` for NVFP4 inputs."""
    from quantscale.export.nvfp4_convert import convert_nvfp4

    out = convert_nvfp4(args.ckpt, args.out, args.to, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def is_nvfp4_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` holds an NVFP4 checkpoint (compressed-tensors or ModelOpt)."""
    from quantscale.checkpoint.read import Checkpoint
    from quantscale.errors import CheckpointError
    from quantscale.export.nvfp4_convert import detect_nvfp4_format

    try:
        detect_nvfp4_format(Checkpoint(path))
    except CheckpointError:
        return False
    return True
