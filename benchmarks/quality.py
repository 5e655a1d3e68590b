"""Quality table: held-out Wikipedia perplexity, zero-shot accuracy (--zeroshot) and time to
quantize, for models x schemes x methods: ours in this process, the peers (--peers) each in its
own venv, all on the same calibration tokens, held-out tokens and zero-shot items.

Methods: rtn, gptq, awq, awq+gptq, importance (importance-weighted RTN: per-channel mean x^2
collected on the calibration tokens, in the timed part), gptq-clip / awq+gptq-clip (GPTQ's
clipping search, `quantize --gptq-clip`), gptq-mse (`--weight-observer mse`), and for schemes
with static activations (W8A8, W4A8) smooth (SmoothQuant with the per-layer alpha search,
then RTN), sq / sq+gptq (SmoothQuant at alpha 0.85 on every mapping, then RTN / GPTQ) and
rotate (Hadamard R1+R2+R4, then RTN), rotate-smooth (`--rotate hadamard-smooth`: R1+R2,
SmoothQuant 0.5 on up_proj -> down_proj, then R4 and RTN; rotate-smooth+gptq: GPTQ weights);
autoround (our SignRound, `--our-autoround-steps` steps, default 100; not in the default
--methods: minutes per scheme) for weight-only schemes. Combinations that do not apply are
skipped (AWQ on a static-activation scheme; smooth / rotate on weight-only schemes); a method
the model refuses (rotation of Gemma-3's (1 + weight) RMSNorm) is a row with its error.

Peers (PEER_ROWS): llm-compressor 0.14 on our recipe's config groups for every scheme (GPTQ;
AWQ for W4A16; SmoothQuant + GPTQ for the static-activation schemes), GPTQModel 7.3.6 GPTQ and
AutoRound 0.16.1 (`--autoround-iters` steps) for W4A16 g128.

Calibration: `--samples` windows of 512 tokens from the calibration articles (<bos> first for
Gemma-3), seed 0, the same tensor for every row and peer. Perplexity: the first 4,096 held-out
tokens in 512-token windows (with <bos> for Gemma-3: BOS + 511 tokens per window), bf16 model.
Zero-shot: the first `--zeroshot-items` items of each task of `quantscale eval --tasks
zeroshot`, scored for every row, ours and the peers', by one scorer (common.ZS_CODE: lm-eval's
acc and acc_norm). Rows are written to the JSON file as they finish (a cut-short run keeps what
it measured).

    .venv/bin/python benchmarks/quality.py [--models smollm2,gemma3]
        [--schemes W4A16,NVFP4A16,MXFP4A16,W8A8,W4A8] [--methods rtn,gptq,awq,awq+gptq,...]
        [--samples 16] [--peers [llm-compressor,gptqmodel,autoround]] [--only-peers]
        [--zeroshot [--zeroshot-items 200]] [--json PATH]
    .venv/bin/python benchmarks/quality.py --show A.json B.json   # one table of several runs
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import gptq  # noqa: E402

SCHEMES = ("W4A16", "NVFP4A16", "MXFP4A16", "W8A8", "W4A8")
METHODS = (
    "rtn", "gptq", "gptq-clip", "gptq-mse", "awq", "awq+gptq", "awq+gptq-clip", "importance",
    "smooth", "sq", "sq+gptq", "rotate", "rotate-smooth", "rotate-smooth+gptq", "autoround",
)  # fmt: skip
SLOW = {"autoround"}  # left out of the default --methods
STATIC_ONLY = {"smooth", "sq", "sq+gptq", "rotate", "rotate-smooth", "rotate-smooth+gptq"}
WEIGHT_ONLY = {"awq", "awq+gptq", "awq+gptq-clip", "importance", "autoround"}  # not on int8
GROUP = 128
OUR_AUTOROUND_STEPS = 100  # our autoround row's steps per layer (the peer row's iters: 100)
SQ_ALPHA = 0.85  # "sq" / "sq+gptq": SmoothQuant's migration strength on every mapping
JSON_PATH = gptq.RESULTS_DIR / "quality.json"
ZS_ROWS = "zeroshot-rows.json"  # in the work folder: the items every job scores
AUTOROUND_REQS = ["auto-round==0.16.1"]  # its own venv, beside common.TORCH_PIN

# AutoRound (SignRound) with its W4A16 preset (int4 g128 sym); quantize() leaves the model
# fake-quantized in place (checked: 15 distinct values in a weight group of a tiny Llama after
# 2 iterations, 4 x 64 tokens: 137 s on the loaded 2-core machine, ~25 s per layer).
AUTOROUND_JOB = (
    common.PPL_CODE
    + common.ZS_CODE
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
                             "ppl": perplexity(model.eval(), tokens), **zeroshot(model, tok)}))
"""
)

