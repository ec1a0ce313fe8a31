"""MLflow side of fleet: one registered model per fleet, one model version per nightly run, a
quality gate and the ``champion`` alias (``docs/architecture.md``, DESIGN section 3).

``fleet compress``'s run spans the compress (:func:`start_compress_run`, :func:`log_run_metrics` as each stage
ends, :func:`end_compress_run` when it fails; registration logs into it and ends it FINISHED).
A run logs params, metrics and plots into the experiment ``fleet-<fleet_name>`` and a pyfunc model
whose artifacts are the backbone and the manifest (heads stay in Parquet, referenced by the
manifest URI). Each model version carries the tags ``version_id``, ``manifest_uri``, ``manifest_sha256``,
``parent_version_id`` (when there is one), ``gate``, ``gate_reasons`` and ``gate_notes`` (checks that
did not apply, e.g. the AUC checks on a fleet without any hold-out AUC).

``champion`` moves only when the gate passes (:func:`register_version`) or by hand
(:func:`promote`, :func:`rollback`). Every move is recorded in the registered-model tag
``champion_history``: a JSON list of ``{"version", "reason", "at"}`` used as a stack whose last
entry is the current champion; :func:`rollback` pops it.

Registration is idempotent on (fleet, ``version_id``): registering a version id that is already
registered returns that version (:attr:`RegisteredVersion.existing`) and registers nothing. Every alias
move (the gate, :func:`promote`, :func:`rollback`) is a compare-and-set: it re-reads, under
:func:`registry_lock`, the ``champion`` it based its decision on and raises :class:`ChampionMovedError`,
changing nothing, when another writer moved it meanwhile. On a SQLite store the lock is a file lock next
to the database, and a fresh database is created and migrated under a second one, so concurrent first
use cannot corrupt it; with a server there is no lock (docs/security.md, section 5, says what holds).

Tracking URIs are ``sqlite:///path`` or ``http(s)://server``; MLflow's file store is refused. A
registry that cannot be read raises :class:`RegistryError` naming the tracking URI and the error. Only
writers (:func:`register_version`, and the lookups of ``fleet compress``) create a missing SQLite
database; the read-only functions (:func:`resolve_version`, :func:`list_versions`) and the alias moves
(:func:`promote`, :func:`rollback`) raise :class:`RegistryError` naming the URI instead. A
``sqlite:///a/b.db`` whose relative path looks like a mistyped absolute one (``/a`` exists, ``./a`` does
not) is warned about once.
Nothing here is safe to call from several threads at once: MLflow's fluent ``log_model`` needs the
process-wide tracking URI, which :func:`register_version` sets and restores around the call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import mlflow
from filelock import FileLock, Timeout
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import fleet
from fleet.core.errors import FleetError
from fleet.core.redact import is_secret_name, public_options, scrub, secret_values
from fleet.storage.store import relocated

logger = logging.getLogger(__name__)

CHAMPION = "champion"
HISTORY_TAG = "champion_history"
MODEL_DATA_FILE = "fleet_model.json"  # read by fleet.serve.pyfunc._load_pyfunc(data_path)
MODEL_DATA_FORMAT = "fleet-pyfunc/1"
STORAGE_OPTIONS_ENV = "FLEET_STORAGE_OPTIONS"  # JSON storage options (credentials) at load time
REQUIRED_ARTIFACTS = ("backbone.safetensors", "manifest.json")
#: Version tag: hex sha256 of the ``manifest.json`` artifact, which must be the stored manifest's bytes;
#: ``FleetModel.load`` refuses a manifest that does not match it.
MANIFEST_SHA256_TAG = "manifest_sha256"
GATE_METRICS = {  # metric key -> label used in gate reasons
    "fidelity_auc_diff_median": "median AUC diff",
    "fidelity_auc_diff_p10": "p10 AUC diff",
    "quarantine_share": "quarantine share",
    "fidelity_kl_median": "median KL",
    "fidelity_mean_ratio_within_10pct_share": "mean-ratio-within-10% share",
    "campaigns_status_fallback": "fallback share",
}
#: Gate metrics checked only when at least one campaign of the fleet has a hold-out AUC.
AUC_GATE_METRICS = ("fidelity_auc_diff_median", "fidelity_auc_diff_p10")
#: The logged model's pip requirements (``requirements.txt``, what ``mlflow models serve`` installs with its
#: default environment manager): these packages at the versions installed here, except torch. fleet itself
#: is not among them (the PyPI name "fleet" belongs to another project): its package directory travels with
#: the model as ``code_paths`` (``<model>/code/fleet``, put first on ``sys.path`` when MLflow loads it).
RUNTIME_PACKAGES = ("mlflow", "torch", "safetensors", "numpy", "pyarrow", "fsspec", "s3fs")
#: torch as pyproject.toml requires it, not pinned: the weights are safetensors (no torch-version pickles),
#: and the installed build (``+cpu`` / ``+cu124``) is a local wheel tag that a package index cannot resolve.
TORCH_REQUIREMENT = "torch>=2.4"
#: The directory of the ``fleet`` package, logged as the model's ``code_paths``.
FLEET_CODE_DIR = os.path.dirname(os.path.abspath(fleet.__file__))

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_MODEL_URI_RE = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))")
_HISTORY_MAX = 200  # entries kept in champion_history (~70 bytes each, far below the tag limit)
_PARAM_MAX = 6000  # MLflow's limit on a param value
_KEY_MAX = 250  # MLflow's limit on a metric / param key
#: Seconds a registry writer waits for another fleet process's lock on a SQLite store before failing.
LOCK_TIMEOUT_S = 300.0


class RegistryError(FleetError):
    """A registered model, version or alias is missing, the registry cannot be read, or it is not in the
    expected state."""


class ChampionMovedError(RegistryError):
    """``champion`` moved between the moment a move was decided and the moment it was to be written;
    nothing was changed."""


# ----------------------------------------------------------------------------- gate


@dataclass
class GateConfig:
    """Quality gate a new fleet version must pass before it becomes ``champion``.

    AUC diffs are student AUC minus teacher AUC on the hold-out rows, one per campaign: 0 means as
    good as the teacher, negative means worse.

    The AUC checks apply only to a fleet where at least one campaign has a hold-out AUC (most
    campaigns have too few positives for one); the teacher-agreement checks (KL, mean ratio,
    fallback share) are defined for every fleet. These defaults are the only place the
    thresholds are set (provisional: to be tuned on the zoo).

    Args:
        min_median_auc_diff: lowest acceptable median AUC diff over the fleet's campaigns.
        min_p10_auc_diff: lowest acceptable 10th percentile AUC diff (the campaigns fitted worst);
            at most ``min_median_auc_diff``, since a p10 is never above the median.
        max_quarantine_share: highest acceptable share of campaigns quarantined by the run, in [0, 1].
        max_regression: how much lower than the current champion's the median and the p10 AUC diff
            may be, >= 0.
        max_kl_median: highest acceptable median over the campaigns of their mean hold-out
            KL(teacher || student), in nats, >= 0 (``fidelity_kl_median``).
        min_mean_ratio_share: lowest acceptable share of campaigns whose mean student probability is
            within 10% of the teacher's, in [0, 1] (``fidelity_mean_ratio_within_10pct_share``).
        max_fallback_share: highest acceptable share of campaigns stored with ``status = fallback``
            (``campaigns_status_fallback / campaigns``), in [0, 1].
    """

    min_median_auc_diff: float = -0.01
    min_p10_auc_diff: float = -0.03
    max_quarantine_share: float = 0.05
    max_regression: float = 0.005
    max_kl_median: float = 0.02
    min_mean_ratio_share: float = 0.8
    max_fallback_share: float = 0.1

    def __post_init__(self) -> None:
        for name in ("min_median_auc_diff", "min_p10_auc_diff", "max_quarantine_share", "max_regression",
                     "max_kl_median", "min_mean_ratio_share", "max_fallback_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"GateConfig.{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("min_median_auc_diff", "min_p10_auc_diff"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"GateConfig.{name} must be in [-1, 1] (a difference of AUCs), got {getattr(self, name)}")
        if self.min_p10_auc_diff > self.min_median_auc_diff:
            raise ValueError(
                f"GateConfig.min_p10_auc_diff ({self.min_p10_auc_diff}) is above min_median_auc_diff "
                f"({self.min_median_auc_diff}): a p10 is never above the median; were they swapped?"
            )
        for name in ("max_quarantine_share", "min_mean_ratio_share", "max_fallback_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"GateConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_kl_median < 0.0:
            raise ValueError(f"GateConfig.max_kl_median must be >= 0 (nats), got {self.max_kl_median}")
        if not 0.0 <= self.max_regression <= 1.0:
            raise ValueError(f"GateConfig.max_regression must be in [0, 1], got {self.max_regression}")


@dataclass
class GateResult:
    """Outcome of :func:`evaluate_gate`: ``reasons`` lists every failed check, empty when passed;
    ``notes`` lists checks that did not apply (e.g. the AUC checks on a fleet without any AUC)."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: every check made, passed or not: ``{"check", "value", "bound", "passed"}`` (``value`` None: the metric
    #: is missing or not finite); not stored in the registry's tags, not compared (:func:`evaluate_gate`)
    checks: list[dict] = field(default_factory=list, compare=False)


