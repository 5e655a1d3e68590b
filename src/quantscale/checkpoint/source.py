"""A checkpoint as a source of plain tensors, one tensor read at a time.

`open_source(path)` opens a safetensors checkpoint directory (single file or sharded with an
index; plain or quantized) and serves its parameters under the names a plain model of its
config has (`model.layers.0.mlp.down_proj.weight`). `get` reads only the bytes of the stored
tensors that make up one parameter (through the header-validated reader), dequantizing a
quantized weight as it is loaded; scales, zero points and global scales are consumed, not
listed. Nothing is cached: a tensor costs its own memory until the caller drops it.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from quantscale.checkpoint.read import Checkpoint, TensorInfo, read_into
from quantscale.errors import CheckpointError


class TensorSource:
    """Plain tensors of one checkpoint: `names()`, `get(name)`, `layer_names(prefix)`.

    `config` is config.json without `quantization_config`; `bytes_read` and `files_read`
    count what `get` has read so far (for tests and progress reports).
    """

    def __init__(self, ckpt: Checkpoint) -> None:
        self.checkpoint = ckpt
        self.path: Path = ckpt.path
        self.config: dict = plain_config(ckpt.config)
        self.bytes_read = 0
        self.files_read: list[str] = []
        self._names = list(ckpt.tensors)

    def names(self) -> list[str]:
        """Plain parameter names, in file order."""
        return list(self._names)

    def layer_names(self, prefix: str) -> list[str]:
        """Names under module prefix `prefix` (e.g. `model.layers.3.`)."""
        prefix = prefix if prefix.endswith(".") or not prefix else prefix + "."
        return [n for n in self._names if n.startswith(prefix)]

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The plain tensor `name`, cast to `dtype` if given."""
        if name not in self.checkpoint.tensors:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        tensor = self.read(name)
        return tensor if dtype is None else tensor.to(dtype)

    def read(self, stored: str) -> torch.Tensor:
        """One stored tensor, as on disk (only its own bytes are read)."""
        info = self.checkpoint.tensors.get(stored)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {stored!r}")
        tensor = read_tensor(self.path, info)
        self.bytes_read += info.nbytes
        self.files_read.append(info.shard)
        return tensor


def read_tensor(directory: Path, info: TensorInfo) -> torch.Tensor:
    """The tensor `info` describes, read from its shard in `directory` (its bytes only)."""
    path = directory / info.shard
    data = torch.empty(info.nbytes, dtype=torch.uint8)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: shard file is missing (tensor {info.name!r})") from err
    try:
        read_into(fd, data.numpy().data, info.offset, path, f"tensor {info.name!r}")
    finally:
        os.close(fd)
    return data.view(info.torch_dtype).reshape(info.shape)


def plain_config(config: dict | None) -> dict:
    """config.json without its quantization_config (a plain model can be built from it)."""
    config = copy.deepcopy(config or {})
    config.pop("quantization_config", None)
    return config


def open_source(path: str | os.PathLike) -> TensorSource:
    """Open checkpoint directory `path` as a `TensorSource`."""
    return TensorSource(Checkpoint(path))
