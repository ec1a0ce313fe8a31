"""``fleet diff A B`` / ``fleet.diff(a, b)``: what changed between two fleet versions.

A and B are what ``fleet inspect`` and ``fleet predict`` take: ``models:/NAME@alias``, ``models:/NAME/N``
(resolved through the registry, the manifest checked against its ``manifest_sha256`` tag) or a version
directory / ``manifest.json`` URI. Both versions' heads are read (every part checked against its sha256 in
the manifest) and matched by campaign id:

- **added** / **removed**: campaigns only in B / only in A;
- **unchanged**: the same stored head (``bits``, ``shape``, ``group_size``, ``packed``, ``scales``,
  ``mask``) fitted on the same inputs (``teacher_sha256`` and ``data_fingerprint``): what an incremental
  run keeps from its parent;
- **refit**: every other campaign in both, split by why: ``teacher_changed`` (another teacher hash),
  ``data_changed`` (same teacher, another data fingerprint) and ``same_inputs`` (same teacher and data:
  the backbone was retrained, or the run refit it anyway).

Also: whether the backbone changed (its sha256; when it did, every head's predictions may change, even an
unchanged one's), bit widths and head statuses in each version and the moves between them, per-campaign
fidelity (median in A, in B, and the median / p10 / p90 of the paired per-campaign change B - A over the
campaigns in both), the campaigns whose KL to their teacher grew most, sizes, and the config keys that
differ. Nothing is written.
"""

from __future__ import annotations

import re
from typing import Any

#: Per-campaign fidelity figures compared (heads columns, docs/storage.md; ``auc_diff`` is
#: ``student_auc - teacher_auc``) -> True when higher is better.
FIDELITY = {
    "auc_diff": True,
    "mean_abs_diff": False,
    "agreement": True,
    "kl": False,
    "brier_vs_teacher": False,
    "student_ece": False,
}
_HEAD_COLUMNS = ("bits", "group_size", "packed", "scales", "mask")
_ALIAS_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def model_uri(text: str, fleet: str | None = None) -> str:
    """``text`` as a version URI: with ``fleet``, a bare number N is ``models:/FLEET/N`` and a bare alias
    ``models:/FLEET@alias``; anything else (and everything without ``fleet``) is returned as is."""
    if fleet and text.isdigit():
        return f"models:/{fleet}/{text}"
    if fleet and _ALIAS_RE.fullmatch(text):
        return f"models:/{fleet}@{text}"
    return text


def _open(uri: str, tracking_uri: str | None, storage_options: dict | None):
    """``(FleetVersion, registry info or None)`` for a version URI (see the module docstring)."""
    from fleet.storage.store import FleetVersion

    found, target, sha = None, uri, None
    if uri.startswith("models:"):
        from fleet.storage.registry import resolve_model_version

        found = resolve_model_version(uri, tracking_uri)
        target, sha = found["manifest_uri"], found["manifest_sha256"]
    return FleetVersion.open(target, storage_options, verify=False, manifest_sha256=sha), found


def _finite(values) -> Any:
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    return x[np.isfinite(x)]


def _stats(values) -> dict:
    """median / p10 / p90 / mean / n of the finite ``values`` (None each when there is none)."""
    import numpy as np

    x = _finite(values)
    if not len(x):
        return {"median": None, "p10": None, "p90": None, "mean": None, "n": 0}
    return {
        "median": float(np.median(x)),
        "p10": float(np.percentile(x, 10)),
        "p90": float(np.percentile(x, 90)),
        "mean": float(x.mean()),
        "n": len(x),
    }


def _metric(table, name: str):
    """Per-row float64 values of a fidelity figure (NaN where null)."""
    import numpy as np

    def column(key):
        return table[key].to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> NaN

    if name == "auc_diff":
        return column("student_auc") - column("teacher_auc")
    return column(name)


def _same(x, y):
    """Row-wise equality of two aligned Arrow arrays, nulls equal to nulls, as a numpy bool array."""
    import pyarrow.compute as pc

    both = pc.and_(pc.is_valid(x), pc.is_valid(y))
    same = pc.if_else(both, pc.equal(x, y), pc.and_(pc.is_null(x), pc.is_null(y)))
    return same.to_numpy(zero_copy_only=False).astype(bool)


def _counts(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (len(kv[0]), kv[0])))


