"""Round-to-nearest (RTN) weight quantization, and the scale conventions GPTQ shares with it.

Both give the projections a runtime fuses (q/k/v, gate/up; `fused_stacks`) one NVFP4 global
scale / per-tensor scale, put symmetric int scales on the full code range (`full_range`: int4
amax/7.5), and store int and FP8 scales rounded to the scheme's scale dtype (default: the
weight's 16-bit dtype; `weight_scale_dtype`), the values runtimes hold.
"""

from __future__ import annotations

import torch

from quantscale.algorithms.base import register_algorithm
from quantscale.formats.intq import int_range
from quantscale.naming import fused_siblings
from quantscale.observers import get_observer
from quantscale.qdq import (
    WEIGHT,
    QParams,
    compute_qparams,
    fake_quantize,
    nvfp4_global_scale,
    reduce_minmax,
    superblock_qparams,
)
from quantscale.runtime.qlinear import QuantLinear
from quantscale.scheme import QuantArgs, declared_scale_dtype

_HALF = (torch.bfloat16, torch.float16)
_MINMAX = (None, "minmax", "static_minmax", "memoryless_minmax")


def observed_qparams(
    w: torch.Tensor, args: QuantArgs, global_scale: torch.Tensor | None = None, clip: float = 1.0
) -> QParams:
    """The weight's qparams from min-max ranges, or `args.observer` (e.g. 'mse') with
    `args.observer_kwargs`, the ranges shrunk by `clip`; NVFP4's `global_scale` defaults to
    the weight's own."""
    if args.is_nvfp4 and global_scale is None:
        global_scale = nvfp4_global_scale(w.detach().abs().amax() if w.numel() else 0.0)
    if args.observer in _MINMAX:
        mn, mx = reduce_minmax(w, args, WEIGHT)
    else:
        obs = get_observer(args.observer, args=args, role=WEIGHT, **args.observer_kwargs)
        obs.update(w)
        mn, mx = obs.min_max()
    if clip != 1.0:
        mn, mx = mn * clip, mx * clip
    return compute_qparams(args, mn, mx, global_scale)


def quantize_weight_rtn(w: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, QParams]:
    """Round-to-nearest weight quantization -> (w_hat in w's dtype, QParams) on the
    `observed_qparams`."""
    qp = observed_qparams(w, args)
    return fake_quantize(w, args, qp), qp


def weight_scale_dtype(args: QuantArgs, w_dtype: torch.dtype) -> torch.dtype | None:
    """dtype that int / FP8 weight scales are rounded to: the scheme's `scale_dtype`, else the
    weight's when 16-bit (transformers and vLLM hold scales in the model dtype); None for
    NVFP4 / MX (their scales are exact E4M3 / powers of two) and float32 weights."""
    if args.is_nvfp4 or args.is_mx:
        return None
    return declared_scale_dtype(args) or (w_dtype if w_dtype in _HALF else None)


def full_range(args: QuantArgs, qp: QParams) -> QParams:
    """Symmetric int scales that use the whole code range [-2^(b-1), 2^(b-1) - 1]: amax /
    (2^(b-1) - 1/2), as compressed-tensors and GPTQModel compute them (int4: amax / 7.5, a
    grid 7% finer than amax / 7; +amax clips by half a step, no more than rounding does)."""
    if args.type != "int" or not args.symmetric:
        return qp
    qmax = int_range(args.num_bits)[1]
    return QParams(qp.scale * (qmax / (qmax + 0.5)), qp.zero_point, qp.global_scale)


def stored_scales(qp: QParams, dtype: torch.dtype | None) -> QParams:
    """qp with its scale rounded to `dtype` (kept float32), as a runtime will hold it."""
    if dtype is None:
        return qp
    return QParams(qp.scale.to(dtype).float(), qp.zero_point, qp.global_scale)


def held_scales(args: QuantArgs, qp: QParams, dtype: torch.dtype | None) -> QParams:
    """qp as the format holds it: GGUF k-quants on their superblock grid
    (`qdq.superblock_qparams`), other schemes' scales rounded to `dtype` (`stored_scales`)."""
    if args.superblock:
        return superblock_qparams(args, qp)
    return stored_scales(qp, dtype)


