"""Experiments on Mamba / Mamba2 models: named Quamba settings measured against the baseline.

`evaluate_settings(model_spec, names, ...)` quantizes the model once per named setting
(`mamba_sweep_settings`) and measures held-out Wikipedia perplexity and cloze accuracy, the
SQNR of the final hidden states against the float32 model, and the SQNR of every quantized
activation point's INT8 round trip, both on 8 held-out windows of 512 tokens, with the
calibration time and the number of activation scales (the grouping trade-off); `print_rows`
prints those rows as a table (`quantscale mamba eval`, `quantscale sweep`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from quantscale.errors import QuantscaleError
from quantscale.mamba.fixtures import load_mamba, require_tokenizer
from quantscale.mamba.mixers import ACTIVATION_POINTS, MambaRecipe, PointRule
from quantscale.mamba.quantize import (
    W4_SCHEMES,
    calibration_token_batches,
    quantize_mamba,
    quantized_mixers,
    run_batches,
    scheme_recipe,
)
from quantscale.observers import PercentileObserver, get_observer
from quantscale.scheme import LearnScales

PROBE_WINDOWS = 8
PROBE_LEN = 512


def _x_rule(observer: str, **kwargs: Any) -> dict[str, PointRule]:
    return {"ssm.x": PointRule(observer=observer, observer_kwargs=kwargs)}


ALPHAS = (0.999, 0.9995, 0.9999, 1.0)
SIGMAS = (0.05, 0.1, 0.2, 0.3)
SIGMA_WARMUP = 8  # calibration batches (of the default 16) the EMA momentum ramps over
ADAPTIVE_GROUPS = [1, 2, 4, 8]  # candidate k (k head x k channel groups) per block
SENSITIVE_BUDGET = 1  # blocks the W8A8 sensitivity scan settings treat (1 of the fixtures' 4)


def mamba_sweep_settings() -> dict[str, MambaRecipe | None]:
    """Named scale strategies for Mamba models (None = the unquantized bf16 baseline).

    The plan's axes: percentile alpha (1.0 = the per-batch max) and EMA sigma of the SSM
    input ssm.x, with a sigma warm-up; the observer kind on ssm.x (min-max, MSE, ACIQ, KL,
    max-entropy, and `percentile_mse`: a per-layer alpha chosen by quantization MSE);
    per-channel activation scales; first layer alpha 1.0 / last 0.9999; first/last layers,
    conv1d or out_proj's input left in float; Quamba's Hadamard on out_proj's input; the
    sensitivity scan's block at W8A16 or with its activation scales x0.8; Quamba2 group
    counts (2x2 .. 16x16, per channel, adaptive per layer); Quamba2's weight side
    (`w4_settings`). Learned scales (plan 6.1 / 6.2, LSQ) are not here yet: they belong
    beside the observer settings as `quamba1-lsq` once the LSQ algorithm lands.
    """
    q1, q2 = MambaRecipe(method="quamba1"), MambaRecipe(method="quamba2")
    conv_off = {p: PointRule(quantize=False) for p in ("conv1d.weight", "conv1d.input")}
    per_channel = PointRule(per_channel=True)
    ends = {0: _x_rule("percentile", alpha=1.0, sigma=0.01)}
    ends[-1] = _x_rule("percentile", alpha=0.9999, sigma=0.01)
    return {
        "bf16": None,
        "quamba1": q1,
        **{f"quamba1-alpha{a:g}": q1.model_copy(update={"percentile_alpha": a}) for a in ALPHAS},
        **{f"quamba1-sigma{s:g}": q1.model_copy(update={"ema_sigma": s}) for s in SIGMAS},
        "quamba1-sigma-warmup": q1.model_copy(update={"sigma_warmup": SIGMA_WARMUP}),
        "quamba1-minmax": q1.model_copy(update={"points": _x_rule("minmax")}),
        "quamba1-mse": q1.model_copy(update={"points": _x_rule("mse")}),
        "quamba1-aciq": q1.model_copy(update={"points": _x_rule("aciq")}),
        "quamba1-kl": q1.model_copy(update={"points": _x_rule("kl")}),
        "quamba1-max-entropy": q1.model_copy(update={"points": _x_rule("max_entropy")}),
        "quamba1-alpha-by-mse": q1.model_copy(update={"points": _x_rule("percentile_mse")}),
        "quamba1-per-channel": q1.model_copy(update={"per_channel": True}),
        "quamba1-first-alpha1-last-alpha0.9999": q1.model_copy(update={"layer_rules": ends}),
        "quamba1-first-last-float": q1.model_copy(update={"float_layers": [0, -1]}),
        "quamba1-conv1d-float": q1.model_copy(update={"points": conv_off}),
        "quamba1-out-proj-input-float": q1.model_copy(
            update={"points": {"out_proj.input": PointRule(quantize=False)}}
        ),
        "quamba1-hadamard": q1.model_copy(update={"rotate": "hadamard"}),
        "quamba1-mixed-W8A16": q1.model_copy(update={"a16_budget": SENSITIVE_BUDGET}),
        "quamba1-mixed-x0.8": q1.model_copy(update={"scale_budget": SENSITIVE_BUDGET}),
        "quamba2": q2,
        "quamba2-hadamard": q2.model_copy(update={"rotate": "hadamard"}),
        **{
            f"quamba2-{k}x{k}": q2.model_copy(update={"head_groups": k, "channel_groups": k})
            for k in (2, 8, 16)
        },
        "quamba2-per-channel": q2.model_copy(update={"points": {"ssm.x": per_channel}}),
        "quamba2-adaptive": q2.model_copy(update={"adaptive_groups": ADAPTIVE_GROUPS}),
        "quamba2-percentile": q2.model_copy(
            update={"points": _x_rule("percentile", alpha=0.99999, sigma=0.01)}
        ),
        **w4_settings(),
        "quamba1-lsq": q1.model_copy(update={"learn_scales": LearnScales()}),
        "quamba2-lsq": q2.model_copy(update={"learn_scales": LearnScales()}),
    }


MIXED_BUDGET = 1  # blocks kept W4A16 by the mixed setting (1 of the fixtures' 4)


def w4_settings() -> dict[str, MambaRecipe]:
    """Quamba2's weight side, spelled as the LLM schemes and methods (`scheme_recipe`):
    `quamba2-W4A8-rtn`, `-W4A8-gptq`, `-W4A16-rtn`, `-W4A16-gptq` (int4 in_proj / x_proj /
    out_proj in groups of 128 input columns; W4A8 keeps Quamba2's static INT8 activations,
    conv1d and dt_proj in INT8, W4A16 all of them float), `quamba2-W4A8-gptq-qinputs` (GPTQ's
    Hessians from the INT8-rounded inputs the W4A8 matmuls see) and `quamba2-W4A8-W4A16-gptq`:
    W4A8 but the `MIXED_BUDGET` blocks most sensitive to W4A8 at W4A16."""
    out = {
        f"quamba2-{scheme}-{method}": scheme_recipe(scheme, method)
        for scheme in W4_SCHEMES
        for method in ("rtn", "gptq")
    }
    out["quamba2-W4A8-gptq-qinputs"] = out["quamba2-W4A8-gptq"].with_options(
        gptq_inputs="quantized"
    )
    mixed = scheme_recipe("W4A8", "gptq").with_options(a16_budget=MIXED_BUDGET)
    return {**out, "quamba2-W4A8-W4A16-gptq": mixed}


def _x_setting(
    observer: str,
    alpha: float | None = None,
    sigma: float | None = None,
    warmup: int | None = None,
) -> MambaRecipe:
    """Quamba1 with the SSM input ssm.x calibrated by `observer` (percentile: the recipe's
    percentile_alpha / ema_sigma / sigma_warmup, else observer kwargs)."""
    q1 = MambaRecipe(method="quamba1")
    if isinstance(get_observer(observer), PercentileObserver):
        return q1.with_options(percentile_alpha=alpha, ema_sigma=sigma, sigma_warmup=warmup)
    kwargs = {"sigma": sigma, "sigma_warmup": warmup}
    rule = _x_rule(observer, **{k: v for k, v in kwargs.items() if v is not None})
    return q1.model_copy(update={"points": rule})


def _check_flag(flag: str, values: Sequence[float], observer: str) -> None:
    """Refuse --alpha / --sigma / --sigma-warmup for an ssm.x observer without them."""
    obs = get_observer(observer)
    takes = isinstance(obs, PercentileObserver) if flag == "--alpha" else obs.combine == "ema"
    if values and not takes:
        raise QuantscaleError(
            f"{flag} sets the {'percentile' if flag == '--alpha' else 'EMA'} parameter of the "
            f"Mamba SSM input ssm.x; its observer {observer!r} has none (use --observer "
            f"percentile{'' if flag == '--alpha' else ' or ema'})"
        )


def flag_settings(
    observer: str | None = None,
    alphas: Sequence[float] = (),
    sigmas: Sequence[float] = (),
    observers: Sequence[str] = (),
    sigma_warmup: int | None = None,
    per_channel: bool = False,
    first_last: bool = False,
) -> dict[str, MambaRecipe]:
    """`quantscale sweep`'s observer flags on a Mamba model, as on the LLM sweep.

    --alpha / --sigma / --sigma-warmup / --observers act on ssm.x, the point Quamba1
    calibrates with a percentile (every other point is min-max): one Quamba1 setting per
    alpha, sigma, warm-up and observer kind, ssm.x using `observer` (default percentile);
    --per-channel adds one with per-channel scales at every activation point, --first-last
    three with the first, last, and first and last blocks in float; --observer alone gives
    one setting.
    """
    x_obs = observer or "percentile"
    _check_flag("--alpha", alphas, x_obs)
    _check_flag("--sigma", sigmas, x_obs)
    _check_flag("--sigma-warmup", [sigma_warmup] if sigma_warmup else [], x_obs)
    for kind in observers:
        get_observer(kind)
    name = f"quamba1 ssm.x={x_obs}"
    out = {f"{name} alpha={a:g}": _x_setting(x_obs, alpha=a) for a in alphas}
    out |= {f"{name} sigma={s:g}": _x_setting(x_obs, sigma=s) for s in sigmas}
    if sigma_warmup:
        out[f"{name} sigma-warmup={sigma_warmup}"] = _x_setting(x_obs, warmup=sigma_warmup)
    out |= {f"quamba1 ssm.x={kind}": _x_setting(kind) for kind in observers}
    ref = _x_setting(x_obs)
    if per_channel:
        out[f"{name} per-channel act"] = ref.with_options(per_channel=True)
    if first_last:
        for label, layers in (("first layer", [0]), ("last layer", [-1]), ("first+last", [0, -1])):
            out[f"{name} {label} float"] = ref.with_options(float_layers=layers)
    if observer and not out:
        out[name] = ref
    return out


def measure(model: nn.Module, tokenizer: Any, n_tokens: int = 32768, n_items: int = 200) -> dict:
    """Held-out Wikipedia perplexity (512-token windows) and cloze accuracy of a model."""
    from quantscale.data.calibration import eval_tokens
    from quantscale.eval.cloze import cloze_accuracy
    from quantscale.eval.perplexity import perplexity

    tokens = eval_tokens(tokenizer, n_tokens)
    return {
        "ppl": perplexity(model, tokens, seq_len=512),
        "cloze": cloze_accuracy(model, tokenizer, n_items=n_items),
        "eval_tokens": int(tokens.numel()),
        "cloze_items": n_items,
    }


@torch.inference_mode()
def final_hidden_states(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """float32 last hidden states (before the LM head) of token ids [batch, seq]."""
    from quantscale.eval.scoring import final_hidden

    return final_hidden(model, ids).float()


def point_sqnr(model: nn.Module, batches: Sequence[torch.Tensor]) -> dict[str, float]:
    """SQNR (dB) of each quantized activation point's INT8 round trip, over all layers.

    Each point is measured on the values the quantized model really gives it.
    """
    mixers = list(quantized_mixers(model).values())
    for mixer in mixers:
        mixer.error_stats = {}
    try:
        run_batches(model, batches, "point errors")
    finally:
        totals: dict[str, list[float]] = {}
        for mixer in mixers:
            for point, (signal, noise) in (mixer.error_stats or {}).items():
                acc = totals.setdefault(point, [0.0, 0.0])
                acc[0], acc[1] = acc[0] + signal, acc[1] + noise
            mixer.error_stats = None
    return {p: 10 * math.log10(s / max(n, 1e-30)) for p, (s, n) in totals.items()}


def reference_hidden(
    model_spec: str | os.PathLike, windows: int = PROBE_WINDOWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out token windows [windows, 512], the float32 model's final hidden states)."""
    from quantscale.data.calibration import eval_tokens

    model, tokenizer = load_mamba(model_spec)
    tokenizer = require_tokenizer(tokenizer, model_spec, "evaluation")
    probe = eval_tokens(tokenizer, windows * PROBE_LEN).reshape(windows, PROBE_LEN)
    return probe, final_hidden_states(model, probe)


