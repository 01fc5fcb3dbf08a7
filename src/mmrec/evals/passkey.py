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

import bisect
import dataclasses
import hashlib
import itertools
import json
import string
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from mmrec.evals.context import DEFAULT_MAX_MEMORY_BYTES, ContextPlan, plan_context
from mmrec.models import MMRecLM, TransformerLM
from mmrec.models.state import TensorState
from mmrec.utils.device import autocast_for, resolve_device

FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
NEEDLE_TEMPLATE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER_TEMPLATE = " {key}"
KEY_DIGITS = 5


@dataclass(frozen=True)
class KeyTemplate:
    """How the key is stated in the filler (``needle``, ``{key}`` for the key) and asked for at the end.

    The answer is always " KEY" (:data:`ANSWER_TEMPLATE`), so every ``question`` ends where the key follows.
    """

    needle: str
    question: str


# The phrasings of the key line and its question. "passkey" is the classic one (the default everywhere); the
# others differ in wording, length and in how often the key is said, so that a model trained on some and tested
# on others shows whether retrieval carries over to a phrasing it never saw.
KEY_TEMPLATES: dict[str, KeyTemplate] = {
    "passkey": KeyTemplate(NEEDLE_TEMPLATE, QUESTION),
    "secret": KeyTemplate(" The secret number is {key}.", " What is the secret number? The secret number is"),
    "code": KeyTemplate(" Code: {key}.", " What was the code? Code:"),
    "magic": KeyTemplate(
        " Keep this magic number in mind: {key}.", " What was the magic number to keep in mind? It was"
    ),
    "vault": KeyTemplate(
        " The vault opens with {key}. Do not forget it: {key}.", " What does the vault open with? It opens with"
    ),
}
DEFAULT_TEMPLATES = ("passkey",)
# Consecutive words two filler texts may not share (check_disjoint_fillers): the Shakespeare plays share at most
# stock stage directions of 8-11 words ("[Exeunt.] SCENE IV. London. A Room in the Palace."), while a copied
# passage (The Passionate Pilgrim prints sonnets of Love's Labour's Lost) shares dozens of runs of 12.
SHARED_WORDS = 12
# The documented split of ../shared/data/shakespeare for a test on text never trained on (README, "Passkey"): works
# whose file name starts with a-p train, r-z test (28 and 11 files, 3.3 and 1.4 MB). A split between l and p would
# not do: The Passionate Pilgrim (p) prints sonnets of Love's Labour's Lost (l). tests/test_passkey.py checks it.
SHAKESPEARE_SPLIT = {"train": "[a-p]*_gut.txt", "test": "[r-z]*_gut.txt"}
# The most distractor numbers per 1,000 filler tokens: each takes 6 byte tokens, so 100 already make 60%.
MAX_DISTRACTORS = 100.0


def key_templates(names: Sequence[str]) -> list[KeyTemplate]:
    """The templates named; ValueError naming the known ones for an unknown or missing name."""
    if isinstance(names, str) or not names:
        raise ValueError(f"give one or more template names of {', '.join(KEY_TEMPLATES)}, got {names!r}")
    unknown = [n for n in names if n not in KEY_TEMPLATES]
    if unknown:
        raise ValueError(f"unknown key template {', '.join(map(repr, unknown))}: known are {', '.join(KEY_TEMPLATES)}")
    return [KEY_TEMPLATES[n] for n in names]


# Every order of the five sentences; a seeded filler picks one per block.
_ORDERS = tuple(itertools.permutations(range(len(FILLER_SENTENCES))))
_MASK64 = 2**64 - 1


