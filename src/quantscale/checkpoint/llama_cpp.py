"""What llama.cpp refuses in a GGUF file, and in a checkpoint a user converts for it.

Read from the llama.cpp that llama-cpp-python 0.3.36 vendors (the sdist's vendor/llama.cpp);
the row-width, extra-tensor, missing-tensor and merges rules were also run there, and a
clean tiny file of ours loads (docs/benchmarks.md):
- `gguf_init_from_file_impl` (ggml/src/gguf.cpp) refuses a tensor whose row (ne[0]) is not a
  multiple of its type's block size (32 for Q4_0 / Q4_1 / Q5_0 / Q8_0, 256 for the k-quants):
  `tensor '...' of type 12 (q4_K) has 576 elements per row, not a multiple of block size
  (256)`; the file does not open at all.
- the Llama loader (src/models/llama.cpp `load_arch_tensors`, src/llama-model-loader.cpp)
  creates token_embd, output_norm, an optional output, and per block attn_norm, attn_q / k / v
  (or a fused attn_qkv), attn_output, ffn_norm, ffn_gate / down / up with optional biases and
  rope_freqs. A required one absent: `check_tensor_dims: tensor '...' not found`; any other
  tensor in the file: `done_getting_tensors: wrong number of tensors; expected N, got M`; one
  of another shape than the metadata gives: `check_tensor_dims: tensor '...' has wrong
  shape`. Missing
  `llama.context_length` / `embedding_length` / `block_count` /
  `attention.layer_norm_rms_epsilon`: `key not found in model`. A BPE (gpt2) vocabulary
  without `tokenizer.ggml.merges` (src/llama-vocab.cpp): `cannot find tokenizer merges in
  model file` (run there on a tiny file of ours).
- convert_hf_to_gguf.py (conversion/base.py `dequant_model`), which a user runs on a
  safetensors checkpoint before llama.cpp can read it: quant methods other than fp8, gptq,
  bitnet, compressed-tensors and modelopt are refused; compressed-tensors with several config
  groups (unless all NVFP4) is refused; int- / float-quantized weights must be per channel or
  per block and pack-quantized ones per group (an assert otherwise); the tensors it does not
  consume for the method (compressed-tensors' input_scale, k_scale / v_scale, an int8
  weight_zero_point, weight_g_idx) reach the name map and stop it: `Can not map tensor`.
  Run there on tiny exports of ours: static W8A8 (`Can not map tensor '...input_scale'`) and
  W8A16 per channel (the strategy assert); W4A16 groups convert.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

from quantscale.checkpoint.layouts import CT_METHOD, HF_FP8_METHOD, MODELOPT_METHOD
from quantscale.checkpoint.read import Checkpoint
from quantscale.checkpoint.refusal import LLAMA_CPP, LLAMA_CPP_CONVERT, Refusal
from quantscale.errors import CheckpointError

LLAMA_CPP_VERSION = "0.3.36 (llama-cpp-python)"
_OPTIONAL_BLOCK = (
    "attn_q.bias",
    "attn_k.bias",
    "attn_v.bias",
    "attn_output.bias",
    "attn_qkv.weight",
    "attn_qkv.bias",
    "ffn_gate.bias",
    "ffn_down.bias",
    "ffn_up.bias",
)
REQUIRED_KEYS = (
    "context_length",
    "embedding_length",
    "block_count",
    "attention.layer_norm_rms_epsilon",
)


# ------------------------------------------------------------- GGUF header
# Read here, not with the gguf package's reader: that one refuses a file whose rows its
# blocks do not divide without naming the tensor, which is the finding to report.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q"}
_SCALARS |= {11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: the row width first
    type_id: int


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise CheckpointError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _value(f: BinaryIO, kind: int) -> Any:
    if kind == STRING:
        size = _read(f, "<Q")
        data = f.read(size)
        if len(data) != size:  # also ends a forged huge array of strings at the file's end
            raise CheckpointError("truncated GGUF header")
        return data.decode("utf-8", "replace")
    if kind == ARRAY:
        item, n = _read(f, "<I"), _read(f, "<Q")
        return [_value(f, item) for _ in range(n)]
    if kind not in _SCALARS:
        raise CheckpointError(f"GGUF value type {kind} is not one of GGUF's")
    return _read(f, _SCALARS[kind])


def read_gguf_header(file: str | os.PathLike) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """(metadata, tensor infos) of a GGUF file, its data section not read."""
    try:
        with open(file, "rb") as f:
            if f.read(4) != b"GGUF":
                raise CheckpointError("no GGUF magic")
            version, n_tensors, n_kv = _read(f, "<I"), _read(f, "<Q"), _read(f, "<Q")
            if version < 2:
                raise CheckpointError(f"GGUF version {version}")
            fields = {}
            for _ in range(n_kv):
                key = _value(f, STRING)
                fields[key] = _value(f, _read(f, "<I"))
            tensors = []
            for _ in range(n_tensors):
                name = _value(f, STRING)
                shape = tuple(_read(f, "<Q") for _ in range(_read(f, "<I")))
                tensors.append(GGUFTensor(name, shape, _read(f, "<I")))
                _read(f, "<Q")  # data offset
    except (OSError, CheckpointError, UnicodeDecodeError, MemoryError) as exc:
        raise CheckpointError(f"{file}: not a readable GGUF file: {exc}") from exc
    return fields, tensors


def _refusal(tensor: str, reason: str, runtime: str = LLAMA_CPP) -> Refusal:
    return Refusal(tensor, runtime, LLAMA_CPP_VERSION, reason)


def row_width_rule(kind: str, cols: int, block: int) -> str | None:
    """Why llama.cpp refuses a `kind` tensor with rows of `cols` (None when the block fits)."""
    if block > 0 and cols % block == 0:
        return None
    return (
        f"refuses to open the file: tensor of type {kind} has {cols} elements per row, not "
        f"a multiple of block size ({block}); quantize rows of this width with a type whose "
        "block divides it (Q8_0 / Q4_0 / Q4_1 / Q5_0: 32) or keep the tensor F16 / F32"
    )


def _llama_shapes(fields: dict[str, Any], n_tokens: int) -> dict[str, tuple[int, ...]] | None:
    """The shapes (ggml order: row width first) llama.cpp expects of a Llama file's tensors;
    None for metadata we cannot read them from (MoE: another tensor set)."""
    p = "llama."
    keys = ("embedding_length", "block_count", "attention.head_count", "feed_forward_length")
    values = [v for k in keys if isinstance(v := fields.get(p + k), int) and v > 0]
    if len(values) < len(keys) or fields.get(p + "expert_count"):
        return None
    n_embd, n_layer, n_head, n_ff = values
    n_kv = int(fields.get(p + "attention.head_count_kv") or n_head)
    d_k = int(fields.get(p + "attention.key_length") or n_embd // n_head)
    d_v = int(fields.get(p + "attention.value_length") or n_embd // n_head)
    n_vocab = int(fields.get(p + "vocab_size") or n_tokens)
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (n_embd, n_vocab),
        "output_norm.weight": (n_embd,),
    }
    per_block = {
        "attn_norm": (n_embd,),
        "attn_q": (n_embd, d_k * n_head),
        "attn_k": (n_embd, d_k * n_kv),
        "attn_v": (n_embd, d_v * n_kv),
        "attn_output": (d_k * n_head, n_embd),
        "ffn_norm": (n_embd,),
        "ffn_gate": (n_embd, n_ff),
        "ffn_down": (n_ff, n_embd),
        "ffn_up": (n_embd, n_ff),
    }
    for i in range(n_layer):
        shapes.update({f"blk.{i}.{k}.weight": v for k, v in per_block.items()})
    return shapes


def _llama_tensor_refusals(fields: dict[str, Any], tensors: dict[str, GGUFTensor]) -> list[Refusal]:
    """Missing, extra and mis-shaped tensors of a Llama file (module docstring)."""
    found = []
    missing_keys = [k for k in REQUIRED_KEYS if fields.get(f"llama.{k}") is None]
    for key in missing_keys:
        found.append(_refusal(f"llama.{key}", "refuses to load: key not found in model"))
    shapes = _llama_shapes(fields, len(fields.get("tokenizer.ggml.tokens") or []))
    if missing_keys or shapes is None:
        return found
    n_layer = int(fields["llama.block_count"])
    optional = {"output.weight", "rope_freqs.weight"}
    optional |= {f"blk.{i}.{leaf}" for i in range(n_layer) for leaf in _OPTIONAL_BLOCK}
    fused = {n.split(".")[1] for n in tensors if n.endswith(".attn_qkv.weight")}
    for name in sorted(shapes):
        parts = name.split(".")
        split_qkv = len(parts) == 3 and parts[2] in ("attn_q", "attn_k", "attn_v")
        if name not in tensors and not (split_qkv and parts[1] in fused):
            missing = f"refuses to load: check_tensor_dims: tensor '{name}' not found"
            found.append(_refusal(name, missing))
    extra = sorted(set(tensors) - set(shapes) - optional)
    for name in extra:
        found.append(
            _refusal(
                name,
                f"refuses to load: done_getting_tensors: wrong number of tensors; expected "
                f"{len(tensors)}, got {len(tensors) - len(extra)} (a Llama model has no "
                "tensor of this name); drop it from the file",
            )
        )
    for name, want in sorted(shapes.items()):
        got = tensors[name].shape if name in tensors else want
        if name == "output.weight" or got == want:
            continue
        found.append(
            _refusal(
                name,
                f"refuses to load: check_tensor_dims: tensor '{name}' has wrong shape; "
                f"expected {list(want)}, got {list(got)} (from the llama.* metadata)",
            )
        )
    return found


def gguf_refusals(file: str | os.PathLike) -> list[Refusal]:
    """`Refusal`s of llama.cpp for a GGUF file: row widths its blocks do not divide, and for
    a Llama file missing metadata, missing, extra or mis-shaped tensors."""
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CheckpointError("reading GGUF needs the gguf package: pip install gguf") from e
    fields, infos = read_gguf_header(file)
    tensors = {t.name: t for t in infos}
    found = []
    for t in infos:
        try:
            kind = gguf.GGMLQuantizationType(t.type_id)
        except ValueError:
            invalid = f"refuses to open the file: tensor has invalid ggml type {t.type_id}"
            found.append(_refusal(t.name, invalid))
            continue
        block = gguf.GGML_QUANT_SIZES[kind][0]
        if t.shape and (reason := row_width_rule(kind.name, t.shape[0], block)):
            found.append(_refusal(t.name, reason))
    if fields.get("general.architecture") == "llama":
        found += _llama_tensor_refusals(fields, tensors)
    if reason := vocab_rule(fields):
        found.append(_refusal("tokenizer.ggml.merges", reason))
    return found


def vocab_rule(fields: dict[str, Any]) -> str | None:
    """Why llama.cpp's vocabulary loader refuses a BPE (gpt2) vocabulary: no merges."""
    bpe = fields.get("tokenizer.ggml.model") in ("gpt2", "hybriddna", "whitespace")
    kimi = fields.get("tokenizer.ggml.pre") == "kimi-k2"  # its tokenizer has no merges
    if not bpe or kimi or fields.get("tokenizer.ggml.merges"):
        return None
    return (
        "refuses to load: error loading model vocabulary: cannot find tokenizer merges in "
        "model file (a BPE vocabulary needs tokenizer.ggml.merges; the gguf writer drops an "
        "empty list)"
    )


