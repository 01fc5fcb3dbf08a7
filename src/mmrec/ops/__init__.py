"""Pure functions: each fast op beside the naive reference it is tested against."""

from mmrec.ops.gla import gla_chunked, gla_naive, gla_step
from mmrec.ops.scan import linear_scan, linear_scan_naive, segsum

__all__ = [
    "gla_chunked",
    "gla_naive",
    "gla_step",
    "linear_scan",
    "linear_scan_naive",
    "segsum",
]
