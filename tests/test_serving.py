"""fleet.serve.serving: FleetModel against a small real fleet version written with fleet.storage.store.

The expected probabilities are computed independently of fleet.serve.serving: the backbone decoded from
its safetensors, each head dequantized with fleet.compression.quant and scattered by its pruning mask, then
fleet.compression.student.head_logits and a sigmoid. ``build_version`` is imported by test_http and test_pyfunc.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fleet.compression.quant import dequantize_vector, magnitude_prune_mask, quantize_rows
from fleet.compression.student import SharedBackbone, StudentConfig, head_logits, head_num_params
from fleet.core.errors import StoreError, UnknownCampaignError
from fleet.formats.backbone_codec import decode_backbone, encode_backbone
from fleet.formats.codec import HeadRow, heads_to_table
from fleet.serve.serving import FleetModel, InvalidInputError, head_metadata
from fleet.storage.store import FleetVersion, VersionWriter

NUM_EVENT_TYPES, NUM_FEATURES = 12, 3
BITS_CYCLE = (8, 4, 2, 1, 16)


@dataclasses.dataclass
class BuiltVersion:
    """A committed version plus everything needed to compute its predictions independently."""

    uri: str  # manifest URI
    version_id: str
    config: StudentConfig
    backbone: SharedBackbone  # decoded (dequantized) backbone, eval mode
    heads: dict[str, torch.Tensor]  # campaign id -> dequantized head row (P,)
    rows: dict[str, HeadRow]

    @property
    def ids(self) -> list[str]:
        return sorted(self.heads)

    def expected(self, campaign_id: str, sequences: list[dict]) -> np.ndarray:
        """Probabilities computed directly (one sequence at a time, no padding)."""
        out = []
        with torch.no_grad():
            for seq in sequences:
                t = torch.tensor(seq["event_types"], dtype=torch.long)[None, :]  # (1, T)
                f = torch.tensor(seq["features"], dtype=torch.float32).reshape(1, len(seq["event_types"]), -1)
                h = self.backbone(t, f, torch.tensor([t.shape[1]]))  # (1, H)
                logit = head_logits(self.config.head, h, self.heads[campaign_id], self.config.head_rank)
                out.append(torch.sigmoid(logit).item())
        return np.array(out)


def _sha(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def build_version(
    store_uri: str,
    version_id: str = "v1",
    *,
    num_campaigns: int = 50,
    seed: int = 0,
    head: str = "film",
    head_rank: int = 1,
    row_group_size: int = 4,
    rows_per_part: int = 20,
    fleet: str = "adfleet",
    statuses: dict[str, str] | None = None,
    arch: str = "gru",
) -> BuiltVersion:
    """Write a real version: random backbone (int8), random heads at mixed bits (some pruned).
    ``statuses`` overrides the head status of some campaign ids (default: ok, fp16_fallback at 16 bits)."""
    torch.manual_seed(seed)
    config = StudentConfig(
        num_event_types=NUM_EVENT_TYPES,
        num_features=NUM_FEATURES,
        hidden_size=16,
        embed_dim=8,
        head=head,
        head_rank=head_rank,
        arch=arch,
    )
    backbone = SharedBackbone(config).eval()
    tensors, metadata = encode_backbone(backbone)
    decoded = decode_backbone(tensors, metadata)
    p = head_num_params(config)
    params = torch.randn(num_campaigns, p) * 0.5  # (C, P)
    ids = [f"camp-{i:04d}" for i in range(0, 2 * num_campaigns, 2)]  # odd ids fall in gaps
    rows, heads = {}, {}
    for bits in BITS_CYCLE:
        members = [i for i in range(num_campaigns) if BITS_CYCLE[i % len(BITS_CYCLE)] == bits]
        for i in members:
            cid = ids[i]
            x = params[i]
            mask = magnitude_prune_mask(x, 0.3) if i % 7 == 3 else None
            kept = x[mask] if mask is not None else x
            qv = quantize_rows(kept[None, :], bits, group_size=16)[0]
            dense = torch.zeros(p)
            if mask is not None:
                dense[mask] = dequantize_vector(qv)
            else:
                dense = dequantize_vector(qv)
            heads[cid] = dense
            rows[cid] = HeadRow(
                campaign_id=cid,
                bits=bits,
                shape=(p,),
                group_size=0 if bits == 16 else 16,
                packed=qv.packed,
                scales=qv.scales,
                mask=None if mask is None else np.packbits(mask.numpy(), bitorder="little").tobytes(),
                teacher_sha256=_sha("t" + cid),
                data_fingerprint=_sha("d" + cid)[:16],
                teacher_auc=0.75,
                student_auc=0.734375,
                mean_abs_diff=0.015625,
                agreement=0.984375,
                n_train=100 + i,
                n_holdout=25,
                status=(statuses or {}).get(cid, "fp16_fallback" if bits == 16 else "ok"),
            )
    writer = VersionWriter(store_uri, fleet, version_id)
    writer.write_backbone(tensors, metadata)
    writer.write_heads(heads_to_table(list(rows.values())), rows_per_part=rows_per_part, row_group_size=row_group_size)
    uri = writer.commit(config={"student": config.to_dict()}, metrics={"campaigns": num_campaigns})
    return BuiltVersion(uri, version_id, config, decoded, heads, rows)


def random_sequences(rng: random.Random, n: int, min_len: int = 1, max_len: int = 12) -> list[dict]:
    out = []
    for _ in range(n):
        t = rng.randint(min_len, max_len)
        out.append(
            {
                "event_types": [rng.randrange(NUM_EVENT_TYPES) for _ in range(t)],
                "features": [rng.uniform(-2, 2) for _ in range(t * NUM_FEATURES)],
            }
        )
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> BuiltVersion:
    return build_version(str(tmp_path_factory.mktemp("store")))


@pytest.fixture(scope="module")
def model(built) -> FleetModel:
    return FleetModel.open(built.uri, cache_size=1000)


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("heads", ["resident", "lru", "dense"])
def test_predict_equals_dequantized_student(built, heads):
    m = FleetModel.open(built.uri, heads=heads)
    rng = random.Random(1)
    for cid in built.ids:
        seqs = random_sequences(rng, 3)
        np.testing.assert_allclose(m.predict(cid, seqs), built.expected(cid, seqs), atol=1e-6, rtol=0)
    assert m.version_id == "v1" and m.num_campaigns == 50 and m.manifest["version_id"] == "v1"


@pytest.mark.parametrize("head,rank", [("lowrank", 2), ("linear", 1)])
def test_other_head_designs(tmp_path, head, rank):
    b = build_version(str(tmp_path), head=head, head_rank=rank, num_campaigns=10)
    m = FleetModel.open(b.uri)
    seqs = random_sequences(random.Random(2), 4)
    for cid in b.ids:
        np.testing.assert_allclose(m.predict(cid, seqs), b.expected(cid, seqs), atol=1e-6, rtol=0)


def test_mixed_batch_equals_per_campaign_predict(built, model):
    rng = random.Random(3)
    rows = []
    for _ in range(120):
        cid = rng.choice(built.ids)
        seq = random_sequences(rng, 1, 1, 40)[0]
        rows.append({"campaign_id": cid, **seq})
    got = model.predict_batch(rows)
    want = np.array([model.predict(r["campaign_id"], [r])[0] for r in rows])
    assert got.shape == (120,) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    direct = np.array([built.expected(r["campaign_id"], [r])[0] for r in rows])
    np.testing.assert_allclose(got, direct, atol=1e-6, rtol=0)


def test_large_batch_is_chunked_and_scattered_back(built, model):
    """More rows than one backbone chunk, very different lengths: order must be kept."""
    rng = random.Random(4)
    rows = [
        {"campaign_id": rng.choice(built.ids), **random_sequences(rng, 1, 1, 300 if i % 50 == 0 else 8)[0]}
        for i in range(600)
    ]
    got = model.predict_batch(rows)
    want = np.array([built.expected(r["campaign_id"], [r])[0] for r in rows])
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_numpy_inputs_and_one_code_path(built, model):
    rng = random.Random(5)
    seqs = random_sequences(rng, 5)
    ids = [built.ids[i] for i in (0, 1, 2, 1, 0)]
    as_np = model.predict_columns(
        ids, [np.array(s["event_types"], np.int32) for s in seqs], [np.array(s["features"], np.float32) for s in seqs]
    )
    as_rows = model.predict_batch([{"campaign_id": c, **s} for c, s in zip(ids, seqs)])
    np.testing.assert_allclose(as_np, as_rows, atol=1e-7, rtol=0)
    assert model.predict(built.ids[0], []).shape == (0,)
    assert model.predict_batch([]).shape == (0,)


def test_metadata(built, model):
    cid = built.ids[3]
    meta = model.metadata(cid)
    assert meta == head_metadata(built.rows[cid], "v1")
    assert meta["bits"] == built.rows[cid].bits and meta["version"] == "v1" and meta["n_train"] == 103
    assert meta["status"] == "ok" and meta["teacher_auc"] == pytest.approx(0.75) and meta["pruned"] is True
    with pytest.raises(UnknownCampaignError):
        model.metadata("camp-0001")


# --------------------------------------------------------------------------- caching


@pytest.fixture
def count_reads(monkeypatch):
    """Count Parquet row-group reads and whole-file/table reads (instrumentation, not a mock)."""
    calls = {"row_group": 0, "whole": 0}
    original_rg = pq.ParquetFile.read_row_group
    original_read = pq.ParquetFile.read
    original_table = pq.read_table

    def read_row_group(self, *a, **kw):
        calls["row_group"] += 1
        return original_rg(self, *a, **kw)

    def read(self, *a, **kw):
        calls["whole"] += 1
        return original_read(self, *a, **kw)

    def read_table(*a, **kw):
        calls["whole"] += 1
        return original_table(*a, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_row_group)
    monkeypatch.setattr(pq.ParquetFile, "read", read)
    monkeypatch.setattr(pq, "read_table", read_table)
    return calls


def test_cold_lookup_reads_one_row_group(built, count_reads):
    m = FleetModel.open(built.uri, cache_size=10, heads="lru")
    seqs = random_sequences(random.Random(6), 2)
    m.predict(built.ids[17], seqs)
    assert count_reads == {"row_group": 1, "whole": 0}
    m.predict(built.ids[17], seqs)  # warm: no I/O
    assert count_reads == {"row_group": 1, "whole": 0}
    assert m.cache_info()["hits"] == 1 and m.cache_info()["misses"] == 1
    m.predict_batch([{"campaign_id": c, **seqs[0]} for c in built.ids[20:23]])  # 3 cold heads
    assert count_reads == {"row_group": 4, "whole": 0}
    # an absent id inside an indexed range reads one row group once, then is remembered
    for _ in range(3):
        with pytest.raises(UnknownCampaignError):
            m.predict("camp-0035", seqs)
    assert count_reads["row_group"] == 5
    # an id beyond every part's range needs no read at all
    with pytest.raises(UnknownCampaignError):
        m.predict("zzz", seqs)
    assert count_reads == {"row_group": 5, "whole": 0}


def test_preload_reads_no_row_groups_per_request(built, count_reads):
    m = FleetModel.open(built.uri, preload=True)
    before = dict(count_reads)
    m.predict_batch([{"campaign_id": c, **random_sequences(random.Random(7), 1)[0]} for c in built.ids])
    assert count_reads == before
    assert m.cache_info()["preloaded"] and m.cache_info()["size"] == 50


def test_resident_reads_each_part_once_then_nothing(built, count_reads):
    m = FleetModel.open(built.uri)  # heads="resident", the default
    assert count_reads == {"row_group": 0, "whole": 3}  # the three parts, once, at open
    m.predict_batch([{"campaign_id": c, **random_sequences(random.Random(7), 1)[0]} for c in built.ids])
    with pytest.raises(UnknownCampaignError):
        m.predict("camp-0035", random_sequences(random.Random(7), 1))  # absent: no read either
    assert count_reads == {"row_group": 0, "whole": 3}
    info = m.cache_info()
    assert info["heads"] == "resident" and info["size"] == info["capacity"] == 50 and info["misses"] == 0


def test_lru_bound_and_order(built):
    m = FleetModel.open(built.uri, cache_size=5, heads="lru")
    seqs = random_sequences(random.Random(8), 1)
    for cid in built.ids[:30]:
        m.predict(cid, seqs)
        assert m.cache_info()["size"] <= 5
    assert m.cache_info()["size"] == 5
    # the five most recent are cached; touching the oldest keeps it past the next insertion
    recent = built.ids[25:30]
    m.predict(recent[0], seqs)
    misses = m.cache_info()["misses"]
    m.predict(built.ids[0], seqs)  # evicts recent[1], not recent[0]
    m.predict(recent[0], seqs)
    assert m.cache_info()["misses"] == misses + 1
    m.predict(recent[1], seqs)
    assert m.cache_info()["misses"] == misses + 2
    # a batch with more distinct campaigns than the cache holds is still right
    rows = [{"campaign_id": c, **seqs[0]} for c in built.ids]
    np.testing.assert_allclose(m.predict_batch(rows), [built.expected(c, seqs)[0] for c in built.ids], atol=1e-6)
    assert m.cache_info()["size"] == 5


def test_cache_disabled(built):
    m = FleetModel.open(built.uri, cache_size=0, heads="lru")
    seqs = random_sequences(random.Random(9), 2)
    np.testing.assert_allclose(m.predict(built.ids[4], seqs), built.expected(built.ids[4], seqs), atol=1e-6)
    assert m.cache_info()["size"] == 0


def test_thread_safety(built):
    m = FleetModel.open(built.uri, cache_size=7, heads="lru")  # small: constant eviction under load
    rng = random.Random(10)
    cases = []
    for _ in range(200):
        rows = [{"campaign_id": rng.choice(built.ids), **s} for s in random_sequences(rng, rng.randint(1, 4))]
        cases.append((rows, np.array([built.expected(r["campaign_id"], [r])[0] for r in rows])))
    errors, sizes = [], []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            sizes.append(m.cache_info()["size"])

    def work(k):
        try:
            for rows, want in cases[k::8]:
                if len({r["campaign_id"] for r in rows}) == 1 and k % 2:
                    got = m.predict(rows[0]["campaign_id"], rows)
                else:
                    got = m.predict_batch(rows)
                np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert not errors, errors[:3]
    assert max(sizes) <= 7
    info = m.cache_info()
    assert info["hits"] + info["misses"] >= 200


# --------------------------------------------------------------------------- errors


def test_unknown_campaign(model):
    with pytest.raises(UnknownCampaignError, match="camp-0001"):
        model.predict("camp-0001", [{"event_types": [1], "features": [0.0] * NUM_FEATURES}])
    with pytest.raises(UnknownCampaignError, match="row 1"):
        model.predict_batch(
            [
                {"campaign_id": "camp-0000", "event_types": [1], "features": [0.0] * 3},
                {"campaign_id": "nope", "event_types": [1], "features": [0.0] * 3},
            ]
        )
    assert issubclass(UnknownCampaignError, KeyError)


GOOD = {"event_types": [1, 2], "features": [0.5] * 6}


@pytest.mark.parametrize(
    "seq,match",
    [
        ({"event_types": [], "features": []}, "length 0"),
        ({"event_types": [1], "features": [0.0] * 4}, "expected T\\*num_features"),
        ({"event_types": [12], "features": [0.0] * 3}, r"\[0, 12\)"),
        ({"event_types": [-1], "features": [0.0] * 3}, r"\[0, 12\)"),
        ({"event_types": [1.5], "features": [0.0] * 3}, "integers"),
        ({"event_types": [True], "features": [0.0] * 3}, "integers"),
        ({"event_types": ["1"], "features": [0.0] * 3}, "integers"),
        ({"event_types": [2**70], "features": [0.0] * 3}, "integers|12"),
        ({"event_types": [[1]], "features": [0.0] * 3}, "integers"),
        ({"event_types": "12", "features": [0.0] * 3}, "integers"),
        ({"event_types": [1], "features": [0.0, float("nan"), 0.0]}, "finite"),
        ({"event_types": [1], "features": [0.0, float("inf"), 0.0]}, "finite"),
        ({"event_types": [1], "features": [0.0, 1e300, 0.0]}, "finite"),
        ({"event_types": [1], "features": ["a", "b", "c"]}, "numbers"),
        ({"event_types": [1], "features": [[0.0, 0.0, 0.0]]}, "flat"),
        ({"event_types": [1] * 1025, "features": [0.0] * 3075}, "1024"),
        ({"event_types": [1]}, "missing field 'features'"),
        ("not a dict", "object"),
    ],
)
def test_bad_inputs(model, built, seq, match):
    with pytest.raises(InvalidInputError, match=match) as info:
        model.predict(built.ids[0], [GOOD, seq])
    assert isinstance(info.value, ValueError) and info.value.row == 1


@pytest.mark.parametrize("cid", ["", "../etc", "a" * 200, None, 7, "has space"])
def test_bad_campaign_ids(model, cid):
    with pytest.raises(InvalidInputError, match="campaign id"):
        model.predict(cid, [GOOD])
    with pytest.raises(InvalidInputError, match="row 1"):
        model.predict_batch([{"campaign_id": "camp-0000", **GOOD}, {"campaign_id": cid, **GOOD}])


def test_max_sequence_length_is_configurable(built):
    m = FleetModel.open(built.uri, max_sequence_length=4)
    m.predict(built.ids[0], [{"event_types": [1] * 4, "features": [0.0] * 12}])
    with pytest.raises(InvalidInputError, match=r"\[1, 4\]"):
        m.predict(built.ids[0], [{"event_types": [1] * 5, "features": [0.0] * 15}])


def test_overflowing_features_are_an_input_error(model, built):
    """Finite float32 features can overflow inside the RNN; that must not come back as NaN."""
    seq = {"event_types": [1, 2, 3], "features": [3e38, -3e38, 3e38] * 3}
    try:
        out = model.predict(built.ids[0], [seq])
    except InvalidInputError as exc:
        assert "not finite" in str(exc)
    else:
        assert np.isfinite(out).all()


def test_open_refuses_a_bad_version(tmp_path, built):
    with pytest.raises(StoreError):
        FleetModel.open(str(tmp_path / "nothing" / "manifest.json"))


def test_storage_options_from_env(monkeypatch, built):
    monkeypatch.setenv("FLEET_STORAGE_OPTIONS", "[1]")
    with pytest.raises(ValueError, match="FLEET_STORAGE_OPTIONS"):
        FleetModel.open(built.uri)
    monkeypatch.setenv("FLEET_STORAGE_OPTIONS", "{}")
    assert FleetModel.open(built.uri).version_id == "v1"


def test_load_plain_uri(built):
    m = FleetModel.load(built.uri, cache_size=3, heads="lru")
    assert m.version_id == "v1" and m.cache_info()["capacity"] == 3 and m.source_uri == built.uri


def test_version_index_is_used(built):
    """The fixture really has many parts and row groups (so the one-row-group check means something)."""
    v = FleetVersion.open(built.uri)
    assert len(v.manifest["parts"]) == 3 and len(v.manifest["parts"][0]["row_groups"]) == 5


# --------------------------------------------------------------------------- CLI: fleet predict / inspect


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Parse ``argv`` with a parser holding only fleet.cli.serving's commands and run the handler."""
    import argparse

    from rich.console import Console

    from fleet.cli.serving import register

    parser = argparse.ArgumentParser(prog="fleet")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.handler(args, Console(stderr=True, width=200))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_predict_jsonl_and_parquet(built, tmp_path, capsys):
    import json

    import pyarrow as pa

    rng = random.Random(11)
    seqs = random_sequences(rng, 7)
    cid = built.ids[6]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps(s) + "\n" for s in seqs))
    code, out, _ = run_cli(["predict", "--model", built.uri, "--campaign", cid, "--input", str(jsonl)], capsys)
    assert code == 0
    np.testing.assert_allclose([float(x) for x in out.split()], built.expected(cid, seqs), atol=1e-6)

    ids = [built.ids[i % 5] for i in range(7)]  # events format: a campaign per row
    table = pa.table(
        {
            "campaign_id": ids,
            "event_types": [s["event_types"] for s in seqs],
            "features": [s["features"] for s in seqs],
            "label": [1, 0, None, 1, 0, 1, 0],
        },
        schema=pa.schema(
            [
                ("campaign_id", pa.string()),
                ("event_types", pa.list_(pa.int32())),
                ("features", pa.list_(pa.float32())),
                ("label", pa.int8()),
            ]
        ),
    )
    parquet = tmp_path / "in.parquet"
    pq.write_table(table, parquet)
    code, out, _ = run_cli(["predict", "--model", built.uri, "--input", str(parquet)], capsys)
    assert code == 0
    want = [built.expected(c, [s])[0] for c, s in zip(ids, seqs)]
    np.testing.assert_allclose([float(x) for x in out.split()], want, atol=1e-5)  # float32 features in the file

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(seqs[0]) + "\n" + json.dumps({"event_types": [99], "features": [0, 0, 0]}) + "\n")
    code, _, err = run_cli(["predict", "--model", built.uri, "--campaign", cid, "--input", str(bad)], capsys)
    assert code == 1 and "row 1" in err
    code, _, err = run_cli(["predict", "--model", built.uri, "--campaign", "camp-0001", "--input", str(jsonl)], capsys)
    assert code == 1 and "camp-0001" in err
    code, _, _ = run_cli(["predict", "--model", built.uri, "--input", str(jsonl)], capsys)  # no campaign anywhere
    assert code == 1
    code, _, _ = run_cli(
        ["predict", "--model", built.uri, "--campaign", cid, "--input", str(tmp_path / "x.jsonl")], capsys
    )
    assert code == 1
    code, _, _ = run_cli(
        ["predict", "--model", str(tmp_path / "none"), "--campaign", cid, "--input", str(jsonl)], capsys
    )
    assert code == 1


