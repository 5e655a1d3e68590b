"""Command-line options shared by several sub-commands, spelled one way everywhere.

Calibration: `--calib-samples N`, `--calib-seq-len L`, `--calib-data PATH`,
`--calib-batch-size B` and, where a command runs its calibration forwards in another dtype
or kernel, `--calib-dtype` / `--calib-kernel`. Model dtype: `--dtype`; replacing an output:
`--overwrite`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")
CALIB_DTYPE_NAMES = ("float32", "bfloat16")


def add_calibration_options(
    parser: argparse.ArgumentParser,
    *,
    samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
    calib_dtype: bool = False,
) -> None:
    """--calib-samples / --calib-seq-len / --calib-data / --calib-batch-size [/ --calib-dtype,
    --calib-kernel]."""
    parser.add_argument(
        "--calib-samples", type=int, default=samples, help=f"calibration windows ({samples})"
    )
    parser.add_argument(
        "--calib-seq-len", type=int, default=seq_len, help=f"tokens per window ({seq_len})"
    )
    parser.add_argument(
        "--calib-data",
        metavar="PATH",
        help="text file to calibrate on (default: the cached Wikipedia calibration split)",
    )
    parser.add_argument(
        "--calib-batch-size",
        type=int,
        default=batch_size,
        help=f"windows per calibration forward pass ({batch_size})",
    )
    if calib_dtype:
        parser.add_argument(
            "--calib-dtype",
            choices=CALIB_DTYPE_NAMES,
            default="float32",
            help="dtype of the calibration forwards' matmuls (bfloat16: ~4x faster GEMMs on "
            "AVX512-BF16 CPUs; the saved model keeps its dtype)",
        )
        parser.add_argument(
            "--calib-kernel",
            choices=("aten", "onednn"),
            default="aten",
            help="float32 matmul kernel of the calibration forwards (aten: F.linear's BLAS; "
            "onednn: ~2x on AMD EPYC, the same float32 arithmetic summed in another order, so "
            "scales may differ in the last bits)",
        )


def add_dtype_option(parser: argparse.ArgumentParser, default: str = "float32") -> None:
    """--dtype: the dtype the model is loaded in."""
    parser.add_argument(
        "--dtype", choices=DTYPE_NAMES, default=default, help=f"model dtype ({default})"
    )


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    """--overwrite: replace the output if it exists."""
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")


def add_parallel_options(parser: argparse.ArgumentParser) -> None:
    """--rank / --world-size / --ray / --ray-address: output shards spread over processes."""
    group = parser.add_argument_group("shard-parallel (one output shard per task)")
    group.add_argument(
        "--rank", type=int, default=None, help="this process's rank (default: torchrun's RANK)"
    )
    group.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="processes splitting the shards by bytes (default: torchrun's WORLD_SIZE); the "
        "last to finish commits OUT; rerunning redoes only missing shards",
    )
    group.add_argument(
        "--ray", action="store_true", help="one Ray task per shard (pip install quantscale[ray])"
    )
    group.add_argument(
        "--ray-address", default=None, metavar="ADDR", help="Ray cluster to join (implies --ray)"
    )


def parallel_runner(args: argparse.Namespace) -> Any:
    """The shard runner the --rank / --ray options (or torchrun's environment) ask for; None:
    one process."""
    from quantscale.checkpoint.parallel import runner_from_args

    return runner_from_args(args.rank, args.world_size, args.ray, args.ray_address)


def print_written(runner: Any, out: Any, target: str) -> None:
    """Per-shard lines of a parallel run, then `wrote OUT` (or that other ranks will)."""
    from pathlib import Path

    from quantscale.checkpoint.parallel import report

    print("\n".join(report(runner, out, Path(target))))


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `--dtype` / `--calib-dtype` name."""
    from quantscale.checkpoint.dequantize import parse_dtype

    return parse_dtype(name)


def calibration_tokens(tokenizer: Any, args: argparse.Namespace) -> Any:
    """[calib_samples, calib_seq_len] token ids from --calib-data or the Wikipedia split."""
    from quantscale.data.calibration import calibration_batches

    return calibration_batches(
        tokenizer, args.calib_samples, args.calib_seq_len, source=args.calib_data
    )


def add_rotate_option(parser: argparse.ArgumentParser) -> None:
    """--rotate: a rotation fused into the model before quantizing (algorithms.rotation)."""
    parser.add_argument(
        "--rotate",
        choices=["hadamard", "hadamard-smooth"],
        default=None,
        help="Hadamard rotations (QuaRot-style) before quantizing: R1 on the residual stream "
        "and R2 per head fused into the weights, R4 on the down_proj input applied online; "
        "hadamard-smooth: SmoothQuant (alpha 0.5) on up_proj -> down_proj before R4 (LLMs)",
    )
