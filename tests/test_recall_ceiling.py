"""benchmarks/recall_ceiling.py: the plan, resume and skip, the choice of learning rate and the reports.

A fake ``mmrec`` stands in for training and evaluation (it writes what the real commands write, in
milliseconds), so nothing here trains a model. The end-to-end smoke (``--smoke``) takes minutes on the
shared 2-core machine and is run by hand, not here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import write_corpus

REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "king", "queen", "crown", "sword", "castle", "river", "horse", "lord", "lady", "night", "day"]


def _load():
    spec = importlib.util.spec_from_file_location("recall_ceiling", REPO / "benchmarks" / "recall_ceiling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["recall_ceiling"] = module
    spec.loader.exec_module(module)
    return module


rc = _load()
LRS = [1e-3, 2e-3, 4e-3]
# Validation loss by learning rate (what the fake trainer reports): 2e-3 is best ...
VAL_LOSS = {1e-3: 2.0, 2e-3: 1.5, 4e-3: 1.8}
# ... and evaluation would favour 4e-3: the choice must not see it.
EVAL_BPB = {1e-3: 3.0, 2e-3: 2.9, 4e-3: 1.0}


class FakeMmrec:
    """``mmrec train`` / ``eval recall`` / ``eval bpb`` as files: checkpoints, summary.json, eval.csv, results."""

    def __init__(self, interrupt: bool = False, fail_lr: float | None = None) -> None:
        self.calls: list[list[str]] = []
        self.interrupt = interrupt
        self.fail_lr = fail_lr

    def __call__(self, argv: list[str], log_path: Path, timeout: float | None) -> int:
        self.calls.append(argv)
        log_path.parent.mkdir(parents=True, exist_ok=True)

        def opt(name: str) -> str:
            return argv[argv.index(name) + 1]

        out = Path(opt("--out"))
        out.mkdir(parents=True, exist_ok=True)
        if argv[0] == "train":
            steps, lr = int(opt("--max-steps")), float(opt("--lr"))
            if lr == self.fail_lr:  # diverged: mmrec train stops with an error after NaN steps
                return 1
            if self.interrupt and "--resume" not in argv:  # stopped half-way (SIGTERM saves a checkpoint)
                (out / f"step-{steps // 2:06d}").mkdir()
                (out / f"step-{steps // 2:06d}" / "meta.json").write_text("{}")
                return 143
            (out / f"step-{steps:06d}").mkdir(exist_ok=True)
            (out / f"step-{steps:06d}" / "meta.json").write_text("{}")
            tokens = steps * int(opt("--seq-len")) * int(opt("--batch-size"))
            summary = {"steps": steps, "tokens": tokens, "val_loss": VAL_LOSS[lr], "val_bpb": VAL_LOSS[lr] / 0.69}
            (out / "summary.json").write_text(json.dumps(summary))
            (out / "eval.csv").write_text(f"step,tokens,val_loss\n{steps},{tokens},{VAL_LOSS[lr]}\n")
            return 0
        lr = float(Path(opt("--checkpoint")).name.split("-lr")[1])
        if argv[1] == "recall":
            buckets = ["<1K", "1K-4K", "4K-16K", "16K-64K", "64K+"]
            model = {
                "name": "x",
                "buckets": buckets,
                "saved_fraction": [0.0, 0.1, None, None, None],
                "full_bpb": [2.0, 1.0, None, None, None],
                "repeat_bytes": [100, 100, 0, 0, 0],
                "span_starts": {"full_bpb": 4.0, "bytes": 50},
                "control": {"saved_fraction": 0.01, "full_bpb": 3.0, "bytes": 250},
                "cut": int(opt("--cut")),
            }
            results = {"models": [model]}
        else:
            results = {"overall_full_bpb": EVAL_BPB[lr]}
        (out / "results.json").write_text(json.dumps(results))
        return 0


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "texts", 24, WORDS, min_words=100, max_words=2000)


def _opts(tmp_path: Path, corpus: Path, **kw) -> object:
    base = dict(
        out=str(tmp_path / "out"),
        corpora=["tiny"],
        models=["llama-1k", "mmrec"],
        lrs=LRS,
        data=[f"tiny={corpus}"],
        tokens=4096,
        tokens_per_step=1024,
        smoke=True,
        eval_docs=2,
        command=["python", "benchmarks/recall_ceiling.py", "--test"],
    )
    return rc.Options(**{**base, **kw})


def test_plan_is_corpora_x_models_x_seeds_x_lrs_at_equal_tokens(tmp_path):
    opts = rc.Options(out=str(tmp_path), seeds=[0, 1])
    plan = rc.build_plan(opts)
    models = [m.key for m in rc.MODELS if m.default]
    assert models == ["llama-1k", "llama-4k", "mistral", "mmrec", "mmrec-delta"]
    assert len(plan) == 2 * len(models) * 2 * 3
    assert len({r.dir for r in plan}) == len(plan)
    assert {(r.corpus, r.model, r.seed, r.lr) for r in plan} == {
        (c, m, s, lr) for c in ("code", "prose") for m in models for s in (0, 1) for lr in opts.lrs
    }
    # Equal tokens: the same steps of the same tokens for every model, whatever its window.
    assert {r.tokens for r in plan} == {rc.steps_for(opts) * opts.tokens_per_step}
    assert {r.max_steps for r in plan} == {rc.steps_for(opts)}
    by_model = {r.model: r for r in plan}
    assert (by_model["llama-1k"].seq_len, by_model["llama-4k"].seq_len) == (1024, 4096)
    assert by_model["llama-4k"].batch_size * 4 == by_model["llama-1k"].batch_size
    assert "--window" in by_model["mistral"].argv and "--short-term" in by_model["mmrec-delta"].argv
    assert "--arch" not in by_model["mmrec"].argv  # MM-Rec as it is


def test_plan_refuses_what_would_be_unequal_or_unknown(tmp_path):
    with pytest.raises(rc.PlanError, match="at least 3"):
        rc.build_plan(rc.Options(out=str(tmp_path), lrs=[1e-3, 2e-3]))
    with pytest.raises(rc.PlanError, match="unknown nope"):
        rc.build_plan(rc.Options(out=str(tmp_path), models=["nope"]))
    with pytest.raises(rc.PlanError, match="not a multiple"):
        rc.build_plan(rc.Options(out=str(tmp_path), tokens_per_step=1000))


def test_a_model_is_one_line(tmp_path, monkeypatch):
    extra = rc.ModelSpec("mmrec-wide", "MM-Rec, 8 heads", 1024, ("--n-heads", "8"), default=False)
    monkeypatch.setattr(rc, "MODELS", (*rc.MODELS, extra))
    monkeypatch.setattr(rc, "MODEL_KEYS", (*rc.MODEL_KEYS, extra.key))
    opts = rc.Options(out=str(tmp_path), models=["mmrec", "mmrec-wide"], corpora=["prose"])
    plan = rc.build_plan(opts)
    info = rc.preflight(opts, plan)
    assert info["mmrec-wide"]["model_config"]["n_heads"] == 8
    # A flag mmrec train does not know fails before anything runs, naming the model.
    bad = rc.ModelSpec("mmrec-bad", "bad", 1024, ("--no-such-option", "1"))
    monkeypatch.setattr(rc, "MODELS", (*rc.MODELS, bad))
    monkeypatch.setattr(rc, "MODEL_KEYS", (*rc.MODEL_KEYS, bad.key))
    opts = rc.Options(out=str(tmp_path), models=["mmrec-bad"], corpora=["prose"])
    with pytest.raises(rc.PlanError, match="mmrec-bad"):
        rc.preflight(opts, rc.build_plan(opts))


def test_the_three_sets_of_documents_are_disjoint(tmp_path, corpus):
    opts = _opts(tmp_path, corpus)
    c = rc.corpora_of(opts)["tiny"]
    split = rc.prepare_corpus(opts, c, log=lambda _: None)
    root = rc.data_dir(Path(opts.out), "tiny")
    train = {p.name for p in (root / "train").iterdir()}
    evaluation = {i.split("/", 1)[1] for i in split["evaluation"]}
    assert train and evaluation and not train & evaluation
    assert len(train) + len(evaluation) == 24
    assert sorted(p.name for p in (root / "evaluation").iterdir())[0].startswith("000-")
    assert len(list((root / "evaluation").iterdir())) == 2
    sizes = {d: (corpus / d).stat().st_size for d in evaluation}
    assert {d["id"].split("/", 1)[1] for d in split["scored"]} == set(sorted(sizes, key=sizes.get)[-2:])
    # The trainer's validation (selection) split comes from the training folder only.
    assert {s.split("/", 1)[1] for s in split["selection"]} <= train
    # Made once: a second call reuses it; a changed corpus is refused.
    assert rc.prepare_corpus(opts, c, log=lambda _: None) == json.loads((root / "split.json").read_text())
    (corpus / "doc000.txt").write_text("changed text " * 50)
    with pytest.raises(rc.PlanError, match="other documents"):
        rc.prepare_corpus(opts, c, log=lambda _: None)


def test_resume_then_skip_with_a_fake_trainer(tmp_path, corpus):
    opts = _opts(tmp_path, corpus)
    plan = rc.build_plan(opts)
    fake = FakeMmrec(interrupt=True)
    rc.run_grid(opts, plan, run_exec=fake, log=lambda _: None)
    assert [c[0] for c in fake.calls] == ["train"] * len(plan)  # all stopped half-way: nothing to evaluate
    assert {rc.run_state(r) for r in plan} == {"partial"}
    fake.calls.clear()
    results = rc.run_grid(opts, plan, run_exec=fake, log=lambda _: None)
    trains = [c for c in fake.calls if c[0] == "train"]
    assert len(trains) == len(plan) and all(c[-2:] == ["--resume", "auto"] for c in trains)
    assert {rc.run_state(r) for r in plan} == {"done"}
    assert len([c for c in fake.calls if c[0] == "eval"]) == 2 * 2  # recall and bpb, two models
    fake.calls.clear()
    again = rc.run_grid(opts, plan, run_exec=fake, log=lambda _: None)
    assert fake.calls == []  # every run done and every evaluation present: skipped
    assert again["corpora"] == results["corpora"]


def test_a_run_started_with_other_settings_is_refused(tmp_path, corpus):
    opts = _opts(tmp_path, corpus)
    plan = rc.build_plan(opts)
    rc.run_grid(opts, plan, run_exec=FakeMmrec(interrupt=True), log=lambda _: None)
    longer = rc.build_plan(dataclasses.replace(opts, tokens=8192))
    with pytest.raises(rc.PlanError, match="another command"):
        rc.run_state(longer[0])


def test_lr_is_chosen_on_validation_never_on_evaluation(tmp_path, corpus):
    assert rc.choose_lr({1e-3: [2.0], 2e-3: [1.5], 4e-3: [None]}) is None  # not every run has finished
    assert rc.choose_lr({1e-3: [2.0, 1.0], 2e-3: [1.5, 1.6]}) == 1e-3  # mean over seeds
    assert rc.choose_lr({1e-3: [1.5], 2e-3: [1.5]}) == 1e-3  # ties: the smaller
    opts = _opts(tmp_path, corpus)
    plan = rc.build_plan(opts)
    # Evaluation results planted for every learning rate beforehand, best at 4e-3: they must not matter.
    for model in opts.models:
        dest = rc.eval_dir(Path(opts.out), "tiny", model, 0) / "bpb"
        dest.mkdir(parents=True)
        (dest / "results.json").write_text(json.dumps({"overall_full_bpb": 0.1}))
    fake = FakeMmrec()
    results = rc.run_grid(opts, plan, run_exec=fake, log=lambda _: None)
    evaluated = {c[c.index("--checkpoint") + 1] for c in fake.calls if c[0] == "eval"}
    assert evaluated == {str(rc.run_dir(Path(opts.out), "tiny", m, 0, 2e-3)) for m in opts.models}
    for model in results["corpora"]["tiny"]["models"].values():
        assert model["seeds"]["0"]["chosen_lr"] == 2e-3
        assert model["seeds"]["0"]["bpb"]["results"]["overall_full_bpb"] == EVAL_BPB[2e-3]


def test_reports_from_fake_results(tmp_path, corpus):
    opts = _opts(tmp_path, corpus, models=["mmrec", "llama-1k"])
    plan = rc.build_plan(opts)
    rc.run_grid(opts, plan, run_exec=FakeMmrec(), log=lambda _: None)
    out = Path(opts.out)
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == opts.command and results["git"]["commit"]
    assert {"cpu", "cores", "torch"} <= set(results["machine"])
    model = results["corpora"]["tiny"]["models"]["mmrec"]
    assert model["parameters"] > 0
    run = model["runs"]["seed0-lr0.002"]
    assert run["command"].startswith("mmrec train") and run["summary"]["val_loss"] == 1.5
    assert run["eval_curve"] == [{"step": 4, "tokens": 4096, "val_loss": 1.5}]
    assert model["seeds"]["0"]["recall"]["command"][:2] == ["eval", "recall"]
    md = (out / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| LLaMA") or line.startswith("| MM-Rec")]
    assert rows[0].startswith("| LLaMA-style, 1K windows (reference) |")  # the reference first
    assert "| 0.002 | 2.900 | 0.000 | 0.100 | - | - | - | 0.010 |" in rows[1]
    assert "**1.5000**" in md and "validation" in md and "distinct from the evaluation documents" in md
    assert (out / "PROVENANCE.md").read_text().count("benchmarks/recall_ceiling.py --test") == 1
    pytest.importorskip("matplotlib")
    assert (out / "recall_tiny.png").stat().st_size > 0


def test_dry_run_prints_every_command_and_the_budget(tmp_path, capsys):
    assert rc.main(["--out", str(tmp_path / "o"), "--dry-run", "--tokens", "81920"]) == 0
    text = capsys.readouterr().out
    assert "81,920 tokens per run (10 steps of 8,192 tokens); 30 runs" in text
    assert text.count("mmrec train ") == 30 and text.count("mmrec eval recall ") == 10
    assert not (tmp_path / "o").exists()  # nothing written


def test_total_bits_per_byte_from_the_recall_groups(tmp_path, corpus):
    """--skip-bpb: the total is summed from the recall groups, (2 * 100 + 1 * 100 + 4 * 50 + 3 * 250) / 500."""
    recall = FakeMmrec()
    opts = _opts(tmp_path, corpus, models=["mmrec"], skip_bpb=True)
    results = rc.run_grid(opts, rc.build_plan(opts), run_exec=recall, log=lambda _: None)
    assert [c[:2] for c in recall.calls if c[0] == "eval"] == [["eval", "recall"]]
    assert results["corpora"]["tiny"]["models"]["mmrec"]["seeds"]["0"]["total_bpb_from_recall"] == pytest.approx(2.5)
    assert "| 0.002 | 2.500 |" in (Path(opts.out) / "results.md").read_text()


def test_end_to_end_with_micro_models(tmp_path, corpus):
    """The real mmrec train and eval recall, two micro models, one learning rate, 2 steps of 1K tokens."""
    opts = _opts(tmp_path, corpus, lrs=[3e-3], tokens=2048, skip_bpb=True, eval_max_tokens=512, eval_tokens=1024)
    results = rc.run_grid(opts, rc.build_plan(opts), log=lambda _: None)
    for key in ("llama-1k", "mmrec"):
        model = results["corpora"]["tiny"]["models"][key]
        run = model["runs"]["seed0-lr0.003"]
        assert run["state"] == "done" and run["summary"]["tokens"] == 2048 and run["val_loss"] > 0
        seed = model["seeds"]["0"]
        assert seed["chosen_lr"] == 3e-3 and seed["total_bpb_from_recall"] > 0
        recall = seed["recall"]["results"]["models"][0]
        assert recall["cut"] == 128 and recall["documents"] == 2
    rows = [line for line in (Path(opts.out) / "results.md").read_text().splitlines() if "| 2,048 | 0.003 |" in line]
    assert len(rows) == 2


def test_a_failed_run_counts_as_worst_and_is_not_retried(tmp_path, corpus):
    assert rc.choose_lr({1e-3: [float("inf")], 2e-3: [float("inf")]}) is None  # all failed: nothing to score
    opts = _opts(tmp_path, corpus, models=["mmrec"])
    plan = rc.build_plan(opts)
    fake = FakeMmrec(fail_lr=2e-3)  # the lr validation would have chosen
    results = rc.run_grid(opts, plan, run_exec=fake, log=lambda _: None)
    seed = results["corpora"]["tiny"]["models"]["mmrec"]["seeds"]["0"]
    assert seed["chosen_lr"] == 4e-3  # the best of those that finished
    assert results["corpora"]["tiny"]["models"]["mmrec"]["runs"]["seed0-lr0.002"]["state"] == "failed"
    fake.calls.clear()
    rc.run_grid(opts, plan, run_exec=fake, log=lambda _: None)
    assert fake.calls == []


def test_a_sitting_that_is_over_starts_nothing(tmp_path, corpus):
    opts = _opts(tmp_path, corpus, sitting_minutes=1e-9)
    fake = FakeMmrec()
    rc.run_grid(opts, rc.build_plan(opts), run_exec=fake, log=lambda _: None)
    assert fake.calls == [] and "pending" in (Path(opts.out) / "results.md").read_text()
