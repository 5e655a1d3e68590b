"""AWQ (activation-aware weight quantization): per-channel scales searched per mapping, then
a clipping search per Linear, before the weights are rounded (RTN or GPTQ).

Per mapping of `smoothing.LLAMA_MAPPINGS` (norm -> q/k/v, v -> o, norm -> gate/up, up ->
down), on the layer's own calibration inputs (each layer fed by the quantized layers before
it): the per-channel mean |x| of the input of the `nexts` gives scales s = mean|x|^alpha,
normalized to a geometric mean of 1 (`awq_scales`); every alpha of `grid` is tried and the
one whose scaled, fake-quantized `nexts` (their own scheme; `AWQScales.grid_errors`) give
the least output MSE against the float outputs is kept (on up to `max_tokens` sampled
tokens; the per-channel means over all). 1/s is folded into the previous op
(a norm's weight, or a Linear's rows) and s into the `nexts`' input columns: the float model
is unchanged. Then each Linear but q/k (as AutoAWQ: attention scores are clipping-sensitive)
gets a clipping search: per output row and weight group, the shrink ratio of the group's
range in `clip_grid` of least output error on up to `clip_tokens` sampled inputs; its float
weights are clamped there, so that the rounding that follows puts its scale on that range.

`AWQ(rounding="rtn" | "gptq" | "autoround")` is the weight algorithm (`quantize --method
awq`, `awq+gptq` and `awq+autoround`): its `prepare_layer` (called by
`algorithms.layer.quantize_layer`, so the in-memory and streamed paths both run it) scales
and clips, then the rounding algorithm sets the weights (AutoRound learns them in its own
`prepare_layer`, which AWQ's calls after scaling). With GPTQ the clipping search is off by
default (`clip`): GPTQ rounds against the float weights with its own error feedback, and
clamped float weights move its target; AutoRound learns its own clip ranges.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantscale.algorithms.base import get_algorithm, register_algorithm
from quantscale.algorithms.layer import calibration_passes
from quantscale.algorithms.rtn import rtn_weight
from quantscale.algorithms.smoothing import (
    MAPPING_NAMES,
    SEARCH,
    InputSamples,
    SmoothMapping,
    SmoothQuant,
    _module,
    _weight,
    layer_mappings,
    search_scheme,
)
from quantscale.calibration.sequential import LayerStep
from quantscale.errors import QuantscaleError
from quantscale.runtime.qlinear import QuantLinear
from quantscale.scheme import QuantArgs

log = logging.getLogger(__name__)

AWQ_GRID: tuple[float, ...] = tuple(i / 20 for i in range(21))  # 0, 0.05, ..., 1
CLIP_GRID: tuple[float, ...] = tuple(1 - i / 20 for i in range(10))  # 1, 0.95, ..., 0.55
SEARCH_TOKENS = 4096
CLIP_TOKENS = 512
NO_CLIP = ("q_proj", "k_proj")
_ERROR_ELEMENTS = 1 << 24  # tokens x rows x groups held at once by the clipping search
EPS = 1e-4


def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha per channel, divided by sqrt(max(s) * min(s)) over the live
    channels; 1 where the channel is dead (mean 0)."""
    live = x_mean > 0
    if not live.any():
        return torch.ones_like(x_mean, dtype=torch.float32)
    s = x_mean.float().clamp(min=EPS).pow(alpha)
    s = s / (s[live].max() * s[live].min()).sqrt()
    return torch.where(live, s, torch.ones_like(s))


def clip_group_size(args: QuantArgs, in_features: int) -> int | None:
    """The column span one weight scale covers (group / channel strategies), else None."""
    if args.strategy in ("group", "tensor_group"):
        return args.group_size
    if args.strategy == "channel":
        return in_features
    return None


def _grouped(t: torch.Tensor, size: int) -> torch.Tensor:
    """[..., C] -> [..., G, size], zero-padded to whole groups."""
    pad = -t.shape[-1] % size
    t = F.pad(t, (0, pad)) if pad else t
    return t.reshape(*t.shape[:-1], -1, size)


GroupError = Callable[[torch.Tensor], torch.Tensor]
"""Weight error per (row, group): [O, G, size] rounded-minus-float weights -> [O, G]."""


