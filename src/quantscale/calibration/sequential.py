"""Layer-by-layer forward of calibration data through a causal LM.

`layerwise(model, batches)` yields one `LayerStep` per decoder layer. The consumer attaches
hooks, calls `step.run()` to push every cached batch through the layer, and changes the
layer (quantizes it); when the consumer asks for the next step, the driver recomputes the
layer's outputs with the changed layer, so that each layer is calibrated on the inputs the
quantized model will really give it (as GPTQ needs).

True-sequential order inside a layer: `linear_stages(step, linears)` orders the layer's
Linears into stages (q/k/v, then o_proj, then gate/up, then down_proj) found by one probe
forward: modules fed the very same input tensor form one stage, stages follow the order they
first run, and MoE experts' same-named projections merge into one stage. A consumer that
quantizes stage by stage, each with `step.run_until(last module of the stage)`, calibrates
every stage on the outputs of the already quantized stages before it.

Each layer gets the arguments the model itself passes it (`capture_layer_arguments`): hybrid
models give attention and Mamba / linear-attention layers different masks (Jamba, Bamba,
Nemotron-H, Qwen3-Next...), Gemma-3 sliding and full layers different masks and rotary
tables, Zamba2 each layer its own index; only the hidden states come from the layer before.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

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

    @torch.inference_mode()
    def run_until(self, module: nn.Module | None) -> None:
        """Forward every cached batch through the layer, each stopped once `module` has run
        (the whole layer when `module` is None or does not run)."""
        if module is None:
            self.run()
            return

        def stop(*_args) -> None:
            raise _StopForward

        handle = module.register_forward_hook(stop)
        try:
            for args, kwargs in self.inputs:
                try:
                    self.layer(*args, **kwargs)
                except _StopForward:
                    pass
        finally:
            handle.remove()

    @torch.inference_mode()
    def observe(self, needed: Mapping[nn.Module, bool]) -> None:
        """Forward every cached batch only as far as a calibration pass needs: a batch stops
        once each module of `needed` has been reached (True: once it has run, for hooks on
        its output; False: at its input, before it runs), since the layer's output is not
        used. Call it after the observers' hooks are attached (hooks run in the order they
        were registered). The first batch runs whole and shows whether stopping is safe:
        only if every needed module ran exactly once in it (a module called twice, or not
        at all, e.g. an expert the router skipped, means the later calls matter); a later
        batch in which a needed module does not run simply runs whole."""
        if not needed:
            for args, kwargs in self.inputs:
                self.layer(*args, **kwargs)
            return
        calls: dict[nn.Module, int] = {}
        armed = False

        def seen(module: nn.Module) -> None:
            calls[module] = calls.get(module, 0) + 1
            if armed and len(calls) == len(needed):
                raise _StopForward

        handles = [
            m.register_forward_hook(lambda mod, _a, _o: seen(mod))
            if after
            else m.register_forward_pre_hook(lambda mod, _a: seen(mod))
            for m, after in needed.items()
        ]
        try:
            for i, (args, kwargs) in enumerate(self.inputs):
                calls.clear()
                try:
                    self.layer(*args, **kwargs)
                except _StopForward:
                    pass
                if i == 0:
                    armed = len(calls) == len(needed) and all(c == 1 for c in calls.values())
        finally:
            for handle in handles:
                handle.remove()


@dataclass
class Stage:
    """Linears quantized together in true-sequential order; `last` ran last in the probe."""

    names: list[str]
    last: str | None


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".#", name)


@torch.inference_mode()
def _run_order(step: LayerStep, linears: Mapping[str, nn.Module]) -> list[tuple[str, object]]:
    """(name, input tensor) of each Linear call while the first cached batch runs."""
    order: list[tuple[str, object]] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, a, n=n: order.append((n, a[0])))
        for n, m in linears.items()
    ]
    try:
        args, kwargs = step.inputs[0]
        step.layer(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _last(names: list[str], last_run: dict[str, int]) -> str | None:
    """The member that ran last, or None (run the whole layer) when one did not run, as
    it may run after that point for other batches (MoE experts the router skipped)."""
    if any(n not in last_run for n in names):
        return None
    return max(names, key=last_run.__getitem__)


def linear_stages(step: LayerStep, linears: Mapping[str, nn.Module]) -> list[Stage]:
    """The layer's Linears in true-sequential stages; see the module docstring. Linears that
    did not run in the probe join the stage of their same-named siblings (which then runs
    the whole layer), else a last stage."""
    order = _run_order(step, linears) if step.inputs else []
    groups: list[tuple[object, list[str]]] = []
    last_run: dict[str, int] = {}
    for i, (name, x) in enumerate(order):
        last_run[name] = i
        if any(name in members for _, members in groups):
            continue
        same = next((members for t, members in groups if t is x), None)
        if same is None:
            groups.append((x, [name]))
        else:
            same.append(name)
    stages: dict[frozenset, list[str]] = {}
    for _, members in groups:
        stages.setdefault(frozenset(map(_pattern, members)), []).extend(members)
    rest: list[str] = []
    for name in linears:
        if name not in last_run:
            key = next((k for k in stages if _pattern(name) in k), None)
            (stages[key] if key is not None else rest).append(name)
    out = [Stage(names, _last(names, last_run)) for names in stages.values()]
    if rest:
        out.append(Stage(rest, None))
    return out


def layer_output(output: object) -> torch.Tensor:
    """A decoder layer's hidden states (layers return them alone or first in a tuple)."""
    return cast(torch.Tensor, output[0] if isinstance(output, (tuple, list)) else output)


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
        _run_until_stopped(model, batches)
    finally:
        handle.remove()
    return captured


