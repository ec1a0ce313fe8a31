"""The compression core path in this process, without Ray: stage 1 (soft labels) -> stage 2 (backbone) ->
stages 3-5 (heads), each stage function called as fleet.run.pipeline's tasks call it, on a tiny fleet made
here: 4 campaigns of fleet.synthetic.synth's events, tiny randomly initialised GRU teachers (untrained: their
logits vary with the input, which a teacher trained for a few steps on a few hundred rows barely does), and
the last campaign without a teacher. A few seconds: part of `make test-fast`."""

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
from fleet.formats.teachers import TeacherRNN, load_teacher, save_teacher
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

SYNTH = SynthConfig(campaigns=4, seed=5, arch="gru", hidden_size=8, num_layers=1, embed_dim=4, num_event_types=8,
                    num_features=4, min_sequences=200, max_sequences=300)
CONFIG = CompressConfig(hidden_size=8, embed_dim=4, backbone_steps=30, backbone_eval_every=10,
                        backbone_batch_size=64, head_steps=40)
IDS = campaign_ids(SYNTH.campaigns)
WITH_TEACHER, WITHOUT_TEACHER = IDS[:-1], IDS[-1]  # the last campaign has events but no teacher: stage 1 rejects it


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The three stages on one shard of the whole fleet; what each returned, and the fleet's URIs."""
    root = tmp_path_factory.mktemp("tiny-fleet")
    events_uri, teachers_uri = str(root / "events"), str(root / "teachers")
    write_events(events_uri, pa.concat_tables([generate(SYNTH, i) for i in range(SYNTH.campaigns)]))
    for i, campaign_id in enumerate(WITH_TEACHER):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(i)
            teacher = TeacherRNN(SYNTH.teacher_config(campaign_id))
        with torch.no_grad():
            teacher.readout.weight.mul_(4.0)  # logits that vary (std about 0.5 here), not all near 0
        save_teacher(teachers_uri, teacher, SYNTH.teacher_config(campaign_id))
    ctx = StageContext(teachers_uri, events_uri, CONFIG, SYNTH.num_event_types, SYNTH.num_features)
    quotas = backbone_quotas(EventsDataset(events_uri).campaign_sizes(), CONFIG)  # the plan's, every campaign

    # stage 1 (pipeline._soft_labels_task): the backbone sample takes the quotas of the campaigns that are ok
    soft, status = soft_labels({"campaigns": IDS, "parent": {}, "packed": {}, "teacher_conflicts": {}}, ctx)
    ok = [c for c, s in zip(status["campaign_id"].to_pylist(), status["status"].to_pylist()) if s == "ok"]
    sample = backbone_sample(soft, {c: quotas[c] for c in ok}, CONFIG.seed)
    # stage 2 (pipeline._backbone_task)
    backbone, backbone_stats = train_backbone(sample, ctx)
    # stages 3-5 (pipeline._heads_task): the campaigns that are ok, with their hashes from stage 1
    rows = {r["campaign_id"]: r for r in status.to_pylist()}
    job = {"campaigns": ok, "hashes": {c: [rows[c]["teacher_sha256"], rows[c]["data_fingerprint"]] for c in ok}}
    heads = fit_heads_shard(job, ctx, soft, backbone)
    return {"soft": soft, "status": status, "sample": sample, "backbone": backbone, "backbone_stats": backbone_stats,
            "heads": heads, "events": events_uri, "teachers": teachers_uri, "root": root}


def _campaign(table: pa.Table, campaign_id: str) -> pa.Table:
    return table.filter(pc.equal(table["campaign_id"], campaign_id))


def test_stage_one_labels_every_teachers_rows_with_its_own_logits_and_rejects_the_campaign_without_one(run):
    status = {r["campaign_id"]: r for r in run["status"].to_pylist()}
    assert list(status) == IDS
    assert [status[c]["status"] for c in WITH_TEACHER] == ["ok"] * len(WITH_TEACHER)
    assert status[WITHOUT_TEACHER]["status"] == "rejected" and status[WITHOUT_TEACHER]["stage"] == "soft_labels"
    assert WITHOUT_TEACHER in status[WITHOUT_TEACHER]["reason"]
    events = EventsDataset(run["events"]).read_campaigns(IDS)
    assert set(run["soft"]["campaign_id"].to_pylist()) == set(WITH_TEACHER)
    for campaign_id in WITH_TEACHER:
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


def test_stage_two_trains_one_backbone_on_the_sample_of_the_campaigns_with_teachers(run):
    stats, sample = run["backbone_stats"], run["sample"]
    assert set(sample["campaign_id"].to_pylist()) == set(WITH_TEACHER)
    assert stats["backbone_campaigns"] == len(WITH_TEACHER)
    assert stats["backbone_rows"] == pc.sum(pc.equal(sample["split"], FIT)).as_py()
    assert stats["backbone_validation_rows"] == pc.sum(pc.equal(sample["split"], VALIDATION)).as_py() > 0
    assert 0 < stats["backbone_steps"] <= CONFIG.backbone_steps and np.isfinite(stats["backbone_validation_loss"])
    backbone, head_prior = backbone_from_bytes(run["backbone"])
    assert backbone.config.hidden_size == CONFIG.hidden_size
    assert (backbone.config.num_event_types, backbone.config.num_features) == (8, 4)
    assert head_prior.shape == (head_num_params(backbone.config),)  # the mean trained head, stage 3's anchor


def test_stage_three_gives_every_campaign_with_a_teacher_a_head_that_tracks_its_teacher(run):
    """Every campaign has a head or a recorded reject; each head, served from a version, follows its teacher on
    its fit rows: its squared error is under half the best constant's (the teacher's mean probability), i.e. it
    explains more than half the variance of the teacher's probabilities."""
    heads = run["heads"]
    rejected = [r["campaign_id"] for r in run["status"].to_pylist() if r["status"] == "rejected"]
    assert heads["campaign_id"].to_pylist() == WITH_TEACHER and sorted(WITH_TEACHER + rejected) == IDS
    assert set(heads["status"].to_pylist()) <= {"ok", "capacity", "fallback"}
    writer = VersionWriter(str(run["root"] / "store"), "tiny", "v1")
    writer.write_backbone_bytes(run["backbone"])
    writer.write_heads(heads)
    model = FleetModel.open(writer.commit())
    events = EventsDataset(run["events"]).read_campaigns(WITH_TEACHER)
    for row in heads.to_pylist():
        campaign_id = row["campaign_id"]
        mine = _campaign(run["soft"], campaign_id)
        assert row["n_train"] == pc.sum(pc.equal(mine["split"], FIT)).as_py()
        assert row["n_holdout"] == pc.sum(pc.equal(mine["split"], HOLDOUT)).as_py() > 0
        fit = mine.filter(pc.equal(mine["split"], FIT))
        table = events[campaign_id].take(fit["row"])
        p_student = model.predict_columns(campaign_id, table["event_types"].to_pylist(),
                                          table["features"].to_pylist())  # (n,)
        p_teacher = 1.0 / (1.0 + np.exp(-fit["teacher_logit"].to_numpy().astype(np.float64)))  # (n,)
        student_error = np.mean((p_student - p_teacher) ** 2)
        constant_error = np.mean((p_teacher.mean() - p_teacher) ** 2)
        assert student_error < 0.5 * constant_error, (campaign_id, student_error, constant_error)
