"""fleet.compression.bloomier: the Bloomier filter (stored keys return their value, false positives at the documented
rate, deterministic for a seed) and a plain-Python reader built from the documented hash functions only."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.compression.bloomier import (
    BloomierFilter,
    cells_at,
    lookup_packed,
    mix64,
    mix64_int,
    pack_cells,
    unpack_cells,
)

# --------------------------------------------------------------------------- a reader from the docstring alone
# Written from fleet/compression/bloomier.py's module docstring (= docs/storage.md), with Python ints: no fleet code.

M64 = (1 << 64) - 1


def ref_mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_lookup(table: bytes, cells: int, cell_bits: int, value_bits: int, seed: int, key: int) -> int:
    stream = int.from_bytes(table, "little")  # the LSB-first bit stream as one integer
    length = cells // 3
    salt = [ref_mix64((seed + (i + 1) * 0x9E3779B97F4A7C15) & M64) for i in range(4)]
    h = [ref_mix64(key ^ s) for s in salt]
    y = h[3] & ((1 << cell_bits) - 1)
    for i in range(3):
        slot = i * length + (((h[i] >> 32) * length) >> 32)
        y ^= (stream >> (slot * cell_bits)) & ((1 << cell_bits) - 1)
    return y if y < (1 << value_bits) else 0


# --------------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    n=st.integers(0, 300),
    value_bits=st.integers(1, 8),
    check_bits=st.integers(0, 6),
    seed=st.integers(0, 2**64 - 1),
)
def test_every_stored_key_returns_its_value(data, n, value_bits, check_bits, seed):
    keys = data.draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n, unique=True))
    values = data.draw(st.lists(st.integers(1, 2**value_bits - 1), min_size=n, max_size=n))
    f = BloomierFilter.build(np.array(keys, np.uint64), np.array(values), value_bits, check_bits, seed)
    assert f.lookup(np.array(keys, np.uint64)).tolist() == values
    stored = f.to_bytes()
    assert len(stored) == (f.cells * f.cell_bits + 7) // 8
    packed = lookup_packed(
        stored, np.array(keys, np.uint64), seed=f.seed, value_bits=value_bits, cell_bits=f.cell_bits, cells=f.cells
    )
    assert packed.tolist() == values
    again = BloomierFilter.from_bytes(stored, seed=f.seed, value_bits=value_bits, check_bits=check_bits, cells=f.cells)
    np.testing.assert_array_equal(again.table, f.table)
    for key, value in list(zip(keys, values))[:5]:
        assert ref_lookup(stored, f.cells, f.cell_bits, value_bits, f.seed, key) == value


@pytest.mark.parametrize("value_bits, check_bits", [(3, 4), (1, 6), (4, 0), (2, 2)])
def test_false_positive_rate_on_absent_keys_is_documented_rate(value_bits, check_bits):
    rng = np.random.default_rng(value_bits * 10 + check_bits)
    keys = rng.choice(2**40, size=4000, replace=False).astype(np.uint64)
    f = BloomierFilter.build(keys, rng.integers(1, 2**value_bits, size=keys.size), value_bits, check_bits, seed=3)
    absent = (rng.choice(2**40, size=100_000, replace=False) + 2**41).astype(np.uint64)  # disjoint from keys
    got = f.lookup(absent)
    rate = f.false_positive_rate
    assert rate == pytest.approx((2**value_bits - 1) / 2 ** (value_bits + check_bits)) and rate <= 2.0**-check_bits
    measured = float((got != 0).mean())
    sd = (rate * (1 - rate) / absent.size) ** 0.5
    assert abs(measured - rate) < 5 * sd + 1e-9, (measured, rate)
    if value_bits > 1:  # a false positive's value is uniform over [1, 2**b)
        counts = np.bincount(got[got != 0], minlength=2**value_bits)[1:]
        assert counts.min() > 0.7 * counts.mean()


def test_same_inputs_same_bytes_and_another_seed_another_table():
    rng = np.random.default_rng(0)
    keys = rng.choice(2**50, size=2000, replace=False).astype(np.uint64)
    values = rng.integers(1, 8, size=keys.size)
    a, b = (BloomierFilter.build(keys, values, 3, 5, seed=11) for _ in range(2))
    assert a.seed == b.seed == 11 and a.to_bytes() == b.to_bytes()
    c = BloomierFilter.build(keys, values, 3, 5, seed=12)
    assert c.to_bytes() != a.to_bytes() and c.lookup(keys).tolist() == values.tolist()
    assert a.cells == 3 * math.ceil((1.23 * 2000 + 32) / 3)  # ~1.23 cells per key


def test_a_build_that_does_not_peel_retries_with_the_next_seed_and_a_larger_table():
    """At one cell per key a 3-hypergraph never peels: the build moves on to seed + 1, ... and grows the table
    by 5% every 8 seeds until it peels; the stored seed is the one that worked."""
    rng = np.random.default_rng(1)
    keys = rng.choice(2**40, size=3000, replace=False).astype(np.uint64)
    values = rng.integers(1, 4, size=keys.size)
    f = BloomierFilter.build(keys, values, 2, 3, seed=100, load=1.0, extra=0)
    assert f.seed >= 100 + 8 and f.cells > 3000
    assert f.lookup(keys).tolist() == values.tolist()
    with pytest.raises(ValueError, match="did not peel"):
        BloomierFilter.build(keys, values, 2, 3, seed=100, load=1.0, extra=0, max_tries=4)


def test_build_refuses_bad_input():
    keys = np.array([1, 2, 3], np.uint64)
    with pytest.raises(ValueError, match="distinct"):
        BloomierFilter.build(np.array([1, 1], np.uint64), [1, 2], 2, 2)
    with pytest.raises(ValueError, match="values must lie in"):
        BloomierFilter.build(keys, [0, 1, 2], 2, 2)  # 0 is "not in the set"
    with pytest.raises(ValueError, match="values must lie in"):
        BloomierFilter.build(keys, [1, 2, 4], 2, 2)
    with pytest.raises(ValueError, match="value_bits"):
        BloomierFilter.build(keys, [1, 1, 1], 0, 2)
    with pytest.raises(ValueError, match="bytes"):
        unpack_cells(b"\x00", 3, 4)
    with pytest.raises(ValueError, match="padding"):
        unpack_cells(b"\x00\xf0", 3, 4)


def test_mix64_is_splitmix64s_finaliser_and_cells_pack_lsb_first():
    # splitmix64 with state 0: the first output is mix64(0x9E3779B97F4A7C15) = 0xE220A8397B1DCDAF
    assert mix64_int(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF
    z = np.array([0, 1, 2**63, 0x9E3779B97F4A7C15], np.uint64)
    assert mix64(z).tolist() == [mix64_int(int(v)) for v in z]
    data = pack_cells(np.array([0b101, 0b011, 0b110]), 3)  # bits 101 | 110 | 011 (LSB first) -> 0b10_011_101, 0b1
    assert data == bytes([0b10011101, 0b1])
    assert cells_at(data, np.array([2, 0, 1]), 3).tolist() == [0b110, 0b101, 0b011]
    assert unpack_cells(data, 3, 3).tolist() == [0b101, 0b011, 0b110]
