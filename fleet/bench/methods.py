"""The methods ``fleet bench`` compares side by side (DESIGN.md section 5), each summed up the same way
(:func:`_method`: bytes, time, hold-out fidelity per campaign): the peers (a) fp32 teachers, (b) torch dynamic int8,
(c) independent students, with their Ray task bodies (plain functions), and (d) fleet's real run plus the
:data:`VARIANTS` that share its stage 1 (:func:`_run_variants`); per-head read costs (:func:`head_latencies`)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from fleet.bench.common import _latencies
from fleet.compression.data import map_minibatches
from fleet.compression.distill import compute_features
from fleet.compression.metrics import campaign_fidelity
from fleet.compression.student import POOLED_DESIGNS, head_logits
from fleet.core.constants import SUPPORTED_BITS
from fleet.formats.backbone_codec import backbone_from_bytes
from fleet.formats.codec import conform_heads_table, table_to_heads
from fleet.formats.events import EventsDataset, table_to_batch
from fleet.formats.heads import decode_heads
from fleet.formats.teachers import load_teacher
from fleet.run import stages
from fleet.run.stages import ShardJob
from fleet.storage.store import FleetVersion, VersionWriter

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
METHOD_ORDER = [
    "teacher_fp32",
    "teacher_int8_dynamic",
    "independent_students",
    "fleet_auto",
    "fleet_bits8",
    "fleet_bits4",
    "fleet_bits2",
    "fleet_bits1",
    "fleet_weightless",
    "fleet_auto_lowrank",
    "fleet_auto_linear",
    "fleet_auto_class_distance",
]


def _backbone_key(config: stages.CompressConfig) -> tuple:
    """Everything stage 2 depends on: variants with the same key share one backbone."""
    c = config
    return (
        c.arch,
        c.hidden_size,
        c.embed_dim,
        c.num_layers,
        c.head,
        c.head_rank,
        c.loss,
        c.temperature,
        c.hard_label_weight,
        c.distance_weight,
        c.backbone_bits,
        c.backbone_qat,
        c.backbone_steps,
        c.backbone_lr,
        c.backbone_batch_size,
        c.backbone_max_sequences,
        c.backbone_per_campaign,
        c.backbone_eval_every,
        c.backbone_patience,
        c.seed,
    )


def _q(values, q: float) -> float | None:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.percentile(values, q)) if values else None


def fidelity_summary(rows: list[dict]) -> dict:
    """Median / p10 / worst of per-campaign ``auc_diff`` and ``mean_abs_diff`` rows (None where undefined)."""
    diffs = [r["auc_diff"] for r in rows if r.get("auc_diff") is not None]
    mads = [r["mean_abs_diff"] for r in rows if r.get("mean_abs_diff") is not None]
    aucs = [r["auc"] for r in rows if r.get("auc") is not None]
    return {
        "campaigns": len(rows),
        "campaigns_with_auc": len(diffs),
        "auc_median": _q(aucs, 50),
        "auc_diff_median": _q(diffs, 50),
        "auc_diff_p10": _q(diffs, 10),
        "auc_diff_worst": min(diffs) if diffs else None,
        "mean_abs_diff_median": _q(mads, 50),
        "mean_abs_diff_p90": _q(mads, 90),
        "mean_abs_diff_worst": max(mads) if mads else None,
    }


def _min_count(config: stages.CompressConfig) -> int:
    """Fewest positives (and negatives) for a hold-out AUC: the real run's rule, so every method's AUC
    statistics cover the same campaigns."""
    return int(getattr(config, "min_auc_class_count", 1))


def _fid_row(campaign_id: str, fid: dict, n_rows: int | None) -> dict:
    return {
        "campaign_id": campaign_id,
        "n_rows": n_rows,
        "auc": fid["student_auc"],
        "teacher_auc": fid["teacher_auc"],
        "auc_diff": fid["auc_diff"],
        "mean_abs_diff": fid["mean_abs_diff"],
        "n_holdout": fid["n_holdout"],
    }


def _heads_rows(heads: pa.Table, sizes: dict[str, int]) -> list[dict]:
    out = []
    for r in heads.select(
        ["campaign_id", "student_auc", "teacher_auc", "mean_abs_diff", "n_holdout", "bits"]
    ).to_pylist():
        s, t = r["student_auc"], r["teacher_auc"]
        ok = s is not None and t is not None and math.isfinite(s) and math.isfinite(t)
        out.append(
            {
                "campaign_id": r["campaign_id"],
                "n_rows": sizes.get(r["campaign_id"]),
                "auc": s if ok else None,
                "teacher_auc": t if ok else None,
                "auc_diff": (s - t) if ok else None,
                "mean_abs_diff": r["mean_abs_diff"],
                "n_holdout": r["n_holdout"],
                "bits": r["bits"],
            }
        )
    return out


def _holdout_batch(events: EventsDataset, campaign_id: str, rows: np.ndarray, num_features: int):
    table = events.read_campaigns([campaign_id])[campaign_id]
    return table_to_batch(table.take(pa.array(rows.astype(np.int64))), num_features)


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
        teacher = load_teacher(
            ctx.teachers_uri,
            campaign_id,
            ctx.storage_options,
            allow_loaders=ctx.config.allow_loaders,
            untrusted_roots=(ctx.events_uri,),
        )
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
        fid = campaign_fidelity(
            torch.sigmoid(logits).numpy(),
            torch.sigmoid(torch.tensor(hold["teacher_logit"])).numpy(),
            np.asarray(hold["label"], dtype=np.float64),
            _min_count(ctx.config),
        )
        out.append(
            {
                **_fid_row(campaign_id, fid, None),
                "bytes": buf.getbuffer().nbytes,
                "quantize_s": quantize_s,
                "inference_s": infer_s,
            }
        )
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
    batch = _holdout_batch(
        EventsDataset(ctx.events_uri, ctx.storage_options),
        job["campaign_id"],
        np.asarray(hold["row"]),
        ctx.num_features,
    )
    config = backbone.config
    features = compute_features(backbone, batch, pooled=config.head in POOLED_DESIGNS)  # (n, feature width)
    logits = head_logits(config.head, features, head, config.head_rank)
    fid = campaign_fidelity(
        torch.sigmoid(logits).numpy(),
        torch.sigmoid(torch.tensor(hold["teacher_logit"])).numpy(),
        np.asarray(hold["label"], dtype=np.float64),
        _min_count(ctx.config),
    )
    return {
        **_fid_row(job["campaign_id"], fid, None),
        "bytes": len(data),
        "seconds": seconds,
        "steps": stats["backbone_steps"],
        "fit_rows": stats["backbone_rows"],
    }


def retarget_backbone(data: bytes, head: str, head_rank: int) -> bytes:
    """``backbone.safetensors`` bytes whose student config names another head design (the weights are
    unchanged); the stored head prior is dropped when the design changes (it is a mean of the old design's
    heads), so stage 3 starts from :func:`fleet.compression.student.init_heads`."""
    from safetensors.torch import load, save

    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
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
    """Stages 3-5 for one shard of one variant: ``job`` holds a shard job's ``shard``, ``campaigns`` and ``hashes``
    (:class:`~fleet.run.plan.ShardJob`), and ``soft``, the shard's stage-1 rows."""
    shard_job = ShardJob(job["campaigns"], job["shard"], hashes=job["hashes"])
    return stages.fit_heads_shard(shard_job, ctx, job["soft"], backbone_bytes)