def test_cli_inspect(built, capsys):
    import json

    code, out, _ = run_cli(["inspect", built.uri, "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["version"] == "v1" and info["campaigns"]["count"] == 50 and info["heads_parts"] == 3
    assert info["bytes_per_campaign"] == pytest.approx(info["heads_bytes"] / 50)
    code, out, _ = run_cli(["inspect", built.uri, "--campaign", built.ids[2], "--json"], capsys)
    assert code == 0 and json.loads(out) == head_metadata(built.rows[built.ids[2]], "v1")
    code, out, err = run_cli(["inspect", built.uri], capsys)
    assert code == 0 and "v1" in err  # tables go to the console
    code, _, _ = run_cli(["inspect", built.uri, "--campaign", "camp-0001"], capsys)
    assert code == 1
    code, _, _ = run_cli(["inspect", built.uri, "--campaign", "../x"], capsys)
    assert code == 1


# --------------------------------------------------------------------------- quality-gate verdicts (head status)

GATED_STATUSES = {"camp-0000": "fallback", "camp-0002": "capacity", "camp-0004": "gate_failed", "camp-0006": "ok"}
FAILED_IDS = ("camp-0000", "camp-0004")  # camp-0008 is a 16-bit head: fp16_fallback, a pass


@pytest.fixture(scope="module")
def gated(tmp_path_factory) -> BuiltVersion:
    """10 campaigns; two heads did not pass their gate (fallback, gate_failed), the rest did."""
    return build_version(str(tmp_path_factory.mktemp("gated")), "g1", num_campaigns=10, statuses=GATED_STATUSES)


def test_head_passed_rule():
    from fleet.formats.codec import FAILED_STATUSES, head_passed

    assert FAILED_STATUSES == ("fallback", "gate_failed")
    assert [head_passed(s) for s in ("ok", "capacity", "fp16_fallback")] == [True, True, True]
    assert [head_passed(s) for s in ("fallback", "gate_failed")] == [False, False]


@pytest.mark.parametrize(
    "open_kw",
    [{"cache_size": 100, "heads": "lru"}, {"cache_size": 0, "heads": "lru"}, {"preload": True}, {"heads": "resident"}],
)
def test_predict_with_status(gated, open_kw):
    m = FleetModel.open(gated.uri, **open_kw)
    assert gated.rows["camp-0008"].status == "fp16_fallback"
    rng = random.Random(20)
    rows = [{"campaign_id": gated.ids[i % 10], **s} for i, s in enumerate(random_sequences(rng, 30))]
    ids, types = [r["campaign_id"] for r in rows], [r["event_types"] for r in rows]
    feats = [r["features"] for r in rows]
    pred = m.predict_with_status(ids, types, feats)
    np.testing.assert_array_equal(pred.probabilities, m.predict_columns(ids, types, feats))  # unchanged numbers
    np.testing.assert_allclose(pred.probabilities, [gated.expected(c, [r])[0] for c, r in zip(ids, rows)], atol=1e-6)
    assert isinstance(m.predict_batch(rows), np.ndarray)
    assert pred.fallback.dtype == bool and pred.fallback.tolist() == [c in FAILED_IDS for c in ids]
    assert pred.statuses == {c: gated.rows[c].status for c in dict.fromkeys(ids)}
    assert pred.fallback_campaigns == list(FAILED_IDS)
    for cid in gated.ids:
        assert m.head_status(cid) == gated.rows[cid].status
    one = m.predict_with_status("camp-0000", types[:3], feats[:3])  # one campaign for every row
    assert one.fallback.tolist() == [True] * 3 and one.statuses == {"camp-0000": "fallback"}
    ok = m.predict_with_status("camp-0002", [], [])
    assert ok.fallback.shape == (0,) and ok.statuses == {"camp-0002": "capacity"} and ok.fallback_campaigns == []
    with pytest.raises(UnknownCampaignError):
        m.head_status("camp-0001")
    with pytest.raises(InvalidInputError):
        m.head_status("../x")


def test_head_status_is_served_from_the_cache(gated, count_reads):
    m = FleetModel.open(gated.uri, cache_size=4, heads="lru")
    seqs = random_sequences(random.Random(21), 2)
    m.predict("camp-0000", seqs)
    assert count_reads == {"row_group": 1, "whole": 0}
    assert m.head_status("camp-0000") == "fallback"  # warm: the status lives with the cached head
    assert m.predict_with_status(
        "camp-0000", [s["event_types"] for s in seqs], [s["features"] for s in seqs]
    ).fallback.all()
    assert count_reads == {"row_group": 1, "whole": 0}
    for cid in gated.ids[1:6]:  # evict camp-0000; statuses follow their rows through the slots
        m.predict(cid, seqs)
    assert [m.head_status(c) for c in gated.ids[2:6]] == [gated.rows[c].status for c in gated.ids[2:6]]
    reads = count_reads["row_group"]
    assert m.head_status("camp-0000") == "fallback" and count_reads["row_group"] == reads + 1


def test_metadata_has_passed_and_calibration_fields(gated):
    from fleet.serve.serving import CALIBRATION_KEYS

    m = FleetModel.open(gated.uri)
    assert m.metadata("camp-0000")["passed"] is False and m.metadata("camp-0004")["passed"] is False
    assert all(m.metadata(c)["passed"] is True for c in ("camp-0002", "camp-0006", "camp-0008"))
    meta = m.metadata("camp-0002")
    assert all(k in meta and meta[k] is None for k in CALIBRATION_KEYS)  # absent on these rows: null
    row = gated.rows["camp-0002"]
    if CALIBRATION_KEYS:
        filled = dataclasses.replace(row, **{k: 0.125 for k in CALIBRATION_KEYS})
        assert all(head_metadata(filled, "g1")[k] == 0.125 for k in CALIBRATION_KEYS)
        assert (
            head_metadata(dataclasses.replace(row, **{CALIBRATION_KEYS[0]: float("nan")}), "g1")[CALIBRATION_KEYS[0]]
            is None
        )


def test_cli_predict_warns_about_fallback_heads(gated, tmp_path, capsys):
    import json

    seqs = random_sequences(random.Random(22), 6)
    ids = ["camp-0000", "camp-0002", "camp-0004", "camp-0000", "camp-0006", "camp-0008"]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"campaign_id": c, **s}) + "\n" for c, s in zip(ids, seqs)))
    code, out, err = run_cli(["predict", "--model", gated.uri, "--input", str(path)], capsys)
    assert code == 0
    np.testing.assert_allclose(
        [float(x) for x in out.split()], [gated.expected(c, [s])[0] for c, s in zip(ids, seqs)], atol=1e-6
    )  # stdout: data only
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "camp-0000, camp-0004" in warnings[0] and "camp-0002" not in warnings[0]
    path.write_text("".join(json.dumps({"campaign_id": c, **s}) + "\n" for c, s in zip(ids[1:2] + ids[4:], seqs)))
    code, out, err = run_cli(["predict", "--model", gated.uri, "--input", str(path)], capsys)
    assert code == 0 and len(out.split()) == 3 and "warning" not in err
