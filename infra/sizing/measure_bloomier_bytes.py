"""Bytes on storage, weight error and read cost per head of the ``bloomier`` codec (Weightless) against packed
int4 and ternary, on the same heads, WITHOUT re-training (the re-training step needs the teachers' data: run
``fleet bench`` for fidelity). For sizing and for choosing ``bloomier_*`` settings (docs/quantization.md).

    python infra/sizing/measure_bloomier_bytes.py --gaussian 4096                # N(0, 0.3) heads, P = 193
    python infra/sizing/measure_bloomier_bytes.py --manifest STORE/FLEET/versions/ID/manifest.json

Each head set is written with the store's Parquet settings (:class:`fleet.storage.store.VersionWriter`, blocks of 1024
rows) and read back as serving does (:func:`fleet.bench.methods.head_latencies`). Prints JSON: per codec setting the
heads Parquet bytes / N, the median relative weight error ``||decoded - head|| / ||head||``, the per-head decode
and cold-lookup latency (ms) and, for bloomier, the encode time of one block.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time

import numpy as np
import torch

from fleet.bench.methods import head_latencies
from fleet.compression.quant import dequantize_rows, quantize_rows
from fleet.compression.weightless import decode_encoded, encode_block
from fleet.formats.codec import heads_to_table, table_to_heads
from fleet.formats.heads import bloomier_head_row, decode_heads, head_row
from fleet.storage.store import FleetVersion, VersionWriter

BLOCK = 1024
SETTINGS = [(0.5, 3, 5), (0.7, 3, 5), (0.8, 2, 4), (0.9, 3, 5)]  # (sparsity, value bits, check bits)


def _fields(cid: str) -> dict:
    return {"teacher_sha256": hashlib.sha256(b"t" + cid.encode()).digest(),
            "data_fingerprint": hashlib.sha256(b"d" + cid.encode()).digest()[:16], "status": "ok"}


def _write(store: str, name: str, rows: list, ids: list[str]) -> dict:
    writer = VersionWriter(store, "measure", name)
    writer.write_backbone({"x": torch.zeros(1)})
    writer.write_heads(heads_to_table(rows))
    uri = writer.commit()
    heads_bytes = sum(f["bytes"] for p, f in writer.files.items() if p.startswith("heads/"))
    lat = head_latencies(uri, ids, count=200)
    return {"bytes_per_campaign": heads_bytes / len(ids), "decode_p50_ms": lat["decode"]["p50_ms"],
            "cold_lookup_p50_ms": lat["cold_lookup"]["p50_ms"], "cold_lookup_p99_ms": lat["cold_lookup"]["p99_ms"],
            "decode_all_per_head_ms": lat["decode_all_per_head_ms"]}


def _error(decoded: np.ndarray, heads: np.ndarray) -> float:
    return float(np.median(np.linalg.norm(decoded - heads, axis=1) / np.linalg.norm(heads, axis=1)))


def measure(heads: np.ndarray) -> dict:
    c = heads.shape[0]
    ids = [f"c{i:07d}" for i in range(c)]
    out = {}
    with tempfile.TemporaryDirectory() as store:
        for sparsity, b, r in SETTINGS:
            rows, decoded, seconds = [], [], []
            for a in range(0, c, BLOCK):
                t0 = time.perf_counter()
                enc = encode_block(heads[a : a + BLOCK], sparsity=sparsity, value_bits=b, check_bits=r)
                seconds.append(time.perf_counter() - t0)
                decoded.append(decode_encoded(enc))
                rows += [bloomier_head_row(ids[a + k], enc, k, **_fields(ids[a + k])) for k in range(enc.block.rows)]
            name = f"bloomier-s{sparsity}-b{b}-r{r}"
            out[name] = {**_write(store, name, rows, ids), "weight_error_median": _error(np.concatenate(decoded), heads),
                         "encode_seconds_per_block": float(np.median(seconds))}
        for bits, label in ((4, "packed-int4"), (2, "packed-ternary")):
            vectors = quantize_rows(torch.from_numpy(heads), bits, 64)
            rows = [head_row(ids[i], vectors[i], heads.shape[1], None, **_fields(ids[i])) for i in range(c)]
            out[label] = {**_write(store, label, rows, ids),
                          "weight_error_median": _error(dequantize_rows(vectors).numpy(), heads)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--manifest", help="a version whose decoded heads are encoded")
    group.add_argument("--gaussian", type=int, help="this many N(0, 0.3) heads of 193 parameters (bias N(-3, 1))")
    args = parser.parse_args()
    if args.manifest:
        rows = table_to_heads(FleetVersion.open(args.manifest).read_heads())
        sizes = [r.num_params for r in rows]
        common = max(set(sizes), key=sizes.count)  # the backbone's design (capacity-ladder heads are left out)
        heads = decode_heads([r for r in rows if r.num_params == common]).numpy()
    else:
        rng = np.random.default_rng(0)
        heads = (rng.normal(size=(args.gaussian, 193)) * 0.3).astype(np.float32)
        heads[:, -1] = rng.normal(-3.0, 1.0, args.gaussian)
    print(json.dumps({"campaigns": int(heads.shape[0]), "params": int(heads.shape[1]), **measure(heads)}, indent=1))


if __name__ == "__main__":
    main()
