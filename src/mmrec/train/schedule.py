"""Curriculum: window length and source mixture as functions of tokens seen.

Both schedules are piecewise constant: a stage starts at a token milestone and
lasts until the next. Tokens per step stay constant, so a longer window means
fewer sequences per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mmrec.config import ConfigError
from mmrec.utils.counts import check_stages, parse_count, parse_length_schedule

__all__ = ["Curriculum", "Stage", "parse_count", "parse_length_schedule", "parse_mixture_schedule", "penalty_ramp"]


def parse_mixture_schedule(spec: str) -> list[tuple[int, dict[str, float]]]:
    """'0:a=1,b=0;2M:a=1,b=1' -> [(0, {'a': 1, 'b': 0}), (2000000, {...})]."""
    stages = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        if ":" not in part:
            raise ConfigError(f"mixture_schedule: stage {part!r} must be TOKENS:NAME=WEIGHT,...")
        at, rest = part.split(":", 1)
        weights = {}
        for item in filter(None, (i.strip() for i in rest.split(","))):
            name, _, w = item.partition("=")
            try:
                value = float(w)
            except ValueError:
                raise ConfigError(f"mixture_schedule: weight in {item!r} is not a number") from None
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"mixture_schedule: weight in {item!r} must be >= 0")
            weights[name.strip()] = value
        if not any(weights.values()):
            raise ConfigError(f"mixture_schedule: stage {part!r} gives every source weight 0")
        stages.append((parse_count(at, "mixture_schedule"), weights))
    return check_stages(stages, "mixture_schedule")


@dataclass(frozen=True)
class Stage:
    index: int  # changes whenever the window length (hence the batch) changes
    seq_len: int
    batch_size: int  # sequences per step over all processes and micro-batches
    weights: dict[str, float]


class Curriculum:
    def __init__(
        self,
        seq_len: int,
        batch_size: int,
        length_spec: str,
        mixture_spec: str,
        base_weights: dict[str, float],
        multiple: int = 1,
    ) -> None:
        """``multiple``: the batch is rounded down to a multiple of it (processes x micro-batches), at least it."""
        self.tokens_per_step = seq_len * batch_size
        self.lengths = parse_length_schedule(length_spec) or [(0, seq_len)]
        self.mixtures = parse_mixture_schedule(mixture_spec) or [(0, dict(base_weights))]
        self.multiple = multiple
        for _, weights in self.mixtures:
            unknown = sorted(set(weights) - set(base_weights))
            if unknown:
                raise ConfigError(
                    f"mixture_schedule: unknown source(s) {', '.join(unknown)}; sources are "
                    f"{', '.join(sorted(base_weights))}"
                )
        for _, length in self.lengths:
            if length < 1:
                raise ConfigError("seq_len_schedule: lengths must be >= 1")

    def at(self, tokens: int) -> Stage:
        li = max(i for i, (start, _) in enumerate(self.lengths) if start <= tokens)
        length = self.lengths[li][1]
        weights = next(w for start, w in reversed(self.mixtures) if start <= tokens)
        batch = max(self.multiple, (self.tokens_per_step // length) // self.multiple * self.multiple)
        return Stage(index=li, seq_len=length, batch_size=batch, weights=dict(weights))

    @property
    def max_seq_len(self) -> int:
        return max(length for _, length in self.lengths)


def penalty_ramp(step: int, warmup: int) -> float:
    """Share of the write penalty applied at ``step`` (0-based): rises linearly to 1 over ``warmup`` steps,
    so the writes a task needs can be learned before the penalty switches the others off."""
    return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)
