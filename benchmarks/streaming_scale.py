"""A model bigger than we would like to hold: GPTQ streamed layer by layer from disk (issue 12).

Model: a synthetic LlamaForCausalLM with Llama-3-8B's layer shapes (hidden 4096, intermediate
14336, 32 heads / 8 KV heads, head_dim 128), random N(0, 0.02) weights, bf16, enough layers
for ~6 GB (12 by default), written in ~3 GB shards as real checkpoints are. The vocabulary is
SmolLM2's (49,152 instead of Llama-3's 128,256) so that its tokenizer, saved beside the
weights, tokenizes the calibration text. Calibration: Wikipedia windows, 8 x 128 tokens by
default (small: the point is memory and the streamed path, not accuracy).

Jobs, each its own process under GNU time (peak RSS of the process): quantscale `--stream`
W4A16 GPTQ (int4, group 128) and NVFP4A16 GPTQ; llm-compressor 0.14 (GPTQModifier, the same
schemes, whole model loaded in bf16); GPTQModel 7.3 (W4A16 only: it has no NVFP4). The peers
run without act-order; ours with its default, "weight" (the Hessian's column order, group
scales fixed from the original weight: the same output format). Each peer runs with
`--timeout`; a timeout or an OOM kill is reported as
the result it is. The table gives wall time, peak RSS and peak RSS over the checkpoint's size
(the goal for ours: under 25%). `--resume` adds the kill-and-rerun job: ours W4A16 killed
(SIGKILL) after a random layer, rerun with the same command; it reports the rerun's time
against the uninterrupted run (the time saved) and whether the output is byte-identical.

    nice -n 10 .venv/bin/python benchmarks/streaming_scale.py [--layers 12] [--samples 8]
        [--seq-len 128] [--jobs ours-w4a16,ours-nvfp4,llmc-w4a16,llmc-nvfp4,gptqmodel-w4a16]
        [--resume] [--timeout 3600] [--json bench-results/streaming_scale.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import gptq  # noqa: E402 - the peers' venvs and GPTQModel's workarounds

RESULTS = Path(__file__).resolve().parents[1] / "bench-results" / "streaming_scale.json"
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 4096, 14336, 32, 8  # Llama-3-8B
SHARD_LAYERS = 6  # ~2.6 GB of layers per shard (+ embeddings / lm_head at the ends)
RSS_GOAL = 0.25  # peak RSS / checkpoint bytes

OURS = """
import json, sys, time, torch
torch.set_num_threads(2)
from quantscale.orchestrator import quantize_checkpoint
from quantscale.streaming import StreamOptions
ckpt, out, scheme, calib = sys.argv[1:5]
ids = torch.load(calib)
t0 = time.perf_counter()
quantize_checkpoint(ckpt, out, scheme, method="gptq", calib_data=ids, calib_samples=len(ids),
                    calib_seq_len=ids.shape[1], calib_batch_size=4,
                    stream=StreamOptions(device="cpu"))
print("BENCH " + json.dumps({"quantize_s": time.perf_counter() - t0}))
"""

LLMC = """
import json, sys, time, torch
torch.set_num_threads(2)
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
ckpt, out, scheme, calib = sys.argv[1:5]
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
ids = torch.load(calib)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
t1 = time.perf_counter()
oneshot(model=model, dataset=ds, num_calibration_samples=len(ids), max_seq_length=ids.shape[1],
        batch_size=4, recipe=GPTQModifier(targets="Linear", scheme=scheme, ignore=["lm_head"],
                                          actorder=None, dampening_frac=0.01))
t2 = time.perf_counter()
model.save_pretrained(out, save_compressed=True)
print("BENCH " + json.dumps({"load_s": t1 - t0, "quantize_s": t2 - t1,
                             "save_s": time.perf_counter() - t2}))
"""

GPTQMODEL = (
    """
import json, sys, os, time, types, importlib.machinery, enum, torch
torch.set_num_threads(2)
"""
    + common.TORCHVISION_STUB
    + """__RAISE_WORKERS__
from gptqmodel import GPTQModel, QuantizeConfig
ckpt, out, scheme, calib = sys.argv[1:5]
t0 = time.perf_counter()
cfg = QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=False, damp_percent=0.01)
model = GPTQModel.load(ckpt, cfg, device="cpu", dtype=torch.bfloat16)
ids = torch.load(calib)
data = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in ids]
t1 = time.perf_counter()
model.quantize(data, batch_size=4)
t2 = time.perf_counter()
model.save(out)
print("BENCH " + json.dumps({"load_s": t1 - t0, "quantize_s": t2 - t1,
                             "save_s": time.perf_counter() - t2}))