def _moves(before, after) -> dict[str, int]:
    """``{"a->b": count}`` over aligned rows whose value changed."""
    return _counts(f"{a}->{b}" for a, b in zip(before, after) if a != b)


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _sizes(version) -> dict:
    """Bytes of a version from its manifest, as ``fleet inspect`` sums them (no data file is read)."""
    files = version.manifest.get("files", [])
    heads = sum(f["bytes"] for f in files if f["path"].startswith("heads/"))
    count = version.manifest.get("campaigns", {}).get("count", 0)
    return {
        "bytes": sum(f["bytes"] for f in files),
        "heads_bytes": heads,
        "backbone_bytes": sum(f["bytes"] for f in files if f["path"] == "backbone.safetensors"),
        "bytes_per_campaign": heads / count if count else None,
        "campaigns": count,
    }


def _side(uri: str, version, found: dict | None, sizes: dict) -> dict:
    m = version.manifest
    return {
        "uri": uri,
        "manifest_uri": version.manifest_uri,
        "version_id": version.version_id,
        "fleet": m.get("fleet"),
        "created_at": m.get("created_at"),
        "model_version": found["version"] if found else None,
        "alias": found["alias"] if found else None,
        "parent_version": m.get("lineage", {}).get("parent_version"),
        "campaigns": sizes["campaigns"],
    }


