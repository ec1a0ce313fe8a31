"""infra/ cannot drift from the code: every manifest loads and has the fields its kind needs, every
`fleet ...` and `python jobs/nightly.py ...` command in infra/ (manifests, Dockerfiles, README code
blocks) and docs/operations.md uses commands and flags the current parsers have, and the CronJob's
submit script turns the RayJob template into a valid, uniquely named run. Fast: no cluster, no network."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML (a dependency of ray) is needed to read the manifests")

from fleet.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
NIGHTLY = ROOT / "jobs" / "nightly.py"
MANIFESTS = sorted(p for p in INFRA.rglob("*.yaml"))
DOCKERFILES = sorted(INFRA.rglob("Dockerfile"))
DOCS = [INFRA / "README.md", ROOT / "docs" / "operations.md"]
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in MANIFESTS for d in _docs(p)]


def _by_kind(kind: str) -> list[dict]:
    return [d for _, d in _all_docs() if d.get("kind") == kind]


def _one(kind: str, name: str) -> dict:
    found = [d for d in _by_kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in infra/, found {len(found)}"
    return found[0]


def _pod_specs(doc: dict) -> list[dict]:
    """Every pod spec inside a manifest (Deployment, StatefulSet, CronJob, RayJob head/workers/submitter)."""
    spec = doc.get("spec", {})
    kind = doc["kind"]
    if kind in ("Deployment", "StatefulSet", "Job"):
        return [spec["template"]["spec"]]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if kind == "RayJob":
        cluster = spec["rayClusterSpec"]
        pods = [cluster["headGroupSpec"]["template"]["spec"]]
        pods += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
        if "submitterPodTemplate" in spec:
            pods.append(spec["submitterPodTemplate"]["spec"])
        return pods
    return []


def _containers(doc: dict) -> list[dict]:
    return [c for pod in _pod_specs(doc) for c in pod.get("containers", []) + pod.get("initContainers", [])]


# ----------------------------------------------------------------------------- the parsers


def _subparsers(parser) -> dict:
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return dict(action.choices)
    return {}


def _flags(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


FLEET = build_parser()
FLEET_COMMANDS = _subparsers(FLEET)


def _nightly_parser():
    if not NIGHTLY.exists():
        pytest.skip("jobs/nightly.py does not exist yet: its flags cannot be checked")
    spec = importlib.util.spec_from_file_location("fleet_jobs_nightly", NIGHTLY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- finding commands in text

WRAPPERS = {"exec", "nice", "time", "sudo", "env", "nohup", "timeout"}


def _logical_lines(text: str) -> list[str]:
    return [line for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def _segments(line: str) -> list[list[str]]:
    """Shell words of each simple command on ``line`` (split on ; && || | and after a ``--``)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:  # unbalanced quotes: not shell
        return []
    out, current = [], []
    for word in words:
        if word and set(word) <= set(";&|") or word == "--" and current and current[0] in ("kubectl", "ray", "docker"):
            out.append(current)
            current = []
        else:
            current.append(word)
    out.append(current)
    return [seg for seg in (_strip_prefix(seg) for seg in out) if seg]


def _strip_prefix(seg: list[str]) -> list[str]:
    """Drop leading ``VAR=value`` assignments and wrappers (``nice -n 5``, ``timeout 600``, ``exec``)."""
    while seg:
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", seg[0]):
            seg = seg[1:]
        elif seg[0] in WRAPPERS:
            wrapper, seg = seg[0], seg[1:]
            while seg and seg[0].startswith("-"):
                option, seg = seg[0], seg[1:]
                if option == "-n" and seg:
                    seg = seg[1:]
            if wrapper == "timeout" and seg:
                seg = seg[1:]
        else:
            break
    return seg


