#!/usr/bin/env python3
"""End-to-end tests of checkpoints, --resume and graceful preemption of `resync train`.

Usage: e2e_ckpt.py RESYNC_BINARY MPIEXEC SCENARIO
Each scenario asserts and exits non-zero with a message naming what differed. Every wait has a
deadline; a job that overstays is killed.
"""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from e2e_util import ENV, QUICK, E2e  # noqa: E402
from mpi_procs import rank_pid, wait_for  # noqa: E402

RESYNC, MPIEXEC, SCENARIO = sys.argv[1], sys.argv[2], sys.argv[3]
TMP = tempfile.mkdtemp(prefix="resync_ops_")
E2E = E2e(RESYNC, MPIEXEC, SCENARIO)
fail, mpirun, run, expect_bad_input = E2E.fail, E2E.mpirun, E2E.run, E2E.expect_bad_input
QUICK = QUICK[:-2]  # without --log-level: train() passes its own
STEPS_PER_EPOCH = 4000 // 2 // 32  # at np 2
CKPT_NAME = re.compile(r"^ckpt-(\d+)\.rsck$")


def train(np, args, name, log_level="info"):
    """Runs to completion (exit 0 expected); returns (metrics rows, stderr)."""
    path = os.path.join(TMP, name + ".jsonl")
    full = ["train", "--metrics", path, "--log-level", log_level] + args
    p = run(np, full)
    if p.returncode != 0:
        fail(f"`resync {' '.join(full)}` at np {np} exited {p.returncode}\n{p.stderr[-3000:]}")
    return [json.loads(line) for line in open(path)], p.stderr


def summary(rows):
    last = rows[-1]
    if last.get("event") != "summary":
        fail(f"last metrics line is not the summary: {last}")
    if last["ranks_agree"] is not True:
        fail(f"ranks disagree: {last}")
    return last


def checkpoints(directory):
    """{step: path} of the checkpoint files in `directory`."""
    out = {}
    for name in os.listdir(directory):
        m = CKPT_NAME.match(name)
        if m:
            out[int(m.group(1))] = os.path.join(directory, name)
    return out


def ckpt_path(directory, step):
    return os.path.join(directory, f"ckpt-{step:09d}.rsck")


def flip_byte(path, offset_from_end):
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        b = f.read(1)
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))


def expect_resumed(stderr, directory, step):
    want = f"resumed from {ckpt_path(directory, step)} at step {step}"
    if want not in stderr:
        fail(f"log does not say '{want}':\n{stderr[-3000:]}")


def scenario_resume_checksum():
    # 2 epochs straight == 1 epoch + resume + 1 epoch, bit for bit (plain sync, np 2).
    straight = summary(train(2, QUICK + ["--epochs", "2"], "straight")[0])
    d = os.path.join(TMP, "ck")
    first = summary(train(2, QUICK + ["--epochs", "1", "--checkpoint-dir", d,
                                      "--checkpoint-every", "10", "--checkpoint-keep", "2"],
                          "first")[0])
    if first["steps"] != STEPS_PER_EPOCH:
        fail(f"first half ran {first['steps']} steps, expected {STEPS_PER_EPOCH}")
    # Every 10 steps and at the end, keeping the newest 2.
    last_periodic = STEPS_PER_EPOCH // 10 * 10
    want = sorted({last_periodic, STEPS_PER_EPOCH}) if last_periodic != STEPS_PER_EPOCH else \
        [STEPS_PER_EPOCH - 10, STEPS_PER_EPOCH]
    if sorted(checkpoints(d)) != want:
        fail(f"checkpoints {sorted(checkpoints(d))}, expected {want} (--checkpoint-keep 2)")
    rows, err = train(2, QUICK + ["--epochs", "2", "--checkpoint-dir", d, "--resume"], "second")
    second = summary(rows)
    expect_resumed(err, d, STEPS_PER_EPOCH)
    if second["resumed_from_step"] != STEPS_PER_EPOCH:
        fail(f"summary resumed_from_step {second['resumed_from_step']}, expected {STEPS_PER_EPOCH}")
    if second["steps"] != 2 * STEPS_PER_EPOCH:
        fail(f"resumed run ended at step {second['steps']}, expected {2 * STEPS_PER_EPOCH}")
    steps = [r["step"] for r in rows if r["event"] == "step"]
    if steps[0] != STEPS_PER_EPOCH:
        fail(f"resumed run's first step record is step {steps[0]}, expected {STEPS_PER_EPOCH}")
    evals = [r["epoch"] for r in rows if r["event"] == "eval"]
    if evals != [1]:
        fail(f"resumed run evaluated epochs {evals}, expected [1]")
    if second["param_checksum"] != straight["param_checksum"]:
        fail(f"1 epoch + resume + 1 epoch gave checksum {second['param_checksum']}, 2 epochs "
             f"straight {straight['param_checksum']}")
    if second["test_accuracy"] != straight["test_accuracy"]:
        fail(f"test accuracy {second['test_accuracy']} != {straight['test_accuracy']}")
    if straight["resumed_from_step"] is not None or straight["stopped_by"] is not None:
        fail(f"a plain run reports resume/stop fields: {straight}")