def _run_variants(
    cfg, results, ctx, plan, soft_shards, ok, hashes, sizes, sample, real_backbone, m, teacher_total, store, stamp
) -> None:
    from fleet.run import pipeline

    backbones = {
        _backbone_key(cfg.compress): (real_backbone, m.get("stage_seconds_backbone", 0.0), "shared with the real run")
    }
    head_jobs = [
        {"shard": job.shard, "campaigns": job.campaigns, "hashes": job.hashes, "soft": soft_shards[job.shard]}
        for job in plan.head_jobs({c: hashes[c] for c in ok}, done=set())
    ]
    floor = m["stage_seconds_soft_labels"]
    for name, overrides in VARIANTS.items():
        config = dataclasses.replace(cfg.compress, **overrides)
        config.__post_init__()
        vctx = dataclasses.replace(ctx, config=config)
        key = _backbone_key(config)
        if key not in backbones and not cfg.variant_backbones:
            real_bytes = backbones[_backbone_key(cfg.compress)][0]
            backbones[key] = (
                retarget_backbone(real_bytes, config.head, config.head_rank),
                m.get("stage_seconds_backbone", 0.0),
                "the real run's backbone (film/hinton-trained), reused; only stage 3 differs",
            )
        if key not in backbones:
            out = pipeline.map_on_ray(
                backbone_task,
                [sample],
                (vctx,),
                f"{name}: stage 2 backbone",
                threads=max(1, min(os.cpu_count() or 1, 4)),
                unit="backbone",
            )[0]
            backbones[key] = (
                out["bytes"],
                out["seconds"],
                "trained for this variant (same sample, steps, threads as the real run)",
            )
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
            name,
            rows,
            bytes_total=hb + len(bb),
            bytes_per_campaign=hb / len(rows),
            teacher_total=teacher_total,
            time_s=floor + bb_seconds + heads_seconds,
            bytes_note="heads/*.parquet / N per campaign; total adds backbone.safetensors (measured files)",
            time_note=f"stage 1 of the real run (shared) + backbone ({bb_note}) + heads {heads_seconds:.1f} s",
            extra={
                "heads_bytes": hb,
                "backbone_bytes": len(bb),
                "backbone_seconds": bb_seconds,
                "backbone_note": bb_note,
                "heads_seconds": heads_seconds,
                "overrides": overrides,
                "bits_campaigns": {str(b): int((bits == b).sum()) for b in SUPPORTED_BITS},
                "head_latency": head_latencies(manifest_uri, heads["campaign_id"].to_pylist()),
            },
        )


