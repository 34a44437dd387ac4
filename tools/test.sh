#!/usr/bin/env bash
# Sets everything up (tools/setup.sh), then runs the test suite. Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup.sh
echo "[test] .venv/bin/python -m pytest tests -q $*"
exec .venv/bin/python -m pytest tests -q "$@"
