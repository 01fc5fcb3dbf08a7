"""Every fast op against its naive twin, at awkward sizes and extreme decays."""

import pytest
import torch

from conftest import rel_err
from mmrec.ops import gla_chunked, gla_naive, gla_step, linear_scan, linear_scan_naive, segsum

# (low, high) of log decay per step: gamma ~ 1e-4 (strong), 1 - 1e-6 (weak), and a mix.
DECAYS = {"strong": (-9.21, -9.21), "weak": (-1e-6, -1e-6), "mixed": (-12.0, -1e-7)}


def _log_decay(shape, kind, dtype=torch.float64):
    lo, hi = DECAYS[kind]
    return torch.empty(shape, dtype=dtype).uniform_(lo, hi) if lo != hi else torch.full(shape, lo, dtype=dtype)


def _gla_inputs(T, dtype=torch.float64, kind="mixed", B=2, H=3, dk=8, dv=5):
    q = torch.randn(B, H, T, dk, dtype=dtype)
    k = torch.randn(B, H, T, dk, dtype=dtype)
    v = torch.randn(B, H, T, dv, dtype=dtype)
    g = _log_decay((B, H, T), kind, dtype)
    s0 = torch.randn(B, H, dk, dv, dtype=dtype)
    return q, k, v, g, s0


def test_segsum_matches_differences_of_sums():
    x = torch.randn(3, 7, dtype=torch.float64)
    s = segsum(x)
    for i in range(7):
        for j in range(7):
            want = x[:, j + 1 : i + 1].sum(-1) if j <= i else torch.full((3,), float("-inf"), dtype=x.dtype)
            assert torch.allclose(s[:, i, j], want)


@pytest.mark.parametrize("N", [0, 1, 15, 16, 17, 100])
@pytest.mark.parametrize("block", [1, 4, 16])
@pytest.mark.parametrize("kind", list(DECAYS))
def test_linear_scan_matches_naive(N, block, kind):
    log_a = _log_decay((2, 3, N), kind)
    x = torch.randn(2, 3, N, 4, dtype=torch.float64)
    h0 = torch.randn(2, 3, 4, dtype=torch.float64)
    want_enter, want_final = linear_scan_naive(log_a, x, h0)
    got_enter, got_final = linear_scan(log_a, x, h0, block)
    assert got_enter.shape == (2, 3, N, 4)
    assert torch.allclose(got_enter, want_enter, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got_final, want_final, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T", [1, 63, 64, 65, 1000])
@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("kind", list(DECAYS))
def test_gla_chunked_matches_naive_with_gradients(T, chunk, kind):
    ref_inputs = [t.requires_grad_() for t in _gla_inputs(T, torch.float64, kind)]
    o_ref, s_ref = gla_naive(*ref_inputs)
    w_o, w_s = torch.randn_like(o_ref), torch.randn_like(s_ref)
    ((o_ref * w_o).sum() + (s_ref * w_s).sum()).backward()

    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        inputs = [t.detach().to(dtype).requires_grad_() for t in ref_inputs]
        o, s = gla_chunked(*inputs, chunk_size=chunk)
        assert o.dtype == dtype
        assert rel_err(o, o_ref) <= tol, f"output {dtype}"
        assert rel_err(s, s_ref) <= tol, f"final state {dtype}"
        ((o * w_o.to(dtype)).sum() + (s * w_s.to(s.dtype)).sum()).backward()
        for name, a, b in zip(["q", "k", "v", "log_g", "state"], inputs, ref_inputs, strict=True):
            assert rel_err(a.grad, b.grad) <= tol, f"grad of {name} in {dtype}"


@pytest.mark.parametrize("kind", list(DECAYS))
def test_gla_step_matches_naive(kind):
    q, k, v, g, s = _gla_inputs(20, torch.float32, kind)
    o_ref, s_ref = gla_naive(q, k, v, g, s)
    outs = []
    for t in range(20):
        o, s = gla_step(q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t], s)
        outs.append(o)
    assert rel_err(torch.stack(outs, 2), o_ref) < 1e-6
    assert rel_err(s, s_ref) < 1e-6


def test_gla_chunk_size_does_not_change_results():
    q, k, v, g, s0 = _gla_inputs(300, torch.float64)
    base, _ = gla_chunked(q, k, v, g, s0, chunk_size=1)
    for c in (7, 64, 256, 1000):
        o, _ = gla_chunked(q, k, v, g, s0, chunk_size=c)
        assert rel_err(o, base) < 1e-12


def test_gla_empty_sequence_keeps_state():
    q, k, v, g, s0 = _gla_inputs(0, torch.float32)
    o, s = gla_chunked(q, k, v, g, s0)
    assert o.shape == (2, 3, 0, 5)
    assert torch.equal(s, s0)


def test_gla_chunked_gradcheck():
    inputs = [t.requires_grad_() for t in _gla_inputs(11, torch.float64, B=1, H=2, dk=3, dv=2)]
    assert torch.autograd.gradcheck(lambda *a: gla_chunked(*a, chunk_size=4), inputs)


def test_linear_scan_gradcheck():
    log_a = (-torch.rand(1, 2, 9, dtype=torch.float64)).requires_grad_()
    x = torch.randn(1, 2, 9, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: linear_scan(a, b, c, 4), (log_a, x, h0))


def test_gla_bf16_autocast_keeps_float32_state():
    q, k, v, g, s0 = _gla_inputs(130, torch.float32)
    o_ref, s_ref = gla_naive(q, k, v, g, s0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, s = gla_chunked(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, s0)
    assert s.dtype == torch.float32
    assert rel_err(o.float(), o_ref) < 3e-2
    assert rel_err(s, s_ref) < 3e-2


def test_memory_write_and_read_gradcheck():
    from mmrec import MMRecConfig
    from mmrec.layers import LongTermMemory

    cfg = MMRecConfig(
        vocab_size=16, d_model=8, n_heads=2, chunk_size=3, mem_slots=2, summary_window=2, d_mem=4, mem_heads=2
    )
    layer = LongTermMemory(cfg).double()
    layer.reset_gates()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    B, T = 1, 8  # starts mid-chunk (position 4 -> 1 pending token), completes two chunks
    x = torch.randn(B, T, 8, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(B, 2, 4, dtype=torch.float64, requires_grad=True)
    summaries = torch.randn(B, 2, 4, dtype=torch.float64, requires_grad=True)
    sequence = torch.randn(B, 4, dtype=torch.float64, requires_grad=True)
    pending = torch.randn(B, 3, 8, dtype=torch.float64, requires_grad=True)

    def fn(x, memory, summaries, sequence, pending):
        y, m, s, z, p = layer(x, memory, summaries, sequence, pending, position=4)
        return y, m, s, z, p

    assert torch.autograd.gradcheck(fn, (x, memory, summaries, sequence, pending))
