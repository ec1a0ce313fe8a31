"""Events are untrusted input (docs/security.md, section 3): whatever an events producer writes, a bad file is
refused by name before any stage, a bad campaign is quarantined, and nothing crashes the run. Real Parquet files,
real reference teachers, stage 1 itself and `fleet compress` on the shared local Ray."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save as save_safetensors

from fleet.core.errors import EventsFormatError
from fleet.formats.events import table_to_batch, write_events
from fleet.formats.teachers import TeacherConfig, TeacherRNN, load_teacher
from fleet.run import stages
from fleet.run.stages import ShardJob

SPACE = {"num_event_types": 6, "num_features": 2}
NOT_UTF8 = "caf\udcff"  # a directory name with the byte 0xff, as Python lists it


def write_teacher(root: Path, campaign_id: str) -> None:
    """A random reference teacher under ``root/campaign_id`` (its config names "x" where the id is invalid)."""
    valid = campaign_id.isascii() and campaign_id.isalnum()
    config = TeacherConfig(campaign_id=campaign_id if valid else "x", embed_dim=4, hidden_size=8, num_layers=1, **SPACE)
    directory = root / campaign_id
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(len(campaign_id))
    (directory / "model.safetensors").write_bytes(save_safetensors(dict(TeacherRNN(config).state_dict())))
    (directory / "config.json").write_text(json.dumps(config.to_json()))


def events(campaigns: dict[str, int], long_rows: dict[str, int] | None = None) -> pa.Table:
    """``rows`` sequences per campaign (2-5 events); ``long_rows[c]``: row 3 of ``c`` has that many events."""
    rng = np.random.default_rng(0)
    out = {"campaign_id": [], "event_types": [], "features": [], "label": []}
    for campaign, rows in campaigns.items():
        for i in range(rows):
            steps = (long_rows or {}).get(campaign, 0) if i == 3 else 0
            steps = steps or int(rng.integers(2, 6))
            out["campaign_id"].append(campaign)
            out["event_types"].append(rng.integers(0, SPACE["num_event_types"], steps).tolist())
            out["features"].append(rng.normal(size=steps * SPACE["num_features"]).tolist())
            out["label"].append(int(rng.integers(0, 2)))
    return pa.table(out)


def test_stage_one_quarantines_invalid_and_non_ascii_ids_and_null_elements(tmp_path):
    """A batch whose only ids are invalid (non-ASCII, not UTF-8) used to fail the task (``isin([])``), and an id
    that is not UTF-8 could not even be written to the status table; null elements name their column."""
    root = tmp_path / "teachers"
    for campaign in ("ok", "nulls", "é", NOT_UTF8):
        write_teacher(root, campaign)
    table = events({"ok": 30, "nulls": 30})
    types = table["event_types"].to_pylist()
    types[40] = [1, None, 2]  # row 10 of "nulls"
    table = table.set_column(1, "event_types", pa.array(types, pa.list_(pa.int64())))
    pq.write_table(table, tmp_path / "events.parquet")
    ctx = stages.StageContext(str(root), str(tmp_path / "events.parquet"), stages.CompressConfig(), **SPACE)

    soft, status = stages.soft_labels(ShardJob(["é", NOT_UTF8]), ctx)
    assert soft.num_rows == 0
    assert status["campaign_id"].to_pylist() == ["\\xe9", "caf\\udcff"]
    assert status["status"].to_pylist() == ["rejected", "rejected"]
    assert all("invalid campaign id" in reason for reason in status["reason"].to_pylist())

    _, status = stages.soft_labels(ShardJob(["nulls", "ok"]), ctx)
    rows = {r["campaign_id"]: r for r in status.to_pylist()}
    assert rows["ok"]["status"] == "ok" and rows["ok"]["n_truncated"] == 0
    assert rows["nulls"]["status"] == "rejected"
    assert "row 10: event_types is null or holds a null element" in rows["nulls"]["reason"]


def test_stage_one_keeps_the_last_max_sequence_length_events_of_a_long_row(tmp_path):
    root = tmp_path / "teachers"
    write_teacher(root, "long")
    table = events({"long": 20}, long_rows={"long": 3000})
    write_events(str(tmp_path / "events"), table)
    config = stages.CompressConfig(max_sequence_length=100)
    ctx = stages.StageContext(str(root), str(tmp_path / "events"), config, **SPACE)
    soft, status = stages.soft_labels(ShardJob(["long"]), ctx)
    assert status["status"].to_pylist() == ["ok"] and status["n_truncated"].to_pylist() == [1]
    assert status["n_rows"].to_pylist() == [20]
    teacher = load_teacher(str(root), "long")
    row = table.slice(3, 1)
    cut = row.set_column(1, "event_types", pa.array([row["event_types"][0].as_py()[-100:]], pa.list_(pa.int64())))
    cut = cut.set_column(2, "features", pa.array([row["features"][0].as_py()[-200:]], pa.list_(pa.float32())))
    batch = table_to_batch(cut, SPACE["num_features"])
    with torch.no_grad():
        expected = teacher.model(batch.event_types, batch.features, batch.lengths)
    got = soft.filter(pa.compute.equal(soft["row"], 3))["teacher_logit"].to_pylist()
    assert got == pytest.approx(expected.tolist(), abs=1e-6)


TINY = {
    "hidden_size": 8,
    "embed_dim": 4,
    "backbone_steps": 20,
    "backbone_eval_every": 10,
    "head_steps": 20,
    "head_l2_grid": (1.0,),
    "backbone_batch_size": 32,
}


@pytest.mark.slow
def test_compress_counts_truncated_rows_quarantines_bad_ids_and_refuses_bad_files_before_any_stage(ray_local, tmp_path):
    from fleet.cli.main import summary_table
    from fleet.run.pipeline import run_compress
    from fleet.storage.store import FleetVersion

    root = tmp_path / "teachers"
    campaigns = {f"c{i}": 60 for i in range(3)}
    for campaign in [*campaigns, "é", NOT_UTF8]:
        write_teacher(root, campaign)
    events_dir = tmp_path / "events"
    write_events(str(events_dir), events(campaigns, long_rows={"c1": 1500}))
    config = stages.CompressConfig(**TINY)
    run = lambda run_id: run_compress(
        teachers_uri=str(root),
        events_uri=str(events_dir),
        store_uri=str(tmp_path / "store"),
        fleet="f",
        config=config,
        run_id=run_id,
        register=False,
    )
    stale = (
        tmp_path / "store" / "f" / "versions" / "old" / f".heads.parquet.tmp-{'d' * 32}"
    )  # an interrupted write's leftover
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    os.utime(stale, (1_000_000_000, 1_000_000_000))
    result = run("r1")
    assert result.exit_code == 3
    assert not stale.exists()  # the next run of the store removed it
    assert sorted(r["campaign_id"] for r in result.rejects) == sorted(["\\xe9", "caf\\udcff"])
    assert result.metrics["rows_truncated"] == 1
    assert FleetVersion.open(result.manifest_uri).manifest["metrics"]["rows_truncated"] == 1
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(summary_table(result))
    assert "rows truncated to max_sequence_length" in console.export_text()

    bad = events({"c9": 4})
    bad = bad.set_column(1, "event_types", pa.array([[1.5, 2.5]] * 4, pa.list_(pa.float64())))
    pq.write_table(bad, events_dir / "part-99999.parquet")
    with pytest.raises(EventsFormatError, match="column 'event_types': expected list<int32>") as info:
        run("r2")
    assert info.value.path == str(events_dir / "part-99999.parquet")
    assert not (tmp_path / "store" / "f" / "runs" / "r2").exists()  # refused before any stage wrote anything
