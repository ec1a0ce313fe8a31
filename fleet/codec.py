"""Heads rows <-> Arrow tables (schema ``fleet-heads/1.1``) and the rejects table. No I/O.

The schema and the bit packing of ``packed`` are a contract with every Parquet reader (pyarrow,
DuckDB, Spark) and with :mod:`fleet.quant`; both are documented in ``docs/storage.md`` and pinned
by ``tests/test_codec.py``. Change them only with a new format version: a new minor version may
only add nullable columns at the end (older minors read with them None, :func:`conform_heads_table`);
anything else is a new major version.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from fleet.errors import InvalidCampaignIdError, StoreError
from fleet.ids import validate_campaign_id

HEADS_FORMAT = "fleet-heads/1.1"
REJECTS_FORMAT = "fleet-rejects/1"

#: Bit widths a head may be stored with; 16 means float16 values (no codes, no scales).
SUPPORTED_BITS = (1, 2, 4, 8, 16)
#: Bytes of a campaign's data fingerprint (``fleet.events.data_fingerprint``): a 128-bit sha256 prefix
#: is ample to detect changed data between nights (it is no security boundary) at half the bytes.
DATA_FINGERPRINT_BYTES = 16

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
        # added in fleet-heads/1.1 (null in 1.0 files): fleet.metrics.CALIBRATION_KEYS, in that order
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
        data_fingerprint: 16 raw bytes, :func:`fleet.events.data_fingerprint` of the campaign's transfer data.
        teacher_auc, student_auc, mean_abs_diff, agreement: fidelity on held-out rows (or None).
        n_train, n_holdout: rows used to fit and to evaluate the head (or None).
        status: ``"ok"``, ``"fallback"``, ...
        kl, brier_vs_teacher, mean_ratio, student_log_loss, teacher_log_loss, student_brier,
            teacher_brier, student_ece, teacher_ece: teacher agreement and calibration on held-out
            rows (:data:`fleet.metrics.CALIBRATION_KEYS`, see :func:`fleet.metrics.campaign_fidelity`),
            or None (undefined, or a ``fleet-heads/1.0`` row).
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

    @property
    def num_params(self) -> int:
        """Number of parameters of the head (product of ``shape``)."""
        return math.prod(self.shape)

    @property
    def num_stored(self) -> int:
        """Number of values held in ``packed``: kept parameters if masked, else all."""
        if self.mask is None:
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

    if row.bits not in SUPPORTED_BITS:
        raise bad(f"bits={row.bits!r} not in {SUPPORTED_BITS}")
    if not row.shape or any(not isinstance(d, int) or d < 1 for d in row.shape):
        raise bad(f"shape={row.shape!r} must be a non-empty tuple of positive ints")
    n = row.num_params
    if row.mask is not None and len(row.mask) != (n + 7) // 8:
        raise bad(f"mask has {len(row.mask)} bytes, expected {(n + 7) // 8} for {n} parameters")
    k = row.num_stored
    if len(row.packed) != packed_nbytes(k, row.bits):
        raise bad(f"packed has {len(row.packed)} bytes, expected {packed_nbytes(k, row.bits)} "
                  f"for {k} values at {row.bits} bits")
    if row.bits == 16:
        if row.scales:
            raise bad("scales must be empty for 16 bits")
    else:
        if not isinstance(row.group_size, int) or row.group_size < 1:
            raise bad(f"group_size={row.group_size!r} must be >= 1")
        expected = 2 * num_groups(k, row.group_size)
        if len(row.scales) != expected:
            raise bad(f"scales has {len(row.scales)} bytes, expected {expected} "
                      f"(float16 per group of {row.group_size} over {k} values)")
    for name, size in (("teacher_sha256", 32), ("data_fingerprint", DATA_FINGERPRINT_BYTES)):
        value = getattr(row, name)
        if not isinstance(value, bytes) or len(value) != size:
            raise bad(f"{name} must be {size} raw bytes")
    if not row.status:
        raise bad("status is empty")


def heads_to_table(rows: list[HeadRow]) -> pa.Table:
    """Check every row and build a ``fleet-heads/1.1`` table sorted by ``campaign_id``.

    Raises :class:`StoreError` on an invalid row or a duplicate campaign id.
    """
    rows = sorted(rows, key=lambda r: r.campaign_id)
    for i, row in enumerate(rows):
        check_head_row(row)
        if i and rows[i - 1].campaign_id == row.campaign_id:
            raise StoreError("duplicate campaign id in heads", campaign_id=row.campaign_id)
    columns = {}
    for field in HEADS_SCHEMA:
        values = [getattr(r, field.name) for r in rows]
        if field.name == "shape":
            values = [list(v) for v in values]
        columns[field.name] = pa.array(values, type=field.type)
    return pa.Table.from_pydict(columns, schema=HEADS_SCHEMA)


def table_to_heads(table: pa.Table) -> list[HeadRow]:
    """Turn a ``fleet-heads/1`` table (any minor version) into :class:`HeadRow` objects.

    Extra columns (a newer minor version) are ignored; a missing nullable column (an older minor
    version, e.g. the calibration columns of a ``fleet-heads/1`` = 1.0 table) reads as None.
    Raises :class:`StoreError` on another major version or a missing required column.
    """
    fmt = (table.schema.metadata or {}).get(b"format")
    if fmt is not None:
        check_format(fmt.decode(), HEADS_FORMAT)
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
    return [HeadRow(**{name: values[i] for name, values in columns.items()}) for i in range(n)]


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
    return pa.Table.from_pydict(
        {name: [t[i] for t in triples] for i, name in enumerate(names)}, schema=REJECTS_SCHEMA
    )


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


def conform_heads_table(table: pa.Table, path: str | None = None, columns: Sequence[str] | None = None) -> pa.Table:
    """Return ``table`` (any ``fleet-heads/1.x``) in :data:`HEADS_SCHEMA`, this fleet's minor version.

    Refuses (:class:`StoreError`) a schema ``format`` of another major version; a nullable column
    the table lacks (an older minor: ``fleet-heads/1`` = 1.0 has no calibration columns) is added
    as nulls, extra columns (a newer minor) are dropped, and every column is cast to its type. A
    missing required column or a column that cannot be cast is refused. Row order is kept.
    ``columns`` (names of :data:`HEADS_SCHEMA`, in its order or not): conform to those columns only.
    """
    fmt = (table.schema.metadata or {}).get(b"format")
    if fmt is not None:
        check_format(fmt.decode(errors="replace"), HEADS_FORMAT, path=path)
    schema = HEADS_SCHEMA
    if columns is not None:
        unknown = sorted(set(columns) - set(HEADS_SCHEMA.names))
        if unknown:
            raise ValueError(f"not columns of {HEADS_FORMAT}: {unknown}")
        schema = pa.schema([f for f in HEADS_SCHEMA if f.name in columns], metadata=HEADS_SCHEMA.metadata)
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name))
        elif field.nullable:
            columns.append(pa.chunked_array([pa.nulls(table.num_rows, field.type)], field.type))
        else:
            raise StoreError(f"heads table does not match {HEADS_FORMAT}: no column {field.name!r}", path=path)
    try:
        return pa.Table.from_arrays(columns, names=schema.names).cast(schema)
    except (KeyError, ValueError, pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise StoreError(f"heads table does not match {HEADS_FORMAT}: {err}", path=path) from None


def validate_heads_table(table: pa.Table) -> pa.Table:
    """Conform ``table`` to :data:`HEADS_SCHEMA` (:func:`conform_heads_table`: an older minor
    version gains its missing nullable columns as nulls) and sort it by ``campaign_id``; raise
    :class:`StoreError` on another major version, missing required columns, invalid or duplicate
    campaign ids (vectorised: no per-row Python)."""
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
    return table


__all__ = [
    "FAILED_STATUSES",
    "HEADS_FORMAT",
    "HEADS_SCHEMA",
    "REJECTS_FORMAT",
    "REJECTS_SCHEMA",
    "SUPPORTED_BITS",
    "HeadRow",
    "RejectRow",
    "check_format",
    "check_head_row",
    "conform_heads_table",
    "head_passed",
    "heads_to_table",
    "num_groups",
    "packed_nbytes",
    "rejects_to_table",
    "table_to_heads",
    "table_to_rejects",
    "validate_heads_table",
]
