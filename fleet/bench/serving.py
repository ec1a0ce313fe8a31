"""``fleet bench``'s serving figures: in-process warm/cold latency, HTTP on loopback against a real uvicorn
server in a subprocess, serving RSS (:func:`bench_serving`), and issue 12's serving targets side by side with the
K-teacher peer (:func:`serving_targets`; alone: ``fleet bench --serving-only``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import orjson
import pyarrow as pa
import torch
from rich.filesize import decimal

from fleet.bench.common import SERVING_ENV, SERVING_THREADS, BenchConfig, _latencies, _progress, console
from fleet.bench.probe import free_port, proc_rss_mb, run_in_fresh_process, stop_process
from fleet.core.errors import FleetError
from fleet.formats.events import EventsDataset
from fleet.formats.teachers import list_teacher_campaigns, load_teacher


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


def bench_serving(
    manifest_uri: str, events_uri: str, ok: list[str], holdout: dict, num_features: int, cfg: BenchConfig
) -> dict:
    """Warm and cold in-process latency, HTTP latency under bounded concurrency, and server RSS."""
    from fleet.serve.serving import FleetModel

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
    warm_requests = [(cid, t, f) for _, t, f in (seqs[i % len(seqs)] for i in range(cfg.warm_requests))]  # one head
    with _progress() as progress:
        warm = _time_predicts(model, warm_requests, progress, "serving: warm predict (head cached)")
        cold_model = FleetModel.open(
            manifest_uri, cache_size=0, num_threads=SERVING_THREADS, heads="lru"
        )  # every predict reads its head's row group
        cold = _time_predicts(
            cold_model,
            [seqs[i % len(seqs)] for i in range(cfg.cold_requests)],
            progress,
            "serving: cold predict (cache miss, Parquet row group)",
        )
    out["warm"] = _latencies(warm)
    out["cold"] = _latencies(cold)
    out["in_process_torch_threads"] = torch.get_num_threads()
    out["http"] = bench_http(manifest_uri, seqs, cfg.http_requests, cfg.http_concurrency, cfg.out)
    return out


def _time_predicts(model, requests: list[tuple], progress, label: str) -> list[float]:
    """The seconds of each ``model.predict`` of ``requests`` (``(campaign_id, event_types, features)``, one sequence
    each), made one after another as the progress task ``label``."""
    task = progress.add_task(label, total=len(requests), unit="requests")
    seconds = []
    for cid, types, feats in requests:
        t0 = time.perf_counter()
        model.predict(cid, [{"event_types": types, "features": feats}])
        seconds.append(time.perf_counter() - t0)
        progress.advance(task)
    return seconds


@contextlib.contextmanager
def _http_server(manifest_uri: str, heads: str, log_path: str):
    """A real uvicorn server (``python -m fleet.bench.probe server``: ``fleet.serve.http.app_from_uri``, ``heads``
    mode, :data:`SERVING_THREADS` threads) in a subprocess on 127.0.0.1: yields ``(process, base URL)`` once
    ``/healthz`` answers; stopped on exit."""
    import httpx

    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleet.bench.probe", "server", manifest_uri, str(port), str(SERVING_THREADS), heads],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **SERVING_ENV},
        )
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
        stop_process(proc, timeout=20)


def _drive_http(
    base: str, path: str, bodies: list[bytes], total: int, concurrency: int, latencies: list[float] | None
) -> int:
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
        bodies = [
            json.dumps({"campaign_id": c, "sequences": [{"event_types": t, "features": f}]}).encode()
            for c, t, f in seqs
        ]
        errors = _drive_http(base, "/v1/predict", bodies, min(200, requests), concurrency, None)  # warm-up
        single: list[float] = []
        errors += _drive_http(base, "/v1/predict", bodies, requests, 1, single)
        latencies: list[float] = []
        t0 = time.perf_counter()
        errors += _drive_http(base, "/v1/predict", bodies, requests, concurrency, latencies)
        wall = time.perf_counter() - t0
        return {
            **_latencies(latencies),
            "requests": requests,
            "concurrency": concurrency,
            "errors": errors,
            "throughput_rps": len(latencies) / wall if wall else None,
            "server_rss_idle": rss_idle,
            "server_rss_after_load": proc_rss_mb(proc.pid),
            "single": {**_latencies(single), "requests": requests},
            "note": "server (uvicorn subprocess) and client share the machine's cores",
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


def teacher_peer(
    teachers_uri: str,
    campaign_ids: list[str],
    seqs: list[tuple[list, list]],
    num_features: int,
    k: int = SCORE_K,
    requests: int = SLOW_REQUESTS,
) -> dict:
    """The K-teacher peer of ``score_campaigns``: one sequence scored by ``k`` fp32 teachers = ``k`` teacher RNN
    forward passes (batch 1, one torch thread, ``torch.inference_mode``). With fewer than ``k`` teachers the
    loaded ones are cycled (the time is still ``k`` forward passes; their memory is given per teacher)."""
    from fleet.compression.data import collate

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
    return {
        **_latencies(lat),
        "k": k,
        "teachers_loaded": len(models),
        "teacher_bytes_mean": float(np.mean([t.num_bytes for t in teachers])),
        "teacher": {key: cfg.get(key) for key in ("arch", "hidden_size", "num_layers", "embed_dim")},
        "note": f"{k} forward passes of fp32 teachers per request (batch 1, {SERVING_THREADS} torch thread)"
        + (f"; {len(models)} teachers loaded and cycled" if len(models) < k else ""),
    }


def serving_targets(
    manifest_uri: str,
    events_uri: str,
    teachers_uri: str,
    sim_manifest_uri: str,
    sim_count: int,
    *,
    out_dir: str,
    seed: int,
    requests: int,
    http_requests: int,
) -> dict:
    """Every figure of issue 12's targets table (one thread, FleetModel's defaults: resident heads, numpy
    backbone): warm predict on the real version (in-process); score 1 x :data:`SCORE_K` and 1 x every campaign
    plus the serving RSS in a fresh process on the SIMULATED version of ``sim_count`` campaigns; HTTP
    ``/v1/predict`` and ``/v1/score`` (1 in flight) against a server on that version; and the K-teacher peer
    (:func:`teacher_peer`) on the same sequences. ``requests`` / ``http_requests``: timed calls per figure
    (:data:`SLOW_REQUESTS` for the slow ones)."""
    from fleet.serve.serving import FleetModel

    rng = np.random.default_rng(seed + 12)
    threads_before = torch.get_num_threads()
    model = FleetModel.open(manifest_uri, num_threads=SERVING_THREADS)
    real_ids = [cid for part in model.version.iter_heads(["campaign_id"]) for cid in part["campaign_id"].to_pylist()]
    num_features = model.config.num_features
    seqs = _event_sequences(events_uri, rng, max(requests, 200))
    out: dict = {
        "version": model.version_id,
        "campaigns": len(real_ids),
        "sim_campaigns": sim_count,
        "heads": model.heads_mode,
        "backend": model.backend,
        "threads": SERVING_THREADS,
        "sequence_length": {"max": max(len(t) for t, _ in seqs), "median": float(np.median([len(t) for t, _ in seqs]))},
    }
    try:
        picks = rng.choice(len(real_ids), size=requests)
        for i in range(100):
            t, f = seqs[i % len(seqs)]
            model.predict(real_ids[picks[i % len(picks)]], [{"event_types": t, "features": f}])
        with _progress() as progress:
            lat = _time_predicts(
                model,
                [(real_ids[picks[i]], *seqs[i % len(seqs)]) for i in range(requests)],
                progress,
                "serving targets: warm predict",
            )
        out["predict"] = _latencies(lat)
    finally:
        torch.set_num_threads(threads_before)
    del model
    seqs_path = os.path.join(out_dir, "serving-sequences.json")
    with open(seqs_path, "w") as f:
        json.dump(seqs, f)
    console.print(f"serving targets: score_campaigns on {sim_count:,} SIMULATED campaigns in a fresh process")
    probe = run_in_fresh_process(
        "targets",
        [sim_manifest_uri, seqs_path, sim_count, requests, SLOW_REQUESTS, SCORE_K, seed],
        timeout=3600,
        env={**os.environ, **SERVING_ENV},
    )
    out["score"], out["score_all"] = _latencies(probe["score"]), _latencies(probe["score_all"])
    out["probe"] = {k: v for k, v in probe.items() if k not in ("score", "score_all")}
    console.print("serving targets: HTTP on loopback (resident heads, SIMULATED version)")
    with _http_server(sim_manifest_uri, "resident", os.path.join(out_dir, "http-targets-server.log")) as (proc_, base):
        ids = [f"sim-{j:08d}" for j in range(sim_count)]
        predict_bodies = [
            orjson.dumps(
                {"campaign_id": ids[int(rng.integers(sim_count))], "sequences": [{"event_types": t, "features": f}]}
            )
            for t, f in seqs
        ]
        score_bodies = [
            orjson.dumps(
                {
                    "sequence": {"event_types": t, "features": f},
                    "campaign_ids": [
                        ids[j] for j in rng.choice(sim_count, size=min(SCORE_K, sim_count), replace=False)
                    ],
                }
            )
            for t, f in seqs[:50]
        ]
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
        row = {
            "key": key,
            "figure": figure,
            "target": target,
            "value": value,
            "passed": value <= bound,
            "p50": None if key == "rss" else st[key]["p50_ms"],
            "peer": None,
            "ratio": None,
        }
        if key in ("score", "http_score"):
            row["peer"] = st["peer"]["p99_ms"]
            row["ratio"] = st["peer"]["p99_ms"] / value if value else None
        rows.append(row)
    return rows


def render_serving_targets(st: dict) -> list[str]:
    """Markdown of :func:`serving_targets`: the targets table, fleet side by side with the K-teacher peer."""
    peer = st["peer"]
    t = peer["teacher"]
    lines = [
        "| figure (one thread) | target | fleet p50 | fleet p99 | met | K-teacher peer p50 / p99 | fleet wins by (p99) |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for r in st["targets"]:
        unit = "MB" if r["key"] == "rss" else "ms"
        p50 = "" if r["p50"] is None else f"{r['p50']:.3f} {unit}"
        value = f"{r['value']:.0f} MB" if r["key"] == "rss" else f"{r['value']:.3f} ms"
        peer_txt = "" if r["peer"] is None else f"{peer['p50_ms']:,.1f} / {peer['p99_ms']:,.1f} ms"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:,.0f}x"
        met = "yes" if r["passed"] else f"**no** ({r['value'] / SERVING_TARGETS[r['key']][2]:.1f}x the target)"
        lines.append(f"| {r['figure']} | {r['target']} | {p50} | {value} | {met} | {peer_txt} | {ratio} |")
    lines += [
        "",
        (
            f"Real version {st['version']} ({st['campaigns']} campaigns) for warm predict; SIMULATED version of "
            f"{st['sim_campaigns']:,} campaigns (real backbone and bit mix) for the other rows; FleetModel's "
            f"defaults (heads `{st['heads']}`, backend `{st['backend']}`), {st['threads']} thread; real event "
            f"sequences, length median {st['sequence_length']['median']:.0f}, max {st['sequence_length']['max']}. "
            f"Peer: {peer['k']:,} fp32 teacher forward passes per request ({t.get('num_layers')}-layer "
            f"{str(t.get('arch')).upper()}, hidden {t.get('hidden_size')}, {decimal(round(peer['teacher_bytes_mean']))} "
            f"each; {peer['teachers_loaded']} loaded{' and cycled' if peer['teachers_loaded'] < peer['k'] else ''}). "
            f"Serving RSS: the HTTP server process after the load; the in-process probe measured "
            f"{st['probe']['rss_after_open']['VmRSS']:.0f} MB after opening the version "
            f"({st['probe']['rss_before_open']['VmRSS']:.0f} MB before: imports) and "
            f"{st['probe']['rss_after_all']['VmRSS']:.0f} MB after scoring every campaign."
        ),
        "",
    ]
    return lines
