"""Data-parallel calibration on torch.distributed: the rank context and its collectives.

A job launched by `torchrun` (or anything that sets RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT) with more than one process joins a process group in `init_from_env()`: gloo on
CPU, NCCL (one GPU per LOCAL_RANK) on CUDA. Without that environment everything here is the
single-process no-op, so callers use the same code for 1 and N ranks.

What the calibration drivers need: `rank_slice` (each rank's contiguous share of the
calibration batches, in rank order), `sum_to` (a tensor summed onto one rank, the parts added
in rank order, so the sum does not depend on which rank finished first), `all_sum_ints`,
`gather_objects` (small state such as observer ranges), `broadcast_tensors` (quantized
weights from the rank that solved them), `owners` (work items assigned to ranks balanced by
cost), `send_tensor` / `recv_tensor` (MoE experts' routed inputs to the rank that owns
the expert) and `barrier`. Every collective counts the bytes it moves (`traffic`) and turns a
failed peer into a `QuantscaleError` naming this rank and the step (`context().where`).
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from quantscale.errors import QuantscaleError

log = logging.getLogger(__name__)
T = TypeVar("T")
TIMEOUT_ENV = "QUANTSCALE_DIST_TIMEOUT"  # seconds a collective waits for its peers


@dataclass
class Context:
    """This process's place in the job; `where` names the step in progress (for errors)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    where: str = "start"
    sent: int = 0  # bytes this rank sent since the last `traffic()`
    received: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1


_CTX = Context()


def context() -> Context:
    return _CTX


def active() -> bool:
    """Whether this process is one of several ranks."""
    return _CTX.active


def is_writer() -> bool:
    """Whether this rank writes the output (rank 0)."""
    return _CTX.rank == 0


def launched() -> bool:
    """Whether the environment names more than one rank (torchrun's WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> Context:
    """Join the torchrun process group when the environment names more than one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or _CTX.active:
        return _CTX
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise QuantscaleError(f"WORLD_SIZE={world} but {name} is not set; launch with torchrun")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    _CTX.rank, _CTX.world, _CTX.local_rank = dist.get_rank(), dist.get_world_size(), local
    signal.signal(signal.SIGTERM, _stopped)
    log.info("rank %d of %d (%s)", _CTX.rank, _CTX.world, dist.get_backend())
    return _CTX


def _stopped(signum: int, _frame: object) -> None:
    """SIGTERM (torchrun ends every rank once one has failed): say where this rank stood."""
    print(
        f"error: rank {_CTX.rank} of {_CTX.world} stopped by signal {signum} at {_CTX.where} "
        "(the launcher ends every rank when one fails; its report names the failed rank); "
        "rerun the same command (with --stream it resumes from the last finished layer)",
        file=sys.stderr,
        flush=True,
    )
    os._exit(128 + signum)


def shutdown() -> None:
    """Leave the process group (end of the job)."""
    if _CTX.active and dist.is_initialized():
        dist.destroy_process_group()
    _CTX.rank, _CTX.world, _CTX.local_rank = 0, 1, 0


@contextmanager
def step(where: str) -> Iterator[None]:
    """Name the step in progress for the errors of the collectives inside it (kept when it
    fails, for the messages that follow)."""
    before, _CTX.where = _CTX.where, where
    yield
    _CTX.where = before


@contextmanager
def _collective(what: str) -> Iterator[None]:
    try:
        yield
    except (RuntimeError, dist.DistBackendError) as err:
        raise QuantscaleError(
            f"rank {_CTX.rank} of {_CTX.world}: {what} failed at {_CTX.where} ({err}); another "
            "rank has probably stopped (its own log names why); rerun the same command "
            "(with --stream it resumes from the last finished layer)"
        ) from err


