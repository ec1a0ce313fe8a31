"""fleet.storage.registry against real MLflow stores (SQLite, and one HTTP server), and fleet.core.plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from filelock import FileLock
from mlflow.artifacts import download_artifacts
from mlflow.tracking import MlflowClient

from fleet.core import plots
from fleet.core.errors import FleetError, RegistryError
from fleet.storage import registry, runs, tracking
from fleet.storage.promotion_gate import GateResult, PromotionGate, evaluate_gate

GOOD = {
    "fidelity_auc_diff_median": -0.002,
    "fidelity_auc_diff_p10": -0.01,
    "quarantine_share": 0.01,
    "fidelity_kl_median": 0.004,
    "fidelity_mean_ratio_within_10pct_share": 0.93,
    "campaigns": 100,
    "campaigns_status_fallback": 3,
    "compression_ratio": 180.5,
    "stage_seconds": {"distill": 12.5, "quantize": 1.25},
    "nan_metric": float("nan"),
}
BAD = {**GOOD, "fidelity_auc_diff_median": -0.031, "quarantine_share": 0.2}
PNG = plots.fidelity_histogram([-0.01, 0.0, 0.002])
STORAGE = {
    "key": "AKIAFLEETKEY",
    "secret": "s3cr3t-value",
    "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"},
}


def _artifacts(tmp_path, fleet, version_id):
    """A dummy manifest and backbone, as the store would have written them."""
    folder = tmp_path / version_id
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_text(
        json.dumps({"format": "fleet-version/1", "fleet": fleet, "version_id": version_id})
    )
    (folder / "backbone.safetensors").write_bytes(b"\x00" * 64)
    return {
        "manifest.json": str(folder / "manifest.json"),
        "backbone.safetensors": str(folder / "backbone.safetensors"),
    }


def _register(tmp_path, uri, version_id, metrics=GOOD, fleet="adfleet", **kw):
    return registry.register_version(
        fleet_name=fleet,
        manifest_uri=f"s3://bucket/fleet/{fleet}/versions/{version_id}/manifest.json",
        version_id=version_id,
        local_artifacts=_artifacts(tmp_path, fleet, version_id),
        params={
            "quant": {"bits": 4, "group_size": 32},
            "teachers": ["a", "b"],
            "aws_secret_access_key": "x",
            "store": "s3://AKIAFLEETKEY:s3cr3t-value@bucket/fleet",
        },
        metrics=metrics,
        plots={"fidelity_histogram": PNG},
        tracking_uri=uri,
        storage_options=STORAGE,
        **kw,
    )


# ----------------------------------------------------------------------------- gate (pure)


def test_gate_passes_and_reports_every_failure():
    assert evaluate_gate(GOOD, None, PromotionGate()) == GateResult(True, [])
    result = evaluate_gate(BAD, None, PromotionGate())
    assert not result.passed
    assert result.reasons == ["median AUC diff -0.031 < -0.010", "quarantine share 0.200 > 0.050"]


def test_gate_missing_metric_and_regression():
    agreement = {"fidelity_kl_median": 0.0, "fidelity_mean_ratio_within_10pct_share": 1.0}
    result = evaluate_gate(
        {"fidelity_auc_diff_median": 0.0, "quarantine_share": float("nan"), **agreement}, None, PromotionGate()
    )
    assert not result.passed and len(result.reasons) == 2
    assert "'fidelity_auc_diff_p10' is missing" in result.reasons[0] and "quarantine_share" in result.reasons[1]

    champion = {"fidelity_auc_diff_median": 0.01, "fidelity_auc_diff_p10": -0.02}
    result = evaluate_gate(GOOD, champion, PromotionGate())
    assert result.reasons == ["median AUC diff -0.002 regresses from the champion's 0.010 by 0.012 > 0.005"]
    assert evaluate_gate(GOOD, champion, PromotionGate(max_regression=0.02)).passed
    assert evaluate_gate(GOOD, {"unrelated": 1.0}, PromotionGate()).passed  # nothing to compare


# A fleet where no campaign has a hold-out AUC (too few positives everywhere): as the pipeline logs it
# to MLflow, the None AUC metrics are simply absent.
NO_AUC = {
    "campaigns": 40,
    "campaigns_ok": 38,
    "campaigns_reused": 0,
    "campaigns_quarantined": 2,
    "quarantine_share": 0.05,
    "fidelity_campaigns_without_auc": 38,
    "fidelity_kl_median": 0.006,
    "fidelity_mean_ratio_within_10pct_share": 0.9,
    "campaigns_status_ok": 36,
    "campaigns_status_fallback": 2,
}


def test_gate_on_a_fleet_without_any_auc_skips_the_auc_checks_with_a_note():
    result = evaluate_gate(NO_AUC, {"fidelity_auc_diff_median": 0.01, "fidelity_auc_diff_p10": 0.0}, PromotionGate())
    assert result.passed and result.reasons == []
    assert len(result.notes) == 1 and "AUC checks skipped" in result.notes[0]
    # the same counts without the campaigns_ok / reused split: campaigns - quarantined have a head
    assert (
        evaluate_gate(
            {k: v for k, v in NO_AUC.items() if k not in ("campaigns_ok", "campaigns_reused")}, None, PromotionGate()
        ).notes
        == result.notes
    )
    # one campaign with an AUC: the AUC metrics are required again
    some = evaluate_gate({**NO_AUC, "fidelity_campaigns_without_auc": 37}, None, PromotionGate())
    assert not some.passed and some.notes == []
    assert "'fidelity_auc_diff_median' is missing" in some.reasons[0]
    # with an AUC, its checks run as before (and notes stay empty)
    full = evaluate_gate(
        {**NO_AUC, "fidelity_auc_diff_median": -0.02, "fidelity_auc_diff_p10": -0.02}, None, PromotionGate()
    )
    assert full.reasons == ["median AUC diff -0.020 < -0.010"] and full.notes == []


def test_gate_fails_on_a_high_median_kl():
    result = evaluate_gate({**NO_AUC, "fidelity_kl_median": 0.05}, None, PromotionGate())
    assert not result.passed
    assert result.reasons == ["median KL (fidelity_kl_median) 0.050 > 0.020"]
    assert evaluate_gate({**NO_AUC, "fidelity_kl_median": 0.05}, None, PromotionGate(max_kl_median=0.1)).passed
    missing = evaluate_gate({k: v for k, v in NO_AUC.items() if k != "fidelity_kl_median"}, None, PromotionGate())
    assert not missing.passed and "'fidelity_kl_median' is missing" in missing.reasons[0]


def test_gate_fails_on_a_low_mean_ratio_share():
    result = evaluate_gate({**NO_AUC, "fidelity_mean_ratio_within_10pct_share": 0.7}, None, PromotionGate())
    assert result.reasons == ["mean-ratio-within-10% share (fidelity_mean_ratio_within_10pct_share) 0.700 < 0.800"]
    missing = evaluate_gate(
        {k: v for k, v in NO_AUC.items() if k != "fidelity_mean_ratio_within_10pct_share"}, None, PromotionGate()
    )
    assert not missing.passed and "'fidelity_mean_ratio_within_10pct_share' is missing" in missing.reasons[0]


def test_gate_fails_on_a_high_fallback_share():
    result = evaluate_gate({**NO_AUC, "campaigns_status_fallback": 6}, None, PromotionGate())  # 6 / 40 = 0.15
    assert result.reasons == ["fallback share (campaigns_status_fallback / campaigns) 0.150 > 0.100"]
    assert evaluate_gate({**NO_AUC, "campaigns_status_fallback": 4}, None, PromotionGate()).passed  # 0.1: not above
    no_count = {k: v for k, v in NO_AUC.items() if k != "campaigns_status_fallback"}
    assert evaluate_gate(no_count, None, PromotionGate()).passed  # a missing count is 0
    assert not evaluate_gate({**NO_AUC, "campaigns_status_fallback": float("nan")}, None, PromotionGate()).passed


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_quarantine_share": 1.5},
        {"max_regression": -0.1},
        {"max_kl_median": -0.01},
        {"max_kl_median": float("inf")},
        {"min_mean_ratio_share": 1.2},
        {"max_fallback_share": -0.1},
        {"max_fallback_share": True},
        {"min_median_auc_diff": float("nan")},
        {"min_p10_auc_diff": 0.0},
        {"min_median_auc_diff": "0.1"},
    ],
)
def test_gate_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="PromotionGate"):
        PromotionGate(**kwargs)


# ----------------------------------------------------------------------------- registry on SQLite


def test_register_two_versions_tags_champion_and_resolve(tmp_path, sqlite_tracking_uri):
    uri = sqlite_tracking_uri
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    v1 = _register(tmp_path, uri, "20260101-a")
    v2 = _register(tmp_path, uri, "20260102-b", parent_version_id="20260101-a")
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before  # process-wide URI restored
    assert (v1.version, v2.version) == ("1", "2") and v1.champion and v2.champion and v2.gate.passed
    assert registry.champion_version("adfleet", uri) == "2"

    client = MlflowClient(uri, uri)
    assert [m.name for m in client.search_registered_models()] == ["adfleet"]
    tags = client.get_model_version("adfleet", "2").tags
    assert tags["version_id"] == "20260102-b" and tags["parent_version_id"] == "20260101-a"
    assert tags["manifest_uri"] == v2.manifest_uri and tags["gate"] == "passed"

    run = client.get_run(v2.run_id)
    assert run.info.experiment_id == client.get_experiment_by_name("fleet-adfleet").experiment_id
    assert run.data.metrics["compression_ratio"] == 180.5 and run.data.metrics["stage_seconds.distill"] == 12.5
    assert "nan_metric" not in run.data.metrics
    assert run.data.params["quant.bits"] == "4" and "aws_secret_access_key" not in run.data.params
    assert [a.path for a in client.list_artifacts(v2.run_id, "plots")] == ["plots/fidelity_histogram.png"]

    # The pyfunc's data dir holds the artifacts and fleet_model.json, and no credential anywhere.
    model_dir = client.get_model_version_download_uri("adfleet", "2")
    data = os.path.join(download_artifacts(artifact_uri=model_dir, dst_path=str(tmp_path / "model")), "data", "fleet")
    assert sorted(os.listdir(data)) == ["backbone.safetensors", "fleet_model.json", "manifest.json"]
    model_json = json.loads(Path(data, "fleet_model.json").read_text())
    assert model_json["manifest_uri"] == v2.manifest_uri and model_json["version_id"] == "20260102-b"
    assert model_json["storage_options_env"] == "FLEET_STORAGE_OPTIONS"
    assert model_json["storage_options"] == {"client_kwargs": STORAGE["client_kwargs"]}
    everything = json.dumps([tags, run.data.params, run.data.tags, model_json])
    assert "AKIAFLEETKEY" not in everything and "s3cr3t-value" not in everything

    assert registry.resolve_manifest_uri("models:/adfleet@champion", uri) == (v2.manifest_uri, "20260102-b")
    assert registry.resolve_manifest_uri("models:/adfleet/1", uri) == (v1.manifest_uri, "20260101-a")
    assert registry.resolve_manifest_uri("s3://b/f/versions/x/", uri) == ("s3://b/f/versions/x/", None)
    with pytest.raises(RegistryError, match="no alias 'staging'"):
        registry.resolve_manifest_uri("models:/adfleet@staging", uri)
    with pytest.raises(RegistryError, match="no version '7'"):
        registry.resolve_manifest_uri("models:/adfleet/7", uri)
    with pytest.raises(ValueError, match="unsupported model URI"):
        registry.resolve_manifest_uri("models:/adfleet", uri)

    rows = registry.list_versions("adfleet", uri)
    assert [(r["version"], r["version_id"], r["aliases"], r["champion"], r["gate"]) for r in rows] == [
        ("1", "20260101-a", [], False, "passed"),
        ("2", "20260102-b", ["champion"], True, "passed"),
    ]
    assert rows[0]["created"].endswith("Z") and rows[1]["run_id"] == v2.run_id
    with pytest.raises(RegistryError, match="no registered model"):
        registry.list_versions("nope", uri)


def test_failing_gate_and_regression_keep_champion(tmp_path, sqlite_tracking_uri):
    uri = sqlite_tracking_uri
    assert _register(tmp_path, uri, "v1").champion
    bad = _register(tmp_path, uri, "v2", metrics=BAD)
    assert not bad.champion and not bad.gate.passed
    assert "median AUC diff -0.031 < -0.010" in bad.gate.reasons
    worse = _register(tmp_path, uri, "v3", metrics={**GOOD, "fidelity_auc_diff_p10": -0.02})
    assert worse.gate.reasons == ["p10 AUC diff -0.020 regresses from the champion's -0.010 by 0.010 > 0.005"]
    assert registry.champion_version("adfleet", uri) == "1"
    rows = registry.list_versions("adfleet", uri)
    assert [r["gate"] for r in rows] == ["passed", "failed", "failed"]
    assert rows[2]["gate_reasons"] == worse.gate.reasons


def test_promote_rollback_round_trip(tmp_path, sqlite_tracking_uri):
    uri = sqlite_tracking_uri
    assert registry.champion_version("adfleet", uri) is None
    with pytest.raises(RegistryError, match="no champion"):
        registry.rollback("adfleet", uri)
    _register(tmp_path, uri, "v1")
    _register(tmp_path, uri, "v2", metrics=BAD)  # failed the gate: promoted by hand below
    with pytest.raises(FleetError, match="no earlier champion"):
        registry.rollback("adfleet", uri)

    registry.promote("adfleet", "2", uri, reason="hotfix")
    assert registry.champion_version("adfleet", uri) == "2"
    registry.promote("adfleet", 2, uri)  # already champion: history unchanged
    history = json.loads(MlflowClient(uri, uri).get_registered_model("adfleet").tags["champion_history"])
    assert [(e["version"], e["reason"]) for e in history] == [("1", "gate"), ("2", "hotfix")]
    with pytest.raises(RegistryError, match="no version '9'"):
        registry.promote("adfleet", "9", uri)

    assert registry.rollback("adfleet", uri) == "1"
    assert registry.champion_version("adfleet", uri) == "1"
    assert registry.resolve_manifest_uri("models:/adfleet@champion", uri)[1] == "v1"
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback("adfleet", uri)


def test_bad_inputs_are_refused(tmp_path, sqlite_tracking_uri):
    with pytest.raises(ValueError, match="file store"):
        registry.champion_version("adfleet", str(tmp_path / "mlruns"))
    with pytest.raises(ValueError, match="needs backbone.safetensors"):
        registry.register_version(
            fleet_name="adfleet",
            manifest_uri="m",
            version_id="v1",
            local_artifacts={"manifest.json": "x"},
            params={},
            metrics=GOOD,
            plots={},
            tracking_uri=sqlite_tracking_uri,
        )
    with pytest.raises(ValueError, match="version_id='v1' but register_version got 'v2'"):
        registry.register_version(
            fleet_name="adfleet",
            manifest_uri="m",
            version_id="v2",
            local_artifacts=_artifacts(tmp_path, "adfleet", "v1"),
            params={},
            metrics=GOOD,
            plots={},
            tracking_uri=sqlite_tracking_uri,
        )
    with pytest.raises(ValueError, match="not PNG"):
        registry.register_version(
            fleet_name="adfleet",
            manifest_uri="m",
            version_id="v4",
            local_artifacts=_artifacts(tmp_path, "adfleet", "v4"),
            params={},
            metrics=GOOD,
            plots={"p": b"GIF89a"},
            tracking_uri=sqlite_tracking_uri,
        )


def test_default_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.default_tracking_uri() == "http://mlflow:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert tracking.default_tracking_uri() == f"sqlite:///{tmp_path}/fleet-data/mlflow.db"
    assert not (tmp_path / "fleet-data").exists()  # created by a writer's first use only
    assert registry.champion_version("adfleet") is None  # a writer's lookup (fleet compress) creates it
    assert (tmp_path / "fleet-data" / "mlflow.db").is_file()


# ----------------------------------------------------------------------------- registry over HTTP


def test_register_and_resolve_over_http(tmp_path, mlflow_server):
    v = _register(tmp_path, mlflow_server, "http-v1", fleet="httpfleet")
    assert v.version == "1" and v.champion
    assert registry.resolve_manifest_uri("models:/httpfleet@champion", mlflow_server) == (v.manifest_uri, "http-v1")
    assert [r["version_id"] for r in registry.list_versions("httpfleet", mlflow_server)] == ["http-v1"]


# ----------------------------------------------------------------------------- plots


def test_plots_are_png_and_handle_empty_input():
    png = b"\x89PNG\r\n\x1a\n"
    assert plots.fidelity_histogram([0.01, -0.02, float("nan")]).startswith(png)
    assert plots.fidelity_vs_size([10, 1000, 0], [0.0, -0.01, 0.3]).startswith(png)
    assert plots.size_breakdown({"backbone": 2_000_000, "heads": 150_000, "rejects": 900}).startswith(png)
    assert plots.calibration_vs_size([10, 1000, 0, 50], [1.02, 0.7, 1.0, float("nan")]).startswith(png)
    for empty in (
        plots.fidelity_histogram([]),
        plots.fidelity_vs_size([], []),
        plots.size_breakdown({}),
        plots.calibration_vs_size([], []),
    ):
        assert empty.startswith(png)
    with pytest.raises(ValueError, match="differ in length"):
        plots.fidelity_vs_size([1, 2], [0.0])
    with pytest.raises(ValueError, match="differ in length"):
        plots.calibration_vs_size([1, 2], [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        plots.size_breakdown({"heads": -1})


def test_unreadable_champion_is_named_when_a_run_looks_for_its_parent(tmp_path, sqlite_tracking_uri):
    """An incremental run starts from the champion; if its version's files are gone the error says which."""
    from fleet.core.errors import StoreError
    from fleet.run.pipeline import _parent_version

    missing = tmp_path / "store" / "adfleet" / "versions" / "v1" / "manifest.json"
    registry.register_version(
        fleet_name="adfleet",
        manifest_uri=str(missing),
        version_id="v1",
        local_artifacts=_artifacts(tmp_path, "adfleet", "v1"),
        params={},
        metrics=GOOD,
        plots={},
        tracking_uri=sqlite_tracking_uri,
    )
    with pytest.raises(StoreError, match="champion of fleet 'adfleet' \\(registered version 1\\) cannot be read"):
        _parent_version("adfleet", str(tmp_path / "store"), sqlite_tracking_uri, None)


