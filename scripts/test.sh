#!/usr/bin/env bash
# The test suite, from a fresh machine: installs the Debian packages, builds, checks the house
# style (clang-format, clang-tidy), captures the real guest RAM images the tests use (once; they
# are cached), runs every test with ctest, then each fuzz target of tests/fuzz for 30 s.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/scripts/setup.sh"
"$repo/scripts/build.sh"
"$repo/scripts/check-style.sh"
cd "$repo/build"
ctest --output-on-failure --timeout 900 "$@"
"$repo/scripts/fuzz.sh" --seconds 30
