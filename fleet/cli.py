"""The ``fleet`` command line. Exit codes: 0 ok, 1 failed (also: a registry that cannot be read, a champion
moved by another writer), 2 usage error (also: resuming a run id with another configuration without
--force-config), 3 finished with quarantined campaigns, 4 not promoted, 130 interrupted (SIGINT, Ctrl-C:
one line on stderr says what the run saved and the command that resumes it)."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys

import numpy as np
from rich.table import Table

from fleet import cli_serving
from fleet.cli_serving import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    json_object,
)
from fleet.errors import FleetError, UsageError
from fleet.redact import scrub, secret_values
from fleet.store import storage_options_from_env


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="generate a synthetic ad-tech fleet (events + trained teachers)")
    p.add_argument("--campaigns", type=int, required=True, help="number of campaigns")
    p.add_argument("--out", required=True, help="output URI; writes OUT/events/ and OUT/teachers/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", choices=["lstm", "gru"], default="lstm")
    p.add_argument("--hidden", type=int, default=256, help="teacher hidden size")
    p.add_argument("--layers", type=int, default=2, help="teacher RNN layers")
    p.add_argument("--num-event-types", type=int, default=64)
    p.add_argument("--num-features", type=int, default=8)
    p.add_argument("--min-sequences", type=int, default=100, help="smallest campaign size")
    p.add_argument("--max-sequences", type=int, default=20_000, help="largest campaign size")
    p.add_argument("--max-epochs", type=int, default=12, help="teacher training epochs at most (early stopping)")
    p.add_argument("--generator", choices=["default", "affinity", "interaction"], default="default",
                   help="how campaigns are generated (fleet.zoo; default: %(default)s)")
    p.add_argument("--teacher", choices=["rnn", "attn_gru", "conv"], default="rnn",
                   help="teacher class: rnn = --arch LSTM/GRU, attn_gru / conv = fleet.zoo's (default: %(default)s)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    p.add_argument("--storage-options", type=json_object, default=None, help="fsspec options as JSON")
    p.set_defaults(handler=_cmd_synth)


def _cmd_synth(args, console) -> int:
    from fleet.pipeline import run_synth
    from fleet.synth import SynthConfig
    from fleet.teachers import teacher_num_bytes
    from fleet.zoo import build_teacher

    config = SynthConfig(
        campaigns=args.campaigns, seed=args.seed, arch=args.arch, hidden_size=args.hidden, num_layers=args.layers,
        num_event_types=args.num_event_types, num_features=args.num_features, min_sequences=args.min_sequences,
        max_sequences=args.max_sequences, max_epochs=args.max_epochs, generator=args.generator, teacher=args.teacher,
    )
    result = run_synth(config, args.out, args.storage_options, args.address)
    stats = result["campaigns"]
    rows = np.array([s["rows"] for s in stats])
    rates = np.array([s["label_rate"] for s in stats])
    teacher = build_teacher(config.teacher_config("probe"))
    table = Table(title=f"synthetic fleet -> {args.out}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("campaigns", str(len(stats)))
    table.add_row("sequences (total)", f"{rows.sum():,}")
    table.add_row("campaign size min / median / p90 / max", f"{rows.min()} / {np.median(rows):.0f} / {np.percentile(rows, 90):.0f} / {rows.max()}")
    table.add_row("label rate min / median / max", f"{rates.min():.3f} / {np.median(rates):.3f} / {rates.max():.3f}")
    kind = {"rnn": config.arch.upper(), "attn_gru": "attention GRU"}.get(config.teacher, "conv")
    layers = 2 if config.teacher == "conv" else config.num_layers
    table.add_row("generator", config.generator)
    table.add_row("teacher", f"{layers}-layer {kind} h={config.hidden_size}: "
                  f"{sum(p.numel() for p in teacher.parameters()):,} params, {teacher_num_bytes(teacher) / 1e6:.2f} MB")
    trained = [s for s in stats if not s["resumed"]]
    table.add_row("teachers trained / kept from an interrupted run", f"{len(trained)} / {len(stats) - len(trained)}")
    if trained:
        table.add_row("teacher epochs median", f"{np.median([s['epochs'] for s in trained]):.0f}")
    table.add_row("wall time", f"{result['seconds']:.1f} s")
    console.print(table)
    return EXIT_OK


def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="distil, quantize and register one fleet version (the nightly job)")
    p.add_argument("--teachers", required=True, help="teacher root URI (fleet-teacher/1)")
    p.add_argument("--events", required=True, help="events dataset URI (Parquet)")
    p.add_argument("--store", default="fleet-data/store", help="store URI for fleet versions (default: %(default)s)")
    p.add_argument("--fleet", default="adfleet", help="fleet name = MLflow registered model (default: %(default)s)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///fleet-data/mlflow.db)")
    p.add_argument("--bits", choices=["auto", "8", "4", "2", "1"], default=None, help="head bits (default: auto)")
    p.add_argument("--codec", choices=["packed", "bloomier"], default=None,
                   help="how heads are stored: packed integer codes (default) or bloomier (Weightless: pruned, "
                        "clustered, Bloomier-filter encoded per row group; docs/quantization.md)")
    p.add_argument("--run-id", default=None,
                   help="run id = version id (default: the UTC time, printed at the start); re-use it to resume an "
                        "interrupted or crashed run")
    p.add_argument("--force-config", action="store_true",
                   help="resume --run-id with a configuration other than the one it was planned with (finished "
                        "shards are kept; without this flag such a resume is a usage error)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray sized to the machine)")
    p.add_argument("--retrain-backbone", action="store_true", help="retrain the backbone and refit every head")
    p.add_argument("--config", default=None, help="JSON or TOML file of CompressConfig fields")
    p.add_argument("--storage-options", type=json_object, default=None,
                   help="fsspec options as JSON (or $FLEET_STORAGE_OPTIONS), e.g. an S3 endpoint")
    p.add_argument("--no-register", action="store_true", help="write the version but do not register it in MLflow")
    p.add_argument("--no-parent", action="store_true",
                   help="full run without a parent: do not look up the champion (needed when the registry cannot "
                        "be read; with --no-register no registry is used at all)")
    p.add_argument("--allow-loader", action="append", default=[], type=_loader_spec, metavar="MODULE:FUNCTION",
                   help="allow teachers whose config.json names this loader (repeatable; installed "
                        "fleet.teacher_loaders entry points are always allowed, any other loader is quarantined)")
    p.add_argument("--dashboard", action="store_true",
                   help="start the local Ray's dashboard, on 127.0.0.1 only (default: no dashboard)")
    p.set_defaults(handler=_cmd_compress)


def _loader_spec(value: str) -> str:
    from fleet.teachers import validate_loader_spec

    try:
        return validate_loader_spec(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def resume_command(prog: list[str], argv: list[str], run_id: str, storage_options: dict | None = None) -> str:
    """The shell command that resumes run ``run_id``: ``prog`` + ``argv`` without ``--run-id``/``--force-config``, then
    ``--run-id RUN_ID``; credentials (URI user info, secret values of ``storage_options``) read ``***``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--run-id":
            skip = True
        elif not arg.startswith("--run-id=") and arg != "--force-config":
            kept.append(arg)
    return scrub(shlex.join([*prog, *kept, "--run-id", run_id]), secret_values(storage_options or {}))


