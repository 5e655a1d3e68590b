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

Columns that never saw a non-zero input (H[i, i] == 0) are kept and quantized on their own
(reference GPTQ zeroes them, which would erase MoE experts that got no tokens).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from quantscale.algorithms.base import register_algorithm
from quantscale.algorithms.rtn import (
    full_range,
    rtn_weight,
    set_stacked,
    stacked_weight,
    stored_scales,
    weight_scale_dtype,
)
from quantscale.errors import QuantscaleError
from quantscale.qdq import (
    WEIGHT,
    QParams,
    _expand,
    compute_qparams,
    fake_quantize,
    nvfp4_global_scale,
    reduce_minmax,
)
from quantscale.runtime.qlinear import QuantLinear
from quantscale.scheme import QuantArgs

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 128
DEFAULT_DAMPENING = 0.01
DEFAULT_ACTORDER = "weight"
_DYNAMIC = ("group", "tensor_group", "block")


class HessianAccumulator:
    """Running sum of x^T x over a Linear's inputs (float32); `hessian()` = 2/n * sum.

    bfloat16 inputs are multiplied in bfloat16 (4-5x faster on CPUs with AVX512-BF16) one
    `chunk` of rows at a time, each product widened to float32 before it is summed, so the
    bf16 rounding of the products averages out over the chunks; `exact=True` (or any other
    dtype) multiplies in float32.
    """

    def __init__(
        self,
        columns: int,
        device: torch.device | str = "cpu",
        exact: bool = False,
        chunk: int = 512,
    ) -> None:
        self.sum = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.count = 0
        self.exact, self.chunk = exact, chunk

    def add(self, x: torch.Tensor) -> None:
        """Add inputs [..., columns] (every leading position is one sample)."""
        rows = x.detach().reshape(-1, x.shape[-1])
        self.count += rows.shape[0]
        if rows.dtype == torch.bfloat16 and not self.exact:
            for part in rows.split(self.chunk):
                self.sum += (part.t() @ part).float()
            return
        if rows.dtype != torch.float32:
            rows = rows.float()
        self.sum.addmm_(rows.t(), rows)

    def hessian(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.count, 1))


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
    h = h.clone()
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    base = diag.mean().item()
    frac = dampening_frac
    for _ in range(5):
        damped = h.clone()
        damped.diagonal().add_(frac * base)
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
        frac = max(frac * 10, 1e-6)
    raise QuantscaleError(
        f"GPTQ: the Hessian ({h.shape[0]} columns) is not positive definite even with "
        f"dampening_frac={frac / 10:g}; calibrate with more samples"
    )


def _segment_width(args: QuantArgs) -> int:
    width = args.block_structure[1] if args.block_structure else args.group_size
    assert width is not None, "dynamic GPTQ scales need groups or blocks"
    return width


class _Scales:
    """Per-column effective scales / zero points in processing order (transposed [col, row])."""

    def __init__(
        self,
        args: QuantArgs,
        global_scale: torch.Tensor | None,
        static: bool,
        scale_dtype: torch.dtype | None = None,
    ) -> None:
        self.args, self.global_scale, self.static = args, global_scale, static
        self.scale_dtype = scale_dtype
        self.width = 0 if static else _segment_width(args)
        self.start = -1
        self.scale_t: torch.Tensor | None = None
        self.zp_t: torch.Tensor | None = None
        self.parts: list[QParams] = []

    def qparams_of(self, w: torch.Tensor) -> QParams:
        mn, mx = reduce_minmax(w, self.args, WEIGHT)
        qp = full_range(self.args, compute_qparams(self.args, mn, mx, self.global_scale))
        return stored_scales(qp, self.scale_dtype)

    def set(self, start: int, w: torch.Tensor, qp: QParams, perm: torch.Tensor | None) -> None:
        """Expand qp to w's shape [rows, cols], reorder columns by perm, store transposed."""
        scale = _expand(qp.scale.float(), w, self.args).expand(w.shape)
        if qp.global_scale is not None:
            scale = scale / qp.global_scale.float()
        zp = None
        if qp.zero_point is not None:
            zp = _expand(qp.zero_point.float(), w, self.args).expand(w.shape)
        if perm is not None:
            scale = scale[:, perm]
            zp = zp[:, perm] if zp is not None else None
        self.start = start
        self.scale_t = scale.t().contiguous()
        self.zp_t = zp.t().contiguous() if zp is not None else None

    def column(self, p: int, wt: torch.Tensor) -> QParams:
        """QParams (vectors over rows) for processing position p; opens new groups."""
        if not self.static and p % self.width == 0:
            seg = wt[p : p + self.width].t()
            qp = self.qparams_of(seg)
            self.parts.append(qp)
            self.set(p, seg, qp, None)
        j = p - self.start
        assert self.scale_t is not None, "set() or a new group comes first"
        return QParams(self.scale_t[j], self.zp_t[j] if self.zp_t is not None else None)

    def assembled(self) -> QParams:
        """The dynamic groups' qparams concatenated in group order."""
        zps = [qp.zero_point for qp in self.parts if qp.zero_point is not None]
        return QParams(
            torch.cat([qp.scale for qp in self.parts], dim=-1),
            torch.cat(zps, dim=-1) if zps else None,
            self.global_scale,
        )


