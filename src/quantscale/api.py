"""The Python API, `import quantscale as qs`: the functions behind the CLI's commands.

    out = qs.quantize("smollm2", "out/w4a16", scheme="W4A16", method="gptq", calibration=texts)
    qs.inspect(out)                          # PrecisionReport: dtypes, bytes per module kind
    qs.validate(out, runtime="transformers") # ValidationReport: .ok, .errors, .warnings
    qs.convert(fp8_dir, "out/fp8-ct", to="compressed-tensors")
    qs.evaluate(out, tasks=("ppl",))         # {"ppl": 23.4}

`quantize` takes a checkpoint directory or named model (the job of `quantscale quantize`,
written to `output_dir`) or an in-memory transformers model (quantized in place; exported when
`output_dir` is given). `calibration`: None (the Wikipedia calibration split), a text file,
a list of strings, or token ids `[N, L]`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantscale.algorithms.importance import importance_method
from quantscale.checkpoint.convert import convert_checkpoint
from quantscale.checkpoint.inspect import PrecisionReport, precision_report
from quantscale.checkpoint.layouts import PSEUDO, detect_layout
from quantscale.checkpoint.read import Checkpoint
from quantscale.checkpoint.transform import ShardRunner
from quantscale.checkpoint.validate import ValidationReport, validate_checkpoint
from quantscale.data.calibration import CalibrationSource
from quantscale.errors import QuantscaleError
from quantscale.eval.runner import DEFAULT_TASKS
from quantscale.eval.runner import evaluate as evaluate_model
from quantscale.models.loader import load_tokenizer, resolve_model
from quantscale.orchestrator import (
    CalibrationSettings,
    GPTQOptions,
    load_evaluated,
    quantize_checkpoint,
    quantize_model,
    set_kv_cache,
    set_learn_scales,
    set_rotation,
)
from quantscale.scheme import LearnScales
from quantscale.streaming import StreamOptions

__all__ = ["convert", "evaluate", "inspect", "quantize", "validate"]

Calibration = CalibrationSource | torch.Tensor


def quantize(
    model: str | os.PathLike | nn.Module,
    output_dir: str | os.PathLike | None = None,
    scheme: str = "W4A16",
    method: str | None = None,
    *,
    calibration: Calibration = None,
    format: str | None = None,
    calib_samples: int = 128,
    calib_seq_len: int = 512,
    tokenizer: Any = None,
    gptq: GPTQOptions | None = None,
    overwrite: bool = False,
    stream: bool | StreamOptions = False,
    kv_cache: str | None = None,
    importance: str | os.PathLike | None = None,
    rotate: str | None = None,
    learn_scales: int | LearnScales | None = None,
) -> Path | nn.Module:
    """Quantize `model` with `scheme` (preset name or recipe file) by `method` ('gptq', the
    default, 'rtn', 'awq', 'awq+gptq': AWQ scales, then GPTQ rounding, 'autoround': learned
    rounding, or 'awq+autoround'; their options in `gptq`) to `format`
    (default compressed-tensors). Returns the written directory, or the model itself when
    it was given in memory without an `output_dir`. A Mamba checkpoint is quantized the
    Quamba way without a `format`; with format 'compressed-tensors' (and a scheme preset)
    its Linear layers are, as an LLM's. `kv_cache` ('fp8' | 'fp8-head'): static FP8
    KV-cache scales calibrated on the same data. `importance`: importance-weighted RTN from
    that statistics file (collected on the calibration data and written there if absent).
    `rotate` ('hadamard'): Hadamard rotations fused before quantizing (`algorithms.rotation`).
    `learn_scales` (Adam steps per layer, or `scheme.LearnScales`): static activation scales
    learned after calibration (LSQ, `algorithms.lsq`; W8A8 / W4A8 static, Quamba)."""
    gptq = gptq or GPTQOptions()
    settings = CalibrationSettings(calib_samples, calib_seq_len, calibration)
    if isinstance(model, nn.Module):
        if importance is not None:
            method = importance_method(method)
        method, format = method or "gptq", format or "compressed-tensors"
        recipe = gptq.recipe(scheme)
        set_kv_cache(recipe, kv_cache, format if output_dir is not None else None, stream)
        set_rotation(recipe, rotate, format if output_dir is not None else None, stream)
        set_learn_scales(recipe, learn_scales, stream)
        where = "quantize(<in-memory model>, tokenizer=None)"
        batches = settings.batches(tokenizer, recipe, method, where)
        options = gptq.method_options(method)
        if importance is not None:
            method, options = _importance_rtn(model, recipe, settings, tokenizer, importance)
        quantize_model(model, recipe, batches, method, **options)
        if output_dir is None:
            return model
        from quantscale.export import export_model

        return export_model(model, output_dir, format, overwrite=overwrite)
    if output_dir is None:
        raise QuantscaleError(f"quantize({os.fspath(model)!r}): output_dir is required")
    return quantize_checkpoint(
        model,
        output_dir,
        scheme,
        method=method,
        fmt=format,
        calib_samples=calib_samples,
        calib_seq_len=calib_seq_len,
        calib_data=calibration,
        gptq=gptq,
        overwrite=overwrite,
        stream=stream,
        kv_cache=kv_cache,
        importance=importance,
        rotate=rotate,
        learn_scales=learn_scales,
    )


def _importance_rtn(
    model: nn.Module,
    recipe: Any,
    settings: CalibrationSettings,
    tokenizer: Any,
    path: str | os.PathLike,
) -> tuple[str, dict[str, Any]]:
    """Importance-weighted RTN of an in-memory model: its statistics, collected if absent."""
    from quantscale.algorithms.importance import ensure_importance, importance_options
    from quantscale.calibration.sequential import as_batches
    from quantscale.orchestrator import targeted_linears

    where = "quantize(<in-memory model>, tokenizer=None)"
    names = list(targeted_linears(model, recipe))
    ensure_importance(path, model, names, lambda: as_batches(settings.tokens(tokenizer, where), 4))
    return "rtn-importance", importance_options(path, False)


def inspect(path: str | os.PathLike) -> PrecisionReport:
    """The precision report of a checkpoint, from its headers (`quantscale inspect`)."""
    return precision_report(path)


def validate(path: str | os.PathLike, runtime: str | None = None) -> ValidationReport:
    """Check a checkpoint against its config.json and, with `runtime`, what that runtime
    refuses (`quantscale validate`)."""
    return validate_checkpoint(path, runtime=runtime)


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    to: str,
    overwrite: bool = False,
    runner: ShardRunner | None = None,
) -> Path | None:
    """Rewrite an FP8 block or NVFP4 checkpoint in convention `to` (`quantscale convert`); a
    pseudo-quantized one (fp16 + `_scales`) is repacked into packed compressed-tensors or
    ModelOpt. A `runner` (`checkpoint.parallel`) spreads an FP8 conversion's shards over
    ranks or Ray tasks; None is returned while other ranks still write."""
    if detect_layout(Checkpoint(src)) is PSEUDO:
        if runner is not None:
            raise QuantscaleError(f"{os.fspath(src)}: repacking runs in one process")
        from quantscale.export.repack import repack_pseudo

        return repack_pseudo(src, out, to, overwrite=overwrite)
    return convert_checkpoint(src, out, to, overwrite=overwrite, runner=runner)


def evaluate(
    model: str | os.PathLike | nn.Module,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    tokenizer: Any = None,
    n_tokens: int = 4096,
    n_items: int = 200,
    seq_len: int = 512,
    dtype: torch.dtype = torch.float32,
    reader: str = "quantscale",
) -> dict[str, float]:
    """Perplexity / cloze / zero-shot of a checkpoint (any layout `eval` reads) or an
    in-memory model (give its `tokenizer`), on the held-out Wikipedia split."""
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise QuantscaleError("evaluate(model): an in-memory model needs its tokenizer")
        return evaluate_model(model, tokenizer, tasks, n_tokens, n_items, seq_len)
    path = resolve_model(model)
    tokenizer = tokenizer or load_tokenizer(path)
    loaded = load_evaluated(path, dtype, reader)
    return evaluate_model(loaded, tokenizer, tasks, n_tokens, n_items, seq_len)
