"""The zoo: synthetic fleets built differently from :func:`fleet.synthetic.synth.generate_campaign`, and teacher
classes other than :class:`fleet.formats.teachers.TeacherRNN`, so that fleet's defaults are chosen on many fleets.

Generators (:data:`GENERATORS`, chosen by ``SynthConfig.generator``). Each has the output contract of
:func:`fleet.synthetic.synth.generate_campaign`: one events-schema table per campaign, a pure function of
(seed, campaign index), campaign sizes Pareto(``size_alpha``) above ``min_sequences`` capped at
``max_sequences`` (the very same sizes as ``"default"`` for a seed and index), ``num_features``
features per event (the first few carry the signal, the rest are noise) and event types in
``[0, num_event_types)``.

- ``"default"``: :func:`fleet.synthetic.synth.generate_campaign` (lengths 5-100, all event types, label rates 2%-30%).
- ``"affinity"``: few event types and short sequences. Each campaign uses a random subset of 1/10 to
  1/4 of the event types (users stick to a favourite one); lengths 3-40 (median ~9). The label is a
  saturating (tanh) sum of campaign-specific event-type affinities (a sparse subset of the active
  types, of both signs) weighted by dwell and by a campaign-specific recency half-life, counted either
  in events from the end or in minutes before the prediction point; plus a count effect ("at least
  ``c`` events of key type ``k``", ``c`` in 2-3, either sign); plus a small shared type propensity.
  Base rates log-uniform in [1%, 40%]. Features: events-from-end, log age, log dwell, log gap, log price.
- ``"interaction"``: long sequences, evidence spread over all of them. Lengths 20-200 (median ~60),
  event types drawn from nearly the whole vocabulary. The label is the interaction of a numeric
  feature ``x`` with the hour of day at a campaign-specific phase, summed over *all* events
  (``sum_t x_t cos(2 pi (hour_t - phase) / 24) / sqrt(T)``), plus the type and ``x`` of the event at a
  campaign-specific position (one of the first 20, so up to ~200 steps back from the prediction
  point), plus the mean of a campaign-specific value of every event's type, plus a shared type
  propensity. Base rates log-uniform in [1%, 40%]. Features: hour sin/cos, ``x``, log gap, position.

Teacher classes (:data:`TEACHERS`, chosen by ``SynthConfig.teacher``), all called as
``forward(event_types (B, T) long, features (B, T, F) float, lengths (B,) long) -> logits (B,)`` and
blind to anything after ``lengths`` (even NaN):

- ``"rnn"``: :class:`fleet.formats.teachers.TeacherRNN` (LSTM or GRU, last valid state; the built-in reader).
- ``"attn_gru"`` (:class:`AttentionGRUTeacher`): embedding ++ features -> GRU (``num_layers``) ->
  attention pooling over the valid steps (masked softmax of a learned query) -> MLP -> logit.
- ``"conv"`` (:class:`ConvTeacher`): embedding ++ features -> two same-padded 1-D convolutions (kernel 5,
  padding zeroed before each) -> masked max- and mean-pooling -> MLP -> logit (``num_layers`` unused).

Zoo teachers are stored as ``fleet-teacher/1`` with ``"arch": "attn_gru" | "conv"`` and
``"loader": "fleet.synthetic.zoo:load_teacher"`` (docs/formats.md, "The zoo"). Imports: zoo -> synth -> teachers;
synth reaches zoo only lazily, inside functions.
"""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from fleet.formats.events import EVENTS_SCHEMA
from fleet.formats.teachers import TeacherConfig, TeacherRNN
from fleet.synthetic import synth

LOADER = synth.ZOO_LOADER  # "fleet.synthetic.zoo:load_teacher", the "loader" of every zoo teacher's config.json
CONV_KERNEL = 5


# ----------------------------------------------------------------------------- generators


