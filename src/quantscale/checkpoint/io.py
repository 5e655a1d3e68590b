"""Streaming access to safetensors checkpoint directories.

`Checkpoint` opens a directory read-only, validates its index against the shard headers
(parsed without loading tensor data) and yields tensors shard by shard. `CheckpointWriter`
writes a new directory under a temporary name and renames it into place when complete.
`ShardStream` writes one safetensors file whose tensors are planned up front: the header
first, then each tensor's bytes at its offset as soon as it exists (on a writer thread).
`transform_checkpoint` combines them: with a `plan_fn` one input tensor and a few output
tensors are resident at a time, without one a whole output shard is.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
# The order safetensors' save_file lays tensors out in: by dtype (this order), then by name.
# Wider dtypes come first, so every tensor starts at a multiple of its element size.
SAVE_ORDER = (
    *("I64", "F64", "F32", "I32", "BF16", "F16", "I16"),
    *("F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"),
)
PlannedTensor = tuple[str, torch.dtype, tuple[int, ...]]  # (name, dtype, shape) of an output


@dataclass(frozen=True)
class TensorInfo:
    """What a shard header says about one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: str
    offset: int = field(default=-1, compare=False)  # file position of the first data byte

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
        info = _tensor_info(path, name, entry, data_size, 8 + header_len)
        infos[name] = info
    return infos


def _tensor_info(path: Path, name: str, entry: dict, data_size: int, base: int) -> TensorInfo:
    dtype = entry.get("dtype")
    if dtype not in DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name!r} has dtype {dtype!r}; expected one of {', '.join(DTYPES)}"
        )
    start, end = entry["data_offsets"]
    info = TensorInfo(name, dtype, tuple(entry["shape"]), path.name, base + start)
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


