#!/usr/bin/env bash
# Node-RED, what people use for this today, on the same broker, load and criteria as
# scripts/bench.py: a flow of mqtt in (parsed JSON) -> function (checks the fields) ->
# mqtt out, against the same run's bare paho reference. Prints its sustained rate,
# latency at 1,000 msg/s, idle and peak RSS, and start-up time.
#
#   ./scripts/bench_peer.sh            # full steps (about 2 minutes)
#   ./scripts/bench_peer.sh --quick    # short steps; extra args go to bench.py
#
# Needs node and npm (Node-RED is installed once, with npm, under
# $EDGE_AGENT_PEER_DIR, default ~/.cache/edge-agent/node-red). Not part of
# setup.sh or the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PEER_DIR="${EDGE_AGENT_PEER_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/edge-agent/node-red}"
# 4.x runs on Debian 12's Node.js 18/20; Node-RED 5 needs Node.js 22.9 or later.
NODE_RED_VERSION="${NODE_RED_VERSION:-4.1.8}"

if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
    echo "bench_peer: needs node and npm (Debian: apt-get install nodejs npm)" >&2
    exit 1
fi
NODE_RED="$PEER_DIR/node_modules/.bin/node-red"
if [ ! -x "$NODE_RED" ] || [ "$(cat "$PEER_DIR/.version" 2>/dev/null)" != "$NODE_RED_VERSION" ]; then
    echo "bench_peer: installing node-red@$NODE_RED_VERSION under $PEER_DIR" >&2
    mkdir -p "$PEER_DIR"
    npm install --prefix "$PEER_DIR" --no-audit --no-fund --omit=dev --loglevel=error \
        "node-red@$NODE_RED_VERSION" >&2
    echo "$NODE_RED_VERSION" > "$PEER_DIR/.version"
fi
echo "bench_peer: node $(node --version), node-red $NODE_RED_VERSION"
exec "$VENV/bin/python" scripts/bench.py --peer-node-red "$NODE_RED" "$@"
