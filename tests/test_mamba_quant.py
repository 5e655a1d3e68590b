"""Quamba-style static INT8 quantization of tiny Mamba / Mamba2 models built from configs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from quantscale.errors import CheckpointError, QuantscaleError
from quantscale.mamba.grouping import plan_channels, plan_heads
from quantscale.mamba.mixers import (
    MambaRecipe,
    PointRule,
    mamba_kind,
    mixer_shape,
    reorder_mixer,
    resolve_points,
)
from quantscale.mamba.quamba import QMamba2Mixer, QMambaMixer, quantized_mixer
from quantscale.mamba.quantize import load_quantized, quantize_mamba, save_quantized, set_mode

VOCAB = 64


def _mamba1():
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8)
    return MambaForCausalLM(cfg).eval()


def _mamba2():
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    cfg = Mamba2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        state_size=8,
        expand=2,
        head_dim=8,
        num_heads=8,
        n_groups=2,
        chunk_size=16,
    )
    return Mamba2ForCausalLM(cfg).eval()


MAKERS = {"mamba": _mamba1, "mamba2": _mamba2}


def _ids(seed: int, batch: int = 2, length: int = 40) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _batches() -> list[torch.Tensor]:
    return [_ids(100 + i) for i in range(3)]


@torch.no_grad()
def _logits(model, ids, mask=None) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _quantized(kind: str, **recipe) -> torch.nn.Module:
    model = MAKERS[kind]()
    recipe = {"head_groups": 2, "channel_groups": 2, **recipe}
    return quantize_mamba(model, _batches(), MambaRecipe(**recipe))


def _scales(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("scale")}


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_float_mixer_matches_transformers(kind):
    model = MAKERS[kind]()
    ids = _ids(0)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # right padding, as the cloze evaluation batches
    ref, ref_masked = _logits(model, ids), _logits(model, ids, mask)
    specs = resolve_points(kind, MambaRecipe(), 10**6)
    for layer in model.backbone.layers:
        layer.mixer = quantized_mixer(layer.mixer, kind, specs)
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(model, ids, mask), ref_masked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_reorder_invariance(kind):
    """Permuting channels / heads and the weights to match leaves float outputs unchanged."""
    model = MAKERS[kind]()
    ids = _ids(1)
    ref = _logits(model, ids)
    gen = torch.Generator().manual_seed(3)
    for layer in model.backbone.layers:
        shape = mixer_shape(layer.mixer, kind)
        if kind == "mamba":
            plan = plan_channels(torch.rand(shape["inner"], generator=gen), 2, 2)
        else:
            per_group = shape["heads"] // shape["ssd_groups"]
            stats = torch.rand(shape["ssd_groups"], per_group, shape["head_dim"], generator=gen)
            stats += 5 * torch.arange(per_group, 0, -1)[None, :, None]  # descending heads
            plan = plan_heads(stats, 2, 2)
            assert not torch.equal(plan.head_perm, torch.arange(shape["heads"]))
        assert not torch.equal(plan.perm, torch.arange(plan.perm.numel()))
        reorder_mixer(layer.mixer, kind, plan)
    out = _logits(model, ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
@pytest.mark.parametrize("method", ["quamba1", "quamba2"])
def test_int8_matches_fake_quant_and_is_close_to_float(kind, method):
    ref_model = MAKERS[kind]()
    ids = _ids(7)
    ref = _logits(ref_model, ids)
    model = _quantized(kind, method=method)
    calls = []
    real_int_mm = torch._int_mm

    def counting_int_mm(a, b):
        calls.append(tuple(a.shape))
        return real_int_mm(a, b)

    torch._int_mm = counting_int_mm
    try:
        q = _logits(model, ids)
        n_int8 = len(calls)
        set_mode(model, "fake")
        fake = _logits(model, ids)
    finally:
        torch._int_mm = real_int_mm
        set_mode(model, "int8")
    assert n_int8 > 0 and len(calls) == n_int8  # only the int8 mode uses INT8 matmuls
    torch.testing.assert_close(q, fake, atol=1e-4, rtol=1e-4)
    assert not torch.equal(q, ref)
    assert torch.nn.functional.cosine_similarity(q.flatten(), ref.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_static_scales_do_not_depend_on_inputs(kind):
    model = _quantized(kind, method="quamba2")
    before = _scales(model)
    a, b = _ids(11, batch=1), _ids(12, batch=1)
    alone = _logits(model, a)
    batched = _logits(model, torch.cat([a, 50 * torch.ones_like(b)]))  # an odd neighbour
    _logits(model, b * 0 + 3)
    after = _scales(model)
    assert before.keys() == after.keys() and len(before) > 0
    assert all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
@pytest.mark.parametrize("method", ["quamba1", "quamba2"])
def test_save_load_round_trip(kind, method, tmp_path):
    model = _quantized(kind, method=method)
    ids = _ids(21)
    expected = _logits(model, ids)
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=0, rtol=0)
    original, reloaded = _scales(model), _scales(loaded)
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    assert all(v.dtype == torch.float32 for v in reloaded.values())
    int8 = [k for k, v in loaded.state_dict().items() if v.dtype == torch.int8]
    assert any(k.endswith("in_proj.weight") for k in int8)
    assert any(k.endswith("conv1d.weight") for k in int8)


def test_piecewise_scale_counts():
    model = _quantized("mamba2", method="quamba2", head_groups=4, channel_groups=4)
    state = model.state_dict()
    prefix = "backbone.layers.0.mixer.acts."
    assert state[prefix + "ssm_x.scale"].shape == (2 * 4 * 4,)  # SSD groups x heads x channels
    assert state[prefix + "ssm_B.scale"].shape == (2,)  # one per SSD group
    assert state[prefix + "in_proj_input.scale"].shape == (1,)
    model1 = _quantized("mamba", method="quamba1")
    assert model1.state_dict()[prefix + "ssm_x.scale"].shape == (1,)


def test_piecewise_reorders_to_contiguous_groups():
    model = _quantized("mamba2", method="quamba2")
    mixer = model.backbone.layers[0].mixer
    gid = mixer.act("ssm.x").group_id.reshape(mixer.num_heads, mixer.head_dim)
    assert (gid.diff(dim=-1) >= 0).all()


def test_point_overrides_and_float_layers():
    recipe = MambaRecipe(
        points={
            "conv1d.weight": PointRule(quantize=False),
            "conv1d.input": PointRule(quantize=False),
        },
        float_layers=[-1],
    )
    model = quantize_mamba(_mamba1(), _batches(), recipe)
    first, last = (layer.mixer for layer in model.backbone.layers)
    assert isinstance(first, QMambaMixer) and not isinstance(last, QMambaMixer)
    assert first.act("conv1d.input") is None and first.conv1d.weight.dtype == torch.float32
    assert first.in_proj.weight.dtype == torch.int8
    assert model.config.quantization_config["quantized_layers"] == [0]


def test_quamba1_defaults():
    specs = resolve_points("mamba", MambaRecipe(), n_params=10**6)
    assert specs["ssm.x"].observer == "percentile"
    assert dict(specs["ssm.x"].observer_kwargs)["alpha"] == 0.99999
    assert dict(resolve_points("mamba", MambaRecipe(), 10**9)["ssm.x"].observer_kwargs)[
        "alpha"
    ] == pytest.approx(0.9995)
    assert specs["in_proj.input"].observer == "minmax" and specs["conv1d.input"].quantize
    assert not specs["norm.weight"].quantize
    assert (MambaRecipe().n_samples, MambaRecipe().seq_len) == (512, 512)
    q2 = resolve_points("mamba2", MambaRecipe(method="quamba2"), 10**6)
    assert q2["ssm.x"].piecewise and q2["ssm.B"].piecewise and not q2["ssm.z"].piecewise


def test_errors():
    with pytest.raises(QuantscaleError, match="unknown mamba quantization point"):
        resolve_points("mamba", MambaRecipe(points={"x_proj.output": PointRule()}), 1)
    with pytest.raises(QuantscaleError, match="cannot have piecewise"):
        resolve_points("mamba", MambaRecipe(points={"ssm.z": PointRule(piecewise=True)}), 1)
    with pytest.raises(QuantscaleError, match="model_type"):
        mamba_kind(SimpleNamespace(model_type="llama"))
    model = _quantized("mamba")
    with pytest.raises(QuantscaleError, match="frozen"):
        set_mode(model, "float")


def test_load_rejects_other_checkpoints(tmp_path):
    model = _mamba2()
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="quant_method"):
        load_quantized(tmp_path / "plain")


def test_mamba2_mixer_class():
    model = _quantized("mamba2")
    assert all(isinstance(layer.mixer, QMamba2Mixer) for layer in model.backbone.layers)


def test_point_sqnr_reports_every_quantized_activation():
    from quantscale.mamba.evaluate import point_sqnr
    from quantscale.mamba.mixers import ACTIVATION_POINTS

    model = _quantized("mamba2", method="quamba2")
    before = _logits(model, _ids(5))
    sqnr = point_sqnr(model, [_ids(5)])
    assert set(sqnr) == set(ACTIVATION_POINTS["mamba2"])
    assert all(10 < v < 80 for v in sqnr.values())
    assert all(layer.mixer.error_stats is None for layer in model.backbone.layers)
    torch.testing.assert_close(_logits(model, _ids(5)), before, atol=0, rtol=0)


def _tiny_checkpoint(root) -> tuple:
    """A tiny random Mamba checkpoint with a BPE tokenizer trained on a small text file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MambaConfig, MambaForCausalLM, PreTrainedTokenizerFast

    text = " ".join(f"the fox {i} jumps over the dog by river {i % 7}." for i in range(300))
    calib = root / "calib.txt"
    calib.write_text(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, state_size=8)
    MambaForCausalLM(cfg).save_pretrained(root / "float")
    tokenizer.save_pretrained(root / "float")
    return root / "float", calib, tokenizer(text, return_tensors="pt")["input_ids"][0]


