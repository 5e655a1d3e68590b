"""GPTQ's inverse-Hessian factor: ours in place (`algorithms/cholesky.py`) against the textbook
chain that llm-compressor and GPTQModel run (Cholesky, `cholesky_inverse`, Cholesky again).

Each (size, method) runs in its own process: a float32 Hessian of n columns (2/m X^T X of
m = 256 random rows, 1% dampening, so that building it never holds more than one n x n
matrix), then the factor, timed; the process's peak RSS growth over the Hessian alone is the
factor's extra memory, in units of one n x n matrix. Sizes: Llama-3-8B's q/k/v / o / gate /
up inputs (4,096) and its down_proj input (14,336). Repeats alternate the two methods.

    .venv/bin/python benchmarks/hessian_factor.py [--sizes 4096,14336] [--repeats 2]
        [--threads 1] [--quick] [--json bench-results/hessian_factor.json]

`--quick`: 4,096 only, one repeat. One thread by default: with two, MKL's `cholesky_inverse`
stalls whenever the other core is busy (5-12 s instead of 0.2 s for 2,048 columns, seen on the
loaded 2-core machine), which would measure contention, not the factorization.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench-results" / "hessian_factor.json"

JOB = """
import json, resource, sys, time, torch
n, method, threads = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
from quantscale.algorithms import cholesky
x = torch.randn(256, n, generator=torch.Generator().manual_seed(0))
h = x.t() @ x
h.mul_(2 / 256)
del x
h.diagonal().add_(0.01 * float(h.diagonal().mean()))
probe = h[:1, :1].clone()  # warm the LAPACK / BLAS libraries on a 1 x 1 problem
torch.linalg.cholesky(probe)
cholesky.upper_inverse_factor_(probe)
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = rss()
t0 = time.perf_counter()
if method == "textbook":
    low = torch.linalg.cholesky(h)
    del h
    inverse = torch.cholesky_inverse(low)
    del low
    u = torch.linalg.cholesky(inverse, upper=True)
    del inverse
else:
    assert cholesky.upper_inverse_factor_(h)
    u = h
seconds = time.perf_counter() - t0
print("BENCH " + json.dumps({"s": seconds, "extra_bytes": rss() - before,
                             "checksum": float(u.double().abs().sum())}))
"""


def run(n: int, method: str, threads: int) -> dict:
    out = subprocess.run(
        [common.this_python(), "-c", JOB, str(n), method, str(threads)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.split("BENCH ", 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4096,14336", type=lambda t: [int(v) for v in t.split(",")])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="4,096 columns, one repeat")
    ap.add_argument("--json", type=Path, default=RESULTS)
    a = ap.parse_args()
    if a.quick:
        a.sizes, a.repeats = [4096], 1
    results: dict = {"machine": common.machine(), "threads": a.threads, "sizes": {}, "rows": []}
    for n in a.sizes:
        runs: dict[str, list[dict]] = {"textbook": [], "in-place": []}
        for _ in range(a.repeats):
            for method in runs:
                runs[method].append(run(n, method, a.threads))
        matrix = 4 * n * n
        row = {
            m: {
                "best_s": min(r["s"] for r in rs),
                "extra_matrices": max(r["extra_bytes"] for r in rs) / matrix,
                "checksum": rs[0]["checksum"],
            }
            for m, rs in runs.items()
        }
        row["load"] = common.loadavg()
        results["sizes"][str(n)] = row
        for method, r in row.items():
            if method != "load":
                summary = {"ok": True, "wall_min_s": r["best_s"], "loadavg": row["load"]}
                note = f"{r['extra_matrices']:.2f} extra n x n matrices"
                job = f"GPTQ inverse-Hessian factor, {n} columns"
                tool = f"quantscale {method}" if method == "in-place" else "torch textbook chain"
                results["rows"].append(
                    common.result_row(job, tool, summary, ours="quantscale in-place", note=note)
                )
    table = []
    for n, row in results["sizes"].items():
        t, ours = row["textbook"], row["in-place"]
        table.append(
            [
                n,
                f"{4 * int(n) ** 2 / 2**20:.0f}",
                f"{t['best_s']:.2f}",
                f"{ours['best_s']:.2f}",
                f"{t['best_s'] / ours['best_s']:.2f}",
                f"{t['extra_matrices']:.2f}",
                f"{ours['extra_matrices']:.2f}",
                f"{abs(ours['checksum'] / t['checksum'] - 1):.1e}",
            ]
        )
    header = [
        "n",
        "matrix MiB",
        "textbook s",
        "in-place s",
        "speed-up",
        "textbook extra (matrices)",
        "in-place extra",
        "|sum| rel diff",
    ]
    common.print_table(table, header)
    common.write_results(a.json, results)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
