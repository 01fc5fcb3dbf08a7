"""What the routes of ``mmrec serve`` do: auth, body limits, sessions around a generation, responses.

The routes in :mod:`mmrec.serve.app` stay one line each; the work is here. A generation is a
:class:`~mmrec.serve.engine.Job` whose events the engine thread hands to an asyncio queue of the request
(``loop.call_soon_threadsafe``). With a session, the request holds the session's lock from before its
state is read until the new state is committed, so two requests to one session run one after the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from mmrec.serve.engine import Engine, Failed, Finished, Job, QueueFull, TextChunk
from mmrec.serve.protocol import APIError, ChatRequest, CompletionRequest, Limits, chat_prompt, validation_error
from mmrec.serve.sessions import SessionConflict, SessionRecord, SessionStore, check_session_id, owner_of


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object: 413 past ``limit`` bytes (declared or sent), 400 when it is not JSON."""
    declared = request.headers.get("content-length", "")
    too_big = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect as e:
        raise APIError(400, "the client went away before sending the whole body", code="incomplete_body") from e
    try:
        body = json.loads(b"".join(chunks), parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


class SessionLocks:
    """One asyncio lock per session, dropped when nobody holds or waits for it. At most ``max_waiting``
    requests wait for one session (beside the one holding it); another is answered 429."""

    def __init__(self, max_waiting: int = 4) -> None:
        self.max_waiting = max_waiting
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._users: Counter[tuple[str, str]] = Counter()

    async def acquire(self, key: tuple[str, str]) -> Callable[[], None]:
        if self._users[key] > self.max_waiting:  # one holds it, max_waiting wait
            raise APIError(
                429,
                f"session '{key[1]}' is busy: a request is running on it and {self._users[key] - 1} more wait; "
                "a session runs one request at a time, retry when yours have finished",
                type="rate_limit_error",
                param="session",
                code="session_busy",
                headers={"Retry-After": "1"},
            )
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] += 1
        try:
            await lock.acquire()
        except BaseException:
            self._done(key)
            raise

        def release() -> None:
            lock.release()
            self._done(key)

        return release

    def _done(self, key: tuple[str, str]) -> None:
        self._users[key] -= 1
        if self._users[key] <= 0:
            del self._users[key]
            self._locks.pop(key, None)


