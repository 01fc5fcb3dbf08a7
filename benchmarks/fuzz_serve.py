"""A bounded fuzz run of ``mmrec serve``: thousands of malformed and hostile requests, then the same server
must still answer correctly with its memory back where it was.

    python benchmarks/fuzz_serve.py                      # 2,000 requests, the default 5.2M MM-Rec
    python benchmarks/fuzz_serve.py --requests 300 --tiny --json fuzz.json

The server is a real ``python -m mmrec serve`` process (random-init checkpoint, an API key, the byte
tokenizer). Requests go over raw sockets, so that nothing on the client side repairs them: bad and
truncated JSON, bodies past the limit (declared, sent, chunked), a wrong type for every field, absurd
numbers, unicode garbage (lone surrogates, NULs, invalid UTF-8), invalid session ids and path tricks in
them, unknown routes and methods, wrong content types and missing or wrong API keys; a few are valid
(streamed or not, with sessions) so that the decoding path runs between the attacks. They come from a
seeded generator, sent by ``--workers`` threads at once.

Passes when: no response has status 500 or above (nor a server error inside a 200 stream), every request
got a response, the process is alive, a greedy completion gives the same text as before the run, a
session continues correctly, and the server's RSS is within ``--rss-tolerance`` of its value after a
warm-up of the same generator. Prints a table per kind of request; exits 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KEY = "fuzz-key"
MODEL = "fuzz"


# The server under test ---------------------------------------------------------------------------------


def write_checkpoint(
    out: Path, arch: str = "mmrec", tiny: bool = False, max_seq_len: int = 4096, ascii_only: bool = False
) -> Path:
    """A random-init checkpoint with the byte tokenizer: the default 5.2M MM-Rec (``tiny``: a few thousand
    parameters), or the parameter-matched LLaMA-style Transformer (``arch="llama"``).

    ``ascii_only``: the (tied) embedding rows of every token but printable ASCII and newline are zero, so
    their logits are 0 while the largest printable one is positive: greedy text is one ASCII character per
    token (one streamed chunk each) and never the end-of-text token. It changes no amount of work."""
    import torch

    from mmrec.config import MMRecConfig
    from mmrec.models import build_model
    from mmrec.models.checkpoint import save_checkpoint
    from mmrec.models.transformer import matched_transformer_config
    from mmrec.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    config = MMRecConfig(d_model=32, n_layers=2, n_heads=2, chunk_size=8, mem_slots=4) if tiny else MMRecConfig()
    model: Any = build_model(config)
    if arch != "mmrec":
        shape = {"d_model": config.d_model, "n_layers": config.n_layers, "n_heads": config.n_heads}
        model = build_model(
            matched_transformer_config(model.num_parameters(), preset=arch, max_seq_len=max_seq_len, **shape)
        )
    if ascii_only:
        keep = torch.zeros(model.config.vocab_size, dtype=torch.bool)
        keep[[10, *range(32, 127)]] = True
        with torch.no_grad():
            model.embed.weight[~keep] = 0
    save_checkpoint(out, model, ByteTokenizer(), kind="train", step=0, trained_seq_len=config.chunk_size)
    return out


class ServerProcess:
    """``python -m mmrec serve`` on a free port of 127.0.0.1, its log in a file; ``with`` stops it."""

    def __init__(
        self,
        checkpoint: Path,
        sessions: Path,
        log: Path,
        *extra: str,
        api_key: str | None = KEY,
        env: dict[str, str] | None = None,
        startup_s: float = 120,
    ) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mmrec", "serve", "--checkpoint", str(checkpoint), "--port", str(self.port)]
        cmd += ["--sessions-dir", str(sessions), "--device", "cpu", "--log-level", "warning", "--model-name", MODEL]
        cmd += [*(["--api-key", api_key] if api_key else []), *extra]
        self.log = log
        self._log_file = open(log, "ab")  # noqa: SIM115 (closed in stop)
        full_env = {**os.environ, "MMREC_API_KEY": "", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=full_env)
        deadline = time.monotonic() + startup_s
        while request(self.port, "GET", "/health", timeout=2).status != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start; its log:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_bytes(self) -> int:
        """Resident memory of the server process, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc/PID/status")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._log_file.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Raw HTTP ----------------------------------------------------------------------------------------------


