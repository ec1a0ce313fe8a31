"""fleet synth: a realistic synthetic fleet, deterministic for a seed, teachers trained on local Ray."""

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fleet.core.errors import FleetError
from fleet.formats.events import (
    EVENTS_COMPLETE,
    EVENTS_SCHEMA,
    EventsDataset,
    events_complete,
    table_to_batch,
    write_events_in_parts,
)
from fleet.formats.teachers import list_teacher_campaigns, load_teacher
from fleet.synthetic.synth import SynthConfig, campaign_ids, generate, generate_campaign


def test_generation_is_deterministic_and_ad_tech_shaped():
    config = SynthConfig(campaigns=300, seed=3)
    a, b = generate_campaign(config, 5), generate_campaign(config, 5)
    assert a.equals(b)
    assert not a.equals(generate_campaign(SynthConfig(campaigns=300, seed=4), 5))
    sizes, rates, lengths = [], [], []
    for i in range(120):
        table = generate_campaign(SynthConfig(campaigns=300, seed=3, max_sequences=20_000), i)
        sizes.append(len(table))
        rates.append(table["label"].to_numpy().mean())
        lengths.extend(pa.compute.list_value_length(table["event_types"]).to_pylist())
    sizes, rates = np.array(sizes), np.array(rates)
    assert np.median(sizes) < 400 and sizes.max() > 2000  # heavy tail: many small, a few large
    assert sizes.min() >= 100
    # target rates are log-uniform in [2%, 30%]; small campaigns realise them with sampling noise
    assert np.percentile(rates, 5) > 0.012 and rates.max() < 0.4 and np.median(rates) < 0.15
    assert min(lengths) >= 5 and max(lengths) <= 100


def test_campaign_ids_are_valid_and_sorted():
    ids = campaign_ids(12)
    assert ids == sorted(ids) and ids[0] == "campaign-00000"


PARTS_FLEET = SynthConfig(campaigns=6, seed=9, num_event_types=8, min_sequences=20, max_sequences=60)


def _part_files(uri) -> list[str]:
    return sorted(str(p) for p in uri.glob("part-*.parquet"))


def _read_back(uri) -> pa.Table:
    """Every row of an events dataset, file by file in name order, in the events schema (as written)."""
    return pa.concat_tables(pq.read_table(f) for f in _part_files(uri))


def test_events_written_in_parts_read_back_as_generated(tmp_path):
    """A fleet's events written in several small parts hold exactly ``generate(config, i)`` for every campaign,
    the same rows as one part, readable per campaign; the writer holds fewer than ``part_rows`` rows (plus the
    table it just took) between writes, whatever the fleet's size."""
    config = PARTS_FLEET
    generated = [generate(config, i).cast(EVENTS_SCHEMA) for i in range(config.campaigns)]
    one, parts = tmp_path / "one", tmp_path / "parts"
    write_events_in_parts(str(one), iter(generated), part_rows=10**9)
    part_rows, taken = 50, []

    def checked_tables():  # before each table is taken, what was taken and not yet written is under part_rows
        for table in generated:
            written = sum(pq.ParquetFile(f).metadata.num_rows for f in _part_files(parts))
            assert sum(map(len, taken)) - written < part_rows
            taken.append(table)
            yield table

    write_events_in_parts(str(parts), checked_tables(), part_rows=part_rows)
    assert len(_part_files(one)) == 1 and len(_part_files(parts)) > 2
    assert events_complete(str(one)) and events_complete(str(parts))
    expected = pa.concat_tables(generated)
    assert _read_back(one).equals(expected) and _read_back(parts).equals(expected)
    read = EventsDataset(str(parts)).read_campaigns(campaign_ids(config.campaigns))
    for cid, table in zip(campaign_ids(config.campaigns), generated):
        assert read[cid].cast(EVENTS_SCHEMA).equals(table)