def range_qparams(
    w: torch.Tensor, args: QuantArgs, global_scale: torch.Tensor | None = None, clip: float = 1.0
) -> QParams:
    """The `observed_qparams`, min-max symmetric int scales on the `full_range` (a searching
    observer such as 'mse' keeps the scale it found)."""
    qp = observed_qparams(w, args, global_scale, clip)
    return full_range(args, qp) if args.observer in _MINMAX else qp


def rtn_qparams(w: torch.Tensor, args: QuantArgs) -> QParams:
    """RTN's qparams: the `range_qparams`, held as the format holds them (`held_scales`)."""
    return held_scales(args, range_qparams(w, args), weight_scale_dtype(args, w.dtype))


def rtn_weight(w: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, QParams]:
    """Round-to-nearest (w_hat, qparams) on the `rtn_qparams`."""
    qp = rtn_qparams(w, args)
    return fake_quantize(w, args, qp), qp


def split_rows(qp: QParams, rows: list[int]) -> list[QParams]:
    """Per-member qparams of a row-stacked weight (per-tensor values are shared)."""

    def split(t: torch.Tensor | None) -> list[torch.Tensor | None]:
        if t is None:
            return [None] * len(rows)
        if t.ndim < 2 or t.shape[0] != sum(rows):
            return [t] * len(rows)
        return list(t.split(rows))

    scales, zeros = split(qp.scale), split(qp.zero_point)
    return [QParams(s, z, qp.global_scale) for s, z in zip(scales, zeros) if s is not None]


def fused_stacks(linears: dict[str, QuantLinear]) -> list[list[str]]:
    """Names grouped as runtimes fuse them (q/k/v, gate/up; same weight args and width),
    quantized as one row-stacked weight; FP8 block schemes stay apart (blocks span rows)."""
    out: list[list[str]] = []
    placed: set[str] = set()
    for name, ql in linears.items():
        args = ql.scheme.weights
        if name in placed or args is None:
            continue
        stack = [name]
        if args.strategy != "block":
            stack = [
                n
                for n in fused_siblings(name)
                if n in linears
                and n not in placed
                and linears[n].scheme.weights == args
                and linears[n].in_features == ql.in_features
            ] or [name]
        placed.update(stack)
        out.append(stack)
    return out


def rtn_quantize(ql: QuantLinear) -> None:
    """Round-to-nearest quantization of one QuantLinear's weight per its scheme."""
    if ql.scheme.weights is not None:
        ql.set_weight(*rtn_weight(ql.weight.detach(), ql.scheme.weights))


def stacked_weight(linears: dict[str, QuantLinear], stack: list[str]) -> torch.Tensor:
    """The row-stacked weight of the modules named in `stack` (one module: its weight)."""
    ws = [linears[n].weight.detach() for n in stack]
    return torch.cat(ws) if len(ws) > 1 else ws[0]


def set_stacked(
    linears: dict[str, QuantLinear],
    stack: list[str],
    w_hat: torch.Tensor,
    qp: QParams,
    g_idx: torch.Tensor | None = None,
) -> None:
    """Split a quantized `stacked_weight` and its qparams back onto the stack's modules."""
    rows = [linears[n].out_features for n in stack]
    for name, part, qp_part in zip(stack, w_hat.split(rows), split_rows(qp, rows)):
        linears[name].set_weight(part, qp_part, g_idx)


def rtn_quantize_fused(linears: dict[str, QuantLinear]) -> None:
    """RTN of every module, fused projections sharing global / per-tensor scales."""
    for stack in fused_stacks(linears):
        args = linears[stack[0]].scheme.weights
        assert args is not None  # fused_stacks skips modules without weight args
        set_stacked(linears, stack, *rtn_weight(stacked_weight(linears, stack), args))


@register_algorithm("rtn")
class RTN:
    """Round-to-nearest with the weight args' observer (min-max by default); no data."""

    needs_data = False
    true_sequential = False

    def start_layer(self, linears: dict[str, QuantLinear]) -> None:
        pass

    def finish_layer(self, linears: dict[str, QuantLinear]) -> None:
        rtn_quantize_fused(linears)
