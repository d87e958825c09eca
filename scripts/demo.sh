#!/usr/bin/env bash
# Fresh machine -> installed packages -> Release build -> 2-rank synchronous training of the
# default MLP on Fashion-MNIST, then a short summary. Extra arguments go to `resync train`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh default

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mkdir -p results
metrics=results/demo.jsonl
mpirun -np 2 --oversubscribe build/default/runtime/resync train --epochs 3 --metrics "$metrics" "$@"

python3 - "$metrics" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows:
    if r["event"] == "eval":
        print(f"epoch {r['epoch']}: test accuracy {r['test_accuracy']:.4f}, "
              f"test loss {r['test_loss']:.4f} at {r['elapsed_s']:.1f} s")
s = rows[-1]
print(f"summary: {s['steps']} steps in {s['elapsed_s']:.1f} s, {s['samples_per_s']:.0f} samples/s, "
      f"test accuracy {s['test_accuracy']:.4f}, ranks agree: {s['ranks_agree']}")
PY
