"""Helpers for the end-to-end tests that signal one rank of a running `mpirun` job."""
import os


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
