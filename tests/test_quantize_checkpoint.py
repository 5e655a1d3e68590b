"""`quantize_checkpoint` and the `quantscale quantize` options: checkpoint dir in, format out."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from quantscale.checkpoint.convert import convert_checkpoint
from quantscale.checkpoint.layouts import detect_layout
from quantscale.checkpoint.read import Checkpoint
from quantscale.commands.quantize import add_calibrated_options
from quantscale.errors import QuantscaleError
from quantscale.orchestrator import quantize_checkpoint

WORDS = "the cat sat on a mat while dogs ran far in green hills and rivers flow to sea".split()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    vocab = {w: i for i, w in enumerate(["<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(root / "m")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "m")
    text = root / "calib.txt"
    gen = torch.Generator().manual_seed(0)
    text.write_text(
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (3000,), generator=gen))
    )
    return root


@pytest.mark.parametrize(
    ("scheme", "fmt", "marker"),
    [
        ("nvfp4", "compressed-tensors", "weight_packed"),
        ("nvfp4", "modelopt", "weight_scale_2"),
        ("w4a16", "pseudo", None),
    ],
)
def test_quantize_checkpoint(tiny_dir, scheme, fmt, marker):
    from safetensors import safe_open

    out = quantize_checkpoint(
        tiny_dir / "m",
        tiny_dir / f"out-{scheme}-{fmt}",
        scheme,
        method="gptq",
        fmt=fmt,
        calib_samples=8,
        calib_seq_len=32,
        calib_data=tiny_dir / "calib.txt",
    )
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()
    files = sorted(out.glob("*.safetensors"))
    with safe_open(files[0], "pt") as f:
        keys = set(f.keys())
    if marker:
        assert f"model.layers.0.self_attn.q_proj.{marker}" in keys
    else:
        qc = json.loads((out / "quantize_config.json").read_text())
        assert qc["quant_method"] == "gptq" and qc["calib_samples"] == 8
    layout = detect_layout(Checkpoint(out))
    assert (layout is not None and layout.number_format == "nvfp4") == (scheme == "nvfp4")


def test_cli_glue_parses_and_converts(tiny_dir):
    p = argparse.ArgumentParser()
    add_calibrated_options(p)
    args = p.parse_args(["--method", "gptq", "--format", "modelopt", "--calib-samples", "16"])
    assert (args.method, args.format, args.calib_samples) == ("gptq", "modelopt", 16)
    assert args.calibrate_all_experts is True and args.true_sequential is None
    assert p.parse_args(["--true-sequential"]).true_sequential is True
    assert p.parse_args(["--actorder", "none"]).actorder == "none"
    args = p.parse_args(
        ["--calib-seq-len", "64", "--calib-data", "t.txt", "--calib-batch-size", "2"]
    )
    assert (args.calib_seq_len, args.calib_data, args.calib_batch_size) == (64, "t.txt", 2)
    assert args.dtype == "bfloat16"
    src = quantize_checkpoint(
        tiny_dir / "m",
        tiny_dir / "ct-src",
        "nvfp4a16",
        calib_samples=4,
        calib_seq_len=32,
        calib_data=tiny_dir / "calib.txt",
    )
    convert_checkpoint(src, tiny_dir / "mo", "modelopt")
    hf = json.loads((tiny_dir / "mo" / "hf_quant_config.json").read_text())
    assert hf["quantization"]["quant_algo"] == "W4A16_NVFP4"


def test_mamba_models_take_the_quamba_path(tmp_path, monkeypatch):
    import quantscale.mamba.quantize as mq

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "mamba2"}))
    with pytest.raises(QuantscaleError, match="Quamba layout.*not --format gguf"):
        quantize_checkpoint(tmp_path / "m", tmp_path / "o", "W8A8", fmt="gguf")
    calls = []
    monkeypatch.setattr(mq, "quantize_mamba_checkpoint", lambda *a, **k: calls.append((a, k)))
    quantize_checkpoint(
        tmp_path / "m", tmp_path / "o", "W4A8", method="gptq", calib_samples=4, calib_data="t"
    )
    assert calls == [
        (
            (tmp_path / "m", tmp_path / "o", "W4A8"),
            {
                "method": "gptq",
                "calib_samples": 4,
                "calib_seq_len": 512,
                "calib_data": "t",
                "overwrite": False,
                "rotate": None,
                "learn_scales": None,
            },
        )
    ]


@pytest.mark.parametrize("scheme", ["NVFP4A16", "W4A16"])
def test_weight_only_rtn_needs_no_tokenizer(tmp_path, scheme):
    """Weight-only RTN needs no calibration text, so a checkpoint without a tokenizer works."""
    from tiny_models import make_tiny_llama

    from quantscale import cli

    src = tmp_path / "notok"
    make_tiny_llama().save_pretrained(src)
    assert not (src / "tokenizer.json").exists()
    out = tmp_path / "out"
    assert cli.main(["quantize", str(src), str(out), "--scheme", scheme, "--method", "rtn"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_calibrated_method_without_tokenizer_says_what_is_missing(tmp_path, capsys):
    from tiny_models import make_tiny_llama

    from quantscale import cli

    src = tmp_path / "notok"
    make_tiny_llama().save_pretrained(src)
    argv = ["quantize", str(src), str(tmp_path / "out"), "--scheme", "W4A16", "--method", "gptq"]
    assert cli.main(argv) == 2
    assert "no tokenizer found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
