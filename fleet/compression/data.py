"""Sequence batches: the tensors every teacher, backbone and head is called with (pure torch).

A :class:`SequenceBatch` holds its sequences *packed* (the events of all rows end to end), so the memory
of a campaign or a pooled sample follows its number of events, never rows x its longest row. Models get
right-padded tensors of small, length-bucketed minibatches (:meth:`SequenceBatch.minibatches`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: A length bucket pads to at most ``batch_size * BUCKET_SPREAD * median length`` events (one row that is
#: longer alone still gets its own minibatch), so a few very long rows cannot blow up a minibatch.
BUCKET_SPREAD = 8


class SequenceBatch:
    """A batch of variable-length event sequences.

    Stored packed: ``packed_types`` ``LongTensor[E]`` and ``packed_features`` ``FloatTensor[E, F]`` hold the
    ``E = lengths.sum()`` events of all rows end to end, row ``i``'s from ``offsets[i]``.

    Args (the padded form, as models take it; :meth:`packed` builds one without padding):
        event_types: ``LongTensor[B, T]`` event type ids (entries after ``lengths`` are ignored).
        features: ``FloatTensor[B, T, F]`` numeric features per event (entries after ``lengths`` ignored).
        lengths: ``LongTensor[B]`` number of valid events per sequence (>= 1).
        labels: ``FloatTensor[B]`` observed outcome in {0, 1}, NaN where unknown.
    """

    def __init__(self, event_types: torch.Tensor, features: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor):
        valid = torch.arange(event_types.shape[1]) < lengths[:, None]  # (B, T)
        self._set(event_types[valid], features[valid], lengths, labels)

    @classmethod
    def packed(
        cls, packed_types: torch.Tensor, packed_features: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor
    ) -> SequenceBatch:
        """A batch from its events end to end: ``(E,)`` types, ``(E, F)`` features, ``(B,)`` lengths and labels."""
        batch = cls.__new__(cls)
        batch._set(packed_types, packed_features, lengths, labels)
        return batch

    def _set(self, packed_types, packed_features, lengths, labels) -> None:
        if packed_types.dim() != 1 or packed_features.dim() != 2 or len(packed_types) != len(packed_features):
            raise ValueError(
                f"packed types (E,) and features (E, F) expected, got {tuple(packed_types.shape)} "
                f"and {tuple(packed_features.shape)}"
            )
        if int(lengths.sum()) != len(packed_types):
            raise ValueError(f"lengths add up to {int(lengths.sum())}, but {len(packed_types)} events are given")
        self.packed_types, self.packed_features = packed_types, packed_features
        self.lengths, self.labels = lengths, labels
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])  # (B + 1,)

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.packed_features.shape[1])

    def _padded_index(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(row, position)`` of every packed event, ``(E,)`` each, and the padded width ``T`` (>= 1)."""
        rows = torch.repeat_interleave(torch.arange(len(self)), self.lengths)  # (E,)
        position = torch.arange(len(self.packed_types)) - self.offsets[:-1][rows]  # (E,)
        return rows, position, max(int(self.lengths.max()) if len(self) else 1, 1)

    @property
    def event_types(self) -> torch.Tensor:
        """``LongTensor[B, T]``, right-padded with 0 to the batch's longest sequence (built on each access)."""
        rows, position, t_max = self._padded_index()
        out = torch.zeros(len(self), t_max, dtype=self.packed_types.dtype)
        out[rows, position] = self.packed_types
        return out

    @property
    def features(self) -> torch.Tensor:
        """``FloatTensor[B, T, F]``, right-padded with 0 to the batch's longest sequence (built on each access)."""
        rows, position, t_max = self._padded_index()
        out = torch.zeros(len(self), t_max, self.num_features, dtype=self.packed_features.dtype)
        out[rows, position] = self.packed_features
        return out

    def select(self, index: torch.Tensor | slice) -> SequenceBatch:
        """Rows ``index`` of the batch (packed too: padded only to their own longest when a model takes them)."""
        index = torch.arange(len(self))[index] if isinstance(index, slice) else torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = torch.nonzero(index).flatten()
        lengths = self.lengths[index]
        starts = self.offsets[:-1][index]  # (b,) where each selected row starts in the packed events
        new_starts = torch.cumsum(lengths, 0) - lengths  # (b,) where it starts in the selection
        events = torch.repeat_interleave(starts - new_starts, lengths) + torch.arange(int(lengths.sum()))  # (e,)
        return SequenceBatch.packed(
            self.packed_types[events], self.packed_features[events], lengths, self.labels[index]
        )

    @staticmethod
    def concat(batches: Sequence[SequenceBatch]) -> SequenceBatch:
        """The rows of ``batches`` one after another (no padding: memory follows the number of events)."""
        return SequenceBatch.packed(
            torch.cat([b.packed_types for b in batches]),
            torch.cat([b.packed_features for b in batches]),
            torch.cat([b.lengths for b in batches]),
            torch.cat([b.labels for b in batches]),
        )

    def minibatches(self, batch_size: int, *, sort_by_length: bool = True):
        """Yield ``(index, sub-batch)`` of consecutive rows: at most ``batch_size`` rows and, unless one row
        is longer alone, at most ``batch_size * BUCKET_SPREAD * median length`` padded events, so the memory
        of a minibatch follows the typical length, not the longest row.

        With ``sort_by_length`` rows are grouped by length first (length buckets: little padding); the order
        of rows within the yielded batches is then not the input order, so callers that need it use the
        yielded ``index`` to scatter results back.
        """
        order = torch.argsort(self.lengths, stable=True) if sort_by_length else torch.arange(len(self))
        for start, stop in _bucket_bounds(self.lengths[order].numpy(), batch_size):
            index = order[start:stop]
            yield index, self.select(index)


