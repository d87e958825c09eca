#!/usr/bin/env python3
"""Fault test: freeze one async worker with SIGSTOP mid-training.

With 1 parameter server and 3 workers, the other workers must keep pushing while the victim
is stopped (the server serves them meanwhile); after SIGCONT the victim finishes its steps and
the run ends normally, every rank holding the servers' final parameters. Bounded in time:
every wait has a deadline, and the job is killed if it overstays.

Usage: fault_sigstop_async.py RESYNC_BINARY MPIEXEC
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mpi_procs import rank_pid, wait_for  # noqa: E402

RESYNC, MPIEXEC = sys.argv[1], sys.argv[2]
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
TMP = tempfile.mkdtemp(prefix="resync_fault_async_")
METRICS = os.path.join(TMP, "sigstop_async.jsonl")
NP, VICTIM, STOP_S, STEPS = 4, 2, 3.0, 3000
OTHERS = [w for w in range(1, NP) if w != VICTIM]


def fail(msg, job=None):
    if job is not None and job.poll() is None:
        job.kill()
    print(f"FAIL [sigstop_async]: {msg}", file=sys.stderr)
    sys.exit(1)


def pushes():
    """Step records per worker so far (server 0 writes one per push)."""
    counts = {w: 0 for w in range(1, NP)}
    try:
        with open(METRICS) as f:
            for line in f:
                if '"event":"step"' in line and line.endswith("\n"):
                    counts[json.loads(line)["worker"]] += 1
    except (OSError, ValueError):
        pass
    return counts


def find_rank_pid(rank):
    """The pid of the resync process with this MPI rank writing our metrics file."""
    return rank_pid(METRICS, rank)


args = [MPIEXEC, "-np", str(NP), "--oversubscribe", "--bind-to", "none", RESYNC, "train",
        "--mode", "async", "--ps", "1", "--data", "synthetic", "--synthetic-train", "16000",
        "--synthetic-test", "1000", "--hidden", "128", "--batch-size", "32", "--momentum", "0",
        "--steps", str(STEPS), "--metrics", METRICS,
        "--log-level", os.environ.get("RESYNC_FAULT_LOG_LEVEL", "warn")]
job = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

wait_for(lambda: pushes()[VICTIM] >= 100, 60, f"100 steps of worker {VICTIM}", job,
         fail)
pid = find_rank_pid(VICTIM)
if pid is None:
    fail(f"could not find the process of rank {VICTIM}", job)

# Fault injection: freeze the worker for a few seconds (the sleep is the fault's duration).
os.kill(pid, signal.SIGSTOP)
before = pushes()
time.sleep(STOP_S)
during = pushes()
os.kill(pid, signal.SIGCONT)
print(f"worker {VICTIM} (pid {pid}) stopped for {STOP_S} s; pushes before {before}, "
      f"after {during}")
victim_moved = during[VICTIM] - before[VICTIM]
if victim_moved > 1:
    fail(f"worker {VICTIM} pushed {victim_moved} times while stopped: the test stopped the "
         "wrong process", job)
for w in OTHERS:
    # Unless it finished meanwhile, each other worker must have kept pushing.
    if during[w] - before[w] < 50 and during[w] < STEPS:
        job.kill()
        _, err = job.communicate()
        fail(f"worker {w} pushed only {during[w] - before[w]} times while worker {VICTIM} was "
             f"stopped for {STOP_S} s; the job's log:\n{err[-4000:]}")

try:
    out, err = job.communicate(timeout=120)
except subprocess.TimeoutExpired:
    fail("the job did not finish within 120 s after SIGCONT", job)
if job.returncode != 0:
    fail(f"job exited {job.returncode}:\n{err[-3000:]}")

rows = [json.loads(l) for l in open(METRICS)]
summary = rows[-1]
if summary.get("event") != "summary" or summary["ranks_agree"] is not True:
    fail(f"ranks do not hold the same final parameters: {summary}")
if summary["steps"] != (NP - 1) * STEPS:
    fail(f"summary counts {summary['steps']} worker steps, expected {(NP - 1) * STEPS}")
final = pushes()
if final[VICTIM] != STEPS:
    fail(f"worker {VICTIM} made {final[VICTIM]} of {STEPS} pushes after SIGCONT")
print(f"PASS [sigstop_async]: others pushed {[during[w] - before[w] for w in OTHERS]} times "
      f"during the stop; {summary['steps']} worker steps, accuracy {summary['test_accuracy']}")