def contiguous_jobs(head_jobs: list[dict], block_rows: int) -> list[dict]:
    """The shard jobs of the real run (cost-balanced, ids interleaved) regrouped as the ``bloomier`` codec's plan
    cuts them: contiguous runs of the sorted campaign ids, at most ``block_rows`` each, as many as there were
    jobs (:func:`fleet.run.plan.contiguous_batches`); each job's ``soft`` holds its campaigns' stage-1 rows."""
    from fleet.run.plan import contiguous_batches

    hashes = {c: h for job in head_jobs for c, h in job["hashes"].items()}
    soft = pa.concat_tables([job["soft"] for job in head_jobs])
    batches = contiguous_batches(list(hashes), len(head_jobs), block_rows)
    return [
        {
            "shard": f"w{i:05d}",
            "campaigns": batch,
            "hashes": {c: hashes[c] for c in batch},
            "soft": soft.filter(pc.is_in(soft["campaign_id"], value_set=pa.array(batch))),
        }
        for i, batch in enumerate(batches)
    ]


def head_latencies(manifest_uri: str, campaign_ids: list[str], count: int = 200, seed: int = 0) -> dict:
    """Per-head read costs of a written version, any codec: ``cold_lookup`` (one campaign's row group read, checked
    and decoded: :meth:`FleetVersion.read_head_row` + :func:`fleet.formats.heads.decode_heads`, footers cached after the
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
    return {
        "codec": version.manifest.get("heads_codec", "packed"),
        "cold_lookup": _latencies(cold),
        "decode": _latencies(decode),
        "decode_all_per_head_ms": every,
    }


def _method(
    key: str,
    rows: list[dict],
    *,
    bytes_total: float,
    bytes_per_campaign: float,
    time_s: float,
    bytes_note: str,
    time_note: str,
    teacher_total: float | None = None,
    extrapolated: bool = False,
    extra: dict | None = None,
) -> dict:
    ratio = 1.0 if key == "teacher_fp32" else (teacher_total / bytes_total if teacher_total and bytes_total else None)
    return {
        "label": LABELS[key],
        "bytes_total": float(bytes_total),
        "bytes_per_campaign": float(bytes_per_campaign),
        "compression_ratio": ratio,
        "bytes_note": bytes_note,
        "time_s": float(time_s),
        "time_note": time_note,
        "extrapolated": extrapolated,
        "fidelity": fidelity_summary(rows),
        "per_campaign": rows,
        **(extra or {}),
    }
