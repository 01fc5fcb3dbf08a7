"""Three local lm-evaluation-harness tasks, built from held-out text (no hub needed):

* ``mmrec_rolling`` - rolling log-likelihood of whole long documents (bits per byte, byte and word
  perplexity), what ``loglikelihood_rolling`` is for;
* ``mmrec_cloze`` - the last word of a passage (LAMBADA's format): accuracy of the greedy completion and
  perplexity of the word;
* ``mmrec_choice`` - which of four lines continues a passage (the true next line and three lines from
  elsewhere in the text): accuracy, and accuracy with the choices' log-likelihood normalised by length.

:func:`write_tasks` writes the documents as JSON lines and one lm-eval YAML per task over them (absolute
paths, so ``TaskManager(include_path=folder)`` finds them from anywhere). The items are drawn with a seed,
so the same text gives the same tasks.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TASKS = ("mmrec_rolling", "mmrec_cloze", "mmrec_choice")
# Passage endings that make a cloze item: a word of three or more letters ending the line.
_LAST_WORD = re.compile(r"(?<![\w'])([A-Za-z]{3,})$")


@dataclass
class TaskSizes:
    """How much of the text the tasks use."""

    rolling_docs: int = 8  # documents scored whole by mmrec_rolling
    rolling_chars: int = 16384  # each cut to this many characters (at a line end)
    items: int = 100  # items of mmrec_cloze and of mmrec_choice
    context_chars: int = 600  # characters of passage before a cloze word or a choice
    seed: int = 0


def _cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, at the last line end before it when there is one."""
    if len(text) <= limit:
        return text
    end = text.rfind("\n", 0, limit)
    return text[: end + 1] if end > limit // 2 else text[:limit]


def rolling_docs(texts: list[str], sizes: TaskSizes) -> list[dict[str, Any]]:
    """The longest documents first (long context is what the task is for), each cut to ``rolling_chars``."""
    ranked = sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i))
    return [{"text": _cut(texts[i], sizes.rolling_chars)} for i in ranked[: sizes.rolling_docs] if texts[i].strip()]


def _passage_before(lines: list[str], i: int, chars: int) -> str:
    """The lines before line ``i``, back to about ``chars`` characters."""
    start, size = i, 0
    while start > 0 and size < chars:
        start -= 1
        size += len(lines[start])
    return "".join(lines[start:i])


def cloze_docs(texts: list[str], sizes: TaskSizes) -> list[dict[str, Any]]:
    """Passages whose last line ends in a word; the context is everything before that word."""
    candidates = []
    for d, text in enumerate(texts):
        lines = text.splitlines(keepends=True)
        for i, line in enumerate(lines):
            if i >= 3 and _LAST_WORD.search(line.rstrip()):
                candidates.append((d, i))
    rng = random.Random(sizes.seed)
    picked = sorted(rng.sample(candidates, min(sizes.items, len(candidates))))
    docs = []
    for d, i in picked:
        lines = texts[d].splitlines(keepends=True)
        line = lines[i].rstrip()
        match = _LAST_WORD.search(line)
        assert match is not None
        context = _passage_before(lines, i, sizes.context_chars) + line[: match.start()]
        docs.append({"context": context, "target": match.group(1)})
    return docs


def choice_docs(texts: list[str], sizes: TaskSizes) -> list[dict[str, Any]]:
    """A passage and four lines: the one that follows it and three drawn from the rest of the text."""
    lines_of = [text.splitlines(keepends=True) for text in texts]
    pool = sorted({ln for lines in lines_of for ln in lines if len(ln.strip()) >= 8})
    candidates = [
        (d, i) for d, lines in enumerate(lines_of) for i, ln in enumerate(lines) if i >= 3 and len(ln.strip()) >= 8
    ]
    rng = random.Random(sizes.seed + 1)
    picked = sorted(rng.sample(candidates, min(sizes.items, len(candidates))))
    docs: list[dict[str, Any]] = []
    for d, i in picked:
        lines = lines_of[d]
        answer = lines[i]
        others = [ln for ln in rng.sample(pool, min(len(pool), 8)) if ln.strip() != answer.strip()][:3]
        if len(others) < 3:
            continue
        label = rng.randrange(4)
        choices = [ln.rstrip("\n") for ln in others[:label] + [answer] + others[label:]]
        docs.append({"context": _passage_before(lines, i, sizes.context_chars), "choices": choices, "label": label})
    return docs


def _yaml(task: str, data_file: Path, cache_dir: Path, body: str) -> str:
    # JSON strings are valid YAML scalars: paths with any characters stay intact.
    return (
        f"task: {task}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files: {{test: {json.dumps(str(data_file))}}}\n"
        f"  cache_dir: {json.dumps(str(cache_dir))}\n"
        "test_split: test\n" + body + "metadata:\n  version: 1.0\n"
    )


_BODIES = {
    "mmrec_rolling": (
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        "doc_to_target: text\n"
        "metric_list:\n"
        "  - metric: word_perplexity\n"
        "  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n"
    ),
    "mmrec_cloze": (
        "output_type: loglikelihood\n"
        "doc_to_text: context\n"
        "doc_to_target: target\n"
        'target_delimiter: ""\n'
        "metric_list:\n"
        "  - metric: perplexity\n"
        "    aggregation: perplexity\n"
        "    higher_is_better: false\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
    ),
    "mmrec_choice": (
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        'target_delimiter: ""\n'
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "  - metric: acc_norm\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
    ),
}


def write_tasks(texts: Iterable[str], folder: str | Path, sizes: TaskSizes | None = None) -> dict[str, int]:
    """Write ``<task>.jsonl`` and ``<task>.yaml`` of the three tasks into ``folder``; returns items per task."""
    sizes = sizes or TaskSizes()
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("no text to build the lm-eval tasks from (every document was empty)")
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    builders: dict[str, Callable[[list[str], TaskSizes], list[dict[str, Any]]]] = {
        "mmrec_rolling": rolling_docs,
        "mmrec_cloze": cloze_docs,
        "mmrec_choice": choice_docs,
    }
    counts = {}
    for task in TASKS:
        docs = builders[task](texts, sizes)
        if not docs:
            raise ValueError(f"{task}: the text is too short to build any item from")
        data_file = folder / f"{task}.jsonl"
        data_file.write_text("".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs), encoding="utf-8")
        (folder / f"{task}.yaml").write_text(_yaml(task, data_file, folder / "hf_cache", _BODIES[task]))
        counts[task] = len(docs)
    return counts
