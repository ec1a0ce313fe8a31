"""The zoo: generators differently structured from fleet's own, teacher classes through the loader hook."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fleet.bench.zoo import _auc_loss, _log_kl, paired_differences, render_comparison
from fleet.core.errors import TeacherFormatError
from fleet.formats.events import EVENTS_SCHEMA, table_to_batch
from fleet.formats.teachers import load_teacher, save_teacher
from fleet.synthetic import zoo
from fleet.synthetic.synth import ZOO_LOADER, SynthConfig, generate


@pytest.mark.parametrize("generator", ["affinity", "interaction"])
def test_generators_are_deterministic_and_keep_the_events_contract(generator):
    config = SynthConfig(campaigns=40, seed=3, generator=generator, min_sequences=100, max_sequences=3000)
    a, b = generate(config, 7), generate(config, 7)
    assert a.equals(b) and a.schema.equals(EVENTS_SCHEMA, check_metadata=False)
    assert not a.equals(generate(SynthConfig(campaigns=40, seed=4, generator=generator), 7))
    # the very same campaign sizes as the default generator for a seed and index
    assert len(a) == len(generate(SynthConfig(campaigns=40, seed=3, min_sequences=100, max_sequences=3000), 7))
    types = np.concatenate(a["event_types"].to_pylist())
    assert types.min() >= 0 and types.max() < config.num_event_types
    # features are flattened per sequence: num_features per event
    assert all(
        len(f) == config.num_features * len(t) for t, f in zip(a["event_types"].to_pylist(), a["features"].to_pylist())
    )


@pytest.mark.parametrize("generator", ["default", "affinity", "interaction"])
def test_fresh_rows_are_new_draws_of_the_same_campaign(generator):
    """``fresh_rows``: new sequences of one campaign (its parameters, its base rate), from their own stream."""
    config = SynthConfig(campaigns=10, seed=2, generator=generator, min_sequences=2500, max_sequences=3000)
    own, fresh = generate(config, 4), generate(config, 4, fresh_rows=3000)
    assert len(fresh) == 3000 and fresh.schema.equals(own.schema)
    assert set(fresh["campaign_id"].to_pylist()) == set(own["campaign_id"].to_pylist())
    assert fresh.equals(generate(config, 4, fresh_rows=3000))  # deterministic
    assert generate(config, 4).equals(own)  # drawing them changes nothing of the campaign's own rows
    assert fresh["event_types"][0] != own["event_types"][0] and fresh["event_types"][1] != own["event_types"][1]
    # the campaign's base rate: same parameters and bias; another campaign of the fleet differs more
    rate = [float(np.mean(t["label"].to_numpy())) for t in (own, fresh)]
    assert abs(rate[0] - rate[1]) < 0.04, rate


def test_generators_differ_in_structure():
    """Few event types and short sequences (affinity) vs long ones over the whole vocabulary (interaction)."""
    lengths, vocab = {}, {}
    for generator in ("affinity", "default", "interaction"):
        table = generate(SynthConfig(campaigns=10, seed=0, generator=generator, min_sequences=1500), 2)
        seqs = table["event_types"].to_pylist()
        lengths[generator] = np.median([len(s) for s in seqs])
        vocab[generator] = len(set(np.concatenate(seqs).tolist()))
    assert lengths["affinity"] < lengths["default"] < lengths["interaction"]
    assert vocab["affinity"] < vocab["interaction"]


def test_base_rates_span_rare_and_common_labels():
    rates = [
        float(
            np.mean(
                generate(SynthConfig(campaigns=30, seed=1, generator="affinity", min_sequences=800), i)[
                    "label"
                ].to_numpy()
            )
        )
        for i in range(30)
    ]
    assert min(rates) < 0.05 and max(rates) > 0.2


@pytest.mark.parametrize("teacher", ["attn_gru", "conv"])
def test_zoo_teachers_are_blind_after_lengths(teacher):
    config = SynthConfig(campaigns=2, teacher=teacher, hidden_size=16, num_layers=1)
    torch.manual_seed(0)
    model = zoo.build_teacher(config.teacher_config("c-1")).eval()
    types = torch.randint(0, config.num_event_types, (3, 12))
    feats = torch.randn(3, 12, config.num_features)
    lengths = torch.tensor([12, 5, 1])
    with torch.no_grad():
        base = model(types, feats, lengths)
        feats2, types2 = feats.clone(), types.clone()
        for row, n in enumerate(lengths.tolist()):
            feats2[row, n:] = float("nan")
            types2[row, n:] = 0
        assert torch.equal(model(types2, feats2, lengths), base)


def test_zoo_teacher_loads_only_when_its_loader_is_allowed(tmp_path):
    config = SynthConfig(campaigns=1, teacher="attn_gru", hidden_size=16, num_layers=1)
    model = zoo.build_teacher(config.teacher_config("c-1")).eval()
    root = str(tmp_path / "teachers")
    save_teacher(root, model, config.teacher_config("c-1"))
    with pytest.raises(TeacherFormatError, match="loader not allowed"):
        load_teacher(root, "c-1")
    loaded = load_teacher(root, "c-1", allow_loaders=[ZOO_LOADER])
    table = generate(SynthConfig(campaigns=1, min_sequences=20, max_sequences=20), 0)
    batch = table_to_batch(table, config.num_features)
    with torch.no_grad():
        assert torch.allclose(
            loaded.model(batch.event_types, batch.features, batch.lengths),
            model(batch.event_types, batch.features, batch.lengths),
        )


def test_zoo_loader_refuses_an_unknown_arch():
    with pytest.raises(ValueError, match="unknown teacher arch"):
        zoo.load_teacher({"arch": "transformer"}, {})


def test_paired_comparison_pairs_each_campaign_with_itself():
    def run(diffs, kls):
        campaigns = [
            {"campaign_id": f"c{i}", "auc_diff": d, "kl": k, "mean_ratio": 1.0}
            for i, (d, k) in enumerate(zip(diffs, kls))
        ]
        figures = (
            "auc_diff_median",
            "auc_diff_p10",
            "auc_diff_worst",
            "auc_diff_volume_weighted",
            "top_decile_auc_diff_median",
            "mean_ratio_within_10pct_share",
            "ece_excess_median",
            "kl_median",
            "kl_p90",
        )
        return {
            ("g", "t"): {
                "generator": "g",
                "teacher": "t",
                "campaigns": campaigns,
                "status_counts": {},
                **dict.fromkeys(figures, 0.0),
            }
        }

    first = run([0.0, -0.02, None], [0.01, 0.01, 0.01])
    other = run([0.01, 0.0, 0.3], [0.001, 0.01, 0.1])
    # c2 has no AUC in the first run: two AUC pairs; every campaign has a KL in both
    assert list(paired_differences(first, other, _auc_loss)) == pytest.approx([-0.01, -0.02])
    assert list(paired_differences(first, other, _log_kl)) == pytest.approx([math.log(0.1), 0.0, math.log(10.0)])
    table = render_comparison([("a", {"pairs": list(first.values())}), ("b", {"pairs": list(other.values())})])
    assert "Paired per campaign" in table and "-0.0150 +- 0.0050, better 1.00 (n=2)" in table


def test_zoo_evaluation_on_fresh_rows_judges_every_campaign_and_keeps_the_hold_out(small_fleet, ray_local, tmp_path):
    """``evaluate_run`` with fresh rows: what serving answers on new sequences of each campaign against its
    teacher; the hold-out figures (the run's stage-1 teacher logits) are the same as without fresh rows."""
    from test_pipeline import fast_config

    from fleet.bench.zoo import FreshRows, evaluate_run
    from fleet.run.pipeline import run_compress

    store = str(tmp_path / "store")
    run_compress(
        teachers_uri=small_fleet["teachers"],
        events_uri=small_fleet["events"],
        store_uri=store,
        fleet="zoo-small",
        config=fast_config(backbone_steps=60, head_steps=60),
        run_id="r1",
        register=False,
    )
    fresh = FreshRows(small_fleet["config"], small_fleet["teachers"], (), 400)
    judged = evaluate_run(store, "zoo-small", "r1", small_fleet["events"], 5, fresh)
    plain = evaluate_run(store, "zoo-small", "r1", small_fleet["events"], 5)
    assert judged["evaluated_on"] == "400 fresh sequences per campaign" and plain["evaluated_on"] == "hold-out rows"
    assert judged["n_campaigns"] == plain["n_campaigns"] == 20
    assert all(c["n_holdout"] == 400 for c in judged["campaigns"])
    assert judged["n_with_auc"] > plain["n_with_auc"]  # 400 rows per campaign: more campaigns with both classes
    assert judged["holdout"]["campaigns"] == plain["campaigns"]
    assert judged["holdout"]["auc_diff_median"] == plain["auc_diff_median"]
    # real teachers on new draws of their own campaigns: better than a coin (log loss ln 2) on every one
    losses = [c["teacher_log_loss"] for c in judged["campaigns"]]
    assert max(losses) < math.log(2) and np.median(losses) < 0.5
