"""GPTQ W4A16 (int4, group 128 or --group-size, symmetric, act-order): quantscale vs
llm-compressor's GPTQModifier vs GPTQModel 7.x, on the same model, calibration windows and
held-out text. (llm-compressor refuses group 128 on SmolLM2, whose 576 input columns are not
a multiple of 128; compare there with --group-size 64.)

Models: a 4-layer Llama (hidden 512, intermediate 1408, SmolLM2 tokenizer, random weights:
its perplexity only checks that the three agree) and SmolLM2-135M (bf16 from the cache).
Calibration: 64 x 512-token Wikipedia windows; perplexity: the first 4096 held-out tokens in
512-token windows, computed by the same code in every job. Each tool runs in its own process
and venv (benchmarks/common.py), alternating ours / llm-compressor / GPTQModel per repeat.
Every job reports `quantize_s` (the GPTQ call: calibration forwards + Hessians + solve) on a
`BENCH` line; the table also has process wall time and peak RSS.

GPTQModel 7.3 on a 2-core machine fails at load ("Virtual pool 'model_loader:cpu' requests 2
workers but parent 'cpu' only has 1"): its job sets GPTQMODEL_CPU_WORKERS=2, stubs
`torchvision` (imported, not needed for text models), and its venv adds `requests`, which
7.3.6 imports without declaring it.

    .venv/bin/python benchmarks/gptq.py [--models tiny,smollm2] [--repeats 1] [--samples 64]
        [--group-size 128] [--only quantscale,llm-compressor,gptqmodel] [--actorder group]
        [--true-sequential]
    .venv/bin/python benchmarks/gptq.py --table   # bf16 / RTN / GPTQ perplexity per scheme
        [--samples 128] [--schemes W4A16,NVFP4A16] [--methods rtn,gptq,awq,awq+gptq,autoround]
        [--batch-size 4] [--autoround-steps 200] [--autoround-lr 0.005]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parents[1] / "bench-results"
TABLE_RESULTS = RESULTS_DIR / "gptq_table.json"
SEQ_LEN = 512
EVAL_TOKENS = 4096

PPL = common.PPL_CODE

OURS_JOB = (
    PPL
    + """
import sys, time, json
t0 = time.perf_counter()
torch.set_num_threads(2)
from transformers import AutoModelForCausalLM
from quantscale.orchestrator import quantize_model
t1 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).eval()
calib, tokens = torch.load(sys.argv[2]), torch.load(sys.argv[3])
t2 = time.perf_counter()
from quantscale.scheme import preset_recipe
recipe = preset_recipe("W4A16")
group = recipe.config_groups["group_0"]
group.weights = group.weights.model_copy(update={"group_size": int(sys.argv[4])})
from quantscale.algorithms.gptq import CLIP_GRID
clip = {"clip_search": CLIP_GRID} if sys.argv[7:8] == ["1"] else {}
quantize_model(model, recipe, calib, method="gptq", batch_size=4, actorder=sys.argv[5],
               true_sequential=sys.argv[6] == "1", **clip)
t3 = time.perf_counter()
print("BENCH " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "quantize_s": t3 - t2,
                             "ppl": perplexity(model, tokens)}))
"""
)

LLMC_JOB = (
    PPL
    + """
import sys, time, json
t0 = time.perf_counter()
torch.set_num_threads(2)
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
t1 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).eval()
calib, tokens = torch.load(sys.argv[2]), torch.load(sys.argv[3])
ds = Dataset.from_dict({"input_ids": calib.tolist(),
                        "attention_mask": torch.ones_like(calib).tolist()})
t2 = time.perf_counter()
oneshot(model=model, dataset=ds, num_calibration_samples=len(calib),
        max_seq_length=calib.shape[1], batch_size=4,
        recipe=GPTQModifier(ignore=["lm_head"], block_size=128, dampening_frac=0.01,
                            actorder="static", config_groups={"group_0": {
                                "targets": ["Linear"],
                                "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                            "strategy": "group",
                                            "group_size": int(sys.argv[4])}}}))
t3 = time.perf_counter()
print("BENCH " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "quantize_s": t3 - t2,
                             "ppl": perplexity(model, tokens)}))
"""
)

GPTQMODEL_JOB = (
    PPL
    + """
import sys, os, tempfile, time, json, types, importlib.machinery
t0 = time.perf_counter()
torch.set_num_threads(2)
"""
    + common.TORCHVISION_STUB
    + """__RAISE_WORKERS__
from gptqmodel import GPTQModel, QuantizeConfig
t1 = time.perf_counter()
calib, tokens = torch.load(sys.argv[2]), torch.load(sys.argv[3])
cfg = QuantizeConfig(bits=4, group_size=int(sys.argv[4]), sym=True, desc_act=True,
                     damp_percent=0.01)
model = GPTQModel.load(sys.argv[1], cfg, device="cpu", dtype=torch.bfloat16)
data = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in calib]
t2 = time.perf_counter()
model.quantize(data, batch_size=4)
t3 = time.perf_counter()
print("BENCH " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "quantize_s": t3 - t2}))
with tempfile.TemporaryDirectory() as d:
    model.save(d)
    q = GPTQModel.load(d, device="cpu")
    print("BENCH " + json.dumps({"ppl": perplexity(q.model, tokens)}))
