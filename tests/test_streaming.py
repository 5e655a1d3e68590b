"""The streamed quantize path: same tensors and config as in memory, resumable, spills."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quantscale.calibration.boundary import Boundary, parse_bytes
from quantscale.checkpoint.read import Checkpoint
from quantscale.errors import CheckpointError, QuantscaleError
from quantscale.orchestrator import quantize_checkpoint
from quantscale.streaming import KILL_AFTER_ENV, StreamOptions, resolve_device

WORDS = "the cat sat on a mat while dogs ran far in green hills and rivers flow to sea".split()
CALIB = {"calib_samples": 8, "calib_seq_len": 32, "calib_batch_size": 4}
SCHEMES = [("w4a16", "rtn"), ("w4a16", "gptq"), ("nvfp4a16", "rtn"), ("w8a8", "gptq")]


def make_checkpoint(root: Path, layers: int, tied: bool = False, moe: bool = False) -> Path:
    """A tiny bf16 Llama (or Qwen3-MoE) checkpoint with a word-level tokenizer, and a
    calibration text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    vocab = {w: i for i, w in enumerate(["<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(root / "m")
    torch.manual_seed(0)
    shape = {
        "vocab_size": len(vocab),
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": tied,
    }
    if moe:
        extra = {"moe_intermediate_size": 128, "num_experts": 4, "num_experts_per_tok": 2}
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**shape, **extra, head_dim=32))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape))
    model.to(torch.bfloat16).save_pretrained(root / "m")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(WORDS), (3000,), generator=gen)
    (root / "calib.txt").write_text(" ".join(WORDS[i] for i in ids))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("stream"), layers=2)


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("stream4"), layers=4)


def run(root: Path, out: str, scheme: str, method: str, stream=False, **kw) -> Path:
    calib = {**CALIB, "calib_data": root / "calib.txt"}
    return quantize_checkpoint(
        root / "m", root / out, scheme, method=method, stream=stream, **calib, **kw
    )


