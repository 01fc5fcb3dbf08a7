"""Hugging Face adapter and lm-eval model, measured (issue 14). Prints what it measured; asserts nothing.

    python benchmarks/bench_hf.py check --checkpoint RUN [--baseline LLAMA_RUN]
    python benchmarks/bench_hf.py speed --checkpoint RUN [--new-tokens 256]
    python benchmarks/bench_hf.py rolling --checkpoint RUN --lengths 10000 1000000 [--bpb-check]

check:   export, then the equalities of the issue on a trained run: logits of
         AutoModelForCausalLM.from_pretrained(export) against mmrec.load(run); greedy generate against
         `mmrec generate --temperature 0`; generate continued from the returned cache against one call;
         save/load round trip; a baseline's native export (LlamaForCausalLM) loaded without mmrec.
speed:   greedy tokens/s of transformers' generate on the export against MMRecLM.generate (the call that
         `mmrec generate` makes), the same prompt and number of new tokens, end of text disabled;
         median of --repeats, the two interleaved.
rolling: peak resident memory of lm-eval's loglikelihood_rolling on one document of each length, each in a
         fresh process (ru_maxrss); with --bpb-check also `mmrec eval bpb` on the same text and its total
         nats against the rolling total (prefix_token=none, the convention of eval bpb).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def _mmrec_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mmrec", *args], check=True, capture_output=True, text=True, cwd=ROOT)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def check(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mmrec
    from mmrec.hf.export import export_hf

    work = Path(tempfile.mkdtemp(prefix="bench-hf-"))
    out = export_hf(args.checkpoint, work / "export")
    print(f"exported {args.checkpoint} -> {out}: {sorted(p.name for p in out.iterdir())}")
    loaded = mmrec.load(args.checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    text = args.text.read_text(encoding="utf-8")[: args.chars] if args.text else "To be, or not to be " * 60
    ids = torch.tensor([loaded.tokenizer.encode(text)])
    assert tok(text, return_tensors="pt").input_ids.tolist() == ids.tolist(), "AutoTokenizer ids differ"
    with torch.no_grad():
        ours, theirs = loaded.model(ids).logits, hf(ids).logits
    print(
        f"logits, {ids.size(1)} tokens: max |diff| {float((ours - theirs).abs().max()):.3g}, "
        f"relative {_rel(theirs, ours):.3g}, bitwise equal {torch.equal(ours, theirs)}"
    )
    prompt = "ROMEO:\n"
    argv = ["generate", "--checkpoint", args.checkpoint, "--prompt", prompt, "--max-new-tokens", "200"]
    # The command prints the text, then one newline.
    cli = _mmrec_cli(*argv, "--temperature", "0", "--device", "cpu").stdout.removesuffix("\n")
    p_ids = tok(prompt, return_tensors="pt").input_ids
    gen = hf.generate(p_ids, max_new_tokens=200, do_sample=False)
    hf_text = tok.decode(gen[0, p_ids.size(1) :], skip_special_tokens=True)
    print(f"greedy, 200 new tokens: transformers == `mmrec generate --temperature 0`: {hf_text == cli}")
    first = hf.generate(p_ids, max_new_tokens=80, min_new_tokens=80, do_sample=False, return_dict_in_generate=True)
    more = hf.generate(first.sequences, cache=first.cache, max_new_tokens=120, min_new_tokens=120, do_sample=False)
    whole = hf.generate(p_ids, max_new_tokens=200, min_new_tokens=200, do_sample=False)
    print(f"80 tokens, then 120 from the returned cache == 200 in one call: {more.tolist() == whole.tolist()}")
    hf.save_pretrained(work / "again")
    back = AutoModelForCausalLM.from_pretrained(work / "again")
    same_w = all(torch.equal(a, b) for a, b in zip(hf.state_dict().values(), back.state_dict().values(), strict=True))
    with torch.no_grad():
        same_l = torch.equal(hf(ids).logits, back(ids).logits)
    print(f"save_pretrained / from_pretrained: weights bitwise equal {same_w}, logits bitwise equal {same_l}")
    if args.baseline:
        base = export_hf(args.baseline, work / "baseline")
        torch.save(ids, work / "ids.pt")
        code = (
            "import sys; sys.modules['mmrec'] = None\n"
            "import torch; from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(base)!r})\n"
            f"ids = torch.load({str(work / 'ids.pt')!r})\n"
            f"torch.save(m(ids).logits.detach(), {str(work / 'base.pt')!r}); print(type(m).__name__)\n"
        )
        name = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
        with torch.no_grad():
            ref = mmrec.load(args.baseline).model(ids).logits
        got = torch.load(work / "base.pt")
        print(
            f"baseline {args.baseline} as {name}, loaded without mmrec: max |diff| "
            f"{float((got - ref).abs().max()):.3g}, relative {_rel(got, ref):.3g}"
        )


def speed(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    import mmrec
    from mmrec.hf.export import export_hf

    torch.set_num_threads(args.threads)
    loaded = mmrec.load(args.checkpoint)
    work = Path(tempfile.mkdtemp(prefix="bench-hf-"))
    hf = AutoModelForCausalLM.from_pretrained(export_hf(args.checkpoint, work / "export"))
    hf.generation_config.eos_token_id = None  # exactly --new-tokens, as the mmrec call below
    model = loaded.model
    prompt = torch.randint(0, 256, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens

    def ours() -> torch.Tensor:
        return model.generate(prompt, n, temperature=0.0)

    def theirs() -> torch.Tensor:
        return hf.generate(prompt, max_new_tokens=n, do_sample=False)

    assert ours().tolist() == theirs().tolist(), "greedy tokens differ"
    # Time inside the model (hidden states and head), so that the loop around it (sampling, bookkeeping, the
    # wrapper) can be told apart from the model: the loop's share is what a busy machine blurs least.
    inside = {"mmrec": [0.0], "transformers": [0.0]}
    for name, lm in (("mmrec", model), ("transformers", hf.model)):  # both paths end in these two calls
        lm.hidden_states = _timed(lm.hidden_states, inside[name])
        lm.lm_head = _timed(lm.lm_head, inside[name])
    wall: dict[str, list[float]] = {"mmrec": [], "transformers": []}
    loop: dict[str, list[float]] = {"mmrec": [], "transformers": []}
    with torch.no_grad():
        for _ in range(args.repeats):  # interleaved, so that a busy moment of the machine hits both
            for name, fn in (("mmrec", ours), ("transformers", theirs)):
                inside[name][0] = 0.0
                t = time.perf_counter()
                fn()
                wall[name].append(time.perf_counter() - t)
                loop[name].append(wall[name][-1] - inside[name][0])
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{loaded.arch}, {params:,} parameters, {torch.get_num_threads()} thread(s), torch {torch.__version__}; "
        f"prompt {args.prompt_tokens} tokens, {n} new, greedy, {args.repeats} runs each, interleaved\n"
    )
    print("| path | tokens/s (best run) | ms/token, best | ms/token, median | outside the model, ms/token |")
    print("|---|---|---|---|---|")
    for name, label in (("mmrec", "MMRecLM.generate (`mmrec generate`)"), ("transformers", "transformers generate")):
        best, mid = min(wall[name]), statistics.median(wall[name])
        print(
            f"| {label} | {n / best:.1f} | {1000 * best / n:.2f} | {1000 * mid / n:.2f} | "
            f"{1000 * statistics.median(loop[name]) / n:.3f} |"
        )
    best = min(wall["transformers"]) / min(wall["mmrec"])
    mid = statistics.median(wall["transformers"]) / statistics.median(wall["mmrec"])
    extra = (statistics.median(loop["transformers"]) - statistics.median(loop["mmrec"])) / n
    model_ms = min(w - lp for w, lp in zip(wall["mmrec"], loop["mmrec"], strict=True)) / n
    print(
        f"\ntransformers / mmrec time per token: best runs {best:.3f}, medians {mid:.3f}; transformers' loop costs "
        f"{1000 * extra:.3f} ms/token more than mmrec's, {extra / model_ms:.1%} of the model's best "
        f"{1000 * model_ms:.2f} ms/token"
    )
    print("raw wall seconds:", json.dumps({k: [round(t, 3) for t in v] for k, v in wall.items()}))


def _timed(fn: Any, total: list[float]) -> Any:
    @functools.wraps(fn)  # keeps the signature, which generate inspects
    def call(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - t

    return call


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rolling_child(args: argparse.Namespace) -> None:
    """One document through MMRecEvalLM.loglikelihood_rolling in this (fresh) process; prints JSON."""
    torch.set_num_threads(args.threads)
    from lm_eval.api.instance import Instance

    from mmrec.evals.lm_harness import MMRecEvalLM

    lm = MMRecEvalLM(checkpoint=args.checkpoint, prefix_token=args.prefix, stream_window=args.window)
    text = Path(args.doc).read_text(encoding="utf-8")
    before = _rss_mb()
    t = time.perf_counter()
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = len(lm.tok_encode(text))
    result = {"tokens": tokens, "logprob": total, "seconds": seconds, "rss_before_mb": before, "peak_mb": peak}
    print(json.dumps(result))


def _document(source: Path | None, tokens: int) -> str:
    """ASCII text of exactly ``tokens`` bytes (byte tokenizer: tokens), Shakespeare or the stdlib repeated."""
    if source is not None:
        files = sorted(source.glob("*.txt")) if source.is_dir() else [source]
        parts = [f.read_text(encoding="utf-8", errors="ignore") for f in files]
    else:
        from mmrec.data.builtin import builtin_documents

        parts = [t for _, t in zip(range(400), (text for _, text in builtin_documents()), strict=False)]
    base = "\n".join(parts).encode("ascii", errors="ignore")
    data = (base * (tokens // max(len(base), 1) + 1))[:tokens]
    return data.decode("ascii")


def rolling(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-rolling-"))
    print(f"MMRecEvalLM.loglikelihood_rolling, one document, stream window {args.window}, {args.threads} thread(s)\n")
    rows = []
    for n in args.lengths:
        doc = work / f"doc-{n}.txt"
        doc.write_text(_document(args.text, n), encoding="utf-8")
        cmd = [sys.executable, __file__, "_rolling_child", "--checkpoint", args.checkpoint, "--doc", str(doc)]
        cmd += ["--window", str(args.window), "--threads", str(args.threads)]
        res = json.loads(subprocess.run(cmd + ["--prefix", "eot"], check=True, capture_output=True, text=True).stdout)
        rows.append(res)
        print(
            f"{res['tokens']:>9,} tokens: peak RSS {res['peak_mb']:.1f} MB (before scoring {res['rss_before_mb']:.1f}"
            f" MB), {res['seconds']:.1f} s ({res['tokens'] / res['seconds']:,.0f} tokens/s), "
            f"log-likelihood {res['logprob']:.2f}"
        )
        if args.bpb_check:
            none = json.loads(
                subprocess.run(cmd + ["--prefix", "none"], check=True, capture_output=True, text=True).stdout
            )
            bpb_out = work / f"bpb-{n}"
            bpb_argv = ["eval", "bpb", "--checkpoint", args.checkpoint, "--data", str(doc), "--out", str(bpb_out)]
            _mmrec_cli(*bpb_argv, "--stream-window", str(args.window), "--device", "cpu")
            result = json.loads((bpb_out / "results.json").read_text())
            scored_bytes = n - 1  # every token but the first, one byte each
            nats = result["overall_full_bpb"] * math.log(2) * scored_bytes
            print(
                f"           `mmrec eval bpb` on the same text: {nats:.6f} nats; rolling (prefix_token=none): "
                f"{-none['logprob']:.6f}; relative difference {abs(nats + none['logprob']) / nats:.2e}"
            )
    if len(rows) > 1:
        print(f"\npeak RSS, longest / shortest document: {rows[-1]['peak_mb'] / rows[0]['peak_mb']:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("check")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--baseline", default=None, help="a llama- or mistral-style run to export natively")
    c.add_argument("--text", type=Path, default=None, help="text whose logits to compare")
    c.add_argument("--chars", type=int, default=2000)
    s = sub.add_parser("speed")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--prompt-tokens", type=int, default=64)
    s.add_argument("--new-tokens", type=int, default=256)
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--threads", type=int, default=1)
    r = sub.add_parser("rolling")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--lengths", type=int, nargs="+", default=[10_000, 1_000_000])
    r.add_argument("--text", type=Path, default=None, help="file or folder of .txt (default: the built-in corpus)")
    r.add_argument("--window", type=int, default=4096)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--bpb-check", action="store_true")
    child = sub.add_parser("_rolling_child")
    child.add_argument("--checkpoint", required=True)
    child.add_argument("--doc", required=True)
    child.add_argument("--prefix", default="eot")
    child.add_argument("--window", type=int, default=4096)
    child.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    {"check": check, "speed": speed, "rolling": rolling, "_rolling_child": rolling_child}[args.what](args)


if __name__ == "__main__":
    main()
