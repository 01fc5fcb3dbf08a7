"""Sampling and generation shared by every model with ``forward(ids, state)``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row of ``logits`` [B, V]. temperature 0 means greedy."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


class GenerationMixin:
    """``generate`` and ``stream`` for models whose forward takes and returns a state."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...  # provided by nn.Module

    @torch.no_grad()
    def stream(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        state: Any = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        feed_last: bool = False,
    ) -> Iterator[tuple[Tensor, Any]]:
        """Yield (next tokens [B], state) one step at a time.

        The yielded state has consumed the prompt and every token before the
        one yielded with it; with ``feed_last`` a final (None, state) is yielded
        whose state has consumed the last token too (to continue a session).
        Streams that emitted ``eos_token_id`` keep emitting it; generation
        stops when every stream has.
        """
        _check_sampling(max_new_tokens, temperature, top_k, top_p)
        if prompt_ids.dim() != 2 or prompt_ids.size(1) == 0:
            raise ValueError(f"prompt_ids must have shape [batch, time] with time >= 1, got {tuple(prompt_ids.shape)}")
        if max_new_tokens == 0:
            return
        out = self(prompt_ids, state=state)
        logits, state = out.logits[:, -1], out.state
        done = torch.zeros(prompt_ids.size(0), dtype=torch.bool, device=prompt_ids.device)
        for i in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                token = token.masked_fill(done, eos_token_id)
                done = done | (token == eos_token_id)
            yield token, state
            last = i == max_new_tokens - 1 or bool(done.all())
            if last and not feed_last:
                return
            out = self(token.unsqueeze(1), state=state)
            logits, state = out.logits[:, -1], out.state
            if last:
                yield None, state  # type: ignore[misc]
                return

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        state: Any = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        on_token: Callable[[Tensor], None] | None = None,
        return_state: bool = False,
    ) -> Any:
        """Prompt plus up to ``max_new_tokens`` sampled tokens, [B, T + new].

        ``on_token`` is called with each new [B] tensor as it is produced.
        With ``return_state`` the result is (ids, state), the state having
        consumed every returned token, ready to continue the same streams.
        """
        new: list[Tensor] = []
        final_state = state
        for token, st in self.stream(
            prompt_ids,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            state,
            eos_token_id,
            generator,
            feed_last=return_state,
        ):
            final_state = st
            if token is None:
                break
            new.append(token)
            if on_token is not None:
                on_token(token)
        ids = torch.cat([prompt_ids, torch.stack(new, dim=1)], dim=1) if new else prompt_ids
        if return_state:
            if not new:
                final_state = self(prompt_ids, state=state).state
            return ids, final_state
        return ids
