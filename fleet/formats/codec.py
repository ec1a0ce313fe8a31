"""Heads rows <-> Arrow tables (schemas ``fleet-heads/1.1`` and ``fleet-heads/2.0``) and the rejects table. No I/O.

The schema and the bit packing of ``packed`` are a contract with every Parquet reader (pyarrow,
DuckDB, Spark) and with :mod:`fleet.compression.quant`; both are documented in ``docs/storage.md`` and pinned
by ``tests/test_codec.py``. Change them only with a new format version: a new minor version may
only add nullable columns at the end (older minors read with them None, :func:`conform_heads_table`);
anything else is a new major version.

Two formats are written. A table of packed heads only (the default codec) is ``fleet-heads/1.1``, byte for
byte what earlier fleets wrote and read. A table with heads of the ``bloomier`` codec (:mod:`fleet.compression.weightless`)
is ``fleet-heads/2.0``: the 1.1 columns plus ``codec`` and ``bloomier`` (a block's filter, on its first row);
its rows are not self-contained (a head decodes with its block), which is why it is a new major version that a
1.x reader refuses. This fleet reads both (:data:`READ_MAJORS`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fleet.compression.weightless import MAX_VALUE_BITS, WeightlessBlock
from fleet.core.constants import (
    CODECS,
    DATA_FINGERPRINT_BYTES,
    HEADS_FORMAT,
    HEADS_FORMAT_V2,
    REJECTS_FORMAT,
    SUPPORTED_BITS,
    TEACHER_SHA256_BYTES,
    Codec,
)
from fleet.core.errors import InvalidCampaignIdError, StoreError
from fleet.core.ids import validate_campaign_id

#: Major versions of ``fleet-heads`` this fleet reads.
READ_MAJORS = (1, 2)

#: Rejects keep at most this many characters of a (possibly invalid) campaign id.
MAX_REJECT_ID_CHARS = 256

#: Head ``status`` values of a head that did NOT pass its per-campaign quality gate (stored anyway,
#: best effort): ``"fallback"`` (failed at the largest head and 16 bits) and the older ``"gate_failed"``.
#: Every other status passed: ``"ok"``, ``"capacity"`` (passed with a larger head), ``"fp16_fallback"``
#: (older: stored at 16 bits). The one home of this rule: serving, HTTP, pyfunc and CLI use :func:`head_passed`.
FAILED_STATUSES = ("fallback", "gate_failed")


def head_passed(status: str | None) -> bool:
    """True when a head row's ``status`` says it passed its quality gate (not in :data:`FAILED_STATUSES`)."""
    return status not in FAILED_STATUSES


HEADS_SCHEMA = pa.schema(
    [
        pa.field("campaign_id", pa.string(), nullable=False),
        pa.field("bits", pa.int8(), nullable=False),
        pa.field("shape", pa.list_(pa.int32()), nullable=False),
        pa.field("group_size", pa.int32(), nullable=False),
        pa.field("packed", pa.binary(), nullable=False),
        pa.field("scales", pa.binary(), nullable=False),
        pa.field("mask", pa.binary(), nullable=True),
        pa.field("teacher_sha256", pa.binary(), nullable=False),
        pa.field("data_fingerprint", pa.binary(), nullable=False),
        pa.field("teacher_auc", pa.float32(), nullable=True),
        pa.field("student_auc", pa.float32(), nullable=True),
        pa.field("mean_abs_diff", pa.float32(), nullable=True),
        pa.field("agreement", pa.float32(), nullable=True),
        pa.field("n_train", pa.int32(), nullable=True),
        pa.field("n_holdout", pa.int32(), nullable=True),
        pa.field("status", pa.string(), nullable=False),
        # added in fleet-heads/1.1 (null in 1.0 files): fleet.compression.metrics.CALIBRATION_KEYS, in that order
        pa.field("kl", pa.float32(), nullable=True),
        pa.field("brier_vs_teacher", pa.float32(), nullable=True),
        pa.field("mean_ratio", pa.float32(), nullable=True),
        pa.field("student_log_loss", pa.float32(), nullable=True),
        pa.field("teacher_log_loss", pa.float32(), nullable=True),
        pa.field("student_brier", pa.float32(), nullable=True),
        pa.field("teacher_brier", pa.float32(), nullable=True),
        pa.field("student_ece", pa.float32(), nullable=True),
        pa.field("teacher_ece", pa.float32(), nullable=True),
    ],
    metadata={"format": HEADS_FORMAT},
)

