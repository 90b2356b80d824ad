#!/usr/bin/env bash
# The libFuzzer targets of tests/fuzz, each run for a while on a copy of its seed corpus
# (tests/fuzz/corpus/TARGET; the repo's corpus is never changed). Builds them with clang into
# build-fuzz/ (-fsanitize=fuzzer,address,undefined). A crash, a leak, or an allocation over
# --malloc-limit-mb fails the run; the input that did it is kept in build-fuzz/crashes/TARGET/.
#
#   scripts/fuzz.sh [--seconds N] [--runs N] [--malloc-limit-mb N] [TARGET ...]
#
# --seconds (default 300) and --runs (default unbounded) bound each target; the first reached
# ends it. The targets' documented input limits are in tests/fuzz/README.md.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
seconds=300
runs=-1
malloc_limit_mb=512
targets=()
while (($#)); do
  case $1 in
    --seconds) seconds=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --malloc-limit-mb) malloc_limit_mb=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
if ((${#targets[@]} == 0)); then
  for file in "$repo"/tests/fuzz/*.cc; do targets+=("$(basename "$file" .cc)"); done
fi

# scripts/setup.sh installs clang and its libFuzzer runtime.
if ! command -v clang++ >/dev/null || ! compgen -G "/usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a" >/dev/null; then
  echo "fuzz.sh: needs clang and libFuzzer: apt-get install clang libclang-rt-14-dev" >&2
  exit 2
fi

build=$repo/build-fuzz
if [[ ! -f $build/build.ninja ]]; then
  CC=clang CXX=clang++ cmake -S "$repo" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDELTAVM_FUZZ=ON >/dev/null
fi
if ! ninja -C "$build" "${targets[@]/#/fuzz-}" >"$build/ninja.log" 2>&1; then
  tail -30 "$build/ninja.log" >&2
  echo "fuzz.sh: building the targets failed (whole log: $build/ninja.log)" >&2
  exit 1
fi

status=0
printf '%-16s %12s %8s  %s\n' target runs seconds result
for target in "${targets[@]}"; do
  work=$build/corpus/$target crashes=$build/crashes/$target
  mkdir -p "$work" "$crashes"
  cp -n "$repo/tests/fuzz/corpus/$target"/* "$work"/ 2>/dev/null || true
  log=$build/$target.log
  start=$SECONDS
  if "$build/fuzz-$target" -max_total_time="$seconds" -runs="$runs" -rss_limit_mb=2048 \
      -malloc_limit_mb="$malloc_limit_mb" -max_len=65536 -artifact_prefix="$crashes/" "$work" >"$log" 2>&1; then
    result=ok
  else
    result="FAILED: see $log and $crashes"
    status=1
  fi
  done_runs=$(grep -oE '^Done [0-9]+ runs' "$log" | grep -oE '[0-9]+' || echo "?")
  printf '%-16s %12s %8s  %s\n' "$target" "$done_runs" "$((SECONDS - start))" "$result"
done
exit $status
