"""`validate --runtime llama.cpp` (checkpoint.llama_cpp): GGUF files our exporter writes pass;
the same files with one thing llama.cpp 0.3.36 refuses (an extra tensor, a missing one, a
wrong shape, a row its block does not divide, a missing metadata key) are refused by name;
safetensors exports its convert_hf_to_gguf.py cannot convert are named too.

Run in llama.cpp (llama-cpp-python 0.3.36): a SmolLM2 GGUF of an earlier exporter that kept
the scale buffers (`done_getting_tensors: wrong number of tensors; expected 483, got 273`, the
numbers the rule gives); this file's clean tiny GGUF (loads), its ragged-row, missing-tensor
and merges-less variants (refused with the messages the rules quote).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_llama

from quantscale.checkpoint.llama_cpp import gguf_refusals
from quantscale.checkpoint.refusal import LLAMA_CPP_CONVERT
from quantscale.checkpoint.runtimes import runtime_refusals
from quantscale.checkpoint.validate import validate_checkpoint
from quantscale.export import export_model
from quantscale.orchestrator import quantize_model

gguf = pytest.importorskip("gguf")
CALIB = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level-BPE-shaped tokenizer.json (what --format gguf reads) for the tiny Llama."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    letters = [chr(97 + i) for i in range(26)]
    vocab = {t: i for i, t in enumerate([*letters, "ab", *(f"w{i}" for i in range(101))])}
    path = tmp_path_factory.mktemp("tok")
    bpe = models.BPE(vocab, [("a", "b")])
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(bpe)).save_pretrained(path)
    return path


def _gguf(tmp_path, tokenizer_dir, monkeypatch=None, edit=None, scheme="Q8_0"):
    """Our Q8_0 GGUF of the tiny Llama; `edit(tensors)` changes the tensor dict the exporter
    writes (GGUF name -> (data, GGML type id or None))."""
    from quantscale.export import gguf as gguf_export
    from quantscale.export.gguf import save_gguf

    if edit is not None:
        plain = gguf_export._gguf_tensors
        monkeypatch.setattr(gguf_export, "_gguf_tensors", lambda *a: edit(plain(*a)))
    model = make_tiny_llama()
    quantize_model(model, scheme, None, method="rtn")
    out = save_gguf(model, tmp_path / "out", source_dir=tokenizer_dir)
    return out / "model.gguf"


def _errors(file) -> dict[str, str]:
    report = validate_checkpoint(file, runtime="llama.cpp")
    return {t: f.message for f in report.errors for t in f.tensors}


@pytest.mark.parametrize("scheme", ["Q8_0", "Q4_K_M"])
def test_our_gguf_files_pass(tmp_path, tokenizer_dir, scheme):
    file = _gguf(tmp_path, tokenizer_dir, scheme=scheme)
    assert gguf_refusals(file) == []
    assert validate_checkpoint(file.parent, runtime="llama.cpp").ok


def test_extra_tensor_is_refused_with_llama_cpp_counts(tmp_path, tokenizer_dir, monkeypatch):
    def add_scale(tensors):
        tensors["blk.0.attn_q.weight_scale"] = (np.ones((64, 2), np.float32), None)
        return tensors

    file = _gguf(tmp_path, tokenizer_dir, monkeypatch, add_scale)
    errors = _errors(file)
    assert list(errors) == ["blk.0.attn_q.weight_scale"]
    n = len(gguf.GGUFReader(str(file)).tensors)
    assert (
        f"wrong number of tensors; expected {n}, got {n - 1}" in errors["blk.0.attn_q.weight_scale"]
    )
    assert "llama.cpp 0.3.36" in errors["blk.0.attn_q.weight_scale"]


def test_missing_and_misshapen_tensors_are_refused(tmp_path, tokenizer_dir, monkeypatch):
    def edit(tensors):
        del tensors["blk.1.ffn_up.weight"]
        tensors["blk.0.ffn_norm.weight"] = (np.ones(32, np.float32), None)
        return tensors

    errors = _errors(_gguf(tmp_path, tokenizer_dir, monkeypatch, edit))
    assert set(errors) == {"blk.1.ffn_up.weight", "blk.0.ffn_norm.weight"}
    assert "tensor 'blk.1.ffn_up.weight' not found" in errors["blk.1.ffn_up.weight"]
    assert "wrong shape; expected [64], got [32]" in errors["blk.0.ffn_norm.weight"]


def test_row_not_a_multiple_of_the_block_is_refused(tmp_path, tokenizer_dir, monkeypatch):
    q4_k = int(gguf.GGMLQuantizationType.Q4_K)

    def edit(tensors):  # a Q4_K header on 64-wide rows (its superblock is 256)
        tensors["blk.0.attn_v.weight"] = (np.zeros((32, 64), np.float16), q4_k)
        return tensors

    errors = _errors(_gguf(tmp_path, tokenizer_dir, monkeypatch, edit))
    assert list(errors) == ["blk.0.attn_v.weight"]
    assert (
        "has 64 elements per row, not a multiple of block size (256)"
        in errors["blk.0.attn_v.weight"]
    )


def test_missing_metadata_key_is_refused(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(gguf.GGUFWriter, "add_layer_norm_rms_eps", lambda self, v: None)
    errors = _errors(_gguf(tmp_path, tokenizer_dir))
    assert "key not found in model" in errors["llama.attention.layer_norm_rms_epsilon"]


def test_bpe_vocabulary_without_merges(tmp_path, tokenizer_dir, monkeypatch):
    """llama.cpp refuses it ('cannot find tokenizer merges', run there); our exporter refuses
    to write one, and validate names the missing key in a file written without them."""
    import json

    from quantscale.errors import QuantscaleError

    bare = tmp_path / "bare"
    bare.mkdir()
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tok["model"]["merges"] = []
    (bare / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(QuantscaleError, match="no BPE merges"):
        _gguf(tmp_path, bare)
    monkeypatch.setattr(gguf.GGUFWriter, "add_token_merges", lambda self, m: None)
    errors = _errors(_gguf(tmp_path, tokenizer_dir))
    assert "cannot find tokenizer merges" in errors["tokenizer.ggml.merges"]


def _export(tmp_path, scheme, fmt="compressed-tensors", **kw):
    model = make_tiny_llama(96, 128, 256, torch.bfloat16)
    quantize_model(model, scheme, CALIB, **kw)
    return export_model(model, tmp_path / scheme, fmt)


def _convert(out) -> dict[str, str]:
    return {r.tensor: r.reason for r in runtime_refusals(out, "llama.cpp")}


def test_converter_rules_name_what_convert_hf_to_gguf_refuses(tmp_path):
    static = _convert(_export(tmp_path, "W8A8"))  # int-quantized, channel: only input_scale
    assert static and all(t.endswith(".input_scale") for t in static)
    assert (
        "Can not map tensor 'model.layers.0.mlp.down_proj.input_scale'"
        in (static["model.layers.0.mlp.down_proj.input_scale"])
    )
    w8a16 = _convert(_export(tmp_path, "W8A16"))  # pack-quantized per channel: an assert
    assert "takes only group-wise packed weights" in w8a16["config.json quantization_config"]
    assert _convert(_export(tmp_path, "W4A16")) == {}  # pack-quantized groups convert
    assert _convert(_export(tmp_path, "FP8_DYNAMIC")) == {}


def test_converter_rules_only_when_named(tmp_path):
    out = _export(tmp_path, "W8A8")
    assert not [r for r in runtime_refusals(out) if r.runtime == LLAMA_CPP_CONVERT]
    assert not [r for r in runtime_refusals(out, "vllm") if r.runtime == LLAMA_CPP_CONVERT]
    assert {r.runtime for r in runtime_refusals(out, "llama-cpp")} == {LLAMA_CPP_CONVERT}


def test_truncated_gguf_is_a_clear_error(tmp_path, tokenizer_dir):
    from quantscale.errors import CheckpointError

    data = _gguf(tmp_path, tokenizer_dir).read_bytes()
    for cut in (3, 200):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=f"cut{cut}.gguf: not a readable GGUF file"):
            validate_checkpoint(bad, runtime="llama.cpp")
