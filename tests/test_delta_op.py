"""The gated delta rule: chunked == naive == step, gradients included, at awkward sizes and extreme gates."""

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from mmrec.ops import delta_chunked, delta_naive, delta_step, gla_naive
from mmrec.ops.delta import _unit_lower_inverse

# (low, high) of log decay per step: exp(-20) ~ 2e-9 (strong), 1 - 1e-6 (weak), and a mix.
DECAYS = {"strong": (-20.0, -20.0), "weak": (-1e-6, -1e-6), "mixed": (-20.0, -1e-7)}
# beta near 0 (the write barely moves the state), near 1 (full replacement), and spread.
BETAS = {"low": (1e-6, 1e-6), "high": (1 - 1e-6, 1 - 1e-6), "spread": (0.0, 1.0)}
CHUNK = 16


def _uniform(shape, bounds, dtype):
    lo, hi = bounds
    return torch.empty(shape, dtype=dtype).uniform_(lo, hi) if lo != hi else torch.full(shape, lo, dtype=dtype)


def _inputs(T, decay="mixed", beta="spread", dtype=torch.float64, B=2, H=3, dk=8, dv=5, normalise=True):
    q = torch.randn(B, H, T, dk, dtype=dtype)
    k = torch.randn(B, H, T, dk, dtype=dtype)
    if normalise:
        k = F.normalize(k, dim=-1)
    v = torch.randn(B, H, T, dv, dtype=dtype)
    log_g = _uniform((B, H, T), DECAYS[decay], dtype)
    b = _uniform((B, H, T), BETAS[beta], dtype)
    s0 = torch.randn(B, H, dk, dv, dtype=dtype)
    return q, k, v, log_g, b, s0


NAMES = ["q", "k", "v", "log_g", "beta", "state"]


# Every gate extreme at a length that spans chunks and ends mid-chunk; the short lengths at mixed gates.
CASES = [(50, d, b) for d in DECAYS for b in BETAS] + [(T, "mixed", "spread") for T in (1, 5, 16, 17)]


@pytest.mark.parametrize(("T", "decay", "beta"), CASES)
def test_chunked_matches_naive_with_gradients(T, decay, beta):
    ref = [t.requires_grad_() for t in _inputs(T, decay, beta)]
    o_ref, s_ref = delta_naive(*ref)
    w_o, w_s = torch.randn_like(o_ref), torch.randn_like(s_ref)
    ((o_ref * w_o).sum() + (s_ref * w_s).sum()).backward()

    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        inputs = [t.detach().to(dtype).requires_grad_() for t in ref]
        o, s = delta_chunked(*inputs, chunk_size=CHUNK)
        assert o.dtype == dtype and o.shape == o_ref.shape
        assert rel_err(o, o_ref) <= tol, f"output {dtype}"
        assert rel_err(s, s_ref) <= tol, f"final state {dtype}"
        ((o * w_o.to(dtype)).sum() + (s * w_s.to(s.dtype)).sum()).backward()
        for name, a, b in zip(NAMES, inputs, ref, strict=True):
            assert torch.isfinite(a.grad).all(), f"grad of {name} in {dtype}"
            assert rel_err(a.grad, b.grad) <= tol, f"grad of {name} in {dtype}"


@pytest.mark.parametrize("C", [1, 2, 3, 7, 16, 33, 64])
def test_unit_lower_inverse_matches_a_triangular_solve(C):
    """The inverse of the chunked form (block doubling) against LAPACK's solve, on delta-rule systems."""
    k = F.normalize(torch.randn(3, 2, C, 8, dtype=torch.float64), dim=-1)
    beta = torch.rand(3, 2, C, 1, dtype=torch.float64)
    M = (beta * (k @ k.transpose(-1, -2))).tril(-1) + torch.eye(C, dtype=torch.float64)
    eye = torch.eye(C, dtype=torch.float64).expand_as(M)
    want = torch.linalg.solve_triangular(M, eye, upper=False, unitriangular=True)
    assert rel_err(_unit_lower_inverse(M), want) < 1e-13
    assert rel_err(_unit_lower_inverse(M.float()), want) < 1e-6


def test_chunked_matches_naive_for_unnormalised_keys_and_no_initial_state():
    """The three forms agree for any keys; normalisation is for stability, not for the algebra."""
    q, k, v, g, b, _ = _inputs(37, normalise=False, dk=4, dv=3)
    k = 0.5 * k
    o_ref, s_ref = delta_naive(q, k, v, g, b)
    o, s = delta_chunked(q, k, v, g, b, chunk_size=8)
    assert rel_err(o, o_ref) < 1e-10
    assert rel_err(s, s_ref) < 1e-10


@pytest.mark.parametrize("decay", list(DECAYS))
@pytest.mark.parametrize("beta", ["low", "high"])
def test_step_loop_matches_naive(decay, beta):
    q, k, v, g, b, s = _inputs(20, decay, beta, dtype=torch.float32)
    o_ref, s_ref = delta_naive(q, k, v, g, b, s)
    outs = []
    for t in range(20):
        o, s = delta_step(q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t], b[:, :, t], s)
        outs.append(o)
    assert rel_err(torch.stack(outs, 2), o_ref) < 1e-6
    assert rel_err(s, s_ref) < 1e-6


