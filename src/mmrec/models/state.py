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
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from mmrec.config import ConfigError, MMRecConfig, TransformerConfig
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
            diff = config_differences(json.loads(meta["config"]), config)
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


def _config_class(config: dict[str, Any]) -> Any:
    """The model config dataclass whose fields ``config`` (a model's ``config.to_dict()``) holds, or None."""
    for cls in (MMRecConfig, TransformerConfig):
        if set(config) == {f.name for f in dataclasses.fields(cls)}:
            return cls
    return None


def config_differences(saved: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """The fields in which a state's stored config differs from the model's ``config``, sorted.

    A field the stored config lacks was written by an mmrec that did not have it yet: it counts as the
    field's default (resolved as the config resolves it, e.g. ``d_mem`` from ``d_model``), so a state
    saved before a field was added still loads into a model that leaves the field at its default."""
    cls = _config_class(config)
    if cls is not None and isinstance(saved, dict):
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in saved.items() if k in names}
        if set(known) != names:
            try:
                defaults = cls(**known).to_dict()
            except (ConfigError, TypeError, ValueError):  # a config that never was valid: defaults unresolved
                defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
            saved = {**defaults, **saved}
    return sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))


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


class PendingRows:
    """The slot memory's pending buffer [L, B, C, d] behind MM-Rec states the model made, and the position
    of the newest of them: decoding writes each token's row into the buffer in place (rows before a
    state's chunk offset are never written again, a completed chunk moves on to a new buffer), and only
    the newest state may do so; an older state, decoded again (a branch), copies first. An older state
    sharing the buffer may so see rows from its chunk offset on filled (rows it never reads: every step
    writes its own row before a chunk is written), where a state made otherwise holds zeros."""

    def __init__(self, tensor: Tensor, position: Position) -> None:
        self.tensor, self.position = tensor, position

    def writable_by(self, state: MMRecState) -> bool:
        """Whether ``state`` is the newest state on this buffer (and holds it, not a copy or a view)."""
        return state.pending is self.tensor and state.position == self.position


@dataclass
class MMRecState(TensorState):
    """Everything MM-Rec carries between calls, per layer (leading axis), per stream.

    Its size does not depend on how many tokens were consumed. Streams at
    different positions batch together (``position`` is then a tuple): any
    two MM-Rec states of one model can be :meth:`cat`-ed and decoded together.
    """

    kind: ClassVar[str] = "mmrec"
    # The tensors of each long-term memory (MMRecConfig.long_term): all present or all None.
    slot_fields: ClassVar[tuple[str, ...]] = ("memory", "summaries", "sequence", "pending")
    assoc_fields: ClassVar[tuple[str, ...]] = (
        "assoc_memory",
        "assoc_keys",
        "assoc_values",
        "assoc_log_g",
        "assoc_beta",
    )
    short: Tensor  # [L, B, H, dk, dv] level-0 matrix states
    conv: Tensor  # [L, B, K-1, d] last inputs of the short convolution
    # Slot memory (long_term slots or both; None with assoc).
    memory: Tensor | None = None  # [L, B, S, dm] level-3 long-term slots
    summaries: Tensor | None = None  # [L, B, W, dm] level-1 FIFO of chunk summaries, oldest first
    sequence: Tensor | None = None  # [L, B, dm] level-2 running summary
    pending: Tensor | None = None  # [L, B, C, d] block inputs of the unfinished chunk (position % C rows used)
    # Associative memory (long_term assoc or both; None with slots), see mmrec.ops.assoc.AssocState.
    assoc_memory: Tensor | None = None  # [L, B, H, dk, dv] key -> value matrix of the completed chunks
    assoc_keys: Tensor | None = None  # [L, B, H, C, dk] keys of the unfinished chunk (position % C rows used)
    assoc_values: Tensor | None = None  # [L, B, H, C, dv]
    assoc_log_g: Tensor | None = None  # [L, B, H, C] log decays of the unfinished chunk
    assoc_beta: Tensor | None = None  # [L, B, H, C] write steps of the unfinished chunk

    def __post_init__(self) -> None:
        super().__post_init__()
        # Not a field, so dataclasses.replace (select, cat, to, clone, detach) never carries it over.
        self._pending_rows: PendingRows | None = None
        for group in (self.slot_fields, self.assoc_fields):
            held = [name for name in group if getattr(self, name) is not None]
            if held and len(held) != len(group):
                missing = [name for name in group if name not in held]
                raise StateError(f"an MM-Rec state with {', '.join(held)} needs {', '.join(missing)} too")
        if self.memory is None and self.assoc_memory is None:
            raise StateError(
                "an MM-Rec state needs the tensors of a long-term memory: "
                f"{', '.join(self.slot_fields)} (slots) or {', '.join(self.assoc_fields)} (assoc)"
            )

    @property
    def long_term(self) -> str:
        """The long-term memory this state holds: slots, assoc or both (MMRecConfig.long_term)."""
        if self.assoc_memory is None:
            return "slots"
        return "assoc" if self.memory is None else "both"

    @property
    def batch_size(self) -> int:
        return int(self.short.size(1))

    @property
    def batch_key(self) -> Hashable:
        # Any two states of one model batch; states with other memories cannot.
        return self.kind if self.long_term == "slots" else (self.kind, self.long_term)

    def _batch_key_problem(self, keys: list[Hashable]) -> str:
        kinds = sorted({k[1] if isinstance(k, tuple) else "slots" for k in keys})
        return f"they hold different long-term memories ({', '.join(kinds)}): states of one model batch"

    @classmethod
    def _from_tensors(cls, position: Position, tensors: dict[str, Tensor]) -> Any:
        missing = [n for n in ("short", "conv") if n not in tensors]
        has_slots = any(n in tensors for n in cls.slot_fields)
        has_assoc = any(n in tensors for n in cls.assoc_fields)
        for present, group in ((has_slots, cls.slot_fields), (has_assoc, cls.assoc_fields)):
            if present:
                missing += [n for n in group if n not in tensors]
        if not has_slots and not has_assoc:
            missing += list(cls.slot_fields)  # what a file saved before the associative memory lacks
        if missing:
            raise StateError(f"state file lacks tensor(s) {', '.join(missing)}")
        names = ("short", "conv", *cls.slot_fields, *cls.assoc_fields)
        return cls(position=position, **{n: tensors[n] for n in names if n in tensors})


