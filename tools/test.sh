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
# Two halves: Triton cannot be imported beside TensorFlow (tests/conftest.py).
# Each runs on two pytest-xdist workers: the main suite a file per worker at a
# time (its module fixtures, such as the paper tables' quick run, run once),
# the interpreter tests one test at a time. Exit status 5 (nothing selected,
# e.g. by -k) is fine for either half alone.
status=0
for half in "tests --dist loadfile" "tests/triton_kernels --dist load"; do
  read -r -a args <<< "$half"
  echo "[test] .venv/bin/python -m pytest ${args[*]} -n 2 -q $*"
  rc=0
  .venv/bin/python -m pytest "${args[@]}" -n 2 -q "$@" || rc=$?
  if [[ $rc != 0 && $rc != 5 ]]; then status=$rc; fi
done
exit "$status"
