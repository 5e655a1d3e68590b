"""Sweeps over calibration settings: observer kind, percentile alpha, EMA sigma, activation
granularity, first/last layers kept in float and SmoothQuant smoothing; one metrics row per
setting.

Two ways to calibrate each setting:
- ``shared`` (default): one forward pass of the float model over the calibration data feeds the
  observers of *every* setting at once (modules seeing the same tensor with the same args
  share an observer); each setting then gets RTN weights and its static scales and is
  evaluated. Cost: one calibration pass + one evaluation per setting.
- ``layerwise``: each setting runs the full `quantize.quantize_model` (each layer calibrated
  on the outputs of the quantized layers before it). Cost: one calibration per setting.
The model is restored to float between settings (QuantLinears share the original Linear
parameters and `set_weight` never writes into them; smoothing's in-place changes are undone).
Smoothed settings (``Setting.smooth``): in ``shared`` mode the float model is smoothed from one
pass's per-channel statistics (shared by every alpha), then calibrated once per smoothing spec;
in ``layerwise`` mode `SmoothQuant` runs as the pipeline's layer transform.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantscale.algorithms.smoothing import (
    SmoothQuant,
    format_alphas,
    model_absmax,
    parse_alphas,
    smooth_model,
)
from quantscale.calibration.activations import ActivationCalibrator
from quantscale.calibration.sequential import as_batches, run_batches
from quantscale.errors import QuantscaleError
from quantscale.models.adapter import decoder_layers
from quantscale.orchestrator import (
    quantize_model,
    quantize_with_scales,
    restore_linears,
    targeted_linears,
)
from quantscale.progress import track
from quantscale.scheme import QuantScheme, Recipe, load_recipe

BASELINE = "baseline"


@dataclass
class Setting:
    """One point of a sweep: a name, a recipe (None: the unquantized model), the value of
    the swept parameter for plotting, and a smoothing spec (`smoothing.parse_alphas`)."""

    name: str
    recipe: Recipe | None
    param: str | None = None
    value: float | str | None = None
    smooth: str | None = None


@dataclass
class SweepRow:
    setting: str
    metrics: dict[str, float]
    delta_pct: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    param: str | None = None
    value: float | str | None = None
    details: dict[str, Any] = field(default_factory=dict)  # what else the setting reports


MAMBA_METRICS = {  # `mamba.evaluate` row key -> metric name
    "ppl": "ppl",
    "cloze": "cloze",
    "hidden_sqnr_db": "hidden_sqnr_db",
    "calib_s": "calib_s",
}


def mamba_rows(rows: Sequence[dict]) -> list[SweepRow]:
    """`mamba.evaluate.evaluate_settings` rows as sweep rows: perplexity and cloze (with
    their change against the bf16 row), hidden-state SQNR, the SQNR of the SSM input ssm.x,
    calibration seconds and the number of ssm.x / activation scales as metrics; the rest
    (every point's SQNR, a scan's choices) as details."""
    out = []
    for row in rows:
        metrics = {name: float(row[key]) for key, name in MAMBA_METRICS.items()}
        if "ssm.x" in row["point_sqnr_db"]:
            metrics["x_sqnr_db"] = float(row["point_sqnr_db"]["ssm.x"])
        for point, name in (("ssm.x", "x_scales"), ("all", "act_scales")):
            if point in row["scales"]:
                metrics[name] = float(row["scales"][point])
        details = {k: v for k, v in row.items() if k not in MAMBA_METRICS and k != "setting"}
        setting = BASELINE if row["setting"] == "bf16" else row["setting"]
        out.append(SweepRow(setting, metrics, {}, float(row["seconds"]), details=details))
    _add_deltas(out, ("ppl", "cloze"))
    return out


def measurer(tokenizer, tasks: Sequence[str], n_tokens: int) -> Callable[[nn.Module], dict]:
    """model -> metrics of `tasks` on the held-out Wikipedia split (`n_tokens` for ppl)."""
    from quantscale.eval.runner import evaluate

    return lambda model: evaluate(model, tokenizer, list(tasks), n_tokens=n_tokens)


# ------------------------------------------------------------------ recipe edits


def _map_schemes(recipe: Recipe, fn) -> Recipe:
    groups = {k: fn(s) for k, s in recipe.config_groups.items()}
    overrides = {
        k: (fn(s) if isinstance(s, QuantScheme) else s) for k, s in recipe.overrides.items()
    }
    return recipe.model_copy(update={"config_groups": groups, "overrides": overrides})


def with_activations(recipe: Recipe, **updates) -> Recipe:
    """Recipe whose input-activation args get `updates` (observer, observer_kwargs, strategy)."""

    def fn(s: QuantScheme) -> QuantScheme:
        if s.input_activations is None:
            return s
        args = s.input_activations.model_dump()
        args.update(updates)
        new = type(s.input_activations).model_validate(args)
        return s.model_copy(update={"input_activations": new})

    return _map_schemes(recipe, fn)


def keep_float(recipe: Recipe, layer_prefixes: Sequence[str]) -> Recipe:
    """Recipe that leaves every module under the given layer prefixes unquantized."""
    extra = {f"re:{p.replace('.', chr(92) + '.')}\\.": None for p in layer_prefixes}
    return recipe.model_copy(update={"overrides": {**recipe.overrides, **extra}})


def _num(text: str) -> float:
    return float(text)


def build_settings(
    model: nn.Module,
    scheme: str,
    observer: str | None = None,
    alphas: Sequence[float] = (),
    sigmas: Sequence[float] = (),
    observers: Sequence[str] = (),
    per_channel: bool = False,
    first_last: bool = False,
    baseline: bool = True,
    smooth: Sequence[str | float] = (),
    sigma_warmup: int | None = None,
) -> list[Setting]:
    """The settings the `sweep` command measures (see its help)."""
    base = load_recipe(scheme)
    name = base.name or str(scheme)
    if observer:
        base = with_activations(base, observer=observer)
    settings = [Setting(BASELINE, None)] if baseline else []
    for a in alphas:
        kw = {"alpha": a}
        settings.append(Setting(f"{name} alpha={a:g}", _with_kwargs(base, kw), "alpha", float(a)))
    for s in sigmas:
        kw = {"sigma": s}
        settings.append(Setting(f"{name} sigma={s:g}", _with_kwargs(base, kw), "sigma", float(s)))
    if sigma_warmup:
        recipe = _with_kwargs(base, {"sigma_warmup": sigma_warmup})
        settings.append(Setting(f"{name} sigma-warmup={sigma_warmup}", recipe))
    for obs in observers:
        settings.append(
            Setting(f"{name} {obs}", with_activations(base, observer=obs), "observer", obs)
        )
    if not (alphas or sigmas or observers or sigma_warmup):
        settings.append(Setting(f"{name} {_observer_name(base)}", base))
    ref, ref_name = base, f"{name} {_observer_name(base)}"
    if per_channel:
        settings.append(
            Setting(f"{ref_name} per-channel act", with_activations(ref, strategy="channel"))
        )
    if first_last:
        prefix, layers = decoder_layers(model)
        first, last = f"{prefix}.0", f"{prefix}.{len(layers) - 1}"
        settings.append(Setting(f"{ref_name} first layer float", keep_float(ref, [first])))
        settings.append(Setting(f"{ref_name} last layer float", keep_float(ref, [last])))
        settings.append(Setting(f"{ref_name} first+last float", keep_float(ref, [first, last])))
    settings += smooth_settings(base, name, smooth, observers)
    return settings


def smooth_settings(
    base: Recipe, name: str, specs: Sequence[str | float], observers: Sequence[str] = ()
) -> list[Setting]:
    """One setting per smoothing spec and observer (the base recipe's observer if none)."""
    out = []
    for spec in specs:
        text = format_alphas(parse_alphas(spec))
        value = float(text) if "=" not in text else text
        kinds: Sequence[str | None] = observers or [None]
        for obs in kinds:
            recipe = with_activations(base, observer=obs) if obs else base
            label = f"{name} {obs or _observer_name(base)} smooth={text}"
            out.append(Setting(label, recipe, "smooth", value, smooth=text))
    return out


def _observer_name(recipe: Recipe) -> str:
    for s in recipe.config_groups.values():
        if s.input_activations is not None:
            return s.input_activations.observer or "minmax"
    return "weights only"


def _with_kwargs(recipe: Recipe, kwargs: dict) -> Recipe:
    for s in recipe.config_groups.values():
        if s.input_activations is not None:
            merged = {**s.input_activations.observer_kwargs, **kwargs}
            return with_activations(recipe, observer_kwargs=merged)
    return recipe


# ------------------------------------------------------------------ running


def calibrate_shared(
    model: nn.Module, settings: Sequence[Setting], batches: Sequence[torch.Tensor]
) -> dict[str, dict]:
    """One float forward pass feeding every setting's observers -> {setting: {(mod, role): qp}}."""
    linears, schemes = {}, {}
    for i, st in enumerate(settings):
        if st.recipe is None:
            continue
        for name, (module, scheme) in targeted_linears(model, st.recipe).items():
            linears[f"{i}|{name}"], schemes[f"{i}|{name}"] = module, scheme
    calibrator = ActivationCalibrator(linears, schemes)
    if calibrator.args:
        with calibrator:
            run_batches(model, list(track(batches, len(batches), "calibrate (shared)")))
    out: dict[str, dict] = {st.name: {} for st in settings}
    for (key, role), qp in calibrator.qparams().items():
        index, name = key.split("|", 1)
        out[settings[int(index)].name][(name, role)] = qp
    return out


def run_sweep(
    model: nn.Module,
    settings: Sequence[Setting],
    calib: torch.Tensor | Sequence[torch.Tensor],
    measure: Callable[[nn.Module], dict[str, float]],
    mode: str = "shared",
    batch_size: int = 8,
    shared: dict[str, dict] | None = None,
) -> list[SweepRow]:
    """`measure(model)` under every setting (the model is left in float afterwards).

    `shared`: static qparams per setting name already calibrated (`calibrate_shared`) for
    the unsmoothed settings."""
    batches = as_batches(calib, batch_size)
    rows: dict[int, SweepRow] = {}
    absmax = None
    for spec, group in _by_smoothing(settings):
        smoothing = None
        try:
            if spec and mode == "shared":
                absmax = absmax or model_absmax(model, batches)
                smoothing = smooth_model(model, spec, absmax=absmax)
            qparams = None
            if mode == "shared":
                ready = shared if shared is not None and not spec else None
                qparams = ready or calibrate_shared(model, [st for _, st in group], batches)
            for i, st in group:
                rows[i] = _run_setting(model, st, measure, mode, batches, qparams)
        finally:
            if smoothing is not None:
                smoothing.restore()
    ordered = [rows[i] for i in sorted(rows)]
    _add_deltas(ordered)
    return ordered


def _by_smoothing(settings: Sequence[Setting]) -> list[tuple[str | None, list]]:
    """Settings grouped by smoothing spec (unsmoothed first), with their positions."""
    groups: dict[str | None, list] = {None: []}
    for i, st in enumerate(settings):
        groups.setdefault(st.smooth if st.recipe is not None else None, []).append((i, st))
    return [(k, v) for k, v in groups.items() if v]


def _run_setting(model, st: Setting, measure, mode, batches, qparams) -> SweepRow:
    start = time.perf_counter()
    originals, smoothing = {}, None
    try:
        if st.recipe is not None and mode == "shared":
            originals = quantize_with_scales(model, st.recipe, qparams[st.name])
        elif st.recipe is not None:
            originals = {n: m for n, (m, _) in targeted_linears(model, st.recipe).items()}
            smoothing = SmoothQuant(st.smooth) if st.smooth else None
            transforms = [smoothing] if smoothing else []
            quantize_model(model, st.recipe, batches, transforms=transforms)
        metrics = measure(model)
    finally:
        restore_linears(model, originals)
        if smoothing is not None:
            smoothing.restore()
    return SweepRow(st.name, metrics, {}, time.perf_counter() - start, st.param, st.value)


def _add_deltas(rows: list[SweepRow], metrics: Sequence[str] | None = None) -> None:
    """Each row's change (%) against the baseline row in `metrics` (default: all)."""
    base = next((r for r in rows if r.setting == BASELINE), None)
    if base is None:
        return
    for r in rows:
        r.delta_pct = {
            k: 100 * (v / base.metrics[k] - 1)
            for k, v in r.metrics.items()
            if (metrics is None or k in metrics) and base.metrics.get(k)
        }


# ------------------------------------------------------------------ output


def format_metric(metric: str, value: float) -> str:
    """ppl to 3 decimals, SQNRs in dB, seconds, counts; accuracies as percentages."""
    if metric == "ppl":
        return f"{value:.3f}"
    if metric.endswith("_db"):
        return f"{value:.1f} dB"
    if metric.endswith("_s"):
        return f"{value:.1f}"
    if metric.endswith("scales"):
        return f"{value:.0f}"
    return f"{100 * value:.1f}%"


def markdown_table(rows: Sequence[SweepRow]) -> str:
    """Rows as a markdown table (each metric, and its change vs the baseline row where a
    row has one); a metric a row lacks is an empty cell."""
    metrics = list(dict.fromkeys(m for r in rows for m in r.metrics))
    compared = {m for r in rows for m in r.delta_pct}
    head = ["setting"]
    for m in metrics:
        head += [m, f"{m} vs baseline"] if m in compared else [m]
    head.append("seconds")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.setting]
        for m in metrics:
            cells.append(format_metric(m, r.metrics[m]) if m in r.metrics else "")
            if m in compared:
                d = r.delta_pct.get(m)
                cells.append("" if d is None else f"{d:+.2f}%")
        cells.append(f"{r.seconds:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(
    rows: Sequence[SweepRow], out_dir: Path, stem: str, title: str, meta: dict
) -> list[Path]:
    """The sweep's PNG plot, markdown table and JSON as `out_dir/stem.{png,md,json}`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(rows, out_dir / f"{stem}.png", title)
    md = out_dir / f"{stem}.md"
    md.write_text(markdown_table(rows) + "\n")
    return [png, md, write_json(rows, out_dir / f"{stem}.json", meta)]


def plot(rows: Sequence[SweepRow], path: str | Path, title: str = "", metric: str = "ppl") -> Path:
    """PNG: the metric against a numeric swept parameter (a curve), else one bar per setting;
    the baseline as a horizontal line; the y axis zoomed in on values within 1.5x of each
    other. Needs matplotlib (the `plots` extra)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7.0, 0.3 * len(rows)), 4))
    base = next((r for r in rows if r.setting == BASELINE), None)
    points = [r for r in rows if isinstance(r.value, float)]
    if points and len({r.param for r in points}) == 1:
        xs = [r.value for r in points]
        ax.plot(xs, [r.metrics[metric] for r in points], marker="o")
        ax.set_xlabel(points[0].param)
        if points[0].param == "alpha":
            ax.set_xscale("function", functions=(_alpha_fwd, _alpha_inv))
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{x:g}" for x in xs], rotation=30)
    else:
        quant = [r for r in rows if r is not base]
        ax.bar(range(len(quant)), [r.metrics[metric] for r in quant])
        ax.set_xticks(range(len(quant)))
        ax.set_xticklabels([r.setting for r in quant], rotation=30, ha="right", fontsize=8)
    if base is not None:
        ax.axhline(base.metrics[metric], color="gray", linestyle="--", label="baseline")
        ax.legend()
    values = [r.metrics[metric] for r in rows]
    lo, hi = min(values), max(values)
    if lo > 0 and hi / lo > 10:
        ax.set_yscale("log")
    elif lo > 0 and hi / lo < 1.5:  # close values (Mamba settings): zoom in on them
        pad = 0.1 * (hi - lo) or 0.01 * hi
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel(metric)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or a QuantscaleError saying how to install it."""
    try:
        import matplotlib
    except ImportError as err:
        raise QuantscaleError(
            "the sweep plot needs matplotlib: pip install 'quantscale[plots]' (or matplotlib)"
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _alpha_fwd(x):
    import numpy as np

    return -np.log10(np.clip(1.0 - np.asarray(x, dtype=float), 1e-6, None))


def _alpha_inv(y):
    import numpy as np

    return 1.0 - 10.0 ** (-np.asarray(y, dtype=float))


def write_json(rows: Sequence[SweepRow], path: str | Path, meta: dict) -> Path:
    """Rows and run metadata as JSON."""
    Path(path).write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=1))
    return Path(path)
