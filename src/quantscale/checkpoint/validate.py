"""Check a checkpoint's config.json against its tensors: FP8 block-wise ones (HF layout, or
no quantization_config) in detail; the other layouts through their formats' header checks.

Each finding has a severity ("error" or "warning"), the tensors it concerns (grouped, e.g.
"q_proj in 62 layers") and a plain-words explanation of what a loader will do with it.
Everything is read from shard headers except the inverted-scale and ue8m0 checks, which read
a bounded sample of scale tensors and weight tiles.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from quantscale.checkpoint.dequantize import FP8, DequantPlan, plan_dequantize
from quantscale.checkpoint.gguf import find_gguf
from quantscale.checkpoint.inspect import FP8_DTYPES, find_scale, kind_of
from quantscale.checkpoint.layouts import (
    CT_METHOD,
    HF_FP8,
    HF_FP8_METHOD,
    QUAMBA,
    Layout,
    detect_layout,
    parse_block,
    weight_of_scale,
)
from quantscale.checkpoint.read import Checkpoint, TensorInfo
from quantscale.checkpoint.refusal import Refusal
from quantscale.checkpoint.runtimes import runtime_refusals, selects
from quantscale.errors import CheckpointError
from quantscale.formats.fp8 import DEFAULT_BLOCK, block_grid
from quantscale.naming import group_names, module_path
from quantscale.scheme import Recipe

ERROR, WARNING = "error", "warning"
FMT_SPELLINGS = ("e4m3", "float8_e4m3fn")
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
# Dequantized LLM weights sit well inside |w| < 1; inverted scales put them near 1e4..1e6.
MAX_PLAUSIBLE_WEIGHT = 100.0
# A dequant multiplier is amax/448: ~1e-5..1e-2 for LLM weights. Above 1 means |w| > 448.
MAX_PLAUSIBLE_SCALE = 1.0


@dataclass
class Finding:
    """One problem: severity, short code, explanation and the tensors concerned."""

    severity: str
    code: str
    message: str
    tensors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
            "where": group_names(self.tensors),
            "tensors": self.tensors,
        }


@dataclass
class ValidationReport:
    path: str
    findings: list[Finding]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "ok": self.ok,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "findings": [f.to_dict() for f in self.findings],
        }


# ---------------------------------------------------------------- naming helpers


def _component_match(module: str, entry: str) -> bool:
    """`entry` is one or more whole name components of `module` ("self_attn", "mlp.gate")."""
    return f".{entry}." in f".{module}."


def _hf5_match(module: str, entry: str) -> bool:
    """transformers 5.x `should_convert_module`: the entry matches from the start of the name
    up to a module boundary (also as a regex), or the name ends with it."""
    try:
        prefix = re.match(rf"(?:{entry})(?:(?<=\.)|(?=\.|$))", module) is not None
    except re.error:
        prefix = module.startswith(entry)
    return prefix or module.endswith(entry)


def skip_rules(module: str, entries: list[str]) -> dict[str, list[str]]:
    """Which modules_to_not_convert entries skip `module`, and under which loader rule.

    Keys: "component" (a whole name component), "transformers>=5" (prefix at a module
    boundary or suffix), "substring" (transformers 4.x FineGrainedFP8 and other loaders
    that test `entry in module_name`).
    """
    rules: dict[str, list[str]] = {}
    for entry in entries:
        for rule, hit in (
            ("component", _component_match(module, entry)),
            ("transformers>=5", _hf5_match(module, entry)),
            ("substring", entry in module),
        ):
            if hit:
                rules.setdefault(rule, []).append(entry)
    return rules


# ---------------------------------------------------------------- context


@dataclass
class _Context:
    ckpt: Checkpoint
    qc: dict | None
    block: tuple[int, int]
    skip: list[str]
    fp8: dict[str, TensorInfo]
    scales: dict[str, str]  # fp8 weight -> its scale tensor name

    @property
    def is_fp8(self) -> bool:
        return bool(self.fp8) or (self.qc or {}).get("quant_method") == HF_FP8_METHOD


def _context(ckpt: Checkpoint) -> _Context:
    qc = ckpt.quantization_config
    block = parse_block((qc or {}).get("weight_block_size")) or DEFAULT_BLOCK
    skip = (qc or {}).get("modules_to_not_convert") or []
    skip = [s for s in skip if isinstance(s, str)]
    fp8 = {n: i for n, i in ckpt.tensors.items() if i.dtype in FP8_DTYPES}
    scales = {n: s for n in fp8 if (s := find_scale(ckpt, n)) is not None}
    return _Context(ckpt, qc, block, skip, fp8, scales)


# ---------------------------------------------------------------- checks


def check_config(ctx: _Context) -> list[Finding]:
    """(g) quantization_config fields: quant_method, fmt, activation_scheme, block, scale_fmt."""
    qc = ctx.qc
    if qc is None:
        if not ctx.fp8:
            return []
        return [
            Finding(
                ERROR,
                "config-missing",
                "The checkpoint holds FP8 weights but config.json has no quantization_config: "
                "loaders will build ordinary bf16 Linear layers and either refuse the fp8 "
                "tensors or cast their raw values without scales. Add quantization_config "
                '{"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", '
                f'"weight_block_size": {list(ctx.block)}}}.',
                sorted(ctx.fp8),
            )
        ]
    out = []
    method = qc.get("quant_method")
    if method == HF_FP8_METHOD and not ctx.fp8:
        out.append(
            Finding(
                ERROR,
                "config-stale",
                "config.json says quant_method 'fp8' but the checkpoint holds no FP8 weights "
                "(it was probably dequantized without updating config.json, as DeepSeek's "
                "fp8_cast_bf16 does): loaders will build FP8 layers and look for fp8 weights "
                "and scales that are not there. Remove quantization_config from config.json.",
            )
        )
    if method != HF_FP8_METHOD:
        out.append(_config_error(f"quant_method is {method!r}; FP8 block checkpoints need 'fp8'"))
    fmt = qc.get("fmt")
    if fmt is not None and fmt not in FMT_SPELLINGS:
        out.append(
            _config_error(f"fmt is {fmt!r}; expected one of {', '.join(map(repr, FMT_SPELLINGS))}")
        )
    act = qc.get("activation_scheme")
    if act is not None and act != "dynamic":
        out.append(
            _config_error(
                f"activation_scheme is {act!r}; block-wise FP8 loaders (transformers "
                "FineGrainedFP8) support only 'dynamic'"
            )
        )
    out += _check_block_field(qc)
    skip = qc.get("modules_to_not_convert")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(s, str) for s in skip)):
        out.append(_config_error(f"modules_to_not_convert is {skip!r}; expected a list of names"))
    scale_fmt = qc.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        out.append(
            Finding(
                WARNING,
                "config-field",
                f"quantization_config.scale_fmt is {scale_fmt!r}; the known value is 'ue8m0' "
                "(power-of-two scales); loaders may ignore or reject other values.",
            )
        )
    return out


def _check_block_field(qc: dict) -> list[Finding]:
    if "weight_block_size" not in qc:
        return [
            Finding(
                WARNING,
                "config-field",
                "quantization_config has no weight_block_size; loaders assume [128, 128]. "
                "Write it explicitly.",
            )
        ]
    raw = qc["weight_block_size"]
    if parse_block(raw) is not None:
        return []
    return [
        _config_error(f"weight_block_size is {raw!r}; expected 2 positive ints like [128, 128]")
    ]


def _config_error(problem: str) -> Finding:
    return Finding(ERROR, "config-field", f"config.json quantization_config: {problem}.")


def check_skip_list(ctx: _Context) -> list[Finding]:
    """(a) modules_to_not_convert entries that match modules stored with FP8 weights + scales."""
    by_entry: dict[tuple[str, str], list[str]] = defaultdict(list)
    for weight in ctx.scales:
        rules = skip_rules(module_path(weight), ctx.skip)
        strict = set(rules.get("component", [])) | set(rules.get("transformers>=5", []))
        for entry in strict:
            by_entry[(entry, ERROR)].append(weight)
        for entry in set(rules.get("substring", [])) - strict:
            by_entry[(entry, WARNING)].append(weight)
    out = []
    for (entry, severity), weights in sorted(by_entry.items()):
        out.append(
            Finding(
                severity,
                "skip-list-quantized",
                _skip_message(ctx, entry, weights, severity),
                weights,
            )
        )
    return out


def _skip_message(ctx: _Context, entry: str, weights: list[str], severity: str) -> str:
    example = max(sorted(weights), key=lambda n: ctx.fp8[n].shape[0])
    w, s = ctx.fp8[example], ctx.ckpt.tensors[ctx.scales[example]]
    rules = skip_rules(module_path(example), [entry])
    if "transformers>=5" in rules:
        rule = "transformers (4.x and 5.x) and substring-matching loaders skip them"
    elif "component" in rules:
        rule = (
            "it names a component of these module paths: transformers 4.x and other loaders "
            "that match entries as substrings skip them (transformers 5.x matches only a "
            "prefix or suffix of the name)"
        )
    else:
        rule = (
            "it is a substring of these module names: transformers 4.x and other loaders that "
            "test `entry in name` skip them; transformers 5.x does not"
        )
    return (
        f"modules_to_not_convert lists {entry!r}; {rule}, yet they are stored as FP8 "
        f"weights with scales ({len(weights)} modules). A loader that honours the list keeps "
        "them as ordinary unquantized Linear layers, loads raw fp8 values into them and "
        f"mis-reads the {list(s.shape)} scale as a per-channel one: MiniMax-M2 failed this way "
        f"at load time with `assert scale.shape[0] == weight.shape[0]` ({[s.shape[0]]} vs "
        f"{[w.shape[0]]}). Remove {entry!r} from modules_to_not_convert (list only modules "
        "stored unquantized, e.g. gate, e_score_correction_bias, lm_head)."
    )


def check_pairs(ctx: _Context) -> list[Finding]:
    """(b) FP8 weights without scales; (c) scales without FP8 weights."""
    tensors, out = ctx.ckpt.tensors, []
    missing = sorted(set(ctx.fp8) - set(ctx.scales))
    if missing:
        out.append(
            Finding(
                ERROR,
                "fp8-without-scale",
                f"{len(missing)} FP8 weights have no `weight_scale_inv`: without their per-block "
                "scales the fp8 values cannot be turned back into weights (loaders fail on the "
                "missing key or compute with the raw fp8 values, off by 1/scale).",
                missing,
            )
        )
    orphans: dict[str, list[str]] = {"missing": [], "not-fp8": []}
    not_fp8: dict[str, str] = {}  # scale -> its (non-FP8) weight
    for name in tensors:
        weight = weight_of_scale(name)
        if weight is None or weight in ctx.fp8:
            continue
        orphans["missing" if weight not in tensors else "not-fp8"].append(name)
        not_fp8[name] = weight
    if orphans["missing"]:
        out.append(
            Finding(
                ERROR,
                "scale-without-weight",
                f"{len(orphans['missing'])} scale tensors have no weight next to them "
                "(`<module>.weight` is missing): the checkpoint is incomplete or was renamed "
                "half-way.",
                sorted(orphans["missing"]),
            )
        )
    if orphans["not-fp8"]:
        names = sorted(orphans["not-fp8"])
        dtype = tensors[not_fp8[names[0]]].dtype
        out.append(
            Finding(
                ERROR,
                "scale-without-fp8",
                f"{len(names)} scale tensors belong to weights that are not FP8 (e.g. "
                f"{dtype}): the weight was dequantized or never quantized but its scale was "
                "kept, so an FP8 loader would multiply an already-real weight by the scale "
                "again. Drop these scales, or store the weights as float8_e4m3fn.",
                names,
            )
        )
    return out


def check_scale_shapes(ctx: _Context) -> list[Finding]:
    """(d) scale grids must be [ceil(out/bh), ceil(in/bw)] for weight_block_size."""
    bad: dict[str, list[str]] = defaultdict(list)
    for weight, scale in ctx.scales.items():
        w, s = ctx.fp8[weight], ctx.ckpt.tensors[scale]
        if len(w.shape) != 2:
            continue
        expected = block_grid(w.shape, ctx.block)
        if tuple(s.shape) != expected:
            bad[_shape_hint(w.shape, s.shape, ctx.block)].append(scale)
    return [
        Finding(
            ERROR,
            "scale-shape",
            f"{len(names)} scale tensors do not match weight_block_size {list(ctx.block)}: "
            f"{hint} Loaders index scales by tile, so a wrong grid mis-scales whole blocks or "
            "fails to load.",
            sorted(names),
        )
        for hint, names in sorted(bad.items())
    ]


def _shape_hint(w: tuple[int, ...], s: tuple[int, ...], block: tuple[int, int]) -> str:
    expected = block_grid(w, block)
    text = (
        f"e.g. weight {list(w)} has scale {list(s)} but [ceil({w[0]}/{block[0]}), "
        f"ceil({w[1]}/{block[1]})] = {list(expected)} is expected"
    )
    if tuple(s) == expected[::-1]:
        return text + " (the scale is transposed)."
    if len(s) == 2 and tuple(s) == (w[0] // block[0], w[1] // block[1]):
        return text + " (floor instead of ceil: edge tiles have no scale)."
    return text + "."


def check_unquantized(ctx: _Context) -> list[Finding]:
    """(e) float 2-D weights in modules that the config says are converted to FP8."""
    if not ctx.is_fp8:
        return []
    auto_skip_head = (ctx.qc or {}).get("modules_to_not_convert") is None
    names = []
    for name, info in ctx.ckpt.tensors.items():
        if not name.endswith(".weight") or len(info.shape) != 2 or info.dtype not in FLOAT_DTYPES:
            continue
        kind = kind_of(name)
        if kind in ("embeddings", "norm") or (kind == "lm_head" and auto_skip_head):
            continue
        rules = skip_rules(module_path(name), ctx.skip)
        if "component" in rules or "transformers>=5" in rules:
            continue
        names.append(name)
    if not names:
        return []
    return [
        Finding(
            WARNING,
            "unquantized-in-converted",
            f"{len(names)} 2-D weights are stored in {ctx.ckpt.tensors[names[0]].dtype} without "
            "scales, but modules_to_not_convert does not list their modules, so an FP8 loader "
            "will build FP8 Linear layers for them and expect fp8 weights and "
            "`weight_scale_inv`. If they are meant to stay unquantized, add their module names "
            "to modules_to_not_convert; otherwise quantize them.",
            sorted(names),
        )
    ]


# ---------------------------------------------------------------- sampled data checks


def _sample(names: list[str], count: int) -> list[str]:
    """Up to `count` names spread evenly over the sorted list."""
    names = sorted(names)
    if len(names) <= count:
        return names
    step = len(names) / count
    return [names[int(i * step)] for i in range(count)]


def _tile_amax(ctx: _Context, weight: str, scale: torch.Tensor) -> list[float]:
    """Max |dequantized w| of a few tiles: the tiles of largest and smallest scale, the first."""
    info, (bh, bw) = ctx.fp8[weight], ctx.block
    flat = scale.flatten()
    picks = {0, int(flat.argmax()), int(flat.argmin())}
    out = []
    with safe_open(ctx.ckpt.path / info.shard, framework="pt") as f:
        view = f.get_slice(weight)
        for p in sorted(picks):
            r, c = divmod(p, scale.shape[1])
            tile = view[r * bh : (r + 1) * bh, c * bw : (c + 1) * bw]
            out.append(tile.float().abs().max().item() * float(scale[r, c]))
    return out


def _read_scales(ctx: _Context, weights: list[str]) -> dict[str, torch.Tensor]:
    """Scale tensors of `weights` as float32, opening each shard once."""
    by_shard: dict[str, list[str]] = defaultdict(list)
    for w in weights:
        scale = ctx.scales[w]
        by_shard[ctx.ckpt.tensors[scale].shard].append(w)
    out = {}
    for shard, names in by_shard.items():
        with safe_open(ctx.ckpt.path / shard, framework="pt") as f:
            for w in names:
                out[w] = f.get_tensor(ctx.scales[w]).float()
    return out


def check_scale_values(ctx: _Context, sample: int = 12, scale_sample: int = 512) -> list[Finding]:
    """(f) inverted or implausible scales; ue8m0 scales must be powers of two.

    Reads up to `scale_sample` scale tensors spread evenly over the checkpoint (all of them
    in small checkpoints; a converter that inverts scales inverts them all) and a few tiles
    of up to `sample` of those weights.
    """
    usable = [
        w
        for w, s in ctx.scales.items()
        if len(ctx.fp8[w].shape) == 2
        and tuple(ctx.ckpt.tensors[s].shape) == block_grid(ctx.fp8[w].shape, ctx.block)
    ]
    scales = _read_scales(ctx, _sample(usable, scale_sample))
    big = [w for w, s in scales.items() if s.median() > MAX_PLAUSIBLE_SCALE]
    big_scale = [ctx.scales[w] for w in big]
    worst_scale = max((scales[w].median().item() for w in big), default=0)
    big_weight, worst_weight = [], 0.0
    for weight in _sample(list(scales), sample):
        amax = max(_tile_amax(ctx, weight, scales[weight]))
        if not math.isfinite(amax) or amax > MAX_PLAUSIBLE_WEIGHT:
            big_weight.append(ctx.scales[weight])
            worst_weight = max(worst_weight, amax)
    out = []
    if big_scale or big_weight:
        out.append(_inverted_finding(big_scale, big_weight, worst_scale, worst_weight))
    if (ctx.qc or {}).get("scale_fmt") == "ue8m0":
        not_pow2 = [ctx.scales[w] for w, s in scales.items() if not _powers_of_two(s)]
        if not_pow2:
            out.append(
                Finding(
                    ERROR,
                    "scale-not-ue8m0",
                    f"quantization_config.scale_fmt is 'ue8m0' but {len(not_pow2)} scale "
                    "tensors hold values that are not powers of two; runtimes that store ue8m0 "
                    "scales as exponents will round them and mis-scale those blocks. "
                    "Requantize with power-of-two scales or drop scale_fmt.",
                    sorted(not_pow2),
                )
            )
    return out


def _powers_of_two(scale: torch.Tensor) -> bool:
    positive = scale[scale > 0]
    mantissa, _ = torch.frexp(positive)
    return bool((mantissa == 0.5).all()) and positive.numel() == scale.numel()


def _inverted_finding(
    big_scale: list[str],
    big_weight_scales: list[str],
    worst_scale: float,
    worst_weight: float,
) -> Finding:
    facts = []
    if big_weight_scales:
        facts.append(
            f"dequantizing sampled tiles (fp8 x weight_scale_inv) gives |w| up to "
            f"{worst_weight:.3g}, where trained LLM weights lie roughly within 1e-4..1"
        )
    if big_scale:
        facts.append(
            f"median scale values reach {worst_scale:.3g}, where a dequantization multiplier "
            "amax/448 is about 1e-5..1e-2"
        )
    return Finding(
        ERROR,
        "scale-inverted",
        f"Scales look inverted in {len(set(big_scale) | set(big_weight_scales))} scale tensors: "
        f"{'; '.join(facts)}. `weight_scale_inv` must hold the dequantization "
        "multiplier (W = fp8 * weight_scale_inv, i.e. amax/448), not its reciprocal 448/amax; "
        "a converter probably applied 1/scale. Store the reciprocal of these values.",
        sorted(set(big_scale) | set(big_weight_scales)),
    )


# ---------------------------------------------------------------- runtimes


def check_runtimes(ctx: _Context, runtime: str | None) -> list[Finding]:
    """(h) tensors that a runtime refuses or loads wrongly (`runtimes.RUNTIMES`: transformers,
    vllm, vllm-cpu); all but the vLLM CPU-build rules when no runtime is named."""
    qc = ctx.qc or {}
    if "weight_block_size" in qc and parse_block(qc["weight_block_size"]) is None:
        return []  # already an error; runtime rules need a valid block size
    return runtime_findings(runtime_refusals(ctx.ckpt, runtime), runtime)


def runtime_findings(refusals: list[Refusal], runtime: str | None) -> list[Finding]:
    """One finding per (runtime, version, reason) of the refusals `runtime` selects: errors
    when a runtime is named, else warnings."""
    grouped: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for tensor, rt, version, reason in refusals:
        if selects(runtime, rt):
            grouped[(rt, str(version), reason)].append(tensor)
    severity = ERROR if runtime is not None else WARNING
    return [
        Finding(
            severity,
            "runtime-refuses",
            f"{rt} {version} on {len(names)} tensors of this checkpoint: {reason}.",
            sorted(names),
        )
        for (rt, version, reason), names in sorted(grouped.items())
    ]


# ---------------------------------------------------------------- entry point


def check_layout(ckpt: Checkpoint, layout: Layout) -> list[Finding]:
    """A checkpoint in another layout than HF FP8 (compressed-tensors, ModelOpt, Neuron, our
    saves): every quantized weight has the stored tensors, dtypes and scale shapes its format
    and config give it (the dequantizer's own header checks), and some weight is quantized."""
    if layout is QUAMBA:
        return []
    try:
        plan = plan_dequantize(ckpt)
    except CheckpointError as err:
        return [Finding(ERROR, "layout", f"{layout.name} checkpoint: {err}")]
    if plan.weights or layout.name in ("fake-quant", "pseudo"):
        return check_config_mismatch(ckpt, layout, plan)
    return [
        Finding(
            ERROR,
            "no-quantized-weights",
            f"config.json declares the {layout.name} layout but no tensor is stored in it: "
            "loaders build quantized layers and find plain weights",
        )
    ]


def _stored_as(
    ckpt: Checkpoint, layout: Layout, plan: DequantPlan, recipe: Recipe | None, weight: str
) -> str | None:
    """What a 2-D `<m>.weight` is stored as when that is not the format the config gives its
    module (FP8 codes, or a float dtype for a quantized module); None when it matches.
    compressed-tensors: the module's own scheme (`recipe`); ModelOpt: the layout's format."""
    sw = plan.weights.get(weight)
    fp8 = sw is not None and sw.kind == FP8
    if recipe is None:
        return "FP8" if fp8 and layout.number_format != "fp8" else None
    scheme = recipe.scheme_for(module_path(weight))
    w = scheme.weights if scheme is not None else None
    if w is None:
        return None
    if sw is not None:
        return "FP8" if fp8 and (w.type, w.num_bits) != ("float", 8) else None
    info = ckpt.tensors[weight]
    if info.dtype in FLOAT_DTYPES and len(info.shape) == 2 and kind_of(weight) != "embeddings":
        return info.dtype
    return None


def check_config_mismatch(ckpt: Checkpoint, layout: Layout, plan: DequantPlan) -> list[Finding]:
    """("honesty") Weights the config declares in `layout`'s format (e.g. NVFP4) but that are
    stored in another: FP8 codes with scales, or plain bf16 in a module the config quantizes
    (compressed-tensors; ModelOpt: FP8 only, its exclude rules are not modelled here)."""
    if layout.number_format not in ("nvfp4", "mxfp4", "int", "fp8"):
        return []
    ct = layout.convention == CT_METHOD
    recipe = Recipe.from_quantization_config(ckpt.quantization_config or {}) if ct else None
    by_kind: dict[str, list[str]] = defaultdict(list)
    for name in sorted(n for n in ckpt.tensors if n.endswith(".weight")):
        if (stored := _stored_as(ckpt, layout, plan, recipe, name)) is not None:
            by_kind[stored].append(name)
    return [
        Finding(
            ERROR,
            "config-mismatch",
            f"config.json declares {layout.name} ({layout.number_format}) weights but "
            f"{len(names)} of them are stored as {stored}: loaders build {layout.number_format} "
            "layers for them and fail on, or mis-read, these tensors. Re-export them in the "
            "declared format, or list their modules as ignored / excluded in the config.",
            names,
        )
        for stored, names in sorted(by_kind.items())
    ]


def validate_checkpoint(
    ckpt: Checkpoint | str | os.PathLike, runtime: str | None = None, sample: int = 12
) -> ValidationReport:
    """Run every check; `runtime` makes that runtime's refusals errors (else warnings). A GGUF
    file (or a directory holding one and no safetensors) gets llama.cpp's rules."""
    if not isinstance(ckpt, Checkpoint) and (gguf := find_gguf(ckpt)) is not None:
        return validate_gguf(gguf, runtime)
    if not isinstance(ckpt, Checkpoint):
        ckpt = Checkpoint(ckpt)
    ctx = _context(ckpt)
    layout = detect_layout(ckpt)
    if layout is None or layout is HF_FP8:
        findings = check_config(ctx)
        findings += check_skip_list(ctx)
        findings += check_pairs(ctx)
        findings += check_scale_shapes(ctx)
        findings += check_unquantized(ctx)
        findings += check_scale_values(ctx, sample)
    else:
        findings = check_layout(ckpt, layout)
    findings += check_runtimes(ctx, runtime)
    findings.sort(key=lambda f: f.severity != ERROR)
    return ValidationReport(str(ckpt.path), findings)


def validate_gguf(file: os.PathLike, runtime: str | None = None) -> ValidationReport:
    """llama.cpp's refusals of a GGUF file (`llama_cpp.gguf_refusals`) as findings."""
    from quantscale.checkpoint.llama_cpp import gguf_refusals

    return ValidationReport(str(file), runtime_findings(gguf_refusals(file), runtime))


def render(report: ValidationReport, console=None) -> None:
    """Print findings, errors first, each with where it applies."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    if not report.findings:
        console.print(f"[green]OK[/green] {report.path}: no problems found", highlight=False)
        return
    for f in report.findings:
        style = "red" if f.severity == ERROR else "yellow"
        head = f"[{style}]{f.severity.upper()}[/{style}]"
        console.print(f"{head} {escape(f'[{f.code}]')} {escape(f.message)}", highlight=False)
        if f.tensors:
            console.print(f"    where: {group_names(f.tensors)}", highlight=False)
    console.print(
        f"{len(report.errors)} error(s), {len(report.warnings)} warning(s) in {report.path}",
        highlight=False,
    )
