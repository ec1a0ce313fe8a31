"""Where the time of a serving request goes (issue 12 section 4): CPU time and best wall time of each part of
``FleetModel.score_campaigns`` (1 sequence x 1,000 random campaigns) and of ``predict`` (short and long
sequences), on a version written by ``fleet bench --serving-only`` (its SIMULATED version and the sequences
it drew).

    python infra/sizing/profile_serving_parts.py --model OUT/scale-store/sim-1000000/versions/<id>/manifest.json \\
        --sequences OUT/serving-sequences.json

Each part runs 300 times after 20 warm-up calls (5 for scoring every campaign); CPU time (``time.process_time``,
mean per call) is the figure that a busy machine inflates least; the best wall time is given next to it.
Run with ``OPENBLAS_NUM_THREADS=1`` (one thread, as the targets). Prints one line per part.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from fleet.compression.student import head_logits_cross
from fleet.serve.serving import FleetModel, _distinct_ids


def _time(fn, n: int = 300) -> str:
    for i in range(min(n, 20)):
        fn(i)
    best, cpu0 = 1e9, time.process_time()
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        best = min(best, time.perf_counter() - t0)
    return f"cpu mean {(time.process_time() - cpu0) / n * 1e3:.3f} ms, best wall {best * 1e3:.3f} ms"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a version with campaigns sim-00000000 ... (fleet bench's SIMULATED one)")
    p.add_argument("--sequences", required=True, help="serving-sequences.json written by fleet bench --serving-only")
    p.add_argument("--k", type=int, default=1000, help="campaigns per score_campaigns request")
    args = p.parse_args()
    model = FleetModel.open(args.model, verify=False, num_threads=1)
    count = model.num_campaigns
    with open(args.sequences) as f:
        drawn = json.load(f)
    seqs = [(np.asarray(t), np.asarray(f, dtype=np.float32), t, f) for t, f in drawn]
    short = [s for s in seqs if len(s[0]) <= 20] or seqs
    long = [s for s in seqs if len(s[0]) >= 90] or seqs
    rng = np.random.default_rng(0)
    requests = [[f"sim-{j:08d}" for j in rng.choice(count, size=min(args.k, count), replace=False)] for _ in range(50)]
    encoded = [_distinct_ids(r)[1] for r in requests]
    rows = [model._table.find(e) for e in encoded]
    heads = model._resident_heads(rows[0])
    h = model._features([short[0][0]], [short[0][1]])

    def body(s):
        return {"event_types": s[2], "features": s[3]}

    print(f"{count:,} campaigns; sequences: {len(short)} of T <= 20, {len(long)} of T >= 90")
    print("predict, T <= 20:", _time(lambda i: model.predict("sim-00000003", [body(short[i % len(short)])])))
    print("predict, T >= 90:", _time(lambda i: model.predict("sim-00000003", [body(long[i % len(long)])])))
    print(f"score_campaigns 1 x {args.k}:", _time(lambda i: model.score_campaigns(body(seqs[i % len(seqs)]), requests[i % 50])))
    print("  ids: check + dedupe:", _time(lambda i: _distinct_ids(requests[i % 50])))
    print("  ids: binary search in the table:", _time(lambda i: model._table.find(encoded[i % 50])))
    print(f"  decode {args.k} heads:", _time(lambda i: model._resident_heads(rows[i % 50])))
    print(f"  head formulas 1 x {args.k}:", _time(lambda i: head_logits_cross(model.head_config.head, h, heads, 1)))
    print("  backbone, T <= 20:", _time(lambda i: model._features([short[i % len(short)][0]], [short[i % len(short)][1]])))
    print("  backbone, T >= 90:", _time(lambda i: model._features([long[i % len(long)][0]], [long[i % len(long)][1]])))
    print("score_campaigns 1 x every campaign, top 10:", _time(lambda i: model.score_campaigns(body(seqs[i % len(seqs)]), top_k=10), n=5))


if __name__ == "__main__":
    main()
