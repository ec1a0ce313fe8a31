"""The HTTP service: a FastAPI app over a swappable :class:`~fleet.serve.serving.FleetModel`.

``create_app(ModelHolder(model))`` serves ``POST /v1/predict``, ``POST /v1/predict/batch``,
``POST /v1/score`` (one sequence against many campaigns), ``GET /v1/campaigns/{id}``, ``GET /healthz``, ``GET /metrics`` and ``POST /admin/reload``; the
bodies, status codes and limits are a contract documented in ``docs/serving.md``.

The hot endpoints (``/v1/predict``, ``/v1/score``) parse their body with orjson and a minimal check of its
shape (:func:`_fast_predict_body`, :func:`_fast_score_body`); a body that does not pass goes through the
pydantic models, which name what is wrong (so the 422s and the OpenAPI schema are the models'). Small
requests run on the event loop (no thread hop), larger ones in the thread pool. Responses are orjson.

Guarantees: a request takes the model reference once, so a swap never changes a version under a
request in flight; bodies are bounded (``Content-Length`` and streamed bytes); no input yields a
5xx, and NaN/inf never reach a JSON response. ``/admin/*`` answers only when an admin token is
configured, and only to ``Authorization: Bearer <token>`` (``hmac.compare_digest``). Error bodies name
the campaign, row and reason: never a store path, a credential or a stack trace (:func:`public_detail`).
"""

from __future__ import annotations

import hmac
import logging
import re
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from fleet.core.errors import (
    FleetError,
    InvalidCampaignIdError,
    StoreError,
    UnknownCampaignError,
)
from fleet.core.redact import scrub
from fleet.formats.codec import head_passed
from fleet.serve.serving import FleetModel, InvalidInputError
from fleet.storage.store import json_safe

log = logging.getLogger("fleet.serve.http")

DEFAULT_MAX_BODY_BYTES = 1_000_000
DEFAULT_MAX_SEQUENCES = 1024
#: Most campaigns one ``POST /v1/score`` may name (and most scores it may return: ``top_k``, or every
#: campaign of the version when it names none).
DEFAULT_MAX_SCORE_CAMPAIGNS = 10_000
#: After refusing an oversized body we still read (and drop) up to this many bytes, so the client
#: gets to read the 413 instead of a connection reset.
DRAIN_LIMIT_BYTES = 16 * 2**20
#: A ``/v1/predict`` of at most this many events in all, or a ``/v1/score`` of at most this many sequence
#: events x campaigns, runs on the event loop (sub-millisecond work: a thread hop would cost more); larger
#: requests run in the thread pool so that the loop keeps answering.
INLINE_MAX_EVENTS = 4096
INLINE_MAX_SCORE_WORK = 200_000
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BODY_KEY = "fleet.body"
#: Where ``/docs`` (Swagger UI) loads its JavaScript and CSS from: this app (the ``swagger-ui-bundle`` package).
DOCS_STATIC = "/docs/static"
#: Longest ``detail`` of an error body.
MAX_DETAIL_CHARS = 1000
#: Where a path or URI was in an error text, a client reads this.
HIDDEN_PATH = "<path>"
# URIs (scheme://...) and absolute local paths (two segments or more) inside an error text.
_LOCATION_RE = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"()<>,;]*"
                          r"|(?<![\w./~-])/(?:[^\s/'\"()<>,;:]+/)+[^\s/'\"()<>,;:]*")
_ADMIN_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # visible ASCII: it travels in a header


# ----------------------------------------------------------------------------- bodies (the contract)

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class SequenceIn(BaseModel):
    """One event sequence: ``event_types`` (length T) and flat row-major ``features`` (T * num_features)."""

    model_config = ConfigDict(strict=True)
    event_types: list[StrictInt]
    features: list[FiniteFloat]


class PredictRequest(BaseModel):
    """``POST /v1/predict``: several sequences scored by one campaign's head."""

    model_config = ConfigDict(strict=True)
    campaign_id: str
    sequences: list[SequenceIn]


class BatchRow(SequenceIn):
    """One row of ``POST /v1/predict/batch``: a sequence and the campaign that scores it."""

    campaign_id: str


class BatchRequest(BaseModel):
    """``POST /v1/predict/batch``: rows mixing campaigns."""

    model_config = ConfigDict(strict=True)
    rows: list[BatchRow]