# ------------------------------------------------------- convert_hf_to_gguf.py

_CONVERTED_METHODS = (None, "bitnet", HF_FP8_METHOD, "gptq", CT_METHOD, MODELOPT_METHOD)
# leaves convert_hf_to_gguf.py consumes per quant_method; other quantization leaves are not
# removed and fail its name map
_CONSUMED = {
    HF_FP8_METHOD: {"weight_scale_inv", "activation_scale"},
    CT_METHOD: {"weight_scale"},
    "pack-quantized": {"weight_scale", "weight_packed", "weight_shape", "weight_zero_point"},
    MODELOPT_METHOD: {"weight_scale", "weight_scale_2", "input_scale", "k_scale", "v_scale"},
}
_QUANT_LEAVES = {
    "input_scale",
    "input_zero_point",
    "k_scale",
    "v_scale",
    "weight_g_idx",
    "weight_zero_point",
    "output_scale",
}


def _ct_group_reason(groups: dict) -> str | None:
    """Why convert_hf_to_gguf.py cannot dequantize compressed-tensors config groups."""
    formats = [g.get("format") for g in groups.values() if isinstance(g, dict)]
    if len(groups) > 1 and not all(f == "nvfp4-pack-quantized" for f in formats):
        return (
            "refuses to convert: NotImplementedError: Can't handle multiple config groups for "
            f"compressed-tensors yet ({len(groups)} groups); quantize with one scheme, or "
            "convert the bf16 source and quantize with llama-quantize / --format gguf"
        )
    return None