def test_quantize_command_matches_mamba_quantize(tmp_path):
    """`quantscale quantize DIR OUT --scheme W8A8` (the orchestrator) writes the same Quamba
    checkpoint as `quantscale mamba quantize`: same files, same reloaded perplexity."""
    from transformers import MambaForCausalLM

    from quantscale import cli
    from quantscale.eval.perplexity import perplexity

    model_dir, calib, tokens = _tiny_checkpoint(tmp_path)
    calib_args = ["--calib-samples", "6", "--calib-seq-len", "32", "--calib-data", str(calib)]
    generic, own = tmp_path / "generic", tmp_path / "own"
    assert (
        cli.main(["quantize", str(model_dir), str(generic), "--scheme", "W8A8", *calib_args]) == 0
    )
    assert cli.main(["mamba", "quantize", str(model_dir), str(own), *calib_args]) == 0
    for name in ("model.safetensors", "config.json"):
        assert (generic / name).read_bytes() == (own / name).read_bytes(), name
    ppl = [perplexity(load_quantized(path), tokens[:512], seq_len=128) for path in (generic, own)]
    base = perplexity(MambaForCausalLM.from_pretrained(model_dir), tokens[:512], seq_len=128)
    assert ppl[0] == ppl[1] and ppl[0] != base and abs(ppl[0] / base - 1) < 0.05
    assert load_quantized(generic).config.quantization_config["recipe"]["n_samples"] == 6


