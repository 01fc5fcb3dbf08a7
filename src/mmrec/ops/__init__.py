"""Pure functions: each fast op beside the naive reference it is tested against."""

from mmrec.ops.delta import delta_chunked, delta_naive, delta_step
from mmrec.ops.gla import gla_chunked, gla_naive, gla_step
from mmrec.ops.memory import (
    MemoryParams,
    MemoryState,
    memory_read,
    memory_read_naive,
    memory_read_step,
    memory_write,
    memory_write_naive,
)
from mmrec.ops.scan import linear_scan, linear_scan_naive, segsum

__all__ = [
    "MemoryParams",
    "MemoryState",
    "delta_chunked",
    "delta_naive",
    "delta_step",
    "gla_chunked",
    "gla_naive",
    "gla_step",
    "linear_scan",
    "linear_scan_naive",
    "memory_read",
    "memory_read_naive",
    "memory_read_step",
    "memory_write",
    "memory_write_naive",
    "segsum",
]
