"""One typed schema that is both the user's recipe and the saved `quantization_config`.

Field names follow compressed-tensors (`QuantizationArgs`, `QuantizationScheme`,
`QuantizationConfig`) so that its own pydantic models parse what `Recipe.to_quantization_config`
writes. Module-name patterns: `re:<regex>` (matched from the start, as compressed-tensors and
vLLM do), a glob with `*`/`?`, or a plain name that matches exactly or as a dotted suffix
(`lm_head` matches `model.lm_head`). Targets without a dot or wildcard that start with a capital
letter (`Linear`) match the module's class name.

Observer names: recipes use ours (`minmax` = running extremes, `ema`, `mse`, `percentile`...);
`to_quantization_config` writes llm-compressor's name for the same statistic (`ct_observer`:
activations minmax -> `static_minmax`, ema -> `minmax` with its `averaging_constant`, weights
minmax / mse -> `memoryless_minmax` / `memoryless_mse`) and reading translates back, a bare
`minmax` keeping our old meaning.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from quantscale.errors import QuantscaleError
from quantscale.naming import DEFAULT_IGNORE

if TYPE_CHECKING:
    import torch

Strategy = Literal["tensor", "channel", "group", "block", "token", "tensor_group", "attn_head"]


class QuantArgs(BaseModel):
    """How one tensor (weight or activation) is quantized."""

    model_config = ConfigDict(extra="forbid")

    num_bits: int = 8
    type: Literal["int", "float"] = "int"
    symmetric: bool = True
    group_size: int | None = None
    strategy: Strategy | None = None
    block_structure: list[int] | None = None
    dynamic: bool | Literal["local"] = False
    actorder: Literal["group", "weight"] | None = None
    scale_dtype: str | None = None
    zp_dtype: str | None = None
    observer: str | None = None
    observer_kwargs: dict[str, Any] = Field(default_factory=dict)
    # GGUF k-quants: the group scales (and zero points) of each `superblock` weights of a row
    # are integers times one float16 scale (`KQUANTS`; `qdq.superblock_qparams`)
    superblock: int | None = None

    @field_validator("type", "strategy", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("actorder", mode="before")
    @classmethod
    def _actorder(cls, v: Any) -> Any:
        if v is False:
            return None
        aliases = {"static": "weight", "dynamic": "group"}
        return aliases.get(v.lower(), v.lower()) if isinstance(v, str) else v

    @field_validator("block_structure", mode="before")
    @classmethod
    def _block(cls, v: Any) -> Any:
        return [int(p) for p in v.split("x")] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _infer_and_check(self) -> QuantArgs:
        s, g = self.strategy, self.group_size
        if s is None:
            s = "tensor" if g is None else "channel" if g == -1 else "group"
            object.__setattr__(self, "strategy", s)
        if s in ("group", "tensor_group") and (g is None or g <= 0):
            raise ValueError(f"strategy {s!r} needs a positive group_size, got {g}")
        if s == "block" and (not self.block_structure or len(self.block_structure) != 2):
            raise ValueError("strategy 'block' needs block_structure [rows, cols]")
        if s != "block" and self.block_structure is not None:
            raise ValueError(f"block_structure given with strategy {s!r}; use strategy 'block'")
        if s == "token" and not self.dynamic:
            raise ValueError("strategy 'token' is dynamic only: set dynamic: true")
        if self.dynamic == "local" and s != "tensor_group":
            raise ValueError("dynamic 'local' needs strategy 'tensor_group'")
        if self.type == "float" and self.num_bits not in (4, 8):
            raise ValueError(f"float quantization supports 4 or 8 bits, got {self.num_bits}")
        if self.type == "float" and not self.symmetric:
            raise ValueError("float quantization is symmetric only")
        if self.superblock is not None and self.kquant is None:
            raise ValueError(
                f"superblock {self.superblock}: the GGUF k-quants are {', '.join(KQUANTS)} "
                f"(int6 symmetric groups of 16, int4 asymmetric groups of 32, superblock 256)"
            )
        return self

    @property
    def kquant(self) -> str | None:
        """The GGUF k-quant type these args are ('Q4_K', 'Q6_K'), else None."""
        if self.superblock is None or self.type != "int" or self.strategy != "group":
            return None
        key = (self.num_bits, self.symmetric, self.group_size, self.superblock)
        return next((k for k, spec in KQUANTS.items() if spec == key), None)

    @property
    def is_nvfp4(self) -> bool:
        """FP4 with a per-tensor global scale and E4M3 group scales."""
        return self.type == "float" and self.num_bits == 4 and self.strategy == "tensor_group"

    @property
    def is_mx(self) -> bool:
        """FP4 with power-of-two (E8M0) group scales."""
        return (
            self.type == "float"
            and self.num_bits == 4
            and self.strategy == "group"
            and (self.scale_dtype in ("uint8", "torch.uint8") or self.group_size == 32)
        )

    def to_config(self, role: str = "activation") -> dict[str, Any]:
        """Dict in compressed-tensors' QuantizationArgs layout (unset optional fields left out),
        the observer named as llm-compressor names it (`ct_observer`; role 'weight' or
        'activation')."""
        d = self.model_dump()
        d["observer"], d["observer_kwargs"] = ct_observer(self, role)
        for key in (
            "actorder",
            "block_structure",
            "scale_dtype",
            "zp_dtype",
            "observer",
            "superblock",
        ):
            if d.get(key) is None:
                d.pop(key)
        if not d["observer_kwargs"]:
            d.pop("observer_kwargs")
        return d


def declared_scale_dtype(args: QuantArgs) -> torch.dtype | None:
    """The scheme's `scale_dtype` as a torch dtype (None when the scheme names none)."""
    if not args.scale_dtype:
        return None
    import torch

    dtype = getattr(torch, args.scale_dtype.removeprefix("torch."))
    assert isinstance(dtype, torch.dtype), args.scale_dtype
    return dtype


