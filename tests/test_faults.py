"""Faults a long run meets: damaged files, a full disk, NaN/Inf, a killed or stopped data preparation.

The core cases of ``benchmarks/faults.py``, small enough for the default tier. Checkpoints come from one
short training run (module fixture) copied per test.
"""

from __future__ import annotations

import errno
import math
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mmrec
from conftest import write_corpus
from mmrec.data.cache import cached_dataset, source_specs
from mmrec.data.prepare import prepare_dataset
from mmrec.data.shards import load_dataset
from mmrec.data.sources import DataError, SourceSpec
from mmrec.models.checkpoint import CheckpointError, UnverifiedCheckpointWarning, list_checkpoints
from mmrec.models.state import MMRecState, StateError
from mmrec.tokenizer import ByteTokenizer
from mmrec.train.checkpoint import DamagedCheckpointWarning, find_resume, verify_for_resume
from mmrec.train.trainer import Trainer
from mmrec.utils.files import DiskFullError
from test_train import WORDS, losses, tiny_config

CHECKPOINT_FILES = [
    "model.safetensors",
    "optimizer.pt",
    "tokenizer.json",
    "meta.json",
    "rank0.json",
    "state-rank0.safetensors",
]
LOADED_FILES = {"model.safetensors", "tokenizer.json", "meta.json"}  # what mmrec.load reads


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), 60, WORDS, min_words=24, max_words=120, lines=True)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    """A run with checkpoints at steps 2 and 4 (and its data cache) under the returned folder."""
    root = tmp_path_factory.mktemp("trained")
    Trainer(_config(corpus, root, root / "run", max_steps=4)).fit()
    return root


def _config(corpus: Path, root: Path, run: Path, **kw):  # noqa: ANN202
    base = dict(checkpoint_every=2, eval_every=100, sample_tokens=0, track_stages=False, data_cache=str(root / "cache"))
    return tiny_config(corpus, root, out=str(run), **{**base, **kw})