def test_quantize_mamba_checkpoint_schemes(tmp_path):
    """W8A8 and a MambaRecipe YAML are the Mamba schemes; any other is refused by name."""
    from quantscale.mamba.quantize import quantize_mamba_checkpoint

    model_dir, calib, _ = _tiny_checkpoint(tmp_path)
    with pytest.raises(QuantscaleError, match="'NVFP4' is not supported for Mamba.*'W8A8'"):
        quantize_mamba_checkpoint(model_dir, tmp_path / "q", "NVFP4")
    with pytest.raises(QuantscaleError, match="method 'awq' does not apply to a Mamba"):
        quantize_mamba_checkpoint(model_dir, tmp_path / "q", "W4A16", method="awq")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: quamba2\nhead_groups: 2\nchannel_groups: 2\n")
    out = quantize_mamba_checkpoint(
        model_dir, tmp_path / "q", str(recipe), calib_samples=4, calib_seq_len=32, calib_data=calib
    )
    saved = load_quantized(out).config.quantization_config["recipe"]
    assert (saved["method"], saved["head_groups"], saved["n_samples"]) == ("quamba2", 2, 4)


def _observer_names() -> list[str]:
    """One registered name per observer class."""
    from quantscale.observers import OBSERVERS

    return sorted({cls.name for cls in OBSERVERS.values()})