def _finite(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing, not a number or not finite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt_pair(a: float, b: float) -> tuple[str, str]:
    """Format two numbers with 3 decimals, or more when 3 would make them look equal."""
    sa, sb = f"{a:.3f}", f"{b:.3f}"
    return (sa, sb) if sa != sb else (f"{a:.6g}", f"{b:.6g}")


def _fleet_has_auc(metrics: dict) -> bool:
    """Whether at least one campaign has a hold-out AUC: an AUC metric is present, or fewer
    campaigns lack one than have a head (``campaigns_ok + campaigns_reused``, else ``campaigns -
    campaigns_quarantined``). Without ``fidelity_campaigns_without_auc`` it is assumed (then a missing
    AUC metric fails the gate, as it always did)."""
    if any(_finite(metrics.get(key)) is not None for key in AUC_GATE_METRICS):
        return True
    without = _finite(metrics.get("fidelity_campaigns_without_auc"))
    ok, reused = _finite(metrics.get("campaigns_ok")), _finite(metrics.get("campaigns_reused"))
    if ok is not None and reused is not None:
        headed = ok + reused
    else:
        campaigns = _finite(metrics.get("campaigns"))
        headed = None if campaigns is None else campaigns - (_finite(metrics.get("campaigns_quarantined")) or 0.0)
    return without is None or headed is None or without < headed


def evaluate_gate(metrics: dict, champion_metrics: dict | None, gate: GateConfig) -> GateResult:
    """Check a candidate's ``metrics`` against ``gate`` and, when given, the champion's metrics.

    Uses ``fidelity_kl_median``, ``fidelity_mean_ratio_within_10pct_share``, ``quarantine_share``,
    ``campaigns_status_fallback`` / ``campaigns`` (a missing fallback count is 0) and, when at least
    one campaign has a hold-out AUC (an AUC metric is present, or ``fidelity_campaigns_without_auc``
    is below the number of campaigns with a head), ``fidelity_auc_diff_median`` and
    ``fidelity_auc_diff_p10``; on a fleet without any AUC those checks are skipped with a note in
    :attr:`GateResult.notes`. A candidate metric that is missing or not finite fails the gate. The
    regression check compares the median and p10 with the champion's; a champion metric that is
    missing is not compared.
    """
    reasons: list[str] = []
    notes: list[str] = []
    checks: list[dict] = []
    values: dict[str, float] = {}
    has_auc = _fleet_has_auc(metrics)
    if not has_auc:
        notes.append(f"AUC checks skipped: no campaign has a hold-out AUC "
                     f"(fidelity_campaigns_without_auc = {metrics.get('fidelity_campaigns_without_auc')!r})")
    fallback = metrics.get("campaigns_status_fallback", 0)
    for key, label in GATE_METRICS.items():
        if key in AUC_GATE_METRICS and not has_auc:
            continue
        if key == "campaigns_status_fallback":
            count, campaigns = _finite(fallback), _finite(metrics.get("campaigns"))
            if count is None or (count > 0 and not campaigns):
                reasons.append(f"{label}: metrics 'campaigns_status_fallback' / 'campaigns' are missing or not "
                               f"finite ({fallback!r} / {metrics.get('campaigns')!r})")
            else:
                values["fallback_share"] = count / campaigns if count > 0 else 0.0
            continue
        value = _finite(metrics.get(key))
        if value is None:
            reasons.append(f"{label}: metric {key!r} is missing or not a finite number ({metrics.get(key)!r})")
        else:
            values[key] = value

    def check(name: str, value: float | None, bound: float, ok: bool) -> None:
        checks.append({"check": name, "value": value, "bound": bound, "passed": ok})

    def low(key: str, bound: float, label: str | None = None) -> None:
        label = label or GATE_METRICS[key]  # the reason's wording (the mean-ratio one names its metric)
        check(f"{GATE_METRICS[key]} >= {bound:g}", values.get(key), bound, key in values and values[key] >= bound)
        if key in values and values[key] < bound:
            v, b = _fmt_pair(values[key], bound)
            reasons.append(f"{label} {v} < {b}")

    def high(key: str, bound: float, label: str) -> None:
        name = GATE_METRICS.get(key, "fallback share")
        check(f"{name} <= {bound:g}", values.get(key), bound, key in values and values[key] <= bound)
        if key in values and values[key] > bound:
            v, b = _fmt_pair(values[key], bound)
            reasons.append(f"{label} {v} > {b}")

    if has_auc:
        low("fidelity_auc_diff_median", gate.min_median_auc_diff)
        low("fidelity_auc_diff_p10", gate.min_p10_auc_diff)
    high("quarantine_share", gate.max_quarantine_share, "quarantine share")
    high("fidelity_kl_median", gate.max_kl_median, "median KL (fidelity_kl_median)")
    low("fidelity_mean_ratio_within_10pct_share", gate.min_mean_ratio_share,
        "mean-ratio-within-10% share (fidelity_mean_ratio_within_10pct_share)")
    high("fallback_share", gate.max_fallback_share, "fallback share (campaigns_status_fallback / campaigns)")

    for key in AUC_GATE_METRICS:
        best = _finite((champion_metrics or {}).get(key))
        if best is None or key not in values:
            continue
        drop = best - values[key]
        check(f"{GATE_METRICS[key]} drop from the champion's {best:.4f} <= {gate.max_regression:g}", drop,
              gate.max_regression, drop <= gate.max_regression)
        if drop > gate.max_regression:
            v, c = _fmt_pair(values[key], best)
            d, m = _fmt_pair(drop, gate.max_regression)
            reasons.append(f"{GATE_METRICS[key]} {v} regresses from the champion's {c} by {d} > {m}")
    return GateResult(passed=not reasons, reasons=reasons, notes=notes, checks=checks)


# ----------------------------------------------------------------------------- helpers


@dataclass
class RegisteredVersion:
    """A model version written by :func:`register_version` (or found by it or :func:`find_version`:
    then ``existing`` is True, ``gate`` is read back from the version's tags and ``champion`` says whether
    it holds ``champion`` now)."""

    name: str
    version: str
    run_id: str
    manifest_uri: str
    gate: GateResult | None
    champion: bool
    existing: bool = False


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else a SQLite file ``./fleet-data/mlflow.db`` (absolute
    path; nothing is created here: a writer's first use creates it, a reader's fails, see :func:`_client`)."""
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
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    first = path.split("/", 1)[0]
    if not first or first in (".", "..", ":memory:") or "/" not in path:
        return
    if os.path.isdir(os.path.join(os.sep, first)) and not os.path.exists(first):
        _WARNED_RELATIVE.add(uri)
        logger.warning("tracking URI %s names the relative path %s (under the current directory %s); "
                       "for the absolute path /%s write sqlite:////%s (four slashes)",
                       scrub(uri), path, os.getcwd(), path, path)


def _resolve_uri(tracking_uri: str | None) -> str:
    uri = _check_tracking_uri(tracking_uri or default_tracking_uri())
    _warn_relative_sqlite(uri)
    return uri


def _sqlite_path(uri: str) -> str | None:
    """The database file of a ``sqlite:///path`` URI (absolute), None for any other store or ``:memory:``."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return os.path.abspath(path)


def _unreadable(uri: str, err: BaseException) -> RegistryError:
    """The error for a registry that cannot be read: names the tracking URI (without credentials)."""
    detail = scrub(f"{type(err).__name__}: {err}")
    return RegistryError(f"cannot read the MLflow registry at {scrub(uri)}: {detail}")


@contextmanager
def _reading(uri: str) -> Iterator[None]:
    """Turn any failure to talk to the registry into :func:`_unreadable`'s :class:`RegistryError`."""
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
            logger.warning("waiting for the %s %s (held by another fleet process using %s)",
                           what, lock_path, scrub(uri))
            lock.acquire(timeout=LOCK_TIMEOUT_S)
    except Timeout:
        raise RegistryError(f"{what} {lock_path} is still held by another process after "
                            f"{LOCK_TIMEOUT_S:.0f} s; nothing was changed") from None
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
    uri = _resolve_uri(tracking_uri)
    path = _sqlite_path(uri)
    if path is None:
        yield
        return
    with _file_lock(path + ".lock", uri, "registry lock"):
        yield


_INITIALISED: set[str] = set()  # SQLite databases this process has opened (so created and migrated)


def _client(tracking_uri: str | None, *, create: bool = True) -> MlflowClient:
    """A client of the registry ``tracking_uri``. A SQLite database is opened the first time (in this
    process) under the file lock ``<db>.init.lock``: MLflow creates and migrates a fresh database on
    first use, and two processes doing that at once corrupt it (``_alembic_tmp_* already exists``).
    With ``create=False`` (the read-only commands) a SQLite database that does not exist is a
    :class:`RegistryError` naming the URI, and nothing (file, lock or directory) is created."""
    uri = _resolve_uri(tracking_uri)
    path = _sqlite_path(uri)
    if path is not None and path not in _INITIALISED and not os.path.isfile(path):
        if not create:
            raise RegistryError(f"no MLflow tracking database at {scrub(uri)} ({path} does not exist; nothing "
                                "was created): pass --tracking-uri or set $MLFLOW_TRACKING_URI to the registry "
                                "fleet compress wrote")
        with _reading(uri):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    with _reading(uri):
        if path is None or path in _INITIALISED:
            return MlflowClient(tracking_uri=uri, registry_uri=uri)
        with _file_lock(path + ".init.lock", uri, "registry initialisation lock"):
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # creates the tracking tables
            client.search_registered_models(max_results=1)  # and the registry's
        _INITIALISED.add(path)
        return client


def _check_name(kind: str, value: Any) -> str:
    if not isinstance(value, str) or _NAME_RE.fullmatch(value) is None:
        raise ValueError(f"invalid {kind} {value!r}: must match ^[A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}$")
    return value


def _not_found(err: MlflowException) -> bool:
    return err.error_code == "RESOURCE_DOES_NOT_EXIST"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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
        number = _finite(value)
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


def _pip_requirements() -> list[str]:
    """:data:`RUNTIME_PACKAGES` pinned to the installed versions (``==``), torch as :data:`TORCH_REQUIREMENT`."""
    reqs = []
    for package in RUNTIME_PACKAGES:
        if package == "torch":
            reqs.append(TORCH_REQUIREMENT)
            continue
        try:
            reqs.append(f"{package}=={metadata.version(package).split('+')[0]}")  # drop local tags (+cpu)
        except metadata.PackageNotFoundError:
            reqs.append(package)
    return reqs


def _num_features(backbone_path: str) -> int:
    """``num_features`` of the student config in a backbone file's safetensors metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(backbone_path, "np") as f:
            return int(json.loads((f.metadata() or {})["student_config"])["num_features"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise ValueError(f"local artifact backbone.safetensors ({backbone_path}): no student_config.num_features "
                         f"in its metadata ({exc!r}); cannot build the input example") from None


def _sqlite_artifact_root(uri: str) -> str | None:
    """Artifacts of a ``sqlite:///path/mlflow.db`` store go next to it (``<dir>/mlartifacts``), not
    into ``./mlruns`` of whatever the working directory is."""
    path = _sqlite_path(uri)
    return None if path is None else os.path.join(os.path.dirname(path), "mlartifacts")


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
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


@contextmanager
def _fluent_uris(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking and registry URIs at ``uri``; restore them (and the
    ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` environment variables MLflow sets) after."""
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


def _log_batches(client: MlflowClient, run_id: str, metrics: dict[str, float], params: dict[str, str],
                 step: int = 0) -> None:
    now_ms = int(datetime.now(timezone.utc).timestamp() * 1000)
    metric_list = [Metric(k, v, now_ms, step) for k, v in metrics.items()]
    param_list = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(metric_list), 1000):
        client.log_batch(run_id, metrics=metric_list[i : i + 1000])
    for i in range(0, len(param_list), 100):
        client.log_batch(run_id, params=param_list[i : i + 100])


