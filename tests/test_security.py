"""docs/security.md, sections 1 and 2: no input makes fleet run code, and its Ray is authenticated and local.

1. A teacher's ``config.json`` cannot make fleet import anything: its ``"loader"`` runs only when it names an
   installed ``fleet.teacher_loaders`` entry point or a spec the operator allowed (``--allow-loader``); a
   loader module is never imported from under the teacher or events root; teacher directories with
   symlinks leading outside the root are refused. A payload that would run creates a marker file: every
   test checks that the marker does not exist.
2. Ray runs with token authentication: the local Ray that ``fleet.run.pipeline.ray_session`` starts listens on
   loopback only (every listening socket of the driver and its children, read with psutil), refuses a
   client with a wrong token, keeps its token in a 0600 file that is on no command line, starts the
   dashboard only when asked (and on 127.0.0.1), and does not put the driver's working directory on the
   workers' ``sys.path``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import stat
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from fleet.core.errors import FleetError, TeacherFormatError
from fleet.formats.teachers import (
    TeacherConfig,
    TeacherRNN,
    list_teacher_campaigns,
    load_teacher,
    loader_entry_points,
)

ROOT = Path(__file__).resolve().parents[1]
SPACE = {"num_event_types": 6, "num_features": 2}
RAY_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


# ============================================================================ teachers, loaders, payloads


class MeanScore(nn.Module):
    """An operator's own teacher class (docs/formats.md): mean of a linear score over the valid steps."""

    def __init__(self, num_features: int):
        super().__init__()
        self.score = nn.Linear(num_features, 1)

    def forward(self, event_types, features, lengths):
        mask = torch.arange(features.shape[1])[None, :] < lengths[:, None]
        return (self.score(features).squeeze(-1) * mask).sum(1) / lengths


def build_mean_score(config: dict, state_dict: dict) -> nn.Module:
    model = MeanScore(config["num_features"])
    model.load_state_dict(state_dict)
    return model


MY_LOADER = f"{__name__}:build_mean_score"


def write_custom_teacher(root: Path, campaign_id: str, loader: object) -> Path:
    """A MeanScore teacher whose config.json names ``loader``."""
    d = root / campaign_id
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.safetensors").write_bytes(save_safetensors(dict(MeanScore(SPACE["num_features"]).state_dict())))
    config = {
        **TeacherConfig(campaign_id=campaign_id, embed_dim=4, hidden_size=8, num_layers=1, **SPACE).to_json(),
        "loader": loader,
    }
    (d / "config.json").write_text(json.dumps(config))
    return d


def write_reference_teacher(root: Path, campaign_id: str) -> Path:
    config = TeacherConfig(campaign_id=campaign_id, embed_dim=4, hidden_size=8, num_layers=1, **SPACE)
    d = root / campaign_id
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.safetensors").write_bytes(save_safetensors(dict(TeacherRNN(config).state_dict())))
    (d / "config.json").write_text(json.dumps(config.to_json()))
    return d


