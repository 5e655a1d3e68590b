"""SmoothQuant-style smoothing on a tiny Llama: float outputs kept, ranges flattened, W8A8
error reduced on a model with an injected outlier channel; searched alphas minimal over the
grid against an independent measurement."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from quantscale.algorithms.rtn import rtn_weight
from quantscale.algorithms.smoothing import (
    LLAMA_MAPPINGS,
    MAPPING_NAMES,
    SEARCH,
    Smoothing,
    SmoothQuant,
    collect_absmax,
    format_alphas,
    layer_mappings,
    model_absmax,
    norm_offset,
    parse_alphas,
    smooth_model,
    smooth_scales,
    smoothed_error,
)
from quantscale.calibration.sequential import layerwise
from quantscale.errors import QuantscaleError
from quantscale.orchestrator import quantize_model
from quantscale.qdq import compute_qparams, fake_quantize
from quantscale.scheme import preset_scheme


def _data(n: int = 4, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.float()


def _inject_outlier(model: nn.Module, channel: int = 5, factor: float = 300.0) -> None:
    """Make one down_proj input channel huge without changing the float function."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[channel] *= factor
            layer.mlp.down_proj.weight[:, channel] /= factor


def _batches() -> list[torch.Tensor]:
    return list(_data().split(2))


def test_parse_alphas():
    assert parse_alphas("0.5") == dict.fromkeys(MAPPING_NAMES, 0.5)
    assert parse_alphas("down=0.8+qkv=0.4") == {"down": 0.8, "qkv": 0.4}
    assert format_alphas(parse_alphas("0.7")) == "0.7"
    assert format_alphas(parse_alphas("down=0.8")) == "down=0.8"
    assert parse_alphas("search") == dict.fromkeys(MAPPING_NAMES, SEARCH)
    assert parse_alphas("qkv=search+down=0.9") == {"qkv": SEARCH, "down": 0.9}
    for spec in ("search", "qkv=search+down=0.9", "0.85"):
        assert parse_alphas(format_alphas(parse_alphas(spec))) == parse_alphas(spec)
    assert "=" in format_alphas(parse_alphas("search"))  # sweep labels: numbers only bare
    for bad in ("1.5", "mlp=0.5", "down=x", "down=serch", "down"):
        with pytest.raises(QuantscaleError):
            parse_alphas(bad)


def test_scales_formula_and_dead_channels():
    x, w = torch.tensor([4.0, 0.0, 9.0]), torch.tensor([1.0, 2.0, 0.0])
    s = smooth_scales(x, w, 0.5)
    assert torch.allclose(s[0], torch.tensor(2.0))
    assert s[1] == 1 and s[2] == 1  # dead input / dead weight column: left alone


def test_float_outputs_unchanged_and_restore(tiny_llama):
    ids = _data(2, 24, seed=3)
    before = _logits(tiny_llama, ids)
    params = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    smoothing = smooth_model(tiny_llama, 0.5, _batches())
    # every mapping, including v->o under grouped-query attention (4 heads, 2 KV heads)
    assert {k.rsplit(".", 1)[1] for k in smoothing.scales} == set(MAPPING_NAMES)
    changed = tiny_llama.model.layers[0].input_layernorm.weight
    assert not torch.equal(changed, params["model.layers.0.input_layernorm.weight"])
    torch.testing.assert_close(_logits(tiny_llama, ids), before, rtol=1e-4, atol=1e-4)
    smoothing.restore()
    for k, v in tiny_llama.state_dict().items():
        assert torch.equal(v, params[k]), k


def test_channel_range_flattened(tiny_llama):
    _inject_outlier(tiny_llama)
    batches = _batches()

    def spread() -> float:
        x = model_absmax(tiny_llama, batches, ["down"])["model.layers.1"]["down"]
        return float(x.max() / x.median())

    before = spread()
    smooth_model(tiny_llama, "down=0.5", batches)
    after = spread()
    assert before > 100 and after < before / 10


