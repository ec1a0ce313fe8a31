"""fleet.formats.codec: the fleet-heads/1.1 schema, its bit packing contract and the rows <-> table codec."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from fleet.compression.metrics import CALIBRATION_KEYS
from fleet.core.constants import HEADS_FORMAT
from fleet.core.errors import StoreError
from fleet.formats.codec import (
    HEADS_SCHEMA,
    REJECTS_SCHEMA,
    HeadRow,
    RejectRow,
    check_format,
    conform_heads_table,
    heads_to_table,
    packed_nbytes,
    rejects_to_table,
    table_to_heads,
    table_to_rejects,
    validate_heads_table,
)

# --------------------------------------------------------------------------- pinned schemas

PINNED_HEADS_SCHEMA = pa.schema(
    [
        pa.field("campaign_id", pa.string(), nullable=False),
        pa.field("bits", pa.int8(), nullable=False),
        pa.field("shape", pa.list_(pa.int32()), nullable=False),
        pa.field("group_size", pa.int32(), nullable=False),
        pa.field("packed", pa.binary(), nullable=False),
        pa.field("scales", pa.binary(), nullable=False),
        pa.field("mask", pa.binary(), nullable=True),
        pa.field("teacher_sha256", pa.binary(), nullable=False),
        pa.field("data_fingerprint", pa.binary(), nullable=False),
        pa.field("teacher_auc", pa.float32(), nullable=True),
        pa.field("student_auc", pa.float32(), nullable=True),
        pa.field("mean_abs_diff", pa.float32(), nullable=True),
        pa.field("agreement", pa.float32(), nullable=True),
        pa.field("n_train", pa.int32(), nullable=True),
        pa.field("n_holdout", pa.int32(), nullable=True),
        pa.field("status", pa.string(), nullable=False),
        # fleet-heads/1.1
        pa.field("kl", pa.float32(), nullable=True),
        pa.field("brier_vs_teacher", pa.float32(), nullable=True),
        pa.field("mean_ratio", pa.float32(), nullable=True),
        pa.field("student_log_loss", pa.float32(), nullable=True),
        pa.field("teacher_log_loss", pa.float32(), nullable=True),
        pa.field("student_brier", pa.float32(), nullable=True),
        pa.field("teacher_brier", pa.float32(), nullable=True),
        pa.field("student_ece", pa.float32(), nullable=True),
        pa.field("teacher_ece", pa.float32(), nullable=True),
    ],
    metadata={"format": "fleet-heads/1.1"},
)
#: The columns fleet-heads/1.1 added to fleet-heads/1 (= 1.0), at the end.
V11_COLUMNS = [
    "kl",
    "brier_vs_teacher",
    "mean_ratio",
    "student_log_loss",
    "teacher_log_loss",
    "student_brier",
    "teacher_brier",
    "student_ece",
    "teacher_ece",
]

PINNED_REJECTS_SCHEMA = pa.schema(
    [
        pa.field("campaign_id", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ],
    metadata={"format": "fleet-rejects/1"},
)


def test_heads_schema_is_pinned():
    # Changing this schema is a format change: bump HEADS_FORMAT and update docs/storage.md.
    assert HEADS_FORMAT == "fleet-heads/1.1"
    assert HEADS_SCHEMA.equals(PINNED_HEADS_SCHEMA, check_metadata=True), HEADS_SCHEMA
    assert HEADS_SCHEMA.names[-len(V11_COLUMNS) :] == V11_COLUMNS == list(CALIBRATION_KEYS)


def test_rejects_schema_is_pinned():
    assert REJECTS_SCHEMA.equals(PINNED_REJECTS_SCHEMA, check_metadata=True), REJECTS_SCHEMA


# --------------------------------------------------------------------------- reference packing
# Written from the contract in docs/storage.md, independently of fleet.compression.quant.


def ref_pack(codes, bits: int) -> bytes:
    """Element i goes to byte (i*bits)//8 at bit offset (i*bits)%8, least-significant bit first."""
    out = bytearray(packed_nbytes(len(codes), bits))
    for i, code in enumerate(codes):
        assert 0 <= code < 2**bits
        for j in range(bits):
            if code >> j & 1:
                pos = i * bits + j
                out[pos // 8] |= 1 << (pos % 8)
    return bytes(out)


def q_to_codes(q, bits: int) -> list[int]:
    if bits == 1:
        return [(v + 1) // 2 for v in q]
    if bits == 2:
        return [v + 1 for v in q]
    return [v + 2 ** (bits - 1) for v in q]


def test_packing_worked_examples_from_docs():
    # int4: q = [-7, 0, 3, 7, -1] -> codes [1, 8, 11, 15, 7] -> 0x81 0xFB 0x07
    assert q_to_codes([-7, 0, 3, 7, -1], 4) == [1, 8, 11, 15, 7]
    assert ref_pack([1, 8, 11, 15, 7], 4) == bytes([0x81, 0xFB, 0x07])
    # ternary: q = [-1, 0, 1, 1, 0] -> codes [0, 1, 2, 2, 1] -> 0xA4 0x01
    assert ref_pack(q_to_codes([-1, 0, 1, 1, 0], 2), 2) == bytes([0xA4, 0x01])
    # binary: q = [1, -1, -1, 1, 1, 1, -1, 1, -1] -> bits 1,0,0,1,1,1,0,1 | 0 -> 0xB9 0x00
    assert ref_pack(q_to_codes([1, -1, -1, 1, 1, 1, -1, 1, -1], 1), 1) == bytes([0xB9, 0x00])
    # int8: q = [-127, 0, 127] -> codes [1, 128, 255]
    assert ref_pack(q_to_codes([-127, 0, 127], 8), 8) == bytes([1, 128, 255])


# --------------------------------------------------------------------------- helpers


def sha(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def make_head(campaign_id: str, q, bits: int, scales, group_size: int, shape=None, mask=None, **kw) -> HeadRow:
    """A head from hand-made integer values ``q`` (kept values only when ``mask`` is given)."""
    shape = tuple(shape or (len(q),))
    if bits == 16:
        packed, scale_bytes, group_size = np.asarray(q, "<f2").tobytes(), b"", 0
    else:
        packed, scale_bytes = ref_pack(q_to_codes(q, bits), bits), np.asarray(scales, "<f2").tobytes()
    mask_bytes = None if mask is None else np.packbits(np.asarray(mask, bool), bitorder="little").tobytes()
    return HeadRow(
        campaign_id=campaign_id,
        bits=bits,
        shape=shape,
        group_size=group_size,
        packed=packed,
        scales=scale_bytes,
        mask=mask_bytes,
        teacher_sha256=sha("t" + campaign_id),
        data_fingerprint=sha("d" + campaign_id)[:16],
        **kw,
    )


def expected_values(q, bits, scales, group_size, n=None, mask=None) -> np.ndarray:
    if bits == 16:
        vals = np.asarray(q, np.float16).astype(np.float32)
    else:
        s = np.asarray(scales, np.float16).astype(np.float32)
        vals = np.asarray(q, np.float32) * s[np.arange(len(q)) // group_size]
    if mask is None:
        return vals
    out = np.zeros(n, np.float32)
    out[np.asarray(mask, bool)] = vals
    return out


# The cases: (id, q, bits, scales, group_size, shape, mask)
RNG = np.random.default_rng(0)
MASK_10 = [1, 0, 1, 1, 0, 0, 1, 1, 1, 0]
CASES = [
    ("c-int8", list(RNG.integers(-127, 128, 193)), 8, [0.01, 0.02, 0.5, 1.5], 64, None, None),
    ("c-int4", list(RNG.integers(-7, 8, 193)), 4, [0.125, 0.25, 0.0625, 2.0], 64, None, None),
    ("c-ternary", list(RNG.integers(-1, 2, 193)), 2, [0.5] * 7, 32, None, None),
    ("c-binary", list(RNG.choice([-1, 1], 13)), 1, [0.75, 1.25], 8, None, None),
    ("c-fp16", list(RNG.normal(size=6)), 16, [], 0, (2, 3), None),
    ("c-pruned4", [-7, 7, 3, 1, -2, 5], 4, [0.5, 0.25], 4, (10,), MASK_10),
    ("c-pruned16", [0.5, -1.25, 3.0, 2.0, -0.125, 7.5], 16, [], 0, (10,), MASK_10),
]


def all_heads() -> list[HeadRow]:
    return [
        make_head(
            cid,
            q,
            bits,
            scales,
            gs,
            shape,
            mask,
            teacher_auc=0.75,
            student_auc=0.7421875,
            mean_abs_diff=0.015625,
            agreement=0.984375,
            n_train=100,
            n_holdout=20,
        )
        for cid, q, bits, scales, gs, shape, mask in CASES
    ]


# --------------------------------------------------------------------------- the docs' decoder
# COPY of the snippet in docs/storage.md ("Decoding a head without fleet"); it uses only numpy and
# pyarrow.compute, never fleet. test_docs_decoder_matches_this_copy keeps the two identical.


def decode_head(table, campaign_id):
    row = table.filter(pc.field("campaign_id") == campaign_id).to_pylist()[0]
    n, bits = int(np.prod(row["shape"])), row["bits"]
    keep = (
        np.ones(n, bool)
        if row["mask"] is None
        else np.unpackbits(np.frombuffer(row["mask"], np.uint8), bitorder="little")[:n].astype(bool)
    )
    k = int(keep.sum())
    if bits == 16:  # float16 values, no codes
        values = np.frombuffer(row["packed"], "<f2").astype(np.float32)
    else:  # codes of `bits` bits, LSB-first, one float16 scale per group
        stream = np.unpackbits(np.frombuffer(row["packed"], np.uint8), bitorder="little")
        codes = stream[: k * bits].reshape(k, bits).astype(np.int64) @ (1 << np.arange(bits))
        q = 2 * codes - 1 if bits == 1 else codes - (1 if bits == 2 else 2 ** (bits - 1))
        scales = np.frombuffer(row["scales"], "<f2").astype(np.float32)
        values = q * scales[np.arange(k) // row["group_size"]]
    out = np.zeros(n, np.float32)
    out[keep] = values
    return out.reshape(row["shape"])


def test_docs_decoder_matches_this_copy():
    import inspect
    import pathlib
    import re

    docs = (pathlib.Path(__file__).parents[1] / "docs" / "storage.md").read_text()
    block = re.search(r"```python\n(.*?)```", docs.split("### Decoding a head without fleet")[1], re.DOTALL).group(1)
    assert inspect.getsource(decode_head).strip() in block
    assert "fleet" not in block.split("def decode_head")[0]  # imports: numpy and pyarrow only


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_docs_decoder_reads_codec_tables(case):
    cid, q, bits, scales, gs, shape, mask = case
    table = heads_to_table(all_heads())
    got = decode_head(table, cid)
    n = int(np.prod(shape or (len(q),)))
    want = expected_values(q, bits, scales, gs, n, mask).reshape(shape or (len(q),))
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_docs_decoder_reads_parquet_written_by_pyarrow(tmp_path):
    import pyarrow.parquet as pq

    pq.write_table(heads_to_table(all_heads()), tmp_path / "part-00000.parquet", row_group_size=2)
    table = pq.read_table(tmp_path / "part-00000.parquet", filters=[("campaign_id", "=", "c-int4")])
    assert table.num_rows == 1
    cid, q, bits, scales, gs, _, _ = CASES[1]
    np.testing.assert_array_equal(decode_head(table, cid), expected_values(q, bits, scales, gs))


def test_duckdb_reads_heads(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    import pyarrow.parquet as pq

    pq.write_table(heads_to_table(all_heads()), tmp_path / "part-00000.parquet")
    rows = duckdb.sql(
        f"SELECT campaign_id, bits, len(shape), octet_length(packed) FROM '{tmp_path}/part-*.parquet' "
        "WHERE bits = 4 ORDER BY campaign_id"
    ).fetchall()
    assert rows == [("c-int4", 4, 1, 97), ("c-pruned4", 4, 1, 3)]


# --------------------------------------------------------------------------- codec round trip


def test_heads_round_trip_is_sorted_and_lossless():
    heads = all_heads()
    table = heads_to_table(list(reversed(heads)))
    assert table.schema.equals(HEADS_SCHEMA, check_metadata=True)
    assert table.column("campaign_id").to_pylist() == sorted(h.campaign_id for h in heads)
    back = table_to_heads(table)
    assert back == sorted(heads, key=lambda h: h.campaign_id)  # metric floats are exact in float32
    assert isinstance(back[0].shape, tuple) and isinstance(back[0].packed, bytes)


def test_heads_round_trip_with_nulls():
    head = make_head("a", [1, -1, 0], 2, [1.0], 64)
    (back,) = table_to_heads(heads_to_table([head]))
    assert back == head
    assert back.teacher_auc is None and back.mask is None and back.n_train is None and back.status == "ok"


def test_empty_table():
    table = heads_to_table([])
    assert table.num_rows == 0 and table.schema.equals(HEADS_SCHEMA)
    assert table_to_heads(table) == []


def test_num_stored_counts_kept_values():
    head = make_head("p", [-7, 7, 3, 1, -2, 5], 4, [0.5, 0.25], 4, (10,), MASK_10)
    assert head.num_params == 10 and head.num_stored == 6


def test_table_to_heads_tolerates_a_newer_minor_version():
    table = heads_to_table(all_heads()[:2])
    newer = table.drop_columns(["agreement"]).append_column("new_column", pa.array([1, 2]))
    newer = newer.replace_schema_metadata({"format": "fleet-heads/1.3"})
    back = table_to_heads(newer)
    assert [h.agreement for h in back] == [None, None]
    assert [h.campaign_id for h in back] == table.column("campaign_id").to_pylist()


CALIBRATION = {
    "kl": 0.0078125,
    "brier_vs_teacher": 0.0009765625,
    "mean_ratio": 1.03125,
    "student_log_loss": 0.40625,
    "teacher_log_loss": 0.390625,
    "student_brier": 0.125,
    "teacher_brier": 0.1171875,
    "student_ece": 0.03125,
    "teacher_ece": 0.015625,
}  # exact in float32


def test_heads_round_trip_with_calibration_fields():
    heads = [
        make_head("a", [1, -1, 0], 2, [1.0], 64, status="fallback", **CALIBRATION),
        make_head("b", [1, 0, 0], 2, [1.0], 64, kl=0.25),
    ]  # the other fields stay None
    table = heads_to_table(heads)
    assert table.column("kl").type == pa.float32() and table.column("mean_ratio").to_pylist() == [1.03125, None]
    back = table_to_heads(table)
    assert back == heads
    assert {k: getattr(back[0], k) for k in CALIBRATION_KEYS} == CALIBRATION
    assert back[1].kl == 0.25 and all(getattr(back[1], k) is None for k in CALIBRATION_KEYS if k != "kl")


def _v10_table(heads) -> pa.Table:
    """A table as fleet-heads/1 (= 1.0) wrote it: no calibration columns, format ``fleet-heads/1``."""
    table = heads_to_table(heads).drop_columns(V11_COLUMNS)
    return table.replace_schema_metadata({"format": "fleet-heads/1"})


def test_a_fleet_heads_1_0_table_reads_with_the_new_fields_none(tmp_path):
    import pyarrow.parquet as pq

    heads = [
        make_head("a", [1, -1, 0], 2, [1.0], 64, teacher_auc=0.75, **CALIBRATION),
        make_head("b", [1, 0, 0], 2, [1.0], 64),
    ]
    old = _v10_table(heads)
    assert old.schema.names == HEADS_SCHEMA.names[: -len(V11_COLUMNS)]
    pq.write_table(old, tmp_path / "part-00000.parquet")
    old = pq.read_table(tmp_path / "part-00000.parquet")  # as a reader finds a 1.0 file
    assert old.schema.metadata[b"format"] == b"fleet-heads/1"
    back = table_to_heads(old)
    assert [h.campaign_id for h in back] == ["a", "b"] and back[0].teacher_auc == 0.75
    assert all(getattr(h, k) is None for h in back for k in CALIBRATION_KEYS)
    conformed = conform_heads_table(old)
    assert conformed.schema.equals(HEADS_SCHEMA, check_metadata=True)
    assert all(conformed.column(k).null_count == 2 for k in V11_COLUMNS)
    assert validate_heads_table(old).equals(conformed)
    assert conform_heads_table(old.slice(0, 0)).num_rows == 0
    with pytest.raises(StoreError, match="does not match.*packed"):
        conform_heads_table(old.drop_columns(["packed"]))


def test_an_unknown_major_version_is_refused():
    """fleet-heads/2 (the bloomier codec, tests/test_weightless.py) is read; 3 is not."""
    table = heads_to_table(all_heads()[:1]).replace_schema_metadata({"format": "fleet-heads/3"})
    for read in (table_to_heads, conform_heads_table, validate_heads_table):
        with pytest.raises(StoreError, match="unsupported major version 'fleet-heads/3'"):
            read(table)


def test_table_to_heads_refuses_a_new_major_or_a_missing_column():
    table = heads_to_table(all_heads()[:1])
    with pytest.raises(StoreError, match="major"):
        table_to_heads(table.replace_schema_metadata({"format": "fleet-heads/3"}))
    with pytest.raises(StoreError, match="packed"):
        table_to_heads(table.drop_columns(["packed"]))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bits": 3}, "bits=3"),
        ({"shape": ()}, "shape"),
        ({"packed": b"\x00"}, "packed has 1 bytes, expected 3"),
        ({"scales": b""}, "scales has 0 bytes"),
        ({"group_size": 0}, "group_size"),
        ({"teacher_sha256": b"short"}, "teacher_sha256"),
        ({"data_fingerprint": "ab" * 16}, "data_fingerprint must be 16 raw bytes"),
        ({"data_fingerprint": b"\0" * 32}, "data_fingerprint must be 16 raw bytes"),
        ({"mask": b"\xff\xff"}, "mask has 2 bytes"),
        ({"status": ""}, "status"),
    ],
)
def test_heads_to_table_rejects_broken_rows(change, message):
    import dataclasses

    head = make_head("c1", [1, -1, 0, 1, 1], 4, [1.0], 64)  # 5 values at 4 bits -> 3 bytes
    with pytest.raises(StoreError, match=message) as err:
        heads_to_table([dataclasses.replace(head, **change)])
    assert "campaign 'c1'" in str(err.value)


def test_heads_to_table_rejects_fp16_with_scales_and_bad_ids_and_duplicates():
    import dataclasses

    fp16 = make_head("f", [0.5, 1.0], 16, [], 0)
    with pytest.raises(StoreError, match="scales must be empty"):
        heads_to_table([dataclasses.replace(fp16, scales=b"\x00\x3c")])
    with pytest.raises(StoreError, match="invalid campaign id"):
        heads_to_table([dataclasses.replace(fp16, campaign_id="../etc")])
    with pytest.raises(StoreError, match="duplicate") as err:
        heads_to_table([fp16, fp16])
    assert err.value.campaign_id == "f"


def test_validate_heads_table_sorts_and_checks_ids():
    table = heads_to_table(all_heads())
    shuffled = table.take(pa.array([3, 0, 6, 1, 5, 2, 4]))
    assert validate_heads_table(shuffled).equals(table)
    with pytest.raises(StoreError, match="duplicate"):
        validate_heads_table(pa.concat_tables([table, table.slice(0, 1)]))
    bad = table.set_column(0, HEADS_SCHEMA.field("campaign_id"), pa.array(["ok"] * 6 + ["bad id"], pa.string()))
    with pytest.raises(StoreError, match="bad id"):
        validate_heads_table(bad)
    with pytest.raises(StoreError, match="does not match"):
        validate_heads_table(table.drop_columns(["bits"]))


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["fleet-heads/1", "fleet-heads/1.0", "fleet-heads/1.2"])
def test_check_format_accepts_same_major(fmt):
    assert check_format(fmt) == fmt


@pytest.mark.parametrize(
    "fmt, message",
    [
        ("fleet-heads/2", "unsupported major version 'fleet-heads/2'"),
        ("fleet-heads/0.9", "unsupported major version"),
        ("fleet-teacher/1", "unknown format"),
        ("fleet-heads", "unknown format"),
        (None, "unknown format"),
    ],
)
def test_check_format_refuses_other_formats_naming_the_path(fmt, message):
    with pytest.raises(StoreError, match=message) as err:
        check_format(fmt, "fleet-heads/1", path="s3://b/v/manifest.json")
    assert "s3://b/v/manifest.json" in str(err.value)


# --------------------------------------------------------------------------- rejects


def test_rejects_table_from_tuples_and_dataclasses():
    long_bad_id = "x/" * 300
    table = rejects_to_table(
        [
            ("c2", "soft_labels", "teacher missing"),
            RejectRow("c1", "heads", "NaN loss"),
            (long_bad_id, "validate", "invalid campaign id"),
        ]
    )
    assert table.schema.equals(REJECTS_SCHEMA, check_metadata=True)
    rows = table_to_rejects(table)
    assert [r.campaign_id for r in rows] == ["c1", "c2", long_bad_id[:256]]
    assert rows[0] == RejectRow("c1", "heads", "NaN loss")
    assert rejects_to_table([]).num_rows == 0