def _check_local_artifacts(local_artifacts: dict[str, str], fleet_name: str, version_id: str) -> None:
    missing = [name for name in REQUIRED_ARTIFACTS if name not in local_artifacts]
    if missing:
        raise ValueError(f"local_artifacts needs {', '.join(missing)} (got {sorted(local_artifacts)})")
    for name, path in local_artifacts.items():
        _check_name("artifact name", name)
        if not os.path.isfile(path):
            raise ValueError(f"local artifact {name!r}: {path} is not a file")
    try:
        with open(local_artifacts["manifest.json"], "rb") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"local artifact manifest.json ({local_artifacts['manifest.json']}) is not JSON: {err}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"local artifact manifest.json ({local_artifacts['manifest.json']}) is not a JSON object")  # noqa: TRY004 - bad input, register_version raises ValueError
    for key, expected in (("version_id", version_id), ("fleet", fleet_name)):
        if key in manifest and manifest[key] != expected:
            raise ValueError(f"manifest.json says {key}={manifest[key]!r} but register_version got {expected!r}")


def _check_plots(plots: dict[str, bytes]) -> dict[str, bytes]:
    out = {}
    for name, data in plots.items():
        base = name.removesuffix(".png")
        _check_name("plot name", base)
        if not isinstance(data, (bytes, bytearray)) or not bytes(data[:8]) == b"\x89PNG\r\n\x1a\n":
            raise ValueError(f"plot {name!r} is not PNG bytes")
        out[base + ".png"] = bytes(data)
    return out