# ----------------------------------------------------------------------------- exactly once, compare-and-set
# Real processes race on a real SQLite store. The races are made deterministic by the lock itself: the
# test holds fleet's registry lock while the racers start, waits until each says on stderr that it is
# waiting for the lock (so each has read the champion it decides from), then lets them go.

WAITING = "waiting for the registry lock"


class _Racer:
    """A subprocess whose merged stdout/stderr is read line by line by a thread."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "400"}
        )
        self.lines: list[str] = []
        self._waiting = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if WAITING in line:
                self._waiting.set()
        self._waiting.set()  # EOF: the process ended without waiting (it never took the lock)

    def wait_until_blocked(self) -> None:
        assert self._waiting.wait(timeout=180), "racer neither blocked on the lock nor ended"

    def finish(self) -> tuple[int, str]:
        code = self.proc.wait(timeout=180)
        self._reader.join(timeout=30)
        return code, "".join(self.lines)


def _hold_registry_lock(uri: str) -> FileLock:
    """fleet's write lock of a SQLite registry: the file ``<db>.lock`` (docs/security.md, section 5)."""
    return FileLock(uri.removeprefix("sqlite:///") + ".lock")


def _fleet_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fleet.cli.main", *args]


def _versions(tmp_path, uri: str, name: str, count: int) -> None:
    """``count`` bare model versions of ``name`` (enough for alias moves; no runs, an empty source)."""
    client = MlflowClient(uri, uri)
    client.create_registered_model(name)
    for _ in range(count):
        client.create_model_version(name, source=str(tmp_path), run_id=None)


