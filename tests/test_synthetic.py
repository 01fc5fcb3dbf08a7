"""Synthetic tasks: generator layouts, the scorer, a tiny MQAR run, windowed evaluation, memory refusal, CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import mmrec
from mmrec.cli import main
from mmrec.cli.synth import InductionOptions, parse_mix
from mmrec.evals.context import TaskEval, evaluate_task, plan_context, state_floats
from mmrec.evals.synthetic import (
    IGNORE,
    MQAR_LAYOUTS,
    PAD_ID,
    SEED_LIMIT,
    STREAMS,
    _mqar_pairs,
    induction_batch,
    mqar_batch,
    mqar_zoology_batch,
    score,
    selective_copy_batch,
    stream_generator,
    stream_seed,
)
from mmrec.models.factory import build_model, resolve_model_config
from mmrec.train import tasks
from mmrec.train.schedule import penalty_ramp
from mmrec.train.tasks import scored_forward, scored_positions, sweep_lr, train_task


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models run faster on one thread, and far faster when other jobs share the cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_mmrec(vocab: int = 64, d: int = 32, chunk: int = 8) -> mmrec.MMRecLM:
    return mmrec.MMRecLM(
        mmrec.MMRecConfig(
            vocab_size=vocab, d_model=d, n_layers=2, n_heads=2, chunk_size=chunk, mem_slots=4, summary_window=2
        )
    )


def task_model(
    arch: str, vocab: int, d_model: int, n_layers: int = 2, n_heads: int = 2, **values: Any
) -> torch.nn.Module:
    """The model `mmrec synth` builds: an MM-Rec, or a Transformer of preset ``arch`` sized to its parameter count."""
    values = dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, **values)
    if arch != "mmrec":
        values["preset"] = arch
    config = resolve_model_config("mmrec" if arch == "mmrec" else "transformer", values, vocab_size=vocab)
    return build_model(config)


def cli(args: list[str]) -> int:
    """Exit code of `mmrec ARGS`, whether argparse or the command decides it."""
    try:
        return main(args)
    except SystemExit as e:
        return int(e.code or 0)


# Generators ----------------------------------------------------------------


@pytest.mark.parametrize("random_filler", [False, True])
def test_mqar_layout(random_filler: bool) -> None:
    B, T, N, V = 16, 64, 8, 128
    x, y = mqar_batch(B, T, N, V, gen(0), random_filler=random_filler)
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < V
    for b in range(B):
        keys, values = x[b, 0 : 2 * N : 2].tolist(), x[b, 1 : 2 * N : 2].tolist()
        assert all(1 <= k < V // 2 for k in keys) and len(set(keys)) == N
        assert all(V // 2 <= v < V for v in values) and len(set(values)) == N
        pairs = dict(zip(keys, values, strict=True))
        scored = (y[b] != IGNORE).nonzero()[:, 0].tolist()
        # Scored positions lie in the query region, one per key: each key is queried exactly once ...
        assert len(scored) == N and min(scored) >= 2 * N
        queried = [x[b, t].item() for t in scored]
        assert sorted(queried) == sorted(keys)
        for t in scored:
            # ... the target is its value, and the value follows the query key in the input.
            assert y[b, t].item() == pairs[x[b, t].item()] == x[b, t + 1].item()
        if not random_filler:
            query_slots = set(scored) | {t + 1 for t in scored}
            rest = [x[b, t].item() for t in range(2 * N, T) if t not in query_slots]
            assert all(tok == PAD_ID for tok in rest)
    # The query order is not the order of the pairs.
    orders = [[x[b, t].item() for t in (y[b] != IGNORE).nonzero()[:, 0]] for b in range(B)]
    assert any(o != x[b, 0 : 2 * N : 2].tolist() for b, o in enumerate(orders))


def test_mqar_deterministic_and_seeded() -> None:
    a = mqar_batch(4, 64, 8, 128, gen(3))
    b = mqar_batch(4, 64, 8, 128, gen(3))
    c = mqar_batch(4, 64, 8, 128, gen(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_mqar_power_law_favours_early_queries() -> None:
    x, y = mqar_batch(64, 512, 16, 1024, gen(0), power_a=0.01)
    _, y_uniform = mqar_batch(64, 512, 16, 1024, gen(0), power_a=1.0)
    mean_pos = lambda t: (t != IGNORE).nonzero()[:, 1].float().mean()  # noqa: E731
    assert mean_pos(y) < mean_pos(y_uniform) - 50


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        (dict(seq_len=15, kv_pairs=4, vocab_size=64), "seq_len"),
        (dict(seq_len=64, kv_pairs=8, vocab_size=16), "vocab_size"),
        (dict(seq_len=64, kv_pairs=0, vocab_size=64), "kv_pairs"),
    ],
)
def test_mqar_rejects_bad_arguments(kwargs: dict, names: str) -> None:
    with pytest.raises(ValueError, match=names):
        mqar_batch(2, generator=gen(0), **kwargs)


def test_generators_need_a_torch_generator() -> None:
    with pytest.raises(TypeError, match="torch.Generator"):
        mqar_batch(2, 32, 4, 64, 0)  # type: ignore[arg-type]


def test_mqar_zoology_layout() -> None:
    """Every property of Zoology's multiquery_ar, checked on generated batches."""
    B, T, N, V = 64, 64, 8, 128
    x, y = mqar_zoology_batch(B, T, N, V, gen(0))
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < V
    follows_value = 0
    fillers: list[int] = []
    for b in range(B):
        keys, values = x[b, 0 : 2 * N : 2].tolist(), x[b, 1 : 2 * N : 2].tolist()
        assert all(1 <= k < V // 2 for k in keys) and len(set(keys)) == N  # lower half, each key once
        assert all(V // 2 <= v < V for v in values) and len(set(values)) == N  # upper half
        pairs = dict(zip(keys, values, strict=True))
        scored = (y[b] != IGNORE).nonzero()[:, 0].tolist()
        # One label per key, at even offsets of the query region, on the key itself; the label is its value.
        assert len(scored) == N and all(t >= 2 * N and (t - 2 * N) % 2 == 0 for t in scored)
        assert sorted(x[b, t].item() for t in scored) == sorted(keys)
        for t in scored:
            assert y[b, t].item() == pairs[x[b, t].item()]
            follows_value += int(t + 1 < T and x[b, t + 1].item() == pairs[x[b, t].item()])
        # Everything else of the query region, the token after each queried key included, is a random filler.
        fillers += [x[b, t].item() for t in range(2 * N, T) if t not in scored]
    assert (y[:, : 2 * N] == IGNORE).all()
    # The value is not shown after its query: only a filler that happens to equal it (1/128 per query, ~4 of 512).
    assert follows_value < 0.03 * B * N
    # Fillers are uniform over the whole vocabulary, as Zoology's torch.randint(vocab_size): not PAD blanks.
    counts = torch.bincount(torch.tensor(fillers), minlength=V).double()
    assert counts[PAD_ID] < 3 * counts.mean() and (counts > 0).sum() > 0.95 * V
    assert abs(sum(fillers) / len(fillers) - (V - 1) / 2) < 0.05 * V


def test_mqar_zoology_matches_zoologys_construction() -> None:
    """Zoology's index arithmetic (numpy, transcribed from zoology/data/multiquery_ar.py) on the same draws."""
    np = pytest.importorskip("numpy")
    B, T, N, V = 16, 96, 6, 256
    x, y = mqar_zoology_batch(B, T, N, V, gen(7), power_a=0.3)
    keys, values, gaps = (t.numpy() for t in _mqar_pairs(B, T, N, V, gen(7), 0.3))  # the same draws
    context_size = 2 * N
    kvs = np.zeros((B, context_size), dtype=np.int64)
    kvs[:, 0::2], kvs[:, 1::2] = keys, values
    queries = np.zeros((B, T - context_size + 1), dtype=np.int64)
    np.put_along_axis(queries, gaps * 2, values=keys, axis=1)
    examples = np.concatenate([kvs, queries], axis=1)
    labels = np.full((B, T + 1), -100, dtype=np.int64)
    np.put_along_axis(labels, gaps * 2 + context_size + 1, values=values, axis=1)
    ref_inputs, ref_labels = torch.tensor(examples[:, :-1]), torch.tensor(labels[:, 1:])
    assert torch.equal(y, ref_labels)
    placed = ref_inputs != 0  # Zoology then replaces every 0 by a random token
    assert torch.equal(x[placed], ref_inputs[placed])


def test_mqar_gaps_are_drawn_as_numpy_choice_draws_them() -> None:
    """Gumbel top-k in order == np.random.choice(space, N, replace=False, p): first and second draws."""
    np = pytest.importorskip("numpy")
    space, N, a, draws = 6, 2, 0.3, 20_000
    p = a * np.arange(1, space + 1) ** (a - 1)
    p = p / p.sum()
    rng = np.random.default_rng(0)
    ref = np.stack([rng.choice(space, size=N, replace=False, p=p) for _ in range(draws)])
    _, _, gaps = _mqar_pairs(draws, 2 * N + 2 * space, N, 64, gen(0), a)
    for i in range(N):
        ours = torch.bincount(gaps[:, i], minlength=space).double() / draws
        theirs = torch.tensor(np.bincount(ref[:, i], minlength=space) / draws)
        assert (ours - theirs).abs().max() < 0.015, (i, ours, theirs)


def test_mqar_zoology_power_law_and_key_order() -> None:
    _, y = mqar_zoology_batch(64, 512, 16, 1024, gen(0), power_a=0.01)
    _, y_uniform = mqar_zoology_batch(64, 512, 16, 1024, gen(0), power_a=1.0)
    mean_pos = lambda t: (t != IGNORE).nonzero()[:, 1].float().mean()  # noqa: E731
    assert mean_pos(y) < mean_pos(y_uniform) - 50
    # As in Zoology, the first key of the context takes the first gap drawn: earlier pairs are queried sooner.
    _, _, gaps = _mqar_pairs(256, 512, 16, 1024, gen(1), 0.01)
    assert gaps[:, 0].double().mean() < gaps[:, -1].double().mean()


def test_mqar_layouts_are_seeded_and_checked_alike() -> None:
    assert set(MQAR_LAYOUTS) == {"zoology", "legacy"}
    for make in MQAR_LAYOUTS.values():
        a, b, c = (make(4, 64, 8, 128, gen(s)) for s in (3, 3, 4))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
        with pytest.raises(ValueError, match="seq_len 15 is too short"):
            make(2, 15, 4, 64, gen(0))
        with pytest.raises(ValueError, match="vocab_size 16 is too small"):
            make(2, 64, 8, 16, gen(0))
        with pytest.raises(TypeError, match="torch.Generator"):
            make(2, 32, 4, 64, 0)


# Seed streams ----------------------------------------------------------------


def test_a_cpu_generator_keeps_only_32_bits_of_its_seed() -> None:
    """Why the streams live inside 32 bits: seeds 2**32 apart give the same batches."""
    assert torch.equal(torch.rand(8, generator=gen(7)), torch.rand(8, generator=gen(7 + 2**32)))


def test_evaluation_seeds_never_meet_training_or_selection_seeds() -> None:
    seeds = [0, 1, 2, 3, 1_000_003, 2**29, SEED_LIMIT - 1, *torch.randint(0, SEED_LIMIT, (5000,), generator=gen(0))]
    seeds = [int(s) for s in seeds]
    streams = {role: {stream_seed(s, role) % 2**32 for s in seeds} for role in STREAMS}
    assert streams["train"] == set(seeds)  # the training stream is the seed itself
    assert not streams["evaluation"] & (streams["train"] | streams["validation"])
    assert not streams["validation"] & streams["train"]
    # And the batches differ: no evaluation sequence of seed 0 is a training or validation one of seeds 0..9.
    drawn = {
        role: {
            tuple(r)
            for s in range(10)
            for r in mqar_zoology_batch(16, 32, 4, 64, stream_generator(s, role))[0].tolist()
        }
        for role in STREAMS
    }
    assert not drawn["evaluation"] & (drawn["train"] | drawn["validation"])
    for bad in (-1, SEED_LIMIT, True, 2.0):
        with pytest.raises(ValueError, match="seed must be an integer in"):
            stream_seed(bad, "evaluation")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="role"):
        stream_seed(0, "test")


def test_induction_layout() -> None:
    B, T, V = 32, 40, 16
    x, y = induction_batch(B, T, V, gen(0))
    trigger = V - 1
    assert (y[:, :-1] == IGNORE).all()
    for b in range(B):
        where = (x[b] == trigger).nonzero()[:, 0].tolist()
        assert len(where) == 2 and where[1] == T - 1 and where[0] < T - 2
        assert y[b, -1].item() == x[b, where[0] + 1].item() != trigger
    # prefix_len bounds where the first trigger may fall.
    x, _ = induction_batch(B, T, V, gen(1), prefix_len=8)
    assert ((x[:, :-1] == trigger).nonzero()[:, 1] < 7).all()
    assert torch.equal(induction_batch(2, T, V, gen(5))[0], induction_batch(2, T, V, gen(5))[0])


def test_selective_copy_layout() -> None:
    B, T, n, V = 16, 48, 6, 10
    x, y = selective_copy_batch(B, T, n, V, gen(0))
    marker = V - 1
    assert (x[:, T - n :] == marker).all() and (y[:, : T - n] == IGNORE).all()
    for b in range(B):
        data = [t for t in x[b, : T - n].tolist() if t != PAD_ID]
        assert len(data) == n and all(1 <= t < marker for t in data)
        assert y[b, T - n :].tolist() == data  # the data tokens, in order
    with pytest.raises(ValueError, match="n_tokens"):
        selective_copy_batch(2, 10, 6, V, gen(0))


# Scorer ----------------------------------------------------------------------


def test_score_oracle_and_chance() -> None:
    V = 64
    x, y = mqar_batch(64, 64, 8, V, gen(0))
    oracle = torch.nn.functional.one_hot(y.clamp_min(0), V).float()
    correct, total = score(oracle, y)
    assert total == 64 * 8 and correct == total
    correct, total = score(torch.randn(64, 64, V, generator=gen(1)), y)
    assert abs(correct / total - 1 / V) < 0.02  # 512 draws: chance 0.016 +- 0.006
    assert score(torch.zeros(2, 3, V), torch.full((2, 3), IGNORE)) == (0, 0)


# Training and evaluation -----------------------------------------------------


@pytest.mark.parametrize("arch", ["mmrec", "llama"])
def test_scored_forward_equals_full_logits(arch: str) -> None:
    """Logits at the scored positions only give the full forward's loss and accuracy, with ragged rows."""
    torch.manual_seed(0)
    model = task_model(arch, 32, 32, 2, 2, chunk_size=8, mem_slots=4, summary_window=2)
    x, y = selective_copy_batch(5, 40, 6, 32, gen(3))
    y[1, -6:-2] = IGNORE  # rows with fewer scored positions than the others
    y[3, -6:] = IGNORE
    positions, picked = scored_positions(y)
    assert positions.shape == picked.shape == (5, 6)
    assert ((picked != IGNORE).sum(1) == torch.tensor([6, 2, 6, 0, 6])).all()
    assert (y.gather(1, positions)[picked != IGNORE] == picked[picked != IGNORE]).all()
    out = model(x, targets=y)
    loss, correct = scored_forward(model, x, positions, picked)
    torch.testing.assert_close(loss, out.loss)
    assert int(correct) == score(out.logits, y)[0]


def test_train_task_rejects_a_model_without_hidden_states() -> None:
    with pytest.raises(TypeError, match="hidden_states"):
        train_task(torch.nn.Linear(2, 2), lambda b, g: mqar_batch(b, 32, 2, 64, g), 1, 2, 1e-3, "cpu", log=None)


def test_train_task_is_reproducible_and_reports_a_failing_generator() -> None:
    def make_batch(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return mqar_batch(b, 32, 2, 64, g)

    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = task_model("mmrec", 64, 32, 2, 2, chunk_size=8, mem_slots=4, summary_window=2)
        runs.append(train_task(model, make_batch, steps=12, batch_size=8, lr=3e-3, device="cpu", log=None))
    assert runs[0]["history"] == runs[1]["history"] and len(runs[0]["history"]) == 12

    def broken(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise ValueError("no batches today")

    with pytest.raises(ValueError, match="no batches today"):
        train_task(task_model("mmrec", 64, 32, 2, 2), broken, 5, 2, 1e-3, "cpu", log=None)


def test_time_budget_holds_when_steps_slow_down() -> None:
    """Steps that become 10x slower after the calibration (as when other jobs start on a shared GPU)
    still end inside the budget: the step count is refitted at every logging point."""
    import time

    calls = [0]

    def make_batch(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        calls[0] += 1
        if calls[0] > 40:
            time.sleep(0.05)
        return mqar_batch(b, 16, 2, 32, g)

    model = task_model("mmrec", 32, 16, 1, 1, chunk_size=8, mem_slots=2, summary_window=2)
    result = train_task(
        model, make_batch, 100_000, 2, 1e-3, "cpu", log_every=5, eval_batches=1, max_seconds=2.0, log=None
    )
    assert result["train_seconds"] < 3.0, result["train_seconds"]
    assert 30 < result["steps"] < 200 and len(result["history"]) == result["steps"]


def test_tiny_mqar_training_learns() -> None:
    """MM-Rec learns 2-pair recall from nothing in 200 steps: far above chance (1/32), loss down by half."""
    torch.manual_seed(0)
    model = task_model("mmrec", 64, 48, 2, 2, chunk_size=8, mem_slots=8, summary_window=4)

    def make_batch(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return mqar_batch(b, 32, 2, 64, g)

    result = train_task(model, make_batch, steps=200, batch_size=32, lr=5e-3, device="cpu", seed=0, log=None)
    history = result["history"]
    assert len(history) == 200 and len(result["train_accuracy"]) == 200
    assert sum(history[-10:]) / 10 < 0.5 * history[0]
    assert result["accuracy"] > 0.4, result["accuracy"]


def test_windowed_evaluation_equals_whole_for_mmrec() -> None:
    model = tiny_mmrec(vocab=16)

    def make_batch(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return selective_copy_batch(b, 100, 8, 16, g)

    whole = evaluate_task(model, make_batch, 2, 4, "cpu")
    windowed = evaluate_task(model, make_batch, 2, 4, "cpu", window=24)  # not a multiple of the chunk
    assert whole.total == windowed.total == 2 * 4 * 8
    assert whole.correct == windowed.correct
    assert windowed.mode == "recurrent" and "windows of 24" in windowed.note
    # And the logits themselves agree.
    x, _ = make_batch(2, gen(0))
    with torch.no_grad():
        full = model(x).logits
        state, parts = None, []
        for s in range(0, 100, 24):
            out = model(x[:, s : s + 24], state=state)
            state = out.state
            parts.append(out.logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


def test_transformer_refuses_beyond_memory_limit() -> None:
    model = task_model("llama", 16, 32, 2, 2, max_seq_len=64)

    def make_batch(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return induction_batch(b, 4096, 16, g)

    # 2 x 2 layers x 32 x 4 bytes x 4096 tokens x 4 streams = 8 MiB > 1 MiB: refused before any work.
    result = evaluate_task(model, make_batch, 1, 4, "cpu", window=512, max_memory_bytes=2**20, beyond="full")
    assert result.accuracy is None and result.skipped
    assert "KV cache" in result.note and "limit" in result.note and "8.00 MiB" in result.note
    # The same length with a sliding window of the training length fits and runs.
    result = evaluate_task(model, make_batch, 1, 4, "cpu", window=512, max_memory_bytes=2**20, trained_len=64)
    assert result.mode == "sliding" and result.accuracy is not None


def test_sliding_window_plan_bounds_every_attention_span() -> None:
    model = task_model("llama", 16, 32, 2, 2, max_seq_len=64)
    plan = plan_context(model, 1000, 2, window=256, trained_len=64)
    assert plan.mode == "sliding" and plan.keep is not None and plan.keep + plan.window <= 64
    state = None
    x = torch.randint(0, 16, (2, 200))
    with torch.no_grad():
        for s, e in plan.windows(200):
            out = plan.feed(model, x[:, s:e], state)
            state = out.state
            assert state.keys.size(3) <= plan.keep
    gpt = task_model("gpt", 16, 32, 2, 2, max_seq_len=64)
    assert "learns positions" in plan_context(gpt, 1000, 2, trained_len=64).note


def test_state_floats() -> None:
    mm = tiny_mmrec()
    assert state_floats(mm, 100) == state_floats(mm, 10**6) == mm.init_state(1).nbytes() // 4
    llama = task_model("llama", 64, 32, 2, 2)
    assert state_floats(llama, 512) == 2 * 2 * 32 * 512
    mistral = task_model("mistral", 64, 32, 2, 2, window=16)
    assert state_floats(mistral, 512) == 2 * 2 * 32 * 16


def test_task_loop_steps_through_the_trainers_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """train_task uses mmrec.train.optim: AdamW with the tasks' betas, weight decay on matrices only.

    Two probe parameters get an exact zero gradient, so Adam moves neither: only weight decay can change
    them. The matrix must shrink, the vector must stay exactly as it was.
    """

    class Probed(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner, self.config = inner, inner.config
            self.vector = torch.nn.Parameter(torch.ones(8))
            self.matrix = torch.nn.Parameter(torch.ones(8, 8))

        def hidden_states(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
            h, state = self.inner.hidden_states(x)
            return h + 0.0 * (self.vector.sum() + self.matrix.sum()), state

        def lm_head(self, h: torch.Tensor) -> torch.Tensor:
            return self.inner.lm_head(h)

    made = []
    real = tasks.make_optimizer

    def spy(*args: Any, **kwargs: Any) -> torch.optim.AdamW:
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tasks, "make_optimizer", spy)
    model = Probed(task_model("mmrec", 64, 16, 1, 1, chunk_size=8, mem_slots=2, summary_window=2))
    train_task(model, lambda b, g: mqar_batch(b, 16, 2, 64, g), 6, 4, 1e-2, "cpu", log=None, eval_fn=lambda m: 0.0)
    (opt,) = made
    assert opt.defaults["betas"] == tasks.TASK_BETAS == (0.9, 0.98)
    assert torch.equal(model.vector.detach(), torch.ones(8))
    assert (model.matrix.detach() < 1).all() and (model.matrix.detach() > 0.99).all()
    # Every vector of the model (norms, biases, gates) is in the group without decay.
    for group in opt.param_groups:
        assert all(p.dim() >= 2 for p in group["params"]) == (group["weight_decay"] > 0)


# Held-out evaluation ----------------------------------------------------------


class BatchLog:
    """The rows of every batch drawn, by phase: "eval" inside an evaluation (a wrapped evaluate_task), else "train".

    Batches drawn ahead by the training loop's background thread, and the one-row dry runs of the
    options, count as training rows: an evaluation row must differ from all of them.
    """

    def __init__(self) -> None:
        self.rows: dict[str, set[tuple[int, ...]]] = {"train": set(), "eval": set()}
        self.counts = {"train": 0, "eval": 0}
        self.seeds: dict[str, set[int]] = {"train": set(), "eval": set()}  # the generators' seeds
        self.by_seed: dict[int, set[tuple[int, ...]]] = {}
        self.phase = "train"

    def evaluating(self, real: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            before, self.phase = self.phase, "eval"
            try:
                return real(*args, **kwargs)
            finally:
                self.phase = before

        return wrapper

    def recording(self, real: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = real(*args, **kwargs)
            self.rows[self.phase].update(map(tuple, x.tolist()))
            self.counts[self.phase] += x.size(0)
            g = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Generator))
            self.seeds[self.phase].add(g.initial_seed())
            self.by_seed.setdefault(g.initial_seed(), set()).update(map(tuple, x.tolist()))
            return x, y

        return wrapper

    def assert_held_out(self, min_eval_rows: int) -> None:
        assert self.counts["eval"] >= min_eval_rows and self.counts["train"] > 0, self.counts
        shared = self.rows["eval"] & self.rows["train"]
        assert not shared, f"{len(shared)} evaluation sequences are training sequences"


def test_task_loop_evaluates_on_batches_it_never_trained_on(monkeypatch: pytest.MonkeyPatch) -> None:
    log = BatchLog()
    monkeypatch.setattr(tasks, "evaluate_task", log.evaluating(tasks.evaluate_task))
    make_batch = log.recording(lambda b, g: induction_batch(b, 24, 16, g))
    model = task_model("mmrec", 16, 16, 1, 1, chunk_size=8, mem_slots=2, summary_window=2)
    result = train_task(model, make_batch, 5, 4, 1e-3, "cpu", seed=3, eval_batches=3, log=None)
    log.assert_held_out(min_eval_rows=3 * 4)
    assert len(log.rows["eval"]) == 12  # 12 distinct held-out sequences, none drawn for training
    # The reported accuracy is that of those held-out batches (the training generator's are others).
    held_out = evaluate_task(
        model, lambda b, g: induction_batch(b, 24, 16, g), 3, 4, "cpu", seed=stream_seed(3, "evaluation")
    )
    assert result["accuracy"] == held_out.accuracy


@pytest.mark.parametrize("task", ["mqar", "mqar-sweep", "mqar-legacy", "induction"])
def test_cli_evaluates_on_batches_it_never_trained_on(task: str, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import mmrec.cli.synth as cli_synth
    import mmrec.cli.tasks as cli_tasks
    from mmrec.evals import synthetic

    log = BatchLog()
    for module in (tasks, cli_tasks, cli_synth):
        monkeypatch.setattr(module, "evaluate_task", log.evaluating(module.evaluate_task))
    monkeypatch.setattr(synthetic, "induction_batch", log.recording(synthetic.induction_batch))
    for layout, make in list(MQAR_LAYOUTS.items()):
        monkeypatch.setitem(synthetic.MQAR_LAYOUTS, layout, log.recording(make))
    common = ["--steps", "4", "--batch-size", "4", "--seed", "5", "--device", "cpu", "--out", str(tmp_path / task)]
    if task.startswith("mqar"):
        args = ["--seq-len", "32", "--kv-pairs", "4", "--vocab-size", "64", "--eval-batches", "2"]
        args += {"mqar": [], "mqar-sweep": ["--lrs", "1e-3", "3e-3"], "mqar-legacy": ["--layout", "legacy"]}[task]
        minimum = 2 * 4 * (2 if task == "mqar-sweep" else 1)
    else:  # held out at the training length, then the test lengths (the training length among them)
        args = ["--train-len", "24", "--test-lens", "24", "40", "--test-batches", "2", "--vocab-size", "16"]
        minimum = 8 * 4 + 2 * 2 * 4
    assert cli(["synth", task.split("-")[0], *TINY_MODEL, *args, *common]) == 0
    log.assert_held_out(minimum)
    # Evaluation batches come from seed 5's evaluation stream only; a sweep chose on its validation stream.
    evaluated = {stream_seed(5, "evaluation")} | ({stream_seed(5, "validation")} if task == "mqar-sweep" else set())
    assert log.seeds["eval"] == evaluated
    assert not log.seeds["train"] & evaluated
    if task == "mqar-sweep":
        validation_rows = log.by_seed[stream_seed(5, "validation")]
        assert not validation_rows & log.by_seed[stream_seed(5, "evaluation")]


def test_sweep_chooses_on_validation_and_scores_on_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The choice reads validation batches only; the reported score is the chosen model's on evaluation batches."""
    seed = 11
    # lr -> (validation accuracy, evaluation accuracy, final loss); None diverges.
    table = {1e-3: (0.5, 0.9, 1.0), 3e-3: (0.8, 0.1, 0.5), 1e-2: None, 3e-2: (0.8, 0.95, 0.7)}
    calls: list[int] = []

    def fake_evaluate(model: Any, make_batch: Any, n: int, bs: int, device: Any, seed: int) -> TaskEval:
        calls.append(seed)
        which = {stream_seed(11, "validation"): 0, stream_seed(11, "evaluation"): 1}[seed]
        return TaskEval(32, table[model.lr][which], 0, n * bs, "full", "", 0, 0.0)

    def train(model: Any, lr: float, eval_fn: Any) -> dict[str, Any]:
        model.lr = lr
        if table[lr] is None:
            raise FloatingPointError("the loss became nan at step 3")
        eval_fn(model)
        return {"history": [table[lr][2]] * 12, "checkpoint": None}

    inits: list[int] = []

    def build() -> torch.nn.Module:
        inits.append(torch.initial_seed())
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(tasks, "evaluate_task", fake_evaluate)
    sweep = sweep_lr(list(table), build, train, lambda b, g: (None, None), 2, 4, "cpu", seed, log=None)
    assert inits == [seed] * 4  # every run starts from the same initial weights
    assert [r.lr for r in sweep.runs] == list(table) and sweep.runs[2].validation is None
    assert "diverged" in sweep.runs[2].note
    # 0.8 twice: the lower final training loss wins (3e-3), although 3e-2 and 1e-3 would score higher on evaluation.
    assert sweep.chosen is sweep.runs[1] and sweep.evaluation is not None and sweep.evaluation.accuracy == 0.1
    assert calls == [stream_seed(seed, "validation")] * 3 + [stream_seed(seed, "evaluation")]
    with pytest.raises(ValueError, match="distinct"):
        sweep_lr([1e-3, 1e-3], build, train, lambda b, g: (None, None), 2, 4, "cpu", seed, log=None)
    everything_diverges = sweep_lr([1e-2], build, train, lambda b, g: (None, None), 2, 4, "cpu", seed, log=None)
    assert everything_diverges.chosen is None and everything_diverges.evaluation is None


def test_cli_mqar_sweep_writes_every_run_and_the_choice(tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "sweep"
    code = cli(
        ["synth", "mqar", *TINY_MODEL, "--seq-len", "32", "--kv-pairs", "4", "--vocab-size", "64"]
        + ["--steps", "4", "--batch-size", "4", "--eval-batches", "1", "--lrs", "1e-3", "1e-2", "--seed", "2"]
        + ["--out", str(out), "--device", "cpu"]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    runs = results["lr_sweep"]
    assert [r["lr"] for r in runs] == [1e-3, 1e-2]
    best = max(runs, key=lambda r: (r["validation_accuracy"], -r["final_loss"]))
    assert results["lr"] == best["lr"] and results["checkpoint"] == best["checkpoint"]
    for r in runs:  # each run is its own loadable model with its own metrics
        assert mmrec.load(r["checkpoint"]).config["lr"] == r["lr"]
        assert (out / f"lr-{r['lr']:g}" / "metrics.csv").exists()
    # OUT itself loads as the chosen model.
    chosen, in_out = mmrec.load(results["checkpoint"]), mmrec.load(out)
    assert in_out.config["lr"] == results["lr"]
    for name, t in chosen.model.state_dict().items():
        assert torch.equal(t, in_out.model.state_dict()[name]), name
    # The reported accuracy is the chosen model's on seed 2's evaluation stream, recomputed here.
    loaded = mmrec.load(results["checkpoint"])
    x, y = mqar_zoology_batch(4, 32, 4, 64, stream_generator(2, "evaluation"))
    with torch.no_grad():
        correct, total = score(loaded.model(x).logits, y)
    assert results["accuracy"] == correct / total and total == results["eval_queries"]
    assert "Chosen on validation batches" in (out / "results.md").read_text()


def test_a_length_that_scores_nothing_is_not_evaluated() -> None:
    def unscored(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = induction_batch(b, 20, 16, g)
        return x, torch.full_like(y, IGNORE)

    result = evaluate_task(tiny_mmrec(vocab=16), unscored, 2, 3, "cpu")
    assert result.total == 0 and result.accuracy is None and "not evaluated" in result.note
    from mmrec.cli.tasks import accuracy_text

    assert accuracy_text(None) == "not evaluated" and accuracy_text(0.0) == "0.000"


# Command line ----------------------------------------------------------------


TINY_MODEL = ["--d-model", "16", "--n-heads", "2", "--chunk-size", "8", "--mem-slots", "4", "--log-every", "5"]


def test_cli_mqar_writes_results(tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "mqar"
    code = cli(
        ["synth", "mqar", *TINY_MODEL, "--seq-len", "32", "--kv-pairs", "4", "--vocab-size", "64"]
        + ["--steps", "6", "--batch-size", "4", "--eval-batches", "1", "--out", str(out), "--device", "cpu"]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("accuracy", "state_floats", "arch", "d_model", "seq_len", "kv_pairs", "vocab_size", "steps"):
        assert key in results
    assert results["params"] > 0 and results["train_seconds"] > 0
    assert results["model_config"]["n_layers"] == 2  # the task's preset; --d-model overrides its width
    assert (out / "results.md").read_text().startswith("# MQAR")
    assert (out / "loss.png").stat().st_size > 0
    assert (out / "metrics.csv").read_text().startswith("step,")
    # The trained weights come back exactly from the step directory, with the config of results.json.
    loaded = mmrec.load(out)
    assert loaded.path == out / "step-000006" and results["checkpoint"] == str(loaded.path)
    assert loaded.model_config.to_dict() == results["model_config"] and loaded.trained_seq_len == 32
    assert loaded.meta["kind"] == "synth" and loaded.config["task"] == "mqar"
    assert results["layout"] == "zoology" and results["lr_sweep"] is None
    assert results["seed_streams"] == {role: stream_seed(0, role) for role in STREAMS}
    # The accuracy is that of the batch of seed 0's evaluation stream under the saved model, recomputed here.
    x, y = mqar_zoology_batch(4, 32, 4, 64, stream_generator(0, "evaluation"))
    with torch.no_grad():
        correct, total = score(loaded.model(x).logits, y)
    assert total == results["eval_queries"] == 16 and results["accuracy"] == correct / total


def test_cli_mqar_trains_on_a_mix_and_tests_on_its_own_setting(tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "mix"
    code = cli(
        ["synth", "mqar", "--arch", "transformer", "--preset", "gpt", *TINY_MODEL, "--seq-len", "32"]
        + ["--kv-pairs", "4", "--vocab-size", "64", "--train-mix", "16:2:3", "48:4", "--steps", "6"]
        + ["--batch-size", "4", "--eval-batches", "1", "--out", str(out), "--device", "cpu"]
    )
    assert code == 0  # gpt's position table covers the longest mix setting (48 > 32)
    results = json.loads((out / "results.json").read_text())
    assert results["arch"] == "transformer-gpt" and results["model_config"]["max_seq_len"] == 48
    assert results["train_mix"] == [
        {"seq_len": 16, "kv_pairs": 2, "weight": 3.0},
        {"seq_len": 48, "kv_pairs": 4, "weight": 1.0},
    ]
    assert results["seq_len"] == 32 and results["eval_queries"] == 4 * 4  # evaluated on the test setting
    assert "Trained on the mix 16:2 (weight 3)" in (out / "results.md").read_text()
    assert parse_mix(["zoology"])[0] == (64, 4, 100_000.0)
    capsys.readouterr()
    assert cli(["synth", "mqar", "--train-mix", "64x4", "--out", str(tmp_path / "bad")]) == 2
    assert "train_mix: expected SEQ:KV" in capsys.readouterr().err
    assert cli(["synth", "mqar", "--train-mix", "8:4", "--out", str(tmp_path / "short")]) == 2
    assert "train_mix 8:4: seq_len 8 is too short" in capsys.readouterr().err
    assert not (tmp_path / "short").exists() and not (tmp_path / "bad").exists()


def test_cli_transformer_llama_for_a_synth_task(tmp_path) -> None:  # noqa: ANN001
    """--arch transformer --preset llama: a baseline sized to the MM-Rec of the same options, trained and saved."""
    out = tmp_path / "llama"
    code = cli(
        ["synth", "induction", "--arch", "transformer", "--preset", "llama", "--train-len", "32"]
        + ["--test-lens", "32", "--steps", "2", "--batch-size", "2", "--test-batches", "1", "--device", "cpu"]
        + ["--log-every", "1", "--out", str(out)]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["arch"] == "transformer-llama" and results["model_config"]["preset"] == "llama"
    assert results["d_model"] == 64 and results["n_layers"] == 2  # the task's preset sizes
    reference = task_model("mmrec", 16, 64).num_parameters()
    assert abs(results["params"] - reference) / reference < 0.05  # matched to MM-Rec's parameter count
    loaded = mmrec.load(out)
    assert isinstance(loaded.model, mmrec.TransformerLM) and loaded.arch == "transformer-llama"
    # The mistral preset's window defaults to a quarter of the training length; --window sets it.
    opts = InductionOptions(
        out=str(tmp_path / "m"), arch="transformer", model_values={"preset": "mistral"}, train_len=64
    )
    assert opts.model is not None and opts.model.window == 16
    opts = InductionOptions(out="m", arch="transformer", model_values={"preset": "mistral", "window": 8}, train_len=64)
    assert opts.model is not None and opts.model.window == 8
    assert not (tmp_path / "m").exists()


def test_write_penalty_switches_sparse_writes_off() -> None:
    def make_batch(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return induction_batch(b, 32, 16, g)

    gate = {}
    for l1 in (0.0, 1.0):
        torch.manual_seed(0)
        model = task_model("mmrec", 16, 32, 2, 2, selective_write=True, sparse_write=True)
        train_task(model, make_batch, 40, 8, 1e-2, "cpu", log=None, write_l1=l1, eval_fn=lambda m: 0.0)
        model.train()
        model(make_batch(8, torch.Generator().manual_seed(1))[0])
        gate[l1] = model.write_gate_mean().item()  # type: ignore[operator]
    assert gate[1.0] < 0.1 * gate[0.0]
    with pytest.raises(ValueError, match="sparse_write"):
        train_task(task_model("mmrec", 16, 32, 2, 2), make_batch, 1, 2, 1e-3, "cpu", log=None, write_l1=0.1)
    sparse = task_model("mmrec", 16, 32, 2, 2, selective_write=True, sparse_write=True)
    with pytest.raises(ValueError, match="write_l1_warmup"):
        train_task(sparse, make_batch, 1, 2, 1e-3, "cpu", log=None, write_l1=0.1, write_l1_warmup=-1)
    assert [penalty_ramp(step, 4) for step in (0, 1, 3, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert penalty_ramp(0, 0) == 1.0


def test_cli_induction_streams_long_and_skips_what_cannot_run(tmp_path) -> None:  # noqa: ANN001
    common = ["--train-len", "32", "--test-lens", "32", "300", "--steps", "3", "--batch-size", "4"]
    common += ["--test-batches", "1", "--stream-window", "64", "--device", "cpu"]
    out = tmp_path / "ind"
    mm_options = ["--sparse-write", "--write-l1", "0.01", "--write-l1-warmup", "2", "--decay-max", "0.9999"]
    assert cli(["synth", "induction", *TINY_MODEL, *common, *mm_options, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model_config"]["selective_write"] is True and results["model_config"]["decay_max"] == 0.9999
    assert results["model_config"]["sparse_write"] is True  # and --sparse-write implied --selective-write
    assert results["write_l1"] == 0.01 and results["write_l1_warmup"] == 2
    assert set(results["accuracy"]) == {"32", "300"} and results["stream_window"] == 64
    assert results["per_length"]["300"]["mode"] == "recurrent"
    assert (out / "accuracy.png").exists() and "| 300 |" in (out / "results.md").read_text()
    out = tmp_path / "gpt"
    args = ["synth", "selective-copy", "--arch", "transformer", "--preset", "gpt", *TINY_MODEL, *common]
    assert cli([*args, "--n-tokens", "4", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["accuracy"]["300"] is None and "learns positions" in results["per_length"]["300"]["note"]
    assert "| 300 | not evaluated |" in (out / "results.md").read_text()
    assert results["n_tokens"] == 4


def test_cli_rejects_bad_arguments(tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "x"
    for bad, message in (
        (["--steps", "0"], "steps: must be an integer >= 1"),
        (["--arch", "rwkv"], "invalid choice: 'rwkv'"),
        (["--arch", "llama"], "invalid choice: 'llama'"),  # now --arch transformer --preset llama
        (["--seq-len", "16", "--kv-pairs", "8"], "seq_len 16 is too short"),
        (["--preset", "llama"], "preset: only for --arch transformer"),
        (["--write-l1", "0.1"], "write_l1: 0.1 penalises MM-Rec's sparse-write gates"),
        (["--device", "cuda:7"], "--device: cuda:7"),
        (["--lr", "nan"], "lr: expected a number"),
        (["--lrs", "1e-3", "1e-3"], "lrs: give distinct learning rates"),
        (["--lrs", "1e-3", "-1"], "lrs: must be a finite number > 0"),
        (["--seed", str(2**30)], "seed: seed must be an integer in [0, 2**30)"),
        (["--layout", "hazy"], "invalid choice: 'hazy'"),
    ):
        if bad[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
            continue
        assert cli(["synth", "mqar", *bad, "--out", str(out)]) == 2, bad
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (bad, err)
        assert not out.exists()
    (tmp_path / "file").write_text("")
    assert cli(["synth", "induction", "--out", str(tmp_path / "file")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
