#!/usr/bin/env python3
"""scripts/timeline_merge on rank files written by the real Timeline (observe_timeline_gen)
and on hand-made ones: valid JSON in and out, ranks shifted onto one time axis by their
recorded origin, and every kind of bad input rejected with exit 2 and one error line.

usage: timeline_merge_test.py GEN_BINARY MERGE_SCRIPT WORK_DIR"""
import json
import os
import shutil
import subprocess
import sys

GEN, MERGE, WORK = sys.argv[1:4]
failures = []


def check(cond, msg):
    if not cond:
        failures.append(msg)
        print("FAIL:", msg)


def run_merge(*args):
    return subprocess.run([sys.executable, MERGE, *args], capture_output=True, text=True,
                          timeout=30)


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def rank_doc(rank, origin_us, events):
    return {"traceEvents": [{"ph": "M", "pid": rank, "tid": 0, "name": "process_name",
                             "args": {"name": f"rank {rank}"}}] + events,
            "displayTimeUnit": "ms",
            "otherData": {"rank": rank, "origin_unix_us": origin_us, "dropped_events": 0}}


shutil.rmtree(WORK, ignore_errors=True)
os.makedirs(WORK)

# 1. Files from the real writer parse, and their events are well formed.
prefix = os.path.join(WORK, "gen")
n_ranks = 3
subprocess.run([GEN, prefix, str(n_ranks)], check=True, timeout=30)
for r in range(n_ranks):
    doc = load(f"{prefix}.rank{r}.json")  # raises on invalid JSON: the test fails
    other = doc["otherData"]
    check(other["rank"] == r, f"rank {r}: otherData.rank is {other['rank']}")
    check(other["finished"] is True, f"rank {r}: finished is {other['finished']}")
    names = {e["args"]["name"] for e in doc["traceEvents"]
             if e["ph"] == "M" and e["name"] in ("process_name", "thread_name")}
    check({f"rank {r}", "train", "collectives"} <= names, f"rank {r}: metadata names {names}")
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    for e in xs:
        check(e["pid"] == r and e["tid"] in (1, 2) and e["dur"] >= 0 and "ts" in e,
              f"rank {r}: bad event {e}")
    if r == 1:
        check(len(xs) == 4 and other["dropped_events"] > 0,
              f"rank 1: {len(xs)} events, {other['dropped_events']} dropped (cap 4)")
    else:
        check(other["dropped_events"] == 0, f"rank {r}: dropped {other['dropped_events']}")
        check(any(e["name"] == 'odd "name"\t\\' and e["args"] == {"n": -3} for e in xs),
              f"rank {r}: escaped name or arg lost")
        check(sum(1 for e in xs if e["name"] == "reduce_scatter" and e["tid"] == 2) == 3,
              f"rank {r}: expected 3 reduce_scatter events on the collectives lane")

# 2. Merging by prefix: one file, every rank's events, markers aligned on one axis.
res = run_merge(prefix)
check(res.returncode == 0, f"merge by prefix exited {res.returncode}: {res.stderr}")
merged = load(f"{prefix}.merged.json")
check(merged["displayTimeUnit"] == "ms", "merged displayTimeUnit")
check(merged["otherData"]["ranks"] == [0, 1, 2], f"merged ranks {merged['otherData']['ranks']}")
markers = {e["pid"]: e["ts"] for e in merged["traceEvents"] if e.get("name") == "marker"}
check(sorted(markers) == [0, 1, 2], f"markers of ranks {sorted(markers)}")
if markers:
    spread = max(markers.values()) - min(markers.values())
    check(spread < 500, f"markers recorded at one instant are {spread} us apart after merging")
n_in = sum(len(load(f"{prefix}.rank{r}.json")["traceEvents"]) for r in range(n_ranks))
check(len(merged["traceEvents"]) == n_in, f"{len(merged['traceEvents'])} events out, {n_in} in")

# 3. Hand-made ranks 1.5 s apart: exact shifts, explicit output path and file list.
a = os.path.join(WORK, "hand.rank0.json")
b = os.path.join(WORK, "hand.rank1.json")
write(a, json.dumps(rank_doc(0, 1_000_000_000, [
    {"ph": "X", "pid": 0, "tid": 1, "name": "compute", "ts": 10.5, "dur": 2}])))
write(b, json.dumps(rank_doc(1, 1_001_500_000, [
    {"ph": "X", "pid": 1, "tid": 1, "name": "compute", "ts": 10.5, "dur": 2}])))
out = os.path.join(WORK, "hand_out.json")
res = run_merge("-o", out, b, a)
check(res.returncode == 0, f"merge of hand-made files exited {res.returncode}: {res.stderr}")
ts = {e["pid"]: e["ts"] for e in load(out)["traceEvents"] if e["ph"] == "X"}
check(ts == {0: 10.5, 1: 1_500_010.5}, f"shifted timestamps {ts}")

# 4. Bad inputs: exit 2 with exactly one line on stderr, naming the problem.
bad_cases = {
    "not_json": "{ this is not json",
    "no_events": json.dumps({"otherData": {"rank": 0, "origin_unix_us": 1}}),
    "no_origin": json.dumps({"traceEvents": [], "otherData": {"rank": 0}}),
    "bad_rank": json.dumps({"traceEvents": [], "otherData": {"rank": "x", "origin_unix_us": 1}}),
    "bad_event": json.dumps({"traceEvents": [3], "otherData": {"rank": 0, "origin_unix_us": 1}}),
}
for name, text in bad_cases.items():
    path = os.path.join(WORK, f"bad_{name}.rank0.json")
    write(path, text)
    res = run_merge("-o", os.path.join(WORK, "never.json"), path)
    lines = res.stderr.strip().splitlines()
    check(res.returncode == 2, f"{name}: exit {res.returncode}, expected 2")
    check(len(lines) == 1 and path in lines[0], f"{name}: stderr {res.stderr!r}")
dup = os.path.join(WORK, "dup.json")
write(dup, json.dumps(rank_doc(0, 5, [])))
for args, what in ((["-o", os.path.join(WORK, "x.json"), a, dup], "duplicate rank"),
                   ([os.path.join(WORK, "missing")], "missing prefix"),
                   (["-o", os.path.join(WORK, "x.json"), os.path.join(WORK, "none.rank0.json"),
                     a], "missing file")):
    res = run_merge(*args)
    check(res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1,
          f"{what}: exit {res.returncode}, stderr {res.stderr!r}")
check(not os.path.exists(os.path.join(WORK, "never.json")), "an output was written for bad input")

print(f"timeline_merge_test: {len(failures)} failures")
sys.exit(1 if failures else 0)