@dataclass
class Response:
    status: int | None  # None: no status line came back
    body: bytes = b""
    error: str | None = None  # what went wrong on the connection


def raw_request(
    method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"", content_length: bool = True
) -> bytes:
    """The bytes of an HTTP/1.1 request, as given (no escaping, no normalisation)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    hdrs = dict(headers or {})
    if content_length and body and not any(k.lower() in ("content-length", "transfer-encoding") for k in hdrs):
        hdrs["Content-Length"] = str(len(body))
    lines += [f"{k}: {v}" for k, v in hdrs.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def send(port: int, raw: bytes, timeout: float = 60.0) -> Response:
    """Send ``raw`` on a new connection and read until the server closes it."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as e:
        return Response(None, error=f"connect: {e}")
    with sock:
        send_error = None
        try:
            sock.sendall(raw)
        except OSError as e:  # the server may answer (413) and close before a large body is all sent
            send_error = f"send: {e}"
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except OSError as e:
            if not chunks:
                return Response(None, error=send_error or f"recv: {e}")
    data = b"".join(chunks)
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return Response(None, data, error=send_error or "no status line")
    return Response(int(parts[1]), body)


def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    key: str | None = KEY,
    timeout: float = 60.0,
) -> Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = b""
    if body is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(body).encode()
    return send(port, raw_request(method, path, headers, data), timeout)


def json_body(response: Response) -> Any:
    """The JSON of a response body (de-chunked when it was sent chunked)."""
    body = response.body
    if body[:1] not in (b"{", b"["):  # chunked: size lines between the pieces
        pieces, rest = [], body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            pieces.append(rest[:size])
            rest = rest[size + 2 :]
        body = b"".join(pieces)
    return json.loads(body)


# The hostile requests ----------------------------------------------------------------------------------


@dataclass
class Case:
    kind: str
    raw: bytes
    note: str


HOSTILE_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**63, 2**64 + 1, 10**100, -(10**100), 1e308, -1e308, 5e-324, 0.5, -0.0,
    "", "5", "true", "null", "0x10", [], [1], ["a"] * 5, {}, {"a": {"b": []}}, [None], [[]], "x" * 10000,
    "\ud800", "\udfff\ud800", "\x00", "a\x00b", "A\u202eB", "\U0001f642" * 50, "\uffff\ufffe", "\u0000" * 100,
]  # fmt: skip
# Number tokens json.dumps cannot write: spliced into the body text.
RAW_NUMBERS = ["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1" + "0" * 5000, "1.5e-400", "-0", "00", "+1", ".5"]
SESSION_TRICKS = [
    "../../etc/passwd", "..%2f..%2fetc%2fpasswd", "%2e%2e", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..", ".",
    "a" * 65, "a" * 5000, "%00", "a%00b", "%ff%fe", "%F0%9F%99%82", "index.sqlite", "states", "..\\..\\windows",
    "%252e%252e", "a?b=c", "a#b", "//etc/passwd", "~root", "$(id)", "';DROP TABLE sessions;--", "%0d%0aX-A:%20b",
    "CON", "a/b", "..;/..;/etc", "%c0%ae%c0%ae", "\u0430\u0431", "sess\u0000ion",
]  # fmt: skip
ROUTES = [
    "/", "/v1", "/v1/", "/v1/completions/", "/v1/chat", "/v1/embeddings", "/v1/models/", "/v1/models/nope",
    "/v1/models/../../etc/passwd", "/static/../../etc/passwd", "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
    "/v1/sessions/x/y", "/health/../v1/models", "/index.html", "//v1//models", "/v1/completions?x=" + "a" * 3000,
    "/v1/sessions?limit=-1", "/v1/models/%00", "/docs", "/openapi.json", "/v1/sessions/%2e%2e%2findex.sqlite",
]  # fmt: skip
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE", "FOO", "CONNECT"]
FIELDS = [
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
    "n", "logprobs", "presence_penalty", "frequency_penalty", "session", "echo", "suffix", "user", "logit_bias",
]  # fmt: skip
CHAT_FIELDS = ["messages", "max_completion_tokens", "messages.0", "messages.0.role", "messages.0.content"]


def completion_body(rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "prompt": rng.choice(["Hello", "The cat ", "a"]), "max_tokens": 2}
    body["temperature"] = rng.choice([0, 0.7])
    if rng.random() < 0.3:
        body["stream"] = True
    if rng.random() < 0.2:
        body["session"] = f"fz-{rng.randrange(8)}"
    return body


