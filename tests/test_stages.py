"""fleet.run.stages pieces that need no fleet: the backbone sample's budget and the per-campaign gate."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from fleet.compression.data import SequenceBatch
from fleet.compression.student import StudentConfig, head_num_params
from fleet.run.stages import (
    FIT,
    SOFT_LABELS_SCHEMA,
    VALIDATION,
    CampaignGate,
    CompressConfig,
    backbone_quotas,
    backbone_sample,
    borrowed_pool_rows,
    expected_fit_rows,
    in_support,
    row_splits,
)


def test_backbone_quotas_take_every_row_when_the_fleet_fits_the_budget():
    config = CompressConfig(backbone_max_sequences=10_000)
    sizes = {"a": 100, "b": 1000, "c": 3000}
    expected = {c: min(expected_fit_rows(n, config), config.backbone_per_campaign) for c, n in sizes.items()}
    assert backbone_quotas(sizes, config) == expected and expected["c"] == config.backbone_per_campaign


def test_backbone_quotas_grow_with_the_square_root_of_data_within_budget_and_cap():
    config = CompressConfig(backbone_max_sequences=2000, backbone_per_campaign=400)
    sizes = {f"c{i:03d}": n for i, n in enumerate([100] * 50 + [400] * 10 + [10_000] * 2)}
    quotas = backbone_quotas(sizes, config)
    assert abs(sum(quotas.values()) - 2000) <= len(sizes)  # about the budget (rounding down per campaign)
    small, medium, large = quotas["c000"], quotas["c050"], quotas["c060"]
    assert small < medium < large <= 400  # bigger campaigns teach more, never beyond the cap
    fit_small, fit_medium = expected_fit_rows(100, config), expected_fit_rows(400, config)
    assert medium / small == pytest.approx(math.sqrt(fit_medium / fit_small), rel=0.1)  # proportional to sqrt
    assert min(quotas.values()) >= 1


def test_backbone_quotas_sample_a_uniform_subset_when_the_floor_exceeds_the_budget():
    """Many small entities: every campaign at its floor would overrun the budget, so a hash-ranked subset that fits
    gets at least the floor each and the rest 0, which backbone_sample leaves out."""
    config = CompressConfig(backbone_max_sequences=4000, backbone_min_rows=16)
    sizes = {f"u{i:05d}": 60 + i % 200 for i in range(2000)}
    quotas = backbone_quotas(sizes, config)
    assert set(quotas) == set(sizes) and quotas == backbone_quotas(sizes, config)  # every campaign, deterministic
    sampled = [c for c, q in quotas.items() if q > 0]
    assert 200 <= len(sampled) <= 250 and all(quotas[c] >= 16 for c in sampled)  # 4000 // 16 = 250 at most
    assert abs(sum(quotas.values()) - 4000) <= 4000 * 0.2
    ids = sorted(sizes)
    assert {c for c in sampled if c < ids[1000]} and {c for c in sampled if c >= ids[1000]}  # spread over the ids
    soft = pa.concat_tables([_soft(c, [FIT] * 20 + [VALIDATION] * 8) for c in ids[:40]])
    sample = backbone_sample(soft, {c: quotas[c] for c in ids[:40]}, seed=0)
    assert set(sample["campaign_id"].to_pylist()) == {c for c in ids[:40] if quotas[c] > 0}


def _soft(campaign: str, splits: list[int]) -> pa.Table:
    n = len(splits)
    return pa.table(
        {
            "campaign_id": [campaign] * n,
            "row": pa.array(range(n), pa.int32()),
            "split": pa.array(splits, pa.int8()),
            "teacher_logit": pa.array([0.0] * n, pa.float32()),
            "label": pa.array([0.0] * n, pa.float32()),
        },
        schema=SOFT_LABELS_SCHEMA,
    )


def test_backbone_sample_takes_the_quota_of_fit_rows_and_a_quarter_as_many_validation_rows():
    soft = pa.concat_tables([_soft("a", [FIT] * 50 + [VALIDATION] * 20), _soft("b", [FIT] * 3 + [VALIDATION] * 2)])
    sample = backbone_sample(soft, {"a": 20, "b": 10}, seed=0)
    count = {(c, s): 0 for c in "ab" for s in (FIT, VALIDATION)}
    for c, s in zip(sample["campaign_id"].to_pylist(), sample["split"].to_pylist()):
        count[(c, s)] += 1
    assert count == {("a", FIT): 20, ("a", VALIDATION): 5, ("b", FIT): 3, ("b", VALIDATION): 2}
    assert sample.equals(backbone_sample(soft, {"a": 20, "b": 10}, seed=0))  # deterministic


def _gate(teacher_p: list[list[float]], **config) -> CampaignGate:
    """A gate on the linear head over 1-d features h = 1, so a head's logit is w + b for every row."""
    index = torch.cat([torch.full((len(p),), c) for c, p in enumerate(teacher_p)])
    p = torch.tensor([v for ps in teacher_p for v in ps], dtype=torch.float32)
    student = StudentConfig(num_event_types=2, num_features=0, hidden_size=1, head="linear")
    return CampaignGate(torch.ones(len(p), 1), index, torch.logit(p), len(teacher_p), student, CompressConfig(**config))


