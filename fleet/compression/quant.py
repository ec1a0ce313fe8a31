"""Quantization primitives, bit packing and magnitude pruning (pure torch + numpy, no I/O).

The math follows torchao's ``quant_primitives``: stateless ``choose_qparams`` -> ``quantize`` ->
``dequantize`` functions, with the granularity given as a small frozen dataclass
(:class:`PerTensor`, :class:`PerGroup`). Every function takes a flat parameter vector ``[P]`` or a
stack of them ``[C, P]`` (more leading dims work too); rows are always quantized independently.

Schemes, by bit width (all symmetric unless ``symmetric=False``; see ``docs/quantization.md``):

- 8, 4: integers ``q in [-qmax, qmax]``, ``qmax = 2**(bits-1) - 1``, ``scale = max|x| / qmax``.
  ``symmetric=False`` gives affine ``q in [0, 2**bits - 1]`` with a zero point (Jacob et al. 2017).
- 2: ternary ``q in {-1, 0, +1}`` with the TWN threshold ``0.7 * mean|x|`` and
  ``scale = mean |x|`` over the entries above it (Li & Liu 2016).
- 1: binary ``q = sign(x) in {-1, +1}`` (``sign(0) = +1``), ``scale = mean|x|`` (XNOR-Net).
- 16: float16 fallback, no quantization; ``q`` holds the float16 bit patterns.

Storage (:class:`QuantizedVector`) is apart from the math: codes are packed LSB first (see
:func:`pack_codes`) and scales are stored as float16, one per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fleet.core.constants import SUPPORTED_BITS

PACKABLE_BITS = (1, 2, 4, 8)  # bit widths stored as packed codes; 16 is stored as raw float16
DEFAULT_GROUP_SIZE = 64
TERNARY_THRESHOLD = 0.7  # TWN: delta = 0.7 * mean|x|
FP16_MAX = 65504.0
_STE_TOLERANCE = 1e-4  # in grid steps: float rounding must not cut the gradient at |x| == scale


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole vector (for a ``[C, P]`` input: one scale per row)."""


@dataclass(frozen=True)
class PerGroup:
    """One scale per run of ``group_size`` consecutive entries of each row.

    Args:
        group_size: entries per group (>= 1). The last group of a row is shorter when
            ``group_size`` does not divide ``P``; ``group_size >= P`` is per-tensor.
    """

    group_size: int

    def __post_init__(self) -> None:
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {self.group_size!r}")


Granularity = PerTensor | PerGroup


# ----------------------------------------------------------------------------- helpers


def _check_bits(bits: int, allowed: tuple[int, ...] = SUPPORTED_BITS) -> None:
    if isinstance(bits, bool) or bits not in allowed:
        raise ValueError(f"bits must be one of {allowed}, got {bits!r}")