# ----------------------------------------------------------------------------- champion history


def _read_history(client: MlflowClient, name: str) -> list[dict]:
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG)
    if not raw:
        return []
    try:
        history = json.loads(raw)
    except ValueError:
        raise RegistryError(f"registered model {name!r}: tag {HISTORY_TAG} is not JSON: {raw[:200]!r}") from None
    if not isinstance(history, list) or not all(isinstance(e, dict) and "version" in e for e in history):
        raise RegistryError(f"registered model {name!r}: tag {HISTORY_TAG} is not a list of {{version, ...}}")
    return history


def _write_history(client: MlflowClient, name: str, history: list[dict]) -> None:
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-_HISTORY_MAX:]))


def _champion(client: MlflowClient, name: str) -> str | None:
    try:
        version = client.get_registered_model(name).aliases.get(CHAMPION)
    except MlflowException as err:
        if _not_found(err):
            return None
        raise
    return None if version is None else str(version)


def _get_version(client: MlflowClient, name: str, version: str | int):
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        if _not_found(err) or err.error_code == "INVALID_PARAMETER_VALUE":
            raise RegistryError(f"registered model {name!r} has no version {version!r}") from None
        raise


def _describe(version: str | None) -> str:
    return "no version" if version is None else f"version {version}"


def _check_champion(client: MlflowClient, name: str, expected: str | None, doing: str, then: str) -> None:
    """The compare of compare-and-set (call it under :func:`registry_lock`): raise
    :class:`ChampionMovedError` unless ``champion`` is still ``expected``."""
    current = _champion(client, name)
    if current != expected:
        raise ChampionMovedError(f"registered model {name!r}: {CHAMPION} moved from {_describe(expected)} to "
                                 f"{_describe(current)} while {doing}; nothing was changed; {then}")


def _move_champion(client: MlflowClient, name: str, version: str, reason: str) -> None:
    """Set the alias first, then push the history: if we stop in between, :func:`rollback`
    reconciles (it pushes the alias' version when the stack's top differs). Call it under
    :func:`registry_lock`, after :func:`_check_champion`."""
    client.set_registered_model_alias(name, CHAMPION, version)
    history = _read_history(client, name)
    if not history or str(history[-1]["version"]) != version:
        history.append({"version": version, "reason": reason, "at": _now()})
        _write_history(client, name, history)


def _versions_of(client: MlflowClient, name: str, version_id: str) -> list:
    """The model versions of ``name`` tagged ``version_id``, oldest first (more than one only when a
    fleet older than this check registered a version id twice)."""
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.version_id = '{version_id}'")
    except MlflowException as err:
        if _not_found(err):
            return []
        raise
    return sorted(found, key=lambda mv: int(mv.version))


def _existing(client: MlflowClient, name: str, model_version, manifest_uri: str | None) -> RegisteredVersion:
    """``model_version`` as a :class:`RegisteredVersion` (``existing=True``); when ``manifest_uri`` is
    given it must be the one the version was registered with."""
    tags = model_version.tags or {}
    version_id = tags.get("version_id")
    if manifest_uri is not None and tags.get("manifest_uri") != manifest_uri:
        raise RegistryError(f"registered model {name!r}: fleet version {version_id!r} is already registered as "
                            f"version {model_version.version} with manifest {tags.get('manifest_uri')!r}, not "
                            f"{manifest_uri!r}; use another run id")
    gate = None
    if tags.get("gate") is not None:
        gate = GateResult(passed=tags["gate"] == "passed", reasons=json.loads(tags.get("gate_reasons") or "[]"),
                          notes=json.loads(tags.get("gate_notes") or "[]"))
    version = str(model_version.version)
    return RegisteredVersion(name=name, version=version, run_id=model_version.run_id,
                             manifest_uri=tags.get("manifest_uri"), gate=gate,
                             champion=_champion(client, name) == version, existing=True)


# ----------------------------------------------------------------------------- public API


