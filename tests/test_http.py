"""fleet.serve.http: a real uvicorn server on 127.0.0.1 (in a thread) and httpx, over real fleet versions."""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import logging
import os
import random
import re
import threading
import time

import httpx
import numpy as np
import psutil
import pytest
import uvicorn
from conftest import free_port
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from test_serving import NUM_FEATURES, BuiltVersion, build_version, random_sequences

from fleet.formats.codec import heads_to_table
from fleet.serve.http import ModelHolder, create_app
from fleet.serve.serving import FleetModel
from fleet.storage.store import FleetVersion, VersionWriter

ADMIN_TOKEN = "s3cret-admin-token"


@contextlib.contextmanager
def serve(app):
    """Run ``app`` under uvicorn on a free loopback port in a thread; yield its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def strict_json(response: httpx.Response):
    """Parse a response as standard JSON: NaN/Infinity literals are an error."""

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name} in response: {response.text[:200]}")

    return json.loads(response.content, parse_constant=no_constants)


class Switch:
    """A reload source: returns the other version once ``target`` is set (and differs)."""

    def __init__(self, models: dict[str, FleetModel]):
        self.models = models
        self.target: str | None = None
        self.calls = 0

    def __call__(self, current: FleetModel):
        self.calls += 1
        if self.target is None or self.target == current.version_id:
            return None
        return self.models[self.target]


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    store = str(tmp_path_factory.mktemp("store"))
    return {"v1": build_version(store, "v1", seed=0), "v2": build_version(store, "v2", seed=1)}


@pytest.fixture(scope="module")
def models(versions):
    return {vid: FleetModel.open(b.uri, cache_size=16, heads="lru") for vid, b in versions.items()}


@pytest.fixture(scope="module")
def server(models):
    """The shared server: v1, a reload switch to v2, small limits so 413s are cheap to provoke."""
    switch = Switch(models)
    holder = ModelHolder(models["v1"], reload=switch)
    app = create_app(holder, max_body_bytes=200_000, max_sequences=64, admin_token=ADMIN_TOKEN)
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield {"url": url, "client": client, "holder": holder, "switch": switch}


@pytest.fixture
def client(server):
    assert server["holder"].get().version_id == "v1"
    return server["client"]


def seq_body(rng, n=3, **kw):
    return random_sequences(rng, n, **kw)


# --------------------------------------------------------------------------- happy paths


def test_predict(client, versions):
    b = versions["v1"]
    seqs = seq_body(random.Random(0), 5)
    r = client.post("/v1/predict", json={"campaign_id": b.ids[3], "sequences": seqs})
    assert r.status_code == 200, r.text
    body = strict_json(r)
    assert body["campaign_id"] == b.ids[3] and body["version"] == "v1"
    assert body["status"] == "ok" and body["fallback"] is False
    np.testing.assert_allclose(body["probabilities"], b.expected(b.ids[3], seqs), atol=1e-6, rtol=0)
    assert r.headers["content-type"] == "application/json"


def test_predict_batch_in_row_order(client, versions, models):
    b = versions["v1"]
    rng = random.Random(1)
    rows = [{"campaign_id": rng.choice(b.ids), **s} for s in seq_body(rng, 40)]
    r = client.post("/v1/predict/batch", json={"rows": rows})
    assert r.status_code == 200, r.text
    body = strict_json(r)
    assert body["version"] == "v1" and len(body["probabilities"]) == 40
    np.testing.assert_allclose(body["probabilities"], models["v1"].predict_batch(rows), atol=1e-6, rtol=0)
    np.testing.assert_allclose(body["probabilities"], [b.expected(r["campaign_id"], [r])[0] for r in rows], atol=1e-6)


def test_empty_lists_and_extra_fields(client, versions):
    cid = versions["v1"].ids[0]
    r = client.post("/v1/predict", json={"campaign_id": cid, "sequences": []})
    assert r.status_code == 200 and strict_json(r)["probabilities"] == []
    assert strict_json(client.post("/v1/predict/batch", json={"rows": []}))["probabilities"] == []
    seq = {**seq_body(random.Random(2), 1)[0], "label": 1}  # unknown fields are ignored
    r = client.post("/v1/predict", json={"campaign_id": cid, "sequences": [seq], "note": "x"})
    assert r.status_code == 200, r.text


def test_campaign_metadata(client, versions):
    b = versions["v1"]
    cid = b.ids[4]
    r = client.get(f"/v1/campaigns/{cid}")
    assert r.status_code == 200
    body = strict_json(r)
    assert body["campaign_id"] == cid and body["version"] == "v1" and body["bits"] == b.rows[cid].bits
    assert body["status"] == "fp16_fallback" and body["teacher_auc"] == 0.75 and body["n_train"] == 104
    assert body["passed"] is True  # fp16_fallback only means stored at 16 bits
    assert client.get("/v1/campaigns/camp-0001").status_code == 404
    r = client.get("/v1/campaigns/has%20space")
    assert r.status_code == 422 and strict_json(r)["code"] == "invalid_input"


def test_healthz_and_openapi(client):
    body = strict_json(client.get("/healthz"))
    assert body["status"] == "ok" and body["version"] == "v1" and body["campaigns"] == 50
    schema = strict_json(client.get("/openapi.json"))
    assert "PredictRequest" in schema["components"]["schemas"]
    assert "SequenceIn" in schema["components"]["schemas"]
    assert "/v1/predict/batch" in schema["paths"]


def test_metrics(client, versions):
    cid = versions["v1"].ids[5]
    client.post("/v1/predict", json={"campaign_id": cid, "sequences": seq_body(random.Random(3), 1)})
    client.post("/v1/predict", json={"campaign_id": "camp-0001", "sequences": seq_body(random.Random(3), 1)})
    client.get(f"/v1/campaigns/{cid}")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'fleet_http_requests_total{endpoint="/v1/predict",status="200"}' in text
    assert 'fleet_http_requests_total{endpoint="/v1/predict",status="404"}' in text
    assert 'fleet_http_requests_total{endpoint="/v1/campaigns/{id}",status="200"}' in text  # no ids in labels
    assert 'fleet_http_request_duration_seconds_bucket{endpoint="/v1/predict",le="0.005"}' in text
    assert 'fleet_http_request_duration_seconds_count{endpoint="/v1/predict"}' in text
    assert _samples(text)["fleet_model_info[('fleet', 'adfleet'), ('version', 'v1')]"] == 1.0  # labels in any order
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values["fleet_head_cache_misses_total"] >= 1 and values["fleet_head_cache_hits_total"] >= 0
    assert values["fleet_model_campaigns"] == 50


def _samples(text: str) -> dict[str, float]:
    """``{series: value}`` of a Prometheus text exposition, parsed by prometheus_client's own parser."""
    return {
        f"{s.name}{sorted(s.labels.items())}": s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_are_prometheus_client_s_in_a_registry_per_app(client, models):
    text = client.get("/metrics").text
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name, kind in (
        ("fleet_http_requests", "counter"),
        ("fleet_http_request_duration_seconds", "histogram"),
        ("fleet_predicted_sequences", "counter"),
        ("fleet_scored_campaigns", "counter"),
        ("fleet_head_cache_hits", "counter"),
        ("fleet_head_cache_misses", "counter"),
        ("fleet_head_cache_size", "gauge"),
        ("fleet_head_cache_capacity", "gauge"),
        ("fleet_model_info", "gauge"),
        ("fleet_model_campaigns", "gauge"),
        ("fleet_model_swaps", "counter"),
        ("fleet_model_reload_errors", "counter"),
    ):
        assert families.get(name) == kind, name  # every metric docs/serving.md lists, as before
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_gc_collections", "python_info"} <= set(
        families
    )  # for free: process, GC and platform collectors
    # a second app in this process counts apart (its own registry), and the global registry holds no fleet metric
    other = create_app(ModelHolder(models["v2"]))
    with serve(other) as url, httpx.Client(base_url=url, timeout=30) as second:
        second.post("/v1/predict", json={"campaign_id": "nope", "sequences": seq_body(random.Random(1), 1)})
        mine = _samples(second.get("/metrics").text)
    assert mine["fleet_http_requests_total[('endpoint', '/v1/predict'), ('status', '404')]"] == 1.0
    assert "fleet_http_requests_total[('endpoint', '/v1/predict'), ('status', '200')]" not in mine
    assert mine["fleet_model_info[('fleet', 'adfleet'), ('version', 'v2')]"] == 1.0
    assert not [f.name for f in REGISTRY.collect() if f.name.startswith("fleet_")]


