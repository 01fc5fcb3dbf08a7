"""Hugging Face interop and lm-evaluation-harness (issue 14), on tiny models with random weights.

The contracts: the exported model computes what ``mmrec.load`` computes; generate with the state as the
cache equals mmrec's own generate and continues exactly; the baselines load as transformers' own classes
without mmrec; the tokenizers give mmrec's ids; the harness scores a baseline as ``--model hf`` scores its
export, and MM-Rec's rolling log-likelihood is the streamed sum that ``mmrec eval bpb`` computes.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import mmrec  # noqa: E402
from mmrec.config import MMRecConfig, TransformerConfig  # noqa: E402
from mmrec.models.checkpoint import load, save_checkpoint  # noqa: E402
from mmrec.tokenizer import ByteTokenizer, train_bpe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "héllo wörld — 日本語 \U0001f600 <|endoftext|> tabs\tand  spaces \n\n  x",
    "def f(x):\n    return x ** 2  # squares\n",
    "",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Two threads on two cores shared with other work: a tiny matmul took 28 ms instead of 0.1 ms.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _checkpoint(root: Path, config: MMRecConfig | TransformerConfig, tokenizer=None) -> Path:  # noqa: ANN001
    torch.manual_seed(0)
    model = mmrec.build_model(config)
    with torch.no_grad():  # away from the initialisation, so that norms, biases and gates matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(root, model, tokenizer or ByteTokenizer(), kind="train", step=1, trained_seq_len=64)
    return root


TINY_MMREC = dict(d_model=32, n_layers=2, n_heads=2, chunk_size=8, mem_slots=4, summary_window=2, init_std=0.1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:  # noqa: ANN001
    root = tmp_path_factory.mktemp("runs")
    shape = dict(d_model=32, n_layers=2, n_heads=2, init_std=0.1, max_seq_len=128)
    return {
        "mmrec": _checkpoint(root / "mmrec", MMRecConfig(**TINY_MMREC)),
        "llama": _checkpoint(root / "llama", TransformerConfig(preset="llama", **shape)),
        "mistral": _checkpoint(root / "mistral", TransformerConfig(preset="mistral", window=8, **shape)),
        "gpt": _checkpoint(root / "gpt", TransformerConfig(preset="gpt", **shape)),
    }


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[str, Path]:  # noqa: ANN001
    from mmrec.hf.export import export_hf

    root = tmp_path_factory.mktemp("exported")
    return {name: export_hf(run, root / name) for name, run in runs.items()}


def _ids(batch: int = 2, length: int = 37) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(1))


# The MM-Rec model ---------------------------------------------------------------------------------------------


def test_exported_mmrec_computes_what_mmrec_load_computes(runs, exported):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(exported["mmrec"])
    assert type(hf).__name__ == "MMRecForCausalLM"
    assert AutoConfig.from_pretrained(exported["mmrec"]).model_type == "mmrec"
    ids = _ids()  # 37 tokens: not a multiple of the chunk
    with torch.no_grad():
        ours, theirs = load(runs["mmrec"]).model(ids).logits, hf(ids).logits
    assert torch.equal(ours, theirs)  # the same modules and weights; rounding allowed by the issue: 1e-5
    card = (exported["mmrec"] / "README.md").read_text()
    assert "Parameters:" in card and "import mmrec" in card and "from_pretrained" in card


def test_greedy_generate_equals_mmrec_generate(runs, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmrec.generate import run_generate

    hf = AutoModelForCausalLM.from_pretrained(exported["mmrec"])
    tok = AutoTokenizer.from_pretrained(exported["mmrec"])
    prompt = "To be, or not"
    text = run_generate(str(runs["mmrec"]), prompt, max_new_tokens=24, temperature=0.0, device="cpu", out=io.StringIO())
    ids = tok(prompt, return_tensors="pt").input_ids
    out = hf.generate(ids, max_new_tokens=24, do_sample=False)
    assert tok.decode(out[0, ids.size(1) :], skip_special_tokens=True) == text
    reference = load(runs["mmrec"]).model.generate(ids, 24, temperature=0.0, eos_token_id=256)
    assert out.tolist() == reference.tolist()


def test_generation_continues_from_the_returned_cache(exported):
    from transformers import AutoModelForCausalLM

    from mmrec.hf import MMRecCache

    hf = AutoModelForCausalLM.from_pretrained(exported["mmrec"])
    prompt = _ids(1, 11)
    first = hf.generate(prompt, max_new_tokens=9, min_new_tokens=9, do_sample=False, return_dict_in_generate=True)
    assert isinstance(first.cache, MMRecCache)
    size = first.cache.state.nbytes()
    more = hf.generate(first.sequences, cache=first.cache, max_new_tokens=13, min_new_tokens=13, do_sample=False)
    whole = hf.generate(prompt, max_new_tokens=22, min_new_tokens=22, do_sample=False)
    assert more.tolist() == whole.tolist()
    assert first.cache.state.nbytes() == size  # the state did not grow with 13 more tokens
    # New text after a generation: the cache feeds only what it has not seen.
    cache = MMRecCache()
    text = _ids(2, 40)
    with torch.no_grad():
        hf(text[:, :17], cache=cache)
        pieces = hf(text[:, 17:], cache=cache).logits
        assert cache.get_seq_length() == 40
        torch.testing.assert_close(pieces, hf(text).logits[:, 17:], rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_is_exact(exported, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(exported["mmrec"])
    hf.save_pretrained(tmp_path / "again")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").is_file()
    for (name, a), (_, b) in zip(hf.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, back(ids).logits)


def test_the_cache_follows_beams_and_left_padding_is_refused(exported):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(exported["mmrec"])
    prompt = _ids(1, 9)
    beams = hf.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False)
    assert beams.shape == (1, 15)
    padded = torch.ones(1, 9, dtype=torch.long)
    padded[0, :2] = 0
    with pytest.raises(ValueError, match="left padding"):
        hf.generate(prompt, attention_mask=padded, max_new_tokens=2)


def test_the_cache_of_streams_at_different_positions_has_no_single_length():
    from mmrec.hf.modeling import MMRecCache
    from mmrec.models.state import MMRecState

    model = mmrec.MMRecLM(MMRecConfig(d_model=16, n_layers=1, n_heads=2))
    states = [model(torch.zeros(1, n, dtype=torch.long)).state for n in (3, 3, 5)]
    assert MMRecCache(MMRecState.cat(states[:2])).get_seq_length() == 3
    with pytest.raises(ValueError, match="different positions"):
        MMRecCache(MMRecState.cat(states)).get_seq_length()


def test_import_mmrec_works_without_transformers_and_registers_when_it_is_imported():
    blocked = "import sys; sys.modules['transformers'] = None\nimport warnings; warnings.simplefilter('error')\n"
    check = "import mmrec, torch; mmrec.MMRecLM(mmrec.MMRecConfig(d_model=16, n_layers=1, n_heads=2))\n"
    subprocess.run([sys.executable, "-c", blocked + check], check=True, cwd=ROOT, timeout=120)
    lazy = textwrap.dedent(
        """
        import sys, mmrec
        assert "transformers" not in sys.modules, "import mmrec must not import transformers"
        from transformers import AutoConfig
        assert type(AutoConfig.for_model("mmrec")).__name__ == "MMRecHFConfig"
        """
    )
    subprocess.run([sys.executable, "-c", lazy], check=True, cwd=ROOT, timeout=300)


# Tokenizers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_tokenizers_load_with_autotokenizer_and_give_the_same_ids(kind, tmp_path):
    from transformers import AutoTokenizer

    from mmrec.hf.tokenizer import save_hf_tokenizer

    ours = ByteTokenizer() if kind == "byte" else train_bpe(TEXTS * 20, vocab_size=300, min_frequency=1)
    save_hf_tokenizer(ours, tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.eos_token_id == ours.eot_id
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text), text
        assert theirs.decode(ids) == text


# The baselines as transformers' own classes --------------------------------------------------------------------


def test_baselines_load_as_native_transformers_without_mmrec(runs, exported, tmp_path):
    ids = _ids(2, 45)  # longer than mistral's window of 8
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["mmrec"] = None  # loading must not need mmrec
        import torch
        from transformers import AutoModelForCausalLM
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        out = {{}}
        for name, path in {json.dumps({k: str(v) for k, v in exported.items() if k != "mmrec"})}.items():
            model = AutoModelForCausalLM.from_pretrained(path)
            out[name] = type(model).__name__
            with torch.no_grad():
                torch.save(model(ids).logits, {str(tmp_path)!r} + f"/{{name}}.pt")
        print(out)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert "'llama': 'LlamaForCausalLM'" in done.stdout and "'mistral': 'MistralForCausalLM'" in done.stdout
    assert "'gpt': 'GPT2LMHeadModel'" in done.stdout
    for name in ("llama", "mistral", "gpt"):
        with torch.no_grad():
            ours = load(runs[name]).model(ids).logits
        theirs = torch.load(tmp_path / f"{name}.pt")
        err = float((ours - theirs).norm() / ours.norm())
        assert err <= 1e-5, (name, err)


def test_export_refuses_to_overwrite(runs, exported, capsys):
    from mmrec.cli import main

    assert main(["export", "hf", "--checkpoint", str(runs["llama"]), "--out", str(exported["llama"])]) == 1
    assert "--overwrite" in capsys.readouterr().err


# lm-evaluation-harness -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:  # noqa: ANN001
    import random

    from mmrec.evals.lm_tasks import TaskSizes, write_tasks

    rng = random.Random(0)
    words = ["the", "king", "queen", "lord", "sword", "crown", "night", "day", "love", "death", "war", "peace"]
    texts = ["\n".join(" ".join(rng.choice(words) for _ in range(7)) for _ in range(60)) for _ in range(3)]
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "texts.json").write_text(json.dumps(texts))
    write_tasks(texts, folder, TaskSizes(rolling_docs=2, rolling_chars=500, items=5, context_chars=100))
    return folder


def _evaluate(model, folder: Path, monkeypatch) -> dict:  # noqa: ANN001
    pytest.importorskip("lm_eval")
    import lm_eval.evaluator
    from lm_eval.tasks import TaskManager

    from mmrec.evals.lm_tasks import TASKS

    monkeypatch.setenv("DISABLE_MULTIPROC", "1")
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)  # torch's collect_env: seconds
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    out = lm_eval.evaluator.simple_evaluate(
        model=model, tasks=list(TASKS), task_manager=manager, bootstrap_iters=0, log_samples=False
    )
    return {task: {k.split(",")[0]: v for k, v in r.items() if "," in k} for task, r in out["results"].items()}


def test_harness_scores_a_baseline_as_lm_eval_hf_scores_its_export(runs, exported, tasks, monkeypatch):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from mmrec.evals.lm_harness import MMRecEvalLM

    ours = MMRecEvalLM(checkpoint=str(runs["llama"]), max_length=48)
    theirs = HFLM(pretrained=str(exported["llama"]), max_length=48, dtype="float32", device="cpu", batch_size=1)
    a, b = _evaluate(ours, tasks, monkeypatch), _evaluate(theirs, tasks, monkeypatch)
    assert a["mmrec_choice"]["acc"] == b["mmrec_choice"]["acc"]
    assert a["mmrec_choice"]["acc_norm"] == b["mmrec_choice"]["acc_norm"]
    assert a["mmrec_cloze"]["acc"] == b["mmrec_cloze"]["acc"]
    logs = [("mmrec_rolling", "bits_per_byte"), ("mmrec_rolling", "word_perplexity"), ("mmrec_cloze", "perplexity")]
    for task, metric in logs:  # perplexities compared in log space: exp() magnifies float32 rounding
        x, y = math.log(a[task][metric]), math.log(b[task][metric])
        assert abs(x - y) <= 1e-5 * abs(y), (task, metric, a[task][metric], b[task][metric])
    requests = [
        Instance("generate_until", {}, ("the king", {"until": ["\n"], "max_gen_toks": 12}), 0),
        Instance("generate_until", {}, ("love death", {"until": ["war"], "max_gen_toks": 20}), 1),
    ]
    assert ours.generate_until(requests) == theirs.generate_until(requests)


def test_mmrec_rolling_streams_the_whole_document_as_eval_bpb_does(runs, tasks):
    pytest.importorskip("lm_eval")
    import numpy as np

    from mmrec.evals.bpb import stream_nats
    from mmrec.evals.lm_harness import MMRecEvalLM

    text = "\n".join(json.loads((tasks / "texts.json").read_text()))
    tokens = ByteTokenizer().encode(text)
    model = load(runs["mmrec"]).model
    with torch.no_grad():  # stream_nats: what `mmrec eval bpb` sums for MM-Rec
        bpb_nats = stream_nats(model, torch.tensor(tokens), 4096, contextlib.nullcontext())
        with_eot = stream_nats(model, torch.tensor([256, *tokens]), 4096, contextlib.nullcontext())
    context_only = MMRecEvalLM(checkpoint=str(runs["mmrec"]), prefix_token="none").stream_logprob(tokens)
    assert context_only == pytest.approx(-float(np.sum(bpb_nats)), rel=1e-12)
    lm = MMRecEvalLM(checkpoint=str(runs["mmrec"]), stream_window=37)  # windows change memory, not results
    assert lm.stream_logprob(tokens) == pytest.approx(-float(np.sum(with_eot)), rel=1e-6)


def test_mmrec_loglikelihood_from_a_shared_context_state_equals_whole_passes(runs):
    pytest.importorskip("lm_eval")
    import torch.nn.functional as F

    from mmrec.evals.lm_harness import MMRecEvalLM

    lm = MMRecEvalLM(checkpoint=str(runs["mmrec"]), stream_window=5)
    context = lm.tok_encode("the king and the queen of")
    choices = [lm.tok_encode(c) for c in (" night", " a day", " war and peace")]
    scored = lm._loglikelihood_tokens([(("", ""), context, c) for c in choices])
    for (logprob, _), cont in zip(scored, choices, strict=True):
        ids = torch.tensor([context + cont])
        with torch.no_grad():
            logits = lm.model(ids[:, :-1]).logits[0, -len(cont) :]
        expected = F.log_softmax(logits, -1).gather(-1, ids[0, -len(cont) :, None]).sum()
        assert logprob == pytest.approx(float(expected), rel=1e-5)


def test_eval_lm_writes_a_side_by_side_table(runs, tasks, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    import lm_eval.evaluator

    from mmrec.cli import main

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)

    data = tmp_path / "text.txt"
    data.write_text("\n\n".join(json.loads((tasks / "texts.json").read_text())))
    env = {k: os.environ.get(k) for k in ("DISABLE_MULTIPROC", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    try:
        argv = ["eval", "lm", "--checkpoint", str(runs["mmrec"]), str(runs["llama"]), "--data", str(data)]
        argv += ["--out", str(tmp_path / "out"), "--rolling-docs", "1", "--items", "4", "--rolling-chars", "400"]
        assert main(argv) == 0
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| mmrec_rolling | bits_per_byte ↓ |" in table and "mmrec (mmrec)" in table
    assert "transformer-llama (llama)" in table and "rolling windows of 64" in table
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["models"]) == {"mmrec (mmrec)", "transformer-llama (llama)"}
    assert (tmp_path / "out" / "tasks" / "mmrec_cloze.yaml").is_file()