"""
)

# GPTQModel sizes its CPU pool as (cores + 1) // 2 = 1 here, below the 2 workers its model
# loader pool asks for; its GPTQMODEL_CPU_WORKERS override raises it.
RAISE_WORKERS = """
os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, os.cpu_count() or 1))
"""


def tiny_checkpoint(root: Path) -> Path:
    """The 4-layer 512/1408 Llama (seeded random weights, SmolLM2 tokenizer), saved once."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from quantscale.data.assets import smollm2_checkpoint

    out = root / "tiny-llama-4x512x1408"
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def inputs(work: Path, samples: int) -> tuple[Path, Path]:
    """Calibration windows [samples, 512] and held-out eval tokens, saved for every job."""
    import torch
    from transformers import AutoTokenizer

    from quantscale.data.assets import smollm2_checkpoint
    from quantscale.data.calibration import calibration_batches, eval_tokens

    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    calib, ev = work / f"calib-{samples}.pt", work / "eval.pt"
    torch.save(calibration_batches(tok, samples, SEQ_LEN), calib)
    torch.save(eval_tokens(tok, EVAL_TOKENS), ev)
    return calib, ev


def _job_file(work: Path, name: str, code: str) -> Path:
    path = work / f"job_{name}.py"
    path.write_text(code.replace("__RAISE_WORKERS__", RAISE_WORKERS))
    return path


def _job(name: str, python: str, script: Path, argv: list[Path]):
    cmd = [python, str(script), *map(str, argv)]
    return lambda: common.run_job(name, cmd, timeout=3600)


def peers(log=print) -> dict[str, tuple[str, str]]:
    """job name -> (python, code); peers whose venv cannot be built are skipped."""
    found = {"quantscale": (common.this_python(), OURS_JOB)}
    for name, reqs, code in (
        ("llm-compressor", ["llmcompressor==0.14.0.1"], LLMC_JOB),
        ("gptqmodel", ["gptqmodel==7.3.6", "requests"], GPTQMODEL_JOB),
    ):
        venv = "llmcompressor" if name == "llm-compressor" else name
        try:
            found[name] = (str(common.peer_python(venv, reqs, log)), code)
        except Exception as exc:  # noqa: BLE001 - a peer that will not install is reported
            log(f"skipping {name}: {exc}")
    return found


def bench(
    models: list[str],
    repeats: int,
    samples: int,
    only: list[str] | None,
    group: int,
    actorder: str = "weight",
    true_sequential: bool = False,
    json_path: Path | None = None,
    clip: bool = False,
) -> dict:
    from quantscale.cache import cache_dir
    from quantscale.data.assets import smollm2_checkpoint

    work = cache_dir() / "bench-work" / "gptq"
    work.mkdir(parents=True, exist_ok=True)
    calib, ev = inputs(work, samples)
    jobs_code = {k: v for k, v in peers().items() if not only or k in only}
    results: dict = {
        "machine": common.machine(),
        "samples": samples,
        "seq_len": SEQ_LEN,
        "group_size": group,
        "ours_actorder": actorder,
        "ours_true_sequential": true_sequential,
        "ours_clip_search": clip,
    }
    for model_name in models:
        ckpt = tiny_checkpoint(work) if model_name == "tiny" else smollm2_checkpoint()
        print(f"\n== {model_name}: {ckpt}")
        jobs = {
            name: _job(
                name,
                py,
                _job_file(work, name, code),
                [ckpt, calib, ev, group, actorder, int(true_sequential), int(clip)],
            )
            for name, (py, code) in jobs_code.items()
        }
        runs = common.alternate(jobs, repeats)
        results[model_name] = {name: common.summarize(r) for name, r in runs.items()}
        results[model_name]["runs"] = runs
        _print(model_name, results[model_name])
    results["rows"] = table_rows(results, models, samples, group)
    tag = "" if only is None else "_" + "_".join(only)
    seq = ("_ts" if true_sequential else "") + ("_clip" if clip else "")
    path = json_path or RESULTS_DIR / f"gptq_g{group}_{'_'.join(models)}_{actorder}{seq}{tag}.json"
    common.write_results(path, results)
    print(f"\nwrote {path}")
    return results


def table_rows(results: dict, models: list[str], samples: int, group: int) -> list[dict]:
    """Rows of run_all.py's combined table: one per model and tool."""
    rows = []
    for model_name in models:
        job = f"GPTQ W4A16 g{group} {model_name}, {samples}x{SEQ_LEN}"
        for tool, s in results[model_name].items():
            if tool == "runs":
                continue
            q = s.get("quantize_s_min")
            note = f"quantize {q:.1f} s" if q is not None else None
            rows.append(
                common.result_row(job, tool, s, ppl=s.get("ppl_min"), ours="quantscale", note=note)
            )
    return rows


