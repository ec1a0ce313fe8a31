"""fleet.compression.student: config validation, backbone shapes and padding, head designs as stacked rows."""

from __future__ import annotations

import pytest
import torch

from fleet.compression.student import (
    HEAD_DESIGNS,
    HEAD_LADDER,
    SharedBackbone,
    Student,
    StudentConfig,
    backbone_forward,
    feature_width,
    head_layout,
    head_logits,
    head_logits_vjp,
    head_num_params,
    init_heads,
    ladder_config,
    quantizable_weights,
    widen_heads,
)

E, F = 7, 3


def _config(**kw) -> StudentConfig:
    return StudentConfig(num_event_types=E, num_features=F, **kw)


def _random_batch(b: int, t: int, generator: torch.Generator):
    lengths = torch.randint(1, t + 1, (b,), generator=generator)
    event_types = torch.randint(0, E, (b, t), generator=generator)
    features = torch.randn(b, t, F, generator=generator)
    valid = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
    return event_types * valid, features * valid.unsqueeze(-1), lengths


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "bad",
    [
        {"arch": "transformer"},
        {"head": "mlp"},
        {"hidden_size": 0},
        {"num_layers": 0},
        {"head": "film", "head_rank": 2},
        {"head": "lowrank", "head_rank": 0},
    ],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        _config(**bad)


def test_config_dict_round_trip_and_unknown_key():
    config = _config(arch="lstm", head="lowrank", head_rank=2)
    assert StudentConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        StudentConfig.from_dict({**config.to_dict(), "dropout": 0.1})


# ---------------------------------------------------------------------------------------------- backbone


