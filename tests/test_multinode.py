"""fleet compress on a real two-node Ray cluster (head + worker started with the ``ray`` CLI on this
machine), inputs and store on the moto S3 server, registered in the MLflow server.

The cluster is stopped by killing exactly the processes it started (the process groups of the two
``ray start`` calls and their descendants), never with ``ray stop``: ``ray stop`` kills every Ray
process on the machine by name, including other people's test sessions and background jobs.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import fsspec
import pytest
from conftest import free_port

from fleet.storage.store import FleetVersion

pytestmark = pytest.mark.slow

BIN = os.path.dirname(sys.executable)
RAY = os.path.join(BIN, "ray")
FLEET = os.path.join(BIN, "fleet")

# Few steps keep it fast; campaigns_per_task=2 turns the 20-campaign fleet into 10 tasks per batch
# stage, more than the cluster's 2 CPUs, so both nodes get work.
CONFIG = {
    "backbone_steps": 300,
    "backbone_per_campaign": 200,
    "head_steps": 150,
    "campaigns_per_task": 2,
    "gate": {"min_median_auc_diff": -0.1, "min_p10_auc_diff": -0.3},
}


def _ray_env(token_path: str) -> dict:
    """Environment of every process of the cluster and of its clients: Ray's token authentication on, the
    cluster's own token read from a file (``RAY_AUTH_TOKEN_PATH``), never from a command line."""
    drop = ("RAY_ADDRESS", "FLEET_FAULT_AFTER_STAGE", "RAY_AUTH_TOKEN")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path, "RAY_USAGE_STATS_ENABLED": "0"}


class RayCluster:
    """A head node and ``workers`` worker nodes, 1 CPU each, on 127.0.0.1.

    Every ``ray start`` runs in its own session (``start_new_session``); Ray's daemons inherit its
    process group, which is how :meth:`stop` finds them (their titles, e.g. ``ray::DashboardAgent``,
    no longer carry the temp dir). Each node has its own short ``--temp-dir`` (Unix socket paths must
    stay under 108 bytes) and its own ports, so nothing collides with another Ray on the machine.
    """

    def __init__(self, workers: int = 1):
        self.temp = tempfile.mkdtemp(prefix="fleet-mn-", dir="/tmp")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.workers = workers
        self.groups: list[int] = []
        self.logs: list[str] = []
        self.token_path = os.path.join(self.temp, "auth_token")  # the cluster's token: 0600, in its temp dir
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        self.env = _ray_env(self.token_path)

    def _start(self, name: str, args: list[str]) -> None:
        log = os.path.join(self.temp, f"{name}.log")
        self.logs.append(log)
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    RAY,
                    "start",
                    *args,
                    "--num-cpus",
                    "1",
                    "--temp-dir",
                    os.path.join(self.temp, name),
                    "--object-store-memory",
                    str(100 * 1024**2),
                    "--dashboard-agent-listen-port",
                    str(free_port()),
                    "--include-log-monitor",
                    "false",
                    "--disable-usage-stats",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
            self.groups.append(proc.pid)  # == the process group id (start_new_session)
            try:
                code = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                code = None
        if code != 0:
            raise RuntimeError(f"ray start ({name}) failed with {code}:\n{self.tail(log)}")

    @staticmethod
    def tail(path: str, size: int = 3000) -> str:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")[-size:]

    def start(self) -> RayCluster:
        self._start(
            "head",
            [
                "--head",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--include-dashboard",
                "false",
                "--dashboard-port",
                str(free_port()),
                "--ray-client-server-port",
                str(free_port()),
            ],
        )
        for i in range(self.workers):
            self._start(f"worker{i}", ["--address", self.address, "--node-ip-address", "127.0.0.1"])
        return self

    def node_ids(self, expected: int, timeout: float = 60) -> list[str]:
        """Ids of the alive nodes, once ``expected`` of them have registered (asked from a subprocess:
        this test process may hold its own local Ray)."""
        code = (
            f"import json, ray; ray.init(address={self.address!r}, log_to_driver=False); "
            "print(json.dumps(sorted(n['NodeID'] for n in ray.nodes() if n['Alive'])))"
        )
        deadline = time.monotonic() + timeout
        while True:
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, env=self.env, timeout=120, check=False
            )
            ids = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []
            if len(ids) >= expected or time.monotonic() > deadline:
                return ids
            time.sleep(1)

    def processes(self) -> list[int]:
        """Pids of every live process this cluster started: members of its process groups, their
        descendants, and anything whose command line names its temp dir (Linux ``/proc``)."""
        table = _process_table()
        mine = {
            pid for pid, (ppid, pgid, cmdline) in table.items() if pgid in self.groups or self.temp + os.sep in cmdline
        }
        grew = True
        while grew:  # add descendants (a process that left the group still has a parent in it)
            more = {pid for pid, (ppid, _, _) in table.items() if ppid in mine} - mine
            mine |= more
            grew = bool(more)
        return sorted(mine - {os.getpid()})

    def stop(self, grace: float = 3) -> None:
        """SIGTERM every process of the cluster, SIGKILL what is left after ``grace`` seconds."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
            pids = self.processes()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while pids and time.monotonic() < deadline:
                time.sleep(0.2)
                pids = self.processes()
            if not pids:
                return

    def cleanup(self) -> None:
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture
def ray_cluster():
    """A two-node cluster, stopped (and checked stopped: no raylet, GCS or worker left) whatever the test does."""
    cluster = RayCluster(workers=1)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        left = cluster.processes()
        if not left:
            cluster.cleanup()
        assert not left, f"Ray processes left after stop: {left} (logs: {cluster.temp})"


def _process_table() -> dict[int, tuple[int, int, str]]:
    """``{pid: (ppid, pgid, cmdline)}`` of the live (non-zombie) processes, from ``/proc``."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        if fields[0] in ("Z", "X"):
            continue
        table[int(entry)] = (int(fields[1]), int(fields[2]), cmdline)
    return table


