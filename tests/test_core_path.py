"""The compression core path in this process, without Ray: stage 1 (soft labels) -> stage 2 (backbone) ->
stages 3-5 (heads), each stage function called on the plan's jobs as fleet.run.pipeline's tasks call it, on a tiny
fleet made here: 4 campaigns of fleet.synthetic.synth's events, tiny randomly initialised GRU teachers (untrained:
their logits vary with the input, which a teacher trained for a few steps on a few hundred rows barely does), one
of them with a corrupt weights file. A few seconds: part of `make test-fast`."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from fleet.compression.data import map_minibatches
from fleet.compression.student import head_num_params
from fleet.formats.backbone_codec import backbone_from_bytes
from fleet.formats.events import EventsDataset, table_to_batch, write_events
from fleet.formats.teachers import WEIGHTS_FILE, TeacherRNN, load_teacher, save_teacher
from fleet.run.plan import make_plan, run_settings
from fleet.run.stages import (
    FIT,
    HOLDOUT,
    VALIDATION,
    CompressConfig,
    StageContext,
    backbone_quotas,
    backbone_sample,
    fit_heads_shard,
    soft_labels,
    train_backbone,
)
from fleet.serve.serving import FleetModel
from fleet.storage.store import VersionWriter
from fleet.synthetic.synth import SynthConfig, campaign_ids, generate

SYNTH = SynthConfig(
    campaigns=4,
    seed=5,
    arch="gru",
    hidden_size=8,
    num_layers=1,
    embed_dim=4,
    num_event_types=8,
    num_features=4,
    min_sequences=200,
    max_sequences=300,
)
CONFIG = CompressConfig(
    hidden_size=8,
    embed_dim=4,
    backbone_steps=30,
    backbone_eval_every=10,
    backbone_batch_size=64,
    head_steps=40,
    campaigns_per_task=2,
)  # 2 shards of 2 campaigns
IDS = campaign_ids(SYNTH.campaigns)
BROKEN = IDS[-1]  # its teacher's weights file is corrupt: stage 1 rejects the campaign
GOOD = IDS[:-1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A full run's stages on the tiny fleet, shard by shard as the pipeline's Ray tasks run them; what each
    returned (stage 1's and stage 3's outputs concatenated over the shards) and the fleet's URIs."""
    root = tmp_path_factory.mktemp("tiny-fleet")
    events_uri, teachers_uri = str(root / "events"), str(root / "teachers")
    write_events(events_uri, pa.concat_tables([generate(SYNTH, i) for i in range(SYNTH.campaigns)]))
    for i, campaign_id in enumerate(IDS):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(i)
            teacher = TeacherRNN(SYNTH.teacher_config(campaign_id))
        with torch.no_grad():
            teacher.readout.weight.mul_(4.0)  # logits that vary (std about 0.5 here), not all near 0
        save_teacher(teachers_uri, teacher, SYNTH.teacher_config(campaign_id))
    (root / "teachers" / BROKEN / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    plan = make_plan(
        teachers_uri,
        events_uri,
        CONFIG,
        run_settings(CONFIG, teachers_uri, events_uri),
        parent=None,
        retrain_backbone=True,
        num_cpus=1,
    )
    ctx = StageContext(teachers_uri, events_uri, CONFIG, plan.num_event_types, plan.num_features)

    # stage 1 (pipeline._soft_labels_stage, _soft_labels_task): the backbone sample takes the quotas of the ok ones
    jobs = plan.soft_label_jobs(backbone_quotas(plan.sizes, CONFIG), {}, set())
    soft, status, sample = {}, [], []
    for job in jobs:
        soft[job.shard], campaigns = soft_labels(job, ctx)
        ok = [c for c, s in zip(campaigns["campaign_id"].to_pylist(), campaigns["status"].to_pylist()) if s == "ok"]
        sample.append(backbone_sample(soft[job.shard], {c: job.backbone_quota[c] for c in ok}, CONFIG.seed))
        status.append(campaigns)
    status, sample = pa.concat_tables(status), pa.concat_tables(sample)
    # stage 2 (pipeline._backbone_task)
    backbone, backbone_stats = train_backbone(sample, ctx)
    # stages 3-5 (pipeline._heads_stage, _heads_task): the campaigns stage 1 passed, with their hashes
    hashes = {
        c: [t, d]
        for c, s, t, d in zip(
            *(status[k].to_pylist() for k in ("campaign_id", "status", "teacher_sha256", "data_fingerprint"))
        )
        if s == "ok"
    }
    heads = pa.concat_tables(
        [fit_heads_shard(job, ctx, soft[job.shard], backbone) for job in plan.head_jobs(hashes, set())]
    )
    return {
        "jobs": jobs,
        "soft": pa.concat_tables(soft.values()),
        "status": status,
        "sample": sample,
        "backbone": backbone,
        "backbone_stats": backbone_stats,
        "heads": heads,
        "events": events_uri,
        "teachers": teachers_uri,
        "root": root,
    }


def _campaign(table: pa.Table, campaign_id: str) -> pa.Table:
    return table.filter(pc.equal(table["campaign_id"], campaign_id))


def test_stage_one_labels_every_teachers_rows_with_its_own_logits_and_rejects_the_broken_teacher(run):
    assert len(run["jobs"]) == 2 and sorted(c for job in run["jobs"] for c in job.campaigns) == IDS
    status = {r["campaign_id"]: r for r in run["status"].to_pylist()}
    assert sorted(status) == IDS
    assert [status[c]["status"] for c in GOOD] == ["ok"] * len(GOOD)
    assert status[BROKEN]["status"] == "rejected" and status[BROKEN]["stage"] == "soft_labels"
    assert BROKEN in status[BROKEN]["reason"] and WEIGHTS_FILE in status[BROKEN]["reason"]
    events = EventsDataset(run["events"]).read_campaigns(IDS)
    assert set(run["soft"]["campaign_id"].to_pylist()) == set(GOOD)
    for campaign_id in GOOD:
        mine = _campaign(run["soft"], campaign_id)
        assert status[campaign_id]["n_rows"] == len(events[campaign_id])
        assert len(status[campaign_id]["teacher_sha256"]) == 64
        assert {FIT, VALIDATION, HOLDOUT} <= set(mine["split"].to_pylist())
        teacher = load_teacher(run["teachers"], campaign_id)
        rows = table_to_batch(events[campaign_id].take(mine["row"]), SYNTH.num_features)
        with torch.no_grad():
            expected = map_minibatches(teacher.model, rows)  # (n,) the teacher run alone on those rows
        np.testing.assert_allclose(mine["teacher_logit"].to_numpy(), expected.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_array_equal(mine["label"].to_numpy(), rows.labels.numpy())


def test_stage_two_trains_one_backbone_on_the_sample_of_the_good_campaigns(run):
    stats, sample = run["backbone_stats"], run["sample"]
    assert set(sample["campaign_id"].to_pylist()) == set(GOOD)
    assert stats["backbone_campaigns"] == len(GOOD)
    assert stats["backbone_rows"] == pc.sum(pc.equal(sample["split"], FIT)).as_py()
    assert stats["backbone_validation_rows"] == pc.sum(pc.equal(sample["split"], VALIDATION)).as_py() > 0
    assert 0 < stats["backbone_steps"] <= CONFIG.backbone_steps and np.isfinite(stats["backbone_validation_loss"])
    backbone, head_prior = backbone_from_bytes(run["backbone"])
    assert backbone.config.hidden_size == CONFIG.hidden_size
    assert (backbone.config.num_event_types, backbone.config.num_features) == (8, 4)
    assert head_prior.shape == (head_num_params(backbone.config),)  # the mean trained head, stage 3's anchor


def test_stage_three_gives_every_good_campaign_a_head_that_tracks_its_teacher(run):
    """Every campaign has a head or a recorded reject; each head, served from a version, follows its teacher on
    its fit rows: its squared error is under half the best constant's (the teacher's mean probability), i.e. it
    explains more than half the variance of the teacher's probabilities."""
    heads = run["heads"]
    rejected = [r["campaign_id"] for r in run["status"].to_pylist() if r["status"] == "rejected"]
    assert sorted(heads["campaign_id"].to_pylist()) == GOOD and sorted(GOOD + rejected) == IDS
    assert set(heads["status"].to_pylist()) <= {"ok", "capacity", "fallback"}
    writer = VersionWriter(str(run["root"] / "store"), "tiny", "v1")
    writer.write_backbone_bytes(run["backbone"])
    writer.write_heads(heads)
    model = FleetModel.open(writer.commit())
    events = EventsDataset(run["events"]).read_campaigns(GOOD)
    for row in heads.to_pylist():
        campaign_id = row["campaign_id"]
        mine = _campaign(run["soft"], campaign_id)
        assert row["n_train"] == pc.sum(pc.equal(mine["split"], FIT)).as_py()
        assert row["n_holdout"] == pc.sum(pc.equal(mine["split"], HOLDOUT)).as_py() > 0
        fit = mine.filter(pc.equal(mine["split"], FIT))
        table = events[campaign_id].take(fit["row"])
        p_student = model.predict_columns(
            campaign_id, table["event_types"].to_pylist(), table["features"].to_pylist()
        )  # (n,)
        p_teacher = 1.0 / (1.0 + np.exp(-fit["teacher_logit"].to_numpy().astype(np.float64)))  # (n,)
        student_error = np.mean((p_student - p_teacher) ** 2)
        constant_error = np.mean((p_teacher.mean() - p_teacher) ** 2)
        assert student_error < 0.5 * constant_error, (campaign_id, student_error, constant_error)