def _heads(probabilities: list[float]) -> torch.Tensor:
    return torch.stack([torch.zeros(len(probabilities)), torch.logit(torch.tensor(probabilities))], 1)  # (C, 2): w, b


def test_gate_measures_kl_ratio_and_mean_abs_diff_by_hand():
    gate = _gate([[0.1, 0.1], [0.5, 0.3]])
    check = gate.measure(_heads([0.12, 0.4]))
    kl0 = 0.1 * math.log(0.1 / 0.12) + 0.9 * math.log(0.9 / 0.88)
    kl1 = (
        0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6) + 0.3 * math.log(0.3 / 0.4) + 0.7 * math.log(0.7 / 0.6)
    ) / 2
    np.testing.assert_allclose(check.kl.numpy(), [kl0, kl1], rtol=1e-4)
    np.testing.assert_allclose(check.ratio_error.numpy(), [0.2, 0.0], atol=1e-5)
    np.testing.assert_allclose(check.mean_abs_diff.numpy(), [0.02, 0.1], atol=1e-5)


def test_gate_is_absolute_and_quantization_never_makes_a_bad_head_worse():
    gate = _gate([[0.1] * 4, [0.1] * 4], gate_max_kl=0.05, gate_max_ratio_error=0.1, gate_slack=0.05)
    float_check = gate.measure(_heads([0.105, 0.3]))  # campaign 0 passes, campaign 1 is off by 3x
    assert gate.passes(float_check).tolist() == [True, False]
    # 0.108: within the slack and still passing. The failing head (KL 0.116): 0.31 (KL 0.126) stays
    # within 10% of it and is allowed; 0.33 (KL 0.146) is within the slack but worse: refused
    assert gate.bits_pass(gate.measure(_heads([0.108, 0.31])), float_check).tolist() == [True, True]
    assert gate.bits_pass(gate.measure(_heads([0.108, 0.33])), float_check).tolist() == [True, False]
    # 0.115 breaks campaign 0's 10% ratio bound although it is within the slack: refused
    assert gate.bits_pass(gate.measure(_heads([0.115, 0.3])), float_check).tolist() == [False, True]