def _check_actorder(args: QuantArgs, actorder: str | None) -> None:
    if actorder == "group" and args.strategy != "group":
        raise QuantscaleError(
            f"GPTQ actorder 'group' needs strategy 'group' (g_idx), got {args.strategy!r}; "
            "use actorder 'weight' instead"
        )


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantArgs,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dampening_frac: float = DEFAULT_DAMPENING,
    actorder: str | None = "args",
    global_scale: torch.Tensor | None = None,
    scale_dtype: torch.dtype | None | str = "weight",
) -> GPTQResult:
    """GPTQ-quantize weight w [out, in] with Hessian [in, in]; see the module docstring.

    `actorder` "args" takes `args.actorder`, else `DEFAULT_ACTORDER`; None turns it off.
    NVFP4's `global_scale` (448*6/amax) defaults to the whole weight's; pass a shared one for
    fused q/k/v or gate/up projections.
    `scale_dtype` "weight": `rtn.weight_scale_dtype` (int and FP8 scales rounded to the
    scheme's scale dtype or w's 16-bit dtype, so that runtimes which hold scales in the model
    dtype dequantize to exactly the weights returned here).
    """
    if w.ndim != 2 or hessian.shape != (w.shape[1], w.shape[1]):
        raise QuantscaleError(
            f"GPTQ: weight {tuple(w.shape)} and Hessian {tuple(hessian.shape)} do not match"
        )
    if actorder == "args":
        actorder = args.actorder or DEFAULT_ACTORDER
    _check_actorder(args, actorder)
    wf = w.detach().float()
    if args.is_nvfp4 and global_scale is None:
        global_scale = nvfp4_global_scale(wf.abs().amax())
    cols = wf.shape[1]
    perm = None
    h = hessian.float()
    if actorder is not None:
        perm = torch.argsort(h.diagonal(), descending=True)
        h = h[perm][:, perm]
    static = args.strategy not in _DYNAMIC or actorder == "weight"
    dtype = weight_scale_dtype(args, w.dtype) if scale_dtype == "weight" else scale_dtype
    assert not isinstance(dtype, str), f"scale_dtype {scale_dtype!r}: a torch dtype or 'weight'"
    scales = _Scales(args, global_scale, static, dtype)
    if static:
        qp_static = scales.qparams_of(wf)
        scales.set(0, wf, qp_static, perm)
    upper = inverse_hessian_factor(h, dampening_frac)
    wt = (wf[:, perm] if perm is not None else wf).t().contiguous()
    qt, loss = _column_loop(wt, upper, args, scales, block_size)
    q = qt.t()
    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        q = q[:, inv]
        if actorder == "group":
            g_idx = (torch.arange(cols) // _segment_width(args))[inv].to(torch.int32)
    qp = qp_static if static else scales.assembled()
    return GPTQResult(q.to(w.dtype).contiguous(), qp, g_idx, loss)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T) = 2/n sum ||(W - W_hat) x||^2 over the inputs."""
    d = w_hat.float() - w.float()
    return float(((d @ hessian.float()) * d).sum())


def _column_loop(
    wt: torch.Tensor, upper: torch.Tensor, args: QuantArgs, scales: _Scales, block_size: int
) -> tuple[torch.Tensor, float]:
    """The GPTQ loop over wt [cols, rows] (modified in place) -> (fake-quantized qt, loss).

    loss = sum of (w - q)^2 / (2 U_ii^2) over columns (U: the factor), GPTQ's own estimate.
    """
    cols = wt.shape[0]
    qt = torch.empty_like(wt)
    loss = 0.0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = wt[i1:i2]
        err1 = torch.empty_like(w1)
        hinv1 = upper[i1:i2, i1:i2]
        diag = hinv1.diagonal().tolist()
        for i in range(i2 - i1):
            p = i1 + i
            col = w1[i]
            q = fake_quantize(col, args, scales.column(p, wt))
            qt[p] = q
            err = (col - q).div_(diag[i])
            err1[i] = err
            if i + 1 < i2 - i1:
                w1[i + 1 :].addr_(hinv1[i, i + 1 :], err, alpha=-1.0)
        loss += float(err1.pow(2).sum()) / 2
        if i2 < cols:
            wt[i2:].addmm_(upper[i1:i2, i2:].t(), err1, alpha=-1.0)
    return qt, loss


# ---------------------------------------------------------------- layer-wise algorithm


class _InputTracker:
    """Forward pre-hooks that accumulate each Linear's Hessian once per distinct input.

    Linears fed the very same input tensor (q/k/v, gate/up, MoE experts' gate/up when all
    get every token) share one accumulator: the first of them to run is the group's leader.
    """

    def __init__(self, exact: bool = False) -> None:
        self.exact = exact
        self.acc: dict[str, HessianAccumulator] = {}
        self.leader: dict[str, str] = {}
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
            if leader == name:
                if name not in self.acc:
                    self.acc[name] = HessianAccumulator(x.shape[-1], x.device, self.exact)
                self.acc[name].add(x)
                self._recent.append((weakref.ref(x), name))

        return hook

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
    """

    needs_data = True
    true_sequential = False
    block_size: int = DEFAULT_BLOCK_SIZE
    dampening_frac: float = DEFAULT_DAMPENING
    actorder: str | None = "args"
    min_tokens: int = 1
    exact_hessian: bool = False
    report: list[dict] = field(default_factory=list)
    _tracker: _InputTracker | None = field(default=None, repr=False)

    def start_layer(self, linears: dict[str, QuantLinear]) -> None:
        self._tracker = _InputTracker(self.exact_hessian)
        self._tracker.attach(linears)

    def finish_layer(self, linears: dict[str, QuantLinear]) -> None:
        tracker, self._tracker = self._tracker, None
        assert tracker is not None, "finish_layer without start_layer"
        tracker.detach()
        names = [n for n, m in linears.items() if m.scheme.weights is not None]
        for leader, members in tracker.groups(names).items():
            acc = tracker.acc.get(leader)
            for part in _split_by_args(members, linears):
                self._quantize_group(part, linears, acc)

    def _quantize_group(
        self, names: list[str], linears: dict[str, QuantLinear], acc: HessianAccumulator | None
    ) -> None:
        args = linears[names[0]].scheme.weights
        assert args is not None, "finish_layer passes quantized weights only"
        tokens = acc.count if acc is not None else 0
        stacks = [names] if args.strategy != "block" else [[n] for n in names]
        for stack in stacks:
            w = stacked_weight(linears, stack)
            rtn = acc is None or tokens < self.min_tokens
            if rtn:
                w_hat, qp = rtn_weight(w, args)
                res = GPTQResult(w_hat, qp)
                log.warning("%s: %d calibration tokens; RTN instead of GPTQ", stack, tokens)
            else:
                assert acc is not None
                res = gptq_quantize(
                    w,
                    acc.hessian(),
                    args,
                    block_size=self.block_size,
                    dampening_frac=self.dampening_frac,
                    actorder=self.actorder,
                )
            set_stacked(linears, stack, res.weight, res.qparams, res.g_idx)
            self.report.append(
                {
                    "modules": stack,
                    "tokens": tokens,
                    "method": "rtn" if rtn else "gptq",
                    "loss": res.loss,
                }
            )


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
