"""Dequantize a quantized checkpoint, per tensor or streamed into a plain copy.

FP8 (HF, compressed-tensors, ModelOpt or Neuron layout): every convention stores the same
thing under a different name, the dequantization multiplier, W = fp8.float() * scale per
tile. Names by layout, for a module `<m>`: HF `<m>.weight_scale_inv`, compressed-tensors /
ModelOpt `<m>.weight_scale` (ModelOpt's block scale is 4-D [out/bh, 1, in/bw, 1];
compressed-tensors may store it in bf16), Neuron `<m>.scale`. None of them is a reciprocal.
compressed-tensors NVFP4 / MXFP4 / INT (pack-quantized, int-quantized) weights are decoded by
their config group's QuantArgs (`dequantize_module`); ModelOpt NVFP4 as e2m1 * weight_scale *
weight_scale_2. `plan_dequantize` says, from the headers alone, which stored tensors make
each plain weight; `dequantize_stored` decodes one; `dequantize_checkpoint` and
`checkpoint.source.TensorSource` both go through them. One input tensor and the outputs
still being written are in memory at a time.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from safetensors import safe_open

from quantscale import progress
from quantscale.checkpoint.convert import SIDECAR
from quantscale.checkpoint.layouts import (
    ACTIVATION_SCALES,
    CT_METHOD,
    CT_MXFP4,
    CT_NVFP4,
    CT_PACKED,
    FAKE_QUANT,
    FP8_SCALES,
    HF_QUANT_CONFIG,
    NEURON_KEY,
    QUAMBA,
    config_block,
    detect_layout,
    module_format,
    scale_name_for,
)
from quantscale.checkpoint.read import Checkpoint, TensorInfo
from quantscale.checkpoint.transform import ShardRunner, TensorPlan, transform_checkpoint
from quantscale.errors import CheckpointError, QuantscaleError
from quantscale.formats.fp4 import NVFP4_GROUP, dequantize_nvfp4, unpack_fp4
from quantscale.formats.fp8 import DEFAULT_BLOCK, block_grid, dequantize_fp8_block
from quantscale.formats.intq import unpack_int32
from quantscale.formats.mxfp4 import MX_GROUP, mx_scale_value
from quantscale.naming import module_path
from quantscale.qdq import QParams, dequantize
from quantscale.scheme import QuantArgs, QuantScheme, Recipe

DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    """`bf16`/`bfloat16`, `fp16`/`float16`, `fp32`/`float32` -> torch dtype."""
    aliases = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32"}
    key = aliases.get(name, name)
    if key not in DTYPE_NAMES:
        raise QuantscaleError(f"unknown dtype {name!r}; expected bf16, fp16 or fp32")
    return DTYPE_NAMES[key]


def as_block_scale(
    scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int] | None, where: str
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Bring any FP8 scale layout to a float32 [rows, cols] grid and the block it tiles.

    Accepts a per-tensor scalar, a per-channel [out, 1] column, a 2-D block grid and
    ModelOpt's 4-D [rows, 1, cols, 1]. `where` names the tensor in errors.
    """
    scale = scale.float()
    if scale.ndim == 4 and scale.shape[1] == 1 and scale.shape[3] == 1:
        scale = scale.reshape(scale.shape[0], scale.shape[2])
    if scale.numel() == 1:
        return scale.reshape(1, 1), shape
    if scale.ndim == 2 and tuple(scale.shape) == (shape[0], 1):
        return scale, (1, shape[1])
    if scale.ndim != 2:
        raise CheckpointError(f"{where}: scale of shape {tuple(scale.shape)} is not a block grid")
    if block:
        candidates = [block]
    else:  # undeclared: 128x128, else the power-of-two tile the grid implies
        implied = (-(-shape[0] // scale.shape[0]), -(-shape[1] // scale.shape[1]))
        pow2 = all(d & (d - 1) == 0 for d in implied)
        candidates = [DEFAULT_BLOCK, implied] if pow2 else [DEFAULT_BLOCK]
    for cand in candidates:
        if block_grid(shape, cand) == tuple(scale.shape):
            return scale, (cand[0], cand[1])
    raise CheckpointError(
        f"{where}: scale grid {tuple(scale.shape)} does not match weight {tuple(shape)} "
        f"with block {block or DEFAULT_BLOCK}: expected {block_grid(shape, block or DEFAULT_BLOCK)}"
    )


def dequantize_weight(
    q: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int] | None,
    dtype: torch.dtype,
    where: str,
) -> torch.Tensor:
    """fp8 weight x scale (any layout `as_block_scale` accepts) -> `dtype`."""
    grid, tile = as_block_scale(scale, cast(tuple[int, int], tuple(q.shape)), block, where)
    return dequantize_fp8_block(q, grid, tile, dtype)


def per_column_qparams(qp: QParams, g_idx: torch.Tensor) -> QParams:
    """Group qparams gathered to one column per input feature through g_idx."""
    idx = g_idx.long()
    zp = qp.zero_point[:, idx] if qp.zero_point is not None else None
    return QParams(qp.scale[:, idx], zp, qp.global_scale)


def dequantize_module(local: dict[str, torch.Tensor], args: QuantArgs, fmt: str) -> torch.Tensor:
    """Dense float32 weight of one compressed-tensors module from its local-name tensors."""
    scale = local["weight_scale"]
    if fmt in (CT_NVFP4, CT_MXFP4):
        codes = unpack_fp4(local["weight_packed"])
        s = mx_scale_value(scale) if fmt == CT_MXFP4 else scale.float()
        gs = local.get("weight_global_scale")
        return dequantize(codes, args, QParams(s, None, gs.float() if gs is not None else None))
    scale = scale.float()
    if fmt == CT_PACKED:
        rows, cols = (int(v) for v in local["weight_shape"].tolist())
        codes = unpack_int32(local["weight_packed"], args.num_bits, cols)
        zp = local.get("weight_zero_point")
        if zp is not None:
            zp = unpack_int32(zp, args.num_bits, rows, dim=0).float()
        qp = QParams(scale, zp)
        g_idx = local.get("weight_g_idx")
        if g_idx is not None:
            qp = per_column_qparams(qp, g_idx)
        return dequantize(codes, args, qp)
    zp = local.get("weight_zero_point")
    return dequantize(local["weight"], args, QParams(scale, zp.float() if zp is not None else None))


def plain_config(config: dict | None, dtype: torch.dtype | None = None) -> dict | None:
    """config.json without quantization_config (or Neuron's block); with `dtype`, its dtype."""
    if config is None:
        return None
    config = copy.deepcopy(config)
    config.pop("quantization_config", None)
    config.pop(NEURON_KEY, None)
    if dtype is None:
        return config
    name = str(dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = name
    return config


def _fp8_scales(ckpt: Checkpoint) -> dict[str, str]:
    scales: dict[str, str] = {}
    for name, info in ckpt.tensors.items():
        if info.dtype.startswith("F8") and name.endswith(".weight"):
            scale = scale_name_for(ckpt.tensors, name)
            if scale is None:
                raise CheckpointError(
                    f"{ckpt.path / info.shard}: FP8 tensor {name!r} has no scale "
                    f"(looked for {', '.join(FP8_SCALES)} beside it)"
                )
            scales[name] = scale
    return scales


def fp8_weight_scales(ckpt: Checkpoint) -> dict[str, str]:
    """FP8 weight -> the name of its scale, for every FP8 `<m>.weight` of `ckpt`."""
    scales = _fp8_scales(ckpt)
    if not scales:
        raise QuantscaleError(f"{ckpt.path}: no FP8 weights to dequantize")
    return scales


# ------------------------------------------------------------------ per-tensor plans

FP8, CT, MODELOPT_NVFP4 = "fp8", "compressed-tensors", "modelopt-nvfp4"
# a compressed-tensors module's weight tensors, consumed by decoding (local names)
CT_WEIGHT_PARTS = (
    "weight_scale",
    "weight_global_scale",
    "weight_shape",
    "weight_zero_point",
    "weight_g_idx",
)
# static activation qparams beside a quantized weight: not part of a plain model
ACTIVATION_QPARAMS = (
    *ACTIVATION_SCALES,
    "input_zero_point",
    "input_global_scale",
    "output_scale",
    "output_zero_point",
    "output_global_scale",
)


@dataclass(frozen=True)
class StoredWeight:
    """One quantized weight on disk: the plain `<m>.weight` it stands for, the stored weight
    tensor, the other stored tensors decoding reads (local name -> stored name), its kind
    (FP8, CT, MODELOPT_NVFP4) and plain shape; CT weights also carry their QuantArgs and
    format."""

    name: str
    stored: str
    parts: dict[str, str]
    kind: str
    shape: tuple[int, ...]
    args: QuantArgs | None = None
    fmt: str | None = None


@dataclass
class DequantPlan:
    """The quantized weights of a checkpoint (by stored weight name), the stored tensors
    their decoding consumes (scales, zero points, activation qparams) and the FP8 block."""

    weights: dict[str, StoredWeight] = field(default_factory=dict)
    consumed: set[str] = field(default_factory=set)
    block: tuple[int, int] | None = None


def plan_dequantize(ckpt: Checkpoint) -> DequantPlan:
    """Which stored tensors make each plain weight of `ckpt`, checked from the headers
    (dtypes and scale shapes); empty for a plain checkpoint."""
    layout = detect_layout(ckpt)
    if layout is QUAMBA:
        raise CheckpointError(f"{ckpt.path}: Quamba INT8 mixers have no plain-weight form")
    plan = DequantPlan(block=config_block(ckpt.config))
    for weight, scale in _fp8_scales(ckpt).items():
        info = ckpt.tensors[weight]
        grid = torch.empty(ckpt.tensors[scale].shape, device="meta")  # shape check, no data
        as_block_scale(grid, cast(tuple[int, int], info.shape), plan.block, _where(ckpt, weight))
        plan.weights[weight] = StoredWeight(weight, weight, {"scale": scale}, FP8, info.shape)
        plan.consumed.add(scale)
        plan.consumed.update(f"{module_path(weight)}.{s}" for s in ACTIVATION_SCALES)
    if layout is not None and layout.convention == CT_METHOD:
        _plan_ct(ckpt, plan)
    _plan_modelopt_nvfp4(ckpt, plan)
    if layout is FAKE_QUANT:
        _plan_fake_quant(ckpt, plan)
    plan.consumed &= set(ckpt.tensors)
    return plan


def _where(ckpt: Checkpoint, name: str) -> str:
    return f"{ckpt.path / ckpt.tensors[name].shard}: tensor {name!r}"


def _expect(ckpt: Checkpoint, name: str, dtypes: tuple[str, ...], shape: tuple | None) -> None:
    """A clear error unless tensor `name` has one of `dtypes` and (if given) `shape`."""
    info = ckpt.tensors.get(name)
    if info is None:
        weight = f"{module_path(name)}.weight"
        owner = next((w for w in (weight, weight + "_packed") if w in ckpt.tensors), None)
        what = f"{name!r} ({' or '.join(dtypes)})"
        if owner is None:
            raise CheckpointError(f"{ckpt.path}: tensor {what} is missing")
        raise CheckpointError(f"{_where(ckpt, owner)} has no {what} beside it")
    if info.dtype not in dtypes:
        raise CheckpointError(
            f"{_where(ckpt, name)} is {info.dtype}; expected {' or '.join(dtypes)}"
        )
    if shape is not None and info.shape != shape:
        raise CheckpointError(
            f"{_where(ckpt, name)} has shape {list(info.shape)}; expected {list(shape)}"
        )


def _local_parts(ckpt: Checkpoint, module: str, locals_: tuple[str, ...]) -> dict[str, str]:
    return {n: f"{module}.{n}" for n in locals_ if f"{module}.{n}" in ckpt.tensors}


def _plan_ct(ckpt: Checkpoint, plan: DequantPlan) -> None:
    """compressed-tensors modules that are not FP8: NVFP4, MXFP4, INT packed / int8."""
    recipe = Recipe.from_quantization_config(ckpt.quantization_config or {})
    shapes = _weight_shapes(ckpt)
    for name in list(ckpt.tensors):
        module, _, leaf = name.rpartition(".")
        if leaf not in ("weight", "weight_packed") or name in plan.weights:
            continue
        scheme = recipe.scheme_for(module)
        if f"{module}.weight_scale" not in ckpt.tensors:
            _expect_plain(ckpt, name, scheme)
            continue
        if scheme is None or scheme.weights is None:
            raise CheckpointError(
                f"{ckpt.path}: {module} has a weight_scale but no config group targets it"
            )
        fmt = module_format(scheme)
        parts = _local_parts(ckpt, module, CT_WEIGHT_PARTS)
        shape = _ct_shape(ckpt, name, fmt, scheme.weights, shapes)
        plan.weights[name] = StoredWeight(
            f"{module}.weight", name, parts, CT, shape, scheme.weights, fmt
        )
        plan.consumed.update(parts.values())
        plan.consumed.update(_local_parts(ckpt, module, ACTIVATION_QPARAMS).values())


def _expect_plain(ckpt: Checkpoint, name: str, scheme: QuantScheme | None) -> None:
    """A weight without a `weight_scale` must be a float one: packed or int8 / FP8 codes of a
    module the config quantizes cannot be decoded without it."""
    dtype = ckpt.tensors[name].dtype
    packed = name.endswith(".weight_packed")
    if packed or (dtype in ("I8", "F8_E4M3") and scheme is not None and scheme.weights):
        raise CheckpointError(
            f"{_where(ckpt, name)} is stored quantized ({dtype}) but has no weight_scale beside "
            "it: its codes cannot be decoded"
        )


def _weight_shapes(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    """The value of every `<m>.weight_shape` tensor (pack-quantized), one open per shard."""
    by_shard: dict[str, list[str]] = {}
    for name, info in ckpt.tensors.items():
        if name.endswith(".weight_shape"):
            by_shard.setdefault(info.shard, []).append(name)
    shapes = {}
    for shard, names in by_shard.items():
        with safe_open(ckpt.path / shard, framework="pt") as f:
            shapes.update({n: tuple(int(v) for v in f.get_tensor(n).tolist()) for n in names})
    return shapes


def _ct_shape(
    ckpt: Checkpoint, name: str, fmt: str, args: QuantArgs, shapes: dict[str, tuple[int, ...]]
) -> tuple[int, ...]:
    """Plain shape of a compressed-tensors weight; checks its stored dtypes and scale shape."""
    info, module = ckpt.tensors[name], module_path(name)
    if fmt in (CT_NVFP4, CT_MXFP4):
        _expect(ckpt, name, ("U8",), None)
        rows, cols = info.shape[0], info.shape[-1] * 2
        group = args.group_size or (NVFP4_GROUP if fmt == CT_NVFP4 else MX_GROUP)
        dtypes = ("F8_E4M3",) if fmt == CT_NVFP4 else ("U8",)
        _expect(ckpt, f"{module}.weight_scale", dtypes, (rows, cols // group))
        if fmt == CT_NVFP4:
            _expect(ckpt, f"{module}.weight_global_scale", ("F32",), None)
        return rows, cols
    if fmt == CT_PACKED:
        _expect(ckpt, name, ("I32",), None)
        if f"{module}.weight_shape" not in ckpt.tensors:
            raise CheckpointError(f"{_where(ckpt, name)} has no weight_shape beside it")
        shape = shapes[f"{module}.weight_shape"]
        _expect_rows(ckpt, f"{module}.weight_scale", shape[0])
        return shape
    _expect(ckpt, name, ("I8",), None)
    _expect_rows(ckpt, f"{module}.weight_scale", info.shape[0])
    return info.shape


def _expect_rows(ckpt: Checkpoint, name: str, rows: int) -> None:
    info = ckpt.tensors[name]
    if info.shape[:1] != (rows,) and info.shape not in ((), (1,)):
        raise CheckpointError(
            f"{_where(ckpt, name)} has shape {list(info.shape)}; expected {rows} rows "
            "(one per output channel)"
        )


def _plan_modelopt_nvfp4(ckpt: Checkpoint, plan: DequantPlan) -> None:
    """ModelOpt NVFP4 modules: packed `weight`, E4M3 `weight_scale`, scalar `weight_scale_2`."""
    for name in list(ckpt.tensors):
        if not name.endswith(".weight_scale_2"):
            continue
        module = name.removesuffix(".weight_scale_2")
        weight = f"{module}.weight"
        if weight not in ckpt.tensors or f"{module}.weight_scale" not in ckpt.tensors:
            raise CheckpointError(f"{_where(ckpt, name)} has no weight / weight_scale beside it")
        _expect(ckpt, weight, ("U8",), None)
        rows, cols = ckpt.tensors[weight].shape[0], ckpt.tensors[weight].shape[-1] * 2
        _expect(ckpt, f"{module}.weight_scale", ("F8_E4M3",), (rows, cols // NVFP4_GROUP))
        parts = _local_parts(ckpt, module, ("weight_scale", "weight_scale_2"))
        plan.weights[weight] = StoredWeight(weight, weight, parts, MODELOPT_NVFP4, (rows, cols))
        plan.consumed.update(parts.values())
        plan.consumed.update(_local_parts(ckpt, module, ACTIVATION_SCALES).values())


def _plan_fake_quant(ckpt: Checkpoint, plan: DequantPlan) -> None:
    """Our fake-quant save: weights are stored dequantized; their qparam buffers are consumed."""
    leaves = (*CT_WEIGHT_PARTS, *ACTIVATION_QPARAMS)
    for name in ckpt.tensors:
        if name.endswith(".weight"):
            plan.consumed.update(_local_parts(ckpt, module_path(name), leaves).values())


def dequantize_stored(
    sw: StoredWeight,
    read: Callable[[str], torch.Tensor],
    dtype: torch.dtype,
    block: tuple[int, int] | None,
    where: str,
) -> torch.Tensor:
    """The plain weight `sw` stands for, in `dtype`; `read(stored name)` loads a tensor."""
    if sw.kind == FP8:
        return dequantize_weight(read(sw.stored), read(sw.parts["scale"]), block, dtype, where)
    if sw.kind == MODELOPT_NVFP4:
        scale, scale_2 = read(sw.parts["weight_scale"]), read(sw.parts["weight_scale_2"])
        return dequantize_nvfp4(unpack_fp4(read(sw.stored)), scale, scale_2, dtype)
    assert sw.args is not None and sw.fmt is not None, "a CT weight has args and a format"
    local = {local: read(stored) for local, stored in sw.parts.items()}
    local[sw.stored.rpartition(".")[2]] = read(sw.stored)
    return dequantize_module(local, sw.args, sw.fmt).to(dtype)


class _QuantizedCheckpoint(Checkpoint):
    """A checkpoint whose quantization side files do not belong in its plain copy."""

    def extra_files(self) -> list[Path]:
        skip = (HF_QUANT_CONFIG, SIDECAR)
        return [p for p in super().extra_files() if p.name not in skip]


def dequantize_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    dtype: torch.dtype | str = torch.bfloat16,
    overwrite: bool = False,
    runner: ShardRunner | None = None,
) -> Path | None:
    """Write a plain (unquantized) copy of quantized checkpoint `src` to `out`; returns `out`
    (None: a `runner`'s other ranks still write shards).

    config.json loses `quantization_config` (and Neuron's block), and ModelOpt's
    hf_quant_config.json is not copied, so loaders read plain weights.
    """
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    ckpt = _QuantizedCheckpoint(src)
    plan = plan_dequantize(ckpt)
    if not plan.weights:
        raise QuantscaleError(f"{ckpt.path}: no FP8, NVFP4, MXFP4 or INT weights to dequantize")

    def tensor_fn(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if name in plan.consumed:
            return {}
        sw = plan.weights.get(name)
        if sw is None:
            return {name: tensor}

        def read(stored: str) -> torch.Tensor:
            return tensor if stored == name else ckpt.get(stored)

        return {sw.name: dequantize_stored(sw, read, dtype, plan.block, _where(ckpt, name))}

    def plan_fn(name: str, info: TensorInfo) -> TensorPlan:
        if name in plan.consumed:
            return TensorPlan(())
        sw = plan.weights.get(name)
        if sw is None:
            return TensorPlan.copy(name, info)
        return TensorPlan(((sw.name, dtype, sw.shape),))

    config = plain_config(ckpt.config, dtype)
    return transform_checkpoint(
        ckpt, out, tensor_fn, config, overwrite, progress.track, plan_fn=plan_fn, runner=runner
    )
