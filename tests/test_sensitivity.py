"""Per-layer sensitivity and mixed precision on a tiny Llama."""

from __future__ import annotations

import pytest
import torch

from quantscale.analysis.sensitivity import (
    LayerSensitivity,
    _Probe,
    layer_sensitivity,
    mixed_precision,
)
from quantscale.analysis.sweep import Setting, calibrate_shared
from quantscale.eval.scoring import final_hidden
from quantscale.orchestrator import quantize_with_scales, restore_linears
from quantscale.runtime.qlinear import QuantLinear
from quantscale.scheme import load_recipe, preset_scheme


def _ids(n: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_probe_suffix_reproduces_the_model(tiny_llama):
    probe = _Probe(tiny_llama, _ids(2, 16, 1))
    for i in range(2):
        assert torch.allclose(probe.run_from(i), probe.reference, atol=1e-5)


def test_output_mse_equals_quantizing_that_module_alone(tiny_llama):
    recipe = load_recipe("W8A8")
    calib, probe_ids = list(_ids(4, 16, 0).split(2)), _ids(2, 16, 1)
    results = layer_sensitivity(tiny_llama, recipe, calib, probe_ids)
    assert len(results) == 14 and not any(isinstance(m, QuantLinear) for m in tiny_llama.modules())
    assert all(r.output_mse > 0 and 10 < r.sqnr_db < 80 for r in results)
    target = "model.layers.1.mlp.down_proj"
    only = recipe.model_copy(
        update={"config_groups": {}, "overrides": {target: recipe.config_groups["group_0"]}}
    )
    qps = calibrate_shared(tiny_llama, [Setting("s", recipe)], calib)["s"]
    originals = quantize_with_scales(tiny_llama, only, qps)
    assert list(originals) == [target]
    with torch.inference_mode():
        out = final_hidden(tiny_llama, probe_ids)
        restore_linears(tiny_llama, originals)
        reference = final_hidden(tiny_llama, probe_ids)
    mse = float((out - reference).pow(2).mean())
    reported = next(r for r in results if r.name == target).output_mse
    assert reported == pytest.approx(mse, rel=1e-4)


def _fake(names_mse_params):
    return [LayerSensitivity(n, p, 30.0, m, 20.0) for n, m, p in names_mse_params]


def test_mixed_precision_budgets():
    results = _fake([("a", 1.0, 100), ("b", 5.0, 300), ("c", 3.0, 100), ("d", 0.5, 500)])
    recipe = load_recipe("W8A8")
    mixed, chosen = mixed_precision(results, recipe, 2)
    assert [r.name for r in chosen] == ["b", "c"]
    assert mixed.scheme_for("b") is None and mixed.scheme_for("a") is not None
    high = preset_scheme("W8A16")
    mixed, chosen = mixed_precision(results, recipe, 0.25, high)  # 250 of 1000 params
    assert [r.name for r in chosen] == ["c", "a"]  # b (300) does not fit
    assert mixed.scheme_for("c").input_activations is None
    assert mixed.scheme_for("b").input_activations is not None