#: The ``bloomier`` column of ``fleet-heads/2.0``: a block's filter, on the block's first row (null elsewhere).
BLOOMIER_TYPE = pa.struct(
    [
        pa.field("rows", pa.int32(), nullable=False),
        pa.field("seed", pa.uint64(), nullable=False),
        pa.field("value_bits", pa.int8(), nullable=False),
        pa.field("cell_bits", pa.int8(), nullable=False),
        pa.field("cells", pa.int32(), nullable=False),
        pa.field("centroids", pa.binary(), nullable=False),
        pa.field("table", pa.binary(), nullable=False),
    ]
)

HEADS_SCHEMA_V2 = pa.schema(
    [*HEADS_SCHEMA, pa.field("codec", pa.string(), nullable=False), pa.field("bloomier", BLOOMIER_TYPE, nullable=True)],
    metadata={"format": HEADS_FORMAT_V2},
)

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("campaign_id", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ],
    metadata={"format": REJECTS_FORMAT},
)

_FORMAT_RE = re.compile(r"(?P<name>[a-z][a-z0-9-]*)/(?P<major>[0-9]+)(?:\.(?P<minor>[0-9]+))?")


@dataclass(frozen=True, kw_only=True)
class HeadRow:
    """One campaign's quantized head: one row of a ``fleet-heads/1.1`` table.

    Args:
        campaign_id: the campaign (entity) id, ``^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$``.
        bits: 1 (binary), 2 (ternary), 4, 8 (symmetric ints) or 16 (float16 values).
        shape: the head's parameter shape, e.g. ``(193,)``.
        group_size: values per scale; ignored (conventionally 0) for 16 bits.
        packed: codes packed LSB-first, ``bits`` bits each (see ``docs/storage.md``);
            for 16 bits the float16 little-endian values.
        scales: float16 little-endian, one per group of ``group_size`` stored values;
            empty for 16 bits.
        mask: pruning bitmap, one bit per parameter, LSB-first, 1 = kept; ``None`` = all kept.
            When present, ``packed`` holds only the kept values, in order.
        teacher_sha256: 32 raw bytes, hash of the teacher's files.
        data_fingerprint: 16 raw bytes, :func:`fleet.formats.events.data_fingerprint` of the campaign's transfer data.
        teacher_auc, student_auc, mean_abs_diff, agreement: fidelity on held-out rows (or None).
        n_train, n_holdout: rows used to fit and to evaluate the head (or None).
        status: ``"ok"``, ``"fallback"``, ...
        kl, brier_vs_teacher, mean_ratio, student_log_loss, teacher_log_loss, student_brier,
            teacher_brier, student_ece, teacher_ece: teacher agreement and calibration on held-out
            rows (:data:`fleet.compression.metrics.CALIBRATION_KEYS`, see :func:`fleet.compression.metrics.campaign_fidelity`),
            or None (undefined, or a ``fleet-heads/1.0`` row).
        codec: ``"packed"`` (the fields above) or ``"bloomier"`` (``fleet-heads/2.0``): the head's first
            ``n - 1`` parameters are in ``block``'s Bloomier filter at keys ``block_row * 2**32 + j``, its last
            one (the readout bias) is the float16 in ``scales``; ``bits`` is the block's cluster-index width,
            ``group_size`` 0, ``packed`` empty, ``mask`` None.
        block: the row's :class:`fleet.compression.weightless.WeightlessBlock` (shared by the rows of one block), or None.
        block_row: the row's position in its block (0 = the row that stores the block).
    """

    campaign_id: str
    bits: int
    shape: tuple[int, ...]
    group_size: int
    packed: bytes
    scales: bytes
    mask: bytes | None = None
    teacher_sha256: bytes
    data_fingerprint: bytes
    teacher_auc: float | None = None
    student_auc: float | None = None
    mean_abs_diff: float | None = None
    agreement: float | None = None
    n_train: int | None = None
    n_holdout: int | None = None
    status: str = "ok"
    kl: float | None = None
    brier_vs_teacher: float | None = None
    mean_ratio: float | None = None
    student_log_loss: float | None = None
    teacher_log_loss: float | None = None
    student_brier: float | None = None
    teacher_brier: float | None = None
    student_ece: float | None = None
    teacher_ece: float | None = None
    codec: Codec = "packed"
    block: WeightlessBlock | None = None
    block_row: int = 0

    @property
    def num_params(self) -> int:
        """Number of parameters of the head (product of ``shape``)."""
        return math.prod(self.shape)

    @property
    def num_stored(self) -> int:
        """Number of values held in ``packed``: kept parameters if masked, else all (``bloomier``: the
        ``n`` parameters a reader decodes, ``n - 1`` from the filter and the bias)."""
        if self.mask is None or self.codec == "bloomier":
            return self.num_params
        bits = int.from_bytes(self.mask, "little")
        return (bits & ((1 << self.num_params) - 1)).bit_count()


