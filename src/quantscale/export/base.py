"""What every exporter shares: the quantized modules' exact codes, the model's other tensors,
config.json, and writing a (sharded) checkpoint directory atomically.

Exporters read a model quantized by `quantize.quantize_model`: each `QuantLinear` holds the
fake-quantized weight and its qparams; `weight_codes` recovers the exact codes by
re-quantizing that weight with them (lossless: the weight lies on the grid).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantscale.checkpoint.dequantize import per_column_qparams
from quantscale.checkpoint.read import SINGLE_NAME
from quantscale.checkpoint.write import CheckpointWriter
from quantscale.errors import QuantscaleError
from quantscale.models.adapter import causal_lm
from quantscale.models.loader import tied_embeddings
from quantscale.models.moe import checkpoint_name
from quantscale.naming import fused_siblings
from quantscale.qdq import QParams, _block, quantize
from quantscale.runtime.qlinear import QuantLinear, quant_linears
from quantscale.scheme import QuantArgs

log = logging.getLogger(__name__)
MAX_SHARD_BYTES = 2 * 1024**3


@dataclass
class ModuleCodes:
    """One quantized Linear: codes (int8 / float8_e4m3fn / E2M1 uint8), qparams, g_idx."""

    name: str
    args: QuantArgs
    codes: torch.Tensor
    qparams: QParams
    g_idx: torch.Tensor | None
    module: QuantLinear


def weight_codes(name: str, ql: QuantLinear) -> ModuleCodes:
    """Exact codes of a QuantLinear's (fake-quantized) weight."""
    qp = ql.weight_qparams()
    args = ql.scheme.weights
    if qp is None or args is None:
        raise QuantscaleError(f"{name}: weight is not quantized (no weight_scale); quantize first")
    g_idx = ql._buffers.get("weight_g_idx")
    codes = quantize_rows(ql.weight.detach(), args, qp, g_idx)
    return ModuleCodes(name, args, codes, qp, g_idx, ql)


