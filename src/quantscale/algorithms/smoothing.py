"""SmoothQuant-style smoothing: move activation outliers into the weights, output-preserving.

For a module `prev` whose output feeds Linears `nexts`, per channel j:
    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)
where X is the input of `nexts` and W their weights side by side. `prev`'s output channels
are divided by s (a norm's weight, or a Linear's rows and bias) and the `nexts`' input
columns multiplied by s: the float model computes the same function, but the activations
the `nexts` see have flatter per-channel ranges, which static per-tensor scales need.

Llama-style mappings (module paths inside one decoder layer), by name:
- `qkv`: input_layernorm -> q/k/v_proj
- `gate_up`: post_attention_layernorm -> gate/up_proj
- `down`: up_proj -> down_proj (the product act(gate)*up is linear in up's output); this is
  the one that reaches the massive down_proj inputs of SmolLM2
- `vo`: v_proj -> o_proj, with grouped-query attention handled: one scale per KV channel,
  shared by the query heads that read it.
A mapping whose modules a layer lacks is skipped with a log line.

`SmoothQuant(alpha)` is a `pipeline.quantize_model` layer transform (statistics from the
layer's own calibration inputs); `smooth_model` smooths a float model in one pass. Both keep
the original parameters so `restore()` undoes the change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from quantscale.errors import QuantscaleError

log = logging.getLogger(__name__)

EPS = 1e-5


@dataclass(frozen=True)
class SmoothMapping:
    """`prev` (norm or Linear) feeding the Linears `nexts`, paths relative to the layer."""

    name: str
    prev: str
    nexts: tuple[str, ...]


LLAMA_MAPPINGS: tuple[SmoothMapping, ...] = (
    SmoothMapping(
        "qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    ),
    SmoothMapping("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    SmoothMapping("down", "mlp.up_proj", ("mlp.down_proj",)),
    SmoothMapping("vo", "self_attn.v_proj", ("self_attn.o_proj",)),
)
MAPPING_NAMES = tuple(m.name for m in LLAMA_MAPPINGS)

Alphas = Mapping[str, float]


def parse_alphas(spec: str | float | Mapping[str, float]) -> dict[str, float]:
    """'0.5' -> every mapping at 0.5; 'down=0.8+qkv=0.5' -> only those mappings."""
    if isinstance(spec, Mapping):
        items = dict(spec)
    elif isinstance(spec, (int, float)) or "=" not in str(spec):
        try:
            return dict.fromkeys(MAPPING_NAMES, _alpha(float(spec)))
        except ValueError as err:
            raise QuantscaleError(f"smoothing alpha: expected a number, got {spec!r}") from err
    else:
        items = {}
        for part in str(spec).split("+"):
            name, _, value = part.partition("=")
            try:
                items[name.strip()] = float(value)
            except ValueError as err:
                raise QuantscaleError(f"smoothing spec {spec!r}: bad part {part!r}") from err
    unknown = set(items) - set(MAPPING_NAMES)
    if unknown:
        raise QuantscaleError(
            f"smoothing spec {spec!r}: unknown mapping(s) {sorted(unknown)}; "
            f"known: {', '.join(MAPPING_NAMES)}"
        )
    return {k: _alpha(v) for k, v in items.items()}


def _alpha(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise QuantscaleError(f"smoothing alpha must be in [0, 1], got {value}")
    return value


def format_alphas(alphas: Alphas) -> str:
    """Inverse of `parse_alphas` (a single number when every mapping shares it)."""
    values = set(alphas.values())
    if set(alphas) == set(MAPPING_NAMES) and len(values) == 1:
        return f"{values.pop():g}"
    return "+".join(f"{k}={v:g}" for k, v in alphas.items())


# ------------------------------------------------------------------ statistics


def _find(layer: nn.Module, path: str) -> nn.Module | None:
    try:
        return layer.get_submodule(path)
    except AttributeError:
        return None


def layer_mappings(
    layer: nn.Module, names: Sequence[str] = MAPPING_NAMES, where: str = "layer"
) -> list[SmoothMapping]:
    """The mappings among `names` whose modules this layer has (others logged and skipped)."""
    found = []
    for m in LLAMA_MAPPINGS:
        if m.name not in names:
            continue
        missing = [p for p in (m.prev, *m.nexts) if _find(layer, p) is None]
        if missing:
            log.info("smoothing: %s has no %s; mapping %r skipped", where, missing, m.name)
            continue
        found.append(m)
    return found


class ChannelAbsMax:
    """Forward pre-hooks keeping the running per-channel max|x| of each mapping's input."""

    def __init__(self, layer: nn.Module, mappings: Sequence[SmoothMapping]) -> None:
        self.absmax: dict[str, torch.Tensor] = {}
        self._handles = [
            _find(layer, m.nexts[0]).register_forward_pre_hook(self._hook(m.name)) for m in mappings
        ]

    def _hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            cur = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            old = self.absmax.get(name)
            self.absmax[name] = cur if old is None else torch.maximum(old, cur)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def collect_absmax(
    layer: nn.Module, mappings: Sequence[SmoothMapping], run: Callable[[], object]
) -> dict[str, torch.Tensor]:
    """Per-channel max|x| at the input of each mapping's `nexts` while `run()` executes."""
    stats = ChannelAbsMax(layer, mappings)
    try:
        run()
    finally:
        stats.remove()
    return stats.absmax


