"""Learned static activation scales (LSQ, Esser et al. 2020) per decoder layer.

After a layer is calibrated (observer scales) and its weights quantized, its static input
scales are trained by Adam on the MSE between the quantized layer's output and the float
layer's output on the layer's cached calibration inputs (the inputs the quantized layers
before it give). The fake-quant modules quantize with `qdq.lsq_fake_quantize` while a scale
requires grad: a straight-through round and LSQ's scale gradient, scaled by 1 / sqrt(N * Qp).
Modules fed the same input (q/k/v, gate/up: one `linear_stages` stage) share one learned
scale, as they shared one observer. Each scale's learning rate is `lr` times its initial
value (the scales of one model span orders of magnitude). The scales of least loss seen (the
observer's included; each step's loss relative to its batch's loss at the start, as
`autoround.sign_descent` keeps its best) are installed; `steps=0` leaves the observer's scales
exactly. Weights are not learned here (`--method autoround` learns weight rounding and clips).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from quantscale.algorithms.autoround import _float_copy
from quantscale.calibration.activations import is_static_int
from quantscale.calibration.sequential import LayerStep, layer_output, linear_stages
from quantscale.errors import QuantscaleError
from quantscale.qdq import QParams
from quantscale.runtime.qlinear import QuantLinear
from quantscale.scheme import LearnScales

log = logging.getLogger(__name__)


def float_targets(step: LayerStep, reference: nn.Module | None = None) -> list[torch.Tensor]:
    """The float32 outputs of the (not yet quantized) layer, or of its float `reference`,
    on the layer's cached inputs."""
    layer = copy.deepcopy(step.layer if reference is None else reference).float()
    with torch.inference_mode():
        return [layer_output(layer(*_float_copy(a), **_float_copy(k))) for a, k in step.inputs]


def _learnable(step: LayerStep, group: dict[str, QuantLinear]) -> list[list[str]]:
    """The layer's modules with static integer input scales, one list per shared scale."""
    own = {
        n: q
        for n, q in group.items()
        if n.startswith(step.name + ".")
        and q.input_qparams() is not None
        and is_static_int(q.scheme.input_activations)
    }
    if not own:
        return []
    return [[n for n in s.names if n in own] for s in linear_stages(step, own)]


def adam_best(
    loss: Callable[[int], torch.Tensor],
    params: Sequence[torch.Tensor],
    steps: int,
    lr: float,
    batches: int,
    seed: int = 0,
) -> tuple[float, float]:
    """`steps` Adam steps (one of `batches` each, a fresh random order per epoch; each
    parameter's learning rate `lr` times its mean |initial value|), the parameters of least
    loss relative to their batch's start loss left in place (positive: clamped above 1e-8
    of their start). Returns (mean start loss, mean start loss times the best ratio)."""
    with torch.no_grad():
        start = [float(loss(b)) for b in range(batches)]
    init = [p.detach().clone() for p in params]
    groups = [{"params": [p], "lr": lr * float(p.detach().abs().mean())} for p in params]
    opt = torch.optim.Adam(groups)
    best, best_ratio = [p.clone() for p in init], 1.0
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if not order:
            order = torch.randperm(batches, generator=gen).tolist()
        batch = order.pop()
        opt.zero_grad()
        value = loss(batch)
        ratio = float(value.detach()) / max(start[batch], 1e-30)
        if ratio < best_ratio:
            best_ratio, best = ratio, [p.detach().clone() for p in params]
        value.backward()
        opt.step()
        with torch.no_grad():
            for p, p0 in zip(params, init):
                p.copy_(torch.maximum(p, p0.abs() * 1e-8))
    with torch.no_grad():
        for p, kept in zip(params, best):
            p.copy_(kept)
    mean = sum(start) / len(start)
    return mean, mean * best_ratio


def learn_buffers(
    step: LayerStep,
    targets: list[torch.Tensor],
    shared: list[list[str]],
    buffer: str,
    options: LearnScales,
) -> tuple[list[torch.Tensor], tuple[float, float]]:
    """Train the scale buffers `buffer` of the modules `shared` names (paths inside
    `step.layer`; one learned tensor per inner list, starting from its first module's
    value) on a float32 copy of the layer against `targets`; returns the learned tensors and
    (start loss, best loss). The layer itself is not changed."""
    if len(targets) != len(step.inputs):
        raise QuantscaleError(f"{step.name}: {len(targets)} targets for {len(step.inputs)} inputs")
    with torch.inference_mode(False), torch.enable_grad():
        layer = copy.deepcopy(step.layer).float()
        layer.requires_grad_(False)
        params = []
        for members in shared:
            first = layer.get_submodule(members[0])._buffers[buffer]
            assert first is not None
            scale = first.detach().clone().requires_grad_(True)
            for path in members:
                layer.get_submodule(path)._buffers[buffer] = scale
            params.append(scale)
        held = [t.detach().clone() for t in targets]

        def loss(batch: int) -> torch.Tensor:
            args, kwargs = _float_copy(step.inputs[batch])
            return F.mse_loss(layer_output(layer(*args, **kwargs)), held[batch])

        result = adam_best(loss, params, options.steps, options.lr, len(step.inputs), step.index)
    log.info("%s: learned scales, output MSE %.3g -> %.3g", step.name, *result)
    return [p.detach() for p in params], result


def learn_input_scales(
    step: LayerStep,
    group: dict[str, QuantLinear],
    targets: list[torch.Tensor],
    options: LearnScales,
) -> tuple[float, float] | None:
    """Train the static input scales of `group`'s modules in `step.layer` (module
    docstring) and install them; returns (observer loss, learned loss), None when there is
    nothing to learn."""
    shared = _learnable(step, group)
    if options.steps == 0 or not shared or not step.inputs:
        return None
    prefix = step.name + "."
    paths = [[n[len(prefix) :] for n in members] for members in shared]
    learned, result = learn_buffers(step, targets, paths, "input_scale", options)
    for members, scale in zip(shared, learned):
        for n in members:
            qp = group[n].input_qparams()
            assert qp is not None
            group[n].set_input_qparams(QParams(scale, qp.zero_point, qp.global_scale))
    return result
