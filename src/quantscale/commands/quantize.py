"""`quantscale quantize MODEL_DIR OUT --scheme SCHEME [--method rtn|gptq|awq|awq+gptq|autoround]
[--format F] [--learn-scales [--lsq-steps N] [--lsq-lr X]]`.

`--scheme fp8-block` without `--method` streams the checkpoint shard by shard (`SCHEMES`);
any other preset or recipe file (or a Mamba / Mamba2 model) loads the model, calibrates and
exports (`quantscale.orchestrator.quantize_checkpoint`). With `--stream` it does so layer by layer
from the shards, resumable from `--work-dir`, each layer on `--device`, the activations
between layers memory-mapped past `--max-memory` (`quantscale.streaming`). Launched by
`torchrun --nproc-per-node N -m quantscale quantize ...`, the ranks calibrate their shares of
the data and rank 0 writes the output (`quantscale.distributed`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from quantscale.algorithms.gptq import CLIP_GRID
from quantscale.commands.options import (
    add_calibration_options,
    add_dtype_option,
    add_overwrite_option,
    add_parallel_options,
    add_rotate_option,
    parallel_runner,
    print_written,
)
from quantscale.errors import QuantscaleError
from quantscale.orchestrator import WEIGHT_OBSERVERS

if TYPE_CHECKING:
    from quantscale.scheme import LearnScales
    from quantscale.streaming import StreamOptions


def parse_block(text: str) -> tuple[int, int]:
    """`128x128` (or `128`) -> (128, 128)."""
    parts = text.lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"block {text!r}: expected ROWSxCOLS, e.g. 128x128"
        ) from err
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) <= 0:
        raise argparse.ArgumentTypeError(f"block {text!r}: expected ROWSxCOLS, e.g. 128x128")
    return dims[0], dims[1]


def run_fp8_block(args: argparse.Namespace) -> int:
    """Streaming FP8 block quantization (no calibration)."""
    from quantscale.checkpoint.fp8_quantize import quantize_checkpoint_fp8

    runner = parallel_runner(args)
    out = quantize_checkpoint_fp8(
        args.model_dir,
        args.out,
        block=args.block or (128, 128),
        ignore=args.ignore,
        scale_fmt=args.scale_fmt,
        overwrite=args.overwrite,
        runner=runner,
    )
    print_written(runner, out, args.out)
    return 0


SCHEMES: dict[str, Callable[[argparse.Namespace], int]] = {"fp8-block": run_fp8_block}


def run(args: argparse.Namespace) -> int:
    """Streaming FP8 block without calibration; every other scheme/method (and every Mamba
    model) goes through `quantscale.orchestrator.quantize_checkpoint`."""
    handler = SCHEMES.get(args.scheme)
    if handler is not None and args.method is None:
        return handler(args)
    if args.block is not None:
        raise QuantscaleError(
            f"--block applies to the streamed --scheme fp8-block only (without --method); "
            f"--scheme {args.scheme} takes its blocks from the scheme (FP8_BLOCK: 128x128)"
        )
    if args.ray or args.ray_address or args.rank is not None or args.world_size is not None:
        raise QuantscaleError(
            "--ray / --rank / --world-size spread the streamed fp8-block scheme's shards; "
            f"--scheme {args.scheme}{' --method ' + args.method if args.method else ''} runs "
            "in one process"
        )
    from quantscale.orchestrator import GPTQOptions, quantize_checkpoint

    gptq = GPTQOptions(
        actorder=args.actorder,
        dampening_frac=args.dampening_frac,
        memory_budget=args.gptq_memory,
        group_size=args.group_size,
        hessian_dtype=args.hessian_dtype,
        expert_parallel=args.expert_parallel,
        autoround_steps=args.autoround_steps,
        autoround_lr=args.autoround_lr,
        weight_observer=args.weight_observer,
        clip_search=args.gptq_clip,
    )
    out = quantize_checkpoint(
        args.model_dir,
        args.out,
        args.scheme,
        method=args.method,
        fmt=args.format,
        calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len,
        calib_data=args.calib_data,
        calib_batch_size=args.calib_batch_size,
        dtype=args.dtype,
        gptq=gptq,
        calibrate_all_experts=args.calibrate_all_experts,
        true_sequential=args.true_sequential,
        overwrite=args.overwrite,
        stream=stream_options(args),
        kv_cache=args.kv_cache,
        importance=args.importance,
        rotate=args.rotate,
        ignore=args.ignore,
        learn_scales=learn_scales(args),
    )
    from quantscale import distributed

    if distributed.is_writer():
        print(f"wrote {out}")
    distributed.shutdown()
    return 0


def learn_scales(args: argparse.Namespace) -> LearnScales | None:
    """`--learn-scales` with `--lsq-steps` / `--lsq-lr` as `scheme.LearnScales`, or None;
    the step and rate options refused without `--learn-scales`."""
    from quantscale.scheme import LearnScales

    if not args.learn_scales:
        if args.lsq_steps is not None or args.lsq_lr is not None:
            raise QuantscaleError("--lsq-steps / --lsq-lr need --learn-scales")
        return None
    if args.lsq_steps is not None and args.lsq_steps < 0:
        raise QuantscaleError(f"--lsq-steps {args.lsq_steps}: expected >= 0")
    if args.lsq_lr is not None and not args.lsq_lr > 0:
        raise QuantscaleError(f"--lsq-lr {args.lsq_lr}: expected > 0")
    given = {"steps": args.lsq_steps, "lr": args.lsq_lr}
    return LearnScales(**{k: v for k, v in given.items() if v is not None})


def stream_options(args: argparse.Namespace) -> StreamOptions | bool:
    """`--stream` and its options as `streaming.StreamOptions`, or False; the options
    refused without `--stream`."""
    from quantscale.streaming import StreamOptions

    given = [f for f in ("work_dir", "device", "max_memory") if getattr(args, f) is not None]
    if not args.stream:
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise SystemExit(f"quantscale quantize: {flags} only apply with --stream")
        return False
    return StreamOptions(
        work_dir=args.work_dir, device=args.device or "auto", max_memory=args.max_memory
    )


def _factors(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(f) for f in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated shrink factors, e.g. 1,0.9,0.8"
        ) from err


def _size(text: str) -> int:
    from quantscale.calibration.boundary import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def add_stream_options(p: argparse.ArgumentParser) -> None:
    """`--stream`, `--work-dir`, `--device`, `--max-memory`."""
    p.add_argument(
        "--stream",
        action="store_true",
        help="quantize layer by layer from the shards (host memory: one layer plus the "
        "calibration activations), resumable; compressed-tensors output",
    )
    p.add_argument(
        "--work-dir",
        default=None,
        help="--stream: where finished layers and saved activations go (default OUT.partial); "
        "rerunning the same command resumes from it",
    )
    p.add_argument(
        "--device",
        default=None,
        help="--stream: auto (CUDA when present), cpu, cuda or cuda:N; each layer onloads there",
    )
    p.add_argument(
        "--max-memory",
        type=_size,
        default=None,
        help="--stream: bound on the calibration activations held in memory (e.g. 8GB); "
        "past it they are memory-mapped from the work dir",
    )


def add_calibrated_options(p: argparse.ArgumentParser) -> None:
    """The options of the calibrated quantize path."""
    from quantscale.export import EXPORTERS

    p.add_argument(
        "--method",
        choices=["rtn", "gptq", "awq", "awq+gptq", "autoround", "awq+autoround"],
        default=None,
        help="weight algorithm (gptq); awq: activation-aware scales and clipping, then RTN; "
        "awq+gptq: AWQ scales, then GPTQ rounding; autoround: rounding and clip ranges learned "
        "per layer by signed gradient descent (SignRound); awq+autoround: AWQ scales first",
    )
    p.add_argument(
        "--autoround-steps",
        type=int,
        default=200,
        help="autoround: sign-gradient steps per decoder layer, one calibration batch each",
    )
    p.add_argument(
        "--autoround-lr", type=float, default=None, help="autoround: learning rate (1 / steps)"
    )
    p.add_argument(
        "--learn-scales",
        action="store_true",
        help="learn the static activation scales (W8A8 / W4A8 static, Mamba Quamba) per "
        "decoder layer after calibration: LSQ, Adam on the layer's output MSE against the "
        "float layer",
    )
    p.add_argument(
        "--lsq-steps", type=int, default=None, help="--learn-scales: Adam steps per layer (100)"
    )
    p.add_argument(
        "--lsq-lr",
        type=float,
        default=None,
        help="--learn-scales: learning rate relative to each observer scale (0.01)",
    )
    p.add_argument(
        "--importance",
        metavar="STATS",
        default=None,
        help="importance-weighted RTN: clipping weighted by each input channel's mean x^2 from "
        "STATS (safetensors), collected on the calibration data and written there if absent",
    )
    p.add_argument(
        "--format",
        dest="format",
        choices=sorted(EXPORTERS),
        default=None,
        help="output format (default compressed-tensors; a Mamba model: the Quamba layout)",
    )
    add_calibration_options(p, batch_size=4)
    add_dtype_option(p, default="bfloat16")
    add_rotate_option(p)
    p.add_argument(
        "--actorder",
        choices=["group", "weight", "none"],
        default=None,
        help="GPTQ act-order (default: the scheme's, else 'weight'; 'none' turns it off)",
    )
    p.add_argument("--dampening-frac", type=float, default=0.01, help="GPTQ dampening")
    p.add_argument(
        "--hessian-dtype",
        choices=["float32", "float64"],
        default=None,
        help="GPTQ Hessian sums (default float32 in one process, float64 under torchrun; "
        "float64 in one process reproduces a torchrun run bit for bit, at twice the memory)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="weights per scale group of an int group scheme (W4A16 default 128; use one "
        "dividing in_features for vLLM / compressed-tensors, e.g. 64 for SmolLM2's 576)",
    )
    p.add_argument(
        "--gptq-clip",
        type=_factors,
        nargs="?",
        const=CLIP_GRID,
        default=None,
        help="GPTQ clipping search: solve with the weight ranges shrunk by each factor "
        f"(default grid {','.join(map(str, CLIP_GRID))}), each output row keeping the one of least "
        "output error on the calibration data (SmolLM2 W4A16 31.78 -> 27.73 perplexity, "
        "about 1.5x the GPTQ time)",
    )
    p.add_argument(
        "--weight-observer",
        choices=WEIGHT_OBSERVERS,
        default=None,
        help="weight scales (RTN, GPTQ, AutoRound): min-max (default) or mse, a clipping "
        "search per scale group (Gemma-3 W4A16 GPTQ 33.23 -> 31.57 perplexity)",
    )
    p.add_argument(
        "--kv-cache",
        choices=["fp8", "fp8-head"],
        default=None,
        help="static FP8 KV-cache scales calibrated on the same data, per tensor (fp8) or per KV "
        "head (fp8-head); compressed-tensors kv_cache_scheme (vLLM kv_cache_dtype=fp8)",
    )
    p.add_argument(
        "--gptq-memory",
        type=_size,
        default=None,
        help="GPTQ, MoE: expert Hessians held at once (e.g. 4GB; default 2GiB); past it each "
        "layer's experts are calibrated and solved in chunks, with the same weights",
    )
    p.add_argument(
        "--expert-parallel",
        action="store_true",
        help="GPTQ under torchrun, MoE: each expert's Hessians summed and solved on one rank "
        "(the experts shared out in index order); the others send it their routed inputs "
        "instead of Hessians (same weights)",
    )
    p.add_argument(
        "--no-calibrate-all-experts",
        dest="calibrate_all_experts",
        action="store_false",
        help="MoE: calibrate experts on routed tokens only (starved experts fall back to RTN)",
    )
    p.add_argument(
        "--true-sequential",
        dest="true_sequential",
        action="store_const",
        const=True,
        default=None,
        help="calibrate each layer's q/k/v, o, gate/up, down in turn, each on inputs from the "
        "quantized ones before it (default: the whole layer in one pass)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help="quantize a checkpoint (e.g. FP8 block-wise)")
    p.add_argument("model_dir", help="input checkpoint directory (bf16/fp16/fp32 safetensors)")
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument(
        "--scheme",
        default="fp8-block",
        help="fp8-block (streaming) or a preset (W4A16, NVFP4, W8A8, ...) or a recipe YAML/JSON; "
        "a Mamba / Mamba2 model: W8A8 (Quamba), W4A8 / W4A16 (Quamba2 int4 weights, "
        "--method rtn|gptq) or a MambaRecipe YAML; with --format compressed-tensors any "
        "preset on its Linear layers (in_proj, x_proj, out_proj), as an LLM's",
    )
    p.add_argument(
        "--block", type=parse_block, default=None, help="fp8-block's tile (128x128), e.g. 64x128"
    )
    p.add_argument(
        "--ignore",
        nargs="*",
        default=[],
        metavar="PAT",
        help="extra modules to leave unquantized (glob, name or re:regex)",
    )
    p.add_argument("--scale-fmt", choices=["ue8m0"], default=None, help="power-of-two scales")
    add_overwrite_option(p)
    add_parallel_options(p)
    add_calibrated_options(p)
    add_stream_options(p)
    p.set_defaults(func=run)
