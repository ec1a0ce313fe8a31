"""The HTTP service: a FastAPI app over a swappable :class:`~fleet.serve.serving.FleetModel`.

``create_app(ModelHolder(model))`` serves ``POST /v1/predict``, ``POST /v1/predict/batch``, ``POST /v1/score``
(one sequence against many campaigns), ``GET /v1/campaigns/{id}``, ``GET /healthz``, ``GET /metrics`` and
``POST /admin/reload``; the bodies, status codes and limits are a contract documented in ``docs/serving.md``.
This module holds the app factory, the routes, the error handlers and the admin guard; its parts live beside it:
the bodies, their parsing and the error bodies in :mod:`fleet.serve.http_schemas`, the served model in
:mod:`fleet.serve.http_holder`, the Prometheus metrics in :mod:`fleet.serve.http_metrics` and the middleware
(the body limit, request metrics) in :mod:`fleet.serve.http_middleware`. What callers import (``__all__``:
:class:`ModelHolder`, the bodies, :func:`public_detail`, ...) stays importable from here.

The hot endpoints (``/v1/predict``, ``/v1/score``) parse their body with orjson and a minimal check of its
shape (:func:`~fleet.serve.http_schemas._fast_predict_body`, :func:`~fleet.serve.http_schemas._fast_score_body`);
a body that does not pass goes through the pydantic models, which name what is wrong (so the 422s and the
OpenAPI schema are the models'). Small requests run on the event loop (no thread hop), larger ones in the thread
pool. Responses are orjson.

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
import traceback
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from fleet.core.constants import ENV_ADMIN_TOKEN
from fleet.core.errors import (
    FleetError,
    InvalidCampaignIdError,
    StoreError,
    UnknownCampaignError,
)
from fleet.core.redact import scrub
from fleet.formats.codec import head_passed
from fleet.serve.http_holder import ModelHolder, ReloadUnavailable
from fleet.serve.http_metrics import CONTENT_TYPE, HttpMetrics
from fleet.serve.http_middleware import BodyLimit, RequestMetrics, _body
from fleet.serve.http_schemas import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_SCORE_CAMPAIGNS,
    DEFAULT_MAX_SEQUENCES,
    BatchRequest,
    BatchResponse,
    CampaignResponse,
    ErrorResponse,
    PredictRequest,
    PredictResponse,
    ScoreRequest,
    ScoreResponse,
    SequenceIn,
    _error,
    _fast_predict_body,
    _fast_score_body,
    _json,
    _parse,
    _RequestError,
    _validation_errors,
    public_detail,
)
from fleet.serve.serving import FleetModel, InvalidInputError

log = logging.getLogger("fleet.serve.http")

#: A ``/v1/predict`` of at most this many events in all, or a ``/v1/score`` of at most this many sequence
#: events x campaigns, runs on the event loop (sub-millisecond work: a thread hop would cost more); larger
#: requests run in the thread pool so that the loop keeps answering.
INLINE_MAX_EVENTS = 4096
INLINE_MAX_SCORE_WORK = 200_000
#: Where ``/docs`` (Swagger UI) loads its JavaScript and CSS from: this app (the ``swagger-ui-bundle`` package).
DOCS_STATIC = "/docs/static"
_ADMIN_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # visible ASCII: it travels in a header


# ----------------------------------------------------------------------------- the admin guard, the log's text


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
            raise _RequestError(
                403,
                "admin_disabled",
                "admin endpoints are disabled: start fleet serve with "
                f"${ENV_ADMIN_TOKEN} or --admin-token-file to enable them",
            )
        given = request.headers.get("authorization", "").encode("latin-1")  # the header's bytes (ASGI: latin-1)
        if not hmac.compare_digest(given, expected):
            raise _RequestError(401, "unauthorized", "admin endpoints need Authorization: Bearer <token>")

    return guard


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
    metrics = HttpMetrics(holder)
    admin = APIRouter(prefix="/admin", dependencies=[Depends(_admin_guard(admin_token))])

    @asynccontextmanager
    async def lifespan(app):
        holder.start()  # the poller runs while the app does
        try:
            yield
        finally:
            holder.stop()

    app = FastAPI(
        title="fleet",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description="Probabilities of event sequences per campaign from a fleet version.",
    )
    app.state.holder = holder
    app.state.metrics = metrics

    def too_many(n: int, what: str) -> None:
        if n > max_sequences:
            detail = f"{n} {what} exceed the limit of {max_sequences} per request"
            raise _RequestError(413, "too_many_sequences", detail)

    @app.post(
        "/v1/predict",
        response_model=None,
        openapi_extra=_body_spec("PredictRequest"),
        responses={
            200: {"model": PredictResponse},
            404: {"model": ErrorResponse},
            413: {"model": ErrorResponse},
            422: {"model": ErrorResponse},
        },
    )
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
        return _json(
            {
                "campaign_id": campaign_id,
                "version": model.version_id,
                "probabilities": pred.probabilities,
                "status": status,
                "fallback": not head_passed(status),
            }
        )

    @app.post(
        "/v1/predict/batch",
        response_model=None,
        openapi_extra=_body_spec("BatchRequest"),
        responses={
            200: {"model": BatchResponse},
            404: {"model": ErrorResponse},
            413: {"model": ErrorResponse},
            422: {"model": ErrorResponse},
        },
    )
    def predict_batch(request: Request) -> Response:
        """Probabilities of rows mixing campaigns, in row order (one backbone pass for all)."""
        model = holder.get()
        req = _parse(BatchRequest, _body(request))
        too_many(len(req.rows), "rows")
        rows = req.rows
        pred = model.predict_with_status(
            [r.campaign_id for r in rows], [r.event_types for r in rows], [r.features for r in rows]
        )
        metrics.add_sequences(len(pred.probabilities))
        return _json(
            {
                "version": model.version_id,
                "probabilities": pred.probabilities.tolist(),
                "fallback": pred.fallback.tolist(),
            }
        )

    @app.post(
        "/v1/score",
        response_model=None,
        openapi_extra=_body_spec("ScoreRequest"),
        responses={200: {"model": ScoreResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
    )
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
            raise _RequestError(
                413, "too_many_campaigns", f"{len(campaign_ids)} campaign_ids exceed the limit of {limit} per request"
            )
        if top_k is not None and top_k > limit:
            raise _RequestError(413, "too_many_campaigns", f"top_k {top_k} exceeds the limit of {limit}")
        if campaign_ids is None and top_k is None and model.num_campaigns > limit:
            raise _RequestError(
                413,
                "too_many_campaigns",
                f"scoring every campaign returns {model.num_campaigns} scores, above the limit of "
                f"{limit}: name campaign_ids or pass top_k",
            )
        work = len(seq["event_types"]) * (model.num_campaigns if campaign_ids is None else len(campaign_ids))
        if work <= INLINE_MAX_SCORE_WORK:
            res = model.score_campaigns(seq, campaign_ids, top_k=top_k)
        else:
            res = await run_in_threadpool(model.score_campaigns, seq, campaign_ids, top_k)
        metrics.add_scored(1, len(res.ids))
        return _json(
            {
                "version": model.version_id,
                "campaign_ids": res.ids,
                "probabilities": res.probabilities,
                "fallback": res.fallback,
                "unknown": res.unknown,
            }
        )

    @app.get(
        "/v1/campaigns/{campaign_id}",
        response_model=None,
        responses={200: {"model": CampaignResponse}, 404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
    )
    def campaign(campaign_id: str) -> Response:
        """Metadata of a campaign's head in the served version (bits, status, passed, fidelity, sizes)."""
        return _json(holder.get().metadata(campaign_id))

    @app.get("/healthz", response_model=None)
    def healthz() -> Response:
        """Liveness and the version being served."""
        model = holder.get()
        return _json(
            {
                "status": "ok",
                "version": model.version_id,
                "fleet": model.manifest.get("fleet"),
                "campaigns": model.num_campaigns,
                "last_reload_error": holder.last_reload_error,
            }
        )

    @app.get("/metrics", response_model=None)
    def prometheus() -> Response:
        """Prometheus text exposition."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @admin.post(
        "/reload",
        response_model=None,
        responses={
            401: {"model": ErrorResponse},
            403: {"model": ErrorResponse},
            409: {"model": ErrorResponse},
            503: {"model": ErrorResponse},
        },
    )
    def reload() -> Response:
        """Re-resolve the model source now; swap when it names another version."""
        previous = holder.get().version_id
        try:
            changed = holder.reload()
        except ReloadUnavailable as exc:
            raise _RequestError(409, "reload_unavailable", str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the old version keeps serving; the log has the traceback
            log.error("reload failed, still serving %s:\n%s", previous, _log_text(exc))
            raise _RequestError(
                503, "reload_failed", f"reload failed, still serving {previous}: {public_detail(exc)}"
            ) from None
        return _json({"changed": changed, "previous": previous, "version": holder.get().version_id})

    app.include_router(admin)
    _install_docs(app)
    _install_handlers(app)
    _install_openapi(app)
    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # added last, so outermost: it times the body's read too
    return app


def _install_docs(app: FastAPI) -> None:
    """``GET /docs``: Swagger UI over ``/openapi.json`` from assets served by this app (``/docs/static``, the
    ``swagger-ui-bundle`` package), so the page works without internet access; no request leaves for another
    host (``validatorUrl`` off)."""
    app.mount(DOCS_STATIC, StaticFiles(directory=str(swagger_ui_path)), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} API",
            swagger_js_url=f"{DOCS_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_STATIC}/favicon-32x32.png",
            oauth2_redirect_url=None,
            swagger_ui_parameters={"validatorUrl": None},
        )


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
    :meth:`FleetModel.open`'s head mode, ``backend`` its backbone backend (None: their defaults). Picklable
    through ``functools.partial`` (Ray Serve replicas call it)."""
    from fleet.serve.serving import alias_reloader

    open_kw: dict[str, Any] = {
        "storage_options": storage_options,
        "preload": preload,
        "verify": verify,
        "heads": heads,
        "backend": backend,
    }
    if cache_size is not None:
        open_kw["cache_size"] = cache_size
    if max_sequence_length is not None:
        open_kw["max_sequence_length"] = max_sequence_length
    if num_threads is not None:
        open_kw["num_threads"] = num_threads
    model = FleetModel.load(model_uri, tracking_uri, **open_kw)
    open_kw.pop("num_threads", None)
    holder = ModelHolder(model, reload=alias_reloader(model_uri, tracking_uri, **open_kw), poll_seconds=poll_seconds)
    return create_app(
        holder,
        max_body_bytes=max_body_bytes,
        max_sequences=max_sequences,
        admin_token=admin_token,
        max_score_campaigns=max_score_campaigns,
    )


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
