"""``mmrec serve``: the FastAPI application and how it is run.

Routes (OpenAI-compatible where OpenAI has them)::

    GET  /health                    no key needed: status, load, the engine's batch sizes
    GET  /v1/models, /v1/models/ID  the one model served
    POST /v1/completions            text completion, streamed (server-sent events) or not
    POST /v1/chat/completions       chat, through the plain-text template of protocol.chat_prompt
    GET  /v1/sessions[/ID], DELETE /v1/sessions/ID
    GET  /                          the playground page (static/index.html), when installed

Every error is an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException

from mmrec.models.checkpoint import WEIGHTS, LoadedModel, load
from mmrec.serve.protocol import APIError, Limits
from mmrec.serve.service import Service
from mmrec.serve.sessions import SessionStore
from mmrec.utils.files import sha256_file

log = logging.getLogger("mmrec.serve")
STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_SESSIONS_DIR = "mmrec-sessions"


def fingerprint(loaded: LoadedModel) -> str:
    """The sha256 of the checkpoint's weights (from its sealed meta.json, else computed): sessions are tied to it."""
    record = (loaded.meta.get("files") or {}).get(WEIGHTS) or {}
    digest = record.get("sha256") if isinstance(record, dict) else None
    return str(digest) if digest else sha256_file(loaded.path / WEIGHTS)


