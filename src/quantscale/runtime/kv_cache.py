"""FP8 KV cache with static scales, calibrated like activations.

A runtime with an FP8 KV cache (vLLM's `kv_cache_dtype="fp8"`) stores each attention layer's
keys (after RoPE) and values as E4M3 with one static scale per tensor (or per KV head) read
from the checkpoint: `<attn>.k_scale`, `<attn>.v_scale` (float32, shape [1], or
[kv_heads, 1, 1] for compressed-tensors' `attn_head` strategy), with
`quantization_config.kv_cache_scheme` saying so. Here the same tensors are observed where the
cache would receive them: transformers' attention modules call a pluggable attention
function with the post-RoPE keys and the values (before the GQA repeat); `KV_ATTENTION` is
registered as one that observes or fake-quantizes them and then runs SDPA. Calibration
records each layer's amax; the scale is amax / 448. With the scales set, every forward
quantizes K and V as the cache would, so evaluation shows the perplexity cost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from quantscale.errors import QuantscaleError
from quantscale.formats.fp8 import E4M3, E4M3_MAX, cast_fp8
from quantscale.scheme import QuantArgs

KV_ATTENTION = "quantscale_kv"
SCALES = ("k_scale", "v_scale")
STRATEGIES = ("tensor", "attn_head")
KV_CHOICES = {"fp8": "tensor", "fp8-head": "attn_head"}  # --kv-cache values -> strategy
_STATE = "_quantscale_kv"


def fp8_kv_args(strategy: str = "tensor") -> QuantArgs:
    """compressed-tensors' kv_cache_scheme for a static FP8 (E4M3) cache."""
    if strategy not in STRATEGIES:
        raise QuantscaleError(f"KV cache strategy {strategy!r}; expected one of {STRATEGIES}")
    return QuantArgs.model_validate(
        {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False}
    )


def check_kv_args(args: QuantArgs) -> None:
    """Refuse a kv_cache_scheme this module does not implement."""
    ok = args.type == "float" and args.num_bits == 8 and not args.dynamic
    if not ok or args.strategy not in STRATEGIES:
        raise QuantscaleError(
            f"kv_cache_scheme {args.type}{args.num_bits} strategy {args.strategy!r} dynamic "
            f"{args.dynamic}: only static FP8 per tensor or per attention head is supported"
        )


class _KVState:
    """One attention module's observer (amax so far) or its fake quantizer (scales set)."""

    def __init__(self, args: QuantArgs) -> None:
        self.args = args
        self.amax: dict[str, torch.Tensor] = {}
        self.observing = False

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """amax of [batch, kv_heads, tokens, head_dim] per tensor [1] or per head [H, 1, 1]."""
        a = x.detach().abs().float()
        if self.args.strategy == "tensor":
            return a.amax().reshape(1)
        return a.amax(dim=(0, 2, 3)).reshape(-1, 1, 1)

    def observe(self, role: str, x: torch.Tensor) -> None:
        found = self._reduce(x)
        old = self.amax.get(role)
        self.amax[role] = found if old is None else torch.maximum(old, found)

    @staticmethod
    def fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        s = scale.to(device=x.device, dtype=torch.float32)
        s = s.reshape(1, -1, 1, 1) if s.numel() > 1 else s.reshape(())
        return (cast_fp8(x.float() / s, E4M3).float() * s).to(x.dtype)


def _attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """transformers attention function: observe or fake-quantize K and V, then SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state: _KVState | None = getattr(module, _STATE, None)
    if state is not None and state.observing:
        state.observe("k", key)
        state.observe("v", value)
    elif state is not None and (scales := kv_scales(module)) is not None:
        key, value = state.fake_quant(key, scales[0]), state.fake_quant(value, scales[1])
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def kv_scales(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The module's (k_scale, v_scale) buffers, or None before they are set."""
    k, v = module._buffers.get("k_scale"), module._buffers.get("v_scale")
    return None if k is None or v is None else (k, v)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(KV_ATTENTION, _attention)


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> attention module (those with k_proj and v_proj and a layer index)."""
    found = {
        name: m
        for name, m in model.named_modules()
        if hasattr(m, "k_proj") and hasattr(m, "v_proj") and hasattr(m, "layer_idx")
    }
    if not found:
        raise QuantscaleError("FP8 KV cache: the model has no attention modules with k/v_proj")
    return found


def attach_kv_quant(model: Any, args: QuantArgs) -> dict[str, nn.Module]:
    """Route the model's attention through `KV_ATTENTION` with a state per attention module."""
    check_kv_args(args)
    _register()
    modules = attention_modules(model)
    for m in modules.values():
        setattr(m, _STATE, _KVState(args))
    model.set_attn_implementation(KV_ATTENTION)
    if model.config._attn_implementation != KV_ATTENTION:
        raise QuantscaleError(
            f"FP8 KV cache: {type(model).__name__} does not take a pluggable attention function"
        )
    return modules


def set_kv_scales(module: nn.Module, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    """Install static scales (float32) as the module's `k_scale` / `v_scale` buffers."""
    for name, value in zip(SCALES, (k_scale, v_scale), strict=True):
        module.register_buffer(name, value.detach().float().clone())


def calibrate_kv_cache(
    model: Any, args: QuantArgs, run: Callable[[], Iterable[Any] | None]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Observe K / V over `run()` (the calibration forward passes), then set each attention
    module's scales to amax / 448; later forwards fake-quantize K and V. Returns
    {attention module: (k_scale, v_scale)}."""
    modules = attach_kv_quant(model, args)
    states = {name: getattr(m, _STATE) for name, m in modules.items()}
    for s in states.values():
        s.observing = True
    try:
        with torch.no_grad():
            run()
    finally:
        for s in states.values():
            s.observing = False
    out = {}
    for name, m in modules.items():
        amax = states[name].amax
        if list(amax) != ["k", "v"]:
            raise QuantscaleError(f"FP8 KV cache: {name} saw no keys/values during calibration")
        k, v = (
            torch.where(a > 0, a / E4M3_MAX, torch.ones_like(a)) for a in (amax["k"], amax["v"])
        )
        set_kv_scales(m, k, v)
        out[name] = (k, v)
    return out


def load_kv_scales(
    model: Any, args: QuantArgs, tensors: dict[str, torch.Tensor], where: str
) -> None:
    """Attach the FP8 KV fake quantizer with scales read from a checkpoint (`tensors`: full
    names -> values); every attention module must have both."""
    modules = attach_kv_quant(model, args)
    for name, m in modules.items():
        found = [tensors.get(f"{name}.{s}") for s in SCALES]
        if found[0] is None or found[1] is None:
            raise QuantscaleError(
                f"{where}: kv_cache_scheme is set but {name}.k_scale / {name}.v_scale are missing"
            )
        set_kv_scales(m, found[0], found[1])
