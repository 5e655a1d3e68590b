"""AutoRound (SignRound): rounding offsets and clip ranges learned per decoder layer by
signed-gradient descent on the layer's output error.

Per decoder layer, on the layer's own calibration inputs (each layer fed by the quantized
layers before it) against the float model's outputs of that layer (`float_stream`, as
AutoRound does: the float layer on the float model's hidden states, carried from layer to
layer; off, or for the first layer of a resumed streamed run: the float layer on the same
quantized inputs), every fused stack of its quantized Linears (`rtn.fused_stacks`: q/k/v,
gate/up share their global / per-tensor scales as with RTN) gets a rounding offset V (the
weight's shape, in [-0.5, 0.5], init 0) and, for group / channel scales, clip factors a, b per
(row, group) (in [0.5, 1], init 1) that shrink the group's min / max. Each step: the float
weights clamped to [a * min, b * max] give the scales exactly as RTN computes them
(`rtn.rtn_qparams`, held scale dtype included); the weight is rounded as round(w / s + V)
on the scheme's grid (integers, E2M1 or E4M3: V is added in units of the scale, then the
value rounded to the nearest grid point), with a straight-through estimator for the rounding
and for the scale (s moves with the clipped range); the loss is the MSE between that target
and the layer's output with these weights, on one cached calibration batch (a copy of the
layer and of its inputs, made once per layer, in `layer_compute_dtype`: bfloat16 for a bfloat16
model, as AutoRound runs, else float32); every parameter moves by -lr * sign(grad), lr
decayed linearly to 0, V and the clip factors clamped to their ranges. The parameters of least
loss seen (the initial RTN point included; each step's loss relative to its batch's RTN loss,
since batches differ more than steps) are kept, and `finish_layer` sets the weights from them
(`ql.set_weight` with the codes' dequantized values and their qparams), so that every export
path writes them unchanged. `steps=0` is RTN exactly.

Simplifications against the paper's implementation: an asymmetric zero point is taken as it
follows from the clipped range (no gradient through its rounding); FP8 block schemes learn V
only (their scales span rows).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from quantscale.algorithms.awq import _grouped, clip_group_size
from quantscale.algorithms.base import register_algorithm
from quantscale.algorithms.rtn import (
    fused_stacks,
    rtn_qparams,
    rtn_quantize_fused,
    set_stacked,
    stacked_weight,
)
from quantscale.calibration.sequential import LayerStep, layer_output, replace_hidden
from quantscale.errors import QuantscaleError
from quantscale.formats.fp4 import E2M1_MAX
from quantscale.formats.fp8 import E4M3_MAX
from quantscale.formats.intq import int_range
from quantscale.qdq import QParams, _effective_scale, _to_grid, _zero_point, fake_quantize
from quantscale.runtime.qlinear import QuantLinear
from quantscale.scheme import QuantArgs

log = logging.getLogger(__name__)

STEPS = 200
CLIP_MIN = 0.5


def grid_bounds(args: QuantArgs) -> tuple[float, float]:
    """The least and greatest value of the scheme's grid (int codes, E2M1 or E4M3)."""
    if args.type == "float":
        top = E4M3_MAX if args.num_bits == 8 else E2M1_MAX
        return -top, top
    qmin, qmax = int_range(args.num_bits)
    return float(qmin), float(qmax)


class Rounding:
    """The learned rounding of one fused stack: offsets `v` and clip factors `a`, `b`."""

    def __init__(self, names: list[str], rows: list[int], w: torch.Tensor, args: QuantArgs) -> None:
        self.names, self.rows, self.args, self.dtype = names, rows, args, w.dtype
        self.w = w.detach().float().clone()
        self.v = torch.zeros_like(self.w, requires_grad=True)
        self.size = clip_group_size(args, w.shape[1])
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        if self.size is not None:
            wg = _grouped(self.w, self.size)
            self.lo, self.hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
            self.a = torch.ones_like(self.lo, requires_grad=True)
            self.b = torch.ones_like(self.hi, requires_grad=True)

    def params(self) -> list[torch.Tensor]:
        return [p for p in (self.v, self.a, self.b) if p is not None]

    def clamp_(self) -> None:
        """Put the parameters back in their ranges."""
        self.v.data.clamp_(-0.5, 0.5)
        for p in (self.a, self.b):
            if p is not None:
                p.data.clamp_(CLIP_MIN, 1.0)

    def qparams(self) -> QParams:
        """RTN's qparams of the weights clamped to the clip ranges."""
        w = self.w
        if self.size is not None:
            assert self.a is not None and self.b is not None
            lo, hi = self.lo * self.a.detach(), self.hi * self.b.detach()
            w = _grouped(w, self.size).clamp(lo, hi).flatten(1)[:, : w.shape[1]]
        return rtn_qparams(w.to(self.dtype), self.args)

    def _range_ratio(self) -> torch.Tensor | None:
        """[O, C]: the clipped range over its value (1, with the range's gradient)."""
        if self.size is None:
            return None
        assert self.a is not None and self.b is not None
        lo = (self.lo * self.a).clamp(max=0.0)
        hi = (self.hi * self.b).clamp(min=0.0)
        asym = self.args.type == "int" and not self.args.symmetric
        r = hi - lo if asym else torch.maximum(-lo, hi)
        held = r.detach()
        ratio = torch.where(held > 0, r / held.clamp(min=1e-30), torch.ones_like(r))
        return ratio.expand(-1, -1, self.size).flatten(1)[:, : self.w.shape[1]]

    def fake(self) -> torch.Tensor:
        """The fake-quantized weight (float32), differentiable in v, a, b (STE)."""
        with torch.no_grad():
            qp = self.qparams()
            s = _effective_scale(self.w, self.args, qp)
            zp = _zero_point(self.w, self.args, qp)
            grid = _to_grid(self.w + self.v * s, self.args, qp)
        ratio = self._range_ratio()
        if ratio is not None:
            s = s * ratio
        t = self.w / s + self.v
        if zp is not None:
            t = t + zp
        t = t.clamp(*grid_bounds(self.args))
        q = t + (grid - t).detach()
        if zp is not None:
            q = q - zp
        return q * s

    def final(self) -> tuple[torch.Tensor, QParams]:
        """(w_hat in the weight's dtype, qparams): round(w / s + V) with the clipped scales."""
        with torch.no_grad():
            qp = self.qparams()
            shifted = self.w + self.v * _effective_scale(self.w, self.args, qp)
            return fake_quantize(shifted, self.args, qp).to(self.dtype), qp


