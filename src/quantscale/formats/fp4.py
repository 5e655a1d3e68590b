"""FP4 E2M1 numbers, nibble packing, and NVFP4 two-level scaling.

E2M1 magnitudes by index 0..7: {0, 0.5, 1, 1.5, 2, 3, 4, 6}; a code is `sign << 3 | index`.
Rounding is to the nearest value; a tie goes to the even index (even mantissa), exactly as
compressed-tensors' `_round_to_fp4`/`cast_to_fp4`: 0.25->0, 0.75->1, 1.25->1, 1.75->2,
2.5->2, 3.5->4, 5->4. Magnitudes above 6 saturate to 6.

NVFP4 (ModelOpt / compressed-tensors): per-tensor `scale_2 = amax / (6*448)` and one
E4M3 scale per 16 elements, `block_scale = block_amax / (6*scale_2)` clamped to
[2^-9, 448]; `w ~= e2m1 * block_scale * scale_2`. compressed-tensors stores
`global_scale = 1/scale_2`.

`quantize_nvfp4_packed` is the fast path for exports: the same bytes as `quantize_nvfp4`
followed by `pack_fp4`, from the C++ kernel beside the FP8 one (formats/csrc).
"""

from __future__ import annotations

import torch

from quantscale.formats.fp8 import E4M3, E4M3_MAX, cast_fp8, scale_from_amax

E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# (boundary, tie goes up?) between consecutive E2M1 magnitudes; ties go to the even index.
E2M1_BOUNDARIES = ((0.25, False), (0.75, True), (1.25, False), (1.75, True),
                   (2.5, False), (3.5, True), (5.0, False))  # fmt: skip
NVFP4_GROUP = 16
E4M3_MIN_SUBNORMAL = 2.0**-9


def e2m1_index(x: torch.Tensor) -> torch.Tensor:
    """Index 0..7 of the nearest E2M1 magnitude of |x| (uint8), ties to even index."""
    a = x.abs().float()
    idx = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for bound, tie_up in E2M1_BOUNDARIES:
        idx += (a >= bound if tie_up else a > bound).to(torch.uint8)
    return idx


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Codes (uint8, sign bit 3 | index) of the nearest E2M1 values; -0.0 keeps its sign."""
    sign = torch.signbit(x).to(torch.uint8) << 3
    return e2m1_index(x) | sign


def e2m1_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of E2M1 codes (low 4 bits of each uint8)."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    c = codes.to(torch.int64)
    mag = table[c & 7]
    return torch.where((c & 8) > 0, -mag, mag).to(dtype)


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value (float32), saturating at +-6; same ties as `e2m1_encode`.

    Within each binade the grid is uniform (step 0.5 below 2, 1 below 4, 2 up to 6), so
    round-half-to-even of x/step reproduces the even-index tie rule.
    """
    a = x.float().abs()
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    r = (torch.round(a / step) * step).clamp(max=E2M1_MAX)
    return torch.copysign(r, x.float())


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes [..., n] (n even) to uint8 [..., n/2]: element 2k low nibble, 2k+1 high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dimension, got shape {tuple(codes.shape)}")
    c = codes.to(torch.uint8) & 0xF
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_fp4`: uint8 [..., m] -> codes uint8 [..., 2m]."""
    p = packed.to(torch.uint8)
    return torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)


def nvfp4_scale_2(amax: torch.Tensor | float) -> torch.Tensor:
    """Per-tensor NVFP4 scale amax/(6*448) as float32; 1.0 where amax is 0 (finite)."""
    return scale_from_amax(torch.as_tensor(amax, dtype=torch.float32), E2M1_MAX * E4M3_MAX)


def nvfp4_block_scale(block_amax: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    """E4M3-representable block scales block_amax/(6*scale_2), clamped to [2^-9, 448].

    Returned as float32 holding exact E4M3 values (cast with `.to(float8_e4m3fn)` losslessly).
    """
    raw = block_amax.float() / (E2M1_MAX * scale_2.float())
    return cast_fp8(raw.clamp(min=E4M3_MIN_SUBNORMAL), E4M3).float()


def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    if w.shape[-1] % group:
        raise ValueError(
            f"last dimension {w.shape[-1]} of shape {tuple(w.shape)} is not a multiple of {group}"
        )
    return w.unflatten(-1, (w.shape[-1] // group, group))


def quantize_nvfp4(
    w: torch.Tensor, scale_2: torch.Tensor | None = None, group: int = NVFP4_GROUP
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4-quantize w [..., in] -> (codes uint8 [..., in], block_scale E4M3 [..., in/16],
    scale_2 float32 scalar). Pack the codes with `pack_fp4` for storage."""
    g = _groups(w.float(), group)
    if scale_2 is None:
        scale_2 = nvfp4_scale_2(w.detach().abs().amax() if w.numel() else torch.tensor(0.0))
    scale_2 = torch.as_tensor(scale_2, dtype=torch.float32, device=w.device).reshape(())
    bscale = nvfp4_block_scale(g.abs().amax(dim=-1), scale_2)
    codes = e2m1_encode(g / (bscale * scale_2).unsqueeze(-1)).flatten(-2)
    return codes, bscale.to(E4M3), scale_2


def dequantize_nvfp4(
    codes: torch.Tensor,
    block_scale: torch.Tensor,
    scale_2: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    group: int = NVFP4_GROUP,
) -> torch.Tensor:
    """codes [..., in] (unpacked) -> e2m1 * block_scale * scale_2 in `dtype`."""
    vals = _groups(e2m1_decode(codes), group)
    s = block_scale.float() * torch.as_tensor(scale_2, dtype=torch.float32).reshape(())
    return (vals * s.unsqueeze(-1)).flatten(-2).to(dtype)


def fake_quant_nvfp4(w: torch.Tensor, scale_2: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize w through NVFP4, returned in w's dtype."""
    codes, bscale, s2 = quantize_nvfp4(w, scale_2)
    return dequantize_nvfp4(codes, bscale, s2, w.dtype)


def quantize_nvfp4_packed(
    w: torch.Tensor, scale_2: torch.Tensor | None = None, group: int = NVFP4_GROUP
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_nvfp4` then `pack_fp4`, bit for bit, in one pass where the C++ kernel runs
    (CPU, bf16/fp16/fp32, groups of 16): (packed uint8 [..., in/2], block_scale E4M3
    [..., in/16], scale_2 float32 scalar)."""
    from quantscale.formats.fp8_fast import native_op

    op = native_op("nvfp4_quantize")
    fits = w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16, torch.float32)
    if op is None or not fits or group != NVFP4_GROUP or w.shape[-1] % group or w.ndim == 0:
        codes, bscale, scale_2 = quantize_nvfp4(w, scale_2, group)
        return pack_fp4(codes), bscale, scale_2
    if scale_2 is None:
        scale_2 = nvfp4_scale_2(w.detach().abs().amax() if w.numel() else torch.tensor(0.0))
    scale_2 = torch.as_tensor(scale_2, dtype=torch.float32, device=w.device).reshape(())
    flat = w.detach().reshape(-1, w.shape[-1]).contiguous()
    scales = torch.empty(flat.shape[0], flat.shape[1] // group, dtype=torch.uint8)
    packed = op(flat, scales, float(scale_2))
    lead = w.shape[:-1]
    return packed.reshape(*lead, -1), scales.view(E4M3).reshape(*lead, -1), scale_2