def test_bits_gate_keeps_the_ranking_of_a_teacher_whose_probabilities_barely_vary():
    """Within gate_slack (absolute) a low-variance teacher's ranking can be flattened or reversed; the
    correlation term (scale-free) refuses that and allows a head that keeps it."""
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0] * 2)[:, None]  # (10, 1): features of two campaigns
    index = torch.tensor([0] * 5 + [1] * 5)
    teacher = torch.cat([-2.0 + 0.05 * x[:5, 0], -2.0 + 2.0 * x[5:, 0]])  # campaign 0: logits vary by 0.1 only
    student = StudentConfig(num_event_types=2, num_features=0, hidden_size=1, head="linear")
    gate = CampaignGate(x, index, teacher, 2, student, CompressConfig(gate_slack=0.05))
    float_check = gate.measure(torch.tensor([[0.05, -2.0], [2.0, -2.0]]))  # (C, 2): w, b; equal to the teachers
    np.testing.assert_allclose(float_check.correlation.numpy(), [1.0, 1.0], atol=1e-6)
    reversed_ = gate.measure(torch.tensor([[-0.02, -2.0], [1.9, -2.0]]))
    expected = np.corrcoef(-0.02 * x[:5, 0].numpy(), teacher[:5].numpy())[0, 1]
    np.testing.assert_allclose(reversed_.correlation.numpy(), [expected, 1.0], atol=1e-6)
    assert float(reversed_.mean_abs_diff[0]) < 0.01  # what the absolute slack alone would have let through
    assert gate.bits_pass(reversed_, float_check).tolist() == [False, True]
    assert gate.bits_pass(gate.measure(torch.tensor([[0.04, -2.0], [1.9, -2.0]])), float_check).tolist() == [True, True]
    flat = gate.measure(torch.tensor([[0.0, -2.0], [2.0, -2.0]]))  # a constant head has no ranking
    assert gate.bits_pass(flat, float_check).tolist() == [False, True]
    with pytest.raises(ValueError, match="gate_max_correlation_drop must be >= 0"):
        CompressConfig(gate_max_correlation_drop=-0.1)
    loose = CampaignGate(x, index, teacher, 2, student, CompressConfig(gate_slack=0.05, gate_max_correlation_drop=2.0))
    assert loose.bits_pass(loose.measure(torch.tensor([[-0.02, -2.0], [1.9, -2.0]])), float_check).tolist() == [
        True,
        True,
    ]


def test_compress_config_checks_the_grid():
    assert CompressConfig(head_l2_grid=[0, 1, 10]).head_l2_grid == (0.0, 1.0, 10.0)
    with pytest.raises(ValueError, match="head_l2"):
        CompressConfig(head_l2=3.0)
    with pytest.raises(ValueError, match="head_l2_grid"):
        CompressConfig(head_l2_grid=[-1.0, 1.0])


# ----------------------------------------------------------------------------- the capacity ladder


