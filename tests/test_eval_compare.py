"""Long-context bits per byte, the stages command and `mmrec compare --preset micro`, end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_train_config, write_corpus
from mmrec import ByteTokenizer, MMRecConfig, MMRecLM, TransformerConfig, TransformerLM
from mmrec.evals.bpb import evaluate_bpb, sliding_nats, stream_nats
from mmrec.evals.speed import fit_exponent
from mmrec.train.trainer import Trainer

TEXT = "Ünïcödé text — with 多字节 characters; " * 30


def tiny_mmrec() -> MMRecLM:
    return MMRecLM(
        MMRecConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, chunk_size=8, mem_slots=4, summary_window=2)
    ).eval()


def direct_bpb(model: torch.nn.Module, ids: list[int]) -> float:
    t = torch.tensor([ids])
    with torch.no_grad():
        logits = model(t[:, :-1]).logits[0]
    nats = F.cross_entropy(logits.double(), t[0, 1:], reduction="sum").item()
    return nats / ((len(ids) - 1) * math.log(2))  # byte tokenizer: one byte per scored token


def test_bpb_matches_a_direct_computation_and_counts_utf8_bytes():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT.encode("utf-8")) > len(TEXT)
    model = tiny_mmrec()
    res = evaluate_bpb(model, [ids], tok.token_bytes(), trained_len=4096, cut=64, window=100)
    assert res["overall_full_bpb"] == pytest.approx(direct_bpb(model, ids), rel=1e-5)
    assert sum(res["tokens"]) == len(ids) - 1
    tf = TransformerLM(TransformerConfig(preset="llama", vocab_size=257, d_model=32, n_layers=2, n_heads=2)).eval()
    res = evaluate_bpb(tf, [ids], tok.token_bytes(), trained_len=4096, cut=64)
    assert res["overall_full_bpb"] == pytest.approx(direct_bpb(tf, ids), rel=1e-5)
    assert "whole-document" in res["full_context"]


def test_streaming_and_sliding_windows_score_each_token_correctly():
    model = tiny_mmrec()
    ids = torch.randint(0, 256, (300,))
    with torch.no_grad():
        full = F.cross_entropy(model(ids[None, :-1]).logits[0], ids[1:], reduction="none").numpy()
    assert stream_nats(model, ids, 37, torch.no_grad()) == pytest.approx(full, rel=1e-4, abs=1e-5)
    assert sliding_nats(model, ids, 1000, torch.no_grad()) == pytest.approx(full, rel=1e-4, abs=1e-5)
    cut = sliding_nats(model, ids, 40, torch.no_grad())
    for t in (1, 40, 41, 77, 150, 299):  # token t with at most 40 tokens of context
        start = max(0, t - 40)
        for lo in range(start, max(0, t - 20) + 1):  # the window actually used starts in [t-40, t-20]
            with torch.no_grad():
                ref = F.cross_entropy(model(ids[None, lo:t]).logits[0, -1:], ids[t : t + 1]).item()
            if abs(ref - cut[t - 1]) < 1e-4:
                break
        else:
            pytest.fail(f"token {t}: no window of 20-40 tokens of context gives its loss")


def test_fit_exponent():
    assert fit_exponent([1, 2, 4, 8], [3.0, 6.0, 12.0, 24.0]) == pytest.approx(1.0)
    assert fit_exponent([1, 2, 4, 8], [1.0, 4.0, 16.0, 64.0]) == pytest.approx(2.0)
    assert math.isnan(fit_exponent([4], [1.0]))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evalrun")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()  # noqa: SIM905
    corpus = write_corpus(root / "corpus", 40, words, seed=1)
    Trainer(
        tiny_train_config(corpus, root, seq_len=64, max_steps=6, eval_every=3, checkpoint_every=3, log_every=3)
    ).fit()
    return root


def run_mmrec(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "MMREC_DATA_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "mmrec", *args], capture_output=True, text=True, env=env, timeout=600)


def test_eval_bpb_command(trained_run):
    out = trained_run / "bpb"
    proc = run_mmrec(
        "eval",
        "bpb",
        "--checkpoint",
        str(trained_run / "run"),
        "--out",
        str(out),
        "--cut",
        "32",
        cache=trained_run / "cache",
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 6 and results["documents"] >= 1
    assert 0 < results["overall_full_bpb"] < 9 and (out / "results.md").is_file()
    assert (out / "bpb_by_position.png").is_file()
    bad = run_mmrec(
        "eval", "bpb", "--checkpoint", str(trained_run / "corpus"), "--out", str(out), cache=trained_run / "cache"
    )
    assert bad.returncode == 1 and "not a checkpoint" in bad.stderr and "Traceback" not in bad.stderr


def test_stages_command_over_a_finished_run(trained_run):
    (trained_run / "run" / "stages.json").unlink()
    proc = run_mmrec("stages", str(trained_run / "run"), cache=trained_run / "cache")
    assert proc.returncode == 0, proc.stderr
    data = json.loads((trained_run / "run" / "stages.json").read_text())
    assert [s["id"] for s in data["stages"]] == [1, 2, 3, 4, 5]
    assert "stage 1" in proc.stdout


def test_compare_micro_end_to_end(tmp_path):
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()  # noqa: SIM905
    corpus = write_corpus(tmp_path / "corpus", 40, words, seed=2, min_words=160, max_words=480, lines=True)
    out = tmp_path / "cmp"
    proc = run_mmrec("compare", "--preset", "micro", "--data", str(corpus), "--out", str(out), cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    for name in (
        "MM-Rec",
        "GPT-style",
        "LLaMA-style",
        "Mistral-style",
        "learning order",
        "Findings",
        "bytes carried at 32K context",
        "fitted exponent",
    ):
        assert name in report, name
    for fig in ("loss_curves.png", "stage_timeline.png", "bpb_by_position.png", "speed_memory.png"):
        assert (out / fig).stat().st_size > 1000, fig
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"mmrec", "gpt", "llama", "mistral"}
    params = [json.loads((out / k / "summary.json").read_text())["tokens"] for k in results["models"]]
    assert len(set(params)) == 1, "every model trains on the same number of tokens"
    for key in results["models"]:
        stages = json.loads((out / key / "stages.json").read_text())
        assert len(stages["stages"]) == 5


def test_generate_streams_text_and_sessions_continue_exactly(trained_run, tmp_path):
    import io

    from mmrec.generate import run_generate
    from mmrec.models.state import StateError

    ckpt = str(trained_run / "run")
    first = io.StringIO()
    gen1 = run_generate(ckpt, "alpha beta", 12, temperature=0.0, state_out=str(tmp_path / "s.safetensors"), out=first)
    assert first.getvalue() == gen1 + "\n"
    gen2 = run_generate(
        ckpt, " gamma", 12, temperature=0.0, state_in=str(tmp_path / "s.safetensors"), out=io.StringIO()
    )
    whole = run_generate(ckpt, "alpha beta" + gen1 + " gamma", 12, temperature=0.0, out=io.StringIO())
    assert gen2 == whole, "a session continued from its saved state equals one call over the whole text"
    with pytest.raises(ValueError, match="prompt is empty"):
        run_generate(ckpt, "", 3, out=io.StringIO())
    other = MMRecLM(MMRecConfig(vocab_size=257, d_model=64, n_layers=2, n_heads=2)).init_state(1)
    other.save(tmp_path / "other.safetensors", config=other_cfg_dict())
    with pytest.raises(StateError, match="another config"):
        run_generate(ckpt, "x", 3, state_in=str(tmp_path / "other.safetensors"), out=io.StringIO())
    proc = run_mmrec(
        "generate", "--checkpoint", ckpt, "--prompt", "alpha", "--max-new-tokens", "8", cache=trained_run / "cache"
    )
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr


def other_cfg_dict() -> dict:
    return MMRecConfig(vocab_size=257, d_model=64, n_layers=2, n_heads=2).to_dict()


@pytest.mark.parametrize("preset", ["micro", "small", "gpu"])
def test_every_compare_preset_builds_for_training_and_speed(preset, tmp_path):
    """The small preset once trained four models for half an hour, then could not build gpt
    for its 32K speed measurement (the position table ate the matched parameter budget)."""
    from mmrec.compare import PRESETS, CompareOptions, _speed_config, check_buildable, model_configs
    from mmrec.models import build_model

    configs = model_configs(CompareOptions(out=str(tmp_path), preset=preset))
    check_buildable(configs, PRESETS[preset])
    with torch.device("meta"):
        trained = build_model(configs["gpt"].model)
        measured = build_model(_speed_config(configs["gpt"], PRESETS[preset]))
    assert measured.config.d_ff == trained.config.d_ff, "a longer position table must not change the MLP"
    assert measured.config.max_seq_len > trained.config.max_seq_len >= 128


def test_compare_rejects_an_unbuildable_shape_before_training(tmp_path):
    from mmrec.compare import PRESETS, CompareOptions, check_buildable, model_configs
    from mmrec.config import ConfigError

    opts = CompareOptions(out=str(tmp_path), overrides={"seq_len_schedule": "0:64,1K:400000"})
    with pytest.raises(ConfigError, match="GPT-style: cannot build the model for training: cannot match"):
        check_buildable(model_configs(opts), PRESETS["micro"])
