"""The compression stages as plain functions over *batches* of campaigns. No Ray here: the pipeline
runs them as Ray tasks, tests and tools call them directly. Stages exchange data only through the
run's work dir on the store URI (see ``docs/pipeline.md``).

stage 1  :func:`soft_labels`      every teacher over its campaign's rows -> teacher logits (the floor)
stage 2  :func:`train_backbone`   one shared backbone on pooled soft labels, jointly with heads
stage 3  :func:`fit_heads_shard`  all heads of a batch in one optimisation; quantize (stage 4) and
                                  measure hold-out fidelity (stage 5) in the same pass
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import tomllib
import torch

from fleet.compression.data import SequenceBatch
from fleet.compression.distill import (
    DistillConfig,
    Loss,
    calibrate_bias,
    campaign_losses,
    compute_features,
    distill_loss_rows,
    fit_backbone,
    fit_heads_grid,
    select_per_campaign,
)
from fleet.compression.metrics import CALIBRATION_KEYS, PROB_EPS, campaign_fidelity
from fleet.compression.quant import PerGroup, PerTensor, fake_quantize, quantize_rows
from fleet.compression.student import (
    POOLED_DESIGNS,
    Arch,
    HeadDesign,
    Student,
    StudentConfig,
    backbone_forward,
    bias_position,
    feature_width,
    head_logits,
    head_num_params,
    ladder_config,
    widen_heads,
)
from fleet.core.constants import CODECS, DATA_FINGERPRINT_BYTES, SUPPORTED_BITS, TEACHER_SHA256_BYTES, Codec
from fleet.core.errors import FleetError
from fleet.core.ids import printable_id, validate_campaign_id
from fleet.core.redact import scrub, secret_values
from fleet.formats.backbone_codec import backbone_from_bytes, backbone_to_bytes
from fleet.formats.codec import heads_to_table
from fleet.formats.events import (
    HOLDOUT_FRACTION,
    EventsDataset,
    data_fingerprint,
    holdout_mask,
    rows_by_campaign,
    split_by_campaign,
    table_to_batch,
    truncate_sequences,
    validate_campaign_table,
)
from fleet.formats.heads import bloomier_head_row, decode_heads, encode_heads, head_row
from fleet.formats.teacher_pack import load_teachers, pack_config_uri, teacher_logits
from fleet.serve.serving import DEFAULT_MAX_SEQUENCE_LENGTH
from fleet.storage.promotion_gate import PromotionGate

FIT, VALIDATION, HOLDOUT, UNUSED = 0, 1, 2, 3  # row splits of a campaign
BORROWED = (
    4  # a soft-label row of another campaign's sequence (of the borrowed pool) labelled by this campaign's teacher
)
MIN_VALIDATION_ROWS = 10  # fewer validation rows: a campaign is gated on its fit rows and keeps the default head_l2

SOFT_LABELS_SCHEMA = pa.schema(
    [
        pa.field("campaign_id", pa.string(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),
        pa.field("split", pa.int8(), nullable=False),
        pa.field("teacher_logit", pa.float32(), nullable=False),
        pa.field("label", pa.float32(), nullable=False),  # NaN where unknown
    ]
)
CAMPAIGNS_SCHEMA = pa.schema(
    [
        pa.field("campaign_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # ok | reused | rejected
        pa.field("stage", pa.string(), nullable=True),
        pa.field("reason", pa.string(), nullable=True),
        pa.field("teacher_sha256", pa.string(), nullable=True),
        pa.field("data_fingerprint", pa.string(), nullable=True),
        pa.field("teacher_bytes", pa.int64(), nullable=True),
        pa.field("n_rows", pa.int32(), nullable=True),
        pa.field("n_truncated", pa.int32(), nullable=True),  # rows cut to max_sequence_length
    ]
)

#: Campaigns whose events one read of :func:`_campaign_batches` holds (bounds stage 2's memory at any fleet size).
CAMPAIGNS_PER_READ = 1024


@dataclass
class CompressConfig:
    """Everything a compression run needs besides its URIs (``--config FILE`` holds these keys).

    Args:
        arch, hidden_size, embed_dim, num_layers: the shared student backbone.
        hidden_size_grid: backbone widths to try in stage 2 (empty: ``hidden_size`` alone): one backbone is
            trained per width and the one with the lowest distillation loss on the sample's validation rows
            is kept (:func:`train_backbone`); heads follow its width (3H + 1 parameters for ``film``).
        head, head_rank: per-campaign head design (``film`` | ``lowrank`` | ``linear``).
        loss, temperature, hard_label_weight, distance_weight: distillation (see docs/compression.md).
        head_l2_grid: strengths of the prior that pulls each head toward the fleet's mean head (in rows, see
            docs/compression.md); every value is fitted for every campaign in one batched fit per value and
            each campaign keeps the one with the lowest distillation loss on its own validation rows.
        head_l2: the strength (one of ``head_l2_grid``) of campaigns with fewer than ``MIN_VALIDATION_ROWS``
            validation rows, too few to choose on.
        calibrate_bias: after the fit, move each head's readout bias so that its mean probability on the
            campaign's fit + validation rows equals its teacher's (:func:`fleet.compression.distill.calibrate_bias`).
        head_ladder: refit a campaign whose head fails the gate with the next design of
            :data:`fleet.compression.student.HEAD_LADDER` (``film`` -> ``film_pool``), see :func:`fit_heads_shard`.
        bits: ``"auto"`` (per campaign, the fewest of 1/2/4/8/16 bits that pass the gate) or 1, 2, 4, 8, 16.
        group_size: head values per quantization scale.
        prune_sparsity: fraction of each head's weights pruned by magnitude before quantization.
        gate_slack: auto-bits gate: the quantized head's mean |p - p_teacher| on validation rows may
            exceed the float head's by at most this much.
        gate_max_correlation_drop: auto-bits gate: the Pearson correlation of the quantized head's logits
            with the teacher's on validation rows may be at most this much below the float head's. Scale-free:
            a teacher whose probabilities barely vary keeps its ranking even where ``gate_slack`` (absolute)
            would let 1-2 bits flatten it.
        gate_max_kl, gate_max_ratio_error: the absolute per-campaign gate against the teacher on validation
            rows: a head passes when the mean KL(teacher || student) is at most ``gate_max_kl`` nats and
            ``|mean(p_student) / mean(p_teacher) - 1|`` at most ``gate_max_ratio_error``. A head whose float
            version fails it is kept at the bits that do not make it worse and stored as ``fallback``.
        head_qat: with fixed ``bits``, fit heads quantization-aware (straight-through estimator).
        codec: how heads are stored: ``"packed"`` (bit-packed integer codes, ``bits``/``group_size``/
            ``prune_sparsity``; ``fleet-heads/1.1``) or ``"bloomier"`` (Weightless, :mod:`fleet.compression.weightless`;
            ``fleet-heads/2.0``): the ``bloomier_*`` fields apply and ``bits``, ``group_size``,
            ``prune_sparsity``, ``head_qat`` and ``head_ladder`` do not; batches are contiguous campaign id
            ranges of at most ``bloomier_block_rows`` campaigns (one filter block each) and no head is reused
            from the parent version (a block is refitted whole; the backbone is still inherited).
        bloomier_sparsity: share of each head's weights (all parameters but the bias) pruned before encoding.
        bloomier_value_bits: ``b``: ``2**b - 1`` shared centroids per block.
        bloomier_check_bits: ``r``: cells of ``b + r`` bits; a pruned weight decodes to a random centroid
            (false positive) with probability ``(2**b - 1) / 2**(b + r)``.
        bloomier_block_rows: campaigns per filter block (= per Parquet row group) at most.
        bloomier_refit, bloomier_refit_steps: Weightless's re-training: :func:`fleet.compression.weightless.refit_blocks`
            (that many Adam steps at ``head_lr`` with the false positives fixed, then one re-encoding), then
            :func:`fleet.compression.weightless.refit_centroids` (that many steps at ``head_lr / 5``: centroids and biases
            around the final table).
        backbone_bits: 8 (int8 weights, default), 16 or 32.
        backbone_qat: train the backbone with int8 fake quantization of all weight matrices.
        backbone_steps, backbone_lr, backbone_batch_size: backbone training (stage 2): the most optimiser
            steps, cycling over the pooled sample as often as needed.
        backbone_eval_every, backbone_patience: stage 2 stops early when the distillation loss on the
            sample's validation rows has not improved for ``backbone_patience`` evaluations, one every
            ``backbone_eval_every`` steps, and keeps its best state.
        backbone_max_sequences, backbone_per_campaign: the pooled sample the backbone trains on: about
            ``backbone_max_sequences`` fit rows shared so that each campaign contributes in proportion to the
            square root of its fit rows, at most ``backbone_per_campaign`` and at least ``backbone_min_rows``
            (a uniform subset of campaigns when the budget cannot give every one that many; see
            :func:`backbone_quotas`).
        backbone_workers: >1 trains with Ray Train's TorchTrainer (DDP) on that many workers.
        head_steps, head_lr: the batched head fit (stage 3).
        max_fit_rows, max_validation_rows: per-campaign caps on transfer rows (the rest is unused).
        max_sequence_length: the longest sequence used (events), at ingest: a longer row keeps its last
            ``max_sequence_length`` events (and their features) in every stage; the manifest counts such rows
            (``rows_truncated``). Default: serving's limit, :data:`fleet.serve.serving.DEFAULT_MAX_SEQUENCE_LENGTH`.
        borrowed_rows, borrowed_weight: the enlarged transfer set (0: off). A pool of about ``borrowed_rows``
            sequences is drawn from the campaigns' fit rows (:func:`borrowed_pool_rows`) and each campaign's
            teacher also labels enough of the pool's other-campaign rows in its support to bring its transfer
            set up to ``borrowed_rows`` (:func:`borrowed_rows_of`); in the head fit each such row weighs
            ``borrowed_weight`` of one of the campaign's own fit rows, and the backbone sample takes as many of
            them per campaign as of its own fit rows. Gate, calibration and fidelity use the campaign's own
            rows only.
        validation_fraction: share of non-hold-out rows kept out of the head fit for the gate.
        campaigns_per_task: campaigns per Ray task (0: sized from the fleet and the cluster).
        min_auc_class_count: a campaign's hold-out AUCs are computed only with at least this many positive
            and negative labels (fewer: AUC too noisy, reported as unavailable; mean |p - p_teacher| still is).
        seed: every random choice derives from it.
        num_event_types, num_features: the fleet's input space (0: from the first teacher's config).
        gate: the promotion gate, thresholds for moving ``champion``
            (:class:`fleet.storage.promotion_gate.PromotionGate`; a config file gives a table of its fields, any
            left out keeps its default).
    """

    # the student and distillation defaults are StudentConfig's and DistillConfig's (one source of truth)
    arch: Arch = StudentConfig.arch
    hidden_size: int = StudentConfig.hidden_size
    hidden_size_grid: tuple[int, ...] = ()
    embed_dim: int = StudentConfig.embed_dim
    num_layers: int = StudentConfig.num_layers
    head: HeadDesign = StudentConfig.head
    head_rank: int = StudentConfig.head_rank
    loss: Loss = DistillConfig.loss
    temperature: float = DistillConfig.temperature
    hard_label_weight: float = DistillConfig.hard_label_weight
    distance_weight: float = DistillConfig.distance_weight
    head_l2: float = 1.0
    head_l2_grid: tuple[float, ...] = (0.0, 1.0, 10.0)
    calibrate_bias: bool = True
    head_ladder: bool = True
    bits: Literal["auto"] | int = "auto"  # an int of SUPPORTED_BITS
    group_size: int = 64
    prune_sparsity: float = 0.0
    gate_slack: float = 0.01
    gate_max_correlation_drop: float = 0.02
    gate_max_kl: float = 0.05
    gate_max_ratio_error: float = 0.1
    head_qat: bool = False
    codec: Codec = "packed"
    bloomier_sparsity: float = 0.7
    bloomier_value_bits: int = 3
    bloomier_check_bits: int = 5
    bloomier_block_rows: int = 1024
    bloomier_refit: bool = True
    bloomier_refit_steps: int = 100
    backbone_bits: int = 8
    backbone_qat: bool = False
    backbone_steps: int = 4000
    backbone_eval_every: int = 200
    backbone_patience: int = 3
    backbone_lr: float = 3e-3
    backbone_batch_size: int = 128
    backbone_max_sequences: int = 40_000
    backbone_per_campaign: int = 2000
    backbone_min_rows: int = 16
    backbone_workers: int = 1
    head_steps: int = 300
    head_lr: float = 0.05
    max_fit_rows: int = 4000
    max_validation_rows: int = 1000
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
    borrowed_rows: int = 0
    borrowed_weight: float = 0.5
    validation_fraction: float = 0.15
    campaigns_per_task: int = 0
    min_auc_class_count: int = 10
    seed: int = 0
    num_event_types: int = 0
    num_features: int = 0
    gate: PromotionGate = field(default_factory=PromotionGate)
    # teacher loaders the operator allows ("package.module:function", `fleet compress --allow-loader`); installed
    # `fleet.teacher_loaders` entry points are always allowed, any other config.json "loader" is quarantined
    allow_loaders: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.gate, PromotionGate):  # a config file's (or to_dict's) table of its fields
            self.gate = PromotionGate.from_dict(self.gate)
        if self.bits != "auto" and self.bits not in SUPPORTED_BITS:
            if isinstance(self.bits, str) and self.bits.isdigit():
                self.bits = int(self.bits)
            if self.bits not in SUPPORTED_BITS:
                raise ValueError(
                    f"bits must be 'auto' or one of {', '.join(map(str, SUPPORTED_BITS))}; got {self.bits!r}"
                )
        if self.head_qat and self.bits == "auto":
            raise ValueError("head_qat needs a fixed bits value (QAT trains for one bit width)")
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {self.codec!r}")
        if not 0.0 <= self.bloomier_sparsity < 1.0:
            raise ValueError(f"bloomier_sparsity must be in [0, 1), got {self.bloomier_sparsity}")
        if not (
            1 <= self.bloomier_value_bits <= 8
            and self.bloomier_check_bits >= 0
            and self.bloomier_value_bits + self.bloomier_check_bits <= 24
        ):
            raise ValueError("need 1 <= bloomier_value_bits <= 8, bloomier_check_bits >= 0 and their sum <= 24")
        if self.bloomier_block_rows < 1 or self.bloomier_refit_steps < 1:
            raise ValueError("bloomier_block_rows and bloomier_refit_steps must be >= 1")
        if not 0.0 <= self.prune_sparsity < 1.0:
            raise ValueError(f"prune_sparsity must be in [0, 1), got {self.prune_sparsity}")
        if self.borrowed_rows < 0 or self.borrowed_weight < 0:
            raise ValueError("borrowed_rows and borrowed_weight must be >= 0")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")
        for name in (
            "backbone_steps",
            "head_steps",
            "backbone_workers",
            "max_fit_rows",
            "backbone_per_campaign",
            "backbone_min_rows",
            "backbone_eval_every",
            "backbone_patience",
            "max_sequence_length",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        self.head_l2_grid = tuple(float(v) for v in self.head_l2_grid)
        self.hidden_size_grid = tuple(int(v) for v in self.hidden_size_grid)
        if any(v < 1 for v in self.hidden_size_grid):
            raise ValueError(f"hidden_size_grid must hold widths >= 1, got {self.hidden_size_grid}")
        if not self.head_l2_grid or min(self.head_l2_grid) < 0:
            raise ValueError(f"head_l2_grid must be non-empty and >= 0, got {self.head_l2_grid}")
        if self.head_l2 not in self.head_l2_grid:
            raise ValueError(f"head_l2 ({self.head_l2}) must be one of head_l2_grid {self.head_l2_grid}")
        if not (self.gate_max_kl > 0 and self.gate_max_ratio_error > 0):
            raise ValueError("gate_max_kl and gate_max_ratio_error must be > 0")
        if not self.gate_max_correlation_drop >= 0:
            raise ValueError("gate_max_correlation_drop must be >= 0")
        self.student_config(2, 1)  # validates the student fields early
        self.distill_config()

    def backbone_widths(self) -> tuple[int, ...]:
        """The hidden sizes stage 2 trains (the best on validation is kept)."""
        return self.hidden_size_grid or (self.hidden_size,)

    def student_config(self, num_event_types: int, num_features: int) -> StudentConfig:
        return StudentConfig(
            num_event_types=num_event_types,
            num_features=num_features,
            arch=self.arch,
            hidden_size=self.hidden_size,
            embed_dim=self.embed_dim,
            num_layers=self.num_layers,
            head=self.head,
            head_rank=self.head_rank,
        )

    def distill_config(self) -> DistillConfig:
        return DistillConfig(
            loss=self.loss,
            temperature=self.temperature,
            hard_label_weight=self.hard_label_weight,
            distance_weight=self.distance_weight,
            head_l2=self.head_l2,
        )

    def to_dict(self) -> dict:
        """Every field as JSON-able values; the gate as its non-default fields (:meth:`PromotionGate.to_dict`)."""
        return {**dataclasses.asdict(self), "gate": self.gate.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> CompressConfig:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown config keys: {unknown}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str) -> CompressConfig:
        """Read a JSON or TOML config file (keys as the fields above; a ``[compress]`` table in TOML)."""
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read config ({exc.strerror or type(exc).__name__})") from None
        try:
            data = tomllib.loads(raw.decode()) if path.endswith(".toml") else json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: cannot parse config ({exc})") from None
        return cls.from_dict(data.get("compress", data))


@dataclass
class StageContext:
    """What every stage task needs: input URIs, the fleet's input space and the config."""

    teachers_uri: str
    events_uri: str
    config: CompressConfig
    num_event_types: int
    num_features: int
    storage_options: dict | None = None


