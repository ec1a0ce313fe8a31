"""fleet.compression.distill: loss properties, phase a (backbone) and phase b (batched head fit)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fleet.compression.data import SequenceBatch
from fleet.compression.distill import (
    BLOCK_LENGTH_RATIO,
    BLOCK_PADDING_CELLS,
    DistillConfig,
    calibrate_bias,
    campaign_blocks,
    campaign_losses,
    compute_features,
    distill_loss,
    distill_loss_rows,
    fit_backbone,
    fit_heads,
    fit_heads_grid,
    select_per_campaign,
)
from fleet.compression.student import (
    HEAD_DESIGNS,
    POOLED_DESIGNS,
    SharedBackbone,
    Student,
    StudentConfig,
    feature_width,
    head_logits,
    head_num_params,
    init_heads,
)

E, F_ = 7, 3


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP hand-offs that dominate on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(**kw) -> StudentConfig:
    return StudentConfig(num_event_types=E, num_features=F_, **kw)


def _sequences(n: int, t: int, seed: int, labels: torch.Tensor | None = None) -> SequenceBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    valid = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)  # (N, T)
    event_types = torch.randint(0, E, (n, t), generator=g) * valid
    features = torch.randn(n, t, F_, generator=g) * valid.unsqueeze(-1)
    return SequenceBatch(event_types, features, lengths, torch.full((n,), float("nan")) if labels is None else labels)


# ---------------------------------------------------------------------------------------------- config and losses


@pytest.mark.parametrize(
    "bad",
    [{"loss": "mse"}, {"temperature": 0.0}, {"hard_label_weight": 1.5}, {"distance_weight": -1.0}, {"head_l2": -0.1}],
)
def test_distill_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        DistillConfig(**bad)


@pytest.mark.parametrize("loss", ["hinton", "class_distance"])
def test_loss_and_gradient_vanish_when_student_matches_teacher(loss):
    teacher = torch.randn(64) * 3
    student = teacher.clone().requires_grad_(True)
    value = distill_loss(student, teacher, None, DistillConfig(loss=loss))
    value.backward()
    assert abs(float(value.detach())) < 1e-6
    assert student.grad.abs().max() < 1e-6
    # and a student below its teacher is pushed up
    low = (teacher - 1.0).requires_grad_(True)
    distill_loss(low, teacher, None, DistillConfig(loss=loss)).backward()
    assert (low.grad < 0).all()


def test_temperature_scaling():
    """T**2 keeps the gradient's size for small logit gaps; for large T the loss tends to (s - t)**2 / 8."""
    g = torch.Generator().manual_seed(0)
    teacher = 0.01 * torch.randn(32, generator=g)
    gap = 0.01 * torch.randn(32, generator=g)
    grads = []
    for t in (1.0, 2.0, 4.0):
        student = (teacher + gap).requires_grad_(True)
        distill_loss(student, teacher, None, DistillConfig(temperature=t)).backward()
        grads.append(student.grad)
    for grad in grads[1:]:
        torch.testing.assert_close(grad, grads[0], rtol=1e-2, atol=1e-7)
    torch.testing.assert_close(grads[0], gap / 4 / 32, rtol=1e-2, atol=1e-7)  # sigmoid'(0) = 1/4, mean over 32

    teacher, student = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    big_t = distill_loss(student, teacher, None, DistillConfig(temperature=100.0))
    torch.testing.assert_close(big_t, ((student - teacher) ** 2).mean() / 8, rtol=1e-3, atol=0)
    # a higher temperature weighs confident disagreements differently: the loss depends on T
    assert not torch.isclose(distill_loss(student, teacher, None, DistillConfig(temperature=1.0)), big_t)


