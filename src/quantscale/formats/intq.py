"""Integer quantization: ranges, quantize/dequantize with scale and zero point, int32 packing.

Convention (compressed-tensors, GPTQ): q = clamp(round(x/scale) + zp, qmin, qmax),
x ~= (q - zp) * scale, with the signed range [-2^(b-1), 2^(b-1)-1] for both symmetric and
asymmetric schemes (symmetric: zp = 0).

Packing (compressed-tensors `pack-quantized`): each value is offset by +2^(b-1) to an
unsigned b-bit field and the fields are laid densely along the packed dimension, element i
at bit i*b of the stream, word w holding stream bits 32w..32w+31 (element 0 in the lowest
bits; for b = 3, 5, 6, 7 a field may straddle two words). A row of n values takes
ceil(n*b/32) int32 words; the unused high bits of the last word are zero.
"""

from __future__ import annotations

import math

import torch


def int_range(bits: int, symmetric: bool = True) -> tuple[int, int]:
    """(qmin, qmax) of a signed `bits`-bit integer; the same for symmetric and asymmetric."""
    if not 1 <= bits <= 16:
        raise ValueError(f"integer quantization supports 1..16 bits, got {bits}")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def int_dtype(bits: int) -> torch.dtype:
    """Smallest signed torch dtype holding `bits`-bit integers."""
    return torch.int8 if bits <= 8 else torch.int16 if bits <= 16 else torch.int32


def quantize_int(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    bits: int = 8,
) -> torch.Tensor:
    """clamp(round(x/scale) + zp) as a signed integer tensor (int8 for bits <= 8)."""
    qmin, qmax = int_range(bits)
    q = torch.round(x.float() / scale.float())
    if zero_point is not None:
        q = q + zero_point.float()
    return q.clamp(qmin, qmax).to(int_dtype(bits))


def dequantize_int(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(q - zp) * scale in `dtype`."""
    v = q.float()
    if zero_point is not None:
        v = v - zero_point.float()
    return (v * scale.float()).to(dtype)


def packed_words(n: int, bits: int) -> int:
    """int32 words needed for n values of `bits` bits."""
    return math.ceil(n * bits / 32)


def _bit_layout(n: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(n, dtype=torch.int64, device=device) * bits
    return start // 32, start % 32


def pack_int32(q: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack signed `bits`-bit integers along `dim` into int32 words (see module docstring)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_int32 supports 1..8 bits, got {bits}")
    x = q.movedim(dim, -1)
    lead, n = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, n)
    word, off = _bit_layout(n, bits, x.device)
    nwords = packed_words(n, bits)
    out = torch.empty(rows.shape[0], nwords, dtype=torch.int32, device=x.device)
    step = max(1, (1 << 22) // max(n, 1))  # rows per chunk: int64 temporaries of ~32 MB
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = _pack_rows(rows[start : start + step], bits, word, off, nwords)
    return out.reshape(*lead, nwords).movedim(-1, dim)


def _pack_rows(
    x: torch.Tensor, bits: int, word: torch.Tensor, off: torch.Tensor, nwords: int
) -> torch.Tensor:
    """`pack_int32` of the rows x [r, n] (int64 work, int32 result)."""
    v = (x.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    out = torch.zeros(v.shape[0], nwords + 1, dtype=torch.int64, device=x.device)
    out.index_add_(1, word, (v << off) & 0xFFFFFFFF)
    out.index_add_(1, word + 1, v >> (32 - off))  # spill of fields that straddle a word
    out = out[:, :nwords]
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 words -> n signed values (int8) along `dim`."""
    if not 1 <= bits <= 8:
        raise ValueError(f"unpack_int32 supports 1..8 bits, got {bits}")
    p = packed.movedim(dim, -1)
    lead, nwords = p.shape[:-1], p.shape[-1]
    if nwords != packed_words(n, bits):
        raise ValueError(
            f"{nwords} packed words cannot hold {n} values of {bits} bits "
            f"(expected {packed_words(n, bits)})"
        )
    w = p.reshape(-1, nwords).to(torch.int64) & 0xFFFFFFFF
    w = torch.nn.functional.pad(w, (0, 1))
    word, off = _bit_layout(n, bits, p.device)
    both = w[:, word] | (w[:, word + 1] << 32)  # 64-bit window starting at the field's word
    v = (both >> off) & ((1 << bits) - 1)
    v = (v - (1 << (bits - 1))).to(torch.int8)
    return v.reshape(*lead, n).movedim(-1, dim)
