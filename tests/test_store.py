"""fleet.storage.store: fleet versions and run work dirs on a local path, memory:// and s3:// (moto server)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pickle
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from fleet.core.errors import InvalidCampaignIdError, StoreError
from fleet.formats.codec import HeadRow, heads_to_table, rejects_to_table, table_to_heads
from fleet.storage.store import (
    FleetVersion,
    RunDir,
    VersionWriter,
    join_uri,
    list_versions,
    open_fs,
    sha256_bytes,
    teachers_digest,
)


@dataclasses.dataclass
class Store:
    uri: str
    options: dict | None

    @property
    def fs(self):
        return open_fs(self.uri, self.options)[0]

    def path(self, *parts):
        return open_fs(join_uri(self.uri, *parts), self.options)[1]


@pytest.fixture(params=["local", "memory", "s3"])
def store(request, tmp_path):
    """The same store API on three filesystems."""
    if request.param == "local":
        yield Store(str(tmp_path / "store"), None)
    elif request.param == "memory":
        root = f"fleet-test-{uuid.uuid4().hex}"
        yield Store(f"memory://{root}", None)
        fsspec.filesystem("memory").rm(f"/{root}", recursive=True)
    else:
        yield Store(
            request.getfixturevalue("s3_bucket") + "/store", request.getfixturevalue("s3_server")["storage_options"]
        )


@pytest.fixture
def local_store(tmp_path):
    return Store(str(tmp_path / "store"), None)


# --------------------------------------------------------------------------- test data

N = 500
IDS = [f"c{i:05d}" for i in range(0, 2 * N, 2)]  # even numbers only: odd ids fall in gaps


def make_heads(ids=IDS, seed=0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = []
    for cid in ids:
        packed = rng.integers(0, 256, 97, dtype=np.uint8).tobytes()  # 193 values at 4 bits
        rows.append(
            HeadRow(
                campaign_id=cid,
                bits=4,
                shape=(193,),
                group_size=64,
                packed=packed,
                scales=np.asarray(rng.random(4), "<f2").tobytes(),
                teacher_sha256=hashlib.sha256(b"t" + cid.encode()).digest(),
                data_fingerprint=hashlib.sha256(b"d" + cid.encode()).digest()[:16],
                teacher_auc=float(np.float32(rng.random())),
                n_train=100,
                n_holdout=25,
            )
        )
    rng.shuffle(rows)
    return heads_to_table(rows)


def backbone():
    return {"embed.weight": torch.arange(12, dtype=torch.float32).reshape(4, 3), "rnn.bias": torch.ones(5)}


def write_version(store: Store, version_id: str, heads=None, commit=True, created_at=None, **heads_kw):
    writer = VersionWriter(store.uri, "adfleet", version_id, storage_options=store.options)
    writer.write_backbone(backbone(), {"arch": "gru", "hidden_size": "5"})
    writer.write_heads(
        make_heads() if heads is None else heads, **{"rows_per_part": 200, "row_group_size": 32, **heads_kw}
    )
    writer.write_rejects(rejects_to_table([("bad id!", "validate", "invalid campaign id"), ("c9", "heads", "nan")]))
    if not commit:
        return writer
    return writer.commit(
        {"seed": 7}, {"parent_version": "v0"}, {"auc_delta_median": -0.001, "bad": math.nan}, created_at=created_at
    )


# --------------------------------------------------------------------------- round trip


def test_round_trip(store):
    heads = make_heads()
    manifest_uri = write_version(store, "v1", heads)
    assert manifest_uri == join_uri(store.uri, "adfleet", "versions", "v1", "manifest.json")

    version = FleetVersion.open(manifest_uri, store.options)
    assert FleetVersion.open(join_uri(store.uri, "adfleet/versions/v1/"), store.options).manifest == version.manifest
    assert version.version_id == "v1" and version.uri == join_uri(store.uri, "adfleet", "versions", "v1")

    m = version.manifest
    assert m["format"] == "fleet-version/1.2" and m["heads_format"] == "fleet-heads/1.1" and m["fleet"] == "adfleet"
    assert m["heads_codec"] == "packed"
    assert m["campaigns"] == {"count": N, "first": "c00000", "last": f"c{2 * N - 2:05d}", "num_params_max": 193}
    assert m["config"] == {"seed": 7}
    assert m["metrics"] == {"auc_delta_median": -0.001, "bad": None}  # NaN is not JSON
    assert m["lineage"]["parent_version"] == "v0"
    pairs = zip(heads.column("campaign_id").to_pylist(), heads.column("teacher_sha256").to_pylist())
    assert m["lineage"]["teachers_sha256"] == teachers_digest(pairs)
    paths = [f["path"] for f in m["files"]]
    assert paths == [
        "backbone.safetensors",
        "heads/part-00000.parquet",
        "heads/part-00001.parquet",
        "heads/part-00002.parquet",
        "rejects.parquet",
    ]
    assert [p["rows"] for p in m["parts"]] == [200, 200, 100]
    assert m["parts"][1]["first_campaign"] == IDS[200] and m["parts"][1]["last_campaign"] == IDS[399]
    assert m["parts"][1]["row_groups"][:2] == [IDS[200], IDS[232]] and len(m["parts"][1]["row_groups"]) == 7
    fs = store.fs
    for f in m["files"]:
        data = fs.cat_file(store.path("adfleet/versions/v1", f["path"]))
        assert f["sha256"] == sha256_bytes(data) and f["bytes"] == len(data)

    tensors, metadata = version.read_backbone()
    assert metadata == {"arch": "gru", "hidden_size": "5"}
    for name, t in backbone().items():
        assert torch.equal(tensors[name], t)

    table = version.read_heads()
    assert table.equals(heads)
    assert version.read_rejects().column("campaign_id").to_pylist() == ["bad id!", "c9"]

    # point lookups through the manifest index
    expected = {h.campaign_id: h for h in table_to_heads(heads)}
    for cid in [IDS[0], IDS[31], IDS[32], IDS[199], IDS[200], IDS[250], IDS[-1]]:
        part, group = version.locate(cid)
        rows_before = sum(p["rows"] for p in m["parts"] if p["path"] < part)
        assert group == (IDS.index(cid) - rows_before) // 32
        assert version.read_head_row(cid) == expected[cid]
    assert version.locate("c00001") is not None and version.read_head_row("c00001") is None  # in a gap
    assert version.locate("a") is None and version.read_head_row("a") is None  # before the first
    assert version.locate("z") is None and version.read_head_row("zzz") is None  # after the last
    with pytest.raises(InvalidCampaignIdError):
        version.read_head_row("../c00000")


def test_list_versions_only_lists_committed_versions(store):
    assert list_versions(store.uri, "adfleet", store.options) == []
    write_version(store, "v-b", created_at="2025-01-02T00:00:00.000000Z")
    write_version(store, "v-a", created_at="2025-01-03T00:00:00.000000Z")
    write_version(store, "v-c", created_at="2025-01-02T00:00:00.000000Z")
    write_version(store, "v-uncommitted", commit=False)  # all files but no manifest
    assert list_versions(store.uri, "adfleet", store.options) == ["v-b", "v-c", "v-a"]
    with pytest.raises(StoreError, match="has no manifest.json: it was never committed or is still being written"):
        FleetVersion.open(join_uri(store.uri, "adfleet/versions/v-uncommitted"), store.options)
    assert list_versions(store.uri, "otherfleet", store.options) == []


def test_tampered_file_is_named(store):
    manifest_uri = write_version(store, "v1")
    part = store.path("adfleet/versions/v1/heads/part-00001.parquet")
    fs = store.fs
    data = bytearray(fs.cat_file(part))
    data[100] ^= 0xFF
    fs.pipe_file(part, bytes(data))
    with pytest.raises(StoreError, match="checksum mismatch") as err:
        FleetVersion.open(manifest_uri, store.options)
    assert err.value.path == join_uri(store.uri, "adfleet/versions/v1/heads/part-00001.parquet")
    assert "heads/part-00001.parquet" in str(err.value)
    # without verify at open, reading the file whole still checks it
    version = FleetVersion.open(manifest_uri, store.options, verify=False)
    with pytest.raises(StoreError, match="part-00001.parquet: checksum mismatch"):
        version.read_heads()
    version.read_backbone()  # untouched files still read

    fs.rm(store.path("adfleet/versions/v1/backbone.safetensors"))
    with pytest.raises(StoreError, match="backbone.safetensors: file listed in the manifest is missing"):
        version.read_backbone()


def test_unknown_manifest_major_is_refused(store):
    manifest_uri = write_version(store, "v1")
    path = store.path("adfleet/versions/v1/manifest.json")
    fs = store.fs
    manifest = json.loads(fs.cat_file(path))
    fs.pipe_file(path, json.dumps({**manifest, "format": "fleet-version/1.4"}).encode())
    assert FleetVersion.open(manifest_uri, store.options).version_id == "v1"  # newer minor: fine
    fs.pipe_file(path, json.dumps({**manifest, "format": "fleet-version/2"}).encode())
    with pytest.raises(StoreError, match=r"manifest.json: unsupported major version 'fleet-version/2'"):
        FleetVersion.open(manifest_uri, store.options)
    fs.pipe_file(path, json.dumps({**manifest, "heads_format": "fleet-heads/3.0"}).encode())
    with pytest.raises(StoreError, match="unsupported major version 'fleet-heads/3.0'"):
        FleetVersion.open(manifest_uri, store.options)
    escaping = [{**f, "path": "../../v0/" + f["path"]} for f in manifest["files"]]
    fs.pipe_file(path, json.dumps({**manifest, "files": escaping}).encode())
    with pytest.raises(StoreError, match="invalid file path"):
        FleetVersion.open(manifest_uri, store.options)
    fs.pipe_file(path, b"{not json")
    with pytest.raises(StoreError, match="not a fleet-version JSON"):
        FleetVersion.open(manifest_uri, store.options)


def test_versions_are_immutable(store):
    writer = write_version(store, "v1", commit=False)
    writer.commit()
    with pytest.raises(StoreError, match="already committed; versions are immutable"):
        writer.commit()
    with pytest.raises(StoreError, match="already committed"):
        writer.write_rejects(rejects_to_table([]))
    with pytest.raises(StoreError, match="already committed"):
        VersionWriter(store.uri, "adfleet", "v1", storage_options=store.options)
    assert FleetVersion.open(join_uri(store.uri, "adfleet/versions/v1"), store.options).manifest["config"] == {}


# --------------------------------------------------------------------------- work dir


def test_workdir_shards_and_markers(store):
    work = RunDir(store.uri, "adfleet", "run-2025-01-01", storage_options=store.options)
    assert work.uri == join_uri(store.uri, "adfleet", "runs", "run-2025-01-01")
    assert work.soft_labels.done() == set() and not work.soft_labels.is_done("00000")
    shard = pa.table({"campaign_id": ["c1", "c2"], "p": pa.array([0.25, 0.75], pa.float32())})
    work.soft_labels.write("00000", shard)
    work.soft_labels.write("00003", shard.slice(1))
    assert work.soft_labels.is_done("00000") and not work.soft_labels.is_done("00001")
    assert work.soft_labels.done() == {"00000", "00003"}
    assert work.soft_labels.read("00000").equals(shard)

    # a crash between data and marker: the shard is not done and will be redone
    work.write_bytes("soft_labels/00001.parquet", b"half a parquet file")
    assert not work.soft_labels.is_done("00001")
    with pytest.raises(StoreError, match="shard soft_labels/00001 is not done"):
        work.soft_labels.read("00001")

    # a damaged shard is refused
    work.write_bytes("soft_labels/00003.parquet", b"garbage")
    with pytest.raises(StoreError, match="00003.parquet: checksum mismatch"):
        work.soft_labels.read("00003")

    work.write_json("state/stage2.json", {"epoch": 3, "loss": math.inf})
    assert work.read_json("state/stage2.json") == {"epoch": 3, "loss": None}
    work.write_bytes("features.bin", b"\x00\x01")
    assert work.read_bytes("features.bin") == b"\x00\x01" and work.exists("features.bin")
    assert not work.exists("nothing.bin")
    with pytest.raises(StoreError, match="no such object"):
        work.read_bytes("nothing.bin")
    for bad in ["../x", "/abs", "a//b", ""]:
        with pytest.raises(StoreError, match="invalid"):
            work.write_bytes(bad, b"")
    with pytest.raises(StoreError, match="invalid shard"):
        work.soft_labels.write("../00000", shard)

    # a second RunDir on the same run (a resumed driver) sees the same state
    again = RunDir(store.uri, "adfleet", "run-2025-01-01", storage_options=store.options)
    assert again.soft_labels.done() == {"00000", "00003"}
    assert pickle.loads(pickle.dumps(work)).soft_labels.read("00000").equals(shard)  # as a Ray task gets it


# --------------------------------------------------------------------------- point reads


def test_read_head_row_reads_one_row_group(local_store, monkeypatch):
    heads = make_heads()
    write_version(local_store, "v1", heads, rows_per_part=N, row_group_size=16)
    version = FleetVersion.open(join_uri(local_store.uri, "adfleet/versions/v1"))
    part = version.manifest["parts"][0]
    assert len(part["row_groups"]) == math.ceil(N / 16)
    size = version.manifest["files"][1]["bytes"]

    calls, bytes_read = [], []
    real_file, real_open = pq.ParquetFile, version.fs.open

    class SpyParquetFile(real_file):
        def read_row_group(self, i, *args, **kwargs):
            calls.append(i)
            return super().read_row_group(i, *args, **kwargs)

        def read(self, *args, **kwargs):
            raise AssertionError("read_head_row must not read the whole file")

        def read_row_groups(self, *args, **kwargs):
            raise AssertionError("read_head_row must read one row group")

    class CountingFile:
        def __init__(self, f):
            self._f = f

        def read(self, n=-1):
            data = self._f.read(n)
            bytes_read.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    monkeypatch.setattr(pq, "ParquetFile", SpyParquetFile)
    monkeypatch.setattr(version.fs, "open", lambda *a, **kw: CountingFile(real_open(*a, **kw)))

    cid = IDS[300]
    row = version.read_head_row(cid)
    assert row == table_to_heads(heads.filter(pc.field("campaign_id") == cid))[0]
    assert calls == [300 // 16]
    cold = sum(bytes_read)
    bytes_read.clear()
    assert version.read_head_row(IDS[17]) is not None and calls == [300 // 16, 1]
    warm = sum(bytes_read)  # footer cached: only the row group's column chunks
    assert warm < size / 10, (warm, size)
    assert cold < size, (cold, size)


def pyarrow_only_read(heads_dir: str, filesystem) -> pa.Table:
    """A consumer without fleet: plain pyarrow over the heads parts."""
    import pyarrow.parquet as pq

    return pq.read_table(heads_dir, filesystem=filesystem)


def test_heads_parts_readable_without_fleet(store):
    heads = make_heads()
    write_version(store, "v1", heads)
    table = pyarrow_only_read(store.path("adfleet/versions/v1/heads"), store.fs)
    assert table.num_rows == N
    assert table.select(heads.column_names).cast(heads.schema).equals(heads)
    meta = pq.read_metadata(store.fs.open(store.path("adfleet/versions/v1/heads/part-00000.parquet")))
    assert meta.row_group(0).column(4).compression == "ZSTD"
    assert meta.schema.to_arrow_schema().metadata[b"format"] == b"fleet-heads/1.1"


def test_a_version_written_as_fleet_heads_1_0_is_read(local_store):
    """A version an older fleet wrote: parts without the 1.1 columns, ``heads_format`` ``fleet-heads/1``,
    a ``fleet-version/1`` manifest (no footer / row group checksums) and no Parquet page checksums."""
    import io

    from fleet.compression.metrics import CALIBRATION_KEYS
    from fleet.formats.codec import HEADS_SCHEMA

    heads = make_heads()
    manifest_uri = write_version(local_store, "v1", heads)
    fs, path = local_store.fs, local_store.path("adfleet/versions/v1")
    manifest = json.loads(fs.cat_file(f"{path}/manifest.json"))
    files = {f["path"]: f for f in manifest["files"]}
    for part in manifest["parts"]:
        old = pq.read_table(io.BytesIO(fs.cat_file(f"{path}/{part['path']}"))).drop_columns(list(CALIBRATION_KEYS))
        buf = io.BytesIO()
        pq.write_table(old.replace_schema_metadata({"format": "fleet-heads/1"}), buf, row_group_size=32)
        fs.pipe_file(f"{path}/{part['path']}", buf.getvalue())
        files[part["path"]].update(sha256=sha256_bytes(buf.getvalue()), bytes=len(buf.getvalue()))
        del part["footer"], part["row_group_checksums"]
    fs.pipe_file(
        f"{path}/manifest.json",
        json.dumps({**manifest, "format": "fleet-version/1", "heads_format": "fleet-heads/1"}).encode(),
    )

    version = FleetVersion.open(manifest_uri, local_store.options)  # checksums verified
    table = version.read_heads()
    assert table.schema.equals(HEADS_SCHEMA, check_metadata=True)
    assert table.equals(heads.sort_by("campaign_id"))  # make_heads sets none of the 1.1 fields
    assert all(table.column(k).null_count == N for k in CALIBRATION_KEYS)
    row = version.read_head_row(IDS[7])
    assert row.teacher_auc is not None and all(getattr(row, k) is None for k in CALIBRATION_KEYS)


# --------------------------------------------------------------------------- edge cases


def test_commit_needs_backbone_and_heads(local_store):
    writer = VersionWriter(local_store.uri, "adfleet", "v1")
    with pytest.raises(StoreError, match="needs write_backbone"):
        writer.commit()
    writer.write_backbone(backbone(), {})
    with pytest.raises(StoreError, match="needs write_backbone"):
        writer.commit()
    writer.write_heads(make_heads(IDS[:3]))
    with pytest.raises(StoreError, match="write_heads called twice"):
        writer.write_heads(make_heads(IDS[:3]))
    writer.commit()
    version = FleetVersion.open(join_uri(local_store.uri, "adfleet/versions/v1"))
    assert version.read_rejects().num_rows == 0  # written empty by commit


def test_bad_inputs_are_refused(local_store):
    with pytest.raises(StoreError, match="invalid fleet name"):
        VersionWriter(local_store.uri, "../adfleet", "v1")
    with pytest.raises(StoreError, match="invalid version id"):
        VersionWriter(local_store.uri, "adfleet", "v1/../../x")
    writer = VersionWriter(local_store.uri, "adfleet", "v1")
    with pytest.raises(StoreError, match="duplicate"):
        writer.write_heads(pa.concat_tables([make_heads(IDS[:2]), make_heads(IDS[1:2])]))
    with pytest.raises(StoreError, match="does not match fleet-heads/1"):
        writer.write_heads(pa.table({"campaign_id": ["c1"]}))
    with pytest.raises(StoreError, match="metadata must map str to str"):
        writer.write_backbone(backbone(), {"hidden_size": 5})
    writer.write_backbone(backbone(), {})
    writer.write_heads(make_heads(IDS[:3]))
    with pytest.raises(StoreError, match="teachers_sha256 does not match"):
        writer.commit(lineage={"teachers_sha256": "0" * 64})


def test_empty_fleet_version(local_store):
    writer = VersionWriter(local_store.uri, "adfleet", "v1")
    writer.write_backbone(backbone(), {})
    writer.write_heads(make_heads([]))
    version = FleetVersion.open(writer.commit())
    assert version.manifest["campaigns"] == {"count": 0, "first": None, "last": None}
    assert version.read_heads().num_rows == 0
    assert version.locate("c1") is None and version.read_head_row("c1") is None


def test_manifest_in_the_wrong_directory_is_refused(local_store):
    write_version(local_store, "v1")
    fs = local_store.fs
    fs.makedirs(local_store.path("adfleet/versions/v2"), exist_ok=True)
    fs.cp_file(
        local_store.path("adfleet/versions/v1/manifest.json"), local_store.path("adfleet/versions/v2/manifest.json")
    )
    with pytest.raises(StoreError, match="manifest names version 'v1' but lies in 'v2'"):
        FleetVersion.open(join_uri(local_store.uri, "adfleet/versions/v2"))


def test_join_uri():
    assert join_uri("s3://bucket/store/", "adfleet", "versions/") == "s3://bucket/store/adfleet/versions"
    assert join_uri("memory://", "a", "b") == "memory://a/b"
    assert join_uri("/tmp/store", "/a/", "b.parquet") == "/tmp/store/a/b.parquet"