def _check_x(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim < 1:
        raise ValueError("x must be a tensor of shape [P] or [C, P]")
    return x.float()


def _group_size(granularity: Granularity, p: int) -> int:
    if isinstance(granularity, PerTensor):
        return max(p, 1)
    if isinstance(granularity, PerGroup):
        return min(granularity.group_size, max(p, 1))  # a group larger than the row is the row
    raise TypeError(f"granularity must be PerTensor() or PerGroup(n), got {granularity!r}")


def num_groups(count: int, group_size: int) -> int:
    """Number of groups (scales) of a row of ``count`` entries: ``ceil(count / group_size)``."""
    return -(-count // group_size)


def _grouped(x: Tensor, s: int) -> Tensor:
    """``(..., P) -> (..., G, S)``, zero-padded at the end (zeros change no max, sum or count above a threshold)."""
    p = x.shape[-1]
    g = num_groups(p, s)
    x = torch.nn.functional.pad(x, (0, g * s - p))  # (..., G*S)
    return x.reshape(*x.shape[:-1], g, s)


def _group_counts(p: int, s: int, device: torch.device) -> Tensor:
    """Valid (unpadded) entries per group: ``(G,)`` float32."""
    g = num_groups(p, s)
    counts = torch.full((g,), float(s), device=device)
    if g:
        counts[-1] = p - (g - 1) * s
    return counts


def _expand(t: Tensor, s: int, p: int) -> Tensor:
    """Per-group values to per-entry values: ``(..., G) -> (..., P)``."""
    return t.repeat_interleave(s, dim=-1)[..., :p]


def _safe(scale: Tensor) -> Tensor:
    """Scale 0 (an all-zero group) divides as 1, so the group quantizes to 0 instead of NaN."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer range ``[qmin, qmax]`` of ``q`` for a scheme."""
    if bits in (1, 2):
        return -1, 1
    if symmetric:
        m = 2 ** (bits - 1) - 1
        return -m, m
    return 0, 2**bits - 1


def _ternary_delta(x: Tensor, s: int) -> Tensor:
    """TWN threshold per group: ``(..., P) -> (..., G)``."""
    mean_abs = _grouped(x.abs(), s).sum(-1) / _group_counts(x.shape[-1], s, x.device)  # (..., G)
    return TERNARY_THRESHOLD * mean_abs


# ----------------------------------------------------------------------------- math


def choose_qparams(x: Tensor, bits: int, granularity: Granularity, symmetric: bool = True) -> tuple[Tensor, Tensor]:
    """Scales and zero points for ``x``.

    Args:
        x: ``[P]`` or ``[C, P]`` (rows are independent).
        bits: one of :data:`fleet.core.constants.SUPPORTED_BITS`.
        granularity: :class:`PerTensor` or :class:`PerGroup`.
        symmetric: ``False`` selects affine quantization (bits 8 and 4 only).

    Returns:
        ``(scale, zero_point)``, shapes ``[G]`` (or ``[C, G]``), float32 and int32. ``zero_point``
        is 0 for symmetric schemes; bits 16 returns scale 1. An all-zero group gets scale 0.
    """
    _check_bits(bits)
    x = _check_x(x)
    if not symmetric and bits not in (4, 8):
        raise ValueError(f"affine (symmetric=False) quantization supports bits 4 and 8, got {bits}")
    s = _group_size(granularity, x.shape[-1])
    xg = _grouped(x, s)  # (..., G, S)
    shape = xg.shape[:-1]  # (..., G)
    zero_point = torch.zeros(shape, dtype=torch.int32, device=x.device)
    if bits == 16:
        return torch.ones(shape, device=x.device), zero_point
    qmin, qmax = _qrange(bits, symmetric)
    if bits == 1:
        scale = xg.abs().sum(-1) / _group_counts(x.shape[-1], s, x.device)  # mean|x|, (..., G)
    elif bits == 2:
        a = xg.abs()  # (..., G, S)
        above = a > _ternary_delta(x, s).unsqueeze(-1)  # (..., G, S); padding never counts
        scale = (a * above).sum(-1) / above.sum(-1).clamp(min=1)  # (..., G)
    elif symmetric:
        scale = xg.abs().amax(-1) / qmax
    else:
        lo = xg.amin(-1).clamp(max=0.0)  # the range always holds 0, so 0 is exact
        hi = xg.amax(-1).clamp(min=0.0)
        scale = (hi - lo) / (qmax - qmin)
        zero_point = (qmin - torch.round(lo / _safe(scale))).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    bits: int,
    granularity: Granularity,
    *,
    symmetric: bool = True,
) -> Tensor:
    """Integer values ``q`` (int32, same shape as ``x``) for the given qparams.

    Integers: ``q = clamp(round(x / scale) + zero_point)`` to the scheme's range (``symmetric``
    picks ``[-qmax, qmax]`` or ``[0, 2**bits - 1]``). Ternary and binary ``q`` depend on ``x``
    only (``sign(x) * (|x| > 0.7 mean|x|)`` per group, and ``sign(x)``). Bits 16: the float16
    bit patterns of ``x``.
    """
    _check_bits(bits)
    x = _check_x(x)
    if bits == 16:
        return x.to(torch.float16).view(torch.int16).to(torch.int32)
    p = x.shape[-1]
    s = _group_size(granularity, p)
    expected = (*x.shape[:-1], num_groups(p, s))
    if tuple(scale.shape) != expected or tuple(zero_point.shape) != expected:
        raise ValueError(f"scale and zero_point must have shape {expected}, got {tuple(scale.shape)}")
    if bits == 1:
        q = torch.where(x >= 0, 1, -1)
    elif bits == 2:
        q = torch.sign(x) * (x.abs() > _expand(_ternary_delta(x, s), s, p))
    else:
        qmin, qmax = _qrange(bits, symmetric)
        q = torch.round(x / _expand(_safe(scale.float()), s, p)) + _expand(zero_point, s, p)
        q = q.clamp(qmin, qmax)
    return q.to(torch.int32)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, bits: int, granularity: Granularity) -> Tensor:
    """Float32 values ``(q - zero_point) * scale`` per group (bits 16: ``q`` read as float16 bits)."""
    _check_bits(bits)
    if bits == 16:
        return q.to(torch.int16).view(torch.float16).float()
    p = q.shape[-1]
    s = _group_size(granularity, p)
    return (q - _expand(zero_point, s, p)).float() * _expand(scale.float(), s, p)


