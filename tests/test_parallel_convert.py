"""Shard-parallel streamed transforms: ranks and Ray tasks give the one-process bytes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from quantscale.checkpoint.convert import convert_checkpoint
from quantscale.checkpoint.dequantize import dequantize_checkpoint
from quantscale.checkpoint.fp8_quantize import quantize_checkpoint_fp8
from quantscale.checkpoint.parallel import (
    PARTS,
    Ranks,
    RayTasks,
    assign,
    runner_from_args,
    shard_bytes,
    staging_dir,
)
from quantscale.checkpoint.read import Checkpoint
from quantscale.checkpoint.synthetic import write_llama_like
from quantscale.checkpoint.transform import Mappers, ShardJob, TensorPlan
from quantscale.cli import main
from quantscale.errors import OutputExistsError, QuantscaleError


def _files(path: Path) -> dict[str, bytes]:
    """Every file of a directory (hidden ones too) by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def bf16(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parallel")
    return write_llama_like(root / "bf16", hidden=256, intermediate=384, layers=5, shards=5)


@pytest.fixture(scope="module")
def fp8(bf16) -> Path:
    out = bf16.parent / "fp8"
    quantize_checkpoint_fp8(bf16, out)
    return out


def _ranks(fn, world: int) -> list[Path | None]:
    """`fn(runner)` for each rank in turn, as `world` processes would run it."""
    return [fn(Ranks(rank, world)) for rank in range(world)]


def test_assign_balances_bytes_deterministically(fp8):
    job = ShardJob(Checkpoint(fp8), Mappers(None, None), TensorPlan.copy)
    ranks = assign(job, 2)
    assert sorted(s for r in ranks for s in r) == sorted(job.src.shards)
    loads = [sum(shard_bytes(job, s) for s in r) for r in ranks]
    biggest = max(shard_bytes(job, s) for s in job.src.shards)
    assert max(loads) - min(loads) <= biggest
    assert assign(job, 2) == ranks
    assert assign(job, 1) == [job.src.shards]
    assert [len(r) for r in assign(job, 8)].count(0) == 3  # 5 shards, 8 ranks


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_write_the_one_process_bytes(bf16, fp8, tmp_path, world):
    one = tmp_path / "one"
    convert_checkpoint(fp8, one, "compressed-tensors")
    out = tmp_path / "many"
    done = _ranks(lambda r: convert_checkpoint(fp8, out, "compressed-tensors", runner=r), world)
    assert done[:-1] == [None] * (world - 1) and done[-1] == out
    assert _files(out) == _files(one)
    assert not staging_dir(out).exists()
    assert not list(tmp_path.glob(".*"))  # no lock file or staging left beside OUT


def test_quantize_and_dequantize_by_ranks(bf16, fp8, tmp_path):
    out = tmp_path / "fp8"
    _ranks(lambda r: quantize_checkpoint_fp8(bf16, out, scale_fmt=None, runner=r), 2)
    assert _files(out) == _files(fp8)
    one, many = tmp_path / "deq1", tmp_path / "deq2"
    dequantize_checkpoint(fp8, one)
    _ranks(lambda r: dequantize_checkpoint(fp8, many, runner=r), 2)
    assert _files(many) == _files(one)


def test_rerun_redoes_only_missing_or_incomplete_shards(fp8, tmp_path):
    one = tmp_path / "one"
    convert_checkpoint(fp8, one, "neuron")
    out = tmp_path / "out"
    first = Ranks(0, 2)
    assert convert_checkpoint(fp8, out, "neuron", runner=first) is None
    mine = [r.shard for r in first.results]
    staging = staging_dir(out)
    assert sorted(p.name for p in staging.glob("*.safetensors")) == sorted(mine)
    # one shard cut short (a crash after the rename cannot do this, a disk fault can),
    # another's done record lost: both are redone, the rest kept
    cut, lost = mine[0], mine[1]
    data = (staging / cut).read_bytes()
    (staging / cut).write_bytes(data[: len(data) // 2])
    (staging / PARTS / f"{lost}.json").unlink()
    (staging / f".{mine[-1]}.tmp-otherhost-1").write_bytes(b"partial")  # a killed writer's
    (staging / "model-00009-of-00009.safetensors").write_bytes(b"another job's")
    second = Ranks(1, 2)
    assert convert_checkpoint(fp8, out, "neuron", runner=second) is None  # rank 0's are bad
    again = Ranks(0, 2)
    assert convert_checkpoint(fp8, out, "neuron", runner=again) == out
    assert sorted(r.shard for r in again.results) == sorted([cut, lost])
    assert _files(out) == _files(one)


def test_changed_options_redo_the_shards(bf16, tmp_path):
    out = tmp_path / "q"
    quantize_checkpoint_fp8(bf16, out, runner=Ranks(0, 1), block=(128, 128))
    assert not staging_dir(out).exists()
    # a half-done run with other options: its shards do not count for this one
    r0 = Ranks(0, 2)
    quantize_checkpoint_fp8(bf16, tmp_path / "p", runner=r0, scale_fmt="ue8m0")
    r0 = Ranks(0, 2)
    assert quantize_checkpoint_fp8(bf16, tmp_path / "p", runner=r0) is None
    assert r0.results  # rewritten, not kept
    quantize_checkpoint_fp8(bf16, tmp_path / "p", runner=Ranks(1, 2))
    assert _files(tmp_path / "p") == _files(out)


def test_existing_output_and_bad_ranks_refused(fp8, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(fp8, out, "compressed-tensors")
    with pytest.raises(OutputExistsError, match="already exists"):
        convert_checkpoint(fp8, out, "compressed-tensors", runner=Ranks(0, 2))
    assert not staging_dir(out).exists()
    with pytest.raises(QuantscaleError, match="rank 2 of world size 2"):
        Ranks(2, 2)
    with pytest.raises(QuantscaleError, match="go together"):
        runner_from_args(0, None, False, None)
    with pytest.raises(QuantscaleError, match="exclude each other"):
        runner_from_args(0, 2, True, None)


def test_torchrun_environment_picks_the_rank(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    runner = runner_from_args(None, None, False, None)
    assert isinstance(runner, Ranks) and (runner.rank, runner.world) == (1, 4)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert runner_from_args(None, None, False, None) is None
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(QuantscaleError, match="expected integers"):
        runner_from_args(None, None, False, None)


def test_cli_ranks(fp8, tmp_path, capsys):
    one, out = tmp_path / "one", tmp_path / "out"
    assert main(["convert", str(fp8), str(one), "--to", "hf"]) == 0
    for rank in (0, 1):
        args = ["convert", str(fp8), str(out), "--to", "hf", "--rank", str(rank)]
        assert main([*args, "--world-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "the rank that finishes last commits" in printed and f"wrote {out}" in printed
    assert "peak RSS" in printed
    assert _files(out) == _files(one)


def test_ray_missing_names_the_extra(fp8, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(QuantscaleError, match=r"quantscale\[ray\]"):
        convert_checkpoint(fp8, tmp_path / "out", "hf", runner=RayTasks())


def test_calibrated_schemes_refuse_parallel_flags(bf16, tmp_path, capsys):
    args = ["quantize", str(bf16), str(tmp_path / "o"), "--scheme", "W4A16", "--rank", "0"]
    assert main(args) != 0
    assert "--scheme W4A16 runs in one process" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs quantscale[ray]")
def test_ray_tasks_write_the_one_process_bytes(bf16, fp8, tmp_path):
    import ray

    one, out = tmp_path / "one", tmp_path / "out"
    convert_checkpoint(fp8, one, "compressed-tensors")
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # a fresh local cluster
    try:
        runner = RayTasks()
        assert convert_checkpoint(fp8, out, "compressed-tensors", runner=runner) == out
        quantized = quantize_checkpoint_fp8(bf16, tmp_path / "q", runner=RayTasks())
        with pytest.raises(QuantscaleError, match="no Ray node has"):
            convert_checkpoint(fp8, tmp_path / "big", "hf", runner=RayTasks(work_bytes=1 << 50))
    finally:
        ray.shutdown()
    assert quantized is not None and _files(quantized) == _files(fp8)
    assert _files(out) == _files(one)
    assert sorted(r.shard for r in runner.results) == Checkpoint(fp8).shards
    assert len({r.pid for r in runner.results}) == len(runner.results)  # a worker per task
    assert all(r.peak_rss > 0 and r.seconds > 0 for r in runner.results)
    assert json.loads((out / "config.json").read_text())["quantization_config"]
