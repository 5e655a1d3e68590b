"""Sweeps on a tiny Llama: settings, shared vs layerwise calibration, restore, table, plot."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantscale.analysis.sweep import (
    BASELINE,
    build_settings,
    calibrate_shared,
    markdown_table,
    plot,
    run_sweep,
)
from quantscale.eval.perplexity import perplexity
from quantscale.runtime.qlinear import QuantLinear


def _data(n: int = 4, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def _ppl(model: nn.Module) -> dict[str, float]:
    return {"ppl": perplexity(model, _data(4, 32, seed=7).flatten(), seq_len=32)}


def test_build_settings_names_and_recipes(tiny_llama):
    settings = build_settings(
        tiny_llama, "W8A8", "percentile", alphas=[0.99, 1.0], per_channel=True, first_last=True
    )
    names = [s.name for s in settings]
    assert names[0] == BASELINE and settings[0].recipe is None
    assert names[1:3] == ["W8A8 alpha=0.99", "W8A8 alpha=1"]
    acts = settings[1].recipe.scheme_for("model.layers.0.mlp.up_proj").input_activations
    assert acts.observer == "percentile" and acts.observer_kwargs == {"alpha": 0.99}
    pc = settings[3].recipe.scheme_for("model.layers.0.mlp.up_proj").input_activations
    assert pc.strategy == "channel" and pc.observer == "percentile" and not pc.observer_kwargs
    first = settings[4].recipe
    assert first.scheme_for("model.layers.0.mlp.up_proj") is None
    assert first.scheme_for("model.layers.1.mlp.up_proj") is not None
    both = settings[6].recipe
    assert both.scheme_for("model.layers.1.self_attn.q_proj") is None


def test_shared_calibration_matches_pipeline_for_the_first_layer(tiny_llama):
    """Layer 0 sees float inputs in both modes, so its static scales agree exactly."""
    settings = build_settings(
        tiny_llama, "W8A8", observers=["minmax", "percentile"], baseline=False
    )
    data = _data()
    shared = calibrate_shared(tiny_llama, settings, list(data.split(2)))
    mm = shared["W8A8 minmax"][("model.layers.0.self_attn.q_proj", "input")].scale
    pct = shared["W8A8 percentile"][("model.layers.0.self_attn.q_proj", "input")].scale
    assert pct < mm
    from quantscale.orchestrator import quantize_model

    quantize_model(tiny_llama, settings[0].recipe, data, batch_size=2)
    assert torch.equal(tiny_llama.model.layers[0].self_attn.q_proj.input_scale, mm)


@pytest.mark.parametrize("mode", ["shared", "layerwise"])
def test_run_sweep_restores_the_float_model(tiny_llama, mode, tmp_path):
    ref = _ppl(tiny_llama)["ppl"]
    settings = build_settings(tiny_llama, "W8A8", alphas=[0.9, 1.0], observer="percentile")
    rows = run_sweep(tiny_llama, settings, _data(), _ppl, mode=mode, batch_size=2)
    assert [r.setting for r in rows] == [s.name for s in settings]
    assert rows[0].metrics["ppl"] == pytest.approx(ref) and rows[0].delta_pct["ppl"] == 0.0
    assert all(r.metrics["ppl"] != ref for r in rows[1:])
    assert not any(isinstance(m, QuantLinear) for m in tiny_llama.modules())
    assert _ppl(tiny_llama)["ppl"] == pytest.approx(ref)
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "alpha=0.9" in table
    png = plot(rows, tmp_path / "s.png", "t")
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("mode", ["shared", "layerwise"])
def test_smoothing_settings_run_and_are_undone(tiny_llama, mode):
    params = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    settings = build_settings(
        tiny_llama, "W8A8", observers=["minmax"], smooth=["0.5", "down=0.8"], baseline=False
    )
    names = [s.name for s in settings]
    assert names == ["W8A8 minmax", "W8A8 minmax smooth=0.5", "W8A8 minmax smooth=down=0.8"]
    assert settings[1].smooth == "0.5" and settings[1].value == 0.5
    rows = run_sweep(tiny_llama, settings, _data(), _ppl, mode=mode, batch_size=2)
    assert [r.setting for r in rows] == names
    assert len({r.metrics["ppl"] for r in rows}) == 3  # smoothing changed the quantized model
    for k, v in tiny_llama.state_dict().items():
        assert torch.equal(v, params[k]), k


def test_sigma_warmup_setting_reaches_the_observer(tiny_llama):
    """--sigma-warmup N: one setting whose EMA observer ramps its momentum over N batches
    (the same observer option as on the Mamba sweep), calibrating to other scales."""
    settings = build_settings(tiny_llama, "W8A8", "ema", sigmas=[0.1], sigma_warmup=3)
    assert [s.name for s in settings[1:]] == ["W8A8 sigma=0.1", "W8A8 sigma-warmup=3"]
    acts = settings[2].recipe.scheme_for("model.layers.0.mlp.up_proj").input_activations
    assert acts.observer == "ema" and acts.observer_kwargs == {"sigma_warmup": 3}
    plain = build_settings(tiny_llama, "W8A8", "ema", baseline=False)
    shared = calibrate_shared(tiny_llama, [plain[0], settings[2]], list(_data(8).split(2)))
    key = ("model.layers.0.self_attn.q_proj", "input")
    assert not torch.equal(shared["W8A8 ema"][key].scale, shared["W8A8 sigma-warmup=3"][key].scale)


def test_new_observers_calibrate_the_llm_sweep(tiny_llama):
    """max_entropy and percentile_mse (the Mamba sweep's settings) work as --observers here:
    max-entropy clips below min-max, the MSE-chosen percentile never exceeds it."""
    names = ["percentile_mse", "max_entropy", "minmax"]
    settings = build_settings(tiny_llama, "W8A8", observers=names, baseline=False)
    shared = calibrate_shared(tiny_llama, settings, list(_data(8).split(2)))
    key = ("model.layers.0.self_attn.q_proj", "input")
    mse, ent, mm = (float(shared[f"W8A8 {n}"][key].scale) for n in names)
    assert 0 < ent < mm and 0 < mse <= mm
