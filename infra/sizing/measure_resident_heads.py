"""Serving memory, open time and latency of ``FleetModel.open(heads="resident")`` against ``heads="lru"`` on a
large SIMULATED version, for choosing the default head mode (docs/serving.md, "Which heads mode").

    python infra/sizing/measure_resident_heads.py --campaigns 1000000 --out /tmp/resident [--manifest M]

Builds (once; reused when ``--out`` already holds it) a version of ``--campaigns`` SIMULATED heads the way
``fleet bench``'s scale test does (:func:`fleet.bench.simulated.simulated_heads`: a seed head plus noise at its bit
width, random hashes, the store's Parquet settings). The seed heads are those of ``--manifest`` when given,
else 1,000 random FiLM heads at H=64 (193 parameters, group size 64) with the bit mix of the N=1000
benchmark version (255 x 1, 284 x 2, 456 x 4, 5 x 8 bits; docs/storage.md) and a random GRU backbone.
Then, for each mode, a fresh Python process (one torch thread) opens it and reports RSS before and after
open, open seconds, one-sequence predict latency and ``score_campaigns`` latency (1 x 1,000 random ids, and
1 x every campaign for resident), as one JSON object per mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

SEED_BITS = (1,) * 255 + (2,) * 284 + (4,) * 456 + (8,) * 5

PROBE = r"""
import json, os, sys, time
def rss():
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = round(int(line.split()[1]) / 1024.0, 1)
    return out
import numpy as np
from fleet.serve.serving import FleetModel
uri, mode, requests = sys.argv[1], sys.argv[2], int(sys.argv[3])
before = rss()
c0, t0 = time.process_time(), time.perf_counter()
model = FleetModel.open(uri, heads=mode, verify=False, num_threads=1)
open_s, open_cpu_s = time.perf_counter() - t0, time.process_time() - c0
after_open = rss()
rng = np.random.default_rng(0)
cfg, count = model.config, model.num_campaigns
def seq(t=20):
    return {"event_types": rng.integers(0, cfg.num_event_types, size=t).tolist(),
            "features": rng.normal(size=t * cfg.num_features).astype("float32").tolist()}
def cid(k):
    return "sim-%08d" % int(k)
def timed(call, samples):
    c0, t0 = time.process_time(), time.perf_counter()
    call()
    samples.append((time.perf_counter() - t0, time.process_time() - c0))
def q(samples):
    # wall and CPU (this process) milliseconds: on a shared machine the CPU figure is the steadier one
    wall, cpu = (np.asarray([s[i] for s in samples]) * 1e3 for i in (0, 1))
    r = lambda a, p: round(float(np.percentile(a, p)), 3)
    return {"n": len(samples), "p50_ms": r(wall, 50), "p99_ms": r(wall, 99), "cpu_p50_ms": r(cpu, 50),
            "cpu_p99_ms": r(cpu, 99)}
cold = []
for k in rng.choice(count, size=requests, replace=False):  # distinct ids: for lru every one is a miss
    s = seq(); timed(lambda: model.predict(cid(k), [s]), cold)
hot = [cid(k) for k in rng.choice(count, size=50, replace=False)]
for c in hot:
    model.predict(c, [seq()])
warm = []
for i in range(requests):
    s = seq(); timed(lambda: model.predict(hot[i % len(hot)], [s]), warm)
ids = [cid(k) for k in rng.choice(count, size=1000, replace=False)]
model.score_campaigns(seq(), ids)  # lru: reads the 1,000 heads once
score = []
for _ in range(requests):
    s = seq(); timed(lambda: model.score_campaigns(s, ids), score)
out = {"mode": mode, "campaigns": count, "open_s": round(open_s, 3), "open_cpu_s": round(open_cpu_s, 3),
       "rss_before_open": before, "rss_after_open": after_open, "predict_first_use": q(cold),
       "predict_warm": q(warm), "score_1x1000": q(score)}
