"""Static activation calibration on SmolLM2: quantscale vs llm-compressor, same data.

For each scheme (W8A8: int8 per-channel weights + static per-tensor int8 activations; FP8:
per-tensor FP8 weights + static per-tensor FP8 activations) both tools calibrate the float32
model on the same token windows (128 x 512 from the cached Wikipedia calibration split),
alternating, each in its own process and venv:
- quantscale: `quantize.quantize_model` (layer-by-layer, RTN weights, min-max observer);
- llm-compressor 0.14: `oneshot` with a `QuantizationModifier` whose config groups are our
  recipe's (`Recipe.to_quantization_config`), the activation observer set to its
  `static_minmax` (running extremes, the same statistic as our `minmax`; its own `minmax`
  is a moving average), sequential pipeline (its default for calibrating modifiers).
`--calib-dtype bfloat16` runs our calibration's matmuls in bf16 (`qlinear.compute_dtype`).
`--calib-kernel aten,onednn` runs ours once per kernel (`qlinear.matmul_kernel`; 'aten', the
default, is F.linear's BLAS; 'onednn' float32 matmuls by oneDNN, outputs within float32
rounding of aten's, not the same bits), all in the same alternation, named quantscale and
quantscale[onednn].
With `--smooth ALPHA` both first smooth the model (SmoothQuant): ours is the `SmoothQuant`
layer transform (its mappings: qkv, gate_up, up->down, GQA-aware v->o, or those of
`--our-mappings`), llm-compressor's `SmoothQuantModifier` runs with its default Llama mappings
(qkv, gate_up) plus up_proj -> down_proj (`--llmc-down`, on by default; it has no GQA v->o).
`--observer` sets our activation observer (llm-compressor's is the name our saved config
gives it, e.g. minmax -> static_minmax, mse -> mse).
Each job reports its calibration time (model loaded, data ready) and the perplexity of the
calibrated in-memory model on the same held-out tokens, computed by the same code.

    .venv/bin/python benchmarks/calibration.py [--schemes W8A8,FP8] [--samples 128]
        [--seq-len 512] [--repeats 1] [--smooth 0.5] [--observer mse] [--quick]
        [--calib-kernel aten,onednn]
        [--json bench-results/calibration.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench-results" / "calibration.json"
LLMC_REQS = ["llmcompressor==0.14.0.1"]

PPL = common.PPL_CODE

OURS_JOB = (
    PPL
    + """
import sys, time, json
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
from quantscale.algorithms.smoothing import SmoothQuant
from quantscale.orchestrator import quantize_model
from quantscale.runtime.qlinear import compute_dtype, matmul_kernel
from quantscale.scheme import Recipe
t1 = time.perf_counter()
path, calib_path, eval_path, recipe, batch_size, smooth, calib_dtype, kernel = sys.argv[1:9]
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
calib, tokens = torch.load(calib_path), torch.load(eval_path)
ppl_float = perplexity(model, tokens)
t2 = time.perf_counter()
transforms = [SmoothQuant(smooth)] if smooth else []
with compute_dtype(getattr(torch, calib_dtype)), matmul_kernel(kernel):
    quantize_model(model, Recipe.model_validate_json(recipe), calib,
                   batch_size=int(batch_size), transforms=transforms)
t3 = time.perf_counter()
print("BENCH " + json.dumps({"import_s": t1 - t0, "work_s": t3 - t2,
                             "ppl": perplexity(model, tokens), "ppl_float": ppl_float}))
"""
)

LLMC_JOB = (
    PPL
    + """
import sys, time, json
t0 = time.perf_counter()
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
t1 = time.perf_counter()
path, calib_path, eval_path, groups, batch_size, smooth, mappings = sys.argv[1:8]
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(path)
calib, tokens = torch.load(calib_path), torch.load(eval_path)
data = Dataset.from_dict({"input_ids": calib.tolist(),
                          "attention_mask": torch.ones_like(calib).tolist()})
