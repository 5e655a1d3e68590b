"""AutoRound: lower layer output error than RTN on a model with outlier input channels, valid
codes that survive the export, steps=0 is RTN, the CLI / API names and the streamed path."""

from __future__ import annotations

import copy

import pytest
import torch
from test_awq import calib_ids, hidden, outlier_llama
from test_streaming import assert_same_checkpoint, make_checkpoint, run

from quantscale.algorithms import get_algorithm
from quantscale.algorithms.autoround import AutoRound, Rounding, layer_compute_dtype
from quantscale.algorithms.layer import quantize_layer
from quantscale.calibration.sequential import layer_output, layerwise
from quantscale.cli import main
from quantscale.errors import QuantscaleError
from quantscale.models.adapter import decoder_layers
from quantscale.models.quantized import load_quantized_checkpoint
from quantscale.orchestrator import GPTQOptions, quantize_model
from quantscale.qdq import dequantize, quantize
from quantscale.runtime.qlinear import replace_linears
from quantscale.scheme import load_recipe

STEPS = 40


def layer_errors(
    scheme: str, method: str, ids: torch.Tensor | None = None, **options
) -> list[float]:
    """Each decoder layer's output MSE against the float model's layer on the same inputs
    (the quantized model's own inputs, as the algorithm saw them), on held-out ids;
    calibration on `ids` (default `calib_ids()`)."""
    ref = outlier_llama()
    model = copy.deepcopy(ref)
    ids = calib_ids() if ids is None else ids
    quantize_model(model, scheme, ids, method=method, **options)
    test_ids = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(2))
    float_layers = decoder_layers(ref)[1]
    errors = []
    for step in layerwise(model, [test_ids]):
        with torch.no_grad():
            args, kwargs = step.inputs[0]
            ours = step.layer(*args, **kwargs)
            theirs = float_layers[step.index](*args, **kwargs)
        ours, theirs = (o[0] if isinstance(o, tuple) else o for o in (ours, theirs))
        errors.append(float((ours - theirs).pow(2).mean()))
    return errors


@pytest.mark.parametrize("scheme", ["W4A16", "NVFP4A16", "MXFP4A16"])
def test_autoround_lowers_the_layer_error_against_rtn(scheme):
    rtn = layer_errors(scheme, "rtn")  # the objective without the float stream
    learned = layer_errors(scheme, "autoround", steps=STEPS, float_stream=False)
    assert all(a < 0.8 * r for a, r in zip(learned, rtn)), (learned, rtn)


def test_model_output_error_and_losses():
    ids = calib_ids()
    test_ids = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(2))
    ref_model = outlier_llama()
    ref = hidden(ref_model, test_ids)
    errors = {}
    for method in ("rtn", "autoround"):
        model = copy.deepcopy(ref_model)
        options = {"steps": STEPS} if method == "autoround" else {}
        quantize_model(model, "W4A16", ids, method=method, **options)
        errors[method] = float((hidden(model, test_ids) - ref).pow(2).mean())
    assert errors["autoround"] < 0.5 * errors["rtn"], errors


def test_targets_follow_the_float_model():
    """With the float stream, each layer's targets are the float model's own layer outputs
    (on the float hidden states), not the float layer on the quantized inputs."""
    ref = outlier_llama()
    model = copy.deepcopy(ref)
    ids = list(calib_ids().split(4))
    seen: list[torch.Tensor] = []
    for layer in decoder_layers(ref)[1]:
        layer.register_forward_hook(lambda _m, _a, out: seen.append(layer_output(out)))
    with torch.no_grad():
        for batch in ids:
            ref(input_ids=batch)
    n_layers = len(decoder_layers(ref)[1])
    expected = [torch.cat(seen[i::n_layers]) for i in range(n_layers)]
    linears = replace_linears(model, load_recipe("W4A16"))
    algo = AutoRound(steps=2)
    for step in layerwise(model, ids):
        group = {n: q for n, q in linears.items() if n.startswith(f"{step.name}.")}
        quantize_layer(step, group, algo)
        assert algo._stream is not None and algo._stream[0] == step.index
        torch.testing.assert_close(torch.cat(algo._stream[1]), expected[step.index])


def test_bfloat16_layers_learn_in_bfloat16():
    model = outlier_llama()
    assert layer_compute_dtype(model) == torch.float32
    assert layer_compute_dtype(model.to(torch.float16)) == torch.float32
    ref = outlier_llama().to(torch.bfloat16)
    assert layer_compute_dtype(ref) == torch.bfloat16
    test_ids = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(2))
    errors = {}
    for method, options in (("rtn", {}), ("autoround", {"steps": STEPS})):
        model = copy.deepcopy(ref)
        quantize_model(model, "W4A16", calib_ids(), method=method, **options)
        diff = hidden(model, test_ids) - hidden(ref, test_ids)
        errors[method] = float(diff.float().pow(2).mean())
    assert errors["autoround"] < 0.5 * errors["rtn"], errors


@pytest.mark.parametrize(
    "scheme", ["W4A16", "W4A16_ASYM", "W8A16", "NVFP4A16", "MXFP4A16", "FP8_DYNAMIC"]
)
def test_zero_steps_is_rtn(scheme):
    ids = calib_ids()
    a, b = outlier_llama(), outlier_llama()
    qa = quantize_model(a, scheme, ids, method="rtn")
    qb = quantize_model(b, scheme, ids, method="autoround", steps=0)
    for name, ql in qa.items():
        assert torch.equal(ql.weight, qb[name].weight), name
        pa, pb = ql.weight_qparams(), qb[name].weight_qparams()
        assert pa is not None and pb is not None
        assert torch.equal(pa.scale, pb.scale), name


