"""fleet.compression.quant: quantization math, STE, bit packing (pinned format), storage vectors, pruning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fleet.compression.quant import (
    PACKABLE_BITS,
    PerGroup,
    PerTensor,
    QuantizedVector,
    choose_qparams,
    dequantize,
    dequantize_rows,
    dequantize_vector,
    fake_quantize,
    magnitude_prune_mask,
    pack_codes,
    prune_,
    quantize,
    quantize_rows,
    quantize_vector,
    unpack_codes,
)
from fleet.core.constants import SUPPORTED_BITS

P = 193


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # deterministic data for the tests that draw with torch.randn  # a head's parameter count


def _roundtrip(x, bits, granularity, symmetric=True):
    scale, zp = choose_qparams(x, bits, granularity, symmetric)
    q = quantize(x, scale, zp, bits, granularity, symmetric=symmetric)
    return q, scale, zp, dequantize(q, scale, zp, bits, granularity)


def _per_entry(scale, group_size, p):
    return scale.repeat_interleave(group_size, dim=-1)[..., :p]


# ----------------------------------------------------------------------------- packing format (pinned)


@pytest.mark.parametrize(
    "bits, codes, expected",
    [
        (2, [1, 2, 3, 0], b"\x39"),  # 01 | 10<<2 | 11<<4 | 00<<6 = 0b00111001
        (2, [3, 3, 3, 3, 1], b"\xff\x01"),
        (1, [1, 0, 1, 1, 0, 0, 0, 0, 1], b"\x0d\x01"),
        (4, [1, 15, 7], b"\xf1\x07"),
        (8, [0, 128, 255], b"\x00\x80\xff"),
        (4, [], b""),
    ],
)
def test_pack_codes_literal(bits, codes, expected):
    assert pack_codes(np.array(codes, dtype=np.uint8), bits) == expected
    assert unpack_codes(expected, bits, len(codes)).tolist() == codes


def test_pack_bits1_equals_numpy_packbits_little():
    codes = np.random.default_rng(0).integers(0, 2, size=37).astype(np.uint8)
    assert pack_codes(codes, 1) == np.packbits(codes, bitorder="little").tobytes()


def _reference_pack(codes, bits):
    """The contract, bit by bit: element i at byte (i*bits)//8, bit (i*bits)%8, LSB first."""
    out = bytearray(-(-len(codes) * bits // 8))
    for i, c in enumerate(codes):
        for j in range(bits):
            pos = i * bits + j
            out[pos // 8] |= ((int(c) >> j) & 1) << (pos % 8)
    return bytes(out)


@st.composite
def _codes(draw):
    bits = draw(st.sampled_from(PACKABLE_BITS))
    n = draw(st.integers(0, 300))
    codes = draw(hnp.arrays(np.uint8, n, elements=st.integers(0, 2**bits - 1)))
    return bits, codes


@given(_codes())
@settings(max_examples=300, deadline=None)
def test_pack_unpack_roundtrip_matches_reference(bits_codes):
    bits, codes = bits_codes
    data = pack_codes(codes, bits)
    assert len(data) == -(-len(codes) * bits // 8)
    assert data == _reference_pack(codes, bits)
    out = unpack_codes(data, bits, len(codes))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, codes)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        pack_codes(np.array([4], dtype=np.uint8), 2)  # code >= 2**bits
    with pytest.raises(ValueError):
        pack_codes(np.array([0, 1], dtype=np.uint8), 16)
    with pytest.raises(ValueError):
        pack_codes(np.array([-1]), 4)
    with pytest.raises(ValueError):
        unpack_codes(b"\x00\x00", 2, 4)  # 4 codes of 2 bits are 1 byte
    with pytest.raises(ValueError):
        unpack_codes(b"\x40", 2, 3)  # 4th (padding) code is nonzero


# ----------------------------------------------------------------------------- stored vectors (pinned)


def test_quantized_vector_literals():
    # int8: max 63.5 -> scale 0.5 (exact in fp16); q = [127, -64, 0, 32]; code = q + 128
    qv = quantize_vector(torch.tensor([63.5, -32.0, 0.0, 16.0]), 8, group_size=64)
    assert (qv.bits, qv.count, qv.group_size) == (8, 4, 64)
    assert qv.packed == b"\xff\x40\x80\xa0"
    assert qv.scales == b"\x00\x38"  # float16 0.5, little endian
    # ternary: delta = 0.7 * 0.525; q = [1, -1, 0, 0]; codes [2, 0, 1, 1]; scale = mean(1, 1) = 1
    qv = quantize_vector(torch.tensor([1.0, -1.0, 0.1, 0.0]), 2)
    assert (qv.packed, qv.scales) == (b"\x52", b"\x00\x3c")
    # binary: q = [1, -1, 1, 1] (sign(0) = +1); codes [1, 0, 1, 1]; scale = mean|x| = 1
    qv = quantize_vector(torch.tensor([0.5, -1.5, 0.0, 2.0]), 1)
    assert (qv.packed, qv.scales) == (b"\x0d", b"\x00\x3c")
    assert dequantize_vector(qv).tolist() == [1.0, -1.0, 1.0, 1.0]
    # int4, two groups of 2: scales [2/7, 7/7] -> q [7, -7 | 7, 0]; codes [15, 1, 15, 8]
    qv = quantize_vector(torch.tensor([2.0, -2.0, 1.0, 0.0]), 4, group_size=2)
    assert qv.packed == b"\x1f\x8f"
    scales = np.frombuffer(qv.scales, "<f2")  # the smallest float16 >= max|x| / 7 per group
    assert (scales.astype(np.float64) >= [2 / 7, 1 / 7]).all()
    assert (np.nextafter(scales, np.float16(0)).astype(np.float64) < [2 / 7, 1 / 7]).all()
    # float16 fallback: raw little-endian halves, no scales
    qv = quantize_vector(torch.tensor([1.0, -2.0]), 16)
    assert (qv.packed, qv.scales) == (b"\x00\x3c\x00\xc0", b"")


def test_quantized_vector_sizes():
    x = torch.randn(P)
    sizes = {b: quantize_vector(x, b, 64) for b in SUPPORTED_BITS}
    assert {b: (len(v.packed), len(v.scales)) for b, v in sizes.items()} == {
        1: (25, 8),
        2: (49, 8),
        4: (97, 8),
        8: (193, 8),
        16: (386, 0),
    }
    assert sizes[4].nbytes == 105


def test_quantized_vector_validates():
    with pytest.raises(ValueError):
        QuantizedVector(bits=4, count=4, group_size=64, packed=b"\x00", scales=b"\x00\x3c")  # needs 2 bytes
    with pytest.raises(ValueError):
        QuantizedVector(bits=3, count=0, group_size=64, packed=b"", scales=b"")
    with pytest.raises(ValueError):
        QuantizedVector(bits=16, count=1, group_size=64, packed=b"\x00\x3c", scales=b"\x00\x3c")
    corrupt = QuantizedVector(bits=8, count=1, group_size=64, packed=b"\x00", scales=b"\x00\x3c")  # q = -128
    with pytest.raises(ValueError):
        dequantize_vector(corrupt)


def test_quantize_vector_rejects_unstorable():
    with pytest.raises(ValueError):
        quantize_vector(torch.tensor([1.0, float("nan")]), 8)
    with pytest.raises(ValueError):
        quantize_vector(torch.tensor([float("-inf"), 1.0]), 4)
    with pytest.raises(ValueError):
        quantize_vector(torch.tensor([1e6]), 16)
    with pytest.raises(ValueError):
        quantize_vector(torch.tensor([1e8]), 8)  # scale beyond float16
    with pytest.raises(ValueError):
        quantize_vector(torch.randn(2, 3), 8)


# ----------------------------------------------------------------------------- error bounds


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("granularity", [PerTensor(), PerGroup(64), PerGroup(7)])
def test_int_error_at_most_half_a_step(bits, granularity):
    x = torch.randn(8, P) * torch.logspace(-3, 2, 8)[:, None]  # (C, P), rows of very different scale
    q, scale, zp, xhat = _roundtrip(x, bits, granularity)
    gs = P if isinstance(granularity, PerTensor) else granularity.group_size
    qmax = 2 ** (bits - 1) - 1
    assert q.abs().max() <= qmax and (zp == 0).all()
    step = _per_entry(scale, gs, P)  # (C, P)
    assert ((xhat - x).abs() <= step / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("bits", [4, 8])
@given(x=hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(-1e3, 1e3, width=32)))
@settings(max_examples=100, deadline=None)
def test_stored_int_error_at_most_half_a_step(bits, x):
    """float16 scales are rounded up, so the half-step bound survives storage."""
    qv = quantize_vector(torch.from_numpy(x), bits, group_size=16)
    scale = torch.from_numpy(np.frombuffer(qv.scales, "<f2").astype(np.float32))
    step = _per_entry(scale, 16, len(x))
    err = (dequantize_vector(qv) - torch.from_numpy(x)).abs()
    assert (err <= step / 2 * (1 + 1e-5) + 1e-30).all()


@pytest.mark.parametrize("bits, bound", [(1, 0.65), (2, 0.50), (4, 0.15), (8, 0.01)])
def test_relative_error_on_gaussian(bits, bound):
    """Documented bounds of ||x - x_hat|| / ||x|| on N(0, 1) heads with groups of 64.

    Theory for large groups: binary sqrt(1 - 2/pi) = 0.60, ternary (TWN) about 0.44.
    """
    x = torch.randn(64, P, generator=torch.Generator().manual_seed(0))
    xhat = dequantize_rows(quantize_rows(x, bits, group_size=64))
    assert float((xhat - x).norm() / x.norm()) < bound


def test_ternary_and_binary_schemes():
    x = torch.randn(4, P, generator=torch.Generator().manual_seed(1))
    q, scale, _, xhat = _roundtrip(x, 2, PerTensor())
    delta = 0.7 * x.abs().mean(-1, keepdim=True)  # (C, 1)
    assert torch.equal(q, (torch.sign(x) * (x.abs() > delta)).int())
    above = x.abs() > delta
    torch.testing.assert_close(scale[:, 0], (x.abs() * above).sum(-1) / above.sum(-1))
    q, scale, _, xhat = _roundtrip(x, 1, PerTensor())
    assert set(q.unique().tolist()) == {-1, 1}
    torch.testing.assert_close(scale[:, 0], x.abs().mean(-1))
    torch.testing.assert_close(xhat, torch.sign(x) * scale)


@pytest.mark.parametrize("bits", [4, 8])
def test_affine_error_and_exact_zero(bits):
    x = torch.cat([torch.rand(5, P) * 3 - 1, torch.zeros(5, 1)], dim=1)  # (C, P+1), skewed range, has 0
    q, scale, zp, xhat = _roundtrip(x, bits, PerGroup(32), symmetric=False)
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    assert zp.min() >= 0 and zp.max() <= 2**bits - 1
    assert ((xhat - x).abs() <= _per_entry(scale, 32, P + 1) / 2 * (1 + 1e-4) + 1e-7).all()
    assert (xhat[:, -1] == 0).all()  # zero is exactly representable (Jacob et al.)
    sym_err = (_roundtrip(x, bits, PerGroup(32))[3] - x).abs().mean()
    assert (xhat - x).abs().mean() < sym_err  # skewed data: affine uses the range better


@pytest.mark.parametrize("bits", [1, 2, 16])
def test_affine_only_for_int(bits):
    with pytest.raises(ValueError):
        choose_qparams(torch.randn(8), bits, PerTensor(), symmetric=False)


def test_unsupported_bits_and_granularity():
    with pytest.raises(ValueError):
        choose_qparams(torch.randn(8), 3, PerTensor())
    with pytest.raises(ValueError):
        PerGroup(0)
    with pytest.raises(TypeError):
        choose_qparams(torch.randn(8), 8, "per_tensor")


def test_float16_fallback():
    x = torch.randn(3, P)
    q, _, _, xhat = _roundtrip(x, 16, PerTensor())
    assert q.dtype == torch.int32
    assert torch.equal(xhat, x.half().float())
    assert torch.equal(dequantize_rows(quantize_rows(x, 16)), x.half().float())


# ----------------------------------------------------------------------------- granularity


def test_qparam_shapes():
    x = torch.randn(5, P)
    assert choose_qparams(x[0], 8, PerTensor())[0].shape == (1,)
    assert choose_qparams(x[0], 8, PerGroup(64))[0].shape == (4,)  # ceil(193 / 64)
    scale, zp = choose_qparams(x, 8, PerGroup(64))
    assert scale.shape == zp.shape == (5, 4) and zp.dtype == torch.int32
    assert choose_qparams(x, 2, PerTensor())[0].shape == (5, 1)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_rows_are_independent(bits):
    x = torch.randn(6, P)
    q, scale, _, xhat = _roundtrip(x, bits, PerGroup(64))
    for i in range(6):
        qi, si, _, xi = _roundtrip(x[i], bits, PerGroup(64))
        assert torch.equal(qi, q[i]) and torch.equal(si, scale[i]) and torch.equal(xi, xhat[i])


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_large_group_is_per_tensor(bits):
    x = torch.randn(3, P)
    assert torch.equal(_roundtrip(x, bits, PerGroup(P))[3], _roundtrip(x, bits, PerTensor())[3])
    assert torch.equal(_roundtrip(x, bits, PerGroup(1000))[3], _roundtrip(x, bits, PerTensor())[3])


def test_per_group_isolates_an_outlier():
    x = torch.randn(P, generator=torch.Generator().manual_seed(2)) * 0.01
    x[0] = 10.0  # one outlier in the first group
    err_tensor = (_roundtrip(x, 4, PerTensor())[3] - x)[64:].abs().max()
    err_group = (_roundtrip(x, 4, PerGroup(64))[3] - x)[64:].abs().max()
    assert err_group < err_tensor / 5  # per tensor, the step 10/7 rounds every small entry to 0


def test_partial_last_group():
    x = torch.randn(P)
    _, scale, _, xhat = _roundtrip(x, 8, PerGroup(64))
    assert scale[-1] == x[-1].abs() / 127  # the last group holds one entry
    torch.testing.assert_close(xhat[-1], x[-1])


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_group(bits, symmetric):
    if not symmetric and bits not in (4, 8):
        return
    x = torch.randn(2, 3 * 16)
    x[0, 16:32] = 0.0  # one zero group
    x[1] = 0.0  # a zero row
    _, scale, _, xhat = _roundtrip(x, bits, PerGroup(16), symmetric)
    assert torch.isfinite(xhat).all()
    assert (xhat[0, 16:32] == 0).all() and (xhat[1] == 0).all()
    if bits != 16:
        assert scale[0, 1] == 0 and (scale[1] == 0).all()
    y = fake_quantize(x.clone().requires_grad_(), bits, PerGroup(16), symmetric)
    assert torch.isfinite(y).all()
    if symmetric:
        assert (dequantize_vector(quantize_vector(x[1], bits, 16)) == 0).all()
        assert (dequantize_vector(quantize_vector(x[0], bits, 16))[16:32] == 0).all()


# ----------------------------------------------------------------------------- straight-through estimator


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("granularity", [PerTensor(), PerGroup(16)])
def test_fake_quantize_forward_equals_roundtrip(bits, granularity):
    x = torch.randn(3, P)
    torch.testing.assert_close(fake_quantize(x, bits, granularity), _roundtrip(x, bits, granularity)[3], rtol=0, atol=0)


@pytest.mark.parametrize("bits", [1, 2])
def test_ste_gradient_clipped_to_representable_range(bits):
    x = torch.tensor([3.0, -3.0, 0.5, -0.5, 0.2, 0.0, 1.0, -1.0], requires_grad=True)
    scale, _ = choose_qparams(x.detach(), bits, PerTensor())  # binary/ternary: clip = scale
    fake_quantize(x, bits, PerTensor()).sum().backward()
    expected = (x.detach().abs() <= scale).float()
    assert torch.equal(x.grad, expected)
    assert expected[:2].sum() == 0 and expected[2:].sum() > 0  # both cases occur


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_ste_gradient_is_one_inside_int_range(bits):
    """Integer scales cover max|x|, so every entry is inside the range: gradient 1 everywhere."""
    x = (torch.randn(4, P) * 5).requires_grad_()
    upstream = torch.randn(4, P)
    (fake_quantize(x, bits, PerGroup(64)) * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)


def test_ste_affine_gradient():
    """Affine: every entry rounds into [0, 2**bits - 1] (rounding the zero point moves the grid by
    at most half a step), so no entry is clamped and every gradient passes."""
    x = torch.randn(3, P, requires_grad=True)
    fake_quantize(x, 8, PerGroup(64), symmetric=False).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_ste_trains_toward_target():
    """A few QAT steps through fake_quantize lower a loss: the estimator carries useful gradient."""
    torch.manual_seed(0)
    target = torch.randn(P)
    w = torch.zeros(P, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    losses = []
    for _ in range(20):
        loss = ((fake_quantize(w, 4, PerGroup(64)) - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


# ----------------------------------------------------------------------------- rows vs vectors


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", [1, 16, 64, 500])
def test_quantize_rows_equals_per_row_vectors(bits, group_size):
    x = torch.randn(7, P) * torch.logspace(-2, 1, 7)[:, None]
    rows = quantize_rows(x, bits, group_size)
    assert rows == [quantize_vector(x[i], bits, group_size) for i in range(7)]
    xhat = dequantize_rows(rows)
    assert xhat.shape == (7, P) and xhat.dtype == torch.float32
    for i in range(7):
        assert torch.equal(xhat[i], dequantize_vector(rows[i]))


def test_dequantize_rows_mixed_bits():
    x = torch.randn(len(SUPPORTED_BITS), P)
    qvs = [quantize_vector(x[i], b, 32 if b == 4 else 64) for i, b in enumerate(SUPPORTED_BITS)]
    xhat = dequantize_rows(qvs)
    for i, qv in enumerate(qvs):
        assert torch.equal(xhat[i], dequantize_vector(qv))
    assert dequantize_rows([]).shape == (0, 0)
    with pytest.raises(ValueError):
        dequantize_rows([quantize_vector(torch.randn(3), 8), quantize_vector(torch.randn(4), 8)])


# ----------------------------------------------------------------------------- pruning


@given(
    shape=st.tuples(st.integers(1, 5), st.integers(1, 300)),
    sparsity=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=100, deadline=None)
def test_prune_mask_keeps_exact_count_of_largest(shape, sparsity, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    mask = magnitude_prune_mask(x, sparsity)
    k = round(shape[1] * (1 - sparsity))
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert (mask.sum(-1) == k).all()
    if 0 < k < shape[1]:  # every kept |x| >= every dropped |x|
        a = x.abs()
        kept_min = torch.where(mask, a, torch.inf).amin(-1)
        dropped_max = torch.where(mask, -torch.inf, a).amax(-1)
        assert (kept_min >= dropped_max).all()


def test_prune_in_place():
    x = torch.tensor([[0.1, -5.0, 0.3, 2.0], [4.0, 0.0, -1.0, 0.5]])
    mask = magnitude_prune_mask(x, 0.5)
    assert mask.tolist() == [[False, True, False, True], [True, False, True, False]]
    out = prune_(x, mask)
    assert out is x
    assert x.tolist() == [[0.0, -5.0, 0.0, 2.0], [4.0, 0.0, -1.0, 0.0]]
    w = torch.randn(10, requires_grad=True)  # a leaf parameter can be pruned too
    prune_(w, magnitude_prune_mask(w, 0.9))
    assert (w != 0).sum() == 1


def test_prune_rejects_bad_input():
    with pytest.raises(ValueError):
        magnitude_prune_mask(torch.randn(4), 1.5)
    with pytest.raises(ValueError):
        prune_(torch.randn(4), torch.ones(3, dtype=torch.bool))