def fake_quantize(x: Tensor, bits: int, granularity: Granularity, symmetric: bool = True) -> Tensor:
    """``dequantize(quantize(x))`` forward, straight-through estimator backward (for QAT).

    The gradient passes unchanged where ``x`` lies in the representable range of its group and
    is 0 outside, as in QNN (Hubara et al. 2016): binary and ternary pass ``|x| <= scale``;
    integers pass where ``x`` is not clamped, i.e. ``round(x / scale) + zp`` in ``[qmin, qmax]``
    (the range widened by half a step, as torch's ``fake_quantize_per_tensor_affine``). With
    scales recomputed from ``x`` every symmetric integer entry is inside (``scale = max|x| /
    qmax``). Scales carry no gradient. Bits 16 rounds to float16 (gradient 1 within its range).
    """
    xd = _check_x(x.detach())
    if bits == 16:
        _check_bits(bits)
        xq, inside = xd.half().float(), xd.abs() <= FP16_MAX
    else:
        scale, zero_point = choose_qparams(xd, bits, granularity, symmetric)
        q = quantize(xd, scale, zero_point, bits, granularity, symmetric=symmetric)
        xq = dequantize(q, scale, zero_point, bits, granularity)
        p = xd.shape[-1]
        s = _group_size(granularity, p)
        grid = xd / _expand(_safe(scale), s, p) + _expand(zero_point, s, p)  # x in units of steps
        qmin, qmax = _qrange(bits, symmetric)
        # integers: x rounds into the grid without clamping; binary/ternary: |x| <= scale (QNN)
        margin = _STE_TOLERANCE if bits in (1, 2) else 0.5
        inside = (grid >= qmin - margin) & (grid <= qmax + margin)
    # forward: xq; backward: d out / d x = 1[inside]
    return xq + (x - x.detach()) * inside


# ----------------------------------------------------------------------------- packing


def _check_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    _check_bits(bits, PACKABLE_BITS)
    codes = np.asarray(codes)
    if codes.dtype.kind not in "iub":
        raise ValueError(f"codes must be unsigned integers, got dtype {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for bits={bits}")
    return codes.astype(np.uint8)


def _pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """``uint8 (N, P) -> uint8 (N, ceil(P * bits / 8))``: element i at bit ``i * bits`` of the row, LSB first."""
    per = 8 // bits  # codes per byte; bits divides 8, so no code straddles two bytes
    n, p = codes.shape
    nbytes = num_groups(p * bits, 8)
    padded = np.zeros((n, nbytes * per), dtype=np.uint8)
    padded[:, :p] = codes
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)  # (per,)
    return np.bitwise_or.reduce(padded.reshape(n, nbytes, per) << shifts, axis=-1)  # (N, nbytes)


