"""Recurrent state objects: explicit, passed in and returned, never kept on modules."""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file
from torch import Tensor

from mmrec.utils.files import (
    SEAL_KEY,
    SEAL_PLACEHOLDER,
    ChecksumError,
    reporting_disk_full,
    safetensors_header,
    save_tensors,
    seal_safetensors,
    sealed_safetensors_problem,
)

# Saved states hold the sha256 of their own bytes (mmrec.utils.files) and this mark beside it.
STATE_FORMAT = "2"


class StateError(ValueError):
    """A state that does not fit the model or the input it is used with."""


Position = int | tuple[int, ...]


def collapse_positions(positions: Sequence[int]) -> Position:
    """One int when every stream is at the same position (the common case), else a tuple, one per stream."""
    first = positions[0]
    return int(first) if all(p == first for p in positions) else tuple(int(p) for p in positions)


def position_problem(position: Any, batch_size: int) -> str | None:
    """What is wrong with ``position`` for a state of ``batch_size`` streams, or None."""
    if isinstance(position, int) and not isinstance(position, bool):
        return None if position >= 0 else f"state position must be >= 0, got {position}"
    if not isinstance(position, tuple):
        return f"state position must be an integer >= 0 or a tuple of them (one per stream), got {position!r}"
    if len(position) != batch_size:
        return f"state holds {batch_size} stream(s) but {len(position)} positions {position!r}"
    bad = [p for p in position if not isinstance(p, int) or isinstance(p, bool) or p < 0]
    if bad:
        return f"state positions must be integers >= 0, got {bad[0]!r} in {position!r}"
    return None