def test_docs_work_offline(client):
    r = client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "SwaggerUIBundle" in html and "validatorUrl" in html
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url:\s*'([^']+)'""", html)
    urls = [a or b for a, b in urls]
    assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), urls  # this server only
    assert not re.search(r"https?://", html), "the page names another host"
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 100, url
    assert "javascript" in client.get("/docs/static/swagger-ui-bundle.js").headers["content-type"]
    assert client.get("/redoc").status_code == 404  # ReDoc loads its script from a CDN: not served


# --------------------------------------------------------------------------- errors


def test_unknown_campaign_is_404(client, versions):
    seqs = seq_body(random.Random(4), 1)
    r = client.post("/v1/predict", json={"campaign_id": "camp-0001", "sequences": seqs})
    assert r.status_code == 404 and strict_json(r)["code"] == "unknown_campaign" and "camp-0001" in r.text
    rows = [{"campaign_id": versions["v1"].ids[0], **seqs[0]}, {"campaign_id": "zzz", **seqs[0]}]
    r = client.post("/v1/predict/batch", json={"rows": rows})
    assert r.status_code == 404 and "row 1" in strict_json(r)["detail"]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"[]",
        b'{"campaign_id": "camp-0000"}',
        b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [1], "features": [NaN, 0, 0]}]}',
        b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [1], "features": [Infinity, 0, 0]}]}',
        b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [1], "features": [1e999, 0, 0]}]}',
        b'{"campaign_id": "camp-0000", "sequences": [{"event_types": ["1"], "features": [0, 0, 0]}]}',
        b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [1.0], "features": [0, 0, 0]}]}',
        b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [true], "features": [0, 0, 0]}]}',
        b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [99], "features": [0, 0, 0]}]}',
        b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [-1], "features": [0, 0, 0]}]}',
        b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [1], "features": [0, 0]}]}',
        b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [], "features": []}]}',
        b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [100000000000000000000000], "features": [0,0,0]}]}',
        b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [1], "features": [3e39, 0, 0]}]}',
        b'{"campaign_id": "../../etc", "sequences": []}',
        b'{"campaign_id": 7, "sequences": []}',
        b"[" * 100_000,
        b"\xff\xfe\x00",
    ],
)
def test_malformed_bodies_are_422(client, content):
    r = client.post("/v1/predict", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 422, (content[:80], r.status_code, r.text[:300])
    body = strict_json(r)
    assert body["code"] in ("invalid_body", "invalid_input") and body["detail"]


def test_limits_are_413(client, versions):
    cid = versions["v1"].ids[0]
    seq = {"event_types": [1], "features": [0.0] * NUM_FEATURES}
    r = client.post("/v1/predict", json={"campaign_id": cid, "sequences": [seq] * 64})
    assert r.status_code == 200
    r = client.post("/v1/predict", json={"campaign_id": cid, "sequences": [seq] * 65})
    assert r.status_code == 413 and strict_json(r)["code"] == "too_many_sequences"
    r = client.post("/v1/predict/batch", json={"rows": [{"campaign_id": cid, **seq}] * 65})
    assert r.status_code == 413
    big = json.dumps({"campaign_id": cid, "sequences": [seq] * 10_000}).encode()  # ~490 kB > 200 kB
    r = client.post("/v1/predict", content=big)  # Content-Length says too much: refused unread
    assert r.status_code == 413 and strict_json(r)["code"] == "payload_too_large"

    def chunks():  # no Content-Length: the streamed bytes are counted
        for i in range(0, len(big), 16_384):
            yield big[i : i + 16_384]

    r = client.post("/v1/predict", content=chunks())
    assert r.status_code == 413
    assert client.get("/healthz").status_code == 200  # the server is fine afterwards


def test_not_found_and_wrong_method(client):
    assert client.get("/nope").status_code == 404
    assert client.get("/v1/predict").status_code == 405
    assert strict_json(client.get("/nope"))["code"] == "not_found"


# --------------------------------------------------------------------------- fuzz: never a 5xx

_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "camp-0000", "camp-0001", "../x", ""]),
)
_any = st.recursive(
    _leaf, lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4), max_leaves=20
)
_event_types = st.one_of(st.lists(st.integers(min_value=-3, max_value=15), max_size=6), _any)
_features = st.one_of(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), max_size=20),
    st.lists(st.floats(min_value=-1e6, max_value=1e6), max_size=20),
    _any,
)
_seq = st.fixed_dictionaries({"event_types": _event_types, "features": _features})


