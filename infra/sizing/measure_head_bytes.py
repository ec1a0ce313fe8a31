"""Bytes on storage per campaign of the heads, at each bit width and at a version's own bit mix, for
sizing the store (docs/storage.md).

    python infra/sizing/measure_head_bytes.py --manifest STORE/FLEET/versions/ID/manifest.json [--campaigns 10000]

The version's heads are re-quantized at each forced width (8, 4, 2, 1 bits; group size 64), then
``--campaigns`` SIMULATED heads are drawn from them exactly as ``fleet bench``'s scale test does
(:func:`fleet.bench.simulated.simulated_heads`: a real head plus noise, random hashes) and written with the
store's Parquet settings (:class:`fleet.storage.store.VersionWriter`). Prints all heads Parquet bytes / N.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import pyarrow as pa
import pyarrow.compute as pc

from fleet.bench.simulated import simulated_heads
from fleet.compression.quant import quantize_rows
from fleet.formats.codec import table_to_heads
from fleet.formats.heads import decode_heads
from fleet.storage.store import FleetVersion, VersionWriter

GROUP_SIZE = 64


def at_bits(real: pa.Table, bits: int) -> pa.Table:
    """``real`` with every head re-quantized at ``bits`` (from its decoded values)."""
    quantized = quantize_rows(decode_heads(table_to_heads(real)).float(), bits, GROUP_SIZE)
    columns = {"bits": pa.array([bits] * real.num_rows, pa.int8()),
               "group_size": pa.array([GROUP_SIZE] * real.num_rows, pa.int32()),
               "packed": pa.array([v.packed for v in quantized], pa.binary()),
               "scales": pa.array([v.scales for v in quantized], pa.binary())}
    for name, column in columns.items():
        real = real.set_column(real.column_names.index(name), name, column)
    return real


def heads_bytes_per_campaign(real: pa.Table, campaigns: int, seed: int = 0) -> float:
    """All heads Parquet bytes / ``campaigns`` for simulated heads drawn from ``real``."""
    heads = pa.concat_tables(list(simulated_heads(campaigns, real, seed)))
    with tempfile.TemporaryDirectory() as tmp:
        writer = VersionWriter(tmp, "sizing", "v")
        writer.write_heads(heads)
        return sum(f["bytes"] for path, f in writer.files.items() if path.startswith("heads/")) / campaigns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="manifest.json URI of a fleet version")
    parser.add_argument("--campaigns", type=int, default=10_000)
    args = parser.parse_args()
    real = FleetVersion.open(args.manifest).read_heads()
    result = {"version_bit_mix": {str(r["values"]): r["counts"] for r in pc.value_counts(real["bits"]).to_pylist()},
              "campaigns": args.campaigns, "bytes_per_campaign": {}}
    for bits in (8, 4, 2, 1):
        result["bytes_per_campaign"][str(bits)] = round(heads_bytes_per_campaign(at_bits(real, bits), args.campaigns), 1)
    result["bytes_per_campaign"]["version mix"] = round(heads_bytes_per_campaign(real, args.campaigns), 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