def _ct_weight_reason(fmt: str, weights: dict) -> str | None:
    strategy, group = weights.get("strategy"), weights.get("group_size")
    if fmt in ("float-quantized", "int-quantized", "naive-quantized"):
        if strategy in ("channel", "block") and group is None:
            return None
        want = "per-channel or block weights"
    elif fmt == "pack-quantized":
        if strategy == "group":
            return None
        want = "group-wise packed weights"
    else:
        return None  # NVFP4 and others: their own paths
    return (
        f"refuses to convert: AssertionError in dequant_model: {fmt} takes only {want}, "
        f"these are strategy {strategy!r}; re-export with that strategy or convert the bf16 "
        "source"
    )


def convert_refusals(ckpt: Checkpoint) -> list[Refusal]:
    """`Refusal`s of convert_hf_to_gguf.py (llama.cpp's converter) for a safetensors
    checkpoint: its quant method, compressed-tensors groups and strategies, and the
    quantization tensors it leaves unconsumed (module docstring)."""
    qc = ckpt.quantization_config or {}
    method = qc.get("quant_method")
    where = "config.json quantization_config"
    if method not in _CONVERTED_METHODS:
        unknown = (
            f"refuses to convert: NotImplementedError: Quant method is not yet supported: "
            f"{method!r}; dequantize first (quantscale dequantize) or export --format gguf"
        )
        return [_refusal(where, unknown, LLAMA_CPP_CONVERT)]
    found: list[Refusal] = []
    consumed = _CONSUMED.get(str(method), set())
    if method == CT_METHOD:
        groups = qc.get("config_groups") or {}
        if reason := _ct_group_reason(groups):
            return [_refusal(where, reason, LLAMA_CPP_CONVERT)]
        first: dict[str, Any] = next(iter(groups.values()), {}) if groups else {}
        fmt = str(first.get("format") or qc.get("format") or "")
        consumed = _CONSUMED.get(fmt, consumed)
        if reason := _ct_weight_reason(fmt, first.get("weights") or {}):
            found.append(_refusal(where, reason, LLAMA_CPP_CONVERT))
    for name in sorted(ckpt.tensors):
        leaf = name.rpartition(".")[2]
        if leaf in _QUANT_LEAVES and leaf not in consumed:
            unmapped = (
                f"refuses to convert: ValueError: Can not map tensor '{name}' ({method} "
                f"{leaf} is not consumed by its dequantizer); drop it or convert the bf16 "
                "source"
            )
            found.append(_refusal(name, unmapped, LLAMA_CPP_CONVERT))
    return found