@dataclass(frozen=True)
class RejectRow:
    """A campaign dropped by a stage: ``campaign_id`` (may be invalid text), ``stage``, ``reason``."""

    campaign_id: str
    stage: str
    reason: str


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes of ``packed`` for ``count`` stored values at ``bits`` bits (16 = float16)."""
    return (count * bits + 7) // 8


def num_groups(count: int, group_size: int) -> int:
    """Number of scales for ``count`` stored values: ``ceil(count / group_size)``."""
    return -(-count // group_size)


def check_head_row(row: HeadRow) -> None:
    """Raise :class:`StoreError` if ``row`` breaks the ``fleet-heads/1`` contract
    (bits, shape, byte lengths of packed/scales/mask/hashes, empty status)."""
    try:
        cid = validate_campaign_id(row.campaign_id)
    except InvalidCampaignIdError as err:
        raise StoreError(err.reason) from None

    def bad(reason: str) -> StoreError:
        return StoreError(f"invalid head row: {reason}", campaign_id=cid)

    if row.codec not in CODECS:
        raise bad(f"codec={row.codec!r} not in {CODECS}")
    if not row.shape or any(not isinstance(d, int) or d < 1 for d in row.shape):
        raise bad(f"shape={row.shape!r} must be a non-empty tuple of positive ints")
    if row.codec == "bloomier":
        _check_bloomier_row(row, bad)
    elif row.bits not in SUPPORTED_BITS:
        raise bad(f"bits={row.bits!r} not in {SUPPORTED_BITS}")
    else:
        _check_packed_row(row, bad)
    for name, size in (("teacher_sha256", TEACHER_SHA256_BYTES), ("data_fingerprint", DATA_FINGERPRINT_BYTES)):
        value = getattr(row, name)
        if not isinstance(value, bytes) or len(value) != size:
            raise bad(f"{name} must be {size} raw bytes")
    if not row.status:
        raise bad("status is empty")


def _check_bloomier_row(row: HeadRow, bad) -> None:
    if not (isinstance(row.bits, int) and 1 <= row.bits <= MAX_VALUE_BITS):
        raise bad(f"bits={row.bits!r} must lie in [1, {MAX_VALUE_BITS}] for the bloomier codec")
    if row.num_params < 2:
        raise bad("a bloomier head needs at least 2 parameters")
    if row.group_size != 0 or row.packed != b"" or row.mask is not None:
        raise bad("a bloomier row has group_size 0, empty packed and no mask")
    if len(row.scales) != 2:
        raise bad(f"scales has {len(row.scales)} bytes, expected 2 (the float16 bias of a bloomier row)")
    if not isinstance(row.block, WeightlessBlock):
        raise bad("a bloomier row needs its block (read the block's rows from its first one)")
    problems = row.block.problems()
    if problems:
        raise bad("bloomier block: " + "; ".join(problems))
    if row.block.value_bits != row.bits:
        raise bad(f"bits={row.bits} but the block's value_bits={row.block.value_bits}")
    if not (isinstance(row.block_row, int) and 0 <= row.block_row < row.block.rows):
        raise bad(f"block_row={row.block_row!r} outside the block's {row.block.rows} rows")


def _check_packed_row(row: HeadRow, bad) -> None:
    if row.block is not None:
        raise bad("a packed row has no bloomier block")
    n = row.num_params
    if row.mask is not None and len(row.mask) != (n + 7) // 8:
        raise bad(f"mask has {len(row.mask)} bytes, expected {(n + 7) // 8} for {n} parameters")
    k = row.num_stored
    if len(row.packed) != packed_nbytes(k, row.bits):
        raise bad(
            f"packed has {len(row.packed)} bytes, expected {packed_nbytes(k, row.bits)} "
            f"for {k} values at {row.bits} bits"
        )
    if row.bits == 16:
        if row.scales:
            raise bad("scales must be empty for 16 bits")
    else:
        if not isinstance(row.group_size, int) or row.group_size < 1:
            raise bad(f"group_size={row.group_size!r} must be >= 1")
        expected = 2 * num_groups(k, row.group_size)
        if len(row.scales) != expected:
            raise bad(
                f"scales has {len(row.scales)} bytes, expected {expected} "
                f"(float16 per group of {row.group_size} over {k} values)"
            )


def heads_to_table(rows: list[HeadRow]) -> pa.Table:
    """Check every row and build a table sorted by ``campaign_id``: ``fleet-heads/1.1`` when every row is
    ``packed``, else ``fleet-heads/2.0`` (each block's rows consecutive, ``block_row`` 0, 1, ... in id order,
    the block stored on its first row).

    Raises :class:`StoreError` on an invalid row, a duplicate campaign id or a broken block.
    """
    rows = sorted(rows, key=lambda r: r.campaign_id)
    for i, row in enumerate(rows):
        check_head_row(row)
        if i and rows[i - 1].campaign_id == row.campaign_id:
            raise StoreError("duplicate campaign id in heads", campaign_id=row.campaign_id)
    v2 = any(r.codec != "packed" for r in rows)
    if v2:
        _check_row_blocks(rows)
    schema = HEADS_SCHEMA_V2 if v2 else HEADS_SCHEMA
    columns = {}
    for field in schema:
        if field.name == "bloomier":
            values = [r.block.as_dict() if r.block is not None and r.block_row == 0 else None for r in rows]
        else:
            values = [getattr(r, field.name) for r in rows]
        if field.name == "shape":
            values = [list(v) for v in values]
        columns[field.name] = pa.array(values, type=field.type)
    return pa.Table.from_pydict(columns, schema=schema)


def _check_row_blocks(rows: list[HeadRow]) -> None:
    """Rows (sorted) of a 2.0 table: each block's rows are consecutive with ``block_row`` 0, 1, ..., rows - 1."""
    current, expected = None, 0
    for row in rows:
        if current is not None and expected < current.rows and row.block is not current:
            raise StoreError(
                f"bloomier block ends after {expected} of its {current.rows} rows", campaign_id=row.campaign_id
            )
        if row.block is None:
            current, expected = None, 0
            continue
        if row.block is not current:
            current, expected = row.block, 0
        if row.block_row != expected:
            raise StoreError(
                f"bloomier row has block_row {row.block_row} where its block's row {expected} "
                "belongs (a block's rows are consecutive, in campaign id order)",
                campaign_id=row.campaign_id,
            )
        expected += 1
    if current is not None and expected < current.rows:
        raise StoreError(f"bloomier block ends after {expected} of its {current.rows} rows")


