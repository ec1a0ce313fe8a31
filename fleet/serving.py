"""Serving a fleet version in-process: :class:`FleetModel` (backbone resident, heads in a bounded LRU).

``FleetModel.open(<manifest uri>)`` or ``FleetModel.load("models:/adfleet@champion")``, then
``predict(campaign_id, sequences)`` or the mixed-campaign ``predict_batch(rows)``. Every entry
point (HTTP, MLflow pyfunc, CLI) goes through :meth:`FleetModel.predict_with_status`
(:meth:`FleetModel.predict_columns` returns its probabilities; it also flags the heads that did not
pass their quality gate, :func:`fleet.codec.head_passed`). It scores a
mixed-campaign batch the S-LoRA / Punica way: the backbone runs once over all sequences (sorted
by length, padded per chunk), then each row's head row is gathered into ``(B, P)`` and
:func:`fleet.student.head_logits` is called once. See ``docs/serving.md``.
"""

from __future__ import annotations

import itertools
import math
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch

from fleet.backbone_codec import decode_backbone
from fleet.codec import HeadRow, block_spans, head_passed, table_to_heads
from fleet.data import collate
from fleet.errors import (
    FleetError,
    InvalidCampaignIdError,
    StoreError,
    UnknownCampaignError,
)
from fleet.heads import decode_heads
from fleet.ids import validate_campaign_id
from fleet.store import (
    BACKBONE,
    ENV_STORAGE_OPTIONS,
    FleetVersion,
    join_uri,
    storage_options_from_env,
)
from fleet.student import (
    POOLED_DESIGNS,
    StudentConfig,
    feature_width,
    head_logits,
    head_num_params,
    ladder_config,
    widen_heads,
)

try:  # the per-campaign agreement / calibration fields of a head row (fleet-heads/1.1)
    from fleet.metrics import CALIBRATION_KEYS
except ImportError:  # pragma: no cover - an older fleet.metrics
    CALIBRATION_KEYS: tuple[str, ...] = ()

DEFAULT_CACHE_SIZE = 100_000
DEFAULT_MAX_SEQUENCE_LENGTH = 1024
#: Rows per backbone call. Rows are sorted by length first, so a chunk pads to similar lengths.
BACKBONE_CHUNK = 256
#: Ids known to be absent although a row group's id range covers them (saves a re-read per request).
ABSENT_CACHE_SIZE = 4096
_SLAB_START_ROWS = 1024


class InvalidInputError(FleetError, ValueError):
    """A prediction request is malformed: names the row (when there is one) and the reason.

    ``InvalidInputError(reason, row=3, campaign_id="c1")`` reads ``campaign 'c1': row 3: reason``.
    """

    def __init__(self, reason: str, *, row: int | None = None, campaign_id: str | None = None):
        self.row = row
        super().__init__(reason if row is None else f"row {row}: {reason}", campaign_id=campaign_id)


# ----------------------------------------------------------------------------- helpers


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _head_bytes(row: HeadRow) -> int:
    """Payload bytes of a head: packed + scales + mask; a ``bloomier`` head: its bias and its share of the
    block (table, centroids, seed ...: :attr:`fleet.weightless.WeightlessBlock.nbytes` / rows), rounded."""
    own = len(row.packed) + len(row.scales) + (len(row.mask) if row.mask is not None else 0)
    if row.block is not None:
        own += round(row.block.nbytes / row.block.rows)
    return own


def head_metadata(row: HeadRow, version_id: str) -> dict:
    """JSON-safe metadata of one head row (no parameters): bits, status, ``passed`` (the quality gate
    verdict, :func:`fleet.codec.head_passed`), fidelity, sizes, hashes, and every
    :data:`fleet.metrics.CALIBRATION_KEYS` field (None when the row has no value)."""
    meta = {
        "campaign_id": row.campaign_id,
        "version": version_id,
        "bits": int(row.bits),
        "group_size": int(row.group_size),
        "shape": [int(d) for d in row.shape],
        "num_params": int(row.num_params),
        "num_stored": int(row.num_stored),
        "pruned": row.mask is not None,
        "bytes": _head_bytes(row),
        "codec": row.codec,
        "status": row.status,
        "passed": head_passed(row.status),
        "teacher_auc": _finite_or_none(row.teacher_auc),
        "student_auc": _finite_or_none(row.student_auc),
        "mean_abs_diff": _finite_or_none(row.mean_abs_diff),
        "agreement": _finite_or_none(row.agreement),
        "n_train": row.n_train,
        "n_holdout": row.n_holdout,
        "teacher_sha256": bytes(row.teacher_sha256).hex(),
        "data_fingerprint": bytes(row.data_fingerprint).hex(),
    }
    for key in CALIBRATION_KEYS:
        meta[key] = _finite_or_none(getattr(row, key, None))
    return meta


