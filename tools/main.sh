#!/usr/bin/env bash
# Sets everything up (tools/setup.sh), then runs the main job: trains the demo
# model (st_keras/configs/demo_text.yaml) on the Python standard library sources,
# printing held-out bits per byte after every 50 steps, writes a text sample
# and leaves a checkpoint and the saved model in a fresh runs/ directory; then
# exports a SavedModel for TensorFlow Serving and runs one score and one
# generate request against it, reloaded with plain TensorFlow.
# Extra args go to st_keras.train (e.g. --override train.steps=100).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup.sh
RUN="runs/demo_text_$(date +%Y%m%d_%H%M%S)"
echo "[main] .venv/bin/python -m st_keras.train --config demo_text --override train.output_dir=$RUN $*"
.venv/bin/python -m st_keras.train --config demo_text \
  --override "train.output_dir=$RUN" "$@"
echo "[main] sample ($RUN/sample.txt):"
cat "$RUN/sample.txt"
echo
echo "[main] exporting the SavedModel for TensorFlow Serving to $RUN/serving/1"
.venv/bin/python -m st_keras.export --model "$RUN/model.keras" --output "$RUN/serving"
.venv/bin/python tools/query_savedmodel.py "$RUN/serving/1" \
  --text "$(.venv/bin/python -c 'import os; print(os.__file__)')"
