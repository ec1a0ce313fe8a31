"""A corrupt byte never becomes a wrong probability (docs/security.md, "Integrity of the store").

Every byte of a small version's heads file is flipped, one at a time; each time every answer the
version gives (head rows, served probabilities and metadata), with and without ``verify``, is either
exactly the original or an error. Plus: rows that break the heads contract, the registry's manifest
sha256, HTTP 503 ``store_unavailable``, ``fleet inspect`` on damaged versions, and stale temp files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time

import httpx
import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_http import serve, strict_json
from test_serving import build_version, random_sequences, run_cli

from fleet.core.errors import StoreError
from fleet.formats.codec import heads_to_table, table_to_heads
from fleet.serve.http import ModelHolder, create_app
from fleet.serve.serving import FleetModel, head_metadata
from fleet.storage.store import (
    TEMP_FILE_MAX_AGE_S,
    FleetVersion,
    RunDir,
    VersionWriter,
    _put,
    open_fs,
    remove_stale_temp_files,
)


def _part_path(built) -> str:
    return os.path.join(os.path.dirname(built.uri), "heads", "part-00000.parquet")


# --------------------------------------------------------------------------- every byte flipped


def test_no_byte_flip_of_a_heads_file_gives_a_wrong_answer(tmp_path):
    """4 campaigns (8/4/2/1 bits, one pruned) in one row group (a 6.7 kB file); each byte is XORed
    with a one-bit mask (bit ``pos % 8``) in turn, and for every flip:

    - ``FleetVersion.open(verify=True)`` is refused (StoreError);
    - a fresh ``FleetVersion`` opened with ``verify=False`` (``fleet serve --no-verify``, ``fleet inspect
      --campaign``) gives a campaign's original head row (which fixes both its probabilities and its
      metadata, :func:`fleet.serve.serving.head_metadata`) or StoreError; an absent id (every 4th flip)
      stays absent or errs;
    - a ``FleetModel`` opened (verified) before the damage, footer warm, no head cache (every lookup
      is a cold lookup after a verified open) gives bitwise the original probability and head status
      of a campaign, or StoreError; and (every 16th flip) its original metadata.

    The campaign asked alternates with the flip (all four share the row group's bytes), so each is
    asked ~1,700 times. One decode of a row group costs ~1.5 ms of pyarrow; asking all four every
    time would multiply the run for the same bytes read. Several row groups: see
    ``test_store_failures_are_503_store_unavailable_without_paths`` (one damaged, the other still
    answers) and ``test_heads_parts_carry_page_checksums_and_the_manifest_row_group_checksums``."""
    built = build_version(str(tmp_path), num_campaigns=4, row_group_size=4, rows_per_part=100)
    path = _part_path(built)
    with open(path, "rb") as f:
        original = f.read()
    ids = built.ids
    assert FleetVersion.open(built.uri).manifest["parts"][0]["row_groups"] == [ids[0]]
    absent = "camp-0003"  # inside the indexed range, not in the version
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1-row backbone pass: threads only add overhead
    try:
        served = FleetModel.open(built.uri, cache_size=0, heads="lru")  # verified while intact; every lookup reads
        seq = random_sequences(random.Random(5), 1, max_len=3)[0]

        def served_answer(cid):
            pred = served.predict_with_status(cid, [seq["event_types"]], [seq["features"]])
            return pred.probabilities.tobytes(), pred.fallback.tolist(), pred.statuses

        want_served = {cid: served_answer(cid) for cid in ids}
        want_meta = {cid: served.metadata(cid) for cid in ids}
        assert want_meta == {cid: head_metadata(built.rows[cid], built.version_id) for cid in ids}
        outcomes = {"exact": 0, "error": 0}

        def answer(fn, expected, what: str, pos: int) -> None:
            try:
                got = fn()
            except StoreError:
                outcomes["error"] += 1
                return
            assert got == expected, f"byte {pos} flipped: {what} silently changed"
            outcomes["exact"] += 1

        started = time.perf_counter()
        for pos in range(len(original)):
            damaged = bytearray(original)
            damaged[pos] ^= 1 << (pos % 8)
            with open(path, "wb") as f:
                f.write(damaged)
            with pytest.raises(StoreError, match="checksum mismatch"):
                FleetVersion.open(built.uri, verify=True)
            cid = ids[pos % len(ids)]
            fresh = FleetVersion.open(built.uri, verify=False)
            answer(lambda v=fresh, c=cid: v.read_head_row(c), built.rows[cid], f"row of {cid} (no verify)", pos)
            if pos % 4 == 0:
                answer(lambda v=fresh: v.read_head_row(absent), None, f"absent {absent} (no verify)", pos)
            answer(lambda c=cid: served_answer(c), want_served[cid], f"served probability of {cid}", pos)
            if pos % 16 == 0:
                meta_id = ids[pos // 16 % len(ids)]
                answer(lambda c=meta_id: served.metadata(c), want_meta[meta_id], f"served metadata of {meta_id}", pos)
        elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
        with open(path, "wb") as f:
            f.write(original)
    assert len(original) >= 1000 and outcomes["error"] > 0 and outcomes["exact"] > 0, outcomes
    print(f"{len(original)} flips: {outcomes} in {elapsed:.1f} s")  # shown with pytest -s


# --------------------------------------------------------------------------- rows that break the contract


def test_a_head_row_that_breaks_the_contract_is_refused_before_decoding(tmp_path):
    """A row whose ``packed`` is one byte short, written by a writer that checked nothing (its file
    checksums are right): reading it is a StoreError naming the campaign, never a decoded head."""
    built = build_version(str(tmp_path), num_campaigns=5, row_group_size=2, rows_per_part=100)
    table = heads_to_table(list(built.rows.values()))
    bad_id = built.ids[1]
    packed = [
        p[:-1] if cid == bad_id else p for cid, p in zip(table["campaign_id"].to_pylist(), table["packed"].to_pylist())
    ]
    table = table.set_column(table.schema.get_field_index("packed"), "packed", pa.array(packed, pa.binary()))
    version = FleetVersion.open(built.uri)
    writer = VersionWriter(str(tmp_path), "adfleet", "v2")
    writer.write_backbone_bytes(version.read_backbone_bytes())
    writer.write_heads(table, row_group_size=2)
    uri = writer.commit(config=version.manifest["config"])
    v2 = FleetVersion.open(uri)  # every file matches its manifest
    with pytest.raises(StoreError, match="invalid head row: packed has") as err:
        v2.read_head_row(bad_id)
    assert err.value.campaign_id == bad_id
    with pytest.raises(StoreError, match="invalid head row: packed has") as err:
        FleetModel.open(uri)  # heads="resident" checks every row at open
    assert err.value.campaign_id == bad_id
    model = FleetModel.open(uri, cache_size=0, heads="lru")
    seqs = random_sequences(random.Random(1), 2)
    with pytest.raises(StoreError, match="packed has"):
        model.predict(bad_id, seqs)
    with pytest.raises(StoreError, match="packed has"):
        model.metadata(bad_id)
    ok = built.ids[2]
    np.testing.assert_allclose(model.predict(ok, seqs), built.expected(ok, seqs), atol=1e-6)


# --------------------------------------------------------------------------- manifest sha256 in the registry


def test_load_refuses_a_manifest_that_does_not_match_the_registry_tag(tmp_path, sqlite_tracking_uri, capsys):
    from fleet.storage import registry, tracking

    built = build_version(str(tmp_path / "store"), num_campaigns=5)
    version = FleetVersion.open(built.uri)
    folder = tmp_path / "artifacts"
    folder.mkdir()
    (folder / "manifest.json").write_bytes(version.manifest_bytes)
    (folder / "backbone.safetensors").write_bytes(version.read_backbone_bytes())
    metrics = {
        "fidelity_auc_diff_median": 0.0,
        "fidelity_auc_diff_p10": 0.0,
        "quarantine_share": 0.0,
        "fidelity_kl_median": 0.0,
        "fidelity_mean_ratio_within_10pct_share": 1.0,
        "campaigns": 5,
        "campaigns_status_fallback": 0,
    }
    registry.register_version(
        fleet_name="adfleet",
        manifest_uri=built.uri,
        version_id=built.version_id,
        local_artifacts={
            "manifest.json": str(folder / "manifest.json"),
            "backbone.safetensors": str(folder / "backbone.safetensors"),
        },
        params={},
        metrics=metrics,
        plots={},
        tracking_uri=sqlite_tracking_uri,
    )
    sha = version.manifest_sha256
    assert sha == hashlib.sha256(version.manifest_bytes).hexdigest()
    assert registry.resolve_version("models:/adfleet/1", sqlite_tracking_uri) == (built.uri, built.version_id, sha)
    assert FleetModel.load("models:/adfleet@champion", sqlite_tracking_uri).version_id == built.version_id

    # the manifest is rewritten: same files, valid JSON, another campaign count
    manifest = json.loads(version.manifest_bytes)
    manifest["metrics"]["campaigns"] = 4
    with open(built.uri, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    with pytest.raises(StoreError, match=f"does not match the sha256 {sha} recorded in the registry"):
        FleetModel.load("models:/adfleet@champion", sqlite_tracking_uri)
    with tracking.fluent_uris(sqlite_tracking_uri), pytest.raises(StoreError, match="recorded in the registry"):
        mlflow.pyfunc.load_model("models:/adfleet/1")  # the pyfunc's fleet_model.json carries the sha256 too
    code, _, err = run_cli(["inspect", "models:/adfleet/1", "--tracking-uri", sqlite_tracking_uri], capsys)
    assert code == 1 and "recorded in the registry" in err
    FleetModel.load(built.uri)  # a plain URI names no registry tag


# --------------------------------------------------------------------------- HTTP: 503 store_unavailable


def test_store_failures_are_503_store_unavailable_without_paths(tmp_path):
    """A missing heads file and a damaged row group: 503 ``store_unavailable`` on predict and on
    campaign metadata (never 200, 422 or 500), and the body names no path of the store."""
    store = str(tmp_path / "store")
    built = build_version(store, num_campaigns=8, row_group_size=2, rows_per_part=100)
    model = FleetModel.open(built.uri, cache_size=0, heads="lru")  # verified at open; every lookup is cold
    path = _part_path(built)
    with open(path, "rb") as f:
        original = f.read()
    group = model.version.manifest["parts"][0]["row_group_checksums"][1]
    damaged = bytearray(original)
    damaged[group["offset"] + group["bytes"] // 2] ^= 0x10
    hit, intact = built.ids[2], built.ids[0]  # row group 1, row group 0
    body = {"campaign_id": hit, "sequences": random_sequences(random.Random(3), 2)}
    with serve(create_app(ModelHolder(model))) as url, httpx.Client(base_url=url, timeout=30) as client:
        for state in (bytes(damaged), None):
            if state is None:
                os.remove(path)
            else:
                with open(path, "wb") as f:
                    f.write(state)
            for r in (client.post("/v1/predict", json=body), client.get(f"/v1/campaigns/{hit}")):
                assert r.status_code == 503, r.text
                got = strict_json(r)
                assert got["code"] == "store_unavailable" and hit in got["detail"]
                assert store not in r.text and "part-00000" not in r.text and "heads/" not in r.text
            if state is not None:  # the other row group is intact and still answers, exactly
                r = client.get(f"/v1/campaigns/{intact}")
                assert (
                    r.status_code == 200 and strict_json(r)["teacher_sha256"] == built.rows[intact].teacher_sha256.hex()
                )
        with open(path, "wb") as f:
            f.write(original)
        assert client.get(f"/v1/campaigns/{intact}").status_code == 200
        assert client.post("/v1/predict", json=body).status_code == 200


# --------------------------------------------------------------------------- fleet inspect


def test_fleet_inspect_reports_missing_and_corrupt_files(tmp_path, capsys):
    built = build_version(str(tmp_path), num_campaigns=6, row_group_size=2, rows_per_part=3)
    code, out, _ = run_cli(["inspect", built.uri, "--json"], capsys)
    assert code == 0 and json.loads(out)["files_ok"] is True
    folder = os.path.dirname(built.uri)
    os.remove(os.path.join(folder, "heads", "part-00001.parquet"))
    with open(os.path.join(folder, "rejects.parquet"), "ab") as f:
        f.write(b"\0")
    code, out, err = run_cli(["inspect", built.uri, "--json"], capsys)
    assert code == 1 and json.loads(out)["files_ok"] is False
    assert "heads/part-00001.parquet: file listed in the manifest is missing" in err
    assert "rejects.parquet: checksum mismatch" in err and "2 of 4 files missing or corrupt" in err
    code, _, err = run_cli(["inspect", built.uri, "--campaign", built.ids[0]], capsys)  # its part is intact
    assert code == 1 and "part-00001.parquet" in err


# --------------------------------------------------------------------------- temp files of interrupted writes


def test_temp_files_of_interrupted_writes_are_removed_by_the_next_run(tmp_path):
    """``_put`` writes ``.<name>.tmp-<hex>`` then renames it; a write killed in between leaves the temp
    file. The next run of the same store (``run_compress`` calls :func:`remove_stale_temp_files` first)
    removes those older than ``TEMP_FILE_MAX_AGE_S``; a younger one (a write in progress) and every
    other file stay, and other fleets are not touched."""
    store = str(tmp_path / "store")
    build_version(store, num_campaigns=3)
    RunDir(store, "adfleet", "run-1").write_plan({"a": 1})
    fs, _ = open_fs(store)
    leftovers = [
        os.path.join(store, "adfleet", "versions", "v1", "heads", ".part-00000.parquet.tmp-" + "a" * 32),
        os.path.join(store, "adfleet", "versions", "v2", ".manifest.json.tmp-" + "b" * 32),
        os.path.join(store, "adfleet", "runs", "run-1", "soft_labels", "_done", ".00000.tmp-" + "c" * 32),
    ]
    young = os.path.join(store, "adfleet", "runs", "run-1", ".plan.json.tmp-" + "d" * 32)
    other_fleet = os.path.join(store, "otherfleet", "versions", "v1", ".manifest.json.tmp-" + "e" * 32)
    old = time.time() - TEMP_FILE_MAX_AGE_S - 60
    for p in [*leftovers, young, other_fleet]:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(b"partial")
        if p != young:
            os.utime(p, (old, old))
    before = {os.path.join(d, n) for d, _, names in os.walk(store) for n in names}
    assert sorted(remove_stale_temp_files(store, "adfleet")) == sorted(leftovers)
    after = {os.path.join(d, n) for d, _, names in os.walk(store) for n in names}
    assert after == before - set(leftovers) and young in after and other_fleet in after
    FleetVersion.open(os.path.join(store, "adfleet", "versions", "v1"))  # the version is intact
    _put(fs, os.path.join(store, "adfleet", "x.json"), b"{}")  # a completed put leaves no temp file
    assert not [n for n in os.listdir(os.path.join(store, "adfleet")) if ".tmp-" in n]
    assert remove_stale_temp_files("memory://store", "adfleet") == []  # object stores: nothing to do


def test_heads_parts_carry_page_checksums_and_the_manifest_row_group_checksums(tmp_path):
    built = build_version(str(tmp_path), num_campaigns=9, row_group_size=4, rows_per_part=100)
    path = _part_path(built)
    meta = pq.read_metadata(path)
    part = FleetVersion.open(built.uri).manifest["parts"][0]
    with open(path, "rb") as f:
        data = f.read()
    assert len(part["row_group_checksums"]) == meta.num_row_groups == 3
    for entry in [*part["row_group_checksums"], part["footer"]]:
        chunk = data[entry["offset"] : entry["offset"] + entry["bytes"]]
        assert hashlib.sha256(chunk).hexdigest() == entry["sha256"]
    assert part["footer"]["offset"] + part["footer"]["bytes"] == len(data)
    # page checksums: a flipped byte inside a data page fails pyarrow's own verification
    group = part["row_group_checksums"][0]
    damaged = bytearray(data)
    damaged[group["offset"] + group["bytes"] - 3] ^= 0x01
    damaged_path = tmp_path / "damaged.parquet"
    damaged_path.write_bytes(bytes(damaged))
    with pytest.raises(OSError, match="CRC|checksum|deserialize|Corrupt"):
        pq.ParquetFile(damaged_path, page_checksum_verification=True).read_row_group(0)
    assert table_to_heads(pq.read_table(path, page_checksum_verification=True))[0] == built.rows[built.ids[0]]