@dataclass(frozen=True)
class Prediction:
    """What :meth:`FleetModel.predict_with_status` returns: probabilities and the quality-gate
    verdicts of the heads that produced them.

    Attributes:
        probabilities: ``float64[N]`` in row order (exactly what :meth:`FleetModel.predict_columns` returns).
        fallback: ``bool[N]``: True where the row's head did not pass its quality gate
            (:func:`fleet.codec.head_passed` of its status is False); its probability is still given.
        statuses: distinct campaign id -> its head's ``status``, in order of first use.
    """

    probabilities: np.ndarray
    fallback: np.ndarray
    statuses: dict[str, str]

    @property
    def fallback_campaigns(self) -> list[str]:
        """Campaign ids of the request whose heads did not pass their gate, in order of first use."""
        return [cid for cid, status in self.statuses.items() if not head_passed(status)]


class _HeadCache:
    """Bounded, thread-safe LRU of dequantized head rows.

    Rows live in one slab ``Tensor[rows, P]`` (grown by doubling up to ``capacity``) and an
    ``OrderedDict`` maps campaign id -> slot, so a million cached heads are one tensor, not a
    million tensor objects. Readers copy their rows out under the lock, so an eviction can never
    change a row a request is using.
    """

    def __init__(self, capacity: int, num_params: int):
        self.capacity = int(capacity)
        self._slab = torch.empty(min(self.capacity, _SLAB_START_ROWS), num_params)  # (rows, P)
        self._slots: OrderedDict[str, int] = OrderedDict()
        self._free: list[int] = list(range(self._slab.shape[0] - 1, -1, -1))
        self._status: list[str | None] = [None] * self._slab.shape[0]  # slot -> head status
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._slots)

    def gather(self, ids: Sequence[str], out: torch.Tensor, statuses: list) -> list[int]:
        """Copy the cached rows of ``ids`` into ``out[i]`` and their statuses into ``statuses[i]``;
        return the positions not cached."""
        missing, found, slots = [], [], []
        with self._lock:
            for i, cid in enumerate(ids):
                slot = self._slots.get(cid)
                if slot is None:
                    missing.append(i)
                else:
                    self._slots.move_to_end(cid)
                    found.append(i)
                    slots.append(slot)
                    statuses[i] = self._status[slot]
            if found:
                out[found] = self._slab[slots]
            self.hits += len(found)
            self.misses += len(missing)
        return missing

    def count_hits(self, n: int) -> None:
        with self._lock:
            self.hits += n

    def put(self, ids: Sequence[str], rows: torch.Tensor, statuses: Sequence[str]) -> None:
        """Insert ``rows[i]`` (status ``statuses[i]``) for ``ids[i]``, evicting the least recently
        used rows beyond capacity."""
        if self.capacity <= 0:
            return
        with self._lock:
            for cid, row, status in zip(ids, rows, statuses):
                slot = self._slots.get(cid)
                if slot is None:
                    if len(self._slots) >= self.capacity:
                        _, slot = self._slots.popitem(last=False)  # evict the LRU row
                    else:
                        if not self._free:
                            self._grow()
                        slot = self._free.pop()
                    self._slots[cid] = slot
                else:
                    self._slots.move_to_end(cid)
                self._slab[slot] = row
                self._status[slot] = status

    def _grow(self) -> None:
        old = self._slab.shape[0]
        new = min(self.capacity, max(2 * old, 1))
        slab = torch.empty(new, self._slab.shape[1])
        slab[:old] = self._slab
        self._slab = slab
        self._status.extend([None] * (new - old))
        self._free.extend(range(new - 1, old - 1, -1))


