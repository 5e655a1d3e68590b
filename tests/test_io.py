"""Streaming shard writer: save_file's bytes, any arrival order, no output on failure."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantscale.checkpoint import read, transform, write
from quantscale.checkpoint.read import Checkpoint
from quantscale.checkpoint.transform import transform_checkpoint
from quantscale.checkpoint.write import ShardStream
from quantscale.errors import CheckpointError


def _mixed(seed: int = 0) -> dict[str, torch.Tensor]:
    """One tensor of every dtype, plus 0-d, empty and odd-sized ones."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, (dtype, _)) in enumerate(read.DTYPES.items()):
        x = torch.randn(3 + i, 5, generator=gen) * 10
        out[f"m.{name.lower()}.w"] = x > 0 if dtype == torch.bool else x.to(dtype)
    out["m.scalar"] = torch.tensor(2.5)
    out["m.empty"] = torch.zeros(0, 7, dtype=torch.bfloat16)
    out["m.odd"] = torch.arange(7, dtype=torch.uint8)
    return out


def _plan(tensors: dict[str, torch.Tensor]) -> list[write.PlannedTensor]:
    return [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_stream_writes_save_file_bytes_in_any_order(tmp_path):
    tensors = _mixed()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    order = list(tensors)
    random.Random(1).shuffle(order)
    with ShardStream(tmp_path / "ours.safetensors", _plan(tensors), {"format": "pt"}) as s:
        for i, name in enumerate(order):
            t = tensors[name]
            if i % 3 == 0 or t.ndim == 0:
                s.put(name, t)
            elif i % 3 == 1:  # by rows, last rows first
                for r in reversed(range(0, t.shape[0], 2)):
                    s.put_rows(name, t[r : r + 2], r)
            else:  # raw bytes, in 3-byte pieces
                raw = t.reshape(-1).view(torch.uint8)
                for a in range(0, raw.numel(), 3):
                    s.put_bytes(name, raw[a : a + 3], a)
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert ours == (tmp_path / "ref.safetensors").read_bytes()
    with safe_open(tmp_path / "ours.safetensors", framework="pt") as f:
        for name, t in tensors.items():
            assert torch.equal(_bits(f.get_tensor(name)), _bits(t))


def test_stream_refuses_what_the_plan_does_not_say(tmp_path):
    plan = [("a", torch.float32, (2, 3)), ("b", torch.bfloat16, (4,))]
    with pytest.raises(CheckpointError, match=r"'a' is torch.float16\[2, 3\]"):
        with ShardStream(tmp_path / "x.safetensors", plan) as s:
            s.put("a", torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(CheckpointError, match="'c' not in the plan"):
        with ShardStream(tmp_path / "x.safetensors", plan) as s:
            s.put("c", torch.zeros(4))
    with pytest.raises(CheckpointError, match="'a' written twice"):
        with ShardStream(tmp_path / "x.safetensors", plan) as s:
            s.put("a", torch.zeros(2, 3))
            s.put("a", torch.zeros(2, 3))
    with pytest.raises(CheckpointError, match=r"1 planned tensors never written \(b\)"):
        with ShardStream(tmp_path / "x.safetensors", plan) as s:
            s.put("a", torch.zeros(2, 3))
    with pytest.raises(CheckpointError, match=r"rows 1\.\. of .* do not fit tensor 'a'"):
        with ShardStream(tmp_path / "x.safetensors", plan) as s:
            s.put_rows("a", torch.zeros(2, 3), 1)
    with pytest.raises(CheckpointError, match="'a' written twice"):
        with ShardStream(tmp_path / "x.safetensors", plan) as s:
            s.put_rows("a", torch.zeros(2, 3), 0)
            s.put_rows("a", torch.zeros(1, 3), 1)
    with pytest.raises(CheckpointError, match="8 bytes at 2 do not fit tensor 'b'"):
        with ShardStream(tmp_path / "x.safetensors", plan) as s:
            s.put_bytes("b", torch.zeros(8, dtype=torch.uint8), 2)


def _source(tmp_path: Path) -> Path:
    """A 2-shard checkpoint with an index, a config and a tokenizer file."""
    src = tmp_path / "src"
    src.mkdir()
    tensors = _mixed()
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[:6],
        "model-00002-of-00002.safetensors": names[6:],
    }
    weight_map = {}
    for shard, group in shards.items():
        save_file({n: tensors[n] for n in group}, str(src / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (src / read.INDEX_NAME).write_text(json.dumps(index))
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "tokenizer.json").write_text("{}")
    return src


def _double_floats(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    if t.is_floating_point() and t.itemsize > 1:
        return {name: t * 2, f"{name}.half": (t / 2).float()}
    return {name: t} if t.dtype != torch.bool else {}


def _double_plan(name: str, info: read.TensorInfo) -> list[write.PlannedTensor]:
    dtype = info.torch_dtype
    if dtype.is_floating_point and dtype.itemsize > 1:
        return [(name, dtype, info.shape), (f"{name}.half", torch.float32, info.shape)]
    return [(name, dtype, info.shape)] if dtype != torch.bool else []


def _kinds_plan(name: str, info: read.TensorInfo) -> transform.TensorPlan:
    """Every plan kind: floats doubled by rows (2-D) or whole, ints copied raw, bools dropped."""
    outputs = tuple(_double_plan(name, info))
    if info.dtype in ("I64", "I32", "I16", "I8", "U8"):
        return transform.TensorPlan.copy(name, info)
    if len(outputs) == 2 and len(info.shape) == 2:
        return transform.TensorPlan(outputs, "rows", rows=2)
    return transform.TensorPlan(outputs)


def _double_rows(name: str, band: torch.Tensor, first: int) -> dict:
    return {n: (t, first) for n, t in _double_floats(name, band).items()}


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
@pytest.mark.parametrize("kinds", [False, True])
def test_streamed_transform_equals_collected_one(tmp_path, monkeypatch, chunk, kinds):
    """Also when tensors are read in pieces smaller than a row (a band is still whole rows)."""
    for module in (read, transform):  # the reader groups, the planner splits
        monkeypatch.setattr(module, "CHUNK_BYTES", chunk)
    src = _source(tmp_path)
    ckpt = Checkpoint(src)
    collected = transform_checkpoint(ckpt, tmp_path / "a", _double_floats, {"k": 1})
    plan_fn = _kinds_plan if kinds else _double_plan
    streamed = transform_checkpoint(
        ckpt, tmp_path / "b", _double_floats, {"k": 1}, plan_fn=plan_fn, rows_fn=_double_rows
    )
    assert _digest(collected) == _digest(streamed)
    out = Checkpoint(streamed)
    assert out.config == {"k": 1} and (streamed / "tokenizer.json").exists()
    for name in ckpt.names():
        expected = _double_floats(name, ckpt.get(name))
        for out_name, value in expected.items():
            assert torch.equal(_bits(out.get(out_name)), _bits(value))
    assert len(out.tensors) == sum(len(_double_plan(n, i)) for n, i in ckpt.tensors.items())


def test_plan_kinds_read_in_pieces(tmp_path, monkeypatch):
    """Copies go in CHUNK_BYTES pieces, bands are whole multiples of the plan's rows."""
    for module in (read, transform):  # the reader groups, the planner splits
        monkeypatch.setattr(module, "CHUNK_BYTES", 40)
    ckpt = Checkpoint(_source(tmp_path))
    shard = ckpt.shards[0]
    plans = {n: _kinds_plan(n, ckpt.tensors[n]) for n in ckpt.names(shard)}
    pieces = transform._pieces(ckpt, plans)
    for name, plan in plans.items():
        info = ckpt.tensors[name]
        mine = [p for p in pieces if p.info.name == name]
        assert sum(p.nbytes for p in mine) == info.nbytes
        assert [p.start for p in mine] == sorted(p.start for p in mine)
        if plan.kind == "copy":
            assert all(p.nbytes <= 40 for p in mine)
        if plan.kind == "rows" and info.nbytes:
            row = info.nbytes // info.shape[0]
            assert all(p.start % (2 * row) == 0 for p in mine) and len(mine) > 1
        if plan.kind == "tensor":
            assert len(mine) == 1 and mine[0].whole


def _leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name != "src")


def test_failure_midway_leaves_no_output(tmp_path):
    ckpt = Checkpoint(_source(tmp_path))
    seen = []

    def failing(name, t):
        seen.append(name)
        if len(seen) == 8:  # in the second shard, after the first was complete
            raise RuntimeError("boom")
        return _double_floats(name, t)

    with pytest.raises(RuntimeError, match="boom"):
        transform_checkpoint(ckpt, tmp_path / "out", failing, None, plan_fn=_double_plan)
    assert _leftovers(tmp_path) == []


def test_outputs_that_break_the_plan_leave_no_output(tmp_path):
    ckpt = Checkpoint(_source(tmp_path))

    def extra(name, t):
        return {**_double_floats(name, t), f"{name}.surprise": t}

    with pytest.raises(CheckpointError, match="gave outputs .* but the plan said"):
        transform_checkpoint(ckpt, tmp_path / "out", extra, None, plan_fn=_double_plan)
    assert _leftovers(tmp_path) == []


def test_failed_write_keeps_the_old_output(tmp_path, monkeypatch):
    ckpt = Checkpoint(_source(tmp_path))
    old = transform_checkpoint(ckpt, tmp_path / "out", _double_floats, None)
    before = _digest(old)
    real = os.pwrite
    calls = []

    def disk_full(fd, data, offset):
        calls.append(offset)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(write.os, "pwrite", disk_full)
    with pytest.raises(CheckpointError, match="write failed.*No space left"):
        transform_checkpoint(ckpt, old, _double_floats, None, overwrite=True, plan_fn=_double_plan)
    assert _digest(old) == before
    assert _leftovers(tmp_path) == ["out"]


def test_truncated_shard_is_named_with_the_tensor(tmp_path):
    src = _source(tmp_path)
    ckpt = Checkpoint(src)
    shard = ckpt.shards[-1]
    last = max((ckpt.tensors[n] for n in ckpt.names(shard)), key=lambda i: i.offset)
    os.truncate(src / shard, last.offset + 1)  # after the header was read
    with pytest.raises(CheckpointError, match=rf"{shard}: truncated file: tensor '{last.name}'"):
        transform_checkpoint(ckpt, tmp_path / "out", _double_floats, None, plan_fn=_double_plan)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("depth", [1, 3])
def test_reader_thread_yields_pieces_in_order_and_stops_early(tmp_path, monkeypatch, depth):
    """Ring-buffered and whole pieces arrive in file order with their bytes; leaving the
    loop early (an error in the consumer) ends the reader thread instead of hanging."""
    for module in (read, transform):  # the reader groups, the planner splits
        monkeypatch.setattr(module, "CHUNK_BYTES", 16)
    ckpt = Checkpoint(_source(tmp_path))
    shard = ckpt.shards[0]
    pieces = transform._pieces(
        ckpt, {n: _kinds_plan(n, ckpt.tensors[n]) for n in ckpt.names(shard)}
    )
    raw = (ckpt.path / shard).read_bytes()
    with read.ShardReader(ckpt.path / shard, pieces, depth=depth) as reader:
        got = [(piece, bytes(data.numpy())) for piece, data in reader]
    assert [p for p, _ in got] == pieces and any(p.whole for p in pieces)
    for piece, data in got:
        start = piece.info.offset + piece.start
        assert data == raw[start : start + piece.nbytes]
    with read.ShardReader(ckpt.path / shard, pieces, depth=depth) as reader:
        first = next(iter(reader))[0]
    assert first == pieces[0] and not reader.thread.is_alive()
