"""The command line contract: subcommands, flags and exit codes (0 ok, 1 failed, 2 usage, 3 quarantined)."""

import subprocess
import sys

import pyarrow as pa
import pytest

from fleet.cli import build_parser, main
from fleet.events import write_events


def test_every_documented_command_exists():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"synth", "compress", "serve", "predict", "inspect", "promote", "rollback", "versions"} <= set(commands)
    compress_flags = {s for a in commands["compress"]._actions for s in a.option_strings}
    assert {"--teachers", "--events", "--store", "--fleet", "--tracking-uri", "--bits", "--run-id", "--address",
            "--retrain-backbone", "--config", "--storage-options"} <= compress_flags


@pytest.mark.parametrize("argv", [["compress"], ["compress", "--teachers", "x", "--events", "y", "--bits", "3"],
                                  ["synth", "--campaigns", "x", "--out", "o"], ["nope"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_bad_storage_options_is_a_usage_error():
    out = subprocess.run([sys.executable, "-m", "fleet.cli", "compress", "--teachers", "t", "--events", "e",
                          "--storage-options", "{not json"], capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "JSON" in out.stderr


def test_bad_config_file_is_a_usage_error(tmp_path):
    (tmp_path / "c.json").write_text('{"bits": 3}')
    assert main(["compress", "--teachers", "t", "--events", "e", "--config", str(tmp_path / "c.json")]) == 2


def test_missing_teachers_fails_with_exit_1(tmp_path, ray_local, capsys):
    events = pa.table({"campaign_id": ["a"], "event_types": [[1]], "features": [[0.0]], "label": [1]})
    write_events(str(tmp_path / "ev"), events)  # valid events: the teachers are what is missing
    code = main(["compress", "--teachers", str(tmp_path / "none"), "--events", str(tmp_path / "ev"),
                 "--store", str(tmp_path / "store"), "--no-register"])
    assert code == 1
    out = capsys.readouterr()
    assert "teacher root does not exist" in out.err and "error" not in out.out  # stdout is for data


def test_nightly_job_validates_its_config(tmp_path):
    sys.path.insert(0, "jobs")
    import nightly

    (tmp_path / "bad.toml").write_text('[nightly]\nteachers = "t"\n')
    assert nightly.main(["--config", str(tmp_path / "bad.toml")]) == 2
    (tmp_path / "ok.toml").write_text('[nightly]\nteachers = "t"\nevents = "e"\nstore = "s"\n[compress]\nbits = 4\n')
    assert nightly.main(["--config", str(tmp_path / "ok.toml"), "--dry-run"]) == 0
    nightly_settings, config = nightly.load_config(str(tmp_path / "ok.toml"))
    assert config.bits == 4 and nightly_settings["store"] == "s"