def commands_in_text(text: str) -> list[tuple[str, list[str]]]:
    """``("fleet", argv)`` and ``("nightly", argv)`` for every such command in shell-like ``text``."""
    found = []
    for line in _logical_lines(text):
        for seg in _segments(line):
            head = os.path.basename(seg[0])
            if len(seg) > 1 and seg[1].startswith(("=", ":")):  # `fleet = "adfleet"` (TOML), not a command
                continue
            if head == "fleet":
                if len(seg) > 1:  # a bare `fleet` is a name (namespace, label), not a command
                    found.append(("fleet", seg[1:]))
            elif seg[:2] == ["docker", "run"]:  # docker run [options] <fleet image> ARGS: ENTRYPOINT fleet
                image = next((i for i, w in enumerate(seg) if re.search(r"/fleet:[^/]*$", w)), None)
                if image is not None and len(seg) > image + 1:
                    found.append(("fleet", seg[image + 1 :]))
            elif head.startswith("python") and len(seg) > 2 and seg[1:3] == ["-m", "fleet.cli.main"]:
                found.append(("fleet", seg[3:]))
            elif head.startswith("python") and len(seg) > 1 and seg[1].endswith("jobs/nightly.py"):
                found.append(("nightly", seg[2:]))
    return found


def _strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _code_blocks(markdown: str) -> list[str]:
    return re.findall(r"```[a-zA-Z]*\n(.*?)```", markdown, flags=re.DOTALL)


def _is_fleet_image(container: dict) -> bool:
    return re.search(r"/fleet:[^/]*$", container.get("image", "")) is not None


def all_commands() -> list[tuple[str, str, list[str]]]:
    """``(where, kind, argv)`` for every fleet / nightly command in infra/ and docs/operations.md."""
    out = []
    for path, doc in _all_docs():
        where = str(path.relative_to(ROOT))
        for text in _strings(doc):
            out += [(where, kind, argv) for kind, argv in commands_in_text(text)]
        for container in _containers(doc):
            if _is_fleet_image(container) and not container.get("command") and container.get("args"):
                out.append((f"{where}:{container['name']} (args to ENTRYPOINT fleet)", "fleet", container["args"]))
    for path in DOCKERFILES:
        text = path.read_text()
        out += [(str(path.relative_to(ROOT)), kind, argv) for kind, argv in commands_in_text(text)]
    for path in DOCS:
        if path.exists():
            for block in _code_blocks(path.read_text()):
                out += [(str(path.relative_to(ROOT)), kind, argv) for kind, argv in commands_in_text(block)]
    return out


def _check_argv(parser, argv: list[str], where: str) -> list[str]:
    errors = []
    flags = _flags(parser) | {"-h", "--help"}
    for word in argv:
        if word.startswith("--"):
            flag = word.split("=", 1)[0]
            if flag not in flags:
                errors.append(f"{where}: {parser.prog}: unknown flag {flag}")
    return errors


# ----------------------------------------------------------------------------- every manifest


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(INFRA)))
def test_manifest_loads_with_required_fields(path):
    docs = _docs(path)
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), f"{path}: apiVersion/kind missing"
        if doc["kind"] == "Kustomization":
            continue
        assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} without metadata.name"
        assert re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", doc["metadata"]["name"]), doc["metadata"]["name"]
        if doc["kind"] not in ("Namespace",):
            assert doc["metadata"].get("namespace") == "fleet", f"{path}: {doc['kind']} outside namespace fleet"
        for container in _containers(doc):
            resources = container.get("resources", {})
            for key in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(key, {})), (
                    f"{path}: container {container['name']} lacks resources.{key}.cpu/memory"
                )


def test_the_expected_manifests_exist():
    kinds = {(d["kind"], d.get("metadata", {}).get("name")) for _, d in _all_docs()}
    for expected in [
        ("RayJob", "fleet-nightly"),
        ("CronJob", "fleet-nightly"),
        ("ConfigMap", "fleet-env"),
        ("ConfigMap", "fleet-nightly"),
        ("Secret", "fleet-secrets"),
        ("Deployment", "mlflow"),
        ("Service", "mlflow"),
        ("StatefulSet", "mlflow-postgres"),
        ("Secret", "mlflow-secrets"),
        ("Deployment", "fleet-serve"),
        ("Service", "fleet-serve"),
    ]:
        assert expected in kinds, f"missing {expected} in infra/"


