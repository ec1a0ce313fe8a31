"""Where fleet's MLflow registry is and how it is opened: tracking URIs, fleet's file locks on a SQLite store,
and the client every registry call goes through (:mod:`fleet.storage.registry`, :mod:`fleet.storage.runs`).

Tracking URIs are ``sqlite:///path`` or ``http(s)://server``; MLflow's file store is refused. A
``sqlite:///a/b.db`` whose relative path looks like a mistyped absolute one (``/a`` exists, ``./a`` does
not) is warned about once. Only writers create a missing SQLite database (:func:`registry_client` with
``create=True``); a read-only caller gets a :class:`~fleet.core.errors.RegistryError` naming the URI instead.
A fresh SQLite database is created and migrated under a file lock (``<db>.init.lock``), so concurrent first
use cannot corrupt it; fleet's write lock on a SQLite store (:func:`registry_lock`) is the file lock
``<db>.lock``; with a server there is no lock (docs/security.md, section 5). Any failure to talk to the
registry becomes a :class:`~fleet.core.errors.RegistryError` naming the tracking URI, credentials scrubbed
(:func:`registry_access`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlflow
from filelock import FileLock, Timeout
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fleet.core.constants import NAME_PATTERN
from fleet.core.errors import RegistryError
from fleet.core.redact import scrub

logger = logging.getLogger(__name__)

#: Seconds a registry writer waits for another fleet process's lock on a SQLite store before failing.
LOCK_TIMEOUT_S = 300.0


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else a SQLite file ``./fleet-data/mlflow.db`` (absolute
    path; nothing is created here: a writer's first use creates it, a reader's fails, see
    :func:`registry_client`)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    path = os.path.abspath(os.path.join("fleet-data", "mlflow.db"))
    return f"sqlite:///{path}"


def _check_tracking_uri(uri: str) -> str:
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"tracking URI must be a non-empty string, got {uri!r}")
    scheme = uri.split(":", 1)[0] if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) else ""
    if scheme in ("", "file"):
        raise ValueError(
            f"tracking URI {uri!r} would use MLflow's file store, which fleet does not support; "
            "use sqlite:///path/to/mlflow.db or http(s)://host:port"
        )
    return uri


_WARNED_RELATIVE: set[str] = set()  # sqlite URIs already warned about by _warn_relative_sqlite


def _warn_relative_sqlite(uri: str) -> None:
    """Warn (once per URI) when ``sqlite:///a/b.db`` looks like a mistyped absolute path: its path is
    relative to the current directory (``./a/b.db``), but ``/a`` exists and ``./a`` does not, so
    ``sqlite:////a/b.db`` (four slashes) was probably meant."""
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:////") or uri in _WARNED_RELATIVE:
        return
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    first = path.split("/", 1)[0]
    if not first or first in (".", "..", ":memory:") or "/" not in path:
        return
    if os.path.isdir(os.path.join(os.sep, first)) and not os.path.exists(first):
        _WARNED_RELATIVE.add(uri)
        logger.warning(
            "tracking URI %s names the relative path %s (under the current directory %s); "
            "for the absolute path /%s write sqlite:////%s (four slashes)",
            scrub(uri),
            path,
            os.getcwd(),
            path,
            path,
        )


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """``tracking_uri`` (:func:`default_tracking_uri` when None) checked: ValueError for MLflow's file store
    (a path or ``file:`` URI); a relative ``sqlite:///`` path that looks like a mistyped absolute one is
    warned about (once)."""
    uri = _check_tracking_uri(tracking_uri or default_tracking_uri())
    _warn_relative_sqlite(uri)
    return uri


def sqlite_path(uri: str) -> str | None:
    """The database file of a ``sqlite:///path`` URI (absolute), None for any other store or ``:memory:``."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return os.path.abspath(path)


def check_name(kind: str, value: Any) -> str:
    """``value`` when it is a valid name for the registry (a registered model, a fleet version id, an artifact):
    ``^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$``; else ValueError naming ``kind``."""
    if not isinstance(value, str) or NAME_PATTERN.fullmatch(value) is None:
        raise ValueError(f"invalid {kind} {value!r}: must match ^{NAME_PATTERN.pattern}$")
    return value


def not_found(err: MlflowException) -> bool:
    """Whether MLflow's ``err`` says that what was asked for does not exist."""
    return err.error_code == "RESOURCE_DOES_NOT_EXIST"


