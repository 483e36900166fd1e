"""``edge-agent fleet ...`` (operator) and ``edge-agent models ...`` (device) commands."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer

from agent.config import AgentConfig, ConfigError, load_config
from agent.fleet.manifest import Refusal, generate_key, parse_manifest, public_key_from_b64
from agent.fleet.operator import Broker
from agent.scoring import ModelError, find_model, load_card

fleet_app = typer.Typer(no_args_is_help=True, help="Operator side: keys, signed releases, push, "
                                                   "fleet status.")
models_app = typer.Typer(no_args_is_help=True, help="This device's models: list, info, verify, "
                                                    "rollback.")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", envvar="EDGE_AGENT_CONFIG",
                                         help="YAML config file.")]
BrokerOpt = Annotated[str, typer.Option(help="Cloud broker as host:port.")]
PrefixOpt = Annotated[str, typer.Option(help="Topic prefix (upstream.prefix of the devices).")]
UserOpt = Annotated[str | None, typer.Option(envvar="EDGE_AGENT_FLEET_USER",
                                             help="Broker user name.")]
PasswordOpt = Annotated[str | None, typer.Option(envvar="EDGE_AGENT_FLEET_PASSWORD",
                                                 help="Broker password.")]
CaOpt = Annotated[Path | None, typer.Option(help="CA file: connect with TLS.")]


def _fail(message: str) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(1)


def _broker(spec: str, username: str | None, password: str | None, ca: Path | None) -> Broker:
    host, _, port = spec.rpartition(":")
    if not host or not port.isdigit():
        raise _fail(f"--broker: expected host:port, got {spec!r}")
    return Broker(host, int(port), username, password, str(ca) if ca else None)


# -- operator -------------------------------------------------------------------------


@fleet_app.command()
def keygen(
    out: Annotated[Path, typer.Argument(help="Key name: writes NAME.pem (private) and "
                                              "NAME.pub (public).")],
) -> None:
    """Make an Ed25519 signing key; print the line for the devices' fleet.trusted_keys."""
    pem_path, pub_path = out.with_suffix(".pem"), out.with_suffix(".pub")
    if pem_path.exists():
        raise _fail(f"{pem_path} exists; not overwriting a signing key")
    pem, pub = generate_key()
    fd = os.open(pem_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_text(pub + "\n")
    typer.echo(f"wrote {pem_path} (keep it secret) and {pub_path}")
    typer.echo("add to each device's config under fleet.trusted_keys:")
    typer.echo(f"  {out.name}: \"{pub}\"")


@fleet_app.command()
def sign(  # noqa: PLR0917 (one parameter per CLI option)
    model: Annotated[Path, typer.Argument(help="Model directory (with model.json) or card.")],
    key: Annotated[Path, typer.Option(help="Private key file from fleet keygen.")],
    version: Annotated[int, typer.Option(min=1, help="Release version (must grow).")],
    out: Annotated[Path | None, typer.Option(help="Release directory "
                                                  "(default ./NAME-vVERSION).")] = None,
    key_id: Annotated[str | None, typer.Option(help="Key id (default: the key file's "
                                                    "name).")] = None,
    expires_in: Annotated[float, typer.Option(help="Days until the manifest expires.")] = 30.0,
    chunk_size: Annotated[int, typer.Option(min=64, help="Bytes per chunk.")] = 16384,
    rollback: Annotated[bool, typer.Option(help="Allow devices to install this over a newer "
                                                "version.")] = False,
) -> None:
    """Sign a model into a release directory: manifest.json + model file."""
    from agent.fleet.operator import sign_release  # noqa: PLC0415

    try:
        name = load_card(find_model(str(model), Path.cwd())).name
        path = sign_release(model, key, version=version, key_id=key_id,
                            out=out or Path(f"{name}-v{version}"),
                            expires_in_s=expires_in * 86400, chunk_size=chunk_size,
                            rollback=rollback)
    except (ModelError, OSError, ValueError) as e:
        raise _fail(str(e)) from None
    m = parse_manifest(path.read_bytes())
    typer.echo(f"{path}: {m.name} v{m.version}, {m.size} bytes in {m.chunks} chunk(s), "
               f"sha256 {m.sha256[:12]}..., key {m.key_id}")


@fleet_app.command()
def push(  # noqa: PLR0917 (one parameter per CLI option)
    release: Annotated[Path, typer.Argument(help="Release directory from fleet sign.")],
    broker: BrokerOpt = "localhost:1883",
    group: Annotated[str | None, typer.Option(help="Devices of this fleet.group.")] = None,
    device: Annotated[str | None, typer.Option(help="One device id.")] = None,
    prefix: PrefixOpt = "edge",
    clear: Annotated[bool, typer.Option(help="Delete this release's retained manifest and "
                                             "chunks instead.")] = False,
    username: UserOpt = None,
    password: PasswordOpt = None,
    ca_file: CaOpt = None,
) -> None:
    """Publish a release (chunks, then the manifest; retained QoS 1) to a group or device."""
    from agent.fleet.operator import push_release  # noqa: PLC0415

    b = _broker(broker, username, password, ca_file)
    try:
        r = push_release(release, b, prefix=prefix, group=group, device=device, clear=clear)
    except Refusal as e:
        raise _fail(e.message) from None
    except (OSError, ValueError, TimeoutError) as e:
        raise _fail(str(e)) from None
    what = "cleared" if clear else "pushed"
    typer.echo(f"{what} {r.topic}: {r.messages} messages, {r.payload_bytes} bytes, "
               f"{r.seconds:.2f} s")


@fleet_app.command()
def status(  # noqa: PLR0917 (one parameter per CLI option)
    group: Annotated[str | None, typer.Option(help="Only devices of this group.")] = None,
    broker: BrokerOpt = "localhost:1883",
    prefix: PrefixOpt = "edge",
    wait: Annotated[float, typer.Option(help="Seconds to collect retained statuses.")] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    username: UserOpt = None,
    password: PasswordOpt = None,
    ca_file: CaOpt = None,
) -> None:
    """Table of devices and their model state, from the retained status topics."""
    from agent.fleet.operator import collect_status  # noqa: PLC0415

    b = _broker(broker, username, password, ca_file)
    try:
        rows = collect_status(b, prefix=prefix, group=group, wait_s=wait)
    except OSError as e:
        raise _fail(f"{broker}: {e}") from None
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row, sort_keys=True))
        return
    typer.echo(f"{'DEVICE':<20} {'GROUP':<12} {'STATE':<12} {'MODEL':<16} {'VER':>4}  "
               f"{'ACTIVE':<20} {'AGE':>6}  REASON")
    now = time.time()
    for r in rows:
        active = ",".join(f"{k}:{v}" for k, v in sorted((r.get("active") or {}).items()))
        age = f"{now - float(r.get('ts', now)):.0f}s"
        typer.echo(f"{r.get('device', '?'):<20} {r.get('group', '?'):<12} "
                   f"{r.get('state', '?'):<12} {r.get('model') or '-':<16} "
                   f"{r.get('version') or '-':>4}  {active:<20} {age:>6}  "
                   f"{r.get('reason') or ''}")
    typer.echo(f"{len(rows)} device(s)")


