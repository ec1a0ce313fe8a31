"""``fleet bench``'s run (:func:`run_bench`): the cached synthetic fleet, one real ``run_compress``, every method of
:mod:`fleet.bench.methods`, the teacher pass, serving, the SIMULATED scale test and serving targets, the DESIGN.md
targets; results written by :mod:`fleet.bench.report`. Ray is used only through :mod:`fleet.run.pipeline` (imported
lazily, so the subprocesses that measure serving memory never load it)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from fleet.bench.common import BenchConfig, console, machine_info
from fleet.bench.methods import (
    _fid_row,
    _heads_rows,
    _method,
    _min_count,
    _run_variants,
    fidelity_summary,
    head_latencies,
    independent_student_task,
    int8_dynamic_task,
)
from fleet.bench.report import log_to_mlflow, write_outputs
from fleet.bench.serving import bench_serving, serving_targets
from fleet.bench.simulated import bench_scale
from fleet.compression.metrics import campaign_fidelity
from fleet.core.constants import BENCH_RESULTS_FORMAT, SUPPORTED_BITS
from fleet.formats.events import EventsDataset, split_by_campaign, table_to_batch
from fleet.formats.teachers import list_teacher_campaigns
from fleet.run import stages
from fleet.run.plan import Plan
from fleet.storage.store import FleetVersion, RunDir, json_safe
from fleet.synthetic.synth import SYNTH_FILE, SynthConfig, campaign_ids, teacher_saved, with_defaults


def prepare_fleet(config: SynthConfig, fleet_dir: str, address: str | None = None) -> dict:
    """Reuse the synthetic fleet in ``fleet_dir`` when its seed and shape match ``config``; create it,
    or finish an interrupted ``fleet synth`` of the same config, otherwise. A different fleet is an
    error, never overwritten."""
    events_uri, teachers_uri = os.path.join(fleet_dir, "events"), os.path.join(fleet_dir, "teachers")
    recorded_path = os.path.join(fleet_dir, SYNTH_FILE)
    info = {
        "fleet_dir": fleet_dir,
        "events_uri": events_uri,
        "teachers_uri": teachers_uri,
        "synth": dataclasses.asdict(config),
    }
    if os.path.exists(recorded_path) and _is_complete(config, teachers_uri):
        with open(recorded_path) as f:
            recorded = with_defaults(json.load(f))  # fields added since it was written: their defaults
        if recorded == info["synth"]:
            return {**info, "reused": True, "how": "synth.json matches the requested SynthConfig"}
    from fleet.run.pipeline import (
        run_synth,  # refuses another fleet; resumes an interrupted one
    )

    console.print(f"fleet in {fleet_dir} absent or incomplete: training {config.campaigns} teachers (resumable)")
    result = run_synth(config, fleet_dir, address=address)
    resumed = sum(1 for s in result["campaigns"] if s["resumed"])
    return {
        **info,
        "reused": False,
        "how": f"created by run_synth ({resumed} teachers kept from an interrupted run)",
        "synth_seconds": result["seconds"],
    }


def _is_complete(config: SynthConfig, teachers_uri: str) -> bool:
    found = list_teacher_campaigns(teachers_uri) if os.path.exists(teachers_uri) else []
    return found == campaign_ids(config.campaigns) and all(
        teacher_saved(teachers_uri, config.teacher_config(cid)) for cid in found
    )


def _hold_dict(rows: pa.Table) -> dict:
    return {
        "row": rows["row"].to_numpy(),
        "teacher_logit": rows["teacher_logit"].to_numpy(),
        "label": rows["label"].to_numpy(),
    }


def run_bench(cfg: BenchConfig) -> dict:
    """Run every part of the benchmark; write results.json/results.md/plots under ``cfg.out``; return the results."""
    from fleet.run import pipeline

    started_all = time.perf_counter()
    os.makedirs(cfg.out, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    store = os.path.abspath(os.path.join(cfg.out, "store"))
    tracking_uri = (
        cfg.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{os.path.abspath(os.path.join(cfg.out, 'mlflow.db'))}"
    )
    n = cfg.synth.campaigns
    results: dict = {
        "format": BENCH_RESULTS_FORMAT,
        "created_at": stamp,
        "campaigns": n,
        "machine": machine_info(),
        "bench_config": _bench_params(cfg),
        "methods": {},
    }

    with pipeline.ray_session(cfg.address):
        fleet = prepare_fleet(cfg.synth, cfg.fleet_dir, cfg.address)
        results["fleet"] = fleet
        console.print(f"fleet: {fleet['how']}")
        results["teacher_pass"] = bench_teacher_pass(fleet["teachers_uri"], fleet["events_uri"])

        # (d) the real run: the headline wall time, and stage 1 for everyone
        fleet_name = f"bench-n{n}"
        t0 = time.perf_counter()
        real = pipeline.run_compress(
            teachers_uri=os.path.abspath(fleet["teachers_uri"]),
            events_uri=os.path.abspath(fleet["events_uri"]),
            store_uri=store,
            fleet=fleet_name,
            config=cfg.compress,
            run_id=stamp,
            tracking_uri=tracking_uri,
            address=cfg.address,
            retrain_backbone=True,
            register=cfg.mlflow,
            no_parent=not cfg.mlflow,
        )  # --no-mlflow: no registry
        real_wall = time.perf_counter() - t0
        run_dir = RunDir(store, fleet_name, stamp)
        plan = Plan.read(run_dir)
        soft_shards = {s: run_dir.soft_labels.read(s) for s in plan.shards}
        status = run_dir.campaigns.read_all(plan.shards)
        sample = run_dir.backbone_sample.read_all(plan.shards)
        real_backbone = run_dir.read_backbone()
        version = FleetVersion.open(real.manifest_uri)
        m = real.metrics
        floor = m["stage_seconds_soft_labels"]
        ok = [c for c, s in zip(status["campaign_id"].to_pylist(), status["status"].to_pylist()) if s == "ok"]
        sizes = dict(zip(status["campaign_id"].to_pylist(), status["n_rows"].to_pylist()))
        teacher_bytes = dict(zip(status["campaign_id"].to_pylist(), status["teacher_bytes"].to_pylist()))
        hashes = {
            c: [t, d]
            for c, t, d in zip(
                status["campaign_id"].to_pylist(),
                status["teacher_sha256"].to_pylist(),
                status["data_fingerprint"].to_pylist(),
            )
        }
        teacher_total = int(sum(v for c, v in teacher_bytes.items() if c in set(ok)))
        results["real_run"] = {
            "fleet": fleet_name,
            "version_id": real.version_id,
            "manifest_uri": real.manifest_uri,
            "exit_code": real.exit_code,
            "wall_seconds": real_wall,
            "floor_seconds": floor,
            "total_over_floor": real_wall / floor if floor else None,
            "run_over_floor": m.get("run_over_floor"),
            "stage_seconds": pipeline.stage_seconds(m),
            "registration_and_overhead_seconds": real_wall - m.get("run_seconds", 0.0),
            "registered": None
            if real.registered is None
            else {
                "name": real.registered.name,
                "version": real.registered.version,
                "gate_passed": None if real.registered.gate is None else real.registered.gate.passed,
                "gate_reasons": None if real.registered.gate is None else real.registered.gate.reasons,
            },
            "metrics": {k: v for k, v in m.items() if isinstance(v, (int, float, str)) or v is None},
            "rejects": len(real.rejects),
        }
        soft = pa.concat_tables(list(soft_shards.values()))
        by_campaign = split_by_campaign(soft)
        holdout = {c: t.filter(pc.equal(t["split"], stages.HOLDOUT)) for c, t in by_campaign.items()}
        ctx = stages.StageContext(
            os.path.abspath(fleet["teachers_uri"]),
            os.path.abspath(fleet["events_uri"]),
            cfg.compress,
            plan.num_event_types,
            plan.num_features,
        )

        # (a) fp32 teachers: fidelity of the stage-1 hold-out logits against labels
        rows = []
        for cid in ok:
            h = holdout[cid]
            p = torch.sigmoid(torch.tensor(h["teacher_logit"].to_numpy())).numpy()
            rows.append(
                _fid_row(cid, campaign_fidelity(p, p, h["label"].to_numpy(), _min_count(cfg.compress)), sizes[cid])
            )
        results["methods"]["teacher_fp32"] = _method(
            "teacher_fp32",
            rows,
            bytes_total=teacher_total,
            bytes_per_campaign=teacher_total / len(ok),
            bytes_note="model.safetensors of every teacher (measured file sizes)",
            time_s=floor,
            time_note="one inference pass over every campaign's transfer rows = stage 1 of the real run (the floor)",
        )

        # (b) torch dynamic int8 teachers
        batches = [b for b in (sorted(set(batch) & set(ok)) for batch in plan.batches) if b]
        jobs = [{"campaigns": b, "holdout": {c: _hold_dict(holdout[c]) for c in b}} for b in batches]
        t0 = time.perf_counter()
        parts = pipeline.map_on_ray(int8_dynamic_task, jobs, (ctx,), "(b) teachers -> dynamic int8 + hold-out")
        wall_b = time.perf_counter() - t0
        rows_b = [dict(r, n_rows=sizes[r["campaign_id"]]) for part in parts for r in part]
        bytes_b = int(sum(r["bytes"] for r in rows_b))
        results["methods"]["teacher_int8_dynamic"] = _method(
            "teacher_int8_dynamic",
            rows_b,
            bytes_total=bytes_b,
            bytes_per_campaign=bytes_b / len(rows_b),
            teacher_total=teacher_total,
            time_s=wall_b,
            bytes_note="torch.save(quantized state_dict) to BytesIO, measured per teacher",
            time_note=f"quantize + hold-out inference of all teachers (quantize alone: "
            f"{sum(r['quantize_s'] for r in rows_b):.1f} task-s)",
            extra={
                "quantize_task_seconds": sum(r["quantize_s"] for r in rows_b),
                "inference_task_seconds": sum(r["inference_s"] for r in rows_b),
            },
        )

        # (c) independent students on K random campaigns, extrapolated to N
        rng = np.random.default_rng(cfg.compress.seed + 17)
        k = min(cfg.peer_subset, len(ok))
        subset = sorted(rng.choice(ok, size=k, replace=False).tolist())
        c_config = dataclasses.replace(
            cfg.compress,
            backbone_bits=32,
            backbone_per_campaign=cfg.compress.max_fit_rows,
            backbone_max_sequences=max(cfg.compress.backbone_max_sequences, cfg.compress.max_fit_rows),
        )
        c_ctx = dataclasses.replace(ctx, config=c_config)
        learn = pa.array([stages.FIT, stages.VALIDATION], pa.int8())  # validation rows: early stopping
        jobs = [
            {
                "campaign_id": c,
                "fit": by_campaign[c].filter(pc.is_in(by_campaign[c]["split"], value_set=learn)),
                "holdout": _hold_dict(holdout[c]),
            }
            for c in subset
        ]
        t0 = time.perf_counter()
        rows_c = pipeline.map_on_ray(
            independent_student_task, jobs, (c_ctx,), f"(c) independent students ({k} campaigns)"
        )
        wall_c = time.perf_counter() - t0
        rows_c = [dict(r, n_rows=sizes[r["campaign_id"]]) for r in rows_c]
        per_c = float(np.mean([r["bytes"] for r in rows_c]))
        results["methods"]["independent_students"] = _method(
            "independent_students",
            rows_c,
            bytes_total=per_c * len(ok),
            bytes_per_campaign=per_c,
            teacher_total=teacher_total,
            time_s=wall_c * len(ok) / k,
            extrapolated=True,
            bytes_note=f"backbone+head safetensors (fp32), measured on {k} campaigns; total = mean x {len(ok)}",
            time_note=f"EXTRAPOLATED: {wall_c:.1f} s wall for {k} random campaigns x {len(ok)}/{k}; "
            f"{c_config.backbone_steps} steps each (fleet's backbone budget)",
            extra={"subset": subset, "measured_wall_seconds": wall_c, "subset_size": k},
        )

        # (d) fleet: the real run, then variants sharing its stage 1 (and backbone where the config allows)
        heads_real = version.read_heads()
        rows_d = _heads_rows(heads_real, sizes)
        files = version.manifest["files"]
        heads_bytes = sum(f["bytes"] for f in files if f["path"].startswith("heads/"))
        backbone_bytes = sum(f["bytes"] for f in files if f["path"] == "backbone.safetensors")
        bits = heads_real["bits"].to_numpy()
        results["methods"]["fleet_auto"] = _method(
            "fleet_auto",
            rows_d,
            bytes_total=heads_bytes + backbone_bytes,
            bytes_per_campaign=heads_bytes / len(rows_d),
            teacher_total=teacher_total,
            time_s=real_wall,
            bytes_note="heads/*.parquet / N per campaign; total adds backbone.safetensors (measured files)",
            time_note="one full run_compress incl. registration (stage times in real_run)",
            extra={
                "heads_bytes": heads_bytes,
                "backbone_bytes": backbone_bytes,
                "bits_campaigns": {str(b): int((bits == b).sum()) for b in SUPPORTED_BITS},
                "head_latency": head_latencies(real.manifest_uri, heads_real["campaign_id"].to_pylist()),
                "on_peer_subset": fidelity_summary([r for r in rows_d if r["campaign_id"] in set(subset)]),
            },
        )
        results["methods"]["independent_students"]["fleet_auto_on_same_subset"] = results["methods"]["fleet_auto"][
            "on_peer_subset"
        ]
        _run_variants(
            cfg,
            results,
            ctx,
            plan,
            soft_shards,
            ok,
            hashes,
            sizes,
            sample,
            real_backbone,
            m,
            teacher_total,
            store,
            stamp,
        )

    # serving: in-process warm/cold, HTTP on loopback, server RSS (outside Ray: nothing else runs)
    results["serving"] = bench_serving(real.manifest_uri, fleet["events_uri"], ok, holdout, plan.num_features, cfg)
    if cfg.scale_campaigns:
        results["scale"] = {str(s): bench_scale(s, version, cfg, stamp) for s in cfg.scale_campaigns}
        largest = max(cfg.scale_campaigns)
        results["serving_targets"] = serving_targets(
            real.manifest_uri,
            fleet["events_uri"],
            fleet["teachers_uri"],
            results["scale"][str(largest)]["manifest_uri"],
            largest,
            out_dir=cfg.out,
            seed=cfg.compress.seed,
            requests=cfg.warm_requests,
            http_requests=cfg.http_requests,
        )
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


TEACHER_PASS_CAMPAIGNS, TEACHER_PASS_ROWS = 32, 256  # the teacher-pass section: teachers, rows of each (at most)


def bench_teacher_pass(
    teachers_uri: str, events_uri: str, campaigns: int = TEACHER_PASS_CAMPAIGNS, rows: int = TEACHER_PASS_ROWS
) -> dict:
    """Stage 1's teacher pass on the bench fleet's first ``campaigns`` teachers (at most ``rows`` rows each):
    sequences/s batched (stacked parameters, :func:`fleet.formats.teacher_pack.teacher_logits`) vs one at a time,
    in this process, and the largest difference of their logits."""
    from fleet.formats.teacher_pack import load_teachers, locate_teachers, teacher_logits

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
    return {
        "teachers": len(teachers),
        "sequences": sequences,
        "torch_threads": 1,
        "teacher": {k: teachers[0].config.get(k) for k in ("arch", "hidden_size", "num_layers")},
        "seconds": timings,
        "sequences_per_second": {k: sequences / v for k, v in timings.items()},
        "speedup": timings["one_at_a_time"] / timings["batched"],
        "max_abs_logit_diff": diff,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


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
        add(
            "bytes per campaign (heads Parquet / N, N=10k)",
            "<= 128 B",
            s10k["bytes_per_campaign"],
            s10k["bytes_per_campaign"] <= 128,
            "SIMULATED 10k heads, real bit mix",
        )
    add(
        f"bytes per campaign (heads Parquet / N, real run N={results['campaigns']})",
        "<= 128 B",
        fleet["bytes_per_campaign"],
        fleet["bytes_per_campaign"] <= 128,
        "real run",
    )
    add(
        "fleet total vs fp32 teachers (compression ratio)",
        ">= 10,000x",
        fleet["compression_ratio"],
        fleet["compression_ratio"] is not None and fleet["compression_ratio"] >= 10_000,
        "real run: heads + backbone",
    )
    f = fleet["fidelity"]
    add(
        "AUC diff median (student - teacher)",
        ">= -0.005",
        f["auc_diff_median"],
        f["auc_diff_median"] is not None and f["auc_diff_median"] >= -0.005,
        "real run, hold-out",
    )
    add(
        "AUC diff 10th percentile",
        ">= -0.02",
        f["auc_diff_p10"],
        f["auc_diff_p10"] is not None and f["auc_diff_p10"] >= -0.02,
        "real run, hold-out",
    )
    rr = results["real_run"]
    add(
        f"run time / floor (stage 1), N={results['campaigns']}",
        "<= 2x (at N=1000)",
        rr["total_over_floor"],
        rr["total_over_floor"] is not None and rr["total_over_floor"] <= 2,
        "real run, wall incl. registration",
    )
    c = m["independent_students"]
    speedup = c["time_s"] / fleet["time_s"] if fleet["time_s"] else None
    add(
        "speed-up vs peer (c)",
        ">= 20x",
        speedup,
        speedup is not None and speedup >= 20,
        "peer (c) time EXTRAPOLATED from K campaigns",
    )
    if s:
        add(
            "warm predict p99 (in-process, head cached)",
            "<= 1 ms",
            s["warm"]["p99_ms"],
            s["warm"]["p99_ms"] <= 1,
            "real run",
        )
        add(
            "cold predict p99 (head from local Parquet)",
            "<= 20 ms",
            s["cold"]["p99_ms"],
            s["cold"]["p99_ms"] <= 20,
            "real run",
        )
        single = s["http"]["single"]
        add("HTTP predict p99 (loopback, 1 in flight)", "<= 5 ms", single["p99_ms"], single["p99_ms"] <= 5, "real run")
        add(
            f"HTTP predict p99 (loopback, {s['http']['concurrency']} in flight)",
            "<= 5 ms",
            s["http"]["p99_ms"],
            s["http"]["p99_ms"] <= 5,
            "real run, client and server on the same cores",
        )
    s1m = scale.get("1000000")
    if s1m:
        add(
            "serving memory, 1M campaigns (RSS)",
            "<= 300 MB",
            s1m["rss_mb"],
            s1m["rss_mb"] <= 300,
            "SIMULATED 1M heads, FleetModel in a fresh process",
        )
        add(
            "cold predict p99, 1M campaigns",
            "<= 20 ms",
            s1m["cold"]["p99_ms"],
            s1m["cold"]["p99_ms"] <= 20,
            "SIMULATED 1M heads",
        )
    return out


def _bench_params(cfg: BenchConfig) -> dict:
    return {
        "synth": dataclasses.asdict(cfg.synth),
        "compress": cfg.compress.to_dict(),
        "fleet_dir": cfg.fleet_dir,
        "out": cfg.out,
        "peer_subset": cfg.peer_subset,
        "scale_campaigns": list(cfg.scale_campaigns),
        "warm_requests": cfg.warm_requests,
        "cold_requests": cfg.cold_requests,
        "http_requests": cfg.http_requests,
        "http_concurrency": cfg.http_concurrency,
        "variant_backbones": cfg.variant_backbones,
    }
