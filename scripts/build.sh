#!/usr/bin/env bash
# Configures and builds resync with a CMake preset (default: "default", i.e. Release).
# Usage: scripts/build.sh [preset]
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${1:-default}"
cmake --preset "$preset" >/dev/null
cmake --build --preset "$preset" -j "$(nproc)"
