"""A synthetic ad-tech fleet: per-campaign event sequences and a teacher trained on each campaign.

The generative process is deliberately *not* the student's form. Users share behaviour across
campaigns (event-type interests, a global propensity, recency-weighted engagement), and every
campaign adds its own non-linear effects: a saturating (tanh) recency-weighted affinity to event
types, a time-of-day peak, and a price x device interaction. Campaign sizes are Pareto-distributed
(many of ~100 sequences, a few of ~20k), label rates log-uniform in [2%, 30%], lengths in [5, 100].
Everything is a pure function of the seed and the campaign index.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass, fields

import fsspec
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from fleet.data import SequenceBatch
from fleet.events import EVENTS_SCHEMA, EventsDataset, holdout_mask, table_to_batch
from fleet.teachers import CONFIG_FILE, TeacherConfig, save_teacher

SYNTH_FILE = "synth.json"  # the SynthConfig of a fleet directory, recorded before any teacher is trained
_BASE_FEATURES = 8  # hour sin/cos, log gap, log recency, price, dwell, device, position
GENERATOR_NAMES = ("default", "affinity", "interaction")  # SynthConfig.generator: fleet.zoo.GENERATORS
TEACHER_NAMES = ("rnn", "attn_gru", "conv")  # SynthConfig.teacher: fleet.zoo.TEACHERS
ZOO_LOADER = "fleet.zoo:load_teacher"  # the config.json "loader" of the zoo's teacher classes


@dataclass
class SynthConfig:
    """Shape of a synthetic fleet.

    Args:
        campaigns: number of campaigns (teachers).
        seed: everything (data, teachers) is a deterministic function of it.
        arch, hidden_size, num_layers, embed_dim: teacher architecture (defaults: 2-layer LSTM, 256 wide).
        num_event_types, num_features: event vocabulary and numeric features per event.
        min_sequences, max_sequences: campaign size range; sizes are Pareto(alpha) above the minimum.
        size_alpha: Pareto tail index of campaign sizes (smaller = heavier tail).
        max_epochs, patience, batch_size, lr: teacher training (early stopping on a validation split).
        generator: how campaigns are generated, one of :data:`GENERATOR_NAMES` (``"default"``:
            :func:`generate_campaign`; the others: :mod:`fleet.zoo`).
        teacher: the teacher class, one of :data:`TEACHER_NAMES` (``"rnn"``: :class:`TeacherRNN` of ``arch``;
            ``"attn_gru"``, ``"conv"``: :mod:`fleet.zoo`, saved with ``"loader": "fleet.zoo:load_teacher"``).
    """

    campaigns: int = 200
    seed: int = 0
    arch: str = "lstm"
    hidden_size: int = 256
    num_layers: int = 2
    embed_dim: int = 16
    num_event_types: int = 64
    num_features: int = 8
    min_sequences: int = 100
    max_sequences: int = 20_000
    size_alpha: float = 1.1
    max_epochs: int = 12
    patience: int = 2
    batch_size: int = 64
    lr: float = 2e-3
    generator: str = "default"
    teacher: str = "rnn"

    def __post_init__(self) -> None:
        if self.campaigns < 1:
            raise ValueError("campaigns must be >= 1")
        if self.arch not in ("lstm", "gru"):
            raise ValueError(f"arch must be 'lstm' or 'gru', got {self.arch!r}")
        if self.num_event_types < 2 or self.num_features < 1:
            raise ValueError("need num_event_types >= 2 and num_features >= 1")
        if not 1 <= self.min_sequences <= self.max_sequences:
            raise ValueError("need 1 <= min_sequences <= max_sequences")
        if self.generator not in GENERATOR_NAMES:
            raise ValueError(f"generator must be one of {GENERATOR_NAMES}, got {self.generator!r}")
        if self.teacher not in TEACHER_NAMES:
            raise ValueError(f"teacher must be one of {TEACHER_NAMES}, got {self.teacher!r}")

    def teacher_config(self, campaign_id: str) -> TeacherConfig:
        """The ``config.json`` of campaign ``campaign_id``'s teacher (a zoo class: its arch + the zoo loader)."""
        rnn = self.teacher == "rnn"
        return TeacherConfig(
            campaign_id=campaign_id,
            arch=self.arch if rnn else self.teacher,
            num_event_types=self.num_event_types,
            embed_dim=self.embed_dim,
            num_features=self.num_features,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            loader=None if rnn else ZOO_LOADER,
        )


def with_defaults(recorded: dict) -> dict:
    """A recorded ``synth.json`` dict with every :class:`SynthConfig` field it lacks (one added after it was
    written) set to the field's default, so an older fleet directory still matches its config."""
    return {**{f.name: f.default for f in fields(SynthConfig) if f.name not in recorded}, **recorded}