def test_references_resolve():
    """Every ConfigMap/Secret/ServiceAccount a pod uses is defined in infra/ (or generated by kustomize)."""
    kustomize = _docs(INFRA / "kuberay" / "kustomization.yaml")[0]
    defined = {(d["kind"], d["metadata"]["name"]) for _, d in _all_docs() if d["kind"] != "Kustomization"}
    defined |= {("ConfigMap", g["name"]) for g in kustomize.get("configMapGenerator", [])}
    secret_keys = {
        d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {})) for d in _by_kind("Secret")
    }
    for path, doc in _all_docs():
        for pod in _pod_specs(doc):
            if "serviceAccountName" in pod:
                assert ("ServiceAccount", pod["serviceAccountName"]) in defined, (path, pod["serviceAccountName"])
            for volume in pod.get("volumes", []):
                if "configMap" in volume:
                    assert ("ConfigMap", volume["configMap"]["name"]) in defined, (path, volume)
            for container in pod.get("containers", []):
                for source in container.get("envFrom", []):
                    for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                        if key in source:
                            assert (kind, source[key]["name"]) in defined, (path, source)
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in secret_keys.get(ref["name"], set()), (path, ref)
                for arg in container.get("args", []):
                    for var in re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", arg):  # $(VAR) expansion needs VAR in env
                        names = {e["name"] for e in container.get("env", [])}
                        names |= {
                            k
                            for s in container.get("envFrom", [])
                            if "secretRef" in s
                            for k in secret_keys.get(s["secretRef"]["name"], set())
                        }
                        assert var in names, f"{path}: {container['name']} expands $({var}) but does not define it"


# ----------------------------------------------------------------------------- RayJob + CronJob


def test_rayjob_nightly():
    job = _one("RayJob", "fleet-nightly")
    spec = job["spec"]
    assert spec["entrypoint"].strip()
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["template"]["spec"]["containers"]
    assert cluster["workerGroupSpecs"], "no worker group"
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["replicas"] >= 1
        assert group.get("minReplicas", 0) <= group["replicas"] <= group.get("maxReplicas", group["replicas"])
    # the cluster's Ray is the image's Ray
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    ray_version = re.search(r"ARG RAY_VERSION=(\S+)", dockerfile).group(1)
    assert cluster["rayVersion"] == ray_version, "rayVersion and the image's RAY_VERSION differ"
    # every rayStartParams key is a `ray start` option
    from ray.scripts.scripts import start

    options = {o.lstrip("-") for p in start.params for o in p.opts}
    for group in [head, *cluster["workerGroupSpecs"]]:
        unknown = set(group.get("rayStartParams", {})) - options
        assert not unknown, f"rayStartParams not known to `ray start`: {unknown}"
    # pods get credentials from the Secret and settings from the ConfigMap; the config file is mounted
    for pod in [head, *cluster["workerGroupSpecs"]]:
        container = pod["template"]["spec"]["containers"][0]
        refs = {next(iter(s.values()))["name"] for s in container.get("envFrom", [])}
        assert {"fleet-env", "fleet-secrets"} <= refs, f"{container['name']} lacks the ConfigMap or the Secret"


def test_rayjob_entrypoint_runs_the_nightly_with_its_mounted_config():
    job = _one("RayJob", "fleet-nightly")
    kind, argv = commands_in_text(job["spec"]["entrypoint"])[0]
    assert kind == "nightly"
    nightly = _nightly_parser()
    args = nightly.build_parser().parse_args(argv)
    mount_dir, key = os.path.split(args.config)
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == mount_dir)
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    config_map = _one("ConfigMap", volume["configMap"]["name"])
    assert key in config_map["data"], f"ConfigMap {config_map['metadata']['name']} has no key {key}"


def test_nightly_config_in_the_configmap_is_valid(tmp_path):
    nightly = _nightly_parser()
    path = tmp_path / "nightly.toml"
    path.write_text(_one("ConfigMap", "fleet-nightly")["data"]["nightly.toml"])
    settings, config = nightly.load_config(str(path))  # ValueError on unknown [compress] keys
    assert {"teachers", "events", "store", "fleet", "tracking_uri", "address"} <= set(settings)
    assert config.bits == "auto"