def _listing(fs, root: str) -> list[str]:
    return sorted(p.removeprefix(root.rstrip("/") + "/") for p in fs.find(root))


def test_compress_on_two_node_cluster_with_s3_and_mlflow_server(
    small_fleet, s3_server, s3_bucket, mlflow_server, ray_cluster, tmp_path
):
    options = s3_server["storage_options"]
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    bucket = s3_bucket.removeprefix("s3://")
    fs.put(small_fleet["root"] + "/", f"{bucket}/input/", recursive=True)
    node_ids = ray_cluster.node_ids(expected=2)
    assert len(node_ids) == 2, f"cluster has nodes {node_ids}; logs: {[ray_cluster.tail(p) for p in ray_cluster.logs]}"
    with open(ray_cluster.token_path) as f:  # token auth is on (RAY_AUTH_MODE=token); its token is on no command line
        token = f.read()
    assert not [pid for pid, (_, _, cmdline) in _process_table().items() if token in cmdline]

    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    cwd = tmp_path / "driver-cwd"  # the driver's working dir: must stay empty (no intermediates on local disk)
    cwd.mkdir()
    store, run_id = f"{s3_bucket}/store", "mn-night-1"
    cmd = [
        FLEET,
        "compress",
        "--teachers",
        f"{s3_bucket}/input/teachers",
        "--events",
        f"{s3_bucket}/input/events",
        "--store",
        store,
        "--fleet",
        "mnfleet",
        "--tracking-uri",
        mlflow_server,
        "--run-id",
        run_id,
        "--address",
        ray_cluster.address,
        "--config",
        str(config),
        "--storage-options",
        json.dumps(options),
    ]
    started = time.monotonic()
    out = subprocess.run(cmd, cwd=cwd, env=ray_cluster.env, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    print(f"fleet compress on 2 nodes: {time.monotonic() - started:.1f} s")

    # the version: on S3, all campaigns, tasks of both batch stages on both nodes
    version = FleetVersion.open(f"{store}/mnfleet/versions/{run_id}", options)
    metrics = version.manifest["metrics"]
    assert version.read_heads().num_rows == 20 and metrics["campaigns_ok"] == 20
    nodes = metrics["nodes"]
    assert set(nodes["soft_labels"]) == set(node_ids), nodes
    assert set(nodes["heads"]) == set(node_ids), nodes
    assert len(nodes["backbone"]) == 1 and nodes["backbone"][0] in node_ids
    assert metrics["stage1_shards_computed"] == 10 and metrics["stage3_shards_computed"] == 10

    # every intermediate lives in the run's work dir on the store: each planned shard's data and
    # done marker for stages 1 and 3, the backbone, the plan
    work = f"{bucket}/store/mnfleet/runs/{run_id}"
    files = _listing(fs, work)
    plan = json.loads(fs.cat_file(f"{work}/plan.json"))
    assert len(plan["shards"]) == 10
    for shard in plan["shards"]:
        for stage in ("soft_labels", "campaigns", "backbone_sample", "heads"):
            assert f"{stage}/{shard}.parquet" in files and f"{stage}/_done/{shard}" in files, (stage, shard, files)
    assert {"plan.json", "backbone.safetensors", "backbone_stats.json"} <= set(files)
    assert version.manifest["config"]["teachers_uri"].startswith("s3://")
    assert version.manifest["config"]["events_uri"].startswith("s3://")
    assert sorted(os.listdir(cwd)) == [], "the driver wrote to its local working dir"

    # registered in the MLflow server, champion points at the S3 manifest
    from fleet.storage import registry

    manifest_uri, version_id = registry.resolve_manifest_uri("models:/mnfleet@champion", mlflow_server)
    assert version_id == run_id and manifest_uri == f"{store}/mnfleet/versions/{run_id}/manifest.json"
