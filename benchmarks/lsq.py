"""Learned static activation scales (LSQ, `algorithms.lsq`) on SmolLM2: W8A8 static
(per-tensor int8 activations) with the min-max / MSE observers, with and without learned
scales; held-out Wikipedia perplexity as `benchmarks/gptq.py --table` measures it.

    .venv/bin/python benchmarks/lsq.py [--samples 16] [--steps 24] [--lr 0.02]
        [--batch-size 1] [--observers minmax,mse] [--rotate] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench-results" / "lsq.json"
SEQ_LEN, EVAL_TOKENS = 512, 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--observers", default="minmax,mse")
    ap.add_argument("--rotate", action="store_true", help="Hadamard rotations first (R1+R2+R4)")
    ap.add_argument("--json", type=Path, default=RESULTS)
    a = ap.parse_args()

    import torch

    from quantscale.data.calibration import calibration_batches, eval_tokens
    from quantscale.eval.perplexity import perplexity
    from quantscale.orchestrator import load_model, quantize_model
    from quantscale.scheme import LearnScales, load_recipe

    torch.set_num_threads(2)
    base, tok = load_model("smollm2", dtype=torch.bfloat16)
    calib = calibration_batches(tok, a.samples, SEQ_LEN)
    ev = eval_tokens(tok, EVAL_TOKENS)
    rows: dict = {"bf16": {"ppl": perplexity(base, ev)}}
    print(json.dumps(rows), flush=True)
    for observer in a.observers.split(","):
        for steps in (None, a.steps):
            recipe = load_recipe("W8A8")
            for group in recipe.config_groups.values():
                assert group.input_activations is not None
                update = {"observer": observer}
                group.input_activations = group.input_activations.model_copy(update=update)
            if a.rotate:
                recipe.rotate = "hadamard"
            if steps is not None:
                recipe.learn_scales = LearnScales(steps=steps, lr=a.lr)
            model = copy.deepcopy(base)
            start = time.perf_counter()
            quantize_model(model, recipe, calib, method="rtn", batch_size=a.batch_size)
            took = time.perf_counter() - start
            key = f"W8A8/{observer}" + ("/rotated" if a.rotate else "")
            key += "" if steps is None else f"+lsq{steps}"
            rows[key] = {"ppl": perplexity(model, ev), "quantize_s": took}
            print(json.dumps({key: rows[key]}), flush=True)
    settings = {k: getattr(a, k) for k in ("samples", "steps", "lr", "batch_size", "rotate")}
    common.write_results(a.json, {"machine": common.machine(), **settings, **rows})


if __name__ == "__main__":
    main()
