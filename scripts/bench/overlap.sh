#!/usr/bin/env bash
# Plain sync with and without overlap (--overlap off|on): samples/s of the mlp 784-512-512-10 at
# batch 64, ROUNDS rounds alternating the two, from one invocation so the ratio is fair.
# Usage: scripts/bench/overlap.sh [-n RANKS] [-s STEPS] [-r ROUNDS]   (defaults 4, 300, 3)
# Across the nodes of a virtual cluster (scripts/vcluster up 2 [--rate 1gbit] first):
#   LAUNCH="scripts/vcluster run --" HOSTS=n1:2,n2:2 scripts/bench/overlap.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ranks=4 steps=300 rounds=3
while getopts "n:s:r:" opt; do
  case $opt in
    n) ranks=$OPTARG ;; s) steps=$OPTARG ;; r) rounds=$OPTARG ;;
    *) echo "usage: $0 [-n RANKS] [-s STEPS] [-r ROUNDS]" >&2; exit 2 ;;
  esac
done
resync=${RESYNC:-build/default/runtime/resync}
[ -x "$resync" ] || scripts/build.sh default
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
for ((r = 0; r < rounds; ++r)); do
  for ov in off on; do
    ${LAUNCH:-mpirun} -np "$ranks" ${HOSTS:+--host "$HOSTS"} --oversubscribe --bind-to none \
      "$resync" train --data synthetic --synthetic-train 40000 --batch-size 64 --steps "$steps" \
      --progress off --log-level warn --overlap "$ov" --metrics "$out/$ov.$r.jsonl" > /dev/null
  done
done
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
rate = {ov: [[json.loads(l) for l in open(f"{out}/{ov}.{r}.jsonl")][-1]["samples_per_s"]
             for r in range(rounds)] for ov in ("off", "on")}
for ov, v in rate.items():
    print(f"--overlap {ov:3}  samples/s " + " ".join(f"{x:.0f}" for x in v) +
          f"  median {statistics.median(v):.0f}")
print(f"on / off (medians): {statistics.median(rate['on']) / statistics.median(rate['off']):.2f}")
PY
