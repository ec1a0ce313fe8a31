"""Distillation: losses, backbone training (phase a) and batched head fitting (phase b) (pure torch).

Phase a trains the shared backbone jointly with the heads of the pooled campaigns
(:func:`fit_backbone`). Phase b freezes the backbone, caches its features once
(:func:`compute_features`) and fits the heads of all campaigns in one vectorised full-batch
optimisation (:func:`fit_heads`). See ``docs/compression.md``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from fleet.compression.data import SequenceBatch
from fleet.compression.student import (
    FakeQuant,
    SharedBackbone,
    Student,
    StudentConfig,
    backbone_forward,
    bias_position,
    feature_width,
    head_logits,
    head_logits_vjp,
    head_num_params,
    init_heads,
)

#: The distillation loss (``DistillConfig.loss``); :data:`LOSSES` are its values, in this order.
Loss = Literal["hinton", "class_distance"]
LOSSES: tuple[Loss, ...] = get_args(Loss)

BatchTriple = tuple[SequenceBatch, torch.Tensor, torch.Tensor]
Progress = Callable[[int, float], None]


@dataclass
class DistillConfig:
    """How the student is taught by the teachers.

    Args:
        loss: ``"hinton"`` (soft targets, Hinton et al. 2015) or ``"class_distance"`` (soft targets
            plus matching the teacher's signed distance to the decision boundary in logit space).
        temperature: softening temperature ``T`` of the soft-target term; the term is scaled by
            ``T**2`` so its gradient keeps the same size when ``T`` changes.
        hard_label_weight: ``alpha`` in ``[0, 1]``: on rows with a known label the loss is
            ``(1 - alpha) * soft + alpha * BCE(student, label)``; rows whose label is NaN use the
            soft term alone.
        distance_weight: weight ``beta`` of the class-distance term ``(s - t)**2`` (``"class_distance"`` only).
        head_l2: strength of the L2 pull of each head toward its init in :func:`fit_heads`, in
            units of rows: campaign ``c`` minimises ``(sum_i loss_i + head_l2 * ||theta_c - theta0_c||^2) / n_c``,
            a Gaussian prior worth ``head_l2`` rows per unit of squared distance. It keeps tiny
            campaigns near the anchor and fades as ``n_c`` grows.
    """

    loss: Loss = "hinton"
    temperature: float = 2.0
    hard_label_weight: float = 0.0
    distance_weight: float = 0.1
    head_l2: float = 0.01

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0.0 <= self.hard_label_weight <= 1.0:
            raise ValueError(f"hard_label_weight must be in [0, 1], got {self.hard_label_weight!r}")
        if not self.distance_weight >= 0:
            raise ValueError(f"distance_weight must be >= 0, got {self.distance_weight!r}")
        if not self.head_l2 >= 0:
            raise ValueError(f"head_l2 must be >= 0, got {self.head_l2!r}")


# ----------------------------------------------------------------------------------------------
# losses


def _bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none")


def distill_loss_rows(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None, config: DistillConfig
) -> torch.Tensor:
    """Per-row loss ``(B,)``; :func:`distill_loss` is its mean.

    Soft term: ``T**2 * KL(Bernoulli(sigmoid(t/T)) || Bernoulli(sigmoid(s/T)))``, i.e. the BCE between
    the softened probabilities minus the teacher's entropy: same gradient as the BCE, and 0 when the
    student matches the teacher. ``class_distance`` adds ``distance_weight * (s - t)**2``.
    """
    t = config.temperature
    teacher_logits = teacher_logits.detach().to(student_logits.dtype)
    target = torch.sigmoid(teacher_logits / t)  # (B,)
    soft = (_bce(student_logits / t, target) - _bce(teacher_logits / t, target)) * t**2  # (B,)
    if config.loss == "class_distance":
        soft = soft + config.distance_weight * (student_logits - teacher_logits) ** 2
    if labels is None or config.hard_label_weight == 0.0:
        return soft
    labels = labels.to(student_logits.dtype)
    known = torch.isfinite(labels)  # (B,)
    hard = _bce(student_logits, torch.where(known, labels, torch.zeros_like(labels)))  # (B,)
    alpha = config.hard_label_weight
    return torch.where(known, (1.0 - alpha) * soft + alpha * hard, soft)


def distill_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None, config: DistillConfig
) -> torch.Tensor:
    """Scalar distillation loss, the mean over rows of :func:`distill_loss_rows` (labels NaN where unknown)."""
    return distill_loss_rows(student_logits, teacher_logits, labels, config).mean()


# ----------------------------------------------------------------------------------------------
# phase a: backbone


def _epoch(batches: Iterable[BatchTriple] | Callable[[], Iterable[BatchTriple]]) -> Iterable[BatchTriple]:
    return batches() if callable(batches) else batches


def fit_backbone(
    student: Student,
    batches: Iterable[BatchTriple] | Callable[[], Iterable[BatchTriple]],
    config: DistillConfig,
    *,
    epochs: int = 1,
    steps: int | None = None,
    lr: float = 3e-3,
    seed: int = 0,
    grad_clip: float | None = 1.0,
    fake_quant: FakeQuant | None = None,
    progress: Progress | None = None,
    validate: Callable[[], float] | None = None,
    eval_every: int = 200,
    patience: int = 3,
) -> Student:
    """Train ``student`` (backbone and heads together, in place) on pooled campaigns; returns it in eval mode.

    With ``validate``, training stops early: every ``eval_every`` steps ``validate()`` (called with
    the student in eval mode, e.g. the distillation loss on held-out rows) is compared with the best so
    far; after ``patience`` evaluations without an improvement of more than 1e-4 the loop stops and
    the student is restored to its best evaluated state. ``steps`` is then the most it may take.

    Args:
        student: the model; its heads row ``c`` belongs to ``campaign_index == c``.
        batches: ``(SequenceBatch, campaign_index (B,), teacher_logits (B,))`` triples; an iterable
            (re-iterated every epoch, e.g. a list) or a zero-argument callable returning a fresh
            iterable per epoch. The batch's ``labels`` feed the hard-label term.
        config: the loss.
        epochs: passes over ``batches``.
        steps: stop after this many optimiser steps in total (None: run all epochs).
        lr: Adam learning rate.
        seed: seeds torch's RNG inside the call (the global RNG state is restored afterwards).
        grad_clip: max global gradient norm (None: no clipping); RNNs like it.
        fake_quant: optional quantization-aware training hook applied to the backbone's weight
            matrices (embedding, input and recurrent weights) in every forward pass.
        progress: called as ``progress(step, loss)`` after each step.
        validate: held-out loss for early stopping (see above); None trains for ``steps``.
        eval_every, patience: how often ``validate`` runs, and how many evaluations without
            improvement end the training.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if eval_every < 1 or patience < 1:
        raise ValueError(f"eval_every and patience must be >= 1, got {eval_every}, {patience}")
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    step = 0
    best_loss, best_state, stale = math.inf, None, 0

    def evaluate() -> bool:  # True: stop (no improvement for `patience` evaluations)
        nonlocal best_loss, best_state, stale
        student.eval()
        loss = validate()
        student.train()
        if loss < best_loss - 1e-4:
            best_loss, best_state, stale = loss, copy.deepcopy(student.state_dict()), 0
        else:
            stale += 1
        return stale >= patience

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student.train()
        stop = False
        for _ in range(epochs):
            seen = 0
            for batch, campaign_index, teacher_logits in _epoch(batches):
                seen += 1
                extra = {} if fake_quant is None else {"fake_quant": fake_quant}
                logits = student(batch.event_types, batch.features, batch.lengths, campaign_index, **extra)  # (B,)
                loss = distill_loss(logits, teacher_logits, batch.labels, config)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
                optimizer.step()
                step += 1
                if progress is not None:
                    progress(step, float(loss.detach()))
                if validate is not None and step % eval_every == 0:
                    stop = evaluate()
                if stop or (steps is not None and step >= steps):
                    break
            if stop or seen == 0 or (steps is not None and step >= steps):
                break
        if validate is not None and not stop and step % eval_every != 0:
            evaluate()  # the last steps count too
    if best_state is not None:
        student.load_state_dict(best_state)
    student.eval()
    return student


@torch.no_grad()
def compute_features(
    backbone: SharedBackbone,
    batch: SequenceBatch,
    batch_size: int = 2048,
    *,
    fake_quant: FakeQuant | None = None,
    pooled: bool = False,
) -> torch.Tensor:
    """Backbone features ``(B, H)`` of every row of ``batch`` (``(B, 2H)`` with ``pooled``, for the
    designs of :data:`fleet.compression.student.POOLED_DESIGNS`), in input row order, without gradients.

    Rows are run in length-sorted minibatches (less padding) and scattered back. Pass the same
    ``fake_quant`` the served backbone will use so the heads are fit on the features they will see.
    """
    was_training = backbone.training
    backbone.eval()
    out = torch.empty(len(batch), backbone.config.hidden_size * (2 if pooled else 1))  # (B, H) or (B, 2H)
    for index, sub in batch.minibatches(batch_size, sort_by_length=True):
        out[index] = backbone_forward(
            backbone, sub.event_types, sub.features, sub.lengths, fake_quant=fake_quant, pooled=pooled
        )
    backbone.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------
# phase b: all heads in one batched optimisation


def fit_heads(
    features: torch.Tensor,
    campaign_index: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    num_campaigns: int,
    student_config: StudentConfig,
    distill_config: DistillConfig,
    *,
    steps: int = 300,
    lr: float = 0.05,
    init: torch.Tensor | None = None,
    seed: int = 0,
    fake_quant: FakeQuant | None = None,
    progress: Progress | None = None,
    chunk_size: int = 8192,
    head_l2: torch.Tensor | float | None = None,
    row_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fit the heads ``(C, P)`` of all campaigns on cached, frozen backbone features.

    One full-batch Adam optimisation over all rows. Campaign ``c`` minimises its own objective
    ``(sum_{i in c} loss_i + head_l2 * ||theta_c - init_c||^2) / n_c``; the total is the sum over
    campaigns, so ``theta_c``'s gradient depends on campaign ``c``'s rows only, and Adam is
    elementwise: the batched fit equals fitting each campaign alone (up to float rounding).
    Campaigns without rows keep their init. Deterministic (no sampling).

    Args:
        features: ``(N, H)`` backbone features (:func:`compute_features`).
        campaign_index: ``(N,)`` campaign row of each feature row, in ``[0, num_campaigns)``.
        teacher_logits: ``(N,)`` teacher logits.
        labels: ``(N,)`` observed labels, NaN where unknown (or None).
        num_campaigns: ``C``.
        student_config: head design (``head``, ``head_rank``, ``hidden_size``).
        distill_config: loss and ``head_l2``.
        steps: Adam steps.
        lr: Adam learning rate.
        init: ``(C, P)`` start point and L2 anchor; None: :func:`fleet.compression.student.init_heads`. A good
            anchor is the fleet's mean head from phase a, so tiny campaigns shrink toward it.
        seed: seeds the default init.
        fake_quant: optional quantization-aware hook applied to the ``(C, P)`` heads every step;
            it must treat rows independently (per-campaign scales) and pass gradients straight through.
        progress: called as ``progress(step, loss)`` after each step (loss summed over campaigns).
        chunk_size: cells (rows, padding included) per block of the gradient pass (:func:`campaign_blocks`;
            memory/speed only, the result is the same).
        head_l2: ``(C,)`` per-campaign prior strengths (or one float) overriding ``distill_config.head_l2``,
            so a grid of strengths is fitted in one call per value (see :func:`fit_heads_grid`).
        row_weights: ``(N,)`` weight of each row in its campaign's loss (None: every row 1). A campaign's
            loss is then the weighted mean ``sum_i w_i loss_i / sum_i w_i`` and ``n_c`` above is ``sum_i w_i``
            (rows borrowed from other campaigns count less than the campaign's own, see docs/compression.md).

    The readout bias ``b`` is never pulled toward the anchor: it is one number per campaign, set by
    all its rows, and shrinking it would drag a campaign's base rate toward the fleet's.

    Returns:
        ``(C, P)`` float heads (not quantized: quantize them with the same scheme as ``fake_quant``).
    """
    n, width = features.shape
    if width != feature_width(student_config):
        raise ValueError(
            f"features have width {width}; the {student_config.head!r} head of "
            f"hidden_size={student_config.hidden_size} reads {feature_width(student_config)}"
        )
    if campaign_index.shape != (n,) or teacher_logits.shape != (n,):
        raise ValueError(f"campaign_index and teacher_logits must have shape ({n},)")
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},)")
    campaign_index = campaign_index.long()
    if n and (int(campaign_index.min()) < 0 or int(campaign_index.max()) >= num_campaigns):
        raise ValueError(f"campaign_index out of range [0, {num_campaigns})")
    design, rank = student_config.head, student_config.head_rank
    dtype = features.dtype
    if init is None:
        init = init_heads(student_config, num_campaigns, torch.Generator().manual_seed(seed))
    if init.shape != (num_campaigns, head_num_params(student_config)):
        raise ValueError(
            f"init must have shape ({num_campaigns}, {head_num_params(student_config)}), got {tuple(init.shape)}"
        )
    anchor = init.detach().to(dtype)  # (C, P)
    params = anchor.clone().requires_grad_(True)  # (C, P)

    if row_weights is None:
        row_weights = torch.ones(n, dtype=dtype)
    if row_weights.shape != (n,) or not bool((row_weights >= 0).all()):
        raise ValueError(f"row_weights must have shape ({n},) and be >= 0")
    row_weights = row_weights.detach().to(dtype)
    counts = torch.bincount(campaign_index, weights=row_weights, minlength=num_campaigns).to(dtype)  # (C,)
    inv_count = torch.where(counts > 0, 1.0 / counts.clamp(min=1e-12), torch.ones_like(counts))  # (C,)
    row_weight = inv_count.index_select(0, campaign_index) * row_weights  # (N,)
    features = features.detach()
    teacher_logits = teacher_logits.detach().to(dtype)

    if head_l2 is None:
        head_l2 = distill_config.head_l2
    l2 = torch.as_tensor(head_l2, dtype=dtype).expand(num_campaigns)  # (C,)
    if not bool((l2 >= 0).all()):
        raise ValueError("head_l2 must be >= 0")
    l2_rows = (2.0 * l2 * inv_count).unsqueeze(1) * _shrunk_segments(student_config, dtype)  # (C, P)

    blocks = [
        _Block(
            campaigns,
            features[rows],  # (Cb, L, W)
            teacher_logits[rows],  # (Cb, L)
            None if labels is None else torch.where(valid, labels[rows], torch.full_like(labels[rows], math.nan)),
            torch.where(valid, row_weight[rows], torch.zeros_like(row_weight[rows])),  # (Cb, L), 0 on padding
        )
        for campaigns, rows, valid in campaign_blocks(campaign_index, num_campaigns, chunk_size)
    ]
    optimizer = torch.optim.Adam([params], lr=lr)
    for step in range(1, steps + 1):
        params.grad = None
        used = fake_quant(params) if fake_quant is not None else params  # (C, P)
        # Block by block (campaigns of similar row counts, padded): autograd only from the loss to the (Cb, L)
        # logits; the head's part of the gradient is written out (head_logits_vjp), summed into grad_used.
        grad_used = torch.zeros_like(used)  # (C, P)
        total = 0.0
        for block in blocks:
            logits, vjp = head_logits_vjp(design, block.features, used.detach().index_select(0, block.campaigns), rank)
            logits.requires_grad_(True)  # (Cb, L)
            loss_rows = distill_loss_rows(logits, block.teacher_logits, block.labels, distill_config)  # (Cb, L)
            loss = (loss_rows * block.weights).sum()
            (grad_logits,) = torch.autograd.grad(loss, logits)
            grad_used.index_add_(0, block.campaigns, vjp(grad_logits))
            total += float(loss.detach())
        if fake_quant is not None:
            used.backward(grad_used)  # through the hook's straight-through estimator
        else:
            params.grad = grad_used
        if params.grad is None:  # a hook that ignores its input
            params.grad = torch.zeros_like(params)
        if bool((l2 > 0).any()):
            with torch.no_grad():
                delta = params - anchor  # (C, P)
                params.grad.add_(l2_rows * delta)
                total += float((0.5 * l2_rows * delta**2).sum())
        optimizer.step()
        if progress is not None:
            progress(step, total)
    return params.detach()


@dataclass(frozen=True)
class _Block:
    """The fit rows of a block of campaigns, padded to its longest campaign's ``L`` rows."""

    campaigns: torch.Tensor  # (Cb,) campaign rows of the heads
    features: torch.Tensor  # (Cb, L, W)
    teacher_logits: torch.Tensor  # (Cb, L)
    labels: torch.Tensor | None  # (Cb, L), NaN on padding
    weights: torch.Tensor  # (Cb, L), 0 on padding


#: A block takes campaigns whose row counts are within this factor of its smallest one's (padding then wastes at
#: most ``1 - 1 / BLOCK_LENGTH_RATIO`` of its cells), or more uneven ones while its padding stays within
#: ``BLOCK_PADDING_CELLS``: a block costs a fixed ~0.1 ms a step, so few campaigns are cheaper in one padded block
#: than in several (stages 3-5 of 17 users in process: 2.7 s with no padding allowance, 1.5-1.7 s with 4,096 cells).
BLOCK_LENGTH_RATIO = 1.5
BLOCK_PADDING_CELLS = 4096


def campaign_blocks(
    campaign_index: torch.Tensor, num_campaigns: int, cells: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The rows of ``campaign_index (N,)`` grouped into blocks of campaigns with similar row counts
    (:data:`BLOCK_LENGTH_RATIO`, :data:`BLOCK_PADDING_CELLS`):
    ``[(campaigns (Cb,), rows (Cb, L), valid (Cb, L)), ...]`` where ``rows[i, :n_i]`` are campaign
    ``campaigns[i]``'s row numbers in input order and the rest padding (``valid`` False, row 0). A block holds
    at most ``cells`` cells (``Cb * L``) unless one campaign alone has more rows; campaigns without rows are in
    no block. Deterministic: campaigns in order of (row count, campaign)."""
    counts = torch.bincount(campaign_index, minlength=num_campaigns)  # (C,)
    order = torch.sort(campaign_index, stable=True).indices  # (N,) rows grouped by campaign, input order within
    starts = torch.cumsum(counts, 0) - counts  # (C,) each campaign's first position in ``order``
    active = torch.nonzero(counts).flatten()  # (A,)
    active = active[torch.sort(counts[active], stable=True).indices].tolist()  # by row count, then campaign
    groups, group, rows_in_group = [], [], 0
    for c in active:
        n = int(counts[c])  # >= every count in the group (ascending order): the block's L if c joins
        padding = (len(group) + 1) * n - rows_in_group - n  # the block's padding cells with c in it
        uneven = n > BLOCK_LENGTH_RATIO * int(counts[group[0]]) if group else False
        if group and ((len(group) + 1) * n > cells or (uneven and padding > BLOCK_PADDING_CELLS)):
            groups.append(group)
            group, rows_in_group = [], 0
        group.append(c)
        rows_in_group += n
    if group:
        groups.append(group)
    out = []
    for group in groups:
        campaigns = torch.tensor(group, dtype=torch.long)  # (Cb,)
        length = int(counts[group[-1]])
        position = torch.arange(length)  # (L,)
        valid = position[None, :] < counts[campaigns][:, None]  # (Cb, L)
        where = (starts[campaigns][:, None] + position[None, :]).clamp(max=max(len(order) - 1, 0))  # (Cb, L)
        rows = torch.where(valid, order[where], torch.zeros_like(where))  # (Cb, L)
        out.append((campaigns, rows, valid))
    return out


def _shrunk_segments(student_config: StudentConfig, dtype: torch.dtype) -> torch.Tensor:
    """``(P,)`` 1 where the L2 prior applies, 0 on the readout bias ``b`` (see :func:`fit_heads`)."""
    mask = torch.ones(head_num_params(student_config), dtype=dtype)
    mask[bias_position(student_config)] = 0.0
    return mask


def fit_heads_grid(
    features: torch.Tensor,
    campaign_index: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    num_campaigns: int,
    student_config: StudentConfig,
    distill_config: DistillConfig,
    grid: tuple[float, ...],
    **fit_kwargs,
) -> torch.Tensor:
    """Heads ``(G, C, P)`` of every campaign for each prior strength of ``grid`` (``G`` values):
    one batched :func:`fit_heads` per value, all campaigns together, so that a campaign's strength can
    be chosen afterwards on its own validation rows (:func:`select_per_campaign`)."""
    return torch.stack(
        [
            fit_heads(
                features,
                campaign_index,
                teacher_logits,
                labels,
                num_campaigns,
                student_config,
                distill_config,
                head_l2=float(strength),
                **fit_kwargs,
            )
            for strength in grid
        ]
    )  # (G, C, P)


def campaign_losses(
    heads: torch.Tensor,
    features: torch.Tensor,
    campaign_index: torch.Tensor,
    teacher_logits: torch.Tensor,
    num_campaigns: int,
    student_config: StudentConfig,
    distill_config: DistillConfig,
) -> torch.Tensor:
    """Mean soft distillation loss ``(C,)`` of heads ``(C, P)`` per campaign on the given rows
    (labels are not used: the loss measures agreement with the teacher; a campaign without rows gets +inf)."""
    with torch.no_grad():
        logits = head_logits(student_config.head, features, heads, student_config.head_rank, index=campaign_index)
        rows = distill_loss_rows(logits, teacher_logits, None, distill_config)  # (N,)
        # (.double(): bincount of no rows returns int64 zeros even with float weights)
        total = torch.bincount(campaign_index, weights=rows.double(), minlength=num_campaigns).double()
        count = torch.bincount(campaign_index, minlength=num_campaigns)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.inf))  # (C,)


def select_per_campaign(losses: torch.Tensor, default: int, trusted: torch.Tensor) -> torch.Tensor:
    """Index ``(C,)`` of the best of ``G`` candidates per campaign from ``losses (G, C)`` (the first on
    ties); campaigns not ``trusted`` (too few validation rows to choose on) get ``default``."""
    best = torch.argmin(losses, dim=0)  # (C,), first minimum on ties
    return torch.where(trusted, best, torch.full_like(best, default))


def calibrate_bias(
    heads: torch.Tensor,
    features: torch.Tensor,
    campaign_index: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_config: StudentConfig,
    *,
    iterations: int = 25,
) -> torch.Tensor:
    """Heads ``(C, P)`` with each campaign's readout bias ``b`` moved so that its mean
    probability on the given rows equals its teacher's: ``mean_i sigmoid(s_i + delta_c) = mean_i sigmoid(t_i)``.

    That ``delta_c`` is also the bias that minimises the campaign's mean KL(teacher || student) at
    temperature 1 (the KL's derivative in ``b`` is ``mean(p_s - p_t)``): the soft-target loss at ``T > 1``
    matches the means of the *softened* probabilities, which leaves rare-event campaigns off in their mean.
    Vectorised Newton on ``delta (C,)``; a campaign without rows keeps its bias.
    """
    c = heads.shape[0]
    with torch.no_grad():
        logits = head_logits(
            student_config.head, features, heads, student_config.head_rank, index=campaign_index
        ).double()  # (N,)
        target = torch.bincount(campaign_index, weights=torch.sigmoid(teacher_logits.double()), minlength=c)  # (C,)
        delta = torch.zeros(c, dtype=torch.float64)  # (C,)
        for _ in range(iterations):
            p = torch.sigmoid(logits + delta[campaign_index])  # (N,)
            value = torch.bincount(campaign_index, weights=p, minlength=c) - target  # (C,)
            slope = torch.bincount(campaign_index, weights=p * (1 - p), minlength=c)  # (C,)
            delta -= torch.where(slope > 0, value / slope.clamp(min=1e-12), torch.zeros_like(value)).clamp(-2.0, 2.0)
        out = heads.clone()
        out[:, bias_position(student_config)] += delta.to(heads.dtype)
    return out
