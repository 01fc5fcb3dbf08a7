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
        tiny_train_config(
            corpus, root, seq_len=64, max_steps=6, eval_every=3, checkpoint_every=3, log_every=3, track_stages=True
        )
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
    assert (out / "results.md").is_file()
    # Known answer: the validation documents of the run, scored here by one forward pass each.
    from mmrec.data.cache import cached_dataset, source_specs
    from mmrec.evals.common import load_checkpoint, run_data_settings

    lm = load_checkpoint(str(trained_run / "run"), "cpu")
    sources, text_field, val_fraction, data_cache = run_data_settings(lm)
    dataset = cached_dataset(
        source_specs(sources, text_field), lm.tokenizer, val_fraction, data_cache, log=lambda _: None, progress=False
    )
    docs = [d.tolist() for src in dataset.sources.values() for d in map(src.val.doc, range(src.val.n_docs))]
    docs = [d for d in docs if len(d) >= 2]
    bits = [direct_bpb(lm.model, d) * (len(d) - 1) for d in docs]  # byte tokens: one byte per scored token
    assert results["documents"] == len(docs) >= 1
    assert results["overall_full_bpb"] == pytest.approx(sum(bits) / sum(len(d) - 1 for d in docs), rel=1e-5)
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
    # 20 steps instead of the preset's 60: the test checks the pipeline and the report, not what is learned.
    proc = run_mmrec(
        "compare",
        "--preset",
        "micro",
        "--max-steps",
        "20",
        "--data",
        str(corpus),
        "--out",
        str(out),
        cache=tmp_path / "cache",
    )
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
        "| MM-Rec | state warmed on 128 tokens of unrelated text |",
        "| LLaMA-style | empty context |",
    ):
        assert name in report, name
    for fig in ("loss_curves.png", "stage_timeline.png", "bpb_by_position.png", "speed_memory.png"):
        assert (out / fig).stat().st_size > 1000, fig
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"mmrec", "gpt", "llama", "mistral"}
    # Every exponent is fitted over the same lengths, and the report says which.
    fitted = {tuple(m["speed"]["exponent_lengths"]) for m in results["models"].values()}
    assert len(fitted) == 1 and len(next(iter(fitted))) >= 2
    assert "fitted over the same lengths for every model: T = " in report
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


# What the compare report says ------------------------------------------------------------------------------------


def test_exponents_are_fitted_over_the_lengths_every_model_ran():
    from mmrec.evals.speed import fit_exponents

    # MM-Rec linear to 512 and slow at 1,024 (say, paging); the Transformer quadratic, its 1,024 failed.
    seconds = {
        "mmrec": {128: 0.128, 256: 0.256, 512: 0.512, 1024: 4.096},
        "llama": {128: 128**2 * 1e-6, 256: 256**2 * 1e-6, 512: 512**2 * 1e-6},
    }
    fits = fit_exponents(seconds)
    assert fits["mmrec"]["exponent_lengths"] == fits["llama"]["exponent_lengths"] == [128, 256, 512]
    assert fits["mmrec"]["exponent"] == pytest.approx(1.0) and fits["llama"]["exponent"] == pytest.approx(2.0)
    assert fits["mmrec"]["shared"] and fit_exponent(list(seconds["mmrec"]), list(seconds["mmrec"].values())) > 1.4
    # No two lengths in common: each model's own, and the result says so.
    apart = fit_exponents({"mmrec": {128: 1.0, 256: 2.0}, "llama": {512: 1.0, 1024: 4.0}})
    assert not apart["mmrec"]["shared"] and apart["llama"]["exponent_lengths"] == [512, 1024]
    assert apart["llama"]["exponent"] == pytest.approx(2.0)


def _models(final: dict[str, float | None], se: float | None = None, lengths: dict[str, list[int]] | None = None):
    """The part of compare's results that the findings read."""
    models = {}
    for key, value in final.items():
        ran = (lengths or {}).get(key, [512, 1024])
        models[key] = {
            "summary": {"val_bpb": value, **({"val_bpb_se": se} if se is not None else {})},
            "bpb_by_position": {"gain_bpb": [None], "tokens": [0], "buckets": ["0-1K"]},
            "speed": {
                "exponent": 1.0,
                "train": [{"seq_len": n, "seconds_per_step": 1.0, "batch": 1} for n in ran],
                "state_bytes_32k": {"bytes": 1024},
            },
        }
    return models


def test_findings_call_close_losses_a_tie_and_name_the_fitted_lengths():
    from mmrec.report import _findings, best_with_ties

    final = {"mmrec": 2.550, "gpt": 3.633, "llama": 2.563, "mistral": 2.551}  # the small preset's numbers
    text = " ".join(_findings({}, _models(final), {}, {}))
    assert "a tie between MM-Rec (2.550), Mistral-style (2.551); then LLaMA-style 2.563, GPT-style 3.633" in text
    assert "at most 0.01 bits/byte (no standard error was measured" in text and "loses" not in text
    assert "fitted over the same lengths for every model: T = 512, 1,024" in text
    # With standard errors the rule is two of them: 0.001 apart at SE 0.0001 is a difference, not a tie.
    text = " ".join(_findings({}, _models(final, se=1e-4), {}, {}))
    assert "Lowest final validation bits/byte: MM-Rec (2.550); then Mistral-style 2.551" in text
    assert "within two standard errors" in text
    se = {"a": 0.01, "b": 0.01, "c": None}  # 2 standard errors of the difference: 0.028
    assert best_with_ties({"a": 1.0, "b": 1.02, "c": None}, se)[0] == ["a", "b"]
    assert best_with_ties({"a": 1.0, "b": 1.03, "c": None}, se)[0] == ["a"]
    # MM-Rec behind by more than the threshold loses, and says so; a model without a loss is not ranked.
    text = " ".join(_findings({}, _models({"mmrec": 2.6, "llama": 2.5, "gpt": None}), {}, {}))
    assert "Lowest final validation bits/byte: LLaMA-style (2.500); then MM-Rec 2.600" in text
    assert "MM-Rec loses on final loss to LLaMA-style by 0.100" in text and "GPT" not in text.split("loses")[0]
    # Lengths that differ between models are named, model by model.
    text = " ".join(_findings({}, _models({"mmrec": 2.5, "llama": 2.6}, lengths={"llama": [512]}), {}, {}))
    assert "fitted over different lengths (those each model ran): MM-Rec T = 512, 1,024; LLaMA-style T = 512" in text


