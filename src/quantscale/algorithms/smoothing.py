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
A mapping whose modules a layer lacks is skipped with a log line. Gemma 2/3 layers feed the
MLP from `pre_feedforward_layernorm` (their `post_attention_layernorm` normalizes the attention
output before the residual add): `gate_up` folds into it there. Norms computing
x * (1 + weight) (Gemma's RMSNorm, found by a probe: `norm_offset`) get
weight' = (1 + weight) / s - 1.

An alpha may be `search` (`SmoothQuant("search")`, `qkv=search+down=0.9`): per layer and
mapping, on a random subsample of the layer's own calibration tokens (`max_tokens`), every
alpha of `grid` is tried and the one whose smoothed, fake-quantized `nexts` (weights and input
activations per the modules' scheme, else W8A8: per-channel int8 RTN weights, static
per-tensor int8 min-max activations) give the smallest mean squared output error against
the float output is kept (`SmoothQuant.chosen`, one log line per layer).

`SmoothQuant(alpha)` is a `quantize.quantize_model` layer transform (statistics from the
layer's own calibration inputs); `smooth_model` smooths a float model in one pass (layer by
layer when an alpha is searched). Both keep the original parameters so `restore()` undoes
the change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from quantscale.algorithms.rtn import rtn_weight
from quantscale.calibration.sequential import run_batches
from quantscale.errors import QuantscaleError
from quantscale.qdq import (
    ACTIVATION,
    compute_qparams,
    fake_quantize,
    fake_quantize_dynamic,
    reduce_minmax,
)
from quantscale.runtime.hadamard import has_online_hadamard
from quantscale.scheme import QuantArgs, QuantScheme, preset_scheme

log = logging.getLogger(__name__)

EPS = 1e-5
SEARCH = "search"
SEARCH_GRID: tuple[float, ...] = tuple(round(0.3 + 0.05 * i, 2) for i in range(14))  # .3-.95
SEARCH_TOKENS = 8192
OBJECTIVES = ("mse", "relative")  # see `smoothed_error`
SEARCH_SCHEME = "W8A8"  # quantization the search simulates when the modules carry no scheme


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
# prev paths that a layer's own MLP-input norm replaces where it has one (Gemma 2/3)
MLP_INPUT_NORMS = {"post_attention_layernorm": "pre_feedforward_layernorm"}

Alpha = float | str  # a number in [0, 1] or SEARCH
Alphas = Mapping[str, Alpha]


def parse_alphas(spec: str | float | Mapping[str, Alpha]) -> dict[str, Alpha]:
    """'0.5' -> every mapping at 0.5; 'down=0.8+qkv=search' -> only those mappings; an
    alpha is a number in [0, 1] or 'search'."""
    if isinstance(spec, Mapping):
        items = dict(spec)
    elif isinstance(spec, (int, float)) or "=" not in str(spec):
        return dict.fromkeys(MAPPING_NAMES, _alpha(spec, spec))
    else:
        items = {}
        for part in str(spec).split("+"):
            name, sep, value = part.partition("=")
            if not sep:
                raise QuantscaleError(f"smoothing spec {spec!r}: bad part {part!r}")
            items[name.strip()] = value
    unknown = set(items) - set(MAPPING_NAMES)
    if unknown:
        raise QuantscaleError(
            f"smoothing spec {spec!r}: unknown mapping(s) {sorted(unknown)}; "
            f"known: {', '.join(MAPPING_NAMES)}"
        )
    return {k: _alpha(v, spec) for k, v in items.items()}


def _alpha(value: object, spec: object) -> Alpha:
    if str(value).strip().lower() == SEARCH:
        return SEARCH
    expected = f"smoothing spec {spec!r}: expected a number in [0, 1] or {SEARCH!r}, got {value!r}"
    if not isinstance(value, (int, float, str)):
        raise QuantscaleError(expected)
    try:
        number = float(value)
    except ValueError as err:
        raise QuantscaleError(expected) from err
    if not 0.0 <= number <= 1.0:
        raise QuantscaleError(f"smoothing spec {spec!r}: alpha must be in [0, 1], got {number}")
    return number


def format_alphas(alphas: Alphas) -> str:
    """Inverse of `parse_alphas` (a single number when every mapping shares it)."""
    values = set(alphas.values())
    if set(alphas) == set(MAPPING_NAMES) and len(values) == 1 and SEARCH not in values:
        return f"{values.pop():g}"
    return "+".join(f"{k}={v if v == SEARCH else format(v, 'g')}" for k, v in alphas.items())


# ------------------------------------------------------------------ statistics


def _find(layer: nn.Module, path: str) -> nn.Module | None:
    try:
        return layer.get_submodule(path)
    except AttributeError:
        return None


def _module(layer: nn.Module, path: str) -> nn.Module:
    """The submodule at `path` (one `layer_mappings` found)."""
    return layer.get_submodule(path)


def _weight(module: nn.Module) -> torch.Tensor:
    """A norm's or Linear's weight."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor), f"{type(module).__name__} has no weight tensor"
    return weight


@torch.no_grad()
def norm_offset(norm: nn.Module) -> float:
    """1 for a norm computing x_hat * (1 + weight) (Gemma's RMSNorm), else 0 (x_hat * weight
    [+ bias]): probed on a row of alternating +-1, which RMSNorm and LayerNorm leave as is."""
    weight = _weight(norm)
    x = torch.ones(1, weight.numel(), dtype=weight.dtype, device=weight.device)
    x[:, 1::2] = -1
    scale = (norm(x)[0].float() * x[0].float()).cpu()
    one_plus = torch.allclose(scale, weight.detach().float().cpu() + 1, rtol=1e-2, atol=1e-2)
    return 1.0 if one_plus else 0.0


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def layer_mappings(
    layer: nn.Module, names: Sequence[str] = MAPPING_NAMES, where: str = "layer"
) -> list[SmoothMapping]:
    """The mappings among `names` whose modules this layer has (others logged and skipped)."""
    found = []
    for m in LLAMA_MAPPINGS:
        if m.name not in names:
            continue
        own = MLP_INPUT_NORMS.get(m.prev)
        if own is not None and _find(layer, own) is not None:
            m = replace(m, prev=own)
        missing = [p for p in (m.prev, *m.nexts) if _find(layer, p) is None]
        if missing:
            log.info("smoothing: %s has no %s; mapping %r skipped", where, missing, m.name)
            continue
        if any(has_online_hadamard(_module(layer, p)) for p in m.nexts):
            raise QuantscaleError(
                f"smoothing {where}: mapping {m.name!r} scales the input of {m.nexts}, which "
                "is rotated online (--rotate); smooth the other mappings only"
            )
        found.append(m)
    return found


class ChannelAbsMax:
    """Forward pre-hooks keeping the running per-channel max|x| of each mapping's input."""

    def __init__(self, layer: nn.Module, mappings: Sequence[SmoothMapping]) -> None:
        self.absmax: dict[str, torch.Tensor] = {}
        self._handles = [
            _module(layer, m.nexts[0]).register_forward_pre_hook(self._hook(m.name))
            for m in mappings
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


class InputSamples(ChannelAbsMax):
    """`ChannelAbsMax` that also keeps each mapping's per-channel min / max and mean |x| of
    its input and up to `per_call` random tokens of every call (float32), for the alpha
    search."""

    def __init__(
        self, layer: nn.Module, mappings: Sequence[SmoothMapping], per_call: int, seed: int = 0
    ) -> None:
        self.per_call = per_call
        self.min: dict[str, torch.Tensor] = {}
        self.max: dict[str, torch.Tensor] = {}
        self._abs_sum: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}
        self.samples: dict[str, list[torch.Tensor]] = {m.name: [] for m in mappings}
        self._gen = torch.Generator().manual_seed(seed)
        super().__init__(layer, mappings)

    def _hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            lo, hi = (t.float() for t in torch.aminmax(x, dim=0))
            if name in self.min:
                lo, hi = torch.minimum(self.min[name], lo), torch.maximum(self.max[name], hi)
            self.min[name], self.max[name] = lo, hi
            self.absmax[name] = torch.maximum(-lo, hi)
            abs_sum = x.abs().float().sum(dim=0)
            if name in self._abs_sum:
                abs_sum = abs_sum + self._abs_sum[name]
            self._abs_sum[name] = abs_sum
            self._count[name] = self._count.get(name, 0) + x.shape[0]
            if x.shape[0] > self.per_call:
                x = x[torch.randperm(x.shape[0], generator=self._gen)[: self.per_call]]
            self.samples[name].append(x.float().clone())

        return hook

    def tokens(self, name: str) -> torch.Tensor:
        """The sampled input tokens of mapping `name`, [T, channels]."""
        return torch.cat(self.samples[name])

    def mean_abs(self) -> dict[str, torch.Tensor]:
        """Per mapping, the per-channel mean |x| over every input token seen."""
        return {n: s / max(1, self._count[n]) for n, s in self._abs_sum.items()}


# ------------------------------------------------------------------ scales


def smooth_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1-alpha) per channel; 1 where the channel is dead."""
    x = x_absmax.float().clamp(min=EPS)
    w = w_absmax.float().clamp(min=EPS)
    s = (x.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=EPS)
    dead = (x_absmax <= 0) | (w_absmax <= 0) | ~torch.isfinite(s)
    return torch.where(dead, torch.ones_like(s), s)


def _weight_absmax(nexts: Sequence[nn.Module]) -> torch.Tensor:
    return torch.stack([_weight(n).detach().abs().amax(dim=0).float() for n in nexts]).amax(dim=0)


def _gqa_groups(layer: nn.Module, v_out: int, o_in: int) -> tuple[int, int] | None:
    """(kv channels, query heads per kv head) for v_proj -> o_proj, or None if unclear."""
    if o_in == v_out:
        return v_out, 1
    attn = _find(layer, "self_attn")
    head_dim = getattr(attn, "head_dim", None)
    if not head_dim or o_in % v_out or v_out % head_dim:
        return None
    return v_out, o_in // v_out


# ------------------------------------------------------------------ search


def search_scheme(nexts: Sequence[nn.Module]) -> QuantScheme:
    """The scheme the search simulates: the `nexts`' own (QuantLinear), else W8A8's."""
    scheme = getattr(nexts[0], "scheme", None)
    return scheme if isinstance(scheme, QuantScheme) else preset_scheme(SEARCH_SCHEME)


def _act_qdq(x: torch.Tensor, args: QuantArgs | None, lo: torch.Tensor, hi: torch.Tensor):
    """Fake-quantized activation; static scales from the per-channel range (lo, hi)."""
    if args is None:
        return x
    if args.dynamic:
        return fake_quantize_dynamic(x, args)
    if args.strategy == "tensor":
        lo, hi = lo.min().reshape(1), hi.max().reshape(1)
    elif args.strategy != "channel":
        lo, hi = reduce_minmax(x, args, ACTIVATION)
    return fake_quantize(x, args, compute_qparams(args, lo, hi))


def smoothed_error(
    x: torch.Tensor,
    w: torch.Tensor,
    s: torch.Tensor,
    scheme: QuantScheme,
    x_range: tuple[torch.Tensor, torch.Tensor],
    y_ref: torch.Tensor | None = None,
    relative: bool = False,
) -> float:
    """Mean squared error of qdq(x / s) @ qdq(w * s).T against the float x @ w.T, for input
    tokens x [T, C], the `nexts`' stacked weight w [O, C], column scales s [C] and the
    per-channel input range x_range (min, max) over all calibration tokens. `relative`:
    each token's squared error over its squared float output norm, averaged over tokens
    (rare huge-activation tokens then weigh no more than the others)."""
    with torch.no_grad():
        y_ref = x @ w.T if y_ref is None else y_ref
        xq = _act_qdq(x / s, scheme.input_activations, x_range[0] / s, x_range[1] / s)
        ws = w * s
        wq = ws if scheme.weights is None else rtn_weight(ws, scheme.weights)[0]
        err = (xq @ wq.T - y_ref).pow(2)
        if not relative:
            return float(err.mean())
        return float((err.sum(dim=1) / y_ref.pow(2).sum(dim=1).clamp(min=EPS)).mean())


# ------------------------------------------------------------------ apply


class Smoothing:
    """Applies smoothing to layers and remembers the original parameters for `restore()`."""

    def __init__(self, alpha: str | float | Alphas = 0.5) -> None:
        self.alphas = parse_alphas(alpha)
        self.scales: dict[str, torch.Tensor] = {}
        self._originals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _keep(self, param: torch.Tensor | None) -> None:
        if param is not None and id(param) not in self._originals:
            self._originals[id(param)] = (param, param.detach().clone())

    def _divide_prev(self, prev: nn.Module, s: torch.Tensor) -> None:
        """prev's output channels / s (a norm's weight or a Linear's rows and bias)."""
        weight, bias = _weight(prev), _bias(prev)
        self._keep(weight)
        self._keep(bias)
        w = weight.data
        if w.ndim == 1:  # a norm: (offset + w) / s - offset
            offset = norm_offset(prev)
            w.copy_(((w.float() + offset) / s.to(w.device) - offset).to(w.dtype))
        else:
            w.div_(s[:, None].to(w.dtype))
        if bias is not None:
            bias.data.div_(s.to(bias.dtype))

    def _multiply_nexts(self, nexts: Sequence[nn.Module], s: torch.Tensor) -> None:
        for n in nexts:
            weight = _weight(n)
            self._keep(weight)
            weight.data.mul_(s[None, :].to(weight.dtype))

    def channel_scales(self, x: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
        """Per-channel scales from the input statistic x and the weights' max|W| w at
        `alpha` (SmoothQuant's `smooth_scales`; AWQ overrides it)."""
        return smooth_scales(x, w, alpha)

    def mapping_scales(
        self, layer: nn.Module, m: SmoothMapping, x_absmax: torch.Tensor, alpha: float, where: str
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(scales dividing prev's outputs, scales multiplying the nexts' input columns) of
        one mapping at `alpha`; None when 'vo' cannot be smoothed (head layout unclear)."""
        nexts = [_module(layer, p) for p in m.nexts]
        x, w = x_absmax.to(_weight(nexts[0]).device), _weight_absmax(nexts)
        if m.name == "vo":
            return self._vo_scales(layer, _module(layer, m.prev), x, w, alpha, where)
        s = self.channel_scales(x, w, alpha)
        return s, s

    def smooth_layer(
        self,
        layer: nn.Module,
        absmax: Mapping[str, torch.Tensor],
        where: str = "layer",
        alphas: Alphas | None = None,
    ) -> None:
        """Smooth one decoder layer given the per-channel input max|x| of each mapping, at
        `alphas` (default: this object's; searched ones must be resolved by the caller)."""
        alphas = self.alphas if alphas is None else alphas
        for m in layer_mappings(layer, list(alphas), where):
            if m.name not in absmax:
                continue
            alpha = alphas[m.name]
            if isinstance(alpha, str):  # SEARCH
                raise QuantscaleError(
                    f"smoothing {where}.{m.name}: alpha 'search' needs the layer's calibration "
                    "inputs (SmoothQuant as a quantize_model transform, or smooth_model with "
                    "batches)"
                )
            scales = self.mapping_scales(layer, m, absmax[m.name], alpha, where)
            if scales is None:
                continue
            self._divide_prev(_module(layer, m.prev), scales[0])
            self._multiply_nexts([_module(layer, p) for p in m.nexts], scales[1])
            self.scales[f"{where}.{m.name}"] = scales[0]

    def _vo_scales(
        self,
        layer: nn.Module,
        v_proj: nn.Module,
        x: torch.Tensor,
        w: torch.Tensor,
        alpha: float,
        where: str,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        groups = _gqa_groups(layer, _weight(v_proj).shape[0], x.numel())
        if groups is None:
            log.info("smoothing: %s v_proj/o_proj head layout unclear; 'vo' skipped", where)
            return None
        kv, rep = groups
        head_dim = getattr(_find(layer, "self_attn"), "head_dim", None) or kv
        # o_proj input channel (kv head g, repeat r, dim d) reads v channel (g, d).
        x_g, w_g = (t.reshape(kv // head_dim, rep, head_dim).amax(dim=1) for t in (x, w))
        s_v = self.channel_scales(x_g, w_g, alpha).reshape(-1)
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
    calibration inputs (one extra forward of the layer) before it is calibrated. Searched
    alphas (`SmoothQuant("search")`) are chosen per layer and mapping from `grid` on up to
    `max_tokens` sampled tokens by `objective` (`smoothed_error`: "mse", or "relative" per
    token); `chosen[layer][mapping]` holds the alphas applied and
    `errors[f"{layer}.{mapping}"]` the quantized output error of every grid alpha."""

    def __init__(
        self,
        alpha: str | float | Alphas = 0.5,
        grid: Sequence[float] = SEARCH_GRID,
        max_tokens: int = SEARCH_TOKENS,
        objective: str = "mse",
    ) -> None:
        super().__init__(alpha)
        if objective not in OBJECTIVES:
            raise QuantscaleError(
                f"smoothing search objective {objective!r}; known: {', '.join(OBJECTIVES)}"
            )
        self.objective = objective
        self.grid = tuple(float(_alpha(a, grid)) for a in grid)
        if not self.grid or max_tokens < 1:
            raise QuantscaleError("smoothing search needs a non-empty grid and max_tokens >= 1")
        self.max_tokens = max_tokens
        self.chosen: dict[str, dict[str, float]] = {}
        self.errors: dict[str, dict[float, float]] = {}

    def __call__(self, step) -> None:
        mappings = layer_mappings(step.layer, list(self.alphas), step.name)
        if not mappings:
            return
        if SEARCH not in (self.alphas[m.name] for m in mappings):
            absmax = collect_absmax(step.layer, mappings, step.run)
            self.smooth_layer(step.layer, absmax, step.name)
            return
        per_call = -(-self.max_tokens // max(1, len(step.inputs)))
        stats = InputSamples(step.layer, mappings, per_call)
        try:
            step.run()
        finally:
            stats.remove()
        alphas = self.search_layer(step.layer, mappings, stats, step.name)
        self.smooth_layer(step.layer, self.statistic(stats), step.name, alphas)

    def statistic(self, stats: InputSamples) -> dict[str, torch.Tensor]:
        """The per-channel input statistic the scales are computed from (max|x|)."""
        return stats.absmax

    def search_layer(
        self,
        layer: nn.Module,
        mappings: Sequence[SmoothMapping],
        stats: InputSamples,
        where: str,
    ) -> dict[str, float]:
        """Each mapping's alpha (searched ones: the grid alpha of least quantized error)."""
        alphas: dict[str, float] = {}
        for m in mappings:
            alpha = self.alphas[m.name]
            if isinstance(alpha, str):  # SEARCH
                if not stats.samples.get(m.name):
                    continue
                errors = self.grid_errors(layer, m, stats, where)
                if not errors:
                    continue
                self.errors[f"{where}.{m.name}"] = errors
                alpha = min(errors, key=errors.__getitem__)
            alphas[m.name] = alpha
        self.chosen[where] = alphas
        log.info("smoothing search: %s %s", where, format_alphas(alphas) if alphas else "-")
        return alphas

    def grid_errors(
        self, layer: nn.Module, m: SmoothMapping, stats: InputSamples, where: str
    ) -> dict[float, float]:
        """{alpha: quantized output error of the mapping's nexts} over the grid."""
        nexts = [_module(layer, p) for p in m.nexts]
        x = stats.tokens(m.name)
        w = torch.cat([_weight(n).detach().float() for n in nexts])
        y_ref, scheme = x @ w.T, search_scheme(nexts)
        x_range = (stats.min[m.name], stats.max[m.name])
        errors, statistic = {}, self.statistic(stats)[m.name]
        for alpha in self.grid:
            scales = self.mapping_scales(layer, m, statistic, alpha, where)
            if scales is None:
                return {}
            errors[alpha] = smoothed_error(
                x, w, scales[1], scheme, x_range, y_ref, self.objective == "relative"
            )
        return errors


@torch.inference_mode()
def model_absmax(
    model: nn.Module, batches: Sequence[torch.Tensor], names: Sequence[str] = MAPPING_NAMES
) -> dict[str, dict[str, torch.Tensor]]:
    """{layer name: per-mapping input max|x|} of the float model, one pass over `batches`."""
    from quantscale.models.adapter import decoder_layers

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
    from `model_absmax`, reusable across alphas); returns the `Smoothing` to `restore()`.
    Searched alphas need `batches` (layer by layer, each layer on its own inputs)."""
    from quantscale.models.adapter import decoder_layers

    if SEARCH in parse_alphas(alpha).values():
        return _search_model(model, alpha, batches)
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


def _search_model(
    model: nn.Module, alpha: str | float | Alphas, batches: Sequence[torch.Tensor] | None
) -> SmoothQuant:
    """smooth_model with searched alphas: `SmoothQuant` on every layer, layer by layer."""
    from quantscale.calibration.sequential import layerwise

    if not batches:
        raise QuantscaleError(
            f"smoothing {format_alphas(parse_alphas(alpha))!r}: 'search' needs calibration "
            "batches, not shared statistics (sweep: use --mode layerwise)"
        )
    smoothing = SmoothQuant(alpha)
    for step in layerwise(model, list(batches), description="smooth"):
        smoothing(step)
    return smoothing