class QuantScheme(BaseModel):
    """Weights / input / output activation settings for the modules matching `targets`."""

    model_config = ConfigDict(extra="forbid")

    targets: list[str] = Field(default_factory=lambda: ["Linear"])
    weights: QuantArgs | None = None
    input_activations: QuantArgs | None = None
    output_activations: QuantArgs | None = None
    format: str | None = None

    def to_config(self) -> dict[str, Any]:
        """Dict in compressed-tensors' QuantizationScheme layout."""
        return {
            "targets": list(self.targets),
            "weights": self.weights.to_config("weight") if self.weights else None,
            "input_activations": (
                self.input_activations.to_config() if self.input_activations else None
            ),
            "output_activations": (
                self.output_activations.to_config() if self.output_activations else None
            ),
            "format": self.format,
        }


def match_pattern(name: str, pattern: str, module_type: str | None = None) -> bool:
    """Whether module `name` (of class `module_type`) matches a target/ignore pattern."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    if module_type is not None and pattern == module_type:
        return True
    return name == pattern or name.endswith("." + pattern)


def _specificity(name: str, pattern: str, module_type: str | None) -> int | None:
    """0 exact name, 1 regex/glob/suffix, 2 class name, None no match (compressed-tensors order)."""
    if pattern == name:
        return 0
    if module_type is not None and pattern == module_type:
        return 2
    return 1 if match_pattern(name, pattern) else None


def _to_ct_pattern(pattern: str) -> str:
    """Glob -> the plain `re:` pattern other tools write (`*.gate` -> `re:.*\\.gate$`);
    other patterns unchanged. No atomic groups or inline flags: any `re` reads it."""
    if pattern.startswith("re:") or not any(ch in pattern for ch in "*?["):
        return pattern
    return "re:" + _glob_regex(pattern)


def _glob_regex(glob: str) -> str:
    """A glob as a regex matched from the start (`re.match`) of the whole name."""
    out, i = [], 0
    while i < len(glob):
        ch = glob[i]
        end = _set_end(glob, i) if ch == "[" else -1
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif end > 0:
            body = glob[i + 1 : end].replace("\\", "\\\\")
            if body.startswith("!"):
                body = "^" + body[1:]
            elif body.startswith(("^", "[")):
                body = "\\" + body
            out.append("[" + body + "]")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out) + "$"


def _set_end(glob: str, start: int) -> int:
    """Index of the ']' closing the set that opens at glob[start] ('['), -1 if none (the '['
    is then literal). As fnmatch: a ']' right after '[' or '[!' is a member, not the end."""
    k = start + 1
    if k < len(glob) and glob[k] == "!":
        k += 1
    if k < len(glob) and glob[k] == "]":
        k += 1
    return glob.find("]", k)


class LearnScales(BaseModel):
    """Learned static activation scales (`algorithms.lsq`): Adam steps per decoder layer and
    the learning rate relative to each scale's observer value."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=100, ge=0)
    lr: float = Field(default=0.01, gt=0)


