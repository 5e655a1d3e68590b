"""FP8 block-128 conversion of a bf16 checkpoint: quantscale vs peers vs the machine's floor.

For each input (SmolLM2-135M from the cache; synthetic Llama-shaped checkpoints of
`--size-gb` GB each, 1 by default) it runs, alternating, in separate processes:
- floor: read every input byte and write as many bytes as our output has, no computation,
  with the same reads and writes (CHUNK_BYTES steps), reading everything, then writing;
- quantscale: `quantize_checkpoint_fp8` (the `quantscale quantize --scheme fp8-block` path)
  with `--backend` (default auto; a comma list adds one job per further backend, e.g.
  `--backend auto,eager` to compare kernels end to end);
- llm-compressor 0.14 `model_free_ptq(scheme="FP8_BLOCK")`, in its own venv;
- ModelOpt 0.47 FP8 2D blockwise weight-only + HF export, in its own venv (if it runs on CPU);
- convert: the FP8 version of each input (made once) to compressed-tensors
  (`quantscale convert`), against the floor of reading and writing its bytes.
Each job reports its own work time (after imports) on a `BENCH {json}` line; the table shows
that, the process wall time, GB/s of bf16 read, peak RSS and ratios to the floor and to us.
`--kernel` runs benchmarks/kernels.py instead (the in-memory quantizers against an in-memory
copy). The C++ kernel is built here first (once, into the cache), so that "auto" in the
conversion jobs finds it.

    .venv/bin/python benchmarks/fp8_block.py [--repeats 3] [--quick] [--kernel] [--no-peers]
        [--size-gb 1 2] [--backend auto,eager]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench-results" / "fp8_block.json"

LLMC_JOB = """
import sys, time, json
t0 = time.perf_counter()
from llmcompressor import model_free_ptq
t1 = time.perf_counter()
model_free_ptq(sys.argv[1], sys.argv[2], scheme="FP8_BLOCK",
               ignore=["lm_head", "re:.*embed_tokens$"], device="cpu")
t2 = time.perf_counter()
print("BENCH " + json.dumps({"import_s": t1 - t0, "work_s": t2 - t1}))
"""

LLMC_ONESHOT_JOB = """
import sys, time, json
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
t1 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
t2 = time.perf_counter()
oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="FP8_BLOCK",
                                                 ignore=["lm_head"]))
t3 = time.perf_counter()
model.save_pretrained(sys.argv[2], save_compressed=True)
t4 = time.perf_counter()
print("BENCH " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "quantize_s": t3 - t2,
                             "save_s": t4 - t3, "work_s": t4 - t1}))
"""

MODELOPT_JOB = """
import sys, time, json
t0 = time.perf_counter()
import torch
import modelopt.torch.quantization as mtq
from modelopt.torch.export import export_hf_checkpoint
from transformers import AutoModelForCausalLM
t1 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
t2 = time.perf_counter()
model = mtq.quantize(model, mtq.FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG, forward_loop=None)
t3 = time.perf_counter()
export_hf_checkpoint(model, export_dir=sys.argv[2])
t4 = time.perf_counter()
print("BENCH " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "quantize_s": t3 - t2,
                             "save_s": t4 - t3, "work_s": t4 - t1}))
