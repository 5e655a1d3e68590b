"""Shared benchmark helpers: one virtual environment per peer tool, timed subprocess jobs.

- `peer_python(name, requirements)`: a venv under the quantscale cache with exactly those
  pins (torch pinned to the CPU wheel on disk, or pip pulls a CUDA build), created once.
- `run_job(cmd)`: run a command, return wall time, peak RSS (GNU time's max resident set of
  the child) and the exit code.
- `alternate(jobs, repeats)`: run several named jobs in turn (A B A B ...), so that load on
  the machine hits all of them alike; `summarize` takes the min and median per job.
- `loadavg()`: /proc/loadavg, recorded beside every measurement.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

TORCH_PIN = "torch==2.13.0"
GNU_TIME = "/usr/bin/time"


def venv_root() -> Path:
    from quantscale.cache import cache_dir

    return cache_dir() / "bench-venvs"


def peer_python(name: str, requirements: Sequence[str], log: Callable[[str], None] = print) -> Path:
    """Python of a venv holding `requirements` (plus the CPU torch pin); built on first use."""
    root = venv_root() / name
    python = root / "bin" / "python"
    stamp = root / ".requirements.json"
    wanted = [TORCH_PIN, *requirements]
    if python.exists() and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return python
    log(f"creating venv {root} with {' '.join(wanted)} (once; a few minutes)")
    shutil.rmtree(root, ignore_errors=True)
    venv.EnvBuilder(with_pip=True).create(root)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH_PIN], check=True)
    subprocess.run([*pip, *wanted], check=True)
    stamp.write_text(json.dumps(wanted))
    return python


@dataclass
class Run:
    """One timed run of a job."""

    job: str
    wall_s: float
    peak_rss_mb: float
    returncode: int
    loadavg: str
    output_tail: str = ""
    extra: dict = field(default_factory=dict)


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[0:3].__str__()
    except OSError:
        return "n/a"


def run_job(
    job: str,
    cmd: Sequence[str],
    env: dict | None = None,
    timeout: float | None = None,
    log: Path | None = None,
) -> Run:
    """Run `cmd`; wall time from here, peak RSS of the child from GNU time (or getrusage);
    its whole stdout + stderr written to `log` when given (on a timeout too)."""
    full_env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    with tempfile.NamedTemporaryFile(suffix=".time", delete=False) as f:
        time_file = f.name
    wrapped = list(cmd)
    if Path(GNU_TIME).exists():
        wrapped = [GNU_TIME, "-f", "%M", "-o", time_file, *cmd]
    os.sync()  # start from clean page cache: earlier jobs' dirty pages must not slow this one
    load = loadavg()
    start = time.perf_counter()
    pipe = subprocess.PIPE
    # its own process group: a timeout kills the job under GNU time too, not GNU time alone
    proc = subprocess.Popen(
        wrapped, env=full_env, stdout=pipe, stderr=pipe, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        _write_log(log, stdout, stderr, f"killed after {timeout} s")
        os.unlink(time_file)
        raise
    wall = time.perf_counter() - start
    _write_log(log, stdout, stderr, f"exit {proc.returncode} after {wall:.1f} s")
    rss_kb = _peak_rss_kb(time_file)
    os.unlink(time_file)
    tail = (stdout + stderr)[-2000:]
    return Run(job, wall, rss_kb / 1024, proc.returncode, load, tail, _json_lines(stdout))


def _write_log(log: Path | None, stdout: str | None, stderr: str | None, end: str) -> None:
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"{stdout or ''}\n--- stderr ---\n{stderr or ''}\n--- {end}\n")


def _peak_rss_kb(time_file: str) -> float:
    try:
        return float(Path(time_file).read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        import resource

        return float(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def _json_lines(stdout: str) -> dict:
    """Merge `BENCH {json}` lines a job printed (its own internal timings)."""
    found: dict = {}
    for line in stdout.splitlines():
        if line.startswith("BENCH "):
            found.update(json.loads(line[6:]))
    return found


def alternate(
    jobs: dict[str, Callable[[], Run]], repeats: int, log: Callable[[str], None] = print
) -> dict[str, list[Run]]:
    """Run each job `repeats` times, interleaved A B C A B C ..."""
    runs: dict[str, list[Run]] = {name: [] for name in jobs}
    for i in range(repeats):
        for name, job in jobs.items():
            run = job()
            runs[name].append(run)
            status = "ok" if run.returncode == 0 else f"FAILED rc={run.returncode}"
            log(
                f"  [{i + 1}/{repeats}] {name}: {run.wall_s:.2f} s, {run.peak_rss_mb:.0f} MB "
                f"peak RSS, load {run.loadavg} {status}"
            )
            if run.returncode != 0:
                log(run.output_tail)
    return runs


def summarize(runs: list[Run]) -> dict:
    """Min and median wall time and peak RSS of the successful runs."""
    ok = [r for r in runs if r.returncode == 0]
    if not ok:
        return {"ok": False, "runs": len(runs)}
    walls = [r.wall_s for r in ok]
    summary = {
        "ok": True,
        "runs": len(ok),
        "wall_min_s": min(walls),
        "wall_median_s": statistics.median(walls),
        "peak_rss_mb": max(r.peak_rss_mb for r in ok),
        "loadavg": [r.loadavg for r in ok],
    }
    extras = [r.extra for r in ok if r.extra]
    for key in sorted({k for e in extras for k in e}):
        values = [e[key] for e in extras if isinstance(e.get(key), (int, float))]
        if values:
            summary[f"{key}_min"] = min(values)
    return summary


def machine() -> dict:
    """Cores, memory, Python and platform, for the results file."""
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_results(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=lambda o: asdict(o)) + "\n")


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def this_python() -> str:
    return sys.executable


# ---------------------------------------------------------------- one table for run_all.py


def result_row(job: str, tool: str, summary: dict, **fields) -> dict:
    """One row of the combined table (`run_all.py`) from a `summarize` result.

    Benchmarks put a list of these under "rows" in their JSON. Optional `fields`:
    output_bytes, ppl, bytes_in/bytes_out (bytes a file job reads/writes: its share of the
    machine's file-copy limit), mem_GBps (an in-memory rate: its share of the memory-copy
    limit), ours (the quantscale tool of this job, for the ratio column), note.
    """
    row = {"job": job, "tool": tool, "ok": bool(summary.get("ok"))}
    for key in ("wall_min_s", "wall_median_s", "work_s_min", "peak_rss_mb", "runs", "loadavg"):
        if key in summary:
            row[key] = summary[key]
    row.update({k: v for k, v in fields.items() if v is not None})
    return row


def dir_bytes(path: Path) -> int:
    """Total size of the files under `path` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def versions(packages: Sequence[str], python: str | None = None) -> dict[str, str]:
    """Installed versions of `packages` in this interpreter or in the venv of `python`."""
    code = (
        "import json, sys\nfrom importlib import metadata\nout = {}\n"
        "for p in sys.argv[1:]:\n    try:\n        out[p] = metadata.version(p)\n"
        "    except metadata.PackageNotFoundError:\n        pass\nprint(json.dumps(out))"
    )
    cmd = [python or sys.executable, "-c", code, *packages]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
        return json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return {}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# GPTQModel imports torchvision (for InternVL), which text models do not need: let
