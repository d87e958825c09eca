#!/usr/bin/env bash
# Builds the bundle that scripts/gpu/check.sh runs on a bare GPU node: .gpu-bundle/ (ignored).
#
#   scripts/gpu/prepare.sh [--no-build] [--no-ref]
#
#   1. builds resync and the gpu-labelled test binaries with the CUDA backend for the H100/H200
#      (sm_90 code + compute_90 PTX) into $BUILD_DIR (default build/gpu; Release, RESYNC_CUDA=ON);
#   2. strips them into .gpu-bundle/bin.tar.xz;
#   3. downloads (apt-get download) every Debian package they and Open MPI need at run time
#      beyond libc6, libstdc++6, libgcc-s1 and the CUDA toolkit (scripts/gpu/deps.py reads ldd);
#      libstdc++6 and libgcc-s1 travel too, as a fallback check.sh unpacks only where the node's
#      own are older than bookworm's;
#   4. copies Fashion-MNIST ($FASHION_MNIST_DIR, default /usr/share/datasets/fashion-mnist) and
#      the first 1 MB of the King James Bible (Debian's bible-kjv, as `--data bible-kjv` reads it)
#      for the gpt runs;
#   5. runs the CPU reference (check.py --make-cpu-ref: every training configuration of the check
#      with --device cpu, through the unpacked bundle, plus seeds 2 and 3 for the noise) into
#      .gpu-bundle/ref/cpu_ref.json; a few minutes on 2 cores;
#   6. writes .gpu-bundle/MANIFEST.json and checks the size against $BUNDLE_LIMIT_MIB (default
#      56: the device call carries at most 64 MiB, the working tree's tracked files included).
#
# Environment: BUILD_DIR, GPU_ARCHS (default "90-real;90-virtual"), JOBS (default 2; the build
# runs under nice -n 10), FASHION_MNIST_DIR, BUNDLE_LIMIT_MIB.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$(pwd)"
build_dir="${BUILD_DIR:-build/gpu}"
archs="${GPU_ARCHS:-90-real;90-virtual}"
jobs="${JOBS:-2}"
data_src="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
limit_mib="${BUNDLE_LIMIT_MIB:-56}"
bundle="$repo/.gpu-bundle"
do_build=1 do_ref=1
for a in "$@"; do
  case "$a" in
    --no-build) do_build=0 ;;
    --no-ref) do_ref=0 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "prepare.sh: unknown argument '$a'" >&2; exit 2 ;;
  esac
done

# The test binaries check.py runs (tests/kernels/cuda, tests/models), and the program.
tests=(cuda_kernels_test cuda_context_test nccl_allreduce_gpu_test nccl_allreduce_test replica_cuda_test
       device_model_cuda_test)
say() { echo "prepare: $*"; }

# 1. Build.
if [ "$do_build" = 1 ]; then
  launcher=()
  if command -v ccache >/dev/null; then
    launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
  fi
  gen=()
  if command -v ninja >/dev/null && [ ! -f "$build_dir/CMakeCache.txt" ]; then gen=(-G Ninja); fi
  say "configuring $build_dir (CUDA architectures $archs)"
  nice -n 10 cmake -S . -B "$build_dir" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DRESYNC_CUDA=ON \
    "-DCMAKE_CUDA_ARCHITECTURES:STRING=$archs" "${launcher[@]}" >/dev/null
  say "building resync ${tests[*]} (-j$jobs, nice)"
  nice -n 10 cmake --build "$build_dir" -j "$jobs" --target resync "${tests[@]}"
fi
grep -q '^RESYNC_WITH_CUDA:INTERNAL=ON' "$build_dir/CMakeCache.txt" ||
  { echo "prepare: $build_dir is not a CUDA build (RESYNC_WITH_CUDA is not ON)" >&2; exit 1; }
built_archs="$(sed -n 's/^CMAKE_CUDA_ARCHITECTURES:[A-Z]*=//p' "$build_dir/CMakeCache.txt")"
case ";$built_archs;" in
  *";90-real;"*|*";90;"*|*";90a-real;"*) ;;
  *) echo "prepare: $build_dir is built for '$built_archs', without sm_90 code for the H100" >&2
     exit 1 ;;
esac

# 2. Binaries, stripped and compressed.
rm -rf "$bundle"
mkdir -p "$bundle/debs/fallback" "$bundle/data/fashion-mnist" "$bundle/ref"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir "$stage/bin"
cp "$build_dir/runtime/resync" "$stage/bin/"
for t in "${tests[@]}"; do
  f="$(find "$build_dir/tests" -type f -name "$t" -perm -u+x | head -1)"
  [ -n "$f" ] || { echo "prepare: test binary $t not built in $build_dir" >&2; exit 1; }
  cp "$f" "$stage/bin/"
