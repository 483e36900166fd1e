"""The systemd unit verifies, and scripts/install.sh builds the expected tree, idempotently."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

UNIT = REPO / "systemd" / "edge-agent.service"
INSTALL = REPO / "scripts" / "install.sh"
EXEC = "/opt/edge-agent/venv/bin/edge-agent"


def _analyze() -> str:
    found = shutil.which("systemd-analyze")
    assert found, "systemd-analyze missing: ./scripts/setup.sh installs it (Debian: systemd)"
    return found


def _unit_with_real_exec(tmp_path: Path) -> Path:
    # verify checks that ExecStart= is executable; point it at this checkout's
    # edge-agent instead of the device path /opt/edge-agent/venv/... (same arguments).
    text = UNIT.read_text()
    assert text.count(EXEC) == 1
    out = tmp_path / "edge-agent.service"
    out.write_text(text.replace(EXEC, str(Path(sys.executable).parent / "edge-agent")))
    return out


def _service_section() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif line and not line.startswith("#") and section == "[Service]":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_unit_verifies(tmp_path):
    r = subprocess.run([_analyze(), "verify", str(_unit_with_real_exec(tmp_path))],
                       capture_output=True, text=True)
    # verify exits 0 even for unknown keys; those show up as warnings on stderr.
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr


def test_verify_would_catch_a_mistake(tmp_path):
    """The check above can fail: a misspelt directive is reported."""
    bad = _unit_with_real_exec(tmp_path)
    bad.write_text(bad.read_text().replace("WatchdogSec=", "WatchdogSecs="))
    r = subprocess.run([_analyze(), "verify", str(bad)], capture_output=True, text=True)
    assert "Unknown key 'WatchdogSecs'" in r.stderr


def test_unit_hardening_exposure(tmp_path):
    # Offline scoring of the sandboxing options (0 = locked down, 100 = none);
    # 20 is "OK" on systemd's scale. A unit without hardening scores ~84.
    r = subprocess.run([_analyze(), "security", "--offline=yes", "--threshold=20",
                        str(_unit_with_real_exec(tmp_path))], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    # ... and the same unit without its sandboxing lines fails that bar.
    bare = tmp_path / "bare" / "edge-agent.service"
    bare.parent.mkdir()
    keep = ("[", "Type=", "ExecStart=", "User=", "Group=", "WantedBy=")
    bare.write_text("\n".join(ln for ln in _unit_with_real_exec(tmp_path).read_text().splitlines()
                              if ln.startswith(keep)) + "\n")
    r = subprocess.run([_analyze(), "security", "--offline=yes", "--threshold=20", str(bare)],
                       capture_output=True, text=True)
    assert r.returncode != 0, r.stdout[-500:]


def test_unit_settings_fit_the_agent():
    s = _service_section()
    assert s["Type"] == ["notify"]
    assert s["Restart"] == ["on-failure"]
    assert s["RestartPreventExitStatus"] == ["78"]  # agent.cli.EXIT_CONFIG
    assert s["ExecStart"] == [f"{EXEC} run --config /etc/edge-agent/agent.yaml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["StateDirectory"] == ["edge-agent"]  # the default state_dir /var/lib/edge-agent
    assert s["ConfigurationDirectory"] == ["edge-agent"]
    for opt in ("ProtectSystem", "ProtectHome", "NoNewPrivileges", "PrivateTmp"):
        assert opt in s
    # Longer than Agent.stop's worst case: 10 s worker join + 5 s drain + 5 s + 2 s uplink.
    assert int(s["TimeoutStopSec"][0]) > 22
    # Longer than the default service.ready_timeout_s (60 s) plus loading the models.
    assert int(s["TimeoutStartSec"][0]) > 60
    # Room for the measured 65-70 MiB RSS plus river's ~85 MiB, within a 512 MB Pi.
    assert s["MemoryMax"] == ["256M"]
    # Stalls are detected after service.stall_after_s (15 s), pings go every WatchdogSec/2.
    assert int(s["WatchdogSec"][0]) >= 2 * 15


def _run_install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALL), "--root", str(root), "--no-venv", *args],
                          capture_output=True, text=True)


def _snapshot(root: Path) -> dict[str, tuple[str, int, str]]:
    """Every path under root: type, mode, and content or link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", 0, os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode, "")
            else:
                out[rel] = ("file", st.st_mode, p.read_bytes().hex())
    return out


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="install.sh sets root:edge-agent "
                                                          "ownership, which needs root")


