"""Store-and-forward outbox: every upstream message is committed here first.

A row is deleted only when the cloud broker acknowledged it (PUBACK with a
success reason code). The per-device ``seq`` is allocated in the same
transaction as the row, so it keeps increasing across crashes and restarts.

SQLite in WAL mode. ``synchronous=FULL`` is the default: the agent writes
aggregates and alerts, not readings (a few rows a second at most), so one
fsync per commit costs little even on an SD card, and it is what makes a
committed alert survive a power cut; ``NORMAL`` survives a process crash only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Outbox", "OutboxFullError", "OutboxRow"]

log = logging.getLogger(__name__)

# Eviction order when over budget: the first class listed goes first.
EVICTION_ORDER = ("summary", "alert")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    stream TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_kind ON outbox (kind, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class OutboxFullError(OSError):
    """The disk refused the write; the message was not accepted."""


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    kind: str
    stream: str
    topic: str
    payload: bytes
    created: float


class Outbox:
    """A SQLite-backed queue of upstream messages, safe to share between threads."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "full",
        max_rows: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_rows = max_rows
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
        self._db.executescript(_SCHEMA)
        row = self._db.execute(
            "SELECT MAX(COALESCE((SELECT value FROM meta WHERE key='last_seq'), 0),"
            " COALESCE((SELECT MAX(seq) FROM outbox), 0))"
        ).fetchone()
        self._last_seq = int(row[0])
        self._rows = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        self.evicted: dict[str, int] = {k: self._meta(f"evicted_{k}") for k in EVICTION_ORDER}

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def __len__(self) -> int:
        return self._rows

    def put(
        self,
        kind: str,
        stream: str,
        topic: str,
        build: Callable[[int], dict[str, Any]],
    ) -> int:
        """Commit one message; ``build(seq)`` returns its JSON body. Returns the seq."""
        with self._lock:
            seq = self._last_seq + 1
            body = json.dumps(build(seq), separators=(",", ":"), allow_nan=False).encode()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    "INSERT INTO outbox (seq, kind, stream, topic, payload, created)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (seq, kind, stream, topic, body, self._clock()),
                )
                self._db.execute(
                    "INSERT INTO meta (key, value) VALUES ('last_seq', ?)"
                    " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    (seq,),
                )
                evicted = self._evict_locked(self._rows + 1 - self.max_rows)
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as e:
                self._rollback()
                if "full" in str(e).lower() or "disk" in str(e).lower():
                    raise OutboxFullError(f"outbox {self.path}: {e}") from e
                raise
            self._last_seq = seq
            self._rows += 1 - evicted
            return seq

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.OperationalError):  # nothing to roll back
            self._db.execute("ROLLBACK")

    def _evict_locked(self, excess: int) -> int:
        """Delete ``excess`` rows, summaries before alerts, oldest first."""
        done = 0
        for kind in EVICTION_ORDER:
            if done >= excess:
                break
            cur = self._db.execute(
                "DELETE FROM outbox WHERE seq IN"
                " (SELECT seq FROM outbox WHERE kind=? ORDER BY seq LIMIT ?)",
                (kind, excess - done),
            )
            if cur.rowcount > 0:
                self.evicted[kind] = self.evicted.get(kind, 0) + cur.rowcount
                self._db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?)"
                    " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    (f"evicted_{kind}", self.evicted[kind]),
                )
                log.warning("outbox over budget (%d rows): evicted %d oldest %s messages",
                            self.max_rows, cur.rowcount, kind)
                done += cur.rowcount
        return done

    def pending(self, limit: int, after: int = 0, exclude: Iterable[int] = ()) -> list[OutboxRow]:
        """The oldest rows with seq > ``after`` that are not in ``exclude``."""
        skip = set(exclude)
        with self._lock:
            cur = self._db.execute(
                "SELECT seq, kind, stream, topic, payload, created FROM outbox"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit + len(skip)),
            )
            rows = [OutboxRow(r[0], r[1], r[2], r[3], bytes(r[4]), r[5])
                    for r in cur if r[0] not in skip]
        return rows[:limit]

    def ack(self, seqs: Iterable[int]) -> int:
        """Delete acknowledged rows; returns how many were deleted."""
        batch = [(s,) for s in seqs]
        if not batch:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            before = self._db.total_changes
            self._db.executemany("DELETE FROM outbox WHERE seq=?", batch)
            deleted = self._db.total_changes - before
            self._db.execute("COMMIT")
            self._rows -= deleted
            return deleted

    def stats(self) -> dict[str, Any]:
        with self._lock:
            by_kind = dict(self._db.execute("SELECT kind, COUNT(*) FROM outbox GROUP BY kind"))
            oldest = self._db.execute("SELECT MIN(created) FROM outbox").fetchone()[0]
        return {
            "rows": self._rows,
            "by_kind": by_kind,
            "last_seq": self._last_seq,
            "oldest_age_s": round(self._clock() - oldest, 1) if oldest is not None else None,
            "evicted": dict(self.evicted),
        }

    def close(self) -> None:
        with self._lock:
            self._db.close()
