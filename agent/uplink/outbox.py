"""Store-and-forward outbox: every upstream message is committed here first.

A row is deleted only when the cloud broker acknowledged it (PUBACK with a
success reason code). The per-device ``seq`` is allocated in the same
transaction as the row, so it keeps increasing across crashes and restarts.

SQLite in WAL mode. ``synchronous=FULL`` is the default: the agent writes
aggregates and alerts, not readings (a few rows a second at most), so one
fsync per commit costs little even on an SD card, and it is what makes a
committed alert survive a power cut; ``NORMAL`` survives a process crash only
(the last commits may roll back on power loss, the file stays consistent).
Inserts come in groups (``agent/uplink/committer.py``): one fsync per group.
Deletes of acknowledged rows commit without an fsync of their own: a delete a
power cut rolls back only re-sends a message the cloud already has (delivery is
at least once anyway), and the WAL is append-only, so the next insert's fsync
makes it durable too. At 1,000 alerts/s that halves the fsyncs.

Budget: at most ``max_rows`` rows and ``max_bytes`` payload bytes; when a new
row would exceed either, the oldest rows of the first class in
``EVICTION_ORDER`` go first. Rows older than their class's TTL are expired.
Both are counted (persistently) and reported in the status message.

Full disk: a reserve file (``outbox.db.reserve``) holds room for the delete and
checkpoint path. When a delete or checkpoint finds the disk full, the reserve is
released and the write retried, so delivered rows can still be deleted; new
messages the disk refuses wait in a bounded in-memory queue (``submit``), counted.
``maintain()`` (the uplink thread calls it) checkpoints the WAL, takes the
reserve back and writes the queue once space returns: no restart needed.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["EVICTION_ORDER", "Outbox", "OutboxFullError", "OutboxRow"]

log = logging.getLogger(__name__)

# Eviction order when over budget: summaries are cheap to lose (the next one
# carries the same kind of information), alerts are not; other classes (e.g.
# drift events) sit between them.
EVICTION_ORDER = ("summary", "event", "alert")
# The database file may grow to this multiple of max_bytes (indexes, WAL,
# free pages) before SQLite itself refuses writes: a hard ceiling under the budget.
FILE_LIMIT_FACTOR = 4
FILE_LIMIT_MIN = 16 * 1024 * 1024
# Room kept aside for deletes and WAL checkpoints on a full disk (a file of this
# size is released when a write hits SQLITE_FULL and taken back when space returns).
RESERVE_BYTES = 1024 * 1024
# The WAL is truncated to this after a checkpoint: an outage's WAL must not keep
# the space it grew into (a big WAL on a full disk is what wedged the old outbox).
JOURNAL_SIZE_LIMIT = 1024 * 1024
WAL_AUTOCHECKPOINT_PAGES = 256
# Write transactions (a few WAL pages each) between the checkpoints ack() runs on the
# delete side: the WAL then rarely reaches wal_autocheckpoint inside an insert, whose
# commit would pay the checkpoint (the pages copied and the database fsynced) on an
# alert's path. The autocheckpoint stays as the bound when nothing is acknowledged.
CHECKPOINT_EVERY_WRITES = 64
# Messages the disk refused, kept in memory until it takes them; beyond this the
# oldest are dropped and counted.
MEMORY_QUEUE_MAX = 1000
# While degraded, how often maintain() retries (checkpoint, reserve, queue).
RECOVER_EVERY_S = 1.0

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
    """The disk (or the file ceiling) refused the write; the message was not accepted."""


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    kind: str
    stream: str
    topic: str
    payload: bytes
    created: float


Message = tuple[str, str, str, Callable[[int], dict[str, Any]]]  # kind, stream, topic, build


class Outbox:
    """A SQLite-backed queue of upstream messages, safe to share between threads."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "full",
        max_rows: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        ttl_s: Mapping[str, float] | None = None,
        file_limit_bytes: int | None = None,
        clock: Callable[[], float] = time.time,
        reserve_bytes: int = RESERVE_BYTES,
        memory_queue_max: int = MEMORY_QUEUE_MAX,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.ttl_s = dict(ttl_s or {})
        self._clock = clock
        self._full = synchronous == "full"
        self._lock = threading.Lock()
        self.reserve_path = path.with_name(path.name + ".reserve")
        self.reserve_bytes = reserve_bytes
        self._mono = monotonic
        self._queue: collections.deque[Message] = collections.deque()
        self.memory_queue_max = memory_queue_max
        self.dropped = 0  # refused by the disk and pushed out of the memory queue
        self.write_errors = 0  # writes the disk refused (each one logged at most once a state)
        self.degraded: str | None = None
        self._degraded_since = 0.0
        self._next_recover = 0.0
        self.recoveries = 0
        self.last_recovery_s: float | None = None
        new = not path.exists() or path.stat().st_size == 0
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        try:
            if new:
                # Only possible on a new file: lets maintain() hand freed pages back to
                # the file system, so the reserve can be taken back after a full disk.
                self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
            self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            self._db.execute(f"PRAGMA synchronous={'FULL' if self._full else 'NORMAL'}")
            limit = file_limit_bytes or max(FILE_LIMIT_FACTOR * max_bytes, FILE_LIMIT_MIN)
            page = int(self._db.execute("PRAGMA page_size").fetchone()[0])
            self._db.execute(f"PRAGMA max_page_count={max(limit // page, 16)}")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise OSError(f"outbox {path}: cannot open ({e}); move the file aside to start "
                          f"a new one") from e
        row = self._db.execute(
            "SELECT MAX(COALESCE((SELECT value FROM meta WHERE key='last_seq'), 0),"
            " COALESCE((SELECT MAX(seq) FROM outbox), 0))"
        ).fetchone()
        self._last_seq = int(row[0])
        self._writes = 0  # write transactions since the last checkpoint ack() ran
        self._recount()
        self.evicted: dict[str, int] = {}
        self.expired: dict[str, int] = {}
        for key, value in self._db.execute("SELECT key, value FROM meta"):
            if key.startswith("evicted_"):
                self.evicted[key[8:]] = int(value)
            elif key.startswith("expired_"):
                self.expired[key[8:]] = int(value)
        if not self._take_reserve():
            self._degrade(f"no room for the {reserve_bytes}-byte reserve in {path.parent}")

    # -- full disk -------------------------------------------------------------------

    def _take_reserve(self) -> bool:
        """Make sure the reserve file holds its room; False if the disk has none."""
        if self.reserve_bytes <= 0:
            return True
        with contextlib.suppress(OSError):
            if self.reserve_path.stat().st_size >= self.reserve_bytes:
                return True
        try:
            fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                # posix_fallocate allocates blocks (a sparse file would reserve nothing).
                os.posix_fallocate(fd, 0, self.reserve_bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(OSError):
                self.reserve_path.unlink()
            return False
        return True

    def _release_reserve(self) -> bool:
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            return False
        log.error("outbox: disk full in %s; released the %d-byte reserve so delivered "
                  "messages can still be deleted", self.path.parent, self.reserve_bytes)
        return True

    def _degrade(self, reason: str) -> None:
        if self.degraded is None:
            self._degraded_since = self._mono()
            log.error("outbox degraded: %s; new messages wait in memory (up to %d) until "
                      "space returns", reason, self.memory_queue_max)
        self.degraded = reason

    def _checkpoint(self) -> None:
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _write_with_reserve(self, op: Callable[[], Any]) -> Any:
        """Run a delete-side write; on a full disk release the reserve and retry once."""
        try:
            return op()
        except sqlite3.OperationalError as e:
            if not _is_full(e):
                raise
            self.write_errors += 1
            self._degrade(f"disk full ({e})")
            if not self._release_reserve():
                raise OutboxFullError(f"outbox {self.path}: {e}") from e
        with contextlib.suppress(sqlite3.OperationalError):
            self._checkpoint()
        try:
            return op()
        except sqlite3.OperationalError as e:
            raise OutboxFullError(f"outbox {self.path}: {e}") from e

    def submit(self, messages: Sequence[Message]) -> list[int]:
        """Commit, or keep in memory while the disk refuses; returns the seqs committed now.

        A body that is not JSON still raises ValueError (nothing to keep).
        """
        with self._lock:
            if self.degraded is None and not self._queue:
                try:
                    return self._put_many_locked(messages)
                except OutboxFullError as e:
                    self.write_errors += 1
                    self._degrade(str(e))
                except sqlite3.Error as e:
                    self.write_errors += 1
                    self._degrade(f"write failed: {e}")
            for m in messages:
                if len(self._queue) >= self.memory_queue_max:
                    self._queue.popleft()
                    self.dropped += 1
                self._queue.append(m)
            return []

    def maintain(self) -> int:
        """While degraded, every RECOVER_EVERY_S: checkpoint, retake the reserve, write the queue.

        Leaves the degraded state once all of that worked; returns how many queued
        messages were committed (the uplink then looks for new rows).
        """
        now = self._mono()
        if self.degraded is None or now < self._next_recover:
            return 0
        self._next_recover = now + RECOVER_EVERY_S
        with self._lock:
            try:
                with contextlib.suppress(sqlite3.OperationalError):
                    self._db.execute("PRAGMA incremental_vacuum").fetchall()
                self._checkpoint()
            except sqlite3.Error as e:
                log.debug("outbox checkpoint while degraded: %s", e)
            if not self._take_reserve():
                return 0
            written = 0
            while self._queue:
                batch = list(self._queue)
                try:
                    self._put_many_locked(batch)
                except ValueError as e:  # one body that is not JSON: drop it, not the rest
                    bad = self._queue.popleft()
                    self.dropped += 1
                    log.error("outbox: queued %s on %s dropped: %s", bad[0], bad[1], e)
                    continue
                except (OSError, sqlite3.Error) as e:
                    log.debug("outbox: queue still not written: %s", e)
                    return written
                written += len(batch)
                self._queue.clear()
            took = now - self._degraded_since
            log.warning("outbox recovered after %.1f s (%s); %d queued message(s) written, "
                        "%d dropped so far", took, self.degraded, written, self.dropped)
            self.degraded = None
            self.recoveries += 1
            self.last_recovery_s = took
            return written

    def health(self) -> dict[str, Any]:
        """Degraded (with the reason), queued in memory, dropped, write errors."""
        return {"degraded": self.degraded, "memory_queue": len(self._queue),
                "dropped": self.dropped, "write_errors": self.write_errors,
                "reserve": self.reserve_path.exists() or self.reserve_bytes <= 0,
                "recoveries": self.recoveries}

    def _recount(self) -> None:
        self._rows, self._bytes = (int(v) for v in self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone())

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def __len__(self) -> int:
        return self._rows

    @property
    def bytes(self) -> int:
        return self._bytes

    # -- writing -----------------------------------------------------------------

    def put(self, kind: str, stream: str, topic: str,
            build: Callable[[int], dict[str, Any]]) -> int:
        """Commit one message; ``build(seq)`` returns its JSON body. Returns the seq."""
        return self.put_many([(kind, stream, topic, build)])[0]

    def put_many(self, messages: Sequence[Message]) -> list[int]:
        """Commit several messages in one transaction (one fsync); returns their seqs."""
        with self._lock:
            return self._put_many_locked(messages)

    def _put_many_locked(self, messages: Sequence[Message]) -> list[int]:
        seq = self._last_seq
        rows = []
        for kind, stream, topic, build in messages:
            seq += 1
            body = json.dumps(build(seq), separators=(",", ":"), allow_nan=False).encode()
            rows.append((seq, kind, stream, topic, body, self._clock()))
        added = sum(len(r[4]) for r in rows)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT INTO outbox (seq, kind, stream, topic, payload, created)"
                " VALUES (?, ?, ?, ?, ?, ?)", rows)
            self._set_meta("last_seq", seq)
            ev_rows, ev_bytes = self._evict_locked(
                self._rows + len(rows) - self.max_rows, self._bytes + added - self.max_bytes)
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            self._rollback()
            self._reload_counters()
            if _is_full(e):
                raise OutboxFullError(f"outbox {self.path}: {e}") from e
            raise
        except BaseException:
            self._rollback()
            self._reload_counters()
            raise
        self._last_seq = seq
        self._writes += 1
        self._rows += len(rows) - ev_rows
        self._bytes += added - ev_bytes
        return [r[0] for r in rows]

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (the caller holds _lock)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._rollback()
            raise
        self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _no_fsync(self) -> Iterator[None]:
        """Commits inside skip their fsync (WAL: the next synced commit covers them)."""
        if not self._full:
            yield
            return
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.OperationalError):  # nothing to roll back
            self._db.execute("ROLLBACK")

    def _reload_counters(self) -> None:
        # A rolled-back eviction must not leave the in-memory counters ahead of the file.
        for key, value in self._db.execute("SELECT key, value FROM meta"):
            if key.startswith("evicted_"):
                self.evicted[key[8:]] = int(value)

    def _evict_locked(self, excess_rows: int, excess_bytes: int) -> tuple[int, int]:
        """Delete the oldest rows, class by class, until both excesses are covered."""
        done_rows = done_bytes = 0
        kinds = list(EVICTION_ORDER) + sorted(
            {k for (k,) in self._db.execute("SELECT DISTINCT kind FROM outbox")}
            - set(EVICTION_ORDER))
        for kind in kinds:
            if done_rows >= excess_rows and done_bytes >= excess_bytes:
                break
            victims: list[int] = []
            cur = self._db.execute(
                "SELECT seq, LENGTH(payload) FROM outbox WHERE kind=? ORDER BY seq", (kind,))
            for seq, size in cur:
                if done_rows >= excess_rows and done_bytes >= excess_bytes:
                    break
                victims.append(seq)
                done_rows += 1
                done_bytes += int(size)
            cur.close()
            if victims:
                self._db.executemany("DELETE FROM outbox WHERE seq=?", [(s,) for s in victims])
                self.evicted[kind] = self.evicted.get(kind, 0) + len(victims)
                self._set_meta(f"evicted_{kind}", self.evicted[kind])
                log.warning("outbox over budget (%d rows / %d bytes): evicted the %d oldest %s "
                            "messages", self.max_rows, self.max_bytes, len(victims), kind)
        return done_rows, done_bytes

    def expire(self) -> int:
        """Delete rows older than their class's TTL; returns how many."""
        now = self._clock()
        total = 0
        with self._lock:
            for kind, ttl in self.ttl_s.items():
                with self._transaction():
                    cur = self._db.execute(
                        "DELETE FROM outbox WHERE kind=? AND created < ?"
                        " RETURNING LENGTH(payload)", (kind, now - ttl))
                    sizes = [int(r[0]) for r in cur]
                    if sizes:
                        self._set_meta(f"expired_{kind}", self.expired.get(kind, 0) + len(sizes))
                if sizes:
                    self.expired[kind] = self.expired.get(kind, 0) + len(sizes)
                if sizes:
                    log.warning("outbox: %d %s messages older than %.0f s expired",
                                len(sizes), kind, ttl)
                total += len(sizes)
            self._recount()  # from the file: an operator may have purged rows meanwhile
        return total

    # -- reading and acknowledging -----------------------------------------------

    def pending(
        self,
        limit: int,
        after: int = 0,
        exclude: Iterable[int] = (),
        kinds: Sequence[str] | None = None,
        not_kinds: Sequence[str] | None = None,
    ) -> list[OutboxRow]:
        """The oldest rows with seq > ``after``, not in ``exclude``, optionally by class."""
        skip = set(exclude)
        # Only "?" placeholders are interpolated into the SQL text below.
        where, args = "seq > ?", list[Any]([after])
        if kinds:
            where += f" AND kind IN ({','.join('?' * len(kinds))})"
            args += list(kinds)
        if not_kinds:
            where += f" AND kind NOT IN ({','.join('?' * len(not_kinds))})"
            args += list(not_kinds)
        with self._lock:
            cur = self._db.execute(
                "SELECT seq, kind, stream, topic, payload, created FROM outbox"  # noqa: S608
                f" WHERE {where} ORDER BY seq LIMIT ?",
                (*args, limit + len(skip)))
            rows = [OutboxRow(r[0], r[1], r[2], r[3], bytes(r[4]), r[5])
                    for r in cur if r[0] not in skip]
        return rows[:limit]

    def ack(self, seqs: Iterable[int]) -> int:
        """Delete acknowledged rows; returns how many were deleted."""
        batch = [(s,) for s in seqs]
        if not batch:
            return 0
        def delete() -> list[int]:
            sizes = []
            with self._transaction():
                for (s,) in batch:
                    sizes += [int(r[0]) for r in self._db.execute(
                        "DELETE FROM outbox WHERE seq=? RETURNING LENGTH(payload)", (s,))]
            return sizes

        with self._lock:
            self._writes += 1
            if self._writes >= CHECKPOINT_EVERY_WRITES:
                self._writes = 0
                # Before the delete, so that the delete is the first write after it and
                # pays the WAL's restart (a header and its fsync), not the next insert.
                # PASSIVE never waits; a failure here is the autocheckpoint's to retry.
                with contextlib.suppress(sqlite3.OperationalError):
                    self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            with self._no_fsync():
                sizes = self._write_with_reserve(delete)
            self._rows -= len(sizes)
            self._bytes -= sum(sizes)
            return len(sizes)

    def purge(self, kind: str | None = None) -> int:
        """Delete every row (of one class); for operators. Counted as evicted."""
        with self._lock:
            with self._transaction():
                if kind:
                    counts = dict(self._db.execute(
                        "SELECT kind, COUNT(*) FROM outbox WHERE kind=? GROUP BY kind", (kind,)))
                    self._db.execute("DELETE FROM outbox WHERE kind=?", (kind,))
                else:
                    counts = dict(self._db.execute(
                        "SELECT kind, COUNT(*) FROM outbox GROUP BY kind"))
                    self._db.execute("DELETE FROM outbox")
                for k, n in counts.items():
                    self._set_meta(f"evicted_{k}", self.evicted.get(k, 0) + n)
            for k, n in counts.items():
                self.evicted[k] = self.evicted.get(k, 0) + n
            self._recount()
            return sum(counts.values())

    def stats(self) -> dict[str, Any]:
        with self._lock:
            by_kind = dict(self._db.execute("SELECT kind, COUNT(*) FROM outbox GROUP BY kind"))
            oldest = self._db.execute("SELECT MIN(created) FROM outbox").fetchone()[0]
            evicted, expired = dict(self.evicted), dict(self.expired)
        return {
            "rows": self._rows,
            "bytes": self._bytes,
            "by_kind": by_kind,
            "last_seq": self._last_seq,
            "oldest_age_s": round(self._clock() - oldest, 1) if oldest is not None else None,
            "evicted": evicted,
            "expired": expired,
        }

    def close(self) -> None:
        if self._queue:
            self._next_recover = 0.0
            self.maintain()
        with self._lock:
            if self._queue:
                log.error("outbox: %d message(s) the disk refused are lost at stop",
                          len(self._queue))
            self._db.close()


def _is_full(e: sqlite3.Error) -> bool:
    """SQLITE_FULL, or an I/O error the full disk caused (WAL or checkpoint)."""
    text = str(e).lower()
    return "full" in text or "disk" in text
