#!/usr/bin/env python3
"""`resync launch` decisions, with stand-in jobs (shell commands) instead of training:
- bad input (exit 2) is never retried, and neither is a failure after progress;
- a job that keeps dying is given up after --max-restarts, with exit 1 and one line;
- a relaunch that dies before any progress is relaunched with one rank fewer, down to
  --min-ranks (never fewer without it);
- relaunches add --resume, and the checkpoint directory is passed to the job;
- a real bad-input job (`resync train --lr nan` under mpirun) exits 2 after one attempt.

Usage: launch_test.py RESYNC_BINARY MPIEXEC
"""
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from e2e_util import ENV  # noqa: E402

RESYNC, MPIEXEC = sys.argv[1], sys.argv[2]
TMP = tempfile.mkdtemp(prefix="resync_launch_")


def fail(msg):
    print(f"FAIL [launch]: {msg}", file=sys.stderr)
    sys.exit(1)


def launch(flags, job, timeout=120):
    p = subprocess.run([RESYNC, "launch", *flags, "--", *job], env=ENV, capture_output=True,
                       text=True, timeout=timeout)
    return p.returncode, p.stderr


def attempts_log(name):
    path = os.path.join(TMP, name)
    return path, (lambda: open(path).read().split("\n")[:-1] if os.path.exists(path) else [])


def sh_job(script, log, np=None):
    """A stand-in job: `sh -c SCRIPT` whose $0.. are [-np N] train ...; it logs its arguments."""
    head = ["-np", str(np)] if np is not None else []
    return ["/bin/sh", "-c", f'echo "$*" >> {log}; {script}', "job", *head, "train"]


def error_lines(err):
    return [l for l in err.splitlines() if l.startswith("resync launch: error")]


# 1. Bad input: one attempt, exit 2, one error line.
log, lines = attempts_log("bad_input")
rc, err = launch([], sh_job("exit 2", log))
if rc != 2 or len(lines()) != 1 or len(error_lines(err)) != 1:
    fail(f"bad input: exit {rc}, {len(lines())} attempts, stderr:\n{err}")

# 2. A failure that is not a death (exit 1, no rank count to shrink): never retried.
log, lines = attempts_log("failure")
rc, err = launch([], sh_job("exit 1", log))
if rc != 1 or len(lines()) != 1 or len(error_lines(err)) != 1 or "not a death" not in err:
    fail(f"failure: exit {rc}, {len(lines())} attempts, stderr:\n{err}")

# 3. Dies every time: 1 + 2 attempts, then give up with exit 1 and one line; relaunches resume.
log, lines = attempts_log("dies")
ckpt = os.path.join(TMP, "ckpt_dies")
rc, err = launch(["--max-restarts", "2", "--checkpoint-dir", ckpt], sh_job("exit 75", log))
got = lines()
if rc != 1 or len(got) != 3 or len(error_lines(err)) != 1 or "giving up" not in err:
    fail(f"max restarts: exit {rc}, attempts {got}, stderr:\n{err}")
if "--resume" in got[0] or not all("--resume" in a for a in got[1:]):
    fail(f"--resume must be added to relaunches only: {got}")
if not all(f"--checkpoint-dir {ckpt}" in a for a in got):
    fail(f"the checkpoint directory is not passed to the job: {got}")

# 4. Relaunches that die before any progress: one rank fewer each time down to --min-ranks (the
# job succeeds with 2 ranks). Without --min-ranks the rank count never changes.
log, lines = attempts_log("shrink")
rc, err = launch(["--min-ranks", "2", "--max-restarts", "5",
                  "--checkpoint-dir", os.path.join(TMP, "ckpt_shrink")],
                 sh_job('[ "$2" = 2 ] || exit 75', log, np=4))
ranks = [a.split()[1] for a in lines()]
if rc != 0 or ranks != ["4", "4", "3", "2"]:
    fail(f"shrink: exit {rc}, rank counts {ranks}, stderr:\n{err}")

log, lines = attempts_log("no_shrink")
rc, err = launch(["--max-restarts", "2", "--checkpoint-dir", os.path.join(TMP, "ckpt_ns")],
                 sh_job("exit 75", log, np=4))
ranks = [a.split()[1] for a in lines()]
if rc != 1 or ranks != ["4", "4", "4"]:
    fail(f"no --min-ranks: exit {rc}, rank counts {ranks}, stderr:\n{err}")

# 5. A killed job (signal) counts as a death and is relaunched.
log, lines = attempts_log("killed")
rc, err = launch(["--checkpoint-dir", os.path.join(TMP, "ckpt_killed")],
                 sh_job('case "$*" in *--resume*) exit 0;; *) kill -9 $$;; esac', log))
if rc != 0 or len(lines()) != 2:
    fail(f"killed: exit {rc}, {len(lines())} attempts, stderr:\n{err}")

# 6. Flags of the launcher itself: bad values exit 2 with one line.
rc, err = launch(["--max-restarts", "-1"], sh_job("exit 0", os.path.join(TMP, "x")))
if rc != 2 or len(error_lines(err)) != 1:
    fail(f"--max-restarts -1: exit {rc}, stderr:\n{err}")
rc, err = launch([], ["/bin/true"])
if rc != 2 or "resync train" not in err:
    fail(f"a command without train: exit {rc}, stderr:\n{err}")

# 7. The real thing with bad input: one attempt, exit 2.
rc, err = launch(["--checkpoint-dir", os.path.join(TMP, "ckpt_real")],
                 [MPIEXEC, "-np", "2", "--oversubscribe", RESYNC, "train", "--lr", "nan"])
if rc != 2 or err.count("resync: error") != 1 or "relaunching" in err:
    fail(f"real bad input: exit {rc}, stderr:\n{err}")
print("PASS [launch]: bad input and failures not retried, give-up after --max-restarts, "
      "shrink to --min-ranks, --resume on relaunches")
