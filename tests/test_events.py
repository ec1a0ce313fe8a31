"""Events contract: round trip, per-campaign pushdown reads, hold-out split and bad rows."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fleet.errors import EventsFormatError, InvalidCampaignIdError
from fleet.events import (
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
    return pa.table({"campaign_id": [campaign_id] * n, "event_types": types, "features": feats, "label": labels},
                    schema=EVENTS_SCHEMA)


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
        (lambda t: t.set_column(1, "event_types", pa.array([[0, 9]] + [[1]] * 3, pa.list_(pa.int32()))), "row 0: event type outside"),
        (lambda t: t.set_column(1, "event_types", pa.array([[1]] * 3 + [[-1]], pa.list_(pa.int32()))), "row 3: event type outside"),
        (lambda t: t.set_column(2, "features", pa.array([[1.0]] * 4, pa.list_(pa.float32()))), "row 0: features has 1 values"),
        (lambda t: t.set_column(1, "event_types", pa.array([[]] * 4, pa.list_(pa.int32()))), "empty sequence"),
        (lambda t: t.set_column(3, "label", pa.array([0, 1, 2, None], pa.int8())), "label must be"),
        (lambda t: t.set_column(2, "features", pa.array([[float("nan"), 0.0]] * 4, pa.list_(pa.float32()))), "NaN or inf"),
    ],
)
def test_bad_rows_raise_named_errors(mutate, match):
    table = pa.table({"campaign_id": ["k"] * 4, "event_types": [[1]] * 4, "features": [[0.5, 0.5]] * 4,
                      "label": [0, 1, 0, None]}, schema=EVENTS_SCHEMA)
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
    from fleet.events import rows_by_campaign

    ids = pa.chunked_array([["b", "a", "b"], ["c", "a"]])
    groups = rows_by_campaign(ids)
    assert {k: v.tolist() for k, v in groups.items()} == {"b": [0, 2], "a": [1, 4], "c": [3]}
    assert rows_by_campaign(pa.array([], pa.string())) == {}


def test_split_by_campaign_keeps_table_order_per_campaign():
    from fleet.events import split_by_campaign

    table = pa.concat_tables([pa.table({"campaign_id": ["b", "a"], "x": [0, 1]}),
                              pa.table({"campaign_id": ["b", "c", "a"], "x": [2, 3, 4]})])
    parts = split_by_campaign(table)
    assert list(parts) == ["a", "b", "c"]
    assert {k: v["x"].to_pylist() for k, v in parts.items()} == {"a": [1, 4], "b": [0, 2], "c": [3]}
    chosen = split_by_campaign(table, ["c", "zz"])
    assert chosen["c"]["x"].to_pylist() == [3] and chosen["zz"].num_rows == 0
