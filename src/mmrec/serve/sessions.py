"""Sessions of ``mmrec serve`` on disk: an SQLite index (WAL) and one safetensors state file per session.

A save writes the state under a new file name (itself atomically: temporary name, then rename, sealed
with a checksum), then commits the new name in SQLite, then removes the old file. A crash before the
commit leaves the previous state as the session's (the new file is an orphan that the next start
removes); a crash after it leaves the new one. Each session belongs to the owner that made it (the sha256
of its API key) and to the checkpoint fingerprint it was made with.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mmrec.models.state import StateError
from mmrec.serve import batching

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
STATE_SUFFIX = ".safetensors"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    owner TEXT NOT NULL,
    id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    arch TEXT NOT NULL,
    position INTEGER NOT NULL,
    turns INTEGER NOT NULL,
    state_bytes INTEGER NOT NULL,
    file_bytes INTEGER NOT NULL,
    file TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (owner, id)
)
"""


class SessionConflict(ValueError):
    """A session that cannot be continued by this server (made with another checkpoint, or damaged)."""


def check_session_id(value: object) -> str:
    """``value`` if it is a valid session id, else ValueError saying what one looks like."""
    if not isinstance(value, str) or not SESSION_ID.match(value):
        raise ValueError("a session id is 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'")
    return value


def owner_of(api_key: str | None) -> str:
    """The owner recorded for an API key: its sha256 (the key itself is never stored); '' without keys."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest() if api_key else ""


@dataclass
class SessionRecord:
    owner: str
    id: str
    fingerprint: str
    arch: str
    position: int  # tokens the state has consumed (prompts and replies of every turn)
    turns: int
    state_bytes: int  # bytes of the state's tensors in memory
    file_bytes: int  # bytes of its file on disk
    file: str
    created: float
    updated: float

    def public(self, fingerprint: str) -> dict[str, Any]:
        """What the API shows: no owner, no file name."""
        return {
            "id": self.id,
            "object": "session",
            "arch": self.arch,
            "tokens_consumed": self.position,
            "position": self.position,
            "turns": self.turns,
            "state_bytes": self.state_bytes,
            "file_bytes": self.file_bytes,
            "created": int(self.created),
            "updated": int(self.updated),
            "checkpoint": self.fingerprint,
            "compatible": self.fingerprint == fingerprint,
        }


class SessionStore:
    """Sessions under ``root`` (index.sqlite and states/); safe to call from several threads."""

    def __init__(self, root: str | Path, fingerprint: str, arch: str, state_class: Any, model_config: dict) -> None:
        self.root = Path(root)
        self.states = self.root / "states"
        self.states.mkdir(parents=True, exist_ok=True)
        self.fingerprint, self.arch = fingerprint, arch
        self.state_class, self.model_config = state_class, model_config
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "index.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        self._sweep()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _sweep(self) -> None:
        """Remove state files that no session names: left by a crash between writing and committing."""
        with self._lock:
            named = {row[0] for row in self._db.execute("SELECT file FROM sessions")}
        for path in self.states.iterdir():
            if path.name not in named:
                path.unlink(missing_ok=True)

    def _rows(self, where: str, args: tuple) -> list[SessionRecord]:
        with self._lock:
            cur = self._db.execute(f"SELECT * FROM sessions WHERE {where} ORDER BY created, id", args)
            names = [c[0] for c in cur.description]
            return [SessionRecord(**dict(zip(names, row, strict=True))) for row in cur.fetchall()]

    def get(self, owner: str, sid: str) -> SessionRecord | None:
        rows = self._rows("owner = ? AND id = ?", (owner, sid))
        return rows[0] if rows else None

    def list(self, owner: str) -> list[SessionRecord]:
        return self._rows("owner = ?", (owner,))

    def load_state(self, record: SessionRecord, device: Any) -> Any:
        """The stored state of ``record``; SessionConflict when it was made with another checkpoint."""
        if record.fingerprint != self.fingerprint:
            raise SessionConflict(
                f"session '{record.id}' was made with checkpoint {record.fingerprint[:16]}, but this server runs "
                f"{self.fingerprint[:16]}; its state cannot continue with other weights. Delete it "
                f"(DELETE /v1/sessions/{record.id}) or serve the checkpoint it was made with"
            )
        try:
            return self.state_class.load(self.states / record.file, config=self.model_config, device=device)
        except StateError as e:
            raise SessionConflict(f"session '{record.id}' cannot be read ({e}); delete it and start again") from e

    def save(self, owner: str, sid: str, state: Any) -> SessionRecord:
        """Store ``state`` as the session's (new file, commit, then remove the old file)."""
        digest = hashlib.sha256(f"{owner}/{sid}".encode()).hexdigest()[:24]
        name = f"{digest}-{uuid.uuid4().hex[:12]}{STATE_SUFFIX}"
        path = self.states / name
        try:
            state.save(path, config=self.model_config)
            now = time.time()
            old = self.get(owner, sid)
            record = SessionRecord(
                owner=owner,
                id=sid,
                fingerprint=self.fingerprint,
                arch=self.arch,
                position=batching.position_of(state),
                turns=(old.turns if old else 0) + 1,
                state_bytes=int(state.nbytes()),
                file_bytes=path.stat().st_size,
                file=name,
                created=old.created if old else now,
                updated=now,
            )
            self._commit(record)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if old is not None and old.file != name:
            (self.states / old.file).unlink(missing_ok=True)
        return record

    def _commit(self, record: SessionRecord) -> None:
        fields = asdict(record)
        columns = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                sql = f"INSERT OR REPLACE INTO sessions ({columns}) VALUES ({marks})"
                self._db.execute(sql, tuple(fields.values()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def delete(self, owner: str, sid: str) -> bool:
        record = self.get(owner, sid)
        if record is None:
            return False
        with self._lock:
            self._db.execute("DELETE FROM sessions WHERE owner = ? AND id = ?", (owner, sid))
        (self.states / record.file).unlink(missing_ok=True)
        return True
