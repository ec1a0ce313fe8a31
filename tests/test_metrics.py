"""fleet.compression.metrics: AUC against a brute-force reference, per-campaign fidelity, fleet summary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fleet.compression.metrics import (
    CALIBRATION_KEYS,
    auc,
    auc_diff_standard_error,
    brier,
    campaign_fidelity,
    ece,
    fleet_summary,
    log_loss,
)


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


@pytest.mark.parametrize("seed", range(8))
def test_auc_matches_scikit_learn(seed):
    """Cross-check against scikit-learn's roc_auc_score (a test extra): ties, NaN labels, float32 scores, sizes up
    to 5,000 rows, rare and common positives."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 5000))
    labels = (rng.random(n) < rng.choice([0.01, 0.2, 0.5, 0.9])).astype(np.float64)
    labels[:2] = [0, 1]
    scores = (rng.normal(size=n) + labels * rng.random()).astype(np.float32)
    if seed % 2:
        scores = np.round(scores, 1)  # many ties
    unknown = rng.random(n) < 0.1
    unknown[:2] = False
    labels[unknown] = np.nan
    known = ~unknown
    assert auc(scores, labels) == pytest.approx(roc_auc_score(labels[known], scores[known]), abs=1e-9)
    assert auc(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(auc(scores, labels), abs=0)


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
    assert set(fid) == {
        "teacher_auc",
        "student_auc",
        "auc_diff",
        "auc_diff_se",
        "mean_abs_diff",
        "agreement",
        "n_holdout",
        "n_pos",
        "auc_status",
        *CALIBRATION_KEYS,
    }
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
    rows = [
        {"campaign_id": f"c{i:03d}", "auc_diff": float(d), "mean_abs_diff": float(abs(d))} for i, d in enumerate(diffs)
    ]
    rows += [
        {"campaign_id": "nolab", "auc_diff": None, "mean_abs_diff": 0.5},
        {"campaign_id": "empty", "auc_diff": None, "mean_abs_diff": None},
    ]
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


# ----------------------------------------------------------------------------- calibration and teacher agreement


def test_calibration_keys_are_returned_and_listed():
    fid = campaign_fidelity([0.2, 0.7], [0.3, 0.6], [0, 1])
    assert CALIBRATION_KEYS == (
        "kl",
        "brier_vs_teacher",
        "mean_ratio",
        "student_log_loss",
        "teacher_log_loss",
        "student_brier",
        "teacher_brier",
        "student_ece",
        "teacher_ece",
    )
    assert set(CALIBRATION_KEYS) <= set(fid)


def test_campaign_fidelity_calibration_by_hand():
    # teacher 0.5 on both rows, student 0.25 and 0.75, labels 0 and 1
    fid = campaign_fidelity([0.25, 0.75], [0.5, 0.5], [0, 1])
    # KL(B(.5) || B(.25)) = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln 2 + .5 ln(2/3) = .5 ln(4/3); same for row 2
    assert fid["kl"] == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert fid["brier_vs_teacher"] == pytest.approx(0.0625)  # (.25)^2 on both rows
    assert fid["mean_ratio"] == pytest.approx(1.0)  # .5 / .5
    assert fid["student_log_loss"] == pytest.approx(math.log(4 / 3))  # -(ln .75 + ln .75) / 2
    assert fid["teacher_log_loss"] == pytest.approx(math.log(2))  # -(ln .5 + ln .5) / 2
    assert fid["student_brier"] == pytest.approx(0.0625)  # (.25^2 + .25^2) / 2
    assert fid["teacher_brier"] == pytest.approx(0.25)  # (.5^2 + .5^2) / 2
    # student: .25 -> bin 2 (label 0), .75 -> bin 7 (label 1): .5 * |0 - .25| + .5 * |1 - .75| = .25
    assert fid["student_ece"] == pytest.approx(0.25)
    # teacher: both rows in bin 5, mean label .5 = mean p .5
    assert fid["teacher_ece"] == pytest.approx(0.0)


def test_ece_binning_by_hand():
    p = [0.05, 0.15, 0.12, 0.95, 1.0, 0.5]
    labels = [0, 1, 0, 1, 1, np.nan]  # the unlabelled row is left out: n = 5
    # bins: .05 -> 0; .15, .12 -> 1; .95 -> 9; 1.0 -> min(10, 9) = 9
    # bin 0: 1/5 * |0 - .05|; bin 1: 2/5 * |.5 - .135|; bin 9: 2/5 * |1 - .975|
    expected = (0.05 + 2 * 0.365 + 2 * 0.025) / 5  # = 0.166
    assert ece(p, labels) == pytest.approx(expected)
    fid = campaign_fidelity(p, p, labels)
    assert fid["student_ece"] == pytest.approx(0.166) and fid["teacher_ece"] == pytest.approx(0.166)
    assert fid["kl"] == pytest.approx(0.0, abs=1e-12) and fid["mean_ratio"] == pytest.approx(1.0)
    # one row per class, student ratio: mean(p_s) = .3, mean(p_t) = .2 -> 1.5
    assert campaign_fidelity([0.2, 0.4], [0.1, 0.3], [0, 1])["mean_ratio"] == pytest.approx(1.5)


def test_calibration_clips_probabilities_where_logs_are_taken():
    # teacher 1, student 0, label 1: clipped to 1 - 1e-7 and 1e-7
    fid = campaign_fidelity([0.0], [1.0], [1.0])
    e = 1e-7
    # KL = (1 - e) ln((1 - e) / e) + e ln(e / (1 - e)) = (1 - 2e) ln((1 - e) / e), about ln(1e7) = 16.1
    assert fid["kl"] == pytest.approx((1 - 2 * e) * math.log((1 - e) / e))
    assert fid["student_log_loss"] == pytest.approx(-math.log(e))  # -ln(1e-7)
    assert fid["teacher_log_loss"] == pytest.approx(-math.log(1 - e), abs=1e-9)
    assert fid["student_brier"] == 1.0 and fid["teacher_brier"] == 0.0  # Brier: no clipping
    assert fid["brier_vs_teacher"] == 1.0 and fid["mean_ratio"] == 0.0


def test_calibration_none_cases():
    # no labels: teacher agreement is defined, the label-based figures are None
    fid = campaign_fidelity([0.2, 0.4], [0.2, 0.2], [np.nan, np.nan])
    assert fid["kl"] is not None and fid["brier_vs_teacher"] == pytest.approx(0.02)  # (0 + .2^2) / 2
    assert fid["mean_ratio"] == pytest.approx(1.5)  # .3 / .2
    for key in ("student_log_loss", "teacher_log_loss", "student_brier", "teacher_brier", "student_ece", "teacher_ece"):
        assert fid[key] is None, key
    # too few positives for an AUC: calibration still defined
    few = campaign_fidelity([0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0, 0, 0], min_per_class=10)
    assert few["auc_status"] == "too_few_positives" and few["kl"] == pytest.approx(0.0, abs=1e-12)
    assert few["teacher_log_loss"] == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.7)) / 3)
    # ECE: bins 1, 2, 3 (one row each, label 0): (.1 + .2 + .3) / 3 = .2
    assert few["teacher_ece"] == pytest.approx(0.2)
    # a teacher that is always 0: the mean ratio is undefined, KL is not
    zero = campaign_fidelity([0.1, 0.3], [0.0, 0.0], [0, 1])
    assert zero["mean_ratio"] is None and zero["kl"] > 0
    # no rows at all: everything is None
    empty = campaign_fidelity([], [], [])
    assert all(empty[k] is None for k in CALIBRATION_KEYS)
    for case in (fid, few, zero, empty):
        assert not any(isinstance(v, float) and math.isnan(v) for v in case.values())
    assert log_loss([0.5], [np.nan]) is None and brier([], []) is None and ece([0.3], [np.nan]) is None


