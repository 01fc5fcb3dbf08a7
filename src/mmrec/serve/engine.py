"""The decoding engine of ``mmrec serve``: one thread owns the model and decodes every request.

Requests wait in a bounded queue. The thread admits them while fewer than ``max_batch`` streams run,
feeds each prompt alone (batch 1, in pieces of ``prefill_chunk`` tokens so that a long prompt does not
stall the streams already decoding), then lets it join a running batch of states with the same
``batch_key``. Every step samples one token per row (each with its own temperature, top_p and seeded
generator), hands the text to the request's sink, and feeds all rows through the model at once. A row
leaves its batch when it reaches ``max_tokens``, a stop string or the end-of-text token, or when its
client went away. A row whose state is kept (a session) takes one more step, so that the kept state has
consumed every generated token.
"""

from __future__ import annotations

import codecs
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mmrec.models.generation import sample_next
from mmrec.serve import batching

log = logging.getLogger("mmrec.serve")
_FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)


class QueueFull(RuntimeError):
    """Every decoding slot is taken and the waiting queue is full."""


@dataclass
class TextChunk:
    text: str


@dataclass
class Finished:
    reason: str  # "stop" (a stop string or end of text) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int
    state: Any = None  # batch-1 state after prompt and every generated token, when the job keeps it


@dataclass
class Failed:
    status: int
    message: str


Event = TextChunk | Finished | Failed


@dataclass
class Job:
    """One request: its tokens, sampling settings and where its events go (called from the engine thread)."""

    prompt_ids: list[int]
    max_tokens: int
    sink: Callable[[Event], None]
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    state: Any = None  # a batch-1 state to continue (a session), or None for a fresh stream
    keep_state: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.generator: torch.Generator | None = None
        self.fed = 0  # prompt tokens consumed so far
        self.generated = 0
        self.finishing: str | None = None  # the finish reason of a row that takes its last (feeding) step
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._unsent = ""  # decoded text not yet handed to the sink

    def cancel(self) -> None:
        """The client went away: the engine drops the row at its next step."""
        self.cancelled.set()

    # Text: whole UTF-8 characters, held back while they might be the start of a stop string.

    def _hold(self) -> int:
        """Characters at the end of the unsent text that could begin a stop string."""
        longest = min(len(self._unsent), max((len(s) for s in self.stop), default=1) - 1)
        for k in range(longest, 0, -1):
            if any(s.startswith(self._unsent[-k:]) for s in self.stop):
                return k
        return 0

    def take(self, token: int, piece: bytes, eos: int | None) -> str | None:
        """Account one generated token; returns the finish reason when the row is done."""
        self.generated += 1
        if eos is not None and token == eos:
            self._flush()
            return "stop"
        self._unsent += self._decoder.decode(piece)
        # A stop string can only begin in the unsent text: sent text never ends with the start of one.
        hits = [i for i in (self._unsent.find(s) for s in self.stop) if i >= 0]
        if hits:
            self._emit(min(hits))
            return "stop"
        if self.generated >= self.max_tokens:
            self._flush()
            return "length"
        self._emit(len(self._unsent) - self._hold())
        return None

    def _flush(self) -> None:
        self._unsent += self._decoder.decode(b"", final=True)
        self._emit(len(self._unsent))

    def _emit(self, n: int) -> None:
        if n > 0:
            self.sink(TextChunk(self._unsent[:n]))
        self._unsent = self._unsent[n:]


@dataclass
class Batch:
    rows: list[Job]
    state: Any  # the rows' states, batched; each has consumed everything before the token its logits give
    logits: Tensor  # [B, V] next-token logits of each row


@dataclass
class EngineStats:
    """What the engine did: decode steps by batch size (the proof that requests decode together)."""

    batch_sizes: Counter[int] = field(default_factory=Counter)
    tokens: int = 0
    prefill_tokens: int = 0
    finished: int = 0
    cancelled: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "decode_steps_by_batch_size": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "generated_tokens": self.tokens,
            "prefill_tokens": self.prefill_tokens,
            "finished": self.finished,
            "cancelled": self.cancelled,
        }


