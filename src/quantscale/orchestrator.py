"""The orchestrator every command drives: load a model, quantize it layer by layer, write it.

`quantize_model(model, recipe, batches, method)` swaps every targeted Linear for a
`QuantLinear`, then walks the decoder layers with `calibration.sequential.layerwise` (one
layer's inputs resident at a time, each layer fed by the already quantized layers before it).
Per layer: the activation observers (`calibration.activations`) and the weight algorithm's
hooks (`algorithms.base.WeightAlgorithm`) are attached, the cached batches run through the
layer, then the algorithm sets the weights (`finish_layer`) and the observers set the static
activation scales. With `true_sequential` this happens stage by stage inside the layer (q/k/v,
then o_proj, then gate/up, then down_proj; `sequential.linear_stages`), each forward stopped
after the stage's last module, so every stage is calibrated on inputs from the quantized
stages before it. Weight-only RTN runs no calibration forward at all.

`quantize_checkpoint(model_dir, out, scheme, ...)` is the whole job behind `quantscale
quantize`: load, calibrate on Wikipedia windows (or a text file), quantize, export in one of
the `export.EXPORTERS` formats; a Mamba / Mamba2 model is quantized the Quamba way
(`mamba.quantize.quantize_mamba_checkpoint`), or with `--format compressed-tensors` its Linear
layers as an LLM's. `load_model(spec)` loads any model the tools
read: a checkpoint dir or named model, our fake-quant saves, Quamba checkpoints, Mamba fixtures.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from quantscale import distributed
from quantscale.algorithms.base import WeightAlgorithm, get_algorithm
from quantscale.algorithms.importance import (
    ensure_importance,
    importance_method,
    importance_options,
)
from quantscale.algorithms.layer import (
    by_layer,
    calibrate_group,
    quantize_data_free,
    quantize_layer,
    refuse_tied_linears,
)
from quantscale.algorithms.lsq import float_targets, learn_input_scales
from quantscale.algorithms.rotation import check_rotation, rotate_for
from quantscale.algorithms.rtn import rtn_quantize
from quantscale.calibration.activations import has_static_activations, is_static_int
from quantscale.calibration.sequential import LayerStep, as_batches, layerwise, run_batches
from quantscale.checkpoint.dequantize import parse_dtype
from quantscale.checkpoint.layouts import QUAMBA_METHOD
from quantscale.checkpoint.runtimes import ragged_group_warnings
from quantscale.data.calibration import CalibrationSource, token_ids
from quantscale.errors import QuantscaleError
from quantscale.models import loader
from quantscale.models.adapter import decoder_layers
from quantscale.naming import model_ignore
from quantscale.qdq import QParams
from quantscale.runtime.kv_cache import KV_CHOICES, calibrate_kv_cache, fp8_kv_args
from quantscale.runtime.qlinear import QuantLinear, replace_linears
from quantscale.scheme import LearnScales, QuantScheme, Recipe, load_recipe, with_group_size
from quantscale.streaming import StreamOptions, quantize_streamed

log = logging.getLogger(__name__)

LayerTransform = Callable[[LayerStep], None]
"""Called with each decoder layer's step before it is calibrated; may change the layer's float
weights in an output-preserving way (e.g. smoothing) and may call `step.run()` to see inputs."""


# ------------------------------------------------------------------ one model in memory


def quantize_model(
    model: nn.Module,
    recipe: Recipe | str,
    batches: torch.Tensor | Sequence[torch.Tensor] | None = None,
    method: str = "rtn",
    batch_size: int = 4,
    transforms: Sequence[LayerTransform] = (),
    true_sequential: bool | None = None,
    **method_kwargs: Any,
) -> dict[str, QuantLinear]:
    """Quantize `model` in place per `recipe` with weight algorithm `method`.

    `batches`: calibration token ids, [N, L] (split into `batch_size` rows) or a list of
    batches; needed when the recipe has static activations or the method needs data.
    `transforms` run on each decoder layer before it is calibrated (see `LayerTransform`).
    `true_sequential`: calibrate each layer stage by stage (see the module docstring); None
    takes the algorithm's `true_sequential` attribute (off for RTN and GPTQ).
    `recipe.learn_scales`: each layer's static input scales are then learned (LSQ,
    `algorithms.lsq`) against the float layer on the same cached inputs.
    Returns the QuantLinear modules by name; the recipe is kept as `model.quantscale_recipe`.
    Group sizes that do not divide a layer's in_features are logged as warnings (vLLM refuses
    such weights: `checkpoint.runtimes.vllm_group_rule`).
    """
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    recipe = recipe.with_ignored(model_ignore(model_type))
    set_learn_scales(recipe, None, False)  # refuses a recipe with nothing to learn
    algorithm = get_algorithm(method, **method_kwargs)
    if recipe.rotate:  # fused into the float weights before anything is quantized
        transforms = rotate_for(model, recipe.rotate, transforms)
    refuse_tied_linears(model, recipe)
    linears = replace_linears(model, recipe)
    if not linears:
        raise QuantscaleError("the recipe targets no Linear module of this model")
    ragged_group_warnings(linears)
    data = as_batches(batches, batch_size)
    schemes = [ql.scheme for ql in linears.values()]
    kv = recipe.kv_cache_scheme
    needs_data = has_static_activations(schemes) or algorithm.needs_data
    if (needs_data or transforms or kv is not None) and not data:
        raise QuantscaleError(
            f"static activations, an FP8 KV cache, layer transforms or method {method!r} need "
            "calibration batches"
        )
    if transforms and distributed.active():
        raise QuantscaleError(
            "layer transforms (smoothing) see each rank's own data and are not reduced across "
            "ranks; run them on one process"
        )
    model.eval()
    if not (needs_data or transforms):  # weight-only, data-free: no forward at all
        quantize_data_free(linears, algorithm)
    else:
        if true_sequential is None:
            true_sequential = algorithm.true_sequential
        learn = recipe.learn_scales
        _quantize_with_data(model, linears, algorithm, data, transforms, true_sequential, learn)
    if kv is not None:  # on the quantized model, as the runtime's cache will see it
        calibrate_kv_cache(model, kv, lambda: run_batches(model, data))
    cast(Any, model).quantscale_recipe = recipe  # what the exporters write
    return linears


def _quantize_with_data(
    model: nn.Module,
    linears: dict[str, QuantLinear],
    algorithm: WeightAlgorithm,
    data: list[torch.Tensor],
    transforms: Sequence[LayerTransform] = (),
    sequential: bool = False,
    learn_scales: LearnScales | None = None,
) -> None:
    prefix, layers = decoder_layers(model)
    groups = by_layer(linears, prefix, len(layers))
    if learn_scales is not None and distributed.active():
        raise QuantscaleError("learned activation scales run in one process (without torchrun)")
    data = distributed.rank_slice(data)  # with several ranks: this rank's share
    for step in layerwise(model, data, description="calibrate"):
        for transform in transforms:
            transform(step)
        learn = learn_scales is not None and learn_scales.steps > 0 and groups[step.index]
        targets = float_targets(step) if learn else []
        quantize_layer(step, groups[step.index], algorithm, sequential)
        if learn:
            assert learn_scales is not None
            learn_input_scales(step, groups[step.index], targets, learn_scales)
    rest = {n: q for n, q in linears.items() if not any(n in g for g in groups)}
    if rest:  # Linears outside the decoder layers: one pass of the whole model
        calibrate_group(rest, algorithm, lambda: run_batches(model, data))


# ------------------------------------------------------------------ one model, scales given

StaticQParams = Mapping[tuple[str, str], QParams]
"""(module name, 'input' | 'output') -> static activation QParams (`calibrate_shared`)."""


def targeted_linears(model: nn.Module, recipe: Recipe) -> dict[str, tuple[nn.Linear, QuantScheme]]:
    """Name -> (Linear, scheme) for every Linear the recipe quantizes."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name:
            scheme = recipe.scheme_for(name, "Linear")
            if scheme is not None:
                found[name] = (module, scheme)
    return found


