#!/usr/bin/env bash
# Fresh machine -> installed packages -> Release build -> the whole test suite (ctest).
# Usage: scripts/test.sh [ctest args...]   e.g. scripts/test.sh -L unit
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh default
ctest --preset default -j "$(nproc)" "$@"
