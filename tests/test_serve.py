"""``mmrec serve`` end to end: a real uvicorn server on 127.0.0.1, the official openai client, httpx for
what the client would not send.

The checkpoints are random-init tiny models (serve_support.lively_checkpoint) whose greedy text is
printable ASCII and depends on everything before it, so equal texts mean equal histories.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import mmrec  # noqa: E402
from mmrec.config import TransformerConfig  # noqa: E402
from mmrec.serve.app import STATIC, create_app  # noqa: E402
from mmrec.serve.protocol import Limits  # noqa: E402
from serve_support import LiveServer, free_port, lively_checkpoint  # noqa: E402

TURNS = ["The cat ", "sat on the ", "mat and "]
MODEL = "run"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lively_checkpoint(tmp_path_factory.mktemp("serve") / MODEL)


def _greedy(client, prompt: str, max_tokens: int = 24, **kw) -> str:  # noqa: ANN001
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)
    return r.choices[0].text


def _turn(client, prompt: str, session: str, max_tokens: int = 24):  # noqa: ANN001, ANN202
    return client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"session": session}
    )


def test_greedy_text_is_the_models_own(run_dir: Path, tmp_path: Path) -> None:
    loaded = mmrec.load(run_dir)
    ids = torch.tensor([loaded.tokenizer.encode(TURNS[0])])
    expected = loaded.tokenizer.decode(loaded.model.generate(ids, 24, temperature=0)[0, ids.size(1) :].tolist())
    with LiveServer(create_app(run_dir, sessions_dir=tmp_path / "s")) as server:
        client = server.client()
        assert [m.id for m in client.models.list().data] == [MODEL]
        r = client.completions.create(model=MODEL, prompt=TURNS[0], max_tokens=24, temperature=0)
        streamed = client.completions.create(model=MODEL, prompt=TURNS[0], max_tokens=24, temperature=0, stream=True)
        chunks = [c.choices[0].text for c in streamed]
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
        )
        chat_streamed = list(
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        chat_text = "".join(c.choices[0].delta.content or "" for c in chat_streamed if c.choices)
        page = httpx.get(server.url + "/")
        in_session = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=8,
            temperature=0,
            extra_body={"session": "chat"},
        )
        health = httpx.get(server.url + "/health").json()
    assert r.choices[0].text == expected and len(expected) == 24
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(TURNS[0]), 24)
    assert "".join(chunks) == expected and len(chunks) > 1  # streamed piece by piece, the same text
    assert chat.choices[0].message.content == chat_text and len(chat_text) == 8
    assert chat_streamed[-1].usage.completion_tokens == 8 and chat_streamed[-1].choices == []
    # The playground page is served when installed (another change adds it), else a 404 body like any other.
    installed = (STATIC / "index.html").is_file()
    assert page.status_code == (200 if installed else 404)
    # The session holds the rendered template of the messages sent, then the reply.
    assert in_session.model_extra["session"]["tokens_consumed"] == len("User: hi\nAssistant:") + 8
    assert in_session.usage.prompt_tokens == len("User: hi\nAssistant:")
    assert health["status"] == "ok" and health["running"] == 0


def test_stop_strings_end_the_text_before_them(run_dir: Path, tmp_path: Path) -> None:
    with LiveServer(create_app(run_dir, sessions_dir=tmp_path / "s")) as server:
        client = server.client()
        full = _greedy(client, TURNS[0], 24)
        stop = full[10:12]
        cut = full[: full.index(stop)]
        r = client.completions.create(model=MODEL, prompt=TURNS[0], max_tokens=24, temperature=0, stop=[stop, "@@"])
        streamed = "".join(
            c.choices[0].text
            for c in client.completions.create(
                model=MODEL, prompt=TURNS[0], max_tokens=24, temperature=0, stop=stop, stream=True
            )
        )
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    assert streamed == cut


def test_three_turns_through_a_session_equal_one_call_and_survive_a_restart(run_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "sessions"
    replies = []
    with LiveServer(create_app(run_dir, sessions_dir=store)) as server:
        client = server.client()
        replies.append(_turn(client, TURNS[0], "talk").choices[0].text)
        # The second turn streamed: a streamed reply is kept in the session as well.
        chunks = client.completions.create(
            model=MODEL, prompt=TURNS[1], max_tokens=24, temperature=0, stream=True, extra_body={"session": "talk"}
        )
        replies.append("".join(c.choices[0].text for c in chunks))
        # Not the session: the same last prompt on its own, and the whole conversation in one call.
        alone = _greedy(client, TURNS[2])
        history = TURNS[0] + replies[0] + TURNS[1] + replies[1] + TURNS[2]
        whole = _greedy(client, history)
        whole_streamed = "".join(
            c.choices[0].text
            for c in client.completions.create(model=MODEL, prompt=history, max_tokens=24, temperature=0, stream=True)
        )
    # The third turn in a new server process on the same store: `mmrec serve` itself.
    port = free_port()
    cmd = [sys.executable, "-m", "mmrec", "serve", "--checkpoint", str(run_dir), "--port", str(port)]
    cmd += ["--sessions-dir", str(store), "--device", "cpu", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        third = _turn(client, TURNS[2], "talk")
        info = httpx.get(url + "/v1/sessions/talk").json()
        listed = [s["id"] for s in httpx.get(url + "/v1/sessions").json()["data"]]
    finally:
        proc.terminate()
        proc.wait(30)
    assert third.choices[0].text == whole == whole_streamed
    assert whole != alone  # the history changes the reply: the session carried it
    consumed = sum(len(t) for t in TURNS) + 3 * 24
    assert (info["tokens_consumed"], info["turns"], listed) == (consumed, 3, ["talk"])
    assert third.model_extra["session"]["tokens_consumed"] == consumed
    # MM-Rec's state does not grow with the session.
    assert info["state_bytes"] == mmrec.load(run_dir).model.init_state(1).nbytes()


def test_a_changed_checkpoint_refuses_the_session(run_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "sessions"
    with LiveServer(create_app(run_dir, sessions_dir=store)) as server:
        _turn(server.client(), TURNS[0], "old", max_tokens=4)
    other = lively_checkpoint(tmp_path / MODEL, seed=1)
    with LiveServer(create_app(other, sessions_dir=store)) as server:
        with pytest.raises(openai.ConflictError, match="was made with checkpoint") as e:
            _turn(server.client(), TURNS[1], "old", max_tokens=4)
        assert e.value.body["code"] == "session_conflict"
        listed = httpx.get(server.url + "/v1/sessions").json()["data"]
        gone = httpx.delete(server.url + "/v1/sessions/old")
        fresh = _turn(server.client(), TURNS[1], "old", max_tokens=4)
    assert [(s["id"], s["compatible"]) for s in listed] == [("old", False)]
    assert gone.json() == {"id": "old", "object": "session", "deleted": True}
    assert fresh.model_extra["session"]["turns"] == 1


def test_api_keys_are_required_and_own_their_sessions(run_dir: Path, tmp_path: Path) -> None:
    app = create_app(run_dir, sessions_dir=tmp_path / "s", api_keys=["key-a", "key-b"])
    with LiveServer(app) as server:
        a, b = server.client("key-a"), server.client("key-b")
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        no_key = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert httpx.get(server.url + "/health").status_code == 200
        for open_route in ("/docs", "/openapi.json", "/redoc"):  # FastAPI's own pages would bypass the key
            assert httpx.get(server.url + open_route).status_code in (401, 404), open_route
        first = _turn(a, TURNS[0], "mine").choices[0].text
        head_b = {"Authorization": "Bearer key-b"}
        assert httpx.get(server.url + "/v1/sessions/mine", headers=head_b).status_code == 404
        assert httpx.delete(server.url + "/v1/sessions/mine", headers=head_b).status_code == 404
        assert httpx.get(server.url + "/v1/sessions", headers=head_b).json()["data"] == []
        # Key b's "mine" is its own, new session: it starts from nothing.
        assert _turn(b, TURNS[0], "mine").choices[0].text == first
        second_a = _turn(a, TURNS[1], "mine").model_extra["session"]
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    assert second_a["turns"] == 2


def _post(url: str, body: object = None, content: bytes | None = None, **kw) -> httpx.Response:  # noqa: ANN003
    if content is not None:
        return httpx.post(url, content=content, headers={"Content-Type": "application/json"}, **kw)
    return httpx.post(url, json=body, **kw)


def test_bad_requests_get_openai_errors(run_dir: Path, tmp_path: Path) -> None:
    limits = Limits(max_body_bytes=4096, max_tokens=64)
    with LiveServer(create_app(run_dir, sessions_dir=tmp_path / "s", limits=limits)) as server:
        url = server.url + "/v1/completions"
        ok = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        cases = {
            "malformed": _post(url, content=b'{"model": "run", "prompt": '),
            "not an object": _post(url, [1, 2]),
            "NaN": _post(url, content=b'{"model": "run", "prompt": "x", "temperature": NaN}'),
            "max_tokens as text": _post(url, {**ok, "max_tokens": "5"}),
            "prompt as number": _post(url, {**ok, "prompt": 5}),
            "stream as text": _post(url, {**ok, "stream": "yes"}),
            "negative max_tokens": _post(url, {**ok, "max_tokens": -1}),
            "max_tokens over the limit": _post(url, {**ok, "max_tokens": 65}),
            "absurd temperature": _post(url, {**ok, "temperature": 1e30}),
            "top_p 0": _post(url, {**ok, "top_p": 0}),
            "huge seed": _post(url, {**ok, "seed": 2**70}),
            "empty prompt": _post(url, {**ok, "prompt": ""}),
            "path trick in a session id": _post(url, {**ok, "session": "../../etc/passwd"}),
            "session id too long": _post(url, {**ok, "session": "a" * 65}),
            "n = 2": _post(url, {**ok, "n": 2}),
            "chat without messages": _post(server.url + "/v1/chat/completions", {"model": MODEL, "messages": []}),
            "chat role": _post(
                server.url + "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "god", "content": "x"}]}
            ),
            "bad session path": httpx.get(server.url + "/v1/sessions/a.b"),
        }
        big = _post(url, {**ok, "prompt": "x" * 5000})
        # Without Content-Length (chunked): the real body is counted.
        chunked = httpx.post(url, content=iter([b'{"model": "run", "prompt": "', b"y" * 5000, b'"}']))
        unknown_model = _post(url, {**ok, "model": "gpt-4"})
        # An unknown model named by a lone surrogate: echoed in the message, which must stay UTF-8.
        surrogate_model = _post(url, content=json.dumps({**ok, "model": "\ud800"}).encode())
        with pytest.raises(openai.NotFoundError):
            server.client().completions.create(model="gpt-4", prompt="hi", max_tokens=2)
        unknown_route = httpx.get(server.url + "/v1/nothing")
        still = _post(url, ok)
    for name, r in cases.items():
        assert r.status_code == 400, (name, r.status_code, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], name
    assert cases["max_tokens as text"].json()["error"]["param"] == "max_tokens"
    assert cases["path trick in a session id"].json()["error"]["param"] == "session"
    assert (big.status_code, chunked.status_code) == (413, 413)
    assert big.json()["error"]["code"] == "request_too_large"
    assert (unknown_model.status_code, unknown_model.json()["error"]["code"]) == (404, "model_not_found")
    assert surrogate_model.status_code == 404
    assert unknown_route.status_code == 404 and "error" in unknown_route.json()
    assert still.status_code == 200  # and the server still answers


def _wait(condition, timeout: float = 30) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_full_queue_answers_429_and_a_disconnect_frees_the_slot(run_dir: Path, tmp_path: Path) -> None:
    limits = Limits(max_batch=1, max_queue=1, max_tokens=1_000_000)
    with LiveServer(create_app(run_dir, sessions_dir=tmp_path / "s", limits=limits)) as server:
        engine = server.service.engine
        url = server.url + "/v1/completions"
        long = {"model": MODEL, "prompt": "a", "max_tokens": 1_000_000, "stream": True}
        with httpx.Client(timeout=60) as hold, hold.stream("POST", url, json=long) as stream:
            lines = stream.iter_lines()  # held: httpx closes the connection when a dropped iterator is collected
            next(lines)  # decoding: the one slot is taken
            waiting: dict[str, httpx.Response] = {}
            queued = threading.Thread(
                target=lambda: waiting.update(r=httpx.post(url, json={**long, "stream": False, "max_tokens": 5})),
            )
            queued.start()
            _wait(lambda: engine.load()["queued"] == 1)
            refused = httpx.post(url, json={**long, "stream": False})
        # The stream's client went away: its slot goes to the waiting request.
        queued.join(60)
        _wait(lambda: engine.load() == {"running": 0, "queued": 0})
        cancelled = engine.stats.cancelled
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert waiting["r"].status_code == 200 and waiting["r"].json()["usage"]["completion_tokens"] == 5
    assert cancelled == 1


def test_concurrent_streams_decode_in_one_batch(run_dir: Path, tmp_path: Path) -> None:
    prompts = ["one ", "two two ", "three ", "four four four "]  # streams at different positions batch together
    with LiveServer(create_app(run_dir, sessions_dir=tmp_path / "s")) as server:
        client = server.client()
        alone = {p: _greedy(client, p, 48) for p in prompts}
        before = dict(server.service.engine.stats.batch_sizes)
        together: dict[str, str] = {}
        start = threading.Barrier(len(prompts))

        def stream(prompt: str) -> None:
            start.wait()
            chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=48, temperature=0, stream=True)
            together[prompt] = "".join(c.choices[0].text for c in chunks)

        threads = [threading.Thread(target=stream, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        # Two requests to one session at once run one after the other.
        both = [threading.Thread(target=_turn, args=(client, t, "shared", 8)) for t in TURNS[:2]]
        for t in both:
            t.start()
        for t in both:
            t.join(60)
        shared = httpx.get(server.url + "/v1/sessions/shared").json()
        after = server.service.engine.stats.batch_sizes
    batched = {size: n - before.get(size, 0) for size, n in after.items() if size > 1 and n > before.get(size, 0)}
    assert batched, f"no decode step ran more than one stream: {dict(after)}"
    assert together == alone
    assert (shared["turns"], shared["tokens_consumed"]) == (2, len(TURNS[0]) + len(TURNS[1]) + 16)


def test_a_transformer_serves_sessions_with_a_growing_cache(tmp_path: Path) -> None:
    config = TransformerConfig(preset="llama", vocab_size=257, d_model=32, n_layers=2, n_heads=2, max_seq_len=512)
    run = lively_checkpoint(tmp_path / MODEL, config)
    with LiveServer(create_app(run, sessions_dir=tmp_path / "s")) as server:
        client = server.client()
        replies = [_turn(client, t, "kv", 12) for t in TURNS[:2]]
        whole = _greedy(client, TURNS[0] + replies[0].choices[0].text + TURNS[1], 12)
    sizes = [r.model_extra["session"]["state_bytes"] for r in replies]
    assert replies[1].choices[0].text == whole
    assert sizes[1] > sizes[0]  # a KV cache grows with the session


def test_serve_command_checks_its_options() -> None:
    from mmrec.cli import main

    assert main(["serve", "--checkpoint", "x", "--max-batch", "0"]) == 2
    assert main(["serve", "--checkpoint", "x", "--port", "70000"]) == 2


def test_api_keys_come_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from mmrec.serve.app import api_keys_from_env

    monkeypatch.setenv("MMREC_API_KEY", "one, two,,")
    assert api_keys_from_env([]) == ["one", "two"]
    assert api_keys_from_env(["flag"]) == ["flag"]
    monkeypatch.delenv("MMREC_API_KEY")
    assert api_keys_from_env([]) == []
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1"):
        Limits(max_batch=0)
