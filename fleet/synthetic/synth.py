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

from fleet.compression.data import SequenceBatch
from fleet.formats.events import (
    EVENTS_SCHEMA,
    EventsDataset,
    holdout_mask,
    table_to_batch,
    write_events,
)
from fleet.formats.teacher_pack import (
    pack_complete,
    pad_stack,
    stacked_forward,
    stacked_logits,
    write_pack,
)
from fleet.formats.teachers import CONFIG_FILE, TeacherConfig, TeacherRNN, save_teacher

SYNTH_FILE = "synth.json"  # the SynthConfig of a fleet directory, recorded before any teacher is trained
_BASE_FEATURES = 8  # hour sin/cos, log gap, log recency, price, dwell, device, position
_FRESH_STREAM = 0xF5E5  # third seed word of a campaign's fresh sequences (fresh_rng)
GENERATOR_NAMES = ("default", "affinity", "interaction")  # SynthConfig.generator: fleet.synthetic.zoo.GENERATORS
TEACHER_NAMES = ("rnn", "attn_gru", "conv")  # SynthConfig.teacher: fleet.synthetic.zoo.TEACHERS
ENTITY_KINDS = ("campaign", "user")  # SynthConfig.entities
ZOO_LOADER = "fleet.synthetic.zoo:load_teacher"  # the config.json "loader" of the zoo's teacher classes


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
            :func:`generate_campaign`; the others: :mod:`fleet.synthetic.zoo`).
        teacher: the teacher class, one of :data:`TEACHER_NAMES` (``"rnn"``: :class:`TeacherRNN` of ``arch``;
            ``"attn_gru"``, ``"conv"``: :mod:`fleet.synthetic.zoo`, saved with ``"loader": "fleet.synthetic.zoo:load_teacher"``).
        entities: ``"campaign"`` (one teacher directory each, trained one at a time) or ``"user"`` (a
            per-user fleet: many small entities ``user-0000000`` ..., their reference teachers trained
            ``pack_size`` at a time with stacked parameters and written as ``fleet-teacher-pack/1`` packs;
            :func:`user_config` gives the per-user defaults).
        pack_size: teachers per pack (``entities="user"`` only; 0 for campaigns).
    """

    campaigns: int = 200
    seed: int = 0
    # the teacher architecture's defaults are TeacherConfig's (one source of truth)
    arch: str = TeacherConfig.arch
    hidden_size: int = TeacherConfig.hidden_size
    num_layers: int = TeacherConfig.num_layers
    embed_dim: int = TeacherConfig.embed_dim
    num_event_types: int = TeacherConfig.num_event_types
    num_features: int = TeacherConfig.num_features
    min_sequences: int = 100
    max_sequences: int = 20_000
    size_alpha: float = 1.1
    max_epochs: int = 12
    patience: int = 2
    batch_size: int = 64
    lr: float = 2e-3
    generator: str = "default"
    teacher: str = "rnn"
    entities: str = "campaign"
    pack_size: int = 0

    def __post_init__(self) -> None:
        if self.entities not in ENTITY_KINDS:
            raise ValueError(f"entities must be one of {ENTITY_KINDS}, got {self.entities!r}")
        if self.entities == "user" and (self.pack_size < 1 or self.teacher != "rnn" or self.generator != "default"):
            raise ValueError("a per-user fleet needs pack_size >= 1, teacher 'rnn' and generator 'default'")
        if self.entities == "campaign" and self.pack_size:
            raise ValueError(
                "pack_size is for per-user fleets (entities='user'); pack campaign teachers with fleet pack-teachers"
            )
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


def generate(config: SynthConfig, index: int, fresh_rows: int = 0) -> pa.Table:
    """Event rows of campaign ``index`` (events schema) from the generator ``config.generator`` names;
    with ``fresh_rows`` > 0, that many new sequences of the same campaign instead (:func:`generate_campaign`)."""
    if config.generator == "default":
        return generate_campaign(config, index, fresh_rows)
    from fleet.synthetic.zoo import GENERATORS  # lazily: fleet.synthetic.zoo imports this module

    return GENERATORS[config.generator](config, index, fresh_rows)


def fresh_rng(config: SynthConfig, index: int) -> np.random.Generator:
    """The random stream of a campaign's fresh sequences: independent of the stream its own rows and
    parameters are drawn from (``default_rng([seed, index])``), so drawing them changes nothing else."""
    return np.random.default_rng([config.seed, index, _FRESH_STREAM])


def campaign_ids(count: int) -> list[str]:
    """Ids of a synthetic campaign fleet: ``campaign-00000`` ..."""
    return [f"campaign-{i:05d}" for i in range(count)]


def entity_id(config: SynthConfig, index: int) -> str:
    """Id of entity ``index``: ``campaign-00000`` ... or, per user, ``user-0000000`` ..."""
    return f"user-{index:07d}" if config.entities == "user" else f"campaign-{index:05d}"


def entity_ids(config: SynthConfig) -> list[str]:
    """Ids of every entity of a synthetic fleet, in order (sorted)."""
    return [entity_id(config, i) for i in range(config.campaigns)]


#: ``fleet synth --entities user`` defaults (SynthConfig fields): many small entities, small teachers
USER_DEFAULTS = {
    "min_sequences": 20,
    "max_sequences": 300,
    "hidden_size": 16,
    "num_layers": 1,
    "embed_dim": 8,
    "max_epochs": 8,
    "batch_size": 32,
    "lr": 1e-2,
    "pack_size": 1024,
}


def user_config(campaigns: int, **overrides) -> SynthConfig:
    """A per-user :class:`SynthConfig`: :data:`USER_DEFAULTS` with ``overrides`` (``None`` values ignored)."""
    fields_ = {**USER_DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    return SynthConfig(campaigns=campaigns, entities="user", **fields_)


def _world(config: SynthConfig) -> dict[str, np.ndarray]:
    """Behaviour shared by all campaigns (a function of the seed only)."""
    rng = np.random.default_rng([config.seed, 0xF1EE7])
    k = config.num_event_types
    return {
        "type_embedding": rng.normal(size=(k, 6)).astype(np.float32),  # latent of each event type
        "popularity": rng.normal(scale=1.0, size=k).astype(np.float32),
        "type_value": rng.normal(scale=0.6, size=k).astype(np.float32),  # shared propensity per event type
    }


def generate_campaign(config: SynthConfig, index: int, fresh_rows: int = 0) -> pa.Table:
    """Event rows of campaign ``index`` (events schema).

    With ``fresh_rows`` > 0: that many new sequences of the same campaign instead of its own rows: the
    campaign's parameters (and its base-rate bias, fixed on its own rows) are the same, the sequences and
    labels come from :func:`fresh_rng`. Seen by no teacher or student, they measure fidelity precisely.
    """
    world = _world(config)
    rng = np.random.default_rng([config.seed, index])
    k = config.num_event_types
    size = config.min_sequences * (1.0 + rng.pareto(config.size_alpha))
    rows = _default_rows(config, world, rng, int(min(round(size), config.max_sequences)))
    affinity = rng.normal(scale=1.2, size=k) * (rng.uniform(size=k) < 0.3)  # a few event types matter a lot
    recency_scale = math.exp(rng.normal(math.log(120), 1.0))
    peak_hour, tod_amplitude = rng.uniform(0, 24), rng.uniform(0.0, 1.5)
    price_slope = rng.normal(scale=0.8)
    params = (affinity, recency_scale, peak_hour, tod_amplitude, price_slope, rng.uniform(1.0, 2.5))
    logit = _default_logit(world, rows, *params)
    rate = math.exp(rng.uniform(math.log(0.02), math.log(0.30)))
    bias = _bias_for_rate(logit, rate)
    if fresh_rows > 0:
        rng = fresh_rng(config, index)
        rows = _default_rows(config, world, rng, fresh_rows)
        logit = _default_logit(world, rows, *params)
    labels = (rng.uniform(size=len(logit)) < 1 / (1 + np.exp(-(logit + bias)))).astype(np.int8)

    n, lengths = len(logit), rows["lengths"]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.table(
        {
            "campaign_id": pa.array([entity_id(config, index)] * n, pa.string()),
            "event_types": pa.ListArray.from_arrays(pa.array(offsets), pa.array(rows["types"].astype(np.int32))),
            "features": pa.ListArray.from_arrays(
                pa.array(offsets * config.num_features), pa.array(rows["features"].reshape(-1))
            ),
            "label": pa.array(labels, pa.int8()),
        },
        schema=EVENTS_SCHEMA,
    )


def _default_rows(config: SynthConfig, world: dict, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """``n`` sequences of the default generator drawn from ``rng``: their events and what their label reads."""
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
    noise = rng.normal(0, 0.5, n)  # (n,)
    return {
        "lengths": lengths,
        "seq": seq,
        "types": types,
        "features": features,
        "age": age,
        "hour": hour,
        "device": device,
        "price": price,
        "last": starts + lengths - 1,
        "noise": noise,
    }


def _default_logit(
    world: dict,
    rows: dict,
    affinity: np.ndarray,
    recency_scale: float,
    peak_hour: float,
    tod_amplitude: float,
    price_slope: float,
    affinity_scale: float,
) -> np.ndarray:
    """(n,) label logit of the default generator's ``rows`` under a campaign's parameters (before its bias)."""
    seq, types, age, last, device = rows["seq"], rows["types"], rows["age"], rows["last"], rows["device"]
    n = len(rows["lengths"])

    def per_sequence(values: np.ndarray) -> np.ndarray:
        return np.bincount(seq, weights=values, minlength=n)

    shared = per_sequence(world["type_value"][types] * np.exp(-age / 240.0)) + 0.4 * device + rows["noise"]
    specific = (
        affinity_scale * np.tanh(per_sequence(affinity[types] * np.exp(-age / recency_scale)))
        + tod_amplitude * np.cos(2 * np.pi * (rows["hour"][last] - peak_hour) / 24)
        + price_slope * np.log(rows["price"][last]) * (2 * device - 1)
    )
    return shared + specific


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
    from fleet.synthetic.zoo import build_teacher  # lazily: fleet.synthetic.zoo imports this module

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
    logits = torch.cat(
        [model(b.event_types, b.features, b.lengths) for _, b in val.minibatches(512, sort_by_length=False)]
    )
    return float(F.binary_cross_entropy_with_logits(logits, val.labels))


def train_teachers(
    campaigns: list[str], config: SynthConfig, events_uri: str, teachers_uri: str, storage_options: dict | None = None
) -> list[dict]:
    """Train and save the teachers of a batch of campaigns (the unit of work of one Ray task). A teacher
    already saved by an earlier, interrupted run of the same fleet is kept (``"resumed": True``):
    :func:`fleet.formats.teachers.save_teacher` writes ``config.json`` last, so its presence means complete."""
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
    fs, path = fsspec.core.url_to_fs(
        f"{teachers_uri.rstrip('/')}/{config.campaign_id}/{CONFIG_FILE}", **(storage_options or {})
    )
    return fs.exists(path) and json.loads(fs.cat_file(path)) == config.to_json()


# ---------------------------------------------------------------------------------------------
# per-user fleets: teachers trained pack_size at a time, written as packs

TRAIN_GROUP_FLOATS = 1 << 26  # a stacked training step runs at most this many (entity x row x step) x width floats


def pack_members(config: SynthConfig, pack: int) -> range:
    """Entity indices of pack ``pack`` (consecutive, so every pack is a sorted id range)."""
    return range(pack * config.pack_size, min((pack + 1) * config.pack_size, config.campaigns))


def pack_name(pack: int) -> str:
    """Name of a per-user fleet's pack ``pack``: ``pack-00000`` ..."""
    return f"pack-{pack:05d}"


