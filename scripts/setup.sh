#!/usr/bin/env bash
# One set-up command for a fresh Debian / Raspberry Pi OS machine. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

# System tools the agent and its tests need: "command:Debian package".
# systemd-analyze checks the unit in the tests (systemd/edge-agent.service); a minimal
# container image may lack it, and Debian ships it in the systemd package.
# chromium is the browser the live page's test drives through Playwright (Debian's
# build, so no browser is downloaded at test time); EDGE_AGENT_NO_CHROMIUM=1 skips it
# (that test then skips, saying why).
SYSTEM_TOOLS="mosquitto:mosquitto mosquitto_pub:mosquitto-clients mosquitto_passwd:mosquitto openssl:openssl systemd-analyze:systemd"
if [ -z "${EDGE_AGENT_NO_CHROMIUM:-}" ]; then
    SYSTEM_TOOLS="$SYSTEM_TOOLS chromium:chromium"
fi
missing=""
for pair in $SYSTEM_TOOLS; do
    # mosquitto lives in /usr/sbin on Debian, which is not on every user's PATH.
    if ! PATH="$PATH:/usr/sbin:/sbin" command -v "${pair%%:*}" >/dev/null 2>&1; then
        case " $missing " in *" ${pair##*:} "*) ;; *) missing="$missing ${pair##*:}" ;; esac
    fi
done
if [ -n "$missing" ]; then
    echo "setup: installing with apt-get:$missing" >&2
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "setup: cannot install:$missing (not root and no sudo). Run: apt-get install$missing" >&2
        exit 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: no apt-get here; install$missing with your package manager" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Wait for another apt (unattended-upgrades, a parallel setup) instead of failing.
    # shellcheck disable=SC2086
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -q && \
        $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends $missing
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# Reinstall only when the dependency list changed since the last run.
STAMP="$VENV/.edge-agent-deps"
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ] || ! "$VENV/bin/python" -c "import agent" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # onnx: the ONNX Runtime backend is optional at run time, but the tests run it.
    "$VENV/bin/python" -m pip install -q -e ".[dev,onnx]"
    echo "$WANT" > "$STAMP"
fi
echo "setup: ok ($("$VENV/bin/edge-agent" --version))"
