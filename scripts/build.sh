#!/usr/bin/env bash
# Configures and builds deltavm into build/ (Release with debug info).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cmake -S "$repo" -B "$repo/build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$repo/build" --parallel "$(nproc)"