@dataclass
class TensorState:
    """A state made of named tensors plus the stream position.

    Subclasses list their tensor fields, each with the streams on dim 1; this
    base gives them size, detach, device moves, safetensors persistence with a
    config fingerprint, and batching: :meth:`cat` streams together,
    :meth:`select` or :meth:`split` them apart.

    ``position`` counts the tokens a stream has consumed: one int when all
    streams are at the same position, or a tuple with one int per stream
    (states whose :attr:`batch_key` allows it, see :meth:`cat`).
    """

    kind: ClassVar[str] = "state"
    # A Position; typed Any so that code holding states of one position (all but batched decoding) may
    # use it as the int it is there.
    position: Any

    def __post_init__(self) -> None:
        if isinstance(self.position, list):
            self.position = tuple(self.position)

    def tensors(self) -> dict[str, Tensor]:
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), Tensor)
        }

    def _replace(self, fn: Any) -> Any:
        return dataclasses.replace(self, **{k: fn(v) for k, v in self.tensors().items()})

    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def detach(self) -> Any:
        """The same state cut from the autograd graph (truncated BPTT between windows)."""
        return self._replace(lambda t: t.detach())

    def to(self, device: torch.device | str) -> Any:
        return self._replace(lambda t: t.to(device))

    def clone(self) -> Any:
        return self._replace(lambda t: t.clone())

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.tensors().values())).size(1))

    @property
    def positions(self) -> tuple[int, ...]:
        """The position of every stream."""
        if isinstance(self.position, tuple):
            return self.position
        return (self.position,) * self.batch_size

    @property
    def batch_key(self) -> Hashable:
        """States with equal keys can be batched together by :meth:`cat`."""
        raise NotImplementedError

    @classmethod
    def cat(cls, states: Sequence[TensorState]) -> Any:
        """One state holding the streams of ``states``, in order (concatenated on dim 1 of every tensor).

        StateError when the states cannot be batched: of another kind, with different ``batch_key``s
        (e.g. KV caches at different positions), or from models of another shape, dtype or device."""
        states = list(states)
        if not states:
            raise StateError("cat needs at least one state")
        wrong = [type(s).__name__ for s in states if not isinstance(s, cls)]
        if wrong:
            raise StateError(f"{cls.__name__}.cat got a {wrong[0]}: only {cls.__name__}s batch together")
        kinds = {type(s) for s in states}
        if len(kinds) > 1:
            raise StateError(f"cannot batch states of different kinds: {sorted(k.__name__ for k in kinds)}")
        keys = [s.batch_key for s in states]
        if any(k != keys[0] for k in keys):
            raise StateError(f"cannot batch these {states[0].kind} states: {states[0]._batch_key_problem(keys)}")
        first = states[0].tensors()
        tensors = {}
        for name, t in first.items():
            parts = [s.tensors()[name] for s in states]
            for p in parts:
                if p.shape[:1] + p.shape[2:] != t.shape[:1] + t.shape[2:] or p.dtype != t.dtype or p.device != t.device:
                    raise StateError(
                        f"cannot batch states from different models: '{name}' is {tuple(t.shape)} {t.dtype} "
                        f"on {t.device} in one and {tuple(p.shape)} {p.dtype} on {p.device} in another"
                    )
            tensors[name] = torch.cat(parts, dim=1)
        positions = [p for s in states for p in s.positions]
        return dataclasses.replace(states[0], position=collapse_positions(positions), **tensors)

    def _batch_key_problem(self, keys: list[Hashable]) -> str:
        return f"their batch keys differ ({sorted(set(map(str, keys)))})"

    def select(self, indices: Sequence[int] | Tensor) -> Any:
        """The streams at ``indices`` (in that order; repeats allowed), as a new state of copied tensors."""
        if isinstance(indices, Tensor):
            if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
                raise StateError(
                    f"select needs a 1-d integer tensor of stream indices, got {indices.dtype} {tuple(indices.shape)}"
                )
            indices = indices.tolist()
        idx = list(indices)
        B = self.batch_size
        if not idx:
            raise StateError("select needs at least one stream index")
        for i in idx:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < B:
                raise StateError(f"stream index {i!r} is out of range for a state of {B} stream(s) (0..{B - 1})")
        device = next(iter(self.tensors().values())).device
        picked = torch.tensor(idx, dtype=torch.long, device=device)
        positions = self.positions
        return dataclasses.replace(
            self,
            position=collapse_positions([positions[i] for i in idx]),
            **{k: t.index_select(1, picked) for k, t in self.tensors().items()},
        )

    def split(self) -> list[Any]:
        """One state per stream (batch size 1 each, copied tensors), in order."""
        positions = self.positions
        parts = {k: t.split(1, dim=1) for k, t in self.tensors().items()}
        return [
            dataclasses.replace(self, position=positions[i], **{k: p[i].clone() for k, p in parts.items()})
            for i in range(self.batch_size)
        ]

    def save(self, path: str | Path, config: dict[str, Any] | None = None) -> None:
        """Write the state as safetensors holding its own checksum; ``config`` is stored to check it on load.

        Written to a temporary name and renamed, so ``path`` is the old file or the whole new one; a full
        disk raises DiskFullError and leaves no partial file."""
        # One int, or a JSON list with one position per stream (an int reads back as JSON too).
        position = json.dumps(list(self.position) if isinstance(self.position, tuple) else self.position)
        meta = {"kind": self.kind, "position": position, "format": STATE_FORMAT, SEAL_KEY: SEAL_PLACEHOLDER}
        if config is not None:
            meta["config"] = json.dumps(config, sort_keys=True)
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with reporting_disk_full(f"saving the state {path.name}", path.parent, self.nbytes()):
                save_tensors(self.tensors(), tmp, metadata=meta)
                seal_safetensors(tmp)
                tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path, config: dict[str, Any] | None = None, device: str | torch.device = "cpu") -> Any:
        """Read a state saved by :meth:`save`, after checking its checksum (StateError names a damaged file);
        if ``config`` is given it must match the saved one. A state saved before checksums loads with a
        warning that it was not verified."""
        path = Path(path)
        if not path.is_file():
            raise StateError(f"no state file at {path}")
        try:
            _verify(path)
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path), device=str(device))
        except StateError:
            raise
        except Exception as e:  # safetensors raises several types for corrupt files
            raise StateError(f"{path} is not a readable safetensors state file: {e}") from e
        if meta.get("kind") != cls.kind:
            raise StateError(f"{path} holds a {meta.get('kind')!r} state, not a {cls.kind!r} one")
        if config is not None and "config" in meta:
            saved = json.loads(meta["config"])
            diff = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
            if diff:
                raise StateError(f"{path} was saved by a model with another config (differs in: {', '.join(diff)})")
        try:
            raw = json.loads(meta.get("position", ""))
        except ValueError:
            raw = meta.get("position")
        position = tuple(raw) if isinstance(raw, list) else raw
        state = cls._from_tensors(position, tensors)
        problem = position_problem(position, state.batch_size)
        if problem is not None:
            raise StateError(f"{path} is damaged: {problem}")
        return state

    @classmethod
    def _from_tensors(cls, position: Position, tensors: dict[str, Tensor]) -> Any:
        names = [f.name for f in dataclasses.fields(cls) if f.name != "position"]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise StateError(f"state file lacks tensor(s) {', '.join(missing)}")
        return cls(position=position, **{n: tensors[n] for n in names})


