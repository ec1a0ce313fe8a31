"""Per-campaign CPU cost of each `fleet compress` stage, for sizing the nightly cluster (docs/operations.md).

    python infra/sizing/measure_stage_costs.py --fleet-dir fleet-data/n200 [--backbone-steps 200] [--out costs.json]

Runs the stage functions of fleet.run.stages directly in this one process with ONE torch thread (the
pipeline runs one thread per CPU a task holds), over the whole fleet in batches of 25 campaigns,
with the default CompressConfig. Reports wall and process CPU seconds: on a shared machine the wall
time is inflated by other load, the CPU time much less so, and CPU time is what a cluster must supply.
Stage 2 is run for --backbone-steps steps only; its cost per step times ``backbone_steps`` is the
fixed cost of a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import pyarrow as pa
import torch

from fleet.formats.events import EventsDataset
from fleet.formats.teachers import list_teacher_campaigns
from fleet.run import stages
from fleet.run.stages import ShardJob


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def measure(fleet_dir: str, backbone_steps: int, batch: int = 25) -> dict:
    """Wall and CPU seconds of stages 1-3 over the fleet under ``fleet_dir`` (events/ + teachers/)."""
    torch.set_num_threads(1)
    root = os.path.abspath(fleet_dir)
    teachers, events = f"{root}/teachers", f"{root}/events"
    campaigns = list_teacher_campaigns(teachers)
    with open(f"{teachers}/{campaigns[0]}/config.json") as f:
        teacher = json.load(f)
    config = stages.CompressConfig()
    ctx = stages.StageContext(teachers, events, config, teacher["num_event_types"], teacher["num_features"])
    num = len(campaigns)
    batches = [campaigns[i:i + batch] for i in range(0, num, batch)]
    quotas = stages.backbone_quotas(EventsDataset(events).campaign_sizes(), config)
    out: dict = {"fleet_dir": root, "campaigns": num, "teacher": teacher, "stage1": [], "stage3": []}

    softs, statuses, samples = [], [], []
    for names in batches:  # stage 1 (+ the backbone sample, as the pipeline's stage-1 task does)
        w, c = _clock()
        soft, status = stages.soft_labels(ShardJob(names), ctx)
        ok = [x for x, s in zip(status["campaign_id"].to_pylist(), status["status"].to_pylist()) if s == "ok"]
        samples.append(stages.backbone_sample(soft, {x: quotas[x] for x in ok}, config.seed))
        w2, c2 = _clock()
        out["stage1"].append({"campaigns": len(names), "rows": soft.num_rows, "wall": w2 - w, "cpu": c2 - c})
        softs.append(soft)
        statuses.append(status)
        print("stage 1", out["stage1"][-1], flush=True)

    sample = pa.concat_tables(samples)  # stage 2, shortened to backbone_steps
    short = dataclasses.replace(ctx, config=dataclasses.replace(config, backbone_steps=backbone_steps))
    w, c = _clock()
    backbone, stats = stages.train_backbone(sample, short)
    w2, c2 = _clock()
    out["backbone"] = {"steps": stats["backbone_steps"], "rows": sample.num_rows, "wall": w2 - w, "cpu": c2 - c,
                       "default_steps": config.backbone_steps}
    print("stage 2", out["backbone"], flush=True)

    for soft, status in zip(softs, statuses):  # stages 3-5
        rows = [r for r in status.to_pylist() if r["status"] == "ok"]
        job = ShardJob([r["campaign_id"] for r in rows],
                       hashes={r["campaign_id"]: [r["teacher_sha256"], r["data_fingerprint"]] for r in rows})
        w, c = _clock()
        stages.fit_heads_shard(job, ctx, soft, backbone)
        w2, c2 = _clock()
        out["stage3"].append({"campaigns": len(rows), "wall": w2 - w, "cpu": c2 - c})
        print("stage 3", out["stage3"][-1], flush=True)

    sequences = sum(x["rows"] for x in out["stage1"])
    out["soft_labelled_sequences"] = sequences
    for key in ("stage1", "stage3"):
        n = sum(x["campaigns"] for x in out[key])
        cpu = sum(x["cpu"] for x in out[key])
        out[f"{key}_cpu_seconds"] = cpu
        out[f"{key}_wall_seconds"] = sum(x["wall"] for x in out[key])
        out[f"{key}_cpu_seconds_per_campaign"] = cpu / n
        out[f"{key}_cpu_ms_per_sequence"] = 1000 * cpu / sequences
    per_step = out["backbone"]["cpu"] / out["backbone"]["steps"]
    out["backbone_cpu_seconds_per_step"] = per_step
    out["backbone_cpu_seconds_default_steps"] = per_step * config.backbone_steps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fleet-dir", required=True, help="a `fleet synth` output (events/ and teachers/)")
    parser.add_argument("--backbone-steps", type=int, default=200, help="stage-2 steps to time (default: %(default)s)")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    result = measure(args.fleet_dir, args.backbone_steps)
    summary = {k: v for k, v in result.items() if not isinstance(v, list)}
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
