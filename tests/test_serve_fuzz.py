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
