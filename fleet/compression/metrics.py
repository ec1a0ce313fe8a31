"""Fidelity metrics: AUC, per-campaign student-vs-teacher fidelity and calibration, fleet-wide summary (numpy).

Undefined numbers are ``None``, never NaN, so they survive JSON, Parquet and MLflow unchanged.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

AUC_STATUSES = ("ok", "too_few_positives", "no_labels")
WORST_K = 10
#: Per-campaign agreement and calibration keys of :func:`campaign_fidelity` that are defined for every
#: campaign with hold-out rows (the label-based ones whenever a row has a label); stored under the
#: same names as ``fleet-heads/1.1`` columns (:class:`fleet.formats.codec.HeadRow`).
CALIBRATION_KEYS = (
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
#: Probabilities are clipped to ``[PROB_EPS, 1 - PROB_EPS]`` wherever a log is taken (KL, log loss).
PROB_EPS = 1e-7
#: Equal-width bins on [0, 1] of the expected calibration error.
ECE_BINS = 10
#: Share of campaigns counted by ``mean_ratio_within_10pct_share``: ``|mean_ratio - 1| <= 0.1``.
MEAN_RATIO_TOLERANCE = 0.1
# The bound is inclusive up to float32 rounding: heads rows store mean_ratio as float32, where 1.1 is
# 1.10000002, and 1.1 - 1.0 > 0.1 even in float64.
_BOUND_SLACK = 1e-6
#: Normal quantile of the two-sided 95% interval (``auc_significantly_worse``).
Z_95 = 1.959964
#: ``top_decile_*`` look at the largest ``ceil(n / TOP_DECILE_DIVISOR)`` campaigns by volume (at least 1).
TOP_DECILE_DIVISOR = 10


def _numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # last 1-based rank of each distinct value
    return (ends - (counts - 1) / 2.0)[inverse]


def auc(scores, labels, min_per_class: int = 1) -> float | None:
    """ROC AUC of ``scores`` against binary ``labels`` (rank-based Mann-Whitney U, ties count 1/2).

    Rows whose label is NaN are ignored. Returns None (never NaN) when there are fewer than
    ``min_per_class`` positives or negatives (at least one of each is always required).
    """
    scores, labels = _numpy(scores), _numpy(labels)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in length: {scores.shape[0]} vs {labels.shape[0]}")
    known = np.isfinite(labels)
    scores, positive = scores[known], labels[known] > 0.5
    n_pos = int(positive.sum())
    n_neg = int(positive.size - n_pos)
    if min(n_pos, n_neg) < max(int(min_per_class), 1):
        return None
    ranks = _average_ranks(scores)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auc_diff_standard_error(scores_a, scores_b, labels) -> float | None:
    """Standard error of ``auc(scores_a) - auc(scores_b)`` on the same rows (DeLong et al. 1988, paired).

    The two AUCs are correlated (same positives, same negatives); DeLong's structural components give the
    variance of their difference without resampling, so the figure is deterministic. Rows whose label is NaN
    are ignored. Returns None when there is not at least one positive and one negative; 0.0 when both
    scores rank every (positive, negative) pair the same way.
    """
    scores_a, scores_b, labels = _numpy(scores_a), _numpy(scores_b), _numpy(labels)
    if not scores_a.shape == scores_b.shape == labels.shape:
        raise ValueError(
            f"scores and labels differ in length: {scores_a.shape[0]}, {scores_b.shape[0]}, {labels.shape[0]}"
        )
    known = np.isfinite(labels)
    positive = labels[known] > 0.5
    m, n = int(positive.sum()), int((~positive).sum())
    if m < 1 or n < 1:
        return None
    components = []  # per model: (V10 over positives (m,), V01 over negatives (n,))
    for scores in (scores_a[known], scores_b[known]):
        all_ranks = _average_ranks(scores)  # (m + n,)
        pos_ranks, neg_ranks = _average_ranks(scores[positive]), _average_ranks(scores[~positive])
        v10 = (all_ranks[positive] - pos_ranks) / n  # share of negatives each positive outranks
        v01 = 1.0 - (all_ranks[~positive] - neg_ranks) / m  # share of positives outranking each negative
        components.append((v10, v01))
    d10 = components[0][0] - components[1][0]  # (m,)
    d01 = components[0][1] - components[1][1]  # (n,)
    var = (d10.var(ddof=1) / m if m > 1 else 0.0) + (d01.var(ddof=1) / n if n > 1 else 0.0)
    return float(math.sqrt(max(var, 0.0)))


def _clip(p: np.ndarray) -> np.ndarray:
    return np.clip(p, PROB_EPS, 1.0 - PROB_EPS)


def bernoulli_kl(p_teacher, p_student) -> float | None:
    """Mean over rows of KL(Bernoulli(p_teacher) || Bernoulli(p_student)) in nats, both clipped to
    ``[1e-7, 1 - 1e-7]``; None for no rows."""
    pt, ps = _clip(_numpy(p_teacher)), _clip(_numpy(p_student))
    if not pt.size:
        return None
    kl = pt * np.log(pt / ps) + (1.0 - pt) * np.log((1.0 - pt) / (1.0 - ps))
    return float(kl.mean())


def log_loss(p, labels) -> float | None:
    """Binary cross-entropy (nats) of probabilities ``p`` against the known (non-NaN) ``labels``,
    ``p`` clipped to ``[1e-7, 1 - 1e-7]``; None when no row has a label."""
    p, labels = _numpy(p), _numpy(labels)
    known = np.isfinite(labels)
    if not known.any():
        return None
    p, y = _clip(p[known]), (labels[known] > 0.5).astype(np.float64)
    return float(-(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)).mean())


def brier(p, labels) -> float | None:
    """Mean ``(p - label)^2`` over the known (non-NaN) ``labels``; None when no row has a label."""
    p, labels = _numpy(p), _numpy(labels)
    known = np.isfinite(labels)
    if not known.any():
        return None
    return float(((p[known] - (labels[known] > 0.5).astype(np.float64)) ** 2).mean())


def ece(p, labels, bins: int = ECE_BINS) -> float | None:
    """Expected calibration error of ``p`` against the known (non-NaN) ``labels``.

    ``bins`` (10) equal-width bins on [0, 1]: a row falls in bin ``min(floor(p * bins), bins - 1)``
    (so ``p = 1`` is in the last bin; ``p`` is first clipped to [0, 1]), and
    ``ECE = sum_b (n_b / n) * |mean(label in b) - mean(p in b)|`` over the non-empty bins, ``n`` the
    number of labelled rows. None when no row has a label.
    """
    p, labels = _numpy(p), _numpy(labels)
    known = np.isfinite(labels)
    if not known.any():
        return None
    p, y = np.clip(p[known], 0.0, 1.0), (labels[known] > 0.5).astype(np.float64)
    b = np.minimum(np.floor(p * bins), bins - 1).astype(np.int64)
    gap = np.abs(np.bincount(b, weights=y, minlength=bins) - np.bincount(b, weights=p, minlength=bins))
    return float(gap.sum() / p.size)  # sum_b n_b/n * |sum_y/n_b - sum_p/n_b| = sum_b |sum_y - sum_p| / n


def campaign_fidelity(p_student, p_teacher, labels, min_per_class: int = 1) -> dict:
    """How well a campaign's student follows its teacher on held-out rows.

    Args:
        p_student, p_teacher: ``(n,)`` probabilities of the student and the teacher.
        labels: ``(n,)`` observed outcomes in {0, 1}, NaN where unknown.
        min_per_class: fewest positives (and negatives) for an AUC.

    Returns:
        ``teacher_auc``, ``student_auc``, ``auc_diff`` (student - teacher) and ``auc_diff_se`` (its
        paired DeLong standard error, :func:`auc_diff_standard_error`; all None when the AUC is undefined), ``mean_abs_diff`` (mean ``|p_s - p_t|``), ``agreement`` (share of rows on the same
        side of 0.5; both None when ``n_holdout == 0``), ``n_holdout``, ``n_pos``, and ``auc_status``:
        ``"ok"``, ``"no_labels"`` (no row has a label) or ``"too_few_positives"`` (fewer than
        ``min_per_class`` of either class; in ad tech it is the positives that run short).

        And the :data:`CALIBRATION_KEYS`, defined for every campaign whatever its labels (None,
        never NaN, when undefined; probabilities clipped to ``[1e-7, 1 - 1e-7]`` where a log is taken):
        teacher agreement, None when ``n_holdout == 0``: ``kl`` (mean KL(Bernoulli(p_t) ||
        Bernoulli(p_s)), nats), ``brier_vs_teacher`` (mean ``(p_s - p_t)^2``), ``mean_ratio``
        (``mean(p_s) / mean(p_t)``, also None when ``mean(p_t) == 0``); against the known labels,
        None when no row has one: ``student_log_loss`` / ``teacher_log_loss`` (binary cross-entropy,
        nats), ``student_brier`` / ``teacher_brier`` (mean ``(p - label)^2``) and ``student_ece`` /
        ``teacher_ece`` (expected calibration error, 10 equal-width bins on [0, 1], :func:`ece`).
    """
    p_student, p_teacher, labels = _numpy(p_student), _numpy(p_teacher), _numpy(labels)
    if not p_student.shape == p_teacher.shape == labels.shape:
        raise ValueError(
            f"p_student, p_teacher and labels differ in length: {p_student.shape[0]}, {p_teacher.shape[0]}, {labels.shape[0]}"
        )
    n = int(p_student.size)
    known = np.isfinite(labels)
    n_pos = int((labels[known] > 0.5).sum())
    teacher_auc = auc(p_teacher, labels, min_per_class)
    student_auc = auc(p_student, labels, min_per_class)
    if not known.any():
        status = "no_labels"
    elif teacher_auc is None:
        status = "too_few_positives"
    else:
        status = "ok"
    return {
        "teacher_auc": teacher_auc,
        "student_auc": student_auc,
        "auc_diff": None if status != "ok" else student_auc - teacher_auc,
        "auc_diff_se": None if status != "ok" else auc_diff_standard_error(p_student, p_teacher, labels),
        "mean_abs_diff": float(np.abs(p_student - p_teacher).mean()) if n else None,
        "agreement": float(((p_student >= 0.5) == (p_teacher >= 0.5)).mean()) if n else None,
        "n_holdout": n,
        "n_pos": n_pos,
        "auc_status": status,
        "kl": bernoulli_kl(p_teacher, p_student),
        "brier_vs_teacher": float(((p_student - p_teacher) ** 2).mean()) if n else None,
        "mean_ratio": float(p_student.mean() / p_teacher.mean()) if n and p_teacher.mean() > 0 else None,
        "student_log_loss": log_loss(p_student, labels),
        "teacher_log_loss": log_loss(p_teacher, labels),
        "student_brier": brier(p_student, labels),
        "teacher_brier": brier(p_teacher, labels),
        "student_ece": ece(p_student, labels),
        "teacher_ece": ece(p_teacher, labels),
    }


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


def _defined(rows: Sequence[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) is not None and math.isfinite(float(r[key]))]


def _volume(row: dict) -> float:
    """A campaign's volume ``n_rows`` (missing: weight 1)."""
    n = row.get("n_rows")
    return 1.0 if n is None else float(n)