class Recipe(BaseModel):
    """A quantization request: config groups, ignore list and per-module overrides."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    config_groups: dict[str, QuantScheme]
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE))
    overrides: dict[str, QuantScheme | None] = Field(default_factory=dict)
    kv_cache_scheme: QuantArgs | None = None
    format: str | None = None
    # algorithms.rotation, fused before quantizing; "hadamard-smooth" reloads as "hadamard"
    rotate: Literal["hadamard", "hadamard-smooth"] | None = None
    gguf_mix: Literal["Q4_K_M"] | None = None  # GGUF_MIXES: resolved by `place_ggml_blocks`
    learn_scales: LearnScales | None = None  # algorithms.lsq, after each layer's calibration

    @field_validator("overrides", mode="before")
    @classmethod
    def _resolve_override_presets(cls, v: Any) -> Any:
        """Preset names among the override values become their schemes."""
        if not isinstance(v, dict):
            return v
        return {k: (preset_scheme(s) if isinstance(s, str) else s) for k, s in v.items()}

    def with_ignored(self, patterns: list[str] | tuple[str, ...]) -> Recipe:
        """This recipe with `patterns` added to its ignore list (those not there yet)."""
        extra = [p for p in patterns if p not in self.ignore]
        return self.model_copy(update={"ignore": [*self.ignore, *extra]}) if extra else self

    def is_ignored(self, module_name: str) -> bool:
        """Whether the ignore list (or a `None` override) excludes the module."""
        if any(match_pattern(module_name, p) for p in self.ignore):
            return True
        return any(s is None and match_pattern(module_name, p) for p, s in self.overrides.items())

    def scheme_for(
        self, module_name: str, module_type: str | None = "Linear"
    ) -> QuantScheme | None:
        """The scheme for one module, or None when ignored / untargeted.

        Overrides come first; among all matching targets the most specific wins (exact name,
        then pattern, then class name), then the earliest.
        """
        if self.is_ignored(module_name):
            return None
        candidates: list[tuple[int, int, QuantScheme | None]] = []
        order = 0
        for pattern, scheme in self.overrides.items():
            spec = _specificity(module_name, pattern, None)
            if spec is not None:
                candidates.append((spec, order, scheme))
            order += 1
        for scheme in self.config_groups.values():
            for target in scheme.targets:
                spec = _specificity(module_name, target, module_type)
                if spec is not None:
                    candidates.append((spec, order, scheme))
            order += 1
        if not candidates:
            return None
        return min(candidates, key=lambda c: (c[0], c[1]))[2]

    def place_ggml_blocks(self, widths: dict[str, int]) -> Recipe:
        """Exact-name overrides (in place) that make the recipe what llama.cpp would write
        for Linears of these input widths: the mix's Q6_K layers (`more_bits_layer`), then
        each k-quant weight whose rows are not a multiple of its superblock at llama.cpp's
        fallback type (`KQUANT_FALLBACK`: Q4_K -> Q5_0, Q6_K -> Q8_0)."""
        if self.gguf_mix is not None:
            kinds = GGUF_MIXES[self.gguf_mix][1]
            layers = {int(m.group(1)) for n in widths if (m := _LAYER_INDEX.search(n))}
            for name in widths:
                m = _LAYER_INDEX.search(name)
                if m and name.endswith(kinds) and more_bits_layer(int(m.group(1)), len(layers)):
                    if self.scheme_for(name) is not None:
                        self.overrides.setdefault(name, preset_scheme("Q6_K"))
        for name, width in widths.items():
            scheme = self.scheme_for(name)
            args = scheme.weights if scheme is not None else None
            if args is not None and args.kquant and width % (args.superblock or 1):
                self.overrides[name] = preset_scheme(KQUANT_FALLBACK[args.kquant])
        return self

    def resolved_format(self) -> str:
        """Global `format`: the explicit one, the groups' common one, or 'mixed-precision'."""
        if self.format:
            return self.format
        formats = {s.format or "dense" for s in self._all_schemes()}
        return formats.pop() if len(formats) == 1 else "mixed-precision"

    def _all_schemes(self) -> list[QuantScheme]:
        extra = [s for s in self.overrides.values() if isinstance(s, QuantScheme)]
        return list(self.config_groups.values()) + extra

    def to_quantization_config(self, status: str = "compressed") -> dict[str, Any]:
        """config.json `quantization_config` in compressed-tensors' layout.

        Overrides become config groups targeting their pattern (a pattern outranks a class
        name there too); `None` overrides join `ignore`. Globs are written as `re:` patterns.
        """
        groups: dict[str, Any] = {}
        ignore = [_to_ct_pattern(p) for p in self.ignore]
        for i, (pattern, scheme) in enumerate(self.overrides.items()):
            if scheme is None:
                ignore.append(_to_ct_pattern(pattern))
                continue
            cfg = scheme.to_config()
            cfg["targets"] = [_to_ct_pattern(pattern)]
            groups[f"override_{i}"] = cfg
        for name, scheme in self.config_groups.items():
            groups[name] = scheme.to_config()
        return {
            "quant_method": "compressed-tensors",
            "format": self.resolved_format(),
            "quantization_status": status,
            "config_groups": groups,
            "ignore": ignore,
            "kv_cache_scheme": self.kv_cache_scheme.to_config() if self.kv_cache_scheme else None,
            "global_compression_ratio": None,
            "sparsity_config": {},
            **({"transform_config": online_transform_config()} if self.rotate else {}),
        }

    @classmethod
    def from_quantization_config(cls, cfg: dict[str, Any]) -> Recipe:
        """Parse a compressed-tensors `quantization_config` (override groups restored)."""
        if cfg.get("quant_method", "compressed-tensors") != "compressed-tensors":
            raise QuantscaleError(
                f"quantization_config has quant_method {cfg.get('quant_method')!r}; "
                "expected 'compressed-tensors'"
            )
        groups: dict[str, QuantScheme] = {}
        overrides: dict[str, QuantScheme | None] = {}
        for name, g in cfg.get("config_groups", {}).items():
            if isinstance(g, list):  # a preset name mapped to its targets
                scheme = preset_scheme(name).model_copy(update={"targets": g})
            else:
                scheme = QuantScheme.model_validate(_strip_ct_only(g))
            if name.startswith("override_") and len(scheme.targets) == 1:
                overrides[scheme.targets[0]] = scheme.model_copy(update={"targets": ["Linear"]})
            else:
                groups[name] = scheme
        kv = cfg.get("kv_cache_scheme")
        return cls(
            config_groups=groups,
            ignore=list(cfg.get("ignore") or []),
            overrides=overrides,
            kv_cache_scheme=QuantArgs.model_validate(_strip_args(kv)) if kv else None,
            format=cfg.get("format"),
            rotate=_rotation_of(cfg.get("transform_config")),
        )


