"""Per-layer sensitivity: the error when only one Linear is quantized, and mixed precision.

For each Linear the recipe targets, that module alone is replaced by its quantized version
(RTN weights, static activation scales calibrated once on the float model) and a probe batch
runs from the module's decoder layer to the final norm (earlier layers are unchanged, so their
float outputs are cached). Two numbers per module:
- `sqnr_db`: SQNR of the module's own output vs the float module on the same inputs;
- `output_mse` (and `output_sqnr_db`): error of the model's final hidden states.
`mixed_precision` keeps the modules with the largest output error at a higher precision (or
float) within a budget and returns the recipe with those overrides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantscale.analysis.sweep import BASELINE, Setting, calibrate_shared
from quantscale.calibration.activations import has_static_activations
from quantscale.calibration.sequential import layer_output, replace_hidden
from quantscale.errors import QuantscaleError
from quantscale.eval.error import sqnr_db
from quantscale.eval.scoring import final_hidden
from quantscale.models.adapter import decoder_layers
from quantscale.orchestrator import rtn_quant_linear, targeted_linears
from quantscale.progress import track
from quantscale.scheme import QuantScheme, Recipe

_FINAL_NORMS = ("norm", "final_layernorm", "norm_f", "ln_f")


@dataclass
class LayerSensitivity:
    name: str
    params: int
    sqnr_db: float
    output_mse: float
    output_sqnr_db: float


class _Probe:
    """Float activations of a probe batch at every decoder layer's input."""

    @torch.inference_mode()
    def __init__(self, model: nn.Module, ids: torch.Tensor) -> None:
        self.prefix, self.layers = decoder_layers(model)
        self.norm = _final_norm(model)
        self.hidden: list[torch.Tensor] = []
        first: list[tuple[tuple, dict]] = []

        def hook(_m, args, kwargs):
            self.hidden.append(args[0] if args else kwargs["hidden_states"])
            if not first:
                first.append((args, dict(kwargs)))

        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in self.layers]
        try:
            self.reference = final_hidden(model, ids).float()
        finally:
            for h in handles:
                h.remove()
        self.args, self.kwargs = first[0]

    @torch.inference_mode()
    def run_from(self, index: int) -> torch.Tensor:
        """Final hidden states when the layers from `index` on are recomputed."""
        hidden = self.hidden[index]
        for layer in self.layers[index:]:
            args, kwargs = replace_hidden(hidden, self.args, self.kwargs)
            hidden = layer_output(layer(*args, **kwargs))
        return self.norm(hidden).float()

    def layer_index(self, name: str) -> int:
        head = name[len(self.prefix) + 1 :].split(".", 1)[0]
        if not name.startswith(self.prefix + ".") or not head.isdigit():
            raise QuantscaleError(f"{name} is not inside a decoder layer ({self.prefix}.N)")
        return int(head)


def _final_norm(model: nn.Module) -> nn.Module:
    base = model.base_model
    for attr in _FINAL_NORMS:
        module = getattr(base, attr, None)
        if isinstance(module, nn.Module):
            return module
    return nn.Identity()


class _OutputError:
    """Forward hook accumulating a QuantLinear's output error vs its float Linear."""

    def __init__(self, reference: nn.Linear) -> None:
        self.reference, self.signal, self.noise = reference, 0.0, 0.0

    def __call__(self, _module, args, out) -> None:
        ref = F.linear(args[0], self.reference.weight, self.reference.bias).float()
        self.signal += float(ref.pow(2).sum())
        self.noise += float((out.float() - ref).pow(2).sum())

    def sqnr_db(self) -> float:
        return 10 * math.log10(self.signal / max(self.noise, 1e-30)) if self.signal else 0.0


def layer_sensitivity(
    model: nn.Module,
    recipe: Recipe,
    calib: Sequence[torch.Tensor],
    probe_ids: torch.Tensor,
    qparams: dict | None = None,
) -> list[LayerSensitivity]:
    """Error of quantizing each targeted Linear alone (model left in float).

    `qparams`: static activation qparams already calibrated for `recipe` (else calibrated
    here on `calib` with one float pass)."""
    modules = {n: mt for n, mt in targeted_linears(model, recipe).items()}
    if not modules:
        raise QuantscaleError("the recipe targets no Linear module of this model")
    if qparams is None:
        setting = Setting("sensitivity", recipe)
        qparams = calibrate_shared(model, [setting], list(calib))[setting.name]
    probe = _Probe(model, probe_ids)
    results = []
    for name, (module, scheme) in track(modules.items(), len(modules), "sensitivity"):
        ql = rtn_quant_linear(name, module, scheme, qparams)
        err = _OutputError(module)
        handle = ql.register_forward_hook(err)
        model.set_submodule(name, ql)
        try:
            out = probe.run_from(probe.layer_index(name))
        finally:
            model.set_submodule(name, module)
            handle.remove()
        mse = float((out - probe.reference).pow(2).mean())
        results.append(
            LayerSensitivity(
                name, module.weight.numel(), err.sqnr_db(), mse, sqnr_db(probe.reference, out)
            )
        )
    return results


def mixed_precision(
    results: Sequence[LayerSensitivity],
    recipe: Recipe,
    budget: float,
    high: QuantScheme | None = None,
) -> tuple[Recipe, list[LayerSensitivity]]:
    """Keep the modules with the largest output MSE at `high` (None: unquantized).

    `budget` < 1: the fraction of the targeted parameters allowed at high precision;
    `budget` >= 1: the number of modules. Returns (recipe with overrides, chosen modules).
    """
    if budget <= 0:
        raise QuantscaleError(f"mixed-precision budget must be positive, got {budget}")
    ranked = sorted(results, key=lambda r: r.output_mse, reverse=True)
    if budget >= 1:
        chosen = ranked[: int(budget)]
    else:
        allowed, chosen, used = budget * sum(r.params for r in results), [], 0
        for r in ranked:
            if used + r.params <= allowed:
                chosen.append(r)
                used += r.params
    overrides = {**recipe.overrides, **{r.name: high for r in chosen}}
    return recipe.model_copy(update={"overrides": overrides}), chosen


def probe_windows(tokenizer: Any, n_tokens: int, seq_len: int = 512) -> torch.Tensor:
    """Held-out tokens as [n, seq_len] windows, from the end of the evaluation split."""
    from quantscale.data.calibration import eval_tokens

    stream = eval_tokens(tokenizer)
    n = max(1, n_tokens // seq_len)
    if stream.numel() < n * seq_len:
        raise QuantscaleError(f"held-out text has {stream.numel()} tokens, fewer than {n_tokens}")
    return stream[-n * seq_len :].reshape(n, seq_len)


def evaluation_settings(
    full: Setting,
    qparams: dict,
    mixed: Setting | None = None,
    high: QuantScheme | None = None,
) -> tuple[list[Setting], dict[str, dict] | None]:
    """The settings comparing the float baseline, the `full` recipe and the `mixed` one, and
    the static scales they share (`run_sweep(shared=)`): the mixed recipe's kept layers need
    none of their own unless their `high` scheme has static activations (then None: every
    setting is calibrated)."""
    settings = [Setting(BASELINE, None), full]
    shared: dict[str, dict] | None = {full.name: qparams}
    if mixed is not None:
        settings.append(mixed)
        shared = {full.name: qparams, mixed.name: qparams}
        if high is not None and has_static_activations([high]):
            shared = None
    return settings, shared