@dataclass(frozen=True)
class ShardJob:
    """One stage task's batch (:meth:`fleet.run.plan.Plan.soft_label_jobs`, :meth:`~fleet.run.plan.Plan.head_jobs`):
    the ``campaigns`` of work-dir shard ``shard``. Stage 1 reads ``backbone_quota`` (each campaign's fit rows in the
    backbone sample), ``parent`` (``{campaign: [teacher_sha, data_fp]}`` of the parent's heads a campaign may
    reuse), ``packed`` (``{campaign: [pack, slot, sha256]}``) and ``teacher_conflicts`` (``{campaign: reason}``);
    stage 3 reads ``hashes`` (``{campaign: [teacher_sha, data_fp]}`` of the heads it fits) and ``parts``
    (``{shard: campaigns}`` when the job fits the campaigns of several shards together, each shard's heads written
    to its own file; empty: the one shard ``shard``)."""

    campaigns: list[str]
    shard: str = ""
    backbone_quota: dict[str, int] = field(default_factory=dict)
    parent: dict[str, list[str]] = field(default_factory=dict)
    packed: dict[str, list] = field(default_factory=dict)
    teacher_conflicts: dict[str, str] = field(default_factory=dict)
    hashes: dict[str, list[str]] = field(default_factory=dict)
    parts: dict[str, list[str]] = field(default_factory=dict)


