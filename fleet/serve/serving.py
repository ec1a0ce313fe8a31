"""Serving a fleet version in-process: :class:`FleetModel` (backbone resident, heads in a bounded LRU).

``FleetModel.open(<manifest uri>)`` or ``FleetModel.load("models:/adfleet@champion")``, then
``predict(campaign_id, sequences)`` or the mixed-campaign ``predict_batch(rows)``. Every entry
point (HTTP, MLflow pyfunc, CLI) goes through :meth:`FleetModel.predict_with_status`
(:meth:`FleetModel.predict_columns` returns its probabilities; it also flags the heads that did not
pass their quality gate, :func:`fleet.formats.codec.head_passed`). It scores a
mixed-campaign batch the S-LoRA / Punica way: the backbone runs once over all sequences (sorted
by length, padded per chunk), then each row's head row is gathered into ``(B, P)`` and
:func:`fleet.compression.student.head_logits` is called once. Everything after the backbone (heads, head formulas,
sigmoid) runs on numpy arrays: no torch dispatch per request. See ``docs/serving.md``.
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

from fleet.compression.data import collate
from fleet.compression.numpy_backbone import NumpyBackbone
from fleet.compression.student import (
    POOLED_DESIGNS,
    StudentConfig,
    feature_width,
    head_logits,
    head_logits_cross,
    head_num_params,
    ladder_config,
    widen_heads,
)
from fleet.core.errors import (
    FleetError,
    InvalidCampaignIdError,
    StoreError,
    UnknownCampaignError,
)
from fleet.core.ids import encode_campaign_ids, validate_campaign_id
from fleet.formats.backbone_codec import decode_backbone
from fleet.formats.codec import HeadRow, block_spans, head_passed, table_to_heads
from fleet.formats.heads import decode_heads
from fleet.serve.head_table import HeadTable
from fleet.storage.store import (
    BACKBONE,
    FleetVersion,
    join_uri,
    storage_options_from_env,
)

try:  # the per-campaign agreement / calibration fields of a head row (fleet-heads/1.1)
    from fleet.compression.metrics import CALIBRATION_KEYS
except ImportError:  # pragma: no cover - an older fleet.compression.metrics
    CALIBRATION_KEYS: tuple[str, ...] = ()

DEFAULT_CACHE_SIZE = 100_000
#: How heads are kept (``FleetModel.open(heads=...)``): ``"resident"`` (every head in memory, quantized:
#: :class:`fleet.serve.head_table.HeadTable`), ``"lru"`` (read a row group on first use, dequantized rows in a
#: bounded LRU) or ``"dense"`` (every head dequantized at open, ``Tensor[C, P]``; what ``preload=True`` asks).
HEAD_MODES = ("resident", "lru", "dense")
DEFAULT_HEADS = "resident"
#: How the backbone runs (``FleetModel.open(backend=...)``): ``"numpy"`` (:class:`fleet.compression.numpy_backbone.NumpyBackbone`,
#: the same features to float32 rounding) or ``"torch"`` (:class:`fleet.compression.student.SharedBackbone`). The default
#: is chosen from ``infra/sizing/measure_numpy_backbone.py`` (docs/serving.md, "Backbone backend").
BACKENDS = ("torch", "numpy")
DEFAULT_BACKEND = "numpy"
#: Campaigns per head evaluation of :meth:`FleetModel.score_campaigns` (bounds its memory: ``B x chunk x H`` floats).
SCORE_CHUNK = 16_384
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
    block (table, centroids, seed ...: :attr:`fleet.compression.weightless.WeightlessBlock.nbytes` / rows), rounded."""
    own = len(row.packed) + len(row.scales) + (len(row.mask) if row.mask is not None else 0)
    if row.block is not None:
        own += round(row.block.nbytes / row.block.rows)
    return own