def read_tensor(
    fd: int, info: TensorInfo, path: Path, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Read one tensor's bytes from open shard `fd` at `info.offset` into a new tensor (or
    into `out`, uint8 of `info.nbytes`)."""
    data = torch.empty(info.nbytes, dtype=torch.uint8) if out is None else out
    view = memoryview(data.numpy())
    done = 0
    while done < info.nbytes:
        n = os.preadv(fd, [view[done:]], info.offset + done)
        if n == 0:
            raise CheckpointError(
                f"{path}: truncated file: tensor {info.name!r} ends at byte "
                f"{info.offset + info.nbytes} but the file ends at byte {info.offset + done}"
            )
        done += n
    return data.view(info.torch_dtype).reshape(info.shape)


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

    def read_shard(
        self, shard: str, pool: BufferPool | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for one shard in file order, read with plain reads (no mmap).

        Each tensor owns its memory (taken from `pool` when given), so it is freed or reused
        as soon as the caller drops it or gives it back.
        """
        infos = sorted((self.tensors[n] for n in self.names(shard)), key=lambda i: i.offset)
        path = self.path / shard
        with open(path, "rb", buffering=0) as f:
            for info in infos:
                out = pool.take(info.nbytes) if pool is not None else None
                yield info.name, read_tensor(f.fileno(), info, path, out)

    def extra_files(self) -> list[Path]:
        """Files other than shards, the index and config.json (tokenizer, generation config...)."""
        skip = {INDEX_NAME, CONFIG_NAME, *self.shards}
        return sorted(p for p in self.path.iterdir() if p.is_file() and p.name not in skip)

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())


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
    """Write one safetensors file from a plan: header first, then each tensor, in any order,
    at its planned offset as it arrives. With `threaded`, a writer thread does the writes
    (at most `depth` tensors wait), so the caller computes the next tensor meanwhile.

    Use as a context manager; `close()` raises if a planned tensor never arrived.
    """

    def __init__(
        self,
        path: Path,
        plan: list[PlannedTensor],
        metadata: dict[str, str] | None = None,
        threaded: bool = True,
        depth: int = 2,
    ) -> None:
        header, self.spans = safetensors_header(plan, metadata)
        self.path = Path(path)
        self.planned = {name: (dtype, tuple(shape)) for name, dtype, shape in plan}
        self.missing = set(self.planned)
        self.error: BaseException | None = None
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._write(header, 0)
        os.ftruncate(self.fd, max((end for _, end in self.spans.values()), default=len(header)))
        self.queue: queue.Queue | None = None
        if threaded:
            self.queue = queue.Queue(maxsize=depth)
            self.thread = threading.Thread(target=self._drain, name="shard-writer", daemon=True)
            self.thread.start()

    def __enter__(self) -> ShardStream:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def put(self, name: str, tensor: torch.Tensor, done: Callable[[], None] | None = None) -> None:
        """Queue (or write) one planned tensor; `done()` is called once it is written."""
        if name not in self.missing:
            what = "written twice" if name in self.planned else "not in the plan"
            raise CheckpointError(f"{self.path}: tensor {name!r} {what}")
        dtype, shape = self.planned[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} is {tensor.dtype}{list(tensor.shape)}; the plan "
                f"says {dtype}{list(shape)}"
            )
        self.missing.discard(name)
        data = tensor.contiguous().reshape(-1).view(torch.uint8)
        if self.queue is None:
            self._write(data, self.spans[name][0])
            if done is not None:
                done()
            return
        self._raise_if_failed()
        self.queue.put((data, self.spans[name][0], done))

    def close(self) -> None:
        """Wait for the writes, check every planned tensor arrived, close the file."""
        self._stop()
        self._raise_if_failed()
        if self.missing:
            names = ", ".join(sorted(self.missing)[:5])
            raise CheckpointError(
                f"{self.path}: {len(self.missing)} planned tensors never written ({names})"
            )

    def abort(self) -> None:
        """Stop writing; the caller removes the incomplete file."""
        self._stop()

    def _stop(self) -> None:
        if self.queue is not None:
            self.queue.put(None)
            self.thread.join()
            self.queue = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise CheckpointError(f"{self.path}: write failed ({self.error})") from self.error

    def _drain(self) -> None:
        while (item := self.queue.get()) is not None:
            data, offset, done = item
            if self.error is None:
                try:
                    self._write(data, offset)
                except OSError as err:
                    self.error = err
            del data, item
            if done is not None:
                done()

    def _write(self, data: bytes | torch.Tensor, offset: int) -> None:
        view = memoryview(data.numpy() if isinstance(data, torch.Tensor) else data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)


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

    def open_shard(
        self, shard: str, plan: list[PlannedTensor], threaded: bool = True
    ) -> ShardStream:
        """A `ShardStream` for one shard of planned tensors, recorded in the index."""
        for name, dtype, shape in plan:
            if name in self.weight_map:
                raise CheckpointError(f"tensor {name!r} written twice ({shard})")
            self.weight_map[name] = shard
            self.total_size += math.prod(shape) * dtype.itemsize
        return ShardStream(self.tmp / shard, plan, {"format": "pt"}, threaded)

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
PlanFn = Callable[[str, TensorInfo], list[PlannedTensor]]
Progress = Callable[[Iterator, int, str], Iterator]


def transform_checkpoint(
    src: Checkpoint,
    out: str | os.PathLike,
    tensor_fn: TensorFn,
    config: dict | None,
    overwrite: bool = False,
    progress: Progress | None = None,
    plan_fn: PlanFn | None = None,
    threaded: bool = True,
) -> Path:
    """Stream `src` into `out`, mapping each tensor through `tensor_fn` shard by shard.

    `tensor_fn(name, tensor)` returns the output tensors for that input tensor (any names).
    With `plan_fn(name, info)` saying up front which (name, dtype, shape) `tensor_fn` will
    return, each output tensor is written as soon as it exists (`ShardStream`, on a writer
    thread when `threaded`) and inputs are read with plain reads; otherwise each output shard
    is collected in memory and saved whole.
    `config` is written as config.json (None: none is written). Other files are copied.
    """
    out = Path(out)
    if out.resolve() == src.path.resolve():
        raise OutputExistsError(f"{out}: output must differ from the input checkpoint")
    with CheckpointWriter(out, overwrite=overwrite) as writer:
        if plan_fn is None:
            _collect_shards(src, writer, tensor_fn, progress)
        else:
            _stream_shards(src, writer, tensor_fn, plan_fn, progress, threaded)
        if config is not None:
            writer.write_json(CONFIG_NAME, config)
        for extra in src.extra_files():
            writer.copy_file(extra)
        return writer.commit(write_index=src.index is not None or len(src.shards) > 1)


