"""Checkpoints as sources of plain tensors (checkpoint/source.py)."""

from __future__ import annotations

import json

import pytest
import torch

from quantscale.checkpoint.dequantize import dequantize_checkpoint
from quantscale.checkpoint.read import Checkpoint
from quantscale.checkpoint.source import open_source
from quantscale.checkpoint.synthetic import write_llama_like
from quantscale.errors import CheckpointError


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """A bf16 Llama of 3 layers in 3 shards."""
    return write_llama_like(tmp_path_factory.mktemp("src") / "l", 128, 256, 3, 64, shards=3)


def test_plain_source_names_and_tensors(llama3):
    src, ckpt = open_source(llama3), Checkpoint(llama3)
    assert src.path == llama3 and src.names() == ckpt.names()
    assert src.config["model_type"] == "llama" and "quantization_config" not in src.config
    for name in src.names():
        got = src.get(name)
        assert got.dtype == torch.bfloat16 and torch.equal(got, ckpt.get(name)), name
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(src.get(name, torch.float32), ckpt.get(name).float())


def test_layer_names(llama3):
    src = open_source(llama3)
    names = src.layer_names("model.layers.1.")
    assert len(names) == 9 and all(n.startswith("model.layers.1.") for n in names)
    assert src.layer_names("model.layers.1") == names  # the dot is implied
    assert src.layer_names("lm_head.") == ["lm_head.weight"]


def test_get_reads_only_its_shard(llama3):
    """One tensor costs one shard's open and exactly the tensor's bytes."""
    src = open_source(llama3)
    name = "model.layers.2.self_attn.q_proj.weight"
    src.get(name)
    info = src.checkpoint.tensors[name]
    assert src.files_read == [info.shard] and src.bytes_read == info.nbytes == 128 * 128 * 2
    assert info.shard == "model-00003-of-00003.safetensors"


def test_single_file_checkpoint(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "m")
    src = open_source(tmp_path / "m")
    state = tiny_llama.state_dict()
    assert set(src.names()) <= set(state)
    for name in src.names():
        assert torch.equal(src.get(name), state[name]), name


def test_errors(llama3, tmp_path):
    src = open_source(llama3)
    with pytest.raises(CheckpointError, match="no tensor named 'model.nope'"):
        src.get("model.nope")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        open_source(tmp_path / "missing")


# ------------------------------------------------------------------ quantized sources

TOKENS = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))


def _tiny(tied: bool = True):
    from tiny_models import make_tiny_llama

    return make_tiny_llama(
        96, 128, 256, torch.bfloat16, max_position_embeddings=64, tie_word_embeddings=tied
    )


def _same_as_dequantized(src, path, tmp_path, dtype, rename=lambda n: n):
    """Every tensor `dequantize_checkpoint` writes equals `src.get` of its plain name."""
    deq = Checkpoint(dequantize_checkpoint(path, tmp_path / f"deq-{path.name}", dtype=dtype))
    assert sorted(rename(n) for n in deq.names()) == sorted(src.names())
    for name in deq.names():
        want = deq.get(name)
        got = src.get(rename(name), dtype if src.is_quantized(rename(name)) else None)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    return deq


CT_CASES = {
    "NVFP4A16": {},
    "NVFP4": {},
    "MXFP4A16": {},
    "W4A16": {"actorder": "group"},
    "W4A16_ASYM": {},
    "W8A16": {},
    "W8A8": {},
    "FP8": {},
    "FP8_BLOCK": {},
}


@pytest.fixture(scope="module", params=list(CT_CASES))
def ct_export(request, tmp_path_factory):
    from quantscale.export.compressed_tensors import save_compressed_tensors
    from quantscale.quantize import quantize_model

    model = _tiny()
    method_kwargs = CT_CASES[request.param]
    method = "gptq" if method_kwargs else "rtn"
    quantize_model(model, request.param, TOKENS, method=method, batch_size=2, **method_kwargs)
    out = save_compressed_tensors(model, tmp_path_factory.mktemp("ct") / request.param)
    return model, out


def test_compressed_tensors_source(ct_export, tmp_path):
    from quantscale.export.compressed_tensors import read_compressed_tensors
    from quantscale.runtime.qlinear import quant_linears

    model, out = ct_export
    src = open_source(out)
    assert "quantization_config" not in src.config and src.dtype == torch.bfloat16
    state = {n: t for n, t in model.state_dict().items() if n != "lm_head.weight"}  # tied
    plain = [n for n in state if not n.rpartition(".")[2].startswith(("weight_", "input_"))]
    assert sorted(src.names()) == sorted(plain)
    linears = quant_linears(model)
    dense = read_compressed_tensors(out, dtype=torch.bfloat16)
    for name, ql in linears.items():
        w = src.get(f"{name}.weight")
        assert src.is_quantized(f"{name}.weight") and torch.equal(w, ql.weight), name
        assert torch.equal(w, dense[f"{name}.weight"]), name
    _same_as_dequantized(src, out, tmp_path, torch.float32)