def _unpack_rows(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`_pack_rows`: ``uint8 (N, nbytes) -> uint8 (N, count)``; nonzero padding is an error."""
    per = 8 // bits
    n, nbytes = data.shape
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    codes = ((data[:, :, None] >> shifts) & np.uint8(2**bits - 1)).reshape(n, nbytes * per)  # (N, nbytes*per)
    if codes[:, count:].any():
        raise ValueError("packed codes have nonzero padding bits after the last element")
    return codes[:, :count]


def packed_size(count: int, bits: int) -> int:
    """Bytes of ``count`` packed codes: ``ceil(count * bits / 8)`` (bits 16: ``2 * count``)."""
    return num_groups(count * bits, 8)


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Pack codes in ``[0, 2**bits)`` (bits 1, 2, 4, 8) into bytes.

    Element ``i`` lands in byte ``(i * bits) // 8`` at bit offset ``(i * bits) % 8``, least
    significant bit first (bits 1 equals ``np.packbits(bitorder="little")``); the last byte is
    zero-padded. Example: codes ``[1, 2, 3, 0]`` at bits 2 -> ``b"\\x39"``.
    """
    codes = _check_codes(codes, bits)
    if codes.ndim != 1:
        raise ValueError(f"codes must be 1-D, got shape {codes.shape}")
    return _pack_rows(codes[None, :], bits)[0].tobytes()


def unpack_codes(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``count`` uint8 codes; wrong length or nonzero padding raise ``ValueError``."""
    _check_bits(bits, PACKABLE_BITS)
    if count < 0 or len(data) != packed_size(count, bits):
        raise ValueError(f"{count} codes of {bits} bits need {packed_size(max(count, 0), bits)} bytes, got {len(data)}")
    arr = np.frombuffer(bytes(data), dtype=np.uint8)
    return _unpack_rows(arr[None, :], bits, count)[0].copy()


def _q_to_codes(q: Tensor, bits: int) -> Tensor:
    """Signed ``q`` to unsigned codes (offset binary): binary ``(q+1)//2``, ternary ``q+1``, else ``q + 2**(bits-1)``."""
    if bits == 1:
        return (q + 1) // 2
    if bits == 2:
        return q + 1
    return q + 2 ** (bits - 1)


def _codes_to_q(codes: Tensor, bits: int) -> Tensor:
    if bits == 1:
        return 2 * codes - 1
    if bits == 2:
        return codes - 1
    return codes - 2 ** (bits - 1)


# ----------------------------------------------------------------------------- storage


@dataclass(frozen=True)
class QuantizedVector:
    """One symmetric-quantized flat parameter vector as stored (one heads row).

    Args:
        bits: one of :data:`fleet.core.constants.SUPPORTED_BITS`.
        count: number of entries ``P``.
        group_size: entries per scale (the last group may be shorter).
        packed: codes packed by :func:`pack_codes` (``ceil(count * bits / 8)`` bytes); for bits 16
            the float16 values, little endian (``2 * count`` bytes).
        scales: float16 little endian, one per group (``2 * ceil(count / group_size)`` bytes);
            empty for bits 16. No zero point: stored vectors are symmetric.
    """

    bits: int
    count: int
    group_size: int
    packed: bytes
    scales: bytes

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if self.count < 0 or self.group_size < 1:
            raise ValueError(f"need count >= 0 and group_size >= 1, got {self.count}, {self.group_size}")
        n_packed = 2 * self.count if self.bits == 16 else packed_size(self.count, self.bits)
        n_scales = 0 if self.bits == 16 else 2 * num_groups(self.count, self.group_size)
        if len(self.packed) != n_packed or len(self.scales) != n_scales:
            raise ValueError(
                f"bits={self.bits} count={self.count} group_size={self.group_size} needs {n_packed} packed and "
                f"{n_scales} scale bytes, got {len(self.packed)} and {len(self.scales)}"
            )

    @property
    def nbytes(self) -> int:
        """Payload bytes: packed codes + scales."""
        return len(self.packed) + len(self.scales)


def storage_scales(x: Tensor, bits: int, group_size: int) -> Tensor:
    """Symmetric per-group scales of ``x`` (``[C, P] -> [C, G]``) as stored: float16-representable.

    Scales are rounded *up* to float16 so that ``max|x| / scale <= qmax`` still holds and the
    int8/int4 error bound ``|x - x_hat| <= scale / 2`` survives storage. Raises ``ValueError``
    on non-finite input or scales beyond the float16 range (bits 16: values beyond it).
    """
    x = _check_x(x)
    if x.numel():
        lo, hi = torch.aminmax(x)  # one pass; NaN propagates
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise ValueError("cannot quantize non-finite values")
        if bits == 16 and max(-lo, hi) > FP16_MAX:
            raise ValueError(f"values beyond the float16 range (|x| > {FP16_MAX}) cannot be stored at bits 16")
    scale, _ = choose_qparams(x, bits, PerGroup(group_size))
    s16 = scale.half()
    s16 = torch.where(s16.float() < scale, torch.nextafter(s16, torch.full_like(s16, float("inf"))), s16)
    if not torch.isfinite(s16).all():
        raise ValueError("a scale exceeds the float16 range; values are too large to store")
    return s16.float()


def encode_rows(q: Tensor, scale: Tensor, bits: int, group_size: int) -> list[QuantizedVector]:
    """Store integer values ``q [C, P]`` (from :func:`quantize`) and scales ``[C, G]`` as vectors.

    The packing is vectorised over rows; only building the list of byte strings loops.
    """
    _check_bits(bits)
    c, p = q.shape
    if bits == 16:
        data = q.to(torch.int16).numpy().astype("<i2")  # float16 bit patterns, little endian
        return [QuantizedVector(16, p, group_size, row.tobytes(), b"") for row in data]
    codes = _q_to_codes(q, bits).to(torch.uint8).numpy()  # (C, P)
    packed = _pack_rows(codes, bits)  # (C, nbytes)
    scales = scale.half().numpy().astype("<f2")  # (C, G)
    return [QuantizedVector(bits, p, group_size, packed[i].tobytes(), scales[i].tobytes()) for i in range(c)]


def quantize_rows(x: Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> list[QuantizedVector]:
    """Quantize each row of ``x [C, P]`` symmetrically with per-group float16 scales (vectorised over rows)."""
    _check_bits(bits)
    x = _check_x(x)
    if x.ndim != 2:
        raise ValueError(f"x must be [C, P], got shape {tuple(x.shape)}")
    granularity = PerGroup(group_size)
    scale = storage_scales(x, bits, group_size)  # (C, G)
    q = quantize(x, scale, torch.zeros_like(scale, dtype=torch.int32), bits, granularity)  # (C, P)
    return encode_rows(q, scale, bits, group_size)


def quantize_vector(x: Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> QuantizedVector:
    """Quantize one flat vector ``x [P]``; see :func:`quantize_rows`."""
    x = _check_x(x)
    if x.ndim != 1:
        raise ValueError(f"x must be [P], got shape {tuple(x.shape)}")
    return quantize_rows(x[None, :], bits, group_size)[0]


def dequantize_rows(qvs: list[QuantizedVector]) -> Tensor:
    """Float32 ``[C, P]`` from stored vectors (all of one ``count``; bits may differ per row).

    Rows sharing ``(bits, group_size)`` are decoded together (:func:`dequantize_packed`). An empty list
    gives ``[0, 0]``. Codes outside the symmetric range (e.g. code 0 at int8) raise ``ValueError``.
    """
    if not qvs:
        return torch.zeros(0, 0)
    p = qvs[0].count
    if any(qv.count != p for qv in qvs):
        raise ValueError("all vectors must have the same count to stack into [C, P]")
    out = torch.empty(len(qvs), p)
    formats: dict[tuple[int, int], list[int]] = {}
    for i, qv in enumerate(qvs):
        formats.setdefault((qv.bits, qv.group_size), []).append(i)
    for (bits, group_size), rows in formats.items():
        n = len(rows)
        width = 2 * p if bits == 16 else packed_size(p, bits)
        packed = np.frombuffer(b"".join(qvs[i].packed for i in rows), dtype=np.uint8).reshape(n, width)
        scales = (
            None
            if bits == 16
            else np.frombuffer(b"".join(qvs[i].scales for i in rows), dtype="<f2").reshape(n, num_groups(p, group_size))
        )
        out[rows] = dequantize_packed(packed, scales, bits, p, group_size)
    return out


def dequantize_packed(packed: np.ndarray, scales: np.ndarray | None, bits: int, count: int, group_size: int) -> Tensor:
    """Float32 ``(n, count)`` from ``n`` stored rows of one format, as contiguous arrays (the decoding
    step of :func:`dequantize_rows`): :func:`dequantize_codes` as a tensor (no copy).

    Args:
        packed: ``uint8 (n, ceil(count * bits / 8))`` codes packed by :func:`pack_codes`; for bits 16
            ``(n, 2 * count)``, the float16 values little endian.
        scales: float16 (little endian) ``(n, ceil(count / group_size))``; ignored (None) for bits 16.
        bits, count, group_size: the rows' format.

    Nonzero padding bits and codes outside the symmetric range raise ``ValueError``.
    """
    return torch.from_numpy(dequantize_codes(packed, scales, bits, count, group_size))


def dequantize_codes(
    packed: np.ndarray, scales: np.ndarray | None, bits: int, count: int, group_size: int, *, check: bool = True
) -> np.ndarray:
    """:func:`dequantize_packed` in numpy: float32 ``(n, count)`` (the resident head table of
    :mod:`fleet.serve.head_table` decodes with it per request). ``check=False`` skips the checks of padding bits
    and code range, for rows already checked once (stored codes do not change)."""
    _check_bits(bits)
    n = packed.shape[0]
    if bits == 16:
        return np.ascontiguousarray(packed).view("<f2").astype(np.float32).reshape(n, count)
    nbytes = packed_size(count, bits)
    q = np.take(_q_table(bits), packed.reshape(n, nbytes)).view(np.int8)  # (n, nbytes * per): LSB first
    if check and q.shape[1] > count and (q[:, count:] != _q_of_code_zero(bits)).any():  # padding must be code 0
        raise ValueError("packed codes have nonzero padding bits after the last element")
    q = q[:, :count]
    qmin, qmax = _qrange(bits, symmetric=True)
    if check and q.size and (q.min() < qmin or q.max() > qmax):
        raise ValueError(f"codes outside the symmetric range [{qmin}, {qmax}] at bits {bits}")
    scale = np.asarray(scales, dtype="<f2").astype(np.float32).reshape(n, num_groups(count, group_size))  # (n, G)
    # q * scale in float32, one rounding: the numbers of dequantize(q, scale, 0, bits, PerGroup(group_size)).
    # A non-finite stored scale gives non-finite values (0 * inf = nan): callers check, numpy need not warn.
    values = q.astype(np.float32)  # then one same-type multiply (int8 * float32 would cast through buffers)
    with np.errstate(invalid="ignore", over="ignore"):
        values *= np.repeat(scale, group_size, axis=1)[:, :count]
    return values


_Q_TABLES: dict[int, np.ndarray] = {}


def _q_table(bits: int) -> np.ndarray:
    """``(256,)`` words of ``8 // bits`` bytes: word ``b`` holds the signed int8 ``q`` of each code in a packed
    byte ``b``, first code first (LSB first, :func:`pack_codes`), through the offset-binary rule of
    :func:`_codes_to_q`. ``np.take(_q_table(bits), packed).view(np.int8)`` turns packed rows into ``q`` in one 1-D
    gather (vectorised over rows: the resident head table decodes thousands per request)."""
    table = _Q_TABLES.get(bits)
    if table is None:
        per = 8 // bits
        shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
        codes = (np.arange(256, dtype=np.uint8)[:, None] >> shifts) & np.uint8(2**bits - 1)  # (256, per)
        q = _codes_to_q(torch.from_numpy(codes.astype(np.int32)), bits).numpy().astype(np.int8)  # (256, per)
        table = np.ascontiguousarray(q).view(f"u{per}").reshape(256)  # one word per byte value
        _Q_TABLES[bits] = table
    return table


def _q_of_code_zero(bits: int) -> int:
    """The ``q`` that code 0 (padding) decodes to at ``bits``."""
    return int(_q_table(bits)[0:1].view(np.int8)[0])


def dequantize_vector(qv: QuantizedVector) -> Tensor:
    """Float32 ``[P]`` from one stored vector."""
    return dequantize_rows([qv])[0]


# ----------------------------------------------------------------------------- pruning


def magnitude_prune_mask(x: Tensor, sparsity: float) -> Tensor:
    """Keep mask (``True`` = kept) of ``x [..., P]``: per row the ``round(P * (1 - sparsity))`` largest ``|x|``.

    Exactly that many entries are kept per row (ties broken by ``torch.topk``); Han et al. 2015.
    ``round`` is Python's (half to even).
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    if x.ndim < 1:
        raise ValueError("x must have at least one dimension")
    k = round(x.shape[-1] * (1.0 - sparsity))
    keep = x.detach().abs().topk(k, dim=-1).indices  # (..., k)
    return torch.zeros(x.shape, dtype=torch.bool, device=x.device).scatter_(-1, keep, True)


def prune_(x: Tensor, mask: Tensor) -> Tensor:
    """Zero the entries of ``x`` where ``mask`` is ``False``, in place (no autograd record); returns ``x``."""
    if mask.shape != x.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(x.shape)}")
    with torch.no_grad():
        x.masked_fill_(~mask, 0)
    return x
