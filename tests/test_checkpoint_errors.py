"""Bad checkpoints get a clear error naming the file and the tensor, from every command."""

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from quantscale import cli
from quantscale.checkpoint.read import INDEX_NAME, Checkpoint
from quantscale.errors import CheckpointError


def _sharded(path):
    path.mkdir()
    save_file({"a.weight": torch.ones(4, 4)}, str(path / "model-00001-of-00002.safetensors"))
    shard2 = {"b.weight": torch.ones(2, 8), "c.bias": torch.zeros(8)}
    save_file(shard2, str(path / "model-00002-of-00002.safetensors"))
    weight_map = {
        "a.weight": "model-00001-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors",
        "c.bias": "model-00002-of-00002.safetensors",
    }
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text("{}")
    return path


def _rewrite_header(file, edit):
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    file.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_good_sharded_checkpoint_opens(tmp_path):
    ckpt = Checkpoint(_sharded(tmp_path / "ok"))
    assert sorted(ckpt.tensors) == ["a.weight", "b.weight", "c.bias"]
    assert torch.equal(ckpt.get("b.weight"), torch.ones(2, 8))


def test_missing_shard_names_the_file(tmp_path):
    path = _sharded(tmp_path / "m")
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: shard file is"):
        Checkpoint(path)


def test_unknown_dtype_names_file_tensor_and_expected(tmp_path):
    path = _sharded(tmp_path / "d")
    shard = path / "model-00001-of-00002.safetensors"
    _rewrite_header(shard, lambda h: h["a.weight"].update(dtype="F9"))
    with pytest.raises(CheckpointError) as err:
        Checkpoint(path)
    msg = str(err.value)
    assert shard.name in msg and "'a.weight'" in msg and "'F9'" in msg and "BF16" in msg


def test_index_pointing_to_the_wrong_shard(tmp_path):
    path = _sharded(tmp_path / "i")
    index = json.loads((path / INDEX_NAME).read_text())
    index["weight_map"]["a.weight"] = "model-00002-of-00002.safetensors"
    (path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'a.weight'.*mapped to model-00002"):
        Checkpoint(path)


def test_tensor_missing_from_the_index(tmp_path):
    path = _sharded(tmp_path / "x")
    index = json.loads((path / INDEX_NAME).read_text())
    del index["weight_map"]["c.bias"]
    (path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'c.bias'.*missing from the index"):
        Checkpoint(path)


def test_spans_that_disagree_with_the_shape(tmp_path):
    path = _sharded(tmp_path / "s")
    _rewrite_header(
        path / "model-00002-of-00002.safetensors", lambda h: h["b.weight"].update(shape=[3, 8])
    )
    with pytest.raises(
        CheckpointError, match="'b.weight' spans 64 bytes but F32\\[3, 8\\] needs 96"
    ):
        Checkpoint(path)


@pytest.mark.parametrize("command", ["inspect", "validate", "dequantize", "convert", "quantize"])
def test_cli_reports_bad_input_without_traceback(tmp_path, capsys, command):
    path = _sharded(tmp_path / "c")
    (path / "model-00001-of-00002.safetensors").write_bytes(b"\x00" * 4)
    before = sorted(p.name for p in path.iterdir())
    argv = [command, str(path)]
    if command in ("dequantize", "convert", "quantize"):
        argv.append(str(tmp_path / "out"))
    if command == "convert":
        argv += ["--to", "neuron"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model-00001-of-00002.safetensors" in err
    assert "truncated" in err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in path.iterdir()) == before


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda h: h.update({"a.weight": [1, 2]}), "header entry is a JSON list"),
        (lambda h: h["a.weight"].update(shape="4x4"), "has shape '4x4'"),
        (lambda h: h["a.weight"].update(data_offsets=[64]), "has data_offsets \\[64\\]"),
        (lambda h: h["a.weight"].update(data_offsets=[64, 0]), "0 <= start <= end"),
        (lambda h: h["a.weight"].update(dtype=["F32"]), "has dtype \\['F32'\\]"),
    ],
)
def test_malformed_header_entry_names_file_and_tensor(tmp_path, edit, expected):
    path = _sharded(tmp_path / "h")
    _rewrite_header(path / "model-00001-of-00002.safetensors", edit)
    with pytest.raises(CheckpointError, match=expected) as err:
        Checkpoint(path)
    assert "model-00001-of-00002.safetensors" in str(err.value)


def test_header_that_is_not_an_object(tmp_path):
    path = _sharded(tmp_path / "l")
    shard = path / "model-00001-of-00002.safetensors"
    raw = b"[1, 2]  "
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="header is a JSON list; expected an object"):
        Checkpoint(path)


_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.text(max_size=4),
    st.lists(st.integers(-3, 100), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    field=st.sampled_from(["dtype", "shape", "data_offsets", None]),
    value=_JUNK,
    command=st.sampled_from(["inspect", "validate", "dequantize", "convert", "quantize"]),
)
def test_fuzzed_headers_give_one_line_errors(tmp_path_factory, capsys, field, value, command):
    """Any mutation of one header entry: a one-line error naming the file, or a clean run."""
    root = tmp_path_factory.mktemp("fuzz")
    path = _sharded(root / "c")
    shard = path / "model-00001-of-00002.safetensors"

    def edit(header):
        if field is None:
            header["a.weight"] = value
        else:
            header["a.weight"][field] = value

    _rewrite_header(shard, edit)
    argv = [command, str(path)]
    if command in ("dequantize", "convert", "quantize"):
        argv.append(str(root / "out"))
    if command == "convert":
        argv += ["--to", "neuron"]
    code = cli.main(argv)
    err = capsys.readouterr().err
    if code == 2:
        assert err.startswith("error: ") and "Traceback" not in err
        assert shard.name in err or "a.weight" in err
