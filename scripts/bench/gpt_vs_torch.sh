#!/usr/bin/env bash
# Tokens/s of one rank's gpt training step (forward + backward + SGD-momentum update), resync
# (`resync bench step --model gpt`) against the same model in PyTorch (gpt_torch_step.py), same
# shape, batch, thread count and invocation style: each measured 3 times, alternating, medians
# and their ratio printed. Needs Debian's python3-torch (scripts/setup.sh).
#   scripts/bench/gpt_vs_torch.sh [RESYNC] ; env: L H C T BATCH ITERS WARMUP THREADS
set -euo pipefail
RESYNC=${1:-build/default/runtime/resync}
L=${L:-4} H=${H:-4} C=${C:-128} T=${T:-128} BATCH=${BATCH:-16}
ITERS=${ITERS:-10} WARMUP=${WARMUP:-2} THREADS=${THREADS:-1}
here=$(cd "$(dirname "$0")" && pwd)
# Debian's python3-torch is in the system interpreter, which a pyenv python3 may shadow.
PY=python3
if ! "$PY" -c "import torch" 2>/dev/null; then PY=/usr/bin/python3; fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpt_vs_torch: PyTorch is not importable (install python3-torch: scripts/setup.sh)" >&2
  exit 77
fi
export OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS
# Wall-clock tokens/s, and tokens per second of process CPU time (the figure to compare when
# other work shares the machine: with one thread, CPU time is the step's time on an idle core).
ours=() theirs=() ours_cpu=() theirs_cpu=()
for i in 1 2 3; do
  out=$("$RESYNC" bench step --model gpt --n-layer "$L" --n-head "$H" --n-embd "$C" \
    --context "$T" --batch-size "$BATCH" --iters "$ITERS" --warmup "$WARMUP" --threads "$THREADS")
  ours+=("$(awk '$1 == "cpu" { print $6 }' <<< "$out")")
  ours_cpu+=("$(awk '/process cpu time/ { print $7 }' <<< "$out")")
  out=$("$PY" "$here/gpt_torch_step.py" "$L" "$H" "$C" "$T" "$BATCH" "$ITERS" "$WARMUP" "$THREADS")
  theirs+=("$(awk '{ print $3 }' <<< "$out")")
  theirs_cpu+=("$(awk '{ print $7 }' <<< "$out")")
  echo "run $i: resync ${ours[-1]} tokens/s (${ours_cpu[-1]} per cpu-s), torch ${theirs[-1]}" \
    "tokens/s (${theirs_cpu[-1]} per cpu-s)"
done
median() { printf '%s\n' "$@" | sort -g | sed -n 2p; }
echo "gpt L$L H$H C$C T$T batch $BATCH, $THREADS thread(s), step = forward + backward + SGD"
a=$(median "${ours[@]}") b=$(median "${theirs[@]}")
printf 'median tokens/s (wall):    resync %s, torch %s, ratio %.2fx\n' "$a" "$b" \
  "$(echo "$a / $b" | bc -l)"
a=$(median "${ours_cpu[@]}") b=$(median "${theirs_cpu[@]}")
printf 'median tokens per cpu-s:   resync %s, torch %s, ratio %.2fx\n' "$a" "$b" \
  "$(echo "$a / $b" | bc -l)"