def fleet_summary(rows: Sequence[dict]) -> dict:
    """Fleet-wide view of per-campaign :func:`campaign_fidelity` rows.

    Each row may also carry ``campaign_id``, ``n_rows`` (the campaign's volume: its row count) and
    ``status`` (the campaign's verdict, e.g. ``ok`` / ``fallback``).

    Returns:
        ``n_campaigns``; ``n_with_auc`` and ``no_auc`` (campaigns with / without a defined
        ``auc_diff``); over the campaigns with one: ``median`` and ``p10`` (10th percentile, linear
        interpolation) of ``auc_diff`` and ``worst``, up to 10 ``{"campaign_id", "auc_diff"}`` dicts,
        worst first; ``mean_abs_diff_median`` and ``mean_abs_diff_p90``;
        ``auc_diff_volume_weighted`` (``sum(n_rows * auc_diff) / sum(n_rows)`` over the campaigns with
        an ``auc_diff``, a missing ``n_rows`` weighing 1); ``auc_significantly_worse`` and
        ``auc_significantly_worse_campaigns``: how many (and which) campaigns' students are worse than their
        teachers beyond the hold-out's noise, ``auc_diff + Z_95 * auc_diff_se < 0`` (95% two-sided DeLong
        interval entirely below 0; rows without ``auc_diff_se`` are not counted); ``top_decile_auc_diff_median`` and
        ``top_decile_n_with_auc``: the largest 10% of ALL campaigns by ``n_rows`` (``ceil(0.1 * n)``,
        at least 1; ties broken by ``campaign_id``; a missing ``n_rows`` counts as 0), the median
        ``auc_diff`` over those of them with one and how many had one;
        ``mean_ratio_within_10pct_share`` (share of the campaigns with a ``mean_ratio`` where
        ``|mean_ratio - 1| <= 0.1``, inclusive up to float32 rounding); ``ece_excess_median`` (median ``student_ece - teacher_ece`` over
        the campaigns with both); ``kl_median`` and ``kl_p90``; ``status_counts`` (status -> number
        of campaigns, over the rows that carry a ``status``; empty when none does). A figure with no
        campaign to stand on is None.
    """
    with_auc = [(i, r) for i, r in enumerate(rows) if r.get("auc_diff") is not None]
    diffs = [float(r["auc_diff"]) for _, r in with_auc]
    mads = [float(r["mean_abs_diff"]) for r in rows if r.get("mean_abs_diff") is not None]
    worst = sorted(with_auc, key=lambda item: (float(item[1]["auc_diff"]), item[0]))[:WORST_K]
    weights = np.asarray([_volume(r) for _, r in with_auc], dtype=np.float64)
    by_volume = sorted(
        range(len(rows)), key=lambda i: (-float(rows[i].get("n_rows") or 0), str(rows[i].get("campaign_id") or ""), i)
    )
    top = by_volume[: max(1, -(-len(rows) // TOP_DECILE_DIVISOR))]  # ceil(n / 10) in ints: 0.1 * 30 > 3.0
    top_diffs = [float(rows[i]["auc_diff"]) for i in top if rows[i].get("auc_diff") is not None]
    significantly_worse = [
        r.get("campaign_id")
        for _, r in with_auc
        if r.get("auc_diff_se") is not None and float(r["auc_diff"]) + Z_95 * float(r["auc_diff_se"]) < 0.0
    ]
    ratios, kls = _defined(rows, "mean_ratio"), _defined(rows, "kl")
    excess = [
        float(r["student_ece"]) - float(r["teacher_ece"])
        for r in rows
        if r.get("student_ece") is not None and r.get("teacher_ece") is not None
    ]
    return {
        "n_campaigns": len(rows),
        "n_with_auc": len(with_auc),
        "no_auc": len(rows) - len(with_auc),
        "median": _percentile(diffs, 50),
        "p10": _percentile(diffs, 10),
        "worst": [{"campaign_id": r.get("campaign_id"), "auc_diff": float(r["auc_diff"])} for _, r in worst],
        "auc_significantly_worse": len(significantly_worse),
        "auc_significantly_worse_campaigns": significantly_worse,
        "mean_abs_diff_median": _percentile(mads, 50),
        "mean_abs_diff_p90": _percentile(mads, 90),
        "auc_diff_volume_weighted": float(np.dot(weights, diffs) / weights.sum()) if weights.sum() > 0 else None,
        "top_decile_auc_diff_median": _percentile(top_diffs, 50),
        "top_decile_n_with_auc": len(top_diffs),
        "mean_ratio_within_10pct_share": (
            sum(abs(x - 1.0) <= MEAN_RATIO_TOLERANCE + _BOUND_SLACK for x in ratios) / len(ratios) if ratios else None
        ),
        "ece_excess_median": _percentile(excess, 50),
        "kl_median": _percentile(kls, 50),
        "kl_p90": _percentile(kls, 90),
        "status_counts": dict(sorted(Counter(str(r["status"]) for r in rows if r.get("status") is not None).items())),
    }
