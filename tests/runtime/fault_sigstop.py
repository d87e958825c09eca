#!/usr/bin/env python3
"""Fault test: freeze one rank with SIGSTOP mid-training, with one backup worker.

The other ranks must keep closing steps while it is stopped; after SIGCONT it catches up, and
the run ends with every rank holding the same parameters. Bounded in time: every wait has a
deadline, and the job is killed if it overstays.

Usage: fault_sigstop.py RESYNC_BINARY MPIEXEC [OPTIMIZER]   (sgd, the default, or adamw)
"""
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mpi_procs import rank_pid, wait_for  # noqa: E402

RESYNC, MPIEXEC = sys.argv[1], sys.argv[2]
OPTIMIZER = sys.argv[3] if len(sys.argv) > 3 else "sgd"
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
TMP = tempfile.mkdtemp(prefix="resync_fault_")
METRICS = os.path.join(TMP, "sigstop.jsonl")
NP, VICTIM, STOP_S = 4, 2, 3.0


def fail(msg, job=None):
    if job is not None and job.poll() is None:
        job.kill()
    print(f"FAIL [sigstop]: {msg}", file=sys.stderr)
    sys.exit(1)


def last_step():
    try:
        with open(METRICS) as f:
            steps = [json.loads(l)["step"] for l in f if '"event":"step"' in l]
        return steps[-1] if steps else -1
    except (OSError, ValueError):
        return -1


def find_rank_pid(rank):
    """The pid of the resync process with this MPI rank writing our metrics file."""
    return rank_pid(METRICS, rank)


args = [MPIEXEC, "-np", str(NP), "--oversubscribe", "--bind-to", "none", RESYNC, "train",
        "--data", "synthetic", "--synthetic-train", "16000", "--synthetic-test", "1000",
        "--hidden", "128", "--batch-size", "32", "--steps", "2500", "--backup-workers", "1",
        "--ring-timeout-ms", "500", "--optimizer", OPTIMIZER,
        "--metrics", METRICS, "--log-level", os.environ.get("RESYNC_FAULT_LOG_LEVEL", "warn")]
job = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

wait_for(lambda: last_step() >= 100, 60, "step 100", job, fail)
pid = find_rank_pid(VICTIM)
if pid is None:
    fail(f"could not find the process of rank {VICTIM}", job)

# Fault injection: freeze the rank for a few seconds (the sleep is the fault's duration).
os.kill(pid, signal.SIGSTOP)
stopped_at = last_step()
time.sleep(STOP_S)
during = last_step()
os.kill(pid, signal.SIGCONT)
print(f"rank {VICTIM} (pid {pid}) stopped at step {stopped_at}; {STOP_S} s later step {during}")
if during < stopped_at + 20:
    job.kill()
    _, err = job.communicate()
    fail(f"the other ranks made only {during - stopped_at} steps while rank {VICTIM} was "
         f"stopped; the job's log:\n{err[-4000:]}")

try:
    out, err = job.communicate(timeout=120)
except subprocess.TimeoutExpired:
    fail("the job did not finish within 120 s after SIGCONT", job)
if job.returncode != 0:
    fail(f"job exited {job.returncode}:\n{err[-3000:]}")

rows = [json.loads(l) for l in open(METRICS)]
summary = rows[-1]
steps = [r for r in rows if r["event"] == "step"]
if summary.get("event") != "summary" or summary["ranks_agree"] is not True:
    fail(f"ranks disagree at the end: {summary}")
if summary["catch_ups"] < 1:
    fail(f"rank {VICTIM} never caught up: {summary}")
if not all(r["loss"] is not None and math.isfinite(r["loss"]) for r in steps):
    fail("a non-finite loss was recorded")
frozen_steps = [r for r in steps if stopped_at < r["step"] <= during]
if not any(VICTIM in r["dropped"] for r in frozen_steps):
    fail(f"rank {VICTIM} is not recorded as dropped while it was stopped")
print(f"PASS [sigstop]: {summary['steps']} steps, {summary['catch_ups']} catch-ups, "
      f"{summary['dropped_gradients']} dropped gradients, ranks agree")
