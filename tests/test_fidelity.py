"""Compression core on a real small fleet (stage functions called directly, no Ray): the student
tracks its teachers on hold-out data, and 4-bit heads lose almost nothing against float heads."""

import numpy as np
import pyarrow.compute as pc
import pytest
import safetensors.torch
import torch

from fleet.compression.data import map_minibatches
from fleet.formats.backbone_codec import backbone_from_bytes
from fleet.formats.events import EventsDataset, table_to_batch
from fleet.formats.teachers import load_teacher
from fleet.run.stages import (
    BORROWED,
    FIT,
    CompressConfig,
    ShardJob,
    StageContext,
    backbone_quotas,
    backbone_sample,
    borrowed_pool,
    borrowed_pool_rows,
    fit_heads_shard,
    in_support,
    soft_labels,
    train_backbone,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fitted(small_fleet):
    config = CompressConfig(backbone_steps=600, backbone_per_campaign=300, head_steps=300)
    ctx = StageContext(small_fleet["teachers"], small_fleet["events"], config, 24, 8)
    campaigns = [f"campaign-{i:05d}" for i in range(20)]
    soft, status = soft_labels(ShardJob(campaigns), ctx)
    assert status["status"].to_pylist() == ["ok"] * 20
    quotas = backbone_quotas(dict(zip(status["campaign_id"].to_pylist(), status["n_rows"].to_pylist())), config)
    backbone, _ = train_backbone(backbone_sample(soft, quotas, config.seed), ctx)
    hashes = dict(
        zip(
            status["campaign_id"].to_pylist(),
            zip(status["teacher_sha256"].to_pylist(), status["data_fingerprint"].to_pylist()),
        )
    )
    job = ShardJob(campaigns, hashes=hashes)

    def heads(**overrides):
        ctx.config = CompressConfig(**{**config.to_dict(), **overrides})
        return fit_heads_shard(job, ctx, soft, backbone).to_pylist()

    return {"fp16": heads(bits=16), "int4": heads(bits=4), "auto": heads(bits="auto")}


def auc_diffs(rows):
    return np.array([r["student_auc"] - r["teacher_auc"] for r in rows if r["student_auc"] is not None])


def test_student_tracks_teachers_on_holdout(fitted):
    diffs = auc_diffs(fitted["auto"])
    assert len(diffs) >= 8  # campaigns with enough hold-out positives for an AUC
    assert np.median(diffs) >= -0.02
    assert np.median([r["mean_abs_diff"] for r in fitted["auto"]]) < 0.05


def test_int4_heads_lose_at_most_half_a_point_of_auc(fitted):
    by_id = {r["campaign_id"]: r for r in fitted["fp16"]}
    loss = [
        by_id[r["campaign_id"]]["student_auc"] - r["student_auc"]
        for r in fitted["int4"]
        if r["student_auc"] is not None
    ]
    assert np.median(loss) <= 0.005
    assert all(r["bits"] == 4 for r in fitted["int4"])


def test_auto_bits_is_smaller_than_int8_and_passes_its_gate(fitted):
    bits = [r["bits"] for r in fitted["auto"]]
    assert np.mean(bits) < 8
    assert all(r["status"] in ("ok", "fp16_fallback") for r in fitted["auto"])


def test_borrowed_rows_are_labelled_by_the_campaigns_own_teacher(small_fleet):
    """Stage 1 with a borrowed pool: each teacher tops its transfer set up to ``borrowed_rows`` with pool rows
    of the other campaigns (never its own), labelled with the logits it gives those sequences when run on
    them directly; labels are unknown (NaN)."""
    config = CompressConfig(borrowed_rows=2000)
    ctx = StageContext(small_fleet["teachers"], small_fleet["events"], config, 24, 8)
    events = EventsDataset(small_fleet["events"])
    pool = borrowed_pool(events, borrowed_pool_rows(events.campaign_sizes(), config), 24, 8, config.max_sequence_length)
    pool_batch = table_to_batch(pool, 8)
    campaigns = ["campaign-00000", "campaign-00003"]
    soft, status = soft_labels(ShardJob(campaigns), ctx, pool)
    assert status["status"].to_pylist() == ["ok", "ok"]
    for campaign_id in campaigns:
        mine = soft.filter(pc.and_(pc.equal(soft["campaign_id"], campaign_id), pc.equal(soft["split"], BORROWED)))
        own = soft.filter(pc.and_(pc.equal(soft["campaign_id"], campaign_id), pc.equal(soft["split"], FIT)))
        own_types = table_to_batch(events.read_campaigns([campaign_id])[campaign_id].take(own["row"]), 8).packed_types
        eligible = (pool["campaign_id"].to_numpy(zero_copy_only=False) != campaign_id) & in_support(
            pool_batch, own_types
        )
        rows = mine["row"].to_numpy()
        assert len(rows) == min(eligible.sum(), config.borrowed_rows - len(own)) > 0
        assert len(set(rows.tolist())) == len(rows) and eligible[rows].all()  # other campaigns', of types it knows
        teacher = load_teacher(small_fleet["teachers"], campaign_id)
        expected = map_minibatches(teacher.model, table_to_batch(pool.take(rows), 8))
        np.testing.assert_allclose(mine["teacher_logit"].to_numpy(), expected.numpy(), rtol=0, atol=1e-6)
        assert np.isnan(mine["label"].to_numpy()).all()


def test_stage_two_keeps_the_width_with_the_lowest_validation_loss(small_fleet):
    """``hidden_size_grid``: one backbone per width, the one with the lowest validation loss is stored, and it
    is the very backbone that width gives when trained alone."""
    settings = {"backbone_steps": 60, "backbone_eval_every": 20, "backbone_per_campaign": 100}
    config = CompressConfig(hidden_size_grid=(8, 24), **settings)
    ctx = StageContext(small_fleet["teachers"], small_fleet["events"], config, 24, 8)
    campaigns = [f"campaign-{i:05d}" for i in range(6)]
    soft, status = soft_labels(ShardJob(campaigns), ctx)
    sample = backbone_sample(soft, backbone_quotas(dict(zip(campaigns, status["n_rows"].to_pylist())), config), 0)
    reports = []
    data, stats = train_backbone(sample, ctx, report=reports.append)
    # stage 2's progress: steps over both widths (a width stopped early counts as done), losses
    steps = [r["step"] for r in reports]
    assert steps == sorted(steps) and steps[-1] == 120 and {r["steps"] for r in reports} == {120}
    assert all(np.isfinite(r["loss"]) for r in reports) and reports[-1]["validation_loss"] is not None
    losses = stats["backbone_width_validation_losses"]
    assert set(losses) == {"8", "24"} and losses["8"] != losses["24"]
    best = min(losses, key=losses.get)
    assert backbone_from_bytes(data)[0].config.hidden_size == int(best) == stats["backbone_hidden_size"]
    alone_ctx = StageContext(ctx.teachers_uri, ctx.events_uri, CompressConfig(hidden_size=int(best), **settings), 24, 8)
    alone, alone_stats = train_backbone(sample, alone_ctx)
    assert alone_stats["backbone_validation_loss"] == losses[best]
    tensors, alone_tensors = safetensors.torch.load(data), safetensors.torch.load(alone)  # (metadata order varies)
    assert tensors.keys() == alone_tensors.keys() and all(torch.equal(tensors[k], alone_tensors[k]) for k in tensors)
