"""``fleet bench``'s SIMULATED scale test: random heads of the real shape and bit mix (:func:`simulated_heads`),
written in the real store format with the real backbone, served by FleetModel in a fresh subprocess
(:func:`bench_scale`). The REAL scale benchmark is :mod:`fleet.bench.scale`."""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from fleet.bench.common import BenchConfig, _latencies, _progress, console
from fleet.bench.probe import run_in_fresh_process
from fleet.compression.quant import quantize_rows
from fleet.core.constants import DATA_FINGERPRINT_BYTES, TEACHER_SHA256_BYTES
from fleet.formats.codec import HEADS_SCHEMA
from fleet.storage.store import FleetVersion, VersionWriter

SIM_CHUNK = 100_000  # simulated heads generated per chunk (bounded memory for 1M campaigns)


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
        teacher_hashes = rng.integers(0, 256, size=(m, TEACHER_SHA256_BYTES), dtype=np.uint8)
        data_hashes = rng.integers(0, 256, size=(m, DATA_FINGERPRINT_BYTES), dtype=np.uint8)
        columns = {
            "campaign_id": pa.array(ids, pa.string()),
            "bits": pa.array(real_bits[pick].astype(np.int8)),
            "shape": shape,
            "group_size": pa.array(np.full(m, group, np.int32)),
            "packed": pa.array(packed, pa.binary()),
            "scales": pa.array(scales, pa.binary()),
            "mask": pa.nulls(m, pa.binary()),
            "teacher_sha256": pa.array([h.tobytes() for h in teacher_hashes], pa.binary()),
            "data_fingerprint": pa.array([h.tobytes() for h in data_hashes], pa.binary()),
        }
        columns.update({f.name: real[f.name].take(pa.array(pick)) for f in HEADS_SCHEMA if f.name not in columns})
        yield pa.table({f.name: columns[f.name].cast(f.type) for f in HEADS_SCHEMA}, schema=HEADS_SCHEMA)


def write_simulated_version(
    count: int, version: FleetVersion, store: str, stamp: str, seed: int
) -> tuple[str, float, float, dict]:
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
        count, version, os.path.abspath(os.path.join(cfg.out, "scale-store")), stamp, cfg.compress.seed + count
    )
    heads_bytes = sum(f["bytes"] for p, f in files.items() if p.startswith("heads/"))
    console.print(f"scale {count:,}: probing cold lookups in a fresh process")
    probe = run_in_fresh_process("cold", [manifest_uri, cfg.cold_requests, cfg.compress.seed, count], timeout=1800)
    return {
        "simulated": True,
        "campaigns": count,
        "heads_bytes": heads_bytes,
        "bytes_per_campaign": heads_bytes / count,
        "backbone_bytes": files["backbone.safetensors"]["bytes"],
        "parts": sum(1 for p in files if p.startswith("heads/")),
        "generate_seconds": generate_s,
        "build_seconds": build_s,
        "open_seconds": probe["open_s"],
        "open_verify_seconds": probe["open_verify_s"],
        "cold": _latencies(probe["lat"]),
        "rss_mb": probe["rss_after"].get("VmRSS"),
        "peak_rss_mb": probe["rss_after"].get("VmHWM"),
        "rss_before_open_mb": probe["rss_before_open"].get("VmRSS"),
        "manifest_uri": manifest_uri,
        "note": "SIMULATED heads (real shape, real bit mix, real backbone, real store format); "
        "served by FleetModel (heads='lru') in a fresh subprocess; cold = random campaigns, cache misses",
    }
