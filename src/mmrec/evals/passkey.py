"""Passkey retrieval: a 5-digit number hidden in filler text, asked for at the end.

The prompt is the classic one (Mohtashami & Jaggi, "Landmark Attention"):
filler sentences, the line "The pass key is 12345. Remember it. 12345 is the
pass key." at a chosen depth, and "What is the pass key? The pass key is" at
the end. A model passes when its greedy continuation is the key; the
teacher-forced log-likelihood of the key's digits scores it more finely (a
model that is almost right moves it long before exact matches appear).

Prompts are built from token ids, piece by piece, so a prompt is exactly
``n_tokens`` tokens for any tokenizer, and lazily: :class:`PasskeyPrompt`
produces any window of its ids on demand, so a million-token prompt is never
held whole. MM-Rec reads it in windows with its constant-size state; a
Transformer uses its KV cache while that fits the memory limit, and a
sliding window of its trained length beyond it (see ``context.plan_context``).

Harder variants, for a result that says more than "the only number in the
prompt was found": the filler can be prose read from files, folders or globs
(:func:`read_filler`), with training and test texts checked apart
(:func:`check_disjoint_fillers`); numbers of the key's format can be inserted
between the filler's words as distractors (:class:`DistractedFiller`); and the
key can be stated and asked for in several phrasings (:data:`KEY_TEMPLATES`),
one drawn per prompt, so a model trained on some can be tested on others.

``passkey_documents`` writes the same layout, answer included, as training
text: mixed into ``mmrec train`` at short lengths it teaches the retrieval
format without long sequences. The tables and the heatmap of a grid are in
:mod:`mmrec.evals.passkey_report`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from mmrec.evals.context import DEFAULT_MAX_MEMORY_BYTES, ContextPlan, plan_context
from mmrec.evals.passkey_text import (
    ANSWER_TEMPLATE,
    DEFAULT_TEMPLATES,
    KEY_DIGITS,
    MAX_DISTRACTORS,
    DistractedFiller,
    FillerStream,
    distracted,
    key_templates,
    random_keys,
)
from mmrec.models import MMRecLM, TransformerLM
from mmrec.models.state import TensorState
from mmrec.utils.device import autocast_for, resolve_device


@dataclass
class PasskeyPrompt:
    """One passkey prompt of exactly ``n_tokens`` tokens, produced window by window.

    Layout: filler [0, needle_start), the needle line, filler continuing up to
    the question, then the question; ``answer_ids`` is the expected
    continuation (a space and the key). ``template`` names the phrasing of
    the needle and question (:data:`KEY_TEMPLATES`); a :class:`DistractedFiller`
    holds numbers of the key's format among the filler's words.
    """

    key: str
    n_tokens: int
    depth: float
    needle_start: int
    needle_ids: list[int]
    question_ids: list[int]
    answer_ids: list[int]
    filler: FillerStream | DistractedFiller
    template: str = "passkey"

    @property
    def distractors(self) -> list[str]:
        """The numbers inserted into the filler, in order."""
        return self.filler.numbers if isinstance(self.filler, DistractedFiller) else []

    @property
    def needle_stop(self) -> int:
        return self.needle_start + len(self.needle_ids)

    @property
    def question_start(self) -> int:
        return self.n_tokens - len(self.question_ids)

    def ids(self, start: int = 0, stop: int | None = None) -> list[int]:
        """Token ids at positions [start, stop) of the prompt (default: all of it)."""
        stop = self.n_tokens if stop is None else min(stop, self.n_tokens)
        start = max(0, start)
        out: list[int] = []
        ns, ne, qs = self.needle_start, self.needle_stop, self.question_start
        # Filler before the needle.
        if start < ns:
            out += self.filler.ids(start, min(stop, ns))
        # The needle.
        if start < ne and stop > ns:
            out += self.needle_ids[max(start, ns) - ns : min(stop, ne) - ns]
        # Filler after the needle continues the same stream.
        if start < qs and stop > ne:
            a, b = max(start, ne), min(stop, qs)
            out += self.filler.ids(ns + a - ne, ns + b - ne)
        # The question.
        if stop > qs:
            out += self.question_ids[max(start, qs) - qs : stop - qs]
        return out

    def windows(self, window: int) -> Iterator[list[int]]:
        for start in range(0, self.n_tokens, window):
            yield self.ids(start, start + window)


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not key.isdigit() or not key.isascii():
        raise ValueError(f"key must be a non-empty string of digits, got {key!r}")
    return key


def passkey_prompt(
    tokenizer: Any,
    n_tokens: int,
    depth: float,
    key: str,
    filler_seed: int | None = None,
    filler_tokens: Sequence[int] | None = None,
    *,
    template: str = "passkey",
    distractors: float = 0.0,
    distractor_seed: int = 0,
) -> PasskeyPrompt:
    """The lazy prompt of :func:`make_passkey_prompt`; ``filler_tokens``: a text of your own as filler.

    ``template`` names the key line and question (:data:`KEY_TEMPLATES`); ``distractors`` numbers of the
    key's format per 1,000 filler tokens are inserted between words, at places drawn from ``distractor_seed``.
    """
    key = _check_key(key)
    if not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be between 0 (start) and 1 (just before the question), got {depth!r}")
    (phrasing,) = key_templates([template])
    if not isinstance(distractors, (int, float)) or not 0.0 <= distractors <= MAX_DISTRACTORS:
        raise ValueError(
            f"distractors must be between 0 and {MAX_DISTRACTORS:g} numbers per 1,000 filler tokens, "
            f"got {distractors!r}"
        )
    needle = list(tokenizer.encode(phrasing.needle.format(key=key)))
    question = list(tokenizer.encode(phrasing.question))
    answer = list(tokenizer.encode(ANSWER_TEMPLATE.format(key=key)))
    minimum = len(needle) + len(question)
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < minimum:
        raise ValueError(
            f"n_tokens must be an integer >= {minimum} (the pass key line and the question alone take "
            f"{minimum} tokens with this tokenizer), got {n_tokens!r}"
        )
    n_filler = n_tokens - minimum
    start = round(depth * n_filler)
    text = FillerStream(tokenizer, filler_seed, filler_tokens)
    filler: FillerStream | DistractedFiller = text
    if distractors > 0:
        filler = distracted(tokenizer, text, n_filler, start, key, distractors, distractor_seed)
    return PasskeyPrompt(
        key=key,
        n_tokens=n_tokens,
        depth=float(depth),
        needle_start=start,
        needle_ids=needle,
        question_ids=question,
        answer_ids=answer,
        filler=filler,
        template=template,
    )


def min_prompt_tokens(tokenizer: Any, templates: Sequence[str] = DEFAULT_TEMPLATES) -> int:
    """The shortest prompt possible: the key line and the question, no filler (largest over keys and templates)."""
    keys = ("10000", "55555", "99999", "31415", "27182")
    return max(
        len(tokenizer.encode(t.question)) + max(len(tokenizer.encode(t.needle.format(key=k))) for k in keys) + 2
        for t in key_templates(templates)
    )


def check_prompt_lengths(tokenizer: Any, lengths: Sequence[int], templates: Sequence[str] = DEFAULT_TEMPLATES) -> None:
    """ValueError naming the prompt lengths too short to hold the pass key line and the question."""
    shortest = min_prompt_tokens(tokenizer, templates)
    too_short = [n for n in lengths if n < shortest]
    if too_short:
        raise ValueError(
            f"--lengths {', '.join(map(str, too_short))}: a prompt needs at least {shortest} tokens with this "
            "tokenizer (the pass key line and the question)"
        )


def make_passkey_prompt(
    tokenizer: Any, n_tokens: int, depth: float, key: str, filler_seed: int | None = None
) -> tuple[list[int], list[int]]:
    """(prompt_ids, answer_ids): a passkey prompt of exactly ``n_tokens`` tokens.

    The needle line starts at round(depth x filler tokens): depth 0.0 puts it
    at the start, 1.0 right before the question. ``filler_seed`` None gives
    the classic fixed filler; an integer shuffles the sentence order per block.
    ``answer_ids`` encodes " KEY", the continuation of "The pass key is".
    """
    prompt = passkey_prompt(tokenizer, n_tokens, depth, key, filler_seed)
    return prompt.ids(), list(prompt.answer_ids)


def passkey_documents(
    tokenizer: Any,
    n: int,
    min_len: int,
    max_len: int,
    seed: int = 0,
    *,
    filler_tokens: Sequence[int] | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    distractors: float = 0.0,
) -> Iterator[dict[str, Any]]:
    """Training documents in the passkey layout, answer included: {"text", "key", "depth", "tokens", "template"}.

    Lengths (in tokens of ``tokenizer``) are uniform in [min_len, max_len],
    depths uniform in [0, 1], and every document has its own filler order (or
    place in ``filler_tokens``), template drawn from ``templates`` and
    distractor numbers, so a model learns to find the key rather than memorise
    one text.
    """
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if min_len > max_len:
        raise ValueError(f"--min-len {min_len} must not exceed --max-len {max_len}")
    shortest = min_prompt_tokens(tokenizer, templates)
    if min_len < shortest:
        raise ValueError(
            f"--min-len {min_len} is too short: the pass key line and question alone take ~{shortest} tokens"
        )
    rng = np.random.default_rng(seed)
    for _ in range(n):
        key = random_keys(rng, 1)[0]
        length = int(rng.integers(min_len, max_len + 1))
        depth = float(rng.random())
        filler_seed = int(rng.integers(2**31))
        # Drawn only when used, so the documents of the classic settings stay those of earlier versions.
        template = templates[int(rng.integers(len(templates)))] if len(templates) > 1 else templates[0]
        distractor_seed = int(rng.integers(2**31)) if distractors > 0 else 0
        prompt = passkey_prompt(
            tokenizer,
            length,
            depth,
            key,
            filler_seed,
            filler_tokens,
            template=template,
            distractors=distractors,
            distractor_seed=distractor_seed,
        )
        text = tokenizer.decode(prompt.ids() + prompt.answer_ids) + "."
        yield {"text": text, "key": key, "depth": round(depth, 4), "tokens": length, "template": template}


def passkey_batch(
    tokenizer: Any,
    batch: int,
    seq_len: int,
    generator: torch.Generator,
    *,
    score_repeat: bool = True,
    vary_filler: bool = True,
    filler_tokens: Sequence[int] | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    distractors: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """A training batch of passkey prompts, answer appended, scored at the key only.

    Each row is one prompt of the evaluation's layout (random 5-digit key,
    depth uniform in [0, 1], its own filler order unless ``vary_filler`` is
    off; with ``filler_tokens``, a random place in that text; a template drawn
    from ``templates``; ``distractors`` numbers per 1,000 filler tokens)
    followed by the answer but its last token, ``seq_len`` tokens in all.
    ``targets`` (next-token layout, ``IGNORE`` elsewhere) hold the answer at
    the positions that predict it and, with ``score_repeat``, the key's second
    occurrence inside the needle ("... {key} is the pass key."; templates that
    say the key once have none), which only a model that copies the first
    occurrence can predict: a short copy the model learns first, then the long
    one. The filler (distractors included) and the question are never scored,
    so every gradient is about retrieval (in a language-model mix, the key's
    ~10 digits are drowned by hundreds of filler tokens; see
    docs/results/passkey-cpu-2026-11-27). A pure function of ``generator``.
    """
    from mmrec.evals.synthetic import IGNORE

    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch!r}")
    shortest = min_prompt_tokens(tokenizer, templates) + len(tokenizer.encode(ANSWER_TEMPLATE.format(key="99999")))
    if not isinstance(seq_len, int) or seq_len < shortest:
        raise ValueError(
            f"seq_len must be >= {shortest} tokens (the pass key line, the question and the answer), got {seq_len!r}"
        )
    rows, targets = [], []
    for _ in range(batch):
        key = str(int(torch.randint(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS, (1,), generator=generator)))
        depth = float(torch.rand((), generator=generator))
        filler_seed = int(torch.randint(2**31, (1,), generator=generator))
        # Drawn only when used, so the batches of the classic settings stay those of earlier versions.
        pick = int(torch.randint(len(templates), (1,), generator=generator)) if len(templates) > 1 else 0
        distractor_seed = int(torch.randint(2**31, (1,), generator=generator)) if distractors > 0 else 0
        answer = list(tokenizer.encode(ANSWER_TEMPLATE.format(key=key)))
        prompt = passkey_prompt(
            tokenizer,
            seq_len - len(answer) + 1,
            depth,
            key,
            filler_seed if vary_filler else None,
            filler_tokens,
            template=templates[pick],
            distractors=distractors,
            distractor_seed=distractor_seed,
        )
        ids = prompt.ids() + answer[:-1]
        target = [IGNORE] * seq_len
        n = prompt.n_tokens
        target[n - 1 : n - 1 + len(answer)] = answer
        if score_repeat:
            # Every digit token of the needle after the first run of digits: the key's later occurrences.
            needle = prompt.needle_ids
            digits = [any(ch.isdigit() for ch in tokenizer.decode([t])) for t in needle] + [False]
            first_end = next(i for i in range(len(needle)) if digits[i] and not digits[i + 1]) + 1
            for i in range(first_end, len(needle)):
                if digits[i]:
                    target[prompt.needle_start + i - 1] = needle[i]
        rows.append(ids)
        targets.append(target)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(targets, dtype=torch.long)


def write_passkey_documents(path: str | Path, docs: Iterator[dict[str, Any]]) -> int:
    """Write JSONL (one {"text": ...} per line) via a temporary file; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")
            count += 1
    tmp.replace(path)
    return count


