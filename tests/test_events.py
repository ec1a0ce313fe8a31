"""Events contract: round trip, per-campaign pushdown reads, hold-out split and bad rows."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fleet.core.errors import EventsFormatError, InvalidCampaignIdError
from fleet.formats.events import (
    EVENTS_SCHEMA,
    EventsDataset,
    data_fingerprint,
    holdout_mask,
    table_to_batch,
    validate_campaign_table,
    write_events,
)


def rows(campaign_id, n, num_features=2, start=0):
    types, feats, labels = [], [], []
    for i in range(n):
        t = 1 + (start + i) % 4
        types.append([(start + i + k) % 5 for k in range(t)])
        feats.append([float(start + i + k) for k in range(t * num_features)])
        labels.append(None if i % 3 == 2 else i % 2)
    return pa.table(
        {"campaign_id": [campaign_id] * n, "event_types": types, "features": feats, "label": labels},
        schema=EVENTS_SCHEMA,
    )


def test_round_trip_and_per_campaign_reads(tmp_path):
    table = pa.concat_tables([rows("b", 30, start=100), rows("a", 20), rows("c", 5000, start=7)])
    write_events(str(tmp_path / "ev"), table, row_group_size=64)
    dataset = EventsDataset(str(tmp_path / "ev"))
    assert dataset.campaign_ids() == ["a", "b", "c"]
    got = dataset.read_campaigns(["b", "a", "zz"])
    assert got["b"].to_pylist() == rows("b", 30, start=100).to_pylist()  # order within a campaign kept
    assert got["a"].to_pylist() == rows("a", 20).to_pylist()
    assert len(got["zz"]) == 0
    meta = pq.ParquetFile(tmp_path / "ev" / "part-00000.parquet").metadata
    assert meta.num_row_groups > 50  # small row groups let the campaign filter skip the rest


def test_filter_pushdown_reads_few_row_groups(tmp_path):
    table = pa.concat_tables([rows(f"c{i:03d}", 64) for i in range(100)])
    write_events(str(tmp_path / "ev"), table, row_group_size=64)
    dataset = EventsDataset(str(tmp_path / "ev"))
    fragment = next(iter(dataset._dataset.get_fragments()))
    import pyarrow.compute as pc

    kept = fragment.split_by_row_group(filter=pc.field("campaign_id").isin(["c042"]))
    assert len(kept) == 1  # statistics prune 99 of 100 row groups


def test_batch_conversion():
    table = rows("a", 6, num_features=2)
    batch = table_to_batch(table, num_features=2)
    assert batch.event_types.shape == (6, 4) and batch.features.shape == (6, 4, 2)
    assert batch.lengths.tolist() == [1, 2, 3, 4, 1, 2]
    assert batch.features[1, 1].tolist() == [3.0, 4.0]  # row-major T*F flattening
    assert torch.isnan(batch.labels[2]) and batch.labels[1] == 1


def test_holdout_split_is_deterministic_and_sized():
    mask = holdout_mask("campaign-1", 10_000)
    assert mask.dtype == bool and 0.18 < mask.mean() < 0.22
    assert (holdout_mask("campaign-1", 10_000) == mask).all()
    assert (holdout_mask("campaign-1", 50) == mask[:50]).all()  # prefix-stable: depends on position only
    assert not (holdout_mask("campaign-2", 10_000) == mask).all()


def test_data_hash_tracks_content():
    assert data_fingerprint(rows("a", 10)) == data_fingerprint(rows("a", 10))
    assert data_fingerprint(rows("a", 10)) != data_fingerprint(rows("a", 10, start=1))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda t: t.slice(0, 0), "no event rows"),
        (
            lambda t: t.set_column(1, "event_types", pa.array([[0, 9]] + [[1]] * 3, pa.list_(pa.int32()))),
            "row 0: event type outside",
        ),
        (
            lambda t: t.set_column(1, "event_types", pa.array([[1]] * 3 + [[-1]], pa.list_(pa.int32()))),
            "row 3: event type outside",
        ),
        (
            lambda t: t.set_column(2, "features", pa.array([[1.0]] * 4, pa.list_(pa.float32()))),
            "row 0: features has 1 values",
        ),
        (lambda t: t.set_column(1, "event_types", pa.array([[]] * 4, pa.list_(pa.int32()))), "empty sequence"),
        (lambda t: t.set_column(3, "label", pa.array([0, 1, 2, None], pa.int8())), "label must be"),
        (
            lambda t: t.set_column(2, "features", pa.array([[float("nan"), 0.0]] * 4, pa.list_(pa.float32()))),
            "NaN or inf",
        ),
    ],
)
def test_bad_rows_raise_named_errors(mutate, match):
    table = pa.table(
        {"campaign_id": ["k"] * 4, "event_types": [[1]] * 4, "features": [[0.5, 0.5]] * 4, "label": [0, 1, 0, None]},
        schema=EVENTS_SCHEMA,
    )
    with pytest.raises(EventsFormatError, match=match) as info:
        validate_campaign_table(mutate(table), "k", num_event_types=5, num_features=2, path="s3://b/events")
    assert "campaign 'k'" in str(info.value) and "s3://b/events" in str(info.value)


def test_missing_dataset_and_bad_ids(tmp_path):
    with pytest.raises(EventsFormatError, match="does not exist"):
        EventsDataset(str(tmp_path / "nope"))
    write_events(str(tmp_path / "ev"), rows("a", 3))
    with pytest.raises(InvalidCampaignIdError):
        EventsDataset(str(tmp_path / "ev")).read_campaigns(["../etc"])


def test_rows_by_campaign_groups_rows_in_order():
    from fleet.formats.events import rows_by_campaign

    ids = pa.chunked_array([["b", "a", "b"], ["c", "a"]])
    groups = rows_by_campaign(ids)
    assert {k: v.tolist() for k, v in groups.items()} == {"b": [0, 2], "a": [1, 4], "c": [3]}
    assert rows_by_campaign(pa.array([], pa.string())) == {}


def test_split_by_campaign_keeps_table_order_per_campaign():
    from fleet.formats.events import split_by_campaign

    table = pa.concat_tables(
        [pa.table({"campaign_id": ["b", "a"], "x": [0, 1]}), pa.table({"campaign_id": ["b", "c", "a"], "x": [2, 3, 4]})]
    )
    parts = split_by_campaign(table)
    assert list(parts) == ["a", "b", "c"]
    assert {k: v["x"].to_pylist() for k, v in parts.items()} == {"a": [1, 4], "b": [0, 2], "c": [3]}
    chosen = split_by_campaign(table, ["c", "zz"])
    assert chosen["c"]["x"].to_pylist() == [3] and chosen["zz"].num_rows == 0


# ----------------------------------------------------------------------------- untrusted files (docs/security.md, 3)


def good_columns(campaign_id="a", n=4):
    return {
        "campaign_id": [campaign_id] * n,
        "event_types": [[1, 2]] * n,
        "features": [[0.5] * 4] * n,
        "label": pa.array([0, 1] * (n // 2), pa.int8()),
    }


@pytest.mark.parametrize(
    "column, values, expected, found",
    [
        ("event_types", [["1", "2"]] * 4, "list<int32>", "list<element: string>"),
        ("event_types", [1, 2, 3, 4], "list<int32>", "found int64"),
        ("event_types", [[1.7, 2.2]] * 4, "list<int32>", "list<element: double>"),  # would be cut to 1, 2
        ("features", [[1, 2, 3, 4]] * 4, "list<float32>", "list<element: int64>"),
        ("campaign_id", [1, 1, 2, 2], "string", "found int64"),
        ("label", [True, False, True, None], "int8, nullable", "found bool"),
        ("label", pa.array([2**64 - 1] * 4, pa.uint64()), "int8, nullable", "found uint64"),
    ],
)
def test_files_with_wrong_column_types_are_refused_naming_file_column_and_types(
    tmp_path, column, values, expected, found
):
    """Real Parquet files: the good one passes, the bad one is refused before any row is read."""
    pq.write_table(pa.table(good_columns("a")), tmp_path / "part-0.parquet")
    pq.write_table(pa.table({**good_columns("b"), column: values}), tmp_path / "part-1.parquet")
    with pytest.raises(EventsFormatError) as info:
        EventsDataset(str(tmp_path)).validate_files()
    message = str(info.value)
    assert info.value.path == str(tmp_path / "part-1.parquet")
    assert f"column {column!r}: expected {expected}" in message and found in message


def test_a_missing_column_or_a_file_that_is_not_parquet_is_refused_naming_the_file(tmp_path):
    pq.write_table(pa.table({k: v for k, v in good_columns().items() if k != "label"}), tmp_path / "part-0.parquet")
    with pytest.raises(EventsFormatError, match="column 'label' is missing") as info:
        EventsDataset(str(tmp_path)).validate_files()
    assert info.value.path.endswith("part-0.parquet")
    pq.write_table(pa.table(good_columns()), tmp_path / "part-0.parquet")
    (tmp_path / "part-1.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(EventsFormatError, match="not a readable Parquet file") as info:
        EventsDataset(str(tmp_path)).validate_files()
    assert info.value.path.endswith("part-1.parquet")


def test_integer_and_float_widths_are_read_as_the_contract_with_the_same_fingerprint(tmp_path):
    """int64 event types, float64 features, int64 labels, large lists: what pyarrow writes from Python lists."""
    reference = rows("a", 9)
    wide = pa.table(
        {
            "campaign_id": pa.array(reference["campaign_id"].to_pylist(), pa.large_string()),
            "event_types": pa.array(reference["event_types"].to_pylist(), pa.large_list(pa.int64())),
            "features": pa.array(reference["features"].to_pylist(), pa.list_(pa.float64())),
            "label": pa.array(reference["label"].to_pylist(), pa.int64()),
        }
    )
    pq.write_table(wide, tmp_path / "part-0.parquet")
    dataset = EventsDataset(str(tmp_path))
    dataset.validate_files()
    table = dataset.read_campaigns(["a"])["a"]
    assert table.to_pylist() == reference.to_pylist()
    validate_campaign_table(table, "a", num_event_types=5, num_features=2, path="p")
    assert data_fingerprint(table) == data_fingerprint(reference)


@pytest.mark.parametrize(
    "column, values, row",
    [
        ("event_types", [[1], [1, None], [1], [1]], 1),
        ("event_types", [[1], [1], None, [1]], 2),
        ("features", [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [None, 0.5]], 3),
        ("features", [None, [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]], 0),
    ],
)
def test_null_lists_and_null_elements_name_the_row_and_the_column(tmp_path, column, values, row):
    table = pa.table(
        {
            "campaign_id": ["k"] * 4,
            "event_types": [[1]] * 4,
            "features": [[0.5, 0.5]] * 4,
            "label": pa.array([0, 1, 0, None], pa.int8()),
            column: values,
        }
    )
    pq.write_table(table, tmp_path / "part-0.parquet")
    dataset = EventsDataset(str(tmp_path))
    dataset.validate_files()
    with pytest.raises(EventsFormatError, match=f"row {row}: {column} is null or holds a null element"):
        validate_campaign_table(dataset.read_campaigns(["k"])["k"], "k", 5, 2, str(tmp_path))


def test_ids_no_campaign_can_have_are_never_read_and_no_ids_read_nothing(tmp_path):
    """Null, not-UTF-8 and invalid ids in the events: left out of the sizes; an empty id list reads nothing
    (``isin([])`` used to fail the whole batch)."""
    bad_utf8 = pa.Array.from_buffers(
        pa.string(), 1, [None, pa.py_buffer(np.array([0, 2], np.int32).tobytes()), pa.py_buffer(b"a\xff")]
    )
    ids = pa.concat_arrays([pa.array(["ok", "ok", None, "../x", "café"], pa.string()), bad_utf8])
    n = len(ids)
    pq.write_table(
        pa.table(
            {
                "campaign_id": ids,
                "event_types": [[1]] * n,
                "features": [[0.5, 0.5]] * n,
                "label": pa.array([0] * n, pa.int8()),
            }
        ),
        tmp_path / "part-0.parquet",
    )
    dataset = EventsDataset(str(tmp_path))
    dataset.validate_files()
    assert dataset.campaign_sizes() == {"ok": 2}
    assert dataset.read_campaigns([]) == {}
    assert len(dataset.read_campaigns(["ok"])["ok"]) == 2


def test_truncate_sequences_keeps_the_last_events_and_their_features():
    from fleet.formats.events import truncate_sequences

    table = rows("a", 8, num_features=2)  # lengths 1 2 3 4 1 2 3 4
    same, count = truncate_sequences(table, 4, num_features=2)
    assert count == 0 and same is table
    cut, count = truncate_sequences(table, 2, num_features=2)
    assert count == 4 and len(cut) == 8
    for before, after in zip(table.to_pylist(), cut.to_pylist()):
        keep = min(2, len(before["event_types"]))
        assert after["event_types"] == before["event_types"][-keep:]
        assert after["features"] == before["features"][-2 * keep :]
        assert after["label"] == before["label"]
    validate_campaign_table(cut, "a", num_event_types=5, num_features=2, path="p")


def test_a_long_row_pads_only_its_own_minibatch():
    """2,000 rows of 20 events and one of 10,000: the batch is stored packed (events, not rows x 10,000) and
    no minibatch pads more than batch_size * BUCKET_SPREAD * median length events, except the long row alone."""
    from fleet.compression.data import BUCKET_SPREAD, map_minibatches

    n, num_features = 2000, 3
    lengths = [20] * n + [10_000]
    lengths[7], lengths[n] = 10_000, 20  # the long row is not the last one
    table = pa.table(
        {
            "campaign_id": ["a"] * (n + 1),
            "event_types": [[i % 5] * t for i, t in enumerate(lengths)],
            "features": [[float(i)] * (t * num_features) for i, t in enumerate(lengths)],
            "label": pa.array([0] * (n + 1), pa.int8()),
        },
        schema=EVENTS_SCHEMA,
    )
    batch = table_to_batch(table, num_features)
    assert batch.packed_features.numel() == sum(lengths) * num_features
    budget = 512 * BUCKET_SPREAD * 20
    sizes = [(len(index), sub.features.shape[1]) for index, sub in batch.minibatches(512)]
    assert (1, 10_000) in sizes
    assert all(rows * width <= budget for rows, width in sizes if width < 10_000)
    assert sum(rows for rows, _ in sizes) == n + 1
    # results come back in row order, each row computed on its own events only
    out = map_minibatches(lambda t, f, lens: f[torch.arange(len(lens)), lens - 1, 0] + lens, batch)
    assert out.tolist() == [float(i + t) for i, t in enumerate(lengths)]
    selected = batch.select(torch.tensor([7, 3]))
    assert selected.event_types.shape == (2, 10_000) and selected.event_types[1, 20:].eq(0).all()
