"""Plots of a fleet version, returned as PNG bytes (logged to MLflow by the pipeline, written by
``fleet bench``).

Figures are drawn with matplotlib's Agg renderer through :class:`matplotlib.figure.Figure`, not
pyplot: no global figure state, no GUI backend, safe in worker threads. No I/O here. Empty input
(or nothing finite to draw) gives a figure that says "no data" rather than an error.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.filesize import decimal

_DPI = 100


def _new_figure(width: float = 6.4, height: float = 4.0) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version string: stable bytes
    return buf.getvalue()


def _no_data(title: str) -> bytes:
    fig, ax = _new_figure()
    ax.set_title(title)
    ax.text(0.5, 0.5, "no data", ha="center", va="center", fontsize=16, color="gray", transform=ax.transAxes)
    ax.set_axis_off()
    return _png(fig)


def _as_1d(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values if values is not None else [], dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def fidelity_histogram(auc_diffs: Sequence[float]) -> bytes:
    """Histogram of per-campaign AUC diffs (student AUC - teacher AUC); NaNs are left out and counted."""
    diffs = _as_1d(auc_diffs, "auc_diffs")
    finite = diffs[np.isfinite(diffs)]
    title = "Fidelity: student AUC - teacher AUC per campaign"
    if finite.size == 0:
        return _no_data(title)
    fig, ax = _new_figure()
    bins = int(np.clip(np.sqrt(finite.size), 5, 60))
    ax.hist(finite, bins=bins, color="tab:blue", alpha=0.8)
    ax.axvline(0.0, color="black", linewidth=1)
    median = float(np.median(finite))
    ax.axvline(median, color="tab:red", linestyle="--", linewidth=1, label=f"median {median:+.4f}")
    ax.set_xlabel("AUC diff")
    ax.set_ylabel("campaigns")
    dropped = diffs.size - finite.size
    ax.set_title(f"{title}\nn={finite.size}" + (f" ({dropped} without a finite AUC left out)" if dropped else ""))
    ax.legend(loc="upper left")
    return _png(fig)


def _vs_size(
    n_train: Sequence[float], values: Sequence[float], name: str, title: str, ylabel: str, positive: bool = False
):
    """``(figure, axes, sizes, values)`` of a scatter of ``values`` against training rows (log x), rows with
    no rows or a non-finite value (or, with ``positive``, a value <= 0) left out; ``None`` for the figure
    when nothing is left (the caller returns :func:`_no_data`)."""
    sizes, ys = _as_1d(n_train, "n_train"), _as_1d(values, name)
    if sizes.shape != ys.shape:
        raise ValueError(f"n_train and {name} differ in length: {sizes.size} vs {ys.size}")
    keep = np.isfinite(sizes) & np.isfinite(ys) & (sizes > 0) & ((ys > 0) if positive else True)
    if not keep.any():
        return None, None, sizes[keep], ys[keep]
    fig, ax = _new_figure()
    ax.scatter(sizes[keep], ys[keep], s=8, alpha=0.5, color="tab:blue", linewidths=0)
    ax.set_xscale("log")
    ax.set_xlabel("training rows (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} (n={int(keep.sum())})")
    return fig, ax, sizes[keep], ys[keep]


def fidelity_vs_size(n_train: Sequence[float], auc_diffs: Sequence[float]) -> bytes:
    """Scatter of AUC diff against training rows per campaign (log x); campaigns with no rows or a
    non-finite value are left out."""
    title = "Fidelity vs training rows per campaign"
    fig, ax, _, _ = _vs_size(n_train, auc_diffs, "auc_diffs", title, "student AUC - teacher AUC")
    if fig is None:
        return _no_data(title)
    ax.axhline(0.0, color="black", linewidth=1)
    return _png(fig)


def mean_abs_diff_vs_size(n_train: Sequence[float], mean_abs_diffs: Sequence[float]) -> bytes:
    """Scatter of each campaign's hold-out mean |p_student - p_teacher| against its training rows (log x):
    fidelity defined for every campaign with a hold-out row, AUC or not. Campaigns with no rows or a
    non-finite value are left out."""
    title = "Fidelity: mean |p_student - p_teacher|"
    fig, ax, _, diffs = _vs_size(n_train, mean_abs_diffs, "mean_abs_diffs", title, "mean |p_student - p_teacher|")
    if fig is None:
        return _no_data(title)
    median = float(np.median(diffs))
    ax.axhline(median, color="tab:red", linestyle="--", linewidth=1, label=f"median {median:.4f}")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right")
    return _png(fig)


def bits_histogram(bits: Sequence[int]) -> bytes:
    """Bars of campaigns per stored bit width (one bar per width present, labelled with its count)."""
    values = _as_1d(bits, "bits")
    title = "Head bit widths"
    if values.size == 0:
        return _no_data(title)
    widths, counts = np.unique(values.astype(np.int64), return_counts=True)
    fig, ax = _new_figure()
    bars = ax.bar([str(w) for w in widths], counts, color="tab:blue")
    ax.bar_label(bars, labels=[str(int(c)) for c in counts], padding=2)
    ax.set_ylim(0, counts.max() * 1.15)
    ax.set_xlabel("bits per stored weight")
    ax.set_ylabel("campaigns")
    ax.set_title(f"{title} (n={values.size}, mean {values.mean():.2f} bits)")
    return _png(fig)


def stage_times(seconds_by_stage: dict[str, float]) -> bytes:
    """Horizontal bars of seconds per pipeline stage, in the given order top-down, labelled with the time
    and share; stages without a finite time are left out (never drawn as zero)."""
    stages = {
        str(k): float(v) for k, v in (seconds_by_stage or {}).items() if v is not None and np.isfinite(v) and v >= 0
    }
    total = sum(stages.values())
    title = "Stage times"
    if not stages:
        return _no_data(title)
    names, seconds = list(stages)[::-1], list(stages.values())[::-1]  # barh draws bottom-up
    fig, ax = _new_figure(height=max(2.5, 0.5 * len(names) + 1.5))
    bars = ax.barh(names, seconds, color="tab:blue")
    share = [100 * s / total if total else 0.0 for s in seconds]
    ax.bar_label(bars, labels=[f"{s:.1f} s ({p:.0f}%)" for s, p in zip(seconds, share)], padding=3)
    ax.set_xlim(0, max(max(seconds), 1e-9) * 1.35)
    ax.set_xlabel("seconds")
    ax.set_title(f"{title} (total {total:.1f} s)")
    return _png(fig)


def calibration_vs_size(n_train: Sequence[float], mean_ratios: Sequence[float]) -> bytes:
    """Scatter of each campaign's hold-out mean(p_student) / mean(p_teacher) against its training rows
    (log x, log y), with the 10% band of the mean-ratio gate; defined for every campaign, AUC or not.
    Campaigns with no rows or a non-finite or non-positive ratio are left out."""
    title = "Calibration: mean p_student / mean p_teacher"  # per campaign; longer is cut at 6.4 in
    fig, ax, _, ratios = _vs_size(n_train, mean_ratios, "mean_ratios", title, "mean ratio (log scale)", positive=True)
    if fig is None:
        return _no_data(title)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.axhspan(
        0.9,
        1.1,
        color="tab:green",
        alpha=0.15,
        label=f"within 10%: {float(np.mean(np.abs(ratios - 1.0) <= 0.1)):.0%} of campaigns",
    )
    ax.set_yscale("log")
    ax.legend(loc="upper right")
    return _png(fig)


def size_breakdown(bytes_by_part: dict[str, int]) -> bytes:
    """Horizontal bars of bytes per part of a fleet version (backbone, heads, rejects, ...),
    largest first, labelled with size and share."""
    parts = dict(bytes_by_part or {})
    for name, size in parts.items():
        if not np.isfinite(size) or size < 0:
            raise ValueError(f"size of {name!r} must be a finite number >= 0, got {size!r}")
    total = float(sum(parts.values()))
    title = "Fleet version size by part"
    if not parts or total == 0:
        return _no_data(title)
    items = sorted(parts.items(), key=lambda kv: kv[1])  # barh draws bottom-up: largest on top
    fig, ax = _new_figure(height=max(2.5, 0.5 * len(items) + 1.5))
    names = [str(k) for k, _ in items]
    sizes = [float(v) for _, v in items]
    bars = ax.barh(names, sizes, color="tab:blue")
    ax.bar_label(bars, labels=[f"{decimal(round(s))} ({100 * s / total:.1f}%)" for s in sizes], padding=3)
    ax.set_xlim(0, max(sizes) * 1.35)  # room for the labels
    ax.set_xlabel("bytes")
    ax.set_title(f"{title} (total {decimal(round(total))})")
    return _png(fig)
