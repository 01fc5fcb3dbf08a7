"""``mmrec synth passkey``, ``mmrec synth passkey-data`` and ``mmrec eval passkey``.

``synth passkey`` trains a small model on short passkey prompts scored at the
key (:func:`mmrec.train.tasks.train_task`), saves it as a step directory in
its output folder, then grades the lengths x depths grid of ``eval passkey``;
``mmrec eval passkey --checkpoint OUT`` and ``mmrec.load(OUT)`` read it back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from mmrec.cli.commands import CHECKPOINT_HELP, DEVICE_HELP
from mmrec.cli.tasks import (
    HELD_OUT_BATCHES,
    LongContextOptions,
    TaskOptions,
    accuracy_text,
    at_least,
    check_out_folder,
    command,
    finite,
    held_out_evaluator,
    make_out,
    model_fields,
    plot_loss,
    setup,
)
from mmrec.config import ConfigError, _doc, _positive, _require
from mmrec.evals import passkey as pk
from mmrec.evals import passkey_report as pkr
from mmrec.evals import passkey_text as pkt
from mmrec.evals.common import write_results
from mmrec.models.checkpoint import load
from mmrec.models.factory import build_model
from mmrec.tokenizer import load_tokenizer
from mmrec.train.tasks import TaskOutput

GRID_LISTS = ("lengths", "depths")
TOKENIZER_HELP = "'byte' or a tokenizer.json."


def _tokenizer(spec: str) -> Any:
    try:
        return load_tokenizer(spec)
    except ValueError as e:
        raise ConfigError(f"tokenizer: {e}") from None


def _check_prompt_text(filler: Any, templates: Any, distractors: float) -> None:
    """The options that make a prompt's text (--filler, --templates, --distractors), checked alike by
    every command that builds prompts."""
    _check_filler(filler, "filler")
    _check_templates(templates, "templates")
    finite(distractors, "distractors", 0.0, strict=False)
    _require(
        distractors <= pkt.MAX_DISTRACTORS,
        "distractors",
        f"at most {pkt.MAX_DISTRACTORS:g} per 1,000 filler tokens, got {distractors:g}",
    )


def _check_filler(paths: list[str], name: str) -> None:
    """The filler's files exist (its text is read once the tokenizer is known)."""
    if paths:
        option = "--" + name.replace("_", "-")
        try:
            pkt.filler_files(paths, option)
        except ValueError as e:
            raise ConfigError(f"{name}: {str(e).removeprefix(option + ' ')}") from None


def _check_templates(names: list[str], name: str) -> None:
    try:
        pkt.key_templates(names)
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from None
    _require(len(set(names)) == len(names), name, f"name each template once, got {' '.join(names)}")


def _read_filler(tokenizer: Any, paths: list[str], option: str) -> list[int] | None:
    return pkt.read_filler(tokenizer, paths, option) if paths else None


FILLER_HELP = (
    "Text files, folders (read recursively) or quoted globs to use as filler instead of the five sentences: "
    "their words joined in path order, cycled from a place chosen per prompt; the text's own digits are kept."
)
TEMPLATES_HELP = (
    f"Phrasings of the key line and its question, one drawn per prompt: {', '.join(pkt.KEY_TEMPLATES)} "
    "(passkey is the classic 'The pass key is N. Remember it. N is the pass key.')."
)


