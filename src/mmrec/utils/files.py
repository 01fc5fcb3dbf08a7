"""Files that survive faults: checksums, self-checksummed ("sealed") files, atomic writes, disk-full errors.

Every file a run keeps is either listed with its size and sha256 in a sealed
file beside it (a checkpoint's meta.json, a dataset's manifest.json) or
sealed itself (a saved state). A sealed file holds the sha256 of its own
bytes, taken with those 64 digits written as zeros, under the key
``self_sha256``: a flipped byte anywhere in it, the digits included, or a cut
anywhere, no longer matches.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import save_file

SEAL_KEY = "self_sha256"
SEAL_PLACEHOLDER = "0" * 64
_SEAL = re.compile(rb'"self_sha256"\s*:\s*"([0-9a-f]{64})"')
_HASH_CHUNK = 1 << 22
# errno values and messages that mean "no room": safetensors and torch.save report them inside other errors.
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


class ChecksumError(ValueError):
    """A file whose bytes are not the ones recorded for it; the message names the file."""


class DiskFullError(OSError):
    """No space left (or over quota) while writing; the message says what, where, how much, and what was kept."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


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


# Checksums ---------------------------------------------------------------------


def _hash_stream(f: BinaryIO, h: Any, stop: int | None = None) -> None:
    left = stop
    while left is None or left > 0:
        chunk = f.read(_HASH_CHUNK if left is None else min(_HASH_CHUNK, left))
        if not chunk:
            return
        h.update(chunk)
        if left is not None:
            left -= len(chunk)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        _hash_stream(f, h)
    return h.hexdigest()


def file_record(path: str | Path, sync: bool = False) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a file; ``sync`` also flushes it to disk (it is about to be relied on)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        _hash_stream(f, h)
        if sync:
            os.fsync(f.fileno())
        size = f.tell()
    return {"size": size, "sha256": h.hexdigest()}


def file_problem(path: Path, record: dict[str, Any], checksum: bool = True) -> str | None:
    """What is wrong with ``path`` against its ``{"size", "sha256"}`` record; None when it matches."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != record.get("size"):
        return f"has {size} bytes where {record.get('size')} were written (truncated or overwritten)"
    try:
        if checksum and sha256_file(path) != record.get("sha256"):
            return "does not match its sha256 (damaged on disk or changed after it was written)"
    except OSError as e:
        return f"cannot be read ({e})"
    return None


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Sealed files -------------------------------------------------------------------------


def sealed_json(data: dict[str, Any], indent: int = 1) -> tuple[bytes, str]:
    """``data`` as JSON text holding its own sha256 under ``self_sha256``; returns (bytes, digest)."""
    body = json.dumps({**data, SEAL_KEY: SEAL_PLACEHOLDER}, indent=indent).encode("utf-8") + b"\n"
    digest = hashlib.sha256(body).hexdigest()
    placeholder = json.dumps({SEAL_KEY: SEAL_PLACEHOLDER}, indent=indent).encode("utf-8")
    field = placeholder.strip(b"{}\n ")  # '"self_sha256": "000..."' as json.dumps spaced it
    return body.replace(field, field.replace(SEAL_PLACEHOLDER.encode(), digest.encode()), 1), digest


def _find_seal(head: bytes) -> tuple[int, int] | None:
    """(start, end) of the 64 digits of the one seal in ``head``; None when there is none, or more than one."""
    found = list(_SEAL.finditer(head))
    return (found[0].start(1), found[0].end(1)) if len(found) == 1 else None


def seal_problem(raw: bytes) -> str | None:
    """What is wrong with the seal of an in-memory file (None: it matches)."""
    where = _find_seal(raw)
    if where is None:
        return f"has no readable {SEAL_KEY} (its checksum was damaged)"
    start, end = where
    digest = hashlib.sha256(raw[:start] + SEAL_PLACEHOLDER.encode() + raw[end:]).hexdigest()
    if digest != raw[start:end].decode():
        return "does not match its own sha256 (damaged on disk or changed after it was written)"
    return None


def _file_digest_with_hole(path: Path, start: int, end: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        _hash_stream(f, h, stop=start)
        h.update(SEAL_PLACEHOLDER.encode())
        f.seek(end)
        _hash_stream(f, h)
    return h.hexdigest()


def safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (raises ChecksumError naming the file when it cannot be)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < n <= size - 8:
            raise ChecksumError(f"{path} is damaged: its safetensors header is cut or unreadable")
        return f.read(n)


def seal_safetensors(path: Path) -> None:
    """Write the sha256 of a safetensors file saved with ``self_sha256`` = zeros in its metadata into it."""
    where = _find_seal(safetensors_header(path))
    if where is None:
        raise ValueError(f"{path} has no {SEAL_KEY} placeholder to fill")
    start, end = (8 + i for i in where)
    digest = _file_digest_with_hole(path, start, end)
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(digest.encode())
        f.flush()
        os.fsync(f.fileno())


def sealed_safetensors_problem(path: Path, header: bytes) -> str | None:
    """What is wrong with the seal of a safetensors file whose header is ``header`` (None: it matches)."""
    where = _find_seal(header)
    if where is None:
        return f"has no readable {SEAL_KEY} (its checksum was damaged)"
    start, end = (8 + i for i in where)
    if _file_digest_with_hole(path, start, end) != header[where[0] : where[1]].decode():
        return "does not match its own sha256 (damaged on disk or changed after it was written)"
    return None


# Writing ---------------------------------------------------------------------


def write_bytes_durably(path: Path, data: bytes) -> None:
    """To a temporary name, flushed to disk, then renamed: ``path`` is the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the disk is full: numpy, safetensors and torch.save each
    report ENOSPC their own way."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return True
        if any(t in str(seen) for t in _FULL_TEXTS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem of ``path`` (or of its nearest existing parent)."""
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def human_bytes(n: int | float | None) -> str:
    """``n`` bytes for a message: 680 bytes, 68 KB, 0.7 MB -> 1.2 MB, 3.4 GB."""
    if n is None:
        return "an unknown amount"
    if n < 1000:
        return f"{int(n)} bytes"
    if n < 100e3:
        return f"{n / 1e3:,.0f} KB"
    if n < 1e9:
        return f"{n / 1e6:,.1f} MB"
    return f"{n / 1e9:,.1f} GB"


@contextmanager
def reporting_disk_full(what: str, where: Path, needed: int | None = None) -> Iterator[None]:
    """Turn a disk-full error inside the block into a DiskFullError saying what was written where."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if not is_disk_full(e):
            raise
        need = f"it needs about {human_bytes(needed)}, " if needed is not None else ""
        raise DiskFullError(
            f"{what}: no space left on device in {where} ({need}{human_bytes(free_bytes(where))} free); "
            "free some space and try again"
        ) from e