@pytest.mark.parametrize("scheme", ["W4A16", "W4A16_ASYM", "NVFP4A16", "MXFP4A16", "W8A16"])
def test_codes_are_valid(scheme):
    model = outlier_llama()
    linears = quantize_model(model, scheme, calib_ids(), method="autoround", steps=10)
    rtn = quantize_model(outlier_llama(), scheme, calib_ids(), method="rtn")
    changed = 0
    for name, ql in linears.items():
        args, qp = ql.scheme.weights, ql.weight_qparams()
        assert args is not None and qp is not None
        codes = quantize(ql.weight, args, qp)
        assert torch.equal(dequantize(codes, args, qp, ql.weight.dtype), ql.weight), name
        changed += int(not torch.equal(ql.weight, rtn[name].weight))
    if scheme != "W8A16":  # int8: 10 coarse steps do not beat RTN, which is then kept
        assert changed > len(linears) // 2  # the rounding really moved


def test_export_round_trip(tmp_path):
    import quantscale as qs

    model = outlier_llama()
    out = tmp_path / "w4"
    qs.quantize(
        model,
        out,
        scheme="W4A16",
        method="autoround",
        calibration=calib_ids(),
        gptq=GPTQOptions(autoround_steps=10),
    )
    loaded = load_quantized_checkpoint(out, torch.float32)
    mods = dict(loaded.named_modules())
    for name, ql in model.named_modules():
        if hasattr(ql, "weight_qparams") and ql.weight_qparams() is not None:
            assert torch.equal(mods[name].weight, ql.weight.float()), name


def test_clip_factors_and_offsets_stay_in_range():
    model = outlier_llama()
    linears = replace_linears(model, load_recipe("W4A16"))
    algo = AutoRound(steps=STEPS, lr=0.2)  # a large lr: the ranges bind
    seen: list[Rounding] = []
    original = algo._roundings

    def keep(step, group):
        out = original(step, group)
        seen.extend(out)
        return out

    algo._roundings = keep  # type: ignore[method-assign]
    for step in layerwise(model, list(calib_ids().split(4))):
        group = {n: q for n, q in linears.items() if n.startswith(f"{step.name}.")}
        algo.prepare_layer(step, group, step.run)
    assert seen
    for r in seen:
        assert r.v.abs().max() <= 0.5
        assert r.a is not None and r.b is not None
        assert r.a.min() >= 0.5 and r.b.max() <= 1.0
    assert any(float(r.v.detach().abs().max()) == 0.5 for r in seen)
    assert all(best <= first for first, best in algo.losses.values()), algo.losses


def test_names_options_and_refusals():
    assert isinstance(get_algorithm("autoround"), AutoRound)
    assert get_algorithm("autoround", steps=50).lr == pytest.approx(1 / 50)
    combined = get_algorithm("awq+autoround", steps=5)
    assert isinstance(combined.rounding, AutoRound) and not combined.scales.clip
    assert GPTQOptions(autoround_steps=7).method_options("autoround") == {"steps": 7, "lr": None}
    with pytest.raises(QuantscaleError, match="steps"):
        AutoRound(steps=-1)
    with pytest.raises(QuantscaleError, match="lr"):
        AutoRound(lr=0)
    with pytest.raises(QuantscaleError, match="calibration batches"):
        quantize_model(outlier_llama(), "W4A16", None, method="autoround")


def test_awq_then_autoround_beats_rtn():
    ids = calib_ids()
    test_ids = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(2))
    ref_model = outlier_llama()
    ref = hidden(ref_model, test_ids)
    errors = {}
    for method, options in (("rtn", {}), ("awq+autoround", {"steps": STEPS})):
        model = copy.deepcopy(ref_model)
        quantize_model(model, "W4A16", ids, method=method, **options)
        errors[method] = float((hidden(model, test_ids) - ref).pow(2).mean())
    assert errors["awq+autoround"] < 0.5 * errors["rtn"], errors


def test_cli_end_to_end_and_streamed_equals_in_memory(tmp_path):
    root = make_checkpoint(tmp_path, layers=2)
    out = root / "cli"
    argv = ["quantize", str(root / "m"), str(out), "--scheme", "W4A16", "--method", "autoround"]
    argv += ["--autoround-steps", "5", "--calib-data", str(root / "calib.txt")]
    argv += ["--calib-samples", "8", "--calib-seq-len", "32", "--group-size", "32"]
    assert main(argv) == 0
    assert (out / "config.json").is_file()
    options = GPTQOptions(autoround_steps=5)
    mem = run(root, "mem", "w4a16", "autoround", gptq=options)
    streamed = run(root, "st", "w4a16", "autoround", stream=True, gptq=options)
    assert_same_checkpoint(mem, streamed)


def test_on_top_of_the_hadamard_rotation():
    def logits(model: torch.nn.Module) -> torch.Tensor:  # rotation-invariant, unlike hidden
        with torch.no_grad():
            return model(input_ids=test_ids).logits

    test_ids = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(2))
    ref_model = outlier_llama()
    ref = logits(ref_model)
    errors = {}
    for method, options in (("rtn", {}), ("autoround", {"steps": STEPS})):
        model = copy.deepcopy(ref_model)
        recipe = load_recipe("W4A16")
        recipe.rotate = "hadamard"
        quantize_model(model, recipe, calib_ids(), method=method, **options)
        errors[method] = float((logits(model) - ref).pow(2).mean())
    assert errors["autoround"] < 0.7 * errors["rtn"], errors
