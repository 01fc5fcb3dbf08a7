"""Helpers for the tests of ``mmrec serve``: tiny checkpoints whose greedy text depends on its history, and
a real uvicorn server on 127.0.0.1 in a thread."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch

from mmrec.config import MMRecConfig, TransformerConfig
from mmrec.models import build_model
from mmrec.models.checkpoint import save_checkpoint
from mmrec.tokenizer import ByteTokenizer

TINY = dict(vocab_size=257, d_model=32, n_layers=2, n_heads=2, chunk_size=8, mem_slots=4, summary_window=2)
# Bytes a test model may emit: printable ASCII and newline, so text round-trips through the byte tokenizer.
PRINTABLE = [10, *range(32, 127)]


def lively_checkpoint(out: Path, config: MMRecConfig | TransformerConfig | None = None, seed: int = 0) -> Path:
    """A random-init checkpoint whose greedy continuation depends on the whole history.

    At its initial scale a tiny model's residual stream is its current token, so greedy decoding repeats it
    whatever came before; weights 10x larger let the mixers drive the output. The (tied) embedding rows of
    every byte but printable ASCII are zero: their logits are 0 while the largest printable logit is
    positive, so greedy text is ASCII and a reply re-encodes to the tokens that produced it."""
    torch.manual_seed(seed)
    model = build_model(config or MMRecConfig(**TINY))
    keep = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    keep[PRINTABLE] = True
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not name.startswith(("embed", "pos_embed")):
                p.mul_(10.0)
        model.embed.weight[~keep] = 0
    save_checkpoint(out, model, ByteTokenizer(), kind="train", step=1, trained_seq_len=32)
    return out


class LiveServer:
    """An app served by uvicorn on a free port of 127.0.0.1, in a thread; ``with`` stops it."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    @property
    def service(self) -> Any:
        return self.app.state.service

    def client(self, api_key: str = "none", **kwargs: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_engine(model: Any, jobs: list[dict], stats: dict | None = None, tokenizer: Any = None) -> list[list]:
    """Run ``jobs`` (Job keyword arguments) through one Engine, all queued before it starts (so they are
    fed in its first step and join one batch); the events of each. ``stats`` receives the engine's."""
    from mmrec.serve.engine import Engine, Failed, Finished, Job

    engine = Engine(model, tokenizer or ByteTokenizer(), max_batch=len(jobs))
    events: list[list] = [[] for _ in jobs]
    done = threading.Semaphore(0)

    def sink(i: int) -> Any:
        def put(event: Any) -> None:
            events[i].append(event)
            if isinstance(event, Finished | Failed):
                done.release()

        return put

    for i, kw in enumerate(jobs):
        engine.submit(Job(sink=sink(i), **kw))
    engine.start()
    try:
        for _ in jobs:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    if stats is not None:
        stats.update(engine.stats.as_dict())
    return events
