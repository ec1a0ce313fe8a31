"""MLflow pyfunc flavour of a fleet version (``loader_module="fleet.serve.pyfunc"``).

The logged model's data is a directory holding ``fleet_model.json`` (written by
:func:`fleet.storage.registry.register_version`, or :func:`write_config`)::

    {"format": "fleet-pyfunc/1",
     "manifest_uri": "s3://bucket/fleet/adfleet/versions/<id>/manifest.json", "version_id": "<id>",
     "manifest_sha256": "<hex>",
     "storage_options": {...non-secret fsspec options...}, "storage_options_env": "FLEET_STORAGE_OPTIONS"}

(``format``, ``manifest_sha256`` (when present, a manifest with another sha256 is refused),
``storage_options``, ``storage_options_env`` are optional; so are ``cache_size``,
``preload``, ``max_sequence_length``, ``heads``, ``backend``). Heads stay in Parquet and are read through the manifest URI;
credentials come from the environment variable ``storage_options_env`` (JSON, merged over the saved
non-secret options) at load time, never from the artifact. A store that has moved is found through
``$FLEET_STORE_ROOT`` (:func:`fleet.storage.store.relocated`: the saved manifest URI's ``<fleet>/versions/<id>/
manifest.json`` under that root; ``manifest_sha256`` still pins the version).

``predict`` scores a DataFrame with the columns of the events format
(``campaign_id``, ``event_types``, ``features``) through :meth:`FleetModel.predict_with_status`, the
same path as ``FleetModel.predict_batch`` and the HTTP service. It returns ``float64[N]``; with
``params={"with_status": True}`` a DataFrame with columns ``probability``, ``fallback`` (True when the
row's head did not pass its quality gate, :func:`fleet.formats.codec.head_passed`) and ``status`` instead.
MLflow hands ``params`` to a logged model only when its signature declares them: log it with
``signature=model_signature()``.

Ranking (the request of ``POST /v1/score``): a DataFrame with a ``campaign_ids`` column (a list of ids per
row, or null for every campaign) and no ``campaign_id`` column scores each row's sequence against its
campaigns (:meth:`FleetModel.score_campaigns`; rows sharing one list in one batch). The output is a DataFrame,
one row per input row, with the list columns ``campaign_ids``, ``probabilities``, ``fallback``, ``unknown``
(as ``POST /v1/score`` answers); ``params={"top_k": k}`` keeps the k best, highest first.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from fleet.core.constants import ENV_STORAGE_OPTIONS, PYFUNC_CONFIG_FILE, PYFUNC_FORMAT
from fleet.core.errors import StoreError, UnknownCampaignError
from fleet.formats.codec import check_format
from fleet.serve.serving import FleetModel, InvalidInputError
from fleet.storage.store import relocated, storage_options_from_env

COLUMNS = ("campaign_id", "event_types", "features")
_OPEN_KEYS = ("cache_size", "preload", "max_sequence_length", "heads", "backend")
#: ``predict`` params: ``with_status`` (bool, default False) returns the DataFrame of :data:`STATUS_COLUMNS`.
WITH_STATUS = "with_status"
STATUS_COLUMNS = ("probability", "fallback", "status")
#: The ranking request: this column (a list of campaign ids per row, null = every campaign) instead of ``campaign_id``.
CAMPAIGN_IDS = "campaign_ids"
#: ``predict`` param of a ranking request: keep the k highest probabilities per row (integer >= 1, default all).
TOP_K = "top_k"
SCORE_COLUMNS = ("campaign_ids", "probabilities", "fallback", "unknown")


def model_signature():
    """The MLflow signature to log a fleet pyfunc with (``mlflow.pyfunc.log_model(...,
    signature=model_signature())``): no input or output schema, the ``with_status`` boolean
    param (default False) and the ``top_k`` integer param of ranking requests (default None: all).
    Without it MLflow drops ``params`` with a warning, so they have no effect on the loaded model."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec

    return ModelSignature(
        inputs=None,
        outputs=None,
        params=ParamSchema([ParamSpec(WITH_STATUS, "boolean", False), ParamSpec(TOP_K, "long", None)]),
    )


