"""The ``fleet`` command line. Exit codes: 0 ok, 1 failed, 2 usage error, 3 finished with quarantined campaigns."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from rich.table import Table

from fleet.errors import FleetError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_QUARANTINED = 0, 1, 2, 3


def _storage_options(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--storage-options must be JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--storage-options must be a JSON object")
    return value


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
    p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    p.add_argument("--storage-options", type=_storage_options, default=None, help="fsspec options as JSON")
    p.set_defaults(handler=_cmd_synth)


def _cmd_synth(args, console) -> int:
    from fleet.pipeline import run_synth
    from fleet.synth import SynthConfig
    from fleet.teachers import TeacherRNN, teacher_num_bytes

    config = SynthConfig(
        campaigns=args.campaigns, seed=args.seed, arch=args.arch, hidden_size=args.hidden, num_layers=args.layers,
        num_event_types=args.num_event_types, num_features=args.num_features, min_sequences=args.min_sequences,
        max_sequences=args.max_sequences, max_epochs=args.max_epochs,
    )
    result = run_synth(config, args.out, args.storage_options, args.address)
    stats = result["campaigns"]
    rows = np.array([s["rows"] for s in stats])
    rates = np.array([s["label_rate"] for s in stats])
    teacher = TeacherRNN(config.teacher_config("probe"))
    table = Table(title=f"synthetic fleet -> {args.out}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("campaigns", str(len(stats)))
    table.add_row("sequences (total)", f"{rows.sum():,}")
    table.add_row("campaign size min / median / p90 / max", f"{rows.min()} / {np.median(rows):.0f} / {np.percentile(rows, 90):.0f} / {rows.max()}")
    table.add_row("label rate min / median / max", f"{rates.min():.3f} / {np.median(rates):.3f} / {rates.max():.3f}")
    table.add_row("teacher", f"{config.num_layers}-layer {config.arch.upper()} h={config.hidden_size}: "
                  f"{sum(p.numel() for p in teacher.parameters()):,} params, {teacher_num_bytes(teacher) / 1e6:.2f} MB")
    table.add_row("teacher epochs median", f"{np.median([s['epochs'] for s in stats]):.0f}")
    table.add_row("wall time", f"{result['seconds']:.1f} s")
    console.print(table)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``fleet`` subcommand."""
    parser = argparse.ArgumentParser(prog="fleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_synth(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fleet`` console script."""
    from rich.console import Console

    console = Console()
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args, console)
    except FleetError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return EXIT_FAILED
    except (ValueError, argparse.ArgumentTypeError) as exc:
        console.print(f"[red]usage error:[/red] {exc}")
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
