"""``fleet bench --zoo``: fidelity on a zoo of differently built fleets, not on one.

Every (generator x teacher class) pair of :mod:`fleet.synthetic.zoo` is made into a synthetic fleet with
``fleet synth`` (kept and resumed under ``--fleet-dir``), compressed with ``fleet compress``'s
configuration (the defaults unless ``--config``) and judged by :func:`evaluate_run`, which scores what
is *served* (``FleetModel`` on the committed version) against the teacher: on ``--zoo-fresh-rows`` fresh
sequences of every campaign (new draws of its generator that no teacher or student saw; the headline
figures), and on the run's hold-out rows against the teacher logits stage 1 wrote to the work dir (kept
under ``"holdout"``). The evaluation depends only on the store layout and the fleet, so it also judges
versions written by an older fleet (the "before" column of a change).

Outputs under ``--out``: ``zoo.json`` (every figure) and ``zoo.md`` (the table of docs/benchmarks.md).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import torch

from fleet.compression.data import map_minibatches
from fleet.compression.metrics import campaign_fidelity, fleet_summary
from fleet.core.errors import StoreError
from fleet.formats.events import EventsDataset, table_to_batch
from fleet.formats.teachers import load_teacher
from fleet.run import pipeline, stages
from fleet.run.plan import Plan
from fleet.serve.serving import FleetModel
from fleet.storage.store import FleetVersion, RunDir
from fleet.synthetic.synth import ZOO_LOADER, SynthConfig, entity_id, generate

#: Teachers of the zoo: small enough that 9 fleets of 60 campaigns train on 2 cores in minutes.
ZOO_TEACHER = {"hidden_size": 64, "num_layers": 1, "arch": "lstm"}
#: Campaign sizes of the zoo's fleets (the first-hour report: 30 campaigns of 100-3,000 rows).
ZOO_SIZES = {"min_sequences": 100, "max_sequences": 3000}
#: Fresh sequences per campaign the zoo is judged on (``--zoo-fresh-rows``): at the zoo's lowest base rate
#: (1%) about 20 positives, so every campaign has an AUC (its hold-out rows give one to 15-16 of 60).
ZOO_FRESH_ROWS = 2000

#: Issue 16's targets, per pair: (metric key of :func:`evaluate_run`, comparison, bound).
TARGETS = (
    ("auc_diff_median", ">=", 0.0),
    ("auc_diff_p10", ">=", -0.01),
    ("auc_diff_worst", ">=", -0.05),
    ("auc_diff_volume_weighted", ">=", -0.005),
    ("top_decile_auc_diff_median", ">=", -0.005),
    ("mean_ratio_within_10pct_share", ">=", 0.9),
    ("ece_excess_median", "<=", 0.01),
)


def synth_config(generator: str, teacher: str, campaigns: int, seed: int) -> SynthConfig:
    """The zoo fleet of one (generator, teacher class) pair."""
    return SynthConfig(campaigns=campaigns, seed=seed, generator=generator, teacher=teacher, **ZOO_TEACHER, **ZOO_SIZES)


@dataclass(frozen=True)
class FreshRows:
    """Where the fresh sequences of a zoo fleet come from: its generator and its teachers."""

    synth: SynthConfig
    teachers_uri: str
    allow_loaders: tuple[str, ...]
    rows: int  # per campaign


def evaluate_run(
    store_uri: str, fleet: str, run_id: str, events_uri: str, min_per_class: int = 10, fresh: FreshRows | None = None
) -> dict:
    """Fidelity of the committed version of ``run_id``: what ``FleetModel`` serves against the teacher.

    With ``fresh``, the headline figures are on ``fresh.rows`` new sequences of every campaign
    (:func:`fresh_fidelity`) and the hold-out figures go under ``"holdout"``; without it, the headline
    figures are the hold-out ones: every campaign's hold-out rows against the teacher logits of the run's
    stage 1. Figures: :func:`fleet.compression.metrics.fleet_summary` (volume = the campaign's event rows), the worst
    AUC diff, the verdict counts (heads ``status``), the bytes per campaign (heads Parquet / N and the
    distribution of a head row's bytes) and the run's time over its floor.
    """
    run_dir = RunDir(store_uri, fleet, run_id)
    plan = Plan.read(run_dir)
    version = FleetVersion.open(f"{store_uri.rstrip('/')}/{fleet}/versions/{run_id}/manifest.json")
    model = FleetModel.open(version.uri, preload=True)
    soft = run_dir.soft_labels.read_all(plan.shards)
    hold = soft.filter(pa.compute.equal(soft["split"], stages.HOLDOUT))
    heads = version.read_heads()
    status = dict(zip(heads["campaign_id"].to_pylist(), heads["status"].to_pylist()))
    sizes = plan.sizes or EventsDataset(events_uri).campaign_sizes()
    campaigns = sorted(status)
    tables = EventsDataset(events_uri).read_campaigns(campaigns)
    by_campaign = {c: hold.filter(pa.compute.equal(hold["campaign_id"], c)) for c in campaigns}
    holdout = {}
    for campaign_id in campaigns:
        mine = by_campaign[campaign_id]
        events = tables[campaign_id].take(mine["row"])
        p_student = model.predict_columns(
            campaign_id, events["event_types"].to_pylist(), events["features"].to_pylist()
        )
        p_teacher = 1.0 / (1.0 + np.exp(-mine["teacher_logit"].to_numpy().astype(np.float64)))
        holdout[campaign_id] = campaign_fidelity(p_student, p_teacher, mine["label"].to_numpy(), min_per_class)

    def figures(fidelity: dict[str, dict]) -> dict:
        rows = [{**fidelity[c], "campaign_id": c, "n_rows": int(sizes[c]), "status": status[c]} for c in campaigns]
        summary = fleet_summary(rows)
        worst = summary["worst"][0]["auc_diff"] if summary["worst"] else None
        return {
            **{k: v for k, v in summary.items() if k not in ("median", "p10", "worst")},
            "auc_diff_median": summary["median"],
            "auc_diff_p10": summary["p10"],
            "auc_diff_worst": worst,
            "worst_campaigns": summary["worst"],
            "campaigns": rows,
        }

    row_bytes = [
        len(p) + len(s) + (len(m) if m else 0)
        for p, s, m in zip(*(heads[k].to_pylist() for k in ("packed", "scales", "mask")))
    ]
    metrics = version.manifest["metrics"]
    out = {
        "evaluated_on": f"{fresh.rows} fresh sequences per campaign" if fresh else "hold-out rows",
        **figures(fresh_fidelity(model, fresh, campaigns, min_per_class) if fresh else holdout),
        "bytes_per_campaign": metrics.get("bytes_per_campaign"),
        "head_row_bytes_p50_p90_max": [
            float(np.percentile(row_bytes, 50)),
            float(np.percentile(row_bytes, 90)),
            float(max(row_bytes)),
        ]
        if row_bytes
        else None,
        "run_over_floor": metrics.get("run_over_floor"),
        "stage_seconds": pipeline.stage_seconds(metrics),
    }
    if fresh:
        out["holdout"] = figures(holdout)
    return out


def fresh_fidelity(model: FleetModel, fresh: FreshRows, campaigns: list[str], min_per_class: int) -> dict[str, dict]:
    """:func:`fleet.compression.metrics.campaign_fidelity` of every campaign on ``fresh.rows`` fresh sequences of it
    (:func:`fleet.synthetic.synth.generate` with ``fresh_rows``: the campaign's parameters, new draws), the teacher
    (loaded as stage 1 loads it, its loader allowed as the run's) and the served student both scoring them."""
    index = {entity_id(fresh.synth, i): i for i in range(fresh.synth.campaigns)}
    out = {}
    for campaign_id in campaigns:
        table = generate(fresh.synth, index[campaign_id], fresh.rows)
        teacher = load_teacher(fresh.teachers_uri, campaign_id, allow_loaders=fresh.allow_loaders)
        with torch.no_grad():
            logits = map_minibatches(teacher.model, table_to_batch(table, fresh.synth.num_features)).double().numpy()
        p_student = model.predict_columns(campaign_id, table["event_types"].to_pylist(), table["features"].to_pylist())
        out[campaign_id] = campaign_fidelity(
            p_student, 1.0 / (1.0 + np.exp(-logits)), table["label"].to_numpy(), min_per_class
        )
    return out


def _committed(store: str, fleet: str, run_id: str) -> bool:
    try:
        FleetVersion.open(f"{store}/{fleet}/versions/{run_id}/manifest.json")
    except StoreError:
        return False
    return True


def check_targets(result: dict) -> list[str]:
    """Names of the targets of :data:`TARGETS` that ``result`` misses (a missing figure is a miss)."""
    missed = []
    for key, op, bound in TARGETS:
        value = result.get(key)
        ok = value is not None and (value >= bound if op == ">=" else value <= bound)
        if not ok:
            missed.append(key)
    return missed


def run_zoo(
    *,
    out: str,
    fleet_dir: str,
    generators: list[str],
    teachers: list[str],
    campaigns: int,
    seed: int,
    config: stages.CompressConfig,
    run_id: str | None = None,
    address: str | None = None,
    fresh_rows: int = ZOO_FRESH_ROWS,
    log=print,
) -> dict:
    """Make (or reuse) every pair's fleet, compress it, evaluate it; write ``zoo.json`` and ``zoo.md``.

    ``run_id`` names every pair's run (default: a timestamp). A pair whose version ``run_id`` is already
    committed in ``out/store`` is evaluated as it is, not compressed again: a zoo run resumes, and a version
    written by another fleet build (``fleet compress --run-id ID --store OUT/store --fleet zoo-<pair>``)
    is judged by the same evaluation. ``fresh_rows``: fresh sequences per campaign to judge on (0: the
    hold-out rows only)."""
    os.makedirs(out, exist_ok=True)
    store, tracking = os.path.abspath(f"{out}/store"), f"sqlite:///{os.path.abspath(out)}/mlflow.db"
    results = {
        "command": " ".join(sys.argv),
        "campaigns": campaigns,
        "seed": seed,
        "fresh_rows": fresh_rows,
        "config": config.to_dict(),
        "pairs": [],
    }
    started = time.perf_counter()
    with pipeline.ray_session(address):
        for generator in generators:
            for teacher in teachers:
                name = f"{generator}-{teacher}"
                synth = synth_config(generator, teacher, campaigns, seed)
                t0 = time.perf_counter()
                made = pipeline.run_synth(synth, os.path.abspath(f"{fleet_dir}/{name}"))
                synth_seconds = time.perf_counter() - t0
                pair_run = run_id or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
                gate = None
                if not _committed(store, f"zoo-{name}", pair_run):
                    result = pipeline.run_compress(
                        teachers_uri=made["teachers_uri"],
                        events_uri=made["events_uri"],
                        store_uri=store,
                        fleet=f"zoo-{name}",
                        config=config,
                        run_id=pair_run,
                        tracking_uri=tracking,
                        retrain_backbone=True,
                    )
                    gate = result.registered.gate if result.registered is not None else None
                fresh = (
                    FreshRows(synth, made["teachers_uri"], tuple(config.allow_loaders), fresh_rows)
                    if fresh_rows
                    else None
                )
                evaluation = evaluate_run(
                    store, f"zoo-{name}", pair_run, made["events_uri"], config.min_auc_class_count, fresh
                )
                pair = {
                    "generator": generator,
                    "teacher": teacher,
                    "run_id": pair_run,
                    "synth_seconds": synth_seconds,
                    "promoted": None if gate is None else bool(gate.passed),
                    "gate_reasons": None if gate is None else gate.reasons,
                    **evaluation,
                }
                pair["missed_targets"] = check_targets(pair)
                results["pairs"].append(pair)
                log(f"zoo {name}: " + _line(pair))
                results["seconds"] = time.perf_counter() - started
                _write_results(out, results)  # after every pair: an interrupted zoo keeps what it measured
    return results


def _write_results(out: str, results: dict) -> None:
    with open(f"{out}/zoo.json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(f"{out}/zoo.md", "w") as f:
        f.write(render_table(results["pairs"]))


def _f(value, spec: str = "+.4f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _line(pair: dict) -> str:
    return (
        f"AUC diff median {_f(pair['auc_diff_median'])} p10 {_f(pair['auc_diff_p10'])} "
        f"worst {_f(pair['auc_diff_worst'])} vw {_f(pair['auc_diff_volume_weighted'])} "
        f"top10% {_f(pair['top_decile_auc_diff_median'])} ratio-ok {_f(pair['mean_ratio_within_10pct_share'], '.2f')} "
        f"ECE+ {_f(pair['ece_excess_median'])} worse-95% {pair.get('auc_significantly_worse', 'n/a')} missed {pair['missed_targets'] or 'none'}"
    )


def render_table(pairs: list[dict]) -> str:
    """The zoo table: one row per (generator, teacher class)."""
    head = (
        "| generator | teacher | campaigns (with AUC) | AUC diff median / p10 / worst | significantly worse | "
        "volume-weighted | "
        "largest 10% median | mean ratio within 10% | ECE excess median | KL median | verdicts | "
        "B / campaign | run / floor | targets missed |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|\n"
    )
    lines = []
    for p in pairs:
        verdicts = ", ".join(f"{k} {v}" for k, v in sorted((p.get("status_counts") or {}).items()))
        lines.append(
            f"| {p['generator']} | {p['teacher']} | {p['n_campaigns']} ({p['n_with_auc']}) | "
            f"{_f(p['auc_diff_median'])} / {_f(p['auc_diff_p10'])} / {_f(p['auc_diff_worst'])} | "
            f"{p.get('auc_significantly_worse', 'n/a')} | "
            f"{_f(p['auc_diff_volume_weighted'])} | {_f(p['top_decile_auc_diff_median'])} "
            f"({p.get('top_decile_n_with_auc')}) | {_f(p['mean_ratio_within_10pct_share'], '.2f')} | "
            f"{_f(p['ece_excess_median'])} | {_f(p['kl_median'], '.4f')} | {verdicts} | "
            f"{_f(p['bytes_per_campaign'], '.0f')} | {_f(p['run_over_floor'], '.2f')} | "
            f"{', '.join(p['missed_targets']) or 'none'} |"
        )
    return head + "\n".join(lines) + "\n"


#: Columns of :func:`render_comparison`: (metric key of :func:`evaluate_run`, format, higher is better).
COMPARED = (
    ("auc_diff_median", "+.4f", True),
    ("auc_diff_p10", "+.4f", True),
    ("auc_diff_worst", "+.4f", True),
    ("auc_diff_volume_weighted", "+.4f", True),
    ("top_decile_auc_diff_median", "+.4f", True),
    ("mean_ratio_within_10pct_share", ".2f", True),
    ("ece_excess_median", "+.4f", False),
    ("kl_median", ".4f", False),
    ("kl_p90", ".4f", False),
)


def render_comparison(runs: list[tuple[str, dict]]) -> str:
    """Zoo runs side by side (``runs``: (name, zoo.json dict)): per pair, then the mean over pairs of each
    metric and, for every run after the first, on how many pairs it does better than the first."""
    names = [k for k, _, _ in COMPARED]
    out = [
        "| pair | run | " + " | ".join(names) + " | verdicts | head row B p50 |",
        "|---|---|" + "---:|" * len(names) + "---|---:|",
    ]
    by_pair = [{(p["generator"], p["teacher"]): p for p in r["pairs"]} for _, r in runs]
    pairs = [k for k in by_pair[0] if all(k in b for b in by_pair)]
    for key in pairs:
        for (name, _), mine in zip(runs, by_pair):
            p = mine[key]
            verdicts = ", ".join(f"{a} {b}" for a, b in sorted((p.get("status_counts") or {}).items()))
            row_bytes = p.get("head_row_bytes_p50_p90_max") or [None]
            out.append(
                f"| {key[0]}-{key[1]} | {name} | "
                + " | ".join(_f(p[k], f) for k, f, _ in COMPARED)
                + f" | {verdicts} | {_f(row_bytes[0], '.0f')} |"
            )
    out += ["", "| run | " + " | ".join(f"mean {k}" for k in names) + " |", "|---|" + "---:|" * len(names)]
    for (name, _), mine in zip(runs, by_pair):
        means = [
            np.mean([v for v in (mine[key][k] for key in pairs) if v is not None] or [math.nan]) for k, _, _ in COMPARED
        ]
        out.append(f"| {name} | " + " | ".join(_f(float(m), f) for m, (_, f, _) in zip(means, COMPARED)) + " |")
    if len(runs) > 1:
        out += ["", f"| run | pairs on which it does better than {runs[0][0]}, per metric |", "|---|---|"]
        for (name, _), mine in list(zip(runs, by_pair))[1:]:
            counts = []
            for k, _, higher in COMPARED:
                both = [
                    (by_pair[0][key][k], mine[key][k])
                    for key in pairs
                    if by_pair[0][key][k] is not None and mine[key][k] is not None
                ]
                wins = sum((b > a) if higher else (b < a) for a, b in both)
                counts.append(f"{k} {wins}/{len(both)}")
            out.append(f"| {name} | {'; '.join(counts)} |")
        out += [
            "",
            (
                f"Paired per campaign (each campaign of every pair against itself under {runs[0][0]}; mean +- "
                "standard error, share of campaigns where the run does better):"
            ),
            "",
            "| run | " + " | ".join(name for name, _ in PAIRED) + " |",
            "|---|" + "---:|" * len(PAIRED),
        ]
        for (name, _), mine in list(zip(runs, by_pair))[1:]:
            cells = []
            for _, figure in PAIRED:
                diffs = paired_differences(by_pair[0], mine, figure)
                cells.append(
                    "n/a"
                    if len(diffs) < 2
                    else f"{diffs.mean():+.4f} +- "
                    f"{diffs.std(ddof=1) / math.sqrt(len(diffs)):.4f}, better {np.mean(diffs < 0):.2f} "
                    f"(n={len(diffs)})"
                )
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _log_kl(row: dict) -> float | None:
    return None if row.get("kl") is None else math.log(max(float(row["kl"]), 1e-6))


def _ratio_error(row: dict) -> float | None:
    return None if row.get("mean_ratio") is None else abs(float(row["mean_ratio"]) - 1.0)


def _auc_loss(row: dict) -> float | None:
    return None if row.get("auc_diff") is None else -float(row["auc_diff"])


#: Per-campaign figures of the paired comparison, each oriented so that lower is better:
#: (column name, figure of one campaign row of :func:`evaluate_run`).
PAIRED = (("AUC diff (negated)", _auc_loss), ("log KL", _log_kl), ("abs(mean ratio - 1)", _ratio_error))


def paired_differences(first: dict, other: dict, figure) -> np.ndarray:
    """``figure(other's row) - figure(first's row)`` for every campaign that both runs evaluated with a
    defined figure, over the pairs both hold (``first``/``other``: (generator, teacher) -> pair result).

    A zoo fleet is made again from its seed, so both runs judge the same campaigns on the same hold-out
    rows: comparing each campaign with itself removes the campaign-to-campaign spread that makes a p10 of
    15 campaigns move by 0.015 between runs of one configuration."""
    diffs = []
    for key in first.keys() & other.keys():
        mine = {c["campaign_id"]: c for c in other[key]["campaigns"]}
        for row in first[key]["campaigns"]:
            twin = mine.get(row["campaign_id"])
            if twin is None:
                continue
            a, b = figure(row), figure(twin)
            if a is not None and b is not None:
                diffs.append(b - a)
    return np.asarray(diffs, dtype=np.float64)


def add_arguments(p) -> None:
    """``fleet bench --zoo`` flags (the rest of ``fleet bench``'s flags do not apply)."""
    g = p.add_argument_group("zoo (with --zoo)")
    g.add_argument(
        "--zoo",
        action="store_true",
        help="run every (generator x teacher class) pair of fleet.synthetic.zoo "
        "and report fidelity per pair (zoo.json, zoo.md)",
    )
    g.add_argument("--zoo-generators", default=None, help="comma-separated generators (default: all)")
    g.add_argument("--zoo-teachers", default=None, help="comma-separated teacher classes (default: all)")
    g.add_argument(
        "--zoo-compare",
        action="append",
        default=None,
        metavar="NAME=ZOO_JSON",
        help="print zoo runs side by side (per pair, means, wins over the first) and exit; repeatable (default: none)",
    )
    g.add_argument(
        "--zoo-run-id",
        default=None,
        help="run id of every pair (default: a timestamp); a pair already committed under it is "
        "evaluated, not compressed again",
    )
    g.add_argument(
        "--zoo-fresh-rows",
        type=int,
        default=ZOO_FRESH_ROWS,
        help="fresh sequences per campaign (new draws of its generator, seen by no teacher or student) "
        "the figures are measured on; 0: the run's hold-out rows only (default: %(default)s)",
    )


def run_from_args(args, config: stages.CompressConfig, log) -> int:
    """Entry point of ``fleet bench --zoo``; exit 0 when every pair meets every target, 1 when one misses,
    2 on a usage error."""
    from fleet.synthetic.zoo import GENERATORS, TEACHERS

    if args.zoo_compare:
        runs = []
        for spec in args.zoo_compare:
            name, sep, path = spec.partition("=")
            if not sep or not os.path.isfile(path):
                print(f"fleet bench: --zoo-compare {spec!r}: expected NAME=PATH of a zoo.json", file=sys.stderr)
                return 2
            with open(path) as f:
                runs.append((name, json.load(f)))
        sys.stdout.write(render_comparison(runs))
        return 0
    if args.zoo_fresh_rows < 0:
        print("fleet bench: --zoo-fresh-rows must be >= 0", file=sys.stderr)
        return 2
    generators = args.zoo_generators.split(",") if args.zoo_generators else list(GENERATORS)
    teachers = args.zoo_teachers.split(",") if args.zoo_teachers else list(TEACHERS)
    for name, known, flag in ((generators, GENERATORS, "--zoo-generators"), (teachers, TEACHERS, "--zoo-teachers")):
        unknown = sorted(set(name) - set(known))
        if unknown:
            print(f"fleet bench: {flag}: unknown {unknown}; known: {sorted(known)}", file=sys.stderr)
            return 2
    # the zoo's teacher classes come through the loader hook as a user's would: allowed like a user's
    config = replace(
        config, allow_loaders=[*config.allow_loaders, *([] if ZOO_LOADER in config.allow_loaders else [ZOO_LOADER])]
    )
    results = run_zoo(
        out=args.out,
        fleet_dir=args.fleet_dir or "fleet-data/zoo",
        generators=generators,
        teachers=teachers,
        campaigns=args.campaigns,
        seed=args.seed,
        config=config,
        run_id=args.zoo_run_id,
        address=args.address,
        fresh_rows=args.zoo_fresh_rows,
        log=log,
    )
    return 0 if all(not p["missed_targets"] for p in results["pairs"]) else 1
