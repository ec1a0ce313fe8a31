"""MLflow side of fleet: one registered model per fleet, one model version per nightly run and the ``champion``
alias (``docs/architecture.md``, DESIGN section 3).

:func:`register_version` logs a run (into the experiment ``fleet-<fleet_name>``; or into the run of ``fleet
compress``, :mod:`fleet.storage.runs`) with params, metrics, plots and a pyfunc model whose artifacts are the
backbone and the manifest (heads stay in Parquet, referenced by the manifest URI), and registers it. Each model
version carries the tags ``version_id``, ``manifest_uri``, ``manifest_sha256``, ``parent_version_id`` (when there
is one), ``gate``, ``gate_reasons`` and ``gate_notes`` (checks that did not apply, e.g. the AUC checks on a fleet
without any hold-out AUC): the outcome of the promotion gate (:mod:`fleet.storage.promotion_gate`).

``champion`` moves only when the gate passes (:func:`register_version`) or by hand
(:func:`promote`, :func:`rollback`). Every move is recorded in the registered-model tag
``champion_history``: a JSON list of ``{"version", "reason", "at"}`` used as a stack whose last
entry is the current champion; :func:`rollback` pops it.

Registration is idempotent on (fleet, ``version_id``): registering a version id that is already
registered returns that version (:attr:`RegisteredVersion.existing`) and registers nothing. Every alias
move (the gate, :func:`promote`, :func:`rollback`) is a compare-and-set: it re-reads, under
:func:`fleet.storage.tracking.registry_lock`, the ``champion`` it based its decision on and raises
:class:`~fleet.core.errors.ChampionMovedError`, changing nothing, when another writer moved it meanwhile.

Where the registry is and how it is opened (tracking URIs, locks, the client) is :mod:`fleet.storage.tracking`.
A registry that cannot be read raises :class:`~fleet.core.errors.RegistryError` naming the tracking URI and the
error. Only writers (:func:`register_version`, and the lookups of ``fleet compress``) create a missing SQLite
database; the read-only functions (:func:`resolve_version`, :func:`list_versions`) and the alias moves
(:func:`promote`, :func:`rollback`) raise :class:`~fleet.core.errors.RegistryError` naming the URI instead.
Nothing here is safe to call from several threads at once: MLflow's fluent ``log_model`` needs the
process-wide tracking URI, which :func:`register_version` sets and restores around the call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata

import mlflow
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import fleet
from fleet.core.constants import ENV_STORAGE_OPTIONS, PYFUNC_CONFIG_FILE, PYFUNC_FORMAT
from fleet.core.errors import ChampionMovedError, RegistryError
from fleet.core.redact import public_options, scrub, secret_values
from fleet.storage.promotion_gate import GateResult, PromotionGate, evaluate_gate
from fleet.storage.runs import discard_duplicate_run, fleet_experiment, log_params_and_metrics
from fleet.storage.store import relocated
from fleet.storage.tracking import (
    check_name,
    database_missing,
    fluent_uris,
    not_found,
    registry_access,
    registry_client,
    registry_lock,
    resolve_tracking_uri,
)

logger = logging.getLogger(__name__)

CHAMPION = "champion"
HISTORY_TAG = "champion_history"
REQUIRED_ARTIFACTS = ("backbone.safetensors", "manifest.json")
#: Version tag: hex sha256 of the ``manifest.json`` artifact, which must be the stored manifest's bytes;
#: ``FleetModel.load`` refuses a manifest that does not match it.
MANIFEST_SHA256_TAG = "manifest_sha256"
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

_MODEL_URI_RE = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))")
_HISTORY_MAX = 200  # entries kept in champion_history (~70 bytes each, far below the tag limit)


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


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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
        raise ValueError(
            f"local artifact backbone.safetensors ({backbone_path}): no student_config.num_features "
            f"in its metadata ({exc!r}); cannot build the input example"
        ) from None


def _check_local_artifacts(local_artifacts: dict[str, str], fleet_name: str, version_id: str) -> None:
    missing = [name for name in REQUIRED_ARTIFACTS if name not in local_artifacts]
    if missing:
        raise ValueError(f"local_artifacts needs {', '.join(missing)} (got {sorted(local_artifacts)})")
    for name, path in local_artifacts.items():
        check_name("artifact name", name)
        if not os.path.isfile(path):
            raise ValueError(f"local artifact {name!r}: {path} is not a file")
    try:
        with open(local_artifacts["manifest.json"], "rb") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"local artifact manifest.json ({local_artifacts['manifest.json']}) is not JSON: {err}"
        ) from None
    if not isinstance(manifest, dict):
        raise ValueError(  # noqa: TRY004 - bad input, register_version raises ValueError
            f"local artifact manifest.json ({local_artifacts['manifest.json']}) is not a JSON object"
        )
    for key, expected in (("version_id", version_id), ("fleet", fleet_name)):
        if key in manifest and manifest[key] != expected:
            raise ValueError(f"manifest.json says {key}={manifest[key]!r} but register_version got {expected!r}")


def _check_plots(plots: dict[str, bytes]) -> dict[str, bytes]:
    out = {}
    for name, data in plots.items():
        base = name.removesuffix(".png")
        check_name("plot name", base)
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
        if not_found(err):
            return None
        raise
    return None if version is None else str(version)


def _get_version(client: MlflowClient, name: str, version: str | int):
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        if not_found(err) or err.error_code == "INVALID_PARAMETER_VALUE":
            raise RegistryError(f"registered model {name!r} has no version {version!r}") from None
        raise


def _describe(version: str | None) -> str:
    return "no version" if version is None else f"version {version}"


def _check_champion(client: MlflowClient, name: str, expected: str | None, doing: str, then: str) -> None:
    """The compare of compare-and-set (call it under :func:`registry_lock`): raise
    :class:`ChampionMovedError` unless ``champion`` is still ``expected``."""
    current = _champion(client, name)
    if current != expected:
        raise ChampionMovedError(
            f"registered model {name!r}: {CHAMPION} moved from {_describe(expected)} to "
            f"{_describe(current)} while {doing}; nothing was changed; {then}"
        )


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
        if not_found(err):
            return []
        raise
    return sorted(found, key=lambda mv: int(mv.version))


def _existing(client: MlflowClient, name: str, model_version, manifest_uri: str | None) -> RegisteredVersion:
    """``model_version`` as a :class:`RegisteredVersion` (``existing=True``); when ``manifest_uri`` is
    given it must be the one the version was registered with."""
    tags = model_version.tags or {}
    version_id = tags.get("version_id")
    if manifest_uri is not None and tags.get("manifest_uri") != manifest_uri:
        raise RegistryError(
            f"registered model {name!r}: fleet version {version_id!r} is already registered as "
            f"version {model_version.version} with manifest {tags.get('manifest_uri')!r}, not "
            f"{manifest_uri!r}; use another run id"
        )
    gate = None
    if tags.get("gate") is not None:
        gate = GateResult(
            passed=tags["gate"] == "passed",
            reasons=json.loads(tags.get("gate_reasons") or "[]"),
            notes=json.loads(tags.get("gate_notes") or "[]"),
        )
    version = str(model_version.version)
    return RegisteredVersion(
        name=name,
        version=version,
        run_id=model_version.run_id,
        manifest_uri=tags.get("manifest_uri"),
        gate=gate,
        champion=_champion(client, name) == version,
        existing=True,
    )


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
    gate: PromotionGate | None = None,
    storage_options: dict | None = None,
    parent_version_id: str | None = None,
    example_campaign_id: str | None = None,
    run_files: dict[str, bytes] | None = None,
    mlflow_run_id: str | None = None,
) -> RegisteredVersion:
    """Log one run and register one new version of the model ``fleet_name``; move ``champion`` to
    it when it passes ``gate`` (``PromotionGate()`` when None) against the current champion's metrics.

    Idempotent on (``fleet_name``, ``version_id``): when that version id is already registered (by an
    earlier or a concurrent call), nothing is logged or registered and that version is returned with
    ``existing=True`` (:class:`RegistryError` if it was registered with another ``manifest_uri``).
    Registering and moving ``champion`` happen under :func:`~fleet.storage.tracking.registry_lock`, after
    re-reading the champion the gate compared against: if it moved meanwhile, the run just logged is deleted
    (ended FAILED and kept when it is ``mlflow_run_id``), nothing is registered and :class:`ChampionMovedError`
    is raised (re-running gates against the new champion).

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
        mlflow_run_id: the run :func:`fleet.storage.runs.start_compress_run` started (``fleet compress``):
            everything is logged into it and it ends FINISHED, instead of a new run. When the version id turns out
            to be registered already by another run, this one is tagged :data:`fleet.storage.runs.DUPLICATE_TAG`
            and deleted; when ``champion`` moved, it ends FAILED and is kept (re-running the run id continues it).
    """
    check_name("fleet name", fleet_name)
    check_name("version id", version_id)
    if parent_version_id is not None:
        check_name("parent version id", parent_version_id)
    if not isinstance(manifest_uri, str) or not manifest_uri:
        raise ValueError(f"manifest_uri must be a non-empty string, got {manifest_uri!r}")
    _check_local_artifacts(local_artifacts, fleet_name, version_id)
    example = None
    if example_campaign_id is not None:
        # lazily: fleet.serve.pyfunc imports serving (torch)
        from fleet.serve.pyfunc import input_example

        example = input_example(example_campaign_id, _num_features(local_artifacts["backbone.safetensors"]))
    plot_files = _check_plots(plots)
    gate = gate if gate is not None else PromotionGate()
    secrets = secret_values(storage_options or {})
    public_manifest_uri = scrub(manifest_uri)
    if any(s in public_manifest_uri for s in secrets):
        raise ValueError(
            "manifest_uri contains a credential from storage_options; pass credentials only in storage_options"
        )
    if mlflow.active_run() is not None:
        raise RegistryError("register_version starts its own MLflow run: end the active run first")

    uri = resolve_tracking_uri(tracking_uri)
    client = registry_client(uri)
    with registry_access(uri):
        found = _versions_of(client, fleet_name, version_id)
    if found:
        logger.warning(
            "%s: fleet version %s is already registered as version %s; nothing registered",
            fleet_name,
            version_id,
            found[0].version,
        )
        if mlflow_run_id is not None:
            discard_duplicate_run(client, mlflow_run_id, found[0])
        return _existing(client, fleet_name, found[0], public_manifest_uri)
    experiment_id = fleet_experiment(client, uri, fleet_name)

    # The gate needs only the candidate's and the champion's metrics, so it is decided before the
    # version exists and its outcome is among the version's tags from the start.
    champion_before, champion_metrics = _champion_metrics(client, fleet_name)
    result = evaluate_gate(metrics, champion_metrics, gate)
    gate_status = "passed" if result.passed else "failed"

    version_tags = {
        "version_id": version_id,
        "manifest_uri": public_manifest_uri,
        "gate": gate_status,
        "gate_reasons": json.dumps(result.reasons),
        "gate_notes": json.dumps(result.notes),
    }
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
            "format": PYFUNC_FORMAT,
            "manifest_uri": public_manifest_uri,
            "version_id": version_id,
            "manifest_sha256": version_tags[MANIFEST_SHA256_TAG],
            "storage_options_env": ENV_STORAGE_OPTIONS,  # JSON storage options (credentials) at load time
            "storage_options": public_options(storage_options or {}),
        }
        with open(os.path.join(data_dir, PYFUNC_CONFIG_FILE), "w") as f:  # read by fleet.serve.pyfunc._load_pyfunc
            json.dump(model_data, f, indent=2)
        files_dir = os.path.join(tmp, "run_files")
        os.makedirs(files_dir)
        for name, data in (run_files or {}).items():
            with open(os.path.join(files_dir, check_name("run file name", name)), "wb") as f:
                f.write(data)
        plots_dir = os.path.join(tmp, "plots")
        os.makedirs(plots_dir)
        for name, data in plot_files.items():
            with open(os.path.join(plots_dir, name), "wb") as f:
                f.write(data)

        with fluent_uris(uri):
            if mlflow_run_id is None:
                active = mlflow.start_run(experiment_id=experiment_id, run_name=version_id, tags=run_tags)
            else:
                active = mlflow.start_run(run_id=mlflow_run_id)  # the compress's own run, resumed
            with active as run:
                run_id = run.info.run_id
                if mlflow_run_id is not None:  # the compress's own run: its tags now, what it lacks of the rest
                    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in run_tags.items()])
                log_params_and_metrics(client, run_id, params, metrics, secrets, resumed=mlflow_run_id is not None)
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
                    discard_duplicate_run(client, run_id, found[0])
                    return _existing(client, fleet_name, found[0], public_manifest_uri)
                try:
                    _check_champion(
                        client,
                        fleet_name,
                        champion_before,
                        f"fleet version {version_id!r} was gated against it",
                        "re-run it (same run id) to gate it against the new champion",
                    )
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
        logger.warning(
            "%s version %s (%s) failed the gate; champion stays %s: %s",
            fleet_name,
            version,
            version_id,
            champion_before,
            "; ".join(result.reasons),
        )
    return RegisteredVersion(
        name=fleet_name,
        version=version,
        run_id=run_id,
        manifest_uri=public_manifest_uri,
        gate=result,
        champion=result.passed,
    )


def _champion_metrics(client: MlflowClient, name: str) -> tuple[str | None, dict | None]:
    """``(champion version, its run's metrics)``: what the gate compares a candidate with (None, None: no
    champion; metrics None: a champion without a run)."""
    champion = _champion(client, name)
    if champion is None:
        return None, None
    run_id = _get_version(client, name, champion).run_id
    return champion, client.get_run(run_id).data.metrics if run_id else None


def preview_gate(
    name: str, metrics: dict, gate: PromotionGate | None = None, tracking_uri: str | None = None
) -> tuple[GateResult, str | None]:
    """``(gate result, champion version)``: :func:`evaluate_gate` of ``metrics`` against the current champion,
    as :func:`register_version` will decide it unless ``champion`` moves before then (the run report shows
    it before the version is committed). Reads only: :class:`RegistryError` naming the tracking URI when the
    registry cannot be read."""
    check_name("registered model name", name)
    uri = resolve_tracking_uri(tracking_uri)
    with registry_access(uri):
        champion, champion_metrics = _champion_metrics(registry_client(uri), name)
    return evaluate_gate(metrics, champion_metrics, gate if gate is not None else PromotionGate()), champion


def champion_version(name: str, tracking_uri: str | None = None, *, create: bool = True) -> str | None:
    """The version holding ``champion``, or None (no such alias or registered model); raises
    :class:`RegistryError` naming the tracking URI when the registry cannot be read. With ``create=False``
    (``nightly --dry-run``) a SQLite registry whose database does not exist yet has no champion (None), and
    nothing is created."""
    check_name("registered model name", name)
    uri = resolve_tracking_uri(tracking_uri)
    if not create and database_missing(uri):
        return None
    with registry_access(uri):
        return _champion(registry_client(uri, create=create), name)


def find_version(
    name: str, version_id: str, tracking_uri: str | None = None, *, create: bool = True
) -> RegisteredVersion | None:
    """The model version of ``name`` registered for the fleet version ``version_id`` (``existing=True``;
    the oldest if there are several), or None; :class:`RegistryError` naming the tracking URI when the
    registry cannot be read (with ``create=False``, a read-only command's, also when a SQLite registry does
    not exist: nothing is created)."""
    check_name("registered model name", name)
    check_name("version id", version_id)
    uri = resolve_tracking_uri(tracking_uri)
    with registry_access(uri):
        client = registry_client(uri, create=create)
        found = _versions_of(client, name, version_id)
        return _existing(client, name, found[0], None) if found else None


def promote(name: str, version: str | int, tracking_uri: str | None = None, reason: str = "manual") -> None:
    """Move ``champion`` to ``version`` (no gate) and record it in ``champion_history``.

    Compare-and-set: the champion read first is re-read under :func:`registry_lock`; if another writer
    moved it meanwhile, :class:`ChampionMovedError` is raised and nothing changes.
    """
    check_name("registered model name", name)
    uri = resolve_tracking_uri(tracking_uri)
    with registry_access(uri):
        client = registry_client(uri, create=False)
        version = str(_get_version(client, name, version).version)
        expected = _champion(client, name)
        if expected == version:
            return
        with registry_lock(uri):
            _check_champion(
                client,
                name,
                expected,
                f"promoting version {version}",
                f"run `fleet promote {name} {version}` again if it should still replace it",
            )
            _move_champion(client, name, version, reason=reason)


def rollback(name: str, tracking_uri: str | None = None) -> str:
    """Move ``champion`` back to the version that held it before the current one; return it.

    Pops the current champion off ``champion_history`` (versions deleted since are skipped).
    Raises :class:`RegistryError` when there is no champion or no earlier one. Compare-and-set: the
    champion read first is re-read under :func:`registry_lock`; if another writer moved it meanwhile
    (e.g. a concurrent rollback), :class:`ChampionMovedError` is raised and nothing changes.
    """
    check_name("registered model name", name)
    uri = resolve_tracking_uri(tracking_uri)
    with registry_access(uri):
        client = registry_client(uri, create=False)
        current = _champion(client, name)
        if current is None:
            raise RegistryError(f"registered model {name!r} has no {CHAMPION} to roll back from")
        with registry_lock(uri):
            _check_champion(
                client,
                name,
                current,
                "rolling back from it",
                f"check `fleet versions {name}` and run `fleet rollback {name}` again if needed",
            )
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
    client = registry_client(tracking_uri, create=False)
    if alias is not None:
        try:
            version = client.get_registered_model(name).aliases.get(alias)
        except MlflowException as err:
            if not_found(err):
                raise RegistryError(f"{model_uri}: no registered model {name!r}") from None
            raise
        if version is None:
            raise RegistryError(f"{model_uri}: registered model {name!r} has no alias {alias!r}")
    else:
        version = match["version"]
    tags = _get_version(client, name, version).tags
    if not tags.get("manifest_uri"):
        raise RegistryError(f"{model_uri}: version {version} has no manifest_uri tag (not registered by fleet?)")
    return {
        "name": name,
        "version": str(version),
        "alias": alias,
        "manifest_uri": tags["manifest_uri"],
        "version_id": tags.get("version_id"),
        "manifest_sha256": tags.get(MANIFEST_SHA256_TAG),
    }


def list_versions(name: str, tracking_uri: str | None = None) -> list[dict]:
    """Every version of ``name``, oldest first: ``version``, ``version_id``, ``manifest_uri``,
    ``parent_version_id``, ``aliases``, ``champion``, ``created`` (ISO 8601 UTC), ``gate``
    (``passed`` / ``failed`` / None), ``gate_reasons``, ``gate_notes``, ``run_id``."""
    check_name("registered model name", name)
    client = registry_client(tracking_uri, create=False)
    try:
        aliases_of: dict[str, list[str]] = {}
        for alias, version in client.get_registered_model(name).aliases.items():
            aliases_of.setdefault(str(version), []).append(alias)
    except MlflowException as err:
        if not_found(err):
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
        rows.append(
            {
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
            }
        )
    return rows


def champion_history(name: str, tracking_uri: str | None = None) -> list[dict]:
    """The ``champion_history`` tag of ``name``: ``{"version", "reason", "at"}`` entries, oldest first, the
    last one the current champion (empty when there is none). :class:`RegistryError` when the registry
    cannot be read or the model does not exist."""
    check_name("registered model name", name)
    uri = resolve_tracking_uri(tracking_uri)
    with registry_access(uri):
        client = registry_client(uri, create=False)
        try:
            return _read_history(client, name)
        except MlflowException as err:
            if not_found(err):
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
    check_name("registered model name", name)
    uri = resolve_tracking_uri(tracking_uri)
    with registry_access(uri):
        client = registry_client(uri, create=False)
        with registry_lock(uri):
            model_version = _get_version(client, name, version)
            aliases = [a for a, v in client.get_registered_model(name).aliases.items() if str(v) == str(version)]
            if aliases:
                raise RegistryError(
                    f"registered model {name!r} version {version} holds the alias(es) "
                    f"{', '.join(sorted(aliases))}: not deleted"
                )
            client.delete_model_version(name, str(version))
        if model_version.run_id:
            try:
                client.set_tag(model_version.run_id, DELETED_TAG, _now())
            except MlflowException as err:  # the run itself was deleted by hand: nothing to mark
                logger.debug("run %s of %s version %s not tagged: %s", model_version.run_id, name, version, err)
