#!/usr/bin/env bash
# Install torchchat and everything its commands and tests use, exactly as pinned in pyproject.toml
# (the one list of dependencies). Idempotent: a second run installs nothing new.
#
#   ./install/install_requirements.sh            # everything: core + export, eval, gpu, server, test extras
#   ./install/install_requirements.sh --minimal  # core only (generate, chat, download, GGUF, quantize)
#
# torch is pinned to 2.13.0: on a CPU machine pip takes the CPU wheel; other versions pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
EXTRAS="export,eval,gpu,server,test"
for arg in "$@"; do
  case "$arg" in
    --minimal) EXTRAS="" ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "install_requirements.sh: unknown option '$arg' (use --minimal or nothing)" >&2; exit 2 ;;
  esac
done

target="."
[ -n "$EXTRAS" ] && target=".[$EXTRAS]"
echo "Installing torchchat $target with $($PYTHON --version)"
$PYTHON -m pip install --disable-pip-version-check -q -e "$target"

# The browser page is tested with Debian's Chromium (Playwright's own browser download needs a network
# this project cannot assume). Installed only where apt-get is usable and it is missing.
if [ -n "$EXTRAS" ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "Installing Debian's chromium for the browser test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; the browser test will be skipped" >&2
  else
    echo "note: chromium not found and apt-get unavailable; the browser page test will be skipped" >&2
  fi
fi
# The native CPU kernels (GGUF Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K) compile once into the cache now rather
# than on the first generate. Without a C++ compiler torchchat still runs, on slower fallbacks.
$PYTHON -m torchchat.kernels.cpu.build \
  || echo "warning: torchchat CPU kernels were not built (see above); quantized GGUF models will run slower" >&2
$PYTHON -c "import torch, torchao; print(f'torch {torch.__version__}, torchao {torchao.__version__}: ready')"