def test_cronjob_schedules_with_rbac():
    cron = _one("CronJob", "fleet-nightly")
    fields = cron["spec"]["schedule"].split()
    assert len(fields) == 5, cron["spec"]["schedule"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    bindings = [b for b in _by_kind("RoleBinding") if any(s["name"] == account for s in b["subjects"])]
    assert bindings, f"no RoleBinding for {account}"
    role = _one("Role", bindings[0]["roleRef"]["name"])
    assert any(
        "ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and {"create", "get"} <= set(r["verbs"])
        for r in role["rules"]
    )
    job_deadline = cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    assert job_deadline > _one("RayJob", "fleet-nightly")["spec"]["activeDeadlineSeconds"]


STUB_KUBECTL = """#!/bin/sh
echo "$*" >> "$STUB_LOG"
for last; do :; done
case "$*" in
  *"get rayjobs"*) printf '%s' "${STUB_ACTIVE:-}" ;;
  *" create -f "*) cp "$last" "$STUB_CREATED" ;;
  *"jobDeploymentStatus"*) printf 'Complete' ;;
  *"jobStatus"*) printf '%s' "${STUB_JOB_STATUS:-SUCCEEDED}" ;;
  *) echo "unexpected kubectl call: $*" >&2; exit 9 ;;
esac
"""


def _run_submit_script(tmp_path, **env) -> tuple[subprocess.CompletedProcess, Path]:
    cron = _one("CronJob", "fleet-nightly")
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    script = container["args"][0]
    template_env = next(e["value"] for e in container["env"] if e["name"] == "TEMPLATE")
    assert template_env == "/templates/rayjob-nightly.yaml"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(STUB_KUBECTL)
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IXUSR)
    created = tmp_path / "created.yaml"
    full_env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "NAMESPACE": "fleet",
        "TMPDIR": str(tmp_path),
        "TEMPLATE": str(INFRA / "kuberay" / "rayjob-nightly.yaml"),
        "STUB_LOG": str(tmp_path / "calls"),
        "STUB_CREATED": str(created),
        **env,
    }
    out = subprocess.run(
        [*container["command"], script], env=full_env, capture_output=True, text=True, timeout=30, check=False
    )
    return out, created


def test_cronjob_script_creates_a_unique_resumable_rayjob(tmp_path):
    out, created = _run_submit_script(tmp_path)
    assert out.returncode == 0, out.stderr
    template = _one("RayJob", "fleet-nightly")
    job = yaml.safe_load(created.read_text())
    name = job["metadata"]["name"]
    assert re.fullmatch(r"fleet-nightly-\d{8}t\d{6}z", name), name
    assert job["spec"]["entrypoint"].startswith(template["spec"]["entrypoint"] + " --run-id ")
    _, argv = commands_in_text(job["spec"]["entrypoint"])[0]
    args = _nightly_parser().build_parser().parse_args(argv)
    assert RUN_ID.match(args.run_id) and name == "fleet-" + args.run_id.lower()
    # nothing else changed
    job["metadata"]["name"], job["spec"]["entrypoint"] = template["metadata"]["name"], template["spec"]["entrypoint"]
    assert job == template


def test_cronjob_script_refuses_to_overlap_and_reports_failure(tmp_path):
    out, created = _run_submit_script(tmp_path, STUB_ACTIVE="fleet-nightly-20260101t010000z=Running\n")
    assert out.returncode != 0 and "still running" in out.stderr and not created.exists()
    out, created = _run_submit_script(
        tmp_path, STUB_ACTIVE="fleet-nightly-20260101t010000z=Complete\n", STUB_JOB_STATUS="FAILED"
    )
    assert out.returncode != 0 and created.exists()


# ----------------------------------------------------------------------------- Ray authentication, NetworkPolicy


def _env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _selects(selector: dict, labels: dict) -> bool:
    """Whether a label selector (matchLabels only: these manifests use no matchExpressions) selects ``labels``."""
    assert not selector.get("matchExpressions"), "matchExpressions are not checked by this test"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _ray_pod_labels() -> list[dict]:
    """Labels of every pod of the nightly's Ray cluster: head, each worker group, the job submitter."""
    spec = _one("RayJob", "fleet-nightly")["spec"]
    cluster = spec["rayClusterSpec"]
    templates = [
        cluster["headGroupSpec"]["template"],
        *(g["template"] for g in cluster["workerGroupSpecs"]),
        spec["submitterPodTemplate"],
    ]
    return [t.get("metadata", {}).get("labels", {}) for t in templates]


