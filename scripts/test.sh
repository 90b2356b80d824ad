#!/usr/bin/env bash
# The test suite, from a fresh machine: installs the Debian packages, builds, checks the house
# style (clang-format, clang-tidy), captures the real guest RAM images the tests use (once; they
# are cached), runs every test with ctest, then each fuzz target of tests/fuzz for 30 s.
#
#   scripts/test.sh [--asan] [CTEST ARGUMENTS ...]
#
# --asan instead builds everything into build-asan/ with AddressSanitizer and
# UndefinedBehaviorSanitizer (-DDELTAVM_SANITIZE=ON) and runs the suite there: an error or a
# leak fails the test it happens in. The nested harness's tests skip (its binaries must be
# static).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [[ ${1:-} == --asan ]]; then
  shift
  "$repo/scripts/setup.sh"
  cmake -S "$repo" -B "$repo/build-asan" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDELTAVM_SANITIZE=ON >/dev/null
  cmake --build "$repo/build-asan" --parallel "$(nproc)"
  cd "$repo/build-asan"
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1
  exec ctest --output-on-failure --timeout 900 "$@"
fi
"$repo/scripts/setup.sh"
"$repo/scripts/build.sh"
"$repo/scripts/check-style.sh"
cd "$repo/build"
ctest --output-on-failure --timeout 900 "$@"
"$repo/scripts/fuzz.sh" --seconds 30
