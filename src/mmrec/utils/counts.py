"""Token counts with suffixes ('64K', '2M') and schedules of window lengths by tokens seen."""

from __future__ import annotations

import re
from typing import Any

from mmrec.utils.errors import ConfigError

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def parse_count(text: str, what: str) -> int:
    """'2M' -> 2_000_000; '1.5k' -> 1500."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGbB]?)\s*", text)
    if not m:
        raise ConfigError(f"{what}: cannot read {text!r} as a count (use e.g. 512, 64K, 2M)")
    return int(float(m.group(1)) * _SUFFIX[m.group(2).lower()])


def check_stages(stages: list[Any], what: str) -> list[Any]:
    stages.sort(key=lambda s: s[0])
    if stages and stages[0][0] != 0:
        raise ConfigError(f"{what}: the first stage must start at 0 tokens")
    if len({s[0] for s in stages}) != len(stages):
        raise ConfigError(f"{what}: two stages start at the same token count")
    return stages


def parse_length_schedule(spec: str) -> list[tuple[int, int]]:
    """'0:256,1M:1024' -> [(0, 256), (1000000, 1024)], sorted, starting at 0."""
    stages = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if ":" not in part:
            raise ConfigError(f"seq_len_schedule: stage {part!r} must be TOKENS:LENGTH")
        at, length = part.split(":", 1)
        stages.append((parse_count(at, "seq_len_schedule"), parse_count(length, "seq_len_schedule")))
    return check_stages(stages, "seq_len_schedule")


def longest_window(seq_len: int, schedule: str) -> int:
    """The longest training window of a run: the schedule's longest length, else ``seq_len``."""
    return max((length for _, length in parse_length_schedule(schedule or "")), default=seq_len)
