"""Mamba / Mamba2 adapter: the quantization points of a mixer, their defaults, and reordering.

Points of a mixer (transformers' `MambaMixer` / `Mamba2Mixer`), by name:

weights (symmetric INT8, per output channel by default)
  in_proj.weight, conv1d.weight, out_proj.weight, and for Mamba1 x_proj.weight, dt_proj.weight;
  the projections (in_proj, x_proj, out_proj) take `weight_bits: 4` (Quamba2's W4A8 / W4A16:
  symmetric int4, groups of `weight_group_size` input columns where they tile the input,
  else per output channel), by round to nearest or GPTQ (`weight_method`)
activations (static symmetric INT8 scales)
  in_proj.input    output of the block's RMSNorm
  conv1d.input     x (Mamba1) or xBC (Mamba2) from in_proj, before the causal conv
  ssm.x            conv1d output after SiLU: the SSM's x; for Mamba1 also x_proj's input
  ssm.B, ssm.C     Mamba1: x_proj output slices; Mamba2: conv1d output slices
  ssm.dt           time step before its bias and softplus (dt_proj output / in_proj slice)
  ssm.z            the gate (in_proj slice)
  dt_proj.input    Mamba1 only: the low-rank time step (x_proj output slice)
  out_proj.input   the gated SSM output (Mamba2: after the gated RMSNorm)
kept in float unless asked
  norm.weight      the RMSNorm before each block (asked: its weight is rounded to an INT8 grid)
never quantized: A_log, D, dt bias, the mixer's gated norm, embeddings, final norm, lm_head.

Quamba1 (`method="quamba1"`): per-tensor scales; ssm.x (the x_proj / SSM input) uses the
percentile observer with an EMA of the per-batch value (alpha 0.9995, or 0.99999 for models
under 300M parameters), every other point min-max. Quamba2 (`method="quamba2"`): ssm.x gets
piecewise scales, one per (SSD group, head group, channel group) after clustering and
reordering (see `quantscale.mamba.grouping`), ssm.B / ssm.C one scale per SSD group,
min-max everywhere.

W4A16 blocks (`activation_bits: 16`, or the `a16_layers` of a mixed W4A8 / W4A16 model) keep
every activation point, conv1d and dt_proj in float: only the projections are quantized.
`a16_budget: k` chooses those layers when quantizing: the k blocks whose loss rises most when
that block alone is W4A8 (`quantize.block_sensitivity`).
`scale_budget: k` uses the same scan for the plan's x0.8 variant: the k most sensitive blocks
keep INT8 activations, every activation scale multiplied by `scale_factor` (0.8) after
calibration (`scale_layers` records them).

A point rule may ask for `per_channel` scales (one per channel, as the LLM path's channel
strategy for activations; `per_channel: true` asks it for every activation point);
`layer_rules` override points in single blocks (negative indices count from the end), e.g.
the first block's ssm.x at alpha 1.0. `adaptive_groups` (Quamba2) picks per block the
smallest of the candidate group counts k (k head groups x k channel groups) whose SQNR of
ssm.x, measured on a sample of the calibration tokens, is within `adaptive_sqnr_db` of the
best candidate's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from quantscale.errors import QuantscaleError
from quantscale.mamba.grouping import GroupPlan
from quantscale.scheme import LearnScales

MambaKind = Literal["mamba", "mamba2"]
MAMBA_MODEL_TYPES: tuple[MambaKind, ...] = ("mamba", "mamba2")
WeightStrategy = Literal["channel", "tensor"]

_COMMON_ACTS = (
    "in_proj.input",
    "conv1d.input",
    "ssm.x",
    "ssm.B",
    "ssm.C",
    "ssm.dt",
    "ssm.z",
    "out_proj.input",
)
ACTIVATION_POINTS: dict[str, tuple[str, ...]] = {
    "mamba": (*_COMMON_ACTS, "dt_proj.input"),
    "mamba2": _COMMON_ACTS,
}
WEIGHT_POINTS: dict[str, tuple[str, ...]] = {
    "mamba": (
        "in_proj.weight",
        "conv1d.weight",
        "x_proj.weight",
        "dt_proj.weight",
        "out_proj.weight",
    ),
    "mamba2": ("in_proj.weight", "conv1d.weight", "out_proj.weight"),
}
OFF_BY_DEFAULT = ("norm.weight",)
SMALL_MODEL_PARAMS = 300_000_000
PIECEWISE_POINTS = ("ssm.x", "ssm.B", "ssm.C")
PROJECTIONS = ("in_proj", "x_proj", "out_proj")  # the Linears `weight_bits` applies to
A16_FLOAT_WEIGHTS = ("conv1d.weight", "dt_proj.weight")  # float in a W4A16 block


def is_mamba_config(config: dict) -> bool:
    """Whether a config.json dict describes a Mamba or Mamba2 model."""
    return config.get("model_type") in MAMBA_MODEL_TYPES


def mamba_kind(model_or_config: Any) -> MambaKind:
    """'mamba' or 'mamba2' from a model or its config; QuantscaleError for anything else."""
    config = getattr(model_or_config, "config", model_or_config)
    kind = getattr(config, "model_type", None)
    if kind not in MAMBA_MODEL_TYPES:
        raise QuantscaleError(f"expected a Mamba or Mamba2 model, got model_type {kind!r}")
    return kind


def all_points(kind: MambaKind) -> tuple[str, ...]:
    """Every point name of a mixer of this kind (weights, activations, optional ones)."""
    return (*WEIGHT_POINTS[kind], *ACTIVATION_POINTS[kind], *OFF_BY_DEFAULT)


class PointRule(BaseModel):
    """A user override for one point; unset fields keep the method's default."""

    model_config = ConfigDict(extra="forbid")

    quantize: bool | None = None
    observer: str | None = None
    observer_kwargs: dict[str, Any] = Field(default_factory=dict)
    piecewise: bool | None = None
    per_channel: bool | None = None


