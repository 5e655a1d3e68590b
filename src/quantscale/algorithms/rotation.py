"""Hadamard rotations fused into a Llama-style model before quantization (QuaRot / SpinQuant
with fixed Hadamards, nothing learned): `rotate_model(model, "hadamard")`.

- Norms folded first: every RMSNorm's weight goes into the Linears that read its output
  (input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, the final norm -> lm_head)
  and the norm weights become 1, so that RMSNorm(x Q) = RMSNorm(x) Q for an orthogonal Q.
- R1, the residual stream: Q = diag(s) H (H = `runtime.hadamard.hadamard(hidden)`, s random
  signs of a fixed seed). embed_tokens rows E Q; q/k/v/gate/up/lm_head inputs W Q; o_proj /
  down_proj outputs Q^T W (and bias). Tied embeddings are untied (config
  `tie_word_embeddings` False): the folded final norm makes lm_head differ from E Q.
- R2, per attention head: v_proj output rows H^T W_h, o_proj input columns W_h H (head_dim).
- R4, online: down_proj's weight W H offline, and its input x H at run time
  (`runtime.hadamard.add_online_hadamard`; QuantLinear keeps it, the exports record it as
  the recipe's `rotate` / compressed-tensors `transform_config`).
The float model's outputs are unchanged (up to rounding); the massive activations of a few
residual / down_proj channels are spread over all channels, which is what static INT8
activations need. Everything is computed in float64, then cast back to the weights' dtype.

`quantize_model` with layer transforms (smoothing) fuses R1 and R2 first and R4 per layer
after the transforms (`rotate_for`), so that up_proj -> down_proj smoothing sees down_proj's
own input: its weight becomes W diag(s) H. Kind "hadamard-smooth" adds that smoothing
(SmoothQuant, alpha `SMOOTH_DOWN_ALPHA`, on the `down` mapping only) itself. Why: SmolLM2's
massive down_proj inputs sit on the first token of a window, in one channel (layer 11: ~3,000
in channel 1229, every other token below 13). R4 alone spreads the spike over that token's
channels (max 105 against a median token max of 0.53), and a static per-tensor scale must
still cover it; smoothing first divides the channel out for every token. The export is the
same as "hadamard" (the smoothing is in the weights; the online R4 is recorded).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn

from quantscale.algorithms.smoothing import Smoothing, SmoothQuant
from quantscale.errors import QuantscaleError
from quantscale.models.adapter import causal_lm, decoder_layers
from quantscale.runtime.hadamard import add_online_hadamard, hadamard, has_online_hadamard

ROTATIONS = ("hadamard", "hadamard-smooth")
# "hadamard-smooth": SmoothQuant's alpha on up_proj -> down_proj (SmolLM2-135M W8A8, 16 x 512
# calibration, 4,096 held-out tokens, bf16 22.487: 0.4 22.79, 0.5 22.65, 0.6 22.67, 0.85 22.89)
SMOOTH_DOWN_ALPHA = 0.5
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")


def check_rotation(kind: str | None) -> str | None:
    """`kind` validated (None: no rotation)."""
    if kind is not None and kind not in ROTATIONS:
        raise QuantscaleError(f"--rotate {kind!r}; expected one of {', '.join(ROTATIONS)}")
    return kind


def _set(linear: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    old = _param(linear)
    linear.weight = nn.Parameter(weight.to(old.dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(old.dtype), requires_grad=False)


def _param(module: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, module.weight)


def _w(module: nn.Module) -> torch.Tensor:
    return _param(module).detach().to(torch.float64)


def _b(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach().to(torch.float64)


def _check_norm(norm: nn.Module, where: str) -> torch.Tensor:
    """The norm's weight, refused unless it is a plain RMSNorm (x / rms(x) * weight)."""
    name = type(norm).__name__
    weight = getattr(norm, "weight", None)
    if "RMSNorm" not in name or weight is None or "Gemma" in name or _b(norm) is not None:
        raise QuantscaleError(
            f"{where}: a Hadamard rotation folds plain RMSNorms (x / rms(x) * weight); "
            f"{name} is not one (e.g. Gemma's (1 + weight)): this architecture is not supported"
        )
    return weight.detach().to(torch.float64)


def _parts(layer: nn.Module, where: str) -> dict[str, nn.Module]:
    """The Llama-style modules of one decoder layer, refusing other shapes."""
    found: dict[str, nn.Module] = {}
    for group, names in (("self_attn", _ATTN), ("mlp", _MLP)):
        for name in names:
            module = getattr(getattr(layer, group, None), name, None)
            if not isinstance(module, nn.Linear):
                raise QuantscaleError(
                    f"{where}.{group}.{name}: expected an nn.Linear (rotation supports "
                    "Llama-style q/k/v/o + gate/up/down layers, before quantization)"
                )
            found[name] = module
    extra = [
        n
        for n, m in layer.named_modules()
        if "norm" in type(m).__name__.lower() and n not in _NORMS
    ]
    if extra:
        raise QuantscaleError(
            f"{where}: norms {extra} sit inside the residual branches; a residual rotation "
            "cannot be fused past them (architecture not supported)"
        )
    for name in _NORMS:
        norm = getattr(layer, name, None)
        if norm is None:
            raise QuantscaleError(f"{where}.{name}: missing (rotation needs Llama-style norms)")
        found[name] = norm
    return found


