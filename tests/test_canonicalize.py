"""The gauge-fixed SVD form: equal to a dense SVD on small shapes, invariant under B·G, G⁻¹·A."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_lora.adapter import LoraModule
from edge_lora.stages.canonicalize import (canonicalize_module, difference_frobenius_sq, energy_ranks,
                                           frobenius_sq, output_error_sq, relative_error, svd_factors)


def random_module(d_out, d_in, r, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return LoraModule(name="m", kind="linear", A=torch.randn(r, d_in, generator=g),
                      B=torch.randn(d_out, r, generator=g), scale=scale, alpha=scale * r)


@pytest.mark.parametrize("d_out,d_in,r", [(40, 24, 4), (24, 40, 8), (16, 16, 16), (6, 50, 8), (50, 6, 8)])
def test_matches_dense_svd(d_out, d_in, r):
    m = random_module(d_out, d_in, r)
    dense = m.delta()
    c = canonicalize_module(m)
    k = min(d_out, d_in, r)
    S_dense = torch.linalg.svdvals(dense)[:k]
    torch.testing.assert_close(c.singular_values.double(), S_dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.delta(), dense, rtol=1e-5, atol=1e-5)
    U = c.B.double() / c.singular_values.double().sqrt()
    torch.testing.assert_close(U.T @ U, torch.eye(k, dtype=torch.float64), atol=1e-5, rtol=0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), d_out=st.integers(2, 30), d_in=st.integers(2, 30), r=st.integers(1, 8))
def test_gauge_invariance(seed, d_out, d_in, r):
    r = min(r, d_out, d_in)
    m = random_module(d_out, d_in, r, seed)
    g = torch.Generator().manual_seed(seed + 7)
    G = torch.randn(r, r, generator=g, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
    moved = LoraModule(name="m", kind="linear", A=(torch.linalg.inv(G) @ m.A.double()).float(),
                       B=(m.B.double() @ G).float(), scale=m.scale, alpha=m.alpha)
    a, b = canonicalize_module(m), canonicalize_module(moved)
    S = a.singular_values
    if S.numel() > 1 and float(((S[:-1] - S[1:]) / S[0]).min()) < 1e-3:
        return  # (near-)degenerate singular values: the basis inside the degenerate block is not unique
    torch.testing.assert_close(a.B, b.B, rtol=1e-3, atol=1e-4 * float(S[0]) ** 0.5)
    torch.testing.assert_close(a.A, b.A, rtol=1e-3, atol=1e-4 * float(S[0]) ** 0.5)


def test_sign_convention():
    U, S, V = svd_factors(torch.randn(20, 4, dtype=torch.float64), torch.randn(4, 30, dtype=torch.float64))
    pivot = U.abs().argmax(dim=0)
    assert (U[pivot, torch.arange(4)] > 0).all()
    assert (S[:-1] >= S[1:]).all()


def test_gram_trace_errors_equal_dense():
    a, b = random_module(30, 20, 6, seed=1), random_module(30, 20, 3, seed=2)
    assert frobenius_sq(a.B, a.A) == pytest.approx(float((a.B.double() @ a.A.double()).norm() ** 2), rel=1e-9)
    dense_diff = (a.delta() - b.delta()).norm() ** 2
    assert difference_frobenius_sq(a.B * a.scale, a.A, b.B * b.scale, b.A) == pytest.approx(float(dense_diff), rel=1e-9)
    assert relative_error(a, b) == pytest.approx(float(dense_diff.sqrt() / a.delta().norm()), rel=1e-9)
    X = torch.randn(20, 50, dtype=torch.float64)
    assert output_error_sq(a.B, a.A, X @ X.T) == pytest.approx(
        float((a.B.double() @ a.A.double() @ X).norm() ** 2), rel=1e-9)


def test_truncation_error_is_tail_energy():
    c = canonicalize_module(random_module(40, 30, 8, seed=3))
    k = 5
    cut = LoraModule(name="m", kind="linear", A=c.A[:k], B=c.B[:, :k], scale=1.0, alpha=k)
    S = c.singular_values.double()
    expected = float((S[k:] ** 2).sum().sqrt() / (S ** 2).sum().sqrt())
    assert relative_error(c, cut) == pytest.approx(expected, rel=1e-5)


def test_energy_ranks():
    assert energy_ranks(torch.tensor([3.0, 1.0, 0.1])) == {"50%": 1, "90%": 2, "99%": 2}  # 9 / 10.01 < 0.9
    assert energy_ranks(torch.zeros(3)) == {"50%": 0, "90%": 0, "99%": 0}
