"""Serving speed of ``mmrec serve``: MM-Rec against the parameter-matched LLaMA-style Transformer, with
1, 4 and 16 concurrent streaming clients, at session contexts of 1K and 32K tokens.

    python benchmarks/bench_serve.py                                       # the issue's grid
    python benchmarks/bench_serve.py --contexts 256 1024 --clients 1 4 --tokens 16 --json quick.json

For each model a random-init checkpoint (the default 5.2M ``MMRecConfig()``, or the LLaMA-style
Transformer of ``matched_transformer_config`` at the same width and depth; byte tokenizer; only printable
ASCII can win the greedy choice, so every token is one streamed chunk and no stream ends early) is served
by a real ``python -m mmrec serve`` process. For each context C, one session is filled through the server
(a completion of a C-token prompt with the session id and max_tokens=1: C + 1 tokens consumed). For each
K in ``--clients``, K copies of it are made (with the server's own SessionStore on the same folder, while
the server is idle; ``--fill-each`` fills every one through the server instead, which costs K prefills),
so that all K streams stand at the same context (the row measures one context). Then K clients
(one asyncio httpx client, one connection each) continue them at once, each streaming ``--tokens`` greedy
tokens from a one-character prompt; the copies are deleted afterwards.

Reported per row: aggregate decode tokens/s (every token but each client's first, over the span from the
first client's first token to the last token of any), p50 / p99 of the time between consecutive tokens
as the clients saw them, the median time to first token (loading the session and feeding the prompt),
the speedup of K clients over one, the bytes of a session's state (GET /v1/sessions/ID; fixed for
MM-Rec, a KV cache growing with C for the Transformer), and beside the one-client rows the model's own
time per decoding step of one stream at that context in this process, no server (median over
``--tokens`` steps, measured while the server idles): what the server adds is the difference. Nothing
is asserted: machines are shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_serve import KEY, MODEL, ServerProcess, write_checkpoint  # noqa: E402

HEADERS = {"Authorization": f"Bearer {KEY}"}
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
]


def context_text(tokens: int, seed: int) -> str:
    """``tokens`` characters of ASCII words (the byte tokenizer makes one token of each)."""
    rng = random.Random(seed)
    text = ""
    while len(text) < tokens:
        text += rng.choice(WORDS) + " "
    return text[:tokens]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def prefill(client: httpx.AsyncClient, session: str, text: str) -> float:
    start = time.perf_counter()
    body = {"model": MODEL, "prompt": text, "max_tokens": 1, "temperature": 0, "session": session}
    r = await client.post("/v1/completions", json=body, headers=HEADERS)
    r.raise_for_status()
    return time.perf_counter() - start


async def stream(client: httpx.AsyncClient, session: str, tokens: int) -> dict[str, Any]:
    """One streamed greedy continuation of ``session``: when each token arrived and what usage said."""
    body = {
        "model": MODEL,
        "prompt": " ",
        "max_tokens": tokens,
        "temperature": 0,
        "session": session,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    arrivals: list[float] = []
    usage: dict[str, Any] = {}
    finish = None
    async with client.stream("POST", "/v1/completions", json=body, headers=HEADERS) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"the stream of {session} failed: {event['error']}")
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                if choice.get("text"):
                    arrivals.append(time.perf_counter())
                finish = choice.get("finish_reason") or finish
    return {"start": start, "arrivals": arrivals, "usage": usage, "finish": finish}


async def trial(url: str, sessions: list[str], tokens: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=len(sessions) + 2)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        runs = await asyncio.gather(*(stream(client, s, tokens) for s in sessions))
    gaps = [b - a for run in runs for a, b in zip(run["arrivals"], run["arrivals"][1:], strict=False)]
    firsts = [run["arrivals"][0] for run in runs if run["arrivals"]]
    last = max(a for run in runs for a in run["arrivals"])
    decoded = sum(max(0, len(run["arrivals"]) - 1) for run in runs)
    span = last - min(firsts)
    completion = sum(int(run["usage"].get("completion_tokens", 0)) for run in runs)
    return {
        "clients": len(sessions),
        "tokens_per_client": tokens,
        "chunks": sum(len(run["arrivals"]) for run in runs),
        "completion_tokens": completion,
        "finish_reasons": sorted({str(run["finish"]) for run in runs}),
        "decode_tokens_per_s": decoded / span if span > 0 else float("nan"),
        "wall_s": last - min(run["start"] for run in runs),
        "p50_ms": 1000 * percentile(gaps, 50),
        "p99_ms": 1000 * percentile(gaps, 99),
        "ttft_p50_ms": 1000 * statistics.median(f - run["start"] for f, run in zip(firsts, runs, strict=False)),
        "gaps_ms": [round(1000 * g, 3) for g in gaps],
    }


class SessionCopier:
    """Copies of a session under new ids, through the server's SessionStore on its folder.

    Made before the server answers its first request: the store removes state files that no session
    names when it opens, which is only safe while the server writes none."""

    def __init__(self, checkpoint: Path, sessions_dir: Path) -> None:
        import torch

        import mmrec
        from mmrec.serve.app import fingerprint
        from mmrec.serve.sessions import SessionStore, owner_of

        loaded = mmrec.load(checkpoint, "cpu")
        model: Any = loaded.model
        state_class = type(model.init_state(1))
        self.store = SessionStore(sessions_dir, fingerprint(loaded), loaded.arch, state_class, model.config.to_dict())
        self.owner, self.device = owner_of(KEY), torch.device("cpu")

    def copy(self, source: str, names: list[str]) -> None:
        record = self.store.get(self.owner, source)
        if record is None:
            raise RuntimeError(f"no session {source} to copy")
        state = self.store.load_state(record, self.device)
        for name in names:
            self.store.save(self.owner, name, state)

    def close(self) -> None:
        self.store.close()


class InProcess:
    """The same checkpoint decoding in this process, no server: the model's own time per step for K streams
    at a context, measured while the server is idle (median of ``steps`` steps, as bench_core.py does)."""

    def __init__(self, checkpoint: Path, compile: bool = False, threads: int | None = None) -> None:
        import torch

        import mmrec
        from mmrec.utils.cpu import tune_glibc_malloc

        tune_glibc_malloc()  # as mmrec serve and bench_core.py do
        torch.set_num_threads(threads or max(1, torch.get_num_threads() - 1))  # as the server's engine
        self.model: Any = mmrec.load(checkpoint, "cpu").model
        if compile and hasattr(self.model, "compile_decoding"):  # as the server compiles it
            self.model.compile_decoding(warm_up=(1,))
        self.state: Any = None

    def fill(self, text: str) -> None:
        import torch

        ids = torch.tensor([[min(b, 255) for b in text.encode()]])
        self.state = None
        with torch.no_grad():
            for start in range(0, ids.size(1), 2048):  # the server's prefill piece
                self.state = self.model(ids[:, start : start + 2048], state=self.state).state

    def ms_per_step(self, streams: int, steps: int) -> float:
        import torch

        from mmrec.evals.speed import timed

        holder = {"state": type(self.state).cat([self.state] * streams) if streams > 1 else self.state}
        token = torch.full((streams, 1), ord("a"))

        def one() -> None:
            holder["state"] = self.model(token, state=holder["state"]).state

        with torch.no_grad():
            return 1000 * timed(one, steps, torch.device("cpu"))


async def bench_model(
    url: str,
    arch: str,
    contexts: list[int],
    clients: list[int],
    tokens: int,
    copier: SessionCopier | None,
    alone: InProcess | None,
) -> list[dict]:
    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        for context in contexts:
            text = context_text(context, seed=context)
            source = f"{arch}-c{context}"
            prefill_s = await prefill(client, source, text)
            info = (await client.get(f"/v1/sessions/{source}", headers=HEADERS)).json()
            print(
                f"  {arch} C={context}: session filled in {prefill_s:.2f} s; state {info['state_bytes']:,} bytes",
                flush=True,
            )
            # The reference runs on this (main) thread, once the server is idle: torch work on changing worker
            # threads would start an OpenMP team on each, and libgomp then stops spinning (run_server says more).
            if alone is not None:
                alone.fill(text)
            for k in clients:
                names = [f"{source}-k{k}-{i}" for i in range(k)]
                start = time.perf_counter()
                if copier is not None:
                    await asyncio.to_thread(copier.copy, source, names)
                else:
                    for name in names:
                        await prefill(client, name, text)
                made_s = time.perf_counter() - start
                before = [(await client.get(f"/v1/sessions/{n}", headers=HEADERS)).json() for n in names]
                engine_before = (await client.get("/health")).json()["engine"]["decode_steps_by_batch_size"]
                row = await trial(url, names, tokens)
                # One stream only: K copies of a 32K KV cache in this process too would double the memory.
                row["in_process_ms_per_step"] = alone.ms_per_step(1, tokens) if alone is not None and k == 1 else None
                engine_after = (await client.get("/health")).json()["engine"]["decode_steps_by_batch_size"]
                for name in names:
                    await client.delete(f"/v1/sessions/{name}", headers=HEADERS)
                row.update(
                    arch=arch,
                    context=context,
                    session_positions=sorted({s["tokens_consumed"] for s in before}),
                    state_bytes=info["state_bytes"],
                    state_file_bytes=info["file_bytes"],
                    prefill_s=prefill_s,
                    sessions_made_s=made_s,
                    decode_steps_by_batch_size={
                        size: n - engine_before.get(size, 0)
                        for size, n in engine_after.items()
                        if n > engine_before.get(size, 0)
                    },
                )
                print(
                    f"    {k} client(s): {row['decode_tokens_per_s']:.1f} tok/s, p50 {row['p50_ms']:.2f} ms, "
                    f"p99 {row['p99_ms']:.2f} ms (in process, one stream: {_ms(row['in_process_ms_per_step'])}); "
                    f"decode steps by batch size {row['decode_steps_by_batch_size']}",
                    flush=True,
                )
                rows.append(row)
    return rows


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(rows: list[dict]) -> str:
    one = {(r["arch"], r["context"]): r["decode_tokens_per_s"] for r in rows if r["clients"] == 1}
    lines = [
        "| model | context | clients | tokens/s | vs 1 client | p50 ms/token | p99 ms/token | in process, 1 stream | "
        "TTFT p50 ms | state bytes/session |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = one.get((r["arch"], r["context"]))
        speedup = f"{r['decode_tokens_per_s'] / base:.2f}x" if base else "-"
        lines.append(
            f"| {r['arch']} | {r['context']:,} | {r['clients']} | {r['decode_tokens_per_s']:.1f} | {speedup} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {_ms(r['in_process_ms_per_step'])} | {r['ttft_p50_ms']:.0f} | "
            f"{r['state_bytes']:,} |"
        )
    return "\n".join(lines)


def context_table(rows: list[dict]) -> str:
    """p50 time per token at each context over that at the smallest, per model and number of clients."""
    contexts = sorted({r["context"] for r in rows})
    if len(contexts) < 2:
        return ""
    first = contexts[0]
    p50 = {(r["arch"], r["clients"], r["context"]): r["p50_ms"] for r in rows}
    lines = [
        f"| model | clients | p50 ms at {first:,} | " + " | ".join(f"at {c:,} (ratio)" for c in contexts[1:]) + " |"
    ]
    lines.append("|---|---|---|" + "---|" * (len(contexts) - 1))
    for arch, k in sorted({(r["arch"], r["clients"]) for r in rows}):
        base = p50.get((arch, k, first))
        cells = []
        for c in contexts[1:]:
            v = p50.get((arch, k, c))
            cells.append("-" if v is None or not base else f"{v:.2f} ({v / base:.2f}x)")
        lines.append(f"| {arch} | {k} | {base:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mmrec", "llama"], choices=["mmrec", "llama", "mistral", "gpt"])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 32768])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--tokens", type=int, default=64, help="tokens each client streams")
    p.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    p.add_argument(
        "--no-in-process", action="store_true", help="skip the reference of the model decoding in this process"
    )
    p.add_argument("--fill-each", action="store_true", help="fill every session through the server (no copies)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="serve MM-Rec with --compile (its decoding step through torch.compile; the in-process reference too)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="the server's --threads (torch threads of its engine; default: one per core), and the in-process "
        "reference's",
    )
    p.add_argument("--json", default=None, help="write every row (with each time between tokens) here")
    p.add_argument("--log", default=None, help="the servers' log (default: a temporary file)")
    args = p.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"bench_serve: commit {commit}, {platform.node()}, Python {platform.python_version()}; models "
          f"{args.models}, contexts {args.contexts}, clients {args.clients}, {args.tokens} tokens each\n")  # fmt: skip
    rows: list[dict] = []
    servers: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mmrec-bench-serve-") as tmp:
        root = Path(tmp)
        log = Path(args.log) if args.log else root / "server.log"
        for arch in args.models:
            max_seq_len = max(args.contexts) + (args.tokens + 2) * (len(args.clients) + 1) + 64
            checkpoint = write_checkpoint(root / arch / MODEL, arch=arch, max_seq_len=max_seq_len, ascii_only=True)
            extra = ["--max-batch", str(args.max_batch), "--max-prompt-tokens", str(max(args.contexts) + 16)]
            extra += ["--max-body-bytes", str(max(1 << 20, 2 * max(args.contexts) + 4096))]
            compiled = args.compile and arch == "mmrec"
            extra += ["--compile"] if compiled else []
            extra += ["--threads", str(args.threads)] if args.threads else []
            sessions = root / arch / "sessions"
            with ServerProcess(checkpoint, sessions, log, *extra, startup_s=600 if compiled else 120) as server:
                copier = None if args.fill_each else SessionCopier(checkpoint, sessions)
                try:
                    card = httpx.get(server.url + "/v1/models", headers=HEADERS).json()["data"][0]
                    how = "compiled decoding" if compiled else "eager decoding"
                    print(f"{arch}: {card['parameters']:,} parameters, state: {card['state']}, {how}", flush=True)
                    alone = None
                    if not args.no_in_process:
                        alone = InProcess(checkpoint, compile=compiled, threads=args.threads)
                    run = bench_model(server.url, arch, args.contexts, args.clients, args.tokens, copier, alone)
                    rows += asyncio.run(run)
                    servers[arch] = {"parameters": card["parameters"], "rss_bytes_after": server.rss_bytes()}
                finally:
                    if copier is not None:
                        copier.close()
    print("\n" + table(rows))
    contexts = context_table(rows)
    if contexts:
        print("\nTime per token against context (p50):\n\n" + contexts)
    for arch, s in servers.items():
        print(f"\n{arch}: {s['parameters']:,} parameters; server RSS at the end {s['rss_bytes_after'] / 2**20:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "commit": commit, "servers": servers, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