def test_hard_labels_mix_and_nan_labels_are_ignored():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(10, generator=g).requires_grad_(True)
    teacher = torch.randn(10, generator=g)
    labels = torch.tensor([1.0, 0.0, float("nan"), 1.0, float("nan"), 0.0, 0.0, float("nan"), 1.0, 0.0])
    soft_only = distill_loss_rows(student, teacher, None, DistillConfig())
    mixed = distill_loss_rows(student, teacher, labels, DistillConfig(hard_label_weight=0.25))
    known = torch.isfinite(labels)
    hard = F.binary_cross_entropy_with_logits(student[known], labels[known], reduction="none")
    torch.testing.assert_close(mixed[~known], soft_only[~known])  # unknown label: soft term alone
    torch.testing.assert_close(mixed[known], 0.75 * soft_only[known] + 0.25 * hard)
    mixed.mean().backward()
    assert torch.isfinite(student.grad).all()

    all_nan = torch.full((10,), float("nan"))
    torch.testing.assert_close(
        distill_loss(student, teacher, all_nan, DistillConfig(hard_label_weight=0.5)),
        distill_loss(student, teacher, None, DistillConfig()),
    )
    only_hard = distill_loss(student, teacher, labels, DistillConfig(hard_label_weight=1.0))
    rows = distill_loss_rows(student, teacher, labels, DistillConfig(hard_label_weight=1.0))
    torch.testing.assert_close(rows[known], hard)
    assert torch.isfinite(only_hard)


def test_class_distance_adds_logit_matching_where_soft_targets_saturate():
    teacher = torch.tensor([30.0, -25.0])
    student = torch.tensor([20.0, -15.0], requires_grad=True)
    hinton = distill_loss_rows(student, teacher, None, DistillConfig(loss="hinton"))
    distance = distill_loss_rows(student, teacher, None, DistillConfig(loss="class_distance", distance_weight=0.1))
    torch.testing.assert_close(distance, hinton + 0.1 * (student - teacher) ** 2)
    (g_hinton,) = torch.autograd.grad(hinton.sum(), student)
    (g_distance,) = torch.autograd.grad(distance.sum(), student)
    assert g_hinton.abs().max() < 1e-2  # both sides saturated: soft targets barely pull
    assert (g_distance.abs() > 1.0).all()


# ---------------------------------------------------------------------------------------------- phase a


def test_compute_features_keeps_input_order_and_has_no_grad():
    torch.manual_seed(0)
    backbone = SharedBackbone(_config(hidden_size=8))
    batch = _sequences(37, 9, seed=2)
    feats = compute_features(backbone, batch, batch_size=5)
    assert feats.shape == (37, 8) and not feats.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(feats, backbone(batch.event_types, batch.features, batch.lengths), rtol=0, atol=1e-6)


def _toy_backbone_problem(num_campaigns: int = 3, n: int = 192):
    """Teacher logits from a fixed random student of the same shape: learnable exactly."""
    torch.manual_seed(123)
    config = _config(hidden_size=12, embed_dim=4)
    teacher = Student(config, num_campaigns)
    with torch.no_grad():
        teacher.heads.normal_(0, 1.0)
    batch = _sequences(n, 6, seed=5)
    campaign_index = torch.arange(n) % num_campaigns
    with torch.no_grad():
        teacher_logits = 3 * teacher(batch.event_types, batch.features, batch.lengths, campaign_index)
    batches = [
        (batch.select(slice(i, i + 32)), campaign_index[i : i + 32], teacher_logits[i : i + 32])
        for i in range(0, n, 32)
    ]
    return config, batch, campaign_index, teacher_logits, batches


def _eval_loss(student, batch, campaign_index, teacher_logits, config) -> float:
    with torch.no_grad():
        return float(
            distill_loss(
                student(batch.event_types, batch.features, batch.lengths, campaign_index), teacher_logits, None, config
            )
        )


def test_fit_backbone_reduces_loss_and_respects_steps():
    config, batch, campaign_index, teacher_logits, batches = _toy_backbone_problem()
    student = Student(config, 3, torch.Generator().manual_seed(0))
    distill_config = DistillConfig()
    before = _eval_loss(student, batch, campaign_index, teacher_logits, distill_config)
    seen = []
    out = fit_backbone(
        student, batches, distill_config, epochs=10, lr=1e-2, seed=0, progress=lambda s, loss: seen.append((s, loss))
    )
    after = _eval_loss(out, batch, campaign_index, teacher_logits, distill_config)
    assert out is student and not out.training
    assert [s for s, _ in seen] == list(range(1, 61))  # 6 batches x 10 epochs, the list re-iterated
    assert after < 0.5 * before

    # a callable gives a fresh iterable per epoch; `steps` caps the total
    calls = []
    fit_backbone(student, lambda: calls.append(1) or iter(batches), distill_config, epochs=5, steps=8, progress=None)
    assert len(calls) == 2