def _w8a8_error(smooth: bool) -> float:
    from tiny_models import make_tiny_llama

    model = make_tiny_llama()
    _inject_outlier(model)
    ids = _data(2, 24, seed=3)
    ref = _logits(model, ids)
    transforms = [SmoothQuant(0.5)] if smooth else []
    quantize_model(model, "W8A8", _data(), batch_size=2, transforms=transforms)
    return float((_logits(model, ids) - ref).pow(2).mean())


def test_w8a8_error_lower_with_smoothing():
    plain, smoothed = _w8a8_error(False), _w8a8_error(True)
    assert smoothed < plain / 4


def test_pipeline_transform_keeps_the_float_function(tiny_llama):
    """SmoothQuant in quantize_model with a weights-only scheme: only the weights' rounding
    differs from the unsmoothed float model."""
    ids = _data(2, 24, seed=3)
    ref = _logits(tiny_llama, ids)
    sq = SmoothQuant(0.5)
    quantize_model(tiny_llama, "W8A16", _data(), batch_size=2, transforms=[sq])
    assert len(sq.scales) == 2 * len(MAPPING_NAMES)
    err = float((_logits(tiny_llama, ids) - ref).pow(2).mean())
    assert err < 1e-3 * float(ref.pow(2).mean())


def test_missing_modules_are_skipped_with_a_log(caplog):
    layer = nn.Module()
    layer.input_layernorm = nn.LayerNorm(8)
    layer.self_attn = nn.Module()
    for p in ("q_proj", "k_proj", "v_proj"):
        setattr(layer.self_attn, p, nn.Linear(8, 8))
    with caplog.at_level(logging.INFO, logger="quantscale.algorithms.smoothing"):
        found = layer_mappings(layer, where="toy")
    assert [m.name for m in found] == ["qkv"]
    assert "mapping 'gate_up' skipped" in caplog.text


# ------------------------------------------------------------------ alpha search

GRID = (0.3, 0.5, 0.7, 0.9)


def _nexts_input(layer: nn.Module, path: str, inputs: list) -> torch.Tensor:
    """Every token fed to `layer.<path>` while the layer runs its cached inputs, [T, C]."""
    seen = []
    handle = layer.get_submodule(path).register_forward_pre_hook(
        lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).clone())
    )
    with torch.inference_mode():
        for args, kwargs in inputs:
            layer(*args, **kwargs)
    handle.remove()
    return torch.cat(seen)


def _measured_error(float_layer, inputs, mapping, alpha, absmax) -> float:
    """Independent W8A8 error of one mapping smoothed at `alpha`: smooth a copy of the layer,
    run it, quantize what its nexts really see (per-tensor min-max over all tokens) and their
    smoothed weights (per-channel RTN), compare with the float layer's nexts outputs."""
    smoothed = copy.deepcopy(float_layer)
    Smoothing({mapping.name: alpha}).smooth_layer(smoothed, absmax)
    paths = mapping.nexts
    x_ref, x = (_nexts_input(lay, paths[0], inputs) for lay in (float_layer, smoothed))
    w_ref, w = (
        torch.cat([lay.get_submodule(p).weight.detach() for p in paths])
        for lay in (float_layer, smoothed)
    )
    scheme = preset_scheme("W8A8")
    act = scheme.input_activations
    xq = fake_quantize(x, act, compute_qparams(act, x.min().reshape(1), x.max().reshape(1)))
    wq = rtn_weight(w, scheme.weights)[0]
    return float((xq @ wq.T - x_ref @ w_ref.T).pow(2).mean())


