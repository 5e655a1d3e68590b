"""Quality table: held-out Wikipedia perplexity (and, with --zeroshot, the zero-shot accuracy
of `quantscale eval --tasks zeroshot`: HellaSwag, PIQA, ARC-Easy, Social IQa, 200 items each)
and time to quantize, for models x schemes x methods, ours in this process and (--peers)
llm-compressor / GPTQModel GPTQ W4A16 in their own venvs (benchmarks/gptq.py's jobs) and
AutoRound W4A16 (`--peers autoround`, auto-round 0.16.1 in its own venv), all on the same
calibration and held-out tokens.

Methods: rtn, gptq, awq, awq+gptq, importance (importance-weighted RTN: per-channel mean x^2
collected on the calibration tokens, in the timed part), gptq-clip / awq+gptq-clip (GPTQ's
clipping search, `quantize --gptq-clip`), gptq-mse (`--weight-observer mse`), and for schemes
with static activations (W8A8, W4A8) smooth (SmoothQuant with the per-layer alpha search,
then RTN) and rotate (Hadamard R1+R2+R4, then RTN). Combinations that do not apply are
skipped (AWQ on a static-activation scheme; smooth / rotate on weight-only schemes); a method
the model refuses (rotation of Gemma-3's (1 + weight) RMSNorm) is a row with its error.

Calibration: `--samples` windows of 512 tokens from the calibration articles (<bos> first for
Gemma-3), seed 0, the same tensor for every row and peer. Perplexity: the first 4,096 held-out
tokens in 512-token windows (with <bos> for Gemma-3: BOS + 511 tokens per window), bf16 model.
Rows are written to the JSON file as they finish (a cut-short run keeps what it measured).

    .venv/bin/python benchmarks/quality.py [--models smollm2,gemma3]
        [--schemes W4A16,NVFP4A16,MXFP4A16,W8A8,W4A8] [--methods rtn,gptq,awq,awq+gptq,...]
        [--samples 16] [--peers [llm-compressor,gptqmodel]] [--only-peers] [--zeroshot]
        [--json PATH]
    .venv/bin/python benchmarks/quality.py --show A.json B.json   # one table of several runs
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
import gptq  # noqa: E402

SCHEMES = ("W4A16", "NVFP4A16", "MXFP4A16", "W8A8", "W4A8")
METHODS = ("rtn", "gptq", "gptq-clip", "awq", "awq+gptq", "importance", "smooth", "rotate")
STATIC_ONLY = {"smooth", "rotate"}  # transforms that target activation quantization
WEIGHT_ONLY = {"awq", "awq+gptq", "awq+gptq-clip", "importance"}  # 4-bit searches: not int8
GROUP = 128
JSON_PATH = gptq.RESULTS_DIR / "quality.json"
AUTOROUND_REQS = ["auto-round==0.16.1"]  # its own venv, beside common.TORCH_PIN

# AutoRound (SignRound) with its W4A16 preset (int4 g128 sym); quantize() leaves the model
# fake-quantized in place (checked: 15 distinct values in a weight group of a tiny Llama after
# 2 iterations, 4 x 64 tokens: 137 s on the loaded 2-core machine, ~25 s per layer).
AUTOROUND_JOB = (
    common.PPL_CODE
    + """
import sys, time, json
t0 = time.perf_counter()
torch.set_num_threads(2)
from transformers import AutoModelForCausalLM, AutoTokenizer
from auto_round import AutoRound
t1 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
calib, tokens = torch.load(sys.argv[2]), torch.load(sys.argv[3])
t2 = time.perf_counter()
ar = AutoRound(model, scheme="W4A16", tokenizer=tok, dataset=list(calib.split(4)),
               nsamples=len(calib), seqlen=calib.shape[1], batch_size=4,
               iters=int(sys.argv[4]), device_map="cpu")
model, _ = ar.quantize()
t3 = time.perf_counter()
print("BENCH " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "quantize_s": t3 - t2,
                             "ppl": perplexity(model.eval(), tokens)}))