@pytest.mark.parametrize("observer", _observer_names())
def test_every_observer_sets_a_real_mamba_scale(observer, monkeypatch):
    """A Mamba point calibrated with any registered observer gets the scale that observer
    computes standalone on the same batches (the kl observer used to leave 1.0)."""
    from quantscale.mamba.quamba import _ACT_ARGS, ActQuant
    from quantscale.observers import get_observer
    from quantscale.qdq import compute_qparams

    seen: list[tuple[ActQuant, torch.Tensor]] = []
    original = ActQuant.observe

    def recording(self, x):
        if self._observers is not None:
            seen.append((self, x.detach().float().reshape(-1, self.channels).clone()))
        original(self, x)

    monkeypatch.setattr(ActQuant, "observe", recording)
    rule = PointRule(observer=observer)
    model = _quantized("mamba", points={"ssm.dt": rule, "ssm.x": rule})
    for point in ("ssm.dt", "ssm.x"):
        act = model.backbone.layers[0].mixer.act(point)
        standalone = get_observer(observer, args=_ACT_ARGS)
        for owner, x in seen:
            if owner is act:
                standalone.update(x)
        assert standalone.count == len(_batches())
        expected = compute_qparams(_ACT_ARGS, *standalone.min_max()).scale.reshape(1)
        assert float(act.scale) != 1.0, point
        torch.testing.assert_close(act.scale, expected, rtol=1e-5, atol=0)


def test_observer_without_a_range_raises():
    """An observer that saw data but yields no finite range fails instead of keeping 1.0."""
    from quantscale.mamba.mixers import PointSpec
    from quantscale.mamba.quamba import ActQuant

    act = ActQuant(4)
    act.start(PointSpec(True, "minmax"))
    act.observe(torch.tensor([[1.0, float("nan"), float("inf"), 2.0]]))
    with pytest.raises(QuantscaleError, match="minmax observer saw 1 batch.*no finite range"):
        act.finish()


def test_checkpoint_without_tokenizer_names_what_is_missing(tmp_path, capsys):
    """Calibrating a Mamba checkpoint that has no tokenizer says so (it used to fail with
    'calibration text has 0 tokens'); token ids given directly need no tokenizer."""
    from transformers import MambaConfig, MambaForCausalLM

    from quantscale import cli
    from quantscale.orchestrator import quantize_checkpoint

    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8)
    MambaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    (tmp_path / "calib.txt").write_text("the fox jumps over the dog. " * 200)
    argv = ["quantize", str(tmp_path / "m"), str(tmp_path / "q"), "--scheme", "W8A8"]
    argv += ["--calib-samples", "2", "--calib-seq-len", "16"]
    for extra in ([], ["--calib-data", str(tmp_path / "calib.txt")]):
        assert cli.main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'm'}: no tokenizer found" in err and "token ids [N, L]" in err
    assert not (tmp_path / "q").exists()
    ids = torch.cat(_batches())
    out = quantize_checkpoint(tmp_path / "m", tmp_path / "q", "W8A8", calib_data=ids)
    assert load_quantized(out).config.quantization_config["quant_method"] == "quamba"
