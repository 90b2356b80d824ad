#!/usr/bin/env bash
# The house style, checked: every C and C++ file as .clang-format lays it out, and clang-tidy
# clean on the checks .clang-tidy enables over every source file of src/ (and the headers they
# include). Needs a configured build/ (compile_commands.json). Exits non-zero on any finding.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
mapfile -t files < <(git ls-files '*.cc' '*.h' '*.c')
echo "check-style: clang-format on ${#files[@]} files" >&2
clang-format --dry-run --Werror "${files[@]}"
echo "check-style: clang-tidy on src/ (about a minute a core)" >&2
output=$(run-clang-tidy -p build -j "$(nproc)" -quiet "$repo/src/.*\.cc$" 2>&1) || status=$?
if [[ ${status:-0} -ne 0 ]] || grep -q ": error: \|: warning: " <<<"$output"; then
  grep -E ": (error|warning): " <<<"$output" | sort -u >&2 || true
  echo "check-style: clang-tidy found problems" >&2
  exit 1
fi
echo "check-style: clean" >&2
