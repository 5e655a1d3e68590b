"""`quantscale explain`: the numbers it prints are the ones our FP8 block codec produces."""

from __future__ import annotations

import math
import re

import pytest
import torch

from quantscale import cli
from quantscale.checkpoint.explain import example_weight, explain_stored, explain_tile
from quantscale.checkpoint.fp8_quantize import quantize_checkpoint_fp8
from quantscale.checkpoint.read import Checkpoint
from quantscale.checkpoint.synthetic import write_llama_like
from quantscale.errors import CheckpointError
from quantscale.formats.fp8 import dequantize_fp8_block, quantize_fp8_block


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return float(match.group(1))


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_tile_walk_matches_the_codec(scale_fmt):
    w = torch.cat([example_weight(1), example_weight(2) * 3], dim=1)  # 128 x 256: two tiles
    text = explain_tile(w, (0, 1), scale_fmt=scale_fmt)
    q, scale = quantize_fp8_block(w, scale_fmt=scale_fmt)
    shown = _number(r"`weight_scale_inv` = (\S+)", text)
    assert shown == pytest.approx(float(scale[0, 1]), rel=1e-6)
    assert _number(r"`weight_scale` = (\S+)", text) == shown
    assert _number(r"`\.scale` = (\S+)", text) == shown
    tile = w[:, 128:]
    deq = dequantize_fp8_block(q, scale, dtype=torch.float32)[:, 128:]
    sqnr = 10 * math.log10(float(tile.pow(2).sum() / (deq - tile).pow(2).sum()))
    assert _number(r"SQNR (\S+) dB", text) == pytest.approx(sqnr, abs=0.05)
    assert _number(r"max \|error\| (\S+),", text) == pytest.approx(
        float((deq - tile).abs().max()), rel=1e-3
    )
    assert _number(r"amax = (\S+) at", text) == pytest.approx(float(tile.abs().max()), rel=1e-5)
    factor = _number(r"every weight x(\S+) \(", text)
    assert factor == pytest.approx(1 / float(scale[0, 1]) ** 2, rel=0.05)


def test_stored_fp8_tile_uses_the_checkpoint_scale(tmp_path):
    src = write_llama_like(tmp_path / "src", hidden=256, intermediate=384, layers=1)
    fp8 = quantize_checkpoint_fp8(src, tmp_path / "fp8")
    ckpt = Checkpoint(fp8)
    name = "model.layers.0.mlp.down_proj.weight"
    scale = ckpt.get(f"{name[: -len('.weight')]}.weight_scale_inv").float()
    text = explain_stored(fp8, name, (1, 2))
    assert _number(r"stored scale = (\S+):", text) == pytest.approx(float(scale[1, 2]), rel=1e-6)
    deq = ckpt.get(name)[128:256, 256:384].float() * scale[1, 2]
    assert _number(r"tile amax (\S+) ", text) == pytest.approx(float(deq.abs().max()), rel=1e-5)
    with pytest.raises(CheckpointError, match="outside the 2x3 grid"):
        explain_stored(fp8, name, (2, 0))
    with pytest.raises(CheckpointError, match="no tensor 'nope'"):
        explain_stored(fp8, "nope")
    float_text = explain_stored(src, name, (0, 0))
    assert "value/scale" in float_text and "SQNR" in float_text


def test_cli(tmp_path, capsys):
    assert cli.main(["explain"]) == 0
    assert "AWS Neuron `.scale`" in capsys.readouterr().out
    src = write_llama_like(tmp_path / "src", hidden=128, intermediate=256, layers=1)
    assert cli.main(["explain", str(src)]) == 2
    assert "--tensor" in capsys.readouterr().err
    assert cli.main(["explain", str(src), "--tensor", "x.weight"]) == 2
    assert "no tensor 'x.weight'" in capsys.readouterr().err