def _strip_args(d: dict[str, Any] | None, role: str = "activation") -> dict[str, Any] | None:
    if not d:
        return d
    out = {k: v for k, v in d.items() if k in QuantArgs.model_fields}
    if out.get("observer"):
        out["observer"], out["observer_kwargs"] = our_observer(
            out["observer"], out.get("observer_kwargs") or {}, role
        )
    return out


def _strip_ct_only(g: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in g.items() if k in QuantScheme.model_fields}
    for key in ("weights", "input_activations", "output_activations"):
        out[key] = _strip_args(out.get(key), "weight" if key == "weights" else "activation")
    return out


# ---------------------------------------------------------------- observer names

# Our observer -> llm-compressor's observer computing the same statistic, per role.
_CT_NAMES = {
    ("weight", "minmax"): "memoryless_minmax",
    ("weight", "ema"): "memoryless_minmax",  # one observation: the average is the min-max
    ("weight", "mse"): "memoryless_mse",
    ("activation", "minmax"): "static_minmax",
    ("activation", "ema"): "minmax",
    ("activation", "mse"): "mse",
}
_OUR_NAMES = {
    "static_minmax": "minmax",
    "memoryless_minmax": "minmax",
    "memoryless_mse": "mse",
    "moving_average_minmax": "ema",
}
EMA_SIGMA = 0.01  # our EMA default, llm-compressor's default averaging_constant
# Our MSE search settings that llm-compressor's defaults differ from (norm 2.4, patience 5).
MSE_DEFAULTS = {"norm": 2.0, "patience": 10}