def _float_copy(obj: Any, dtype: torch.dtype = torch.float32) -> Any:
    """Nested tuples / lists / dicts with floating tensors copied as `dtype` (others
    cloned): autograd-usable copies of inference-mode tensors."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype, copy=True) if obj.is_floating_point() else obj.clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_float_copy(v, dtype) for v in obj)
    if isinstance(obj, dict):
        return {k: _float_copy(v, dtype) for k, v in obj.items()}
    return obj


def _hidden_shape(args: tuple, kwargs: dict) -> tuple[int, ...]:
    return tuple((args[0] if args else kwargs["hidden_states"]).shape)


def layer_compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype the layer's forward / backward run in: bfloat16 for a bfloat16 layer (its
    matmuls are ~4x faster than float32 on CPUs with AVX512-BF16; AutoRound runs its blocks
    in bfloat16 too), float32 otherwise (float16's range is too narrow for the gradients)."""
    p = next((t for t in layer.parameters() if t.is_floating_point()), None)
    return torch.bfloat16 if p is not None and p.dtype == torch.bfloat16 else torch.float32


@dataclass
class LayerLoss:
    """The output MSE (float32) of a copy of one decoder layer with substituted weights, run
    in `dtype` on the cached `inputs` (copied once, autograd-usable), against the float
    layer's `targets`."""

    layer: nn.Module
    inputs: list[tuple[tuple, dict]]
    targets: list[torch.Tensor]
    paths: dict[str, str]  # full Linear name -> its path inside the layer
    dtype: torch.dtype

    def __call__(self, batch: int, roundings: list[Rounding]) -> torch.Tensor:
        weights: dict[str, torch.Tensor] = {}
        for r in roundings:
            parts = r.fake().to(self.dtype).split(r.rows)
            weights.update({f"{self.paths[n]}.weight": w for n, w in zip(r.names, parts)})
        args, kwargs = self.inputs[batch]
        out = layer_output(functional_call(self.layer, weights, args, kwargs))
        return F.mse_loss(out.float(), self.targets[batch].float())


def layer_loss(
    step: LayerStep, group: dict[str, QuantLinear], float_hidden: list[torch.Tensor] | None = None
) -> LayerLoss:
    """A copy of `step.layer` in its compute dtype, its inputs and its float outputs: on
    `float_hidden` (the float model's hidden states at this layer) when given, else on the
    layer's own inputs."""
    dtype = layer_compute_dtype(step.layer)
    layer = copy.deepcopy(step.layer).to(dtype)
    layer.requires_grad_(False)
    inputs = [_float_copy(x, dtype) for x in step.inputs]
    sources = inputs
    if float_hidden is not None:
        sources = [replace_hidden(h.to(dtype), a, k) for h, (a, k) in zip(float_hidden, inputs)]
    with torch.no_grad():
        targets = [layer_output(layer(*a, **k)) for a, k in sources]
    prefix = step.name + "."
    paths = {n: n[len(prefix) :] for n in group if n.startswith(prefix)}
    return LayerLoss(layer, inputs, targets, paths, dtype)


