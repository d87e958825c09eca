#!/usr/bin/env bash
# Installs the Debian packages resync needs when they are missing. Idempotent; run as root
# (or with sudo available) on Debian bookworm. Nothing else is downloaded.
set -euo pipefail

packages=(
  build-essential cmake pkg-config
  openmpi-bin libopenmpi-dev libopenblas-dev
  libspdlog-dev libfmt-dev libcli11-dev zlib1g-dev
  googletest libgtest-dev libgmock-dev libbenchmark-dev
  dataset-fashion-mnist bible-kjv python3 python3-matplotlib python3-torch
  slurm-wlm munge
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present"
  exit 0
fi

echo "setup: installing ${missing[*]}"
sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
