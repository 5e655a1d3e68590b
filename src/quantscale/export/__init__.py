"""Exporters: one writer (and reader) per on-disk format, chosen by name.

`EXPORTERS[name](model, out, recipe=..., overwrite=..., source_dir=...)` writes a model
quantized by `quantize.quantize_model`; `export_model` dispatches by name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch import nn

from quantscale.errors import QuantscaleError

Exporter = Callable[..., Path]


def _compressed_tensors(model: nn.Module, out, **kw) -> Path:
    from quantscale.export.compressed_tensors import save_compressed_tensors

    return save_compressed_tensors(model, out, **kw)


def _modelopt(model: nn.Module, out, **kw) -> Path:
    from quantscale.export.modelopt import save_modelopt

    return save_modelopt(model, out, **kw)


def _pseudo(model: nn.Module, out, **kw) -> Path:
    from quantscale.export.pseudo import save_pseudo_quantized

    return save_pseudo_quantized(model, out, **kw)


def _hf(model: nn.Module, out, **kw) -> Path:
    from quantscale.export.hf import save_hf_fp8

    return save_hf_fp8(model, out, **kw)


def _gguf(model: nn.Module, out, **kw) -> Path:
    from quantscale.export.gguf import save_gguf

    return save_gguf(model, out, **kw)


EXPORTERS: dict[str, Exporter] = {
    "compressed-tensors": _compressed_tensors,
    "modelopt": _modelopt,
    "pseudo": _pseudo,
    "hf": _hf,
    "gguf": _gguf,
}


ROTATION_FORMATS = ("compressed-tensors",)  # formats that record an online Hadamard


def export_model(
    model: nn.Module, out: str | os.PathLike, fmt: str = "compressed-tensors", **kwargs
) -> Path:
    """Write a quantized model in format `fmt` (see EXPORTERS)."""
    if fmt not in EXPORTERS:
        raise QuantscaleError(f"unknown export format {fmt!r}; known: {', '.join(EXPORTERS)}")
    recipe = getattr(model, "quantscale_recipe", None)
    if fmt not in ROTATION_FORMATS and getattr(recipe, "rotate", None):
        raise QuantscaleError(
            "a rotated model needs its online down_proj Hadamard recorded, which only "
            f"{' and '.join(ROTATION_FORMATS)} (transform_config) does; not --format {fmt}"
        )
    return EXPORTERS[fmt](model, out, **kwargs)
