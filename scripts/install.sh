#!/usr/bin/env bash
# Install edge-agent as a system service on a device (Debian / Raspberry Pi OS /
# Jetson Linux). Idempotent: run it again to upgrade; the config is kept.
#
#   sudo ./scripts/install.sh                 # install or upgrade, enable the unit
#   sudo ./scripts/install.sh --uninstall     # remove the unit and the venv; keep config and state
#   sudo ./scripts/install.sh --uninstall --purge   # ... and the config and state too
#
# What it puts where:
#   /usr/lib/sysusers.d/edge-agent.conf   the edge-agent system user (systemd-sysusers)
#   /opt/edge-agent/venv                  a venv with this checkout installed (pip, from PyPI)
#   /opt/edge-agent/README.md             so the unit's Documentation= link resolves
#   /etc/edge-agent/agent.yaml            from config/agent.example.yaml, only if absent
#   /etc/edge-agent/agent.example.yaml    always the current example
#   /etc/systemd/system/edge-agent.service, enabled for multi-user.target
#   /var/lib/edge-agent                   state (outbox); systemd creates it (StateDirectory=)
#
# Options:
#   --root DIR   install into DIR as if it were / (for images and tests): nothing is
#                started, `systemctl --root` enables the unit, users go into DIR/etc/passwd
#   --no-venv    do not create or update the venv (it needs PyPI; the tests use this)
#   --python PY  interpreter for the venv (default python3; 3.10 or newer)
#   --jetson     also install systemd/jetson.conf (GPU device nodes, MemoryMax) as a drop-in
set -euo pipefail
# The service user must be able to read what root installs, whatever root's umask is.
umask 022

SRC="$(cd "$(dirname "$0")/.." && pwd)"
ROOT=""
VENV=1
UNINSTALL=0
PURGE=0
JETSON=0
PYTHON=python3

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit "${1:-2}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || usage; ROOT="$(realpath -m "$2")"; shift 2 ;;
        --no-venv) VENV=0; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --purge) PURGE=1; shift ;;
        --python) [ $# -ge 2 ] || usage; PYTHON="$2"; shift 2 ;;
        --jetson) JETSON=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown option: $1" >&2; usage ;;
    esac
done
if [ "$PURGE" -eq 1 ] && [ "$UNINSTALL" -eq 0 ]; then
    echo "install.sh: --purge goes with --uninstall" >&2; exit 2
fi
if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (sudo), or give --root DIR" >&2; exit 1
fi

UNIT=edge-agent.service
OPT="$ROOT/opt/edge-agent"
ETC="$ROOT/etc/edge-agent"
UNIT_DIR="$ROOT/etc/systemd/system"
SYSUSERS="$ROOT/usr/lib/sysusers.d/edge-agent.conf"
STATE="$ROOT/var/lib/edge-agent"
# systemd is managing this machine (not a chroot, container build or --root tree).
LIVE=0
if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then LIVE=1; fi

say() { echo "install.sh: $*"; }

systemctl_() {
    if [ -n "$ROOT" ]; then systemctl --root="$ROOT" "$@"; else systemctl "$@"; fi
}

if [ "$UNINSTALL" -eq 1 ]; then
    if [ "$LIVE" -eq 1 ]; then
        systemctl disable --now "$UNIT" 2>/dev/null || true
    elif [ -f "$UNIT_DIR/$UNIT" ]; then
        systemctl_ disable "$UNIT" 2>/dev/null || true
    fi
    rm -f "$UNIT_DIR/$UNIT" "$UNIT_DIR/multi-user.target.wants/$UNIT" "$UNIT_DIR/$UNIT.d/jetson.conf"
    if [ "$LIVE" -eq 1 ]; then systemctl daemon-reload; fi
    rm -rf "$OPT"
    if [ "$PURGE" -eq 1 ]; then
        rm -rf "$ETC" "$STATE" "$ROOT/var/lib/private/edge-agent"
        say "removed the service, the venv, the config and the state"
    else
        say "removed the service and the venv; kept ${ETC#"$ROOT"} and ${STATE#"$ROOT"} (--purge removes them)"
    fi
    # The system user stays, as Debian does for package users: files it owned may remain.
    exit 0