def diff_versions(
    a: str,
    b: str,
    *,
    tracking_uri: str | None = None,
    storage_options: dict | None = None,
    max_ids: int | None = 20,
    top: int = 5,
) -> dict:
    """What changed from version ``a`` to version ``b`` (URIs as ``fleet inspect`` takes them; module
    docstring): a JSON-ready dict with ``a`` / ``b`` (each version's id, model version, alias, created_at,
    parent, campaigns), ``campaigns`` (counts of ``added``, ``removed``, ``refit``, ``unchanged``, the refit
    split ``refit_teacher_changed`` / ``refit_data_changed`` / ``refit_same_inputs``, and ``ids``: the sorted
    ids of each category, at most ``max_ids`` each, all when None), ``backbone_changed``, ``bits`` and
    ``status`` (``a`` / ``b`` counts and the ``moves`` ``"x->y"`` of campaigns in both), ``fidelity`` (per
    figure of :data:`FIDELITY`: ``a`` and ``b`` = stats over each version's campaigns, ``delta`` = stats of
    B - A per campaign in both, ``higher_is_better``), ``most_worse`` (the ``top`` campaigns in both whose
    ``kl``, or ``mean_abs_diff`` when no campaign has a KL, grew most), ``size`` (``bytes``,
    ``heads_bytes``, ``backbone_bytes``, ``bytes_per_campaign``: ``a``, ``b``, ``delta``) and
    ``config_changes`` (``{key: [a, b]}`` of the manifests' configs, flattened).

    ``storage_options`` default to ``$FLEET_STORAGE_OPTIONS``. Raises :class:`fleet.core.errors.StoreError` for a
    version that cannot be read or fails a checksum, :class:`fleet.core.errors.RegistryError` for a
    ``models:/`` URI that does not resolve.
    """
    import numpy as np
    import pyarrow.compute as pc

    from fleet.storage.store import json_safe, storage_options_from_env

    options = storage_options if storage_options is not None else storage_options_from_env()
    va, found_a = _open(a, tracking_uri, options)
    vb, found_b = _open(b, tracking_uri, options)
    sa, sb = _sizes(va), _sizes(vb)
    ha, hb = va.read_heads(), vb.read_heads()
    ids_a, ids_b = ha["campaign_id"], hb["campaign_id"]

    index = pc.index_in(ids_b, value_set=ids_a)  # each B row's row in A, null when new
    in_a = pc.is_valid(index)
    in_b = pc.is_in(ids_a, value_set=ids_b)
    added = ids_b.filter(pc.invert(in_a)).to_pylist()
    removed = ids_a.filter(pc.invert(in_b)).to_pylist()
    cb = hb.filter(in_a)  # campaigns in both, B's rows ...
    ca = ha.take(index.filter(in_a))  # ... and A's, aligned
    common = cb["campaign_id"].to_pylist()

    head_same = np.ones(len(common), dtype=bool)
    for column in _HEAD_COLUMNS:
        head_same &= _same(ca[column], cb[column])
    head_same &= np.array([x == y for x, y in zip(ca["shape"].to_pylist(), cb["shape"].to_pylist())], dtype=bool)
    teacher_same = _same(ca["teacher_sha256"], cb["teacher_sha256"])
    data_same = _same(ca["data_fingerprint"], cb["data_fingerprint"])
    unchanged = head_same & teacher_same & data_same
    refit = ~unchanged
    split = {
        "refit_teacher_changed": refit & ~teacher_same,
        "refit_data_changed": refit & teacher_same & ~data_same,
        "refit_same_inputs": refit & teacher_same & data_same,
    }

    def ids(values: list[str]) -> list[str]:
        return values if max_ids is None else values[:max_ids]

    picked = {
        name: [c for c, keep in zip(common, mask) if keep]
        for name, mask in (("refit", refit), ("unchanged", unchanged), *split.items())
    }
    campaigns = {
        "added": len(added),
        "removed": len(removed),
        "refit": int(refit.sum()),
        "unchanged": int(unchanged.sum()),
        **{k: int(v.sum()) for k, v in split.items()},
        "ids": {"added": ids(added), "removed": ids(removed), **{k: ids(v) for k, v in picked.items()}},
    }

    fidelity = {}
    for name, higher in FIDELITY.items():
        delta = _metric(cb, name) - _metric(ca, name)
        fidelity[name] = {
            "a": _stats(_metric(ha, name)),
            "b": _stats(_metric(hb, name)),
            "delta": _stats(delta),
            "higher_is_better": higher,
        }
    worst_metric = "kl" if fidelity["kl"]["delta"]["n"] else "mean_abs_diff"
    growth = _metric(cb, worst_metric) - _metric(ca, worst_metric)
    order = [i for i in np.argsort(-np.nan_to_num(growth, nan=-np.inf)) if np.isfinite(growth[i]) and growth[i] > 0]
    most_worse = [
        {
            "campaign_id": common[i],
            "metric": worst_metric,
            "a": float(_metric(ca, worst_metric)[i]),
            "b": float(_metric(cb, worst_metric)[i]),
            "delta": float(growth[i]),
        }
        for i in order[:top]
    ]

    def sha(version, path):
        return next((f["sha256"] for f in version.manifest["files"] if f["path"] == path), None)

    size = {}
    for key in ("bytes", "heads_bytes", "backbone_bytes", "bytes_per_campaign"):
        x, y = sa.get(key), sb.get(key)
        size[key] = {"a": x, "b": y, "delta": None if x is None or y is None else y - x}
    config_a, config_b = dict(_flatten(va.manifest.get("config", {}))), dict(_flatten(vb.manifest.get("config", {})))
    config_changes = {
        k: [config_a.get(k), config_b.get(k)]
        for k in sorted(set(config_a) | set(config_b))
        if config_a.get(k) != config_b.get(k)
    }
    return json_safe(
        {
            "a": _side(a, va, found_a, sa),
            "b": _side(b, vb, found_b, sb),
            "same_version": va.manifest_sha256 == vb.manifest_sha256,
            "b_parent_is_a": vb.manifest.get("lineage", {}).get("parent_version") == va.version_id,
            "campaigns": campaigns,
            "backbone_changed": sha(va, "backbone.safetensors") != sha(vb, "backbone.safetensors"),
            "bits": {
                "a": _counts(ha["bits"].to_pylist()),
                "b": _counts(hb["bits"].to_pylist()),
                "moves": _moves(ca["bits"].to_pylist(), cb["bits"].to_pylist()),
            },
            "status": {
                "a": _counts(ha["status"].to_pylist()),
                "b": _counts(hb["status"].to_pylist()),
                "moves": _moves(ca["status"].to_pylist(), cb["status"].to_pylist()),
            },
            "fidelity": fidelity,
            "most_worse": most_worse,
            "size": size,
            "config_changes": config_changes,
        }
    )


# ----------------------------------------------------------------------------- tables


