"""GGUF (llama.cpp) export of Llama-architecture models: `--format gguf`.

The quantized Linears become GGML block types holding exactly our codes:

* Q8_0 (scheme `Q8_0`: symmetric int8, groups of 32, float16 scales): per block of 32 weights
  of a row, 2 bytes float16 d then 32 int8 codes; value = q * d.
* Q4_0 (scheme `Q4_0`: symmetric int4, groups of 32, float16 scales): 2 bytes float16 d then
  16 bytes; byte j holds element j in its low nibble and element j + 16 in its high nibble,
  each stored as q + 8 in [0, 15]; value = (nibble - 8) * d. Our signed int4 codes [-8, 7]
  are exactly nibble - 8, so the file dequantizes to our fake-quant weight bit for bit.
* Q4_1 (scheme `Q4_1`: asymmetric int4, groups of 32, float16 scales and integer zero points):
  2 bytes float16 d, 2 bytes float16 m, then the Q4_0 nibble layout holding q + 8; value =
  nibble * d + m. Our (q - z) * s becomes d = s, m = -(z + 8) * s rounded to float16: the one
  rounding in the file, at most 15 * s * 2^-11 per group (under 0.8% of a step).
* Q5_0 (scheme `Q5_0`: symmetric int5, groups of 32, float16 scales): 2 bytes d, 4 bytes
  (bit e = bit 4 of element e + 16), 16 bytes of low nibbles as Q4_0; value = (u - 16) * d.
* Q4_K (scheme `Q4_K`, 144 bytes per 256 weights): float16 d and dmin, 12 bytes of 6-bit
  group scales sc and mins m (groups 0-3 in the low 6 bits of bytes 0-3 / 4-7, groups 4-7
  in the nibbles of bytes 8-11 with their top 2 bits in the top bits of bytes 0-7), then per
  64 weights 32 bytes: weight l in the low nibble, l + 32 in the high one; value =
  d * sc * u - dmin * m with u = our code + 8. Our scale is d * sc exactly and our offset
  (zp + 8) * scale is dmin * m up to float32 rounding (`qdq.superblock_qparams`).
* Q6_K (scheme `Q6_K`, 210 bytes per 256 weights): per 128 weights 64 bytes of low nibbles
  (weights l and l + 64 in byte l, l + 32 and l + 96 in byte l + 32) and 32 bytes of the top
  2 bits (weights l, l + 32, l + 64, l + 96 in bits 0-1, 2-3, 4-5, 6-7 of byte l), then 16
  int8 group scales sc and float16 d; value = d * sc * (u - 32). Our scale is d * sc exactly.

A file may mix types (`quantize --scheme Q4_K_M`: llama.cpp's mix, `Recipe.place_ggml_blocks`);
the k-quant scales d and dmin are recovered from our group scales (`superblock_factors`).

Everything else (embeddings, norms, an unquantized head) is written as float32. llama.cpp
permutes the rows of attn_q / attn_k into its rotary layout (pairs (i, i + d/2) of a head
become adjacent rows); we apply that permutation when writing and readers (llama.cpp,
transformers' GGUF loader) undo it. The permutation moves whole rows, so the blocks (along
the input dimension) are unchanged.

The file `model.gguf` is written into a temporary directory renamed into place
(`CheckpointWriter`), with the source checkpoint's tokenizer / config side files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quantscale.checkpoint.write import CheckpointWriter
from quantscale.errors import QuantscaleError
from quantscale.export.base import ModuleCodes, copy_side_files, model_config, quantized_modules
from quantscale.models.adapter import causal_lm
from quantscale.qdq import QParams
from quantscale.scheme import QuantArgs, declared_scale_dtype

GGUF_NAME = "model.gguf"
BLOCK = 32
# GGML type name -> (bits, type id, file type id (LLAMA_FTYPE_MOSTLY_*)); ids from ggml.h.
GGML_TYPES: dict[str, tuple[int, int, int]] = {
    "Q8_0": (8, 8, 7),
    "Q4_0": (4, 2, 2),
    "Q4_1": (4, 3, 3),
    "Q5_0": (5, 6, 8),
    "Q4_K": (4, 12, 14),  # mostly Q4_K: LLAMA_FTYPE_MOSTLY_Q4_K_S
    "Q6_K": (6, 14, 18),
}
MIX_FILE_TYPES = {"Q4_K_M": 15}
SUPERBLOCK = 256

_LAYER = {
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


def gguf_tensor_name(name: str) -> str | None:
    """GGUF name of an HF Llama parameter ("model.layers.3.mlp.up_proj.weight" ->
    "blk.3.ffn_up.weight"); None for names GGUF has no place for."""
    module, _, leaf = name.rpartition(".")
    if module == "model.embed_tokens":
        return f"token_embd.{leaf}"
    if module == "model.norm":
        return f"output_norm.{leaf}"
    if module == "lm_head":
        return f"output.{leaf}"
    parts = module.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER:
        return f"blk.{parts[2]}.{_LAYER[parts[3]]}.{leaf}"
    return None


def ggml_type(args: QuantArgs) -> str:
    """The GGML block type holding a weight scheme's codes (else a clear error)."""
    if args.kquant is not None and args.actorder is None:
        return args.kquant
    fits = (
        args.type == "int"
        and args.strategy == "group"
        and args.group_size == BLOCK
        and declared_scale_dtype(args) == torch.float16
        and args.actorder is None
    )
    if fits and args.symmetric and args.num_bits in (8, 5, 4):
        return f"Q{args.num_bits}_0"
    if fits and not args.symmetric and args.num_bits == 4:
        return "Q4_1"
    raise QuantscaleError(
        "--format gguf holds int8 / int5 / int4 weights in groups of 32 with float16 scales "
        "or GGUF k-quants (schemes Q8_0, Q5_0, Q4_0, Q4_1, Q6_K, Q4_K, Q4_K_M); this weight "
        f"is {args.to_config('weight')}"
    )