def test_re_registering_a_version_id_registers_nothing_and_keeps_the_champion(tmp_path, sqlite_tracking_uri):
    uri = sqlite_tracking_uri
    first = _register(tmp_path, uri, "night-1")
    _register(tmp_path, uri, "night-2")
    again = _register(tmp_path, uri, "night-1")
    assert [r["version_id"] for r in registry.list_versions("adfleet", uri)] == ["night-1", "night-2"]
    assert registry.champion_version("adfleet", uri) == "2"  # not moved back by the re-run
    assert again.existing and again.version == "1" and again.run_id == first.run_id and not again.champion
    assert again.gate.passed and again.manifest_uri == first.manifest_uri and not first.existing
    assert registry.find_version("adfleet", "night-1", uri).version == "1"
    assert registry.find_version("adfleet", "night-9", uri) is None
    with pytest.raises(RegistryError, match="already registered as version 1 with manifest"):
        registry.register_version(
            fleet_name="adfleet",
            manifest_uri="s3://elsewhere/manifest.json",
            version_id="night-1",
            local_artifacts=_artifacts(tmp_path, "adfleet", "night-1"),
            params={},
            metrics=GOOD,
            plots={},
            tracking_uri=uri,
        )


_INIT_WORKER = """
import sys
from fleet.storage import registry
print("ready", flush=True)
for line in sys.stdin:
    try:
        registry.champion_version("adfleet", line.strip())
        print("ok", flush=True)
    except Exception as exc:
        print("error", type(exc).__name__, str(exc).replace("\\n", " ")[:300], flush=True)
"""