def output_error(x: torch.Tensor) -> GroupError:
    """Squared output error on the input tokens `x` [T, C], per (row, group)."""

    def error(delta: torch.Tensor) -> torch.Tensor:
        xg = _grouped(x.float(), delta.shape[-1])
        rows = max(1, _ERROR_ELEMENTS // max(1, xg.shape[0] * xg.shape[1]))
        parts = [torch.einsum("tgk,ogk->tog", xg, d).pow(2).sum(dim=0) for d in delta.split(rows)]
        return torch.cat(parts)

    return error


def importance_error(importance: torch.Tensor) -> GroupError:
    """Squared weight error weighted by each input channel's `importance` [C] (mean x^2:
    the output error with the inputs' cross-channel terms dropped)."""
    return lambda delta: (delta.pow(2) * _grouped(importance.float(), delta.shape[-1])).sum(-1)


def clip_search(
    w: torch.Tensor, args: QuantArgs, error: GroupError, grid: Sequence[float] = CLIP_GRID
) -> torch.Tensor:
    """`w` [O, C] with each (row, group) clamped to the shrink ratio of `grid` (of the
    group's range) whose rounded weights (`rtn_weight`) give the least `error`."""
    size = clip_group_size(args, w.shape[1])
    if size is None:
        return w
    wg = _grouped(w.float(), size)
    lo, hi = wg.amin(dim=-1, keepdim=True), wg.amax(dim=-1, keepdim=True)
    best_err = torch.full(wg.shape[:2], float("inf"), device=w.device)
    best = torch.ones(wg.shape[:2], device=w.device)
    for ratio in grid:
        clipped = wg.clamp(lo * ratio, hi * ratio).flatten(1)[:, : w.shape[1]]
        err = error(_grouped(rtn_weight(clipped, args)[0] - w.float(), size))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    chosen = best[..., None]
    return wg.clamp(lo * chosen, hi * chosen).flatten(1)[:, : w.shape[1]].to(w.dtype)


class AWQScales(SmoothQuant):
    """The scale and clipping search of one layer (`prepare`); `chosen[layer][mapping]`
    holds the alphas applied, `errors` every grid alpha's output error (`SmoothQuant`)."""

    def __init__(
        self,
        mappings: Sequence[str] = MAPPING_NAMES,
        grid: Sequence[float] = AWQ_GRID,
        max_tokens: int = SEARCH_TOKENS,
        clip: bool = True,
        clip_grid: Sequence[float] = CLIP_GRID,
        clip_tokens: int = CLIP_TOKENS,
    ) -> None:
        super().__init__(dict.fromkeys(mappings, SEARCH), grid, max_tokens)
        if clip and (not clip_grid or clip_tokens < 1):
            raise QuantscaleError("AWQ clipping needs a non-empty clip_grid and clip_tokens >= 1")
        self.clip, self.clip_grid, self.clip_tokens = clip, tuple(clip_grid), clip_tokens

    def channel_scales(self, x: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
        return awq_scales(x, alpha)

    def statistic(self, stats: InputSamples) -> dict[str, torch.Tensor]:
        return stats.mean_abs()

    def grid_errors(
        self, layer: nn.Module, m: SmoothMapping, stats: InputSamples, where: str
    ) -> dict[float, float]:
        """{alpha: output MSE of the mapping's scaled, rounded nexts}. Weight-only schemes:
        from the inputs' second moments H = X^T X / T, as mean_o (D H D^T)_oo with D =
        Q(W s) / s - W (exact, and O x C^2 per alpha instead of T x O x C); schemes that
        quantize activations: on the tokens (`SmoothQuant.grid_errors`)."""
        nexts = [_module(layer, p) for p in m.nexts]
        scheme = search_scheme(nexts)
        if scheme.input_activations is not None or scheme.weights is None:
            return super().grid_errors(layer, m, stats, where)
        x = stats.tokens(m.name)
        h = x.T @ x / x.shape[0]
        w = torch.cat([_weight(n).detach().float() for n in nexts])
        statistic, errors = self.statistic(stats)[m.name], {}
        for alpha in self.grid:
            scales = self.mapping_scales(layer, m, statistic, alpha, where)
            if scales is None:
                return {}
            s = scales[1]
            d = rtn_weight(w * s, scheme.weights)[0] / s - w
            errors[alpha] = float((d @ h * d).sum() / d.shape[0])
        return errors

    def prepare(
        self, step: LayerStep, group: dict[str, QuantLinear], run: Callable[[], object]
    ) -> None:
        """Search, fold and clip the mappings of `step.layer` whose `nexts` are all in
        `group` with weight args, on the inputs `run()` pushes through the layer."""
        members = {id(ql) for ql in group.values() if ql.scheme.weights is not None}
        mappings = [
            m
            for m in layer_mappings(step.layer, list(self.alphas), step.name)
            if all(id(_module(step.layer, p)) in members for p in m.nexts)
        ]
        if not mappings:
            return
        per_call = -(-self.max_tokens // max(1, len(step.inputs)))
        stats = InputSamples(step.layer, mappings, per_call)
        try:
            with torch.inference_mode():
                run()
        finally:
            stats.remove()
        with torch.no_grad():
            alphas = self.search_layer(step.layer, mappings, stats, step.name)
            statistic = self.statistic(stats)
            self.smooth_layer(step.layer, statistic, step.name, alphas)
            self._originals.clear()  # AWQ is not undone: no copies of the layer kept
            if self.clip:
                for m in mappings:
                    if m.name in alphas:
                        self.clip_mapping(step.layer, m, stats, statistic[m.name], alphas[m.name])

    def clip_mapping(
        self,
        layer: nn.Module,
        m: SmoothMapping,
        stats: InputSamples,
        statistic: torch.Tensor,
        alpha: float,
    ) -> None:
        """Clamp the (scaled) weights of the mapping's nexts per `clip_search`, on the
        mapping's sampled inputs divided by the applied scales."""
        scales = self.mapping_scales(layer, m, statistic, alpha, "")
        if scales is None:
            return
        x = stats.tokens(m.name)
        x = x[:: max(1, x.shape[0] // self.clip_tokens)][: self.clip_tokens] / scales[1]
        for path in m.nexts:
            ql = _module(layer, path)
            args = getattr(getattr(ql, "scheme", None), "weights", None)
            if args is None or path.rsplit(".", 1)[-1] in NO_CLIP:
                continue
            w = ql.weight
            assert isinstance(w, torch.Tensor)
            w.data.copy_(clip_search(w.detach(), args, output_error(x), self.clip_grid))


class AWQ:
    """AWQ scales and clipping (`AWQScales`), then the `rounding` weight algorithm ('rtn',
    'gptq' or 'autoround', with `rounding_options`); `clip` None: on for RTN only (AutoRound
    learns its own clip ranges)."""

    needs_data = True

    def __init__(
        self,
        rounding: str = "rtn",
        clip: bool | None = None,
        grid: Sequence[float] = AWQ_GRID,
        max_tokens: int = SEARCH_TOKENS,
        mappings: Sequence[str] = MAPPING_NAMES,
        **rounding_options: Any,
    ) -> None:
        if rounding.lower().startswith("awq"):
            raise QuantscaleError(f"AWQ rounding {rounding!r}: expected rtn, gptq or autoround")
        self.rounding = get_algorithm(rounding, **rounding_options)
        self.true_sequential = self.rounding.true_sequential
        clip = rounding.lower() == "rtn" if clip is None else clip
        self.scales = AWQScales(mappings, grid, max_tokens, clip)

    def prepare_layer(
        self, step: LayerStep, group: dict[str, QuantLinear], run: Callable[[], object]
    ) -> None:
        """Scale and clip the layer before it is calibrated (`AWQScales.prepare`), then let
        the rounding algorithm see it (AutoRound learns its rounding there)."""
        self.scales.prepare(step, group, run)
        inner = getattr(self.rounding, "prepare_layer", None)
        if inner is not None:
            inner(step, group, run)

    def passes(self, linears: dict[str, QuantLinear]) -> list[dict[str, QuantLinear]]:
        return calibration_passes(self.rounding, linears)

    def start_layer(self, linears: dict[str, QuantLinear]) -> None:
        self.rounding.start_layer(linears)

    def finish_layer(self, linears: dict[str, QuantLinear]) -> None:
        self.rounding.finish_layer(linears)


register_algorithm("awq")(AWQ)


@register_algorithm("awq+gptq")
def awq_gptq(**options: Any) -> AWQ:
    """AWQ scales, then GPTQ rounding."""
    return AWQ(rounding="gptq", **options)


@register_algorithm("awq+autoround")
def awq_autoround(**options: Any) -> AWQ:
    """AWQ scales, then AutoRound's learned rounding."""
    return AWQ(rounding="autoround", **options)