def row_splits(campaign_id: str, num_rows: int, config: CompressConfig) -> np.ndarray:
    """Split of each row of a campaign: HOLDOUT (the shared split of :func:`fleet.formats.events.holdout_mask`),
    VALIDATION (a second hash, ``validation_fraction`` of the rest), FIT, or UNUSED beyond the caps."""
    splits = np.where(holdout_mask(campaign_id, num_rows), HOLDOUT, FIT).astype(np.int8)
    threshold = int(config.validation_fraction * 2**64)
    for i in np.flatnonzero(splits == FIT):
        if int.from_bytes(hashlib.sha256(f"validation:{campaign_id}:{i}".encode()).digest()[:8], "big") < threshold:
            splits[i] = VALIDATION
    for split, cap in ((FIT, config.max_fit_rows), (VALIDATION, config.max_validation_rows)):
        rows = np.flatnonzero(splits == split)
        splits[rows[cap:]] = UNUSED
    return splits


def _campaign_row(campaign_id: str, status: str, stage: str | None = None, reason: str | None = None, **fields) -> dict:
    return {
        "campaign_id": campaign_id,
        "status": status,
        "stage": stage,
        "reason": reason,
        "teacher_sha256": fields.get("teacher_sha256"),
        "data_fingerprint": fields.get("data_fingerprint"),
        "teacher_bytes": fields.get("teacher_bytes"),
        "n_rows": fields.get("n_rows"),
        "n_truncated": fields.get("n_truncated"),
    }


def prepared_campaign_table(table: pa.Table, campaign_id: str, ctx: StageContext) -> tuple[pa.Table, int]:
    """A campaign's events as stage 1 uses (and fingerprints) them: checked against the events contract
    (:class:`~fleet.core.errors.FleetError` naming campaign, file and reason), rows cut to ``max_sequence_length``;
    returns ``(table, rows truncated)``."""
    validate_campaign_table(table, campaign_id, ctx.num_event_types, ctx.num_features, ctx.events_uri)
    return truncate_sequences(table, ctx.config.max_sequence_length, ctx.num_features)


def soft_labels(job: ShardJob, ctx: StageContext, pool: pa.Table | None = None) -> tuple[pa.Table, pa.Table]:
    """Stage 1 for one batch: ``job``'s ``campaigns``, with their ``parent`` hashes, where the packed ones are
    (``packed``) and which are ambiguous (``teacher_conflicts``), both from
    :func:`fleet.formats.teacher_pack.locate_teachers`.

    Runs each teacher over its campaign's fit, validation and hold-out rows, and over its share of the
    borrowed ``pool`` (:func:`borrowed_pool`, :func:`borrowed_rows_of`), as ``BORROWED`` rows whose ``row``
    is the pool's row. Reference teachers of one architecture run together, their parameters stacked
    (:func:`fleet.formats.teacher_pack.teacher_logits`); custom ones one at a time. A campaign whose teacher
    and data hashes equal the parent's (``parent``; empty when the backbone is retrained) is
    ``reused``: its teacher is not run. A bad teacher, bad events or non-finite outputs quarantine
    that campaign only (``rejected`` with stage and reason; reasons are scrubbed of credentials,
    :func:`fleet.core.redact.scrub`). Returns ``(soft_labels, campaigns)``.
    """
    campaigns, parent = job.campaigns, job.parent
    events = EventsDataset(ctx.events_uri, ctx.storage_options)
    valid = []
    status_rows, soft_parts = [], []
    for campaign_id in campaigns:
        try:
            valid.append(validate_campaign_id(campaign_id, path=ctx.teachers_uri))
        except FleetError as exc:
            status_rows.append(_campaign_row(printable_id(campaign_id), "rejected", "soft_labels", str(exc)))
    tables = events.read_campaigns(valid)
    pool_batch = table_to_batch(pool, ctx.num_features) if pool is not None and len(pool) else None
    pool_source = pool["campaign_id"].to_numpy(zero_copy_only=False) if pool_batch is not None else None
    load_options = {"allow_loaders": ctx.config.allow_loaders, "untrusted_roots": (ctx.events_uri,)}
    # a packed teacher whose index sha256 is the parent's is not loaded unless its data changed (read below)
    teachers = load_teachers(
        ctx.teachers_uri,
        valid,
        job.packed,
        ctx.storage_options,
        conflicts=job.teacher_conflicts,
        **load_options,
        unchanged={c: hashes[0] for c, hashes in parent.items()},
    )
    pending = []  # (campaign_id, rows to label, used rows, splits, borrowed rows, labels, hashes)
    for campaign_id in valid:
        try:
            teacher = teachers[campaign_id]
            if isinstance(teacher, FleetError):
                raise teacher
            space = (teacher.config.get("num_event_types"), teacher.config.get("num_features"))
            if space != (ctx.num_event_types, ctx.num_features):
                where = (
                    pack_config_uri(ctx.teachers_uri, job.packed[campaign_id][0])
                    if campaign_id in job.packed
                    else f"{ctx.teachers_uri.rstrip('/')}/{campaign_id}/config.json"
                )
                raise FleetError(
                    f"teacher input space (num_event_types, num_features) = {space} differs from the "
                    f"fleet's {(ctx.num_event_types, ctx.num_features)}",
                    campaign_id=campaign_id,
                    path=where,
                )
            table = tables[campaign_id]
            table, n_truncated = prepared_campaign_table(table, campaign_id, ctx)
        except FleetError as exc:
            status_rows.append(_campaign_row(campaign_id, "rejected", "soft_labels", str(exc)))
            continue
        hashes = {
            "teacher_sha256": teacher.sha256,
            "data_fingerprint": data_fingerprint(table),
            "teacher_bytes": teacher.num_bytes,
            "n_rows": len(table),
            "n_truncated": n_truncated,
        }
        if parent.get(campaign_id) == [hashes["teacher_sha256"], hashes["data_fingerprint"]]:
            status_rows.append(_campaign_row(campaign_id, "reused", **hashes))
            continue
        splits = row_splits(campaign_id, len(table), ctx.config)
        used = np.flatnonzero(splits != UNUSED)
        batch = table_to_batch(table.take(pa.array(used)), ctx.num_features)
        borrowed = np.zeros(0, np.int64)  # the pool rows this teacher labels
        if pool_batch is not None:
            own_fit = torch.from_numpy(np.flatnonzero(splits[used] == FIT))
            eligible = (pool_source != campaign_id) & in_support(pool_batch, batch.select(own_fit).packed_types)
            borrowed = borrowed_rows_of(campaign_id, eligible, len(own_fit), ctx.config)
        rows = SequenceBatch.concat([batch, pool_batch.select(torch.from_numpy(borrowed))]) if len(borrowed) else batch
        pending.append((campaign_id, rows, used, splits, borrowed, batch.labels, hashes))
    not_loaded = [p[0] for p in pending if teachers[p[0]].model is None]  # teacher unchanged, data changed
    if not_loaded:
        teachers.update(load_teachers(ctx.teachers_uri, not_loaded, job.packed, ctx.storage_options, **load_options))
    for campaign_id in not_loaded:
        if isinstance(teachers[campaign_id], FleetError):
            status_rows.append(_campaign_row(campaign_id, "rejected", "soft_labels", str(teachers[campaign_id])))
    pending = [p for p in pending if not isinstance(teachers[p[0]], FleetError)]
    # the teacher pass: teachers of one architecture together (stacked parameters), custom ones alone
    outputs = teacher_logits([teachers[p[0]] for p in pending], [p[1] for p in pending])
    for (campaign_id, _, used, splits, borrowed, labels, hashes), output in zip(pending, outputs, strict=True):
        if isinstance(output, Exception):
            status_rows.append(
                _campaign_row(
                    campaign_id,
                    "rejected",
                    "soft_labels",
                    f"campaign {campaign_id!r}: teacher forward failed: {type(output).__name__}: {output}",
                )
            )
            continue
        output = output.float()  # (n_used + n_borrowed,): own rows first, then the borrowed ones
        if output.shape != (len(used) + len(borrowed),) or not torch.isfinite(output).all():
            status_rows.append(
                _campaign_row(
                    campaign_id,
                    "rejected",
                    "soft_labels",
                    f"campaign {campaign_id!r}: teacher produced non-finite or misshaped outputs",
                )
            )
            continue
        n = len(used) + len(borrowed)
        soft_parts.append(
            pa.table(
                {  # own rows first, then the borrowed ones
                    "campaign_id": pa.array([campaign_id] * n, pa.string()),
                    "row": pa.array(np.concatenate([used, borrowed]).astype(np.int32)),
                    "split": pa.array(np.concatenate([splits[used], np.full(len(borrowed), BORROWED, np.int8)])),
                    "teacher_logit": pa.array(output.numpy()),
                    "label": pa.array(np.concatenate([labels.numpy(), np.full(len(borrowed), np.nan, np.float32)])),
                },
                schema=SOFT_LABELS_SCHEMA,
            )
        )
        status_rows.append(_campaign_row(campaign_id, "ok", **hashes))
    position = {c: i for i, c in enumerate(valid)}
    status_rows.sort(key=lambda row: position.get(row["campaign_id"], -1))  # campaign order (invalid ids first)
    soft = pa.concat_tables(soft_parts) if soft_parts else SOFT_LABELS_SCHEMA.empty_table()
    secrets = secret_values(ctx.storage_options or {})
    for row in status_rows:  # a reason may quote a loader's or a teacher's exception: no credential in it
        if row["reason"] is not None:
            row["reason"] = scrub(row["reason"], secrets)
    return soft, pa.Table.from_pylist(status_rows, schema=CAMPAIGNS_SCHEMA)


