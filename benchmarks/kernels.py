"""In-memory kernels, reference vs fast, against an in-memory copy of the same bytes.

On one bf16 weight (4096x8192; 2048x4096 with --quick), best of several alternating rounds
(copy, then each kernel, then copy again ...), so that load on the machine hits all alike:
- FP8 block-128: reference (formats/fp8.py), eager fused and torch.compile'd (formats/
  fp8_fast.py; compile only without --quick) and the C++ kernel (formats/csrc);
- NVFP4 quantize + pack: reference (`quantize_nvfp4` + `pack_fp4`) and the C++ kernel
  (`quantize_nvfp4_packed`).
Rates are GB/s of bf16 input; "of copy" is the kernel's elements per second over the
copy's (bytes copied per second / 2), i.e. the share of the machine's memory limit reached.

    .venv/bin/python benchmarks/kernels.py [--quick] [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench-results" / "kernels.json"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate_best(fns: dict, rounds: int) -> dict[str, float]:
    """Best time of each function over `rounds` rounds that run them in turn (after a
    warm-up round)."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for key, fn in fns.items():
            best[key] = min(best[key], _timed(fn))
    return best


def kernels(w, compile_too: bool) -> tuple[dict, dict]:
    """name -> (job, function) of every kernel to time on `w`, and setup facts."""
    import torch

    from quantscale.formats import fp8_fast
    from quantscale.formats.fp4 import pack_fp4, quantize_nvfp4, quantize_nvfp4_packed
    from quantscale.formats.fp8 import quantize_fp8_block

    facts = {"cpp_was_cached": fp8_fast.native_built()}
    t0 = time.perf_counter()
    native = fp8_fast.native_available()
    facts["cpp_load_or_build_s"] = time.perf_counter() - t0
    if native:
        facts["cpp_simd_lanes"] = int(torch.ops.quantscale_fp8.simd_lanes())
    fp8 = f"fp8-block {w.shape[0]}x{w.shape[1]} in memory"
    nv = f"nvfp4 quantize+pack {w.shape[0]}x{w.shape[1]} in memory"
    fns = {
        ("fp8", "reference"): (fp8, lambda: quantize_fp8_block(w)),
        ("fp8", "eager"): (fp8, lambda: fp8_fast.quantize_fp8_block_fast(w, backend="eager")),
        ("nvfp4", "reference"): (nv, lambda: pack_fp4(quantize_nvfp4(w)[0])),
    }
    if compile_too and fp8_fast.compile_available():
        t0 = time.perf_counter()
        fp8_fast.quantize_fp8_block_fast(w, backend="compile")
        facts["compile_s"] = time.perf_counter() - t0
        fns[("fp8", "compiled")] = (
            fp8,
            lambda: fp8_fast.quantize_fp8_block_fast(w, backend="compile"),
        )
    if native:
        fns[("fp8", "C++")] = (fp8, lambda: fp8_fast.quantize_fp8_block_fast(w, backend="cpp"))
        fns[("nvfp4", "C++")] = (nv, lambda: quantize_nvfp4_packed(w))
    return fns, facts


def bench(quick: bool, repeats: int) -> dict:
    import torch

    shape = (2048, 4096) if quick else (4096, 8192)
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    dst = torch.empty_like(w)
    fns, facts = kernels(w, compile_too=not quick)
    timed = {"copy": lambda: dst.copy_(w), **{k: f for k, (_, f) in fns.items()}}
    result = {"shape": list(shape), "loadavg": common.loadavg(), **facts}
    best = alternate_best(timed, repeats)
    copy_gbps = w.nbytes / best["copy"] / 1e9
    result["copy_GBps"] = copy_gbps
    result["kernels"] = []
    for key, (job, _) in fns.items():
        gbps = w.nbytes / best[key] / 1e9
        row = {"kernel": key[0], "impl": key[1], "job": job, "s": best[key], "GBps": gbps}
        row["of_copy"] = gbps / copy_gbps
        result["kernels"].append(row)
        print(f"  {job}: {key[1]:9s} {gbps:7.2f} GB/s  {row['of_copy']:6.1%} of copy")
    print(f"  in-memory copy: {copy_gbps:.2f} GB/s")
    result["loadavg_end"] = common.loadavg()
    return result


def rows(result: dict) -> list[dict]:
    """Rows of run_all.py's table: the copy, then each kernel with its share of the copy."""
    out = [
        common.result_row(
            "machine limit",
            "in-memory copy (kernels)",
            {"ok": True, "wall_min_s": None, "loadavg": [result["loadavg"]]},
            mem_GBps=result["copy_GBps"],
            of_limit=1.0,
            note=f"{result['copy_GBps']:.2f} GB/s of {2 * math.prod(result['shape']) / 1e6:.0f} MB",
        )
    ]
    for k in result["kernels"]:
        note = f"{k['GBps']:.2f} GB/s bf16"
        if k["impl"] == "compiled":
            note += f", after {result['compile_s']:.1f} s compile"
        if k["impl"] == "C++":
            how = "load" if result["cpp_was_cached"] else "build"
            note += f", {result.get('cpp_simd_lanes', 1)} lanes, {how} "
            note += f"{result['cpp_load_or_build_s']:.1f} s"
        summary = {"ok": True, "wall_min_s": k["s"], "loadavg": [result["loadavg"]]}
        out.append(
            common.result_row(
                k["job"],
                f"quantscale {k['impl']}",
                summary,
                mem_GBps=k["GBps"],
                of_limit=k["of_copy"],
                ours="quantscale C++",
                note=note,
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller weight, no torch.compile")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    payload = {"machine": common.machine(), "kernels": bench(args.quick, args.repeats)}
    payload["rows"] = rows(payload["kernels"])
    common.write_results(args.json, payload)
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
