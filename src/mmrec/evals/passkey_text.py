"""The text of passkey prompts: the key line and its question in several phrasings (:data:`KEY_TEMPLATES`),
and the filler: the five classic sentences repeated (:class:`FillerStream`, seeded orders per block), or
prose read from files, folders or globs (:func:`read_filler`), with training and test texts checked apart
(:func:`check_disjoint_fillers`) and numbers of the key's format inserted between the words as
distractors (:class:`DistractedFiller`). The prompts built from them: :mod:`mmrec.evals.passkey`."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

NEEDLE_TEMPLATE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


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


def key_templates(names: Sequence[str]) -> list[KeyTemplate]:
    """The templates named; ValueError naming the known ones for an unknown or missing name."""
    if isinstance(names, str) or not names:
        raise ValueError(f"give one or more template names of {', '.join(KEY_TEMPLATES)}, got {names!r}")
    unknown = [n for n in names if n not in KEY_TEMPLATES]
    if unknown:
        raise ValueError(f"unknown key template {', '.join(map(repr, unknown))}: known are {', '.join(KEY_TEMPLATES)}")
    return [KEY_TEMPLATES[n] for n in names]


KEY_DIGITS = 5
ANSWER_TEMPLATE = " {key}"  # how a key is written after its question: also the form of a distractor


def random_keys(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` random 5-digit keys (no leading zero, so every key has 5 digits)."""
    return [str(k) for k in rng.integers(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS, size=n)]


FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

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


def distracted(
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