def ct_observer(args: QuantArgs, role: str) -> tuple[str | None, dict[str, Any]]:
    """(observer, observer_kwargs) as llm-compressor names the statistic our observer takes.

    Our activation `mse` averages per-batch searches evenly; llm-compressor's `mse` (the
    nearest) is a moving average. Observers it lacks (percentile, aciq, kl) keep our names."""
    name, kwargs = args.observer, dict(args.observer_kwargs)
    if name is None:
        return None, kwargs
    ours = _OUR_NAMES.get(name.lower(), name.lower())
    ct = _CT_NAMES.get((role, ours), name)
    if ours == "ema" and role == "activation":
        kwargs["averaging_constant"] = kwargs.pop("sigma", EMA_SIGMA)
    if ours == "mse":
        kwargs = {**MSE_DEFAULTS, **kwargs}
    return ct, kwargs


def our_observer(name: str, kwargs: dict[str, Any], role: str) -> tuple[str, dict[str, Any]]:
    """Inverse of `ct_observer`: llm-compressor's name (or ours, as older configs wrote) ->
    (our observer, kwargs). A bare `minmax` is read as our running min-max."""
    kwargs = dict(kwargs)
    key = name.lower()
    if key == "minmax" and "averaging_constant" in kwargs:
        sigma = kwargs.pop("averaging_constant")
        if role == "weight":  # one observation: any moving average is the min-max
            return "minmax", kwargs
        return "ema", ({} if sigma == EMA_SIGMA else {"sigma": sigma}) | kwargs
    ours = _OUR_NAMES.get(key, key)
    if ours == "mse":
        kwargs = {k: v for k, v in kwargs.items() if MSE_DEFAULTS.get(k, object()) != v}
    return ours, kwargs


# ---------------------------------------------------------------- presets

_FP8 = {"num_bits": 8, "type": "float", "symmetric": True}
_INT8 = {"num_bits": 8, "type": "int", "symmetric": True}
_FP4 = {"num_bits": 4, "type": "float", "symmetric": True}
_NVFP4_W = {
    **_FP4,
    "strategy": "tensor_group",
    "group_size": 16,
    "scale_dtype": "torch.float8_e4m3fn",
}
_MXFP4_W = {**_FP4, "strategy": "group", "group_size": 32, "scale_dtype": "torch.uint8"}
_GGUF_Q = {
    "type": "int",
    "symmetric": True,
    "strategy": "group",
    "group_size": 32,
    "scale_dtype": "torch.float16",
}
_INT4_G128 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}
# GGUF k-quant type -> (num_bits, symmetric, group_size, superblock): Q6_K holds int6 codes in
# 16 groups of 16 with int8 group scales times a float16 d; Q4_K int4 codes (0..15) in 8
# groups of 32 with 6-bit scales and 6-bit mins times float16 d and dmin.
KQUANTS: dict[str, tuple[int, bool, int, int]] = {
    "Q6_K": (6, True, 16, 256),
    "Q4_K": (4, False, 32, 256),
}
# llama.cpp's replacement where a row is not a multiple of 256 (llama-quant.cpp's fallback)
KQUANT_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}
# GGUF mixes: base k-quant, and the module kinds llama.cpp raises to Q6_K on the layers
# `more_bits_layer` picks (llama-quant.cpp, LLAMA_FTYPE_MOSTLY_Q4_K_M)
GGUF_MIXES: dict[str, tuple[str, tuple[str, ...]]] = {
    "Q4_K_M": ("Q4_K", ("self_attn.v_proj", "mlp.down_proj")),
}


def _kquant_weights(kind: str) -> dict[str, Any]:
    bits, symmetric, group, superblock = KQUANTS[kind]
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "group",
        "group_size": group,
        "superblock": superblock,
    }


ONLINE_HADAMARD_TARGETS = ["re:.*mlp.down_proj$"]