def register_version(
    *,
    fleet_name: str,
    manifest_uri: str,
    version_id: str,
    local_artifacts: dict[str, str],
    params: dict,
    metrics: dict,
    plots: dict[str, bytes],
    tracking_uri: str | None = None,
    gate: GateConfig | None = None,
    storage_options: dict | None = None,
    parent_version_id: str | None = None,
    example_campaign_id: str | None = None,
    run_files: dict[str, bytes] | None = None,
    mlflow_run_id: str | None = None,
) -> RegisteredVersion:
    """Log one run and register one new version of the model ``fleet_name``; move ``champion`` to
    it when it passes ``gate`` (``GateConfig()`` when None) against the current champion's metrics.

    Idempotent on (``fleet_name``, ``version_id``): when that version id is already registered (by an
    earlier or a concurrent call), nothing is logged or registered and that version is returned with
    ``existing=True`` (:class:`RegistryError` if it was registered with another ``manifest_uri``).
    Registering and moving ``champion`` happen under :func:`registry_lock`, after re-reading the
    champion the gate compared against: if it moved meanwhile, the run just logged is deleted (ended FAILED
    and kept when it is ``mlflow_run_id``), nothing
    is registered and :class:`ChampionMovedError` is raised (re-running gates against the new champion).

    Args:
        fleet_name: registered model name; the run goes to the experiment ``fleet-<fleet_name>``.
        manifest_uri: URI of the committed version's ``manifest.json`` (what serving opens).
        version_id: the fleet version id (tag ``version_id``).
        local_artifacts: artifact name -> local file, at least ``backbone.safetensors`` and
            ``manifest.json`` (the stored manifest's exact bytes: its sha256 becomes the tag
            ``manifest_sha256`` that loading checks); copied into the pyfunc model's data directory.
        params: run params; nested dicts are flattened (``a.b``); credential-looking keys dropped.
        metrics: run metrics; nested dicts flattened, names sanitised, non-finite values skipped.
            The gate reads the metrics :func:`evaluate_gate` lists (AUC diffs, quarantine share,
            median KL, mean-ratio share, fallback count and campaign counts).
        plots: plot name -> PNG bytes, logged under ``plots/<name>.png``.
        tracking_uri: ``sqlite:///...`` or ``http(s)://...``; :func:`default_tracking_uri` when None.
        gate: the quality gate.
        storage_options: fsspec options for ``manifest_uri``. Only their non-secret part is saved
            (``fleet_model.json``); credentials are read at load time from ``$FLEET_STORAGE_OPTIONS``
            and are scrubbed from params.
        parent_version_id: the fleet version this one was trained from (tag ``parent_version_id``).
        example_campaign_id: a campaign of the version: the model is logged with the input example
            :func:`fleet.serve.pyfunc.input_example` of it (that id, one event of type 0, zero features; the
            feature count read from the backbone's metadata), which MLflow saves as
            ``input_example.json`` / ``serving_input_example.json`` and tries once on the logged model
            (a warning when that fails, e.g. without the store's credentials in the environment).
            None: no input example.
        run_files: file name -> bytes, logged at the root of the run's artifacts (the version's
            ``report.html``, which MLflow's UI shows in its artifact view).
        mlflow_run_id: the run :func:`start_compress_run` started (``fleet compress``): everything is logged
            into it and it ends FINISHED, instead of a new run. When the version id turns out to be registered
            already by another run, this one is tagged :data:`DUPLICATE_TAG` and deleted; when ``champion``
            moved, it ends FAILED and is kept (re-running the run id continues it).
    """
    _check_name("fleet name", fleet_name)
    _check_name("version id", version_id)
    if parent_version_id is not None:
        _check_name("parent version id", parent_version_id)
    if not isinstance(manifest_uri, str) or not manifest_uri:
        raise ValueError(f"manifest_uri must be a non-empty string, got {manifest_uri!r}")
    _check_local_artifacts(local_artifacts, fleet_name, version_id)
    example = None
    if example_campaign_id is not None:
        # lazily: fleet.serve.pyfunc imports serving (torch)
        from fleet.serve.pyfunc import input_example

        example = input_example(example_campaign_id, _num_features(local_artifacts["backbone.safetensors"]))
    plot_files = _check_plots(plots)
    gate = gate if gate is not None else GateConfig()
    secrets = secret_values(storage_options or {})
    public_manifest_uri = scrub(manifest_uri)
    if any(s in public_manifest_uri for s in secrets):
        raise ValueError("manifest_uri contains a credential from storage_options; pass credentials only in storage_options")
    if mlflow.active_run() is not None:
        raise RegistryError("register_version starts its own MLflow run: end the active run first")

    uri = _resolve_uri(tracking_uri)
    client = _client(uri)
    with _reading(uri):
        found = _versions_of(client, fleet_name, version_id)
    if found:
        logger.warning("%s: fleet version %s is already registered as version %s; nothing registered",
                       fleet_name, version_id, found[0].version)
        if mlflow_run_id is not None:
            _discard_duplicate(client, mlflow_run_id, found[0])
        return _existing(client, fleet_name, found[0], public_manifest_uri)
    experiment_id = _experiment_id(client, uri, f"fleet-{fleet_name}")

    # The gate needs only the candidate's and the champion's metrics, so it is decided before the
    # version exists and its outcome is among the version's tags from the start.
    champion_before, champion_metrics = _champion_metrics(client, fleet_name)
    result = evaluate_gate(metrics, champion_metrics, gate)
    gate_status = "passed" if result.passed else "failed"

    version_tags = {"version_id": version_id, "manifest_uri": public_manifest_uri,
                    "gate": gate_status, "gate_reasons": json.dumps(result.reasons),
                    "gate_notes": json.dumps(result.notes)}
    with open(local_artifacts["manifest.json"], "rb") as f:
        version_tags[MANIFEST_SHA256_TAG] = hashlib.sha256(f.read()).hexdigest()
    if parent_version_id is not None:
        version_tags["parent_version_id"] = parent_version_id
    run_tags = {f"fleet.{k}": v for k, v in version_tags.items() if k not in ("gate_reasons", "gate_notes")}
    run_tags["fleet.name"] = fleet_name

    with tempfile.TemporaryDirectory(prefix="fleet-register-") as tmp:
        data_dir = os.path.join(tmp, "fleet")  # becomes <model>/data/fleet, the pyfunc's data_path
        os.makedirs(data_dir)
        for name, path in local_artifacts.items():
            shutil.copyfile(path, os.path.join(data_dir, name))
        model_data = {
            "format": MODEL_DATA_FORMAT,
            "manifest_uri": public_manifest_uri,
            "version_id": version_id,
            "manifest_sha256": version_tags[MANIFEST_SHA256_TAG],
            "storage_options_env": STORAGE_OPTIONS_ENV,
            "storage_options": public_options(storage_options or {}),
        }
        with open(os.path.join(data_dir, MODEL_DATA_FILE), "w") as f:
            json.dump(model_data, f, indent=2)
        files_dir = os.path.join(tmp, "run_files")
        os.makedirs(files_dir)
        for name, data in (run_files or {}).items():
            with open(os.path.join(files_dir, _check_name("run file name", name)), "wb") as f:
                f.write(data)
        plots_dir = os.path.join(tmp, "plots")
        os.makedirs(plots_dir)
        for name, data in plot_files.items():
            with open(os.path.join(plots_dir, name), "wb") as f:
                f.write(data)

        with _fluent_uris(uri):
            if mlflow_run_id is None:
                active = mlflow.start_run(experiment_id=experiment_id, run_name=version_id, tags=run_tags)
            else:
                active = mlflow.start_run(run_id=mlflow_run_id)  # the compress's own run, resumed
            with active as run:
                run_id = run.info.run_id
                if mlflow_run_id is None:
                    _log_batches(client, run_id, _clean_metrics(metrics), _clean_params(params, secrets))
                else:
                    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in run_tags.items()])
                    logged = client.get_run(run_id).data
                    _log_params_once(client, run_id, logged.params, _clean_params(params, secrets))
                    _log_batches(client, run_id, {k: v for k, v in _clean_metrics(metrics).items()
                                                  if logged.metrics.get(k) != v}, {})
                if plot_files:
                    client.log_artifacts(run_id, plots_dir, "plots")
                if run_files:
                    client.log_artifacts(run_id, files_dir)
                from fleet.serve.pyfunc import (
                    model_signature,  # lazily: fleet.serve.pyfunc imports serving (torch)
                )

                info = mlflow.pyfunc.log_model(
                    name="model",
                    loader_module="fleet.serve.pyfunc",
                    data_path=data_dir,
                    code_paths=[FLEET_CODE_DIR],  # <model>/code/fleet: loadable where fleet is not installed
                    pip_requirements=_pip_requirements(),
                    signature=model_signature(),  # declares the with_status and top_k params, else MLflow drops them
                    input_example=example,
                )
            with registry_lock(uri):
                found = _versions_of(client, fleet_name, version_id)
                if found:  # a concurrent call registered this version id since the check above
                    _discard_duplicate(client, run_id, found[0])
                    return _existing(client, fleet_name, found[0], public_manifest_uri)
                try:
                    _check_champion(client, fleet_name, champion_before,
                                    f"fleet version {version_id!r} was gated against it",
                                    "re-run it (same run id) to gate it against the new champion")
                except ChampionMovedError:
                    if mlflow_run_id is None:
                        client.delete_run(run_id)
                    else:  # kept: re-running the run id continues it
                        client.set_terminated(run_id, "FAILED")
                    raise
                # register_model (rather than log_model's registered_model_name) sets the version's
                # tags in the same call that creates it: no reader ever sees a version without them.
                model_version = mlflow.register_model(info.model_uri, fleet_name, tags=version_tags)
                version = str(model_version.version)
                if result.passed:
                    _move_champion(client, fleet_name, version, reason="gate")

    if not result.passed:
        logger.warning("%s version %s (%s) failed the gate; champion stays %s: %s",
                       fleet_name, version, version_id, champion_before, "; ".join(result.reasons))
    return RegisteredVersion(name=fleet_name, version=version, run_id=run_id, manifest_uri=public_manifest_uri,
                             gate=result, champion=result.passed)



