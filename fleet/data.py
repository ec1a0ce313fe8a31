"""Padded sequence batches: the tensors every teacher, backbone and head is called with (pure torch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SequenceBatch:
    """A batch of variable-length event sequences, right-padded with zeros.

    Args:
        event_types: ``LongTensor[B, T]`` event type ids, 0 after ``lengths``.
        features: ``FloatTensor[B, T, F]`` numeric features per event, 0 after ``lengths``.
        lengths: ``LongTensor[B]`` number of valid events per sequence (>= 1).
        labels: ``FloatTensor[B]`` observed outcome in {0, 1}, NaN where unknown.
    """

    event_types: torch.Tensor
    features: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def select(self, index: torch.Tensor | slice) -> SequenceBatch:
        """Rows ``index`` of the batch, trimmed to their own longest sequence."""
        lengths = self.lengths[index]
        t_max = int(lengths.max()) if lengths.numel() else 1
        return SequenceBatch(
            self.event_types[index][:, :t_max],
            self.features[index][:, :t_max],
            lengths,
            self.labels[index],
        )

    def minibatches(self, batch_size: int, *, sort_by_length: bool = True):
        """Yield consecutive sub-batches of at most ``batch_size`` rows.

        With ``sort_by_length`` rows are grouped by length first (less padding); the order of
        rows within the yielded batches is then not the input order, so callers that need it
        use the yielded ``index`` to scatter results back.
        """
        order = torch.argsort(self.lengths, stable=True) if sort_by_length else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            index = order[start : start + batch_size]
            yield index, self.select(index)


def collate(
    event_types: Sequence[np.ndarray],
    features: Sequence[np.ndarray],
    num_features: int,
    labels: Sequence[float | None] | None = None,
) -> SequenceBatch:
    """Pad a list of sequences into a :class:`SequenceBatch`.

    ``event_types[i]`` has shape ``(T_i,)``; ``features[i]`` is flat, shape ``(T_i * num_features,)``
    (the events contract) or already ``(T_i, num_features)``.
    """
    batch = len(event_types)
    lengths = np.fromiter((len(e) for e in event_types), dtype=np.int64, count=batch)
    t_max = max(int(lengths.max()) if batch else 1, 1)
    types_out = np.zeros((batch, t_max), dtype=np.int64)
    feats_out = np.zeros((batch, t_max, num_features), dtype=np.float32)
    for i, (types_i, feats_i) in enumerate(zip(event_types, features)):
        n = len(types_i)
        types_out[i, :n] = types_i
        feats_out[i, :n] = np.asarray(feats_i, dtype=np.float32).reshape(n, num_features)
    if labels is None:
        labels_out = np.full(batch, np.nan, dtype=np.float32)
    else:
        labels_out = np.array([np.nan if v is None else float(v) for v in labels], dtype=np.float32)
    return SequenceBatch(
        torch.from_numpy(types_out),
        torch.from_numpy(feats_out),
        torch.from_numpy(lengths),
        torch.from_numpy(labels_out),
    )


def last_valid(outputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Pick each sequence's output at its last valid step: ``(B, T, H), (B,) -> (B, H)``."""
    index = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, outputs.shape[-1])  # (B, 1, H)
    return outputs.gather(1, index).squeeze(1)


@torch.no_grad()
def map_minibatches(fn, batch: SequenceBatch, batch_size: int = 512) -> torch.Tensor:
    """``fn(event_types, features, lengths) -> (b, ...)`` over length-sorted minibatches of ``batch``,
    results scattered back into input row order: ``(B, ...)``."""
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