def test_ray_runs_with_token_auth_from_a_secret_the_serving_pods_never_get():
    spec = _one("RayJob", "fleet-nightly")["spec"]
    auth = spec["rayClusterSpec"]["authOptions"]
    assert auth["mode"] == "token", auth
    secret = _one("Secret", auth["secretName"])
    assert "auth_token" in secret.get("stringData", {}) | secret.get("data", {}), "KubeRay reads the key auth_token"
    # the submitter (`ray job submit` against the head's job API) authenticates with the same Secret
    env = _env_of(spec["submitterPodTemplate"]["spec"]["containers"][0])
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": auth["secretName"], "key": "auth_token"}
    # no manifest turns Ray's authentication off or puts a token in plain text, anywhere in infra/
    for _, doc in _all_docs():
        if doc["kind"] == "ConfigMap":
            assert doc.get("data", {}).get("RAY_AUTH_MODE", "token") == "token", doc["metadata"]["name"]
        for container in _containers(doc):
            for name, var in _env_of(container).items():
                if name == "RAY_AUTH_MODE":
                    assert var.get("value") == "token", (doc["metadata"]["name"], container["name"])
                if name == "RAY_AUTH_TOKEN":
                    assert "value" not in var, f"{container['name']}: RAY_AUTH_TOKEN must come from a Secret"
    # the serving pods never see the Ray token (nor the Secret holding it)
    for container in _containers(_one("Deployment", "fleet-serve")):
        assert "RAY_AUTH_TOKEN" not in _env_of(container)
        assert auth["secretName"] not in yaml.safe_dump(container), "the serving pods must not mount the Ray token"
    # and the Secret every fleet pod loads (fleet-secrets) does not hold it either
    assert "RAY_AUTH_TOKEN" not in set(_one("Secret", "fleet-secrets").get("stringData", {}))


def test_networkpolicy_admits_ray_ports_from_ray_pods_only():
    policy = _one("NetworkPolicy", "fleet-nightly-ray")["spec"]
    ray_pods = _ray_pod_labels()
    serve_pods = [_one("Deployment", "fleet-serve")["spec"]["template"]["metadata"]["labels"]]
    other_pods = [
        d["spec"]["jobTemplate"]["spec"]["template"].get("metadata", {}).get("labels", {}) for d in _by_kind("CronJob")
    ]
    other_pods += [
        d["spec"]["template"].get("metadata", {}).get("labels", {})
        for d in _by_kind("Deployment") + _by_kind("StatefulSet")
    ]
    assert "Ingress" in policy["policyTypes"]
    assert all(_selects(policy["podSelector"], labels) for labels in ray_pods), "the policy must cover every Ray pod"
    assert not any(_selects(policy["podSelector"], labels) for labels in serve_pods)
    assert policy["ingress"], "an empty ingress list would block the cluster's own traffic"
    pod_peers = 0
    for rule in policy["ingress"]:
        assert rule.get("from"), f"an ingress rule without `from` admits everyone: {rule}"
        for peer in rule["from"]:
            assert "ipBlock" not in peer, f"no address ranges: {peer}"
            if "namespaceSelector" in peer:  # the KubeRay operator: the job API port only, no pod of this namespace
                assert "podSelector" not in peer, peer
                assert peer["namespaceSelector"].get("matchLabels"), f"every namespace would be admitted: {peer}"
                assert [p["port"] for p in rule.get("ports", [])] == [8265], rule
                assert peer["namespaceSelector"]["matchLabels"].get("kubernetes.io/metadata.name") != "fleet"
                continue
            selector = peer["podSelector"]
            assert selector.get("matchLabels"), f"`podSelector: {{}}` admits every pod of the namespace: {peer}"
            pod_peers += 1
            for labels in serve_pods + other_pods:
                assert not _selects(selector, labels), f"{labels} (not a Ray pod) would reach the Ray ports"
            assert all(_selects(selector, labels) for labels in ray_pods), "Ray pods must reach each other"
    assert pod_peers, "no rule admits the Ray pods to each other"


# ----------------------------------------------------------------------------- MLflow, serving, Dockerfiles