def quantize_rows(
    w: torch.Tensor,
    args: QuantArgs,
    qp: QParams,
    g_idx: torch.Tensor | None = None,
    rows: int = 512,
) -> torch.Tensor:
    """`quantize(w.float(), args, qp)` (qparams gathered per column through `g_idx`) a chunk
    of `rows` rows at a time (a multiple of the block height): the same codes, with float
    temporaries of one chunk instead of several weight-sized ones."""
    if args.strategy == "block":
        height = _block(args)[0]
        rows = max(height, rows // height * height)
    parts = []
    for start in range(0, w.shape[0], rows):
        part = _row_qparams(qp, args, w.shape[0], start, start + rows)
        part = per_column_qparams(part, g_idx) if g_idx is not None else part
        parts.append(quantize(w[start : start + rows].float(), args, part))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _row_qparams(qp: QParams, args: QuantArgs, rows: int, start: int, end: int) -> QParams:
    """The qparams of weight rows [start, end): per-row scales / zero points sliced (block
    scales by block rows), per-tensor ones and the global scale as they are."""

    def rows_of(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or t.ndim == 0:
            return t
        if args.strategy == "block":
            height = _block(args)[0]
            return t[start // height : -(-end // height)]
        return t[start:end] if t.shape[0] == rows and t.ndim == 2 else t

    scale = rows_of(qp.scale)
    assert scale is not None
    return QParams(scale, rows_of(qp.zero_point), qp.global_scale)


def _full(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def quantized_modules(
    model: nn.Module, prefix: str = "", keep: Callable[[str], bool] | None = None
) -> dict[str, ModuleCodes]:
    """Name -> codes of every quantized QuantLinear in `model` (a submodule named `prefix`
    of the whole model; only the names `keep` accepts)."""
    out = {}
    for local, ql in quant_linears(model).items():
        name = _full(prefix, local)
        if ql.scheme.weights is not None and (keep is None or keep(name)):
            out[name] = weight_codes(name, ql)
    return out


def plain_tensors(
    model: nn.Module,
    skip_modules: Iterable[str],
    prefix: str = "",
    keep: Callable[[str], bool] | None = None,
    tied: bool | None = None,
) -> dict[str, torch.Tensor]:
    """State-dict tensors of everything except the given modules (tied lm_head dropped), of
    `model` or of its submodule named `prefix`; only the names `keep` accepts. `tied`: whether
    lm_head is tied to the embeddings (default: what the model says)."""
    skip = tuple(f"{m}." for m in skip_modules)
    state = model.state_dict(prefix=f"{prefix}." if prefix else "")
    tensors = {
        k: v.detach().cpu().contiguous()
        for k, v in state.items()
        if not k.startswith(skip) and (keep is None or keep(k))
    }
    drop_head = tied_embeddings(model) if tied is None else tied
    if drop_head:
        tensors.pop("lm_head.weight", None)
    return tensors


def model_config(model: nn.Module, dtype: torch.dtype | None = None) -> dict:
    """config.json of the model without any previous quantization entries."""
    config = causal_lm(model).config.to_dict()
    for key in ("quantization_config", "quantscale"):
        config.pop(key, None)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    return config


def checkpoint_names(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Tensors keyed by the names the model's checkpoints use (`moe.checkpoint_name`)."""
    model_type = config.get("model_type")
    return {checkpoint_name(k, model_type): v for k, v in tensors.items()}


def renamed_strings(obj: Any, model_type: str | None) -> Any:
    """Module names inside JSON (ignore / exclude lists) renamed like the tensors."""
    if isinstance(obj, str):
        return checkpoint_name(obj, model_type)
    if isinstance(obj, list):
        return [renamed_strings(v, model_type) for v in obj]
    if isinstance(obj, dict):
        return {k: renamed_strings(v, model_type) for k, v in obj.items()}
    return obj


def checkpoint_config(config: dict) -> dict:
    """config.json with the module names in its quantization_config renamed like the tensors."""
    if "quantization_config" not in config:
        return config
    qc = renamed_strings(config["quantization_config"], config.get("model_type"))
    return {**config, "quantization_config": qc}


def _shards(tensors: dict[str, torch.Tensor], stem: str) -> dict[str, dict[str, torch.Tensor]]:
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > MAX_SHARD_BYTES:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += nbytes
    if len(groups) == 1:
        return {f"{stem}.safetensors": groups[0]}
    n = len(groups)
    return {f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


def write_checkpoint(
    out: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config: dict,
    *,
    overwrite: bool = False,
    source_dir: str | os.PathLike | None = None,
    extra_json: dict[str, dict] | None = None,
    stem: str = "model",
) -> Path:
    """Write tensors (sharded past 2 GiB) + config.json (+ extra JSON files and the source
    directory's tokenizer / generation files) into `out`, atomically. Tensor names and the
    module names in quantization_config / extra JSON follow `checkpoint_names`."""
    model_type = config.get("model_type")
    tensors = checkpoint_names(tensors, config)
    config = checkpoint_config(config)
    extra_json = {k: renamed_strings(v, model_type) for k, v in (extra_json or {}).items()}
    with CheckpointWriter(out, overwrite=overwrite) as writer:
        shards = _shards(tensors, stem)
        for shard, part in shards.items():
            writer.write_shard(shard, part)
        writer.write_json("config.json", config)
        for name, obj in extra_json.items():
            writer.write_json(name, obj)
        copy_side_files(source_dir, writer)
        return writer.commit(write_index=set(shards) != {SINGLE_NAME})


_SIDE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
_NOT_COPIED = ("config.json", "model.safetensors.index.json", "hf_quant_config.json")


def copy_side_files(source_dir: str | os.PathLike | None, writer: CheckpointWriter) -> None:
    """Copy tokenizer / generation-config files of the source checkpoint."""
    if source_dir is None:
        return
    for path in sorted(Path(source_dir).iterdir()):
        if (
            path.is_file()
            and path.suffix in _SIDE_SUFFIXES
            and path.name not in _NOT_COPIED
            and not path.name.startswith("quantize_config")
        ):
            writer.copy_file(path)


def unshared_global_scales(mods: dict[str, ModuleCodes]) -> list[str]:
    """Fused NVFP4 groups whose weight global scales differ (vLLM fuses them with one)."""
    bad = []
    for name, mc in mods.items():
        group = [n for n in fused_siblings(name) if n in mods]
        if group[0] != name or len(group) < 2 or mc.qparams.global_scale is None:
            continue
        first = mc.qparams.global_scale
        others = [mods[n].qparams.global_scale for n in group[1:]]
        if any(s is None or not torch.equal(s, first) for s in others):
            bad.append(
                name.rpartition(".")[0] + ".{" + ",".join(g.rpartition(".")[2] for g in group) + "}"
            )
    return bad


def warn_unshared(mods: dict[str, ModuleCodes]) -> None:
    """Log fused NVFP4 groups with differing global scales (runtimes then use one of them)."""
    bad = unshared_global_scales(mods)
    if bad:
        log.warning(
            "%d fused projection groups have different NVFP4 global scales (e.g. %s); vLLM "
            "and TensorRT-LLM fuse them with one scale. GPTQ shares them; quantize with "
            "method 'gptq' or share them before RTN.",
            len(bad),
            bad[0],
        )
