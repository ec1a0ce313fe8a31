"""The ``bloomier`` heads codec (fleet.compression.weightless): encode/decode round trip, fleet-heads/2.0 tables, the store
(a block never straddles a row group), serving equal to the decoded table, the docs' decoder, and the
re-training step."""

from __future__ import annotations

import dataclasses
import hashlib
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fleet.compression.quant import quantize_rows
from fleet.compression.weightless import (
    assign_clusters,
    decode_encoded,
    encode_block,
    false_positives,
    kmeans_1d,
    prune_keep,
    refit_blocks,
    refit_centroids,
)
from fleet.core.constants import HEADS_FORMAT_V2
from fleet.core.errors import StoreError
from fleet.formats.codec import (
    HEADS_SCHEMA,
    HEADS_SCHEMA_V2,
    HeadRow,
    check_head_row,
    conform_heads_table,
    head_row_at,
    heads_to_table,
    table_to_heads,
    validate_heads_table,
)
from fleet.formats.heads import bloomier_head_row, decode_heads


def _sha(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _heads(c: int, p: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(c, p)).astype(np.float32)


# --------------------------------------------------------------------------- the codec


def test_encode_decode_round_trip_kept_weights_to_their_centroid_the_rest_zero_but_false_positives():
    heads = _heads(60, 41)
    enc = encode_block(heads, sparsity=0.6, value_bits=3, check_bits=4, seed=5)
    assert enc.keep.sum(1).tolist() == [16] * 60  # round(40 * 0.4) per row
    decoded = decode_encoded(enc)
    centroids = enc.block.centroid_values
    assert centroids.shape == (7,) and (np.diff(centroids) > 0).all()
    kept = heads[:, :-1][enc.keep]
    np.testing.assert_array_equal(decoded[:, :-1][enc.keep], centroids[assign_clusters(kept, centroids) - 1])
    fp = false_positives(enc, decoded)
    rate = enc.block.false_positive_rate
    assert rate == pytest.approx(7 / 128)
    zeros = (~enc.keep).sum()
    assert abs(fp.sum() - rate * zeros) < 5 * (rate * zeros) ** 0.5 + 1  # about the documented rate
    assert (decoded[:, :-1][~enc.keep & ~fp] == 0).all()
    assert np.isin(decoded[:, :-1][fp], centroids).all()
    np.testing.assert_array_equal(decoded[:, -1], heads[:, -1].astype(np.float16).astype(np.float32))  # bias
    again = encode_block(heads, sparsity=0.6, value_bits=3, check_bits=4, seed=5)
    assert again.block.table == enc.block.table and again.block.centroids == enc.block.centroids  # deterministic


def test_kmeans_prune_and_assign():
    values = np.concatenate([np.full(50, -2.0), np.full(30, 0.5), np.full(20, 3.0)])
    np.testing.assert_allclose(kmeans_1d(values, 3), [-2.0, 0.5, 3.0])
    assert assign_clusters(np.array([-5.0, 0.4, 1.9, 9.0]), np.array([-2.0, 0.5, 3.0])).tolist() == [1, 2, 3, 3]
    w = np.array([[0.1, -3.0, 0.0, 2.0], [0.0, 0.0, 0.0, 1.0]], np.float32)
    assert prune_keep(w, 0.5).tolist() == [[False, True, False, True], [False, False, False, True]]  # never a zero
    assert kmeans_1d(np.zeros(0), 3).tolist() == [0.0, 0.0, 0.0]


def _block_rows(encodings: list, ids: list[str]) -> list[HeadRow]:
    rows, i = [], 0
    for enc in encodings:
        for r in range(enc.block.rows):
            rows.append(
                bloomier_head_row(
                    ids[i],
                    enc,
                    r,
                    teacher_sha256=_sha("t" + ids[i]),
                    data_fingerprint=_sha("d" + ids[i])[:16],
                    status="ok",
                )
            )
            i += 1
    return rows


def _mixed_rows(seed: int = 0):
    """Two bloomier blocks (12 and 9 rows) then three packed int4 rows; ids ``c000, c002, ...``."""
    heads = _heads(24, 17, seed)
    ids = [f"c{2 * i:03d}" for i in range(24)]
    encs = [
        encode_block(heads[:12], sparsity=0.5, value_bits=2, check_bits=3, seed=1),
        encode_block(heads[12:21], sparsity=0.5, value_bits=2, check_bits=3, seed=2),
    ]
    rows = _block_rows(encs, ids)
    for i in range(21, 24):
        qv = quantize_rows(torch.tensor(heads[i : i + 1]), 4, 8)[0]
        rows.append(
            HeadRow(
                campaign_id=ids[i],
                bits=4,
                shape=(17,),
                group_size=8,
                packed=qv.packed,
                scales=qv.scales,
                teacher_sha256=_sha("t"),
                data_fingerprint=_sha("d")[:16],
            )
        )
    want = np.concatenate([decode_encoded(e) for e in encs] + [decode_heads(rows[21:]).numpy()])
    return rows, ids, want


def test_heads_table_v2_schema_round_trip_and_block_checks():
    rows, _, want = _mixed_rows()
    table = heads_to_table(list(reversed(rows)))  # sorted on the way
    assert table.schema.equals(HEADS_SCHEMA_V2, check_metadata=True) and HEADS_FORMAT_V2 == "fleet-heads/2.0"
    assert table.schema.names == [*HEADS_SCHEMA.names, "codec", "bloomier"]
    assert table.column("codec").to_pylist() == ["bloomier"] * 21 + ["packed"] * 3
    assert [v is not None for v in table.column("bloomier").to_pylist()] == [i in (0, 12) for i in range(24)]
    back = table_to_heads(table)
    assert [r.block_row for r in back[:21]] == list(range(12)) + list(range(9))
    np.testing.assert_array_equal(decode_heads(back).numpy(), want)
    for i in (0, 5, 12, 20, 22):
        np.testing.assert_array_equal(decode_heads([head_row_at(table, i)]).numpy()[0], want[i])
    assert validate_heads_table(table).equals(table) and conform_heads_table(table).equals(table)
    assert heads_to_table(rows[21:]).schema.equals(HEADS_SCHEMA, check_metadata=True)  # packed only: 1.1
    with pytest.raises(StoreError, match="outside a block"):
        table_to_heads(table.slice(3, 4))  # a slice without its block's first row
    with pytest.raises(StoreError, match="block_row"):
        heads_to_table([dataclasses.replace(rows[1], block_row=5), *rows[:1], *rows[2:]])
    with pytest.raises(StoreError, match="ends after"):
        heads_to_table(rows[:5] + rows[12:])
    with pytest.raises(StoreError, match="blocks and rows do not match"):
        validate_heads_table(pa.concat_tables([table.slice(0, 5), table.slice(12)]))  # block 1 cut short
    with pytest.raises(StoreError, match="needs its block"):
        check_head_row(dataclasses.replace(rows[0], block=None))
    with pytest.raises(StoreError, match="scales"):
        check_head_row(dataclasses.replace(rows[0], scales=b"\0\0\0\0"))
    with pytest.raises(StoreError, match="table has"):
        check_head_row(dataclasses.replace(rows[0], block=dataclasses.replace(rows[0].block, table=b"\0")))


def test_other_major_versions_are_refused():
    rows, _, _ = _mixed_rows()
    table = heads_to_table(rows)
    for read in (table_to_heads, conform_heads_table, validate_heads_table):
        with pytest.raises(StoreError, match="unsupported major version 'fleet-heads/3'"):
            read(table.replace_schema_metadata({"format": "fleet-heads/3"}))
    with pytest.raises(StoreError, match="no column 'codec'"):
        conform_heads_table(heads_to_table(rows[21:]).replace_schema_metadata({"format": "fleet-heads/2.0"}))


# --------------------------------------------------------------------------- the store and serving


def test_store_keeps_each_block_in_one_row_group_and_point_lookups_decode_it(tmp_path):
    from fleet.storage.store import FleetVersion, VersionWriter

    rows, ids, want = _mixed_rows()
    writer = VersionWriter(str(tmp_path), "f", "v1")
    writer.write_backbone({"x": torch.zeros(1)})
    writer.write_heads(heads_to_table(rows), rows_per_part=13, row_group_size=4)
    version = FleetVersion.open(writer.commit())
    m = version.manifest
    assert (
        m["format"] == "fleet-version/1.2" and m["heads_format"] == "fleet-heads/2.0" and m["heads_codec"] == "bloomier"
    )
    # blocks of 12 and 9 rows (larger than a row group of 4: alone), the 3 packed rows together; parts of <= 13
    assert [(p["rows"], p["row_groups"]) for p in m["parts"]] == [(12, ["c000"]), (12, ["c024", "c042"])]
    for part in m["parts"]:
        meta = pq.read_metadata(tmp_path / "f" / "versions" / "v1" / part["path"])
        assert meta.schema.to_arrow_schema().metadata[b"format"] == b"fleet-heads/2.0"
    for i, cid in enumerate(ids):
        np.testing.assert_array_equal(decode_heads([version.read_head_row(cid)]).numpy()[0], want[i])
        assert version.read_head_row(f"c{2 * i + 1:03d}") is None
    np.testing.assert_array_equal(decode_heads(table_to_heads(version.read_heads())).numpy(), want)


def test_serving_equals_the_decoded_table(tmp_path):
    """FleetModel (cold lookups and preload) scores with exactly the heads the filter decodes."""
    from fleet.compression.student import (
        SharedBackbone,
        StudentConfig,
        head_logits,
        head_num_params,
    )
    from fleet.formats.backbone_codec import decode_backbone, encode_backbone
    from fleet.serve.serving import FleetModel
    from fleet.storage.store import VersionWriter

    torch.manual_seed(0)
    config = StudentConfig(num_event_types=6, num_features=2, hidden_size=8, embed_dim=4)
    tensors, metadata = encode_backbone(SharedBackbone(config).eval())
    backbone = decode_backbone(tensors, metadata)
    p = head_num_params(config)
    heads = _heads(30, p, 3) * 0.7
    ids = [f"k{i:03d}" for i in range(30)]
    encs = [encode_block(heads[a:b], sparsity=0.6, value_bits=3, check_bits=3, seed=9) for a, b in ((0, 16), (16, 30))]
    rows = _block_rows(encs, ids)
    want = torch.from_numpy(np.concatenate([decode_encoded(e) for e in encs]))
    writer = VersionWriter(str(tmp_path), "f", "v1")
    writer.write_backbone(tensors, metadata)
    writer.write_heads(heads_to_table(rows), row_group_size=8)
    uri = writer.commit()
    rng = random.Random(0)
    seqs = [[rng.randrange(6) for _ in range(rng.randint(1, 6))] for _ in range(8)]
    feats = [[rng.uniform(-1, 1) for _ in range(2 * len(t))] for t in seqs]
    with torch.no_grad():
        h = torch.cat(
            [
                backbone(
                    torch.tensor([t]),
                    torch.tensor(f, dtype=torch.float32).reshape(1, len(t), 2),
                    torch.tensor([len(t)]),
                )
                for t, f in zip(seqs, feats)
            ]
        )
    for preload in (False, True):
        model = FleetModel.open(uri, preload=preload)
        for c in (0, 7, 15, 16, 29):
            got = model.predict_columns(ids[c], seqs, feats)
            expected = torch.sigmoid(head_logits(config.head, h, want[c])).numpy()
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    meta = FleetModel.open(uri).metadata(ids[3])
    assert meta["codec"] == "bloomier" and meta["bits"] == 3 and meta["num_stored"] == p
    assert 2 < meta["bytes"] < 4 * p


# --------------------------------------------------------------------------- the docs' decoder
# COPY of the snippet in docs/storage.md ("Decoding a bloomier head without fleet"): Python ints, numpy and
# pyarrow only, never fleet. test_docs_bloomier_decoder_matches_this_copy keeps the two identical.

M64 = (1 << 64) - 1


def mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def decode_bloomier_head(table, campaign_id):
    ids = table.column("campaign_id").to_pylist()  # the whole row group (or file): the block's row is needed
    i = ids.index(campaign_id)
    blocks = table.column("bloomier").to_pylist()
    start = max(j for j in range(i + 1) if blocks[j] is not None)  # the first row of the head's block
    f, row = blocks[start], table.slice(i, 1).to_pylist()[0]
    n, length, w = int(np.prod(row["shape"])), f["cells"] // 3, f["cell_bits"]
    stream = int.from_bytes(f["table"], "little")  # cell c = bits c*w .. c*w + w - 1
    salt = [mix64((f["seed"] + (k + 1) * 0x9E3779B97F4A7C15) & M64) for k in range(4)]
    centroids = np.frombuffer(f["centroids"], "<f4")
    out = np.zeros(n, np.float32)
    for j in range(n - 1):  # every parameter but the last (the bias) is in the filter
        h = [mix64((((i - start) << 32) | j) ^ s) for s in salt]
        y = h[3] & ((1 << w) - 1)
        for k in range(3):
            y ^= (stream >> ((k * length + (((h[k] >> 32) * length) >> 32)) * w)) & ((1 << w) - 1)
        out[j] = centroids[y - 1] if 0 < y < 2 ** f["value_bits"] else 0.0
    out[n - 1] = np.frombuffer(row["scales"], "<f2")[0]  # the bias, float16
    return out.reshape(row["shape"])


def test_docs_bloomier_decoder_matches_this_copy():
    import inspect
    import pathlib
    import re

    docs = (pathlib.Path(__file__).parents[1] / "docs" / "storage.md").read_text()
    block = re.search(
        r"```python\n(.*?)```", docs.split("### Decoding a bloomier head without fleet")[1], re.DOTALL
    ).group(1)
    for fn in (mix64, decode_bloomier_head):
        assert inspect.getsource(fn).strip() in block
    assert "fleet" not in block.split("def mix64")[0]  # imports: numpy and pyarrow only


def test_docs_bloomier_decoder_reads_a_written_row_group(tmp_path):
    rows, ids, want = _mixed_rows(seed=4)
    pq.write_table(heads_to_table(rows), tmp_path / "part.parquet")  # one row group
    table = pq.read_table(tmp_path / "part.parquet")
    for i in (0, 11, 12, 20):
        np.testing.assert_array_equal(decode_bloomier_head(table, ids[i]), want[i])


# --------------------------------------------------------------------------- re-training


def test_refit_fixes_false_positives_and_keeps_the_keys_then_centroids_fit_the_final_table():
    """A linear head (logit = w . h + b) of 8 campaigns: the refit keeps the stored positions, re-encodes with
    the same seed and size; the centroid refit changes no cluster index and lowers the loss on the data."""
    from fleet.compression.distill import DistillConfig, campaign_losses
    from fleet.compression.student import StudentConfig

    g = torch.Generator().manual_seed(0)
    c, n, hdim = 8, 200, 12
    student = StudentConfig(num_event_types=2, num_features=0, hidden_size=hdim, head="linear")
    cidx = torch.arange(c).repeat_interleave(n)
    feats = torch.randn(c * n, hdim, generator=g)
    truth = torch.randn(c, hdim + 1, generator=g)
    teacher = (feats * truth[cidx, :-1]).sum(1) + truth[cidx, -1]
    enc = [encode_block(truth.numpy(), sparsity=0.5, value_bits=2, check_bits=1, seed=0)]  # FP rate 3/8: many
    distill = DistillConfig(head_l2=0.0)
    again, refit, stats = refit_blocks(
        truth, enc, feats, cidx, teacher, None, student, distill, steps=60, lr=0.05, check_bits=1
    )
    assert again[0].block.seed == enc[0].block.seed and again[0].block.cells == enc[0].block.cells
    np.testing.assert_array_equal(again[0].keep, enc[0].keep)
    first = decode_encoded(enc[0])
    fp = false_positives(enc[0], first)
    assert stats["false_positives_first"] == int(fp.sum()) > 0
    np.testing.assert_array_equal(refit[:, :-1].numpy()[fp], first[:, :-1][fp])  # fixed in place during the refit
    np.testing.assert_array_equal(refit[:, :-1].numpy()[~enc[0].keep & ~fp], 0.0)

    def loss(e):
        return float(
            campaign_losses(torch.from_numpy(decode_encoded(e)), feats, cidx, teacher, c, student, distill).sum()
        )

    tuned = refit_centroids(again, feats, cidx, teacher, None, student, distill, steps=60, lr=0.02)
    assert tuned[0].block.table == again[0].block.table  # the table (every cluster index) is unchanged
    assert tuned[0].block.centroids != again[0].block.centroids
    assert loss(tuned[0]) < loss(again[0]) and loss(again[0]) < loss(enc[0])