# ----------------------------------------------------------------------------- the run of a compress

#: Run tag on a compress run deleted because its version id was registered by another run meanwhile: that
#: model version (``register_version`` with ``mlflow_run_id``).
DUPLICATE_TAG = "fleet.duplicate_of"
#: Run tag listing the params a resumed compress run was asked to log with another value than the one already
#: logged (``--force-config``); MLflow keeps the first value.
PARAMS_CHANGED_TAG = "fleet.params_changed_on_resume"
#: The statuses :func:`end_compress_run` accepts.
END_STATUSES = ("FINISHED", "FAILED", "KILLED")


def start_compress_run(fleet_name: str, version_id: str, params: dict, tracking_uri: str | None = None, *,
                       storage_options: dict | None = None, resume_run_id: str | None = None) -> str:
    """Start the MLflow run of one ``fleet compress`` (named ``version_id``, in the experiment
    ``fleet-<fleet_name>``, tags ``fleet.name`` and ``fleet.version_id``) and log ``params`` into it
    (flattened and scrubbed as :func:`register_version` does: credential-looking keys dropped, values of
    ``storage_options`` and URI credentials masked); return its run id.

    ``resume_run_id`` (the run an interrupted compress of the same version id started) is continued instead,
    set back to RUNNING, when it is still in this registry, not deleted and of the same fleet version; its
    params keep their first values (a changed one is named in the tag :data:`PARAMS_CHANGED_TAG`). Otherwise
    a new run is started. :class:`RegistryError` naming the tracking URI when the registry cannot be written.
    """
    _check_name("fleet name", fleet_name)
    _check_name("version id", version_id)
    uri = _resolve_uri(tracking_uri)
    clean = _clean_params(params, secret_values(storage_options or {}))
    with _reading(uri):
        client = _client(uri)
        experiment_id = _experiment_id(client, uri, f"fleet-{fleet_name}")
        run = _resumable_run(client, resume_run_id, experiment_id, version_id) if resume_run_id else None
        if run is None:
            run = client.create_run(experiment_id, run_name=version_id,
                                    tags={"fleet.name": fleet_name, "fleet.version_id": version_id})
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
        if _not_found(err) or err.error_code == "INVALID_PARAMETER_VALUE":
            logger.info("MLflow run %s of fleet version %s is not in this registry: starting a new one", run_id,
                        version_id)
            return None
        raise
    if (run.info.lifecycle_stage != "active" or run.info.experiment_id != experiment_id
            or run.data.tags.get("fleet.version_id") != version_id):
        logger.info("MLflow run %s is deleted or not fleet version %s's: starting a new one", run_id, version_id)
        return None
    return run


def _log_params_once(client: MlflowClient, run_id: str, logged: dict, params: dict[str, str]) -> None:
    """Log the ``params`` not logged yet (MLflow refuses to change one); name the changed ones in the tag
    :data:`PARAMS_CHANGED_TAG`."""
    changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
    if changed:
        logger.warning("MLflow run %s keeps the first value of its param(s) %s (changed on resume)", run_id,
                       ", ".join(changed))
        client.set_tag(run_id, PARAMS_CHANGED_TAG, json.dumps(changed)[:_PARAM_MAX])
    _log_batches(client, run_id, {}, {k: v for k, v in params.items() if k not in logged})


