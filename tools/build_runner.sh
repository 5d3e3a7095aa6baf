#!/usr/bin/env bash
# Build the C++ runner psb_run (runner/, CMakeLists.txt) with cmake.
#
#   tools/build_runner.sh host    BUILD_DIR   # this machine; headers/libraries of the installed wheels
#   tools/build_runner.sh aarch64 BUILD_DIR   # cross build for 64-bit Arm Linux
#
# host: the apache-tvm / apache-tvm-ffi wheels are located with $PSB_PYTHON (default: python3 on
#   PATH, i.e. the active venv).
# aarch64: needs aarch64-linux-gnu-g++ (Debian: g++-aarch64-linux-gnu). The aarch64 wheels are
#   fetched into BUILD_DIR/wheels with `pip download` (skipped when already there; set
#   PSB_AARCH64_WHEELS to a folder that holds them to build offline), and libtvm_runtime.so,
#   libtvm_ffi.so and the tvm-ffi headers are unpacked into BUILD_DIR/tvm-aarch64/.
#   Versions: $PSB_TVM_VERSION / $PSB_TVM_FFI_VERSION (default: the pins below).
#   Run the result with: qemu-aarch64 -L /usr/aarch64-linux-gnu BUILD_DIR/psb_run ...
# Extra cmake arguments can be passed in $PSB_CMAKE_ARGS.
set -euo pipefail

usage() { echo "usage: $0 [host|aarch64] BUILD_DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
mode=$1
build=$2
case "$mode" in host|aarch64) ;; *) usage ;; esac

src=$(cd "$(dirname "$0")/.." && pwd)
python=${PSB_PYTHON:-$(command -v python3 || command -v python || true)}
[ -n "$python" ] || { echo "$0: no python found (set PSB_PYTHON)" >&2; exit 1; }
command -v cmake >/dev/null || { echo "$0: cmake not found (Debian: apt-get install cmake)" >&2; exit 1; }
mkdir -p "$build"
build=$(cd "$build" && pwd)
# One build dir per mode: cmake cannot switch an existing cache between host and cross toolchains.
if [ -f "$build/.psb_runner_mode" ] && [ "$(cat "$build/.psb_runner_mode")" != "$mode" ]; then
  echo "$0: $build was configured for '$(cat "$build/.psb_runner_mode")'; use another BUILD_DIR for $mode" >&2
  exit 1
fi
echo "$mode" > "$build/.psb_runner_mode"
jobs=$(nproc 2>/dev/null || echo 2)
# shellcheck disable=SC2206
extra=(${PSB_CMAKE_ARGS:-})

if [ "$mode" = host ]; then
  cmake -S "$src" -B "$build" -DPSB_PYTHON="$python" "${extra[@]}"
  cmake --build "$build" -j "$jobs"
  echo "built $build/psb_run"
  exit 0
fi

# ------------------------------------------------------------------------------ aarch64
command -v aarch64-linux-gnu-g++ >/dev/null || {
  echo "$0: aarch64-linux-gnu-g++ not found (Debian: apt-get install g++-aarch64-linux-gnu)" >&2; exit 1; }
tvm_version=${PSB_TVM_VERSION:-0.27.0.post1}
ffi_version=${PSB_TVM_FFI_VERSION:-0.1.14.post1}
wheels=${PSB_AARCH64_WHEELS:-$build/wheels}
mkdir -p "$wheels"
find_wheel() { ls "$wheels"/"$1"-"$2"-*manylinux*aarch64*.whl 2>/dev/null | head -n 1 || true; }
tvm_whl=$(find_wheel apache_tvm "$tvm_version")
ffi_whl=$(find_wheel apache_tvm_ffi "$ffi_version")
if [ -z "$tvm_whl" ] || [ -z "$ffi_whl" ]; then
  echo "fetching aarch64 wheels apache-tvm==$tvm_version apache-tvm-ffi==$ffi_version into $wheels"
  "$python" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
    --python-version 3.11 -d "$wheels" "apache-tvm==$tvm_version" "apache-tvm-ffi==$ffi_version"
  tvm_whl=$(find_wheel apache_tvm "$tvm_version")
  ffi_whl=$(find_wheel apache_tvm_ffi "$ffi_version")
fi
[ -n "$tvm_whl" ] && [ -n "$ffi_whl" ] || { echo "$0: aarch64 wheels not found in $wheels" >&2; exit 1; }

deps=$build/tvm-aarch64
rm -rf "$deps"
mkdir -p "$deps/lib"
# Wheels are zip files: take only what the runner needs (python's zipfile: no unzip needed).
"$python" - "$tvm_whl" "$ffi_whl" "$deps" <<'PY'
import os, shutil, sys, zipfile
tvm_whl, ffi_whl, deps = sys.argv[1:4]
def take(whl, member, dest):
    with zipfile.ZipFile(whl) as z, z.open(member) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out)
take(tvm_whl, "tvm/lib/libtvm_runtime.so", os.path.join(deps, "lib", "libtvm_runtime.so"))
take(ffi_whl, "tvm_ffi/lib/libtvm_ffi.so", os.path.join(deps, "lib", "libtvm_ffi.so"))
with zipfile.ZipFile(ffi_whl) as z:
    for name in z.namelist():
        if name.startswith("tvm_ffi/include/") and not name.endswith("/"):
            dest = os.path.join(deps, "include", name[len("tvm_ffi/include/"):])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(name) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
PY

cmake -S "$src" -B "$build" -DCMAKE_TOOLCHAIN_FILE="$src/cmake/aarch64-linux-gnu.cmake" \
  -DPSB_TVM_FFI_INCLUDE="$deps/include" -DPSB_TVM_RUNTIME_LIB_DIR="$deps/lib" "${extra[@]}"
cmake --build "$build" -j "$jobs"
echo "built $build/psb_run (aarch64; run with: qemu-aarch64 -L /usr/aarch64-linux-gnu $build/psb_run ...)"