def _block_from(struct: dict) -> WeightlessBlock:
    return WeightlessBlock(
        **{k: struct[k] for k in ("rows", "seed", "value_bits", "cell_bits", "cells", "centroids", "table")}
    )


def table_to_heads(table: pa.Table, *, block: tuple[WeightlessBlock, int] | None = None) -> list[HeadRow]:
    """Turn a ``fleet-heads/1`` or ``/2`` table (any minor version) into :class:`HeadRow` objects.

    Extra columns (a newer minor version) are ignored; a missing nullable column (an older minor
    version, e.g. the calibration columns of a ``fleet-heads/1`` = 1.0 table) reads as None. A ``bloomier``
    row gets its block from the block's first row above it; ``block=(block, block_row)`` gives the block of
    a slice that starts inside one (:func:`head_row_at`). Raises :class:`StoreError` on another major
    version, a missing required column or a ``bloomier`` row without its block.
    """
    fmt = (table.schema.metadata or {}).get(b"format")
    if fmt is not None:
        check_heads_format(fmt.decode(errors="replace"))
    n = table.num_rows
    present = set(table.column_names)  # built once: a cold lookup converts one row (1.3 -> 0.3 ms)
    columns = {}
    for field in HEADS_SCHEMA:
        if field.name in present:
            columns[field.name] = table.column(field.name).to_pylist()
        elif field.nullable:
            columns[field.name] = [None] * n
        else:
            raise StoreError(f"heads table has no column {field.name!r} (required by {HEADS_FORMAT})")
    columns["shape"] = [tuple(s) for s in columns["shape"]]
    rows = [HeadRow(**{name: values[i] for name, values in columns.items()}) for i in range(n)]
    if "codec" not in present:
        return rows
    codecs = table.column("codec").to_pylist()
    structs = table.column("bloomier").to_pylist() if "bloomier" in present else [None] * n
    current, position = block if block is not None else (None, 0)
    for i in range(n):
        if structs[i] is not None:
            current, position = _block_from(structs[i]), 0
        if codecs[i] == "bloomier":
            if current is None or position >= current.rows:
                raise StoreError(
                    "bloomier row outside a block (its block's first row was not read)", campaign_id=rows[i].campaign_id
                )
            rows[i] = dataclasses.replace(rows[i], codec="bloomier", block=current, block_row=position)
            position += 1
        else:
            if structs[i] is not None:
                raise StoreError(f"a {codecs[i]!r} row carries a bloomier block", campaign_id=rows[i].campaign_id)
            current, position = None, 0
            if codecs[i] is not None and codecs[i] != "packed":
                rows[i] = dataclasses.replace(rows[i], codec=codecs[i])  # check_head_row refuses it
    return rows


