"""Helpers for the end-to-end tests that signal one rank of a running `mpirun` job."""
import os
import time


def rank_pid(marker, rank):
    """The pid of the process with MPI rank `rank` (Open MPI's OMPI_COMM_WORLD_RANK) whose
    command line holds `marker` (e.g. the run's unique metrics path), or None."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmd and f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            return int(pid)
    return None


def wait_for(predicate, timeout_s, what, job, fail):
    """Polls `predicate` (e.g. a metrics file written by `job`) until it holds; calls
    fail(message, job) when the job ends first or after timeout_s."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        if job.poll() is not None:
            fail(f"job ended (exit {job.returncode}) while waiting for {what}:\n"
                 f"{job.stderr.read()[-3000:]}", job)
        time.sleep(0.05)  # polling a file written by the job under test
    fail(f"timed out after {timeout_s} s waiting for {what}", job)
