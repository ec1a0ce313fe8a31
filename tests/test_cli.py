"""The command line contract: subcommands, flags and exit codes (0 ok, 1 failed, 2 usage, 3 quarantined)."""

import argparse
import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest

from fleet.cli.main import build_parser, main
from fleet.formats.events import write_events


def test_every_documented_command_exists():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"synth", "compress", "serve", "predict", "inspect", "promote", "rollback", "versions"} <= set(commands)
    compress_flags = {s for a in commands["compress"]._actions for s in a.option_strings}
    assert {
        "--teachers",
        "--events",
        "--store",
        "--fleet",
        "--tracking-uri",
        "--bits",
        "--run-id",
        "--address",
        "--retrain-backbone",
        "--config",
        "--storage-options",
        "--codec",
    } <= compress_flags
    codec = next(a for a in commands["compress"]._actions if "--codec" in a.option_strings)
    assert codec.choices == ["packed", "bloomier"] and codec.default is None  # None: the config's (packed)


@pytest.mark.parametrize(
    "argv",
    [
        ["compress"],
        ["compress", "--teachers", "x", "--events", "y", "--bits", "3"],
        ["compress", "--teachers", "x", "--events", "y", "--codec", "zip"],
        ["synth", "--campaigns", "x", "--out", "o"],
        ["nope"],
    ],
)
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_bad_storage_options_is_a_usage_error():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleet.cli.main",
            "compress",
            "--teachers",
            "t",
            "--events",
            "e",
            "--storage-options",
            "{not json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2 and "JSON" in out.stderr


def test_bad_config_file_is_a_usage_error(tmp_path):
    (tmp_path / "c.json").write_text('{"bits": 3}')
    assert main(["compress", "--teachers", "t", "--events", "e", "--config", str(tmp_path / "c.json")]) == 2


def _no_ray_start(monkeypatch):
    """Make any start of Ray fail the test: usage errors are found before it."""
    import fleet.run.pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for a usage error")

    monkeypatch.setattr(fleet.run.pipeline, "ray_session", refuse)


