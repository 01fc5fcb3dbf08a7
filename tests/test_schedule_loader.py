"""Curriculum parsing, config plumbing and the stream loader (on a small in-memory dataset)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from mmrec.cli import build_parser
from mmrec.cli.commands import train_config_from_args
from mmrec.config import ConfigError, MMRecConfig, TransformerConfig
from mmrec.data.loader import StreamLoader, eval_windows
from mmrec.train.config import TrainConfig
from mmrec.train.schedule import Curriculum, parse_count, parse_length_schedule, parse_mixture_schedule

EOT = 10**6


@dataclass
class FakeShard:
    docs: list[np.ndarray]

    @property
    def n_docs(self) -> int:
        return len(self.docs)

    @property
    def n_tokens(self) -> int:
        return sum(len(d) for d in self.docs)

    def doc(self, i: int) -> np.ndarray:
        return self.docs[i]


@dataclass
class FakeSource:
    train: FakeShard
    val: FakeShard
    weight: float = 1.0


class FakeDataset:
    def __init__(self, sources: dict[str, list[np.ndarray]]) -> None:
        self.sources = {n: FakeSource(FakeShard(d), FakeShard(d[:1])) for n, d in sources.items()}


def make_dataset(n_docs: int = 40, tag_sources: tuple[str, ...] = ("a",), length: int = 23) -> FakeDataset:
    # Token values encode (source, document): every token of document i of source number s is s * 1000 + i.
    return FakeDataset(
        {
            s: [np.full(length + i % 5, si * 1000 + i, dtype=np.int64) for i in range(n_docs)]
            for si, s in enumerate(tag_sources)
        }
    )


def test_counts_and_schedules():
    assert parse_count("64K", "x") == 64_000 and parse_count("1.5m", "x") == 1_500_000
    assert parse_length_schedule("1M:1024, 0:256") == [(0, 256), (1_000_000, 1024)]
    assert parse_mixture_schedule("0:a=1,b=0;2M:a=1,b=1") == [(0, {"a": 1.0, "b": 0.0}), (2_000_000, {"a": 1, "b": 1})]
    for bad in ("5:256", "0:256,0:512", "0:x"):
        with pytest.raises(ConfigError, match="seq_len_schedule"):
            parse_length_schedule(bad)
    with pytest.raises(ConfigError, match="every source weight 0"):
        parse_mixture_schedule("0:a=0")


def test_curriculum_keeps_tokens_per_step():
    cur = Curriculum(512, 8, "0:256,10K:1024,20K:4096", "0:a=1,b=0;15K:a=1,b=1", {"a": 1.0, "b": 1.0}, multiple=2)
    s0, s1, s2 = cur.at(0), cur.at(12_000), cur.at(25_000)
    assert (s0.seq_len, s0.batch_size) == (256, 16)
    assert (s1.seq_len, s1.batch_size, s1.weights["b"]) == (1024, 4, 0.0)
    assert (s2.seq_len, s2.batch_size, s2.weights["b"]) == (4096, 2, 1.0)  # at least the multiple
    assert cur.max_seq_len == 4096
    with pytest.raises(ConfigError, match="unknown source"):
        Curriculum(512, 8, "", "0:zzz=1", {"a": 1.0})


def _train_config(*argv: str) -> TrainConfig:
    return train_config_from_args(build_parser().parse_args(["train", *argv]))


def test_cli_flags_override_config_file(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"max-steps": 7, "seq_len": 128, "data": ["x.txt"], "d_model": 64}))
    cfg = _train_config("--config", str(tmp_path / "c.json"), "--seq-len", "64", "--no-compile", "--n-layers", "3")
    assert (cfg.max_steps, cfg.seq_len, cfg.data, cfg.compile) == (7, 64, ["x.txt"], False)
    assert isinstance(cfg.model, MMRecConfig) and (cfg.model.d_model, cfg.model.n_layers) == (64, 3)
    (tmp_path / "c.yaml").write_text("max_steps: 3\nlr: 0.01\n")
    cfg = _train_config("--config", str(tmp_path / "c.yaml"))
    assert (cfg.max_steps, cfg.lr) == (3, 0.01)
    (tmp_path / "bad.json").write_text(json.dumps({"colour": 1}))
    with pytest.raises(ConfigError, match="unknown option.*colour"):
        _train_config("--config", str(tmp_path / "bad.json"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        _train_config("--config", str(tmp_path / "broken.json"))
    with pytest.raises(ConfigError, match="no such file"):
        _train_config("--config", str(tmp_path / "missing.yaml"))


def test_config_file_values_are_converted_to_the_field_type(tmp_path):
    # YAML 1.1 reads 1e-3 (no dot) as a string; the field's type decides, not the parser's guess.
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nmax_steps: '5'\ncompile: 'false'\nmodel:\n  d_model: 32\n")
    cfg = _train_config("--config", str(tmp_path / "c.yaml"), "--n-heads", "2")
    assert cfg.lr == 0.001 and isinstance(cfg.lr, float) and cfg.max_steps == 5 and cfg.compile is False
    assert (cfg.model.d_model, cfg.model.n_heads) == (32, 2)  # a nested model mapping, merged with the flags
    (tmp_path / "bad.yaml").write_text("lr: fast\n")
    with pytest.raises(ConfigError, match="lr: expected a number, got 'fast'"):
        _train_config("--config", str(tmp_path / "bad.yaml"))
    (tmp_path / "steps.yaml").write_text("max_steps: 2.5\n")
    with pytest.raises(ConfigError, match="max_steps: expected an integer"):
        _train_config("--config", str(tmp_path / "steps.yaml"))


def test_model_options_belong_to_their_architecture():
    llama = _train_config("--arch", "transformer", "--preset", "llama", "--d-model", "64", "--n-heads", "2")
    assert isinstance(llama.model, TransformerConfig) and llama.model.d_model == 64
    # MM-Rec options describe the MM-Rec a matched baseline is sized to: more slots, a wider MLP.
    more = _train_config("--arch", "transformer", "--d-model", "64", "--n-heads", "2", "--mem-slots", "256")
    assert more.model.d_ff > llama.model.d_ff
    with pytest.raises(ConfigError, match="preset: only for --arch transformer"):
        _train_config("--preset", "gpt")
    with pytest.raises(ConfigError, match="mem_slots: MM-Rec options"):
        _train_config("--arch", "transformer", "--no-match-params", "--mem-slots", "8")
    with pytest.raises(ConfigError, match="d_ff: a matched baseline"):
        _train_config("--arch", "transformer", "--d-ff", "128")
    assert _train_config("--arch", "transformer", "--no-match-params", "--d-ff", "128").model.d_ff == 128
    # The saved config round-trips, model included.
    again = TrainConfig.from_dict(json.loads(json.dumps(llama.to_dict())))
    assert again == llama


@pytest.mark.parametrize(
    ("field", "value"),
    [("batch_size", 0), ("max_steps", -1), ("lr", 0.0), ("arch", "rnn"), ("val_fraction", 1.5), ("dtype", "fp8")],
)
def test_train_config_rejects_values_that_cannot_work(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig.from_flat({field: value})


def test_carry_state_defaults_by_architecture():
    assert TrainConfig(arch="mmrec").carry_state is True
    assert TrainConfig(arch="transformer").carry_state is False
    with pytest.raises(ConfigError, match="carry_state"):
        TrainConfig(arch="transformer", carry_state=True)


def _stream(loader: StreamLoader, steps: int, seq_len: int) -> list[torch.Tensor]:
    out = []
    for _ in range(steps):
        x, y = loader.next_batch(seq_len)
        assert torch.equal(x[:, 1:], y[:, :-1])
        out.append(torch.cat([x, y[:, -1:]], 1))
    return out


def test_rows_are_continuous_streams_of_whole_documents():
    ds = make_dataset(n_docs=12)
    loader = StreamLoader(ds, EOT, seed=1)
    loader.set_stage(0, 2, {"a": 1.0})
    batches = _stream(loader, 6, 10)
    for row in range(2):
        # Consecutive windows overlap by exactly one token: the row is one stream.
        stream = torch.cat([batches[0][row]] + [b[row, 1:] for b in batches[1:]]).tolist()
        assert stream[0] == EOT
        docs, current = [], []
        for t in stream[1:]:
            if t == EOT:
                docs.append(current)
                current = []
            else:
                current.append(t)
        for d in docs:  # every document arrives whole and uniform
            assert len(set(d)) == 1 and len(d) == len(ds.sources["a"].train.doc(d[0]))


def test_resumed_loader_continues_exactly():
    ds = make_dataset(n_docs=30, tag_sources=("a", "b"))
    ref = StreamLoader(ds, EOT, seed=3)
    ref.set_stage(0, 4, {"a": 1.0, "b": 2.0})
    _stream(ref, 5, 16)
    saved = json.loads(json.dumps(ref.state_dict()))
    want = _stream(ref, 5, 16)
    again = StreamLoader(ds, EOT, seed=3)
    again.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(_stream(again, 5, 16), want, strict=True))


def test_ranks_split_rows_disjointly_and_match_one_process():
    ds = make_dataset(n_docs=200)
    one = StreamLoader(ds, EOT, seed=0)
    one.set_stage(0, 4, {"a": 1.0})
    ranks = [StreamLoader(ds, EOT, seed=0, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_stage(0, 4, {"a": 1.0})
    seen: list[set[int]] = [set(), set()]
    for _ in range(8):
        full = one.next_batch(32)[0]
        parts = [r.next_batch(32)[0] for r in ranks]
        assert torch.equal(torch.cat(parts), full)
        for i, p in enumerate(parts):
            seen[i] |= {int(t) for t in p.flatten() if t != EOT}
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_mixture_weights_and_stage_changes():
    ds = make_dataset(n_docs=900, tag_sources=("a", "b"), length=3)  # no epoch wraps around
    loader = StreamLoader(ds, EOT, seed=0)
    loader.set_stage(0, 8, {"a": 1.0, "b": 0.0})
    x = torch.cat(_stream(loader, 10, 16))
    assert not ((x >= 1000) & (x != EOT)).any(), "source b has weight 0"
    loader.set_stage(0, 8, {"a": 1.0, "b": 3.0})
    x = torch.cat(_stream(loader, 40, 16)).flatten()
    docs = x[x != EOT]
    share_b = float((docs >= 1000).float().mean())
    assert 0.6 < share_b < 0.9, share_b
    # A new stage (other window length and batch) starts on documents no row has read.
    before = {int(t) for t in x if t != EOT}
    loader.set_stage(1, 2, {"a": 1.0, "b": 1.0})
    after = torch.cat(_stream(loader, 3, 8))
    first_docs = {int(t) for t in after[:, :4].flatten() if t != EOT}
    assert first_docs and not first_docs & before


def test_eval_windows_overlap_by_one_token():
    shard = FakeShard([np.arange(10), np.arange(20, 27)])
    w = eval_windows(shard, EOT, 4, max_tokens=100)
    assert w.shape[1] == 5
    flat = torch.cat([w[0]] + [r[1:] for r in w[1:]]).tolist()
    assert flat == [EOT, *range(10), EOT, *range(20, 27)][: len(flat)]
