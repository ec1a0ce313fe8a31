"""``fleet gc``: retention of versions and run work dirs on a real local store with a real SQLite MLflow
registry (fleet.versions.retention; docs/operations.md, "Retention")."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from datetime import datetime, timedelta, timezone

import pytest
from mlflow.tracking import MlflowClient
from test_serving import build_version

from fleet.cli.main import main
from fleet.core.errors import StoreError
from fleet.storage import registry
from fleet.storage.store import FleetVersion, RunDir, VersionWriter, list_versions
from fleet.versions.retention import apply_plan, plan_gc

PASS = {
    "fidelity_kl_median": 0.001,
    "fidelity_mean_ratio_within_10pct_share": 1.0,
    "campaigns": 5,
    "campaigns_status_fallback": 0,
    "quarantine_share": 0.0,
    "fidelity_auc_diff_median": 0.0,
    "fidelity_auc_diff_p10": 0.0,
}
FAIL = {**PASS, "fidelity_kl_median": 0.5}
NOW = datetime.now(timezone.utc)


def _ago(**delta) -> str:
    return (NOW - timedelta(**delta)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _commit(base: FleetVersion, store: str, version_id: str, created_at: str) -> str:
    writer = VersionWriter(store, "adfleet", version_id)
    writer.write_backbone_bytes(base.read_backbone_bytes())
    writer.write_heads(base.read_heads())
    return writer.commit(config={}, metrics=PASS, created_at=created_at)


def _register(store: str, version_id: str, uri: str, metrics: dict) -> str:
    folder = f"{store}/adfleet/versions/{version_id}"
    return registry.register_version(
        fleet_name="adfleet",
        manifest_uri=f"{folder}/manifest.json",
        version_id=version_id,
        local_artifacts={
            "manifest.json": f"{folder}/manifest.json",
            "backbone.safetensors": f"{folder}/backbone.safetensors",
        },
        params={},
        metrics=metrics,
        plots={},
        tracking_uri=uri,
    ).version


def _age_files(path: str, hours: float) -> None:
    old = time.time() - hours * 3600
    for parent, _, names in os.walk(path):
        for name in names:
            os.utime(os.path.join(parent, name), (old, old))


@pytest.fixture(scope="module")
def fleet_store(tmp_path_factory, _mlflow_db_template):
    """A store and registry as months of nightlies leave them (keep-last 1 below):

    v1  10 d  model version 1  champion, then replaced by v2 (just now): within the grace period
    v2   9 d  model version 2  champion, then replaced by v3: fleet rollback's target
    v3   8 d  model version 3  champion
    v4   7 d  model version 4  failed its gate; alias @staging
    v5   6 d  not registered   parent of the unfinished run "crashed"
    v6   5 d  model version 5  failed its gate, no alias: deleted, and so is its finished run's work dir
    v7   2 h  not registered   the newest; its run's work dir finished 0 h ago: both kept
    partial (no manifest, 48 h old): deleted; fresh (no manifest, just written): kept; run crashed: kept
    """
    root = tmp_path_factory.mktemp("gc")
    store = str(root / "store")
    shutil.copyfile(_mlflow_db_template, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    base = FleetVersion.open(build_version(str(root / "base"), "base", num_campaigns=5).uri)
    created = {
        "v1": _ago(days=10),
        "v2": _ago(days=9),
        "v3": _ago(days=8),
        "v4": _ago(days=7),
        "v5": _ago(days=6),
        "v6": _ago(days=5),
        "v7": _ago(hours=2),
    }
    for vid, at in created.items():
        _commit(base, store, vid, at)
    versions = {
        vid: _register(store, vid, uri, FAIL if vid in ("v4", "v6") else PASS) for vid in ("v1", "v2", "v3", "v4", "v6")
    }
    MlflowClient(uri, uri).set_registered_model_alias("adfleet", "staging", versions["v4"])
    for rid in ("v6", "v7", "crashed"):
        RunDir(store, "adfleet", rid).write_backbone_stats({"steps": 1})
    RunDir(store, "adfleet", "crashed").write_plan({"parent_manifest": f"{store}/adfleet/versions/v5", "batches": []})
    _age_files(f"{store}/adfleet/runs/v6", 30)
    for name in ("partial", "fresh"):
        os.makedirs(f"{store}/adfleet/versions/{name}/heads")
        with open(f"{store}/adfleet/versions/{name}/heads/part-00000.parquet", "wb") as f:
            f.write(b"PAR1 half written")
    _age_files(f"{store}/adfleet/versions/partial", 48)
    return {"root": root, "store": store, "uri": uri, "versions": versions}


@pytest.fixture
def copy(fleet_store, tmp_path):
    """A private copy of the store and the registry (gc --yes changes them)."""
    store = str(tmp_path / "store")
    shutil.copytree(fleet_store["store"], store)
    shutil.copyfile(fleet_store["root"] / "mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, uri)  # the copied registry's tags still name the original store's manifests:
    for mv in client.search_model_versions("name = 'adfleet'"):  # point them at the copy (what a move would do)
        client.set_model_version_tag(
            "adfleet", mv.version, "manifest_uri", mv.tags["manifest_uri"].replace(fleet_store["store"], store)
        )
    return {"store": store, "uri": uri, "versions": fleet_store["versions"], "client": client}


def _hours_ago(event: str, why: str) -> float:
    """The age in ``"<event> 2.0 h ago"`` of a plan's reason: the wall clock runs on while the suite does."""
    return float(re.search(rf"{event} (\d+\.\d) h ago", why).group(1))


