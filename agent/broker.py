"""A throw-away mosquitto on a free loopback port (for the demo and the tests)."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["BrokerError", "LocalBroker", "find_mosquitto", "free_port"]

START_TIMEOUT_S = 10.0


class BrokerError(RuntimeError):
    """mosquitto is missing or did not start."""


def find_mosquitto() -> str:
    """The mosquitto binary; Debian puts it in /usr/sbin, off many users' PATH."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise BrokerError("mosquitto not found: run ./scripts/setup.sh "
                          "(or apt-get install mosquitto mosquitto-clients)")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalBroker:
    """``mosquitto -c <conf>`` on 127.0.0.1:<free port>; ``start()`` returns when it accepts."""

    def __init__(
        self,
        conf_template: str | None = None,
        port: int | None = None,
        workdir: Path | None = None,
        extra: str = "",
    ) -> None:
        self.port = port or free_port()
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="edge-agent-broker-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        template = conf_template or "listener {port} 127.0.0.1\nallow_anonymous true\n"
        self.conf_path.write_text(
            template.format(port=self.port, workdir=self.workdir)
            # mosquitto started as root drops to user "mosquitto" unless told to stay.
            + f"\nuser {getpass.getuser()}\n" + extra
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LocalBroker:
        exe = find_mosquitto()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([exe, "-c", str(self.conf_path)], stdout=log,
                                     stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"mosquitto exited with {self.proc.returncode}: "
                                  f"{self.log_path.read_text(errors='replace')[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise BrokerError(f"mosquitto did not accept connections on {self.port} within "
                          f"{START_TIMEOUT_S:.0f} s")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Start again on the same port (after ``stop``), e.g. for outage tests."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

