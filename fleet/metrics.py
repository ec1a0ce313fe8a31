"""Fidelity metrics: AUC, per-campaign student-vs-teacher fidelity, fleet-wide summary (numpy).

Undefined numbers are ``None``, never NaN, so they survive JSON, Parquet and MLflow unchanged.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

AUC_STATUSES = ("ok", "too_few_positives", "no_labels")
WORST_K = 10


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


def campaign_fidelity(p_student, p_teacher, labels, min_per_class: int = 1) -> dict:
    """How well a campaign's student follows its teacher on held-out rows.

    Args:
        p_student, p_teacher: ``(n,)`` probabilities of the student and the teacher.
        labels: ``(n,)`` observed outcomes in {0, 1}, NaN where unknown.
        min_per_class: fewest positives (and negatives) for an AUC.

    Returns:
        ``teacher_auc``, ``student_auc``, ``auc_diff`` (student - teacher; all None when the AUC is
        undefined), ``mean_abs_diff`` (mean ``|p_s - p_t|``), ``agreement`` (share of rows on the same
        side of 0.5; both None when ``n_holdout == 0``), ``n_holdout``, ``n_pos``, and ``auc_status``:
        ``"ok"``, ``"no_labels"`` (no row has a label) or ``"too_few_positives"`` (fewer than
        ``min_per_class`` of either class; in ad tech it is the positives that run short).
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
        "mean_abs_diff": float(np.abs(p_student - p_teacher).mean()) if n else None,
        "agreement": float(((p_student >= 0.5) == (p_teacher >= 0.5)).mean()) if n else None,
        "n_holdout": n,
        "n_pos": n_pos,
        "auc_status": status,
    }


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


def fleet_summary(rows: Sequence[dict]) -> dict:
    """Fleet-wide view of per-campaign :func:`campaign_fidelity` rows (each may carry a ``campaign_id``).

    Returns:
        ``n_campaigns``; ``n_with_auc`` and ``no_auc`` (campaigns with / without a defined
        ``auc_diff``); over the campaigns with one: ``median`` and ``p10`` (10th percentile, linear
        interpolation) of ``auc_diff`` and ``worst``, up to 10 ``{"campaign_id", "auc_diff"}`` dicts,
        worst first; ``mean_abs_diff_median`` and ``mean_abs_diff_p90``. A figure with no campaign
        to stand on is None.
    """
    with_auc = [(i, r) for i, r in enumerate(rows) if r.get("auc_diff") is not None]
    diffs = [float(r["auc_diff"]) for _, r in with_auc]
    mads = [float(r["mean_abs_diff"]) for r in rows if r.get("mean_abs_diff") is not None]
    worst = sorted(with_auc, key=lambda item: (float(item[1]["auc_diff"]), item[0]))[:WORST_K]
    return {
        "n_campaigns": len(rows),
        "n_with_auc": len(with_auc),
        "no_auc": len(rows) - len(with_auc),
        "median": _percentile(diffs, 50),
        "p10": _percentile(diffs, 10),
        "worst": [{"campaign_id": r.get("campaign_id"), "auc_diff": float(r["auc_diff"])} for _, r in worst],
        "mean_abs_diff_median": _percentile(mads, 50),
        "mean_abs_diff_p90": _percentile(mads, 90),
    }