def _ladder_shard(tmp_path, head_ladder: bool, **overrides):
    """Two campaigns over one random backbone: campaign 0's teacher is a film head of the last state,
    campaign 1's reads only the mean of the states (film_pool with gamma = -1), which film cannot follow."""
    from fleet.compression.distill import compute_features
    from fleet.compression.student import (
        SharedBackbone,
        head_layout,
        head_logits,
        head_num_params,
        init_heads,
    )
    from fleet.formats.backbone_codec import backbone_from_bytes, backbone_to_bytes
    from fleet.formats.events import table_to_batch, write_events
    from fleet.run.stages import HOLDOUT, ShardJob, StageContext, fit_heads_shard, row_splits
    from fleet.synthetic.synth import SynthConfig, generate

    synth = SynthConfig(campaigns=2, num_event_types=8, num_features=3, min_sequences=700, max_sequences=700, seed=1)
    tables = [generate(synth, i) for i in range(2)]
    events_uri = str(tmp_path / "events")
    write_events(events_uri, pa.concat_tables(tables))
    student = StudentConfig(num_event_types=8, num_features=3, hidden_size=8)
    torch.manual_seed(0)
    data = backbone_to_bytes(SharedBackbone(student), 8, head_prior=init_heads(student, 1)[0])
    backbone, _ = backbone_from_bytes(data)
    g = torch.Generator().manual_seed(2)
    film = torch.randn(1, head_num_params(student), generator=g) * 2.0  # (1, 25)
    mean_only = torch.zeros(1, 4 * 8 + 1)  # film_pool: gamma -1 (last state off), w, g random, b 0
    sizes = dict(head_layout("film_pool", 8))
    mean_only[0, :8] = -1.0
    mean_only[0, 16:24] = torch.randn(8, generator=g) * 3.0  # w
    mean_only[0, 24:32] = torch.randn(8, generator=g) * 4.0  # g (b, last, stays 0)
    assert sizes["g"] == (8,)
    config = CompressConfig(
        **{"head_steps": 300, "head_ladder": head_ladder, "num_event_types": 8, "num_features": 3, **overrides}
    )
    soft_parts = []
    for i, table in enumerate(tables):
        cid = table["campaign_id"][0].as_py()
        pooled = compute_features(backbone, table_to_batch(table, 3), pooled=True)  # (n, 16)
        logits = (
            head_logits("film", pooled[:, :8], film[0]) if i == 0 else head_logits("film_pool", pooled, mean_only[0])
        )
        splits = row_splits(cid, len(table), config)
        soft_parts.append(
            pa.table(
                {
                    "campaign_id": [cid] * len(table),
                    "row": pa.array(range(len(table)), pa.int32()),
                    "split": pa.array(splits, pa.int8()),
                    "teacher_logit": pa.array(logits.numpy()),
                    "label": pa.array(table["label"].to_numpy().astype(np.float32)),
                },
                schema=SOFT_LABELS_SCHEMA,
            )
        )
    soft = pa.concat_tables(soft_parts)
    ids = [t["campaign_id"][0].as_py() for t in tables]
    job = ShardJob(ids, hashes={c: ["00" * 32, "00" * 16] for c in ids})
    ctx = StageContext(
        teachers_uri=str(tmp_path / "teachers"), events_uri=events_uri, config=config, num_event_types=8, num_features=3
    )
    assert HOLDOUT in soft["split"].to_pylist()
    return fit_heads_shard(job, ctx, soft, data), data, ids


def test_capacity_ladder_gives_a_failing_campaign_the_larger_head_and_every_path_serves_both(tmp_path):
    from fleet.serve.serving import FleetModel
    from fleet.storage.store import VersionWriter

    heads, data, ids = _ladder_shard(tmp_path / "a", head_ladder=True)
    rows = heads.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "capacity"]  # film suffices for 0; 1 needs the pooled view
    assert [r["shape"] for r in rows] == [[25], [33]]
    assert rows[1]["kl"] < 0.05

    without, _, _ = _ladder_shard(tmp_path / "b", head_ladder=False)
    assert without["status"].to_pylist() == ["ok", "fallback"] and without["shape"].to_pylist() == [[25], [25]]
    assert without["kl"][1].as_py() > rows[1]["kl"]

    for name, table in (("ladder", heads), ("plain", without)):
        writer = VersionWriter(str(tmp_path / "store"), "f", name)
        writer.write_backbone_bytes(data)
        writer.write_heads(table)
        uri = writer.commit()
        for heads in ("resident", "lru", "dense"):
            model = FleetModel.open(uri, heads=heads)
            events = generate_rows(ids)
            prediction = model.predict_with_status([ids[0], ids[1]] * 3, *events)
            assert prediction.fallback.tolist() == [False, name == "plain"] * 3
            alone = [model.predict_columns(cid, [t], [f])[0] for cid, t, f in zip([ids[0], ids[1]] * 3, *events)]
            np.testing.assert_allclose(prediction.probabilities, alone, rtol=0, atol=1e-6)
    assert FleetModel.open(uri).num_params == 25  # a version without ladder heads is served at film's size


def generate_rows(ids: list[str]):
    """Six sequences (event types, flat features) of the ladder fleet's input space."""
    rng = np.random.default_rng(0)
    lengths = [3, 7, 1, 12, 5, 9]
    return ([rng.integers(0, 8, n).tolist() for n in lengths], [rng.normal(size=3 * n).tolist() for n in lengths])


