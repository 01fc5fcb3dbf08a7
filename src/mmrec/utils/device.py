"""One device resolver and one autocast rule for every command.

``resolve_device`` turns a ``--device`` value into a ``torch.device`` or fails
with a one-line :class:`DeviceError` that names the devices this machine has;
the command line turns that into exit code 2. ``autocast_for`` is the single
rule for mixed precision: bf16 autocast on CUDA (tensor cores), float32 on the
CPU, where bf16 is slower at these sizes.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


class DeviceError(ValueError):
    """A device that cannot be used here; the message names what is available."""


def available_devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(spec: str | torch.device) -> torch.device:
    """``auto`` is CUDA when torch sees a device, else the CPU; anything else is checked here, before any work."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    have = ", ".join(["auto", *available_devices()])
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise DeviceError(f"--device: {spec!r} is not a device; available here: {have}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device: {spec} was requested but torch sees no CUDA device; available here: {have}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device: {spec} does not exist; available here: {have}")
    elif device.type == "mps" and "mps" not in available_devices():
        raise DeviceError(f"--device: mps is not available; available here: {have}")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"--device: {spec!r} is not supported; available here: {have}")
    return device


def autocast_for(
    device: torch.device | str, dtype: torch.dtype | None = None
) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA unless ``dtype`` says otherwise; nothing on the CPU unless ``dtype`` asks for it."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else None
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def model_device(model: torch.nn.Module, default: str | torch.device | None = None) -> torch.device:
    """The device of a model's first parameter (``default``, else the CPU, for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device(default or "cpu")
