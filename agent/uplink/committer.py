"""Group commit: one thread commits every waiting upstream message in one transaction.

Why a thread: an fsynced SQLite commit costs 0.2-0.3 ms on a desktop SSD and
several milliseconds on an SD card. Committed one at a time on the inference
thread, every alert put that on the scoring path (under the stream lock), and a
burst of alerts fell seconds behind. The committer takes whatever queued up while
its last commit ran and commits all of it at once: one transaction, one fsync,
the seqs allocated inside that transaction as before. Then it wakes the uplink.

The guarantee does not move: the uplink publishes only rows it reads back from
the outbox, so nothing is published before it is committed, and a message still
in this queue when the process dies was never acknowledged to anyone.

When the write fails: a full disk or an I/O error fails the whole group alike,
and the outbox keeps the group in its bounded memory queue until ``maintain()``
can write it (degraded, counted; nothing of it is published meanwhile). A body
that cannot be encoded (NaN, a type JSON lacks) fails before anything is written;
the group is then committed one by one and only that message is lost, logged and
counted (``errors``, in the status as ``outbox_errors``).

Before ``start()`` and after ``stop()`` there is no thread: ``submit`` commits on
the caller's thread (an agent driven without its threads, the last summaries at
stop), so nothing submitted is ever left waiting.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.decode import LogLimiter
from agent.pipeline.events import Drift, Episode, Event
from agent.uplink.messages import describe
from agent.uplink.outbox import Message, Outbox

__all__ = ["COMMIT_QUEUE_MAX", "Committer", "Pending"]

log = logging.getLogger(__name__)

# Messages waiting for the committer, at most. The queue grows only while one
# commit is slower than the messages arriving (a stalled SD card: a full disk does
# not stall, the outbox answers at once and keeps the message in its own bounded
# memory queue). Beyond this, submit() blocks: back-pressure onto scoring, where a
# stream that cannot keep up drops windows and counts them. The alternatives were
# worse: dropping here loses alerts the pipeline already accepted, without a trace
# in the stream's counters; no bound grows memory without limit on a 512 MB device.
COMMIT_QUEUE_MAX = 10_000
# Most messages in one transaction: bounds the time the outbox lock is held (the
# uplink's reads and deletes wait on it) and the work one failed group redoes.
GROUP_MAX = 1000
# What a log line says instead of a seq.
QUEUED = "queued in memory"
REFUSED = "not stored"
# How long a blocked submit() waits before looking again whether the thread died.
WAIT_STEP_S = 0.5


@dataclass(frozen=True)
class Pending:
    """One upstream message and the event it came from (for the log line), if any."""

    message: Message
    event: Event | None = None


class Committer:
    """Commits queued messages in groups on its own thread, then calls ``on_commit``."""

    def __init__(self, outbox: Outbox, on_commit: Callable[[], None], *,
                 max_queue: int = COMMIT_QUEUE_MAX, group_max: int = GROUP_MAX,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.outbox = outbox
        self._on_commit = on_commit
        self.max_queue = max_queue
        self.group_max = group_max
        self._queue: collections.deque[Pending] = collections.deque()
        self._cond = threading.Condition()
        # Held from taking a group to its commit: a drain on a caller's thread at stop
        # and the thread's last group commit one after the other, so seqs keep the
        # order messages were submitted in.
        self._order = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._submitted = 0  # messages ever queued
        self._done = 0  # of those, handled (committed, queued by the outbox, or refused)
        self.committed = 0
        self.groups = 0
        self.largest_group = 0
        self.errors = 0  # messages refused (a body that is not JSON)
        self.waits = 0  # submit() calls that found the queue full and waited
        self._lines = LogLimiter(log, monotonic=monotonic)
        self._errors_log = LogLimiter(log)

    # -- producer side (inference and ingest threads) ---------------------------------

    def submit(self, entries: Sequence[Pending]) -> None:
        """Queue messages for the next group; commits here when no thread runs."""
        if not entries:
            return
        with self._cond:
            if len(self._queue) >= self.max_queue and self._running():
                self.waits += 1
            while len(self._queue) >= self.max_queue and self._running():
                self._cond.wait(WAIT_STEP_S)
            was_empty = not self._queue
            self._queue.extend(entries)
            self._submitted += len(entries)
            running = self._running()
            if was_empty and running:
                self._cond.notify_all()  # the thread only ever waits on an empty queue
        if not running:
            self._drain_here()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is handled; False on timeout."""
        with self._cond:
            target = self._submitted
            running = self._running()
            if running:
                deadline = None if timeout is None else time.monotonic() + timeout
                while self._done < target and self._running():
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._cond.wait(WAIT_STEP_S if left is None else min(left, WAIT_STEP_S))
                if self._done >= target:
                    return True
        self._drain_here()  # no thread (any more): commit what is left on this one
        return True

    def backlog(self) -> int:
        """Messages queued and not yet committed."""
        with self._cond:
            return len(self._queue)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            self._stopping = False
        self._thread = threading.Thread(target=self._run, name="committer", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Commit what is queued, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._drain_here()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            queued = len(self._queue)
        return {"queued": queued, "committed": self.committed, "groups": self.groups,
                "largest_group": self.largest_group, "errors": self.errors,
                "waits": self.waits}

    # -- committer thread -----------------------------------------------------------------

    def _running(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive() and not self._stopping

    def _wait_for_work(self) -> bool:
        """Block until something is queued; False when stopping with nothing left."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            return bool(self._queue)

    def _take(self) -> list[Pending]:
        """Up to group_max of the oldest waiting messages ([] if none)."""
        with self._cond:
            n = min(len(self._queue), self.group_max)
            group = [self._queue.popleft() for _ in range(n)]
            if n:
                self._cond.notify_all()  # room for a blocked submit()
            return group

    def _finish(self, n: int) -> None:
        with self._cond:
            self._done += n
            self._cond.notify_all()  # flush() waiters

    def _run(self) -> None:
        while self._wait_for_work():
            with self._order:
                self._commit_counted(self._take())

    def _drain_here(self) -> None:
        """Commit everything queued on the calling thread (no committer thread runs)."""
        with self._order:
            while group := self._take():
                self._commit_counted(group)

    def _commit_counted(self, group: list[Pending]) -> None:
        if not group:
            return
        try:
            self._commit(group)
        except Exception:  # keep the thread: a later group may well succeed
            self.errors += len(group)
            self._errors_log.exception("commit", "committing %d message(s) failed",
                                       len(group))
        finally:
            self._finish(len(group))

    def _commit(self, group: list[Pending]) -> None:
        """One transaction for the group; a body that fails to encode costs only itself."""
        try:
            seqs = self.outbox.submit([p.message for p in group])
        except (ValueError, TypeError):
            # Encoding runs before anything is written, so the whole group was refused:
            # commit one by one to find the bad body (rare: one fsync each here).
            labels = [self._commit_one(p) for p in group]
        else:
            # [] means the outbox kept the group in memory (disk full) for maintain().
            labels = list(seqs) if seqs else [QUEUED] * len(group)
        committed = sum(isinstance(x, int) for x in labels)
        if committed:
            self.committed += committed
            self.groups += 1
            self.largest_group = max(self.largest_group, committed)
            self._on_commit()
        for p, label in zip(group, labels, strict=True):
            if label != REFUSED and isinstance(p.event, Episode | Drift):
                self._lines.log(logging.INFO, "%s (seq %s)", _Described(p.event), label)

    def _commit_one(self, p: Pending) -> int | str:
        """The seq, or QUEUED (disk full), or REFUSED (logged and counted)."""
        kind, stream = p.message[0], p.message[1]
        try:
            seqs = self.outbox.submit([p.message])
        except (ValueError, TypeError) as e:
            self.errors += 1
            self._errors_log.log(logging.ERROR, "%s on %s not stored: %s", kind, stream, e)
            return REFUSED
        return seqs[0] if seqs else QUEUED


class _Described:
    """An event's log text, formatted only if the rate limit lets the line through."""

    __slots__ = ("event",)

    def __init__(self, event: Episode | Drift) -> None:
        self.event = event

    def __str__(self) -> str:
        return describe(self.event)
