"""The checkpoint writer: output permissions follow the umask; killed runs' temporaries go."""

import os
import stat
import subprocess
import sys

import torch

from quantscale.checkpoint.write import CheckpointWriter, remove_stale_temporaries


def _write(out):
    with CheckpointWriter(out) as writer:
        writer.write_shard("model.safetensors", {"w": torch.ones(2, 2)})
        return writer.commit()


def test_output_directory_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = _write(tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not mkdtemp's 0o700


def test_stale_temporary_of_a_dead_writer_is_removed(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(dead.stdout)
    stale = tmp_path / f".out.tmp-{pid}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / f".out.tmp-{os.getpid()}-def456"  # a writer still running: kept
    live.mkdir()
    other = tmp_path / f".other.tmp-{pid}-xyz"  # another output's temporary: kept
    other.mkdir()
    out = _write(tmp_path / "out")
    assert not stale.exists()
    assert live.exists() and other.exists()
    assert (out / "model.safetensors").is_file()
    assert remove_stale_temporaries(tmp_path / "out") == []