def online_transform_config() -> dict[str, Any]:
    """compressed-tensors' `transform_config` of a rotated model's online Hadamard (R4: every
    down_proj input times `runtime.hadamard.hadamard(in_features)`). Only the online part is
    listed: R1, R2 and R4's weight side are already fused into the stored weights."""
    online = {"targets": ONLINE_HADAMARD_TARGETS, "location": "input", "inverse": False}
    scheme = {"type": "hadamard", "apply": [online], "randomize": False, "head_dim": None}
    return {"config_groups": {"R4": scheme}}


def _rotation_of(transform_config: Any) -> Literal["hadamard"] | None:
    """'hadamard' when a quantization_config's transform_config is ours, None when absent."""
    if not transform_config:
        return None
    groups = transform_config.get("config_groups") if isinstance(transform_config, dict) else None
    if not isinstance(groups, dict) or set(groups) != {"R4"}:
        raise QuantscaleError(
            "quantization_config.transform_config: only quantscale's online down_proj Hadamard "
            f"(config_groups {{'R4': ...}}) is read; found {transform_config!r}"
        )
    return "hadamard"


PRESETS: dict[str, dict[str, Any]] = {
    "FP8_BLOCK": {
        "weights": {**_FP8, "strategy": "block", "block_structure": [128, 128]},
        "input_activations": {**_FP8, "strategy": "group", "group_size": 128, "dynamic": True},
        "format": "float-quantized",
    },
    "FP8_DYNAMIC": {
        "weights": {**_FP8, "strategy": "channel"},
        "input_activations": {**_FP8, "strategy": "token", "dynamic": True},
        "format": "float-quantized",
    },
    "FP8": {
        "weights": {**_FP8, "strategy": "tensor"},
        "input_activations": {**_FP8, "strategy": "tensor", "observer": "minmax"},
        "format": "float-quantized",
    },
    "W8A8": {
        "weights": {**_INT8, "strategy": "channel"},
        "input_activations": {**_INT8, "strategy": "tensor", "observer": "minmax"},
        "format": "int-quantized",
    },
    "W8A8_DYNAMIC": {
        "weights": {**_INT8, "strategy": "channel"},
        "input_activations": {**_INT8, "strategy": "token", "dynamic": True},
        "format": "int-quantized",
    },
    "W8A16": {"weights": {**_INT8, "strategy": "channel"}, "format": "pack-quantized"},
    "W4A8": {  # int4 g128 weights, static per-tensor int8 activations
        "weights": {**_INT4_G128, "symmetric": True},
        "input_activations": {**_INT8, "strategy": "tensor", "observer": "minmax"},
        "format": "pack-quantized",
    },
    "W4A16": {"weights": {**_INT4_G128, "symmetric": True}, "format": "pack-quantized"},
    "W4A16_ASYM": {"weights": {**_INT4_G128, "symmetric": False}, "format": "pack-quantized"},
    # GGUF block types (--format gguf): Q8_0 = int8, Q4_0 = int4 in [-8, 7] (nibble - 8), Q4_1 =
    # asymmetric int4 (nibble * d + m).
    "Q8_0": {"weights": {**_GGUF_Q, "num_bits": 8}, "format": "pack-quantized"},
    "Q4_0": {"weights": {**_GGUF_Q, "num_bits": 4}, "format": "pack-quantized"},
    "Q4_1": {
        "weights": {**_GGUF_Q, "num_bits": 4, "symmetric": False},
        "format": "pack-quantized",
    },
    "Q5_0": {"weights": {**_GGUF_Q, "num_bits": 5}, "format": "pack-quantized"},
    # GGUF k-quants (--format gguf only): two-level scales, see KQUANTS
    "Q6_K": {"weights": _kquant_weights("Q6_K"), "format": "pack-quantized"},
    "Q4_K": {"weights": _kquant_weights("Q4_K"), "format": "pack-quantized"},
    "NVFP4": {
        "weights": _NVFP4_W,
        "input_activations": {**_NVFP4_W, "dynamic": "local", "observer": "minmax"},
        "format": "nvfp4-pack-quantized",
    },
    "NVFP4A16": {"weights": _NVFP4_W, "format": "nvfp4-pack-quantized"},
    "MXFP4A16": {"weights": _MXFP4_W, "format": "mxfp4-pack-quantized"},
    "MXFP4": {
        "weights": _MXFP4_W,
        "input_activations": {**_MXFP4_W, "dynamic": True},
        "format": "mxfp4-pack-quantized",
    },
}