def _print(model_name: str, res: dict) -> None:
    ours = res.get("quantscale", {})
    rows = []
    for name, s in res.items():
        if name == "runs" or not s.get("ok"):
            if name != "runs":
                rows.append([name, "failed", "", "", "", "", ""])
            continue
        q = s.get("quantize_s_min", float("nan"))
        ratio = q / ours["quantize_s_min"] if ours.get("ok") else float("nan")
        rows.append(
            [
                name,
                f"{q:.1f}",
                f"{ratio:.2f}x",
                f"{s['wall_min_s']:.1f}",
                f"{s['peak_rss_mb']:.0f}",
                f"{s.get('ppl_min', float('nan')):.3f}",
                ", ".join(s["loadavg"]),
            ]
        )
    print(f"\n{model_name}: W4A16 GPTQ")
    common.print_table(
        rows, ["tool", "quantize s", "vs ours", "wall s", "peak RSS MB", "ppl", "loadavg"]
    )


# ------------------------------------------------------------------ perplexity table

TABLE_SCHEMES = ("W8A16", "FP8_DYNAMIC", "NVFP4A16", "W4A16", "W4A16_ASYM", "MXFP4A16")


def table(
    samples: int,
    schemes: tuple[str, ...],
    methods: tuple[str, ...] = ("rtn", "gptq"),
    batch_size: int = 4,
    autoround_steps: int = 200,
    json_path: Path | None = None,
    autoround_lr: float | None = None,
) -> dict:
    """bf16 and per-method (RTN / GPTQ / AWQ / AWQ+GPTQ / AutoRound) held-out perplexity of
    SmolLM2 per weight scheme (in this process); calibration batches of `batch_size` windows
    (AutoRound's minibatch), `autoround_steps` AutoRound steps per layer of `autoround_lr`."""
    import copy
    import time

    import torch

    from quantscale.data.calibration import calibration_batches, eval_tokens
    from quantscale.eval.perplexity import perplexity
    from quantscale.orchestrator import load_model, quantize_model

    torch.set_num_threads(2)
    base, tok = load_model("smollm2", dtype=torch.bfloat16)
    calib = calibration_batches(tok, samples, SEQ_LEN)
    ev = eval_tokens(tok, EVAL_TOKENS)
    rows = {"bf16": {"ppl": perplexity(base, ev)}}
    print(json.dumps({"bf16": rows["bf16"]}), flush=True)
    for scheme in schemes:
        for method in methods:
            model = copy.deepcopy(base)
            start = time.perf_counter()
            data = None if method == "rtn" else calib
            ar = {"steps": autoround_steps, "lr": autoround_lr}
            options = ar if method.endswith("autoround") else {}
            quantize_model(model, scheme, data, method=method, batch_size=batch_size, **options)
            took = time.perf_counter() - start
            rows[f"{scheme}/{method}"] = {"ppl": perplexity(model, ev), "quantize_s": took}
            print(json.dumps({f"{scheme}/{method}": rows[f"{scheme}/{method}"]}), flush=True)
    settings = {
        "samples": samples,
        "batch_size": batch_size,
        "autoround_steps": autoround_steps,
        "autoround_lr": autoround_lr,
    }
    out = {"machine": common.machine(), **settings, "eval_tokens": EVAL_TOKENS, **rows}
    common.write_results(json_path or TABLE_RESULTS, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--only", default=None, help="comma list of jobs to run")
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size")
    ap.add_argument(
        "--actorder",
        choices=["weight", "group"],
        default="weight",
        help="ours: 'weight' = llm-compressor's static default, 'group' = GPTQModel desc_act",
    )
    ap.add_argument(
        "--true-sequential", action="store_true", help="ours: q/k/v, o, gate/up, down in turn"
    )
    ap.add_argument(
        "--clip", action="store_true", help="ours: the clipping search (quantize --gptq-clip)"
    )
    ap.add_argument("--table", action="store_true", help="SmolLM2 bf16/RTN/GPTQ ppl table")
    ap.add_argument("--schemes", default=",".join(TABLE_SCHEMES))
    ap.add_argument(
        "--methods", default="rtn,gptq", help="--table: e.g. rtn,gptq,awq,awq+gptq,autoround"
    )
    ap.add_argument("--batch-size", type=int, default=4, help="--table: calibration batch")
    ap.add_argument("--autoround-steps", type=int, default=200, help="--table: steps per layer")
    ap.add_argument("--autoround-lr", type=float, default=None, help="--table: (1 / steps)")
    ap.add_argument("--json", type=Path, default=None, help="results file (run_all.py)")
    ap.add_argument("--quick", action="store_true", help="tiny model, 16 samples, g128")
    a = ap.parse_args()
    if a.quick:
        a.models, a.samples, a.group_size = "tiny", 16, 128
    if a.table:
        schemes, methods = tuple(a.schemes.split(",")), tuple(a.methods.split(","))
        steps, lr = a.autoround_steps, a.autoround_lr
        table(a.samples, schemes, methods, a.batch_size, steps, a.json, lr)
        return
    only = a.only.split(",") if a.only else None
    bench(
        a.models.split(","),
        a.repeats,
        a.samples,
        only,
        a.group_size,
        a.actorder,
        a.true_sequential,
        a.json,
        a.clip,
    )


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