def test_concurrent_first_use_of_a_sqlite_registry_never_corrupts_it(tmp_path, _mlflow_db_template):
    """4 processes open the same fresh SQLite registry at once (MLflow creates and migrates it on
    first use), 10 times: every open and read succeeds and every database ends fully migrated."""
    import sqlite3

    def revision(path) -> list:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT version_num FROM alembic_version").fetchall()

    head = revision(_mlflow_db_template)
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _INIT_WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        assert [w.stdout.readline().strip() for w in workers] == ["ready"] * 4
        for trial in range(10):
            path = tmp_path / f"trial-{trial}" / "mlflow.db"
            path.parent.mkdir()
            uri = f"sqlite:///{path}"
            for w in workers:  # all four start at once: MLflow's migrations take seconds
                w.stdin.write(uri + "\n")
                w.stdin.flush()
            answers = [w.stdout.readline().strip() for w in workers]
            assert answers == ["ok"] * 4, f"trial {trial}: {answers}"  # each opened and read it
            assert revision(path) == head
    finally:
        for w in workers:
            w.stdin.close()
            w.wait(timeout=60)


def test_racing_rollbacks_and_promotes_are_compare_and_set(tmp_path, sqlite_tracking_uri):
    """Two `fleet rollback` and two `fleet promote` processes decide from the same champion at the same
    time; in each pair exactly one moves it, the other exits 1 saying it moved, and no update is lost."""
    uri = sqlite_tracking_uri
    _versions(tmp_path, uri, "roll", 3)
    for version in ("1", "2", "3"):
        registry.promote("roll", version, uri)
    _versions(tmp_path, uri, "prom", 3)
    registry.promote("prom", "1", uri)

    with _hold_registry_lock(uri):
        racers = {
            "rollback-a": _Racer(_fleet_cli("rollback", "roll", "--tracking-uri", uri)),
            "rollback-b": _Racer(_fleet_cli("rollback", "roll", "--tracking-uri", uri)),
            "promote-2": _Racer(_fleet_cli("promote", "prom", "2", "--tracking-uri", uri)),
            "promote-3": _Racer(_fleet_cli("promote", "prom", "3", "--tracking-uri", uri)),
        }
        for racer in racers.values():
            racer.wait_until_blocked()
    results = {name: racer.finish() for name, racer in racers.items()}

    rollbacks = sorted(results[n] for n in ("rollback-a", "rollback-b"))
    assert [code for code, _ in rollbacks] == [0, 1], rollbacks
    assert "rolled back to version 2" in rollbacks[0][1]
    assert (
        "champion moved from version 3 to version 2 while rolling back from it; nothing was changed" in rollbacks[1][1]
    )
    assert registry.champion_version("roll", uri) == "2"
    history = json.loads(MlflowClient(uri, uri).get_registered_model("roll").tags["champion_history"])
    assert [e["version"] for e in history] == ["1", "2"]  # one rollback's worth, not two, not a lost one

    promotes = {name: results[name] for name in ("promote-2", "promote-3")}
    assert sorted(code for code, _ in promotes.values()) == [0, 1], promotes
    winner = next(name for name, (code, _) in promotes.items() if code == 0).split("-")[1]
    loser_output = next(out for code, out in promotes.values() if code == 1)
    assert f"champion moved from version 1 to version {winner} while promoting version" in loser_output
    assert registry.champion_version("prom", uri) == winner
    history = json.loads(MlflowClient(uri, uri).get_registered_model("prom").tags["champion_history"])
    assert [e["version"] for e in history] == ["1", winner]