@dataclass
class PasskeyGridOptions(LongContextOptions):
    """The lengths x depths grid of passkey prompts and how each is read (`eval passkey`, `synth passkey`)."""

    lengths: list[int] = _doc(
        "Prompt lengths in tokens.", default_factory=lambda: [1024, 4096, 16384, 65536], group="passkey grid"
    )
    depths: list[float] = _doc(
        "Depths of the key: 0 = start, 1 = just before the question.",
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        group="passkey grid",
    )
    trials: int = _doc("Random keys per cell.", default=5, group="passkey grid")
    vary_filler: bool = _doc(
        "Shuffle the test filler's sentences (seeded by --seed; each trial its own order).",
        default=False,
        group="passkey grid",
    )
    filler: list[str] = _doc(
        FILLER_HELP + " synth passkey: training's, and the grid's unless --eval-filler.",
        default_factory=list,
        group="passkey grid",
    )
    templates: list[str] = _doc(
        TEMPLATES_HELP + " synth passkey: training's, and the grid's unless --eval-templates.",
        default_factory=lambda: list(pkt.DEFAULT_TEMPLATES),
        group="passkey grid",
    )
    distractors: float = _doc(
        "Numbers of the key's format (5 digits) inserted between the filler's words, per 1,000 filler tokens, "
        "never equal to the key: the key must be found by its phrasing, not as the only number (synth passkey: "
        "in training and in the grid).",
        default=0.0,
        group="passkey grid",
    )

    def check_grid(self) -> None:
        _require(bool(self.lengths), "lengths", "give at least one length")
        at_least(self.lengths, "lengths", 64)
        _require(bool(self.depths), "depths", "give at least one depth")
        for d in self.depths:
            _require(0.0 <= d <= 1.0, "depths", f"must be between 0 and 1, got {d}")
        _positive(self, "trials")
        self.check_long_context()
        _check_prompt_text(self.filler, self.templates, self.distractors)

    def grade(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        device: torch.device,
        trained_len: int,
        seed: int,
        filler: Any,
        templates: list[str],
    ) -> dict[str, Any]:
        return pk.evaluate_passkey(
            model,
            tokenizer,
            self.lengths,
            self.depths,
            self.trials,
            device,
            self.max_memory_bytes,
            self.stream_window,
            trained_len=trained_len,
            beyond=self.transformer_context,
            seed=seed,  # the keys of `mmrec eval passkey --seed` with the same seed: it reproduces a synth grid
            filler_seed=seed if self.vary_filler or filler else None,
            filler_tokens=filler,
            templates=templates,
            distractors=self.distractors,
        )


# mmrec synth passkey -------------------------------------------------------------------------------------------


@dataclass
class SynthPasskeyOptions(TaskOptions, PasskeyGridOptions):
    PRESET: ClassVar[dict[str, Any]] = {"d_model": 128, "n_layers": 2, "n_heads": 2}

    train_len: list[int] = _doc(
        "Training prompt length, or MIN MAX: each batch draws one length uniformly.",
        default_factory=lambda: [128, 384],
        group="task",
    )
    score_repeat: bool = _doc(
        "Score the key's repeat inside the pass key line as well as the answer.", default=True, group="task"
    )
    tokenizer: str = _doc(TOKENIZER_HELP, default="byte", group="task")
    lengths: list[int] = _doc(
        "Prompt lengths in tokens.",
        default_factory=lambda: [256, 1024, 4096, 16384, 65536],
        group="passkey grid",
    )
    trials: int = _doc("Random keys per cell.", default=8, group="passkey grid")
    eval_filler: list[str] = _doc(
        "Filler of the held-out batches and the grid (files, folders, globs), instead of --filler: a test on "
        "text never trained on. Refused when it shares a file, or a run of "
        f"{pkt.SHARED_WORDS} words, with --filler.",
        default_factory=list,
        group="passkey grid",
    )
    eval_templates: list[str] = _doc(
        "Templates of the held-out batches and the grid, instead of --templates; those not in --templates are "
        "held out, so the result says whether retrieval carries over to a phrasing never trained on.",
        default_factory=list,
        group="passkey grid",
    )
    tok: Any = field(default=None, init=False, repr=False)
    # What the filler check found: {"train_files": n, "eval_files": m, "shared_words": k}, or None without one.
    filler_check: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        TaskOptions.__post_init__(self)
        self.check_grid()
        _require(
            len(self.train_len) in (1, 2), "train_len", f"takes one length or MIN MAX, got {len(self.train_len)} values"
        )
        _require(self.lo <= self.hi, "train_len", f"{self.lo} {self.hi}: MIN must not exceed MAX")
        _check_filler(self.eval_filler, "eval_filler")
        if self.eval_templates:
            _check_templates(self.eval_templates, "eval_templates")
        if self.filler and self.eval_filler:
            try:  # before any model or folder exists: a test on training text is refused in a second
                self.filler_check = pkt.check_disjoint_fillers(self.filler, self.eval_filler)
            except ValueError as e:
                raise ConfigError(f"eval_filler: {str(e).removeprefix('--eval-filler: ')}") from None
        self.tok = _tokenizer(self.tokenizer)
        try:  # one prompt of each side at the shortest training length: bad settings fail as options
            for templates in (self.templates, self.test_templates):
                g = torch.Generator().manual_seed(0)
                pk.passkey_batch(self.tok, 1, self.lo, g, templates=templates, distractors=self.distractors)
            pk.check_prompt_lengths(self.tok, self.lengths, self.test_templates)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.model = self.resolve_model(self.tok.vocab_size, self.hi)

    @property
    def test_templates(self) -> list[str]:
        """The templates of the held-out batches and the grid."""
        return self.eval_templates or self.templates

    @property
    def lo(self) -> int:
        return self.train_len[0]

    @property
    def hi(self) -> int:
        return self.train_len[-1]