def log_run_metrics(run_id: str, metrics: dict, step: int, tracking_uri: str | None = None) -> None:
    """Log ``metrics`` (flattened, sanitised, finite only) into the run ``run_id`` at ``step``, timestamped now
    (``fleet compress`` logs each stage's seconds as it ends). Progress only: an error is logged as a warning,
    never raised (registering at the end needs the registry anyway)."""
    uri = _resolve_uri(tracking_uri)
    try:
        _log_batches(_client(uri), run_id, _clean_metrics(metrics), {}, step=step)
    except Exception as err:  # noqa: BLE001 - a store or network error of any kind: the compress goes on
        logger.warning("metrics not logged into MLflow run %s (%s): %s", run_id, scrub(uri), err)


def end_compress_run(run_id: str, status: str, tracking_uri: str | None = None) -> None:
    """End the run ``run_id`` with ``status`` (:data:`END_STATUSES`) if it is still RUNNING (a run that
    :func:`register_version` ended is left as it is). Called on the way out of a failed compress: an error is
    logged as a warning, never raised."""
    if status not in END_STATUSES:
        raise ValueError(f"status must be one of {', '.join(END_STATUSES)}, got {status!r}")
    uri = _resolve_uri(tracking_uri)
    try:
        client = _client(uri)
        run = client.get_run(run_id)
        if run.info.status == "RUNNING" and run.info.lifecycle_stage == "active":
            client.set_terminated(run_id, status)
    except Exception as err:  # noqa: BLE001 - any store or network error: the compress's own error matters more
        logger.warning("MLflow run %s (%s) not ended %s: %s", run_id, scrub(uri), status, err)


def _discard_duplicate(client: MlflowClient, run_id: str, model_version) -> None:
    """The run ``run_id`` logged a fleet version that ``model_version`` (another run's) registered
    meanwhile: tag it :data:`DUPLICATE_TAG` and delete it (one run per version). Nothing when it is that run."""
    if model_version.run_id == run_id:
        return
    client.set_tag(run_id, DUPLICATE_TAG, f"{model_version.name}/{model_version.version}")
    client.delete_run(run_id)

def _champion_metrics(client: MlflowClient, name: str) -> tuple[str | None, dict | None]:
    """``(champion version, its run's metrics)``: what the gate compares a candidate with (None, None: no
    champion; metrics None: a champion without a run)."""
    champion = _champion(client, name)
    if champion is None:
        return None, None
    run_id = _get_version(client, name, champion).run_id
    return champion, client.get_run(run_id).data.metrics if run_id else None


def preview_gate(name: str, metrics: dict, gate: GateConfig | None = None,
                 tracking_uri: str | None = None) -> tuple[GateResult, str | None]:
    """``(gate result, champion version)``: :func:`evaluate_gate` of ``metrics`` against the current champion,
    as :func:`register_version` will decide it unless ``champion`` moves before then (the run report shows
    it before the version is committed). Reads only: :class:`RegistryError` naming the tracking URI when the
    registry cannot be read."""
    _check_name("registered model name", name)
    uri = _resolve_uri(tracking_uri)
    with _reading(uri):
        champion, champion_metrics = _champion_metrics(_client(uri), name)
    return evaluate_gate(metrics, champion_metrics, gate if gate is not None else GateConfig()), champion


def champion_version(name: str, tracking_uri: str | None = None, *, create: bool = True) -> str | None:
    """The version holding ``champion``, or None (no such alias or registered model); raises
    :class:`RegistryError` naming the tracking URI when the registry cannot be read. With ``create=False``
    (``nightly --dry-run``) a SQLite registry whose database does not exist yet has no champion (None), and
    nothing is created."""
    _check_name("registered model name", name)
    uri = _resolve_uri(tracking_uri)
    path = _sqlite_path(uri)
    if not create and path is not None and path not in _INITIALISED and not os.path.isfile(path):
        return None
    with _reading(uri):
        return _champion(_client(uri, create=create), name)


def find_version(name: str, version_id: str, tracking_uri: str | None = None, *,
                 create: bool = True) -> RegisteredVersion | None:
    """The model version of ``name`` registered for the fleet version ``version_id`` (``existing=True``;
    the oldest if there are several), or None; :class:`RegistryError` naming the tracking URI when the
    registry cannot be read (with ``create=False``, a read-only command's, also when a SQLite registry does
    not exist: nothing is created)."""
    _check_name("registered model name", name)
    _check_name("version id", version_id)
    uri = _resolve_uri(tracking_uri)
    with _reading(uri):
        client = _client(uri, create=create)
        found = _versions_of(client, name, version_id)
        return _existing(client, name, found[0], None) if found else None


def promote(name: str, version: str | int, tracking_uri: str | None = None, reason: str = "manual") -> None:
    """Move ``champion`` to ``version`` (no gate) and record it in ``champion_history``.

    Compare-and-set: the champion read first is re-read under :func:`registry_lock`; if another writer
    moved it meanwhile, :class:`ChampionMovedError` is raised and nothing changes.
    """
    _check_name("registered model name", name)
    uri = _resolve_uri(tracking_uri)
    with _reading(uri):
        client = _client(uri, create=False)
        version = str(_get_version(client, name, version).version)
        expected = _champion(client, name)
        if expected == version:
            return
        with registry_lock(uri):
            _check_champion(client, name, expected, f"promoting version {version}",
                            f"run `fleet promote {name} {version}` again if it should still replace it")
            _move_champion(client, name, version, reason=reason)


def rollback(name: str, tracking_uri: str | None = None) -> str:
    """Move ``champion`` back to the version that held it before the current one; return it.

    Pops the current champion off ``champion_history`` (versions deleted since are skipped).
    Raises :class:`RegistryError` when there is no champion or no earlier one. Compare-and-set: the
    champion read first is re-read under :func:`registry_lock`; if another writer moved it meanwhile
    (e.g. a concurrent rollback), :class:`ChampionMovedError` is raised and nothing changes.
    """
    _check_name("registered model name", name)
    uri = _resolve_uri(tracking_uri)
    with _reading(uri):
        client = _client(uri, create=False)
        current = _champion(client, name)
        if current is None:
            raise RegistryError(f"registered model {name!r} has no {CHAMPION} to roll back from")
        with registry_lock(uri):
            _check_champion(client, name, current, "rolling back from it",
                            f"check `fleet versions {name}` and run `fleet rollback {name}` again if needed")
            return _rollback_from(client, name, current)


def _rollback_from(client: MlflowClient, name: str, current: str) -> str:
    """:func:`rollback`'s writes, under :func:`registry_lock` with ``champion`` checked to be ``current``."""
    history = _read_history(client, name)
    if not history or str(history[-1]["version"]) != current:  # alias moved outside fleet
        history.append({"version": current, "reason": "external", "at": _now()})
    while history and str(history[-1]["version"]) == current:
        history.pop()
    while history:
        previous = str(history[-1]["version"])
        try:
            _get_version(client, name, previous)
            break
        except RegistryError:
            history.pop()
    else:
        raise RegistryError(
            f"registered model {name!r}: no earlier {CHAMPION} to roll back to (current is version {current})"
        )
    # History first, then the alias: stopping in between leaves the stack one entry short, which
    # the reconciliation above repairs on the next rollback.
    _write_history(client, name, history)
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_model_version_tag(name, current, "rolled_back_at", _now())
    return previous