class Engine:
    """Owns ``model`` on one thread; :meth:`submit` is called from any thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_batch: int = 16,
        max_queue: int = 64,
        prefill_chunk: int = 2048,
        threads: int | None = None,
    ) -> None:
        """``threads``: torch's CPU threads for the engine thread (None: as the process has them). See
        :func:`mmrec.serve.app.run_server` for why the model's work should stay on this one thread."""
        self.model = model
        self.threads = threads
        self.tokenizer = tokenizer
        self.eos: int | None = getattr(tokenizer, "eot_id", None)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.stats = EngineStats()
        self._waiting: deque[Job] = deque()
        self._prefilling: deque[Job] = deque()
        self._batches: list[Batch] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._pieces: dict[int, bytes] = {}

    # Outside the engine thread --------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mmrec-serve-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: Job) -> None:
        """Queue ``job``; :class:`QueueFull` when all slots are busy and ``max_queue`` jobs already wait."""
        with self._wake:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if len(self._waiting) >= self.max_queue and self._running() >= self.max_batch:
                raise QueueFull(f"{self.max_batch} streams are decoding and {len(self._waiting)} requests wait")
            self._waiting.append(job)
            self._wake.notify()

    def load(self) -> dict[str, int]:
        """Streams decoding (or being prefilled) and requests waiting, for /health."""
        with self._wake:
            return {"running": self._running(), "queued": len(self._waiting)}

    def _running(self) -> int:
        return len(self._prefilling) + sum(len(b.rows) for b in self._batches)

    # The engine thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        with torch.no_grad():
            while True:
                with self._wake:
                    while not self._stopping and not self._waiting and not self._running():
                        self._wake.wait()
                    if self._stopping:
                        break
                    while self._waiting and self._running() < self.max_batch:
                        self._prefilling.append(self._waiting.popleft())
                self._prefill_step()
                for batch in list(self._batches):
                    try:
                        self._decode_step(batch)
                    except Exception as e:  # a bug or an exhausted device: fail this batch, serve the others
                        log.exception("decoding failed")
                        with self._wake:
                            if batch in self._batches:
                                self._batches.remove(batch)
                        for row in batch.rows:
                            row.sink(Failed(500, f"decoding failed: {type(e).__name__}: {e}"))
        self._fail_all(503, "the server is shutting down")

    def _fail_all(self, status: int, message: str) -> None:
        with self._wake:
            jobs = list(self._waiting) + list(self._prefilling) + [row for b in self._batches for row in b.rows]
            self._waiting.clear()
            self._prefilling.clear()
            self._batches.clear()
        for job in jobs:
            job.sink(Failed(status, message))

    def _prefill_step(self) -> None:
        """Feed up to ``prefill_chunk`` prompt tokens of the admitted requests, oldest first, each alone
        (batch 1); a request whose prompt is fed joins a batch. Short prompts that arrive together are all
        fed before the next decoding step, so they join at the same position."""
        budget = self.prefill_chunk
        while self._prefilling and budget > 0:
            job = self._prefilling[0]
            if job.cancelled.is_set():
                self._drop_prefilling(job)
                self.stats.cancelled += 1
                continue
            try:
                budget -= self._feed(job, budget)
            except (ValueError, TypeError) as e:  # the model refuses the input (e.g. past its learned positions)
                self._drop_prefilling(job)
                job.sink(Failed(400, str(e)))
            except Exception as e:  # a bug or an exhausted device: this request fails, the others go on
                log.exception("feeding a prompt failed")
                self._drop_prefilling(job)
                job.sink(Failed(500, f"feeding the prompt failed: {type(e).__name__}: {e}"))

    def _feed(self, job: Job, budget: int) -> int:
        """Feed the next piece of ``job``'s prompt (at most ``budget`` tokens); returns its length."""
        piece = job.prompt_ids[job.fed : job.fed + budget]
        ids = torch.tensor([piece], dtype=torch.long, device=self.device())
        # Logits of the last position only: a long prompt would otherwise build [T, vocab] of them.
        hidden, job.state = self.model.hidden_states(ids, job.state)
        job.fed += len(piece)
        self.stats.prefill_tokens += len(piece)
        if job.fed == len(job.prompt_ids):
            logits = self.model.lm_head(hidden[:, -1]).float()  # [1, V]
            with self._wake:
                self._join(job, logits)
                self._prefilling.popleft()
        return len(piece)

    def _drop_prefilling(self, job: Job) -> None:
        with self._wake:
            if self._prefilling and self._prefilling[0] is job:
                self._prefilling.popleft()

    def _join(self, job: Job, logits: Tensor) -> None:
        """Add a fed request to the batch of its ``batch_key`` (or a new one); the batch changes only once
        the new state and logits are built, so a failure leaves it as it was."""
        if job.seed is not None:
            job.generator = torch.Generator(device=logits.device).manual_seed(job.seed)
        key = batching.batch_key(job.state)
        for batch in self._batches:
            if batching.batch_key(batch.state) == key:
                state = batching.cat([batch.state, job.state])
                batch.logits = torch.cat([batch.logits, logits])
                batch.state = state
                batch.rows.append(job)
                break
        else:
            self._batches.append(Batch(rows=[job], state=job.state, logits=logits))
        job.state = None

    def _sample(self, batch: Batch) -> list[int | str]:
        """One token per row, or for a row whose sampling failed, why (that row alone is failed)."""
        greedy = batch.logits.argmax(dim=-1).tolist()
        tokens: list[int | str] = []
        for i, row in enumerate(batch.rows):
            # Sampling divides float32 logits by the temperature and compares float32 probabilities with top_p:
            # a value below float32's smallest normal number (1e-300) would be 0 there (NaN, or every token
            # dropped), so it is the limit it stands for: greedy.
            if row.temperature < _FLOAT32_TINY or (row.top_p is not None and row.top_p < _FLOAT32_TINY):
                tokens.append(int(greedy[i]))
                continue
            logits = batch.logits[i : i + 1]  # [1, V]
            # Shifted so that the largest logit is 0: divided by a tiny temperature the logits become 0 and
            # -inf, a one-hot distribution, where unshifted ones overflow to inf and softmax gives NaN.
            shifted = logits - logits.max(dim=-1, keepdim=True).values
            try:
                picked = sample_next(shifted, row.temperature, row.top_k, row.top_p, row.generator)
                tokens.append(int(picked[0]))
            except RuntimeError as e:  # e.g. NaN logits: this row's request fails, the others go on
                tokens.append(f"sampling failed: {e}")
        return tokens

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = bytes(self.tokenizer.decode_bytes([token]))
        return piece

    def _decode_step(self, batch: Batch) -> None:
        tokens = self._sample(batch)
        feed: list[int] = []  # rows that go through the model this step
        for i, (row, token) in enumerate(zip(batch.rows, tokens, strict=True)):
            if row.cancelled.is_set():
                self.stats.cancelled += 1
                continue
            if isinstance(token, str):
                log.error("request failed: %s", token)
                row.sink(Failed(500, token))
                continue
            reason = row.take(token, self._piece(token), self.eos)
            self.stats.tokens += 1
            if reason is None:
                feed.append(i)
            elif row.keep_state:
                row.finishing = reason
                feed.append(i)
            else:
                self.stats.finished += 1
                row.sink(Finished(reason, len(row.prompt_ids), row.generated))
        with self._wake:
            if not feed:
                self._batches.remove(batch)
                return
            if len(feed) < len(batch.rows):
                batch.rows = [batch.rows[i] for i in feed]
                batch.state = batching.select(batch.state, feed)
            ids = torch.tensor([[tokens[i]] for i in feed], dtype=torch.long, device=self.device())
        self.stats.batch_sizes[len(feed)] += 1
        out = self.model(ids, state=batch.state)
        batch.state, batch.logits = out.state, out.logits[:, -1].float()
        done = [i for i, row in enumerate(batch.rows) if row.finishing is not None]
        if not done:
            return
        states = batching.split(batch.state)
        for i in done:
            row = batch.rows[i]
            self.stats.finished += 1
            row.sink(Finished(row.finishing or "stop", len(row.prompt_ids), row.generated, states[i]))
        keep = [i for i in range(len(batch.rows)) if i not in done]
        with self._wake:
            if not keep:
                self._batches.remove(batch)
                return
            batch.rows = [batch.rows[i] for i in keep]
            batch.state = batching.select(batch.state, keep)
            batch.logits = batch.logits[keep]

    def device(self) -> torch.device:
        return next(self.model.parameters()).device