class MambaRecipe(BaseModel):
    """How to quantize a Mamba model, Quamba-style (saved with the quantized checkpoint)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["quamba1", "quamba2"] = "quamba1"
    weight_strategy: WeightStrategy = "channel"
    percentile_alpha: float | None = None  # None: by model size (see module docstring)
    ema_sigma: float = 0.01
    sigma_warmup: int = 0  # batches the EMA momentum of ssm.x ramps up over (observers.base)
    per_channel: bool = False  # one scale per channel at every activation point
    head_groups: int = 4
    channel_groups: int = 4
    float_layers: list[int] = Field(default_factory=list)
    points: dict[str, PointRule] = Field(default_factory=dict)
    n_samples: int = 512
    seq_len: int = 512
    batch_size: int = 8
    rotate: Literal["hadamard"] | None = None  # Quamba1's Hadamard on the out_proj input
    weight_bits: Literal[4, 8] = 8  # in_proj / x_proj / out_proj (conv1d, dt_proj: 8)
    weight_group_size: int | None = None  # int4 input-column groups; None: per channel
    weight_method: Literal["rtn", "gptq"] = "rtn"
    gptq_inputs: Literal["float", "quantized"] = "float"  # Hessians of x or of its INT8 qdq
    activation_bits: Literal[8, 16] = 8  # 16: float activations in every block (W4A16)
    a16_layers: list[int] = Field(default_factory=list)  # blocks with float activations
    a16_budget: int | None = None  # choose a16_layers: the k most sensitive blocks
    layer_rules: dict[int, dict[str, PointRule]] = Field(default_factory=dict)
    scale_budget: int | None = None  # choose scale_layers: the k most sensitive blocks
    scale_layers: list[int] = Field(default_factory=list)  # activation scales x scale_factor
    scale_factor: float = 0.8
    adaptive_groups: list[int] | None = None  # Quamba2: candidate k per block (k x k groups)
    adaptive_sqnr_db: float = 1.0
    learn_scales: LearnScales | None = None  # LSQ on each block's scales (algorithms.lsq)

    @field_validator(
        "head_groups", "channel_groups", "n_samples", "seq_len", "batch_size", "weight_group_size"
    )
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be at least 1, got {v}")
        return v

    @field_validator("adaptive_groups")
    @classmethod
    def _candidates(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 1):
            raise ValueError(f"candidate group counts must be >= 1 (and at least one): {v}")
        return v

    @field_validator("scale_factor")
    @classmethod
    def _factor(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be positive, got {v}")
        return v

    @field_validator("a16_budget", "scale_budget")
    @classmethod
    def _budget(cls, v: int | None) -> int | None:
        if v is not None and v < 0:
            raise ValueError(f"must be at least 0, got {v}")
        return v

    @property
    def piecewise(self) -> bool:
        return self.method == "quamba2"

    @property
    def weight_format(self) -> WeightFormat:
        return WeightFormat(self.weight_strategy, self.weight_bits, self.weight_group_size)

    def a16_set(self, n_layers: int) -> set[int]:
        """Indices of the blocks whose activations stay float (W4A16)."""
        if self.activation_bits == 16:
            return set(range(n_layers))
        return {layer_index(i, n_layers, "a16_layers") for i in self.a16_layers}

    def with_options(self, **fields: Any) -> MambaRecipe:
        """A validated copy with every field given a value (not None) replaced."""
        update = {k: v for k, v in fields.items() if v is not None}
        return MambaRecipe.model_validate({**self.model_dump(), **update})


def read_recipe(path: str | os.PathLike) -> MambaRecipe:
    """A MambaRecipe from a YAML (or JSON) file."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise QuantscaleError(f"recipe file {file} does not exist")
    return MambaRecipe.model_validate(yaml.safe_load(file.read_text()))


