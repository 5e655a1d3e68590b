"""Synthetic checkpoints with real model names and shapes, for tests and benchmarks.

Each tensor is drawn from its own generator seeded by (seed, tensor name), so a checkpoint
is deterministic whatever its sharding, and shards are generated and written one at a time
(peak memory is one shard). Linear and embedding weights are N(0, 0.02), like trained LLMs;
norm weights are close to 1.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from quantscale.checkpoint.layouts import hf_scale_name
from quantscale.checkpoint.read import CONFIG_NAME, DTYPE_NAMES, DTYPES, INDEX_NAME
from quantscale.checkpoint.write import CheckpointWriter
from quantscale.errors import OutputExistsError
from quantscale.formats.fp8 import DEFAULT_BLOCK, block_grid, quantize_fp8_block

WEIGHT_STD = 0.02

# MiniMax-M2's published dimensions (config.json of MiniMaxAI/MiniMax-M2).
MINIMAX_HIDDEN = 3072
MINIMAX_HEADS = 48
MINIMAX_KV_HEADS = 8
MINIMAX_HEAD_DIM = 128
MINIMAX_EXPERT_DIM = 1536
MINIMAX_SKIP = ["gate", "e_score_correction_bias", "lm_head"]


@dataclass(frozen=True)
class Spec:
    """One tensor to generate: `role` is linear, embedding, norm, router or bias."""

    name: str
    shape: tuple[int, ...]
    role: str
    dtype: torch.dtype = torch.bfloat16


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def make_tensor(spec: Spec, seed: int) -> torch.Tensor:
    """Deterministic values for one tensor (depends only on seed and name)."""
    gen = _generator(seed, spec.name)
    if spec.role == "norm":
        t = torch.empty(spec.shape).normal_(1.0, WEIGHT_STD, generator=gen)
    elif spec.role == "bias":
        t = torch.empty(spec.shape).uniform_(-0.05, 0.05, generator=gen)
    else:
        t = torch.empty(spec.shape, dtype=spec.dtype).normal_(0.0, WEIGHT_STD, generator=gen)
    return t.to(spec.dtype)


def _groups(
    layers: int, shards: int, layer_specs, head: list[Spec], tail: list[Spec]
) -> list[list[Spec]]:
    """Split layers over at most `shards` contiguous shards; `head` goes first, `tail` last."""
    count = max(1, min(shards, layers))
    groups = []
    for i in range(count):
        idx = range(i * layers // count, (i + 1) * layers // count)
        groups.append([s for layer in idx for s in layer_specs(layer)])
    groups[0][:0] = head
    groups[-1].extend(tail)
    return groups


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _write(
    path: str | os.PathLike,
    groups: list[list[Spec]],
    config: dict,
    seed: int,
    fp8: bool,
    block: tuple[int, int],
    scale_fmt: str | None,
    overwrite: bool,
) -> Path:
    """Generate and write each group of specs as one shard; FP8-quantize 'linear' weights."""
    with CheckpointWriter(path, overwrite=overwrite) as writer:
        for i, group in enumerate(groups):
            tensors: dict[str, torch.Tensor] = {}
            for spec in group:
                value = make_tensor(spec, seed)
                if fp8 and spec.role == "linear":
                    q, scale = quantize_fp8_block(value, block, scale_fmt)
                    tensors[spec.name] = q
                    tensors[hf_scale_name(spec.name)] = scale
                else:
                    tensors[spec.name] = value
            writer.write_shard(shard_name(i, len(groups)), tensors)
            del tensors
        writer.write_json(CONFIG_NAME, config)
        return writer.commit(write_index=True)


def fp8_quantization_config(
    block: tuple[int, int] = DEFAULT_BLOCK,
    skip: list[str] | None = None,
    scale_fmt: str | None = None,
    fmt: str = "float8_e4m3fn",
) -> dict:
    """A fine-grained FP8 quantization_config as MiniMax-M2 / DeepSeek-V3 publish it."""
    qc = {
        "quant_method": "fp8",
        "fmt": fmt,
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
    if skip is not None:
        qc["modules_to_not_convert"] = list(skip)
    if scale_fmt:
        qc["scale_fmt"] = scale_fmt
    return qc


# ---------------------------------------------------------------- MiniMax-M2


def minimax_layer_specs(layer: int, experts: int) -> list[Spec]:
    """Tensors of one MiniMax-M2 decoder layer (attention with q/k norms, sparse MoE)."""
    h, q_dim = MINIMAX_HIDDEN, MINIMAX_HEADS * MINIMAX_HEAD_DIM
    kv_dim, e_dim = MINIMAX_KV_HEADS * MINIMAX_HEAD_DIM, MINIMAX_EXPERT_DIM
    p = f"model.layers.{layer}"
    specs = [
        Spec(f"{p}.input_layernorm.weight", (h,), "norm"),
        Spec(f"{p}.self_attn.q_proj.weight", (q_dim, h), "linear"),
        Spec(f"{p}.self_attn.k_proj.weight", (kv_dim, h), "linear"),
        Spec(f"{p}.self_attn.v_proj.weight", (kv_dim, h), "linear"),
        Spec(f"{p}.self_attn.o_proj.weight", (h, q_dim), "linear"),
        Spec(f"{p}.self_attn.q_norm.weight", (q_dim,), "norm"),
        Spec(f"{p}.self_attn.k_norm.weight", (kv_dim,), "norm"),
        Spec(f"{p}.post_attention_layernorm.weight", (h,), "norm"),
        Spec(f"{p}.block_sparse_moe.gate.weight", (experts, h), "router", torch.float32),
        Spec(f"{p}.block_sparse_moe.e_score_correction_bias", (experts,), "bias", torch.float32),
    ]
    for e in range(experts):
        ep = f"{p}.block_sparse_moe.experts.{e}"
        specs += [
            Spec(f"{ep}.w1.weight", (e_dim, h), "linear"),
            Spec(f"{ep}.w2.weight", (h, e_dim), "linear"),
            Spec(f"{ep}.w3.weight", (e_dim, h), "linear"),
        ]
    return specs


def minimax_config(layers: int, experts: int, vocab: int, quantization: dict | None) -> dict:
    """config.json of a MiniMax-M2 with `layers` layers, `experts` experts and `vocab` tokens."""
    config = {
        "architectures": ["MiniMaxM2ForCausalLM"],
        "model_type": "minimax_m2",
        "hidden_size": MINIMAX_HIDDEN,
        "intermediate_size": MINIMAX_EXPERT_DIM,
        "num_hidden_layers": layers,
        "num_attention_heads": MINIMAX_HEADS,
        "num_key_value_heads": MINIMAX_KV_HEADS,
        "head_dim": MINIMAX_HEAD_DIM,
        "hidden_act": "silu",
        "num_local_experts": experts,
        "num_experts_per_tok": min(8, experts),
        "scoring_func": "sigmoid",
        "use_routing_bias": True,
        "use_qk_norm": True,
        "qk_norm_type": "per_layer",
        "rotary_dim": 64,
        "rope_theta": 5000000.0,
        "rms_norm_eps": 1e-06,
        "max_position_embeddings": 196608,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    if quantization is not None:
        config["quantization_config"] = quantization
    return config


def write_minimax_like(
    path: str | os.PathLike,
    layers: int = 2,
    experts: int = 4,
    shards: int = 2,
    fp8: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    vocab: int = 512,
    block: tuple[int, int] = DEFAULT_BLOCK,
    scale_fmt: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a MiniMax-M2-shaped checkpoint (real names and shapes, small vocab).

    `fp8=True` stores attention and expert Linear weights as float8_e4m3fn with float32
    `weight_scale_inv` tiles and MiniMax-M2's quantization_config; otherwise all Linear
    weights are `dtype`. Router gate and e_score_correction_bias are float32, norms bf16.
    """
    h = MINIMAX_HIDDEN
    head = [Spec("model.embed_tokens.weight", (vocab, h), "embedding")]
    tail = [
        Spec("model.norm.weight", (h,), "norm"),
        Spec("lm_head.weight", (vocab, h), "embedding"),
    ]
    groups = _groups(layers, shards, lambda i: minimax_layer_specs(i, experts), head, tail)
    groups = [[_with_dtype(s, dtype) for s in group] for group in groups]
    qc = fp8_quantization_config(block, MINIMAX_SKIP, scale_fmt) if fp8 else None
    config = minimax_config(layers, experts, vocab, qc)
    return _write(path, groups, config, seed, fp8, block, scale_fmt, overwrite)


