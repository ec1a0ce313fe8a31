"""The promotion gate: whether a new fleet version may become ``champion`` (DESIGN section 3, docs/pipeline.md).

Pure logic on metric dicts, no MLflow: :class:`PromotionGate` holds the thresholds (``CompressConfig.gate``),
:func:`evaluate_gate` checks a candidate's metrics against them and against the current champion's, and
returns a :class:`GateResult`. :mod:`fleet.storage.registry` applies it when it registers a version; the run
report (:mod:`fleet.versions.report`) shows the same checks.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

GATE_METRICS = {  # metric key -> label used in gate reasons
    "fidelity_auc_diff_median": "median AUC diff",
    "fidelity_auc_diff_p10": "p10 AUC diff",
    "quarantine_share": "quarantine share",
    "fidelity_kl_median": "median KL",
    "fidelity_mean_ratio_within_10pct_share": "mean-ratio-within-10% share",
    "campaigns_status_fallback": "fallback share",
}
#: Gate metrics checked only when at least one campaign of the fleet has a hold-out AUC.
AUC_GATE_METRICS = ("fidelity_auc_diff_median", "fidelity_auc_diff_p10")


@dataclass(frozen=True)
class PromotionGate:
    """Quality gate a new fleet version must pass before it becomes ``champion``.

    AUC diffs are student AUC minus teacher AUC on the hold-out rows, one per campaign: 0 means as
    good as the teacher, negative means worse.

    The AUC checks apply only to a fleet where at least one campaign has a hold-out AUC (most
    campaigns have too few positives for one); the teacher-agreement checks (KL, mean ratio,
    fallback share) are defined for every fleet. These defaults are the only place the
    thresholds are set (provisional: to be tuned on the zoo).

    Args:
        min_median_auc_diff: lowest acceptable median AUC diff over the fleet's campaigns.
        min_p10_auc_diff: lowest acceptable 10th percentile AUC diff (the campaigns fitted worst);
            at most ``min_median_auc_diff``, since a p10 is never above the median.
        max_quarantine_share: highest acceptable share of campaigns quarantined by the run, in [0, 1].
        max_regression: how much lower than the current champion's the median and the p10 AUC diff
            may be, >= 0.
        max_kl_median: highest acceptable median over the campaigns of their mean hold-out
            KL(teacher || student), in nats, >= 0 (``fidelity_kl_median``).
        min_mean_ratio_share: lowest acceptable share of campaigns whose mean student probability is
            within 10% of the teacher's, in [0, 1] (``fidelity_mean_ratio_within_10pct_share``).
        max_fallback_share: highest acceptable share of campaigns stored with ``status = fallback``
            (``campaigns_status_fallback / campaigns``), in [0, 1].
    """

    min_median_auc_diff: float = -0.01
    min_p10_auc_diff: float = -0.03
    max_quarantine_share: float = 0.05
    max_regression: float = 0.005
    max_kl_median: float = 0.02
    min_mean_ratio_share: float = 0.8
    max_fallback_share: float = 0.1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"PromotionGate.{f.name} must be a finite number, got {value!r}")
            object.__setattr__(self, f.name, float(value))  # frozen: the one place a field is normalised
        for name in ("min_median_auc_diff", "min_p10_auc_diff"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"PromotionGate.{name} must be in [-1, 1] (a difference of AUCs), got {getattr(self, name)}"
                )
        if self.min_p10_auc_diff > self.min_median_auc_diff:
            raise ValueError(
                f"PromotionGate.min_p10_auc_diff ({self.min_p10_auc_diff}) is above min_median_auc_diff "
                f"({self.min_median_auc_diff}): a p10 is never above the median; were they swapped?"
            )
        for name in ("max_quarantine_share", "min_mean_ratio_share", "max_fallback_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"PromotionGate.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_kl_median < 0.0:
            raise ValueError(f"PromotionGate.max_kl_median must be >= 0 (nats), got {self.max_kl_median}")
        if not 0.0 <= self.max_regression <= 1.0:
            raise ValueError(f"PromotionGate.max_regression must be in [0, 1], got {self.max_regression}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PromotionGate:
        """The gate of a config file's ``gate`` table (JSON object, TOML table): its keys are this class's
        fields, any left out keeps its default. A key that is not a field, or a value that is not a table, is a
        ValueError naming it."""
        if not isinstance(data, Mapping):
            raise ValueError(  # noqa: TRY004 - a config error: ValueError, as every other one (exit 2)
                f"gate must be a table of PromotionGate fields, got {type(data).__name__} {data!r}"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in data if k not in names)
        if unknown:
            raise ValueError(f"unknown gate keys: {unknown} (PromotionGate fields: {', '.join(names)})")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from their defaults (the inverse of :meth:`from_dict`; a default gate is ``{}``,
        so a run's recorded settings, and their hash, do not change when a threshold's default is only restated)."""
        default = type(self)()
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        }