def test_bloomier_codec_stage_three_writes_one_block_that_serving_decodes(tmp_path):
    """codec='bloomier': the shard's heads are one block (rows in campaign id order), no ladder (the campaign
    film cannot follow stays a film head, flagged fallback), and a model serves exactly the decoded block."""
    from fleet.formats.codec import table_to_heads
    from fleet.formats.heads import decode_heads
    from fleet.serve.serving import FleetModel
    from fleet.storage.store import VersionWriter

    heads, data, ids = _ladder_shard(
        tmp_path,
        head_ladder=True,
        codec="bloomier",
        head_steps=60,
        head_l2_grid=(1.0,),
        bloomier_refit_steps=20,
        bloomier_sparsity=0.5,
    )
    assert heads.schema.metadata[b"format"] == b"fleet-heads/2.0"
    rows = table_to_heads(heads)
    assert [r.codec for r in rows] == ["bloomier"] * 2 and [r.block_row for r in rows] == [0, 1]
    assert [r.shape for r in rows] == [(25,), (25,)] and rows[0].block is rows[1].block
    assert [r.status for r in rows] == ["ok", "fallback"] and rows[0].kl < 0.05
    writer = VersionWriter(str(tmp_path / "store"), "f", "w")
    writer.write_backbone_bytes(data)
    writer.write_heads(heads)
    model = FleetModel.open(writer.commit())
    assert model.manifest["heads_codec"] == "bloomier"
    decoded = decode_heads(rows)
    events = generate_rows(ids)
    from fleet.compression.student import head_logits

    h = torch.from_numpy(
        model._features([np.asarray(t) for t in events[0]], [np.asarray(f, np.float32) for f in events[1]])
    )
    for c, cid in enumerate(ids):
        want = torch.sigmoid(head_logits("film", h, decoded[c])).numpy()
        np.testing.assert_allclose(model.predict_columns(cid, *events), want, rtol=0, atol=1e-6)


def test_stored_heads_keep_the_teachers_mean_after_quantization():
    """The bias is calibrated again on each candidate's quantized weights and stored so: whatever bits a
    campaign gets, its served mean probability on its fit + validation rows is its teacher's."""
    from fleet.compression.student import head_logits
    from fleet.run.stages import FIT, _fit_rung, _ShardRows

    g = torch.Generator().manual_seed(0)
    c, n, h = 6, 300, 8
    student = StudentConfig(num_event_types=2, num_features=0, hidden_size=h)
    cidx = torch.arange(c).repeat_interleave(n)
    features = torch.tanh(torch.randn(c * n, h, generator=g))
    teacher = (torch.randn(c * n, generator=g) * 1.5 - torch.linspace(4.0, 0.5, c)[cidx]).float()  # rare .. common
    split = torch.where(torch.rand(c * n, generator=g) < 0.2, VALIDATION, FIT).to(torch.int8)
    rows = _ShardRows(cidx, teacher, torch.full((c * n,), float("nan")), split, c)
    rung = _fit_rung(features, rows, student, None, CompressConfig(head_steps=100, group_size=8))  # b: a group alone
    p_served = torch.sigmoid(head_logits("film", features, rung.served, index=cidx)).double()
    p_teacher = torch.sigmoid(teacher).double()
    for k in range(c):
        sel = cidx == k
        assert float(p_served[sel].mean() / p_teacher[sel].mean()) == pytest.approx(1.0, abs=2e-3)