def head_metadata(row: HeadRow, version_id: str) -> dict:
    """JSON-safe metadata of one head row (no parameters): bits, status, ``passed`` (the quality gate
    verdict, :func:`fleet.formats.codec.head_passed`), fidelity, sizes, hashes, and every
    :data:`fleet.compression.metrics.CALIBRATION_KEYS` field (None when the row has no value)."""
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
            (:func:`fleet.formats.codec.head_passed` of its status is False); its probability is still given.
        statuses: distinct campaign id -> its head's ``status``, in order of first use.
    """

    probabilities: np.ndarray
    fallback: np.ndarray
    statuses: dict[str, str]

    @property
    def fallback_campaigns(self) -> list[str]:
        """Campaign ids of the request whose heads did not pass their gate, in order of first use."""
        return [cid for cid, status in self.statuses.items() if not head_passed(status)]


@dataclass(frozen=True)
class CampaignScores:
    """What :meth:`FleetModel.score_campaigns` returns: one sequence scored by many campaigns' heads.

    Unpacks as ``ids, probabilities = model.score_campaigns(...)``.

    Attributes:
        ids: the scored campaign ids: with ``top_k``, the ``k`` best, highest probability first (ties in
            request order); without, every requested id the version holds, in request order (duplicates
            once), or every campaign of the version in id order when no ids were given.
        probabilities: ``float64[K]``, aligned with ``ids``.
        fallback: ``bool[K]``: True where that campaign's head did not pass its quality gate
            (:func:`fleet.formats.codec.head_passed`); its probability is still given.
        unknown: requested ids the version does not hold, in request order (duplicates once). They are
            not scored and do not fail the call.
    """

    ids: list[str]
    probabilities: np.ndarray
    fallback: np.ndarray
    unknown: list[str]

    def __iter__(self):
        return iter((self.ids, self.probabilities))

    @property
    def fallback_campaigns(self) -> list[str]:
        """The scored ids whose heads did not pass their gate, in ``ids`` order."""
        return [cid for cid, bad in zip(self.ids, self.fallback.tolist()) if bad]


@dataclass(frozen=True)
class CampaignScoresBatch:
    """What :meth:`FleetModel.score_campaigns_batch` returns: ``B`` sequences x ``K`` campaigns.

    Attributes:
        ids: the ``K`` scored campaign ids (columns): every requested id the version holds, in request
            order (duplicates once), or every campaign of the version in id order when no ids were given.
        probabilities: ``float64[B, K]``: row ``b`` is sequence ``b``, column ``k`` campaign ``ids[k]``.
        fallback: ``bool[K]``: True where that campaign's head did not pass its quality gate.
        unknown: requested ids the version does not hold, in request order (duplicates once).
    """

    ids: list[str]
    probabilities: np.ndarray
    fallback: np.ndarray
    unknown: list[str]

    def row(self, b: int, top_k: int | None = None) -> CampaignScores:
        """Sequence ``b``'s scores as :meth:`FleetModel.score_campaigns` gives them (``top_k`` as there)."""
        order = _top(self.probabilities[b], top_k)
        ids = self.ids if order is None else [self.ids[i] for i in order.tolist()]
        sel = slice(None) if order is None else order
        return CampaignScores(
            list(ids), self.probabilities[b][sel].copy(), self.fallback[sel].copy(), list(self.unknown)
        )


def _top(probabilities: np.ndarray, top_k: int | None) -> np.ndarray | None:
    """Indices of the ``top_k`` highest probabilities, best first, ties in index order (None: all, as they are)."""
    if top_k is None:
        return None
    k = min(int(top_k), len(probabilities))
    if k < len(probabilities) // 4:  # partial selection, then a stable sort of the candidates
        kth = np.partition(-probabilities, k - 1)[k - 1] if k else np.inf
        candidates = np.flatnonzero(-probabilities <= kth)
        return candidates[np.argsort(-probabilities[candidates], kind="stable")][:k]
    return np.argsort(-probabilities, kind="stable")[:k]