def _campaign_size(config: synth.SynthConfig, rng: np.random.Generator) -> int:
    """Pareto campaign size, drawn exactly as :func:`fleet.synthetic.synth.generate_campaign` draws it."""
    size = config.min_sequences * (1.0 + rng.pareto(config.size_alpha))
    return int(min(round(size), config.max_sequences))


def _layout(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(seq, starts, position, last)`` of sequences of ``lengths`` laid end to end: ``seq`` (E,) the
    sequence of each event, ``starts``/``last`` (n,) its first/last event, ``position`` (E,) 0-based."""
    seq = np.repeat(np.arange(len(lengths)), lengths)  # (E,)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)  # (n,)
    position = np.arange(len(seq)) - starts[seq]  # (E,)
    return seq, starts, position, starts + lengths - 1


def _draw(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Indices drawn from the categorical distribution of ``cdf`` (m,) by uniforms ``u`` (any shape)."""
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


def _elapsed(
    rng: np.random.Generator,
    lengths: np.ndarray,
    seq: np.ndarray,
    starts: np.ndarray,
    last: np.ndarray,
    mean_log_minutes: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(gaps, elapsed, age)`` (E,) in minutes: gap before each event (0 for the first), time since the
    sequence started, time before its prediction point (its last event)."""
    user_rate = np.exp(rng.normal(mean_log_minutes, 1.0, size=len(lengths)))  # (n,) mean minutes between events
    gaps = rng.exponential(user_rate[seq])  # (E,)
    gaps[starts] = 0.0
    total = np.cumsum(gaps)
    elapsed = total - total[starts][seq]  # (E,)
    return gaps, elapsed, elapsed[last][seq] - elapsed


def _with_noise(rng: np.random.Generator, signal: list[np.ndarray], num_features: int) -> np.ndarray:
    """(E, num_features) float32: the signal columns first (cut to ``num_features``), N(0, 1) noise after."""
    features = np.stack(signal, axis=1)[:, :num_features]  # (E, min(S, F))
    if num_features > features.shape[1]:
        noise = rng.normal(size=(len(features), num_features - features.shape[1]))  # (E, F - S)
        features = np.concatenate([features, noise], axis=1)
    return features.astype(np.float32)


def _label_bias(rng: np.random.Generator, logit: np.ndarray, low: float, high: float) -> float:
    """The bias that shifts ``logit`` (n,) to a mean probability at a base rate log-uniform in [``low``, ``high``]."""
    rate = math.exp(rng.uniform(math.log(low), math.log(high)))
    return synth._bias_for_rate(logit, rate)


def _labels(rng: np.random.Generator, logit: np.ndarray, bias: float) -> np.ndarray:
    """(n,) int8 labels drawn with probability ``sigmoid(logit + bias)``."""
    return (rng.uniform(size=len(logit)) < 1 / (1 + np.exp(-(logit + bias)))).astype(np.int8)


def _table(index: int, lengths: np.ndarray, types: np.ndarray, features: np.ndarray, labels: np.ndarray) -> pa.Table:
    """The events-schema table of campaign ``index`` from flat ``types`` (E,) and ``features`` (E, F)."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)  # (n + 1,)
    num_features = features.shape[1]
    return pa.table(
        {
            "campaign_id": pa.array([f"campaign-{index:05d}"] * len(lengths), pa.string()),
            "event_types": pa.ListArray.from_arrays(pa.array(offsets), pa.array(types.astype(np.int32))),
            "features": pa.ListArray.from_arrays(pa.array(offsets * num_features), pa.array(features.reshape(-1))),
            "label": pa.array(labels, pa.int8()),
        },
        schema=EVENTS_SCHEMA,
    )


def _shared_type_value(config: synth.SynthConfig, salt: int) -> np.ndarray:
    """(K,) a propensity per event type shared by every campaign of the fleet (a function of the seed)."""
    rng = np.random.default_rng([config.seed, salt])
    return rng.normal(scale=0.6, size=config.num_event_types)


def generate_affinity(config: synth.SynthConfig, index: int, fresh_rows: int = 0) -> pa.Table:
    """Campaign ``index`` of the ``"affinity"`` generator (events schema; see the module docstring); with
    ``fresh_rows`` > 0, that many new sequences of it instead (:func:`fleet.synthetic.synth.generate_campaign`)."""
    rng = np.random.default_rng([config.seed, index])
    n = _campaign_size(config, rng)
    k = config.num_event_types
    m = min(k, int(rng.integers(max(2, k // 10), max(3, k // 4) + 1)))  # active event types
    active = rng.choice(k, size=m, replace=False)  # (m,)
    cdf = np.cumsum(rng.dirichlet(np.full(m, 0.8)))  # (m,)
    rows = _affinity_rows(config, rng, n, active, cdf)
    affinity = np.zeros(k)
    chosen = active[rng.uniform(size=m) < 0.5]
    chosen = chosen if len(chosen) else active[:1]
    affinity[chosen] = rng.normal(0.0, 1.5, size=len(chosen))  # sparse, both signs
    by_events = rng.uniform() < 0.5  # recency by events from the end, else by minutes before the prediction point
    half_life = math.exp(rng.normal(math.log(3), 0.5) if by_events else rng.normal(math.log(60), 0.8))
    scale, saturation = rng.uniform(1.5, 3.0), rng.uniform(0.5, 1.5)
    key = active[_draw(cdf, rng.uniform())]
    sign, size, threshold = rng.choice([-1.0, 1.0]), rng.uniform(0.8, 2.0), rng.integers(2, 4)
    params = (affinity, by_events, half_life, scale, saturation, key, sign * size, threshold)
    logit = _affinity_logit(config, rows, *params) + rng.normal(0.0, 0.3, size=n)
    bias = _label_bias(rng, logit, 0.01, 0.40)
    if fresh_rows > 0:
        rng = synth.fresh_rng(config, index)
        rows = _affinity_rows(config, rng, fresh_rows, active, cdf)
        logit = _affinity_logit(config, rows, *params) + rng.normal(0.0, 0.3, size=fresh_rows)
    return _table(index, rows["lengths"], rows["types"], rows["features"], _labels(rng, logit, bias))


def _affinity_rows(
    config: synth.SynthConfig, rng: np.random.Generator, n: int, active: np.ndarray, cdf: np.ndarray
) -> dict[str, np.ndarray]:
    """``n`` sequences of an ``"affinity"`` campaign (its ``active`` types drawn by ``cdf``) from ``rng``."""
    lengths = np.clip(np.round(np.exp(rng.normal(math.log(9), 0.7, size=n))), 3, 40).astype(np.int64)  # (n,)
    seq, starts, position, last = _layout(lengths)
    from_end = lengths[seq] - 1 - position  # (E,) 0 at the prediction point
    favourite = active[_draw(cdf, rng.uniform(size=n))]  # (n,)
    loyalty = rng.beta(2.0, 3.0, size=n)  # (n,)
    e = len(seq)
    drawn = active[_draw(cdf, rng.uniform(size=e))]  # (E,)
    types = np.where(rng.uniform(size=e) < loyalty[seq], favourite[seq], drawn)  # (E,)
    gaps, _, age = _elapsed(rng, lengths, seq, starts, last, math.log(30))
    dwell = np.exp(rng.normal(1.0, 0.8, size=e))  # (E,) seconds
    price = np.exp(rng.normal(0.0, 0.6, size=e))  # (E,)
    features = _with_noise(
        rng,
        [from_end / 10.0, np.log1p(age) / 5, np.log(dwell) / 2, np.log1p(gaps) / 5, np.log(price)],
        config.num_features,
    )  # (E, F)
    return {
        "lengths": lengths,
        "seq": seq,
        "types": types,
        "features": features,
        "from_end": from_end,
        "age": age,
        "dwell": dwell,
    }


def _affinity_logit(
    config: synth.SynthConfig,
    rows: dict,
    affinity: np.ndarray,
    by_events: bool,
    half_life: float,
    scale: float,
    saturation: float,
    key: int,
    count_effect: float,
    threshold: int,
) -> np.ndarray:
    """(n,) label logit of ``"affinity"`` ``rows`` under a campaign's parameters (before noise and bias)."""
    seq, types, n = rows["seq"], rows["types"], len(rows["lengths"])

    def per_sequence(values: np.ndarray) -> np.ndarray:  # (E,) -> (n,) sums
        return np.bincount(seq, weights=values, minlength=n)

    decay = 0.5 ** ((rows["from_end"] if by_events else rows["age"]) / half_life)  # (E,)
    engagement = 1.0 + 0.5 * np.tanh(np.log(rows["dwell"]) - 1.0)  # (E,) long views count more
    score = per_sequence(affinity[types] * decay * engagement)  # (n,)
    counts = np.bincount(seq[types == key], minlength=n)  # (n,) events of the key type
    shared = per_sequence(_shared_type_value(config, 0xAFF1)[types] * 0.5 ** (rows["from_end"] / 5.0))
    return scale * np.tanh(score / saturation) + count_effect * (counts >= threshold) + 0.5 * shared


def generate_interaction(config: synth.SynthConfig, index: int, fresh_rows: int = 0) -> pa.Table:
    """Campaign ``index`` of the ``"interaction"`` generator (events schema; see the module docstring); with
    ``fresh_rows`` > 0, that many new sequences of it instead (:func:`fleet.synthetic.synth.generate_campaign`)."""
    rng = np.random.default_rng([config.seed, index])
    n = _campaign_size(config, rng)
    k = config.num_event_types
    tilt = _shared_type_value(config, 0x1A7E) + rng.normal(0.0, 0.5, size=k)  # (K,) fleet + campaign popularity
    probs = np.exp(0.5 * tilt) / np.exp(0.5 * tilt).sum()  # (K,) nearly flat: most types occur
    cdf = np.cumsum(probs)
    rows = _interaction_rows(config, rng, n, cdf)
    phase = rng.uniform(0, 24)
    type_value = rng.normal(0.0, 1.0, size=k)  # (K,) campaign-specific, dense
    position = int(rng.integers(0, 20))
    type_weight, x_weight = rng.uniform(0.5, 1.5), rng.normal(0.0, 0.8)
    params = (phase, type_value, position, type_weight, x_weight, rng.uniform(1.5, 3.0), rng.uniform(1.0, 3.0))
    logit = _interaction_logit(config, rows, *params) + rng.normal(0.0, 0.3, size=n)
    bias = _label_bias(rng, logit, 0.01, 0.40)
    if fresh_rows > 0:
        rng = synth.fresh_rng(config, index)
        rows = _interaction_rows(config, rng, fresh_rows, cdf)
        logit = _interaction_logit(config, rows, *params) + rng.normal(0.0, 0.3, size=fresh_rows)
    return _table(index, rows["lengths"], rows["types"], rows["features"], _labels(rng, logit, bias))


def _interaction_rows(
    config: synth.SynthConfig, rng: np.random.Generator, n: int, cdf: np.ndarray
) -> dict[str, np.ndarray]:
    """``n`` sequences of an ``"interaction"`` campaign (event types drawn by ``cdf``) from ``rng``."""
    lengths = np.clip(np.round(np.exp(rng.normal(math.log(60), 0.6, size=n))), 20, 200).astype(np.int64)  # (n,)
    seq, starts, position, last = _layout(lengths)
    e = len(seq)
    favourite = _draw(cdf, rng.uniform(size=n))  # (n,)
    types = np.where(rng.uniform(size=e) < 0.2, favourite[seq], _draw(cdf, rng.uniform(size=e)))  # (E,)
    gaps, elapsed, _ = _elapsed(rng, lengths, seq, starts, last, math.log(8))
    hour = (rng.uniform(0, 24, size=n)[seq] + elapsed / 60.0) % 24.0  # (E,)
    x = rng.normal(0.0, 0.6, size=e) + rng.normal(0.0, 0.8, size=n)[seq]  # (E,) e.g. a standardised bid
    features = _with_noise(
        rng,
        [np.sin(2 * np.pi * hour / 24), np.cos(2 * np.pi * hour / 24), x, np.log1p(gaps) / 5, position / 100.0],
        config.num_features,
    )  # (E, F)
    return {
        "lengths": lengths,
        "seq": seq,
        "starts": starts,
        "types": types,
        "features": features,
        "hour": hour,
        "x": x,
    }


def _interaction_logit(
    config: synth.SynthConfig,
    rows: dict,
    phase: float,
    type_value: np.ndarray,
    position: int,
    type_weight: float,
    x_weight: float,
    interaction_weight: float,
    average_weight: float,
) -> np.ndarray:
    """(n,) label logit of ``"interaction"`` ``rows`` under a campaign's parameters (before noise and bias)."""
    seq, types, x, lengths = rows["seq"], rows["types"], rows["x"], rows["lengths"]
    n = len(lengths)

    def per_sequence(values: np.ndarray) -> np.ndarray:  # (E,) -> (n,) sums
        return np.bincount(seq, weights=values, minlength=n)

    interaction = per_sequence(x * np.cos(2 * np.pi * (rows["hour"] - phase) / 24)) / lengths  # (n,) over ALL events
    at = rows["starts"] + position  # (n,) the event at the campaign's position
    positional = type_weight * type_value[types[at]] + x_weight * x[at]
    average = per_sequence(type_value[types]) / lengths  # (n,) over ALL events
    shared = per_sequence(_shared_type_value(config, 0x1E7E)[types]) / lengths
    return interaction_weight * interaction + positional + average_weight * average + shared


#: Generators by name (``SynthConfig.generator``); ``fleet.synthetic.synth.generate`` dispatches on this.
GENERATORS = {
    "default": synth.generate_campaign,
    "affinity": generate_affinity,
    "interaction": generate_interaction,
}


# ----------------------------------------------------------------------------- teachers


def _valid_mask(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, T) bool: True at the valid steps ``t < lengths``."""
    return torch.arange(steps, device=lengths.device)[None, :] < lengths[:, None]  # (B, T)


class AttentionGRUTeacher(nn.Module):
    """embedding ++ features -> GRU -> attention pooling over the valid steps -> MLP -> logit.

    ``forward(event_types (B, T) long, features (B, T, F) float, lengths (B,) long) -> logits (B,)``;
    steps after ``lengths`` are masked out of the attention (their GRU states come after the valid ones,
    so they never leak back).
    """

    def __init__(self, config: TeacherConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.embedding = nn.Embedding(config.num_event_types, config.embed_dim)
        self.rnn = nn.GRU(config.embed_dim + config.num_features, h, num_layers=config.num_layers, batch_first=True)
        self.query = nn.Linear(h, 1, bias=False)  # the learned query: score_t = q . h_t
        self.mlp = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))

    def forward(self, event_types: torch.Tensor, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits (B,) of sequences ``event_types`` (B, T), ``features`` (B, T, F) of ``lengths`` (B,)."""
        inputs = torch.cat([self.embedding(event_types), features], dim=-1)  # (B, T, E + F)
        outputs, _ = self.rnn(inputs)  # (B, T, H)
        mask = _valid_mask(lengths, outputs.shape[1])  # (B, T)
        outputs = torch.where(mask[..., None], outputs, torch.zeros((), dtype=outputs.dtype))  # (B, T, H)
        scores = self.query(outputs).squeeze(-1).masked_fill(~mask, float("-inf"))  # (B, T)
        weights = torch.softmax(scores, dim=1)  # (B, T), 0 after lengths
        pooled = torch.einsum("bt,bth->bh", weights, outputs)  # (B, H)
        return self.mlp(pooled).squeeze(-1)  # (B,)


class ConvTeacher(nn.Module):
    """embedding ++ features -> two same-padded 1-D convolutions -> masked max + mean pooling -> MLP -> logit.

    ``forward(event_types (B, T) long, features (B, T, F) float, lengths (B,) long) -> logits (B,)``;
    the input and the first convolution's output are zeroed after ``lengths`` before each convolution
    (exactly the zero padding of a sequence cut at its length), and pooling covers the valid steps only.
    """

    def __init__(self, config: TeacherConfig):
        super().__init__()
        self.config = config
        h, pad = config.hidden_size, CONV_KERNEL // 2
        self.embedding = nn.Embedding(config.num_event_types, config.embed_dim)
        self.conv1 = nn.Conv1d(config.embed_dim + config.num_features, h, CONV_KERNEL, padding=pad)
        self.conv2 = nn.Conv1d(h, h, CONV_KERNEL, padding=pad)
        self.mlp = nn.Sequential(nn.Linear(2 * h, h), nn.ReLU(), nn.Linear(h, 1))

    def forward(self, event_types: torch.Tensor, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits (B,) of sequences ``event_types`` (B, T), ``features`` (B, T, F) of ``lengths`` (B,)."""
        mask = _valid_mask(lengths, event_types.shape[1])[:, None, :]  # (B, 1, T)
        zero = torch.zeros((), dtype=features.dtype)
        inputs = torch.cat([self.embedding(event_types), features], dim=-1).transpose(1, 2)  # (B, E + F, T)
        x = torch.relu(self.conv1(torch.where(mask, inputs, zero)))  # (B, H, T)
        x = torch.relu(self.conv2(torch.where(mask, x, zero)))  # (B, H, T)
        peak = torch.where(mask, x, torch.full((), float("-inf"))).amax(dim=2)  # (B, H)
        mean = torch.where(mask, x, zero).sum(dim=2) / lengths[:, None].to(x.dtype)  # (B, H)
        return self.mlp(torch.cat([peak, mean], dim=1)).squeeze(-1)  # (B,)


#: Teacher classes by name (``SynthConfig.teacher``; for "rnn" the config's arch is "lstm" or "gru").
TEACHERS = {"rnn": TeacherRNN, "attn_gru": AttentionGRUTeacher, "conv": ConvTeacher}
_BY_ARCH = {"lstm": TeacherRNN, "gru": TeacherRNN, "attn_gru": AttentionGRUTeacher, "conv": ConvTeacher}


def build_teacher(config: TeacherConfig) -> nn.Module:
    """A freshly initialised teacher module for ``config.arch`` (lstm, gru, attn_gru or conv)."""
    cls = _BY_ARCH.get(config.arch)
    if cls is None:
        raise ValueError(f"unknown teacher arch {config.arch!r}; fleet.synthetic.zoo knows {sorted(_BY_ARCH)}")
    return cls(config)


def load_teacher(config: dict, state_dict: dict) -> nn.Module:
    """The ``"loader"`` of zoo teachers (``"fleet.synthetic.zoo:load_teacher"``): build the module of ``config``
    (a teacher ``config.json`` dict) and load ``state_dict`` strictly. ValueError on an unknown arch."""
    arch = config.get("arch")
    if arch not in _BY_ARCH:
        raise ValueError(f"unknown teacher arch {arch!r}; {LOADER} builds {sorted(_BY_ARCH)}")
    names = {f.name for f in fields(TeacherConfig)}
    model = build_teacher(TeacherConfig(**{k: v for k, v in config.items() if k in names}))
    model.load_state_dict(state_dict, strict=True)
    return model