def run_synth_passkey(opts: SynthPasskeyOptions) -> int:
    device = setup(opts)
    tokenizer, lo, hi = opts.tok, opts.lo, opts.hi
    filler = _read_filler(tokenizer, opts.filler, "--filler")
    test_filler = _read_filler(tokenizer, opts.eval_filler, "--eval-filler") if opts.eval_filler else filler
    span = f"{lo}" if lo == hi else f"{lo}-{hi}"

    def batches(filler_tokens: list[int] | None, templates: list[str]) -> Any:
        def make_batch(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            # One length per batch, uniform in [lo, hi]: every row of a batch is a prompt of the same length.
            length = lo if lo == hi else int(torch.randint(lo, hi + 1, (1,), generator=g))
            return pk.passkey_batch(
                tokenizer,
                b,
                length,
                g,
                score_repeat=opts.score_repeat,
                filler_tokens=filler_tokens,
                templates=templates,
                distractors=opts.distractors,
            )

        return make_batch

    make_batch = batches(filler, opts.templates)
    assert opts.model is not None
    model = build_model(opts.model).to(device)
    out = make_out(opts.out)
    fields = model_fields(opts, model, device)
    print(
        f"passkey: {fields['arch']}, {fields['params']:,} parameters; training {opts.steps} steps of "
        f"{opts.batch_size} prompts of {span} tokens on {device}, scored at the key only",
        flush=True,
    )
    # The model and tokenizer are saved as a step directory before the held-out evaluation and the grid, so a
    # long grid that is cut short loses no training; `mmrec eval passkey --checkpoint OUT` grades them again.
    # Held out: prompts of other keys, depths and filler places (the evaluation stream of the seed), read from
    # the evaluation's filler and templates.
    evaluate, held_out = held_out_evaluator(
        batches(test_filler, opts.test_templates), HELD_OUT_BATCHES, opts.batch_size, device, opts.seed
    )
    trained = opts.train(model, make_batch, device, evaluate, TaskOutput(out, hi, tokenizer, opts.settings("passkey")))
    accuracy = held_out[-1].accuracy
    print(f"held-out accuracy at the key's tokens ({span}-token prompts): {accuracy_text(accuracy)}", flush=True)
    base = {
        "task": "passkey",
        **fields,
        "tokenizer": opts.tokenizer,
        "train_len": [lo, hi],
        "score_repeat": opts.score_repeat,
        "filler": opts.filler,
        **protocol(
            opts.filler, opts.eval_filler or opts.filler, opts.filler_check, opts.templates, opts.test_templates
        ),
        "steps": trained["steps"],
        "batch_size": opts.batch_size,
        "lr": opts.lr,
        "train_seconds": round(trained["train_seconds"], 3),
        "train_accuracy": accuracy,
        "checkpoint": str(trained["checkpoint"]),
        "loss_history": trained["history"],
    }
    write_results(out, base, "Training finished; the passkey grid is still running or was interrupted.\n")
    grid = opts.grade(model, tokenizer, device, hi, opts.seed, test_filler, opts.test_templates)
    results = {**base, **{k: v for k, v in grid.items() if k != "arch"}}
    filler_name = " ".join(opts.filler) or "the five sentences, shuffled"
    table = pkr.passkey_table(results) + (
        f"\nTrained {trained['steps']} steps on prompts of {span} tokens (filler: {filler_name}), scored at the "
        f"key{' and its repeat in the needle' if opts.score_repeat else ''}; held-out accuracy at the scored tokens "
        f"{accuracy_text(accuracy)}.\n"
    )
    write_results(out, results, table)
    png = pkr.plot_passkey_heatmap(results, out / "heatmap.png")
    plot_loss(out, trained["history"], f"passkey training loss ({fields['arch']})")
    print(table)
    wrote = [out / "results.json", out / "results.md", *([png] if png else []), trained["checkpoint"]]
    print("wrote " + ", ".join(map(str, wrote)))
    return 0


def protocol(
    train_filler: list[str] | None,
    eval_filler: list[str],
    check: dict[str, Any] | None,
    train_templates: list[str] | None,
    eval_templates: list[str],
) -> dict[str, Any]:
    """What results.json says about how the test differs from training (None: training's side is unknown).

    Beside ``filler``, the command's own flag (synth passkey: training's; eval passkey: the grid's).

    ``filler_held_out``: True when the test filler shares no text with training's (files checked by
    :func:`mmrec.evals.passkey_text.check_disjoint_fillers`, or the five sentences on one side and files on the
    other), False when both read the same text, None when the training filler is not known.
    """
    held_out: bool | None
    if train_filler is None:
        held_out = None
    elif bool(train_filler) != bool(eval_filler):
        held_out = True
    elif not eval_filler:
        held_out = False
    else:
        held_out = check is not None
    return {
        "train_filler": train_filler,
        "eval_filler": eval_filler,
        "filler_held_out": held_out,
        "filler_check": check,
        "train_templates": train_templates,
        "eval_templates": eval_templates,
        "held_out_templates": None
        if train_templates is None
        else [t for t in eval_templates if t not in train_templates],
    }


# mmrec synth passkey-data --------------------------------------------------------------------------------------


@dataclass
class PasskeyDataOptions:
    out: str = _doc("JSONL file to write (its folder is created).", default="")
    n: int = _doc("Documents.", default=2000)
    min_len: int = _doc("Shortest document, tokens.", default=512)
    max_len: int = _doc("Longest document, tokens.", default=4096)
    tokenizer: str = _doc(TOKENIZER_HELP + " Lengths count its tokens.", default="byte")
    seed: int = _doc("Seed.", default=0)
    filler: list[str] = _doc(FILLER_HELP, default_factory=list)
    templates: list[str] = _doc(TEMPLATES_HELP, default_factory=lambda: list(pkt.DEFAULT_TEMPLATES))
    distractors: float = _doc(
        "Numbers of the key's format inserted between the filler's words, per 1,000 filler tokens.", default=0.0
    )
    tok: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        _require(bool(self.out), "out", "give the .jsonl file to write")
        _check_prompt_text(self.filler, self.templates, self.distractors)
        _require(not Path(self.out).is_dir(), "out", f"{self.out} is a folder; give the .jsonl file to write")
        _positive(self, "n", "min_len", "max_len")
        _require(self.min_len <= self.max_len, "min_len", f"{self.min_len} must not exceed max_len {self.max_len}")
        self.tok = _tokenizer(self.tokenizer)
        shortest = pk.min_prompt_tokens(self.tok, self.templates)
        _require(
            self.min_len >= shortest,
            "min_len",
            f"{self.min_len} is too short: the pass key line and question alone take ~{shortest} tokens",
        )


def run_passkey_data(opts: PasskeyDataOptions) -> int:
    t0 = time.perf_counter()
    docs = pk.passkey_documents(
        opts.tok,
        opts.n,
        opts.min_len,
        opts.max_len,
        opts.seed,
        filler_tokens=_read_filler(opts.tok, opts.filler, "--filler"),
        templates=opts.templates,
        distractors=opts.distractors,
    )
    count = pk.write_passkey_documents(opts.out, docs)
    print(
        f"wrote {count:,} passkey documents of {opts.min_len}-{opts.max_len} tokens to {opts.out} "
        f"in {time.perf_counter() - t0:.1f}s; mix them into training with "
        f"`mmrec train --data passkey={opts.out}:0.3 ...`"
    )
    return 0


# mmrec eval passkey --------------------------------------------------------------------------------------------


@dataclass
class EvalPasskeyOptions(PasskeyGridOptions):
    checkpoint: str = _doc(CHECKPOINT_HELP.rstrip(".") + "; of `mmrec synth passkey`, its --out folder.", default="")
    out: str = _doc("Folder for results.json, results.md and the heatmap (created).", default="")
    seed: int = _doc("Seed of the keys (and of the filler's order).", default=0, group="execution")
    device: str = _doc(DEVICE_HELP, default="auto", group="execution")
    threads: int | None = _doc("CPU threads for PyTorch (default: all cores).", default=None, group="execution")
    allow_seen_filler: bool = _doc(
        "Grade with a --filler that shares files or text with the checkpoint's training filler (the result is then "
        "not a held-out one); without it that is refused.",
        default=False,
        group="passkey grid",
    )

    def __post_init__(self) -> None:
        _require(bool(self.checkpoint), "checkpoint", "give a run or step directory")
        check_out_folder(self.out)
        self.check_grid()
        if self.threads is not None:
            _positive(self, "threads")


def training_side(config: dict[str, Any]) -> tuple[list[str] | None, list[str] | None]:
    """(filler, templates) a checkpoint of `mmrec synth passkey` was trained on; None for what is not known."""
    if config.get("task") != "passkey":
        return None, None
    filler = config.get("filler") or []
    return ([filler] if isinstance(filler, str) else list(filler)), list(
        config.get("templates") or pkt.DEFAULT_TEMPLATES
    )


def check_seen_filler(opts: EvalPasskeyOptions, train_filler: list[str] | None) -> tuple[list[str] | None, Any]:
    """(training filler as known, what the check found): a ValueError for a --filler the model trained on.

    A training filler whose files are no longer there (its paths are those of the training run) cannot be
    checked: it is reported unknown, with a note.
    """
    if not opts.filler or not train_filler:
        return train_filler, None
    try:
        pkt.filler_files(train_filler, "training filler")
    except ValueError as e:
        print(f"note: the training filler cannot be read ({e}), so --filler is not checked against it")
        return None, None
    try:
        return train_filler, pkt.check_disjoint_fillers(train_filler, opts.filler, option="--filler")
    except ValueError as e:
        if opts.allow_seen_filler:
            print(f"note: {e}; graded anyway (--allow-seen-filler), so this is not a held-out result")
            return train_filler, None
        raise ValueError(
            f"{e} (the checkpoint was trained on --filler {' '.join(train_filler)}); add --allow-seen-filler to "
            "grade on it anyway (not a held-out result)"
        ) from None


def run_eval_passkey(opts: EvalPasskeyOptions) -> int:
    device = setup(opts)
    loaded = load(opts.checkpoint, device)
    model, tokenizer, trained_len = loaded.model, loaded.tokenizer, loaded.trained_seq_len
    print(f"passkey: {loaded.arch} from {loaded.path} (step {loaded.step}, trained on {trained_len})")
    # Checked before the output folder exists: the shortest prompt depends on the checkpoint's tokenizer.
    pk.check_prompt_lengths(tokenizer, opts.lengths, opts.templates)
    train_filler, train_templates = training_side(loaded.config)
    train_filler, check = check_seen_filler(opts, train_filler)
    filler = _read_filler(tokenizer, opts.filler, "--filler")
    make_out(opts.out)
    results = opts.grade(model, tokenizer, device, trained_len, opts.seed, filler, opts.templates)
    results.update({"checkpoint": str(loaded.path), "step": loaded.step, "device": str(device), "filler": opts.filler})
    results.update(protocol(train_filler, opts.filler, check, train_templates, opts.templates))
    table = pkr.passkey_table(results)
    out = write_results(opts.out, results, table)
    png = pkr.plot_passkey_heatmap(results, out / "heatmap.png")
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}" + (f" and {png}" if png else ""))
    return 0


