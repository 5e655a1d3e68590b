"""Scheme-generic quantize / dequantize, used by RTN, GPTQ, calibration and fake-quant runtime.

Scale shapes per strategy (weights [out, in], activations [..., hidden]):
  tensor [1]; channel [out, 1] (weights) or [hidden] (activations); group / tensor_group
  [..., ceil(in/group_size)]; block [ceil(out/bh), ceil(in/bw)]; token [..., 1].
All scales are float32 *dequantization multipliers*: x ~= (q - zp) * scale. NVFP4
(tensor_group) adds `global_scale` in compressed-tensors' convention (448*6/amax, i.e.
1/scale_2): x ~= q * scale / global_scale, and `scale` holds exact E4M3 values. MX scales
hold exact powers of two. Zero ranges always give finite, non-zero scales.

GGUF k-quants (`args.superblock`, scheme.KQUANTS): `superblock_qparams` puts each
superblock's group scales on d * k (d float16, k integer in [1, 127] for Q6_K, [1, 63] for
Q4_K) and Q4_K's group offsets (zp - qmin) * scale on dmin * m (m in [0, 63]); the zero point
is then fractional, m * dmin / scale + qmin, and codes are round(x / scale + zp) as
compressed-tensors rounds (other schemes round x / scale and add their integer zero point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantscale.errors import QuantscaleError
from quantscale.formats.fp4 import (
    E2M1_MAX,
    e2m1_decode,
    e2m1_encode,
    e2m1_round,
    nvfp4_block_scale,
)
from quantscale.formats.fp4 import nvfp4_scale_2 as _nvfp4_scale_2
from quantscale.formats.fp8 import E4M3, E4M3_MAX, cast_fp8, expand_block_scale, tiles
from quantscale.formats.fp8 import scale_from_amax as _scale_from_amax
from quantscale.formats.intq import int_dtype, int_range
from quantscale.formats.mxfp4 import mx_scale_exponent, mx_scale_value
from quantscale.scheme import QuantArgs

WEIGHT, ACTIVATION = "weight", "activation"


@dataclass
class QParams:
    """Quantization parameters; see the module docstring for shapes and conventions."""

    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None


def nvfp4_global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """compressed-tensors' NVFP4 global scale 448*6/amax (= 1/scale_2), float32 [1]."""
    return (1.0 / _nvfp4_scale_2(amax)).reshape(1)


def _group(args: QuantArgs) -> int:
    """The group size of a group / tensor_group scheme (QuantArgs checks it is set)."""
    assert args.group_size is not None, f"strategy {args.strategy!r} without group_size"
    return args.group_size


def _block(args: QuantArgs) -> tuple[int, int]:
    """The (rows, cols) tile of a block scheme (QuantArgs checks it has two entries)."""
    assert args.block_structure is not None, "strategy 'block' without block_structure"
    rows, cols = args.block_structure
    return rows, cols


