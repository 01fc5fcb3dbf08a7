"""``mmrec serve`` with a Transformer: KV caches of streams at different positions decode in one batch, and
every stream's text is the one it gets alone."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from mmrec.config import TransformerConfig
from mmrec.evals.common import load_checkpoint
from mmrec.serve.engine import Finished, TextChunk
from serve_support import lively_checkpoint, run_engine

# Prompt lengths 1 to 37: mistral's window (8) and the caches' first capacities (16, 32) fall between them.
PROMPTS = [("abcdefghijklmnopqrstuvwxyz0123456789 "[: 1 + (7 * i) % 37]).encode() for i in range(16)]


def _config(preset: str) -> TransformerConfig:
    window = 8 if preset == "mistral" else None
    return TransformerConfig(
        preset=preset, vocab_size=257, d_model=32, n_layers=2, n_heads=2, max_seq_len=512, window=window
    )


def _run(model, tokenizer, prompts: list[bytes], max_tokens: int) -> tuple[list[str], dict]:  # noqa: ANN001
    """Greedy replies to ``prompts``, all queued before the engine starts (so they are fed in its first
    step and join one batch), and the engine's stats."""
    stats: dict = {}
    jobs = [dict(prompt_ids=list(p), max_tokens=max_tokens, temperature=0) for p in prompts]
    events = run_engine(model, jobs, stats, tokenizer)
    for e in events:
        assert isinstance(e[-1], Finished), e[-1]
    return ["".join(x.text for x in e if isinstance(x, TextChunk)) for e in events], stats


@pytest.mark.parametrize("preset", ["gpt", "llama", "mistral"])
def test_transformer_streams_at_different_positions_decode_in_one_batch(tmp_path: Path, preset: str) -> None:
    lm = load_checkpoint(lively_checkpoint(tmp_path / "run", _config(preset)), "cpu")
    alone = [_run(lm.model, lm.tokenizer, [p], 20)[0][0] for p in PROMPTS]
    together, stats = _run(lm.model, lm.tokenizer, PROMPTS, 20)
    # Every step feeds all 16 streams (the 20th token ends them: it is not fed).
    assert stats["decode_steps_by_batch_size"] == {str(len(PROMPTS)): 19}
    assert together == alone
    assert len(set(alone)) > 1  # the replies depend on the prompts


def test_concurrent_transformer_requests_decode_together(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    from mmrec.serve.app import create_app
    from serve_support import LiveServer

    prompts = ["one ", "two two ", "three ", "four four four "]  # different positions
    run = lively_checkpoint(tmp_path / "run", _config("llama"))
    with LiveServer(create_app(run, sessions_dir=tmp_path / "s")) as server:
        client = server.client()

        def greedy(prompt: str, **kw) -> str:  # noqa: ANN003
            r = client.completions.create(model="run", prompt=prompt, max_tokens=48, temperature=0, **kw)
            return r.choices[0].text if not kw else "".join(c.choices[0].text for c in r)

        alone = {p: greedy(p) for p in prompts}
        before = dict(server.service.engine.stats.batch_sizes)
        together: dict[str, str] = {}
        start = threading.Barrier(len(prompts))

        def stream(prompt: str) -> None:
            start.wait()
            together[prompt] = greedy(prompt, stream=True)

        threads = [threading.Thread(target=stream, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        after = server.service.engine.stats.batch_sizes
    batched = {size: n - before.get(size, 0) for size, n in after.items() if size > 1 and n > before.get(size, 0)}
    assert batched, f"no decode step ran more than one stream: {dict(after)}"
    assert together == alone