def _settings(
    names: Sequence[str], extra: Mapping[str, MambaRecipe] | None = None
) -> list[tuple[str, MambaRecipe | None]]:
    """The named settings (`mamba_sweep_settings`), then the `extra` ones."""
    settings = mamba_sweep_settings()
    unknown = [n for n in names if n not in settings]
    if unknown:
        raise QuantscaleError(f"unknown setting(s) {unknown}; known: {', '.join(settings)}")
    return [(n, settings[n]) for n in names] + list((extra or {}).items())


def _evaluate_one(
    model_spec: str | os.PathLike,
    recipe: MambaRecipe | None,
    calib_data: str | os.PathLike | None,
    n_tokens: int,
    n_items: int,
    probe: tuple[torch.Tensor, torch.Tensor],
) -> dict:
    """Metrics of one setting (None: the bf16 baseline), without its name."""
    from quantscale.eval.error import sqnr_db

    ids, reference = probe
    calib_s = 0.0
    if recipe is None:
        model, tokenizer = load_mamba(model_spec, torch.bfloat16)
    else:
        model, tokenizer = load_mamba(model_spec)
        start = time.perf_counter()
        batches = calibration_token_batches(tokenizer, recipe, calib_data, model_spec)
        quantize_mamba(model, batches, recipe)
        calib_s = time.perf_counter() - start
    row = measure(model, tokenizer, n_tokens, n_items)
    row["hidden_sqnr_db"] = sqnr_db(reference, final_hidden_states(model, ids))
    row["point_sqnr_db"] = {} if recipe is None else point_sqnr(model, [ids])
    row["calib_s"] = calib_s
    row["scales"] = scale_counts(model)
    qcfg = getattr(model.config, "quantization_config", None) or {}
    if "block_sensitivity" in qcfg:  # a sensitivity-scan setting: what its scan chose
        row["a16_layers"] = qcfg["recipe"]["a16_layers"]
        row["scale_layers"] = qcfg["recipe"]["scale_layers"]
        row["block_sensitivity"] = qcfg["block_sensitivity"]
    if "group_counts" in qcfg:  # the adaptive group count per block
        row["group_counts"] = qcfg["group_counts"]
    alphas = {
        str(i): act.chosen_alpha
        for i, m in quantized_mixers(model).items()
        if (act := m.act("ssm.x")) is not None and act.chosen_alpha is not None
    }
    if alphas:  # the alpha a per-layer search chose for ssm.x in each block
        row["chosen_alpha"] = alphas
    return row


