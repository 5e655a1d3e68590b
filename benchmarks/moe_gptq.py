"""MoE GPTQ: experts solved in batches (`gptq_quantize_batch`) vs one expert at a time.

Model: a Qwen3-MoE-shaped `Qwen3MoeForCausalLM` built from a config (random weights, bf16):
64 experts per layer, top-8 routing, hidden 256, expert intermediate 128, 2 layers, its
fused experts split into per-expert Linears (`models.moe.linearize_experts`). Calibration:
random token ids (32 x 128 by default). The same GPTQ W4A16 job (int4, group 128, act-order
'weight'), alternating, in one process, by these tools:
  batched            `expert_batch=None`: as many experts per solve as the memory budget holds
  one-at-a-time      `expert_batch=1`: one expert per solve
  unbatched (before) GPTQ as it was before batching: each expert group solved on its own (with
                     all-expert calibration the experts' gate/up are one stacked solve)
  batched, passes    batched, calibrated in `GPTQ.passes` of 16 experts (bounded Hessian
                     memory; the layer's forwards rerun per pass), driven layer by layer here
Modes: 'routed' (each expert calibrated on the tokens the router sends it: every expert has
its own gate/up and down Hessians) and 'all' (every expert on every token: the experts'
gate/up share one Hessian).

Per job: `quantize_s` (the whole job: calibration forwards, Hessians, solves), `solve_s` (the
time inside `GPTQ.finish_layer`: the solves) and the peak bytes of Hessians held at once; the
table gives the best of the repeats, each tool's time over the batched tool's, and how far
its results are from the batched ones (max |w - w_batched| over every expert weight, and the
share of elements that differ).

    .venv/bin/python benchmarks/moe_gptq.py [--modes routed,all] [--repeats 3] [--layers 2]
        [--samples 32] [--seq-len 128] [--json bench-results/moe_gptq.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from quantscale.algorithms.base import register_algorithm  # noqa: E402
from quantscale.algorithms.gptq import GPTQ  # noqa: E402
from quantscale.calibration.sequential import batched, layerwise  # noqa: E402
from quantscale.models.moe import calibrate_all_experts, expert_of, linearize_experts  # noqa: E402
from quantscale.orchestrator import quantize_model  # noqa: E402
from quantscale.runtime.qlinear import replace_linears  # noqa: E402
from quantscale.scheme import preset_recipe  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench-results" / "moe_gptq.json"
BATCHED, SINGLE = "quantscale batched", "quantscale one-at-a-time"
PASSES = "quantscale batched, passes"
# tool -> (registered algorithm, its options)
TOOLS = {
    BATCHED: ("gptq-timed", {}),
    SINGLE: ("gptq-timed", {"expert_batch": 1}),
    "quantscale unbatched (before)": ("gptq-timed-unbatched", {}),
    PASSES: ("gptq-timed", {"expert_batch": 16}),
}
SOLVE_S: list[float] = []
HESSIAN_BYTES: list[int] = []


@register_algorithm("gptq-timed")
@dataclass
class TimedGPTQ(GPTQ):
    """GPTQ that records each `finish_layer`'s time (the solves, `SOLVE_S`) and the bytes of
    the Hessians it holds (`HESSIAN_BYTES`)."""

    def finish_layer(self, linears) -> None:
        assert self._tracker is not None
        held = sum(a.sum.numel() * a.sum.element_size() for a in self._tracker.acc.values())
        HESSIAN_BYTES.append(held)
        start = time.perf_counter()
        super().finish_layer(linears)
        SOLVE_S.append(time.perf_counter() - start)


@register_algorithm("gptq-timed-unbatched")
@dataclass
class UnbatchedGPTQ(TimedGPTQ):
    """GPTQ as before batching: each expert group solved on its own."""

    def _batchable(self, names, acc) -> bool:
        return False


def quantize_in_passes(model: torch.nn.Module, tokens: torch.Tensor, algo: GPTQ) -> dict:
    """W4A16 GPTQ layer by layer, each layer in `algo.passes` (the orchestrator runs one pass
    per layer); the QuantLinears."""
    linears = replace_linears(model, preset_recipe("W4A16"))
    done = 0
    for step in layerwise(model, batched(tokens, 8)):
        group = {n: q for n, q in linears.items() if n.startswith(step.name + ".")}
        for part in algo.passes(group):
            algo.start_layer(part)
            step.run()
            algo.finish_layer(part)
        done += len(group)
    assert done == len(linears), "every quantized Linear is in a decoder layer"
    return linears


def build_model(layers: int) -> torch.nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=64,
        num_experts_per_tok=8,
        max_position_embeddings=512,
    )
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()
    linearize_experts(model)
    return model


def run_job(base: torch.nn.Module, tokens: torch.Tensor, tool: str, all_tokens: bool):
    """(quantize_s, solve_s, peak Hessian bytes, weights) of one run of `tool` on a copy of
    `base`."""
    method, options = TOOLS[tool]
    model = copy.deepcopy(base)
    SOLVE_S.clear()
    HESSIAN_BYTES.clear()
    start = time.perf_counter()
    with calibrate_all_experts(model, enabled=all_tokens):
        if tool == PASSES:
            linears = quantize_in_passes(model, tokens, TimedGPTQ(**options))
        else:
            linears = quantize_model(model, "W4A16", tokens, method, batch_size=8, **options)
    quantize_s = time.perf_counter() - start
    weights = {n: q.weight.detach().float() for n, q in linears.items()}
    return quantize_s, sum(SOLVE_S), max(HESSIAN_BYTES), weights


def compare(a: dict, b: dict) -> dict:
    """Max abs difference and share of differing elements: experts, and the other Linears."""
    out = {}
    for kind, names in (
        ("experts", [n for n in a if expert_of(n)]),
        ("others", [n for n in a if not expert_of(n)]),
    ):
        diffs = [(a[n] - b[n]).abs() for n in names]
        out[f"{kind}_max_diff"] = max(float(d.max()) for d in diffs)
        out[f"{kind}_differ"] = sum(int((d > 0).sum()) for d in diffs) / sum(
            d.numel() for d in diffs
        )
    return out


def run_mode(mode: str, base: torch.nn.Module, tokens: torch.Tensor, repeats: int) -> dict:
    times: dict[str, list[tuple[float, float]]] = {tool: [] for tool in TOOLS}
    held: dict[str, int] = {}
    weights: dict[str, dict] = {}
    for rep in range(repeats):
        for tool in TOOLS:
            quantize_s, solve_s, held[tool], weights[tool] = run_job(
                base, tokens, tool, mode == "all"
            )
            times[tool].append((quantize_s, solve_s))
            print(
                f"{mode} repeat {rep}: {tool}: quantize {quantize_s:.2f} s, solves "
                f"{solve_s:.2f} s, Hessians {held[tool] / 1e6:.1f} MB (load {common.loadavg()})",
                flush=True,
            )
    best = {tool: (min(q for q, _ in t), min(s for _, s in t)) for tool, t in times.items()}
    out: dict = {"times": times, "best": best, "hessian_bytes": held}
    for tool in TOOLS:
        out[tool] = {
            "quantize_ratio": best[tool][0] / best[BATCHED][0],
            "solve_ratio": best[tool][1] / best[BATCHED][1],
            **compare(weights[BATCHED], weights[tool]),
        }
    return out


def rows_of(mode: str, result: dict) -> list[dict]:
    job = f"moe_gptq W4A16 64 experts ({mode})"
    rows = []
    for tool, (quantize_s, solve_s) in result["best"].items():
        summary = {"ok": True, "runs": len(result["times"][tool]), "wall_min_s": quantize_s}
        note = f"solves {solve_s:.2f} s"
        if tool != BATCHED:
            note += f"; max diff {result[tool]['experts_max_diff']:.3g}"
        rows.append(
            common.result_row(job, tool, summary, work_s_min=solve_s, ours=BATCHED, note=note)
        )
    return rows


def print_summary(results: dict) -> None:
    header = ["mode", "tool", "quantize s", "solves s", "x batched (quantize)", "x (solves)"]
    header += ["Hessians MB", "max diff", "differ"]
    table = []
    for mode, r in results.items():
        for tool, (quantize_s, solve_s) in r["best"].items():
            vs = r[tool]
            table.append(
                [
                    mode,
                    tool,
                    f"{quantize_s:.2f}",
                    f"{solve_s:.2f}",
                    f"{vs['quantize_ratio']:.2f}",
                    f"{vs['solve_ratio']:.2f}",
                    f"{r['hessian_bytes'][tool] / 1e6:.1f}",
                    f"{vs['experts_max_diff']:.3g}",
                    f"{vs['experts_differ']:.2%}",
                ]
            )
    common.print_table(table, header)
    print("x batched: the tool's best time over the batched tool's; Hessians: the most held at")
    print("once; max diff / differ: its expert weights against the batched tool's")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="routed,all", help="comma-separated: routed, all")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--json", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    base = build_model(args.layers)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1024, (args.samples, args.seq_len), generator=gen)
    results = {m: run_mode(m, base, tokens, args.repeats) for m in args.modes.split(",") if m}
    print_summary(results)
    payload = {
        "machine": common.machine(),
        "config": vars(args) | {"json": str(args.json)},
        "results": {m: {k: v for k, v in r.items() if k != "best"} for m, r in results.items()},
        "rows": [row for m, r in results.items() for row in rows_of(m, r)],
    }
    common.write_results(args.json, payload)
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
