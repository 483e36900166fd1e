"""The ``edge-agent`` command line: thin commands over the package's API."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from agent import __version__
from agent.config import AgentConfig, ConfigError, load_config
from agent.model import ModelError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="MQTT edge agent: sensor windows -> quantized model -> alerts upstream.")

log = logging.getLogger("agent")

_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                    logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    """``<priority>message``: journald reads the level from the prefix and adds its own time."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _SYSLOG_PRIORITY.get(record.levelno, 6)
        # journald takes each line as a record: a traceback keeps the error's priority.
        lines = super().format(record).splitlines() or [""]
        first = f"<{prio}>{record.name}: {lines[0]}"
        return "\n".join([first, *(f"<{prio}>  {line}" for line in lines[1:])])


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("paho").setLevel(logging.WARNING)


# sysexits.h EX_CONFIG: the unit's RestartPreventExitStatus= keeps systemd from
# restarting an agent whose config can never work.
EXIT_CONFIG = 78


def _load(path: Path, exit_code: int = 1) -> AgentConfig:
    try:
        return load_config(path)
    except ConfigError as e:
        for line in e.problems:
            typer.echo(line, err=True)
        raise typer.Exit(exit_code) from None


def _version_cb(value: bool) -> None:
    if value:
        typer.echo(f"edge-agent {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version_cb, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """edge-agent."""


ConfigArg = Annotated[Path, typer.Option("--config", "-c", envvar="EDGE_AGENT_CONFIG",
                                         help="YAML config file.")]


@app.command()
def run(config: ConfigArg = Path("/etc/edge-agent/agent.yaml")) -> None:
    """Run the agent until SIGTERM or SIGINT; SIGHUP re-reads the config."""
    from agent.app import Agent  # noqa: PLC0415
    from agent.service import AgentService  # noqa: PLC0415

    cfg = _load(config, EXIT_CONFIG)
    setup_logging(cfg.log_level)
    # systemd's watchdog kills with SIGABRT: print every thread's stack first, so
    # the journal shows where the pipeline was stuck.
    faulthandler.enable()
    # Until the service exists, a stop just ends the start-up and a reload waits;
    # without these, SIGHUP while the models load would kill the process.
    early: list[int] = []

    def _early(signum: int, frame: Any) -> None:
        early.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _early)
    try:
        agent = Agent(cfg)
        service = AgentService(agent, config)
    except (ModelError, OSError) as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1) from None

    def _on_signal(signum: int, frame: Any) -> None:
        if signum == signal.SIGHUP:
            log.info("received SIGHUP, reloading %s", config)
            service.request_reload()
        else:
            log.info("received %s, stopping", signal.Signals(signum).name)
            service.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    for signum in early:
        _on_signal(signum, None)
    service.run()


@app.command("check-config")
def check_config(config: Annotated[Path, typer.Argument(help="YAML config file.")]) -> None:
    """Validate a config (and its models); print `path: problem` lines, exit 1 on any."""
    from agent.app import open_stream  # noqa: PLC0415

    cfg = _load(config)
    problems = []
    for i, s in enumerate(cfg.streams):
        try:
            open_stream(cfg, s)
        except ModelError as e:
            problems.append(f"streams[{i}].model: {e}")
    for p in problems:
        typer.echo(p, err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{config}: ok ({len(cfg.streams)} stream(s))")


@app.command()
def demo(
    speed: Annotated[float, typer.Option(help="Replay speed in samples per second.")] = 200.0,
    source: Annotated[str, typer.Option(
        help="'auto' (a SKAB file from ../shared/data when present, else the generator), "
             "'generator', or a SKAB-style CSV path.")] = "auto",
    limit: Annotated[int, typer.Option(help="Stop after this many samples (0: whole source).")]
    = 0,
) -> None:
    """Start a throw-away broker, replay sensor data through the agent, show what it does."""
    from agent.demo import run_demo  # noqa: PLC0415

    setup_logging("warning")
    raise typer.Exit(run_demo(speed=speed, source=source, limit=limit))


def main() -> None:
    app()