t2 = time.perf_counter()
modifiers = [QuantizationModifier(config_groups=json.loads(groups), ignore=["lm_head"])]
if smooth:
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
    modifiers.insert(0, SmoothQuantModifier(smoothing_strength=float(smooth),
                                            mappings=json.loads(mappings)))
oneshot(model=model, dataset=data, tokenizer=tokenizer, recipe=modifiers,
        num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
        batch_size=int(batch_size), shuffle_calibration_samples=False)
t3 = time.perf_counter()
print("BENCH " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "work_s": t3 - t2,
                             "ppl": perplexity(model, tokens)}))
"""
)


# llm-compressor's default Llama SmoothQuant mappings, plus up_proj -> down_proj.
LLMC_MAPPINGS = [
    [["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"],
    [["re:.*gate_proj", "re:.*up_proj"], "re:.*post_attention_layernorm"],
]
LLMC_DOWN = [["re:.*down_proj"], "re:.*up_proj"]


def our_recipe(scheme: str, observer: str | None):
    """The preset with `observer` on its input activations."""
    from quantscale.analysis.sweep import with_activations
    from quantscale.scheme import load_recipe

    recipe = load_recipe(scheme)
    return with_activations(recipe, observer=observer) if observer else recipe


def our_name(kernel: str) -> str:
    """Our job's name: quantscale, or quantscale[onednn] for another matmul kernel."""
    return "quantscale" if kernel == "aten" else f"quantscale[{kernel}]"


def llmc_groups(recipe) -> str:
    """Our recipe's config groups in compressed-tensors layout: the saved config names each
    observer as llm-compressor does (our minmax -> its static_minmax)."""
    groups = recipe.to_quantization_config()["config_groups"]
    for group in groups.values():
        group.pop("format", None)
    return json.dumps(groups)


def prepare_inputs(samples: int, seq_len: int, n_eval: int) -> tuple[Path, Path, Path]:
    """(model dir, calibration ids .pt, held-out ids .pt), written once in the cache."""
    import torch

    from quantscale import cache
    from quantscale.data import assets
    from quantscale.data.calibration import calibration_batches, eval_tokens
    from quantscale.models.loader import load_tokenizer

    model = assets.smollm2_checkpoint()
    tokenizer = load_tokenizer(model)
    folder = cache.cache_dir() / "bench-inputs" / "calibration"
    folder.mkdir(parents=True, exist_ok=True)
    calib = folder / f"calib-{samples}x{seq_len}.pt"
    tokens = folder / f"eval-{n_eval}.pt"
    if not calib.exists():
        torch.save(calibration_batches(tokenizer, samples, seq_len), calib)
    if not tokens.exists():
        torch.save(eval_tokens(tokenizer, n_eval), tokens)
    return model, calib, tokens


def run(args: argparse.Namespace) -> dict:
    model, calib, tokens = prepare_inputs(args.samples, args.seq_len, args.eval_tokens)
    llmc = None
    if not args.no_peers:
        try:
            llmc = common.peer_python("llmcompressor", LLMC_REQS)
        except Exception as err:  # noqa: BLE001 - report and go on without the peer
            print(f"llm-compressor venv not available ({err})")
    results, rows = {}, []
    base = [str(model), str(calib), str(tokens)]
    bs = str(args.batch_size)
    smooth = args.smooth or ""
    ours_smooth = args.our_mappings.replace("ALPHA", smooth) if smooth else ""
    mappings = json.dumps(LLMC_MAPPINGS + ([LLMC_DOWN] if args.llmc_down else []))
    for scheme in args.schemes:
        recipe = our_recipe(scheme, args.observer)
        ours = [*base, recipe.model_dump_json(), bs, ours_smooth, args.calib_dtype]
        jobs = {
            our_name(kernel): lambda a=[*ours, kernel]: common.run_job(
                "quantscale", [common.this_python(), "-c", OURS_JOB, *a]
            )
            for kernel in args.calib_kernel
        }
        if llmc is not None:
            theirs = [*base, llmc_groups(recipe), bs, smooth, mappings]
            jobs["llm-compressor"] = lambda a=theirs: common.run_job(
                "llm-compressor", [str(llmc), "-c", LLMC_JOB, *a]
            )
        key = scheme + (f" {args.observer}" if args.observer else "")
        key += f" smooth={smooth}" if smooth else ""
        key += f" {args.calib_dtype}" if args.calib_dtype != "float32" else ""
        print(f"\n{key}: {args.samples} x {args.seq_len} calibration tokens, batch {bs}")
        runs = common.alternate(jobs, args.repeats)
        summary = {name: common.summarize(r) for name, r in runs.items()}
        results[key] = {
            "summary": summary,
            "runs": {n: [vars(x) for x in r] for n, r in runs.items()},
        }
        for name, s in summary.items():
            ppl = s.get("ppl_min")
            rows.append(
                common.result_row(
                    f"calibrate {key} {args.samples}x{args.seq_len}",
                    name,
                    s,
                    ppl=ppl,
                    ours="quantscale",
                )
            )
    return {"results": results, "rows": rows}


