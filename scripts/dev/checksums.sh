#!/usr/bin/env bash
# Prints the final param_checksum of fixed-seed runs that a restructure must not change: plain
# sync at np 1-4, backup workers without injected delays, and a checkpoint/resume pair (which must
# also equal the straight run); then the same kinds of runs with AdamW. Compare the output before
# and after a change:
#   scripts/dev/checksums.sh build/default/runtime/resync > after.txt; diff before.txt after.txt
# With backup workers the participants of a step depend on arrival order, so that line is only
# stable where every step closes with the same ranks (it prints three runs to show it).
set -euo pipefail
RESYNC=${1:-build/default/runtime/resync}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
QUICK=(--data synthetic --synthetic-train 4000 --synthetic-test 1000 --hidden 64 --batch-size 32
       --seed 7 --log-level warn --progress off)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
checksum() { python3 -c 'import json,sys; print([json.loads(l) for l in open(sys.argv[1])][-1]["param_checksum"])' "$1"; }
run() {  # run NP NAME ARGS...
  local np=$1 name=$2; shift 2
  rm -f "$tmp/m.jsonl"
  mpirun -np "$np" --oversubscribe --bind-to none "$RESYNC" train "${QUICK[@]}" "$@" \
    --metrics "$tmp/m.jsonl" > "$tmp/out.log" 2>&1 || { cat "$tmp/out.log" >&2; exit 1; }
  printf '%-40s %s\n' "$name" "$(checksum "$tmp/m.jsonl")"
}
for np in 1 2 3 4; do run "$np" "sync np $np, 60 steps" --steps 60; done
for i in 1 2 3; do run 3 "backup-workers 1 np 3, 60 steps (#$i)" --steps 60 --backup-workers 1; done
run 3 "straggler timeout 60 s np 3 (all in time)" --steps 60 --straggler-timeout-ms 60000
for model in mlp cnn; do run 2 "sync np 2 $model, 2 epochs" --model "$model" --epochs 2; done
rm -rf "$tmp/ckpt"
run 2 "checkpoint: 1 epoch" --epochs 1 --checkpoint-dir "$tmp/ckpt"
run 2 "resume: + 1 epoch" --epochs 2 --checkpoint-dir "$tmp/ckpt" --resume
# AdamW (warm-up, clipping; the cosine run checkpointed every 25 steps and resumed at 25).
ADAMW=(--optimizer adamw --lr 0.003 --grad-clip 1 --warmup-steps 5)
for np in 1 3; do run "$np" "adamw np $np, 60 steps, cosine" "${ADAMW[@]}" --steps 60 \
  --lr-schedule cosine --min-lr 0.0003; done
rm -rf "$tmp/ckpt"
run 2 "adamw checkpoint: 1 epoch" "${ADAMW[@]}" --epochs 1 --checkpoint-dir "$tmp/ckpt"
run 2 "adamw resume: + 1 epoch" "${ADAMW[@]}" --epochs 2 --checkpoint-dir "$tmp/ckpt" --resume
run 2 "adamw 2 epochs straight (= resume)" "${ADAMW[@]}" --epochs 2
