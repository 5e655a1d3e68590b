"""GGML (llama.cpp) weight blocks: the byte layouts of the types `--format gguf` writes, from
and to our codes and group qparams (`export.gguf` describes each layout; llama.cpp's
ggml-common.h / ggml-quants.c are the reference, gguf's `quants.dequantize` the test oracle).

Codes are our signed integers (Q8_0 [-128, 127], Q5_0 [-16, 15], Q4_0 / Q4_1 / Q4_K [-8, 7],
Q6_K [-32, 31]); scales are float32 group scales; Q4_1 / Q4_K zero points follow
`(q - zp) * scale` (Q4_K's fractional, `qdq.superblock_qparams`).
"""

from __future__ import annotations

import numpy as np
import torch

from quantscale.errors import QuantscaleError

BLOCK = 32
SUPERBLOCK = 256
# GGML type name -> (bits, type id, file type id (LLAMA_FTYPE_MOSTLY_*)); ids from ggml.h.
GGML_TYPES: dict[str, tuple[int, int, int]] = {
    "Q8_0": (8, 8, 7),
    "Q4_0": (4, 2, 2),
    "Q4_1": (4, 3, 3),
    "Q5_0": (5, 6, 8),
    "Q4_K": (4, 12, 14),  # mostly Q4_K: LLAMA_FTYPE_MOSTLY_Q4_K_S
    "Q6_K": (6, 14, 18),
}


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


def unpack_blocks(
    raw: np.ndarray, kind: str, cols: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inverse of `ggml_blocks` for the types we write: (codes [rows, cols], group scales,
    group zero points or None) as our schemes hold them. Other GGML types are refused by
    name."""
    data = torch.from_numpy(np.array(raw)).reshape(raw.shape[0], -1)  # a writable copy
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
        return codes.reshape(rows, cols), (d * sc).reshape(rows, -1), None
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
        return codes.reshape(rows, cols), scale, offset / scale - 8
    if kind in ("Q8_0", "Q5_0", "Q4_0", "Q4_1"):
        size = {"Q8_0": 34, "Q5_0": 22, "Q4_0": 18, "Q4_1": 20}[kind]
        b = data.reshape(rows, cols // BLOCK, size)
        d = b[..., 0:2].contiguous().view(torch.float16).float().reshape(rows, -1)
        if kind == "Q8_0":
            return b[..., 2:].contiguous().view(torch.int8).reshape(rows, cols), d, None
        if kind == "Q5_0":
            bits = (b[..., 2:6, None] >> torch.arange(8, dtype=torch.uint8)) & 1
            low = unpack_q4_nibbles(b[..., 6:]).to(torch.int16) + 8
            codes = (low | (bits.reshape(rows, -1, 32).to(torch.int16) << 4)) - 16
            return codes.to(torch.int8).reshape(rows, cols), d, None
        codes = unpack_q4_nibbles(b[..., -16:]).reshape(rows, cols)
        if kind == "Q4_0":
            return codes, d, None
        m = b[..., 2:4].contiguous().view(torch.float16).float().reshape(rows, -1)
        return codes, d, -m / d - 8
    raise QuantscaleError(
        f"GGUF type {kind}: quantscale reads {', '.join(GGML_TYPES)} (the types it writes)"
    )
