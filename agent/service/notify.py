"""systemd's service notification protocol (sd_notify) and watchdog settings.

The protocol is a stable, documented interface (sd_notify(3), "Standalone
Implementations"): newline-separated ``KEY=VALUE`` lines in one datagram to the
AF_UNIX socket named by ``$NOTIFY_SOCKET``. It is a dozen lines, so it is done
here rather than through libsystemd bindings, which need a C toolchain and
libsystemd headers to install on a Pi.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

__all__ = ["SystemdNotifier", "watchdog_interval"]

log = logging.getLogger(__name__)


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """The watchdog timeout systemd set for this process, in seconds; None when there is none."""
    env = os.environ if env is None else env
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    # WATCHDOG_PID names the process the watchdog is meant for; a child that
    # inherited the environment must not ping on its parent's behalf.
    wpid = env.get("WATCHDOG_PID")
    if wpid:
        try:
            if int(wpid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            log.warning("ignoring malformed WATCHDOG_PID=%r", wpid)
            return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r", raw)
        return None
    return usec / 1e6 if usec > 0 else None


class SystemdNotifier:
    """Sends sd_notify datagrams; does nothing when not started by systemd."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address: str | None = None
        addr = env.get("NOTIFY_SOCKET")
        if addr and addr[0] in "/@":
            # A leading '@' is Linux's abstract namespace: the name starts with NUL.
            self.address = "\0" + addr[1:] if addr[0] == "@" else addr
        elif addr:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket path; not notifying systemd", addr)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.sent = 0
        self.errors = 0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; False when not sent (never raises)."""
        if self.address is None:
            return False
        data = "\n".join(line.replace("\n", " ") for line in lines).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.sendto(data, self.address)
            except OSError as e:
                self.errors += 1
                # The manager going away (EPIPE/ENOENT) must not take the agent with it.
                if self.errors == 1:
                    log.warning("sd_notify to %r failed: %s", self.address, e)
                return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def reloading(self) -> bool:
        return self.notify("RELOADING=1")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
