#!/usr/bin/env bash
# Set up (idempotent) and run the demo. Extra args go to `edge-agent demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/edge-agent demo "$@"
