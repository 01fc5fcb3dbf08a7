"""``mmrec serve``: an OpenAI-compatible server of a checkpoint whose sessions keep their memory.

Needs the ``serve`` extra (FastAPI, uvicorn); without it the command stops with the install command.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from mmrec.cli.command import Command
from mmrec.cli.commands import CHECKPOINT_HELP, DEVICE_HELP
from mmrec.config import ConfigError, _doc, _positive, _require


@dataclass
class ServeOptions:
    checkpoint: str = _doc(CHECKPOINT_HELP, default="")
    host: str = _doc(
        "Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).", default="127.0.0.1"
    )
    port: int = _doc("Port to listen on.", default=8000)
    api_key: list[str] = _doc(
        "API key(s) clients must send as 'Authorization: Bearer KEY' on every route but /health; sessions "
        "belong to the key that made them (default: $MMREC_API_KEY, several separated by commas; none: no check).",
        default_factory=list,
    )
    sessions_dir: str = _doc("Folder of the session store (SQLite index and state files).", default="mmrec-sessions")
    model_name: str | None = _doc("Model id clients name (default: the run directory's name).", default=None)
    max_batch: int = _doc("Streams decoded together at most.", default=16, group="limits")
    max_queue: int = _doc("Requests waiting for a slot at most; more are answered 429.", default=64, group="limits")
    max_session_waiting: int = _doc(
        "Requests waiting for one session while another runs on it, at most; more are answered 429.",
        default=4,
        group="limits",
    )
    max_tokens: int = _doc("Largest max_tokens a request may ask for (400 above).", default=4096, group="limits")
    max_prompt_tokens: int = _doc(
        "Longest prompt of one request, in tokens (400 above).", default=65536, group="limits"
    )
    max_body_bytes: int = _doc("Largest request body (413 above).", default=1 << 20, group="limits")
    prefill_chunk: int = _doc(
        "Prompt tokens fed per engine step, so that a long prompt does not stall the streams decoding.",
        default=2048,
        group="limits",
    )
    device: str = _doc(DEVICE_HELP, default="auto")
    compile: bool = _doc(
        "Decode through torch.compile (MM-Rec only; needs a C++ compiler on the CPU): compiled at start "
        "(about a minute), then 1.5-2.5x fewer ms per token (docs/serving.md).",
        default=False,
    )
    threads: int | None = _doc(
        "CPU threads of the model (default: one per core but one, at least one: the rest serves HTTP).", default=None
    )
    log_level: str = _doc(
        "Server log level.", default="info", choices=("critical", "error", "warning", "info", "debug")
    )

    def __post_init__(self) -> None:
        _require(bool(self.host), "host", "give an address to listen on (127.0.0.1 for this machine only)")
        _require(0 <= self.port <= 65535, "port", f"must be in 0..65535, got {self.port}")
        _require(self.threads is None or self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
        _positive(
            self,
            "max_batch",
            "max_queue",
            "max_session_waiting",
            "max_tokens",
            "max_prompt_tokens",
            "max_body_bytes",
            "prefill_chunk",
        )


def _serve(opts: ServeOptions) -> int:
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"needs {', '.join(missing)}: pip install 'mmrec[serve]'")
    from mmrec.serve.app import run_server
    from mmrec.serve.protocol import Limits
    from mmrec.utils.device import resolve_device

    limits = Limits(
        max_body_bytes=opts.max_body_bytes,
        max_tokens=opts.max_tokens,
        max_prompt_tokens=opts.max_prompt_tokens,
        max_batch=opts.max_batch,
        max_queue=opts.max_queue,
        max_session_waiting=opts.max_session_waiting,
        prefill_chunk=opts.prefill_chunk,
    )
    run_server(
        opts.checkpoint,
        host=opts.host,
        port=opts.port,
        sessions_dir=opts.sessions_dir,
        api_keys=opts.api_key,
        model_name=opts.model_name,
        limits=limits,
        device=str(resolve_device(opts.device)),
        log_level=opts.log_level,
        compile=opts.compile,
        threads=opts.threads,
    )
    return 0


SERVE = Command(
    "serve",
    ServeOptions,
    _serve,
    help="an OpenAI-compatible HTTP server of a checkpoint; sessions keep the model's memory",
    description="Serve a checkpoint over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models, "
    'streamed or not) on 127.0.0.1 by default. A request naming a session ({"session": "ID"}) continues from '
    "the state the session's last request left, stored on disk, so a client sends only the new text; "
    "/v1/sessions lists, shows and deletes them. Concurrent requests decode together in batches.",
    required=("checkpoint",),
)

__all__ = ["SERVE", "ServeOptions"]
