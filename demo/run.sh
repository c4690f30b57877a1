#!/usr/bin/env bash
# The geometric-analysis demo: trains the small causal model once (~/.cache/loom, ~3.5 minutes on 2 idle CPU cores,
# longer on a busy machine), then measures MiniLM and it layer by layer against a running server ($LOOM_URL, default
# http://127.0.0.1:8080). Writes demo/.cache/outputs ($LOOM_DEMO_OUT): the committed demo/outputs stay as they are.
#   bash scripts/dev.sh serve      # in another terminal
#   bash demo/run.sh               # extra arguments go to geometric_analysis.py, e.g. --rows last
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
CAUSAL="${LOOM_CACHE:-$HOME/.cache/loom}/pydoc-gpt2"
if [ ! -f "$CAUSAL/config.json" ]; then
  "$PY" demo/train_causal.py --out "$CAUSAL"
fi
exec "$PY" demo/geometric_analysis.py --server "${LOOM_URL:-http://127.0.0.1:8080}" \
  --model minilm --model "$CAUSAL" --out "${LOOM_DEMO_OUT:-demo/.cache/outputs}" "$@"