def _unreadable(uri: str, err: BaseException) -> RegistryError:
    """The error for a registry that cannot be read: names the tracking URI (without credentials)."""
    detail = scrub(f"{type(err).__name__}: {err}")
    return RegistryError(f"cannot read the MLflow registry at {scrub(uri)}: {detail}")


@contextmanager
def registry_access(uri: str) -> Iterator[None]:
    """Turn any failure to talk to the registry at ``uri`` into a :class:`~fleet.core.errors.RegistryError`
    naming it (credentials scrubbed) and the error; a ``RegistryError`` passes through as it is."""
    try:
        yield
    except RegistryError:
        raise
    except Exception as err:  # a store or network error of any kind: re-raised naming the registry
        raise _unreadable(uri, err) from err


@contextmanager
def _file_lock(lock_path: str, uri: str, what: str) -> Iterator[None]:
    """Hold the exclusive file lock ``lock_path`` (``what`` it is, for messages); say so on stderr (a
    warning) when another process holds it, and fail after :data:`LOCK_TIMEOUT_S`."""
    lock = FileLock(lock_path)
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.warning(
                "waiting for the %s %s (held by another fleet process using %s)", what, lock_path, scrub(uri)
            )
            lock.acquire(timeout=LOCK_TIMEOUT_S)
    except Timeout:
        raise RegistryError(
            f"{what} {lock_path} is still held by another process after {LOCK_TIMEOUT_S:.0f} s; nothing was changed"
        ) from None
    except OSError as err:
        raise _unreadable(uri, err) from err
    try:
        yield
    finally:
        lock.release()


@contextmanager
def registry_lock(tracking_uri: str | None = None) -> Iterator[None]:
    """Hold fleet's write lock on the registry ``tracking_uri``: every alias move and registration
    happens under it. On ``sqlite:///path/mlflow.db`` it is the file lock ``path/mlflow.db.lock``
    (blocks other fleet processes on this machine, up to :data:`LOCK_TIMEOUT_S`); with a server it does
    nothing (docs/security.md, section 5)."""
    uri = resolve_tracking_uri(tracking_uri)
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    with _file_lock(path + ".lock", uri, "registry lock"):
        yield


_INITIALISED: set[str] = set()  # SQLite databases this process has opened (so created and migrated)


def database_missing(uri: str) -> bool:
    """Whether ``uri`` is a SQLite store whose database file does not exist (and this process has not opened
    it): :func:`registry_client` creates it, or with ``create=False`` refuses."""
    path = sqlite_path(uri)
    return path is not None and path not in _INITIALISED and not os.path.isfile(path)


def registry_client(tracking_uri: str | None, *, create: bool = True) -> MlflowClient:
    """A client of the registry ``tracking_uri`` (:func:`resolve_tracking_uri`), for tracking and registry
    calls alike. A SQLite database is opened the first time (in this process) under the file lock
    ``<db>.init.lock``: MLflow creates and migrates a fresh database on first use, and two processes doing that
    at once corrupt it (``_alembic_tmp_* already exists``). With ``create=False`` (the read-only commands) a
    SQLite database that does not exist is a :class:`~fleet.core.errors.RegistryError` naming the URI, and
    nothing (file, lock or directory) is created."""
    uri = resolve_tracking_uri(tracking_uri)
    path = sqlite_path(uri)
    if database_missing(uri):
        if not create:
            raise RegistryError(
                f"no MLflow tracking database at {scrub(uri)} ({path} does not exist; nothing "
                "was created): pass --tracking-uri or set $MLFLOW_TRACKING_URI to the registry "
                "fleet compress wrote"
            )
        with registry_access(uri):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    with registry_access(uri):
        if path is None or path in _INITIALISED:
            return MlflowClient(tracking_uri=uri, registry_uri=uri)
        with _file_lock(path + ".init.lock", uri, "registry initialisation lock"):
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # creates the tracking tables
            client.search_registered_models(max_results=1)  # and the registry's
        _INITIALISED.add(path)
        return client


@contextmanager
def fluent_uris(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking and registry URIs at ``uri`` (MLflow's fluent API, which
    ``mlflow.pyfunc.log_model`` and ``mlflow.register_model`` need); restore them, and the
    ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` environment variables MLflow sets, after. Not safe to use
    from several threads at once.

    The one use of private MLflow API in fleet, unavoidable: restoring needs the URIs as they were *set*, None
    when they were not (``mlflow.get_tracking_uri`` / ``get_registry_uri`` return the resolved defaults, and
    restoring those would pin them: the registry URI would stop following a later ``set_tracking_uri``), and
    MLflow has no public accessor for that state."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
