"""Fast FP8 block quantization, bit for bit equal to `formats.fp8.quantize_fp8_block`.

Two backends compute the same thing as the reference (per-tile amax, `scale_from_amax`,
`fp8(w / scale)` with saturation):
- "compile": one `torch.compile`d kernel per pass (dynamic shapes, so one compilation serves
  every weight shape); about 1.5-3 s to compile once per process, then near memory speed.
- "eager": a few block-rows at a time (amax, scale, divide, cast) through reused float32
  buffers, so the temporaries stay in cache; 3-10x faster than the reference, no start-up cost.
"auto" picks "compile" when the caller says enough elements are coming to repay the compile
time (`COMPILE_MIN_ELEMENTS`) and torch.compile works here; otherwise "eager". Measured with
`benchmarks/fp8_block.py --kernel`.
"""

from __future__ import annotations

import functools
import math
import os
import threading

import torch

from quantscale.formats.fp8 import (
    DEFAULT_BLOCK,
    E4M3,
    FP8_MAX,
    _tiles,
    block_grid,
    scale_from_amax,
)

# Below this many elements to quantize in one run, compiling costs more than it saves.
COMPILE_MIN_ELEMENTS = 1_500_000_000
_ROWS_PER_STEP = 2  # block-rows per eager step: 2 x 128 rows x in-features float32


def _amax_kernel(t4: torch.Tensor) -> torch.Tensor:
    return t4.abs().amax(dim=(1, 3)).float()


def _quant_kernel(t4: torch.Tensor, scale: torch.Tensor, qmax: float, dtype: torch.dtype):
    return (t4.float() / scale[:, None, :, None]).clamp(-qmax, qmax).to(dtype)


@functools.cache
def _compiled() -> tuple | None:
    """The two compiled kernels, or None when torch.compile does not work on this machine."""
    if os.environ.get("QUANTSCALE_COMPILE", "1") == "0":
        return None
    try:
        amax = torch.compile(_amax_kernel, dynamic=True)
        quant = torch.compile(_quant_kernel, dynamic=True)
        probe = torch.ones(1, 2, 1, 2, dtype=torch.bfloat16)
        quant(probe, amax(probe), 448.0, E4M3)
    except Exception:  # noqa: BLE001 - any compiler failure means: use eager
        return None
    return amax, quant


def compile_available() -> bool:
    """Whether the compiled backend works here (compiles on first call)."""
    return _compiled() is not None


def choose_backend(total_elements: int | None = None) -> str:
    """ "compile" when `total_elements` repays the compile time and compile works, else "eager"."""
    if total_elements is not None and total_elements < COMPILE_MIN_ELEMENTS:
        return "eager"
    return "compile" if compile_available() else "eager"


def _as_tiles(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """[rows, bh, cols, bw] view of `w` (no copy when the shape divides by the block)."""
    if w.shape[0] % block[0] == 0 and w.shape[1] % block[1] == 0 and w.is_contiguous():
        return w.view(w.shape[0] // block[0], block[0], w.shape[1] // block[1], block[1])
    return _tiles(w, block)


_local = threading.local()


def _scratch(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 work buffers of `shape`, kept per thread: fresh ones would fault in new
    pages for every weight."""
    numel = math.prod(shape)
    held = getattr(_local, "buffers", None)
    if held is None or held[0].numel() < numel:
        held = (torch.empty(numel), torch.empty(numel))
        _local.buffers = held
    return held[0][:numel].view(shape), held[1][:numel].view(shape)


def _eager(
    t4: torch.Tensor, qmax: float, scale_fmt: str | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Amax, scale and cast a few block-rows at a time in reused float32 buffers (in cache)."""
    out = torch.empty(t4.shape, dtype=dtype)
    scale = torch.empty(t4.shape[0], t4.shape[2])
    step = _ROWS_PER_STEP
    buf, mag = _scratch((step, *t4.shape[1:]))
    for i in range(0, t4.shape[0], step):
        src = t4[i : i + step]
        x, a = buf[: src.shape[0]], mag[: src.shape[0]]
        x.copy_(src)
        s = scale_from_amax(torch.abs(x, out=a).amax(dim=(1, 3)), qmax, scale_fmt)
        scale[i : i + step] = s
        x.div_(s[:, None, :, None]).clamp_(-qmax, qmax)
        out[i : i + step].copy_(x)
    return out, scale


def quantize_fp8_block_fast(
    w: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    scale_fmt: str | None = None,
    dtype: torch.dtype = E4M3,
    backend: str = "eager",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as `quantize_fp8_block`, faster: (fp8 [out, in], float32 scale [rows, cols])."""
    if w.ndim != 2:
        raise ValueError(f"block FP8 needs a 2-D weight, got shape {tuple(w.shape)}")
    kernels = _compiled() if backend == "compile" else None
    if backend not in ("eager", "compile"):
        raise ValueError(f"unknown backend {backend!r}; expected 'eager' or 'compile'")
    qmax = FP8_MAX[dtype]
    t4 = _as_tiles(w, tuple(block))
    if kernels:
        scale = scale_from_amax(kernels[0](t4), qmax, scale_fmt)
        q = kernels[1](t4, scale, qmax, dtype)
    else:
        q, scale = _eager(t4, qmax, scale_fmt, dtype)
    rows, cols = block_grid(tuple(w.shape), tuple(block))
    q = q.reshape(rows * block[0], cols * block[1])
    if q.shape != w.shape:
        q = q[: w.shape[0], : w.shape[1]].contiguous()
    return q, scale
