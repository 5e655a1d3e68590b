"""Quantized Mamba / Mamba2 mixers with static INT8 scales (Quamba1 and Quamba2).

`QMambaMixer` and `QMamba2Mixer` replace transformers' `MambaMixer` / `Mamba2Mixer` and
mirror their CPU slow paths, whole sequences and transformers' generation cache alike
(`use_cache=True`: the conv state keeps the last conv-kernel float inputs of conv1d, the SSM
state the float recurrent state; a decode step quantizes the same points with the same
static scales as a whole sequence). A mixer moves through modes:

- ``float``: float weights, no quantization (equal to transformers' mixer up to rounding;
  Mamba1's scan runs as a chunked parallel scan instead of a per-token loop);
- ``calibrate``: as float, and every quantized activation point feeds its observers;
- after `freeze()`: INT8 weights (`weight`, int8) with float32 `weight_scale` ([out, 1] per
  channel, [1, 1] per tensor; Quamba2's int4 projections: values in [-8, 7] held as int8,
  `weight_scale` [out, in / group] or [out, 1]), rounded to nearest or by GPTQ from the
  Hessian of the calibration inputs (`freeze(hessians=...)`), and float32 activation scales
  (`acts.<point>.scale`, one per tensor or one per channel group with `acts.<point>.group_id`
  mapping channels to groups). Then ``int8`` (the default) runs in_proj, x_proj, dt_proj and
  out_proj as real INT8 matmuls (`torch._int_mm`, int32 accumulation, one per run of equal
  input and weight scales) and conv1d on the INT8 values, and ``fake`` is the reference: every
  quantized tensor is quantized and dequantized with the same scales and float ops are used.
  The SSM consumes dequantized INT8 x, B, C, dt and z in both. Neither mode computes any
  statistic at run time.

Activation point names map to state-dict keys by replacing '.' with '_' (`ssm.x` ->
`acts.ssm_x.scale`).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import nn

from quantscale.algorithms.gptq import gptq_quantize
from quantscale.algorithms.rtn import rtn_weight
from quantscale.errors import QuantscaleError
from quantscale.formats.intq import dequantize_int, quantize_int
from quantscale.mamba.grouping import group_runs
from quantscale.mamba.mixers import (
    ACTIVATION_POINTS,
    MambaKind,
    PointSpec,
    WeightFormat,
)
from quantscale.observers import Observer, get_observer
from quantscale.qdq import (
    WEIGHT,
    QParams,
    compute_qparams,
    lsq_fake_quantize,
    quantize,
    reduce_minmax,
)
from quantscale.runtime.hadamard import apply_hadamard, hadamard
from quantscale.scheme import QuantArgs, Strategy

if TYPE_CHECKING:
    from transformers.models.mamba.modeling_mamba import MambaMixer
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

Mode = Literal["float", "calibrate", "fake", "int8"]
MODES = ("float", "calibrate", "fake", "int8")
_ACT_ARGS = QuantArgs(num_bits=8, strategy="tensor")
_CHANNEL_ARGS = QuantArgs(num_bits=8, strategy="channel")  # one range per channel (last dim)


def act_key(point: str) -> str:
    """ModuleDict key of an activation point (`ssm.x` -> `ssm_x`)."""
    return point.replace(".", "_")


def _scale_view(scale: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    """A per-channel scale [C] shaped to broadcast along `dim` of an ndim tensor."""
    if scale.numel() == 1:
        return scale.reshape(())
    shape = [1] * ndim
    shape[dim] = scale.numel()
    return scale.reshape(shape)


class ActQuant(nn.Module):
    """Static symmetric INT8 quantizer of one activation: per tensor, per channel group, or
    per channel (`set_per_channel`: one observer with the channel strategy)."""

    scale: torch.Tensor
    group_id: torch.Tensor | None

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.register_buffer("scale", torch.ones(1, dtype=torch.float32))
        self.register_buffer("group_id", None)
        self._observers: list[Observer] | None = None
        self._members: list[torch.Tensor] | None = None
        self.channel_amax: torch.Tensor | None = None
        self.channel_sample: list[torch.Tensor] | None = None
        self.per_channel = False
        self.scale_factor = 1.0  # applied to the calibrated scales (the x0.8 variant)
        self.chosen_alpha: list[float] | None = None  # what a percentile_mse observer chose

    def set_groups(self, group_id: torch.Tensor, n_groups: int) -> None:
        """Use one scale per group; `group_id` [channels] maps channels to groups."""
        if group_id.shape != (self.channels,):
            raise QuantscaleError(
                f"group_id has shape {tuple(group_id.shape)}; expected ({self.channels},)"
            )
        self.group_id = group_id.long().clone()
        self.scale = torch.ones(n_groups, dtype=torch.float32, device=self.scale.device)

    def set_per_channel(self) -> None:
        """Use one scale per channel."""
        self.set_groups(torch.arange(self.channels), self.channels)
        self.per_channel = True

    @property
    def n_groups(self) -> int:
        return self.scale.numel()

    def n_scales(self) -> int:
        """Scales in use (groups that some channel maps to)."""
        return 1 if self.group_id is None else int(torch.unique(self.group_id).numel())

    def track_channels(self, sample_rows: int = 0) -> None:
        """Start collecting the running max |x| per channel (for grouping) and the first
        `sample_rows` rows (tokens) seen."""
        self.channel_amax = torch.zeros(self.channels)
        self.channel_sample = [] if sample_rows else None
        self._sample_rows = sample_rows

    def start(self, spec: PointSpec) -> None:
        """Attach fresh observers (one per group) built from the point's spec."""
        kwargs = dict(spec.observer_kwargs)
        if self.per_channel:
            self._observers = [get_observer(spec.observer, args=_CHANNEL_ARGS, **kwargs)]
            return
        self._observers = [
            get_observer(spec.observer, args=_ACT_ARGS, **kwargs) for _ in range(self.n_groups)
        ]
        if self.group_id is not None:
            gid = self.group_id.cpu()
            self._members = [torch.nonzero(gid == g).flatten() for g in range(self.n_groups)]

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Feed one batch (channels last) to the channel tracker and the observers."""
        flat = x.detach().float().reshape(-1, self.channels).cpu()
        if self.channel_amax is not None:
            self.channel_amax = torch.maximum(self.channel_amax, flat.abs().amax(dim=0))
        if self.channel_sample is not None:
            have = sum(t.shape[0] for t in self.channel_sample)
            if have < self._sample_rows:
                self.channel_sample.append(flat[: self._sample_rows - have].clone())
        if self._observers is None:
            return
        if self._members is None:
            self._observers[0].update(flat)
            return
        for obs, members in zip(self._observers, self._members):
            if members.numel():
                obs.update(flat.index_select(1, members))

    def finish(self) -> None:
        """Turn the observers' ranges into the static scales; drop the observers."""
        if self._observers is None:
            raise QuantscaleError("activation quantizer finished without calibration data")
        scales = self.scale.clone()
        if self.per_channel:
            scales = _observer_scale(self._observers[0]).reshape(self.channels)
        for g, obs in enumerate([] if self.per_channel else self._observers):
            if obs.count == 0:  # an empty group: its scale is never used
                continue
            scales[g] = _observer_scale(obs)
        chosen = getattr(self._observers[0], "chosen_alpha", None)  # percentile_mse
        self.chosen_alpha = None if chosen is None else chosen.reshape(-1).tolist()
        self.scale = (scales * self.scale_factor).to(self.scale.device)
        self._observers = self._members = None

    def channel_scale(self) -> torch.Tensor:
        """Scale per channel [C], or the single scale [1]."""
        if self.group_id is None:
            return self.scale
        return self.scale[self.group_id]

    def quantize(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """INT8 values of x (channels along `dim`)."""
        return quantize_int(x, _scale_view(self.channel_scale(), x.ndim, dim % x.ndim))

    def dequantize(self, q: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return dequantize_int(q, _scale_view(self.channel_scale(), q.ndim, dim % q.ndim))

    def qdq(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Quantize then dequantize (float32); LSQ's differentiable round trip while the
        scale requires grad (`algorithms.lsq`)."""
        if self.scale.requires_grad and torch.is_grad_enabled():
            scale = _scale_view(self.channel_scale(), x.ndim, dim % x.ndim)
            return lsq_fake_quantize(x.float(), _ACT_ARGS, QParams(scale))
        return self.dequantize(self.quantize(x, dim), dim)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Take the saved number of groups (and group map) before loading the values."""
        scale = state_dict.get(prefix + "scale")
        if scale is not None and scale.shape != self.scale.shape:
            self.scale = torch.empty_like(scale, device=self.scale.device)
        gid = state_dict.get(prefix + "group_id")
        if gid is not None and self.group_id is None:
            self.group_id = torch.empty_like(gid, device=self.scale.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _observer_scale(obs: Observer) -> torch.Tensor:
    """The static INT8 scale of an observer that saw data (0-d, or [C] for a per-channel
    observer); raises if its range is missing or not finite (never a silent 1.0)."""
    mn, mx = obs.min_max()
    if not bool(torch.isfinite(mn).all() and torch.isfinite(mx).all()):
        raise QuantscaleError(
            f"{obs.name} observer saw {obs.count} batch(es) but gave no finite range "
            f"({mn.tolist()}, {mx.tolist()})"
        )
    scale = compute_qparams(obs.args, mn, mx).scale
    return scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1)


def weight_args(fmt: WeightFormat, in_features: int, projection: bool) -> QuantArgs:
    """The QuantArgs of one weight: int4 for a projection when `fmt.bits` is 4 (groups of
    `fmt.group_size` input columns where they tile `in_features`, else per output channel),
    otherwise INT8 with `fmt.strategy`."""
    if not (projection and fmt.bits == 4):
        return QuantArgs(num_bits=8, strategy=fmt.strategy)
    g = fmt.group_size
    if g is not None and g <= in_features and in_features % g == 0:
        return QuantArgs(num_bits=4, strategy="group", group_size=g)
    return QuantArgs(num_bits=4, strategy="channel")


def quantize_weight(
    w: torch.Tensor, args: QuantArgs | Strategy, hessian: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric weight [out, ...] -> (int8-typed codes, float32 scale [out, groups] or
    [1, 1]). INT8: min-max (amax / 127); int4: min-max on the full code range (amax / 7.5,
    `rtn.rtn_weight`), or GPTQ with `hessian` [in, in] (as the LLM path quantizes)."""
    args = QuantArgs(num_bits=8, strategy=args) if isinstance(args, str) else args
    rows = w.detach().float().reshape(w.shape[0], -1)
    if hessian is not None:
        result = gptq_quantize(rows, hessian, args)
        w_hat, qp = result.weight, result.qparams
    elif args.num_bits == 8:
        mn, mx = reduce_minmax(rows, args, WEIGHT)
        w_hat, qp = rows, compute_qparams(args, mn, mx)
    else:
        w_hat, qp = rtn_weight(rows, args)
    q = quantize(w_hat, args, qp).reshape(w.shape)
    scale = qp.scale.float()
    return q, scale.reshape(rows.shape[0], -1) if scale.numel() > 1 else scale.reshape(1, 1)


class _QWeight(nn.Module):
    """A float weight (+ bias) that `freeze()` replaces by INT8 values and a scale."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        module: nn.Linear | nn.Conv1d,
        quantized: bool,
        fmt: WeightFormat,
        projection: bool = False,
    ) -> None:
        super().__init__()
        self.weight = _as_float_param(module.weight)
        self.bias = None if module.bias is None else _as_float_param(module.bias)
        self.quantized, self.frozen = quantized, False
        in_features = self.weight[0].numel()
        self.args = weight_args(fmt, in_features, projection)

    def freeze(self, placeholder: bool = False, hessian: torch.Tensor | None = None) -> None:
        """Quantize the weight, by GPTQ given the `hessian` of its inputs (or, for loading,
        allocate empty buffers)."""
        self.frozen = True
        if not self.quantized:
            return
        w = self.weight
        if placeholder:
            q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
            rows = 1 if self.args.strategy == "tensor" else w.shape[0]
            groups = w[0].numel() // (self.args.group_size or w[0].numel())
            scale = torch.empty(rows, groups, dtype=torch.float32, device=w.device)
        else:
            q, scale = quantize_weight(w, self.args, hessian)
        del self.weight
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)

    def float_weight(self) -> torch.Tensor:
        """The float weight, or the dequantized INT8 weight once frozen."""
        if not (self.frozen and self.quantized):
            return self.weight
        scale = self.weight_scale
        if scale.shape[1] > 1:  # int4 input-column groups
            return self.weight.float() * scale.repeat_interleave(
                self.weight.shape[1] // scale.shape[1], 1
            )
        scale = scale.reshape(-1, *([1] * (self.weight.ndim - 1)))
        return self.weight.float() * scale


def _as_float_param(p: torch.Tensor) -> nn.Parameter:
    """The same parameter if float32 (so training updates the original), else a float copy."""
    if isinstance(p, nn.Parameter) and p.dtype == torch.float32:
        return p
    return nn.Parameter(p.detach().float())


class QLinear(_QWeight):
    """Linear layer with an INT8 weight; the input quantizer is given at call time."""

    def forward(
        self, x: torch.Tensor, act: ActQuant | None, mode: Mode, use_bias: bool = True
    ) -> torch.Tensor:
        bias = self.bias if use_bias else None
        if mode in ("float", "calibrate"):  # (GPTQ runs later layers on earlier frozen ones)
            return F.linear(x, self.float_weight(), bias)
        if mode == "int8" and act is not None and self.quantized and not act.per_channel:
            return self._int8(x, act, bias)
        # (per-channel input scales vary along the reduction: no INT8 x INT8 matmul form;
        # the product of the dequantized INT8 values is computed instead)
        x_in = act.qdq(x) if act is not None else x
        return F.linear(x_in, self.float_weight(), bias)

    def _int8(self, x: torch.Tensor, act: ActQuant, bias: torch.Tensor | None) -> torch.Tensor:
        """INT8 x INT8 -> INT32 matmul per contiguous run of equal input scales (and, for
        int4 groups, of equal weight scales)."""
        q = act.quantize(x).reshape(-1, x.shape[-1])
        w_t = self.weight.t()
        if act.group_id is None and self.weight_scale.shape[1] == 1:
            acc = torch._int_mm(q, w_t).float() * act.scale
        else:
            acc = functools.reduce(
                operator.add,
                (
                    torch._int_mm(q[:, s:e].contiguous(), w_t[s:e].contiguous()).float() * scale
                    for s, e, scale in self._runs(act)
                ),
            )
            if self.weight_scale.shape[1] > 1:  # the weight scales are in the runs' scales
                return _add_bias(acc, bias).reshape(*x.shape[:-1], -1)
        out = acc * self.weight_scale.reshape(1, -1)
        return _add_bias(out, bias).reshape(*x.shape[:-1], -1)

    def _runs(self, act: ActQuant) -> list[tuple[int, int, torch.Tensor]]:
        """(start, end, scale) of the input columns' runs of one activation scale, split at
        the weight's group boundaries; scale: the activation scale, times the group's
        weight scales [out] when the weight has groups."""
        width = self.weight.shape[1]
        if act.group_id is None:
            runs = [(0, width, 0)]
        else:
            runs = group_runs(act.group_id)
        groups = self.weight_scale.shape[1]
        if groups == 1:
            return [(s, e, act.scale[g]) for s, e, g in runs]
        size = width // groups
        out = []
        for start, end, g in runs:
            while start < end:
                stop = min(end, (start // size + 1) * size)
                out.append((start, stop, act.scale[g] * self.weight_scale[:, start // size]))
                start = stop
        return out


def _add_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out + bias


class QConv1d(_QWeight):
    """Depthwise causal conv1d with an INT8 weight per channel."""

    def __init__(self, conv: nn.Conv1d, quantized: bool, fmt: WeightFormat) -> None:
        super().__init__(conv, quantized, fmt)
        self.kernel = conv.kernel_size[0]

    def forward(
        self, x: torch.Tensor, act: ActQuant | None, mode: Mode, last: int | None = None
    ) -> torch.Tensor:
        """x [batch, channels, length] -> pre-activation output of the same shape, or of its
        `last` positions only (a decode step: one position from the cached window)."""
        length, channels = x.shape[-1], x.shape[1]
        last = length if last is None else last
        if mode in ("fake", "int8") and act is not None and self.quantized:
            # integer products summed over <= kernel taps are exact in float32 (so the
            # one-position sum equals the convolution's value bit for bit)
            q = act.quantize(x, dim=1).float()
            if last == 1 and length >= self.kernel:
                out = (q[..., -self.kernel :] * self.weight.float()[:, 0]).sum(-1, keepdim=True)
            else:
                out = F.conv1d(
                    q, self.weight.float(), None, padding=self.kernel - 1, groups=channels
                )
                out = out[..., length - last : length]
            scale = _scale_view(act.channel_scale(), 3, 1) * self.weight_scale.reshape(1, -1, 1)
            out = out * scale
            return out if self.bias is None else out + self.bias.reshape(1, -1, 1)
        if mode in ("fake", "int8") and act is not None:
            x = act.qdq(x, dim=1)
        weight = self.weight if mode in ("float", "calibrate") else self.float_weight()
        out = F.conv1d(x, weight, self.bias, padding=self.kernel - 1, groups=channels)
        return out[..., length - last : length]


def _mask(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padded positions (as transformers' apply_mask_to_padding_states)."""
    if attention_mask is None:
        return x
    return x * attention_mask[:, :, None].to(x.dtype)


def _doubling_scan(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of h_t = a_t h_{t-1} + b_t along dim 1 (h_0 = 0), by doubling.

    Returns (prod a_1..a_t, h_t) for every t.
    """
    k, length = 1, a.shape[1]
    while k < length:
        b = torch.cat([b[:, :k], b[:, k:] + a[:, k:] * b[:, :-k]], dim=1)
        a = torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], dim=1)
        k *= 2
    return a, b


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    delta_bias: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba1's selective scan, token-major: u, delta, z [b, L, d]; A [d, n]; B, C [b, L, n].

    Same math as transformers' `mamba_selective_scan` (softplus(delta + bias), D skip, SiLU(z)
    gate), computed chunk by chunk with a parallel scan from `state` [b, d, n] (zero when
    None; a one-token call is the recurrent step). Returns (y, last state).
    """
    delta = F.softplus(delta + delta_bias)
    batch, length, d = u.shape
    h = u.new_zeros(batch, d, A.shape[1]) if state is None else state.float()
    outs = []
    for s in range(0, length, chunk):
        dt = delta[:, s : s + chunk, :, None]
        decay, states = _doubling_scan(
            torch.exp(dt * A), dt * u[:, s : s + chunk, :, None] * B[:, s : s + chunk, None, :]
        )
        states = states + decay * h[:, None]
        outs.append((states * C[:, s : s + chunk, None, :]).sum(-1))
        h = states[:, -1]
    y = torch.cat(outs, dim=1) + u * D
    return y * F.silu(z), h


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    dt_limit: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of Mamba2's SSD recurrence: state [b, h, p, n], x [b, h, p], dt [b, h],
    A, D, dt_bias [h], B, C [b, g, n]. The time step as `mamba2_chunk_scan` takes it
    (softplus of dt + bias, clamped to `dt_limit`). Returns (y [b, h, p], new state)."""
    heads = x.shape[1]
    dt = torch.clamp(F.softplus(dt + dt_bias), min=dt_limit[0], max=dt_limit[1])
    B = B.float().repeat_interleave(heads // B.shape[1], dim=1)
    C = C.float().repeat_interleave(heads // C.shape[1], dim=1)
    xdt = x.float() * dt[..., None]
    state = state.float() * torch.exp(A * dt)[..., None, None] + xdt[..., None] * B[:, :, None]
    y = (state * C[:, :, None]).sum(-1) + D[:, None] * x.float()
    return y, state


def _chunk_scan():
    """transformers' torch reference of Mamba2's chunked SSD scan (never a CUDA kernel)."""
    from transformers.models.mamba2 import modeling_mamba2

    fn = modeling_mamba2.mamba2_chunk_scan
    return getattr(fn, "__wrapped__", fn)


class QMixerBase(nn.Module):
    """Shared state of the quantized mixers: points, activation quantizers and modes."""

    kind: MambaKind

    conv1d: QConv1d
    out_proj: QLinear

    def __init__(self, specs: dict[str, PointSpec], layer_idx: int) -> None:
        super().__init__()
        self.rotate = False
        self._acts_done = False
        self.specs = specs
        self.layer_idx = layer_idx
        self.mode: Mode = "float"
        self.error_stats: dict[str, tuple[float, float]] | None = None  # point -> (|x|^2, |e|^2)
        self.acts = nn.ModuleDict()

    def add_out_hadamard(self, fuse: bool = True) -> None:
        """Rotate out_proj's input by H = `hadamard(inner)` at run time (Quamba) and, with
        `fuse`, its float weight by W H offline so that the output is unchanged (False: a
        reloaded mixer whose stored weight is rotated already). Call it after any channel
        reordering (Quamba2 permutes out_proj's input columns) and before calibrating."""
        if self.rotate:
            return
        if fuse:
            if self.out_proj.frozen:
                raise QuantscaleError(f"mixer {self.layer_idx}: rotate before freeze()")
            w = self.out_proj.weight.detach().double()
            rotated = (w @ hadamard(w.shape[1])).float()
            self.out_proj.weight = nn.Parameter(rotated, requires_grad=False)
        self.rotate = True

    def _out_input(self, y: torch.Tensor) -> torch.Tensor:
        """The out_proj input, Hadamard-rotated with `rotate`, then observed."""
        if self.rotate:
            y = apply_hadamard(y)
        return self._see("out_proj.input", y)

    def _add_acts(self, channels: dict[str, int]) -> None:
        for point in ACTIVATION_POINTS[self.kind]:
            if self.specs[point].quantize:
                act = self.acts[act_key(point)] = ActQuant(channels[point])
                if self.specs[point].per_channel:
                    act.set_per_channel()

    def act(self, point: str) -> ActQuant | None:
        """The quantizer of an activation point, or None when the point stays float."""
        key = act_key(point)
        return cast(ActQuant, self.acts[key]) if key in self.acts else None

    def _see(self, point: str, x: torch.Tensor) -> torch.Tensor:
        """Observe x at a point while calibrating (or measure its error); returns x."""
        act = self.act(point)
        if act is not None and self.mode in ("calibrate", "float"):
            if self.mode == "calibrate" or act.channel_amax is not None:
                act.observe(x)
        if act is not None and self.error_stats is not None and self.mode in ("fake", "int8"):
            signal, noise = self.error_stats.get(point, (0.0, 0.0))
            err = act.qdq(x) - x.float()
            self.error_stats[point] = (
                signal + float(x.float().pow(2).sum()),
                noise + float(err.pow(2).sum()),
            )
        return x

    def _dq(self, point: str, x: torch.Tensor) -> torch.Tensor:
        """INT8 round trip of x at a point once frozen; x itself otherwise."""
        act = self.act(point)
        return act.qdq(x) if act is not None and self.mode in ("fake", "int8") else x

    def _ssm_in(self, point: str, x: torch.Tensor) -> torch.Tensor:
        """An SSM input: observed while calibrating, INT8 round trip once frozen."""
        return self._dq(point, self._see(point, x))

    def set_mode(self, mode: Mode) -> None:
        if mode not in MODES:
            raise QuantscaleError(f"unknown mixer mode {mode!r}; expected one of {MODES}")
        frozen = all(m.frozen for m in self._weights())
        if mode in ("fake", "int8") and not frozen:
            raise QuantscaleError(f"mixer {self.layer_idx}: mode {mode!r} needs freeze() first")
        if mode in ("float", "calibrate") and frozen:
            raise QuantscaleError(f"mixer {self.layer_idx} is frozen; float modes are gone")
        self.mode = mode

    def start_calibration(self) -> None:
        """Attach observers to every quantized activation point and switch to calibrate."""
        for point in ACTIVATION_POINTS[self.kind]:
            act = self.act(point)
            if act is not None:
                act.start(self.specs[point])
        self.set_mode("calibrate")

    def finish_activations(self) -> None:
        """Static activation scales from the observers (the weights stay float)."""
        for act in self._act_quants():
            act.channel_amax, act.channel_sample = None, None
            act.finish()
        self._acts_done = True

    def freeze(
        self, placeholder: bool = False, hessians: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Static scales from the observers (unless `finish_activations` ran) and INT8 (or
        int4) weights, by GPTQ for those named in `hessians` (weight name -> Hessian of its
        inputs), else rounded to nearest; mode becomes int8.

        `placeholder=True` allocates the buffers only (to load a saved state dict).
        """
        if placeholder:
            for act in self._act_quants():
                act.channel_amax = None
        elif not self._acts_done:
            self.finish_activations()
        for name, module in self.named_children():
            if isinstance(module, _QWeight):
                module.freeze(placeholder, (hessians or {}).get(name))
        self.mode = "int8"

    def _act_quants(self) -> list[ActQuant]:
        return [m for m in self.acts.values() if isinstance(m, ActQuant)]

    def _weights(self) -> list[_QWeight]:
        return [m for m in self.children() if isinstance(m, _QWeight)]

    def _cached_state(self, cache) -> torch.Tensor | None:
        """The SSM state the cache holds for this layer (None: none yet, or no cache)."""
        return None if cache is None else cache.get_recurrent_state(self.layer_idx)

    def _keep_state(self, cache, state: torch.Tensor | None) -> None:
        if cache is not None and state is not None:
            cache.update_recurrent_state(state, self.layer_idx)

    def _conv(self, x: torch.Tensor, cache, mode: Mode) -> torch.Tensor:
        """conv1d (pre-activation) of x [b, L, C], channels last, after the conv inputs the
        cache keeps (it then keeps the last kernel-size inputs, float, quantized again with
        the same static scale at the next step: the same INT8 values)."""
        length = x.shape[1]
        window = x.transpose(1, 2)
        if cache is not None:
            window = cache.update_conv_state(
                window, self.layer_idx, conv_kernel_size=self.conv1d.kernel
            )
        return self.conv1d(window, self.act("conv1d.input"), mode, last=length).transpose(1, 2)


class QMambaMixer(QMixerBase):
    """Quantized `MambaMixer` (Mamba1)."""

    kind = "mamba"

    def __init__(self, mixer: MambaMixer, specs: dict[str, PointSpec], fmt: WeightFormat) -> None:
        super().__init__(specs, mixer.layer_idx)
        w = specs
        self.in_proj = QLinear(mixer.in_proj, w["in_proj.weight"].quantize, fmt, True)
        self.conv1d = QConv1d(mixer.conv1d, w["conv1d.weight"].quantize, fmt)
        self.x_proj = QLinear(mixer.x_proj, w["x_proj.weight"].quantize, fmt, True)
        self.dt_proj = QLinear(mixer.dt_proj, w["dt_proj.weight"].quantize, fmt)
        self.out_proj = QLinear(mixer.out_proj, w["out_proj.weight"].quantize, fmt, True)
        self.A_log = _as_float_param(mixer.A_log)
        self.D = _as_float_param(mixer.D)
        self.rank = mixer.time_step_rank
        self.state = mixer.ssm_state_size
        inner, hidden = mixer.intermediate_size, mixer.hidden_size
        self._add_acts(
            {
                "in_proj.input": hidden,
                "conv1d.input": inner,
                "ssm.x": inner,
                "ssm.B": self.state,
                "ssm.C": self.state,
                "ssm.dt": inner,
                "ssm.z": inner,
                "dt_proj.input": self.rank,
                "out_proj.input": inner,
            }
        )

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        dtype, mode = hidden_states.dtype, self.mode
        state = self._cached_state(cache)
        h = self._see("in_proj.input", _mask(hidden_states.float(), attention_mask))
        x, z = self.in_proj(h, self.act("in_proj.input"), mode).chunk(2, dim=-1)
        x = self._conv(self._see("conv1d.input", x), cache, mode)
        x = self._see("ssm.x", _mask(F.silu(x), attention_mask))
        dt_lr, B, C = self.x_proj(x, self.act("ssm.x"), mode).split(
            [self.rank, self.state, self.state], dim=-1
        )
        dt_lr = self._see("dt_proj.input", dt_lr)
        dt = self.dt_proj(dt_lr, self.act("dt_proj.input"), mode, use_bias=False)
        y, state = selective_scan(
            self._dq("ssm.x", x),
            self._ssm_in("ssm.dt", dt),
            -torch.exp(self.A_log.float()),
            self._ssm_in("ssm.B", B),
            self._ssm_in("ssm.C", C),
            self.D,
            self._ssm_in("ssm.z", z),
            self.dt_proj.bias,
            state,
        )
        self._keep_state(cache, state)
        y = self._out_input(y)
        return self.out_proj(y, self.act("out_proj.input"), mode).to(dtype)


class QMamba2Mixer(QMixerBase):
    """Quantized `Mamba2Mixer`."""

    kind = "mamba2"

    def __init__(self, mixer: Mamba2Mixer, specs: dict[str, PointSpec], fmt: WeightFormat) -> None:
        super().__init__(specs, mixer.layer_idx)
        w = specs
        self.in_proj = QLinear(mixer.in_proj, w["in_proj.weight"].quantize, fmt, True)
        self.conv1d = QConv1d(mixer.conv1d, w["conv1d.weight"].quantize, fmt)
        self.out_proj = QLinear(mixer.out_proj, w["out_proj.weight"].quantize, fmt, True)
        self.A_log = _as_float_param(mixer.A_log)
        self.D = _as_float_param(mixer.D)
        self.dt_bias = _as_float_param(mixer.dt_bias)
        self.norm = mixer.norm.float()
        self.num_heads, self.head_dim = mixer.num_heads, mixer.head_dim
        self.n_groups, self.ssm_state_size = mixer.n_groups, mixer.ssm_state_size
        self.chunk_size, self.time_step_limit = mixer.chunk_size, mixer.time_step_limit
        self.inner = mixer.intermediate_size
        self.conv_dim = mixer.conv_dim
        bc = self.n_groups * self.ssm_state_size
        self._add_acts(
            {
                "in_proj.input": mixer.hidden_size,
                "conv1d.input": self.conv_dim,
                "ssm.x": self.inner,
                "ssm.B": bc,
                "ssm.C": bc,
                "ssm.dt": self.num_heads,
                "ssm.z": self.inner,
                "out_proj.input": self.inner,
            }
        )
        per_group = torch.arange(bc) // self.ssm_state_size
        for point in ("ssm.B", "ssm.C"):
            act = self.act(point)
            if act is not None and specs[point].piecewise:
                act.set_groups(per_group, self.n_groups)

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        dtype, mode = hidden_states.dtype, self.mode
        batch, length, _ = hidden_states.shape
        state = self._cached_state(cache)
        h = self._see("in_proj.input", _mask(hidden_states.float(), attention_mask))
        z, xbc, dt = self.in_proj(h, self.act("in_proj.input"), mode).split(
            [self.inner, self.conv_dim, self.num_heads], dim=-1
        )
        xbc = self._conv(self._see("conv1d.input", xbc), cache, mode)
        xbc = _mask(F.silu(xbc), attention_mask)
        bc = self.n_groups * self.ssm_state_size
        x, B, C = xbc.split([self.inner, bc, bc], dim=-1)
        y, state = self._scan(
            self._ssm_in("ssm.x", x).reshape(batch, length, self.num_heads, self.head_dim),
            self._ssm_in("ssm.dt", dt),
            self._ssm_in("ssm.B", B).reshape(batch, length, self.n_groups, -1),
            self._ssm_in("ssm.C", C).reshape(batch, length, self.n_groups, -1),
            state,
            cache is not None,
        )
        self._keep_state(cache, state)
        y = self.norm(y.reshape(batch, length, -1), self._ssm_in("ssm.z", z))
        y = self._out_input(y)
        return self.out_proj(y, self.act("out_proj.input"), mode).to(dtype)

    def _scan(self, x, dt, B, C, state, final: bool):
        """SSD over x [b, L, heads, head_dim] from `state` (None: zero): the recurrent step
        for one token after a state, else the chunked scan. Returns (y, last state or None
        unless `final`)."""
        A = -torch.exp(self.A_log.float())
        if state is not None and x.shape[1] == 1:
            y, state = ssd_step(
                state,
                x[:, 0],
                dt[:, 0],
                A,
                B[:, 0],
                C[:, 0],
                self.D,
                self.dt_bias,
                self.time_step_limit,
            )
            return y[:, None], state
        out = _chunk_scan()(
            x,
            dt,
            A,
            B,
            C,
            chunk_size=self.chunk_size,
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            dt_limit=self.time_step_limit,
            initial_states=state,
            return_final_states=final,
        )
        return out if final else (out, None)


def quantized_mixer(
    mixer: nn.Module,
    kind: MambaKind,
    specs: dict[str, PointSpec],
    fmt: WeightFormat | None = None,
) -> QMixerBase:
    """The quantized counterpart (float mode) of a transformers MambaMixer / Mamba2Mixer;
    `fmt`: how its weights are stored (default INT8 per channel)."""
    fmt = fmt or WeightFormat()
    if kind == "mamba":
        return QMambaMixer(cast("MambaMixer", mixer), specs, fmt)
    return QMamba2Mixer(cast("Mamba2Mixer", mixer), specs, fmt)


def is_quantized_mixer(module: nn.Module) -> TypeGuard[QMixerBase]:
    return isinstance(module, QMixerBase)