def write_minimax_headers(
    path: str | os.PathLike,
    layers: int = 62,
    experts: int = 256,
    vocab: int = 200064,
    shards: int | None = None,
    block: tuple[int, int] = DEFAULT_BLOCK,
) -> Path:
    """Full-size MiniMax-M2 FP8 layout (96,103 tensors by default) with real headers and
    sparse, all-zero data: for header-only tools at real scale, without ~230 GB of disk.
    """
    h = MINIMAX_HIDDEN
    head = [Spec("model.embed_tokens.weight", (vocab, h), "embedding")]
    tail = [
        Spec("model.norm.weight", (h,), "norm"),
        Spec("lm_head.weight", (vocab, h), "embedding"),
    ]
    groups = _groups(
        layers, shards or layers, lambda i: minimax_layer_specs(i, experts), head, tail
    )
    path = Path(path)
    if path.exists():
        raise OutputExistsError(f"{path}: already exists")
    path.mkdir(parents=True)
    weight_map = {}
    for i, group in enumerate(groups):
        entries = _header_entries(group, block)
        name = shard_name(i, len(groups))
        _write_sparse_shard(path / name, entries)
        weight_map.update(dict.fromkeys(entries, name))
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = minimax_config(layers, experts, vocab, fp8_quantization_config(block, MINIMAX_SKIP))
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return path


