"""Writing safetensors checkpoint directories.

`CheckpointWriter` writes a new directory under a temporary name and renames it into place
when complete. `ShardStream` writes one shard from a plan: the header first (the same bytes
as safetensors' `save_file`), the file sized up front, each tensor's bytes put at its offset
as they come.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantscale.checkpoint.read import DTYPE_NAMES, INDEX_NAME, SINGLE_NAME
from quantscale.errors import CheckpointError, OutputExistsError

# The order safetensors' save_file lays tensors out in: by dtype (this order), then by name.
# Wider dtypes come first, so every tensor starts at a multiple of its element size.
SAVE_ORDER = (
    *("I64", "F64", "F32", "I32", "BF16", "F16", "I16"),
    *("F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"),
)
PlannedTensor = tuple[str, torch.dtype, tuple[int, ...]]  # (name, dtype, shape) of an output
SHARD_METADATA = {"format": "pt"}  # the __metadata__ every written shard carries


def safetensors_header(
    plan: list[PlannedTensor], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The bytes before the data section of a safetensors file holding `plan`, and each
    tensor's (start, end) in the file. Same layout and bytes as safetensors' `save_file`."""
    known = []
    for name, dtype, shape in plan:
        if dtype not in DTYPE_NAMES:
            raise CheckpointError(f"tensor {name!r}: dtype {dtype} cannot be saved")
        known.append((SAVE_ORDER.index(DTYPE_NAMES[dtype]), name, dtype, tuple(shape)))
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    spans: dict[str, tuple[int, int]] = {}
    pos = 0
    for _, name, dtype, shape in sorted(known, key=lambda k: k[:2]):
        if name in spans:
            raise CheckpointError(f"tensor {name!r} planned twice")
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape)}
        header[name]["data_offsets"] = [pos, pos + size]
        spans[name] = (pos, pos + size)
        pos += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    base = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {
        n: (a + base, b + base) for n, (a, b) in spans.items()
    }


class ShardStream:
    """Write one safetensors file from a plan: header first, then each planned tensor, whole,
    by rows or as raw bytes, in any order, at its planned offset. Use as a context manager;
    `close()` raises if a planned byte never came.
    """

    def __init__(
        self, path: Path, plan: list[PlannedTensor], metadata: dict[str, str] | None = None
    ) -> None:
        header, self.spans = safetensors_header(plan, metadata)
        self.path = Path(path)
        self.planned = {name: (dtype, tuple(shape)) for name, dtype, shape in plan}
        self.left = {name: end - start for name, (start, end) in self.spans.items()}
        self.touched: set[str] = set()
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(self.fd, max((end for _, end in self.spans.values()), default=len(header)))
            self._write(header, 0)
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> ShardStream:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Write one whole planned tensor."""
        dtype, shape = self._expect(name)
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} is {tensor.dtype}{list(tensor.shape)}; the plan "
                f"says {dtype}{list(shape)}"
            )
        self._put(name, tensor, 0, full=True)

    def put_rows(self, name: str, tensor: torch.Tensor, first_row: int) -> None:
        """Write rows [first_row, first_row + len(tensor)) of a planned tensor."""
        dtype, shape = self._expect(name)
        rows = shape[0] if shape else 0
        if (
            tensor.dtype != dtype
            or tuple(tensor.shape[1:]) != shape[1:]
            or not 0 <= first_row <= rows - tensor.shape[0]
        ):
            raise CheckpointError(
                f"{self.path}: rows {first_row}.. of {tensor.dtype}{list(tensor.shape)} do not "
                f"fit tensor {name!r} ({dtype}{list(shape)} in the plan)"
            )
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        self._put(name, tensor, first_row * row_bytes)

    def put_bytes(self, name: str, data: torch.Tensor, start: int) -> None:
        """Write raw bytes (uint8) at byte `start` of a planned tensor's data."""
        self._expect(name)
        size = self.spans[name][1] - self.spans[name][0]
        if data.dtype != torch.uint8 or not 0 <= start <= size - data.numel():
            raise CheckpointError(
                f"{self.path}: {data.numel()} bytes at {start} do not fit tensor {name!r} "
                f"({size} bytes)"
            )
        self._put(name, data, start)

    def unwritten(self, names: list[str] | tuple[str, ...]) -> list[str]:
        """Which of `names` still miss bytes."""
        return [n for n in names if self.left.get(n)]

    def close(self) -> None:
        """Check every planned byte arrived and close the file."""
        self.abort()
        missing = self.unwritten(sorted(self.left))
        if missing:
            raise CheckpointError(
                f"{self.path}: {len(missing)} planned tensors never written "
                f"({', '.join(missing[:5])})"
            )

    def abort(self) -> None:
        """Close the file; the caller removes it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _expect(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        if name not in self.planned:
            raise CheckpointError(f"{self.path}: tensor {name!r} not in the plan")
        return self.planned[name]

    def _put(self, name: str, tensor: torch.Tensor, start: int, full: bool = False) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if (full and name in self.touched) or self.left[name] < nbytes:
            raise CheckpointError(f"{self.path}: tensor {name!r} written twice")
        self.touched.add(name)
        self.left[name] -= nbytes
        if nbytes:
            data = tensor.contiguous().reshape(-1).view(torch.uint8)
            self._write(data, self.spans[name][0] + start)

    def _write(self, data: bytes | torch.Tensor, offset: int) -> None:
        view = data.numpy().data if isinstance(data, torch.Tensor) else memoryview(data)
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as err:
            raise CheckpointError(f"{self.path}: write failed ({err})") from err


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove `.OUT.tmp-PID-*` directories left by a killed writer of `out` (PID not running)."""
    removed = []
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        pid = tmp.name[len(f".{out.name}.tmp-") :].split("-", 1)[0]
        if tmp.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
            print(f"removed stale temporary {tmp} (writer pid {pid} is gone)", file=sys.stderr)
    return removed


def check_output(out: Path, overwrite: bool) -> None:
    """Raise unless `out` is free or may be replaced."""
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: already exists (pass --overwrite to replace it)")


class CheckpointWriter:
    """Write a checkpoint directory under a temporary name; `commit()` renames it into place.

    Use as a context manager: on an exception the temporary directory is removed and any
    existing output is left untouched.
    """

    def __init__(
        self, out: str | os.PathLike, overwrite: bool = False, staging: Path | None = None
    ) -> None:
        self.out = Path(out)
        check_output(self.out, overwrite)
        self.overwrite = overwrite
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out)
        if staging is not None:  # shards already there, written by other processes
            self.tmp = staging
        else:
            prefix = f".{self.out.name}.tmp-{os.getpid()}-"
            self.tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=self.out.parent))
            self.tmp.chmod(0o777 & ~current_umask())  # as a plain mkdir would, not mkdtemp's
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
        save_file(tensors, str(self.tmp / shard), metadata=SHARD_METADATA)

    def open_shard(self, shard: str, plan: list[PlannedTensor]) -> ShardStream:
        """A `ShardStream` for one shard of planned tensors, recorded in the index."""
        self.record_shard(shard, plan)
        return ShardStream(self.tmp / shard, plan, SHARD_METADATA)

    def record_shard(self, shard: str, plan: list[PlannedTensor]) -> None:
        """Record one shard's planned tensors in the index (the shard is written elsewhere)."""
        for name, dtype, shape in plan:
            if name in self.weight_map:
                raise CheckpointError(f"tensor {name!r} written twice ({shard})")
            self.weight_map[name] = shard
            self.total_size += math.prod(shape) * dtype.itemsize

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
