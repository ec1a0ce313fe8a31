"""fleet.compression.numpy_backbone: the pure-numpy backbone forward equals SharedBackbone's (torch) to 1e-5.

Real backbones (random weights, also int8 round-tripped through backbone.safetensors), both archs,
one and two layers, last state and pooled (last ++ mean), lengths 1 / short / long / mixed in one batch,
batch sizes 1 and many.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fleet.compression.numpy_backbone import NumpyBackbone, numpy_backbone_from_bytes
from fleet.compression.student import SharedBackbone, StudentConfig
from fleet.formats.backbone_codec import backbone_to_bytes, decode_backbone, encode_backbone

V, F = 30, 3
ATOL = 1e-5


def _backbone(arch: str, layers: int = 1, hidden: int = 24, seed: int = 0) -> SharedBackbone:
    torch.manual_seed(seed)
    cfg = StudentConfig(
        num_event_types=V, num_features=F, arch=arch, hidden_size=hidden, embed_dim=8, num_layers=layers
    )
    backbone = SharedBackbone(cfg).eval()
    with torch.no_grad():  # larger than default init so gates saturate sometimes
        for p in backbone.rnn.parameters():
            p.mul_(3.0)
    return backbone


def _batch(rng: np.random.Generator, lengths: list[int], t: int | None = None):
    t = max(lengths) if t is None else t
    b = len(lengths)
    types = rng.integers(0, V, (b, t))
    feats = (rng.normal(size=(b, t, F)) * 2).astype(np.float32)
    return types, feats, np.array(lengths, dtype=np.int64)


def _torch(backbone, types, feats, lengths, pooled):
    with torch.no_grad():
        return backbone(torch.from_numpy(types), torch.from_numpy(feats), torch.from_numpy(lengths), pooled).numpy()


LENGTH_SETS = {
    "one": [1],
    "short": [3],
    "long": [300],
    "mixed": [1, 300, 2, 57, 1, 8, 300, 13, 120, 5],
    "padded_beyond_longest": [4, 9, 2],
}


@pytest.mark.parametrize("arch", ["gru", "lstm"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("pooled", [False, True])
def test_equals_torch_padded(arch, layers, pooled):
    backbone = _backbone(arch, layers)
    nb = NumpyBackbone.from_state_dict(backbone.state_dict(), arch=arch)
    assert (nb.arch, nb.num_layers, nb.hidden_size, nb.num_features) == (arch, layers, 24, F)
    rng = np.random.default_rng(1)
    for name, lengths in LENGTH_SETS.items():
        extra = 6 if name == "padded_beyond_longest" else 0
        types, feats, lens = _batch(rng, lengths, max(lengths) + extra)
        got, ref = nb.forward(types, feats, lens, pooled), _torch(backbone, types, feats, lens, pooled)
        assert got.dtype == np.float32 and got.shape == ref.shape == (len(lengths), 24 * (2 if pooled else 1))
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0, err_msg=name)


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_many_rows_random_lengths_and_padding_does_not_leak(arch):
    backbone = _backbone(arch, hidden=64, seed=3)
    nb = NumpyBackbone.from_state_dict(backbone.state_dict())
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 80, 200).tolist()
    types, feats, lens = _batch(rng, lengths)
    for pooled in (False, True):
        got = nb.forward(types, feats, lens, pooled)
        np.testing.assert_allclose(got, _torch(backbone, types, feats, lens, pooled), atol=ATOL, rtol=0)
        # garbage in the padding changes nothing (the RNN is causal; numpy does not even read it)
        feats2, types2 = feats.copy(), types.copy()
        for i, n in enumerate(lengths):
            feats2[i, n:] = 1e6
            types2[i, n:] = V - 1
        np.testing.assert_array_equal(nb.forward(types2, feats2, lens, pooled), got)


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_zero_length_row_reads_step_zero_like_torch(arch):
    backbone = _backbone(arch)
    nb = NumpyBackbone.from_state_dict(backbone.state_dict())
    types, feats, lens = _batch(np.random.default_rng(4), [5, 0, 2], 5)
    for pooled in (False, True):
        np.testing.assert_allclose(
            nb.forward(types, feats, lens, pooled), _torch(backbone, types, feats, lens, pooled), atol=ATOL, rtol=0
        )


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_ragged_equals_padded_batch_size_1_and_many(arch):
    backbone = _backbone(arch, layers=2)
    nb = NumpyBackbone.from_state_dict(backbone.state_dict())
    rng = np.random.default_rng(5)
    lengths = [1, 50, 3, 200, 50, 7]
    types, feats, lens = _batch(rng, lengths)
    seq_t = [types[i, :n] for i, n in enumerate(lengths)]
    seq_f = [feats[i, :n].reshape(-1) for i, n in enumerate(lengths)]  # flat, the events contract
    for pooled in (False, True):
        ref = _torch(backbone, types, feats, lens, pooled)
        np.testing.assert_allclose(nb.forward_ragged(seq_t, seq_f, pooled), ref, atol=ATOL, rtol=0)
        for i in (0, 1, 3):  # batch size 1 (the no-padding hot path)
            one = nb.forward_ragged([seq_t[i]], [seq_f[i]], pooled)
            np.testing.assert_allclose(one, ref[i : i + 1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["gru", "lstm"])
@pytest.mark.parametrize("bits", [8, 32])
def test_from_bytes_without_torch_equals_decoded_backbone(arch, bits):
    backbone = _backbone(arch, layers=2)
    decoded = decode_backbone(*encode_backbone(backbone, bits))
    nb = numpy_backbone_from_bytes(backbone_to_bytes(backbone, bits, head_prior=torch.zeros(5)))
    ref = NumpyBackbone.from_state_dict(decoded.state_dict())
    for (w1, b1, u1, n1), (w2, b2, u2, n2) in zip(nb._layers, ref._layers):  # the same dequantized weights, bit for bit
        np.testing.assert_array_equal(w1, w2)
        np.testing.assert_array_equal(u1, u2)
        np.testing.assert_array_equal(b1, b2)
    np.testing.assert_array_equal(nb.embedding, ref.embedding)
    types, feats, lens = _batch(np.random.default_rng(6), [4, 30, 1])
    np.testing.assert_allclose(
        nb.forward(types, feats, lens, True), _torch(decoded, types, feats, lens, True), atol=ATOL, rtol=0
    )


def test_no_numeric_features():
    torch.manual_seed(1)
    backbone = SharedBackbone(
        StudentConfig(num_event_types=V, num_features=0, arch="lstm", hidden_size=8, embed_dim=4)
    ).eval()
    nb = NumpyBackbone.from_state_dict(backbone.state_dict())
    types = [np.array([1, 2, 3]), np.array([4])]
    feats = [np.zeros(0, np.float32), np.zeros(0, np.float32)]
    padded = np.array([[1, 2, 3], [4, 0, 0]])
    with torch.no_grad():
        ref = backbone(torch.from_numpy(padded), torch.zeros(2, 3, 0), torch.tensor([3, 1]), True).numpy()
    np.testing.assert_allclose(nb.forward_ragged(types, feats, True), ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(nb.forward_ragged(types[:1], feats[:1], True), ref[:1], atol=ATOL, rtol=0)


def test_bad_inputs_and_weights():
    backbone = _backbone("gru")
    nb = NumpyBackbone.from_state_dict(backbone.state_dict())
    types, feats, lens = _batch(np.random.default_rng(7), [3, 2])
    with pytest.raises(ValueError, match="lengths"):
        nb.forward(types, feats, np.array([4, 2]))
    with pytest.raises(IndexError):
        nb.forward(types * 0 - 1, feats, lens)
    with pytest.raises(ValueError, match="features"):
        nb.forward(types, feats[..., :2], lens)
    with pytest.raises(ValueError, match="does not match"):
        NumpyBackbone.from_state_dict(backbone.state_dict(), arch="lstm")
    assert nb.forward(types[:0], feats[:0], lens[:0]).shape == (0, 24)


def test_import_does_not_load_torch():
    code = "import sys, fleet.compression.numpy_backbone; assert 'torch' not in sys.modules, 'torch imported'"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)


# ----------------------------------------------------------------------------- FleetModel(backend=...)


@pytest.mark.parametrize("arch,head", [("gru", "film"), ("lstm", "film_pool"), ("lstm", "linear")])
def test_fleet_model_numpy_backend_equals_torch_backend(tmp_path, arch, head):
    import random

    from fleet.serve.serving import DEFAULT_BACKEND, FleetModel
    from tests.test_serving import build_version, random_sequences

    built = build_version(str(tmp_path), num_campaigns=10, head=head, arch=arch)
    m_np, m_t = FleetModel.open(built.uri, backend="numpy"), FleetModel.open(built.uri, backend="torch")
    assert (m_np.backend, m_t.backend, FleetModel.open(built.uri).backend) == ("numpy", "torch", DEFAULT_BACKEND)
    rng = random.Random(3)
    seqs = random_sequences(rng, 300, 1, 40)  # > BACKBONE_CHUNK rows, mixed lengths: the chunked path
    rows = [{"campaign_id": built.ids[i % len(built.ids)], **s} for i, s in enumerate(seqs)]
    np.testing.assert_allclose(m_np.predict_batch(rows), m_t.predict_batch(rows), atol=1e-6, rtol=0)
    np.testing.assert_allclose(m_np.predict_batch(rows[:7]), m_t.predict_batch(rows[:7]), atol=1e-6, rtol=0)
    for s in seqs[:5]:  # one sequence: the hot path
        np.testing.assert_allclose(m_np.predict(built.ids[0], [s]), m_t.predict(built.ids[0], [s]), atol=1e-6, rtol=0)
        np.testing.assert_allclose(
            m_np.score_campaigns(s).probabilities, m_t.score_campaigns(s).probabilities, atol=1e-6, rtol=0
        )
    with pytest.raises(ValueError, match="backend"):
        FleetModel.open(built.uri, backend="onnx")


def test_cli_predict_backend_flag(tmp_path, capsys):
    import json
    import random

    from fleet.cli.main import main
    from tests.test_serving import build_version, random_sequences

    built = build_version(str(tmp_path / "store"), num_campaigns=4, arch="lstm")
    path = tmp_path / "seqs.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in random_sequences(random.Random(9), 5)))
    out = {}
    for backend in ("numpy", "torch"):
        capsys.readouterr()
        assert (
            main(
                [
                    "predict",
                    "--model",
                    built.uri,
                    "--campaign",
                    built.ids[0],
                    "--input",
                    str(path),
                    "--backend",
                    backend,
                ]
            )
            == 0
        )
        out[backend] = np.array([float(v) for v in capsys.readouterr().out.split()])
    assert len(out["numpy"]) == 5
    np.testing.assert_allclose(out["numpy"], out["torch"], atol=1e-6, rtol=0)
