"""GPTQ (Frantar et al., 2022) for every weight scheme: int4/int8 group or channel (sym/asym),
FP8 (tensor/channel/block), MXFP4 and NVFP4.

`gptq_quantize(w, H, args)` quantizes one weight [out, in] column by column in the order of
the Cholesky factor of the damped inverse Hessian H^-1 (H = 2/n sum x x^T over the layer's
calibration inputs), spreading each column's rounding error over the columns not yet
quantized. Columns are processed in lazy blocks of `block_size`: inside a block a rank-1
update per column touches only the block, and one matmul carries the block's errors to the
rest of the weight. The weight is held transposed ([in, out]) so that each column is a
contiguous vector.

Scales (min-max; symmetric int on the full code range, `rtn.full_range`): channel /
tensor scales (and NVFP4's per-tensor global scale) are fixed from the
whole weight before the loop; group scales (int groups, NVFP4's per-16 E4M3 block scales,
MX scales, FP8 128x128 blocks) are computed from the partly updated weight when the loop
reaches each group, exactly as the quantized model will see them. Act-order (`actorder`):
columns are visited by decreasing H diagonal; with "group" the groups follow that order and
`g_idx` maps each original column to its group, with "weight" the group scales are fixed
from the original weight first (no g_idx). "weight" is the default when the scheme sets no
act-order (`DEFAULT_ACTORDER`): on SmolLM2 (64 x 512 calibration) it lowered the held-out
perplexity from 34.70 to 30.34 (W4A16 g128), 30.80 to 28.80 (W4A16_ASYM g128) and 27.93 to
25.86 (NVFP4A16) against no act-order, whose group scales, taken from weights that earlier
GPTQ updates have spread, come out coarser.

GGUF k-quants (`args.superblock`): the two-level scales are fixed before the loop, with or
without act-order: min-max group qparams of the original weight put on the superblock grid
(`rtn.held_scales`), then every column is rounded onto that fixed grid.

Columns that never saw a non-zero input (H[i, i] == 0) are kept and quantized on their own
(reference GPTQ zeroes them, which would erase MoE experts that got no tokens).

`gptq_quantize_batch` runs the same solve on a batch of E weights [E, out, in] with their own
Hessians (MoE experts): one factorization per Hessian, the column loop over the whole batch, each
weight with its own act-order permutation (gathered per batch index), scales and NVFP4 global
scale; `gptq_quantize` is the batch of one, so both are the same code. The batched ops are the
per-weight ones on a batch (baddbmm / addcmul / batched LAPACK calls), and on the CPUs we tried
the results are bitwise equal to solving the weights one at a time.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from quantscale import distributed
from quantscale.algorithms import cholesky
from quantscale.algorithms.base import register_algorithm
from quantscale.algorithms.rtn import (
    held_scales,
    range_qparams,
    rtn_weight,
    set_stacked,
    stacked_weight,
    weight_scale_dtype,
)
from quantscale.checkpoint.dequantize import per_column_qparams
from quantscale.errors import QuantscaleError
from quantscale.formats.fp4 import pack_fp4, unpack_fp4
from quantscale.models.moe import expert_of
from quantscale.qdq import (
    QParams,
    _block,
    _expand,
    dequantize,
    fake_quantize,
    nvfp4_global_scale,
    quantize,
)
from quantscale.runtime.qlinear import QuantLinear
from quantscale.scheme import QuantArgs

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 128
DEFAULT_DAMPENING = 0.01
DEFAULT_ACTORDER = "weight"
# `--gptq-clip`: the ranges' shrink factors GPTQ tries, per output row the one of least loss
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8)
DEFAULT_MEMORY_BUDGET = 2 << 30  # bytes: experts' Hessians or batched-solve workspace at once
_DYNAMIC = ("group", "tensor_group", "block")


class HessianAccumulator:
    """Running sum of x^T x over a Linear's inputs; `hessian()` = 2/n * sum (float32).

    Each batch's product is computed in float32 (bfloat16 inputs: in bfloat16, 4-5x faster on
    CPUs with AVX512-BF16, one `chunk` of rows at a time, each product widened before it is
    summed, so the bf16 rounding averages out; `exact=True` or any other dtype: float32) and
    summed in `dtype`. float32 (one process's default) holds half the memory; float64 (the
    default under torchrun, `hessian_sum_dtype`): adding float32 products is exact unless their
    magnitudes span more than ~2^25, so the sum does not depend on the order of the batches
    and N ranks that each sum their share (`reduce`) give a float64 process's Hessian bit for
    bit.
    """

    def __init__(
        self,
        columns: int,
        device: torch.device | str = "cpu",
        exact: bool = False,
        chunk: int = 512,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.sum: torch.Tensor | None = torch.zeros(columns, columns, dtype=dtype, device=device)
        self.count, self.columns = 0, columns
        self.exact, self.chunk = exact, chunk
        self.owner: int | None = None  # expert parallelism: the rank holding the whole sum

    @classmethod
    def held_by(cls, owner: int, columns: int) -> HessianAccumulator:
        """The stand-in for a Hessian that rank `owner` sums alone (no memory here)."""
        acc = cls(0)
        acc.sum, acc.owner, acc.columns = None, owner, columns
        return acc

    def add(self, x: torch.Tensor) -> None:
        """Add inputs [..., columns] (every leading position is one sample)."""
        assert self.sum is not None, "add after reduce"
        rows = x.detach().reshape(-1, x.shape[-1])
        self.count += rows.shape[0]
        if rows.dtype == torch.bfloat16 and not self.exact:
            for part in rows.split(self.chunk):
                self._add_product(part)
            return
        if rows.dtype != torch.float32:
            rows = rows.float()
        if self.sum.dtype == torch.float32:
            self.sum.addmm_(rows.t(), rows)  # in place: no Hessian-sized product
        else:
            self._add_product(rows)

    def _add_product(self, rows: torch.Tensor) -> None:
        """sum += rows^T rows, computed in rows' dtype and widened, a band of columns at a
        time (temporaries of ~32 MB, not a Hessian-sized product)."""
        assert self.sum is not None
        width = max(1, (8 << 20) // self.sum.shape[0])
        for start in range(0, self.sum.shape[1], width):
            band = rows.t() @ rows[:, start : start + width]
            self.sum[:, start : start + width] += band.to(self.sum.dtype)

    def reduce(self, owner: int) -> None:
        """Sum the ranks' partial sums onto rank `owner` (`distributed.sum_to`: in rank
        order); the others drop theirs. The count is already the total (`_share_counts`)."""
        assert self.sum is not None, "reduce after dropping the sum"
        self.sum = distributed.sum_to(self.sum, owner)

    def hessian(self) -> torch.Tensor:
        assert self.sum is not None, "hessian of a rank that does not own it"
        return (self.sum * (2.0 / max(self.count, 1))).float()

    def take(self) -> torch.Tensor:
        """`hessian()` computed in place of the sum, which the accumulator then drops: the
        caller holds the only reference (a solve can overwrite it with its factor)."""
        assert self.sum is not None, "hessian of a rank that does not own it"
        total, self.sum = self.sum, None
        with torch.inference_mode():  # the sum may be an inference tensor (calibration's)
            return total.mul_(2.0 / max(self.count, 1)).float()


@dataclass
class GPTQResult:
    """Fake-quantized weight (original column order, input dtype), its qparams, g_idx."""

    weight: torch.Tensor
    qparams: QParams
    g_idx: torch.Tensor | None = None
    loss: float = 0.0
    info: dict = field(default_factory=dict)


def inverse_hessian_factor(h: torch.Tensor, dampening_frac: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*I)^-1, damp = frac * mean(diag H).

    Dampening grows tenfold (up to 4 times) if H is not positive definite.
    """
    return inverse_hessian_factors(h[None], dampening_frac)[0]