def to_rows(x: torch.Tensor, args: QuantArgs, role: str = WEIGHT) -> tuple[torch.Tensor, tuple]:
    """View `x` as [R, N]: one row per scale element, plus the scale shape (R elements).

    Groups and blocks that overhang the tensor are zero-padded (zeros never widen a range).
    """
    s = args.strategy
    if s == "tensor":
        return x.reshape(1, -1), (1,)
    if s == "token":
        return x.reshape(-1, x.shape[-1]), (*x.shape[:-1], 1)
    if s == "channel":
        if role == WEIGHT:
            return x.reshape(-1, x.shape[-1]), (*x.shape[:-1], 1)
        return x.reshape(-1, x.shape[-1]).t(), (x.shape[-1],)
    if s in ("group", "tensor_group"):
        g = _group(args)
        pad = -x.shape[-1] % g
        xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
        shape = (*x.shape[:-1], xp.shape[-1] // g)
        return xp.reshape(-1, g), shape
    if s == "block":
        if x.ndim != 2:
            raise ValueError(f"block strategy needs a 2-D weight, got shape {tuple(x.shape)}")
        t = tiles(x, _block(args))
        return t.permute(0, 2, 1, 3).reshape(t.shape[0] * t.shape[2], -1), (t.shape[0], t.shape[2])
    raise ValueError(f"unknown strategy {s!r}")


def reduce_minmax(
    x: torch.Tensor, args: QuantArgs, role: str = WEIGHT
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-strategy (min, max) of x as float32 tensors of the scale shape."""
    rows, shape = to_rows(x.detach().float(), args, role)
    return rows.amin(dim=1).reshape(shape), rows.amax(dim=1).reshape(shape)


def compute_qparams(
    args: QuantArgs,
    min_vals: torch.Tensor,
    max_vals: torch.Tensor,
    global_scale: torch.Tensor | None = None,
) -> QParams:
    """Scales (and zero points) from per-strategy ranges; the range always includes 0.

    NVFP4: `global_scale` defaults to 448*6/max|range| over all elements given.
    """
    mn = torch.clamp(min_vals.float(), max=0.0)
    mx = torch.clamp(max_vals.float(), min=0.0)
    amax = torch.maximum(-mn, mx)
    if args.type == "float":
        if args.num_bits == 8:
            return QParams(_scale_from_amax(amax, E4M3_MAX))
        if args.is_nvfp4:
            if global_scale is None:
                global_scale = nvfp4_global_scale(amax.max() if amax.numel() else 0.0)
            gs = global_scale.float().to(amax.device)
            return QParams(nvfp4_block_scale(amax, 1.0 / gs), global_scale=gs)
        if args.is_mx:
            return QParams(mx_scale_value(mx_scale_exponent(amax)))
        return QParams(_scale_from_amax(amax, E2M1_MAX))
    qmin, qmax = int_range(args.num_bits)
    if args.symmetric:
        return QParams(_scale_from_amax(amax, qmax))
    scale = (mx - mn) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.round(qmin - mn / scale).clamp(qmin, qmax)
    return QParams(scale, zero_point=zp)


SUPERBLOCK_SCALE_MAX = {True: 127, False: 63}  # symmetric: Q6_K's int8, else Q4_K's 6 bits


def snap_to_superblock(values: torch.Tensor, per: int, top: int, lowest: int) -> torch.Tensor:
    """values [..., G] (non-negative) as d * k per run of `per` groups: d = float16 of the
    run's max / top, k = round(value / d) clamped to [lowest, top]; float32, exact products.
    A run of zeros stays zero (with lowest 0)."""
    if values.shape[-1] % per:
        raise ValueError(f"{values.shape[-1]} groups do not fill superblocks of {per} groups")
    v = values.float().reshape(*values.shape[:-1], -1, per)
    tiny = torch.finfo(torch.float16).smallest_normal * 2.0**-10  # float16's least subnormal
    d = (v.amax(dim=-1, keepdim=True) / top).clamp(tiny, 65504.0).to(torch.float16).float()
    k = torch.round(v / d).clamp_(lowest, top)
    return (d * k).reshape(values.shape)


def superblock_qparams(args: QuantArgs, qp: QParams) -> QParams:
    """Group qparams [..., G] on the k-quant grid of `args.superblock` (module docstring)."""
    assert args.superblock is not None and args.group_size is not None, "k-quant args"
    per = args.superblock // args.group_size
    top = SUPERBLOCK_SCALE_MAX[args.symmetric]
    scale = snap_to_superblock(qp.scale, per, top, 1)
    if qp.zero_point is None:
        return QParams(scale)
    qmin = int_range(args.num_bits)[0]
    offset = snap_to_superblock((qp.zero_point.float() - qmin) * qp.scale.float(), per, top, 0)
    return QParams(scale, zero_point=offset / scale + qmin)


def _expand(t: torch.Tensor, x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Make a scale-shaped tensor broadcastable to x (x may be a column slice)."""
    if t.ndim == x.ndim and all(a in (b, 1) for a, b in zip(t.shape, x.shape, strict=True)):
        return t
    if args.strategy in ("group", "tensor_group"):
        return t.repeat_interleave(_group(args), dim=-1)[..., : x.shape[-1]]
    if args.strategy == "block":
        rows, cols = x.shape
        return expand_block_scale(t, (rows, cols), _block(args))
    return t


def _effective_scale(x: torch.Tensor, args: QuantArgs, qp: QParams) -> torch.Tensor:
    scale = _expand(qp.scale.float().to(x.device), x, args)
    if qp.global_scale is not None:
        scale = scale / qp.global_scale.float().to(x.device)
    return scale


def _zero_point(x: torch.Tensor, args: QuantArgs, qp: QParams) -> torch.Tensor | None:
    if qp.zero_point is None:
        return None
    return _expand(qp.zero_point.float().to(x.device), x, args)


def _to_grid(x: torch.Tensor, args: QuantArgs, qp: QParams) -> torch.Tensor:
    """x mapped onto the format's grid (float32): integers, E4M3 or E2M1 values. Returns a
    fresh tensor (in-place steps after the first: large activations allocate once)."""
    v = x.float() / _effective_scale(x, args, qp)
    if args.type == "float":
        return cast_fp8(v, E4M3).float() if args.num_bits == 8 else e2m1_round(v)
    zp = _zero_point(x, args, qp)
    qmin, qmax = int_range(args.num_bits)
    if zp is not None and args.superblock:  # fractional zero points: add, then round
        v.add_(zp).round_()
        return v.clamp_(qmin, qmax)
    v.round_()
    if zp is not None:
        v.add_(zp)
    return v.clamp_(qmin, qmax)


def quantize(x: torch.Tensor, args: QuantArgs, qp: QParams) -> torch.Tensor:
    """Quantized values: int8 (int16 above 8 bits), float8_e4m3fn, or E2M1 codes (uint8)."""
    grid = _to_grid(x, args, qp)
    if args.type == "int":
        return grid.to(int_dtype(args.num_bits))
    return grid.to(E4M3) if args.num_bits == 8 else e2m1_encode(grid)


def dequantize(
    q: torch.Tensor, args: QuantArgs, qp: QParams, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of `quantize`: (q - zp) * scale [/ global_scale] in `dtype`."""
    v = e2m1_decode(q) if args.type == "float" and args.num_bits == 4 else q.float()
    zp = _zero_point(q, args, qp)
    if zp is not None:
        v = v - zp
    return (v * _effective_scale(q, args, qp)).to(dtype)


def fake_quantize(x: torch.Tensor, args: QuantArgs, qp: QParams) -> torch.Tensor:
    """Quantize-dequantize in x's dtype. x may be a column slice of a weight with the matching
    slice of group scales (the slice must start at a group boundary), or scales already
    expanded to x's shape."""
    grid = _to_grid(x, args, qp)
    zp = _zero_point(x, args, qp)
    if zp is not None:
        grid.sub_(zp)
    return grid.mul_(_effective_scale(x, args, qp)).to(x.dtype)


def lsq_fake_quantize(x: torch.Tensor, args: QuantArgs, qp: QParams) -> torch.Tensor:
    """`fake_quantize` of an integer activation, differentiable in x and in `qp.scale` as
    LSQ (Esser et al. 2020) trains it: a straight-through round, the scale's gradient
    (round(v) - v inside the grid, its bounds outside) scaled by 1 / sqrt(N * Qp), N the
    elements per scale, Qp the grid's top. The zero point (asymmetric args) stays fixed."""
    if args.type != "int" or args.superblock:
        raise QuantscaleError(f"learned scales need integer activations, not {args.type}")
    qmin, qmax = int_range(args.num_bits)
    scale = _effective_scale(x, args, qp)
    g = 1.0 / math.sqrt(max(1, x.numel() // max(1, qp.scale.numel())) * qmax)
    scale = scale * g + (scale - scale * g).detach()
    zp = _zero_point(x, args, qp)
    v = x.float() / scale
    if zp is not None:
        v = v + zp.detach()
    v = v.clamp(qmin, qmax)
    v = v + (v.round() - v).detach()
    if zp is not None:
        v = v - zp.detach()
    return (v * scale).to(x.dtype)


def fake_quantize_dynamic(
    x: torch.Tensor, args: QuantArgs, global_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Fake-quantize an activation with scales computed from x itself (dynamic / token)."""
    mn, mx = reduce_minmax(x, args, ACTIVATION)
    return fake_quantize(x, args, compute_qparams(args, mn, mx, global_scale))