_GATE_RACER = """
import json, sys
from fleet.storage import registry
from fleet.core.errors import FleetError
uri, folder = sys.argv[1], sys.argv[2]
metrics = json.loads(sys.argv[3])
try:
    v = registry.register_version(fleet_name="adfleet", manifest_uri="s3://b/adfleet/versions/v3/manifest.json",
                                  version_id="v3", local_artifacts={"manifest.json": folder + "/manifest.json",
                                  "backbone.safetensors": folder + "/backbone.safetensors"}, params={},
                                  metrics=metrics, plots={}, tracking_uri=uri)
except FleetError as exc:
    print("error:", exc, flush=True)
    sys.exit(1)
print("registered", v.version, v.champion, flush=True)
"""


def test_the_gate_refuses_to_move_a_champion_that_moved_while_it_decided(tmp_path, sqlite_tracking_uri):
    """A run gated against champion 1; before it registers, version 2 is promoted: the run registers
    nothing, exits 1 naming both versions, and a re-run gates against version 2."""
    uri = sqlite_tracking_uri
    _register(tmp_path, uri, "v1")
    _register(tmp_path, uri, "v2", metrics=BAD)  # not champion
    artifacts = _artifacts(tmp_path, "adfleet", "v3")
    with _hold_registry_lock(uri):
        racer = _Racer(
            [sys.executable, "-c", _GATE_RACER, uri, os.path.dirname(artifacts["manifest.json"]), json.dumps(GOOD)]
        )
        racer.wait_until_blocked()  # it has read champion 1, gated, logged its run
        MlflowClient(uri, uri).set_registered_model_alias("adfleet", "champion", "2")  # another writer
    code, output = racer.finish()
    assert code == 1, output
    assert (
        "champion moved from version 1 to version 2 while fleet version 'v3' was gated against it; "
        "nothing was changed; re-run it"
    ) in output
    assert registry.find_version("adfleet", "v3", uri) is None and registry.champion_version("adfleet", uri) == "2"
    client = MlflowClient(uri, uri)
    experiment = client.get_experiment_by_name("fleet-adfleet").experiment_id
    assert [r.info.run_name for r in client.search_runs([experiment])] == ["v2", "v1"]  # its run was deleted
    again = _register(tmp_path, uri, "v3")
    assert again.version == "3" and again.champion and not again.existing


