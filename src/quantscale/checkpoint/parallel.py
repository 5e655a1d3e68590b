"""Shard-parallel streamed transforms: ranks (`--rank/--world-size`, or torchrun's environment)
or Ray tasks (`--ray`), each writing whole output shards of one `ShardJob`.

Every process writes into one staging directory beside the output, `.OUT.parallel/`: a shard
goes to a temporary name and is renamed into place when complete, then a small done record
(`.parts/SHARD.json`: the job key and the file's size) is written. A shard is complete when
its record's key matches, its file has the recorded size and starts with the planned header;
a rerun redoes only the others. The key covers the output config.json, the shard's planned
tensors and the source shard's size and mtime, so changed options or inputs redo the shard.
Whoever completes the last shard (under a file lock) writes config.json, the extra files and
the index, drops the records and renames the directory into place, like the one-process
writer: the output is byte for byte the same. Ranks split the shards by bytes (largest first
to the least loaded rank), the same way in every process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import resource
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from quantscale.checkpoint.read import DTYPE_NAMES
from quantscale.checkpoint.transform import (
    Finish,
    Progress,
    ShardJob,
    TensorPlan,
    shard_outputs,
)
from quantscale.checkpoint.write import (
    SHARD_METADATA,
    CheckpointWriter,
    ShardStream,
    check_output,
    safetensors_header,
)
from quantscale.errors import QuantscaleError

PARTS = ".parts"  # the done records, inside the staging directory
WORK_BYTES = 512 << 20  # a task's memory beyond its shard: interpreter, torch, read buffers
RAY_EXTRA = "pip install 'quantscale[ray]'"


def env_rank() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) from the environment torchrun (or SLURM via torchrun) sets; None
    when unset."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None or world is None:
        return None
    try:
        return int(rank), int(world)
    except ValueError as err:
        raise QuantscaleError(f"RANK={rank!r} WORLD_SIZE={world!r}: expected integers") from err


def staging_dir(out: Path) -> Path:
    """Where the ranks of a run write `out`'s shards before it is complete."""
    return out.parent / f".{out.name}.parallel"


def shard_bytes(job: ShardJob, shard: str) -> int:
    """Bytes of one source shard's tensors (what its conversion reads)."""
    return sum(job.src.tensors[n].nbytes for n in job.src.names(shard))


def assign(job: ShardJob, world: int) -> list[list[str]]:
    """Shards per rank, balanced by bytes: largest first, each to the least loaded rank (ties:
    by name, then the lowest rank); each rank's shards in file order."""
    if world < 1:
        raise QuantscaleError(f"world size {world}: expected at least 1")
    loads = [0] * world
    ranks: list[list[str]] = [[] for _ in range(world)]
    for shard in sorted(job.src.shards, key=lambda s: (-shard_bytes(job, s), s)):
        rank = loads.index(min(loads))
        ranks[rank].append(shard)
        loads[rank] += shard_bytes(job, shard)
    order = {s: i for i, s in enumerate(job.src.shards)}
    return [sorted(r, key=order.__getitem__) for r in ranks]