@dataclass(frozen=True)
class WeightFormat:
    """How a mixer's weights are stored: 8-bit `strategy` (channel / tensor) for all, or
    `bits` 4 for the projections, in groups of `group_size` input columns (None: per output
    channel; also where the groups do not tile the input)."""

    strategy: WeightStrategy = "channel"
    bits: int = 8
    group_size: int | None = None


@dataclass(frozen=True)
class PointSpec:
    """The resolved treatment of one point."""

    quantize: bool
    observer: str = "minmax"
    observer_kwargs: tuple[tuple[str, Any], ...] = ()
    piecewise: bool = False
    per_channel: bool = False


def default_alpha(n_params: int) -> float:
    """Quamba's percentile: 0.99999 for small (130M-class) models, else 0.9995."""
    return 0.99999 if n_params < SMALL_MODEL_PARAMS else 0.9995


def _default_spec(name: str, recipe: MambaRecipe, alpha: float) -> PointSpec:
    if name in OFF_BY_DEFAULT:
        return PointSpec(quantize=False)
    per_channel = recipe.per_channel and name not in WEIGHT_POINTS["mamba"]
    if name == "ssm.x" and not recipe.piecewise:
        kwargs: tuple[tuple[str, Any], ...] = (("alpha", alpha), ("sigma", recipe.ema_sigma))
        if recipe.sigma_warmup:
            kwargs += (("sigma_warmup", recipe.sigma_warmup),)
        return PointSpec(True, "percentile", kwargs, per_channel=per_channel)
    piecewise = recipe.piecewise and name in PIECEWISE_POINTS and not per_channel
    return PointSpec(True, "minmax", (), piecewise, per_channel)


def resolve_points(kind: MambaKind, recipe: MambaRecipe, n_params: int) -> dict[str, PointSpec]:
    """Point name -> PointSpec: the method's defaults with the recipe's overrides applied."""
    names = all_points(kind)
    unknown = sorted(set(recipe.points) - set(names))
    if unknown:
        raise QuantscaleError(
            f"unknown {kind} quantization point(s) {unknown}; known: {', '.join(names)}"
        )
    for rules in recipe.layer_rules.values():
        unknown = sorted(set(rules) - set(names))
        if unknown:
            raise QuantscaleError(
                f"unknown {kind} quantization point(s) {unknown} in layer_rules; "
                f"known: {', '.join(names)}"
            )
    alpha = recipe.percentile_alpha or default_alpha(n_params)
    specs = {}
    for name in names:
        specs[name] = apply_rule(name, _default_spec(name, recipe, alpha), recipe.points.get(name))
    return specs


def apply_rule(name: str, spec: PointSpec, rule: PointRule | None) -> PointSpec:
    """A point's spec with a rule's set fields applied (per-channel scales replace
    piecewise ones unless the rule asks for both, which is an error)."""
    if rule is not None:
        per_channel = spec.per_channel if rule.per_channel is None else rule.per_channel
        piecewise = spec.piecewise if rule.piecewise is None else rule.piecewise
        if per_channel and rule.piecewise:
            raise QuantscaleError(f"point {name!r}: per_channel and piecewise scales exclude")
        spec = PointSpec(
            quantize=spec.quantize if rule.quantize is None else rule.quantize,
            observer=rule.observer or spec.observer,
            observer_kwargs=tuple(sorted(rule.observer_kwargs.items()))
            if rule.observer
            else spec.observer_kwargs,
            piecewise=piecewise and not per_channel,
            per_channel=per_channel,
        )
    if spec.piecewise and name not in PIECEWISE_POINTS:
        raise QuantscaleError(f"point {name!r} cannot have piecewise scales")
    return spec


def layer_points(
    specs: dict[str, PointSpec], kind: MambaKind, recipe: MambaRecipe, index: int, n_layers: int
) -> dict[str, PointSpec]:
    """The specs of block `index`: `specs` with the recipe's `layer_rules` for that block,
    or for a W4A16 block (`recipe.a16_set`) every activation point, conv1d and dt_proj in
    float."""
    if index in recipe.a16_set(n_layers):
        off = (*ACTIVATION_POINTS[kind], *A16_FLOAT_WEIGHTS)
        return {n: replace(s, quantize=False) if n in off else s for n, s in specs.items()}
    rules: dict[str, PointRule] = {}
    for i, own in recipe.layer_rules.items():
        if layer_index(i, n_layers, "layer_rules") == index:
            rules |= own
    return {n: apply_rule(n, s, rules.get(n)) for n, s in specs.items()}


