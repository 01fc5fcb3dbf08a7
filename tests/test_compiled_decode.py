"""MMRecLM.compile_decoding: the compiled one-token step equals the eager one, through chunk writes, a
fresh start, and batches of streams at one position and at different positions.

The models run in float64, but the short-term decay gate is computed in float32 by design (see
ShortTermMixer._decay_and_gate), and the compiler's float32 log-sigmoid and exp may differ from ATen's in
the last bits: hence a float32-level tolerance (the errors seen are ~1e-7 relative; a wrong mask, row or
state would be off by O(1))."""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest
import torch

from mmrec.config import MMRecConfig
from mmrec.models import MMRecLM

CXX = os.environ.get("CXX", "g++")
pytestmark = pytest.mark.skipif(
    shutil.which(CXX) is None and shutil.which("c++") is None,
    reason=f"torch.compile's CPU backend needs a C++ compiler ({CXX} or c++ on PATH)",
)

CFG = MMRecConfig(
    vocab_size=50, d_model=32, n_layers=2, n_heads=2, chunk_size=4, mem_slots=3, summary_window=2, d_ff=48
)


TOL = {"atol": 1e-7, "rtol": 1e-5}


def _states_equal(a, b) -> None:  # type: ignore[no-untyped-def]
    assert a.position == b.position
    for name, t in a.tensors().items():
        torch.testing.assert_close(t, b.tensors()[name], **TOL, msg=name)


@pytest.fixture(scope="module")
def models() -> tuple[MMRecLM, MMRecLM]:
    torch.manual_seed(0)
    eager = MMRecLM(CFG).double().eval()
    with torch.no_grad():  # away from the zero init, so every path carries signal
        for p in eager.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    compiled = MMRecLM(CFG).double().eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_decoding(warm_up=(1, 2))
    return eager, compiled


@torch.no_grad()
def test_one_stream_through_chunk_writes_equals_eager(models: tuple[MMRecLM, MMRecLM]) -> None:
    eager, compiled = models
    ids = torch.randint(0, CFG.vocab_size, (1, 30))
    # A fresh start at T = 1, then 29 steps: 7 chunk writes, the FIFO filling and full.
    se = sc = None
    for t in range(ids.size(1)):
        oe, oc = eager(ids[:, t : t + 1], state=se), compiled(ids[:, t : t + 1], state=sc)
        torch.testing.assert_close(oc.logits, oe.logits, **TOL)
        se, sc = oe.state, oc.state
        _states_equal(se, sc)
    # And both equal the full pass.
    full = eager(ids)
    _states_equal(full.state, sc)


@torch.no_grad()
@pytest.mark.parametrize(
    "lengths",
    [(6, 6, 6, 6, 6), (3, 4, 7, 8, 9), (9, 10, 13, 16, 17)],
    ids=["one-position", "mixed-fifo-filling", "mixed-fifo-full"],
)
def test_batches_equal_eager(models: tuple[MMRecLM, MMRecLM], lengths: tuple[int, ...]) -> None:
    eager, compiled = models
    B, mixed = len(lengths), len(set(lengths)) > 1
    prompts = [torch.randint(0, CFG.vocab_size, (1, n)) for n in lengths]
    parts = [eager(p).state for p in prompts]
    state = type(parts[0]).cat(parts)
    assert isinstance(state.position, tuple) == mixed
    se = sc = state
    for _ in range(2 * CFG.chunk_size + 1):
        tok = torch.randint(0, CFG.vocab_size, (B, 1))
        oe, oc = eager(tok, state=se), compiled(tok, state=sc)
        torch.testing.assert_close(oc.logits, oe.logits, **TOL)
        se, sc = oe.state, oc.state
        _states_equal(se, sc)


@torch.no_grad()
def test_no_recompile_for_new_batch_sizes(models: tuple[MMRecLM, MMRecLM]) -> None:
    """The warm-up compiled the graphs of every batch size: a new size runs without compiling."""
    _, compiled = models
    counters = torch._dynamo.utils.counters
    before = dict(counters["stats"])
    for B, position in ((7, 12), (4, (1, 5, 9, 30))):
        state = dataclasses.replace(compiled.init_state(B), position=position)
        compiled(torch.zeros(B, 1, dtype=torch.long), state=state)
    assert counters["stats"].get("unique_graphs", 0) == before.get("unique_graphs", 0)


@torch.no_grad()
def test_disable_goes_back_to_eager() -> None:
    m = MMRecLM(CFG).double().eval()
    m.compile_decoding(warm_up=())
    assert m._compiled_reads is not None
    m.compile_decoding(enabled=False)
    assert m._compiled_reads is None
    out = m(torch.zeros(1, 1, dtype=torch.long))
    assert out.logits.shape == (1, 1, CFG.vocab_size)


def test_server_with_compiled_decoding_gives_the_eager_text(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``mmrec serve --compile``: one stream and four concurrent streams at different positions give the
    greedy text of the eager server."""
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    import threading

    from mmrec.serve.app import create_app
    from mmrec.serve.protocol import Limits
    from serve_support import LiveServer, lively_checkpoint

    run = lively_checkpoint(tmp_path / "run")
    prompts = ["one ", "two two ", "three ", "four four four "]

    def texts(compile: bool) -> tuple[dict[str, str], dict[int, int]]:
        app = create_app(run, sessions_dir=tmp_path / f"s{compile}", limits=Limits(max_batch=4), compile=compile)
        with LiveServer(app) as server:
            client = server.client()
            out = {"alone": client.completions.create(model="run", prompt="alone ", max_tokens=40, temperature=0)}
            start = threading.Barrier(len(prompts))

            def stream(prompt: str) -> None:
                start.wait()
                out[prompt] = client.completions.create(model="run", prompt=prompt, max_tokens=40, temperature=0)

            threads = [threading.Thread(target=stream, args=(p,)) for p in prompts]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            return {k: r.choices[0].text for k, r in out.items()}, dict(server.service.engine.stats.batch_sizes)

    eager, _ = texts(False)
    compiled, sizes = texts(True)
    assert compiled == eager
    assert any(size > 1 for size in sizes), sizes


def test_generate_compile_gives_the_eager_text(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import io

    from mmrec.generate import run_generate
    from serve_support import lively_checkpoint

    run = lively_checkpoint(tmp_path / "run")
    kw = dict(max_new_tokens=70, temperature=0.0, device="cpu")  # across a chunk write (chunk 8)
    eager = run_generate(str(run), "hello ", out=io.StringIO(), **kw)  # type: ignore[arg-type]
    compiled = run_generate(str(run), "hello ", out=io.StringIO(), compile=True, **kw)  # type: ignore[arg-type]
    assert compiled == eager and len(eager) > 0
