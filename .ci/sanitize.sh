#!/usr/bin/env bash
# The native code under AddressSanitizer + UndefinedBehaviorSanitizer (issue 7, item 2).
#
# Builds alpaca_cpu._core with -DALPACA_SANITIZE=ON into a virtual environment of its own
# (never the developer's or CI's main one), then runs the kernel, quantization and model tests
# on every ISA this CPU has (they parametrize over them), and the API, concurrency, interrupt and
# hostile-file tests, with the ASan runtime preloaded into the (uninstrumented) interpreter. The
# mutation fuzzer is left out: it caps its children's address space, which ASan cannot live
# with (its shadow memory is terabytes of address space). Any report fails the run: ASan
# aborts on its first error, UBSan is told to halt on its first one, and the log is searched
# for reports that a child process may have printed without failing a test.
#
#   .ci/sanitize.sh                 # build (incrementally) and test
#   .ci/sanitize.sh -k avx2 -x      # extra arguments go to pytest
#   ALPACA_ASAN_VENV=/tmp/asan-venv .ci/sanitize.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${ALPACA_ASAN_VENV:-build/asan/venv}
BUILD_DIR=build/asan/cmake
LOG=build/asan/pytest.log
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip -q)
# Build requirements (no build isolation, so that the build folder is kept between runs) and
# what the tests import; the package's own dependencies come with it below.
"${PIP[@]}" install "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja pytest
# A local folder is always rebuilt and reinstalled; the build folder makes that incremental.
"${PIP[@]}" install --no-build-isolation \
  -Ccmake.define.ALPACA_SANITIZE=ON -Ccmake.build-type=Debug -Cbuild-dir="$BUILD_DIR" .

# The extension links the sanitizer runtimes, but ASan's must come first in the process, so it
# is preloaded (the very library the extension was linked with). libstdc++ is preloaded too:
# python does not link it, and ASan's __cxa_throw interceptor must find it at start-up, or the
# first C++ exception dies with "CHECK failed ... real___cxa_throw".
CORE=$(find "$VENV" -path '*/site-packages/alpaca_cpu/_core*.so' | head -n 1)
ASAN_LIB=$(ldd "$CORE" | awk '/libasan/ {print $3}')
CXX_LIB=$(ldd "$CORE" | awk '/libstdc\+\+/ {print $3}')
if [ -z "$ASAN_LIB" ]; then
  echo "sanitize.sh: $CORE is not linked with libasan; is ALPACA_SANITIZE honoured?" >&2
  exit 1
fi
PRELOAD="$ASAN_LIB${CXX_LIB:+ $CXX_LIB}"

TESTS=(
  tests/test_kernels.py tests/test_quants.py tests/test_model.py
  tests/test_api_inputs.py tests/test_concurrency.py tests/test_interrupt.py
  tests/test_hostile_files.py
)
mkdir -p "$(dirname "$LOG")"
echo "sanitize.sh: $CORE with $PRELOAD preloaded; ISAs: $(
  LD_PRELOAD="$PRELOAD" ASAN_OPTIONS=detect_leaks=0 "$VENV/bin/python" -I -c \
    'import alpaca_cpu; print(" ".join(alpaca_cpu.available_isas()))')"
# `pytest` (not `python -m pytest`): the repository root must not be on sys.path, so that
# `import alpaca_cpu` finds the sanitized build in the venv, not the source folder.
set +e
LD_PRELOAD="$PRELOAD" \
  ASAN_OPTIONS=detect_leaks=0 \
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  "$VENV/bin/pytest" -q -p no:cacheprovider -m "not real_model" "${TESTS[@]}" "$@" 2>&1 |
  tee "$LOG"
status=${PIPESTATUS[0]}
set -e
if grep -E -q "AddressSanitizer|UndefinedBehaviorSanitizer|runtime error:" "$LOG"; then
  echo "sanitize.sh: sanitizer reports in $LOG" >&2
  exit 1
fi
exit "$status"
