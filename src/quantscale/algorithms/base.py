"""The weight-algorithm contract and its registry.

A weight algorithm sets the weights of one group of QuantLinears (a decoder layer, or a stage
of one) after seeing the group's calibration inputs: the orchestrator calls `start_layer`,
runs the group's forwards (none when `needs_data` is false and nothing else needs data), then
`finish_layer`. Algorithms register a class or factory by name with `register_algorithm`; the
orchestrator instantiates one with `get_algorithm(name, **options)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from quantscale.errors import QuantscaleError
from quantscale.runtime.qlinear import QuantLinear


class WeightAlgorithm(Protocol):
    """Sets the weights of a group of QuantLinears after seeing their calibration inputs.

    `needs_data`: whether it must see inputs (RTN does not); `true_sequential`: its default
    for calibrating a layer stage by stage (q/k/v, o, gate/up, down). Optional:
    `passes(linears) -> list[dict]`, the group split into calibration passes, each driven
    start/forward/finish (`algorithms.layer.calibration_passes`; default one pass);
    `prepare_layer(step, group, run)`, called with the decoder layer's `LayerStep` before it
    is calibrated (AWQ changes the layer's float weights there).
    """

    needs_data: bool
    true_sequential: bool

    def start_layer(self, linears: dict[str, QuantLinear]) -> None:
        """Attach forward hooks that see the group's inputs."""

    def finish_layer(self, linears: dict[str, QuantLinear]) -> None:
        """Remove the hooks and call `ql.set_weight(...)` on each module."""


ALGORITHMS: dict[str, Callable[..., WeightAlgorithm]] = {}


def register_algorithm(
    name: str,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a WeightAlgorithm class (or factory) under `name`."""

    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        ALGORITHMS[name.lower()] = factory
        return factory

    return deco


def get_algorithm(name: str, **options: Any) -> WeightAlgorithm:
    """Instantiate the weight algorithm registered as `name` with `options`."""
    factory = ALGORITHMS.get(name.lower())
    if factory is None:
        raise QuantscaleError(
            f"unknown weight algorithm {name!r}; known: {', '.join(sorted(ALGORITHMS))}"
        )
    return factory(**options)
