"""Refit stage 3 (heads, quantization, fidelity) of a finished run under other settings, reusing its
soft labels and backbone from the work dir: a cheap way to compare head settings on one fleet.

    python jobs/sweep_heads.py --store fleet-data/store --fleet n200 --run-id n200-full \\
        --teachers fleet-data/n200/teachers --events fleet-data/n200/events \\
        '{"bits": 16, "head_l2": 0.01}' '{"bits": 16, "head_l2": 1.0}' '{"bits": "auto"}'

Each JSON argument overrides CompressConfig fields; one line of fleet fidelity figures per variant.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from fleet.compression.metrics import fleet_summary
from fleet.run.plan import Plan
from fleet.run.stages import CompressConfig, StageContext, fit_heads_shard
from fleet.storage.store import RunDir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("--store", "--fleet", "--run-id", "--teachers", "--events"):
        parser.add_argument(flag, required=True)
    parser.add_argument("variants", nargs="+", help="JSON objects of CompressConfig overrides")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run_dir = RunDir(args.store, args.fleet, args.run_id)
    plan, backbone = Plan.read(run_dir), run_dir.read_backbone()
    table = run_dir.campaigns.read_all(plan.shards)
    hashes = {
        c: [t, d]
        for c, t, d in zip(*(table[k].to_pylist() for k in ("campaign_id", "teacher_sha256", "data_fingerprint")))
        if t
    }
    for variant in args.variants:
        overrides = json.loads(variant)
        config = CompressConfig.from_dict({**plan.config, **overrides})
        ctx = StageContext(args.teachers, args.events, config, plan.num_event_types, plan.num_features)
        started, rows = time.perf_counter(), []
        for job in plan.head_jobs(hashes, done=set()):
            rows += fit_heads_shard(job, ctx, run_dir.soft_labels.read(job.shard), backbone).to_pylist()
        summary = fleet_summary(
            [
                {
                    "campaign_id": r["campaign_id"],
                    "mean_abs_diff": r["mean_abs_diff"],
                    "auc_diff": None if r["student_auc"] is None else r["student_auc"] - r["teacher_auc"],
                }
                for r in rows
            ]
        )
        print(
            f"{overrides}  {time.perf_counter() - started:.0f}s  AUC diff median {summary['median']:+.4f} "
            f"p10 {summary['p10']:+.4f}  mean|p_s-p_t| median {summary['mean_abs_diff_median']:.4f}  "
            f"campaigns with AUC {len(rows) - summary['no_auc']}/{len(rows)}  "
            f"mean bits {np.mean([r['bits'] for r in rows]):.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
