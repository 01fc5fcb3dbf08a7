"""The parts of ``mmrec serve`` below HTTP: the session store's atomic writes and a request's text (whole
characters, stop strings). No server and no web packages needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mmrec.models.state as state_module
from mmrec.config import MMRecConfig
from mmrec.models import MMRecState, build_model
from mmrec.serve.engine import Job, TextChunk
from mmrec.serve.sessions import SessionConflict, SessionStore, check_session_id, owner_of

TINY = dict(vocab_size=257, d_model=32, n_layers=2, n_heads=2, chunk_size=8, mem_slots=4, summary_window=2)


@pytest.fixture(scope="module")
def model():  # noqa: ANN201
    torch.manual_seed(0)
    return build_model(MMRecConfig(**TINY)).eval()


def _state(model, text: bytes):  # noqa: ANN001, ANN202
    with torch.no_grad():
        return model(torch.tensor([list(text)]), state=model.init_state(1)).state


def _store(root: Path, model, fingerprint: str = "f" * 64) -> SessionStore:  # noqa: ANN001
    return SessionStore(root, fingerprint, "mmrec", MMRecState, model.config.to_dict())


def _same(a, b) -> bool:  # noqa: ANN001
    return a.position == b.position and all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())


def test_a_session_round_trips_and_belongs_to_its_owner(tmp_path: Path, model) -> None:  # noqa: ANN001
    store = _store(tmp_path, model)
    first, second = _state(model, b"hello"), _state(model, b"hello world")
    store.save("", "s", first)
    record = store.save("", "s", second)
    assert (record.position, record.turns, record.state_bytes) == (11, 2, second.nbytes())
    assert _same(store.load_state(record, "cpu"), second)
    assert [p.name for p in (tmp_path / "states").iterdir()] == [record.file]  # the old file is gone
    assert store.get(owner_of("other key"), "s") is None and store.list(owner_of("other key")) == []
    assert store.delete("", "s") and store.get("", "s") is None and not any((tmp_path / "states").iterdir())


def test_a_write_that_fails_leaves_the_previous_state(tmp_path: Path, model, monkeypatch) -> None:  # noqa: ANN001
    store = _store(tmp_path, model)
    old_state = _state(model, b"before")
    store.save("", "s", old_state)
    new_state = _state(model, b"before and after")

    # 1. The state file is cut short by a crash while it is written.
    def torn_write(tensors, path, metadata=None):  # noqa: ANN001, ANN202
        Path(path).write_bytes(b"\x00" * 100)
        raise OSError("simulated crash while writing the state")

    with monkeypatch.context() as m:
        m.setattr(state_module, "save_tensors", torn_write)
        with pytest.raises(OSError, match="simulated crash"):
            store.save("", "s", new_state)
    # 2. The file is whole but the index commit fails.
    with monkeypatch.context() as m:
        m.setattr(store, "_commit", lambda record: (_ for _ in ()).throw(OSError("simulated crash in the commit")))
        with pytest.raises(OSError, match="in the commit"):
            store.save("", "s", new_state)
    record = store.get("", "s")
    assert record is not None and record.turns == 1
    assert _same(store.load_state(record, "cpu"), old_state)
    assert [p.name for p in (tmp_path / "states").iterdir()] == [record.file]  # nothing half-written is left


def test_a_crash_between_write_and_commit_is_swept_on_restart(tmp_path: Path, model) -> None:  # noqa: ANN001
    store = _store(tmp_path, model)
    old_state = _state(model, b"kept")
    store.save("", "s", old_state)
    # What a process killed after writing its new state file, before committing it, leaves behind.
    _state(model, b"kept and lost").save(tmp_path / "states" / "orphan.safetensors", config=model.config.to_dict())
    (tmp_path / "states" / "half.safetensors.tmp").write_bytes(b"\x00" * 10)
    store.close()
    reopened = _store(tmp_path, model)
    record = reopened.get("", "s")
    assert record is not None and _same(reopened.load_state(record, "cpu"), old_state)
    assert [p.name for p in (tmp_path / "states").iterdir()] == [record.file]


def test_a_session_of_another_checkpoint_or_damaged_is_refused(tmp_path: Path, model) -> None:  # noqa: ANN001
    _store(tmp_path, model, fingerprint="a" * 64).save("", "s", _state(model, b"x"))
    store = _store(tmp_path, model, fingerprint="b" * 64)
    record = store.get("", "s")
    assert record is not None
    with pytest.raises(SessionConflict, match="was made with checkpoint aaaa"):
        store.load_state(record, "cpu")
    same = _store(tmp_path, model, fingerprint="a" * 64)
    path = tmp_path / "states" / record.file
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SessionConflict, match="cannot be read"):
        same.load_state(record, "cpu")


@pytest.mark.parametrize("bad", ["", "a" * 65, "../x", "a/b", "a.b", "é", "a b", "..", "x\x00"])
def test_session_ids_are_plain_names(bad: str) -> None:
    with pytest.raises(ValueError, match="1 to 64 characters"):
        check_session_id(bad)
    assert check_session_id("Chat_2-a") == "Chat_2-a"


def _text(job: Job, pieces: list[bytes]) -> tuple[list[str], str | None]:
    sent: list[str] = []
    job.sink = lambda event: sent.append(event.text) if isinstance(event, TextChunk) else None
    reason = None
    for i, piece in enumerate(pieces):
        reason = job.take(i, piece, eos=None)
        if reason:
            break
    return sent, reason


def test_text_is_sent_in_whole_characters_and_cut_before_a_stop_string() -> None:
    e = "é".encode()
    assert _text(Job([1], 10, print), [b"a", e[:1], e[1:], b"b"]) == (["a", "é", "b"], None)
    # A stop string split over tokens: held back until it is complete, then dropped with what follows.
    assert _text(Job([1], 10, print, stop=["STOP"]), [b"ab", b"ST", b"O", b"Pxy"]) == (["ab"], "stop")
    # Something that only began like a stop string is sent once it cannot be one.
    assert _text(Job([1], 10, print, stop=["xyz"]), [b"ax", b"y", b"q", b"!"]) == (["a", "xyq", "!"], None)
    # max_tokens sends what was held back.
    assert _text(Job([1], 2, print, stop=["xyz"]), [b"ax", b"y"]) == (["a", "xy"], "length")


def _run_engine(model, jobs: list[dict], stats: dict | None = None) -> list[list]:  # noqa: ANN001
    from serve_support import run_engine

    return run_engine(model, jobs, stats)


def _reply(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, TextChunk))


def test_a_tiny_temperature_or_top_p_samples_the_greedy_token(model) -> None:  # noqa: ANN001
    prompt = list(b"Hello there")
    runs = _run_engine(
        model,
        [
            dict(prompt_ids=prompt, max_tokens=12, temperature=0),
            dict(prompt_ids=prompt, max_tokens=12, temperature=1e-300, seed=1),
            dict(prompt_ids=prompt, max_tokens=12, temperature=5e-324, top_p=0.5, seed=2),
            dict(prompt_ids=prompt, max_tokens=12, temperature=1e-30, seed=3),  # sampled: a one-hot distribution
            dict(prompt_ids=prompt, max_tokens=12, temperature=0.7, top_p=1e-300, seed=4),  # top-1 of a nucleus
        ],
    )
    assert [type(r[-1]).__name__ for r in runs] == ["Finished"] * 5
    assert _reply(runs[1]) == _reply(runs[2]) == _reply(runs[3]) == _reply(runs[4]) == _reply(runs[0])


def test_a_row_whose_sampling_fails_fails_alone(model, monkeypatch) -> None:  # noqa: ANN001
    import mmrec.serve.engine as engine_module

    real = engine_module.sample_next

    def fragile(logits, temperature, *args):  # noqa: ANN001, ANN002, ANN202
        if temperature == 0.5:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, temperature, *args)

    monkeypatch.setattr(engine_module, "sample_next", fragile)
    prompt = list(b"Hello there")
    runs = _run_engine(
        model,
        [
            dict(prompt_ids=prompt, max_tokens=30, temperature=0),
            dict(prompt_ids=prompt, max_tokens=30, temperature=0.5),
        ],
    )
    assert type(runs[0][-1]).__name__ == "Finished" and runs[0][-1].completion_tokens == 30
    assert type(runs[1][-1]).__name__ == "Failed" and "sampling failed" in runs[1][-1].message


def test_a_prompt_whose_feeding_fails_fails_alone(model, monkeypatch) -> None:  # noqa: ANN001
    real = model.hidden_states

    def fragile(ids, state=None):  # noqa: ANN001, ANN202
        if bool((ids == 1).any()):
            raise RuntimeError("out of memory (simulated)")
        return real(ids, state)

    monkeypatch.setattr(model, "hidden_states", fragile)
    runs = _run_engine(
        model,
        [
            dict(prompt_ids=list(b"Hello"), max_tokens=10, temperature=0),
            dict(prompt_ids=[1, 2, 3], max_tokens=10, temperature=0),
            dict(prompt_ids=list(b"there"), max_tokens=10, temperature=0),
        ],
    )
    assert [type(r[-1]).__name__ for r in runs] == ["Finished", "Failed", "Finished"]
    assert runs[1][-1].status == 500 and "out of memory (simulated)" in runs[1][-1].message


@pytest.mark.parametrize("state_api", [True, False], ids=["state-batch-api", "equal-positions-only"])
def test_streams_decoded_together_give_the_text_of_each_alone(model, state_api: bool, monkeypatch) -> None:  # noqa: ANN001
    from mmrec.serve import batching

    if not state_api:  # the engine's own joining, for states without cat/select/split: equal positions only
        monkeypatch.setattr(batching, "has_batch_api", lambda state: False)
    prompts = [list(b"one "), list(b"two "), list(b"three "), list(b"seven ")]
    jobs = [dict(prompt_ids=p, max_tokens=24, temperature=0) for p in prompts]
    alone = [_reply(_run_engine(model, [job])[0]) for job in jobs]
    stats: dict = {}
    together = [_reply(events) for events in _run_engine(model, jobs, stats)]
    assert together == alone
    # With the state's batch API all four decode in one batch; without it, the two pairs of equal length.
    assert max(int(size) for size in stats["decode_steps_by_batch_size"]) == (4 if state_api else 2)


def test_session_locks_serialise_and_bound_the_waiting_requests() -> None:
    import asyncio

    from mmrec.serve.protocol import APIError
    from mmrec.serve.service import SessionLocks

    async def scenario() -> tuple[list[str], int, str]:
        locks, order = SessionLocks(max_waiting=2), []
        key = ("owner", "s")
        release = await locks.acquire(key)

        async def turn(name: str) -> None:
            done = await locks.acquire(key)
            order.append(name)
            done()

        waiting = [asyncio.create_task(turn(n)) for n in ("second", "third")]
        await asyncio.sleep(0)  # both now wait
        try:
            await locks.acquire(key)
            status, message = 0, ""
        except APIError as e:
            status, message = e.status, str(e)
        other = await locks.acquire(("owner", "another"))  # other sessions are not affected
        other()
        release()
        await asyncio.gather(*waiting)
        assert not locks._locks and not locks._users  # dropped when nobody holds or waits
        return order, status, message

    order, status, message = asyncio.run(scenario())
    assert order == ["second", "third"]
    assert status == 429 and "busy" in message
