"""Generation speed of the Mamba fixtures: float vs Quamba INT8, CPU, with the cache.

Per fixture (`fixture:mamba`, `fixture:mamba2`: the small models trained on the Wikipedia
calibration text), greedy generation of 64 tokens after a fixed prompt (the first
`--prompt-len` held-out Wikipedia tokens), `model.generate(use_cache=True)`, timed for:
- float: the model as transformers loads it (its own mixers, float32);
- float, quantscale mixers: our mixers in float mode (the same code path as INT8 minus the
  quantization: separates our Python from the INT8 arithmetic);
- INT8 quamba1 / quamba2: the fixture quantized (static INT8 activations, INT8 weights;
  `torch._int_mm` matmuls, INT8 conv1d), calibrated on 16 windows of 128 tokens.
With `--synthetic`, the same for random-weight models of Mamba-130M / Mamba2-130M shape
(hidden 768, 24 layers; vocabulary 4,096, the fixtures' tokenizer, so that the float LM
head does not hide the mixers): the fixtures are so small that Python overhead, not
arithmetic, sets their speed. Each timed run is prefill + 64 decode steps; rounds alternate
the models (after a warm-up round) so that load on the machine hits all alike; the median
over `--repeats` rounds gives ms per generated token (wall, and process CPU time over all
threads), tokens/s and the ratio
to float. The load average is recorded before and after.

    .venv/bin/python benchmarks/mamba_speed.py [--repeats 5] [--threads 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench-results" / "mamba_speed.json"
NEW_TOKENS = 64
KINDS = ("mamba", "mamba2")
METHODS = ("quamba1", "quamba2")
SYNTHETIC = {  # Mamba-130M / Mamba2-130M shapes, a 4,096-token vocabulary
    "mamba-130m-shape": ("mamba", {"hidden_size": 768, "num_hidden_layers": 24}),
    "mamba2-130m-shape": (
        "mamba2",
        {
            "hidden_size": 768,
            "num_hidden_layers": 24,
            "state_size": 128,
            "head_dim": 64,
            "num_heads": 24,
            "n_groups": 1,
        },
    ),
}


def synthetic(name: str):
    """A random-weight model (seed 0) of one SYNTHETIC shape, never stopping at EOS."""
    import torch
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    from quantscale.mamba.fixtures import VOCAB_SIZE

    kind, config = SYNTHETIC[name]
    torch.manual_seed(0)
    if kind == "mamba":
        model = MambaForCausalLM(MambaConfig(vocab_size=VOCAB_SIZE, **config))
    else:
        model = Mamba2ForCausalLM(Mamba2Config(vocab_size=VOCAB_SIZE, expand=2, **config))
    model.generation_config.eos_token_id = None
    return model.eval()


def models(name: str) -> tuple[dict, object]:
    """name -> model of one fixture or synthetic shape (float, float with our mixers, each
    INT8 method), and the tokenizer."""
    from quantscale.mamba.fixtures import _fast_mixers, fixture_tokenizer, load_fixture
    from quantscale.mamba.mixers import MambaRecipe
    from quantscale.mamba.quantize import calibration_token_batches, quantize_mamba

    if name in SYNTHETIC:
        kind, model, tokenizer = SYNTHETIC[name][0], synthetic(name), fixture_tokenizer()
    else:
        kind = name
        model, tokenizer = load_fixture(kind)
    ours = copy.deepcopy(model)
    _fast_mixers(ours, kind)
    out = {"float": model, "float, quantscale mixers": ours}
    for method in METHODS:
        recipe = MambaRecipe(method=method, n_samples=16, seq_len=128)
        batches = calibration_token_batches(tokenizer, recipe)
        out[f"INT8 {method}"] = quantize_mamba(copy.deepcopy(model), batches, recipe)
    return out, tokenizer


def weight_mb(model) -> float:
    """MB of the model's tensors (INT8 weights one byte each; a tied lm_head counted once)."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6


def timed_generate(model, prompt) -> tuple[float, float, int]:
    """(wall s, process CPU s, new tokens) of prefill + NEW_TOKENS greedy decode steps."""
    from quantscale.eval.generate import generate_ids

    wall, cpu = time.perf_counter(), time.process_time()
    new = generate_ids(model, prompt, NEW_TOKENS, use_cache=True)
    return time.perf_counter() - wall, time.process_time() - cpu, new.shape[1]


def bench_kind(kind: str, prompt_len: int, repeats: int) -> list[dict]:
    from quantscale.data.calibration import eval_tokens

    named, tokenizer = models(kind)
    prompt = eval_tokens(tokenizer, prompt_len)[None, :prompt_len]
    for model in named.values():  # warm-up round
        timed_generate(model, prompt)
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in named}
    for i in range(repeats):
        for name, model in named.items():
            runs[name].append(timed_generate(model, prompt))
            wall, _, n = runs[name][-1]
            print(f"  [{i + 1}/{repeats}] {kind} {name}: {wall:.3f} s for {n} tokens")
    rows = []
    for name, model in named.items():
        n = runs[name][0][2]
        wall = statistics.median(r[0] for r in runs[name])
        cpu = statistics.median(r[1] for r in runs[name])
        rows.append(
            {
                "fixture": kind,
                "model": name,
                "new_tokens": n,
                "prompt_tokens": prompt_len,
                "wall_median_s": wall,
                "wall_min_s": min(r[0] for r in runs[name]),
                "ms_per_token": 1000 * wall / n,
                "min_ms_per_token": 1000 * min(r[0] for r in runs[name]) / n,
                "cpu_ms_per_token": 1000 * cpu / n,
                "tokens_per_s": n / wall,
                "weights_mb": weight_mb(model),
            }
        )
    base = rows[0]["ms_per_token"]
    for row in rows:
        row["vs_float"] = row["ms_per_token"] / base
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
    p.add_argument("--quick", action="store_true", help="3 repeats")
    p.add_argument(
        "--synthetic", action="store_true", help="also random models of 130M shape (minutes)"
    )
    p.add_argument("--json", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    payload = {"machine": common.machine(), "threads": args.threads, "repeats": repeats}
    payload["loadavg_start"] = common.loadavg()
    names = [*KINDS, *(SYNTHETIC if args.synthetic else ())]
    rows = [row for name in names for row in bench_kind(name, args.prompt_len, repeats)]
    payload["loadavg_end"] = common.loadavg()
    payload["results"] = rows
    payload["rows"] = [
        common.result_row(
            f"generate {NEW_TOKENS} tokens, {r['fixture']}",
            r["model"],
            {"ok": True, "wall_median_s": r["wall_median_s"], "wall_min_s": r["wall_min_s"]},
            ours="INT8 quamba1",
            note=f"{r['ms_per_token']:.2f} ms/token, {r['vs_float']:.2f}x float",
        )
        for r in rows
    ]
    header = ["model", "variant", "ms/token", "min", "CPU ms/token", "tokens/s", "x float", "MB"]
    table = [
        [
            r["fixture"],
            r["model"],
            f"{r['ms_per_token']:.2f}",
            f"{r['min_ms_per_token']:.2f}",
            f"{r['cpu_ms_per_token']:.2f}",
            f"{r['tokens_per_s']:.1f}",
            f"{r['vs_float']:.2f}",
            f"{r['weights_mb']:.2f}",
        ]
        for r in rows
    ]
    print(
        f"\nprompt {args.prompt_len} tokens + {NEW_TOKENS} generated, median of {repeats}, "
        f"{args.threads} threads, load {payload['loadavg_start']} -> {payload['loadavg_end']}"
    )
    common.print_table(table, header)
    common.write_results(args.json, payload)
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
