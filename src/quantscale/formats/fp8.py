"""FP8 number formats (E4M3, E5M2) and block-wise FP8 quantization.

Block convention (DeepSeek-V3, HF fine-grained FP8): for each tile of `block` elements,
`scale_inv = amax / 448` is the *dequantization multiplier*, `q = fp8(W / scale_inv)` and
`W ~= q.float() * scale_inv`. Edge tiles use only their valid elements; all-zero tiles get
`scale_inv = 1` so that every scale is finite and their weights dequantize to exact zeros.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
E4M3_MAX = 448.0
E5M2_MAX = 57344.0
FP8_MAX = {E4M3: E4M3_MAX, E5M2: E5M2_MAX}
DEFAULT_BLOCK = (128, 128)


def fp8_max(dtype: torch.dtype = E4M3) -> float:
    """Largest finite magnitude of an FP8 dtype."""
    return FP8_MAX[dtype]


def cast_fp8(x: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """Round to the nearest FP8 value, saturating at the format's finite range (no NaN/inf)."""
    limit = FP8_MAX[dtype]
    return x.clamp(-limit, limit).to(dtype)


def all_codes(dtype: torch.dtype = E4M3) -> torch.Tensor:
    """All 256 bit patterns of an FP8 dtype as that dtype (index == code)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)


def block_grid(shape: Sequence[int], block: Sequence[int]) -> tuple[int, int]:
    """Scale grid [ceil(out/bh), ceil(in/bw)] of a 2-D weight (shape: its first two sizes)."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def tiles(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Zero-pad `w` to whole tiles and view it as [rows, bh, cols, bw]."""
    bh, bw = block
    rows, cols = block_grid(tuple(w.shape), block)
    pad_r, pad_c = rows * bh - w.shape[0], cols * bw - w.shape[1]
    if pad_r or pad_c:
        w = torch.nn.functional.pad(w, (0, pad_c, 0, pad_r))
    return w.reshape(rows, bh, cols, bw)


def block_amax(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> torch.Tensor:
    """Per-tile max |w| as float32 [ceil(out/bh), ceil(in/bw)]; padding never counts."""
    return tiles(w, block).abs().amax(dim=(1, 3)).float()


SCALE_FMTS = (None, "", "float32", "fp32", "ue8m0")  # plain amax/qmax (the first four) or ue8m0


def check_scale_fmt(scale_fmt: str | None) -> None:
    """Raise ValueError for a scale format other than float32 (None) or ue8m0."""
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"unknown scale_fmt {scale_fmt!r}; expected 'ue8m0' or none")


def scale_from_amax(
    amax: torch.Tensor, qmax: float = E4M3_MAX, scale_fmt: str | None = None
) -> torch.Tensor:
    """Dequantization multiplier amax/qmax (float32); 1.0 where amax is 0.

    `scale_fmt="ue8m0"` rounds each scale up to a power of two (DeepSeek V3.1), so that no
    value overflows the FP8 range.
    """
    check_scale_fmt(scale_fmt)
    amax = amax.float()
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    if scale_fmt == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def expand_block_scale(
    scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]
) -> torch.Tensor:
    """Repeat a [rows, cols] tile scale to an element-wise [out, in] tensor."""
    full = scale.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return full[: shape[0], : shape[1]]


def quantize_fp8_block(
    w: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    scale_fmt: str | None = None,
    dtype: torch.dtype = E4M3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight to (fp8 weight [out, in], float32 scale_inv [rows, cols])."""
    if w.ndim != 2:
        raise ValueError(f"block FP8 needs a 2-D weight, got shape {tuple(w.shape)}")
    scale = scale_from_amax(block_amax(w, block), FP8_MAX[dtype], scale_fmt)
    t = tiles(w.float(), block) / scale[:, None, :, None]
    q = cast_fp8(t, dtype).reshape(t.shape[0] * block[0], -1)
    return q[: w.shape[0], : w.shape[1]].contiguous(), scale


def dequantize_fp8_block(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Inverse of `quantize_fp8_block`: q.float() * scale_inv per tile, cast to `dtype`."""
    expected = block_grid(tuple(q.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale shape {tuple(scale_inv.shape)} does not match weight {tuple(q.shape)} "
            f"with block {block}: expected {expected}"
        )
    t = tiles(q.float(), block) * scale_inv.float()[:, None, :, None]
    w = t.reshape(t.shape[0] * block[0], -1)[: q.shape[0], : q.shape[1]]
    return w.to(dtype)
