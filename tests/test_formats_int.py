"""Integer ranges, quantize/dequantize, and compressed-tensors int32 packing."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantscale.formats.intq import (
    dequantize_int,
    int_range,
    pack_int32,
    packed_words,
    quantize_int,
    unpack_int32,
)


def test_int_ranges():
    assert int_range(8) == (-128, 127)
    assert int_range(4) == (-8, 7)
    assert int_range(4, symmetric=False) == (-8, 7)
    with pytest.raises(ValueError):
        int_range(0)


def test_quantize_clamps_rounds_and_applies_zero_point():
    x = torch.tensor([-100.0, -1.26, 0.0, 1.24, 100.0])
    q = quantize_int(x, torch.tensor(0.5), bits=4)
    assert q.dtype == torch.int8 and q.tolist() == [-8, -3, 0, 2, 7]
    q2 = quantize_int(x, torch.tensor(0.5), torch.tensor(3.0), bits=4)
    assert q2.tolist() == [-8, 0, 3, 5, 7]
    assert dequantize_int(q2, torch.tensor(0.5), torch.tensor(3.0)).tolist() == [
        -5.5, -1.5, 0.0, 1.0, 2.0,
    ]  # fmt: skip


def test_four_bit_layout_by_hand():
    q = torch.tensor([[0, 1, -8, 7, 0, 0, 0, 0]], dtype=torch.int8)
    packed = pack_int32(q, 4)
    # offset +8: nibbles 8, 9, 0, 15, 8, 8, 8, 8 with element 0 in the lowest bits
    assert packed.dtype == torch.int32 and packed.shape == (1, 1)
    assert int(packed) & 0xFFFFFFFF == 0x8888F098


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(1, 70), st.integers(1, 3), st.randoms(use_true_random=False))
def test_pack_round_trip(bits, n, rows, rnd):
    lo, hi = int_range(bits)
    q = torch.tensor(
        [[rnd.randint(lo, hi) for _ in range(n)] for _ in range(rows)], dtype=torch.int8
    )
    packed = pack_int32(q, bits)
    assert packed.shape == (rows, packed_words(n, bits))
    assert torch.equal(unpack_int32(packed, bits, n), q)
    assert torch.equal(unpack_int32(pack_int32(q.t(), bits, dim=0), bits, n, dim=0), q.t())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 70), st.randoms(use_true_random=False))
def test_pack_matches_compressed_tensors(bits, n, rnd):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    lo, hi = int_range(bits)
    q = torch.tensor([[rnd.randint(lo, hi) for _ in range(n)] for _ in range(2)], dtype=torch.int8)
    ours = pack_int32(q, bits)
    assert torch.equal(ours, helpers.pack_to_int32(q, bits))
    assert torch.equal(helpers.unpack_from_int32(ours, bits, q.shape), q)
    assert torch.equal(pack_int32(q, bits, dim=0), helpers.pack_to_int32(q, bits, packed_dim=0))


def test_unpack_checks_word_count():
    with pytest.raises(ValueError):
        unpack_int32(torch.zeros(1, 2, dtype=torch.int32), 4, 8)


def test_pack_int32_in_row_chunks_equals_row_by_row():
    """A weight taller than one packing chunk (2^22 values) packs as its rows do one by one
    (chunk boundaries change nothing), and unpacks back."""
    from quantscale.formats.intq import pack_int32, unpack_int32

    q = torch.randint(-8, 8, ((1 << 16) + 3, 64), generator=torch.Generator().manual_seed(0))
    packed = pack_int32(q.to(torch.int8), 4)
    head = pack_int32(q[:5].to(torch.int8), 4)
    tail = pack_int32(q[-5:].to(torch.int8), 4)
    assert torch.equal(packed[:5], head) and torch.equal(packed[-5:], tail)
    assert torch.equal(unpack_int32(packed, 4, 64), q.to(torch.int8))
