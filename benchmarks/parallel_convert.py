"""Shard-parallel `quantscale convert` of a synthetic 8-shard MiniMax-M2-shaped FP8 checkpoint.

Runs, through the command line as a user would, `convert --to compressed-tensors`:
- one process;
- two processes at once, `--rank 0/1 --world-size 2`;
- Ray, on a local cluster of a head and a worker node (`ray start --head`, `ray start
  --address`, one CPU each), with `--ray-address`;
- Ray again, a task's worker process killed (SIGKILL) mid-shard: the task is retried;
and checks every output byte for byte against the one-process output. Each shard line
reports the peak RSS of the process that wrote it (getrusage, inside the task; a Ray task
runs in a fresh worker, so its figure is that task's) and that peak when the shard began.

    .venv/bin/python benchmarks/parallel_convert.py [--experts 16] [--work /tmp/pc-bench]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from quantscale.checkpoint.read import Checkpoint
from quantscale.checkpoint.synthetic import write_minimax_like

sys.path.insert(0, str(Path(__file__).parent))
from common import GNU_TIME, loadavg  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
LINE = re.compile(
    r"^(\S+\.safetensors): ([\d.]+) s, peak RSS (\d+) MiB \(at its start (\d+) MiB; .* pid (\d+)"
)
PORT = 6391


def digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "quantscale", "convert", *args]


def env() -> dict[str, str]:
    # token auth: `ray start` enables it on a non-loopback address; clients must send it
    extra = {"PYTHONPATH": SRC, "OMP_WAIT_POLICY": "PASSIVE", "RAY_AUTH_MODE": "token"}
    return {**os.environ, **extra}


def run(cmds: list[list[str]], on_start=None) -> tuple[float, list[tuple], list[float]]:
    """Run commands at once; (wall seconds, parsed shard lines, each process's peak RSS in
    MiB from GNU time)."""
    os.sync()  # earlier runs' dirty pages must not slow this one
    times = [tempfile.mktemp(suffix=".time") for _ in cmds]
    wrapped = [[GNU_TIME, "-f", "%M", "-o", t, *c] for t, c in zip(times, cmds)]
    start = time.perf_counter()
    procs = [subprocess.Popen(c, env=env(), stdout=subprocess.PIPE, text=True) for c in wrapped]
    if on_start is not None:
        on_start()
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - start
    for p, c in zip(procs, cmds):
        if p.returncode:
            raise SystemExit(f"failed ({p.returncode}): {' '.join(c)}")
    rows = [m.groups() for out in outs for line in out.splitlines() if (m := LINE.match(line))]
    peaks = [float(Path(t).read_text().split()[-1]) / 1024 for t in times]
    return wall, rows, peaks


def ray_node(*args: str) -> subprocess.Popen:
    """`ray start ... --block`: a node that this process stops by its pid."""
    ray = str(Path(sys.executable).with_name("ray"))
    cmd = [ray, "start", *args, "--num-cpus=1", "--disable-usage-stats", "--block"]
    return subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_nodes(count: int) -> None:
    ray = str(Path(sys.executable).with_name("ray"))
    for _ in range(120):
        cmd = [ray, "status", f"--address=127.0.0.1:{PORT}"]
        status = subprocess.run(cmd, env=env(), capture_output=True, text=True)
        active = status.stdout.split("Pending:")[0]
        if active.count(" node_") >= count:
            return
        time.sleep(1)
    raise SystemExit(f"the Ray cluster did not reach {count} nodes")


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _children(pid: int) -> list[int]:
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if _ppid(int(proc.name)) == pid:
                out.append(int(proc.name))
    return out


def kill_mid_shard(staging: Path, log: list[str], node: subprocess.Popen | None = None) -> None:
    """SIGKILL the first Ray task seen writing a shard (its temporary file names its pid);
    with `node` (a `ray start --block` process), that node's raylet, while one of its tasks
    writes a shard."""
    raylets = []
    if node is not None:
        raylets = [c for c in _children(node.pid) if b"raylet" in _cmdline(c)]
    deadline = time.time() + 600
    while time.time() < deadline:
        for tmp in staging.glob(".*.tmp-*"):
            pid = int(tmp.name.rsplit("-", 1)[1])
            shard = tmp.name[1:].split(".tmp-")[0]
            with contextlib.suppress(OSError, ValueError, IndexError):
                if b"ray::" not in _cmdline(pid):
                    continue
                if not raylets:
                    os.kill(pid, signal.SIGKILL)
                    log.append(f"task worker pid {pid} killed while writing {shard}")
                    return
                if _ppid(pid) in raylets:
                    os.kill(_ppid(pid), signal.SIGKILL)
                    log.append(
                        f"worker node's raylet (pid {_ppid(pid)}) killed while its task "
                        f"pid {pid} wrote {shard}"
                    )
                    return
        time.sleep(0.01)


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def show(name: str, result: tuple[float, list[tuple], list[float]], same: bool) -> None:
    wall, rows, peaks = result
    procs = ", ".join(f"{p:.0f}" for p in peaks)
    print(
        f"\n{name}: {wall:.1f} s wall, peak RSS per process (GNU time) {procs} MiB; output "
        f"byte-identical: {same}; load {loadavg()}"
    )
    for shard, secs, peak, start, pid in rows:
        print(f"  {shard}: {secs} s, peak RSS {peak} MiB (at its start {start} MiB), pid {pid}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path("/tmp/pc-bench"))
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    src = write_minimax_like(args.work / "fp8", layers=8, experts=args.experts, shards=8)
    ckpt = Checkpoint(src)
    sizes = [sum(i.nbytes for i in ckpt.tensors.values() if i.shard == s) for s in ckpt.shards]
    print(
        f"source: {len(ckpt.shards)} shards, {sum(sizes) / 2**20:.0f} MiB, largest shard "
        f"{max(sizes) / 2**20:.0f} MiB; load {loadavg()}"
    )
    to = ["--to", "compressed-tensors"]
    result = run([cli(str(src), str(args.work / "one"), *to)])
    ref = digest(args.work / "one")
    show("1 process", result, True)
    out = str(args.work / "two")
    cmds = [cli(str(src), out, *to, "--rank", str(r), "--world-size", "2") for r in (0, 1)]
    result = run(cmds)
    show("2 processes (--rank/--world-size)", result, digest(Path(out)) == ref)
    nodes = [ray_node("--head", f"--port={PORT}", "--include-dashboard=false")]
    time.sleep(5)
    nodes.append(ray_node(f"--address=127.0.0.1:{PORT}"))
    try:
        wait_nodes(2)
        addr = ["--ray-address", f"127.0.0.1:{PORT}"]
        out = str(args.work / "ray")
        result = run([cli(str(src), out, *to, *addr)])
        show("Ray, head + worker node (1 CPU each)", result, digest(Path(out)) == ref)
        log: list[str] = []
        out = str(args.work / "ray-killed")
        staging = args.work / ".ray-killed.parallel"
        killer = threading.Thread(target=kill_mid_shard, args=(staging, log))
        result = run([cli(str(src), out, *to, *addr)], on_start=killer.start)
        killer.join()
        show(f"Ray, {'; '.join(log) or 'no task seen to kill'}", result, digest(Path(out)) == ref)
        log = []
        out = str(args.work / "ray-node-killed")
        staging = args.work / ".ray-node-killed.parallel"
        killer = threading.Thread(target=kill_mid_shard, args=(staging, log, nodes[1]))
        result = run([cli(str(src), out, *to, *addr)], on_start=killer.start)
        killer.join()
        show(f"Ray, {'; '.join(log) or 'no task seen to kill'}", result, digest(Path(out)) == ref)
    finally:
        for node in reversed(nodes):  # the nodes this script started, by their pids
            if node.poll() is None:
                node.terminate()
                node.wait(timeout=60)
    print(f"\nload after: {loadavg()}")


if __name__ == "__main__":
    main()
