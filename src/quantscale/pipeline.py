"""Quantize a whole causal LM: replace Linears, calibrate layer by layer, quantize weights.

`quantize_model(model, recipe, batches, method)` swaps every targeted Linear for a
`QuantLinear`, then walks the decoder layers with `calibration.sequential.layerwise` (one
layer's inputs resident at a time, each layer fed by the already quantized layers before it).
Per layer: the activation observers (`calibration.activations`) and the weight algorithm's
hooks are attached, the cached batches run through the layer, then the algorithm sets the
weights (`finish_layer`) and the observers set the static activation scales. With
`true_sequential` this happens stage by stage inside the layer (q/k/v, then
o_proj, then gate/up, then down_proj; `sequential.linear_stages`), each forward stopped after
the stage's last module, so every stage is calibrated on inputs from the quantized stages
before it. Weight-only RTN runs no calibration forward at all.

Weight algorithms follow `WeightAlgorithm` and register by name with
`register_weight_algorithm`; RTN lives here, GPTQ in `quantscale.algorithms.gptq`. Both give
the projections a runtime fuses (q/k/v, gate/up) one NVFP4 global scale / per-tensor scale,
put symmetric int scales on the full code range (`full_range`: int4 amax/7.5), and store int
and FP8 scales rounded to the scheme's scale dtype (default: the weight's 16-bit dtype), the
values runtimes hold.

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
from quantscale.calibration.sequential import LayerStep, batched, layerwise, linear_stages
from quantscale.checkpoint.read import SINGLE_NAME, Checkpoint
from quantscale.checkpoint.write import CheckpointWriter
from quantscale.errors import CheckpointError, QuantscaleError
from quantscale.export.base import declared_scale_dtype, fused_siblings
from quantscale.formats.intq import int_range
from quantscale.models.adapter import decoder_layers
from quantscale.qdq import QParams, fake_quantize, quantize_weight_rtn
from quantscale.runtime.qlinear import QuantLinear, quant_linears, replace_linears
from quantscale.scheme import QuantArgs, Recipe, load_recipe

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


_HALF = (torch.bfloat16, torch.float16)
_MINMAX = (None, "minmax", "static_minmax", "memoryless_minmax")


def weight_scale_dtype(args: QuantArgs, w_dtype: torch.dtype) -> torch.dtype | None:
    """dtype that int / FP8 weight scales are rounded to: the scheme's `scale_dtype`, else the
    weight's when 16-bit (transformers and vLLM hold scales in the model dtype); None for
    NVFP4 / MX (their scales are exact E4M3 / powers of two) and float32 weights."""
    if args.is_nvfp4 or args.is_mx:
        return None
    return declared_scale_dtype(args) or (w_dtype if w_dtype in _HALF else None)


def full_range(args: QuantArgs, qp: QParams) -> QParams:
    """Symmetric int scales that use the whole code range [-2^(b-1), 2^(b-1) - 1]: amax /
    (2^(b-1) - 1/2), as compressed-tensors and GPTQModel compute them (int4: amax / 7.5, a
    grid 7% finer than amax / 7; +amax clips by half a step, no more than rounding does)."""
    if args.type != "int" or not args.symmetric:
        return qp
    qmax = int_range(args.num_bits)[1]
    return QParams(qp.scale * (qmax / (qmax + 0.5)), qp.zero_point, qp.global_scale)


def stored_scales(qp: QParams, dtype: torch.dtype | None) -> QParams:
    """qp with its scale rounded to `dtype` (kept float32), as a runtime will hold it."""
    if dtype is None:
        return qp
    return QParams(qp.scale.to(dtype).float(), qp.zero_point, qp.global_scale)


def rtn_weight(w: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, QParams]:
    """Round-to-nearest (w_hat, qparams): min-max symmetric int scales on the `full_range`,
    scales rounded per `weight_scale_dtype`."""
    w_hat, qp = quantize_weight_rtn(w, args)
    new = full_range(args, qp) if args.observer in _MINMAX else qp
    new = stored_scales(new, weight_scale_dtype(args, w.dtype))
    if not torch.equal(new.scale, qp.scale.float()):
        w_hat = fake_quantize(w, args, new)
    return w_hat, new


def split_rows(qp: QParams, rows: list[int]) -> list[QParams]:
    """Per-member qparams of a row-stacked weight (per-tensor values are shared)."""

    def split(t: torch.Tensor | None) -> list[torch.Tensor | None]:
        if t is None:
            return [None] * len(rows)
        if t.ndim < 2 or t.shape[0] != sum(rows):
            return [t] * len(rows)
        return list(t.split(rows))

    return [QParams(s, z, qp.global_scale) for s, z in zip(split(qp.scale), split(qp.zero_point))]


def fused_stacks(linears: dict[str, QuantLinear]) -> list[list[str]]:
    """Names grouped as runtimes fuse them (q/k/v, gate/up; same weight args and width),
    quantized as one row-stacked weight; FP8 block schemes stay apart (blocks span rows)."""
    out: list[list[str]] = []
    placed: set[str] = set()
    for name, ql in linears.items():
        args = ql.scheme.weights
        if name in placed or args is None:
            continue
        stack = [name]
        if args.strategy != "block":
            stack = [
                n
                for n in fused_siblings(name)
                if n in linears
                and n not in placed
                and linears[n].scheme.weights == args
                and linears[n].in_features == ql.in_features
            ] or [name]
        placed.update(stack)
        out.append(stack)
    return out


def rtn_quantize(ql: QuantLinear) -> None:
    """Round-to-nearest quantization of one QuantLinear's weight per its scheme."""
    if ql.scheme.weights is not None:
        ql.set_weight(*rtn_weight(ql.weight.detach(), ql.scheme.weights))