def generate(config: SynthConfig, index: int) -> pa.Table:
    """Event rows of campaign ``index`` (events schema) from the generator ``config.generator`` names."""
    if config.generator == "default":
        return generate_campaign(config, index)
    from fleet.zoo import GENERATORS  # lazily: fleet.zoo imports this module

    return GENERATORS[config.generator](config, index)


def campaign_ids(count: int) -> list[str]:
    """Ids of a synthetic fleet: ``campaign-00000`` ..."""
    return [f"campaign-{i:05d}" for i in range(count)]


def _world(config: SynthConfig) -> dict[str, np.ndarray]:
    """Behaviour shared by all campaigns (a function of the seed only)."""
    rng = np.random.default_rng([config.seed, 0xF1EE7])
    k = config.num_event_types
    return {
        "type_embedding": rng.normal(size=(k, 6)).astype(np.float32),  # latent of each event type
        "popularity": rng.normal(scale=1.0, size=k).astype(np.float32),
        "type_value": rng.normal(scale=0.6, size=k).astype(np.float32),  # shared propensity per event type
    }


def generate_campaign(config: SynthConfig, index: int) -> pa.Table:
    """Event rows of campaign ``index`` (events schema)."""
    world = _world(config)
    rng = np.random.default_rng([config.seed, index])
    k = config.num_event_types
    size = config.min_sequences * (1.0 + rng.pareto(config.size_alpha))
    n = int(min(round(size), config.max_sequences))

    lengths = np.clip(np.round(np.exp(rng.normal(math.log(18), 0.7, size=n))), 5, 100).astype(np.int64)
    seq = np.repeat(np.arange(n), lengths)  # (E,) sequence of each event
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    position = np.arange(len(seq)) - starts[seq]

    interest = rng.normal(size=(n, 6)).astype(np.float32)  # (n, 6) user interests
    type_logits = interest[seq] @ world["type_embedding"].T + world["popularity"]  # (E, K)
    types = np.argmax(type_logits + rng.gumbel(size=type_logits.shape).astype(np.float32), axis=1)

    user_rate = np.exp(rng.normal(3.0, 1.0, size=n))  # mean minutes between a user's events
    gaps = rng.exponential(user_rate[seq])
    gaps[starts] = 0.0
    elapsed = np.cumsum(gaps) - np.cumsum(gaps)[starts][seq]  # minutes since the sequence started
    age = elapsed[starts + lengths - 1][seq] - elapsed  # minutes before the prediction point
    hour = (rng.uniform(0, 24, size=n)[seq] + elapsed / 60.0) % 24.0
    device = (rng.uniform(size=n) < 0.45).astype(np.float32)
    price = np.exp(rng.normal(0.0, 0.8, size=len(seq)))
    dwell = np.exp(rng.normal(1.0, 1.0, size=len(seq)))

    features = np.stack(
        [
            np.sin(2 * np.pi * hour / 24),
            np.cos(2 * np.pi * hour / 24),
            np.log1p(gaps) / 5,
            np.log1p(age) / 5,
            np.log(price),
            np.log(dwell) / 2,
            device[seq],
            position / 50.0,
        ],
        axis=1,
    ).astype(np.float32)  # (E, 8)
    if config.num_features <= _BASE_FEATURES:
        features = features[:, : config.num_features]
    else:
        extra = rng.normal(size=(len(seq), config.num_features - _BASE_FEATURES)).astype(np.float32)
        features = np.concatenate([features, extra], axis=1)

    def per_sequence(values: np.ndarray) -> np.ndarray:
        return np.bincount(seq, weights=values, minlength=n)

    last = starts + lengths - 1
    shared = per_sequence(world["type_value"][types] * np.exp(-age / 240.0)) + 0.4 * device + rng.normal(0, 0.5, n)
    affinity = rng.normal(scale=1.2, size=k) * (rng.uniform(size=k) < 0.3)  # a few event types matter a lot
    recency_scale = math.exp(rng.normal(math.log(120), 1.0))
    peak_hour, tod_amplitude = rng.uniform(0, 24), rng.uniform(0.0, 1.5)
    price_slope = rng.normal(scale=0.8)
    specific = (
        rng.uniform(1.0, 2.5) * np.tanh(per_sequence(affinity[types] * np.exp(-age / recency_scale)))
        + tod_amplitude * np.cos(2 * np.pi * (hour[last] - peak_hour) / 24)
        + price_slope * np.log(price[last]) * (2 * device - 1)
    )
    logit = shared + specific
    rate = math.exp(rng.uniform(math.log(0.02), math.log(0.30)))
    bias = _bias_for_rate(logit, rate)
    labels = (rng.uniform(size=n) < 1 / (1 + np.exp(-(logit + bias)))).astype(np.int8)

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.table(
        {
            "campaign_id": pa.array([campaign_ids(index + 1)[index]] * n, pa.string()),
            "event_types": pa.ListArray.from_arrays(pa.array(offsets), pa.array(types.astype(np.int32))),
            "features": pa.ListArray.from_arrays(
                pa.array(offsets * config.num_features), pa.array(features.reshape(-1))
            ),
            "label": pa.array(labels, pa.int8()),
        },
        schema=EVENTS_SCHEMA,
    )


