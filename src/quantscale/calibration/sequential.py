"""Layer-by-layer forward of calibration data through a causal LM.

`layerwise(model, batches)` yields one `LayerStep` per decoder layer. The consumer attaches
hooks, calls `step.run()` to push every cached batch through the layer, and changes the
layer (quantizes it); when the consumer asks for the next step, the driver recomputes the
layer's outputs with the changed layer, so that each layer is calibrated on the inputs the
quantized model will really give it (as GPTQ needs).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from quantscale.models.adapter import decoder_layers
from quantscale.progress import track


class _StopForward(Exception):
    pass


@dataclass
class LayerStep:
    """One decoder layer with the cached inputs of every calibration batch."""

    index: int
    name: str
    layer: nn.Module
    inputs: list[tuple[tuple, dict]] = field(repr=False)

    @torch.inference_mode()
    def run(self) -> list[torch.Tensor]:
        """Forward every cached batch through the layer; returns the hidden-state outputs."""
        return [layer_output(self.layer(*args, **kwargs)) for args, kwargs in self.inputs]


def layer_output(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_hidden(hidden: torch.Tensor, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.inference_mode()
def capture_layer_inputs(
    model: nn.Module, layer: nn.Module, batches: list[torch.Tensor]
) -> list[tuple[tuple, dict]]:
    """Run the model up to `layer` for each batch of token ids and keep the layer's inputs."""
    captured: list[tuple[tuple, dict]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, dict(kwargs)))
        raise _StopForward

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def layerwise(
    model: nn.Module, batches: list[torch.Tensor], description: str = "layers"
) -> Iterator[LayerStep]:
    """Yield a `LayerStep` per decoder layer; see the module docstring for the protocol."""
    prefix, layers = decoder_layers(model)
    inputs = capture_layer_inputs(model, layers[0], batches)
    for index in track(range(len(layers)), len(layers), description):
        step = LayerStep(index, f"{prefix}.{index}", layers[index], inputs)
        yield step
        if index + 1 < len(layers):
            inputs = [replace_hidden(out, a, k) for out, (a, k) in zip(step.run(), inputs)]


def batched(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split [n, seq_len] token ids into batches of at most `batch_size` rows."""
    return list(tokens.split(batch_size))
