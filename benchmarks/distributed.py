"""Data-parallel GPTQ on torch.distributed: 1 process vs `torchrun --nproc-per-node N`.

The same `quantscale quantize MODEL OUT --scheme S --method gptq` job (default SmolLM2,
W4A16, 32 x 512 Wikipedia calibration) run by one process and by N gloo ranks on this
machine, alternating when `--repeats` > 1. Per run: wall time, peak RSS of the largest process
(GNU time), and for N > 1 the bytes each rank sent / received per decoder layer (the
`quantscale.distributed` traffic log). Then every output tensor and the config are compared
with the 1-process output (tensors that differ, max |difference|), and `quantscale eval
OUT --tasks ppl` scores each output on the held-out Wikipedia text.

    .venv/bin/python benchmarks/distributed.py [--ranks 1,2] [--samples 32] [--seq-len 512]
        [--scheme W4A16] [--stream] [--threads 1] [--repeats 1] [--json bench-results/dist.json]

`--threads`: OMP threads per process (torchrun's default for N > 1 is 1; the 1-process run
gets the same number per process unless `--threads-single` says otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TRAFFIC = re.compile(r"rank (\d+) (\S+): sent (\d+) bytes, received (\d+) bytes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def quantize_cmd(ranks: int, model: str, out: Path, args: argparse.Namespace) -> list[str]:
    job = ["quantize", model, str(out), "--scheme", args.scheme, "--method", "gptq"]
    job += ["--calib-samples", str(args.samples), "--calib-seq-len", str(args.seq_len)]
    job += ["--overwrite"] + (["--stream", "--device", "cpu"] if args.stream else [])
    if ranks == 1:
        return [sys.executable, "-m", "quantscale", *job]
    launch = ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
    launch += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    return [sys.executable, *launch, "-m", "quantscale", *job]


def timed(cmd: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    env["QUANTSCALE_PROGRESS"] = "0"
    with tempfile.NamedTemporaryFile(suffix=".time", delete=False) as f:
        time_file = f.name
    start = time.perf_counter()
    wrapped = ["/usr/bin/time", "-f", "%M", "-o", time_file, *cmd]
    proc = subprocess.run(wrapped, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    rss = float(Path(time_file).read_text().split()[-1]) / 1024
    os.unlink(time_file)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    traffic: dict[str, dict[int, tuple[int, int]]] = {}
    for rank, layer, sent, received in TRAFFIC.findall(proc.stderr):
        traffic.setdefault(layer, {})[int(rank)] = (int(sent), int(received))
    return {"wall_s": wall, "peak_rss_mb": rss, "traffic": traffic}


def compare(a: Path, b: Path) -> dict:
    from quantscale.checkpoint.read import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    names = sorted(ca.names())
    if names != sorted(cb.names()):
        return {"same_names": False}
    differ, worst = 0, 0.0
    for name in names:
        x, y = ca.get(name), cb.get(name)
        if not torch.equal(x, y):
            differ += 1
            if x.is_floating_point():  # packed int codes have no meaningful difference
                worst = max(worst, float((x.double() - y.double()).abs().max()))
    config = json.loads((a / "config.json").read_text()) == json.loads(
        (b / "config.json").read_text()
    )
    return {
        "tensors": len(names),
        "differ": differ,
        "max_abs_diff_float": worst,
        "config_equal": config,
    }


def perplexity(out: Path) -> float:
    cmd = [sys.executable, "-m", "quantscale", "eval", str(out), "--tasks", "ppl", "--json"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "QUANTSCALE_PROGRESS": "0"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return float(_find_ppl(json.loads(proc.stdout)))


def _find_ppl(obj: object) -> float:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("ppl", "perplexity") and isinstance(value, (int, float)):
                return float(value)
            try:
                return _find_ppl(value)
            except KeyError:
                pass
    if isinstance(obj, list):
        for value in obj:
            try:
                return _find_ppl(value)
            except KeyError:
                pass
    raise KeyError("ppl")


def per_layer_bytes(traffic: dict[str, dict[int, tuple[int, int]]]) -> dict:
    """Median over layers of the bytes each rank sent (the sum over ranks, per layer)."""
    totals = [sum(s for s, _ in ranks.values()) for ranks in traffic.values()]
    return {"layers": len(totals), "median_sent_all_ranks": statistics.median(totals or [0])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--scheme", default="W4A16")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--threads-single", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-ppl", action="store_true")
    p.add_argument("--work", default="bench-results/distributed")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ranks = [int(r) for r in args.ranks.split(",")]
    runs: dict[int, list[dict]] = {n: [] for n in ranks}
    for _ in range(args.repeats):
        for n in ranks:
            threads = args.threads_single if n == 1 and args.threads_single else args.threads
            cmd = quantize_cmd(n, args.model, work / f"out-{n}", args)
            runs[n].append(timed(cmd, threads))
            print(f"ranks={n}: {runs[n][-1]['wall_s']:.1f} s", flush=True)
    rows = []
    for n in ranks:
        out = work / f"out-{n}"
        row = {
            "ranks": n,
            "wall_s": [r["wall_s"] for r in runs[n]],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[n]),
            "bytes_per_layer": per_layer_bytes(runs[n][-1]["traffic"]),
            "vs_1": compare(work / f"out-{ranks[0]}", out),
        }
        if not args.no_ppl:
            row["ppl"] = perplexity(out)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