@st.composite
def _near_valid_seq(draw):
    """Well-formed JSON that reaches the model: valid, or valid with one mutation."""
    t = draw(st.integers(min_value=1, max_value=6))
    types = draw(st.lists(st.integers(min_value=0, max_value=11), min_size=t, max_size=t))
    feats = draw(st.lists(st.floats(min_value=-10, max_value=10), min_size=t * NUM_FEATURES, max_size=t * NUM_FEATURES))
    mutation = draw(st.sampled_from(["none"] * 6 + ["empty", "type", "length", "special"]))
    if mutation == "empty":
        types, feats = [], []
    elif mutation == "type":
        types[draw(st.integers(0, t - 1))] = draw(st.sampled_from([-1, 12, 2**31, -(2**63), 2**64]))
    elif mutation == "length":
        feats = feats[:-1] if draw(st.booleans()) else feats + [0.0]
    elif mutation == "special":
        feats[draw(st.integers(0, len(feats) - 1))] = draw(
            st.sampled_from([1e38, -3.4e38, 3.5e38, 1e300, -0.0, 5e-324, float("nan"), float("inf")])
        )
    return {"event_types": types, "features": feats}


_seq = st.one_of(_seq, _near_valid_seq(), _near_valid_seq())
_good_cid = st.sampled_from(["camp-0000", "camp-0002", "camp-0098", "camp-0001", "zzz"])
_cid = st.one_of(_good_cid, _good_cid, _good_cid, st.sampled_from(["", "a/b", "-x", "x" * 200]), _any)
_seqs = st.one_of(st.lists(_seq, max_size=4), st.lists(_near_valid_seq(), max_size=3), _any)
_predict = st.fixed_dictionaries({"campaign_id": _cid, "sequences": _seqs})
_batch_row = st.builds(lambda c, s: {"campaign_id": c, **s}, _cid, _seq)
_plausible_row = st.builds(lambda c, s: {"campaign_id": c, **s}, _good_cid, _near_valid_seq())
_batch = st.fixed_dictionaries(
    {"rows": st.one_of(st.lists(_batch_row, max_size=4), st.lists(_plausible_row, max_size=3), _any)}
)
_raw_text = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [
            b"[" * 5000,
            b"{" * 5000,
            (b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [1], "features": [1e99999, -0, 0]}]}'),
            b"9" * 5000,
            b'{"rows": [' + b"{}," * 100 + b"{}]}",
            b'{"campaign_id": "camp-0000", "sequences": "' + b"A" * 1000 + b'"}',
        ]
    ),
)


def _dumps(strategy):
    return strategy.map(lambda o: json.dumps(o, allow_nan=True).encode())  # may write NaN / Infinity literals


_paths = st.sampled_from(["/v1/predict", "/v1/predict/batch"])
_request = st.one_of(
    st.tuples(st.just("/v1/predict"), _dumps(_predict)),
    st.tuples(st.just("/v1/predict/batch"), _dumps(_batch)),
    st.tuples(_paths, _dumps(st.one_of(_predict, _batch, _any))),
    st.tuples(_paths, _raw_text),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=_request)