@pytest.mark.parametrize("arch", ["gru", "lstm"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_backbone_shape_and_padding_does_not_matter(arch, num_layers):
    torch.manual_seed(0)
    backbone = SharedBackbone(_config(arch=arch, num_layers=num_layers, hidden_size=16)).eval()
    g = torch.Generator().manual_seed(1)
    event_types, features, lengths = _random_batch(5, 6, g)
    h = backbone(event_types, features, lengths)
    assert h.shape == (5, 16)

    # garbage (not zeros) after `lengths` and a longer padded T must not change anything
    pad_types = torch.cat([event_types, torch.randint(0, E, (5, 4), generator=g)], dim=1)
    pad_feats = torch.cat([features, 10 * torch.randn(5, 4, F, generator=g)], dim=1)
    valid = torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)
    pad_types[:, :6] = torch.where(valid, event_types, torch.randint(0, E, (5, 6), generator=g))
    pad_feats[:, :6] = torch.where(valid.unsqueeze(-1), features, torch.randn(5, 6, F, generator=g))
    torch.testing.assert_close(backbone(pad_types, pad_feats, lengths), h, rtol=0, atol=1e-6)

    # a row alone gives the same as in the batch
    alone = backbone(event_types[2:3, : lengths[2]], features[2:3, : lengths[2]], lengths[2:3])
    torch.testing.assert_close(alone[0], h[2], rtol=0, atol=1e-6)


def test_quantizable_weights_are_the_weight_matrices():
    backbone = SharedBackbone(_config(arch="lstm", num_layers=2))
    names = quantizable_weights(backbone)
    assert names == ["embedding.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l1", "rnn.weight_hh_l1"]


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_backbone_fake_quant_hook(arch):
    torch.manual_seed(0)
    backbone = SharedBackbone(_config(arch=arch, hidden_size=8))
    event_types, features, lengths = _random_batch(4, 5, torch.Generator().manual_seed(2))
    plain = backbone(event_types, features, lengths)
    torch.testing.assert_close(
        backbone_forward(backbone, event_types, features, lengths, fake_quant=lambda w: w), plain
    )

    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    ste = lambda w: w + (torch.round(w * 4) / 4 - w).detach()
    quantized = backbone_forward(backbone, event_types, features, lengths, fake_quant=ste)
    assert not torch.allclose(quantized, plain)
    quantized.sum().backward()
    assert backbone.rnn.weight_hh_l0.grad is not None and backbone.rnn.weight_hh_l0.grad.abs().sum() > 0
    assert backbone.embedding.weight.grad.abs().sum() > 0
    for k, v in backbone.state_dict().items():  # the module's own weights are untouched
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(backbone(event_types, features, lengths), plain)


# ---------------------------------------------------------------------------------------------- heads


def test_head_param_counts():
    assert head_num_params(_config()) == 193  # default: FiLM at H=64
    assert head_num_params(_config()) <= 256
    assert head_num_params(_config(head="lowrank")) == 193
    assert head_num_params(_config(head="lowrank", head_rank=2)) == 2 * 64 * 2 + 64 + 1
    assert head_num_params(_config(head="linear")) == 65
    for design in HEAD_DESIGNS:
        config = _config(head=design, hidden_size=8, head_rank=3 if design == "lowrank" else 1)
        sizes = sum(torch.Size(shape).numel() for _, shape in head_layout(design, 8, config.head_rank))
        assert sizes == head_num_params(config) == init_heads(config, 2).shape[1]


@pytest.mark.parametrize("design", HEAD_DESIGNS)
def test_init_heads_rows_are_identical_and_start_at_zero_logit(design):
    config = _config(head=design, hidden_size=8, head_rank=2 if design == "lowrank" else 1)
    heads = init_heads(config, 5)
    assert heads.shape == (5, head_num_params(config))
    assert torch.equal(heads, heads[:1].expand(5, -1))
    assert torch.equal(init_heads(config, 2)[0], heads[0])  # a row does not depend on C
    h = torch.randn(3, feature_width(config))
    assert torch.equal(head_logits(design, h, heads[:3], config.head_rank), torch.zeros(3))


@pytest.mark.parametrize("design,rank", [("film", 1), ("lowrank", 1), ("lowrank", 3), ("linear", 1)])
def test_mixed_campaign_batch_equals_per_campaign_calls(design, rank):
    torch.manual_seed(0)
    hidden, c, b = 8, 4, 12
    config = _config(head=design, hidden_size=hidden, head_rank=rank)
    heads = torch.randn(c, head_num_params(config))
    h = torch.randn(b, hidden)
    campaign_index = torch.randint(0, c, (b,))
    mixed = head_logits(design, h, heads[campaign_index], rank)
    indexed = head_logits(design, h, heads, rank, index=campaign_index)
    assert mixed.shape == (b,)
    torch.testing.assert_close(indexed, mixed)
    for k in range(c):
        rows = campaign_index == k
        if rows.any():
            torch.testing.assert_close(head_logits(design, h[rows], heads[k], rank), mixed[rows])  # 1-D row broadcast


@pytest.mark.parametrize("design,rank", [(d, 1) for d in HEAD_DESIGNS] + [("lowrank", 3)])
def test_block_logits_and_their_written_out_gradient_equal_head_logits_and_autograd(design, rank):
    torch.manual_seed(1)
    hidden, c, length = 8, 3, 5
    config = _config(head=design, hidden_size=hidden, head_rank=rank)
    heads = torch.randn(c, head_num_params(config), dtype=torch.float64)
    features = torch.randn(c, length, feature_width(config), dtype=torch.float64)  # (C, L, W)
    logits, vjp = head_logits_vjp(design, features, heads, rank)
    index = torch.arange(c).repeat_interleave(length)  # row [c, l] -> campaign c
    leaf = heads.clone().requires_grad_(True)
    reference = head_logits(design, features.reshape(c * length, -1), leaf, rank, index=index)  # (C * L,)
    torch.testing.assert_close(logits, reference.detach().reshape(c, length))
    weights = torch.randn(c, length, dtype=torch.float64)
    (expected,) = torch.autograd.grad((reference * weights.reshape(-1)).sum(), leaf)
    torch.testing.assert_close(vjp(weights), expected)
    with pytest.raises(ValueError, match="needs features"):
        head_logits_vjp(design, features, heads[:2], rank)


def test_head_formulas():
    h = torch.randn(5, 4)
    gamma, beta, w, b = torch.randn(4), torch.randn(4), torch.randn(4), torch.randn(1)
    film = head_logits("film", h, torch.cat([gamma, beta, w, b]))
    torch.testing.assert_close(film, torch.tanh(h * (1 + gamma) + beta) @ w + b)
    u, v = torch.randn(4, 2), torch.randn(4, 2)
    lowrank = head_logits("lowrank", h, torch.cat([u.reshape(-1), v.reshape(-1), w, b]), rank=2)
    torch.testing.assert_close(lowrank, torch.tanh(h + (h @ v) @ u.T) @ w + b)
    torch.testing.assert_close(head_logits("linear", h, torch.cat([w, b])), h @ w + b)


def test_head_logits_rejects_wrong_sizes():
    with pytest.raises(ValueError, match="params of shape"):
        head_logits("film", torch.randn(2, 4), torch.randn(2, 12))
    with pytest.raises(ValueError):
        head_logits("mlp", torch.randn(2, 4), torch.randn(2, 5))


def test_student_forward_is_backbone_then_head():
    torch.manual_seed(0)
    config = _config(hidden_size=8)
    student = Student(config, num_campaigns=3)
    with torch.no_grad():
        student.heads.normal_()
    event_types, features, lengths = _random_batch(6, 5, torch.Generator().manual_seed(3))
    campaign_index = torch.tensor([0, 2, 1, 1, 0, 2])
    logits = student(event_types, features, lengths, campaign_index)
    expected = head_logits("film", student.backbone(event_types, features, lengths), student.heads[campaign_index])
    assert logits.shape == (6,)
    torch.testing.assert_close(logits, expected)
    assert student.num_campaigns == 3


def test_a_smaller_rung_widened_is_the_same_head_on_the_ladder():
    """film -> film_pool: a film row widened with g = 0 gives exactly the film logits (pooled view off)."""
    torch.manual_seed(0)
    config = _config(head="film", hidden_size=8)
    bigger = ladder_config(config)
    assert HEAD_LADDER["film"] == bigger.head == "film_pool" and ladder_config(bigger) is None
    heads = torch.randn(4, head_num_params(config))
    padded = widen_heads(heads, config, bigger)
    assert padded.shape == (4, 4 * 8 + 1) and torch.equal(padded[:, :24], heads[:, :24])
    assert torch.equal(padded[:, -1], heads[:, -1]) and not padded[:, 24:32].any()  # b last, g (24:32) off
    pooled = torch.randn(6, feature_width(bigger))  # (B, 2H): last state ++ mean state
    index = torch.tensor([0, 1, 2, 3, 0, 1])
    torch.testing.assert_close(
        head_logits("film_pool", pooled, padded, index=index),
        head_logits("film", pooled[:, :8], heads, index=index),
        rtol=0,
        atol=0,
    )
    padded[:, 24:32] = 1.0  # g on: the pooled view now changes the logits
    assert not torch.allclose(
        head_logits("film_pool", pooled, padded, index=index), head_logits("film", pooled[:, :8], heads, index=index)
    )


def test_pooled_features_are_last_and_mean_of_the_valid_states_only():
    torch.manual_seed(0)
    config = _config(hidden_size=6)
    backbone = SharedBackbone(config).eval()
    types = torch.randint(0, config.num_event_types, (3, 9))
    feats = torch.randn(3, 9, config.num_features)
    lengths = torch.tensor([9, 4, 1])
    with torch.no_grad():
        out = backbone(types, feats, lengths, pooled=True)  # (B, 2H)
        assert out.shape == (3, 12) and torch.equal(out[:, :6], backbone(types, feats, lengths))
        for row, n in enumerate(lengths.tolist()):
            states, _ = backbone.rnn(
                torch.cat([backbone.embedding(types[row : row + 1, :n]), feats[row : row + 1, :n]], -1)
            )
            torch.testing.assert_close(out[row, 6:], states[0].mean(0), rtol=0, atol=1e-6)
        feats2 = feats.clone()
        feats2[1, 4:] = 1e3  # after lengths: no effect
        assert torch.equal(backbone(types, feats2, lengths, pooled=True), out)


@pytest.mark.parametrize("design", HEAD_DESIGNS)
def test_head_formulas_on_numpy_arrays_equal_torch(design):
    """Serving evaluates heads on float32 numpy arrays: head_logits (rows) and head_logits_cross give torch's
    logits (to float32 rounding) for every design."""
    import numpy as np

    from fleet.compression.student import head_logits_cross

    rank = 2 if design == "lowrank" else 1
    config = _config(hidden_size=8, head=design, head_rank=rank)
    g = torch.Generator().manual_seed(3)
    features = torch.randn(5, feature_width(config), generator=g)  # (B, W)
    heads = torch.randn(6, head_num_params(config), generator=g)  # (K, P)
    want = head_logits_cross(design, features, heads, rank)  # (B, K)
    got = head_logits_cross(design, features.numpy(), heads.numpy(), rank)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (5, 6)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-6, rtol=0)
    rows = heads[torch.tensor([0, 3, 3, 5, 1])]  # (B, P): row b's own head
    want_rows = head_logits(design, features, rows, rank)
    got_rows = head_logits(design, features.numpy(), rows.numpy(), rank)
    assert isinstance(got_rows, np.ndarray) and got_rows.shape == (5,)
    np.testing.assert_allclose(got_rows, want_rows.numpy(), atol=1e-6, rtol=0)
