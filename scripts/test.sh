#!/usr/bin/env bash
# The test command: installs what is missing (Debian/Ubuntu packages), configures, builds and
# runs the whole suite through ctest.  GPU tests report "skipped" on machines without a GPU.
#
#   scripts/test.sh                 # build in ./build and run every test
#   BUILD_DIR=b scripts/test.sh -L cpu   # extra arguments go to ctest
. "$(dirname "$0")/help.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}

scripts/install-deps.sh

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S . -B "$BUILD_DIR" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release ${CMAKE_ARGS:-}
cmake --build "$BUILD_DIR" -j "$(nproc)"
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$(nproc)" "$@"