def rtn_quant_linear(
    name: str, module: nn.Linear, scheme: QuantScheme, qparams: StaticQParams
) -> QuantLinear:
    """A QuantLinear over `module` with RTN weights and its static activation qparams."""
    ql = QuantLinear.from_linear(module, scheme)
    rtn_quantize(ql)
    for role in ("input", "output"):
        qp = qparams.get((name, role))
        if qp is not None:
            ql.set_activation_qparams(role, qp)
    return ql


def quantize_with_scales(
    model: nn.Module, recipe: Recipe, qparams: StaticQParams
) -> dict[str, nn.Module]:
    """Quantize `model` in place per `recipe` with RTN weights (module by module) and static
    activation scales calibrated elsewhere (e.g. one shared pass for a sweep's settings);
    returns the original modules for `restore_linears`."""
    originals: dict[str, nn.Module] = {}
    for name, (module, scheme) in targeted_linears(model, recipe).items():
        model.set_submodule(name, rtn_quant_linear(name, module, scheme, qparams))
        originals[name] = module
    return originals


def restore_linears(model: nn.Module, originals: Mapping[str, nn.Module]) -> None:
    """Put the original modules back."""
    for name, module in originals.items():
        model.set_submodule(name, module)


# ------------------------------------------------------------------ loading