def _cmd_compress(args, console) -> int:
    from fleet.pipeline import interrupted_line, new_run_id, run_compress
    from fleet.stages import CompressConfig

    config = CompressConfig.from_file(args.config) if args.config else CompressConfig()
    if args.bits is not None:
        config.bits = "auto" if args.bits == "auto" else int(args.bits)
        config.__post_init__()
    if args.codec is not None:
        config.codec = args.codec
        config.__post_init__()
    config.allow_loaders = list(dict.fromkeys([*config.allow_loaders, *args.allow_loader]))
    options = args.storage_options if args.storage_options is not None else storage_options_from_env()
    run_id = args.run_id or new_run_id()
    resume = resume_command(["fleet"], args.argv, run_id, options)
    try:
        result = run_compress(
            teachers_uri=args.teachers, events_uri=args.events, store_uri=args.store, fleet=args.fleet, config=config,
            run_id=run_id, tracking_uri=args.tracking_uri, address=args.address,
            retrain_backbone=args.retrain_backbone, storage_options=options, register=not args.no_register,
            dashboard=args.dashboard, no_parent=args.no_parent, force_config=args.force_config, resume_command=resume,
        )
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the line short
        sys.stderr.write(interrupted_line(args.store, args.fleet, run_id, options, resume) + "\n")
        sys.stderr.flush()
        return EXIT_INTERRUPTED
    console.print(summary_table(result))
    for reject in result.rejects[:20]:
        console.print(f"[yellow]quarantined[/yellow] {reject['campaign_id']} ({reject['stage']}): {reject['reason']}")
    existing = result.registered is not None and result.registered.existing
    gate = result.registered.gate if result.registered is not None else None
    if gate is not None and not gate.passed and not existing:
        sys.stderr.write(f"not promoted: {result.registered.name} version {result.registered.version} "
                         f"({result.version_id}) failed its quality gate:\n")
        for reason in gate.reasons:
            sys.stderr.write(f"  - {reason}\n")
        where = f" --tracking-uri {scrub(args.tracking_uri)}" if args.tracking_uri else ""
        sys.stderr.write(f"to promote it anyway: fleet promote {result.registered.name} {result.registered.version}"
                         f"{where}\n")
    return result.exit_code


