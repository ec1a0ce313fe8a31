"""MLflow runs: the run of one ``fleet compress`` and what registration logs into a run.

``fleet compress``'s run spans the compress: :func:`start_compress_run` when it starts, :func:`log_run_metrics`
as each stage ends, :func:`end_compress_run` when it fails; registration
(:func:`fleet.storage.registry.register_version` with ``mlflow_run_id``) logs into it and ends it FINISHED. A run
lives in the experiment ``fleet-<fleet_name>`` (:func:`fleet_experiment`). Params are flattened (``a.b``),
credential-looking keys dropped and values scrubbed (:func:`fleet.core.redact.scrub`); metrics are flattened,
their names sanitised (:func:`sanitize_key`) and non-finite values skipped (:func:`log_params_and_metrics`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fleet.core.redact import is_secret_name, scrub, secret_values
from fleet.storage.promotion_gate import finite_number
from fleet.storage.tracking import (
    check_name,
    not_found,
    registry_access,
    registry_client,
    resolve_tracking_uri,
    sqlite_path,
)

logger = logging.getLogger(__name__)

#: Run tag on a compress run deleted because its version id was registered by another run meanwhile: that
#: model version (``register_version`` with ``mlflow_run_id``).
DUPLICATE_TAG = "fleet.duplicate_of"
#: Run tag listing the params a resumed compress run was asked to log with another value than the one already
#: logged (``--force-config``); MLflow keeps the first value.
PARAMS_CHANGED_TAG = "fleet.params_changed_on_resume"
#: The statuses :func:`end_compress_run` accepts.
END_STATUSES = ("FINISHED", "FAILED", "KILLED")

_PARAM_MAX = 6000  # MLflow's limit on a param value
_KEY_MAX = 250  # MLflow's limit on a metric / param key


def _flatten(d: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``{"a": {"b": 1}}`` -> ``("a.b", 1)``."""
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def sanitize_key(name: Any) -> str:
    """An MLflow-safe metric/param key: ASCII letters, digits and ``_ - . /`` and space; no empty,
    ``.`` or ``..`` path segments; at most 250 characters."""
    cleaned = re.sub(r"[^A-Za-z0-9_\-. /]", "_", str(name))
    segments = [s.strip() for s in cleaned.split("/")]
    key = "/".join(s for s in segments if s and s not in (".", ".."))
    return (key or "_")[:_KEY_MAX]


def _clean_metrics(metrics: dict) -> dict[str, float]:
    """Flatten, keep finite numbers, sanitise names."""
    out: dict[str, float] = {}
    for key, value in _flatten(metrics):
        number = finite_number(value)
        if number is None:
            logger.debug("metric %r not logged: %r is not a finite number", key, value)
            continue
        clean = sanitize_key(key)
        if clean in out:
            logger.warning("metric %r collides with another after sanitising to %r; last one wins", key, clean)
        out[clean] = number
    return out


