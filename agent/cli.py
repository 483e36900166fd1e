"""The ``edge-agent`` command line: thin commands over the package's API."""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from agent import __version__
from agent.config import AgentConfig, ConfigError, load_config
from agent.fleet.cli import fleet_app, models_app
from agent.scoring import ModelError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="MQTT edge agent: sensor windows -> quantized model -> alerts upstream.")

app.add_typer(fleet_app, name="fleet")
app.add_typer(models_app, name="models")

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
    from agent.daemon import Agent  # noqa: PLC0415
    from agent.service.affinity import pin_cpu  # noqa: PLC0415
    from agent.service.preflight import bind_problem, preflight  # noqa: PLC0415
    from agent.service.service import AgentService  # noqa: PLC0415

    cfg = _load(config, EXIT_CONFIG)
    # Configuration or environment that cannot work: exit 78 so systemd stops
    # restarting it every 5 s; models are checked by loading them below.
    problems = preflight(cfg, models=False)
    for line in problems:
        typer.echo(line, err=True)
    if problems:
        raise typer.Exit(EXIT_CONFIG)
    setup_logging(cfg.log_level)
    # Before any thread starts: those it starts inherit the CPU (see agent/service/affinity).
    cpu = pin_cpu(cfg)
    log.info("running on CPU %s (service.cpu: %s)", "any" if cpu is None else cpu, cfg.service.cpu)
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
    except ModelError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    except OSError as e:  # state_dir or outbox: the check above passed, the start did not
        typer.echo(f"state_dir: {cfg.state_dir}: {e}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    try:
        service = AgentService(agent, config)
    except OSError as e:  # the health port, taken since the check above
        hc = cfg.service.health
        typer.echo(bind_problem(hc.host, hc.port, e), err=True)
        raise typer.Exit(EXIT_CONFIG) from None

    def _on_signal(signum: int, frame: Any) -> None:
        # Flags and a socket write only: logging or locking here can deadlock the
        # thread the signal interrupted. The service loop logs what it was asked.
        if signum == signal.SIGHUP:
            service.request_reload()
        else:
            service.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    for signum in early:
        _on_signal(signum, None)
    service.run()


@app.command("check-config")
def check_config(config: Annotated[Path, typer.Argument(help="YAML config file.")]) -> None:
    """Validate a config, its models, state_dir, ports and TLS files; exit 1 on any problem.

    For each stream it also prints the inference backend it will use and why (and why the
    backends ranked above it are not used).
    """
    from agent.scoring.registry import open_stream_model, plan_backends  # noqa: PLC0415
    from agent.service.preflight import preflight  # noqa: PLC0415

    cfg = _load(config)
    problems = preflight(cfg, models=False)  # state_dir, ports, TLS files, topic filters
    for i, s in enumerate(cfg.streams):
        try:
            card, scorer = open_stream_model(cfg, s)
        except ModelError as e:
            problems.append(f"streams[{i}].model: {e}")
            continue
        backend = getattr(scorer, "backend", None)
        if backend is None:
            typer.echo(f"stream {s.name}: detector {card.format} (model: none; no backend)")
            continue
        typer.echo(f"stream {s.name}: model {card.name} v{card.version}, backend "
                   f"{backend.selection or type(backend).__name__}")
        for why in plan_backends(card, s)[1]:
            typer.echo(f"  not used: {why}")
    for p in problems:
        typer.echo(p, err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{config}: ok ({len(cfg.streams)} stream(s))")


@app.command()
def replay(  # noqa: PLR0917  (typer maps each option to a parameter)
    config: ConfigArg,
    csv_file: Annotated[Path, typer.Option("--csv", help="Recorded CSV, one row per reading.")],
    out: Annotated[Path, typer.Option("--out", help="Output CSV: timestamp, inputs, score "
                                      "in [0, 1] (0.5 = at the threshold), alert 0/1.")],
    stream: Annotated[str | None, typer.Option(help="Stream to replay (needed when the "
                                                    "config has several).")] = None,
    delimiter: Annotated[str, typer.Option(help="CSV delimiter (SKAB: ';').")] = ",",
    time_column: Annotated[str, typer.Option(help="Timestamp column (SKAB: datetime); "
                                                  "ISO 8601 or epoch s/ms.")] = "timestamp",
    columns: Annotated[str | None, typer.Option(help="Comma-separated CSV columns that feed "
                                                     "the stream's fields, in order "
                                                     "(default: columns named like the "
                                                     "fields).")] = None,
) -> None:
    """Run a recorded CSV through the live pipeline (minus MQTT); write scores and alerts."""
    from agent.replay import CsvLayout, ReplayError  # noqa: PLC0415
    from agent.replay import replay as run_replay  # noqa: PLC0415

    cfg = _load(config)
    setup_logging("warning")
    layout = CsvLayout(delimiter=delimiter.replace("\\t", "\t"), time_column=time_column,
                       columns=tuple(c.strip() for c in columns.split(",")) if columns else None)
    try:
        r = run_replay(cfg, csv_file, out, stream=stream, layout=layout)
    except (ReplayError, ModelError) as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{out}: {r.rows} rows ({r.rows_skipped} skipped: no time or not numbers), "
               f"{r.windows} windows scored, {r.alerts} alerts, {r.drift_events} drift "
               f"detections, final threshold {r.threshold}")


state_app = typer.Typer(no_args_is_help=True, help="Adaptation state under state_dir.")
app.add_typer(state_app, name="state")


@state_app.command("reset")
def state_reset(
    stream: Annotated[str, typer.Option(help="Stream whose adaptation state to forget.")],
    config: ConfigArg = Path("/etc/edge-agent/agent.yaml"),
) -> None:
    """Forget a stream's adaptation state (stop the agent first: it saves its state on stop)."""
    from agent import state  # noqa: PLC0415

    cfg = _load(config)
    if stream not in {s.name for s in cfg.streams}:
        typer.echo(f"no stream {stream!r} in {config}", err=True)
        raise typer.Exit(1)
    path = state.checkpoint_path(cfg.resolve(cfg.state_dir), stream)
    if state.reset(cfg.resolve(cfg.state_dir), stream):
        typer.echo(f"{path}: removed; the stream warms up again on the next start")
    else:
        typer.echo(f"{path}: no saved state")


@app.command()
def demo(  # noqa: PLR0917  (typer maps each option to a parameter)
    speed: Annotated[float, typer.Option(help="Replay speed in samples per second.")] = 200.0,
    source: Annotated[str, typer.Option(
        help="'auto' (SKAB's valve1/5.csv under $EDGE_AGENT_DATA when set, else the "
             "generator), "
             "'generator', or a SKAB-style CSV path.")] = "auto",
    limit: Annotated[int, typer.Option(help="Stop after this many samples (0: whole source).")]
    = 0,
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Serve the live page and "
                                             "print its URL, but open no browser.")] = False,
    headless: Annotated[bool, typer.Option("--headless", help="No page and no browser: the "
                                           "console output only (CI).")] = False,
    port: Annotated[int, typer.Option(help="Port of the live page on 127.0.0.1 (a free one "
                                           "if taken).")] = 8765,
) -> None:
    """Start a throw-away broker, replay sensor data through the agent, show what it does
    in the console and on the live page."""
    from agent.demo import run_demo  # noqa: PLC0415

    setup_logging("warning")
    raise typer.Exit(run_demo(speed=speed, source=source, limit=limit, page=not headless,
                              browser=not (no_browser or headless), port=port))