def resolve_manifest_uri(model_uri: str, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """``models:/NAME@alias`` or ``models:/NAME/VERSION`` -> ``(manifest_uri, version_id)`` from the
    model version's tags; any other URI (a manifest or version directory) -> ``(model_uri, None)``."""
    return resolve_version(model_uri, tracking_uri)[:2]


def resolve_version(model_uri: str, tracking_uri: str | None = None) -> tuple[str, str | None, str | None]:
    """:func:`resolve_manifest_uri` plus the ``manifest_sha256`` tag: ``(manifest_uri, version_id,
    manifest_sha256)`` (None for a version registered without it, and for a plain URI)."""
    if not isinstance(model_uri, str) or not model_uri:
        raise ValueError(f"model URI must be a non-empty string, got {model_uri!r}")
    if not model_uri.startswith("models:"):
        return model_uri, None, None
    found = resolve_model_version(model_uri, tracking_uri)
    return relocated(found["manifest_uri"]), found["version_id"], found["manifest_sha256"]


def resolve_model_version(model_uri: str, tracking_uri: str | None = None) -> dict:
    """``models:/NAME@alias`` or ``models:/NAME/VERSION`` -> ``{"name", "version", "alias", "manifest_uri",
    "version_id", "manifest_sha256"}`` (``alias`` None for a numbered URI; ``version_id`` and
    ``manifest_sha256`` None when the version lacks the tag). :class:`RegistryError` when the model,
    alias or version does not exist or the version has no ``manifest_uri`` tag; ValueError for another URI."""
    match = _MODEL_URI_RE.fullmatch(model_uri) if isinstance(model_uri, str) else None
    if match is None:
        raise ValueError(f"unsupported model URI {model_uri!r}: use models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias = match["name"], match["alias"]
    client = _client(tracking_uri, create=False)
    if alias is not None:
        try:
            version = client.get_registered_model(name).aliases.get(alias)
        except MlflowException as err:
            if _not_found(err):
                raise RegistryError(f"{model_uri}: no registered model {name!r}") from None
            raise
        if version is None:
            raise RegistryError(f"{model_uri}: registered model {name!r} has no alias {alias!r}")
    else:
        version = match["version"]
    tags = _get_version(client, name, version).tags
    if not tags.get("manifest_uri"):
        raise RegistryError(f"{model_uri}: version {version} has no manifest_uri tag (not registered by fleet?)")
    return {"name": name, "version": str(version), "alias": alias, "manifest_uri": tags["manifest_uri"],
            "version_id": tags.get("version_id"), "manifest_sha256": tags.get(MANIFEST_SHA256_TAG)}


def list_versions(name: str, tracking_uri: str | None = None) -> list[dict]:
    """Every version of ``name``, oldest first: ``version``, ``version_id``, ``manifest_uri``,
    ``parent_version_id``, ``aliases``, ``champion``, ``created`` (ISO 8601 UTC), ``gate``
    (``passed`` / ``failed`` / None), ``gate_reasons``, ``gate_notes``, ``run_id``."""
    _check_name("registered model name", name)
    client = _client(tracking_uri, create=False)
    try:
        aliases_of: dict[str, list[str]] = {}
        for alias, version in client.get_registered_model(name).aliases.items():
            aliases_of.setdefault(str(version), []).append(alias)
    except MlflowException as err:
        if _not_found(err):
            raise RegistryError(f"no registered model named {name!r}") from None
        raise
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", max_results=1000, page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            break
    rows = []
    for mv in sorted(versions, key=lambda v: int(v.version)):
        version = str(mv.version)
        tags = mv.tags or {}
        created = datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=timezone.utc)
        rows.append({
            "version": version,
            "version_id": tags.get("version_id"),
            "manifest_uri": tags.get("manifest_uri"),
            "parent_version_id": tags.get("parent_version_id"),
            "aliases": sorted(aliases_of.get(version, [])),
            "champion": CHAMPION in aliases_of.get(version, []),
            "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "gate": tags.get("gate"),
            "gate_reasons": json.loads(tags["gate_reasons"]) if tags.get("gate_reasons") else [],
            "gate_notes": json.loads(tags["gate_notes"]) if tags.get("gate_notes") else [],
            "rolled_back_at": tags.get("rolled_back_at"),
            "run_id": mv.run_id,
        })
    return rows


def champion_history(name: str, tracking_uri: str | None = None) -> list[dict]:
    """The ``champion_history`` tag of ``name``: ``{"version", "reason", "at"}`` entries, oldest first, the
    last one the current champion (empty when there is none). :class:`RegistryError` when the registry
    cannot be read or the model does not exist."""
    _check_name("registered model name", name)
    uri = _resolve_uri(tracking_uri)
    with _reading(uri):
        client = _client(uri, create=False)
        try:
            return _read_history(client, name)
        except MlflowException as err:
            if _not_found(err):
                raise RegistryError(f"no registered model named {name!r}") from None
            raise


#: Run tag set on the MLflow run of a model version :func:`delete_version` deleted (UTC time).
DELETED_TAG = "fleet.deleted_at"


def delete_version(name: str, version: str | int, tracking_uri: str | None = None) -> None:
    """Delete the model version ``version`` of ``name`` (``fleet gc``), unless it holds an alias.

    Under :func:`registry_lock`, the version's aliases are read again: a version that holds one (moved to it
    since the caller decided) raises :class:`RegistryError` and nothing is deleted. The MLflow run that
    logged it is kept (its params, metrics, plots and model artifacts: the history) and tagged
    :data:`DELETED_TAG`; ``champion_history`` keeps its entries (:func:`rollback` skips deleted versions).
    """
    _check_name("registered model name", name)
    uri = _resolve_uri(tracking_uri)
    with _reading(uri):
        client = _client(uri, create=False)
        with registry_lock(uri):
            model_version = _get_version(client, name, version)
            aliases = [a for a, v in client.get_registered_model(name).aliases.items() if str(v) == str(version)]
            if aliases:
                raise RegistryError(f"registered model {name!r} version {version} holds the alias(es) "
                                    f"{', '.join(sorted(aliases))}: not deleted")
            client.delete_model_version(name, str(version))
        if model_version.run_id:
            try:
                client.set_tag(model_version.run_id, DELETED_TAG, _now())
            except MlflowException as err:  # the run itself was deleted by hand: nothing to mark
                logger.debug("run %s of %s version %s not tagged: %s", model_version.run_id, name, version, err)
