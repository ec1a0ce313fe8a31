"""The scheduled nightly entry point: an incremental `fleet compress` driven by one config file.

    python jobs/nightly.py --config nightly.toml [--run-id ID] [--dry-run] [--no-parent] [--force-config]

``nightly.toml``::

    [nightly]
    teachers = "s3://bucket/teachers"
    events = "s3://bucket/events/2026-11-25"
    store = "s3://bucket/fleet"
    fleet = "adfleet"
    tracking_uri = "http://mlflow:5000"      # optional ($MLFLOW_TRACKING_URI, else sqlite)
    address = "auto"                          # optional Ray address (default: local Ray)
    storage_options = {}                      # optional; secrets come from $FLEET_STORAGE_OPTIONS

    [compress]                                # optional CompressConfig fields
    bits = "auto"

Unchanged campaigns keep their heads and the champion's backbone. When the refit campaigns fail the
quality gate on fidelity (drift), the job runs once more with a retrained backbone that refits all.
``--dry-run`` prints the plan and changes nothing (no Ray, work dir, version or registry database): the champion
it would start from, the campaigns new / changed (teacher or data) / reused / refit / invalid / removed, worked
out as stage 1 does (teacher digests and data fingerprints against the champion's heads), and the estimated
time of stages 1-3 from the stage times of earlier versions in the store. Exit 0, or 1 / 2 as a run would fail.
A registry that cannot be read fails the job before stage 1 (exit 1) unless ``--no-parent``; re-running a
run id whose version is already registered registers nothing and exits 0.
Exit codes as `fleet compress`: 0 ok, 1 failed, 2 usage error (also: resuming a run id with another
configuration without ``--force-config``), 3 finished with quarantined campaigns, 4 not promoted, 130
interrupted (SIGINT: one line on stderr says what was saved and the command that resumes the run).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import tomllib
from rich.console import Console

from fleet import DEFAULT_FLEET
from fleet.cli.main import resume_command, summary_table
from fleet.cli.serving import ERRORS
from fleet.core.errors import FleetError, UsageError
from fleet.core.redact import scrub, scrub_obj, secret_values
from fleet.run.pipeline import interrupted_line, preview_compress, run_compress
from fleet.run.stages import CompressConfig
from fleet.storage.store import storage_options_from_env

REQUIRED = ("teachers", "events", "store")


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the nightly job."""
    parser = argparse.ArgumentParser(prog="nightly", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="TOML file with [nightly] and [compress] tables")
    parser.add_argument("--run-id", default=None, help="run id (default: nightly-<UTC date-time>); reuse to resume")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (campaigns new / changed / reused, estimated time) and change nothing: "
        "no Ray, no work dir, no version, no registry database",
    )
    parser.add_argument(
        "--no-parent", action="store_true", help="full run without a parent (as `fleet compress --no-parent`)"
    )
    parser.add_argument(
        "--force-config",
        action="store_true",
        help="resume --run-id with another configuration (as `fleet compress --force-config`)",
    )
    return parser