def resolve_model(spec: str | os.PathLike) -> Path:
    """`models.loader.resolve_model`, and a trained fixture `fixture:<kind>`
    (`mamba.fixtures`, trained into the cache on first use)."""
    from quantscale.mamba.fixtures import fixture_checkpoint, fixture_kind

    kind = fixture_kind(spec)
    return fixture_checkpoint(kind) if kind is not None else loader.resolve_model(spec)


def load_model(spec: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer or None) of anything the tools read: a checkpoint dir or named model
    (`models.loader`), our fake-quant saves (with their QuantLinears and static scales), a
    Quamba checkpoint (`mamba.quantize.load_quantized`, INT8 mixers) or `fixture:<kind>`."""
    path = resolve_model(spec)
    if loader.quant_method(loader.read_config(path)) == QUAMBA_METHOD:
        from quantscale.mamba.quantize import load_quantized

        return load_quantized(path), loader.saved_tokenizer(path)
    return loader.load_model(path, dtype)


READERS = ("quantscale", "transformers")  # how `load_evaluated` reads quantized files


def load_evaluated(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, reader: str = "quantscale"
) -> nn.Module:
    """The model `eval` scores: a compressed-tensors, ModelOpt or HF FP8 checkpoint through our
    own reader (`reader="quantscale"`: the file's codes and activation scales, no runtime
    needed) or transformers' loader (`"transformers"`: what it runs, refusing what it cannot);
    anything else as `quantize.load_model` reads it (fake-quant saves, Quamba, plain)."""
    from quantscale.models.quantized import READ_METHODS, load_quantized_checkpoint

    path = Path(path)
    config = path / "config.json"
    method = loader.quant_method(loader.read_config(path)) if config.is_file() else None
    if reader == "quantscale" and method in READ_METHODS:
        return load_quantized_checkpoint(path, dtype)
    return load_model(path, dtype)[0]


def is_mamba(spec: str | os.PathLike) -> bool:
    """Whether `spec` names a Mamba-only fixture or a checkpoint of a Mamba / Mamba2 model
    (a hybrid, `fixture:bamba` included, is not: it goes through the LLM pipeline)."""
    from quantscale.mamba.fixtures import FIXTURE_PREFIX, is_mamba_fixture
    from quantscale.mamba.mixers import is_mamba_config

    text = os.fspath(spec)
    if text.startswith(FIXTURE_PREFIX):
        return is_mamba_fixture(text)
    if not (Path(text) / "config.json").is_file():
        return False
    return is_mamba_config(loader.read_config(text))


# ------------------------------------------------------------------ checkpoint to checkpoint


# Weight observers a scheme's weights can take (`--weight-observer`): min-max, or 'mse', a
# clipping search per scale group (RTN, GPTQ and AutoRound's starting scales).
WEIGHT_OBSERVERS = ("minmax", "mse")


@dataclass(frozen=True)
class GPTQOptions:
    """The weight options of `quantize_checkpoint` (`--group-size`; GPTQ's: `--actorder`,
    `--dampening-frac`, `--gptq-memory`; AutoRound's: `--autoround-steps`, `--autoround-lr`).

    `actorder`: None keeps the scheme's, 'none' turns it off, 'group' / 'weight' set it.
    `memory_budget`: bytes of MoE expert Hessians / solve workspace held at once (None: GPTQ's
    default); past it a layer's experts are calibrated and solved in chunks (same weights).
    `expert_parallel` (`--expert-parallel`, with several ranks): each MoE expert's Hessians
    are summed and solved on one rank, the other ranks send it their routed inputs."""

    actorder: str | None = None
    dampening_frac: float = 0.01
    block_size: int = 128
    memory_budget: int | None = None
    group_size: int | None = None
    hessian_dtype: str | None = None  # GPTQ's Hessian sums: float32 alone, float64 torchrun
    expert_parallel: bool = False  # torchrun, MoE: each expert's Hessians on one rank
    autoround_steps: int = 200
    autoround_lr: float | None = None  # None: 1 / autoround_steps
    weight_observer: str | None = None  # None keeps the scheme's (min-max); 'mse' searches
    clip_search: tuple[float, ...] | None = None  # GPTQ's clipping search (`--gptq-clip`)

    def recipe(self, scheme: str) -> Recipe:
        """The scheme's recipe with `group_size`, `actorder` and `weight_observer` applied to
        every weight."""
        recipe = load_recipe(scheme)
        if self.group_size is not None:
            recipe = with_group_size(recipe, self.group_size)
        update: dict[str, Any] = {}
        if self.actorder and self.actorder != "none":
            update["actorder"] = self.actorder
        if self.weight_observer is not None:
            if self.weight_observer not in WEIGHT_OBSERVERS:
                raise QuantscaleError(
                    f"--weight-observer {self.weight_observer!r}: expected one of "
                    f"{', '.join(WEIGHT_OBSERVERS)}"
                )
            update["observer"] = self.weight_observer
        if update:
            for group in [*recipe.config_groups.values(), *recipe.overrides.values()]:
                if group is not None and group.weights is not None:
                    group.weights = group.weights.model_copy(update=update)
        return recipe

    def method_options(self, method: str) -> dict[str, Any]:
        """The weight algorithm's keyword options (none for RTN and AWQ)."""
        if method in ("autoround", "awq+autoround"):
            return {"steps": self.autoround_steps, "lr": self.autoround_lr}
        if method not in ("gptq", "awq+gptq"):
            return {}
        kwargs: dict[str, Any] = {
            "dampening_frac": self.dampening_frac,
            "block_size": self.block_size,
        }
        if self.actorder == "none":
            kwargs["actorder"] = None
        if self.memory_budget is not None:
            kwargs["memory_budget"] = self.memory_budget
        if self.hessian_dtype is not None:
            kwargs["hessian_dtype"] = self.hessian_dtype
        if self.expert_parallel:
            kwargs["expert_parallel"] = True
        if self.clip_search is not None:
            grid = self.clip_search
            if not grid or not all(0.0 < f <= 1.0 for f in grid):
                raise QuantscaleError(
                    f"--gptq-clip {','.join(map(str, grid))}: expected shrink factors in "
                    "(0, 1], e.g. 1,0.95,0.9,0.85,0.8"
                )
            kwargs["clip_search"] = tuple(grid)
        return kwargs


def quantize_checkpoint(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    scheme: str,
    *,
    method: str | None = None,
    fmt: str | None = None,
    calib_samples: int = 128,
    calib_seq_len: int = 512,
    calib_data: CalibrationSource | torch.Tensor = None,
    calib_batch_size: int = 4,
    dtype: str = "bfloat16",
    gptq: GPTQOptions = GPTQOptions(),
    calibrate_all_experts: bool = True,
    true_sequential: bool | None = None,
    overwrite: bool = False,
    stream: bool | StreamOptions = False,
    kv_cache: str | None = None,
    importance: str | os.PathLike | None = None,
    rotate: str | None = None,
    ignore: Sequence[str] = (),
    learn_scales: int | LearnScales | None = None,
) -> Path:
    """Quantize the checkpoint (or named model) `model_dir` with `scheme` (preset name or
    recipe file) by `method` ('rtn' | 'gptq' | 'awq' | 'awq+gptq' | 'autoround' |
    'awq+autoround', default gptq) and write it to `out` in format `fmt` (default
    compressed-tensors), calibrating on `calib_samples` windows of `calib_seq_len` tokens of
    `calib_data` (default: the Wikipedia calibration split). A Mamba / Mamba2 model is
    quantized the Quamba way (method rtn / gptq for its weights) unless `fmt` is
    'compressed-tensors': then its Linear layers are, as an LLM's (`mamba_linear_source`).
    `stream` (True or `streaming.StreamOptions`): layer by layer from the shards, resumable
    (`streaming.quantize_streamed`); the same tensors as the in-memory path. `kv_cache`
    ('fp8' per tensor, 'fp8-head' per KV head): static FP8 KV-cache scales calibrated on the
    same data (compressed-tensors `kv_cache_scheme`). `importance`: importance-weighted RTN
    (`algorithms.importance`) from that statistics file, collected on the calibration data
    and written there first when it does not exist. `rotate` ('hadamard'): Hadamard
    rotations fused before quantizing (`algorithms.rotation`; in-memory path only).
    `learn_scales` (steps, or `scheme.LearnScales`): static input scales learned per layer
    after calibration (`algorithms.lsq`; in-memory path only). Launched
    by torchrun with several processes, the ranks calibrate their shares of the data and
    rank 0 writes (`quantscale.distributed`): the same output as one process."""
    distributed.init_from_env()
    if Path(out).exists() and not overwrite:
        raise QuantscaleError(f"{out}: already exists (pass --overwrite to replace it)")
    if is_mamba(model_dir) and fmt is None:
        calib = {"calib_samples": calib_samples, "calib_seq_len": calib_seq_len}
        options: dict[str, Any] = {**calib, "calib_data": calib_data, "overwrite": overwrite}
        options.update(rotate=rotate, learn_scales=learn_scales)
        return _quantize_mamba(model_dir, out, scheme, method, stream, ignore, **options)
    model_dir = mamba_linear_source(model_dir, scheme, fmt, rotate)
    from quantscale.export import EXPORTERS, export_model

    if importance is not None:
        method = importance_method(method)
    fmt, method = fmt or "compressed-tensors", method or "gptq"
    algo_options = gptq.method_options(method)
    if importance is not None:
        algo_options = importance_options(importance, stream)
    if fmt not in EXPORTERS:
        raise QuantscaleError(f"unknown --format {fmt!r}; known: {', '.join(EXPORTERS)}")
    recipe = gptq.recipe(scheme)
    set_kv_cache(recipe, kv_cache, fmt, stream)
    set_rotation(recipe, rotate, fmt, stream)
    set_learn_scales(recipe, learn_scales, stream)
    settings = CalibrationSettings(calib_samples, calib_seq_len, calib_data, calib_batch_size)
    path = resolve_model(model_dir)
    model_type = loader.read_config(path).get("model_type")
    recipe = recipe.with_ignored([*ignore, *model_ignore(model_type)])
    if stream:
        where = stream if isinstance(stream, StreamOptions) else StreamOptions()
        batches = settings.batches(loader.saved_tokenizer(path), recipe, method, path)
        return quantize_streamed(
            path,
            out,
            recipe,
            method,
            method_options=algo_options,
            batches=batches,
            batch_size=calib_batch_size,
            dtype=dtype,
            fmt=fmt,
            true_sequential=true_sequential,
            all_experts=calibrate_all_experts,
            settings=settings.fingerprint(),
            options=where,
            overwrite=overwrite,
        )
    model, tokenizer = loader.load_model(path, parse_dtype(dtype))
    if importance is not None:
        names = list(targeted_linears(model, recipe))
        ids = functools.partial(settings.tokens, tokenizer, path)
        ensure_importance(importance, model, names, lambda: as_batches(ids(), calib_batch_size))
    batches = settings.batches(tokenizer, recipe, method, path)
    _quantize_experts(
        model,
        recipe,
        batches,
        method,
        calib_batch_size,
        calibrate_all_experts,
        true_sequential=true_sequential,
        **algo_options,
    )
    info = {
        "quant_method": method,
        "damp_percent": gptq.dampening_frac,
        "calib_samples": calib_samples,
    }
    extra = {"quantize_info": info} if fmt == "pseudo" else {}
    result = Path(out)
    if distributed.is_writer():  # with several ranks every one holds the same model
        result = export_model(model, out, fmt, source_dir=path, overwrite=overwrite, **extra)
    distributed.barrier()
    return result


def set_kv_cache(recipe: Recipe, kv_cache: str | None, fmt: str | None, stream: object) -> None:
    """Apply `--kv-cache` to the recipe; refuse the paths that do not write KV scales (`fmt`
    None: the model stays in memory)."""
    if kv_cache is not None:
        if kv_cache not in KV_CHOICES:
            raise QuantscaleError(
                f"--kv-cache {kv_cache!r}; expected one of {', '.join(KV_CHOICES)}"
            )
        recipe.kv_cache_scheme = fp8_kv_args(KV_CHOICES[kv_cache])
    if recipe.kv_cache_scheme is None:
        return
    if fmt not in (None, "compressed-tensors"):
        raise QuantscaleError(
            "an FP8 KV cache is written in compressed-tensors' kv_cache_scheme only "
            f"(not --format {fmt})"
        )
    if stream:
        raise QuantscaleError("an FP8 KV cache is calibrated by the in-memory path (omit --stream)")


def set_rotation(recipe: Recipe, rotate: str | None, fmt: str | None, stream: object) -> None:
    """Apply `--rotate` to the recipe; refuse the streamed path (it never holds the whole
    model, and R1 rotates every layer and the embeddings at once) and the formats that cannot
    record the online Hadamard (`fmt` None: the model stays in memory)."""
    if rotate is not None:
        recipe.rotate = check_rotation(rotate)  # type: ignore[assignment]
    if not recipe.rotate:
        return
    if stream:
        raise QuantscaleError("--rotate runs on the in-memory path (omit --stream)")
    from quantscale.export import ROTATION_FORMATS

    if fmt is not None and fmt not in ROTATION_FORMATS:  # before calibrating, not after
        raise QuantscaleError(
            "a rotated model needs its online down_proj Hadamard recorded, which only "
            f"{' and '.join(ROTATION_FORMATS)} (transform_config) does; not --format {fmt}"
        )


def set_learn_scales(recipe: Recipe, learn: int | LearnScales | None, stream: object) -> None:
    """Apply `--learn-scales` (steps, or the options) to the recipe; refuse the streamed
    path and a recipe without static integer input activations."""
    if learn is not None:
        recipe.learn_scales = learn if isinstance(learn, LearnScales) else LearnScales(steps=learn)
    if recipe.learn_scales is None:
        return
    if stream:
        raise QuantscaleError("learned activation scales run on the in-memory path (omit --stream)")
    schemes = [*recipe.config_groups.values(), *(s for s in recipe.overrides.values() if s)]
    if not any(is_static_int(s.input_activations) for s in schemes):
        raise QuantscaleError(
            "learned activation scales need static integer input activations (W8A8, W4A8); "
            f"recipe {recipe.name or ''!r} has none"
        )


@dataclass(frozen=True)
class CalibrationSettings:
    """The calibration options of `quantize_checkpoint` (the `--calib-*` flags)."""

    samples: int = 128
    seq_len: int = 512
    data: CalibrationSource | torch.Tensor = None
    batch_size: int = 4

    def batches(
        self, tokenizer: Any, recipe: Recipe, method: str, model_dir: str | os.PathLike
    ) -> torch.Tensor | None:
        """Calibration token ids (`data` itself when it is ids `[N, L]`), or None when the
        recipe and method need no data."""
        static = has_static_activations(recipe.config_groups.values())
        if method in ("rtn", "rtn-importance") and not static and recipe.kv_cache_scheme is None:
            return None
        return self.tokens(tokenizer, model_dir)

    def tokens(self, tokenizer: Any, model_dir: str | os.PathLike) -> torch.Tensor:
        """The calibration token ids."""
        from quantscale.data.calibration import calibration_batches

        if isinstance(self.data, torch.Tensor):
            return token_ids(self.data)
        if tokenizer is None:
            raise QuantscaleError(f"{model_dir}: no tokenizer found; calibration needs one")
        return calibration_batches(tokenizer, self.samples, self.seq_len, source=self.data)

    def fingerprint(self) -> dict[str, Any]:
        """The settings as JSON values (the streamed path's resume record)."""
        data = _data_fingerprint(self.data)
        return {
            "calib_samples": self.samples,
            "calib_seq_len": self.seq_len,
            "calib_data": data,
            "calib_batch_size": self.batch_size,
        }


def _data_fingerprint(data: CalibrationSource | torch.Tensor) -> str | None:
    """A calibration source as one JSON string: a file's resolved path, else a digest of the
    token ids or texts."""
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        return os.fspath(Path(data).resolve())
    if isinstance(data, torch.Tensor):
        raw = data.detach().cpu().long().contiguous().numpy().tobytes()
        return f"tokens {list(data.shape)} sha256:{hashlib.sha256(raw).hexdigest()}"
    digest = hashlib.sha256()
    for item in data:
        digest.update((item if isinstance(item, str) else item.text).encode() + b"\0")
    return f"{len(data)} texts sha256:{digest.hexdigest()}"


def _quantize_mamba(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    scheme: str,
    method: str | None,
    stream: object,
    ignore: Sequence[str],
    **options: Any,
) -> Path:
    """The Quamba path of `quantize_checkpoint` (one process, in memory)."""
    from quantscale.mamba.quantize import quantize_mamba_checkpoint

    if ignore:
        raise QuantscaleError("--ignore is not read by the Mamba (Quamba) path; omit it")

    if distributed.active():
        raise QuantscaleError(f"{model_dir}: a Mamba model is quantized by one process")
    if stream:
        raise QuantscaleError(f"{model_dir}: a Mamba model cannot be streamed (omit --stream)")
    if options.get("rotate") not in (None, "hadamard"):
        raise QuantscaleError(
            f"{model_dir}: a Mamba model takes --rotate hadamard (Quamba's out_proj Hadamard), "
            f"not {options['rotate']!r}"
        )
    data = options.get("calib_data")
    if data is not None and not isinstance(data, (str, os.PathLike, torch.Tensor)):
        raise QuantscaleError(
            f"{model_dir}: a Mamba model calibrates on a text file or token ids [N, L]"
        )
    return quantize_mamba_checkpoint(model_dir, out, scheme, method=method, **options)


MAMBA_LINEAR_FORMATS = ("compressed-tensors",)  # formats a Mamba model's Linears go to


def mamba_linear_source(
    model_dir: str | os.PathLike, scheme: str, fmt: str | None, rotate: str | None
) -> str | os.PathLike:
    """The float checkpoint directory a Mamba / Mamba2 model (`fixture:<kind>` resolved to
    its cached checkpoint) is read from when the LLM path quantizes its Linears (in_proj,
    x_proj, out_proj; `--format compressed-tensors` with a scheme preset); any other model
    as it is. Refused: other formats, `--rotate`, and Quamba recipes (their conv1d /
    SSM-input scales and piecewise groups have no compressed-tensors field)."""
    from quantscale.mamba.fixtures import FIXTURE_PREFIX, fixture_checkpoint
    from quantscale.scheme import PRESETS, normalize_preset_name

    if not is_mamba(model_dir):
        return model_dir
    if fmt not in MAMBA_LINEAR_FORMATS:
        raise QuantscaleError(
            f"{model_dir}: a Mamba model is written in the Quamba layout (no --format) or, its "
            f"Linear layers only, as {' / '.join(MAMBA_LINEAR_FORMATS)}; not --format {fmt}"
        )
    if normalize_preset_name(os.fspath(scheme)) not in PRESETS:
        raise QuantscaleError(
            f"{model_dir}: --format {fmt} writes a Mamba model's Linear layers with a scheme "
            f"preset (W8A8_DYNAMIC, W8A8, FP8_DYNAMIC, ...), not {os.fspath(scheme)!r}: a Quamba "
            "recipe's conv1d / SSM-input (x, B, C, dt, z) scales and piecewise groups have no "
            "compressed-tensors field (omit --format for the Quamba layout)"
        )
    if rotate is not None:
        raise QuantscaleError(
            f"{model_dir}: --rotate on a Mamba model is Quamba's out_proj Hadamard, which "
            f"--format {fmt} does not record; omit --format (Quamba layout) or --rotate"
        )
    text = os.fspath(model_dir)
    if text.startswith(FIXTURE_PREFIX):
        return fixture_checkpoint(text[len(FIXTURE_PREFIX) :])
    return model_dir


def _quantize_experts(
    model: nn.Module,
    recipe: Recipe,
    batches: torch.Tensor | None,
    method: str,
    batch_size: int,
    all_tokens: bool,
    **kwargs: Any,
) -> None:
    """`quantize_model` with MoE experts linearized (and, if `all_tokens`, calibrated on every
    token rather than on those the router sends them)."""
    from quantscale.models.moe import calibrate_all_experts, linearize_experts, log_expert_coverage

    moe = linearize_experts(model)
    start = time.perf_counter()
    with calibrate_all_experts(model, enabled=all_tokens and bool(moe)):
        quantize_model(model, recipe, batches, method=method, batch_size=batch_size, **kwargs)
    if moe:
        log_expert_coverage(model, all_tokens=all_tokens)
    log.info("quantized with %s in %.1f s", method, time.perf_counter() - start)