@app.command()
def watch(  # noqa: PLR0917  (typer maps each option to a parameter)
    config: ConfigArg = Path("/etc/edge-agent/agent.yaml"),
    url: Annotated[str | None, typer.Option(help="The agent's /events URL (default: from the "
                                                 "config's service.health).")] = None,
    token: Annotated[str | None, typer.Option(envvar="EDGE_AGENT_TOKEN",
                                              help="service.health.token, when one is set.")]
    = None,
    broker: Annotated[str | None, typer.Option(help="Read one device's upstream topics from "
                                                    "this broker (HOST[:PORT]) instead.")]
    = None,
    device: Annotated[str | None, typer.Option(help="With --broker: the device id.")] = None,
    prefix: Annotated[str, typer.Option(help="With --broker: the upstream topic prefix.")]
    = "edge",
    interval: Annotated[float, typer.Option(help="Seconds between redraws.")] = 0.5,
    frames: Annotated[int, typer.Option(help="Stop after this many redraws (0: until Ctrl-C).")]
    = 0,
) -> None:
    """A terminal view of every stream: state, counters, a score sparkline (over SSH)."""
    import threading  # noqa: PLC0415
    import time  # noqa: PLC0415

    from rich.console import Console  # noqa: PLC0415
    from rich.live import Live  # noqa: PLC0415

    from agent.watch import WatchModel, read_mqtt, read_sse, render  # noqa: PLC0415

    stop = threading.Event()
    close = None
    if broker is not None:
        if not device:
            typer.echo("--broker needs --device", err=True)
            raise typer.Exit(2)
        host, _, port = broker.partition(":")
        model = WatchModel(f"mqtt://{broker} {prefix}/{device}")
        close = read_mqtt(host, int(port or 1883), device, prefix, model)
    else:
        if url is None:
            cfg = _load(config)
            hc = cfg.service.health
            if not hc.port or not cfg.service.live.enabled:
                typer.echo(f"{config}: service.health.port is 0 or service.live is off; "
                           "pass --url or --broker", err=True)
                raise typer.Exit(1)
            url = f"http://{hc.host}:{hc.port}/events"
            token = token or hc.token
        model = WatchModel(url)
        threading.Thread(target=read_sse, args=(url, model, stop, token), daemon=True,
                         name="watch-events").start()
    console = Console()
    shown = 0
    try:
        if console.is_terminal:
            with Live(render(model), console=console, auto_refresh=False) as live:
                while not frames or shown < frames:
                    time.sleep(interval)
                    live.update(render(model), refresh=True)
                    shown += 1
        else:
            # Piped or logged: one plain frame per interval, wide enough not to wrap.
            console = Console(width=max(console.width, 160))
            while not frames or shown < frames:
                time.sleep(interval)
                console.print(render(model))
                console.print(f"-- {time.strftime('%H:%M:%S')}", style="dim")
                shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        if close is not None:
            close()