def _num(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def _signed(value, spec: str = "+.4f") -> str:
    return "n/a" if value is None else format(value, spec)


def diff_table(result: dict) -> list:
    """``fleet diff``'s human output: rich Tables of :func:`diff_versions`' ``result``."""
    from rich.table import Table

    a, b = result["a"], result["b"]

    def name(side):
        reg = (
            f" (model version {side['model_version']}{', @' + side['alias'] if side['alias'] else ''})"
            if side["model_version"]
            else ""
        )
        return f"{side['version_id']}{reg}"

    head = Table(title=f"fleet diff: A = {name(a)} -> B = {name(b)}")
    for column in ("", "A", "B"):
        head.add_column(column)
    head.add_row("created", str(a["created_at"]), str(b["created_at"]))
    head.add_row("parent version", str(a["parent_version"]), str(b["parent_version"]))
    head.add_row("campaigns", f"{a['campaigns']:,}", f"{b['campaigns']:,}")
    head.add_row(
        "backbone", "", "changed (every head's predictions may change)" if result["backbone_changed"] else "same"
    )
    tables = [head]

    c = result["campaigns"]
    camp = Table(title="campaigns")
    camp.add_column("category")
    camp.add_column("count", justify="right")
    camp.add_column("campaign ids (first)")
    for key, label in (
        ("added", "added (only in B)"),
        ("removed", "removed (only in A)"),
        ("unchanged", "unchanged (same head, same inputs)"),
        ("refit", "refit"),
        ("refit_teacher_changed", "  refit: teacher changed"),
        ("refit_data_changed", "  refit: data changed"),
        ("refit_same_inputs", "  refit: same teacher and data"),
    ):
        shown = c["ids"][key][:5]
        more = c[key] - len(shown)
        camp.add_row(label, f"{c[key]:,}", ", ".join(shown) + (f" ... (+{more:,})" if more > 0 else ""))
    tables.append(camp)

    bits = Table(title="heads by bit width")
    for column in ("bits", "A", "B", "B - A"):
        bits.add_column(column, justify="right")
    for key in sorted(set(result["bits"]["a"]) | set(result["bits"]["b"]), key=int):
        x, y = result["bits"]["a"].get(key, 0), result["bits"]["b"].get(key, 0)
        bits.add_row(key, f"{x:,}", f"{y:,}", f"{y - x:+,}")
    tables.append(bits)
    moves = Table(title="moves of campaigns in both")
    for column in ("what", "A -> B", "campaigns"):
        moves.add_column(column, justify="right" if column == "campaigns" else "left")
    for what in ("bits", "status"):
        for key, count in result[what]["moves"].items():
            moves.add_row(what, key.replace("->", " -> "), f"{count:,}")
    if not moves.row_count:
        moves.add_row("bits, status", "none", "0")
    tables.append(moves)

    fid = Table(title="per-campaign fidelity: medians, and B - A per campaign in both")
    for column in ("figure", "better", "A median", "B median", "delta median", "delta p10", "delta p90", "paired"):
        fid.add_column(column, justify="left" if column in ("figure", "better") else "right")
    for key, f in result["fidelity"].items():
        fid.add_row(
            key,
            "higher" if f["higher_is_better"] else "lower",
            _num(f["a"]["median"]),
            _num(f["b"]["median"]),
            _signed(f["delta"]["median"]),
            _signed(f["delta"]["p10"]),
            _signed(f["delta"]["p90"]),
            f"{f['delta']['n']:,}",
        )
    tables.append(fid)

    if result["most_worse"]:
        worse = Table(title=f"campaigns whose {result['most_worse'][0]['metric']} grew most")
        for column in ("campaign", "A", "B", "B - A"):
            worse.add_column(column, justify="right")
        for w in result["most_worse"]:
            worse.add_row(w["campaign_id"], _num(w["a"]), _num(w["b"]), _signed(w["delta"]))
        tables.append(worse)

    size = Table(title="size")
    for column in ("figure", "A", "B", "B - A"):
        size.add_column(column, justify="right")
    for key, s in result["size"].items():
        spec, signed = (".1f", "+.1f") if key == "bytes_per_campaign" else (",", "+,")
        size.add_row(key, _num(s["a"], spec), _num(s["b"], spec), _signed(s["delta"], signed))
    tables.append(size)

    if result["config_changes"]:
        config = Table(title="config changes")
        for column in ("key", "A", "B"):
            config.add_column(column)
        for key, (x, y) in result["config_changes"].items():
            config.add_row(key, str(x), str(y))
        tables.append(config)
    return tables


__all__ = ["FIDELITY", "diff_table", "diff_versions", "model_uri"]
