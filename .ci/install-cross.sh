#!/usr/bin/env bash
# Tools for the NEON kernel tests on non-ARM machines (tests/native/run_neon_qemu.sh, run by
# tests/test_native_kernels.py): an aarch64 cross compiler and the qemu user-mode emulator,
# from Debian/Ubuntu packages. Idempotent and instant when both are already on PATH.
set -euo pipefail

packages=()
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || packages+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || packages+=(qemu-user)
if [ ${#packages[@]} -eq 0 ]; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-cross.sh: need ${packages[*]} (Debian package names) but apt-get is not available" >&2
  exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
echo "install-cross.sh: installing ${packages[*]}" >&2
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}"