def _campaign_batches(
    events: EventsDataset, soft: pa.Table, campaigns: list[str], ctx: StageContext, pool: SequenceBatch | None = None
):
    """Yield ``(campaign_id, SequenceBatch of its soft-labelled rows, soft rows)`` per campaign: its own rows
    (from the events) then its ``BORROWED`` rows (from ``pool``, the batch of :func:`borrowed_pool`).

    The events are read :data:`CAMPAIGNS_PER_READ` campaigns at a time: a campaign's whole table is read but only
    its soft-labelled rows are kept, so stage 2, which samples a few rows of every campaign, holds the events of
    one read at a time, not of the whole fleet (100,000 users: 21 GB in one read)."""
    soft_by_campaign = split_by_campaign(soft, campaigns)
    for start in range(0, len(campaigns), CAMPAIGNS_PER_READ):
        chunk = campaigns[start : start + CAMPAIGNS_PER_READ]
        tables = events.read_campaigns(chunk)
        for campaign_id in chunk:
            yield _campaign_batch(campaign_id, tables[campaign_id], soft_by_campaign[campaign_id], ctx, pool)


def _campaign_batch(
    campaign_id: str, table: pa.Table, mine: pa.Table, ctx: StageContext, pool: SequenceBatch | None
) -> tuple[str, SequenceBatch, pa.Table]:
    """One item of :func:`_campaign_batches` from the campaign's events ``table`` and soft rows ``mine``."""
    is_borrowed = pa.compute.equal(mine["split"], BORROWED)
    own, theirs = mine.filter(pa.compute.invert(is_borrowed)), mine.filter(is_borrowed)
    own_table, _ = truncate_sequences(
        table.take(own["row"]), ctx.config.max_sequence_length, ctx.num_features
    )  # as stage 1 cut them
    batch = table_to_batch(own_table, ctx.num_features)
    if len(theirs):
        if pool is None:
            raise ValueError(f"campaign {campaign_id!r} has borrowed rows but no borrowed pool was given")
        batch = SequenceBatch.concat([batch, pool.select(torch.from_numpy(theirs["row"].to_numpy().astype(np.int64)))])
        mine = pa.concat_tables([own, theirs])
    return campaign_id, batch, mine


def borrowed_pool_rows(sizes: dict[str, int], config: CompressConfig) -> dict[str, list[int]]:
    """The borrowed pool: ``{campaign: [row, ...]}``, about ``config.borrowed_rows`` fit rows drawn evenly
    over (at most ``borrowed_rows``) campaigns, deterministic in ``sizes`` and ``config.seed``.

    Each teacher labels its share of the pool (:func:`borrowed_rows_of`), so a small campaign's head and the
    backbone see how each teacher behaves on many more sequences of the fleet's input space than the
    campaign's own (Ba & Caruana 2014; Stanton et al. 2021: a larger transfer set is what moves a student's
    agreement with its teacher). Only fit rows are drawn: no campaign's validation or hold-out rows.
    """
    want = config.borrowed_rows
    campaigns = sorted(c for c, n in sizes.items() if n > 0)
    if want <= 0 or not campaigns:
        return {}
    rng = np.random.default_rng([config.seed, 4])
    if len(campaigns) > want:
        campaigns = sorted(rng.choice(campaigns, want, replace=False).tolist())
    per_campaign = math.ceil(want / len(campaigns))
    picked = {}
    for campaign_id in campaigns:
        fit = np.flatnonzero(row_splits(campaign_id, sizes[campaign_id], config) == FIT)
        rows = fit if len(fit) <= per_campaign else np.sort(rng.choice(fit, per_campaign, replace=False))
        if len(rows):
            picked[campaign_id] = [int(r) for r in rows]
    return picked


def in_support(batch: SequenceBatch, event_types: torch.Tensor) -> np.ndarray:
    """``(B,)`` whether every event of each row of ``batch`` has a type among ``event_types`` (any shape):
    the rows a teacher trained on sequences of those types has seen the like of."""
    if not len(batch):
        return np.zeros(0, bool)
    inside = np.isin(batch.packed_types.numpy(), np.unique(event_types.numpy()))  # (E,), E >= B: every row has an event
    return np.logical_and.reduceat(inside, batch.offsets[:-1].numpy())


