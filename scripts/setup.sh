#!/usr/bin/env bash
# One set-up command for a fresh Debian / Raspberry Pi OS machine. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if ! command -v mosquitto >/dev/null 2>&1 || ! command -v mosquitto_pub >/dev/null 2>&1; then
    echo "setup: mosquitto (+ clients) not found; installing with apt-get" >&2
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "setup: cannot install mosquitto: not root and no sudo. Run: apt-get install mosquitto mosquitto-clients" >&2
        exit 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: no apt-get here; install mosquitto and mosquitto-clients with your package manager" >&2
        exit 1
    fi
    # The broker is only needed as a binary; don't leave a system instance bound to 1883.
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends mosquitto mosquitto-clients
fi
# mosquitto lives in /usr/sbin on Debian, which is not on every user's PATH.
if ! command -v mosquitto >/dev/null 2>&1 && [ -x /usr/sbin/mosquitto ]; then
    echo "setup: note: mosquitto is in /usr/sbin (the agent and tests look there too)" >&2
fi

# systemd-analyze checks the unit in the tests (systemd/edge-agent.service); a
# minimal container image may lack it. Debian ships it in the systemd package.
if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "setup: systemd-analyze not found; installing the systemd package with apt-get" >&2
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "setup: cannot install systemd: not root and no sudo. Run: apt-get install systemd" >&2
        exit 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: no apt-get here; install systemd (for systemd-analyze) with your package manager" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends systemd
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# Reinstall only when the dependency list changed since the last run.
STAMP="$VENV/.edge-agent-deps"
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ] || ! "$VENV/bin/python" -c "import agent" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".[dev]"
    echo "$WANT" > "$STAMP"
fi
echo "setup: ok ($("$VENV/bin/edge-agent" --version))"
