#!/usr/bin/env bash
# Install The Loom (kernel + bundled plugins) into ./.venv, then serve or test.
#   bash scripts/dev.sh serve [loom serve flags...]   -> server on 127.0.0.1:8080, "minilm" and "pydoc-gpt2" preloaded
#   bash scripts/dev.sh test  [pytest args...]        -> the whole test suite (installs chromium for the browser tests
#                                                        with apt-get where it is missing)
# LOOM_TORCH overrides the torch requirement (default: the CPU build pinned for our machines).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LOOM_VENV:-.venv}"
python="${PYTHON:-python3}"

install() {
  # Skipped when nothing it installs from has changed since the last install (LOOM_REINSTALL=1 forces it).
  local stamp="$venv/.loom-installed"
  local want
  want="$(cat scripts/dev.sh pyproject.toml plugins/*/pyproject.toml models/*/pyproject.toml client/pyproject.toml | sha256sum | cut -c1-16) ${LOOM_TORCH:-torch==2.13.0}"
  if [ -z "${LOOM_REINSTALL:-}" ] && [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    echo "dev.sh: $venv is up to date (LOOM_REINSTALL=1 reinstalls)" >&2
    return
  fi
  [ -x "$venv/bin/python" ] || { echo "dev.sh: creating $venv" >&2; "$python" -m venv "$venv"; }
  # pip's own lines (one per package it collects, then what it installs) show where a long install is.
  local pip=("$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
  # torch first and pinned: an unpinned torch pulls gigabytes of CUDA wheels.
  echo "dev.sh: [1/2] torch (${LOOM_TORCH:-torch==2.13.0}; one to two minutes the first time)" >&2
  "${pip[@]}" "${LOOM_TORCH:-torch==2.13.0}"
  # torch is named again so that no plugin's dependency (bitsandbytes, ...) can swap it for another build.
  echo "dev.sh: [2/2] the kernel, its plugins, the shipped models, the client and their dependencies (Ray," >&2
  echo "        transformers, scikit-learn, ...: three to five minutes the first time on 2 cores)" >&2
  "${pip[@]}" "${LOOM_TORCH:-torch==2.13.0}" -e ".[test]" \
    -e plugins/loom-plugin-transformers \
    -e plugins/loom-plugin-sentence-transformers \
    -e plugins/loom-plugin-custom \
    -e plugins/loom-plugin-bitsandbytes \
    -e plugins/loom-plugin-gptq \
    -e plugins/loom-plugin-http \
    -e plugins/loom-plugin-unix \
    -e plugins/loom-plugin-embeddings \
    -e plugins/loom-plugin-openai \
    -e plugins/loom-plugin-geometry \
    -e plugins/loom-plugin-interp \
    -e plugins/loom-plugin-ray \
    -e plugins/loom-plugin-viewer \
    -e models/loom-model-pydoc-gpt2 \
    -e client
  # tuned-lens is the tests' reference for a tuned lens, installed alone: what it depends on besides torch and
  # transformers (wandb, datasets, plotly) is for training one, which nothing here does.
  "${pip[@]}" --no-deps "tuned-lens==0.2.0"
  echo "$want" > "$stamp"
  echo "dev.sh: installed into $venv" >&2
}

browsers() {
  # The viewer's browser tests drive Debian's chromium through chromium-driver (selenium); installed only where
  # missing, and only where apt-get can.
  if command -v chromedriver >/dev/null && { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then
    return
  fi
  if ! command -v apt-get >/dev/null; then
    echo "dev.sh: chromium and chromedriver are missing and there is no apt-get here: install them yourself, the viewer's browser tests need them" >&2
    return
  fi
  local sudo=()
  [ "$(id -u)" = 0 ] || sudo=(sudo -n)
  echo "dev.sh: installing chromium and chromium-driver with apt-get, for the viewer's browser tests (a minute the first time)" >&2
  { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } ||
    echo "dev.sh: could not install them: run 'apt-get install chromium chromium-driver' as root" >&2
}

cmd="${1:-}"
shift || true
case "$cmd" in
  serve)
    install
    exec "$venv/bin/loom" serve --preload minilm --preload pydoc-gpt2 "$@"
    ;;
  test)
    install
    browsers
    # Two workers, each given whole files (their module fixtures and their order stay as they are): most tests wait
    # on a real server, so two keep two cores busy. LOOM_TEST_WORKERS=0 runs in this process alone.
    exec "$venv/bin/python" -m pytest -n "${LOOM_TEST_WORKERS:-2}" --dist loadfile "$@"
    ;;
  install)
    install
    ;;
  *)
    echo "usage: bash scripts/dev.sh serve|test|install [args...]" >&2
    exit 2
    ;;
esac
