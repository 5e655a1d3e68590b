"""The model front door: resolve a checkpoint (a directory or a named model), load it, its
tokenizer, and our fake-quant saves with their QuantLinears and static scales.

Loaders refuse a checkpoint whose `quantization_config` they would not apply: transformers
applies (dequantizes on load) HF fine-grained FP8 and compressed-tensors itself
(`PASSED_THROUGH`); anything else (ModelOpt, Neuron, Quamba, GPTQ...) would silently load as a
plain float model, so it is an error instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantscale.checkpoint.layouts import (
    CT_METHOD,
    FAKE_QUANT_FORMAT,
    FAKE_QUANT_KEY,
    HF_FP8_METHOD,
    NEURON_KEY,
)
from quantscale.checkpoint.read import Checkpoint
from quantscale.checkpoint.runtimes import runtime_refusals
from quantscale.data import assets
from quantscale.errors import CheckpointError, QuantscaleError
from quantscale.runtime.hadamard import add_online_hadamards
from quantscale.runtime.qlinear import replace_linears
from quantscale.scheme import Recipe

# Names accepted in place of a checkpoint directory: built (once) in the cache.
NAMED_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2": assets.smollm2_checkpoint,
    "gemma3": assets.gemma3_checkpoint,
}
# quantization_config.quant_method values transformers applies on load.
PASSED_THROUGH = (HF_FP8_METHOD, CT_METHOD)


def resolve_model(spec: str | os.PathLike) -> Path:
    """A checkpoint directory or one of NAMED_MODELS built in the cache (trained fixtures,
    `fixture:<kind>`, resolve one layer up: `orchestrator.resolve_model`)."""
    text = os.fspath(spec)
    if text in NAMED_MODELS:
        return NAMED_MODELS[text]()
    path = Path(text)
    if not (path / "config.json").is_file():
        raise QuantscaleError(
            f"{path} is not a checkpoint dir (no config.json); "
            f"give a dir, fixture:<kind> or one of: {', '.join(NAMED_MODELS)}"
        )
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a checkpoint directory."""
    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: cannot read: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: not a JSON object")
    return config


def quant_method(config: dict[str, Any]) -> str | None:
    """config.json's quantization_config.quant_method (None for a float checkpoint)."""
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    return str(method) if method is not None else None


def load_tokenizer(path: str | os.PathLike, fallback: str | os.PathLike | None = None) -> Any:
    """The tokenizer saved with a checkpoint, else the one of `fallback` (e.g. the baseline)."""
    from transformers import AutoTokenizer

    for candidate in (path, fallback):
        if candidate is not None and (Path(candidate) / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(candidate))
    raise QuantscaleError(f"{path} has no tokenizer_config.json and no baseline to borrow from")


def saved_tokenizer(path: str | os.PathLike) -> Any | None:
    """The tokenizer saved with a checkpoint, or None when it has none."""
    try:
        return load_tokenizer(path)
    except QuantscaleError:
        return None


def tied_embeddings(model: nn.Module) -> bool:
    """Whether the model's lm_head shares its weight with the input embeddings."""
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    if get_out is None or get_in is None:
        return False
    out, inp = get_out(), get_in()
    return out is not None and inp is not None and out.weight is inp.weight


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers causal LM from a checkpoint dir, in eval mode; refuses a
    `quantization_config` transformers would not apply (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    config = read_config(path)
    method = quant_method(config) or (NEURON_KEY if NEURON_KEY in config else None)
    if method is not None and method not in PASSED_THROUGH:
        raise CheckpointError(
            f"{path}: quantization_config.quant_method {method!r} is not applied by this "
            f"loader (it reads float checkpoints, {' and '.join(PASSED_THROUGH)} ones, "
            "quantscale fake-quant saves and Quamba checkpoints); dequantize or convert it first"
        )
    if method == CT_METHOD:
        refuse_runtime(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    if method == CT_METHOD:
        decompress_now(model)
    return model.eval()


def refuse_runtime(path: str | os.PathLike) -> None:
    """Raise naming the tensors transformers cannot run (checkpoint/runtimes.py rules)."""
    refusals = runtime_refusals(str(path), "transformers")
    if refusals:
        names = ", ".join(r.tensor for r in refusals[:4])
        more = f" and {len(refusals) - 4} more" if len(refusals) > 4 else ""
        first = refusals[0]
        raise CheckpointError(
            f"{path}: {first.runtime} {first.version} cannot run {len(refusals)} weights "
            f"({names}{more}): {first.reason} (`quantscale validate {path} --runtime "
            "transformers` lists them all)"
        )


def decompress_now(model: nn.Module) -> None:
    """Decompress a compressed-tensors model's packed weights in place, now.

    transformers leaves them packed (`weight_packed`, no `weight`) and registers a pre-hook on
    the top `*ForCausalLM` that decompresses on its first forward; our evaluators call
    `base_model` and the LM head directly, so that hook would never fire and the first Linear
    would fail with "'Linear' object has no attribute 'weight'". Running the hook's own
    decompression here gives the same weights `model(ids)` would use.
    """
    hook = getattr(model, "ct_decompress_hook", None)
    quantizer = getattr(model, "hf_quantizer", None)
    if hook is not None and quantizer is not None:
        quantizer.compressor.decompress_model(model)


def is_fake_quant(config: dict[str, Any]) -> bool:
    """Whether a config.json is that of a fake-quant save (it carries the FAKE_QUANT_KEY entry)."""
    return FAKE_QUANT_KEY in config


def load_fake_quant(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A model written by `export.fake_quant.save_quantized`, with its QuantLinears and
    static scales; the recipe comes back as `model.quantscale_recipe`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    meta = read_config(path).get(FAKE_QUANT_KEY)
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or fmt != FAKE_QUANT_FORMAT:
        raise CheckpointError(
            f"{path / 'config.json'}: {FAKE_QUANT_KEY}.format is {fmt!r}; "
            f"expected {FAKE_QUANT_FORMAT!r}"
        )
    recipe = Recipe.model_validate(meta["recipe"])
    config = AutoConfig.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    replace_linears(model, recipe)
    add_online_hadamards(model, recipe)
    ckpt = Checkpoint(path)
    state = {name: ckpt.get(name) for name in ckpt.names()}
    load_state_checked(model, state, path, "the quantized model")
    model.quantscale_recipe = recipe
    return model.eval()


def load_state_checked(model: Any, state: dict, path: str | os.PathLike, what: str) -> None:
    """Load `state` into `model`; every parameter and buffer must come from it (a tied
    lm_head excepted, then re-tied), and nothing may be left over."""
    result = model.load_state_dict(state, strict=False)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: tensors do not match {what}; missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    if tied:
        model.tie_weights()


def load_model(spec: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer or None) of a checkpoint dir or named model; a fake-quant save comes
    back with its QuantLinears and static scales."""
    path = resolve_model(spec)
    tokenizer = saved_tokenizer(path)
    if is_fake_quant(read_config(path)):
        return load_fake_quant(path, dtype), tokenizer
    return load_pretrained(path, dtype), tokenizer
