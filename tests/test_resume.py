"""Resuming a run id: the configuration hash in plan.json, --force-config, what an interrupted run saved, and the
resume command (no Ray here; the Ctrl-C of a real `fleet compress` is tests/test_pipeline.py's)."""

import json

import pyarrow as pa
import pytest

from fleet.cli.main import main, resume_command
from fleet.core.errors import UsageError
from fleet.formats.events import write_events
from fleet.run.pipeline import (
    check_resume_settings,
    interrupted_line,
    run_settings,
    saved_progress,
    settings_sha256,
)
from fleet.run.stages import CompressConfig
from fleet.storage.store import WorkDir


def test_settings_hash_covers_the_config_and_the_inputs():
    base = run_settings(CompressConfig(), "/t", "/e")
    assert settings_sha256(base) == settings_sha256(run_settings(CompressConfig(), "/t", "/e"))
    for other in (run_settings(CompressConfig(head_steps=7), "/t", "/e"), run_settings(CompressConfig(), "/t2", "/e"),
                  run_settings(CompressConfig(), "/t", "/e", retrain_backbone=True),
                  run_settings(CompressConfig(), "/t", "/e", no_parent=True)):
        assert settings_sha256(other) != settings_sha256(base)
    secret = run_settings(CompressConfig(), "s3://AKIAEXAMPLE:topsecret@bucket/t", "/e")
    assert "topsecret" not in json.dumps(secret)  # plan.json never holds a credential


def _planned(tmp_path, settings) -> WorkDir:
    workdir = WorkDir(str(tmp_path / "store"), "adfleet", "r1")
    plan = {"shards": ["b00000", "b00001"], "batches": [["a", "b"], ["c"]], "all_campaigns": ["a", "b", "c"],
            "config": settings["config"], "inputs": settings["inputs"], "config_sha256": settings_sha256(settings)}
    workdir.write_json("plan.json", plan)
    return workdir


def test_resume_with_another_config_is_refused_unless_forced(tmp_path):
    planned = run_settings(CompressConfig(), "/t", "/e")
    workdir = _planned(tmp_path, planned)
    plan = workdir.read_json("plan.json")
    check_resume_settings(plan, run_settings(CompressConfig(), "/t", "/e"), workdir, "r1", force=False)  # same: fine
    changed = run_settings(CompressConfig(head_steps=7, bits=4), "/t", "/e2")
    with pytest.raises(UsageError) as info:
        check_resume_settings(plan, changed, workdir, "r1", force=False)
    message = str(info.value)
    assert settings_sha256(planned) in message and settings_sha256(changed) in message and "--force-config" in message
    assert "differs in: bits, head_steps, --events" in message and message.startswith(f"{workdir.uri}/plan.json: ")
    assert workdir.read_json("plan.json") == plan  # nothing changed

    check_resume_settings(plan, changed, workdir, "r1", force=True)
    forced = workdir.read_json("plan.json")
    assert forced["config_sha256"] == settings_sha256(changed) and forced["config"]["head_steps"] == 7
    assert forced["config_sha256_replaced"] == [settings_sha256(planned)] and forced["batches"] == plan["batches"]
    check_resume_settings(forced, changed, workdir, "r1", force=False)  # the next resume compares with the new one


def test_cli_refuses_before_ray_with_exit_2(tmp_path, capsys):
    events = pa.table({"campaign_id": ["a"], "event_types": [[1]], "features": [[0.0]], "label": [1]})
    write_events(str(tmp_path / "ev"), events)
    (tmp_path / "teachers").mkdir()
    (tmp_path / "c.json").write_text(json.dumps({"head_steps": 7}))
    teachers, ev = str(tmp_path / "teachers"), str(tmp_path / "ev")
    _planned(tmp_path, run_settings(CompressConfig(), teachers, ev, no_parent=True))
    argv = ["compress", "--teachers", teachers, "--events", ev, "--store", str(tmp_path / "store"), "--no-register",
            "--no-parent", "--run-id", "r1", "--config", str(tmp_path / "c.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "run r1 was planned with configuration sha256" in err and "(differs in: head_steps)" in err
    assert "--force-config" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_what_an_interrupted_run_saved(tmp_path):
    store = str(tmp_path / "store")
    assert saved_progress(store, "adfleet", "r1") == "nothing yet (no plan.json)"
    workdir = _planned(tmp_path, run_settings(CompressConfig(), "/t", "/e"))
    assert saved_progress(store, "adfleet", "r1") == "the plan, stage 1 for 0/3 campaigns"
    workdir.write_shard("soft_labels", "b00000", pa.table({"x": [1]}))
    workdir.write_bytes("backbone.safetensors", b"x")
    workdir.write_shard("heads", "b00001", pa.table({"x": [1]}))
    assert saved_progress(store, "adfleet", "r1") == "the plan, stage 1 for 2/3 campaigns, the backbone, stage 3 for 1/2 batches"
    line = interrupted_line(store, "adfleet", "r1", None, "fleet compress --run-id r1")
    assert line == (f"interrupted: run r1 saved the plan, stage 1 for 2/3 campaigns, the backbone, stage 3 for 1/2 "
                    f"batches in {workdir.uri}; resume with: fleet compress --run-id r1")


def test_resume_command():
    argv = ["compress", "--teachers", "t", "--events", "e b", "--run-id", "old", "--force-config",
            "--storage-options", '{"key": "AKIAEXAMPLE", "secret": "s3cr3t-value-123"}']
    command = resume_command(["fleet"], argv, "r1", {"key": "AKIAEXAMPLE", "secret": "s3cr3t-value-123"})
    assert command == ("fleet compress --teachers t --events 'e b' --storage-options "
                       "'{\"key\": \"***\", \"secret\": \"***\"}' --run-id r1")  # both secrets masked
    assert resume_command(["fleet"], ["compress", "--run-id=x", "--teachers", "t"], "x") == "fleet compress --teachers t --run-id x"