class ClosingStream(StreamingResponse):
    """A streaming response that runs ``on_close`` however it ends (finished, failed or disconnected)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


@dataclass
class Turn:
    """One generation request as the service sees it."""

    kind: str  # "completion" or "chat"
    request: CompletionRequest | ChatRequest
    prompt: str
    max_tokens: int
    owner: str


class Service:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        model_id: str,
        fingerprint: str,
        store: SessionStore,
        limits: Limits,
        api_keys: tuple[str, ...],
        info: dict[str, Any],
        engine_threads: int | None = None,
    ) -> None:
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.fingerprint, self.store, self.limits = fingerprint, store, limits
        self.api_keys = tuple(k.encode("utf-8") for k in api_keys)
        self.info = info
        self.engine = Engine(
            model, tokenizer, limits.max_batch, limits.max_queue, limits.prefill_chunk, threads=engine_threads
        )
        # Session reads and writes run on two threads of their own: asyncio's default pool grows to
        # cpu_count + 4 threads, each of which can hold a malloc arena of its own (memory that stays).
        # One torch thread each: an OpenMP team of their own would slow the engine's (see run_server).
        self._io_pool = ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="mmrec-serve-io", initializer=torch.set_num_threads, initargs=(1,)
        )
        self.locks = SessionLocks(limits.max_session_waiting)
        self.created = int(time.time())
        pos_embed = getattr(model, "pos_embed", None)
        self.max_positions: int | None = None if pos_embed is None else int(pos_embed.num_embeddings)

    def io(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """``fn(*args)`` on the session I/O threads."""
        return asyncio.get_running_loop().run_in_executor(self._io_pool, functools.partial(fn, *args))

    def close(self) -> None:
        self._io_pool.shutdown(wait=True)

    # Checks ----------------------------------------------------------------------------------------

    def owner(self, request: Request) -> str:
        """The owner of the request's API key ('' when the server has none); 401 for a wrong or missing key."""
        if not self.api_keys:
            return ""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode("latin-1")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, k) for k in self.api_keys):
            raise APIError(401, "a valid API key is required: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        return owner_of(token.strip())

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server serves '{self.model_id}' (GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def parse(self, cls: type[CompletionRequest] | type[ChatRequest], body: dict[str, Any]) -> Any:
        try:
            req = cls.model_validate(body)
        except ValidationError as e:
            raise validation_error(e) from e
        self.check_model(req.model)
        return req

    def session_id(self, value: str) -> str:
        try:
            return check_session_id(value)
        except ValueError as e:
            raise APIError(400, f"invalid session id: {e}", param="session", code="invalid_session_id") from e

    def max_tokens(self, value: int | None, default: int, param: str) -> int:
        value = default if value is None else value
        if not 1 <= value <= self.limits.max_tokens:
            raise APIError(400, f"'{param}' must be between 1 and {self.limits.max_tokens}, got {value}", param=param)
        return value

    # Models and sessions ---------------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        card = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "mmrec", **self.info}
        return {"object": "list", "data": [card]}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_id, **self.engine.load(), "engine": self.engine.stats.as_dict()}

    async def list_sessions(self, owner: str) -> dict[str, Any]:
        records = await self.io(self.store.list, owner)
        return {"object": "list", "data": [r.public(self.fingerprint) for r in records]}

    async def get_session(self, owner: str, sid: str) -> dict[str, Any]:
        sid = self.session_id(sid)
        record = await self.io(self.store.get, owner, sid)
        if record is None:
            raise self._no_session(sid)
        return record.public(self.fingerprint)

    async def delete_session(self, owner: str, sid: str) -> dict[str, Any]:
        sid = self.session_id(sid)
        release = await self.locks.acquire((owner, sid))
        try:
            if not await self.io(self.store.delete, owner, sid):
                raise self._no_session(sid)
        finally:
            release()
        return {"id": sid, "object": "session", "deleted": True}

    @staticmethod
    def _no_session(sid: str) -> APIError:
        return APIError(404, f"no session '{sid}'", param="session", code="session_not_found")

    # Generation ------------------------------------------------------------------------------------

    async def completion(self, request: Request) -> Any:
        owner = self.owner(request)
        req: CompletionRequest = self.parse(CompletionRequest, await read_json(request, self.limits.max_body_bytes))
        turn = Turn("completion", req, req.text(), self.max_tokens(req.max_tokens, 16, "max_tokens"), owner)
        return await self._generate(turn)

    async def chat(self, request: Request) -> Any:
        owner = self.owner(request)
        req: ChatRequest = self.parse(ChatRequest, await read_json(request, self.limits.max_body_bytes))
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        limit = self.max_tokens(req.max_completion_tokens or req.max_tokens, 256, param)
        return await self._generate(Turn("chat", req, chat_prompt(req.messages), limit, owner))

    def _encode(self, turn: Turn) -> list[int]:
        try:
            ids = list(self.tokenizer.encode(turn.prompt))
        except ValueError as e:
            raise APIError(400, f"the prompt cannot be encoded: {e}", param="prompt") from e
        if not ids:
            raise APIError(400, "the prompt is empty: give at least one character to continue from", param="prompt")
        if len(ids) > self.limits.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt is {len(ids)} tokens; this server takes at most {self.limits.max_prompt_tokens} "
                "per request (a session keeps what earlier requests sent)",
                param="prompt",
                code="context_length_exceeded",
            )
        return ids

    async def _generate(self, turn: Turn) -> Any:
        ids = self._encode(turn)
        req = turn.request
        sid = req.session
        release: Callable[[], None] = lambda: None  # noqa: E731
        if sid is not None:
            release = await self.locks.acquire((turn.owner, sid))
        try:
            state, position = await self._session_state(turn.owner, sid)
            if self.max_positions is not None and position + len(ids) + turn.max_tokens > self.max_positions:
                raise APIError(
                    400,
                    f"this model learned positions up to {self.max_positions}; the session stands at {position}, "
                    f"the prompt is {len(ids)} tokens and max_tokens is {turn.max_tokens}",
                    code="context_length_exceeded",
                )
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[Any] = asyncio.Queue()

            def sink(event: Any) -> None:
                with contextlib.suppress(RuntimeError):  # the event loop is closed: the server is stopping
                    loop.call_soon_threadsafe(events.put_nowait, event)

            job = Job(
                prompt_ids=ids,
                max_tokens=turn.max_tokens,
                sink=sink,
                temperature=req.temperature,
                top_p=None if req.top_p >= 1.0 else req.top_p,
                top_k=req.top_k,
                seed=req.seed,
                stop=req.stops(),
                state=state,
                keep_state=sid is not None,
            )
            try:
                self.engine.submit(job)
            except QueueFull as e:
                raise APIError(
                    429,
                    f"the server is busy ({e}); retry shortly",
                    type="rate_limit_error",
                    code="queue_full",
                    headers={"Retry-After": "1"},
                ) from e
            except RuntimeError as e:
                raise APIError(503, str(e), type="server_error") from e
        except BaseException:
            release()
            raise
        if req.stream:

            def close() -> None:
                job.cancel()
                release()

            return ClosingStream(self._stream(turn, events, sid), close)
        try:
            return await self._whole(turn, events, sid, job)
        finally:
            release()

    async def _session_state(self, owner: str, sid: str | None) -> tuple[Any, int]:
        if sid is None:
            return None, 0
        record = await self.io(self.store.get, owner, sid)
        if record is None:
            return None, 0
        try:
            state = await self.io(self.store.load_state, record, self.engine.device())
        except SessionConflict as e:
            raise APIError(409, str(e), param="session", code="session_conflict") from e
        return state, record.position

    async def _save(self, turn: Turn, sid: str, state: Any) -> SessionRecord:
        task = self.io(self.store.save, turn.owner, sid, state)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait([task])  # the client left; the state is committed before the lock is let go
            raise
        except OSError as e:
            raise APIError(
                507,
                f"the reply was generated but session '{sid}' could not be saved ({e}); it keeps its previous state",
                type="server_error",
                code="session_not_saved",
            ) from e

    def _envelope(self, turn: Turn, rid: str, chunk: bool) -> dict[str, Any]:
        kind = {"completion": "text_completion", "chat": "chat.completion"}[turn.kind]
        kind += ".chunk" if chunk and turn.kind == "chat" else ""
        return {"id": rid, "object": kind, "created": int(time.time()), "model": self.model_id}

    def _choice(self, turn: Turn, text: str | None, reason: str | None, chunk: bool) -> dict[str, Any]:
        if turn.kind == "completion":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        if chunk:
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}

    @staticmethod
    def _usage(done: Finished) -> dict[str, int]:
        total = done.prompt_tokens + done.completion_tokens
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens, "total_tokens": total}

    @staticmethod
    def _failure(event: Failed) -> APIError:
        kind = "invalid_request_error" if event.status < 500 else "server_error"
        return APIError(event.status, event.message, type=kind)

    async def _whole(self, turn: Turn, events: asyncio.Queue[Any], sid: str | None, job: Job) -> JSONResponse:
        parts: list[str] = []
        try:
            while True:
                event = await events.get()
                if isinstance(event, TextChunk):
                    parts.append(event.text)
                elif isinstance(event, Failed):
                    raise self._failure(event)
                else:
                    break
        except asyncio.CancelledError:
            job.cancel()
            raise
        prefix = "cmpl" if turn.kind == "completion" else "chatcmpl"
        body = self._envelope(turn, f"{prefix}-{uuid.uuid4().hex}", chunk=False)
        body["choices"] = [self._choice(turn, "".join(parts), event.reason, chunk=False)]
        body["usage"] = self._usage(event)
        if sid is not None:
            record = await self._save(turn, sid, event.state)
            body["session"] = record.public(self.fingerprint)
        return JSONResponse(body)

    async def _stream(self, turn: Turn, events: asyncio.Queue[Any], sid: str | None) -> AsyncIterator[str]:
        prefix = "cmpl" if turn.kind == "completion" else "chatcmpl"
        rid = f"{prefix}-{uuid.uuid4().hex}"

        envelope = self._envelope(turn, rid, chunk=True)  # one "created" for every chunk, as OpenAI's

        def chunk(text: str | None, reason: str | None) -> dict[str, Any]:
            return {**envelope, "choices": [self._choice(turn, text, reason, True)]}

        # A token's chunk is the same JSON each time but for its text: rendered once, split where the text goes.
        marker = "\u0000mmrec-text\u0000"
        head, tail = _sse(chunk(marker, None)).split(json.dumps(marker))

        if turn.kind == "chat":
            first = chunk(None, None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            yield _sse(first)
        while True:
            event = await events.get()
            if isinstance(event, TextChunk):
                yield head + json.dumps(event.text) + tail
            elif isinstance(event, Failed):
                yield _sse(self._failure(event).body())
                return
            else:
                break
        last = chunk(None if turn.kind == "chat" else "", event.reason)
        if sid is not None:
            try:
                record = await self._save(turn, sid, event.state)
            except APIError as e:
                yield _sse(e.body())
                return
            last["session"] = record.public(self.fingerprint)
        yield _sse(last)
        if turn.request.include_usage():
            yield _sse({**self._envelope(turn, rid, chunk=True), "choices": [], "usage": self._usage(event)})
        yield _sse("[DONE]")
