"""Packed teachers (fleet-teacher-pack/1), the batched teacher pass and per-user packed fleets, on real
parts: safetensors and Parquet files, local Ray, the MLflow sqlite store."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fleet.compression.data import collate, map_minibatches
from fleet.core.constants import PACK_FORMAT
from fleet.core.errors import TeacherFormatError
from fleet.formats.teacher_pack import (
    load_teachers,
    locate_teachers,
    pack_teachers,
    read_pack_index,
    stack_states,
    teacher_logits,
    write_pack,
)
from fleet.formats.teachers import (
    LoadedTeacher,
    TeacherConfig,
    TeacherRNN,
    list_teacher_campaigns,
    load_teacher,
    save_teacher,
    teacher_num_bytes,
)
from fleet.synthetic.synth import user_config

TINY = {"num_event_types": 7, "embed_dim": 3, "num_features": 2, "hidden_size": 5, "num_layers": 2}


def tiny_teachers(root, ids, arch="lstm", seed=0, **overrides):
    torch.manual_seed(seed)
    for campaign_id in ids:
        config = TeacherConfig(campaign_id=campaign_id, arch=arch, **{**TINY, **overrides})
        save_teacher(str(root), TeacherRNN(config).eval(), config)


def random_batch(rng, rows, num_event_types=7, num_features=2, max_len=30):
    lengths = rng.integers(1, max_len, size=rows)
    return collate(
        [rng.integers(0, num_event_types, size=n) for n in lengths],
        [rng.normal(size=n * num_features) for n in lengths],
        num_features,
    )


def test_pack_round_trip_equals_directory_teachers(tmp_path):
    ids = [f"c{i:02d}" for i in range(7)]
    tiny_teachers(tmp_path / "src", ids[:5])
    tiny_teachers(tmp_path / "src", ids[5:], arch="gru", seed=1)  # a second architecture: its own pack
    result = pack_teachers(str(tmp_path / "src"), str(tmp_path / "dst"), pack_size=3)
    assert result == {"packs": 3, "packed": 7, "skipped": {}}  # lstm: 3 + 2, gru: 2
    assert list_teacher_campaigns(str(tmp_path / "dst")) == ids
    config = json.loads((tmp_path / "dst/packs/pack-00000/config.json").read_text())
    assert config["format"] == PACK_FORMAT and "campaign_id" not in config and config["arch"] == "lstm"
    index = pq.read_table(tmp_path / "dst/packs/pack-00000/index.parquet").to_pylist()
    assert [(r["campaign_id"], r["slot"]) for r in index] == [("c00", 0), ("c01", 1), ("c02", 2)]
    catalog = locate_teachers(str(tmp_path / "dst"))
    loaded = load_teachers(str(tmp_path / "dst"), ids, catalog.plan_entries())
    batch = random_batch(np.random.default_rng(0), 40)
    for campaign_id in ids:
        packed, direct = loaded[campaign_id], load_teacher(str(tmp_path / "src"), campaign_id)
        assert isinstance(packed, LoadedTeacher) and packed.sha256 == catalog.packed[campaign_id].sha256
        assert packed.config["campaign_id"] == campaign_id and packed.num_bytes == teacher_num_bytes(direct.model)
        for name, tensor in direct.model.state_dict().items():
            assert torch.equal(packed.model.state_dict()[name], tensor)
        with torch.no_grad():
            assert torch.equal(map_minibatches(packed.model, batch), map_minibatches(direct.model, batch))
    # a pack's file holds every tensor stacked on a leading slot axis
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "dst/packs/pack-00000/weights.safetensors")
    assert weights["rnn.weight_hh_l1"].shape == (3, 20, 5)


def test_a_root_with_directories_and_packs_and_a_conflict(tmp_path):
    root = tmp_path / "root"
    tiny_teachers(root, ["a1", "a2"])
    torch.manual_seed(3)
    models = [TeacherRNN(TeacherConfig(campaign_id=c, **TINY)) for c in ("b1", "a2")]
    write_pack(str(root), "p0", {"arch": "lstm", **TINY}, ["b1", "a2"], stack_states(models))
    catalog = locate_teachers(str(root))
    assert catalog.campaigns == ["a1", "a2", "b1"] and list(catalog.packed) == ["b1"]
    assert "a2" in catalog.conflicts and "pack 'p0' slot 1" in catalog.conflicts["a2"]
    loaded = load_teachers(str(root), catalog.campaigns, catalog.plan_entries(), conflicts=catalog.conflicts)
    assert isinstance(loaded["a1"], LoadedTeacher) and isinstance(loaded["b1"], LoadedTeacher)
    assert isinstance(loaded["a2"], TeacherFormatError) and loaded["a2"].campaign_id == "a2"


def test_a_bad_slot_quarantines_its_campaign_alone(tmp_path):
    ids = ["u0", "u1", "u2", "u3"]
    torch.manual_seed(0)
    states = stack_states([TeacherRNN(TeacherConfig(campaign_id=c, **TINY)) for c in ids])
    states["rnn.weight_ih_l0"][1, 0, 0] = float("nan")  # slot 1: NaN weights
    write_pack(str(tmp_path), "p", {"arch": "lstm", **TINY}, ids, states)
    weights = tmp_path / "packs/p/weights.safetensors"
    data = bytearray(weights.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8 : 8 + header_size])["readout.bias"]["data_offsets"]
    data[8 + header_size + begin + 3 * ((end - begin) // 4)] ^= 0x01  # slot 3: a flipped bit (sha256 no longer matches)
    weights.write_bytes(bytes(data))
    catalog = locate_teachers(str(tmp_path))
    loaded = load_teachers(str(tmp_path), ids, catalog.plan_entries())
    assert isinstance(loaded["u0"], LoadedTeacher) and isinstance(loaded["u2"], LoadedTeacher)
    nan, flipped = loaded["u1"], loaded["u3"]
    assert isinstance(nan, TeacherFormatError) and nan.campaign_id == "u1"
    assert "slot 1" in str(nan) and "NaN" in str(nan) and "weights.safetensors" in str(nan)
    assert isinstance(flipped, TeacherFormatError) and "slot 3" in str(flipped) and "sha256" in str(flipped)
    # a broken pack config quarantines the pack's campaigns, naming the file
    (tmp_path / "packs/p/config.json").write_text("{not json")
    broken = load_teachers(str(tmp_path), ids, catalog.plan_entries())
    assert all(isinstance(e, TeacherFormatError) and "config.json" in str(e) for e in broken.values())


def test_pack_index_is_read_not_listed_per_campaign(tmp_path):
    ids = [f"u{i}" for i in range(5)]
    torch.manual_seed(0)
    write_pack(
        str(tmp_path),
        "p",
        {"arch": "gru", **TINY},
        ids,
        stack_states([TeacherRNN(TeacherConfig(campaign_id=c, arch="gru", **TINY)) for c in ids]),
    )
    assert [r[:2] for r in read_pack_index(str(tmp_path), "p")] == [(c, i) for i, c in enumerate(ids)]
    assert not any(p.is_dir() for p in (tmp_path / "packs/p").iterdir())  # no per-campaign objects at all


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_batched_teacher_pass_equals_one_at_a_time(arch):
    rng = np.random.default_rng(1)
    torch.manual_seed(1)
    teachers, batches = [], []
    for k in range(6):  # different row counts (1 to 300) and lengths (1 to 60)
        config = TeacherConfig(campaign_id=f"c{k}", arch=arch, **TINY)
        teachers.append(LoadedTeacher(f"c{k}", TeacherRNN(config).eval(), config.to_json(), "", 0))
        batches.append(random_batch(rng, [1, 300, 17, 128, 129, 2][k], max_len=60))
    batched = teacher_logits(teachers, batches)
    alone = teacher_logits(teachers, batches, batched=False)
    for a, b, batch in zip(batched, alone, batches):
        assert a.shape == (len(batch),)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_soft_labels_batched_equal_one_at_a_time_on_packs(tmp_path, monkeypatch):
    """Stage 1 on a packed fleet gives the soft labels of one-at-a-time evaluation."""
    import pyarrow as pa

    from fleet.formats.events import write_events
    from fleet.run import stages
    from fleet.run.stages import ShardJob
    from fleet.synthetic.synth import generate_campaign

    config = user_config(6, pack_size=4, num_event_types=7, num_features=2, hidden_size=4, embed_dim=3)
    write_events(str(tmp_path / "events"), pa.concat_tables([generate_campaign(config, i) for i in range(6)]))
    ids = [f"user-{i:07d}" for i in range(6)]
    torch.manual_seed(0)
    for start in (0, 4):
        members = ids[start : start + 4]
        write_pack(
            str(tmp_path / "teachers"),
            f"pack-{start}",
            {"arch": "lstm", **TINY, "hidden_size": 4},
            members,
            stack_states([TeacherRNN(TeacherConfig(campaign_id=c, **{**TINY, "hidden_size": 4})) for c in members]),
        )
    catalog = locate_teachers(str(tmp_path / "teachers"))
    ctx = stages.StageContext(str(tmp_path / "teachers"), str(tmp_path / "events"), stages.CompressConfig(), 7, 2)
    job = ShardJob(ids, packed=catalog.plan_entries())
    soft, status = stages.soft_labels(job, ctx)
    monkeypatch.setattr(stages, "teacher_logits", lambda t, b: teacher_logits(t, b, batched=False))
    alone, status_alone = stages.soft_labels(job, ctx)
    assert status["status"].to_pylist() == ["ok"] * 6 and status.equals(status_alone)
    assert soft["row"].equals(alone["row"]) and soft["campaign_id"].equals(alone["campaign_id"])
    np.testing.assert_allclose(soft["teacher_logit"].to_numpy(), alone["teacher_logit"].to_numpy(), rtol=0, atol=1e-5)


def test_an_unchanged_packed_teacher_is_not_loaded_unless_its_data_changed(tmp_path):
    """Stage 1 of an incremental run: a packed teacher whose index sha256 is the parent's is reused without its
    slices being read (a flipped bit in them goes unseen: its head, fitted on the intact teacher, is kept); when
    the campaign's data changed, the teacher is loaded after all, with every check (the flipped bit quarantines it)."""
    import pyarrow as pa

    from fleet.formats.events import write_events
    from fleet.run import stages
    from fleet.run.stages import ShardJob
    from fleet.synthetic.synth import generate_campaign

    config = user_config(4, pack_size=4, num_event_types=7, num_features=2, hidden_size=4, embed_dim=3)
    ids = [f"user-{i:07d}" for i in range(4)]
    events = pa.concat_tables([generate_campaign(config, i) for i in range(4)])
    write_events(str(tmp_path / "events"), events)
    torch.manual_seed(0)
    shape = {**TINY, "hidden_size": 4}
    write_pack(
        str(tmp_path / "teachers"),
        "p",
        {"arch": "lstm", **shape},
        ids,
        stack_states([TeacherRNN(TeacherConfig(campaign_id=c, **shape)) for c in ids]),
    )
    catalog = locate_teachers(str(tmp_path / "teachers"))
    ctx = stages.StageContext(str(tmp_path / "teachers"), str(tmp_path / "events"), stages.CompressConfig(), 7, 2)
    _, first = stages.soft_labels(ShardJob(ids, packed=catalog.plan_entries()), ctx)
    parent = {
        c: [t, d]
        for c, t, d in zip(*(first[k].to_pylist() for k in ("campaign_id", "teacher_sha256", "data_fingerprint")))
    }
    skipped = load_teachers(
        str(tmp_path / "teachers"), ids, catalog.plan_entries(), unchanged={c: h[0] for c, h in parent.items()}
    )
    assert all(t.model is None and t.sha256 == parent[c][0] for c, t in skipped.items())
    assert [t.num_bytes for t in skipped.values()] == first["teacher_bytes"].to_pylist()

    weights = tmp_path / "teachers/packs/p/weights.safetensors"
    data = bytearray(weights.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8 : 8 + header_size])["readout.bias"]["data_offsets"]
    data[8 + header_size + begin + 1 * ((end - begin) // 4)] ^= 0x01  # slot 1 (ids[1]): a flipped bit
    weights.write_bytes(bytes(data))
    job = ShardJob(ids, packed=catalog.plan_entries(), parent=parent)
    _, reused = stages.soft_labels(job, ctx)
    assert reused["status"].to_pylist() == ["reused"] * 4
    assert reused["teacher_bytes"].equals(first["teacher_bytes"])

    changed = ids[1:3]  # new data for two campaigns: the one with the flipped bit and an intact one
    mask = pa.compute.is_in(events["campaign_id"], pa.array(changed))
    labels = pa.compute.if_else(mask, pa.compute.subtract(1, events["label"]), events["label"])
    write_events(str(tmp_path / "events2"), events.set_column(events.schema.get_field_index("label"), "label", labels))
    ctx2 = stages.StageContext(str(tmp_path / "teachers"), str(tmp_path / "events2"), stages.CompressConfig(), 7, 2)
    soft, status = stages.soft_labels(job, ctx2)
    assert status["status"].to_pylist() == ["reused", "rejected", "ok", "reused"]
    rejected = status.filter(pa.compute.equal(status["status"], "rejected")).to_pylist()[0]
    assert "slot 1" in rejected["reason"] and "sha256" in rejected["reason"]
    assert set(soft["campaign_id"].to_pylist()) == {ids[2]}


def test_stacked_training_is_deterministic():
    from fleet.formats.events import table_to_batch
    from fleet.synthetic.synth import entity_id, generate_campaign, train_stacked_teachers

    config = user_config(3, pack_size=3, hidden_size=4, embed_dim=3, num_event_types=9, num_features=3, max_epochs=2)
    ids = [entity_id(config, i) for i in range(3)]
    batches = [table_to_batch(generate_campaign(config, i), 3) for i in range(3)]
    first, stats = train_stacked_teachers(config, ids, batches)
    second, _ = train_stacked_teachers(config, ids, batches)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(1 <= s["epochs"] <= 2 and np.isfinite(s["val_loss"]) for s in stats)


# ---------------------------------------------------------------- a per-user packed fleet, end to end


@pytest.mark.slow
def test_per_user_packed_fleet_compress_predict_and_incremental(ray_local, tmp_path, sqlite_tracking_uri):
    from fleet.formats.events import EventsDataset
    from fleet.run.pipeline import run_compress, run_synth
    from fleet.run.stages import CompressConfig
    from fleet.serve.serving import FleetModel
    from fleet.storage.store import FleetVersion

    config = user_config(10, seed=5, pack_size=4, hidden_size=8, num_event_types=16, max_epochs=2)
    synth = run_synth(config, str(tmp_path / "fleet"))
    assert sorted(p.name for p in (tmp_path / "fleet/teachers/packs").iterdir()) == [f"pack-{i:05d}" for i in range(3)]
    assert not [p for p in (tmp_path / "fleet/teachers").iterdir() if p.name != "packs"]  # packs only
    fast = CompressConfig(
        backbone_steps=200,
        backbone_per_campaign=100,
        head_steps=100,
        gate={"min_median_auc_diff": -1.0, "min_p10_auc_diff": -1.0},
    )

    def compress(run_id):
        return run_compress(
            teachers_uri=synth["teachers_uri"],
            events_uri=synth["events_uri"],
            store_uri=str(tmp_path / "store"),
            fleet="users",
            config=fast,
            tracking_uri=sqlite_tracking_uri,
            run_id=run_id,
        )

    first = compress("n1")
    assert first.metrics["campaigns_ok"] + first.metrics["campaigns_quarantined"] == 10
    model = FleetModel.load("models:/users/1", sqlite_tracking_uri)
    user = "user-0000003"
    rows = EventsDataset(synth["events_uri"]).read_campaigns([user])[user].slice(0, 3).to_pylist()
    probs = model.predict(user, [{"event_types": r["event_types"], "features": r["features"]} for r in rows])
    assert probs.shape == (3,) and np.all((probs > 0) & (probs < 1))

    # change one slot of pack-00001 (user-0000005): only that campaign is refitted
    pack = tmp_path / "fleet/teachers/packs/pack-00001"
    from safetensors.torch import load_file

    tensors = load_file(pack / "weights.safetensors")
    tensors["readout.bias"][1] += 0.5
    ids = [r[0] for r in read_pack_index(synth["teachers_uri"], "pack-00001")]
    teacher_config = json.loads((pack / "config.json").read_text())
    write_pack(synth["teachers_uri"], "pack-00001", teacher_config, ids, tensors)
    second = compress("n2")
    old = {r["campaign_id"]: r for r in FleetVersion.open(first.manifest_uri).read_heads().to_pylist()}
    new = {r["campaign_id"]: r for r in FleetVersion.open(second.manifest_uri).read_heads().to_pylist()}
    assert second.metrics["campaigns_ok"] == 1 and second.metrics["campaigns_reused"] == len(old) - 1
    for campaign_id, row in old.items():
        if campaign_id == "user-0000005":
            assert new[campaign_id]["teacher_sha256"] != row["teacher_sha256"]
        else:
            assert new[campaign_id] == row


def test_pack_teachers_command(tmp_path, capsys):
    from fleet.cli.main import main

    tiny_teachers(tmp_path / "src", ["c0", "c1", "c2"])
    assert main(["pack-teachers", str(tmp_path / "src"), str(tmp_path / "dst"), "--pack-size", "2"]) == 0
    assert list_teacher_campaigns(str(tmp_path / "dst")) == ["c0", "c1", "c2"]
    assert "3 teachers in 2 packs" in capsys.readouterr().out
    assert main(["pack-teachers", str(tmp_path / "src"), str(tmp_path / "dst")]) == 1  # DST not empty
    (tmp_path / "src/c1/model.safetensors").write_bytes(b"\x80\x04not safetensors")
    assert main(["pack-teachers", str(tmp_path / "src"), str(tmp_path / "dst2")]) == 3
    err = " ".join(capsys.readouterr().err.split())
    assert "skipped c1" in err and "pickle" in err
    assert list_teacher_campaigns(str(tmp_path / "dst2")) == ["c0", "c2"]
    assert main(["pack-teachers", str(tmp_path / "src"), str(tmp_path / "dst3"), "--pack-size", "0"]) == 2


def test_packs_and_directories_on_s3(s3_server, s3_bucket):
    """On S3 (moto server): listing reads the index files, slots are read by byte range."""
    options = s3_server["storage_options"]
    root = f"{s3_bucket}/teachers"
    torch.manual_seed(0)
    config = TeacherConfig(campaign_id="d0", **TINY)
    save_teacher(root, TeacherRNN(config).eval(), config, options)
    ids = ["p0", "p1", "p2"]
    models = [TeacherRNN(TeacherConfig(campaign_id=c, **TINY)).eval() for c in ids]
    write_pack(root, "pack-00000", {"arch": "lstm", **TINY}, ids, stack_states(models), options)
    catalog = locate_teachers(root, options)
    assert catalog.campaigns == ["d0", "p0", "p1", "p2"] and list(catalog.packed) == ids
    loaded = load_teachers(root, ["p2", "d0", "p1"], catalog.plan_entries(), options)
    for k in (1, 2):
        for name, tensor in models[k].state_dict().items():
            assert torch.equal(loaded[ids[k]].model.state_dict()[name], tensor)
    assert isinstance(loaded["d0"], LoadedTeacher)