class ScoreRequest(BaseModel):
    """``POST /v1/score``: one sequence scored by many campaigns' heads (one backbone pass)."""

    model_config = ConfigDict(strict=True)
    sequence: SequenceIn
    campaign_ids: list[str] | None = Field(default=None, description="campaigns to score (duplicates scored "
                                           "once); omitted or null: every campaign of the version")
    top_k: StrictInt | None = Field(default=None, ge=1, description="return only the k highest probabilities, "
                                    "best first; omitted or null: every scored campaign, in request order")


class ScoreResponse(BaseModel):
    """``POST /v1/score`` 200: the scored campaigns, their probabilities and fallback flags (aligned), and the
    requested ids the version does not hold."""

    version: str
    campaign_ids: list[str] = Field(description="scored campaigns: with top_k the best k, highest first; else in "
                                                "request order (version order when none were named)")
    probabilities: list[float]
    fallback: list[bool] = Field(description="per scored campaign: true when its head did not pass its quality "
                                             "gate; the probability is still returned")
    unknown: list[str] = Field(description="requested ids that are not in the served version (not scored)")


class PredictResponse(BaseModel):
    """``POST /v1/predict`` 200: probabilities in order, and the quality-gate verdict of the head."""

    campaign_id: str
    version: str
    probabilities: list[float]
    status: str = Field(description="the head's status: ok, capacity, fallback, ... (fleet.formats.codec.head_passed)")
    fallback: bool = Field(description="true when the head did not pass its quality gate (status fallback or "
                                       "gate_failed); the probabilities are still returned")


class BatchResponse(BaseModel):
    """``POST /v1/predict/batch`` 200: probabilities in row order, and per row whether its head is a fallback."""

    version: str
    probabilities: list[float]
    fallback: list[bool] = Field(description="per row, in row order: true when that row's head did not pass "
                                             "its quality gate; the probability is still returned")


class CampaignResponse(BaseModel):
    """``GET /v1/campaigns/{id}`` 200: a head's metadata (:func:`fleet.serve.serving.head_metadata`). Also the
    nullable agreement / calibration floats of ``fleet.compression.metrics.CALIBRATION_KEYS`` (kl, brier_vs_teacher, ...)."""

    model_config = ConfigDict(extra="allow")
    campaign_id: str
    version: str
    bits: int
    group_size: int
    shape: list[int]
    num_params: int
    num_stored: int
    pruned: bool
    bytes: int
    status: str
    passed: bool = Field(description="false when the head did not pass its quality gate (status fallback or "
                                     "gate_failed)")
    teacher_auc: float | None
    student_auc: float | None
    mean_abs_diff: float | None
    agreement: float | None
    n_train: int | None
    n_holdout: int | None
    teacher_sha256: str
    data_fingerprint: str


class ErrorResponse(BaseModel):
    """Every error: a stable ``code``, a readable ``detail``, and for body errors the failing ``errors``."""

    code: str
    detail: str
    errors: list[dict] | None = None


# ----------------------------------------------------------------------------- the model holder


class ReloadUnavailable(RuntimeError):
    """The holder has no reload callable."""


