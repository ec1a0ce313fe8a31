"""The run report (fleet.versions.report): rendered by a real fleet compress before the manifest (listed and checksummed
there), logged to the MLflow run, re-rendered by `fleet report`, and opened in a real headless Chromium."""

import base64
import re
import shutil

import pyarrow as pa
import pytest

from fleet.cli import main as cli
from fleet.storage.promotion_gate import PromotionGate, evaluate_gate
from fleet.storage.store import REPORT, FleetVersion, sha256_bytes
from fleet.versions.report import MAX_PROBLEM_ROWS, TOP_CAMPAIGNS, render_report

CHROMIUM = shutil.which("chromium")


def heads_table(n: int, *, with_auc: bool = True, fallback: int = 0) -> pa.Table:
    """A heads table with the columns the report reads; campaign i has 100 * (i + 1) training rows."""
    return pa.table(
        {
            "campaign_id": [f"campaign-{i:05d}" for i in range(n)],
            "bits": pa.array([(1, 2, 4, 8)[i % 4] for i in range(n)], pa.int8()),
            "shape": [[97]] * n,
            "status": ["fallback" if i < fallback else "ok" for i in range(n)],
            "n_train": pa.array([100 * (i + 1) for i in range(n)], pa.int32()),
            "n_holdout": pa.array([10 + i for i in range(n)], pa.int32()),
            "teacher_auc": pa.array([0.8 if with_auc else None] * n, pa.float32()),
            "student_auc": pa.array([0.79 if with_auc else None] * n, pa.float32()),
            "mean_abs_diff": pa.array([0.01 + 0.001 * i for i in range(n)], pa.float32()),
            "agreement": pa.array([0.97] * n, pa.float32()),
            "kl": pa.array([0.002] * n, pa.float32()),
            "mean_ratio": pa.array([1.0 + 0.01 * (i % 5) for i in range(n)], pa.float32()),
            "student_ece": pa.array([0.02] * n, pa.float32()),
            "teacher_ece": pa.array([None] * n, pa.float32()),
        }
    )


METRICS = {
    "campaigns": 40,
    "campaigns_ok": 40,
    "campaigns_reused": 0,
    "campaigns_quarantined": 0,
    "quarantine_share": 0.0,
    "fidelity_kl_median": 0.002,
    "fidelity_mean_ratio_within_10pct_share": 1.0,
    "campaigns_status_fallback": 0,
    "fidelity_auc_diff_median": -0.01,
    "fidelity_auc_diff_p10": -0.01,
    "stage_seconds_soft_labels": 3.0,
    "stage_seconds_backbone": 5.0,
    "stage_seconds_heads": 2.0,
}


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_render_is_one_self_contained_page():
    rejects = [{"campaign_id": "bad<id>", "stage": "soft_labels", "reason": "teacher <script>alert(1)</script>"}]
    gate = evaluate_gate(METRICS, None, PromotionGate())
    page = render_report(
        fleet="adfleet",
        version_id="v1",
        heads=heads_table(40, fallback=2),
        rejects=rejects,
        metrics=METRICS,
        gate=gate,
        gate_note="checked here",
    )
    assert page.startswith("<!DOCTYPE html>") and "<title>fleet adfleet version v1</title>" in page
    # nothing loaded from anywhere: no script, no external URL, the favicon a data: URI
    assert "<script" not in page and not re.search(r'(src|href)="(?!data:)', page)
    assert "teacher &lt;script&gt;alert(1)&lt;/script&gt;" in page and "bad&lt;id&gt;" in page
    pngs = images(page)
    assert len(pngs) == 5 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)  # AUC plot included
    # the largest campaigns first, TOP_CAMPAIGNS of them; both fallback heads listed
    largest = page.split("<h2>Largest campaigns</h2>")[1].split("<h2>")[0]
    assert largest.count("<tr>") == TOP_CAMPAIGNS + 1 and largest.index("campaign-00039") < largest.index(
        "campaign-00038"
    )
    problems = page.split("<h2>Quarantined campaigns and fallback heads</h2>")[1].split("<h2>")[0]
    assert "campaign-00000" in problems and "campaign-00001" in problems and "2 fallback heads" in problems
    # gate: every check is a row, all passed here
    assert 'class="pass">passed' in page and page.count('class="pass">pass</span>') == len(gate.checks) == 6
    assert "n/a" in largest  # teacher ECE missing: shown as n/a, never as 0


def test_render_without_auc_and_many_problems_caps_the_lists():
    rejects = [{"campaign_id": f"c{i:04d}", "stage": "soft_labels", "reason": "no events"} for i in range(250)]
    metrics = {
        **METRICS,
        "fidelity_auc_diff_median": None,
        "fidelity_auc_diff_p10": None,
        "fidelity_campaigns_without_auc": 40,
        "quarantine_share": 0.86,
    }
    gate = evaluate_gate(metrics, {"fidelity_auc_diff_median": 0.0}, PromotionGate())
    page = render_report(
        fleet="adfleet",
        version_id="v2",
        heads=heads_table(40, with_auc=False),
        rejects=rejects,
        metrics=metrics,
        gate=gate,
        gate_note="",
    )
    assert len(images(page)) == 4  # no AUC anywhere: no AUC plot (never a "no data" figure)
    assert f"{250 - MAX_PROBLEM_ROWS} more not listed" in page and "c0199" in page and "c0200" not in page
    assert 'class="fail">failed' in page and "quarantine share 0.860 &gt; 0.050" in page
    assert "AUC checks skipped" in page and "No head is a fallback." in page


