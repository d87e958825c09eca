#!/usr/bin/env python3
"""Table of a scaling sweep's results (the np<N>.jsonl metrics files of sweep.sbatch).

Usage: sweep_table.py RESULTS_DIR [--json]
Prints one row per rank count: steps, seconds, samples/s, speed-up and parallel efficiency
against the smallest count, test accuracy, ranks_agree. Exits 1 if a run has no summary.
"""
import glob
import json
import os
import re
import sys


def summaries(results_dir):
    rows = []
    for path in glob.glob(os.path.join(results_dir, "np*.jsonl")):
        match = re.fullmatch(r"np(\d+)\.jsonl", os.path.basename(path))
        if not match:
            continue
        records = [json.loads(line) for line in open(path) if line.strip()]
        summary = next((r for r in reversed(records) if r.get("event") == "summary"), None)
        rows.append((int(match.group(1)), path, summary))
    return sorted(rows)


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    rows = summaries(sys.argv[1])
    if not rows:
        print(f"sweep_table: no np<N>.jsonl files in {sys.argv[1]}", file=sys.stderr)
        return 1
    missing = [path for _, path, s in rows if s is None]
    done = [(np, s) for np, _, s in rows if s is not None]
    table = []
    if done:
        base_np, base = done[0]
        for np, s in done:
            speedup = s["samples_per_s"] / base["samples_per_s"] if base["samples_per_s"] else 0
            table.append({"ranks": np, "steps": s["steps"], "elapsed_s": s["elapsed_s"],
                          "samples_per_s": s["samples_per_s"], "speedup": speedup,
                          "efficiency": speedup * base_np / np,
                          "test_accuracy": s.get("test_accuracy"),
                          "ranks_agree": s.get("ranks_agree")})
    if "--json" in sys.argv[2:]:
        print(json.dumps(table))
    else:
        print(f"{'ranks':>5} {'steps':>7} {'seconds':>9} {'samples/s':>11} {'speed-up':>8} "
              f"{'effic.':>6} {'test acc':>8} {'agree':>5}")
        for r in table:
            acc = "-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}"
            print(f"{r['ranks']:>5} {r['steps']:>7} {r['elapsed_s']:>9.2f} "
                  f"{r['samples_per_s']:>11.0f} {r['speedup']:>8.2f} {r['efficiency']:>6.2f} "
                  f"{acc:>8} {str(r['ranks_agree']).lower():>5}")
    for path in missing:
        print(f"sweep_table: {path} has no summary (run failed or still running)", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
