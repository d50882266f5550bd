#!/usr/bin/env bash
# Cross-compile the native kernel test for aarch64 and run it under qemu-user on two CPU
# models, so both NEON tables run for real: `max` has dotprod (scalar, neon, neon_dotprod),
# `cortex-a53` is plain Armv8.0 (scalar, neon; the dotprod table must not be offered, and any
# SDOT that leaked into the other tables would stop the run with SIGILL).
#
#   tests/native/run_neon_qemu.sh            # installs the tools first if they are missing
#
# Per-file flags mirror CMakeLists.txt's aarch64 branch. Exits non-zero on any failure.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
CXX=aarch64-linux-gnu-g++
QEMU=qemu-aarch64
SYSROOT=/usr/aarch64-linux-gnu  # where Debian's cross packages put the aarch64 libc/libstdc++

if ! command -v "$CXX" >/dev/null 2>&1 || ! command -v "$QEMU" >/dev/null 2>&1; then
  "$REPO/.ci/install-cross.sh"
fi

BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT
start=$(date +%s)

# Same common flags as the CMake target, LTO included (pybind11 turns it on for Release
# builds, and it must not let SDOT code spread into the plain tables); ISA flags only on the
# file that needs them.
COMMON=(-std=c++17 -O3 -fno-math-errno -flto=auto -Wall -Wextra -Wno-unused-parameter
        -DALPACA_HAVE_NEON=1 -I"$REPO/csrc")
compile() {  # source, then its own flags
  local src="$1"; shift
  "$CXX" "${COMMON[@]}" "$@" -c "$REPO/$src" -o "$BUILD/$(basename "$src" .cpp).o"
}
pids=()
compile csrc/kernels_scalar.cpp & pids+=($!)
compile csrc/kernels_neon.cpp & pids+=($!)
compile csrc/kernels_neon_dotprod.cpp -march=armv8.2-a+dotprod & pids+=($!)
compile csrc/dispatch.cpp & pids+=($!)
compile csrc/ggml_types.cpp -ffp-contract=off & pids+=($!)
compile csrc/ggml_quants.cpp -ffp-contract=off & pids+=($!)
compile tests/native/test_kernels_native.cpp & pids+=($!)
for pid in "${pids[@]}"; do wait "$pid"; done
"$CXX" -O3 -flto=auto "$BUILD"/*.o -o "$BUILD/test_kernels_native"
built=$(date +%s)
echo "cross-compiled in $((built - start)) s"

status=0
for model in "max scalar,neon,neon_dotprod" "cortex-a53 scalar,neon"; do
  read -r cpu isas <<<"$model"
  echo "== qemu-aarch64 -cpu $cpu (expect $isas)"
  "$QEMU" -L "$SYSROOT" -cpu "$cpu" "$BUILD/test_kernels_native" --expect-isas "$isas" || status=1
done
echo "qemu runs took $(($(date +%s) - built)) s; total $(($(date +%s) - start)) s"
exit $status