def scenario_resume_empty_dir():
    d = os.path.join(TMP, "empty")
    rows, err = train(2, QUICK + ["--steps", "20", "--checkpoint-dir", d, "--resume"], "fresh")
    s = summary(rows)
    if "no checkpoint in" not in err or "starting from step 0" not in err:
        fail(f"--resume with an empty directory did not say it starts fresh:\n{err[-3000:]}")
    if s["steps"] != 20 or s["resumed_from_step"] is not None:
        fail(f"unexpected summary for a fresh start: {s}")
    plain = summary(train(2, QUICK + ["--steps", "20"], "plain20", "warn")[0])
    if s["param_checksum"] != plain["param_checksum"]:
        fail("a fresh start with --resume differs from a run without checkpoints")
    if sorted(checkpoints(d)) != [20]:
        fail(f"expected the final checkpoint at step 20, found {sorted(checkpoints(d))}")


def scenario_corrupt_newest_skipped():
    d = os.path.join(TMP, "ck")
    train(2, QUICK + ["--steps", "40", "--checkpoint-dir", d, "--checkpoint-every", "15",
                      "--checkpoint-keep", "5"], "first", "warn")
    if sorted(checkpoints(d)) != [15, 30, 40]:
        fail(f"checkpoints {sorted(checkpoints(d))}, expected [15, 30, 40]")
    flip_byte(ckpt_path(d, 40), 5)
    # A truncated one from a different run at a later step is skipped too.
    with open(ckpt_path(d, 30), "rb") as f:
        head = f.read(100)
    with open(ckpt_path(d, 45), "wb") as f:
        f.write(head)
    rows, err = train(2, QUICK + ["--steps", "60", "--checkpoint-dir", d, "--resume"],
                      "second")
    s = summary(rows)
    for step, why in ((40, "CRC mismatch"), (45, "truncated")):
        if not re.search(rf"\[warning\].*{re.escape(ckpt_path(d, step))}.*{why}.*skipped", err):
            fail(f"no warning that {ckpt_path(d, step)} ({why}) was skipped:\n{err[-3000:]}")
    expect_resumed(err, d, 30)
    straight = summary(train(2, QUICK + ["--steps", "60"], "straight", "warn")[0])
    if s["param_checksum"] != straight["param_checksum"]:
        fail("resuming from the older checkpoint did not reproduce the uninterrupted run")


def scenario_bad_input():
    not_a_dir = os.path.join(TMP, "file")
    open(not_a_dir, "w").close()
    expect_bad_input(2, ["train"] + QUICK + ["--steps", "5", "--checkpoint-dir", not_a_dir],
                     "--checkpoint-dir")
    expect_bad_input(2, ["train"] + QUICK + ["--steps", "5", "--checkpoint-dir",
                                            not_a_dir + "/sub", "--resume"], "--checkpoint-dir")
    d = os.path.join(TMP, "ck")
    train(2, QUICK + ["--steps", "5", "--checkpoint-dir", d], "small", "warn")
    other = [a if a != "64" else "48" for a in QUICK]  # --hidden 48: another model
    expect_bad_input(2, ["train"] + other + ["--steps", "10", "--checkpoint-dir", d,
                                            "--resume"], "mlp 784-64-10")
    expect_bad_input(3, ["train"] + other + ["--steps", "10", "--checkpoint-dir", d,
                                            "--resume"], "--resume")
    expect_bad_input(1, ["train"] + QUICK + ["--resume"], "--checkpoint-dir")


