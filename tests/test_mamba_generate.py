"""Generation with transformers' cache through the quantized Mamba / Mamba2 mixers."""

from __future__ import annotations

import pytest
import torch
from test_mamba_quant import MAKERS, _ids, _logits, _quantized

from quantscale.mamba.mixers import MambaRecipe, resolve_points
from quantscale.mamba.quamba import quantized_mixer
from quantscale.mamba.quantize import calibration_token_batches, quantize_mamba, set_mode

N_NEW = 64
TOL = {"atol": 2e-5, "rtol": 1e-5}


@torch.no_grad()
def _cached_logits(model, ids: torch.Tensor, prefill: int, chunk: int = 3) -> torch.Tensor:
    """Logits of ids fed through the cache: a prefill, a `chunk`-token piece (a continuation
    from a state), then token by token."""
    out = model(input_ids=ids[:, :prefill], use_cache=True)
    cache, logits = out.cache, [out.logits]
    pieces = [ids[:, prefill : prefill + chunk]]
    pieces += list(ids[:, prefill + chunk :].split(1, dim=1))
    for piece in pieces:
        out = model(input_ids=piece, cache=cache, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
@pytest.mark.parametrize(("method", "rotate"), [("quamba1", None), ("quamba2", "hadamard")])
def test_cached_steps_match_the_whole_sequence(kind, method, rotate):
    """Prefill + decode steps give the whole sequence's logits, in int8 and fake modes (the
    conv window and SSM state carried, the same static scales applied to the new tokens)."""
    model = _quantized(kind, method=method, rotate=rotate)
    ids = _ids(5, length=30)
    for mode in ("int8", "fake"):
        set_mode(model, mode)
        whole = _logits(model, ids)
        torch.testing.assert_close(_cached_logits(model, ids, 20), whole, **TOL)
        # a prefill shorter than the conv kernel (the cache pads its conv window)
        torch.testing.assert_close(_cached_logits(model, ids, 2), whole, **TOL)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_int8_conv_step_equals_the_convolution(kind):
    """A decode step's conv1d (one position from the cached window, summed tap by tap) is
    the whole convolution's last position bit for bit (integer products, exact sums)."""
    mixer = _quantized(kind).backbone.layers[0].mixer
    act = mixer.act("conv1d.input")
    window = torch.randn(2, act.channels, mixer.conv1d.kernel + 1) * act.scale * 60
    for mode in ("int8", "fake"):
        step = mixer.conv1d(window, act, mode, last=1)
        assert torch.equal(step, mixer.conv1d(window, act, mode)[..., -1:])


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_float_mixers_with_cache_match_transformers(kind):
    """Our float mixers step through the cache as transformers' own mixers do (one token at
    a time: transformers' Mamba1 restarts a multi-token continuation from a zero SSM state,
    ours continues from the cached one, as the whole-sequence test above checks)."""
    model = MAKERS[kind]()
    ids = _ids(6, length=30)
    ref = _cached_logits(model, ids, 20, chunk=1)
    specs = resolve_points(kind, MambaRecipe(), 10**6)
    for layer in model.backbone.layers:
        layer.mixer = quantized_mixer(layer.mixer, kind, specs)
    got = _cached_logits(model, ids, 20, chunk=1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_cached_logits(model, ids, 20), _logits(model, ids), **TOL)


def _generate(model, prompt: torch.Tensor, use_cache: bool) -> torch.Tensor:
    from quantscale.eval.generate import generate_ids

    new = generate_ids(model, prompt, N_NEW, use_cache=use_cache)
    assert new.shape == (1, N_NEW)  # the fixtures' 64 greedy tokens never hit EOS here
    return new


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "method"), [("mamba", "quamba1"), ("mamba2", "quamba2")])
def test_int8_generation_with_cache_matches_recomputation(kind, method):
    """On the trained fixtures: 64 greedy INT8 tokens with the cache are the tokens of the
    same model recomputing the whole prefix each step (use_cache=False), in int8 and in
    fake-quant mode; the float model's cached generation is transformers' own."""
    from quantscale.data.calibration import eval_tokens
    from quantscale.mamba.fixtures import load_fixture

    model, tokenizer = load_fixture(kind)
    prompt = eval_tokens(tokenizer, 256)[None, :32]
    float_cached = _generate(model, prompt, True)
    assert torch.equal(float_cached, _generate(model, prompt, False))
    recipe = MambaRecipe(method=method, n_samples=16, seq_len=128)
    quantize_mamba(model, calibration_token_batches(tokenizer, recipe), recipe)
    int8_cached = _generate(model, prompt, True)
    assert torch.equal(int8_cached, _generate(model, prompt, False))
    set_mode(model, "fake")
    assert torch.equal(int8_cached, _generate(model, prompt, False))
    assert torch.equal(int8_cached, _generate(model, prompt, True))
    assert not torch.equal(int8_cached, float_cached)  # the quantized model is another model


PROMPT = "The history of the city"
# where quantization changes the greedy continuation depends on the CPU's float rounding
# (on an AMD EPYC the first prompt's 24 tokens came out the float model's): the test takes the
# first of these whose continuation it changes
PROMPTS = (PROMPT, "In 1990, the", "The river", "Its population was", "He was born in")


@pytest.mark.slow
def test_eval_prompt_generates_from_a_saved_quamba_checkpoint(tmp_path, capsys):
    """`quantscale eval DIR --prompt` loads the saved INT8 mixers and prints the in-memory
    quantized model's continuation, on a prompt where that differs from the float model's
    (so that a plain load of the INT8 tensors, or the float model, would fail the test)."""
    import json

    from quantscale import cli
    from quantscale.eval.generate import generate_text
    from quantscale.mamba.fixtures import fixture_checkpoint, load_fixture
    from quantscale.mamba.quantize import save_quantized

    model, tokenizer = load_fixture("mamba2")
    floats = [generate_text(model, tokenizer, p, 24) for p in PROMPTS]
    recipe = MambaRecipe(method="quamba2", n_samples=16, seq_len=128)
    quantize_mamba(model, calibration_token_batches(tokenizer, recipe), recipe)
    changed = [
        (p, text, f)
        for p, f in zip(PROMPTS, floats)
        if (text := generate_text(model, tokenizer, p, 24)) != f
    ]
    assert changed, "quantization changed none of the continuations"
    prompt, expected, float_text = changed[0]
    out = save_quantized(model, tmp_path / "q", tokenizer)
    argv = ["eval", str(out), "--prompt", prompt, "--max-new-tokens", "24"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == expected + "\n"
    baseline = str(fixture_checkpoint("mamba2"))
    assert cli.main([*argv, "--baseline", baseline, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["continuation"] == expected and report["baseline_continuation"] == float_text
    assert len(tokenizer(expected)["input_ids"]) >= 20


def test_eval_prompt_on_a_plain_checkpoint(tmp_path, capsys):
    """The same flag on a plain transformers checkpoint goes through the existing loader."""
    from tiny_models import make_tiny_llama

    from quantscale import cli
    from quantscale.eval.generate import generate_text
    from quantscale.mamba.fixtures import fixture_tokenizer

    tokenizer = fixture_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    expected = generate_text(model, tokenizer, PROMPT, 8)
    argv = ["eval", str(tmp_path / "llama"), "--prompt", PROMPT, "--max-new-tokens"]
    assert cli.main([*argv, "8"]) == 0
    assert capsys.readouterr().out == expected + "\n" and expected
    assert cli.main([*argv, "0"]) == 2
    assert "max_new_tokens must be at least 1" in capsys.readouterr().err
