"""Calibrate and quantize a Mamba / Mamba2 model end to end, Quamba-style; save and load it.

`quantize_mamba(model, batches, recipe)` replaces each mixer by its quantized counterpart
(`quantscale.mamba.quamba`), then, for Quamba2, measures the per-channel range of x,
clusters and reorders channels and heads (`quantscale.mamba.grouping`), calibrates every
quantization point with its observer on the same batches, and freezes static INT8 scales.
Weights are rounded to nearest, or (`weight_method: gptq`) quantized by GPTQ layer by layer:
each block's projections get the Hessians of the inputs the already quantized blocks give it
(`calibration.sequential.layerwise`, as the LLM path runs GPTQ), the activation scales coming
from the float calibration pass as Quamba calibrates them. With `a16_budget: k` a scan first
quantizes each block alone W4A8 (`block_sensitivity`) and keeps the k blocks whose loss rises
most at W4A16 (Quamba2's mixed W4A8 / W4A16); with `scale_budget: k` the same scan picks the
k blocks whose activation scales are multiplied by `scale_factor` (the plan's x0.8 variant).
`adaptive_groups` picks Quamba2's group count per block (`adaptive_group_count`).
`save_quantized` writes config.json (with a `quantization_config` whose `quant_method` is
`checkpoint.layouts.QUAMBA_METHOD`, "quamba") and model.safetensors (INT8 weights, float32
scales, group maps); `load_quantized` rebuilds the model from them and reproduces the same
outputs. `quantize_mamba_checkpoint` is the whole path from a float checkpoint directory (or
fixture) to a saved one, as `quantscale quantize MAMBA_DIR OUT --scheme W8A8` runs it.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import nn

from quantscale.algorithms.gptq import HessianAccumulator
from quantscale.algorithms.lsq import float_targets, learn_buffers
from quantscale.calibration.sequential import layerwise
from quantscale.checkpoint.layouts import QUAMBA_METHOD
from quantscale.checkpoint.read import SINGLE_NAME, Checkpoint
from quantscale.checkpoint.write import CheckpointWriter
from quantscale.errors import CheckpointError, OutputExistsError, QuantscaleError
from quantscale.mamba.fixtures import load_mamba, require_tokenizer
from quantscale.mamba.grouping import GroupPlan, plan_channels, plan_heads
from quantscale.mamba.mixers import (
    PROJECTIONS,
    MambaKind,
    MambaRecipe,
    child_module,
    layer_index,
    layer_points,
    mamba_kind,
    mixer_shape,
    module_tensor,
    quantized_layers,
    read_recipe,
    reorder_mixer,
    resolve_points,
)
from quantscale.mamba.quamba import (
    _ACT_ARGS,
    MODES,
    ActQuant,
    Mode,
    QLinear,
    QMixerBase,
    is_quantized_mixer,
    quantize_weight,
    quantized_mixer,
)
from quantscale.models.adapter import decoder_layers
from quantscale.models.loader import tied_embeddings
from quantscale.progress import track
from quantscale.qdq import compute_qparams
from quantscale.scheme import LearnScales

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FORMAT_VERSION = 1
SCHEME_W8A8 = "W8A8"
SCAN_BATCHES = 4  # calibration batches each trial of the mixed-precision scan calibrates on
GROUP_SAMPLE_ROWS = 4096  # calibration tokens the adaptive group count scores candidates on


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def run_batches(model: nn.Module, batches: Sequence[torch.Tensor], description: str) -> None:
    """Forward every batch of token ids through the model (outputs discarded)."""
    for ids in track(batches, total=len(batches), description=description):
        model(input_ids=ids, use_cache=False)


def quantized_mixers(model: nn.Module) -> dict[int, QMixerBase]:
    """Layer index -> quantized mixer."""
    _, layers = decoder_layers(model)
    mixers = {i: child_module(layer, "mixer") for i, layer in enumerate(layers)}
    return {i: m for i, m in mixers.items() if is_quantized_mixer(m)}


def _x_act(mixer: QMixerBase) -> ActQuant:
    """The quantizer of the SSM input x (quantized whenever grouping runs)."""
    act = mixer.act("ssm.x")
    assert act is not None, "ssm.x is quantized"
    return act


def _plan(mixer: QMixerBase, kind: MambaKind, head_groups: int, channel_groups: int) -> GroupPlan:
    """Grouping plan of one mixer from the channel ranges of its x."""
    amax = _x_act(mixer).channel_amax
    assert amax is not None, "channel ranges tracked"
    if kind == "mamba":
        return plan_channels(amax, head_groups, channel_groups)
    shape = mixer_shape(mixer, kind)
    stats = amax.reshape(shape["ssd_groups"], -1, shape["head_dim"])
    return plan_heads(stats, head_groups, channel_groups)


def plan_sqnr(plan: GroupPlan, amax: torch.Tensor, sample: torch.Tensor) -> float:
    """SQNR (dB) of a sample of x [rows, channels] after the INT8 round trip with the plan's
    group scales (min-max: each group's largest channel range, `amax` [channels])."""
    from quantscale.eval.error import sqnr_db
    from quantscale.formats.intq import dequantize_int, quantize_int

    group_amax = torch.zeros(plan.n_groups).scatter_reduce(
        0, plan.group_id, amax[plan.perm].float(), "amax"
    )
    scale = compute_qparams(_ACT_ARGS, -group_amax, group_amax).scale[plan.group_id]
    x = sample[:, plan.perm].float()
    return sqnr_db(x, dequantize_int(quantize_int(x, scale), scale))


def smallest_within(sqnrs: dict[int, float], threshold_db: float) -> int:
    """The smallest candidate whose SQNR is within `threshold_db` of the best one's."""
    best = max(sqnrs.values())
    return min(k for k, v in sqnrs.items() if v >= best - threshold_db)


def adaptive_group_count(
    mixer: QMixerBase, kind: MambaKind, recipe: MambaRecipe
) -> tuple[int, dict[int, float]]:
    """(chosen k, SQNR per candidate k) of one mixer: `smallest_within` over the recipe's
    `adaptive_groups`, each a plan of k head groups x k channel groups scored by `plan_sqnr`
    on the sampled calibration tokens."""
    act = _x_act(mixer)
    assert act.channel_amax is not None and act.channel_sample, "channels tracked"
    sample = torch.cat(act.channel_sample)
    candidates = recipe.adaptive_groups or []
    sqnrs = {k: plan_sqnr(_plan(mixer, kind, k, k), act.channel_amax, sample) for k in candidates}
    return smallest_within(sqnrs, recipe.adaptive_sqnr_db), sqnrs


def _group_and_reorder(
    model: nn.Module, batches: Sequence[torch.Tensor], kind: MambaKind, recipe: MambaRecipe
) -> dict[int, dict]:
    """Quamba2: measure x's channel ranges, cluster, reorder weights, set the group maps
    (in the mixers whose ssm.x has piecewise scales). Returns, with `adaptive_groups`, each
    block's chosen k and candidate SQNRs."""
    mixers = {
        i: m
        for i, m in quantized_mixers(model).items()
        if m.act("ssm.x") is not None and m.specs["ssm.x"].piecewise
    }
    if not mixers:
        return {}
    adaptive = recipe.adaptive_groups is not None
    for mixer in mixers.values():
        _x_act(mixer).track_channels(GROUP_SAMPLE_ROWS if adaptive else 0)
    run_batches(model, batches, "channel ranges")
    chosen = {}
    for i, mixer in mixers.items():
        groups = (recipe.head_groups, recipe.channel_groups)
        if adaptive:
            k, sqnrs = adaptive_group_count(mixer, kind, recipe)
            chosen[i] = {"k": k, "sqnr_db": {str(c): v for c, v in sqnrs.items()}}
            groups = (k, k)
        plan = _plan(mixer, kind, *groups)
        act = _x_act(mixer)
        act.channel_amax, act.channel_sample = None, None
        reorder_mixer(mixer, kind, plan)
        act.set_groups(plan.group_id, plan.n_groups)
    return chosen


@torch.no_grad()
def _round_norms(model: nn.Module, layers: list[int]) -> None:
    """Round the block norms' weights to a per-tensor INT8 grid (the `norm.weight` point)."""
    _, blocks = decoder_layers(model)
    for i in layers:
        w = module_tensor(child_module(blocks[i], "norm"), "weight")
        q, scale = quantize_weight(w.reshape(1, -1), "tensor")
        w.copy_((q.float() * scale).reshape(w.shape).to(w.dtype))


def quantize_mamba(
    model: PreTrainedModel, batches: Sequence[torch.Tensor], recipe: MambaRecipe | None = None
) -> PreTrainedModel:
    """Quantize a MambaForCausalLM / Mamba2ForCausalLM in place with static INT8 scales.

    `batches`: token-id tensors [batch, seq_len] for calibration. Returns the model, with
    its quantized mixers in int8 mode and `config.quantization_config` set.
    """
    recipe = recipe or MambaRecipe()
    kind = mamba_kind(model)
    model.eval()
    n_params = n_parameters(model)
    recipe, scores = _choose_sensitive(model, batches, recipe)
    specs = resolve_points(kind, recipe, n_params)
    _, layers = decoder_layers(model)
    chosen = quantized_layers(len(layers), recipe)
    learns = recipe.learn_scales is not None and recipe.learn_scales.steps > 0
    float_layers = copy.deepcopy(layers) if learns else None  # LSQ's targets
    for i in chosen:
        mixer = child_module(layers[i], "mixer")
        own = layer_points(specs, kind, recipe, i, len(layers))
        layers[i].mixer = quantized_mixer(mixer, kind, own, recipe.weight_format)
    groups = _group_and_reorder(model, batches, kind, recipe)
    mixers = quantized_mixers(model)
    _set_scale_factors(mixers, recipe, len(layers))
    for mixer in mixers.values():
        if recipe.rotate:  # after Quamba2's reordering of out_proj's input columns
            mixer.add_out_hadamard()
        mixer.start_calibration()
    if any(len(m.acts) for m in mixers.values()):
        run_batches(model, batches, "calibration")
    if recipe.weight_method == "gptq":
        _gptq_layers(model, batches, mixers, recipe.gptq_inputs == "quantized")
    for mixer in mixers.values():
        if mixer.mode != "int8":
            mixer.freeze()
    if specs["norm.weight"].quantize:
        _round_norms(model, chosen)
    _learn_scales(model, batches, mixers, float_layers, recipe.learn_scales)
    model.config.quantization_config = quantization_config(recipe, n_params, chosen, scores)
    if groups:
        model.config.quantization_config["group_counts"] = {str(i): g for i, g in groups.items()}
    return model


def _choose_sensitive(
    model: PreTrainedModel, batches: Sequence[torch.Tensor], recipe: MambaRecipe
) -> tuple[MambaRecipe, dict[int, float] | None]:
    """The recipe with `a16_layers` / `scale_layers` chosen by the sensitivity scan where
    it has a budget for them, and the scan's scores (None: no scan)."""
    if recipe.a16_budget is None and recipe.scale_budget is None:
        return recipe, None
    scores = block_sensitivity(model, batches, recipe)
    update = {}
    if recipe.a16_budget is not None:
        update["a16_layers"] = most_sensitive(scores, recipe.a16_budget, "a16_budget")
    if recipe.scale_budget is not None:
        update["scale_layers"] = most_sensitive(scores, recipe.scale_budget, "scale_budget")
    return recipe.model_copy(update=update), scores


def _set_scale_factors(mixers: dict[int, QMixerBase], recipe: MambaRecipe, n_layers: int) -> None:
    """Give the activation quantizers of the recipe's `scale_layers` its `scale_factor`."""
    for i in recipe.scale_layers:
        mixer = mixers.get(layer_index(i, n_layers, "scale_layers"))
        for act in [] if mixer is None else mixer.acts.values():
            cast(ActQuant, act).scale_factor = recipe.scale_factor


def _gptq_layers(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    mixers: dict[int, QMixerBase],
    quantized_inputs: bool = False,
) -> None:
    """Freeze the mixers block by block, each block's projections by GPTQ on the Hessians of
    the inputs that the blocks before it, already quantized, give it (`quantized_inputs`:
    each input after its static INT8 round trip, as the W4A8 matmul sees it)."""
    for mixer in mixers.values():
        mixer.finish_activations()
        mixer.set_mode("float")
    for step in layerwise(model, list(batches), "GPTQ"):
        if step.index not in mixers:
            continue
        mixer = mixers[step.index]
        accs, handles = {}, []
        for name in PROJECTIONS:
            linear = getattr(mixer, name, None)
            if isinstance(linear, QLinear) and linear.quantized:
                acc = accs[name] = HessianAccumulator(linear.weight.shape[1])
                hook = _hessian_hook(acc, quantized_inputs)
                handles.append(linear.register_forward_pre_hook(hook))
        try:
            step.run()
        finally:
            for handle in handles:
                handle.remove()
        mixer.freeze(hessians={name: acc.hessian() for name, acc in accs.items()})


def _learn_scales(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    mixers: dict[int, QMixerBase],
    float_layers: nn.ModuleList | None,
    options: LearnScales | None,
) -> None:
    """LSQ on each quantized block's static activation scales (`algorithms.lsq`), block by
    block on the inputs the quantized blocks before it give, against the float block (its
    fake-quant mode: the INT8 matmuls have no gradient); nothing without `float_layers`."""
    if float_layers is None or options is None:
        return
    for step in layerwise(model, list(batches), "learn scales"):
        mixer = mixers.get(step.index)
        if mixer is None or not len(mixer.acts):
            continue
        targets = float_targets(step, float_layers[step.index])
        keys = list(mixer.acts)
        mixer.set_mode("fake")
        try:
            paths = [[f"mixer.acts.{k}"] for k in keys]
            learned, _ = learn_buffers(step, targets, paths, "scale", options)
        finally:
            mixer.set_mode("int8")
        for key, scale in zip(keys, learned):
            cast(ActQuant, mixer.acts[key]).scale = scale.clone()


def _hessian_hook(acc: HessianAccumulator, quantized: bool):
    """A QLinear pre-hook (args: x, its input quantizer, mode) adding x to `acc`."""

    def hook(_module: nn.Module, args: tuple) -> None:
        x, act = args[0], args[1]
        acc.add(act.qdq(x) if quantized and act is not None else x)

    return hook


def block_sensitivity(
    model: PreTrainedModel, batches: Sequence[torch.Tensor], recipe: MambaRecipe
) -> dict[int, float]:
    """Block index -> increase of the mean next-token loss (nats) on the first calibration
    batch when that block alone is quantized W4A8 by `recipe` (the others float), calibrated
    on the first `SCAN_BATCHES` batches, for each block the recipe quantizes. `model` is
    float and is not changed."""
    from quantscale.eval.perplexity import perplexity

    probe = batches[0]
    w4a8 = recipe.model_copy(
        update={
            "a16_budget": None,
            "a16_layers": [],
            "scale_budget": None,
            "scale_layers": [],
            "activation_bits": 8,
        }
    )
    base = math.log(perplexity(model, probe, seq_len=probe.shape[1]))
    _, layers = decoder_layers(model)
    candidates = quantized_layers(len(layers), recipe)
    scores = {}
    for i in track(candidates, total=len(candidates), description="block sensitivity"):
        trial = copy.deepcopy(model)
        others = [j for j in range(len(layers)) if j != i]
        alone = w4a8.model_copy(update={"float_layers": others})
        quantize_mamba(trial, batches[:SCAN_BATCHES], alone)
        scores[i] = math.log(perplexity(trial, probe, seq_len=probe.shape[1])) - base
    return scores


def most_sensitive(scores: dict[int, float], budget: int, field: str = "a16_budget") -> list[int]:
    """The `budget` blocks with the largest scores (ties: the earlier block), in block
    order; `field` names the recipe field in the error."""
    if budget > len(scores):
        raise QuantscaleError(f"{field} {budget}: only {len(scores)} quantized blocks to choose")
    ranked = sorted(scores, key=lambda i: (-scores[i], i))
    return sorted(ranked[:budget])


W4_GROUP = 128
W4_SCHEMES: dict[str, Literal[8, 16]] = {"W4A8": 8, "W4A16": 16}  # scheme -> activation bits
WEIGHT_METHODS = ("rtn", "gptq")


def scheme_recipe(scheme: str | os.PathLike, method: str | None = None) -> MambaRecipe:
    """The MambaRecipe of a scheme: "W8A8" (the default Quamba1 recipe), "W4A8" / "W4A16"
    (Quamba2 with int4 in_proj / x_proj / out_proj in groups of `W4_GROUP` input columns;
    W4A16: float activations) or a recipe file; `method` "rtn" / "gptq" sets the weight
    method."""
    if method is not None and method not in WEIGHT_METHODS:
        raise QuantscaleError(
            f"method {method!r} does not apply to a Mamba model; use one of {WEIGHT_METHODS}"
        )
    if scheme == SCHEME_W8A8:
        recipe = MambaRecipe()
    elif scheme in W4_SCHEMES:
        recipe = MambaRecipe(
            method="quamba2",
            weight_bits=4,
            weight_group_size=W4_GROUP,
            activation_bits=W4_SCHEMES[str(scheme)],
        )
    elif Path(scheme).suffix.lower() in (".yaml", ".yml", ".json") or Path(scheme).is_file():
        recipe = read_recipe(scheme)
    else:
        raise QuantscaleError(
            f"scheme {os.fspath(scheme)!r} is not supported for Mamba models; use "
            f"{SCHEME_W8A8!r} (Quamba static INT8), {' / '.join(map(repr, W4_SCHEMES))} "
            "(Quamba2 int4 weights) or a MambaRecipe YAML file"
        )
    return recipe.with_options(weight_method=method)


def calibration_token_batches(
    tokenizer: Any,
    recipe: MambaRecipe,
    source: str | os.PathLike | torch.Tensor | None = None,
    model_spec: str | os.PathLike = "the model",
) -> list[torch.Tensor]:
    """The recipe's calibration windows (n_samples x seq_len) over a text file or, by
    default, the calibration articles, in batches of `recipe.batch_size`; token ids [N, L]
    given as `source` are used as they are. Text needs the tokenizer of `model_spec`."""
    from quantscale.data.calibration import calibration_batches, token_ids

    if isinstance(source, torch.Tensor):
        tokens = token_ids(source)
    else:
        tokenizer = require_tokenizer(tokenizer, model_spec, "calibration")
        tokens = calibration_batches(tokenizer, recipe.n_samples, recipe.seq_len, source=source)
    return list(tokens.split(recipe.batch_size))


def quantize_mamba_checkpoint(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    scheme: str = SCHEME_W8A8,
    *,
    calib_samples: int = 512,
    calib_seq_len: int = 512,
    calib_data: str | os.PathLike | torch.Tensor | None = None,
    overwrite: bool = False,
    rotate: str | None = None,
    method: str | None = None,
    learn_scales: int | LearnScales | None = None,
) -> Path:
    """Load a float Mamba model (directory or `fixture:<kind>`), calibrate it the Quamba way
    on `calib_samples` windows of `calib_seq_len` tokens (of `calib_data`, default the
    Wikipedia calibration split) and save it to `out`; returns the written directory.
    `rotate` ('hadamard'): the out_proj input Hadamard (the recipe's `rotate`); `method`:
    the weight method ('rtn' / 'gptq', `scheme_recipe`); `learn_scales` (steps or options):
    LSQ on every block's activation scales (the recipe's `learn_scales`)."""
    if isinstance(learn_scales, int):
        learn_scales = LearnScales(steps=learn_scales)
    recipe = scheme_recipe(scheme, method).with_options(
        n_samples=calib_samples, seq_len=calib_seq_len, rotate=rotate, learn_scales=learn_scales
    )
    return quantize_and_save(model_dir, out, recipe, calib_data, overwrite)


def quantize_and_save(
    model_spec: str | os.PathLike,
    out: str | os.PathLike,
    recipe: MambaRecipe,
    calib_data: str | os.PathLike | torch.Tensor | None = None,
    overwrite: bool = False,
) -> Path:
    """Load a float Mamba model, quantize it with `recipe` (calibrating on `calib_data` or
    the Wikipedia calibration split) and save it with its tokenizer to `out`."""
    if Path(out).exists() and not overwrite:
        raise OutputExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    model, tokenizer = load_mamba(model_spec)
    batches = calibration_token_batches(tokenizer, recipe, calib_data, model_spec)
    quantize_mamba(model, batches, recipe)
    return save_quantized(model, out, tokenizer, overwrite=overwrite)


def quantization_config(
    recipe: MambaRecipe,
    n_params: int,
    layers: list[int],
    scores: dict[int, float] | None = None,
) -> dict:
    """The `quantization_config` saved in config.json (with the mixed-precision scan's
    `block_sensitivity` when one chose the W4A16 blocks)."""
    config = {
        "quant_method": QUAMBA_METHOD,
        "format_version": FORMAT_VERSION,
        "recipe": recipe.model_dump(),
        "n_params": n_params,
        "quantized_layers": layers,
    }
    if scores is not None:
        config["block_sensitivity"] = {str(i): v for i, v in scores.items()}
    return config


def set_mode(model: nn.Module, mode: Mode) -> None:
    """Switch every quantized mixer to `mode` ('int8' real INT8, 'fake' reference)."""
    if mode not in MODES:
        raise QuantscaleError(f"unknown mode {mode!r}; expected one of {MODES}")
    for mixer in quantized_mixers(model).values():
        mixer.set_mode(mode)


def save_quantized(
    model: PreTrainedModel,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write a quantized model (config.json, model.safetensors, tokenizer files if given)."""
    if not quantized_mixers(model):
        raise QuantscaleError("save_quantized: the model has no quantized Mamba mixers")
    tensors = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if tied_embeddings(model):
        tensors.pop("lm_head.weight", None)
    with CheckpointWriter(out_dir, overwrite=overwrite) as writer:
        writer.write_shard(SINGLE_NAME, tensors)
        writer.write_json("config.json", model.config.to_dict())
        if tokenizer is not None:
            tokenizer.save_pretrained(str(writer.tmp))
        return writer.commit(write_index=False)


def load_quantized(path: str | os.PathLike) -> PreTrainedModel:
    """Rebuild a model written by `save_quantized`, in int8 mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = Checkpoint(path)
    qcfg = (ckpt.config or {}).get("quantization_config") or {}
    if qcfg.get("quant_method") != QUAMBA_METHOD:
        raise CheckpointError(
            f"{ckpt.path / 'config.json'}: quantization_config.quant_method is "
            f"{qcfg.get('quant_method')!r}; expected {QUAMBA_METHOD!r}"
        )
    recipe = MambaRecipe.model_validate(qcfg["recipe"])
    config = AutoConfig.from_pretrained(str(ckpt.path))
    kind = mamba_kind(config)
    specs = resolve_points(kind, recipe, int(qcfg["n_params"]))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    _, layers = decoder_layers(model)
    for i in qcfg["quantized_layers"]:
        own = layer_points(specs, kind, recipe, i, len(layers))
        mixer = quantized_mixer(child_module(layers[i], "mixer"), kind, own, recipe.weight_format)
        if recipe.rotate:
            mixer.add_out_hadamard(fuse=False)  # the stored weight is rotated
        mixer.freeze(placeholder=True)
        layers[i].mixer = mixer
    model = model.to_empty(device="cpu")
    state = {name: ckpt.get(name) for name in ckpt.names()}
    _load_state(model, state, ckpt.path)
    return model.eval()


def _load_state(model: PreTrainedModel, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load tensors strictly (a tied lm_head may be absent) and re-tie embeddings."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and _tie_config(model))]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: tensors do not match the quantized model; missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    if _tie_config(model):
        out = model.get_output_embeddings()
        assert out is not None, "a causal LM has an lm_head"
        out.weight = model.get_input_embeddings().weight


def _tie_config(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))