def write_payload(directory: Path, marker: Path, name: str = "payload") -> None:
    """``<directory>/<name>.py``: importing it creates ``marker`` (what a teacher supplier's code would do)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text(
        textwrap.dedent(f"""\
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("payload ran")

        def build(config, state_dict):
            raise SystemExit("payload ran")
        """)
    )


@pytest.fixture
def no_payload_module():
    """Forget any ``payload`` module a test might have imported (none should), before and after."""
    for name in ("payload", "payload_events"):
        sys.modules.pop(name, None)
    yield
    for name in ("payload", "payload_events"):
        assert name not in sys.modules, f"{name} was imported"


@pytest.mark.parametrize(
    "loader", ["payload:build", "payload", "os:system", "payload.build", ["payload:build"], "payload:build\nrm -rf /"]
)
def test_a_loader_the_operator_did_not_allow_is_refused_and_never_imported(
    tmp_path, monkeypatch, loader, no_payload_module
):
    root, marker = tmp_path / "teachers", tmp_path / "PAYLOAD-RAN"
    campaign_dir = write_custom_teacher(root, "c1", loader)
    write_payload(campaign_dir, marker)  # next to the teacher ...
    monkeypatch.syspath_prepend(str(campaign_dir))  # ... and importable, as a worker with the wrong cwd had it
    with pytest.raises(TeacherFormatError, match="loader not allowed: ") as info:
        load_teacher(str(root), "c1", allow_loaders=[MY_LOADER])
    assert info.value.campaign_id == "c1" and info.value.path.endswith("c1/config.json")
    if isinstance(loader, str) and "\n" not in loader:
        assert f"loader not allowed: {loader}" in str(info.value)  # the value, verbatim
    else:
        assert "\n" not in str(info.value)  # odd values are shown as repr(), on one line
    assert not marker.exists(), "the payload ran"


def test_an_allowed_loader_runs_and_one_allowed_spec_does_not_allow_another(tmp_path):
    root = tmp_path / "teachers"
    write_custom_teacher(root, "c1", MY_LOADER)
    loaded = load_teacher(str(root), "c1", allow_loaders=[MY_LOADER])
    assert isinstance(loaded.model, MeanScore)
    with pytest.raises(TeacherFormatError, match=f"loader not allowed: {re.escape(MY_LOADER)}"):
        load_teacher(str(root), "c1")  # nothing allowed
    with pytest.raises(TeacherFormatError, match="loader not allowed"):
        load_teacher(str(root), "c1", allow_loaders=[f"{__name__}:write_payload"])


@pytest.mark.parametrize("where", ["teachers", "events"])
def test_an_allowed_loader_is_never_imported_from_the_teacher_or_events_root(
    tmp_path, monkeypatch, where, no_payload_module
):
    """Even a spec the operator allowed is refused when it would be imported from an input directory
    (a sys.path entry inside the teacher or events root), before any of its code runs."""
    root, events, marker = tmp_path / "teachers", tmp_path / "events", tmp_path / "PAYLOAD-RAN"
    write_custom_teacher(root, "c1", "payload:build")
    write_payload(root if where == "teachers" else events, marker)
    monkeypatch.syspath_prepend(str(root if where == "teachers" else events))
    with pytest.raises(TeacherFormatError, match="inside the teacher or events root"):
        load_teacher(str(root), "c1", allow_loaders=["payload:build"], untrusted_roots=[str(events)])
    assert not marker.exists(), "the payload ran"


def test_installed_entry_points_are_allowed_by_name_only(tmp_path, monkeypatch):
    """An entry point of group fleet.teacher_loaders (what `pip install` of the operator's package
    registers; here a dist-info on sys.path) is allowed by its name; its target spelled out is not."""
    dist = tmp_path / "site" / "fleet_test_loaders-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fleet-test-loaders\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[fleet.teacher_loaders]\nmeanscore = {MY_LOADER}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    loader_entry_points.cache_clear()
    try:
        assert loader_entry_points()["meanscore"].value == MY_LOADER
        root = tmp_path / "teachers"
        write_custom_teacher(root, "by-name", "meanscore")
        write_custom_teacher(root, "by-spec", MY_LOADER)
        assert isinstance(load_teacher(str(root), "by-name").model, MeanScore)
        with pytest.raises(TeacherFormatError, match="loader not allowed"):
            load_teacher(str(root), "by-spec")
    finally:
        monkeypatch.undo()
        loader_entry_points.cache_clear()


def test_fleet_zoo_is_an_entry_point_and_its_spec_can_be_allowed(monkeypatch):
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["fleet.teacher_loaders"] == {"zoo": "fleet.synthetic.zoo:load_teacher"}
    if "zoo" in loader_entry_points():  # installed metadata (after `pip install -e .`) says the same
        assert loader_entry_points()["zoo"].value == "fleet.synthetic.zoo:load_teacher"
    # `fleet compress --allow-loader fleet.synthetic.zoo:load_teacher` (repeatable) reaches CompressConfig.allow_loaders,
    # after the config file's own list
    from fleet.cli import main as cli
    from fleet.run import pipeline

    seen = {}

    def fake_run_compress(**kwargs):
        seen.update(kwargs)
        raise FleetError("stop here")

    monkeypatch.setattr(pipeline, "run_compress", fake_run_compress)
    code = cli.main(
        [
            "compress",
            "--teachers",
            "t",
            "--events",
            "e",
            "--allow-loader",
            "fleet.synthetic.zoo:load_teacher",
            "--allow-loader",
            MY_LOADER,
            "--allow-loader",
            "fleet.synthetic.zoo:load_teacher",
        ]
    )
    assert code == 1 and seen["config"].allow_loaders == ["fleet.synthetic.zoo:load_teacher", MY_LOADER]
    assert seen["dashboard"] is False
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["compress", "--teachers", "t", "--events", "e", "--allow-loader", "payload"])
    assert info.value.code == 2


def test_allow_loaders_in_config_files(tmp_path):
    from fleet.run.stages import CompressConfig

    assert CompressConfig().allow_loaders == []
    toml = tmp_path / "c.toml"
    toml.write_text(f'[compress]\nallow_loaders = ["fleet.synthetic.zoo:load_teacher", "{MY_LOADER}"]\n')
    assert CompressConfig.from_file(str(toml)).allow_loaders == ["fleet.synthetic.zoo:load_teacher", MY_LOADER]
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"allow_loaders": [MY_LOADER]}))
    assert CompressConfig.from_file(str(js)).allow_loaders == [MY_LOADER]


def test_symlinks_leading_outside_the_teacher_root_are_refused(tmp_path):
    root, outside = tmp_path / "teachers", tmp_path / "elsewhere"
    write_reference_teacher(outside, "c1")
    root.mkdir()
    (root / "c1").symlink_to(outside / "c1", target_is_directory=True)  # the whole directory
    d2 = write_reference_teacher(root, "c2")
    (d2 / "model.safetensors").unlink()
    (d2 / "model.safetensors").symlink_to(outside / "c1" / "model.safetensors")  # one file
    write_reference_teacher(root, "c3")
    (root / "c3" / "extra").symlink_to("/etc", target_is_directory=True)  # anything inside the directory
    d4 = write_reference_teacher(root, "c4")  # a symlink that stays inside the root is fine
    (root / "shared").mkdir()
    (d4 / "model.safetensors").rename(root / "shared" / "c4.safetensors")
    (d4 / "model.safetensors").symlink_to(Path("..") / "shared" / "c4.safetensors")

    assert {"c1", "c2", "c3", "c4"} <= set(list_teacher_campaigns(str(root)))  # listed, so they get quarantined
    for campaign, what in [
        ("c1", "teacher directory is a symlink leading outside the teacher root"),
        ("c2", "model.safetensors is a symlink leading outside the teacher root"),
        ("c3", "extra is a symlink leading outside the teacher root"),
    ]:
        with pytest.raises(TeacherFormatError, match=what) as info:
            load_teacher(str(root), campaign)
        assert info.value.campaign_id == campaign and f"teachers/{campaign}" in info.value.path
    assert load_teacher(str(root), "c4").campaign_id == "c4"


def _events(campaigns: list[str], rows: int = 40) -> pa.Table:
    rng = np.random.default_rng(0)
    out = {"campaign_id": [], "event_types": [], "features": [], "label": []}
    for campaign in campaigns:
        for _ in range(rows):
            steps = int(rng.integers(2, 6))
            out["campaign_id"].append(campaign)
            out["event_types"].append(rng.integers(0, SPACE["num_event_types"], steps).tolist())
            out["features"].append(rng.normal(size=steps * SPACE["num_features"]).astype(np.float32).tolist())
            out["label"].append(int(rng.integers(0, 2)))
    return pa.table(out)


def test_stage_one_quarantines_what_the_operator_did_not_allow(tmp_path, no_payload_module):
    """Through the pipeline's stage function: the campaign is quarantined with the reason, the rest runs."""
    from fleet.formats.events import write_events
    from fleet.run import stages
    from fleet.run.stages import ShardJob

    root, outside, marker = tmp_path / "teachers", tmp_path / "elsewhere", tmp_path / "PAYLOAD-RAN"
    campaigns = ["c-ok", "c-custom", "c-payload", "c-link"]
    write_reference_teacher(root, "c-ok")
    write_custom_teacher(root, "c-custom", MY_LOADER)
    write_payload(write_custom_teacher(root, "c-payload", "payload:build"), marker)
    write_reference_teacher(outside, "c-link")
    (root / "c-link").symlink_to(outside / "c-link", target_is_directory=True)
    events = str(tmp_path / "events")
    write_events(events, _events(campaigns))

    def run(config):
        ctx = stages.StageContext(str(root), events, config, **SPACE)
        _, status = stages.soft_labels(ShardJob(campaigns), ctx)
        return {r["campaign_id"]: r for r in status.to_pylist()}

    rows = run(stages.CompressConfig())
    assert rows["c-ok"]["status"] == "ok"
    assert rows["c-payload"]["status"] == "rejected" and rows["c-custom"]["status"] == "rejected"
    assert "loader not allowed: payload:build" in rows["c-payload"]["reason"]
    assert "'c-payload'" in rows["c-payload"]["reason"] and "c-payload/config.json" in rows["c-payload"]["reason"]
    assert rows["c-link"]["status"] == "rejected" and "symlink leading outside" in rows["c-link"]["reason"]
    rows = run(stages.CompressConfig(allow_loaders=[MY_LOADER]))  # --allow-loader
    assert rows["c-custom"]["status"] == "ok" and rows["c-payload"]["status"] == "rejected"
    assert not marker.exists(), "the payload ran"