"""


# ---------------------------------------------------------------- jobs run in a subprocess


def job_floor(src: Path, out: Path, out_bytes: int) -> None:
    """Read every input shard byte and write `out_bytes` (spread over as many new files in
    proportion to their size), no computation, with the I/O our conversion uses: plain reads
    of CHUNK_BYTES into one reused buffer (in cache), each followed by the share of output
    written from it, into files sized up front. One thread."""
    t0 = time.perf_counter()
    import os

    from quantscale.checkpoint.read import CHUNK_BYTES

    files = sorted(src.glob("*.safetensors"))
    in_bytes = sum(f.stat().st_size for f in files)
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    out.mkdir(parents=True)
    t1 = time.perf_counter()
    for i, f in enumerate(files):
        todo = f.stat().st_size * out_bytes // in_bytes
        fd = os.open(out / f"shard-{i}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, todo)
        written = 0
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                share = min(todo - written, -(-n * out_bytes // in_bytes))
                written += os.pwrite(fd, view[:share], written)
        os.close(fd)
    t2 = time.perf_counter()
    print("BENCH " + json.dumps({"import_s": t1 - t0, "work_s": t2 - t1}))


def job_ours(src: Path, out: Path, backend: str) -> None:
    """`quantize_checkpoint_fp8`, the `quantscale quantize --scheme fp8-block` path. Loading
    the compiled kernel (a shared library, about 0.08 s) counts as import, like the peers'
    imports; the process time column has everything."""
    t0 = time.perf_counter()
    import math

    from quantscale.checkpoint import fp8_quantize
    from quantscale.checkpoint.read import Checkpoint
    from quantscale.formats import fp8_fast

    if backend in ("auto", "cpp"):
        fp8_fast.native_available()
    t1 = time.perf_counter()
    fp8_quantize.quantize_checkpoint_fp8(src, out, backend=backend)
    t2 = time.perf_counter()
    if backend == "auto":  # the same choice quantize_checkpoint_fp8 made
        infos = Checkpoint(src).tensors.values()
        total = sum(math.prod(i.shape) for i in infos if fp8_quantize.quantizable(i))
        backend = fp8_fast.choose_backend(total)
    print("BENCH " + json.dumps({"import_s": t1 - t0, "work_s": t2 - t1, "backend": backend}))


def job_convert(src: Path, out: Path) -> None:
    """`convert_checkpoint(src, out, "compressed-tensors")` (`quantscale convert`)."""
    t0 = time.perf_counter()
    from quantscale.checkpoint.convert import convert_checkpoint

    t1 = time.perf_counter()
    convert_checkpoint(src, out, "compressed-tensors")
    t2 = time.perf_counter()
    print("BENCH " + json.dumps({"import_s": t1 - t0, "work_s": t2 - t1}))


def fp8_input(label: str, src: Path) -> Path:
    """The FP8 block version of input `src` (made once into the cache): convert's input."""
    from quantscale.checkpoint.fp8_quantize import quantize_checkpoint_fp8

    path = cache_dir() / "bench-inputs" / f"{label}-fp8"
    if not (path / "config.json").exists():
        quantize_checkpoint_fp8(src, path, overwrite=True)
    return path


# ---------------------------------------------------------------- orchestration


def cache_dir() -> Path:
    from quantscale.cache import cache_dir as root

    return root()


SYNTH_SHAPE = {"hidden": 2048, "intermediate": 5632, "vocab": 16000}
SYNTH_LAYER_BYTES = 90_185_728  # bf16 bytes of one decoder layer of that shape (GQA 16/4)
SYNTH_FIXED_BYTES = 131_076_096  # embeddings, lm_head and final norm


def synthetic(size_gb: float) -> Path:
    """A bf16 Llama-shaped checkpoint of about `size_gb` GB (written once into the cache);
    layers fill the size, about 0.5 GB per shard."""
    from quantscale.checkpoint.synthetic import write_llama_like

    layers = max(1, round((size_gb * 1e9 - SYNTH_FIXED_BYTES) / SYNTH_LAYER_BYTES))
    shards = max(2, round(2 * size_gb))
    path = cache_dir() / "bench-inputs" / f"llama-{size_gb:g}gb-bf16"
    if not (path / "config.json").exists():
        print(f"writing synthetic checkpoint {path} ({layers} layers, {shards} shards)")
        write_llama_like(path, layers=layers, shards=shards, overwrite=True, **SYNTH_SHAPE)
    return path


def inputs(quick: bool, sizes_gb: list[float]) -> dict[str, Path]:
    """Input checkpoints: SmolLM2 (if the cache can provide it) and synthetic ones."""
    found = {}
    try:
        from quantscale.data.assets import smollm2_checkpoint

        found["SmolLM2-135M"] = Path(smollm2_checkpoint())
    except Exception as err:  # noqa: BLE001 - the benchmark still runs on the synthetic one
        print(f"SmolLM2 unavailable ({err}); synthetic checkpoint only")
    if not quick:
        for size in sizes_gb:
            found[f"synthetic-{size:g}GB"] = synthetic(size)
    return found


