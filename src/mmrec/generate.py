"""``mmrec generate``: sample text from a checkpoint, streamed, with sessions that keep memory.

A session is the model's state saved after a call (``--state-out``) and read
back by the next (``--state-in``): MM-Rec's fixed-size state carries the whole
history, so a later call continues the same stream without re-reading it.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import torch

from mmrec.evals.common import load_checkpoint
from mmrec.models import KVCache, MMRecState
from mmrec.models.state import StateError


def run_generate(
    checkpoint: str,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int = 0,
    device: str = "auto",
    state_in: str | None = None,
    state_out: str | None = None,
    out: TextIO = sys.stdout,
    compile: bool = False,
) -> str:
    """Generate after ``prompt`` and write the text to ``out`` as it comes; returns the generated text."""
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    lm = load_checkpoint(checkpoint, dev)
    tok = lm.tokenizer
    model: Any = lm.model  # MMRecLM or TransformerLM: one call signature
    if compile:
        if not hasattr(model, "compile_decoding"):
            raise ValueError(f"--compile: only MM-Rec's decoding step has a compiled path; {lm.arch} runs eager")
        model.compile_decoding(warm_up=(1,))
    ids = tok.encode(prompt)
    if not ids:
        raise ValueError("--prompt is empty: give at least one character to continue from")
    state: Any = None
    kind = MMRecState if isinstance(model.init_state(1), MMRecState) else KVCache
    if state_in:
        state = kind.load(state_in, config=model.config.to_dict(), device=dev)
        if state.batch_size != 1:
            raise StateError(f"--state-in holds {state.batch_size} streams; generate continues one")
    generator = torch.Generator(device=dev).manual_seed(seed)
    pending = bytearray()

    def emit(token: torch.Tensor) -> None:
        # Print whole UTF-8 characters as soon as their last byte arrives.
        if hasattr(tok, "decode_bytes"):
            pending.extend(tok.decode_bytes([int(token[0])]))
            text = pending.decode("utf-8", errors="ignore")
            if text:
                out.write(text)
                out.flush()
                pending.clear()
        else:
            out.write(tok.decode([int(token[0])]))
            out.flush()

    with torch.no_grad():
        result = model.generate(
            torch.tensor([ids], device=dev),
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            state=state,
            eos_token_id=tok.eot_id,
            generator=generator,
            on_token=emit,
            return_state=True,
        )
    new_ids, final_state = result
    out.write("\n")
    if state_out:
        final_state.save(state_out, config=model.config.to_dict())
    return str(tok.decode(new_ids[0, len(ids) :].tolist()))