def test_fleet_summary_volume_weighting_and_calibration_by_hand():
    rows = [
        {
            "campaign_id": "a",
            "n_rows": 100,
            "auc_diff": -0.02,
            "kl": 0.01,
            "mean_ratio": 1.05,
            "student_ece": 0.05,
            "teacher_ece": 0.03,
            "status": "ok",
        },
        {
            "campaign_id": "b",
            "n_rows": 300,
            "auc_diff": 0.01,
            "kl": 0.03,
            "mean_ratio": 0.8,
            "student_ece": 0.10,
            "teacher_ece": 0.10,
            "status": "fallback",
        },
        {
            "campaign_id": "c",
            "n_rows": 50,
            "auc_diff": None,
            "kl": 0.002,
            "mean_ratio": 1.1,
            "student_ece": None,
            "teacher_ece": 0.02,
            "status": "ok",
        },
        {
            "campaign_id": "d",
            "auc_diff": 0.04,
            "kl": None,
            "mean_ratio": None,  # no n_rows: weight 1
            "student_ece": 0.02,
            "teacher_ece": 0.04,
        },
        {"campaign_id": "e", "n_rows": 10, "auc_diff": None, "kl": None, "mean_ratio": None},
    ]
    s = fleet_summary(rows)
    # (100 * -.02 + 300 * .01 + 1 * .04) / (100 + 300 + 1) = 1.04 / 401
    assert s["auc_diff_volume_weighted"] == pytest.approx(1.04 / 401)
    # 5 campaigns: the top decile is ceil(0.5) = 1 campaign, b (300 rows), whose auc_diff is .01
    assert s["top_decile_auc_diff_median"] == pytest.approx(0.01) and s["top_decile_n_with_auc"] == 1
    # ratios 1.05 (in), .8 (out), 1.1 (in: the bound is inclusive) -> 2 / 3
    assert s["mean_ratio_within_10pct_share"] == pytest.approx(2 / 3)
    # the same bound read back from a float32 heads column (1.1 -> 1.10000002) still counts
    assert fleet_summary(
        [{"mean_ratio": float(np.float32(1.1))}, {"mean_ratio": float(np.float32(0.9))}, {"mean_ratio": 1.101}]
    )["mean_ratio_within_10pct_share"] == pytest.approx(2 / 3)
    # student - teacher ECE: a .02, b 0, d -.02 (c has no student ECE) -> median 0
    assert s["ece_excess_median"] == pytest.approx(0.0)
    # KLs .002, .01, .03: median .01; p90 at position .9 * 2 = 1.8: .01 + .8 * (.03 - .01) = .026
    assert s["kl_median"] == pytest.approx(0.01) and s["kl_p90"] == pytest.approx(0.026)
    assert s["status_counts"] == {"fallback": 1, "ok": 2}  # d and e carry no status