def input_example(campaign_id: str, num_features: int, length: int = 1):
    """The input example a fleet pyfunc is logged with (``mlflow.pyfunc.log_model(..., input_example=...)``):
    one row of the request :meth:`FleetPyfunc.predict` accepts, ``campaign_id`` (a real campaign of the
    version, so the example scores) and a made-up sequence of ``length`` events of type 0 with all
    ``num_features`` features 0.0 (``features`` flat, ``length * num_features`` floats). Nothing else of
    the fleet's data is in it."""
    import pandas as pd

    if not isinstance(campaign_id, str) or not campaign_id:
        raise ValueError(f"campaign_id must be a non-empty string, got {campaign_id!r}")
    if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)) or num_features < 0:
        raise ValueError(f"num_features must be an integer >= 0, got {num_features!r}")
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"length must be an integer >= 1, got {length!r}")
    return pd.DataFrame(
        {
            COLUMNS[0]: [campaign_id],
            COLUMNS[1]: [[0] * int(length)],
            COLUMNS[2]: [[0.0] * (int(length) * int(num_features))],
        },
        columns=list(COLUMNS),
    )


def write_config(directory: str, manifest_uri: str, version_id: str, **open_kw: Any) -> str:
    """Write ``directory/fleet_model.json`` (the pyfunc's ``data_path``); return its path."""
    unknown = sorted(set(open_kw) - set(_OPEN_KEYS))
    if unknown:
        raise ValueError(f"unknown fleet_model.json keys {unknown}; allowed: {list(_OPEN_KEYS)}")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, PYFUNC_CONFIG_FILE)
    with open(path, "w") as f:
        json.dump(
            {"format": PYFUNC_FORMAT, "manifest_uri": manifest_uri, "version_id": version_id, **open_kw},
            f,
            indent=2,
            sort_keys=True,
        )
    return path


