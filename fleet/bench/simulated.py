"""``fleet bench``'s SIMULATED scale test: random heads of the real shape and bit mix (:func:`simulated_heads`),
written in the real store format with the real backbone, served by FleetModel in a fresh subprocess
(:func:`bench_scale`). The REAL scale benchmark is :mod:`fleet.bench.scale`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from fleet.bench.common import BenchConfig, _latencies, _progress, console
from fleet.compression.quant import quantize_rows
from fleet.core.errors import FleetError
from fleet.formats.codec import DATA_FINGERPRINT_BYTES, HEADS_SCHEMA
from fleet.storage.store import FleetVersion, VersionWriter

SIM_CHUNK = 100_000  # simulated heads generated per chunk (bounded memory for 1M campaigns)


_PROBE_SRC = """
import json, sys, time
t_import = time.perf_counter()
import numpy as np
from fleet.serve.serving import FleetModel
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
    from fleet.formats.codec import table_to_heads
    from fleet.formats.heads import decode_heads

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