def borrowed_rows_of(campaign_id: str, eligible: np.ndarray, own_fit_rows: int, config: CompressConfig) -> np.ndarray:
    """Rows of the borrowed pool that ``campaign_id``'s teacher labels: its transfer set is topped up to
    ``config.borrowed_rows`` sequences, so a campaign with ``own_fit_rows`` fit rows borrows
    ``borrowed_rows - own_fit_rows`` of the ``eligible`` (M,) pool rows, drawn at random per campaign (so
    campaigns borrow different rows), none when it has that many fit rows of its own. The cost of stage 1
    and stage 3 per campaign stays within ``max(own rows, borrowed_rows)`` rows; the small campaigns, whose
    heads overfit, get the most.

    Eligible (:func:`soft_labels`): rows of *other* campaigns whose every event type occurs in the
    campaign's own fit rows (:func:`in_support`). A teacher is only trusted on inputs like those it was
    trained on: on a fleet whose campaigns each use a few event types of their own, a sequence of other
    types gets an arbitrary answer from an embedding the teacher never trained, and fitting a student to
    that hurt (measured on the zoo, docs/compression.md)."""
    others = np.flatnonzero(eligible)  # (M',) the eligible pool rows
    want = min(len(others), max(0, config.borrowed_rows - own_fit_rows))
    if want >= len(others):
        return others
    key = int.from_bytes(hashlib.sha256(f"borrowed:{campaign_id}".encode()).digest()[:8], "big")
    return np.sort(np.random.default_rng([config.seed, key]).choice(others, want, replace=False))


def borrowed_pool(
    events: EventsDataset,
    picked: dict[str, list[int]],
    num_event_types: int,
    num_features: int,
    max_sequence_length: int,
) -> pa.Table | None:
    """The events rows of :func:`borrowed_pool_rows` (``campaign_id`` names the row's own campaign), cut to
    their last ``max_sequence_length`` events; a campaign whose events break the contract contributes nothing
    (its own stage 1 quarantines it)."""
    tables = events.read_campaigns(sorted(picked))
    parts = []
    for campaign_id in sorted(picked):
        try:
            validate_campaign_table(tables[campaign_id], campaign_id, num_event_types, num_features, events.uri)
        except FleetError:
            continue
        parts.append(
            truncate_sequences(
                tables[campaign_id].take(pa.array(picked[campaign_id])), max_sequence_length, num_features
            )[0]
        )
    return pa.concat_tables(parts) if parts else None


def expected_fit_rows(num_rows: int, config: CompressConfig) -> int:
    """About how many of a campaign's ``num_rows`` rows :func:`row_splits` puts in FIT."""
    return min(config.max_fit_rows, round(num_rows * (1 - HOLDOUT_FRACTION) * (1 - config.validation_fraction)))


def backbone_quotas(sizes: dict[str, int], config: CompressConfig) -> dict[str, int]:
    """Fit rows of each campaign in the backbone sample: ``min(fit rows, backbone_per_campaign,
    k * sqrt(fit rows))`` (at least ``backbone_min_rows``, or all its fit rows when fewer), with ``k`` chosen so
    that the quotas add up to about ``backbone_max_sequences``; every fit row when the whole fleet fits in that
    budget. When the budget cannot give every campaign its floor (many small entities: 100,000 users and a
    40,000-row budget), a uniform subset of campaigns (ranked by a hash of the id) that fits it is sampled and
    the others get 0 (not in the sample; stage 3 still fits their heads on the backbone).

    Proportional to the square root of a campaign's data: a large campaign teaches the backbone more than
    a small one (a fixed per-campaign cap let the large, valuable campaigns count like the smallest), but
    not so much that a few giants drown everyone else. Deterministic in ``sizes``.
    """
    fit = {c: max(1, expected_fit_rows(n, config)) for c, n in sizes.items()}
    cap = {c: min(f, config.backbone_per_campaign) for c, f in fit.items()}
    budget = config.backbone_max_sequences
    if sum(cap.values()) <= budget:
        return cap
    floor = {c: min(f, config.backbone_min_rows) for c, f in cap.items()}
    left_out = {}
    if sum(floor.values()) > budget:  # too many campaigns for the floor: a uniform subset of them (by id hash)
        ranked = sorted(cap, key=lambda c: hashlib.sha256(f"backbone:{c}".encode()).digest())
        running = list(itertools.accumulate(floor[c] for c in ranked))
        keep = bisect.bisect_right(running, budget)
        left_out = dict.fromkeys(ranked[max(1, keep) :], 0)
        cap = {c: cap[c] for c in ranked[: max(1, keep)]}
    root = {c: math.sqrt(fit[c]) for c in cap}

    def total(k: float) -> float:
        return sum(min(cap[c], k * root[c]) for c in cap)

    lo, hi = 0.0, float(max(cap.values()))
    for _ in range(50):  # bisection on k: total(k) is increasing
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) < budget else (lo, mid)
    quotas = {c: max(floor[c], min(cap[c], int(lo * root[c]))) for c in cap}
    return dict(sorted({**quotas, **left_out}.items()))


def backbone_sample(soft: pa.Table, quotas: dict[str, int], seed: int) -> pa.Table:
    """The pooled backbone sample of a batch: ``quotas[c]`` fit rows of campaign ``c`` and as many of its
    borrowed rows (if any) for training, and a quarter as many of its validation rows for early stopping
    (rows drawn without replacement)."""
    rng = np.random.default_rng(seed)
    keep = []
    for split, share in ((FIT, 1.0), (BORROWED, 1.0), (VALIDATION, 0.25)):
        rows_of = soft.filter(pa.compute.equal(soft["split"], split))
        groups = rows_by_campaign(rows_of["campaign_id"])
        picked = []
        for campaign_id in sorted(quotas):
            rows = groups.get(campaign_id, np.zeros(0, np.int64))
            want = max(1, math.ceil(quotas[campaign_id] * share))
            if quotas[campaign_id] <= 0:  # not in the sample (backbone_quotas)
                continue
            picked.append(rows if len(rows) <= want else np.sort(rng.choice(rows, want, replace=False)))
        keep.append(rows_of.take(pa.array(np.concatenate(picked) if picked else np.zeros(0, np.int64))))
    return pa.concat_tables(keep)


