"""``fleet serve``, ``fleet predict`` and ``fleet inspect``: :func:`register` adds them to ``fleet``'s parser.

Handlers take ``(args, console)`` and return an exit code: 0 ok, 1 failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console

from fleet.core.constants import ENV_ADMIN_TOKEN, ENV_STORAGE_OPTIONS
from fleet.core.jsonobj import parse_json_object
from fleet.core.redact import scrub

#: Where every CLI error, usage error and note goes: stderr, one unwrapped line each (stdout is for data).
ERRORS = Console(stderr=True, soft_wrap=True, highlight=False)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: A command stopped by SIGINT (Ctrl-C): 128 + SIGINT, as a shell reports it.
EXIT_INTERRUPTED = 130
PREDICT_CHUNK_ROWS = 4096


def json_object(text: str) -> dict:
    """An argparse type: the JSON object ``text`` holds (:func:`fleet.core.jsonobj.parse_json_object`)."""
    try:
        return parse_json_object(text, "the value")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bounded(cast, minimum, *, strict: bool = False, kind: str = "an integer"):
    """An argparse type: ``cast(text)`` that must be ``> minimum`` (strict) or ``>= minimum``."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if not (value > minimum if strict else value >= minimum):  # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum}, got {text}")
        return value

    return parse


_positive_int = _bounded(int, 1)
_non_negative_int = _bounded(int, 0)
_positive_float = _bounded(float, 0, strict=True, kind="a number")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI for models:/ URIs (default: $MLFLOW_TRACKING_URI or sqlite:///fleet-data/mlflow.db)",
    )
    p.add_argument(
        "--storage-options",
        type=json_object,
        default=None,
        help=f"fsspec storage options as JSON (default: ${ENV_STORAGE_OPTIONS})",
    )


