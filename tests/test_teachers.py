"""fleet-teacher/1: round trip, loader hook and every bad input the format can meet."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from fleet.core.errors import InvalidCampaignIdError, TeacherFormatError
from fleet.formats.teachers import (
    TeacherConfig,
    TeacherRNN,
    list_teacher_campaigns,
    load_teacher,
    save_teacher,
)


def small_config(campaign_id="c1", arch="lstm"):
    return TeacherConfig(
        campaign_id=campaign_id, arch=arch, num_event_types=10, embed_dim=4, num_features=3, hidden_size=8, num_layers=2
    )


def inputs(batch=5, steps=7):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([7, 1, 3, 5, 2])[:batch]
    types = torch.randint(0, 10, (batch, steps), generator=g)
    feats = torch.randn(batch, steps, 3, generator=g)
    return types, feats, lengths


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_reference_teacher_shapes_and_padding_invariance(arch):
    model = TeacherRNN(small_config(arch=arch)).eval()
    types, feats, lengths = inputs()
    logits = model(types, feats, lengths)
    assert logits.shape == (5,)
    types2, feats2 = types.clone(), feats.clone()
    for i, n in enumerate(lengths):  # garbage after the valid steps must not matter
        types2[i, n:] = 9
        feats2[i, n:] = 100.0
    torch.testing.assert_close(model(types2, feats2, lengths), logits)


@pytest.mark.parametrize("root", ["local", "memory"])
def test_round_trip(tmp_path, root):
    uri = str(tmp_path / "teachers") if root == "local" else "memory://fleet-test/teachers-rt"
    model = TeacherRNN(small_config()).eval()
    save_teacher(uri, model, small_config())
    loaded = load_teacher(uri, "c1")
    types, feats, lengths = inputs()
    torch.testing.assert_close(loaded.model(types, feats, lengths), model(types, feats, lengths))
    assert loaded.config["format"] == "fleet-teacher/1" and len(loaded.sha256) == 64
    assert list_teacher_campaigns(uri) == ["c1"]
    assert load_teacher(uri, "c1").sha256 == loaded.sha256  # content hash is stable


class TinyTeacher(nn.Module):
    """A user's own teacher class: mean of a linear score over valid steps."""

    def __init__(self, num_features):
        super().__init__()
        self.score = nn.Linear(num_features, 1)

    def forward(self, event_types, features, lengths):
        mask = torch.arange(features.shape[1])[None, :] < lengths[:, None]  # (B, T)
        return (self.score(features).squeeze(-1) * mask).sum(1) / lengths


def build_tiny(config, state_dict):
    model = TinyTeacher(config["num_features"])
    model.load_state_dict(state_dict)
    return model


def test_custom_loader_hook(tmp_path):
    root = tmp_path / "t"
    (root / "u7").mkdir(parents=True)
    model = TinyTeacher(3)
    (root / "u7" / "model.safetensors").write_bytes(save_safetensors(dict(model.state_dict())))
    config = {**small_config("u7").to_json(), "loader": f"{__name__}:build_tiny"}
    (root / "u7" / "config.json").write_text(json.dumps(config))
    loaded = load_teacher(str(root), "u7", allow_loaders=[f"{__name__}:build_tiny"])  # the operator allows it
    assert isinstance(loaded.model, TinyTeacher)
    types, feats, lengths = inputs()
    torch.testing.assert_close(loaded.model(types, feats, lengths), model(types, feats, lengths))


def write(root, campaign_id, config=None, weights=None):
    d = root / campaign_id
    d.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights is not None:
        (d / "model.safetensors").write_bytes(weights)
    return str(root)


def good_weights():
    return save_safetensors(dict(TeacherRNN(small_config()).state_dict()))


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_config", "config.json: file is missing"),
        ("missing_weights", "model.safetensors: file is missing"),
        ("bad_json", "not valid JSON"),
        ("unknown_major", "unsupported format 'fleet-teacher/2'"),
        ("no_format", "missing or foreign 'format'"),
        ("wrong_shapes", "weights do not match the config"),
        ("wrong_names", "weights do not match the config"),
        ("nan_weights", "holds NaN or inf"),
        ("inf_weights", "holds NaN or inf"),
        ("pickle", "only safetensors is accepted"),
        ("torch_save", "only safetensors is accepted"),
        ("garbage", "not a readable safetensors file"),
        ("bad_loader", "loader not allowed: no_such_module_xyz:build"),
        ("other_campaign", "names campaign 'zzz'"),
    ],
)
def test_bad_teachers_raise_named_errors(tmp_path, case, match):
    config = small_config().to_json()
    weights = good_weights()
    if case == "missing_config":
        config = None
    elif case == "missing_weights":
        weights = None
    elif case == "bad_json":
        config = "{not json"
    elif case == "unknown_major":
        config["format"] = "fleet-teacher/2"
    elif case == "no_format":
        del config["format"]
    elif case == "wrong_shapes":
        config["hidden_size"] = 16
    elif case == "wrong_names":
        state = dict(TeacherRNN(small_config()).state_dict())
        state["extra.weight"] = state.pop("readout.weight")
        weights = save_safetensors(state)
    elif case in ("nan_weights", "inf_weights"):
        state = dict(TeacherRNN(small_config()).state_dict())
        state["readout.weight"][0, 0] = float("nan") if case == "nan_weights" else float("inf")
        weights = save_safetensors(state)
    elif case == "pickle":
        weights = pickle.dumps({"w": [1, 2, 3]})
    elif case == "torch_save":
        path = tmp_path / "w.pt"
        torch.save(TeacherRNN(small_config()).state_dict(), path)
        weights = path.read_bytes()
    elif case == "garbage":
        weights = b"\x00\x01not a tensor file"
    elif case == "bad_loader":
        config["loader"] = "no_such_module_xyz:build"
    elif case == "other_campaign":
        config["campaign_id"] = "zzz"
    root = write(tmp_path / "teachers", "c1", config, weights)
    with pytest.raises(TeacherFormatError, match=match) as info:
        load_teacher(root, "c1")
    assert info.value.campaign_id == "c1" and "c1" in str(info.value) and info.value.path


@pytest.mark.parametrize("bad_id", ["../x", "", "x" * 200])
def test_invalid_campaign_id_never_touches_storage(tmp_path, bad_id):
    with pytest.raises(InvalidCampaignIdError):
        load_teacher(str(tmp_path), bad_id)
    with pytest.raises(ValueError):
        TeacherConfig(campaign_id=bad_id)