def print_summary(payload: dict) -> None:
    table = []
    for scheme, res in payload["results"].items():
        s = res["summary"]
        ours = s.get("quantscale", {}).get("work_s_min")
        for name, summ in s.items():
            work = summ.get("work_s_min")
            ratio = f"{work / ours:.2f}x" if work and ours else ""
            ppl = summ.get("ppl_min")
            table.append(
                [
                    scheme,
                    name,
                    f"{work:.1f}" if work else "failed",
                    f"{summ.get('wall_min_s', 0):.1f}",
                    f"{summ.get('peak_rss_mb', 0):.0f}",
                    f"{ppl:.3f}" if ppl else "",
                    ratio,
                ]
            )
    header = ["scheme", "tool", "calib s", "wall s", "peak MB", "ppl", "time / ours"]
    common.print_table(table, header)
    floats = [
        s["quantscale"].get("ppl_float_min")
        for s in (r["summary"] for r in payload["results"].values())
        if "quantscale" in s
    ]
    if floats and floats[0]:
        print(f"unquantized model, same tokens and code: ppl {floats[0]:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schemes", default="W8A8,FP8", type=lambda t: t.split(","))
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--observer", help="our activation observer (e.g. mse); default minmax")
    parser.add_argument("--smooth", help="SmoothQuant alpha for both tools")
    parser.add_argument(
        "--calib-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="our calibration matmuls' dtype (the model and evaluation stay float32)",
    )
    parser.add_argument(
        "--calib-kernel",
        default=["aten"],
        type=lambda t: t.split(","),
        help="our matmul kernels, one job each (aten, onednn; e.g. aten,onednn)",
    )
    parser.add_argument(
        "--our-mappings",
        default="ALPHA",
        help="our smoothing spec, ALPHA replaced by --smooth (e.g. qkv=ALPHA+gate_up=ALPHA)",
    )
    parser.add_argument(
        "--no-llmc-down",
        dest="llmc_down",
        action="store_false",
        help="llm-compressor without the up_proj -> down_proj mapping",
    )
    parser.add_argument("--quick", action="store_true", help="W8A8 on 8 x 128 tokens")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    from quantscale.runtime.qlinear import MATMUL_KERNELS

    unknown = set(args.calib_kernel) - set(MATMUL_KERNELS)
    if unknown:
        parser.error(f"--calib-kernel: unknown {sorted(unknown)} ({', '.join(MATMUL_KERNELS)})")
    if args.quick:
        args.schemes, args.samples, args.seq_len, args.eval_tokens = ["W8A8"], 8, 128, 1024
    payload = {
        "machine": common.machine(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "versions": common.versions(["quantscale", "torch", "transformers"]),
        **run(args),
    }
    print_summary(payload)
    common.write_results(args.json, payload)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
