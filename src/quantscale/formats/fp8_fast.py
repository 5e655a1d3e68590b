"""Fast FP8 block quantization, bit for bit equal to `formats.fp8.quantize_fp8_block`.

Three backends compute the same thing as the reference (per-tile amax, `scale_from_amax`,
`fp8(w / scale)` with saturation):
- "cpp": a C++ kernel (csrc/fp8_block.cpp; E4M3 from bf16/fp16/fp32; AVX-512 or AVX2) that
  reads each band of tiles from memory once for the amax (while quantizing the band before)
  and again from cache for the codes, on all intra-op threads (inputs under 16 MB, such as
  the 4 MB bands of a streaming conversion, on the calling thread). Built on first use with
  torch.utils.cpp_extension (needs a C++ compiler and ninja) into the cache, 8-12 s here, and
  loaded in milliseconds after that. If it cannot be built, "eager" runs, after one warning.
- "compile": one `torch.compile`d kernel per pass (dynamic shapes, so one compilation serves
  every weight shape); seconds to compile once per process.
- "eager": a few block-rows at a time (amax, scale, divide, cast) through reused float32
  buffers, so the temporaries stay in cache; 3-10x faster than the reference, no start-up cost.
`choose_backend` ("auto" in `quantize_checkpoint_fp8`) picks "cpp" when it is built already or
enough elements are coming to repay the build, then "compile" past `COMPILE_MIN_ELEMENTS`,
else "eager". Measured with `benchmarks/fp8_block.py --kernel` on a 4096x8192 bf16 weight:
cpp 8-12 GB/s, compiled 1.4, eager 0.9 on this (loaded, 2-core) machine.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from quantscale.formats.fp8 import (
    DEFAULT_BLOCK,
    E4M3,
    FP8_MAX,
    block_amax,
    block_grid,
    check_scale_fmt,
    scale_from_amax,
    tiles,
)

log = logging.getLogger(__name__)

# Below this many elements to quantize in one run, compiling costs more than it saves.
COMPILE_MIN_ELEMENTS = 1_500_000_000
# Below this many, building the C++ kernel (when not built yet) costs more than it saves.
NATIVE_BUILD_MIN_ELEMENTS = 2_000_000_000
BACKENDS = ("cpp", "compile", "eager")
_SOURCE = Path(__file__).with_name("csrc") / "fp8_block.cpp"
_NATIVE_NAME = "quantscale_fp8_block"
_CFLAGS = ("-O3", "-march=native", "-fopenmp")
_NATIVE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_STALE_LOCK_S = 600


def _native_build_dir() -> Path:
    """Cache folder for this source, these flags, this torch and this CPU (-march=native)."""
    from quantscale.cache import cache_dir

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    cpu = next((ln for ln in lines if ln.startswith("flags")), "")
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(_CFLAGS).encode(), torch.__version__.encode()):
        key.update(part)
    key.update(f"{platform.machine()} {cpu}".encode())
    return cache_dir() / "build" / f"fp8_block-{key.hexdigest()[:16]}"


def _put_ninja_on_path() -> None:
    """Make the `ninja` PyPI package's binary visible to torch when the venv is not activated."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = str(getattr(ninja, "BIN_DIR", ""))
    if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def _build_native(folder: Path) -> None:
    """Compile and load the kernel into `folder` (torch.utils.cpp_extension, needs ninja)."""
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed")
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"  # left behind by a build that was killed: load() would wait forever
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
        lock.unlink(missing_ok=True)
    cpp_extension.load(
        name=_NATIVE_NAME,
        sources=[str(_SOURCE)],
        build_directory=str(folder),
        extra_cflags=list(_CFLAGS),
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def native_built() -> bool:
    """Whether the C++ kernel is compiled already (loading it then takes milliseconds)."""
    return (_native_build_dir() / f"{_NATIVE_NAME}.so").exists()


Kernel = Callable[..., torch.Tensor]


@functools.cache
def _native() -> Kernel | None:
    """The C++ op, built once into the cache; None (after one warning) if it cannot be."""
    if os.environ.get("QUANTSCALE_NATIVE", "1") == "0":
        return None
    try:
        folder = _native_build_dir()
        library = folder / f"{_NATIVE_NAME}.so"
        if library.exists():
            torch.ops.load_library(str(library))
        else:
            _build_native(folder)
        return torch.ops.quantscale_fp8.block_quantize
    except Exception as err:  # noqa: BLE001 - any build or load failure means: use eager
        lines = str(err).strip().splitlines() or [type(err).__name__]
        reason = next((ln.strip() for ln in lines if "error:" in ln), lines[0])
        log.warning("C++ FP8 kernel unavailable (%s); using the eager torch path", reason)
        return None


def native_op(name: str) -> Kernel | None:
    """Another op of the C++ library (e.g. "nvfp4_quantize"), or None where it cannot be built."""
    return getattr(torch.ops.quantscale_fp8, name) if _native() is not None else None


def native_available() -> bool:
    """Whether the C++ backend works here (builds it on first call)."""
    return _native() is not None


def native_vectorized() -> bool:
    """Whether the C++ backend works and uses AVX-512 or AVX2 (plain C++ is no faster than
    "eager" here: 0.7 vs 0.7 GB/s; AVX2 5 GB/s, AVX-512 8-10 GB/s)."""
    return native_available() and torch.ops.quantscale_fp8.simd_lanes() > 1


_ROWS_PER_STEP = 2  # block-rows per eager step: 2 x 128 rows x in-features float32


def _amax_kernel(t4: torch.Tensor) -> torch.Tensor:
    return t4.abs().amax(dim=(1, 3)).float()


def _quant_kernel(
    t4: torch.Tensor, scale: torch.Tensor, qmax: float, dtype: torch.dtype
) -> torch.Tensor:
    return (t4.float() / scale[:, None, :, None]).clamp(-qmax, qmax).to(dtype)


@functools.cache
def _compiled() -> tuple[Kernel, Kernel] | None:
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
    """The fastest backend worth its start-up cost for `total_elements` (None: unlimited).

    "cpp" when it is built already, or when enough elements repay building it, and it is
    vectorized here; else "compile" when enough elements repay compiling and compile works;
    else "eager".
    """
    many = total_elements is None or total_elements >= NATIVE_BUILD_MIN_ELEMENTS
    if (native_built() or many) and native_vectorized():
        return "cpp"
    if total_elements is not None and total_elements < COMPILE_MIN_ELEMENTS:
        return "eager"
    return "compile" if compile_available() else "eager"


def _as_tiles(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """[rows, bh, cols, bw] view of `w` (no copy when the shape divides by the block)."""
    if w.shape[0] % block[0] == 0 and w.shape[1] % block[1] == 0 and w.is_contiguous():
        return w.view(w.shape[0] // block[0], block[0], w.shape[1] // block[1], block[1])
    return tiles(w, block)


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


def _cpp(
    op: Kernel, w: torch.Tensor, block: tuple[int, int], scale_fmt: str | None, group: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ kernel: E4M3 codes and scales. fp32 weights with ue8m0 take their scales from
    torch (its log2 decides scales a few ulps above a power of two; bf16/fp16 never have one)."""
    check_scale_fmt(scale_fmt)
    w = w.contiguous()
    scale = torch.empty(block_grid(tuple(w.shape), block))
    mode = 1 if scale_fmt == "ue8m0" else 0
    if mode == 1 and w.dtype == torch.float32:
        scale.copy_(scale_from_amax(block_amax(w, block), FP8_MAX[E4M3], scale_fmt))
        mode = 2
    q = op(w, scale, block[0], block[1], FP8_MAX[E4M3], mode, group)
    return q.view(E4M3), scale


def quantize_fp8_block_fast(
    w: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    scale_fmt: str | None = None,
    dtype: torch.dtype = E4M3,
    backend: str = "eager",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as `quantize_fp8_block`, faster: (fp8 [out, in], float32 scale [rows, cols]).

    `backend` "cpp" runs "eager" where the kernel is unavailable or does not apply (E5M2,
    other input dtypes).
    """
    if w.ndim != 2:
        raise ValueError(f"block FP8 needs a 2-D weight, got shape {tuple(w.shape)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    block = (int(block[0]), int(block[1]))
    if backend == "cpp" and dtype == E4M3 and w.dtype in _NATIVE_DTYPES:
        op = _native()
        if op is not None:
            return _cpp(op, w, block, scale_fmt)
    kernels = _compiled() if backend == "compile" else None
    qmax = FP8_MAX[dtype]
    t4 = _as_tiles(w, block)
    if kernels:
        scale = scale_from_amax(kernels[0](t4), qmax, scale_fmt)
        q = kernels[1](t4, scale, qmax, dtype)
    else:
        q, scale = _eager(t4, qmax, scale_fmt, dtype)
    rows, cols = block_grid(w.shape, block)
    q = q.reshape(rows * block[0], cols * block[1])
    if q.shape != w.shape:
        q = q[: w.shape[0], : w.shape[1]].contiguous()
    return q, scale
