"""Precision report of a checkpoint, from the shard headers only (no tensor data is read).

Per module kind (attention q/k/v/o, experts w1/w2/w3, router, embeddings, norms, lm_head...)
it lists dtypes, shapes, the stored format of quantized weights, scale dtypes/shapes, the block
size the scale grid implies and the bits per parameter (stored bytes, scales and other side
tensors included, over the plain parameter count); then counts (FP8 weights, scale tensors,
other tensors by dtype), bytes by dtype and the saving against the same checkpoint with its
quantized weights in bf16 and no scales. Packed layouts (compressed-tensors, ModelOpt) are read
through the dequantize plan, so a packed int4 weight counts its plain rows x columns.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quantscale.checkpoint.dequantize import (
    FP8,
    MODELOPT_NVFP4,
    DequantPlan,
    StoredWeight,
    plan_dequantize,
)
from quantscale.checkpoint.layouts import config_block, scale_name_for, weight_of_scale
from quantscale.checkpoint.read import Checkpoint, TensorInfo
from quantscale.errors import CheckpointError, QuantscaleError
from quantscale.formats.fp8 import block_grid
from quantscale.naming import module_kind

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


def find_scale(ckpt: Checkpoint, name: str) -> str | None:
    """Name of the scale stored for weight `name` (None for non-`.weight` tensors)."""
    return scale_name_for(ckpt.tensors, name) if name.endswith(".weight") else None


_DIGITS = re.compile(r"\.\d+\.")
_KIND_CACHE: dict[str, str] = {}


def kind_of(name: str) -> str:
    """`module_kind`, cached on the name with layer/expert indices set to 0 (96k names: fast)."""
    key = _DIGITS.sub(".0.", name)
    kind = _KIND_CACHE.get(key)
    if kind is None:
        kind = _KIND_CACHE[key] = module_kind(key)
    return kind


def infer_block(
    weight: tuple[int, ...], scale: tuple[int, ...], hint: tuple[int, int] | None = None
) -> str:
    """Block size a scale grid implies for a 2-D weight, e.g. "128x128", "per-channel"."""
    if len(scale) == 0 or all(d == 1 for d in scale):
        return "per-tensor"
    if len(weight) != 2 or len(scale) != 2:
        return "?"
    if scale[1] == 1 and scale[0] == weight[0]:
        return "per-channel"
    if hint is not None and block_grid(weight, hint) == tuple(scale):
        return f"{hint[0]}x{hint[1]}"
    return f"{_block_dim(weight[0], scale[0])}x{_block_dim(weight[1], scale[1])}"


def _block_dim(size: int, tiles: int) -> str:
    """Tile length b with ceil(size/b) == tiles, preferring a power of two."""
    if tiles <= 0 or tiles > size:
        return "?"
    lo = -(-size // tiles)  # smallest b with ceil(size/b) <= tiles
    hi = (size - 1) // (tiles - 1) if tiles > 1 else size  # largest b with ceil(size/b) >= tiles
    if lo > hi:
        return "?"
    power = 1 << (lo - 1).bit_length()
    return str(power if power <= hi else lo)


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


@dataclass
class KindSummary:
    """All non-scale tensors of one module kind, with the scales of its weights."""

    kind: str
    tensors: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, int] = field(default_factory=dict)
    scale_dtypes: dict[str, int] = field(default_factory=dict)
    scale_shapes: dict[str, int] = field(default_factory=dict)
    blocks: dict[str, int] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    params: int = 0

    @property
    def bits_per_param(self) -> float:
        """Stored bits (weights, scales, side tensors) per plain parameter."""
        return 8 * self.bytes / self.params if self.params else 0.0


@dataclass
class PrecisionReport:
    """What `quantscale inspect` prints; `to_dict()` is its JSON form."""

    path: str
    shards: int
    tensors: int
    fp8_weights: int
    scale_tensors: int
    scale_elements: int
    other_tensors: dict[str, int]
    bytes_by_dtype: dict[str, int]
    total_bytes: int
    bf16_bytes: int
    kinds: list[KindSummary]
    quantization_config: dict | None
    packed_weights: dict[str, int] = field(default_factory=dict)  # non-FP8 codes, by format

    @property
    def saving_bytes(self) -> int:
        return self.bf16_bytes - self.total_bytes

    @property
    def saving_fraction(self) -> float:
        return self.saving_bytes / self.bf16_bytes if self.bf16_bytes else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        for row, kind in zip(out["kinds"], self.kinds, strict=True):
            row["bits_per_param"] = kind.bits_per_param
        out["saving_bytes"] = self.saving_bytes
        out["saving_fraction"] = self.saving_fraction
        return out


def _add(counter: dict[str, int], key: str, n: int = 1) -> None:
    counter[key] = counter.get(key, 0) + n


def precision_report(ckpt: Checkpoint | str | os.PathLike) -> PrecisionReport:
    """Build the precision report of a checkpoint from its headers."""
    if not isinstance(ckpt, Checkpoint):
        ckpt = Checkpoint(ckpt)
    tensors = ckpt.tensors
    hint = config_block(ckpt.config)
    kinds: dict[str, KindSummary] = {}
    bytes_by_dtype: Counter[str] = Counter()
    other: Counter[str] = Counter()
    packed: Counter[str] = Counter()
    fp8 = scales = scale_elems = bf16_bytes = 0
    plan = _plan(ckpt)
    for name, info in tensors.items():
        bytes_by_dtype[info.dtype] += info.nbytes
        if weight_of_scale(name) in tensors:
            scales += 1
            scale_elems += _numel(info.shape)
            continue
        if name in plan.consumed:
            continue  # a packed weight's scale / zero point / shape: counted with its weight
        kind = kind_of(name)
        row = kinds.setdefault(kind, KindSummary(kind))
        stored = plan.weights.get(name)
        _add_tensor(row, info, stored.shape if stored is not None else info.shape)
        if info.dtype in FP8_DTYPES:
            fp8 += 1
            bf16_bytes += 2 * _numel(info.shape)
        elif stored is not None:
            other[info.dtype] += 1
            bf16_bytes += 2 * _numel(stored.shape)
            packed[stored.fmt or stored.kind] += 1
            side = [t for t in stored.parts.values() if weight_of_scale(t) not in tensors]
            scales += len(side)  # the rest were counted as scales of `.weight` above
            scale_elems += sum(_numel(tensors[t].shape) for t in side)
        else:
            other[info.dtype] += 1
            bf16_bytes += info.nbytes
        if stored is not None:
            _add_stored(row, ckpt, stored, hint)
        elif (scale := find_scale(ckpt, name)) is not None:
            _add_scale(row, info.shape, tensors[scale], hint)
    return PrecisionReport(
        path=str(ckpt.path),
        shards=len(ckpt.shards),
        tensors=len(tensors),
        fp8_weights=fp8,
        scale_tensors=scales,
        scale_elements=scale_elems,
        other_tensors=dict(sorted(other.items())),
        bytes_by_dtype=dict(sorted(bytes_by_dtype.items())),
        total_bytes=sum(bytes_by_dtype.values()),
        bf16_bytes=bf16_bytes,
        kinds=sorted(kinds.values(), key=_kind_rank),
        quantization_config=ckpt.quantization_config,
        packed_weights=dict(sorted(packed.items())),
    )


_KIND_GROUPS = ("embeddings", "attention", "mlp", "experts", "router", "mamba", "norm", "lm_head")


_PART_ORDER = ("q", "k", "v", "qkv", "o", "w1", "w2", "w3", "gate", "up", "down")


def _kind_rank(row: KindSummary) -> tuple[int, int, str]:
    """Report order: embeddings, attention q/k/v/o, MLP, experts, router, norms, lm_head."""
    group, _, part = row.kind.partition(".")
    rank = _KIND_GROUPS.index(group) if group in _KIND_GROUPS else len(_KIND_GROUPS)
    sub = _PART_ORDER.index(part) if part in _PART_ORDER else len(_PART_ORDER)
    return rank, sub, row.kind


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _plan(ckpt: Checkpoint) -> DequantPlan:
    """The checkpoint's quantized weights; empty when its layout cannot be read (validate
    says why), so the report still lists what is stored."""
    try:
        return plan_dequantize(ckpt)
    except CheckpointError:
        return DequantPlan()


def _add_tensor(row: KindSummary, info: TensorInfo, plain: tuple[int, ...]) -> None:
    """A stored tensor: its bytes and dtype, and its `plain` shape (a packed weight's
    unpacked rows x columns) for the parameter count."""
    row.tensors += 1
    row.bytes += info.nbytes
    row.params += _numel(plain)
    _add(row.dtypes, info.dtype)
    _add(row.shapes, _shape(plain))


def _add_stored(
    row: KindSummary, ckpt: Checkpoint, sw: StoredWeight, hint: tuple[int, int] | None
) -> None:
    """A quantized weight's format, side tensors' bytes and its scale's dtype / shape /
    block."""
    _add(row.formats, stored_format(sw))
    for local, tensor in sw.parts.items():
        part = ckpt.tensors[tensor]
        if local in ("scale", "weight_scale"):
            _add_scale(row, sw.shape, part, hint)
        else:
            row.bytes += part.nbytes


def stored_format(sw: StoredWeight) -> str:
    """A short name of how a quantized weight is stored: "fp8", "int4 g32", "fp4 g16",
    "int8 channel", "nvfp4" (ModelOpt)..."""
    args = sw.args
    if args is None:
        return {MODELOPT_NVFP4: "nvfp4", FP8: "fp8"}.get(sw.kind, sw.kind)
    bits = f"{'fp' if args.type == 'float' else args.type}{args.num_bits}"
    if args.strategy in ("group", "tensor_group") and args.group_size:
        return f"{bits} g{args.group_size}"
    return f"{bits} {args.strategy}"


def _add_scale(
    row: KindSummary, weight: tuple[int, ...], scale: TensorInfo, hint: tuple[int, int] | None
) -> None:
    row.bytes += scale.nbytes
    _add(row.scale_dtypes, scale.dtype)
    _add(row.scale_shapes, _shape(scale.shape))
    _add(row.blocks, infer_block(weight, scale.shape, hint))


# ---------------------------------------------------------------- rendering


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000
    return str(n)


def _cell(counts: dict[str, int], limit: int = 3) -> str:
    """`{"6144x3072": 2}` -> "6144x3072"; several values get their counts."""
    if not counts:
        return "-"
    if len(counts) == 1:
        return next(iter(counts))
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{k} ({v:,})" for k, v in items[:limit])
    return text + (f", +{len(items) - limit} more" if len(items) > limit else "")


def render(report: PrecisionReport, console=None) -> None:
    """Print the report as a rich table plus a summary."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"Precision report: {report.path}")
    table.add_column("Module kind", no_wrap=True)
    table.add_column("Tensors", justify="right")
    for col in ("DType", "Shape", "Format", "Scale", "Block"):
        table.add_column(col)
    table.add_column("Bytes", justify="right", no_wrap=True)
    table.add_column("Bits/param", justify="right", no_wrap=True)
    for row in report.kinds:
        scale = _cell(row.scale_shapes)
        if row.scale_dtypes:
            scale = f"{_cell(row.scale_dtypes)} {scale}"
        dtypes, shapes, formats = _cell(row.dtypes), _cell(row.shapes), _cell(row.formats)
        cells = (dtypes, shapes, formats, scale, _cell(row.blocks), _human(row.bytes))
        table.add_row(row.kind, f"{row.tensors:,}", *cells, f"{row.bits_per_param:.2f}")
    console.print(table)
    for line in summary_lines(report):
        console.print(line, highlight=False)