def tensors(path: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(path)
    return {n: ckpt.get(n) for n in ckpt.names()}


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        assert torch.equal(ta[name], tb[name]), name
    ca = json.loads((a / "config.json").read_text())
    cb = json.loads((b / "config.json").read_text())
    assert ca == cb


def digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.mark.parametrize(("scheme", "method"), SCHEMES)
def test_streamed_equals_in_memory(tiny, scheme, method):
    mem = run(tiny, f"mem-{scheme}-{method}", scheme, method)
    streamed = run(tiny, f"st-{scheme}-{method}", scheme, method, stream=True)
    assert_same_checkpoint(mem, streamed)
    assert (streamed / "tokenizer.json").is_file()
    assert not Path(f"{streamed}.partial").exists()  # the work dir goes once finished
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2 + 2  # embeddings, 2 layers, head


@pytest.mark.parametrize(
    ("fmt", "scheme", "sidecar"),
    [("modelopt", "NVFP4A16", "hf_quant_config.json"), ("hf", "FP8_BLOCK", None)],
)
def test_streamed_formats_equal_in_memory(tiny, fmt, scheme, sidecar):
    """--stream --format modelopt / hf: the same tensors, config and side files as in memory."""
    mem = run(tiny, f"mem-{fmt}", scheme, "rtn", fmt=fmt)
    streamed = run(tiny, f"st-{fmt}", scheme, "rtn", stream=True, fmt=fmt)
    assert_same_checkpoint(mem, streamed)
    if sidecar is not None:
        assert json.loads((mem / sidecar).read_text()) == json.loads(
            (streamed / sidecar).read_text()
        )


def test_tied_embeddings_streamed(tmp_path):
    root = make_checkpoint(tmp_path, layers=2, tied=True)
    mem = run(root, "mem", "w4a16", "gptq")
    streamed = run(root, "st", "w4a16", "gptq", stream=True)
    assert_same_checkpoint(mem, streamed)
    assert "lm_head.weight" not in tensors(streamed)


@pytest.mark.parametrize("all_experts", [True, False])
def test_moe_streamed(tmp_path, all_experts):
    root = make_checkpoint(tmp_path, layers=2, moe=True)
    kw = {"calibrate_all_experts": all_experts}
    mem = run(root, "mem", "w4a16", "gptq", **kw)
    streamed = run(root, "st", "w4a16", "gptq", stream=True, **kw)
    assert_same_checkpoint(mem, streamed)
    assert "model.layers.1.mlp.experts.3.down_proj.weight_packed" in tensors(streamed)


def test_gptq_memory_budget_chunks_experts_with_the_same_weights(tmp_path, monkeypatch):
    """--gptq-memory below one expert's Hessian: experts in chunks, output unchanged."""
    from quantscale.algorithms import layer
    from quantscale.orchestrator import GPTQOptions

    counts: list[int] = []
    passes = layer.calibration_passes

    def counted(algorithm, linears):
        found = passes(algorithm, linears)
        counts.append(len(found))
        return found

    monkeypatch.setattr(layer, "calibration_passes", counted)
    root = make_checkpoint(tmp_path, layers=2, moe=True)
    whole = run(root, "whole", "w4a16", "gptq")
    assert max(counts) == 1
    counts.clear()
    chunked = run(root, "chunked", "w4a16", "gptq", gptq=GPTQOptions(memory_budget=1))
    assert max(counts) >= 3  # one expert per pass, then the other Linears
    assert_same_checkpoint(whole, chunked)
    assert GPTQOptions(memory_budget=1).method_options("gptq")["memory_budget"] == 1
    assert "memory_budget" not in GPTQOptions().method_options("gptq")


def test_true_sequential_streamed(tiny):
    mem = run(tiny, "mem-ts", "w8a8", "gptq", true_sequential=True)
    streamed = run(tiny, "st-ts", "w8a8", "gptq", stream=True, true_sequential=True)
    assert_same_checkpoint(mem, streamed)


def test_spilled_activations_give_the_same_output(tiny):
    full = run(tiny, "st-full", "w8a8", "gptq", stream=True)
    spilled = run(tiny, "st-spill", "w8a8", "gptq", stream=StreamOptions(max_memory=1024))
    assert digests(full) == digests(spilled)


def test_boundary_spills_past_the_budget(tmp_path):
    outs = [torch.randn(2, 3, 4).to(torch.bfloat16) for _ in range(3)]
    kept = Boundary(tmp_path, budget=None)
    record, back = kept.save(1, iter(outs))
    assert not kept.spilled and all(torch.equal(a, b) for a, b in zip(outs, back))
    small = Boundary(tmp_path, budget=100)
    record2, mapped = small.save(2, iter(outs))
    assert small.spilled and all(torch.equal(a, b) for a, b in zip(outs, mapped))
    assert record2.dtype == "bfloat16" and record2.shapes == [[2, 3, 4]] * 3
    small.prune(record2.name)
    assert not (tmp_path / record.name).exists() and (tmp_path / record2.name).exists()
    assert all(torch.equal(a, b) for a, b in zip(outs, Boundary(tmp_path).load(record2)))


def test_parse_bytes():
    assert parse_bytes("8GB") == 8 * 10**9 and parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1e3") == 1000
    with pytest.raises(ValueError, match="expected a size"):
        parse_bytes("lots")


def _cli(root: Path, out: str, *extra: str, env: dict | None = None):
    args = [sys.executable, "-m", "quantscale", "quantize", str(root / "m"), str(root / out)]
    args += ["--scheme", "w4a16", "--method", "gptq", "--stream", "--device", "cpu"]
    args += ["--calib-samples", "8", "--calib-seq-len", "32", "--calib-batch-size", "4"]
    args += ["--calib-data", str(root / "calib.txt"), *extra]
    full_env = {**os.environ, "QUANTSCALE_PROGRESS": "0", **(env or {})}
    return subprocess.run(args, env=full_env, capture_output=True, text=True, timeout=300)


def test_killed_run_resumes_byte_identical(tiny4):
    whole = _cli(tiny4, "whole")
    assert whole.returncode == 0, whole.stderr
    killed = _cli(tiny4, "resumed", env={KILL_AFTER_ENV: "1"})
    assert killed.returncode == -9, killed.stderr
    work = tiny4 / "resumed.partial"
    record = json.loads((work / "progress.json").read_text())
    assert record["done"] == 3 and record["boundary"]["name"] == "boundary-2.bin"
    assert not (tiny4 / "resumed").exists()
    other = _cli(tiny4, "resumed", "--dampening-frac", "0.05")
    assert other.returncode != 0 and "method_options" in other.stderr, other.stderr
    again = _cli(tiny4, "resumed")
    assert again.returncode == 0, again.stderr
    assert not work.exists()
    assert digests(tiny4 / "whole") == digests(tiny4 / "resumed")


def test_refusals(tiny, tmp_path):
    with pytest.raises(QuantscaleError, match="in-memory path"):
        run(tiny, "st-pseudo", "w4a16", "rtn", stream=True, fmt="pseudo")
    with pytest.raises(QuantscaleError, match="expected auto, cpu"):
        resolve_device("tpu")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    options = StreamOptions(work_dir=tmp_path / "busy")
    with pytest.raises(QuantscaleError, match="not empty"):
        run(tiny, "st-busy", "w4a16", "rtn", stream=options)
    assert (tmp_path / "busy" / "mine.txt").read_text() == "x"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streamed_on_cuda(tiny):
    streamed = run(tiny, "st-cuda", "w4a16", "gptq", stream=StreamOptions(device="cuda"))
    cpu = run(tiny, "st-cpu", "w4a16", "gptq", stream=StreamOptions(device="cpu"))
    ta, tb = tensors(streamed), tensors(cpu)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape


@pytest.mark.slow
@pytest.mark.parametrize(("scheme", "method"), [s for s in SCHEMES if s != ("w4a16", "gptq")])
def test_smollm2_streamed_equals_in_memory(tmp_path, scheme, method):
    calib = {"calib_samples": 4, "calib_seq_len": 64, "calib_batch_size": 4}
    mem = quantize_checkpoint("smollm2", tmp_path / "mem", scheme, method=method, **calib)
    streamed = quantize_checkpoint(
        "smollm2", tmp_path / "st", scheme, method=method, stream=True, **calib
    )
    assert_same_checkpoint(mem, streamed)


def test_full_disk_and_truncated_source_leave_no_out(tiny, tmp_path, monkeypatch):
    import quantscale.export.stream as stream

    def full(*_a, **_k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(stream, "save_file", full)
        with pytest.raises(CheckpointError, match=r"model-00001-of-00004.*No space left"):
            run(tiny, "st-full-disk", "w4a16", "rtn", stream=True)
    assert not (tiny / "st-full-disk").exists()
    assert (tiny / "st-full-disk.partial" / "progress.json").is_file()  # resumable
    assert run(tiny, "st-full-disk", "w4a16", "rtn", stream=True).is_dir()
    bad = make_checkpoint(tmp_path, layers=2)
    shard = bad / "m" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        run(bad, "out", "w4a16", "gptq", stream=True)
    assert not (bad / "out").exists()


def test_fp8_source_streams_without_a_bf16_copy(tiny):
    from quantscale.checkpoint.dequantize import dequantize_checkpoint
    from quantscale.checkpoint.fp8_quantize import quantize_checkpoint_fp8

    fp8 = quantize_checkpoint_fp8(tiny / "m", tiny / "fp8")
    assert Checkpoint(fp8).get("model.layers.0.mlp.up_proj.weight").dtype == torch.float8_e4m3fn
    bf16 = dequantize_checkpoint(fp8, tiny / "fp8-bf16")
    calib = {**CALIB, "calib_data": tiny / "calib.txt", "method": "gptq", "stream": True}
    from_fp8 = quantize_checkpoint(fp8, tiny / "st-from-fp8", "w4a16", **calib)
    from_copy = quantize_checkpoint(bf16, tiny / "st-from-copy", "w4a16", **calib)
    ta, tb = tensors(from_fp8), tensors(from_copy)
    assert sorted(ta) == sorted(tb) and all(torch.equal(ta[n], tb[n]) for n in ta)
    config = json.loads((from_fp8 / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert "weight_block_size" not in json.dumps(config)


def test_stream_flags():
    import argparse

    from quantscale.commands.quantize import register, stream_options

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    base = ["quantize", "in", "out", "--scheme", "w4a16"]
    assert parser.parse_args([*base, "--gptq-memory", "1GiB"]).gptq_memory == 2**30
    args = parser.parse_args([*base, "--stream", "--max-memory", "8GB", "--work-dir", "w"])
    assert stream_options(args) == StreamOptions(work_dir="w", device="auto", max_memory=8 * 10**9)
    assert stream_options(parser.parse_args(base)) is False
    with pytest.raises(SystemExit, match="--device only apply with --stream"):
        stream_options(parser.parse_args([*base, "--device", "cpu"]))


def _parts_of(model: torch.nn.Module, out: Path, fmt: str) -> Path:
    """`model` (quantized in memory) written part by part as the streamed run does."""
    from quantscale.export.stream import PartWriter, part_tensors

    tied = bool(model.config.tie_word_embeddings)
    layers = len(model.model.layers)
    parts = PartWriter(out.with_suffix(".work"), layers + 2, model.config.model_type)
    parts.dir.mkdir()
    embed = lambda n: n.startswith("model.embed_tokens.")  # noqa: E731
    head = lambda n: not n.startswith(("model.embed_tokens.", "model.layers."))  # noqa: E731
    parts.write(0, part_tensors(model, "", embed, tied, fmt))
    for i, layer in enumerate(model.model.layers):
        parts.write(i + 1, part_tensors(layer, f"model.layers.{i}", fmt=fmt))
    parts.write(layers + 1, part_tensors(model, "", head, tied, fmt))
    config, extra = parts.format_files(fmt, model)
    return parts.finish(out, config, extra_json=extra)


PART_JOBS = [("hf", "FP8_BLOCK"), ("modelopt", "NVFP4A16"), ("modelopt", "NVFP4")]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(("fmt", "preset"), PART_JOBS)
def test_parts_equal_whole_model_export(tmp_path, fmt, preset, tied):
    """Per-part tensors + finish-time config files == the in-memory exporter's output."""
    from tiny_models import make_tiny_llama

    from quantscale.export import export_model
    from quantscale.orchestrator import quantize_model

    model = make_tiny_llama(96, 128, 256, tie_word_embeddings=tied)
    tokens = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    quantize_model(model, preset, tokens, method="rtn", batch_size=2)
    whole = export_model(model, tmp_path / "whole", fmt)
    parts = _parts_of(model, tmp_path / "parts", fmt)
    assert_same_checkpoint(whole, parts)
    assert ("lm_head.weight" in tensors(parts)) is not tied
    side = {p.name for p in whole.iterdir() if p.suffix == ".json"} - {
        "config.json",
        "model.safetensors.index.json",
    }
    assert side == ({"hf_quant_config.json"} if fmt == "modelopt" else set())
    for name in side:
        assert json.loads((whole / name).read_text()) == json.loads((parts / name).read_text())
    qc = json.loads((parts / "config.json").read_text())["quantization_config"]
    assert (
        qc.get("quant_algo", qc["quant_method"])
        == {"FP8_BLOCK": "fp8", "NVFP4A16": "W4A16_NVFP4", "NVFP4": "NVFP4"}[preset]
    )


def test_part_tensors_refuses_unknown_format():
    from tiny_models import make_tiny_llama

    from quantscale.export.stream import part_tensors

    with pytest.raises(QuantscaleError, match="not 'gguf'"):
        part_tensors(make_tiny_llama(), fmt="gguf")
    with pytest.raises(QuantscaleError, match="pseudo is one file"):
        part_tensors(make_tiny_llama(), fmt="pseudo")


@pytest.fixture(scope="module")
def minimax_nvfp4(tmp_path_factory):
    """A MiniMax-M2-shaped FP8 block checkpoint (real names and shapes, 1 layer, 2 experts)
    streamed to NVFP4A16 with GPTQ; the peak bytes on disk beside the input after each part."""
    import quantscale.export.stream as stream
    from quantscale.checkpoint.synthetic import write_minimax_like

    root = tmp_path_factory.mktemp("minimax")
    src = write_minimax_like(root / "src", layers=1, experts=2, fp8=True)
    ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    written: list[int] = []
    write = stream.PartWriter.write

    def measured(self, index, tensors):
        path = write(self, index, tensors)
        written.append(sum(p.stat().st_size for p in root.rglob("*") if p.is_file()))
        return path

    patch = pytest.MonkeyPatch()
    patch.setattr(stream.PartWriter, "write", measured)
    try:
        calib = {"calib_data": ids, "calib_samples": 4, "calib_seq_len": 16, "stream": True}
        out = quantize_checkpoint(src, root / "out", "NVFP4A16", method="gptq", **calib)
    finally:
        patch.undo()
    return src, out, max(written)


def test_minimax_fp8_streams_to_nvfp4_without_a_bf16_copy(minimax_nvfp4):
    """No bf16 copy on disk (peak = input + output), every expert quantized from its own FP8
    weight, and compressed-tensors' own compressors decode every module as we do."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    from quantscale.checkpoint.source import open_source
    from quantscale.export.compressed_tensors import read_compressed_tensors

    src, out, peak = minimax_nvfp4
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())  # noqa: E731
    assert peak <= size(src) + size(out) + 2**20  # a bf16 copy would add ~4x the output
    config = json.loads((out / "config.json").read_text())
    qc = QuantizationConfig.model_validate(config["quantization_config"])
    scheme = next(iter(qc.config_groups.values()))
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    ours = read_compressed_tensors(out, dtype=torch.bfloat16)
    stored = tensors(out)
    fp8 = open_source(src)
    modules = sorted(n[: -len(".weight_packed")] for n in stored if n.endswith(".weight_packed"))
    expert = "model.layers.0.block_sparse_moe.experts.{}.{}"
    assert {expert.format(e, w) for e in (0, 1) for w in ("w1", "w2", "w3")} <= set(modules)
    assert len(modules) == 4 + 2 * 3
    for module in modules:
        local = {k[len(module) + 1 :]: v for k, v in stored.items() if k.startswith(module + ".")}
        theirs = compressor.decompress(local, scheme)["weight"].to(torch.bfloat16)
        assert torch.equal(theirs, ours[f"{module}.weight"]), module
        plain = fp8.get(f"{module}.weight", torch.float32)  # the FP8 source, dequantized
        err = (theirs.float() - plain).norm() / plain.norm()
        assert err < 0.2, (module, err)  # NVFP4 of this weight, not of another one
    assert "model.layers.0.block_sparse_moe.gate.weight" in stored  # the router stays as is
    assert not any(n.endswith("weight_scale_inv") for n in stored)


def test_minimax_nvfp4_validate_and_inspect(minimax_nvfp4, tmp_path):
    from quantscale.checkpoint.inspect import precision_report
    from quantscale.checkpoint.validate import validate_checkpoint
    from quantscale.export.compressed_tensors import read_compressed_tensors

    _, out, _ = minimax_nvfp4
    report = validate_checkpoint(out)
    assert report.ok and not report.findings, [f.message for f in report.findings]
    inspect = precision_report(out)
    assert inspect.fp8_weights == 0 and inspect.packed_weights == {"nvfp4-pack-quantized": 10}
    rows = {r.kind: r for r in inspect.kinds}
    assert rows["experts.w2"].blocks == {"1x16": 2} and rows["experts.w2"].tensors == 2
    assert rows["attention.o"].scale_shapes == {"3072x384": 1}
    dense = read_compressed_tensors(out, dtype=torch.bfloat16)
    assert inspect.bf16_bytes == sum(t.numel() * t.element_size() for t in dense.values())
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    name = "model.layers.0.block_sparse_moe.experts.1.w3.weight_global_scale"
    shard = broken / index["weight_map"][name]
    kept = {k: v for k, v in tensors(broken).items() if index["weight_map"][k] == shard.name}
    del kept[name], index["weight_map"][name]
    save_file(kept, str(shard), {"format": "pt"})
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    bad = validate_checkpoint(broken)
    assert not bad.ok and any(name in f.message for f in bad.errors), bad.to_dict()


def _damage(shard: Path, original: bytes, damage: str) -> None:
    """Delete, truncate, replace (another file: a header with an extra tensor, so every
    offset moves) or rewrite in place (same size, some bytes changed) a shard."""
    from safetensors.torch import load, save

    if damage == "deleted":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(original[:-4096])
    elif damage == "replaced":
        tensors = {"aaa.extra": torch.zeros(7), **load(original)}
        tmp = shard.with_suffix(".tmp")
        tmp.write_bytes(save(tensors))
        os.replace(tmp, shard)
    else:
        with open(shard, "r+b") as f:
            f.seek(len(original) - 64)
            f.write(bytes(64))


DAMAGE_ERRORS = {
    "deleted": "shard file is missing",
    "truncated": "changed after its header was read .its size went from",
    "replaced": "changed after its header was read .it was replaced by another file",
    "rewritten": "changed after its header was read .it was modified",
}


@pytest.mark.parametrize("damage", list(DAMAGE_ERRORS))
def test_source_shard_damaged_mid_run(tmp_path, monkeypatch, damage):
    """A source shard deleted, truncated, replaced or rewritten after the run started: an
    error naming the shard and the tensor (never values read at the old header's offsets),
    no OUT, and once the shard is back the same command resumes and gives the uninterrupted
    run's bytes."""
    import quantscale.export.stream as stream
    from quantscale.checkpoint.synthetic import write_llama_like

    src = write_llama_like(tmp_path / "src", hidden=128, intermediate=256, layers=2, shards=2)
    shard = src / "model-00002-of-00002.safetensors"  # layer 1, final norm, lm_head
    original = shard.read_bytes()
    ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    calib = {"calib_data": ids, "calib_samples": 4, "calib_seq_len": 16, "stream": True}
    whole = quantize_checkpoint(src, tmp_path / "whole", "w4a16", method="gptq", **calib)
    write = stream.PartWriter.write

    def damaging(self, index, tensors):
        path = write(self, index, tensors)
        if index == 1:  # layer 0 is written: damage the shard layer 1 is read from
            _damage(shard, original, damage)
        return path

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(stream.PartWriter, "write", damaging)
        with pytest.raises(CheckpointError, match=rf"{shard.name}.*{DAMAGE_ERRORS[damage]}") as err:
            quantize_checkpoint(src, out, "w4a16", method="gptq", **calib)
    assert "tensor 'model.layers.1." in str(err.value), err.value
    assert not out.exists()
    assert json.loads((tmp_path / "out.partial" / "progress.json").read_text())["done"] == 2
    shard.write_bytes(original)
    quantize_checkpoint(src, out, "w4a16", method="gptq", **calib)
    assert digests(out) == digests(whole)