ADAMW = ["--optimizer", "adamw", "--lr", "0.003", "--grad-clip", "1", "--warmup-steps", "5"]


def scenario_adamw_resume():
    # AdamW's state (both moments) and its step (bias correction, schedule) survive a
    # checkpoint: 1 epoch + resume + 1 epoch == 2 epochs straight, bit for bit; with a cosine
    # schedule, resuming from a periodic checkpoint of the same run repeats it too.
    straight = summary(train(2, QUICK + ADAMW + ["--epochs", "2"], "aw_straight", "warn")[0])
    d = os.path.join(TMP, "aw_ck")
    train(2, QUICK + ADAMW + ["--epochs", "1", "--checkpoint-dir", d], "aw_first", "warn")
    rows, err = train(2, QUICK + ADAMW + ["--epochs", "2", "--checkpoint-dir", d, "--resume"],
                      "aw_second")
    expect_resumed(err, d, STEPS_PER_EPOCH)
    second = summary(rows)
    if second["param_checksum"] != straight["param_checksum"]:
        fail(f"AdamW: 1 epoch + resume + 1 epoch gave {second['param_checksum']}, 2 epochs "
             f"straight {straight['param_checksum']}")
    cosine = ADAMW + ["--lr-schedule", "cosine", "--min-lr", "0.0003", "--steps", "60"]
    d2 = os.path.join(TMP, "aw_cos")
    full = summary(train(2, QUICK + cosine + ["--checkpoint-dir", d2, "--checkpoint-every", "25",
                                              "--checkpoint-keep", "5"], "aw_cos_full",
                         "warn")[0])
    for step in (50, 60):
        os.remove(ckpt_path(d2, step))
    rows, err = train(2, QUICK + cosine + ["--checkpoint-dir", d2, "--resume"], "aw_cos_resumed")
    expect_resumed(err, d2, 25)
    if summary(rows)["param_checksum"] != full["param_checksum"]:
        fail("AdamW with a cosine schedule: resuming at step 25 did not repeat the run")


def scenario_adamw_bad_resume():
    # A checkpoint resumes only with the optimizer that wrote it: one line, exit 2.
    d = os.path.join(TMP, "sgd_ck")
    train(2, QUICK + ["--steps", "5", "--checkpoint-dir", d], "sgd_small", "warn")
    expect_bad_input(2, ["train"] + QUICK + ADAMW + ["--steps", "10", "--checkpoint-dir", d,
                                                    "--resume"], "--optimizer sgd")
    d = os.path.join(TMP, "adamw_ck")
    train(2, QUICK + ADAMW + ["--steps", "5", "--checkpoint-dir", d], "adamw_small", "warn")
    expect_bad_input(2, ["train"] + QUICK + ["--steps", "10", "--checkpoint-dir", d,
                                            "--resume"], "--optimizer adamw")


