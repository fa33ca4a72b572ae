#!/usr/bin/env bash
# Installs the distribution packages barrierlm builds with, where they are missing.
# Needs root (or sudo) only when something is missing.
. "$(dirname "$0")/help.sh"
set -euo pipefail
pkgs=(cmake ninja-build g++ pkg-config libyaml-cpp-dev libspdlog-dev libcli11-dev libopenblas-dev
      catch2)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo=sudo
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq || true
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