def stacked_weight(linears: dict[str, QuantLinear], stack: list[str]) -> torch.Tensor:
    """The row-stacked weight of the modules named in `stack` (one module: its weight)."""
    ws = [linears[n].weight.detach() for n in stack]
    return torch.cat(ws) if len(ws) > 1 else ws[0]


def set_stacked(
    linears: dict[str, QuantLinear],
    stack: list[str],
    w_hat: torch.Tensor,
    qp: QParams,
    g_idx: torch.Tensor | None = None,
) -> None:
    """Split a quantized `stacked_weight` and its qparams back onto the stack's modules."""
    rows = [linears[n].out_features for n in stack]
    for name, part, qp_part in zip(stack, w_hat.split(rows), split_rows(qp, rows)):
        linears[name].set_weight(part, qp_part, g_idx)


def rtn_quantize_fused(linears: dict[str, QuantLinear]) -> None:
    """RTN of every module, fused projections sharing global / per-tensor scales."""
    for stack in fused_stacks(linears):
        w = stacked_weight(linears, stack)
        set_stacked(linears, stack, *rtn_weight(w, linears[stack[0]].scheme.weights))


@register_weight_algorithm("rtn")
class RTN:
    """Round-to-nearest with the weight args' observer (min-max by default); no data."""

    needs_data = False

    def start_layer(self, linears: dict[str, QuantLinear]) -> None:
        pass

    def finish_layer(self, linears: dict[str, QuantLinear]) -> None:
        rtn_quantize_fused(linears)


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
    true_sequential: bool | None = None,
    **method_kwargs,
) -> dict[str, QuantLinear]:
    """Quantize `model` in place per `recipe` with weight algorithm `method`.

    `batches`: calibration token ids, [N, L] (split into `batch_size` rows) or a list of
    batches; needed when the recipe has static activations or the method needs data.
    `transforms` run on each decoder layer before it is calibrated (see `LayerTransform`).
    `true_sequential`: calibrate each layer stage by stage (see the module docstring); None
    takes the algorithm's `true_sequential` attribute (off for RTN and GPTQ).
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
    if not (needs_data or transforms):  # weight-only, data-free: no forward at all
        algorithm.start_layer(linears)
        algorithm.finish_layer(linears)
    else:
        if true_sequential is None:
            true_sequential = getattr(algorithm, "true_sequential", False)
        _quantize_with_data(model, linears, algorithm, data, transforms, true_sequential)
    model.quantscale_recipe = recipe
    return linears


def _quantize_with_data(model, linears, algorithm, data, transforms=(), sequential=False) -> None:
    prefix, layers = decoder_layers(model)
    groups = _by_layer(linears, prefix, len(layers))
    for step in layerwise(model, data, description="calibrate"):
        for transform in transforms:
            transform(step)
        group = groups[step.index]
        if group and sequential:
            _calibrate_in_stages(step, group, algorithm)
        elif group:
            _calibrate_group(group, algorithm, step.run)
    rest = {n: q for n, q in linears.items() if not any(n in g for g in groups)}
    if rest:  # Linears outside the decoder layers: one pass of the whole model
        _calibrate_group(rest, algorithm, lambda: run_batches(model, data))


def _calibrate_in_stages(
    step: LayerStep, group: dict[str, QuantLinear], algorithm: WeightAlgorithm
) -> None:
    """True-sequential: each stage calibrated and quantized before the next one runs."""
    for stage in linear_stages(step, group):
        stop = group.get(stage.last) if stage.last is not None else None
        members = {n: group[n] for n in stage.names}
        _calibrate_group(members, algorithm, lambda stop=stop: step.run_until(stop))


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
