"""Stream a checkpoint into a new one, mapping each tensor to its outputs.

`transform_checkpoint` with a `plan_fn` plans each shard's outputs up front (a `ShardStream`
per shard), reads its inputs with a `ShardReader` and copies each tensor as raw bytes, maps it
band of rows by band of rows, or maps it whole, in steps of about `CHUNK_BYTES`: the reader
thread reads a few steps ahead of the calling thread, which computes and writes.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from quantscale.checkpoint.read import (
    CHUNK_BYTES,
    CONFIG_NAME,
    Checkpoint,
    Piece,
    ShardReader,
    TensorInfo,
)
from quantscale.checkpoint.write import CheckpointWriter, PlannedTensor, ShardStream
from quantscale.errors import CheckpointError, OutputExistsError, QuantscaleError


@dataclass(frozen=True)
class TensorPlan:
    """What one input tensor becomes: its `outputs` and how they are made.

    kind "tensor": `tensor_fn(name, tensor)` returns every output whole.
    kind "copy": the one output holds the input's bytes unchanged (same dtype and shape,
    perhaps another name), copied as raw bytes, never decoded.
    kind "rows": `rows_fn(name, band, first_row)` gets the tensor in bands of whole rows, each
    a multiple of `rows` rows (but the last), and returns {output: (tensor, its first row)}.
    """

    outputs: tuple[PlannedTensor, ...]
    kind: str = "tensor"
    rows: int = 1

    @classmethod
    def copy(cls, name: str, info: TensorInfo) -> TensorPlan:
        """The input's bytes, unchanged, under `name`."""
        return cls(((name, info.torch_dtype, info.shape),), "copy")


TensorFn = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]
RowsFn = Callable[[str, torch.Tensor, int], dict[str, tuple[torch.Tensor, int]]]
PlanFn = Callable[[str, TensorInfo], "list[PlannedTensor] | TensorPlan"]
Progress = Callable[[Iterator, int, str], Iterator]


@dataclass(frozen=True)
class Mappers:
    """The functions that make outputs: whole tensors, bands of rows (None: not used)."""

    tensor_fn: TensorFn | None
    rows_fn: RowsFn | None


@dataclass(frozen=True)
class ShardJob:
    """What it takes to write any one output shard of a streamed transform, on its own: the
    source, its plan and mapping functions (picklable by cloudpickle, for Ray tasks)."""

    src: Checkpoint
    fns: Mappers
    plan_fn: PlanFn

    def plans(self, shard: str) -> dict[str, TensorPlan]:
        """Each input tensor of `shard` -> its plan."""
        return _plans(self.src, shard, self.plan_fn)

    def write(
        self, plans: dict[str, TensorPlan], pieces: Iterable[Piece], stream: ShardStream
    ) -> None:
        """Read, map and write one shard's `pieces` (of `shard_pieces(plans)`) into `stream`."""
        pieces = list(pieces)
        if not pieces:
            return
        with ShardReader(self.src.path / pieces[0].info.shard, pieces) as reader:
            for piece, data in reader:
                _map_piece(piece, plans[piece.info.name], data, stream, self.fns)

    def pieces(self, plans: dict[str, TensorPlan]) -> list[Piece]:
        """The reads a shard's plans need, in file order."""
        return _pieces(self.src, plans)


def shard_outputs(plans: dict[str, TensorPlan]) -> list[PlannedTensor]:
    """The tensors one output shard holds, in plan order (the order of the index)."""
    return [o for p in plans.values() for o in p.outputs]


@dataclass(frozen=True)
class Finish:
    """What completes an output once its shards are written: config.json (None: none), the
    other files copied, whether an index is written."""

    config: dict | None
    extras: tuple[Path, ...]
    write_index: bool

    def apply(self, writer: CheckpointWriter) -> Path:
        """Write config.json and the extra files, then commit (index, rename into place)."""
        if self.config is not None:
            writer.write_json(CONFIG_NAME, self.config)
        for extra in self.extras:
            writer.copy_file(extra)
        return writer.commit(write_index=self.write_index)