def test_mlflow_server_deployment():
    deployment = _one("Deployment", "mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    argv = container["command"][1:] + container["args"]
    assert container["command"][0] == "mlflow" and argv[0] == "server"
    joined = " ".join(argv)
    assert "--backend-store-uri" in joined and "--artifacts-destination=s3://" in joined
    assert "$(MLFLOW_BACKEND_STORE_URI)" in joined, "the backend store URI must come from the Secret"
    from mlflow.cli import server

    options = {o for p in server.params for o in p.opts}
    unknown = {a.split("=", 1)[0] for a in argv[1:] if a.startswith("-")} - options
    assert not unknown, f"`mlflow server` has no {unknown}"
    service = _one("Service", "mlflow")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    env = _one("ConfigMap", "fleet-env")["data"]
    assert (
        f"{service['metadata']['name']}.fleet.svc.cluster.local:{service['spec']['ports'][0]['port']}"
        in env["MLFLOW_TRACKING_URI"]
    )


def test_serving_deployment_serves_the_champion_with_polling():
    container = _one("Deployment", "fleet-serve")["spec"]["template"]["spec"]["containers"][0]
    args = FLEET.parse_args(container["args"])
    assert args.command == "serve" and args.model.startswith("models:/") and args.model.endswith("@champion")
    assert args.poll_seconds and args.host == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_fleet_dockerfile():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, flags=re.MULTILINE)
    assert re.search(r"pip install --index-url https://download\.pytorch\.org/whl/cpu\b.*torch", text)
    torch_line = next(i for i, line in enumerate(text.splitlines()) if "download.pytorch.org/whl/cpu" in line)
    fleet_line = next(i for i, line in enumerate(text.splitlines()) if re.search(r'pip install "?/src', line))
    assert torch_line < fleet_line, "CPU torch must be installed before the package (else pip pulls CUDA torch)"
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert re.search(r'^ENTRYPOINT \["fleet"\]', text, flags=re.MULTILINE)
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert "*" in ignore and "!fleet/" in ignore and "!jobs/" in ignore  # fleet-data/ and .venv/ stay out
    uid = users[-1]
    for _, doc in _all_docs():
        for pod in _pod_specs(doc):
            for container in pod.get("containers", []):
                if _is_fleet_image(container):
                    run_as = pod.get("securityContext", {}).get("runAsUser")
                    assert run_as is None or str(run_as) == uid, f"{doc['metadata']['name']}: runAsUser {run_as}"


# ----------------------------------------------------------------------------- commands vs the parsers


def test_commands_are_found():
    """The scan is not vacuous: the commands the docs must show are there."""
    found = all_commands()
    fleet_commands = {argv[0] for _, kind, argv in found if kind == "fleet" and argv}
    assert {"compress", "serve", "promote", "rollback"} <= fleet_commands, fleet_commands
    assert any(kind == "nightly" for _, kind, _ in found)
    assert any("--ray" in argv for _, kind, argv in found if kind == "fleet" and argv[:1] == ["serve"])


def test_every_fleet_command_and_flag_exists_in_the_cli():
    errors = []
    for where, kind, argv in all_commands():
        if kind != "fleet":
            continue
        if not argv or argv[0].startswith("-"):
            errors += _check_argv(FLEET, argv, where)
            continue
        if argv[0] not in FLEET_COMMANDS:
            errors.append(f"{where}: `fleet {argv[0]}` is not a fleet command ({sorted(FLEET_COMMANDS)})")
            continue
        errors += _check_argv(FLEET_COMMANDS[argv[0]], argv[1:], where)
    assert not errors, "\n".join(errors)


def test_every_nightly_flag_exists_in_jobs_nightly():
    parser = _nightly_parser().build_parser()
    errors = []
    for where, kind, argv in all_commands():
        if kind == "nightly":
            errors += _check_argv(parser, argv, where)
    assert not errors, "\n".join(errors)


def test_the_scanner_catches_drift():
    bad = commands_in_text(
        "RAY_AUTH_MODE=token fleet compress --teachers t --no-such-flag 1 && fleet nope\n"
        "python /app/jobs/nightly.py --config x --bogus"
    )
    assert bad == [
        ("fleet", ["compress", "--teachers", "t", "--no-such-flag", "1"]),
        ("fleet", ["nope"]),
        ("nightly", ["--config", "x", "--bogus"]),
    ]
    assert commands_in_text(
        "docker run --rm -e A=b registry.example.com/fleet:0.1.0 serve --nope\n"
        "kubectl -n fleet exec deploy/x -- fleet rollback adfleet\nfleet = 'adfleet'\nfleet"
    ) == [("fleet", ["serve", "--nope"]), ("fleet", ["rollback", "adfleet"])]
    errors = _check_argv(FLEET_COMMANDS["compress"], bad[0][1][1:], "x")
    assert errors == ["x: fleet compress: unknown flag --no-such-flag"]