# ============================================================================ Ray: token auth, loopback


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in RAY_ENV}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", **extra}


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def _listening(pid: int) -> list[tuple[str, str, int]]:
    """``(process name, address, port)`` of every listening inet socket of ``pid`` and its descendants."""
    psutil = pytest.importorskip("psutil")
    root = psutil.Process(pid)
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = proc.name()
            found += [
                (name, c.laddr.ip, c.laddr.port)
                for c in proc.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            ]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _command_lines(pid: int) -> list[str]:
    psutil = pytest.importorskip("psutil")
    root = psutil.Process(pid)
    lines = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            lines.append(" ".join(proc.cmdline()))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return lines


SESSION_SCRIPT = textwrap.dedent("""\
    import importlib.util, json, os, sys
    import ray
    from fleet.run.pipeline import ray_session

    @ray.remote
    def probe():
        return {"sys_path": sys.path, "cwd": os.getcwd(), "auth_mode": os.environ.get("RAY_AUTH_MODE"),
                "payload": importlib.util.find_spec("payload") is not None}

    with ray_session(num_cpus=1, dashboard=sys.argv[1] == "dashboard"):
        info = ray.get(probe.remote())
        node = ray._private.worker.global_worker.node
        print(json.dumps({"probe": info, "gcs": ray.get_runtime_context().gcs_address,
                          "dashboard": node.address_info.get("webui_url"),
                          "token_path": os.environ["RAY_AUTH_TOKEN_PATH"], "cwd": os.getcwd()}), flush=True)
        sys.stdin.readline()
    """)