def chat_body(rng: random.Random) -> dict[str, Any]:
    body = completion_body(rng)
    del body["prompt"]
    body["messages"] = [{"role": "user", "content": rng.choice(["hi", "hello there"])}]
    return body


class Generator:
    """Seeded hostile requests; ``next()`` gives one, of a kind drawn at random."""

    def __init__(self, seed: int, key: str = KEY) -> None:
        self.rng = random.Random(seed)
        self.key = key
        self.kinds: list[tuple[str, Callable[[], tuple[str, str, dict[str, str], bytes, str]]]] = [
            ("valid", self.valid),
            ("bad_json", self.bad_json),
            ("wrong_type", self.wrong_type),
            ("absurd_number", self.absurd_number),
            ("unicode_garbage", self.unicode_garbage),
            ("session_id_body", self.session_id_body),
            ("session_id_path", self.session_id_path),
            ("route_method", self.route_method),
            ("content_type", self.content_type),
            ("api_key", self.api_key),
            ("huge", self.huge),
            ("http_junk", self.http_junk),
        ]
        self.weights = [6, 12, 16, 10, 10, 8, 8, 8, 6, 6, 3, 4]

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def post(self, body: bytes, ctype: str = "application/json") -> tuple[dict[str, str], bytes]:
        return {**self.auth(), "Content-Type": ctype}, body

    def endpoint(self) -> tuple[str, dict[str, Any]]:
        rng = self.rng
        return (
            ("/v1/chat/completions", chat_body(rng))
            if rng.random() < 0.4
            else ("/v1/completions", completion_body(rng))
        )

    def next(self) -> Case:
        kind, make = self.rng.choices(self.kinds, self.weights)[0]
        method, path, headers, body, note = make()
        content_length = "Transfer-Encoding" not in headers
        return Case(kind, raw_request(method, path, headers, body, content_length), note)

    # Each maker returns (method, path, headers, body, note).

    def valid(self) -> tuple[str, str, dict[str, str], bytes, str]:
        path, body = self.endpoint()
        return ("POST", path, *self.post(json.dumps(body).encode()), f"valid {path}")

    def bad_json(self) -> tuple[str, str, dict[str, str], bytes, str]:
        rng = self.rng
        path, body = self.endpoint()
        text = json.dumps(body)
        choice = rng.randrange(9)
        if choice == 0:
            data, note = text[: rng.randrange(len(text))].encode(), "truncated"
        elif choice == 1:
            data, note = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))), "random bytes"
        elif choice == 2:
            data, note = rng.choice([b"[]", b"1", b'"s"', b"null", b"true", b"[{}]"]), "not an object"
        elif choice == 3:
            depth = rng.choice([100, 1000, 100000])
            data, note = (b"[" * depth + b"]" * depth), f"nested {depth}"
        elif choice == 4:
            data, note = text.replace("}", ",}", 1).encode(), "trailing comma"
        elif choice == 5:
            data, note = text.replace('"', "'").encode(), "single quotes"
        elif choice == 6:
            data, note = b"\xef\xbb\xbf" + text.encode(), "BOM"
        elif choice == 7:
            data, note = b"", "empty"
        else:
            depth = rng.choice([100, 10000])
            data, note = (b'{"a":' * depth + b"1" + b"}" * depth), f"nested objects {depth}"
        return ("POST", path, *self.post(data), f"{note} {path}")

    def wrong_type(self) -> tuple[str, str, dict[str, str], bytes, str]:
        rng = self.rng
        path, body = self.endpoint()
        fields = FIELDS + (CHAT_FIELDS if "chat" in path else [])
        name = rng.choice(fields)
        value = rng.choice(HOSTILE_VALUES)
        if rng.random() < 0.1:
            body.pop(name.split(".")[0], None)
            note = f"without {name.split('.')[0]}"
        else:
            target, *rest = name.split(".")
            if rest and isinstance(body.get(target), list):
                if rest == ["0"]:
                    body[target][0] = value
                else:
                    body[target][0][rest[1]] = value
            else:
                body[target] = value
            note = f"{name}={str(value)[:30]!r}"
        # A valid large max_tokens tests nothing the validation did not, and costs seconds of decoding.
        if type(body.get("max_tokens")) is int and 8 < body["max_tokens"] <= 4096:
            body["max_tokens"] = 8
        return ("POST", path, *self.post(json.dumps(body).encode()), note)

    def absurd_number(self) -> tuple[str, str, dict[str, str], bytes, str]:
        rng = self.rng
        path, body = self.endpoint()
        name = rng.choice(["max_tokens", "temperature", "top_p", "top_k", "seed", "n", "max_completion_tokens"])
        token = rng.choice(RAW_NUMBERS + ["-5", "0", "5000", "4097", "1e10", "2.0000001", "-0.0", "1e-300"])
        body[name] = "@@NUMBER@@"
        text = json.dumps(body).replace('"@@NUMBER@@"', token)
        return ("POST", path, *self.post(text.encode()), f"{name}={token[:20]}")

    def unicode_garbage(self) -> tuple[str, str, dict[str, str], bytes, str]:
        rng = self.rng
        path, body = self.endpoint()
        garbage = rng.choice(
            [
                "\ud800",
                "\udc00abc",
                "\x00" * 10,
                "\u202e\u200b\ufeff",
                "\U0010ffff" * 10,
                "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(50)),
                "e\u0301" * 200,
                "\U0001f468\u200d\U0001f469\u200d\U0001f467" * 20,
            ]
        )
        where = rng.choice(["prompt", "stop", "model", "session", "content", "key"])
        if where == "content" and "messages" in body:
            body["messages"][0]["content"] = garbage
        elif where == "key":
            body[garbage] = garbage
        elif where in body or where != "content":
            body["prompt" if where == "content" else where] = garbage
        if rng.random() < 0.3:  # bytes that are not UTF-8 at all
            data = json.dumps(body).encode().replace(b"\\u", b"\xff\xfe", 1)
        else:
            data = json.dumps(body).encode()
        return ("POST", path, *self.post(data), f"{where} {garbage[:10]!r}")

    def session_id_body(self) -> tuple[str, str, dict[str, str], bytes, str]:
        rng = self.rng
        path, body = self.endpoint()
        body["session"] = rng.choice(SESSION_TRICKS + HOSTILE_VALUES[:12])
        return ("POST", path, *self.post(json.dumps(body).encode()), f"session={str(body['session'])[:30]!r}")

    def session_id_path(self) -> tuple[str, str, dict[str, str], bytes, str]:
        rng = self.rng
        trick = rng.choice(SESSION_TRICKS)
        method = rng.choice(["GET", "DELETE", "GET", "POST", "PUT"])
        return (method, "/v1/sessions/" + trick, self.auth(), b"", f"{method} {trick[:30]!r}")

    def route_method(self) -> tuple[str, str, dict[str, str], bytes, str]:
        rng = self.rng
        method = rng.choice(METHODS)
        route = rng.choice(
            [*ROUTES, "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/sessions", "/health"]
        )
        body = json.dumps(completion_body(rng)).encode() if rng.random() < 0.5 else b""
        headers = {**self.auth(), **({"Content-Type": "application/json"} if body else {})}
        return (method, route, headers, body, f"{method} {route[:40]}")

    def content_type(self) -> tuple[str, str, dict[str, str], bytes, str]:
        rng = self.rng
        path, body = self.endpoint()
        text = json.dumps(body)
        ctype, data = rng.choice(
            [
                ("text/plain", text.encode()),
                ("application/x-www-form-urlencoded", b"model=fuzz&prompt=hi"),
                ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--x--"),
                ("application/json; charset=utf-16", text.encode("utf-16")),
                ("application/json; charset=latin-1", text.encode("latin-1", "replace")),
                ("", text.encode()),
                ("application/xml", b"<a>1</a>"),
            ]
        )
        headers = {**self.auth(), **({"Content-Type": ctype} if ctype else {})}
        if rng.random() < 0.2:
            headers["Content-Encoding"] = rng.choice(["gzip", "br", "deflate"])
        return ("POST", path, headers, data, f"{ctype or 'no type'} {headers.get('Content-Encoding', '')}")

    def api_key(self) -> tuple[str, str, dict[str, str], bytes, str]:
        rng = self.rng
        route = rng.choice(["/v1/models", "/v1/sessions", "/v1/completions", "/v1/sessions/fz-1"])
        auth = rng.choice(
            [
                None,
                "Bearer wrong",
                f"Bearer {self.key}x",
                f"Basic {self.key}",
                self.key,
                "Bearer ",
                "Bearer " + "\u00e9" * 100,
                "Bearer " + "k" * 20000,
                f"Bearer {self.key[:-1]}",
                f"Bearer  {self.key} extra",
            ]
        )
        headers = {"Authorization": auth} if auth is not None else {}
        method = "POST" if route == "/v1/completions" else "GET"
        body = json.dumps(completion_body(rng)).encode() if method == "POST" else b""
        if body:
            headers["Content-Type"] = "application/json"
        return (method, route, headers, body, f"auth {str(auth)[:20]!r}")

    def huge(self) -> tuple[str, str, dict[str, str], bytes, str]:
        rng = self.rng
        path, body = self.endpoint()
        choice = rng.randrange(5)
        if choice == 0:
            body["prompt"] = "x" * rng.choice([1_100_000, 2_000_000])
            return ("POST", path, *self.post(json.dumps(body).encode()), "body past the limit")
        if choice == 1:
            headers = {**self.auth(), "Content-Type": "application/json", "Content-Length": str(10**12)}
            return ("POST", path, headers, json.dumps(body).encode(), "declared 1 TB")
        if choice == 2:
            data = b"x" * 1_500_000
            chunked = b"".join(
                b"%x\r\n%s\r\n" % (len(p), p) for p in (data[i : i + 65536] for i in range(0, len(data), 65536))
            )
            headers = {**self.auth(), "Content-Type": "application/json", "Transfer-Encoding": "chunked"}
            return ("POST", path, headers, chunked + b"0\r\n\r\n", "chunked past the limit")
        if choice == 3:
            body["prompt"] = "y" * 300_000
            body.pop("messages", None)
            return ("POST", "/v1/completions", *self.post(json.dumps(body).encode()), "prompt past max_prompt_tokens")
        body["stop"] = ["s" * 256] * 4
        body["user"] = "u" * 500_000
        return ("POST", path, *self.post(json.dumps(body).encode()), "large ignored field")

    def http_junk(self) -> tuple[str, str, dict[str, str], bytes, str]:
        rng = self.rng
        choice = rng.randrange(5)
        if choice == 0:
            return ("GET", "/v1/models", {**self.auth(), "X-Big": "h" * 70000}, b"", "70 KB header")
        if choice == 1:
            return ("POST", "/v1/completions", {**self.auth(), "Content-Length": "-5"}, b"{}", "negative length")
        if choice == 2:
            return ("POST", "/v1/completions", {**self.auth(), "Content-Length": "abc"}, b"{}", "length not a number")
        if choice == 3:
            headers = {**self.auth(), "Content-Length": "2", "Transfer-Encoding": "chunked"}
            return ("POST", "/v1/completions", headers, b"0\r\n\r\n", "length and chunked")
        return ("GET", "/v1/models\x00", self.auth(), b"", "NUL in the target")


