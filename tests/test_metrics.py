"""fleet.metrics: AUC against a brute-force reference, per-campaign fidelity, fleet summary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fleet.metrics import auc, campaign_fidelity, fleet_summary


def _pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score_pos > score_neg) + 1/2 P(tie), over every (positive, negative) pair."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


@pytest.mark.parametrize("seed", range(6))
def test_auc_matches_pairwise_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 200))
    labels = (rng.random(n) < 0.3).astype(np.float64)
    labels[:2] = [0, 1]  # both classes present
    scores = rng.integers(0, 5, n).astype(np.float64) + labels * rng.random()  # many ties
    assert auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)


def test_auc_known_values_and_inputs():
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auc([1, 2, 3], [0, 1, 1]) == 1.0
    assert auc([3, 2, 1], [0, 1, 1]) == 0.0
    assert auc([0.5] * 4, [0, 1, 0, 1]) == 0.5
    assert auc(torch.tensor([0.2, 0.9]), torch.tensor([0.0, 1.0])) == 1.0
    # NaN labels are unknown: ignored
    assert auc([0.1, 0.9, 0.0, 0.5], [0, 1, float("nan"), float("nan")]) == 1.0
    with pytest.raises(ValueError):
        auc([0.1, 0.2], [1])


def test_auc_is_none_not_nan_when_undefined():
    assert auc([0.1, 0.2, 0.3], [1, 1, 1]) is None
    assert auc([0.1, 0.2, 0.3], [0, 0, 0]) is None
    assert auc([], []) is None
    assert auc([0.3, 0.1], [float("nan"), float("nan")]) is None
    assert auc([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1], min_per_class=3) is None
    assert auc([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1], min_per_class=2) == 0.75


def test_campaign_fidelity_ok():
    labels = np.array([0, 0, 1, 1, np.nan, 0])
    p_teacher = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.2])
    p_student = np.array([0.1, 0.3, 0.45, 0.7, 0.4, 0.6])
    fid = campaign_fidelity(p_student, p_teacher, labels)
    assert set(fid) == {"teacher_auc", "student_auc", "auc_diff", "mean_abs_diff", "agreement", "n_holdout", "n_pos", "auc_status"}
    assert fid["auc_status"] == "ok"
    assert fid["teacher_auc"] == pytest.approx(auc(p_teacher, labels))
    assert fid["auc_diff"] == pytest.approx(fid["student_auc"] - fid["teacher_auc"])
    assert fid["mean_abs_diff"] == pytest.approx(np.abs(p_student - p_teacher).mean())
    assert fid["agreement"] == pytest.approx(4 / 6)  # rows 4 and 5 cross 0.5
    assert (fid["n_holdout"], fid["n_pos"]) == (6, 2)


def test_campaign_fidelity_statuses():
    p = np.array([0.2, 0.7, 0.4])
    no_labels = campaign_fidelity(p, p, np.full(3, np.nan))
    assert no_labels["auc_status"] == "no_labels"
    assert no_labels["teacher_auc"] is None and no_labels["auc_diff"] is None
    assert no_labels["mean_abs_diff"] == 0.0 and no_labels["agreement"] == 1.0
    single = campaign_fidelity(p, p, np.array([0.0, 0.0, np.nan]))
    assert single["auc_status"] == "too_few_positives" and single["student_auc"] is None and single["n_pos"] == 0
    few = campaign_fidelity(p, p, np.array([0.0, 1.0, 0.0]), min_per_class=2)
    assert few["auc_status"] == "too_few_positives" and few["auc_diff"] is None
    empty = campaign_fidelity([], [], [])
    assert empty["n_holdout"] == 0 and empty["mean_abs_diff"] is None and empty["auc_status"] == "no_labels"
    for fid in (no_labels, single, few, empty):
        assert not any(isinstance(v, float) and math.isnan(v) for v in fid.values())


def test_fleet_summary_percentiles_and_worst():
    rng = np.random.default_rng(0)
    diffs = rng.normal(-0.002, 0.01, 37)
    rows = [{"campaign_id": f"c{i:03d}", "auc_diff": float(d), "mean_abs_diff": float(abs(d))} for i, d in enumerate(diffs)]
    rows += [{"campaign_id": "nolab", "auc_diff": None, "mean_abs_diff": 0.5}, {"campaign_id": "empty", "auc_diff": None, "mean_abs_diff": None}]
    summary = fleet_summary(rows)
    assert summary["n_campaigns"] == 39 and summary["n_with_auc"] == 37 and summary["no_auc"] == 2
    assert summary["median"] == pytest.approx(np.median(diffs))
    assert summary["p10"] == pytest.approx(np.percentile(diffs, 10))
    worst = summary["worst"]
    assert len(worst) == 10
    assert [w["auc_diff"] for w in worst] == sorted(diffs.tolist())[:10]
    assert worst[0]["campaign_id"] == f"c{int(np.argmin(diffs)):03d}"
    mads = np.abs(diffs).tolist() + [0.5]
    assert summary["mean_abs_diff_median"] == pytest.approx(np.median(mads))
    assert summary["mean_abs_diff_p90"] == pytest.approx(np.percentile(mads, 90))


def test_fleet_summary_small_and_empty():
    rows = [{"auc_diff": -0.01, "mean_abs_diff": 0.02}, {"auc_diff": 0.03, "mean_abs_diff": 0.04}]
    summary = fleet_summary(rows)
    assert summary["p10"] == pytest.approx(-0.01 + 0.1 * 0.04)  # linear interpolation
    assert [w["auc_diff"] for w in summary["worst"]] == [-0.01, 0.03] and summary["worst"][0]["campaign_id"] is None
    empty = fleet_summary([])
    assert empty["n_campaigns"] == 0 and empty["median"] is None and empty["p10"] is None and empty["worst"] == []
    assert empty["mean_abs_diff_median"] is None