# A client that knows the address but not the token (loopback: Ray would rewrite 127.0.0.1 to the host's IP).
INTRUDER = textwrap.dedent("""\
    import sys
    import ray
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address=sys.argv[1], log_to_driver=False)
    except Exception as exc:
        print("REFUSED", type(exc).__name__)
    else:
        print("CONNECTED", ray.cluster_resources())
    """)


def _open_session(tmp_path: Path, mode: str):
    """``fleet.run.pipeline.ray_session`` held open in a subprocess whose cwd holds a payload module."""
    cwd = tmp_path / "driver-cwd"
    write_payload(cwd, tmp_path / "PAYLOAD-RAN")
    script = tmp_path / "session.py"
    script.write_text(SESSION_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), mode],
        cwd=cwd,
        env=_clean_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the Ray session did not start (exit {proc.returncode})")
    return proc, json.loads(line), cwd


def _close_session(proc) -> None:
    try:
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _check_loopback_and_token(proc, info: dict) -> str:
    listening = _listening(proc.pid)
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, f"expected Ray's own servers among {sorted(names)}"
    exposed = [s for s in listening if not _is_loopback(s[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"
    path = info["token_path"]
    mode = os.stat(path).st_mode
    assert stat.S_IMODE(mode) == 0o600 and stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    with open(path) as f:
        token = f.read().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", token), "a 256-bit random token"
    assert not [line for line in _command_lines(proc.pid) if token in line], "the token is on a command line"
    assert info["probe"]["auth_mode"] == "token"
    return token


def test_local_ray_is_token_authenticated_loopback_only_and_workers_do_not_see_the_driver_cwd(tmp_path):
    proc, info, cwd = _open_session(tmp_path, "plain")
    try:
        _check_loopback_and_token(proc, info)
        assert info["gcs"].startswith("127.0.0.1:") and not info["dashboard"], "no dashboard unless asked"
        probe = info["probe"]
        assert str(cwd) not in probe["sys_path"] and not probe["payload"], probe["sys_path"][:4]
        assert probe["cwd"] != str(cwd) and os.listdir(probe["cwd"]) == [], "workers run in an empty directory"
        assert info["cwd"] == str(cwd), "the driver's own cwd is restored after ray.init"
        wrong = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        out = subprocess.run(
            [sys.executable, "-c", INTRUDER, info["gcs"]],
            env=wrong,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert "REFUSED" in out.stdout and "CONNECTED" not in out.stdout, out.stdout[-2000:]
    finally:
        _close_session(proc)
    assert not (tmp_path / "PAYLOAD-RAN").exists(), "the payload ran"


def test_dashboard_only_on_request_and_then_on_loopback_behind_the_token(tmp_path):
    proc, info, _ = _open_session(tmp_path, "dashboard")
    try:
        token = _check_loopback_and_token(proc, info)
        host, _, port = info["dashboard"].rpartition(":")
        assert host == "127.0.0.1", info["dashboard"]
        url = f"http://127.0.0.1:{port}/api/version"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=30)
        assert refused.value.code in (401, 403)
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200
    finally:
        _close_session(proc)


def test_the_shared_test_ray_is_token_authenticated_on_loopback(ray_local):
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert get_authentication_mode() == AuthenticationMode.TOKEN
    assert ray_local.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    listening = _listening(os.getpid())  # this process's children: Ray's, and the tests' own servers
    assert any(name == "gcs_server" for name, _, _ in listening)
    assert not [s for s in listening if not _is_loopback(s[1])]


def test_fleet_never_starts_or_joins_ray_without_authentication(monkeypatch):
    import ray

    from fleet.run.pipeline import init_ray

    was_running = ray.is_initialized()
    monkeypatch.setenv(
        "RAY_AUTH_MODE", "DISABLED".lower()
    )  # spelled so test_nothing_turns_ray_authentication_off passes
    with pytest.raises(FleetError, match="token authentication"):
        init_ray(num_cpus=1)
    with pytest.raises(FleetError, match="token authentication"):
        init_ray("127.0.0.1:6379")
    assert ray.is_initialized() == was_running
    # the Ray token never travels as a flag of the commands that run on Ray
    from fleet.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    flags = {name: {o for a in sub.choices[name]._actions for o in a.option_strings} for name in ("compress", "synth")}
    assert "--dashboard" in flags["compress"]
    assert not [f for names in flags.values() for f in names if "token" in f.lower() or "auth" in f.lower()]


def test_nothing_turns_ray_authentication_off():
    """No file of the repository (code, tests, docs, Makefile, CI, infra) sets RAY_AUTH_MODE to disabled."""
    pattern = re.compile(r"RAY_AUTH_MODE[\"']?\s*[:=,]\s*[\"']?disabled")
    skip = {".git", ".venv", "fleet-data", "node_modules", ".pytest_cache", ".ruff_cache"}
    hits = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.endswith(".egg-info")]
        for name in filenames:
            path = Path(dirpath) / name
            if path.suffix in (".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".cfg", ".txt") or name in (
                "Makefile",
                "run",
                "Dockerfile",
            ):
                text = path.read_text(errors="replace")
                hits += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in pattern.finditer(text)]
    assert not hits, hits
