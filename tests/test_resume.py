"""Resuming a run id: the configuration hash in plan.json, --force-config, what an interrupted run saved, and the
resume command (no Ray here; the Ctrl-C of a real `fleet compress` is tests/test_pipeline.py's)."""

import json

import pyarrow as pa
import pytest

from fleet.cli.main import main, resume_command
from fleet.core.errors import StoreError, UsageError
from fleet.formats.events import write_events
from fleet.run.pipeline import check_resume_settings, interrupted_line, saved_progress
from fleet.run.plan import Plan, run_settings, settings_sha256
from fleet.run.stages import CompressConfig, ShardJob
from fleet.storage.store import RunDir


def test_head_jobs_fit_shards_with_few_changed_campaigns_together():
    ids = [f"c{i:02d}" for i in range(16)]
    plan = Plan(ids, [ids[i : i + 4] for i in range(0, 16, 4)], ["s0", "s1", "s2", "s3"], 5, 2, {})
    everything = {c: ["t", "d"] for c in ids}
    assert [(j.shard, j.campaigns, j.parts) for j in plan.head_jobs(everything, set())] == [
        (f"s{k}", ids[4 * k : 4 * k + 4], {}) for k in range(4)
    ]  # a full run: one job per shard
    changed = {c: everything[c] for c in ("c01", "c05", "c14")}  # a night: at least 2 (half a batch) per job
    assert plan.head_jobs(changed, set()) == [
        ShardJob(["c01", "c05"], "s0", hashes=_sub(changed, "c01", "c05"), parts={"s0": ["c01"], "s1": ["c05"]}),
        ShardJob(["c14"], "s3", hashes=_sub(changed, "c14")),
    ]
    assert plan.head_jobs(changed, {"s0"}) == [
        ShardJob(["c05", "c14"], "s1", hashes=_sub(changed, "c05", "c14"), parts={"s1": ["c05"], "s3": ["c14"]})
    ]
    many = [f"c{i:02d}" for i in range(64)]
    wide = Plan(many, [many[i : i + 8] for i in range(0, 64, 8)], [f"s{k}" for k in range(8)], 5, 2, {})
    few = {c: ["t", "d"] for c in ("c00", "c16", "c32", "c48")}  # half a batch is 4: one job would idle CPUs
    assert [j.campaigns for j in wide.head_jobs(few, set())] == [["c00", "c16"], ["c32", "c48"]]


def _sub(mapping: dict, *keys: str) -> dict:
    return {k: mapping[k] for k in keys}


def test_settings_hash_covers_the_config_and_the_inputs():
    base = run_settings(CompressConfig(), "/t", "/e")
    assert settings_sha256(base) == settings_sha256(run_settings(CompressConfig(), "/t", "/e"))
    for other in (
        run_settings(CompressConfig(head_steps=7), "/t", "/e"),
        run_settings(CompressConfig(), "/t2", "/e"),
        run_settings(CompressConfig(), "/t", "/e", retrain_backbone=True),
        run_settings(CompressConfig(), "/t", "/e", no_parent=True),
    ):
        assert settings_sha256(other) != settings_sha256(base)
    secret = run_settings(CompressConfig(), "s3://AKIAEXAMPLE:topsecret@bucket/t", "/e")
    assert "topsecret" not in json.dumps(secret)  # plan.json never holds a credential


def _planned(tmp_path, settings) -> RunDir:
    workdir = RunDir(str(tmp_path / "store"), "adfleet", "r1")
    plan = Plan(
        shards=["b00000", "b00001"],
        batches=[["a", "b"], ["c"]],
        all_campaigns=["a", "b", "c"],
        num_event_types=1,
        num_features=1,
        config=settings["config"],
        inputs=settings["inputs"],
        config_sha256=settings_sha256(settings),
    )
    plan.write(workdir)
    return workdir


def test_resume_with_another_config_is_refused_unless_forced(tmp_path):
    planned = run_settings(CompressConfig(), "/t", "/e")
    workdir = _planned(tmp_path, planned)
    plan = Plan.read(workdir)
    check_resume_settings(plan, run_settings(CompressConfig(), "/t", "/e"), workdir, "r1", force=False)  # same: fine
    changed = run_settings(CompressConfig(head_steps=7, bits=4), "/t", "/e2")
    with pytest.raises(UsageError) as info:
        check_resume_settings(plan, changed, workdir, "r1", force=False)
    message = str(info.value)
    assert settings_sha256(planned) in message and settings_sha256(changed) in message and "--force-config" in message
    assert "differs in: bits, head_steps, --events" in message and message.startswith(f"{workdir.uri}/plan.json: ")
    assert Plan.read(workdir) == plan  # nothing changed

    check_resume_settings(plan, changed, workdir, "r1", force=True)
    forced = Plan.read(workdir)
    assert forced.config_sha256 == settings_sha256(changed) and forced.config["head_steps"] == 7
    assert forced.config_sha256_replaced == [settings_sha256(planned)] and forced.batches == plan.batches
    check_resume_settings(forced, changed, workdir, "r1", force=False)  # the next resume compares with the new one