"""
)


def applies(scheme: str, method: str) -> bool:
    """Whether `method` is a row for `scheme` (see the module docstring)."""
    if method in STATIC_ONLY:
        return scheme in ("W8A8", "W4A8")
    return not (scheme == "W8A8" and method in WEIGHT_ONLY)


def check_groups(model, group: int = GROUP) -> list[str]:
    """Linears whose in_features the int group size does not divide (warned per model)."""
    from torch import nn

    return [
        f"{name} ({m.in_features})"
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name != "lm_head" and m.in_features % group
    ]


def quantize_row(model, scheme: str, method: str, calib) -> None:
    """Quantize `model` in place with our `method` for `scheme` on `calib` [N, 512]."""
    from quantscale.algorithms.importance import collect_importance
    from quantscale.algorithms.smoothing import SmoothQuant
    from quantscale.calibration.sequential import as_batches
    from quantscale.orchestrator import quantize_model, targeted_linears
    from quantscale.scheme import load_recipe

    recipe = load_recipe(scheme)
    if method == "rotate":
        recipe.rotate = "hadamard"
        method = "rtn"
    if method == "smooth":
        search = "qkv=search+gate_up=search+down=search"
        quantize_model(model, recipe, calib, "rtn", 4, [SmoothQuant(search)])
    elif method == "importance":
        names = list(targeted_linears(model, recipe))
        stats = collect_importance(model, names, as_batches(calib, 4))
        quantize_model(model, recipe, None, "rtn-importance", importance=stats)
    else:
        options: dict = {}
        if method.endswith("-clip"):  # quantize --gptq-clip
            from quantscale.algorithms.gptq import CLIP_GRID

            method, options = method.removesuffix("-clip"), {"clip_search": CLIP_GRID}
        elif method == "gptq-mse":  # quantize --weight-observer mse
            method = "gptq"
            for group in recipe.config_groups.values():
                if group.weights is not None:
                    group.weights.observer = "mse"
        data = None if method == "rtn" and scheme not in ("W8A8", "W4A8") else calib
        quantize_model(model, recipe, data, method=method, batch_size=4, **options)


def measure(model, tok, ev, zeroshot: bool) -> dict:
    """Perplexity (with the tokenizer's BOS) and, if asked, zero-shot accuracies."""
    from quantscale.data.calibration import bos_token_id
    from quantscale.eval.perplexity import perplexity

    out = {"ppl": perplexity(model, ev, gptq.SEQ_LEN, bos_id=bos_token_id(tok))}
    if zeroshot:
        from quantscale.eval.runner import evaluate

        out.update(evaluate(model, tok, ["zeroshot"], n_items=200))
    return out


class Results:
    """Rows keyed "model/scheme/method", written to `path` after each one."""

    def __init__(self, path: Path, settings: dict) -> None:
        self.path, self.data = path, {"machine": common.machine(), **settings, "rows": {}}

    def add(self, key: str, row: dict) -> None:
        self.data["rows"][key] = row
        print(json.dumps({key: row}), flush=True)
        common.write_results(self.path, self.data)


def ours(model_name: str, schemes, methods, samples: int, zeroshot: bool, res: Results, work):
    """Our rows for one model; saves its calibration / eval tokens for the peers."""
    import torch

    from quantscale.data.calibration import calibration_batches, eval_tokens
    from quantscale.errors import QuantscaleError
    from quantscale.orchestrator import load_model

    torch.set_num_threads(2)
    base, tok = load_model(model_name, dtype=torch.bfloat16)
    ragged = check_groups(base)
    if ragged:  # SmolLM2's 576: the last group of each row is shorter
        print(
            f"{model_name}: group {GROUP} does not divide {len(ragged)} Linears, e.g. {ragged[0]}"
        )
    calib = calibration_batches(tok, samples, gptq.SEQ_LEN)
    ev = eval_tokens(tok, gptq.EVAL_TOKENS)
    torch.save(calib, work / f"{model_name}-calib-{samples}.pt")
    torch.save(ev, work / f"{model_name}-eval.pt")
    if methods:
        res.add(f"{model_name}/bf16/-", {"tool": "bf16", **measure(base, tok, ev, zeroshot)})
    for scheme in schemes:
        for method in methods:
            if not applies(scheme, method):
                continue
            key, model = f"{model_name}/{scheme}/{method}", copy.deepcopy(base)
            start = time.perf_counter()
            try:
                quantize_row(model, scheme, method, calib)
            except QuantscaleError as err:
                res.add(key, {"tool": "quantscale", "error": str(err)})
                continue
            took = time.perf_counter() - start
            res.add(
                key, {"tool": "quantscale", "quantize_s": took, **measure(model, tok, ev, zeroshot)}
            )
            del model
    return tok


def peer_rows(
    model_name: str,
    samples: int,
    bos: int | None,
    tools: list[str],
    iters: int,
    res: Results,
    work: Path,
) -> None:
    """llm-compressor and GPTQModel GPTQ W4A16 g128 (gptq.py's jobs) and AutoRound W4A16 g128
    (`iters` sign-gradient steps per layer) on our saved tokens."""
    from quantscale.models.loader import resolve_model

    ckpt = resolve_model(model_name)
    calib, ev = work / f"{model_name}-calib-{samples}.pt", work / f"{model_name}-eval.pt"
    env = {} if bos is None else {common.BOS_ENV: str(bos)}
    jobs = {k: v for k, v in gptq.peers().items() if k in tools}
    if "autoround" in tools:
        jobs["autoround"] = (str(common.peer_python("autoround", AUTOROUND_REQS)), AUTOROUND_JOB)
    for name, (python, code) in jobs.items():
        script = gptq._job_file(work, name, code)
        args = [str(iters)] if name == "autoround" else [str(GROUP), "weight", "0"]
        cmd = [python, str(script), str(ckpt), str(calib), str(ev), *args]
        run = common.run_job(name, cmd, env=env, timeout=3600 * 6)
        row: dict = {"tool": name, "wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb}
        if run.returncode == 0:
            row.update({k: run.extra[k] for k in ("quantize_s", "ppl") if k in run.extra})
        else:
            row["error"] = run.output_tail[-600:]
        method = "autoround" if name == "autoround" else "gptq"
        res.add(f"{model_name}/W4A16/{method}[{name}]", row)


def print_table(data: dict) -> None:
    rows = []
    bf16 = {k.split("/")[0]: r["ppl"] for k, r in data["rows"].items() if r["tool"] == "bf16"}
    for key, r in data["rows"].items():
        model_name, scheme, method = key.split("/")
        if "error" in r:
            rows.append([model_name, scheme, method, r["tool"], "-", "-", "-", r["error"][:60]])
            continue
        ref = bf16.get(model_name)
        delta = f"{100 * (r['ppl'] / ref - 1):+.1f}%" if ref and "ppl" in r else "-"
        q = f"{r['quantize_s']:.1f}" if "quantize_s" in r else "-"
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else "-"
        zs = ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k.endswith("_norm"))
        rows.append([model_name, scheme, method, r["tool"], ppl, delta, q, zs])
    header = ["model", "scheme", "method", "tool", "ppl", "vs bf16", "quantize s", "notes"]
    common.print_table(rows, header)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--samples", type=int, default=16, help="calibration windows of 512 tokens")
    ap.add_argument(
        "--peers",
        nargs="?",
        const="llm-compressor,gptqmodel",
        default=None,
        help="W4A16 g128 of these peers: GPTQ of llm-compressor, gptqmodel (the default pair), "
        "AutoRound of autoround",
    )
    ap.add_argument("--autoround-iters", type=int, default=200, help="AutoRound steps per layer")
    ap.add_argument("--only-peers", action="store_true", help="no rows of ours (but bf16)")
    ap.add_argument("--zeroshot", action="store_true", help="zero-shot MC (85 MB wheel)")
    ap.add_argument("--json", type=Path, default=JSON_PATH)
    ap.add_argument("--show", type=Path, nargs="+", help="print the table of these results files")
    a = ap.parse_args()
    if a.show:
        merged: dict = {"rows": {}}
        for path in a.show:
            merged["rows"].update(json.loads(path.read_text())["rows"])
        print_table(merged)
        return
    from quantscale.cache import cache_dir
    from quantscale.data.calibration import bos_token_id

    work = cache_dir() / "bench-work" / "quality"
    work.mkdir(parents=True, exist_ok=True)
    settings = {"samples": a.samples, "seq_len": gptq.SEQ_LEN, "eval_tokens": gptq.EVAL_TOKENS}
    res = Results(a.json, settings)
    schemes, methods = a.schemes.split(","), a.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    for model_name in a.models.split(","):
        tok = ours(model_name, schemes, [] if a.only_peers else methods, a.samples, a.zeroshot,
                   res, work)  # fmt: skip
        if a.peers:
            tools = a.peers.split(",")
            bos = bos_token_id(tok)
            peer_rows(model_name, a.samples, bos, tools, a.autoround_iters, res, work)
    print_table(res.data)
    print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
