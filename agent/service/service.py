"""Runs an Agent as a system service: readiness, watchdog, STATUS, reload, clean stop.

systemd (``Type=notify``, ``WatchdogSec=``) learns from here when the agent is
ready, that its pipeline is still progressing, what it is doing, and that it is
stopping. A wedged pipeline stops the watchdog pings, so systemd restarts it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config import ConfigError, load_config
from agent.daemon import Agent
from agent.service.checks import Health, check_pipeline
from agent.service.notify import SystemdNotifier, watchdog_interval

if TYPE_CHECKING:
    from agent.service.health import HealthServer

__all__ = ["WEDGE_ENV", "AgentService"]

log = logging.getLogger(__name__)

# TEST-ONLY fault injection, off unless set: once the file this names exists,
# the inference thread blocks forever, so tests can wedge a real process and see
# the watchdog pings stop. Never set it on a device.
WEDGE_ENV = "EDGE_AGENT_TEST_WEDGE_FILE"
# Main-loop period: how late a signal, READY or a watchdog ping can be.
TICK_S = 1.0
# How often STATUS= is refreshed for `systemctl status`.
STATUS_EVERY_S = 5.0


def _wedge_hook(path: Path) -> Callable[[], None]:
    def hook() -> None:
        if path.exists():
            log.error("%s: %s exists, blocking the inference thread forever (test-only fault)",
                      WEDGE_ENV, path)
            threading.Event().wait()

    return hook


class AgentService:
    """Drives one Agent from start to stop under systemd (or without it)."""

    def __init__(
        self,
        agent: Agent,
        config_path: Path,
        *,
        notifier: SystemdNotifier | None = None,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        env = os.environ if env is None else env
        self.agent = agent
        self.config_path = config_path
        self.notifier = notifier or SystemdNotifier(env)
        self.watchdog_s = watchdog_interval(env)
        self._clock = clock
        # Signal handlers wake the loop through a socket, not an Event: Event.set()
        # takes a lock the loop itself may hold when the signal arrives (a deadlock).
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop_requested = False
        self._reload_requested = False
        self.ready = False
        self.reloads = 0
        self._was_ok = True
        self._next_ping = 0.0
        self._next_status = 0.0
        self._started = 0.0
        wedge = env.get(WEDGE_ENV)
        if wedge:
            log.warning("%s is set: test-only fault injection is armed", WEDGE_ENV)
            agent.step_hooks.append(_wedge_hook(Path(wedge)))
        hc = agent.cfg.service.health
        self.health_server: HealthServer | None = None
        if hc.port:
            # Only with the endpoint on: prometheus_client and http.server cost ~2 MiB.
            from agent.service.health import HealthServer, metrics_registry  # noqa: PLC0415
            from agent.service.live import LiveView  # noqa: PLC0415

            live = LiveView(agent, agent.cfg.service.live) if agent.cfg.service.live.enabled \
                else None
            self.health_server = HealthServer(hc.host, hc.port, self.health,
                                              metrics_registry(agent, self.health), live=live,
                                              token=hc.token)

    # -- called from signal handlers: set flags and wake the loop, nothing else --------

    def request_stop(self) -> None:
        self._stop_requested = True
        self._wake()

    def request_reload(self) -> None:
        self._reload_requested = True
        self._wake()

    def _wake(self) -> None:
        # A full socket buffer already means "wake up": nothing is lost by dropping this.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _sleep(self, tick: float) -> None:
        """Wait up to ``tick`` seconds, or until a signal handler wakes the loop."""
        ready, _, _ = select.select([self._wake_r], [], [], tick)
        if ready:
            with contextlib.suppress(OSError):
                while self._wake_r.recv(4096):
                    pass

    # -- state ----------------------------------------------------------------------

    def health(self) -> Health:
        h = check_pipeline(self.agent, self.agent.cfg.service.stall_after_s)
        if not self.ready:
            return Health(["starting: brokers not connected yet", *h.problems], h.warnings,
                          h.degraded)
        return h

    def status_line(self) -> str:
        a = self.agent
        windows = sum(st.windows_scored for st in a.streams)
        alerts = sum(st.alerts for st in a.streams)
        up = "up" if a.uplink.connected.is_set() else "DOWN"
        loc = "up" if a.local_connected.is_set() else "DOWN"
        degraded = " (OUTBOX DEGRADED: disk full?)" if a.outbox.degraded else ""
        return (f"{len(a.streams)} stream(s), {windows} windows, {alerts} alerts; "
                f"local {loc}, upstream {up}, backlog {len(a.outbox)}{degraded}")

    # -- loop -----------------------------------------------------------------------

    def run(self) -> None:
        """Start the agent, serve until ``request_stop()``, then drain and stop it."""
        self._started = self._clock()
        self.agent.start()
        if self.health_server is not None:
            self.health_server.start()
        try:
            while True:
                # Before READY, look often: systemd (and `systemctl start`) waits on it.
                tick = TICK_S if self.ready else TICK_S / 4
                if self.watchdog_s is not None:
                    tick = min(tick, self.watchdog_s / 4)
                if not self._stop_requested:
                    self._sleep(tick)
                if self._stop_requested:
                    log.info("stop requested, stopping")
                    break
                if self._reload_requested:
                    self._reload_requested = False
                    log.info("reload requested: re-reading %s", self.config_path)
                    self.reload()
                self.step()
        finally:
            self.notifier.stopping("stopping: draining the outbox")
            if self.health_server is not None:
                self.health_server.stop()
            self.agent.stop()
            self.notifier.close()
            self._wake_r.close()
            self._wake_w.close()

    def step(self) -> None:
        """One pass: READY when due, a watchdog ping if the pipeline progresses, STATUS."""
        now = self._clock()
        if not self.ready:
            self._maybe_ready(now)
        h = check_pipeline(self.agent, self.agent.cfg.service.stall_after_s)
        if h.ok != self._was_ok:
            if h.ok:
                log.warning("pipeline progressing again")
            else:
                log.error("pipeline wedged: %s; no more watchdog pings", "; ".join(h.problems))
            self._was_ok = h.ok
            self._next_status = now  # say so in `systemctl status` at once
        if self.ready and h.ok and self.watchdog_s is not None and now >= self._next_ping:
            self.notifier.watchdog()
            # Half the timeout, as sd_watchdog_enabled(3) recommends.
            self._next_ping = now + self.watchdog_s / 2
        if self.ready and now >= self._next_status:
            line = self.status_line() if h.ok else f"WEDGED: {'; '.join(h.problems)}"
            self.notifier.status(line)
            self._next_status = now + STATUS_EVERY_S

    def _maybe_ready(self, now: float) -> None:
        a = self.agent
        both = a.local_connected.is_set() and a.uplink.connected.is_set()
        timeout = a.cfg.service.ready_timeout_s
        if not both and not (timeout > 0 and now - self._started >= timeout):
            return
        self.ready = True
        if both:
            log.info("ready: both brokers connected, %d model(s) loaded", len(a.streams))
        else:
            # A device that boots without its uplink must still collect and queue:
            # being killed by TimeoutStartSec and restarted would help nothing.
            conn = a.ingest.conn if not a.local_connected.is_set() else a.uplink.conn
            log.warning("ready without the %s broker %s after %.0f s (last error: %s); carrying "
                        "on and retrying", conn.name, conn.where, timeout, conn.last_error)
        self.notifier.ready(self.status_line())
        self._next_status = now + STATUS_EVERY_S

    def reload(self) -> list[str]:
        """Re-read the config file; apply what can change live. Returns keys needing a restart."""
        if self.ready:
            self.notifier.reloading()
        try:
            try:
                new = load_config(self.config_path)
            except ConfigError as e:
                log.error("reload: %s does not validate; still running the previous config:\n  %s",
                          self.config_path, "\n  ".join(e.problems))
                return []
            before = self.agent.cfg.log_level
            try:
                restart = self.agent.reload(new)
            except Exception:
                # A reload must never take the running agent down with it.
                log.exception("reload of %s failed; still running the previous config",
                              self.config_path)
                return []
            if self.agent.cfg.log_level != before:
                logging.getLogger().setLevel(self.agent.cfg.log_level.upper())
            self.reloads += 1
            if restart:
                log.warning("reload: these changes need a restart (systemctl restart edge-agent) "
                            "and are NOT applied: %s", ", ".join(restart))
            log.info("reloaded %s", self.config_path)
            return restart
        finally:
            # Also after a refused config: systemd waits for READY=1 after RELOADING=1.
            if self.ready:
                self.notifier.ready(self.status_line())