def _decisions(plan) -> dict:
    return {(i.kind, i.id): i.delete for i in plan.items}


def test_plan_keeps_aliases_the_newest_the_rollback_target_recent_and_in_use(fleet_store):
    plan = plan_gc(fleet_store["store"], "adfleet", tracking_uri=fleet_store["uri"], keep_last=1)
    assert _decisions(plan) == {
        ("version", "v1"): False,
        ("version", "v2"): False,
        ("version", "v3"): False,
        ("version", "v4"): False,
        ("version", "v5"): False,
        ("version", "v6"): True,
        ("version", "v7"): False,
        ("run", "crashed"): False,
        ("run", "v6"): True,
        ("run", "v7"): False,
        ("incomplete version", "fresh"): False,
        ("incomplete version", "partial"): True,
    }
    why = {(i.kind, i.id): "; ".join(i.why) for i in plan.items}
    assert _hours_ago("left champion", why[("version", "v1")]) <= 0.5 and "(< 24 h)" in why[("version", "v1")]
    assert "fleet rollback's target" in why[("version", "v2")]
    assert why[("version", "v3")].startswith("alias @champion")
    assert why[("version", "v4")].startswith("alias @staging")
    assert why[("version", "v5")] == "parent of unfinished run(s) crashed"
    assert "one of the 1 newest" in why[("version", "v7")]
    # committed 2 h before this module was imported; the suite may reach this test minutes later
    assert 2.0 <= _hours_ago("committed", why[("version", "v7")]) <= 2.5
    assert why[("run", "crashed")] == "unfinished (resume: fleet compress --run-id crashed)"
    assert _hours_ago("finished", why[("run", "v7")]) <= 0.5
    assert [i.id for i in plan.deletions] == ["v6", "v6", "partial"]
    assert plan.deletions[0].model_versions == [fleet_store["versions"]["v6"]]
    # two days later v1 left champion long enough ago; nothing else changes
    later = plan_gc(
        fleet_store["store"], "adfleet", tracking_uri=fleet_store["uri"], keep_last=1, now=NOW + timedelta(days=2)
    )
    assert [(i.kind, i.id) for i in later.deletions] == [
        ("version", "v1"),
        ("version", "v6"),
        ("run", "v6"),
        ("run", "v7"),
        ("incomplete version", "fresh"),
        ("incomplete version", "partial"),
    ]


