"""Writing tensors to safetensors files with the permissions of every other file the user writes."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, then the file's mode set from the umask (0o666 & ~umask).

    safetensors 0.8 creates its files -rw------- whatever the umask, so weights
    and states would be unreadable to a group that can read the rest of a run.
    """
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())
