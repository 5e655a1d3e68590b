"""Static activation calibration: observers on the inputs / outputs of Linear modules.

`ActivationCalibrator(linears, schemes)` creates one observer per static activation of each
module (the scheme's `observer` and `observer_kwargs`, min-max by default), watches them with
forward hooks while attached, and turns the collected ranges into static `QParams`. Dynamic
'local' activations (NVFP4) get only their static global scale. Modules that receive the very
same input tensor with the same args (q/k/v, gate/up) share one observer, so every input is
observed once. Observers that search per batch (`mse`) see at most `token_budget` tokens of
each batch, drawn at random with a fixed seed: their cost does not grow with the batch.
With several ranks every observer merges the ranks' states (`Observer.reduce`) before the
QParams are computed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import cast

import torch
from torch import nn

from quantscale.errors import QuantscaleError
from quantscale.observers import Observer, get_observer
from quantscale.qdq import ACTIVATION, QParams, compute_qparams, nvfp4_global_scale
from quantscale.runtime.qlinear import QuantLinear
from quantscale.scheme import QuantArgs, QuantScheme

Key = tuple[str, str]  # (module name, "input" | "output")
# Tokens per batch seen by observers whose cost is a grid search over every element.
TOKEN_BUDGET = {"mse": 512}


def is_static(args: QuantArgs | None) -> bool:
    """Whether calibration must produce something for these activation args."""
    return args is not None and (not args.dynamic or args.dynamic == "local")


def is_static_int(args: QuantArgs | None) -> bool:
    """Whether these activation args have a static integer scale (what LSQ learns)."""
    return args is not None and not args.dynamic and args.type == "int"


def has_static_activations(schemes: Iterable[QuantScheme]) -> bool:
    """Whether any scheme has static (calibrated) input or output activation scales."""
    return any(is_static(s.input_activations) or is_static(s.output_activations) for s in schemes)


def activation_observer(args: QuantArgs) -> Observer:
    """The observer the args name (min-max by default), for activations."""
    return get_observer(
        args.observer or "minmax", args=args, role=ACTIVATION, **args.observer_kwargs
    )


def static_qparams(args: QuantArgs, observer: Observer) -> QParams:
    """Static QParams from an observer; for dynamic 'local' args only the global scale."""
    if args.dynamic == "local":
        return QParams(torch.ones(1), global_scale=nvfp4_global_scale(observer.amax().max()))
    if args.strategy in ("group", "tensor_group", "block", "token"):
        raise QuantscaleError(f"static activations do not support strategy {args.strategy!r}")
    return compute_qparams(args, *observer.min_max())


class ActivationCalibrator:
    """Observers for the static activations of `linears` (module name -> module)."""

    def __init__(
        self,
        linears: Mapping[str, nn.Module],
        schemes: Mapping[str, QuantScheme] | None = None,
        token_budget: Mapping[str, int] | None = None,
    ) -> None:
        self.linears = dict(linears)
        self.token_budget = dict(TOKEN_BUDGET if token_budget is None else token_budget)
        self._gen = torch.Generator().manual_seed(0)
        self.args: dict[Key, QuantArgs] = {}
        for name, module in self.linears.items():
            scheme = schemes[name] if schemes is not None else module.scheme
            for role in ("input", "output"):
                args = getattr(scheme, f"{role}_activations")
                if is_static(args):
                    self.args[(name, role)] = args
        self.observers = {key: activation_observer(args) for key, args in self.args.items()}
        self._arg_keys = {key: args.model_dump_json() for key, args in self.args.items()}
        self._alias: dict[Key, Key] = {}
        self._last: dict[tuple[str, str], tuple[torch.Tensor, Key]] = {}
        self._handles: list = []
        self._reduced = False

    def __enter__(self) -> ActivationCalibrator:
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def _observe(self, key: Key, x: torch.Tensor) -> None:
        share = (key[1], self._arg_keys[key])
        last = self._last.get(share)
        if last is not None and last[0] is x and last[1] != key:
            if self.observers[key].count == 0:
                self._alias.setdefault(key, last[1])
            if self._alias.get(key) == last[1]:
                return
        self.observers[key].update(self._budget(key, x))
        self._last[share] = (x, key)

    def _budget(self, key: Key, x: torch.Tensor) -> torch.Tensor:
        budget = self.token_budget.get(self.observers[key].name)
        tokens = x.reshape(-1, x.shape[-1])
        if budget is None or tokens.shape[0] <= budget:
            return x
        pick = torch.randperm(tokens.shape[0], generator=self._gen)[:budget]
        return tokens[pick.to(x.device)]

    def attach(self) -> None:
        """Register the forward hooks."""
        for name, module in self.linears.items():
            if (name, "input") in self.args:
                key = (name, "input")
                self._handles.append(
                    module.register_forward_pre_hook(lambda _m, a, k=key: self._observe(k, a[0]))
                )
            if (name, "output") in self.args:
                key = (name, "output")
                self._handles.append(
                    module.register_forward_hook(lambda _m, _a, out, k=key: self._observe(k, out))
                )

    def detach(self) -> None:
        """Remove the hooks (the collected statistics stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last.clear()

    def qparams(self) -> dict[Key, QParams]:
        """Static QParams per (module name, role)."""
        out = {}
        if not self._reduced:
            for observer in self.observers.values():  # the same order on every rank
                observer.reduce()
            self._reduced = True
        for key, args in self.args.items():
            source = self._alias.get(key, key) if self.observers[key].count == 0 else key
            obs = self.observers[source]
            if obs.count == 0:
                raise QuantscaleError(f"{key[0]}: no {key[1]} activations observed")
            out[key] = static_qparams(args, obs)
        return out

    def apply(self, linears: Mapping[str, nn.Module] | None = None) -> dict[Key, QParams]:
        """Install the static QParams on the QuantLinears (default: the observed modules)."""
        targets = self.linears if linears is None else linears
        qps = self.qparams()
        for (name, role), qp in qps.items():
            cast(QuantLinear, targets[name]).set_activation_qparams(role, qp)
        return qps