def layer_index(i: int, n_layers: int, field: str) -> int:
    if not -n_layers <= i < n_layers:
        raise QuantscaleError(f"{field} entry {i} is outside 0..{n_layers - 1}")
    return i % n_layers


def quantized_layers(n_layers: int, recipe: MambaRecipe) -> list[int]:
    """Indices of the layers to quantize (all but `recipe.float_layers`, negatives allowed)."""
    skip = {layer_index(i, n_layers, "float_layers") for i in recipe.float_layers}
    return [i for i in range(n_layers) if i not in skip]


# ----------------------------------------------------------------------------- reordering


def child_module(owner: nn.Module, name: str) -> nn.Module:
    """A submodule by name (a block's mixer, a mixer's in_proj, ...), typed."""
    part = getattr(owner, name)
    assert isinstance(part, nn.Module), name
    return part


def module_tensor(owner: nn.Module, name: str) -> torch.Tensor:
    """A parameter or buffer by name (weight, A_log, D, ...), typed."""
    value = getattr(owner, name)
    assert isinstance(value, torch.Tensor), name
    return value


def _size(mixer: nn.Module, name: str) -> int:
    value = getattr(mixer, name)
    assert isinstance(value, int), name
    return value


def _take(t: torch.Tensor, index: torch.Tensor, dim: int = 0) -> None:
    """Reorder `dim` of a parameter in place (the same object keeps the new values)."""
    t.data = t.data.index_select(dim, index).contiguous()


def _take_rows(module: nn.Module, index: torch.Tensor) -> None:
    """Reorder dim 0 of a module's weight (and bias) in place."""
    _take(module_tensor(module, "weight"), index)
    bias = getattr(module, "bias", None)
    if bias is not None:
        _take(bias, index)


def _take_cols(linear: nn.Module, index: torch.Tensor) -> None:
    _take(module_tensor(linear, "weight"), index, dim=1)


@torch.no_grad()
def reorder_mixer(mixer: nn.Module, kind: MambaKind, plan: GroupPlan) -> None:
    """Permute a mixer's x channels (and Mamba2 heads) as `plan` says, weights and all.

    Works on transformers' mixers and on `quantscale.mamba.quamba` mixers before they are
    frozen (same attribute names); the mixer's float output does not change.
    """
    out_proj = child_module(mixer, "out_proj")
    perm = plan.perm.to(module_tensor(out_proj, "weight").device)
    inner = perm.numel()
    if kind == "mamba":
        _take_rows(child_module(mixer, "in_proj"), torch.cat([perm, inner + perm]))
        _take_rows(child_module(mixer, "conv1d"), perm)
        _take_cols(child_module(mixer, "x_proj"), perm)
        _take_rows(child_module(mixer, "dt_proj"), perm)
        _take(module_tensor(mixer, "A_log"), perm)
        _take(module_tensor(mixer, "D"), perm)
    else:
        assert plan.head_perm is not None, "a Mamba2 plan permutes heads"
        heads = plan.head_perm.to(perm.device)
        conv = child_module(mixer, "conv1d")
        conv_dim = module_tensor(conv, "weight").shape[0]
        bc = torch.arange(inner, conv_dim, device=perm.device)
        rows = [perm, inner + perm, inner + bc, inner + conv_dim + heads]
        _take_rows(child_module(mixer, "in_proj"), torch.cat(rows))
        _take_rows(conv, torch.cat([perm, bc]))
        for name in ("A_log", "D", "dt_bias"):
            _take(module_tensor(mixer, name), heads)
        _take(module_tensor(child_module(mixer, "norm"), "weight"), perm)
    _take_cols(out_proj, perm)


def mixer_shape(mixer: nn.Module, kind: MambaKind) -> dict[str, int]:
    """Sizes of a mixer: inner (x channels), heads, head_dim, ssd_groups, state."""
    inner = module_tensor(child_module(mixer, "out_proj"), "weight").shape[1]
    if kind == "mamba":
        state = module_tensor(mixer, "A_log").shape[1]
        return {"inner": inner, "heads": inner, "head_dim": 1, "ssd_groups": 1, "state": state}
    return {
        "inner": inner,
        "heads": _size(mixer, "num_heads"),
        "head_dim": _size(mixer, "head_dim"),
        "ssd_groups": _size(mixer, "n_groups"),
        "state": _size(mixer, "ssm_state_size"),
    }
