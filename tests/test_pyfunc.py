"""fleet.serve.pyfunc: a fleet version logged as an MLflow pyfunc (sqlite tracking store in tmp_path)
answers exactly like FleetModel.predict_batch; models:/ URIs resolve through fleet.storage.registry."""

from __future__ import annotations

import json
import random

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from test_serving import build_version, random_sequences

from fleet.core.constants import ENV_STORE_ROOT, PYFUNC_CONFIG_FILE
from fleet.core.errors import StoreError
from fleet.serve.pyfunc import FleetPyfunc, _load_pyfunc, write_config
from fleet.serve.serving import FleetModel, alias_reloader
from fleet.storage.store import relocated


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    store = str(tmp_path_factory.mktemp("store"))
    return {
        "v1": build_version(store, "v1", seed=0, num_campaigns=20),
        "v2": build_version(store, "v2", seed=1, num_campaigns=20),
    }


@pytest.fixture(scope="module")
def mlflow_env(tmp_path_factory, versions):
    """Both versions logged as pyfunc models in one sqlite-backed MLflow, registered as 'adfleet'."""
    root = tmp_path_factory.mktemp("mlflow")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.create_experiment("fleet-test", artifact_location=(root / "artifacts").as_uri())
    uris = {}
    client = mlflow.MlflowClient(tracking_uri)
    for vid, b in versions.items():
        data = root / f"data-{vid}"
        write_config(str(data), b.uri, vid)
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.pyfunc.log_model(name="model", loader_module="fleet.serve.pyfunc", data_path=str(data))
        uris[vid] = info.model_uri
        mv = mlflow.register_model(info.model_uri, "adfleet", tags={"version_id": vid, "manifest_uri": b.uri})
        client.set_registered_model_alias("adfleet", "champion", mv.version)  # v2 ends as champion
    yield {"tracking_uri": tracking_uri, "model_uris": uris, "client": client}
    mlflow.set_tracking_uri(None)


def frame(ids, seqs, as_numpy=False) -> pd.DataFrame:
    conv = (lambda x, dt: np.asarray(x, dt)) if as_numpy else (lambda x, dt: x)
    return pd.DataFrame(
        {
            "campaign_id": ids,
            "event_types": [conv(s["event_types"], np.int32) for s in seqs],
            "features": [conv(s["features"], np.float32) for s in seqs],
        }
    )


@pytest.mark.parametrize("as_numpy", [False, True])
def test_pyfunc_predict_equals_predict_batch(mlflow_env, versions, as_numpy):
    b = versions["v1"]
    loaded = mlflow.pyfunc.load_model(mlflow_env["model_uris"]["v1"])
    rng = random.Random(0)
    seqs = random_sequences(rng, 60, 1, 30)
    ids = [rng.choice(b.ids) for _ in seqs]
    got = loaded.predict(frame(ids, seqs, as_numpy))
    want = FleetModel.open(b.uri).predict_batch([{"campaign_id": c, **s} for c, s in zip(ids, seqs)])
    assert isinstance(got, np.ndarray) and got.shape == (60,)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got, [b.expected(c, [s])[0] for c, s in zip(ids, seqs)], atol=1e-6, rtol=0)


def test_pyfunc_errors_are_mlflow_bad_requests(mlflow_env, versions):
    loaded = mlflow.pyfunc.load_model(mlflow_env["model_uris"]["v1"])
    seqs = random_sequences(random.Random(1), 2)
    with pytest.raises(MlflowException, match="camp-0001") as info:
        loaded.predict(frame(["camp-0000", "camp-0001"], seqs))
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException, match="lacks columns"):
        loaded.predict(pd.DataFrame({"campaign_id": ["camp-0000"]}))
    bad = frame(["camp-0000"], [{"event_types": [99], "features": [0.0] * 3}])
    with pytest.raises(MlflowException, match="event types"):
        loaded.predict(bad)


def test_load_pyfunc_directly(tmp_path, versions):
    b = versions["v2"]
    path = write_config(str(tmp_path / "d"), b.uri, "v2", cache_size=4, heads="lru")
    model = _load_pyfunc(str(tmp_path / "d"))
    assert isinstance(model, FleetPyfunc) and model.model.version_id == "v2"
    assert model.model.cache_info()["capacity"] == 4
    assert _load_pyfunc(path).model.version_id == "v2"  # the file itself works too
    rows = [{"campaign_id": b.ids[0], **s} for s in random_sequences(random.Random(2), 3)]
    np.testing.assert_allclose(model.predict(rows), model.model.predict_batch(rows), atol=0)


