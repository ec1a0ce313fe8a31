"""``fleet gc``: retention of a fleet's versions and run work dirs (docs/operations.md, "Retention").

:func:`plan_gc` decides, reading only (one recursive listing of ``<store>/<fleet>/``, the manifests, the
registry); :func:`apply_plan` deletes what the plan marks. A committed version is **kept** when it

- holds an alias in the registry (``champion`` or any other),
- is one of the ``keep_last`` newest committed versions (by the manifest's ``created_at``),
- is the version ``fleet rollback`` would move ``champion`` back to,
- was committed less than ``grace_hours`` ago, or left ``champion`` less than ``grace_hours`` ago
  (``champion_history`` and the ``rolled_back_at`` tag say when; a server polling the alias may still
  serve it, and a nightly that read it as its parent may still read it),
- is the parent of a run that has not finished (its ``plan.json`` names it), or
- is registered as a model version whose other copy lies elsewhere (another store: left alone);

otherwise it is deleted. A run work dir is deleted when its run finished (its version is committed)
more than ``grace_hours`` ago (also counting its newest file); an unfinished run is kept (``fleet compress
--run-id`` resumes it). A version directory without ``manifest.json`` (a crashed write, an interrupted
gc) is deleted when its newest file is older than ``grace_hours`` and no unfinished run owns it.

Deleting a version: its model version(s) first (:func:`fleet.storage.registry.delete_version`: refused when it
gained an alias meanwhile; the MLflow run is kept and tagged ``fleet.deleted_at``), then ``manifest.json``
(the version stops existing for every reader at once), then the rest of its files. Stopped half way, the
next gc finishes the job (an unregistered version, or a directory without manifest, is deleted by the rules
above).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

DEFAULT_KEEP_LAST = 5
DEFAULT_GRACE_HOURS = 24.0
VERSION, RUN, INCOMPLETE, MODEL_VERSION = "version", "run", "incomplete version", "model version"


@dataclass
class Item:
    """One thing gc looked at: a committed ``version``, a ``run`` work dir, an ``incomplete version``
    directory (no manifest) or a registered ``model version`` whose fleet version is not in this store."""

    kind: str
    id: str
    uri: str
    delete: bool
    why: list[str]
    created_at: str | None = None
    age_hours: float | None = None
    bytes: int = 0
    model_versions: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)


@dataclass
class GcPlan:
    """What :func:`plan_gc` found and decided (``items``: versions oldest first, then runs, then the rest)."""

    store_uri: str
    fleet: str
    tracking_uri: str | None
    storage_options: dict | None
    registry: bool
    keep_last: int
    grace_hours: float
    now: datetime
    items: list[Item]
    notes: list[str] = field(default_factory=list)

    @property
    def deletions(self) -> list[Item]:
        return [i for i in self.items if i.delete]


def _parse_time(text) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _mtime(info: dict) -> float | None:
    """Modification time (epoch seconds) of an fsspec ``info`` dict (local ``mtime``, S3 ``LastModified``,
    memory ``created``), None when it has none."""
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str) and _parse_time(value) is not None:
            return _parse_time(value).timestamp()
    return None


def _hours(now: datetime, then: datetime | float | None) -> float | None:
    if then is None:
        return None
    seconds = then if isinstance(then, float) else then.timestamp()
    return max(0.0, now.timestamp() - seconds) / 3600.0  # a clock a little ahead is "just now"


def _version_id_of(manifest_uri: str | None) -> str | None:
    """``.../versions/<id>/manifest.json`` (or the directory) -> ``<id>``."""
    if not manifest_uri:
        return None
    parts = manifest_uri.rstrip("/").split("/")
    if parts[-1] == "manifest.json":
        parts = parts[:-1]
    return parts[-1] if len(parts) >= 2 and parts[-2] == "versions" else None


def _registry_facts(fleet: str, tracking_uri: str | None) -> tuple[list[dict], list[dict], list[str]]:
    """``(model versions, champion_history, notes)``; no registered model of that name is no versions."""
    from fleet.core.errors import RegistryError
    from fleet.storage import registry

    try:
        rows = registry.list_versions(fleet, tracking_uri)
    except RegistryError as err:
        if "no registered model named" not in str(err):
            raise
        return [], [], [f"no registered model named {fleet!r}: no alias protects any version"]
    return rows, registry.champion_history(fleet, tracking_uri), []


def _dealiased(history: list[dict], rows: list[dict]) -> dict[str, datetime]:
    """Model version -> when it last stopped being ``champion`` (the next entry of ``champion_history``, or
    its ``rolled_back_at`` tag: :func:`fleet.storage.registry.rollback` pops the history)."""
    out: dict[str, datetime] = {}
    for entry, following in itertools.pairwise(history):
        at = _parse_time(following.get("at"))
        version = str(entry.get("version"))
        if at is not None and (version not in out or at > out[version]):
            out[version] = at
    for row in rows:
        at = _parse_time(row.get("rolled_back_at"))
        if at is not None and (row["version"] not in out or at > out[row["version"]]):
            out[row["version"]] = at
    return out


def _rollback_target(history: list[dict], rows: list[dict]) -> str | None:
    """The version ``fleet rollback`` would move ``champion`` to (as :func:`fleet.storage.registry.rollback` finds it)."""
    champion = next((r["version"] for r in rows if r["champion"]), None)
    existing = {r["version"] for r in rows}
    stack = [str(e.get("version")) for e in history]
    while stack and stack[-1] == champion:
        stack.pop()
    while stack and stack[-1] not in existing:
        stack.pop()
    return stack[-1] if stack and stack[-1] != champion else None


def plan_gc(
    store_uri: str,
    fleet: str,
    *,
    tracking_uri: str | None = None,
    storage_options: dict | None = None,
    keep_last: int = DEFAULT_KEEP_LAST,
    grace_hours: float = DEFAULT_GRACE_HOURS,
    registry: bool = True,
    now: datetime | None = None,
) -> GcPlan:
    """Decide what ``fleet gc`` deletes in ``<store_uri>/<fleet>/`` (module docstring); deletes nothing.

    ``registry=False``: no registry is read (a store written with ``--no-register``), so no alias protects a
    version and no model version is deleted. ``now`` (UTC) is the time ages are counted from. Raises
    :class:`fleet.core.errors.RegistryError` when the registry cannot be read (or its database does not exist).
    """
    from fleet.core.errors import StoreError
    from fleet.storage.store import PLAN, RunDir, _check_name, absolute_uri, join_uri, open_fs

    if keep_last < 0 or grace_hours < 0:
        raise ValueError(f"keep_last and grace_hours must be >= 0, got {keep_last} and {grace_hours}")
    _check_name("fleet name", fleet)
    now = now or datetime.now(timezone.utc)
    store_uri = absolute_uri(store_uri)
    root_uri = join_uri(store_uri, fleet)
    fs, root = open_fs(root_uri, storage_options)
    fs.invalidate_cache(root)
    try:
        listing = fs.find(root, detail=True, withdirs=False)
    except FileNotFoundError:
        listing = {}
    # files of each versions/<id>/ and runs/<id>/: relative path -> info
    tree: dict[tuple[str, str], dict[str, dict]] = {}
    base = root.rstrip("/") + "/"
    for path, info in listing.items():
        rel = path[len(base) :] if path.startswith(base) else None
        parts = rel.split("/") if rel else []
        if len(parts) >= 3 and parts[0] in ("versions", "runs"):
            tree.setdefault((parts[0], parts[1]), {})["/".join(parts[2:])] = info

    notes: list[str] = []
    rows, history = [], []
    if registry:
        rows, history, notes = _registry_facts(fleet, tracking_uri)
    registered: dict[str, list[dict]] = {}
    for row in rows:
        key = row["version_id"] or f"(no version_id tag: model version {row['version']})"
        registered.setdefault(key, []).append(row)
    dealiased = _dealiased(history, rows)
    rollback_to = _rollback_target(history, rows)

    def newest(files: dict[str, dict]) -> float | None:
        times = [t for t in (_mtime(i) for i in files.values()) if t is not None]
        return max(times) if times else None

    def size(files: dict[str, dict]) -> int:
        return int(sum(i.get("size") or 0 for i in files.values()))

    # committed versions, oldest first
    committed: list[tuple[str, str, datetime | None]] = []
    for (kind, vid), files in tree.items():
        if kind != "versions" or "manifest.json" not in files:
            continue
        try:
            created = json.loads(fs.cat_file(join_uri(root, "versions", vid, "manifest.json")))["created_at"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            created = None
        committed.append((str(created or ""), vid, _parse_time(created)))
    committed.sort()
    committed_ids = {vid for _, vid, _ in committed}
    newest_ids = {vid for _, vid, _ in committed[len(committed) - keep_last :]} if keep_last else set()

    runs = {rid for kind, rid in tree if kind == "runs"}
    unfinished = sorted(runs - committed_ids)
    parents: dict[str, list[str]] = {}
    for rid in unfinished:
        if PLAN in tree[("runs", rid)]:
            try:
                plan = RunDir(store_uri, fleet, rid, storage_options).read_plan()
                parent = _version_id_of(plan.get("parent_manifest"))
            except (StoreError, ValueError, AttributeError):
                parent = None
            if parent:
                parents.setdefault(parent, []).append(rid)

    grace = f"< {grace_hours:g} h"
    items: list[Item] = []
    for created_text, vid, created in committed:
        files = tree[("versions", vid)]
        mvs = registered.get(vid, [])
        aliases = sorted({a for r in mvs for a in r["aliases"]})
        why = []
        if aliases:
            why.append("alias " + ", ".join(f"@{a}" for a in aliases))
        if vid in newest_ids:
            why.append(f"one of the {keep_last} newest")
        if rollback_to is not None and any(r["version"] == rollback_to for r in mvs):
            why.append("fleet rollback's target (the previous champion)")
        age = _hours(now, created)
        if age is None:
            why.append("manifest has no readable created_at")
        elif age < grace_hours:
            why.append(f"committed {age:.1f} h ago ({grace})")
        left = [dealiased[r["version"]] for r in mvs if r["version"] in dealiased]
        if left and _hours(now, max(left)) < grace_hours:
            why.append(f"left champion {_hours(now, max(left)):.1f} h ago ({grace})")
        if vid in parents:
            why.append("parent of unfinished run(s) " + ", ".join(parents[vid]))
        delete = not why
        if delete:
            why.append(f"no alias, not among the {keep_last} newest, older than the grace period")
        items.append(
            Item(
                VERSION,
                vid,
                join_uri(root_uri, "versions", vid),
                delete,
                why,
                created_text or None,
                age,
                size(files),
                [r["version"] for r in mvs],
                aliases,
            )
        )

    for rid in sorted(runs):
        files = tree[("runs", rid)]
        uri = join_uri(root_uri, "runs", rid)
        if rid not in committed_ids:
            items.append(
                Item(
                    RUN,
                    rid,
                    uri,
                    False,
                    [f"unfinished (resume: fleet compress --run-id {rid})"],
                    age_hours=_hours(now, newest(files)),
                    bytes=size(files),
                )
            )
            continue
        version = next(i for i in items if i.kind == VERSION and i.id == rid)
        ages = [t for t in (version.age_hours, _hours(now, newest(files))) if t is not None]
        last = min(ages) if ages else None  # since the later of the commit and the run's newest file
        if last is not None and last >= grace_hours:
            items.append(
                Item(
                    RUN,
                    rid,
                    uri,
                    True,
                    ["finished (version committed), older than the grace period"],
                    age_hours=last,
                    bytes=size(files),
                )
            )
        else:
            age_text = "unknown" if last is None else f"{last:.1f} h ago"
            items.append(
                Item(RUN, rid, uri, False, [f"finished {age_text} ({grace})"], age_hours=last, bytes=size(files))
            )

    for (kind, vid), files in sorted(tree.items()):
        if kind != "versions" or vid in committed_ids:
            continue
        age = _hours(now, newest(files))
        uri = join_uri(root_uri, "versions", vid)
        if vid in unfinished:
            items.append(
                Item(
                    INCOMPLETE,
                    vid,
                    uri,
                    False,
                    [f"no manifest; its run {vid} is unfinished"],
                    age_hours=age,
                    bytes=size(files),
                )
            )
        elif age is None or age < grace_hours:
            why = f"no manifest, written {_fmt_age(age)} ({grace}): may be a write in progress"
            items.append(Item(INCOMPLETE, vid, uri, False, [why], age_hours=age, bytes=size(files)))
        else:
            why = "no manifest (a crashed write or an interrupted gc), older than the grace period"
            items.append(Item(INCOMPLETE, vid, uri, True, [why], age_hours=age, bytes=size(files)))

    prefix = join_uri(root_uri, "versions") + "/"
    for vid, mvs in sorted(registered.items()):
        if vid in committed_ids:
            continue
        for row in mvs:
            aliases = list(row["aliases"])
            here = (row.get("manifest_uri") or "").startswith(prefix)
            age = _hours(now, _parse_time(row.get("created")))
            if not here:
                why, delete = [f"its manifest is elsewhere ({row.get('manifest_uri')}): left alone"], False
            elif aliases:
                why, delete = (
                    [
                        "its manifest is missing from this store, but it holds alias "
                        + ", ".join(f"@{a}" for a in aliases)
                    ],
                    False,
                )
            elif age is not None and age < grace_hours:
                why, delete = [f"its manifest is missing; registered {age:.1f} h ago ({grace})"], False
            else:
                why, delete = ["its manifest is missing from this store (deleted by hand, or an interrupted gc)"], True
            items.append(
                Item(
                    MODEL_VERSION,
                    vid,
                    row.get("manifest_uri") or "",
                    delete,
                    why,
                    row.get("created"),
                    age,
                    0,
                    [row["version"]],
                    aliases,
                )
            )
    return GcPlan(store_uri, fleet, tracking_uri, storage_options, registry, keep_last, grace_hours, now, items, notes)


def _fmt_age(age: float | None) -> str:
    return "at an unknown time" if age is None else f"{age:.1f} h ago"


def apply_plan(plan: GcPlan) -> list[str]:
    """Delete what ``plan`` marks (module docstring: model versions, then manifest, then files; run work
    dirs after their version). Returns one message per item that could not be deleted (it is then kept and
    left for the next gc); ``Item.delete`` of such an item is set to False."""
    from fleet.storage import registry
    from fleet.storage.store import open_fs

    failures: list[str] = []
    order = {MODEL_VERSION: 0, VERSION: 1, INCOMPLETE: 2, RUN: 3}
    for item in sorted(plan.deletions, key=lambda i: order[i.kind]):
        try:
            if plan.registry:
                for version in item.model_versions:
                    registry.delete_version(plan.fleet, version, plan.tracking_uri)
            if item.kind == MODEL_VERSION:
                continue
            fs, path = open_fs(item.uri, plan.storage_options)
            if item.kind == VERSION:
                fs.rm_file(path.rstrip("/") + "/manifest.json")  # first: the version is gone for every reader
            fs.invalidate_cache(path)
            if fs.exists(path):
                fs.rm(path, recursive=True)
            fs.invalidate_cache(path)
        except Exception as err:  # noqa: BLE001 - one item's failure (registry, storage) must not stop the others
            item.delete = False
            failures.append(f"{item.kind} {item.id}: not deleted: {type(err).__name__}: {err}")
    return failures


def plan_json(plan: GcPlan, *, applied: bool, failures: list[str] | None = None) -> dict:
    """``fleet gc --json``: the settings, every item (``kind``, ``id``, ``uri``, ``delete``, ``why``,
    ``created_at``, ``age_hours``, ``bytes``, ``model_versions``, ``aliases``), the totals to delete (deleted
    when ``applied``) and the failures."""
    from fleet.core.redact import scrub
    from fleet.storage.store import json_safe

    gone = plan.deletions
    return json_safe(
        {
            "store": scrub(plan.store_uri),
            "fleet": plan.fleet,
            "keep_last": plan.keep_last,
            "grace_hours": plan.grace_hours,
            "registry": plan.registry,
            "now": plan.now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "dry_run": not applied,
            "notes": plan.notes,
            "failures": failures or [],
            "items": [{**asdict(i), "uri": scrub(i.uri)} for i in plan.items],
            "delete": {
                "versions": sum(i.kind == VERSION for i in gone),
                "runs": sum(i.kind == RUN for i in gone),
                "incomplete_versions": sum(i.kind == INCOMPLETE for i in gone),
                "model_versions": sum(len(i.model_versions) for i in gone),
                "bytes": sum(i.bytes for i in gone),
            },
        }
    )


def plan_tables(plan: GcPlan, *, applied: bool) -> list:
    """``fleet gc``'s human output: one rich Table of every item, its action and why, with the totals."""
    from rich.filesize import decimal
    from rich.table import Table

    from fleet.core.redact import scrub

    verb = "deleted" if applied else "would delete"
    table = Table(
        title=f"fleet gc {plan.fleet} in {scrub(plan.store_uri)}: keep the {plan.keep_last} newest, "
        f"grace {plan.grace_hours:g} h{'' if plan.registry else ', no registry'}"
        f"{'' if applied else ' (dry run)'}"
    )
    for column in ("kind", "id", "mv", "age", "action"):
        table.add_column(column, no_wrap=True, justify="right" if column == "age" else "left")
    table.add_column("why (sizes: --json)", ratio=1)
    labels = {VERSION: "version", RUN: "run", INCOMPLETE: "partial", MODEL_VERSION: "registry"}
    for i in plan.items:
        action = ("[red]deleted[/red]" if applied else "[red]delete[/red]") if i.delete else "keep"
        hours = i.age_hours
        age = "" if hours is None else f"{hours / 24:.1f} d" if hours >= 48 else f"{hours:.1f} h"
        table.add_row(labels[i.kind], i.id, ", ".join(i.model_versions), age, action, "; ".join(i.why))
    gone = plan.deletions
    counts = (
        f"{sum(i.kind == VERSION for i in gone)} version(s), {sum(i.kind == RUN for i in gone)} run work "
        f"dir(s), {sum(i.kind == INCOMPLETE for i in gone)} incomplete version dir(s), "
        f"{sum(len(i.model_versions) for i in gone)} model version(s)"
    )
    table.caption = f"{verb}: {counts}, {decimal(sum(i.bytes for i in gone))}; mv = MLflow model version" + "".join(
        f"; note: {n}" for n in plan.notes
    )
    return [table]


__all__ = [
    "DEFAULT_GRACE_HOURS",
    "DEFAULT_KEEP_LAST",
    "GcPlan",
    "Item",
    "apply_plan",
    "plan_gc",
    "plan_json",
    "plan_tables",
]
