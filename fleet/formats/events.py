"""Events: the per-campaign sequence dataset (Parquet on any fsspec URL) and the shared hold-out split.

One row per sequence: ``campaign_id: string``, ``event_types: list<int32>`` (length T, values in
``[0, num_event_types)``), ``features: list<float32>`` (length ``T * num_features``, row-major),
``label: int8`` nullable. Campaigns are read one (or a batch) at a time with a filter that pyarrow
pushes down to row-group statistics, so the whole dataset is never loaded. Events are untrusted input:
:meth:`EventsDataset.validate_files` checks every file's column types before any row is read,
:func:`validate_campaign_table` every campaign's rows, and :func:`truncate_sequences` bounds a row's length.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

from fleet.compression.data import SequenceBatch
from fleet.core.constants import DATA_FINGERPRINT_BYTES, NAME_PATTERN
from fleet.core.errors import EventsFormatError
from fleet.core.ids import validate_campaign_id

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("campaign_id", pa.string(), nullable=False),
        pa.field("event_types", pa.list_(pa.int32()), nullable=False),
        pa.field("features", pa.list_(pa.float32()), nullable=False),
        pa.field("label", pa.int8(), nullable=True),
    ]
)
#: How fleet reads the columns (what :meth:`EventsDataset.validate_files` accepts converts to these without
#: loss): event types as int64 and labels as int64, so that an integer column of any width is range-checked
#: by :func:`validate_campaign_table` instead of being cut; features as float32 (the serving type).
READ_SCHEMA = pa.schema(
    [
        pa.field("campaign_id", pa.string()),
        pa.field("event_types", pa.list_(pa.int64())),
        pa.field("features", pa.list_(pa.float32())),
        pa.field("label", pa.int64()),
    ]
)
#: What each column may hold in a file (besides the contract's own type), as shown in the error.
ACCEPTED_TYPES = {
    "campaign_id": "string (or large_string)",
    "event_types": "list<int32> (or another list of integers: int8-int64, uint8-uint32)",
    "features": "list<float32> (or float16, float64)",
    "label": "int8, nullable (or another integer type: int16-int64, uint8-uint32)",
}
HOLDOUT_FRACTION = 0.2


def holdout_mask(campaign_id: str, num_rows: int, fraction: float = HOLDOUT_FRACTION) -> np.ndarray:
    """Deterministic hold-out split: row ``i`` of a campaign (in dataset order) is held out when
    ``sha256(f"{campaign_id}:{i}")``'s first 8 bytes, read as a big-endian integer, are below
    ``fraction * 2**64``. Every stage, peer and benchmark uses this function, so all see one split."""
    threshold = int(fraction * 2**64)
    out = np.empty(num_rows, dtype=bool)
    for i in range(num_rows):
        digest = hashlib.sha256(f"{campaign_id}:{i}".encode()).digest()
        out[i] = int.from_bytes(digest[:8], "big") < threshold
    return out


def write_events(
    uri: str,
    table: pa.Table,
    storage_options: dict | None = None,
    rows_per_file: int = 500_000,
    row_group_size: int = 2048,
    start_part: int = 0,
) -> int:
    """Write an events table as ``uri/part-NNNNN.parquet`` (numbered from ``start_part``: a dataset written
    in pieces), sorted by campaign id (row order within a campaign kept) with small row groups so
    per-campaign filters skip everything else. Returns the number of files written."""
    table = table.cast(EVENTS_SCHEMA)
    order = pc.sort_indices(
        pa.table({"c": table["campaign_id"], "i": pa.array(np.arange(len(table)))}),
        [("c", "ascending"), ("i", "ascending")],
    )
    table = table.take(order)
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs.makedirs(path, exist_ok=True)
    for part, start in enumerate(range(0, max(len(table), 1), rows_per_file)):
        with fs.open(f"{path}/part-{start_part + part:05d}.parquet", "wb") as f:
            pq.write_table(table.slice(start, rows_per_file), f, row_group_size=row_group_size, compression="zstd")
    return part + 1


#: Rows :func:`write_events_in_parts` holds before writing them out: ~180 MB of events at 50 events of 8 features
#: a row; with :func:`write_events`'s sorted copy, ``fleet synth``'s driver peaked ~330 MB above its baseline.
EVENTS_PART_ROWS = 100_000
#: Written into an events dataset by :func:`write_events_in_parts` after its last part, so a dataset whose
#: writer crashed is told from a complete one. The reader ignores it (pyarrow skips ``_``-prefixed files),
#: so a dataset without one (e.g. a user's) reads the same.
EVENTS_COMPLETE = "_SUCCESS"


def write_events_in_parts(
    uri: str, tables: Iterable[pa.Table], storage_options: dict | None = None, part_rows: int = EVENTS_PART_ROWS
) -> None:
    """Write the events dataset ``uri`` from ``tables`` (events schema, consumed lazily), holding at most
    ``part_rows`` rows plus one table in memory: tables are gathered until they reach ``part_rows`` rows,
    then written by :func:`write_events` as the next files. Each table holds whole campaigns, and every
    part's ids must sort after the previous part's (the dataset stays sorted by campaign id, each campaign
    in one part). Anything already under ``uri`` (a crashed write's parts) is removed first, and
    :data:`EVENTS_COMPLETE` (``{"files", "rows"}``) is written last (:func:`events_complete`)."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)
    files, rows, last_id = 0, 0, None
    buffered: list[pa.Table] = []  # whole campaigns, fewer than part_rows rows until flushed

    def flush() -> None:
        nonlocal files, rows, last_id
        part = pa.concat_tables(buffered)
        buffered.clear()
        first, last = (v.as_py() for v in pc.min_max(part["campaign_id"]).values())
        if last_id is not None and first <= last_id:
            raise ValueError(
                f"events part starts at campaign {first!r}, not after the previous part's last {last_id!r}"
            )
        files += write_events(uri, part, storage_options, start_part=files)
        rows, last_id = rows + len(part), last

    held = 0
    for table in tables:
        buffered.append(table)
        held += len(table)
        if held >= part_rows:
            flush()
            held = 0
    if buffered:
        flush()
    fs.pipe_file(f"{path}/{EVENTS_COMPLETE}", json.dumps({"files": files, "rows": rows}).encode())


def events_complete(uri: str, storage_options: dict | None = None) -> bool:
    """Whether ``uri`` is an events dataset that :func:`write_events_in_parts` finished writing."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs.exists(f"{path}/{EVENTS_COMPLETE}")


_NO_ROWS = np.zeros(0, dtype=np.int64)


def rows_by_campaign(campaign_ids: pa.Array | pa.ChunkedArray) -> dict[str, np.ndarray]:
    """Row indices (ascending) of every distinct id in a non-null string column, in one vectorised
    pass (dictionary-encode, stable sort of the codes): linear in rows, whatever the number of ids."""
    if isinstance(campaign_ids, pa.ChunkedArray):
        campaign_ids = campaign_ids.combine_chunks()
    encoded = pc.dictionary_encode(campaign_ids)
    codes = encoded.indices.to_numpy(zero_copy_only=False)  # (n,) id code of each row
    order = np.argsort(codes, kind="stable")  # (n,) rows grouped by code, ascending within a group
    bounds = np.searchsorted(codes[order], np.arange(len(encoded.dictionary) + 1))
    return {cid: order[bounds[k] : bounds[k + 1]] for k, cid in enumerate(encoded.dictionary.to_pylist())}


def split_by_campaign(table: pa.Table, campaign_ids: Sequence[str] | None = None) -> dict[str, pa.Table]:
    """``{campaign_id: its rows in table order}`` for ``campaign_ids`` (default: every id present, sorted;
    an absent id maps to an empty table). One gather into campaign order, then zero-copy slices:
    a ``take`` per campaign would re-concatenate a multi-chunk table once per campaign."""
    groups = rows_by_campaign(table["campaign_id"])
    campaign_ids = sorted(groups) if campaign_ids is None else list(campaign_ids)
    rows = [groups.get(cid, _NO_ROWS) for cid in campaign_ids]
    order = np.concatenate(rows) if rows else _NO_ROWS
    # rows already grouped in this order (a fleet written campaign by campaign): slice the table as it is
    in_order = len(order) == len(table) and bool((order == np.arange(len(table))).all())
    grouped = table if in_order else table.take(order)
    starts = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    return {cid: grouped.slice(int(starts[k]), len(rows[k])) for k, cid in enumerate(campaign_ids)}


def _is_integer(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) and dtype != pa.uint64()  # uint64 does not fit int64


def _accepted(column: str, dtype: pa.DataType) -> bool:
    """Whether a file's ``column`` of type ``dtype`` follows the contract (:data:`ACCEPTED_TYPES`)."""
    if column == "campaign_id":
        return dtype in (pa.string(), pa.large_string())
    if column == "label":
        return _is_integer(dtype)
    if not (pa.types.is_list(dtype) or pa.types.is_large_list(dtype)):
        return False
    return _is_integer(dtype.value_type) if column == "event_types" else pa.types.is_floating(dtype.value_type)


class EventsDataset:
    """Read access to an events dataset. :meth:`validate_files` checks the files' schemas (the pipeline calls it
    before any stage); ``read_campaigns`` returns per-campaign tables in :data:`READ_SCHEMA`."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri
        self._fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        if not self._fs.exists(path):
            raise EventsFormatError("events dataset does not exist", path=uri)
        try:  # an explicit schema: no file is opened here, each is cast to it when read
            self._dataset = ds.dataset(path, filesystem=self._fs, format="parquet", schema=READ_SCHEMA)
        except (pa.ArrowException, OSError) as exc:
            raise EventsFormatError(f"cannot open events dataset ({exc})", path=uri) from None

    def _file_uri(self, file: str) -> str:
        return self._fs.unstrip_protocol(file) if "://" in self.uri else file

    def validate_files(self) -> None:
        """Check every file's footer against the events contract before any row is read: raise
        :class:`EventsFormatError` naming the file, the column, the expected and the found type (a column of
        another type would otherwise be cast, cut or crash the reader: float event types, list<string>, an
        int instead of a list, an int ``campaign_id``, a bool ``label``). Other columns are ignored."""
        for file in self._dataset.files:
            uri = self._file_uri(file)
            try:
                with self._fs.open(file, "rb") as f:
                    schema = pq.read_schema(f)
            except (pa.ArrowException, OSError) as exc:
                raise EventsFormatError(f"not a readable Parquet file ({exc})", path=uri) from None
            for name, expected in ACCEPTED_TYPES.items():
                if name not in schema.names:
                    raise EventsFormatError(f"column {name!r} is missing (expected {expected})", path=uri)
                found = schema.field(name).type
                if not _accepted(name, found):
                    raise EventsFormatError(f"column {name!r}: expected {expected}, found {found}", path=uri)

    def campaign_sizes(self) -> dict[str, int]:
        """Rows per campaign id (reads only the ``campaign_id`` column). Ids no campaign can have (null, not
        UTF-8, not matching :data:`fleet.core.constants.NAME_PATTERN`) are left out: they are never read."""
        counts = pc.value_counts(self._dataset.to_table(columns=["campaign_id"])["campaign_id"])
        sizes = {}
        for raw, count in zip(counts.field("values").cast(pa.binary()).to_pylist(), counts.field("counts").to_pylist()):
            campaign_id = raw.decode("utf-8", "replace") if raw is not None else ""
            if NAME_PATTERN.fullmatch(campaign_id):
                sizes[campaign_id] = count
        return sizes

    def campaign_ids(self) -> list[str]:
        """Distinct (valid) campaign ids, sorted."""
        return sorted(self.campaign_sizes())

    def read_campaigns(self, campaign_ids: Sequence[str]) -> dict[str, pa.Table]:
        """Tables of the given campaigns, each in dataset order (the order the hold-out split uses).
        A campaign with no rows maps to an empty table."""
        campaign_ids = [validate_campaign_id(campaign_id, path=self.uri) for campaign_id in campaign_ids]
        if not campaign_ids:
            return {}
        # the range is implied by isin, but Parquet row-group statistics prune on it (isin alone scans every
        # row group: a read of 1,024 of 100,000 users took 11.4 s, 0.4 s with the range)
        column = pc.field("campaign_id")
        wanted = (
            (column >= min(campaign_ids))
            & (column <= max(campaign_ids))
            & column.isin(pa.array(campaign_ids, pa.string()))
        )
        table = self._dataset.to_table(columns=READ_SCHEMA.names, filter=wanted)
        return split_by_campaign(table, campaign_ids)


def _first_null_row(column: pa.Array) -> int | None:
    """Row of the first null list, or of the first list holding a null element, of a list ``column``."""
    if column.null_count:
        return int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
    values = column.flatten()
    if values.null_count:
        element = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        return int(pc.list_parent_indices(column)[element].as_py())
    return None


def validate_campaign_table(
    table: pa.Table, campaign_id: str, num_event_types: int, num_features: int, path: str
) -> None:
    """Check a campaign's rows against the contract; raise :class:`EventsFormatError` naming the first bad row."""
    if len(table) == 0:
        raise EventsFormatError("campaign has no event rows", campaign_id=campaign_id, path=path)
    types = table["event_types"].combine_chunks()
    feats = table["features"].combine_chunks()
    for name, column in (("event_types", types), ("features", feats)):
        row = _first_null_row(column)
        if row is not None:
            raise EventsFormatError(
                f"row {row}: {name} is null or holds a null element", campaign_id=campaign_id, path=path
            )
    lengths = pc.list_value_length(types).to_numpy(zero_copy_only=False)
    if (lengths < 1).any():
        row = int(np.flatnonzero(lengths < 1)[0])
        raise EventsFormatError(f"row {row}: empty sequence", campaign_id=campaign_id, path=path)
    flat_types = types.flatten().to_numpy(zero_copy_only=False)
    bad = (flat_types < 0) | (flat_types >= num_event_types)
    if bad.any():
        row = int(np.searchsorted(np.cumsum(lengths), np.flatnonzero(bad)[0], side="right"))
        raise EventsFormatError(
            f"row {row}: event type outside [0, {num_event_types})", campaign_id=campaign_id, path=path
        )
    feat_lengths = pc.list_value_length(feats).to_numpy(zero_copy_only=False)
    wrong = feat_lengths != lengths * num_features
    if wrong.any():
        row = int(np.flatnonzero(wrong)[0])
        raise EventsFormatError(
            f"row {row}: features has {feat_lengths[row]} values, expected T*num_features = "
            f"{lengths[row]}*{num_features}",
            campaign_id=campaign_id,
            path=path,
        )
    if not np.isfinite(feats.flatten().to_numpy(zero_copy_only=False)).all():
        raise EventsFormatError(
            "features hold NaN or inf (or values beyond float32)", campaign_id=campaign_id, path=path
        )
    labels = table["label"].drop_null().to_numpy(zero_copy_only=False)
    if len(labels) and not np.isin(labels, (0, 1)).all():
        raise EventsFormatError("label must be 0, 1 or null", campaign_id=campaign_id, path=path)


def truncate_sequences(table: pa.Table, max_sequence_length: int, num_features: int) -> tuple[pa.Table, int]:
    """Keep the last ``max_sequence_length`` events (and their features) of every longer row of a validated
    campaign table; returns ``(table, rows truncated)``. Row count and order are unchanged, and a table
    without longer rows is returned as it is."""
    types = table["event_types"].combine_chunks()
    lengths = pc.list_value_length(types).to_numpy(zero_copy_only=False)
    drop = np.maximum(lengths - max_sequence_length, 0)  # (n,) leading events dropped per row
    truncated = int((drop > 0).sum())
    if not truncated:
        return table, 0
    feats = table["features"].combine_chunks()
    return (
        table.set_column(
            table.schema.get_field_index("event_types"), "event_types", _drop_leading(types, drop)
        ).set_column(table.schema.get_field_index("features"), "features", _drop_leading(feats, drop * num_features)),
        truncated,
    )


def _drop_leading(column: pa.ListArray, drop: np.ndarray) -> pa.ListArray:
    """``column`` (n rows) without the first ``drop[i]`` values of row ``i`` (at most all of them)."""
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    keep = lengths - np.minimum(drop, lengths)  # (n,)
    starts = np.cumsum(lengths) - keep  # (n,) first kept value of each row among the flattened values
    index = np.repeat(starts - (np.cumsum(keep) - keep), keep) + np.arange(keep.sum())  # (kept,)
    offsets = pa.array(np.concatenate([[0], np.cumsum(keep)]), pa.int32())
    return pa.ListArray.from_arrays(offsets, column.flatten().take(pa.array(index, pa.int64())), type=column.type)


def table_to_batch(table: pa.Table, num_features: int) -> SequenceBatch:
    """Convert a campaign table (events schema) into a packed :class:`SequenceBatch`: no padding, so its memory
    follows the number of events; models get length-bucketed, padded minibatches of it."""
    types = table["event_types"].combine_chunks()
    feats = table["features"].combine_chunks()
    lengths = pc.list_value_length(types).to_numpy(zero_copy_only=False).astype(np.int64)  # (B,)
    if not np.array_equal(pc.list_value_length(feats).to_numpy(zero_copy_only=False), lengths * num_features):
        raise ValueError("features must hold T * num_features values per row (validate_campaign_table first)")
    flat_types = types.flatten().to_numpy(zero_copy_only=False).astype(np.int64)  # (E,)
    flat_feats = feats.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, num_features)  # (E, F)
    labels = table["label"].to_numpy(zero_copy_only=False).astype(np.float32)  # (B,) NaN where null
    return SequenceBatch.packed(
        torch.from_numpy(flat_types),
        torch.from_numpy(np.ascontiguousarray(flat_feats)),
        torch.from_numpy(lengths),
        torch.from_numpy(labels),
    )


def data_fingerprint(table: pa.Table) -> str:
    """Hex of the first :data:`DATA_FINGERPRINT_BYTES` of the sha256 of a validated campaign's rows (event
    types as int32, features as float32, labels, in order): unchanged data => same fingerprint."""
    digest = hashlib.sha256()
    for name, dtype in (("event_types", "<i4"), ("features", "<f4")):  # the contract's types, whatever was read
        column = table[name].combine_chunks()
        digest.update(column.offsets.to_numpy().astype("<i8").tobytes())
        digest.update(column.values.to_numpy(zero_copy_only=False).astype(dtype).tobytes())
    labels = table["label"].fill_null(-1).to_numpy(zero_copy_only=False).astype("<i1")
    digest.update(labels.tobytes())
    return digest.digest()[:DATA_FINGERPRINT_BYTES].hex()