# llm-compressor 0.14 on our recipe's config groups (compressed-tensors layout, as
# benchmarks/calibration.py sends them), one recipe per METHOD: "gptq" (GPTQModifier,
# act-order static on int weights), "awq" (AWQModifier, then round to nearest), "awq+gptq",
# "smoothquant+gptq" (SmoothQuantModifier at its default strength 0.8 first). Its check that
# the group size divides every Linear is bypassed (SmolLM2's 576 columns at g128; the last
# group of a row is shorter, as in ours; its observers still fail on it at g128).
LLMC_JOB = (
    common.PPL_CODE
    + common.ZS_CODE
    + """
import sys, time, json
t0 = time.perf_counter()
torch.set_num_threads(2)
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
t1 = time.perf_counter()
path, calib_path, eval_path, groups, method = sys.argv[1:6]
# Its AWQ pins cached activations, which raises without an accelerator; pinning is a transfer
# speed-up only, so on this CPU-only machine it is skipped.
if not torch.cuda.is_available():
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
tok = AutoTokenizer.from_pretrained(path)
calib, tokens = torch.load(calib_path), torch.load(eval_path)
ds = Dataset.from_dict({"input_ids": calib.tolist(),
                        "attention_mask": torch.ones_like(calib).tolist()})
t2 = time.perf_counter()
groups = json.loads(groups)
quant = dict(config_groups=groups, ignore=["lm_head"], bypass_divisibility_checks=True)
steps, recipe = method.split("+"), []
if "smoothquant" in steps:
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
    recipe.append(SmoothQuantModifier(smoothing_strength=0.8))
if "awq" in steps:
    from llmcompressor.modifiers.transform import AWQModifier
    recipe.append(AWQModifier())
if "gptq" in steps:
    ints = all(g["weights"]["type"] == "int" for g in groups.values())
    recipe.append(GPTQModifier(block_size=128, dampening_frac=0.01,
                               actorder="static" if ints else None, **quant))
else:
    recipe.append(QuantizationModifier(**quant))
oneshot(model=model, dataset=ds, num_calibration_samples=len(calib),
        max_seq_length=calib.shape[1], batch_size=4, recipe=recipe,
        shuffle_calibration_samples=False)
t3 = time.perf_counter()
print("BENCH " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "quantize_s": t3 - t2,
                             "ppl": perplexity(model, tokens), **zeroshot(model, tok)}))
"""
)

# gptq.py's GPTQModel job (int4 g128 sym, desc_act, damp 0.01), scored after its reload on
# its plain torch kernel: the CPU int4pack kernel it picks by default refuses a group size that
# does not divide the input width (SmolLM2's 576 at g128).
_GPTQMODEL_PPL = '    print("BENCH " + json.dumps({"ppl": perplexity(q.model, tokens)}))\n'
_GPTQMODEL_LOAD = 'q = GPTQModel.load(d, device="cpu")'
assert _GPTQMODEL_PPL in gptq.GPTQMODEL_JOB and _GPTQMODEL_LOAD in gptq.GPTQMODEL_JOB
GPTQMODEL_JOB = common.ZS_CODE + gptq.GPTQMODEL_JOB.replace(
    _GPTQMODEL_LOAD, 'q = GPTQModel.load(d, device="cpu", backend="gptq_torch")'
).replace(
    _GPTQMODEL_PPL,
    _GPTQMODEL_PPL
    + "    from transformers import AutoTokenizer\n"
    + '    print("BENCH " + json.dumps(zeroshot(q.model, AutoTokenizer.from_pretrained('
    + "sys.argv[1]))))\n",
)

# The peers' rows per scheme: (tool, method); W4A16 is the only scheme GPTQModel and
# AutoRound's preset share with ours here.
PEER_ROWS = {
    "W4A16": [("llm-compressor", "gptq"), ("llm-compressor", "awq"), ("gptqmodel", "gptq"),
              ("autoround", "autoround")],
    "NVFP4A16": [("llm-compressor", "gptq")],
    "MXFP4A16": [("llm-compressor", "gptq")],
    "W8A8": [("llm-compressor", "smoothquant+gptq")],
    "W4A8": [("llm-compressor", "smoothquant+gptq")],
}  # fmt: skip
PEER_REQS = {
    "llm-compressor": ("llmcompressor", ["llmcompressor==0.14.0.1"], LLMC_JOB),
    "gptqmodel": ("gptqmodel", ["gptqmodel==7.3.6", "requests"], GPTQMODEL_JOB),
    "autoround": ("autoround", AUTOROUND_REQS, AUTOROUND_JOB),
}


