"""Golden values over all 256 FP8 codes (E4M3 and E5M2)."""

import math

import torch

from quantscale.formats.fp8 import E4M3, E5M2, all_codes, cast_fp8, fp8_max


def _e4m3_reference(code: int) -> float:
    """Decode an E4M3FN byte from its bit fields (bias 7, no inf, S.1111.111 is NaN)."""
    sign = -1.0 if code & 0x80 else 1.0
    exp, man = (code >> 3) & 0xF, code & 0x7
    if exp == 0xF and man == 0x7:
        return math.nan
    if exp == 0:
        return sign * man / 8 * 2.0**-6
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


def test_e4m3_all_codes_decode_to_bit_field_values():
    values = all_codes(E4M3).float()
    for code in range(256):
        ref = _e4m3_reference(code)
        got = float(values[code])
        assert (math.isnan(ref) and math.isnan(got)) or got == ref, hex(code)


def test_e4m3_nan_codes_are_exactly_0x7f_and_0xff():
    values = all_codes(E4M3).float()
    assert torch.isnan(values).nonzero().flatten().tolist() == [0x7F, 0xFF]
    assert not torch.isinf(values).any()


def test_e4m3_finite_codes_round_trip_to_the_same_code():
    values = all_codes(E4M3).float()
    finite = ~torch.isnan(values)
    back = cast_fp8(values[finite], E4M3).view(torch.uint8).long()
    assert torch.equal(back, torch.arange(256)[finite])


def test_e4m3_extremes():
    values = all_codes(E4M3).float()
    assert fp8_max(E4M3) == 448.0 == float(values[~values.isnan()].max())
    assert float(values[0x01]) == 2.0**-9  # smallest subnormal
    assert float(values[0x08]) == 2.0**-6  # smallest normal
    assert float(values[0x38]) == 1.0
    assert float(values[0x7E]) == 448.0


def test_cast_fp8_saturates_instead_of_nan():
    x = torch.tensor([1e6, -1e6, 449.0, 464.0])
    out = cast_fp8(x, E4M3).float()
    assert out.tolist() == [448.0, -448.0, 448.0, 448.0]


def test_e4m3_rounds_half_to_even_between_neighbours():
    # 1.0 and 1.125 are neighbours; 1.0625 is their midpoint -> even mantissa (1.0)
    x = torch.tensor([1.0625, 1.1875, 1.0626])
    assert cast_fp8(x, E4M3).float().tolist() == [1.0, 1.25, 1.125]


def test_e5m2_specials_and_round_trip():
    values = all_codes(E5M2).float()
    assert torch.isinf(values).nonzero().flatten().tolist() == [0x7C, 0xFC]
    assert torch.isnan(values).sum() == 6  # 0x7D-0x7F, 0xFD-0xFF
    finite = torch.isfinite(values)
    back = cast_fp8(values[finite], E5M2).view(torch.uint8).long()
    assert torch.equal(back, torch.arange(256)[finite])
    assert float(values[finite].max()) == fp8_max(E5M2) == 57344.0