class ModelHolder:
    """Holds the served :class:`FleetModel`; :meth:`swap` replaces it atomically.

    Args:
        model: the model served first.
        reload: optional ``reload(current) -> FleetModel | None`` (a new model, or None when nothing
            changed), e.g. :func:`fleet.serve.serving.alias_reloader`; used by ``POST /admin/reload`` and
            by the poller.
        poll_seconds: when set (and ``reload`` given), a background thread calls :meth:`reload`
            every ``poll_seconds`` while the app runs (:meth:`start` / :meth:`stop`).
    """

    def __init__(self, model: FleetModel, *, reload: Callable[[FleetModel], FleetModel | None] | None = None,
                 poll_seconds: float | None = None):
        if poll_seconds is not None and poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}")
        self._model = model
        self._reload = reload
        self.poll_seconds = poll_seconds
        self._swap_lock = threading.Lock()
        self._reload_lock = threading.Lock()  # one reload at a time (admin and poller)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.swaps = 0
        self.reload_errors = 0
        self.last_reload_error: str | None = None
        self._retired = {"hits": 0, "misses": 0}  # cache counters of models swapped out

    def get(self) -> FleetModel:
        """The current model (take it once per request)."""
        return self._model

    def swap(self, new: FleetModel) -> FleetModel:
        """Serve ``new`` from now on; return the old model (requests holding it finish on it)."""
        if not isinstance(new, FleetModel):
            raise TypeError(f"swap needs a FleetModel, got {type(new).__name__}")
        with self._swap_lock:
            old, self._model = self._model, new
            info = old.cache_info()
            self._retired["hits"] += info["hits"]
            self._retired["misses"] += info["misses"]
            self.swaps += 1
        log.info("serving fleet version %s (was %s)", new.version_id, old.version_id)
        return old

    @property
    def can_reload(self) -> bool:
        return self._reload is not None

    def reload(self) -> bool:
        """Call the reload callable; swap and return True when it yields another version."""
        if self._reload is None:
            raise ReloadUnavailable("this server has no reload source (serve a models:/ URI to enable it)")
        with self._reload_lock:
            current = self.get()
            try:
                new = self._reload(current)
            except Exception as exc:
                self.reload_errors += 1
                self.last_reload_error = f"{type(exc).__name__}: {public_detail(exc)}"  # shown by /healthz
                raise
            self.last_reload_error = None
            if new is None or new is current or new.version_id == current.version_id:
                return False
            self.swap(new)
            return True

    def cache_totals(self) -> dict:
        info = self.get().cache_info()
        return {"hits": self._retired["hits"] + info["hits"], "misses": self._retired["misses"] + info["misses"],
                "size": info["size"], "capacity": info["capacity"]}

    def start(self) -> None:
        """Start the poller (no-op without ``poll_seconds`` or reload callable, or when running)."""
        if self._reload is None or self.poll_seconds is None or (self._thread and self._thread.is_alive()):
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="fleet-model-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.reload()
            except Exception as exc:  # noqa: BLE001 - keep serving the current version
                log.warning("model poll failed, still serving %s: %s", self.get().version_id, scrub(str(exc)))


# ----------------------------------------------------------------------------- metrics


_ENDPOINTS = {
    "/v1/predict": "/v1/predict",
    "/v1/predict/batch": "/v1/predict/batch",
    "/v1/score": "/v1/score",
    "/healthz": "/healthz",
    "/metrics": "/metrics",
    "/admin/reload": "/admin/reload",
}


def _endpoint_label(path: str) -> str:
    label = _ENDPOINTS.get(path)
    if label is not None:
        return label
    if path.startswith("/v1/campaigns/"):
        return "/v1/campaigns/{id}"  # never the id itself: labels must stay few
    return "other"


