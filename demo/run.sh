#!/usr/bin/env bash
# The geometric-analysis demo: measures MiniLM and the shipped pydoc-gpt2 layer by layer against a running server
# ($LOOM_URL, default http://127.0.0.1:8080). Writes demo/.cache/outputs ($LOOM_DEMO_OUT): the committed demo/outputs
# stay as they are.
#   bash scripts/dev.sh serve      # in another terminal
#   bash demo/run.sh               # extra arguments go to geometric_analysis.py, e.g. --rows last
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
exec "$PY" demo/geometric_analysis.py --server "${LOOM_URL:-http://127.0.0.1:8080}" \
  --model minilm --model pydoc-gpt2 --out "${LOOM_DEMO_OUT:-demo/.cache/outputs}" "$@"
