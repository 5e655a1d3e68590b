"""Checkpoints as sources of plain tensors (checkpoint/source.py)."""

from __future__ import annotations

import pytest
import torch

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
