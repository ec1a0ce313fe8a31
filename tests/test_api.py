"""The Python API (docs/api.md): the doc's example run as written on a copy of the test fleet, ``import fleet``
stays light, ``--bits 16`` reaches the run's config; ``nightly --dry-run`` prints the plan of the next run from
the version the example wrote and changes nothing."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import fleet
from fleet.cli.main import build_parser
from fleet.formats.events import EVENTS_SCHEMA
from fleet.run.pipeline import compress_config, estimate_seconds, preview_compress
from fleet.run.stages import CompressConfig
from fleet.storage import registry
from fleet.storage.store import FleetVersion

DOCS = pathlib.Path(__file__).parents[1] / "docs" / "api.md"
JOBS = pathlib.Path(__file__).parents[1] / "jobs"


def _example() -> str:
    """The ``python`` block of docs/api.md's "Example" section."""
    return re.search(r"## Example\n.*?```python\n(.*?)```", DOCS.read_text(), re.DOTALL).group(1)


@pytest.fixture(scope="module")
def demo(small_fleet, tmp_path_factory):
    """docs/api.md's example, run as written from a directory holding the test fleet as ``fleet-data/demo``:
    ``(that directory, the example's variables)``."""
    root = tmp_path_factory.mktemp("api")
    shutil.copytree(small_fleet["root"], root / "fleet-data" / "demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("FLEET_STORAGE_OPTIONS", raising=False)
        namespace: dict = {"__name__": "__main__"}
        exec(compile(_example(), str(DOCS), "exec"), namespace)  # noqa: S102 - the documented example itself
    return root, namespace


@pytest.mark.slow
@pytest.mark.timeout(1800)  # builds the session's test fleet when first, then one compress
def test_api_example_runs_as_written(demo):
    root, ns = demo
    result = ns["result"]
    assert result.exit_code in (0, 4) and not result.rejects and result.metrics["campaigns_ok"] == 20
    manifest = FleetVersion.open(result.manifest_uri).manifest
    assert manifest["config"]["bits"] == 8 and manifest["config"]["backbone_steps"] == 200  # config dict + bits
    assert result.manifest_uri.startswith(str(root / "fleet-data" / "demo" / "store"))
    assert ns["registered"].name == "demo" and ns["registered"].version == "1"
    assert (root / "fleet-data" / "demo" / "mlflow.db").is_file()  # the relative sqlite URI, under the cwd
    model = ns["model"]
    assert isinstance(model, fleet.FleetModel) and model.version_id == result.version_id
    p = model.predict("campaign-00003", [ns["sequence"]])
    assert p.shape == (1,) and 0 < p[0] < 1
    assert len(ns["ids"]) == 3 and list(ns["probabilities"]) == sorted(ns["probabilities"], reverse=True)
    changes = ns["changes"]  # version 1 against itself (the first run of this fleet)
    assert changes["campaigns"]["unchanged"] == 20 and changes["campaigns"]["refit"] == 0
    assert changes["backbone_changed"] is False


def test_import_fleet_is_light_and_names_the_cli_functions():
    code = (
        "import sys, fleet\n"
        "heavy = ('torch', 'ray', 'mlflow', 'pyarrow', 'numpy', 'fsspec', 'fastapi')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
        "import fleet.run.pipeline, fleet.serve.serving, fleet.versions.version_diff, fleet.run.stages\n"
        "assert fleet.compress is fleet.run.pipeline.compress and fleet.FleetModel is fleet.serve.serving.FleetModel\n"
        "assert fleet.diff is fleet.versions.version_diff.diff_versions and fleet.CompressConfig is fleet.run.stages.CompressConfig\n"
        "assert {'compress', 'FleetModel', 'diff'} <= set(dir(fleet))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fleet.nope  # noqa: B018


def test_bits_16_on_the_command_line_reaches_the_config(tmp_path):
    args = build_parser("compress").parse_args(["compress", "--teachers", "t", "--events", "e", "--bits", "16"])
    assert compress_config(None, bits=args.bits).bits == 16
    (tmp_path / "c.toml").write_text("[compress]\nbits = 16\nhead_steps = 10\n")
    config = compress_config(str(tmp_path / "c.toml"), codec="packed", allow_loaders=["pkg.mod:load"])
    assert (config.bits, config.head_steps, config.allow_loaders) == (16, 10, ["pkg.mod:load"])
    base = CompressConfig(bits=4)
    assert compress_config(base, bits="auto").bits == "auto" and base.bits == 4  # the caller's config is not changed
    with pytest.raises(ValueError, match="bits must be"):
        compress_config({"bits": 3})
    with pytest.raises(ValueError, match="package.module:function"):
        compress_config(None, allow_loaders=["../evil"])


def test_estimate_scales_stage_times_by_campaigns_fitted():
    history = [
        ("v3", {"campaigns_ok": 0, "stage_seconds_soft_labels": 1.0, "stage_seconds_heads": 0.0}),
        # v3 reused everything: no per-campaign rate; v2 inherited its backbone
        (
            "v2",
            {
                "campaigns_ok": 10,
                "stage_seconds_soft_labels": 20.0,
                "stage_seconds_heads": 40.0,
                "stage_seconds_backbone": 0.1,
            },
        ),
        (
            "v1",
            {
                "campaigns_ok": 50,
                "backbone_steps": 400,
                "stage_seconds_soft_labels": 50.0,
                "stage_seconds_heads": 100.0,
                "stage_seconds_backbone": 30.0,
            },
        ),
    ]
    inherit = estimate_seconds(history, 5, train_backbone=False)
    assert inherit["stage_seconds"] == {"soft_labels": 10.0, "backbone": 0.0, "heads": 20.0}
    assert inherit["total_seconds"] == 30.0
    assert inherit["from_versions"] == {"soft_labels": "v2", "heads": "v2"}
    full = estimate_seconds(history, 5, train_backbone=True)
    assert full["stage_seconds"]["backbone"] == 30.0 and full["from_versions"]["backbone"] == "v1"
    assert estimate_seconds(history[:2], 5, train_backbone=True)["total_seconds"] is None  # no backbone measured
    assert estimate_seconds([], 5, train_backbone=True) is None


def _tree(root: pathlib.Path) -> dict:
    """Every file and directory under ``root`` with its size and mtime."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            found[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return found


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_nightly_dry_run_prints_the_plan_and_changes_nothing(demo, capsys, monkeypatch):
    root, ns = demo
    demo_dir = root / "fleet-data" / "demo"
    tracking = f"sqlite:///{demo_dir}/mlflow.db"
    if not ns["registered"].champion:  # the example's version failed its gate: make it the parent by hand
        registry.promote("demo", ns["registered"].version, tracking)
    # the next night's inputs: campaign-00001's teacher changed, campaign-00019 gone, campaign-00100 new
    nxt = root / "next"
    shutil.copytree(demo_dir / "teachers", nxt / "teachers")
    shutil.copytree(demo_dir / "events", nxt / "events")
    changed = nxt / "teachers" / "campaign-00001" / "config.json"
    changed.write_text(json.dumps(json.loads(changed.read_text()), indent=4))  # same teacher, other bytes
    shutil.rmtree(nxt / "teachers" / "campaign-00019")
    shutil.copytree(nxt / "teachers" / "campaign-00002", nxt / "teachers" / "campaign-00100")
    new_config = nxt / "teachers" / "campaign-00100" / "config.json"
    new_config.write_text(json.dumps({**json.loads(new_config.read_text()), "campaign_id": "campaign-00100"}))
    events = pq.read_table(nxt / "events")
    rows = events.filter(pc.equal(events["campaign_id"], "campaign-00002"))
    rows = rows.set_column(
        rows.schema.get_field_index("campaign_id"), "campaign_id", pa.array(["campaign-00100"] * len(rows), pa.string())
    )
    pq.write_table(rows.cast(EVENTS_SCHEMA), nxt / "events" / "part-99999.parquet")
    (root / "nightly.toml").write_text(
        f'[nightly]\nteachers = "{nxt}/teachers"\nevents = "{nxt}/events"\nstore = "{demo_dir}/store"\n'
        f'fleet = "demo"\ntracking_uri = "{tracking}"\n[compress]\nbits = 8\n'
    )
    before = _tree(root)
    monkeypatch.syspath_prepend(str(JOBS))
    import nightly

    assert nightly.main(["--config", str(root / "nightly.toml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert _tree(root) == before  # no work dir, no version, no registry change, nothing else
    version_id = ns["result"].version_id
    assert f"parent {version_id}" in out and "incremental" in out
    assert re.search(r"new \(fitted\)\s*│\s*1\s*│\s*campaign-00100", out)
    assert re.search(r"changed teacher or data \(fitted\)\s*│\s*1\s*│\s*campaign-00001", out)
    assert re.search(r"unchanged \(head reused\)\s*│\s*18\s*│", out)
    assert re.search(r"removed \(no teacher now\)\s*│\s*1\s*│\s*campaign-00019", out)
    assert "estimated time" in out and re.search(r"total\s*│\s*\d+\.\d", out) and version_id in out

    plan = preview_compress(
        teachers_uri=str(nxt / "teachers"),
        events_uri=str(nxt / "events"),
        store_uri=str(demo_dir / "store"),
        fleet="demo",
        config=CompressConfig(bits=8),
        tracking_uri=tracking,
    )
    campaigns = plan["campaigns"]
    assert (campaigns["new"], campaigns["changed"], campaigns["removed"]) == (
        ["campaign-00100"],
        ["campaign-00001"],
        ["campaign-00019"],
    )
    assert len(campaigns["reused"]) == 18 and not campaigns["refit"] and not campaigns["invalid"]
    m = ns["result"].metrics
    expected = m["stage_seconds_soft_labels"] / m["campaigns_ok"] * 2  # two campaigns fitted
    assert plan["estimate"]["stage_seconds"]["soft_labels"] == pytest.approx(expected)
    assert plan["estimate"]["stage_seconds"]["backbone"] == 0.0  # the champion's backbone is inherited

    # no registry yet: a full run, every campaign new, and the registry's database is not created
    missing = root / "nowhere" / "mlflow.db"
    plan = preview_compress(
        teachers_uri=str(nxt / "teachers"),
        events_uri=str(nxt / "events"),
        store_uri=str(demo_dir / "store"),
        fleet="demo",
        config=CompressConfig(),
        tracking_uri=f"sqlite:///{missing}",
    )
    assert plan["parent"] is None and len(plan["campaigns"]["new"]) == 20 and "backbone trained" in plan["mode"]
    assert not missing.parent.exists() and _tree(root) == before
