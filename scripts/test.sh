#!/usr/bin/env bash
# Lint, type checks and the whole test suite. Extra args go to pytest
# (e.g. ./scripts/test.sh -m "not slow" for a quick local run).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
VENV="${VENV:-.venv}"
"$VENV/bin/ruff" check agent tests scripts
"$VENV/bin/mypy" agent
"$VENV/bin/python" -m pytest "$@"
