"""fleet synth: a realistic synthetic fleet, deterministic for a seed, teachers trained on local Ray."""

import os
import shutil

import numpy as np
import pyarrow as pa
import pytest

from fleet.errors import FleetError
from fleet.events import EventsDataset, table_to_batch
from fleet.synth import SynthConfig, campaign_ids, generate_campaign
from fleet.teachers import list_teacher_campaigns, load_teacher


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


def test_small_fleet_on_ray(small_fleet):
    """`fleet synth` on local Ray: events + one loadable teacher per campaign that beats chance."""
    events = EventsDataset(small_fleet["events"])
    ids = events.campaign_ids()
    assert ids == campaign_ids(20) == list_teacher_campaigns(small_fleet["teachers"])
    aucs = []
    from fleet.metrics import auc

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
    from fleet.pipeline import run_synth

    config = SynthConfig(campaigns=4, seed=5, hidden_size=8, num_layers=1, embed_dim=4, num_event_types=8,
                         min_sequences=100, max_sequences=200, max_epochs=1)
    out = tmp_path / "fleet"
    first = run_synth(config, str(out))
    assert not any(s["resumed"] for s in first["campaigns"])
    teachers = out / "teachers"
    kept = teachers / "campaign-00000" / "model.safetensors"
    kept_mtime = kept.stat().st_mtime_ns
    shutil.rmtree(teachers / "campaign-00001")  # never started
    os.remove(teachers / "campaign-00002" / "config.json")  # interrupted between weights and config

    second = run_synth(config, str(out))
    resumed = {s["campaign_id"]: s["resumed"] for s in second["campaigns"]}
    assert resumed == {"campaign-00000": True, "campaign-00001": False, "campaign-00002": False, "campaign-00003": True}
    assert kept.stat().st_mtime_ns == kept_mtime
    assert list_teacher_campaigns(str(teachers)) == campaign_ids(4)
    for cid in campaign_ids(4):
        load_teacher(str(teachers), cid)

    with pytest.raises(FleetError, match="differs in seed"):
        run_synth(SynthConfig(**{**vars(config), "seed": 6}), str(out))
    os.remove(out / "synth.json")
    with pytest.raises(FleetError, match="no synth.json"):
        run_synth(config, str(out))