def _bucket_bounds(lengths: np.ndarray, batch_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of consecutive runs of ``lengths`` (B,): at most ``batch_size`` rows, and at most
    ``batch_size * BUCKET_SPREAD * median`` events once padded to the run's longest (a longer row alone)."""
    if not len(lengths):
        return []
    budget = batch_size * BUCKET_SPREAD * max(1, int(np.median(lengths)))
    bounds, start, longest = [], 0, 0
    for i, n in enumerate(lengths.tolist()):
        wider = max(longest, n)
        if i > start and (i - start == batch_size or (i - start + 1) * wider > budget):
            bounds.append((start, i))
            start, wider = i, n
        longest = wider
    bounds.append((start, len(lengths)))
    return bounds


def collate(
    event_types: Sequence[np.ndarray],
    features: Sequence[np.ndarray],
    num_features: int,
    labels: Sequence[float | None] | None = None,
) -> SequenceBatch:
    """Pack a list of sequences into a :class:`SequenceBatch`.

    ``event_types[i]`` has shape ``(T_i,)``; ``features[i]`` is flat, shape ``(T_i * num_features,)``
    (the events contract) or already ``(T_i, num_features)``.
    """
    batch = len(event_types)
    lengths = np.fromiter((len(e) for e in event_types), dtype=np.int64, count=batch)
    types = np.concatenate([np.asarray(t, dtype=np.int64) for t in event_types]) if batch else np.zeros(0, np.int64)
    feats = (
        np.concatenate([np.asarray(f, dtype=np.float32).reshape(-1) for f in features])
        if batch
        else np.zeros(0, np.float32)
    ).reshape(-1, num_features)
    if labels is None:
        labels_out = np.full(batch, np.nan, dtype=np.float32)
    else:
        labels_out = np.array([np.nan if v is None else float(v) for v in labels], dtype=np.float32)
    return SequenceBatch.packed(
        torch.from_numpy(types),
        torch.from_numpy(np.ascontiguousarray(feats)),
        torch.from_numpy(lengths),
        torch.from_numpy(labels_out),
    )


def last_valid(outputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Pick each sequence's output at its last valid step: ``(B, T, H), (B,) -> (B, H)``."""
    index = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, outputs.shape[-1])  # (B, 1, H)
    return outputs.gather(1, index).squeeze(1)


@torch.no_grad()
def map_minibatches(fn, batch: SequenceBatch, batch_size: int = 512) -> torch.Tensor:
    """``fn(event_types, features, lengths) -> (b, ...)`` over length-bucketed minibatches of ``batch``
    (:meth:`SequenceBatch.minibatches`), results scattered back into input row order: ``(B, ...)``."""
    outputs, indices = [], []
    for index, sub in batch.minibatches(batch_size, sort_by_length=True):
        outputs.append(fn(sub.event_types, sub.features, sub.lengths))
        indices.append(index)
    if not outputs:
        return torch.empty(0)
    stacked = torch.cat(outputs)
    out = torch.empty_like(stacked)
    out[torch.cat(indices)] = stacked
    return out
