"""An lm-evaluation-harness model for every mmrec checkpoint, scored through the state API.

    from lm_eval import simple_evaluate
    from mmrec.evals.lm_harness import MMRecEvalLM
    simple_evaluate(model=MMRecEvalLM("runs/mine"), tasks=[...])
    # or, once this module is imported, model="mmrec", model_args="checkpoint=runs/mine"

* ``loglikelihood``: MM-Rec reads each distinct context once into its state and scores every continuation
  of it from that state (a multiple-choice question costs one context pass, not one per choice).
* ``loglikelihood_rolling``: MM-Rec streams each whole document through its state, ``stream_window``
  tokens per call: memory stays the same for 10K and 1M tokens, and every token has all earlier ones as
  context (no window, no stride). The first token is scored after the end-of-text id, as lm-eval's own
  models do (``prefix_token=none`` scores from the second token on, as ``mmrec eval bpb`` does; the totals
  then agree).
* ``generate_until``: greedy or sampled decoding with the carried state, cut at the stop strings.

A Transformer baseline is scored the way lm-eval's Hugging Face model (``--model hf``) scores its native
export: inputs cut to the last ``max_length`` tokens, rolling windows of ``max_length``; so the two give
the same numbers with the same ``max_length`` (default here: the length it was trained on).

This module imports lm_eval (``pip install mmrec[hf]``).
"""

from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401  lm-eval's own models first: it loads them only into an empty registry
import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from torch import Tensor
from tqdm import tqdm

from mmrec.models.checkpoint import LoadedModel, load
from mmrec.models.mmrec import MMRecLM
from mmrec.utils.device import autocast_for, resolve_device

PREFIXES = ("eot", "none")


