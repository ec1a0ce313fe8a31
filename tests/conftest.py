"""Shared pytest fixtures. Keep each group in its own clearly marked section."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest

# ============================================================================ S3 (moto server)
# A real S3 endpoint over HTTP (moto's server in a subprocess, once per session): s3fs talks the
# real protocol to it. moto's in-process mock does not work with s3fs's aiobotocore client.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """Start ``python -m moto.server`` on a free loopback port; yield ``{"endpoint_url",
    "storage_options"}`` (pass ``storage_options`` to fleet.store); stop it at the end."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile()  # not a pipe: the server logs every request and would block on a full pipe
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"moto server exited with {proc.returncode}: {log.read().decode()[-2000:]}")
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not answer on {url} within 60 s") from None
                time.sleep(0.2)
        yield {
            "endpoint_url": url,
            "storage_options": {
                "key": "testing",
                "secret": "testing",
                "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"},
            },
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket per test; returns its ``s3://name`` URI."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:16]}"
    # No region here: s3fs would send LocationConstraint=us-east-1, which S3 (and moto) reject.
    opts = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(key=opts["key"], secret=opts["secret"],
                           client_kwargs={"endpoint_url": s3_server["endpoint_url"]}, skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"


# ============================================================================ end of S3 section
