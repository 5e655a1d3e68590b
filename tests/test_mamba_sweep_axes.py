"""The plan's axes as named Mamba sweep settings: each changes the scales the way it claims."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_mamba_quant import MAKERS, _batches, _ids

from quantscale.mamba.evaluate import mamba_sweep_settings, scale_counts
from quantscale.mamba.mixers import MambaRecipe, resolve_points
from quantscale.mamba.quamba import ActQuant
from quantscale.mamba.quantize import quantize_mamba, quantized_mixers, smallest_within
from quantscale.observers import (
    PercentileObserver,
    entropy_threshold_bin,
    get_observer,
    kl_threshold_bin,
)


def _setting(name: str) -> MambaRecipe:
    recipe = mamba_sweep_settings()[name]
    assert recipe is not None
    return recipe


def _quantize(kind: str, name: str | MambaRecipe, batches=None, **update):
    recipe = _setting(name) if isinstance(name, str) else name
    recipe = recipe.model_copy(update={"head_groups": 2, "channel_groups": 2, **update})
    return quantize_mamba(MAKERS[kind](), batches or _batches(), recipe)


def _x_scales(model) -> dict[int, torch.Tensor]:
    return {i: m.act("ssm.x").scale.clone() for i, m in quantized_mixers(model).items()}


def _recorded(monkeypatch) -> list[tuple[ActQuant, torch.Tensor]]:
    """(quantizer, rows it observed while calibrating) for every ActQuant.observe call."""
    seen: list[tuple[ActQuant, torch.Tensor]] = []
    original = ActQuant.observe

    def recording(self, x):
        if self._observers is not None:
            seen.append((self, x.detach().float().reshape(-1, self.channels).clone()))
        original(self, x)

    monkeypatch.setattr(ActQuant, "observe", recording)
    return seen


def test_every_plan_axis_is_a_named_setting():
    names = set(mamba_sweep_settings())
    for name in (
        "quamba1-alpha0.9999",
        "quamba1-alpha1",
        "quamba1-sigma0.05",
        "quamba1-sigma0.2",
        "quamba1-sigma0.3",
        "quamba1-sigma-warmup",
        "quamba1-per-channel",
        "quamba1-alpha-by-mse",
        "quamba1-first-alpha1-last-alpha0.9999",
        "quamba1-mixed-W8A16",
        "quamba1-mixed-x0.8",
        "quamba1-kl",
        "quamba1-max-entropy",
        "quamba2-16x16",
        "quamba2-per-channel",
        "quamba2-adaptive",
    ):
        assert name in names, name
    spec = resolve_points("mamba", _setting("quamba1-sigma0.3"), 10**6)["ssm.x"]
    assert dict(spec.observer_kwargs) == {"alpha": 0.99999, "sigma": 0.3}
    spec = resolve_points("mamba2", _setting("quamba1-sigma-warmup"), 10**6)["ssm.x"]
    assert dict(spec.observer_kwargs)["sigma_warmup"] == 8


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_alpha_one_is_the_minmax_scale(kind):
    """One calibration batch: alpha 1.0 gives min-max's scale, alpha 0.999 a smaller one."""
    one = [_ids(100, batch=4)]
    full = _x_scales(_quantize(kind, "quamba1-alpha1", one))
    minmax = _x_scales(_quantize(kind, "quamba1-minmax", one))
    clipped = _x_scales(_quantize(kind, "quamba1-alpha0.999", one))
    for i in full:
        torch.testing.assert_close(full[i], minmax[i], rtol=1e-6, atol=0)
        assert float(clipped[i]) < float(full[i])


