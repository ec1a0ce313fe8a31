"""One registered fleet version, four ways to ask it: FleetModel, `fleet serve` over HTTP, the MLflow
pyfunc and `mlflow models serve`; all agree to 1e-6 and match the dequantized student computed directly."""

import os
import subprocess
import sys
import time

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import free_port

from fleet.compression.student import head_logits
from fleet.formats.backbone_codec import backbone_from_bytes
from fleet.formats.codec import table_to_heads
from fleet.formats.events import EventsDataset, table_to_batch
from fleet.formats.heads import decode_heads
from fleet.run.pipeline import run_compress
from fleet.run.stages import CompressConfig
from fleet.serve.serving import FleetModel
from fleet.storage.store import FleetVersion

pytestmark = pytest.mark.slow
CAMPAIGNS = ["campaign-00001", "campaign-00007", "campaign-00012"]


@pytest.fixture(scope="module")
def registered(small_fleet, ray_local, tmp_path_factory, _mlflow_db_template):
    root = tmp_path_factory.mktemp("e2e-serving")
    tracking = f"sqlite:///{root}/mlflow.db"
    import shutil

    shutil.copy(_mlflow_db_template, root / "mlflow.db")
    config = CompressConfig(
        backbone_steps=300, head_steps=150, gate={"min_median_auc_diff": -0.5, "min_p10_auc_diff": -1.0}
    )
    result = run_compress(
        teachers_uri=small_fleet["teachers"],
        events_uri=small_fleet["events"],
        store_uri=str(root / "store"),
        fleet="servefleet",
        config=config,
        tracking_uri=tracking,
        run_id="v1",
    )
    assert result.registered.champion
    tables = EventsDataset(small_fleet["events"]).read_campaigns(CAMPAIGNS)
    rows = [
        {"campaign_id": cid, "event_types": e, "features": f}
        for cid in CAMPAIGNS
        for e, f in zip(tables[cid]["event_types"].to_pylist()[:4], tables[cid]["features"].to_pylist()[:4])
    ]
    return {"tracking": tracking, "manifest": result.manifest_uri, "rows": rows, "root": root}


def direct_student(manifest_uri, rows):
    """The dequantized student computed from the version's files, without FleetModel."""
    version = FleetVersion.open(manifest_uri)
    backbone, _ = backbone_from_bytes(version.read_backbone_bytes())
    heads = {h.campaign_id: h for h in table_to_heads(version.read_heads())}
    out = []
    for row in rows:
        import pyarrow as pa

        table = pa.table({"event_types": [row["event_types"]], "features": [row["features"]], "label": [None]})
        batch = table_to_batch(table, backbone.config.num_features)
        with torch.no_grad():
            h = backbone(batch.event_types, batch.features, batch.lengths)
        params = decode_heads([heads[row["campaign_id"]]])
        out.append(float(torch.sigmoid(head_logits(backbone.config.head, h, params[0], backbone.config.head_rank))[0]))
    return np.array(out)


