"""The HTTP contract of ``fleet serve`` (:mod:`fleet.serve.http`): its bodies, their parsing and its error bodies.

The pydantic models of the request and response bodies (they make the OpenAPI schema and name what is wrong
in a 422), the fast parse of the hot endpoints' bodies (:func:`_fast_predict_body`, :func:`_fast_score_body`:
orjson and a minimal check of the shape; a body that does not pass goes through the models), the limits of a
request, the orjson encoding of every response (NaN/inf never reach one), and the error bodies:
``{"code", "detail", "errors"?}``, whose ``detail`` names the campaign, row and reason, never a store path, a
credential or a stack trace (:func:`public_detail`). The contract is documented in ``docs/serving.md``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from fleet.core.errors import FleetError
from fleet.core.redact import scrub
from fleet.storage.store import json_safe

#: Largest request body in bytes (``Content-Length`` and streamed bytes; 413 beyond, see
#: :class:`fleet.serve.http_middleware.BodyLimit`).
DEFAULT_MAX_BODY_BYTES = 1_000_000
#: Most sequences of a ``POST /v1/predict`` (rows of a ``POST /v1/predict/batch``; 413 beyond).
DEFAULT_MAX_SEQUENCES = 1024
#: Most campaigns one ``POST /v1/score`` may name (and most scores it may return: ``top_k``, or every
#: campaign of the version when it names none).
DEFAULT_MAX_SCORE_CAMPAIGNS = 10_000
#: Longest ``detail`` of an error body.
MAX_DETAIL_CHARS = 1000
#: Where a path or URI was in an error text, a client reads this.
HIDDEN_PATH = "<path>"
# URIs (scheme://...) and absolute local paths (two segments or more) inside an error text.
_LOCATION_RE = re.compile(
    r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"()<>,;]*"
    r"|(?<![\w./~-])/(?:[^\s/'\"()<>,;:]+/)+[^\s/'\"()<>,;:]*"
)


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
    campaign_ids: list[str] | None = Field(
        default=None,
        description="campaigns to score (duplicates scored once); omitted or null: every campaign of the version",
    )
    top_k: StrictInt | None = Field(
        default=None,
        ge=1,
        description="return only the k highest probabilities, "
        "best first; omitted or null: every scored campaign, in request order",
    )


class ScoreResponse(BaseModel):
    """``POST /v1/score`` 200: the scored campaigns, their probabilities and fallback flags (aligned), and the
    requested ids the version does not hold."""

    version: str
    campaign_ids: list[str] = Field(
        description="scored campaigns: with top_k the best k, highest first; else in "
        "request order (version order when none were named)"
    )
    probabilities: list[float]
    fallback: list[bool] = Field(
        description="per scored campaign: true when its head did not pass its quality "
        "gate; the probability is still returned"
    )
    unknown: list[str] = Field(description="requested ids that are not in the served version (not scored)")


class PredictResponse(BaseModel):
    """``POST /v1/predict`` 200: probabilities in order, and the quality-gate verdict of the head."""

    campaign_id: str
    version: str
    probabilities: list[float]
    status: str = Field(description="the head's status: ok, capacity, fallback, ... (fleet.formats.codec.head_passed)")
    fallback: bool = Field(
        description="true when the head did not pass its quality gate (status fallback or "
        "gate_failed); the probabilities are still returned"
    )


class BatchResponse(BaseModel):
    """``POST /v1/predict/batch`` 200: probabilities in row order, and per row whether its head is a fallback."""

    version: str
    probabilities: list[float]
    fallback: list[bool] = Field(
        description="per row, in row order: true when that row's head did not pass "
        "its quality gate; the probability is still returned"
    )


class CampaignResponse(BaseModel):
    """``GET /v1/campaigns/{id}`` 200: a head's metadata (:func:`fleet.serve.serving.head_metadata`). Also the
    nullable agreement / calibration floats of ``fleet.compression.metrics.CALIBRATION_KEYS`` (kl,
    brier_vs_teacher, ...)."""

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
    passed: bool = Field(
        description="false when the head did not pass its quality gate (status fallback or gate_failed)"
    )
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


# ----------------------------------------------------------------------------- responses and errors


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
    """A JSON response of ``obj`` (:func:`_dumps`)."""
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


def _error(status: int, code: str, detail: str, errors: list | None = None) -> Response:
    """An error body (:class:`ErrorResponse`); ``detail`` goes through :func:`public_detail`."""
    body: dict[str, Any] = {"code": code, "detail": public_detail(detail)}
    if errors is not None:
        body["errors"] = errors
    return _json(body, status)


class _RequestError(Exception):
    """A refused request: the app's handler answers ``status`` with the error body ``code``, ``detail``, ``errors``."""

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
    """``body`` parsed by ``model``; else a 422 ``invalid_body`` naming the failing fields."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        detail = f"body does not match {model.__name__}"
        raise _RequestError(422, "invalid_body", detail, _validation_errors(exc)) from None


# ----------------------------------------------------------------------------- the fast parse of the hot bodies


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
    and names what is wrong. Values are checked by the model
    (:meth:`fleet.serve.serving.FleetModel.predict_with_status`)."""
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


__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_SCORE_CAMPAIGNS",
    "DEFAULT_MAX_SEQUENCES",
    "HIDDEN_PATH",
    "MAX_DETAIL_CHARS",
    "BatchRequest",
    "BatchResponse",
    "BatchRow",
    "CampaignResponse",
    "ErrorResponse",
    "FiniteFloat",
    "PredictRequest",
    "PredictResponse",
    "ScoreRequest",
    "ScoreResponse",
    "SequenceIn",
    "public_detail",
]