def output_bytes(src: Path) -> int:
    """Bytes of tensors our FP8 output holds (fp8 weights + float32 scales + the rest)."""
    from quantscale.checkpoint.fp8_quantize import quantizable
    from quantscale.checkpoint.read import Checkpoint
    from quantscale.formats.fp8 import block_grid

    total = 0
    for info in Checkpoint(src).tensors.values():
        if quantizable(info):
            rows, cols = block_grid(info.shape, (128, 128))
            total += info.shape[0] * info.shape[1] + rows * cols * 4
        else:
            total += info.nbytes
    return total


def peers(enabled: bool) -> dict[str, tuple[Path, str]]:
    """Peer name -> (python of its venv, job source); peers that fail to install are skipped."""
    if not enabled:
        return {}
    found = {}
    specs = {
        "llmc-model-free": ("llmcompressor", ["llmcompressor==0.14.0.1"], LLMC_JOB),
        "llmc-oneshot": ("llmcompressor", ["llmcompressor==0.14.0.1"], LLMC_ONESHOT_JOB),
        "modelopt": (
            "modelopt",
            [
                "nvidia-modelopt==0.47.0",
                "transformers==5.24.0",
                "accelerate",
                "safetensors",
                "requests",
            ],
            MODELOPT_JOB,
        ),
    }
    for name, (venv_name, reqs, job) in specs.items():
        try:
            found[name] = (common.peer_python(venv_name, reqs), job)
        except Exception as err:  # noqa: BLE001 - report and go on without that peer
            print(f"{name}: venv not available ({err})")
    return found


def bench_input(
    label: str, src: Path, repeats: int, peer_jobs: dict, backends: list[str], convert: bool = False
) -> dict:
    """Floor, quantscale (one job per backend) and peers on one input, alternating; with
    `convert`, the input is FP8 and quantscale converts it to compressed-tensors."""
    from quantscale.checkpoint.read import Checkpoint

    ckpt = Checkpoint(src)
    in_bytes = ckpt.total_bytes()
    largest_shard = max((src / s).stat().st_size for s in ckpt.shards)
    out_bytes = in_bytes if convert else output_bytes(src)
    work = cache_dir() / "bench-work"
    me = [common.this_python(), str(Path(__file__).resolve())]

    def job(name: str, cmd: list[str]):
        out = work / name

        def run():
            shutil.rmtree(out, ignore_errors=True)
            result = common.run_job(name, [*cmd, str(src), str(out)])
            if result.returncode == 0:
                result.extra["output_bytes"] = common.dir_bytes(out)
            shutil.rmtree(out, ignore_errors=True)
            return result

        return run

    jobs = {"floor": job("floor", [*me, "--job", "floor", "--out-bytes", str(out_bytes)])}
    for i, backend in enumerate(["convert"] if convert else backends):
        name = "quantscale" if i == 0 else f"quantscale-{backend}"
        ours = ["--job", "convert"] if convert else ["--job", "ours", "--backend", backend]
        jobs[name] = job(name, [*me, *ours])
    for name, (python, source) in peer_jobs.items():
        jobs[name] = job(name, [str(python), "-c", source])
    print(f"\n{label}: {src} ({in_bytes / 1e9:.3f} GB in, {out_bytes / 1e9:.3f} GB out)")
    runs = common.alternate(jobs, repeats)
    return {
        "input": str(src),
        "input_bytes": in_bytes,
        "output_bytes": out_bytes,
        "largest_shard_bytes": largest_shard,
        "summary": {name: common.summarize(r) for name, r in runs.items()},
        "runs": {name: [vars(x) for x in r] for name, r in runs.items()},
    }