def _verify(path: Path) -> None:
    """Check a state file against the checksum it holds (StateError naming it when damaged)."""
    try:
        header = safetensors_header(path)
        meta = json.loads(header.decode("utf-8")).get("__metadata__") or {}
    except ChecksumError as e:
        raise StateError(str(e)) from e
    except (UnicodeDecodeError, ValueError, AttributeError) as e:
        raise StateError(f"{path} is damaged: its safetensors header is unreadable ({e})") from e
    # Three marks, so that one flipped byte cannot make a state with a checksum pass for an older one.
    if SEAL_KEY not in meta and "format" not in meta and SEAL_KEY.encode() not in header:
        warnings.warn(f"{path} was saved without a checksum (an older mmrec); it is not verified", stacklevel=3)
        return
    problem = sealed_safetensors_problem(path, header)
    if problem is not None:
        raise StateError(f"{path} {problem}")


@dataclass
class MMRecState(TensorState):
    """Everything MM-Rec carries between calls, per layer (leading axis), per stream.

    Its size does not depend on how many tokens were consumed. Streams at
    different positions batch together (``position`` is then a tuple): any
    two MM-Rec states of one model can be :meth:`cat`-ed and decoded together.
    """

    kind: ClassVar[str] = "mmrec"
    short: Tensor  # [L, B, H, dk, dv] level-0 matrix states
    conv: Tensor  # [L, B, K-1, d] last inputs of the short convolution
    memory: Tensor  # [L, B, S, dm] level-3 long-term slots
    summaries: Tensor  # [L, B, W, dm] level-1 FIFO of chunk summaries, oldest first
    sequence: Tensor  # [L, B, dm] level-2 running summary
    pending: Tensor  # [L, B, C, d] block inputs of the unfinished chunk (position % C rows used)

    @property
    def batch_size(self) -> int:
        return int(self.short.size(1))

    @property
    def batch_key(self) -> Hashable:
        return self.kind


@dataclass
class KVCache(TensorState):
    """A Transformer's state: keys and values of the tokens it may still attend to.

    It grows with every token (up to the window for sliding-window attention):
    the contrast with :class:`MMRecState`.
    """

    kind: ClassVar[str] = "kv_cache"
    keys: Tensor  # [L, B, H, T_cache, dh]
    values: Tensor  # [L, B, H, T_cache, dh]

    @property
    def batch_size(self) -> int:
        return int(self.keys.size(1))

    @property
    def batch_key(self) -> Hashable:
        # The rows of a cache are aligned: one position, one cache length for every stream.
        return (self.kind, self.position, int(self.keys.size(3)))

    def _batch_key_problem(self, keys: list[Hashable]) -> str:
        positions = sorted({k[1] for k in keys if isinstance(k, tuple)})
        return (
            f"KV caches batch only at one position (their rows are aligned), got positions {positions}; "
            "decode these streams in separate batches"
        )
