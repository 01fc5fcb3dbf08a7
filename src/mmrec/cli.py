"""The ``mmrec`` command line: one console script with subcommands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _demo(args: argparse.Namespace) -> int:
    from mmrec.demo import DemoOptions, run_demo

    run_demo(DemoOptions(tokens=args.tokens, window=args.window, seed=args.seed, generate=args.generate))
    return 0


def train_config_from_args(args: argparse.Namespace) -> object:
    from mmrec.cliargs import build_config, load_config_file
    from mmrec.train.config import TrainConfig

    file_values = load_config_file(args.config) if args.config else {}
    return build_config(TrainConfig, args, file_values)


def _train(args: argparse.Namespace) -> int:
    from mmrec.train.trainer import main_entry

    return main_entry(train_config_from_args(args))  # type: ignore[arg-type]


def _prepare(args: argparse.Namespace) -> int:
    from mmrec.data.prepare import prepare_dataset
    from mmrec.data.sources import parse_source, resolve_sources
    from mmrec.tokenizer import load_tokenizer

    specs = resolve_sources([parse_source(s) for s in (args.data or ["builtin"])])
    for spec in specs:
        spec.text_field = args.text_field
    tok = load_tokenizer(args.tokenizer)
    manifest = prepare_dataset(specs, tok, args.out, val_fraction=args.val_fraction)
    total_bytes = sum(s["train"]["n_bytes"] + s["val"]["n_bytes"] for s in manifest["sources"].values())
    seconds = max(manifest["prepare_seconds"], 1e-9)
    print(
        f"prepared {len(specs)} source(s) into {args.out}: {total_bytes / 1e6:,.1f} MB of text in "
        f"{seconds:.1f}s ({total_bytes / 1e6 / seconds:,.1f} MB/s)"
    )
    for name, src in manifest["sources"].items():
        train, val = src["train"], src["val"]
        print(
            f"  {name}: train {train['n_docs']:,} docs / {train['n_tokens']:,} tokens, "
            f"val {val['n_docs']:,} docs / {val['n_tokens']:,} tokens; skipped: {src.get('skipped', {})}"
        )
    return 0


def _tokenizer_train(args: argparse.Namespace) -> int:
    from mmrec.data.sources import SkipStats, iter_documents, parse_source, resolve_sources
    from mmrec.tokenizer import train_bpe

    specs = resolve_sources([parse_source(s) for s in (args.data or ["builtin"])])
    stats = SkipStats()

    def texts() -> object:
        seen = 0
        for spec in specs:
            spec.text_field = args.text_field
            for _, text in iter_documents(spec, stats):
                yield text
                seen += len(text.encode("utf-8", "surrogatepass"))
                if args.max_bytes and seen >= args.max_bytes:
                    return

    tok = train_bpe(texts(), vocab_size=args.vocab_size, min_frequency=args.min_frequency)  # type: ignore[arg-type]
    tok.save(args.out)
    print(
        f"trained a byte-level BPE tokenizer of {tok.vocab_size:,} tokens on {stats.documents:,} documents; "
        f"saved {args.out} (id {tok.id})"
    )
    return 0


def _eval_bpb(args: argparse.Namespace) -> int:
    from mmrec.evals.bpb import run

    run(
        args.checkpoint,
        args.data,
        args.out,
        cut=args.cut,
        window=args.window,
        max_docs=args.max_docs,
        max_tokens=args.max_tokens,
        device=args.device,
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from mmrec.compare import CompareOptions, run_compare

    overrides = {}
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    report = run_compare(
        CompareOptions(
            out=args.out,
            preset=args.preset,
            data=args.data or [],
            seed=args.seed,
            device=args.device,
            models=args.models,
            data_cache=args.data_cache,
            overrides=overrides,
        )
    )
    print(f"report: {report}")
    return 0


def _stages(args: argparse.Namespace) -> int:
    from mmrec.stages.finished_run import track_run

    data = track_run(args.run)
    for rec in data["stages"]:
        when = f"step {rec['step']} ({rec['tokens']:,} tokens)" if rec["reached"] else "not reached"
        print(f"stage {rec['id']} {rec['name']}: {when}")
    print(f"wrote {args.run}/stages.json and stages.png")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from mmrec.generate import run_generate

    run_generate(
        args.checkpoint,
        args.prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        args.device,
        args.state_in,
        args.state_out,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mmrec.cliargs import add_dataclass_arguments
    from mmrec.train.config import TrainConfig

    parser = argparse.ArgumentParser(
        prog="mmrec",
        description="MM-Rec: long-context language modelling with a dual memory.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    train = sub.add_parser(
        "train",
        help="train MM-Rec or a Transformer baseline (default: MM-Rec on the built-in corpus)",
        description="Train by next-token prediction. Options come from --config (YAML or JSON) and are "
        "overridden by flags; the merged config is saved as config.json in the run directory.",
    )
    train.add_argument("--config", default=None, help="YAML or JSON file of options (flags override it)")
    add_dataclass_arguments(train, TrainConfig)
    train.set_defaults(func=_train)

    data = sub.add_parser("data", help="prepare training data")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True
    prep = data_sub.add_parser("prepare", help="tokenize sources once into memory-mapped shards with a manifest")
    prep.add_argument("--data", action="append", help="source (repeatable); default: the built-in corpus")
    prep.add_argument("--out", required=True, help="output folder")
    prep.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json (default: byte)")
    prep.add_argument("--text-field", default="text", help="text field of JSONL/Parquet/HF sources")
    prep.add_argument("--val-fraction", type=float, default=0.02, help="validation share (default: 0.02)")
    prep.set_defaults(func=_prepare)

    tok = sub.add_parser("tokenizer", help="tokenizers")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    tok_sub.required = True
    tt = tok_sub.add_parser("train", help="train a byte-level BPE tokenizer locally (Hugging Face tokenizers)")
    tt.add_argument("--data", action="append", help="source (repeatable); default: the built-in corpus")
    tt.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (default: 8192)")
    tt.add_argument("--min-frequency", type=int, default=2, help="minimum pair frequency (default: 2)")
    tt.add_argument("--max-bytes", type=int, default=0, help="stop reading after this many bytes (0: all)")
    tt.add_argument("--text-field", default="text", help="text field of JSONL/Parquet/HF sources")
    tt.add_argument("--out", required=True, help="tokenizer.json to write")
    tt.set_defaults(func=_tokenizer_train)

    ev = sub.add_parser("eval", help="evaluate a trained model (long-context bits per byte, passkey, ...)")
    ev_sub = ev.add_subparsers(dest="eval_command", metavar="EVALUATION")
    ev_sub.required = True
    bpb = ev_sub.add_parser(
        "bpb",
        help="bits per byte by position bucket, full context vs context cut to 2K",
        description="Score documents with full context (MM-Rec streams them through its "
        "state; a Transformer uses a sliding window beyond its trained length) and with the "
        "context cut to --cut tokens; report bits per byte per position bucket.",
    )
    bpb.add_argument("--checkpoint", required=True, help="a run directory or step-NNNNNN directory of mmrec train")
    bpb.add_argument(
        "--data", action="append", help="text files/folders to score (default: the run's validation split)"
    )
    bpb.add_argument("--out", required=True, help="folder for results.json, results.md and the figure")
    bpb.add_argument(
        "--cut",
        type=int,
        default=None,
        help="tokens of context in the cut condition (default: min(2048, trained length))",
    )
    bpb.add_argument("--window", type=int, default=4096, help="MM-Rec streaming window (default 4096)")
    bpb.add_argument("--max-docs", type=int, default=None, help="score at most this many documents")
    bpb.add_argument("--max-tokens", type=int, default=None, help="truncate documents to this many tokens")
    bpb.add_argument("--device", default="auto", help="auto, cpu or cuda")
    bpb.set_defaults(func=_eval_bpb)
    from mmrec.evals.synth_cli import add_passkey_parser, add_synth_parser

    add_passkey_parser(ev_sub)
    add_synth_parser(sub)

    from mmrec.compare import MODELS, PRESETS

    cmp = sub.add_parser(
        "compare",
        help="train MM-Rec and GPT/LLaMA/Mistral-style baselines on the same data; write report.md and figures",
        description="Train MM-Rec and parameter-matched GPT-, LLaMA- and Mistral-style Transformers on the same "
        "data, tokens, curriculum and seed; track the learning stages; measure bits per byte by position, speed "
        "and memory against length; write report.md, figures and results.json to --out. Presets: "
        + "; ".join(f"{k}: {p.description}" for k, p in PRESETS.items())
        + ".",
    )
    cmp.add_argument("--preset", choices=list(PRESETS), default="micro", help="budget (default: micro)")
    cmp.add_argument("--out", required=True, help="output folder (one run directory per model inside)")
    cmp.add_argument("--data", action="append", help="training text as for mmrec train (default: built-in corpus)")
    cmp.add_argument(
        "--models",
        nargs="+",
        default=[m[0] for m in MODELS],
        choices=[m[0] for m in MODELS],
        help="models to compare (default: all four)",
    )
    cmp.add_argument("--seed", type=int, default=0, help="seed shared by every model (default: 0)")
    cmp.add_argument("--device", default="auto", help="auto, cpu or cuda")
    cmp.add_argument("--max-steps", type=int, default=None, help="override the preset's training steps")
    cmp.add_argument("--data-cache", default=None, help="folder for prepared token shards")
    cmp.set_defaults(func=_compare)

    gen = sub.add_parser(
        "generate",
        help="generate text from a checkpoint, streamed; sessions keep memory",
        description="Continue --prompt with a trained model, printing text as it is sampled. "
        "--state-out saves the model's state after the call and --state-in continues from it, "
        "so a session keeps its long-term memory without re-reading its history.",
    )
    gen.add_argument("--checkpoint", required=True, help="a run directory or step-NNNNNN directory of mmrec train")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    gen.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (default: 50)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: off)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    gen.add_argument("--device", default="auto", help="auto, cpu or cuda")
    gen.add_argument("--state-in", default=None, help="continue the session saved in this state file")
    gen.add_argument("--state-out", default=None, help="save the state after this call (safetensors)")
    gen.set_defaults(func=_generate)

    stg = sub.add_parser("stages", help="measure the learning stages over a finished training run")
    stg.add_argument("run", help="run directory of mmrec train")
    stg.set_defaults(func=_stages)

    demo = sub.add_parser("demo", help="stream the built-in text through a fresh MM-Rec; show constant state")
    demo.add_argument("--tokens", type=int, default=65536, help="tokens to stream (default: %(default)s)")
    demo.add_argument("--window", type=int, default=4096, help="tokens per forward call (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--generate", type=int, default=48, help="bytes to generate at the end (default: %(default)s)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from mmrec.config import ConfigError
    from mmrec.models.state import StateError
    from mmrec.utils.cpu import tune_glibc_malloc

    parser = build_parser()
    args = parser.parse_args(argv)
    tune_glibc_malloc()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ConfigError, StateError, FileNotFoundError, ValueError) as e:
        # DataError and tokenizer errors are ValueErrors with messages written for people.
        print(f"mmrec {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
