"""Passkey retrieval: prompt construction, lazy windows, evaluation, training data and `mmrec eval passkey`."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import mmrec
from mmrec.cli import main
from mmrec.cli import tasks as cli_tasks
from mmrec.evals.passkey import (
    evaluate_passkey,
    make_passkey_prompt,
    passkey_batch,
    passkey_documents,
    passkey_prompt,
)
from mmrec.evals.passkey_text import (
    FILLER_SENTENCES,
    QUESTION,
    random_keys,
)
from mmrec.evals.synthetic import IGNORE
from mmrec.models import LMOutput
from mmrec.models.factory import build_model, resolve_model_config
from mmrec.models.state import TensorState
from mmrec.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def find(ids: list[int], sub: list[int]) -> list[int]:
    return [i for i in range(len(ids) - len(sub) + 1) if ids[i : i + len(sub)] == sub]


@pytest.mark.parametrize("n_tokens", [120, 1000, 4099])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("filler_seed", [None, 7])
def test_prompt_length_single_key_and_depth(n_tokens: int, depth: float, filler_seed: int | None) -> None:
    ids, answer = make_passkey_prompt(TOK, n_tokens, depth, "48213", filler_seed)
    assert len(ids) == n_tokens
    text = TOK.decode(ids)
    assert text.endswith("What is the pass key? The pass key is")
    assert TOK.decode(answer) == " 48213"
    # Exactly one pass-key line, holding the key twice and nowhere else.
    assert text.count("The pass key is 48213. Remember it. 48213 is the pass key.") == 1
    assert text.count("48213") == 2
    # The line starts at the requested depth of the filler.
    needle = TOK.encode(" The pass key is 48213.")
    (pos,) = find(ids, needle)
    question = len(TOK.encode(" What is the pass key? The pass key is"))
    filler = n_tokens - question - len(TOK.encode(" The pass key is 48213. Remember it. 48213 is the pass key."))
    assert abs(pos - depth * filler) <= 1
    if n_tokens >= 1000:  # the needle and question are a small share: depth holds relative to the whole prompt
        assert abs(pos / n_tokens - depth) <= 0.1


def test_prompt_deterministic_and_filler_is_classic() -> None:
    a = make_passkey_prompt(TOK, 500, 0.5, "12345", None)
    assert a == make_passkey_prompt(TOK, 500, 0.5, "12345", None)
    assert TOK.decode(a[0]).startswith(" " + " ".join(FILLER_SENTENCES))
    varied = make_passkey_prompt(TOK, 2000, 0.5, "12345", 3)
    assert varied == make_passkey_prompt(TOK, 2000, 0.5, "12345", 3)
    assert varied != make_passkey_prompt(TOK, 2000, 0.5, "12345", 4)
    assert varied != make_passkey_prompt(TOK, 2000, 0.5, "12345", None)


def test_lazy_windows_equal_the_whole_prompt() -> None:
    prompt = passkey_prompt(TOK, 3001, 0.37, "90210", filler_seed=11)
    whole = prompt.ids()
    assert [t for w in prompt.windows(97) for t in w] == whole
    rng = random.Random(0)
    for _ in range(50):
        a = rng.randrange(0, 3001)
        b = rng.randrange(a, 3002)
        assert prompt.ids(a, b) == whole[a:b]
    # A million-token prompt is addressable without building it.
    big = passkey_prompt(TOK, 1_000_000, 0.5, "55555")
    assert len(big.ids(999_000, 1_000_000)) == 1000
    assert TOK.decode(big.ids(big.needle_start, big.needle_stop)).strip().startswith("The pass key is 55555.")


def test_prompt_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_tokens must be an integer >= "):
        make_passkey_prompt(TOK, 50, 0.5, "12345")
    with pytest.raises(ValueError, match="depth"):
        make_passkey_prompt(TOK, 500, 1.5, "12345")
    with pytest.raises(ValueError, match="digits"):
        make_passkey_prompt(TOK, 500, 0.5, "12a45")


def test_passkey_documents() -> None:
    docs = list(passkey_documents(TOK, 20, 200, 400, seed=1))
    assert docs == list(passkey_documents(TOK, 20, 200, 400, seed=1))
    for d in docs:
        assert 200 <= d["tokens"] <= 400 and len(TOK.encode(d["text"])) == d["tokens"] + 7  # " 12345."
        assert d["text"].endswith(f"The pass key is {d['key']}.") and d["text"].count(d["key"]) == 3
    assert len({d["key"] for d in docs}) > 15


# The scorer, against a model whose answers are known -------------------------------------------------------


DIGITS = range(ord("0"), ord("9") + 1)  # byte tokens of the digits
QUESTION_IDS = TOK.encode(QUESTION)


@dataclass
class KeyReaderState(TensorState):
    """The stand-in's state, [layers = 1, B, ...] per tensor like the models' own."""

    key: torch.Tensor  # [1, B, 5] the first five digit tokens read (the needle's key); -1 until read
    tail: torch.Tensor  # [1, B, Q] the last Q tokens read, Q the question's length
    answered: torch.Tensor  # [1, B] tokens read since the question ended; -1 before it

    @property
    def batch_size(self) -> int:
        return self.key.size(1)


class KeyReader(torch.nn.Module):
    """A stand-in for a model that has learned the task: the models' call signature and state API.

    It reads the stream token by token, keeps the first five digits it sees (the key, in the
    needle; the classic filler has no digits), and once the question has been read it emits
    ``answer(key)`` one token per position: logit ``peak`` on that token, 0 on every other.
    """

    def __init__(self, answer: Callable[[str], str], peak: float = 30.0) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=TOK.vocab_size)
        self.answer, self.peak = answer, peak

    def init_state(self, batch: int) -> KeyReaderState:
        return KeyReaderState(
            position=0,
            key=torch.full((1, batch, 5), -1),
            tail=torch.full((1, batch, len(QUESTION_IDS)), -1),
            answered=torch.full((1, batch), -1),
        )

    def forward(self, ids: torch.Tensor, state: KeyReaderState | None = None) -> LMOutput:
        B, T = ids.shape
        st = self.init_state(B) if state is None else state.clone()
        logits = torch.zeros(B, T, self.config.vocab_size)
        question = torch.tensor(QUESTION_IDS)
        for b in range(B):
            key, tail, answered = st.key[0, b], st.tail[0, b], st.answered[0, b]
            for t in range(T):
                token = int(ids[b, t])
                missing = (key < 0).nonzero()
                if token in DIGITS and len(missing):
                    key[int(missing[0])] = token
                tail[:] = torch.cat([tail[1:], torch.tensor([token])])
                if answered >= 0:
                    answered += 1
                elif torch.equal(tail, question):
                    answered.fill_(0)
                if answered >= 0 and (key >= 0).all():
                    script = TOK.encode(self.answer(TOK.decode(key.tolist())))
                    if int(answered) < len(script):
                        logits[b, t, script[int(answered)]] = self.peak
        st.position += T
        return LMOutput(logits, st)


def grid_keys(length: int, depth_index: int, trials: int, seed: int = 0) -> list[str]:
    """The keys evaluate_passkey draws for a cell."""
    return random_keys(np.random.default_rng([seed, length, depth_index]), trials)


def log_p(peak: float, hit: bool) -> float:
    """log-probability of a token under the stand-in's logits: ``peak`` on one token, 0 on the other V - 1."""
    return (peak if hit else 0.0) - math.log(math.exp(peak) + TOK.vocab_size - 1)


