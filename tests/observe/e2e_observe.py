#!/usr/bin/env python3
"""End-to-end checks of `resync train --timeline/--progress` under mpirun.

Usage: e2e_observe.py RESYNC_BINARY MPIEXEC TIMELINE_MERGE SCENARIO
  timeline      3 ranks with a backup worker: a valid trace per rank (compute, wait_plan and the
                ring's phases; catch-up spans for the dropped rank), lanes whose spans nest, and
                a merge on which the partners of one ring overlap in time
  progress      --progress line: rank 0 alone prints plain lines, the last one at 100%; with
                auto (under mpirun: no terminal) no carriage returns; off: nothing
  bad_timeline  an unwritable --timeline path: exit 2 and one error line naming it
Each scenario exits non-zero with a message naming what differed.
"""
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from e2e_util import QUICK, E2e  # noqa: E402

RESYNC, MPIEXEC, MERGE, SCENARIO = sys.argv[1:5]
TMP = tempfile.mkdtemp(prefix="resync_observe_")
E2E = E2e(RESYNC, MPIEXEC, SCENARIO)
fail, run = E2E.fail, E2E.run


def train_ok(np, args):
    p = run(np, ["train"] + QUICK + args)
    if p.returncode != 0:
        fail(f"`resync train {' '.join(args)}` at np {np} exited {p.returncode}\n{p.stderr[-3000:]}")
    return p


def partial_overlaps(events):
    """Spans on one lane that overlap without nesting (viewers draw those wrongly)."""
    bad = []
    stack = []
    for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
        while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"] + 1e-3:
            stack.pop()
        if stack and e["ts"] + e["dur"] > stack[-1]["ts"] + stack[-1]["dur"] + 1e-3:
            bad.append((stack[-1]["name"], e["name"], e["ts"]))
        stack.append(e)
    return bad


def scenario_timeline():
    np, steps, slow = 3, 40, 2
    prefix = os.path.join(TMP, "trace")
    train_ok(np, ["--steps", str(steps), "--backup-workers", "1", "--inject-delay",
                  f"fixed:{slow}:20", "--timeline", prefix, "--progress", "off"])
    for r in range(np):
        path = f"{prefix}.rank{r}.json"
        if not os.path.exists(path):
            fail(f"rank {r} wrote no {path}")
        try:
            doc = json.load(open(path))
        except json.JSONDecodeError as e:
            fail(f"{path} is not valid JSON: {e}")
        other = doc["otherData"]
        if other.get("rank") != r or other.get("finished") is not True:
            fail(f"{path}: otherData {other}")
        if other.get("dropped_events") != 0:
            fail(f"{path}: {other['dropped_events']} events dropped in a 40-step run")
        xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
        names = collections.Counter(e["name"] for e in xs)
        if names["compute"] != steps and r != slow:
            fail(f"rank {r}: {names['compute']} compute spans for {steps} steps: {dict(names)}")
        if names["wait_plan"] != names["compute"]:
            fail(f"rank {r}: compute and wait_plan counts differ: {dict(names)}")
        lane2 = {e["name"] for e in xs if e["tid"] == 2}
        if names["allreduce"] > 0 and not (lane2 >= {"reduce_scatter", "all_gather"} or lane2 == {"allreduce"}):
            fail(f"rank {r}: collectives lane holds {lane2}")
        if r == slow and names["catch_up"] == 0:
            fail(f"rank {slow} (always late) has no catch_up span: {dict(names)}")
        for tid in (1, 2):
            bad = partial_overlaps([e for e in xs if e["tid"] == tid])
            if bad:
                fail(f"rank {r} lane {tid}: spans overlap without nesting: {bad[:3]}")
        for e in xs:
            if "step" in e.get("args", {}) and not 0 <= e["args"]["step"] <= steps:
                fail(f"rank {r}: event with step out of range: {e}")
    merged = os.path.join(TMP, "merged.json")
    p = subprocess.run([sys.executable, MERGE, "-o", merged, prefix], capture_output=True,
                       text=True, timeout=60)
    if p.returncode != 0:
        fail(f"timeline_merge exited {p.returncode}: {p.stderr}")
    doc = json.load(open(merged))
    # The ring partners of one step run its reduce-scatter at the same time: on the merged
    # axis their spans overlap (2 ms of slack for the hosts' clock reading).
    spans = collections.defaultdict(dict)
    for e in doc["traceEvents"]:
        if e["ph"] == "X" and e["name"] in ("reduce_scatter", "allreduce") and e["tid"] == 2:
            spans[(e["args"]["step"], e["args"].get("attempt", 0))][e["pid"]] = (
                e["ts"], e["ts"] + e["dur"])
    shared = [m for m in spans.values() if len(m) >= 2]
    if not shared:
        fail("no step with two ranks in the ring on the merged timeline")
    apart = [m for m in shared
             if max(a for a, _ in m.values()) > min(b for _, b in m.values()) + 2000]
    if apart:
        fail(f"{len(apart)} of {len(shared)} ring steps do not line up after merging: {apart[:2]}")


PROGRESS = re.compile(r"^progress: step (\d+)/(\d+) \(")


def scenario_progress():
    steps = 150
    p = train_ok(2, ["--steps", str(steps), "--progress", "line", "--progress-every-s", "0.1"])
    lines = [l for l in p.stderr.splitlines() if l.startswith("progress:")]
    if not lines:
        fail(f"--progress line printed nothing:\n{p.stderr[-2000:]}")
    got = [PROGRESS.match(l) for l in lines]
    if not all(got):
        fail(f"malformed progress lines: {lines}")
    done = [int(m.group(1)) for m in got]
    if done != sorted(done) or done[-1] != steps or int(got[-1].group(2)) != steps:
        fail(f"progress steps {done}, expected increasing and ending at {steps}")
    if done.count(steps) != 1:
        fail(f"the final line appears {done.count(steps)} times (only rank 0 reports): {lines}")
    for key in ("ETA ", "loss ", "dropped ", "epoch ", "samples/s"):
        if key not in lines[-1]:
            fail(f"the last progress line lacks '{key}': {lines[-1]}")
    p = train_ok(2, ["--steps", "20"])  # auto; mpirun gives ranks no terminal on stderr
    if "\r" in p.stderr or "progress:" not in p.stderr:
        fail(f"--progress auto under mpirun should print plain lines:\n{p.stderr!r}")
    p = train_ok(2, ["--steps", "20", "--progress", "off"])
    if "progress" in p.stderr or "\r" in p.stderr:
        fail(f"--progress off printed:\n{p.stderr}")


def scenario_bad_timeline():
    p = run(2, ["train"] + QUICK + ["--steps", "5", "--timeline", "/nonexistent/dir/trace"])
    if p.returncode != 2:
        fail(f"an unwritable --timeline exited {p.returncode}, expected 2\n{p.stderr[-2000:]}")
    ours = [l for l in p.stderr.splitlines() if l.startswith("resync: error")]
    if len(ours) != 1 or "--timeline" not in ours[0]:
        fail(f"expected one 'resync: error' line naming --timeline, got {ours}\n{p.stderr}")


globals()["scenario_" + SCENARIO]()
shutil.rmtree(TMP, ignore_errors=True)  # kept on failure, for a look
print(f"PASS [{SCENARIO}]")
