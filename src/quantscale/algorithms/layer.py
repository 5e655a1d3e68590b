"""One decoder layer's quantization: what the in-memory and the streamed drivers share.

`quantize_layer(step, group, algorithm, sequential, run)` calibrates and quantizes the
QuantLinears `group` of the decoder layer in `step`: the activation observers
(`calibration.activations.ActivationCalibrator`) and the algorithm's hooks are attached while
`run()` pushes the cached batches through the layer (with several ranks, each rank's share of
them: the algorithm and the observers merge what the ranks saw, `quantscale.distributed`),
then the algorithm sets the weights (`finish_layer`) and the observers the static activation
scales. An algorithm with a `passes(linears)` method (GPTQ: experts in chunks that fit its
memory budget) gets one start/forward/finish round per pass. With `sequential` (true
sequential) this happens stage by stage (`calibration.sequential.linear_stages`). An algorithm
with a `prepare_layer(step, group, run)` method (AWQ: scales folded into the layer, clipping)
sees the layer first (one process only: its search statistics are not reduced across ranks).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

from torch import nn

from quantscale import distributed
from quantscale.algorithms.base import WeightAlgorithm
from quantscale.calibration.activations import ActivationCalibrator
from quantscale.calibration.sequential import LayerStep, linear_stages
from quantscale.errors import QuantscaleError
from quantscale.models.adapter import tied_across_layers
from quantscale.naming import group_names
from quantscale.runtime.qlinear import QuantLinear
from quantscale.scheme import Recipe


def refuse_tied_linears(model: nn.Module, recipe: Recipe) -> None:
    """Refuse a recipe that targets a Linear several decoder layers share: the layer-by-layer
    driver calibrates a module inside one layer, and a use in another layer would see
    another layer's inputs (or none: Zamba2's per-use adapters)."""
    tied = {n: i for n, i in tied_across_layers(model).items() if recipe.scheme_for(n)}
    if tied:
        first, layers = next(iter(tied.items()))
        raise QuantscaleError(
            f"{len(tied)} targeted Linear modules are shared by several decoder layers "
            f"({first} by layers {layers}; {group_names(list(tied))}); quantizing tied blocks "
            "is not supported: leave them float, e.g. --ignore 're:.*shared_transformer.*' "
            "for Zamba2"
        )


def by_layer(
    linears: dict[str, QuantLinear], prefix: str, n_layers: int
) -> list[dict[str, QuantLinear]]:
    """The QuantLinears of each decoder layer `prefix.<i>` (those outside are left out)."""
    groups: list[dict[str, QuantLinear]] = [{} for _ in range(n_layers)]
    for name, ql in linears.items():
        head = name[len(prefix) + 1 :].split(".", 1)[0] if name.startswith(prefix + ".") else ""
        if head.isdigit() and int(head) < n_layers:
            groups[int(head)][name] = ql
    return groups


def calibration_passes(
    algorithm: WeightAlgorithm, linears: dict[str, QuantLinear]
) -> list[dict[str, QuantLinear]]:
    """The algorithm's calibration passes over `linears` (its optional `passes` method;
    default one pass with everything)."""
    passes = getattr(algorithm, "passes", None)
    return passes(linears) if passes is not None else [linears]


def calibrate_group(
    linears: dict[str, QuantLinear],
    algorithm: WeightAlgorithm,
    run: Callable[[], object],
    observe: Callable[[Mapping[nn.Module, bool]], object] | None = None,
) -> None:
    """Observe activations and let the algorithm see inputs during `run()`, then quantize;
    once per calibration pass. The activation observers see the first pass only (later
    passes rerun on the same inputs: the algorithm's passes keep every Linear's input
    unchanged until its own pass), and set the static scales after the last. With
    `observe` (`LayerStep.observe`), a pass forwards only as far as its hooks need: up to
    the input of the pass's last Linear (its output where an output activation is observed)."""
    calibrator = ActivationCalibrator(linears)
    outputs = {name for name, role in calibrator.args if role == "output"}
    for i, part in enumerate(calibration_passes(algorithm, linears)):
        algorithm.start_layer(part)
        watched = linears if i == 0 else part
        needed: dict[nn.Module, bool] = {
            m: i == 0 and name in outputs for name, m in watched.items()
        }
        forward = run if observe is None else functools.partial(observe, needed)
        try:
            if i == 0:
                with calibrator:
                    forward()
            else:
                forward()
        finally:
            algorithm.finish_layer(part)
    calibrator.apply()


def calibrate_in_stages(
    step: LayerStep, group: dict[str, QuantLinear], algorithm: WeightAlgorithm
) -> None:
    """True-sequential: each stage calibrated and quantized before the next one runs."""
    for stage in linear_stages(step, group):
        stop = group.get(stage.last) if stage.last is not None else None
        members = {n: group[n] for n in stage.names}
        calibrate_group(members, algorithm, functools.partial(step.run_until, stop))


def quantize_layer(
    step: LayerStep,
    group: dict[str, QuantLinear],
    algorithm: WeightAlgorithm,
    sequential: bool = False,
    run: Callable[[], object] | None = None,
) -> None:
    """Calibrate and quantize one layer's `group` (see the module docstring); `run` forwards
    the cached batches (default `step.run`)."""
    if not group:
        return
    prepare = getattr(algorithm, "prepare_layer", None)
    if prepare is not None and distributed.active():
        raise QuantscaleError(
            f"{step.name}: {type(algorithm).__name__}'s search does not reduce its statistics "
            "across ranks yet; run it in one process (without torchrun)"
        )
    with distributed.step(step.name):
        if prepare is not None:
            prepare(step, group, run or step.run)
        if sequential:
            calibrate_in_stages(step, group, algorithm)
        else:
            calibrate_group(group, algorithm, run or step.run, step.observe)
    distributed.traffic(step.name)


def quantize_data_free(group: dict[str, QuantLinear], algorithm: WeightAlgorithm) -> None:
    """Weight-only, data-free quantization (RTN): no forward at all."""
    algorithm.start_layer(group)
    algorithm.finish_layer(group)
