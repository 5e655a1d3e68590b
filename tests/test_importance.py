"""Importance-weighted RTN: the statistics file, lower output error than RTN on a model with
outlier input channels, the checkpoint path (collected once, reused, streamed)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from test_awq import calib_ids, hidden, outlier_llama
from test_streaming import assert_same_checkpoint, make_checkpoint, run

from quantscale.algorithms.importance import (
    ImportanceRTN,
    collect_importance,
    load_importance,
    save_importance,
)
from quantscale.errors import QuantscaleError
from quantscale.orchestrator import quantize_model, targeted_linears
from quantscale.scheme import load_recipe


def test_statistics_round_trip_and_bad_files(tmp_path):
    model = outlier_llama()
    names = list(targeted_linears(model, load_recipe("W4A16")))
    stats = collect_importance(model, names, list(calib_ids().split(4)))
    assert sorted(stats) == sorted(names)
    q = stats["model.layers.0.self_attn.q_proj"]
    assert q.shape == (128,) and bool((q >= 0).all())
    assert float(q[3]) > 10 * float(q.median())  # the outlier channel stands out
    path = save_importance(tmp_path / "imp.safetensors", stats)
    loaded = load_importance(path)
    assert sorted(loaded) == sorted(stats)
    assert all(torch.equal(loaded[n], stats[n]) for n in names)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(3)}, other)
    with pytest.raises(QuantscaleError, match="expected importance statistics"):
        load_importance(other)
    with pytest.raises(QuantscaleError, match="no importance statistics file"):
        load_importance(tmp_path / "missing.safetensors")
    with pytest.raises(QuantscaleError, match=r"expected a \[128\] vector"):
        quantize_model(model, "W4A16", method="rtn-importance", importance={})


@pytest.mark.parametrize("scheme", ["W4A16", "NVFP4A16"])  # MXFP4: not lower here
def test_importance_lowers_the_output_error_against_rtn(scheme):
    ref_model = outlier_llama()
    test_ids = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(2))
    ref = hidden(ref_model, test_ids)
    names = list(targeted_linears(ref_model, load_recipe(scheme)))
    stats = collect_importance(ref_model, names, list(calib_ids().split(4)))
    errors = {}
    for method, options in (("rtn", {}), ("rtn-importance", {"importance": stats})):
        model = copy.deepcopy(ref_model)
        quantize_model(model, scheme, method=method, **options)  # no calibration data
        errors[method] = float((hidden(model, test_ids) - ref).pow(2).mean())
    assert errors["rtn-importance"] < 0.9 * errors["rtn"], errors


def test_checkpoint_collects_once_then_reuses_and_streams(tmp_path):
    root = make_checkpoint(tmp_path, layers=2)
    stats = tmp_path / "stats" / "imp.safetensors"
    with pytest.raises(QuantscaleError, match="--stream does not collect it"):
        run(root, "st0", "w4a16", "rtn", stream=True, importance=stats)
    first = run(root, "mem", "w4a16", "rtn", importance=stats)
    assert stats.is_file()
    again = run(root, "mem2", "w4a16", None, importance=stats)  # reads the file, no data
    assert_same_checkpoint(first, again)
    streamed = run(root, "st", "w4a16", "rtn", stream=True, importance=stats)
    assert_same_checkpoint(first, streamed)
    with pytest.raises(QuantscaleError, match="does not apply to --method gptq"):
        run(root, "bad", "w4a16", "gptq", importance=stats)
    assert isinstance(ImportanceRTN(stats), ImportanceRTN)
