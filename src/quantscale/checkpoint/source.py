"""A checkpoint as a source of plain tensors, one tensor read at a time.

`open_source(path)` opens a safetensors checkpoint directory (single file or sharded with an
index; plain or quantized) and serves its parameters under the names a plain model of its
config has (`model.layers.0.mlp.down_proj.weight`). `get` reads only the bytes of the stored
tensors that make up one parameter (through the header-validated reader), dequantizing a
quantized weight as it is loaded; scales, zero points and global scales are consumed, not
listed. Nothing is cached: a tensor costs its own memory until the caller drops it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from quantscale.checkpoint.dequantize import (
    StoredWeight,
    dequantize_stored,
    parse_dtype,
    plain_config,
    plan_dequantize,
)
from quantscale.checkpoint.layouts import NEURON_KEY, NEURON_SCALE, from_neuron_name
from quantscale.checkpoint.read import Checkpoint, ShardStamp, TensorInfo, read_into
from quantscale.errors import CheckpointError, QuantscaleError


class TensorSource:
    """Plain tensors of one checkpoint: `names()`, `get(name)`, `layer_names(prefix)`.

    `config` is config.json without `quantization_config` (or Neuron's block); `dtype` is
    what a quantized weight dequantizes to when `get` is given none (the config's float
    dtype, else bfloat16); plain tensors come as stored. `bytes_read` and `files_read`
    count what `get` has read so far (for tests and progress reports).
    """

    def __init__(self, ckpt: Checkpoint) -> None:
        self.checkpoint = ckpt
        self.path: Path = ckpt.path
        self.plan = plan_dequantize(ckpt)
        self.config: dict = plain_config(ckpt.config) or {}
        self.dtype = _config_dtype(self.config)
        self.bytes_read = 0
        self.files_read: list[str] = []
        self._stored = _plain_names(ckpt, self.plan.weights, self.plan.consumed)

    def names(self) -> list[str]:
        """Plain parameter names, in file order."""
        return list(self._stored)

    def layer_names(self, prefix: str) -> list[str]:
        """Names under module prefix `prefix` (e.g. `model.layers.3.`)."""
        prefix = prefix if prefix.endswith(".") or not prefix else prefix + "."
        return [n for n in self._stored if n.startswith(prefix)]

    def is_quantized(self, name: str) -> bool:
        """Whether plain tensor `name` is stored quantized (and dequantized by `get`)."""
        return self._stored_name(name) in self.plan.weights

    def get(
        self,
        name: str,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The plain tensor `name`, cast to `dtype` if given (a quantized weight is
        dequantized straight to `dtype`, else to `self.dtype`). With `device`, the stored
        bytes move there first and a quantized weight is dequantized there."""

        def read(stored: str) -> torch.Tensor:
            tensor = self.read(stored)
            return tensor if device is None else tensor.to(device)

        stored = self._stored_name(name)
        sw = self.plan.weights.get(stored)
        if sw is None:
            tensor = read(stored)
            return tensor if dtype is None else tensor.to(dtype)
        where = f"{self.path / self.checkpoint.tensors[stored].shard}: tensor {stored!r}"
        return dequantize_stored(sw, read, dtype or self.dtype, self.plan.block, where)

    def _stored_name(self, name: str) -> str:
        stored = self._stored.get(name)
        if stored is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        return stored

    def read(self, stored: str) -> torch.Tensor:
        """One stored tensor, as on disk (only its own bytes are read)."""
        info = self.checkpoint.tensors.get(stored)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {stored!r}")
        tensor = read_tensor(self.path, info, self.checkpoint.stamps.get(info.shard))
        self.bytes_read += info.nbytes
        self.files_read.append(info.shard)
        return tensor


def _plain_names(
    ckpt: Checkpoint, weights: dict[str, StoredWeight], consumed: set[str]
) -> dict[str, str]:
    """Plain name -> stored name of every tensor a plain model has (Neuron names renamed)."""
    neuron = (ckpt.config or {}).get(NEURON_KEY)
    unprefixed = (neuron or {}).get("unprefixed_modules", ["lm_head"])
    out: dict[str, str] = {}
    for stored in ckpt.tensors:
        if stored in consumed:
            continue
        plain = weights[stored].name if stored in weights else stored
        if neuron is not None:
            plain = from_neuron_name(plain, NEURON_SCALE, unprefixed)
        out[plain] = stored
    return out


def _config_dtype(config: dict) -> torch.dtype:
    """The config's float dtype (`torch_dtype` / `dtype`), else bfloat16."""
    name = config.get("torch_dtype") or config.get("dtype")
    try:
        return parse_dtype(name) if isinstance(name, str) else torch.bfloat16
    except QuantscaleError:
        return torch.bfloat16


def read_tensor(directory: Path, info: TensorInfo, stamp: ShardStamp | None = None) -> torch.Tensor:
    """The tensor `info` describes, read from its shard in `directory` (its bytes only).
    With the shard's `stamp` (taken when its header was read), a shard that has been
    replaced or rewritten since is refused instead of read at the old header's offsets."""
    path = directory / info.shard
    data = torch.empty(info.nbytes, dtype=torch.uint8)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: shard file is missing (tensor {info.name!r})") from err
    try:
        changed = stamp.changes(ShardStamp.of(os.fstat(fd))) if stamp is not None else ""
        if changed:
            raise CheckpointError(
                f"{path}: the shard changed after its header was read ({changed}); tensor "
                f"{info.name!r} was not read. A checkpoint must not change during a run: "
                "restore it and rerun (a streamed run resumes from its work dir)"
            )
        read_into(fd, data.numpy().data, info.offset, path, f"tensor {info.name!r}")
    finally:
        os.close(fd)
    return data.view(info.torch_dtype).reshape(info.shape)


def open_source(path: str | os.PathLike) -> TensorSource:
    """Open checkpoint directory `path` as a `TensorSource`."""
    return TensorSource(Checkpoint(path))


def read_dense(source: TensorSource, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every plain tensor of `source` in memory: quantized weights dequantized to `dtype`,
    the rest as stored (the exporters' readers; a whole model, so for small ones)."""
    return {n: source.get(n, dtype if source.is_quantized(n) else None) for n in source.names()}
