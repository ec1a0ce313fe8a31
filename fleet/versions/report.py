"""The run report: one static, self-contained HTML page per fleet version (docs/operations.md, "Run report").

Tables: summary, quality-gate checks, per-campaign fidelity of the largest campaigns, quarantined campaigns
and fallback heads. Plots (:mod:`fleet.core.plots`, inline base64 PNG): fidelity vs size (mean |p_student -
p_teacher|, and the AUC diff when some campaign has one), bit widths, calibration (mean p_student / mean
p_teacher) and stage times. No script, no external URL: the page opens offline, from a file, an object
store or MLflow's artifact view.

``fleet compress`` renders it before the manifest (:func:`render_report`, written as ``report.html`` and
checksummed in the manifest, then logged to the MLflow run); ``fleet report`` renders it again for an
existing version (:func:`version_report`) into a file of the caller's choosing, never into the immutable
version directory.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from typing import Any

#: The largest campaigns (by training rows) whose fidelity the report lists.
TOP_CAMPAIGNS = 25
#: At most this many quarantined campaigns and fallback heads are listed (each list says how many more).
MAX_PROBLEM_ROWS = 200
#: The stages whose seconds the manifest's metrics hold (``stage_seconds_<stage>``), in pipeline order.
STAGES = ("soft_labels", "backbone", "heads")
#: Heads columns the report reads (docs/storage.md).
HEAD_COLUMNS = (
    "campaign_id",
    "bits",
    "shape",
    "status",
    "n_train",
    "n_holdout",
    "teacher_auc",
    "student_auc",
    "mean_abs_diff",
    "agreement",
    "kl",
    "mean_ratio",
    "student_ece",
    "teacher_ece",
)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td:first-child { white-space: nowrap; }
.pass { color: #1a7f37; font-weight: bold; } .fail { color: #c62828; font-weight: bold; }
.note { color: #555; font-size: 0.92em; } .plots { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; width: calc(50% - 0.5em); } figure img { width: 100%; border: 1px solid #ddd; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, spec: str = ".4f") -> str:
    """A number formatted with ``spec``; ``n/a`` for a missing or non-finite one (never drawn as 0)."""
    if value is None or isinstance(value, bool):
        return "n/a"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return _esc(value)
    if not math.isfinite(number):
        return "n/a"
    return format(int(number), ",") if spec == "int" else format(number, spec)


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool] = (), caption: str = ""
) -> str:
    """An HTML table; cells are already escaped HTML; ``numeric[i]`` right-aligns column ``i``."""
    numeric = list(numeric) + [False] * (len(headers) - len(numeric))
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{c}</td>' if numeric[i] else f"<td>{c}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    cap = f"<caption>{_esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img alt="{_esc(alt)}" src="data:image/png;base64,{data}"></figure>'


def _column(heads, name: str) -> list:
    return heads[name].to_pylist() if name in heads.column_names else [None] * heads.num_rows


def _floats(values: Sequence[Any]) -> list[float]:
    """``values`` as floats, a missing value NaN (the plots leave NaN out)."""
    return [float("nan") if v is None else float(v) for v in values]


def _summary(fleet: str, version_id: str, created_at: str | None, metrics: dict, lineage: dict, config: dict) -> str:
    m = metrics
    rows = [
        ("fleet / version", f"{_esc(fleet)} / {_esc(version_id)}"),
        ("created at (UTC)", _esc(created_at or "n/a")),
        ("parent version", _esc(lineage.get("parent_version") or "none (full run)")),
        ("backbone", "retrained" if lineage.get("retrain_backbone", True) else "kept from the parent"),
        ("heads codec / bits setting", f"{_esc(config.get('codec', 'packed'))} / {_esc(config.get('bits', 'n/a'))}"),
        ("campaigns", _num(m.get("campaigns"), "int")),
        (
            "heads fitted / reused / quarantined",
            " / ".join(_num(m.get(k), "int") for k in ("campaigns_ok", "campaigns_reused", "campaigns_quarantined")),
        ),
        (
            "head status ok / capacity / fallback",
            " / ".join(_num(m.get(f"campaigns_status_{k}"), "int") for k in ("ok", "capacity", "fallback")),
        ),
        (
            "heads bytes (per campaign)",
            f"{_num(m.get('heads_bytes'), 'int')} ({_num(m.get('bytes_per_campaign'), '.1f')} B)",
        ),
        ("backbone bytes", _num(m.get("backbone_bytes"), "int")),
        ("compression ratio vs the teachers", f"{_num(m.get('compression_ratio'), ',.0f')}x"),
        ("mean bits per head", _num(m.get("bits_mean"), ".2f")),
        (
            "AUC diff student - teacher: median / p10",
            f"{_num(m.get('fidelity_auc_diff_median'), '+.4f')} / {_num(m.get('fidelity_auc_diff_p10'), '+.4f')}",
        ),
        ("campaigns without a hold-out AUC", _num(m.get("fidelity_campaigns_without_auc"), "int")),
        (
            "mean |p_student - p_teacher|: median / p90",
            f"{_num(m.get('fidelity_mean_abs_diff_median'))} / {_num(m.get('fidelity_mean_abs_diff_p90'))}",
        ),
        (
            "KL(teacher || student), nats: median / p90",
            f"{_num(m.get('fidelity_kl_median'), '.5f')} / {_num(m.get('fidelity_kl_p90'), '.5f')}",
        ),
        ("share with mean p within 10% of the teacher's", _num(m.get("fidelity_mean_ratio_within_10pct_share"), ".1%")),
        ("run time (stages 1-3)", f"{_num(m.get('run_seconds'), '.1f')} s"),
    ]
    return _table(["figure", "value"], rows, numeric=[False, True])


def _gate(gate, gate_note: str) -> str:
    if gate is None:
        return f'<p class="note">{_esc(gate_note or "no quality gate evaluated")}</p>'
    verdict = '<span class="pass">passed</span>' if gate.passed else '<span class="fail">failed</span>'
    parts = [f'<p>Quality gate: {verdict}. <span class="note">{_esc(gate_note)}</span></p>']
    if gate.checks:
        rows = [
            (
                _esc(c["check"]),
                _num(c["value"], ".4g"),
                _num(c["bound"], ".4g"),
                '<span class="pass">pass</span>' if c["passed"] else '<span class="fail">fail</span>',
            )
            for c in gate.checks
        ]
        parts.append(_table(["check", "value", "bound", "result"], rows, numeric=[False, True, True, False]))
    if gate.reasons:
        parts.append("<p>Failed:</p><ul>" + "".join(f"<li>{_esc(r)}</li>" for r in gate.reasons) + "</ul>")
    if gate.notes:
        parts.append('<ul class="note">' + "".join(f"<li>{_esc(n)}</li>" for n in gate.notes) + "</ul>")
    return "".join(parts)


_FIDELITY_HEADERS = [
    "campaign",
    "train rows",
    "hold-out rows",
    "bits",
    "params",
    "status",
    "teacher AUC",
    "student AUC",
    "mean |Δp|",
    "agreement",
    "KL",
    "mean ratio",
    "ECE student / teacher",
]
_FIDELITY_NUMERIC = [False, True, True, True, True, False, True, True, True, True, True, True, True]


def _fidelity_rows(heads, indices: Sequence[int]) -> list[tuple[str, ...]]:
    cols = {name: _column(heads, name) for name in HEAD_COLUMNS}
    rows = []
    for i in indices:
        shape = cols["shape"][i] or []
        rows.append(
            (
                _esc(cols["campaign_id"][i]),
                _num(cols["n_train"][i], "int"),
                _num(cols["n_holdout"][i], "int"),
                _num(cols["bits"][i], "int"),
                _num(math.prod(shape) if shape else None, "int"),
                _esc(cols["status"][i]),
                _num(cols["teacher_auc"][i]),
                _num(cols["student_auc"][i]),
                _num(cols["mean_abs_diff"][i]),
                _num(cols["agreement"][i], ".3f"),
                _num(cols["kl"][i], ".5f"),
                _num(cols["mean_ratio"][i], ".3f"),
                f"{_num(cols['student_ece'][i])} / {_num(cols['teacher_ece'][i])}",
            )
        )
    return rows


def _largest(heads) -> str:
    sizes = _column(heads, "n_train")
    ids = _column(heads, "campaign_id")
    order = sorted(range(heads.num_rows), key=lambda i: (-(sizes[i] or 0), ids[i]))[:TOP_CAMPAIGNS]
    if not order:
        return '<p class="note">no heads</p>'
    return _table(
        _FIDELITY_HEADERS,
        _fidelity_rows(heads, order),
        _FIDELITY_NUMERIC,
        caption=f"the {len(order)} largest of {heads.num_rows} campaigns by training rows",
    )


def _more(total: int) -> str:
    return f'<p class="note">{total - MAX_PROBLEM_ROWS} more not listed</p>' if total > MAX_PROBLEM_ROWS else ""


def _problems(heads, rejects: Sequence[dict]) -> str:
    parts = []
    if rejects:
        rows = [(_esc(r["campaign_id"]), _esc(r["stage"]), _esc(r["reason"])) for r in rejects[:MAX_PROBLEM_ROWS]]
        parts.append(
            _table(
                ["campaign", "stage", "reason"],
                rows,
                caption=f"{len(rejects)} quarantined campaigns (no head in this version)",
            )
        )
        parts.append(_more(len(rejects)))
    else:
        parts.append('<p class="note">No campaign was quarantined.</p>')
    statuses = _column(heads, "status")
    fallback = [i for i, s in enumerate(statuses) if s == "fallback"]
    if fallback:
        parts.append(
            _table(
                _FIDELITY_HEADERS,
                _fidelity_rows(heads, fallback[:MAX_PROBLEM_ROWS]),
                _FIDELITY_NUMERIC,
                caption=f"{len(fallback)} fallback heads (stored, but failing the per-campaign gate)",
            )
        )
        parts.append(_more(len(fallback)))
    else:
        parts.append('<p class="note">No head is a fallback.</p>')
    return "".join(parts)


def _plots(heads, metrics: dict) -> str:
    from fleet.core import plots

    n_train = _floats(_column(heads, "n_train"))
    figures = [
        (
            plots.mean_abs_diff_vs_size(n_train, _floats(_column(heads, "mean_abs_diff"))),
            "fidelity: mean |p_student - p_teacher| vs training rows",
        )
    ]
    student, teacher = _column(heads, "student_auc"), _column(heads, "teacher_auc")
    auc_diff = [float("nan") if s is None or t is None else s - t for s, t in zip(student, teacher)]
    if any(math.isfinite(d) for d in auc_diff):  # drawn only when there is something to draw
        figures.append((plots.fidelity_vs_size(n_train, auc_diff), "fidelity: AUC diff vs training rows"))
    figures += [
        (plots.bits_histogram(_column(heads, "bits")), "bits histogram"),
        (
            plots.calibration_vs_size(n_train, _floats(_column(heads, "mean_ratio"))),
            "calibration: mean p_student / mean p_teacher",
        ),
        (plots.stage_times({s: metrics.get(f"stage_seconds_{s}") for s in STAGES}), "stage times"),
    ]
    return '<div class="plots">' + "".join(_img(png, alt) for png, alt in figures) + "</div>"


def render_report(
    *,
    fleet: str,
    version_id: str,
    heads,
    rejects: Sequence[dict],
    metrics: dict,
    config: dict | None = None,
    lineage: dict | None = None,
    created_at: str | None = None,
    gate=None,
    gate_note: str = "",
) -> str:
    """The run report of one fleet version as one HTML page (a ``str``; UTF-8 when stored).

    Args:
        fleet, version_id, created_at: what the page is about (``created_at`` as the manifest has it).
        heads: a ``pyarrow.Table`` with (a subset of) :data:`HEAD_COLUMNS`, one row per head.
        rejects: ``{"campaign_id", "stage", "reason"}`` per quarantined campaign.
        metrics, config, lineage: the manifest's (``metrics`` as ``fleet compress`` writes them).
        gate: a :class:`fleet.storage.promotion_gate.GateResult` (its ``checks`` become the gate table) or None.
        gate_note: where the gate result comes from (shown next to it; alone when ``gate`` is None).
    """
    config, lineage = config or {}, lineage or {}
    title = f"fleet {fleet} version {version_id}"
    finalize = (
        "Stage times cover stages 1-3; finalize (writing this version, registering it) is in the "
        "MLflow run's metric stage_seconds_finalize."
    )
    body = [
        f"<h1>{_esc(title)}</h1>",
        (
            '<p class="note">Run report of one fleet version (docs/operations.md, "Run report"). Every figure is '
            "per campaign on its hold-out rows, student (shared backbone + this quantized head) against its teacher; "
            "n/a: not defined for this campaign or fleet.</p>"
        ),
        "<h2>Summary</h2>",
        _summary(fleet, version_id, created_at, metrics, lineage, config),
        "<h2>Quality gate</h2>",
        _gate(gate, gate_note),
        "<h2>Largest campaigns</h2>",
        _largest(heads),
        "<h2>Quarantined campaigns and fallback heads</h2>",
        _problems(heads, list(rejects)),
        "<h2>Plots</h2>",
        _plots(heads, metrics),
        f'<p class="note">{_esc(finalize)}</p>',
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'  # no favicon request: the page loads nothing
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def version_report(
    uri: str, *, tracking_uri: str | None = None, storage_options: dict | None = None
) -> tuple[str, str]:
    """``(html, version_id)``: the run report of an existing version, rendered again from its manifest, heads and
    rejects (every file read is checked against the manifest). ``uri`` is ``models:/NAME@alias``,
    ``models:/NAME/N`` or a version directory / ``manifest.json`` URI.

    The gate section shows the registry's recorded decision (the version's ``gate`` tags) with the threshold
    checks re-evaluated on the manifest's metrics and the config's gate; a champion comparison is among the
    recorded reasons only. A version not found in the registry (or a registry that cannot be read: nothing is
    created) gets the threshold checks alone, saying so."""
    import pyarrow as pa

    from fleet.core.errors import RegistryError
    from fleet.storage import registry
    from fleet.storage.promotion_gate import GateResult, PromotionGate, evaluate_gate
    from fleet.storage.store import FleetVersion

    target, _, manifest_sha256 = registry.resolve_version(uri, tracking_uri)  # a plain URI as is
    version = FleetVersion.open(target, storage_options, verify=False, manifest_sha256=manifest_sha256)
    manifest = version.manifest
    heads = pa.concat_tables(list(version.iter_heads(columns=list(HEAD_COLUMNS))))
    rejects = version.read_rejects().to_pylist()
    config = manifest.get("config") or {}
    fields = PromotionGate.__dataclass_fields__  # an older version's config may name fields since removed
    gate_config = PromotionGate.from_dict({k: v for k, v in (config.get("gate") or {}).items() if k in fields})
    checks = evaluate_gate(manifest.get("metrics") or {}, None, gate_config)
    try:
        registered = registry.find_version(manifest["fleet"], version.version_id, tracking_uri, create=False)
    except RegistryError as exc:
        registered, note = None, f"registry not read ({exc})"
    else:
        note = "not registered"
    if registered is not None and registered.gate is not None:
        gate = GateResult(registered.gate.passed, registered.gate.reasons, registered.gate.notes, checks.checks)
        note = (
            f"The decision recorded in the registry for {registered.name} version {registered.version}"
            f"{' (champion now)' if registered.champion else ''}; the checks are re-evaluated on the manifest's "
            "metrics against the configured thresholds (a regression from the champion of the time is among the "
            "recorded reasons only)."
        )
    else:
        gate = checks
        note = f"{note}: the configured thresholds checked on the manifest's metrics, without a champion comparison."
    page = render_report(
        fleet=manifest["fleet"],
        version_id=version.version_id,
        heads=heads,
        rejects=rejects,
        metrics=manifest.get("metrics") or {},
        config=config,
        lineage=manifest.get("lineage") or {},
        created_at=manifest.get("created_at"),
        gate=gate,
        gate_note=note,
    )
    return page, version.version_id


__all__ = ["HEAD_COLUMNS", "MAX_PROBLEM_ROWS", "STAGES", "TOP_CAMPAIGNS", "render_report", "version_report"]