def train_backbone(
    sample: pa.Table,
    ctx: StageContext,
    *,
    rank: int = 0,
    world_size: int = 1,
    wrap=None,
    pool: pa.Table | None = None,
    report: Callable[[dict], None] | None = None,
) -> tuple[bytes, dict]:
    """Stage 2: train the shared backbone jointly with the sampled campaigns' heads on their soft labels.

    Returns ``(backbone.safetensors bytes, stats)``; the file also holds ``head_prior``, the mean
    trained head, which anchors every campaign's head fit in stage 3. ``rank``/``world_size``/``wrap``
    let Ray Train run it data-parallel (``wrap`` prepares the model for DDP). ``pool``: the borrowed pool
    when the sample has ``BORROWED`` rows. ``report`` is called after every step with ``{"step", "steps",
    "loss", "validation_loss"}``: steps done and planned over every width of the grid (a width stopped early
    counts as done), the mean training loss of the last 20 steps and the latest validation loss (or None).
    """
    config = ctx.config
    base_config = config.student_config(ctx.num_event_types, ctx.num_features)
    campaigns = sorted(set(sample["campaign_id"].to_pylist()))
    events = EventsDataset(ctx.events_uri, ctx.storage_options)
    parts, index_parts, logit_parts, split_parts = [], [], [], []
    pool_batch = table_to_batch(pool, ctx.num_features) if pool is not None else None
    for c, (campaign_id, batch, rows) in enumerate(_campaign_batches(events, sample, campaigns, ctx, pool_batch)):
        parts.append(batch)
        index_parts.append(torch.full((len(batch),), c, dtype=torch.long))
        logit_parts.append(torch.tensor(rows["teacher_logit"].to_numpy()))
        split_parts.append(torch.tensor(rows["split"].to_numpy()))
    everything = SequenceBatch.concat(parts)
    all_index, all_logits, split = torch.cat(index_parts), torch.cat(logit_parts), torch.cat(split_parts)
    train_rows = torch.nonzero((split == FIT) | (split == BORROWED)).flatten()
    val_rows = torch.nonzero(split == VALIDATION).flatten()
    pooled, campaign_index, teacher_logits = (
        everything.select(train_rows),
        all_index[train_rows],
        all_logits[train_rows],
    )
    val_batch, val_index, val_logits = everything.select(val_rows), all_index[val_rows], all_logits[val_rows]
    fake_quant = (lambda w: fake_quantize(w, 8, PerTensor())) if config.backbone_qat else None
    distill_config = config.distill_config()

    widths = config.backbone_widths()
    steps = math.ceil(config.backbone_steps / world_size)  # data parallel: same samples, bigger effective batch

    def train(width: int, offset: int) -> tuple[Student, dict]:  # one backbone of hidden size `width`, stopped early
        student_config = dataclasses.replace(base_config, hidden_size=width)
        torch.manual_seed(config.seed)
        student = Student(student_config, len(campaigns), torch.Generator().manual_seed(config.seed))
        model = wrap(student) if wrap else student
        generator = torch.Generator().manual_seed(config.seed + 1)

        def epoch():
            jitter = torch.rand(len(pooled), generator=generator) * 4.0
            chunks = list(torch.split(torch.argsort(pooled.lengths.float() + jitter), config.backbone_batch_size))
            for i in torch.randperm(len(chunks), generator=generator)[rank::world_size].tolist():
                index = chunks[i]
                yield pooled.select(index), campaign_index[index], teacher_logits[index]

        losses, val_losses, val_steps = [], [], []

        def validate() -> float:  # distillation loss of the sample's validation rows (same for every DDP rank)
            with torch.no_grad():
                total = 0.0
                for index, sub in val_batch.minibatches(1024, sort_by_length=True):
                    features = backbone_forward(
                        student.backbone,
                        sub.event_types,
                        sub.features,
                        sub.lengths,
                        fake_quant=fake_quant,
                        pooled=student_config.head in POOLED_DESIGNS,
                    )  # (b, H) or (b, 2H)
                    logits = head_logits(
                        student_config.head, features, student.heads, student_config.head_rank, index=val_index[index]
                    )  # (b,)
                    total += float(distill_loss_rows(logits, val_logits[index], None, distill_config).sum())
            val_losses.append(total / len(val_batch))
            val_steps.append(len(losses))  # progress() has counted the step already
            return val_losses[-1]

        def on_step(_step: int, loss: float) -> None:
            losses.append(loss)
            if report is not None:
                report(
                    {
                        "step": offset + len(losses),
                        "steps": steps * len(widths),
                        "loss": float(np.mean(losses[-20:])),
                        "validation_loss": val_losses[-1] if val_losses else None,
                    }
                )

        fit_backbone(
            model,
            epoch,
            distill_config,
            epochs=10**9,
            steps=steps,
            lr=config.backbone_lr,
            seed=config.seed,
            fake_quant=fake_quant,
            progress=on_step,
            validate=validate if len(val_batch) else None,
            eval_every=config.backbone_eval_every,
            patience=config.backbone_patience,
        )
        if report is not None and len(losses) < steps:  # stopped early: the rest of this width's steps are done
            report(
                {
                    "step": offset + steps,
                    "steps": steps * len(widths),
                    "loss": float(np.mean(losses[-20:])),
                    "validation_loss": val_losses[-1] if val_losses else None,
                }
            )
        best = int(np.argmin(val_losses)) if val_losses else None
        return student, {
            "backbone_hidden_size": width,
            "backbone_steps": len(losses),
            "backbone_best_step": val_steps[best] if best is not None else len(losses),
            "backbone_validation_loss": val_losses[best] if best is not None else None,
            "backbone_final_loss": float(np.mean(losses[-20:])) if losses else float("nan"),
        }

    # each width of the grid is trained; the lowest validation loss wins (the first on ties or without validation)
    trained = [train(width, i * steps) for i, width in enumerate(widths)]
    losses = [
        math.inf if st["backbone_validation_loss"] is None else st["backbone_validation_loss"] for _, st in trained
    ]
    student, stats = trained[int(np.argmin(losses))]
    data = backbone_to_bytes(student.backbone, config.backbone_bits, head_prior=student.heads.detach().mean(0))
    stats = {
        "backbone_rows": len(pooled),
        "backbone_validation_rows": len(val_batch),
        "backbone_campaigns": len(campaigns),
        **stats,
    }
    if len(trained) > 1:
        stats["backbone_width_validation_losses"] = {
            str(st["backbone_hidden_size"]): st["backbone_validation_loss"] for _, st in trained
        }
    return data, stats


def fit_heads_shard(
    job: ShardJob, ctx: StageContext, soft: pa.Table, backbone_bytes: bytes, pool: pa.Table | None = None
) -> pa.Table:
    """Stages 3-5 for one batch: fit all its campaigns' heads at once on frozen backbone features (one
    batched fit per prior strength of ``head_l2_grid``, each campaign keeping the strength that follows
    its teacher best on its own validation rows), quantize them (fixed or adaptive bits, optional
    pruning), judge every campaign against its teacher (:class:`CampaignGate`) and measure hold-out fidelity.

    The capacity ladder (``head_ladder``): a campaign whose head fails the gate is fitted again with the
    next design of :data:`fleet.compression.student.HEAD_LADDER` (all such campaigns in one batched fit, starting from
    their first head) and keeps the larger head when it passes, or when it fails by less.

    ``job``: the batch's ``campaigns`` and their ``hashes``; ``soft`` holds
    the batch's stage-1 rows (``pool``: the borrowed pool, when they include ``BORROWED`` rows). Returns the batch's heads rows; ``status`` is the campaign's verdict:
    ``ok`` (passes the gate), ``capacity`` (passes with the ladder's larger head) or ``fallback`` (no
    head passes: its best one is stored anyway, flagged when served).
    """
    config = ctx.config
    backbone, head_prior = backbone_from_bytes(backbone_bytes)
    student_config = backbone.config
    campaigns = job.campaigns
    events = EventsDataset(ctx.events_uri, ctx.storage_options)
    batches, index, logits, labels, splits = [], [], [], [], []
    pool_batch = table_to_batch(pool, ctx.num_features) if pool is not None else None
    for c, (_campaign_id, batch, rows) in enumerate(_campaign_batches(events, soft, campaigns, ctx, pool_batch)):
        batches.append(batch)
        index.append(torch.full((len(batch),), c, dtype=torch.long))
        logits.append(torch.tensor(rows["teacher_logit"].to_numpy()))
        labels.append(batch.labels)
        splits.append(torch.tensor(rows["split"].to_numpy()))
    cidx, t_logits, labels_all, split = (torch.cat(x) for x in (index, logits, labels, splits))
    rows = _ShardRows(cidx, t_logits, labels_all, split, len(campaigns))
    bigger = ladder_config(student_config) if config.head_ladder and config.codec == "packed" else None
    # one backbone pass: with the pooled view too when the ladder's next design reads it (its first H columns
    # are the last state, exactly what the first rung reads)
    pooled = any(c is not None and c.head in POOLED_DESIGNS for c in (student_config, bigger))
    all_features = compute_features(backbone, SequenceBatch.concat(batches), pooled=pooled)  # (N, H) or (N, 2H)
    features = all_features[:, : feature_width(student_config)]  # (N, width of the first rung)
    init = head_prior.expand(len(campaigns), -1).clone() if head_prior is not None else None
    n_fit = torch.bincount(cidx[split == FIT], minlength=len(campaigns))
    hold = split == HOLDOUT
    p_teacher, hold_labels, hold_idx = torch.sigmoid(t_logits[hold]), labels_all[hold], cidx[hold]
    if config.codec == "bloomier":  # Weightless: one design, blocks in campaign id order, no ladder
        order = sorted(range(len(campaigns)), key=campaigns.__getitem__)
        blocks, block_of, served, _, passes, _ = _bloomier_fit(features, rows, student_config, init, config, order)
        p_student = torch.sigmoid(
            head_logits(student_config.head, features[hold], served, student_config.head_rank, index=hold_idx)
        )  # (hold-out rows,)
        out = []
        for c, campaign_id in enumerate(campaigns):
            sel = hold_idx == c
            fid = campaign_fidelity(
                p_student[sel].numpy(), p_teacher[sel].numpy(), hold_labels[sel].numpy(), config.min_auc_class_count
            )
            teacher_sha, data_fp = job.hashes[campaign_id]
            k, r = block_of[c]
            out.append(
                bloomier_head_row(
                    campaign_id,
                    blocks[k],
                    r,
                    teacher_sha256=bytes.fromhex(teacher_sha),
                    data_fingerprint=bytes.fromhex(data_fp),
                    teacher_auc=fid["teacher_auc"],
                    student_auc=fid["student_auc"],
                    mean_abs_diff=fid["mean_abs_diff"],
                    agreement=fid["agreement"],
                    n_train=int(n_fit[c]),
                    n_holdout=int(sel.sum()),
                    status="ok" if bool(passes[c]) else "fallback",
                    **{key: fid[key] for key in CALIBRATION_KEYS},
                )
            )
        return heads_to_table(out)
    rung = _fit_rung(features, rows, student_config, init, config)
    designs = [student_config] * len(campaigns)
    status = ["ok" if bool(v) else "fallback" for v in rung.passes]
    vectors, masks = list(rung.vectors), [None if rung.mask is None else rung.mask[c] for c in range(len(campaigns))]

    failing = [c for c, st in enumerate(status) if st == "fallback"]
    if bigger is not None and failing:
        pick = torch.tensor(failing)
        keep_rows = torch.isin(cidx, pick)  # (N,) the failing campaigns' rows
        renumber = torch.full((len(campaigns),), -1, dtype=torch.long)
        renumber[pick] = torch.arange(len(failing))
        big_features = all_features[keep_rows][:, : feature_width(bigger)]  # the failing campaigns' rows, in order
        big_rows = _ShardRows(
            renumber[cidx[keep_rows]], t_logits[keep_rows], labels_all[keep_rows], split[keep_rows], len(failing)
        )
        start = widen_heads(rung.heads[pick], student_config, bigger)  # (F, P') each rung-1 head, exactly
        big = _fit_rung(big_features, big_rows, bigger, start, config)
        # rows of campaign failing[k] in big_rows: cidx groups rows by campaign in campaign order, as does failing
        for k, c in enumerate(failing):
            if bool(big.passes[k]) or float(big.check.kl[k]) < float(rung.check.kl[c]):
                designs[c], vectors[c] = bigger, big.vectors[k]
                masks[c] = None if big.mask is None else big.mask[k]
                status[c] = "capacity" if bool(big.passes[k]) else "fallback"
        big_hold = big_rows.split == HOLDOUT
        big_p = torch.sigmoid(
            head_logits(bigger.head, big_features[big_hold], big.served, 1, index=big_rows.cidx[big_hold])
        )  # (hold-out rows of the failing ones,)
    p_student = torch.sigmoid(
        head_logits(student_config.head, features[hold], rung.served, student_config.head_rank, index=cidx[hold])
    )  # (hold-out rows,)
    out = []
    for c, campaign_id in enumerate(campaigns):
        sel = hold_idx == c
        mine = p_student[sel]
        if designs[c] is not student_config:  # this campaign is served by the ladder's larger head
            mine = big_p[big_rows.cidx[big_hold] == failing.index(c)]
        fid = campaign_fidelity(
            mine.numpy(), p_teacher[sel].numpy(), hold_labels[sel].numpy(), config.min_auc_class_count
        )
        teacher_sha, data_fp = job.hashes[campaign_id]
        row = head_row(
            campaign_id,
            vectors[c],
            head_num_params(designs[c]),
            masks[c],
            teacher_sha256=bytes.fromhex(teacher_sha),
            data_fingerprint=bytes.fromhex(data_fp),
        )
        out.append(
            dataclasses.replace(
                row,
                teacher_auc=fid["teacher_auc"],
                student_auc=fid["student_auc"],
                mean_abs_diff=fid["mean_abs_diff"],
                agreement=fid["agreement"],
                n_train=int(n_fit[c]),
                n_holdout=int(sel.sum()),
                status=status[c],
                **{k: fid[k] for k in CALIBRATION_KEYS},
            )
        )
    return heads_to_table(out)