@pytest.mark.parametrize("preset", ["NVFP4", "NVFP4A16"])
def test_modelopt_nvfp4_source(preset, tmp_path):
    from quantscale.export.modelopt import read_modelopt, save_modelopt
    from quantscale.quantize import quantize_model
    from quantscale.runtime.qlinear import quant_linears

    model = _tiny(tied=False)
    quantize_model(model, preset, TOKENS, method="rtn", batch_size=2)
    out = save_modelopt(model, tmp_path / "mo")
    src = open_source(out)
    dense = read_modelopt(out, dtype=torch.float32)
    assert sorted(src.names()) == sorted(dense)
    for name, ql in quant_linears(model).items():
        w = src.get(f"{name}.weight", torch.float32)
        assert torch.equal(w, dense[f"{name}.weight"]), name
        # e2m1 * scale * scale_2 vs e2m1 * scale / global_scale: the reciprocal's rounding
        torch.testing.assert_close(w, ql.weight.float(), rtol=2**-7, atol=0)
    _same_as_dequantized(src, out, tmp_path, torch.bfloat16)


@pytest.fixture(scope="module")
def fp8_sources(tmp_path_factory):
    """A bf16 Llama (2 shards) and its FP8 block copies in every FP8 convention."""
    from quantscale.checkpoint.convert import convert_checkpoint
    from quantscale.checkpoint.fp8_quantize import quantize_checkpoint_fp8

    root = tmp_path_factory.mktemp("fp8")
    bf16 = write_llama_like(root / "bf16", 256, 384, 2, 64, shards=2)
    hf = quantize_checkpoint_fp8(bf16, root / "hf", ignore=["lm_head"])
    out = {
        "hf": hf,
        "hf-ue8m0": quantize_checkpoint_fp8(bf16, root / "ue8m0", scale_fmt="ue8m0"),
        "compressed-tensors": convert_checkpoint(hf, root / "ct", "compressed-tensors"),
        "neuron": convert_checkpoint(hf, root / "neuron", "neuron"),
    }
    return bf16, out


@pytest.mark.parametrize("layout", ["hf", "hf-ue8m0", "compressed-tensors", "neuron"])
def test_fp8_block_sources(fp8_sources, layout, tmp_path):
    from quantscale.checkpoint.layouts import NEURON_SCALE, from_neuron_name
    from quantscale.formats.fp8 import dequantize_fp8_block

    bf16, paths = fp8_sources
    path, plain = paths[layout], Checkpoint(bf16)
    src = open_source(path)
    assert sorted(src.names()) == sorted(plain.names())  # plain names, Neuron renamed back
    assert "quantization_config" not in src.config and "neuron_quantization" not in src.config
    hf = Checkpoint(paths["hf-ue8m0" if layout == "hf-ue8m0" else "hf"])
    for name in plain.names():
        if not src.is_quantized(name):
            assert torch.equal(src.get(name), plain.get(name)), name
            continue
        ref = dequantize_fp8_block(hf.get(name), hf.get(name + "_scale_inv"), (128, 128))
        assert torch.equal(src.get(name), ref), name  # bf16: the config's dtype
        err = (src.get(name, torch.float32) - plain.get(name).float()).abs().max()
        assert err <= plain.get(name).float().abs().max() / 16, name
    assert not src.is_quantized("lm_head.weight") or layout == "hf-ue8m0"
    unprefixed = ["lm_head"]

    def rename(n: str) -> str:
        return from_neuron_name(n, NEURON_SCALE, unprefixed) if layout == "neuron" else n

    _same_as_dequantized(src, path, tmp_path, torch.float32, rename)


def test_modelopt_fp8_source(tmp_path):
    """ModelOpt FP8: per-tensor float32 `weight_scale`, `input_scale` beside it (consumed)."""
    from safetensors.torch import save_file

    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(1)) * 0.02
    scale = w.abs().amax() / 448
    tensors = {
        "model.layers.0.mlp.up_proj.weight": (w / scale).to(torch.float8_e4m3fn),
        "model.layers.0.mlp.up_proj.weight_scale": scale.reshape(()),
        "model.layers.0.mlp.up_proj.input_scale": torch.tensor(0.5),
        "model.norm.weight": torch.ones(48, dtype=torch.bfloat16),
    }
    path = tmp_path / "mo"
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    qc = {"quant_method": "modelopt", "quant_algo": "FP8"}
    (path / "config.json").write_text(json.dumps({"quantization_config": qc}))
    src = open_source(path)
    assert src.checkpoint and sorted(src.names()) == [
        "model.layers.0.mlp.up_proj.weight",
        "model.norm.weight",
    ]
    got = src.get("model.layers.0.mlp.up_proj.weight", torch.float32)
    want = tensors["model.layers.0.mlp.up_proj.weight"].float() * scale
    assert torch.equal(got, want)
    _same_as_dequantized(src, path, tmp_path, torch.float32)


def test_quantized_get_reads_weight_and_scale_only(fp8_sources):
    src = open_source(fp8_sources[1]["hf"])
    name = "model.layers.1.mlp.down_proj.weight"
    src.get(name)
    infos = [src.checkpoint.tensors[n] for n in (name, name + "_scale_inv")]
    assert src.bytes_read == sum(i.nbytes for i in infos) == 256 * 384 + 2 * 3 * 4
    assert src.files_read == ["model-00002-of-00002.safetensors"] * 2
    assert sorted(src.layer_names("model.layers.1.mlp.")) == [
        f"model.layers.1.mlp.{p}_proj.weight" for p in ("down", "gate", "up")
    ]