def parse_plan(text: str) -> dict[str, list[str]]:
    """`--plan "W4A16=rtn,gptq;W8A8=smooth"` -> {"W4A16": ["rtn", "gptq"], "W8A8": ["smooth"]}."""
    plan = {}
    for part in filter(None, text.split(";")):
        scheme, _, methods = part.partition("=")
        plan[scheme.strip()] = [m.strip() for m in methods.split(",") if m.strip()]
    return plan


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


def quantize_row(
    model, scheme: str, method: str, calib, autoround_steps: int = OUR_AUTOROUND_STEPS
) -> None:
    """Quantize `model` in place with our `method` for `scheme` on `calib` [N, 512]."""
    from quantscale.algorithms.importance import collect_importance
    from quantscale.algorithms.smoothing import SmoothQuant
    from quantscale.calibration.sequential import as_batches
    from quantscale.orchestrator import quantize_model, targeted_linears
    from quantscale.scheme import load_recipe

    recipe = load_recipe(scheme)
    if method.startswith("rotate"):
        recipe.rotate = "hadamard-smooth" if "smooth" in method else "hadamard"
        method = "gptq" if method.endswith("+gptq") else "rtn"
    if method == "smooth":
        search = "qkv=search+gate_up=search+down=search"
        quantize_model(model, recipe, calib, "rtn", 4, [SmoothQuant(search)])
    elif method in ("sq", "sq+gptq"):  # one alpha everywhere: no search
        weights = "gptq" if method == "sq+gptq" else "rtn"
        quantize_model(model, recipe, calib, weights, 4, [SmoothQuant(SQ_ALPHA)])
    elif method == "importance":
        names = list(targeted_linears(model, recipe))
        stats = collect_importance(model, names, as_batches(calib, 4))
        quantize_model(model, recipe, None, "rtn-importance", importance=stats)
    else:
        options: dict = {}
        if method.endswith("-clip"):  # quantize --gptq-clip
            from quantscale.algorithms.gptq import CLIP_GRID

            method, options = method.removesuffix("-clip"), {"clip_search": CLIP_GRID}
        elif method == "autoround":
            options = {"steps": autoround_steps}
        elif method == "gptq-mse":  # quantize --weight-observer mse
            method = "gptq"
            for group in recipe.config_groups.values():
                if group.weights is not None:
                    group.weights.observer = "mse"
        data = None if method == "rtn" and scheme not in ("W8A8", "W4A8") else calib
        quantize_model(model, recipe, data, method=method, batch_size=4, **options)


_ZS: dict = {}
exec(common.ZS_CODE, _ZS)  # the peers' jobs run this same scorer


def measure(model, tok, ev, zeroshot: bool) -> dict:
    """Perplexity (with the tokenizer's BOS) and, if asked, zero-shot accuracies (the rows of
    common.ZS_ENV, scored by common.ZS_CODE as in the peers' jobs)."""
    from quantscale.data.calibration import bos_token_id
    from quantscale.eval.perplexity import perplexity

    out = {"ppl": perplexity(model, ev, gptq.SEQ_LEN, bos_id=bos_token_id(tok))}
    if zeroshot:
        start = time.perf_counter()
        out.update(_ZS["zeroshot"](model, tok), zeroshot_s=time.perf_counter() - start)
    return out


def write_zeroshot_rows(path: Path, n_items: int) -> None:
    """The first `n_items` items of each quantscale zero-shot task, as common.ZS_CODE reads."""
    from quantscale.eval.zeroshot import TASKS, task_jsonl

    rows = {}
    for task in TASKS:
        lines = task_jsonl(task).read_text(encoding="utf-8").splitlines()[:n_items]
        rows[task] = [json.loads(line) for line in lines]
    path.write_text(json.dumps(rows), encoding="utf-8")