@dataclass
class _ShardRows:
    """The stage-1 rows of a shard's campaigns, each ``(N,)``: campaign index, teacher logit, label, split."""

    cidx: torch.Tensor
    t_logits: torch.Tensor
    labels: torch.Tensor
    split: torch.Tensor
    num: int


@dataclass
class _Rung:
    """One design's heads for a set of campaigns: float fit, stored vectors, served heads, verdict."""

    heads: torch.Tensor  # (C, P) float, chosen per campaign and bias-calibrated
    vectors: list  # one fleet.compression.quant.QuantizedVector per campaign
    mask: torch.Tensor | None  # (C, P) kept entries when pruned
    served: torch.Tensor  # (C, P) exactly what serving decodes
    check: GateCheck  # of the served heads on the gate rows
    passes: torch.Tensor  # (C,) bool


@dataclass
class _FloatFit:
    """The float heads of one design (chosen per campaign, bias-calibrated) and what judging them needs."""

    heads: torch.Tensor  # (C, P)
    gate: CampaignGate
    float_check: GateCheck
    fit_rows: torch.Tensor  # (N,) bool: the head fit's rows
    fit_weights: torch.Tensor  # (fit rows,)
    calibrated: object  # (C, P) -> (C, P): each mean probability = its teacher's on the known rows


def _fit_rung(
    features: torch.Tensor,
    rows: _ShardRows,
    student_config: StudentConfig,
    init: torch.Tensor | None,
    config: CompressConfig,
) -> _Rung:
    """Fit (grid + per-campaign choice on validation rows), calibrate, quantize and judge the heads of
    ``student_config.head`` for the campaigns of ``rows`` on ``features`` (N, feature width)."""
    fit = _fit_float(features, rows, student_config, init, config)
    heads, gate, float_check, calibrated = fit.heads, fit.gate, fit.float_check, fit.calibrated
    num = rows.num
    # once the bits are chosen, the bias is calibrated again on the quantized weights where it can be stored
    # so: as a quantization group of its own (no pruning; a group boundary right before it)
    rebias = (
        config.calibrate_bias and config.prune_sparsity == 0 and bias_position(student_config) % config.group_size == 0
    )
    vectors, bits, mask = encode_heads(
        heads,
        config.bits,
        group_size=config.group_size,
        sparsity=config.prune_sparsity,
        gate=lambda h: gate.bits_pass(gate.measure(h), float_check),
    )
    served = _decoded(vectors, mask, student_config)  # (C, P) exactly what serving will use
    if rebias:
        vectors, target = [None] * num, calibrated(served)  # (C, P)
        for b in bits.unique().tolist():  # store the recalibrated bias: the same codes elsewhere, a new b
            picked = torch.nonzero(bits == b).flatten()
            for c, vector in zip(picked.tolist(), quantize_rows(target[picked], b, config.group_size)):
                vectors[c] = vector
        served = _decoded(vectors, mask, student_config)
    check = gate.measure(served)
    return _Rung(heads, vectors, mask, served, check, gate.passes(check))


def _fit_float(
    features: torch.Tensor,
    rows: _ShardRows,
    student_config: StudentConfig,
    init: torch.Tensor | None,
    config: CompressConfig,
) -> _FloatFit:
    """Fit (grid + per-campaign choice on validation rows) and calibrate the float heads of
    ``student_config.head`` for the campaigns of ``rows``; the gate that judges them."""
    distill_config = config.distill_config()
    num, cidx, split = rows.num, rows.cidx, rows.split
    own_fit, val_rows = split == FIT, split == VALIDATION
    fit_rows = own_fit | (split == BORROWED)  # the head fit's rows: its own, and the borrowed ones at a lower weight
    fit_weights = torch.where(split[fit_rows] == BORROWED, config.borrowed_weight, 1.0).to(features.dtype)
    trusted = torch.bincount(cidx[val_rows], minlength=num) >= MIN_VALIDATION_ROWS  # (C,) enough rows to choose on
    fake_quant = None
    if config.head_qat:
        fake_quant = lambda p: fake_quantize(p, int(config.bits), PerGroup(config.group_size))
    candidates = fit_heads_grid(
        features[fit_rows],
        cidx[fit_rows],
        rows.t_logits[fit_rows],
        rows.labels[fit_rows],
        num,
        student_config,
        distill_config,
        config.head_l2_grid,
        steps=config.head_steps,
        lr=config.head_lr,
        init=init,
        seed=config.seed,
        fake_quant=fake_quant,
        row_weights=fit_weights,
    )  # (G, C, P)
    val_loss = torch.stack(
        [
            campaign_losses(
                h, features[val_rows], cidx[val_rows], rows.t_logits[val_rows], num, student_config, distill_config
            )
            for h in candidates
        ]
    )  # (G, C)
    choice = select_per_campaign(val_loss, config.head_l2_grid.index(config.head_l2), trusted)  # (C,)
    heads = candidates[choice, torch.arange(num)]  # (C, P)
    known = own_fit | val_rows

    def calibrated(h: torch.Tensor) -> torch.Tensor:  # (C, P): each mean probability = its teacher's on known rows
        return calibrate_bias(h, features[known], cidx[known], rows.t_logits[known], student_config)

    if config.calibrate_bias:
        heads = calibrated(heads)
    gate_rows = val_rows | (own_fit & ~trusted[cidx])  # campaigns with few validation rows are gated on fit rows
    gate = CampaignGate(features[gate_rows], cidx[gate_rows], rows.t_logits[gate_rows], num, student_config, config)
    return _FloatFit(heads, gate, gate.measure(heads), fit_rows, fit_weights, calibrated)


