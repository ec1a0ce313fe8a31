"""The ``bloomier`` heads codec: Weightless (Reagen et al. 2017) over a block of heads. No I/O.

A *block* is a run of consecutive head rows (one stage-3 batch, at most ``bloomier_block_rows``, written as one
Parquet row group). Per block:

1. **prune**: each row keeps the ``round((P - 1) * (1 - sparsity))`` weights of largest magnitude among its
   first ``P - 1`` parameters (exact zeros are never kept); the last parameter, the readout bias of every
   fleet head design, is not encoded but stored per row as float16;
2. **cluster**: the kept weights of the whole block share ``K = 2**b - 1`` centroids (1-D k-means from
   quantile starts); a kept weight becomes its nearest centroid's index ``1..K``, 0 meaning zero;
3. **encode**: one :class:`fleet.compression.bloomier.BloomierFilter` maps each kept position, key
   ``block_row * 2**32 + parameter_index``, to its cluster index. Pruned positions are not stored: the filter
   returns 0 for them except for its false positives (rate ``(2**b - 1) / 2**(b + r)``), which decode to a
   random centroid;
4. **re-train** (Weightless's step): (a) :func:`refit_blocks` fits the heads again with every position that
   is not a kept weight (pruned zeros *and* the filter's false positives) fixed at its decoded value, the kept
   weights and the bias free, then clusters and encodes once more with the same keys and seed. The new table
   has false positives at the same rate but with other values (they depend on every stored value), so
   (b) :func:`refit_centroids` re-trains once more around the *final* false positives: the table fixed (every
   position keeps its cluster index), only the block's centroids and the biases move.

Decoding a head queries its ``P - 1`` keys (3 cells each, read straight from the packed table) and takes the
bias from its row. The stored layout is in ``docs/storage.md``; ``docs/quantization.md`` describes the method.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from fleet.compression.bloomier import MAX_CELL_BITS, BloomierFilter, lookup_packed

#: A key is ``block_row << KEY_ROW_SHIFT | parameter_index``.
KEY_ROW_SHIFT = 32
MAX_VALUE_BITS = 8
KMEANS_ITERATIONS = 25


@dataclass(frozen=True, eq=False)
class WeightlessBlock:
    """What a block stores once (on its first row, column ``bloomier``): the filter and the centroids.

    Args:
        rows: head rows in the block (block rows ``0 .. rows - 1``, in table order).
        seed: the filter's seed (the one its build succeeded with).
        value_bits: ``b``; ``2**b - 1`` clusters, cluster index 0 = zero.
        cell_bits: ``w = b + r`` bits per cell (``r`` check bits: false positive rate ``(2**b - 1) / 2**w``).
        cells: ``m``, a multiple of 3 (each third of the table is one hash function's range).
        centroids: float32 little endian, ``2**b - 1`` values: cluster ``i`` decodes to ``centroids[i - 1]``.
        table: the ``m`` cells of ``w`` bits, LSB-first bit stream (:func:`fleet.compression.bloomier.pack_cells`).
    """

    rows: int
    seed: int
    value_bits: int
    cell_bits: int
    cells: int
    centroids: bytes
    table: bytes

    def problems(self) -> list[str]:
        """What is inconsistent in the block (empty: nothing)."""
        out = []
        if not (isinstance(self.rows, int) and self.rows >= 1):
            out.append(f"rows={self.rows!r} must be >= 1")
        if not (isinstance(self.value_bits, int) and 1 <= self.value_bits <= MAX_VALUE_BITS):
            out.append(f"value_bits={self.value_bits!r} must lie in [1, {MAX_VALUE_BITS}]")
            return out
        if not (isinstance(self.cell_bits, int) and self.value_bits <= self.cell_bits <= MAX_CELL_BITS):
            out.append(f"cell_bits={self.cell_bits!r} must lie in [value_bits, {MAX_CELL_BITS}]")
            return out
        if not (isinstance(self.cells, int) and self.cells >= 3 and self.cells % 3 == 0):
            out.append(f"cells={self.cells!r} must be a positive multiple of 3")
            return out
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**64):
            out.append("seed must lie in [0, 2**64)")
        if len(self.centroids) != 4 * self.num_clusters:
            out.append(f"centroids has {len(self.centroids)} bytes, expected {4 * self.num_clusters}")
        elif not np.isfinite(self.centroid_values).all():
            out.append("centroids are not finite")
        need = (self.cells * self.cell_bits + 7) // 8
        if len(self.table) != need:
            out.append(
                f"table has {len(self.table)} bytes, expected {need} for {self.cells} cells of {self.cell_bits} bits"
            )
        return out

    @property
    def num_clusters(self) -> int:
        return (1 << self.value_bits) - 1

    @property
    def centroid_values(self) -> np.ndarray:
        return np.frombuffer(self.centroids, dtype="<f4").astype(np.float32)

    @property
    def false_positive_rate(self) -> float:
        return self.num_clusters / (1 << self.cell_bits)

    @property
    def nbytes(self) -> int:
        """Payload bytes of the block: table + centroids (+ 8 seed, 4 rows, 4 cells, 2 bit widths)."""
        return len(self.table) + len(self.centroids) + 18

    def as_dict(self) -> dict:
        """The ``bloomier`` struct of the block's first row."""
        return {
            "rows": self.rows,
            "seed": self.seed,
            "value_bits": self.value_bits,
            "cell_bits": self.cell_bits,
            "cells": self.cells,
            "centroids": self.centroids,
            "table": self.table,
        }


def head_keys(block_rows: np.ndarray, num_weights: int) -> np.ndarray:
    """Keys ``(C, num_weights) uint64`` of the encoded parameters ``0 .. num_weights - 1`` of block rows ``(C,)``."""
    rows = np.asarray(block_rows, dtype=np.uint64).reshape(-1, 1)
    return (rows << np.uint64(KEY_ROW_SHIFT)) | np.arange(num_weights, dtype=np.uint64)


def kmeans_1d(
    values: np.ndarray, k: int, iterations: int = KMEANS_ITERATIONS, init: np.ndarray | None = None
) -> np.ndarray:
    """``k`` ascending float32 centroids of 1-D ``values`` (Lloyd's algorithm from the ``(i + 0.5) / k``
    quantiles, or from ``init``). A cluster that empties keeps its centroid. No values: ``k`` zeros."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return np.zeros(k, np.float32)
    c = np.quantile(values, (np.arange(k) + 0.5) / k) if init is None else np.asarray(init, dtype=np.float64).copy()
    for _ in range(iterations):
        c.sort()
        idx = np.searchsorted((c[:-1] + c[1:]) / 2, values)  # nearest centroid
        sums = np.bincount(idx, weights=values, minlength=k)
        counts = np.bincount(idx, minlength=k)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        if np.allclose(new, c, rtol=0, atol=0):
            break
        c = new
    return np.sort(c).astype(np.float32)


def assign_clusters(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index ``1..K`` of the nearest of the ascending ``centroids`` for each value (``uint32``)."""
    c = np.asarray(centroids, dtype=np.float64)
    idx = np.searchsorted((c[:-1] + c[1:]) / 2, np.asarray(values, dtype=np.float64))
    return (idx + 1).astype(np.uint32)


def prune_keep(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep mask ``(C, Q)``: per row the ``round(Q * (1 - sparsity))`` largest ``|w|`` (ties: the lower index),
    never an exact zero."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    c, q = weights.shape
    k = round(q * (1.0 - sparsity))
    order = np.argsort(-np.abs(weights), axis=1, kind="stable")[:, :k]  # (C, k)
    keep = np.zeros((c, q), dtype=bool)
    np.put_along_axis(keep, order, True, axis=1)
    return keep & (weights != 0)


@dataclass(frozen=True)
class EncodedBlock:
    """:func:`encode_block`'s result: the block, the kept positions ``(C, P - 1)`` and the float16 biases ``(C,)``."""

    block: WeightlessBlock
    keep: np.ndarray
    bias: np.ndarray


def encode_block(
    heads: np.ndarray,
    *,
    sparsity: float,
    value_bits: int,
    check_bits: int,
    seed: int = 0,
    keep: np.ndarray | None = None,
    centroids: np.ndarray | None = None,
) -> EncodedBlock:
    """Prune, cluster and Bloomier-encode heads ``(C, P)`` (one design) as one block of ``C`` rows.

    ``keep`` (``(C, P - 1)``) fixes the stored positions instead of pruning; ``centroids`` fixes the codebook
    instead of k-means. The same inputs give the same bytes.
    """
    heads = np.asarray(heads, dtype=np.float32)
    if heads.ndim != 2 or heads.shape[0] < 1 or heads.shape[1] < 2:
        raise ValueError(f"heads must be (C >= 1, P >= 2), got {heads.shape}")
    if not np.isfinite(heads).all():
        raise ValueError("cannot encode non-finite heads")
    if not (isinstance(value_bits, int) and 1 <= value_bits <= MAX_VALUE_BITS):
        raise ValueError(f"value_bits must lie in [1, {MAX_VALUE_BITS}], got {value_bits!r}")
    weights, bias = heads[:, :-1], heads[:, -1]
    if keep is None:
        keep = prune_keep(weights, sparsity)
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != weights.shape:
        raise ValueError(f"keep must have shape {weights.shape}, got {keep.shape}")
    k = (1 << value_bits) - 1
    kept = weights[keep]
    centroids = kmeans_1d(kept, k) if centroids is None else np.asarray(centroids, np.float32)
    if centroids.shape != (k,):
        raise ValueError(f"need {k} centroids, got {centroids.shape}")
    rows, cols = np.nonzero(keep)  # row-major: rows ascending, then parameter index
    keys = (rows.astype(np.uint64) << np.uint64(KEY_ROW_SHIFT)) | cols.astype(np.uint64)
    f = BloomierFilter.build(keys, assign_clusters(kept, centroids), value_bits, check_bits, seed)
    block = WeightlessBlock(
        rows=heads.shape[0],
        seed=f.seed,
        value_bits=value_bits,
        cell_bits=f.cell_bits,
        cells=f.cells,
        centroids=centroids.astype("<f4").tobytes(),
        table=f.to_bytes(),
    )
    with np.errstate(over="ignore"):
        bias16 = bias.astype(np.float16)
    if not np.isfinite(bias16).all():
        raise ValueError("a bias is beyond the float16 range")
    return EncodedBlock(block, keep, bias16)


def cluster_indices(block: WeightlessBlock, block_rows: np.ndarray, num_weights: int) -> np.ndarray:
    """Cluster indices ``(C, num_weights) uint32`` (0 = zero) the filter returns for rows ``block_rows``."""
    keys = head_keys(block_rows, num_weights)
    return lookup_packed(
        block.table, keys, seed=block.seed, value_bits=block.value_bits, cell_bits=block.cell_bits, cells=block.cells
    )


def decode_weights(block: WeightlessBlock, block_rows: np.ndarray, num_weights: int) -> np.ndarray:
    """The encoded parameters ``(C, num_weights) float32`` of block rows ``block_rows`` (the bias not included)."""
    idx = cluster_indices(block, block_rows, num_weights)
    table = np.concatenate([np.zeros(1, np.float32), block.centroid_values])  # index 0 -> 0.0
    return table[idx]


def decode_encoded(encoded: EncodedBlock) -> np.ndarray:
    """Heads ``(C, P)`` exactly as a reader decodes ``encoded`` (weights from the filter, float16 biases)."""
    c, q = encoded.keep.shape
    weights = decode_weights(encoded.block, np.arange(c), q)
    return np.concatenate([weights, encoded.bias.astype(np.float32)[:, None]], axis=1)


def false_positives(encoded: EncodedBlock, decoded: np.ndarray) -> np.ndarray:
    """``(C, P - 1)`` bool: positions not stored that decode to a nonzero value (the filter's false positives)."""
    return (decoded[:, :-1] != 0) & ~encoded.keep


def refit_blocks(
    heads,
    encoded: list[EncodedBlock],
    features,
    campaign_index,
    teacher_logits,
    labels,
    student_config,
    distill_config,
    *,
    steps: int,
    lr: float,
    check_bits: int,
    row_weights=None,
):
    """Weightless's re-training step, then one re-encoding, for blocks covering the rows of ``heads (C, P)``
    in order (block 0 holds the first ``encoded[0].block.rows`` rows, ...).

    The heads are fitted again (:func:`fleet.compression.distill.fit_heads`, all rows at once; ``campaign_index`` numbers
    them ``0 .. C - 1``) with every position that is not a kept weight fixed at what its block decodes to (0
    for a pruned weight, a random centroid for a false positive); the kept weights start from their float
    values in ``heads`` and move freely, as does the bias. The refitted kept weights are clustered again
    (k-means) and each block is encoded once more with the same keys and seed, so it has the same size and
    hypergraph. The new table differs, and with it the *values* of the false positives (their rate does not):
    the refit saw the first encoding's false positives, not the second's (``stats`` counts how many stayed).

    Returns ``(re-encoded blocks, refitted heads (C, P) float tensor, stats dict)``.
    """
    import torch

    from fleet.compression.distill import fit_heads

    first = np.concatenate([decode_encoded(e) for e in encoded])  # (C, P)
    keep = np.concatenate([e.keep for e in encoded])  # (C, P - 1)
    fixed = torch.from_numpy(first)
    free = torch.zeros(first.shape, dtype=torch.bool)
    free[:, :-1] = torch.from_numpy(keep)
    free[:, -1] = True
    start = torch.where(free, heads.detach().float(), fixed)  # kept weights and bias: their float values
    refit = fit_heads(
        features,
        campaign_index,
        teacher_logits,
        labels,
        first.shape[0],
        student_config,
        distill_config,
        steps=steps,
        lr=lr,
        init=start,
        fake_quant=lambda p: torch.where(free, p, fixed),
        row_weights=row_weights,
    )
    refit = torch.where(free, refit, fixed)
    again, offset = [], 0
    for e in encoded:
        rows = e.block.rows
        again.append(
            encode_block(
                refit[offset : offset + rows].numpy(),
                sparsity=0.0,
                value_bits=e.block.value_bits,
                check_bits=check_bits,
                seed=e.block.seed,
                keep=e.keep,
            )
        )
        offset += rows
    second = np.concatenate([decode_encoded(e) for e in again])
    fp1 = (first[:, :-1] != 0) & ~keep
    fp2 = (second[:, :-1] != 0) & ~keep
    stats = {
        "keys": int(keep.sum()),
        "positions": int(keep.size),
        "false_positives_first": int(fp1.sum()),
        "false_positives": int(fp2.sum()),
        "false_positives_unchanged": int((fp1 & fp2 & (first[:, :-1] == second[:, :-1])).sum()),
    }
    return again, refit, stats


def refit_centroids(
    encoded: list[EncodedBlock],
    features,
    campaign_index,
    teacher_logits,
    labels,
    student_config,
    distill_config,
    *,
    steps: int,
    lr: float,
    row_weights=None,
) -> list[EncodedBlock]:
    """Re-train around the *final* false positives: with every block's table fixed (so every position keeps
    its cluster index, false positives included), fit each block's centroids and every row's bias to the
    teacher (Adam, full batch; a campaign's loss is its rows' weighted mean, summed over campaigns as in
    :func:`fleet.compression.distill.fit_heads`). The tables are unchanged; the new centroids and float16 biases are what
    a reader decodes. Rows ``0 .. C - 1`` of ``campaign_index`` are the blocks' rows in order."""
    import torch

    from fleet.compression.distill import distill_loss_rows
    from fleet.compression.student import head_logits

    idx = torch.from_numpy(
        np.concatenate(
            [cluster_indices(e.block, np.arange(e.block.rows), e.keep.shape[1]).astype(np.int64) for e in encoded]
        )
    )
    owner = torch.cat([torch.full((e.block.rows,), k, dtype=torch.long) for k, e in enumerate(encoded)])  # (C,)
    cent = torch.stack([torch.from_numpy(e.block.centroid_values) for e in encoded])  # (B, K)
    bias = torch.from_numpy(np.concatenate([e.bias.astype(np.float32) for e in encoded]))  # (C,)
    cent.requires_grad_(True)
    bias.requires_grad_(True)
    c = bias.shape[0]
    weights = torch.ones(len(campaign_index)) if row_weights is None else row_weights.float()
    counts = torch.bincount(campaign_index, weights=weights, minlength=c)
    row_weight = weights / counts.clamp(min=1e-12)[campaign_index]  # (N,)
    feats = features.detach().float()
    zero = torch.zeros(len(encoded), 1)
    optimizer = torch.optim.Adam([cent, bias], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        table = torch.cat([zero, cent], 1)  # (B, K + 1): index 0 -> 0
        heads = torch.cat([table[owner[:, None], idx], bias[:, None]], 1)  # (C, P)
        logits = head_logits(student_config.head, feats, heads, student_config.head_rank, index=campaign_index)
        loss = (distill_loss_rows(logits, teacher_logits, labels, distill_config) * row_weight).sum()
        loss.backward()
        optimizer.step()
    out, start = [], 0
    cent_np, bias_np = cent.detach().float().numpy(), bias.detach().numpy()
    for k, e in enumerate(encoded):
        rows = e.block.rows
        block = dataclasses.replace(e.block, centroids=cent_np[k].astype("<f4").tobytes())
        out.append(EncodedBlock(block, e.keep, bias_np[start : start + rows].astype(np.float16)))
        start += rows
    return out


__all__ = [
    "KEY_ROW_SHIFT",
    "EncodedBlock",
    "WeightlessBlock",
    "assign_clusters",
    "cluster_indices",
    "decode_encoded",
    "decode_weights",
    "encode_block",
    "false_positives",
    "head_keys",
    "kmeans_1d",
    "prune_keep",
    "refit_blocks",
    "refit_centroids",
]