def _bias_for_rate(logit: np.ndarray, rate: float) -> float:
    lo, hi = -30.0, 30.0
    for _ in range(60):  # bisection on mean(sigmoid(logit + b)) = rate
        mid = (lo + hi) / 2
        if np.mean(1 / (1 + np.exp(-(logit + mid)))) < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _campaign_seed(seed: int, campaign_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{campaign_id}".encode()).digest()[:7], "big")


def split_train_validation(campaign_id: str, num_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices a teacher trains and early-stops on: the non-hold-out rows, 15% of them for validation."""
    train = np.flatnonzero(~holdout_mask(campaign_id, num_rows))
    rng = np.random.default_rng(_campaign_seed(seed, campaign_id))
    shuffled = rng.permutation(train)
    n_val = max(1, round(0.15 * len(train)))
    return np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val])


def train_teacher(config: SynthConfig, campaign_id: str, batch: SequenceBatch) -> tuple[torch.nn.Module, dict]:
    """Train one campaign's teacher on its training split until early stopping on its validation split."""
    from fleet.zoo import build_teacher  # lazily: fleet.zoo imports this module

    torch.manual_seed(_campaign_seed(config.seed, campaign_id))
    model = build_teacher(config.teacher_config(campaign_id))
    train_rows, val_rows = split_train_validation(campaign_id, len(batch), config.seed)
    train, val = batch.select(torch.from_numpy(train_rows)), batch.select(torch.from_numpy(val_rows))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(_campaign_seed(config.seed, campaign_id))
    best_loss, best_state, best_epoch, stale = _validation_loss(model, val), copy.deepcopy(model.state_dict()), 0, 0
    epochs = 0
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        for index in _length_buckets(train.lengths, config.batch_size, generator):
            mb = train.select(index)
            loss = F.binary_cross_entropy_with_logits(model(mb.event_types, mb.features, mb.lengths), mb.labels)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        epochs = epoch
        loss = _validation_loss(model, val)
        if loss < best_loss - 1e-4:
            best_loss, best_state, best_epoch, stale = loss, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return model, {"epochs": epochs, "best_epoch": best_epoch, "val_loss": best_loss, "n_train": len(train)}


def _length_buckets(lengths: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Minibatches of similar lengths (little padding) in a random order; jitter keeps them varied."""
    jitter = torch.rand(len(lengths), generator=generator) * 4.0
    order = torch.argsort(lengths.float() + jitter)
    chunks = list(torch.split(order, batch_size))
    return [chunks[i] for i in torch.randperm(len(chunks), generator=generator)]


@torch.no_grad()
def _validation_loss(model: torch.nn.Module, val: SequenceBatch) -> float:
    model.eval()
    logits = torch.cat([model(b.event_types, b.features, b.lengths) for _, b in val.minibatches(512, sort_by_length=False)])
    return float(F.binary_cross_entropy_with_logits(logits, val.labels))


def train_teachers(
    campaigns: list[str], config: SynthConfig, events_uri: str, teachers_uri: str, storage_options: dict | None = None
) -> list[dict]:
    """Train and save the teachers of a batch of campaigns (the unit of work of one Ray task). A teacher
    already saved by an earlier, interrupted run of the same fleet is kept (``"resumed": True``):
    :func:`fleet.teachers.save_teacher` writes ``config.json`` last, so its presence means complete."""
    events = EventsDataset(events_uri, storage_options)
    results = []
    for campaign_id, table in events.read_campaigns(campaigns).items():
        labels = table["label"].to_numpy(zero_copy_only=False)
        stats = {"campaign_id": campaign_id, "rows": len(table), "label_rate": float(labels.mean())}
        if teacher_saved(teachers_uri, config.teacher_config(campaign_id), storage_options):
            results.append({**stats, "seconds": 0.0, "resumed": True})
            continue
        started = time.perf_counter()
        model, train_stats = train_teacher(config, campaign_id, table_to_batch(table, config.num_features))
        save_teacher(teachers_uri, model, config.teacher_config(campaign_id), storage_options)
        results.append({**stats, "seconds": time.perf_counter() - started, "resumed": False, **train_stats})
    return results


def teacher_saved(teachers_uri: str, config: TeacherConfig, storage_options: dict | None = None) -> bool:
    """Whether the teacher of ``config`` is completely saved under ``teachers_uri``: its ``config.json``
    (written after the weights) exists and equals ``config``."""
    fs, path = fsspec.core.url_to_fs(f"{teachers_uri.rstrip('/')}/{config.campaign_id}/{CONFIG_FILE}",
                                     **(storage_options or {}))
    return fs.exists(path) and json.loads(fs.cat_file(path)) == config.to_json()