# The run -----------------------------------------------------------------------------------------------


@dataclass
class Tally:
    by_kind: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    failures: list[dict[str, Any]] = field(default_factory=list)  # status >= 500 or no response
    not_openai: Counter[str] = field(default_factory=Counter)  # 4xx without an OpenAI error body (per status)

    def add(self, case: Case, response: Response) -> None:
        status = response.status
        key = "none" if status is None else str(status)
        self.by_kind[case.kind][key] += 1
        stream_error = status == 200 and b'"type": "server_error"' in response.body
        if status is None or status >= 500 or stream_error:
            self.failures.append(
                {
                    "kind": case.kind,
                    "note": case.note,
                    "status": status,
                    "error": response.error or ("server error in stream" if stream_error else None),
                    "request_head": case.raw[:300].decode("utf-8", "replace"),
                    "response": response.body[:500].decode("utf-8", "replace"),
                }
            )
        elif 400 <= status < 500 and b'"error"' not in response.body[:2000]:
            self.not_openai[key] += 1

    def total(self) -> int:
        return sum(sum(c.values()) for c in self.by_kind.values())

    def table(self) -> str:
        statuses = sorted({s for c in self.by_kind.values() for s in c}, key=lambda s: (s == "none", s))
        lines = ["| kind | sent | " + " | ".join(statuses) + " |", "|---|---|" + "---|" * len(statuses)]
        totals: Counter[str] = Counter()
        for kind in sorted(self.by_kind):
            counts = self.by_kind[kind]
            totals.update(counts)
            row = " | ".join(str(counts.get(s, 0)) for s in statuses)
            lines.append(f"| {kind} | {sum(counts.values())} | {row} |")
        lines.append(f"| **all** | {sum(totals.values())} | " + " | ".join(str(totals[s]) for s in statuses) + " |")
        return "\n".join(lines)


