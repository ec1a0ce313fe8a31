"""One user against many campaigns (FleetModel.score_campaigns, its batch form, fleet predict --rank) and the
resident quantized head table (heads="resident"), on small real versions written with fleet.storage.store.

Every score is checked against K separate ``predict`` calls (the per-row scoring path) and, where the
version allows, against probabilities computed independently of fleet.serve.serving (``BuiltVersion.expected``).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pytest
import torch
from test_serving import (
    GATED_STATUSES,
    BuiltVersion,
    build_version,
    random_sequences,
    run_cli,
)

from fleet.compression.quant import quantize_rows
from fleet.compression.student import head_num_params, ladder_config
from fleet.core.errors import StoreError
from fleet.formats.codec import HeadRow, heads_to_table
from fleet.serve.serving import CampaignScores, FleetModel, InvalidInputError
from fleet.storage.store import FleetVersion, VersionWriter

MODES = ("resident", "lru", "dense")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> BuiltVersion:
    """50 campaigns at mixed bits (1, 2, 4, 8, 16), some pruned, three parts of small row groups."""
    return build_version(str(tmp_path_factory.mktemp("store")))


@pytest.fixture(scope="module")
def models(built) -> dict[str, FleetModel]:
    return {mode: FleetModel.open(built.uri, heads=mode) for mode in MODES}


def per_campaign(model: FleetModel, seq: dict, ids: list[str]) -> np.ndarray:
    """K separate predict calls: the reference."""
    return np.array([model.predict(cid, [seq])[0] for cid in ids])


# --------------------------------------------------------------------------- score_campaigns


@pytest.mark.parametrize("mode", MODES)
def test_score_campaigns_equals_separate_predicts(built, models, mode):
    m = models[mode]
    rng = random.Random(0)
    for seq in random_sequences(rng, 3, 1, 40):
        ids = list(built.ids)
        rng.shuffle(ids)
        result = m.score_campaigns(seq, ids)
        assert isinstance(result, CampaignScores) and result.ids == ids and result.unknown == []
        assert result.probabilities.dtype == np.float64 and result.fallback.dtype == bool
        np.testing.assert_allclose(result.probabilities, per_campaign(m, seq, ids), atol=1e-6, rtol=0)
        np.testing.assert_allclose(result.probabilities, [built.expected(c, [seq])[0] for c in ids], atol=1e-6)
        got_ids, probs = m.score_campaigns(seq, ids)  # unpacks as (ids, probabilities)
        assert got_ids == ids and np.array_equal(probs, result.probabilities)


def test_every_campaign_and_top_k(built, models):
    seq = random_sequences(random.Random(1), 1)[0]
    want = per_campaign(models["lru"], seq, built.ids)
    for mode in ("resident", "dense"):
        every = models[mode].score_campaigns(seq)  # no ids: the whole version, in id order
        assert every.ids == built.ids and every.unknown == []
        np.testing.assert_allclose(every.probabilities, want, atol=1e-6, rtol=0)
        top = models[mode].score_campaigns(seq, top_k=7)
        order = np.argsort(-every.probabilities, kind="stable")[:7]
        assert top.ids == [built.ids[i] for i in order]
        assert np.all(np.diff(top.probabilities) <= 0)
        np.testing.assert_array_equal(top.probabilities, every.probabilities[order])
    with pytest.raises(InvalidInputError, match="resident"):
        models["lru"].score_campaigns(seq)  # every campaign needs every head in memory
    few = models["lru"].score_campaigns(seq, built.ids[:5], top_k=100)  # k above K: all, sorted
    assert sorted(few.ids) == built.ids[:5] and np.all(np.diff(few.probabilities) <= 0)


def test_unknown_ids_are_reported_not_fatal(built, models):
    seq = random_sequences(random.Random(2), 1)[0]
    a, b, c = built.ids[3], built.ids[10], built.ids[0]
    request = ["zzz-not-here", a, "camp-0001", b, a, "camp-000000000000000000001", c, "camp-0001", "A0"]
    for mode in MODES:
        res = models[mode].score_campaigns(seq, request)
        assert res.ids == [a, b, c]  # request order, duplicates once
        assert res.unknown == ["zzz-not-here", "camp-0001", "camp-000000000000000000001", "A0"]
        np.testing.assert_allclose(res.probabilities, per_campaign(models[mode], seq, [a, b, c]), atol=1e-6)
        none = models[mode].score_campaigns(seq, ["camp-0001", "nope"])
        assert none.ids == [] and none.probabilities.shape == (0,) and none.unknown == ["camp-0001", "nope"]
        assert models[mode].score_campaigns(seq, []).ids == []


@pytest.mark.parametrize(
    "bad,match",
    [
        ("camp-0000", "list of campaign ids"),
        (["camp-0000", "../x"], r"campaign_ids\[1\]"),
        (["camp-0000", 7], r"campaign_ids\[1\]"),
        (["camp-0000", "a\nb"], r"campaign_ids\[1\]"),
    ],
)
def test_invalid_campaign_ids(models, bad, match):
    seq = random_sequences(random.Random(3), 1)[0]
    with pytest.raises(InvalidInputError, match=match):
        models["resident"].score_campaigns(seq, bad)


def test_invalid_sequence_and_top_k(built, models):
    m = models["resident"]
    seq = random_sequences(random.Random(4), 1)[0]
    with pytest.raises(InvalidInputError, match="event types"):
        m.score_campaigns({"event_types": [99], "features": [0.0] * 3}, built.ids[:2])
    with pytest.raises(InvalidInputError, match="sequence must be an object"):
        m.score_campaigns([seq], built.ids[:2])
    with pytest.raises(InvalidInputError, match="missing field"):
        m.score_campaigns({"event_types": [1]}, built.ids[:2])
    for top_k in (0, -1, True, 1.5, "3"):
        with pytest.raises(InvalidInputError, match="top_k"):
            m.score_campaigns(seq, built.ids[:2], top_k=top_k)
    try:  # finite float32 features can overflow inside the RNN: never NaN out, an input error instead
        out = m.score_campaigns({"event_types": [1, 2, 3], "features": [3e38, -3e38, 3e38] * 3}, built.ids[:2])
    except InvalidInputError as exc:
        assert "not finite" in str(exc)
    else:
        assert np.isfinite(out.probabilities).all()


def test_batch_form(built, models):
    rng = random.Random(5)
    seqs = random_sequences(rng, 6, 1, 30)
    ids = [built.ids[i] for i in (7, 3, 40, 3)] + ["camp-0001"]
    for mode in MODES:
        batch = models[mode].score_campaigns_batch(seqs, ids)
        assert batch.ids == ids[:3] and batch.unknown == ["camp-0001"] and batch.probabilities.shape == (6, 3)
        for b, seq in enumerate(seqs):
            np.testing.assert_allclose(batch.probabilities[b], per_campaign(models[mode], seq, ids[:3]), atol=1e-6)
            one = models[mode].score_campaigns(seq, ids, top_k=2)
            row = batch.row(b, 2)
            assert row.ids == one.ids and row.unknown == one.unknown
            np.testing.assert_allclose(row.probabilities, one.probabilities, atol=1e-6)
    empty = models["resident"].score_campaigns_batch([], ids)
    assert empty.probabilities.shape == (0, 3) and empty.ids == ids[:3]
    every = models["resident"].score_campaigns_batch(seqs)
    assert every.probabilities.shape == (6, 50) and every.ids == built.ids


def test_many_campaigns_in_chunks(built, models, monkeypatch):
    """More campaigns than one head evaluation takes (SCORE_CHUNK): chunks are stitched in order."""
    import fleet.serve.serving

    monkeypatch.setattr(fleet.serve.serving, "SCORE_CHUNK", 7)
    seq = random_sequences(random.Random(6), 1)[0]
    ids = built.ids[::-1] + ["camp-0003"]
    for mode in MODES:
        res = models[mode].score_campaigns(seq, ids)
        assert res.ids == built.ids[::-1] and res.unknown == ["camp-0003"]
        np.testing.assert_allclose(res.probabilities, per_campaign(models[mode], seq, res.ids), atol=1e-6)
    every = models["resident"].score_campaigns(seq)
    np.testing.assert_allclose(every.probabilities, per_campaign(models["resident"], seq, built.ids), atol=1e-6)


def test_fallback_flags(tmp_path):
    gated = build_version(str(tmp_path), "g1", num_campaigns=10, statuses=GATED_STATUSES)
    seq = random_sequences(random.Random(7), 1)[0]
    for mode in MODES:
        res = FleetModel.open(gated.uri, heads=mode).score_campaigns(seq, gated.ids)
        assert res.fallback.tolist() == [gated.rows[c].status in ("fallback", "gate_failed") for c in gated.ids]
        assert res.fallback_campaigns == ["camp-0000", "camp-0004"]
        top = FleetModel.open(gated.uri, heads=mode).score_campaigns(seq, gated.ids, top_k=10)
        assert top.fallback.tolist() == [gated.rows[c].status in ("fallback", "gate_failed") for c in top.ids]


# --------------------------------------------------------------------------- a version with capacity-ladder heads


def build_ladder_version(store: str) -> tuple[str, BuiltVersion, list[str]]:
    """A film backbone whose version also holds film_pool heads (status capacity), one of them a fallback:
    FleetModel scores every campaign with film_pool (film rows widened with g = 0)."""
    base = build_version(store, "base", num_campaigns=12)
    config = base.config
    small, big = head_num_params(config), head_num_params(ladder_config(config))
    torch.manual_seed(3)
    rows, pooled = [], []
    for i, cid in enumerate(base.ids):
        row = base.rows[cid]
        if i % 3 == 0:  # a film_pool head: 4H + 1 parameters
            qv = quantize_rows(torch.randn(1, big) * 0.5, (8, 4, 16)[(i // 3) % 3], group_size=16)[0]
            row = HeadRow(
                campaign_id=cid,
                bits=qv.bits,
                shape=(big,),
                group_size=0 if qv.bits == 16 else 16,
                packed=qv.packed,
                scales=qv.scales,
                teacher_sha256=row.teacher_sha256,
                data_fingerprint=row.data_fingerprint,
                status="fallback" if i == 3 else "capacity",
            )
            pooled.append(cid)
        rows.append(row)
    assert {r.num_params for r in rows} == {small, big}
    writer = VersionWriter(store, "ladder", "l1")
    writer.write_backbone_bytes(FleetVersion.open(base.uri).read_backbone_bytes())
    writer.write_heads(heads_to_table(rows), rows_per_part=5, row_group_size=2)
    return writer.commit(config={"student": config.to_dict()}), base, pooled


def test_capacity_ladder_heads(tmp_path):
    uri, base, pooled = build_ladder_version(str(tmp_path))
    ids = base.ids
    seqs = random_sequences(random.Random(8), 3, 1, 30)
    lru = FleetModel.open(uri, heads="lru")
    assert lru.head_config.head == "film_pool"
    for mode in MODES:
        m = FleetModel.open(uri, heads=mode)
        for seq in seqs:
            res = m.score_campaigns(seq, ids)
            np.testing.assert_allclose(res.probabilities, per_campaign(lru, seq, ids), atol=1e-6, rtol=0)
            assert res.fallback_campaigns == [pooled[1]]
        batch = m.score_campaigns_batch(seqs, ids if mode == "lru" else None)
        np.testing.assert_allclose(batch.probabilities, [per_campaign(lru, s, ids) for s in seqs], atol=1e-6)
    # a film row scores as the plain film head would (widening with g = 0 changes no logit)
    film_ids = [c for c in ids if c not in pooled]
    np.testing.assert_allclose(
        FleetModel.open(uri).score_campaigns(seqs[0], film_ids).probabilities,
        [base.expected(c, [seqs[0]])[0] for c in film_ids],
        atol=1e-6,
    )


# --------------------------------------------------------------------------- resident == lru, exactly


def test_resident_equals_lru_exactly(built, models):
    rng = random.Random(9)
    rows = [{"campaign_id": rng.choice(built.ids), **s} for s in random_sequences(rng, 200, 1, 40)]
    want = models["lru"].predict_batch(rows)
    np.testing.assert_array_equal(models["resident"].predict_batch(rows), want)
    np.testing.assert_array_equal(models["dense"].predict_batch(rows), want)
    for cid in built.ids:
        assert models["resident"].head_status(cid) == models["lru"].head_status(cid) == built.rows[cid].status
    heads_r, _ = models["resident"]._heads(built.ids, {})
    heads_l, _ = models["lru"]._heads(built.ids, {})
    np.testing.assert_array_equal(heads_r, heads_l)  # the same dequantized parameters, bit for bit


def test_open_options(built):
    with pytest.raises(ValueError, match="heads must be one of"):
        FleetModel.open(built.uri, heads="mmap")
    with pytest.raises(ValueError, match="preload"):
        FleetModel.open(built.uri, preload=True, heads="lru")
    assert FleetModel.open(built.uri, preload=True).cache_info()["heads"] == "dense"
    info = FleetModel.open(built.uri).cache_info()
    assert info["heads"] == "resident" and 0 < info["resident_bytes"] < 50 * 200


def _rewrite(built: BuiltVersion, store: str, version_id: str, change) -> str:
    """A copy of ``built`` whose heads table went through ``change(table) -> table`` (bypassing the writer's
    row checks for the rows it rewrites), with the same backbone."""
    table = heads_to_table(list(built.rows.values()))
    writer = VersionWriter(store, "bad", version_id)
    writer.write_backbone_bytes(FleetVersion.open(built.uri).read_backbone_bytes())
    writer.write_heads(change(table), rows_per_part=20, row_group_size=4)
    return writer.commit(config={"student": built.config.to_dict()})


def _set_cell(table: pa.Table, column: str, cid: str, value) -> pa.Table:
    ids = table.column("campaign_id").to_pylist()
    values = table.column(column).to_pylist()
    values[ids.index(cid)] = value
    return table.set_column(table.column_names.index(column), column, pa.array(values, table.schema.field(column).type))


def test_resident_refuses_corrupt_rows_at_open(built, tmp_path):
    cid8 = next(c for c in built.ids if built.rows[c].bits == 8 and built.rows[c].mask is None)
    row = built.rows[cid8]
    short = _rewrite(built, str(tmp_path), "short", lambda t: _set_cell(t, "packed", cid8, row.packed[:-1]))
    with pytest.raises(StoreError, match=f"{cid8}.*packed"):
        FleetModel.open(short)
    inf_scales = b"\x00\x7c" * (len(row.scales) // 2)  # float16 +inf, little endian
    inf = _rewrite(built, str(tmp_path), "inf", lambda t: _set_cell(t, "scales", cid8, inf_scales))
    with pytest.raises(StoreError, match=f"{cid8}.*scale is not finite"):
        FleetModel.open(inf)
    lru = FleetModel.open(inf, heads="lru")  # the LRU path finds it when the head is used
    with pytest.raises(StoreError, match="non-finite"):
        lru.predict(cid8, random_sequences(random.Random(10), 1))
    # codes outside the symmetric range (code 0 at 8 bits) are found when a request decodes the row
    zero = _rewrite(built, str(tmp_path), "zero", lambda t: _set_cell(t, "packed", cid8, b"\x00" * len(row.packed)))
    for mode in ("resident", "lru"):
        m = FleetModel.open(zero, heads=mode)
        with pytest.raises(StoreError, match=f"{cid8}.*symmetric range"):
            m.score_campaigns(random_sequences(random.Random(11), 1)[0], [built.ids[1], cid8])
        assert m.predict(built.ids[1], random_sequences(random.Random(11), 1)).shape == (1,)  # the others still serve
        with pytest.raises(StoreError, match=f"{cid8}.*symmetric range"):  # a bad row is never marked checked
            m.predict(cid8, random_sequences(random.Random(11), 1))


def test_resident_codes_are_checked_once(built, models):
    """The resident table checks a row's codes the first time a request decodes it and marks it; later decodes
    of checked rows skip the check and give the same parameters bit for bit."""
    m = FleetModel.open(built.uri)
    table = m._table
    assert not table.checked.any()
    seq = random_sequences(random.Random(13), 1)[0]
    first = m.score_campaigns(seq, built.ids[:10])
    assert table.checked[:10].all() and not table.checked[10:].any()
    again = m.score_campaigns(seq, built.ids[:10])
    np.testing.assert_array_equal(again.probabilities, first.probabilities)
    heads, _ = m._heads(built.ids, {})  # every row now: all checked, equal to the LRU path
    assert table.checked.all()
    np.testing.assert_array_equal(heads, models["lru"]._heads(built.ids, {})[0])


# --------------------------------------------------------------------------- fleet predict --rank


def test_cli_predict_rank(built, tmp_path, capsys):
    seqs = random_sequences(random.Random(12), 4)
    ids = [built.ids[i] for i in (5, 1, 9)]
    lines = [
        {**seqs[0]},
        {**seqs[1], "campaign_ids": ids + ["camp-0001"]},
        {**seqs[2]},
        {**seqs[3], "campaign_ids": ids},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    model = FleetModel.open(built.uri)
    code, out, err = run_cli(
        [
            "predict",
            "--model",
            built.uri,
            "--input",
            str(path),
            "--rank",
            "--top-k",
            "2",
            "--campaigns",
            ",".join(built.ids[:4]),
        ],
        capsys,
    )
    assert code == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    assert len(got) == 4
    for line, seq, row in zip(lines, seqs, got):
        want = model.score_campaigns(seq, line.get("campaign_ids", built.ids[:4]), top_k=2)
        assert row["campaign_ids"] == want.ids and row["unknown"] == want.unknown
        np.testing.assert_allclose(row["probabilities"], want.probabilities, atol=1e-6)
        assert row["fallback"] == want.fallback.tolist()
    assert got[1]["unknown"] == ["camp-0001"]
    code, out, _ = run_cli(["predict", "--model", built.uri, "--input", str(path), "--rank"], capsys)  # every campaign
    assert code == 0 and len(json.loads(out.splitlines()[0])["campaign_ids"]) == 50
    path.write_text(json.dumps({**seqs[0], "campaign_ids": ["../x"]}) + "\n")
    code, _, err = run_cli(["predict", "--model", built.uri, "--input", str(path), "--rank"], capsys)
    assert code == 1 and "campaign_ids[0]" in err and "row 0" in err
    code, _, err = run_cli(["predict", "--model", built.uri, "--input", str(path), "--top-k", "2"], capsys)
    assert code == 2 and "--rank" in err
