"""The built-in corpus: the running Python's standard-library source.

Present on every machine with Python, so the main commands work with no
download: real code with English docstrings and comments, ~30 MB.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

BUILTIN_NAME = "python-stdlib"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def builtin_files() -> list[Path]:
    """The standard library's .py files in a fixed order (site-packages excluded)."""
    root = stdlib_root()
    files: list[Path] = []
    for folder, dirs, names in os.walk(root):
        # Prune while walking: site-packages can be far larger than the library itself.
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")]
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def builtin_documents() -> Iterator[tuple[str, str]]:
    """(document id, text) for each readable file of the built-in corpus."""
    root = stdlib_root()
    for path in builtin_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            yield f"{BUILTIN_NAME}/{path.relative_to(root).as_posix()}", text
