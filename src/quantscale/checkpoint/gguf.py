"""GGUF (llama.cpp) Llama files: tensor names, llama.cpp's q/k row order, and a reader of the
types we write (`quantscale eval FILE.gguf`).

`read_gguf(file)` gives the HF Llama config (from the `llama.*` metadata) and every tensor
under its HF name as float32: F32 / F16 as stored, the GGML block types our writer makes
(`formats.ggml.GGML_TYPES`: Q8_0, Q5_0, Q4_0, Q4_1, Q4_K, Q6_K) dequantized from their codes
and group scales as our fake-quant model computes them, attn_q / attn_k rows put back in HF
order. Any other type, or another architecture, is refused by name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from quantscale.errors import CheckpointError
from quantscale.formats.ggml import GGML_TYPES, unpack_blocks

GGUF_NAME = "model.gguf"
GGUF_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_FLOATS = ("F32", "F16")


def gguf_tensor_name(name: str) -> str | None:
    """GGUF name of an HF Llama parameter ("model.layers.3.mlp.up_proj.weight" ->
    "blk.3.ffn_up.weight"); None for names GGUF has no place for."""
    module, _, leaf = name.rpartition(".")
    if module in _TOP:
        return f"{_TOP[module]}.{leaf}"
    parts = module.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in GGUF_LAYER:
        return f"blk.{parts[2]}.{GGUF_LAYER[parts[3]]}.{leaf}"
    return None


def hf_tensor_name(name: str) -> str | None:
    """Inverse of `gguf_tensor_name`; None for GGUF names with no HF Llama parameter."""
    module, _, leaf = name.rpartition(".")
    top = {v: k for k, v in _TOP.items()}
    if module in top:
        return f"{top[module]}.{leaf}"
    parts = module.split(".")
    layer = {v: k for k, v in GGUF_LAYER.items()}
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in layer:
        return f"model.layers.{parts[1]}.{layer[parts[2]]}.{leaf}"
    return None


def rotary_permute(w: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """llama.cpp's row order of attn_q / attn_k: within each head, rows (i, i + d/2) become
    rows (2i, 2i + 1) (`inverse`: back to HF's). Works on any tensor whose first dimension is
    the output rows."""
    half = w.shape[0] // n_head // 2
    split = (n_head, half, 2) if inverse else (n_head, 2, half)
    return w.reshape(*split, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def find_gguf(path: str | os.PathLike) -> Path | None:
    """The GGUF file `path` names: the file itself, or the `model.gguf` (our writer's) or only
    `*.gguf` of a directory holding no safetensors; None when there is none."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return p
    if not p.is_dir() or any(p.glob("*.safetensors")):
        return None
    if (p / GGUF_NAME).is_file():
        return p / GGUF_NAME
    found = sorted(p.glob("*.gguf"))
    return found[0] if len(found) == 1 else None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _config(reader: Any, file: Path, tied: bool) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{file}: architecture {arch!r}; quantscale reads GGUF llama only")
    heads = int(_field(reader, "llama.attention.head_count"))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(_field(reader, "llama.vocab_size", len(tokens))),
        "hidden_size": int(_field(reader, "llama.embedding_length")),
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "tie_word_embeddings": tied,
    }
    for key in ("bos", "eos", "pad"):
        tid = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if tid is not None:
            config[f"{key}_token_id"] = int(tid)
    return config


def _tensor(t: Any, file: Path) -> torch.Tensor:
    """One GGUF tensor as float32 [rows, cols] (or [n])."""
    kind = t.tensor_type.name
    if kind in _FLOATS:
        return torch.from_numpy(t.data.copy()).float()
    if kind not in GGML_TYPES:
        raise CheckpointError(
            f"{file}: tensor {t.name} is GGML type {kind}; quantscale reads "
            f"{', '.join((*_FLOATS, *GGML_TYPES))} (the types it writes)"
        )
    cols = int(t.shape[0])
    codes, scale, zero_point = unpack_blocks(t.data, kind, cols)
    group = cols // scale.shape[1]
    v = codes.float()
    if zero_point is not None:
        v = v - zero_point.repeat_interleave(group, dim=1)
    return v * scale.repeat_interleave(group, dim=1)


def read_gguf(file: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(HF Llama config, HF name -> float32 tensor) of a GGUF file (module docstring)."""
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CheckpointError("reading GGUF needs the gguf package: pip install gguf") from e
    path = Path(file)
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable GGUF file: {exc}") from exc
    names = {t.name for t in reader.tensors}
    config = _config(reader, path, tied="output.weight" not in names)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        hf = hf_tensor_name(t.name)
        if hf is None:
            raise CheckpointError(f"{path}: tensor {t.name} has no place in a Llama model")
        value = _tensor(t, path)
        n_head = heads.get(t.name.split(".")[2]) if t.name.startswith("blk.") else None
        tensors[hf] = rotary_permute(value, n_head, inverse=True) if n_head else value
    return config, tensors


def load_gguf_model(file: str | os.PathLike, dtype: torch.dtype, reader: str) -> Any:
    """The HF Llama model of a GGUF file: through `read_gguf` (`reader="quantscale"`) or
    transformers' GGUF loader (`"transformers"`, which dequantizes with the gguf package)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = Path(file)
    if reader == "transformers":
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    config, tensors = read_gguf(path)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=dtype)
    result = model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    tied = config["tie_word_embeddings"]
    missing = [n for n in result.missing_keys if not (tied and n == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: tensors missing {missing[:4]} / unexpected {result.unexpected_keys[:4]}"
        )
    if config["tie_word_embeddings"]:
        model.tie_weights()
    return model.eval()
