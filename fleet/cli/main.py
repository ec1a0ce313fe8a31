"""The ``fleet`` command line. Exit codes: 0 ok, 1 failed (also: a registry that cannot be read, a champion
moved by another writer), 2 usage error (also: resuming a run id with another configuration without
--force-config), 3 finished with quarantined campaigns, 4 not promoted, 130 interrupted (SIGINT, Ctrl-C:
one line on stderr says what the run saved and the command that resumes it).
Flags are off unless given; every other option's default is in the command's --help."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys

# Only light modules here: `fleet --help` must not import torch, Ray, MLflow or pyarrow (each command's
# arguments are added, and its modules imported, only when that command runs: build_parser).
from fleet import DEFAULT_FLEET, DEFAULT_STORE
from fleet.cli import serving as cli_serving
from fleet.cli.serving import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    HelpFormatter,
    json_object,
)
from fleet.core.constants import CODECS, ENV_STORAGE_OPTIONS, PACK_FORMAT, SUPPORTED_BITS, TEACHER_FORMAT
from fleet.core.errors import FleetError, UsageError
from fleet.core.redact import scrub, secret_values

#: The installed distribution of ``import fleet`` (its version is ``fleet --version``).
DISTRIBUTION = "fleet-distill"  # pyproject.toml [project] name; `import fleet` is the package


def _add_synth(p) -> None:
    p.add_argument("--campaigns", type=int, required=True, help="number of campaigns (with --entities user: users)")
    p.add_argument("--out", required=True, help="output URI; writes OUT/events/ and OUT/teachers/")
    p.add_argument("--seed", type=int, default=0, help="random seed of the data and the teachers")
    p.add_argument(
        "--entities",
        choices=["campaign", "user"],
        default="campaign",
        help="campaign: one teacher directory each; user: many small entities whose teachers are trained "
        f"--pack-size at a time and written as {PACK_FORMAT} packs (default: %(default)s)",
    )
    p.add_argument(
        "--pack-size", type=int, default=None, help="teachers per pack (--entities user only; default: 1024)"
    )
    p.add_argument("--arch", choices=["lstm", "gru"], default="lstm", help="teacher RNN cell (with --teacher rnn)")
    p.add_argument("--hidden", type=int, default=None, help="teacher hidden size (default: 256; per user: 16)")
    p.add_argument("--layers", type=int, default=None, help="teacher RNN layers (default: 2; per user: 1)")
    p.add_argument("--num-event-types", type=int, default=64, help="event type vocabulary size")
    p.add_argument("--num-features", type=int, default=8, help="numeric features per event")
    p.add_argument("--min-sequences", type=int, default=None, help="smallest entity size (default: 100; per user: 20)")
    p.add_argument(
        "--max-sequences", type=int, default=None, help="largest entity size (default: 20000; per user: 300)"
    )
    p.add_argument(
        "--max-epochs",
        type=int,
        default=None,
        help="teacher training epochs at most, early stopping (default: 12; per user: 8)",
    )
    p.add_argument(
        "--generator",
        choices=["default", "affinity", "interaction"],
        default="default",
        help="how campaigns are generated (fleet.synthetic.zoo; default: %(default)s)",
    )
    p.add_argument(
        "--teacher",
        choices=["rnn", "attn_gru", "conv"],
        default="rnn",
        help="teacher class: rnn = --arch LSTM/GRU, attn_gru / conv = fleet.synthetic.zoo's (default: %(default)s)",
    )
    p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    p.add_argument("--storage-options", type=json_object, default=None, help="fsspec options as JSON (default: none)")
    p.set_defaults(handler=_cmd_synth)


def _cmd_synth(args, console) -> int:
    import numpy as np
    from rich.filesize import decimal
    from rich.table import Table

    from fleet.formats.teachers import teacher_num_bytes
    from fleet.run.pipeline import run_synth
    from fleet.synthetic.synth import SynthConfig, user_config
    from fleet.synthetic.zoo import build_teacher

    common = {
        "seed": args.seed,
        "arch": args.arch,
        "num_event_types": args.num_event_types,
        "num_features": args.num_features,
        "generator": args.generator,
        "teacher": args.teacher,
    }
    sized = {
        "hidden_size": args.hidden,
        "num_layers": args.layers,
        "min_sequences": args.min_sequences,
        "max_sequences": args.max_sequences,
        "max_epochs": args.max_epochs,
    }
    if args.entities == "user":
        config = user_config(args.campaigns, pack_size=args.pack_size, **common, **sized)
    elif args.pack_size is not None:
        raise UsageError("--pack-size is for --entities user; pack campaign teachers with fleet pack-teachers")
    else:
        config = SynthConfig(campaigns=args.campaigns, **common, **{k: v for k, v in sized.items() if v is not None})
    result = run_synth(config, args.out, args.storage_options, args.address)
    stats = result["campaigns"]
    rows = np.array([s["rows"] for s in stats])
    rates = np.array([s["label_rate"] for s in stats])
    teacher = build_teacher(config.teacher_config("probe"))
    table = Table(title=f"synthetic fleet -> {args.out}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("users" if config.entities == "user" else "campaigns", str(len(stats)))
    table.add_row("sequences (total)", f"{rows.sum():,}")
    table.add_row(
        "campaign size min / median / p90 / max",
        f"{rows.min()} / {np.median(rows):.0f} / {np.percentile(rows, 90):.0f} / {rows.max()}",
    )
    table.add_row("label rate min / median / max", f"{rates.min():.3f} / {np.median(rates):.3f} / {rates.max():.3f}")
    kind = {"rnn": config.arch.upper(), "attn_gru": "attention GRU"}.get(config.teacher, "conv")
    layers = 2 if config.teacher == "conv" else config.num_layers
    table.add_row("generator", config.generator)
    table.add_row(
        "teacher",
        f"{layers}-layer {kind} h={config.hidden_size}: "
        f"{sum(p.numel() for p in teacher.parameters()):,} params, {decimal(teacher_num_bytes(teacher))}",
    )
    trained = [s for s in stats if not s["resumed"]]
    if config.entities == "user":
        table.add_row(f"teachers per pack ({PACK_FORMAT})", str(config.pack_size))
    table.add_row("teachers trained / kept from an interrupted run", f"{len(trained)} / {len(stats) - len(trained)}")
    if trained:
        table.add_row("teacher epochs median", f"{np.median([s['epochs'] for s in trained]):.0f}")
    table.add_row("wall time", f"{result['seconds']:.1f} s")
    console.print(table)
    return EXIT_OK


def _add_pack_teachers(p) -> None:
    p.add_argument("src", help="teacher root URI to read (campaign directories and/or packs)")
    p.add_argument("dst", help="new teacher root URI to write DST/packs/pack-NNNNN/ into (must be empty or absent)")
    p.add_argument("--pack-size", type=int, default=1024, help="teachers per pack at most (default: %(default)s)")
    p.add_argument(
        "--allow-loader",
        action="append",
        default=[],
        type=_loader_spec,
        metavar="MODULE:FUNCTION",
        help="allow this custom teacher loader (repeatable; default: installed entry points only)",
    )
    p.add_argument("--storage-options", type=json_object, default=None, help="fsspec options as JSON (default: none)")
    p.set_defaults(handler=_cmd_pack_teachers)


def _cmd_pack_teachers(args, console) -> int:
    """Exit 0: every teacher packed; 3: some teachers did not load and were left out (named on stderr)."""
    from fleet.formats.teacher_pack import pack_teachers
    from fleet.run.pipeline import EXIT_QUARANTINED

    if args.pack_size < 1:
        raise UsageError("--pack-size must be >= 1")
    result = pack_teachers(args.src, args.dst, args.pack_size, args.storage_options, allow_loaders=args.allow_loader)
    for campaign_id, reason in sorted(result["skipped"].items()):
        cli_serving.ERRORS.print(f"skipped {campaign_id}: {scrub(reason)}", highlight=False, markup=False)
    skipped = len(result["skipped"])
    console.print(
        f"{result['packed']} teachers in {result['packs']} packs under {args.dst.rstrip('/')}/packs"
        + (f"; {skipped} skipped (stderr)" if skipped else "")
    )
    return EXIT_QUARANTINED if skipped else EXIT_OK


def _add_compress(p) -> None:
    p.add_argument("--teachers", required=True, help=f"teacher root URI ({TEACHER_FORMAT})")
    p.add_argument("--events", required=True, help="events dataset URI (Parquet)")
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI for fleet versions (default: %(default)s)")
    p.add_argument("--fleet", default=DEFAULT_FLEET, help="fleet name = MLflow registered model (default: %(default)s)")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///fleet-data/mlflow.db)",
    )
    p.add_argument(
        "--bits",
        choices=["auto", *(str(b) for b in reversed(SUPPORTED_BITS))],
        default=None,
        help="head bits (default: the config's bits, auto unless --config says otherwise)",
    )
    p.add_argument(
        "--codec",
        choices=list(CODECS),
        default=None,
        help="how heads are stored: packed integer codes or bloomier (Weightless: pruned, clustered, "
        "Bloomier-filter encoded per row group; docs/quantization.md) (default: the config's codec, "
        "packed unless --config says otherwise)",
    )
    p.add_argument(
        "--run-id",
        default=None,
        help="run id = version id (default: the UTC time, YYYYMMDDTHHMMSSZ, printed at the start); re-use "
        "it to resume an interrupted or crashed run",
    )
    p.add_argument(
        "--force-config",
        action="store_true",
        help="resume --run-id with a configuration other than the one it was planned with (finished "
        "shards are kept; without this flag such a resume is a usage error)",
    )
    p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray sized to the machine)")
    p.add_argument("--retrain-backbone", action="store_true", help="retrain the backbone and refit every head")
    p.add_argument(
        "--config",
        default=None,
        help="JSON or TOML file of CompressConfig fields (default: CompressConfig's defaults, docs/compression.md)",
    )
    p.add_argument(
        "--storage-options",
        type=json_object,
        default=None,
        help=f"fsspec options as JSON, e.g. an S3 endpoint (default: ${ENV_STORAGE_OPTIONS})",
    )
    p.add_argument("--no-register", action="store_true", help="write the version but do not register it in MLflow")
    p.add_argument(
        "--no-parent",
        action="store_true",
        help="full run without a parent: do not look up the champion (needed when the registry cannot "
        "be read; with --no-register no registry is used at all)",
    )
    p.add_argument(
        "--allow-loader",
        action="append",
        default=[],
        type=_loader_spec,
        metavar="MODULE:FUNCTION",
        help="allow teachers whose config.json names this loader (repeatable; installed "
        "fleet.teacher_loaders entry points are always allowed, any other loader is quarantined; "
        "default: none)",
    )
    p.add_argument(
        "--dashboard",
        action="store_true",
        help="start the local Ray's dashboard, on 127.0.0.1 only (default: no dashboard)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the end-of-run summary as JSON on stdout (summary_json) instead of a table",
    )
    p.set_defaults(handler=_cmd_compress)


def _loader_spec(value: str) -> str:
    from fleet.formats.teachers import validate_loader_spec

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
    from fleet.run.pipeline import compress, interrupted_line, new_run_id
    from fleet.storage.store import storage_options_from_env

    options = args.storage_options if args.storage_options is not None else storage_options_from_env()
    run_id = args.run_id or new_run_id()
    resume = resume_command(["fleet"], args.argv, run_id, options)
    try:
        result = compress(
            args.teachers,
            args.events,
            store=args.store,
            fleet=args.fleet,
            config=args.config,
            bits=args.bits,
            codec=args.codec,
            allow_loaders=args.allow_loader,
            run_id=run_id,
            tracking_uri=args.tracking_uri,
            address=args.address,
            retrain_backbone=args.retrain_backbone,
            storage_options=options,
            register=not args.no_register,
            dashboard=args.dashboard,
            no_parent=args.no_parent,
            force_config=args.force_config,
            resume_command=resume,
        )
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the line short
        sys.stderr.write(interrupted_line(args.store, args.fleet, run_id, options, resume) + "\n")
        sys.stderr.flush()
        return EXIT_INTERRUPTED
    if args.json:
        sys.stdout.write(json.dumps(summary_json(result), indent=2, sort_keys=True) + "\n")
    else:
        console.print(summary_table(result))
        for reject in result.rejects[:20]:
            console.print(
                f"[yellow]quarantined[/yellow] {reject['campaign_id']} ({reject['stage']}): {reject['reason']}"
            )
    existing = result.registered is not None and result.registered.existing
    gate = result.registered.gate if result.registered is not None else None
    if gate is not None and not gate.passed and not existing:
        sys.stderr.write(
            f"not promoted: {result.registered.name} version {result.registered.version} "
            f"({result.version_id}) failed its quality gate:\n"
        )
        for reason in gate.reasons:
            sys.stderr.write(f"  - {reason}\n")
        where = f" --tracking-uri {scrub(args.tracking_uri)}" if args.tracking_uri else ""
        sys.stderr.write(
            f"to promote it anyway: fleet promote {result.registered.name} {result.registered.version}{where}\n"
        )
    return result.exit_code


def summary_json(result) -> dict:
    """The end-of-run summary of ``fleet compress --json``: ``version_id``, ``manifest_uri``, ``exit_code``,
    ``metrics`` (the manifest's, plus ``total_seconds``), ``registered`` (``name``, ``version``, ``run_id``,
    ``existing``, ``champion``, ``gate`` = ``passed`` / ``failed`` / null, ``gate_reasons``, ``gate_notes``;
    null with ``--no-register``) and ``rejects`` (``campaign_id``, ``stage``, ``reason``). Non-finite numbers
    are null."""
    from fleet.storage.store import json_safe

    registered = None
    if result.registered is not None:
        r = result.registered
        registered = {
            "name": r.name,
            "version": r.version,
            "run_id": r.run_id,
            "existing": r.existing,
            "champion": r.champion,
            "gate": None if r.gate is None else "passed" if r.gate.passed else "failed",
            "gate_reasons": [] if r.gate is None else list(r.gate.reasons),
            "gate_notes": [] if r.gate is None else list(r.gate.notes),
        }
    return json_safe(
        {
            "version_id": result.version_id,
            "manifest_uri": scrub(result.manifest_uri),
            "exit_code": result.exit_code,
            "metrics": result.metrics,
            "registered": registered,
            "rejects": list(result.rejects),
        }
    )


def summary_table(result):
    """The end-of-run summary of ``fleet compress`` (a rich Table)."""
    from rich.table import Table

    m = result.metrics
    fmt = lambda v, spec="": "n/a" if v is None else format(v, spec)
    table = Table(title=f"fleet version {result.version_id}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row(
        "campaigns ok / reused / quarantined",
        f"{m['campaigns_ok']} / {m['campaigns_reused']} / {m['campaigns_quarantined']}",
    )
    table.add_row("heads bytes (per campaign)", f"{m['heads_bytes']:,} ({m['bytes_per_campaign']:.1f} B)")
    table.add_row("backbone bytes", f"{m['backbone_bytes']:,}")
    table.add_row("compression ratio vs fp32 teachers", f"{m['compression_ratio']:,.0f}x")
    table.add_row("bits 1/2/4/8/16 (campaigns)", " / ".join(str(m[f"bits_{b}_campaigns"]) for b in SUPPORTED_BITS))
    table.add_row(
        "AUC diff student-teacher median / p10",
        f"{fmt(m['fidelity_auc_diff_median'], '+.4f')} / {fmt(m['fidelity_auc_diff_p10'], '+.4f')}",
    )
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
            table.add_row(
                "MLflow",
                f"{r.name} v{r.version} already registered, nothing new (gate {gate}; "
                f"{'champion' if r.champion else 'not champion'})",
            )
        else:
            table.add_row(
                "MLflow", f"{r.name} v{r.version} (gate {gate}; champion {'moved' if r.champion else 'kept'})"
            )
    return table


def _add_promote(p) -> None:
    p.add_argument("name", help="fleet (registered model) name")
    p.add_argument("version", help="MLflow model version number")
    _add_tracking_uri(p)
    p.set_defaults(handler=_cmd_promote)


def _add_rollback(p) -> None:
    p.add_argument("name", help="fleet (registered model) name")
    _add_tracking_uri(p)
    p.set_defaults(handler=_cmd_rollback)


def _add_versions(p) -> None:
    p.add_argument("name", help="fleet (registered model) name")
    _add_tracking_uri(p)
    p.add_argument(
        "--json",
        action="store_true",
        help="print the versions as a JSON list (fleet.storage.registry.list_versions' rows) instead of a table",
    )
    p.set_defaults(handler=_cmd_versions)


def _add_tracking_uri(p) -> None:
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///fleet-data/mlflow.db)",
    )


def _cmd_promote(args, console) -> int:
    from fleet.storage import registry

    registry.promote(args.name, args.version, args.tracking_uri)
    console.print(f"champion of {args.name} -> version {args.version}")
    return EXIT_OK


def _cmd_rollback(args, console) -> int:
    from fleet.storage import registry

    version = registry.rollback(args.name, args.tracking_uri)
    console.print(f"champion of {args.name} rolled back to version {version}")
    return EXIT_OK


def _cmd_versions(args, console) -> int:
    from rich.table import Table

    from fleet.storage import registry

    rows = registry.list_versions(args.name, args.tracking_uri)
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2, sort_keys=True) + "\n")
        return EXIT_OK
    table = Table(title=f"{args.name} versions")
    for column in ("version", "version_id", "aliases", "gate", "created", "why not promoted"):
        table.add_column(column)
    for v in rows:
        table.add_row(
            str(v["version"]),
            str(v["version_id"]),
            ",".join(v["aliases"]),
            str(v["gate"]),
            str(v["created"]),
            "; ".join(v["gate_reasons"]),
        )
    console.print(table)
    return EXIT_OK


def _add_bench(p) -> None:
    from fleet.bench.cli import add_arguments

    add_arguments(p)
    p.set_defaults(handler=_cmd_bench)


def _cmd_bench(args, console) -> int:
    from fleet.bench.cli import run_from_args

    return run_from_args(args, console)


def _add_diff(p) -> None:
    p.add_argument(
        "a",
        metavar="A",
        help="the old version: models:/NAME@alias, models:/NAME/N, a version/manifest "
        "URI, or with --fleet a bare alias or version number",
    )
    p.add_argument("b", metavar="B", help="the new version, as A")
    p.add_argument(
        "--fleet",
        default=None,
        help="registered model whose versions a bare A or B name (3 -> models:/NAME/3, champion -> "
        "models:/NAME@champion; default: none, A and B are URIs)",
    )
    p.add_argument(
        "--max-ids",
        type=cli_serving._non_negative_int,
        default=20,
        help="campaign ids listed per category (added, removed, refit, ...; 0: all)",
    )
    p.add_argument("--json", action="store_true", help="print the diff as JSON (fleet.diff's result)")
    cli_serving._add_model_options(p)
    p.set_defaults(handler=_cmd_diff)


def _cmd_diff(args, console) -> int:
    from fleet.versions.version_diff import diff_table, diff_versions, model_uri

    a, b = model_uri(args.a, args.fleet), model_uri(args.b, args.fleet)
    result = diff_versions(
        a, b, tracking_uri=args.tracking_uri, storage_options=args.storage_options, max_ids=args.max_ids or None
    )
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    else:
        for table in diff_table(result):
            console.print(table)
    return EXIT_OK


def _add_report(p) -> None:
    p.add_argument(
        "uri",
        metavar="VERSION_OR_URI",
        help="models:/NAME@alias, models:/NAME/N, a version directory or manifest.json URI, or with --fleet "
        "a bare alias or version number",
    )
    p.add_argument(
        "--fleet",
        default=None,
        help="registered model whose versions a bare VERSION_OR_URI names (3 -> models:/NAME/3, champion -> "
        "models:/NAME@champion; default: none)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="file to write the HTML page to, '-' for stdout (default: report-<version id>.html in the "
        "current directory); never the version directory, which is immutable",
    )
    cli_serving._add_model_options(p)
    p.set_defaults(handler=_cmd_report)


def _cmd_report(args, console) -> int:
    from fleet.storage.store import storage_options_from_env
    from fleet.versions.report import version_report
    from fleet.versions.version_diff import model_uri

    options = args.storage_options if args.storage_options is not None else storage_options_from_env()
    page, version_id = version_report(
        model_uri(args.uri, args.fleet), tracking_uri=args.tracking_uri, storage_options=options
    )
    if args.out == "-":
        sys.stdout.write(page)
        return EXIT_OK
    out = args.out or f"report-{version_id}.html"
    try:
        with open(out, "w", encoding="utf-8") as f:
            f.write(page)
    except OSError as exc:
        raise FleetError(f"cannot write the report: {exc.strerror or exc}", path=out) from None
    cli_serving.ERRORS.print(f"wrote the run report of version {version_id} to {out}", highlight=False, markup=False)
    return EXIT_OK


def _add_gc(p) -> None:
    from fleet.versions.retention import DEFAULT_GRACE_HOURS, DEFAULT_KEEP_LAST

    p.add_argument("name", help="fleet (registered model) name")
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI of the fleet's versions")
    _add_tracking_uri(p)
    p.add_argument(
        "--keep-last",
        type=cli_serving._non_negative_int,
        default=DEFAULT_KEEP_LAST,
        help="keep the N newest committed versions (whatever else they are)",
    )
    p.add_argument(
        "--grace-hours",
        type=_non_negative_float,
        default=DEFAULT_GRACE_HOURS,
        help="keep any version created, or moved off an alias, and any run finished, less than this "
        "many hours ago: readers may still use it",
    )
    p.add_argument("--yes", action="store_true", help="delete (default: dry run, print what would be deleted)")
    p.add_argument(
        "--no-registry",
        action="store_true",
        help="a store without registry (versions written with --no-register): no alias is read and no "
        "model version deleted; only --keep-last and --grace-hours protect versions",
    )
    p.add_argument("--json", action="store_true", help="print the plan (and what was deleted) as JSON")
    p.add_argument(
        "--storage-options",
        type=json_object,
        default=None,
        help=f"fsspec storage options as JSON (default: ${ENV_STORAGE_OPTIONS})",
    )
    p.set_defaults(handler=_cmd_gc)


def _non_negative_float(text: str) -> float:
    return cli_serving._bounded(float, 0, kind="a number")(text)


def _cmd_gc(args, console) -> int:
    from fleet.storage.store import storage_options_from_env
    from fleet.versions.retention import apply_plan, plan_gc, plan_json, plan_tables

    options = args.storage_options if args.storage_options is not None else storage_options_from_env()
    plan = plan_gc(
        args.store,
        args.name,
        tracking_uri=args.tracking_uri,
        storage_options=options,
        keep_last=args.keep_last,
        grace_hours=args.grace_hours,
        registry=not args.no_registry,
    )
    failures = apply_plan(plan) if args.yes else []
    if args.json:
        sys.stdout.write(
            json.dumps(plan_json(plan, applied=args.yes, failures=failures), indent=2, sort_keys=True) + "\n"
        )
    else:
        for table in plan_tables(plan, applied=args.yes):
            console.print(table)
    for failure in failures:
        cli_serving.ERRORS.print(f"[red]error:[/red] {scrub(failure)}")
    if not args.yes and plan.deletions and not args.json:
        cli_serving.ERRORS.print("dry run: nothing was deleted; run again with --yes to delete")
    return EXIT_FAILED if failures else EXIT_OK


def _add_completion(p) -> None:
    p.add_argument("shell", choices=["bash", "zsh"], help="the shell to print a completion script for")
    p.set_defaults(handler=_cmd_completion)


def _cmd_completion(args, console) -> int:
    from fleet.cli.completion import completion_script

    sys.stdout.write(completion_script(build_parser(), args.shell))
    return EXIT_OK


#: Every command: name -> (one-line help, function adding its arguments), in ``fleet --help``'s order.
COMMANDS = {
    "synth": ("generate a synthetic ad-tech fleet (events + trained teachers)", _add_synth),
    "pack-teachers": (f"convert teachers into {PACK_FORMAT} packs (many teachers per file)", _add_pack_teachers),
    "compress": ("distil, quantize and register one fleet version (the nightly job)", _add_compress),
    "versions": ("list a fleet's registered versions, aliases and gate results", _add_versions),
    "promote": ("move the champion alias to a registered version by hand", _add_promote),
    "rollback": ("move the champion alias back to the previous champion", _add_rollback),
    "diff": ("compare two versions: campaigns added/removed/refit, bits, fidelity and size", _add_diff),
    "report": ("write a version's run report: one self-contained HTML page of tables and plots", _add_report),
    "gc": ("delete old versions and finished run work dirs (dry run unless --yes)", _add_gc),
    "serve": (cli_serving.COMMANDS["serve"], cli_serving.add_serve),
    "predict": (cli_serving.COMMANDS["predict"], cli_serving.add_predict),
    "inspect": (cli_serving.COMMANDS["inspect"], cli_serving.add_inspect),
    "bench": ("benchmark fleet against its peers on one synthetic fleet (DESIGN.md targets)", _add_bench),
    "completion": ("print a shell completion script (bash or zsh)", _add_completion),
}


class _VersionAction(argparse.Action):
    """``--version``: the installed distribution's version, looked up only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.write(f"fleet {package_version()}\n")
        parser.exit()


def package_version() -> str:
    """The version of the installed distribution (:data:`DISTRIBUTION`), else ``fleet.__version__`` (a
    source tree that is not installed)."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        import fleet

        return fleet.__version__


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``fleet``: every command with all its arguments, or with ``command`` only that
    command's arguments (the others are listed but empty: :func:`main` builds no more than it runs)."""
    parser = argparse.ArgumentParser(prog="fleet", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action=_VersionAction, help="print fleet's version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (text, add) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)
        if command is None or command == name:
            add(p)
    return parser


def _command_of(argv: list[str]) -> str:
    """The command ``argv`` runs: its first word that is not an option ("" when there is none)."""
    return next((word for word in argv if not word.startswith("-")), "")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fleet`` console script (``argv`` None: ``sys.argv``); returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_of(argv)).parse_args(argv)
    args.argv = argv
    return _run(args)


def _run(args) -> int:
    from rich.console import Console

    console = Console()
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
