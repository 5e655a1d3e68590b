"""Checkpoints as sources of plain tensors (checkpoint/source.py)."""

from __future__ import annotations

import json

import pytest
import torch

from quantscale.checkpoint.dequantize import dequantize_checkpoint
from quantscale.checkpoint.layouts import detect_layout
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
    assert detect_layout(deq) is None  # a plain checkpoint
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
    "FP8": {},  # per tensor, static input scale
    "FP8_DYNAMIC": {},  # per channel
    "FP8_BLOCK": {},  # 128x128 blocks
}


@pytest.fixture(scope="module", params=list(CT_CASES))
def ct_export(request, tmp_path_factory):
    from quantscale.export.compressed_tensors import save_compressed_tensors
    from quantscale.orchestrator import quantize_model

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
    from quantscale.orchestrator import quantize_model
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
    deq = _same_as_dequantized(src, out, tmp_path, torch.bfloat16)
    assert detect_layout(deq) is None and not (deq.path / "hf_quant_config.json").exists()


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
    assert torch.equal(src.get(name, device="cpu"), src.get(name))
    assert sorted(src.layer_names("model.layers.1.mlp.")) == [
        f"model.layers.1.mlp.{p}_proj.weight" for p in ("down", "gate", "up")
    ]


def _rewrite(src_dir, out, change):
    """A copy of single-file checkpoint `src_dir` with `change(tensors)` applied."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(src_dir / "model.safetensors")
    change(tensors)
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text((src_dir / "config.json").read_text())
    return out


@pytest.fixture(scope="module")
def nvfp4_ct(tmp_path_factory):
    from quantscale.export.compressed_tensors import save_compressed_tensors
    from quantscale.orchestrator import quantize_model

    model = _tiny()
    quantize_model(model, "NVFP4A16", TOKENS, method="rtn")
    return save_compressed_tensors(model, tmp_path_factory.mktemp("nv") / "ct")


def test_bad_quantized_sources_name_file_and_tensor(nvfp4_ct, tmp_path):
    q = "model.layers.0.self_attn.q_proj"

    def drop_scale(t):
        t.pop(f"{q}.weight_scale")
        t[f"{q}.weight"] = torch.zeros(128, 128, dtype=torch.float8_e4m3fn)
        t.pop(f"{q}.weight_packed")

    def bad_grid(t):
        t[f"{q}.weight_scale"] = t[f"{q}.weight_scale"][:, :4].contiguous()

    def bad_dtype(t):
        t[f"{q}.weight_packed"] = t[f"{q}.weight_packed"].to(torch.int32)

    def drop_global(t):
        t.pop(f"{q}.weight_global_scale")

    cases = {
        "scale": (drop_scale, rf"{q}.weight'.* has no scale"),
        "global": (drop_global, rf"{q}.weight_packed' has no '{q}.weight_global_scale' \(F32\)"),
        "grid": (bad_grid, rf"{q}.weight_scale' has shape \[128, 4\]; expected \[128, 8\]"),
        "dtype": (bad_dtype, rf"{q}.weight_packed' is I32; expected U8"),
    }
    for case, (change, message) in cases.items():
        bad = _rewrite(nvfp4_ct, tmp_path / case, change)
        with pytest.raises(CheckpointError, match=rf"{bad}/model.safetensors: .*{message}"):
            open_source(bad)


def test_fp8_scale_grid_mismatch_names_the_tensor(fp8_sources, tmp_path):
    from safetensors.torch import load_file, save_file

    hf = fp8_sources[1]["hf"]
    name = "model.layers.0.mlp.up_proj.weight"
    shard = Checkpoint(hf).tensors[name].shard
    tensors = load_file(hf / shard)
    tensors[name + "_scale_inv"] = torch.ones(5, 5)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((hf / "config.json").read_text())
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{name}'.*\(5, 5\)"):
        open_source(bad)  # from the headers, before any tensor is read


def test_unknown_dtype_is_refused_at_open(tmp_path):
    import struct

    header = json.dumps({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header + b"\0"
    )
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'w' has dtype 'F4'"):
        open_source(tmp_path / "m")


@pytest.fixture(scope="module")
def minimax(tmp_path_factory):
    """MiniMax-M2-shaped FP8 (1 layer, 2 experts) and its bf16 twin (same seed)."""
    from quantscale.checkpoint.synthetic import write_minimax_like

    root = tmp_path_factory.mktemp("mm")
    return write_minimax_like(root / "fp8", 1, 2, 2), write_minimax_like(
        root / "bf", 1, 2, 2, fp8=False
    )


def test_minimax_fp8_source_has_plain_names(minimax):
    fp8, bf16 = minimax
    src, plain = open_source(fp8), Checkpoint(bf16)
    assert sorted(src.names()) == sorted(plain.names())  # experts, router, score bias
    moe = "model.layers.0.block_sparse_moe"
    assert f"{moe}.experts.1.w2.weight" in src.layer_names("model.layers.0.")
    for kept in (f"{moe}.gate.weight", f"{moe}.e_score_correction_bias", "lm_head.weight"):
        assert not src.is_quantized(kept) and src.get(kept).dtype == plain.get(kept).dtype
        assert torch.equal(src.get(kept), plain.get(kept))
    w = f"{moe}.experts.0.w1.weight"
    assert src.is_quantized(w) and src.get(w).dtype == torch.bfloat16
    assert src.config["model_type"] == "minimax_m2" and "quantization_config" not in src.config


def test_minimax_names_are_what_transformers_reads(minimax):
    """transformers' MiniMax-M2 (built on the meta device from the source's config) has
    exactly the source's names after its checkpoint conversion (block_sparse_moe -> mlp,
    experts' w1 + w3 -> gate_up_proj, w2 -> down_proj)."""
    import re

    from transformers import AutoConfig, AutoModelForCausalLM

    src = open_source(minimax[0])
    config = AutoConfig.for_model(**src.config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    rules = [
        (r"\.experts\.\d+\.w[13]\.weight$", ".experts.gate_up_proj"),
        (r"\.experts\.\d+\.w2\.weight$", ".experts.down_proj"),
        (r"\.block_sparse_moe\.", ".mlp."),
    ]
    converted = set()
    for name in src.names():
        for pattern, repl in rules:
            name = re.sub(pattern, repl, name)
        converted.add(name)
    assert converted == set(model.state_dict())


@pytest.mark.slow
def test_minimax_source_loads_in_transformers(minimax, tmp_path):
    """transformers' MiniMax-M2 reads the dequantized names with no missing or unexpected
    key; its fused experts hold the source's w1/w3 and w2."""
    from transformers import AutoModelForCausalLM

    src = open_source(minimax[0])
    deq = dequantize_checkpoint(minimax[0], tmp_path / "deq")
    model, info = AutoModelForCausalLM.from_pretrained(
        deq, dtype=torch.bfloat16, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    moe, mlp = "model.layers.0.block_sparse_moe", model.model.layers[0].mlp
    for e in range(2):
        gate_up = torch.cat(
            [src.get(f"{moe}.experts.{e}.w1.weight"), src.get(f"{moe}.experts.{e}.w3.weight")]
        )
        assert torch.equal(mlp.experts.gate_up_proj[e], gate_up)
        assert torch.equal(mlp.experts.down_proj[e], src.get(f"{moe}.experts.{e}.w2.weight"))
    assert torch.equal(mlp.gate.weight, src.get(f"{moe}.gate.weight", torch.bfloat16))


@pytest.mark.slow
def test_smollm2_fp8_block_source_equals_dequantize(tmp_path):
    """`quantscale quantize M OUT --scheme fp8-block`, opened as a source, gives exactly the
    tensors `quantscale dequantize` writes (bf16), tied lm_head absent."""
    from quantscale import cli
    from quantscale.data import assets

    model = assets.smollm2_checkpoint()
    fp8, deq = tmp_path / "fp8", tmp_path / "deq"
    assert cli.main(["quantize", str(model), str(fp8), "--scheme", "fp8-block"]) == 0
    assert cli.main(["dequantize", str(fp8), str(deq)]) == 0
    src, plain = open_source(fp8), Checkpoint(deq)
    assert sorted(src.names()) == sorted(plain.names())
    assert "lm_head.weight" not in src.names() and src.config["tie_word_embeddings"]
    quantized = [n for n in src.names() if src.is_quantized(n)]
    assert len(quantized) == 30 * 7
    for name in src.names():
        assert torch.equal(src.get(name), plain.get(name)), name


def test_fake_quant_save_is_a_plain_source(tmp_path):
    """Our fake-quant save stores weights dequantized: the source drops the qparam buffers."""
    from quantscale.export.fake_quant import save_quantized
    from quantscale.orchestrator import quantize_model

    model = _tiny()
    quantize_model(model, "W8A8", TOKENS, method="rtn", batch_size=2)
    src = open_source(save_quantized(model, tmp_path / "fq"))
    state = model.state_dict()
    leaves = ("weight", "bias")
    plain = [n for n in state if n.rpartition(".")[2] in leaves and n != "lm_head.weight"]
    assert sorted(src.names()) == sorted(plain)
    assert not any(src.is_quantized(n) for n in src.names())
    for name in src.names():
        assert torch.equal(src.get(name), state[name]), name


def test_shard_gone_or_truncated_after_open(tmp_path):
    """A shard removed or cut short after the source was opened: the error names it and
    the tensor."""
    path = write_llama_like(tmp_path / "l", 128, 256, 2, 64, shards=2)
    src = open_source(path)
    first = "model.layers.0.mlp.up_proj.weight"
    last = "model.layers.1.mlp.up_proj.weight"
    shard = path / src.checkpoint.tensors[last].shard
    shard.write_bytes(shard.read_bytes()[: src.checkpoint.tensors[last].offset + 10])
    with pytest.raises(CheckpointError, match=rf"{shard}: the shard changed .*size.*'{last}'"):
        src.get(last)
    with pytest.raises(CheckpointError, match=rf"{shard}: truncated file: tensor '{last}'"):
        open_source(path).get(last)  # opened after the cut: the header's offsets overrun
    gone = path / src.checkpoint.tensors[first].shard
    gone.unlink()
    with pytest.raises(
        CheckpointError, match=rf"{gone}: shard file is missing \(tensor '{first}'\)"
    ):
        src.get(first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dequantize_on_the_device_equals_the_cpu(fp8_sources, nvfp4_ct, ct_export):
    """`get(..., device="cuda")` dequantizes on the GPU: the same values as on the CPU."""
    for path in (fp8_sources[1]["hf"], fp8_sources[1]["neuron"], nvfp4_ct, ct_export[1]):
        src = open_source(path)
        for name in src.names():
            for dtype in (torch.float32, torch.bfloat16):
                got = src.get(name, dtype, device="cuda")
                assert got.device.type == "cuda", name
                assert torch.equal(got.cpu(), src.get(name, dtype)), (path, name)


def test_streamed_quantize_from_fp8_equals_from_its_dequantized_copy(tmp_path):
    """The streamed path reads an FP8 source per tensor: its output is the output from the
    float32 copy `dequantize` writes, tensor for tensor (no bf16 copy on disk needed)."""
    from quantscale.checkpoint.synthetic import write_llama_like
    from quantscale.orchestrator import quantize_checkpoint

    fp8 = write_llama_like(tmp_path / "fp8", 256, 512, 2, 512, shards=2, fp8=True)
    deq = dequantize_checkpoint(fp8, tmp_path / "deq", dtype="fp32")
    a, b = (
        Checkpoint(
            quantize_checkpoint(p, tmp_path / f"{p.name}-q", "W4A16", method="rtn", stream=True)
        )
        for p in (fp8, deq)
    )
    assert sorted(a.names()) == sorted(b.names()) and len(a.names()) == 49
    for name in a.names():
        assert torch.equal(a.get(name), b.get(name)), name
