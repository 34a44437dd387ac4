#!/usr/bin/env bash
# Sets everything up (tools/setup.sh), then runs the main job: the attention benchmark.
# Extra args go to benchmarks/attention.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup.sh
echo "[main] .venv/bin/python benchmarks/attention.py --quick $*"
exec .venv/bin/python benchmarks/attention.py --quick "$@"
