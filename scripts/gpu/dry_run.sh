#!/usr/bin/env bash
# Rehearses scripts/gpu/check.sh on this (GPU-less, Debian) machine as if it were the bare node:
# in a private mount namespace (unshare -m, needs root) the machine's own Open MPI, PMIx and every
# library the bundle brings are hidden, so whatever check.sh runs can only find them in the
# bundle: the system's copies are covered by empty files (a load from them fails loudly) and
# Open MPI's and PMIx's folders by empty tmpfs mounts. libz, libudev, libuuid and libatomic stay:
# this machine's own tools need them and every Ubuntu/Debian image has them.
# NCCL is moved as the node has it: libnccl.so.2 is hidden in /usr/local/cuda and shown only
# under a fake PyTorch site-packages (nvidia/nccl/lib), which check.py must find by itself.
#
#   scripts/gpu/dry_run.sh [check.sh arguments]     (output also in .gpu-check-out/dry-run/)
#
# Where no GPU exists, every GPU check must come out SKIP, the rest PASS, and the exit code 0.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$(pwd)"
bundle="$repo/.gpu-bundle"
[ -d "$bundle/debs" ] || { echo "dry_run: no bundle; run scripts/gpu/prepare.sh first" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "dry_run: needs root (unshare -m, mount)" >&2; exit 1; }
out="$repo/.gpu-check-out/dry-run"
mkdir -p "$out"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for d in "$bundle"/debs/*.deb; do dpkg -x "$d" "$scratch/root"; done
find "$scratch/root" \( -type f -o -type l \) -name '*.so*' -printf '%f\n' | sort -u > "$scratch/names"

exec unshare -m --propagation private bash -s "$scratch" "$out" "$@" <<'EOS'
set -euo pipefail
scratch="$1" out="$2"; shift 2
: > "$scratch/empty"
hidden=0
hide_file() { local f; f="$(readlink -f "$1")"; [ -f "$f" ] || return 0
  mount --bind "$scratch/empty" "$f"; hidden=$((hidden + 1)); }
for d in /usr/lib/x86_64-linux-gnu/openmpi /usr/lib/x86_64-linux-gnu/pmix2 /usr/share/openmpi \
         /usr/share/pmix /etc/openmpi /usr/lib/x86_64-linux-gnu/openblas-pthread \
         /usr/lib/x86_64-linux-gnu/ucx /usr/lib/x86_64-linux-gnu/libibverbs; do
  [ -d "$d" ] && mount -t tmpfs -o size=1m none "$d"
done
for b in orterun orted mpirun mpiexec ompi_info; do
  [ -e "/usr/bin/$b" ] && hide_file "/usr/bin/$b"
done
while read -r name; do
  case "$name" in libz.so*|libudev.so*|libuuid.so*|libatomic.so*) continue ;; esac
  for dir in /usr/lib/x86_64-linux-gnu /lib/x86_64-linux-gnu /usr/lib; do
    [ -e "$dir/$name" ] && hide_file "$dir/$name"
  done
done < "$scratch/names"
# NCCL where PyTorch's wheels keep it, and absent from the toolkit's folder (which the binaries'
# RUNPATH names): the folder becomes a tmpfs of links to its other files.
nccl="$(readlink -f /usr/local/cuda/lib64/libnccl.so.2 || true)"
if [ -f "$nccl" ]; then
  cudalib="$(dirname "$nccl")"
  mkdir -p "$scratch/site/nvidia/nccl/lib" "$scratch/cudalib"
  mount --bind "$cudalib" "$scratch/cudalib"
  : > "$scratch/site/nvidia/nccl/lib/libnccl.so.2"
  mount --bind "$scratch/cudalib/$(basename "$nccl")" "$scratch/site/nvidia/nccl/lib/libnccl.so.2"
  mount -t tmpfs -o size=1m none "$cudalib"
  for f in "$scratch"/cudalib/*; do
    case "$(basename "$f")" in libnccl*) ;; *) ln -s "$f" "$cudalib/$(basename "$f")" ;; esac
  done
  export PYTHONPATH="$scratch/site"
fi
echo "# dry run: hid $hidden system files and Open MPI's folders; NCCL only under $scratch/site"
echo "# $(ls /usr/local/cuda/lib64/ | grep -c nccl) NCCL files left in /usr/local/cuda/lib64"
echo "# mpirun on PATH: $(command -v mpirun orterun 2>/dev/null | tr '\n' ' ')(hidden: empty files)"
export PATH=/usr/local/bin:/usr/bin:/bin
set +e
bash scripts/gpu/check.sh --out "$out" "$@"
rc=$?
echo "# check.sh exit code: $rc"
exit $rc
EOS
