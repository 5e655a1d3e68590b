"""The trained Mamba fixtures (slow: they need the cached Wikipedia text, and train once)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from quantscale.cli import build_parser
from quantscale.commands.mamba import _parse_groups, _recipe


def test_cli_parses_mamba_commands():
    args = build_parser().parse_args(
        ["mamba", "quantize", "fixture:mamba2", "out", "--method", "quamba2", "--groups", "8x8"]
    )
    recipe = _recipe(args)
    assert (recipe.method, recipe.head_groups, recipe.channel_groups) == ("quamba2", 8, 8)
    assert (recipe.n_samples, recipe.seq_len) == (512, 512)
    args = build_parser().parse_args(["mamba", "quantize", "m", "o", "--float-layers", "0,-1"])
    assert _recipe(args).float_layers == [0, -1]
    with pytest.raises(Exception, match="HEADSxCHANNELS"):
        _parse_groups("4")


@pytest.mark.slow
def test_training_is_deterministic():
    from quantscale.data.calibration import tokenize_text
    from quantscale.mamba.fixtures import (
        FIXTURES,
        _calibration_text,
        fixture_tokenizer,
        train_model,
    )

    stream = tokenize_text(fixture_tokenizer(), _calibration_text())[:20000]
    spec = dataclasses.replace(FIXTURES["mamba"], steps=2, batch_size=2, seq_len=32)
    (m1, log1), (m2, log2) = train_model(spec, stream), train_model(spec, stream)
    assert log1["losses"] == log2["losses"]
    for (name, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_fixture_quantizes_with_small_perplexity_change(kind):
    from quantscale.data.calibration import eval_tokens
    from quantscale.eval.perplexity import perplexity
    from quantscale.mamba.fixtures import load_fixture, training_log
    from quantscale.mamba.mixers import MambaRecipe
    from quantscale.mamba.quantize import calibration_token_batches, quantize_mamba

    log = training_log(kind)
    assert sum(log["losses"][-10:]) / 10 < log["losses"][0] - 2  # it learned something
    model, tokenizer = load_fixture(kind)
    tokens = eval_tokens(tokenizer, 4096)
    base = perplexity(model, tokens)
    recipe = MambaRecipe(method="quamba1", n_samples=32, seq_len=256)
    quantize_mamba(model, calibration_token_batches(tokenizer, recipe), recipe)
    quantized = perplexity(model, tokens)
    assert quantized != base and abs(quantized / base - 1) < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("reader", ["quantscale", "transformers"])
def test_eval_command_reads_a_saved_quamba_checkpoint(tmp_path, capsys, reader):
    """`quantscale eval` on a saved Quamba checkpoint runs our INT8 mixers: its perplexity is
    the in-memory quantized model's (a plain transformers load of the INT8 tensors is not)."""
    import json

    from quantscale import cli
    from quantscale.eval.runner import evaluate
    from quantscale.mamba.fixtures import load_fixture
    from quantscale.mamba.mixers import MambaRecipe
    from quantscale.mamba.quantize import calibration_token_batches, quantize_mamba, save_quantized

    model, tokenizer = load_fixture("mamba")
    base = evaluate(model, tokenizer, ["ppl"], n_tokens=2048)["ppl"]
    recipe = MambaRecipe(n_samples=8, seq_len=128)
    quantize_mamba(model, calibration_token_batches(tokenizer, recipe), recipe)
    expected = evaluate(model, tokenizer, ["ppl"], n_tokens=2048)["ppl"]
    out = save_quantized(model, tmp_path / "q", tokenizer)
    argv = ["eval", str(out), "--tasks", "ppl", "--n-tokens", "2048", "--reader", reader]
    assert cli.main([*argv, "--json"]) == 0
    stdout = capsys.readouterr().out
    got = json.loads(stdout[stdout.index("{") :])["results"]["ppl"]
    assert got == pytest.approx(expected, rel=1e-4) and got != base
    assert abs(expected / base - 1) < 0.05 and got < 0.5 * len(tokenizer)