def fire(port: int, cases: list[Case], workers: int, timeout: float, tally: Tally | None = None) -> Tally:
    tally = tally or Tally()
    with ThreadPoolExecutor(workers) as pool:
        for case, response in zip(cases, pool.map(lambda c: send(port, c.raw, timeout), cases), strict=True):
            tally.add(case, response)
    return tally


def fire_sliced(
    server: Any, cases: list[Case], workers: int, timeout: float, rss: list[int], slice_size: int = 250
) -> Tally:
    """``fire`` in slices, noting the server's RSS after each (a leak grows; a high-water mark levels off)."""
    tally = Tally()
    for i in range(0, len(cases), slice_size):
        fire(server.port, cases[i : i + slice_size], workers, timeout, tally)
        if server.alive():
            rss.append(server.rss_bytes())
    return tally


def greedy(port: int, prompt: str, session: str | None = None, max_tokens: int = 16) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if session:
        body["session"] = session
    response = request(port, "POST", "/v1/completions", body)
    if response.status != 200:
        raise RuntimeError(f"a normal completion answered {response.status}: {response.body[:300]!r}")
    return dict(json_body(response))


def run(
    server: ServerProcess, requests: int, seed: int, workers: int, timeout: float = 60.0, warmup: int | None = None
) -> dict[str, Any]:
    """Warm up, fuzz, then check the server: the numbers and checks of one run as a dict.

    The warm-up (long prompts, then ``warmup`` requests of another seed of the same generator, as many as
    the run by default) brings the server to its high-water mark of memory: ``mmrec serve`` keeps freed
    memory in its heap (mmrec.utils.cpu.tune_glibc_malloc), so RSS reaches its peak and stays; only a leak
    grows beyond it."""
    port = server.port
    reference = greedy(port, "The quick brown fox ")["choices"][0]["text"]
    # The largest work a valid request does: prompts longer than a prefill piece (2,048 tokens by default),
    # several at once. The first of them sets the high-water mark (about +80 MB for the default model);
    # without it here, the first such request of the run would, and look like a leak.
    long_prompt = {"model": MODEL, "prompt": "x" * 5000, "max_tokens": 4}
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda _: request(port, "POST", "/v1/completions", long_prompt, timeout=timeout), range(workers)))
    warm = Generator(seed + 1_000_003)
    rss_warmup: list[int] = []
    fire_sliced(
        server, [warm.next() for _ in range(requests if warmup is None else warmup)], workers, timeout, rss_warmup
    )
    time.sleep(1.0)
    rss_before = server.rss_bytes()
    gen = Generator(seed)
    cases = [gen.next() for _ in range(requests)]
    start = time.monotonic()
    rss_run: list[int] = []
    tally = fire_sliced(server, cases, workers, timeout, rss_run)
    seconds = time.monotonic() - start
    alive = server.alive()
    after: dict[str, Any] = {"alive": alive}
    if alive:
        time.sleep(1.0)
        after["rss_after"] = server.rss_bytes()
        after["health"] = request(port, "GET", "/health", key=None).status
        after["same_text"] = greedy(port, "The quick brown fox ")["choices"][0]["text"] == reference
        sid = f"after-{seed}"
        request(port, "DELETE", f"/v1/sessions/{sid}")
        one = greedy(port, "The quick ", sid, 8)
        two = greedy(port, "brown fox ", sid, 8)
        whole = greedy(port, "The quick " + one["choices"][0]["text"] + "brown fox ", None, 8)
        info = json_body(request(port, "GET", f"/v1/sessions/{sid}"))
        after["session_ok"] = (
            two["choices"][0]["text"] == whole["choices"][0]["text"]
            and info["tokens_consumed"] == len("The quick brown fox ") + 16
        )
    rss_after = after.get("rss_after", 0)
    rss_ratio = rss_after / rss_before if rss_before else float("nan")
    return {
        "requests": tally.total(),
        "seconds": seconds,
        "by_kind": {k: dict(v) for k, v in tally.by_kind.items()},
        "failures": tally.failures,
        "not_openai_4xx": dict(tally.not_openai),
        "rss_before": rss_before,
        "rss_ratio": rss_ratio,
        "rss_warmup_slices": rss_warmup,
        "rss_run_slices": rss_run,
        **after,
        "table": tally.table(),
    }


