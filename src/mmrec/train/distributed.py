"""Process groups and model wrapping; the models know nothing of parallelism."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group that torchrun describes in the environment (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0"))
    )


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max_int(values: dict[str, int], info: DistInfo, device: torch.device) -> dict[str, int]:
    if not info.enabled:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist(), strict=True))


def wrap_model(
    model: nn.Module, info: DistInfo, device: torch.device, fsdp: bool, find_unused: bool = False
) -> nn.Module:
    """DDP (default) or FSDP2 (``fully_shard`` per block, then the root) across processes.

    ``find_unused``: some parameters sit out some steps (MM-Rec's learned initial
    memory takes part only when a stream starts from a fresh state).
    """
    if not info.enabled:
        if fsdp:
            raise ValueError("--fsdp shards across processes: launch with torchrun --nproc_per_node N")
        return model
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch 2.5 keeps FSDP2 under _composable
            from torch.distributed._composable.fsdp import fully_shard
        # Blocks return slices of their own activations as the new state; the model stacks them
        # into a fresh tensor and never writes to them in place, which is all this warning is about.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        for block in model.blocks:  # type: ignore[union-attr]
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused
    )


def unwrap(model: nn.Module) -> nn.Module:
    inner: Any = model
    while True:
        if hasattr(inner, "_orig_mod"):  # torch.compile
            inner = inner._orig_mod
        elif hasattr(inner, "module") and isinstance(inner.module, nn.Module):  # DDP
            inner = inner.module
        else:
            return inner  # type: ignore[no-any-return]


def full_state_dict(model: nn.Module, info: DistInfo, fsdp: bool) -> dict[str, torch.Tensor]:
    """Unsharded weights on the CPU (every rank must call this under FSDP)."""
    if fsdp and info.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v for k, v in full.items() if isinstance(v, torch.Tensor)}
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], info: DistInfo, fsdp: bool) -> None:
    if fsdp and info.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True))  # type: ignore[arg-type]
        return
    unwrap(model).load_state_dict(state)


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, info: DistInfo, fsdp: bool) -> dict[str, Any]:
    if fsdp and info.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def load_optimizer_state(
    model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any], info: DistInfo, fsdp: bool
) -> None:
    if fsdp and info.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
        return
    opt.load_state_dict(state)
