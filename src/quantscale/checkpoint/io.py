"""Streaming access to safetensors checkpoint directories.

`Checkpoint` opens a directory read-only, validates its index against the shard headers
(parsed without loading tensor data) and yields tensors shard by shard. `CheckpointWriter`
writes a new directory under a temporary name and renames it into place when complete.
`transform_checkpoint` combines both: one input shard resident at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantscale.errors import CheckpointError, OutputExistsError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
DTYPE_NAMES = {dt: name for name, (dt, _) in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """What a shard header says about one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * DTYPES[self.dtype][1]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header: known dtypes, offsets inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise CheckpointError(
                    f"{path}: truncated or not a safetensors file (header of {header_len} bytes, "
                    f"file of {size})"
                )
            header = json.loads(f.read(header_len))
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: shard file is missing") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors header ({err})") from err
    data_size = size - 8 - header_len
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        info = _tensor_info(path, name, entry, data_size)
        infos[name] = info
    return infos


def _tensor_info(path: Path, name: str, entry: dict, data_size: int) -> TensorInfo:
    dtype = entry.get("dtype")
    if dtype not in DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name!r} has dtype {dtype!r}; expected one of {', '.join(DTYPES)}"
        )
    info = TensorInfo(name, dtype, tuple(entry["shape"]), path.name)
    start, end = entry["data_offsets"]
    if end - start != info.nbytes:
        raise CheckpointError(
            f"{path}: tensor {name!r} spans {end - start} bytes but {dtype}{list(info.shape)} "
            f"needs {info.nbytes}"
        )
    if end > data_size:
        raise CheckpointError(
            f"{path}: truncated file: tensor {name!r} ends at byte {end} of the data section "
            f"but the file holds only {data_size} data bytes"
        )
    return info


class Checkpoint:
    """A safetensors checkpoint directory (single file or sharded with an index), read-only."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint directory")
        self.config = self._read_json(CONFIG_NAME)
        self.index = self._read_json(INDEX_NAME)
        self.shards = self._shard_names()
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self.shards:
            self.tensors.update(read_header(self.path / shard))
        self._check_index()

    def _read_json(self, name: str) -> dict | None:
        file = self.path / name
        if not file.exists():
            return None
        try:
            return json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{file}: invalid JSON ({err})") from err

    def _shard_names(self) -> list[str]:
        if self.index is not None:
            weight_map = self.index.get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{self.path / INDEX_NAME}: no 'weight_map' object")
            return sorted(set(weight_map.values()))
        shards = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{self.path}: no *.safetensors files and no {INDEX_NAME}")
        return shards

    def _check_index(self) -> None:
        if self.index is None:
            return
        index_file = self.path / INDEX_NAME
        for name, shard in self.index["weight_map"].items():
            info = self.tensors.get(name)
            if info is None or info.shard != shard:
                raise CheckpointError(
                    f"{index_file}: tensor {name!r} is mapped to {shard} but that shard does "
                    "not hold it"
                )
        mapped = set(self.index["weight_map"])
        for name, info in self.tensors.items():
            if name not in mapped:
                raise CheckpointError(
                    f"{index_file}: tensor {name!r} in {info.shard} is missing from the index"
                )

    @property
    def quantization_config(self) -> dict | None:
        return (self.config or {}).get("quantization_config")

    def names(self, shard: str | None = None) -> list[str]:
        """Tensor names in file order of one shard, or of all shards."""
        return [n for n, i in self.tensors.items() if shard is None or i.shard == shard]

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        with safe_open(self.path / info.shard, framework="pt") as f:
            return f.get_tensor(name)

    def iter_shard(self, shard: str) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for one shard, loading one tensor at a time."""
        with safe_open(self.path / shard, framework="pt") as f:
            for name in self.names(shard):
                yield name, f.get_tensor(name)

    def extra_files(self) -> list[Path]:
        """Files other than shards, the index and config.json (tokenizer, generation config...)."""
        skip = {INDEX_NAME, CONFIG_NAME, *self.shards}
        return sorted(p for p in self.path.iterdir() if p.is_file() and p.name not in skip)

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())


class CheckpointWriter:
    """Write a checkpoint directory under a temporary name; `commit()` renames it into place.

    Use as a context manager: on an exception the temporary directory is removed and any
    existing output is left untouched.
    """

    def __init__(self, out: str | os.PathLike, overwrite: bool = False) -> None:
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise OutputExistsError(f"{self.out}: already exists (pass --overwrite to replace it)")
        self.overwrite = overwrite
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def write_shard(self, shard: str, tensors: dict[str, torch.Tensor]) -> None:
        """Save one shard of tensors (made contiguous) and record them in the index."""
        for name, tensor in tensors.items():
            if name in self.weight_map:
                raise CheckpointError(f"tensor {name!r} written twice ({shard})")
            self.weight_map[name] = shard
            self.total_size += tensor.numel() * tensor.element_size()
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, str(self.tmp / shard), metadata={"format": "pt"})

    def write_json(self, name: str, obj: dict) -> None:
        (self.tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def copy_file(self, src: Path) -> None:
        shutil.copy2(src, self.tmp / src.name)

    def commit(self, write_index: bool = True) -> Path:
        """Write the index (when asked or when there are several shards) and rename into place."""
        shards = set(self.weight_map.values())
        if write_index and (len(shards) > 1 or SINGLE_NAME not in shards):
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            self.write_json(INDEX_NAME, index)
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            self.out.rename(old)
            self.tmp.rename(self.out)
            shutil.rmtree(old)
        else:
            self.tmp.rename(self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


TensorFn = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


def transform_checkpoint(
    src: Checkpoint,
    out: str | os.PathLike,
    tensor_fn: TensorFn,
    config: dict | None,
    overwrite: bool = False,
    progress: Callable[[Iterator, int, str], Iterator] | None = None,
) -> Path:
    """Stream `src` into `out`, mapping each tensor through `tensor_fn` shard by shard.

    `tensor_fn(name, tensor)` returns the output tensors for that input tensor (any names).
    `config` is written as config.json (None: none is written). Other files are copied.
    """
    out = Path(out)
    if out.resolve() == src.path.resolve():
        raise OutputExistsError(f"{out}: output must differ from the input checkpoint")
    names = [(shard, name) for shard in src.shards for name in src.names(shard)]
    with CheckpointWriter(out, overwrite=overwrite) as writer:
        steps = iter(names)
        if progress is not None:
            steps = progress(steps, len(names), f"writing {out.name}")
        current: str | None = None
        handle = None
        pending: dict[str, torch.Tensor] = {}
        for shard, name in steps:
            if shard != current:
                if current is not None:
                    writer.write_shard(current, pending)
                    pending = {}
                handle = safe_open(src.path / shard, framework="pt")
                current = shard
            pending.update(tensor_fn(name, handle.get_tensor(name)))
        if current is not None:
            writer.write_shard(current, pending)
        if config is not None:
            writer.write_json(CONFIG_NAME, config)
        for extra in src.extra_files():
            writer.copy_file(extra)
        return writer.commit(write_index=src.index is not None or len(src.shards) > 1)