def test_fleet_gc_is_a_dry_run_until_yes(copy, capsys):
    store, uri, client = copy["store"], copy["uri"], copy["client"]
    before = sorted(os.listdir(f"{store}/adfleet/versions"))
    argv = ["gc", "adfleet", "--store", store, "--tracking-uri", uri, "--keep-last", "1"]
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr()
    plan = json.loads(out.out)
    assert plan["dry_run"] and plan["delete"] == {
        "versions": 1,
        "runs": 1,
        "incomplete_versions": 1,
        "model_versions": 1,
        "bytes": plan["delete"]["bytes"],
    }
    assert plan["delete"]["bytes"] > 0
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "would delete" in out.out and "dry run: nothing was deleted; run again with --yes" in out.err
    assert sorted(os.listdir(f"{store}/adfleet/versions")) == before  # nothing deleted
    assert len(client.search_model_versions("name = 'adfleet'")) == 5
    deleted = copy["versions"]["v6"]
    run_id = client.get_model_version("adfleet", deleted).run_id

    assert main([*argv, "--yes"]) == 0
    out = capsys.readouterr()
    assert "deleted" in out.out and not out.err
    assert sorted(os.listdir(f"{store}/adfleet/versions")) == ["fresh", "v1", "v2", "v3", "v4", "v5", "v7"]
    assert sorted(os.listdir(f"{store}/adfleet/runs")) == ["crashed", "v7"]
    with pytest.raises(StoreError, match="no manifest.json"):
        FleetVersion.open(f"{store}/adfleet/versions/v6")
    assert main(["versions", "adfleet", "--tracking-uri", uri, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == registry.list_versions("adfleet", uri)  # --json prints list_versions' rows
    assert [r["version_id"] for r in rows] == ["v1", "v2", "v3", "v4"] and deleted not in [r["version"] for r in rows]
    assert registry.DELETED_TAG in client.get_run(run_id).data.tags  # the run (the history) is kept, marked
    assert registry.rollback("adfleet", uri) == copy["versions"]["v2"]  # the rollback target is still there
    # a second gc has nothing left to delete
    assert main([*argv, "--yes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["delete"]["versions"] == 0


def test_a_version_that_gained_an_alias_since_the_plan_is_not_deleted(copy):
    plan = plan_gc(copy["store"], "adfleet", tracking_uri=copy["uri"], keep_last=1)
    copy["client"].set_registered_model_alias("adfleet", "canary", copy["versions"]["v6"])  # a reader now uses it
    failures = apply_plan(plan)
    assert len(failures) == 1 and "version v6: not deleted" in failures[0]
    assert "holds the alias(es) canary" in failures[0]
    FleetVersion.open(f"{copy['store']}/adfleet/versions/v6")  # still whole
    assert not os.path.exists(f"{copy['store']}/adfleet/versions/partial")  # the rest went ahead


def test_gc_finishes_an_interrupted_deletion(copy):
    """A gc stopped after the registry but before the store, or after the manifest: the next one finishes."""
    store = copy["store"]
    registry.delete_version("adfleet", copy["versions"]["v6"], copy["uri"])  # stopped after the registry step
    os.remove(f"{store}/adfleet/versions/v4/manifest.json")  # v4 lost its manifest by hand: registered, dangling
    plan = plan_gc(store, "adfleet", tracking_uri=copy["uri"], keep_last=1, grace_hours=0)
    by_id = {(i.kind, i.id): i for i in plan.items}
    assert by_id[("version", "v6")].delete and by_id[("version", "v6")].model_versions == []
    dangling = by_id[("model version", "v4")]
    assert not dangling.delete and "holds alias @staging" in dangling.why[0]  # an alias still protects it
    copy["client"].delete_registered_model_alias("adfleet", "staging")
    plan = plan_gc(store, "adfleet", tracking_uri=copy["uri"], keep_last=1, grace_hours=0)
    assert not apply_plan(plan)
    assert [r["version_id"] for r in registry.list_versions("adfleet", copy["uri"])] == ["v2", "v3"]
    assert sorted(os.listdir(f"{store}/adfleet/versions")) == ["v2", "v3", "v5", "v7"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_gc_without_registry_keeps_only_the_newest_and_recent(where, tmp_path, capsys, request):
    """A store written with --no-register, on a local disk and on S3 (moto's server: LastModified times,
    object deletes): only --keep-last and --grace-hours protect versions; no tracking database is touched."""
    options = None
    store = str(tmp_path / "store")
    if where == "s3":
        store = request.getfixturevalue("s3_bucket") + "/fleet"
        options = request.getfixturevalue("s3_server")["storage_options"]
    base = FleetVersion.open(build_version(str(tmp_path / "base"), "base", num_campaigns=3).uri)
    for vid, at in (("a", _ago(days=3)), ("b", _ago(days=2)), ("c", _ago(hours=1)), ("d", _ago(days=1, hours=1))):
        writer = VersionWriter(store, "adfleet", vid, options)
        writer.write_backbone_bytes(base.read_backbone_bytes())
        writer.write_heads(base.read_heads())
        writer.commit(created_at=at)
    RunDir(store, "adfleet", "c", options).write_plan({"parent_manifest": None})  # finished just now
    argv = [
        "gc",
        "adfleet",
        "--store",
        store,
        "--no-registry",
        "--keep-last",
        "1",
        "--yes",
        "--json",
        "--tracking-uri",
        f"sqlite:///{tmp_path}/none.db",
    ]
    if options:
        argv += ["--storage-options", json.dumps(options)]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert [(i["kind"], i["id"]) for i in result["items"] if i["delete"]] == [
        ("version", "a"),
        ("version", "b"),
        ("version", "d"),
    ]
    assert result["delete"]["bytes"] > 0 and not result["failures"]
    assert list_versions(store, "adfleet", options) == ["c"]
    assert not (tmp_path / "none.db").exists()