@needs_root
def test_install_into_a_root_builds_the_expected_tree_and_is_idempotent(tmp_path):
    root = tmp_path / "root"
    r = _run_install(root)
    assert r.returncode == 0, r.stderr
    assert "--no-venv" in r.stdout  # says what it skipped
    etc = root / "etc"
    unit = etc / "systemd/system/edge-agent.service"
    assert unit.read_text() == UNIT.read_text()
    link = etc / "systemd/system/multi-user.target.wants/edge-agent.service"
    assert os.readlink(link) == "/etc/systemd/system/edge-agent.service"  # as systemctl enable
    passwd = {ln.split(":")[0]: ln.split(":") for ln in (etc / "passwd").read_text().splitlines()}
    assert passwd["edge-agent"][5:] == ["/var/lib/edge-agent", "/usr/sbin/nologin"]
    assert int(passwd["edge-agent"][2]) < 1000  # a system user
    gid = int(passwd["edge-agent"][3])
    cfg = etc / "edge-agent/agent.yaml"
    assert cfg.read_text() == (REPO / "config/agent.example.yaml").read_text()
    assert (cfg.stat().st_mode & 0o777, cfg.stat().st_uid, cfg.stat().st_gid) == (0o640, 0, gid)
    assert (etc / "edge-agent").stat().st_mode & 0o777 == 0o750
    assert (root / "usr/lib/sysusers.d/edge-agent.conf").is_file()
    assert (root / "opt/edge-agent/README.md").is_file()
    assert not (root / "opt/edge-agent/venv").exists()

    first = _snapshot(root)
    r2 = _run_install(root)
    assert r2.returncode == 0, r2.stderr
    assert "kept /etc/edge-agent/agent.yaml" in r2.stdout
    assert _snapshot(root) == first

    # An operator's config survives an upgrade.
    cfg.write_text(cfg.read_text().replace("pump-station-7", "pump-station-42"))
    assert _run_install(root).returncode == 0
    assert "pump-station-42" in cfg.read_text()


@needs_root
def test_uninstall_keeps_config_and_state_unless_purged(tmp_path):
    root = tmp_path / "root"
    assert _run_install(root).returncode == 0
    state = root / "var/lib/edge-agent"
    state.mkdir(parents=True)
    (state / "outbox.db").write_bytes(b"not yet delivered")

    r = _run_install(root, "--uninstall")
    assert r.returncode == 0, r.stderr
    assert not (root / "etc/systemd/system/edge-agent.service").exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants/edge-agent.service").exists()
    assert not (root / "opt/edge-agent").exists()
    assert (root / "etc/edge-agent/agent.yaml").is_file()
    assert (state / "outbox.db").read_bytes() == b"not yet delivered"
    assert _run_install(root, "--uninstall").returncode == 0  # twice is fine

    r = _run_install(root, "--uninstall", "--purge")
    assert r.returncode == 0, r.stderr
    assert not (root / "etc/edge-agent").exists() and not state.exists()


def test_install_refuses_bad_usage(tmp_path):
    r = subprocess.run(["bash", str(INSTALL), "--frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown option: --frobnicate" in r.stderr
    r = subprocess.run(["bash", str(INSTALL), "--root", str(tmp_path), "--purge"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--purge goes with --uninstall" in r.stderr
    assert not any(tmp_path.iterdir())  # refused before touching anything


def test_unit_parses_as_ini():
    """Every section is one systemd knows (a stray [Servce] would be silently ignored)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    assert set(parser.sections()) == {"Unit", "Service", "Install"}
    assert parser["Install"]["WantedBy"] == "multi-user.target"