# ----------------------------------------------------------------------------- the run of a compress

COMPRESS_PARAMS = {
    "head_steps": 150,
    "teachers_uri": "s3://AKIAFLEETKEY:s3cr3t-value@bucket/teachers",
    "events_uri": "s3://bucket/events?secret=s3cr3t-value",
    "aws_secret_access_key": "x",
}


def _runs(uri, fleet="adfleet"):
    client = MlflowClient(uri, uri)
    return client.search_runs([client.get_experiment_by_name(f"fleet-{fleet}").experiment_id])


def test_a_compress_run_spans_stages_and_registration(tmp_path, sqlite_tracking_uri):
    """start_compress_run -> stage metrics over steps -> register_version into that run: one run, FINISHED,
    params scrubbed, each stage's seconds a metric history."""
    uri = sqlite_tracking_uri
    run_id = runs.start_compress_run("adfleet", "v1", COMPRESS_PARAMS, uri, storage_options=STORAGE)
    client = MlflowClient(uri, uri)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.info.run_name == "v1" and run.data.tags["fleet.version_id"] == "v1"
    params = run.data.params
    assert params["teachers_uri"] == "s3://***@bucket/teachers" and "s3cr3t" not in json.dumps(params)
    assert params["head_steps"] == "150" and "aws_secret_access_key" not in params
    for step, stage in enumerate(("soft_labels", "backbone"), 1):
        runs.log_run_metrics(run_id, {f"stage_seconds_{stage}": 2.0 * step, "elapsed_seconds": 3.0 * step}, step, uri)
    registered = _register(tmp_path, uri, "v1", mlflow_run_id=run_id)
    assert registered.run_id == run_id and registered.champion
    assert [r.info.run_id for r in _runs(uri)] == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["fleet.manifest_uri"] == registered.manifest_uri
    assert run.data.metrics["stage_seconds_backbone"] == 4.0 and run.data.metrics["compression_ratio"] == 180.5
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "elapsed_seconds")] == [(1, 3.0), (2, 6.0)]
    assert client.get_model_version("adfleet", "1").run_id == run_id
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/fidelity_histogram.png"]