@register_model("mmrec")
class MMRecEvalLM(TemplateLM):
    """lm-eval's LM interface over a checkpoint of any mmrec command (MM-Rec or a Transformer baseline)."""

    def __init__(
        self,
        checkpoint: str | None = None,
        device: str = "cpu",
        max_length: int | None = None,
        stream_window: int = 4096,
        prefix_token: str = "eot",
        max_gen_toks: int = 256,
        dtype: str = "fp32",
        loaded: LoadedModel | None = None,
        batch_size: Any = 1,
        **_: Any,
    ) -> None:
        """``checkpoint``: a run or step directory (or ``loaded``: a model already loaded by mmrec.load).
        ``max_length``: context limit of a Transformer (default its trained length; ignored by MM-Rec).
        ``batch_size`` is accepted for lm-eval's command line and ignored: streams are scored one by one."""
        super().__init__()
        if loaded is None:
            if not checkpoint:
                raise ValueError("MMRecEvalLM needs checkpoint=RUN_OR_STEP_DIR")
            loaded = load(checkpoint, resolve_device(device))
        if loaded.tokenizer is None:
            raise ValueError(f"{loaded.path} has no tokenizer (a synthetic task on raw ids); lm-eval scores text")
        if prefix_token not in PREFIXES:
            raise ValueError(f"prefix_token must be one of {', '.join(PREFIXES)}, got {prefix_token!r}")
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be fp32 or bf16, got {dtype!r}")
        self.loaded = loaded
        self.model: Any = loaded.model.eval()
        self.tokenizer: Any = loaded.tokenizer
        self.is_mmrec = isinstance(self.model, MMRecLM)
        self._device = next(self.model.parameters()).device
        self.stream_window = int(stream_window)
        self.prefix_token = prefix_token
        self.max_gen_toks = int(max_gen_toks)
        self._dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        limit = getattr(loaded.model_config, "max_seq_len", None)
        self.max_length = int(max_length or min(loaded.trained_seq_len, limit or loaded.trained_seq_len))

    # What lm-eval asks of a tokenizer-owning model -----------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eot_id)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return str(self.tokenizer.decode(tokens))

    def _forward(self, ids: list[int] | Tensor, state: Any = None) -> Any:
        inp = torch.as_tensor(ids, dtype=torch.long, device=self.device).view(1, -1)
        with torch.no_grad(), autocast_for(self.device, self._dtype):
            return self.model(inp, state=state)

    def _read(self, ids: list[int], state: Any = None) -> Any:
        """The state after ``ids`` (fed ``stream_window`` at a time); ``state`` when there are none."""
        for s in range(0, len(ids), self.stream_window):
            state = self._forward(ids[s : s + self.stream_window], state).state
        return state

    # loglikelihood ------------------------------------------------------------------------------------------

    def _score(self, logits: Tensor, targets: list[int]) -> tuple[float, bool]:
        """Summed log-probability of ``targets`` under ``logits`` [len, V], and whether all are the argmax."""
        logprobs = F.log_softmax(logits.float(), dim=-1)
        tgt = torch.tensor(targets, dtype=torch.long, device=logprobs.device)
        picked = logprobs.gather(-1, tgt[:, None]).squeeze(-1)
        return float(picked.sum()), bool((logprobs.argmax(dim=-1) == tgt).all())

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **_: Any
    ) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        if not self.is_mmrec:
            for i, (_, context, continuation) in enumerate(tqdm(requests, disable=disable_tqdm, desc="scoring")):
                # As lm-eval's HF model: the last max_length input tokens, the continuation's logits at the end.
                inp = (context + continuation)[-(self.max_length + 1) :][:-1]
                logits = self._forward(inp).logits[0, -len(continuation) :]
                results[i] = self._score(logits, continuation)
            return [r for r in results if r is not None]
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, request in enumerate(requests):
            by_context.setdefault(tuple(request[1]), []).append(i)
        for shared, members in tqdm(by_context.items(), disable=disable_tqdm, desc="scoring"):
            context = list(shared) or [self.prefix_token_id]  # a context of spaces only moves them all onwards
            # The state after all but the last context token, shared by every continuation of the context.
            state = self._read(list(context[:-1]))
            for i in members:
                continuation = requests[i][2]
                out = self._forward([context[-1], *continuation[:-1]], state)
                results[i] = self._score(out.logits[0], continuation)
        return [r for r in results if r is not None]

    # loglikelihood_rolling ----------------------------------------------------------------------------------

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="rolling"):
            (string,) = req.args
            if self.is_mmrec:
                out.append(self.stream_logprob(self.tok_encode(string)))
                continue
            tokens = self.tok_encode(string)
            windows = map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
                ),
            )
            scored = self._loglikelihood_tokens([(("", ""), c, t) for c, t in windows], disable_tqdm=True)
            out.append(sum(s for s, _ in scored))
        return out

    def stream_logprob(self, tokens: list[int]) -> float:
        """Summed log-probability of a whole document, streamed through the state ``stream_window`` tokens
        at a time: nothing kept grows with the document but its ids. With ``prefix_token=eot`` the first
        token is scored after the end-of-text id; with ``none`` it is context only (as ``mmrec eval bpb``)."""
        ids = torch.tensor(tokens, dtype=torch.long)
        del tokens  # 8 bytes a token on top of the tensor; freed here when the caller kept no reference
        if self.prefix_token == "eot":
            ids = torch.cat([torch.tensor([self.eot_token_id]), ids])
        total, state = 0.0, None
        for s in range(0, ids.numel() - 1, self.stream_window):
            inputs = ids[s : min(s + self.stream_window, ids.numel() - 1)]
            targets = ids[s + 1 : s + 1 + inputs.numel()].to(self.device)
            out = self._forward(inputs, state)
            # The same per-token cross-entropy as evals.bpb, summed in float64.
            nats = F.cross_entropy(out.logits[0].float(), targets, reduction="none")
            total += float(nats.double().sum())
            state = out.state
        return -total

    # generate_until -----------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="generating"):
            context, gen_kwargs = req.args
            out.append(self.generate_one(context, dict(gen_kwargs or {})))
        return out

    def generate_one(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        """Continue ``context`` until a stop string of ``until`` (or end of text, or ``max_gen_toks``)."""
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        until.append(self.tok_decode([self.eot_token_id]) or "<|endoftext|>")
        max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(gen_kwargs.pop("temperature", 0.0))
        if not gen_kwargs.pop("do_sample", False):
            temperature = 0.0
        ids = self.tok_encode(context) or [self.prefix_token_id]
        if not self.is_mmrec:  # as lm-eval's HF model: room for the new tokens within max_length
            ids = ids[-max(1, self.max_length - max_new) :]
        state = self._read(ids[:-1]) if self.is_mmrec else None
        prompt = torch.tensor([ids[-1:] if self.is_mmrec else ids], device=self.device)
        new: list[int] = []
        with torch.no_grad(), autocast_for(self.device, self._dtype):
            for token, _ in self.model.stream(
                prompt, max_new, temperature=temperature, state=state, eos_token_id=self.eot_token_id
            ):
                if int(token[0]) == self.eot_token_id:
                    break
                new.append(int(token[0]))
                text = self.tok_decode(new)
                if any(stop in text for stop in until):
                    break
        text = self.tok_decode(new)
        for stop in until:
            text = text.split(stop)[0]
        return text
