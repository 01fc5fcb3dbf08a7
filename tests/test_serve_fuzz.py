"""A short fuzz run of ``mmrec serve`` (benchmarks/fuzz_serve.py, 300 requests of its seeded generator, a
tiny model): no status 500 or above, every request answered, and afterwards the server alive, giving the
same greedy text as before, continuing a session and holding its memory within 10%.

The server runs in a thread of the test process (serve_support.LiveServer), not as ``mmrec serve`` in a
process of its own as in the benchmark, to spare a second start of torch; its memory is the test
process's."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from mmrec.serve.app import create_app  # noqa: E402
from serve_support import LiveServer  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _fuzz_module():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("fuzz_serve", BENCHMARKS / "fuzz_serve.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


class ThreadServer:
    """What fuzz_serve.run needs of a server, for one in a thread of this process."""

    def __init__(self, live: LiveServer) -> None:
        self.live, self.port = live, live.port

    def alive(self) -> bool:
        return bool(self.live.thread.is_alive())

    def rss_bytes(self) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc/self/status")


def test_the_generator_is_seeded_and_covers_every_kind() -> None:
    fuzz = _fuzz_module()
    one, two = fuzz.Generator(7), fuzz.Generator(7)
    cases = [one.next() for _ in range(300)]
    assert [c.raw for c in cases] == [two.next().raw for _ in range(300)]
    assert {c.kind for c in cases} == {kind for kind, _ in one.kinds}


def test_a_short_fuzz_run_leaves_the_server_correct(tmp_path: Path) -> None:
    fuzz = _fuzz_module()
    checkpoint = fuzz.write_checkpoint(tmp_path / fuzz.MODEL, tiny=True)
    app: Any = create_app(checkpoint, sessions_dir=tmp_path / "sessions", api_keys=[fuzz.KEY], model_name=fuzz.MODEL)
    with LiveServer(app) as live:
        result = fuzz.run(ThreadServer(live), requests=300, seed=0, workers=4, warmup=60)
    print(result["table"])
    failures = "\n".join(json.dumps(f) for f in result["failures"][:5])
    assert not result["failures"], failures
    assert fuzz.verdict(result, 300, 0.10) == []
    # The run reached the model, not only the validation: some requests were answered 200.
    assert sum(counts.get("200", 0) for counts in result["by_kind"].values()) > 0


# What the first 2,000-request runs found (docs/results/serve-2026-12-02/fuzz-run1.txt and fuzz-run2.txt),
# fixed in the server since.


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    fuzz = _fuzz_module()
    root = tmp_path_factory.mktemp("fuzz-found")
    checkpoint = fuzz.write_checkpoint(root / fuzz.MODEL, tiny=True)
    app: Any = create_app(checkpoint, sessions_dir=root / "sessions", api_keys=[fuzz.KEY], model_name=fuzz.MODEL)
    with LiveServer(app) as live:
        yield fuzz, live


# Was a 500 (UnicodeEncodeError: an error message echoing a lone surrogate has no UTF-8 form).
@pytest.mark.parametrize("body", [{"model": "\ud800", "prompt": "a"}, {"model": "\udc00abc", "prompt": "a"}])
def test_a_lone_surrogate_echoed_in_an_error_is_a_client_error(tiny_server, body: dict) -> None:  # noqa: ANN001
    fuzz, live = tiny_server
    response = fuzz.request(live.port, "POST", "/v1/completions", body)
    assert response.status == 404, response.body
    assert fuzz.json_body(response)["error"]["code"] == "model_not_found"


# Were 500s: logits / 1e-300 overflowed to inf and softmax gave NaN; a top_p below float32's smallest
# normal dropped every token.
@pytest.mark.parametrize(
    "sampling", [{"temperature": 1e-300}, {"temperature": 5e-324}, {"temperature": 0.7, "top_p": 1e-300}]
)
def test_tiny_sampling_settings_are_answered(tiny_server, sampling: dict) -> None:  # noqa: ANN001
    fuzz, live = tiny_server
    body = {"model": fuzz.MODEL, "prompt": "Hello", "max_tokens": 4, **sampling}
    response = fuzz.request(live.port, "POST", "/v1/completions", body)
    assert response.status == 200, response.body
    assert fuzz.json_body(response)["usage"]["completion_tokens"] == 4


# Was: the failure of one row while decoding failed every stream running beside it.
def test_a_hostile_request_does_not_break_the_streams_beside_it(tiny_server) -> None:  # noqa: ANN001
    fuzz, live = tiny_server
    import httpx

    headers = {"Authorization": f"Bearer {fuzz.KEY}"}
    body = {"model": fuzz.MODEL, "prompt": "The cat ", "max_tokens": 500, "temperature": 0, "stream": True}
    with (
        httpx.Client(base_url=live.url, timeout=120) as client,
        client.stream("POST", "/v1/completions", json=body, headers=headers) as stream,
    ):
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        # The stream is decoding; a request whose sampling fails joins it.
        bad = {"model": fuzz.MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 1e-300}
        answered = client.post("/v1/completions", json=bad, headers=headers)
        events = [first, *(line for line in lines if line.startswith("data: "))]
    assert answered.status_code == 200
    assert events[-1] == "data: [DONE]" and '"finish_reason": "length"' in events[-2]
    assert not any('"error"' in e for e in events)
