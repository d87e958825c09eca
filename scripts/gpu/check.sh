#!/usr/bin/env bash
# The GPU check, in one command, on a bare GPU node (CUDA toolkit, CMake, PyTorch; no Open MPI,
# OpenBLAS, spdlog or other Debian libraries; no network). Needs the bundle that
# scripts/gpu/prepare.sh builds into .gpu-bundle/ (binaries built for sm_90, the Debian packages
# they need at run time, Fashion-MNIST, the CPU reference figures); the device call carries it.
#
#   scripts/gpu/check.sh [--budget-s 360] [--only tests,train,bench] [--models mlp,cnn] ...
#
# Prints one PASS / FAIL / SKIP line per check with its figures, then a summary; exits 1 if any
# check FAILed. Without a usable GPU the GPU checks are SKIPs (with the reason) and the rest runs.
# Logs and metrics: $OUT (the device tool brings it back) or .gpu-check-out/: check.log,
# summary.txt, logs.tar.gz. Options: scripts/gpu/check.py --help. README: "GPU check".
set -u
here="$(cd "$(dirname "$0")" && pwd)"
if ! command -v python3 >/dev/null; then
  echo "FAIL  python3 is not on PATH: the check needs it (standard library only)"
  exit 1
fi
# PyTorch's python is the one on PATH there; never hand the bundle's libraries to it.
unset LD_LIBRARY_PATH OPAL_PREFIX
export PYTHONUNBUFFERED=1
exec python3 "$here/check.py" "$@"
