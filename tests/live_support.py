"""Helpers for the live view tests: a free port, an SSE reader, an agent with the live page."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from .conftest import agent_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def live_config(tmp_path, broker_port: int, health_port: int, **live: Any) -> dict[str, Any]:
    cfg = agent_config(tmp_path, broker_port)
    cfg["service"] = {"health": {"port": health_port}, "live": live}
    return cfg


class SseReader:
    """Reads a /events stream on a thread; keeps every event, comment and retry hint."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.events: list[tuple[str, Any]] = []
        self.lines: list[str] = []
        self.times: list[float] = []
        self._cond = threading.Condition()
        self.resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                           timeout=30)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        event, data = "message", []
        try:
            for raw in self.resp:
                line = raw.decode().rstrip("\n")
                with self._cond:
                    self.lines.append(line)
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif not line and data:
                        self.events.append((event, json.loads("\n".join(data))))
                        self.times.append(time.monotonic())
                        event, data = "message", []
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self.lines.append("<closed>")
                self._cond.notify_all()

    def wait_for(self, pred: Callable[[SseReader], bool], timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def of(self, kind: str) -> list[Any]:
        with self._cond:
            return [d for e, d in self.events if e == kind]

    def close(self) -> None:
        self.resp.close()