def summary_lines(report: PrecisionReport) -> list[str]:
    """The counts, bytes and saving in plain words."""
    other = ", ".join(f"{n:,} {dt}" for dt, n in report.other_tensors.items()) or "none"
    bytes_line = ", ".join(f"{dt} {_human(b)}" for dt, b in report.bytes_by_dtype.items())
    qc = report.quantization_config
    scales = "scale tensors" if report.packed_weights else "FP8 scale parameters"
    packed = "".join(f"{n:,} packed {fmt} weights, " for fmt, n in report.packed_weights.items())
    lines = [
        f"{report.tensors:,} tensors in {report.shards} shard(s): {report.fp8_weights:,} FP8 "
        f"weights, {packed}{report.scale_tensors:,} {scales} "
        f"({report.scale_elements:,} scale values), other tensors: {other}",
        f"bytes by dtype: {bytes_line}; total {_human(report.total_bytes)}",
        f"as bf16 (quantized weights in bf16, no scales): {_human(report.bf16_bytes)}; "
        f"saving {_human(report.saving_bytes)} ({100 * report.saving_fraction:.1f}%)",
        f"bits per parameter: {_bits(report.kinds)} overall, quantized kinds "
        f"{_bits([k for k in report.kinds if k.formats])}",
        f"quantization_config: {qc if qc is not None else 'none'}",
    ]
    return lines


def _bits(rows: list[KindSummary]) -> str:
    params = sum(r.params for r in rows)
    return f"{8 * sum(r.bytes for r in rows) / params:.2f}" if params else "-"


def report_text(report: PrecisionReport, width: int = 120) -> str:
    """The rendered report as plain text (no colour), as `render` prints it."""
    import io

    from rich.console import Console

    buffer = io.StringIO()
    render(report, Console(file=buffer, width=width, color_system=None, force_terminal=False))
    return buffer.getvalue()


def write_report(report: PrecisionReport, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `report_text` to `out` atomically (a temporary beside it, then a rename); an
    existing `out` is refused unless `overwrite`."""
    path = Path(out)
    if path.exists() and not overwrite:
        raise QuantscaleError(f"{path}: already exists (pass --overwrite to replace it)")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(report_text(report))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