def test_four_ways_agree(registered):
    rows, tracking = registered["rows"], registered["tracking"]
    expected = direct_student(registered["manifest"], rows)

    model = FleetModel.load("models:/servefleet@champion", tracking_uri=tracking)
    batch = model.predict_batch(rows)
    np.testing.assert_allclose(batch, expected, atol=1e-6)
    per_campaign = np.concatenate([model.predict(c, [r for r in rows if r["campaign_id"] == c]) for c in CAMPAIGNS])
    np.testing.assert_allclose(per_campaign, batch, atol=1e-6)

    mlflow.set_tracking_uri(tracking)
    pyfunc = mlflow.pyfunc.load_model("models:/servefleet@champion")
    frame = pd.DataFrame(rows)
    np.testing.assert_allclose(np.asarray(pyfunc.predict(frame)), batch, atol=1e-6)

    bin_dir = os.path.dirname(sys.executable)  # `mlflow models serve` runs `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    port_fleet, port_mlflow = free_port(), free_port()
    servers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fleet.cli.main",
                "serve",
                "--model",
                "models:/servefleet@champion",
                "--tracking-uri",
                tracking,
                "--port",
                str(port_fleet),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [
                os.path.join(bin_dir, "mlflow"),
                "models",
                "serve",
                "-m",
                "models:/servefleet@champion",
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(port_mlflow),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        ),
    ]
    try:
        _wait(f"http://127.0.0.1:{port_fleet}/healthz")
        got = httpx.post(f"http://127.0.0.1:{port_fleet}/v1/predict/batch", json={"rows": rows}, timeout=30).json()
        np.testing.assert_allclose(got["probabilities"], batch, atol=1e-6)
        assert got["version"] == "v1"
        one = httpx.post(
            f"http://127.0.0.1:{port_fleet}/v1/predict",
            timeout=30,
            json={
                "campaign_id": CAMPAIGNS[0],
                "sequences": [{"event_types": r["event_types"], "features": r["features"]} for r in rows[:4]],
            },
        ).json()
        np.testing.assert_allclose(one["probabilities"], batch[:4], atol=1e-6)

        _wait(f"http://127.0.0.1:{port_mlflow}/ping", timeout=180)
        body = {"dataframe_split": frame.to_dict(orient="split")}
        got = httpx.post(f"http://127.0.0.1:{port_mlflow}/invocations", json=body, timeout=60).json()
        np.testing.assert_allclose(np.asarray(got["predictions"], dtype=float).reshape(-1), batch, atol=1e-6)
    finally:
        for server in servers:
            try:
                os.killpg(server.pid, 15) if server is servers[1] else server.terminate()
            except ProcessLookupError:
                pass
            server.wait(timeout=30)


def _wait(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not come up in {timeout} s")


def test_ray_serve_replicas_answer_like_fleet_model(registered):
    """`fleet serve --ray --replicas 2`: the same app on Ray Serve, resolved through MLflow on each replica."""
    import signal

    rows, tracking = registered["rows"], registered["tracking"]
    expected = FleetModel.load("models:/servefleet@champion", tracking_uri=tracking).predict_batch(rows)
    port = free_port()
    env = dict(os.environ)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleet.cli.main",
            "serve",
            "--model",
            "models:/servefleet@champion",
            "--tracking-uri",
            tracking,
            "--ray",
            "--replicas",
            "2",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait(f"http://127.0.0.1:{port}/healthz", timeout=240)
        for _ in range(4):  # requests spread over both replicas
            got = httpx.post(f"http://127.0.0.1:{port}/v1/predict/batch", json={"rows": rows}, timeout=60).json()
            np.testing.assert_allclose(got["probabilities"], expected, atol=1e-6)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/campaigns/nope-123", timeout=30).status_code == 404
    finally:
        server.send_signal(signal.SIGINT)  # lets the driver shut its local Ray down
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def test_registered_run_is_mlflow_native(registered, small_fleet):
    """The compress run's MLflow record (issue 13 §7): inputs as params, stage times as metrics, and a
    model logged with an input example (one campaign of the version) that the loaded pyfunc scores."""
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    from fleet.storage import registry
    from fleet.storage.store import absolute_uri

    tracking = registered["tracking"]
    found = registry.find_version("servefleet", "v1", tracking_uri=tracking)
    run = MlflowClient(tracking, tracking).get_run(found.run_id)
    assert run.data.params["teachers_uri"] == absolute_uri(small_fleet["teachers"])
    assert run.data.params["events_uri"] == absolute_uri(small_fleet["events"])
    for stage in ("soft_labels", "backbone", "heads", "finalize"):
        assert run.data.metrics[f"stage_seconds_{stage}"] >= 0
    mlflow.set_tracking_uri(tracking)
    pyfunc = mlflow.pyfunc.load_model("models:/servefleet@champion")
    source = MlflowClient(tracking, tracking).get_model_version_download_uri("servefleet", found.version)
    local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(registered["root"] / "native"))
    example = Model.load(local).load_input_example(local)
    ids = FleetVersion.open(registered["manifest"]).read_heads()["campaign_id"].to_pylist()
    assert len(example) == 1 and example["campaign_id"][0] in ids
    assert np.isfinite(pyfunc.predict(example)).all()
    assert os.path.isdir(os.path.join(local, "code", "fleet"))