def wrong_digit(position: int) -> Callable[[str], str]:
    return lambda key: " " + key[:position] + str((int(key[position]) + 1) % 10) + key[position + 1 :]


GRID_ARGS: dict[str, Any] = dict(lengths=[150, 333], depths=[0.0, 0.6, 1.0], trials=3, device="cpu", log=None)


@pytest.mark.parametrize("window", [4096, 41])  # the whole prompt in one call, or streamed in windows
def test_a_model_that_answers_the_key_scores_one(window: int) -> None:
    res = evaluate_passkey(KeyReader(lambda key: " " + key), TOK, window=window, **GRID_ARGS)
    assert len(res["cells"]) == 6 and res["arch"] == "KeyReader"
    for cell in res["cells"]:
        keys = grid_keys(cell["length"], GRID_ARGS["depths"].index(cell["depth"]), 3)
        assert cell["answers"] == keys and len(set(keys)) == 3
        assert cell["exact_match"] == 1.0
        # Teacher-forced: every digit token carries the peak.
        assert cell["digit_logprob"] == pytest.approx(log_p(30.0, True), abs=1e-9)


@pytest.mark.parametrize("position", range(5))
def test_one_wrong_digit_scores_zero(position: int) -> None:
    res = evaluate_passkey(KeyReader(wrong_digit(position)), TOK, window=4096, **GRID_ARGS)
    for cell in res["cells"]:
        keys = grid_keys(cell["length"], GRID_ARGS["depths"].index(cell["depth"]), 3)
        assert cell["answers"] == [wrong_digit(position)(k).strip() for k in keys]
        assert cell["exact_match"] == 0.0
        # Four digits right at the peak, one with no mass beyond the floor: the mean over the five.
        expected = (4 * log_p(30.0, True) + log_p(30.0, False)) / 5
        assert cell["digit_logprob"] == pytest.approx(expected, abs=1e-9)


def test_the_key_elsewhere_in_the_output_is_not_the_answer() -> None:
    # "912345": the key is in the output, after a stray digit where the space belonged.
    res = evaluate_passkey(KeyReader(lambda key: "9" + key), TOK, window=4096, **GRID_ARGS)
    for cell in res["cells"]:
        keys = grid_keys(cell["length"], GRID_ARGS["depths"].index(cell["depth"]), 3)
        assert cell["answers"] == ["9" + k for k in keys] and cell["exact_match"] == 0.0
        # Teacher forcing feeds the right space first, so every digit after it is predicted right:
        # the two measures differ here, as they should.
        assert cell["digit_logprob"] == pytest.approx(log_p(30.0, True), abs=1e-9)
    # A model that answers something else, having never "seen" the key, scores 0 too.
    res = evaluate_passkey(KeyReader(lambda key: " 00000"), TOK, window=4096, **GRID_ARGS)
    assert all(c["exact_match"] == 0.0 and c["answers"] == ["00000"] * 3 for c in res["cells"])


def test_exact_match_is_the_share_of_right_answers_in_a_cell() -> None:
    right = set(grid_keys(150, 0, 4)[:2])  # two of the cell's four keys answered right, two wrong

    def half(key: str) -> str:
        return " " + key if key in right else wrong_digit(2)(key)

    res = evaluate_passkey(KeyReader(half), TOK, lengths=[150], depths=[0.0], trials=4, device="cpu", log=None)
    (cell,) = res["cells"]
    assert cell["exact_match"] == 0.5
    assert cell["digit_logprob"] == pytest.approx((18 * log_p(30.0, True) + 2 * log_p(30.0, False)) / 20, abs=1e-9)


def direct_cell(model: torch.nn.Module, length: int, depth: float, keys: list[str]) -> tuple[list[str], float]:
    """Greedy answers and mean digit log-likelihood of a cell, from whole-sequence forward passes (no state)."""
    answers, logprobs = [], []
    with torch.no_grad():
        for key in keys:
            prompt = passkey_prompt(TOK, length, depth, key)
            ids, answer = prompt.ids(), prompt.answer_ids
            generated: list[int] = []
            for _ in answer:
                generated.append(int(model(torch.tensor([ids + generated])).logits[0, -1].argmax()))
            answers.append(TOK.decode(generated).strip())
            lp = torch.log_softmax(model(torch.tensor([ids + answer[:-1]])).logits[0].float(), dim=-1)
            digits = [lp[length - 1 + j, t].item() for j, t in enumerate(answer) if chr(t).isdigit()]
            logprobs.append(sum(digits) / len(digits))
    return answers, sum(logprobs) / len(logprobs)


def check_cells(model: torch.nn.Module, results: dict[str, Any], seed: int = 0) -> None:
    """Every cell of a grid equals its direct computation: answers, exact match and digit log-likelihood."""
    for cell in results["cells"]:
        keys = grid_keys(cell["length"], results["depths"].index(cell["depth"]), results["trials"], seed)
        answers, logprob = direct_cell(model, cell["length"], cell["depth"], keys)
        assert cell["answers"] == answers
        assert cell["exact_match"] == sum(a == k for a, k in zip(answers, keys, strict=True)) / len(keys)
        assert cell["digit_logprob"] == pytest.approx(logprob, abs=1e-4)