def test_search_is_minimal_over_the_grid_and_keeps_the_float_function():
    from tiny_models import make_tiny_llama

    model = make_tiny_llama()
    _inject_outlier(model)
    step = next(iter(layerwise(model, _batches())))
    float_layer = copy.deepcopy(step.layer)
    ref = [o.clone() for o in step.run()]
    sq = SmoothQuant("search", grid=GRID, max_tokens=10_000)  # all 64 tokens
    sq(step)

    chosen = sq.chosen[step.name]
    assert set(chosen) == set(MAPPING_NAMES) and set(chosen.values()) <= set(GRID)
    absmax = collect_absmax(
        float_layer, LLAMA_MAPPINGS, lambda: _nexts_input(float_layer, "mlp.up_proj", step.inputs)
    )
    for m in LLAMA_MAPPINGS:
        measured = {a: _measured_error(float_layer, step.inputs, m, a, absmax) for a in GRID}
        searched = sq.errors[f"{step.name}.{m.name}"]
        for a in GRID:  # the search's objective is the real quantized error ...
            assert searched[a] == pytest.approx(measured[a], rel=2e-2), (m.name, a)
        # ... and the applied alpha is no worse than any fixed grid alpha
        assert measured[chosen[m.name]] <= min(measured.values()) * 1.02, (m.name, measured)
    for out, expected in zip(step.run(), ref):
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_search_in_the_pipeline_reduces_w8a8_error():
    from tiny_models import make_tiny_llama

    errors = {}
    for spec in (None, "search"):
        model = make_tiny_llama()
        _inject_outlier(model)
        ids = _data(2, 24, seed=3)
        ref = _logits(model, ids)
        sq = SmoothQuant(spec, grid=GRID) if spec else None
        quantize_model(model, "W8A8", _data(), batch_size=2, transforms=[sq] if sq else [])
        errors[spec] = float((_logits(model, ids) - ref).pow(2).mean())
    assert len(sq.chosen) == 2 and all(len(a) == len(MAPPING_NAMES) for a in sq.chosen.values())
    assert errors["search"] < errors[None] / 4


def test_smooth_model_search_restores_and_needs_batches(tiny_llama):
    ids = _data(2, 24, seed=3)
    before = _logits(tiny_llama, ids)
    params = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    smoothing = smooth_model(tiny_llama, "qkv=search+down=search", _batches())
    assert set(smoothing.chosen["model.layers.0"]) == {"qkv", "down"}
    torch.testing.assert_close(_logits(tiny_llama, ids), before, rtol=1e-4, atol=1e-4)
    smoothing.restore()
    for k, v in tiny_llama.state_dict().items():
        assert torch.equal(v, params[k]), k
    with pytest.raises(QuantscaleError, match="layerwise"):
        smooth_model(tiny_llama, "search", absmax={})


def test_relative_objective_weighs_tokens_equally():
    """'relative' averages each token's error over its output norm: scaling the data scales
    the plain MSE by c^2 and leaves the relative error unchanged; it is the mean of the
    single-token relative errors under the same static range."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 8, generator=gen), torch.randn(5, 8, generator=gen)
    s, scheme = torch.rand(8, generator=gen) + 0.5, preset_scheme("W8A8")

    rng = (x.amin(0), x.amax(0))

    def err(c: float, relative: bool) -> float:
        return smoothed_error(c * x, w, s, scheme, (c * rng[0], c * rng[1]), relative=relative)

    assert err(4, False) == pytest.approx(16 * err(1, False), rel=1e-4)
    assert err(4, True) == pytest.approx(err(1, True), rel=1e-4)
    singles = [smoothed_error(x[i : i + 1], w, s, scheme, rng, relative=True) for i in range(6)]
    assert err(1, True) == pytest.approx(sum(singles) / len(singles), rel=1e-5)
    with pytest.raises(QuantscaleError):
        SmoothQuant("search", objective="bogus")


def test_gemma3_smoothing_folds_into_its_own_norms_and_keeps_the_float_function():
    """Gemma-3: gate/up read pre_feedforward_layernorm (post_attention_layernorm scales the
    attention output before the residual add), and its norms compute x * (1 + weight)."""
    from tiny_models import make_tiny_gemma3

    model = make_tiny_gemma3()
    layer = model.model.layers[0]
    assert norm_offset(layer.input_layernorm) == 1.0
    assert norm_offset(nn.LayerNorm(8)) == 0.0
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(6))
    before = _logits(model, ids)
    post = layer.post_attention_layernorm.weight.clone()
    smoothing = smooth_model(model, 0.5, [ids])
    assert {k.rsplit(".", 1)[1] for k in smoothing.scales} == set(MAPPING_NAMES)
    assert torch.equal(layer.post_attention_layernorm.weight, post)
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-4, atol=1e-4)