def inverse_hessian_factors(
    h: torch.Tensor, dampening_frac: float, owned: bool = False
) -> torch.Tensor:
    """`inverse_hessian_factor` of each Hessian of a batch [E, n, n]; a Hessian that is not
    positive definite retries with tenfold dampening. Each factor is computed in its
    Hessian's storage (`cholesky.upper_inverse_factor_`: one n x n matrix and n x 512
    panels), one matrix at a time. `owned`: h is the caller's to overwrite and is returned
    as the factors; otherwise the factors are a new tensor and h is left as it was."""
    diag = h.diagonal(dim1=-2, dim2=-1)
    diag = torch.where(diag == 0, torch.ones_like(diag), diag)  # a copy: h is overwritten
    base = diag.mean(-1).double()
    out = h if owned else h.clone()
    del h
    for e in range(out.shape[0]):
        _inverse_factor_(out[e], diag[e], base[e], dampening_frac)
    return out


def _inverse_factor_(a: torch.Tensor, diag: torch.Tensor, base: torch.Tensor, frac: float) -> None:
    """a [n, n] -> the upper factor of (a + damp I)^-1 in place, damp = frac * base, the
    diagonal taken from `diag` (a's own, zeros replaced by ones); tenfold dampening (up to
    4 times) while a + damp I is not positive definite."""
    for attempt in range(5):
        if attempt:
            cholesky.restore_upper(a)
        a.diagonal().copy_(diag).add_((base * frac).float())
        if cholesky.upper_inverse_factor_(a):
            return
        frac = max(frac * 10, 1e-6)
    raise QuantscaleError(
        f"GPTQ: the Hessian ({diag.shape[-1]} columns) is not positive definite even with "
        f"dampening_frac={frac / 10:g}; calibrate with more samples"
    )


def _segment_width(args: QuantArgs) -> int:
    width = args.block_structure[1] if args.block_structure else args.group_size
    assert width is not None, "dynamic GPTQ scales need groups or blocks"
    return width