def test_chunk_size_does_not_change_results():
    q, k, v, g, b, s0 = _inputs(130)
    base, s_base = delta_chunked(q, k, v, g, b, s0, chunk_size=1)
    for c in (7, 64, 129, 1000):
        o, s = delta_chunked(q, k, v, g, b, s0, chunk_size=c)
        assert rel_err(o, base) < 1e-12
        assert rel_err(s, s_base) < 1e-12


@pytest.mark.parametrize("cuts", [(1,), (16,), (5, 6, 40), (17, 33, 34, 69)])
def test_split_and_carry_the_state_equals_the_whole(cuts):
    q, k, v, g, b, s0 = _inputs(70)
    whole, s_whole = delta_chunked(q, k, v, g, b, s0, chunk_size=CHUNK)
    pieces, s = [], s0
    for lo, hi in zip((0, *cuts), (*cuts, 70), strict=True):
        o, s = delta_chunked(*(t[:, :, lo:hi] for t in (q, k, v, g, b)), s, chunk_size=CHUNK)
        pieces.append(o)
    assert rel_err(torch.cat(pieces, 2), whole) < 1e-12
    assert rel_err(s, s_whole) < 1e-12


def test_gradcheck_chunked():
    q, k, v, g, b, s0 = _inputs(7, B=1, H=2, dk=3, dv=2)
    g = -torch.rand_like(g) * 2
    b = torch.rand_like(b)
    inputs = [t.requires_grad_() for t in (q, k, v, g, b, s0)]
    # fast_mode checks random projections of every input's Jacobian (the full one takes ~10x longer);
    # the test above compares every gradient with the loop's exactly.
    assert torch.autograd.gradcheck(lambda *a: delta_chunked(*a, chunk_size=3), inputs, fast_mode=True)


def test_a_second_write_replaces_the_first():
    """With g = 1 and beta = 1, writing a unit key twice leaves only the second value under it.

    Linear attention adds the two writes instead; the contrast is the point of the delta rule.
    """
    dk, dv = 6, 4
    key = F.normalize(torch.randn(dk, dtype=torch.float64), dim=0)
    other = F.normalize(torch.randn(dk, dtype=torch.float64), dim=0)
    first, second, noise = (torch.randn(dv, dtype=torch.float64) for _ in range(3))
    # Steps: write (key, first), write (other, noise), write (key, second), then read with key.
    k = torch.stack([key, other, key, torch.zeros(dk, dtype=torch.float64)]).view(1, 1, 4, dk)
    v = torch.stack([first, noise, second, torch.zeros(dv, dtype=torch.float64)]).view(1, 1, 4, dv)
    q = torch.zeros(1, 1, 4, dk, dtype=torch.float64)
    q[0, 0, 3] = key
    log_g = torch.zeros(1, 1, 4, dtype=torch.float64)
    beta = torch.ones(1, 1, 4, dtype=torch.float64)

    for fn in (delta_naive, lambda *a: delta_chunked(*a, chunk_size=2)):
        o, S = fn(q, k, v, log_g, beta)
        assert torch.allclose(o[0, 0, 3], second, atol=1e-12)
        assert torch.allclose(key @ S[0, 0], second, atol=1e-12)

    o_gla, _ = gla_naive(q, k, v, log_g)
    read = o_gla[0, 0, 3]
    assert not torch.allclose(read, second, atol=1e-3)
    assert torch.allclose(read, first + second + (key @ other) * noise, atol=1e-12)


def test_beta_zero_leaves_the_state_alone():
    q, k, v, g, b, s0 = _inputs(9)
    o, s = delta_chunked(q, k, v, torch.zeros_like(g), torch.zeros_like(b), s0, chunk_size=4)
    assert torch.allclose(s, s0, atol=1e-14)
    assert torch.allclose(o, q @ s0, atol=1e-12)


def test_empty_sequence_keeps_state():
    q, k, v, g, b, s0 = _inputs(0, dtype=torch.float32)
    o, s = delta_chunked(q, k, v, g, b, s0)
    assert o.shape == (2, 3, 0, 5)
    assert torch.equal(s, s0)
    o, s = delta_naive(q, k, v, g, b, s0)
    assert o.shape == (2, 3, 0, 5) and torch.equal(s, s0)


def test_bf16_autocast_keeps_float32_state():
    q, k, v, g, b, s0 = _inputs(130, dtype=torch.float32)
    o_ref, s_ref = delta_naive(q, k, v, g, b, s0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, s = delta_chunked(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, b, s0)
    assert s.dtype == torch.float32 and o.dtype == torch.bfloat16
    assert rel_err(o.float(), o_ref) < 3e-2
    assert rel_err(s, s_ref) < 3e-2


def test_bad_shapes_and_chunk_size_are_refused_by_name():
    q, k, v, g, b, s0 = _inputs(5)
    with pytest.raises(ValueError, match="beta must be"):
        delta_chunked(q, k, v, g, b[..., :4], s0)
    with pytest.raises(ValueError, match="state must be"):
        delta_naive(q, k, v, g, b, s0[..., :2])
    with pytest.raises(ValueError, match="v must be"):
        delta_step(q[:, :, 0], k[:, :, 0], v[:, :1, 0], g[:, :, 0], b[:, :, 0], s0)
    with pytest.raises(ValueError, match="chunk_size"):
        delta_chunked(q, k, v, g, b, s0, chunk_size=0)
