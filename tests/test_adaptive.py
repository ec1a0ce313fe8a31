"""fleet.compression.adaptive.choose_bits: fewest passing bits per campaign, never a failing head, fp16 last."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fleet.compression.adaptive import choose_bits
from fleet.compression.quant import dequantize_rows, quantize_rows

P = 193


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # deterministic data for the tests that draw with torch.randn


LOSSY = (1, 2, 4, 8)


def _params(c=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, P, generator=g) * torch.logspace(-1, 1, c)[:, None]  # (C, P)


def _error_gate(params, tolerance):
    """Passes campaign i when max |head - teacher head| <= tolerance[i] (relative to max |params|)."""
    bound = tolerance * params.abs().amax(-1)  # (C,)

    def gate(heads):
        return (heads - params).abs().amax(-1) <= bound

    return gate


def test_picks_fewest_passing_bits_and_never_a_failing_head():
    params = _params()
    tolerance = torch.tensor([1.0, 0.9, 0.5, 0.2, 0.1, 0.05, 0.02, 0.005, 1e-3, 1e-4, 1e-9, 0.0])
    gate = _error_gate(params, tolerance)
    vectors, bits = choose_bits(params, gate, group_size=64)
    assert bits.dtype == torch.long and bits.shape == (12,)
    # brute force: for every row, the first lossy width that passes, else 16
    passes = {b: gate(dequantize_rows(quantize_rows(params, b, 64))) for b in LOSSY}
    expected = [next((b for b in LOSSY if passes[b][i]), 16) for i in range(12)]
    assert bits.tolist() == expected
    assert len(set(expected)) >= 4  # the tolerances exercise several widths, 16 included
    assert [v.bits for v in vectors] == expected
    heads = dequantize_rows(vectors)
    lossy_rows = bits < 16
    assert gate(heads)[lossy_rows].all()  # every quantized head passes the gate it was chosen by
    assert torch.equal(heads[~lossy_rows], params[~lossy_rows].half().float())
    for i, v in enumerate(vectors):  # same bytes as quantizing the row alone at its width
        assert v == quantize_rows(params[i : i + 1], v.bits, 64)[0]


def test_gate_sees_exactly_the_stored_heads():
    params = _params(6, seed=1)
    seen = []

    def gate(heads):
        seen.append(heads.clone())
        return torch.zeros(6, dtype=torch.bool)

    choose_bits(params, gate, group_size=32)
    assert len(seen) == len(LOSSY)  # once per lossy candidate, fp16 is not gated
    for b, heads in zip(LOSSY, seen):
        assert torch.equal(heads, dequantize_rows(quantize_rows(params, b, 32)))


def test_falls_back_to_fp16():
    params = _params(5)
    vectors, bits = choose_bits(params, lambda h: torch.zeros(5, dtype=torch.bool))
    assert (bits == 16).all() and all(v.bits == 16 for v in vectors)
    assert torch.equal(dequantize_rows(vectors), params.half().float())
    # a gate only fp16 can pass: the rows end at 16 bits and pass it
    gate = _error_gate(params, torch.full((5,), 1e-3))
    vectors, bits = choose_bits(params, gate)
    assert (bits == 16).all() and gate(dequantize_rows(vectors)).all()


def test_stops_calling_the_gate_once_all_rows_pass():
    calls = []

    def gate(heads):
        calls.append(1)
        return torch.ones(heads.shape[0], dtype=torch.bool)

    _vectors, bits = choose_bits(_params(4), gate)
    assert len(calls) == 1 and (bits == 1).all()


def test_candidates_subset_and_validation():
    params = _params(4)
    gate = _error_gate(params, torch.full((4,), 0.2))
    _, bits = choose_bits(params, gate, candidates=(8, 4))  # order does not matter; 16 is implicit
    assert set(bits.tolist()) <= {4, 8, 16}
    _, bits = choose_bits(params, gate, candidates=())
    assert (bits == 16).all()
    with pytest.raises(ValueError):
        choose_bits(params, gate, candidates=(3,))
    with pytest.raises(ValueError):
        choose_bits(params, lambda h: torch.ones(3, dtype=torch.bool))  # wrong length
    with pytest.raises(ValueError):
        choose_bits(params, lambda h: torch.ones(4))  # not bool
    with pytest.raises(ValueError):
        choose_bits(params[0], gate)  # not [C, P]


@given(
    table=hnp.arrays(np.bool_, st.tuples(st.just(len(LOSSY)), st.integers(1, 20))),
)
@settings(max_examples=100, deadline=None)
def test_first_passing_candidate_for_any_verdicts(table):
    """Whatever the gate says at each width (monotone or not), a row gets its first passing width."""
    c = table.shape[1]
    calls = []

    def gate(heads):
        calls.append(1)
        return torch.from_numpy(table[len(calls) - 1].copy())

    vectors, bits = choose_bits(torch.randn(c, 10), gate, group_size=4)
    expected = [next((b for k, b in enumerate(LOSSY) if table[k, i]), 16) for i in range(c)]
    assert bits.tolist() == expected
    assert [v.bits for v in vectors] == expected
    pending = np.ones(c, dtype=bool)  # the gate is called until no row is pending
    n_calls = 0
    for k in range(len(LOSSY)):
        if not pending.any():
            break
        n_calls += 1
        pending &= ~table[k]
    assert len(calls) == n_calls
