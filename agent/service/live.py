"""The live view's data: a bounded history per stream and coalesced server-sent events.

The daemon's observer hook turns every scored batch into one pending point (max
score, last window end, open episode); a hub thread moves those ``rate_hz``
times a second into a fixed-size history, at most ``POINTS_PER_TICK`` per
stream (merged by max), and, only while a page is connected, encodes one
update frame that every client shares.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from paho.mqtt.client import topic_matches_sub

from agent import __version__
from agent.config import LiveConfig
from agent.pipeline import Event, ScoreBatch, StreamPipeline

if TYPE_CHECKING:
    from agent.daemon import Agent

__all__ = ["LiveClient", "LiveView", "sse"]

log = logging.getLogger(__name__)

# Frames a client may fall behind by before it is dropped (it reconnects and gets a
# snapshot): a stuck browser must not grow the agent's memory.
CLIENT_BACKLOG = 50
# How long a reconnecting EventSource waits (the `retry:` hint).
RETRY_MS = 2000
# Chart points per stream per tick: a burst of batches is merged down to this many.
POINTS_PER_TICK = 4
# Pending points kept between two ticks (a stalled hub merges into the last one).
PENDING_MAX = 64
# Windows per second are taken over about this long.
RATE_SPAN_S = 5.0


def sse(event: str, data: Any) -> bytes:
    """One server-sent event with a JSON body."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass
class _History:
    """One stream's chart points and those that came in since the last tick."""

    points: collections.deque[tuple[float, float, int]]
    pending: list[tuple[float, float, int]] = field(default_factory=list)
    rate: collections.deque[tuple[float, int]] = field(
        default_factory=lambda: collections.deque(maxlen=64))


class LiveClient:
    """One connected page: a queue of encoded frames, filled by the hub."""

    def __init__(self) -> None:
        self._frames: collections.deque[bytes] = collections.deque()
        self._cond = threading.Condition()
        self.closed = False

    def put(self, frame: bytes) -> None:
        with self._cond:
            if len(self._frames) >= CLIENT_BACKLOG:
                self.closed = True  # too slow: it reconnects and starts from a snapshot
            else:
                self._frames.append(frame)
            self._cond.notify()

    def get(self, timeout: float) -> bytes | None:
        """The next frame, or None after ``timeout`` (time for a keep-alive) or when closed."""
        with self._cond:
            if not self._frames and not self.closed:
                self._cond.wait(timeout)
            return self._frames.popleft() if self._frames and not self.closed else None

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify()