def _check_top_k(top_k: Any) -> int | None:
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise InvalidInputError(f"top_k must be an integer >= 1, got {top_k!r}")
    return int(top_k)


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
    """One fleet version ready to score: backbone resident, heads resident quantized (or read on first use).

    Build it with :meth:`open` (a version or manifest URI) or :meth:`load` (also ``models:/``
    URIs). All methods are thread-safe; ``predict*`` run under ``torch.inference_mode`` (no autograd
    bookkeeping: ~15% off a backbone forward, measured).

    Args (of :meth:`open`):
        heads: ``"resident"`` (default: every head in memory in its quantized form, read once at open,
            dequantized per request: :class:`fleet.serve.head_table.HeadTable`), ``"lru"`` (a head's row group
            is read on first use, dequantized rows kept in a bounded LRU) or ``"dense"`` (= ``preload``).
        cache_size: heads kept dequantized in the LRU (0 disables caching); ``heads="lru"`` only.
        preload: decode every head at open into one dense ``Tensor[C, P]`` (no LRU, no I/O per
            request). Memory: ``4 * P * C`` bytes plus an id dict. Same as ``heads="dense"``.
        max_sequence_length: longest accepted sequence (events per sequence).
        backend: how the backbone runs: ``"numpy"`` (default, :data:`DEFAULT_BACKEND`: the pure-numpy
            forward of :mod:`fleet.compression.numpy_backbone`) or ``"torch"`` (the decoded ``SharedBackbone``). Both give
            the same features to float32 rounding (tested to 1e-5); ``model.backbone`` is the torch module either way.
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
        heads: str | None = None,
        backend: str | None = None,
    ):
        mode = _head_mode(heads, preload)
        backend = DEFAULT_BACKEND if backend is None else backend
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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
        self.backend = backend
        self._numpy_backbone = (
            NumpyBackbone.from_state_dict(backbone.state_dict(), arch=self.config.arch) if backend == "numpy" else None
        )
        self.head_config, self.num_params = self._head_layout(version)
        self._columns = self._widened_columns()  # head size -> (source, target, length) runs into (M, P)
        self._cache = _HeadCache(cache_size, self.num_params)
        self._absent = _BoundedSet(ABSENT_CACHE_SIZE)
        self._dense: torch.Tensor | None = None  # preload: (C, P)
        self._index: dict[str, int] | None = None
        self._status_codes: np.ndarray | None = None  # preload: (C,) index into _status_names
        self._status_names: list[str] = []
        self._dense_ids: list[str] = []
        self._table: HeadTable | None = None  # resident: every head, quantized
        if mode == "resident" and version.manifest.get("heads_codec", "packed") == "bloomier":
            mode = "dense"  # a bloomier row decodes only within its block: such a version is held decoded
        self.heads_mode = mode
        if mode == "dense":
            self._preload()
        elif mode == "resident":
            base = head_num_params(self.config)
            self._table = HeadTable.from_version(version, sorted({base, self.num_params}))
            self._failed_codes = np.array([not head_passed(st) for st in self._table.status_names], dtype=bool)

    # -------------------------------------------------------------- construction

    def _head_layout(self, version: FleetVersion) -> tuple[StudentConfig, int]:
        """The head design every campaign is scored with and its row size ``P``: the backbone's, or the
        capacity ladder's next design when the version holds such heads (the manifest's
        ``campaigns.num_params_max``, written by :class:`fleet.storage.store.VersionWriter`); smaller rows are
        widened to it with zeros (:func:`fleet.compression.student.widen_heads`), which leaves their logits as they are."""
        base, bigger = self.config, ladder_config(self.config)
        widest = version.manifest["campaigns"].get("num_params_max") or head_num_params(base)
        allowed = {head_num_params(base): base, **({head_num_params(bigger): bigger} if bigger else {})}
        if widest not in allowed:
            raise StoreError(
                f"campaigns.num_params_max {widest!r} fits neither the backbone's {base.head!r} head nor "
                "its capacity ladder",
                path=version.manifest_uri,
            )
        return allowed[widest], widest

    def _widened_columns(self) -> dict[int, tuple[tuple[int, int, int], ...]]:
        """Head size -> where its parameters go in a ``(M, P)`` head buffer, as runs ``(source, target, length)``
        (:meth:`fleet.serve.head_table.HeadTable.decode_into`): the backbone's own design widened to the version's as
        :func:`fleet.compression.student.widen_heads` does it (read off one widened row of 1..size), so the resident table
        decodes straight into place. Sizes equal to ``P`` are absent (their columns are the first ``P``)."""
        base = head_num_params(self.config)
        if base == self.num_params:
            return {}
        probe = widen_heads(torch.arange(1, base + 1, dtype=torch.float32)[None], self.config, self.head_config)[
            0
        ].numpy()  # (P,): 1-based source position, 0 where widened
        target = np.flatnonzero(probe)
        source = probe[target].astype(np.int64) - 1
        breaks = np.flatnonzero((np.diff(target) != 1) | (np.diff(source) != 1)) + 1
        runs = tuple((int(s[0]), int(t[0]), len(s)) for s, t in zip(np.split(source, breaks), np.split(target, breaks)))
        return {base: runs}

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
        heads: str | None = None,
        backend: str | None = None,
    ) -> FleetModel:
        """Open a committed version (its directory or ``manifest.json`` URI).

        ``storage_options`` None reads ``$FLEET_STORAGE_OPTIONS`` (JSON) when set. ``manifest_sha256``
        (the registry's tag, passed by :meth:`load`): a manifest with another sha256 is refused.
        ``heads``: ``"resident"`` (default), ``"lru"`` or ``"dense"``; ``backend``: ``"numpy"`` (default) or
        ``"torch"`` (see the class).
        """
        mode = _head_mode(heads, preload)
        if storage_options is None:
            storage_options = storage_options_from_env()
        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
        # resident and dense read (and verify) the backbone and every heads part anyway
        version = FleetVersion.open(
            manifest_or_version_uri, storage_options, verify=verify and mode == "lru", manifest_sha256=manifest_sha256
        )
        return cls(version, cache_size=cache_size, max_sequence_length=max_sequence_length, heads=mode, backend=backend)

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
        self._dense_ids = ids

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
        """``{"hits", "misses", "size", "capacity", "preloaded", "heads"}`` of the heads in memory:
        ``heads`` is the mode (``resident``, ``lru``, ``dense``); resident and dense hold every head
        (size = capacity = campaigns, no misses; ``preloaded`` is True for dense), and for resident
        ``resident_bytes`` is the table's size."""
        if self._dense is not None:
            return {
                "hits": self._cache.hits,
                "misses": 0,
                "size": int(self._dense.shape[0]),
                "capacity": int(self._dense.shape[0]),
                "preloaded": True,
                "heads": "dense",
            }
        if self._table is not None:
            return {
                "hits": self._cache.hits,
                "misses": 0,
                "size": len(self._table),
                "capacity": len(self._table),
                "preloaded": False,
                "heads": "resident",
                "resident_bytes": self._table.nbytes,
            }
        return {
            "hits": self._cache.hits,
            "misses": self._cache.misses,
            "size": len(self._cache),
            "capacity": self._cache.capacity,
            "preloaded": False,
            "heads": "lru",
        }

    def __repr__(self) -> str:
        return f"FleetModel(version={self.version_id!r}, campaigns={self.num_campaigns}, uri={self.source_uri!r})"

    # -------------------------------------------------------------- heads

    def _decode(self, rows: Sequence[HeadRow]) -> torch.Tensor:
        """Dequantized, widened heads ``(M, P)`` of stored rows (LRU and dense)."""
        base = head_num_params(self.config)
        for r in rows:
            if r.num_params not in (base, self.num_params):
                raise StoreError(
                    f"head has {r.num_params} parameters but the backbone's {self.config.head!r} "
                    f"head needs {base} (or {self.num_params}, its capacity ladder)",
                    campaign_id=r.campaign_id,
                    path=self._version.uri,
                )
        parts = []
        for size in {r.num_params for r in rows}:
            picked = [i for i, r in enumerate(rows) if r.num_params == size]
            try:
                decoded = decode_heads([rows[i] for i in picked]).reshape(len(picked), size).float()
            except (ValueError, RuntimeError, IndexError) as err:  # rows were checked: a stored row is bad
                raise StoreError(
                    f"head does not decode: {err}",
                    campaign_id=_undecodable(rows, picked).campaign_id,
                    path=self._version.uri,
                ) from None
            parts.append((picked, size, decoded))
        return self._widen(len(rows), parts, lambda i: rows[i].campaign_id)

    def _widen(self, count: int, parts, campaign_of: Callable[[int], str]) -> torch.Tensor:
        """Heads ``(count, P)`` from decoded pieces ``[(positions, size, Tensor[n, size])]``: rows of the
        backbone's own design widened to the version's (:func:`fleet.compression.student.widen_heads`, same logits);
        a non-finite parameter is a StoreError naming ``campaign_of(position)``."""
        base = head_num_params(self.config)
        if len(parts) == 1 and parts[0][1] == self.num_params and len(parts[0][0]) == count:
            picked, _, heads = parts[0]  # one format: its rows in order (positions are 0..count-1, ascending)
        else:
            heads = torch.empty(count, self.num_params)  # (M, P), smaller designs widened
            for picked, size, decoded in parts:
                heads[picked] = widen_heads(
                    decoded, self.config if size == base else self.head_config, self.head_config
                )
        if not torch.isfinite(heads).all():
            bad = campaign_of(int((~torch.isfinite(heads)).any(1).nonzero()[0]))
            raise StoreError("head decodes to non-finite parameters", campaign_id=bad, path=self._version.uri)
        return heads

    def _resident_heads(self, rows: np.ndarray) -> np.ndarray:
        """Heads float32 ``(M, P)`` of rows of the resident table, dequantized now (vectorised per format) and
        widened in place. Finite: the table checked every scale and float16 value at open."""
        out = np.zeros((len(rows), self.num_params), dtype=np.float32)  # (M, P)
        try:
            self._table.decode_into(rows, out, self._columns)
        except StoreError as err:
            raise StoreError(err.reason, campaign_id=err.campaign_id, path=self._version.uri) from None
        return out

    def _heads(self, ids: list[str], first_row: dict[str, int]) -> tuple[np.ndarray, list[str]]:
        """Head rows ``(U, P)`` and head statuses of distinct valid ``ids`` (both from the same cache
        entry, resident table or preloaded index: no extra I/O); UnknownCampaignError for an absent one."""
        heads, statuses, _, _ = self._lookup(ids, first_row, strict=True)
        return heads, statuses

    def _lookup(
        self,
        ids: list[str],
        first_row: dict[str, int] | None = None,
        *,
        strict: bool = False,
        statuses: bool = True,
        encoded: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[str] | None, np.ndarray, np.ndarray]:
        """``(heads float32 (M, P), statuses [M], found int64[M], failed bool[M])`` of the distinct valid ``ids``
        the version holds (``found`` indexes ``ids``, in order; ``failed``: the head did not pass its gate).
        ``strict``: UnknownCampaignError for the first absent id instead (naming its row from ``first_row``).
        ``statuses=False``: None instead of the list (the resident table then builds no strings).
        ``encoded``: the ids already as :func:`fleet.core.ids.encode_campaign_ids` bytes (resident: not encoded again)."""
        first_row = first_row or {}
        if self._table is not None:
            rows = self._table.find(ids if encoded is None else encoded)
            found = np.flatnonzero(rows >= 0)
            if strict and len(found) < len(ids):
                cid = ids[int(np.flatnonzero(rows < 0)[0])]
                raise self._unknown(cid, first_row.get(cid))
            self._cache.count_hits(len(found))
            rows = rows[found]
            return (
                self._resident_heads(rows),
                self._table.statuses(rows) if statuses else None,
                found,
                self._failed_codes[self._table.status[rows]],
            )
        with torch.inference_mode():
            heads, names, found = self._lookup_lru_or_dense(ids, first_row, strict)
        return heads.numpy(), names, found, np.array([not head_passed(st) for st in names], dtype=bool)

    def _lookup_lru_or_dense(
        self, ids: list[str], first_row: dict[str, int], strict: bool
    ) -> tuple[torch.Tensor, list[str], np.ndarray]:
        if self._dense is not None:
            index, found = [], []
            for k, cid in enumerate(ids):
                i = self._index.get(cid)
                if i is None:
                    if strict:
                        raise self._unknown(cid, first_row.get(cid))
                    continue
                index.append(i)
                found.append(k)
            self._cache.count_hits(len(index))
            names = self._status_names
            return (
                self._dense[index],
                [names[c] for c in self._status_codes[index].tolist()],
                np.array(found, dtype=np.int64),
            )
        out = torch.empty(len(ids), self.num_params)  # (U, P)
        statuses: list = [None] * len(ids)
        missing = self._cache.gather(ids, out, statuses)
        absent: set[int] = set()
        if missing:
            rows, read = [], []
            for i in missing:
                cid = ids[i]
                row = None if cid in self._absent else self._version.read_head_row(cid)  # one row group
                if row is None:
                    self._absent.add(cid)
                    if strict:
                        raise self._unknown(cid, first_row.get(cid))
                    absent.add(i)
                    continue
                rows.append(row)
                read.append(i)
            if rows:
                decoded = self._decode(rows)  # (M, P)
                out[read] = decoded
                for i, row in zip(read, rows):
                    statuses[i] = sys.intern(row.status)
                self._cache.put([ids[i] for i in read], decoded, [statuses[i] for i in read])
        if not absent:
            return out, statuses, np.arange(len(ids), dtype=np.int64)
        found = np.array([i for i in range(len(ids)) if i not in absent], dtype=np.int64)
        return out[torch.from_numpy(found)], [statuses[i] for i in found.tolist()], found

    def head_status(self, campaign_id: str) -> str:
        """The ``status`` of a campaign's head (``"ok"``, ``"capacity"``, ``"fallback"``, ...), served
        from the head cache / preloaded index like the head itself (a cold id reads its row group once
        and caches the head). ``fleet.formats.codec.head_passed(status)`` says whether it passed its gate.
        UnknownCampaignError when the campaign is not in the version."""
        cid = _check_id(campaign_id, None)
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
        types, feats = _sequence_columns(sequences)
        return self.predict_columns(campaign_id, types, feats)

    def predict_batch(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Probabilities ``float64[N]``, in row order, of rows mixing campaigns
        (dicts with ``campaign_id``, ``event_types``, ``features``)."""
        ids, types, feats = _columns(rows, "row", ("campaign_id", "event_types", "features"))
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
            distinct, inverse = [_check_id(campaign_ids, None)], np.zeros(n, dtype=np.int64)
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
            inverse = renumber[inverse_np]  # (B,) index into the U heads
        types, feats = self._validate_sequences(event_types, features, campaign_ids)
        heads, statuses = self._heads(distinct, first_row)  # (U, P); raises for an unknown campaign
        failed = np.array([not head_passed(st) for st in statuses], dtype=bool)  # (U,)
        verdicts = dict(zip(distinct, statuses))
        if n == 0:
            return Prediction(np.zeros(0, dtype=np.float64), np.zeros(0, dtype=bool), verdicts)
        h = self._features(types, feats)  # (B, H), or (B, 2H) for a pooled design
        rows = heads if len(heads) == n == 1 else heads[inverse]  # (B, P): each row's head
        probs = _probabilities(head_logits(self.head_config.head, h, rows, self.head_config.head_rank))  # (B,)
        if not np.isfinite(probs).all():  # finite float32 inputs can still overflow inside the RNN
            row = int(np.flatnonzero(~np.isfinite(probs))[0])
            raise InvalidInputError("the model output is not finite for these features (values too large?)", row=row)
        return Prediction(probs, failed[inverse], verdicts)

    # -------------------------------------------------------------- one user, many campaigns

    def score_campaigns(
        self, sequence: Mapping[str, Any], campaign_ids: Sequence[str] | None = None, top_k: int | None = None
    ) -> CampaignScores:
        """Score ONE sequence (``{"event_types", "features"}``) with many campaigns' heads: the backbone
        runs once, then every requested head is evaluated in one batched head evaluation
        (:func:`fleet.compression.student.head_logits_cross`, the formulas of the per-row path). Returns a
        :class:`CampaignScores`, which unpacks as ``ids, probabilities``.

        ``campaign_ids``: the campaigns to score (duplicates scored once); None scores every campaign of
        the version (needs ``heads="resident"`` or ``"dense"``). Ids the version does not hold are listed
        in ``.unknown`` and do not fail the call; an invalid id is an :class:`InvalidInputError`.
        ``top_k``: keep the ``k`` highest probabilities, best first (None: all, in request order).
        Each probability equals ``predict(campaign_id, [sequence])`` (to float32 rounding).
        """
        top_k = _check_top_k(top_k)
        if not isinstance(sequence, Mapping):
            raise InvalidInputError("sequence must be an object with event_types and features")
        names, probs, failed, unknown = self._score([sequence], campaign_ids)
        order = _top(probs[0], top_k)
        if order is None:
            order = np.arange(probs.shape[1])
        return CampaignScores(names(order), probs[0][order], failed[order], unknown)

    def score_campaigns_batch(
        self, sequences: Sequence[Mapping[str, Any]], campaign_ids: Sequence[str] | None = None
    ) -> CampaignScoresBatch:
        """``B`` sequences x ``K`` campaigns (:meth:`score_campaigns` for many users at once): the backbone
        runs once over all sequences (chunked like :meth:`predict_batch`), the heads once over all of them.
        Returns a :class:`CampaignScoresBatch` (``probabilities (B, K)``; ``.row(b, top_k)`` gives one
        user's :class:`CampaignScores`)."""
        names, probs, failed, unknown = self._score(sequences, campaign_ids)
        return CampaignScoresBatch(names(np.arange(probs.shape[1])), probs, failed, unknown)

    def _score(
        self, sequences, campaign_ids
    ) -> tuple[Callable[[np.ndarray], list[str]], np.ndarray, np.ndarray, list[str]]:
        """``(names, probabilities (B, K), fallback bool[K], unknown)``: ``names(columns)`` gives the ids of
        columns (materialised only for what a caller returns: a million ids are not built for a top 10)."""
        types, feats = _sequence_columns(sequences)
        if campaign_ids is None:
            if self._table is None and self._dense is None:
                raise InvalidInputError(
                    "scoring every campaign (no campaign_ids) needs every head in memory: "
                    "open the model with heads='resident' (or 'dense')"
                )
            distinct, unknown, count = None, [], self._num_resident()
        else:
            if isinstance(campaign_ids, (str, bytes)) or not isinstance(campaign_ids, Sequence | np.ndarray):
                raise InvalidInputError("campaign_ids must be a list of campaign ids")
            distinct, encoded = _distinct_ids(campaign_ids)
            unknown, count = [], len(distinct)
        types, feats = self._validate_sequences(types, feats, None)
        b = len(types)
        known: list[str] = []
        chunks_p, chunks_f = [], []
        h = self._features(types, feats) if b else None  # (B, W): the one backbone pass
        for start in range(0, count, SCORE_CHUNK):
            stop = min(start + SCORE_CHUNK, count)
            if distinct is None:
                heads, failed = self._all_heads(start, stop)
            else:
                chunk = distinct[start:stop]
                heads, _, found, failed = self._lookup(chunk, statuses=False, encoded=encoded[start:stop])
                if len(found) == len(chunk):
                    known.extend(chunk)
                else:
                    found_set = set(found.tolist())
                    known.extend(chunk[i] for i in found.tolist())
                    unknown.extend(cid for i, cid in enumerate(chunk) if i not in found_set)
            if h is None or heads.shape[0] == 0:
                chunks_p.append(np.zeros((b, heads.shape[0]), dtype=np.float64))
            else:
                logits = head_logits_cross(self.head_config.head, h, heads, self.head_config.head_rank)  # (B, n)
                chunks_p.append(_probabilities(logits))
            chunks_f.append(failed)
        probs = np.concatenate(chunks_p, axis=1) if chunks_p else np.zeros((b, 0), dtype=np.float64)
        failed = np.concatenate(chunks_f) if chunks_f else np.zeros(0, dtype=bool)
        if not np.isfinite(probs).all():  # finite float32 inputs can still overflow inside the RNN
            row = int(np.flatnonzero(~np.isfinite(probs).all(1))[0])
            raise InvalidInputError("the model output is not finite for these features (values too large?)", row=row)
        if distinct is not None:
            return (lambda cols: [known[i] for i in cols.tolist()]), probs, failed, unknown
        if self._table is not None:
            return self._table.campaign_ids, probs, failed, unknown
        return (lambda cols: [self._dense_ids[i] for i in cols.tolist()]), probs, failed, unknown

    def _num_resident(self) -> int:
        return len(self._table) if self._table is not None else int(self._dense.shape[0])

    def _all_heads(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Heads ``(n, P)`` and fallback flags of the campaigns ``start:stop`` of the version (id order)."""
        self._cache.count_hits(stop - start)
        if self._table is not None:
            rows = np.arange(start, stop, dtype=np.int64)
            return self._resident_heads(rows), self._failed_codes[self._table.status[rows]]
        failed = np.array([not head_passed(st) for st in self._status_names], dtype=bool)
        return self._dense[start:stop].numpy(), failed[self._status_codes[start:stop]]

    def _validate_sequences(self, event_types, features, campaign_ids) -> tuple[list[np.ndarray], list[np.ndarray]]:
        num_types, num_feats, max_len = self.config.num_event_types, self.config.num_features, self.max_sequence_length
        types_out, feats_out = [], []

        def bad(reason: str, i: int) -> InvalidInputError:
            cid = campaign_ids if isinstance(campaign_ids, str) or campaign_ids is None else campaign_ids[i]
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

    def _features(self, types: list[np.ndarray], feats: list[np.ndarray]) -> np.ndarray:
        """Backbone features float32 ``(B, W)`` (``W = feature_width(self.head_config)``): rows sorted by length,
        run in chunks, scattered back."""
        n = len(types)
        pooled = self.head_config.head in POOLED_DESIGNS
        if self._numpy_backbone is not None:  # sorts by length itself and computes nothing for padding
            run = self._numpy_backbone.forward_ragged
            if n <= BACKBONE_CHUNK:
                return run(types, feats, pooled)
            h = np.empty((n, feature_width(self.head_config)), dtype=np.float32)  # (B, W)
            order = np.argsort(np.fromiter((len(t) for t in types), dtype=np.int64, count=n), kind="stable")
            for start in range(0, n, BACKBONE_CHUNK):  # bounds the (T, chunk, E+F) input buffer
                idx = order[start : start + BACKBONE_CHUNK]
                h[idx] = run([types[i] for i in idx.tolist()], [feats[i] for i in idx.tolist()], pooled)
            return h
        with torch.inference_mode():
            return self._torch_features(types, feats, pooled).numpy()

    def _torch_features(self, types: list[np.ndarray], feats: list[np.ndarray], pooled: bool) -> torch.Tensor:
        """:meth:`_features` with the torch backbone: ``(B, W)``."""
        n = len(types)
        num_feats = self.config.num_features
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


def _probabilities(logits: np.ndarray) -> np.ndarray:
    """``float64`` sigmoid of float32 logits (any shape); +-inf give 1 / 0, NaN stays NaN."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


def _distinct_ids(campaign_ids: Sequence[Any]) -> tuple[list[str], np.ndarray | None]:
    """``(ids, encoded)``: the campaign ids of a list, duplicates once, in order, and the same as fixed-width
    bytes (:func:`fleet.core.ids.encode_campaign_ids`: a thousand ids checked vectorised). When some entry is not a
    valid id, every id is checked on its own: the first invalid one is an InvalidInputError naming it."""
    ids = list(campaign_ids)
    encoded = encode_campaign_ids(ids)
    if encoded is None:
        for i, cid in enumerate(ids):
            try:
                validate_campaign_id(cid)
            except InvalidCampaignIdError as err:
                raise InvalidInputError(f"campaign_ids[{i}]: {err.reason}") from None
    distinct = list(dict.fromkeys(ids))
    if len(distinct) < len(ids) or encoded is None:
        encoded = np.array(distinct, dtype="S") if distinct else np.zeros(0, dtype="S1")
    return distinct, encoded


def _undecodable(rows: Sequence[HeadRow], picked: list[int]) -> HeadRow:
    """The first of ``rows[picked]`` that does not decode on its own (the one a failed batch decode names)."""
    for i in picked:
        try:
            decode_heads([rows[i]])
        except (ValueError, RuntimeError, IndexError):
            return rows[i]
    return rows[picked[0]]  # pragma: no cover - a batch fails only through one of its rows


def _head_mode(heads: str | None, preload: bool) -> str:
    """The head mode of ``open(heads=..., preload=...)``: ``preload=True`` is ``"dense"``."""
    if heads is None:
        return "dense" if preload else DEFAULT_HEADS
    if heads not in HEAD_MODES:
        raise ValueError(f"heads must be one of {HEAD_MODES}, got {heads!r}")
    if preload and heads != "dense":
        raise ValueError(f"preload=True keeps every head dense; it contradicts heads={heads!r}")
    return heads


def _as_array(value: Any) -> np.ndarray | None:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        return None
    try:
        return np.asarray(value)
    except (ValueError, TypeError, OverflowError):
        return None


def _sequence_columns(sequences: Any) -> tuple[list, list]:
    """``(event_types, features)`` columns of ``sequences`` (a list of ``{event_types, features}`` objects);
    :class:`InvalidInputError` naming the row otherwise."""
    types, feats = _columns(sequences, "sequence", ("event_types", "features"))
    return types, feats


def _columns(items: Any, noun: str, names: tuple[str, ...]) -> list[list]:
    """One list per field of ``names`` from ``items``, a list of objects holding those fields (each a ``noun``);
    :class:`InvalidInputError` naming the row of the first one that is not such an object or lacks a field."""
    if not isinstance(items, (list, tuple)):
        raise InvalidInputError(f"{noun}s must be a list of {{{', '.join(names)}}} objects")
    columns: list[list] = [[] for _ in names]
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise InvalidInputError(f"a {noun} must be an object with {', '.join(names[:-1])} and {names[-1]}", row=i)
        try:
            for column, name in zip(columns, names):
                column.append(item[name])
        except KeyError as exc:
            raise InvalidInputError(f"missing field {exc.args[0]!r}", row=i) from None
    return columns


def _check_id(campaign_id: Any, row: int | None) -> str:
    try:
        return validate_campaign_id(campaign_id)
    except InvalidCampaignIdError as err:
        raise InvalidInputError(err.reason, row=row) from None


def resolve_model_uri(model_uri: str, tracking_uri: str | None = None) -> tuple[str, str | None, str | None]:
    """``models:/...`` -> ``(manifest_uri, version_id, manifest_sha256)`` through :mod:`fleet.storage.registry`
    (imported lazily: MLflow is only loaded when a registry URI is used); another URI -> ``(uri, None, None)``."""
    try:
        from fleet.storage.registry import resolve_version
    except ImportError as exc:
        raise StoreError(f"cannot resolve {model_uri}: fleet.storage.registry is unavailable ({exc})") from None
    return resolve_version(model_uri, tracking_uri)


Reloader = Callable[["FleetModel | None"], "FleetModel | None"]


def alias_reloader(model_uri: str, tracking_uri: str | None = None, **open_kw: Any) -> Reloader:
    """A reload callable for :class:`fleet.serve.http_holder.ModelHolder`: ``reload(current)`` re-resolves
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
    "BACKENDS",
    "DEFAULT_BACKEND",
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_HEADS",
    "DEFAULT_MAX_SEQUENCE_LENGTH",
    "HEAD_MODES",
    "CampaignScores",
    "CampaignScoresBatch",
    "FleetModel",
    "InvalidInputError",
    "Prediction",
    "alias_reloader",
    "head_metadata",
    "resolve_model_uri",
    "storage_options_from_env",
]