def test_a_resumed_compress_continues_its_run(tmp_path, sqlite_tracking_uri):
    """A failed compress's run ends FAILED; resuming it (same MLflow run id) sets it RUNNING again and keeps the
    first params; an unknown or deleted run id starts a new run."""
    uri = sqlite_tracking_uri
    run_id = runs.start_compress_run("adfleet", "v1", COMPRESS_PARAMS, uri)
    runs.end_compress_run(run_id, "FAILED", uri)
    client = MlflowClient(uri, uri)
    assert client.get_run(run_id).info.status == "FAILED"
    again = runs.start_compress_run("adfleet", "v1", {**COMPRESS_PARAMS, "head_steps": 7}, uri, resume_run_id=run_id)
    assert again == run_id and client.get_run(run_id).info.status == "RUNNING"
    run = client.get_run(run_id)
    assert run.data.params["head_steps"] == "150" and run.data.tags[runs.PARAMS_CHANGED_TAG] == '["head_steps"]'
    _register(tmp_path, uri, "v1", mlflow_run_id=run_id)
    runs.end_compress_run(run_id, "FAILED", uri)  # ended by registration: left FINISHED
    assert [(r.info.run_id, r.info.status) for r in _runs(uri)] == [(run_id, "FINISHED")]
    other = runs.start_compress_run("adfleet", "v2", {}, uri, resume_run_id=run_id)  # another version's run
    assert other != run_id
    with pytest.raises(ValueError, match="status must be one of"):
        runs.end_compress_run(other, "DONE", uri)


def test_a_compress_run_whose_version_was_registered_meanwhile_is_deleted(tmp_path, sqlite_tracking_uri):
    uri = sqlite_tracking_uri
    run_id = runs.start_compress_run("adfleet", "v1", {}, uri)
    first = _register(tmp_path, uri, "v1")  # another process registered v1 in its own run
    again = _register(tmp_path, uri, "v1", mlflow_run_id=run_id)
    assert again.existing and again.run_id == first.run_id
    client = MlflowClient(uri, uri)
    run = client.get_run(run_id)
    assert run.info.lifecycle_stage == "deleted" and run.data.tags[runs.DUPLICATE_TAG] == "adfleet/1"
    assert [r.info.run_id for r in _runs(uri)] == [first.run_id]