def _collect_shards(
    src: Checkpoint, writer: CheckpointWriter, tensor_fn: TensorFn, progress: Progress | None
) -> None:
    """Map every tensor, holding each output shard in memory until it is saved whole."""
    names = [(shard, name) for shard in src.shards for name in src.names(shard)]
    steps = iter(names)
    if progress is not None:
        steps = progress(steps, len(names), f"writing {writer.out.name}")
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


def _stream_shards(
    src: Checkpoint,
    writer: CheckpointWriter,
    tensor_fn: TensorFn,
    plan_fn: PlanFn,
    progress: Progress | None,
    threaded: bool,
) -> None:
    """Map every tensor, writing each output as soon as `tensor_fn` returns it.

    A reader thread reads the next input into a reused buffer meanwhile; a buffer returns to
    the pool once no output that shares its memory still waits to be written.
    """
    pool = BufferPool()
    reads = ((shard, *item) for shard in src.shards for item in src.read_shard(shard, pool))
    reads = _prefetch(reads) if threaded else reads
    items = (
        reads
        if progress is None
        else progress(reads, len(src.tensors), f"writing {writer.out.name}")
    )
    stream: ShardStream | None = None
    plans: dict[str, list[PlannedTensor]] = {}
    try:
        for shard, name, tensor in items:
            if stream is None or stream.path.name != shard:
                if stream is not None:
                    stream.close()
                plans = {n: list(plan_fn(n, src.tensors[n])) for n in src.names(shard)}
                plan = [(n, d, tuple(s)) for p in plans.values() for n, d, s in p]
                stream = writer.open_shard(shard, plan, threaded)
            outputs = tensor_fn(name, tensor)
            storage, tensor = tensor.untyped_storage(), None
            planned = sorted(p[0] for p in plans[name])
            if sorted(outputs) != planned:
                raise CheckpointError(
                    f"{src.path / shard}: tensor {name!r} gave outputs {sorted(outputs)} but "
                    f"the plan said {planned}"
                )
            _put_all(stream, outputs, storage, pool)
        if stream is not None:
            stream.close()
    except BaseException:
        if stream is not None:
            stream.abort()
        raise
    finally:
        reads.close()


def _put_all(
    stream: ShardStream,
    outputs: dict[str, torch.Tensor],
    storage: torch.UntypedStorage,
    pool: BufferPool,
) -> None:
    """Queue `outputs`; give the input's `storage` back to `pool` once the last output that
    shares it is written."""
    ptr = storage.data_ptr()
    sharing = [n for n, v in outputs.items() if v.untyped_storage().data_ptr() == ptr]
    for name, value in outputs.items():
        last = bool(sharing) and name == sharing[-1]
        stream.put(name, value, done=(lambda: pool.give(storage)) if last else None)
    if not sharing:
        pool.give(storage)


class BufferPool:
    """Reusable memory for large tensors read from disk: reading into pages already faulted
    in costs about half as much as into fresh ones. At most `keep` buffers wait for reuse."""

    MIN_BYTES = 1 << 20  # smaller tensors come from malloc's heap, cheap already

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.free: list[torch.UntypedStorage] = []
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of `nbytes`, in a reused buffer when one fits."""
        with self.lock:
            fits = (
                [s for s in self.free if s.nbytes() >= nbytes] if nbytes >= self.MIN_BYTES else []
            )
            if not fits:
                return torch.empty(nbytes, dtype=torch.uint8)
            best = min(fits, key=lambda s: s.nbytes())
            self.free.remove(best)
        return torch.empty(0, dtype=torch.uint8).set_(best, 0, (nbytes,), (1,))

    def give(self, storage: torch.UntypedStorage) -> None:
        """Offer `storage` for reuse: the caller keeps no tensor on it."""
        if storage.nbytes() < self.MIN_BYTES:
            return
        with self.lock:
            self.free.append(storage)
            if len(self.free) > self.keep:
                self.free.remove(min(self.free, key=lambda s: s.nbytes()))


def _prefetch(items: Iterator, depth: int = 1) -> Iterator:
    """Iterate `items` on a thread, at most `depth` items ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def fill() -> None:
        try:
            for item in items:
                q.put((True, item))
                if stop.is_set():
                    return
            q.put((False, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            q.put((False, err))

    thread = threading.Thread(target=fill, name="shard-reader", daemon=True)
    thread.start()
    try:
        while True:
            more, value = q.get()
            if not more:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()