if mode == "resident":
    every = []
    for _ in range(3):
        s = seq(); timed(lambda: model.score_campaigns(s, top_k=10), every)
    out["score_1xall_top10"] = q(every)
    out["resident_bytes"] = model.cache_info()["resident_bytes"]
out["rss_end"] = rss()
print(json.dumps(out), flush=True)
os._exit(0)
"""


def seed_table(rng: np.random.Generator):
    """1,000 random FiLM heads (H=64) at the benchmark's bit mix, as a fleet-heads table."""
    import torch

    from fleet.compression.quant import quantize_rows
    from fleet.formats.codec import HeadRow, heads_to_table

    values = torch.from_numpy(rng.normal(scale=0.3, size=(len(SEED_BITS), 193)).astype(np.float32))
    bits = np.array(SEED_BITS)
    rows = []
    for b in np.unique(bits).tolist():
        idx = np.flatnonzero(bits == b)
        for i, v in zip(idx.tolist(), quantize_rows(values[idx], b, 64)):
            rows.append(HeadRow(campaign_id=f"seed-{i:05d}", bits=b, shape=(193,), group_size=64, packed=v.packed,
                                scales=v.scales, teacher_sha256=bytes(32), data_fingerprint=bytes(16)))
    return heads_to_table(rows)


def build(out: str, campaigns: int, manifest: str | None) -> str:
    """The simulated version's manifest URI (built unless ``out`` holds it already)."""
    import pyarrow as pa

    from fleet.bench.simulated import simulated_heads
    from fleet.compression.student import SharedBackbone, StudentConfig
    from fleet.formats.backbone_codec import encode_backbone
    from fleet.storage.store import FleetVersion, VersionWriter, list_versions

    fleet, version_id = f"sim-{campaigns}", "v1"
    if version_id in list_versions(out, fleet):
        return os.path.join(out, fleet, "versions", version_id, "manifest.json")
    writer = VersionWriter(out, fleet, version_id)
    if manifest:
        real = FleetVersion.open(manifest)
        seed, backbone = real.read_heads(), real.read_backbone_bytes()
        writer.write_backbone_bytes(backbone)
        config = real.manifest.get("config", {})
    else:
        import torch

        torch.manual_seed(0)
        student = StudentConfig(num_event_types=32, num_features=8, hidden_size=64, embed_dim=16)
        seed = seed_table(np.random.default_rng(0))
        writer.write_backbone(*encode_backbone(SharedBackbone(student).eval()))
        config = {"student": student.to_dict()}
    t0 = time.perf_counter()
    heads = pa.concat_tables(list(simulated_heads(campaigns, seed, 0)))
    writer.write_heads(heads)
    del heads
    uri = writer.commit(config=config, lineage={"simulated": True}, metrics={"simulated": True})
    print(f"built {campaigns:,} simulated heads in {time.perf_counter() - t0:.1f} s: {uri}", file=sys.stderr)
    return uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--campaigns", type=int, default=1_000_000)
    parser.add_argument("--out", required=True, help="directory (store) for the simulated version")
    parser.add_argument("--manifest", default=None, help="seed the heads and backbone from this version")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per figure")
    parser.add_argument("--modes", default="resident,lru")
    args = parser.parse_args()
    uri = build(args.out, args.campaigns, args.manifest)
    with open(uri) as manifest:
        heads_bytes = sum(f["bytes"] for f in json.load(manifest)["files"] if f["path"].startswith("heads/"))
    print(json.dumps({"campaigns": args.campaigns, "heads_parquet_bytes": heads_bytes,
                      "parquet_bytes_per_campaign": round(heads_bytes / args.campaigns, 1)}))
    for mode in args.modes.split(","):
        proc = subprocess.run([sys.executable, "-c", PROBE, uri, mode, str(args.requests)], capture_output=True,
                              text=True, check=False, timeout=3600)
        lines = proc.stdout.strip().splitlines()
        print(lines[-1] if proc.returncode == 0 and lines else json.dumps(
            {"mode": mode, "error": proc.returncode, "stderr": proc.stderr[-2000:]}), flush=True)


if __name__ == "__main__":
    main()
