#!/usr/bin/env bash
# Sets everything up (tools/setup.sh), lints (ruff), then runs the test suite. Extra args go to
# pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup.sh
# Lint first (configuration in pyproject.toml): a finding fails the run.
echo "[test] .venv/bin/ruff check ."
.venv/bin/ruff check .
# Two processes: Triton cannot be imported beside TensorFlow (tests/conftest.py).
# Exit status 5 (nothing selected, e.g. by -k) is fine for either half alone.
status=0
for tests in tests tests/triton_kernels; do
  echo "[test] .venv/bin/python -m pytest $tests -q $*"
  rc=0
  .venv/bin/python -m pytest "$tests" -q "$@" || rc=$?
  if [[ $rc != 0 && $rc != 5 ]]; then status=$rc; fi
done
exit "$status"
