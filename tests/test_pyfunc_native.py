"""The pyfunc fleet.storage.registry logs is MLflow-native (issue 13 §7): a signature and an input example that
scores, fleet's code under ``code_paths``, pip requirements an environment manager can install, and a
run whose params name the inputs (credentials scrubbed) and whose metrics hold the stage times.
Real version in a local store, real SQLite MLflow store; one fresh Python process loads the model."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pytest
import tomllib
from mlflow.artifacts import download_artifacts
from mlflow.models import Model
from mlflow.tracking import MlflowClient
from test_serving import build_version

from fleet.run.pipeline import _example_campaign, _run_params
from fleet.run.stages import CompressConfig
from fleet.serve.pyfunc import COLUMNS, input_example
from fleet.serve.serving import FleetModel
from fleet.storage import registry
from fleet.storage.store import FleetVersion

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-value"


@pytest.fixture(scope="module")
def logged(tmp_path_factory, _mlflow_db_template):
    """One version built in a local store and registered through fleet.storage.registry; its model downloaded."""
    import shutil

    root = tmp_path_factory.mktemp("native")
    shutil.copyfile(_mlflow_db_template, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    built = build_version(str(root / "store"), "v1", seed=0, num_campaigns=4)
    version = FleetVersion.open(os.path.dirname(built.uri))
    (root / "backbone.safetensors").write_bytes(version.read_backbone_bytes())
    (root / "manifest.json").write_bytes(version.manifest_bytes)
    manifest_config = {
        "teachers_uri": f"s3://AKIAFLEETKEY:{SECRET}@bucket/teachers",
        "events_uri": "s3://bucket/events",
        "num_features": built.config.num_features,
    }
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("mlflow").addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = registry.register_version(
            fleet_name="adfleet",
            manifest_uri=built.uri,
            version_id="v1",
            local_artifacts={
                "backbone.safetensors": str(root / "backbone.safetensors"),
                "manifest.json": str(root / "manifest.json"),
            },
            params=_run_params(CompressConfig(), manifest_config),
            metrics={"campaigns": 4, "stage_seconds_soft_labels": 1.5, "stage_seconds_finalize": 0.25},
            plots={},
            tracking_uri=uri,
            example_campaign_id=built.ids[1],
        )
    logging.getLogger("mlflow").removeHandler(handler)
    records += [str(w.message) for w in caught]
    source = MlflowClient(uri, uri).get_model_version_download_uri("adfleet", reg.version)
    model_dir = download_artifacts(artifact_uri=source, dst_path=str(root / "model"))
    return {"uri": uri, "built": built, "reg": reg, "model": Path(model_dir), "messages": records}


def test_signature_and_input_example(logged):
    model_dir, built = logged["model"], logged["built"]
    # neither "An input example was not provided" nor "Failed to validate serving input example"
    assert not [m for m in logged["messages"] if "input example" in m.lower()], logged["messages"]
    mlmodel = Model.load(str(model_dir))
    assert {p.name for p in mlmodel.signature.params.params} == {"with_status", "top_k"}
    assert mlmodel.saved_input_example_info is not None
    example = mlmodel.load_input_example(str(model_dir))
    assert list(example.columns) == list(COLUMNS) and len(example) == 1
    row = example.iloc[0]
    # nothing of the fleet's data but one real campaign id: one event of type 0, zero features
    assert row["campaign_id"] == built.ids[1]
    assert list(row["event_types"]) == [0]
    assert list(row["features"]) == [0.0] * built.config.num_features
    # the serving payload MLflow saved, POSTed to MLflow's scoring server app, answers like FleetModel
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    app = scoring_server.init(mlflow.pyfunc.load_model(str(model_dir)))
    response = TestClient(app).post(
        "/invocations",
        content=(model_dir / "serving_input_example.json").read_bytes(),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text
    got = response.json()["predictions"]
    want = FleetModel.open(built.uri).predict_batch(
        [{"campaign_id": built.ids[1], "event_types": [0], "features": [0.0] * built.config.num_features}]
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6, rtol=0)


def test_code_paths_and_requirements(logged):
    model_dir = logged["model"]
    flavor = Model.load(str(model_dir)).flavors["python_function"]
    assert flavor["loader_module"] == "fleet.serve.pyfunc" and flavor["code"] == "code"
    code = model_dir / "code" / "fleet"
    shipped = {p.relative_to(code).as_posix() for p in code.rglob("*.py")}
    assert shipped == {p.relative_to(REPO / "fleet").as_posix() for p in (REPO / "fleet").rglob("*.py")}
    assert not list(code.rglob("__pycache__"))
    reqs = (model_dir / "requirements.txt").read_text().split()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert registry.TORCH_REQUIREMENT in reqs and registry.TORCH_REQUIREMENT in pyproject
    for package in registry.RUNTIME_PACKAGES:
        if package != "torch":
            assert f"{package}=={metadata.version(package).split('+')[0]}" in reqs
    assert not any(r.split("=")[0].split(">")[0] == "fleet" for r in reqs)  # the PyPI "fleet" is another project
    assert (model_dir / "python_env.yaml").is_file()


def test_model_loads_from_its_code_in_a_fresh_process(logged, tmp_path):
    """No repo on PYTHONPATH, another working directory: ``import fleet`` resolves to <model>/code/fleet."""
    model_dir, built = logged["model"], logged["built"]
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "import fleet\n"
        "ex = m.metadata.load_input_example(sys.argv[1])\n"
        "print(json.dumps({'fleet': fleet.__file__, 'p': m.predict(ex).tolist()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    out = subprocess.run(
        [sys.executable, "-c", script, str(model_dir)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(result["fleet"]).resolve().is_relative_to((model_dir / "code" / "fleet").resolve())
    want = FleetModel.open(built.uri).predict_batch(
        [{"campaign_id": built.ids[1], "event_types": [0], "features": [0.0] * built.config.num_features}]
    )
    np.testing.assert_allclose(result["p"], want, atol=1e-6, rtol=0)


def test_run_params_and_stage_metrics(logged):
    run = MlflowClient(logged["uri"]).get_run(logged["reg"].run_id)
    params, metrics = run.data.params, run.data.metrics
    assert params["events_uri"] == "s3://bucket/events"
    assert params["teachers_uri"] == "s3://***@bucket/teachers"  # fleet.core.redact.scrub: the URI's userinfo
    assert SECRET not in params["teachers_uri"] and all(SECRET not in v for v in params.values())
    assert params["backbone_steps"] == str(CompressConfig().backbone_steps)
    assert metrics["stage_seconds_soft_labels"] == 1.5 and metrics["stage_seconds_finalize"] == 0.25


def test_example_campaign_and_input_example_rules():
    heads = pa.table({"campaign_id": ["c", "a", "b"], "status": ["ok", "gate_failed", "ok"]})
    assert _example_campaign(heads) == "b"  # the first whose head passed its gate
    assert _example_campaign(pa.table({"campaign_id": ["z", "y"], "status": ["gate_failed", "gate_failed"]})) == "y"
    assert (
        _example_campaign(pa.table({"campaign_id": pa.array([], pa.string()), "status": pa.array([], pa.string())}))
        is None
    )
    assert _run_params(CompressConfig(), {"num_features": 3})["backbone_steps"] == CompressConfig().backbone_steps
    assert "teachers_uri" not in _run_params(CompressConfig(), {})
    frame = input_example("camp-1", 0, length=2)
    assert frame.iloc[0]["event_types"] == [0, 0] and frame.iloc[0]["features"] == []
    for bad in (("", 3), ("c", -1), ("c", True)):
        with pytest.raises(ValueError):
            input_example(*bad)