# The GPU scripts ---------------------------------------------------------------------------------------------


STUB_PYTHON = """#!/usr/bin/env bash
# A stand-in for python on a machine without a GPU: tests and benchmarks exit with the code asked for.
case " $* " in
  *" -m pytest "*) echo "stub: pytest"; exit "${STUB_PYTEST_RC:-0}" ;;
  *bench_core.py*) echo "stub: bench_core"; exit "${STUB_CORE_RC:-0}" ;;
  *bench_mixer.py*) echo "stub: bench_mixer"; exit 0 ;;
  *" -m mmrec "*) echo "stub: mmrec"; exit 0 ;;
  *triton*) echo "stub: torch, triton"; exit 0 ;;
esac
exec "REAL_PYTHON" "$@"
"""


def _run_gpu_script(tmp_path: Path, script: str, **env: str) -> subprocess.CompletedProcess:
    import os

    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    (stubs / "python").write_text(STUB_PYTHON.replace("REAL_PYTHON", sys.executable))
    (stubs / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'stub GPU, 80 GiB'\n")
    for f in stubs.iterdir():
        f.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    full_env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "OUT": str(out), **env}
    repo = Path(__file__).resolve().parents[1]
    return subprocess.run(["bash", f"benchmarks/{script}"], cwd=repo, env=full_env, capture_output=True, text=True)


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_synth.sh", "gpu_train_check.sh"])
def test_gpu_scripts_are_strict_bash(script: str):
    text = (Path(__file__).resolve().parents[1] / "benchmarks" / script).read_text()
    assert "set -euo pipefail" in text
    assert (
        subprocess.run(["bash", "-n", f"benchmarks/{script}"], cwd=Path(__file__).resolve().parents[1]).returncode == 0
    )


def test_a_failing_gpu_test_fails_the_gpu_scripts(tmp_path):
    passed = _run_gpu_script(tmp_path, "gpu_check.sh")
    assert passed.returncode == 0, passed.stderr
    failed = _run_gpu_script(tmp_path, "gpu_check.sh", STUB_PYTEST_RC="1")
    assert failed.returncode == 1, "a failing pytest (piped into tail and tee) must fail the script"
    assert "FAILED: tests" in failed.stderr
    assert "== model benchmark" in failed.stdout  # the later steps still ran and logged
    bench = _run_gpu_script(tmp_path, "gpu_check.sh", STUB_CORE_RC="3")
    assert bench.returncode == 1 and "model benchmark (exit 3)" in bench.stderr
    synth = dict(DEVICE="cuda", JOBS="tests", RUNS=str(tmp_path / "runs"))
    assert _run_gpu_script(tmp_path, "gpu_synth.sh", **synth).returncode == 0
    failed = _run_gpu_script(tmp_path, "gpu_synth.sh", STUB_PYTEST_RC="1", **synth)
    assert failed.returncode == 1 and "gpu_tests (exit 1)" in failed.stderr
    assert (tmp_path / "out" / "summary.md").is_file()  # the summary is written all the same


def test_report_states_how_each_model_started_the_stage_3_windows(tmp_path):
    from mmrec.compare import stage3_measured_cold
    from mmrec.report import context_gain_lines
    from mmrec.train.config import TrainConfig

    row = {"context_gain": 0.1, "ngram_context_gain": 0.05, "context_excess": 0.05, "context_excess_se": 0.01}
    stages = {
        "mmrec": {"history": [row | {"context_warmup_tokens": 512.0}]},
        "llama": {"history": [row | {"context_warmup_tokens": 0.0}]},
        "gpt": {"history": [row]},  # a stages.json written before issue 13
        "mistral": None,
    }
    text = "\n".join(context_gain_lines(stages, ["mmrec", "llama", "gpt", "mistral"]))
    assert "| MM-Rec | state warmed on 512 tokens of unrelated text | 0.100 | 0.050 | 0.050 +- 0.010 |" in text
    assert "| LLaMA-style | empty context |" in text
    assert "| GPT-style | from a fresh state (measured before issue 13" in text
    assert "| Mistral-style | not tracked |" in text
    # A reused MM-Rec run whose stages.json predates the warm start is found, so compare can say so.
    run = tmp_path / "mmrec"
    run.mkdir()
    cfg = TrainConfig.from_flat({"arch": "mmrec", "out": str(run)})
    assert not stage3_measured_cold(run, cfg)
    (run / "stages.json").write_text(json.dumps({"history": [row]}))
    assert stage3_measured_cold(run, cfg)
    (run / "stages.json").write_text(json.dumps({"history": [row | {"context_warmup_tokens": 512.0}]}))
    assert not stage3_measured_cold(run, cfg)