def _select_stream(state: Any, i: int) -> Any:
    """Stream i of a batched state, as a batch of one (views: forward never writes into a state).

    Any :class:`TensorState` (MMRecState, KVCache, a test's stand-in) whose tensors are [L, B, ...].
    """
    if isinstance(state, TensorState):
        views = {k: t[:, i : i + 1] for k, t in state.tensors().items()}  # [L, 1, ...] per tensor
        return dataclasses.replace(cast(Any, state), **views)
    raise TypeError(f"cannot select a stream of a {type(state).__name__}")


def answer_matches(generated: str, key: str) -> bool:
    """Exact match: the greedy continuation, stripped of surrounding spaces, is the key itself.

    All digits must be right, and nothing may be added: a continuation that holds the key with
    something else ("912345" for 12345) is wrong, as is one that repeats the key elsewhere.
    """
    return generated.strip() == key


def _digit_mask(tokenizer: Any, ids: Sequence[int]) -> list[bool]:
    """Which answer tokens carry a digit (the leading space alone does not count)."""
    mask = [any(ch.isdigit() for ch in tokenizer.decode([t])) for t in ids]
    return mask if any(mask) else [True] * len(ids)


@dataclass
class PasskeyCell:
    length: int
    depth: float
    trials: int
    exact_match: float | None  # share of trials whose greedy answer is the key; None when skipped
    digit_logprob: float | None  # mean log-probability (nats) of the key's digit tokens, teacher-forced
    mode: str
    note: str
    memory_bytes_per_stream: int  # MM-Rec state, or the KV cache a Transformer held
    seconds: float
    answers: list[str]
    templates: list[str] = dataclasses.field(default_factory=list)  # of each trial, in the order of answers
    distractors: list[int] = dataclasses.field(default_factory=list)  # numbers inserted in each trial's filler
    right: list[bool] = dataclasses.field(default_factory=list)  # each trial's exact match

    @property
    def skipped(self) -> bool:
        return self.mode == "skipped"


