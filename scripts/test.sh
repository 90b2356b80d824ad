#!/usr/bin/env bash
# The test suite, from a fresh machine: installs the Debian packages, builds, checks the house
# style (clang-format, clang-tidy), captures the real guest RAM images the tests use (once; they
# are cached), runs every test with ctest, then each fuzz target of tests/fuzz for 30 s.
#
#   scripts/test.sh [--asan | --tsan] [CTEST ARGUMENTS ...]
#
# --asan instead builds everything into build-asan/ with AddressSanitizer and
# UndefinedBehaviorSanitizer and runs the whole suite there: an error or a leak fails the test
# it happens in. --tsan builds into build-tsan/ with ThreadSanitizer and runs the tests of the
# concurrent code (the service, the store, subprocesses, the agent channel, VM processes); a data race fails
# the test. In both, the nested harness's tests skip (its binaries must be static).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [[ ${1:-} == --asan || ${1:-} == --tsan ]]; then
  mode=${1#--}
  shift
  sanitizers=address,undefined
  [[ $mode == tsan ]] && sanitizers=thread
  "$repo/scripts/setup.sh"
  cmake -S "$repo" -B "$repo/build-$mode" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DDELTAVM_SANITIZE="$sanitizers" >/dev/null
  cmake --build "$repo/build-$mode" --parallel "$(nproc)"
  cd "$repo/build-$mode"
  export ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 TSAN_OPTIONS="halt_on_error=1 suppressions=$repo/tests/tsan.supp"
  if [[ $mode == tsan && $# -eq 0 ]]; then
    set -- -R '^(Service|StoreTest|StoreCrash|Subprocess|AgentChannel|VmProcesses)\.'
  fi
  exec ctest --output-on-failure --timeout 900 "$@"
fi
"$repo/scripts/setup.sh"
"$repo/scripts/build.sh"
"$repo/scripts/check-style.sh"
cd "$repo/build"
ctest --output-on-failure --timeout 900 "$@"
"$repo/scripts/fuzz.sh" --seconds 30