def head_row_at(table: pa.Table, i: int) -> HeadRow:
    """Row ``i`` of a heads table (a row group) as a :class:`HeadRow`, converting only that row (and, for a
    ``bloomier`` row, its block's first row)."""
    if "bloomier" not in table.column_names or table.column("codec")[i].as_py() != "bloomier":
        return table_to_heads(table.slice(i, 1))[0]
    valid = table.column("bloomier").slice(0, i + 1).is_valid().to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(valid)
    if starts.size == 0:
        raise StoreError("bloomier row outside a block", campaign_id=table.column("campaign_id")[i].as_py())
    start = int(starts[-1])
    struct = table.column("bloomier")[start].as_py()
    return table_to_heads(table.slice(i, 1), block=(_block_from(struct), i - start))[0]


def rejects_to_table(rows) -> pa.Table:
    """Build a ``fleet-rejects/1`` table from ``(campaign_id, stage, reason)`` tuples or objects
    with those attributes (e.g. :class:`RejectRow`). Ids are kept as text even when invalid
    (truncated to 256 characters); rows are sorted for reproducible files."""
    triples = []
    for row in rows:
        if isinstance(row, tuple):
            cid, stage, reason = row
        else:
            cid, stage, reason = row.campaign_id, row.stage, row.reason
        cid = cid if isinstance(cid, str) else repr(cid)
        triples.append((cid[:MAX_REJECT_ID_CHARS], str(stage), str(reason)))
    triples.sort()
    names = REJECTS_SCHEMA.names
    return pa.Table.from_pydict({name: [t[i] for t in triples] for i, name in enumerate(names)}, schema=REJECTS_SCHEMA)


