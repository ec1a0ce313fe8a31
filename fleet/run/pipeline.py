"""Orchestration on Ray: the only module that imports ray. Stages are plain functions run as Ray tasks
over *batches* of campaigns; everything they exchange goes through the store URI, never driver disk."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import math
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from rich.console import Console

from fleet import DEFAULT_FLEET, DEFAULT_STORE
from fleet.compression.metrics import fleet_summary
from fleet.core.constants import ENV_FAULT_AFTER_STAGE, NAME_PATTERN, SUPPORTED_BITS
from fleet.core.errors import FleetError, RegistryError, StoreError, UsageError
from fleet.core.progress import stage_progress
from fleet.core.redact import scrub, secret_values
from fleet.formats.codec import HEADS_SCHEMA, conform_heads_table, rejects_to_table
from fleet.formats.events import (
    EVENTS_PART_ROWS,
    EventsDataset,
    data_fingerprint,
    events_complete,
    write_events_in_parts,
)
from fleet.formats.teacher_pack import locate_teachers
from fleet.formats.teachers import validate_loader_spec
from fleet.run import stages
from fleet.run.plan import Plan, balanced_batches, input_space, make_plan, run_settings, settings_sha256
from fleet.run.stages import ShardJob
from fleet.storage.store import (
    BACKBONE,
    HEADS_DIR,
    PLAN,
    REPORT,
    FleetVersion,
    RunDir,
    VersionWriter,
    absolute_uri,
    created_at_now,
    join_uri,
    list_versions,
    open_fs,
    remove_stale_temp_files,
    storage_options_from_env,
)
from fleet.synthetic import synth

console = Console(stderr=True)
TRANSIENT_ERRORS = (OSError, TimeoutError, ConnectionError)


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, *, dashboard: bool = False):
    """Connect to ``address`` (a Ray cluster) or start a local Ray sized to the machine (:func:`init_ray`).
    Reuses an already initialised Ray (tests share one per session) and leaves it running."""
    if ray.is_initialized():
        yield
        return
    init_ray(address, num_cpus, dashboard=dashboard)
    try:
        yield
    finally:
        ray.shutdown()


LOOPBACK = "127.0.0.1"


def init_ray(address: str | None = None, num_cpus: int | None = None, *, dashboard: bool = False) -> None:
    """``ray.init`` as every fleet job (and the test suite) does it: always with Ray's token authentication.

    Local Ray listens on 127.0.0.1 only, with a fresh random token in a 0600 file of a private temp dir
    (``RAY_AUTH_TOKEN_PATH``; an operator's ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` wins), and the
    dashboard only with ``dashboard=True``, on 127.0.0.1. ``address`` connects to a cluster with the token
    from ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` (else Ray's ``~/.ray/auth_token``), never from a flag.
    Either way ``ray.init`` runs from an empty private directory: Ray puts the driver's working
    directory on every worker's ``sys.path``, which must never expose a teacher or events directory.
    """
    _require_token_auth()
    try:
        with _empty_cwd():
            if address:
                ray.init(address=address, log_to_driver=False)
                return
            if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
                os.environ["RAY_AUTH_TOKEN_PATH"] = _local_token_file()
                from ray._raylet import AuthenticationTokenLoader

                AuthenticationTokenLoader.instance().reset_cache()
            with _loopback_node():
                context = ray.init(
                    num_cpus=num_cpus or os.cpu_count(),
                    include_dashboard=dashboard,
                    dashboard_host=LOOPBACK,
                    _node_ip_address=LOOPBACK,
                    log_to_driver=False,
                )
    except ray.exceptions.AuthenticationError as exc:
        raise FleetError(
            f"Ray refused the authentication token ({exc}); give the cluster's token in "
            "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (RAY_AUTH_MODE=token)",
            path=address,
        ) from None
    if dashboard and context.dashboard_url:
        console.print(f"Ray dashboard: http://{context.dashboard_url} (token: the file $RAY_AUTH_TOKEN_PATH names)")


def _require_token_auth() -> None:
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.strip().lower() != "token":
        raise FleetError(
            f"RAY_AUTH_MODE={mode!r}: fleet runs Ray only with token authentication; "
            "unset RAY_AUTH_MODE or set it to 'token'"
        )
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray._raylet import Config

    Config.initialize("")  # Ray reads RAY_AUTH_MODE at import; refresh it, as ray.init does when it enables auth


def _private_dir() -> str:
    """This process's private directory (0700, removed at exit): the local Ray's token file and the
    empty working directory ``ray.init`` runs from."""
    global _PRIVATE_DIR
    if _PRIVATE_DIR is None or not os.path.isdir(_PRIVATE_DIR):
        _PRIVATE_DIR = tempfile.mkdtemp(prefix="fleet-ray-")
        os.mkdir(os.path.join(_PRIVATE_DIR, "cwd"), 0o700)
        atexit.register(shutil.rmtree, _PRIVATE_DIR, True)
    return _PRIVATE_DIR


_PRIVATE_DIR: str | None = None


def _local_token_file() -> str:
    """A token for the local Ray: 32 random bytes (hex) in a file only this user can read, never printed."""
    path = os.path.join(_private_dir(), "auth_token")
    if not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


@contextmanager
def _empty_cwd():
    previous = os.getcwd()
    os.chdir(os.path.join(_private_dir(), "cwd"))
    try:
        yield
    finally:
        os.chdir(previous)


@contextmanager
def _loopback_node():
    """Ray 2.60's ``ray.init`` replaces a loopback ``_node_ip_address`` by the machine's routable IP (and
    then binds GCS, raylet, workers and agents to all interfaces) unless multi-node clusters are off for
    this process; turning that off while ``ray.init`` starts the node keeps every Ray port on 127.0.0.1
    (tests/test_security.py checks the listening sockets)."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _largest_node_cpus() -> int:
    """CPUs of the biggest alive node: the most one task can ask for (the cluster total may be
    spread over several nodes, and a task asking for more than any node has never runs)."""
    cpus = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")]
    return max(1, int(max(cpus, default=1)))


def _run_with_threads(fn: Callable, threads: int, *args: Any) -> Any:
    import torch

    torch.set_num_threads(threads)  # one task per core: never oversubscribe
    return fn(*args)


def map_on_ray(
    fn: Callable,
    batches: Sequence[Any],
    args: tuple,
    desc: str,
    *,
    threads: int = 1,
    sizes: Sequence[int] | None = None,
    done: int = 0,
    unit: str = "campaigns",
) -> list[Any]:
    """Run ``fn(batch, *args)`` for every batch as Ray tasks (retried on crashes and transient I/O
    errors), with a progress bar (:func:`fleet.core.progress.stage_progress`) that counts ``unit``: a batch
    counts ``sizes[i]`` (default :func:`campaigns_in`), and ``done`` were done before
    (the shards a resumed run skips). Results are returned in ``batches`` order. Tasks are spread over the
    cluster's nodes (``SPREAD``) rather than packed onto the driver's node, where a warm worker would
    otherwise take short tasks one after another while other nodes stay idle."""
    sizes = list(sizes) if sizes is not None else [campaigns_in(b) for b in batches]
    remote = ray.remote(
        num_cpus=threads, max_retries=3, retry_exceptions=list(TRANSIENT_ERRORS), scheduling_strategy="SPREAD"
    )(_run_with_threads)
    refs = [remote.remote(fn, threads, batch, *args) for batch in batches]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    with stage_progress(console) as progress:
        task = progress.add_task(desc, total=done + sum(sizes), completed=done, unit=unit)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                results[index[ref]] = ray.get(ref)
                progress.advance(task, sizes[index[ref]])
    return results


def campaigns_in(batch: Any) -> int:
    """Campaigns of a task's batch: a :class:`~fleet.run.plan.ShardJob`'s, a dict's ``"campaigns"`` (the bench's
    jobs), a list of ids, else one."""
    campaigns = (
        batch.campaigns if isinstance(batch, ShardJob) else batch.get("campaigns") if isinstance(batch, dict) else batch
    )
    return len(campaigns) if isinstance(campaigns, (list, tuple)) else 1


def run_synth(
    config: synth.SynthConfig,
    out_uri: str,
    storage_options: dict | None = None,
    address: str | None = None,
    part_rows: int = EVENTS_PART_ROWS,
) -> dict:
    """``fleet synth``: record ``out/synth.json``, write ``out/events/`` on the driver (campaigns generated in
    order and written about ``part_rows`` rows at a time, :func:`fleet.formats.events.write_events_in_parts`, so the
    driver's memory does not grow with the fleet), then train every teacher on Ray (per-user fleets: one task
    per pack writes its events part and its trained pack, :func:`fleet.synthetic.synth.build_user_pack`). Re-running an
    interrupted run with the same config resumes it (complete events and teachers already saved are kept;
    events whose writing was interrupted are written again before any teacher trains); an ``out`` that holds
    another fleet is refused, never overwritten."""
    started = time.perf_counter()
    out_uri = absolute_uri(out_uri).rstrip("/")
    _record_synth_config(config, out_uri, storage_options)
    events_uri, teachers_uri = f"{out_uri}/events", f"{out_uri}/teachers"
    if config.entities == "user":  # a task per pack: its entities' events, then their teachers trained together
        with ray_session(address):
            packs = list(range(math.ceil(config.campaigns / config.pack_size)))
            per_batch = map_on_ray(
                synth.build_user_pack,
                packs,
                (config, events_uri, teachers_uri, storage_options),
                "training teacher packs",
                sizes=[len(synth.pack_members(config, p)) for p in packs],
                unit="entities",
            )
        return {
            "seconds": time.perf_counter() - started,
            "events_uri": events_uri,
            "teachers_uri": teachers_uri,
            "campaigns": [s for batch in per_batch for s in batch],
        }
    ids = synth.campaign_ids(config.campaigns)
    rows: dict[str, int] = {}  # rows per campaign: all the driver keeps of the events (teacher batch sizes)

    def campaign_tables():
        for i, cid in enumerate(ids):
            table = synth.generate(config, i)
            rows[cid] = len(table)
            yield table

    if events_complete(events_uri, storage_options):  # a resumed run: only count the rows again
        for _ in campaign_tables():
            pass
    else:
        write_events_in_parts(events_uri, campaign_tables(), storage_options, part_rows)
    with ray_session(address):
        num_cpus = int(ray.cluster_resources().get("CPU", 1))
        # ~8 teachers per task: a progress bar that moves, and little lost when a run is interrupted
        batches = balanced_batches(
            {cid: float(n) for cid, n in rows.items()}, num_batches=max(4 * num_cpus, math.ceil(len(ids) / 8))
        )
        per_batch = map_on_ray(
            synth.train_teachers, batches, (config, events_uri, teachers_uri, storage_options), "training teachers"
        )
    stats = sorted((s for batch in per_batch for s in batch), key=lambda s: s["campaign_id"])
    return {
        "seconds": time.perf_counter() - started,
        "events_uri": events_uri,
        "teachers_uri": teachers_uri,
        "campaigns": stats,
    }


def _record_synth_config(config: synth.SynthConfig, out_uri: str, storage_options: dict | None) -> None:
    """Write ``synth.json`` or check that the one there matches ``config`` (then the run resumes)."""
    fs, root = open_fs(out_uri, storage_options)
    path, wanted = f"{root}/{synth.SYNTH_FILE}", dataclasses.asdict(config)
    if fs.exists(path):
        recorded = synth.with_defaults(json.loads(fs.cat_file(path)))  # fields added since: their defaults
        diff = sorted(k for k in set(wanted) | set(recorded) if wanted.get(k) != recorded.get(k))
        if diff:
            raise FleetError(
                f"holds another synthetic fleet (differs in {', '.join(diff)}); pick another --out",
                path=f"{out_uri}/{synth.SYNTH_FILE}",
            )
        return
    if fs.exists(f"{root}/teachers") or fs.exists(f"{root}/events"):
        raise FleetError(
            "holds events or teachers but no synth.json (not written by this fleet synth); pick another --out",
            path=out_uri,
        )
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(path, json.dumps(wanted, indent=2, sort_keys=True).encode())


# ---------------------------------------------------------------------------------------------
# fleet compress


#: Exit codes of a finished run (1: failed, 2: usage error): some campaigns quarantined; the version failed
#: its quality gate and is not champion (quarantined campaigns, if any, are in the summary too).
EXIT_QUARANTINED, EXIT_NOT_PROMOTED = 3, 4


@dataclass
class CompressResult:
    """Outcome of :func:`run_compress`: the version written, its metrics and the exit code."""

    version_id: str
    manifest_uri: str
    metrics: dict
    exit_code: int
    registered: Any = None
    rejects: list[dict] = field(default_factory=list)


def _fault_point(stage: str) -> None:
    """Crash-test hook: ``FLEET_FAULT_AFTER_STAGE=<stage>`` SIGKILLs the driver once ``stage`` is done."""
    if os.environ.get(ENV_FAULT_AFTER_STAGE) == stage:
        os.kill(os.getpid(), signal.SIGKILL)


def _borrowed_pool(run_dir: RunDir, config: stages.CompressConfig) -> pa.Table | None:
    """The run's borrowed pool (written by :func:`_soft_labels_stage` before its tasks), or None when it has none."""
    return run_dir.read_borrowed_pool() if config.borrowed_rows else None


def _task_result(job: ShardJob, started: float) -> dict:
    """What a stage task tells the driver: its shard, its seconds and its node."""
    return {
        "shard": job.shard,
        "seconds": time.perf_counter() - started,
        "node": ray.get_runtime_context().get_node_id(),
    }


def _soft_labels_task(job: ShardJob, ctx: stages.StageContext, run_dir: RunDir) -> dict:
    started = time.perf_counter()
    soft, campaigns = stages.soft_labels(job, ctx, _borrowed_pool(run_dir, ctx.config))
    ok = [c for c, s in zip(campaigns["campaign_id"].to_pylist(), campaigns["status"].to_pylist()) if s == "ok"]
    if job.backbone_quota:
        quotas = {c: job.backbone_quota[c] for c in ok}
        run_dir.backbone_sample.write(job.shard, stages.backbone_sample(soft, quotas, ctx.config.seed))
    run_dir.campaigns.write(job.shard, campaigns)
    run_dir.soft_labels.write(job.shard, soft)  # written last: its marker means "shard done"
    return _task_result(job, started)


def _heads_task(job: ShardJob, ctx: stages.StageContext, run_dir: RunDir) -> dict:
    started = time.perf_counter()
    shards = list(job.parts) or [job.shard]
    soft = pa.concat_tables([run_dir.soft_labels.read(shard) for shard in shards])
    heads = stages.fit_heads_shard(job, ctx, soft, run_dir.read_backbone(), _borrowed_pool(run_dir, ctx.config))
    for shard in shards:  # one heads file per shard (its marker: "shard done"), as when fitted alone
        mine = heads if not job.parts else heads.filter(pc.is_in(heads["campaign_id"], pa.array(job.parts[shard])))
        run_dir.heads.write(shard, mine)
    return _task_result(job, started)


#: The backbone task rewrites its progress in the run's work dir (stage 2's bar reads it: ``{"attempt", "step",
#: "steps", "loss", "validation_loss"}``, :meth:`~fleet.storage.store.RunDir.read_backbone_progress`) at most every
#: this many seconds.
BACKBONE_PROGRESS_SECONDS = 2.0
#: How often the driver reads the backbone's progress while stage 2 runs.
BACKBONE_POLL_SECONDS = 1.0


class _ProgressWriter:
    """``train_backbone``'s ``report``: writes the latest record to the work dir, at most every
    :data:`BACKBONE_PROGRESS_SECONDS` seconds (and always the last step)."""

    def __init__(self, run_dir: RunDir, attempt: str):
        self.run_dir, self.attempt, self.last = run_dir, attempt, -math.inf

    def __call__(self, record: dict) -> None:
        now = time.monotonic()
        if now - self.last >= BACKBONE_PROGRESS_SECONDS or record["step"] >= record["steps"]:
            self.last = now
            self.run_dir.write_backbone_progress({**record, "attempt": self.attempt})


def _backbone_task(sample: pa.Table, ctx: stages.StageContext, run_dir: RunDir, attempt: str = "") -> dict:
    data, stats = stages.train_backbone(
        sample, ctx, pool=_borrowed_pool(run_dir, ctx.config), report=_ProgressWriter(run_dir, attempt)
    )
    run_dir.write_backbone(data)
    return {**stats, "node": ray.get_runtime_context().get_node_id()}


def _train_backbone_on_ray(sample: pa.Table, ctx: stages.StageContext, run_dir: RunDir, threads: int) -> dict:
    """Stage 2 as one Ray task, its bar counting training steps (with the loss and an ETA) from the progress
    the task writes to the work dir (a record of an earlier attempt is ignored)."""
    attempt = secrets.token_hex(8)
    remote = ray.remote(
        num_cpus=threads, max_retries=3, retry_exceptions=list(TRANSIENT_ERRORS), scheduling_strategy="SPREAD"
    )(_run_with_threads)
    ref = remote.remote(_backbone_task, threads, sample, ctx, run_dir, attempt)
    steps = ctx.config.backbone_steps * len(ctx.config.backbone_widths())
    with stage_progress(console) as progress:
        task = progress.add_task("stage 2  backbone", total=steps, unit="steps")

        def show() -> None:
            try:
                record = run_dir.read_backbone_progress()
            except (StoreError, OSError, ValueError):
                return
            if record.get("attempt") == attempt:
                note = f"loss {record['loss']:.4f}"
                if record.get("validation_loss") is not None:
                    note += f" (validation {record['validation_loss']:.4f})"
                progress.update(task, completed=record["step"], total=record["steps"], note=note)

        while not ray.wait([ref], timeout=BACKBONE_POLL_SECONDS)[0]:
            show()
        stats = ray.get(ref)
        show()
    return stats


def _train_backbone_distributed(sample: pa.Table, ctx: stages.StageContext, run_dir: RunDir, workers: int) -> dict:
    """Stage 2 on Ray Train: ``workers`` DDP workers, each on its share of every step's minibatches;
    rank 0 writes the backbone and its stats to the work dir."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer, prepare_model

    def loop(loop_config: dict) -> None:
        import ray.train as rt

        context, work = rt.get_context(), loop_config["run_dir"]
        data, stats = stages.train_backbone(
            loop_config["sample"],
            loop_config["ctx"],
            rank=context.get_world_rank(),
            world_size=context.get_world_size(),
            wrap=lambda m: prepare_model(m, move_to_device=False),
            pool=_borrowed_pool(work, loop_config["ctx"].config),
        )
        if context.get_world_rank() == 0:
            work.write_backbone(data)
            work.write_backbone_stats(
                {**stats, "backbone_workers": context.get_world_size(), "node": ray.get_runtime_context().get_node_id()}
            )

    import pyarrow.fs

    fs, path = run_dir.ray_train_storage()  # Ray Train's checkpoints live on the store too
    trainer = TorchTrainer(
        loop,
        train_loop_config={"sample": sample, "ctx": ctx, "run_dir": run_dir},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name="backbone", storage_path=path, storage_filesystem=pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
        ),
    )
    trainer.fit()
    return run_dir.read_backbone_stats()


def _parent_version(fleet: str, store_uri: str, tracking_uri: str | None, storage_options: dict | None):
    """The champion's fleet version (the parent of an incremental run), or None when the fleet has no
    champion yet. A registry that cannot be read raises :class:`~fleet.core.errors.RegistryError` (naming
    the tracking URI): a run never falls back to a full run without lineage silently (``--no-parent``)."""
    from fleet.storage import registry

    try:
        version = registry.champion_version(fleet, tracking_uri)
    except RegistryError as exc:
        raise RegistryError(
            f"{exc}; fleet {fleet!r} needs its champion as the parent of an incremental "
            "run: fix the registry, or pass --no-parent for a full run without a parent"
        ) from None
    if version is None:
        console.print(f"fleet {fleet!r} has no champion yet: full run (backbone trained, every head fitted)")
        return None
    manifest_uri, _ = registry.resolve_manifest_uri(f"models:/{fleet}@champion", tracking_uri)
    try:
        return FleetVersion.open(manifest_uri, storage_options)
    except StoreError as exc:
        raise StoreError(
            f"the champion of fleet {fleet!r} (registered version {version}) cannot be read, so no "
            f"incremental run can start from it; promote or roll back to a readable version: {exc}",
            path=manifest_uri,
        ) from None


#: fsspec protocols whose files exist in one process only: no Ray worker can read or write them.
PROCESS_LOCAL_PROTOCOLS = ("memory",)


def check_compress_inputs(
    teachers_uri: str, events_uri: str, store_uri: str, storage_options: dict | None = None
) -> None:
    """Raise :class:`~fleet.core.errors.UsageError` (``fleet`` exit 2) naming the flag and the URI when an input of
    ``fleet compress`` cannot work, before Ray starts or the registry is opened: a URI on a process-local
    filesystem (``memory://``: Ray workers run in other processes, so no version could be written there),
    or a teachers root or events dataset that does not exist."""
    for flag, uri in (("--teachers", teachers_uri), ("--events", events_uri), ("--store", store_uri)):
        protocol = uri.split("://", 1)[0] if "://" in uri else "file"
        if protocol in PROCESS_LOCAL_PROTOCOLS:
            raise UsageError(
                f"{flag}: {protocol}:// lives in this process only, which no Ray worker can reach; "
                "use a local path (one machine) or s3:// (a cluster)",
                path=uri,
            )
    for flag, uri, what in (("--teachers", teachers_uri, "teacher root"), ("--events", events_uri, "events dataset")):
        fs, path = open_fs(uri, storage_options)
        if not fs.exists(path):
            raise UsageError(f"{flag}: {what} does not exist", path=uri)


def new_run_id() -> str:
    """The default run id: the UTC time to the second, e.g. ``20261202T151203Z``."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def compress_config(
    config: stages.CompressConfig | dict | str | None = None,
    *,
    bits: int | str | None = None,
    codec: str | None = None,
    allow_loaders: Sequence[str] = (),
) -> stages.CompressConfig:
    """The :class:`~fleet.run.stages.CompressConfig` of a run: ``config`` (a ``CompressConfig``, left unchanged; a dict of
    its fields; a JSON or TOML file path; None: the defaults), then ``bits`` (``"auto"`` or 1, 2, 4, 8, 16, as an int
    or a string) and ``codec`` over it when given, and ``allow_loaders`` added to its own. ValueError names a bad
    value (``fleet compress`` exit 2)."""
    if config is None:
        config = stages.CompressConfig()
    elif isinstance(config, dict):
        config = stages.CompressConfig.from_dict(config)
    elif isinstance(config, str):
        config = stages.CompressConfig.from_file(config)
    elif not isinstance(config, stages.CompressConfig):
        raise ValueError(
            f"config must be a CompressConfig, a dict of its fields or a file path, not {type(config).__name__}"
        )
    added = [validate_loader_spec(spec) for spec in allow_loaders]
    overrides: dict[str, Any] = {"allow_loaders": list(dict.fromkeys([*config.allow_loaders, *added]))}
    if bits is not None:
        overrides["bits"] = bits  # "16" -> 16 in CompressConfig.__post_init__
    if codec is not None:
        overrides["codec"] = codec
    return dataclasses.replace(config, **overrides)  # __post_init__ checks the result


def compress(
    teachers: str,
    events: str,
    *,
    store: str = DEFAULT_STORE,
    fleet: str = DEFAULT_FLEET,
    config: stages.CompressConfig | dict | str | None = None,
    bits: int | str | None = None,
    codec: str | None = None,
    allow_loaders: Sequence[str] = (),
    run_id: str | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    retrain_backbone: bool = False,
    storage_options: dict | None = None,
    register: bool = True,
    no_parent: bool = False,
    force_config: bool = False,
    dashboard: bool = False,
    resume_command: str | None = None,
) -> CompressResult:
    """``fleet compress`` as a function (``fleet.compress``; the CLI calls this): distil the teachers under
    ``teachers`` on the events dataset ``events`` into one fleet version of ``fleet`` in ``store``, register it in
    MLflow (``tracking_uri``; default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///fleet-data/mlflow.db``) and move the
    ``champion`` alias when it passes the quality gate.

    ``config``, ``bits``, ``codec`` and ``allow_loaders`` make the run's configuration (:func:`compress_config`);
    ``storage_options`` default to ``$FLEET_STORAGE_OPTIONS``; every other argument is :func:`run_compress`'s (the
    flag of the same name: ``run_id`` resumes an interrupted run, ``address`` runs on a Ray cluster, ...). Returns
    the :class:`CompressResult` (``exit_code``: the CLI's, 0 ok / 3 quarantined / 4 not promoted); raises
    :class:`~fleet.core.errors.UsageError` or ValueError for inputs that cannot work, :class:`~fleet.core.errors.FleetError`
    for a failed run, and KeyboardInterrupt on Ctrl-C (the run's finished shards are kept: call again with the
    same ``run_id`` to resume)."""
    config = compress_config(config, bits=bits, codec=codec, allow_loaders=allow_loaders)
    options = storage_options if storage_options is not None else storage_options_from_env()
    return run_compress(
        teachers_uri=teachers,
        events_uri=events,
        store_uri=store,
        fleet=fleet,
        config=config,
        run_id=run_id,
        tracking_uri=tracking_uri,
        address=address,
        retrain_backbone=retrain_backbone,
        storage_options=options,
        register=register,
        dashboard=dashboard,
        no_parent=no_parent,
        force_config=force_config,
        resume_command=resume_command,
    )


STAGE_SECONDS_PREFIX = "stage_seconds_"  # a run's metrics hold each stage's wall seconds as stage_seconds_<stage>


def stage_seconds(metrics: dict) -> dict:
    """``{stage: seconds}`` of a run's metrics (its ``stage_seconds_<stage>`` entries)."""
    return {k[len(STAGE_SECONDS_PREFIX) :]: v for k, v in metrics.items() if k.startswith(STAGE_SECONDS_PREFIX)}


def run_compress(
    *,
    teachers_uri: str,
    events_uri: str,
    store_uri: str,
    fleet: str,
    config: stages.CompressConfig,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    retrain_backbone: bool = False,
    storage_options: dict | None = None,
    register: bool = True,
    dashboard: bool = False,
    no_parent: bool = False,
    force_config: bool = False,
    resume_command: str | None = None,
) -> CompressResult:
    """``fleet compress``: stages 1-5 on Ray, one immutable version in the store, registered in MLflow.

    Re-running the same ``run_id`` after a crash skips every shard already done; re-running a run id
    whose version is already registered does nothing and returns that registration (exit code 0). A run id
    resumes only with the configuration it was planned with (:func:`run_settings`, hashed into ``plan.json``
    as ``config_sha256``): another one raises :class:`~fleet.core.errors.UsageError` naming both hashes, unless
    ``force_config`` (the remaining stages then run with the new configuration; the plan, its batches and
    parent, stays). The run id and ``resume_command`` (how to resume it) are printed first. With
    a champion version and no ``retrain_backbone``, campaigns whose teacher and data hashes are
    unchanged keep their head rows and the champion's backbone; only new or changed campaigns are
    fitted. A registry that cannot be read fails the run before stage 1
    (:class:`~fleet.core.errors.RegistryError`); ``no_parent`` runs in full without looking up a parent
    (with ``register=False`` it then needs no registry at all). Inputs that cannot work raise
    :class:`~fleet.core.errors.UsageError` first (:func:`check_compress_inputs`).

    When registering, the version's MLflow run spans the compress (:class:`CompressRun`): started once the run
    is planned, named by the run id, its params the configuration and the scrubbed teachers / events URIs, each
    stage's seconds logged as the stage ends; registration logs into it and ends it FINISHED. A compress that
    fails ends it FAILED (KILLED on Ctrl-C); one killed outright leaves it RUNNING; resuming the run id
    continues it (its MLflow run id is kept in the work dir, :meth:`~fleet.storage.store.RunDir.read_mlflow_run`).
    """
    mlflow_run = CompressRun()
    try:
        return _run_compress(
            mlflow_run,
            teachers_uri=teachers_uri,
            events_uri=events_uri,
            store_uri=store_uri,
            fleet=fleet,
            config=config,
            run_id=run_id,
            tracking_uri=tracking_uri,
            address=address,
            retrain_backbone=retrain_backbone,
            storage_options=storage_options,
            register=register,
            dashboard=dashboard,
            no_parent=no_parent,
            force_config=force_config,
            resume_command=resume_command,
        )
    except KeyboardInterrupt:
        mlflow_run.end("KILLED")
        raise
    except BaseException:
        mlflow_run.end("FAILED")
        raise


#: The step each stage's metrics are logged at in the compress's MLflow run (a resumed run logs them again at it).
STAGE_STEPS = {"soft_labels": 1, "backbone": 2, "heads": 3, "finalize": 4}


class CompressRun:
    """The MLflow run of one registering ``fleet compress`` (:mod:`fleet.storage.runs` does the MLflow part):
    nothing happens until :meth:`start`, so a ``--no-register`` compress never touches a registry."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        self._started = time.perf_counter()

    def start(
        self,
        run_dir: RunDir,
        fleet: str,
        version_id: str,
        params: dict,
        tracking_uri: str,
        storage_options: dict | None,
    ) -> None:
        """Start the run, or continue the one recorded in ``run_dir``, and record it there."""
        from fleet.storage import runs

        recorded = run_dir.read_mlflow_run()
        saved = recorded.get("run_id") if recorded else None
        self.run_id = runs.start_compress_run(
            fleet, version_id, params, tracking_uri, storage_options=storage_options, resume_run_id=saved
        )
        self.tracking_uri = tracking_uri
        if self.run_id != saved:
            run_dir.write_mlflow_run(self.run_id, scrub(tracking_uri))

    def stage(self, stage: str, seconds: float, **progress: float) -> None:
        """Log that ``stage`` ended after ``seconds`` (``stage_seconds_<stage>``), the seconds since the compress
        started (``elapsed_seconds``) and ``progress`` metrics, at the stage's step (:data:`STAGE_STEPS`)."""
        if self.run_id is None:
            return
        from fleet.storage import runs

        metrics = {
            f"{STAGE_SECONDS_PREFIX}{stage}": seconds,
            "elapsed_seconds": time.perf_counter() - self._started,
            **progress,
        }
        runs.log_run_metrics(self.run_id, metrics, STAGE_STEPS[stage], self.tracking_uri)

    def end(self, status: str) -> None:
        """End the run with ``status`` unless registration ended it (or it never started)."""
        if self.run_id is not None:
            from fleet.storage import runs

            runs.end_compress_run(self.run_id, status, self.tracking_uri)


@dataclass
class StageReport:
    """What the stages of a run reported, for the version's metrics (:func:`_version_metrics`)."""

    seconds: dict[str, float] = field(default_factory=dict)  # wall seconds of each stage that ended
    tasks: dict[str, list[dict]] = field(default_factory=dict)  # per Ray stage, its tasks run this time
    skipped: dict[str, int] = field(default_factory=dict)  # per Ray stage, its shards done by an earlier attempt
    backbone: dict = field(default_factory=dict)  # stage 2's training stats ({} for an inherited backbone)


@dataclass
class _Run:
    """One ``fleet compress`` as its stages see it: its inputs, its work dir, its plan (set once planned) and what
    its stages reported."""

    teachers_uri: str
    events_uri: str
    store_uri: str
    fleet: str
    run_id: str
    config: stages.CompressConfig
    storage_options: dict | None
    tracking_uri: str
    register: bool
    mlflow_run: CompressRun
    plan: Plan | None = None
    report: StageReport = field(default_factory=StageReport)
    run_dir: RunDir = field(init=False)

    def __post_init__(self) -> None:
        self.run_dir = RunDir(self.store_uri, self.fleet, self.run_id, self.storage_options)  # checks both names

    @functools.cached_property
    def ctx(self) -> stages.StageContext:
        """What every stage task needs (once planned: the input space is the plan's)."""
        return stages.StageContext(
            self.teachers_uri,
            self.events_uri,
            self.config,
            self.plan.num_event_types,
            self.plan.num_features,
            self.storage_options,
        )

    @functools.cached_property
    def parent(self) -> FleetVersion | None:
        """The planned parent version, or None for a full run."""
        return FleetVersion.open(self.plan.parent_manifest, self.storage_options) if self.plan.parent_manifest else None

    @property
    def inherit_backbone(self) -> bool:
        """Whether the run keeps its parent's backbone (and so may reuse its parent's heads)."""
        return self.parent is not None and not self.plan.retrain_backbone

    def stage_done(self, stage: str, started: float, **progress: float) -> None:
        """Record that ``stage``, begun at ``started`` (``time.perf_counter``), ended, and log it to MLflow."""
        self.report.seconds[stage] = time.perf_counter() - started
        self.mlflow_run.stage(stage, self.report.seconds[stage], **progress)


def _run_compress(
    mlflow_run: CompressRun,
    *,
    teachers_uri: str,
    events_uri: str,
    store_uri: str,
    fleet: str,
    config: stages.CompressConfig,
    run_id: str | None,
    tracking_uri: str | None,
    address: str | None,
    retrain_backbone: bool,
    storage_options: dict | None,
    register: bool,
    dashboard: bool,
    no_parent: bool,
    force_config: bool,
    resume_command: str | None,
) -> CompressResult:
    """:func:`run_compress`'s body: the checks before anything runs, then one function per stage (plan, soft labels,
    backbone, heads, the version, registration); ``mlflow_run`` is started here when registering."""
    from fleet.storage import registry
    from fleet.storage.tracking import default_tracking_uri

    started = time.perf_counter()
    teachers_uri, events_uri, store_uri = (absolute_uri(u) for u in (teachers_uri, events_uri, store_uri))
    check_compress_inputs(teachers_uri, events_uri, store_uri, storage_options)
    run = _Run(
        teachers_uri,
        events_uri,
        store_uri,
        fleet,
        run_id or new_run_id(),
        config,
        storage_options,
        tracking_uri or default_tracking_uri(),
        register,
        mlflow_run,
    )
    EventsDataset(events_uri, storage_options).validate_files()  # every file's schema, before any stage
    if register:  # also the check that the registry can be read, before anything runs
        existing = registry.find_version(fleet, run.run_id, run.tracking_uri)
        if existing is not None:
            return _already_registered(existing, store_uri, fleet, run.run_id, storage_options)
    settings = run_settings(config, teachers_uri, events_uri, retrain_backbone=retrain_backbone, no_parent=no_parent)
    recorded = (
        check_resume_settings(Plan.read(run.run_dir), settings, run.run_dir, run.run_id, force_config)
        if run.run_dir.has_plan()
        else None
    )
    console.out(
        f"run {run.run_id} (work dir {scrub(run.run_dir.uri)}); to resume it after an interruption: "
        f"{resume_command or f're-run with --run-id {run.run_id}'}",
        highlight=False,
    )
    removed = remove_stale_temp_files(store_uri, fleet, storage_options)
    if removed:
        console.print(
            f"removed {len(removed)} temporary file(s) of interrupted writes under {join_uri(store_uri, fleet)}"
        )

    with ray_session(address, dashboard=dashboard):
        run.plan = _plan_stage(run, recorded, settings, retrain_backbone=retrain_backbone, no_parent=no_parent)
        if register:
            mlflow_run.start(
                run.run_dir,
                fleet,
                run.run_id,
                _run_params(config, {"teachers_uri": teachers_uri, "events_uri": events_uri}),
                run.tracking_uri,
                storage_options,
            )
        status = _soft_labels_stage(run)
        _backbone_stage(run, status)
        _heads_stage(run, status)
    version, heads, rejects = _version_stage(run, status)
    registered = _register_stage(run, version, heads)
    metrics = {**version.manifest["metrics"], "total_seconds": time.perf_counter() - started}
    not_promoted = registered is not None and registered.gate is not None and not registered.gate.passed
    exit_code = EXIT_NOT_PROMOTED if not_promoted else EXIT_QUARANTINED if rejects else 0
    return CompressResult(
        version.version_id, version.uri.rstrip("/") + "/manifest.json", metrics, exit_code, registered, rejects
    )


def _plan_stage(run: _Run, recorded: Plan | None, settings: dict, *, retrain_backbone: bool, no_parent: bool) -> Plan:
    """The run's plan: the one a resumed run ``recorded``, else a new one (:func:`~fleet.run.plan.make_plan`, its
    parent the champion unless ``no_parent``) written to the work dir once."""
    if recorded is not None:
        console.print(f"resuming run {run.run_id}: {len(recorded.batches)} batches planned")
        return recorded
    parent = None if no_parent else _parent_version(run.fleet, run.store_uri, run.tracking_uri, run.storage_options)
    plan = make_plan(
        run.teachers_uri,
        run.events_uri,
        run.config,
        settings,
        parent=parent,
        retrain_backbone=retrain_backbone,
        num_cpus=int(ray.cluster_resources().get("CPU", 1)),
        storage_options=run.storage_options,
    )
    plan.write(run.run_dir)
    return plan


def _soft_labels_stage(run: _Run) -> pa.Table:
    """Stage 1, the floor, on Ray (after the run's borrowed pool, when it has one): every teacher over its campaign's
    rows, one task per shard not done yet. Returns every campaign's verdict (the campaigns shards)."""
    plan, config, run_dir = run.plan, run.config, run.run_dir
    if config.borrowed_rows and not run_dir.has_borrowed_pool():
        pool = stages.borrowed_pool(
            EventsDataset(run.events_uri, run.storage_options),
            stages.borrowed_pool_rows(plan.sizes, config),
            plan.num_event_types,
            plan.num_features,
            config.max_sequence_length,
        )
        if pool is None:
            raise FleetError("no campaign's events can be borrowed for the transfer set", path=run.events_uri)
        run_dir.write_borrowed_pool(pool)
    t0 = time.perf_counter()
    quotas = {} if run.inherit_backbone else stages.backbone_quotas(plan.sizes, config)
    done = run_dir.soft_labels.done()
    jobs = plan.soft_label_jobs(quotas, plan.parent_hashes if run.inherit_backbone else {}, done)
    run.report.tasks["soft_labels"] = map_on_ray(
        _soft_labels_task,
        jobs,
        (run.ctx, run_dir),
        "stage 1  teacher soft labels",
        done=sum(len(b) for b in plan.batches_of(done)),
    )
    run.report.skipped["soft_labels"] = len(plan.shards) - len(jobs)
    run.stage_done("soft_labels", t0, stage_campaigns_soft_labels=len(plan.all_campaigns))
    _fault_point("soft_labels")
    return run_dir.campaigns.read_all(plan.shards)  # shards of an older run may lack n_truncated


def _backbone_stage(run: _Run, status: pa.Table) -> None:
    """Stage 2: the backbone in the work dir, kept when a resumed run has it; else the parent's (an incremental run),
    else trained on stage 1's sample (on Ray Train with ``backbone_workers`` > 1, else as one Ray task)."""
    t0 = time.perf_counter()
    run_dir, config = run.run_dir, run.config
    if run_dir.has_backbone():
        run.report.backbone = run_dir.read_backbone_stats() or {}
    elif run.inherit_backbone:
        run_dir.write_backbone(run.parent.read_backbone_bytes())
    elif not _with_status(status, "ok"):
        raise FleetError("every campaign was quarantined in stage 1; nothing to distil", path=run.teachers_uri)
    else:
        sample = run_dir.backbone_sample.read_all(run.plan.shards)
        if config.backbone_workers > 1:
            console.print(f"stage 2  backbone on Ray Train ({config.backbone_workers} DDP workers)")
            stats = _train_backbone_distributed(sample, run.ctx, run_dir, config.backbone_workers)
        else:
            stats = _train_backbone_on_ray(sample, run.ctx, run_dir, threads=max(1, min(_largest_node_cpus(), 4)))
        run_dir.write_backbone_stats(stats)
        run.report.backbone = stats
    run.stage_done("backbone", t0)
    _fault_point("backbone")


def _heads_stage(run: _Run, status: pa.Table) -> None:
    """Stages 3-5 (heads, quantization, fidelity) on Ray: one task per shard not done yet that holds a campaign
    stage 1 left to fit (``ok``)."""
    t0 = time.perf_counter()
    hashes = {
        c: [t, d]
        for c, s, t, d in zip(
            *(status[k].to_pylist() for k in ("campaign_id", "status", "teacher_sha256", "data_fingerprint"))
        )
        if s == "ok"
    }
    done = run.run_dir.heads.done()
    jobs = run.plan.head_jobs(hashes, done)
    run.report.tasks["heads"] = map_on_ray(
        _heads_task,
        jobs,
        (run.ctx, run.run_dir),
        "stage 3  heads + quantize + fidelity",
        done=sum(c in hashes for b in run.plan.batches_of(done) for c in b),
    )
    run.report.skipped["heads"] = len([s for s in run.plan.shards_with(set(hashes)) if s in done])
    run.stage_done("heads", t0, stage_campaigns_heads=len(hashes))


def _version_stage(run: _Run, status: pa.Table) -> tuple[FleetVersion, pa.Table, list[dict]]:
    """Finalize: the version's heads (stage 3's and those reused from the parent) and metrics, then the version
    itself (:func:`_write_version`; kept when a resumed run committed it). Returns ``(version, heads, rejects)``."""
    t0 = time.perf_counter()
    heads = _assemble_heads(run, status)
    rejects = _rejects(status)
    metrics = _version_metrics(heads, status, len(run.plan.all_campaigns), run.report)
    version_uri = join_uri(run.store_uri, run.fleet, "versions", run.run_id)
    try:
        version = FleetVersion.open(version_uri, run.storage_options)
        console.print(f"version {run.run_id} was already committed; registering it")
    except StoreError:
        _write_version(run, heads, rejects, metrics)
        version = FleetVersion.open(version_uri, run.storage_options)
    run.stage_done("finalize", t0)
    return version, heads, rejects


def _register_stage(run: _Run, version: FleetVersion, heads: pa.Table):
    """Register ``version`` in MLflow (ending the compress's MLflow run), or None when the run does not register."""
    if not run.register:
        return None
    return _register(
        version,
        run.fleet,
        run.tracking_uri,
        run.config,
        heads,
        {**version.manifest["metrics"], "stage_seconds_finalize": run.report.seconds["finalize"]},
        run.storage_options,
        run.parent,
        run.mlflow_run.run_id,
    )


def _with_status(status: pa.Table, verdict: str) -> list[str]:
    """The campaigns of stage 1's ``status`` table whose verdict is ``verdict`` (ok, reused, rejected)."""
    return [c for c, s in zip(status["campaign_id"].to_pylist(), status["status"].to_pylist()) if s == verdict]


def _assemble_heads(run: _Run, status: pa.Table) -> pa.Table:
    """The version's heads: stage 3's shards, and the parent's rows of the campaigns stage 1 found unchanged."""
    tables = [run.run_dir.heads.read(s) for s in run.plan.shards_with(set(_with_status(status, "ok")))]
    reused = sorted(_with_status(status, "reused"))
    if reused:
        parent_heads = run.parent.read_heads()
        tables.append(parent_heads.filter(pa.compute.is_in(parent_heads["campaign_id"], value_set=pa.array(reused))))
    return (
        pa.concat_tables([conform_heads_table(t) for t in tables])
        if tables  # a resumed run's older shards
        else HEADS_SCHEMA.empty_table()
    )


def _rejects(status: pa.Table) -> list[dict]:
    """The quarantined campaigns of stage 1's ``status`` table: ``{"campaign_id", "stage", "reason"}`` each."""
    rejected = status.filter(pa.compute.equal(status["status"], "rejected"))
    return [
        {"campaign_id": c, "stage": s, "reason": r}
        for c, s, r in zip(
            rejected["campaign_id"].to_pylist(), rejected["stage"].to_pylist(), rejected["reason"].to_pylist()
        )
    ]


def _write_version(run: _Run, heads: pa.Table, rejects: list[dict], metrics: dict) -> None:
    """Write and commit version ``run_id``: the work dir's backbone, ``heads``, ``rejects``, the run report, and the
    manifest with ``metrics`` (completed by the sizes of the files written)."""
    writer = VersionWriter(run.store_uri, run.fleet, run.run_id, run.storage_options)
    writer.write_backbone_bytes(run.run_dir.read_backbone())
    writer.write_heads(heads)
    writer.write_rejects(rejects_to_table([(r["campaign_id"], r["stage"], r["reason"]) for r in rejects]))
    _size_metrics(metrics, writer.files)
    version_config = {
        **run.config.to_dict(),
        "num_event_types": run.plan.num_event_types,
        "num_features": run.plan.num_features,
        "teachers_uri": run.teachers_uri,
        "events_uri": run.events_uri,
    }
    lineage = {
        "parent_version": run.parent.version_id if run.parent else None,
        "run_id": run.run_id,
        "retrain_backbone": not run.inherit_backbone,
    }
    created_at = created_at_now()
    writer.write_report(
        _report(
            run.fleet,
            run.run_id,
            heads,
            rejects,
            metrics,
            version_config,
            lineage,
            created_at,
            run.config,
            run.tracking_uri if run.register else None,
        )
    )
    writer.commit(config=version_config, lineage=lineage, metrics=metrics, created_at=created_at)


#: Campaigns whose events ``preview_compress`` reads at once (bounded memory on large fleets).
PREVIEW_CHUNK = 256
#: Committed versions ``preview_compress`` reads, newest first, for the stage times of earlier runs.
PREVIEW_HISTORY = 10


def preview_compress(
    *,
    teachers_uri: str,
    events_uri: str,
    store_uri: str,
    fleet: str,
    config: stages.CompressConfig,
    tracking_uri: str | None = None,
    retrain_backbone: bool = False,
    storage_options: dict | None = None,
    no_parent: bool = False,
) -> dict:
    """What :func:`run_compress` with these arguments would do, worked out in this process (no Ray) without
    writing anything: no work dir, no version, no registry database (``nightly --dry-run``).

    The parent is the champion (none with ``no_parent``, or while the registry has none). Each campaign is
    classified as stage 1 would: its teacher's digest (files only, :func:`fleet.formats.teachers.read_teacher_digest`)
    and its data fingerprint (events checked and cut as stage 1 does, :func:`fleet.run.stages.prepared_campaign_table`)
    against the parent's head row: ``new`` (not in the parent), ``changed`` (another teacher or data),
    ``reused`` (the same: its head is kept), ``refit`` (in the parent but fitted again: a full run, or the
    bloomier codec, reuses no head), ``invalid`` (would be quarantined: ``{campaign_id: reason}``); ``removed``
    are the parent's campaigns without a teacher now. ``estimate`` scales the stage times of earlier runs in the
    store (:func:`estimate_seconds`), or is None without one. Raises what ``run_compress`` raises before stage 1
    for inputs that cannot work (:class:`~fleet.core.errors.UsageError`, an unreadable registry)."""
    from fleet.formats.teachers import read_teacher_digest
    from fleet.storage import registry

    teachers_uri, events_uri, store_uri = (absolute_uri(u) for u in (teachers_uri, events_uri, store_uri))
    check_compress_inputs(teachers_uri, events_uri, store_uri, storage_options)
    events = EventsDataset(events_uri, storage_options)
    events.validate_files()
    parent = None
    if not no_parent and registry.champion_version(fleet, tracking_uri, create=False) is not None:
        manifest_uri, _ = registry.resolve_manifest_uri(f"models:/{fleet}@champion", tracking_uri)
        parent = FleetVersion.open(manifest_uri, storage_options, verify=False)  # read_heads checks what it reads
    catalog = locate_teachers(teachers_uri, storage_options)
    campaigns = catalog.campaigns
    if not campaigns:
        raise FleetError("no teachers found", path=teachers_uri)
    num_event_types, num_features = input_space(teachers_uri, catalog, config, storage_options)
    ctx = stages.StageContext(teachers_uri, events_uri, config, num_event_types, num_features, storage_options)
    parent_rows = {}
    if parent is not None:
        table = parent.read_heads().select(["campaign_id", "teacher_sha256", "data_fingerprint"])
        parent_rows = {c: [t.hex(), d.hex()] for c, t, d in zip(*(table[k].to_pylist() for k in table.column_names))}
    reuse = (
        parent is not None
        and not retrain_backbone
        and config.codec == "packed"
        and parent.manifest.get("heads_codec", "packed") == "packed"
    )  # as make_plan
    plan: dict[str, Any] = {key: [] for key in ("new", "changed", "reused", "refit")}
    plan["invalid"] = {}
    valid = []
    for campaign_id in campaigns:
        if NAME_PATTERN.fullmatch(campaign_id) is None:
            plan["invalid"][campaign_id] = "invalid campaign id"
        elif campaign_id in catalog.conflicts:
            plan["invalid"][campaign_id] = catalog.conflicts[campaign_id]
        elif campaign_id not in parent_rows:
            plan["new"].append(campaign_id)
        elif not reuse:
            plan["refit"].append(campaign_id)
        else:
            valid.append(campaign_id)
    for start in range(0, len(valid), PREVIEW_CHUNK):
        chunk = valid[start : start + PREVIEW_CHUNK]
        tables = events.read_campaigns(chunk)
        for campaign_id in chunk:
            try:
                slot = catalog.packed.get(campaign_id)  # a packed teacher's digest is its index entry
                teacher = (
                    slot.sha256 if slot is not None else read_teacher_digest(teachers_uri, campaign_id, storage_options)
                )
                table, _ = stages.prepared_campaign_table(tables[campaign_id], campaign_id, ctx)
            except FleetError as exc:
                plan["invalid"][campaign_id] = scrub(str(exc), secret_values(storage_options or {}))
                continue
            same = parent_rows[campaign_id] == [teacher, data_fingerprint(table)]
            plan["reused" if same else "changed"].append(campaign_id)
    inherit_backbone = parent is not None and not retrain_backbone
    fitted = len(plan["new"]) + len(plan["changed"]) + len(plan["refit"])
    history = [
        (
            v,
            FleetVersion.open(join_uri(store_uri, fleet, "versions", v), storage_options, verify=False).manifest[
                "metrics"
            ],
        )
        for v in list_versions(store_uri, fleet, storage_options)[-PREVIEW_HISTORY:][::-1]
    ]
    return {
        "fleet": fleet,
        "parent": parent.version_id if parent is not None else None,
        "mode": ("incremental" if reuse else "full: every head fitted")
        + ("" if inherit_backbone else ", backbone trained"),
        "campaigns": {**plan, "removed": sorted(set(parent_rows) - set(campaigns))},
        "estimate": estimate_seconds(history, fitted, train_backbone=not inherit_backbone),
    }


def estimate_seconds(history: Sequence[tuple[str, dict]], fitted: int, *, train_backbone: bool) -> dict | None:
    """Times of stages 1-3 of a run fitting ``fitted`` campaigns, from ``history``: ``(version id, manifest
    metrics)`` of earlier versions, newest first. Stages 1 and 3 are the newest run's that fitted any campaign,
    scaled by campaigns fitted; the backbone's is the newest run's that trained one (0 when this run inherits it).
    Finalize (writing the version, registering it) ends after the manifest is written, so no manifest holds its
    time: it is not estimated. Returns ``{"stage_seconds": {stage: seconds or None}, "total_seconds": seconds or
    None, "from_versions": {stage: version id}}`` (None where no earlier run measured it), or None without
    history."""
    if not history:
        return None
    per = next(((v, m) for v, m in history if m.get("campaigns_ok") and m.get("stage_seconds_heads") is not None), None)
    trained = next(
        ((v, m) for v, m in history if "backbone_steps" in m and m.get("stage_seconds_backbone") is not None), None
    )
    seconds: dict[str, float | None] = {}
    sources: dict[str, str] = {}
    for stage in ("soft_labels", "backbone", "heads"):
        source = trained if stage == "backbone" else per
        if stage == "backbone" and not train_backbone:
            seconds[stage] = 0.0
        elif source is None or source[1].get(f"stage_seconds_{stage}") is None:
            seconds[stage] = None
        else:
            measured = float(source[1][f"stage_seconds_{stage}"])
            seconds[stage] = measured if stage == "backbone" else measured / source[1]["campaigns_ok"] * fitted
            sources[stage] = source[0]
    known = [v for v in seconds.values() if v is not None]
    return {
        "stage_seconds": seconds,
        "total_seconds": sum(known) if len(known) == len(seconds) else None,
        "from_versions": sources,
    }


#: The flag of each run input in messages (CompressConfig fields are named as themselves).
_INPUT_FLAGS = {
    "teachers": "--teachers",
    "events": "--events",
    "retrain_backbone": "--retrain-backbone",
    "no_parent": "--no-parent",
}


def _changed_settings(recorded: Plan, wanted: dict) -> list[str]:
    changed = [
        k
        for k in sorted(set(recorded.config) | set(wanted["config"]))
        if recorded.config.get(k) != wanted["config"].get(k)
    ]
    return changed + [
        flag for key, flag in _INPUT_FLAGS.items() if (recorded.inputs or {}).get(key) != wanted["inputs"][key]
    ]


def check_resume_settings(plan: Plan, settings: dict, run_dir: RunDir, run_id: str, force: bool) -> Plan:
    """The plan to resume ``run_id`` with: ``plan`` when ``settings`` are its own (or it predates ``config_sha256``:
    not checked). Other settings are refused (:class:`~fleet.core.errors.UsageError`) unless ``force``: then the plan
    records them (the replaced hash under ``config_sha256_replaced``) in ``run_dir`` and is returned."""
    recorded = plan.config_sha256
    wanted = settings_sha256(settings)
    if recorded is None or recorded == wanted:
        return plan
    changed = ", ".join(_changed_settings(plan, settings)) or "nothing named"
    if not force:
        raise UsageError(
            f"run {run_id} was planned with configuration sha256 {recorded}, this command's "
            f"configuration has sha256 {wanted} (differs in: {changed}); resume it with the same "
            "configuration, pass --force-config to resume it with this one (finished shards are kept), "
            "or choose another --run-id",
            path=run_dir.plan_uri,
        )
    plan = plan.with_settings(settings)
    plan.write(run_dir)
    console.out(
        f"run {run_id}: resuming with a changed configuration (--force-config; differs in: {changed}); "
        f"configuration sha256 {recorded} -> {wanted}",
        highlight=False,
    )
    return plan


def saved_progress(store_uri: str, fleet: str, run_id: str, storage_options: dict | None = None) -> str:
    """What run ``run_id`` has saved so far, in words (for the line an interrupted ``fleet compress`` prints):
    the plan, stage 1's finished campaigns, the backbone, stage 3's finished batches, or the committed version."""
    store_uri = absolute_uri(store_uri)
    try:
        run_dir = RunDir(store_uri, fleet, run_id, storage_options)
        fs, manifest = open_fs(join_uri(store_uri, fleet, "versions", run_id, "manifest.json"), storage_options)
        if fs.exists(manifest):
            return f"its committed version {run_id}"
        if not run_dir.has_plan():
            return f"nothing yet (no {PLAN})"
        plan = Plan.read(run_dir)
        stage1 = sum(len(b) for b in plan.batches_of(run_dir.soft_labels.done()))
        parts = ["the plan", f"stage 1 for {stage1}/{len(plan.all_campaigns)} campaigns"]
        if run_dir.has_backbone():
            parts.append("the backbone")
        heads = len(plan.batches_of(run_dir.heads.done()))
        if heads:
            parts.append(f"stage 3 for {heads}/{len(plan.shards)} batches")
        return ", ".join(parts)
    except (FleetError, OSError, ValueError, KeyError, TypeError) as exc:
        return f"what its work dir holds (it could not be read: {type(exc).__name__})"


def interrupted_line(store_uri: str, fleet: str, run_id: str, storage_options: dict | None, resume_command: str) -> str:
    """The one line an interrupted run prints on stderr: what was saved, the run id and the exact resume command."""
    where = scrub(join_uri(absolute_uri(store_uri), fleet, "runs", run_id))
    return (
        f"interrupted: run {run_id} saved {saved_progress(store_uri, fleet, run_id, storage_options)} in {where}; "
        f"resume with: {resume_command}"
    )


def _already_registered(
    existing, store_uri: str, fleet: str, run_id: str, storage_options: dict | None
) -> CompressResult:
    """The result of re-running a run id whose version is committed and registered: nothing runs."""
    version = FleetVersion.open(join_uri(store_uri, fleet, "versions", run_id), storage_options)
    manifest_uri = version.uri.rstrip("/") + "/manifest.json"
    if existing.manifest_uri != manifest_uri:
        raise RegistryError(
            f"fleet version {run_id!r} is already registered as {fleet} version {existing.version} "
            f"with manifest {existing.manifest_uri!r}, not {manifest_uri!r}; use another run id"
        )
    gate = "none" if existing.gate is None else "passed" if existing.gate.passed else "failed"
    console.print(
        f"fleet version {run_id} already exists: registered as {fleet} version {existing.version} (gate "
        f"{gate}, {'champion' if existing.champion else 'not champion'}); nothing new registered"
    )
    return CompressResult(version.version_id, manifest_uri, version.manifest["metrics"], 0, existing)


def _version_metrics(heads: pa.Table, status: pa.Table, campaigns: int, report: StageReport) -> dict:
    """The manifest's metrics (docs/pipeline.md, "Metrics in the manifest") of a version of ``campaigns`` planned
    campaigns: its ``heads``, stage 1's verdict of every campaign (``status``: quarantined and reused campaigns,
    teacher bytes, truncated rows, and each campaign's row count, the weight of the volume-weighted figures) and
    what the stages reported."""
    from fleet.compression.metrics import CALIBRATION_KEYS

    verdicts = status["status"].to_pylist()
    reused, quarantined = verdicts.count("reused"), verdicts.count("rejected")
    volumes = dict(zip(status["campaign_id"].to_pylist(), status["n_rows"].to_pylist()))
    tasks, timings = report.tasks, report.seconds
    keys = ("campaign_id", "student_auc", "teacher_auc", "mean_abs_diff", "n_train", "status", *CALIBRATION_KEYS)
    columns = {k: heads[k].to_pylist() if k in heads.column_names else [None] * heads.num_rows for k in keys}
    rows = []
    for i, cid in enumerate(columns["campaign_id"]):
        s, t = columns["student_auc"][i], columns["teacher_auc"][i]
        rows.append(
            {
                "campaign_id": cid,
                "auc_diff": None if s is None or t is None else s - t,
                "mean_abs_diff": columns["mean_abs_diff"][i],
                "n_train": columns["n_train"][i],
                "n_rows": volumes.get(cid),
                "status": columns["status"][i],
                **{k: columns[k][i] for k in CALIBRATION_KEYS},
            }
        )
    summary = fleet_summary(rows)
    status_counts = {"ok": 0, "capacity": 0, "fallback": 0, **summary["status_counts"]}
    bits = heads["bits"].to_numpy() if heads.num_rows else np.zeros(0)
    metrics = {
        "campaigns": campaigns,
        "campaigns_ok": heads.num_rows - reused,
        "campaigns_reused": reused,
        "campaigns_quarantined": quarantined,
        "quarantine_share": quarantined / max(1, campaigns),
        "fidelity_auc_diff_median": summary.get("median"),
        "fidelity_auc_diff_p10": summary.get("p10"),
        "fidelity_mean_abs_diff_median": summary.get("mean_abs_diff_median"),
        "fidelity_mean_abs_diff_p90": summary.get("mean_abs_diff_p90"),
        "fidelity_campaigns_without_auc": summary.get("no_auc"),
        "fidelity_worst": summary.get("worst"),
        "fidelity_auc_diff_volume_weighted": summary["auc_diff_volume_weighted"],
        "fidelity_top_decile_auc_diff_median": summary["top_decile_auc_diff_median"],
        "fidelity_top_decile_n_with_auc": summary["top_decile_n_with_auc"],
        "fidelity_mean_ratio_within_10pct_share": summary["mean_ratio_within_10pct_share"],
        "fidelity_ece_excess_median": summary["ece_excess_median"],
        "fidelity_kl_median": summary["kl_median"],
        "fidelity_kl_p90": summary["kl_p90"],
        **{f"campaigns_status_{k}": v for k, v in status_counts.items()},
        "bits_mean": float(bits.mean()) if len(bits) else None,
        **{f"bits_{b}_campaigns": int((bits == b).sum()) for b in SUPPORTED_BITS},
        "teacher_bytes_total": int(pa.compute.sum(status["teacher_bytes"]).as_py() or 0),
        **{f"{STAGE_SECONDS_PREFIX}{k}": v for k, v in timings.items()},
        "stage1_shards_computed": len(tasks["soft_labels"]),
        "stage1_shards_skipped": report.skipped["soft_labels"],
        "stage3_shards_computed": len(tasks["heads"]),
        "stage3_shards_skipped": report.skipped["heads"],
        "nodes": {
            "soft_labels": sorted({r["node"] for r in tasks["soft_labels"]}),
            "heads": sorted({r["node"] for r in tasks["heads"]}),
            "backbone": [report.backbone["node"]] if "node" in report.backbone else [],
        },
        **{k: v for k, v in report.backbone.items() if k != "node"},
    }
    run = sum(timings.values())
    metrics["run_seconds"] = run
    metrics["run_over_floor"] = run / timings["soft_labels"] if timings.get("soft_labels") else None
    metrics["rows_truncated"] = int(pa.compute.sum(status["n_truncated"]).as_py() or 0)
    return metrics


def _report(
    fleet: str,
    run_id: str,
    heads: pa.Table,
    rejects: list[dict],
    metrics: dict,
    version_config: dict,
    lineage: dict,
    created_at: str,
    config: stages.CompressConfig,
    tracking_uri: str | None,
) -> str:
    """The version's run report (:func:`fleet.versions.report.render_report`), rendered before its manifest is written.
    The gate is evaluated as the registry will evaluate it (against the champion of this moment:
    :func:`fleet.storage.registry.preview_gate`); with no registry (``tracking_uri`` None) against the thresholds only."""
    from fleet.storage import registry
    from fleet.storage.promotion_gate import evaluate_gate
    from fleet.versions import report

    if tracking_uri is None:
        gate = evaluate_gate(metrics, None, config.gate)
        note = "Not registered (--no-register): the configured thresholds only, no champion comparison."
    else:
        gate, champion = registry.preview_gate(fleet, metrics, config.gate, tracking_uri)
        against = f"champion version {champion}" if champion is not None else "no champion (the first version)"
        note = (
            f"Evaluated when this version was written, against {against} of {fleet}; the registry records its "
            "own evaluation in the version's tags (fleet versions), which differs only if the champion moved "
            "in between."
        )
    return report.render_report(
        fleet=fleet,
        version_id=run_id,
        heads=heads,
        rejects=rejects,
        metrics=metrics,
        config=version_config,
        lineage=lineage,
        created_at=created_at,
        gate=gate,
        gate_note=note,
    )


def _size_metrics(metrics: dict, files: dict[str, dict]) -> None:
    """Add the sizes of a version's ``files`` (``VersionWriter.files``) and its compression ratios to ``metrics``."""
    heads_bytes = sum(f["bytes"] for p, f in files.items() if p.startswith(f"{HEADS_DIR}/"))
    backbone_bytes, teacher_bytes = files[BACKBONE]["bytes"], metrics["teacher_bytes_total"]
    n = max(1, metrics["campaigns_ok"] + metrics["campaigns_reused"])
    metrics.update(
        {
            "heads_bytes": heads_bytes,
            "backbone_bytes": backbone_bytes,
            "bytes_per_campaign": heads_bytes / n,
            "compression_ratio": teacher_bytes / max(1, heads_bytes + backbone_bytes),
            "compression_ratio_heads_only": teacher_bytes / max(1, heads_bytes),
        }
    )


def run_plots(heads: pa.Table, metrics: dict) -> dict[str, bytes]:
    """The PNGs logged with a version's MLflow run, name -> bytes: only figures with something to draw (the AUC
    plots only when a campaign has an AUC; the size breakdown of the parts whose size is known), never a
    missing value drawn as zero. Fidelity against the teacher (mean |p_student - p_teacher|) and calibration
    are defined for every campaign with hold-out rows, so a valid version always has those two."""
    from fleet.core import plots

    def floats(column: str) -> list[float]:
        return [float("nan") if v is None else float(v) for v in heads[column].to_pylist()]

    n_train = floats("n_train")
    with_auc = [
        (n, s - t)
        for n, s, t in zip(n_train, floats("student_auc"), floats("teacher_auc"), strict=True)
        if math.isfinite(s) and math.isfinite(t)
    ]
    figures = {
        "mean_abs_diff_vs_size.png": plots.mean_abs_diff_vs_size(n_train, floats("mean_abs_diff")),
        "calibration_vs_size.png": plots.calibration_vs_size(n_train, floats("mean_ratio")),
    }
    if with_auc:
        figures["fidelity_histogram.png"] = plots.fidelity_histogram([d for _, d in with_auc])
        figures["fidelity_vs_size.png"] = plots.fidelity_vs_size([n for n, _ in with_auc], [d for _, d in with_auc])
    parts = {
        part: metrics[f"{part}_bytes"] for part in ("heads", "backbone") if metrics.get(f"{part}_bytes") is not None
    }
    if parts:
        figures["size_breakdown.png"] = plots.size_breakdown(parts)
    return figures


def _register(
    version: FleetVersion,
    fleet: str,
    tracking_uri: str,
    config: stages.CompressConfig,
    heads: pa.Table,
    metrics: dict,
    storage_options: dict | None,
    parent: FleetVersion | None,
    mlflow_run_id: str | None = None,
):
    import tempfile

    from fleet.storage import registry

    with tempfile.TemporaryDirectory() as tmp:
        backbone_path, manifest_path = os.path.join(tmp, "backbone.safetensors"), os.path.join(tmp, "manifest.json")
        with open(backbone_path, "wb") as f:
            f.write(version.read_backbone_bytes())
        with open(manifest_path, "wb") as f:
            f.write(version.manifest_bytes)  # the stored bytes: the registry tags their sha256
        figures = run_plots(heads, metrics)
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        page = version.read_report()  # the version's run report, checked against the manifest
        return registry.register_version(
            fleet_name=fleet,
            manifest_uri=version.uri.rstrip("/") + "/manifest.json",
            version_id=version.version_id,
            local_artifacts={"backbone.safetensors": backbone_path, "manifest.json": manifest_path},
            params=_run_params(config, version.manifest.get("config") or {}),
            metrics=flat,
            plots=figures,
            tracking_uri=tracking_uri,
            gate=config.gate,
            storage_options=storage_options,
            parent_version_id=parent.version_id if parent else None,
            example_campaign_id=_example_campaign(heads),
            run_files={REPORT: page} if page is not None else None,
            mlflow_run_id=mlflow_run_id,
        )


def _run_params(config: stages.CompressConfig, manifest_config: dict) -> dict:
    """The MLflow run's params: the compress config and the version's inputs (``teachers_uri``,
    ``events_uri`` as the manifest records them; :func:`fleet.storage.registry.register_version` scrubs
    credentials out of every param value)."""
    inputs = {k: manifest_config[k] for k in ("teachers_uri", "events_uri") if manifest_config.get(k) is not None}
    return {**config.to_dict(), **inputs}


def _example_campaign(heads: pa.Table) -> str | None:
    """The campaign id of the logged model's input example: the first (sorted) whose head passed its
    quality gate, else the first; None for a version without heads."""
    from fleet.formats.codec import head_passed

    rows = sorted(zip(heads["campaign_id"].to_pylist(), heads["status"].to_pylist()))
    passed = [cid for cid, status in rows if head_passed(status)]
    return passed[0] if passed else rows[0][0] if rows else None


# ---------------------------------------------------------------------------------------------
# fleet serve --ray


def serve_on_ray(app_factory: Callable, replicas: int, host: str, port: int, address: str | None = None) -> None:
    """Run the HTTP app under Ray Serve: ``replicas`` copies, each building its own app (and loading the
    model) on its replica via ``app_factory``, behind Ray Serve's HTTP proxy on ``host:port``. Blocks."""
    from ray import serve

    with ray_session(address or os.environ.get("RAY_ADDRESS")):
        serve.start(http_options={"host": host, "port": port})

        def build_app():  # a plain function: Ray Serve calls it on each replica (a partial would pass as an ASGI app)
            return app_factory()

        deployment = serve.deployment(name="fleet", num_replicas=replicas)(serve.ingress(build_app)())
        console.print(f"Ray Serve: {replicas} replica(s) on http://{host}:{port}")
        serve.run(deployment.bind(), name="fleet", route_prefix="/", blocking=True)
