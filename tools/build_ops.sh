#!/usr/bin/env bash
# Builds the TensorFlow op library with Bazel (the only builder) and copies it to
# st_keras/lib/_st_keras_ops.so. Used by tools/setup.sh and by setup.py.
#
#   PYTHON_BIN_PATH=/path/to/python-with-tensorflow tools/build_ops.sh
#
# Without PYTHON_BIN_PATH it uses <repo>/.venv/bin/python, else python3 on PATH.
#
# GPU kernels (Triton, compiled ahead of time for sm_80 and sm_90; no CUDA toolkit or GPU
# needed) are built when ST_KERAS_GPU=1, or when ST_KERAS_GPU is unset and that python can
# import triton; ST_KERAS_GPU=0 builds the CPU kernels only. A GPU build also installs
# st_keras/lib/libst_bsa_gpu.so, the kernels' C ABI for callers without TensorFlow.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DEST_DIR="st_keras/lib"

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

GPU="${ST_KERAS_GPU:-}"
if [[ -z "$GPU" ]]; then
  if "$PYTHON_BIN_PATH" -c "import triton" >/dev/null 2>&1; then GPU=1; else GPU=0; fi
fi
LIBS=(_st_keras_ops.so)
FLAGS=()
if [[ "$GPU" == 1 ]]; then
  LIBS+=(libst_bsa_gpu.so)
  FLAGS+=(--config=cuda)
fi
TARGETS=("${LIBS[@]/#///custom_ops:}")

# The Bazel server (a JVM of a few hundred MB) is not left running after the build.
trap 'bazel shutdown >/dev/null 2>&1 || true' EXIT
echo "[build_ops] bazel build ${FLAGS[*]} ${TARGETS[*]} (python: $PYTHON_BIN_PATH)"
start=$SECONDS
if ! bazel build "${FLAGS[@]}" --repo_env=PYTHON_BIN_PATH="$PYTHON_BIN_PATH" \
    "${TARGETS[@]}"; then
  echo "[build_ops] ERROR: Bazel build of ${TARGETS[*]} failed" >&2
  exit 1
fi
echo "[build_ops] bazel build finished in $((SECONDS - start)) s (GPU kernels: $GPU)"

mkdir -p "$DEST_DIR"
if [[ ! -f "$DEST_DIR/.gitignore" ]]; then
  printf '*.so\n' > "$DEST_DIR/.gitignore"
fi
# A CPU-only build leaves no C ABI library from an earlier GPU build behind.
rm -f "$DEST_DIR/libst_bsa_gpu.so"
for lib in "${LIBS[@]}"; do
  built="bazel-bin/custom_ops/$lib"
  if [[ ! -f "$built" ]]; then
    echo "[build_ops] ERROR: $built not found after the build" >&2
    exit 1
  fi
  # Replace atomically; bazel-bin files are read-only.
  cp -f "$built" "$DEST_DIR/$lib.tmp"
  chmod u+w,a+r "$DEST_DIR/$lib.tmp"
  mv -f "$DEST_DIR/$lib.tmp" "$DEST_DIR/$lib"
  echo "[build_ops] installed $DEST_DIR/$lib"
done