@dataclass
class KVCache(TensorState):
    """A Transformer's state: keys and values of the tokens it may still attend to.

    It grows with every token (up to the window for sliding-window attention):
    the contrast with :class:`MMRecState`.

    Stream b holds its last ``min(positions[b], T)`` tokens (T = ``keys.size(3)``) in time order in the
    first slots of the time axis; the slots after them are padding (streams at different positions batch
    together, see :meth:`cat`). With a sliding window of W tokens (mistral) a stream holds at least its
    last W - 1 tokens (all it needs) and at most about 2 W: the model compacts the cache when it is full.

    States made by the model are views of preallocated storage (:class:`KVStorage`) that later decoding
    steps write into in place, beyond what this state holds; decoding an older state again (a branch)
    copies first. A state made any other way (``cat``, ``select``, ``load``, ``clone``, ``to``, by hand)
    has no storage: the model's next call copies it into new storage with room to grow.
    """

    kind: ClassVar[str] = "kv_cache"
    keys: Tensor  # [L, B, H, T, dh]
    values: Tensor  # [L, B, H, T, dh]
    # The model's sliding window, set by the model (None: full attention, or not known yet: a loaded state).
    window: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        # Not a field, so dataclasses.replace (select, cat, to, clone, detach) never carries it over.
        self._storage: KVStorage | None = None

    @property
    def batch_size(self) -> int:
        return int(self.keys.size(1))

    @property
    def batch_key(self) -> Hashable:
        # Streams at different positions batch: each keeps its own length, the rest of its rows is padding.
        return self.kind

    def filled(self) -> tuple[int, ...]:
        """Tokens each stream holds (its slots in use on the time axis)."""
        T = int(self.keys.size(3))
        return tuple(min(p, T) for p in self.positions)

    def nbytes(self) -> int:
        """Bytes of ``keys`` and ``values``: every stream's tokens, plus the padding of streams shorter than
        the longest one of a batch; not the spare capacity behind them (:meth:`storage_nbytes`)."""
        return super().nbytes()

    def storage_nbytes(self) -> int:
        """Bytes of the memory this state keeps alive: its preallocated storage, else :meth:`nbytes`."""
        if self._storage is None:
            return self.nbytes()
        return sum(t.numel() * t.element_size() for t in (self._storage.keys, self._storage.values))

    @classmethod
    def cat(cls, states: Sequence[TensorState]) -> Any:
        """One cache holding the streams of ``states`` in order, each padded to the longest.

        A stream that holds fewer tokens than its position (cut to what its sliding window needs) is moved
        to end where its position says, after zeros that its window never reaches. Without a window (a
        cache cut by hand) it batches only with caches no longer than it."""
        caches = [s for s in states if isinstance(s, KVCache)]
        if not caches or len(caches) != len(states):
            return super().cat(states)  # the base class names what is wrong
        windows = sorted({s.window for s in caches if s.window is not None})
        if len(windows) > 1:
            raise StateError(f"cannot batch KV caches of models with different sliding windows {windows}")
        W = windows[0] if windows else None
        T = max(int(s.keys.size(3)) for s in caches)
        padded: list[TensorState] = []
        for s in caches:
            Ts = int(s.keys.size(3))
            if Ts == T or all(p <= Ts for p in s.positions):
                pad = (0, 0, 0, T - Ts)
                padded.append(dataclasses.replace(s, keys=F.pad(s.keys, pad), values=F.pad(s.values, pad), window=W))
                continue
            cut = [p for p in s.positions if p > Ts]
            if W is None or Ts < W - 1:
                raise StateError(
                    f"cannot batch a KV cache holding the last {Ts} tokens of a stream at position {cut[0]} "
                    f"with one of {T} tokens: feed these streams in separate batches"
                )
            keys = s.keys.new_zeros((*s.keys.shape[:3], T, s.keys.size(4)))
            values = torch.zeros_like(keys)
            for b, p in enumerate(s.positions):
                n, end = min(p, Ts), min(p, T)  # tokens held, and the slot they end at in the batch
                keys[:, b, :, end - n : end] = s.keys[:, b, :, :n]
                values[:, b, :, end - n : end] = s.values[:, b, :, :n]
            padded.append(dataclasses.replace(s, keys=keys, values=values, window=W))
        return super().cat(padded)

    def select(self, indices: Sequence[int] | Tensor) -> Any:
        """The streams at ``indices`` as a new cache of copied tensors, cut to the longest of them."""
        idx = indices.tolist() if isinstance(indices, Tensor) and indices.dim() == 1 else indices
        filled = self.filled()
        try:
            T = max(filled[i] for i in idx) if len(idx) else None
        except (TypeError, IndexError):  # bad indices: the base class says what is wrong
            T = None
        if T is None or self.keys.size(3) <= T:
            return super().select(indices)
        cut = dataclasses.replace(self, keys=self.keys[:, :, :, :T], values=self.values[:, :, :, :T])
        return TensorState.select(cut, indices)

    def split(self) -> list[Any]:
        """One cache per stream (copied tensors), each holding that stream's tokens only."""
        return [self.select([i]) for i in range(self.batch_size)]

    @classmethod
    def _from_tensors(cls, position: Position, tensors: dict[str, Tensor]) -> Any:
        missing = [n for n in ("keys", "values") if n not in tensors]
        if missing:
            raise StateError(f"state file lacks tensor(s) {', '.join(missing)}")
        return cls(position=position, keys=tensors["keys"], values=tensors["values"])


class KVStorage:
    """Preallocated keys and values [L, B, H, capacity, dh] behind the KV caches a model made.

    Decoding writes new tokens into it in place along the time axis. ``heads[b]`` is the position up to
    which stream b has been written: only a state at those positions (the newest) may write here; an older
    state, decoded again, copies into new storage instead (copy on write), so no state sees its tokens
    change under it.
    """

    def __init__(self, keys: Tensor, values: Tensor, heads: tuple[int, ...]) -> None:
        self.keys, self.values, self.heads = keys, values, heads

    @property
    def capacity(self) -> int:
        return int(self.keys.size(3))

    def backs(self, state: KVCache) -> bool:
        """Whether ``state``'s tensors are views of this storage (from its first slot)."""
        return all(
            t.data_ptr() == buf.data_ptr() and t.stride() == buf.stride() and t.shape[:3] == buf.shape[:3]
            for t, buf in ((state.keys, self.keys), (state.values, self.values))
        )