def _bloomier_fit(
    features: torch.Tensor,
    rows: _ShardRows,
    student_config: StudentConfig,
    init: torch.Tensor | None,
    config: CompressConfig,
    order: list[int],
):
    """The ``bloomier`` codec for the campaigns of ``rows``: float fit (:func:`_fit_float`), then Weightless
    (:mod:`fleet.compression.weightless`): prune, cluster, encode blocks of at most ``bloomier_block_rows`` campaigns taken
    in ``order`` (campaign id order: a block's rows are consecutive in the table), re-train with the false
    positives fixed, encode once more, calibrate the stored bias on the final decoded heads.

    Returns ``(blocks, block_of (C,) -> (block index, block row), served (C, P), check, passes, stats)``.
    """
    from fleet.compression.weightless import (
        decode_encoded,
        encode_block,
        refit_blocks,
        refit_centroids,
    )

    fit = _fit_float(features, rows, student_config, init, config)
    perm = torch.tensor(order, dtype=torch.long)  # block order -> campaign index
    heads = fit.heads[perm]  # (C, P) in block order
    size, num = config.bloomier_block_rows, rows.num
    spans = [(s, min(s + size, num)) for s in range(0, num, size)]
    encode = {
        "sparsity": config.bloomier_sparsity,
        "value_bits": config.bloomier_value_bits,
        "check_bits": config.bloomier_check_bits,
        "seed": config.seed,
    }
    blocks = [encode_block(heads[a:b].numpy(), **encode) for a, b in spans]
    stats = {}
    if config.bloomier_refit:
        rank = torch.empty(num, dtype=torch.long)
        rank[perm] = torch.arange(num)  # campaign index -> block order
        sel = fit.fit_rows
        data = (
            features[sel],
            rank[rows.cidx[sel]],
            rows.t_logits[sel],
            rows.labels[sel],
            student_config,
            config.distill_config(),
        )
        blocks, _, stats = refit_blocks(
            heads,
            blocks,
            *data,
            steps=config.bloomier_refit_steps,
            lr=config.head_lr,
            check_bits=config.bloomier_check_bits,
            row_weights=fit.fit_weights,
        )
        blocks = refit_centroids(
            blocks, *data, steps=config.bloomier_refit_steps, lr=config.head_lr / 5, row_weights=fit.fit_weights
        )
    served = torch.empty_like(heads)  # (C, P) in campaign order
    served[perm] = torch.from_numpy(np.concatenate([decode_encoded(e) for e in blocks]))
    if config.calibrate_bias:  # the bias is stored outside the filter: calibrate it on the final weights
        target = fit.calibrated(served)[perm, -1].numpy()
        blocks = [dataclasses.replace(e, bias=target[a:b].astype(np.float16)) for e, (a, b) in zip(blocks, spans)]
        served[perm] = torch.from_numpy(np.concatenate([decode_encoded(e) for e in blocks]))
    check = fit.gate.measure(served)
    block_of = [None] * num
    for k, (a, b) in enumerate(spans):
        for r in range(b - a):
            block_of[order[a + r]] = (k, r)
    return blocks, block_of, served, check, fit.gate.passes(check), stats


def _decoded(vectors: list, mask: torch.Tensor | None, student_config: StudentConfig) -> torch.Tensor:
    """Heads ``(C, P)`` exactly as serving decodes the stored ``vectors`` (pruned entries 0)."""
    n_params = head_num_params(student_config)
    return decode_heads(
        [
            head_row(
                f"draft-{c}",
                v,
                n_params,
                None if mask is None else mask[c],
                teacher_sha256=b"\0" * TEACHER_SHA256_BYTES,
                data_fingerprint=b"\0" * DATA_FINGERPRINT_BYTES,
            )
            for c, v in enumerate(vectors)
        ]
    )


@dataclass
class GateCheck:
    """Per-campaign agreement of heads ``(C, P)`` with the teachers on the gate rows, each ``(C,)``."""

    mean_abs_diff: torch.Tensor  # mean |p_student - p_teacher|
    kl: torch.Tensor  # mean KL(Bernoulli(p_teacher) || Bernoulli(p_student)), nats
    ratio_error: torch.Tensor  # |mean(p_student) / mean(p_teacher) - 1|
    correlation: torch.Tensor  # Pearson correlation of student and teacher logits (1 where the teacher's is constant)


class CampaignGate:
    """The per-campaign quality gate, judged against the teacher on a campaign's validation rows.

    Absolute: a head passes when its mean KL(teacher || student) is at most ``gate_max_kl`` and its mean
    probability is within ``gate_max_ratio_error`` of the teacher's (:meth:`passes`). Quantization
    (:meth:`bits_pass`) may cost at most ``gate_slack`` of mean |p - p_teacher| and
    ``gate_max_correlation_drop`` of logit correlation with the teacher over the float head, and must keep
    a passing head passing; a head whose float version already fails may only be quantized where
    that leaves its KL within 10% of the float head's, so a head that is bad already is not made worse.
    :meth:`measure` then :meth:`bits_pass` against the float heads' check is the bits gate of bit selection
    (:data:`fleet.compression.adaptive.BitsGate`, given to :func:`fleet.formats.heads.encode_heads`); the promotion
    gate (:class:`fleet.storage.promotion_gate.PromotionGate`) judges a whole version instead.
    All campaigns are evaluated at once (``bincount`` over the rows' campaign index), no Python loop.
    """

    def __init__(
        self,
        features: torch.Tensor,
        campaign_index: torch.Tensor,
        teacher_logits: torch.Tensor,
        num_campaigns: int,
        student_config: StudentConfig,
        config: CompressConfig,
    ):
        self.features, self.index, self.num = features, campaign_index, num_campaigns  # (N, H), (N,)
        self.p_teacher = torch.sigmoid(teacher_logits).double()  # (N,)
        self.count = torch.bincount(campaign_index, minlength=num_campaigns).clamp(min=1).double()  # (C,)
        self.mean_teacher = self._mean(self.p_teacher)  # (C,)
        t = teacher_logits.double()
        self.t_centred = t - self._mean(t)[campaign_index]  # (N,)
        self.t_var = self._mean(self.t_centred**2)  # (C,)
        self.design, self.rank = student_config.head, student_config.head_rank
        self.config = config

    def _mean(self, values: torch.Tensor) -> torch.Tensor:  # (N,) -> (C,) per-campaign mean
        return torch.bincount(self.index, weights=values, minlength=self.num) / self.count

    def measure(self, heads: torch.Tensor) -> GateCheck:
        """Agreement of ``heads (C, P)`` with the teachers."""
        with torch.no_grad():
            logits = head_logits(self.design, self.features, heads, self.rank, index=self.index)  # (N,)
        eps = PROB_EPS  # the clipping of fleet.compression.metrics, so the gate's KL is the reported one
        p, q = self.p_teacher.clamp(eps, 1 - eps), torch.sigmoid(logits).double().clamp(eps, 1 - eps)  # (N,)
        kl = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))  # (N,)
        ratio = self._mean(q) / self.mean_teacher.clamp(min=eps)  # (C,)
        s = logits.double()
        s_centred = s - self._mean(s)[self.index]  # (N,)
        s_var = self._mean(s_centred**2)  # (C,)
        corr = self._mean(s_centred * self.t_centred) / (s_var * self.t_var).sqrt().clamp(min=1e-12)  # (C,)
        corr = torch.where(self.t_var > 1e-12, corr, torch.ones_like(corr))  # a constant teacher has no ranking
        return GateCheck(self._mean((q - self.p_teacher).abs()), self._mean(kl), (ratio - 1).abs(), corr)

    def passes(self, check: GateCheck) -> torch.Tensor:
        """``(C,)`` whether each campaign's head passes the absolute gate."""
        return (check.kl <= self.config.gate_max_kl) & (check.ratio_error <= self.config.gate_max_ratio_error)

    def bits_pass(self, check: GateCheck, float_check: GateCheck) -> torch.Tensor:
        """``(C,)`` whether a quantized head may replace the float head measured as ``float_check``."""
        close = check.mean_abs_diff <= float_check.mean_abs_diff + self.config.gate_slack
        close &= check.correlation >= float_check.correlation - self.config.gate_max_correlation_drop
        no_worse = check.kl <= float_check.kl * 1.1 + 1e-4
        return close & torch.where(self.passes(float_check), self.passes(check), no_worse)
