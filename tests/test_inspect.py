"""Precision report: exact counts and bytes on a MiniMax-M2-shaped checkpoint, headers only."""

from __future__ import annotations

import json

import pytest

from quantscale.checkpoint import read
from quantscale.checkpoint.inspect import infer_block, precision_report, summary_lines
from quantscale.checkpoint.read import Checkpoint
from quantscale.checkpoint.synthetic import (
    write_llama_like,
    write_minimax_headers,
    write_minimax_like,
)
from quantscale.cli import main

LAYERS, EXPERTS, VOCAB, H = 2, 4, 512, 3072


@pytest.fixture(scope="module")
def minimax(tmp_path_factory):
    return write_minimax_like(tmp_path_factory.mktemp("mm") / "ckpt", LAYERS, EXPERTS, 2)


def _expected():
    """MiniMax-M2 sizes worked out from its published dimensions, per layer."""
    linear = [(6144, H), (1024, H), (1024, H), (H, 6144)] + [(1536, H), (H, 1536), (1536, H)] * (
        EXPERTS
    )
    fp8_elems = sum(o * i for o, i in linear) * LAYERS
    scale_elems = sum(-(-o // 128) * -(-i // 128) for o, i in linear) * LAYERS
    norms = (H + H + 6144 + 1024) * LAYERS + H  # in/post layernorm, q_norm, k_norm; final norm
    bf16_elems = norms + 2 * VOCAB * H  # + embed_tokens, lm_head
    f32_elems = (EXPERTS * H + EXPERTS) * LAYERS  # router gate + e_score_correction_bias
    return {
        "fp8_weights": len(linear) * LAYERS,
        "scale_elements": scale_elems,
        "bytes": {
            "F8_E4M3": fp8_elems,
            "BF16": 2 * bf16_elems,
            "F32": 4 * (f32_elems + scale_elems),
        },
        "bf16_bytes": 2 * fp8_elems + 2 * bf16_elems + 4 * f32_elems,
        "other": {"BF16": 4 * LAYERS + 3, "F32": 2 * LAYERS},
    }


def test_counts_and_bytes_exact(minimax):
    report = precision_report(minimax)
    exp = _expected()
    assert report.fp8_weights == exp["fp8_weights"] == 32
    assert report.scale_tensors == exp["fp8_weights"]
    assert report.scale_elements == exp["scale_elements"]
    assert report.bytes_by_dtype == exp["bytes"]
    assert report.total_bytes == sum(exp["bytes"].values())
    assert report.other_tensors == exp["other"]
    assert report.bf16_bytes == exp["bf16_bytes"]
    assert report.saving_bytes == exp["bf16_bytes"] - report.total_bytes
    assert report.shards == 2 and report.tensors == 2 * 32 + 4 * LAYERS + 3 + 2 * LAYERS


def test_per_kind_rows(minimax):
    rows = {r.kind: r for r in precision_report(minimax).kinds}
    q = rows["attention.q"]
    assert (q.tensors, q.dtypes, q.shapes) == (LAYERS, {"F8_E4M3": LAYERS}, {"6144x3072": LAYERS})
    assert q.scale_shapes == {"48x24": LAYERS} and q.blocks == {"128x128": LAYERS}
    assert rows["attention.o"].scale_shapes == {"24x48": LAYERS}
    assert rows["experts.w2"].scale_shapes == {"24x12": LAYERS * EXPERTS}
    assert rows["experts.w1"].tensors == LAYERS * EXPERTS
    assert rows["router"].dtypes == {"F32": 2 * LAYERS} and not rows["router"].scale_shapes
    assert rows["norm"].dtypes == {"BF16": 4 * LAYERS + 1}
    assert rows["lm_head"].shapes == {f"{VOCAB}x{H}": 1}
    assert list(rows)[0] == "embeddings" and list(rows)[-1] == "lm_head"


def test_header_only(minimax, monkeypatch):
    """The report never loads tensor data."""

    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(Checkpoint, "get", refuse)
    monkeypatch.setattr(Checkpoint, "iter_shard", refuse)
    monkeypatch.setattr(read, "safe_open", refuse)
    assert precision_report(minimax).fp8_weights == 32


def test_bf16_bytes_equal_real_bf16_checkpoint(tmp_path):
    """`bf16_bytes` is what the same model weighs in bf16 (written independently)."""
    args = dict(hidden=256, intermediate=384, layers=2, vocab=96, shards=2, seed=3)
    fp8 = precision_report(write_llama_like(tmp_path / "fp8", fp8=True, **args))
    bf16 = Checkpoint(write_llama_like(tmp_path / "bf16", **args))
    assert fp8.fp8_weights == 14 and fp8.bf16_bytes == bf16.total_bytes()
    assert 0 < fp8.saving_fraction < 0.5


@pytest.mark.parametrize(
    ("weight", "scale", "expected"),
    [
        ((6144, 3072), (48, 24), "128x128"),
        ((576, 1536), (5, 12), "128x128"),  # SmolLM2 edge tiles
        ((1000, 130), (8, 2), "128x128"),
        ((256, 512), (4, 4), "64x128"),
        ((256, 512), (256, 1), "per-channel"),
        ((256, 512), (), "per-tensor"),
    ],
)
def test_infer_block(weight, scale, expected):
    assert infer_block(weight, scale) == expected


def test_cli_inspect(minimax, capsys):
    assert main(["inspect", str(minimax), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fp8_weights"] == 32 and data["scale_tensors"] == 32
    assert data["bf16_bytes"] == _expected()["bf16_bytes"]
    assert main(["inspect", str(minimax)]) == 0
    text = capsys.readouterr().out
    assert "32 FP8 scale parameters" in text and "attention.q" in text


def test_cli_inspect_missing_dir(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_full_size_minimax_counts(tmp_path, monkeypatch):
    """The real MiniMax-M2 layout (62 layers, 256 experts; sparse data, real headers):
    96,103 tensors = 47,864 FP8 weights + 47,864 scales + 124 fp32 + 251 bf16."""
    path = write_minimax_headers(tmp_path / "full")
    monkeypatch.setattr(read, "safe_open", None)  # any data read would fail
    report = precision_report(path)
    assert report.tensors == 96_103
    assert report.fp8_weights == report.scale_tensors == 62 * (4 + 3 * 256) == 47_864
    assert report.other_tensors == {"F32": 124, "BF16": 251}
    rows = {r.kind: r for r in report.kinds}
    assert rows["experts.w3"].tensors == 62 * 256
    assert rows["attention.k"].scale_shapes == {"8x24": 62}


def test_inspect_out_writes_the_report_atomically(tmp_path, capsys):
    """`inspect --out FILE`: the text report; an existing FILE needs --overwrite."""
    from quantscale.checkpoint.synthetic import write_llama_like

    ckpt = write_llama_like(tmp_path / "fp8", 256, 384, 1, 64, fp8=True)
    out = tmp_path / "model_precision_report.txt"
    assert main(["inspect", str(ckpt), "--json", "--out", str(out)]) == 0
    json.loads(capsys.readouterr().out)  # stdout stays JSON only
    text = out.read_text()
    assert "Precision report" in text and "attention.q" in text
    assert "bytes by dtype" in text and "\x1b[" not in text
    out.write_text("old")
    assert main(["inspect", str(ckpt), "--out", str(out)]) == 2
    assert out.read_text() == "old" and "already exists" in capsys.readouterr().err
    assert main(["inspect", str(ckpt), "--out", str(out), "--overwrite"]) == 0
    assert "bytes by dtype" in out.read_text()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def _export_tiny(tmp_path, scheme, fmt="compressed-tensors"):
    import torch
    from tiny_models import make_tiny_llama

    from quantscale.export import export_model
    from quantscale.orchestrator import quantize_model
    from quantscale.scheme import load_recipe, with_group_size

    model = make_tiny_llama(dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    recipe = load_recipe(scheme)
    if scheme == "W4A16":
        recipe = with_group_size(recipe, 32)
    quantize_model(model, recipe, torch.zeros(1, 4, dtype=torch.long), "rtn")
    return export_model(model, tmp_path / "q", fmt), tmp_path / "bf16"


def test_packed_int4_bits_per_parameter(tmp_path):
    """CT W4A16 g32: per plain parameter 4 bits of codes + 1 of float32 scale + the 2-element
    int64 weight_shape; plain shapes, not the packed int32 ones; bf16 size as saved in bf16."""
    out, bf16 = _export_tiny(tmp_path, "W4A16")
    report = precision_report(out)
    rows = {r.kind: r for r in report.kinds}
    q = rows["attention.q"]
    rc = 64 * 64
    assert q.params == 2 * rc and q.shapes == {"64x64": 2} and q.formats == {"int4 g32": 2}
    assert q.scale_shapes == {"64x2": 2} and q.blocks == {"1x32": 2}
    assert q.bits_per_param == pytest.approx(4 + 1 + 8 * 16 / rc)
    assert rows["embeddings"].bits_per_param == 16 and not rows["embeddings"].formats
    assert report.bf16_bytes == Checkpoint(bf16).total_bytes()
    assert report.to_dict()["kinds"][1]["bits_per_param"] == pytest.approx(q.bits_per_param)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt"])
def test_nvfp4_bits_per_parameter(tmp_path, fmt):
    """NVFP4: 4-bit codes plus an FP8 scale per 16 weights (and a float32 global scale)."""
    out, bf16 = _export_tiny(tmp_path, "NVFP4A16", fmt)
    report = precision_report(out)
    mlp = {r.kind: r for r in report.kinds}["mlp.down"]
    assert mlp.formats == {("fp4 g16" if fmt != "modelopt" else "nvfp4"): 2}
    assert 4.5 < mlp.bits_per_param < 4.51
    assert report.bf16_bytes == Checkpoint(bf16).total_bytes()
    text = "\n".join(summary_lines(report))
    assert "quantized kinds 4.5" in text


@pytest.mark.parametrize(
    ("preset", "fmt", "block"),
    [("NVFP4A16", "nvfp4-pack-quantized", "1x16"), ("W4A16", "pack-quantized", "1x128")],
)
def test_packed_weights_counted_with_their_scales(tmp_path, preset, fmt, block):
    """compressed-tensors packed weights: counted as packed (not their FP8 / bf16 scales as
    weights), blocks in plain columns, and bf16_bytes = the same model's bf16 tensors."""
    import torch
    from tiny_models import make_tiny_llama

    from quantscale.export.compressed_tensors import (
        read_compressed_tensors,
        save_compressed_tensors,
    )
    from quantscale.orchestrator import quantize_model

    model = make_tiny_llama(96, 256, 512, torch.bfloat16, tie_word_embeddings=False)
    quantize_model(model, preset, method="rtn")
    out = save_compressed_tensors(model, tmp_path / preset)
    report = precision_report(out)
    assert report.packed_weights == {fmt: 14} and report.fp8_weights == 0
    assert report.scale_tensors == 14 * 2  # weight_scale + weight_global_scale / weight_shape
    rows = {r.kind: r for r in report.kinds}
    assert rows["attention.q"].blocks == {block: 2} and rows["mlp.down"].tensors == 2
    dense = read_compressed_tensors(out, dtype=torch.bfloat16)
    assert report.bf16_bytes == sum(t.numel() * t.element_size() for t in dense.values())
    assert 0.5 < report.saving_fraction < 0.8