@dataclass
class GateResult:
    """Outcome of :func:`evaluate_gate`: ``reasons`` lists every failed check, empty when passed;
    ``notes`` lists checks that did not apply (e.g. the AUC checks on a fleet without any AUC)."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: every check made, passed or not: ``{"check", "value", "bound", "passed"}`` (``value`` None: the metric
    #: is missing or not finite); not stored in the registry's tags, not compared (:func:`evaluate_gate`)
    checks: list[dict] = field(default_factory=list, compare=False)


def finite_number(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing, not a number (a bool is not one) or not finite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt_pair(a: float, b: float) -> tuple[str, str]:
    """Format two numbers with 3 decimals, or more when 3 would make them look equal."""
    sa, sb = f"{a:.3f}", f"{b:.3f}"
    return (sa, sb) if sa != sb else (f"{a:.6g}", f"{b:.6g}")


def _fleet_has_auc(metrics: dict) -> bool:
    """Whether at least one campaign has a hold-out AUC: an AUC metric is present, or fewer
    campaigns lack one than have a head (``campaigns_ok + campaigns_reused``, else ``campaigns -
    campaigns_quarantined``). Without ``fidelity_campaigns_without_auc`` it is assumed (then a missing
    AUC metric fails the gate, as it always did)."""
    if any(finite_number(metrics.get(key)) is not None for key in AUC_GATE_METRICS):
        return True
    without = finite_number(metrics.get("fidelity_campaigns_without_auc"))
    ok, reused = finite_number(metrics.get("campaigns_ok")), finite_number(metrics.get("campaigns_reused"))
    if ok is not None and reused is not None:
        headed = ok + reused
    else:
        campaigns = finite_number(metrics.get("campaigns"))
        quarantined = finite_number(metrics.get("campaigns_quarantined")) or 0.0
        headed = None if campaigns is None else campaigns - quarantined
    return without is None or headed is None or without < headed


def evaluate_gate(metrics: dict, champion_metrics: dict | None, gate: PromotionGate) -> GateResult:
    """Check a candidate's ``metrics`` against ``gate`` and, when given, the champion's metrics.

    Uses ``fidelity_kl_median``, ``fidelity_mean_ratio_within_10pct_share``, ``quarantine_share``,
    ``campaigns_status_fallback`` / ``campaigns`` (a missing fallback count is 0) and, when at least
    one campaign has a hold-out AUC (an AUC metric is present, or ``fidelity_campaigns_without_auc``
    is below the number of campaigns with a head), ``fidelity_auc_diff_median`` and
    ``fidelity_auc_diff_p10``; on a fleet without any AUC those checks are skipped with a note in
    :attr:`GateResult.notes`. A candidate metric that is missing or not finite fails the gate. The
    regression check compares the median and p10 with the champion's; a champion metric that is
    missing is not compared.
    """
    reasons: list[str] = []
    notes: list[str] = []
    checks: list[dict] = []
    values: dict[str, float] = {}
    has_auc = _fleet_has_auc(metrics)
    if not has_auc:
        notes.append(
            f"AUC checks skipped: no campaign has a hold-out AUC "
            f"(fidelity_campaigns_without_auc = {metrics.get('fidelity_campaigns_without_auc')!r})"
        )
    fallback = metrics.get("campaigns_status_fallback", 0)
    for key, label in GATE_METRICS.items():
        if key in AUC_GATE_METRICS and not has_auc:
            continue
        if key == "campaigns_status_fallback":
            count, campaigns = finite_number(fallback), finite_number(metrics.get("campaigns"))
            if count is None or (count > 0 and not campaigns):
                reasons.append(
                    f"{label}: metrics 'campaigns_status_fallback' / 'campaigns' are missing or not "
                    f"finite ({fallback!r} / {metrics.get('campaigns')!r})"
                )
            else:
                values["fallback_share"] = count / campaigns if count > 0 else 0.0
            continue
        value = finite_number(metrics.get(key))
        if value is None:
            reasons.append(f"{label}: metric {key!r} is missing or not a finite number ({metrics.get(key)!r})")
        else:
            values[key] = value

    def check(name: str, value: float | None, bound: float, ok: bool) -> None:
        checks.append({"check": name, "value": value, "bound": bound, "passed": ok})

    def low(key: str, bound: float, label: str | None = None) -> None:
        label = label or GATE_METRICS[key]  # the reason's wording (the mean-ratio one names its metric)
        check(f"{GATE_METRICS[key]} >= {bound:g}", values.get(key), bound, key in values and values[key] >= bound)
        if key in values and values[key] < bound:
            v, b = _fmt_pair(values[key], bound)
            reasons.append(f"{label} {v} < {b}")

    def high(key: str, bound: float, label: str) -> None:
        name = GATE_METRICS.get(key, "fallback share")
        check(f"{name} <= {bound:g}", values.get(key), bound, key in values and values[key] <= bound)
        if key in values and values[key] > bound:
            v, b = _fmt_pair(values[key], bound)
            reasons.append(f"{label} {v} > {b}")

    if has_auc:
        low("fidelity_auc_diff_median", gate.min_median_auc_diff)
        low("fidelity_auc_diff_p10", gate.min_p10_auc_diff)
    high("quarantine_share", gate.max_quarantine_share, "quarantine share")
    high("fidelity_kl_median", gate.max_kl_median, "median KL (fidelity_kl_median)")
    low(
        "fidelity_mean_ratio_within_10pct_share",
        gate.min_mean_ratio_share,
        "mean-ratio-within-10% share (fidelity_mean_ratio_within_10pct_share)",
    )
    high("fallback_share", gate.max_fallback_share, "fallback share (campaigns_status_fallback / campaigns)")

    for key in AUC_GATE_METRICS:
        best = finite_number((champion_metrics or {}).get(key))
        if best is None or key not in values:
            continue
        drop = best - values[key]
        check(
            f"{GATE_METRICS[key]} drop from the champion's {best:.4f} <= {gate.max_regression:g}",
            drop,
            gate.max_regression,
            drop <= gate.max_regression,
        )
        if drop > gate.max_regression:
            v, c = _fmt_pair(values[key], best)
            d, m = _fmt_pair(drop, gate.max_regression)
            reasons.append(f"{GATE_METRICS[key]} {v} regresses from the champion's {c} by {d} > {m}")
    return GateResult(passed=not reasons, reasons=reasons, notes=notes, checks=checks)
