"""GPTQ time and traffic for a MiniMax-M2-shaped model on R ranks: measured rates, projected.

Measures, on the device given (`--device cpu` here; `cuda` on a GPU machine), with
`--threads` threads, the pieces one GPTQ layer of the model is made of, at the model's real
shapes (random weights, Hessians from random inputs; W4A16 g128 by default):
  factor    `inverse_hessian_factor` of an n-column Hessian (n = 1536, 3072, 6144)
  solve     `gptq_quantize_batch` of E experts (gate/up [1536 x 3072], down [3072 x 1536]) and
            of the attention projections (q [6144 x 3072], k/v [1024 x 3072], o [3072 x 6144]),
            the factorizations included
  hessian   adding one token's x^T x for the widths the layer's Linears read (float32 addmm)
  forward   a float32 matmul's rate (GFLOP/s) at the expert shapes: the calibration forward
            is 2 x active parameters FLOPs per token
then projects one layer and the whole model on R ranks (8 per node x 1, 2, 4 nodes by
default) for T calibration tokens: compute per rank (forward + Hessians on T/R tokens, solves
balanced over ranks), bytes received per rank (the traffic formula that the SmolLM2 runs
confirm, docs/benchmarks.md: Hessians gathered in float64 to their owner, weights broadcast as
int4 codes + scales; expert parallel: routed inputs in bf16 instead, per expert the smaller of
the two), and their time at the stated link bandwidths. Times are CPU seconds (process time)
on CPU, so that a loaded machine inflates them less; the link bandwidths are assumptions, not
measurements, and are printed with the table.

    .venv/bin/python benchmarks/projection.py [--device cpu|cuda] [--threads 1] [--experts 4]
        [--tokens 1048576] [--ranks 1,8,16,32] [--intra-gbps 400] [--inter-gbps 50]
        [--assume-tflops 20] [--json bench-results/projection.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantscale.algorithms.gptq import gptq_quantize_batch, inverse_hessian_factor  # noqa: E402
from quantscale.scheme import preset_scheme  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench-results" / "projection.json"


@dataclass(frozen=True)
class Shapes:
    """A MoE decoder's GPTQ-relevant shapes (MiniMax-M2's by default)."""

    name: str = "MiniMax-M2"
    hidden: int = 3072
    q_heads: int = 48
    kv_heads: int = 8
    head_dim: int = 128
    experts: int = 256
    top_k: int = 8
    width: int = 1536  # expert intermediate size
    layers: int = 62
    group: int = 128

    @property
    def q_out(self) -> int:
        return self.q_heads * self.head_dim

    @property
    def kv_out(self) -> int:
        return self.kv_heads * self.head_dim

    def active_params(self) -> int:
        """Parameters one token's forward multiplies through in one layer (router included)."""
        attn = self.hidden * (self.q_out + 2 * self.kv_out) + self.q_out * self.hidden
        return attn + self.top_k * 3 * self.hidden * self.width + self.hidden * self.experts

    def hessian_flops_per_token(self) -> int:
        """x^T x FLOPs per token: q/k/v and o inputs, and top-k experts' gate/up and down."""
        attn = self.hidden**2 + self.q_out**2
        return 2 * (attn + self.top_k * (self.hidden**2 + self.width**2))

    def hessian_bytes(self) -> tuple[int, int]:
        """float64 Hessians of one layer: (attention, one routed expert's gate/up + down)."""
        return 8 * (self.hidden**2 + self.q_out**2), 8 * (self.hidden**2 + self.width**2)

    def code_bytes(self) -> int:
        """One layer's weights as int4 codes (two a byte) + bf16 group scales."""
        attn = self.hidden * (self.q_out + 2 * self.kv_out) + self.q_out * self.hidden
        weights = attn + self.experts * 3 * self.hidden * self.width
        return weights // 2 + 2 * weights // self.group


def _timer(device: torch.device):
    """A clock of the work: process CPU time on CPU, synchronized wall time on CUDA."""
    if device.type == "cuda":

        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return now
    return time.process_time


