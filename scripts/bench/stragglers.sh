#!/usr/bin/env bash
# Straggler benchmark: mean and p99 step time of plain sync, sync with one backup worker and sync
# with a straggler timeout, all under the same injected delays (one random rank per step sleeps a
# heavy-tailed time), next to the no-delay baseline -- from one invocation, so the ratios are fair.
# The modes run in turn, REPS rounds of them; each figure is the median over the rounds and the
# ratio is the median of each round's ratio to that round's baseline (machines are noisy).
#
# Usage: scripts/bench/stragglers.sh [-n RANKS] [-s STEPS] [-d DELAY_SPEC] [-t TIMEOUT_MS] [-r REPS]
#                                    [-- TRAIN FLAGS]
#   defaults: 4 ranks, 300 steps, one:lognormal:30:0.8 (median 30 ms), timeout 10 ms, 3 rounds;
#   the model is mlp 784-512-512-10 on synthetic data unless train flags after -- say otherwise:
#   scripts/bench/stragglers.sh -n 3 -s 200 -d one:lognormal:200:0.8 -t 40 -- --model gpt \
#     --data text:FILE --n-layer 2 --n-embd 64 --context 64 --batch-size 8 --optimizer adamw
# Across the nodes of a virtual cluster (scripts/vcluster up 2 --rate 1gbit first):
#   LAUNCH="scripts/vcluster run --" HOSTS=n1:2,n2:2 scripts/bench/stragglers.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

ranks=4 steps=300 delay="one:lognormal:30:0.8" timeout_ms=10 reps=3
while getopts "n:s:d:t:r:" opt; do
  case $opt in
    n) ranks=$OPTARG ;; s) steps=$OPTARG ;; d) delay=$OPTARG ;; t) timeout_ms=$OPTARG ;;
    r) reps=$OPTARG ;;
    *) echo "usage: $0 [-n RANKS] [-s STEPS] [-d DELAY_SPEC] [-t TIMEOUT_MS] [-r REPS]" >&2
       exit 2 ;;
  esac
done
shift $((OPTIND - 1))
extra=("$@")  # train flags after --: a flag is given once, so not --steps (that is -s)

resync=${RESYNC:-build/default/runtime/resync}
[ -x "$resync" ] || scripts/build.sh default
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
out=$(mktemp -d)
common=(train --progress off --steps "$steps" --log-level warn)
# The default workload, unless the extra flags choose another model or data.
if [[ " ${extra[*]-} " != *" --model "* && " ${extra[*]-} " != *" --data "* ]]; then
  common+=(--data synthetic --synthetic-train 40000 --hidden 512,512 --batch-size 64)
fi

run() {  # name, extra flags...
  local name=$1; shift
  ${LAUNCH:-mpirun} -np "$ranks" ${HOSTS:+--host "$HOSTS"} --oversubscribe --bind-to none \
    "$resync" "${common[@]}" \
    --metrics "$out/$name.jsonl" "$@" ${extra[@]+"${extra[@]}"}
}

for ((rep = 0; rep < reps; ++rep)); do
  run "baseline.$rep"
  run "plain.$rep" --inject-delay "$delay"
  run "backup1.$rep" --inject-delay "$delay" --backup-workers 1
  run "backup1_late.$rep" --inject-delay "$delay" --backup-workers 1 --early-catch-up false
  run "timeout.$rep" --inject-delay "$delay" --straggler-timeout-ms "$timeout_ms"
done

python3 - "$out" "$ranks" "$steps" "$delay" "$timeout_ms" "$reps" "${extra[*]-}" <<'PY'
import json, statistics, sys
out, ranks, steps, delay, timeout_ms, reps, extra = sys.argv[1:]
reps = int(reps)

def load(name):
    rows = [json.loads(l) for l in open(f"{out}/{name}.jsonl")]
    st = [r for r in rows if r["event"] == "step"][5:]  # skip warm-up
    # Wall-clock time per step on rank 0, also across steps it missed while catching up.
    ms = sorted(1000 * (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
                for a, b in zip(st, st[1:]))
    mean = 1000 * (st[-1]["elapsed_s"] - st[0]["elapsed_s"]) / (st[-1]["step"] - st[0]["step"])
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    return mean, p99, rows[-1]

base = [load(f"baseline.{k}")[0] for k in range(reps)]
workload = extra or "mlp 784-512-512-10, batch 64/rank"
print(f"{ranks} ranks, {steps} steps, {workload}, --inject-delay {delay}; median of {reps} rounds")
print(f"{'mode':<28}{'mean ms':>10}{'p99 ms':>10}{'x baseline':>12}  {'per round':<20}"
      f"{'dropped':>9}{'catch-ups':>11}")
for name, label in [("baseline", "no delay (plain sync)"), ("plain", "plain sync"),
                    ("backup1", "sync, --backup-workers 1"),
                    ("backup1_late", "  same, no early catch-up"),
                    ("timeout", f"sync, timeout {timeout_ms} ms")]:
    runs = [load(f"{name}.{k}") for k in range(reps)]
    ratios = [r[0] / b for r, b in zip(runs, base)]
    print(f"{label:<28}{statistics.median(r[0] for r in runs):>10.2f}"
          f"{statistics.median(r[1] for r in runs):>10.2f}{statistics.median(ratios):>12.2f}  "
          f"{' '.join(f'{x:.2f}' for x in ratios):<20}"
          f"{statistics.median(r[2]['dropped_gradients'] for r in runs):>9.0f}"
          f"{statistics.median(r[2]['catch_ups'] for r in runs):>11.0f}")
PY
rm -rf "$out"
