"""FP8 block quantize / dequantize of checkpoints: error bounds, edge tiles, zeros, safety."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantscale import cli
from quantscale.checkpoint import fp8_quantize
from quantscale.checkpoint.dequantize import dequantize_checkpoint
from quantscale.checkpoint.fp8_quantize import quantize_checkpoint_fp8
from quantscale.checkpoint.read import Checkpoint
from quantscale.checkpoint.synthetic import write_llama_like, write_minimax_like
from quantscale.errors import OutputExistsError, QuantscaleError
from quantscale.formats.fp8 import block_amax

EDGE_SHAPES = [(576, 1536), (1000, 130), (256, 384)]


def _save(path: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    return path


def _dir_digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(path)
    return {n: ckpt.get(n) for n in ckpt.names()}


def e4m3_half_ulp(x: torch.Tensor) -> torch.Tensor:
    """Half the E4M3 spacing at magnitude |x| (subnormal spacing 2^-9 below 2^-6)."""
    exponent = torch.floor(torch.log2(x.abs().clamp(min=2.0**-6)))
    return torch.exp2(exponent - 3) / 2


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (r, c) in enumerate(EDGE_SHAPES):
        w = torch.randn(r, c, generator=gen) * 0.02
        w[:, :7] *= 40  # outlier columns: tiles with very different ranges
        out[f"model.layers.{i}.mlp.down_proj.weight"] = w.to(torch.bfloat16)
    out["model.embed_tokens.weight"] = torch.randn(64, 130, generator=gen).to(torch.bfloat16)
    out["model.norm.weight"] = torch.ones(130, dtype=torch.bfloat16)
    return out


def test_round_trip_error_is_e4m3_rounding_per_block(tmp_path):
    src = _save(tmp_path / "src", _weights())
    out = quantize_checkpoint_fp8(src, tmp_path / "fp8")
    deq = dequantize_checkpoint(out, tmp_path / "deq", dtype="fp32")
    q, original, restored = _tensors(out), load_file(src / "model.safetensors"), _tensors(deq)
    for i, shape in enumerate(EDGE_SHAPES):
        name = f"model.layers.{i}.mlp.down_proj.weight"
        scale = q[name + "_scale_inv"]
        assert q[name].dtype == torch.float8_e4m3fn and tuple(q[name].shape) == shape
        assert tuple(scale.shape) == (-(-shape[0] // 128), -(-shape[1] // 128))
        assert scale.dtype == torch.float32
        w = original[name].float()
        full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
        # half an E4M3 ulp, plus float32 rounding of w / scale and of q * scale
        bound = e4m3_half_ulp(w / full) * full + w.abs() * 2.0**-21
        err = (restored[name] - w).abs()
        assert torch.all(err <= bound), f"{name}: error above half an E4M3 ulp"
        assert err.max() > 0  # the check is not vacuous
        # each tile's largest magnitude maps to 448 exactly
        tile_amax = torch.nn.functional.pad(w.abs(), (0, -shape[1] % 128, 0, -shape[0] % 128))
        tile_amax = tile_amax.reshape(scale.shape[0], 128, scale.shape[1], 128).amax(dim=(1, 3))
        torch.testing.assert_close(scale, tile_amax / 448, rtol=0, atol=0)
    assert torch.equal(restored["model.embed_tokens.weight"], original["model.embed_tokens.weight"])


def test_fast_path_equals_reference_in_checkpoint(tmp_path):
    from quantscale.formats.fp8 import quantize_fp8_block

    src = _save(tmp_path / "src", _weights(1))
    q = _tensors(quantize_checkpoint_fp8(src, tmp_path / "fp8"))
    for name, w in load_file(src / "model.safetensors").items():
        if name.endswith("down_proj.weight"):
            ref_q, ref_s = quantize_fp8_block(w)
            assert torch.equal(q[name].view(torch.uint8), ref_q.view(torch.uint8))
            assert torch.equal(q[name + "_scale_inv"], ref_s)


def test_all_zero_rows_and_blocks_give_finite_scales_and_exact_zeros(tmp_path):
    w = torch.randn(300, 260) * 0.02
    w[5] = 0  # a zero row
    w[128:256, 128:256] = 0  # a zero tile
    w[256:, :] = 0  # zero edge tiles
    src = _save(tmp_path / "src", {"model.layers.0.mlp.up_proj.weight": w.to(torch.bfloat16)})
    fp8 = _tensors(quantize_checkpoint_fp8(src, tmp_path / "fp8"))
    scale = fp8["model.layers.0.mlp.up_proj.weight_scale_inv"]
    assert torch.isfinite(scale).all() and (scale > 0).all()
    deq = _tensors(dequantize_checkpoint(tmp_path / "fp8", tmp_path / "deq"))
    restored = deq["model.layers.0.mlp.up_proj.weight"]
    assert torch.isfinite(restored.float()).all()
    assert torch.equal(restored[w == 0].float(), torch.zeros(int((w == 0).sum())))


def test_ue8m0_scales_are_powers_of_two_and_declared(tmp_path):
    src = _save(tmp_path / "src", _weights(2))
    out = quantize_checkpoint_fp8(src, tmp_path / "fp8", scale_fmt="ue8m0")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["scale_fmt"] == "ue8m0"
    scales = [t for n, t in _tensors(out).items() if n.endswith("_scale_inv")]
    for s in scales:
        mantissa, _ = torch.frexp(s)
        assert torch.all(mantissa == 0.5)
    # rounding the scale up to a power of two at most halves each tile's largest code
    tensors = _tensors(out)
    for name, t in tensors.items():
        if t.dtype == torch.float8_e4m3fn:
            tile_max = block_amax(t.float())
            assert tile_max.min() >= 224 and tile_max.max() <= 448, name


def test_config_and_defaults_on_minimax_shapes(tmp_path):
    src = write_minimax_like(tmp_path / "src", layers=1, experts=2, shards=2, fp8=False)
    out = quantize_checkpoint_fp8(src, tmp_path / "fp8", ignore=["*.o_proj"])
    ckpt = Checkpoint(out)
    qc = ckpt.quantization_config
    assert qc["quant_method"] == "fp8" and qc["fmt"] == "e4m3"
    assert qc["activation_scheme"] == "dynamic" and qc["weight_block_size"] == [128, 128]
    skip = qc["modules_to_not_convert"]
    assert "lm_head" in skip and "model.embed_tokens" in skip
    assert "model.layers.0.self_attn.o_proj" in skip
    assert not any("self_attn" in m and not m.endswith("o_proj") for m in skip)
    assert ckpt.shards == Checkpoint(src).shards
    t = ckpt.tensors
    expert = "model.layers.0.block_sparse_moe.experts.0.w1"
    assert t[f"{expert}.weight"].dtype == "F8_E4M3"
    assert t[f"{expert}.weight_scale_inv"].shape == (12, 24)
    assert t["model.layers.0.self_attn.q_proj.weight_scale_inv"].shape == (48, 24)
    assert t["model.layers.0.self_attn.o_proj.weight"].dtype == "BF16"
    assert t["model.layers.0.block_sparse_moe.gate.weight"].dtype == "F32"
    bias = "model.layers.0.block_sparse_moe.e_score_correction_bias"
    assert t[bias].dtype == Checkpoint(src).tensors[bias].dtype
    assert t["lm_head.weight"].dtype == "BF16"


def test_tied_embeddings_list_lm_head(tmp_path):
    src = write_llama_like(tmp_path / "src", hidden=128, intermediate=256, layers=1, vocab=64)
    config = json.loads((src / "config.json").read_text())
    tied = _save(
        tmp_path / "tied",
        {n: t for n, t in _tensors(src).items() if not n.startswith("lm_head")},
        {**config, "tie_word_embeddings": True},
    )
    qc = Checkpoint(quantize_checkpoint_fp8(tied, tmp_path / "fp8")).quantization_config
    assert "lm_head" in qc["modules_to_not_convert"]


def test_inputs_unchanged_outputs_refused_and_cli(tmp_path, capsys):
    src = write_llama_like(tmp_path / "src", hidden=128, intermediate=256, layers=1, vocab=64)
    before = _dir_digest(src)
    out = tmp_path / "fp8"
    assert cli.main(["quantize", str(src), str(out), "--scheme", "fp8-block"]) == 0
    assert _dir_digest(src) == before
    first = _dir_digest(out)
    assert cli.main(["quantize", str(src), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert _dir_digest(out) == first
    with pytest.raises(OutputExistsError):
        quantize_checkpoint_fp8(src, out)
    args = ["quantize", str(src), str(out), "--overwrite", "--block", "64x128"]
    assert cli.main(args) == 0
    assert Checkpoint(out).quantization_config["weight_block_size"] == [64, 128]
    fp8_before = _dir_digest(out)
    assert cli.main(["dequantize", str(out), str(tmp_path / "deq")]) == 0
    assert _dir_digest(out) == fp8_before and _dir_digest(src) == before
    assert cli.main(["quantize", str(src), str(tmp_path / "x"), "--scheme", "nonsense"]) == 2
    assert "nonsense" in capsys.readouterr().err
    # --block used to be ignored outside fp8-block (the FP8_BLOCK preset kept 128x128)
    args = ["quantize", str(src), str(tmp_path / "x"), "--scheme", "FP8_BLOCK", "--block", "64x128"]
    assert cli.main(args) == 2
    assert "--block applies to the streamed --scheme fp8-block" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_refuses_quantized_input(tmp_path):
    src = write_llama_like(tmp_path / "src", hidden=128, intermediate=256, layers=1, vocab=64)
    fp8 = quantize_checkpoint_fp8(src, tmp_path / "fp8")
    with pytest.raises(QuantscaleError, match="already quantized"):
        quantize_checkpoint_fp8(fp8, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_failure_leaves_no_temp_dir_and_no_output(tmp_path, monkeypatch):
    src = write_llama_like(tmp_path / "src", hidden=128, intermediate=256, layers=2, vocab=64)
    real = fp8_quantize.quantize_fp8_block_fast
    boom_fn = _failing(real)
    monkeypatch.setattr(fp8_quantize, "quantize_fp8_block_fast", boom_fn)
    with pytest.raises(RuntimeError, match="injected"):
        quantize_checkpoint_fp8(src, tmp_path / "fp8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def _failing(real, after: int = 3):
    calls = []

    def fn(*args, **kwargs):
        calls.append(1)
        if len(calls) == after:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    return fn


def test_dequantize_reads_every_scale_layout(tmp_path):
    """HF weight_scale_inv, bf16 compressed-tensors weight_scale, ModelOpt 4-D, Neuron .scale."""
    src = _save(tmp_path / "src", _weights(3))
    fp8 = quantize_checkpoint_fp8(src, tmp_path / "fp8")
    reference = _tensors(dequantize_checkpoint(fp8, tmp_path / "deq"))
    hf = _tensors(fp8)
    layouts = {
        "ct": lambda n, s: {n.replace("_scale_inv", "_scale"): s},
        "modelopt": lambda n, s: {n.replace("_scale_inv", "_scale"): s[:, None, :, None]},
        "neuron": lambda n, s: {n.replace("weight_scale_inv", "scale"): s},
    }
    for layout, rename in layouts.items():
        tensors = {}
        for name, t in hf.items():
            tensors.update(rename(name, t) if name.endswith("_scale_inv") else {name: t})
        config = {"quantization_config": {"quant_method": "x", "weight_block_size": [128, 128]}}
        other = _save(tmp_path / layout, tensors, config)
        restored = _tensors(dequantize_checkpoint(other, tmp_path / f"{layout}-deq"))
        assert restored.keys() == reference.keys()
        for name, t in reference.items():
            assert torch.equal(restored[name], t), f"{layout}: {name}"
        cfg = json.loads((tmp_path / f"{layout}-deq" / "config.json").read_text())
        assert "quantization_config" not in cfg
    # bf16 scales (llm-compressor) dequantize with the bf16 values, not a reciprocal
    name = "model.layers.0.mlp.down_proj.weight"
    s16 = hf[name + "_scale_inv"].to(torch.bfloat16)
    tensors = {n: t for n, t in hf.items() if not n.endswith("_scale_inv")}
    tensors.update({n.replace("_scale_inv", "_scale"): t for n, t in hf.items() if "scale" in n})
    tensors[name.replace("weight", "weight_scale")] = s16
    restored = _tensors(dequantize_checkpoint(_save(tmp_path / "b", tensors), tmp_path / "bd"))
    ratio = restored[name].float() / reference[name].float()
    ok = reference[name].float() != 0
    assert (ratio[ok] - 1).abs().max() < 2**-7


def test_dequantize_errors_name_the_tensor(tmp_path):
    q = torch.zeros(256, 256, dtype=torch.float8_e4m3fn)
    bad = _save(tmp_path / "bad", {"m.layers.0.mlp.up_proj.weight": q})
    with pytest.raises(QuantscaleError, match="up_proj.weight.*no scale"):
        dequantize_checkpoint(bad, tmp_path / "out")
    grid = {"m.up_proj.weight": q, "m.up_proj.weight_scale_inv": torch.ones(3, 2)}
    with pytest.raises(QuantscaleError, match=r"up_proj.weight.*\(3, 2\)"):
        dequantize_checkpoint(_save(tmp_path / "grid", grid), tmp_path / "out2")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()
