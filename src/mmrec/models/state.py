"""Recurrent state objects: explicit, passed in and returned, never kept on modules."""

from __future__ import annotations

import dataclasses
import json
import warnings
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


@dataclass
class TensorState:
    """A state made of named tensors plus the stream position.

    Subclasses list their tensor fields; this base gives them size, detach,
    device moves and safetensors persistence with a config fingerprint.
    """

    kind: ClassVar[str] = "state"
    position: int

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
        raise NotImplementedError

    def save(self, path: str | Path, config: dict[str, Any] | None = None) -> None:
        """Write the state as safetensors holding its own checksum; ``config`` is stored to check it on load.

        Written to a temporary name and renamed, so ``path`` is the old file or the whole new one; a full
        disk raises DiskFullError and leaves no partial file."""
        meta = {"kind": self.kind, "position": str(self.position), "format": STATE_FORMAT, SEAL_KEY: SEAL_PLACEHOLDER}
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
        return cls._from_tensors(int(meta["position"]), tensors)

    @classmethod
    def _from_tensors(cls, position: int, tensors: dict[str, Tensor]) -> Any:
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

    Its size does not depend on how many tokens were consumed. All streams of
    a batch share ``position`` (they advance together).
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