def load_config(path: str) -> tuple[dict, CompressConfig]:
    """``(nightly settings, CompressConfig)`` from the TOML file; ValueError names what is wrong."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read config ({exc})") from None
    nightly = data.get("nightly", {})
    missing = [key for key in REQUIRED if key not in nightly]
    if missing:
        raise ValueError(f"{path}: [nightly] lacks {missing}")
    return nightly, CompressConfig.from_dict(data.get("compress", {}))


#: Campaign ids listed per category by ``--dry-run`` (the counts are always complete).
PLAN_IDS = 10


def plan_tables(preview: dict) -> list:
    """``--dry-run``'s output (rich Tables) of :func:`fleet.run.pipeline.preview_compress`'s plan: the parent and mode,
    campaigns new / changed / reused / refit / invalid / removed (counts and the first ids), and the estimated
    time per stage."""
    from rich.table import Table

    campaigns = preview["campaigns"]
    table = Table(title=f"dry run: fleet {preview['fleet']}, parent {preview['parent'] or '(none)'}, {preview['mode']}")
    for column in ("campaigns", "count", "ids"):
        table.add_column(column, justify="right" if column == "count" else "left")
    for key, what in (
        ("new", "new (fitted)"),
        ("changed", "changed teacher or data (fitted)"),
        ("reused", "unchanged (head reused)"),
        ("refit", "unchanged but fitted again"),
        ("invalid", "invalid (would be quarantined)"),
        ("removed", "removed (no teacher now)"),
    ):
        ids = list(campaigns[key])
        shown = ", ".join(ids[:PLAN_IDS]) + (f", ... ({len(ids) - PLAN_IDS} more)" if len(ids) > PLAN_IDS else "")
        table.add_row(what, str(len(ids)), shown)
    estimate = preview["estimate"]
    times = Table(
        title="estimated time of stages 1-3 (earlier runs' stage times, scaled by campaigns fitted; "
        "finalize, writing and registering the version, not included)"
    )
    for column in ("stage", "seconds", "measured in version"):
        times.add_column(column, justify="right" if column == "seconds" else "left")
    if estimate is None:
        times.add_row("(no earlier version in the store: no estimate)", "n/a", "")
    else:
        for stage, seconds in estimate["stage_seconds"].items():
            times.add_row(
                stage, "n/a" if seconds is None else f"{seconds:.1f}", estimate["from_versions"].get(stage, "")
            )
        total = estimate["total_seconds"]
        times.add_row("total", "n/a" if total is None else f"{total:.1f}", "")
    return [table, times]


def main(argv: list[str] | None = None) -> int:
    console = Console()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        nightly, config = load_config(args.config)
    except ValueError as exc:
        ERRORS.print(f"[red]usage error:[/red] {scrub(str(exc))}")
        return 2
    run_id = args.run_id or time.strftime("nightly-%Y%m%dT%H%M%SZ", time.gmtime())
    options = nightly.get("storage_options") or storage_options_from_env()
    common = {
        "teachers_uri": nightly["teachers"],
        "events_uri": nightly["events"],
        "store_uri": nightly["store"],
        "fleet": nightly.get("fleet", DEFAULT_FLEET),
        "config": config,
        "tracking_uri": nightly.get("tracking_uri"),
        "address": nightly.get("address"),
        "storage_options": options,
        "no_parent": args.no_parent,
    }
    if args.dry_run:
        try:
            preview = preview_compress(**{k: v for k, v in common.items() if k not in ("address",)})
        except UsageError as exc:
            ERRORS.print(f"[red]usage error:[/red] {scrub(str(exc))}")
            return 2
        except FleetError as exc:
            ERRORS.print(f"[red]error:[/red] {scrub(str(exc))}")
            return 1
        settings = {"run_id": run_id, **{k: v for k, v in common.items() if k not in ("storage_options", "config")}}
        console.print(scrub_obj(settings, secret_values(options or {})))
        for table in plan_tables(preview):
            console.print(table)
        return 0
    here = os.path.relpath(__file__)
    resume = resume_command(
        ["python", here if not here.startswith("..") else os.path.abspath(__file__)], argv, run_id, options
    )
    common["resume_command"] = resume
    current = run_id  # the run under way (the interrupted line reports on it)
    try:
        result = run_compress(run_id=run_id, force_config=args.force_config, **common)
        console.print(summary_table(result))
        gate = result.registered.gate if result.registered else None
        inherited = "backbone_steps" not in result.metrics  # this run reused the champion's backbone
        drift = gate is not None and any(not r.startswith("quarantine share") for r in gate.reasons)
        if drift and inherited:  # a fidelity check failed (AUC, KL, mean ratio, fallback share), not quarantine
            console.print(f"[yellow]fidelity drift[/yellow] ({'; '.join(gate.reasons)}): retraining the backbone")
            current = f"{run_id}-retrain"
            result = run_compress(run_id=current, retrain_backbone=True, **common)
            console.print(summary_table(result))
    except KeyboardInterrupt:  # resuming the job with its run id resumes its retrain run too
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stderr.write(interrupted_line(common["store_uri"], common["fleet"], current, options, resume) + "\n")
        return 130
    except UsageError as exc:  # an input that cannot work (fleet.run.pipeline.check_compress_inputs)
        ERRORS.print(f"[red]usage error:[/red] {scrub(str(exc))}")
        return 2
    except FleetError as exc:
        ERRORS.print(f"[red]error:[/red] {scrub(str(exc))}")
        return 1
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