# transformers record that torchvision is absent (a cached check), then stub the modules
# GPTQModel imports (text in a job script, before it imports gptqmodel).
TORCHVISION_STUB = """
import enum, importlib.machinery, sys, types
from transformers.utils import import_utils
import_utils.is_torchvision_available()
import_utils.is_torchvision_v2_available()
modes = enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC")
for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
    stub = types.ModuleType(name)
    stub.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    stub.__path__, stub.InterpolationMode = [], modes
    sys.modules[name] = stub
    parent, _, leaf = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], leaf, stub)
"""


# Perplexity code for benchmark jobs run as scripts, ours and the peers' (whose venvs lack
# quantscale): non-overlapping windows, the same in every job; with BOS_ENV set (Gemma-3) each
# window is that BOS id + seq_len - 1 tokens and every token after it is scored, as
# quantscale.eval.perplexity does with bos_id.
BOS_ENV = "BENCH_BOS_ID"
PPL_CODE = """
import math, os, torch
def perplexity(model, tokens, seq_len=512):
    bos = os.environ.get("BENCH_BOS_ID")
    head = torch.tensor([int(bos)]) if bos else tokens[:0]
    width = seq_len - len(head)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(tokens), width):
            ids = torch.cat([head, tokens[i:i + width]])[None]
            if ids.shape[1] < 2:
                continue
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return math.exp(nll / count)
"""

# Zero-shot multiple choice for benchmark jobs, ours and the peers' (one scorer for every row
# of a table): BENCH_ZS_ROWS names a JSON file {task: [{query, choices, gold}, ...]}. Each
# choice is scored as lm-eval does: the continuation is the tokens of `query + " " + choice`
# after those of `query`, its summed log-likelihood gives acc, divided by the choice's
# length in characters acc_norm. The choices of one item run as one right-padded batch (the
# padding follows every scored position, so no mask), keeping only the logits that score.
ZS_ENV = "BENCH_ZS_ROWS"
ZS_CODE = """
import json, os, torch
def _choice_scores(model, tok, head, query, choices):
    ctx = head + tok(query, add_special_tokens=False)["input_ids"]
    seqs = [head + tok(query + " " + c, add_special_tokens=False)["input_ids"] for c in choices]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    keep = torch.arange(len(ctx) - 1, width - 1)
    logp = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits.float()
    logp = logp.log_softmax(-1)
    scores = []
    for i, s in enumerate(seqs):
        n = len(s) - len(ctx)
        target = ids[i, len(ctx):len(s)]
        scores.append(float(logp[i, :n].gather(-1, target[:, None]).sum()))
    return scores
def zeroshot(model, tok):
    path = os.environ.get("BENCH_ZS_ROWS")
    if not path:
        return {}
    bos = os.environ.get("BENCH_BOS_ID")
    head = [int(bos)] if bos else []
    out = {}
    with torch.inference_mode():
        for task, rows in json.loads(open(path).read()).items():
            hits = hits_norm = 0
            for row in rows:
                ll = _choice_scores(model, tok, head, row["query"], row["choices"])
                norm = [x / len(c) for x, c in zip(ll, row["choices"])]
                hits += ll.index(max(ll)) == row["gold"]
                hits_norm += norm.index(max(norm)) == row["gold"]
            out[task], out[task + "_norm"] = hits / len(rows), hits_norm / len(rows)
    return out
"""
