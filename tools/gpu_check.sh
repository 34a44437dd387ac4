#!/usr/bin/env bash
# The device check of the GPU kernels (tools/gpu_check.py): correctness against float64 and
# speed against FlexAttention and SDPA, on a GPU machine with PyTorch and Triton (no TensorFlow
# needed). GPU_CHECK_DRY_RUN=1 runs it on CPU with Triton's interpreter and tiny sizes.
#
#   bash tools/gpu_check.sh [--out DIR] [--minutes M]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=python3
if [[ "${GPU_CHECK_DRY_RUN:-}" == 1 && -x .venv/bin/python ]]; then
  PY=.venv/bin/python
fi
exec "$PY" tools/gpu_check.py "$@"