def test_gate_checks_list_every_check_and_keep_the_reasons():
    metrics = {**METRICS, "fidelity_kl_median": 0.5, "fidelity_auc_diff_median": -0.02}
    result = evaluate_gate(metrics, {"fidelity_auc_diff_median": 0.0, "fidelity_auc_diff_p10": -0.01}, PromotionGate())
    failed = [c["check"] for c in result.checks if not c["passed"]]
    assert failed == [
        "median AUC diff >= -0.01",
        "median KL <= 0.02",
        "median AUC diff drop from the champion's 0.0000 <= 0.005",
    ]
    assert len(result.reasons) == 3 and not result.passed
    missing = evaluate_gate({k: v for k, v in METRICS.items() if k != "fidelity_kl_median"}, None, PromotionGate())
    assert [c["value"] for c in missing.checks if not c["passed"]] == [None]


def test_fleet_report_of_a_missing_version_fails_naming_it(tmp_path, capsys):
    missing = tmp_path / "store" / "adfleet" / "versions" / "v9"
    assert cli.main(["report", str(missing), "--out", str(tmp_path / "r.html")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and str(missing) in captured.err and "manifest" in captured.err
    assert not (tmp_path / "r.html").exists()


@pytest.fixture(scope="module")
def compressed(small_fleet, ray_local, tmp_path_factory, _mlflow_db_template):
    """One real fleet compress of the 20-campaign test fleet into a fresh store and SQLite registry."""
    from test_pipeline import fast_config

    from fleet.run.pipeline import run_compress

    root = tmp_path_factory.mktemp("report")
    shutil.copyfile(_mlflow_db_template, root / "mlflow.db")
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    config = fast_config(backbone_steps=60, head_steps=60)  # the report is under test, not the fidelity
    result = run_compress(
        teachers_uri=small_fleet["teachers"],
        events_uri=small_fleet["events"],
        store_uri=str(root / "store"),
        fleet="adfleet",
        config=config,
        tracking_uri=tracking,
        run_id="night-1",
    )
    return {"result": result, "tracking": tracking, "root": root}


@pytest.mark.slow
def test_compress_writes_the_report_into_the_manifest_and_mlflow(compressed):
    from mlflow.tracking import MlflowClient

    result, tracking = compressed["result"], compressed["tracking"]
    version = FleetVersion.open(result.manifest_uri)  # verify=True: report.html's size and sha256 too
    entry = next(f for f in version.manifest["files"] if f["path"] == REPORT)
    data = version.read_report()
    assert entry["sha256"] == sha256_bytes(data) and entry["bytes"] == len(data)
    page = data.decode("utf-8")
    assert "<title>fleet adfleet version night-1</title>" in page and version.manifest["created_at"] in page
    verdict = "passed" if result.registered.gate.passed else "failed"  # the registry's decision, the same
    assert f'class="{verdict[:4]}">{verdict}' in page and "no champion (the first version)" in page
    assert len(images(page)) >= 4
    client = MlflowClient(tracking_uri=tracking)
    run_id = client.get_model_version("adfleet", result.registered.version).run_id
    assert REPORT in {a.path for a in client.list_artifacts(run_id)}
    with open(client.download_artifacts(run_id, REPORT, str(compressed["root"])), "rb") as f:
        assert f.read() == data


@pytest.mark.slow
def test_fleet_report_rewrites_it_for_an_existing_version(compressed, tmp_path, capsys):
    tracking = compressed["tracking"]
    out = tmp_path / "v1.html"
    assert cli.main(["report", "1", "--fleet", "adfleet", "--tracking-uri", tracking, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and f"to {out}" in captured.err
    page = out.read_text()
    assert (
        "<title>fleet adfleet version night-1</title>" in page
        and "recorded in the registry for adfleet version 1" in page
    )
    manifest = FleetVersion.open(compressed["result"].manifest_uri).manifest
    assert manifest["created_at"] in page
    # a plain version URI, no registry at the default location: nothing created, the thresholds alone
    assert (
        cli.main(
            [
                "report",
                compressed["result"].manifest_uri,
                "--tracking-uri",
                f"sqlite:///{tmp_path / 'none.db'}",
                "--out",
                "-",
            ]
        )
        == 0
    )
    assert "registry not read" in capsys.readouterr().out and not (tmp_path / "none.db").exists()


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None,
    reason="needs Debian's chromium on PATH (apt-get install -y chromium; "
    "see .ci/run) to render the report in a real headless browser",
)
def test_report_renders_in_headless_chromium(compressed, tmp_path):
    from playwright.sync_api import sync_playwright

    path = tmp_path / REPORT
    path.write_bytes(FleetVersion.open(compressed["result"].manifest_uri).read_report())
    errors, failed, requests = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.as_uri(), wait_until="load")
            assert page.title() == "fleet adfleet version night-1"
            assert page.locator("h2").all_inner_texts()[:4] == [
                "Summary",
                "Quality gate",
                "Largest campaigns",
                "Quarantined campaigns and fallback heads",
            ]
            assert page.locator("table").count() >= 3 and page.locator("tbody tr").count() > 20
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
            assert len(widths) >= 4 and all(w > 100 for w in widths)  # every inline PNG decoded
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == [] and failed == []
    assert all(u.startswith(("file:", "data:")) for u in requests)  # nothing fetched from a network
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and shot.stat().st_size > 10_000
