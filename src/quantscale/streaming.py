"""The layer-streamed quantize path: host memory is one decoder layer plus the activations
between layers, whatever the model's size; a killed run resumes from its last finished layer.

`quantize_streamed(source_dir, out, recipe, method, ...)` builds the model of the source's
config.json on the meta device (`models.skeleton`), then for the embeddings, each decoder layer
and the head in turn: reads only that part's tensors from the source (`checkpoint.source`,
dequantized as they load when the source is quantized) onto the device, runs the same per-layer
calibration and weight algorithm as the in-memory path (`algorithms.layer.quantize_layer`),
writes the part's quantized tensors at once (`export.stream.PartWriter`), and frees it. The
layer's outputs, the next layer's inputs, are saved in the work directory
(`calibration.boundary`); with the part shards and a progress record (the options'
fingerprint and the number of finished parts) they let the same command continue after a
kill, with byte-identical output. A different command refuses the work directory and names
what differs. The output is the in-memory path's checkpoint tensor for tensor (split into one
shard per part).

With several ranks (torchrun, `quantscale.distributed`) each rank calibrates its share of
the batches and keeps its boundary activations in `<work dir>/rank-<r>/`; rank 0 alone
writes the parts, the output and the progress record, which also names every rank's saved
boundary. A layer is recorded only once every rank has saved its boundary, and the older
boundaries are removed only after that, so the same command resumes all ranks from the last
layer they all finished.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantscale import distributed, progress
from quantscale.algorithms.base import WeightAlgorithm, get_algorithm
from quantscale.algorithms.layer import (
    by_layer,
    calibrate_group,
    quantize_data_free,
    quantize_layer,
    refuse_tied_linears,
)
from quantscale.calibration.activations import has_static_activations
from quantscale.calibration.boundary import Boundary, BoundaryFile
from quantscale.calibration.sequential import (
    LayerStep,
    as_batches,
    capture_layer_arguments,
    layer_output,
    next_inputs,
)
from quantscale.checkpoint.dequantize import parse_dtype
from quantscale.checkpoint.runtimes import ragged_group_warnings
from quantscale.checkpoint.source import open_source
from quantscale.errors import QuantscaleError
from quantscale.export.base import model_config
from quantscale.export.stream import STREAM_FORMATS, PartWriter, part_tensors
from quantscale.models.adapter import causal_lm, decoder_layers
from quantscale.models.moe import calibrate_all_experts, expert_modules, log_expert_coverage
from quantscale.models.skeleton import Skeleton
from quantscale.runtime.qlinear import QuantLinear, replace_linears
from quantscale.scheme import Recipe

log = logging.getLogger(__name__)
RECORD = "progress.json"
KILL_AFTER_ENV = "QUANTSCALE_TEST_KILL_AFTER_LAYER"  # test hook: SIGKILL after layer k
KILL_RANK_ENV = "QUANTSCALE_TEST_KILL_RANK"  # ... on this rank only (default 0)


@dataclass(frozen=True)
class StreamOptions:
    """Where and how the streamed path runs (the `--work-dir`, `--device`, `--max-memory`
    flags). `work_dir` defaults to OUT + '.partial'; `max_memory` (bytes) bounds the
    activations held in memory (None: no bound)."""

    work_dir: str | os.PathLike | None = None
    device: str = "auto"
    max_memory: int | None = None


def resolve_device(spec: str) -> torch.device:
    """'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N' -> a device that exists."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise QuantscaleError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise QuantscaleError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise QuantscaleError(f"--device {spec!r}: this machine has {count} CUDA devices")
    return device


def source_digest(path: str | os.PathLike) -> str:
    """sha256 over config.json, the index and every shard's name, size and header bytes."""
    root = Path(path)
    h = hashlib.sha256()
    for file in sorted(root.glob("*.json")) + sorted(root.glob("*.safetensors")):
        h.update(file.name.encode() + b"\0" + str(file.stat().st_size).encode() + b"\0")
        with open(file, "rb") as f:
            if file.suffix == ".json":
                h.update(f.read())
            else:
                head = f.read(8)
                h.update(head + f.read(int.from_bytes(head, "little")) if len(head) == 8 else b"")
    return h.hexdigest()


