"""The numerical contracts on every available device, in float32 and under bf16 autocast.

On a machine without CUDA these run on the CPU only; with CUDA the same
checks run there too (marker ``gpu``: ``pytest -m gpu``).
"""

import pytest
import torch

from conftest import rel_err
from mmrec import MMRecConfig, MMRecLM, TransformerConfig, TransformerLM
from mmrec.ops import gla_chunked, gla_naive

DEVICES = [pytest.param("cpu")] + [
    pytest.param("cuda", marks=pytest.mark.gpu) for _ in range(1) if torch.cuda.is_available()
]


def tiny_mmrec(device: str, sparse: bool = False) -> MMRecLM:
    """With ``sparse``: selective, sparse writes, input-dependent decays and about half the write gates off."""
    cfg = MMRecConfig(
        vocab_size=256,
        d_model=64,
        n_layers=3,
        n_heads=4,
        chunk_size=16,
        mem_slots=8,
        summary_window=4,
        selective_write=sparse,
        sparse_write=sparse,
    )
    model = MMRecLM(cfg)
    if sparse:
        with torch.no_grad():
            for block in model.layers:
                block.short_term.decay.weight.normal_(0, 0.5)
                block.short_term.decay.bias[cfg.n_heads :].zero_()
    return model.to(device).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 1000])
def test_gla_chunked_float32_and_bf16(device, T):
    B, H, dk, dv = 2, 4, 32, 32
    q, k, v = (torch.randn(B, H, T, d, device=device) for d in (dk, dk, dv))
    g = torch.empty(B, H, T, device=device).uniform_(-9.2, -1e-6)
    s0 = torch.randn(B, H, dk, dv, device=device)
    o_ref, s_ref = gla_naive(q.double(), k.double(), v.double(), g.double(), s0.double())
    o, s = gla_chunked(q, k, v, g, s0, chunk_size=64)
    assert rel_err(o, o_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5
    with torch.autocast(device, dtype=torch.bfloat16):
        o16, s16 = gla_chunked(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, s0, chunk_size=64)
    assert s16.dtype == torch.float32
    assert rel_err(o16, o_ref) <= 3e-2 and rel_err(s16, s_ref) <= 3e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse", [False, True])
def test_model_streaming_and_causality(device, sparse):
    model = tiny_mmrec(device, sparse)
    ids = torch.randint(0, 256, (2, 100), device=device)
    full = model(ids)
    a = model(ids[:, :37])
    b = model(ids[:, 37:], state=a.state)
    assert rel_err(torch.cat([a.logits, b.logits], 1), full.logits) <= 1e-4
    state, steps = None, []
    for t in range(40):
        out = model(ids[:, t : t + 1], state=state)
        state = out.state
        steps.append(out.logits)
    assert rel_err(torch.cat(steps, 1), full.logits[:, :40]) <= 1e-4
    changed = ids.clone()
    changed[:, 50] = (changed[:, 50] + 1) % 256
    assert (model(changed).logits[:, :50] - full.logits[:, :50]).abs().max() <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse", [False, True])
def test_device_matches_cpu_float64(device, sparse):
    model = tiny_mmrec("cpu", sparse).double()
    ids = torch.randint(0, 256, (1, 90))
    ref = model(ids).logits
    got = model.float().to(device)(ids.to(device)).logits.cpu()
    assert rel_err(got, ref) <= 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["mmrec", "llama", "mistral"])
def test_bf16_autocast_training_step(device, arch):
    if arch == "mmrec":
        model = tiny_mmrec(device).train()
    else:
        model = TransformerLM(
            TransformerConfig(
                preset=arch, vocab_size=256, d_model=64, n_layers=2, n_heads=4, window=16 if arch == "mistral" else None
            )
        ).to(device)
    ids = torch.randint(0, 256, (2, 129), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = model(ids[:, :-1], targets=ids[:, 1:])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    opt.step()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        ref = model(ids[:, :-1]).logits.float()
        a = model(ids[:, :60])
        b = model(ids[:, 60:-1], state=a.state)
    assert rel_err(torch.cat([a.logits, b.logits], 1).float(), ref) <= 3e-2
    if arch == "mmrec":
        assert all(t.dtype == torch.float32 for t in b.state.tensors().values())


@pytest.mark.parametrize("device", DEVICES)
def test_task_training_on_device(device):
    """The synthetic-task loop (prefetched pinned batches, logits at scored positions only) on the device:
    scored logits equal the full forward's, and a tiny MQAR is learned far above chance."""
    from mmrec.evals.synthetic import mqar_batch
    from mmrec.models.factory import build_model, resolve_model_config
    from mmrec.train.tasks import scored_forward, scored_positions, train_task

    torch.manual_seed(0)
    values = dict(d_model=48, n_layers=2, n_heads=2, chunk_size=8, mem_slots=8, summary_window=4)
    model = build_model(resolve_model_config("mmrec", values, vocab_size=64)).to(device)
    x, y = mqar_batch(8, 32, 2, 64, torch.Generator().manual_seed(1))
    positions, picked = scored_positions(y)
    x, y, positions, picked = (t.to(device) for t in (x, y, positions, picked))
    out = model(x, targets=y)
    loss, _ = scored_forward(model, x, positions, picked)
    assert rel_err(loss, out.loss) <= 1e-5

    def make_batch(b, g):
        return mqar_batch(b, 32, 2, 64, g)

    result = train_task(model, make_batch, steps=200, batch_size=32, lr=5e-3, device=device, seed=0, log=None)
    assert len(result["history"]) == 200
    assert result["accuracy"] > 0.4, result["accuracy"]