def job_key(job: ShardJob, finish: Finish, shard: str, plans: dict[str, TensorPlan]) -> str:
    """What one output shard's bytes depend on: output config, plans, the source shard."""
    stat = (job.src.path / shard).stat()
    planned = [
        [p.kind, p.rows, [[n, DTYPE_NAMES[d], list(s)] for n, d, s in p.outputs]]
        for p in plans.values()
    ]
    text = json.dumps([finish.config, shard, planned, stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class ShardResult:
    """One shard written by one process: where, how long, its peak resident memory."""

    shard: str
    seconds: float
    peak_rss: int  # bytes, the process's peak (`peak_rss()`) when the shard was done
    start_rss: int  # bytes, that peak when the shard began (a fresh Ray worker: its baseline)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)


def peak_rss() -> int:
    """This process's peak resident set size, in bytes: Linux's VmHWM (its own address
    space; getrusage's ru_maxrss also counts the parent's memory copied at fork), else
    getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class Staging:
    """The staging directory of one parallel run of `job` into `out`."""

    def __init__(self, job: ShardJob, out: Path, finish: Finish) -> None:
        self.job, self.out, self.finish = job, Path(out).absolute(), finish
        self.dir = staging_dir(self.out)

    def prepare(self, overwrite: bool) -> None:
        """Refuse an existing output (unless `overwrite`); make the staging directory."""
        if self.out.resolve() == self.job.src.path.resolve():
            raise QuantscaleError(f"{self.out}: output must differ from the input checkpoint")
        check_output(self.out, overwrite)
        (self.dir / PARTS).mkdir(parents=True, exist_ok=True)

    def _record(self, shard: str) -> Path:
        return self.dir / PARTS / f"{shard}.json"

    def complete(self, shard: str) -> bool:
        """Whether `shard` is written, for this job, whole (or has nothing to write)."""
        plans = self.job.plans(shard)
        if not self.job.pieces(plans):
            return True
        try:
            record = json.loads(self._record(shard).read_text())
            size = (self.dir / shard).stat().st_size
        except (OSError, ValueError):
            return False
        header, _ = safetensors_header(shard_outputs(plans), SHARD_METADATA)
        if record.get("key") != job_key(self.job, self.finish, shard, plans):
            return False
        if size != record.get("size"):
            return False
        with open(self.dir / shard, "rb") as f:
            return f.read(len(header)) == header

    def write(self, shard: str, progress: Progress | None = None) -> ShardResult:
        """Write one shard under a temporary name, rename it, then record it done."""
        start, start_rss = time.perf_counter(), peak_rss()
        plans = self.job.plans(shard)
        pieces = self.job.pieces(plans)
        if pieces:
            tmp = self.dir / f".{shard}.tmp-{socket.gethostname()}-{os.getpid()}"
            steps = iter(pieces)
            if progress is not None:
                steps = progress(steps, len(pieces), f"writing {shard}")
            try:
                with ShardStream(tmp, shard_outputs(plans), SHARD_METADATA) as stream:
                    self.job.write(plans, steps, stream)
                os.replace(tmp, self.dir / shard)
            finally:
                tmp.unlink(missing_ok=True)
            key = job_key(self.job, self.finish, shard, plans)
            record = {"key": key, "size": (self.dir / shard).stat().st_size}
            part = self._record(shard)
            part.with_suffix(".tmp").write_text(json.dumps(record))
            os.replace(part.with_suffix(".tmp"), part)
        return ShardResult(shard, time.perf_counter() - start, peak_rss(), start_rss)

    @property
    def lock(self) -> Path:
        return self.out.parent / f".{self.out.name}.parallel.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def try_commit(self, overwrite: bool) -> Path | None:
        """Commit the output if every shard is complete (once, whoever calls first); the
        output, or None while shards are missing."""
        with self._locked():
            if not self.dir.exists():  # another process committed it
                return self.out if self.out.exists() else None
            if not all(self.complete(s) for s in self.job.src.shards):
                return None
            writer = CheckpointWriter(self.out, overwrite=overwrite, staging=self.dir)
            for shard in self.job.src.shards:
                plans = self.job.plans(shard)
                if self.job.pieces(plans):
                    writer.record_shard(shard, shard_outputs(plans))
            shutil.rmtree(self.dir / PARTS)
            for leftover in self.dir.iterdir():  # of writers killed mid-shard, of other jobs
                if leftover.name not in writer.weight_map.values():
                    leftover.unlink()
            written = self.finish.apply(writer)
            self.lock.unlink(missing_ok=True)  # a waiter then finds the directory gone
            return written


@dataclass
class Ranks:
    """Run as rank `rank` of `world`: write this rank's incomplete shards, then commit if
    they were the last ones."""

    rank: int
    world: int
    results: list[ShardResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise QuantscaleError(
                f"rank {self.rank} of world size {self.world}: expected 0 <= rank < world size"
            )

    def __call__(
        self, job: ShardJob, out: Path, finish: Finish, overwrite: bool, progress: Progress | None
    ) -> Path | None:
        staging = Staging(job, out, finish)
        staging.prepare(overwrite)
        mine = assign(job, self.world)[self.rank]
        for shard in mine:
            if not staging.complete(shard):
                self.results.append(staging.write(shard, progress))
        return staging.try_commit(overwrite)


def _ray_write(job: ShardJob, out: str, finish: Finish, shard: str) -> ShardResult:
    """A Ray task: one shard, in a fresh worker (so its peak RSS is this task's)."""
    return Staging(job, Path(out), finish).write(shard)


def import_ray():  # noqa: ANN201 - the ray module, an optional dependency
    """The `ray` module, or a clear error naming the extra that installs it."""
    try:
        import ray
    except ImportError as err:
        raise QuantscaleError(f"--ray needs Ray, not installed here: {RAY_EXTRA}") from err
    return ray


@dataclass
class RayTasks:
    """One Ray task per incomplete shard, each reserving the shard's bytes plus working
    memory and retried (`max_retries`) when its worker or node dies; the driver commits."""

    address: str | None = None
    max_retries: int = 3
    work_bytes: int = WORK_BYTES  # reserved per task beyond its shard's bytes
    results: list[ShardResult] = field(default_factory=list)

    def __call__(
        self, job: ShardJob, out: Path, finish: Finish, overwrite: bool, progress: Progress | None
    ) -> Path | None:
        ray = import_ray()
        staging = Staging(job, out, finish)
        staging.prepare(overwrite)
        todo = [s for s in job.src.shards if not staging.complete(s)]
        if todo:
            self._run(ray, staging, todo, progress)
        written = staging.try_commit(overwrite)
        if written is None:
            raise QuantscaleError(f"{staging.dir}: shards still incomplete after the Ray tasks")
        return written

    def _run(self, ray, staging: Staging, todo: list[str], progress: Progress | None) -> None:  # noqa: ANN001
        package = str(Path(__file__).resolve().parents[2])  # workers import this quantscale
        given = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        path = os.pathsep.join(dict.fromkeys([package, *given]))
        if not ray.is_initialized():
            ray.init(
                address=self.address,
                runtime_env={"env_vars": {"PYTHONPATH": path}},
                log_to_driver=False,
            )
        reserve = {s: shard_bytes(staging.job, s) + self.work_bytes for s in todo}
        _check_fits(ray, max(reserve.values()), max(reserve, key=reserve.__getitem__))
        task = ray.remote(max_calls=1)(_ray_write)  # a fresh worker per task
        job_ref = ray.put(staging.job)
        refs = [
            task.options(memory=reserve[shard], num_cpus=1, max_retries=self.max_retries).remote(
                job_ref, str(staging.out), staging.finish, shard
            )
            for shard in todo
        ]
        pending = iter(refs)
        if progress is not None:
            pending = progress(pending, len(refs), f"Ray: {len(refs)} shard tasks")
        for ref in pending:
            self.results.append(ray.get(ref))


def _check_fits(ray, need: int, shard: str) -> None:  # noqa: ANN001 - the ray module
    """Raise if no live node offers the memory one task reserves (it would wait forever)."""
    offered = [n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")]
    if max(offered, default=0) < need:
        raise QuantscaleError(
            f"{shard}: a task reserves {need / 2**30:.1f} GiB (the shard plus working memory) "
            f"but no Ray node has that much memory to offer (largest "
            f"{max(offered, default=0) / 2**30:.1f} GiB)"
        )


def runner_from_args(
    rank: int | None, world: int | None, ray: bool, ray_address: str | None
) -> Ranks | RayTasks | None:
    """The runner that `--rank/--world-size`, `--ray/--ray-address` or torchrun's environment
    ask for; None: one process."""
    if ray or ray_address:
        if rank is not None or world is not None:
            raise QuantscaleError("--ray and --rank/--world-size exclude each other")
        return RayTasks(ray_address)
    if (rank is None) != (world is None):
        raise QuantscaleError("--rank and --world-size go together")
    if rank is not None and world is not None:
        return Ranks(rank, world)
    env = env_rank()
    return Ranks(*env) if env is not None and env[1] > 1 else None


def report(runner: Ranks | RayTasks | None, out: Path | None, target: Path) -> list[str]:
    """What a run did, one line per shard a parallel runner wrote, then where the output is."""
    lines = [
        f"{r.shard}: {r.seconds:.1f} s, peak RSS {r.peak_rss / 2**20:.0f} MiB (at its start "
        f"{r.start_rss / 2**20:.0f} MiB; {r.host} pid {r.pid})"
        for r in getattr(runner, "results", [])
    ]
    if out is None:
        lines.append(f"shards written; the rank that finishes last commits {target}")
    else:
        lines.append(f"wrote {out}")
    return lines
