"""``fleet bench --scale``: the REAL pipeline at growing fleet sizes, per campaign and per user.

Each size of ``--scale-sizes`` (``KIND:N``) is a synthetic fleet of N small entities, made (or reused, or
finished after an interruption) under ``--fleet-dir`` by ``fleet synth``: kind ``campaign`` has one teacher
directory per entity (the campaign path, teachers trained one at a time), kind ``user`` has
``fleet-teacher-pack/1`` packs (``--entities user``, teachers trained a pack at a time). Both kinds have the
per-user entity shape of :data:`fleet.synthetic.synth.USER_DEFAULTS` (20-300 sequences each, 1-layer LSTM teachers of
hidden 16, embedding 8; the ``fleet bench`` teacher flags override it), so their per-entity costs compare.

Every size is compressed once in full (:func:`fleet.run.pipeline.run_compress`, backbone retrained, the same
configuration for every size) by a fresh driver process (:func:`run_probe`, ``python -m fleet.bench.scale``),
so that the driver's peak RSS is that run's alone. At the largest size an incremental night follows: the full
run's version is made champion, 1% of the teachers change (:func:`change_teachers`: the readout bias of each
negated, so its bytes and sha256 change), ``fleet compress`` runs again against the champion, and the changed
teachers are restored exactly (:func:`restore_teachers`, also at the start of the next run if one was cut short).

Outputs under ``--out``: ``scale.json`` (every figure), ``scale.md`` (the table of docs/benchmarks.md) and
``scale.png`` (log-log: wall time, per-entity cost and driver peak RSS against N); the runs' store and
registry are ``OUT/store`` and (by default) ``OUT/mlflow.db``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from rich.console import Console

from fleet.bench.probe import proc_rss_mb
from fleet.core.constants import BENCH_SCALE_FORMAT
from fleet.core.errors import FleetError, UsageError
from fleet.formats.teacher_pack import (
    PACK_WEIGHTS_FILE,
    PACKS_DIR,
    locate_teachers,
    pack_complete,
    pack_config_uri,
    read_pack_index,
    write_pack,
)
from fleet.formats.teachers import WEIGHTS_FILE
from fleet.synthetic.synth import (
    SYNTH_FILE,
    USER_DEFAULTS,
    SynthConfig,
    entity_id,
    entity_ids,
    pack_name,
    teacher_saved,
    user_config,
    with_defaults,
)

if TYPE_CHECKING:  # the probe process imports fleet.run.stages when it runs, not before
    from fleet.run.stages import CompressConfig

console = Console(stderr=True)
KINDS = ("campaign", "user")  # --scale-sizes KIND: teacher directories (fleet synth) / packs (--entities user)
DEFAULT_SIZES = "campaign:1000,campaign:10000,user:100000"
CHANGED_SHARE = 0.01  # teachers the incremental night changes (at least one)
CHANGES_FILE = "bench-scale-changes.json"  # in a fleet dir while changed teachers are not yet restored
READOUT_BIAS = "readout.bias"  # the TeacherRNN tensor the incremental night changes
RUN_TARGET_MIN_N = 1_000  # the run / stage 1 target holds from this fleet size up
HEADS_TARGET_MIN_N = 10_000  # the heads bytes per entity target holds from this fleet size up
#: How ``heads B / entity`` divides: the columns serving reads (:data:`fleet.serve.head_table.COLUMNS`: the quantized
#: head), the hashes incremental runs compare, and the rest (per-campaign fidelity and calibration figures).
HEADS_PARTS = (
    ("served", "head (served columns)"),
    ("change_detection", "teacher_sha256 + data_fingerprint"),
    ("fidelity", "fidelity metrics"),
)
#: The run's stages in the manifest's metrics (``stage_seconds_<key>``), in order, with their names.
STAGE_NAMES = (("soft_labels", "stage 1"), ("backbone", "stage 2"), ("heads", "stages 3-5"))

#: Issue 11's targets: (key of :func:`target_figures`, comparison, bound, what the figure is).
TARGETS = (
    ("per_entity_ratio", "<=", 1.2, "per-entity wall cost at the largest N / at the smallest N"),
    ("run_over_stage1", "<=", 2.0, f"whole run / stage 1, worst size with N >= {RUN_TARGET_MIN_N:,}"),
    (
        "incremental_fraction",
        "<=",
        0.10,
        f"incremental night ({CHANGED_SHARE:.0%} of teachers changed) / the full run, largest N",
    ),
    ("incremental_exact", "==", True, "the incremental night refitted exactly the changed teachers"),
    ("driver_peak_rss_mb", "<=", 2048.0, "driver peak RSS at the largest N, MB"),
    ("heads_bytes_per_entity", "<=", 128.0, f"heads bytes per entity, worst size with N >= {HEADS_TARGET_MIN_N:,}"),
)


# ----------------------------------------------------------------------------- sizes and fleets


def parse_sizes(text: str) -> list[tuple[str, int]]:
    """``--scale-sizes``: comma-separated ``KIND:N`` (``campaign:1000,user:100000``); an
    :class:`argparse.ArgumentTypeError` names a bad or repeated item."""
    sizes = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        kind, sep, count = item.partition(":")
        try:
            n = int(count.replace("_", ""))
        except ValueError:
            n = 0
        if not sep or kind not in KINDS or n < 1:
            raise argparse.ArgumentTypeError(f"{item!r} is not KIND:N with KIND one of {', '.join(KINDS)} and N >= 1")
        if (kind, n) in sizes:
            raise argparse.ArgumentTypeError(f"{item!r} is given twice")
        sizes.append((kind, n))
    if not sizes:
        raise argparse.ArgumentTypeError("no size given")
    return sizes


def synth_config(kind: str, entities: int, seed: int, teacher: dict | None = None) -> SynthConfig:
    """The fleet of one size: the per-user entity shape (:data:`fleet.synthetic.synth.USER_DEFAULTS`) for both kinds,
    with ``teacher`` (SynthConfig fields; None values ignored) over it."""
    overrides = {k: v for k, v in (teacher or {}).items() if v is not None}
    if kind == "user":
        return user_config(entities, seed=seed, **overrides)
    shape = {k: v for k, v in USER_DEFAULTS.items() if k != "pack_size"}
    return SynthConfig(campaigns=entities, seed=seed, **{**shape, **overrides})


def fleet_ready(config: SynthConfig, fleet_dir: str) -> bool:
    """Whether ``fleet_dir`` holds the complete fleet of ``config`` (its ``synth.json`` and every teacher:
    each directory's ``config.json``, each pack's, written last). A different fleet there is not ready
    (``fleet synth`` then refuses it, naming the difference)."""
    path = os.path.join(fleet_dir, SYNTH_FILE)
    teachers = os.path.join(fleet_dir, "teachers")
    if not (os.path.exists(path) and os.path.isdir(teachers)):
        return False
    with open(path) as f:
        if with_defaults(json.load(f)) != dataclasses.asdict(config):
            return False
    if config.entities == "user":
        packs = range(math.ceil(config.campaigns / config.pack_size))
        return all(
            pack_complete(
                teachers, pack_name(p), config.teacher_config(entity_id(config, p * config.pack_size)).to_json()
            )
            for p in packs
        )
    ids = entity_ids(config)
    return locate_teachers(teachers).campaigns == ids and all(
        teacher_saved(teachers, config.teacher_config(c)) for c in ids
    )


def prepare_fleet(config: SynthConfig, fleet_dir: str, address: str | None) -> dict:
    """Reuse the fleet of ``config`` in ``fleet_dir`` (after restoring teachers an interrupted incremental night
    left changed), or make or finish it with ``fleet synth`` (:func:`fleet.run.pipeline.run_synth`, resumable)."""
    restored = restore_teachers(fleet_dir)
    if restored:
        console.print(f"{fleet_dir}: restored {len(restored):,} teachers an interrupted incremental night had changed")
    info = {
        "fleet_dir": fleet_dir,
        "events_uri": os.path.join(fleet_dir, "events"),
        "teachers_uri": os.path.join(fleet_dir, "teachers"),
    }
    if fleet_ready(config, fleet_dir):
        return {**info, "reused": True, "synth_seconds": None}
    from fleet.run.pipeline import run_synth

    console.print(f"{fleet_dir}: making the fleet ({config.campaigns:,} {config.entities} teachers; resumable)")
    made = run_synth(config, fleet_dir, address=address)
    return {**info, "reused": False, "synth_seconds": made["seconds"]}


# ----------------------------------------------------------------------------- changing teachers (incremental night)


def changed_entities(ids: list[str], seed: int) -> list[str]:
    """The entities whose teachers the incremental night changes: :data:`CHANGED_SHARE` of ``ids`` (at least
    one), drawn deterministically from ``seed`` and the fleet size; sorted."""
    count = max(1, round(len(ids) * CHANGED_SHARE))
    picked = np.random.default_rng([seed, len(ids)]).choice(len(ids), size=count, replace=False)
    return sorted(ids[i] for i in picked)


def _places(teachers_uri: str, campaign_ids) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """``(campaigns with a directory, {pack: [(campaign, slot)]})`` of ``campaign_ids`` under a local teacher root."""
    packed = locate_teachers(teachers_uri).packed
    directories, packs = [], {}
    for campaign_id in campaign_ids:
        if campaign_id in packed:
            packs.setdefault(packed[campaign_id].pack, []).append((campaign_id, packed[campaign_id].slot))
        else:
            directories.append(campaign_id)
    return directories, packs


def _pack_weights(teachers_uri: str, pack: str) -> str:
    return os.path.join(teachers_uri, PACKS_DIR, pack, PACK_WEIGHTS_FILE)


def read_readout_bias(teachers_uri: str, campaign_ids) -> dict[str, torch.Tensor]:
    """The readout bias (``(1,)``) of each teacher of ``campaign_ids`` under a local teacher root, from its
    directory or its pack slot."""
    from safetensors.torch import load_file

    directories, packs = _places(teachers_uri, campaign_ids)
    out = {c: load_file(os.path.join(teachers_uri, c, WEIGHTS_FILE))[READOUT_BIAS].clone() for c in directories}
    for pack, members in packs.items():
        bias = load_file(_pack_weights(teachers_uri, pack))[READOUT_BIAS]  # (K, 1)
        out.update({c: bias[slot].clone() for c, slot in members})
    return out


def set_readout_bias(teachers_uri: str, values: dict[str, torch.Tensor]) -> None:
    """Write ``values`` (campaign -> readout bias ``(1,)``) into the teachers under a local teacher root, every
    other byte of their tensors unchanged: a directory's ``model.safetensors`` is replaced (atomically, same
    metadata), a pack is written again (:func:`fleet.formats.teacher_pack.write_pack`, so the changed slots' sha256 in
    ``index.parquet`` follow and the others stay)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    directories, packs = _places(teachers_uri, values)
    for campaign_id in directories:
        path = os.path.join(teachers_uri, campaign_id, WEIGHTS_FILE)
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
        tensors = load_file(path)
        tensors[READOUT_BIAS] = values[campaign_id].clone()
        save_file(tensors, f"{path}.tmp", metadata=metadata)
        os.replace(f"{path}.tmp", path)
    for pack, members in packs.items():
        tensors = load_file(_pack_weights(teachers_uri, pack))
        for campaign_id, slot in members:
            tensors[READOUT_BIAS][slot] = values[campaign_id]
        ids = [c for c, _, _ in sorted(read_pack_index(teachers_uri, pack), key=lambda row: row[1])]
        with open(pack_config_uri(teachers_uri, pack)) as f:
            config = json.load(f)
        write_pack(teachers_uri, pack, config, ids, tensors)