def test_a_moved_store_is_found_under_fleet_store_root(tmp_path, versions, monkeypatch):
    """A config saved when the store lived elsewhere loads from $FLEET_STORE_ROOT; its sha256 pin still holds."""
    b = versions["v2"]
    root, fleet_name, versions_dir, vid, manifest = b.uri.rsplit("/", 4)
    moved = f"/gone/old-store/{fleet_name}/{versions_dir}/{vid}/{manifest}"
    write_config(str(tmp_path / "d"), moved, "v2")
    with pytest.raises(Exception, match="old-store"):
        _load_pyfunc(str(tmp_path / "d"))
    monkeypatch.setenv(ENV_STORE_ROOT, root)
    assert _load_pyfunc(str(tmp_path / "d")).model.version_id == "v2"
    pinned = tmp_path / "pinned"
    pinned.mkdir()
    (pinned / PYFUNC_CONFIG_FILE).write_text(
        json.dumps({"manifest_uri": moved, "version_id": "v2", "manifest_sha256": "0" * 64})
    )
    with pytest.raises(Exception, match="sha256"):
        _load_pyfunc(str(pinned))
    assert (
        relocated("s3://b/x/adfleet/versions/v1/manifest.json", "s3://c") == "s3://c/adfleet/versions/v1/manifest.json"
    )
    with pytest.raises(StoreError, match="cannot relocate"):
        relocated("s3://b/manifest.json", "s3://c")


def test_registry_style_config_and_mismatch(tmp_path, versions, monkeypatch):
    """The config fleet.storage.registry writes (format, non-secret options, env var name) loads; a config
    naming another version than its manifest is refused."""
    b = versions["v1"]
    d = tmp_path / "reg"
    d.mkdir()
    (d / PYFUNC_CONFIG_FILE).write_text(
        json.dumps(
            {
                "format": "fleet-pyfunc/1",
                "manifest_uri": b.uri,
                "version_id": "v1",
                "storage_options_env": "MY_FLEET_OPTS",
                "storage_options": {"auto_mkdir": False},
            }
        )
    )
    monkeypatch.setenv("MY_FLEET_OPTS", json.dumps({"auto_mkdir": True}))
    assert _load_pyfunc(str(d)).model.version_id == "v1"
    (d / PYFUNC_CONFIG_FILE).write_text(json.dumps({"manifest_uri": b.uri, "version_id": "v9"}))
    with pytest.raises(Exception, match="v9"):
        _load_pyfunc(str(d))
    (d / PYFUNC_CONFIG_FILE).write_text(json.dumps({"format": "fleet-pyfunc/2", "manifest_uri": b.uri}))
    with pytest.raises(Exception, match="fleet-pyfunc/2"):
        _load_pyfunc(str(d))


def test_load_models_uri_and_alias_reloader(mlflow_env, versions):
    """FleetModel.load resolves models:/ URIs via fleet.storage.registry; the reloader follows the alias."""
    tracking_uri, client = mlflow_env["tracking_uri"], mlflow_env["client"]
    assert FleetModel.load("models:/adfleet/1", tracking_uri).version_id == "v1"
    champion = FleetModel.load("models:/adfleet@champion", tracking_uri, cache_size=8, heads="lru")
    assert champion.version_id == "v2" and champion.source_uri == "models:/adfleet@champion"
    reload = alias_reloader("models:/adfleet@champion", tracking_uri, cache_size=8, heads="lru")
    assert reload(champion) is None  # unchanged
    client.set_registered_model_alias("adfleet", "champion", "1")
    try:
        new = reload(champion)
        assert new is not None and new.version_id == "v1" and new.cache_info()["capacity"] == 8
    finally:
        client.set_registered_model_alias("adfleet", "champion", "2")
    # the registered pyfunc loads by alias too
    loaded = mlflow.pyfunc.load_model("models:/adfleet@champion")
    seqs = random_sequences(random.Random(3), 4)
    ids = [versions["v2"].ids[i] for i in range(4)]
    np.testing.assert_allclose(
        loaded.predict(frame(ids, seqs)),
        champion.predict_batch([{"campaign_id": c, **s} for c, s in zip(ids, seqs)]),
        atol=1e-6,
    )


# --------------------------------------------------------------------------- quality-gate verdicts (with_status)


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    from test_serving import GATED_STATUSES

    return build_version(str(tmp_path_factory.mktemp("gated")), "g1", num_campaigns=10, statuses=GATED_STATUSES)


def test_with_status_flags_fallback_heads(gated):
    model = FleetPyfunc(FleetModel.open(gated.uri))
    ids = ["camp-0002", "camp-0000", "camp-0006", "camp-0004", "camp-0008", "camp-0000"]
    seqs = random_sequences(random.Random(40), len(ids))
    df = frame(ids, seqs)
    plain = model.predict(df)
    assert isinstance(plain, np.ndarray) and plain.shape == (6,)  # default unchanged
    np.testing.assert_array_equal(model.predict(df, params={"with_status": False}), plain)
    out = model.predict(df, params={"with_status": True})
    assert isinstance(out, pd.DataFrame) and list(out.columns) == ["probability", "fallback", "status"]
    np.testing.assert_array_equal(out["probability"].to_numpy(), plain)  # probabilities unchanged
    assert out["fallback"].dtype == bool
    assert out["fallback"].tolist() == [False, True, False, True, False, True]
    assert out["status"].tolist() == [gated.rows[c].status for c in ids]
    assert model.predict(df, params={"with_status": "true"})["fallback"].tolist() == out["fallback"].tolist()
    with pytest.raises(MlflowException, match="with_status"):
        model.predict(df, params={"with_status": 3})


