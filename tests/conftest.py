import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_xdist_auto_num_workers(config):  # noqa: ANN001, ANN201
    """``-n auto``: one worker per core, at most 4 (the tests' models are tiny: more workers only add memory)."""
    return max(1, min(4, os.cpu_count() or 1))


def pytest_configure(config):  # noqa: ANN001, ANN201
    # Each worker's own PyTorch ops share the cores with the other workers: one thread each, not one per core.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def pytest_collection_modifyitems(config, items):  # noqa: ANN001
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not a parameter named gpu
            item.add_marker(skip)


def write_corpus(
    folder, n_docs: int, words: list[str], seed: int = 0, min_words: int = 50, max_words: int = 400, lines: bool = False
):  # noqa: ANN001, ANN201
    """A folder of ``n_docs`` generated text files drawn from ``words`` (one sentence per line with ``lines``)."""
    import random
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n_docs):
        if lines:
            text = "\n".join(
                " ".join(rng.choice(words) for _ in range(rng.randint(5, 12))).capitalize() + "."
                for _ in range(rng.randint(max(1, min_words // 8), max(2, max_words // 8)))
            )
        else:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words)))
        (folder / f"doc{i:03d}.txt").write_text(text + "\n")
    return folder


def tiny_train_config(corpus, root, **overrides):  # noqa: ANN001, ANN201
    """A TrainConfig for a model of a few thousand parameters that trains in seconds on ``corpus``."""
    from mmrec.train.config import TrainConfig

    base = dict(
        data=[str(corpus)],
        data_cache=str(root / "cache"),
        out=str(root / "run"),
        d_model=32,
        n_layers=2,
        n_heads=2,
        chunk_size=8,
        mem_slots=4,
        summary_window=2,
        seq_len=32,
        batch_size=4,
        eval_tokens=512,
        sample_tokens=0,
        track_stages=False,  # the stage tracker's probes and plots cost seconds; its tests turn it on
        log_every=1,
        max_steps=2,
        eval_every=2,
        checkpoint_every=2,
    )
    return TrainConfig.from_flat({**base, **overrides})