"""
)

OURS_TOOL = "quantscale --stream"
# job -> (tool, scheme, code, peer venv (None: ours) and its requirements)
JOBS = {
    "ours-w4a16": (OURS_TOOL, "W4A16", OURS, None),
    "ours-nvfp4": (OURS_TOOL, "NVFP4A16", OURS, None),
    "llmc-w4a16": ("llm-compressor", "W4A16", LLMC, ("llmcompressor", ["llmcompressor==0.14.0.1"])),
    "llmc-nvfp4": (
        "llm-compressor",
        "NVFP4A16",
        LLMC,
        ("llmcompressor", ["llmcompressor==0.14.0.1"]),
    ),
    "gptqmodel-w4a16": (
        "GPTQModel",
        "W4A16",
        GPTQMODEL,
        ("gptqmodel", ["gptqmodel==7.3.6", "requests"]),
    ),
}


def checkpoint(root: Path, layers: int) -> Path:
    """The Llama-3-8B-shaped checkpoint (written once, one shard in memory at a time)."""
    from transformers import AutoTokenizer

    from quantscale.checkpoint.synthetic import write_llama_like
    from quantscale.data.assets import smollm2_checkpoint

    path = root / f"llama3-8b-shapes-{layers}l"
    if (path / "config.json").exists():
        return path
    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    shards = -(-layers // SHARD_LAYERS)
    print(f"writing {path} ({layers} layers, {shards} shards; once)", flush=True)
    write_llama_like(
        path, HIDDEN, INTERMEDIATE, layers, len(tok), shards, heads=HEADS, kv_heads=KV_HEADS
    )
    tok.save_pretrained(path)
    return path


def calibration(root: Path, samples: int, seq_len: int) -> Path:
    import torch
    from transformers import AutoTokenizer

    from quantscale.data.assets import smollm2_checkpoint
    from quantscale.data.calibration import calibration_batches

    path = root / f"calib-{samples}x{seq_len}.pt"
    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    torch.save(calibration_batches(tok, samples, seq_len), path)
    return path


def digests(path: Path) -> dict[str, str]:
    out = {}
    for p in sorted(path.iterdir()):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        out[p.name] = h.hexdigest()
    return out


def run(job: str, python: str, script: Path, argv: list, timeout: float, env=None) -> dict:
    """One job under GNU time; its row (wall, peak RSS, return code, its BENCH timings)."""
    cmd = [python, str(script), *map(str, argv)]
    try:
        r = common.run_job(job, cmd, env=env, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - subprocess.TimeoutExpired: a result, say it
        return {"job": job, "ok": False, "failed": f"{type(exc).__name__}: {exc}"[:300]}
    row = {"job": job, "ok": r.returncode == 0, "wall_s": r.wall_s, "rc": r.returncode}
    row.update(peak_rss_mb=r.peak_rss_mb, loadavg=r.loadavg, **r.extra)
    if r.returncode != 0:
        why = "killed (SIGKILL: OOM?)" if r.returncode in (-9, 137) else f"rc={r.returncode}"
        row["failed"] = why
        row["tail"] = r.output_tail[-1500:]
    return row


def bench(args: argparse.Namespace) -> dict:
    from quantscale.cache import cache_dir
    from quantscale.streaming import KILL_AFTER_ENV

    work = cache_dir() / "bench-work" / "streaming_scale"
    work.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(cache_dir() / "bench-inputs", args.layers)
    size = common.dir_bytes(ckpt)
    shards = sorted(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    calib = calibration(work, args.samples, args.seq_len)
    results: dict = {
        "machine": common.machine(),
        "checkpoint": {"path": str(ckpt), "bytes": size, "shards": shards, "layers": args.layers},
        "calibration": f"{args.samples}x{args.seq_len}",
        "jobs": {},
    }
    print(f"checkpoint {size / 1e9:.2f} GB in {len(shards)} shards; calib {results['calibration']}")
    for job in args.jobs.split(","):
        tool, scheme, code, peer = JOBS[job]
        try:
            python = str(common.peer_python(*peer)) if peer else common.this_python()
        except Exception as exc:  # noqa: BLE001 - a peer that will not install is reported
            results["jobs"][job] = {"job": job, "ok": False, "failed": f"venv: {exc}"[:300]}
            continue
        script = work / f"job_{job}.py"
        script.write_text(code.replace("__RAISE_WORKERS__", gptq.RAISE_WORKERS))
        out = work / f"out-{job}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(f"{out}.partial", ignore_errors=True)
        print(f"== {job} (load {common.loadavg()})", flush=True)
        row = run(job, python, script, [ckpt, out, scheme, calib], args.timeout)
        row.update(tool=tool, scheme=scheme, output_bytes=common.dir_bytes(out))
        if "peak_rss_mb" in row:
            row["rss_over_checkpoint"] = row["peak_rss_mb"] * 2**20 / size
        results["jobs"][job] = row
        print(json.dumps({k: v for k, v in row.items() if k != "tail"}), flush=True)
        if job == "ours-w4a16" and args.resume and row["ok"]:
            whole = digests(out)
            k = random.Random(args.seed).randrange(1, args.layers - 1)
            resumed = work / "out-resume"
            shutil.rmtree(resumed, ignore_errors=True)
            shutil.rmtree(f"{resumed}.partial", ignore_errors=True)
            argv = [ckpt, resumed, scheme, calib]
            env = {KILL_AFTER_ENV: str(k)}
            killed = run("ours-killed", python, script, argv, args.timeout, env=env)
            rerun = run("ours-resumed", python, script, argv, args.timeout)
            same = rerun["ok"] and digests(resumed) == whole
            results["resume"] = {
                "killed_after_layer": k,
                "killed_run_s": killed.get("wall_s"),
                "killed_rc": killed.get("rc"),
                "rerun_s": rerun.get("wall_s"),
                "rerun_peak_rss_mb": rerun.get("peak_rss_mb"),
                "uninterrupted_s": row["wall_s"],
                "saved_s": row["wall_s"] - rerun["wall_s"] if rerun["ok"] else None,
                "byte_identical": same,
            }
            print(json.dumps({"resume": results["resume"]}), flush=True)
            shutil.rmtree(resumed, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    results["rows"] = rows(results)
    print_table(results)
    return results


def rows(results: dict) -> list[dict]:
    """Rows of run_all.py's combined table."""
    out = []
    size = results["checkpoint"]["bytes"]
    for job, r in results["jobs"].items():
        summary = {
            "ok": r["ok"],
            "wall_min_s": r.get("wall_s"),
            "peak_rss_mb": r.get("peak_rss_mb"),
        }
        summary = {k: v for k, v in summary.items() if v is not None}
        name = f"GPTQ {r.get('scheme', job)} streamed, {size / 1e9:.1f} GB Llama-3-8B shapes"
        note = r.get("failed") or f"RSS {100 * r.get('rss_over_checkpoint', 0):.0f}% of ckpt"
        tool = r.get("tool", job)
        out_bytes = r.get("output_bytes") or None
        row = common.result_row(name, tool, summary, output_bytes=out_bytes, ours=OURS_TOOL)
        out.append({**row, "note": note})
    return out