class _BoundedSet:
    """A small LRU set (thread-safe): campaign ids known to be absent from the version."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def add(self, key: str) -> None:
        with self._lock:
            self._items[key] = None
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


# ----------------------------------------------------------------------------- the model


class FleetModel:
    """One fleet version ready to score: backbone resident, heads decoded on first use.

    Build it with :meth:`open` (a version or manifest URI) or :meth:`load` (also ``models:/``
    URIs). All methods are thread-safe; ``predict*`` run under ``torch.inference_mode`` (no autograd
    bookkeeping: ~15% off a backbone forward, measured).

    Args (of :meth:`open`):
        cache_size: heads kept dequantized in the LRU (0 disables caching).
        preload: decode every head at open into one dense ``Tensor[C, P]`` (no LRU, no I/O per
            request). Memory: ``4 * P * C`` bytes plus an id dict.
        max_sequence_length: longest accepted sequence (events per sequence).
        num_threads: ``torch.set_num_threads`` for inference (process-wide); None leaves it.
        verify: check every file's sha256 at open (heads parts included).
    """

    def __init__(
        self,
        version: FleetVersion,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        preload: bool = False,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    ):
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        self._version = version
        self.source_uri: str = version.manifest_uri
        self.max_sequence_length = int(max_sequence_length)
        tensors, metadata = version.read_backbone()
        backbone = decode_backbone(tensors, metadata, path=join_uri(version.uri, BACKBONE))
        backbone.requires_grad_(False)
        self.backbone = backbone.eval()
        self.config: StudentConfig = backbone.config
        self.head_config, self.num_params = self._head_layout(version)
        self._cache = _HeadCache(cache_size, self.num_params)
        self._absent = _BoundedSet(ABSENT_CACHE_SIZE)
        self._dense: torch.Tensor | None = None  # preload: (C, P)
        self._index: dict[str, int] | None = None
        self._status_codes: np.ndarray | None = None  # preload: (C,) index into _status_names
        self._status_names: list[str] = []
        if preload:
            self._preload()

    # -------------------------------------------------------------- construction

    def _head_layout(self, version: FleetVersion) -> tuple[StudentConfig, int]:
        """The head design every campaign is scored with and its row size ``P``: the backbone's, or the
        capacity ladder's next design when the version holds such heads (the manifest's
        ``campaigns.num_params_max``, written by :class:`fleet.store.VersionWriter`); smaller rows are
        widened to it with zeros (:func:`fleet.student.widen_heads`), which leaves their logits as they are."""
        base, bigger = self.config, ladder_config(self.config)
        widest = version.manifest["campaigns"].get("num_params_max") or head_num_params(base)
        allowed = {head_num_params(base): base, **({head_num_params(bigger): bigger} if bigger else {})}
        if widest not in allowed:
            raise StoreError(f"campaigns.num_params_max {widest!r} fits neither the backbone's {base.head!r} head nor "
                             "its capacity ladder", path=version.manifest_uri)
        return allowed[widest], widest

    @classmethod
    def open(
        cls,
        manifest_or_version_uri: str,
        storage_options: dict | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
        preload: bool = False,
        *,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        num_threads: int | None = None,
        verify: bool = True,
        manifest_sha256: str | None = None,
    ) -> FleetModel:
        """Open a committed version (its directory or ``manifest.json`` URI).

        ``storage_options`` None reads ``$FLEET_STORAGE_OPTIONS`` (JSON) when set. ``manifest_sha256``
        (the registry's tag, passed by :meth:`load`): a manifest with another sha256 is refused.
        """
        if storage_options is None:
            storage_options = storage_options_from_env()
        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
        # preload reads (and verifies) backbone and every heads part anyway
        version = FleetVersion.open(manifest_or_version_uri, storage_options, verify=verify and not preload,
                                    manifest_sha256=manifest_sha256)
        return cls(version, cache_size=cache_size, preload=preload, max_sequence_length=max_sequence_length)

    @classmethod
    def load(cls, model_uri: str, tracking_uri: str | None = None, **kw: Any) -> FleetModel:
        """Open ``models:/NAME@alias`` / ``models:/NAME/N`` (resolved in the MLflow registry) or any
        version/manifest URI. ``kw`` are :meth:`open`'s options. A registry version's manifest must
        match the sha256 of its ``manifest_sha256`` tag (versions registered without one are not checked)."""
        if model_uri.startswith("models:"):
            manifest_uri, version_id, manifest_sha256 = resolve_model_uri(model_uri, tracking_uri)
            model = cls.open(manifest_uri, manifest_sha256=manifest_sha256, **kw)
            if version_id is not None and model.version_id != version_id:
                raise StoreError(
                    f"{model_uri} names fleet version {version_id!r} but its manifest holds {model.version_id!r}",
                    path=manifest_uri,
                )
        else:
            model = cls.open(model_uri, **kw)
        model.source_uri = model_uri
        return model

    def _preload(self) -> None:
        table = self._version.read_heads()
        ids = table.column("campaign_id").to_pylist()
        dense = torch.empty(len(ids), self.num_params)
        step = 65_536  # decode in slices: HeadRow objects for a million heads would not fit
        cuts = list(range(0, len(ids), step)) + [len(ids)]
        if "bloomier" in table.column_names:  # slices end between blocks: a bloomier row decodes with its block
            cuts = [0]
            for s, n in block_spans(table):
                if s + n - cuts[-1] >= step or s + n == len(ids):
                    cuts.append(s + n)
        for start, stop in itertools.pairwise(cuts):
            rows = table_to_heads(table.slice(start, stop - start))
            dense[start:stop] = self._decode(rows)
        status = pc.dictionary_encode(table.column("status").combine_chunks())  # a few distinct values
        self._status_codes = status.indices.to_numpy(zero_copy_only=False)
        self._status_names = [sys.intern(v) for v in status.dictionary.to_pylist()]
        self._dense = dense
        self._index = {cid: i for i, cid in enumerate(ids)}

    # -------------------------------------------------------------- properties

    @property
    def version_id(self) -> str:
        return self._version.version_id

    @property
    def num_campaigns(self) -> int:
        return int(self._version.manifest["campaigns"]["count"])

    @property
    def manifest(self) -> dict:
        """The version's manifest (read-only by convention: do not mutate)."""
        return self._version.manifest

    @property
    def version(self) -> FleetVersion:
        return self._version

    def cache_info(self) -> dict:
        """``{"hits", "misses", "size", "capacity", "preloaded"}`` of the head cache."""
        if self._dense is not None:
            return {"hits": self._cache.hits, "misses": 0, "size": int(self._dense.shape[0]),
                    "capacity": int(self._dense.shape[0]), "preloaded": True}
        return {"hits": self._cache.hits, "misses": self._cache.misses, "size": len(self._cache),
                "capacity": self._cache.capacity, "preloaded": False}

    def __repr__(self) -> str:
        return f"FleetModel(version={self.version_id!r}, campaigns={self.num_campaigns}, uri={self.source_uri!r})"

    # -------------------------------------------------------------- heads

    def _decode(self, rows: Sequence[HeadRow]) -> torch.Tensor:
        base = head_num_params(self.config)
        for r in rows:
            if r.num_params not in (base, self.num_params):
                raise StoreError(f"head has {r.num_params} parameters but the backbone's {self.config.head!r} "
                                 f"head needs {base} (or {self.num_params}, its capacity ladder)",
                                 campaign_id=r.campaign_id, path=self._version.uri)
        heads = torch.empty(len(rows), self.num_params)  # (C, P), smaller designs widened
        for size in {r.num_params for r in rows}:
            picked = [i for i, r in enumerate(rows) if r.num_params == size]
            try:
                decoded = decode_heads([rows[i] for i in picked]).reshape(len(picked), size).float()
            except (ValueError, RuntimeError, IndexError) as err:  # rows were checked: a stored row is bad
                raise StoreError(f"head does not decode: {err}", campaign_id=rows[picked[0]].campaign_id,
                                 path=self._version.uri) from None
            heads[picked] = widen_heads(decoded, self.config if size == base else self.head_config, self.head_config)
        if not torch.isfinite(heads).all():
            bad = rows[int((~torch.isfinite(heads)).any(1).nonzero()[0])].campaign_id
            raise StoreError("head decodes to non-finite parameters", campaign_id=bad, path=self._version.uri)
        return heads

    def _heads(self, ids: list[str], first_row: dict[str, int]) -> tuple[torch.Tensor, list[str]]:
        """Head rows ``(U, P)`` and head statuses of distinct valid ``ids`` (both from the same cache
        entry or preloaded index: no extra I/O); UnknownCampaignError for an absent one."""
        if self._dense is not None:
            index = []
            for cid in ids:
                i = self._index.get(cid)
                if i is None:
                    raise self._unknown(cid, first_row.get(cid))
                index.append(i)
            self._cache.count_hits(len(ids))
            names = self._status_names
            return self._dense[index], [names[c] for c in self._status_codes[index].tolist()]
        out = torch.empty(len(ids), self.num_params)  # (U, P)
        statuses: list = [None] * len(ids)
        missing = self._cache.gather(ids, out, statuses)
        if missing:
            rows = []
            for i in missing:
                cid = ids[i]
                row = None if cid in self._absent else self._version.read_head_row(cid)  # one row group
                if row is None:
                    self._absent.add(cid)
                    raise self._unknown(cid, first_row.get(cid))
                rows.append(row)
            decoded = self._decode(rows)  # (M, P)
            out[missing] = decoded
            for i, row in zip(missing, rows):
                statuses[i] = sys.intern(row.status)
            self._cache.put([ids[i] for i in missing], decoded, [statuses[i] for i in missing])
        return out, statuses

    def head_status(self, campaign_id: str) -> str:
        """The ``status`` of a campaign's head (``"ok"``, ``"capacity"``, ``"fallback"``, ...), served
        from the head cache / preloaded index like the head itself (a cold id reads its row group once
        and caches the head). ``fleet.codec.head_passed(status)`` says whether it passed its gate.
        UnknownCampaignError when the campaign is not in the version."""
        cid = _check_id(campaign_id, None)
        with torch.inference_mode():
            return self._heads([cid], {})[1][0]

    def _unknown(self, campaign_id: str, row: int | None) -> UnknownCampaignError:
        where = "" if row is None else f"row {row}: "
        return UnknownCampaignError(f"{where}not in fleet version {self.version_id!r}", campaign_id=campaign_id)

    def metadata(self, campaign_id: str) -> dict:
        """Metadata of one campaign's head (:func:`head_metadata`): bits, status, passed, fidelity
        and calibration fields, n_train, version, ... ."""
        cid = _check_id(campaign_id, None)
        row = self._version.read_head_row(cid)
        if row is None:
            raise self._unknown(cid, None)
        return head_metadata(row, self.version_id)

    # -------------------------------------------------------------- prediction

    def predict(self, campaign_id: str, sequences: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Probabilities ``float64[N]`` of ``sequences`` (dicts with ``event_types`` and flat
        ``features``) under one campaign's head."""
        campaign_id = _check_id(campaign_id, None)
        if not isinstance(sequences, (list, tuple)):
            raise InvalidInputError("sequences must be a list of {event_types, features} objects")
        types, feats = [], []
        for i, seq in enumerate(sequences):
            if not isinstance(seq, Mapping):
                raise InvalidInputError("a sequence must be an object with event_types and features", row=i)
            try:
                types.append(seq["event_types"])
                feats.append(seq["features"])
            except KeyError as exc:
                raise InvalidInputError(f"missing field {exc.args[0]!r}", row=i) from None
        return self.predict_columns(campaign_id, types, feats)

    def predict_batch(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Probabilities ``float64[N]``, in row order, of rows mixing campaigns
        (dicts with ``campaign_id``, ``event_types``, ``features``)."""
        if not isinstance(rows, (list, tuple)):
            raise InvalidInputError("rows must be a list of {campaign_id, event_types, features} objects")
        ids, types, feats = [], [], []
        for i, r in enumerate(rows):
            if not isinstance(r, Mapping):
                raise InvalidInputError("a row must be an object with campaign_id, event_types and features", row=i)
            try:
                ids.append(r["campaign_id"])
                types.append(r["event_types"])
                feats.append(r["features"])
            except KeyError as exc:
                raise InvalidInputError(f"missing field {exc.args[0]!r}", row=i) from None
        return self.predict_columns(ids, types, feats)

    def predict_columns(
        self,
        campaign_ids: str | Sequence[str],
        event_types: Sequence[Any],
        features: Sequence[Any],
    ) -> np.ndarray:
        """Probabilities ``float64[N]`` (``predict``, ``predict_batch`` call it): the
        ``probabilities`` of :meth:`predict_with_status`, the one scoring path.

        ``campaign_ids`` is one id for every row or one id per row; ``event_types[i]`` integers
        (length ``T_i``); ``features[i]`` ``T_i * num_features`` floats (flat) per row. Lists or
        numpy arrays. Returns ``float64[N]``.
        """
        return self.predict_with_status(campaign_ids, event_types, features).probabilities

    def predict_with_status(
        self,
        campaign_ids: str | Sequence[str],
        event_types: Sequence[Any],
        features: Sequence[Any],
    ) -> Prediction:
        """The one scoring path (``predict_columns``, HTTP, pyfunc and CLI call it): the arguments of
        :meth:`predict_columns`; returns a :class:`Prediction`: the probabilities plus, per row,
        whether its head is a fallback (did not pass its quality gate) and each campaign's status.
        """
        try:
            n = len(event_types)
            if not isinstance(campaign_ids, str):
                campaign_ids = list(campaign_ids)  # positional access, whatever the container
            same = len(features) == n and (isinstance(campaign_ids, str) or len(campaign_ids) == n)
        except TypeError:
            raise InvalidInputError(
                "campaign_ids (a string or one per row), event_types and features must be lists"
            ) from None
        if not same:
            raise InvalidInputError("campaign_ids, event_types and features must have the same number of rows")
        # campaign ids -> distinct ids (U) + per-row index into them
        first_row: dict[str, int] = {}  # distinct id -> first row using it (for error messages)
        if isinstance(campaign_ids, str):
            distinct, inverse = [_check_id(campaign_ids, None)], torch.zeros(n, dtype=torch.long)
        else:
            inverse_np = np.empty(n, dtype=np.int64)
            for i, cid in enumerate(campaign_ids):
                k = first_row.get(cid) if isinstance(cid, str) else None
                if k is None:
                    first_row[_check_id(cid, i)] = i
                    k = i
                inverse_np[i] = k  # first row of this id, renumbered below
            distinct = list(first_row)
            renumber = np.zeros(n, dtype=np.int64)
            renumber[list(first_row.values())] = np.arange(len(distinct))
            inverse = torch.from_numpy(renumber[inverse_np])  # (B,) index into the U heads
        types, feats = self._validate_sequences(event_types, features, campaign_ids)
        with torch.inference_mode():
            heads, statuses = self._heads(distinct, first_row)  # (U, P); raises for an unknown campaign
            failed = np.array([not head_passed(st) for st in statuses], dtype=bool)  # (U,)
            verdicts = dict(zip(distinct, statuses))
            if n == 0:
                return Prediction(np.zeros(0, dtype=np.float64), np.zeros(0, dtype=bool), verdicts)
            h = self._features(types, feats)  # (B, H), or (B, 2H) for a pooled design
            logits = head_logits(self.head_config.head, h, heads, self.head_config.head_rank, index=inverse)  # (B,)
            probs = torch.sigmoid(logits).numpy().astype(np.float64)
        if not np.isfinite(probs).all():  # finite float32 inputs can still overflow inside the RNN
            row = int(np.flatnonzero(~np.isfinite(probs))[0])
            raise InvalidInputError("the model output is not finite for these features (values too large?)", row=row)
        return Prediction(probs, failed[inverse.numpy()], verdicts)

    def _validate_sequences(self, event_types, features, campaign_ids) -> tuple[list[np.ndarray], list[np.ndarray]]:
        num_types, num_feats, max_len = self.config.num_event_types, self.config.num_features, self.max_sequence_length
        types_out, feats_out = [], []

        def bad(reason: str, i: int) -> InvalidInputError:
            cid = campaign_ids if isinstance(campaign_ids, str) else campaign_ids[i]
            return InvalidInputError(reason, row=i, campaign_id=cid)

        for i, (t, f) in enumerate(zip(event_types, features)):
            t = _as_array(t)
            if t is None or t.ndim != 1 or (t.dtype.kind not in "iu" and len(t)):
                raise bad("event_types must be a list of integers", i)
            length = len(t)
            if not 1 <= length <= max_len:
                raise bad(f"sequence length {length} outside [1, {max_len}]", i)
            if t.min() < 0 or t.max() >= num_types:
                raise bad(f"event types must lie in [0, {num_types})", i)
            f = _as_array(f)
            if f is None or f.ndim != 1 or (f.dtype.kind not in "iuf" and len(f)):
                raise bad("features must be a flat list of numbers", i)
            if len(f) != length * num_feats:
                raise bad(f"features has {len(f)} values, expected T*num_features = {length}*{num_feats}", i)
            with np.errstate(over="ignore", invalid="ignore"):
                f = f.astype(np.float32, copy=False)
            if not np.isfinite(f).all():
                raise bad("features must be finite float32 numbers (no NaN, inf or |x| > 3.4e38)", i)
            types_out.append(t)
            feats_out.append(f)
        return types_out, feats_out

    def _features(self, types: list[np.ndarray], feats: list[np.ndarray]) -> torch.Tensor:
        """Backbone features ``(B, W)`` (``W = feature_width(self.head_config)``): rows sorted by length, run in
        chunks, scattered back."""
        n = len(types)
        num_feats = self.config.num_features
        pooled = self.head_config.head in POOLED_DESIGNS
        if n <= BACKBONE_CHUNK and max(len(t) for t in types) <= 2 * min(len(t) for t in types):
            batch = collate(types, feats, num_feats)  # one call; padding at most 2x
            return self.backbone(batch.event_types, batch.features, batch.lengths, pooled)
        lengths = np.fromiter((len(t) for t in types), dtype=np.int64, count=n)
        order = np.argsort(lengths, kind="stable")
        h = torch.empty(n, feature_width(self.head_config))  # (B, W)
        for start in range(0, n, BACKBONE_CHUNK):
            idx = order[start : start + BACKBONE_CHUNK]
            batch = collate([types[i] for i in idx], [feats[i] for i in idx], num_feats)
            h[torch.from_numpy(idx)] = self.backbone(batch.event_types, batch.features, batch.lengths, pooled)
        return h


def _as_array(value: Any) -> np.ndarray | None:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        return None
    try:
        return np.asarray(value)
    except (ValueError, TypeError, OverflowError):
        return None


def _check_id(campaign_id: Any, row: int | None) -> str:
    try:
        return validate_campaign_id(campaign_id)
    except InvalidCampaignIdError as err:
        raise InvalidInputError(err.reason, row=row) from None


def resolve_model_uri(model_uri: str, tracking_uri: str | None = None) -> tuple[str, str | None, str | None]:
    """``models:/...`` -> ``(manifest_uri, version_id, manifest_sha256)`` through :mod:`fleet.registry`
    (imported lazily: MLflow is only loaded when a registry URI is used); another URI -> ``(uri, None, None)``."""
    try:
        from fleet.registry import resolve_version
    except ImportError as exc:
        raise StoreError(f"cannot resolve {model_uri}: fleet.registry is unavailable ({exc})") from None
    return resolve_version(model_uri, tracking_uri)


Reloader = Callable[["FleetModel | None"], "FleetModel | None"]


def alias_reloader(model_uri: str, tracking_uri: str | None = None, **open_kw: Any) -> Reloader:
    """A reload callable for :class:`fleet.http.ModelHolder`: ``reload(current)`` re-resolves
    ``model_uri`` and returns a newly opened model when it now names another version, else None.
    A plain version/manifest URI names an immutable version, so it never changes."""

    def reload(current: FleetModel | None) -> FleetModel | None:
        if not model_uri.startswith("models:"):
            return None if current is not None else FleetModel.load(model_uri, tracking_uri, **open_kw)
        manifest_uri, version_id, manifest_sha256 = resolve_model_uri(model_uri, tracking_uri)
        if current is not None and version_id is not None and current.version_id == version_id:
            return None
        model = FleetModel.open(manifest_uri, manifest_sha256=manifest_sha256, **open_kw)
        if current is not None and model.version_id == current.version_id:
            return None  # the version tag was missing, the manifest says: unchanged
        model.source_uri = model_uri
        return model

    return reload


__all__ = [
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_MAX_SEQUENCE_LENGTH",
    "ENV_STORAGE_OPTIONS",
    "FleetModel",
    "InvalidInputError",
    "Prediction",
    "alias_reloader",
    "head_metadata",
    "resolve_model_uri",
    "storage_options_from_env",
]