# -- device ---------------------------------------------------------------------------


def _config(path: Path) -> AgentConfig:
    try:
        return load_config(path)
    except ConfigError as e:
        for line in e.problems:
            typer.echo(line, err=True)
        raise typer.Exit(1) from None


@models_app.command("list")
def list_models(config: ConfigOpt = Path("/etc/edge-agent/agent.yaml")) -> None:
    """Each stream's model: configured, delivered versions on disk, active, previous."""
    from agent.fleet.manager import store_for  # noqa: PLC0415

    cfg = _config(config)
    store = store_for(cfg)
    for s in cfg.streams:
        try:
            card = load_card(find_model(s.model, Path(cfg.base_dir)))
        except ModelError as e:
            typer.echo(f"{s.name}: {e}")
            continue
        active, prev = store.active(card.name), store.previous(card.name)
        in_use = (f"delivered v{active.version}" if active and cfg.fleet.enabled
                  else f"configured v{card.version}")
        typer.echo(f"{s.name}: {card.name} ({in_use}; configured v{card.version} at "
                   f"{card.path.parent})")
        for v in store.versions(card.name):
            mark = ("active" if active and v.path == active.path
                    else "previous" if prev and v.path == prev.path else "")
            typer.echo(f"  v{v.version:<5} {v.sha12}  {mark}")
        for sha, r in store.rejected(card.name).items():
            typer.echo(f"  v{r.get('version', '?'):<5} {sha[:12]}  refused: {r.get('code')}")