def init_stacked(config: TeacherConfig, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``count`` freshly initialised :class:`TeacherRNN` state dicts stacked ``[count, ...]`` (PyTorch's
    initialisation: embeddings N(0, 1), RNN and readout weights U(-1/sqrt(H), 1/sqrt(H)))."""
    shapes = {name: tuple(t.shape) for name, t in TeacherRNN(config).state_dict().items()}
    bound = 1 / math.sqrt(config.hidden_size)
    out = {}
    for name, shape in shapes.items():
        if name == "embedding.weight":
            out[name] = torch.randn((count, *shape), generator=generator)
        else:
            out[name] = (torch.rand((count, *shape), generator=generator) * 2 - 1) * bound
    return out


def _stacked_bce(params, config: TeacherConfig, batches: list[SequenceBatch]) -> torch.Tensor:
    """``(G,)`` mean binary cross-entropy of each stacked teacher on its own batch (padding rows masked)."""
    types, feats, lengths = pad_stack(batches)
    logits = stacked_forward(params, config.arch, config.num_layers, types, feats, lengths)  # (G, B)
    labels = torch.zeros_like(logits)
    mask = torch.zeros_like(logits)
    for k, batch in enumerate(batches):
        labels[k, : len(batch)] = batch.labels
        mask[k, : len(batch)] = 1.0
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * mask  # (G, B)
    return losses.sum(1) / mask.sum(1).clamp(min=1)


def train_stacked_teachers(
    config: SynthConfig,
    ids: list[str],
    batches: list[SequenceBatch],
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Train the reference teachers of entities ``ids`` (rows ``batches``) together: parameters stacked
    ``[K, ...]`` (:func:`fleet.formats.teacher_pack.stacked_forward`), Adam per element (so per teacher), each
    teacher's gradient clipped to norm 1 and its own early stopping on its validation split (patience
    ``config.patience``; a stopped teacher is frozen at its best). An epoch shows every entity each of its
    training rows once: its length-sorted minibatches are spread over as many steps as the largest entity
    has minibatches, each at the step of the same length quantile (similar lengths: little padding), and
    an entity takes an Adam step only at the steps that hold one of its minibatches. Deterministic for ``config.seed`` and ``ids``.
    Returns ``(state dicts stacked [K, ...], per-entity stats)``."""
    teacher_config = config.teacher_config(ids[0])
    generator = torch.Generator().manual_seed(_campaign_seed(config.seed, f"pack:{ids[0]}"))
    params = {k: v.requires_grad_() for k, v in init_stacked(teacher_config, len(ids), generator).items()}
    splits = [split_train_validation(cid, len(b), config.seed) for cid, b in zip(ids, batches)]
    train = [b.select(torch.from_numpy(t)) for b, (t, _) in zip(batches, splits)]
    val = [b.select(torch.from_numpy(v)) for b, (_, v) in zip(batches, splits)]
    count = len(ids)
    moments = {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in params.items()}
    steps = torch.zeros(count)  # (K,) Adam steps taken by each teacher
    active = torch.ones(count, dtype=torch.bool)
    best = {k: v.detach().clone() for k, v in params.items()}
    best_loss = _stacked_validation(params, teacher_config, val)  # (K,)
    best_epoch, stale, epochs = (
        torch.zeros(count, dtype=torch.long),
        torch.zeros(count, dtype=torch.long),
        torch.zeros(count, dtype=torch.long),
    )
    width = 4 * teacher_config.hidden_size + teacher_config.embed_dim + teacher_config.num_features
    for epoch in range(1, config.max_epochs + 1):
        if not active.any():
            break
        chunks = [
            list(
                torch.split(
                    torch.argsort(t.lengths.float() + torch.rand(len(t), generator=generator) * 4.0), config.batch_size
                )
            )
            for t in train
        ]
        bands = max(len(c) for c in chunks)
        at_band: list[list[tuple[int, int]]] = [[] for _ in range(bands)]  # band -> (entity, its chunk)
        for k in torch.nonzero(active).flatten().tolist():
            for c in range(len(chunks[k])):  # chunk c (quantile c / n_k of the lengths) at the same quantile band
                at_band[c * bands // len(chunks[k])].append((k, c))
        for band in torch.randperm(bands, generator=generator).tolist():
            if not at_band[band]:
                continue
            members = [k for k, _ in at_band[band]]
            picks = [train[k].select(chunks[k][c]) for k, c in at_band[band]]
            rows = max(len(p) for p in picks)
            steps_t = max(int(p.lengths.max()) for p in picks)
            per_group = max(1, TRAIN_GROUP_FLOATS // (rows * steps_t * width))
            grads = {k: torch.zeros_like(v) for k, v in params.items()}
            for start in range(0, len(members), per_group):
                group = torch.tensor(members[start : start + per_group])
                sub = {k: v[group] for k, v in params.items()}
                loss = _stacked_bce(sub, teacher_config, picks[start : start + per_group]).sum()
                for name, grad in zip(sub, torch.autograd.grad(loss, list(sub.values()))):
                    grads[name][group] = grad
            stepping = torch.zeros(count, dtype=torch.bool)
            stepping[members] = True
            _adam_step(params, grads, moments, steps, stepping, config.lr)
        epochs[active] = epoch
        loss = _stacked_validation(params, teacher_config, val)
        improved = active & (loss < best_loss - 1e-4)
        for name, value in params.items():
            best[name][improved] = value.detach()[improved]
        best_loss = torch.where(improved, loss, best_loss)
        best_epoch[improved] = epoch
        stale = torch.where(improved, torch.zeros_like(stale), stale + active.long())
        active &= stale < config.patience
    stats = [
        {
            "epochs": int(epochs[k]),
            "best_epoch": int(best_epoch[k]),
            "val_loss": float(best_loss[k]),
            "n_train": len(train[k]),
        }
        for k in range(count)
    ]
    return best, stats


@torch.no_grad()
def _stacked_validation(params, config: TeacherConfig, val: list[SequenceBatch]) -> torch.Tensor:
    """``(K,)`` validation loss of each stacked teacher on its own validation rows."""
    logits = stacked_logits({k: v.detach() for k, v in params.items()}, config.arch, config.num_layers, val)
    return torch.tensor([float(F.binary_cross_entropy_with_logits(lg, v.labels)) for lg, v in zip(logits, val)])


@torch.no_grad()
def _adam_step(
    params: dict,
    grads: dict,
    moments: dict,
    steps: torch.Tensor,
    active: torch.Tensor,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """One Adam step of the ``active`` stacked teachers (``[K, ...]`` tensors), after clipping each teacher's
    gradient to norm 1 (as :func:`train_teacher` does per model); the others stay as they are."""
    norms = torch.sqrt(sum(g.pow(2).flatten(1).sum(1) for g in grads.values()))  # (K,)
    scale = torch.clamp(1.0 / (norms + 1e-6), max=1.0)  # (K,)
    steps += active.float()
    t = steps.clamp(min=1)
    for name, p in params.items():
        shape = (-1,) + (1,) * (p.dim() - 1)
        g = grads[name] * scale.view(shape)
        m, v = moments[name]
        on = active.view(shape)
        m.copy_(torch.where(on, betas[0] * m + (1 - betas[0]) * g, m))
        v.copy_(torch.where(on, betas[1] * v + (1 - betas[1]) * g * g, v))
        m_hat = m / (1 - betas[0] ** t).view(shape)
        v_hat = v / (1 - betas[1] ** t).view(shape)
        p.sub_(torch.where(on, lr * m_hat / (v_hat.sqrt() + eps), torch.zeros_like(p)))


def build_user_pack(
    pack: int, config: SynthConfig, events_uri: str, teachers_uri: str, storage_options: dict | None = None
) -> list[dict]:
    """One task of a per-user ``fleet synth``: generate pack ``pack``'s entities, write their events as
    ``events/part-<pack>.parquet`` and train their teachers together into ``teachers/packs/pack-<pack>``.
    A pack already complete (its ``config.json``, written last) is kept (``"resumed": True``)."""
    members = pack_members(config, pack)
    ids = [entity_id(config, i) for i in members]
    teacher_json = config.teacher_config(ids[0]).to_json()
    started = time.perf_counter()
    tables = [generate_campaign(config, i) for i in members]
    stats = [
        {"campaign_id": cid, "rows": len(t), "label_rate": float(t["label"].to_numpy(zero_copy_only=False).mean())}
        for cid, t in zip(ids, tables)
    ]
    if pack_complete(teachers_uri, pack_name(pack), teacher_json, storage_options):
        return [{**s, "seconds": 0.0, "resumed": True} for s in stats]
    write_events(events_uri, pa.concat_tables(tables), storage_options, rows_per_file=1 << 30, start_part=pack)
    tensors, train_stats = train_stacked_teachers(config, ids, [table_to_batch(t, config.num_features) for t in tables])
    write_pack(teachers_uri, pack_name(pack), teacher_json, ids, tensors, storage_options)
    seconds = (time.perf_counter() - started) / len(ids)
    return [{**s, "seconds": seconds, "resumed": False, **t} for s, t in zip(stats, train_stats)]