SYNTH_PASSKEY = command(
    "passkey",
    SynthPasskeyOptions,
    run_synth_passkey,
    help="passkey retrieval: train on short prompts scored at the key, then grade lengths x depths",
    description="Train a small model on passkey prompts of --train-len tokens (random key, depth and filler "
    "order; the loss is taken at the key only), then grade exact match and digit likelihood on the "
    "lengths x depths grid of `mmrec eval passkey`. The model is saved (a step directory in --out) before the "
    "grid: `mmrec eval passkey --checkpoint OUT` grades it again at other lengths, `mmrec.load(OUT)` loads it. "
    "Model: width 128, 2 layers, 2 heads unless the flags say otherwise.",
)
PASSKEY_DATA = command(
    "passkey-data",
    PasskeyDataOptions,
    run_passkey_data,
    help="write passkey-style training documents (JSONL) to mix into `mmrec train`",
    description="Documents in the passkey layout, answer included, of random length, depth and key. Mix them "
    "into training at short length: mmrec train --data passkey=FILE.jsonl:0.3",
    with_model=False,
)
EVAL_PASSKEY = command(
    "passkey",
    EvalPasskeyOptions,
    run_eval_passkey,
    help="passkey retrieval: exact match and digit likelihood over lengths x depths",
    description="Hide a random 5-digit key at each depth of filler prompts of each length and ask for it. "
    "MM-Rec streams the prompt in windows with constant memory; a Transformer uses its KV cache within "
    "--max-memory-gb and a sliding window of its trained length beyond it.",
    with_model=False,
    required=("checkpoint", "out"),
)