@torch.no_grad()
def _run_cell(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[PasskeyPrompt],
    plan: ContextPlan,
    device: torch.device,
) -> tuple[list[bool], list[float], list[str]]:
    """Stream the prompts as one batch; then greedy answers and teacher-forced digit scores per trial."""
    state: Any = None
    last: Tensor | None = None
    n = prompts[0].n_tokens
    for start, stop in plan.windows(n):
        ids = torch.tensor([p.ids(start, stop) for p in prompts], dtype=torch.long, device=device)
        with autocast_for(device):
            out = plan.feed(model, ids, state)
        # Only the last position's logits are kept (a copy, so the window's [B, w, V] can be freed).
        state, last = out.state, out.logits[:, -1].float().clone()
        del out
    assert last is not None
    exact, logprobs, answers = [], [], []
    for i, prompt in enumerate(prompts):
        answer = prompt.answer_ids
        st = _select_stream(state, i)
        # Greedy: as many tokens as the answer has.
        logits, generated = last[i : i + 1], []
        for j in range(len(answer)):
            token = int(logits.argmax(dim=-1))
            generated.append(token)
            if j + 1 < len(answer):
                with autocast_for(device):
                    out = plan.feed(model, torch.tensor([[token]], device=device), st)
                st, logits = out.state, out.logits[:, -1].float()
        text = tokenizer.decode(generated)
        answers.append(text.strip())
        exact.append(answer_matches(text, prompt.key))
        # Teacher-forced: log p(answer[0] | prompt), then each next token given the right ones before it.
        lp = [float(torch.log_softmax(last[i], dim=-1)[answer[0]])]
        if len(answer) > 1:
            with autocast_for(device):
                out = plan.feed(model, torch.tensor([answer[:-1]], device=device), _select_stream(state, i))
            rest = torch.log_softmax(out.logits[0].float(), dim=-1)
            lp += rest.gather(1, torch.tensor(answer[1:], device=device)[:, None])[:, 0].tolist()
        mask = _digit_mask(tokenizer, answer)
        digits = [v for v, m in zip(lp, mask, strict=True) if m]
        logprobs.append(sum(digits) / len(digits))
    return exact, logprobs, answers