def tokens_digest(batches: list[torch.Tensor]) -> str:
    """sha256 of the calibration token ids, batch by batch."""
    h = hashlib.sha256()
    for ids in batches:
        h.update(str(list(ids.shape)).encode())
        h.update(ids.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------ the work directory


def _differences(old: dict, new: dict) -> list[str]:
    def short(v: Any) -> str:
        text = json.dumps(v, sort_keys=True)
        return text if len(text) <= 60 else text[:57] + "..."

    keys = sorted(set(old) | set(new))
    return [
        f"{k}: {short(old.get(k))} then, {short(new.get(k))} now"
        for k in keys
        if old.get(k) != new.get(k)
    ]


class WorkDir:
    """The resume state: progress record, part shards, the last boundary activations (with
    several ranks: rank 0's, whose record names the other ranks' boundaries too)."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict) -> None:
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.done = 0
        self.boundary: BoundaryFile | None = None
        self.rank_boundaries: list[dict | None] = []  # ranks 1.. of a distributed run
        self.follows = False
        record = self.path / RECORD
        if record.is_file():
            self._resume(json.loads(record.read_text()))
        elif self.path.exists() and any(self.path.iterdir()):
            raise QuantscaleError(
                f"{self.path}: work directory exists, is not empty and holds no {RECORD}; "
                "remove it or pass another --work-dir"
            )
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self._write(0, None, [])

    def _resume(self, record: dict) -> None:
        diff = _differences(record.get("fingerprint", {}), self.fingerprint)
        if diff:
            raise QuantscaleError(
                f"{self.path}: this work directory belongs to a run with other options ("
                + "; ".join(diff)
                + "); rerun that command to resume it, or remove the directory or pass "
                "another --work-dir"
            )
        self.done = int(record["done"])
        self.rank_boundaries = record.get("rank_boundaries", [])
        if record.get("boundary"):
            self.boundary = BoundaryFile.from_json(record["boundary"])
        if self.done:
            log.info("%s: resuming after %d finished parts", self.path, self.done)

    @classmethod
    def follower(cls, path: Path, done: int, boundary: dict | None) -> WorkDir:
        """Rank r > 0's view: its own boundary directory, rank 0's record the progress."""
        self = cls.__new__(cls)
        self.path, self.fingerprint, self.follows = path, {}, True
        self.path.mkdir(parents=True, exist_ok=True)
        self.done, self.rank_boundaries = done, []
        self.boundary = BoundaryFile.from_json(boundary) if boundary else None
        return self

    def save(self, done: int, boundary: BoundaryFile | None) -> None:
        """Record `done` finished parts (and the saved inputs of the next layer), atomically;
        with several ranks (every rank calls this) once every rank has saved its boundary."""
        if distributed.active():
            every = distributed.gather_objects(boundary.to_json() if boundary else None)
            if not self.follows:
                self._write(done, boundary, every[1:])
            distributed.barrier()
        else:
            self._write(done, boundary, [])
        self.done, self.boundary = done, boundary

    def _write(self, done: int, boundary: BoundaryFile | None, others: list) -> None:
        record: dict[str, Any] = {
            "fingerprint": self.fingerprint,
            "done": done,
            "boundary": boundary.to_json() if boundary else None,
        }
        if others:
            record["rank_boundaries"] = others
        tmp = self.path / f".{RECORD}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(record, indent=1, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / RECORD)


# ------------------------------------------------------------------ the streamed run


def _to(obj: Any, device: torch.device) -> Any:
    """Tensors inside nested tuples / lists / dicts moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.inference_mode()
def _outputs(step: LayerStep) -> Iterator[torch.Tensor]:
    """The layer's hidden-state output for each cached batch, one at a time."""
    for args, kwargs in step.inputs:
        yield layer_output(step.layer(*args, **kwargs))


def _forward(step: LayerStep) -> None:
    for _ in _outputs(step):
        pass


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc's malloc_trim): without
    it the freed layers' pages stay resident and RSS creeps up layer after layer (measured on
    a 939 MB 8-layer model: 0.72 -> 1.10 GiB between layers without, flat 0.39 GiB with)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def peak_rss() -> int:
    """Peak resident memory of this process so far, bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class _Clock:
    total: int
    start: float = field(default_factory=time.perf_counter)
    first: int | None = None

    def report(self, done: int, label: str) -> None:
        """One progress line: part written, elapsed, estimated time left, peak RSS."""
        self.first = done - 1 if self.first is None else self.first
        elapsed = time.perf_counter() - self.start
        left = elapsed / (done - self.first) * (self.total - done)
        line = (
            f"wrote {label} ({done}/{self.total}): {elapsed:.1f} s elapsed, ~{left:.0f} s left, "
            f"peak RSS {peak_rss() / 2**30:.2f} GiB"
        )
        log.info(line)
        if progress.enabled() and distributed.is_writer():
            print(line, file=sys.stderr, flush=True)


class StreamedRun:
    """One streamed quantization job; `run()` does it (see the module docstring)."""

    def __init__(
        self,
        source_dir: str | os.PathLike,
        recipe: Recipe,
        algorithm: WeightAlgorithm,
        data: list[torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        sequential: bool,
        all_experts: bool = True,
        fmt: str = "compressed-tensors",
    ) -> None:
        self.all_experts, self.fmt = all_experts, fmt
        self.source_dir = Path(source_dir)
        self.source = open_source(source_dir)
        self.skeleton = Skeleton.build(self.source.config, dtype, str(source_dir))
        self.model = self.skeleton.model
        refuse_tied_linears(self.model, recipe)
        self.linears = replace_linears(self.model, recipe)
        if not self.linears:
            raise QuantscaleError("the recipe targets no Linear module of this model")
        ragged_group_warnings(self.linears)
        self.recipe, self.algorithm, self.data = recipe, algorithm, data
        self.device, self.sequential = device, sequential
        self.prefix, self.layers = decoder_layers(self.model)
        self.groups = by_layer(self.linears, self.prefix, len(self.layers))
        self.embed = _module_name(self.model, causal_lm(self.model).get_input_embeddings())
        schemes = [ql.scheme for ql in self.linears.values()]
        self.needs_data = has_static_activations(schemes) or algorithm.needs_data
        if self.needs_data and not data:
            raise QuantscaleError("static activations or this method need calibration batches")
        self.n_parts = len(self.layers) + 2
        self.inputs: list[tuple[tuple, dict]] = []
        self.arguments: list[list[tuple[tuple, dict]]] = []  # per layer, per batch

    def run(self, work: WorkDir, boundary: Boundary, out: Path, overwrite: bool) -> Path:
        parts = PartWriter(work.path, self.n_parts, self.source.config.get("model_type"))
        missing = parts.missing(work.done) if distributed.is_writer() else []
        if missing:
            raise QuantscaleError(f"{work.path}: finished parts missing: {', '.join(missing)}")
        clock = _Clock(self.n_parts)
        experts = bool(expert_modules(self.model))
        with calibrate_all_experts(self.model, enabled=self.all_experts and experts):
            self._start(work, boundary, parts, clock)
            for i in range(max(work.done - 1, 0), len(self.layers)):
                self._layer(i, work, boundary, parts, clock)
                release_memory()
            if work.done < self.n_parts:
                self._head(work, parts, clock)
        if experts:  # the layers of this run (a resumed run counts only those it did)
            log_expert_coverage(self.model, all_tokens=self.all_experts)
        if not distributed.is_writer():
            return out
        if self.fmt == "compressed-tensors":
            config = model_config(self.model)
            config["quantization_config"] = self.recipe.to_quantization_config("compressed")
            return parts.finish(out, config, self.source_dir, overwrite)
        config, extra = parts.format_files(self.fmt, self.model)
        return parts.finish(out, config, self.source_dir, overwrite, extra)

    def _start(self, work: WorkDir, boundary: Boundary, parts: PartWriter, clock: _Clock) -> None:
        """The embeddings: written first; they give layer 0 its inputs (and every layer its
        attention mask and position embeddings)."""
        layer_next = max(work.done - 1, 0)
        if work.done >= self.n_parts or (work.done and not self.needs_data):
            return
        self.skeleton.load(self.embed, self.source)
        if self.needs_data and layer_next < len(self.layers):
            self.arguments = capture_layer_arguments(self.model, self.layers, self.data)
            self.inputs = self.arguments[0]
            if layer_next > 0:
                assert work.boundary is not None, "a resumed calibrated run has saved inputs"
                hidden = boundary.load(work.boundary)
                self.inputs = next_inputs(hidden, self.arguments[layer_next])
        if work.done == 0:
            embed = part_tensors(self.model, "", _under(self.embed), self.skeleton.tied, self.fmt)
            _write_part(parts, 0, embed)
            work.save(1, None)
            clock.report(1, self.embed)
        self.skeleton.release(self.embed)

    def _layer(
        self, i: int, work: WorkDir, boundary: Boundary, parts: PartWriter, clock: _Clock
    ) -> None:
        name = f"{self.prefix}.{i}"
        distributed.context().where = name
        layer = self.layers[i]
        self.skeleton.load(name, self.source, self.device)
        group = self.groups[i]
        step = LayerStep(i, name, layer, [_to(x, self.device) for x in self.inputs])
        if self.needs_data:
            run = functools.partial(_forward, step)
            quantize_layer(step, group, self.algorithm, self.sequential, run)
        else:
            quantize_data_free(group, self.algorithm)
        _write_part(parts, i + 1, part_tensors(layer, name, fmt=self.fmt))
        saved = None
        if self.needs_data and i + 1 < len(self.layers):
            saved, hidden = boundary.save(i + 1, _outputs(step))
            self.inputs = next_inputs(hidden, self.arguments[i + 1])
        work.save(i + 2, saved)
        boundary.prune(saved.name if saved else None)
        self.skeleton.release(name)
        clock.report(i + 2, name)
        rank = str(distributed.context().rank)
        if os.environ.get(KILL_AFTER_ENV) == str(i) and os.environ.get(KILL_RANK_ENV, "0") == rank:
            os.kill(os.getpid(), signal.SIGKILL)

    def _head(self, work: WorkDir, parts: PartWriter, clock: _Clock) -> None:
        """Everything outside the embeddings and the decoder layers (final norm, lm_head)."""
        keep = self._head_keep()
        distributed.context().where = "head"
        self.skeleton.load("", self.source, keep=keep)
        rest: dict[str, QuantLinear] = {n: q for n, q in self.linears.items() if keep(n)}
        if rest and self.needs_data:
            # as in memory: nothing outside the decoder runs these during calibration
            calibrate_group(rest, self.algorithm, lambda: None)
        elif rest:
            quantize_data_free(rest, self.algorithm)
        head = part_tensors(self.model, "", keep, self.skeleton.tied, self.fmt)
        _write_part(parts, self.n_parts - 1, head)
        work.save(self.n_parts, None)
        self.skeleton.release("", keep=keep)
        clock.report(self.n_parts, "head")

    def _head_keep(self) -> Callable[[str], bool]:
        inside = (f"{self.prefix}.", f"{self.embed}.")
        secondary = {n for n, group in self.skeleton.aliases.items() if group[0] != n}
        if self.skeleton.tied and any(f"{n}.weight" in secondary for n in self.linears):
            raise QuantscaleError("streaming cannot quantize an lm_head tied to the embeddings")
        return lambda n: not n.startswith(inside) and n not in secondary


def _write_part(parts: PartWriter, index: int, tensors: dict[str, torch.Tensor]) -> None:
    if distributed.is_writer():  # with several ranks every one holds the same tensors
        parts.write(index, tensors)


def _open_work(path: Path, fingerprint: dict) -> WorkDir:
    """Rank 0 opens (or resumes) the work directory; the other ranks follow its record."""
    if not distributed.active():
        return WorkDir(path, fingerprint)
    work = WorkDir(path, fingerprint) if distributed.is_writer() else None
    done, others = distributed.gather_objects(
        (work.done, work.rank_boundaries) if work is not None else None
    )[0]
    if work is not None:
        return work
    rank = distributed.context().rank
    return WorkDir.follower(path / f"rank-{rank}", done, others[rank - 1] if others else None)


def _under(prefix: str) -> Callable[[str], bool]:
    return lambda n: n.startswith(prefix + ".")


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def quantize_streamed(
    source_dir: str | os.PathLike,
    out: str | os.PathLike,
    recipe: Recipe,
    method: str = "gptq",
    *,
    method_options: dict[str, Any] | None = None,
    batches: torch.Tensor | None = None,
    batch_size: int = 4,
    dtype: str = "bfloat16",
    fmt: str = "compressed-tensors",
    true_sequential: bool | None = None,
    all_experts: bool = True,
    settings: dict[str, Any] | None = None,
    options: StreamOptions = StreamOptions(),
    overwrite: bool = False,
) -> Path:
    """Quantize checkpoint `source_dir` into `out` layer by layer (see the module docstring).
    `settings`: the calibration options as given (recorded in the resume fingerprint);
    `all_experts`: MoE experts calibrated on every token (`models.moe.calibrate_all_experts`)."""
    if fmt not in STREAM_FORMATS:
        raise QuantscaleError(
            f"--stream writes {', '.join(STREAM_FORMATS)}; format {fmt!r} needs the in-memory "
            "path (omit --stream)"
        )
    distributed.init_from_env()
    algorithm = get_algorithm(method, **(method_options or {}))
    sequential = algorithm.true_sequential if true_sequential is None else true_sequential
    data = as_batches(batches, batch_size)
    device = resolve_device(options.device)
    run = StreamedRun(
        source_dir,
        recipe,
        algorithm,
        distributed.rank_slice(data) if data else data,
        parse_dtype(dtype),
        device,
        sequential,
        all_experts,
        fmt,
    )
    fingerprint: dict[str, Any] = {
        "scheme": recipe.model_dump(mode="json"),
        "method": method,
        "method_options": method_options or {},
        "calibration": settings or {},
        "tokens": tokens_digest(data) if run.needs_data else None,
        "dtype": dtype,
        "format": fmt,
        "true_sequential": sequential,
        "calibrate_all_experts": all_experts,
        "device": device.type,
        "source": str(Path(source_dir).resolve()),
        "source_digest": source_digest(source_dir),
    }
    if distributed.active():
        fingerprint["ranks"] = distributed.context().world
    work_path = Path(options.work_dir or f"{os.fspath(out)}.partial")
    work = _open_work(work_path, fingerprint)
    result = run.run(work, Boundary(work.path, options.max_memory), Path(out), overwrite)
    if work.follows:  # its own boundary directory (on its node's disk when not shared)
        shutil.rmtree(work.path, ignore_errors=True)
    distributed.barrier()
    if distributed.is_writer():
        shutil.rmtree(work_path)
    return result