def summary_table(result) -> Table:
    """The end-of-run summary of ``fleet compress``."""
    m = result.metrics
    fmt = lambda v, spec="": "n/a" if v is None else format(v, spec)
    table = Table(title=f"fleet version {result.version_id}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("campaigns ok / reused / quarantined",
                  f"{m['campaigns_ok']} / {m['campaigns_reused']} / {m['campaigns_quarantined']}")
    table.add_row("heads bytes (per campaign)", f"{m['heads_bytes']:,} ({m['bytes_per_campaign']:.1f} B)")
    table.add_row("backbone bytes", f"{m['backbone_bytes']:,}")
    table.add_row("compression ratio vs fp32 teachers", f"{m['compression_ratio']:,.0f}x")
    table.add_row("bits 1/2/4/8/16 (campaigns)", " / ".join(str(m[f"bits_{b}_campaigns"]) for b in (1, 2, 4, 8, 16)))
    table.add_row("AUC diff student-teacher median / p10",
                  f"{fmt(m['fidelity_auc_diff_median'], '+.4f')} / {fmt(m['fidelity_auc_diff_p10'], '+.4f')}")
    table.add_row("mean |p_s - p_t| median", fmt(m["fidelity_mean_abs_diff_median"], ".4f"))
    table.add_row("rows truncated to max_sequence_length", f"{m.get('rows_truncated', 0):,}")
    for stage in ("soft_labels", "backbone", "heads", "finalize"):
        if f"stage_seconds_{stage}" in m:
            table.add_row(f"stage time {stage}", f"{m[f'stage_seconds_{stage}']:.1f} s")
    table.add_row("run time / floor (stage 1)", fmt(m.get("run_over_floor"), ".2f"))
    if result.registered is not None:
        r = result.registered
        gate = "passed" if r.gate is None or r.gate.passed else "failed: " + "; ".join(r.gate.reasons)
        if r.existing:
            table.add_row("MLflow", f"{r.name} v{r.version} already registered, nothing new (gate {gate}; "
                                    f"{'champion' if r.champion else 'not champion'})")
        else:
            table.add_row("MLflow", f"{r.name} v{r.version} (gate {gate}; champion {'moved' if r.champion else 'kept'})")
    return table


def _add_registry_commands(sub) -> None:
    p = sub.add_parser("promote", help="move the champion alias to a registered version by hand")
    p.add_argument("name", help="fleet (registered model) name")
    p.add_argument("version", help="MLflow model version number")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(handler=_cmd_promote)
    p = sub.add_parser("rollback", help="move the champion alias back to the previous champion")
    p.add_argument("name", help="fleet (registered model) name")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(handler=_cmd_rollback)
    p = sub.add_parser("versions", help="list a fleet's registered versions, aliases and gate results")
    p.add_argument("name", help="fleet (registered model) name")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(handler=_cmd_versions)


def _cmd_promote(args, console) -> int:
    from fleet import registry

    registry.promote(args.name, args.version, args.tracking_uri)
    console.print(f"champion of {args.name} -> version {args.version}")
    return EXIT_OK


def _cmd_rollback(args, console) -> int:
    from fleet import registry

    version = registry.rollback(args.name, args.tracking_uri)
    console.print(f"champion of {args.name} rolled back to version {version}")
    return EXIT_OK


def _cmd_versions(args, console) -> int:
    from fleet import registry

    table = Table(title=f"{args.name} versions")
    for column in ("version", "version_id", "aliases", "gate", "created", "why not promoted"):
        table.add_column(column)
    for v in registry.list_versions(args.name, args.tracking_uri):
        table.add_row(str(v["version"]), str(v["version_id"]), ",".join(v["aliases"]), str(v["gate"]), str(v["created"]),
                      "; ".join(v["gate_reasons"]))
    console.print(table)
    return EXIT_OK


def _add_bench(sub) -> None:
    from fleet.bench import add_arguments

    p = sub.add_parser("bench", help="benchmark fleet against its peers on one synthetic fleet (DESIGN.md targets)")
    add_arguments(p)
    p.set_defaults(handler=_cmd_bench)


def _cmd_bench(args, console) -> int:
    from fleet.bench import run_from_args

    return run_from_args(args, console)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``fleet`` subcommand."""
    parser = argparse.ArgumentParser(prog="fleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_synth(sub)
    _add_compress(sub)
    _add_registry_commands(sub)
    _add_bench(sub)
    cli_serving.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fleet`` console script."""
    from rich.console import Console

    console = Console()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.handler(args, console)
    except UsageError as exc:
        cli_serving.ERRORS.print(f"[red]usage error:[/red] {scrub(str(exc))}")
        return EXIT_USAGE
    except FleetError as exc:
        cli_serving.ERRORS.print(f"[red]error:[/red] {scrub(str(exc))}")
        return EXIT_FAILED
    except (ValueError, argparse.ArgumentTypeError) as exc:
        cli_serving.ERRORS.print(f"[red]usage error:[/red] {scrub(str(exc))}")
        return EXIT_USAGE
    except KeyboardInterrupt:  # `fleet compress` says what it saved itself (_cmd_compress)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stderr.write(f"interrupted: fleet {args.command} stopped by SIGINT\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