def evaluate_passkey(
    model: nn.Module,
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    device: str | torch.device = "cpu",
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    window: int = 4096,
    *,
    trained_len: int | None = None,
    beyond: str = "sliding",
    seed: int = 0,
    filler_seed: int | None = None,
    filler_tokens: Sequence[int] | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    distractors: float = 0.0,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Exact match and digit log-likelihood for every (length, depth), over ``trials`` random keys.

    The trials of a cell are one batch. MM-Rec streams it in windows of
    ``window`` tokens (constant memory at any length); a Transformer follows
    ``plan_context``: its KV cache up to ``max_memory_bytes``, and past
    ``trained_len`` a sliding window of that length (``beyond``). Cells that
    cannot run are reported as skipped with the reason. Keys are drawn from
    ``np.random.default_rng([seed, length, depth index])``, so two models see
    the same keys; then, from the same generator, each trial's template (from
    ``templates``, when there are several) and distractor places (when
    ``distractors`` > 0). With a ``filler_seed``, trial i reads the filler of
    seed ``filler_seed + i`` (its own place in a text, its own sentence order).
    """
    if trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    if not lengths or not depths:
        raise ValueError("give at least one length and one depth")
    if window < 1:
        raise ValueError(f"--stream-window must be >= 1 token, got {window}")
    check_prompt_lengths(tokenizer, lengths, templates)
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    cells: list[PasskeyCell] = []
    try:
        for length in lengths:
            for di, depth in enumerate(depths):
                t0 = time.perf_counter()
                rng = np.random.default_rng([seed, length, di])
                keys = random_keys(rng, trials)
                prompts = []
                for i, key in enumerate(keys):
                    template = templates[int(rng.integers(len(templates)))] if len(templates) > 1 else templates[0]
                    prompts.append(
                        passkey_prompt(
                            tokenizer,
                            length,
                            depth,
                            key,
                            None if filler_seed is None else filler_seed + i,
                            filler_tokens,
                            template=template,
                            distractors=distractors,
                            distractor_seed=int(rng.integers(2**31)) if distractors > 0 else 0,
                        )
                    )
                extra = max(len(p.answer_ids) for p in prompts)
                plan = plan_context(model, length + extra, trials, window, max_memory_bytes, trained_len, beyond)
                if plan.skipped:
                    cell = PasskeyCell(length, depth, trials, None, None, plan.mode, plan.note, 0, 0.0, [])
                    cell.templates = [p.template for p in prompts]
                else:
                    exact, lps, answers = _run_cell(model, tokenizer, prompts, plan, device)
                    cell = PasskeyCell(
                        length,
                        depth,
                        trials,
                        sum(exact) / trials,
                        sum(lps) / trials,
                        plan.mode,
                        plan.note,
                        plan.memory_bytes // trials,
                        time.perf_counter() - t0,
                        answers,
                        [p.template for p in prompts],
                        [len(p.distractors) for p in prompts],
                        exact,
                    )
                cells.append(cell)
                if log is not None:
                    if cell.skipped:
                        log(f"passkey {length:>9,} tokens, depth {depth:.2f}: {cell.note}")
                    else:
                        log(
                            f"passkey {length:>9,} tokens, depth {depth:.2f}: exact {cell.exact_match:.2f}, "
                            f"digit log-likelihood {cell.digit_logprob:.3f} nats ({cell.seconds:.1f}s, {cell.mode})"
                        )
    finally:
        model.train(was_training)
    if isinstance(model, TransformerLM):
        arch = f"transformer-{model.config.preset}"
    else:
        arch = "mmrec" if isinstance(model, MMRecLM) else type(model).__name__
    return {
        "arch": arch,
        "lengths": list(lengths),
        "depths": list(depths),
        "trials": trials,
        "stream_window": window,
        "trained_len": trained_len,
        "max_memory_bytes": max_memory_bytes,
        "seed": seed,  # of the keys (np.random.default_rng([seed, length, depth index]))
        "filler_seed": filler_seed,  # trial i of a cell read the filler of seed filler_seed + i
        "templates": list(templates),
        "distractors": distractors,  # numbers of the key's format per 1,000 filler tokens
        "cells": [dataclasses.asdict(c) for c in cells],
    }