def find_rank_pid(marker, rank, job, timeout_s=30):
    """The pid of the resync process with MPI rank `rank` whose command line holds `marker`."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        pid = rank_pid(marker, rank)
        if pid is not None:
            return pid
        if job.poll() is not None:
            fail(f"job ended (exit {job.returncode}) before rank {rank} was found")
        time.sleep(0.05)  # polling /proc for the job under test
    fail(f"could not find the process of rank {rank}", job)


def last_step(metrics):
    try:
        with open(metrics) as f:
            steps = [json.loads(l)["step"] for l in f if '"event":"step"' in l]
        return steps[-1] if steps else -1
    except (OSError, ValueError):
        return -1


TOTAL = 1000


def start_slow_job(name, d, extra):
    """A long run with a checkpoint dir; rank 0 sleeps 5 ms per step (injected, so the plain
    sync result is unchanged) so that signals land mid-run."""
    metrics = os.path.join(TMP, name + ".jsonl")
    args = ["train"] + QUICK + ["--steps", str(TOTAL), "--checkpoint-dir", d,
                                "--inject-delay", "fixed:0:5", "--metrics", metrics,
                                "--log-level", "info"] + extra
    job = subprocess.Popen(mpirun(2, args), env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    return job, metrics


def preempt(signo, signame):
    d = os.path.join(TMP, "ck")
    job, metrics = start_slow_job("preempted", d, [])
    wait_for(lambda: last_step(metrics) >= 20, 60, "step 20", job, fail)
    victim = find_rank_pid(metrics, 1, job)
    os.kill(victim, signo)  # to rank 1 only: rank 0 must learn it through the coordinator
    sent_at = time.time()
    try:
        _, err = job.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        fail(f"the job did not stop within 30 s of {signame}", job)
    if job.returncode != 0:
        fail(f"a preempted job exited {job.returncode}, expected 0:\n{err[-3000:]}")
    m = re.search(rf"stopped by {signame} at step (\d+) \(signalled on rank 1\); checkpoint "
                  rf"(\S+) written; resume with --resume", err)
    if not m:
        fail(f"no 'stopped by {signame} at step N ...' line:\n{err[-3000:]}")
    stop_step, written = int(m.group(1)), m.group(2)
    if "received " + signame not in err:
        fail(f"rank 1 did not log that it received {signame}:\n{err[-3000:]}")
    if not 20 < stop_step < TOTAL:
        fail(f"stopped at step {stop_step}, not mid-run")
    if written != ckpt_path(d, stop_step) or not os.path.exists(written):
        fail(f"the stop checkpoint {written} is not {ckpt_path(d, stop_step)} or is missing")
    rows = [json.loads(l) for l in open(metrics)]
    s = summary(rows)
    if s["stopped_by"] != signame or s["steps"] != stop_step:
        fail(f"summary of the preempted run: {s}, expected stopped_by {signame} at {stop_step}")
    print(f"stopped at step {stop_step}, {time.time() - sent_at:.1f} s after {signame}")

    rows, err = train(2, QUICK + ["--steps", str(TOTAL), "--checkpoint-dir", d, "--resume"],
                      "resumed")
    expect_resumed(err, d, stop_step)
    resumed = summary(rows)
    straight = summary(train(2, QUICK + ["--steps", str(TOTAL)], "straight", "warn")[0])
    if resumed["param_checksum"] != straight["param_checksum"]:
        fail(f"preempted + resumed run: checksum {resumed['param_checksum']}, uninterrupted "
             f"{straight['param_checksum']}")


def scenario_preempt_sigterm():
    preempt(signal.SIGTERM, "SIGTERM")


def scenario_preempt_sigusr1():
    preempt(signal.SIGUSR1, "SIGUSR1")


def sigkill(rank, every):
    d = os.path.join(TMP, "ck")
    job, metrics = start_slow_job(f"killed{rank}", d, ["--checkpoint-every", str(every),
                                                        "--checkpoint-keep", "3"])
    wait_for(lambda: last_step(metrics) >= 45 and len(checkpoints(d)) >= 2, 60,
             "step 45 and two checkpoints", job, fail)
    victim = find_rank_pid(metrics, rank, job)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    try:
        _, err = job.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        fail(f"the job still ran 30 s after rank {rank} was killed", job)
    if job.returncode == 0:
        fail(f"the job exited 0 although rank {rank} was killed:\n{err[-3000:]}")
    print(f"job ended with exit {job.returncode} {time.time() - killed_at:.1f} s after SIGKILL")
    found = checkpoints(d)
    if not found:
        fail("no checkpoint survived")
    newest = max(found)
    rows, err = train(2, QUICK + ["--steps", str(newest + 10), "--checkpoint-dir", d,
                                  "--resume"], "after_kill")
    expect_resumed(err, d, newest)
    if summary(rows)["steps"] != newest + 10:
        fail(f"the run resumed from step {newest} did not reach step {newest + 10}")


def scenario_sigkill_rank1():
    sigkill(1, 10)


def scenario_sigkill_rank0():
    # Rank 0 writes a checkpoint after every step, so the kill may land inside a write: the
    # newest complete file must still load (a leftover temp file is ignored).
    sigkill(0, 1)


globals()["scenario_" + SCENARIO]()
print(f"PASS [{SCENARIO}]")
