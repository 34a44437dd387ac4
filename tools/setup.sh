#!/usr/bin/env bash
# One-shot, idempotent setup: .venv with pinned requirements, Bazel, and the op library
# (st_keras/lib/_st_keras_ops.so). Safe to run repeatedly; fast when nothing changed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { echo "[setup] $*"; }

# 1. Virtual environment -----------------------------------------------------------------
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating $VENV with $($PY --version 2>&1) ($(command -v "$PY"))"
  "$PY" -m venv "$VENV"
else
  log "using existing $VENV ($("$VENV/bin/python" --version 2>&1))"
fi
VPY="$VENV/bin/python"

# 2. Python requirements (skipped when already satisfied) --------------------------------
STAMP="$VENV/.requirements.sha256"
REQ_HASH="$(cat requirements.txt requirements-nodeps.txt | sha256sum | cut -d' ' -f1)"
requirements_ok() {
  [[ -f "$STAMP" && "$(cat "$STAMP")" == "$REQ_HASH" ]] || return 1
  # Cheap consistency check that the pins are really installed.
  "$VPY" - <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
from packaging.requirements import Requirement
for line in open("requirements.txt").readlines() + open("requirements-nodeps.txt").readlines():
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    req = Requirement(line)
    try:
        v = version(req.name)
    except PackageNotFoundError:
        sys.exit(1)
    if not req.specifier.contains(v, prereleases=True):
        sys.exit(1)
PYEOF
}
if requirements_ok; then
  log "requirements.txt already satisfied"
else
  log "installing requirements.txt (first run takes a few minutes)"
  start=$SECONDS
  "$VPY" -m pip install -r requirements.txt
  # Packages whose declared dependencies would replace tensorflow-cpu.
  "$VPY" -m pip install --no-deps -r requirements-nodeps.txt
  echo "$REQ_HASH" > "$STAMP"
  log "requirements installed in $((SECONDS - start)) s"
fi

# 3. Bazel -------------------------------------------------------------------------------
if ! command -v bazel >/dev/null 2>&1; then
  log "bazel not found; installing bazel-bootstrap with apt-get"
  SUDO=""
  if [[ "$(id -u)" != 0 ]]; then SUDO="sudo"; fi
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y bazel-bootstrap
fi
log "bazel: $(command -v bazel)"

# 4. Op library (Bazel) ------------------------------------------------------------------
PYTHON_BIN_PATH="$VPY" bash "$ROOT/tools/build_ops.sh"

# 5. The package itself, editable, so st-train / st-sample / st-eval / st-export exist in .venv
# (installed again when setup.py, which names them, changes) ------------------------------
PKG_STAMP="$VENV/.st_keras_setup.sha256"
PKG_HASH="$(cat setup.py pyproject.toml | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$PKG_STAMP" || "$(cat "$PKG_STAMP")" != "$PKG_HASH" ]] || ! "$VPY" - "$ROOT" <<'PYEOF' 2>/dev/null; then
import json, sys
from importlib.metadata import distribution
url = json.loads(distribution("st_keras").read_text("direct_url.json") or "{}")
sys.exit(0 if url.get("dir_info", {}).get("editable") and
         url.get("url") == "file://" + sys.argv[1] else 1)
PYEOF
  log "installing st_keras into $VENV (editable)"
  "$VPY" -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT"
  echo "$PKG_HASH" > "$PKG_STAMP"
fi

# 6. Smoke check: the library loads into TensorFlow ----------------------------------------
log "checking that st_keras/lib/_st_keras_ops.so loads with tf.load_op_library"
TF_CPP_MIN_LOG_LEVEL=3 "$VPY" -c "
import tensorflow as tf
lib = tf.load_op_library('st_keras/lib/_st_keras_ops.so')
names = set(dir(lib))
ops = sorted(n for n in names if n + '_eager_fallback' in names)
print('[setup] op library loads; ops:', ', '.join(ops))
"
log "done"
