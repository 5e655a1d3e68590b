"""Walk one FP8 block tile through quantize and dequantize, with the numbers at each step.

`explain_tile(weight, tile)` prints what block FP8 (E4M3, one scale per `block` tile) does to
the tile at block coordinates `tile` of a float weight: its amax, the scale and the name each
convention stores it under (the same number everywhere), a few elements as value -> scaled ->
E4M3 code (bits) -> dequantized, the tile's error, and what the common reciprocal mistake
(`scale = 1/weight_scale_inv`) would make of it. `explain_stored` does the dequantize half for
a tile of an FP8 weight read from a checkpoint, with its stored scale.
"""

from __future__ import annotations

import math
import os

import torch

from quantscale.checkpoint.layouts import CT_SCALE, HF_SCALE, NEURON_SCALE, scale_name_for
from quantscale.checkpoint.read import Checkpoint
from quantscale.errors import CheckpointError
from quantscale.formats.fp8 import (
    DEFAULT_BLOCK,
    E4M3,
    E4M3_MAX,
    block_grid,
    cast_fp8,
    scale_from_amax,
)


def example_weight(seed: int = 0) -> torch.Tensor:
    """A 128x128 weight like a trained layer's (std 0.02) with one outlier, reproducible."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(128, 128, generator=g) * 0.02
    w[17, 93] = 0.31
    return w.to(torch.bfloat16).float()


def _tile(w: torch.Tensor, tile: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    grid = block_grid(tuple(w.shape), block)
    if not (0 <= tile[0] < grid[0] and 0 <= tile[1] < grid[1]):
        raise CheckpointError(
            f"tile {tile} is outside the {grid[0]}x{grid[1]} grid of a {tuple(w.shape)} weight "
            f"with {block[0]}x{block[1]} blocks"
        )
    r, c = tile[0] * block[0], tile[1] * block[1]
    return w[r : r + block[0], c : c + block[1]].float()


def _bits(code: torch.Tensor) -> str:
    b = int(code.view(torch.uint8))
    s = f"{b:08b}"
    return f"0x{b:02x} {s[0]}|{s[1:5]}|{s[5:]}"


def _samples(t: torch.Tensor, count: int) -> list[tuple[int, int]]:
    """The amax element, the smallest nonzero one, then evenly spaced others."""
    flat = t.abs().reshape(-1)
    picks = [int(flat.argmax())]
    nonzero = torch.nonzero(flat > 0).flatten()
    if len(nonzero):
        picks.append(int(nonzero[flat[nonzero].argmin()]))
    step = max(1, flat.numel() // max(1, count))
    picks += [i for i in range(step // 2, flat.numel(), step) if i not in picks]
    cols = t.shape[1]
    return [(i // cols, i % cols) for i in picks[:count]]


def _walk(t: torch.Tensor, q: torch.Tensor, scale: float, count: int) -> list[str]:
    deq = q.float() * scale
    lines = [
        f"  {'element':>10} {'value':>12} {'value/scale':>12} {'E4M3 code':>17} "
        f"{'code value':>11} {'dequantized':>12} {'error':>10}"
    ]
    for r, c in _samples(t, count):
        v = float(t[r, c])
        lines.append(
            f"  {f'[{r},{c}]':>10} {v:12.6f} {v / scale:12.4f} {_bits(q[r, c]):>17} "
            f"{float(q[r, c].float()):11.4f} {float(deq[r, c]):12.6f} {float(deq[r, c]) - v:10.2e}"
        )
    return lines


def _errors(t: torch.Tensor, deq: torch.Tensor, q: torch.Tensor) -> list[str]:
    err = deq - t
    power, noise = float(t.pow(2).sum()), float(err.pow(2).sum())
    sqnr = 10 * math.log10(power / noise) if noise > 0 else math.inf
    flushed = int(((q.float() == 0) & (t != 0)).sum())
    return [
        f"  max |error| {float(err.abs().max()):.3e}, mean |error| {float(err.abs().mean()):.3e},"
        f" SQNR {sqnr:.1f} dB",
        f"  {int(torch.unique(q.view(torch.uint8)).numel())} distinct E4M3 codes of 256 used;"
        f" {flushed} nonzero values flushed to 0",
    ]


def _conventions(scale: float) -> list[str]:
    return [
        "  stored as (the same number, the dequantization multiplier, in every convention):",
        f"    HF / DeepSeek `{HF_SCALE}` = {scale:.6e}",
        f"    compressed-tensors `{CT_SCALE}` = {scale:.6e}",
        f"    AWS Neuron `.{NEURON_SCALE}` = {scale:.6e}",
    ]


def _reciprocal(t: torch.Tensor, q: torch.Tensor, scale: float) -> list[str]:
    wrong = q.float() / scale
    ratio = float(wrong.abs().max() / t.abs().max())
    return [
        "  the reciprocal mistake (treating the stored number as 1/scale): W = code / "
        f"{scale:.3e} gives amax {float(wrong.abs().max()):.4g} instead of "
        f"{float(t.abs().max()):.4g}, every weight x{ratio:.4g} (= 1/scale^2)",
    ]


def explain_tile(
    w: torch.Tensor,
    tile: tuple[int, int] = (0, 0),
    block: tuple[int, int] = DEFAULT_BLOCK,
    scale_fmt: str | None = None,
    samples: int = 5,
    name: str = "weight",
) -> str:
    """The quantize -> dequantize walk of one tile of float weight `w`, as text."""
    t = _tile(w, tile, block)
    amax = t.abs().max()
    scale = float(scale_from_amax(amax.reshape(1), E4M3_MAX, scale_fmt)[0])
    q = cast_fp8(t / scale, E4M3)
    pos = divmod(int(t.abs().argmax()), t.shape[1])
    rule = "2^ceil(log2(amax / 448)) (ue8m0)" if scale_fmt == "ue8m0" else "amax / 448"
    lines = [
        f"{name} {tuple(w.shape)}, tile {tile} = rows {tile[0] * block[0]}:"
        f"{tile[0] * block[0] + t.shape[0]}, cols {tile[1] * block[1]}:"
        f"{tile[1] * block[1] + t.shape[1]} ({t.numel()} values)",
        f"1. amax = {float(amax):.6f} at {list(pos)} of the tile",
        f"2. scale = {rule} = {scale:.6e}; E4M3's largest finite value is 448",
        *_conventions(scale),
        "3. quantize: code = round_to_E4M3(value / scale); dequantize: code x scale",
        *_walk(t, q, scale, samples),
        "4. the tile after the round trip:",
        *_errors(t, q.float() * scale, q),
        "5. why the stored number must not be inverted:",
        *_reciprocal(t, q, scale),
    ]
    return "\n".join(lines)


def explain_stored(
    path: str | os.PathLike, tensor: str, tile: tuple[int, int] = (0, 0), samples: int = 5
) -> str:
    """Explain tile `tile` of `tensor` in a checkpoint: an FP8 weight is dequantized with its
    stored scale; a float weight is walked through quantize and dequantize."""
    ckpt = Checkpoint(path)
    if tensor not in ckpt.tensors:
        raise CheckpointError(f"{path}: no tensor {tensor!r} (see `quantscale inspect`)")
    info = ckpt.tensors[tensor]
    if len(info.shape) != 2:
        raise CheckpointError(f"{path}: {tensor} has shape {info.shape}; expected a 2-D weight")
    if not info.dtype.startswith("F8"):
        return explain_tile(ckpt.get(tensor).float(), tile, samples=samples, name=tensor)
    scale_name = scale_name_for(ckpt.tensors, tensor)
    if scale_name is None:
        raise CheckpointError(f"{path}: {tensor} is FP8 but has no scale tensor beside it")
    q, scales = ckpt.get(tensor), ckpt.get(scale_name).float()
    block = _stored_block(tuple(q.shape), tuple(scales.shape))
    t = _tile(q, tile, block)
    scale = float(scales[tile])
    deq = t.float() * scale
    return "\n".join(
        [
            f"{tensor} {tuple(q.shape)} {info.dtype}, scale {scale_name} "
            f"{tuple(scales.shape)}, tile {tile} ({block[0]}x{block[1]} blocks)",
            f"1. stored scale = {scale:.6e}: dequantized = code x scale",
            *_walk(deq, t.to(q.dtype), scale, samples),
            f"2. dequantized tile amax {float(deq.abs().max()):.6f}"
            f" (<= 448 x scale = {448 * scale:.6f})",
            "3. why the stored number must not be inverted:",
            *_reciprocal(deq, t.to(q.dtype), scale),
        ]
    )


def _stored_block(shape: tuple[int, ...], grid: tuple[int, ...]) -> tuple[int, int]:
    """The tile size a weight's scale grid implies (128 when it is a ceil-sized grid)."""
    if len(grid) != 2:
        raise CheckpointError(f"scale grid {grid} is not 2-D; expected [rows, cols] of tiles")
    if block_grid(shape, DEFAULT_BLOCK) == tuple(grid):
        return DEFAULT_BLOCK
    return (-(-shape[0] // grid[0]), -(-shape[1] // grid[1]))