def normalize_preset_name(name: str) -> str:
    """Upper case with '-' -> '_' ('w4a16-asym' -> 'W4A16_ASYM')."""
    return name.strip().upper().replace("-", "_")


def preset_scheme(name: str, targets: list[str] | None = None) -> QuantScheme:
    """The named preset as a QuantScheme (targets default to ['Linear'])."""
    key = normalize_preset_name(name)
    if key not in PRESETS:
        raise QuantscaleError(f"unknown scheme preset {name!r}; known: {', '.join(PRESETS)}")
    scheme = QuantScheme.model_validate(copy.deepcopy(PRESETS[key]))
    return scheme.model_copy(update={"targets": targets or ["Linear"]})


def preset_recipe(name: str) -> Recipe:
    """A recipe applying one preset (or a GGUF mix's base k-quant) to every Linear, with the
    default ignore list."""
    key = normalize_preset_name(name)
    if key in GGUF_MIXES:
        base = preset_scheme(GGUF_MIXES[key][0])
        return Recipe(name=key, config_groups={"group_0": base}, gguf_mix=key)  # type: ignore[arg-type]
    return Recipe(name=key, config_groups={"group_0": preset_scheme(name)})


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def more_bits_layer(i: int, n: int) -> bool:
    """llama.cpp's `use_more_bits`: the first and last eighth of n layers and every third one
    between them get the mix's larger type."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def with_group_size(recipe: Recipe, group_size: int) -> Recipe:
    """`recipe` with every integer group-quantized weight (config groups and overrides) in
    groups of `group_size` (`quantize --group-size`); FP4 groups stay as their formats fix
    them (NVFP4 16, MXFP4 32). Refuses a recipe with no integer group weight."""
    if group_size <= 0:
        raise QuantscaleError(f"--group-size {group_size}: expected a positive number of weights")
    changed = 0
    schemes = [*recipe.config_groups.values(), *recipe.overrides.values()]
    for scheme in (s for s in schemes if s is not None):
        w = scheme.weights
        if w is None or w.type != "int" or w.strategy not in ("group", "tensor_group"):
            continue
        scheme.weights = w.model_copy(update={"group_size": group_size})
        changed += 1
    if not changed:
        raise QuantscaleError(
            f"--group-size {group_size}: {recipe.name or 'the recipe'} has no integer "
            "group-quantized weights (it applies to W4A16, W4A16_ASYM or a recipe with "
            "strategy: group; NVFP4 and MXFP4 groups are fixed at 16 and 32)"
        )
    return recipe


def recipe_from_dict(data: dict[str, Any], source: str = "<dict>") -> Recipe:
    """Build a Recipe from a dict: a compressed-tensors quantization_config, a full Recipe,
    or the shorthand {scheme: PRESET, ignore: [...], overrides: {pattern: PRESET|scheme|null}}."""
    data = dict(data.get("quantization_config", data))
    try:
        if "quant_method" in data:
            return Recipe.from_quantization_config(data)
        if "scheme" in data:
            base = preset_recipe(data.pop("scheme"))
            return Recipe.model_validate({**base.model_dump(), **data})
        return Recipe.model_validate(data)
    except (ValueError, TypeError) as exc:
        raise QuantscaleError(f"{source}: invalid quantization recipe: {exc}") from exc


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A preset name (case-insensitive, '-' == '_') or a YAML/JSON recipe file."""
    text = str(name_or_path)
    if normalize_preset_name(text) in (*PRESETS, *GGUF_MIXES):
        return preset_recipe(text)
    path = Path(text)
    if not path.is_file():
        raise QuantscaleError(
            f"{text!r} is neither a scheme preset ({', '.join(PRESETS)}) nor a recipe file"
        )
    try:
        raw = path.read_text()
        data = json.loads(raw) if path.suffix == ".json" else yaml.safe_load(raw)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise QuantscaleError(f"{path}: cannot read recipe: {exc}") from exc
    if not isinstance(data, dict):
        raise QuantscaleError(
            f"{path}: expected a mapping at the top level, got {type(data).__name__}"
        )
    return recipe_from_dict(data, str(path))