def test_fuzz_never_5xx(server, request):
    path, content = request
    r = server["client"].post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code < 500, (path, content[:200], r.status_code, r.text[:300])
    event(f"status {r.status_code}")
    body = strict_json(r)
    if r.status_code == 200:
        assert all(0.0 <= p <= 1.0 for p in body["probabilities"])
    else:
        assert isinstance(body["detail"], str)


# --------------------------------------------------------------------------- POST /v1/score (one sequence, many campaigns)

SCORE_LIMIT = 20  # below the 50 campaigns of v1, so "every campaign" without top_k is over the limit


@pytest.fixture(scope="module")
def score_server(versions):
    """v1 with every head resident (the default) and a small /v1/score limit."""
    model = FleetModel.open(versions["v1"].uri)
    app = create_app(model, max_score_campaigns=SCORE_LIMIT, max_body_bytes=200_000)
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, model


def test_score(score_server, versions):
    client, model = score_server
    b = versions["v1"]
    seq = seq_body(random.Random(50), 1)[0]
    ids = [b.ids[i] for i in (4, 0, 17, 4, 9)] + ["camp-0001", "zz-9"]
    r = client.post("/v1/score", json={"sequence": seq, "campaign_ids": ids})
    assert r.status_code == 200, r.text
    body = strict_json(r)
    known = [b.ids[i] for i in (4, 0, 17, 9)]
    assert body["version"] == "v1" and body["campaign_ids"] == known and body["unknown"] == ["camp-0001", "zz-9"]
    np.testing.assert_allclose(body["probabilities"], [model.predict(c, [seq])[0] for c in known], atol=1e-6, rtol=0)
    np.testing.assert_allclose(body["probabilities"], [b.expected(c, [seq])[0] for c in known], atol=1e-6, rtol=0)
    assert body["fallback"] == [False] * 4
    top = strict_json(client.post("/v1/score", json={"sequence": seq, "campaign_ids": ids, "top_k": 2}))
    order = np.argsort(-np.array(body["probabilities"]), kind="stable")[:2]
    assert top["campaign_ids"] == [known[i] for i in order] and top["unknown"] == ["camp-0001", "zz-9"]
    every = strict_json(client.post("/v1/score", json={"sequence": seq, "top_k": SCORE_LIMIT}))
    want = model.score_campaigns(seq, top_k=SCORE_LIMIT)
    assert every["campaign_ids"] == want.ids and len(every["campaign_ids"]) == SCORE_LIMIT
    np.testing.assert_allclose(every["probabilities"], want.probabilities, atol=1e-7, rtol=0)
    empty = strict_json(client.post("/v1/score", json={"sequence": seq, "campaign_ids": [], "note": "ignored"}))
    assert empty["campaign_ids"] == [] and empty["probabilities"] == [] and empty["unknown"] == []
    schema = strict_json(client.get("/openapi.json"))
    assert {"sequence", "campaign_ids", "top_k"} <= set(schema["components"]["schemas"]["ScoreRequest"]["properties"])
    assert {"campaign_ids", "probabilities", "fallback", "unknown"} <= set(
        schema["components"]["schemas"]["ScoreResponse"]["properties"]
    )
    assert "/v1/score" in schema["paths"]
    metrics = client.get("/metrics").text
    assert 'fleet_http_requests_total{endpoint="/v1/score",status="200"}' in metrics
    assert "fleet_scored_campaigns_total" in metrics


