"""Shared pytest fixtures. Keep each group in its own clearly marked section."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest

from fleet.bench.probe import free_port, stop_process  # free_port: shared by the test modules that start servers

# ============================================================================ S3 (moto server)
# A real S3 endpoint over HTTP (moto's server in a subprocess, once per session): s3fs talks the
# real protocol to it. moto's in-process mock does not work with s3fs's aiobotocore client.


@pytest.fixture(scope="session")
def s3_server():
    """Start ``python -m moto.server`` on a free loopback port; yield ``{"endpoint_url",
    "storage_options"}`` (pass ``storage_options`` to fleet.storage.store); stop it at the end."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile()  # noqa: SIM115 - the server's stdout for the whole session; not a pipe: the server logs every request and would block on a full pipe
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"moto server exited with {proc.returncode}: {log.read().decode()[-2000:]}")
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not answer on {url} within 60 s") from None
                time.sleep(0.2)
        yield {
            "endpoint_url": url,
            "storage_options": {
                "key": "testing",
                "secret": "testing",
                "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"},
            },
        }
    finally:
        stop_process(proc, timeout=10)
        log.close()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket per test; returns its ``s3://name`` URI."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:16]}"
    # No region here: s3fs would send LocationConstraint=us-east-1, which S3 (and moto) reject.
    opts = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(
        key=opts["key"],
        secret=opts["secret"],
        client_kwargs={"endpoint_url": s3_server["endpoint_url"]},
        skip_instance_cache=True,
    )
    fs.mkdir(name)
    return f"s3://{name}"


# ============================================================================ end of S3 section


# ============================================================================ Ray + a small synthetic fleet
# One local Ray per test session (start-up costs seconds); fleets made by `fleet synth` itself.


@pytest.fixture(scope="session")
def ray_local():
    """A shared local Ray (2 CPUs) for the whole session, started as fleet.run.pipeline.ray_session starts one
    (token authentication, 127.0.0.1 only, no dashboard); fleet.run.pipeline reuses an initialised Ray."""
    import ray

    from fleet.run.pipeline import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


SMALL_FLEET = {
    "campaigns": 20,
    "seed": 7,
    "arch": "lstm",
    "hidden_size": 32,
    "num_layers": 1,
    "embed_dim": 8,
    "num_event_types": 24,
    "num_features": 8,
    "min_sequences": 150,
    "max_sequences": 1500,
    "max_epochs": 8,
}


@pytest.fixture(scope="session")
def small_fleet(ray_local, tmp_path_factory):
    """20 campaigns with small trained LSTM teachers: ``{"events": uri, "teachers": uri, "config": SynthConfig}``."""
    from fleet.run.pipeline import run_synth
    from fleet.synthetic.synth import SynthConfig

    config = SynthConfig(**SMALL_FLEET)
    out = tmp_path_factory.mktemp("small-fleet")
    result = run_synth(config, str(out))
    return {
        "events": result["events_uri"],
        "teachers": result["teachers_uri"],
        "config": config,
        "stats": result["campaigns"],
        "root": str(out),
    }


# ============================================================================ MLflow
# Real MLflow stores, never the file store. Creating an MLflow SQLite database runs all its
# migrations (several seconds), so that happens once per session into a template that every
# fresh database is copied from.


@pytest.fixture(scope="session")
def _mlflow_db_template(tmp_path_factory):
    """Path of an empty, fully migrated MLflow SQLite database (created once per session)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    uri = f"sqlite:///{path}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments()  # creates and migrates
    return path


@pytest.fixture
def sqlite_tracking_uri(tmp_path, _mlflow_db_template):
    """A fresh ``sqlite:///<tmp_path>/mlflow.db`` tracking URI (a copy of the migrated template)."""
    import shutil

    path = tmp_path / "mlflow.db"
    shutil.copyfile(_mlflow_db_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, _mlflow_db_template):
    """Start ``mlflow server`` (SQLite backend, local artifact root) on a free loopback port; yield
    its ``http://127.0.0.1:<port>`` URI; stop it at the end of the session."""
    import os
    import shutil
    import signal

    root = tmp_path_factory.mktemp("mlflow-server")
    shutil.copyfile(_mlflow_db_template, root / "mlflow.db")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    log = tempfile.TemporaryFile()  # noqa: SIM115 - the server's stdout while it runs; not a pipe: a full pipe would block the server
    # No job runner (it forks seven huey consumers: slow to start on a small machine, unused here).
    # Own process group: `mlflow server` runs uvicorn as a child, which must stop with it.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [
            mlflow_bin,
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--default-artifact-root",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"mlflow server exited with {proc.returncode}: {log.read().decode()[-2000:]}")
            try:
                urllib.request.urlopen(url + "/health", timeout=1).close()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(
                        f"mlflow server did not answer on {url} within 90 s: {log.read().decode()[-2000:]}"
                    ) from None
                time.sleep(0.2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own group (start_new_session above)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


# ============================================================================ end of MLflow section