def _hessian(n: int, samples: int, device: torch.device) -> torch.Tensor:
    x = torch.randn(samples, n, device=device)
    x[:, : n // 64] *= 20.0  # a few outlier channels, as real inputs have
    return (x.T @ x) * (2.0 / samples)


def measure(
    shapes: Shapes, device: torch.device, experts: int, scheme: str, repeats: int
) -> dict[str, float]:
    """Seconds per factor / solve / token and the matmul rate, best of `repeats`."""
    now = _timer(device)
    args = preset_scheme(scheme).weights
    assert args is not None, f"{scheme}: not a weight scheme"
    out: dict[str, float] = {}

    def best(key: str, fn) -> None:
        times = []
        for _ in range(repeats):
            t0 = now()
            fn()
            times.append(now() - t0)
        out[key] = min(times)

    s, h, q = shapes, shapes.hidden, shapes.q_out
    hess = {n: _hessian(n, 2 * n, device) for n in (s.width, h, q)}
    for n, mat in hess.items():
        best(f"factor_{n}", lambda mat=mat: inverse_hessian_factor(mat, 0.01))

    def solve(rows: int, cols: int, e: int) -> None:
        w = torch.randn(e, rows, cols, device=device, dtype=torch.bfloat16) * 0.02
        gptq_quantize_batch(w, hess[cols][None].expand(e, cols, cols).clone(), args)

    best("solve_expert_gate", lambda: solve(s.width, h, experts))
    best("solve_expert_down", lambda: solve(h, s.width, experts))
    for key in ("solve_expert_gate", "solve_expert_down"):
        out[key] /= experts
    best("solve_q", lambda: solve(q, h, 1))
    best("solve_kv", lambda: solve(s.kv_out, h, 1))
    best("solve_o", lambda: solve(h, q, 1))
    tokens = 2048
    xs = {n: torch.randn(tokens, n, device=device) for n in (s.width, h, q)}
    acc = {n: torch.zeros(n, n, device=device) for n in xs}
    best("hessian_tokens", lambda: [acc[n].addmm_(x.T, x) for n, x in xs.items()])
    out["hessian_flops_per_s"] = 2 * tokens * sum(n * n for n in xs) / out.pop("hessian_tokens")
    a = torch.randn(tokens, h, device=device)
    b = torch.randn(h, s.width, device=device)
    best("matmul", lambda: a @ b)
    out["matmul_flops_per_s"] = 2 * tokens * h * s.width / out.pop("matmul")
    return out


def assumed(m: dict[str, float], tflops: float) -> dict[str, float]:
    """The measured rates scaled to a device that runs the matmuls at `tflops` TFLOP/s: every
    time divided by (tflops / the measured matmul rate), i.e. the solves assumed to keep the
    same efficiency relative to a plain matmul as on the measured device (an assumption)."""
    ratio = tflops * 1e12 / m["matmul_flops_per_s"]
    return {k: v * ratio if k.endswith("flops_per_s") else v / ratio for k, v in m.items()}


def layer_solve_s(shapes: Shapes, m: dict[str, float]) -> float:
    """One layer's solves on one rank (routed experts: gate and up share a Hessian, one factor
    of it; the measured solves include their own factorization, so the shared one is
    subtracted once for the second Linear of each pair)."""
    s = shapes
    attn = m["solve_q"] + 2 * m["solve_kv"] - 2 * m[f"factor_{s.hidden}"] + m["solve_o"]
    expert = 2 * m["solve_expert_gate"] - m[f"factor_{s.hidden}"] + m["solve_expert_down"]
    return attn + s.experts * expert


@dataclass
class Row:
    ranks: int
    nodes: int
    mode: str
    forward_s: float
    hessian_s: float
    solve_s: float
    received_gb: float
    comm_s: float
    layer_s: float
    model_h: float


def project(
    shapes: Shapes,
    m: dict[str, float],
    tokens: int,
    ranks: int,
    per_node: int,
    intra_gbps: float,
    inter_gbps: float,
) -> list[Row]:
    """Per-layer time on `ranks` ranks, data parallel and expert parallel (routed experts)."""
    s = shapes
    local = tokens / ranks
    forward = local * 2 * s.active_params() / m["matmul_flops_per_s"]
    hessian = local * s.hessian_flops_per_token() / m["hessian_flops_per_s"]
    solve = layer_solve_s(s, m) / ranks
    attn_h, expert_h = s.hessian_bytes()
    share = (ranks - 1) / ranks
    weights = share * s.code_bytes()
    # expert parallel: per expert, the routed inputs a rank holds for others, or its Hessian
    inputs = local * s.top_k / s.experts * (s.hidden + s.width) * 2
    ep_expert = min(inputs, expert_h) * s.experts * share
    nodes = max(1, ranks // per_node)
    gbps = intra_gbps if nodes == 1 else inter_gbps
    rows = []
    for mode, received in (
        ("data parallel", share * (attn_h + s.experts * expert_h) + weights),
        ("expert parallel", share * attn_h + ep_expert + weights),
    ):
        comm = received / (gbps * 1e9)
        layer = forward + hessian + solve + comm
        rows.append(
            Row(
                ranks,
                nodes,
                mode,
                forward,
                hessian,
                solve,
                received / 1e9,
                comm,
                layer,
                layer * s.layers / 3600,
            )
        )
    return rows


def table(rows: list[Row]) -> str:
    head = (
        "| ranks (nodes) | mode | forward s | Hessians s | solves s | received GB/rank "
        "| comm s | layer s | 62 layers h |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r.ranks} ({r.nodes}) | {r.mode} | {r.forward_s:.1f} | {r.hessian_s:.1f} | "
            f"{r.solve_s:.1f} | {r.received_gb:.2f} | {r.comm_s:.2f} | {r.layer_s:.1f} | "
            f"{r.model_h:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--experts", type=int, default=4, help="experts per measured batch solve")
    p.add_argument("--scheme", default="W4A16")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tokens", type=int, default=1 << 20, help="calibration tokens")
    p.add_argument("--ranks", default="1,8,16,32")
    p.add_argument("--per-node", type=int, default=8)
    p.add_argument("--intra-gbps", type=float, default=400.0, help="GB/s within a node")
    p.add_argument("--inter-gbps", type=float, default=50.0, help="GB/s per rank across nodes")
    p.add_argument(
        "--assume-tflops",
        type=float,
        default=None,
        help="also project for a device whose matmuls run at this many TFLOP/s (an assumption)",
    )
    p.add_argument("--json", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = Shapes()
    m = measure(shapes, device, args.experts, args.scheme, args.repeats)
    ranks = [int(x) for x in args.ranks.split(",")]

    def rows_of(rates: dict[str, float]) -> list[Row]:
        links = (args.per_node, args.intra_gbps, args.inter_gbps)
        return [row for r in ranks for row in project(shapes, rates, args.tokens, r, *links)]

    rows = rows_of(m)
    print(f"{shapes.name}, {args.scheme}, {args.tokens} calibration tokens, device {device}")
    print(f"threads {args.threads}; links {args.intra_gbps} GB/s intra, {args.inter_gbps} inter")
    for k, v in m.items():
        print(f"  {k}: {v:.4g}")
    print(f"  one layer's solves, one rank: {layer_solve_s(shapes, m):.1f} s")
    print(table(rows))
    scaled: list[Row] = []
    if args.assume_tflops:
        scaled = rows_of(assumed(m, args.assume_tflops))
        print(f"\nassumed: matmuls at {args.assume_tflops} TFLOP/s per rank (not measured)")
        print(table(scaled))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "shapes": asdict(shapes),
        "args": {k: str(v) for k, v in vars(args).items()},
        "measured": m,
        "rows": [asdict(r) for r in rows],
        "assumed_rows": [asdict(r) for r in scaled],
    }
    args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