class FleetPyfunc:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict(DataFrame) -> float64[N]`` in row order
    (with ``params={"with_status": True}``: a DataFrame ``probability, fallback, status``)."""

    def __init__(self, model: FleetModel):
        self.model = model

    def predict(self, model_input: Any, params: dict | None = None):
        """Probabilities of the rows of ``model_input`` (a DataFrame, or a list of row dicts / a dict
        of columns) with columns ``campaign_id``, ``event_types``, ``features`` (lists or numpy
        arrays per cell): ``float64[N]`` in row order.

        ``params={"with_status": True}`` returns a ``pandas.DataFrame`` in row order instead, with
        columns ``probability`` (float64, the same numbers), ``fallback`` (bool: the row's head did
        not pass its quality gate) and ``status`` (the head's status). Other params are ignored.

        A ranking request (a ``campaign_ids`` column, no ``campaign_id``) returns the DataFrame of
        :data:`SCORE_COLUMNS` instead, one row per input row; ``params={"top_k": k}`` keeps the k best."""
        frame = _frame(model_input)
        if CAMPAIGN_IDS in frame.columns and COLUMNS[0] not in frame.columns:
            return self._rank(frame, (params or {}).get(TOP_K))
        ids, types, feats = _columns(frame)
        with_status = _flag((params or {}).get(WITH_STATUS, False))
        try:
            pred = self.model.predict_with_status(ids, types, feats)
        except (InvalidInputError, UnknownCampaignError) as exc:
            raise _bad_request(str(exc)) from exc
        if not with_status:
            return pred.probabilities
        import pandas as pd

        per_row = [pred.statuses[cid] for cid in ids]  # one id per row (a column)
        return pd.DataFrame(
            {"probability": pred.probabilities, "fallback": pred.fallback, "status": pd.Series(per_row, dtype=object)},
            columns=list(STATUS_COLUMNS),
        )

    def _rank(self, frame, top_k: Any):
        import pandas as pd

        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
            raise _bad_request(f"params.{TOP_K} must be an integer >= 1, got {top_k!r}")
        missing = [c for c in COLUMNS[1:] if c not in frame.columns]
        if missing:
            raise _bad_request(
                f"model input lacks columns {missing}; a ranking request needs {[CAMPAIGN_IDS, *COLUMNS[1:]]}"
            )
        groups: dict[tuple | None, list[int]] = {}
        for i, ids in enumerate(frame[CAMPAIGN_IDS].tolist()):
            if ids is None or (isinstance(ids, float) and np.isnan(ids)):
                key = None
            elif isinstance(ids, (list, tuple, np.ndarray)):
                key = tuple(ids)
            else:
                raise _bad_request(f"row {i}: {CAMPAIGN_IDS} must be a list of campaign ids or null")
            groups.setdefault(key, []).append(i)
        types, feats = frame[COLUMNS[1]].tolist(), frame[COLUMNS[2]].tolist()
        out: list = [None] * len(frame)
        for key, rows in groups.items():
            seqs = [{"event_types": types[i], "features": feats[i]} for i in rows]
            try:
                batch = self.model.score_campaigns_batch(seqs, None if key is None else list(key))
            except (InvalidInputError, UnknownCampaignError) as exc:
                raise _bad_request(str(exc)) from exc
            for b, i in enumerate(rows):
                res = batch.row(b, top_k)
                out[i] = (res.ids, res.probabilities.tolist(), res.fallback.tolist(), res.unknown)
        return pd.DataFrame(out, columns=list(SCORE_COLUMNS))


def _flag(value: Any) -> bool:
    """``with_status`` as a bool: True/False, or the strings ``"true"``/``"false"`` (any case)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _bad_request(f"params.{WITH_STATUS} must be a boolean, got {value!r}")


def _frame(model_input: Any):
    import pandas as pd

    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    elif isinstance(model_input, list):
        model_input = pd.DataFrame.from_records(model_input)
    if not isinstance(model_input, pd.DataFrame):
        raise _bad_request(f"model input must be a pandas DataFrame, got {type(model_input).__name__}")
    return model_input


def _columns(model_input: Any) -> tuple[list, list, list]:
    missing = [c for c in COLUMNS if c not in model_input.columns]
    if missing:
        raise _bad_request(f"model input lacks columns {missing}; needs {list(COLUMNS)}")
    return tuple(model_input[c].tolist() for c in COLUMNS)  # type: ignore[return-value]


def _bad_request(message: str) -> Exception:
    """An MLflow INVALID_PARAMETER_VALUE error (``mlflow models serve`` answers 400, not 500)."""
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
    except ImportError:  # pragma: no cover - mlflow is a dependency
        return InvalidInputError(message)
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _load_pyfunc(data_path: str) -> FleetPyfunc:
    """MLflow ``loader_module`` entry point: ``data_path`` is the logged directory (or the JSON file)."""
    path = os.path.join(data_path, PYFUNC_CONFIG_FILE) if os.path.isdir(data_path) else data_path
    try:
        with open(path) as f:
            config = json.load(f)
        manifest_uri, version_id = relocated(config["manifest_uri"]), config.get("version_id")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StoreError(f"not a fleet pyfunc config ({exc!r})", path=path) from None
    check_format(config.get("format", PYFUNC_FORMAT), PYFUNC_FORMAT, path=path)
    model = FleetModel.open(
        manifest_uri,
        _storage_options(config),
        manifest_sha256=config.get("manifest_sha256"),
        **{k: config[k] for k in _OPEN_KEYS if k in config},
    )
    if version_id is not None and model.version_id != version_id:
        raise StoreError(
            f"{PYFUNC_CONFIG_FILE} names version {version_id!r} but the manifest holds {model.version_id!r}",
            path=manifest_uri,
        )
    return FleetPyfunc(model)


def _storage_options(config: dict) -> dict:
    """Saved non-secret options, with the JSON of ``$<storage_options_env>`` merged over them
    (nested dicts such as ``client_kwargs`` merged one level deep)."""
    saved = config.get("storage_options") or {}
    env_name = config.get("storage_options_env") or ENV_STORAGE_OPTIONS
    secret = storage_options_from_env(env_name) or {}
    merged = dict(saved)
    for key, value in secret.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged  # {} (not None): the environment was consulted already


__all__ = [
    "CAMPAIGN_IDS",
    "SCORE_COLUMNS",
    "STATUS_COLUMNS",
    "TOP_K",
    "WITH_STATUS",
    "FleetPyfunc",
    "input_example",
    "model_signature",
    "write_config",
]
