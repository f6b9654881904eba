import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import pack, packed_width, unpack


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 5), cols=st.integers(1, 50), seed=st.integers(0, 1000))
def test_pack_unpack_round_trip(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, packed_width(cols, bits))
    assert torch.equal(unpack(packed, bits, cols), codes)


def test_packing_is_dense():
    codes = torch.ones(1, 8, dtype=torch.uint8)
    assert pack(codes, 3).shape[1] == 3  # 24 bits
    assert pack(codes, 1).tolist() == [[255]]


def test_code_too_large():
    with pytest.raises(ValueError, match="does not fit"):
        pack(torch.full((1, 4), 4, dtype=torch.uint8), 2)


def test_wrong_width():
    with pytest.raises(ValueError, match="does not match"):
        unpack(torch.zeros(1, 3, dtype=torch.uint8), 4, 7)