def _device() -> torch.device:
    return (
        torch.device("cuda", _CTX.local_rank)
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def rank_slice(items: Sequence[T]) -> list[T]:
    """This rank's contiguous share of `items`, shares in rank order (sizes differ by at most
    one); refuses fewer items than ranks."""
    n, world, rank = len(items), _CTX.world, _CTX.rank
    if world > 1 and n < world:
        raise QuantscaleError(
            f"{n} calibration batches for {world} ranks: each rank needs at least one "
            "(more --calib-samples or a smaller --calib-batch-size)"
        )
    return list(items[rank * n // world : (rank + 1) * n // world])


def barrier() -> None:
    if _CTX.active:
        with _collective("barrier"):
            dist.barrier()


def sum_to(t: torch.Tensor, dst: int) -> torch.Tensor | None:
    """The sum over ranks of `t` (same shape and dtype everywhere), added in rank order on
    rank `dst` (None elsewhere)."""
    if not _CTX.active:
        return t
    dev = _device()
    send = t.to(dev)
    parts = [torch.empty_like(send) for _ in range(_CTX.world)] if _CTX.rank == dst else None
    with _collective("a Hessian reduction"):
        dist.gather(send, parts, dst=dst)
    nbytes = t.numel() * t.element_size()
    if _CTX.rank != dst:
        _CTX.sent += nbytes
        return None
    assert parts is not None
    _CTX.received += nbytes * (_CTX.world - 1)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total.to(t.device)


def all_sum_ints(values: list[int]) -> list[int]:
    """Element-wise sum of integer lists over ranks."""
    if not _CTX.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=_device())
    with _collective("a count reduction"):
        dist.all_reduce(t)
    _CTX.sent += t.numel() * 8
    return [int(v) for v in t.tolist()]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable; tensors travel on the CPU), in rank order."""
    if not _CTX.active:
        return [obj]
    out: list[Any] = [None] * _CTX.world
    with _collective("an object gather"):
        dist.all_gather_object(out, obj)
    _CTX.sent += len(pickle.dumps(obj))
    return out


def broadcast_tensors(
    tensors: dict[str, torch.Tensor] | None, src: int, extra: Any = None
) -> tuple[dict[str, torch.Tensor], Any]:
    """`tensors` (and a picklable `extra`) of rank `src` on every rank; the others pass None
    and get them on the device of the collective."""
    if not _CTX.active:
        assert tensors is not None
        return tensors, extra
    dev = _device()
    meta: list[Any] = [None]
    if _CTX.rank == src:
        assert tensors is not None
        meta = [([(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], extra)]
    with _collective("a weight broadcast"):
        dist.broadcast_object_list(meta, src=src)
        specs, extra = meta[0]
        out: dict[str, torch.Tensor] = {}
        for key, shape, dtype in specs:
            if _CTX.rank == src:
                assert tensors is not None
                t = tensors[key].detach().to(dev).contiguous()
            else:
                t = torch.empty(shape, dtype=dtype, device=dev)
            dist.broadcast(t, src=src)
            out[key] = t
    nbytes = sum(t.numel() * t.element_size() for t in out.values())
    if _CTX.rank == src:
        _CTX.sent += nbytes * (_CTX.world - 1)
    else:
        _CTX.received += nbytes
    return out, extra


def owners(costs: Sequence[float], fixed: Sequence[int | None] | None = None) -> list[int]:
    """A rank per work item, balanced by cost: the `fixed` ones where they are, then the others
    largest first onto the least loaded rank (ties: the lower rank, then the earlier item),
    the same on every rank."""
    load = [0.0] * _CTX.world
    out = [0] * len(costs)
    free = []
    for i, rank in enumerate(fixed or [None] * len(costs)):
        if rank is None:
            free.append(i)
        else:
            out[i] = rank
            load[rank] += costs[i]
    for i in sorted(free, key=lambda i: (-costs[i], i)):
        rank = min(range(_CTX.world), key=lambda r: (load[r], r))
        out[i] = rank
        load[rank] += costs[i]
    return out


def send_tensor(t: torch.Tensor, dst: int) -> None:
    """Point to point: `t` to rank `dst`, which calls `recv_tensor` with its shape."""
    with _collective("a routed-token send"):
        dist.send(t.to(_device()).contiguous(), dst=dst)
    _CTX.sent += t.numel() * t.element_size()


def recv_tensor(shape: Sequence[int], dtype: torch.dtype, src: int) -> torch.Tensor:
    """The tensor rank `src` sends with `send_tensor`."""
    t = torch.empty(tuple(shape), dtype=dtype, device=_device())
    with _collective("a routed-token receive"):
        dist.recv(t, src=src)
    _CTX.received += t.numel() * t.element_size()
    return t


def traffic(label: str) -> tuple[int, int]:
    """Log and reset the bytes this rank sent / received since the last call."""
    sent, received = _CTX.sent, _CTX.received
    _CTX.sent = _CTX.received = 0
    if _CTX.active:
        log.info("rank %d %s: sent %d bytes, received %d bytes", _CTX.rank, label, sent, received)
    return sent, received