def create_app(
    checkpoint: str | Path | LoadedModel,
    *,
    sessions_dir: str | Path = DEFAULT_SESSIONS_DIR,
    api_keys: Sequence[str] = (),
    model_name: str | None = None,
    limits: Limits | None = None,
    device: str = "cpu",
    compile: bool = False,
    threads: int | None = None,
) -> FastAPI:
    """The server of ``checkpoint`` (a run or step directory, or a loaded model) with sessions under
    ``sessions_dir``. ``api_keys``: keys accepted on every route but /health and / (none: no check).
    ``compile``: decode MM-Rec through ``torch.compile`` (:meth:`MMRecLM.compile_decoding`), compiled
    here, before the server answers. ``threads``: torch's CPU threads for the engine thread (None: as
    the process has them)."""
    loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load(checkpoint, device)
    if loaded.tokenizer is None:
        raise ValueError(f"{loaded.path} has no tokenizer (a synthetic task on raw token ids); it cannot serve text")
    limits = limits or Limits()
    model: Any = loaded.model
    if compile:
        if not hasattr(model, "compile_decoding"):
            raise ValueError(f"compile: only MM-Rec's decoding step has a compiled path; {loaded.arch} runs eager")
        log.info("compiling the decoding step for 1 and up to %d streams (about a minute)", limits.max_batch)
        model.compile_decoding(warm_up=(1, limits.max_batch))
    model_id = model_name or (loaded.path.parent.name if loaded.path.name.startswith("step-") else loaded.path.name)
    digest = fingerprint(loaded)
    state_class = type(model.init_state(1))
    store = SessionStore(sessions_dir, digest, loaded.arch, state_class, model.config.to_dict())
    info = {
        "arch": loaded.arch,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "checkpoint": digest,
        "step": loaded.step,
        "state": "fixed size" if loaded.arch == "mmrec" else "KV cache (grows with the session)",
    }
    keys = tuple(k for k in api_keys if k)
    service = Service(model, loaded.tokenizer, model_id, digest, store, limits, keys, info, engine_threads=threads)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.engine.start()
        try:
            yield
        finally:
            service.engine.stop()
            service.close()
            store.close()

    # FastAPI's /docs and /openapi.json cannot check our keys: with keys they are not served at all.
    hidden: dict[str, Any] = {"docs_url": None, "redoc_url": None, "openapi_url": None} if keys else {}
    app = FastAPI(title="mmrec serve", version=str(loaded.meta.get("mmrec_version", "")), lifespan=lifespan, **hidden)
    app.state.service = service
    _errors(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return service.health()

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        service.owner(request)
        return service.models()

    @app.get("/v1/models/{name}")
    async def model_card(name: str, request: Request) -> dict[str, Any]:
        service.owner(request)
        service.check_model(name)
        return dict(service.models()["data"][0])

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await service.completion(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await service.chat(request)

    @app.get("/v1/sessions")
    async def sessions(request: Request) -> dict[str, Any]:
        return await service.list_sessions(service.owner(request))

    @app.get("/v1/sessions/{sid}")
    async def session(sid: str, request: Request) -> dict[str, Any]:
        return await service.get_session(service.owner(request), sid)

    @app.delete("/v1/sessions/{sid}")
    async def delete_session(sid: str, request: Request) -> dict[str, Any]:
        return await service.delete_session(service.owner(request), sid)

    @app.get("/", include_in_schema=False)
    async def playground() -> Any:
        page = STATIC / "index.html"
        if not page.is_file():
            raise APIError(404, "no playground page is installed; the API is under /v1", code="not_found")
        return FileResponse(page, media_type="text/html")

    return app


def _errors(app: FastAPI) -> None:
    """OpenAI-style bodies for every error, FastAPI's own included (400, not 422, for a bad request)."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, e: RequestValidationError) -> JSONResponse:
        first = (e.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(APIError(400, str(first.get("msg", "invalid request")), param=param).body(), 400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, message, code=code).body(), e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        body = APIError(500, f"internal error: {type(e).__name__}", type="server_error").body()
        return JSONResponse(body, 500)


def api_keys_from_env(given: Sequence[str]) -> list[str]:
    """``given`` keys, else those of MMREC_API_KEY (several separated by commas)."""
    if given:
        return list(given)
    return [k.strip() for k in os.environ.get("MMREC_API_KEY", "").split(",") if k.strip()]


def run_server(
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    sessions_dir: str = DEFAULT_SESSIONS_DIR,
    api_keys: Sequence[str] = (),
    model_name: str | None = None,
    limits: Limits | None = None,
    device: str = "cpu",
    log_level: str = "info",
    compile: bool = False,
    threads: int | None = None,
) -> None:
    """Load ``checkpoint`` and serve it until interrupted; the model runs on the engine thread with
    ``threads`` torch threads (default: one per core but one, at least one: the event loop, the HTTP
    work and the session I/O need a core too; on the 2-core machine 16 streaming clients got 2,107-2,197
    tokens/s with one engine thread against 1,903-1,909 with two, one client the same).

    Every other thread of the server runs torch with one thread. libgomp, the OpenMP runtime of
    torch's CPU build, keeps one team of worker threads per thread that starts parallel work, and
    when there are more OpenMP threads than cores it stops its workers spinning between parallel
    regions: each of the few hundred small ops of a decoding step then waits for its workers to wake.
    A model loaded and warmed up with two threads on the main thread made the engine thread's
    decoding step 3.5x slower (8.3 against 2.4 ms on the 2-core machine)."""
    import uvicorn

    threads = threads or max(1, torch.get_num_threads() - 1)
    torch.set_num_threads(1)  # this (main) thread: loading and compiling need no team of its own

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    keys = api_keys_from_env(api_keys)
    app = create_app(
        checkpoint,
        sessions_dir=sessions_dir,
        api_keys=keys,
        model_name=model_name,
        limits=limits,
        device=device,
        compile=compile,
        threads=threads,
    )
    service: Service = app.state.service
    fast = [name for name in ("uvloop", "httptools") if importlib.util.find_spec(name) is not None]
    log.info(
        "serving %s (%s, checkpoint %s) on http://%s:%d; sessions in %s; %s; %s",
        service.model_id,
        service.info["arch"],
        service.fingerprint[:16],
        host,
        port,
        Path(sessions_dir).resolve(),
        f"{len(keys)} API key(s) required" if keys else "no API key required",
        # uvicorn uses them when installed (the serve extra has them): 16 streaming clients got ~25% more
        # tokens/s on the 2-core machine, the event loop being the busiest thread there.
        f"uvicorn with {' and '.join(fast)}" if fast else "uvicorn with asyncio and h11 (pip install uvloop httptools)",
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


__all__ = ["Limits", "create_app", "fingerprint", "run_server"]