class Results:
    """Rows keyed "model/scheme/method", written to `path` after each one."""

    def __init__(self, path: Path, settings: dict) -> None:
        self.path, self.data = path, {"machine": common.machine(), **settings, "rows": {}}

    def add(self, key: str, row: dict) -> None:
        self.data["rows"][key] = row
        print(json.dumps({key: row}), flush=True)
        common.write_results(self.path, self.data)


@dataclass
class Subject:
    """One model of the table: its bf16 weights, tokenizer and the tokens every row uses."""

    name: str
    base: object
    tok: object
    calib: object
    ev: object


def prepare(model_name: str, samples: int, work: Path) -> Subject:
    """Load a model in bf16 and save its calibration / held-out tokens for the peers."""
    import torch

    from quantscale.data.calibration import calibration_batches, eval_tokens
    from quantscale.orchestrator import load_model

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
    return Subject(model_name, base, tok, calib, ev)


def use_env(env: dict[str, str]) -> None:
    """Make `env` (job_env of a model) this process's, for common.ZS_CODE."""
    for key in (common.BOS_ENV, common.ZS_ENV):
        os.environ.pop(key, None)
    os.environ.update(env)


def bf16_row(subject: Subject, zeroshot: bool, res: Results) -> None:
    row = measure(subject.base, subject.tok, subject.ev, zeroshot)
    res.add(f"{subject.name}/bf16/-", {"tool": "bf16", **row})


def our_rows(
    subject: Subject,
    scheme: str,
    methods,
    zeroshot: bool,
    res: Results,
    autoround_steps: int = OUR_AUTOROUND_STEPS,
) -> None:
    """Our rows of one model and scheme (methods that do not apply are skipped)."""
    from quantscale.errors import QuantscaleError

    for method in methods:
        if not applies(scheme, method):
            continue
        key, model = f"{subject.name}/{scheme}/{method}", copy.deepcopy(subject.base)
        start = time.perf_counter()
        try:
            quantize_row(model, scheme, method, subject.calib, autoround_steps)
        except QuantscaleError as err:
            res.add(key, {"tool": "quantscale", "error": str(err)})
            continue
        took = time.perf_counter() - start
        row = measure(model, subject.tok, subject.ev, zeroshot)
        res.add(key, {"tool": "quantscale", "quantize_s": took, **row})
        del model


def job_env(tok, work: Path | None) -> dict[str, str]:
    """The benchmark jobs' variables for a model: its BOS id (Gemma-3) and, when `work` is
    given, the zero-shot rows file in it."""
    from quantscale.data.calibration import bos_token_id

    bos = bos_token_id(tok)
    env = {} if bos is None else {common.BOS_ENV: str(bos)}
    if work is not None:
        env[common.ZS_ENV] = str(work / ZS_ROWS)
    return env


