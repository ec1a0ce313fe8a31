"""Per-campaign adaptive bit widths: the fewest bits whose dequantized head passes a gate (pure torch)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fleet.compression.quant import (
    DEFAULT_GROUP_SIZE,
    PerGroup,
    QuantizedVector,
    dequantize,
    encode_rows,
    quantize,
    storage_scales,
)
from fleet.core.constants import SUPPORTED_BITS

#: The bits gate: dequantized heads ``[C, P]`` -> ``BoolTensor[C]``, whether each campaign's head may be stored at
#: the bit width tried (fleet.run.stages.CampaignGate.bits_pass, bound to the float heads' check). Not to be
#: confused with the promotion gate (fleet.storage.promotion_gate.PromotionGate: may a version become champion)
#: or the HTTP body limit (fleet.serve.http_middleware.BodyLimit).
BitsGate = Callable[[Tensor], Tensor]


def choose_bits(
    params: Tensor,
    passes_gate: BitsGate,
    candidates: Sequence[int] = SUPPORTED_BITS,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> tuple[list[QuantizedVector], Tensor]:
    """Quantize each row of ``params [C, P]`` at the fewest candidate bits that pass ``passes_gate``.

    Candidates are tried in increasing order. For each lossy candidate the gate is called once
    with the whole matrix of dequantized heads ``[C, P]`` (row ``i`` is campaign ``i``; rows
    already decided are included and their verdicts ignored) and returns ``BoolTensor[C]``. The
    gate sees exactly what :func:`fleet.compression.quant.dequantize_rows` will decode from the returned
    vectors (same integers, same float16 scales). Calls stop once every row has passed.

    Float16 (bits 16) is the last resort and is always available, whether or not it is among
    ``candidates``; it is *not* gated: a row that passed no lossy candidate is returned at 16
    bits even if its float16 head would fail the gate too. Callers that must know re-run the gate
    on the result (the fidelity stage evaluates every final head anyway) and reject such rows.

    Returns:
        ``(vectors, bits)``: one :class:`~fleet.compression.quant.QuantizedVector` per row, and the chosen
        bit width per row as ``LongTensor[C]``.
    """
    if params.ndim != 2:
        raise ValueError(f"params must be [C, P], got shape {tuple(params.shape)}")
    if any(isinstance(b, bool) or b not in SUPPORTED_BITS for b in candidates):
        raise ValueError(f"candidates must be drawn from {SUPPORTED_BITS}, got {tuple(candidates)}")
    lossy = sorted(set(candidates) - {16})
    params = params.detach().float()
    c = params.shape[0]
    granularity = PerGroup(group_size)
    vectors: list[QuantizedVector | None] = [None] * c
    bits_chosen = torch.full((c,), 16, dtype=torch.long)
    pending = torch.ones(c, dtype=torch.bool)
    for bits in lossy:
        if not pending.any():
            break
        scale = storage_scales(params, bits, group_size)  # (C, G), float16-exact
        zero = torch.zeros_like(scale, dtype=torch.int32)
        q = quantize(params, scale, zero, bits, granularity)  # (C, P)
        ok = _call_gate(passes_gate, dequantize(q, scale, zero, bits, granularity), c)
        new = (ok & pending).nonzero().flatten()  # rows first passing at this width
        for i, vec in zip(new.tolist(), encode_rows(q[new], scale[new], bits, group_size)):
            vectors[i] = vec
        bits_chosen[new] = bits
        pending &= ~ok
    rest = pending.nonzero().flatten()
    if rest.numel():
        scale = storage_scales(params[rest], 16, group_size)
        q = quantize(params[rest], scale, torch.zeros_like(scale, dtype=torch.int32), 16, granularity)
        for i, vec in zip(rest.tolist(), encode_rows(q, scale, 16, group_size)):
            vectors[i] = vec
    return vectors, bits_chosen  # type: ignore[return-value]  # every row is filled above


def _call_gate(passes_gate: BitsGate, heads: Tensor, c: int) -> Tensor:
    ok = torch.as_tensor(passes_gate(heads))
    if ok.shape != (c,) or ok.dtype != torch.bool:
        raise ValueError(f"passes_gate must return a bool tensor of shape ({c},), got {ok.dtype} {tuple(ok.shape)}")
    return ok