class ShardRunner(Protocol):
    """Writes a streamed transform's shards elsewhere (other processes or machines) and
    commits the output when all are written; returns it, or None while others still write."""

    def __call__(
        self, job: ShardJob, out: Path, finish: Finish, overwrite: bool, progress: Progress | None
    ) -> Path | None: ...


def transform_checkpoint(
    src: Checkpoint,
    out: str | os.PathLike,
    tensor_fn: TensorFn | None,
    config: dict | None,
    overwrite: bool = False,
    progress: Progress | None = None,
    plan_fn: PlanFn | None = None,
    rows_fn: RowsFn | None = None,
    runner: ShardRunner | None = None,
) -> Path | None:
    """Stream `src` into `out`, mapping each tensor through `tensor_fn` shard by shard.

    `tensor_fn(name, tensor)` returns the output tensors for that input tensor (any names);
    None where every plan is a copy or by rows.
    With `plan_fn(name, info)` saying up front what each input becomes (a `TensorPlan`, or
    just its list of (name, dtype, shape) outputs for `tensor_fn`), outputs are written as
    they are made and at most one input tensor (for kind "tensor"; else a few MB) is in
    memory; a tensor given to `tensor_fn` is valid only during the call. Without `plan_fn`,
    each output shard is collected in memory and saved whole.
    `config` is written as config.json (None: none is written). Other files are copied.
    A `runner` (with a `plan_fn`) writes the shards in other processes instead
    (`quantscale.checkpoint.parallel`); the same bytes, or None while other ranks still write.
    """
    out = Path(out)
    if out.resolve() == src.path.resolve():
        raise OutputExistsError(f"{out}: output must differ from the input checkpoint")
    write_index = src.index is not None or len(src.shards) > 1
    finish = Finish(config, tuple(src.extra_files()), write_index)
    if runner is not None:
        if plan_fn is None:
            raise QuantscaleError("this transform holds state across shards: one process only")
        job = ShardJob(src, Mappers(tensor_fn, rows_fn), plan_fn)
        return runner(job, out, finish, overwrite, progress)
    with CheckpointWriter(out, overwrite=overwrite) as writer:
        if plan_fn is None:
            if tensor_fn is None:
                raise ValueError("transform_checkpoint needs a tensor_fn or a plan_fn")
            _collect_shards(src, writer, tensor_fn, progress)
        else:
            _stream_shards(ShardJob(src, Mappers(tensor_fn, rows_fn), plan_fn), writer, progress)
        return finish.apply(writer)


def _collect_shards(
    src: Checkpoint, writer: CheckpointWriter, tensor_fn: TensorFn, progress: Progress | None
) -> None:
    """Map every tensor, holding each output shard in memory until it is saved whole."""
    names = [(shard, name) for shard in src.shards for name in src.names(shard)]
    steps = iter(names)
    if progress is not None:
        steps = progress(steps, len(names), f"writing {writer.out.name}")
    for shard, group in itertools.groupby(steps, key=lambda step: step[0]):
        pending: dict[str, torch.Tensor] = {}
        with safe_open(src.path / shard, framework="pt") as handle:
            for _, name in group:
                pending.update(tensor_fn(name, handle.get_tensor(name)))
        writer.write_shard(shard, pending)


def _stream_shards(job: ShardJob, writer: CheckpointWriter, progress: Progress | None) -> None:
    """Plan each shard's outputs, then read, map and write its tensors in file order, in
    pieces of about CHUNK_BYTES (whole tensors for a `tensor_fn`)."""
    src = job.src
    plans = {shard: job.plans(shard) for shard in src.shards}
    order = [(shard, piece) for shard in src.shards for piece in job.pieces(plans[shard])]
    steps = iter(order)
    if progress is not None:
        steps = progress(steps, len(order), f"writing {writer.out.name}")
    for shard, group in itertools.groupby(steps, key=lambda step: step[0]):
        with writer.open_shard(shard, shard_outputs(plans[shard])) as stream:
            job.write(plans[shard], (piece for _, piece in group), stream)