def _mix64(x: int) -> int:
    """splitmix64: a fast, well-spread hash, so block b of a seeded filler needs no generator state."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class FillerStream:
    """An endless filler of token ids, addressable at any position.

    By default it repeats blocks of the five sentences: in the classic order,
    or, with a ``seed``, in an order chosen per block (the same seed gives the
    same text). Every block has the same token length whatever its order, so
    position p lies in block p // period without scanning. With ``tokens``
    (a tokenized text, e.g. prose) the filler is that text, cycled, starting at
    an offset chosen by ``seed`` (at its start without one).
    """

    def __init__(self, tokenizer: Any, seed: int | None = None, tokens: Sequence[int] | None = None) -> None:
        self.seed = seed
        self.tokens = tokens
        self._blocks: dict[int, list[int]] = {}
        if tokens is not None:
            if len(tokens) == 0:
                raise ValueError("the filler text is empty")
            self.period = len(tokens)
            self.offset = 0 if seed is None else _mix64(seed & _MASK64) % self.period
            return
        self.sentences = [list(tokenizer.encode(" " + s)) for s in FILLER_SENTENCES]
        self.period = sum(len(s) for s in self.sentences)
        self.offset = 0

    def _block(self, index: int) -> Sequence[int]:
        if self.tokens is not None:
            return self.tokens
        order = 0 if self.seed is None else _mix64((self.seed & _MASK64) * 1_000_003 + index) % len(_ORDERS)
        block = self._blocks.get(order)
        if block is None:
            block = [t for i in _ORDERS[order] for t in self.sentences[i]]
            self._blocks[order] = block
        return block

    def ids(self, start: int, stop: int) -> list[int]:
        """Token ids at positions [start, stop) of the filler."""
        out: list[int] = []
        pos = start + self.offset
        stop += self.offset
        while pos < stop:
            b, offset = divmod(pos, self.period)
            take = min(self.period - offset, stop - pos)
            out.extend(self._block(b)[offset : offset + take])
            pos += take
        return out


class DistractedFiller:
    """A filler with numbers of the key's format inserted between its words: distractors.

    The model must then find the key by the words around it, not by its being the only number. Insert i
    puts the tokens ``inserts[i]`` (" 48213", the number ``numbers[i]``) after the first ``at[i]`` tokens of
    ``text``; :meth:`ids` takes positions of the filler as the prompt reads it (inserts included) and
    produces any window without building the rest.
    """

    def __init__(self, text: FillerStream, at: Sequence[int], numbers: Sequence[str], inserts: Sequence[list[int]]):
        self.text, self.numbers, self.inserts = text, list(numbers), list(inserts)
        self.starts: list[int] = []  # where insert i begins in the filler as read
        self.before: list[int] = []  # inserted tokens before insert i
        total = 0
        for a, ids in zip(at, inserts, strict=True):
            self.starts.append(a + total)
            self.before.append(total)
            total += len(ids)
        self.ends = [s + len(ids) for s, ids in zip(self.starts, inserts, strict=True)]
        self.inserted = total

    def ids(self, start: int, stop: int) -> list[int]:
        """Token ids at positions [start, stop) of the filler with its distractors."""
        out: list[int] = []
        pos, i = start, bisect.bisect_right(self.ends, start)
        while pos < stop:
            if i < len(self.starts) and pos >= self.starts[i]:
                j = pos - self.starts[i]
                take = min(len(self.inserts[i]) - j, stop - pos)
                out += self.inserts[i][j : j + take]
                pos += take
                i += 1
                continue
            upto = min(stop, self.starts[i]) if i < len(self.starts) else stop
            shift = self.before[i] if i < len(self.starts) else self.inserted
            out += self.text.ids(pos - shift, upto - shift)
            pos = upto
        return out


def _distracted(
    tokenizer: Any, text: FillerStream, n_filler: int, cut: int, key: str, density: float, seed: int
) -> DistractedFiller:
    """``text`` with ``density`` numbers per 1,000 tokens inserted at word starts, none equal to ``key``.

    round(density x filler tokens / 1000) numbers in all, shared between the filler before the key line
    (``cut`` tokens) and after it by length, so that no number is split by the key line; each is
    ``KEY_DIGITS`` digits without a leading zero, as keys are.
    """
    rng = np.random.default_rng(seed)
    starts_word: dict[int, bool] = {}

    def word_start(token: int) -> bool:
        if token not in starts_word:
            starts_word[token] = tokenizer.decode([token])[:1].isspace()
        return starts_word[token]

    at: list[int] = []
    numbers: list[str] = []
    inserts: list[list[int]] = []
    text_pos = 0  # text tokens before the current part
    total = round(density * n_filler / 1000)
    before = round(total * cut / n_filler) if n_filler else 0
    for size, count in ((cut, before), (n_filler - cut, total - before)):
        part: list[tuple[str, list[int]]] = []
        while len(part) < count:
            number = random_keys(rng, 1)[0]
            if number != key:
                part.append((number, list(tokenizer.encode(ANSWER_TEMPLATE.format(key=number)))))
        while sum(len(ids) for _, ids in part) > size:  # a part too short for its share keeps what fits
            part.pop()
        room = size - sum(len(ids) for _, ids in part)  # text tokens of this part
        for offset in sorted(int(x) for x in rng.integers(0, room + 1, size=len(part))):
            # Moved to the next word start (a token that begins with a space) in this part, else the one before.
            ahead = text.ids(text_pos + offset, text_pos + min(room, offset + 32))
            step = next((k for k, t in enumerate(ahead) if word_start(t)), None)
            if step is None:
                behind = text.ids(text_pos + max(0, offset - 32), text_pos + offset)
                step = next((k - len(behind) for k in range(len(behind) - 1, -1, -1) if word_start(behind[k])), 0)
            at.append(max(text_pos + offset + step, at[-1] if at else 0))
        for number, ids in part:
            numbers.append(number)
            inserts.append(ids)
        text_pos += room
    return DistractedFiller(text, at, numbers, inserts)


FillerPaths = str | Path | Sequence[str | Path]


def filler_files(paths: FillerPaths, option: str = "--filler") -> list[Path]:
    """The files of filler ``paths`` (each a file, a folder read recursively, or a glob), in a fixed order.

    Folders and globs are expanded as ``mmrec train --data`` expands them (hidden files skipped, files in
    path order), so the same arguments name the same files on every machine. A clear ValueError for a path
    that does not exist or a glob that matches nothing.
    """
    from mmrec.data.sources import DataError, SourceSpec, source_files

    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise ValueError(f"{option}: give one or more files, folders or globs")
    files: list[Path] = []
    for item in items:
        spec = SourceSpec(str(item))
        if not spec.is_glob and not Path(item).exists():
            raise ValueError(f"{option} {item}: no such file or folder")
        try:
            found = [p for p, _ in source_files(spec)]
        except DataError as e:
            raise ValueError(f"{option} {item}: {e}") from None
        if not found:
            what = "the glob matches no files" if spec.is_glob else "the folder holds no files"
            raise ValueError(f"{option} {item}: {what}")
        files += [p for p in found if p not in files]
    return files


def _read_text(path: Path, option: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{option} {path}: cannot read it as UTF-8 text: {e}") from e


def read_filler(tokenizer: Any, paths: FillerPaths, option: str = "--filler") -> list[int]:
    """The token ids of the text files of ``paths`` (:func:`filler_files`), joined in that order, as filler.

    Whitespace is folded, so lines and files become one stream of prose, spaced like the sentences; the
    text's own digits are kept. A clear ValueError for a missing, unreadable or empty input.
    """
    words = [w for f in filler_files(paths, option) for w in _read_text(f, option).split()]
    tokens = list(tokenizer.encode(" " + " ".join(words))) if words else []
    if not tokens:
        shown = paths if isinstance(paths, (str, Path)) else " ".join(map(str, paths))
        raise ValueError(f"{option} {shown}: the filler holds no text")
    return tokens


def _shingles(text: str, n: int) -> dict[int, int]:
    """Hash of every run of ``n`` consecutive words (lower case, punctuation stripped) -> the index of its first."""
    words = [w for w in (w.strip(string.punctuation) for w in text.lower().split()) if w]
    runs: dict[int, int] = {}
    for i in range(len(words) - n + 1):
        runs.setdefault(hash(" ".join(words[i : i + n])), i)
    return runs


def check_disjoint_fillers(
    train: FillerPaths, evaluation: FillerPaths, shared_words: int = SHARED_WORDS, option: str = "--eval-filler"
) -> dict[str, Any]:
    """ValueError when the evaluation filler shares a file, or a passage of text, with the training filler.

    A file is shared when it is the same file or has the same bytes; text is shared when both sides hold a
    run of ``shared_words`` consecutive words (case and punctuation ignored). Returns what was checked.
    """
    train_files, eval_files = filler_files(train, "--filler"), filler_files(evaluation, option)
    digests: dict[str, Path] = {}
    for f in train_files:
        digests.setdefault(hashlib.sha256(f.read_bytes()).hexdigest(), f)
    for f in eval_files:
        twin = digests.get(hashlib.sha256(f.read_bytes()).hexdigest())
        same = next((t for t in train_files if t.resolve() == f.resolve()), twin)
        if same is not None:
            raise ValueError(
                f"{option}: {f} is also a training file ({same}); a held-out test needs filler the model never "
                "read: give files of other works (e.g. the split of the Shakespeare folder in the README)"
            )
    seen: dict[int, Path] = {}
    for f in train_files:
        for h in _shingles(_read_text(f, "--filler"), shared_words):
            seen.setdefault(h, f)
    for f in eval_files:
        text = _read_text(f, option)
        runs = _shingles(text, shared_words)
        common = [h for h in runs if h in seen]
        if common:
            words = [w for w in (w.strip(string.punctuation) for w in text.lower().split()) if w]
            first = min(runs[h] for h in common)
            example = " ".join(words[first : first + shared_words])
            raise ValueError(
                f"{option}: {f} shares text with the training filler ({seen[common[0]]}): {len(common)} "
                f"runs of {shared_words} words, e.g. {example!r}; leave one of the two files out"
            )
    return {"train_files": len(train_files), "eval_files": len(eval_files), "shared_words": shared_words}


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
        filler = _distracted(tokenizer, text, n_filler, start, key, distractors, distractor_seed)
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


def random_keys(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` random 5-digit keys (no leading zero, so every key has 5 digits)."""
    return [str(k) for k in rng.integers(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS, size=n)]


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