done
strip --strip-unneeded "$stage"/bin/*
say "binaries (stripped): $(du -sh "$stage/bin" | cut -f1)"
tar -C "$stage" -cf - bin | xz -6 -T"$jobs" > "$bundle/bin.tar.xz"

# 3. Debian packages: what ldd shows the binaries, mpirun/orted and every Open MPI and PMIx
#    component need, plus Open MPI's own packages (help files, configuration) and OpenBLAS.
ompi_parts=(/usr/bin/orterun /usr/bin/orted
            /usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3/*.so
            /usr/lib/x86_64-linux-gnu/pmix2/lib/pmix/*.so)
mapfile -t pkgs < <( { python3 scripts/gpu/deps.py "$stage"/bin/* "${ompi_parts[@]}"
  printf '%s\n' openmpi-bin openmpi-common libopenmpi3 libpmix2 libopenblas0-pthread \
    libgfortran5 libquadmath0; } | sort -u)
download() {  # the installed version where the archive still has it, else the candidate
  local dir="$1"; shift
  for p in "$@"; do
    local v
    v="$(dpkg-query -W -f='${Version}' "$p" 2>/dev/null || true)"
    (cd "$dir" && { [ -n "$v" ] && apt-get download -q "$p=$v" >/dev/null 2>&1 ||
                    apt-get download -q "$p" >/dev/null 2>&1; }) ||
      { echo "prepare: apt-get download $p failed" >&2; exit 1; }
  done
}
say "downloading ${#pkgs[@]} packages: ${pkgs[*]}"
download "$bundle/debs" "${pkgs[@]}"
download "$bundle/debs/fallback" libstdc++6 libgcc-s1

# 4. Data.
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  if [ -f "$data_src/$f.gz" ]; then cp "$data_src/$f.gz" "$bundle/data/fashion-mnist/"
  elif [ -f "$data_src/$f" ]; then gzip -c "$data_src/$f" > "$bundle/data/fashion-mnist/$f.gz"
  else echo "prepare: $data_src lacks $f(.gz)" >&2; exit 1; fi
done

bible_cache="${XDG_CACHE_HOME:-$HOME/.cache}/resync/bible-kjv.txt"
if [ -s "$bible_cache" ]; then head -c 1000000 "$bible_cache" > "$bundle/data/bible-kjv-1m.txt"
elif command -v bible >/dev/null; then
  { bible -l79 gen1:1-rev22:21 || true; } | head -c 1000000 > "$bundle/data/bible-kjv-1m.txt"
else echo "prepare: no bible-kjv text ($bible_cache, or the bible program of bible-kjv)" >&2; exit 1; fi
[ "$(stat -c %s "$bundle/data/bible-kjv-1m.txt")" = 1000000 ] ||
  { echo "prepare: the bible-kjv text is shorter than 1 MB" >&2; exit 1; }

# 6 (first half). The newest glibc symbol version anything in the bundle needs.
mkdir "$stage/root"
for d in "$bundle"/debs/*.deb; do dpkg -x "$d" "$stage/root"; done
# (objdump fails on the packages' scripts; only the ELF files' symbol tables matter)
symbols="$(find "$stage/bin" "$stage/root" -type f \( -name '*.so*' -o -perm -u+x \) \
  -exec objdump -T {} + 2>/dev/null || true)"
glibc_needed="$(grep -o 'GLIBC_[0-9.]*[0-9]' <<<"$symbols" | sort -uV | tail -1)"
glibcxx_needed="$(grep -o 'GLIBCXX_[0-9.]*[0-9]' <<<"$symbols" | sort -uV | tail -1)"
nccl_version="$(sed -n 's/^#define NCCL_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\).*/\2/p' \
  "$(sed -n 's/^RESYNC_NCCL_INCLUDE_DIR:PATH=//p' "$build_dir/CMakeCache.txt")/nccl.h" | paste -sd.)"
cuda_version="$(sed -n 's/^set(CMAKE_CUDA_COMPILER_VERSION "\(.*\)")/\1/p' "$build_dir"/CMakeFiles/*/CMakeCUDACompiler.cmake | head -1)"
commit="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!.gpu-bundle' || echo '+dirty')"

# 5. CPU reference through the bundle (also rehearses the unpack and the relocated Open MPI).
if [ "$do_ref" = 1 ]; then
  say "CPU reference (every training configuration of the check, --device cpu)"
  python3 scripts/gpu/check.py --bundle "$bundle" --out "$stage/ref-out" \
    --make-cpu-ref "$bundle/ref/cpu_ref.json" --budget-s 100000
fi

# 6. Manifest and size.
python3 - "$bundle" <<EOF
import hashlib, json, os, sys
b = sys.argv[1]
files = {}
for d, _, names in os.walk(b):
    for n in sorted(names):
        p = os.path.join(d, n)
        files[os.path.relpath(p, b)] = {"bytes": os.path.getsize(p),
                                         "sha256": hashlib.sha256(open(p, "rb").read()).hexdigest()}
json.dump({"commit": "$commit", "built": "$(date -u +%Y-%m-%dT%H:%MZ)", "cuda_archs": "$built_archs",
           "cuda": "$cuda_version", "nccl_built_against": "$nccl_version",
           "glibc_needed": "$glibc_needed", "glibcxx_needed": "$glibcxx_needed",
           "debian": open("/etc/debian_version").read().strip(), "files": files},
          open(os.path.join(b, "MANIFEST.json"), "w"), indent=1)
EOF
bytes="$(du -sb "$bundle" | cut -f1)"
mib="$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')"
say "bundle $bundle: $mib MiB ($(ls "$bundle"/debs/*.deb | wc -l) packages + $(ls "$bundle"/debs/fallback/*.deb | wc -l) fallback, binaries $(du -h "$bundle/bin.tar.xz" | cut -f1), data $(du -sh "$bundle/data" | cut -f1)); needs glibc $glibc_needed, $glibcxx_needed"
if awk -v b="$bytes" -v l="$limit_mib" 'BEGIN { exit !(b > l * 1048576) }'; then
  echo "prepare: the bundle is over $limit_mib MiB" >&2
  exit 1
fi
say "done. Device call: command 'bash scripts/gpu/check.sh', carry ['.gpu-bundle'] (README: GPU check)"
