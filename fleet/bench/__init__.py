"""``fleet bench``: fleet against its peers, side by side, on the same teachers and hold-out rows.

One run measures (DESIGN.md section 5):

(a) ``teacher_fp32``          the teachers as they are (the reference; its time is stage 1, the floor)
(b) ``teacher_int8_dynamic``  each teacher through ``torch.ao.quantization.quantize_dynamic`` (LSTM/GRU +
                              Linear -> qint8), the classic post-training baseline
(c) ``independent_students``  one small student per campaign (fleet's backbone + head shape, fp32), distilled
                              alone with fleet's backbone step budget; run on K random campaigns, time and
                              total bytes *extrapolated* to N (labelled so)
(d) ``fleet_*``               one real ``run_compress`` (default config, bits auto: the headline wall time)
                              plus variants (bits 8/4/2/1, heads lowrank/linear, loss class_distance) that
                              share its stage 1 and, where the config allows, its backbone

plus serving latencies (in-process warm/cold, HTTP on loopback), serving RSS, a *simulated* scale
test (random heads of the real shape and bit mix, 10k and 1M campaigns, in the real store format), and
issue 12's serving targets side by side with the K-teacher peer (:func:`serving_targets`; alone:
``fleet bench --serving-only --model VERSION --fleet-dir DIR``). The REAL scale benchmark (real runs at
1,000 to 100,000 entities) is ``fleet bench --scale`` (:mod:`fleet.bench.scale`); ``--zoo`` is
:mod:`fleet.bench.zoo`.
Every size is a serialized file measured on disk or in memory, never a parameter count.
Outputs under ``--out``: ``results.json``, ``results.md``, ``*.png``; the run is logged to MLflow
(experiment ``fleet-bench``). Ray is used only through :mod:`fleet.pipeline` (imported lazily, so the
subprocesses that measure serving memory never load it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import glob
import io
import json
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import torch
from rich.console import Console
from rich.filesize import decimal
from rich.progress import Progress
from rich.table import Table

from fleet import stages
from fleet.backbone_codec import backbone_from_bytes
from fleet.codec import (
    DATA_FINGERPRINT_BYTES,
    HEADS_SCHEMA,
    conform_heads_table,
    table_to_heads,
)
from fleet.data import map_minibatches
from fleet.distill import compute_features
from fleet.errors import FleetError, UsageError
from fleet.events import EventsDataset, split_by_campaign, table_to_batch
from fleet.heads import decode_heads
from fleet.metrics import campaign_fidelity
from fleet.progress import stage_progress
from fleet.quant import quantize_rows
from fleet.store import FleetVersion, VersionWriter, WorkDir, json_safe
from fleet.student import POOLED_DESIGNS, head_logits
from fleet.synth import (
    SYNTH_FILE,
    SynthConfig,
    campaign_ids,
    teacher_saved,
    with_defaults,
)
from fleet.teachers import list_teacher_campaigns, load_teacher

console = Console(stderr=True)
RESULTS_FORMAT = "fleet-bench/1"
EXPERIMENT = "fleet-bench"
SIM_CHUNK = 100_000  # simulated heads generated per chunk (bounded memory for 1M campaigns)
SERVING_THREADS = 1  # torch intra-op threads of every serving measurement (in-process, HTTP server, scale probe)
#: The environment of the serving subprocesses (HTTP servers, probes): BLAS and OpenMP pools of SERVING_THREADS too.
SERVING_ENV = {name: str(SERVING_THREADS) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


# ----------------------------------------------------------------------------- config


@dataclass
class BenchConfig:
    """What ``fleet bench`` runs.

    Args:
        synth: the synthetic fleet (reused from ``fleet_dir`` when its seed and shape match).
        fleet_dir: where the fleet lives (``events/``, ``teachers/``, ``synth.json``).
        out: output directory (results, plots, the bench's own store).
        compress: the fleet config of the real run; the variants change only bits / head / loss.
        peer_subset: K, campaigns the independent-student peer (c) is run on.
        scale_campaigns: simulated fleet sizes for the scale test (0 or empty: skip).
        variant_backbones: train a backbone per head-design / loss variant (as a real run with that config
            would); False (default, cheaper) reuses the real run's backbone and changes stage 3 only.
        warm_requests, cold_requests: in-process predictions timed (warm: head cached; cold: cache miss).
        http_requests, http_concurrency: HTTP predictions timed on loopback, requests in flight at once.
        tracking_uri: MLflow (None: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<out>/mlflow.db``, so that an
            output directory holds its own store and registry); ``mlflow`` False skips logging.
        address: Ray cluster address (None: local Ray).
    """

    synth: SynthConfig
    fleet_dir: str
    out: str
    compress: stages.CompressConfig = field(default_factory=stages.CompressConfig)
    peer_subset: int = 20
    scale_campaigns: tuple[int, ...] = (10_000, 1_000_000)
    warm_requests: int = 2000
    cold_requests: int = 500
    http_requests: int = 2000
    http_concurrency: int = 8
    variant_backbones: bool = False
    tracking_uri: str | None = None
    mlflow: bool = True
    address: str | None = None

    def __post_init__(self) -> None:
        if self.peer_subset < 1:
            raise ValueError(f"peer_subset must be >= 1, got {self.peer_subset}")
        if self.compress.bits != "auto":
            raise ValueError("the benchmark's real run uses bits='auto' (the variants cover fixed bits)")
        for name in ("warm_requests", "cold_requests", "http_requests", "http_concurrency"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if any(int(s) < 1 for s in self.scale_campaigns):
            raise ValueError("scale_campaigns must be positive")


# variants of (d) other than the real run: name -> CompressConfig overrides
VARIANTS = {
    "fleet_bits8": {"bits": 8},
    "fleet_bits4": {"bits": 4},
    "fleet_bits2": {"bits": 2},
    "fleet_bits1": {"bits": 1},
    "fleet_weightless": {"codec": "bloomier"},
    "fleet_auto_lowrank": {"head": "lowrank"},
    "fleet_auto_linear": {"head": "linear"},
    "fleet_auto_class_distance": {"loss": "class_distance"},
}
LABELS = {
    "teacher_fp32": "(a) fp32 teachers",
    "teacher_int8_dynamic": "(b) teachers, torch dynamic int8",
    "independent_students": "(c) independent students (K campaigns, extrapolated)",
    "fleet_auto": "(d) fleet auto bits (film, hinton) = real run",
    "fleet_bits8": "(d) fleet int8",
    "fleet_bits4": "(d) fleet int4",
    "fleet_bits2": "(d) fleet ternary",
    "fleet_bits1": "(d) fleet binary",
    "fleet_weightless": "(d) fleet Weightless (bloomier codec)",
    "fleet_auto_lowrank": "(d) fleet auto, lowrank head",
    "fleet_auto_linear": "(d) fleet auto, linear head",
    "fleet_auto_class_distance": "(d) fleet auto, class_distance loss",
}


def _backbone_key(config: stages.CompressConfig) -> tuple:
    """Everything stage 2 depends on: variants with the same key share one backbone."""
    c = config
    return (c.arch, c.hidden_size, c.embed_dim, c.num_layers, c.head, c.head_rank, c.loss, c.temperature,
            c.hard_label_weight, c.distance_weight, c.backbone_bits, c.backbone_qat, c.backbone_steps,
            c.backbone_lr, c.backbone_batch_size, c.backbone_max_sequences, c.backbone_per_campaign,
            c.backbone_eval_every, c.backbone_patience, c.seed)


# ----------------------------------------------------------------------------- the cached fleet


def prepare_fleet(config: SynthConfig, fleet_dir: str, address: str | None = None) -> dict:
    """Reuse the synthetic fleet in ``fleet_dir`` when its seed and shape match ``config``; create it,
    or finish an interrupted ``fleet synth`` of the same config, otherwise. A different fleet is an
    error, never overwritten."""
    events_uri, teachers_uri = os.path.join(fleet_dir, "events"), os.path.join(fleet_dir, "teachers")
    recorded_path = os.path.join(fleet_dir, SYNTH_FILE)
    info = {"fleet_dir": fleet_dir, "events_uri": events_uri, "teachers_uri": teachers_uri,
            "synth": dataclasses.asdict(config)}
    if os.path.exists(recorded_path) and _is_complete(config, teachers_uri):
        with open(recorded_path) as f:
            recorded = with_defaults(json.load(f))  # fields added since it was written: their defaults
        if recorded == info["synth"]:
            return {**info, "reused": True, "how": "synth.json matches the requested SynthConfig"}
    from fleet.pipeline import (
        run_synth,  # refuses another fleet; resumes an interrupted one
    )

    console.print(f"fleet in {fleet_dir} absent or incomplete: training {config.campaigns} teachers (resumable)")
    result = run_synth(config, fleet_dir, address=address)
    resumed = sum(1 for s in result["campaigns"] if s["resumed"])
    return {**info, "reused": False, "how": f"created by run_synth ({resumed} teachers kept from an interrupted run)",
            "synth_seconds": result["seconds"]}


def _is_complete(config: SynthConfig, teachers_uri: str) -> bool:
    found = list_teacher_campaigns(teachers_uri) if os.path.exists(teachers_uri) else []
    return found == campaign_ids(config.campaigns) and all(
        teacher_saved(teachers_uri, config.teacher_config(cid)) for cid in found)


# ----------------------------------------------------------------------------- fidelity helpers


def _q(values, q: float) -> float | None:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.percentile(values, q)) if values else None


def fidelity_summary(rows: list[dict]) -> dict:
    """Median / p10 / worst of per-campaign ``auc_diff`` and ``mean_abs_diff`` rows (None where undefined)."""
    diffs = [r["auc_diff"] for r in rows if r.get("auc_diff") is not None]
    mads = [r["mean_abs_diff"] for r in rows if r.get("mean_abs_diff") is not None]
    aucs = [r["auc"] for r in rows if r.get("auc") is not None]
    return {
        "campaigns": len(rows), "campaigns_with_auc": len(diffs),
        "auc_median": _q(aucs, 50), "auc_diff_median": _q(diffs, 50), "auc_diff_p10": _q(diffs, 10),
        "auc_diff_worst": min(diffs) if diffs else None,
        "mean_abs_diff_median": _q(mads, 50), "mean_abs_diff_p90": _q(mads, 90),
        "mean_abs_diff_worst": max(mads) if mads else None,
    }


def _min_count(config: stages.CompressConfig) -> int:
    """Fewest positives (and negatives) for a hold-out AUC: the real run's rule, so every method's AUC
    statistics cover the same campaigns."""
    return int(getattr(config, "min_auc_class_count", 1))


def _fid_row(campaign_id: str, fid: dict, n_rows: int | None) -> dict:
    return {"campaign_id": campaign_id, "n_rows": n_rows, "auc": fid["student_auc"], "teacher_auc": fid["teacher_auc"],
            "auc_diff": fid["auc_diff"], "mean_abs_diff": fid["mean_abs_diff"], "n_holdout": fid["n_holdout"]}


def _heads_rows(heads: pa.Table, sizes: dict[str, int]) -> list[dict]:
    out = []
    for r in heads.select(["campaign_id", "student_auc", "teacher_auc", "mean_abs_diff", "n_holdout", "bits"]).to_pylist():
        s, t = r["student_auc"], r["teacher_auc"]
        ok = s is not None and t is not None and math.isfinite(s) and math.isfinite(t)
        out.append({"campaign_id": r["campaign_id"], "n_rows": sizes.get(r["campaign_id"]), "auc": s if ok else None,
                    "teacher_auc": t if ok else None, "auc_diff": (s - t) if ok else None,
                    "mean_abs_diff": r["mean_abs_diff"], "n_holdout": r["n_holdout"], "bits": r["bits"]})
    return out


def _holdout_batch(events: EventsDataset, campaign_id: str, rows: np.ndarray, num_features: int):
    table = events.read_campaigns([campaign_id])[campaign_id]
    return table_to_batch(table.take(pa.array(rows.astype(np.int64))), num_features)


# ----------------------------------------------------------------------------- Ray task bodies (plain functions)


def int8_dynamic_task(job: dict, ctx: stages.StageContext) -> list[dict]:
    """Peer (b) for a batch of campaigns: quantize each teacher with ``quantize_dynamic`` (LSTM/GRU +
    Linear -> qint8), measure its serialized state, score its hold-out rows against the fp32 teacher."""
    from torch.ao.quantization import (
        quantize_dynamic,  # deprecated API: allowed here only, as the baseline
    )

    events = EventsDataset(ctx.events_uri, ctx.storage_options)
    out = []
    for campaign_id in job["campaigns"]:
        hold = job["holdout"][campaign_id]
        teacher = load_teacher(ctx.teachers_uri, campaign_id, ctx.storage_options,
                               allow_loaders=ctx.config.allow_loaders, untrusted_roots=(ctx.events_uri,))
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qmodel = quantize_dynamic(teacher.model, {torch.nn.LSTM, torch.nn.GRU, torch.nn.Linear}, dtype=torch.qint8)
        quantize_s = time.perf_counter() - started
        buf = io.BytesIO()
        torch.save(qmodel.state_dict(), buf)
        batch = _holdout_batch(events, campaign_id, np.asarray(hold["row"]), ctx.num_features)
        started = time.perf_counter()
        logits = map_minibatches(qmodel, batch).float()
        infer_s = time.perf_counter() - started
        fid = campaign_fidelity(torch.sigmoid(logits).numpy(), torch.sigmoid(torch.tensor(hold["teacher_logit"])).numpy(),
                                np.asarray(hold["label"], dtype=np.float64), _min_count(ctx.config))
        out.append({**_fid_row(campaign_id, fid, None), "bytes": buf.getbuffer().nbytes, "quantize_s": quantize_s,
                    "inference_s": infer_s})
    return out


def independent_student_task(job: dict, ctx: stages.StageContext) -> dict:
    """Peer (c) for one campaign: fleet's backbone + head shape distilled on this campaign's fit rows
    alone (fleet's backbone step budget and early stopping on its validation rows), stored fp32; hold-out
    fidelity vs its teacher."""
    started = time.perf_counter()
    data, stats = stages.train_backbone(job["fit"], ctx)  # (backbone + one head) jointly, like stage 2
    seconds = time.perf_counter() - started
    backbone, head = backbone_from_bytes(data)  # head_prior = the mean of one head = the head
    hold = job["holdout"]
    batch = _holdout_batch(EventsDataset(ctx.events_uri, ctx.storage_options), job["campaign_id"],
                           np.asarray(hold["row"]), ctx.num_features)
    config = backbone.config
    features = compute_features(backbone, batch, pooled=config.head in POOLED_DESIGNS)  # (n, feature width)
    logits = head_logits(config.head, features, head, config.head_rank)
    fid = campaign_fidelity(torch.sigmoid(logits).numpy(), torch.sigmoid(torch.tensor(hold["teacher_logit"])).numpy(),
                            np.asarray(hold["label"], dtype=np.float64), _min_count(ctx.config))
    return {**_fid_row(job["campaign_id"], fid, None), "bytes": len(data), "seconds": seconds,
            "steps": stats["backbone_steps"], "fit_rows": stats["backbone_rows"]}


def retarget_backbone(data: bytes, head: str, head_rank: int) -> bytes:
    """``backbone.safetensors`` bytes whose student config names another head design (the weights are
    unchanged); the stored head prior is dropped when the design changes (it is a mean of the old design's
    heads), so stage 3 starts from :func:`fleet.student.init_heads`."""
    from safetensors.torch import load, save

    header = json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])
    metadata = dict(header.get("__metadata__") or {})
    student = json.loads(metadata["student_config"])
    if (student["head"], student["head_rank"]) == (head, head_rank):
        return data
    student.update(head=head, head_rank=head_rank)
    metadata["student_config"] = json.dumps(student)
    tensors = {k: v for k, v in load(data).items() if k != "head_prior"}
    return save(tensors, metadata=metadata)


def backbone_task(sample: pa.Table, ctx: stages.StageContext) -> dict:
    """Stage 2 for one variant config."""
    started = time.perf_counter()
    data, stats = stages.train_backbone(sample, ctx)
    return {"bytes": data, "seconds": time.perf_counter() - started, **stats}


def heads_task(job: dict, ctx: stages.StageContext, backbone_bytes: bytes) -> pa.Table:
    """Stages 3-5 for one shard of one variant (``job["soft"]`` holds the shard's stage-1 rows)."""
    return stages.fit_heads_shard(job, ctx, job["soft"], backbone_bytes)


# ----------------------------------------------------------------------------- the benchmark


def _progress() -> Progress:
    return stage_progress(console)


def _hold_dict(rows: pa.Table) -> dict:
    return {"row": rows["row"].to_numpy(), "teacher_logit": rows["teacher_logit"].to_numpy(),
            "label": rows["label"].to_numpy()}


def run_bench(cfg: BenchConfig) -> dict:
    """Run every part of the benchmark; write results.json/results.md/plots under ``cfg.out``; return the results."""
    from fleet import pipeline

    started_all = time.perf_counter()
    os.makedirs(cfg.out, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    store = os.path.abspath(os.path.join(cfg.out, "store"))
    tracking_uri = (cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                    or f"sqlite:///{os.path.abspath(os.path.join(cfg.out, 'mlflow.db'))}")
    n = cfg.synth.campaigns
    results: dict = {"format": RESULTS_FORMAT, "created_at": stamp, "campaigns": n,
                     "machine": machine_info(), "bench_config": _bench_params(cfg), "methods": {}}

    with pipeline.ray_session(cfg.address):
        fleet = prepare_fleet(cfg.synth, cfg.fleet_dir, cfg.address)
        results["fleet"] = fleet
        console.print(f"fleet: {fleet['how']}")
        results["teacher_pass"] = bench_teacher_pass(fleet["teachers_uri"], fleet["events_uri"])

        # (d) the real run: the headline wall time, and stage 1 for everyone
        fleet_name = f"bench-n{n}"
        t0 = time.perf_counter()
        real = pipeline.run_compress(teachers_uri=os.path.abspath(fleet["teachers_uri"]),
                                     events_uri=os.path.abspath(fleet["events_uri"]), store_uri=store,
                                     fleet=fleet_name, config=cfg.compress, run_id=stamp, tracking_uri=tracking_uri,
                                     address=cfg.address, retrain_backbone=True,
                                     register=cfg.mlflow, no_parent=not cfg.mlflow)  # --no-mlflow: no registry
        real_wall = time.perf_counter() - t0
        work = WorkDir(store, fleet_name, stamp)
        plan = work.read_json("plan.json")
        soft_shards = {s: work.read_shard("soft_labels", s) for s in plan["shards"]}
        status = pa.concat_tables([work.read_shard("campaigns", s) for s in plan["shards"]])
        sample = pa.concat_tables([work.read_shard("backbone_sample", s) for s in plan["shards"]])
        real_backbone = work.read_bytes("backbone.safetensors")
        version = FleetVersion.open(real.manifest_uri)
        m = real.metrics
        floor = m["stage_seconds_soft_labels"]
        ok = [c for c, s in zip(status["campaign_id"].to_pylist(), status["status"].to_pylist()) if s == "ok"]
        sizes = dict(zip(status["campaign_id"].to_pylist(), status["n_rows"].to_pylist()))
        teacher_bytes = dict(zip(status["campaign_id"].to_pylist(), status["teacher_bytes"].to_pylist()))
        hashes = {c: [t, d] for c, t, d in zip(status["campaign_id"].to_pylist(), status["teacher_sha256"].to_pylist(),
                                                status["data_fingerprint"].to_pylist())}
        teacher_total = int(sum(v for c, v in teacher_bytes.items() if c in set(ok)))
        results["real_run"] = {
            "fleet": fleet_name, "version_id": real.version_id, "manifest_uri": real.manifest_uri,
            "exit_code": real.exit_code, "wall_seconds": real_wall, "floor_seconds": floor,
            "total_over_floor": real_wall / floor if floor else None, "run_over_floor": m.get("run_over_floor"),
            "stage_seconds": pipeline.stage_seconds(m),
            "registration_and_overhead_seconds": real_wall - m.get("run_seconds", 0.0),
            "registered": None if real.registered is None else
            {"name": real.registered.name, "version": real.registered.version,
             "gate_passed": None if real.registered.gate is None else real.registered.gate.passed,
             "gate_reasons": None if real.registered.gate is None else real.registered.gate.reasons},
            "metrics": {k: v for k, v in m.items() if isinstance(v, (int, float, str)) or v is None},
            "rejects": len(real.rejects),
        }
        soft = pa.concat_tables(list(soft_shards.values()))
        by_campaign = split_by_campaign(soft)
        holdout = {c: t.filter(pc.equal(t["split"], stages.HOLDOUT)) for c, t in by_campaign.items()}
        ctx = stages.StageContext(os.path.abspath(fleet["teachers_uri"]), os.path.abspath(fleet["events_uri"]),
                                  cfg.compress, plan["num_event_types"], plan["num_features"])

        # (a) fp32 teachers: fidelity of the stage-1 hold-out logits against labels
        rows = []
        for cid in ok:
            h = holdout[cid]
            p = torch.sigmoid(torch.tensor(h["teacher_logit"].to_numpy())).numpy()
            rows.append(_fid_row(cid, campaign_fidelity(p, p, h["label"].to_numpy(), _min_count(cfg.compress)), sizes[cid]))
        results["methods"]["teacher_fp32"] = _method(
            "teacher_fp32", rows, bytes_total=teacher_total, bytes_per_campaign=teacher_total / len(ok),
            bytes_note="model.safetensors of every teacher (measured file sizes)", time_s=floor,
            time_note="one inference pass over every campaign's transfer rows = stage 1 of the real run (the floor)")

        # (b) torch dynamic int8 teachers
        batches = [b for b in (sorted(set(batch) & set(ok)) for batch in plan["batches"]) if b]
        jobs = [{"campaigns": b, "holdout": {c: _hold_dict(holdout[c]) for c in b}} for b in batches]
        t0 = time.perf_counter()
        parts = pipeline.map_on_ray(int8_dynamic_task, jobs, (ctx,), "(b) teachers -> dynamic int8 + hold-out")
        wall_b = time.perf_counter() - t0
        rows_b = [dict(r, n_rows=sizes[r["campaign_id"]]) for part in parts for r in part]
        bytes_b = int(sum(r["bytes"] for r in rows_b))
        results["methods"]["teacher_int8_dynamic"] = _method(
            "teacher_int8_dynamic", rows_b, bytes_total=bytes_b, bytes_per_campaign=bytes_b / len(rows_b),
            teacher_total=teacher_total, time_s=wall_b,
            bytes_note="torch.save(quantized state_dict) to BytesIO, measured per teacher",
            time_note=f"quantize + hold-out inference of all teachers (quantize alone: "
                      f"{sum(r['quantize_s'] for r in rows_b):.1f} task-s)",
            extra={"quantize_task_seconds": sum(r["quantize_s"] for r in rows_b),
                   "inference_task_seconds": sum(r["inference_s"] for r in rows_b)})

        # (c) independent students on K random campaigns, extrapolated to N
        rng = np.random.default_rng(cfg.compress.seed + 17)
        k = min(cfg.peer_subset, len(ok))
        subset = sorted(rng.choice(ok, size=k, replace=False).tolist())
        c_config = dataclasses.replace(cfg.compress, backbone_bits=32, backbone_per_campaign=cfg.compress.max_fit_rows,
                                       backbone_max_sequences=max(cfg.compress.backbone_max_sequences, cfg.compress.max_fit_rows))
        c_ctx = dataclasses.replace(ctx, config=c_config)
        learn = pa.array([stages.FIT, stages.VALIDATION], pa.int8())  # validation rows: early stopping
        jobs = [{"campaign_id": c, "fit": by_campaign[c].filter(pc.is_in(by_campaign[c]["split"], value_set=learn)),
                 "holdout": _hold_dict(holdout[c])} for c in subset]
        t0 = time.perf_counter()
        rows_c = pipeline.map_on_ray(independent_student_task, jobs, (c_ctx,), f"(c) independent students ({k} campaigns)")
        wall_c = time.perf_counter() - t0
        rows_c = [dict(r, n_rows=sizes[r["campaign_id"]]) for r in rows_c]
        per_c = float(np.mean([r["bytes"] for r in rows_c]))
        results["methods"]["independent_students"] = _method(
            "independent_students", rows_c, bytes_total=per_c * len(ok), bytes_per_campaign=per_c,
            teacher_total=teacher_total, time_s=wall_c * len(ok) / k, extrapolated=True,
            bytes_note=f"backbone+head safetensors (fp32), measured on {k} campaigns; total = mean x {len(ok)}",
            time_note=f"EXTRAPOLATED: {wall_c:.1f} s wall for {k} random campaigns x {len(ok)}/{k}; "
                      f"{c_config.backbone_steps} steps each (fleet's backbone budget)",
            extra={"subset": subset, "measured_wall_seconds": wall_c, "subset_size": k})

        # (d) fleet: the real run, then variants sharing its stage 1 (and backbone where the config allows)
        heads_real = version.read_heads()
        rows_d = _heads_rows(heads_real, sizes)
        files = version.manifest["files"]
        heads_bytes = sum(f["bytes"] for f in files if f["path"].startswith("heads/"))
        backbone_bytes = sum(f["bytes"] for f in files if f["path"] == "backbone.safetensors")
        bits = heads_real["bits"].to_numpy()
        results["methods"]["fleet_auto"] = _method(
            "fleet_auto", rows_d, bytes_total=heads_bytes + backbone_bytes, bytes_per_campaign=heads_bytes / len(rows_d),
            teacher_total=teacher_total, time_s=real_wall,
            bytes_note="heads/*.parquet / N per campaign; total adds backbone.safetensors (measured files)",
            time_note="one full run_compress incl. registration (stage times in real_run)",
            extra={"heads_bytes": heads_bytes, "backbone_bytes": backbone_bytes,
                   "bits_campaigns": {str(b): int((bits == b).sum()) for b in (1, 2, 4, 8, 16)},
                   "head_latency": head_latencies(real.manifest_uri, heads_real["campaign_id"].to_pylist()),
                   "on_peer_subset": fidelity_summary([r for r in rows_d if r["campaign_id"] in set(subset)])})
        results["methods"]["independent_students"]["fleet_auto_on_same_subset"] = \
            results["methods"]["fleet_auto"]["on_peer_subset"]
        _run_variants(cfg, results, ctx, plan, soft_shards, ok, hashes, sizes, sample, real_backbone, m,
                      teacher_total, store, stamp)

    # serving: in-process warm/cold, HTTP on loopback, server RSS (outside Ray: nothing else runs)
    results["serving"] = bench_serving(real.manifest_uri, fleet["events_uri"], ok, holdout, plan["num_features"], cfg)
    if cfg.scale_campaigns:
        results["scale"] = {str(s): bench_scale(s, version, cfg, stamp) for s in cfg.scale_campaigns}
        largest = max(cfg.scale_campaigns)
        results["serving_targets"] = serving_targets(
            real.manifest_uri, fleet["events_uri"], fleet["teachers_uri"], results["scale"][str(largest)]["manifest_uri"],
            largest, out_dir=cfg.out, seed=cfg.compress.seed, requests=cfg.warm_requests,
            http_requests=cfg.http_requests)
    results["targets"] = evaluate_targets(results)
    results["bench_seconds"] = time.perf_counter() - started_all
    results["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["argv"] = list(sys.argv)
    write_outputs(results, cfg.out)
    if cfg.mlflow:
        results["mlflow_run_id"] = log_to_mlflow(results, cfg.out, tracking_uri)
        with open(os.path.join(cfg.out, "results.json"), "w") as f:
            json.dump(json_safe(results), f, indent=1, sort_keys=True)
    return results


def _run_variants(cfg, results, ctx, plan, soft_shards, ok, hashes, sizes, sample, real_backbone, m, teacher_total,
                  store, stamp) -> None:
    from fleet import pipeline

    okset = set(ok)
    backbones = {_backbone_key(cfg.compress): (real_backbone, m.get("stage_seconds_backbone", 0.0), "shared with the real run")}
    head_jobs = []
    for name, batch in zip(plan["shards"], plan["batches"]):
        mine = [c for c in batch if c in okset]
        if mine:
            soft = soft_shards[name]
            head_jobs.append({"shard": name, "campaigns": mine, "hashes": {c: hashes[c] for c in mine}, "soft": soft})
    floor = m["stage_seconds_soft_labels"]
    for name, overrides in VARIANTS.items():
        config = dataclasses.replace(cfg.compress, **overrides)
        config.__post_init__()
        vctx = dataclasses.replace(ctx, config=config)
        key = _backbone_key(config)
        if key not in backbones and not cfg.variant_backbones:
            real_bytes = backbones[_backbone_key(cfg.compress)][0]
            backbones[key] = (retarget_backbone(real_bytes, config.head, config.head_rank),
                              m.get("stage_seconds_backbone", 0.0),
                              "the real run's backbone (film/hinton-trained), reused; only stage 3 differs")
        if key not in backbones:
            out = pipeline.map_on_ray(backbone_task, [sample], (vctx,), f"{name}: stage 2 backbone",
                                      threads=max(1, min(os.cpu_count() or 1, 4)), unit="backbone")[0]
            backbones[key] = (out["bytes"], out["seconds"], "trained for this variant (same sample, steps, threads as the real run)")
        bb, bb_seconds, bb_note = backbones[key]
        jobs = head_jobs if config.codec == "packed" else contiguous_jobs(head_jobs, config.bloomier_block_rows)
        t0 = time.perf_counter()
        tables = pipeline.map_on_ray(heads_task, jobs, (vctx, bb), f"{name}: stages 3-5 heads")
        heads_seconds = time.perf_counter() - t0
        heads = pa.concat_tables([conform_heads_table(t) for t in tables])
        writer = VersionWriter(store, "bench-variants", f"{stamp}-{name.replace('_', '-')}")
        writer.write_backbone_bytes(bb)
        writer.write_heads(heads)
        manifest_uri = writer.commit(config={**config.to_dict(), "variant": name}, lineage={"run_id": stamp})
        files = writer.files
        hb = sum(f["bytes"] for p, f in files.items() if p.startswith("heads/"))
        rows = _heads_rows(heads, sizes)
        bits = heads["bits"].to_numpy()
        results["methods"][name] = _method(
            name, rows, bytes_total=hb + len(bb), bytes_per_campaign=hb / len(rows), teacher_total=teacher_total,
            time_s=floor + bb_seconds + heads_seconds,
            bytes_note="heads/*.parquet / N per campaign; total adds backbone.safetensors (measured files)",
            time_note=f"stage 1 of the real run (shared) + backbone ({bb_note}) + heads {heads_seconds:.1f} s",
            extra={"heads_bytes": hb, "backbone_bytes": len(bb), "backbone_seconds": bb_seconds, "backbone_note": bb_note,
                   "heads_seconds": heads_seconds, "overrides": overrides,
                   "bits_campaigns": {str(b): int((bits == b).sum()) for b in (1, 2, 4, 8, 16)},
                   "head_latency": head_latencies(manifest_uri, heads["campaign_id"].to_pylist())})


def contiguous_jobs(head_jobs: list[dict], block_rows: int) -> list[dict]:
    """The shard jobs of the real run (cost-balanced, ids interleaved) regrouped as the ``bloomier`` codec's plan
    cuts them: contiguous runs of the sorted campaign ids, at most ``block_rows`` each, as many as there were
    jobs (:func:`fleet.pipeline.contiguous_batches`); each job's ``soft`` holds its campaigns' stage-1 rows."""
    from fleet.pipeline import contiguous_batches

    hashes = {c: h for job in head_jobs for c, h in job["hashes"].items()}
    soft = pa.concat_tables([job["soft"] for job in head_jobs])
    batches = contiguous_batches(list(hashes), len(head_jobs), block_rows)
    return [{"shard": f"w{i:05d}", "campaigns": batch, "hashes": {c: hashes[c] for c in batch},
             "soft": soft.filter(pc.is_in(soft["campaign_id"], value_set=pa.array(batch)))}
            for i, batch in enumerate(batches)]


TEACHER_PASS_CAMPAIGNS, TEACHER_PASS_ROWS = 32, 256  # the teacher-pass section: teachers, rows of each (at most)


def bench_teacher_pass(teachers_uri: str, events_uri: str, campaigns: int = TEACHER_PASS_CAMPAIGNS,
                       rows: int = TEACHER_PASS_ROWS) -> dict:
    """Stage 1's teacher pass on the bench fleet's first ``campaigns`` teachers (at most ``rows`` rows each):
    sequences/s batched (stacked parameters, :func:`fleet.teacher_pack.teacher_logits`) vs one at a time,
    in this process, and the largest difference of their logits."""
    from fleet.teacher_pack import load_teachers, locate_teachers, teacher_logits

    catalog = locate_teachers(teachers_uri)
    ids = catalog.campaigns[:campaigns]
    loaded = load_teachers(teachers_uri, ids, catalog.plan_entries())
    teachers = [loaded[c] for c in ids if not isinstance(loaded[c], Exception)]
    tables = EventsDataset(events_uri).read_campaigns([t.campaign_id for t in teachers])
    num_features = teachers[0].config["num_features"]
    batches = [table_to_batch(tables[t.campaign_id].slice(0, rows), num_features) for t in teachers]
    sequences = sum(len(b) for b in batches)
    timings, outputs = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in stage 1's Ray tasks (one CPU, one torch thread each)
    try:
        teacher_logits(teachers[:2], batches[:2], batched=False)  # warm-up
        teacher_logits(teachers[:2], batches[:2])
        for mode in ("one_at_a_time", "batched"):
            started = time.perf_counter()
            outputs[mode] = teacher_logits(teachers, batches, batched=mode == "batched")
            timings[mode] = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    diff = max(float((a - b).abs().max()) for a, b in zip(outputs["batched"], outputs["one_at_a_time"]) if len(a))
    return {"teachers": len(teachers), "sequences": sequences, "torch_threads": 1,
            "teacher": {k: teachers[0].config.get(k) for k in ("arch", "hidden_size", "num_layers")},
            "seconds": timings, "sequences_per_second": {k: sequences / v for k, v in timings.items()},
            "speedup": timings["one_at_a_time"] / timings["batched"], "max_abs_logit_diff": diff,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def head_latencies(manifest_uri: str, campaign_ids: list[str], count: int = 200, seed: int = 0) -> dict:
    """Per-head read costs of a written version, any codec: ``cold_lookup`` (one campaign's row group read, checked
    and decoded: :meth:`FleetVersion.read_head_row` + :func:`fleet.heads.decode_heads`, footers cached after the
    first lookup of a part, as in serving), ``decode`` (the decode alone of that one row), and ``decode_all_per_head_ms``
    (every head of the version decoded in one call, per head). ``count`` random campaigns, in ms."""
    import random

    version = FleetVersion.open(manifest_uri, verify=False)
    sample = random.Random(seed).sample(list(campaign_ids), min(count, len(campaign_ids)))
    cold, decode = [], []
    for cid in sample:
        t0 = time.perf_counter()
        row = version.read_head_row(cid)
        t1 = time.perf_counter()
        decode_heads([row])
        t2 = time.perf_counter()
        cold.append(t2 - t0)
        decode.append(t2 - t1)
    rows = table_to_heads(version.read_heads())
    by_size: dict[int, list] = {}  # a version with capacity-ladder heads holds rows of two sizes
    for row in rows:
        by_size.setdefault(row.num_params, []).append(row)
    t0 = time.perf_counter()
    for same_size in by_size.values():
        decode_heads(same_size)
    every = (time.perf_counter() - t0) * 1000.0 / max(1, len(rows))
    return {"codec": version.manifest.get("heads_codec", "packed"), "cold_lookup": _latencies(cold),
            "decode": _latencies(decode), "decode_all_per_head_ms": every}


def _method(key: str, rows: list[dict], *, bytes_total: float, bytes_per_campaign: float, time_s: float,
            bytes_note: str, time_note: str, teacher_total: float | None = None, extrapolated: bool = False,
            extra: dict | None = None) -> dict:
    ratio = 1.0 if key == "teacher_fp32" else (teacher_total / bytes_total if teacher_total and bytes_total else None)
    return {"label": LABELS[key], "bytes_total": float(bytes_total), "bytes_per_campaign": float(bytes_per_campaign),
            "compression_ratio": ratio, "bytes_note": bytes_note, "time_s": float(time_s), "time_note": time_note,
            "extrapolated": extrapolated, "fidelity": fidelity_summary(rows), "per_campaign": rows, **(extra or {})}


# ----------------------------------------------------------------------------- serving


def _latencies(samples: list[float]) -> dict:
    a = np.asarray(samples, dtype=np.float64) * 1000.0
    return {"n": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max()), "mean_ms": float(a.mean()),
            "samples_ms": [round(float(x), 4) for x in a]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_rss_mb(pid: int | str = "self") -> dict:
    """``{"rss_mb", "peak_rss_mb"}`` (VmRSS, VmHWM; MiB) of process ``pid`` from ``/proc/<pid>/status``
    (OSError where there is no ``/proc`` or no such process)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024.0
    return {"rss_mb": out.get("VmRSS"), "peak_rss_mb": out.get("VmHWM")}


def _sequences(events_uri: str, ok: list[str], holdout: dict, num_features: int, rng, count: int) -> list[tuple]:
    """Real hold-out sequences ``(campaign_id, event_types list, features list)`` of random campaigns."""
    events = EventsDataset(events_uri)
    picked = sorted(set(rng.choice(ok, size=min(len(ok), 64), replace=False).tolist()))
    tables = events.read_campaigns(picked)
    out = []
    for cid in picked:
        rows = holdout[cid]["row"].to_numpy()[:8]
        t = tables[cid].take(pa.array(rows.astype(np.int64)))
        for types, feats in zip(t["event_types"].to_pylist(), t["features"].to_pylist()):
            out.append((cid, types, feats))
    return [out[i % len(out)] for i in rng.permutation(max(count, len(out)))[:count]]


def bench_serving(manifest_uri: str, events_uri: str, ok: list[str], holdout: dict, num_features: int,
                  cfg: BenchConfig) -> dict:
    """Warm and cold in-process latency, HTTP latency under bounded concurrency, and server RSS."""
    from fleet.serving import FleetModel

    threads_before = torch.get_num_threads()
    try:
        return _bench_serving(manifest_uri, events_uri, ok, holdout, num_features, cfg, FleetModel)
    finally:
        torch.set_num_threads(threads_before)


def _bench_serving(manifest_uri, events_uri, ok, holdout, num_features, cfg, FleetModel) -> dict:
    rng = np.random.default_rng(cfg.compress.seed + 5)
    seqs = _sequences(events_uri, ok, holdout, num_features, rng, max(cfg.warm_requests, cfg.cold_requests))
    out: dict = {}
    # heads="lru" throughout: these figures are the LRU path's (warm = head cached, cold = a row-group read),
    # as docs/benchmarks.md reports them; FleetModel's default is heads="resident" (docs/serving.md)
    # open time of a fresh model (manifest + backbone + checksums of every file)
    opens = []
    for _ in range(5):
        t0 = time.perf_counter()
        FleetModel.open(manifest_uri, heads="lru")
        opens.append(time.perf_counter() - t0)
    out["open_seconds_median"] = float(np.median(opens))
    # one intra-op thread, as `fleet serve --threads 1`: one short sequence gains nothing from more, and
    # OpenMP's spinning threads cost milliseconds on a machine whose cores are shared
    model = FleetModel.open(manifest_uri, num_threads=SERVING_THREADS, heads="lru")
    cid, types, feats = seqs[0]
    model.predict(cid, [{"event_types": types, "features": feats}])  # head now cached
    warm = []
    with _progress() as progress:
        task = progress.add_task("serving: warm predict (head cached)", total=cfg.warm_requests, unit="requests")
        for i in range(cfg.warm_requests):
            _, types, feats = seqs[i % len(seqs)]
            t0 = time.perf_counter()
            model.predict(cid, [{"event_types": types, "features": feats}])
            warm.append(time.perf_counter() - t0)
            progress.advance(task)
        cold_model = FleetModel.open(manifest_uri, cache_size=0, num_threads=SERVING_THREADS,
                                     heads="lru")  # every predict reads its head's row group
        cold = []
        task = progress.add_task("serving: cold predict (cache miss, Parquet row group)", total=cfg.cold_requests,
                                 unit="requests")
        for i in range(cfg.cold_requests):
            c, types, feats = seqs[i % len(seqs)]
            t0 = time.perf_counter()
            cold_model.predict(c, [{"event_types": types, "features": feats}])
            cold.append(time.perf_counter() - t0)
            progress.advance(task)
    out["warm"] = _latencies(warm)
    out["cold"] = _latencies(cold)
    out["in_process_torch_threads"] = torch.get_num_threads()
    out["http"] = bench_http(manifest_uri, seqs, cfg.http_requests, cfg.http_concurrency, cfg.out)
    return out


_SERVER_SRC = """
import sys, uvicorn
from fleet.http import app_from_uri
app = app_from_uri(sys.argv[1], num_threads=int(sys.argv[3]), heads=sys.argv[4])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
"""


@contextlib.contextmanager
def _http_server(manifest_uri: str, heads: str, log_path: str):
    """A real uvicorn server (``fleet.http.app_from_uri``, ``heads`` mode, :data:`SERVING_THREADS` threads) in a
    subprocess on 127.0.0.1: yields ``(process, base URL)`` once ``/healthz`` answers; stopped on exit."""
    import httpx

    port = _free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", _SERVER_SRC, manifest_uri, str(port), str(SERVING_THREADS), heads],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **SERVING_ENV})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                with open(log_path) as f:
                    raise FleetError(f"HTTP server exited with {proc.returncode}: {f.read()[-2000:]}")
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise FleetError("HTTP server did not answer within 300 s")
            time.sleep(0.2)
        yield proc, base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _drive_http(base: str, path: str, bodies: list[bytes], total: int, concurrency: int,
                latencies: list[float] | None) -> int:
    """POST ``bodies`` (cycled) to ``base + path`` until ``total`` are done, ``concurrency`` in flight; appends
    each 200's latency (s) to ``latencies``; returns the number of non-200 answers."""
    import httpx

    errors = 0

    async def drive() -> None:
        counter = iter(range(total))
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
            async def worker() -> None:
                nonlocal errors
                for i in counter:
                    body = bodies[i % len(bodies)]
                    t0 = time.perf_counter()
                    r = await client.post(path, content=body, headers={"content-type": "application/json"})
                    dt = time.perf_counter() - t0
                    if r.status_code != 200:
                        errors += 1
                    elif latencies is not None:
                        latencies.append(dt)
            await asyncio.gather(*(worker() for _ in range(concurrency)))

    asyncio.run(drive())
    return errors


def bench_http(manifest_uri: str, seqs: list[tuple], requests: int, concurrency: int, log_dir: str) -> dict:
    """A real uvicorn server (``heads="lru"``, the figures docs/benchmarks.md reports) driven by an httpx client
    until ``requests`` are done (after a warm-up), first with one request in flight (``"single"``: latency
    without queueing), then with ``concurrency`` in flight (the load figures)."""
    with _http_server(manifest_uri, "lru", os.path.join(log_dir, "http-server.log")) as (proc, base):
        rss_idle = proc_rss_mb(proc.pid)
        bodies = [json.dumps({"campaign_id": c, "sequences": [{"event_types": t, "features": f}]}).encode()
                  for c, t, f in seqs]
        errors = _drive_http(base, "/v1/predict", bodies, min(200, requests), concurrency, None)  # warm-up
        single: list[float] = []
        errors += _drive_http(base, "/v1/predict", bodies, requests, 1, single)
        latencies: list[float] = []
        t0 = time.perf_counter()
        errors += _drive_http(base, "/v1/predict", bodies, requests, concurrency, latencies)
        wall = time.perf_counter() - t0
        return {**_latencies(latencies), "requests": requests, "concurrency": concurrency, "errors": errors,
                "throughput_rps": len(latencies) / wall if wall else None, "server_rss_idle": rss_idle,
                "server_rss_after_load": proc_rss_mb(proc.pid), "single": {**_latencies(single), "requests": requests},
                "note": "server (uvicorn subprocess) and client share the machine's cores"}


# ----------------------------------------------------------------------------- scale (SIMULATED)


_PROBE_SRC = """
import json, sys, time
t_import = time.perf_counter()
import numpy as np
from fleet.serving import FleetModel
uri, count, seed, n_campaigns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def rss():
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024.0
    return out
before = rss()
t0 = time.perf_counter(); model = FleetModel.open(uri, verify=False, num_threads=1, heads="lru"); open_s = time.perf_counter() - t0
t0 = time.perf_counter(); FleetModel.open(uri, verify=True, heads="lru"); open_verify_s = time.perf_counter() - t0
rng = np.random.default_rng(seed)
cfg = model.config
lat = []
for k in rng.choice(n_campaigns, size=min(count, n_campaigns), replace=False):  # distinct ids: every lookup a miss
    cid = "sim-%08d" % int(k)
    t = rng.integers(0, cfg.num_event_types, size=20).tolist()
    f = rng.normal(size=20 * cfg.num_features).astype("float32").tolist()
    t0 = time.perf_counter(); model.predict(cid, [{"event_types": t, "features": f}]); lat.append(time.perf_counter() - t0)
print(json.dumps({"open_s": open_s, "open_verify_s": open_verify_s, "lat": lat, "rss_before_open": before,
                  "rss_after": rss(), "cache": model.cache_info()}), flush=True)
import os
os._exit(0)  # skip interpreter teardown: native thread pools have been seen to abort the process there
"""


def simulated_heads(count: int, real: pa.Table, seed: int, chunk: int = SIM_CHUNK):
    """Yield ``fleet-heads/1`` tables of ``count`` SIMULATED campaigns ``sim-00000000`` ... in chunks:
    each row copies the bit width, status and fidelity fields of a random real row, and its head is that
    real head plus noise (so value statistics, hence compressibility, stay realistic), quantized at that
    bit width with the real quantizer; hashes are random bytes. Only real rows of the commonest head size
    are drawn from (a version with capacity-ladder heads holds two sizes)."""
    from fleet.codec import table_to_heads
    from fleet.heads import decode_heads

    rows = table_to_heads(real)
    sizes = [r.num_params for r in rows]
    base = max(set(sizes), key=sizes.count)  # capacity-ladder heads of another size are left out
    keep = [i for i, size in enumerate(sizes) if size == base]
    real = real.take(pa.array(keep))
    rng = np.random.default_rng(seed)
    real_heads = decode_heads([rows[i] for i in keep]).numpy()  # (R, P)
    std = real_heads.std(0, keepdims=True) + 1e-6
    real_bits = real["bits"].to_numpy()
    group = int(pc.max(real["group_size"]).as_py() or 64)
    p = real_heads.shape[1]
    for start in range(0, count, chunk):
        m = min(chunk, count - start)
        pick = rng.integers(0, len(real_bits), size=m)
        values = real_heads[pick] + 0.1 * std * rng.standard_normal((m, p)).astype(np.float32)
        packed, scales = [None] * m, [None] * m
        for b in np.unique(real_bits[pick]):
            idx = np.flatnonzero(real_bits[pick] == b)
            for i, v in zip(idx, quantize_rows(torch.from_numpy(values[idx]).float(), int(b), group)):
                packed[i], scales[i] = v.packed, v.scales
        ids = [f"sim-{i:08d}" for i in range(start, start + m)]
        shape = pa.ListArray.from_arrays(pa.array(np.arange(m + 1, dtype=np.int32)), pa.array(np.full(m, p, np.int32)))
        teacher_hashes = rng.integers(0, 256, size=(m, 32), dtype=np.uint8)
        data_hashes = rng.integers(0, 256, size=(m, DATA_FINGERPRINT_BYTES), dtype=np.uint8)
        columns = {
            "campaign_id": pa.array(ids, pa.string()), "bits": pa.array(real_bits[pick].astype(np.int8)),
            "shape": shape, "group_size": pa.array(np.full(m, group, np.int32)),
            "packed": pa.array(packed, pa.binary()), "scales": pa.array(scales, pa.binary()),
            "mask": pa.nulls(m, pa.binary()),
            "teacher_sha256": pa.array([h.tobytes() for h in teacher_hashes], pa.binary()),
            "data_fingerprint": pa.array([h.tobytes() for h in data_hashes], pa.binary()),
        }
        columns.update({f.name: real[f.name].take(pa.array(pick)) for f in HEADS_SCHEMA if f.name not in columns})
        yield pa.table({f.name: columns[f.name].cast(f.type) for f in HEADS_SCHEMA}, schema=HEADS_SCHEMA)


def write_simulated_version(count: int, version: FleetVersion, store: str, stamp: str,
                            seed: int) -> tuple[str, float, float, dict]:
    """Write a SIMULATED version of ``count`` campaigns (:func:`simulated_heads` of ``version``'s heads, its
    backbone) as fleet ``sim-<count>`` under ``store``: ``(manifest_uri, generate_s, build_s, files)``."""
    real = version.read_heads()
    t0 = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task(f"scale (simulated): generating {count:,} heads", total=count, unit="heads")
        parts = []
        for table in simulated_heads(count, real, seed):
            parts.append(table)
            progress.advance(task, table.num_rows)
    heads = pa.concat_tables(parts)
    del parts
    generate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    writer = VersionWriter(store, f"sim-{count}", stamp)
    writer.write_backbone_bytes(version.read_backbone_bytes())
    writer.write_heads(heads)  # parts of 100k rows, row groups of 256 rows, manifest index of row groups
    manifest_uri = writer.commit(lineage={"simulated": True}, metrics={"simulated": True})
    return manifest_uri, generate_s, time.perf_counter() - t0, writer.files


def bench_scale(count: int, version: FleetVersion, cfg: BenchConfig, stamp: str) -> dict:
    """SIMULATED scale test: ``count`` random heads of the real shape and bit mix, written in the real
    store format with the real backbone, opened and served by FleetModel in a fresh subprocess."""
    manifest_uri, generate_s, build_s, files = write_simulated_version(
        count, version, os.path.abspath(os.path.join(cfg.out, "scale-store")), stamp, cfg.compress.seed + count)
    heads_bytes = sum(f["bytes"] for p, f in files.items() if p.startswith("heads/"))
    console.print(f"scale {count:,}: probing cold lookups in a fresh process")
    proc = subprocess.run([sys.executable, "-c", _PROBE_SRC, manifest_uri, str(cfg.cold_requests),
                           str(cfg.compress.seed), str(count)], capture_output=True, text=True, timeout=1800, check=False)
    try:
        probe = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise FleetError(f"scale probe failed (exit {proc.returncode}): {proc.stderr[-2000:]}") from None
    return {
        "simulated": True, "campaigns": count, "heads_bytes": heads_bytes, "bytes_per_campaign": heads_bytes / count,
        "backbone_bytes": files["backbone.safetensors"]["bytes"], "parts": sum(1 for p in files if p.startswith("heads/")),
        "generate_seconds": generate_s, "build_seconds": build_s, "open_seconds": probe["open_s"],
        "open_verify_seconds": probe["open_verify_s"], "cold": _latencies(probe["lat"]),
        "rss_mb": probe["rss_after"].get("VmRSS"), "peak_rss_mb": probe["rss_after"].get("VmHWM"),
        "rss_before_open_mb": probe["rss_before_open"].get("VmRSS"), "manifest_uri": manifest_uri,
        "note": "SIMULATED heads (real shape, real bit mix, real backbone, real store format); "
                "served by FleetModel (heads='lru') in a fresh subprocess; cold = random campaigns, cache misses",
    }


# ----------------------------------------------------------------------------- serving targets (issue 12)

#: Campaigns one ``score_campaigns`` request scores in the serving targets (and the K teachers of the peer).
SCORE_K = 1000
#: Requests timed per serving-target figure that costs far more than a millisecond each (scoring every one of
#: a simulated version's campaigns; the K-teacher peer: K RNN forward passes each).
SLOW_REQUESTS = 20
#: The targets of issue 12 (one thread): key -> (figure, target text, bound in the figure's unit).
SERVING_TARGETS = {
    "predict": ("warm predict, one sequence T<=100, p99", "<= 0.5 ms", 0.5),
    "score": (f"score_campaigns: 1 sequence x {SCORE_K:,} campaigns, p99", "<= 1 ms", 1.0),
    "score_all": ("same x all campaigns of the SIMULATED version (top 10), p99", "<= 50 ms", 50.0),
    "http_predict": ("HTTP /v1/predict p99, loopback, 1 in flight", "<= 2 ms", 2.0),
    "http_score": (f"HTTP /v1/score 1 x {SCORE_K:,} p99, loopback, 1 in flight", "<= 3 ms", 3.0),
    "rss": ("serving process RSS, every campaign of the SIMULATED version resident", "<= 200 MB", 200.0),
}

_TARGETS_PROBE_SRC = """
import json, os, sys, time
import numpy as np
from fleet.serving import FleetModel
uri, seqs_path, count, n_score, n_all, k, seed = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:8])
def rss():
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024.0
    return out
before = rss()
t0 = time.perf_counter(); model = FleetModel.open(uri, verify=False, num_threads=1); open_s = time.perf_counter() - t0
after_open = rss()
seqs = [{"event_types": t, "features": f} for t, f in json.load(open(seqs_path))]
rng = np.random.default_rng(seed)
requests = [["sim-%08d" % j for j in rng.choice(count, size=min(k, count), replace=False)] for _ in range(50)]
for i in range(20):
    model.score_campaigns(seqs[i % len(seqs)], requests[i % len(requests)])
score = []
for i in range(n_score):
    seq, ids = seqs[i % len(seqs)], requests[i % len(requests)]
    t0 = time.perf_counter(); model.score_campaigns(seq, ids); score.append(time.perf_counter() - t0)
after_score = rss()
every = []
for i in range(n_all):
    t0 = time.perf_counter(); model.score_campaigns(seqs[i % len(seqs)], top_k=10); every.append(time.perf_counter() - t0)
print(json.dumps({"open_s": open_s, "score": score, "score_all": every, "rss_before_open": before,
                  "rss_after_open": after_open, "rss_after_score": after_score, "rss_after_all": rss(),
                  "heads": model.cache_info()}), flush=True)
os._exit(0)
"""


def _event_sequences(events_uri: str, rng, count: int) -> list[tuple[list, list]]:
    """``count`` real event sequences ``(event_types, features)`` (lists, as a request carries them): the first
    rows of up to 64 random campaigns of ``events_uri``, drawn at random."""
    events = EventsDataset(events_uri)
    campaign_ids = events.campaign_ids()
    picked = sorted(rng.choice(campaign_ids, size=min(len(campaign_ids), 64), replace=False).tolist())
    out = []
    for table in events.read_campaigns(picked).values():
        t = table.slice(0, 16)
        out.extend(zip(t["event_types"].to_pylist(), t["features"].to_pylist()))
    return [out[i % len(out)] for i in rng.permutation(max(count, len(out)))[:count]]


def teacher_peer(teachers_uri: str, campaign_ids: list[str], seqs: list[tuple[list, list]], num_features: int,
                 k: int = SCORE_K, requests: int = SLOW_REQUESTS) -> dict:
    """The K-teacher peer of ``score_campaigns``: one sequence scored by ``k`` fp32 teachers = ``k`` teacher RNN
    forward passes (batch 1, one torch thread, ``torch.inference_mode``). With fewer than ``k`` teachers the
    loaded ones are cycled (the time is still ``k`` forward passes; their memory is given per teacher)."""
    from fleet.data import collate

    ids = campaign_ids[:k]
    teachers = [load_teacher(teachers_uri, cid) for cid in ids]
    models = [t.model for t in teachers]
    batches = [collate([np.asarray(t)], [np.asarray(f, dtype=np.float32)], num_features) for t, f in seqs]
    threads = torch.get_num_threads()
    torch.set_num_threads(SERVING_THREADS)
    try:
        lat = []
        with torch.inference_mode():
            for i in range(requests + 2):  # 2 warm-up requests
                b = batches[i % len(batches)]
                t0 = time.perf_counter()
                for j in range(k):
                    models[j % len(models)](b.event_types, b.features, b.lengths)
                if i >= 2:
                    lat.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    cfg = teachers[0].config
    return {**_latencies(lat), "k": k, "teachers_loaded": len(models),
            "teacher_bytes_mean": float(np.mean([t.num_bytes for t in teachers])),
            "teacher": {key: cfg.get(key) for key in ("arch", "hidden_size", "num_layers", "embed_dim")},
            "note": f"{k} forward passes of fp32 teachers per request (batch 1, {SERVING_THREADS} torch thread)"
                    + (f"; {len(models)} teachers loaded and cycled" if len(models) < k else "")}


def serving_targets(manifest_uri: str, events_uri: str, teachers_uri: str, sim_manifest_uri: str, sim_count: int, *,
                    out_dir: str, seed: int, requests: int, http_requests: int) -> dict:
    """Every figure of issue 12's targets table (one thread, FleetModel's defaults: resident heads, numpy
    backbone): warm predict on the real version (in-process); score 1 x :data:`SCORE_K` and 1 x every campaign
    plus the serving RSS in a fresh process on the SIMULATED version of ``sim_count`` campaigns; HTTP
    ``/v1/predict`` and ``/v1/score`` (1 in flight) against a server on that version; and the K-teacher peer
    (:func:`teacher_peer`) on the same sequences. ``requests`` / ``http_requests``: timed calls per figure
    (:data:`SLOW_REQUESTS` for the slow ones)."""
    from fleet.serving import FleetModel

    rng = np.random.default_rng(seed + 12)
    threads_before = torch.get_num_threads()
    model = FleetModel.open(manifest_uri, num_threads=SERVING_THREADS)
    real_ids = [cid for part in model.version.iter_heads(["campaign_id"]) for cid in part["campaign_id"].to_pylist()]
    num_features = model.config.num_features
    seqs = _event_sequences(events_uri, rng, max(requests, 200))
    out: dict = {"version": model.version_id, "campaigns": len(real_ids), "sim_campaigns": sim_count,
                 "heads": model.heads_mode, "backend": model.backend, "threads": SERVING_THREADS,
                 "sequence_length": {"max": max(len(t) for t, _ in seqs), "median": float(np.median([len(t) for t, _ in seqs]))}}
    try:
        with _progress() as progress:
            task = progress.add_task("serving targets: warm predict", total=requests, unit="requests")
            picks = rng.choice(len(real_ids), size=requests)
            for i in range(100):
                t, f = seqs[i % len(seqs)]
                model.predict(real_ids[picks[i % len(picks)]], [{"event_types": t, "features": f}])
            lat = []
            for i in range(requests):
                t, f = seqs[i % len(seqs)]
                cid = real_ids[picks[i]]
                t0 = time.perf_counter()
                model.predict(cid, [{"event_types": t, "features": f}])
                lat.append(time.perf_counter() - t0)
                progress.advance(task)
        out["predict"] = _latencies(lat)
    finally:
        torch.set_num_threads(threads_before)
    del model
    seqs_path = os.path.join(out_dir, "serving-sequences.json")
    with open(seqs_path, "w") as f:
        json.dump(seqs, f)
    console.print(f"serving targets: score_campaigns on {sim_count:,} SIMULATED campaigns in a fresh process")
    proc = subprocess.run([sys.executable, "-c", _TARGETS_PROBE_SRC, sim_manifest_uri, seqs_path, str(sim_count),
                           str(requests), str(SLOW_REQUESTS), str(SCORE_K), str(seed)],
                          capture_output=True, text=True, timeout=3600, check=False, env={**os.environ, **SERVING_ENV})
    try:
        probe = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise FleetError(f"serving-targets probe failed (exit {proc.returncode}): {proc.stderr[-2000:]}") from None
    out["score"], out["score_all"] = _latencies(probe["score"]), _latencies(probe["score_all"])
    out["probe"] = {k: v for k, v in probe.items() if k not in ("score", "score_all")}
    console.print("serving targets: HTTP on loopback (resident heads, SIMULATED version)")
    with _http_server(sim_manifest_uri, "resident", os.path.join(out_dir, "http-targets-server.log")) as (proc_, base):
        ids = [f"sim-{j:08d}" for j in range(sim_count)]
        predict_bodies = [orjson.dumps({"campaign_id": ids[int(rng.integers(sim_count))],
                                        "sequences": [{"event_types": t, "features": f}]}) for t, f in seqs]
        score_bodies = [orjson.dumps({"sequence": {"event_types": t, "features": f},
                                      "campaign_ids": [ids[j] for j in rng.choice(sim_count, size=min(SCORE_K, sim_count),
                                                                                   replace=False)]})
                        for t, f in seqs[:50]]
        errors = _drive_http(base, "/v1/predict", predict_bodies, 200, 1, None)  # warm-up
        errors += _drive_http(base, "/v1/score", score_bodies, 100, 1, None)
        single: list[float] = []
        errors += _drive_http(base, "/v1/predict", predict_bodies, http_requests, 1, single)
        scored: list[float] = []
        errors += _drive_http(base, "/v1/score", score_bodies, http_requests, 1, scored)
        out["http_predict"], out["http_score"] = _latencies(single), _latencies(scored)
        out["http_errors"] = errors
        out["server_rss"] = proc_rss_mb(proc_.pid)
    out["rss_mb"] = out["server_rss"]["rss_mb"]
    console.print(f"serving targets: K-teacher peer ({SCORE_K:,} fp32 teacher forward passes per request)")
    out["peer"] = teacher_peer(teachers_uri, list_teacher_campaigns(teachers_uri), seqs, num_features)
    out["load_average"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    out["targets"] = evaluate_serving_targets(out)
    return out


def evaluate_serving_targets(st: dict) -> list[dict]:
    """The rows of the serving targets table: figure, target, fleet's value (p99 ms, or MB), met or not, and for
    the scoring rows the K-teacher peer's p99 on the same 1 x K and the ratio fleet wins by."""
    rows = []
    for key, (figure, target, bound) in SERVING_TARGETS.items():
        value = st["rss_mb"] if key == "rss" else st[key]["p99_ms"]
        row = {"key": key, "figure": figure, "target": target, "value": value, "passed": value <= bound,
               "p50": None if key == "rss" else st[key]["p50_ms"], "peer": None, "ratio": None}
        if key in ("score", "http_score"):
            row["peer"] = st["peer"]["p99_ms"]
            row["ratio"] = st["peer"]["p99_ms"] / value if value else None
        rows.append(row)
    return rows


def render_serving_targets(st: dict) -> list[str]:
    """Markdown of :func:`serving_targets`: the targets table, fleet side by side with the K-teacher peer."""
    peer = st["peer"]
    t = peer["teacher"]
    lines = ["| figure (one thread) | target | fleet p50 | fleet p99 | met | K-teacher peer p50 / p99 | fleet wins by (p99) |",
             "|---|---|---:|---:|---|---:|---:|"]
    for r in st["targets"]:
        unit = "MB" if r["key"] == "rss" else "ms"
        p50 = "" if r["p50"] is None else f"{r['p50']:.3f} {unit}"
        value = f"{r['value']:.0f} MB" if r["key"] == "rss" else f"{r['value']:.3f} ms"
        peer_txt = "" if r["peer"] is None else f"{peer['p50_ms']:,.1f} / {peer['p99_ms']:,.1f} ms"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:,.0f}x"
        met = "yes" if r["passed"] else f"**no** ({r['value'] / SERVING_TARGETS[r['key']][2]:.1f}x the target)"
        lines.append(f"| {r['figure']} | {r['target']} | {p50} | {value} | {met} | {peer_txt} | {ratio} |")
    lines += ["", (f"Real version {st['version']} ({st['campaigns']} campaigns) for warm predict; SIMULATED version of "
                   f"{st['sim_campaigns']:,} campaigns (real backbone and bit mix) for the other rows; FleetModel's "
                   f"defaults (heads `{st['heads']}`, backend `{st['backend']}`), {st['threads']} thread; real event "
                   f"sequences, length median {st['sequence_length']['median']:.0f}, max {st['sequence_length']['max']}. "
                   f"Peer: {peer['k']:,} fp32 teacher forward passes per request ({t.get('num_layers')}-layer "
                   f"{str(t.get('arch')).upper()}, hidden {t.get('hidden_size')}, {peer['teacher_bytes_mean'] / 1e6:.2f} MB "
                   f"each; {peer['teachers_loaded']} loaded{' and cycled' if peer['teachers_loaded'] < peer['k'] else ''}). "
                   f"Serving RSS: the HTTP server process after the load; the in-process probe measured "
                   f"{st['probe']['rss_after_open']['VmRSS']:.0f} MB after opening the version "
                   f"({st['probe']['rss_before_open']['VmRSS']:.0f} MB before: imports) and "
                   f"{st['probe']['rss_after_all']['VmRSS']:.0f} MB after scoring every campaign."), ""]
    return lines


# ----------------------------------------------------------------------------- targets (DESIGN.md section 5)


def evaluate_targets(results: dict) -> list[dict]:
    """Each DESIGN.md target with the measured value, where it comes from, and pass/miss."""
    m, s = results["methods"], results.get("serving", {})
    fleet = m["fleet_auto"]
    scale = results.get("scale", {})
    out = []

    def add(figure, target, value, passed, source):
        out.append({"figure": figure, "target": target, "value": value, "passed": passed, "source": source})

    s10k = scale.get("10000")
    if s10k:
        add("bytes per campaign (heads Parquet / N, N=10k)", "<= 128 B", s10k["bytes_per_campaign"],
            s10k["bytes_per_campaign"] <= 128, "SIMULATED 10k heads, real bit mix")
    add(f"bytes per campaign (heads Parquet / N, real run N={results['campaigns']})", "<= 128 B",
        fleet["bytes_per_campaign"], fleet["bytes_per_campaign"] <= 128, "real run")
    add("fleet total vs fp32 teachers (compression ratio)", ">= 10,000x", fleet["compression_ratio"],
        fleet["compression_ratio"] is not None and fleet["compression_ratio"] >= 10_000, "real run: heads + backbone")
    f = fleet["fidelity"]
    add("AUC diff median (student - teacher)", ">= -0.005", f["auc_diff_median"],
        f["auc_diff_median"] is not None and f["auc_diff_median"] >= -0.005, "real run, hold-out")
    add("AUC diff 10th percentile", ">= -0.02", f["auc_diff_p10"],
        f["auc_diff_p10"] is not None and f["auc_diff_p10"] >= -0.02, "real run, hold-out")
    rr = results["real_run"]
    add(f"run time / floor (stage 1), N={results['campaigns']}", "<= 2x (at N=1000)", rr["total_over_floor"],
        rr["total_over_floor"] is not None and rr["total_over_floor"] <= 2, "real run, wall incl. registration")
    c = m["independent_students"]
    speedup = c["time_s"] / fleet["time_s"] if fleet["time_s"] else None
    add("speed-up vs peer (c)", ">= 20x", speedup, speedup is not None and speedup >= 20,
        "peer (c) time EXTRAPOLATED from K campaigns")
    if s:
        add("warm predict p99 (in-process, head cached)", "<= 1 ms", s["warm"]["p99_ms"], s["warm"]["p99_ms"] <= 1, "real run")
        add("cold predict p99 (head from local Parquet)", "<= 20 ms", s["cold"]["p99_ms"], s["cold"]["p99_ms"] <= 20, "real run")
        single = s["http"]["single"]
        add("HTTP predict p99 (loopback, 1 in flight)", "<= 5 ms", single["p99_ms"], single["p99_ms"] <= 5, "real run")
        add(f"HTTP predict p99 (loopback, {s['http']['concurrency']} in flight)", "<= 5 ms", s["http"]["p99_ms"],
            s["http"]["p99_ms"] <= 5, "real run, client and server on the same cores")
    s1m = scale.get("1000000")
    if s1m:
        add("serving memory, 1M campaigns (RSS)", "<= 300 MB", s1m["rss_mb"], s1m["rss_mb"] <= 300,
            "SIMULATED 1M heads, FleetModel in a fresh process")
        add("cold predict p99, 1M campaigns", "<= 20 ms", s1m["cold"]["p99_ms"], s1m["cold"]["p99_ms"] <= 20, "SIMULATED 1M heads")
    return out


# ----------------------------------------------------------------------------- outputs


def machine_info() -> dict:
    """The machine a benchmark runs on: CPUs, memory (GiB), GPU, platform, Python and torch versions, and the
    load average now (``load_average_at_start``)."""
    import platform

    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 2**20
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "memory_gib": mem, "gpu": torch.cuda.is_available(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "load_average_at_start": load}


def _bench_params(cfg: BenchConfig) -> dict:
    return {"synth": dataclasses.asdict(cfg.synth), "compress": cfg.compress.to_dict(), "fleet_dir": cfg.fleet_dir,
            "out": cfg.out, "peer_subset": cfg.peer_subset, "scale_campaigns": list(cfg.scale_campaigns),
            "warm_requests": cfg.warm_requests, "cold_requests": cfg.cold_requests,
            "http_requests": cfg.http_requests, "http_concurrency": cfg.http_concurrency,
            "variant_backbones": cfg.variant_backbones}


METHOD_ORDER = ["teacher_fp32", "teacher_int8_dynamic", "independent_students", "fleet_auto", "fleet_bits8",
                "fleet_bits4", "fleet_bits2", "fleet_bits1", "fleet_weightless", "fleet_auto_lowrank",
                "fleet_auto_linear", "fleet_auto_class_distance"]


def _fmt(v, spec: str, none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def _human(n: float) -> str:
    """Bytes in SI units (rich's formatter: ``950 bytes``, ``1.2 kB``, ``3.4 MB``)."""
    return decimal(round(n))


def render_markdown(results: dict, plots_prefix: str = "") -> str:
    """The side-by-side tables of ``results`` (every number from results.json)."""
    m = results["methods"]
    n = results["campaigns"]
    lines = [f"### Methods side by side (N = {n} campaigns, same teachers, same hold-out rows)", "",
             ("| method | bytes / campaign | total bytes | ratio vs fp32 | campaigns with AUC | AUC median "
             "| AUC diff median / p10 / worst | mean abs(p - p_teacher) median / p90 / worst | wall time |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key in METHOD_ORDER:
        if key not in m:
            continue
        r, f = m[key], m[key]["fidelity"]
        ext = " (extrapolated)" if r["extrapolated"] else ""
        lines.append(
            f"| {r['label']} | {_human(r['bytes_per_campaign'])}{ext} | {_human(r['bytes_total'])}{ext} "
            f"| {_ratio(r['compression_ratio'])} | {f['campaigns_with_auc']} of {f['campaigns']} | {_fmt(f['auc_median'], '.4f')} "
            f"| {_fmt(f['auc_diff_median'], '+.4f')} / {_fmt(f['auc_diff_p10'], '+.4f')} / {_fmt(f['auc_diff_worst'], '+.4f')} "
            f"| {_fmt(f['mean_abs_diff_median'], '.4f')} / {_fmt(f['mean_abs_diff_p90'], '.4f')} / "
            f"{_fmt(f['mean_abs_diff_worst'], '.4f')} | {r['time_s']:,.1f} s{ext} |")
    c = m["independent_students"]
    lines += ["", (f"AUCs are computed only where a campaign's hold-out rows hold at least "
              f"{results['bench_config']['compress'].get('min_auc_class_count', 1)} positives and negatives (the real run's "
              f"rule, applied to every method); mean abs(p - p_teacher) covers every campaign. "
              f"Fidelity columns cover every campaign with a defined hold-out AUC "
              f"({m['fleet_auto']['fidelity']['campaigns_with_auc']} of {m['fleet_auto']['fidelity']['campaigns']} for the "
              f"real run); peer (c) covers its {c['subset_size']} random campaigns only. On those same campaigns the real "
              f"run's AUC diff median / p10 is {_fmt(c['fleet_auto_on_same_subset']['auc_diff_median'], '+.4f')} / "
              f"{_fmt(c['fleet_auto_on_same_subset']['auc_diff_p10'], '+.4f')} (peer (c): "
              f"{_fmt(c['fidelity']['auc_diff_median'], '+.4f')} / {_fmt(c['fidelity']['auc_diff_p10'], '+.4f')})."), ""]
    lines += ["How each figure was measured:", ""]
    for key in METHOD_ORDER[:4]:
        if key in m:
            lines.append(f"- **{m[key]['label']}**: size: {m[key]['bytes_note']}; time: {m[key]['time_note']}.")
    variants = [k for k in METHOD_ORDER[4:] if k in m]
    if variants:
        lines.append("- **(d) variants**: size as the real run (each variant written as its own version and measured); "
                     "time = stage 1 of the real run (shared) + backbone + their own heads: "
                     + "; ".join(f"{k}: backbone {m[k]['backbone_seconds']:.1f} s ({m[k]['backbone_note']}), heads "
                                 f"{m[k]['heads_seconds']:.1f} s" for k in variants) + ".")
    lines += head_codec_lines(results)
    rr = results["real_run"]
    lines += ["", "### The real run (one full `run_compress`, default config, bits auto)", "",
              "| stage | seconds |", "|---|---:|"]
    for stage in ("soft_labels", "backbone", "heads"):
        if stage in rr["stage_seconds"]:
            lines.append(f"| {STAGE_NAMES[stage]} | {rr['stage_seconds'][stage]:,.1f} |")
    lines += [f"| finalize (write the version) + registration in MLflow + driver overhead | {rr['registration_and_overhead_seconds']:,.1f} |",
              f"| **total wall time** | **{rr['wall_seconds']:,.1f}** |", "",
              (f"Total wall time / floor (stage 1) = **{_fmt(rr['total_over_floor'], '.2f')}x** "
              f"(stages only, without registration: {_fmt(rr['run_over_floor'], '.2f')}x). "
              f"Bits chosen per campaign (1/2/4/8/16): "
              f"{' / '.join(str(m['fleet_auto']['bits_campaigns'][b]) for b in ('1', '2', '4', '8', '16'))}."), ""]
    s = results.get("serving")
    if s:
        lines += ["### Serving (real run's version, this machine)", "", "| path | p50 | p99 | notes |", "|---|---:|---:|---|",
                  (f"| in-process warm (head cached, one sequence) | {s['warm']['p50_ms']:.3f} ms | {s['warm']['p99_ms']:.3f} ms "
                  f"| {s['warm']['n']} calls, torch threads {s['in_process_torch_threads']} |"),
                  (f"| in-process cold (cache miss, head read from a Parquet row group) | {s['cold']['p50_ms']:.3f} ms "
                  f"| {s['cold']['p99_ms']:.3f} ms | {s['cold']['n']} calls; a fresh FleetModel.open takes "
                  f"{s['open_seconds_median'] * 1000:.1f} ms |"),
                  (f"| HTTP on loopback (uvicorn subprocess, httpx), 1 in flight | {s['http']['single']['p50_ms']:.3f} ms "
                  f"| {s['http']['single']['p99_ms']:.3f} ms | {s['http']['single']['requests']} requests, one at a time |"),
                  (f"| HTTP on loopback (uvicorn subprocess, httpx) | {s['http']['p50_ms']:.3f} ms | {s['http']['p99_ms']:.3f} ms "
                  f"| {s['http']['requests']} requests, {s['http']['concurrency']} concurrent, "
                  f"{_fmt(s['http']['throughput_rps'], ',.0f')} req/s, {s['http']['errors']} errors |"), "",
                  (f"Serving process RSS (HTTP server, this fleet): {s['http']['server_rss_after_load']['rss_mb']:.0f} MB after "
                  f"the load (peak {s['http']['server_rss_after_load']['peak_rss_mb']:.0f} MB)."), ""]
    tp = results.get("teacher_pass")
    if tp:
        t = tp["teacher"]
        lines += ["### Teacher pass (stage 1): batched vs one at a time", "",
                  "| mode | seconds | sequences/s |", "|---|---:|---:|",
                  *(f"| {mode.replace('_', ' ')} | {tp['seconds'][mode]:.2f} | {tp['sequences_per_second'][mode]:,.0f} |"
                    for mode in ("one_at_a_time", "batched")), "",
                  (f"{tp['teachers']} teachers ({t['num_layers']}-layer {str(t['arch']).upper()} h={t['hidden_size']}), "
                   f"{tp['sequences']:,} sequences, torch threads {tp['torch_threads']}: batched = "
                   f"**{tp['speedup']:.2f}x** one at a time; largest logit difference {tp['max_abs_logit_diff']:.1e}."), ""]
    sc = results.get("scale")
    if sc:
        lines += ["### Scale — SIMULATED (random heads of the real shape and bit mix, real backbone, real store format)", "",
                  ("| campaigns | heads bytes / campaign | parts | build (write + index) | open (no verify / verify) "
                  "| cold predict p50 / p99 | serving RSS (peak) | RSS before open (imports only) |"),
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key, r in sc.items():
            lines.append(f"| {int(key):,} | {r['bytes_per_campaign']:.1f} B | {r['parts']} | {r['build_seconds']:.1f} s "
                         f"| {r['open_seconds'] * 1000:.0f} ms / {r['open_verify_seconds'] * 1000:.0f} ms "
                         f"| {r['cold']['p50_ms']:.2f} / {r['cold']['p99_ms']:.2f} ms "
                         f"| {r['rss_mb']:.0f} MB ({r['peak_rss_mb']:.0f} MB) | {r['rss_before_open_mb']:.0f} MB |")
        lines.append("")
    st = results.get("serving_targets")
    if st:
        lines += ["### Serving targets (issue 12), side by side with the K-teacher peer", "", *render_serving_targets(st)]
    lines += ["### DESIGN.md targets", "", "| figure | target | measured | | source |", "|---|---|---:|---|---|"]
    for t in results["targets"]:
        v = t["value"]
        val = "n/a" if v is None else (f"{v:+.4f}" if "AUC" in t["figure"] else f"{v:,.2f}")
        lines.append(f"| {t['figure']} | {t['target']} | {val} | {'pass' if t['passed'] else '**miss**'} | {t['source']} |")
    lines.append("")
    if plots_prefix is not None:
        lines += ["### Plots", ""]
        for name, title in PLOTS.items():
            lines.append(f"![{title}]({plots_prefix}{name})")
        lines.append("")
    return "\n".join(lines)


def head_codec_lines(results: dict) -> list[str]:
    """Markdown rows comparing the fleet methods' heads: bytes, fidelity and the per-head read cost
    (:func:`head_latencies`); methods without ``head_latency`` (older results) are left out."""
    m = results["methods"]
    keys = [k for k in METHOD_ORDER if k in m and "head_latency" in m[k]]
    if not keys:
        return []
    lines = ["", "### Heads per codec: bytes, fidelity, read cost per head (same run)", "",
             ("| method | codec | bytes / campaign | mean abs(p - p_teacher) median / p90 | AUC diff median "
              "| decode one head p50 / p99 | cold lookup p50 / p99 | decode all, per head |"),
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for k in keys:
        r, f, lat = m[k], m[k]["fidelity"], m[k]["head_latency"]
        lines.append(
            f"| {r['label']} | {lat['codec']} | {_human(r['bytes_per_campaign'])} "
            f"| {_fmt(f['mean_abs_diff_median'], '.4f')} / {_fmt(f['mean_abs_diff_p90'], '.4f')} "
            f"| {_fmt(f['auc_diff_median'], '+.4f')} | {lat['decode']['p50_ms']:.3f} / {lat['decode']['p99_ms']:.3f} ms "
            f"| {lat['cold_lookup']['p50_ms']:.3f} / {lat['cold_lookup']['p99_ms']:.3f} ms "
            f"| {lat['decode_all_per_head_ms'] * 1000:.1f} us |")
    lines.append("")
    return lines


PLOTS = {
    "size_vs_fidelity.png": "bytes per campaign vs fidelity, one point per method",
    "auc_diff_vs_size.png": "per-campaign AUC difference vs campaign size",
    "latency_cdf.png": "latency CDFs",
    "stage_times.png": "stage-time breakdown",
}


STAGE_NAMES = {"soft_labels": "stage 1: teacher soft labels (the floor)", "backbone": "stage 2: backbone",
               "heads": "stages 3-5: heads, quantization, fidelity"}


def write_outputs(results: dict, out: str) -> None:
    """results.json, results.md and the PNGs under ``out``."""
    for name, data in make_plots(results).items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(json_safe(results), f, indent=1, sort_keys=True)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# fleet bench, N = {results['campaigns']} ({results['created_at']})\n\n")
        f.write(render_markdown(results))


def make_plots(results: dict) -> dict[str, bytes]:
    """The four figures as PNG bytes (matplotlib Figure API, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def figure(w=7.5, h=4.8, ncols=1):
        fig = Figure(figsize=(w, h), dpi=100)
        FigureCanvasAgg(fig)
        return fig, fig.subplots(1, ncols)

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", metadata={"Software": None})
        return buf.getvalue()

    m = results["methods"]
    out = {}
    fig, ax = figure()
    colors = __import__("matplotlib").colormaps["tab20"].colors
    for i, key in enumerate(k for k in METHOD_ORDER if k in m):
        r, f = m[key], m[key]["fidelity"]
        y = f["auc_diff_median"] if f["auc_diff_median"] is not None else 0.0
        lo = y - (f["auc_diff_p10"] if f["auc_diff_p10"] is not None else y)
        ax.errorbar([r["bytes_per_campaign"]], [y], yerr=[[lo], [0]], fmt="s" if key.startswith("fleet") else "o",
                    capsize=3, color=colors[(2 * i) % 20 if i < 10 else 2 * (i - 10) + 1],
                    label=r["label"] + (" *" if r["extrapolated"] else ""))
    ax.set_xscale("log")
    ax.axhline(0, color="black", lw=0.8)
    ax.axhline(-0.005, color="tab:red", lw=0.8, ls="--")
    ax.axhline(-0.02, color="tab:red", lw=0.8, ls=":")
    ax.set_xlabel("bytes on storage per campaign (log)")
    ax.set_ylabel("AUC diff vs teacher: median (bar down to p10)")
    ax.set_title(f"Size vs fidelity, N={results['campaigns']} (targets dashed/dotted; * extrapolated)")
    ax.legend(fontsize=6.5, loc="lower right")
    out["size_vs_fidelity.png"] = png(fig)

    fig, ax = figure()
    for key, color in (("fleet_auto", "tab:blue"), ("teacher_int8_dynamic", "tab:orange"),
                       ("independent_students", "tab:green"), ("fleet_bits1", "tab:gray")):
        rows = [r for r in m[key]["per_campaign"] if r.get("auc_diff") is not None and r.get("n_rows")]
        if rows:
            ax.scatter([r["n_rows"] for r in rows], [r["auc_diff"] for r in rows], s=10 if key != "independent_students" else 30,
                       alpha=0.6, color=color, label=m[key]["label"], linewidths=0)
    ax.set_xscale("log")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("campaign size (sequences, log)")
    ax.set_ylabel("student AUC - teacher AUC (hold-out)")
    ax.set_title("Per-campaign AUC difference vs campaign size")
    ax.legend(fontsize=7)
    out["auc_diff_vs_size.png"] = png(fig)

    fig, ax = figure()
    curves = []
    s = results.get("serving")
    if s:
        curves += [("in-process warm", s["warm"]), ("in-process cold (Parquet)", s["cold"]),
                   ("HTTP loopback (1 in flight)", s["http"]["single"]),
                   (f"HTTP loopback ({s['http']['concurrency']} in flight)", s["http"])]
    for key, r in results.get("scale", {}).items():
        curves.append((f"cold, SIMULATED {int(key):,} campaigns", r["cold"]))
    for label, lat in curves:
        x = np.sort(np.asarray(lat["samples_ms"]))
        ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=f"{label} (p99 {lat['p99_ms']:.2f} ms)")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Predict latency CDFs (one sequence per request)")
    ax.legend(fontsize=7, loc="lower right")
    out["latency_cdf.png"] = png(fig)

    fig, (ax1, ax2) = figure(w=11, h=4.5, ncols=2)
    rr = results["real_run"]
    order = ["soft_labels", "backbone", "heads"]
    stages_ = [(k, rr["stage_seconds"][k]) for k in order if k in rr["stage_seconds"]]
    stages_ += [("finalize + registration + overhead", rr["registration_and_overhead_seconds"])]
    left = 0.0
    for (name, secs), color in zip(stages_, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")):
        ax1.barh(["real run"], [secs], left=left, color=color, label=f"{name} {secs:.1f} s")
        left += secs
    ax1.set_xlabel("seconds")
    ax1.set_title("fleet real run: stage times")
    ax1.legend(fontsize=7)
    names = [k for k in METHOD_ORDER if k in m and k != "teacher_fp32"]
    ax2.barh([m[k]["label"] + (" *" if m[k]["extrapolated"] else "") for k in names], [m[k]["time_s"] for k in names],
             color=["tab:green" if m[k]["extrapolated"] else "tab:blue" for k in names])
    ax2.axvline(rr["floor_seconds"], color="black", ls="--", lw=0.8, label="floor (stage 1)")
    ax2.set_xscale("log")
    ax2.tick_params(axis="y", labelsize=6.5)
    ax2.set_xlabel("wall seconds (log; * extrapolated)")
    ax2.set_title("wall time per method")
    ax2.legend(fontsize=7)
    out["stage_times.png"] = png(fig)
    return out


def log_to_mlflow(results: dict, out: str, tracking_uri: str) -> str:
    """One run in the experiment ``fleet-bench``: params, flat numeric metrics, results and plots as artifacts."""
    from mlflow.tracking import MlflowClient

    from fleet.registry import sanitize_key

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        exp_id = experiment.experiment_id
    else:
        location = None
        if tracking_uri.startswith("sqlite:///"):  # artifacts next to the database, not in ./mlruns
            db = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
            location = os.path.join(os.path.dirname(os.path.abspath(db)), "mlartifacts", EXPERIMENT)
        exp_id = client.create_experiment(EXPERIMENT, artifact_location=location)
    run = client.create_run(exp_id, run_name=f"bench-n{results['campaigns']}-{results['created_at']}",
                            tags={"fleet.bench": RESULTS_FORMAT})
    run_id = run.info.run_id
    metrics: dict[str, float] = {}
    for key, r in results["methods"].items():
        for name in ("bytes_per_campaign", "bytes_total", "compression_ratio", "time_s"):
            metrics[f"{key}.{name}"] = r[name]
        for name, v in r["fidelity"].items():
            metrics[f"{key}.{name}"] = v
    rr = results["real_run"]
    metrics.update({"real_run.wall_seconds": rr["wall_seconds"], "real_run.total_over_floor": rr["total_over_floor"],
                    "real_run.floor_seconds": rr["floor_seconds"]})
    serving = results.get("serving", {})
    for part, lat in (("warm", serving.get("warm")), ("cold", serving.get("cold")), ("http", serving.get("http")),
                      ("http_single", serving.get("http", {}).get("single"))):
        for q in ("p50_ms", "p99_ms"):
            metrics[f"serving.{part}.{q}"] = (lat or {}).get(q)
    for size, r in results.get("scale", {}).items():
        for name in ("bytes_per_campaign", "build_seconds", "open_seconds", "rss_mb"):
            metrics[f"scale_sim.{size}.{name}"] = r[name]
        metrics[f"scale_sim.{size}.cold_p99_ms"] = r["cold"]["p99_ms"]
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    clean = [Metric(sanitize_key(k), float(v), now, 0) for k, v in metrics.items()
             if isinstance(v, (int, float)) and math.isfinite(float(v))]
    params = {"campaigns": results["campaigns"], "fleet_dir": results["bench_config"]["fleet_dir"],
              "peer_subset": results["bench_config"]["peer_subset"],
              "scale_campaigns": json.dumps(results["bench_config"]["scale_campaigns"]),
              **{f"synth.{k}": v for k, v in results["bench_config"]["synth"].items()},
              **{f"compress.{k}": json.dumps(v) if isinstance(v, dict) else v
                 for k, v in results["bench_config"]["compress"].items()}}
    plist = [Param(sanitize_key(k), str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(clean), 1000):
        client.log_batch(run_id, metrics=clean[i:i + 1000])
    for i in range(0, len(plist), 100):
        client.log_batch(run_id, params=plist[i:i + 100])
    for name in ["results.json", "results.md", *PLOTS]:
        client.log_artifact(run_id, os.path.join(out, name))
    client.set_terminated(run_id)
    return run_id


def _ratio(v) -> str:
    return "n/a" if v is None else (f"{v:,.2f}x" if v < 10 else f"{v:,.0f}x")


def summary_table(results: dict):
    """The end-of-run summary printed by ``fleet bench``: methods, then the DESIGN.md targets."""
    from rich.console import Group

    m = results["methods"]
    methods = Table(title=f"fleet bench, N={results['campaigns']} (* extrapolated from K campaigns)")
    for col in ("method", "B/campaign", "vs fp32", "AUC diff med", "p10", "|dp| med", "wall s"):
        methods.add_column(col, justify="left" if col == "method" else "right")
    for key in METHOD_ORDER:
        if key not in m:
            continue
        r, f = m[key], m[key]["fidelity"]
        star = "*" if r["extrapolated"] else ""
        methods.add_row(key + star, _human(r["bytes_per_campaign"]), _ratio(r["compression_ratio"]),
                        _fmt(f["auc_diff_median"], "+.4f"), _fmt(f["auc_diff_p10"], "+.4f"),
                        _fmt(f["mean_abs_diff_median"], ".4f"), f"{r['time_s']:,.1f}{star}")
    targets = Table(title="DESIGN.md targets")
    for col in ("figure", "target", "measured", ""):
        targets.add_column(col, justify="right" if col == "measured" else "left")
    for t in results["targets"]:
        v = t["value"]
        targets.add_row(t["figure"], t["target"], "n/a" if v is None else f"{v:,.4g}",
                        "pass" if t["passed"] else "[red]MISS[/red]")
    return Group(methods, targets)


# ----------------------------------------------------------------------------- command line (fleet bench)


def _sizes(text: str) -> tuple[int, ...]:
    import argparse

    try:
        values = tuple(int(v.replace("_", "")) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scale-campaigns must be comma-separated integers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("--scale-campaigns must be >= 0")
    return tuple(v for v in values if v > 0)


def add_arguments(p) -> None:
    """``fleet bench``'s options (the parser is built in :mod:`fleet.cli`)."""
    p.add_argument("--campaigns", type=int, default=None, help="N: campaigns of the synthetic fleet (required but with "
                                                                "--serving-only, where it has no default)")
    p.add_argument("--fleet-dir", default=None,
                   help="cached synthetic fleet (events/, teachers/, synth.json); reused when its seed and shape "
                        "match, created otherwise (default: OUT/fleet; --zoo: fleet-data/zoo; --scale: "
                        "fleet-data/scale, a directory KIND-N per size)")
    p.add_argument("--out", required=True, help="output directory: results.json, results.md, PNGs, stores")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic fleet and of the compression")
    p.add_argument("--peer-subset", type=int, default=20, help="K: campaigns peer (c) is run on (then extrapolated)")
    p.add_argument("--scale-campaigns", type=_sizes, default=(10_000, 1_000_000),
                   help="SIMULATED fleet sizes for the scale test, comma-separated (default: 10000,1000000; 0: skip)")
    g = p.add_argument_group("teachers (a fleet created by the benchmark)")
    g.add_argument("--arch", choices=["lstm", "gru"], default="lstm", help="teacher RNN cell (default: %(default)s)")
    g.add_argument("--hidden", type=int, default=None, help="teacher hidden size (default: 256; --scale: 16)")
    g.add_argument("--layers", type=int, default=None, help="teacher RNN layers (default: 2; --scale: 1)")
    g.add_argument("--min-sequences", type=int, default=None, help="smallest campaign size (default: 100; --scale: 20)")
    g.add_argument("--max-sequences", type=int, default=None,
                   help="largest campaign size (default: 20000; --scale: 300)")
    g.add_argument("--max-epochs", type=int, default=None, help="teacher training epochs at most (default: 12; --scale: 8)")
    g = p.add_argument_group("compression (the real run and its variants)")
    g.add_argument("--config", default=None, help="JSON or TOML file of CompressConfig fields (bits must stay auto; default: CompressConfig's "
                        "defaults with --seed)")
    g.add_argument("--backbone-steps", type=int, default=None, help="override CompressConfig.backbone_steps (default: the config's)")
    g.add_argument("--head-steps", type=int, default=None, help="override CompressConfig.head_steps (default: the config's)")
    g = p.add_argument_group("serving")
    g.add_argument("--warm-requests", type=int, default=2000, help="in-process predictions timed with the head cached")
    g.add_argument("--cold-requests", type=int, default=500, help="in-process predictions timed on a cache miss")
    g.add_argument("--http-requests", type=int, default=2000, help="HTTP predictions timed on loopback")
    g.add_argument("--http-concurrency", type=int, default=8, help="concurrent HTTP clients")
    g.add_argument("--serving-only", action="store_true",
                   help="run only the serving targets (issue 12, with the K-teacher peer) against --model, a version "
                        "compressed from --fleet-dir's teachers and events, and a SIMULATED version of the largest "
                        "--scale-campaigns; writes OUT/serving-targets.json and .md")
    g.add_argument("--model", default=None, help="with --serving-only: the version to serve (directory or manifest URI; "
                                               "no default: required with --serving-only)")
    g.add_argument("--variant-backbones", action="store_true",
                   help="train a backbone per head-design/loss variant (default: reuse the real run's backbone)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///OUT/mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true",
                   help="use no MLflow at all: the bench run is not logged and the real run's version is not registered")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    from fleet.bench import scale, zoo

    zoo.add_arguments(p)
    scale.add_arguments(p)


def compress_config_from_args(args) -> stages.CompressConfig:
    """The compression config of ``fleet bench``'s runs: ``--config`` (else the defaults with ``--seed``), then
    ``--backbone-steps`` and ``--head-steps`` over it (ValueError on a bad value)."""
    compress = stages.CompressConfig.from_file(args.config) if args.config else stages.CompressConfig(seed=args.seed)
    if args.backbone_steps is not None:
        compress.backbone_steps = args.backbone_steps
    if args.head_steps is not None:
        compress.head_steps = args.head_steps
    compress.__post_init__()
    return compress


def config_from_args(args) -> BenchConfig:
    """A :class:`BenchConfig` from parsed ``fleet bench`` arguments (ValueError on bad combinations)."""
    if args.campaigns is None:
        raise ValueError("--campaigns is required (but with --serving-only and --scale)")
    sized = {"hidden_size": args.hidden, "num_layers": args.layers, "min_sequences": args.min_sequences,
             "max_sequences": args.max_sequences, "max_epochs": args.max_epochs}
    synth = SynthConfig(campaigns=args.campaigns, seed=args.seed, arch=args.arch,
                        **{k: v for k, v in sized.items() if v is not None})  # the rest: SynthConfig's defaults
    compress = compress_config_from_args(args)
    return BenchConfig(synth=synth, fleet_dir=args.fleet_dir or os.path.join(args.out, "fleet"), out=args.out,
                       compress=compress, peer_subset=args.peer_subset, scale_campaigns=args.scale_campaigns,
                       warm_requests=args.warm_requests, cold_requests=args.cold_requests,
                       http_requests=args.http_requests, http_concurrency=args.http_concurrency,
                       variant_backbones=args.variant_backbones, tracking_uri=args.tracking_uri,
                       mlflow=not args.no_mlflow, address=args.address)


def run_from_args(args, out_console) -> int:
    """``fleet bench``: run, print the summary table; exit 0 (1 on a FleetError, raised to the CLI).
    With ``--zoo``: the zoo's fidelity table instead (exit 1 when a pair misses a target); with ``--scale``: the
    real runs at growing fleet sizes (:mod:`fleet.bench.scale`, exit 1 when a target is missed)."""
    if args.scale:
        if args.zoo or args.zoo_compare or args.serving_only:
            raise UsageError("--scale runs alone: not with --zoo, --zoo-compare or --serving-only")
        from fleet.bench import scale

        return scale.run_from_args(args, compress_config_from_args(args), out_console.print)
    if args.serving_only:
        return run_serving_only(args, out_console)
    config = config_from_args(args)
    if args.zoo or args.zoo_compare:
        from fleet.bench import zoo

        return zoo.run_from_args(args, config.compress, out_console.print)
    results = run_bench(config)
    out_console.print(summary_table(results))
    out_console.print(f"results: {os.path.join(args.out, 'results.json')}, {os.path.join(args.out, 'results.md')}"
                      + (f"; MLflow run {results['mlflow_run_id']}" if results.get("mlflow_run_id") else ""))
    return 0


def run_serving_only(args, out_console) -> int:
    """``fleet bench --serving-only``: the serving targets alone (:func:`serving_targets`) against ``--model``,
    with a SIMULATED version of the largest ``--scale-campaigns`` written under ``OUT/scale-store`` (reused when
    it is there); ``OUT/serving-targets.json`` and ``.md``; a summary table. Exit 0."""
    if not args.model or not args.fleet_dir:
        raise ValueError("--serving-only needs --model (a version) and --fleet-dir (its teachers/ and events/)")
    if not args.scale_campaigns:
        raise ValueError("--serving-only needs a --scale-campaigns size for its SIMULATED version")
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    machine = machine_info()
    version = FleetVersion.open(args.model)
    count = max(args.scale_campaigns)
    store = os.path.abspath(os.path.join(args.out, "scale-store"))
    existing = sorted(glob.glob(os.path.join(store, f"sim-{count}", "versions", "*", "manifest.json")))
    if existing:
        sim_uri = existing[-1]
    else:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        sim_uri = write_simulated_version(count, version, store, stamp, args.seed + count)[0]
    fleet_dir = os.path.abspath(args.fleet_dir)
    st = serving_targets(version.manifest_uri, os.path.join(fleet_dir, "events"), os.path.join(fleet_dir, "teachers"),
                         sim_uri, count, out_dir=args.out, seed=args.seed, requests=args.warm_requests,
                         http_requests=args.http_requests)
    machine["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = {"format": RESULTS_FORMAT, "created_at": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
               "machine": machine, "argv": list(sys.argv), "seconds": time.perf_counter() - started,
               "serving_targets": st}
    with open(os.path.join(args.out, "serving-targets.json"), "w") as f:
        json.dump(json_safe(results), f, indent=1, sort_keys=True)
    with open(os.path.join(args.out, "serving-targets.md"), "w") as f:
        f.write("\n".join(render_serving_targets(st)))
    table = Table(title=f"serving targets (issue 12), {SERVING_THREADS} thread")
    for col in ("figure", "target", "fleet p99", "met", "peer p99", "fleet wins by"):
        table.add_column(col, justify="left" if col in ("figure", "target") else "right")
    for r in st["targets"]:
        table.add_row(r["figure"], r["target"], f"{r['value']:,.3f}", "yes" if r["passed"] else "[red]no[/red]",
                      "" if r["peer"] is None else f"{r['peer']:,.1f}", "" if r["ratio"] is None else f"{r['ratio']:,.0f}x")
    out_console.print(table)
    out_console.print(f"results: {os.path.join(args.out, 'serving-targets.json')}")
    return 0


# ----------------------------------------------------------------------------- docs/benchmarks.md


def write_docs(results_path: str, docs_path: str, plots_dir: str, *, status: str = "", why: dict | None = None,
               notes: str = "", shared: str = "") -> None:
    """Write ``docs_path`` from a run's ``results.json`` (every number comes from it) and copy its PNGs
    into ``plots_dir``. ``status`` / ``notes`` / ``why`` (target figure prefix -> explanation) are prose;
    ``shared`` names what else ran on the machine during the run (empty: nothing)."""
    import shutil

    with open(results_path) as f:
        results = json.load(f)
    src = os.path.dirname(os.path.abspath(results_path))
    os.makedirs(plots_dir, exist_ok=True)
    for name in PLOTS:
        shutil.copyfile(os.path.join(src, name), os.path.join(plots_dir, name))
    rel = os.path.relpath(plots_dir, os.path.dirname(os.path.abspath(docs_path))) + "/"
    mach = results["machine"]
    argv = results.get("argv") or []
    command = "fleet " + " ".join(argv[1:]) if argv and argv[0].endswith("fleet") else "(not recorded)"
    m = results["methods"]
    fa, b, c = m["fleet_auto"], m["teacher_int8_dynamic"], m["independent_students"]
    rr = results["real_run"]
    la0, la1 = mach.get("load_average_at_start"), mach.get("load_average_at_end")
    loads = (f"load average at start {', '.join(f'{x:.1f}' for x in la0) if la0 else 'n/a'}, at end "
             f"{', '.join(f'{x:.1f}' for x in la1) if la1 else 'n/a'} on {mach['cpus']} cores")
    load = (f"**Shared**: {shared} ran at the same time ({loads}), so every wall time and latency here is pessimistic "
            "and noisy; sizes and fidelity do not depend on the load." if shared else
            f"Nothing else ran on the machine ({loads}; the benchmark's own Ray workers and servers included).")
    lines = [
        "# Benchmarks", "",
        "<!-- generated by fleet.bench.write_docs from the run's results.json; numbers are never typed by hand -->", "",
        (f"`fleet bench` on a synthetic fleet of **N = {results['campaigns']}** campaigns "
        f"({results['bench_config']['synth']['num_layers']}-layer {results['bench_config']['synth']['arch'].upper()} "
        f"teachers, hidden {results['bench_config']['synth']['hidden_size']}, seed {results['bench_config']['synth']['seed']}), "
        f"run {results['created_at']}; the whole benchmark took {results['bench_seconds'] / 60:.1f} min."), "",
    ]
    if status:
        lines += [f"> {status}", ""]
    lines += ["## Command", "", "```", command, "```", "",
              (f"Fleet: {results['fleet']['how']}. Outputs: `results.json`, `results.md`, the PNGs below; the run is "
              f"logged to MLflow (experiment `{EXPERIMENT}`, run `{results.get('mlflow_run_id')}`)."), "",
              "## Machine", "",
              f"{mach['cpus']} CPU cores, {mach['memory_gib']:.0f} GiB memory, no GPU ({mach['platform']}, Python "
              f"{mach['python']}, torch {mach['torch']}). " + load, "",
              "## Results", "", render_markdown(results, plots_prefix=rel), "## Reading", ""]
    k = c["subset_size"]
    speed = c["time_s"] / fa["time_s"] if fa["time_s"] else None
    sub = c["fleet_auto_on_same_subset"]
    lines += [
        (f"- **Size.** A fleet campaign costs {fa['bytes_per_campaign']:,.0f} B of heads Parquet; with the shared "
        f"backbone the whole fleet is {_ratio(fa['compression_ratio'])} smaller than the fp32 teachers, where torch's "
        f"dynamic int8 gives {_ratio(b['compression_ratio'])} and independent students {_ratio(c['compression_ratio'])}."),
        (f"- **Fidelity.** Median / p10 AUC diff vs the teacher: fleet {_fmt(fa['fidelity']['auc_diff_median'], '+.4f')} / "
        f"{_fmt(fa['fidelity']['auc_diff_p10'], '+.4f')}, dynamic int8 {_fmt(b['fidelity']['auc_diff_median'], '+.4f')} / "
        f"{_fmt(b['fidelity']['auc_diff_p10'], '+.4f')}; on the {k} campaigns of peer (c), independent students "
        f"{_fmt(c['fidelity']['auc_diff_median'], '+.4f')} / {_fmt(c['fidelity']['auc_diff_p10'], '+.4f')} vs fleet "
        f"{_fmt(sub['auc_diff_median'], '+.4f')} / {_fmt(sub['auc_diff_p10'], '+.4f')} (AUCs defined on "
        f"{c['fidelity']['campaigns_with_auc']} of those {k}); mean |p - p_teacher| median on the same {k}: independent "
        f"{_fmt(c['fidelity']['mean_abs_diff_median'], '.4f')}, fleet {_fmt(sub['mean_abs_diff_median'], '.4f')}. "
        f"Mean |p - p_teacher| median over all campaigns: "
        f"fleet {_fmt(fa['fidelity']['mean_abs_diff_median'], '.4f')}, int8 {_fmt(b['fidelity']['mean_abs_diff_median'], '.4f')}, "
        f"independent {_fmt(c['fidelity']['mean_abs_diff_median'], '.4f')}."),
        (f"- **Time.** The full fleet run took {fa['time_s']:,.1f} s, {_fmt(rr['total_over_floor'], '.2f')}x its floor "
        f"(stage 1, {rr['floor_seconds']:,.1f} s); independent students would take {c['time_s']:,.0f} s "
        f"(EXTRAPOLATED from {k} campaigns), {_fmt(speed, ',.1f')}x fleet's time."),
    ]
    misses = [t for t in results["targets"] if not t["passed"]]
    passes = [t for t in results["targets"] if t["passed"]]
    if passes:
        lines.append("- **Targets met:** " + "; ".join(f"{t['figure']} ({_target_value(t)} vs {t['target']})" for t in passes) + ".")
    if misses:
        lines += ["", "**Targets missed, and why:**", ""]
        said: set[str] = set()
        for t in misses:
            reason = next((v for key, v in (why or {}).items() if t["figure"].startswith(key)), "")
            if reason in said:
                reason = "Same cause as above."
            said.add(reason)
            lines.append(f"- {t['figure']}: {_target_value(t)} (target {t['target']}; {t['source']}). {reason}".rstrip())
    if notes:
        lines += ["", notes]
    lines.append("")
    with open(docs_path, "w") as f:
        f.write("\n".join(lines))


def _target_value(t: dict) -> str:
    v = t["value"]
    if v is None:
        return "n/a"
    return f"{v:+.4f}" if "AUC" in t["figure"] else f"{v:,.2f}"
