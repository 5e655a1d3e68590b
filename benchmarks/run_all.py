"""Run every benchmark in this folder and print one table: quantscale vs peers vs the machine.

Each benchmark module present (kernels, fp8_block, calibration, gptq, hessian_factor, moe_gptq,
streaming_scale) runs as a subprocess, `python benchmarks/X.py [--quick] --json
bench-results/X.json`; one whose --help lacks `--json` (or `--quick`, in a quick run) is
skipped with a note, and so are moe_gptq and streaming_scale in a quick run (`FULL_ONLY`).
In the same run this measures the machine's raw limits on the same bytes (the SmolLM2 or
synthetic input): a plain file copy and an in-memory copy. The table
shows, per job and tool, wall and work time, peak RSS, output size, perplexity, ours/peer time
and the share of the machine limit reached. Everything goes to bench-results/all.json.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only fp8_block,gptq]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "bench-results"
MODULES = (
    "kernels",
    "fp8_block",
    "calibration",
    "gptq",
    "hessian_factor",
    "moe_gptq",
    "streaming_scale",
)
MODULES += ("mamba_speed",)
FULL_ONLY = ("moe_gptq", "streaming_scale")  # minutes / hours on 2 cores: not in --quick
QUICK_BUDGET_S = 280  # --quick: all modules together, so the run stays under 5 minutes
OUR_PACKAGES = ("quantscale", "torch", "transformers", "safetensors", "numpy")
PEER_PACKAGES = ("llmcompressor", "compressed-tensors", "gptqmodel", "nvidia-modelopt")
PEER_PACKAGES += ("optimum-quanto", "transformers", "torch")


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- machine limits


def limit_input() -> Path | None:
    """Bytes to copy: the largest shard of SmolLM2 (or of the synthetic input, if cached)."""
    candidates = []
    try:
        from quantscale.data.assets import smollm2_checkpoint

        candidates.append(Path(smollm2_checkpoint()))
    except Exception as err:  # noqa: BLE001 - fall back to the synthetic input
        log(f"SmolLM2 unavailable for the limits ({err})")
    from quantscale.cache import cache_dir

    candidates.append(cache_dir() / "bench-inputs" / "llama-1gb-bf16")
    for ckpt in candidates:
        shards = sorted(ckpt.glob("*.safetensors"), key=lambda p: p.stat().st_size)
        if shards:
            return shards[-1]
    return None


def machine_limits(src: Path, repeats: int) -> dict:
    """Best of `repeats` alternating runs: file copy (GB/s of bytes copied, source in page
    cache, buffered like our writes) and in-memory copy (bytes copied/s into a warm buffer)."""
    import torch

    size = src.stat().st_size
    data = torch.empty(size, dtype=torch.uint8)
    with open(src, "rb", buffering=0) as f:
        f.readinto(memoryview(data.numpy()))
    dst = torch.empty_like(data)
    work = Path(tempfile.mkdtemp(prefix="limits-", dir=src.parent.parent))
    file_s, mem_s, loads = [], [], []
    try:
        for _ in range(repeats):
            os.sync()
            loads.append(common.loadavg())
            t0 = time.perf_counter()
            shutil.copyfile(src, work / "copy")
            file_s.append(time.perf_counter() - t0)
            (work / "copy").unlink()
            os.sync()
            dst.copy_(data)
            t0 = time.perf_counter()
            dst.copy_(data)
            mem_s.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "source": str(src),
        "bytes": size,
        "file_copy_s": min(file_s),
        "file_copy_GBps": size / min(file_s) / 1e9,
        "mem_copy_s": min(mem_s),
        "mem_copy_GBps": size / min(mem_s) / 1e9,
        "loadavg": loads,
    }


def limit_rows(limits: dict) -> list[dict]:
    size = limits["bytes"]
    rows = []
    for key, tool in (("file_copy", "plain file copy"), ("mem_copy", "in-memory copy")):
        summary = {"ok": True, "wall_min_s": limits[f"{key}_s"], "loadavg": limits["loadavg"]}
        note = f"{limits[f'{key}_GBps']:.2f} GB/s of {size / 1e6:.0f} MB"
        rows.append(common.result_row("machine limit", tool, summary, note=note))
    return rows


# ---------------------------------------------------------------- benchmark modules


def module_flags(script: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300
    )
    return done.stdout if done.returncode == 0 else ""


def run_module(name: str, quick: bool, timeout: float) -> dict:
    """Run one benchmark script; returns its JSON (or why it was skipped or failed)."""
    script = HERE / f"{name}.py"
    if not script.exists():
        return {"skipped": f"{script.name} not present"}
    flags = module_flags(script)
    missing = [f for f in ("--json", "--quick" if quick else None) if f and f not in flags]
    if missing:
        return {"skipped": f"{script.name} has no {' / '.join(missing)} flag"}
    out = RESULTS / f"{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(script), "--json", str(out), *(["--quick"] if quick else [])]
    log(f"\n=== {' '.join(cmd)}  (load {common.loadavg()})")
    start = time.perf_counter()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "QUANTSCALE_PROGRESS": "0"}
    try:
        done = subprocess.run(cmd, timeout=timeout, env=env)
        rc = done.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = time.perf_counter() - start
    if rc != 0 or not out.exists():
        return {"failed": f"exit {rc} after {wall:.0f} s", "wall_s": wall}
    result = json.loads(out.read_text())
    result["wall_s"] = wall
    return result


def rows_of(name: str, result: dict) -> list[dict]:
    """A module's table rows: its "rows" list, else rows rebuilt from `summarize` dicts."""
    if "rows" in result:
        return result["rows"]
    rows = []

    def walk(obj, label: str) -> None:
        if not isinstance(obj, dict):
            return
        summary = obj.get("summary")
        if isinstance(summary, dict) and all(isinstance(v, dict) for v in summary.values()):
            for tool, s in summary.items():
                rows.append(common.result_row(f"{name} {label}".strip(), tool, s))
            return
        for key, value in obj.items():
            walk(value, key)

    walk(result, "")
    return rows


