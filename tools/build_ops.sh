#!/usr/bin/env bash
# Builds the TensorFlow op library with Bazel (the only builder) and copies it to
# st_keras/lib/_st_keras_ops.so. Used by tools/setup.sh and by setup.py.
#
#   PYTHON_BIN_PATH=/path/to/python-with-tensorflow tools/build_ops.sh
#
# Without PYTHON_BIN_PATH it uses <repo>/.venv/bin/python, else python3 on PATH.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TARGET="//custom_ops:_st_keras_ops.so"
BUILT="bazel-bin/custom_ops/_st_keras_ops.so"
DEST_DIR="st_keras/lib"
DEST="$DEST_DIR/_st_keras_ops.so"

if [[ -z "${PYTHON_BIN_PATH:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then
    PYTHON_BIN_PATH="$ROOT/.venv/bin/python"
  else
    PYTHON_BIN_PATH="$(command -v python3)"
  fi
fi
export PYTHON_BIN_PATH

if ! command -v bazel >/dev/null 2>&1; then
  echo "[build_ops] ERROR: bazel not found; run tools/setup.sh (installs bazel-bootstrap)" >&2
  exit 1
fi

echo "[build_ops] bazel build $TARGET (python: $PYTHON_BIN_PATH)"
start=$SECONDS
if ! bazel build --repo_env=PYTHON_BIN_PATH="$PYTHON_BIN_PATH" "$TARGET"; then
  echo "[build_ops] ERROR: Bazel build of $TARGET failed" >&2
  exit 1
fi
echo "[build_ops] bazel build finished in $((SECONDS - start)) s"

if [[ ! -f "$BUILT" ]]; then
  echo "[build_ops] ERROR: $BUILT not found after the build" >&2
  exit 1
fi
mkdir -p "$DEST_DIR"
if [[ ! -f "$DEST_DIR/.gitignore" ]]; then
  printf '*.so\n' > "$DEST_DIR/.gitignore"
fi
# Replace atomically; bazel-bin files are read-only.
cp -f "$BUILT" "$DEST.tmp"
chmod u+w,a+r "$DEST.tmp"
mv -f "$DEST.tmp" "$DEST"
echo "[build_ops] installed $DEST"