def test_missing_teachers_is_a_usage_error_before_ray(tmp_path, monkeypatch, capsys):
    _no_ray_start(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    events = pa.table({"campaign_id": ["a"], "event_types": [[1]], "features": [[0.0]], "label": [1]})
    write_events(str(tmp_path / "ev"), events)  # valid events: the teachers are what is missing
    code = main(
        [
            "compress",
            "--teachers",
            str(tmp_path / "none"),
            "--events",
            str(tmp_path / "ev"),
            "--store",
            str(tmp_path / "store"),
        ]
    )
    assert code == 2
    out = capsys.readouterr()
    assert "usage error" in out.err and f"{tmp_path / 'none'}: --teachers: teacher root does not exist" in out.err
    assert "error" not in out.out  # stdout is for data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev"]  # no registry, no store created


def test_missing_config_file_is_a_usage_error(tmp_path, capsys):
    code = main(["compress", "--teachers", "t", "--events", "e", "--config", str(tmp_path / "nope.toml")])
    assert code == 2
    err = capsys.readouterr().err
    assert "nope.toml: cannot read config" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--store", "--teachers", "--events"])
def test_memory_uri_is_a_usage_error_before_ray(tmp_path, monkeypatch, capsys, flag):
    _no_ray_start(monkeypatch)
    events = pa.table({"campaign_id": ["a"], "event_types": [[1]], "features": [[0.0]], "label": [1]})
    write_events(str(tmp_path / "ev"), events)
    (tmp_path / "teachers").mkdir()
    uris = {
        "--teachers": str(tmp_path / "teachers"),
        "--events": str(tmp_path / "ev"),
        "--store": str(tmp_path / "s"),
        flag: "memory://fleet-test/x",
    }
    code = main(["compress", *[a for kv in uris.items() for a in kv], "--no-register", "--no-parent"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"memory://fleet-test/x: {flag}: memory:// lives in this process only" in err


def test_read_only_commands_create_no_tracking_database(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "in.jsonl").write_text('{"event_types": [1], "features": [[0.0]]}\n')
    default = f"sqlite:///{tmp_path}/fleet-data/mlflow.db"
    explicit = f"sqlite:///{tmp_path}/sub/m.db"
    for argv, uri in [
        (["versions", "adfleet"], default),
        (["inspect", "models:/adfleet@champion", "--json"], default),
        (["inspect", "models:/adfleet/1", "--campaign", "c1", "--tracking-uri", explicit], explicit),
        (["predict", "--model", "models:/adfleet@champion", "--campaign", "c1", "--input", "in.jsonl"], default),
        (["promote", "adfleet", "1"], default),
        (["rollback", "adfleet", "--tracking-uri", explicit], explicit),
    ]:
        assert main(argv) == 1, argv
        out = capsys.readouterr()
        assert f"no MLflow tracking database at {uri}" in out.err and not out.out, argv  # one line, on stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"], argv  # no db, lock or directory


def test_relative_sqlite_uri_that_looks_absolute_is_warned_about(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # a warning on stderr in the CLI (logging's last resort); pytest captures it here
    uri = f"sqlite://{tmp_path}/m.db"  # three slashes: the path is relative, ./tmp/.../m.db
    assert main(["versions", "adfleet", "--tracking-uri", uri]) == 1
    relative = str(tmp_path).lstrip("/") + "/m.db"
    assert f"names the relative path {relative}" in caplog.text and f"sqlite:////{relative}" in caplog.text
    caplog.clear()
    assert main(["versions", "adfleet", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 1
    assert "relative path" not in caplog.text  # four slashes: absolute, no warning


def test_nightly_job_validates_its_config(tmp_path, capsys):
    sys.path.insert(0, "jobs")
    import nightly

    (tmp_path / "bad.toml").write_text('[nightly]\nteachers = "t"\n')
    assert nightly.main(["--config", str(tmp_path / "bad.toml")]) == 2
    (tmp_path / "ok.toml").write_text('[nightly]\nteachers = "t"\nevents = "e"\nstore = "s"\n[compress]\nbits = 4\n')
    capsys.readouterr()
    assert nightly.main(["--config", str(tmp_path / "ok.toml"), "--dry-run"]) == 2  # the plan needs its inputs
    assert "--teachers: teacher root does not exist" in capsys.readouterr().err
    nightly_settings, config = nightly.load_config(str(tmp_path / "ok.toml"))
    assert config.bits == 4 and nightly_settings["store"] == "s"


#: Reads a version the way ``fleet inspect`` / ``fleet predict`` do, with torch loaded, and prints how many threads
#: that started (Arrow's pools start theirs lazily: any new thread here is one of theirs).
_THREAD_PROBE = """
import json, os, sys
import pyarrow as pa
import torch
from fleet.cli.main import main
from fleet.cli.serving import _read_rows
from fleet.storage.store import FleetVersion, RunDir

def threads():
    return set(os.listdir("/proc/self/task"))

uri, campaign, store, events = sys.argv[1:5]
before = threads()
assert main(["inspect", uri, "--campaign", campaign, "--json"]) == 0
assert main(["inspect", uri, "--json"]) == 0
version = FleetVersion.open(uri)
heads = version.read_heads()
version.read_rejects()
work = RunDir(store, "adfleet", "probe")
work.heads.write("s0", heads)
work.heads.read("s0")
rows = [r for chunk in _read_rows(events, None) for r in chunk]
print(json.dumps({"new_threads": len(threads() - before), "rows": len(rows), "heads": heads.num_rows}))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_reading_a_version_starts_no_arrow_thread(tmp_path):
    """The cause of ``terminate called without an active exception`` (exit 134) at the exit of ``fleet inspect``:
    an Arrow pool thread (a pre-buffered read of a Python file object, or a multi-threaded decode) that holds the
    last reference to a Python-owned buffer needs the GIL to free it; after interpreter finalization began,
    CPython ends it with pthread_exit, which unwinds through Arrow's noexcept code (std::terminate). Every read
    of a version, a work-dir shard and a ``fleet predict`` Parquet input decodes on the calling thread."""
    from test_serving import build_version

    built = build_version(str(tmp_path / "store"), num_campaigns=5)
    write_events(
        str(tmp_path / "ev"),
        pa.table(
            {"campaign_id": ["a", "b"], "event_types": [[1], [2, 3]], "features": [[0.0], [0.0, 1.0]], "label": [1, 0]}
        ),
    )
    events = next((tmp_path / "ev").rglob("*.parquet"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torch's own pool is not what this counts
    out = subprocess.run(
        [sys.executable, "-c", _THREAD_PROBE, built.uri, built.ids[0], str(tmp_path / "store"), str(events)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe == {"new_threads": 0, "rows": 2, "heads": 5}


@pytest.mark.slow
def test_inspect_json_exits_cleanly_20_times(tmp_path):
    """``fleet inspect --campaign --json`` (torch imported, a head row read with pyarrow) exits 0 every time:
    no ``terminate called without an active exception`` (exit 134) from a native thread pool at exit."""
    from test_serving import build_version

    built = build_version(str(tmp_path), num_campaigns=5)
    argv = [sys.executable, "-m", "fleet.cli.main", "inspect", built.uri, "--campaign", built.ids[0], "--json"]
    for run in range(20):
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        assert out.returncode == 0 and "terminate called" not in out.stderr, (run, out.returncode, out.stderr)
        assert json.loads(out.stdout)["campaign_id"] == built.ids[0]


# ----------------------------------------------------------------------------- conventions (issue 13 section 9)


def test_version_is_the_installed_distribution_s():
    from importlib import metadata

    from fleet.cli.main import DISTRIBUTION

    out = subprocess.run(
        [sys.executable, "-m", "fleet.cli.main", "--version"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and out.stdout == f"fleet {metadata.version(DISTRIBUTION)}\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["versions", "--help"],
        ["diff", "--help"],
        ["gc", "--help"],
        ["report", "--help"],
        ["completion", "--help"],
    ],
)
def test_help_imports_no_heavy_module(argv):
    """`fleet --help` (and the registry commands' help) import neither torch, Ray, MLflow, pyarrow nor the bench:
    each command's arguments and modules are loaded only when that command runs."""
    code = (
        "import sys\nfrom fleet.cli.main import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
        "    assert e.code == 0, e.code\nheavy = ('torch', 'ray', 'mlflow', 'pyarrow', 'numpy', 'fsspec', 'fleet.bench')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m == 'fleet.bench'), file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "[]" and "usage: fleet" in out.stdout


def test_every_option_shows_its_default():
    """Every option that takes a value says its default in --help: appended by the formatter, or written in
    its help (options whose default is None say what happens without them)."""
    from fleet.cli.completion import _subparsers

    missing = []
    for name, sub in _subparsers(build_parser()).items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.nargs == 0 or action.required or action.help == argparse.SUPPRESS:
                continue
            text = formatter._expand_help(action) if action.help else ""
            if "default" not in text.lower():
                missing.append(f"fleet {name} {action.option_strings[-1]}")
        assert "(default: " in sub.format_help() or name == "completion", name
    assert not missing, missing
    assert "(default: 8080)" in " ".join(_subparsers(build_parser())["serve"].format_help().split())


def _complete(script: str, words: list[str]) -> list[str]:
    """COMPREPLY of the generated bash completion for the command line ``words`` (the last one is completed)."""
    line = " ".join(f"'{w}'" for w in words)
    shell = (
        f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _fleet_complete; "
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, check=True)
    return [w for w in out.stdout.splitlines() if w]


def test_bash_completion_completes_commands_options_and_choices(capsys):
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert "complete -o default -o bashdefault -F _fleet_complete fleet" in script
    assert _complete(script, ["fleet", "ver"]) == ["versions"]
    assert _complete(script, ["fleet", "--v"]) == ["--version"]
    assert set(_complete(script, ["fleet", "versions", "--"])) == {"--help", "--tracking-uri", "--json"}
    assert set(_complete(script, ["fleet", "gc", "--"])) >= {"--yes", "--keep-last", "--grace-hours", "--json"}
    assert _complete(script, ["fleet", "compress", "--bi"]) == ["--bits"]
    assert _complete(script, ["fleet", "compress", "--bits", ""]) == ["auto", "16", "8", "4", "2", "1"]
    assert _complete(script, ["fleet", "completion", "z"]) == ["zsh"]
    assert _complete(script, ["fleet", "compress", "--store", ""]) == []  # a value: the shell completes file names
    assert main(["completion", "zsh"]) == 0
    zsh = capsys.readouterr().out
    assert "bashcompinit" in zsh and zsh.endswith(script.split("\n", 1)[1])  # the same function under zsh
    with pytest.raises(SystemExit) as info:
        main(["completion", "fish"])
    assert info.value.code == 2


def test_compress_and_versions_json(tmp_path, monkeypatch, capsys, sqlite_tracking_uri):
    """`fleet compress --json` prints the run's summary as JSON on stdout (here a run id whose version is already
    committed and registered: nothing runs, no Ray); `fleet versions --json` the registry's rows."""
    import json

    from test_serving import build_version

    from fleet.storage import registry

    _no_ray_start(monkeypatch)
    store = tmp_path / "store"
    built = build_version(str(store), "night-1", num_campaigns=3)
    folder = store / "adfleet" / "versions" / "night-1"
    registry.register_version(
        fleet_name="adfleet",
        manifest_uri=built.uri,
        version_id="night-1",
        local_artifacts={
            "manifest.json": str(folder / "manifest.json"),
            "backbone.safetensors": str(folder / "backbone.safetensors"),
        },
        params={},
        metrics={
            "campaigns": 3,
            "fidelity_kl_median": 0.0,
            "fidelity_mean_ratio_within_10pct_share": 1.0,
            "quarantine_share": 0.0,
            "fidelity_auc_diff_median": 0.0,
            "fidelity_auc_diff_p10": 0.0,
        },
        plots={},
        tracking_uri=sqlite_tracking_uri,
    )
    events = pa.table({"campaign_id": ["a"], "event_types": [[1]], "features": [[0.0]], "label": [1]})
    write_events(str(tmp_path / "ev"), events)
    (tmp_path / "teachers").mkdir()
    code = main(
        [
            "compress",
            "--teachers",
            str(tmp_path / "teachers"),
            "--events",
            str(tmp_path / "ev"),
            "--store",
            str(store),
            "--run-id",
            "night-1",
            "--tracking-uri",
            sqlite_tracking_uri,
            "--json",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    summary = json.loads(out.out)  # stdout is the JSON document only
    assert summary["version_id"] == "night-1" and summary["exit_code"] == 0 and summary["rejects"] == []
    assert summary["registered"] == {
        "name": "adfleet",
        "version": "1",
        "run_id": summary["registered"]["run_id"],
        "existing": True,
        "champion": True,
        "gate": "passed",
        "gate_reasons": [],
        "gate_notes": [],
    }
    assert summary["metrics"] == {"campaigns": 3} and summary["manifest_uri"] == built.uri

    assert main(["versions", "adfleet", "--tracking-uri", sqlite_tracking_uri, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["version_id"], r["aliases"], r["gate"]) for r in rows] == [
        ("1", "night-1", ["champion"], "passed")
    ]