def test_score_limits_are_413_and_bad_bodies_422(score_server, versions):
    client, _ = score_server
    b = versions["v1"]
    seq = seq_body(random.Random(51), 1)[0]

    def post(body):
        r = client.post("/v1/score", json=body)
        return r.status_code, strict_json(r)

    code, body = post({"sequence": seq, "campaign_ids": b.ids[: SCORE_LIMIT + 1]})
    assert code == 413 and body["code"] == "too_many_campaigns" and str(SCORE_LIMIT) in body["detail"]
    assert post({"sequence": seq, "campaign_ids": b.ids[:SCORE_LIMIT]})[0] == 200  # at the limit: fine
    code, body = post({"sequence": seq})  # every campaign (50) without top_k: above the limit
    assert code == 413 and body["code"] == "too_many_campaigns" and "top_k" in body["detail"]
    assert post({"sequence": seq, "top_k": SCORE_LIMIT + 1})[0] == 413
    for bad in (
        {"campaign_ids": b.ids[:2]},  # no sequence
        {"sequence": seq, "campaign_ids": "camp-0000"},  # not a list
        {"sequence": seq, "campaign_ids": [1, 2]},
        {"sequence": seq, "top_k": 0},
        {"sequence": seq, "top_k": 2.5},
        {"sequence": seq, "top_k": "3"},
        {"sequence": {"event_types": [1.5], "features": [0, 0, 0]}, "campaign_ids": b.ids[:2]},
        {"sequences": [seq], "campaign_ids": b.ids[:2]},
    ):
        code, body = post(bad)
        assert code == 422 and body["code"] == "invalid_body", (bad, body)
    code, body = post({"sequence": seq, "campaign_ids": [b.ids[0], "../x"]})
    assert code == 422 and body["code"] == "invalid_input" and "campaign_ids[1]" in body["detail"]
    code, body = post({"sequence": {"event_types": [99], "features": [0, 0, 0]}, "campaign_ids": b.ids[:2]})
    assert code == 422 and body["code"] == "invalid_input" and "event types" in body["detail"]
    r = client.post(
        "/v1/score",
        content=b'{"sequence": {"event_types": [1], "features": [NaN, 0, 0]}}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422


def test_score_on_an_lru_server(models, versions):
    """heads="lru": named campaigns score the same; every campaign (no ids) is a 422 naming the fix."""
    seq = seq_body(random.Random(52), 1)[0]
    ids = versions["v1"].ids[:5]
    with serve(create_app(models["v1"])) as url:
        r = httpx.post(url + "/v1/score", json={"sequence": seq, "campaign_ids": ids})
        assert r.status_code == 200
        np.testing.assert_allclose(
            strict_json(r)["probabilities"], [versions["v1"].expected(c, [seq])[0] for c in ids], atol=1e-6
        )
        r = httpx.post(url + "/v1/score", json={"sequence": seq, "top_k": 3})
        assert r.status_code == 422 and "resident" in strict_json(r)["detail"]


_score_ids = st.one_of(st.none(), st.lists(_cid, max_size=6), _any)
_score = st.fixed_dictionaries(
    {"sequence": st.one_of(_seq, _near_valid_seq()), "campaign_ids": _score_ids},
    optional={"top_k": st.one_of(st.integers(-2, 30), _any)},
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(content=st.one_of(_dumps(_score), _dumps(_any), _raw_text))
def test_score_fuzz_never_5xx(score_server, content):
    client, _ = score_server
    r = client.post("/v1/score", content=content, headers={"content-type": "application/json"})
    assert r.status_code < 500, (content[:200], r.status_code, r.text[:300])
    body = strict_json(r)
    if r.status_code == 200:
        assert all(0.0 <= p <= 1.0 for p in body["probabilities"])
        assert len(body["probabilities"]) == len(body["campaign_ids"]) == len(body["fallback"])


# --------------------------------------------------------------------------- reload and swap


def test_admin_reload(server, versions):
    client, switch = server["client"], server["switch"]
    assert client.post("/admin/reload").status_code == 401
    assert client.post("/admin/reload", headers={"authorization": "Bearer wrong"}).status_code == 401
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    r = client.post("/admin/reload", headers=auth)
    assert r.status_code == 200 and strict_json(r) == {"changed": False, "previous": "v1", "version": "v1"}
    switch.target = "v2"
    try:
        r = client.post("/admin/reload", headers=auth)
        assert strict_json(r) == {"changed": True, "previous": "v1", "version": "v2"}
        cid = versions["v2"].ids[1]
        seqs = seq_body(random.Random(5), 2)
        body = strict_json(client.post("/v1/predict", json={"campaign_id": cid, "sequences": seqs}))
        assert body["version"] == "v2"
        np.testing.assert_allclose(body["probabilities"], versions["v2"].expected(cid, seqs), atol=1e-6)
        assert _samples(client.get("/metrics").text)["fleet_model_info[('fleet', 'adfleet'), ('version', 'v2')]"] == 1.0
        assert "fleet_model_swaps_total 1" in client.get("/metrics").text
    finally:
        switch.target = "v1"
        assert strict_json(client.post("/admin/reload", headers=auth))["version"] == "v1"


def test_reload_without_source_and_failing_source(models):
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    with serve(create_app(models["v1"], admin_token=ADMIN_TOKEN)) as url:
        r = httpx.post(url + "/admin/reload", headers=auth)
        assert r.status_code == 409 and strict_json(r)["code"] == "reload_unavailable"

    def broken(current):
        raise OSError("registry unreachable")

    holder = ModelHolder(models["v1"], reload=broken)
    with serve(create_app(holder, admin_token=ADMIN_TOKEN)) as url:
        r = httpx.post(url + "/admin/reload", headers=auth)
        assert r.status_code == 503 and "still serving v1" in strict_json(r)["detail"]
        assert strict_json(httpx.get(url + "/healthz"))["last_reload_error"].startswith("OSError")
        assert httpx.get(url + "/healthz").status_code == 200


def test_swap_under_concurrent_requests(versions, models):
    """A stream of concurrent requests across a swap: no failure, every answer consistent with the
    version it names, and each client switches from v1 to v2 exactly once."""
    holder = ModelHolder(models["v1"])
    rng = random.Random(6)
    cases = []
    for _ in range(20):
        rows = [{"campaign_id": rng.choice(versions["v1"].ids), **s} for s in seq_body(rng, 3)]
        cases.append((rows, {vid: models[vid].predict_batch(rows) for vid in ("v1", "v2")}))
    failures, seen = [], {}
    stop = threading.Event()
    count = [0]
    lock = threading.Lock()

    def stream(k, url):
        versions_seen = []
        with httpx.Client(base_url=url, timeout=30) as c:
            i = k
            while not stop.is_set():
                rows, expected = cases[i % len(cases)]
                i += 1
                try:
                    r = c.post("/v1/predict/batch", json={"rows": rows})
                    body = strict_json(r)
                    assert r.status_code == 200, r.text
                    np.testing.assert_allclose(body["probabilities"], expected[body["version"]], atol=1e-6, rtol=0)
                    versions_seen.append(body["version"])
                except Exception as exc:  # noqa: BLE001 - collected and asserted below
                    failures.append(repr(exc))
                with lock:
                    count[0] += 1
        seen[k] = versions_seen

    with serve(create_app(holder)) as url:
        threads = [threading.Thread(target=stream, args=(k, url)) for k in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while count[0] < 150 and time.monotonic() < deadline:
            time.sleep(0.01)
        holder.swap(models["v2"])
        swapped_at = count[0]
        while count[0] < swapped_at + 150 and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    for k, vs in seen.items():
        assert vs[0] == "v1" and vs[-1] == "v2", (k, vs[:3], vs[-3:])
        switch = vs.index("v2")
        assert set(vs[switch:]) == {"v2"}, k  # never back to the old version


def test_poller_swaps_when_the_source_changes(models):
    switch = Switch(models)
    holder = ModelHolder(models["v1"], reload=switch, poll_seconds=0.05)
    with serve(create_app(holder)) as url:
        time.sleep(0.2)
        assert strict_json(httpx.get(url + "/healthz"))["version"] == "v1" and switch.calls >= 1
        switch.target = "v2"
        deadline = time.monotonic() + 10
        while strict_json(httpx.get(url + "/healthz"))["version"] != "v2":
            assert time.monotonic() < deadline, "poller did not swap"
            time.sleep(0.05)
    assert holder._thread is None  # stopped with the app


# --------------------------------------------------------------------------- fleet serve (subprocess)


def test_fleet_serve_command(versions, tmp_path):
    """``fleet serve`` as a process: it answers on the port given and stops on SIGTERM."""
    import subprocess
    import sys

    port = free_port()
    code = (
        "import argparse, sys; from rich.console import Console; from fleet.cli.serving import register; "
        "p = argparse.ArgumentParser(); register(p.add_subparsers(dest='command', required=True)); "
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.handler(a, Console(stderr=True)))"
    )
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - the server subprocess's stdout while it runs
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    env = {k: v for k, v in os.environ.items() if k != "FLEET_ADMIN_TOKEN"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "serve",
            "--model",
            versions["v1"].uri,
            "--port",
            str(port),
            "--cache-size",
            "8",
            "--max-sequences",
            "2",
            "--log-level",
            "warning",
            "--admin-token-file",
            str(token_file),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "fleet serve did not come up"
            time.sleep(0.1)
        seqs = random_sequences(random.Random(7), 3)
        cid = versions["v1"].ids[0]
        assert httpx.post(url + "/v1/predict", json={"campaign_id": cid, "sequences": seqs}).status_code == 413
        r = httpx.post(url + "/v1/predict", json={"campaign_id": cid, "sequences": seqs[:2]})
        assert r.status_code == 200 and strict_json(r)["version"] == "v1"
        # the admin token comes from the file (newline stripped) and is on no command line
        assert httpx.post(url + "/admin/reload").status_code == 401
        r = httpx.post(url + "/admin/reload", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert r.status_code == 200 and strict_json(r)["changed"] is False
        assert ADMIN_TOKEN not in " ".join(psutil.Process(proc.pid).cmdline())
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) in (0, -15)  # uvicorn re-raises SIGTERM after a graceful shutdown
        log.close()


# --------------------------------------------------------------------------- quality-gate verdicts in the bodies


@pytest.fixture(scope="module")
def gated_client(tmp_path_factory):
    """A server over a version whose heads include a fallback and a gate_failed head."""
    from test_serving import GATED_STATUSES

    built = build_version(str(tmp_path_factory.mktemp("gated")), "g1", num_campaigns=10, statuses=GATED_STATUSES)
    model = FleetModel.open(built.uri, cache_size=16)
    with serve(create_app(model)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, built, model


def test_predict_bodies_flag_fallback_heads(gated_client):
    client, b, model = gated_client
    seqs = seq_body(random.Random(30), 4)
    for cid, status, fallback in [
        ("camp-0000", "fallback", True),
        ("camp-0004", "gate_failed", True),
        ("camp-0002", "capacity", False),
        ("camp-0006", "ok", False),
        ("camp-0008", "fp16_fallback", False),
    ]:
        body = strict_json(client.post("/v1/predict", json={"campaign_id": cid, "sequences": seqs}))
        assert body["status"] == status and body["fallback"] is fallback, (cid, body)
        np.testing.assert_allclose(body["probabilities"], b.expected(cid, seqs), atol=1e-6, rtol=0)  # still given
    body = strict_json(client.post("/v1/predict", json={"campaign_id": "camp-0000", "sequences": []}))
    assert body["probabilities"] == [] and body["fallback"] is True and body["status"] == "fallback"

    ids = ["camp-0002", "camp-0000", "camp-0006", "camp-0004", "camp-0000", "camp-0008"]
    rows = [{"campaign_id": c, **s} for c, s in zip(ids, seq_body(random.Random(31), len(ids)))]
    body = strict_json(client.post("/v1/predict/batch", json={"rows": rows}))
    assert body["fallback"] == [False, True, False, True, True, False]
    np.testing.assert_allclose(body["probabilities"], model.predict_batch(rows), atol=1e-7, rtol=0)
    assert strict_json(client.post("/v1/predict/batch", json={"rows": []}))["fallback"] == []

    assert strict_json(client.get("/v1/campaigns/camp-0000"))["passed"] is False
    assert strict_json(client.get("/v1/campaigns/camp-0002"))["passed"] is True

    schemas = strict_json(client.get("/openapi.json"))["components"]["schemas"]
    assert {"status", "fallback"} <= set(schemas["PredictResponse"]["properties"])
    assert schemas["BatchResponse"]["properties"]["fallback"]["type"] == "array"
    assert "passed" in schemas["CampaignResponse"]["properties"]


# --------------------------------------------------------------------------- admin auth and error bodies (docs/security.md 6)


def test_admin_is_disabled_without_a_token(models):
    """No token configured: every /admin/* route answers 403 admin_disabled and never reloads."""
    switch = Switch(models)
    switch.target = "v2"
    with serve(create_app(ModelHolder(models["v1"], reload=switch))) as url:
        for headers in ({}, {"authorization": "Bearer anything"}):
            r = httpx.post(url + "/admin/reload", headers=headers)
            assert r.status_code == 403 and strict_json(r)["code"] == "admin_disabled", r.text
        assert switch.calls == 0 and strict_json(httpx.get(url + "/healthz"))["version"] == "v1"


def test_admin_token_is_checked_with_compare_digest(models, monkeypatch):
    """Exactly ``Bearer <token>`` passes; every comparison goes through hmac.compare_digest."""
    compared = []

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", spy)
    with serve(create_app(models["v1"], admin_token=ADMIN_TOKEN)) as url:
        for value in (
            None,
            ADMIN_TOKEN,
            f"bearer {ADMIN_TOKEN}",
            f"Bearer {ADMIN_TOKEN[:-1]}",
            f"Bearer {ADMIN_TOKEN}x",
            f"Bearer  {ADMIN_TOKEN}",
            "Bearer é",
        ):
            headers = {} if value is None else {"authorization": value.encode("latin-1")}
            r = httpx.post(url + "/admin/reload", headers=headers)
            assert r.status_code == 401 and strict_json(r)["code"] == "unauthorized", (value, r.text)
            assert ADMIN_TOKEN not in r.text
        r = httpx.post(url + "/admin/reload", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert r.status_code == 409 and strict_json(r)["code"] == "reload_unavailable"  # past the guard
    assert len(compared) == 8 and all(b == f"Bearer {ADMIN_TOKEN}".encode() for _, b in compared)


@pytest.mark.parametrize("token", ["", "   ", "two words", "tab\there", "new\nline", "tök"])
def test_unusable_admin_tokens_are_refused(models, token):
    with pytest.raises(ValueError, match="admin token") as info:
        create_app(models["v1"], admin_token=token)
    assert token.strip() == "" or token not in str(info.value)


def test_admin_token_comes_from_the_environment_or_a_file_never_the_command_line(tmp_path, monkeypatch, capsys):
    from fleet.cli.main import main as fleet_main
    from fleet.cli.serving import _admin_token

    monkeypatch.delenv("FLEET_ADMIN_TOKEN", raising=False)
    assert _admin_token(None) is None  # nothing configured: /admin/* disabled
    monkeypatch.setenv("FLEET_ADMIN_TOKEN", ADMIN_TOKEN)
    assert _admin_token(None) == ADMIN_TOKEN
    path = tmp_path / "token"
    path.write_text("  file-token-0123456789\n")
    assert _admin_token(str(path)) == "file-token-0123456789"  # the file wins over the environment
    path.write_text("two words\n")
    with pytest.raises(ValueError, match="--admin-token-file") as info:
        _admin_token(str(path))
    assert "two words" not in str(info.value)
    with pytest.raises(ValueError, match="cannot read"):
        _admin_token(str(tmp_path / "missing"))
    with pytest.raises(SystemExit) as exit_info:
        fleet_main(["serve", "--model", "x", "--admin-token", "cmdline-token-0123456789"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--admin-token-file" in err and "cmdline-token-0123456789" not in err


def _write_nan_head_version(store: str, source: BuiltVersion, campaign_id: str) -> str:
    """A version whose ``campaign_id`` head decodes to NaN (its float16 scales are NaN)."""
    rows = dict(source.rows)
    bad = rows[campaign_id]
    rows[campaign_id] = dataclasses.replace(bad, scales=np.full(len(bad.scales) // 2, np.nan, "<f2").tobytes())
    writer = VersionWriter(store, "adfleet", "nan1")
    writer.write_backbone_bytes(FleetVersion.open(source.uri).read_backbone_bytes())
    writer.write_heads(heads_to_table(list(rows.values())))
    return writer.commit()


def test_error_bodies_name_campaign_row_and_reason_never_paths_credentials_or_traces(
    versions, models, tmp_path, caplog
):
    b = versions["v1"]
    cid = next(c for c, r in b.rows.items() if r.bits != 16)
    store = str(tmp_path / "store")
    model = FleetModel.open(
        _write_nan_head_version(store, b, cid), cache_size=4, heads="lru"
    )  # resident: refused at open
    leak = ("https://bob:hunter2-pw@registry.example/api?token=tok-5b1e-query", "/srv/fleet-store/adfleet/versions")

    def broken(current):
        raise OSError(f"cannot reach {leak[0]}; last manifest {leak[1]}/v2/manifest.json")

    caplog.set_level(logging.INFO, logger="fleet.serve.http")
    seqs = seq_body(random.Random(40), 2)
    with serve(create_app(ModelHolder(model, reload=broken), admin_token=ADMIN_TOKEN)) as url:
        r = httpx.post(url + "/v1/predict", json={"campaign_id": cid, "sequences": seqs})  # a corrupt head
        assert r.status_code == 503
        detail = strict_json(r)["detail"]
        assert f"campaign {cid!r}" in detail and "non-finite" in detail, detail
        rows = [{"campaign_id": b.ids[1], **seqs[0]}, {"campaign_id": cid, **seqs[1]}]
        batch = httpx.post(url + "/v1/predict/batch", json={"rows": rows})
        assert batch.status_code == 503 and f"campaign {cid!r}" in strict_json(batch)["detail"]
        unknown = httpx.post(url + "/v1/predict/batch", json={"rows": [rows[0], {**rows[0], "campaign_id": "zz"}]})
        assert unknown.status_code == 404 and strict_json(unknown)["detail"] == (
            "campaign 'zz': row 1: not in fleet version 'nan1'"
        )
        reload = httpx.post(url + "/admin/reload", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert reload.status_code == 503 and "still serving nan1" in strict_json(reload)["detail"]
        health = httpx.get(url + "/healthz")
        assert strict_json(health)["last_reload_error"] == "OSError: cannot reach <path>; last manifest <path>"
        for response in (r, batch, unknown, reload, health):
            for secret in (store, "hunter2-pw", "tok-5b1e-query", leak[1], "Traceback", ".py"):
                assert secret not in response.text, (secret, response.text)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "reload failed" in logged and "Traceback" in logged  # the operator's log keeps the trace ...
    assert "hunter2-pw" not in logged and "tok-5b1e-query" not in logged  # ... without the credentials


_PREDICT_BODIES = [
    b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [1, 2], "features": [0, 1.5, -2, 3, 4, 5e-3]}]}',
    b'{"campaign_id": "camp-0000", "sequences": [], "extra": 1}',
    b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [], "features": [], "x": [true]}]}',
    b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [18446744073709551615], "features": [1, 2, 3]}]}',
    b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [100000000000000000000000], "features": [0,0,0]}]}',
    b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [true], "features": [0, 0, 0]}]}',
    b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [1.0], "features": [0, 0, 0]}]}',
    b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [1], "features": [false, 0, 0]}]}',
    b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [1], "features": ["0", 0, 0]}]}',
    b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [1], "features": [NaN, 0, 0]}]}',
    b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [1], "features": [1e999, 0, 0]}]}',
    b'{"campaign_id": "camp-0000", "sequences": [{"event_types": [1]}]}',
    b'{"campaign_id": "camp-0000", "sequences": [[1, 2]]}',
    b'{"campaign_id": 7, "sequences": []}',
    b'{"sequences": []}',
    b"[]",
    b"not json",
    b"",
]
_SCORE_BODIES = [
    b'{"sequence": {"event_types": [1], "features": [0, 1, 2]}}',
    b'{"sequence": {"event_types": [1], "features": [0, 1, 2]}, "campaign_ids": null, "top_k": null}',
    b'{"sequence": {"event_types": [1], "features": [0, 1, 2]}, "campaign_ids": ["a", "b", "a"], "top_k": 2}',
    b'{"sequence": {"event_types": [1], "features": [0, 1, 2]}, "campaign_ids": [], "note": 1}',
    b'{"sequence": {"event_types": [1], "features": [0, 1, 2]}, "campaign_ids": ["a", 2]}',
    b'{"sequence": {"event_types": [1], "features": [0, 1, 2]}, "campaign_ids": "a"}',
    b'{"sequence": {"event_types": [1], "features": [0, 1, 2]}, "top_k": 0}',
    b'{"sequence": {"event_types": [1], "features": [0, 1, 2]}, "top_k": true}',
    b'{"sequence": {"event_types": [1], "features": [0, 1, 2]}, "top_k": 2.0}',
    b'{"sequence": {"event_types": [1.5], "features": [0, 1, 2]}}',
    b'{"sequences": [{"event_types": [1], "features": [0, 1, 2]}]}',
    b"{}",
    b"null",
]