def table(results: dict) -> None:
    rows = []
    for label, res in results.items():
        s = res["summary"]
        floor = s["floor"].get("work_s_min")
        ours = s["quantscale"].get("work_s_min")
        for name, summ in s.items():
            if not summ.get("ok"):
                rows.append([label, name, "failed", "", "", "", "", ""])
                continue
            w = summ.get("work_s_min", summ["wall_min_s"])
            rows.append(
                [
                    label,
                    name,
                    f"{w:.2f}",
                    f"{summ['wall_min_s']:.2f}",
                    f"{res['input_bytes'] / w / 1e9:.2f}",
                    f"{summ['peak_rss_mb']:.0f}",
                    f"{w / floor:.2f}" if floor else "",
                    f"{w / ours:.2f}" if ours else "",
                ]
            )
    header = ["input", "job", "work s", "process s", "GB/s in", "peak RSS MB", "x floor", "x ours"]
    common.print_table(rows, header)


def checkpoint_rows(label: str, res: dict) -> list[dict]:
    """Rows of the combined table for one checkpoint conversion."""
    rows = []
    for name, summ in res["summary"].items():
        note = None
        if not summ.get("ok"):
            tails = [r["output_tail"] for r in res["runs"][name] if r["returncode"] != 0]
            note = (tails[-1].strip().splitlines() or [""])[-1][:100] if tails else None
        elif name.startswith("quantscale"):
            note = f"peak RSS = {summ['peak_rss_mb'] * 2**20 / res['largest_shard_bytes']:.2f}"
            note += " x largest shard"
            backends = {r["extra"].get("backend") for r in res["runs"][name] if r["extra"]}
            if any(backends):
                note += f", kernel {'/'.join(sorted(b for b in backends if b))}"
        rows.append(
            common.result_row(
                label if label.startswith("convert") else f"fp8-block {label}",
                "floor (read+write)" if name == "floor" else name,
                summ,
                output_bytes=summ.get("output_bytes_min"),
                bytes_in=res["input_bytes"],
                bytes_out=res["output_bytes"],
                ours="quantscale",
                note=note,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", choices=["floor", "ours", "convert"], help=argparse.SUPPRESS)
    p.add_argument("--out-bytes", type=int, help=argparse.SUPPRESS)
    p.add_argument(
        "--backend",
        default="auto",
        help="quantscale kernel: auto, cpp, eager, compile; a comma list runs one job each",
    )
    p.add_argument(
        "--size-gb",
        type=float,
        nargs="+",
        default=[1.0],
        help="sizes of the synthetic checkpoints (GB of bf16), e.g. --size-gb 1 2",
    )
    p.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="SmolLM2 only, 1 repeat")
    p.add_argument("--kernel", action="store_true", help="in-memory kernel benchmark only")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--json", "--results", dest="results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.job == "floor":
        job_floor(Path(args.paths[0]), Path(args.paths[1]), args.out_bytes)
        return 0
    if args.job == "ours":
        job_ours(Path(args.paths[0]), Path(args.paths[1]), args.backend)
        return 0
    if args.job == "convert":
        job_convert(Path(args.paths[0]), Path(args.paths[1]))
        return 0
    if args.kernel:
        import kernels

        return kernels.main(["--repeats", str(max(args.repeats, 3)), "--json", str(args.results)])
    payload = {"machine": common.machine(), "loadavg_start": common.loadavg(), "rows": []}
    from quantscale.formats import fp8_fast

    payload["cpp_vectorized"] = fp8_fast.native_vectorized()  # built once here, before jobs
    repeats = 1 if args.quick else args.repeats
    peer_jobs = peers(not args.no_peers)
    backends = args.backend.split(",")
    found = inputs(args.quick, args.size_gb)
    payload["checkpoints"] = {
        label: bench_input(label, src, repeats, peer_jobs, backends) for label, src in found.items()
    }
    for label, src in found.items():
        fp8 = fp8_input(label, src)
        payload["checkpoints"][f"convert {label}"] = bench_input(
            f"convert {label}", fp8, repeats, {}, [], convert=True
        )
    print()
    table(payload["checkpoints"])
    for label, res in payload["checkpoints"].items():
        payload["rows"] += checkpoint_rows(label, res)
    payload["loadavg_end"] = common.loadavg()
    common.write_results(args.results, payload)
    print(f"\nresults: {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
