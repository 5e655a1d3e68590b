"""Quantize a whole causal LM: replace Linears, calibrate layer by layer, quantize weights.

`quantize_model(model, recipe, batches, method)` swaps every targeted Linear for a
`QuantLinear`, then walks the decoder layers with `calibration.sequential.layerwise` (one
layer's inputs resident at a time, each layer fed by the already quantized layers before it).
Per layer: the activation observers (`calibration.activations`) and the weight algorithm's
hooks are attached, the cached batches run through the layer once, then the algorithm sets
the weights (`finish_layer`) and the observers set the static activation scales.

Weight algorithms follow `WeightAlgorithm` and register by name with
`register_weight_algorithm`; RTN lives here, GPTQ in `quantscale.algorithms.gptq`.

`save_quantized` writes the fake-quantized model with its qparam buffers (config.json carries
the recipe under "quantscale"); `load_model` reads it back (or any plain checkpoint).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from quantscale.calibration.activations import ActivationCalibrator, is_static
from quantscale.calibration.sequential import LayerStep, batched, layerwise
from quantscale.checkpoint.io import SINGLE_NAME, Checkpoint, CheckpointWriter
from quantscale.errors import CheckpointError, QuantscaleError
from quantscale.models.adapter import decoder_layers
from quantscale.qdq import quantize_weight_rtn
from quantscale.runtime.qlinear import QuantLinear, quant_linears, replace_linears
from quantscale.scheme import Recipe, load_recipe

CONFIG_KEY = "quantscale"
SAVED_FORMAT = "fake-quant"


class WeightAlgorithm(Protocol):
    """Sets the weights of one layer's QuantLinears after seeing its calibration inputs."""

    needs_data: bool

    def start_layer(self, linears: dict[str, QuantLinear]) -> None:
        """Attach forward hooks that see the layer's inputs."""

    def finish_layer(self, linears: dict[str, QuantLinear]) -> None:
        """Remove the hooks and call `ql.set_weight(...)` on each module."""


WEIGHT_ALGORITHMS: dict[str, Callable[..., WeightAlgorithm]] = {}
# Modules that register algorithms on import, tried when a name is unknown.
_ALGORITHM_MODULES = ("quantscale.algorithms.gptq",)


def register_weight_algorithm(name: str) -> Callable:
    """Decorator registering a WeightAlgorithm class (or factory) under `name`."""

    def deco(factory: Callable[..., WeightAlgorithm]) -> Callable[..., WeightAlgorithm]:
        WEIGHT_ALGORITHMS[name.lower()] = factory
        return factory

    return deco


def get_weight_algorithm(name: str, **kwargs) -> WeightAlgorithm:
    """Instantiate a registered weight algorithm by name."""
    key = name.lower()
    if key not in WEIGHT_ALGORITHMS:
        for module in _ALGORITHM_MODULES:
            try:
                importlib.import_module(module)
            except ImportError:
                continue
    if key not in WEIGHT_ALGORITHMS:
        raise QuantscaleError(
            f"unknown weight algorithm {name!r}; known: {', '.join(sorted(WEIGHT_ALGORITHMS))}"
        )
    return WEIGHT_ALGORITHMS[key](**kwargs)


def rtn_quantize(ql: QuantLinear) -> None:
    """Round-to-nearest quantization of one QuantLinear's weight per its scheme."""
    if ql.scheme.weights is not None:
        w_hat, qp = quantize_weight_rtn(ql.weight.detach(), ql.scheme.weights)
        ql.set_weight(w_hat, qp)


@register_weight_algorithm("rtn")
class RTN:
    """Round-to-nearest with the weight args' observer (min-max by default); no data."""

    needs_data = False

    def start_layer(self, linears: dict[str, QuantLinear]) -> None:
        pass

    def finish_layer(self, linears: dict[str, QuantLinear]) -> None:
        for ql in linears.values():
            rtn_quantize(ql)


def _by_layer(linears: dict[str, QuantLinear], prefix: str, n_layers: int) -> list[dict]:
    groups: list[dict[str, QuantLinear]] = [{} for _ in range(n_layers)]
    for name, ql in linears.items():
        head = name[len(prefix) + 1 :].split(".", 1)[0] if name.startswith(prefix + ".") else ""
        if head.isdigit() and int(head) < n_layers:
            groups[int(head)][name] = ql
    return groups


def _needs_activations(linears: dict[str, QuantLinear]) -> bool:
    return any(
        is_static(ql.scheme.input_activations) or is_static(ql.scheme.output_activations)
        for ql in linears.values()
    )


LayerTransform = Callable[[LayerStep], None]
"""Called with each decoder layer's step before it is calibrated; may change the layer's float
weights in an output-preserving way (e.g. smoothing) and may call `step.run()` to see inputs."""


def _calibrate_group(
    linears: dict[str, QuantLinear], algorithm: WeightAlgorithm, run: Callable[[], object]
) -> None:
    """Observe activations and let the algorithm see inputs during `run()`, then quantize."""
    calibrator = ActivationCalibrator(linears)
    algorithm.start_layer(linears)
    try:
        with calibrator:
            run()
    finally:
        algorithm.finish_layer(linears)
    calibrator.apply()