def test_fit_backbone_is_deterministic():
    config, _, _, _, batches = _toy_backbone_problem()
    states = []
    for _ in range(2):
        torch.manual_seed(999)
        student = Student(config, 3, torch.Generator().manual_seed(0))
        torch.manual_seed(7)  # a different global state must not matter beyond the model's init
        fit_backbone(student, batches, DistillConfig(), epochs=1, seed=3)
        states.append(student.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_fit_backbone_qat_hook_reaches_recurrent_weights():
    config, _, _, _, batches = _toy_backbone_problem()
    student = Student(config, 3, torch.Generator().manual_seed(0))
    calls = []

    def ste(w: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(w.shape))
        return w + (torch.round(w * 16) / 16 - w).detach()

    before = student.backbone.rnn.weight_hh_l0.detach().clone()
    losses = []
    fit_backbone(
        student, batches[:2], DistillConfig(), epochs=1, fake_quant=ste, progress=lambda s, loss: losses.append(loss)
    )
    assert (3 * config.hidden_size, config.hidden_size) in calls  # weight_hh of the GRU went through the hook
    assert not torch.equal(before, student.backbone.rnn.weight_hh_l0)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_fit_backbone_stops_early_and_restores_its_best_state():
    config, _, _, _, batches = _toy_backbone_problem()
    student = Student(config, 3, torch.Generator().manual_seed(0))
    scripted = iter([5.0, 4.0, 4.5, 4.2, 4.1, 3.0])  # best at the 2nd evaluation, then 3 without improvement
    states, modes = [], []

    def validate() -> float:
        modes.append(student.training)
        states.append({k: v.clone() for k, v in student.state_dict().items()})
        return next(scripted)

    steps = []
    fit_backbone(
        student,
        batches,
        DistillConfig(),
        epochs=100,
        steps=1000,
        validate=validate,
        eval_every=4,
        patience=3,
        progress=lambda s, loss: steps.append(s),
    )
    assert len(steps) == 20  # 5 evaluations x 4 steps: stopped at the 3rd evaluation without improvement
    assert modes == [False] * 5  # validate runs in eval mode
    for key, value in states[1].items():  # the student is back at its best evaluated state
        assert torch.equal(student.state_dict()[key], value), key


def test_fit_backbone_evaluates_its_last_steps_too():
    config, _, _, _, batches = _toy_backbone_problem()
    student = Student(config, 3, torch.Generator().manual_seed(0))
    losses = iter([2.0, 1.0])
    calls = []
    fit_backbone(
        student,
        batches,
        DistillConfig(),
        epochs=100,
        steps=7,
        validate=lambda: calls.append(1) or next(losses),
        eval_every=5,
    )
    assert len(calls) == 2  # at step 5 and after the last step (7)


# ---------------------------------------------------------------------------------------------- phase b


def _head_problem(design: str, seed: int = 0, hidden: int = 8):
    g = torch.Generator().manual_seed(seed)
    config = _config(head=design, hidden_size=hidden, head_rank=2 if design == "lowrank" else 1)
    sizes = [3, 40, 1, 100, 7, 0, 60]  # a 1-row and an empty campaign included
    campaign_index = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    campaign_index = campaign_index[torch.randperm(len(campaign_index), generator=g)]
    n = len(campaign_index)
    features = torch.tanh(torch.randn(n, feature_width(config), generator=g))
    teacher_logits = 2 * torch.randn(n, generator=g)
    labels = torch.where(torch.rand(n, generator=g) < 0.5, float("nan"), (torch.rand(n, generator=g) < 0.3).float())
    init = init_heads(config, len(sizes)) + 0.1 * torch.randn(len(sizes), head_num_params(config), generator=g)
    return config, features, campaign_index, teacher_logits, labels, init, len(sizes)


@pytest.mark.parametrize("design", HEAD_DESIGNS)
def test_batched_head_fit_equals_fitting_campaigns_one_at_a_time(design):
    config, features, campaign_index, teacher_logits, labels, init, c = _head_problem(design)
    distill_config = DistillConfig(loss="class_distance", hard_label_weight=0.3, head_l2=0.1)
    batched = fit_heads(
        features, campaign_index, teacher_logits, labels, c, config, distill_config, steps=60, init=init, chunk_size=32
    )
    assert batched.shape == (c, head_num_params(config))
    for k in range(c):
        rows = campaign_index == k
        alone = fit_heads(
            features[rows],
            torch.zeros(int(rows.sum()), dtype=torch.long),
            teacher_logits[rows],
            labels[rows],
            1,
            config,
            distill_config,
            steps=60,
            init=init[k : k + 1],
        )
        torch.testing.assert_close(batched[k], alone[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(batched[5], init[5])  # no rows: the head keeps its init


def test_campaign_blocks_hold_every_row_once_in_input_order_with_bounded_padding():
    generator = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 40, (30,), generator=generator)
    sizes[[3, 11]] = 0  # campaigns without rows are in no block
    sizes[7] = 300  # more rows than a block's cells: a block of its own
    campaign_index = torch.repeat_interleave(torch.arange(30), sizes)
    campaign_index = campaign_index[torch.randperm(len(campaign_index), generator=generator)]
    blocks = campaign_blocks(campaign_index, 30, cells=128)
    assert len(blocks) > 2  # the cells bound splits them
    seen = []
    for campaigns, rows, valid in blocks:
        counts = valid.sum(1)
        assert rows.shape == valid.shape == (len(campaigns), int(counts.max()))
        assert len(campaigns) == 1 or rows.numel() <= 128
        padding = int((~valid).sum())
        assert int(counts.max()) <= BLOCK_LENGTH_RATIO * int(counts.min()) or padding <= BLOCK_PADDING_CELLS
        for c, row, ok in zip(campaigns.tolist(), rows, valid):
            mine = row[ok]
            assert bool((campaign_index[mine] == c).all()) and bool((mine.diff() > 0).all())  # input order
            seen.extend(mine.tolist())
    assert sorted(seen) == list(range(len(campaign_index)))


def test_campaign_losses_without_any_row_are_inf():
    config = StudentConfig(num_event_types=5, num_features=2, hidden_size=8)
    heads = torch.zeros(3, head_num_params(config))
    none = campaign_losses(
        heads, torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), torch.zeros(0), 3, config, DistillConfig()
    )
    assert none.dtype == torch.float64 and bool(torch.isinf(none).all())


def test_fit_heads_is_deterministic_and_chunking_does_not_matter():
    config, features, campaign_index, teacher_logits, labels, _init, c = _head_problem("film", seed=3)
    runs = [
        fit_heads(
            features, campaign_index, teacher_logits, labels, c, config, DistillConfig(), steps=40, seed=1, chunk_size=s
        )
        for s in (4096, 4096, 16)
    ]
    assert torch.equal(runs[0], runs[1])
    torch.testing.assert_close(runs[2], runs[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("design", HEAD_DESIGNS)
def test_fit_heads_recovers_known_heads(design):
    """Features from a random frozen backbone, teacher logits from known heads: the fit finds them."""
    torch.manual_seed(0)
    config = _config(head=design, hidden_size=16)
    backbone = SharedBackbone(config)
    c, n_per = 5, 300
    batch = _sequences(2 * c * n_per, 8, seed=11)
    features = compute_features(backbone, batch, pooled=design in POOLED_DESIGNS)  # (N, feature width)
    campaign_index = torch.arange(len(batch)) % c
    true = init_heads(config, c) + torch.randn(c, head_num_params(config))
    teacher_logits = head_logits(design, features, true, index=campaign_index)
    fit = torch.arange(len(batch)) < c * n_per  # first half to fit, second half held out
    heads = fit_heads(features[fit], campaign_index[fit], teacher_logits[fit], None, c, config, DistillConfig())
    held = head_logits(design, features[~fit], heads, index=campaign_index[~fit])
    gap = (torch.sigmoid(held) - torch.sigmoid(teacher_logits[~fit])).abs()
    assert float(gap.mean()) < 0.02, float(gap.mean())
    assert float(torch.corrcoef(torch.stack([held, teacher_logits[~fit]]))[0, 1]) > 0.99


def test_fit_heads_qat_hook_gets_stacked_heads_and_gradients_flow():
    config, features, campaign_index, teacher_logits, labels, init, c = _head_problem("film", seed=4)
    shapes = []

    def ste(p: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(p.shape))
        return p + (torch.round(p * 8) / 8 - p).detach()

    heads = fit_heads(
        features,
        campaign_index,
        teacher_logits,
        labels,
        c,
        config,
        DistillConfig(),
        steps=30,
        init=init,
        fake_quant=ste,
    )
    assert shapes == [(c, head_num_params(config))] * 30
    assert not torch.equal(heads[3], init[3])  # the STE passed gradients to the float heads
    plain = fit_heads(features, campaign_index, teacher_logits, labels, c, config, DistillConfig(), steps=30, init=init)
    assert not torch.equal(heads, plain)


def test_fit_heads_rejects_bad_inputs():
    config, features, campaign_index, teacher_logits, labels, init, c = _head_problem("linear")
    with pytest.raises(ValueError, match="out of range"):
        fit_heads(features, campaign_index, teacher_logits, labels, c - 3, config, DistillConfig(), steps=1)
    with pytest.raises(ValueError, match="init"):
        fit_heads(features, campaign_index, teacher_logits, labels, c, config, DistillConfig(), steps=1, init=init[:2])
    with pytest.raises(ValueError, match="hidden_size"):
        fit_heads(features[:, :4], campaign_index, teacher_logits, labels, c, config, DistillConfig(), steps=1)


def test_per_campaign_head_l2_equals_one_fit_per_strength():
    config, features, campaign_index, teacher_logits, labels, init, c = _head_problem("film", seed=5)
    strengths = torch.tensor([0.0, 10.0, 1.0, 0.0, 100.0, 1.0, 10.0])
    mixed = fit_heads(
        features,
        campaign_index,
        teacher_logits,
        labels,
        c,
        config,
        DistillConfig(),
        steps=40,
        init=init,
        head_l2=strengths,
    )
    for value in (0.0, 1.0, 10.0, 100.0):
        alone = fit_heads(
            features,
            campaign_index,
            teacher_logits,
            labels,
            c,
            config,
            DistillConfig(),
            steps=40,
            init=init,
            head_l2=value,
        )
        rows = strengths == value
        torch.testing.assert_close(mixed[rows], alone[rows], rtol=0, atol=1e-5)


def test_prior_never_pulls_the_bias():
    """An overwhelming prior keeps every parameter at its anchor except the readout bias, which follows
    the campaign's own base rate (shrinking it would drag the campaign's mean toward the fleet's)."""
    config, features, campaign_index, teacher_logits, _labels, init, c = _head_problem("film", seed=2)
    teacher_logits = teacher_logits + 3.0  # every teacher far above the anchor's base rate
    heads = fit_heads(
        features, campaign_index, teacher_logits, None, c, config, DistillConfig(), steps=200, init=init, head_l2=1e6
    )
    has_rows = torch.bincount(campaign_index, minlength=c) > 0
    torch.testing.assert_close(heads[:, :-1], init[:, :-1], rtol=0, atol=1e-3)
    assert bool((heads[has_rows, -1] > init[has_rows, -1] + 1.0).all())


def test_grid_selection_equals_selecting_one_campaign_at_a_time():
    config, features, campaign_index, teacher_logits, labels, init, c = _head_problem("film", seed=7)
    val = torch.rand(len(campaign_index), generator=torch.Generator().manual_seed(1)) < 0.3
    grid = (0.0, 1.0, 10.0)
    kw = {"steps": 40, "init": init}
    fit = ~val
    candidates = fit_heads_grid(
        features[fit], campaign_index[fit], teacher_logits[fit], labels[fit], c, config, DistillConfig(), grid, **kw
    )  # (G, C, P)
    losses = torch.stack(
        [
            campaign_losses(h, features[val], campaign_index[val], teacher_logits[val], c, config, DistillConfig())
            for h in candidates
        ]
    )  # (G, C)
    trusted = torch.bincount(campaign_index[val], minlength=c) >= 3
    choice = select_per_campaign(losses, 1, trusted)
    for k in range(c):
        rows_fit, rows_val = fit & (campaign_index == k), val & (campaign_index == k)
        best, best_loss = 1, None
        if int(rows_val.sum()) >= 3:
            for g, strength in enumerate(grid):
                alone = fit_heads(
                    features[rows_fit],
                    torch.zeros(int(rows_fit.sum()), dtype=torch.long),
                    teacher_logits[rows_fit],
                    labels[rows_fit],
                    1,
                    config,
                    DistillConfig(),
                    steps=40,
                    init=init[k : k + 1],
                    head_l2=strength,
                )
                loss = float(
                    distill_loss(
                        head_logits("film", features[rows_val], alone[0]),
                        teacher_logits[rows_val],
                        None,
                        DistillConfig(),
                    )
                )
                if best_loss is None or loss < best_loss - 1e-6:
                    best, best_loss = g, loss
        assert int(choice[k]) == best, k


def test_select_per_campaign_takes_the_first_minimum_and_the_default_where_untrusted():
    losses = torch.tensor([[0.5, 0.2, 1.0, float("inf")], [0.4, 0.2, 2.0, float("inf")], [0.6, 0.3, 0.1, float("inf")]])
    trusted = torch.tensor([True, True, False, False])
    assert select_per_campaign(losses, 1, trusted).tolist() == [1, 0, 1, 1]


def test_calibrate_bias_matches_each_campaigns_mean_and_minimises_its_kl():
    """Mean probability equals the teacher's per campaign; no other bias has a lower T=1 KL; only b moves."""
    torch.manual_seed(0)
    config = StudentConfig(num_event_types=2, num_features=0, hidden_size=4, head="film")
    c, n = 3, 200
    features, index = torch.randn(c * n, 4), torch.arange(c).repeat_interleave(n)
    heads = torch.randn(c, 13) * 0.3
    teacher = torch.randn(c * n) - torch.tensor([4.0, 0.0, 2.0])[index]  # rare, even and frequent campaigns
    out = calibrate_bias(heads, features, index, teacher, config)
    assert torch.equal(out[:, :-1], heads[:, :-1])
    p_s = torch.sigmoid(head_logits("film", features, out, index=index)).double()
    p_t = torch.sigmoid(teacher).double()
    for k in range(c):
        sel = index == k
        assert float(p_s[sel].mean()) == pytest.approx(float(p_t[sel].mean()), rel=1e-6)

    def kl(h):
        q = torch.sigmoid(head_logits("film", features, h, index=index)).double()
        return p_t * torch.log(p_t / q) + (1 - p_t) * torch.log((1 - p_t) / (1 - q))

    best = kl(out)
    for shift in (-0.05, 0.05):
        moved = out.clone()
        moved[:, -1] += shift
        worse = kl(moved)
        for k in range(c):
            assert float(worse[index == k].mean()) > float(best[index == k].mean())


def test_row_weight_of_two_equals_the_row_twice():
    """A row of weight 2 counts exactly like the same row given twice (the borrowed rows' weighting)."""
    config, features, campaign_index, teacher_logits, labels, init, c = _head_problem("film", seed=7)
    distill_config = DistillConfig(head_l2=1.0)
    doubled = torch.arange(0, len(campaign_index), 3)  # every third row
    weights = torch.ones(len(campaign_index))
    weights[doubled] = 2.0
    weighted = fit_heads(
        features,
        campaign_index,
        teacher_logits,
        labels,
        c,
        config,
        distill_config,
        steps=40,
        init=init,
        row_weights=weights,
    )
    rows = torch.cat([torch.arange(len(campaign_index)), doubled])
    repeated = fit_heads(
        features[rows],
        campaign_index[rows],
        teacher_logits[rows],
        labels[rows],
        c,
        config,
        distill_config,
        steps=40,
        init=init,
    )
    torch.testing.assert_close(weighted, repeated, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="row_weights"):
        fit_heads(
            features, campaign_index, teacher_logits, labels, c, config, distill_config, steps=1, row_weights=-weights
        )
