"""Secrets stay secret (docs/security.md section 7): credentials in URIs (``s3://key:secret@...``, query
tokens) and storage options' secret values never reach a manifest, the rejects, MLflow params / tags /
artifacts, reject reasons, CLI errors, logs or HTTP bodies; they read ``***`` (:mod:`fleet.core.redact`)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from test_security import SPACE, _events, write_custom_teacher, write_reference_teacher
from test_serving import build_version
from torch import nn

from fleet.cli.main import main as fleet_main
from fleet.core.errors import StoreError
from fleet.core.redact import public_options, scrub, scrub_obj, secret_values
from fleet.formats.codec import rejects_to_table
from fleet.formats.events import write_events
from fleet.run import stages
from fleet.run.stages import ShardJob
from fleet.storage import registry
from fleet.storage.store import FleetVersion, VersionWriter, open_fs

ACCESS_KEY, SECRET_KEY = "AKIAFLEETLEAKTEST", "fleet-secret-value-7f3a"
PASSWORD, QUERY_TOKEN, SIGNATURE, HEADER_TOKEN = "hunter2-pw", "tok-5b1e-query", "sig-9c2d-amz", "hdr-4e8f-bearer"
SLASHED = "wJal/rXUtn+FEMI"  # an AWS-style secret key with "/" and "+"
LEAKS = (SECRET_KEY, PASSWORD, QUERY_TOKEN, SIGNATURE, HEADER_TOKEN)
#: URIs an operator may pass: userinfo, a query token, a presigned URL.
USERINFO_URI = f"s3://{ACCESS_KEY}:{PASSWORD}@bucket/teachers"
TOKEN_URI = f"https://events.example/fleet/events?token={QUERY_TOKEN}&v=2"
PRESIGNED_URI = (
    f"https://bucket.s3.example/fleet/v1/manifest.json?X-Amz-Credential={ACCESS_KEY}%2F20260101"
    f"&X-Amz-Signature={SIGNATURE}&X-Amz-Expires=600"
)


def assert_no_secret(text: str, where: str) -> None:
    for secret in LEAKS:
        assert secret not in text, f"{secret!r} leaked into {where}: {text[:2000]}"


# ----------------------------------------------------------------------------- the scrubber


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (USERINFO_URI, "s3://***@bucket/teachers"),
        (f"s3://{ACCESS_KEY}:p@ss@bucket/x", "s3://***@bucket/x"),  # an unescaped "@" in the password
        (TOKEN_URI, "https://events.example/fleet/events?token=***&v=2"),
        (
            PRESIGNED_URI,
            (
                "https://bucket.s3.example/fleet/v1/manifest.json?X-Amz-Credential=***&X-Amz-Signature=***"
                "&X-Amz-Expires=600"
            ),
        ),
        (
            "https://acct.blob.example/c/x?sv=2024&sig=abc%2Bdef&se=2026",
            "https://acct.blob.example/c/x?sv=2024&sig=***&se=2026",
        ),
        (
            f"key {SECRET_KEY}, {SLASHED} and its URL form {SLASHED.replace('/', '%2F').replace('+', '%2B')}",
            "key ***, *** and its URL form ***",
        ),
        ("s3://bucket/fleet/adfleet/versions/v1/manifest.json?version=3", None),  # nothing secret: unchanged
        ("row 3: 4/8 bits", None),
    ],
)
def test_scrub_masks_uri_credentials_query_tokens_and_known_values(text, expected):
    secrets = {SECRET_KEY, SLASHED}
    assert scrub(text, secrets) == (text if expected is None else expected)
    assert scrub(scrub(text, secrets), secrets) == scrub(text, secrets)  # idempotent


def test_storage_options_split_into_secret_values_and_a_public_part():
    options = {
        "key": ACCESS_KEY,
        "secret": SECRET_KEY,
        "token": "ab",  # too short to scrub as a value
        "client_kwargs": {"endpoint_url": f"https://minio:{PASSWORD}@minio.example:9000", "region_name": "eu-west-1"},
        "headers": {"Authorization": f"Bearer {HEADER_TOKEN}"},
        "config_kwargs": {"aws_session_token": "x" * 8},
    }
    assert secret_values(options) == {ACCESS_KEY, SECRET_KEY, f"Bearer {HEADER_TOKEN}", "x" * 8}
    public = public_options(options)
    assert public == {
        "client_kwargs": {"endpoint_url": "https://***@minio.example:9000", "region_name": "eu-west-1"},
        "headers": {},
        "config_kwargs": {},
    }
    assert scrub_obj({"a": [USERINFO_URI], "password": "plain", "n": 1}) == {
        "a": ["s3://***@bucket/teachers"],
        "password": "***",
        "n": 1,
    }


def test_fleet_errors_never_carry_credentials():
    err = StoreError(f"cannot read {TOKEN_URI}", campaign_id="c1", path=PRESIGNED_URI)
    assert_no_secret(str(err), "str(StoreError)")
    assert_no_secret(err.reason + err.path, "StoreError.reason/.path")
    assert str(err).startswith("campaign 'c1': https://bucket.s3.example/fleet/v1/manifest.json?X-Amz-Credential=***")


# ----------------------------------------------------------------------------- manifests and rejects


def test_manifest_and_rejects_hold_no_credentials(s3_server, s3_bucket, tmp_path):
    """A real version on S3 (moto): the config quotes credential URIs and the storage options' secret,
    the rejects quote them too; manifest.json and rejects.parquet, read back raw, hold none of them."""
    options = {**s3_server["storage_options"], "key": ACCESS_KEY, "secret": SECRET_KEY}  # moto takes any keys
    source = FleetVersion.open(build_version(str(tmp_path), "src", num_campaigns=4).uri)
    writer = VersionWriter(f"{s3_bucket}/store", "adfleet", "v1", options)
    writer.write_backbone_bytes(source.read_backbone_bytes())
    writer.write_heads(source.read_heads())
    writer.write_rejects(rejects_to_table([("c9", "soft_labels", f"cannot open {USERINFO_URI} with {SECRET_KEY}")]))
    manifest_uri = writer.commit(
        config={
            "teachers_uri": USERINFO_URI,
            "events_uri": TOKEN_URI,
            "note": f"secret {SECRET_KEY}",
            "storage": {"password": PASSWORD},
        },
        lineage={"source": PRESIGNED_URI},
        metrics={"campaigns": 4},
    )
    fs, _ = open_fs(manifest_uri, options)
    raw = fs.cat_file(manifest_uri).decode()
    assert_no_secret(raw, "manifest.json")
    manifest = json.loads(raw)
    assert manifest["config"]["teachers_uri"] == "s3://***@bucket/teachers"
    assert manifest["config"]["events_uri"] == "https://events.example/fleet/events?token=***&v=2"
    assert manifest["config"]["storage"] == {"password": "***"}
    with fs.open(manifest_uri.replace("manifest.json", "rejects.parquet"), "rb") as f:
        reasons = pq.read_table(f).column("reason").to_pylist()
    assert reasons == ["cannot open s3://***@bucket/teachers with ***"]


def leaky_loader(config: dict, state_dict: dict) -> nn.Module:
    """A custom teacher loader whose failure quotes a credential URL and the storage secret."""
    raise RuntimeError(
        f"cannot fetch https://bob:{PASSWORD}@models.example/w?token={QUERY_TOKEN} signed with {SECRET_KEY}"
    )


class LeakyForward(nn.Module):
    def forward(self, event_types, features, lengths):
        raise RuntimeError(f"remote scoring at {PRESIGNED_URI} refused key {SECRET_KEY}")


def leaky_forward_loader(config: dict, state_dict: dict) -> nn.Module:
    return LeakyForward()


def test_reject_reasons_hold_no_credentials(tmp_path):
    """Stage 1 itself: a loader's and a teacher's exception texts quote credentials; the reasons do not."""
    root, events = tmp_path / "teachers", str(tmp_path / "events")
    loaders = [f"{__name__}:leaky_loader", f"{__name__}:leaky_forward_loader"]
    write_reference_teacher(root, "c-ok")
    write_custom_teacher(root, "c-load", loaders[0])
    write_custom_teacher(root, "c-forward", loaders[1])
    write_events(events, _events(["c-ok", "c-load", "c-forward"]))
    ctx = stages.StageContext(
        str(root), events, stages.CompressConfig(allow_loaders=loaders), **SPACE, storage_options={"secret": SECRET_KEY}
    )
    _, status = stages.soft_labels(ShardJob(["c-ok", "c-load", "c-forward"]), ctx)
    rows = {r["campaign_id"]: r for r in status.to_pylist()}
    assert rows["c-ok"]["status"] == "ok"
    for cid in ("c-load", "c-forward"):
        assert rows[cid]["status"] == "rejected"
        assert_no_secret(rows[cid]["reason"], f"the reject reason of {cid}")
        assert f"'{cid}'" in rows[cid]["reason"] and "***" in rows[cid]["reason"]
    assert "loader" in rows["c-load"]["reason"] and "teacher forward failed" in rows["c-forward"]["reason"]


# ----------------------------------------------------------------------------- MLflow


def test_mlflow_params_tags_and_artifacts_hold_no_credentials(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = tmp_path / "v1"
    folder.mkdir()
    (folder / "manifest.json").write_text(
        json.dumps({"format": "fleet-version/1", "fleet": "adfleet", "version_id": "v1"})
    )
    (folder / "backbone.safetensors").write_bytes(b"\0" * 64)
    options = {
        "key": "AKIAOTHERKEY",
        "secret": SECRET_KEY,
        "headers": {"Authorization": f"Bearer {HEADER_TOKEN}"},
        "client_kwargs": {"endpoint_url": f"https://minio:{PASSWORD}@minio.example"},
    }
    registered = registry.register_version(
        fleet_name="adfleet",
        manifest_uri=PRESIGNED_URI,
        version_id="v1",
        local_artifacts={n: str(folder / n) for n in ("manifest.json", "backbone.safetensors")},
        params={"teachers_uri": USERINFO_URI, "events_uri": TOKEN_URI, "note": f"with {SECRET_KEY}"},
        metrics={"campaigns": 10},
        plots={},
        tracking_uri=uri,
        storage_options=options,
    )
    client = MlflowClient(uri, uri)
    tags = client.get_model_version("adfleet", registered.version).tags
    run = client.get_run(registered.run_id)
    model_dir = client.get_model_version_download_uri("adfleet", registered.version)
    data = Path(download_artifacts(artifact_uri=model_dir, dst_path=str(tmp_path / "model")), "data", "fleet")
    model_json = (data / "fleet_model.json").read_text()
    for where, text in (
        ("model version tags", json.dumps(tags)),
        ("run params", json.dumps(run.data.params)),
        ("run tags", json.dumps(run.data.tags)),
        ("fleet_model.json", model_json),
    ):
        assert_no_secret(text, where)
    assert tags["manifest_uri"].endswith("X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=600")
    assert run.data.params["teachers_uri"] == "s3://***@bucket/teachers"
    assert run.data.params["note"] == "with ***"
    assert json.loads(model_json)["storage_options"] == {
        "headers": {},
        "client_kwargs": {"endpoint_url": "https://***@minio.example"},
    }


# ----------------------------------------------------------------------------- CLI errors


@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "{uri}"],
        ["predict", "--model", "{uri}", "--input", "{input}"],
        ["serve", "--model", "{uri}", "--port", "0"],
    ],
)
def test_cli_errors_hold_no_credentials(command, tmp_path, capsys, monkeypatch):
    """A model URI with credentials that cannot be opened: the error names it, scrubbed."""
    monkeypatch.setenv("COLUMNS", "1000")  # rich must not wrap a secret across lines
    monkeypatch.delenv("FLEET_ADMIN_TOKEN", raising=False)
    bad = f"memory://bob:{PASSWORD}@nowhere/fleet/versions/v1?token={QUERY_TOKEN}"
    (tmp_path / "in.jsonl").write_text('{"event_types": [1], "features": [0.0]}\n')
    argv = [a.format(uri=bad, input=tmp_path / "in.jsonl") for a in command]
    assert fleet_main(argv) == 1
    out = capsys.readouterr()
    assert_no_secret(out.out + out.err, f"fleet {command[0]}'s output")
    assert "memory://***@nowhere/fleet/versions/v1?token=***" in out.out + out.err