outbox_app = typer.Typer(no_args_is_help=True, help="Inspect the store-and-forward outbox.")
app.add_typer(outbox_app, name="outbox")


def _open_outbox(config: Path) -> Any:
    from agent.uplink.outbox import Outbox  # noqa: PLC0415

    cfg = _load(config)
    path = cfg.resolve(cfg.state_dir) / "outbox.db"
    if not path.is_file():
        typer.echo(f"no outbox at {path}", err=True)
        raise typer.Exit(1)
    return Outbox(path, synchronous=cfg.outbox.synchronous, max_rows=cfg.outbox.max_rows,
                  max_bytes=cfg.outbox.max_bytes)


@outbox_app.command("stats")
def outbox_stats(config: ConfigArg = Path("/etc/edge-agent/agent.yaml")) -> None:
    """Backlog size by class, oldest message age, evictions and expiries (JSON)."""
    ob = _open_outbox(config)
    typer.echo(json.dumps(ob.stats(), indent=2))
    ob.close()


@outbox_app.command("peek")
def outbox_peek(
    config: ConfigArg = Path("/etc/edge-agent/agent.yaml"),
    limit: Annotated[int, typer.Option(help="How many rows.")] = 10,
    kind: Annotated[str | None, typer.Option(help="Only this class (alert, summary).")] = None,
) -> None:
    """The oldest waiting messages, as they will be sent."""
    import sqlite_utils  # noqa: PLC0415

    ob = _open_outbox(config)
    path = ob.path
    ob.close()
    db = sqlite_utils.Database(path)
    where = "kind = :kind" if kind else None
    for row in db["outbox"].rows_where(where, {"kind": kind} if kind else None,
                                       order_by="seq", limit=limit):
        payload = bytes(row["payload"]).decode(errors="replace")
        typer.echo(f"{row['seq']:>8} {row['kind']:<8} {row['topic']}  {payload[:200]}")


@outbox_app.command("purge")
def outbox_purge(
    config: ConfigArg = Path("/etc/edge-agent/agent.yaml"),
    kind: Annotated[str | None, typer.Option(help="Only this class (alert, summary).")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Really delete.")] = False,
) -> None:
    """Delete waiting messages (they are counted as evicted). Needs --yes."""
    if not yes:
        typer.echo("refusing to purge without --yes", err=True)
        raise typer.Exit(1)
    ob = _open_outbox(config)
    n = ob.purge(kind)
    ob.close()
    typer.echo(f"purged {n} message(s)")


def main() -> None:
    app()