def test_fleet_summary_top_decile_ties_and_size():
    # 12 campaigns: ceil(12 / 10) = 2; three tie at 500 rows, the two smallest ids win: c03, c05
    rows = [
        {"campaign_id": f"c{i:02d}", "n_rows": 500 if i in (3, 5, 7) else 10, "auc_diff": None if i == 3 else -0.01 * i}
        for i in range(12)
    ]
    s = fleet_summary(list(reversed(rows)))
    assert s["top_decile_n_with_auc"] == 1 and s["top_decile_auc_diff_median"] == pytest.approx(-0.05)
    # 30 campaigns: exactly 3 (0.1 * 30 is 3.0000000000000004 in floats), the ones with 29, 28, 27 rows
    rows = [{"campaign_id": f"c{i:02d}", "n_rows": i, "auc_diff": float(i)} for i in range(30)]
    s = fleet_summary(rows)
    assert s["top_decile_n_with_auc"] == 3 and s["top_decile_auc_diff_median"] == pytest.approx(28.0)
    # without any n_rows every campaign weighs 1: the plain mean
    s = fleet_summary([{"auc_diff": 0.02}, {"auc_diff": -0.04}])
    assert s["auc_diff_volume_weighted"] == pytest.approx(-0.01)


def test_fleet_summary_new_figures_empty_or_undefined():
    for rows in ([], [{"campaign_id": "x", "auc_diff": None, "mean_abs_diff": None}]):
        s = fleet_summary(rows)
        for key in (
            "auc_diff_volume_weighted",
            "top_decile_auc_diff_median",
            "mean_ratio_within_10pct_share",
            "ece_excess_median",
            "kl_median",
            "kl_p90",
        ):
            assert s[key] is None, key
        assert s["top_decile_n_with_auc"] == 0 and s["status_counts"] == {}


def test_auc_diff_standard_error_by_hand():
    # positives then negatives; model a: AUC 0.75 (V10 = [1, 0.5], V01 = [0.5, 1]); model b: AUC 1 (all 1)
    labels = [1, 1, 0, 0]
    a, b = [0.9, 0.4, 0.5, 0.1], [0.9, 0.6, 0.5, 0.1]
    # var = var([0, -0.5]) / 2 + var([-0.5, 0]) / 2 (sample variances, 0.125 each)
    assert auc_diff_standard_error(a, b, labels) == pytest.approx(math.sqrt(0.125))
    assert auc_diff_standard_error(b, a, labels) == pytest.approx(math.sqrt(0.125))
    assert auc_diff_standard_error(a, a, labels) == 0.0
    assert auc_diff_standard_error(a, b, [1, 1, 1, float("nan")]) is None  # no negative


def test_auc_diff_standard_error_matches_a_paired_bootstrap():
    rng = np.random.default_rng(3)
    labels = (rng.random(300) < 0.25).astype(np.float64)
    a, b = labels + rng.normal(0, 1.0, 300), labels + rng.normal(0, 1.3, 300)
    diffs = []
    for _ in range(2000):
        i = rng.integers(0, 300, 300)
        diffs.append(auc(a[i], labels[i]) - auc(b[i], labels[i]))
    assert auc_diff_standard_error(a, b, labels) == pytest.approx(np.std(diffs), rel=0.1)


def test_fleet_summary_counts_campaigns_significantly_worse():
    rows = [
        {"campaign_id": "c1", "auc_diff": -0.05, "auc_diff_se": 0.02},  # interval below 0: counted
        {"campaign_id": "c2", "auc_diff": -0.05, "auc_diff_se": 0.03},  # -0.05 + 1.96 * 0.03 > 0
        {"campaign_id": "c3", "auc_diff": -0.2},  # no standard error: not counted
        {"campaign_id": "c4", "auc_diff": 0.1, "auc_diff_se": 0.0},
    ]
    summary = fleet_summary(rows)
    assert summary["auc_significantly_worse"] == 1
    assert summary["auc_significantly_worse_campaigns"] == ["c1"]
    fid = campaign_fidelity([0.9, 0.4, 0.5, 0.1], [0.9, 0.6, 0.5, 0.1], [1, 1, 0, 0])
    assert fid["auc_diff"] == pytest.approx(-0.25) and fid["auc_diff_se"] == pytest.approx(math.sqrt(0.125))
