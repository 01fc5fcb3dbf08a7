"""Streams joined into one batch and taken apart again, through the state's batch API where it has one.

``MMRecState`` and ``KVCache`` have ``cat`` / ``select`` / ``split`` / ``batch_key``, and streams at
different positions decode together one token each (a KV cache pads the shorter streams and masks the
padding). For a state class without them, streams that stand at the same position are concatenated here
along the batch axis (axis 1 of every tensor); streams at other positions then decode in batches of their
own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any

import torch


def has_batch_api(state: Any) -> bool:
    """Whether ``state``'s class joins streams at different positions itself."""
    return hasattr(type(state), "cat")


def batch_key(state: Any) -> Hashable:
    """States with equal keys can be concatenated into one batch."""
    if has_batch_api(state):
        return state.batch_key
    return (type(state).__name__, int(state.position))


def cat(states: Sequence[Any]) -> Any:
    """One state holding the streams of ``states`` in order (all of one ``batch_key``)."""
    first = states[0]
    if len(states) == 1:
        return first
    if has_batch_api(first):
        return type(first).cat(list(states))
    tensors = [s.tensors() for s in states]
    return dataclasses.replace(first, **{name: torch.cat([t[name] for t in tensors], dim=1) for name in tensors[0]})


def select(state: Any, rows: Sequence[int]) -> Any:
    """The streams ``rows`` of a batched state, in that order."""
    if has_batch_api(state):
        return state.select(list(rows))
    index = torch.tensor(list(rows), dtype=torch.long, device=next(iter(state.tensors().values())).device)
    return dataclasses.replace(state, **{k: t.index_select(1, index) for k, t in state.tensors().items()})


def split(state: Any) -> list[Any]:
    """One batch-1 state per stream."""
    if has_batch_api(state):
        return list(state.split())
    return [select(state, [i]) for i in range(state.batch_size)]


def position_of(state: Any) -> int:
    """Tokens a batch-1 state has consumed."""
    positions = getattr(state, "positions", None)
    if positions is not None:
        return int(positions[0])
    return int(state.position)
