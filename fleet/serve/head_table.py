"""Every head of a fleet version resident in memory in its quantized form: :class:`HeadTable`.

``FleetModel.open(..., heads="resident")`` reads each heads part once (checksum verified) and keeps,
for all C campaigns, contiguous numpy arrays instead of Python objects:

- ``ids``: the campaign ids, sorted, as one fixed-width bytes array ``S<w>`` (``w`` = the longest id);
  a lookup is one vectorised :func:`numpy.searchsorted` for all the ids of a request;
- ``packed`` (uint8) and ``scales`` (float16): every row's ``packed`` / ``scales`` bytes end to end,
  with one start offset per campaign; the byte counts follow from the row's format;
- ``fmt``: per campaign an index into a small table of formats ``(bits, group_size, num_params,
  num_stored, masked)``; ``status``: per campaign an index into the distinct status strings;
- ``masks``: the pruning bitmaps of the pruned rows only (offsets per campaign when any row has one).

:meth:`HeadTable.decode_into` dequantizes only the rows a request needs, one vectorised
:func:`fleet.compression.quant.dequantize_codes` call per format present among them, straight into the caller's
``(M, P)`` buffer (a smaller design's row into the columns of the wider one it is widened to). So the heads cost about
their Parquet bytes (minus the hashes and fidelity columns, which serving does not read) plus
~10 bytes of offsets and codes per campaign, and no request ever reads storage.

Every row is checked against the heads contract at open (vectorised, :func:`fleet.formats.codec.check_head_row`'s
rules for the columns serving reads: bits, shape, group size, byte lengths of packed, scales and mask,
status; ids valid, sorted and unique): a row that breaks it is a :class:`~fleet.core.errors.StoreError`
naming the campaign. Codes are checked (padding bits, symmetric range) the first time a request decodes
them, as on the LRU path; a row that passed is marked (one bool per campaign) and not checked again.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fleet.compression.quant import dequantize_codes, num_groups
from fleet.core.constants import NAME_PATTERN, SUPPORTED_BITS
from fleet.core.errors import StoreError

#: The heads columns serving reads (the hashes and fidelity columns stay in Parquet).
COLUMNS = ("campaign_id", "bits", "shape", "group_size", "packed", "scales", "mask", "status")
_FMT_FIELDS = 5  # bits, group_size, num_params, num_stored, masked


def _binary_parts(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(starts int64[n], lengths int64[n], data uint8[...])`` of a binary / string column (one chunk
    made of it, no copy of the bytes); null entries have length 0."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4).astype(np.int64)
    data_buf = arr.buffers()[2]
    data = np.zeros(0, np.uint8) if data_buf is None else np.frombuffer(data_buf, dtype=np.uint8)
    lengths = np.diff(offsets)
    if arr.null_count:
        lengths[arr.is_null().to_numpy(zero_copy_only=False)] = 0
    return offsets[:-1], lengths, data


def _gather(data: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """``data[starts[i] : starts[i] + width]`` for every i: ``(n, width)``, one row gather from a strided
    view of windows (each start must leave ``width`` items: the offsets of a built table do)."""
    if len(data) < width:  # no window fits (only when there is nothing to gather)
        return np.zeros((len(starts), width), dtype=data.dtype)
    windows = np.lib.stride_tricks.as_strided(
        data, shape=(len(data) - width + 1, width), strides=(data.strides[0], data.strides[0]), writeable=False
    )
    return windows[starts]


def _fixed_width_ids(column: pa.ChunkedArray) -> np.ndarray:
    """A string column as a fixed-width bytes array ``S<w>`` (``w`` its longest value), vectorised."""
    starts, lengths, data = _binary_parts(column)
    width = int(lengths.max()) if len(lengths) else 1
    out = np.zeros((len(lengths), max(width, 1)), dtype=np.uint8)
    for j in range(width):  # one pass per character position (ids are at most 128 characters)
        rows = np.flatnonzero(lengths > j)
        out[rows, j] = data[starts[rows] + j]
    return out.view(f"S{max(width, 1)}").reshape(-1)


def release_free_memory() -> None:
    """Hand memory freed after a build back to the OS: Arrow's pool, and glibc's heap (``malloc_trim``; a
    no-op elsewhere). Building the table of 1M heads frees ~200 MB of per-part buffers that the allocators
    would otherwise keep resident (measured: RSS 594 -> 402 MB)."""
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class HeadTable:
    """All heads of a version, quantized, in contiguous arrays; build it with :meth:`from_version`.

    Attributes:
        ids: ``S<w>[C]`` sorted campaign ids.
        status: ``uint8/uint16[C]`` index into :attr:`status_names`.
        status_names: the distinct head statuses.
        formats: ``int64[F, 5]`` rows ``(bits, group_size, num_params, num_stored, masked)``.
    """

    def __init__(
        self,
        ids: np.ndarray,
        fmt: np.ndarray,
        formats: np.ndarray,
        status: np.ndarray,
        status_names: list[str],
        packed: np.ndarray,
        packed_start: np.ndarray,
        scales: np.ndarray,
        scales_start: np.ndarray,
        masks: np.ndarray,
        mask_start: np.ndarray | None,
    ):
        self.ids = ids
        self.fmt = fmt
        self.formats = formats
        self.status = status
        self.status_names = status_names
        self.packed = packed
        self.packed_start = packed_start
        self.scales = scales
        self.scales_start = scales_start
        self.masks = masks
        self.mask_start = mask_start
        self.checked = np.zeros(len(ids), dtype=bool)  # rows whose codes passed their check once

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """Bytes of every array the table holds."""
        arrays = (
            self.ids,
            self.fmt,
            self.formats,
            self.status,
            self.packed,
            self.packed_start,
            self.scales,
            self.scales_start,
            self.masks,
            self.mask_start,
            self.checked,
        )
        return sum(a.nbytes for a in arrays if a is not None)

    # ------------------------------------------------------------------ build

    @classmethod
    def from_version(cls, version, sizes: Sequence[int]) -> HeadTable:
        """Read every heads part of ``version`` (a :class:`fleet.storage.store.FleetVersion`; each part checksum
        verified as read, one part in memory at a time) into a table. ``sizes``: the head sizes
        (``num_params``) the backbone can score; a row of another size is a :class:`StoreError`."""
        builder = _Builder(version.uri, tuple(int(s) for s in sizes))
        for table in version.iter_heads(COLUMNS):
            builder.add(table)
        out = builder.finish()
        del builder, table
        release_free_memory()
        return out

    # ------------------------------------------------------------------ lookup

    def find(self, campaign_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Row of each id (``int64[K]``), -1 where the version has no such campaign. Ids must be valid
        campaign ids (ASCII), as ``str`` or already encoded (``S<w>`` array, :func:`fleet.core.ids.encode_campaign_ids`);
        one vectorised binary search for all of them."""
        n = len(campaign_ids)
        if n == 0 or len(self.ids) == 0:
            return np.full(n, -1, dtype=np.int64)
        width = self.ids.dtype.itemsize
        query = campaign_ids if isinstance(campaign_ids, np.ndarray) else np.array(campaign_ids, dtype="S")
        hit = np.ones(n, dtype=bool)
        if query.dtype.itemsize > width:  # an id longer than every stored one is absent
            hit = np.char.str_len(query) <= width
            query = query.astype(f"S{width}")  # (the truncated ones are masked out by `hit`)
        pos = np.searchsorted(self.ids, query)
        clipped = np.minimum(pos, len(self.ids) - 1)
        hit &= (self.ids[clipped] == query) & (pos < len(self.ids))
        return np.where(hit, clipped, -1).astype(np.int64)

    def campaign_ids(self, rows: np.ndarray) -> list[str]:
        """The ids of ``rows`` as ``str``."""
        return [b.decode("ascii") for b in self.ids[rows].tolist()]

    def statuses(self, rows: np.ndarray) -> list[str]:
        names = self.status_names
        return [names[c] for c in self.status[rows].tolist()]

    # ------------------------------------------------------------------ decode

    def decode_into(
        self, rows: np.ndarray, out: np.ndarray, columns: Mapping[int, Sequence[tuple[int, int, int]]]
    ) -> None:
        """Dequantize ``rows`` (``int64[M]``) into ``out`` (float32 ``(M, P)``, zeros where nothing is written):
        row ``i``, a head of ``size`` parameters, goes to ``out[i]`` by the runs ``columns[size]``, each
        ``(source, target, length)``: ``out[i, target : target + length] = head[source : source + length]``
        (a size not in ``columns``: its first ``size`` columns). One vectorised :func:`fleet.compression.quant.dequantize_codes`
        per format among the rows (pruned entries 0). Codes with nonzero padding bits or outside the symmetric
        range are a :class:`StoreError` naming the campaign; rows that passed once are not checked again
        (:attr:`checked`)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        codes = self.fmt[rows]
        first = codes[0]
        if len(rows) == 1 or (codes == first).all():  # one format (the single-sequence hot path): no grouping
            groups = [(int(first), slice(None))]
        else:  # the rows of each format (a bincount: a few distinct small codes)
            present = np.flatnonzero(np.bincount(codes, minlength=len(self.formats))).tolist()
            groups = [(code, np.flatnonzero(codes == code)) for code in present]
        check = not self.checked[rows].all()
        for code, sel in groups:
            bits, group, size, stored, masked = self.formats[code].tolist()
            picked = rows[sel]
            width = 2 * stored if bits == 16 else -(-stored * bits // 8)
            packed = _gather(self.packed, self.packed_start[picked], width)
            scales = None if bits == 16 else _gather(self.scales, self.scales_start[picked], num_groups(stored, group))
            try:
                values = dequantize_codes(packed, scales, bits, stored, group, check=check)  # (n, stored)
            except ValueError as err:
                raise StoreError(
                    f"head does not decode: {err}",
                    campaign_id=self._undecodable(picked, packed, scales, bits, stored, group),
                ) from None
            if masked:
                keep = np.unpackbits(
                    _gather(self.masks, self.mask_start[picked], (size + 7) // 8), axis=1, count=size, bitorder="little"
                ).astype(bool)  # (n, size)
                full = np.zeros((len(picked), size), dtype=np.float32)
                full[keep] = values.reshape(-1)  # each row keeps exactly `stored` entries
                values = full
            for source, target, length in columns.get(size, ((0, 0, size),)):
                out[sel, target : target + length] = values[:, source : source + length]
        if check:
            self.checked[rows] = True

    def _undecodable(
        self, picked: np.ndarray, packed: np.ndarray, scales: np.ndarray | None, bits: int, stored: int, group: int
    ) -> str:
        """The id of the first of ``picked`` whose codes do not decode on their own."""
        for i in range(len(picked)):
            try:
                dequantize_codes(packed[i : i + 1], None if scales is None else scales[i : i + 1], bits, stored, group)
            except ValueError:
                return self.campaign_ids(picked[i : i + 1])[0]
        return self.campaign_ids(picked[:1])[0]  # pragma: no cover - a group fails only through one of its rows


class _Builder:
    """Accumulates parts (checked) into the arrays of a :class:`HeadTable`."""

    def __init__(self, uri: str, sizes: tuple[int, ...]):
        self.uri = uri
        self.sizes = sizes
        self.ids: list[np.ndarray] = []
        self.fmt: list[np.ndarray] = []
        self.formats: dict[tuple[int, ...], int] = {}
        self.status: list[np.ndarray] = []
        self.status_names: dict[str, int] = {}
        self.packed: list[np.ndarray] = []
        self.scales: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.packed_start: list[np.ndarray] = []
        self.scales_start: list[np.ndarray] = []
        self.mask_start: list[np.ndarray] = []
        self.offsets = [0, 0, 0]  # bytes of packed, float16 scales, mask bytes so far
        self.any_mask = False

    def _bad(self, ids: pa.ChunkedArray, where: np.ndarray, reason: str) -> StoreError:
        row = int(np.flatnonzero(where)[0])
        return StoreError(f"invalid head row: {reason}", campaign_id=ids[row].as_py(), path=self.uri)

    def add(self, table: pa.Table) -> None:
        n = table.num_rows
        if n == 0:
            return
        ids = table.column("campaign_id")
        ok = pc.match_substring_regex(ids, f"^{NAME_PATTERN.pattern}$").to_numpy(zero_copy_only=False)
        if not ok.all():
            bad = ids[int(np.flatnonzero(~ok)[0])].as_py()
            raise StoreError(f"invalid campaign id {str(bad)[:40]!r} in heads", path=self.uri)
        bits = table.column("bits").to_numpy().astype(np.int64)
        if not np.isin(bits, SUPPORTED_BITS).all():
            raise self._bad(ids, ~np.isin(bits, SUPPORTED_BITS), f"bits not in {SUPPORTED_BITS}")
        # shape: a non-empty list of positive ints; num_params = its product
        shape = table.column("shape").combine_chunks()
        dims = pc.list_value_length(shape).to_numpy(zero_copy_only=False)
        flat = shape.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        if (dims < 1).any():
            raise self._bad(ids, dims < 1, "shape must be a non-empty list of positive ints")
        if (flat < 1).any():
            owner = np.repeat(np.arange(n), dims)
            raise self._bad(
                ids, np.isin(np.arange(n), owner[flat < 1]), "shape must be a non-empty list of positive ints"
            )
        size = np.multiply.reduceat(flat, np.concatenate([[0], np.cumsum(dims)[:-1]])) if n else flat
        if not np.isin(size, self.sizes).all():
            raise self._bad(
                ids,
                ~np.isin(size, self.sizes),
                f"head size fits none of the backbone's head designs {list(self.sizes)}",
            )
        group = table.column("group_size").to_numpy().astype(np.int64)
        if ((bits != 16) & (group < 1)).any():
            raise self._bad(ids, (bits != 16) & (group < 1), "group_size must be >= 1")
        group = np.where(bits == 16, 1, group)  # ignored at 16 bits
        # masks: ceil(n/8) bytes; stored = kept parameters
        m_start, m_len, m_data = _binary_parts(table.column("mask"))
        masked = ~table.column("mask").is_null().to_numpy(zero_copy_only=False)
        if (masked & (m_len != (size + 7) // 8)).any():
            raise self._bad(ids, masked & (m_len != (size + 7) // 8), "mask length is not ceil(num_params / 8)")
        stored = size.copy()
        for s in np.unique(size[masked]).tolist():
            rows = np.flatnonzero(masked & (size == s))
            bits_of = np.unpackbits(_gather(m_data, m_start[rows], (s + 7) // 8), axis=1, count=s, bitorder="little")
            stored[rows] = bits_of.sum(1)
        p_start, p_len, p_data = _binary_parts(table.column("packed"))
        want = (stored * bits + 7) // 8
        if (p_len != want).any():
            raise self._bad(ids, p_len != want, "packed has the wrong number of bytes for its values and bits")
        s_start, s_len, s_data = _binary_parts(table.column("scales"))
        want = np.where(bits == 16, 0, 2 * (-(-stored // group)))
        if (s_len != want).any():
            raise self._bad(ids, s_len != want, "scales has the wrong number of bytes (float16 per group)")
        # finite parameters: every scale, and every float16 value of a 16-bit row (codes are bounded
        # integers, so then every dequantized value is finite: decode needs no check per request)
        lo, hi = int(s_start[0]), int(s_start[-1] + s_len[-1])
        bad = ~np.isfinite(s_data[lo:hi].view("<f2"))  # the scales of all rows, end to end
        if bad.any():
            owner = np.repeat(np.arange(n), s_len // 2)
            raise self._bad(ids, np.isin(np.arange(n), owner[bad]), "a scale is not finite")
        for k in np.unique(stored[bits == 16]).tolist():
            rows = np.flatnonzero((bits == 16) & (stored == k))
            bad = ~np.isfinite(_gather(p_data, p_start[rows], 2 * k).view("<f2")).all(1)
            if bad.any():
                raise self._bad(ids, np.isin(np.arange(n), rows[bad]), "a float16 value is not finite")
        status = table.column("status").combine_chunks()
        if (pc.utf8_length(status).to_numpy(zero_copy_only=False) == 0).any():
            raise self._bad(ids, pc.utf8_length(status).to_numpy(zero_copy_only=False) == 0, "status is empty")
        # formats -> codes
        # (one 1-D unique per field, then of their combined index: np.unique(axis=0) sorts rows, 20x slower)
        fields = [np.unique(f, return_inverse=True) for f in (bits, group, size, stored, masked.astype(np.int64))]
        combined = np.ravel_multi_index([inv.reshape(-1) for _, inv in fields], [len(u) for u, _ in fields])
        _, first, inverse = np.unique(combined, return_index=True, return_inverse=True)
        keys = np.stack([bits, group, size, stored, masked.astype(np.int64)], axis=1)[first]  # (F, 5)
        mapping = np.array([self.formats.setdefault(tuple(int(v) for v in k), len(self.formats)) for k in keys])
        self.fmt.append(mapping[inverse.reshape(-1)])
        enc = pc.dictionary_encode(status)
        names = np.array(
            [self.status_names.setdefault(v, len(self.status_names)) for v in enc.dictionary.to_pylist()],
            dtype=np.int64,
        )
        self.status.append(names[enc.indices.to_numpy(zero_copy_only=False)])
        self.ids.append(_fixed_width_ids(ids))
        # the bytes of each binary column, end to end, rebased (the rows of an Arrow binary array are contiguous;
        # null masks take no bytes)
        columns = (
            (p_start, p_len, p_data, self.packed, self.packed_start, 1),
            (s_start, s_len, s_data, self.scales, self.scales_start, 2),
            (m_start, m_len, m_data, self.masks, self.mask_start, 1),
        )
        for k, (start, length, data, out, starts, unit) in enumerate(columns):
            if k == 2 and not masked.any():
                starts.append(np.full(n, -1, dtype=np.int64))
                continue
            lo, hi = int(start[0]), int(start[-1] + length[-1])
            chunk = data[lo:hi].copy()
            out.append(chunk if unit == 1 else chunk.view("<f2"))
            starts.append((start - lo + self.offsets[k]) // unit)
            self.offsets[k] += hi - lo
        self.any_mask = self.any_mask or bool(masked.any())

    def finish(self) -> HeadTable:
        def cat(parts: list[np.ndarray], dtype) -> np.ndarray:
            return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, "S1")
        if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():
            i = int(np.flatnonzero(~(ids[1:] > ids[:-1]))[0]) + 1
            raise StoreError(
                "heads are not sorted by campaign id, or hold a duplicate",
                campaign_id=ids[i].decode("ascii"),
                path=self.uri,
            )
        offset_type = np.uint32 if max(self.offsets) < 2**32 else np.int64
        return HeadTable(
            ids=ids,
            fmt=cat(self.fmt, np.uint8 if len(self.formats) <= 256 else np.int32),
            formats=np.array(list(self.formats), dtype=np.int64).reshape(-1, _FMT_FIELDS),
            status=cat(self.status, np.uint8 if len(self.status_names) <= 256 else np.int32),
            status_names=list(self.status_names),
            packed=cat(self.packed, np.uint8),
            packed_start=cat(self.packed_start, offset_type),
            scales=cat(self.scales, "<f2"),
            scales_start=cat(self.scales_start, offset_type),
            masks=cat(self.masks, np.uint8),
            mask_start=cat(self.mask_start, np.int64) if self.any_mask else None,
        )


__all__ = ["COLUMNS", "HeadTable"]