class _Metrics:
    """The app's Prometheus metrics (``prometheus_client``) in a registry of its own, never the global one (two
    apps in one process count apart): request counts and latencies by endpoint, sequences and heads scored, the
    served model's gauges (read from the :class:`ModelHolder` at each scrape), and prometheus_client's process,
    platform and garbage-collector metrics."""

    def __init__(self, holder: ModelHolder):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("fleet_http_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=self.registry)
        self.duration = Histogram("fleet_http_request_duration_seconds", "Time from request start to response end.",
                                  ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.sequences = Counter("fleet_predicted_sequences", "Sequences scored.", registry=self.registry)
        self.scored_campaigns = Counter("fleet_scored_campaigns", "Campaign heads evaluated by /v1/score.",
                                        registry=self.registry)
        self.registry.register(_ModelCollector(holder))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.duration.labels(endpoint=endpoint).observe(seconds)

    def add_sequences(self, n: int) -> None:
        self.sequences.inc(n)

    def add_scored(self, sequences: int, campaigns: int) -> None:
        self.sequences.inc(sequences)
        self.scored_campaigns.inc(campaigns)

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of every metric."""
        return generate_latest(self.registry)


class _ModelCollector(Collector):
    """The served model's metrics, read from the holder when scraped: head cache, version, swaps, reload errors."""

    def __init__(self, holder: ModelHolder):
        self.holder = holder

    def collect(self):
        holder = self.holder
        model = holder.get()
        cache = holder.cache_totals()
        yield CounterMetricFamily("fleet_head_cache_hits", "Head lookups served from memory.", value=cache["hits"])
        yield CounterMetricFamily("fleet_head_cache_misses", "Head lookups that read a row group.",
                                  value=cache["misses"])
        yield GaugeMetricFamily("fleet_head_cache_size", "Heads held dequantized in memory.", value=cache["size"])
        yield GaugeMetricFamily("fleet_head_cache_capacity", "Bound of the head cache.", value=cache["capacity"])
        info = GaugeMetricFamily("fleet_model_info", "The fleet version being served (value 1).",
                                 labels=["version", "fleet"])
        info.add_metric([str(model.version_id), str(model.manifest.get("fleet") or "")], 1)
        yield info
        yield GaugeMetricFamily("fleet_model_campaigns", "Campaigns in the served version.", value=model.num_campaigns)
        yield CounterMetricFamily("fleet_model_swaps", "Model versions swapped in since start.", value=holder.swaps)
        yield CounterMetricFamily("fleet_model_reload_errors", "Failed reloads (the old version kept serving).",
                                  value=holder.reload_errors)


# ----------------------------------------------------------------------------- ASGI gate


class _Gate:
    """Pure ASGI middleware: bounds request bodies (Content-Length and streamed bytes) and records
    metrics. The body is read here once and handed to the endpoint through the scope."""

    def __init__(self, app, metrics: _Metrics, max_body_bytes: int):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body, problem = await self._read_body(scope, receive)
                if problem is not None:
                    await _send_error(send_status, *problem)
                    return
                scope[_BODY_KEY] = body
                receive = _replay(body, receive)
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe(_endpoint_label(scope.get("path", "")), status[0], time.perf_counter() - started)

    async def _read_body(self, scope, receive) -> tuple[bytes, tuple | None]:
        limit = self.max_body_bytes
        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return b"", (400, "bad_request", "Content-Length is not an integer")
        too_large = (413, "payload_too_large", f"request body exceeds {limit} bytes")
        if declared is not None and declared > limit:
            await _drain(receive)
            return b"", too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", (400, "bad_request", "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                if message.get("more_body", False):
                    await _drain(receive)
                return b"", too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


async def _drain(receive) -> None:
    drained = 0
    while drained <= DRAIN_LIMIT_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _replay(body: bytes, receive):
    done = False

    async def replay():
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for the disconnect

    return replay


async def _send_error(send, status: int, code: str, detail: str) -> None:
    payload = _dumps({"code": code, "detail": detail})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


# ----------------------------------------------------------------------------- responses


def _dumps(obj: Any) -> bytes:
    """Compact JSON (orjson; numpy arrays as lists). NaN and inf become null, as :func:`fleet.storage.store.json_safe`
    makes them: they never reach a response."""
    try:
        return orjson.dumps(obj, default=_array_list, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:  # odd types (orjson.JSONEncodeError is a TypeError)
        return orjson.dumps(json_safe(obj))


def _array_list(obj: Any) -> list:
    """orjson's fallback for what it does not serialize itself: a numpy array that is not C-contiguous."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _json(obj: Any, status: int = 200) -> Response:
    return Response(_dumps(obj), status_code=status, media_type="application/json")


def public_detail(error: BaseException | str) -> str:
    """What a client may read of an error: for a :class:`~fleet.core.errors.FleetError` its campaign and
    reason (with the row), never its path; any store path or URI inside is replaced by ``<path>`` and
    credentials by ``***`` (:func:`fleet.core.redact.scrub`); at most :data:`MAX_DETAIL_CHARS` characters.
    Every error body's ``detail`` goes through it."""
    if isinstance(error, FleetError):
        campaign = [] if error.campaign_id is None else [f"campaign {error.campaign_id!r}"]
        text = ": ".join([*campaign, error.reason])
    else:
        text = str(error)
    return _LOCATION_RE.sub(HIDDEN_PATH, scrub(text))[:MAX_DETAIL_CHARS]


def _log_text(exc: BaseException) -> str:
    """``exc`` with its traceback for the log, credentials scrubbed (the log keeps paths, not secrets)."""
    return scrub("".join(traceback.format_exception(exc)))


def check_admin_token(token: str) -> str:
    """``token`` when it can be an admin token (visible ASCII, no whitespace); else ValueError (never
    quoting the token)."""
    if not isinstance(token, str) or not _ADMIN_TOKEN_RE.fullmatch(token):
        raise ValueError("the admin token must be non-empty visible ASCII without whitespace")
    return token


def _admin_guard(admin_token: str | None) -> Callable[[Request], None]:
    """The dependency of every ``/admin/*`` route: 403 ``admin_disabled`` without a configured token,
    401 ``unauthorized`` unless ``Authorization: Bearer <token>`` (compared in constant time)."""
    expected = None if admin_token is None else f"Bearer {check_admin_token(admin_token)}".encode()

    def guard(request: Request) -> None:
        if expected is None:
            raise _RequestError(403, "admin_disabled", "admin endpoints are disabled: start fleet serve with "
                                                       "$FLEET_ADMIN_TOKEN or --admin-token-file to enable them")
        given = request.headers.get("authorization", "").encode("latin-1")  # the header's bytes (ASGI: latin-1)
        if not hmac.compare_digest(given, expected):
            raise _RequestError(401, "unauthorized", "admin endpoints need Authorization: Bearer <token>")

    return guard


def _error(status: int, code: str, detail: str, errors: list | None = None) -> Response:
    body: dict[str, Any] = {"code": code, "detail": public_detail(detail)}
    if errors is not None:
        body["errors"] = errors
    return _json(body, status)


class _RequestError(Exception):
    def __init__(self, status: int, code: str, detail: str, errors: list | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.errors = status, code, detail, errors


def _validation_errors(exc: ValidationError | RequestValidationError) -> list[dict]:
    """Locations and messages only: never echo the input (it may hold NaN or megabytes)."""
    raw = exc.errors(include_input=False, include_url=False) if isinstance(exc, ValidationError) else exc.errors()
    out = []
    for err in raw[:20]:
        loc = [p if isinstance(p, (int, str)) else str(p) for p in err.get("loc", ())]
        out.append({"loc": loc, "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))})
    return out


def _parse(model: type[BaseModel], body: bytes) -> BaseModel:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        detail = f"body does not match {model.__name__}"
        raise _RequestError(422, "invalid_body", detail, _validation_errors(exc)) from None


def _body(request: Request) -> bytes:
    return request.scope.get(_BODY_KEY, b"")


def _sequence_lists(seq: Any) -> tuple[list, list] | None:
    """``(event_types, features)`` of a parsed sequence object when both are lists of what the models accept
    (ints; ints or floats: orjson yields no NaN or inf), else None."""
    if type(seq) is not dict:
        return None
    types, feats = seq.get("event_types"), seq.get("features")
    if type(types) is not list or type(feats) is not list:
        return None
    if (types and not set(map(type, types)) <= _INT) or (feats and not set(map(type, feats)) <= _NUMBER):
        return None  # a bool, a string, a float event type, a big int orjson made a float, ...
    return types, feats


_INT = frozenset({int})
_NUMBER = frozenset({int, float})


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:  # also NaN, Infinity and 1e999: the models' parser names them
        return None


def _fast_predict_body(body: bytes) -> tuple[str, list, list] | None:
    """``(campaign_id, event_types columns, features columns)`` of a ``PredictRequest`` body in its plain shape
    (what :class:`PredictRequest` accepts, checked without building models), or None: then pydantic parses it
    and names what is wrong. Values are checked by the model (:meth:`fleet.serve.serving.FleetModel.predict_with_status`)."""
    obj = _loads(body)
    if type(obj) is not dict or type(obj.get("campaign_id")) is not str or type(obj.get("sequences")) is not list:
        return None
    types, feats = [], []
    for seq in obj["sequences"]:
        columns = _sequence_lists(seq)
        if columns is None:
            return None
        types.append(columns[0])
        feats.append(columns[1])
    return obj["campaign_id"], types, feats


def _fast_score_body(body: bytes) -> tuple[dict, list[str] | None, int | None] | None:
    """``(sequence, campaign_ids, top_k)`` of a ``ScoreRequest`` body in its plain shape, or None (pydantic then
    parses it), as :func:`_fast_predict_body`."""
    obj = _loads(body)
    if type(obj) is not dict:
        return None
    columns = _sequence_lists(obj.get("sequence"))
    ids, top_k = obj.get("campaign_ids"), obj.get("top_k")
    if columns is None or (ids is not None and (type(ids) is not list or (ids and set(map(type, ids)) != {str}))):
        return None
    if top_k is not None and (type(top_k) is not int or top_k < 1):
        return None
    return {"event_types": columns[0], "features": columns[1]}, ids, top_k


# ----------------------------------------------------------------------------- the app


def create_app(
    model_provider: ModelHolder | FleetModel,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_sequences: int = DEFAULT_MAX_SEQUENCES,
    admin_token: str | None = None,
    max_score_campaigns: int = DEFAULT_MAX_SCORE_CAMPAIGNS,
) -> FastAPI:
    """The HTTP app. ``model_provider`` is a :class:`ModelHolder` (or a model, wrapped in one).

    ``admin_token``: without it every ``/admin/*`` route answers 403 ``admin_disabled``; with it they
    require ``Authorization: Bearer <token>`` (:func:`check_admin_token` says which tokens are valid).
    ``max_score_campaigns``: most campaigns a ``POST /v1/score`` may name or get back (413 beyond).
    """
    holder = model_provider if isinstance(model_provider, ModelHolder) else ModelHolder(model_provider)
    if max_body_bytes < 1 or max_sequences < 1 or max_score_campaigns < 1:
        raise ValueError("max_body_bytes, max_sequences and max_score_campaigns must be >= 1")
    metrics = _Metrics(holder)
    admin = APIRouter(prefix="/admin", dependencies=[Depends(_admin_guard(admin_token))])

    @asynccontextmanager
    async def lifespan(app):
        holder.start()  # the poller runs while the app does
        try:
            yield
        finally:
            holder.stop()

    app = FastAPI(title="fleet", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Probabilities of event sequences per campaign from a fleet version.")
    app.state.holder = holder
    app.state.metrics = metrics

    def too_many(n: int, what: str) -> None:
        if n > max_sequences:
            detail = f"{n} {what} exceed the limit of {max_sequences} per request"
            raise _RequestError(413, "too_many_sequences", detail)

    @app.post("/v1/predict", response_model=None, openapi_extra=_body_spec("PredictRequest"),
              responses={200: {"model": PredictResponse}, 404: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
                         422: {"model": ErrorResponse}})
    async def predict(request: Request) -> Response:
        """Probabilities of ``sequences`` under ``campaign_id``'s head, in order."""
        model = holder.get()  # once: a swap never changes the version under this request
        body = _body(request)
        parsed = _fast_predict_body(body)
        if parsed is None:  # not the plain shape: the model names what is wrong (or accepts it)
            req = _parse(PredictRequest, body)
            parsed = (req.campaign_id, [s.event_types for s in req.sequences], [s.features for s in req.sequences])
        campaign_id, types, feats = parsed
        too_many(len(types), "sequences")
        if sum(len(t) for t in types) <= INLINE_MAX_EVENTS:
            pred = model.predict_with_status(campaign_id, types, feats)
        else:
            pred = await run_in_threadpool(model.predict_with_status, campaign_id, types, feats)
        metrics.add_sequences(len(pred.probabilities))
        status = next(iter(pred.statuses.values()))  # the one campaign's head
        return _json({"campaign_id": campaign_id, "version": model.version_id, "probabilities": pred.probabilities,
                      "status": status, "fallback": not head_passed(status)})

    @app.post("/v1/predict/batch", response_model=None, openapi_extra=_body_spec("BatchRequest"),
              responses={200: {"model": BatchResponse}, 404: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
                         422: {"model": ErrorResponse}})
    def predict_batch(request: Request) -> Response:
        """Probabilities of rows mixing campaigns, in row order (one backbone pass for all)."""
        model = holder.get()
        req = _parse(BatchRequest, _body(request))
        too_many(len(req.rows), "rows")
        rows = req.rows
        pred = model.predict_with_status([r.campaign_id for r in rows], [r.event_types for r in rows],
                                         [r.features for r in rows])
        metrics.add_sequences(len(pred.probabilities))
        return _json({"version": model.version_id, "probabilities": pred.probabilities.tolist(),
                      "fallback": pred.fallback.tolist()})

    @app.post("/v1/score", response_model=None, openapi_extra=_body_spec("ScoreRequest"),
              responses={200: {"model": ScoreResponse}, 413: {"model": ErrorResponse},
                         422: {"model": ErrorResponse}})
    async def score(request: Request) -> Response:
        """One sequence against many campaigns: probabilities of ``sequence`` under each of ``campaign_ids``
        (every campaign when omitted), the backbone run once; ``top_k`` keeps the best k. Ids not in the
        version are listed in ``unknown`` (not an error)."""
        model = holder.get()
        body = _body(request)
        parsed = _fast_score_body(body)
        if parsed is None:
            req = _parse(ScoreRequest, body)
            seq = {"event_types": req.sequence.event_types, "features": req.sequence.features}
            parsed = (seq, req.campaign_ids, req.top_k)
        seq, campaign_ids, top_k = parsed
        limit = max_score_campaigns
        if campaign_ids is not None and len(campaign_ids) > limit:
            raise _RequestError(413, "too_many_campaigns",
                                f"{len(campaign_ids)} campaign_ids exceed the limit of {limit} per request")
        if top_k is not None and top_k > limit:
            raise _RequestError(413, "too_many_campaigns", f"top_k {top_k} exceeds the limit of {limit}")
        if campaign_ids is None and top_k is None and model.num_campaigns > limit:
            raise _RequestError(413, "too_many_campaigns",
                                f"scoring every campaign returns {model.num_campaigns} scores, above the limit of "
                                f"{limit}: name campaign_ids or pass top_k")
        work = len(seq["event_types"]) * (model.num_campaigns if campaign_ids is None else len(campaign_ids))
        if work <= INLINE_MAX_SCORE_WORK:
            res = model.score_campaigns(seq, campaign_ids, top_k=top_k)
        else:
            res = await run_in_threadpool(model.score_campaigns, seq, campaign_ids, top_k)
        metrics.add_scored(1, len(res.ids))
        return _json({"version": model.version_id, "campaign_ids": res.ids, "probabilities": res.probabilities,
                      "fallback": res.fallback, "unknown": res.unknown})

    @app.get("/v1/campaigns/{campaign_id}", response_model=None,
             responses={200: {"model": CampaignResponse}, 404: {"model": ErrorResponse},
                        422: {"model": ErrorResponse}})
    def campaign(campaign_id: str) -> Response:
        """Metadata of a campaign's head in the served version (bits, status, passed, fidelity, sizes)."""
        return _json(holder.get().metadata(campaign_id))

    @app.get("/healthz", response_model=None)
    def healthz() -> Response:
        """Liveness and the version being served."""
        model = holder.get()
        return _json({"status": "ok", "version": model.version_id, "fleet": model.manifest.get("fleet"),
                      "campaigns": model.num_campaigns, "last_reload_error": holder.last_reload_error})

    @app.get("/metrics", response_model=None)
    def prometheus() -> Response:
        """Prometheus text exposition."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    @admin.post("/reload", response_model=None, responses={401: {"model": ErrorResponse},
                                                         403: {"model": ErrorResponse},
                                                         409: {"model": ErrorResponse},
                                                         503: {"model": ErrorResponse}})
    def reload() -> Response:
        """Re-resolve the model source now; swap when it names another version."""
        previous = holder.get().version_id
        try:
            changed = holder.reload()
        except ReloadUnavailable as exc:
            raise _RequestError(409, "reload_unavailable", str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the old version keeps serving; the log has the traceback
            log.error("reload failed, still serving %s:\n%s", previous, _log_text(exc))
            raise _RequestError(503, "reload_failed",
                                f"reload failed, still serving {previous}: {public_detail(exc)}") from None
        return _json({"changed": changed, "previous": previous, "version": holder.get().version_id})

    app.include_router(admin)
    _install_docs(app)
    _install_handlers(app)
    _install_openapi(app)
    app.add_middleware(_Gate, metrics=metrics, max_body_bytes=max_body_bytes)
    return app


def _install_docs(app: FastAPI) -> None:
    """``GET /docs``: Swagger UI over ``/openapi.json`` from assets served by this app (``/docs/static``, the
    ``swagger-ui-bundle`` package), so the page works without internet access; no request leaves for another
    host (``validatorUrl`` off)."""
    app.mount(DOCS_STATIC, StaticFiles(directory=str(swagger_ui_path)), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} API",
                                   swagger_js_url=f"{DOCS_STATIC}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_STATIC}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_STATIC}/favicon-32x32.png",
                                   oauth2_redirect_url=None, swagger_ui_parameters={"validatorUrl": None})


def _body_spec(model_name: str) -> dict:
    schema = {"$ref": f"#/components/schemas/{model_name}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _install_openapi(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (PredictRequest, BatchRequest, ScoreRequest):
                spec = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(spec.pop("$defs", {}))
                components[model.__name__] = spec
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(_RequestError)
    async def request_error(request, exc: _RequestError):
        return _error(exc.status, exc.code, exc.detail, exc.errors)

    @app.exception_handler(UnknownCampaignError)
    async def unknown(request, exc):
        return _error(404, "unknown_campaign", public_detail(exc))

    @app.exception_handler(InvalidInputError)
    async def invalid(request, exc):
        return _error(422, "invalid_input", public_detail(exc))

    @app.exception_handler(InvalidCampaignIdError)
    async def invalid_id(request, exc):
        return _error(422, "invalid_input", public_detail(exc))

    @app.exception_handler(RequestValidationError)
    async def request_validation(request, exc):
        return _error(422, "invalid_request", "request does not match the endpoint", _validation_errors(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(StoreError)
    async def store_error(request, exc):  # a missing, unreadable or corrupt stored file: 503, no path in the body
        log.error("store error on %s: %s", request.url.path, scrub(str(exc)))
        return _error(503, "store_unavailable", public_detail(exc))

    @app.exception_handler(FleetError)
    async def fleet_error(request, exc):  # storage or registry trouble: not the client's input
        log.error("fleet error: %s", exc)
        return _error(503, "unavailable", public_detail(exc))

    @app.exception_handler(ValueError)
    async def value_error(request, exc):  # an input problem that slipped past validation
        log.warning("unexpected ValueError on %s: %s", request.url.path, scrub(str(exc)))
        return _error(422, "invalid_input", public_detail(exc))

    @app.exception_handler(Exception)
    async def internal(request, exc):
        log.error("internal error on %s:\n%s", request.url.path, _log_text(exc))
        return _error(500, "internal", "internal error")


def app_from_uri(
    model_uri: str,
    *,
    tracking_uri: str | None = None,
    storage_options: dict | None = None,
    cache_size: int | None = None,
    preload: bool = False,
    poll_seconds: float | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_sequences: int = DEFAULT_MAX_SEQUENCES,
    max_sequence_length: int | None = None,
    num_threads: int | None = None,
    admin_token: str | None = None,
    verify: bool = True,
    heads: str | None = None,
    max_score_campaigns: int = DEFAULT_MAX_SCORE_CAMPAIGNS,
    backend: str | None = None,
) -> FastAPI:
    """Load ``model_uri`` (``models:/...`` or a version URI) and build the app; a ``models:/`` URI
    can be re-resolved by ``POST /admin/reload`` and by the poller (``poll_seconds``). ``heads``:
    :meth:`FleetModel.open`'s head mode, ``backend`` its backbone backend (None: their defaults). Picklable through ``functools.partial``
    (Ray Serve replicas call it)."""
    from fleet.serve.serving import alias_reloader

    open_kw: dict[str, Any] = {"storage_options": storage_options, "preload": preload, "verify": verify,
                               "heads": heads, "backend": backend}
    if cache_size is not None:
        open_kw["cache_size"] = cache_size
    if max_sequence_length is not None:
        open_kw["max_sequence_length"] = max_sequence_length
    if num_threads is not None:
        open_kw["num_threads"] = num_threads
    model = FleetModel.load(model_uri, tracking_uri, **open_kw)
    open_kw.pop("num_threads", None)
    holder = ModelHolder(model, reload=alias_reloader(model_uri, tracking_uri, **open_kw), poll_seconds=poll_seconds)
    return create_app(holder, max_body_bytes=max_body_bytes, max_sequences=max_sequences, admin_token=admin_token,
                      max_score_campaigns=max_score_campaigns)


__all__ = [
    "BatchRequest",
    "BatchResponse",
    "CampaignResponse",
    "ErrorResponse",
    "ModelHolder",
    "PredictRequest",
    "PredictResponse",
    "ScoreRequest",
    "ScoreResponse",
    "SequenceIn",
    "app_from_uri",
    "check_admin_token",
    "create_app",
    "public_detail",
]
