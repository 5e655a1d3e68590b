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

from quantscale.checkpoint.gguf import GGUF_NAME, gguf_tensor_name, rotary_permute
from quantscale.checkpoint.write import CheckpointWriter
from quantscale.errors import QuantscaleError
from quantscale.export.base import ModuleCodes, copy_side_files, model_config, quantized_modules
from quantscale.formats.ggml import BLOCK, GGML_TYPES, ggml_blocks
from quantscale.models.adapter import causal_lm
from quantscale.scheme import QuantArgs, declared_scale_dtype

MIX_FILE_TYPES = {"Q4_K_M": 15}


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
    if not merges:  # the gguf writer drops an empty array; llama.cpp then refuses the file
        raise QuantscaleError(
            f"--format gguf: {path} has no BPE merges; llama.cpp refuses a gpt2 vocabulary "
            "without tokenizer.ggml.merges ('cannot find tokenizer merges in model file')"
        )
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