@torch.inference_mode()
def run_batches(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Forward token batches through the model's decoder (no logits)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model
    for ids in batches:
        body(input_ids=ids, use_cache=False)


def as_batches(batches: torch.Tensor | Sequence[torch.Tensor] | None, batch_size: int) -> list:
    """[N, L] token ids -> batches of `batch_size` rows; a list of batches as is."""
    if batches is None:
        return []
    if isinstance(batches, torch.Tensor):
        return batched(batches, batch_size)
    return list(batches)


def quantize_model(
    model: nn.Module,
    recipe: Recipe | str,
    batches: torch.Tensor | Sequence[torch.Tensor] | None = None,
    method: str = "rtn",
    batch_size: int = 4,
    transforms: Sequence[LayerTransform] = (),
    **method_kwargs,
) -> dict[str, QuantLinear]:
    """Quantize `model` in place per `recipe` with weight algorithm `method`.

    `batches`: calibration token ids, [N, L] (split into `batch_size` rows) or a list of
    batches; needed when the recipe has static activations or the method needs data.
    `transforms` run on each decoder layer before it is calibrated (see `LayerTransform`).
    Returns the QuantLinear modules by name; the recipe is kept as `model.quantscale_recipe`.
    """
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    algorithm = get_weight_algorithm(method, **method_kwargs)
    linears = replace_linears(model, recipe)
    if not linears:
        raise QuantscaleError("the recipe targets no Linear module of this model")
    data = as_batches(batches, batch_size)
    needs_data = _needs_activations(linears) or getattr(algorithm, "needs_data", True)
    if (needs_data or transforms) and not data:
        raise QuantscaleError(
            f"static activations, layer transforms or method {method!r} need calibration batches"
        )
    model.eval()
    if not data:
        algorithm.start_layer(linears)
        algorithm.finish_layer(linears)
    else:
        _quantize_with_data(model, linears, algorithm, data, transforms)
    model.quantscale_recipe = recipe
    return linears


def _quantize_with_data(model, linears, algorithm, data, transforms=()) -> None:
    prefix, layers = decoder_layers(model)
    groups = _by_layer(linears, prefix, len(layers))
    for step in layerwise(model, data, description="calibrate"):
        for transform in transforms:
            transform(step)
        if groups[step.index]:
            _calibrate_group(groups[step.index], algorithm, step.run)
    rest = {n: q for n, q in linears.items() if not any(n in g for g in groups)}
    if rest:  # Linears outside the decoder layers: one pass of the whole model
        _calibrate_group(rest, algorithm, lambda: run_batches(model, data))


# ------------------------------------------------------------------ save / load


def _tied(model: nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def save_quantized(
    model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False
) -> Path:
    """Write the fake-quantized model (weights, qparam buffers, config with the recipe)."""
    recipe: Recipe | None = getattr(model, "quantscale_recipe", None)
    if recipe is None or not quant_linears(model):
        raise QuantscaleError("save_quantized: the model was not quantized by quantize_model")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if _tied(model):
        tensors.pop("lm_head.weight", None)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config[CONFIG_KEY] = {"format": SAVED_FORMAT, "recipe": recipe.model_dump(mode="json")}
    with CheckpointWriter(out_dir, overwrite=overwrite) as writer:
        writer.write_shard(SINGLE_NAME, tensors)
        writer.write_json("config.json", config)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(writer.tmp))
        return writer.commit(write_index=False)


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / 'config.json'}: cannot read: {exc}") from exc


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple:
    """(model, tokenizer or None) from a checkpoint dir (or a named model such as 'smollm2');
    a `save_quantized` dir comes back with its QuantLinears and static scales."""
    from quantscale.eval.runner import load_model as load_plain
    from quantscale.eval.runner import load_tokenizer, resolve_model_path

    path = resolve_model_path(str(path))
    try:
        tokenizer = load_tokenizer(path)
    except QuantscaleError:
        tokenizer = None
    meta = _read_config(path).get(CONFIG_KEY)
    if meta is None:
        return load_plain(path, dtype), tokenizer
    return _load_fake_quant(path, meta, dtype), tokenizer


def _load_fake_quant(path: Path, meta: dict, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    if meta.get("format") != SAVED_FORMAT:
        raise CheckpointError(
            f"{path / 'config.json'}: {CONFIG_KEY}.format is {meta.get('format')!r}; "
            f"expected {SAVED_FORMAT!r}"
        )
    recipe = Recipe.model_validate(meta["recipe"])
    config = AutoConfig.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    replace_linears(model, recipe)
    ckpt = Checkpoint(path)
    state = {name: ckpt.get(name) for name in ckpt.names()}
    result = model.load_state_dict(state, strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: tensors do not match the quantized model; missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    if tied:
        model.tie_weights()
    model.quantscale_recipe = recipe
    return model.eval()
