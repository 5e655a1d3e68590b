"""Quamba2's weight side on tiny Mamba / Mamba2 models: int4 projections (RTN or GPTQ),
W4A8 / W4A16, and the mixed W4A8 / W4A16 chosen by a block sensitivity scan."""

from __future__ import annotations

import pytest
import torch
from test_mamba_quant import MAKERS, VOCAB, _batches, _ids, _logits

from quantscale.mamba.evaluate import mamba_sweep_settings
from quantscale.mamba.mixers import ACTIVATION_POINTS, MambaRecipe
from quantscale.mamba.quamba import act_key
from quantscale.mamba.quantize import (
    block_sensitivity,
    load_quantized,
    quantize_mamba,
    quantized_mixers,
    save_quantized,
    set_mode,
)

GROUP = 16  # the tiny models' inputs are 32 / 64 wide: 2 / 4 groups
PROJECTIONS = {"mamba": ("in_proj", "x_proj", "out_proj"), "mamba2": ("in_proj", "out_proj")}


def _recipe(**fields) -> MambaRecipe:
    base = {"method": "quamba2", "head_groups": 2, "channel_groups": 2, "weight_bits": 4}
    return MambaRecipe(**{**base, "weight_group_size": GROUP, **fields})


def _w4(kind: str, **fields) -> torch.nn.Module:
    return quantize_mamba(MAKERS[kind](), _batches(), _recipe(**fields))


@torch.no_grad()
def _mixer_output_error(model, float_model, ids: torch.Tensor) -> float:
    """Squared error of block 0's mixer output (both models get the same block input)."""
    seen = {}
    block = float_model.backbone.layers[0]
    handle = block.mixer.register_forward_pre_hook(lambda _m, args: seen.update(h=args[0]))
    float_model(input_ids=ids, use_cache=False)
    handle.remove()
    reference = block.mixer(seen["h"])
    return float((model.backbone.layers[0].mixer(seen["h"]) - reference).pow(2).sum())


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_gptq_w4a16_lowers_output_error_against_rtn(kind):
    float_model = MAKERS[kind]()
    rtn = _w4(kind, activation_bits=16, weight_method="rtn")
    gptq = _w4(kind, activation_bits=16, weight_method="gptq")
    ids = torch.cat(_batches())
    assert _mixer_output_error(gptq, float_model, ids) < 0.8 * _mixer_output_error(
        rtn, float_model, ids
    )
    reference = _logits(float_model, ids)
    rtn_err = (_logits(rtn, ids) - reference).pow(2).sum()
    assert (_logits(gptq, ids) - reference).pow(2).sum() < rtn_err
    for mixer in quantized_mixers(gptq).values():  # W4A16: activations, conv1d float
        assert len(mixer.acts) == 0 and mixer.conv1d.weight.dtype == torch.float32


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_w4a8_int4_codes_and_static_int8_activation_scales(kind, method, tmp_path):
    model = _w4(kind, weight_method=method)
    for mixer in quantized_mixers(model).values():
        for name in PROJECTIONS[kind]:
            linear = getattr(mixer, name)
            w = linear.weight
            assert w.dtype == torch.int8 and int(w.min()) >= -8 and int(w.max()) <= 7
            assert len(w.unique()) > 8  # the int4 range is used, not a coarser one
            assert linear.weight_scale.shape == (w.shape[0], w.shape[1] // GROUP)
        assert int(mixer.conv1d.weight.abs().max()) > 7  # conv1d stays INT8
        for point in ACTIVATION_POINTS[kind]:
            scale = mixer.acts[act_key(point)].scale
            assert torch.isfinite(scale).all() and (scale > 0).all() and not (scale == 1).all()
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("scale")}
    ids = _ids(7)
    out = _logits(model, ids)
    after = {k: v for k, v in model.state_dict().items() if k.endswith("scale")}
    assert all(torch.equal(before[k], after[k]) for k in before)  # static: no run-time stats
    set_mode(model, "fake")  # the grouped INT8 matmuls equal the dequantized reference
    torch.testing.assert_close(out, _logits(model, ids), atol=2e-4, rtol=1e-4)
    set_mode(model, "int8")
    loaded = load_quantized(save_quantized(model, tmp_path / "q"))
    torch.testing.assert_close(_logits(loaded, ids), out, atol=0, rtol=0)


def _pattern(seed: int, batch: int = 2, length: int = 40) -> torch.Tensor:
    """Token ids where each next token is 3 * token + 1 (mod VOCAB): learnable in few steps."""
    start = torch.randint(0, VOCAB, (batch, 1), generator=torch.Generator().manual_seed(seed))
    steps = torch.arange(length)
    ids = [start]
    for _ in steps[1:]:
        ids.append((ids[-1] * 3 + 1) % VOCAB)
    return torch.cat(ids, dim=1)


