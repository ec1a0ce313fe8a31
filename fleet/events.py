"""Events: the per-campaign sequence dataset (Parquet on any fsspec URL) and the shared hold-out split.

One row per sequence: ``campaign_id: string``, ``event_types: list<int32>`` (length T, values in
``[0, num_event_types)``), ``features: list<float32>`` (length ``T * num_features``, row-major),
``label: int8`` nullable. Campaigns are read one (or a batch) at a time with a filter that pyarrow
pushes down to row-group statistics, so the whole dataset is never loaded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from fleet.codec import DATA_FINGERPRINT_BYTES
from fleet.data import SequenceBatch, collate
from fleet.errors import EventsFormatError
from fleet.ids import validate_campaign_id

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("campaign_id", pa.string(), nullable=False),
        pa.field("event_types", pa.list_(pa.int32()), nullable=False),
        pa.field("features", pa.list_(pa.float32()), nullable=False),
        pa.field("label", pa.int8(), nullable=True),
    ]
)
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


def write_events(uri: str, table: pa.Table, storage_options: dict | None = None, rows_per_file: int = 500_000,
                 row_group_size: int = 2048) -> None:
    """Write an events table as ``uri/part-NNNNN.parquet``, sorted by campaign id (row order within a
    campaign kept) with small row groups so per-campaign filters skip everything else."""
    table = table.cast(EVENTS_SCHEMA)
    order = pc.sort_indices(
        pa.table({"c": table["campaign_id"], "i": pa.array(np.arange(len(table)))}), [("c", "ascending"), ("i", "ascending")]
    )
    table = table.take(order)
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs.makedirs(path, exist_ok=True)
    for part, start in enumerate(range(0, max(len(table), 1), rows_per_file)):
        with fs.open(f"{path}/part-{part:05d}.parquet", "wb") as f:
            pq.write_table(table.slice(start, rows_per_file), f, row_group_size=row_group_size, compression="zstd")


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
    grouped = table.take(np.concatenate(rows) if rows else _NO_ROWS)
    starts = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    return {cid: grouped.slice(int(starts[k]), len(rows[k])) for k, cid in enumerate(campaign_ids)}


class EventsDataset:
    """Read access to an events dataset; ``read_campaigns`` returns validated per-campaign tables."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        if not fs.exists(path):
            raise EventsFormatError("events dataset does not exist", path=uri)
        try:
            self._dataset = ds.dataset(path, filesystem=fs, format="parquet")
        except (pa.ArrowInvalid, OSError) as exc:
            raise EventsFormatError(f"cannot open events dataset ({exc})", path=uri) from None
        missing = [f.name for f in EVENTS_SCHEMA if f.name not in self._dataset.schema.names]
        if missing:
            raise EventsFormatError(f"events dataset lacks columns {missing}", path=uri)

    def campaign_sizes(self) -> dict[str, int]:
        """Rows per campaign id (reads only the ``campaign_id`` column)."""
        counts = pc.value_counts(self._dataset.to_table(columns=["campaign_id"])["campaign_id"])
        return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))

    def campaign_ids(self) -> list[str]:
        """Distinct campaign ids, sorted."""
        return sorted(self.campaign_sizes())

    def read_campaigns(self, campaign_ids: Sequence[str]) -> dict[str, pa.Table]:
        """Tables of the given campaigns, each in dataset order (the order the hold-out split uses).
        A campaign with no rows maps to an empty table."""
        for campaign_id in campaign_ids:
            validate_campaign_id(campaign_id, path=self.uri)
        table = self._dataset.to_table(
            columns=[f.name for f in EVENTS_SCHEMA], filter=pc.field("campaign_id").isin(list(campaign_ids))
        )
        return split_by_campaign(table, campaign_ids)


def validate_campaign_table(
    table: pa.Table, campaign_id: str, num_event_types: int, num_features: int, path: str
) -> None:
    """Check a campaign's rows against the contract; raise :class:`EventsFormatError` naming the first bad row."""
    if len(table) == 0:
        raise EventsFormatError("campaign has no event rows", campaign_id=campaign_id, path=path)
    types = table["event_types"].combine_chunks()
    feats = table["features"].combine_chunks()
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
        raise EventsFormatError("features hold NaN or inf", campaign_id=campaign_id, path=path)
    labels = table["label"].to_numpy(zero_copy_only=False)
    labels = labels[~np.isnan(labels.astype(np.float64))] if labels.dtype.kind == "f" else labels
    if len(labels) and not np.isin(labels, (0, 1)).all():
        raise EventsFormatError("label must be 0, 1 or null", campaign_id=campaign_id, path=path)


def table_to_batch(table: pa.Table, num_features: int) -> SequenceBatch:
    """Convert a campaign table (events schema) into a padded :class:`SequenceBatch`."""
    types = table["event_types"].combine_chunks()
    feats = table["features"].combine_chunks()
    offsets = types.offsets.to_numpy()
    flat_types = types.values.to_numpy(zero_copy_only=False)
    flat_feats = feats.values.to_numpy(zero_copy_only=False)
    feat_offsets = feats.offsets.to_numpy()
    rows = range(len(table))
    return collate(
        [flat_types[offsets[i] : offsets[i + 1]] for i in rows],
        [flat_feats[feat_offsets[i] : feat_offsets[i + 1]] for i in rows],
        num_features,
        table["label"].to_pylist(),
    )


def data_fingerprint(table: pa.Table) -> str:
    """Hex of the first :data:`DATA_FINGERPRINT_BYTES` of the sha256 of a campaign's rows (event types,
    features, labels, in order): unchanged data => same fingerprint."""
    digest = hashlib.sha256()
    for name in ("event_types", "features"):
        column = table[name].combine_chunks()
        digest.update(column.offsets.to_numpy().astype("<i8").tobytes())
        digest.update(column.values.to_numpy(zero_copy_only=False).astype(column.values.type.to_pandas_dtype()).tobytes())
    labels = table["label"].fill_null(-1).to_numpy(zero_copy_only=False).astype("<i1")
    digest.update(labels.tobytes())
    return digest.digest()[:DATA_FINGERPRINT_BYTES].hex()