def test_bloomier_fit_stores_the_calibrated_bias_and_serves_the_decoded_blocks():
    """_bloomier_fit: blocks of at most bloomier_block_rows campaigns in the given order; served = the decoded
    blocks (after both re-training steps); each served mean probability is its teacher's (bias calibrated last)."""
    from fleet.compression.student import head_logits
    from fleet.compression.weightless import decode_encoded
    from fleet.run.stages import FIT, _bloomier_fit, _ShardRows

    g = torch.Generator().manual_seed(1)
    c, n, h = 5, 200, 8
    student = StudentConfig(num_event_types=2, num_features=0, hidden_size=h)
    cidx = torch.arange(c).repeat_interleave(n)
    features = torch.tanh(torch.randn(c * n, h, generator=g))
    teacher = ((features * torch.randn(c, h, generator=g)[cidx]).sum(1) - torch.linspace(3.0, 0.5, c)[cidx]).float()
    split = torch.where(torch.rand(c * n, generator=g) < 0.2, VALIDATION, FIT).to(torch.int8)
    rows = _ShardRows(cidx, teacher, torch.full((c * n,), float("nan")), split, c)
    config = CompressConfig(
        codec="bloomier",
        head_steps=40,
        head_l2_grid=(1.0,),
        bloomier_block_rows=2,
        bloomier_refit_steps=15,
        bloomier_sparsity=0.5,
    )
    order = [4, 2, 0, 1, 3]
    blocks, block_of, served, check, passes, stats = _bloomier_fit(features, rows, student, None, config, order)
    assert [b.block.rows for b in blocks] == [2, 2, 1]
    assert [block_of[i] for i in order] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    decoded = np.concatenate([decode_encoded(b) for b in blocks])
    np.testing.assert_array_equal(served[order].numpy(), decoded)
    assert stats["keys"] == c * round((head_num_params(student) - 1) * 0.5)
    p_served = torch.sigmoid(head_logits("film", features, served, index=cidx)).double()
    p_teacher = torch.sigmoid(teacher).double()
    for k in range(c):
        sel = cidx == k
        assert float(p_served[sel].mean() / p_teacher[sel].mean()) == pytest.approx(1.0, abs=5e-3)
    assert check.kl.shape == (c,) and passes.shape == (c,)


def test_bloomier_plan_cuts_sorted_campaigns_into_contiguous_blocks():
    from fleet.run.plan import contiguous_batches, plan_batches

    ids = [f"c{i:03d}" for i in range(10)]
    assert contiguous_batches(list(reversed(ids)), 3, 1024) == [ids[:3], ids[3:7], ids[7:]]
    assert contiguous_batches(ids, 1, 4) == [ids[:3], ids[3:7], ids[7:]]  # at most 4: 3 blocks
    assert contiguous_batches(ids, 50, 4) == [[cid] for cid in ids]
    plan = plan_batches(ids, {cid: 100 for cid in ids}, CompressConfig(codec="bloomier", bloomier_block_rows=4), 1)
    assert [cid for batch in plan for cid in batch] == ids and max(len(b) for b in plan) <= 4
    with pytest.raises(ValueError, match="codec"):
        CompressConfig(codec="zip")
    with pytest.raises(ValueError, match="bloomier_value_bits"):
        CompressConfig(bloomier_value_bits=9)


def test_packed_plan_cuts_sorted_campaigns_into_contiguous_batches_of_similar_cost():
    """A batch is a range of ids (its events read prunes Parquet row groups by range), balanced by cost to within
    one campaign's cost of the mean."""
    from fleet.run.plan import contiguous_balanced_batches, plan_batches

    rng = np.random.default_rng(0)
    costs = {f"u{i:05d}": float(rng.choice([70, 100, 350, 1000])) for i in rng.permutation(5000)}
    batches = contiguous_balanced_batches(costs, 13)
    assert len(batches) == 13 and [c for b in batches for c in b] == sorted(costs)
    loads = [sum(costs[c] for c in b) for b in batches]
    assert max(abs(load - sum(loads) / 13) for load in loads) <= max(costs.values())
    assert contiguous_balanced_batches({"b": 1.0, "a": 5.0}, 8) == [["a"], ["b"]]
    assert contiguous_balanced_batches({"a": 1.0}, 1) == [["a"]]
    plan = plan_batches(sorted(costs), {c: int(v) for c, v in costs.items()}, CompressConfig(), 2)
    assert [c for b in plan for c in b] == sorted(costs) and len(plan) >= 8