def _run_until_stopped(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """One forward per batch of token ids, each ended early by a hook raising _StopForward."""
    for ids in batches:
        try:
            model(input_ids=ids, use_cache=False)
        except _StopForward:
            pass


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return cast(torch.Tensor, args[0] if args else kwargs["hidden_states"])


@torch.inference_mode()
def capture_layer_arguments(
    model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor]
) -> list[list[tuple[tuple, dict]]]:
    """For each layer, for each batch, the (args, kwargs) the model passes that layer, found by
    one forward per batch in which every layer is the identity (no layer weight is read, so
    layers may sit on the meta device); the first layer's hidden states are real, the
    others' are placeholders that `replace_hidden` swaps for the previous layer's outputs.
    The identity returns the hidden states alone, or `(hidden, None)` for models whose layers
    return a tuple (Bamba), whichever the model's loop accepts."""
    try:
        return _capture_arguments(model, layers, batches, tuple_output=False)
    except (TypeError, ValueError) as err:  # the loop unpacks a tuple from each layer
        try:
            return _capture_arguments(model, layers, batches, tuple_output=True)
        except (TypeError, ValueError):
            raise err from None


def _capture_arguments(
    model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor], tuple_output: bool
) -> list[list[tuple[tuple, dict]]]:
    captured: list[list[tuple[tuple, dict]]] = [[] for _ in layers]

    def stub(index: int):
        def forward(*args, **kwargs):
            captured[index].append((args, dict(kwargs)))
            if index == len(layers) - 1:
                raise _StopForward
            hidden = _hidden(args, kwargs)
            return (hidden, None) if tuple_output else hidden

        return forward

    originals = [layer.__dict__.get("forward") for layer in layers]
    for i, layer in enumerate(layers):
        layer.forward = stub(i)
    try:
        _run_until_stopped(model, batches)
    finally:
        for layer, original in zip(layers, originals):
            del layer.forward
            if original is not None:
                layer.forward = original
    return captured


def next_inputs(
    outputs: Sequence[torch.Tensor], arguments: list[tuple[tuple, dict]]
) -> list[tuple[tuple, dict]]:
    """A layer's cached inputs: its own captured arguments, the previous layer's outputs as
    the hidden states."""
    return [replace_hidden(out, a, k) for out, (a, k) in zip(outputs, arguments)]


def layerwise(
    model: nn.Module, batches: list[torch.Tensor], description: str = "layers"
) -> Iterator[LayerStep]:
    """Yield a `LayerStep` per decoder layer; see the module docstring for the protocol."""
    prefix, layers = decoder_layers(model)
    arguments = capture_layer_arguments(model, layers, batches)
    inputs = arguments[0]
    for index in track(range(len(layers)), len(layers), description):
        step = LayerStep(index, f"{prefix}.{index}", layers[index], inputs)
        yield step
        if index + 1 < len(layers):
            inputs = next_inputs(step.run(), arguments[index + 1])


def batched(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split [n, seq_len] token ids into batches of at most `batch_size` rows."""
    return list(tokens.split(batch_size))


def as_batches(
    batches: torch.Tensor | Sequence[torch.Tensor] | None, batch_size: int
) -> list[torch.Tensor]:
    """[N, L] token ids -> batches of `batch_size` rows; a list of batches as is."""
    if batches is None:
        return []
    if isinstance(batches, torch.Tensor):
        return batched(batches, batch_size)
    return list(batches)


@torch.inference_mode()
def run_batches(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Forward token batches through the model's decoder (no logits)."""
    get_decoder = getattr(model, "get_decoder", None)
    body = get_decoder() if get_decoder is not None else model
    for ids in batches:
        body(input_ids=ids, use_cache=False)