@models_app.command()
def info(
    name: Annotated[str, typer.Argument(help="Model name (as in its card).")],
    config: ConfigOpt = Path("/etc/edge-agent/agent.yaml"),
) -> None:
    """The card of the version the agent would load now."""
    from agent.fleet.manager import store_for  # noqa: PLC0415

    cfg = _config(config)
    card = store_for(cfg).load_active(name) if cfg.fleet.enabled else None
    source = "delivered"
    if card is None:
        source = "configured"
        try:
            card = load_card(find_model(name, Path(cfg.base_dir)))
        except ModelError as e:
            raise _fail(str(e)) from None
    typer.echo(f"{card.name} v{card.version} ({source}) {card.path}")
    typer.echo(f"  format {card.format}, {card.size} bytes, sha256 {card.sha256}")
    typer.echo(f"  input window {card.window} x {len(card.fields)}: {', '.join(card.fields)}")
    fleet = card.raw.get("fleet")
    if isinstance(fleet, dict):
        typer.echo(f"  signed by {fleet.get('key_id')}, created {fleet.get('created')}, "
                   f"expires {fleet.get('expires')}")


@models_app.command()
def verify(
    file: Annotated[Path, typer.Argument(help="A release (dir or manifest.json) or a "
                                              "model.json card.")],
    config: ConfigOpt = Path("/etc/edge-agent/agent.yaml"),
) -> None:
    """Check a release's signature (against this device's trusted keys) and file; exit 1 if bad."""
    from agent.fleet.manifest import verify_manifest  # noqa: PLC0415
    from agent.fleet.operator import load_release  # noqa: PLC0415

    cfg = _config(config)
    manifest = file / "manifest.json" if file.is_dir() else file
    try:
        raw = json.loads(manifest.read_bytes())
    except (OSError, ValueError) as e:
        raise _fail(f"{manifest}: {e}") from None
    if isinstance(raw, dict) and "schema" not in raw:
        try:  # a plain model card: its file must match
            card = load_card(manifest)
        except ModelError as e:
            raise _fail(f"refused: {e}") from None
        typer.echo(f"ok: {card.name} v{card.version} card matches its file (unsigned card)")
        return
    trusted = {k: public_key_from_b64(v) for k, v in cfg.fleet.trusted_keys.items()}
    try:
        m, _ = load_release(manifest)
        verify_manifest(m, trusted, time.time())
    except Refusal as r:
        raise _fail(f"refused ({r.code}): {r.message}") from None
    except OSError as e:
        raise _fail(f"refused: {e}") from None
    typer.echo(f"ok: {m.name} v{m.version} signed by {m.key_id}, {m.size} bytes, sha256 matches")


@models_app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="Model name.")],
    config: ConfigOpt = Path("/etc/edge-agent/agent.yaml"),
) -> None:
    """Make the previous version active again (restart the agent to load it)."""
    from agent.fleet.manager import store_for  # noqa: PLC0415

    cfg = _config(config)
    store = store_for(cfg)
    active = store.active(name)
    if active is None:
        raise _fail(f"{name}: no delivered version is active (the configured model is in use)")
    card_raw = json.loads(active.card_path.read_text())
    prev = store.switch_back(name)
    target = "the configured model" if prev is None else f"v{prev.version}"
    # Remembered, so the retained manifest does not install it again.
    store.reject(name, str(card_raw.get("sha256")), active.version, "operator_rollback",
                 f"rolled back by the operator on {time.strftime('%Y-%m-%d %H:%M:%S')}")
    typer.echo(f"{name}: v{active.version} -> {target}; restart the agent to load it "
               f"(systemctl restart edge-agent)")