def test_mmrec_windowed_equals_whole_and_transformer_skips() -> None:
    torch.manual_seed(0)
    model = mmrec.MMRecLM(
        mmrec.MMRecConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, chunk_size=8, mem_slots=4)
    )
    kwargs = dict(lengths=[200], depths=[0.0, 1.0], trials=2, device="cpu", log=None)
    whole = evaluate_passkey(model, TOK, window=4096, **kwargs)
    windowed = evaluate_passkey(model, TOK, window=37, **kwargs)
    for a, b in zip(whole["cells"], windowed["cells"], strict=True):
        assert a["exact_match"] == b["exact_match"] and a["answers"] == b["answers"]
        assert a["digit_logprob"] == pytest.approx(b["digit_logprob"], abs=1e-4)
        assert a["memory_bytes_per_stream"] == model.init_state(1).nbytes()
    check_cells(model, windowed)  # the streamed grid equals greedy decoding over the whole prompt
    # A Transformer past its memory limit is skipped with the reason.
    config = resolve_model_config(
        "transformer", dict(preset="llama", d_model=32, n_layers=2, n_heads=2), vocab_size=257
    )
    llama = build_model(config)
    res = evaluate_passkey(llama, TOK, max_memory_bytes=2**16, window=64, **kwargs)
    assert all(c["exact_match"] is None and "KV cache" in c["note"] for c in res["cells"])
    # Past its trained length it reads through a sliding window of that length.
    res = evaluate_passkey(llama, TOK, window=64, trained_len=96, **kwargs)
    for di, c in enumerate(res["cells"]):
        keys = grid_keys(200, di, 2)
        assert c["mode"] == "sliding" and len(c["answers"]) == 2
        assert c["exact_match"] == sum(a == k for a, k in zip(c["answers"], keys, strict=True)) / 2


WORDS = re.findall(r"\w+", "the king shall speak of love and war while the queen keeps her counsel in the hall")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import tiny_train_config, write_corpus
    from mmrec.train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("passkey")
    corpus = write_corpus(tmp / "corpus", 8, list(WORDS), min_words=300, max_words=300)
    cfg = tiny_train_config(corpus, tmp, eval_tokens=256, device="cpu")
    Trainer(cfg).fit()
    return tmp / "run"


def cli(args: list[str]) -> int:
    """Exit code of `mmrec ARGS`, whether argparse or the command decides it."""
    try:
        return main(args)
    except SystemExit as e:
        return int(e.code or 0)