def _copy_run(trained: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    return run


def damage(path: Path, how: str, rng: random.Random) -> str:
    """Cut ``path`` short or flip one of its bytes (never a no-op); returns what was done."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        n = rng.randrange(len(data))
        path.write_bytes(bytes(data[:n]))
        return f"cut to {n} of {len(data)} bytes"
    i = rng.randrange(len(data))
    data[i] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))
    return f"flipped byte {i}"


@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_damaged_checkpoint_file_is_named_and_resume_falls_back(trained, tmp_path, name, how):
    run = _copy_run(trained, tmp_path)
    newest = run / "step-000004"
    assert verify_for_resume(newest)["step"] == 4
    done = damage(newest / name, how, random.Random(f"{name}-{how}"))
    named = re.escape(str(newest / name))
    with pytest.raises(CheckpointError, match=named):
        verify_for_resume(newest)
    with pytest.warns(DamagedCheckpointWarning, match=named):
        assert find_resume(run, "auto") == run / "step-000002", done
    with pytest.raises(CheckpointError, match=rf"--resume: {named}"):
        find_resume(run, str(newest))
    if name in LOADED_FILES:
        with pytest.raises(CheckpointError, match=named):
            mmrec.load(newest)
        with pytest.raises(CheckpointError, match="step-000002"):  # the error points at the intact one
            mmrec.load(run)
    else:
        assert mmrec.load(newest).step == 4  # evaluation does not read the training state


def test_resume_auto_continues_exactly_from_the_intact_checkpoint(corpus, trained, tmp_path, capsys):
    run = _copy_run(trained, tmp_path)
    before = losses(run)
    damage(run / "step-000004" / "model.safetensors", "flip", random.Random(0))
    with pytest.warns(DamagedCheckpointWarning, match="step-000004/model.safetensors"):
        Trainer(_config(corpus, trained, run, max_steps=6, resume="auto")).fit()
    assert "resume: continuing from " + str(run / "step-000002") in capsys.readouterr().out
    after = losses(run)
    assert sorted(after) == list(range(1, 7))
    for step in (3, 4):  # recomputed from step 2: the same as the first time
        assert abs(after[step] - before[step]) <= 1e-6, (step, after[step], before[step])
    assert verify_for_resume(run / "step-000004")["step"] == 4  # the damaged one was written again


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    for step in ("step-000002", "step-000004"):
        damage(run / step / "rank0.json", "truncate", random.Random(step))
    with pytest.warns(DamagedCheckpointWarning), pytest.raises(CheckpointError, match="no intact checkpoint"):
        find_resume(run, "auto")


def test_a_checkpoint_without_checksums_loads_with_a_warning(trained, tmp_path):
    import json

    run = _copy_run(trained, tmp_path)
    meta_path = run / "step-000004" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["files"], meta["self_sha256"]
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(UnverifiedCheckpointWarning, match="not verified"):
        assert mmrec.load(run / "step-000004").step == 4
    with pytest.warns(UnverifiedCheckpointWarning):
        assert find_resume(run, "auto") == run / "step-000004"


def _enospc(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("writer", ["weights", "optimizer", "meta"])
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(corpus, trained, tmp_path, monkeypatch, writer):
    import mmrec.models.checkpoint as model_ckpt
    import mmrec.train.checkpoint as train_ckpt

    run = tmp_path / "run"
    real = {"weights": train_ckpt.save_tensors, "optimizer": torch.save, "meta": model_ckpt.write_bytes_durably}[writer]

    def full_at_step_4(first, second, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        path = first if writer == "meta" else second  # write_bytes_durably(path, data); the others (data, path)
        where = str(path if isinstance(path, (str, Path)) else path.name)  # torch.save gets an open file
        if ".step-000004.tmp" in where and (writer != "meta" or where.endswith("meta.json")):
            _enospc()
        return real(first, second, *args, **kwargs)

    if writer == "weights":
        monkeypatch.setattr(train_ckpt, "save_tensors", full_at_step_4)
    elif writer == "optimizer":
        monkeypatch.setattr(torch, "save", full_at_step_4)
    else:
        monkeypatch.setattr(model_ckpt, "write_bytes_durably", full_at_step_4)
    with pytest.raises(DiskFullError) as caught:
        Trainer(_config(corpus, trained, run, max_steps=4)).fit()
    message = str(caught.value)
    assert "no space left on device" in message and "step-000004" in message, message
    assert f"the previous checkpoint {run / 'step-000002'} is intact" in message, message
    assert re.search(r"needs about [\d.,]+ MB", message), message
    assert sorted(p.name for p in run.iterdir() if "step" in p.name) == ["step-000002"]
    assert verify_for_resume(run / "step-000002")["step"] == 2
    if writer == "optimizer":  # with room again, the run goes on from the intact checkpoint
        monkeypatch.undo()
        Trainer(_config(corpus, trained, run, max_steps=4, resume="auto")).fit()
        assert [p.name for p in list_checkpoints(run)] == ["step-000002", "step-000004"]


def test_disk_full_while_preparing_data_leaves_nothing_half_written(corpus, tmp_path, monkeypatch):
    import mmrec.data.shards as shards

    out = tmp_path / "out"
    specs = [SourceSpec(str(corpus))]
    first = prepare_dataset(specs, ByteTokenizer(), out, progress=False)
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "extra.txt").write_text("one more document " * 50)
    calls = []
    real = shards._write_array

    def full_on_second_write(f, array):  # noqa: ANN001, ANN202
        calls.append(1)
        if len(calls) == 2:
            _enospc()
        return real(f, array)

    monkeypatch.setattr(shards, "_write_array", full_on_second_write)
    where = rf"no space left on device in {re.escape(str(tmp_path))} .*shards of {re.escape(str(out))}"
    with pytest.raises(DiskFullError, match=where):
        prepare_dataset([*specs, SourceSpec(str(tmp_path / "more"))], ByteTokenizer(), out, progress=False)
    assert len(calls) == 2
    assert not list(tmp_path.glob("out.*")), "a partial directory was left"
    assert load_dataset(out).manifest["self_sha256"] == first["self_sha256"]  # the old data set is untouched
    # The trainer's own cache: the error, nothing cached, and with room again it is prepared.
    calls.clear()
    cache = tmp_path / "cache"
    specs = source_specs([str(corpus)])
    with pytest.raises(DiskFullError, match="MMREC_DATA_CACHE"):
        cached_dataset(specs, ByteTokenizer(), 0.1, str(cache), log=lambda _: None, progress=False)
    assert not any(cache.iterdir())
    monkeypatch.undo()
    logged: list[str] = []
    cached_dataset(specs, ByteTokenizer(), 0.1, str(cache), log=logged.append, progress=False)
    assert any("preparing" in line for line in logged)


DATA_FILES = [
    "manifest.json",
    "tokenizer.json",
    "{source}/train.tokens.bin",
    "{source}/train.offsets.bin",
    "{source}/val.tokens.bin",
    "{source}/val.offsets.bin",
]


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damaged_prepared_data_is_named_and_the_cache_is_prepared_again(corpus, tmp_path, how):
    specs = source_specs([str(corpus)])
    tok = ByteTokenizer()
    dataset = cached_dataset(specs, tok, 0.1, str(tmp_path / "cache"), log=lambda _: None, progress=False)
    root = dataset.path
    pristine = tmp_path / "pristine"
    shutil.copytree(root, pristine)
    rng = random.Random(how)
    (source,) = dataset.sources
    names = [name.format(source=source) for name in DATA_FILES]
    for name in names:
        shutil.rmtree(root)
        shutil.copytree(pristine, root)
        done = damage(root / name, how, rng)
        with pytest.raises(DataError, match=re.escape(str(root / name))):
            load_dataset(root, tok)
            pytest.fail(f"{name}: {done} was not detected")
    logged: list[str] = []
    again = cached_dataset(specs, tok, 0.1, str(tmp_path / "cache"), log=logged.append, progress=False)
    assert any("damaged" in line and names[-1] in line for line in logged), logged
    assert again.sources[source].train.n_tokens == dataset.sources[source].train.n_tokens


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damaged_state_file_is_refused_by_name(tmp_path, how):
    model = mmrec.MMRecLM(
        mmrec.MMRecConfig(d_model=32, n_layers=1, n_heads=2, chunk_size=8, mem_slots=4, summary_window=2)
    )
    state = model(torch.randint(0, 257, (1, 13)), state=model.init_state(1)).state
    path = tmp_path / "state.safetensors"
    state.save(path, config=model.config.to_dict())
    assert torch.equal(MMRecState.load(path, config=model.config.to_dict()).memory, state.memory)
    rng = random.Random(how)
    for _ in range(20):
        state.save(path)
        done = damage(path, how, rng)
        with pytest.raises(StateError, match=re.escape(str(path))):
            MMRecState.load(path)
            pytest.fail(f"{done} was not detected")
    # A state saved before checksums still loads, with a warning.
    from mmrec.utils.files import save_tensors

    save_tensors(state.tensors(), path, metadata={"kind": "mmrec", "position": str(state.position)})
    with pytest.warns(UserWarning, match="without a checksum"):
        assert MMRecState.load(path).position == 13


def test_nan_and_inf_in_gradients_and_batches_are_skipped(corpus, trained, tmp_path, monkeypatch):
    """NaN in a gradient (step 2), Inf in a gradient (step 4), Inf in a batch's embeddings (step 6): each step
    is skipped and counted, no update is applied, and the run finishes."""
    import mmrec.train.trainer as trainer_mod
    from mmrec.train.distributed import unwrap

    now = {"step": 0}
    real_forward, real_clip = Trainer.forward_loss, trainer_mod.clip_gradients

    def forward(self, inputs, targets, state):  # noqa: ANN001, ANN202
        now["step"] = self.step + 1
        if now["step"] != 6:
            return real_forward(self, inputs, targets, state)
        hook = unwrap(self.model).embed.register_forward_hook(lambda m, i, out: out + math.inf)
        try:
            return real_forward(self, inputs, targets, state)
        finally:
            hook.remove()

    def clip(params, max_norm):  # noqa: ANN001, ANN202
        params = list(params)
        if now["step"] in (2, 4):
            params[0].grad.view(-1)[0] = math.nan if now["step"] == 2 else math.inf
        return real_clip(params, max_norm)

    monkeypatch.setattr(Trainer, "forward_loss", forward)
    monkeypatch.setattr(trainer_mod, "clip_gradients", clip)
    trainer = Trainer(_config(corpus, trained, tmp_path / "run", max_steps=8, checkpoint_every=8))
    summary = trainer.fit()
    assert summary["steps"] == 8 and summary["skipped_steps"] == 3
    with open(tmp_path / "run" / "metrics.csv") as f:
        import csv

        rows = {int(r["step"]): r for r in csv.DictReader(f)}
    assert {s for s, r in rows.items() if r["skipped"] == "1"} == {2, 4, 6}
    assert math.isnan(float(rows[2]["grad_norm"])) and not math.isfinite(float(rows[6]["loss"]))
    # 8 steps, 3 skipped: no parameter was updated more than 5 times (some had no gradient at first).
    assert max(int(s["step"]) for s in trainer.opt.state.values()) == 5
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# A `mmrec data prepare` that stops for a while after its first shard write (a moment to signal it in).
_SLOW_PREPARE = """
import pathlib, sys, time
from mmrec.data import shards
real = shards.SplitWriter.add
def add(self, *args):
    real(self, *args)
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(30)
shards.SplitWriter.add = add
from mmrec.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_interrupted_preparation_is_never_used(corpus, tmp_path, sig):
    out, ready = tmp_path / "data", tmp_path / "ready"
    args = ["data", "prepare", "--data", str(corpus), "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_PREPARE, str(ready), *args], stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 60, "preparation never started writing"
        time.sleep(0.01)
    assert list(tmp_path.glob("data.tmp-*")), "no partial data to leave behind"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert not out.exists()
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "stopped by SIGTERM" in err and "Traceback" not in err, err
        assert not list(tmp_path.glob("data.tmp-*")), "SIGTERM left the partial data"
    else:
        assert proc.returncode == -signal.SIGKILL
        with pytest.raises(DataError, match="not a prepared dataset"):
            load_dataset(out)
    prepare_dataset([SourceSpec(str(corpus))], ByteTokenizer(), out, progress=False)
    assert load_dataset(out).sources[corpus.name].train.n_docs > 0
    assert not list(tmp_path.glob("data.*")), "what the killed run left was not removed"
