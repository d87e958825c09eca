#!/usr/bin/env python3
"""Fault tests: ranks that die (SIGKILL) or rank 0 frozen (SIGSTOP) under `resync launch`.

Every scenario runs a job under `resync launch -- mpirun ... resync train`, injects the fault
once training is under way, and checks that the launcher relaunched it with --resume and that it
ended with agreeing replicas. Plain sync scenarios also compare the final param_checksum with an
uninterrupted run of the same seed, and count the steps done twice (at most one per death).
Bounded in time: every wait has a deadline.

Usage: fault_death.py RESYNC_BINARY MPIEXEC SCENARIO
  worker     rank 2 of 4 dies (plain sync)
  rank0      rank 0 dies: the coordinator with it (plain sync)
  two        ranks 1 and 3 die at once (plain sync)
  rank0_stop rank 0 frozen past --coordinator-timeout-s (plain sync)
  ckpt_write rank 0 dies while it writes a checkpoint every step (the previous stays valid)
  catch_up   a rank dies while catch-ups run every step (one backup worker, one slow rank)
  async_worker  async mode, 2 servers: worker rank 3 dies; each worker resumes at its own step,
                redoing at most one
  async_server  async mode, 2 servers: server rank 1 dies (its shard's parameters resume from
                the workers' copies, at most 1 step redone per worker)
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from e2e_util import ENV  # noqa: E402
from mpi_procs import rank_pid, wait_for  # noqa: E402

RESYNC, MPIEXEC, SCENARIO = sys.argv[1], sys.argv[2], sys.argv[3]
TMP = tempfile.mkdtemp(prefix=f"resync_death_{SCENARIO}_")
NP = 4
STEPS = 600
TRAIN = ["--data", "synthetic", "--synthetic-train", "16000", "--synthetic-test", "1000",
         "--hidden", "128", "--batch-size", "32", "--steps", str(STEPS), "--progress", "off",
         "--log-level", "warn"]


def fail(msg, job=None):
    if job is not None and job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
    print(f"FAIL [{SCENARIO}]: {msg}", file=sys.stderr)
    sys.exit(1)


def mpirun(args):
    return [MPIEXEC, "-np", str(NP), "--oversubscribe", "--bind-to", "none", RESYNC, "train"] + args


def records(path, event):
    try:
        with open(path) as f:
            return [r for r in (json.loads(l) for l in f if l.strip()) if r["event"] == event]
    except (OSError, ValueError):
        return []


def last_step(path):
    steps = records(path, "step")
    return steps[-1]["step"] if steps else -1


def straight_checksum(extra):
    """param_checksum of the same run without faults."""
    metrics = os.path.join(TMP, "straight.jsonl")
    ckpt = os.path.join(TMP, "straight_ckpt")
    p = subprocess.run(mpirun(TRAIN + extra + ["--metrics", metrics, "--checkpoint-dir", ckpt]),
                       env=ENV,
                       capture_output=True, text=True, timeout=240)
    if p.returncode != 0:
        fail(f"the uninterrupted run exited {p.returncode}:\n{p.stderr[-3000:]}")
    return records(metrics, "summary")[-1]["param_checksum"]


def faulty_run(extra, inject, launch_flags=()):
    """Runs the job under resync launch; `inject(metrics, job)` does the fault once. Returns
    (the launcher's stderr, the metrics file)."""
    metrics = os.path.join(TMP, "faulty.jsonl")
    ckpt = os.path.join(TMP, "ckpt")
    cmd = [RESYNC, "launch", *launch_flags, "--"] + mpirun(
        TRAIN + extra + ["--metrics", metrics, "--checkpoint-dir", ckpt])
    job = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    wait_for(lambda: last_step(metrics) >= 150, 120, "step 150", job, fail)
    inject(metrics, job)
    try:
        _, err = job.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        fail("the launched job did not finish within 240 s after the fault", job)
    if job.returncode != 0:
        fail(f"resync launch exited {job.returncode}:\n{err[-4000:]}")
    if "relaunching with --resume" not in err:
        fail(f"the launcher never relaunched the job:\n{err[-3000:]}")
    return err, metrics


def pid_of(metrics, rank, job):
    pid = rank_pid(metrics, rank)
    if pid is None:
        fail(f"could not find the process of rank {rank}", job)
    return pid


def kill_ranks(ranks):
    def inject(metrics, job):
        pids = [pid_of(metrics, r, job) for r in ranks]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        print(f"killed ranks {ranks} at step {last_step(metrics)}")
    return inject


def check_end(metrics, deaths, expect_checksum=None, writer_died=False):
    """`writer_died`: rank 0, which writes the metrics, died: the steps the survivors closed
    after its last record are not recorded (the checksum still covers them)."""
    summary = records(metrics, "summary")[-1]
    if summary["ranks_agree"] is not True:
        fail(f"replicas disagree at the end: {summary}")
    if summary["steps"] != STEPS:
        fail(f"the job ended after {summary['steps']} steps, not {STEPS}")
    if summary.get("resumed_from_step") is None:
        fail(f"the final run did not resume from a checkpoint: {summary}")
    seen = {}
    for r in records(metrics, "step"):
        seen[r["step"]] = seen.get(r["step"], 0) + 1
    redone = sum(n - 1 for n in seen.values())
    missing = [s for s in range(STEPS) if s not in seen]
    if missing and expect_checksum is not None and not (writer_died and len(missing) <= deaths):
        fail(f"steps never recorded: {missing[:10]}")
    if expect_checksum is not None and redone > deaths:
        fail(f"{redone} steps were done twice for {deaths} death(s)")
    if expect_checksum is not None and summary["param_checksum"] != expect_checksum:
        fail(f"param_checksum {summary['param_checksum']} after the relaunch, "
             f"{expect_checksum} uninterrupted")
    print(f"PASS [{SCENARIO}]: resumed from step {summary['resumed_from_step']}, {redone} step(s) "
          f"redone, checksum {summary['param_checksum']}, replicas agree")


if SCENARIO in ("worker", "rank0", "two"):
    victims = {"worker": [2], "rank0": [0], "two": [1, 3]}[SCENARIO]
    want = straight_checksum([])
    _, metrics = faulty_run([], kill_ranks(victims))
    check_end(metrics, 1, want, writer_died=0 in victims)

elif SCENARIO == "rank0_stop":
    want = straight_checksum([])

    def freeze_rank0(metrics, job):
        pid = pid_of(metrics, 0, job)
        os.kill(pid, signal.SIGSTOP)  # never continued: mpirun's SIGKILL ends it
        t0 = time.time()
        print(f"froze rank 0 at step {last_step(metrics)}")
        # The others notice within --coordinator-timeout-s; the relaunch then writes new steps.
        wait_for(lambda: time.time() - t0 > 1 and last_step(metrics) > 0 and
                 os.path.exists(os.path.join(TMP, "ckpt")) and
                 any(n.startswith("ckpt-") for n in os.listdir(os.path.join(TMP, "ckpt"))),
                 60, "a checkpoint saved by the survivors", job, fail)

    err, metrics = faulty_run(["--coordinator-timeout-s", "2"], freeze_rank0)
    if "silent for" not in err:
        fail(f"no rank reported the silent coordinator:\n{err[-3000:]}")
    check_end(metrics, 1, want, writer_died=True)

elif SCENARIO == "ckpt_write":
    # Rank 0 writes a checkpoint after every step; killed, it dies inside a write most often. The
    # relaunch must find a valid newest checkpoint (a half-written one is a temp file, never
    # loaded) and end like the uninterrupted run.
    extra = ["--hidden", "256,256", "--checkpoint-every", "1", "--checkpoint-keep", "2"]
    want = straight_checksum(extra)
    _, metrics = faulty_run(extra, kill_ranks([0]))
    check_end(metrics, 1, want, writer_died=True)

elif SCENARIO == "catch_up":
    # Rank 3 is late every step and caught up from a peer; rank 1 (a donor) dies meanwhile.
    extra = ["--backup-workers", "1", "--inject-delay", "fixed:3:15"]
    _, metrics = faulty_run(extra, kill_ranks([1]))
    check_end(metrics, 1)

elif SCENARIO in ("async_worker", "async_server"):
    victim = 3 if SCENARIO == "async_worker" else 1
    extra = ["--mode", "async", "--ps", "2", "--checkpoint-every", "20", "--lr", "0.005",
             "--max-staleness", "8"]  # a CPU-starved worker's very stale pushes are dropped
    err, metrics = faulty_run(extra, kill_ranks([victim]))
    summary = records(metrics, "summary")[-1]
    if summary["ranks_agree"] is not True:
        fail(f"replicas disagree at the end: {summary}")
    # The runs in the metrics file: rank 0's step records of one run have a rising elapsed_s,
    # which starts again after the relaunch.
    runs, prev = [], None
    for r in records(metrics, "step"):
        if prev is None or r["elapsed_s"] < prev:
            runs.append([])
        runs[-1].append(r)
        prev = r["elapsed_s"]
    if len(runs) < 2:
        fail(f"no relaunched run in the step records ({len(runs)} run(s))\n{err[-3000:]}")
    # Each worker continues at its own step: the steps it pushed before the death and pushes
    # again after it (its last record before minus its first after, plus one).
    last = {}
    for r in runs[0]:
        last[r["worker"]] = r["step"]
    first = {}
    for r in runs[1]:
        first.setdefault(r["worker"], r["step"])
    redone = {w: last[w] - first[w] + 1 for w in sorted(last) if w in first}
    if len(redone) != NP - 2:
        fail(f"workers with records before and after the relaunch: {sorted(redone)}; before "
             f"{last}, after {first}")
    # A dead worker: every server saved its shard and each worker's steps with it. A dead
    # server: its shard's parameters come from the freshest surviving worker's copy, each
    # worker's steps from its own copy. Either way at most the step in flight is done again.
    if max(redone.values()) > 1:
        fail(f"steps redone per worker {redone} (at most 1 each): last before the death {last}, "
             f"first after the relaunch {first}")
    if not any(first.values()):
        fail(f"the relaunched workers did not resume (first steps {first})\n{err[-3000:]}")
    # Asynchronous SGD's progress varies from run to run (staleness); what must hold is that the
    # relaunch continued from trained parameters, not from scratch: a loss far below chance
    # (ln 10 = 2.30) soon after it resumed.
    losses = [r["loss"] for r in records(metrics, "step")]
    if any(l is None for l in losses):
        fail("a non-finite loss was recorded")
    after = [r["loss"] for r in runs[1]][:40]
    if not after or min(after) > 1.5:
        fail(f"the relaunched workers start from untrained parameters: losses {after[:10]}")
    print(f"PASS [{SCENARIO}]: workers resumed at their own steps {first} (last before "
          f"{last}: redone {redone}), first losses after it down to {min(after):.3f}, replicas "
          f"agree")

else:
    fail(f"unknown scenario {SCENARIO}")