def test_sigma_warmup_ramps_the_ema_momentum():
    """Batch t (t < N) gets weight 1 - (1 - sigma) * t / N, then sigma; N = 0: plain EMA."""
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    obs = get_observer("ema", sigma=0.1, sigma_warmup=4)
    plain = get_observer("ema", sigma=0.1)
    expected, w = [], None
    for t, v in enumerate(values):
        obs.update(torch.tensor([v, -v]))
        plain.update(torch.tensor([v, -v]))
        weight = 0.1 if t >= 4 else 1 - 0.9 * t / 4
        w = v if w is None else w + weight * (v - w)
        expected.append(w)
        assert float(obs.max_val) == pytest.approx(w, rel=1e-6)
    assert float(plain.max_val) < expected[-1]


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_sigma_warmup_setting_changes_the_ssm_input_scale(kind):
    base = _x_scales(_quantize(kind, "quamba1"))
    warm = _x_scales(_quantize(kind, "quamba1-sigma-warmup"))
    assert any(not torch.equal(base[i], warm[i]) for i in base)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_per_channel_gives_one_scale_per_channel(kind, monkeypatch):
    """Every activation point: one scale per channel, each the channel's own range (min-max
    points: max |x| / 127 over the calibration rows); INT8 matches the fake-quant outputs."""
    seen = _recorded(monkeypatch)
    model = _quantize(kind, "quamba1-per-channel")
    mixer = quantized_mixers(model)[0]
    for act in mixer.acts.values():
        assert isinstance(act, ActQuant) and act.per_channel
        assert act.scale.shape == (act.channels,) and act.n_scales() == act.channels
    act = mixer.act("in_proj.input")
    rows = torch.cat([x for owner, x in seen if owner is act])
    torch.testing.assert_close(act.scale, rows.abs().amax(dim=0) / 127, rtol=1e-6, atol=0)
    counts = scale_counts(model)
    assert counts["ssm.x"] == 2 * mixer.act("ssm.x").channels
    with torch.no_grad():
        int8 = model(input_ids=_ids(5), use_cache=False).logits
        for m in quantized_mixers(model).values():
            m.set_mode("fake")
        fake = model(input_ids=_ids(5), use_cache=False).logits
    torch.testing.assert_close(int8, fake, rtol=1e-4, atol=1e-4)


