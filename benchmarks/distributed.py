"""Data-parallel GPTQ on torch.distributed: 1 process vs `torchrun --nproc-per-node N`.

The same `quantscale quantize MODEL OUT --scheme S --method gptq` job (default SmolLM2,
W4A16, 32 x 512 Wikipedia calibration) run by one process and by N gloo ranks on this
machine, alternating when `--repeats` > 1. Per run: wall time, peak RSS of the largest process
(GNU time), and for N > 1 the bytes each rank sent / received per decoder layer (the
`quantscale.distributed` traffic log). Then every output tensor and the config are compared
with the 1-process output (tensors that differ, max |difference|), and `quantscale eval
OUT --tasks ppl` scores each output on the held-out Wikipedia text.

    .venv/bin/python benchmarks/distributed.py [--ranks 1,2] [--samples 32] [--seq-len 512]
        [--scheme W4A16] [--stream] [--threads 1] [--repeats 1] [--json bench-results/dist.json]
        [--model qwen3-moe --moe-layers 2] [--flags "--no-calibrate-all-experts"]

`--ranks 1,2,2ep`: '2ep' is 2 ranks with `--expert-parallel`. Every run sums GPTQ Hessians in
float64 (`--hessian-dtype float64`, torchrun's default), so the outputs compare bit for bit;
each reports the most Hessian bytes a rank held at a layer's end (the GPTQ log).
`--model qwen3-moe`: a Qwen3-MoE-shaped synthetic checkpoint (64 experts, random weights).

`--threads`: OMP threads per process (torchrun's default for N > 1 is 1; the 1-process run
gets the same number per process unless `--threads-single` says otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TRAFFIC = re.compile(r"rank (\d+) (\S+): sent (\d+) bytes, received (\d+) bytes")
HELD = re.compile(r"rank (\d+) GPTQ Hessians: (\d+) bytes held")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def quantize_cmd(run: str, model: str, out: Path, args: argparse.Namespace) -> list[str]:
    """`run`: '1' (one process), 'N' (N ranks) or 'Nep' (N ranks, --expert-parallel). Every
    run sums Hessians in float64 (torchrun's default), so 1 and N ranks compare bit for bit."""
    job = ["quantize", model, str(out), "--scheme", args.scheme, "--method", "gptq"]
    job += ["--calib-samples", str(args.samples), "--calib-seq-len", str(args.seq_len)]
    job += ["--overwrite", "--hessian-dtype", "float64"]
    job += ["--stream", "--device", "cpu"] if args.stream else []
    job += args.flags.split() + (["--expert-parallel"] if run.endswith("ep") else [])
    ranks = int(run.removesuffix("ep"))
    if ranks == 1:
        return [sys.executable, "-m", "quantscale", *job]
    launch = ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
    launch += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    return [sys.executable, *launch, "-m", "quantscale", *job]


def qwen3_moe(folder: Path, layers: int) -> Path:
    """A Qwen3-MoE-shaped bf16 checkpoint (64 experts of 128, top-8, hidden 256; random
    weights) with SmolLM2's tokenizer, written once."""
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from quantscale.models.loader import resolve_model

    out = folder / f"qwen3-moe-{layers}l"
    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
        moe_intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, num_experts=64, num_experts_per_tok=8,
        max_position_embeddings=1024,
    )  # fmt: skip
    Qwen3MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def timed(cmd: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    env["QUANTSCALE_PROGRESS"] = "0"
    with tempfile.NamedTemporaryFile(suffix=".time", delete=False) as f:
        time_file = f.name
    start = time.perf_counter()
    wrapped = ["/usr/bin/time", "-f", "%M", "-o", time_file, *cmd]
    proc = subprocess.run(wrapped, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    rss = float(Path(time_file).read_text().split()[-1]) / 1024
    os.unlink(time_file)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    traffic: dict[str, dict[int, tuple[int, int]]] = {}
    for rank, layer, sent, received in TRAFFIC.findall(proc.stderr):
        traffic.setdefault(layer, {})[int(rank)] = (int(sent), int(received))
    held: dict[int, int] = {}
    for rank, nbytes in HELD.findall(proc.stderr):
        held[int(rank)] = max(held.get(int(rank), 0), int(nbytes))
    return {"wall_s": wall, "peak_rss_mb": rss, "traffic": traffic, "hessian_bytes": held}


def compare(a: Path, b: Path) -> dict:
    from quantscale.checkpoint.read import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    names = sorted(ca.names())
    if names != sorted(cb.names()):
        return {"same_names": False}
    differ, worst = 0, 0.0
    for name in names:
        x, y = ca.get(name), cb.get(name)
        if not torch.equal(x, y):
            differ += 1
            if x.is_floating_point():  # packed int codes have no meaningful difference
                worst = max(worst, float((x.double() - y.double()).abs().max()))
    config = json.loads((a / "config.json").read_text()) == json.loads(
        (b / "config.json").read_text()
    )
    return {
        "tensors": len(names),
        "differ": differ,
        "max_abs_diff_float": worst,
        "config_equal": config,
    }


def perplexity(out: Path) -> float:
    cmd = [sys.executable, "-m", "quantscale", "eval", str(out), "--tasks", "ppl", "--json"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "QUANTSCALE_PROGRESS": "0"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return float(_find_ppl(json.loads(proc.stdout)))


def _find_ppl(obj: object) -> float:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("ppl", "perplexity") and isinstance(value, (int, float)):
                return float(value)
            try:
                return _find_ppl(value)
            except KeyError:
                pass
    if isinstance(obj, list):
        for value in obj:
            try:
                return _find_ppl(value)
            except KeyError:
                pass
    raise KeyError("ppl")


def per_layer_bytes(traffic: dict[str, dict[int, tuple[int, int]]]) -> dict:
    """Median over layers of the bytes each rank sent (the sum over ranks, per layer)."""
    totals = [sum(s for s, _ in ranks.values()) for ranks in traffic.values()]
    return {"layers": len(totals), "median_sent_all_ranks": statistics.median(totals or [0])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="a model, or qwen3-moe (synthetic)")
    p.add_argument("--moe-layers", type=int, default=2)
    p.add_argument("--flags", default="", help="more quantize flags for every run")
    p.add_argument("--scheme", default="W4A16")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--threads-single", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-ppl", action="store_true")
    p.add_argument("--work", default="bench-results/distributed")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ranks = args.ranks.split(",")
    model = str(qwen3_moe(work, args.moe_layers)) if args.model == "qwen3-moe" else args.model
    runs: dict[str, list[dict]] = {n: [] for n in ranks}
    for _ in range(args.repeats):
        for n in ranks:
            threads = args.threads_single if n == "1" and args.threads_single else args.threads
            cmd = quantize_cmd(n, model, work / f"out-{n}", args)
            runs[n].append(timed(cmd, threads))
            print(f"ranks={n}: {runs[n][-1]['wall_s']:.1f} s", flush=True)
    rows = []
    for n in ranks:
        out = work / f"out-{n}"
        row = {
            "ranks": n,
            "wall_s": [r["wall_s"] for r in runs[n]],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[n]),
            "bytes_per_layer": per_layer_bytes(runs[n][-1]["traffic"]),
            "hessian_bytes_per_rank": runs[n][-1]["hessian_bytes"],
            "vs_1": compare(work / f"out-{ranks[0]}", out),
        }
        if not args.no_ppl:
            row["ppl"] = perplexity(out)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