def test_interrupted_events_write_is_incomplete_then_rewritten(tmp_path):
    """A write that dies mid-way leaves no completion marker (readers of a fleet can tell), and the next write
    replaces its parts instead of adding to them; campaigns out of order are refused."""
    config, uri = PARTS_FLEET, tmp_path / "events"
    generated = [generate(config, i) for i in range(config.campaigns)]

    def crashing():
        yield from generated[:4]
        raise RuntimeError("driver died")

    with pytest.raises(RuntimeError):
        write_events_in_parts(str(uri), crashing(), part_rows=50)
    assert _part_files(uri) and not events_complete(str(uri))
    write_events_in_parts(str(uri), iter(generated[3:]), part_rows=50)
    assert events_complete(str(uri)) and (uri / EVENTS_COMPLETE).exists()
    assert EventsDataset(str(uri)).campaign_ids() == campaign_ids(config.campaigns)[3:]
    with pytest.raises(ValueError, match="not after the previous part"):
        write_events_in_parts(str(uri), iter(generated[::-1]), part_rows=1)
    assert not events_complete(str(uri))


def test_small_fleet_on_ray(small_fleet):
    """`fleet synth` on local Ray: events + one loadable teacher per campaign that beats chance."""
    events = EventsDataset(small_fleet["events"])
    ids = events.campaign_ids()
    assert ids == campaign_ids(20) == list_teacher_campaigns(small_fleet["teachers"])
    aucs = []
    from fleet.compression.metrics import auc

    for campaign_id, table in events.read_campaigns(ids).items():
        teacher = load_teacher(small_fleet["teachers"], campaign_id)
        batch = table_to_batch(table, 8)
        p = teacher.model(batch.event_types, batch.features, batch.lengths).detach().numpy()
        value = auc(p, batch.labels.numpy())
        if value is not None:
            aucs.append(value)
    assert np.median(aucs) > 0.55  # small teachers on noisy labels, but clearly better than chance


def test_interrupted_synth_resumes_and_another_fleet_is_refused(ray_local, tmp_path):
    """A second run keeps the teachers already saved, trains the missing or half-written ones, and
    refuses an output directory that holds another fleet."""
    from fleet.run.pipeline import run_synth

    config = SynthConfig(
        campaigns=4,
        seed=5,
        hidden_size=8,
        num_layers=1,
        embed_dim=4,
        num_event_types=8,
        min_sequences=100,
        max_sequences=200,
        max_epochs=1,
    )
    out = tmp_path / "fleet"
    first = run_synth(config, str(out), part_rows=300)  # 4 campaigns of 100-200 rows: several parts
    assert not any(s["resumed"] for s in first["campaigns"])
    events = out / "events"
    assert len(_part_files(events)) > 1 and events_complete(str(events))
    assert _read_back(events).equals(pa.concat_tables(generate(config, i).cast(EVENTS_SCHEMA) for i in range(4)))
    complete_part = events / "part-00000.parquet"
    part_mtime = complete_part.stat().st_mtime_ns
    teachers = out / "teachers"
    kept = teachers / "campaign-00000" / "model.safetensors"
    kept_mtime = kept.stat().st_mtime_ns
    shutil.rmtree(teachers / "campaign-00001")  # never started
    os.remove(teachers / "campaign-00002" / "config.json")  # interrupted between weights and config

    second = run_synth(config, str(out))
    resumed = {s["campaign_id"]: s["resumed"] for s in second["campaigns"]}
    assert resumed == {"campaign-00000": True, "campaign-00001": False, "campaign-00002": False, "campaign-00003": True}
    assert kept.stat().st_mtime_ns == kept_mtime
    assert complete_part.stat().st_mtime_ns == part_mtime  # complete events are kept, not written again

    os.remove(events / EVENTS_COMPLETE)  # the events writer died after its last part: they are written again
    os.remove(events / "part-00001.parquet")
    third = run_synth(config, str(out), part_rows=300)
    assert all(s["resumed"] for s in third["campaigns"])
    assert events_complete(str(events))
    assert _read_back(events).equals(pa.concat_tables(generate(config, i).cast(EVENTS_SCHEMA) for i in range(4)))
    assert list_teacher_campaigns(str(teachers)) == campaign_ids(4)
    for cid in campaign_ids(4):
        load_teacher(str(teachers), cid)

    with pytest.raises(FleetError, match="differs in seed"):
        run_synth(SynthConfig(**{**vars(config), "seed": 6}), str(out))
    os.remove(out / "synth.json")
    with pytest.raises(FleetError, match="no synth.json"):
        run_synth(config, str(out))