def _gather_columns(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x [E, rows, cols] with each batch entry's columns reordered by its perm [E, cols]."""
    return x.gather(2, perm[:, None, :].expand(-1, x.shape[1], -1))


class _Scales:
    """Per-column effective scales / zero points of a batch of weights in processing order
    (transposed [E, col, row]); each weight has its own global scale and group qparams."""

    def __init__(
        self,
        args: QuantArgs,
        global_scales: list[torch.Tensor | None],
        static: bool,
        scale_dtype: torch.dtype | None = None,
        clip: float = 1.0,
    ) -> None:
        self.args, self.global_scales, self.static = args, global_scales, static
        self.scale_dtype, self.clip = scale_dtype, clip
        self.fixed: list[QParams] = []
        self.width = 0 if static else _segment_width(args)
        self.start = -1
        self.scale_t: torch.Tensor | None = None
        self.zp_t: torch.Tensor | None = None
        self.parts: list[list[QParams]] = [[] for _ in global_scales]
        self.cols = 0
        self.grouped = torch.empty(0)
        self.grouped_zp: torch.Tensor | None = None
        self.perm: torch.Tensor | None = None

    def qparams_of(self, w: torch.Tensor) -> list[QParams]:
        """Qparams of each weight of the batch w [E, rows, cols] (`rtn.range_qparams`: min-max,
        or the scheme's weight observer, e.g. 'mse'), on ranges shrunk by `self.clip`."""
        return [
            held_scales(self.args, range_qparams(we, self.args, gs, self.clip), self.scale_dtype)
            for we, gs in zip(w, self.global_scales)
        ]

    def qparams(self) -> list[QParams]:
        """Each weight's qparams: the static ones, or its groups' in group order."""
        return self.fixed if self.static else [self.assembled(e) for e in range(len(self.parts))]

    def _expanded(self, w: torch.Tensor, qps: list[QParams], zero: bool) -> torch.Tensor:
        parts = []
        for we, qp in zip(w, qps):
            t = qp.zero_point if zero else qp.scale
            assert t is not None
            full = _expand(t.float(), we, self.args).expand(we.shape)
            if not zero and qp.global_scale is not None:
                full = full / qp.global_scale.float()
            parts.append(full)
        return torch.stack(parts) if len(parts) > 1 else parts[0][None]

    def set(self, start: int, w: torch.Tensor, qps: list[QParams]) -> None:
        """Expand the qparams of a group segment w [E, rows, width] to its shape, transposed."""
        scale = self._expanded(w, qps, zero=False)
        zp = self._expanded(w, qps, zero=True) if qps[0].zero_point is not None else None
        self.start = start
        self.scale_t = scale.transpose(1, 2).contiguous()
        self.zp_t = zp.transpose(1, 2).contiguous() if zp is not None else None

    def set_static(self, shape: torch.Size, qps: list[QParams], perm: torch.Tensor | None) -> None:
        """Hold the fixed qparams of weights [E, rows, cols] per column group, unexpanded;
        `column` expands a chunk of columns (in perm's order) at a time, never the whole
        weight."""
        self.fixed = qps
        rows, self.cols = shape[1], shape[2]
        self.width = _segment_width(self.args) if self.args.strategy in _DYNAMIC else self.cols
        scales = [self._grouped(qp.scale, qp.global_scale, rows) for qp in qps]
        self.grouped = torch.stack(scales)
        zps = [qp.zero_point for qp in qps if qp.zero_point is not None]
        self.grouped_zp = None
        if zps:
            self.grouped_zp = torch.stack([self._grouped(z, None, rows) for z in zps])
        self.perm = perm

    def _grouped(
        self, t: torch.Tensor, global_scale: torch.Tensor | None, rows: int
    ) -> torch.Tensor:
        """A scale (or zero point) as [rows, column groups] (`self.width` columns per group)."""
        t = t.float()
        if self.args.strategy == "block":
            t = t.repeat_interleave(_block(self.args)[0], dim=0)[:rows]
        elif self.args.strategy not in _DYNAMIC:  # tensor / channel: one group of all columns
            t = t.reshape(-1, 1).expand(rows, 1)
        return t / global_scale.float() if global_scale is not None else t

    def _static_chunk(self, p: int, chunk: int = 128) -> None:
        """Expand the fixed qparams of processing positions [p, p + chunk) (transposed)."""
        end = min(p + chunk, self.cols)
        if self.perm is not None:
            idx = self.perm[:, p:end]
        else:
            idx = torch.arange(p, end, device=self.grouped.device).expand(self.grouped.shape[0], -1)
        index = (idx // self.width)[:, None, :].expand(-1, self.grouped.shape[1], -1)
        self.start = p
        self.scale_t = self.grouped.gather(2, index).transpose(1, 2).contiguous()
        zp = self.grouped_zp
        self.zp_t = zp.gather(2, index).transpose(1, 2).contiguous() if zp is not None else None

    def column(self, p: int, wt: torch.Tensor) -> QParams:
        """QParams ([E, rows]) for processing position p; opens new groups."""
        if self.static and (self.scale_t is None or not 0 <= p - self.start < len(self.scale_t[0])):
            self._static_chunk(p)
        if not self.static and p % self.width == 0:
            seg = wt[:, p : p + self.width].transpose(1, 2)
            qps = self.qparams_of(seg)
            for parts, qp in zip(self.parts, qps):
                parts.append(qp)
            self.set(p, seg, qps)
        j = p - self.start
        assert self.scale_t is not None, "set() or a new group comes first"
        return QParams(self.scale_t[:, j], self.zp_t[:, j] if self.zp_t is not None else None)

    def assembled(self, e: int) -> QParams:
        """Weight e's dynamic group qparams concatenated in group order."""
        parts = self.parts[e]
        zps = [qp.zero_point for qp in parts if qp.zero_point is not None]
        return QParams(
            torch.cat([qp.scale for qp in parts], dim=-1),
            torch.cat(zps, dim=-1) if zps else None,
            self.global_scales[e],
        )


def _check_actorder(args: QuantArgs, actorder: str | None) -> None:
    if actorder == "group" and args.strategy != "group":
        raise QuantscaleError(
            f"GPTQ actorder 'group' needs strategy 'group' (g_idx), got {args.strategy!r}; "
            "use actorder 'weight' instead"
        )
    if actorder == "group" and args.superblock:
        raise QuantscaleError(
            f"GPTQ actorder 'group': GGUF {args.kquant} blocks hold no g_idx; use actorder "
            "'weight' (the default) or none"
        )


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor | list[torch.Tensor],
    args: QuantArgs,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dampening_frac: float = DEFAULT_DAMPENING,
    actorder: str | None = "args",
    global_scale: torch.Tensor | None = None,
    scale_dtype: torch.dtype | None | str = "weight",
    clip_search: tuple[float, ...] | None = None,
) -> GPTQResult:
    """GPTQ-quantize weight w [out, in] with Hessian [in, in]; see the module docstring.

    A Hessian passed in a one-element list is handed over: the solve overwrites it with its
    factor (`[acc.take()]`: the solve then holds one Hessian-sized matrix, not two).

    `actorder` "args" takes `args.actorder`, else `DEFAULT_ACTORDER`; None turns it off.
    NVFP4's `global_scale` (448*6/amax) defaults to the whole weight's; pass a shared one for
    fused q/k/v or gate/up projections.
    `scale_dtype` "weight": `rtn.weight_scale_dtype` (int and FP8 scales rounded to the
    scheme's scale dtype or w's 16-bit dtype, so that runtimes which hold scales in the model
    dtype dequantize to exactly the weights returned here).
    `clip_search` (e.g. `CLIP_GRID`): the ranges shrunk by each factor, each output row solved
    on the one of least GPTQ loss (`_clip_search`); None: the observer's ranges.
    """
    h = hessian[0] if isinstance(hessian, list) else hessian
    if w.ndim != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise QuantscaleError(
            f"GPTQ: weight {tuple(w.shape)} and Hessian {tuple(h.shape)} do not match"
        )
    del h
    given: torch.Tensor | list[torch.Tensor]
    given = [hessian.pop()[None]] if isinstance(hessian, list) else hessian[None]
    del hessian
    batch = gptq_quantize_batch(
        w[None],
        given,
        args,
        block_size=block_size,
        dampening_frac=dampening_frac,
        actorder=actorder,
        global_scales=[global_scale],
        scale_dtype=scale_dtype,
        clip_search=clip_search,
    )
    return batch[0]


def gptq_quantize_batch(
    w: torch.Tensor,
    hessian: torch.Tensor | list[torch.Tensor],
    args: QuantArgs,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dampening_frac: float = DEFAULT_DAMPENING,
    actorder: str | None = "args",
    global_scales: list[torch.Tensor | None] | None = None,
    scale_dtype: torch.dtype | None | str = "weight",
    clip_search: tuple[float, ...] | None = None,
) -> list[GPTQResult]:
    """`gptq_quantize` of E independent weights w [E, out, in] with their Hessians
    [E, in, in] at once (MoE experts): the factors, and the column loop on the whole
    batch, each weight with its own act-order permutation, scales and NVFP4 global scale.
    Every operation is the per-weight one on a batch, so each result equals `gptq_quantize`'s
    up to the rounding of the batched matmul kernels (bitwise on the CPUs we tried). A
    one-element list hands the Hessians over, as in `gptq_quantize`. `clip_search`: the
    clipping search (`_clip_search`)."""
    shape = (hessian[0] if isinstance(hessian, list) else hessian).shape
    if w.ndim != 3 or shape != (w.shape[0], w.shape[2], w.shape[2]):
        raise QuantscaleError(
            f"GPTQ: weights {tuple(w.shape)} and Hessians {tuple(shape)} do not match"
        )
    if actorder == "args":
        actorder = args.actorder or DEFAULT_ACTORDER
    _check_actorder(args, actorder)
    gs: list[torch.Tensor | None] = list(global_scales or [None] * w.shape[0])
    if len(gs) != w.shape[0]:
        raise QuantscaleError(f"GPTQ: {len(gs)} global scales for {w.shape[0]} weights")
    perm, upper = _ordered_factors(hessian, actorder, dampening_frac)
    wf = w.detach().float()
    if args.is_nvfp4:
        gs = [g if g is not None else nvfp4_global_scale(we.abs().amax()) for g, we in zip(gs, wf)]
    # k-quant superblocks span 8-16 groups: their scales are fixed from the whole weight first
    static = args.strategy not in _DYNAMIC or actorder == "weight" or bool(args.superblock)
    dtype = weight_scale_dtype(args, w.dtype) if scale_dtype == "weight" else scale_dtype
    assert not isinstance(dtype, str), f"scale_dtype {scale_dtype!r}: a torch dtype or 'weight'"
    if clip_search is not None:
        make = functools.partial(_Scales, args, gs, static, dtype)
        wt, qps, losses = _clip_search(wf, perm, upper, args, make, block_size, clip_search)
    else:
        scales = _Scales(args, gs, static, dtype)
        if static:
            scales.set_static(wf.shape, scales.qparams_of(wf), perm)
        del wf  # wt is made from w: one float32 copy of the weight at a time
        wt = _transposed(w.detach(), perm)
        losses = _column_loop(wt, upper, args, scales, block_size).sum(1).tolist()
        qps = scales.qparams()
    del upper
    q = wt.transpose(1, 2)
    g_idx: list[torch.Tensor | None] = [None] * w.shape[0]
    if perm is not None:
        inv = torch.argsort(perm, dim=-1)
        q = _gather_columns(q, inv)
        del wt
        if actorder == "group":
            groups = torch.arange(w.shape[2], device=w.device) // _segment_width(args)
            g_idx = [groups[i].to(torch.int32) for i in inv]
    out = []
    for e in range(w.shape[0]):
        out.append(GPTQResult(q[e].to(w.dtype).contiguous(), qps[e], g_idx[e], losses[e]))
    return out


def _clip_search(
    wf: torch.Tensor,
    perm: torch.Tensor | None,
    upper: torch.Tensor,
    args: QuantArgs,
    make: Callable[[float], _Scales],
    block_size: int,
    clip: tuple[float, ...],
) -> tuple[torch.Tensor, list[QParams], list[float]]:
    """GPTQ with the ranges (static, or each group's as it opens) shrunk by each factor of
    `clip` (1.0: the observer's); each output row keeps the factor of least GPTQ loss (rows
    are independent, so the result is one GPTQ solve on the chosen scales). Scales that span
    rows (tensor, block) take one factor per weight. -> (wt [E, cols, rows], qparams,
    losses)."""
    per_row = args.strategy in ("channel", "group", "tensor_group")
    best_wt = torch.empty(0)
    best_qp: list[QParams] = []
    best: torch.Tensor | None = None  # loss [E, rows], or [E, 1] when chosen per weight
    for factor in clip:
        scales = make(factor)
        if scales.static:
            scales.set_static(wf.shape, scales.qparams_of(wf), perm)
        wt = _transposed(wf, perm)
        loss = _column_loop(wt, upper, args, scales, block_size)
        qps = scales.qparams()
        if not per_row:
            loss = loss.sum(1, keepdim=True)
        if best is None:
            best_wt, best_qp, best = wt, qps, loss
            continue
        lower = loss < best
        best = torch.where(lower, loss, best)
        better = lower.expand(-1, wt.shape[2])  # [E, rows]
        for e, rows in enumerate(better):  # in place: two weight-sized copies at most
            idx = rows.nonzero().squeeze(1)
            best_wt[e][:, idx] = wt[e][:, idx]
        best_qp = [_rows_where(b, new, old) for b, new, old in zip(better, qps, best_qp)]
        del wt
    assert best is not None, "an empty clip grid"
    return best_wt, best_qp, best.sum(1).tolist()


def _rows_where(better: torch.Tensor, new: QParams, old: QParams) -> QParams:
    """qparams taking `new`'s rows where `better` [rows], else `old`'s; a scale of one row
    (per-tensor, chosen per weight) takes `new` when any row is better."""

    def pick(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        if a is None or b is None:
            return a
        if a.ndim == 0 or a.shape[0] != better.shape[0]:
            return a if bool(better.any()) else b
        mask = better.reshape(-1, *([1] * (a.ndim - 1)))
        return torch.where(mask, a, b)

    scale = pick(new.scale, old.scale)
    assert scale is not None
    return QParams(scale, pick(new.zero_point, old.zero_point), new.global_scale)


def _transposed(w: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """A new float32 [E, cols, rows] tensor: each weight of w [E, rows, cols] transposed, its
    columns (rows of the result) in perm's order."""
    out = torch.empty(w.shape[0], w.shape[2], w.shape[1], device=w.device)
    for we, oe, p in zip(w, out, perm if perm is not None else [None] * w.shape[0]):
        oe.copy_(we.t() if p is None else we.t().index_select(0, p))
    return out


def _ordered_factors(
    hessian: torch.Tensor | list[torch.Tensor], actorder: str | None, dampening_frac: float
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(act-order permutations [E, n] or None, factors [E, n, n] of the permuted Hessians); a
    Hessian shared by the whole batch (`expand`ed: stride 0) is permuted and factored once.
    A one-element list hands the Hessian over: it is overwritten with its factor."""
    with torch.inference_mode():  # factors are only read; the Hessian may be an inference tensor
        return _factors(hessian, actorder, dampening_frac)


def _factors(
    hessian: torch.Tensor | list[torch.Tensor], actorder: str | None, dampening_frac: float
) -> tuple[torch.Tensor | None, torch.Tensor]:
    handed_over = isinstance(hessian, list)
    h = hessian.pop() if isinstance(hessian, list) else hessian
    del hessian
    batch = h.shape[0]
    shared = batch > 1 and h.stride(0) == 0
    h = (h[:1] if shared else h).float()
    owned = handed_over and not shared
    perm = None
    if actorder is not None:
        perm = torch.argsort(h.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True)
        box = [_permute_(h, perm) if owned else _permuted(h, perm)]
        owned = True
        del h
    else:
        box = [h]
        del h
    upper = inverse_hessian_factors(box.pop(), dampening_frac, owned)
    if shared:
        upper = upper.expand(batch, -1, -1)
        perm = perm.expand(batch, -1) if perm is not None else None
    return perm, upper


def _permuted(h: torch.Tensor, perm: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """h[e][perm[e]][:, perm[e]] for each Hessian of h [E, n, n], a chunk of rows at a time
    (one new [E, n, n] tensor, no full-size temporaries)."""
    out = torch.empty_like(h)
    for he, p, oe in zip(h, perm, out):
        for start in range(0, p.shape[0], chunk):
            oe[start : start + chunk] = he.index_select(0, p[start : start + chunk])[:, p]
    return out


def _permute_(h: torch.Tensor, perm: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """`_permuted` in h's own storage: columns a chunk of rows at a time, then rows along
    the permutation's cycles (one row held aside per cycle). Returns h."""
    n = h.shape[-1]
    for he, p in zip(h, perm):
        for start in range(0, n, chunk):
            he[start : start + chunk] = he[start : start + chunk].index_select(1, p)
        order = p.tolist()  # row i of the result is row order[i] of the input
        seen = [False] * n
        for first in range(n):
            if seen[first] or order[first] == first:
                continue
            held, i = he[first].clone(), first
            while True:
                seen[i] = True
                j = order[i]
                if j == first:
                    he[i] = held
                    break
                he[i] = he[j]
                i = j
    return h


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T) = 2/n sum ||(W - W_hat) x||^2 over the inputs."""
    d = w_hat.float() - w.float()
    return float(((d @ hessian.float()) * d).sum())


def _column_loop(
    wt: torch.Tensor, upper: torch.Tensor, args: QuantArgs, scales: _Scales, block_size: int
) -> torch.Tensor:
    """The GPTQ loop over a batch wt [E, cols, rows], which ends holding the fake-quantized
    weights (each column is replaced once quantized) -> each row's loss [E, rows] (float64).

    loss = sum of (w - q)^2 / (2 U_ii^2) over columns (U: the factor), GPTQ's own estimate:
    the row's output error tr(dW H dW^T) / 2 on the damped Hessian (rows are independent).
    """
    cols = wt.shape[1]
    losses = torch.zeros(wt.shape[0], wt.shape[2], dtype=torch.float64, device=wt.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = wt[:, i1:i2]
        err1 = torch.empty_like(w1)
        hinv1 = upper[:, i1:i2, i1:i2]
        diag = hinv1.diagonal(dim1=1, dim2=2)
        for i in range(i2 - i1):
            p = i1 + i
            col = w1[:, i]
            q = fake_quantize(col, args, scales.column(p, wt))
            err = (col - q).div_(diag[:, i, None])
            col.copy_(q)
            err1[:, i] = err
            if i + 1 < i2 - i1:
                w1[:, i + 1 :].addcmul_(hinv1[:, i, i + 1 :, None], err[:, None, :], value=-1.0)
        losses += err1.pow(2).sum(1).double() / 2
        if i2 < cols:
            wt[:, i2:].baddbmm_(upper[:, i1:i2, i2:].transpose(1, 2), err1, alpha=-1.0)
    return losses


# ---------------------------------------------------------------- layer-wise algorithm


class _InputTracker:
    """Forward pre-hooks that accumulate each Linear's Hessian once per distinct input.

    Linears fed the very same input tensor (q/k/v, gate/up, MoE experts' gate/up when all
    get every token) share one accumulator: the first of them to run is the group's leader.
    """

    def __init__(
        self,
        exact: bool = False,
        dtype: torch.dtype = torch.float32,
        expert_owner: Mapping[str, int] | None = None,
    ) -> None:
        self.exact, self.dtype = exact, dtype
        self.acc: dict[str, HessianAccumulator] = {}
        self.leader: dict[str, str] = {}
        # expert parallelism: the rank that owns each expert Linear; the inputs of another
        # rank's expert are kept (`stash`, one tensor a batch) and sent to it at the end
        self.owner = dict(expert_owner or {})
        self.stash: dict[str, list[torch.Tensor]] = {}
        self.summed: set[str] = set()  # another rank's experts summed here after all
        self._rank = distributed.context().rank
        self._recent: list[tuple[weakref.ref, str]] = []
        self._handles: list = []

    def attach(self, linears: Mapping[str, nn.Module]) -> None:
        for name, module in linears.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._recent.clear()

    def _hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            self._recent = [(r, n) for r, n in self._recent if r() is not None][-8:]
            found = next((n for r, n in self._recent if r() is x), None)
            leader = found or name
            if self.leader.setdefault(name, leader) != leader:
                raise QuantscaleError(
                    f"GPTQ: {name} shared its input with {self.leader[name]} in one batch "
                    f"but not in another ({leader}); cannot share a Hessian"
                )
            if found is not None and found in self.stash and not self._one_expert(name, found):
                self._accumulate_stash(found)  # an input shared across experts: data parallel
            if leader == name:
                if self._elsewhere(name):
                    self._keep(name, x.detach())
                else:
                    self._accumulator(name, x.shape[-1], x.device).add(x)
                self._recent.append((weakref.ref(x), name))

        return hook

    def _accumulator(self, name: str, columns: int, device: torch.device) -> HessianAccumulator:
        if name not in self.acc:
            self.acc[name] = HessianAccumulator(columns, device, self.exact, dtype=self.dtype)
        return self.acc[name]

    def _elsewhere(self, name: str) -> bool:
        """An expert Linear another rank owns, whose inputs this rank has not summed."""
        owner = self.owner.get(name)
        return owner is not None and owner != self._rank and name not in self.acc

    def _one_expert(self, a: str, b: str) -> bool:
        return expert_of(a) == expert_of(b)

    def _keep(self, name: str, x: torch.Tensor) -> None:
        """Keep another rank's expert input, until the kept inputs would outweigh its
        Hessian: then sum them here (that expert's Hessian is then reduced as any other)."""
        kept = self.stash.setdefault(name, [])
        kept.append(x)
        columns = x.shape[-1]
        if sum(t.numel() * t.element_size() for t in kept) > columns**2 * self.dtype.itemsize:
            self._accumulate_stash(name)

    def _accumulate_stash(self, name: str) -> None:
        """Sum the kept inputs of `name` here after all (its input is shared beyond one
        expert, or outweighs its Hessian: reduced across ranks as any other Hessian)."""
        self.summed.add(name)
        kept = self.stash.pop(name)
        with torch.inference_mode():  # the sums calibration made are inference tensors
            acc = self._accumulator(name, kept[0].shape[-1], kept[0].device)
            for x in kept:
                acc.add(x)

    def groups(self, names: list[str]) -> dict[str, list[str]]:
        """Leader -> member names (in `names` order); linears never run lead themselves."""
        out: dict[str, list[str]] = {}
        for name in names:
            out.setdefault(self.leader.get(name, name), []).append(name)
        return out


@register_algorithm("gptq")
@dataclass
class GPTQ:
    """The "gptq" `algorithms.base.WeightAlgorithm` (driven by `quantize.quantize_model`).

    Linears that share an input are quantized together as one stacked weight (same Hessian,
    rows independent), which also gives fused q/k/v and gate/up one shared NVFP4 global
    scale / per-tensor scale, as vLLM expects. Linears that saw fewer than `min_tokens`
    calibration tokens (MoE experts the router never picked) fall back to RTN; `report`
    lists every such case. `true_sequential` (off by default: on SmolLM2 it did not lower the
    perplexity and cost 1.3-1.8x the time; see `quantize.quantize_model`) quantizes o_proj on
    inputs from the quantized q/k/v, down_proj on those from gate/up.

    MoE experts (`models.moe.expert_of`) whose stacks have equal shapes and weight args are
    solved as batches (`gptq_quantize_batch`) of `expert_batch` experts, None: as many as
    fit in `memory_budget` bytes of solve workspace; each batch's Hessians are freed once it
    is solved. The experts' gate/up stack that all-expert calibration gives (one shared
    Hessian) is solved per expert the same way, its rows unchanged (`_per_expert`). Results
    equal the one-group-at-a-time solves (bitwise on the CPUs we tried; tests/test_moe.py).
    `passes` splits a layer into calibration passes that each hold the Hessians of at most
    that many experts; `algorithms.layer` drives them (one pass when the experts fit).
    With several ranks (`quantscale.distributed`) `finish_layer` first makes the ranks agree
    on the shared inputs and token counts, then gives each solve (a group or an expert batch,
    the same ones as one process) to a rank balanced by cost, sums its Hessians onto that
    rank in rank order, solves there and broadcasts the quantized weights and qparams.
    """

    needs_data = True
    true_sequential = False
    block_size: int = DEFAULT_BLOCK_SIZE
    dampening_frac: float = DEFAULT_DAMPENING
    actorder: str | None = "args"
    min_tokens: int = 1
    exact_hessian: bool = False
    expert_batch: int | None = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    hessian_dtype: str | None = None
    expert_parallel: bool = False
    clip_search: tuple[float, ...] | None = None  # the factors of `_clip_search`
    report: list[dict] = field(default_factory=list)
    _tracker: _InputTracker | None = field(default=None, repr=False)

    def start_layer(self, linears: dict[str, QuantLinear]) -> None:
        owners = _expert_owners(linears) if self.expert_parallel else None
        dtype = hessian_sum_dtype(self.hessian_dtype)
        self._tracker = _InputTracker(self.exact_hessian, dtype, owners)
        self._tracker.attach(linears)

    def finish_layer(self, linears: dict[str, QuantLinear]) -> None:
        tracker, self._tracker = self._tracker, None
        assert tracker is not None, "finish_layer without start_layer"
        tracker.detach()
        names = [n for n, m in linears.items() if m.scheme.weights is not None]
        if distributed.active():
            _share_counts(tracker, linears)
        else:
            _log_held(tracker, 0)
        units: list[_Unit] = []  # with several ranks: solved together at the end
        submit = units.append if distributed.active() else _Unit.run
        batches = _ExpertBatches()
        for leader, members in _widest_first(tracker.groups(names), tracker.acc):
            acc = tracker.acc.pop(leader, None)
            for part in _split_by_args(members, linears):
                if self._batchable(part, acc):
                    assert acc is not None
                    for stack in _stacks(part, linears):
                        for sub, global_scale in _per_expert(stack, linears):
                            batches.add(sub, linears, acc, global_scale)
                else:
                    hand_over = len(members) == len(part) and not distributed.active()
                    solve = functools.partial(self._quantize_group, part, linears, acc, hand_over)
                    submit(_Unit(solve, part, self._needing(acc), _cost(part, linears)))
        self._submit_batches(batches, linears, submit)
        if units:
            self._solve_distributed(units, linears)

    def _submit_batches(
        self,
        batches: _ExpertBatches,
        linears: dict[str, QuantLinear],
        submit: Callable[[_Unit], None],
    ) -> None:
        """The experts' solves in batches of `expert_batch` (or as many as fit), each batch's
        Hessians held by one rank."""
        for bucket in batches.pop_all():
            by_owner = _by_owner(bucket)
            bucket.clear()  # each batch's Hessians are freed once it is solved
            while by_owner:
                jobs = by_owner.pop(0)
                size = self.expert_batch or self._fitting(_solve_bytes(jobs[0].stack, linears))
                while jobs:
                    chunk, jobs = jobs[:size], jobs[size:]
                    solve = functools.partial(self._quantize_experts, chunk, linears)
                    members = [n for job in chunk for n in job.stack]
                    accs = [a for job in chunk for a in self._needing(job.acc)]
                    submit(_Unit(solve, members, accs, _cost(members, linears)))
                    del solve, accs  # a batch's Hessians are freed once it is solved

    def _needing(self, acc: HessianAccumulator | None) -> list[HessianAccumulator]:
        """[acc] when the solve reads its Hessian (GPTQ, not the RTN fallback)."""
        return [acc] if acc is not None and acc.count >= self.min_tokens else []

    def _solve_distributed(self, units: list[_Unit], linears: dict[str, QuantLinear]) -> None:
        """Each solve on the rank `distributed.owners` gives it, its Hessians summed there
        first, its weights broadcast from there after."""
        owner = distributed.owners([u.cost for u in units], [_held_by(u) for u in units])
        _reduce_hessians(units, owner)
        replies: list[list[dict]] = []
        for unit, rank in zip(units, owner):
            start = len(self.report)
            if rank == distributed.context().rank:
                unit.run()
            replies.append(self.report[start:])
            del self.report[start:]
        for unit, rank, report in zip(units, owner, replies):
            mine = rank == distributed.context().rank
            state = None
            if mine:
                state = {f"{n}.{k}": t for n in unit.names for k, t in _weight_state(n, linears[n])}
            got, report = distributed.broadcast_tensors(state, rank, report)
            if not mine:
                for name in unit.names:
                    _install_weight_state(linears[name], name, got)
            self.report.extend(report)

    def passes(self, linears: dict[str, QuantLinear]) -> list[dict[str, QuantLinear]]:
        """A layer's Linears as calibration passes (`start_layer`, the layer's forwards,
        `finish_layer` each) holding the Hessians of at most `expert_batch` experts each (None:
        as many as fit in `memory_budget`): the experts in chunks, then the other Linears,
        whose quantization would change the experts' inputs (the experts' changes no other
        Linear's input). One pass when the layer has no experts or all its experts fit.
        Routed calibration gives the same Hessians as one pass; with all-expert calibration
        a pass's experts share the gate/up Hessian, and NVFP4's gate/up global scale is then
        the pass's, not the layer's."""
        experts: dict[tuple[str, int], dict[str, QuantLinear]] = {}
        rest: dict[str, QuantLinear] = {}
        for name, ql in linears.items():
            owner = expert_of(name)
            (experts.setdefault(owner, {}) if owner else rest)[name] = ql
        if not experts:
            return [dict(linears)]
        first = next(iter(experts.values()))
        itemsize = hessian_sum_dtype(self.hessian_dtype).itemsize
        size = self.expert_batch or self._fitting(_hessian_bytes(first, itemsize))
        groups = list(experts.values())
        if size >= len(groups):
            return [dict(linears)]
        out = [
            {n: q for group in groups[i : i + size] for n, q in group.items()}
            for i in range(0, len(groups), size)
        ]
        return out + [rest] if rest else out

    def _fitting(self, per_expert: int) -> int:
        return max(1, self.memory_budget // max(per_expert, 1))

    def _batchable(self, names: list[str], acc: HessianAccumulator | None) -> bool:
        """Experts' projections with a Hessian from enough tokens (not RTN)."""
        enough = acc is not None and acc.count >= self.min_tokens
        return enough and all(expert_of(n) is not None for n in names)

    def _quantize_group(
        self,
        names: list[str],
        linears: dict[str, QuantLinear],
        acc: HessianAccumulator | None,
        hand_over: bool = False,
    ) -> None:
        """GPTQ (or RTN without enough tokens) of the Linears sharing `acc`; `hand_over`: no
        other solve reads acc, so its last stack takes the Hessian (overwritten with its factor)."""
        args = linears[names[0]].scheme.weights
        assert args is not None, "finish_layer passes quantized weights only"
        tokens = acc.count if acc is not None else 0
        stacks = _stacks(names, linears)
        for stack in stacks:
            w = stacked_weight(linears, stack)
            rtn = acc is None or tokens < self.min_tokens
            if rtn:
                w_hat, qp = rtn_weight(w, args)
                res = GPTQResult(w_hat, qp)
                log.warning("%s: %d calibration tokens; RTN instead of GPTQ", stack, tokens)
            else:
                assert acc is not None
                last = hand_over and stack is stacks[-1]
                hessian = [acc.take()] if last else acc.hessian()
                res = gptq_quantize(w, hessian, args, **self._options())
                del hessian
            set_stacked(linears, stack, res.weight, res.qparams, res.g_idx)
            self._report(stack, tokens, "rtn" if rtn else "gptq", res.loss, 1)

    def _quantize_experts(self, jobs: list[_Job], linears: dict[str, QuantLinear]) -> None:
        """One `gptq_quantize_batch` over equal-shaped expert stacks (a Hessian they all
        share is passed once, expanded)."""
        args = linears[jobs[0].stack[0]].scheme.weights
        assert args is not None, "finish_layer passes quantized weights only"
        w = torch.stack([stacked_weight(linears, job.stack) for job in jobs])
        first = jobs[0].acc
        if all(job.acc is first for job in jobs):
            h = first.hessian()[None].expand(len(jobs), -1, -1)
        else:
            h = torch.stack([job.acc.hessian() for job in jobs])
        gs = [job.global_scale for job in jobs]
        results = gptq_quantize_batch(w, h, args, global_scales=gs, **self._options())
        del w, h
        for job, res in zip(jobs, results):
            set_stacked(linears, job.stack, res.weight, res.qparams, res.g_idx)
            self._report(job.stack, job.acc.count, "gptq", res.loss, len(jobs))

    def _options(self) -> dict:
        return {
            "block_size": self.block_size,
            "dampening_frac": self.dampening_frac,
            "actorder": self.actorder,
            "clip_search": self.clip_search,
        }

    def _report(self, stack: list[str], tokens: int, method: str, loss: float, batch: int) -> None:
        self.report.append(
            {"modules": stack, "tokens": tokens, "method": method, "loss": loss, "batch": batch}
        )


def _widest_first(
    groups: dict[str, list[str]], accs: Mapping[str, HessianAccumulator]
) -> list[tuple[str, list[str]]]:
    """A layer's groups with the widest Hessian first (a down_proj before the rest): each
    solve is independent of the others, and the largest Hessian is then freed before the
    stacked gate/up weights are copied for theirs. Equal widths keep their order."""

    def width(item: tuple[str, list[str]]) -> int:
        acc = accs.get(item[0])
        return -(acc.columns if acc is not None else 0)

    return sorted(groups.items(), key=width)


def _stacks(names: list[str], linears: dict[str, QuantLinear]) -> list[list[str]]:
    """The row-stacked weights of a group (FP8 blocks span rows: one module each)."""
    args = linears[names[0]].scheme.weights
    return [names] if args is None or args.strategy != "block" else [[n] for n in names]


def _per_expert(
    stack: list[str], linears: dict[str, QuantLinear]
) -> list[tuple[list[str], torch.Tensor | None]]:
    """A stack of several experts' projections (gate/up of experts calibrated on all tokens:
    one shared Hessian) split per expert, with the whole stack's NVFP4 global scale, so that
    each part solves exactly as its rows of the stack would (GPTQ rows are independent given
    H); per-tensor scales span the stack, so a 'tensor' stack stays whole."""
    owners: dict[tuple[str, int] | None, list[str]] = {}
    for name in stack:
        owners.setdefault(expert_of(name), []).append(name)
    args = linears[stack[0]].scheme.weights
    if len(owners) == 1 or args is None or args.strategy == "tensor":
        return [(stack, None)]
    global_scale = None
    if args.is_nvfp4:
        amax = torch.stack([linears[n].weight.detach().abs().amax() for n in stack]).amax()
        global_scale = nvfp4_global_scale(amax.float())
    return [(part, global_scale) for part in owners.values()]


def _solve_bytes(stack: list[str], linears: dict[str, QuantLinear]) -> int:
    """Workspace of one stack in a batched solve: ~8 float32 [in, in] (Hessian, factors,
    permuted copies) and ~8 [out, in] (weight, transposed, result, scales)."""
    cols = linears[stack[0]].in_features
    rows = sum(linears[n].out_features for n in stack)
    return 4 * 8 * (cols * cols + rows * cols)


def _hessian_bytes(expert: dict[str, QuantLinear], itemsize: int) -> int:
    """One expert's Hessians: one [in, in] sum of `itemsize` bytes per entry per distinct
    input width (gate and up share their input)."""
    return sum(itemsize * n * n for n in {ql.in_features for ql in expert.values()})


HESSIAN_SUM_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def hessian_sum_dtype(name: str | None) -> torch.dtype:
    """The dtype Hessians are summed in: `name`, else float64 under torchrun (ranks' partial
    sums add up to one float64 process's bit for bit) and float32 in one process (half the
    memory: a 14336-wide down_proj holds 0.8 GB instead of 1.6 GB)."""
    if name is None:
        return torch.float64 if distributed.active() else torch.float32
    if name not in HESSIAN_SUM_DTYPES:
        raise QuantscaleError(f"Hessian sum dtype {name!r}; expected float32 or float64")
    return HESSIAN_SUM_DTYPES[name]


@dataclass
class _Job:
    """One expert stack of a batched solve: its names, Hessian and NVFP4 global scale."""

    stack: list[str]
    acc: HessianAccumulator
    global_scale: torch.Tensor | None = None


class _ExpertBatches:
    """Expert stacks (with their Hessians) bucketed by weight shape, dtype and args."""

    def __init__(self) -> None:
        self._buckets: list[tuple[tuple, QuantArgs | None, list[_Job]]] = []

    def add(
        self,
        stack: list[str],
        linears: dict[str, QuantLinear],
        acc: HessianAccumulator,
        global_scale: torch.Tensor | None = None,
    ) -> None:
        first = linears[stack[0]]
        rows = sum(linears[n].out_features for n in stack)
        key = (rows, first.in_features, first.weight.dtype, first.weight.device)
        args = first.scheme.weights
        job = _Job(stack, acc, global_scale)
        for k, a, jobs in self._buckets:
            if k == key and a == args:
                jobs.append(job)
                return
        self._buckets.append((key, args, [job]))

    def pop_all(self) -> Iterator[list[_Job]]:
        """Each bucket's jobs, dropped from here as they are handed out."""
        while self._buckets:
            yield self._buckets.pop(0)[2]


def _split_by_args(names: list[str], linears: dict[str, QuantLinear]) -> list[list[str]]:
    parts: list[tuple[QuantArgs | None, list[str]]] = []
    for name in names:
        args = linears[name].scheme.weights
        for a, members in parts:
            if a == args:
                members.append(name)
                break
        else:
            parts.append((args, [name]))
    return [members for _, members in parts]


@dataclass
class _Unit:
    """One solve of `finish_layer` (a group or a batch of experts): the call, the modules it
    sets, the Hessians it reads and its cost (for `distributed.owners`)."""

    solve: Callable[[], None] | None
    names: list[str]
    accs: list[HessianAccumulator]
    cost: float

    def run(self) -> None:
        """Solve, then drop the references to the Hessians (freed as each unit is done)."""
        assert self.solve is not None, "a unit solves once"
        self.solve()
        self.solve, self.accs = None, []


def _cost(names: list[str], linears: dict[str, QuantLinear]) -> float:
    """A solve's work: columns^2 x rows (the column loop) + columns^3 (the factorization)."""
    return float(
        sum(
            q.in_features**2 * (q.out_features + q.in_features) for q in (linears[n] for n in names)
        )
    )


_STATE = ("weight_scale", "weight_zero_point", "weight_global_scale", "weight_g_idx")


def _weight_state(name: str, ql: QuantLinear) -> list[tuple[str, torch.Tensor]]:
    """A quantized module's weight and weight qparams (what `set_weight` installs): the
    weight as its codes (one byte each, two 4-bit codes a byte) when they decode to it bit
    for bit, else the weight itself."""
    codes = _lossless_codes(name, ql)
    out = [("weight_codes", codes) if codes is not None else ("weight", ql.weight.detach())]
    return out + [(k, b) for k in _STATE if (b := ql._buffers.get(k)) is not None]


def _lossless_codes(name: str, ql: QuantLinear) -> torch.Tensor | None:
    args, qp = ql.scheme.weights, ql.weight_qparams()
    if args is None or qp is None:
        raise QuantscaleError(f"{name}: the solving rank has no quantized weight to send")
    w = ql.weight.detach()
    full = _column_qparams(qp, ql._buffers.get("weight_g_idx"))
    codes = quantize(w.float(), args, full)
    if not torch.equal(dequantize(codes, args, full, w.dtype), w):
        return None
    return pack_fp4(codes) if _packs(args, w.shape[-1]) else codes


def _column_qparams(qp: QParams, g_idx: torch.Tensor | None) -> QParams:
    return per_column_qparams(qp, g_idx) if g_idx is not None else qp


def _packs(args: QuantArgs, columns: int) -> bool:
    return args.num_bits == 4 and columns % 2 == 0


def _decoded_weight(
    ql: QuantLinear, codes: torch.Tensor, qp: QParams, g_idx: torch.Tensor | None
) -> torch.Tensor:
    """The weight `_lossless_codes` sent, from its codes."""
    args = ql.scheme.weights
    assert args is not None
    if _packs(args, ql.weight.shape[-1]):
        codes = unpack_fp4(codes)
        codes = codes if args.type == "float" else ((codes ^ 8).to(torch.int8) - 8)
    return dequantize(codes, args, _column_qparams(qp, g_idx), ql.weight.dtype)


def _install_weight_state(ql: QuantLinear, name: str, got: Mapping[str, torch.Tensor]) -> None:
    def get(key: str) -> torch.Tensor | None:
        return got.get(f"{name}.{key}")

    scale = get("weight_scale")
    assert scale is not None, f"{name}: the owner sent no weight scale"
    qp = QParams(scale, get("weight_zero_point"), get("weight_global_scale"))
    g_idx, codes = get("weight_g_idx"), get("weight_codes")
    w = got[f"{name}.weight"] if codes is None else _decoded_weight(ql, codes, qp, g_idx)
    ql.set_weight(w, qp, g_idx)


def _reduce_hessians(units: list[_Unit], owner: list[int]) -> None:
    """Each Hessian summed onto every rank that solves a unit reading it (`owner` per unit),
    in the same order on every rank; the other ranks drop theirs."""
    needed: dict[int, tuple[HessianAccumulator, list[int]]] = {}
    for unit, rank in zip(units, owner):
        for acc in unit.accs:
            ranks = needed.setdefault(id(acc), (acc, []))[1]
            if rank not in ranks:
                ranks.append(rank)
    for acc, ranks in needed.values():
        if acc.owner is not None:  # expert parallelism: summed on its owner already
            continue
        partial, total = acc.sum, None
        for rank in sorted(ranks):
            acc.sum = partial
            acc.reduce(rank)
            total = acc.sum if acc.sum is not None else total
        acc.sum = total


def _share_counts(tracker: _InputTracker, linears: Mapping[str, QuantLinear]) -> None:
    """Make the ranks' trackers agree: the union of who shares whose input, every routed
    expert's kept inputs summed on its owner (`_send_routed`), an (empty) accumulator wherever
    another rank has one, and every count the total over ranks."""
    leader: dict[str, str] = {}
    summed: set[str] = set()
    for other, theirs in distributed.gather_objects((tracker.leader, sorted(tracker.summed))):
        summed.update(theirs)
        for name, lead in other.items():
            if leader.setdefault(name, lead) != lead:
                raise QuantscaleError(
                    f"GPTQ: {name} shared its input with {lead} on one rank and with "
                    f"{leader[name]} on another; cannot share a Hessian"
                )
    tracker.leader = leader
    leaders = sorted(set(leader.values()))
    routed = _routed_leaders(tracker, [n for n in leaders if n not in summed])
    for name in [n for n in tracker.stash if n not in routed]:
        tracker._accumulate_stash(name)
    kept = sum(t.numel() * t.element_size() for ts in tracker.stash.values() for t in ts)
    _send_routed(tracker, routed, linears)
    _log_held(tracker, kept)
    for name in leaders:
        if name in routed and routed[name] != distributed.context().rank:
            tracker.acc[name] = HessianAccumulator.held_by(routed[name], linears[name].in_features)
        elif name not in tracker.acc:
            ql = linears[name]
            tracker.acc[name] = HessianAccumulator(
                ql.in_features, ql.weight.device, tracker.exact, dtype=tracker.dtype
            )
        tracker.acc[name].owner = routed.get(name)
    counts = distributed.all_sum_ints([tracker.acc[n].count for n in leaders])
    for name, count in zip(leaders, counts):
        tracker.acc[name].count = count


def _log_held(tracker: _InputTracker, kept: int) -> None:
    """The Hessian bytes this rank holds at the layer's end (and the routed inputs it kept
    for other ranks' experts)."""
    sums = [a.sum for a in tracker.acc.values() if a.sum is not None]
    log.info(
        "rank %d GPTQ Hessians: %d bytes held, %d bytes of routed inputs sent to their experts",
        distributed.context().rank,
        sum(t.numel() * t.element_size() for t in sums),
        kept,
    )


def _expert_owners(linears: Mapping[str, QuantLinear]) -> dict[str, int]:
    """Expert parallelism: each expert's Linears on one rank, the experts in contiguous,
    equal shares in index order (empty with one process)."""
    experts = sorted({e for n in linears if (e := expert_of(n)) is not None})
    world = distributed.context().world
    if world == 1 or not experts:
        return {}
    rank = {e: i * world // len(experts) for i, e in enumerate(experts)}
    return {n: rank[e] for n in linears if (e := expert_of(n)) is not None}


def _routed_leaders(tracker: _InputTracker, leaders: list[str]) -> dict[str, int]:
    """Leader -> owning rank of the Hessians one expert's Linears share alone (routed
    inputs); an input shared across experts (all-expert calibration) stays data parallel."""
    members: dict[str, list[str]] = {}
    for name, lead in tracker.leader.items():
        members.setdefault(lead, []).append(name)
    return {
        lead: tracker.owner[lead]
        for lead in leaders
        if lead in tracker.owner
        and all(tracker._one_expert(m, lead) for m in members.get(lead, [lead]))
    }


def _send_routed(
    tracker: _InputTracker, routed: Mapping[str, int], linears: Mapping[str, QuantLinear]
) -> None:
    """Each rank's kept inputs of another rank's experts sent there, batch by batch, and added
    to the owner's Hessians (float64 sums of float32 products: the one-process Hessian)."""
    kept = {n: [(tuple(t.shape), t.dtype) for t in ts] for n, ts in tracker.stash.items()}
    specs = distributed.gather_objects(kept)
    me = distributed.context().rank
    for name in sorted(routed):
        owner = routed[name]
        for src, theirs in enumerate(specs):
            if src == me != owner:
                for x in tracker.stash.pop(name, []):
                    distributed.send_tensor(x, owner)
            elif me == owner != src:
                device = linears[name].weight.device
                for shape, dtype in theirs.get(name, []):
                    x = distributed.recv_tensor(shape, dtype, src)
                    with torch.inference_mode():  # calibration's sums are inference tensors
                        tracker._accumulator(name, shape[-1], device).add(x.to(device))
    tracker.stash.clear()


def _by_owner(jobs: list[_Job]) -> list[list[_Job]]:
    """Expert jobs split by the rank that holds their Hessians (one list without expert
    parallelism), in order."""
    out: dict[int | None, list[_Job]] = {}
    for job in jobs:
        out.setdefault(job.acc.owner, []).append(job)
    return list(out.values())


def _held_by(unit: _Unit) -> int | None:
    """The rank that must solve `unit`: the one holding its (expert-parallel) Hessians."""
    held = {acc.owner for acc in unit.accs}
    if len(held) > 1:
        raise QuantscaleError(f"GPTQ: one solve of {unit.names[:3]} reads Hessians of two ranks")
    return held.pop() if held else None
