"""The command line as a user meets it: --version, device errors, prompts from files, and ``mmrec.load``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

import mmrec
from mmrec.cli import main
from mmrec.config import MMRecConfig, TransformerConfig
from mmrec.models import CheckpointError, build_model
from mmrec.models.checkpoint import save_checkpoint
from mmrec.tokenizer import ByteTokenizer

TINY = dict(vocab_size=257, d_model=32, n_layers=2, n_heads=2, chunk_size=8, mem_slots=4, summary_window=2)


def _tiny_run(root: Path, config: MMRecConfig | TransformerConfig | None = None) -> Path:
    torch.manual_seed(0)
    model = build_model(config or MMRecConfig(**TINY))
    save_checkpoint(root / "run", model, ByteTokenizer(), kind="train", step=3, trained_seq_len=32)
    return root / "run"


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"mmrec {mmrec.__version__}"


# A device that cannot be used on the machine running the tests.
BAD_DEVICE = "cuda:99" if torch.cuda.is_available() else "cuda"
DEVICE_COMMANDS = {
    "train": ["train", "--max-steps", "1"],
    "eval bpb": ["eval", "bpb", "--checkpoint", "{run}", "--out", "{out}"],
    "eval passkey": ["eval", "passkey", "--checkpoint", "{run}", "--out", "{out}"],
    "eval recall": ["eval", "recall", "--checkpoint", "{run}", "--out", "{out}"],
    "synth mqar": ["synth", "mqar", "--out", "{out}"],
    "synth induction": ["synth", "induction", "--out", "{out}"],
    "synth selective-copy": ["synth", "selective-copy", "--out", "{out}"],
    "synth passkey": ["synth", "passkey", "--out", "{out}"],
    "compare": ["compare", "--out", "{out}"],
    "generate": ["generate", "--checkpoint", "{run}", "--prompt", "x"],
    "stages": ["stages", "{run}"],
}


@pytest.mark.parametrize("command", sorted(DEVICE_COMMANDS))
def test_an_unavailable_device_is_one_line_and_exit_code_2(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `train` without --out would make runs/ here
    run, out = _tiny_run(tmp_path), tmp_path / "out"
    argv = [a.format(run=run, out=out) for a in DEVICE_COMMANDS[command]] + ["--device", BAD_DEVICE]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"mmrec {command}: error: --device: ") and "available here: auto, cpu" in err, err
    assert not out.exists() and not (tmp_path / "runs").exists()  # nothing was created


def test_generate_reads_a_long_prompt_from_a_file_and_from_stdin(tmp_path, capsys, monkeypatch):
    run = _tiny_run(tmp_path)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(("To be, or not to be, that is the question. " * 24000)[: 1 << 20])  # 1 MiB
    common = ["generate", "--checkpoint", str(run), "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu"]
    assert main([*common, "--prompt-file", str(prompt)]) == 0
    from_file = capsys.readouterr().out
    # MM-Rec read the whole megabyte; greedy output is 3 byte tokens (incomplete UTF-8 is not printed).
    assert len(from_file.rstrip("\n").encode()) <= 3 * 4
    # Standard input gives what the same file gives (a shorter text: reading stdin is the point, not the length).
    short = tmp_path / "short.txt"
    short.write_text(prompt.read_text()[:4096])
    assert main([*common, "--prompt-file", str(short)]) == 0
    short_from_file = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(short.read_text()))
    assert main([*common, "--prompt", "-"]) == 0
    assert capsys.readouterr().out == short_from_file


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt", "x", "--prompt-file", "f"], "give exactly one of"),
        ([], "give exactly one of"),
        (["--prompt-file", "missing.txt"], "prompt_file: no such file"),
        (["--prompt", "x", "--top-p", "1.5"], "top_p"),
    ],
)
def test_generate_rejects_bad_prompts_clearly(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = _tiny_run(tmp_path)
    code = main(["generate", "--checkpoint", str(run), "--device", "cpu", *argv])
    assert code in (1, 2)
    assert message in capsys.readouterr().err


def test_generate_rejects_a_prompt_file_that_is_not_utf8(tmp_path, capsys):
    run = _tiny_run(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    code = main(["generate", "--checkpoint", str(run), "--prompt-file", str(tmp_path / "latin1.txt")])
    assert code == 1 and "not UTF-8" in capsys.readouterr().err


def test_compare_checks_its_data_before_creating_anything(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--out", str(out), "--data", str(tmp_path / "missing.txt"), "--device", "cpu"]) == 1
    assert "missing.txt" in capsys.readouterr().err
    assert not out.exists()


def test_help_shows_groups_choices_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for expected in (
        "model: MM-Rec:",
        "model: Transformer",
        "optimisation:",
        "{mmrec,transformer}",
        "{gpt,llama,mistral}",
    ):
        assert expected in text, expected
    assert "(default: 64)" in text  # chunk_size, from MMRecConfig
    assert "--d-mem" in text and "--conv-size" in text and "--decay-tau" in text


# mmrec.load --------------------------------------------------------------------------------------------------


def test_load_gives_the_saved_model_and_its_tokenizer(tmp_path):
    torch.manual_seed(0)
    model = build_model(MMRecConfig(**TINY)).eval()
    save_checkpoint(tmp_path / "run", model, ByteTokenizer(), kind="synth", step=7, trained_seq_len=40)
    ids = torch.randint(0, 257, (2, 45))
    for path in (tmp_path / "run", tmp_path / "run" / "step-000007"):
        loaded = mmrec.load(path)
        assert (loaded.step, loaded.trained_seq_len, loaded.arch) == (7, 40, "mmrec")
        assert loaded.model_config == model.config
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)
        assert loaded.tokenizer.encode("abc") == ByteTokenizer().encode("abc")


def test_load_a_transformer_and_refuse_what_is_not_a_checkpoint(tmp_path):
    config = TransformerConfig(preset="mistral", vocab_size=257, d_model=32, n_layers=1, n_heads=2, window=16)
    loaded = mmrec.load(_tiny_run(tmp_path, config))
    assert loaded.arch == "transformer-mistral" and loaded.model_config == config
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint of mmrec"):
        mmrec.load(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        mmrec.load(tmp_path / "nowhere")
    step = tmp_path / "run" / "step-000003"
    (step / "meta.json").write_text("{")
    with pytest.raises(CheckpointError, match="unreadable"):
        mmrec.load(step)


def test_load_reads_a_training_checkpoint_of_the_flat_config_format(tmp_path):
    """Checkpoints written before the model config was nested in the training config still load, matched
    baselines included (the old build rule is reproduced, so the weights fit)."""
    from mmrec.models.factory import resolve_model_config

    flat = {"arch": "transformer", "preset": "llama", "d_model": 32, "n_layers": 2, "n_heads": 2, "chunk_size": 8,
            "mem_slots": 4, "summary_window": 2, "decay_max": 0.999, "selective_write": False,
            "sparse_write": False, "window": None, "match_params": True, "seq_len": 32, "seq_len_schedule": "",
            "data": [], "tokenizer": "byte"}  # fmt: skip
    config = resolve_model_config("transformer", {k: flat[k] for k in ("d_model", "n_layers", "n_heads",
                                  "chunk_size", "mem_slots", "summary_window")}, vocab_size=257)  # fmt: skip
    run = _tiny_run(tmp_path, config)
    step = run / "step-000003"
    (step / "meta.json").write_text(json.dumps({"step": 3, "tokens": 384, "config": flat}))
    loaded = mmrec.load(run)
    assert loaded.model_config == config and loaded.trained_seq_len == 32 and loaded.config["seq_len"] == 32