def peer_rows(
    model_name: str,
    scheme: str,
    samples: int,
    env: dict[str, str],
    tools: list[str],
    iters: int,
    res: Results,
    work: Path,
) -> None:
    """The PEER_ROWS of `tools` for `scheme`, each a job in the peer's venv on our saved
    calibration and held-out tokens (AutoRound with `iters` sign-gradient steps per layer)."""
    import calibration

    from quantscale.models.loader import resolve_model
    from quantscale.scheme import load_recipe

    ckpt = resolve_model(model_name)
    calib, ev = work / f"{model_name}-calib-{samples}.pt", work / f"{model_name}-eval.pt"
    for tool, method in PEER_ROWS.get(scheme, []):
        if tool not in tools:
            continue
        key, (venv, reqs, code) = f"{model_name}/{scheme}/{method}[{tool}]", PEER_REQS[tool]
        try:
            python = str(common.peer_python(venv, reqs))
        except Exception as exc:  # noqa: BLE001 - a peer that will not install is a row
            res.add(key, {"tool": tool, "error": str(exc)})
            continue
        script = gptq._job_file(work, tool, code)
        if tool == "llm-compressor":
            args = [calibration.llmc_groups(load_recipe(scheme)), method]
        else:
            args = [str(iters)] if tool == "autoround" else [str(GROUP)]
        cmd = [python, str(script), str(ckpt), str(calib), str(ev), *args]
        run = common.run_job(tool, cmd, env=env, timeout=3600 * 6)
        row: dict = {"tool": tool, "wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb}
        if run.returncode == 0:
            row.update(run.extra)
        else:
            row["error"] = run.output_tail[-600:]
        res.add(key, row)


def print_table(data: dict) -> None:
    """One line per row: perplexity, its change from bf16, time to quantize, and each zero-shot
    task's acc_norm with their mean."""
    rows = []
    bf16 = {k.split("/")[0]: r["ppl"] for k, r in data["rows"].items() if r["tool"] == "bf16"}
    tasks = sorted({k for r in data["rows"].values() for k in r if k.endswith("_norm")})
    for key, r in data["rows"].items():
        model_name, scheme, method = key.split("/")
        if "error" in r:
            note = r["error"].strip().splitlines()[-1][:70] if r["error"].strip() else "error"
            rows.append([model_name, scheme, method, r["tool"], "-", "-", "-", *["-"] * len(tasks),
                         "-", note])  # fmt: skip
            continue
        ref = bf16.get(model_name)
        delta = f"{100 * (r['ppl'] / ref - 1):+.1f}%" if ref and "ppl" in r else "-"
        q = f"{r['quantize_s']:.1f}" if "quantize_s" in r else "-"
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else "-"
        accs = [r.get(t) for t in tasks]
        zs = [f"{v:.3f}" if v is not None else "-" for v in accs]
        mean = f"{sum(accs) / len(accs):.3f}" if accs and None not in accs else "-"
        rows.append([model_name, scheme, method, r["tool"], ppl, delta, q, *zs, mean, ""])
    header = ["model", "scheme", "method", "tool", "ppl", "vs bf16", "quantize s",
              *[t.removesuffix("_norm") for t in tasks], "zs mean", "notes"]  # fmt: skip
    common.print_table(rows, header)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--methods", default=",".join(m for m in METHODS if m not in SLOW))
    ap.add_argument("--samples", type=int, default=16, help="calibration windows of 512 tokens")
    ap.add_argument(
        "--peers",
        nargs="?",
        const="llm-compressor,gptqmodel,autoround",
        default=None,
        help="W4A16 g128 of these peers: GPTQ of llm-compressor, gptqmodel (the default pair), "
        "AutoRound of autoround",
    )
    ap.add_argument("--autoround-iters", type=int, default=200, help="AutoRound steps per layer")
    ap.add_argument(
        "--our-autoround-steps",
        type=int,
        default=OUR_AUTOROUND_STEPS,
        help="our autoround row's steps per layer",
    )
    ap.add_argument("--only-peers", action="store_true", help="no rows of ours (but bf16)")
    ap.add_argument("--zeroshot", action="store_true", help="zero-shot accuracy of every row")
    ap.add_argument("--zeroshot-items", type=int, default=200, help="items per zero-shot task")
    ap.add_argument(
        "--plan",
        help='methods per scheme, overriding --schemes / --methods: "W4A16=rtn,gptq;W8A8=smooth"',
    )
    ap.add_argument("--json", type=Path, default=JSON_PATH)
    ap.add_argument("--show", type=Path, nargs="+", help="print the table of these results files")
    a = ap.parse_args()
    if a.show:
        merged: dict = {"rows": {}}
        for path in a.show:
            merged["rows"].update(json.loads(path.read_text())["rows"])
        print_table(merged)
        return
    import torch

    from quantscale.cache import cache_dir

    torch.set_num_threads(2)
    work = cache_dir() / "bench-work" / "quality"
    work.mkdir(parents=True, exist_ok=True)
    settings = {"samples": a.samples, "seq_len": gptq.SEQ_LEN, "eval_tokens": gptq.EVAL_TOKENS}
    res = Results(a.json, settings)
    plan = parse_plan(a.plan) if a.plan else {s: a.methods.split(",") for s in a.schemes.split(",")}
    unknown = sorted({m for ms in plan.values() for m in ms} - set(METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    if a.zeroshot:
        write_zeroshot_rows(work / ZS_ROWS, a.zeroshot_items)
    subjects = [prepare(name, a.samples, work) for name in a.models.split(",")]
    envs = {sub.name: job_env(sub.tok, work if a.zeroshot else None) for sub in subjects}
    for sub in subjects:
        use_env(envs[sub.name])
        bf16_row(sub, a.zeroshot, res)
    for scheme, methods in plan.items():  # scheme-major: a cut-short run has whole schemes
        for sub in subjects:
            use_env(envs[sub.name])
            if not a.only_peers:
                our_rows(sub, scheme, methods, a.zeroshot, res, a.our_autoround_steps)
            if a.peers:
                tools = a.peers.split(",")
                peer_rows(sub.name, scheme, a.samples, envs[sub.name], tools, a.autoround_iters,
                          res, work)  # fmt: skip
    print_table(res.data)
    print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