# ------------------------------------------------------------------ scales


def smooth_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1-alpha) per channel; 1 where the channel is dead."""
    x = x_absmax.float().clamp(min=EPS)
    w = w_absmax.float().clamp(min=EPS)
    s = (x.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=EPS)
    dead = (x_absmax <= 0) | (w_absmax <= 0) | ~torch.isfinite(s)
    return torch.where(dead, torch.ones_like(s), s)


def _weight_absmax(nexts: Sequence[nn.Module]) -> torch.Tensor:
    return torch.stack([n.weight.detach().abs().amax(dim=0).float() for n in nexts]).amax(dim=0)


def _gqa_groups(layer: nn.Module, v_out: int, o_in: int) -> tuple[int, int] | None:
    """(kv channels, query heads per kv head) for v_proj -> o_proj, or None if unclear."""
    if o_in == v_out:
        return v_out, 1
    attn = _find(layer, "self_attn")
    head_dim = getattr(attn, "head_dim", None)
    if not head_dim or o_in % v_out or v_out % head_dim:
        return None
    return v_out, o_in // v_out


# ------------------------------------------------------------------ apply


class Smoothing:
    """Applies smoothing to layers and remembers the original parameters for `restore()`."""

    def __init__(self, alpha: str | float | Alphas = 0.5) -> None:
        self.alphas = parse_alphas(alpha)
        self.scales: dict[str, torch.Tensor] = {}
        self._originals: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}

    def _keep(self, param: nn.Parameter | None) -> None:
        if param is not None and id(param) not in self._originals:
            self._originals[id(param)] = (param, param.detach().clone())

    def _divide_prev(self, prev: nn.Module, s: torch.Tensor) -> None:
        """prev's output channels / s (a norm's weight or a Linear's rows and bias)."""
        self._keep(prev.weight)
        self._keep(getattr(prev, "bias", None))
        w = prev.weight.data
        w.div_((s[:, None] if w.ndim == 2 else s).to(w.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.data.div_(s.to(prev.bias.dtype))

    def _multiply_nexts(self, nexts: Sequence[nn.Module], s: torch.Tensor) -> None:
        for n in nexts:
            self._keep(n.weight)
            n.weight.data.mul_(s[None, :].to(n.weight.dtype))

    def smooth_layer(
        self, layer: nn.Module, absmax: Mapping[str, torch.Tensor], where: str = "layer"
    ) -> None:
        """Smooth one decoder layer given the per-channel input max|x| of each mapping."""
        for m in layer_mappings(layer, list(self.alphas), where):
            if m.name not in absmax:
                continue
            prev, nexts = _find(layer, m.prev), [_find(layer, p) for p in m.nexts]
            x, w = absmax[m.name].to(nexts[0].weight.device), _weight_absmax(nexts)
            if m.name == "vo":
                s_prev, s_next = self._vo_scales(layer, prev, x, w, where)
                if s_prev is None:
                    continue
            else:
                s_prev = s_next = smooth_scales(x, w, self.alphas[m.name])
            self._divide_prev(prev, s_prev)
            self._multiply_nexts(nexts, s_next)
            self.scales[f"{where}.{m.name}"] = s_prev

    def _vo_scales(self, layer, v_proj, x, w, where) -> tuple:
        groups = _gqa_groups(layer, v_proj.out_features, x.numel())
        if groups is None:
            log.info("smoothing: %s v_proj/o_proj head layout unclear; 'vo' skipped", where)
            return None, None
        kv, rep = groups
        head_dim = getattr(_find(layer, "self_attn"), "head_dim", None) or kv
        # o_proj input channel (kv head g, repeat r, dim d) reads v channel (g, d).
        grouped = (t.reshape(kv // head_dim, rep, head_dim).amax(dim=1) for t in (x, w))
        s_v = smooth_scales(*grouped, self.alphas["vo"]).reshape(-1)
        s_o = s_v.reshape(kv // head_dim, 1, head_dim).expand(-1, rep, -1).reshape(-1)
        return s_v, s_o

    def restore(self) -> None:
        """Put every changed parameter back to its value before smoothing."""
        with torch.no_grad():
            for param, original in self._originals.values():
                param.data.copy_(original)
        self._originals.clear()
        self.scales.clear()


class SmoothQuant(Smoothing):
    """`quantize_model(..., transforms=[SmoothQuant(0.5)])`: smooth each layer on its own
    calibration inputs (one extra forward of the layer) before it is calibrated."""

    def __call__(self, step) -> None:
        mappings = layer_mappings(step.layer, list(self.alphas), step.name)
        if mappings:
            absmax = collect_absmax(step.layer, mappings, step.run)
            self.smooth_layer(step.layer, absmax, step.name)


@torch.inference_mode()
def model_absmax(
    model: nn.Module, batches: Sequence[torch.Tensor], names: Sequence[str] = MAPPING_NAMES
) -> dict[str, dict[str, torch.Tensor]]:
    """{layer name: per-mapping input max|x|} of the float model, one pass over `batches`."""
    from quantscale.models.adapter import decoder_layers
    from quantscale.pipeline import run_batches

    prefix, layers = decoder_layers(model)
    hooks = {
        f"{prefix}.{i}": ChannelAbsMax(layer, layer_mappings(layer, names, f"{prefix}.{i}"))
        for i, layer in enumerate(layers)
    }
    try:
        run_batches(model, batches)
    finally:
        for h in hooks.values():
            h.remove()
    return {name: h.absmax for name, h in hooks.items()}


def smooth_model(
    model: nn.Module,
    alpha: str | float | Alphas,
    batches: Sequence[torch.Tensor] | None = None,
    absmax: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Smoothing:
    """Smooth every decoder layer of a float model from one pass's statistics (or `absmax`
    from `model_absmax`, reusable across alphas); returns the `Smoothing` to `restore()`."""
    from quantscale.models.adapter import decoder_layers

    smoothing = Smoothing(alpha)
    if absmax is None:
        if not batches:
            raise QuantscaleError("smooth_model needs calibration batches or statistics")
        absmax = model_absmax(model, batches, list(smoothing.alphas))
    prefix, layers = decoder_layers(model)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            name = f"{prefix}.{i}"
            smoothing.smooth_layer(layer, absmax.get(name, {}), name)
    return smoothing