def rotary_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order of attn_q / attn_k: within each head, rows (i, i + d/2) become
    rows (2i, 2i + 1). Works on any tensor whose first dimension is the output rows."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def pack_q4_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes [..., 32k] in [-8, 7] -> uint8 [..., 16k]: per block of 32, byte j has
    element j + 8 in its low nibble and element j + 16 (+ 8) in its high nibble."""
    v = (codes.to(torch.int16) + 8).to(torch.uint8)
    blocks = v.reshape(*v.shape[:-1], -1, 2, BLOCK // 2)
    packed = blocks[..., 0, :] | (blocks[..., 1, :] << 4)
    return packed.reshape(*v.shape[:-1], -1)


def unpack_q4_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_q4_nibbles`: int8 codes in [-8, 7]."""
    blocks = packed.reshape(*packed.shape[:-1], -1, 1, BLOCK // 2)
    nib = torch.cat([blocks & 0x0F, blocks >> 4], dim=-2).to(torch.int8) - 8
    return nib.reshape(*packed.shape[:-1], -1)


def ggml_blocks(
    codes: torch.Tensor, scale: torch.Tensor, kind: str, zero_point: torch.Tensor | None = None
) -> np.ndarray:
    """The bytes of a [rows, cols] weight as GGML `kind` blocks: uint8 [rows, bytes per row].
    Q4_1 and Q4_K take the weight's `zero_point` per group."""
    rows, cols = codes.shape
    width = SUPERBLOCK if kind.endswith("_K") else BLOCK
    if cols % width:
        raise QuantscaleError(
            f"--format gguf: {kind} rows are multiples of {width} weights; this one has {cols}"
        )
    if kind in ("Q4_1", "Q4_K") and zero_point is None:
        raise QuantscaleError(f"--format gguf: {kind} blocks need the weight's zero points")
    if kind == "Q4_K":
        assert zero_point is not None
        blocks = _q4_k(codes, scale, zero_point)
    elif kind == "Q6_K":
        blocks = _q6_k(codes, scale)
    else:
        blocks = _block32(codes, scale, kind, zero_point)
    return blocks.reshape(rows, -1).contiguous().numpy()


def _fp16_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).contiguous().view(torch.uint8)


