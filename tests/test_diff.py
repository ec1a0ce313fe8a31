"""``fleet diff A B`` / ``fleet.diff``: two real versions written with fleet.storage.store (B derived from A the way an
incremental run derives a version from its parent), compared by path and through the registry."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import pytest
from test_serving import build_version

import fleet
from fleet.cli.main import main
from fleet.cli.serving import version_summary
from fleet.formats.codec import heads_to_table, table_to_heads
from fleet.storage import registry
from fleet.storage.store import FleetVersion, VersionWriter

AGREEMENT = {
    "fidelity_kl_median": 0.001,
    "fidelity_mean_ratio_within_10pct_share": 1.0,
    "campaigns": 10,
    "campaigns_status_fallback": 0,
    "quarantine_share": 0.0,
    "fidelity_auc_diff_median": 0.0,
    "fidelity_auc_diff_p10": 0.0,
}


def _derive(a: FleetVersion, store: str, version_id: str) -> str:
    """B from A: camp-0000 removed, camp-0100 added, camp-0004 refit on a new teacher (2 -> 1 bits),
    camp-0008 refit on new data (same head bytes), camp-0010 refit on the same inputs (8 -> 4 bits, worse
    mean |p_s - p_t|), every other head kept byte for byte; same backbone, one config key changed."""
    rows = {r.campaign_id: r for r in table_to_heads(a.read_heads())}
    new = dict(rows)
    del new["camp-0000"]
    new["camp-0100"] = dataclasses.replace(
        rows["camp-0002"], campaign_id="camp-0100", teacher_sha256=hashlib.sha256(b"t100").digest()
    )
    content = ("bits", "shape", "group_size", "packed", "scales", "mask")

    def head_of(target, source, **kw):
        return dataclasses.replace(rows[target], **{k: getattr(rows[source], k) for k in content}, **kw)

    new["camp-0004"] = head_of("camp-0004", "camp-0006", teacher_sha256=hashlib.sha256(b"t4'").digest())
    new["camp-0008"] = dataclasses.replace(rows["camp-0008"], data_fingerprint=b"\x01" * 16)
    new["camp-0010"] = head_of("camp-0010", "camp-0012", mean_abs_diff=0.0625)
    new = {cid: dataclasses.replace(r, kl=0.03125 if cid == "camp-0010" else 0.0078125) for cid, r in new.items()}
    writer = VersionWriter(store, "adfleet", version_id)
    writer.write_backbone_bytes(a.read_backbone_bytes())
    writer.write_heads(
        heads_to_table(sorted(new.values(), key=lambda r: r.campaign_id)), rows_per_part=4, row_group_size=2
    )
    return writer.commit(
        config={**a.manifest["config"], "bits": 4},
        lineage={"parent_version": a.version_id},
        metrics={"campaigns": len(new)},
    )


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    store = str(tmp_path_factory.mktemp("store"))
    a = build_version(store, "va", num_campaigns=10, rows_per_part=4, row_group_size=2)
    b_uri = _derive(FleetVersion.open(a.uri), store, "vb")
    return {"store": store, "a": a.uri, "b": b_uri}


def test_diff_counts_campaigns_bits_fidelity_and_size(versions):
    result = fleet.diff(versions["a"], versions["b"])  # the function the CLI calls
    c = result["campaigns"]
    assert (c["added"], c["removed"], c["refit"], c["unchanged"]) == (1, 1, 3, 6)
    assert (c["refit_teacher_changed"], c["refit_data_changed"], c["refit_same_inputs"]) == (1, 1, 1)
    assert c["ids"]["added"] == ["camp-0100"] and c["ids"]["removed"] == ["camp-0000"]
    assert c["ids"]["refit_teacher_changed"] == ["camp-0004"] and c["ids"]["refit_data_changed"] == ["camp-0008"]
    assert c["ids"]["refit_same_inputs"] == ["camp-0010"]
    assert c["ids"]["unchanged"] == ["camp-0002", "camp-0006", "camp-0012", "camp-0014", "camp-0016", "camp-0018"]
    assert result["backbone_changed"] is False and result["b_parent_is_a"] is True and not result["same_version"]
    # build_version's bits cycle 8, 4, 2, 1, 16 over camp-0000, -0002, ...: -0004 (2) took -0006's 1 bit,
    # -0010 (8) took -0012's 4 bits; -0000 (8) removed, -0100 (a copy of -0002: 4) added
    assert result["bits"]["moves"] == {"2->1": 1, "8->4": 1}
    assert result["bits"]["a"] == {"1": 2, "2": 2, "4": 2, "8": 2, "16": 2}
    assert result["bits"]["b"] == {"1": 3, "2": 1, "4": 4, "16": 2}
    mad = result["fidelity"]["mean_abs_diff"]
    assert mad["a"]["median"] == 0.015625 and mad["delta"]["n"] == 9 and mad["delta"]["median"] == 0.0
    assert mad["delta"]["p90"] > 0 and mad["higher_is_better"] is False
    assert result["fidelity"]["kl"]["a"]["n"] == 0 and result["fidelity"]["kl"]["b"]["median"] == 0.0078125
    assert result["fidelity"]["auc_diff"]["a"]["median"] == pytest.approx(0.734375 - 0.75)
    # no campaign has a KL in A: the campaigns that got worse are ranked by mean |p_s - p_t|
    assert result["most_worse"] == [
        {"campaign_id": "camp-0010", "metric": "mean_abs_diff", "a": 0.015625, "b": 0.0625, "delta": 0.046875}
    ]
    sa, sb = (version_summary(FleetVersion.open(versions[k])) for k in ("a", "b"))
    for key in ("bytes", "heads_bytes", "backbone_bytes"):
        assert result["size"][key] == {"a": sa[key], "b": sb[key], "delta": sb[key] - sa[key]}
    assert result["size"]["backbone_bytes"]["delta"] == 0
    assert result["config_changes"] == {"bits": [None, 4]}
    json.dumps(result, allow_nan=False)  # JSON-ready


def test_diff_of_a_version_with_itself_is_all_unchanged(versions):
    result = fleet.diff(versions["a"], versions["a"], max_ids=2)
    c = result["campaigns"]
    assert (c["added"], c["removed"], c["refit"], c["unchanged"]) == (0, 0, 0, 10)
    assert c["ids"]["unchanged"] == ["camp-0000", "camp-0002"]  # max_ids per category
    assert result["same_version"] and result["bits"]["moves"] == {} and result["config_changes"] == {}
    assert all(s["delta"] == 0 for s in result["size"].values())


def test_fleet_diff_resolves_aliases_and_versions_like_inspect(versions, tmp_path, sqlite_tracking_uri, capsys):
    for vid in ("va", "vb"):
        folder = f"{versions['store']}/adfleet/versions/{vid}"
        registry.register_version(
            fleet_name="adfleet",
            manifest_uri=f"{folder}/manifest.json",
            version_id=vid,
            local_artifacts={
                "manifest.json": f"{folder}/manifest.json",
                "backbone.safetensors": f"{folder}/backbone.safetensors",
            },
            params={},
            metrics=AGREEMENT,
            plots={},
            tracking_uri=sqlite_tracking_uri,
        )
    registry.promote("adfleet", "1", sqlite_tracking_uri)  # champion = A
    code = main(["diff", "champion", "2", "--fleet", "adfleet", "--tracking-uri", sqlite_tracking_uri, "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out)
    assert (result["a"]["version_id"], result["a"]["model_version"], result["a"]["alias"]) == ("va", "1", "champion")
    assert (result["b"]["version_id"], result["b"]["model_version"], result["b"]["alias"]) == ("vb", "2", None)
    assert result["campaigns"]["refit"] == 3

    # the human table, from the console script, on stdout; the same figures
    env_argv = [
        sys.executable,
        "-m",
        "fleet.cli.main",
        "diff",
        "models:/adfleet@champion",
        "models:/adfleet/2",
        "--tracking-uri",
        sqlite_tracking_uri,
    ]
    run = subprocess.run(env_argv, capture_output=True, text=True, check=False, env={**os.environ, "COLUMNS": "200"})
    assert run.returncode == 0, run.stderr
    assert "A = va (model version 1, @champion) -> B = vb (model version 2)" in run.stdout
    assert "refit: teacher changed" in run.stdout and "camp-0004" in run.stdout and "8 -> 4" in run.stdout

    # an alias that does not exist: one error line on stderr, exit 1, nothing on stdout
    assert main(["diff", "staging", "2", "--fleet", "adfleet", "--tracking-uri", sqlite_tracking_uri]) == 1
    out = capsys.readouterr()
    assert "has no alias 'staging'" in out.err and not out.out
