"""`quantscale sweep` routes Mamba / Mamba2 models to the Quamba settings."""

import json
import re

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
def test_sweep_on_the_mamba2_fixture(capsys, tmp_path):
    argv = ["sweep", "fixture:mamba2", "--mamba-settings", "bf16,quamba1,quamba2-adaptive"]
    argv += ["--calib-samples", "8", "--calib-seq-len", "128", "--n-tokens", "2048"]
    assert cli.main([*argv, "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == ["bf16", "quamba1", "quamba2-adaptive"]
    assert "dB" in rows[1] and "%" in rows[1]
    data = json.loads((tmp_path / "sweep_mamba2.json").read_text())
    metrics = {r["setting"]: r["metrics"] for r in data["rows"]}
    assert metrics["quamba1"]["x_scales"] == 4  # one per block
    assert 4 * 2 <= metrics["quamba2-adaptive"]["x_scales"]  # >= 1 x 1 per SSD group
    assert (tmp_path / "sweep_mamba2.png").stat().st_size > 0


def _mamba_dir(tmp_path):
    path = tmp_path / "mamba"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    return str(path)


def _swept(monkeypatch, argv):
    """Run `quantscale sweep` with evaluate_settings replaced: (names, extra) it was given."""
    from quantscale.mamba import evaluate

    seen = {}

    def fake(model, names, *args, extra=None):
        seen.update(names=list(names), extra=dict(extra or {}), args=args)
        return []

    monkeypatch.setattr(evaluate, "evaluate_settings", fake)
    monkeypatch.setattr(evaluate, "print_rows", lambda *a: None)
    assert cli.main(["sweep", *argv]) == 0
    return seen


def _x_spec(recipe):
    from quantscale.mamba.mixers import resolve_points

    spec = resolve_points("mamba", recipe, 10**6)["ssm.x"]
    return spec.observer, dict(spec.observer_kwargs)


def test_mamba_sweep_applies_alpha_sigma_and_observers(tmp_path, monkeypatch):
    """--alpha / --sigma / --observers reach the Mamba settings: one labelled Quamba1 setting
    per value, ssm.x calibrated with it (they used to be ignored)."""
    model = _mamba_dir(tmp_path)
    argv = [model, "--alpha", "0.999,0.9999", "--sigma", "0.1"]
    seen = _swept(monkeypatch, [*argv, "--observers", "kl,mse", "--calib-data", "c.txt"])
    assert seen["names"] == ["bf16"]
    assert seen["args"][-2:] == ("c.txt", 8)
    specs = {name: _x_spec(recipe) for name, recipe in seen["extra"].items()}
    assert specs == {
        "quamba1 ssm.x=percentile alpha=0.999": ("percentile", {"alpha": 0.999, "sigma": 0.01}),
        "quamba1 ssm.x=percentile alpha=0.9999": (
            "percentile",
            {"alpha": 0.9999, "sigma": 0.01},
        ),
        "quamba1 ssm.x=percentile sigma=0.1": ("percentile", {"alpha": 0.99999, "sigma": 0.1}),
        "quamba1 ssm.x=kl": ("kl", {}),
        "quamba1 ssm.x=mse": ("mse", {}),
    }
    seen = _swept(monkeypatch, [model, "--observer", "ema", "--sigma", "0.2"])
    assert {n: _x_spec(r) for n, r in seen["extra"].items()} == {
        "quamba1 ssm.x=ema sigma=0.2": ("ema", {"sigma": 0.2})
    }
    seen = _swept(monkeypatch, [model, "--no-baseline"])
    assert "bf16" not in seen["names"] and "quamba2" in seen["names"] and not seen["extra"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--observer", "kl", "--alpha", "0.99"], "--alpha sets the percentile .* 'kl' has none"),
        (["--observer", "mse", "--sigma", "0.1"], "--sigma sets the EMA .* 'mse' has none"),
        (["--observers", "nope"], "unknown observer 'nope'"),
        (["--smooth", "0.5"], "--smooth applies to transformer models, not Mamba"),
        (["--scheme", "W4A8"], "--scheme W4A8: .* name W4 settings with --mamba-settings"),
        (["--tasks", "ppl,zeroshot"], "--tasks zeroshot: a Mamba sweep measures ppl and cloze"),
        (["--sigma-warmup", "4", "--observer", "mse"], "--sigma-warmup sets the EMA .* 'mse'"),
        (["--mode", "layerwise"], "--mode layerwise applies to transformer models"),
    ],
)
def test_mamba_sweep_refuses_flags_it_cannot_apply(tmp_path, capsys, flags, message):
    assert cli.main(["sweep", _mamba_dir(tmp_path), *flags]) == 2
    assert re.search(message, capsys.readouterr().err)
