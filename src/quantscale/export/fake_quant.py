"""Our fake-quant save: the fake-quantized model with its qparam buffers, config.json carrying
the recipe under "quantscale" (format "fake-quant"); `models.loader.load_fake_quant` reads it
back with its QuantLinears and static scales."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from quantscale.checkpoint.layouts import FAKE_QUANT_FORMAT, FAKE_QUANT_KEY
from quantscale.checkpoint.read import SINGLE_NAME
from quantscale.checkpoint.write import CheckpointWriter
from quantscale.errors import QuantscaleError
from quantscale.models.adapter import causal_lm
from quantscale.models.loader import tied_embeddings
from quantscale.runtime.qlinear import quant_linears
from quantscale.scheme import Recipe


def save_quantized(
    model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False
) -> Path:
    """Write the fake-quantized model (weights, qparam buffers, config with the recipe)."""
    recipe: Recipe | None = getattr(model, "quantscale_recipe", None)
    if recipe is None or not quant_linears(model):
        raise QuantscaleError("save_quantized: the model was not quantized by quantize_model")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if tied_embeddings(model):
        tensors.pop("lm_head.weight", None)
    config = causal_lm(model).config.to_dict()
    config.pop("quantization_config", None)
    config[FAKE_QUANT_KEY] = {"format": FAKE_QUANT_FORMAT, "recipe": recipe.model_dump(mode="json")}
    with CheckpointWriter(out_dir, overwrite=overwrite) as writer:
        writer.write_shard(SINGLE_NAME, tensors)
        writer.write_json("config.json", config)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(writer.tmp))
        return writer.commit(write_index=False)