# ---------------------------------------------------------------- the table


def add_ratios(rows: list[dict], limits: dict | None) -> None:
    """ours/peer (wall time, same job) and the share of the machine limit reached."""
    by_job: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_job.setdefault(row["job"], {})[row["tool"]] = row
    for row in rows:
        ours = by_job[row["job"]].get(row.get("ours", ""))
        if ours and ours.get("ok") and row.get("ok") and ours is not row:
            key = "wall_min_s"
            if row["tool"].startswith("floor") and "work_s_min" in ours and "work_s_min" in row:
                key = "work_s_min"  # x floor: the I/O work, imports aside
            row["ours_over_peer"] = ours[key] / row[key]
        if limits and row.get("ok") and "bytes_in" in row:
            moved = row["bytes_in"] + row.get("bytes_out", 0)
            limit_s = moved / 2 / (limits["file_copy_GBps"] * 1e9)
            row["of_limit"] = limit_s / row.get("work_s_min", row["wall_min_s"])
        if limits and row.get("ok") and "mem_GBps" in row and "of_limit" not in row:
            row["of_limit"] = row["mem_GBps"] / limits["mem_copy_GBps"]


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def print_rows(rows: list[dict]) -> None:
    header = ["job", "tool", "wall s", "work s", "peak RSS MB", "output MB", "ppl"]
    header += ["ours/peer", "of limit", "note"]
    table = []
    for r in rows:
        if not r.get("ok"):
            table.append([r["job"], r["tool"], "failed", "", "", "", "", "", "", r.get("note", "")])
            continue
        out = r.get("output_bytes")
        table.append(
            [
                r["job"],
                r["tool"],
                _fmt(r.get("wall_min_s"), ".3g"),
                _fmt(r.get("work_s_min"), ".3g"),
                _fmt(r.get("peak_rss_mb"), ".0f"),
                _fmt(out / 1e6 if out else None, ".0f"),
                _fmt(r.get("ppl"), ".3f"),
                _fmt(r.get("ours_over_peer"), ".2f"),
                _fmt(r.get("of_limit"), ".0%"),
                r.get("note", ""),
            ]
        )
    common.print_table(table, header)


def facts() -> dict:
    """Machine, date, load and versions (ours and each peer venv's)."""
    info = {**common.machine(), "cpu": common.cpu_model(), "loadavg_start": common.loadavg()}
    info["versions"] = {"quantscale venv": common.versions(OUR_PACKAGES)}
    root = common.venv_root()
    for venv in sorted(root.glob("*/bin/python")) if root.exists() else []:
        info["versions"][venv.parent.parent.name] = common.versions(PEER_PACKAGES, str(venv))
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small subset, under 5 minutes")
    p.add_argument("--only", default="", help="comma-separated modules (default: all)")
    p.add_argument("--json", type=Path, default=RESULTS / "all.json")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(MODULES)
    started = time.perf_counter()
    payload = {"machine": facts(), "quick": args.quick, "modules": {}}
    src = limit_input()
    if src is not None:
        log(f"machine limits on {src} (load {common.loadavg()})")
        payload["limits"] = machine_limits(src, 2 if args.quick else 3)
    rows = limit_rows(payload["limits"]) if src is not None else []
    for name in names:
        left = QUICK_BUDGET_S - (time.perf_counter() - started) if args.quick else 3 * 3600
        if args.quick and name in FULL_ONLY:
            payload["modules"][name] = {"skipped": "the full run only (minutes on 2 cores)"}
            continue
        if left < 20:
            payload["modules"][name] = {"skipped": "no time left in the --quick budget"}
            continue
        result = run_module(name, args.quick, left)
        payload["modules"][name] = result
        rows += rows_of(name, result)
    add_ratios(rows, payload.get("limits"))
    payload["rows"] = rows
    payload["machine"]["loadavg_end"] = common.loadavg()
    payload["wall_s"] = time.perf_counter() - started
    m = payload["machine"]
    log(
        f"\n{m['date']}  {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; load "
        f"{m['loadavg_start']} -> {m['loadavg_end']}; torch "
        f"{m['versions']['quantscale venv'].get('torch', '?')}"
    )
    print_rows(rows)
    for name, result in payload["modules"].items():
        why = result.get("skipped") or result.get("failed")
        if why:
            log(f"note: {name}: {why}")
    common.write_results(args.json, payload)
    log(f"\nresults: {args.json} ({payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
