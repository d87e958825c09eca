#!/usr/bin/env bash
# resync's all-reduce against MPI_Allreduce between two nodes of a virtual cluster
# (scripts/vcluster: 2 nodes x 2 ranks on this machine), unshaped and with every link shaped to
# RATE; REPS runs of `resync bench allreduce` per configuration, one table of medians each
# (time, algbw, busbw per size and implementation, and the median of the per-run busbw ratio).
# Prints the load average before and after each configuration (the cluster shares this
# machine's cores). Needs root. Leaves no cluster behind; its name is $VCLUSTER_NAME (default
# vcbench), so that runs of several users do not collide.
#
# Usage: scripts/bench/vcluster_allreduce.sh [-r REPS] [-R RATE] [-x RESYNC] [-- BENCH ARGS...]
#   defaults: 3 runs, 1gbit, build/default/runtime/resync, -b 64K -e 16M -f 4
set -euo pipefail
cd "$(dirname "$0")/../.."

reps=3 rate=1gbit resync=build/default/runtime/resync
while getopts "r:R:x:" opt; do
  case $opt in
    r) reps=$OPTARG ;; R) rate=$OPTARG ;; x) resync=$OPTARG ;;
    *) echo "usage: $0 [-r REPS] [-R RATE] [-x RESYNC] [-- BENCH ARGS...]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ ${1:-} == -- ]] && shift
bench_args=("$@")
[[ ${#bench_args[@]} -gt 0 ]] || bench_args=(-b 64K -e 16M -f 4)
[[ -x $resync ]] || { echo "$0: error: no resync at $resync (-x PATH)" >&2; exit 2; }

export VCLUSTER_NAME=${VCLUSTER_NAME:-vcbench} OMPI_MCA_btl=self,vader,tcp
tmp=$(mktemp -d)
trap 'scripts/vcluster down >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT

load() { cut -d' ' -f1-3 /proc/loadavg; }
for shaping in unshaped "$rate"; do
  if [[ $shaping == unshaped ]]; then scripts/vcluster up 2 --slots 2; else
    scripts/vcluster up 2 --slots 2 --rate "$shaping"; fi
  echo "# $shaping: load average before: $(load)" >&2
  for ((i = 1; i <= reps; i++)); do
    echo "# $shaping run $i: scripts/vcluster run -- --host n1:2,n2:2 --oversubscribe" \
         "--bind-to none $resync bench allreduce ${bench_args[*]}" >&2
    scripts/vcluster run -- --host n1:2,n2:2 --oversubscribe --bind-to none \
      "$resync" bench allreduce "${bench_args[@]}" --json "$tmp/$shaping.$i.json" >/dev/null
  done
  echo "# $shaping: load average after: $(load)" >&2
done

python3 - "$tmp" "$rate" <<'PY'
import glob, json, os, statistics, sys
tmp, rate = sys.argv[1], sys.argv[2]
for shaping in ["unshaped", rate]:
    runs = [[json.loads(l) for l in open(f)] for f in sorted(glob.glob(f"{tmp}/{shaping}.*.json"))]
    print(f"\n2 nodes x 2 ranks, {shaping}, median of {len(runs)} runs")
    print("| size | resync path | resync time (us) | resync algbw | resync busbw "
          "| MPI time (us) | MPI algbw | MPI busbw | busbw ratio |")
    print("|--:|:--|--:|--:|--:|--:|--:|--:|--:|")
    for size in sorted({r["bytes"] for r in runs[0]}):
        pick = lambda impl, key: statistics.median(
            r[key] for run in runs for r in run if r["bytes"] == size and r["impl"] == impl)
        ratio = statistics.median(
            next(r["busbw"] for r in run if r["bytes"] == size and r["impl"] == "resync") /
            next(r["busbw"] for r in run if r["bytes"] == size and r["impl"] == "mpi")
            for run in runs)
        path = next(r["path"] for r in runs[0] if r["bytes"] == size and r["impl"] == "resync")
        kib = f"{size // 1048576} MiB" if size >= 1048576 else f"{size // 1024} KiB"
        print(f"| {kib} | {path} | {pick('resync', 'time_us'):.0f} | {pick('resync', 'algbw'):.3f} "
              f"| {pick('resync', 'busbw'):.3f} | {pick('mpi', 'time_us'):.0f} "
              f"| {pick('mpi', 'algbw'):.3f} | {pick('mpi', 'busbw'):.3f} | {ratio:.2f} |")
PY