def table_to_rejects(table: pa.Table) -> list[RejectRow]:
    """Turn a rejects table back into :class:`RejectRow` objects."""
    return [RejectRow(**d) for d in table.select(REJECTS_SCHEMA.names).to_pylist()]


def check_format(format_string: str, expected: str = HEADS_FORMAT, path: str | None = None) -> str:
    """Accept ``format_string`` if it names the same format and major version as ``expected``
    (``"fleet-heads/1.2"`` passes for ``"fleet-heads/1"``); raise :class:`StoreError` otherwise."""
    want = _FORMAT_RE.fullmatch(expected)
    assert want is not None, expected
    got = _FORMAT_RE.fullmatch(format_string) if isinstance(format_string, str) else None
    if got is None or got["name"] != want["name"]:
        raise StoreError(f"unknown format {format_string!r}, expected {expected!r}", path=path)
    if int(got["major"]) != int(want["major"]):
        raise StoreError(
            f"unsupported major version {format_string!r}: this fleet reads {want['name']}/{want['major']}.x; "
            "upgrade fleet to read it",
            path=path,
        )
    return format_string


def check_heads_format(format_string: str, path: str | None = None) -> int:
    """The major version (1 or 2) of a ``fleet-heads`` format string; :class:`StoreError` for another
    format or major version."""
    got = _FORMAT_RE.fullmatch(format_string) if isinstance(format_string, str) else None
    if got is not None and got["name"] == "fleet-heads" and int(got["major"]) in READ_MAJORS:
        return int(got["major"])
    if got is not None and got["name"] == "fleet-heads":
        raise StoreError(
            f"unsupported major version {format_string!r}: this fleet reads fleet-heads/1.x and "
            "fleet-heads/2.x; upgrade fleet to read it",
            path=path,
        )
    raise StoreError(f"unknown format {format_string!r}, expected {HEADS_FORMAT!r} or {HEADS_FORMAT_V2!r}", path=path)


def heads_major(table: pa.Table, path: str | None = None) -> int:
    """``fleet-heads`` major version of a table: from its schema metadata, else 2 when it has a ``codec`` column."""
    fmt = (table.schema.metadata or {}).get(b"format")
    if fmt is not None:
        return check_heads_format(fmt.decode(errors="replace"), path=path)
    return 2 if "codec" in table.column_names else 1