def sign_descent(
    loss: Callable[[int], torch.Tensor],
    roundings: list[Rounding],
    steps: int,
    lr: float,
    batches: int,
    seed: int = 0,
) -> tuple[float, float]:
    """`steps` signed-gradient steps (lr decayed linearly to 0), one of the `batches` each (a
    fresh random order per epoch). Each step's loss is compared with its batch's loss at the
    start (RTN), and the parameters of least ratio (the start, ratio 1, included) are left
    in place: batches differ in loss far more than steps do. Returns (mean start loss, mean
    start loss times the best ratio)."""
    params = [p for r in roundings for p in r.params()]
    with torch.no_grad():
        start = [float(loss(b)) for b in range(batches)]
    best = [p.detach().clone() for p in params]
    best_ratio = 1.0
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for i in range(steps):
        if not order:
            order = torch.randperm(batches, generator=gen).tolist()
        batch = order.pop()
        value = loss(batch)
        ratio = float(value.detach()) / max(start[batch], 1e-30)
        if ratio < best_ratio:
            best_ratio = ratio
            best = [p.detach().clone() for p in params]
        value.backward()
        with torch.no_grad():
            step_lr = lr * (1.0 - i / steps)
            for p in params:
                if p.grad is not None:
                    p.sub_(step_lr * p.grad.sign())
                    p.grad = None
            for r in roundings:
                r.clamp_()
    with torch.no_grad():
        for p, kept in zip(params, best):
            p.copy_(kept)
    mean = sum(start) / len(start)
    return mean, mean * best_ratio


@register_algorithm("autoround")
class AutoRound:
    """SignRound per decoder layer (module docstring): `steps` sign-gradient steps of
    learning rate `lr` (default 1 / steps), one cached calibration batch per step, against
    the float model's layer outputs (`float_stream`; False: the float layer on the same
    quantized inputs)."""

    needs_data = True
    true_sequential = False

    def __init__(
        self, steps: int = STEPS, lr: float | None = None, seed: int = 0, float_stream: bool = True
    ) -> None:
        if steps < 0:
            raise QuantscaleError(f"autoround steps {steps}: expected >= 0")
        if lr is not None and lr <= 0:
            raise QuantscaleError(f"autoround lr {lr}: expected > 0")
        self.steps, self.seed = steps, seed
        self.lr = lr if lr is not None else 1.0 / max(1, steps)
        self.float_stream = float_stream
        self.results: dict[str, tuple[list[str], torch.Tensor, QParams]] = {}
        self.losses: dict[str, tuple[float, float]] = {}
        self._stream: tuple[int, list[torch.Tensor]] | None = None  # (layer index, outputs)

    def _float_hidden(self, step: LayerStep) -> list[torch.Tensor] | None:
        """The float model's hidden states at this layer: the float outputs of the layer
        before (None when it learned nothing, e.g. the first layer of a resumed run)."""
        if not self.float_stream or self._stream is None or self._stream[0] != step.index - 1:
            return None
        hidden = self._stream[1]
        shapes = [_hidden_shape(a, k) for a, k in step.inputs]
        return hidden if shapes == [tuple(h.shape) for h in hidden] else None

    def prepare_layer(
        self, step: LayerStep, group: dict[str, QuantLinear], run: Callable[[], object]
    ) -> None:
        """Learn the rounding of `group`'s stacks on the layer's cached inputs (outside
        inference mode: the parameters need autograd)."""
        with torch.inference_mode(False):
            roundings = self._roundings(step, group)
            if self.steps > 0 and roundings and step.inputs:
                with torch.enable_grad():
                    loss = layer_loss(step, group, self._float_hidden(step))
                    self._stream = (step.index, loss.targets)
                    self.losses[step.name] = sign_descent(
                        lambda b: loss(b, roundings),
                        roundings,
                        self.steps,
                        self.lr,
                        len(step.inputs),
                        self.seed + step.index,
                    )
                first, best = self.losses[step.name]
                log.info("%s: autoround output MSE %.3g -> %.3g", step.name, first, best)
            for r in roundings:
                self.results[r.names[0]] = (r.names, *r.final())

    @staticmethod
    def _roundings(step: LayerStep, group: dict[str, QuantLinear]) -> list[Rounding]:
        """One `Rounding` per fused stack of the layer's quantized Linears."""
        out = []
        for stack in fused_stacks(group):
            if not all(n.startswith(step.name + ".") for n in stack):
                continue
            args = group[stack[0]].scheme.weights
            assert args is not None  # fused_stacks skips modules without weight args
            rows = [group[n].out_features for n in stack]
            out.append(Rounding(stack, rows, stacked_weight(group, stack), args))
        return out

    def start_layer(self, linears: dict[str, QuantLinear]) -> None:
        pass

    def finish_layer(self, linears: dict[str, QuantLinear]) -> None:
        """Set the learned weights; RTN for members no layer step prepared."""
        rest = dict(linears)
        for first in [n for n in self.results if n in linears]:
            names, w_hat, qp = self.results.pop(first)
            set_stacked(linears, names, w_hat, qp)
            for n in names:
                rest.pop(n, None)
        if rest:
            rtn_quantize_fused(rest)