fi

# -- the system user -----------------------------------------------------------------
install -D -m 0644 /dev/stdin "$SYSUSERS" <<'EOF'
# edge-agent's service user (see systemd/edge-agent.service)
u edge-agent - "edge-agent service" /var/lib/edge-agent /usr/sbin/nologin
EOF
if command -v systemd-sysusers >/dev/null 2>&1; then
    if [ -n "$ROOT" ]; then
        mkdir -p "$ROOT/etc"
        systemd-sysusers --root="$ROOT" "$SYSUSERS"
    else
        systemd-sysusers "$SYSUSERS"
    fi
elif ! grep -q '^edge-agent:' "$ROOT/etc/passwd" 2>/dev/null; then
    useradd ${ROOT:+--root "$ROOT"} --system --user-group --home-dir /var/lib/edge-agent \
        --no-create-home --shell /usr/sbin/nologin edge-agent
fi
GID="$(awk -F: '$1 == "edge-agent" { print $3 }' "$ROOT/etc/group")"
[ -n "$GID" ] || { echo "install.sh: group edge-agent was not created" >&2; exit 1; }

# -- the venv --------------------------------------------------------------------------
mkdir -p "$OPT"
install -m 0644 "$SRC/README.md" "$OPT/README.md"
if [ "$VENV" -eq 1 ]; then
    if [ ! -x "$OPT/venv/bin/python" ]; then
        "$PYTHON" -m venv "$OPT/venv"
    fi
    "$OPT/venv/bin/python" -m pip install -q --upgrade pip
    # A regular (not editable) install: the checkout can go away afterwards.
    "$OPT/venv/bin/python" -m pip install -q --upgrade "$SRC"
    say "installed $("$OPT/venv/bin/edge-agent" --version) into ${OPT#"$ROOT"}/venv"
else
    say "--no-venv: ${OPT#"$ROOT"}/venv not created or updated"
fi

# -- the config ------------------------------------------------------------------------
# root:edge-agent, so the service can read what only root may change.
OWN=()
if [ "$(id -u)" -eq 0 ]; then OWN=(-o 0 -g "$GID"); fi
install -d -m 0750 "${OWN[@]}" "$ETC"
install -m 0640 "${OWN[@]}" "$SRC/config/agent.example.yaml" "$ETC/agent.example.yaml"
FRESH=0
if [ ! -e "$ETC/agent.yaml" ]; then
    # Group-readable only: it may hold broker passwords.
    install -m 0640 "${OWN[@]}" "$SRC/config/agent.example.yaml" "$ETC/agent.yaml"
    FRESH=1
    say "wrote ${ETC#"$ROOT"}/agent.yaml from the example: set device_id, brokers and streams"
else
    say "kept ${ETC#"$ROOT"}/agent.yaml"
fi

# -- the unit --------------------------------------------------------------------------
install -D -m 0644 "$SRC/systemd/$UNIT" "$UNIT_DIR/$UNIT"
if [ "${JETSON:-0}" -eq 1 ]; then
    install -D -m 0644 "$SRC/systemd/jetson.conf" "$UNIT_DIR/$UNIT.d/jetson.conf"
    say "installed the Jetson drop-in ${UNIT_DIR#"$ROOT"}/$UNIT.d/jetson.conf"
fi
if [ "$LIVE" -eq 1 ]; then
    systemctl daemon-reload
    systemctl enable "$UNIT"
    if [ "$FRESH" -eq 1 ]; then
        say "enabled; edit /etc/edge-agent/agent.yaml, then: systemctl start edge-agent"
    else
        systemctl restart "$UNIT"
        say "enabled and (re)started; logs: journalctl -u edge-agent -f"
    fi
else
    # No running systemd (an image build, a container, --root): enable offline.
    systemctl_ enable "$UNIT"
    say "enabled ${UNIT} under ${ROOT:-/} (not started: systemd is not running here)"
fi