def _plans(src: Checkpoint, shard: str, plan_fn: PlanFn) -> dict[str, TensorPlan]:
    plans = {}
    for name in src.names(shard):
        plan = plan_fn(name, src.tensors[name])
        if not isinstance(plan, TensorPlan):
            plan = TensorPlan(tuple((n, d, tuple(s)) for n, d, s in plan))
        if plan.kind not in ("tensor", "copy", "rows"):
            raise ValueError(f"tensor {name!r}: unknown plan kind {plan.kind!r}")
        if plan.kind == "rows" and not src.tensors[name].shape:
            raise ValueError(f"tensor {name!r}: a 0-d tensor has no rows")
        plans[name] = plan
    return plans


def _pieces(src: Checkpoint, plans: dict[str, TensorPlan]) -> list[Piece]:
    """The reads that a shard's plans need, in file order."""
    out = []
    for info in sorted((src.tensors[n] for n in plans), key=lambda i: i.offset):
        plan = plans[info.name]
        if plan.kind == "tensor":
            out.append(Piece(info, 0, info.nbytes, whole=True))
            continue
        rows = info.shape[0] if plan.kind == "rows" else 0
        unit = info.nbytes // rows * plan.rows if rows else 1
        if unit == 0:
            continue
        step = max(1, CHUNK_BYTES // unit) * unit
        out += [Piece(info, a, min(step, info.nbytes - a)) for a in range(0, info.nbytes, step)]
    return out


def _map_piece(
    piece: Piece, plan: TensorPlan, data: torch.Tensor, stream: ShardStream, fns: Mappers
) -> None:
    """Map one piece of an input tensor as its plan says and write what it gives."""
    info = piece.info
    where = f"{info.shard}: tensor {info.name!r}"
    planned = sorted(o[0] for o in plan.outputs)
    if plan.kind == "copy":
        _copy_piece(piece, plan, data, stream, where)
    elif plan.kind == "rows":
        _map_rows(piece, data, stream, fns, where, planned)
    else:
        _map_whole(piece, data, stream, fns, where, planned)
    missing = stream.unwritten(planned) if piece.start + piece.nbytes == info.nbytes else []
    if missing:
        raise CheckpointError(f"{where}: outputs {missing} were planned but not all written")


def _copy_piece(
    piece: Piece, plan: TensorPlan, data: torch.Tensor, stream: ShardStream, where: str
) -> None:
    """A raw copy: the piece's bytes at the same place of the one output."""
    info = piece.info
    name, dtype, shape = plan.outputs[0]
    if len(plan.outputs) != 1 or dtype != info.torch_dtype or tuple(shape) != info.shape:
        raise CheckpointError(f"{where}: a raw copy needs one output of the same type")
    stream.put_bytes(name, data, piece.start)


def _map_rows(
    piece: Piece,
    data: torch.Tensor,
    stream: ShardStream,
    fns: Mappers,
    where: str,
    planned: list[str],
) -> None:
    """A band of whole rows through `rows_fn`; its outputs written at their rows."""
    info = piece.info
    if fns.rows_fn is None:
        raise ValueError(f"{where}: planned for a rows_fn, but none was given")
    row_bytes = info.nbytes // info.shape[0]
    band = data.view(info.torch_dtype).reshape(-1, *info.shape[1:])
    outputs = fns.rows_fn(info.name, band, piece.start // row_bytes)
    _check_names(where, sorted(outputs), planned, subset=True)
    for name, (value, row) in outputs.items():
        stream.put_rows(name, value, row)


def _map_whole(
    piece: Piece,
    data: torch.Tensor,
    stream: ShardStream,
    fns: Mappers,
    where: str,
    planned: list[str],
) -> None:
    """The whole tensor through `tensor_fn`; every output written whole."""
    info = piece.info
    if fns.tensor_fn is None:
        raise ValueError(f"{where}: planned for a tensor_fn, but none was given")
    outputs = fns.tensor_fn(info.name, data.view(info.torch_dtype).reshape(info.shape))
    _check_names(where, sorted(outputs), planned)
    for name, value in outputs.items():
        stream.put(name, value)


def _check_names(where: str, given: list[str], planned: list[str], subset: bool = False) -> None:
    if set(given) - set(planned) or (not subset and given != planned):
        raise CheckpointError(f"{where} gave outputs {given} but the plan said {planned}")