class LiveView:
    """Feeds on the agent's events; serves snapshots and updates to at most N clients."""

    def __init__(self, agent: Agent, cfg: LiveConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._agent = agent
        self.cfg = cfg
        self._clock = clock
        self._lock = threading.Lock()
        self._hist = {p.cfg.name: _History(collections.deque(maxlen=cfg.points))
                      for p in agent.streams}
        self._clients: set[LiveClient] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._status_lock = threading.Lock()  # the hub and a connecting client both refresh
        self._status: dict[str, Any] = {}
        self._status_at = -1e18
        self._sent_status: dict[str, Any] | None = None
        self.frames = 0  # update frames encoded (only while a client is connected)
        self.refused = 0  # connections refused over max_clients
        agent.observers.append(self.observe)

    # -- observer hook: network and inference threads; cheap, never raises ---------------

    def observe(self, p: StreamPipeline, events: list[Event]) -> None:
        """Turn each scored batch into a pending chart point (its peak score)."""
        for e in events:
            if not isinstance(e, ScoreBatch) or not len(e.anomaly):
                continue
            pt = (float(e.end_ts[-1]), round(float(e.anomaly.max()), 4), int(e.episode.max()))
            with self._lock:
                h = self._hist.get(e.stream)
                if h is None:
                    continue
                if len(h.pending) >= PENDING_MAX:
                    pt = _merge([h.pending.pop(), pt])
                h.pending.append(pt)

    # -- clients (HTTP handler threads) ---------------------------------------------------

    def connect(self) -> tuple[LiveClient, bytes] | None:
        """A new client and its snapshot frame, or None when ``max_clients`` are connected."""
        with self._lock:
            if len(self._clients) >= self.cfg.max_clients:
                self.refused += 1
                return None
            client = LiveClient()
            self._clients.add(client)
            points = {n: list(h.points) for n, h in self._hist.items()}
        status = self._agent_status(force=True)
        snap = {**status, "max_points": self.cfg.points, "rate_hz": self.cfg.rate_hz,
                "streams": {n: {**status["streams"][n], "points": _columns(points[n])}
                            for n in points}}
        log.info("live view: client connected (%d of at most %d)", len(self._clients),
                 self.cfg.max_clients)
        return client, b"retry: %d\n\n" % RETRY_MS + sse("snapshot", snap)

    def disconnect(self, client: LiveClient) -> None:
        client.close()
        with self._lock:
            self._clients.discard(client)

    @property
    def clients(self) -> int:
        return len(self._clients)

    # -- hub thread -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="live", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            c.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        period = 1.0 / self.cfg.rate_hz
        while not self._stop.wait(period):
            try:
                self.tick()
            except Exception:  # the page must never take the agent down
                log.exception("live view update failed")

    def tick(self) -> None:
        """Close the pending points; send one coalesced update to every client."""
        new: dict[str, list[tuple[float, float, int]]] = {}
        with self._lock:
            for name, h in self._hist.items():
                if h.pending:
                    pts, h.pending = _thin(h.pending), []
                    h.points.extend(pts)
                    new[name] = pts
            clients = list(self._clients)
        if not clients:
            return
        status = self._agent_status()
        if status is not self._sent_status and _same(status, self._sent_status):
            self._sent_status = status  # only the uptime moved: nothing worth a frame
        if not new and status is self._sent_status:
            return
        update: dict[str, Any] = {"streams": {}}
        for p in self._agent.streams:
            name = p.cfg.name
            s: dict[str, Any] = {"state": p.state, "windows": p.windows_scored}
            if name in new:
                s["points"] = _columns(new[name])
            update["streams"][name] = s
        if status is not self._sent_status:
            update = {**status, "streams": {n: {**status["streams"][n], **s}
                                            for n, s in update["streams"].items()}}
        self._sent_status = status
        frame = sse("update", update)
        self.frames += 1
        for c in clients:
            c.put(frame)

    def _agent_status(self, force: bool = False) -> dict[str, Any]:
        """Connections, backlog, fleet and per-stream counters, refreshed about once a second."""
        with self._status_lock:
            now = self._clock()
            if force or now - self._status_at >= 1.0:
                self._status = self._read_status(now)
                self._status_at = now
            return self._status

    def _read_status(self, now: float) -> dict[str, Any]:
        a = self._agent
        bad = dict(a.bad_input.counts)  # one C-level copy: safe against concurrent adds
        streams: dict[str, Any] = {}
        for p in a.streams:
            st = p.status()
            h = self._hist[p.cfg.name]
            h.rate.append((now, p.windows_scored))
            while len(h.rate) > 2 and now - h.rate[1][0] >= RATE_SPAN_S:
                h.rate.popleft()
            (t0, w0), (t1, w1) = h.rate[0], h.rate[-1]
            streams[p.cfg.name] = {
                "state": st["state"], "model": st["model"], "model_version": st["model_version"],
                "samples": st["samples"], "windows": st["windows"],
                "windows_per_s": round((w1 - w0) / (t1 - t0), 1) if t1 > t0 else 0.0,
                "windows_dropped": st["windows_dropped"], "alerts": st["alerts"],
                "episode": st["episode"], "threshold": st["threshold"],
                "bad_input": sum(n for (_, topic), n in bad.items()
                                 if topic != "*" and topic_matches_sub(p.cfg.topic, topic)),
            }
        fleet = a.fleet.stats() if a.fleet is not None else None
        return {
            "device": a.cfg.device_id, "version": __version__,
            "uptime_s": round(time.time() - a.started_at, 1),
            "local_connected": a.local_connected.is_set(),
            "upstream_connected": a.uplink.connected.is_set(),
            "backlog": len(a.outbox),
            "bad_input": sum(bad.values()),
            "fleet": None if fleet is None else {"rollout": fleet["rollout"],
                                                 "swaps": fleet["swaps"],
                                                 "rollbacks": fleet["rollbacks"]},
            "streams": streams,
        }


def _merge(pts: list[tuple[float, float, int]]) -> tuple[float, float, int]:
    """One point for several: the last end time, the peak score, any open episode."""
    return pts[-1][0], max(p[1] for p in pts), max(p[2] for p in pts)


def _thin(pts: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """At most POINTS_PER_TICK points, each merging a run of consecutive ones."""
    if len(pts) <= POINTS_PER_TICK:
        return pts
    step = -(-len(pts) // POINTS_PER_TICK)
    return [_merge(pts[i:i + step]) for i in range(0, len(pts), step)]


def _same(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
    return b is not None and {**a, "uptime_s": 0} == {**b, "uptime_s": 0}


def _columns(points: list[tuple[float, float, int]]) -> dict[str, list[Any]]:
    return {"ts": [p[0] for p in points], "score": [p[1] for p in points],
            "episode": [p[2] for p in points]}
