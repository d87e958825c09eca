"""Shared pieces of the end-to-end test scripts that run `resync` under mpirun: the environment,
a quick synthetic training configuration, failing with the scenario's name, running a command,
and checking a bad-input rejection (exit 2 and one `resync: error` line)."""
import os
import subprocess
import sys

# Open MPI as root; the tests also oversubscribe the 2-core machines they run on.
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
QUICK = ["--data", "synthetic", "--synthetic-train", "4000", "--synthetic-test", "1000",
         "--hidden", "64", "--batch-size", "32", "--log-level", "warn"]


class E2e:
    def __init__(self, resync, mpiexec, scenario):
        self.resync, self.mpiexec, self.scenario = resync, mpiexec, scenario

    def fail(self, msg, job=None):
        """Reports the failure under the scenario's name and exits 1 (killing `job` if given)."""
        if job is not None and job.poll() is None:
            job.kill()
        print(f"FAIL [{self.scenario}]: {msg}", file=sys.stderr)
        sys.exit(1)

    def mpirun(self, np, args):
        return [self.mpiexec, "-np", str(np), "--oversubscribe", "--bind-to", "none",
                self.resync] + args

    def run(self, np, args, timeout=120):
        try:
            return subprocess.run(self.mpirun(np, args), env=ENV, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"`resync {' '.join(args)}` did not finish within {timeout} s")

    def expect_bad_input(self, np, args, must_mention):
        """`resync args` exits 2 with exactly one error line that mentions `must_mention`."""
        p = self.run(np, args)
        if p.returncode != 2:
            self.fail(f"`resync {' '.join(args)}` exited {p.returncode}, expected 2\n"
                      f"{p.stderr[-2000:]}")
        ours = [line for line in p.stderr.splitlines() if line.startswith("resync: error")]
        if len(ours) != 1:
            self.fail(f"`resync {' '.join(args)}`: expected one 'resync: error' line, got {ours}\n"
                      f"{p.stderr[-2000:]}")
        if must_mention.lower() not in ours[0].lower():
            self.fail(f"`resync {' '.join(args)}`: error line does not mention "
                      f"'{must_mention}': {ours[0]}")
