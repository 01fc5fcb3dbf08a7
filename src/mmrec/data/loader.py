"""Batches for training: every row of the batch is a continuous stream of documents.

A row reads documents one after another, each followed by the end-of-text id,
in windows of ``seq_len`` tokens; window i+1 starts where window i ended, so
a model that carries its state from window to window (MM-Rec) sees a long
document whole, at the memory cost of one window.

Everything is a pure function of (seed, stage, row, draw), never of the
process count: row g of the global batch reads the same documents whether it
runs in one process or in rank g // rows_per_rank of several, and the rows of
different ranks never share a document (row g draws document k of a source
only when k = g mod rows, within an epoch). The loader's state is a small
JSON-able dict, saved with every checkpoint, so a resumed run continues with
exactly the tokens it would have seen.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from mmrec.data.shards import PreparedDataset, TokenShard


def _uniform(*key: Any) -> float:
    digest = hashlib.sha256(":".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


@dataclass
class _Row:
    source: str = ""  # source of the current document ("" before the first)
    k: int = -1  # the source's document draw index of the current document
    offset: int = 0  # next token of the current document (== its length: the EOT is next)
    draws: int = 0  # documents this row has started
    carry: int = -1  # last token of the previous window, first of the next (-1: none)
    eot_pending: bool = True  # streams start with an end-of-text id (a document boundary)
    per_source: dict[str, int] = field(default_factory=dict)  # documents drawn so far from each source


class StreamLoader:
    def __init__(self, dataset: PreparedDataset, eot_id: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.dataset, self.eot_id, self.seed = dataset, eot_id, seed
        self.rank, self.world_size = rank, world_size
        self.names = sorted(dataset.sources)
        self.stage = -1
        self.global_rows = 0
        self.base: dict[str, int] = {n: 0 for n in self.names}  # first draw index of the stage, per source
        self.weights: dict[str, float] = {}
        self.rows: list[_Row] = []
        self.row_ids: list[int] = []
        self.max_k: dict[str, int] = {n: -1 for n in self.names}

    # Document order --------------------------------------------------------
    def _shard(self, name: str) -> TokenShard:
        return self.dataset.sources[name].train

    @lru_cache(maxsize=64)  # noqa: B019 - one loader per process, a handful of (source, epoch) keys
    def _permutation(self, name: str, epoch: int) -> np.ndarray:
        n = self._shard(name).n_docs
        return np.random.default_rng([self.seed, self.names.index(name), epoch]).permutation(n)

    def _document(self, name: str, k: int) -> np.ndarray:
        n = self._shard(name).n_docs
        return self._shard(name).doc(int(self._permutation(name, k // n)[k % n]))

    def _pick_source(self, g: int, draws: int) -> str:
        names = [n for n in self.names if self.weights.get(n, 0.0) > 0]
        total = sum(self.weights[n] for n in names)
        u = _uniform(self.seed, self.stage, g, draws) * total
        for n in names:
            u -= self.weights[n]
            if u < 0:
                return n
        return names[-1]

    # Stages ----------------------------------------------------------------
    def set_stage(
        self, stage: int, global_rows: int, weights: dict[str, float], max_k: dict[str, int] | None = None
    ) -> None:
        """Start a stage: ``global_rows`` streams, this process owning an equal share.

        ``max_k``: the largest document draw index any row of any process used
        so far (all-reduced by the trainer in multi-process runs), so the new
        stage starts on documents not read yet.
        """
        if global_rows % self.world_size:
            raise ValueError(f"{global_rows} rows cannot be split evenly over {self.world_size} processes")
        if stage != self.stage:
            done = max_k if max_k is not None else self.max_k
            self.base = {n: done.get(n, -1) + 1 for n in self.names}
            per_rank = global_rows // self.world_size
            self.row_ids = list(range(self.rank * per_rank, (self.rank + 1) * per_rank))
            self.rows = [_Row() for _ in self.row_ids]
            self.stage, self.global_rows = stage, global_rows
        self.weights = {n: float(weights.get(n, 0.0)) for n in self.names}
        if not any(self.weights.values()):
            raise ValueError("every source has weight 0 in this stage")

    # Reading ---------------------------------------------------------------
    def _read(self, g: int, row: _Row, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if row.eot_pending:
                out.append(self.eot_id)
                row.eot_pending = False
                row.source = self._pick_source(g, row.draws)
                row.k = self._next_k(g, row)
                row.offset = 0
                row.draws += 1
                continue
            doc = self._document(row.source, row.k)
            take = doc[row.offset : row.offset + n - len(out)]
            out.extend(take.tolist())
            row.offset += len(take)
            if row.offset >= len(doc):
                row.eot_pending = True
        return out

    def _next_k(self, g: int, row: _Row) -> int:
        # The j-th document this row draws from a source is draw index base + g + j * rows.
        j = row.per_source.get(row.source, 0)
        row.per_source[row.source] = j + 1
        k = self.base[row.source] + g + j * self.global_rows
        self.max_k[row.source] = max(self.max_k[row.source], k)
        return k

    def next_batch(self, seq_len: int, part: int = 0, parts: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [rows, seq_len]; targets are inputs shifted by one.

        The rows are this process's streams, or with ``parts`` > 1 (gradient
        accumulation) the ``part``-th contiguous share of them.
        """
        n = len(self.rows) // parts
        batch = []
        for g, row in zip(self.row_ids[part * n : (part + 1) * n], self.rows[part * n : (part + 1) * n], strict=True):
            tokens = ([row.carry] if row.carry >= 0 else []) + self._read(g, row, seq_len + (row.carry < 0))
            row.carry = tokens[-1]
            batch.append(tokens)
        t = torch.tensor(batch, dtype=torch.long)
        return t[:, :-1], t[:, 1:]

    # Persistence -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "global_rows": self.global_rows,
            "base": self.base,
            "weights": self.weights,
            "max_k": self.max_k,
            "row_ids": self.row_ids,
            "rows": [{**vars(r), "per_source": dict(r.per_source)} for r in self.rows],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage, self.global_rows = state["stage"], state["global_rows"]
        self.base, self.weights, self.max_k = dict(state["base"]), dict(state["weights"]), dict(state["max_k"])
        self.row_ids = list(state["row_ids"])
        self.rows = [_Row(**{**r, "per_source": dict(r["per_source"])}) for r in state["rows"]]


def eval_windows(shard: TokenShard, eot_id: int, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Fixed validation windows [n, seq_len + 1] from the start of a split.

    The split's documents in stored order, each preceded by the end-of-text id,
    cut into windows that overlap by one token (every token is predicted once).
    At least one window when the split holds at least two tokens.
    """
    stream: list[int] = []
    for i in range(shard.n_docs):
        stream.append(eot_id)
        stream.extend(shard.doc(i).tolist())
        if len(stream) > max_tokens:
            break
    stream = stream[: max(max_tokens, 2) + 1]
    n = max(1, (len(stream) - 1) // seq_len) if len(stream) >= 2 else 0
    if n == 0:
        return torch.zeros(0, seq_len + 1, dtype=torch.long)
    if len(stream) - 1 < seq_len:  # a split shorter than one window: one short window
        return torch.tensor([stream], dtype=torch.long)
    return torch.tensor([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)], dtype=torch.long)