@pytest.mark.parametrize("body", _PREDICT_BODIES)
def test_fast_predict_parse_agrees_with_the_model(body):
    """The hot endpoints' minimal check accepts only what PredictRequest accepts, with the same values; anything
    else goes to pydantic (None), which names the problem."""
    from pydantic import ValidationError

    from fleet.serve.http_schemas import PredictRequest, _fast_predict_body

    fast = _fast_predict_body(body)
    try:
        req = PredictRequest.model_validate_json(body)
    except ValidationError:
        assert fast is None
        return
    if fast is not None:
        assert fast == (req.campaign_id, [s.event_types for s in req.sequences], [s.features for s in req.sequences])


@pytest.mark.parametrize("body", _SCORE_BODIES)
def test_fast_score_parse_agrees_with_the_model(body):
    from pydantic import ValidationError

    from fleet.serve.http_schemas import ScoreRequest, _fast_score_body

    fast = _fast_score_body(body)
    try:
        req = ScoreRequest.model_validate_json(body)
    except ValidationError:
        assert fast is None
        return
    assert fast is not None  # every plain body takes the fast path
    seq = {"event_types": req.sequence.event_types, "features": req.sequence.features}
    assert fast == (seq, req.campaign_ids, req.top_k)


def test_fast_path_answers_what_the_model_computes(client, versions, models):
    """Through the fast parse and orjson, /v1/predict returns exactly the model's probabilities (also for an
    int beyond 64 bits in a feature, which orjson reads as the float pydantic would make of it)."""
    cid = versions["v1"].ids[0]
    feats = [0.5] * NUM_FEATURES
    seqs = [{"event_types": [1, 2], "features": feats * 2}, {"event_types": [1], "features": [2**70, *feats[1:]]}]
    r = client.post(
        "/v1/predict",
        content=json.dumps({"campaign_id": cid, "sequences": seqs}).encode(),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    want = models["v1"].predict(
        cid, [{"event_types": s["event_types"], "features": [float(x) for x in s["features"]]} for s in seqs]
    )
    assert strict_json(r)["probabilities"] == want.tolist()