def test_cli_eval_passkey(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "pk"
    code = cli(
        ["eval", "passkey", "--checkpoint", str(checkpoint), "--lengths", "128", "300", "--depths", "0", "0.5", "1"]
        + ["--trials", "2", "--stream-window", "64", "--out", str(out), "--device", "cpu"]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["cells"]) == 6 and results["arch"] == "mmrec" and results["trained_len"] == 32
    assert results["stream_window"] == 64
    assert all(cell["memory_bytes_per_stream"] > 0 for cell in results["cells"])
    check_cells(mmrec.load(checkpoint).model, results)  # each cell equals its direct computation
    md = (out / "results.md").read_text()
    assert "| depth | 128 | 300 |" in md and "Exact match" in md
    assert (out / "heatmap.png").stat().st_size > 0


def test_cli_eval_passkey_errors(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    # Found once the checkpoint's tokenizer is known: exit code 1, nothing created.
    assert cli(["eval", "passkey", "--checkpoint", str(checkpoint), "--lengths", "80", "--out", str(out)]) == 1
    assert "--lengths 80: a prompt needs at least" in capsys.readouterr().err
    assert not out.exists()  # nothing is created for a run that cannot start
    assert cli(["eval", "passkey", "--checkpoint", str(tmp_path / "nope"), "--out", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err
    not_ckpt = tmp_path / "folder"
    not_ckpt.mkdir()
    (not_ckpt / "notes.txt").write_text("hello")
    assert cli(["eval", "passkey", "--checkpoint", str(not_ckpt), "--out", str(out)]) == 1
    assert "is not a checkpoint of mmrec" in capsys.readouterr().err
    # Bad options: a usage error, exit code 2, before the checkpoint is even read.
    for bad in (
        ["--depths", "1.5"],
        ["--trials", "0"],
        ["--lengths", "10"],
        ["--max-memory-gb", "-1"],
        ["--window", "8"],
    ):
        assert cli(["eval", "passkey", "--checkpoint", "x", "--out", str(out), *bad]) == 2, bad
    assert not out.exists()


# Training batches and `mmrec synth passkey` ----------------------------------


@pytest.mark.parametrize("seq_len", [131, 300])
def test_passkey_batch_scores_the_key_only(seq_len: int) -> None:
    g = torch.Generator().manual_seed(3)
    inputs, targets = passkey_batch(TOK, 6, seq_len, g)
    assert inputs.shape == targets.shape == (6, seq_len)
    again = passkey_batch(TOK, 6, seq_len, torch.Generator().manual_seed(3))
    assert torch.equal(inputs, again[0]) and torch.equal(targets, again[1])
    keys = set()
    for row, target in zip(inputs.tolist(), targets.tolist(), strict=True):
        text = TOK.decode(row)
        key = re.search(r"The pass key is (\d{5})\. Remember it\. \1 is the pass key\.", text).group(1)
        keys.add(key)
        assert text.count(key) == 2  # twice in the needle; the answer lacks its last digit, which is a target
        assert text.endswith(f"What is the pass key? The pass key is {key[:-1]}")
        scored = [t for t, y in enumerate(target) if y != IGNORE]
        # Answer (a space and 5 digits) plus the key's repeat inside the needle: 11 positions, all digits but one.
        assert len(scored) == 11
        assert TOK.decode([target[t] for t in scored]) == key + " " + key
        # Next-token layout: every scored target is the input that follows, except the answer's last digit.
        assert all(row[t + 1] == target[t] for t in scored[:-1]) and scored[-1] == seq_len - 1
        second = text.index(f"Remember it. {key}") + len("Remember it. ")
        assert scored[:5] == list(range(second - 1, second + 4))
    assert len(keys) == 6
    _, answer_only = passkey_batch(TOK, 6, seq_len, torch.Generator().manual_seed(3), score_repeat=False)
    assert ((answer_only != IGNORE).sum(dim=1) == 6).all()
    with pytest.raises(ValueError, match="seq_len must be >= "):
        passkey_batch(TOK, 2, 90, g)


def test_passkey_batch_bpe_rows_have_equal_length() -> None:
    from mmrec.tokenizer import train_bpe

    bpe = train_bpe([" ".join(FILLER_SENTENCES) * 20, "The pass key is 12345. Remember it. What is the pass key?"], 300)
    inputs, targets = passkey_batch(bpe, 8, 200, torch.Generator().manual_seed(0))
    assert inputs.shape == (8, 200)
    for row, target in zip(inputs.tolist(), targets.tolist(), strict=True):
        key = re.search(r"The pass key is (\d{5})", bpe.decode(row)).group(1)
        assert bpe.decode([y for y in target if y != IGNORE]).replace(" ", "") == key * 2
    # Distractors and another template with a BPE tokenizer: whole numbers between words, the key alone scored.
    inputs, targets = passkey_batch(
        bpe, 8, 300, torch.Generator().manual_seed(1), templates=["secret"], distractors=20.0, score_repeat=False
    )
    assert inputs.shape == (8, 300)
    for row, target in zip(inputs.tolist(), targets.tolist(), strict=True):
        text = bpe.decode(row)
        key = re.search(r"The secret number is (\d{5})\.", text).group(1)
        numbers = re.findall(r"\d+", text[: text.rindex(" What is the secret number?")])
        others = [n for n in numbers if n != key]
        assert numbers.count(key) == 1 and len(others) >= 3 and all(len(n) == 5 for n in others)
        assert bpe.decode([y for y in target if y != IGNORE]).strip() == key


GRID = ["--lengths", "128", "400", "--depths", "0", "1", "--trials", "2", "--stream-window", "96", "--device", "cpu"]


def test_cli_synth_passkey_trains_grades_and_reloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained: list[torch.nn.Module] = []
    real = cli_tasks.train_task

    def keep_model(model: torch.nn.Module, *args: Any, **kwargs: Any) -> dict[str, Any]:
        trained.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(cli_tasks, "train_task", keep_model)
    out = tmp_path / "sp"
    code = cli(
        ["synth", "passkey", "--d-model", "16", "--steps", "3", "--batch-size", "4", "--train-len", "110", "140"]
        + ["--sparse-write", "--write-l1", "0.01", "--out", str(out), *GRID]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "passkey" and results["train_len"] == [110, 140] and results["steps"] == 3
    assert len(results["cells"]) == 4 and results["trained_len"] == 140 and results["arch"] == "mmrec"
    assert len(results["loss_history"]) == 3
    assert (out / "heatmap.png").stat().st_size > 0 and "Exact match" in (out / "results.md").read_text()
    # The output folder holds a step directory of the one checkpoint format: mmrec.load gives the trained model.
    loaded = mmrec.load(out)
    assert loaded.path == out / "step-000003" and loaded.step == 3 and loaded.trained_seq_len == 140
    assert loaded.meta["kind"] == "synth" and loaded.config["task"] == "passkey"
    assert loaded.model_config.sparse_write and loaded.tokenizer.vocab_size == 257
    (model,) = trained
    model.eval()
    check_cells(model, results)  # the grid of the trained model equals its direct computation
    ids = torch.tensor([TOK.encode("The pass key is 12345. Remember it. What is the pass key?")])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)
    # `mmrec eval passkey --checkpoint OUT`: the same seed reproduces the grid exactly.
    ev = tmp_path / "ev"
    assert cli(["eval", "passkey", "--checkpoint", str(out), "--out", str(ev), *GRID]) == 0
    again = json.loads((ev / "results.json").read_text())
    assert again["trained_len"] == 140
    for a, b in zip(results["cells"], again["cells"], strict=True):
        assert a["answers"] == b["answers"] and a["digit_logprob"] == b["digit_logprob"]
    # A folder of `mmrec synth passkey` from before the step directories (results.json beside the weights)
    # still loads, and grades the same.
    old = tmp_path / "old"
    old.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        shutil.copy(loaded.path / name, old / name)
    (old / "results.json").write_text(
        json.dumps({k: results[k] for k in ("task", "arch", "model_config", "steps", "train_len")})
    )
    assert cli(["eval", "passkey", "--checkpoint", str(old), "--out", str(tmp_path / "ev-old"), *GRID]) == 0
    legacy = json.loads((tmp_path / "ev-old" / "results.json").read_text())
    assert [c["answers"] for c in legacy["cells"]] == [c["answers"] for c in results["cells"]]


def test_cli_synth_passkey_evaluates_on_prompts_it_never_trained_on(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The held-out accuracy and the grid read prompts that no training batch held (the seed's evaluation stream)."""
    import mmrec.cli.tasks as cli_tasks
    from mmrec.evals import passkey as pk
    from mmrec.train import tasks

    prompts: dict[str, set[tuple[int, ...]]] = {"train": set(), "eval": set(), "grid": set()}
    phase = ["train"]

    def during(name: str, real: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            before, phase[0] = phase[0], name
            try:
                return real(*args, **kwargs)
            finally:
                phase[0] = before

        return wrapper

    real_prompt = pk.passkey_prompt

    def recorded(*args: Any, **kwargs: Any) -> Any:
        prompt = real_prompt(*args, **kwargs)
        prompts[phase[0]].add(tuple(prompt.ids()))
        return prompt

    monkeypatch.setattr(pk, "passkey_prompt", recorded)  # every prompt of training, held-out batches and grid
    for module in (tasks, cli_tasks):
        monkeypatch.setattr(module, "evaluate_task", during("eval", module.evaluate_task))
    monkeypatch.setattr(pk, "evaluate_passkey", during("grid", pk.evaluate_passkey))
    out = tmp_path / "sp"
    args = ["synth", "passkey", "--d-model", "16", "--steps", "3", "--batch-size", "4", "--train-len", "110", "112"]
    assert cli([*args, "--lengths", "110", "112", "--depths", "0", "0.5", "--trials", "2", "--out", str(out)]) == 0
    assert len(prompts["eval"]) == 8 * 4 and len(prompts["grid"]) == 2 * 2 * 2 and len(prompts["train"]) >= 3 * 4
    assert not prompts["eval"] & prompts["train"], "held-out prompts were training prompts"
    assert not prompts["grid"] & prompts["train"], "grid prompts were training prompts"


def test_cli_synth_passkey_transformer_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "llama"
    prose = tmp_path / "prose.txt"
    prose.write_text("Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.\n")
    code = cli(
        ["synth", "passkey", "--arch", "transformer", "--preset", "llama", "--d-model", "16", "--steps", "2"]
        + ["--batch-size", "2", "--train-len", "120", "--lengths", "100", "300", "--depths", "0.5", "--trials", "2"]
        + ["--out", str(out), "--filler", str(prose)]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [c["mode"] for c in results["cells"]] == ["full", "sliding"] and results["filler"] == [str(prose)]
    assert results["arch"] == "transformer-llama"
    assert cli(["eval", "passkey", "--checkpoint", str(out), "--lengths", "120", "--out", str(tmp_path / "e")]) == 0
    capsys.readouterr()
    for bad, message in (
        (["--train-len", "300", "200"], "MIN must not exceed MAX"),
        (["--train-len", "100", "200", "300"], "one length or MIN MAX"),
        (["--train-len", "80"], "seq_len must be >= "),
        (["--lengths", "70"], "--lengths 70: a prompt needs at least"),
        (["--write-l1", "0.1"], "needs --arch mmrec and --sparse-write"),
        (["--filler", str(tmp_path / "nope.txt")], "nope.txt: no such file or folder"),
        (["--tokenizer", str(tmp_path / "nope.json")], "tokenizer: no tokenizer file"),
        (["--attn-window", "8"], "unrecognized arguments: --attn-window"),  # now --window (sliding attention)
    ):
        bad_out = tmp_path / "bad"
        assert cli(["synth", "passkey", "--steps", "1", "--out", str(bad_out), *bad]) == 2, bad
        assert message in capsys.readouterr().err
        assert not bad_out.exists()
    # A folder of another synthetic task from before the step directories saved no loadable model.
    other = tmp_path / "mqar"
    other.mkdir()
    (other / "results.json").write_text(json.dumps({"task": "mqar"}))
    (other / "model.safetensors").write_bytes(b"")
    assert cli(["eval", "passkey", "--checkpoint", str(other), "--out", str(tmp_path / "e2")]) == 1
    assert "holds the results of `mmrec synth mqar`" in capsys.readouterr().err
    (other / "results.json").write_text(
        json.dumps({"task": "passkey", "arch": "mmrec", "model_config": {}, "steps": 1, "train_len": [128, 128]})
    )
    assert cli(["eval", "passkey", "--checkpoint", str(other), "--out", str(tmp_path / "e2")]) == 1
    assert "do not load" in capsys.readouterr().err
    assert not (tmp_path / "e2").exists()


def test_cli_passkey_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data" / "passkey.jsonl"
    assert cli(["synth", "passkey-data", "--out", str(out), "--n", "4", "--min-len", "200", "--max-len", "300"]) == 0
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(docs) == 4 and all(200 <= d["tokens"] <= 300 for d in docs)
    capsys.readouterr()
    for bad, message in (
        (["--min-len", "20"], "min_len: 20 is too short"),
        (["--min-len", "400", "--max-len", "300"], "must not exceed max_len"),
        (["--n", "0"], "n: must be an integer >= 1"),
    ):
        bad_out = tmp_path / "bad" / "p.jsonl"
        assert cli(["synth", "passkey-data", "--out", str(bad_out), *bad]) == 2, bad
        assert message in capsys.readouterr().err
        assert not bad_out.parent.exists()
    assert cli(["synth", "passkey-data", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_prose_filler(tmp_path: Path) -> None:
    from mmrec.evals.passkey_text import FillerStream, read_filler

    text = tmp_path / "prose.txt"
    text.write_text("Now is the winter\nof our   discontent, made glorious summer.\n", encoding="utf-8")
    tokens = read_filler(TOK, text)
    assert TOK.decode(tokens) == " Now is the winter of our discontent, made glorious summer."
    stream = FillerStream(TOK, None, tokens)
    assert stream.ids(0, 3 * len(tokens)) == tokens * 3  # cycled
    shifted = FillerStream(TOK, 5, tokens)
    start = shifted.offset
    assert 0 <= start < len(tokens) and shifted.ids(0, len(tokens)) == tokens[start:] + tokens[:start]
    assert shifted.ids(7, 19) == shifted.ids(0, 40)[7:19]
    prompt = passkey_prompt(TOK, 700, 0.5, "31337", filler_seed=5, filler_tokens=tokens)
    ids = prompt.ids()
    assert len(ids) == 700 and TOK.decode(ids).count("31337") == 2 and "winter of our" in TOK.decode(ids)
    assert [t for w in prompt.windows(61) for t in w] == ids
    inputs, targets = passkey_batch(TOK, 3, 200, torch.Generator().manual_seed(1), filler_tokens=tokens)
    for row, target in zip(inputs.tolist(), targets.tolist(), strict=True):
        key = re.search(r"The pass key is (\d{5})", TOK.decode(row)).group(1)
        assert "discontent" in TOK.decode(row) and TOK.decode([y for y in target if y != IGNORE]) == key + " " + key
    # Bad files: a clear message each.
    with pytest.raises(ValueError, match="no such file"):
        read_filler(TOK, tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="holds no text"):
        read_filler(TOK, tmp_path / "empty.txt")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="cannot read it as UTF-8"):
        read_filler(TOK, tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="no such file or folder"):
        read_filler(TOK, [text, tmp_path / "missing"])
    # A folder is its files in path order (the bad one skipped by listing the good ones).
    (tmp_path / "bad.txt").unlink()
    (tmp_path / "empty.txt").unlink()
    (tmp_path / "z.txt").write_text("Exeunt omnes.")
    assert TOK.decode(read_filler(TOK, tmp_path)) == TOK.decode(tokens) + " Exeunt omnes."
    assert read_filler(TOK, str(tmp_path / "*.txt")) == read_filler(TOK, [text, tmp_path / "z.txt"])


# Held-out passkey (issue 13): disjoint fillers, distractor numbers, several key templates ----------------------

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare"
WORDS_A = "now is the winter of our discontent made glorious summer by this sun of york and all the clouds"
WORDS_B = "friends romans countrymen lend me your ears i come to bury caesar not to praise him the evil"


def test_disjoint_fillers_refuse_a_shared_file_or_passage(tmp_path: Path) -> None:
    from mmrec.evals.passkey_text import check_disjoint_fillers

    train, test = tmp_path / "train", tmp_path / "test"
    train.mkdir()
    test.mkdir()
    (train / "a.txt").write_text(WORDS_A)
    (test / "b.txt").write_text(WORDS_B)
    assert check_disjoint_fillers(train, test) == {"train_files": 1, "eval_files": 1, "shared_words": 12}
    with pytest.raises(ValueError, match=r"a\.txt is also a training file"):
        check_disjoint_fillers(train, [test, train / "a.txt"])
    (test / "copy.txt").write_bytes((train / "a.txt").read_bytes())  # the same bytes under another name
    with pytest.raises(ValueError, match=r"copy\.txt is also a training file"):
        check_disjoint_fillers(train, test)
    (test / "copy.txt").unlink()
    # Twelve words of a.txt inside other text, in other case and punctuation: shared text.
    quoted = " ".join(WORDS_A.split()[3:15]).upper().replace(" ", ", ")
    (test / "quote.txt").write_text(f"He said: {quoted}! Then left.")
    with pytest.raises(ValueError, match=r"quote\.txt shares text with the training filler .*a\.txt.*1 runs of 12"):
        check_disjoint_fillers(train, test)
    (test / "quote.txt").write_text(" ".join(WORDS_A.split()[3:14]))  # eleven words: a common phrase, allowed
    check_disjoint_fillers(train, test)
    with pytest.raises(ValueError, match="no such file or folder"):
        check_disjoint_fillers(train, tmp_path / "missing")


@pytest.mark.skipif(not SHAKESPEARE.is_dir(), reason="needs ../shared/data/shakespeare")
def test_shakespeare_split_is_disjoint_and_documented() -> None:
    from mmrec.evals.passkey_text import SHAKESPEARE_SPLIT, check_disjoint_fillers, filler_files

    train, test = (str(SHAKESPEARE / SHAKESPEARE_SPLIT[side]) for side in ("train", "test"))
    train_files, test_files = set(filler_files(train)), set(filler_files(test))
    assert len(train_files) == 28 and len(test_files) == 11 and not train_files & test_files
    assert train_files | test_files == set(SHAKESPEARE.glob("*_gut.txt"))  # every work on one side
    assert check_disjoint_fillers(train, test) == {"train_files": 28, "eval_files": 11, "shared_words": 12}
    # A split between l and p is refused: The Passionate Pilgrim prints sonnets of Love's Labour's Lost.
    with pytest.raises(ValueError, match="passionate_pilgrim_gut.txt shares text .*loves_labours_lost_gut.txt"):
        check_disjoint_fillers(str(SHAKESPEARE / "[a-l]*_gut.txt"), str(SHAKESPEARE / "[m-z]*_gut.txt"))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert SHAKESPEARE_SPLIT["train"] in readme and SHAKESPEARE_SPLIT["test"] in readme


DIGIT_RUN = re.compile(r"\d+")


@pytest.mark.parametrize("filler", ["sentences", "prose"])
@pytest.mark.parametrize(("n_tokens", "depth", "density"), [(3000, 0.5, 10.0), (700, 0.0, 25.0), (5000, 1.0, 4.0)])
def test_distractors_have_the_density_and_format_and_are_never_the_key(
    filler: str, n_tokens: int, depth: float, density: float
) -> None:
    tokens = TOK.encode(" " + " ".join([WORDS_A, WORDS_B] * 20)) if filler == "prose" else None
    prompt = passkey_prompt(TOK, n_tokens, depth, "48213", 3, tokens, distractors=density, distractor_seed=9)
    ids = prompt.ids()
    assert len(ids) == n_tokens and [t for w in prompt.windows(53) for t in w] == ids
    n_filler = n_tokens - len(prompt.needle_ids) - len(prompt.question_ids)
    assert len(prompt.distractors) == round(density * n_filler / 1000)
    text = TOK.decode(ids)
    # Every number of the prompt is the key (twice, in its line) or a distractor: 5 digits, no leading zero.
    numbers = DIGIT_RUN.findall(text)
    assert numbers.count("48213") == 2 and sorted(n for n in numbers if n != "48213") == sorted(prompt.distractors)
    assert all(len(n) == 5 and n[0] != "0" and n != "48213" for n in prompt.distractors)
    # Inserted whole between words: " NNNNN" then a space (or the key line, or the question).
    assert all(re.search(rf" {n}[ ]", text) for n in prompt.distractors)
    assert text.count("The pass key is 48213. Remember it. 48213 is the pass key.") == 1
    same = passkey_prompt(TOK, n_tokens, depth, "48213", 3, tokens, distractors=density, distractor_seed=9)
    other = passkey_prompt(TOK, n_tokens, depth, "48213", 3, tokens, distractors=density, distractor_seed=10)
    assert same.ids() == ids and other.distractors != prompt.distractors


def test_a_distractor_equal_to_the_key_is_redrawn(monkeypatch: pytest.MonkeyPatch) -> None:
    from mmrec.evals import passkey_text as pk

    draws = iter(["48213", "48213", "11111", "48213", "22222"])
    monkeypatch.setattr(pk, "random_keys", lambda rng, n: [next(draws)])
    prompt = passkey_prompt(TOK, 400, 1.0, "48213", distractors=5.5, distractor_seed=0)
    assert prompt.distractors == ["11111", "22222"]
    with pytest.raises(ValueError, match="distractors must be between 0 and 100"):
        passkey_prompt(TOK, 400, 1.0, "48213", distractors=101)


def test_templates_are_drawn_from_the_set_given() -> None:
    from mmrec.evals.passkey_text import KEY_TEMPLATES

    needles = {name: t.needle.split("{key}")[0] for name, t in KEY_TEMPLATES.items()}
    questions = {name: t.question for name, t in KEY_TEMPLATES.items()}
    inputs, targets = passkey_batch(
        TOK, 24, 260, torch.Generator().manual_seed(0), templates=["secret", "code", "vault"], distractors=8
    )
    used = set()
    for row, target in zip(inputs.tolist(), targets.tolist(), strict=True):
        text = TOK.decode(row)
        (name,) = [n for n, q in questions.items() if q + " " in text + "0"]  # the question, then the key
        used.add(name)
        assert name in ("secret", "code", "vault") and needles[name] in text
        assert not any(needles[n] in text for n in ("passkey", "magic"))
        key = re.search(re.escape(needles[name]) + r"(\d{5})", text).group(1)
        # Scored: the answer, and the key's repeat where the template says it twice; never a distractor.
        scored = TOK.decode([y for y in target if y != IGNORE])
        assert scored == (key + " " + key if name == "vault" else " " + key)
        assert len(DIGIT_RUN.findall(text)) > 2  # distractors are there
    assert used == {"secret", "code", "vault"}
    docs = list(passkey_documents(TOK, 12, 200, 300, seed=2, templates=["code", "magic"], distractors=10))
    assert {d["template"] for d in docs} == {"code", "magic"}
    for d in docs:
        assert d["text"].endswith(KEY_TEMPLATES[d["template"]].question + f" {d['key']}.")
    # The classic settings draw what they always drew.
    assert [d["text"] for d in passkey_documents(TOK, 3, 200, 300, seed=1)] == [
        d["text"] for d in passkey_documents(TOK, 3, 200, 300, seed=1, templates=["passkey"], distractors=0)
    ]
    with pytest.raises(ValueError, match="unknown key template 'riddle': known are passkey, secret"):
        passkey_prompt(TOK, 400, 0.5, "12345", template="riddle")


@dataclass
class TriggeredReaderState(KeyReaderState):
    recent: torch.Tensor  # [1, B, P] the last P tokens read, P the trigger's length
    armed: torch.Tensor  # [1, B] 1 once the trigger has been read


class TriggeredReader(KeyReader):
    """A copying oracle: the first five digits read *after* ``trigger`` (the template's words before the key)."""

    def __init__(self, trigger: str) -> None:
        super().__init__(lambda key: " " + key)
        self.trigger = torch.tensor(TOK.encode(trigger))

    def init_state(self, batch: int) -> TriggeredReaderState:
        base = super().init_state(batch)
        return TriggeredReaderState(
            position=0,
            key=base.key,
            tail=base.tail,
            answered=base.answered,
            recent=torch.full((1, batch, len(self.trigger)), -1),
            armed=torch.zeros(1, batch, dtype=torch.long),
        )

    def forward(self, ids: torch.Tensor, state: TriggeredReaderState | None = None) -> LMOutput:
        # Digits are passed on to KeyReader only once the trigger has been read: others are replaced by a space.
        st = self.init_state(ids.size(0)) if state is None else state.clone()
        masked = ids.clone()
        for b in range(ids.size(0)):
            for t in range(ids.size(1)):
                token = int(ids[b, t])
                if not st.armed[0, b] and token in DIGITS:
                    masked[b, t] = ord(" ")
                st.recent[0, b] = torch.cat([st.recent[0, b, 1:], ids[b, t : t + 1]])
                if torch.equal(st.recent[0, b], self.trigger):
                    st.armed[0, b] = 1
        out = super().forward(masked, st)
        st.key, st.tail, st.answered = out.state.key, out.state.tail, out.state.answered
        st.position = out.state.position
        return LMOutput(out.logits, st)


def test_exact_match_with_distractors_needs_the_key_not_the_first_number() -> None:
    # Depth 1: the key line comes last, so distractors precede it.
    grid = dict(lengths=[400, 900], depths=[1.0], trials=3, device="cpu", log=None, window=97, distractors=20.0)
    first_number = evaluate_passkey(KeyReader(lambda key: " " + key), TOK, **grid)
    oracle = evaluate_passkey(TriggeredReader(" The pass key is"), TOK, **grid)
    for fooled, right in zip(first_number["cells"], oracle["cells"], strict=True):
        assert min(fooled["distractors"]) >= 1 and fooled["exact_match"] == 0.0
        assert all(a.isdigit() and len(a) == 5 for a in fooled["answers"])  # a distractor, answered confidently
        assert right["exact_match"] == 1.0 and right["right"] == [True] * 3
    # Without distractors the first number is the key: both score 1 (what the classic filler could not tell apart).
    grid["distractors"] = 0.0
    assert all(c["exact_match"] == 1.0 for c in evaluate_passkey(KeyReader(lambda k: " " + k), TOK, **grid)["cells"])
    assert oracle["distractors"] == 20.0 and oracle["templates"] == ["passkey"]


def test_grid_draws_templates_per_trial_and_keeps_the_classic_keys() -> None:
    grid = dict(lengths=[300], depths=[0.0, 0.5], trials=6, device="cpu", log=None)
    mixed = evaluate_passkey(KeyReader(lambda key: " " + key), TOK, templates=["secret", "code"], **grid)
    assert all(set(c["templates"]) == {"secret", "code"} for c in mixed["cells"])
    # A draw per trial after the keys (two names of one template, so that the stand-in can read them).
    drawn = evaluate_passkey(KeyReader(lambda key: " " + key), TOK, templates=["passkey"] * 2, distractors=0.1, **grid)
    classic = evaluate_passkey(KeyReader(lambda key: " " + key), TOK, **grid)
    for di, (a, b) in enumerate(zip(drawn["cells"], classic["cells"], strict=True)):
        assert b["templates"] == ["passkey"] * 6 and b["distractors"] == [0] * 6
        assert a["answers"] == b["answers"] == grid_keys(300, di, 6)  # the keys are those of earlier versions


def test_cli_held_out_passkey_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train on A with some templates, test on B with others: no training prompt holds B's text or a held-out
    template; held-out and grid prompts do, from the seed's evaluation stream."""
    from mmrec.evals import passkey as pk
    from mmrec.evals.synthetic import stream_seed
    from mmrec.train import tasks

    a, b = tmp_path / "plays-a", tmp_path / "plays-b"
    a.mkdir()
    b.mkdir()
    (a / "one.txt").write_text(WORDS_A)
    (b / "two.txt").write_text(WORDS_B)
    prompts: dict[str, list[Any]] = {"train": [], "eval": [], "grid": []}
    phase = ["train"]
    seeds: dict[str, int] = {}
    real_prompt, real_eval, real_grid = pk.passkey_prompt, cli_tasks.evaluate_task, pk.evaluate_passkey

    def recorded(*args: Any, **kwargs: Any) -> Any:
        prompt = real_prompt(*args, **kwargs)
        prompts[phase[0]].append(prompt)
        return prompt

    def held_out(*args: Any, **kwargs: Any) -> Any:
        phase[0], seeds["eval"] = "eval", kwargs["seed"]
        try:
            return real_eval(*args, **kwargs)
        finally:
            phase[0] = "train"

    def graded(*args: Any, **kwargs: Any) -> Any:
        phase[0] = "grid"
        return real_grid(*args, **kwargs)

    real_train = tasks.train_task

    def train(*args: Any, **kwargs: Any) -> Any:
        seeds["train"] = args[7]  # train_task(model, make_batch, steps, batch, lr, device, log_every, seed, ...)
        prompts["train"].clear()  # the options' dry run of one prompt per side is no training
        return real_train(*args, **kwargs)

    monkeypatch.setattr(pk, "passkey_prompt", recorded)
    monkeypatch.setattr(cli_tasks, "evaluate_task", held_out)
    monkeypatch.setattr(pk, "evaluate_passkey", graded)
    monkeypatch.setattr(cli_tasks, "train_task", train)
    out = tmp_path / "pk"
    args = ["synth", "passkey", "--d-model", "16", "--steps", "3", "--batch-size", "4", "--train-len", "150", "170"]
    args += ["--filler", str(a), "--eval-filler", str(b), "--templates", "passkey", "secret", "--seed", "5"]
    args += ["--eval-templates", "code", "secret", "--distractors", "15", "--lengths", "160", "400"]
    assert cli([*args, "--depths", "0", "1", "--trials", "3", "--out", str(out), "--device", "cpu"]) == 0
    assert seeds == {"train": 5, "eval": stream_seed(5, "evaluation")}
    train_text = [TOK.decode(p.ids()) for p in prompts["train"]]
    test_text = [TOK.decode(p.ids()) for p in prompts["eval"] + prompts["grid"]]
    assert len(train_text) >= 3 * 4 and len(prompts["eval"]) == 8 * 4 and len(prompts["grid"]) == 2 * 2 * 3
    assert {p.template for p in prompts["train"]} == {"passkey", "secret"}
    assert {p.template for p in prompts["eval"] + prompts["grid"]} == {"code", "secret"}
    # Words of one text only, long enough that a word cut at the filler's start cannot look like one.
    only_a, only_b = {"winter", "discontent", "glorious", "summer", "york", "clouds"}, {"romans", "caesar", "praise"}

    def words(text: str) -> set[str]:
        return {w.strip(string.punctuation).lower() for w in text.split()}

    assert (
        not any(words(t) & only_b or "Code:" in t for t in train_text) and set.union(*map(words, train_text)) & only_a
    )
    assert not any(words(t) & only_a for t in test_text) and set.union(*map(words, test_text)) & only_b
    assert all(p.distractors for p in prompts["train"] + prompts["eval"] + prompts["grid"])
    assert not set(train_text) & set(test_text)
    results = json.loads((out / "results.json").read_text())
    assert results["filler"] == [str(a)] and results["eval_filler"] == [str(b)] and results["filler_held_out"]
    assert results["held_out_templates"] == ["code"] and results["distractors"] == 15.0
    md = (out / "results.md").read_text()
    assert "never seen in training: **code**" in md and "| code (held out) |" in md and "15 numbers" in md
    # eval passkey knows what the checkpoint trained on: B is a held-out text, A is refused unless allowed.
    ev = ["eval", "passkey", "--checkpoint", str(out), "--lengths", "300", "--depths", "0.5", "--trials", "2"]
    assert cli([*ev, "--filler", str(b / "two.txt"), "--templates", "vault", "--out", str(tmp_path / "e1")]) == 0
    again = json.loads((tmp_path / "e1" / "results.json").read_text())
    assert again["filler_held_out"] is True and again["held_out_templates"] == ["vault"]
    assert again["train_templates"] == ["passkey", "secret"]
    assert cli([*ev, "--filler", str(a), "--out", str(tmp_path / "e2")]) == 1
    assert not (tmp_path / "e2").exists()
    assert cli([*ev, "--filler", str(a), "--allow-seen-filler", "--out", str(tmp_path / "e2")]) == 0
    seen = json.loads((tmp_path / "e2" / "results.json").read_text())
    assert seen["filler_held_out"] is False and "not a held-out text" in (tmp_path / "e2" / "results.md").read_text()


def test_cli_held_out_passkey_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = tmp_path / "a.txt"
    a.write_text(WORDS_A)
    out = tmp_path / "bad"
    for bad, message in (
        (["--filler", str(a), "--eval-filler", str(a)], "eval_filler: " + str(a) + " is also a training file"),
        (["--templates", "riddle"], "templates: unknown key template 'riddle'"),
        (["--eval-templates", "passkey", "nope"], "eval_templates: unknown key template 'nope'"),
        (["--templates", "code", "code"], "name each template once"),
        (["--distractors", "-1"], "distractors: must be a finite number >= 0"),
        (["--distractors", "200"], "distractors: at most 100"),
        (["--eval-filler", str(tmp_path / "nope")], "eval_filler: " + str(tmp_path / "nope") + ": no such file"),
    ):
        assert cli(["synth", "passkey", "--steps", "1", "--out", str(out), *bad]) == 2, bad
        assert message in capsys.readouterr().err, bad
        assert not out.exists()
    data = tmp_path / "pk.jsonl"
    args = ["--n", "5", "--min-len", "200", "--max-len", "300", "--templates", "code", "secret"]
    assert cli(["synth", "passkey-data", "--out", str(data), *args, "--filler", str(a), "--distractors", "10"]) == 0
    docs = [json.loads(line) for line in data.read_text().splitlines()]
    assert {d["template"] for d in docs} <= {"code", "secret"} and all("winter" in d["text"] for d in docs)
