"""Heads as stored: stacked fp32 heads ``[C, P]`` <-> quantized, optionally pruned vectors and back.

Pruning keeps exactly ``k`` entries per row (magnitude), so the kept values of all campaigns form one
``[C, k]`` matrix: it is quantized (fixed or adaptive bits) as a whole, and the gate always judges
the head exactly as :func:`decode_heads` will rebuild it (kept values dequantized, pruned ones 0).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from fleet.compression.adaptive import BitsGate, choose_bits
from fleet.compression.quant import (
    DEFAULT_GROUP_SIZE,
    QuantizedVector,
    dequantize_rows,
    magnitude_prune_mask,
    quantize_rows,
)
from fleet.compression.weightless import EncodedBlock, decode_weights
from fleet.core.constants import SUPPORTED_BITS
from fleet.formats.codec import HeadRow


def encode_heads(
    params: Tensor,
    bits: Literal["auto"] | int,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    sparsity: float = 0.0,
    gate: BitsGate | None = None,
    candidates: tuple[int, ...] = SUPPORTED_BITS,
) -> tuple[list[QuantizedVector], Tensor, Tensor | None]:
    """Quantize heads ``[C, P]`` at ``bits`` (an int, or ``"auto"``: per row the fewest ``candidates``
    bits that pass ``gate``), after magnitude pruning when ``sparsity > 0``.

    Returns ``(vectors, bits_per_row LongTensor[C], keep_mask BoolTensor[C, P] | None)``.
    """
    params = params.detach().float()
    c, p = params.shape
    mask = magnitude_prune_mask(params, sparsity) if sparsity > 0 else None
    kept = params if mask is None else params[mask].view(c, -1)  # (C, k)

    def expand(kept_values: Tensor) -> Tensor:  # (C, k) -> (C, P) with pruned entries at 0
        if mask is None:
            return kept_values
        full = torch.zeros(c, p)
        full[mask] = kept_values.reshape(-1)
        return full

    if bits == "auto":
        if gate is None:
            raise ValueError("bits='auto' needs a gate")
        vectors, chosen = choose_bits(kept, lambda deq: gate(expand(deq)), candidates, group_size)
    else:
        vectors = quantize_rows(kept, int(bits), group_size)
        chosen = torch.full((c,), int(bits), dtype=torch.long)
    return vectors, chosen, mask


def head_row(campaign_id: str, vector: QuantizedVector, num_params: int, mask: Tensor | None, **fields) -> HeadRow:
    """One ``fleet-heads/1`` row from a stored vector (``fields``: hashes, fidelity, status ...)."""
    mask_bytes = None if mask is None else np.packbits(mask.numpy(), bitorder="little").tobytes()
    return HeadRow(
        campaign_id=campaign_id,
        bits=vector.bits,
        shape=(num_params,),
        group_size=vector.group_size,
        packed=vector.packed,
        scales=vector.scales,
        mask=mask_bytes,
        **fields,
    )


def bloomier_head_row(campaign_id: str, encoded: EncodedBlock, block_row: int, **fields) -> HeadRow:
    """One ``fleet-heads/2.0`` row of a block (:func:`fleet.compression.weightless.encode_block`): row ``block_row``."""
    q = encoded.keep.shape[1]
    return HeadRow(
        campaign_id=campaign_id,
        bits=encoded.block.value_bits,
        shape=(q + 1,),
        group_size=0,
        packed=b"",
        scales=encoded.bias[block_row : block_row + 1].astype("<f2").tobytes(),
        mask=None,
        codec="bloomier",
        block=encoded.block,
        block_row=block_row,
        **fields,
    )


def decode_heads(rows: list[HeadRow]) -> Tensor:
    """Dequantized float32 heads ``[C, P]`` of stored rows (pruned entries are 0; ``bloomier`` rows: what their
    block's filter returns, false positives included, and the float16 bias)."""
    if not rows:
        return torch.zeros(0, 0)
    p = rows[0].num_params
    out = torch.zeros(len(rows), p)
    blocks: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        if r.codec == "bloomier":
            blocks.setdefault(id(r.block), []).append(i)
    for picked in blocks.values():
        block = rows[picked[0]].block
        weights = decode_weights(block, np.array([rows[i].block_row for i in picked]), p - 1)  # (k, P - 1)
        bias = np.frombuffer(b"".join(rows[i].scales for i in picked), "<f2").astype(np.float32)
        out[picked] = torch.from_numpy(np.concatenate([weights, bias[:, None]], axis=1))
    packed = [i for i, r in enumerate(rows) if r.codec != "bloomier"]
    vectors = {
        i: QuantizedVector(rows[i].bits, rows[i].num_stored, rows[i].group_size or 1, rows[i].packed, rows[i].scales)
        for i in packed
    }
    dense = [i for i in packed if rows[i].mask is None]
    if dense:
        out[dense] = dequantize_rows([vectors[i] for i in dense])
    for i in packed:
        r = rows[i]
        if r.mask is not None:
            keep = np.unpackbits(np.frombuffer(r.mask, np.uint8), count=p, bitorder="little").astype(bool)
            out[i, torch.from_numpy(keep)] = dequantize_rows([vectors[i]])[0]
    return out


def decode_head(row: HeadRow) -> Tensor:
    """Dequantized float32 head ``[P]`` of one stored row."""
    return decode_heads([row])[0]
