"""``fleet bench``'s command line: its options (the parser is built in :mod:`fleet.cli.main`), and the dispatch to
the benchmark (:func:`fleet.bench.run.run_bench`), ``--serving-only``, ``--zoo`` (:mod:`fleet.bench.zoo`),
``--scale`` (:mod:`fleet.bench.scale`) and ``--write-docs`` (:func:`fleet.bench.report.write_docs`)."""

from __future__ import annotations

import glob
import json
import os
import sys
import time

from rich.table import Table

from fleet.bench.common import SERVING_THREADS, BenchConfig, machine_info
from fleet.bench.report import DOCS_PROSE, summary_table, write_docs
from fleet.bench.run import run_bench
from fleet.bench.serving import render_serving_targets, serving_targets
from fleet.bench.simulated import write_simulated_version
from fleet.core.constants import BENCH_RESULTS_FORMAT
from fleet.core.errors import UsageError
from fleet.run import stages
from fleet.storage.store import FleetVersion, json_safe
from fleet.synthetic.synth import SynthConfig


def _sizes(text: str) -> tuple[int, ...]:
    import argparse

    try:
        values = tuple(int(v.replace("_", "")) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scale-campaigns must be comma-separated integers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("--scale-campaigns must be >= 0")
    return tuple(v for v in values if v > 0)


def add_arguments(p) -> None:
    """``fleet bench``'s options (the parser is built in :mod:`fleet.cli.main`)."""
    p.add_argument(
        "--campaigns",
        type=int,
        default=None,
        help="N: campaigns of the synthetic fleet (required but with --serving-only, where it has no default)",
    )
    p.add_argument(
        "--fleet-dir",
        default=None,
        help="cached synthetic fleet (events/, teachers/, synth.json); reused when its seed and shape "
        "match, created otherwise (default: OUT/fleet; --zoo: fleet-data/zoo; --scale: "
        "fleet-data/scale, a directory KIND-N per size)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output directory: results.json, results.md, PNGs, stores (no default: required but with --write-docs)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic fleet and of the compression")
    p.add_argument("--peer-subset", type=int, default=20, help="K: campaigns peer (c) is run on (then extrapolated)")
    p.add_argument(
        "--scale-campaigns",
        type=_sizes,
        default=(10_000, 1_000_000),
        help="SIMULATED fleet sizes for the scale test, comma-separated (default: 10000,1000000; 0: skip)",
    )
    g = p.add_argument_group("teachers (a fleet created by the benchmark)")
    g.add_argument("--arch", choices=["lstm", "gru"], default="lstm", help="teacher RNN cell (default: %(default)s)")
    g.add_argument("--hidden", type=int, default=None, help="teacher hidden size (default: 256; --scale: 16)")
    g.add_argument("--layers", type=int, default=None, help="teacher RNN layers (default: 2; --scale: 1)")
    g.add_argument("--min-sequences", type=int, default=None, help="smallest campaign size (default: 100; --scale: 20)")
    g.add_argument(
        "--max-sequences", type=int, default=None, help="largest campaign size (default: 20000; --scale: 300)"
    )
    g.add_argument(
        "--max-epochs", type=int, default=None, help="teacher training epochs at most (default: 12; --scale: 8)"
    )
    g = p.add_argument_group("compression (the real run and its variants)")
    g.add_argument(
        "--config",
        default=None,
        help="JSON or TOML file of CompressConfig fields (bits must stay auto; default: CompressConfig's "
        "defaults with --seed)",
    )
    g.add_argument(
        "--backbone-steps",
        type=int,
        default=None,
        help="override CompressConfig.backbone_steps (default: the config's)",
    )
    g.add_argument(
        "--head-steps", type=int, default=None, help="override CompressConfig.head_steps (default: the config's)"
    )
    g = p.add_argument_group("serving")
    g.add_argument("--warm-requests", type=int, default=2000, help="in-process predictions timed with the head cached")
    g.add_argument("--cold-requests", type=int, default=500, help="in-process predictions timed on a cache miss")
    g.add_argument("--http-requests", type=int, default=2000, help="HTTP predictions timed on loopback")
    g.add_argument("--http-concurrency", type=int, default=8, help="concurrent HTTP clients")
    g.add_argument(
        "--serving-only",
        action="store_true",
        help="run only the serving targets (issue 12, with the K-teacher peer) against --model, a version "
        "compressed from --fleet-dir's teachers and events, and a SIMULATED version of the largest "
        "--scale-campaigns; writes OUT/serving-targets.json and .md",
    )
    g.add_argument(
        "--model",
        default=None,
        help="with --serving-only: the version to serve (directory or manifest URI; "
        "no default: required with --serving-only)",
    )
    g.add_argument(
        "--variant-backbones",
        action="store_true",
        help="train a backbone per head-design/loss variant (default: reuse the real run's backbone)",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///OUT/mlflow.db)",
    )
    p.add_argument(
        "--no-mlflow",
        action="store_true",
        help="use no MLflow at all: the bench run is not logged and the real run's version is not registered",
    )
    p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    g = p.add_argument_group("docs (from an earlier run's results; nothing is run)")
    g.add_argument(
        "--write-docs",
        default=None,
        metavar="RESULTS.json",
        help="rewrite the generated section of --docs (the text above its end-of-section line) from a "
        "run's results.json, its PNGs copied into the page's folder of the same name "
        "(docs/benchmarks/), and exit (default: off)",
    )
    g.add_argument("--docs", default="docs/benchmarks.md", help="with --write-docs: the page (default: %(default)s)")
    g.add_argument(
        "--docs-prose",
        default=None,
        metavar="PROSE.json",
        help="with --write-docs: the page's hand-written prose, a JSON object of "
        f"{', '.join(DOCS_PROSE)} (why: target figure prefix -> why it was missed; shared: what "
        "else ran on the machine) (default: none)",
    )
    from fleet.bench import scale, zoo

    zoo.add_arguments(p)
    scale.add_arguments(p)


def compress_config_from_args(args) -> stages.CompressConfig:
    """The compression config of ``fleet bench``'s runs: ``--config`` (else the defaults with ``--seed``), then
    ``--backbone-steps`` and ``--head-steps`` over it (ValueError on a bad value)."""
    compress = stages.CompressConfig.from_file(args.config) if args.config else stages.CompressConfig(seed=args.seed)
    if args.backbone_steps is not None:
        compress.backbone_steps = args.backbone_steps
    if args.head_steps is not None:
        compress.head_steps = args.head_steps
    compress.__post_init__()
    return compress


def config_from_args(args) -> BenchConfig:
    """A :class:`BenchConfig` from parsed ``fleet bench`` arguments (ValueError on bad combinations)."""
    if args.campaigns is None:
        raise ValueError("--campaigns is required (but with --serving-only and --scale)")
    sized = {
        "hidden_size": args.hidden,
        "num_layers": args.layers,
        "min_sequences": args.min_sequences,
        "max_sequences": args.max_sequences,
        "max_epochs": args.max_epochs,
    }
    synth = SynthConfig(
        campaigns=args.campaigns, seed=args.seed, arch=args.arch, **{k: v for k, v in sized.items() if v is not None}
    )  # the rest: SynthConfig's defaults
    compress = compress_config_from_args(args)
    return BenchConfig(
        synth=synth,
        fleet_dir=args.fleet_dir or os.path.join(args.out, "fleet"),
        out=args.out,
        compress=compress,
        peer_subset=args.peer_subset,
        scale_campaigns=args.scale_campaigns,
        warm_requests=args.warm_requests,
        cold_requests=args.cold_requests,
        http_requests=args.http_requests,
        http_concurrency=args.http_concurrency,
        variant_backbones=args.variant_backbones,
        tracking_uri=args.tracking_uri,
        mlflow=not args.no_mlflow,
        address=args.address,
    )


def run_from_args(args, out_console) -> int:
    """``fleet bench``: run, print the summary table; exit 0 (1 on a FleetError, raised to the CLI).
    With ``--zoo``: the zoo's fidelity table instead (exit 1 when a pair misses a target); with ``--scale``: the
    real runs at growing fleet sizes (:mod:`fleet.bench.scale`, exit 1 when a target is missed); with
    ``--write-docs``: :func:`write_docs_from_args`, nothing run."""
    if args.write_docs:
        if args.scale or args.zoo or args.zoo_compare or args.serving_only:
            raise UsageError("--write-docs runs alone: not with --scale, --zoo, --zoo-compare or --serving-only")
        return write_docs_from_args(args, out_console)
    if not args.out:
        raise UsageError("--out is required (but with --write-docs)")
    if args.scale_night and not args.scale:
        raise UsageError("--scale-night re-runs the night of a --scale run: give it with --scale")
    if args.scale:
        if args.zoo or args.zoo_compare or args.serving_only:
            raise UsageError("--scale runs alone: not with --zoo, --zoo-compare or --serving-only")
        from fleet.bench import scale

        return scale.run_from_args(args, compress_config_from_args(args), out_console.print)
    if args.serving_only:
        return run_serving_only(args, out_console)
    config = config_from_args(args)
    if args.zoo or args.zoo_compare:
        from fleet.bench import zoo

        return zoo.run_from_args(args, config.compress, out_console.print)
    results = run_bench(config)
    out_console.print(summary_table(results))
    out_console.print(
        f"results: {os.path.join(args.out, 'results.json')}, {os.path.join(args.out, 'results.md')}"
        + (f"; MLflow run {results['mlflow_run_id']}" if results.get("mlflow_run_id") else "")
    )
    return 0


def run_serving_only(args, out_console) -> int:
    """``fleet bench --serving-only``: the serving targets alone (:func:`serving_targets`) against ``--model``,
    with a SIMULATED version of the largest ``--scale-campaigns`` written under ``OUT/scale-store`` (reused when
    it is there); ``OUT/serving-targets.json`` and ``.md``; a summary table. Exit 0."""
    if not args.model or not args.fleet_dir:
        raise ValueError("--serving-only needs --model (a version) and --fleet-dir (its teachers/ and events/)")
    if not args.scale_campaigns:
        raise ValueError("--serving-only needs a --scale-campaigns size for its SIMULATED version")
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    machine = machine_info()
    version = FleetVersion.open(args.model)
    count = max(args.scale_campaigns)
    store = os.path.abspath(os.path.join(args.out, "scale-store"))
    existing = sorted(glob.glob(os.path.join(store, f"sim-{count}", "versions", "*", "manifest.json")))
    if existing:
        sim_uri = existing[-1]
    else:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        sim_uri = write_simulated_version(count, version, store, stamp, args.seed + count)[0]
    fleet_dir = os.path.abspath(args.fleet_dir)
    st = serving_targets(
        version.manifest_uri,
        os.path.join(fleet_dir, "events"),
        os.path.join(fleet_dir, "teachers"),
        sim_uri,
        count,
        out_dir=args.out,
        seed=args.seed,
        requests=args.warm_requests,
        http_requests=args.http_requests,
    )
    machine["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = {
        "format": BENCH_RESULTS_FORMAT,
        "created_at": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        "machine": machine,
        "argv": list(sys.argv),
        "seconds": time.perf_counter() - started,
        "serving_targets": st,
    }
    with open(os.path.join(args.out, "serving-targets.json"), "w") as f:
        json.dump(json_safe(results), f, indent=1, sort_keys=True)
    with open(os.path.join(args.out, "serving-targets.md"), "w") as f:
        f.write("\n".join(render_serving_targets(st)))
    table = Table(title=f"serving targets (issue 12), {SERVING_THREADS} thread")
    for col in ("figure", "target", "fleet p99", "met", "peer p99", "fleet wins by"):
        table.add_column(col, justify="left" if col in ("figure", "target") else "right")
    for r in st["targets"]:
        table.add_row(
            r["figure"],
            r["target"],
            f"{r['value']:,.3f}",
            "yes" if r["passed"] else "[red]no[/red]",
            "" if r["peer"] is None else f"{r['peer']:,.1f}",
            "" if r["ratio"] is None else f"{r['ratio']:,.0f}x",
        )
    out_console.print(table)
    out_console.print(f"results: {os.path.join(args.out, 'serving-targets.json')}")
    return 0


def write_docs_from_args(args, out_console) -> int:
    """``fleet bench --write-docs RESULTS.json``: the generated section of ``--docs`` rewritten from a run's
    results (:func:`write_docs`; its PNGs into the directory named as the page without ``.md``), with the prose of
    ``--docs-prose``. Runs nothing. Exit 0."""
    if not os.path.isfile(args.write_docs):
        raise UsageError(f"--write-docs: no file {args.write_docs}")
    prose = {}
    if args.docs_prose:
        with open(args.docs_prose) as f:
            prose = json.load(f)
        if not isinstance(prose, dict) or set(prose) - set(DOCS_PROSE):
            raise UsageError(f"--docs-prose must hold a JSON object of {', '.join(DOCS_PROSE)}")
    plots_dir = os.path.splitext(args.docs)[0]
    write_docs(args.write_docs, args.docs, plots_dir, **prose)
    out_console.print(f"docs: {args.docs} (generated section) from {args.write_docs}; plots in {plots_dir}")
    return 0