def change_teachers(fleet_dir: str, campaign_ids: list[str]) -> None:
    """Change the teachers of ``campaign_ids`` in ``fleet_dir``: each readout bias negated (its bytes change even
    at 0.0), the originals recorded first in ``CHANGES_FILE`` for :func:`restore_teachers`."""
    teachers = os.path.join(fleet_dir, "teachers")
    original = read_readout_bias(teachers, campaign_ids)
    record = {c: {"values": t.tolist(), "dtype": str(t.dtype).removeprefix("torch.")} for c, t in original.items()}
    _write_json(os.path.join(fleet_dir, CHANGES_FILE), {"readout_bias": record})
    set_readout_bias(teachers, {c: -t for c, t in original.items()})


def restore_teachers(fleet_dir: str) -> list[str]:
    """Put back the teachers :func:`change_teachers` changed in ``fleet_dir`` (exactly: the recorded biases),
    then remove its record; the campaigns restored (none when nothing was changed)."""
    path = os.path.join(fleet_dir, CHANGES_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        record = json.load(f)["readout_bias"]
    set_readout_bias(
        os.path.join(fleet_dir, "teachers"),
        {c: torch.tensor(r["values"], dtype=getattr(torch, r["dtype"])) for c, r in record.items()},
    )
    os.remove(path)
    return sorted(record)


def _write_json(path: str, obj) -> None:
    from fleet.storage.store import json_safe

    with open(f"{path}.tmp", "w") as f:
        json.dump(json_safe(obj), f, indent=1)
    os.replace(f"{path}.tmp", path)


# ----------------------------------------------------------------------------- the driver process (probe)


def _peak_rss_mb() -> float:
    """This process's own peak RSS so far, in MB (MiB): ``VmHWM`` of ``/proc/self/status`` where there is one.
    Not ``ru_maxrss`` there: a process started by ``subprocess`` begins with its parent's peak in that counter
    (the bench parent's, which made the fleet), so it would report the parent's peak, not the run's."""
    try:
        return proc_rss_mb("self")["peak_rss_mb"]
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def ray_worker_peaks() -> dict | None:
    """Peak RSS (``VmHWM``) of the Ray workers this process started and that are alive now (processes below
    it that Ray titled ``ray::...``, its agents left out): ``{"workers", "max_mb", "sum_mb"}``, or None where
    there is no ``/proc`` or none (a Ray cluster this process only connected to runs its workers elsewhere)."""
    from ray._private.ray_constants import AGENT_PROCESS_LIST

    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    children: dict[int, list[int]] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name may hold spaces and parentheses
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(pid)
    below, todo = [], list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        below.append(pid)
        todo.extend(children.get(pid, []))
    peaks = []
    for pid in below:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0", 1)[0].decode(errors="replace").strip()
            if not title.startswith("ray::") or title in AGENT_PROCESS_LIST:
                continue
            peaks.append(proc_rss_mb(pid)["peak_rss_mb"])
        except OSError:
            continue  # exited meanwhile
    return {"workers": len(peaks), "max_mb": max(peaks), "sum_mb": sum(peaks)} if peaks else None


def run_probe(spec: dict) -> dict:
    """One ``fleet compress`` in this process, the driver whose peak RSS is measured. ``spec``: ``teachers_uri``,
    ``events_uri``, ``store``, ``fleet``, ``run_id``, ``tracking_uri``, ``config`` (CompressConfig fields),
    ``address`` (Ray; None: a local Ray of this process), ``full`` (backbone retrained, no parent; else an
    incremental run against the champion) and ``promote`` (make the version champion afterwards). Returns the
    run's wall time (Ray's start excluded), its scalar metrics, the campaigns it refitted (incremental runs), and
    the peak RSS of this driver and of its Ray workers."""
    from fleet.run import pipeline, stages
    from fleet.run.plan import Plan
    from fleet.storage import registry
    from fleet.storage.store import RunDir

    config = stages.CompressConfig.from_dict(spec["config"])
    t0 = time.perf_counter()
    with pipeline.ray_session(spec["address"]):
        ray_start = time.perf_counter() - t0
        before = _peak_rss_mb()
        t0 = time.perf_counter()
        result = pipeline.run_compress(
            teachers_uri=spec["teachers_uri"],
            events_uri=spec["events_uri"],
            store_uri=spec["store"],
            fleet=spec["fleet"],
            config=config,
            run_id=spec["run_id"],
            tracking_uri=spec["tracking_uri"],
            address=spec["address"],
            retrain_backbone=spec["full"],
            no_parent=spec["full"],
        )
        wall = time.perf_counter() - t0
        workers = ray_worker_peaks()
    if spec["promote"]:
        registry.promote(
            spec["fleet"],
            result.registered.version,
            spec["tracking_uri"],
            reason="fleet bench --scale: the parent of the incremental night",
        )
    run_dir = RunDir(spec["store"], spec["fleet"], spec["run_id"])
    status = run_dir.campaigns.read_all(Plan.read(run_dir).shards)
    refitted = [c for c, s in zip(status["campaign_id"].to_pylist(), status["status"].to_pylist()) if s == "ok"]
    gate = result.registered.gate if result.registered is not None else None
    return {
        "run_id": spec["run_id"],
        "version_id": result.version_id,
        "manifest_uri": result.manifest_uri,
        "exit_code": result.exit_code,
        "registered_version": result.registered.version if result.registered else None,
        "gate_passed": None if gate is None else bool(gate.passed),
        "wall_seconds": wall,
        "ray_start_seconds": ray_start,
        "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        "stage_seconds": pipeline.stage_seconds(result.metrics),
        "refitted": None if spec["full"] else refitted,
        "refitted_count": len(refitted),
        "driver_peak_rss_mb": _peak_rss_mb(),
        "driver_peak_rss_before_run_mb": before,
        "ray_workers": workers,
        "heads_bytes_by_part": heads_bytes_by_part(os.path.dirname(result.manifest_uri)),
    }


def heads_bytes_by_part(version_dir: str) -> dict[str, int]:
    """Compressed bytes of the version's heads Parquet column chunks (footers and headers left out), summed
    into the parts of :data:`HEADS_PARTS`."""
    import glob

    import pyarrow.parquet as pq

    from fleet.serve.head_table import COLUMNS
    from fleet.storage.store import HEADS_DIR

    parts = dict.fromkeys([key for key, _ in HEADS_PARTS], 0)
    for path in glob.glob(os.path.join(version_dir, HEADS_DIR, "*.parquet")):
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                name = column.path_in_schema.split(".")[0]
                part = (
                    "served"
                    if name in COLUMNS
                    else "change_detection"
                    if name in ("teacher_sha256", "data_fingerprint")
                    else "fidelity"
                )
                parts[part] += column.total_compressed_size
    return parts


def _probe_main(argv: list[str]) -> int:
    """``python -m fleet.bench.scale SPEC.json``: :func:`run_probe` of the spec, its result written to the
    spec's ``result`` path; exit 1 (the error on stderr) when the run fails."""
    from fleet.core.redact import scrub

    with open(argv[0]) as f:
        spec = json.load(f)
    try:
        result = run_probe(spec)
    except FleetError as exc:
        print(f"error: {scrub(str(exc))}", file=sys.stderr)
        return 1
    _write_json(spec["result"], result)
    return 0


def _compress_in_fresh_process(spec: dict, label: str) -> dict:
    """:func:`run_probe` in a new Python process (its progress on this process's stderr); its result."""
    with tempfile.TemporaryDirectory(prefix="fleet-scale-") as tmp:
        spec = {**spec, "result": os.path.join(tmp, "result.json")}
        with open(os.path.join(tmp, "spec.json"), "w") as f:
            json.dump(spec, f)
        # the driver's stdout to our stderr (fd 2): this command's stdout is its summary only
        proc = subprocess.run(
            [sys.executable, "-m", "fleet.bench.scale", os.path.join(tmp, "spec.json")], stdout=2, check=False
        )
        if proc.returncode != 0 or not os.path.exists(spec["result"]):
            raise FleetError(
                f"{label}: the fleet compress driver process failed (exit {proc.returncode}); its error is above",
                path=spec["teachers_uri"],
            )
        with open(spec["result"]) as f:
            return json.load(f)


# ----------------------------------------------------------------------------- the benchmark


def size_row(kind: str, entities: int, fleet: dict, run: dict) -> dict:
    """The figures of one size from its fleet (:func:`prepare_fleet`) and full run (:func:`run_probe`)."""
    m = run["metrics"]
    stage1 = run["stage_seconds"].get("soft_labels")
    heads_rows = m.get("campaigns_ok", 0) + m.get("campaigns_reused", 0)
    return {
        "kind": kind,
        "entities": entities,
        "fleet": fleet,
        "run": {k: v for k, v in run.items() if k not in ("metrics", "stage_seconds")},
        "metrics": m,
        "wall_seconds": run["wall_seconds"],
        "per_entity_ms": 1000.0 * run["wall_seconds"] / entities,
        "stage_seconds": run["stage_seconds"],
        "stage1_seconds": stage1,
        "run_over_stage1": run["wall_seconds"] / stage1 if stage1 else None,
        "finalize_and_registration_seconds": run["wall_seconds"] - m["run_seconds"] if "run_seconds" in m else None,
        "driver_peak_rss_mb": run["driver_peak_rss_mb"],
        "ray_worker_peak_rss_mb": (run["ray_workers"] or {}).get("max_mb"),
        "heads_bytes": m.get("heads_bytes"),
        "heads_bytes_per_entity": m["heads_bytes"] / heads_rows if m.get("heads_bytes") and heads_rows else None,
        "heads_part_bytes_per_entity": (
            {k: v / heads_rows for k, v in run["heads_bytes_by_part"].items()}
            if run.get("heads_bytes_by_part") and heads_rows
            else None
        ),
        "quarantined": m.get("campaigns_quarantined"),
    }


def add_ratios(rows: list[dict]) -> None:
    """Set each row's ``per_entity_ratio``: its per-entity cost over that of the smallest N of its kind."""
    for row in rows:
        base = min((r for r in rows if r["kind"] == row["kind"]), key=lambda r: r["entities"])
        row["per_entity_ratio"] = row["per_entity_ms"] / base["per_entity_ms"] if base["per_entity_ms"] else None


def _extremes(rows: list[dict]) -> tuple[dict, dict]:
    """The smallest-N and the largest-N row (the later one where sizes tie)."""
    low, high = min(r["entities"] for r in rows), max(r["entities"] for r in rows)
    return next(r for r in rows if r["entities"] == low), [r for r in rows if r["entities"] == high][-1]


def target_figures(results: dict) -> dict:
    """The measured value of every target of :data:`TARGETS` (None: not measured, e.g. no size large enough)."""
    rows = results.get("sizes") or []
    inc = results.get("incremental") or {}
    if not rows:
        return {key: None for key, *_ in TARGETS}
    smallest, largest = _extremes(rows)
    run_ratios = [r["run_over_stage1"] for r in rows if r["entities"] >= RUN_TARGET_MIN_N and r["run_over_stage1"]]
    heads = [
        r["heads_bytes_per_entity"]
        for r in rows
        if r["entities"] >= HEADS_TARGET_MIN_N and r["heads_bytes_per_entity"] is not None
    ]
    return {
        "per_entity_ratio": (
            largest["per_entity_ms"] / smallest["per_entity_ms"]
            if smallest is not largest and smallest["per_entity_ms"]
            else None
        ),
        "run_over_stage1": max(run_ratios, default=None),
        "incremental_fraction": inc.get("fraction"),
        "incremental_exact": inc.get("refitted_exactly_changed"),
        "driver_peak_rss_mb": largest["driver_peak_rss_mb"],
        "heads_bytes_per_entity": max(heads, default=None),
    }


def check_targets(results: dict) -> list[str]:
    """Keys of the targets of :data:`TARGETS` that ``results`` misses (a figure not measured is a miss)."""
    figures = target_figures(results)
    return [key for key, op, bound, _ in TARGETS if not _met(figures[key], op, bound)]


def _met(value, op: str, bound) -> bool:
    """Whether a target's measured ``value`` meets ``op bound`` (a value not measured, None, does not)."""
    return value is not None and (value <= bound if op == "<=" else value == bound)


def compress_spec(
    fleet: dict, kind: str, entities: int, store: str, tracking_uri: str, config: dict, address: str | None
) -> dict:
    """The :func:`run_probe` spec of one size's ``fleet compress`` (without ``run_id``, ``full`` and ``promote``):
    its fleet's teachers and events, the store, the registered model ``scale-KIND-N``, MLflow, the config
    (CompressConfig fields) and the Ray address (None: the driver process starts its own local Ray)."""
    return {
        "teachers_uri": fleet["teachers_uri"],
        "events_uri": fleet["events_uri"],
        "store": store,
        "fleet": f"scale-{kind}-{entities}",
        "tracking_uri": tracking_uri,
        "config": config,
        "address": address,
    }


def run_scale(
    *,
    out: str,
    fleet_dir: str,
    sizes: list[tuple[str, int]],
    seed: int,
    teacher: dict,
    config: CompressConfig,
    tracking_uri: str,
    address: str | None,
    command: str,
) -> dict:
    """Make (or reuse) each size's fleet, compress it in full in a fresh driver process, run the incremental night
    at the largest size; write ``scale.json``, ``scale.md`` and ``scale.png`` under ``out`` after every step (an
    interrupted run keeps what it measured). Returns the results, ``missed_targets`` included."""
    from fleet.bench.common import machine_info
    from fleet.run.pipeline import new_run_id

    os.makedirs(out, exist_ok=True)
    store = os.path.abspath(os.path.join(out, "store"))
    stamp = new_run_id()
    machine = machine_info()
    results = {
        "format": BENCH_SCALE_FORMAT,
        "created_at": stamp,
        "command": command,
        "machine": machine,
        "load_average_at_start": machine["load_average_at_start"],
        "seed": seed,
        "sizes_requested": [f"{k}:{n}" for k, n in sizes],
        "config": config.to_dict(),
        "entity_shape": {
            k: v
            for k, v in dataclasses.asdict(synth_config("user", 1, seed, teacher)).items()
            if k not in ("campaigns", "seed", "entities")
        },
        "sizes": [],
        "incremental": None,
    }
    started = time.perf_counter()
    largest = max(range(len(sizes)), key=lambda i: (sizes[i][1], i))
    for i, (kind, entities) in enumerate(sizes):
        label = f"scale {kind}:{entities:,} ({i + 1} of {len(sizes)})"
        synth = synth_config(kind, entities, seed, teacher)
        fleet_path = os.path.abspath(os.path.join(fleet_dir, f"{kind}-{entities}"))
        console.print(f"{label}: fleet in {fleet_path}")
        fleet = prepare_fleet(synth, fleet_path, address)
        spec = compress_spec(fleet, kind, entities, store, tracking_uri, config.to_dict(), address)
        console.print(f"{label}: full fleet compress in a fresh driver process")
        full = _compress_in_fresh_process(
            {**spec, "run_id": f"{stamp}-full", "full": True, "promote": i == largest}, label
        )
        results["sizes"].append(size_row(kind, entities, fleet, full))
        add_ratios(results["sizes"])
        _finish(results, out, started)
        row = results["sizes"][-1]
        console.print(
            f"{label}: {row['wall_seconds']:,.1f} s, {row['per_entity_ms']:.2f} ms per entity, "
            f"driver peak RSS {row['driver_peak_rss_mb']:,.0f} MB"
        )
        if i == largest:
            results["incremental"] = incremental_night(kind, synth, fleet, spec, full, stamp, label)
            _finish(results, out, started)
    return results


def incremental_night(
    kind: str, synth: SynthConfig, fleet: dict, spec: dict, full: dict, stamp: str, label: str
) -> dict:
    """Change :data:`CHANGED_SHARE` of the fleet's teachers, run ``fleet compress`` against the champion (the full
    run) in a fresh driver process, restore the teachers; the night's figures against the full run's."""
    changed = changed_entities(entity_ids(synth), synth.seed)
    console.print(f"{label}: incremental night: {len(changed):,} teachers changed, fleet compress against the champion")
    change_teachers(fleet["fleet_dir"], changed)
    try:
        night = _compress_in_fresh_process(
            {**spec, "run_id": f"{stamp}-incremental", "full": False, "promote": False}, f"{label} incremental"
        )
    finally:
        restore_teachers(fleet["fleet_dir"])
    m = night["metrics"]
    refitted = night.pop("refitted")
    return {
        "kind": kind,
        "entities": synth.campaigns,
        "changed": len(changed),
        "changed_share": CHANGED_SHARE,
        "run": {k: v for k, v in night.items() if k not in ("metrics", "stage_seconds")},
        "metrics": m,
        "wall_seconds": night["wall_seconds"],
        "full_wall_seconds": full["wall_seconds"],
        "fraction": night["wall_seconds"] / full["wall_seconds"],
        "stage_seconds": night["stage_seconds"],
        "refitted": len(refitted),
        "reused": m.get("campaigns_reused"),
        "refitted_exactly_changed": sorted(refitted) == changed,
        "changed_not_refitted": sorted(set(changed) - set(refitted))[:20],
        "refitted_not_changed": sorted(set(refitted) - set(changed))[:20],
        "driver_peak_rss_mb": night["driver_peak_rss_mb"],
    }


def rerun_night(*, out: str, tracking_uri: str, address: str | None, command: str) -> dict:
    """``--scale-night``: the incremental night of the ``--scale`` run whose ``scale.json`` is in ``out``, again,
    against its largest size's full run (made champion again if a night passed its gate since) and with this code; the full runs' figures are kept
    and the night's are replaced (``incremental.command``, ``incremental.load_average_at_start`` say when and
    how). Returns the results, ``missed_targets`` included."""
    from fleet.run.pipeline import new_run_id

    path = os.path.join(out, "scale.json")
    try:
        with open(path) as f:
            results = json.load(f)
        row = _extremes(results["sizes"])[1]  # the largest size: the night's fleet and its champion
        config, seed = dict(results["config"]), int(results["seed"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise UsageError(
            f"--scale-night needs the scale.json of a finished fleet bench --scale in --out: {path}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    kind, entities, fleet = row["kind"], row["entities"], row["fleet"]
    shape = {k: v for k, v in (results.get("entity_shape") or {}).items() if k != "pack_size"}
    synth = synth_config(kind, entities, seed, shape)  # its ids and seed pick the teachers the night changes
    spec = compress_spec(
        fleet, kind, entities, os.path.abspath(os.path.join(out, "store")), tracking_uri, config, address
    )
    from fleet.storage import registry

    full_version = str(row["run"]["registered_version"])  # the night's parent, as in the first night
    if registry.champion_version(spec["fleet"], tracking_uri, create=False) != full_version:  # a night passed its gate
        registry.promote(
            spec["fleet"],
            full_version,
            tracking_uri,
            reason="fleet bench --scale-night: the full run is the parent of the night",
        )
    started, load = time.perf_counter(), os.getloadavg() if hasattr(os, "getloadavg") else None
    night = incremental_night(
        kind,
        synth,
        fleet,
        spec,
        {"wall_seconds": row["wall_seconds"]},
        new_run_id(),
        f"scale {kind}:{entities:,} night",
    )
    results["incremental"] = {**night, "command": command, "load_average_at_start": load}
    _finish(results, out, started - results.get("seconds", 0.0))
    return results


def _finish(results: dict, out: str, started: float) -> None:
    results["seconds"] = time.perf_counter() - started
    results["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["targets"] = target_figures(results)
    results["missed_targets"] = check_targets(results)
    _write_json(os.path.join(out, "scale.json"), results)
    with open(os.path.join(out, "scale.md"), "w") as f:
        f.write(render_markdown(results))
    with open(os.path.join(out, "scale.png"), "wb") as f:
        f.write(render_plot(results))


# ----------------------------------------------------------------------------- rendering (pure)


def _f(value, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def render_table(results: dict) -> str:
    """The size table of docs/benchmarks.md: one row per size, the incremental night on the largest's row."""
    inc = results.get("incremental") or {}
    rows = results.get("sizes") or []
    largest = _extremes(rows)[1] if rows else None
    lines = [
        (
            "| kind | N | wall s | per-entity ms | x smallest N (same kind) | stage 1 s | run / stage 1 | "
            "driver peak RSS MB | Ray worker peak RSS MB | heads B / entity | incremental / full run |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        night = _f(inc.get("fraction"), ".1%") if r is largest and inc else ""
        lines.append(
            f"| {r['kind']} | {r['entities']:,} | {_f(r['wall_seconds'], ',.1f')} | "
            f"{_f(r['per_entity_ms'], ',.2f')} | {_f(r.get('per_entity_ratio'), '.2f')}x | "
            f"{_f(r['stage1_seconds'], ',.1f')} | {_f(r['run_over_stage1'], '.2f')} | "
            f"{_f(r['driver_peak_rss_mb'], ',.0f')} | {_f(r['ray_worker_peak_rss_mb'], ',.0f')} | "
            f"{_f(r['heads_bytes_per_entity'], ',.1f')} | {night} |"
        )
    return "\n".join(lines) + "\n"


def render_targets(results: dict) -> str:
    """The targets table: figure, target, measured, met."""
    figures = target_figures(results)
    lines = ["| target | bound | measured | met |", "|---|---:|---:|---|"]
    for key, op, bound, what in TARGETS:
        value = figures[key]
        shown = (
            "n/a (not measured)"
            if value is None
            else ("yes" if value else "no")
            if isinstance(value, bool)
            else f"{value:,.3g}"
        )
        met = _met(value, op, bound)
        lines.append(
            f"| {what} | {op} {'yes' if isinstance(bound, bool) else format(bound, 'g')} | {shown} | "
            f"{'yes' if met else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def render_markdown(results: dict) -> str:
    """``scale.md``: the command, machine state, entity shape, size table, incremental night and targets."""
    shape = results.get("entity_shape", {})
    load0, load1 = results.get("load_average_at_start"), results.get("load_average_at_end")
    loads = ", ".join(
        f"{name} {', '.join(f'{v:.1f}' for v in load)}"
        for name, load in (("at start", load0), ("at end", load1))
        if load
    )
    cpus = (results.get("machine") or {}).get("cpus")
    about = (
        f"Entities: {shape.get('min_sequences')}-{shape.get('max_sequences')} sequences each, "
        f"{shape.get('num_layers')}-layer {str(shape.get('arch', '')).upper()} teachers of hidden "
        f"{shape.get('hidden_size')} (embedding {shape.get('embed_dim')}, training epochs at most {shape.get('max_epochs')}); "
        f"`campaign`: one teacher directory each, `user`: packs of {shape.get('pack_size')}. One full "
        "`fleet compress` per size (backbone retrained, the same configuration), each in a fresh driver process; "
        f"wall time excludes Ray's start. Load average ({cpus} cores) {loads or 'n/a'}; "
        f"{results.get('seconds', 0.0):,.0f} s in all.\n"
    )
    parts = [f"```\n{results.get('command', '')}\n```\n", about, render_table(results)]
    inc = results.get("incremental")
    if inc:
        stages_ = ", ".join(
            f"{name} {inc['stage_seconds'][key]:,.1f} s" for key, name in STAGE_NAMES if key in inc["stage_seconds"]
        )
        parts.append(
            f"Incremental night ({inc['kind']}): {inc['changed']:,} of {inc['entities']:,} teachers changed "
            f"({inc['changed_share']:.0%}); {inc['wall_seconds']:,.1f} s = {inc['fraction']:.1%} of the full run's "
            f"{inc['full_wall_seconds']:,.1f} s ({stages_}); refitted {inc['refitted']:,}, reused "
            f"{_f(inc['reused'], ',')}; exactly the changed ones: "
            f"{'yes' if inc['refitted_exactly_changed'] else '**no**'}."
            + (
                f" Re-run on its own later (`{inc['command']}`, load average at its start "
                f"{', '.join(f'{v:.1f}' for v in inc.get('load_average_at_start') or [])}; run "
                f"{inc['run']['run_id']})."
                if inc.get("command")
                else ""
            )
            + "\n"
        )
    split = [r for r in results.get("sizes") or [] if r.get("heads_part_bytes_per_entity")]
    if split:
        names = dict(HEADS_PARTS)
        lines = [
            f"- {r['kind']} {r['entities']:,}: "
            + ", ".join(f"{names[k]} {v:,.1f} B" for k, v in r["heads_part_bytes_per_entity"].items())
            for r in split
        ]
        parts.append(
            "Heads bytes per entity by column (Parquet column chunks; the rest is footers and page "
            "headers):\n\n" + "\n".join(lines) + "\n"
        )
    parts.append(render_targets(results))
    missed = results.get("missed_targets", check_targets(results))
    parts.append(f"Targets missed: {', '.join(missed) if missed else 'none'}.\n")
    return "\n".join(parts)


def render_plot(results: dict) -> bytes:
    """``scale.png``: wall time, per-entity cost and driver peak RSS against N, log-log, one line per kind."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13.5, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    panels = (
        ("wall_seconds", "wall time (s)"),
        ("per_entity_ms", "per-entity wall cost (ms)"),
        ("driver_peak_rss_mb", "driver peak RSS (MB)"),
    )
    rows = results.get("sizes") or []
    for ax, (key, title) in zip(axes, panels):
        for kind in KINDS:
            mine = sorted((r for r in rows if r["kind"] == kind and r.get(key)), key=lambda r: r["entities"])
            if mine:
                ax.plot([r["entities"] for r in mine], [r[key] for r in mine], marker="o", label=kind)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (entities)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# ----------------------------------------------------------------------------- command line


def add_arguments(p) -> None:
    """``fleet bench --scale`` flags (with ``--out``, ``--fleet-dir``, ``--seed``, the teacher flags, ``--config``,
    ``--backbone-steps``, ``--head-steps``, ``--tracking-uri`` and ``--address`` of ``fleet bench``)."""
    g = p.add_argument_group("scale (with --scale)")
    g.add_argument(
        "--scale",
        action="store_true",
        help="run the REAL pipeline at each --scale-sizes fleet size and an incremental night at the "
        "largest (scale.json, scale.md, scale.png); not with --zoo or --serving-only",
    )
    g.add_argument(
        "--scale-sizes",
        type=parse_sizes,
        default=DEFAULT_SIZES,
        help="fleet sizes KIND:N, comma-separated; KIND campaign (teacher directories) or user (packs) "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--scale-night",
        action="store_true",
        help="re-run only the incremental night, against the largest size's full run of the --scale run "
        "already in OUT (its full runs kept; OUT/scale.json's night replaced), e.g. after a change to "
        "incremental runs",
    )


def run_from_args(args, config: CompressConfig, log) -> int:
    """Entry point of ``fleet bench --scale``; exit 0 when every target is met, 1 when one is missed (or a run
    fails), 2 on a usage error."""
    if args.campaigns is not None:
        raise UsageError("--campaigns has no meaning with --scale: the fleet sizes are --scale-sizes")
    if args.no_mlflow:
        raise UsageError("--scale needs MLflow: its incremental night runs against the registered champion")
    teacher = {
        "arch": args.arch,
        "hidden_size": args.hidden,
        "num_layers": args.layers,
        "min_sequences": args.min_sequences,
        "max_sequences": args.max_sequences,
        "max_epochs": args.max_epochs,
    }
    out = os.path.abspath(args.out)
    tracking_uri = (
        args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.join(out, 'mlflow.db')}"
    )
    command = "fleet " + shlex.join(getattr(args, "argv", sys.argv[1:]))
    if args.scale_night:
        results = rerun_night(out=out, tracking_uri=tracking_uri, address=args.address, command=command)
        log(
            f"scale: the incremental night re-run: {os.path.join(out, 'scale.md')}; targets missed: "
            f"{', '.join(results['missed_targets']) or 'none'}"
        )
        return 1 if results["missed_targets"] else 0
    results = run_scale(
        out=out,
        fleet_dir=args.fleet_dir or "fleet-data/scale",
        sizes=args.scale_sizes,
        seed=args.seed,
        teacher=teacher,
        config=config,
        tracking_uri=tracking_uri,
        address=args.address,
        command=command,
    )
    log(
        f"scale: {os.path.join(out, 'scale.md')}, scale.json, scale.png; targets missed: "
        f"{', '.join(results['missed_targets']) or 'none'}"
    )
    return 1 if results["missed_targets"] else 0


if __name__ == "__main__":
    sys.exit(_probe_main(sys.argv[1:]))