def scale_counts(model: nn.Module) -> dict[str, int]:
    """Activation point -> number of static scales in use over all quantized blocks, and
    'all' (their sum); empty for a model without quantized mixers."""
    counts: dict[str, int] = {}
    for mixer in quantized_mixers(model).values():
        for point in ACTIVATION_POINTS[mixer.kind]:
            act = mixer.act(point)
            if act is not None:
                counts[point] = counts.get(point, 0) + act.n_scales()
    return {**counts, "all": sum(counts.values())} if counts else {}


def evaluate_settings(
    model_spec: str | os.PathLike,
    names: Sequence[str],
    n_samples: int,
    seq_len: int,
    n_tokens: int,
    n_items: int,
    calib_data: str | os.PathLike | None = None,
    batch_size: int = 8,
    extra: Mapping[str, MambaRecipe] | None = None,
) -> list[dict]:
    """Measure each named setting, then each `extra` one (name -> recipe), on one model,
    calibrated on `n_samples` x `seq_len` windows (of `calib_data`, default the Wikipedia
    calibration split) in batches of `batch_size`; one row per setting."""
    settings = _settings(names, extra)
    probe = reference_hidden(model_spec)
    rows = []
    for name, recipe in settings:
        start = time.perf_counter()
        if recipe is not None:
            recipe = recipe.with_options(
                n_samples=n_samples, seq_len=seq_len, batch_size=batch_size
            )
        metrics = _evaluate_one(model_spec, recipe, calib_data, n_tokens, n_items, probe)
        row = {"setting": name, **metrics}
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
    base = next((r["ppl"] for r in rows if r["setting"] == "bf16"), None)
    for row in rows:
        row["ppl_increase_pct"] = None if base is None else 100 * (row["ppl"] / base - 1)
    return rows


def _cells(row: dict) -> list[str]:
    delta, points, scales = row["ppl_increase_pct"], row["point_sqnr_db"], row["scales"]
    return [
        row["setting"],
        f"{row['ppl']:.3f}",
        "" if delta is None else f"{delta:+.2f}%",
        f"{100 * row['cloze']:.1f}%",
        f"{row['hidden_sqnr_db']:.1f} dB",
        f"{points['ssm.x']:.1f} dB" if "ssm.x" in points else "",
        str(scales["ssm.x"]) if "ssm.x" in scales else "",
        str(scales["all"]) if "all" in scales else "",
        f"{row['calib_s']:.1f}",
        f"{row['seconds']:.0f}",
    ]


def print_rows(model_spec: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Print `evaluate_settings` rows as a table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{os.fspath(model_spec)}: held-out Wikipedia")
    columns = ("setting", "perplexity", "vs bf16", "cloze acc", "SQNR vs fp32", "x SQNR")
    columns_all = (*columns, "x scales", "act scales", "calib s", "seconds")
    for col in columns_all:
        table.add_column(col, justify="left" if col == "setting" else "right", no_wrap=True)
    for row in rows:
        table.add_row(*_cells(row))
    Console(width=max(160, Console().width)).print(table)