def test_borrowed_pool_draws_fit_rows_evenly_and_deterministically():
    config = CompressConfig(borrowed_rows=120)
    sizes = {f"c{i:02d}": n for i, n in enumerate([100, 250, 3000, 40, 900, 120])}
    picked = borrowed_pool_rows(sizes, config)
    assert picked == borrowed_pool_rows(sizes, config)  # deterministic
    assert set(picked) == set(sizes)  # every campaign lends rows
    for campaign_id, rows in picked.items():
        assert len(rows) <= 20 and rows == sorted(set(rows))  # ceil(120 / 6) each, no repeats
        splits = row_splits(campaign_id, sizes[campaign_id], config)
        assert all(splits[r] == FIT for r in rows)  # never a validation or hold-out row
    assert 100 <= sum(map(len, picked.values())) <= 120
    few = borrowed_pool_rows(sizes, CompressConfig(borrowed_rows=3))
    assert len(few) == 3 and all(len(r) == 1 for r in few.values())  # at most borrowed_rows campaigns
    assert borrowed_pool_rows(sizes, CompressConfig()) == {}  # off by default


def test_in_support_keeps_rows_whose_every_event_type_the_campaign_knows():
    batch = SequenceBatch.packed(
        torch.tensor([1, 2, 3, 1, 5, 2]), torch.zeros(6, 1), torch.tensor([2, 1, 2, 1]), torch.zeros(4)
    )  # rows [1, 2], [3], [1, 5], [2]
    assert in_support(batch, torch.tensor([[1, 2], [3, 3]])).tolist() == [True, True, False, True]
    assert in_support(batch, torch.tensor([7])).tolist() == [False] * 4


def test_campaign_batches_read_in_parts_equal_one_read(tmp_path, monkeypatch):
    """Stage 2 reads a fleet's events CAMPAIGNS_PER_READ campaigns at a time: the same batches, rows and order
    as one read of every campaign."""
    from fleet.formats.events import EventsDataset, write_events
    from fleet.run import stages
    from fleet.run.stages import StageContext, _campaign_batches
    from fleet.synthetic.synth import SynthConfig, generate

    synth = SynthConfig(campaigns=5, num_event_types=8, num_features=3, min_sequences=40, max_sequences=90, seed=2)
    tables = [generate(synth, i) for i in range(5)]
    events_uri = str(tmp_path / "events")
    write_events(events_uri, pa.concat_tables(tables))
    config = CompressConfig(num_event_types=8, num_features=3)
    ids = sorted(t["campaign_id"][0].as_py() for t in tables)
    soft = pa.concat_tables(
        [  # every other row of each campaign, as a sample takes some
            pa.table(
                {
                    "campaign_id": [cid] * (len(t) // 2),
                    "row": pa.array(range(0, len(t) - 1, 2), pa.int32()),
                    "split": pa.array(row_splits(cid, len(t), config)[0 : len(t) - 1 : 2], pa.int8()),
                    "teacher_logit": pa.array(np.linspace(-1, 1, len(t) // 2, dtype=np.float32)),
                    "label": pa.array(np.zeros(len(t) // 2, np.float32)),
                },
                schema=SOFT_LABELS_SCHEMA,
            )
            for cid, t in zip([t["campaign_id"][0].as_py() for t in tables], tables)
        ]
    )
    ctx = StageContext(
        teachers_uri=str(tmp_path / "teachers"), events_uri=events_uri, config=config, num_event_types=8, num_features=3
    )
    events = EventsDataset(events_uri)
    whole = list(_campaign_batches(events, soft, ids, ctx))
    monkeypatch.setattr(stages, "CAMPAIGNS_PER_READ", 2)  # three reads of 2, 2 and 1 campaigns
    parts = list(_campaign_batches(events, soft, ids, ctx))
    assert [c for c, _, _ in parts] == [c for c, _, _ in whole] == ids
    for (_, a, rows_a), (_, b, rows_b) in zip(whole, parts):
        assert len(a) == len(rows_a) > 0 and rows_a.equals(rows_b)
        for name in ("event_types", "features", "lengths", "labels"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, equal_nan=True)