def _log_and_load_signed(gated, tmp_path):
    """``gated``'s pyfunc logged with fleet.serve.pyfunc.model_signature() in the test experiment, loaded back by mlflow."""
    from fleet.serve.pyfunc import model_signature

    write_config(str(tmp_path / "data"), gated.uri, "g1")
    experiment = mlflow.get_experiment_by_name("fleet-test").experiment_id
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pyfunc.log_model(
            name="model",
            loader_module="fleet.serve.pyfunc",
            data_path=str(tmp_path / "data"),
            signature=model_signature(),
        )
    return mlflow.pyfunc.load_model(info.model_uri)


def test_with_status_through_mlflow(mlflow_env, gated, tmp_path):
    """A model logged with fleet.serve.pyfunc.model_signature() gets the param through mlflow's loader."""
    loaded = _log_and_load_signed(gated, tmp_path)
    ids = ["camp-0000", "camp-0002"]
    df = frame(ids, random_sequences(random.Random(41), 2))
    plain = loaded.predict(df)
    assert isinstance(plain, np.ndarray)
    out = loaded.predict(df, params={"with_status": True})
    assert out["fallback"].tolist() == [True, False] and out["status"].tolist() == ["fallback", "capacity"]
    np.testing.assert_allclose(out["probability"].to_numpy(), plain, atol=0)


# --------------------------------------------------------------------------- ranking requests (POST /v1/score's shape)


def rank_frame(seqs, campaign_ids) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "event_types": [s["event_types"] for s in seqs],
            "features": [s["features"] for s in seqs],
            "campaign_ids": campaign_ids,
        }
    )


def test_ranking_request(gated):
    from fleet.serve.pyfunc import SCORE_COLUMNS

    fleet_model = FleetModel.open(gated.uri)
    model = FleetPyfunc(fleet_model)
    seqs = random_sequences(random.Random(42), 4)
    three = ["camp-0000", "camp-0002", "camp-0001"]
    lists = [three, None, ["camp-0006", "camp-0004"], list(three)]
    out = model.predict(rank_frame(seqs, lists))
    assert isinstance(out, pd.DataFrame) and list(out.columns) == list(SCORE_COLUMNS) and len(out) == 4
    for i, (seq, ids) in enumerate(zip(seqs, lists)):
        want = fleet_model.score_campaigns(seq, ids)
        assert out["campaign_ids"][i] == want.ids and out["unknown"][i] == want.unknown
        np.testing.assert_allclose(out["probabilities"][i], want.probabilities, atol=1e-7, rtol=0)
        assert out["fallback"][i] == want.fallback.tolist()
    assert out["unknown"][0] == ["camp-0001"] and out["fallback"][0] == [True, False]
    assert len(out["campaign_ids"][1]) == 10  # null: every campaign
    top = model.predict(rank_frame(seqs, lists), params={"top_k": 1})
    assert [len(ids) for ids in top["campaign_ids"]] == [1, 1, 1, 1]
    assert top["campaign_ids"][1] == fleet_model.score_campaigns(seqs[1], top_k=1).ids
    for bad in (0, "2", 1.5, True):
        with pytest.raises(MlflowException, match="top_k"):
            model.predict(rank_frame(seqs, lists), params={"top_k": bad})
    with pytest.raises(MlflowException, match=r"campaign_ids\[0\]"):
        model.predict(rank_frame(seqs[:1], [["../x"]]))
    with pytest.raises(MlflowException, match="campaign_ids must be a list"):
        model.predict(rank_frame(seqs[:1], ["camp-0000"]))
    with pytest.raises(MlflowException, match="lacks columns"):
        model.predict(pd.DataFrame({"campaign_ids": [["camp-0000"]]}))


def test_ranking_request_through_mlflow(mlflow_env, gated, tmp_path):
    """Logged with fleet.serve.pyfunc.model_signature(), the top_k param reaches the model through mlflow's loader."""
    loaded = _log_and_load_signed(gated, tmp_path)
    seqs = random_sequences(random.Random(43), 2)
    out = loaded.predict(rank_frame(seqs, [gated.ids, gated.ids[:3]]), params={"top_k": 2})
    want = FleetModel.open(gated.uri).score_campaigns(seqs[0], gated.ids, top_k=2)
    assert out["campaign_ids"][0] == want.ids and len(out["campaign_ids"][1]) == 2
    np.testing.assert_allclose(out["probabilities"][0], want.probabilities, atol=1e-7, rtol=0)