def print_table(results: dict) -> None:
    size = results["checkpoint"]["bytes"]
    table = []
    for job, r in results["jobs"].items():
        rss = r.get("peak_rss_mb")
        table.append(
            [
                r.get("tool", job),
                r.get("scheme", ""),
                f"{r['wall_s']:.0f}" if "wall_s" in r else "-",
                f"{r['quantize_s']:.0f}" if "quantize_s" in r else "-",
                f"{rss / 1024:.2f}" if rss else "-",
                f"{100 * rss * 2**20 / size:.1f}%" if rss else "-",
                "ok" if r["ok"] else r.get("failed", "failed"),
            ]
        )
    print(f"\ncheckpoint {size / 1e9:.2f} GB, calibration {results['calibration']}")
    header = ["tool", "scheme", "wall s", "quantize s", "peak RSS GiB", "RSS/ckpt", "result"]
    common.print_table(table, header)
    if "resume" in results:
        print(f"resume: {json.dumps(results['resume'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--resume", action="store_true", help="kill ours at a random layer, rerun")
    ap.add_argument("--seed", type=int, default=0, help="which layer --resume kills after")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per job")
    ap.add_argument("--json", type=Path, default=RESULTS)
    a = ap.parse_args()
    common.write_results(a.json, bench(a))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