def _trained(kind: str, layers: int = 3, steps: int = 60) -> torch.nn.Module:
    """A tiny model trained on `_pattern` ids (its loss then means something)."""
    from transformers import AutoModelForCausalLM

    config = MAKERS[kind]().config
    config.num_hidden_layers = layers
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        ids = _pattern(step, batch=8)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _outlier_block(model, block: int) -> None:
    """Give block `block`'s in_proj input one channel 64x larger, its in_proj weight column
    64x smaller: the float model is unchanged, the block's static INT8 input scale is not."""
    layer = model.backbone.layers[block]
    with torch.no_grad():
        layer.norm.weight[0] *= 64
        layer.mixer.in_proj.weight[:, 0] /= 64


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_mixed_keeps_the_blocks_the_scan_ranks_most_sensitive(kind):
    model = _trained(kind)
    _outlier_block(model, 1)
    recipe = _recipe(weight_method="gptq")
    batches = [_pattern(100 + i) for i in range(3)]
    scores = block_sensitivity(model, batches, recipe)
    assert set(scores) == {0, 1, 2} and max(scores, key=scores.__getitem__) == 1
    quantize_mamba(model, batches, recipe.model_copy(update={"a16_budget": 1}))
    qcfg = model.config.quantization_config
    assert qcfg["recipe"]["a16_layers"] == [1]
    assert qcfg["block_sensitivity"] == pytest.approx({str(i): v for i, v in scores.items()})
    mixers = quantized_mixers(model)
    assert len(mixers[1].acts) == 0 and all(len(mixers[i].acts) for i in (0, 2))
    assert _logits(model, _ids(3)).shape[-1] == VOCAB


def test_w4_settings_are_named():
    settings = mamba_sweep_settings()
    for scheme, act_bits in (("W4A8", 8), ("W4A16", 16)):
        for method in ("rtn", "gptq"):
            recipe = settings[f"quamba2-{scheme}-{method}"]
            assert recipe is not None and recipe.weight_bits == 4
            assert (recipe.activation_bits, recipe.weight_method) == (act_bits, method)
    mixed = settings["quamba2-W4A8-W4A16-gptq"]
    assert mixed is not None and mixed.a16_budget == 1 and mixed.weight_group_size == 128


def test_quantize_command_w4_schemes(tmp_path):
    """`quantscale quantize DIR OUT --scheme W4A16 --method gptq` writes a Quamba checkpoint
    with int4 GPTQ projections that reloads to the same outputs as the model it came from."""
    from test_mamba_quant import _tiny_checkpoint

    from quantscale import cli
    from quantscale.mamba.fixtures import load_mamba
    from quantscale.mamba.quantize import calibration_token_batches, scheme_recipe

    model_dir, calib, tokens = _tiny_checkpoint(tmp_path)
    calib_args = ["--calib-samples", "6", "--calib-seq-len", "32", "--calib-data", str(calib)]
    out = tmp_path / "w4"
    argv = ["quantize", str(model_dir), str(out), "--scheme", "W4A16", "--method", "gptq"]
    assert cli.main([*argv, *calib_args]) == 0
    loaded = load_quantized(out)
    recipe = MambaRecipe.model_validate(loaded.config.quantization_config["recipe"])
    assert (recipe.weight_bits, recipe.activation_bits, recipe.weight_method) == (4, 16, "gptq")
    model, tokenizer = load_mamba(str(model_dir))
    recipe = scheme_recipe("W4A16", "gptq").with_options(n_samples=6, seq_len=32)
    quantize_mamba(model, calibration_token_batches(tokenizer, recipe, str(calib)), recipe)
    ids = tokens[None, :64]
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=0, rtol=0)


def test_gptq_on_quantized_inputs_uses_the_int8_round_trip(monkeypatch):
    """gptq_inputs: quantized feeds GPTQ the static INT8 round trip of each projection's
    input (what the W4A8 matmul multiplies), not the float input."""
    import quantscale.mamba.quamba as quamba

    seen = []
    real = quamba.gptq_quantize
    monkeypatch.setattr(
        quamba, "gptq_quantize", lambda w, h, args: seen.append(h.clone()) or real(w, h, args)
    )
    models = [_w4("mamba", weight_method="gptq", gptq_inputs=g) for g in ("float", "quantized")]
    n = len(seen) // 2
    assert n == 2 * 3  # 2 blocks x (in_proj, x_proj, out_proj)
    for h_float, h_quant in zip(seen[:n], seen[n:]):
        assert not torch.equal(h_float, h_quant)
        torch.testing.assert_close(
            h_quant, h_float, rtol=0.2, atol=0.2 * float(h_float.abs().max())
        )
    w = [quantized_mixers(m)[0].in_proj.weight for m in models]
    assert not torch.equal(w[0], w[1]) and int(w[1].abs().max()) <= 8
