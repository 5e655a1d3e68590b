"""A checkpoint written part by part while a model is quantized one layer at a time.

`PartWriter(directory, n_parts)` saves each part of the model (embeddings, one decoder layer,
the head) as its own shard `model-<i>-of-<n>.safetensors` in a work directory the moment the
part is quantized (temporary name, then renamed: a shard present is complete). `finish(out,
config)` assembles the checkpoint: the shards (hard-linked, else copied), the index,
config.json and the source's tokenizer files, through `CheckpointWriter` (temporary directory,
atomic rename). `part_tensors` gives one part's tensors in compressed-tensors, ModelOpt NVFP4
or HF FP8 form, `PartWriter.format_files` the last two's config files at finish time, by the
same per-module code as the whole-model exporters. The pseudo-quantized layout is one fp16 file
of the whole model named after all modules' scheme, so it is not written in parts.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from quantscale.checkpoint.layouts import HF_QUANT_CONFIG
from quantscale.checkpoint.read import read_header
from quantscale.checkpoint.write import CheckpointWriter
from quantscale.errors import CheckpointError, QuantscaleError
from quantscale.export.base import (
    checkpoint_config,
    checkpoint_names,
    copy_side_files,
    plain_tensors,
    quantized_modules,
    renamed_strings,
    warn_unshared,
)
from quantscale.export.compressed_tensors import compressed_tensors
from quantscale.export.hf import hf_fp8_model_config, hf_fp8_tensors
from quantscale.export.modelopt import has_input_scales, modelopt_config, modelopt_tensors

PART_FORMATS = ("compressed-tensors", "modelopt", "hf")
STREAM_FORMATS = PART_FORMATS


def part_tensors(
    module: nn.Module,
    prefix: str = "",
    keep: Callable[[str], bool] | None = None,
    tied: bool = False,
    fmt: str = "compressed-tensors",
) -> dict[str, torch.Tensor]:
    """Tensors of submodule `prefix` of a quantized model in format `fmt` (only the names
    `keep` accepts; `tied`: lm_head shares the embeddings and is not written)."""
    mods = quantized_modules(module, prefix, keep)
    plain = plain_tensors(module, mods, prefix, keep, tied)
    if fmt == "hf":
        return hf_fp8_tensors(mods, plain)
    warn_unshared(mods)
    if fmt == "modelopt":
        return modelopt_tensors(mods, plain)
    if fmt != "compressed-tensors":
        raise QuantscaleError(
            f"streamed parts are written as {PART_FORMATS}, not {fmt!r}"
            " (pseudo is one file of the whole model: omit --stream)"
        )
    return compressed_tensors(mods, plain)


class PartWriter:
    """One shard per model part in `directory`; see the module docstring."""

    def __init__(self, directory: str | os.PathLike, n_parts: int, model_type: str | None):
        self.dir = Path(directory)
        self.n_parts = n_parts
        self.config = {"model_type": model_type}

    def name(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{self.n_parts:05d}.safetensors"

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> Path:
        """Save part `index` (names as the model's checkpoints spell them)."""
        named = checkpoint_names(tensors, self.config)
        path = self.dir / self.name(index)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            save_file({k: v.contiguous() for k, v in named.items()}, str(tmp), {"format": "pt"})
            os.replace(tmp, path)
        except (OSError, SafetensorError) as err:  # e.g. the disk is full
            tmp.unlink(missing_ok=True)
            raise CheckpointError(f"{path}: cannot write this part ({err})") from err
        return path

    def missing(self, count: int) -> list[str]:
        """Which of the first `count` parts have no shard."""
        return [self.name(i) for i in range(count) if not (self.dir / self.name(i)).is_file()]

    def finish(
        self,
        out: str | os.PathLike,
        config: dict,
        source_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
        extra_json: dict[str, dict] | None = None,
    ) -> Path:
        """Write the checkpoint `out` from the parts, config.json, the `extra_json` files
        (e.g. hf_quant_config.json) and the side files."""
        if self.missing(self.n_parts):
            raise QuantscaleError(f"{self.dir}: parts missing: {self.missing(self.n_parts)}")
        with CheckpointWriter(out, overwrite=overwrite) as writer:
            for i in range(self.n_parts):
                self._adopt(writer, self.name(i))
            writer.write_json("config.json", checkpoint_config(config))
            for name, obj in (extra_json or {}).items():
                writer.write_json(name, renamed_strings(obj, config.get("model_type")))
            copy_side_files(source_dir, writer)
            return writer.commit(write_index=True)

    def names(self) -> list[str]:
        """Tensor names (checkpoint spelling) of all parts written so far."""
        shards = [self.dir / self.name(i) for i in range(self.n_parts)]
        return [n for p in shards if p.is_file() for n in read_header(p)]

    def format_files(self, fmt: str, model: nn.Module) -> tuple[dict, dict[str, dict]]:
        """config.json and the extra JSON files of format `fmt` ("modelopt", "hf") for the
        (skeleton) `model` whose parts are written."""
        if fmt == "hf":
            return hf_fp8_model_config(model), {}
        if fmt == "modelopt":
            config, hf_cfg = modelopt_config(model, has_input_scales(self.names()))
            return config, {HF_QUANT_CONFIG: hf_cfg}
        raise QuantscaleError(f"no streamed config for format {fmt!r}")

    def _adopt(self, writer: CheckpointWriter, shard: str) -> None:
        src = self.dir / shard
        for name, info in read_header(src).items():
            if name in writer.weight_map:
                raise CheckpointError(f"tensor {name!r} written twice ({shard})")
            writer.weight_map[name] = shard
            writer.total_size += info.nbytes
        try:
            os.link(src, writer.tmp / shard)
        except OSError:
            shutil.copyfile(src, writer.tmp / shard)
