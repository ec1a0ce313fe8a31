"""The zoo: generators differently structured from fleet's own, teacher classes through the loader hook."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fleet import zoo
from fleet.bench_zoo import _auc_loss, _log_kl, paired_differences, render_comparison
from fleet.errors import TeacherFormatError
from fleet.events import EVENTS_SCHEMA, table_to_batch
from fleet.synth import ZOO_LOADER, SynthConfig, generate
from fleet.teachers import load_teacher, save_teacher


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
    assert all(len(f) == config.num_features * len(t) for t, f in zip(a["event_types"].to_pylist(),
                                                                       a["features"].to_pylist()))


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
    rates = [float(np.mean(generate(SynthConfig(campaigns=30, seed=1, generator="affinity", min_sequences=800), i)
                           ["label"].to_numpy())) for i in range(30)]
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
        assert torch.allclose(loaded.model(batch.event_types, batch.features, batch.lengths),
                              model(batch.event_types, batch.features, batch.lengths))


def test_zoo_loader_refuses_an_unknown_arch():
    with pytest.raises(ValueError, match="unknown teacher arch"):
        zoo.load_teacher({"arch": "transformer"}, {})


def test_paired_comparison_pairs_each_campaign_with_itself():
    def run(diffs, kls):
        campaigns = [{"campaign_id": f"c{i}", "auc_diff": d, "kl": k, "mean_ratio": 1.0}
                     for i, (d, k) in enumerate(zip(diffs, kls))]
        figures = ("auc_diff_median", "auc_diff_p10", "auc_diff_worst", "auc_diff_volume_weighted",
                   "top_decile_auc_diff_median", "mean_ratio_within_10pct_share", "ece_excess_median", "kl_median",
                   "kl_p90")
        return {("g", "t"): {"generator": "g", "teacher": "t", "campaigns": campaigns, "status_counts": {},
                             **dict.fromkeys(figures, 0.0)}}

    first = run([0.0, -0.02, None], [0.01, 0.01, 0.01])
    other = run([0.01, 0.0, 0.3], [0.001, 0.01, 0.1])
    # c2 has no AUC in the first run: two AUC pairs; every campaign has a KL in both
    assert list(paired_differences(first, other, _auc_loss)) == pytest.approx([-0.01, -0.02])
    assert list(paired_differences(first, other, _log_kl)) == pytest.approx([math.log(0.1), 0.0, math.log(10.0)])
    table = render_comparison([("a", {"pairs": list(first.values())}), ("b", {"pairs": list(other.values())})])
    assert "Paired per campaign" in table and "-0.0150 +- 0.0050, better 1.00 (n=2)" in table
