#!/usr/bin/env bash
# Builds the C++ runners into cmake-out/: aoti_run (AOT Inductor .pt2/.so), et_run (ExecuTorch .pte)
# and tokenizer_test.
#
#   ./install/build_runner.sh [aoti|et|all]      (default: all)
#
# Needs the Python environment torchchat runs in (torch for aoti, `pip install -e .[export]` for et),
# but only to locate their CMake packages: the binaries do not use Python. Installs the Debian packages
# below with apt-get when any is missing (as root, or through sudo). Safe to run again: it only
# rebuilds what changed.
set -euo pipefail

cd "$(dirname "$0")/.."

case "${1:-all}" in
  aoti) runners="aoti" ;;
  et) runners="et" ;;
  all) runners="aoti;et" ;;
  *) echo "usage: $0 [aoti|et|all]" >&2; exit 2 ;;
esac

PYTHON="${PYTHON:-python3}"
DEBIAN_PACKAGES=(g++ make cmake pkgconf libsentencepiece-dev libpcre2-dev nlohmann-json3-dev)

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if ((${#missing[@]})); then
  echo "build_runner: installing Debian packages: ${missing[*]}" >&2
  sudo_cmd=()
  if [[ $(id -u) -ne 0 ]]; then sudo_cmd=(sudo); fi
  "${sudo_cmd[@]}" apt-get update -q
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Where a Python package's CMake files are, found without importing the package.
package_dir() {
  "$PYTHON" - "$1" <<'PY'
import importlib.util, os, sys
spec = importlib.util.find_spec(sys.argv[1])
if spec is None or not spec.submodule_search_locations:
    sys.exit(f"build_runner: Python package {sys.argv[1]} is not installed in {sys.executable}")
print(list(spec.submodule_search_locations)[0])
PY
}

cmake_args=(-S runner -B cmake-out -DCMAKE_BUILD_TYPE=Release "-DTORCHCHAT_RUNNERS=$runners")
if [[ $runners == *aoti* ]]; then
  torch_dir=$(package_dir torch)
  cmake_args+=("-DCMAKE_PREFIX_PATH=$torch_dir/share/cmake")
fi
if [[ $runners == *et* ]]; then
  et_dir=$(package_dir executorch) || {
    echo "build_runner: et_run needs the executorch wheel: pip install -e '.[export]'" >&2
    exit 1
  }
  cmake_args+=("-Dexecutorch_DIR=$et_dir/share/cmake")
fi

cmake "${cmake_args[@]}"
cmake --build cmake-out -j "$(nproc)"
echo "build_runner: built $(cd cmake-out && ls -1 aoti_run et_run tokenizer_test 2>/dev/null | tr '\n' ' ')in cmake-out/" >&2