class _RefuseSecretFlag(argparse.Action):
    """A flag that would put a secret on the command line (visible in ``ps``): a usage error that never
    echoes the value."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(
            f"{option_string} is not accepted: a token on the command line is visible to every "
            f"user (ps); set ${ENV_ADMIN_TOKEN} or pass --admin-token-file PATH"
        )


def _admin_token(path: str | None) -> str | None:
    """The admin token: the content of ``path`` (surrounding whitespace stripped) when given, else
    ``$FLEET_ADMIN_TOKEN``, else None (``/admin/*`` disabled). ValueError naming the source, never
    the token, when it is unreadable or not a valid token (:func:`fleet.serve.http.check_admin_token`)."""
    from fleet.serve.http import check_admin_token

    if path is None:
        token, source = os.environ.get(ENV_ADMIN_TOKEN), f"${ENV_ADMIN_TOKEN}"
        if token is None:
            return None
    else:
        source = f"--admin-token-file {path}"
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{source}: cannot read the admin token ({type(exc).__name__})") from None
    try:
        return check_admin_token(token.strip())
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The ``--help`` of every fleet command: an option's default is appended as ``(default: X)`` unless its
    help already names it (the word "default"); flags are off unless given, and an option whose default is
    None says in its help what happens without it (``tests/test_cli.py`` checks both)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "default" in text.lower()
            or not action.option_strings
            or action.nargs == 0
            or action.default in (None, argparse.SUPPRESS)
        ):
            return text
        return text + " (default: %(default)s)"


#: One-line help of the commands this module adds (``fleet --help`` lists them without importing anything).
COMMANDS = {
    "serve": "serve a fleet version over HTTP (predict, campaigns, health, metrics)",
    "predict": "score sequences from a JSONL or Parquet file; one probability per line",
    "inspect": "check a fleet version's files (exit 1 if any is missing or corrupt) and summarise it, or one "
    "campaign's head",
}


def register(subparsers) -> None:
    """Add ``serve``, ``predict`` and ``inspect`` to ``fleet``'s subparsers."""
    for name, add in (("serve", add_serve), ("predict", add_predict), ("inspect", add_inspect)):
        add(subparsers.add_parser(name, help=COMMANDS[name], description=COMMANDS[name], formatter_class=HelpFormatter))


def _heads_help() -> str:
    """Help text of ``--heads`` (serve, predict)."""
    from fleet.serve.serving import DEFAULT_HEADS

    return (
        f"how heads are kept (default {DEFAULT_HEADS}): resident = every head in memory, quantized "
        "(read once at start); lru = read on first use into the --cache-size LRU; dense = --preload"
    )


def _backend_help() -> str:
    """Help text of ``--backend`` (serve, predict)."""
    from fleet.serve.serving import DEFAULT_BACKEND

    return (
        f"how the backbone runs (default {DEFAULT_BACKEND}): numpy = pure-numpy GRU/LSTM forward; "
        "torch = the torch module (docs/serving.md, Backbone backend)"
    )


def add_serve(p: argparse.ArgumentParser) -> None:
    """``fleet serve``'s arguments."""
    from fleet.serve.http import DEFAULT_MAX_SCORE_CAMPAIGNS
    from fleet.serve.serving import (
        BACKENDS,
        DEFAULT_CACHE_SIZE,
        DEFAULT_MAX_SEQUENCE_LENGTH,
        HEAD_MODES,
    )

    heads_help = _heads_help()

    p.add_argument("--model", required=True, help="models:/NAME@alias, models:/NAME/N, or a version/manifest URI")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8080, help="TCP port to listen on")
    p.add_argument(
        "--cache-size",
        type=_non_negative_int,
        default=DEFAULT_CACHE_SIZE,
        help="heads kept dequantized in the LRU (0: no cache)",
    )
    p.add_argument("--preload", action="store_true", help="decode every head at start (no per-request I/O)")
    p.add_argument("--heads", choices=HEAD_MODES, default=None, help=heads_help)
    p.add_argument("--backend", choices=BACKENDS, default=None, help=_backend_help())
    p.add_argument(
        "--poll-seconds",
        type=_positive_float,
        default=None,
        help="re-resolve a models:/ alias this often and swap to a new version (default: never)",
    )
    p.add_argument("--max-body-bytes", type=_positive_int, default=1_000_000, help="largest request body")
    p.add_argument("--max-sequences", type=_positive_int, default=1024, help="sequences (or rows) per request")
    p.add_argument(
        "--max-score-campaigns",
        type=_positive_int,
        default=DEFAULT_MAX_SCORE_CAMPAIGNS,
        help="campaigns a POST /v1/score may name or get back",
    )
    p.add_argument(
        "--max-sequence-length", type=_positive_int, default=DEFAULT_MAX_SEQUENCE_LENGTH, help="events per sequence"
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch inference threads (process-wide; default: torch's own choice)",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the sha256 check of the heads files at start (the backbone is always checked)",
    )
    p.add_argument(
        "--admin-token-file",
        default=None,
        metavar="PATH",
        help=f"enable /admin/* behind 'Authorization: Bearer TOKEN', TOKEN read from this file "
        f"(default: ${ENV_ADMIN_TOKEN}; without either, /admin/* is disabled)",
    )
    p.add_argument("--admin-token", action=_RefuseSecretFlag, help=argparse.SUPPRESS)
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level",
    )
    p.add_argument("--ray", action="store_true", help="serve with Ray Serve (replicas behind one HTTP proxy)")
    p.add_argument("--replicas", type=_positive_int, default=1, help="Ray Serve replicas (with --ray)")
    _add_model_options(p)
    p.set_defaults(handler=_cmd_serve)


def add_predict(p: argparse.ArgumentParser) -> None:
    """``fleet predict``'s arguments."""
    from fleet.serve.serving import BACKENDS, DEFAULT_CACHE_SIZE, HEAD_MODES

    p.add_argument("--model", required=True, help="models:/NAME@alias, models:/NAME/N, or a version/manifest URI")
    p.add_argument(
        "--campaign",
        default=None,
        help="score every sequence with this campaign's head (default: none; then rows need campaign_id)",
    )
    p.add_argument(
        "--input",
        required=True,
        help="FILE.jsonl (objects with event_types, features[, campaign_id]) or FILE.parquet (events format)",
    )
    p.add_argument(
        "--cache-size",
        type=_non_negative_int,
        default=DEFAULT_CACHE_SIZE,
        help="heads kept dequantized in the LRU (0: no cache)",
    )
    p.add_argument("--heads", choices=HEAD_MODES, default=None, help=_heads_help())
    p.add_argument("--backend", choices=BACKENDS, default=None, help=_backend_help())
    p.add_argument(
        "--rank",
        action="store_true",
        help="score each sequence against many campaigns (a row's campaign_ids, else --campaigns, else "
        "every campaign) and print one JSON line per sequence, best first",
    )
    p.add_argument(
        "--campaigns",
        default=None,
        metavar="ID[,ID...]",
        help="with --rank: the campaigns to rank for rows without campaign_ids (default: every campaign)",
    )
    p.add_argument(
        "--top-k",
        type=_positive_int,
        default=None,
        help="with --rank: keep the k best campaigns (default: all of them)",
    )
    _add_model_options(p)
    p.set_defaults(handler=_cmd_predict)


def add_inspect(p: argparse.ArgumentParser) -> None:
    """``fleet inspect``'s arguments."""
    p.add_argument("uri", help="models:/NAME@alias, models:/NAME/N, or a version/manifest URI")
    p.add_argument("--campaign", default=None, help="show this campaign's head metadata (default: the whole version)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _add_model_options(p)
    p.set_defaults(handler=_cmd_inspect)


# ----------------------------------------------------------------------------- serve


def _cmd_serve(args, console) -> int:
    from fleet.core.errors import FleetError
    from fleet.serve.http import app_from_uri

    if not 0 <= args.port <= 65535:
        ERRORS.print(f"[red]usage error:[/red] --port must lie in [0, 65535], got {args.port}")
        return EXIT_USAGE
    if args.poll_seconds is not None and not args.model.startswith("models:"):
        ERRORS.print("[yellow]note:[/yellow] --poll-seconds has no effect on a fixed version URI")
    try:
        admin_token = _admin_token(args.admin_token_file)
    except ValueError as exc:
        ERRORS.print(f"[red]usage error:[/red] {scrub(str(exc))}")
        return EXIT_USAGE
    factory = functools.partial(
        app_from_uri,
        args.model,
        tracking_uri=args.tracking_uri,
        storage_options=args.storage_options,
        cache_size=args.cache_size,
        preload=args.preload,
        poll_seconds=args.poll_seconds,
        max_body_bytes=args.max_body_bytes,
        max_sequences=args.max_sequences,
        max_sequence_length=args.max_sequence_length,
        num_threads=args.threads,
        admin_token=admin_token,
        verify=not args.no_verify,
        heads=args.heads,
        max_score_campaigns=args.max_score_campaigns,
        backend=args.backend,
    )
    if args.ray:
        try:
            from fleet.run.pipeline import serve_on_ray
        except ImportError as exc:
            ERRORS.print(f"[red]error:[/red] Ray serving is unavailable: {scrub(str(exc))}")
            return EXIT_FAILED
        serve_on_ray(factory, args.replicas, args.host, args.port)
        return EXIT_OK
    import uvicorn

    try:
        app = factory()
    except (FleetError, OSError, ValueError) as exc:
        ERRORS.print(f"[red]error:[/red] cannot load {scrub(args.model)}: {scrub(str(exc))}")
        return EXIT_FAILED
    model = app.state.holder.get()
    admin = "admin endpoints enabled" if admin_token is not None else "admin endpoints disabled"
    console.print(
        f"serving fleet version [bold]{model.version_id}[/bold] ({model.num_campaigns:,} campaigns) "
        f"on http://{args.host}:{args.port} ({admin})"
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return EXIT_OK


# ----------------------------------------------------------------------------- predict


def _read_rows(path: str, storage_options: dict | None) -> Iterator[list[dict]]:
    """Chunks of rows ``{"event_types", "features"[, "campaign_id"]}`` from JSONL or Parquet."""
    import fsspec

    lower = path.lower()
    if lower.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            pf = pq.ParquetFile(
                f, pre_buffer=False
            )  # read and decoded on this thread (fleet.storage.store.read_parquet_bytes)
            names = [c for c in ("campaign_id", "event_types", "features") if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(batch_size=PREDICT_CHUNK_ROWS, columns=names, use_threads=False):
                yield batch.to_pylist()
        return
    if not (lower.endswith((".jsonl", ".ndjson", ".json"))):
        raise ValueError(f"--input must end in .jsonl or .parquet, got {path!r}")
    chunk: list[dict] = []
    with fsspec.open(path, "rt", encoding="utf-8", **(storage_options or {})) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            chunk.append(parse_json_object(line, f"{path}:{number}"))  # ValueError: _cmd_predict catches it
            if len(chunk) == PREDICT_CHUNK_ROWS:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _cmd_predict(args, console) -> int:
    from fleet.core.errors import FleetError, UnknownCampaignError
    from fleet.serve.serving import FleetModel, InvalidInputError

    if not args.rank and (args.campaigns is not None or args.top_k is not None):
        ERRORS.print("[red]usage error:[/red] --campaigns and --top-k go with --rank")
        return EXIT_USAGE
    if args.rank and args.campaign is not None:
        ERRORS.print("[red]usage error:[/red] --rank scores many campaigns: name them with --campaigns, not --campaign")
        return EXIT_USAGE
    try:
        model = FleetModel.load(
            args.model,
            args.tracking_uri,
            storage_options=args.storage_options,
            cache_size=args.cache_size,
            heads=args.heads,
            backend=args.backend,
        )
    except (FleetError, OSError, ValueError) as exc:
        ERRORS.print(f"[red]error:[/red] cannot load {scrub(args.model)}: {scrub(str(exc))}")
        return EXIT_FAILED
    if args.rank:
        return _rank(model, args)

    def lines(rows: list[dict], offset: int, fallback: dict[str, None]) -> str:
        if args.campaign is not None:
            ids: Any = args.campaign
        else:
            if any("campaign_id" not in r for r in rows):
                raise InvalidInputError("rows need a campaign_id (or pass --campaign)")
            ids = [r["campaign_id"] for r in rows]
        try:
            types, feats = [r.get("event_types") for r in rows], [r.get("features") for r in rows]
            pred = model.predict_with_status(ids, types, feats)
        except (InvalidInputError, UnknownCampaignError) as exc:
            raise _RowError(re.sub(r"\brow (\d+)", lambda m: f"row {offset + int(m.group(1))}", str(exc))) from exc
        fallback.update(dict.fromkeys(pred.fallback_campaigns))
        return "".join(f"{p!r}\n" for p in pred.probabilities.tolist())

    return _write_predictions(args, lines)


def _rank(model, args) -> int:
    """``fleet predict --rank``: one JSON line per input sequence, ``{"campaign_ids", "probabilities",
    "fallback", "unknown"}``, campaigns best first (:meth:`FleetModel.score_campaigns`); rows sharing
    their list of campaigns are scored in one batch (:meth:`FleetModel.score_campaigns_batch`)."""
    from fleet.serve.serving import InvalidInputError

    default = None if args.campaigns is None else [c.strip() for c in args.campaigns.split(",") if c.strip()]

    def lines(rows: list[dict], offset: int, fallback: dict[str, None]) -> str:
        groups: dict[tuple | None, list[int]] = {}
        for i, r in enumerate(rows):
            ids = r.get("campaign_ids", default)
            if ids is not None and (isinstance(ids, str) or not isinstance(ids, list)):
                raise InvalidInputError("campaign_ids must be a list of campaign ids", row=offset + i)
            groups.setdefault(None if ids is None else tuple(ids), []).append(i)
        out: list[str | None] = [None] * len(rows)
        for ids, members in groups.items():
            seqs = [{"event_types": rows[i].get("event_types"), "features": rows[i].get("features")} for i in members]
            try:
                batch = model.score_campaigns_batch(seqs, None if ids is None else list(ids))
            except InvalidInputError as exc:  # name the row of the file (0-based, as fleet predict does)
                if exc.row is None:
                    text = f"row {offset + members[0]}: {exc}"
                else:
                    text = re.sub(r"\brow \d+", f"row {offset + members[exc.row]}", str(exc), count=1)
                raise _RowError(scrub(text)) from exc
            top_k = args.top_k or len(batch.ids)
            for b, i in enumerate(members):
                res = batch.row(b, top_k)
                fallback.update(dict.fromkeys(res.fallback_campaigns))
                out[i] = json.dumps(
                    {
                        "campaign_ids": res.ids,
                        "probabilities": res.probabilities.tolist(),
                        "fallback": res.fallback.tolist(),
                        "unknown": res.unknown,
                    }
                )
        return "".join(line + "\n" for line in out)

    return _write_predictions(args, lines)


class _RowError(Exception):
    """A row ``fleet predict`` cannot score; its message already names the row as the input file numbers it."""


def _write_predictions(args, lines: Callable[[list[dict], int, dict[str, None]], str]) -> int:
    """``fleet predict``'s loop over the input, with or without ``--rank``: ``lines(rows, offset, fallback)``
    turns one chunk of rows (the first is row ``offset`` of the file) into its stdout text and adds the campaigns
    it scored with a head that did not pass its gate to ``fallback``. Any error ends the command (exit 1,
    one line on stderr); at the end the fallback campaigns are named in one warning."""
    from fleet.core.errors import FleetError

    out, offset = sys.stdout, 0
    fallback: dict[str, None] = {}  # campaigns whose heads did not pass their quality gate, first-use order
    try:
        for rows in _read_rows(args.input, args.storage_options):
            out.write(lines(rows, offset, fallback))
            offset += len(rows)
    except _RowError as exc:
        ERRORS.print(f"[red]error:[/red] {exc}")
        return EXIT_FAILED
    except (FleetError, ValueError, OSError) as exc:  # OSError includes FileNotFoundError
        ERRORS.print(f"[red]error:[/red] {scrub(str(exc))}")
        return EXIT_FAILED
    out.flush()
    if fallback:
        _warn_fallback(list(fallback))
    return EXIT_OK


#: The fallback warning of ``fleet predict`` names at most this many campaigns (then counts the rest).
MAX_NAMED_FALLBACK = 20


def _warn_fallback(campaigns: list[str]) -> None:
    """One warning line on stderr (never the console, which may be stdout): the campaigns scored by
    heads that did not pass their quality gate (:func:`fleet.formats.codec.head_passed`). Stdout stays data only."""
    named = ", ".join(campaigns[:MAX_NAMED_FALLBACK])
    more = len(campaigns) - MAX_NAMED_FALLBACK
    rest = f" and {more} more" if more > 0 else ""
    sys.stderr.write(
        f"warning: {len(campaigns)} campaign(s) scored by a head that did not pass its quality gate "
        f"(fallback; probabilities written anyway): {named}{rest}\n"
    )
    sys.stderr.flush()


# ----------------------------------------------------------------------------- inspect


def version_summary(version) -> dict:
    """Figures of a :class:`fleet.storage.store.FleetVersion` from its manifest (no data file is read)."""
    m = version.manifest
    files = m.get("files", [])
    heads_bytes = sum(f["bytes"] for f in files if f["path"].startswith("heads/"))
    backbone_bytes = sum(f["bytes"] for f in files if f["path"] == "backbone.safetensors")
    count = m.get("campaigns", {}).get("count", 0)
    return {
        "fleet": m.get("fleet"),
        "version": m.get("version_id"),
        "created_at": m.get("created_at"),
        "format": m.get("format"),
        "heads_format": m.get("heads_format"),
        "heads_codec": m.get("heads_codec", "packed"),
        "uri": version.manifest_uri,
        "campaigns": m.get("campaigns"),
        "files": len(files),
        "bytes": sum(f["bytes"] for f in files),
        "heads_bytes": heads_bytes,
        "heads_parts": len(m.get("parts", [])),
        "heads_row_groups": sum(len(p.get("row_groups", [])) for p in m.get("parts", [])),
        "bytes_per_campaign": heads_bytes / count if count else None,
        "backbone_bytes": backbone_bytes,
        "parent_version": m.get("lineage", {}).get("parent_version"),
        "config": m.get("config", {}),
        "metrics": m.get("metrics", {}),
    }


def _cmd_inspect(args, console) -> int:
    """Summarise a version (or one campaign's head) after checking every file of its manifest (size and
    sha256, and the registry's ``manifest_sha256`` for a ``models:/`` URI): each missing or corrupt
    file is named on stderr and the exit code is 1."""
    from fleet.core.errors import FleetError
    from fleet.core.ids import validate_campaign_id
    from fleet.serve.serving import head_metadata, resolve_model_uri, storage_options_from_env
    from fleet.storage.store import FleetVersion

    try:
        uri, manifest_sha256 = args.uri, None
        if uri.startswith("models:"):
            uri, _, manifest_sha256 = resolve_model_uri(uri, args.tracking_uri)
        options = args.storage_options if args.storage_options is not None else storage_options_from_env()
        version = FleetVersion.open(uri, options, verify=False, manifest_sha256=manifest_sha256)
        problems = version.file_problems()
        if args.campaign is not None:
            cid = validate_campaign_id(args.campaign)
            row = version.read_head_row(cid)
            if row is None:
                ERRORS.print(f"[red]error:[/red] campaign {cid!r} is not in version {version.version_id}")
                return EXIT_FAILED
            info = head_metadata(row, version.version_id)
        else:
            info = {**version_summary(version), "files_ok": not problems}
    except (FleetError, OSError, ValueError) as exc:
        ERRORS.print(f"[red]error:[/red] {scrub(str(exc))}")
        return EXIT_FAILED
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    else:
        _print_tables(
            console, info, "campaign " + args.campaign if args.campaign else f"fleet version {info['version']}"
        )
    if problems:
        sys.stderr.write("".join(f"error: {scrub(str(p))}\n" for p in problems))
        sys.stderr.write(
            f"error: version {version.version_id}: {len(problems)} of {len(version.manifest['files'])} "
            "files missing or corrupt\n"
        )
        return EXIT_FAILED
    return EXIT_OK


def _print_tables(console, info: dict, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("field")
    table.add_column("value", justify="right")
    nested = {}
    for key, value in info.items():
        if isinstance(value, dict) and key in ("config", "metrics"):
            nested[key] = value
        elif isinstance(value, dict):
            table.add_row(key, ", ".join(f"{k}={v}" for k, v in value.items()))
        elif key.endswith("bytes") and isinstance(value, int):
            table.add_row(key, f"{value:,}")
        elif isinstance(value, float):
            table.add_row(key, f"{value:.4g}")
        else:
            table.add_row(key, "" if value is None else str(value))
    console.print(table)
    for key, value in nested.items():
        if value:
            sub = Table(title=key)
            sub.add_column("name")
            sub.add_column("value", justify="right")
            for k, v in _flatten(value):
                sub.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
            console.print(sub)


def _flatten(d: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


__all__ = ["COMMANDS", "HelpFormatter", "add_inspect", "add_predict", "add_serve", "register", "version_summary"]
