"""AWQ: scales folded without changing the float model, lower output error than RTN on a
model with an outlier input channel, clipping, the CLI / API names and the streamed path."""

from __future__ import annotations

import copy

import pytest
import torch
from test_streaming import assert_same_checkpoint, make_checkpoint, run
from tiny_models import make_tiny_llama

from quantscale.algorithms import get_algorithm
from quantscale.algorithms.awq import AWQ, AWQScales, awq_scales, clip_search, output_error
from quantscale.calibration.sequential import layerwise
from quantscale.errors import QuantscaleError
from quantscale.models.adapter import decoder_layers
from quantscale.orchestrator import GPTQOptions, quantize_model
from quantscale.runtime.qlinear import replace_linears
from quantscale.scheme import load_recipe

OUTLIERS = (3, 17, 40)


def outlier_llama() -> torch.nn.Module:
    """The tiny Llama with input channels OUTLIERS of every norm scaled up 30x: the q/k/v
    and gate/up inputs have a few large channels (as real LLMs do)."""
    model = make_tiny_llama(hidden_size=128, intermediate_size=256)
    with torch.no_grad():
        for layer in decoder_layers(model)[1]:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[list(OUTLIERS)] *= 30.0
    return model


def calib_ids() -> torch.Tensor:
    return torch.randint(0, 128, (8, 48), generator=torch.Generator().manual_seed(1))


def hidden(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.model(input_ids=ids).last_hidden_state


def test_awq_scales_formula():
    x = torch.tensor([4.0, 1.0, 0.25, 0.0])
    assert torch.equal(awq_scales(x, 0.0), torch.ones(4))
    s = awq_scales(x, 1.0)
    assert s[3] == 1.0  # dead channel
    assert torch.allclose(s[:3], torch.tensor([4.0, 1.0, 0.25]))  # geometric mean 1
    assert torch.allclose(awq_scales(x, 0.5)[:3], torch.tensor([2.0, 1.0, 0.5]))


def test_folded_scales_keep_the_float_outputs():
    model = outlier_llama()
    ids = calib_ids()
    ref = hidden(model, ids)
    linears = replace_linears(model, load_recipe("W4A16"))
    prefix, layers = decoder_layers(model)
    scales = AWQScales(clip=False)
    for step in layerwise(model, list(ids.split(4))):
        group = {n: q for n, q in linears.items() if n.startswith(f"{step.name}.")}
        scales.prepare(step, group, step.run)
    chosen = [a for layer in scales.chosen.values() for a in layer.values()]
    assert len(chosen) == 2 * 4 and any(a > 0 for a in chosen)  # scales really applied
    norm = layers[0].input_layernorm.weight
    assert not torch.allclose(norm[list(OUTLIERS)], torch.full((3,), 30.0))
    torch.testing.assert_close(hidden(model, ids), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ["W4A16", "NVFP4A16"])
def test_awq_lowers_the_output_error_against_rtn(scheme):
    ids = calib_ids()
    test_ids = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(2))
    ref_model = outlier_llama()
    ref = hidden(ref_model, test_ids)
    errors = {}
    for method in ("rtn", "awq", "gptq", "awq+gptq"):
        model = copy.deepcopy(ref_model)
        quantize_model(model, scheme, ids, method=method)
        errors[method] = float((hidden(model, test_ids) - ref).pow(2).mean())
    assert errors["awq"] < 0.8 * errors["rtn"], errors
    assert errors["awq+gptq"] < errors["gptq"], errors


def test_clip_search_lowers_the_error_and_keeps_ratio_one_when_best():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen)
    w = torch.randn(32, 64, generator=gen)
    w[:, 5] *= 8.0  # one large column: clipping its groups trades range for resolution
    args = load_recipe("W4A16").config_groups["group_0"].weights
    assert args is not None
    args = args.model_copy(update={"group_size": 16})
    from quantscale.algorithms.rtn import rtn_weight

    def error(weight: torch.Tensor) -> float:
        return float((x @ (rtn_weight(weight, args)[0] - w).T).pow(2).mean())

    clipped = clip_search(w, args, output_error(x))
    assert error(clipped) <= error(w)
    assert clipped.abs().amax() <= w.abs().amax()
    only_one = clip_search(w, args, output_error(x), grid=(1.0,))
    assert torch.equal(only_one, w)


def test_names_options_and_refusals():
    assert isinstance(get_algorithm("awq"), AWQ)
    combined = get_algorithm("AWQ+GPTQ", dampening_frac=0.02)
    assert isinstance(combined, AWQ) and not combined.scales.clip
    assert get_algorithm("awq").scales.clip
    assert GPTQOptions().method_options("awq+gptq")["dampening_frac"] == 0.01
    assert GPTQOptions().method_options("awq") == {}
    with pytest.raises(QuantscaleError, match="expected rtn, gptq or autoround"):
        AWQ(rounding="awq")
    with pytest.raises(QuantscaleError, match="calibration batches"):
        quantize_model(make_tiny_llama(), "W4A16", None, method="awq")


def test_api_and_cli_name(tmp_path):
    import quantscale as qs
    from quantscale.cli import build_parser

    model = outlier_llama()
    out = qs.quantize(model, scheme="W4A16", method="awq", calibration=calib_ids())
    assert out is model
    argv = ["quantize", "m", "o", "--scheme", "W4A16", "--method", "awq+gptq"]
    args = build_parser().parse_args(argv)
    assert args.method == "awq+gptq"


def test_streamed_equals_in_memory(tmp_path):
    root = make_checkpoint(tmp_path, layers=2)
    mem = run(root, "mem", "w4a16", "awq")
    streamed = run(root, "st", "w4a16", "awq", stream=True)
    assert_same_checkpoint(mem, streamed)