def verdict(result: dict[str, Any], min_requests: int, rss_tolerance: float) -> list[str]:
    """The checks that failed (empty: the run passed)."""
    problems = []
    if result["requests"] < min_requests:
        problems.append(f"only {result['requests']} requests were sent")
    if result["failures"]:
        problems.append(f"{len(result['failures'])} responses of status >= 500 or none at all")
    if not result["alive"]:
        problems.append("the server process died")
    else:
        if result.get("health") != 200:
            problems.append(f"/health answered {result.get('health')}")
        if not result.get("same_text"):
            problems.append("a greedy completion changed after the run")
        if not result.get("session_ok"):
            problems.append("a session did not continue correctly after the run")
        if not abs(result["rss_ratio"] - 1) <= rss_tolerance:
            problems.append(f"RSS after / before = {result['rss_ratio']:.3f}, beyond {rss_tolerance:.0%}")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=4, help="requests in flight at once")
    p.add_argument("--tiny", action="store_true", help="a tiny MM-Rec instead of the default 5.2M one")
    p.add_argument("--checkpoint", default=None, help="serve this checkpoint instead of a random-init one")
    p.add_argument("--rss-tolerance", type=float, default=0.10)
    p.add_argument(
        "--malloc-tuning",
        choices=["on", "off"],
        default="on",
        help="on: the server keeps freed memory in its heap, as mmrec serve does by default (its RSS is its "
        "high-water mark); off: MMREC_MALLOC_TUNING=0, glibc returns freed memory",
    )
    p.add_argument("--json", default=None, help="write the raw numbers and every failure here")
    p.add_argument("--log", default=None, help="the server's log (default: a temporary file, printed on failure)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="mmrec-fuzz-") as tmp:
        root = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else write_checkpoint(root / MODEL, tiny=args.tiny)
        log = Path(args.log) if args.log else root / "server.log"
        env = {"MMREC_MALLOC_TUNING": "1" if args.malloc_tuning == "on" else "0"}
        with ServerProcess(checkpoint, root / "sessions", log, env=env) as server:
            result = run(server, args.requests, args.seed, args.workers)
        server_log = log.read_text(errors="replace")
    problems = verdict(result, args.requests, args.rss_tolerance)
    print(f"Fuzz of mmrec serve: {result['requests']} requests (seed {args.seed}, {args.workers} at once) in "
          f"{result['seconds']:.1f} s; checkpoint {'tiny' if args.tiny else 'default'} MM-Rec; malloc tuning "
          f"{args.malloc_tuning}\n")  # fmt: skip
    print(result["table"])
    print(f"\n4xx without an OpenAI error body (from the HTTP layer): {result['not_openai_4xx'] or 'none'}")
    print(f"server alive: {result['alive']}; /health: {result.get('health')}; same greedy text as before: "
          f"{result.get('same_text')}; session continues: {result.get('session_ok')}")  # fmt: skip
    mib = lambda values: ", ".join(f"{v / 2**20:.0f}" for v in values)  # noqa: E731
    warm, run_ = mib(result["rss_warmup_slices"]), mib(result["rss_run_slices"])
    print(f"RSS (MiB) after each 250 requests: warm-up {warm}; run {run_}")
    print(f"RSS before {result['rss_before'] / 2**20:.1f} MiB, after {result.get('rss_after', 0) / 2**20:.1f} MiB "
          f"(ratio {result['rss_ratio']:.3f}, tolerance {args.rss_tolerance:.0%})")  # fmt: skip
    for failure in result["failures"][:20]:
        print("FAILURE:", json.dumps(failure))
    if result["failures"]:
        print("server log (tail):\n" + server_log[-6000:])
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=1))
    print("PASS" if not problems else "FAIL: " + "; ".join(problems))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