def _fold(norm: nn.Module, linears: list[nn.Module], where: str) -> None:
    """Norm weight into the following Linears' input columns; the norm weight set to 1."""
    g = _check_norm(norm, where)
    for linear in linears:
        _set(linear, _w(linear) * g[None, :])
    with torch.no_grad():
        _param(norm).fill_(1.0)


def _untie(model: Any) -> None:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is embed.weight:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    text = getattr(model.config, "get_text_config", None)
    if text is not None:
        text().tie_word_embeddings = False


def residual_rotation(size: int, seed: int = 0) -> torch.Tensor:
    """R1: diag(s) @ hadamard(size), s random signs of generator `seed` (float64)."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (size,), generator=gen).to(torch.float64) * 2 - 1
    return signs[:, None] * hadamard(size)


def _head_dim(config: Any, hidden: int) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim or hidden // config.num_attention_heads)


def _rotate_heads(v_proj: nn.Module, o_proj: nn.Module, h: torch.Tensor) -> None:
    """R2: v_proj output rows H^T W_h per head, o_proj input columns W_h H per head."""
    d = h.shape[0]
    wv = _w(v_proj)
    rows = torch.einsum("dk,ndi->nki", h, wv.reshape(-1, d, wv.shape[1])).reshape(wv.shape)
    bv = _b(v_proj)
    _set(v_proj, rows, None if bv is None else (bv.reshape(-1, d) @ h).reshape(-1))
    wo = _w(o_proj)
    _set(o_proj, (wo.reshape(wo.shape[0], -1, d) @ h).reshape(wo.shape))


@torch.no_grad()
def rotate_down(layer: nn.Module) -> None:
    """R4 of one decoder layer: down_proj's weight W H, its input x H online (idempotent)."""
    down = getattr(getattr(layer, "mlp", None), "down_proj", None)
    if down is None or has_online_hadamard(down):
        return
    _set(down, _w(down) @ hadamard(_w(down).shape[1]))
    add_online_hadamard(down)


def rotate_down_step(step: Any) -> None:
    """`rotate_down` as a `quantize_model` layer transform (after the smoothing ones)."""
    rotate_down(step.layer)


@torch.no_grad()
def rotate_model(
    model: nn.Module, kind: str = "hadamard", seed: int = 0, online: bool = True
) -> nn.Module:
    """Fuse R1, R2 and R4 (module docstring) into `model` in place and return it; the
    down_proj modules get their online Hadamard. `online` False leaves R4 out, for the caller
    to apply per layer (`rotate_down`), e.g. after smoothing up_proj -> down_proj. Refuses
    non-Llama-style layers and a model already quantized (run it on the float model, before
    `quantize_model`)."""
    check_rotation(kind)
    lm = causal_lm(model)
    prefix, layers = decoder_layers(model)
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    final_norm = getattr(getattr(model, "model", None), "norm", None)
    if not isinstance(head, nn.Linear) or embed is None or final_norm is None:
        raise QuantscaleError(
            f"{type(model).__name__}: rotation needs embed_tokens, a final norm and an lm_head "
            "Linear (a Llama-style causal LM)"
        )
    parts = [_parts(layer, f"{prefix}.{i}") for i, layer in enumerate(layers)]
    _untie(lm)
    hidden = _param(embed).shape[1]
    q = residual_rotation(hidden, seed)
    r2 = hadamard(_head_dim(lm.config, hidden))
    _fold(final_norm, [head], "model.norm")
    _set(head, _w(head) @ q)
    _param(embed).data = (_w(embed) @ q).to(_param(embed).dtype)
    for i, p in enumerate(parts):
        where = f"{prefix}.{i}"
        _fold(p["input_layernorm"], [p["q_proj"], p["k_proj"], p["v_proj"]], where)
        _fold(p["post_attention_layernorm"], [p["gate_proj"], p["up_proj"]], where)
        for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            _set(p[name], _w(p[name]) @ q)
        for name in ("o_proj", "down_proj"):
            bias = _b(p[name])
            _set(p[name], q.T @ _w(p[name]), None if bias is None else bias @ q)
        _rotate_heads(p["v_proj"], p["o_proj"], r2)
        if online:
            rotate_down(layers[i])
    return model


def rotate_for(
    model: nn.Module, kind: str, transforms: Sequence[Callable[[Any], None]] = ()
) -> list[Callable[[Any], None]]:
    """Fuse rotation `kind` into the float `model` for `quantize_model`; returns the layer
    transforms to run. With none (kind "hadamard"), R4 is fused here too; otherwise R1 and R2
    are, and R4 runs per layer after the transforms (`rotate_down_step`). "hadamard-smooth"
    puts SmoothQuant(down=SMOOTH_DOWN_ALPHA) first (refused beside another down smoothing)."""
    check_rotation(kind)
    steps = list(transforms)
    if kind == "hadamard-smooth":
        if any(isinstance(t, Smoothing) and "down" in t.alphas for t in steps):
            raise QuantscaleError(
                "--rotate hadamard-smooth smooths up_proj -> down_proj itself; drop 'down' "
                "from the other smoothing (or use --rotate hadamard)"
            )
        steps.insert(0, SmoothQuant({"down": SMOOTH_DOWN_ALPHA}))
    rotate_model(model, kind, online=not steps)
    return [*steps, rotate_down_step] if steps else []