def conform_heads_table(table: pa.Table, path: str | None = None, columns: Sequence[str] | None = None) -> pa.Table:
    """Return ``table`` (any ``fleet-heads/1.x`` or ``/2.x``) in this fleet's schema of its major version:
    :data:`HEADS_SCHEMA` (1.1) or :data:`HEADS_SCHEMA_V2` (2.0).

    Refuses (:class:`StoreError`) a schema ``format`` of another major version; a nullable column
    the table lacks (an older minor: ``fleet-heads/1`` = 1.0 has no calibration columns) is added
    as nulls, extra columns (a newer minor) are dropped, and every column is cast to its type. A
    missing required column or a column that cannot be cast is refused. Row order is kept.
    ``columns`` (names of that schema, in its order or not): conform to those columns only.
    """
    base = HEADS_SCHEMA_V2 if heads_major(table, path) == 2 else HEADS_SCHEMA
    fmt = base.metadata[b"format"].decode()
    schema = base
    if columns is not None:
        unknown = sorted(set(columns) - set(base.names))
        if unknown:
            raise ValueError(f"not columns of {fmt}: {unknown}")
        schema = pa.schema([f for f in base if f.name in columns], metadata=base.metadata)
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name))
        elif field.nullable:
            columns.append(pa.chunked_array([pa.nulls(table.num_rows, field.type)], field.type))
        else:
            raise StoreError(f"heads table does not match {fmt}: no column {field.name!r}", path=path)
    try:
        return pa.Table.from_arrays(columns, names=schema.names).cast(schema)
    except (KeyError, ValueError, pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise StoreError(f"heads table does not match {fmt}: {err}", path=path) from None


def block_spans(table: pa.Table) -> list[tuple[int, int]]:
    """``(start, rows)`` of every unit that must stay in one row group: each ``bloomier`` block, and each
    other row alone. Checks a 2.0 table's block structure (:class:`StoreError`): a block on a ``bloomier``
    row, its ``rows`` rows all ``bloomier``, and no ``bloomier`` row outside a block."""
    n = table.num_rows
    if "bloomier" not in table.column_names:
        return [(i, 1) for i in range(n)]
    ids = table.column("campaign_id")
    is_bloomier = pc.equal(table.column("codec"), "bloomier").to_numpy(zero_copy_only=False)
    struct = table.column("bloomier")
    starts = np.flatnonzero(struct.is_valid().to_numpy(zero_copy_only=False))
    sizes = pc.fill_null(pc.struct_field(struct, "rows"), 0).to_numpy(zero_copy_only=False).astype(np.int64)[starts]
    covered = np.zeros(n, dtype=np.int64)
    for start, size in zip(starts.tolist(), sizes.tolist()):
        if size < 1 or start + size > n:
            raise StoreError(f"bloomier block of {size} rows does not fit the table", campaign_id=ids[start].as_py())
        covered[start : start + size] += 1
    if (covered > 1).any() or (covered.astype(bool) != is_bloomier).any():
        bad = int(np.flatnonzero((covered > 1) | (covered.astype(bool) != is_bloomier))[0])
        raise StoreError(
            "bloomier blocks and rows do not match (a block's rows must be consecutive bloomier rows)",
            campaign_id=ids[bad].as_py(),
        )
    spans, i, k = [], 0, 0
    starts_list, sizes_list = starts.tolist(), sizes.tolist()
    while i < n:
        if k < len(starts_list) and starts_list[k] == i:
            spans.append((i, sizes_list[k]))
            i += sizes_list[k]
            k += 1
        else:
            spans.append((i, 1))
            i += 1
    return spans


def validate_heads_table(table: pa.Table) -> pa.Table:
    """Conform ``table`` to its major version's schema (:func:`conform_heads_table`: an older minor
    version gains its missing nullable columns as nulls) and sort it by ``campaign_id``; raise
    :class:`StoreError` on another major version, missing required columns, invalid or duplicate
    campaign ids (vectorised: no per-row Python) or, in a 2.0 table, broken blocks (:func:`block_spans`;
    sorting keeps a block whole, since its rows are a contiguous id range)."""
    table = conform_heads_table(table)
    table = table.sort_by("campaign_id")
    ids = table.column("campaign_id")
    ok = pc.match_substring_regex(ids, r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    if not pc.all(ok).as_py() and table.num_rows:
        bad = ids.filter(pc.invert(ok))[0].as_py()
        raise StoreError(f"invalid campaign id {bad[:40]!r} in heads table")
    if table.num_rows > 1:
        same = pc.equal(ids.slice(1), ids.slice(0, table.num_rows - 1))
        if pc.any(same).as_py():
            dup = ids.slice(1).filter(same)[0].as_py()
            raise StoreError("duplicate campaign id in heads table", campaign_id=dup)
    if "bloomier" in table.column_names:
        block_spans(table)
    return table


__all__ = [
    "BLOOMIER_TYPE",
    "FAILED_STATUSES",
    "HEADS_SCHEMA",
    "HEADS_SCHEMA_V2",
    "READ_MAJORS",
    "REJECTS_SCHEMA",
    "HeadRow",
    "RejectRow",
    "block_spans",
    "check_format",
    "check_head_row",
    "check_heads_format",
    "conform_heads_table",
    "head_passed",
    "head_row_at",
    "heads_major",
    "heads_to_table",
    "num_groups",
    "packed_nbytes",
    "rejects_to_table",
    "table_to_heads",
    "table_to_rejects",
    "validate_heads_table",
]
