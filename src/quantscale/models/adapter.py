"""Walk a causal LM the way quantization needs: its decoder layers and their Linear modules."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from torch import nn

from quantscale.naming import is_ignored

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Attribute paths of the decoder-layer list in the architectures we know, most specific first.
_LAYER_PATHS = (
    "model.layers",
    "backbone.layers",
    "transformer.h",
    "model.decoder.layers",
    "layers",
)


def causal_lm(model: nn.Module) -> PreTrainedModel:
    """The model seen as the transformers model it is (config, embeddings, base model)."""
    return cast("PreTrainedModel", model)


def _get(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name prefix, module list) of the model's repeated blocks."""
    for path in _LAYER_PATHS:
        layers = _get(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return path, layers
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no list of decoder layers found")
    return max(lists, key=lambda item: len(item[1]))


def quantizable_linears(
    module: nn.Module, prefix: str = "", ignore: tuple[str, ...] | list[str] = ()
) -> dict[str, nn.Linear]:
    """Full name -> Linear for every Linear under `module` not ignored by default or by `ignore`."""
    found = {}
    for name, child in module.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if isinstance(child, nn.Linear) and not is_ignored(full, ignore):
            found[full] = child
    return found


def layer_linears(
    model: nn.Module, ignore: tuple[str, ...] | list[str] = ()
) -> list[dict[str, nn.Linear]]:
    """For each decoder layer, its quantizable Linear modules by full name."""
    prefix, layers = decoder_layers(model)
    return [quantizable_linears(layer, f"{prefix}.{i}", ignore) for i, layer in enumerate(layers)]


def tied_across_layers(model: nn.Module) -> dict[str, list[int]]:
    """Linear modules whose weight more than one decoder layer holds (the same module or tied
    parameters, e.g. Zamba2's shared transformer blocks): first full name -> the layer
    indices that hold it."""
    prefix, layers = decoder_layers(model)
    uses: dict[int, list[tuple[int, str]]] = {}
    for i, layer in enumerate(layers):
        for name, child in layer.named_modules(remove_duplicate=False):
            if isinstance(child, nn.Linear):
                uses.setdefault(id(child.weight), []).append((i, f"{prefix}.{i}.{name}"))
    found = {}
    for held in uses.values():
        indices = sorted({i for i, _ in held})
        if len(indices) > 1:
            found[held[0][1]] = indices
    return found