def test_cli_refuses_before_ray_with_exit_2(tmp_path, capsys):
    events = pa.table({"campaign_id": ["a"], "event_types": [[1]], "features": [[0.0]], "label": [1]})
    write_events(str(tmp_path / "ev"), events)
    (tmp_path / "teachers").mkdir()
    (tmp_path / "c.json").write_text(json.dumps({"head_steps": 7}))
    teachers, ev = str(tmp_path / "teachers"), str(tmp_path / "ev")
    _planned(tmp_path, run_settings(CompressConfig(), teachers, ev, no_parent=True))
    argv = [
        "compress",
        "--teachers",
        teachers,
        "--events",
        ev,
        "--store",
        str(tmp_path / "store"),
        "--no-register",
        "--no-parent",
        "--run-id",
        "r1",
        "--config",
        str(tmp_path / "c.json"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "run r1 was planned with configuration sha256" in err and "(differs in: head_steps)" in err
    assert "--force-config" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_what_an_interrupted_run_saved(tmp_path):
    store = str(tmp_path / "store")
    assert saved_progress(store, "adfleet", "r1") == "nothing yet (no plan.json)"
    workdir = _planned(tmp_path, run_settings(CompressConfig(), "/t", "/e"))
    assert saved_progress(store, "adfleet", "r1") == "the plan, stage 1 for 0/3 campaigns"
    workdir.soft_labels.write("b00000", pa.table({"x": [1]}))
    workdir.write_backbone(b"x")
    workdir.heads.write("b00001", pa.table({"x": [1]}))
    assert (
        saved_progress(store, "adfleet", "r1")
        == "the plan, stage 1 for 2/3 campaigns, the backbone, stage 3 for 1/2 batches"
    )
    line = interrupted_line(store, "adfleet", "r1", None, "fleet compress --run-id r1")
    assert line == (
        f"interrupted: run r1 saved the plan, stage 1 for 2/3 campaigns, the backbone, stage 3 for 1/2 "
        f"batches in {workdir.uri}; resume with: fleet compress --run-id r1"
    )


def test_resume_command():
    argv = [
        "compress",
        "--teachers",
        "t",
        "--events",
        "e b",
        "--run-id",
        "old",
        "--force-config",
        "--storage-options",
        '{"key": "AKIAEXAMPLE", "secret": "s3cr3t-value-123"}',
    ]
    command = resume_command(["fleet"], argv, "r1", {"key": "AKIAEXAMPLE", "secret": "s3cr3t-value-123"})
    assert command == (
        'fleet compress --teachers t --events \'e b\' --storage-options \'{"key": "***", "secret": "***"}\' --run-id r1'
    )  # both secrets masked
    assert (
        resume_command(["fleet"], ["compress", "--run-id=x", "--teachers", "t"], "x")
        == "fleet compress --teachers t --run-id x"
    )


def test_plan_json_round_trip_and_plans_written_before_the_plan_format(tmp_path):
    """plan.json keeps every key fleet always wrote, and a plan an older fleet wrote (no ``format``, no ``packed``,
    no ``config_sha256``, ...) still reads: a run planned before resumes after."""
    old = json.loads(
        json.dumps(
            {
                "all_campaigns": ["a", "b", "c"],
                "batches": [["a", "c"], ["b"]],
                "shards": ["b00000", "b00001"],
                "num_event_types": 8,
                "num_features": 3,
                "sizes": {"a": 10, "b": 5, "c": 7},
                "parent_manifest": "/s/adfleet/versions/v1/manifest.json",
                "parent_hashes": {"a": ["t", "d"]},
                "retrain_backbone": False,
                "config": CompressConfig().to_dict(),
            }
        )
    )
    run_dir = RunDir(str(tmp_path / "store"), "adfleet", "r1")
    run_dir.write_plan(old)
    plan = Plan.read(run_dir)
    assert plan.packed == {} and plan.inputs is None and plan.config_sha256 is None and plan.batches == old["batches"]
    plan.write(run_dir)
    written = run_dir.read_plan()
    assert {k: written[k] for k in old} == old and written["format"] == "fleet-plan/1"
    assert Plan.read(run_dir) == plan == Plan.from_json(plan.to_json())

    assert plan.soft_label_jobs({"a": 3, "b": 2}, plan.parent_hashes, done={"b00001"}) == [
        ShardJob(["a", "c"], "b00000", backbone_quota={"a": 3}, parent={"a": ["t", "d"]})
    ]
    assert plan.head_jobs({"b": ["t", "d"], "c": ["t2", "d2"]}, done={"b00000"}) == [
        ShardJob(["b"], "b00001", hashes={"b": ["t", "d"]})
    ]
    with pytest.raises(StoreError, match="lacks num_features"):
        Plan.from_json({k: v for k, v in old.items() if k != "num_features"})
    with pytest.raises(StoreError, match="fleet-plan/2"):
        Plan.from_json({**old, "format": "fleet-plan/2"})