def test_percentile_mse_picks_the_alpha_with_the_lowest_error():
    """The chosen alpha's qdq error is the lowest of the candidates (sample = all values),
    and its range is that candidate's percentile + EMA range. (4-bit args: on Gaussian
    data clipping beats covering the tails; at 8 bits and 2,000 values it rarely does.)"""
    from quantscale.qdq import compute_qparams, fake_quantize
    from quantscale.scheme import QuantArgs

    args = QuantArgs(num_bits=4, strategy="tensor")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2000, generator=gen) for _ in range(3)]
    alphas = (0.99, 0.999, 0.9999, 1.0)
    obs = get_observer("percentile_mse", args=args, alphas=alphas, sample=10**6)
    for x in batches:
        obs.update(x)
    mn, mx = obs.min_max()
    assert obs.chosen_alpha is not None
    data = torch.cat(batches)
    errors = {}
    for a in alphas:
        ref = PercentileObserver(args, alpha=a)
        for x in batches:
            ref.update(x)
        qp = compute_qparams(args, *ref.min_max())
        errors[a] = float((fake_quantize(data, args, qp) - data).pow(2).sum())
        if a == float(obs.chosen_alpha):
            torch.testing.assert_close(mx, ref.min_max()[1])
    assert float(obs.chosen_alpha) == min(errors, key=errors.__getitem__) < 1.0
    assert float(mn) == -float(mx)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_alpha_by_mse_is_chosen_per_layer(kind, monkeypatch):
    """Each block's ssm.x gets the scale of a candidate alpha's percentile observer on that
    block's own inputs, the one its search chose."""
    from quantscale.mamba.quamba import _ACT_ARGS
    from quantscale.qdq import compute_qparams

    seen = _recorded(monkeypatch)
    model = _quantize(kind, "quamba1-alpha-by-mse")
    for mixer in quantized_mixers(model).values():
        act = mixer.act("ssm.x")
        assert act.chosen_alpha is not None and len(act.chosen_alpha) == 1
        ref = PercentileObserver(_ACT_ARGS, alpha=act.chosen_alpha[0])
        for owner, x in seen:
            if owner is act:
                ref.update(x)
        expected = compute_qparams(_ACT_ARGS, *ref.min_max()).scale.reshape(1)
        torch.testing.assert_close(act.scale, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_first_layer_alpha_one_last_layer_alpha_0_9999(kind):
    one = [_ids(100, batch=4)]
    ends = _x_scales(_quantize(kind, "quamba1-first-alpha1-last-alpha0.9999", one))
    first = _x_scales(_quantize(kind, "quamba1-alpha1", one))
    last = _x_scales(_quantize(kind, "quamba1-alpha0.9999", one))
    default = _x_scales(_quantize(kind, "quamba1", one))
    torch.testing.assert_close(ends[0], first[0], rtol=0, atol=0)
    torch.testing.assert_close(ends[1], last[1], rtol=0, atol=0)
    assert not torch.equal(ends[0], default[0]) and not torch.equal(ends[1], default[1])


def _act_scales(model) -> dict[tuple[int, str], torch.Tensor]:
    return {
        (i, key): act.scale.clone()
        for i, m in quantized_mixers(model).items()
        for key, act in m.acts.items()
    }


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_scan_x08_multiplies_the_chosen_blocks_scales(kind):
    """quamba1-mixed-x0.8: the scan's block keeps INT8 activations at 0.8 x Quamba1's
    scales, every other block Quamba1's; quamba1-mixed-W8A16: that block's are float."""
    base = _act_scales(_quantize(kind, "quamba1"))
    model = _quantize(kind, "quamba1-mixed-x0.8")
    qcfg = model.config.quantization_config
    chosen = qcfg["recipe"]["scale_layers"]
    assert len(chosen) == 1 and set(qcfg["block_sensitivity"]) == {"0", "1"}
    for (i, key), scale in _act_scales(model).items():
        factor = 0.8 if i in chosen else 1.0
        torch.testing.assert_close(scale, factor * base[(i, key)], rtol=1e-6, atol=0)
    mixed = _quantize(kind, "quamba1-mixed-W8A16")
    a16 = mixed.config.quantization_config["recipe"]["a16_layers"]
    assert a16 == chosen and len(quantized_mixers(mixed)[a16[0]].acts) == 0


def test_quamba2_group_settings_count_scales():
    """16x16 and per-channel Quamba2 groups: as many ssm.x scales as channels on the tiny
    Mamba2 (heads of 8 channels); fewer groups, fewer scales."""
    counts = {}
    for name in ("quamba2-2x2", "quamba2-16x16", "quamba2-per-channel"):
        recipe = _setting(name)
        model = quantize_mamba(MAKERS["mamba2"](), _batches(), recipe)
        counts[name] = scale_counts(model)["ssm.x"]
        mixer = quantized_mixers(model)[0]
        assert mixer.act("ssm.x").per_channel is (name == "quamba2-per-channel")
    channels = 2 * quantized_mixers(model)[0].act("ssm.x").channels
    assert counts["quamba2-per-channel"] == counts["quamba2-16x16"] == channels
    assert counts["quamba2-2x2"] == 2 * 2 * 2 * 2  # 2 blocks x 2 SSD groups x 2 x 2


def test_smallest_within_threshold():
    sqnrs = {1: 30.0, 2: 34.0, 4: 34.6, 8: 35.0}
    assert smallest_within(sqnrs, 0.5) == 4 and smallest_within(sqnrs, 1.0) == 2
    assert smallest_within(sqnrs, 0.0) == 8
    assert smallest_within(sqnrs, math.inf) == 1


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_adaptive_group_count_is_picked_per_layer(kind):
    """Threshold 0 dB: each block takes its best-SQNR candidate; a huge threshold: the
    smallest; the ssm.x scale count of each block follows its own choice."""
    shape = {"mamba": 1, "mamba2": 2}[kind]  # SSD groups
    for threshold in (0.0, 1e9):
        recipe = _setting("quamba2-adaptive").with_options(
            adaptive_groups=[1, 2, 4], adaptive_sqnr_db=threshold
        )
        model = quantize_mamba(MAKERS[kind](), _batches(), recipe)
        groups = model.config.quantization_config["group_counts"]
        assert set(groups) == {"0", "1"}
        for i, mixer in quantized_mixers(model).items():
            choice = groups[str(i)]
            sqnrs = {int(k): v for k, v in choice["sqnr_db"].items()}
            assert set(sqnrs) == {1, 2, 4}
            want = max(sqnrs, key=sqnrs.__getitem__) if threshold == 0 else 1
            assert choice["k"] == want
            assert mixer.act("ssm.x").n_scales() <= shape * want * want
            if want == 1:
                assert mixer.act("ssm.x").n_scales() == shape


def test_max_entropy_threshold():
    """Flat mass on bins 0..511 and one far outlier: the codes are closest to uniform when
    the clip sits at the flat part's end (KL keeps more of the tail)."""
    hist = np.zeros(1000)
    hist[:512] = 1.0
    hist[999] = 1.0
    i = entropy_threshold_bin(hist, 128)
    assert 500 <= i <= 512
    assert kl_threshold_bin(hist, 128) != i


def _tiny_sweep(tmp_path, capsys, *extra: str) -> tuple[str, dict]:
    from test_mamba_quant import _tiny_checkpoint

    from quantscale import cli

    model_dir, calib, _ = _tiny_checkpoint(tmp_path)
    argv = ["sweep", str(model_dir), "--calib-data", str(calib), "--calib-samples", "4"]
    argv += ["--calib-seq-len", "32", "--n-tokens", "1024", "--out-dir", str(tmp_path / "out")]
    assert cli.main([*argv, *extra]) == 0
    out = capsys.readouterr().out
    return out, json.loads((tmp_path / "out" / "sweep_float.json").read_text())


def test_mamba_sweep_table_json_png(tmp_path, capsys):
    """One table with perplexity, SSM-input SQNR, calibration time and scale counts; the
    same rows in JSON, a markdown table and a PNG in --out-dir."""
    names = "bf16,quamba1,quamba1-per-channel,quamba2-adaptive"
    out, data = _tiny_sweep(tmp_path, capsys, "--mamba-settings", names)
    header = next(line for line in out.splitlines() if "setting" in line)
    for col in ("perplexity", "x SQNR", "x scales", "calib s"):
        assert col in header
    rows = {r["setting"]: r for r in data["rows"]}
    assert list(rows) == ["baseline", "quamba1", "quamba1-per-channel", "quamba2-adaptive"]
    q1, pc = rows["quamba1"]["metrics"], rows["quamba1-per-channel"]["metrics"]
    assert q1["x_scales"] == 2 and pc["x_scales"] == 2 * 64  # 2 blocks x 64 channels
    assert q1["calib_s"] > 0 and 0 < q1["x_sqnr_db"] < 80 and "x_sqnr_db" not in rows["baseline"]
    assert "group_counts" in rows["quamba2-adaptive"]["details"]
    deltas = rows["quamba1"]["delta_pct"]  # against bf16; cloze only where bf16's is not 0
    assert "ppl" in deltas and set(deltas) <= {"ppl", "cloze"}
    png = (tmp_path / "out" / "sweep_float.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "out" / "sweep_float.md").read_text()
    assert "| quamba1-per-channel |" in md and "x_scales" in md


def test_mamba_sweep_flags_as_on_the_llm_sweep(tmp_path, capsys):
    """--per-channel / --first-last / --sigma-warmup build their Quamba1 settings."""
    out, data = _tiny_sweep(
        tmp_path, capsys, "--per-channel", "--first-last", "--sigma-warmup", "2"
    )
    settings = [r["setting"] for r in data["rows"]]
    assert settings == [
        "baseline",
        "quamba1 ssm.x=percentile sigma-warmup=2",
        "quamba1 ssm.x=percentile per-channel act",
        "quamba1 ssm.x=percentile first layer float",
        "quamba1 ssm.x=percentile last layer float",
        "quamba1 ssm.x=percentile first+last float",
    ]
    metrics = {r["setting"]: r["metrics"] for r in data["rows"]}
    assert metrics["quamba1 ssm.x=percentile per-channel act"]["x_scales"] == 128
    assert metrics["quamba1 ssm.x=percentile first layer float"]["x_scales"] == 1


@pytest.mark.parametrize(
    "name", ["quamba1-per-channel", "quamba1-first-alpha1-last-alpha0.9999", "quamba2-adaptive"]
)
def test_new_settings_save_and_reload(name, tmp_path):
    """Per-channel scales, per-layer rules and adaptive group counts survive the Quamba
    checkpoint: the reloaded model gives the same logits."""
    from quantscale.mamba.quantize import load_quantized, save_quantized

    model = _quantize("mamba2", name)
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    with torch.no_grad():
        want = model(input_ids=_ids(5), use_cache=False).logits
        got = loaded(input_ids=_ids(5), use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