def _block32(
    codes: torch.Tensor, scale: torch.Tensor, kind: str, zero_point: torch.Tensor | None
) -> torch.Tensor:
    """Q8_0 / Q5_0 / Q4_0 / Q4_1 blocks [rows, cols / 32, size]."""
    rows, cols = codes.shape
    groups = (rows, cols // BLOCK, 1)
    d16 = scale.reshape(groups).to(torch.float16)
    head = [d16.view(torch.uint8)]
    if kind == "Q4_1":
        assert zero_point is not None
        m = -(zero_point.reshape(groups).float() + 8) * d16.float()
        head.append(_fp16_bytes(m))
    if kind == "Q8_0":
        q = codes.to(torch.int8).reshape(rows, cols // BLOCK, BLOCK).view(torch.uint8)
    elif kind == "Q5_0":
        u = (codes.to(torch.int16) + 16).to(torch.uint8).reshape(rows, cols // BLOCK, BLOCK)
        high = ((u >> 4) & 1).reshape(rows, cols // BLOCK, 4, 8)
        qh = (high << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
        q = torch.cat([qh, pack_q4_nibbles(u.to(torch.int16) % 16 - 8)], dim=-1)
    else:
        q = pack_q4_nibbles(codes).reshape(rows, cols // BLOCK, BLOCK // 2)
    return torch.cat([*head, q], dim=-1)


def superblock_factors(
    values: torch.Tensor, top: int, tolerance: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """values [..., per] (each run one superblock's group scales or offsets) as d * k: d
    float16 [..., 1] and integers k in [0, top] with |d * k - values| <= tolerance * max (0:
    exactly, as llama.cpp multiplies them). A clear error when a run has no such d: scales
    not made by `qdq.superblock_qparams` (RTN / GPTQ with a k-quant scheme)."""
    v = values.float()
    vmax = v.amax(dim=-1, keepdim=True)
    d = torch.zeros_like(vmax)
    found = vmax == 0
    for k in range(top, 0, -1):
        cand = (vmax / k).to(torch.float16).float()
        ints = torch.round(v / cand.clamp_min(1e-30))
        close = (cand * ints - v).abs() <= tolerance * vmax
        ok = (close & (ints >= 0) & (ints <= top)).all(dim=-1, keepdim=True) & ~found & (cand > 0)
        d = torch.where(ok, cand, d)
        found |= ok
    if not found.all():
        raise QuantscaleError(
            "--format gguf: group scales / offsets are not on a k-quant superblock grid "
            f"(float16 d times integers up to {top}); quantize with the k-quant scheme"
        )
    ints = torch.where(d > 0, torch.round(v / d.clamp_min(1e-30)), torch.zeros_like(v))
    return d, ints.to(torch.uint8)


def _q4_k(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Q4_K blocks [rows, cols / 256, 144] (module docstring)."""
    rows, cols = codes.shape
    nb = cols // SUPERBLOCK
    s = scale.float().reshape(rows, nb, 8)
    offset = (zero_point.float().reshape(rows, nb, 8) + 8) * s
    d, sc = superblock_factors(s, 63)
    dmin, m = superblock_factors(offset, 63, tolerance=1e-5)
    scales = torch.cat(
        [
            (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6),
            (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6),
            (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4),
        ],
        dim=-1,
    )
    u = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(rows, nb, 4, 2, 32)
    qs = (u[..., 0, :] | (u[..., 1, :] << 4)).reshape(rows, nb, 128)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), scales, qs], dim=-1)


def _q6_k(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Q6_K blocks [rows, cols / 256, 210] (module docstring)."""
    rows, cols = codes.shape
    nb = cols // SUPERBLOCK
    d, sc = superblock_factors(scale.float().reshape(rows, nb, 16), 127)
    u = (codes.to(torch.int16) + 32).to(torch.uint8).reshape(rows, nb, 2, 4, 32)
    low, high = u & 15, u >> 4
    ql = torch.cat(
        [low[..., 0, :] | (low[..., 2, :] << 4), low[..., 1, :] | (low[..., 3, :] << 4)], -1
    )
    qh = high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6)
    return torch.cat(
        [ql.reshape(rows, nb, 128), qh.reshape(rows, nb, 64), sc, _fp16_bytes(d)], dim=-1
    )


def unpack_blocks(raw: np.ndarray, kind: str, cols: int) -> tuple[torch.Tensor, QParams]:
    """Inverse of `ggml_blocks` for our writer's types: (codes [rows, cols], group qparams as
    our schemes hold them). Other GGML types are refused by name."""
    data = torch.from_numpy(np.ascontiguousarray(raw)).reshape(raw.shape[0], -1)
    rows = data.shape[0]
    if kind == "Q6_K":
        b = data.reshape(rows, cols // SUPERBLOCK, 210)
        ql, qh = b[..., :128].reshape(rows, -1, 2, 2, 32), b[..., 128:192].reshape(rows, -1, 2, 32)
        sc = b[..., 192:208].contiguous().view(torch.int8).float()
        d = b[..., 208:210].contiguous().view(torch.float16).float()
        low = torch.stack(
            [ql[..., 0, :] & 15, ql[..., 1, :] & 15, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4], -2
        )
        high = torch.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], -2)
        codes = (low | (high << 4)).to(torch.int8) - 32
        return codes.reshape(rows, cols), QParams((d * sc).reshape(rows, -1))
    if kind == "Q4_K":
        b = data.reshape(rows, cols // SUPERBLOCK, 144)
        d = b[..., 0:2].contiguous().view(torch.float16).float()
        dmin = b[..., 2:4].contiguous().view(torch.float16).float()
        x = b[..., 4:16]
        sc = torch.cat([x[..., :4] & 63, (x[..., 8:] & 15) | ((x[..., :4] >> 6) << 4)], -1)
        m = torch.cat([x[..., 4:8] & 63, (x[..., 8:] >> 4) | ((x[..., 4:8] >> 6) << 4)], -1)
        qs = b[..., 16:].reshape(rows, -1, 4, 1, 32)
        codes = torch.cat([qs & 15, qs >> 4], dim=-2).to(torch.int8) - 8
        scale = (d * sc.float()).reshape(rows, -1)
        offset = (dmin * m.float()).reshape(rows, -1)
        return codes.reshape(rows, cols), QParams(scale, zero_point=offset / scale - 8)
    if kind in ("Q8_0", "Q5_0", "Q4_0", "Q4_1"):
        size = {"Q8_0": 34, "Q5_0": 22, "Q4_0": 18, "Q4_1": 20}[kind]
        b = data.reshape(rows, cols // BLOCK, size)
        d = b[..., 0:2].contiguous().view(torch.float16).float().reshape(rows, -1)
        if kind == "Q8_0":
            return b[..., 2:].contiguous().view(torch.int8).reshape(rows, cols), QParams(d)
        if kind == "Q5_0":
            bits = (b[..., 2:6, None] >> torch.arange(8, dtype=torch.uint8)) & 1
            low = unpack_q4_nibbles(b[..., 6:]).to(torch.int16) + 8
            codes = (low | (bits.reshape(rows, -1, 32).to(torch.int16) << 4)) - 16
            return codes.to(torch.int8).reshape(rows, cols), QParams(d)
        codes = unpack_q4_nibbles(b[..., -16:]).reshape(rows, cols)
        if kind == "Q4_0":
            return codes, QParams(d)
        m = b[..., 2:4].contiguous().view(torch.float16).float().reshape(rows, -1)
        return codes, QParams(d, zero_point=-m / d - 8)
    raise QuantscaleError(
        f"GGUF type {kind}: quantscale reads {', '.join(GGML_TYPES)} (the types it writes)"
    )


def _tokenizer_fields(source_dir: Path) -> dict[str, Any]:
    """tokens, merges, token types and special ids of a byte-level BPE tokenizer.json."""
    path = source_dir / "tokenizer.json"
    if not path.is_file():
        raise QuantscaleError(f"--format gguf needs the source's tokenizer.json ({path})")
    tok = json.loads(path.read_text())
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise QuantscaleError("--format gguf writes byte-level BPE (gpt2) tokenizers only")
    vocab: dict[str, int] = dict(model["vocab"])
    special = set()
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # UNUSED
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = 3 if i in special else 1  # CONTROL / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def _special_ids(source_dir: Path, config: dict, tokens: list[str]) -> dict[str, int]:
    ids = {}
    cfg_path = source_dir / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    for key in ("bos", "eos", "pad", "unk"):
        tid = config.get(f"{key}_token_id")
        text = tcfg.get(f"{key}_token")
        if isinstance(text, dict):
            text = text.get("content")
        if isinstance(text, str) and text in tokens:
            tid = tokens.index(text)
        if isinstance(tid, int):
            ids[key] = tid
    return ids


def save_gguf(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    recipe=None,
    overwrite: bool = False,
    source_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a Llama model quantized with GGUF schemes (Q8_0, Q5_0, Q4_0, Q4_1, Q6_K, Q4_K,
    the Q4_K_M mix; one type per Linear) as `out/model.gguf`."""
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise QuantscaleError(
            "--format gguf needs the gguf package: pip install 'quantscale[gguf]'"
        ) from e
    config = model_config(model)
    if config.get("model_type") != "llama":
        raise QuantscaleError(
            f"--format gguf writes Llama-architecture models; this is {config.get('model_type')}"
        )
    mods = quantized_modules(model)
    file_type = _file_type(mods, recipe if recipe is not None else _recipe_of(model))
    if source_dir is None:
        raise QuantscaleError("--format gguf needs the source checkpoint (for its tokenizer)")
    source = Path(source_dir)
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    tensors = _gguf_tensors(causal_lm(model), mods, n_head, n_kv)
    tok = _tokenizer_fields(source)

    with CheckpointWriter(out, overwrite=overwrite) as writer:
        w = gguf.GGUFWriter(str(writer.tmp / GGUF_NAME), "llama")
        w.add_name(str(config.get("_name_or_path") or "model").rstrip("/").rpartition("/")[2])
        if file_type is not None:
            w.add_file_type(file_type)
        w.add_vocab_size(int(config["vocab_size"]))
        w.add_context_length(int(config["max_position_embeddings"]))
        w.add_embedding_length(int(config["hidden_size"]))
        w.add_block_count(int(config["num_hidden_layers"]))
        w.add_feed_forward_length(int(config["intermediate_size"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        rope = config.get("rope_parameters") or {}
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        w.add_rope_freq_base(float(theta))
        head_dim = config.get("head_dim") or config["hidden_size"] // n_head
        w.add_rope_dimension_count(int(head_dim))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm" if "smollm" in str(source).lower() else "default")
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        for key, tid in _special_ids(source, config, tok["tokens"]).items():
            getattr(w, f"add_{key}_token_id")(tid)
        for name, (data, raw_type) in tensors.items():
            qtype = None if raw_type is None else gguf.GGMLQuantizationType(raw_type)
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        copy_side_files(source, writer)
        writer.write_json("config.json", config)
        return writer.commit(write_index=False)


def _recipe_of(model: nn.Module) -> Any:
    return getattr(model, "quantscale_recipe", None)


def _file_type(mods: dict[str, ModuleCodes], recipe: Any) -> int | None:
    """general.file_type: the GGUF mix's (Q4_K_M), else that of the type holding the most
    quantized weights; None when nothing is quantized."""
    mix = getattr(recipe, "gguf_mix", None)
    if mix in MIX_FILE_TYPES:
        return MIX_FILE_TYPES[mix]
    counts: dict[str, int] = {}
    for mc in mods.values():
        kind = ggml_type(mc.args)
        counts[kind] = counts.get(kind, 0) + mc.codes.numel()
    return GGML_TYPES[max(counts, key=counts.__getitem__)][2] if counts else None


def _gguf_tensors(
    model: nn.Module, mods: dict[str, ModuleCodes], n_head: int, n_kv: int
) -> dict[str, tuple[np.ndarray, int | None]]:
    """GGUF name -> (data, GGML type id or None for float32), in llama.cpp's order."""
    out: dict[str, tuple[np.ndarray, int | None]] = {}
    quant_weights = {f"{n}.weight" for n in mods}
    state = model.state_dict()
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    for key, value in state.items():
        if key.rpartition(".")[2] not in ("weight", "bias"):
            # QuantLinear's scale / zero-point buffers live inside the GGML blocks; llama.cpp
            # refuses a file with tensors its model does not create ("wrong number of tensors")
            continue
        gname = gguf_tensor_name(key)
        if gname is None:
            raise QuantscaleError(f"--format gguf: no GGUF tensor for {key!r}")
        heads = n_head if ".attn_q." in gname else n_kv if ".attn_k." in gname else None
        if key in quant_weights:
            mc = mods[key.removesuffix(".weight")]
            kind = ggml_type(mc.args)
            codes, scale, zp = mc.codes.cpu(), mc.qparams.scale.cpu(), mc.qparams.zero_point
            zp = zp.cpu() if zp is not None else None
            if heads is not None:
                codes, scale = rotary_permute(codes, heads), rotary_permute(scale, heads)
                zp = rotary_permute(zp, heads) if zp is not None else None
            out[gname] = (ggml_blocks(codes, scale, kind, zp), GGML_TYPES[kind][1])
        else:
            t = value.detach().cpu().float()
            if heads is not None:
                t = rotary_permute(t, heads)
            out[gname] = (t.contiguous().numpy(), None)
    return out
