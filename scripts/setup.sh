#!/usr/bin/env bash
# Installs every Debian package deltavm needs. Idempotent: packages already present are skipped,
# and apt is only consulted when something is missing.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config
  libzstd-dev liblz4-dev libxxhash-dev libcli11-dev nlohmann-json3-dev libsqlite3-dev libfmt-dev
  libcpp-httplib-dev libssl-dev libseccomp-dev libcurl4-openssl-dev libtinyxml2-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  zstd xdelta3 qemu-system-x86 busybox-static cpio curl
  clang-format clang-tidy python3-jsonschema python3-yaml
  clang libclang-rt-14-dev
  swift swift-proxy swift-object swift-container swift-account memcached
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$package")
  fi
done

if ((${#missing[@]} > 0)); then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
