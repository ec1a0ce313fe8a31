"""A Bloomier filter over 64-bit keys (Chazelle et al. 2004), in the form Weightless uses (pure numpy, no I/O).

A Bloomier filter stores a map ``key -> value`` for a set ``S`` of ``n`` keys, values in ``[1, 2**b)``, in a
table of ``m ~ 1.23 n`` cells of ``w = b + r`` bits, *without storing the keys*. A key of ``S`` always gets
its value back; any other key gets 0 ("not in the set") except for a fraction ``(2**b - 1) / 2**w``
(``< 2**-r``) of them, the false positives, which get a uniformly random value in ``[1, 2**b)``. Weightless
(Reagen et al. 2017) stores a pruned weight matrix this way: key = position, value = cluster index of a
non-zero weight, 0 = a pruned (zero) weight; the positions of the zeros cost nothing.

Hash functions (``docs/storage.md`` shows a plain-Python reader; every operation is modulo ``2**64``)::

    mix64(z):  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;  z = (z ^ (z >> 27)) * 0x94D049BB133111EB;  z ^ (z >> 31)
    salt_i  = mix64(seed + (i + 1) * 0x9E3779B97F4A7C15)            i = 0, 1, 2, 3
    h_i(x)  = mix64(x ^ salt_i)
    slot_i  = i * L + (((h_i(x) >> 32) * L) >> 32)                  i = 0, 1, 2: one cell in each third
    mask(x) = h_3(x) & (2**w - 1)
    y       = T[slot_0] ^ T[slot_1] ^ T[slot_2] ^ mask(x)
    lookup(x) = y if y < 2**b else 0

``mix64`` is the finaliser of splitmix64 (Steele, Lea, Flood 2014); ``L = m / 3`` is the length of each third
of the table ("segmented" 3-hypergraph as in XOR filters, Graf & Lemire 2020, so the three slots are always
distinct). Construction peels the hypergraph (a cell touched by exactly one remaining key is that key's own cell;
remove the key, repeat) and assigns the cells in reverse peeling order so that every key's XOR equals
``value ^ mask``. Peeling fails with a small probability (a 2-core remains): then the seed is incremented and
the build retried; the seed that worked is stored with the table. The same keys, values, bits and seed always
give the same table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_U64 = (1 << 64) - 1
_PHI = 0x9E3779B97F4A7C15
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
#: Cells per key (``m >= LOAD * n + EXTRA_CELLS``): 3-hypergraphs peel with high probability below 1/1.222.
LOAD = 1.23
EXTRA_CELLS = 32
#: Seeds tried (``seed, seed + 1, ...``) before a build gives up; the table grows by 5% after every 8 failures.
MAX_TRIES = 64
MAX_CELL_BITS = 24


def mix64_int(z: int) -> int:
    """``mix64`` (splitmix64's finaliser) of one Python int, modulo ``2**64``."""
    z &= _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def mix64(z: np.ndarray) -> np.ndarray:
    """``mix64`` of a ``uint64`` array (wrapping arithmetic, elementwise)."""
    z = np.asarray(z, dtype=np.uint64)
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def salts(seed: int) -> list[int]:
    """``salt_i = mix64(seed + (i + 1) * 0x9E3779B97F4A7C15)`` for ``i = 0..3`` (slots 0-2, mask 3)."""
    return [mix64_int(seed + (i + 1) * _PHI) for i in range(4)]


def hashes(keys: np.ndarray, seed: int, segment: int, cell_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Slots ``(n, 3) int64`` (slot ``i`` in ``[i * segment, (i + 1) * segment)``) and masks ``(n,) uint32``."""
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
    s = salts(seed)
    slots = np.empty((keys.size, 3), dtype=np.int64)
    for i in range(3):
        h = mix64(keys ^ np.uint64(s[i]))
        slots[:, i] = ((h >> np.uint64(32)) * np.uint64(segment)) >> np.uint64(32)
        slots[:, i] += i * segment
    mask = (mix64(keys ^ np.uint64(s[3])) & np.uint64((1 << cell_bits) - 1)).astype(np.uint32)
    return slots, mask


def num_segment_cells(n: int, load: float = LOAD, extra: int = EXTRA_CELLS) -> int:
    """``L``, the cells of each third of the table for ``n`` keys: ``ceil((load * n + extra) / 3)``."""
    return max(1, math.ceil((load * n + extra) / 3))


def pack_cells(cells: np.ndarray, cell_bits: int) -> bytes:
    """Cells of ``cell_bits`` bits as one bit stream, cell ``j`` at bits ``j*w .. j*w + w - 1``, least
    significant bit first, cut into bytes LSB first (``numpy.packbits(..., bitorder="little")``), zero-padded."""
    cells = np.asarray(cells, dtype=np.uint32)
    bits = ((cells[:, None] >> np.arange(cell_bits, dtype=np.uint32)) & 1).astype(np.uint8)  # (m, w)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def cells_at(data: bytes | np.ndarray, index: np.ndarray, cell_bits: int) -> np.ndarray:
    """Cells ``index`` (any shape) of a packed table (:func:`pack_cells`), read straight from the bytes:
    a lookup needs only its own 3 cells, not the whole table unpacked."""
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    index = np.asarray(index, dtype=np.int64)
    start = index * cell_bits  # first bit of each cell
    byte, shift = start >> 3, (start & 7).astype(np.uint32)
    padded = np.concatenate([buf, np.zeros(4, np.uint8)])  # a cell of <= 24 bits spans <= 4 bytes
    word = np.zeros(index.shape, dtype=np.uint64)
    for k in range(4):
        word |= padded[byte + k].astype(np.uint64) << np.uint64(8 * k)
    return ((word >> shift.astype(np.uint64)) & np.uint64((1 << cell_bits) - 1)).astype(np.uint32)


def unpack_cells(data: bytes, cells: int, cell_bits: int) -> np.ndarray:
    """All ``cells`` cells ``uint32`` of a packed table; a wrong byte length or nonzero padding raises ``ValueError``."""
    need = (cells * cell_bits + 7) // 8
    if len(data) != need:
        raise ValueError(f"{cells} cells of {cell_bits} bits need {need} bytes, got {len(data)}")
    stream = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
    if stream[cells * cell_bits :].any():
        raise ValueError("nonzero padding bits after the last cell")
    bits = stream[: cells * cell_bits].reshape(cells, cell_bits).astype(np.uint32)
    return (bits << np.arange(cell_bits, dtype=np.uint32)).sum(1, dtype=np.uint32)


def _peel(slots: np.ndarray, m: int) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Peel the 3-hypergraph (keys = edges over ``m`` cells) in rounds: every cell touched by exactly one
    remaining key gives that key and its own cell. Returns the rounds ``[(keys, cells), ...]`` or None
    when a 2-core remains (peeling failed). Keys peeled in one round never touch each other's own cells,
    so each round is assigned at once (:func:`build`)."""
    n = slots.shape[0]
    flat = slots.reshape(-1)
    owner = np.repeat(np.arange(n, dtype=np.int64), 3)
    count = np.bincount(flat, minlength=m)  # remaining keys per cell
    xor_key = np.zeros(m, dtype=np.int64)  # XOR of the remaining keys' numbers per cell
    np.bitwise_xor.at(xor_key, flat, owner)
    rounds, peeled = [], 0
    while peeled < n:
        single = np.flatnonzero(count == 1)
        if single.size == 0:
            return None
        keys, first = np.unique(xor_key[single], return_index=True)  # a key may be alone in two cells
        rounds.append((keys, single[first]))
        peeled += keys.size
        gone = slots[keys].reshape(-1)
        count -= np.bincount(gone, minlength=m)
        np.bitwise_xor.at(xor_key, gone, np.repeat(keys, 3))
    return rounds


@dataclass(frozen=True, eq=False)
class BloomierFilter:
    """A built filter: ``3 * segment`` cells of ``value_bits + check_bits`` bits (``table``, uint32), its seed.

    Build with :meth:`build`, query with :meth:`lookup`; :meth:`to_bytes` / :meth:`from_bytes` are the
    stored cell layout (:func:`pack_cells`).
    """

    seed: int
    value_bits: int
    check_bits: int
    segment: int
    table: np.ndarray  # (3 * segment,) uint32

    @property
    def cell_bits(self) -> int:
        return self.value_bits + self.check_bits

    @property
    def cells(self) -> int:
        return 3 * self.segment

    @property
    def false_positive_rate(self) -> float:
        """Probability that a key not in the set returns a nonzero value: ``(2**b - 1) / 2**(b + r)``."""
        return ((1 << self.value_bits) - 1) / (1 << self.cell_bits)

    @staticmethod
    def build(
        keys: np.ndarray,
        values: np.ndarray,
        value_bits: int,
        check_bits: int,
        seed: int = 0,
        *,
        load: float = LOAD,
        extra: int = EXTRA_CELLS,
        max_tries: int = MAX_TRIES,
    ) -> BloomierFilter:
        """Encode ``keys`` (distinct, ``uint64``) -> ``values`` (in ``[1, 2**value_bits)``).

        Tries ``seed``, ``seed + 1``, ... until the hypergraph peels (the stored ``seed`` is the one that did);
        after every 8 failed seeds the table grows by 5%. Raises ``ValueError`` on duplicate keys, values out
        of range, or when ``max_tries`` seeds fail (practically impossible at the default ``load``).
        """
        keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
        values = np.asarray(values).reshape(-1)
        if values.shape != keys.shape:
            raise ValueError(f"{keys.size} keys but {values.size} values")
        if not (
            isinstance(value_bits, int)
            and isinstance(check_bits, int)
            and 1 <= value_bits
            and 0 <= check_bits
            and value_bits + check_bits <= MAX_CELL_BITS
        ):
            raise ValueError(
                f"need value_bits >= 1, check_bits >= 0, value_bits + check_bits <= {MAX_CELL_BITS}; "
                f"got {value_bits}, {check_bits}"
            )
        if values.size and (values.min() < 1 or values.max() >= 1 << value_bits):
            raise ValueError(f"values must lie in [1, {1 << value_bits}) (0 means 'not in the set')")
        if np.unique(keys).size != keys.size:
            raise ValueError("keys must be distinct")
        if not 0 <= seed <= _U64:
            raise ValueError("seed must lie in [0, 2**64)")
        values = values.astype(np.uint32)
        cell_bits = value_bits + check_bits
        segment = num_segment_cells(keys.size, load, extra)
        for attempt in range(max_tries):
            if attempt and attempt % 8 == 0:
                segment = math.ceil(segment * 1.05)
            s = (seed + attempt) & _U64
            slots, mask = hashes(keys, s, segment, cell_bits)
            rounds = _peel(slots, 3 * segment)
            if rounds is None:
                continue
            table = np.zeros(3 * segment, dtype=np.uint32)
            target = values ^ mask
            for peeled, own in reversed(rounds):  # the last peeled first: a key's own cell is set last
                sl = slots[peeled]
                table[own] = target[peeled] ^ table[sl[:, 0]] ^ table[sl[:, 1]] ^ table[sl[:, 2]]  # own cell is 0 here
            return BloomierFilter(s, value_bits, check_bits, segment, table)
        raise ValueError(f"the hypergraph of {keys.size} keys did not peel with {max_tries} seeds from {seed}")

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Values ``uint32`` of ``keys`` (any shape): the stored value, 0 for a key not in the set, or (false
        positive, probability :attr:`false_positive_rate`) a random value in ``[1, 2**value_bits)``."""
        keys = np.asarray(keys, dtype=np.uint64)
        slots, mask = hashes(keys, self.seed, self.segment, self.cell_bits)
        t = self.table
        y = t[slots[:, 0]] ^ t[slots[:, 1]] ^ t[slots[:, 2]] ^ mask
        return np.where(y < (1 << self.value_bits), y, 0).astype(np.uint32).reshape(keys.shape)

    def to_bytes(self) -> bytes:
        """The table as stored: ``ceil(cells * cell_bits / 8)`` bytes (:func:`pack_cells`)."""
        return pack_cells(self.table, self.cell_bits)

    @staticmethod
    def from_bytes(data: bytes, *, seed: int, value_bits: int, check_bits: int, cells: int) -> BloomierFilter:
        """The filter of a stored table (``cells`` must be a multiple of 3)."""
        if cells < 3 or cells % 3:
            raise ValueError(f"cells must be a positive multiple of 3, got {cells}")
        return BloomierFilter(
            seed, value_bits, check_bits, cells // 3, unpack_cells(data, cells, value_bits + check_bits)
        )


def lookup_packed(
    data: bytes, keys: np.ndarray, *, seed: int, value_bits: int, cell_bits: int, cells: int
) -> np.ndarray:
    """:meth:`BloomierFilter.lookup` on a stored table without unpacking it: reads only the 3 cells of each key
    (a head's few hundred keys out of a block's tens of thousands of cells)."""
    keys = np.asarray(keys, dtype=np.uint64)
    slots, mask = hashes(keys, seed, cells // 3, cell_bits)
    c = cells_at(data, slots, cell_bits)  # (n, 3)
    y = c[:, 0] ^ c[:, 1] ^ c[:, 2] ^ mask
    return np.where(y < (1 << value_bits), y, 0).astype(np.uint32).reshape(keys.shape)


__all__ = [
    "EXTRA_CELLS",
    "LOAD",
    "BloomierFilter",
    "cells_at",
    "hashes",
    "lookup_packed",
    "mix64",
    "mix64_int",
    "num_segment_cells",
    "pack_cells",
    "salts",
    "unpack_cells",
]
