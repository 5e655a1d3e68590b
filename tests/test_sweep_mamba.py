"""`quantscale sweep` routes Mamba / Mamba2 models to the Quamba settings."""

import json

import pytest

from quantscale import cli
from quantscale.orchestrator import is_mamba


def test_is_mamba_reads_fixture_names_and_configs(tmp_path):
    assert is_mamba("fixture:mamba2")
    for model_type, expected in (("mamba2", True), ("mamba", True), ("llama", False)):
        path = tmp_path / model_type
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": model_type}))
        assert is_mamba(str(path)) is expected
    assert not is_mamba(str(tmp_path / "missing"))


@pytest.mark.slow
def test_sweep_on_the_mamba2_fixture(capsys):
    argv = ["sweep", "fixture:mamba2", "--mamba-settings", "bf16,quamba1"]
    argv += ["--calib-samples", "8", "--calib-seq-len", "128", "--n-tokens", "2048"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == ["bf16", "quamba1"]
    assert "dB" in rows[1] and "%" in rows[1]