def _clean_params(params: dict, secrets: set[str]) -> dict[str, str]:
    """Flatten, stringify (JSON for lists), drop secret-looking keys, :func:`fleet.core.redact.scrub` the
    values (``secrets`` and URI credentials become ``***``), truncate to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in _flatten(params):
        if is_secret_name(key.rsplit(".", 1)[-1]):
            logger.warning("param %r not logged: its name looks like a credential", key)
            continue
        text = scrub(value if isinstance(value, str) else json.dumps(value, default=str), secrets)
        if len(text) > _PARAM_MAX:
            text = text[: _PARAM_MAX - 3] + "..."
        out[sanitize_key(key)] = text
    return out


def _log_batches(
    client: MlflowClient, run_id: str, metrics: dict[str, float], params: dict[str, str], step: int = 0
) -> None:
    now_ms = int(datetime.now(timezone.utc).timestamp() * 1000)
    metric_list = [Metric(k, v, now_ms, step) for k, v in metrics.items()]
    param_list = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(metric_list), 1000):
        client.log_batch(run_id, metrics=metric_list[i : i + 1000])
    for i in range(0, len(param_list), 100):
        client.log_batch(run_id, params=param_list[i : i + 100])


def _log_params_once(client: MlflowClient, run_id: str, logged: dict, params: dict[str, str]) -> None:
    """Log the ``params`` not logged yet (MLflow refuses to change one); name the changed ones in the tag
    :data:`PARAMS_CHANGED_TAG`."""
    changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
    if changed:
        logger.warning(
            "MLflow run %s keeps the first value of its param(s) %s (changed on resume)", run_id, ", ".join(changed)
        )
        client.set_tag(run_id, PARAMS_CHANGED_TAG, json.dumps(changed)[:_PARAM_MAX])
    _log_batches(client, run_id, {}, {k: v for k, v in params.items() if k not in logged})


def log_params_and_metrics(
    client: MlflowClient, run_id: str, params: dict, metrics: dict, secrets: set[str], *, resumed: bool = False
) -> None:
    """Log ``params`` (flattened, credential-looking keys dropped, values scrubbed of ``secrets`` and URI
    credentials, truncated to MLflow's limit) and ``metrics`` (flattened, names sanitised, finite values only)
    into the run ``run_id``, as :func:`fleet.storage.registry.register_version` does. ``resumed``: a run that may
    hold some already (the compress's own run): only the params it lacks are logged (a changed one keeps its first
    value and is named in :data:`PARAMS_CHANGED_TAG`), and the metrics whose value differs."""
    clean_metrics = _clean_metrics(metrics)
    if not resumed:
        _log_batches(client, run_id, clean_metrics, _clean_params(params, secrets))
        return
    logged = client.get_run(run_id).data
    _log_params_once(client, run_id, logged.params, _clean_params(params, secrets))
    _log_batches(client, run_id, {k: v for k, v in clean_metrics.items() if logged.metrics.get(k) != v}, {})


def _sqlite_artifact_root(uri: str) -> str | None:
    """Artifacts of a ``sqlite:///path/mlflow.db`` store go next to it (``<dir>/mlartifacts``), not
    into ``./mlruns`` of whatever the working directory is."""
    path = sqlite_path(uri)
    return None if path is None else os.path.join(os.path.dirname(path), "mlartifacts")


def fleet_experiment(client: MlflowClient, uri: str, fleet_name: str) -> str:
    """The id of the experiment ``fleet-<fleet_name>`` of the registry ``uri``, created when missing (its
    artifacts next to a SQLite database: ``<dir>/mlartifacts``); one created meanwhile by a concurrent run is
    used."""
    name = f"fleet-{fleet_name}"
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    root = _sqlite_artifact_root(uri)
    try:
        return client.create_experiment(name, artifact_location=os.path.join(root, name) if root else None)
    except MlflowException as err:  # created meanwhile by a concurrent run
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        logger.debug("experiment %s created concurrently: %s", name, err)
        return experiment.experiment_id


def start_compress_run(
    fleet_name: str,
    version_id: str,
    params: dict,
    tracking_uri: str | None = None,
    *,
    storage_options: dict | None = None,
    resume_run_id: str | None = None,
) -> str:
    """Start the MLflow run of one ``fleet compress`` (named ``version_id``, in the experiment
    ``fleet-<fleet_name>``, tags ``fleet.name`` and ``fleet.version_id``) and log ``params`` into it
    (flattened and scrubbed as :func:`fleet.storage.registry.register_version` does: credential-looking keys
    dropped, values of ``storage_options`` and URI credentials masked); return its run id.

    ``resume_run_id`` (the run an interrupted compress of the same version id started) is continued instead,
    set back to RUNNING, when it is still in this registry, not deleted and of the same fleet version; its
    params keep their first values (a changed one is named in the tag :data:`PARAMS_CHANGED_TAG`). Otherwise
    a new run is started. :class:`~fleet.core.errors.RegistryError` naming the tracking URI when the registry
    cannot be written.
    """
    check_name("fleet name", fleet_name)
    check_name("version id", version_id)
    uri = resolve_tracking_uri(tracking_uri)
    clean = _clean_params(params, secret_values(storage_options or {}))
    with registry_access(uri):
        client = registry_client(uri)
        experiment_id = fleet_experiment(client, uri, fleet_name)
        run = _resumable_run(client, resume_run_id, experiment_id, version_id) if resume_run_id else None
        if run is None:
            run = client.create_run(
                experiment_id, run_name=version_id, tags={"fleet.name": fleet_name, "fleet.version_id": version_id}
            )
            logged: dict = {}
        else:
            client.update_run(run.info.run_id, status="RUNNING")
            logged = run.data.params
        _log_params_once(client, run.info.run_id, logged, clean)
        return run.info.run_id


def _resumable_run(client: MlflowClient, run_id: str, experiment_id: str, version_id: str):
    """The run ``run_id`` when it can be continued for ``version_id`` (else None, said at debug level)."""
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if not_found(err) or err.error_code == "INVALID_PARAMETER_VALUE":
            logger.info(
                "MLflow run %s of fleet version %s is not in this registry: starting a new one", run_id, version_id
            )
            return None
        raise
    if (
        run.info.lifecycle_stage != "active"
        or run.info.experiment_id != experiment_id
        or run.data.tags.get("fleet.version_id") != version_id
    ):
        logger.info("MLflow run %s is deleted or not fleet version %s's: starting a new one", run_id, version_id)
        return None
    return run


def log_run_metrics(run_id: str, metrics: dict, step: int, tracking_uri: str | None = None) -> None:
    """Log ``metrics`` (flattened, sanitised, finite only) into the run ``run_id`` at ``step``, timestamped now
    (``fleet compress`` logs each stage's seconds as it ends). Progress only: an error is logged as a warning,
    never raised (registering at the end needs the registry anyway)."""
    uri = resolve_tracking_uri(tracking_uri)
    try:
        _log_batches(registry_client(uri), run_id, _clean_metrics(metrics), {}, step=step)
    except Exception as err:  # noqa: BLE001 - a store or network error of any kind: the compress goes on
        logger.warning("metrics not logged into MLflow run %s (%s): %s", run_id, scrub(uri), err)


def end_compress_run(run_id: str, status: str, tracking_uri: str | None = None) -> None:
    """End the run ``run_id`` with ``status`` (:data:`END_STATUSES`) if it is still RUNNING (a run that
    :func:`fleet.storage.registry.register_version` ended is left as it is). Called on the way out of a failed
    compress: an error is logged as a warning, never raised."""
    if status not in END_STATUSES:
        raise ValueError(f"status must be one of {', '.join(END_STATUSES)}, got {status!r}")
    uri = resolve_tracking_uri(tracking_uri)
    try:
        client = registry_client(uri)
        run = client.get_run(run_id)
        if run.info.status == "RUNNING" and run.info.lifecycle_stage == "active":
            client.set_terminated(run_id, status)
    except Exception as err:  # noqa: BLE001 - any store or network error: the compress's own error matters more
        logger.warning("MLflow run %s (%s) not ended %s: %s", run_id, scrub(uri), status, err)


def discard_duplicate_run(client: MlflowClient, run_id: str, model_version) -> None:
    """The run ``run_id`` logged a fleet version that ``model_version`` (another run's) registered
    meanwhile: tag it :data:`DUPLICATE_TAG` and delete it (one run per version). Nothing when it is that run."""
    if model_version.run_id == run_id:
        return
    client.set_tag(run_id, DUPLICATE_TAG, f"{model_version.name}/{model_version.version}")
    client.delete_run(run_id)