def _header_entries(specs: list[Spec], block: tuple[int, int]) -> dict[str, tuple[str, tuple]]:
    """name -> (safetensors dtype, shape), FP8 weight plus scale for each Linear."""
    out = {}
    for spec in specs:
        if spec.role == "linear":
            out[spec.name] = ("F8_E4M3", spec.shape)
            out[hf_scale_name(spec.name)] = ("F32", block_grid(spec.shape, block))
        else:
            out[spec.name] = (DTYPE_NAMES[spec.dtype], spec.shape)
    return out


def _write_sparse_shard(file: Path, entries: dict[str, tuple[str, tuple]]) -> None:
    header, offset = {}, 0
    for name, (dtype, shape) in entries.items():
        size = DTYPES[dtype][1]
        for d in shape:
            size *= d
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def _with_dtype(spec: Spec, dtype: torch.dtype) -> Spec:
    """Linear and embedding weights take the checkpoint dtype; fp32 router stays fp32."""
    if spec.role in ("linear", "embedding", "norm"):
        return Spec(spec.name, spec.shape, spec.role, dtype)
    return spec


# ---------------------------------------------------------------- Llama


def llama_layer_specs(
    layer: int, hidden: int, intermediate: int, q_dim: int, kv_dim: int
) -> list[Spec]:
    """Tensors of one Llama decoder layer."""
    p = f"model.layers.{layer}"
    return [
        Spec(f"{p}.input_layernorm.weight", (hidden,), "norm"),
        Spec(f"{p}.self_attn.q_proj.weight", (q_dim, hidden), "linear"),
        Spec(f"{p}.self_attn.k_proj.weight", (kv_dim, hidden), "linear"),
        Spec(f"{p}.self_attn.v_proj.weight", (kv_dim, hidden), "linear"),
        Spec(f"{p}.self_attn.o_proj.weight", (hidden, q_dim), "linear"),
        Spec(f"{p}.post_attention_layernorm.weight", (hidden,), "norm"),
        Spec(f"{p}.mlp.gate_proj.weight", (intermediate, hidden), "linear"),
        Spec(f"{p}.mlp.up_proj.weight", (intermediate, hidden), "linear"),
        Spec(f"{p}.mlp.down_proj.weight", (hidden, intermediate), "linear"),
    ]


def llama_config(
    hidden: int, intermediate: int, layers: int, vocab: int, heads: int, kv_heads: int
) -> dict:
    """A LlamaForCausalLM config.json that transformers loads."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


def _llama_heads(hidden: int, heads: int | None, kv_heads: int | None) -> tuple[int, int]:
    if heads is None:
        head_dim = next((d for d in (128, 64) if hidden % d == 0), hidden)
        heads = hidden // head_dim
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
    if kv_heads is None:
        kv_heads = next(k for k in (heads // 4, heads // 2, heads) if k and heads % k == 0)
    if heads % kv_heads:
        raise ValueError(f"heads {heads} is not a multiple of kv_heads {kv_heads}")
    return heads, kv_heads


def write_llama_like(
    path: str | os.PathLike,
    hidden: int = 256,
    intermediate: int = 512,
    layers: int = 2,
    vocab: int = 512,
    shards: int = 1,
    seed: int = 0,
    heads: int | None = None,
    kv_heads: int | None = None,
    fp8: bool = False,
    block: tuple[int, int] = DEFAULT_BLOCK,
    scale_fmt: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a bf16 LlamaForCausalLM checkpoint that transformers can load.

    Shards split the layers (embeddings in the first, final norm and lm_head in the last);
    only one shard's tensors are in memory at a time, so ~1 GB checkpoints are cheap.
    With `fp8=True` the q/k/v/o and MLP weights are FP8 block-quantized (lm_head stays bf16).
    """
    heads, kv_heads = _llama_heads(hidden, heads, kv_heads)
    head_dim = hidden // heads
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    head = [Spec("model.embed_tokens.weight", (vocab, hidden), "embedding")]
    tail = [
        Spec("model.norm.weight", (hidden,), "norm"),
        Spec("lm_head.weight", (vocab, hidden), "embedding"),
    ]

    def layer_specs(i: int) -> list[Spec]:
        return llama_layer_specs(i, hidden, intermediate, q_dim, kv_dim)

    groups = _groups(layers, shards, layer_specs, head, tail)
    config = llama_config(hidden, intermediate, layers, vocab, heads, kv_heads)
    if fp8:
        qc = fp8_quantization_config(block, ["lm_head"], scale_fmt, fmt="e4m3")
        config["quantization_config"] = qc
    return _write(path, groups, config, seed, fp8, block, scale_fmt, overwrite)
