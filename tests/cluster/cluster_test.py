#!/usr/bin/env python3
"""Cross-node tests on a virtual cluster (scripts/vcluster): one network and UTS namespace per
node, so Open MPI sees separate nodes (TCP between them, shared memory inside each).

Usage: cluster_test.py RESYNC_BINARY VCLUSTER_SCRIPT SCENARIO
The cluster is named by $VCLUSTER_NAME (CMake derives it from the build directory, so two build
trees never share one); the test brings it up, and takes it down on every way out it can catch.
Where no cluster can be built here (not root, no iproute2/nsenter, no network namespaces), the
test prints why and exits 77, which ctest reports as skipped.
"""
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from e2e_util import ENV, QUICK  # noqa: E402
from mpi_procs import rank_pid, wait_for  # noqa: E402

RESYNC, VCLUSTER, SCENARIO = sys.argv[1], sys.argv[2], sys.argv[3]
NAME = os.environ.get("VCLUSTER_NAME", "rtest")
TMP = tempfile.mkdtemp(prefix="resync_cluster_")
SKIP = 77
EXIT_UNSUPPORTED = 3  # scripts/vcluster: a cluster cannot be built on this machine

# Whether a 2 x 2 cluster and 4 ranks on one node sum the gradients in the same order, so that
# both end with the same bits. They do not: across nodes the hierarchical all-reduce sums each
# node first and then the node sums, (g0 + g1) + (g2 + g3), while one node's shared-memory path
# sums each chunk with its owner's gradient first, ((g_c + ...) + ...) + .... Keeping one order
# would mean sending every rank's raw gradient across the network, which is what summing inside
# the node first saves (collectives/allreduce/hier_allreduce.h). Float addition is not
# associative, so the parameters differ in the last bits (the accuracy does not). With two
# ranks both orders are one commutative addition, so 2 x 1 and 1 x 2 are bit-identical, and the
# test asserts that; every topology is deterministic run to run, and replicas always agree.
TOPOLOGIES_SUM_IN_SAME_ORDER = False


def fail(msg, job=None):
    if job is not None and job.poll() is None:
        job.kill()
        job.wait()
    print(f"FAIL [cluster.{SCENARIO}]: {msg}", file=sys.stderr)
    sys.exit(1)


def vcluster(*args, check=True, timeout=60):
    p = subprocess.run([VCLUSTER, "--name", NAME, *args], capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        fail(f"`vcluster {' '.join(args)}` exited {p.returncode}:\n{p.stdout}{p.stderr}")
    return p


def skip_unless_supported():
    p = vcluster("check", check=False)
    if p.returncode == EXIT_UNSUPPORTED:
        print(f"SKIP [cluster.{SCENARIO}]: no virtual cluster on this machine: "
              f"{p.stderr.strip()}")
        sys.exit(SKIP)
    if p.returncode != 0:
        fail(f"`vcluster check` exited {p.returncode}:\n{p.stdout}{p.stderr}")


def up(nodes, slots):
    vcluster("up", str(nodes), "--slots", str(slots))


def mpirun(hosts, args):
    """The command line of `resync args` on the cluster, ranks placed by `hosts` (n1:2,n2:2)."""
    return [VCLUSTER, "--name", NAME, "run", "--", "--host", hosts, "--oversubscribe",
            "--bind-to", "none", RESYNC] + args


def train(hosts, args, tag, timeout=90):
    """Runs `resync train` to the end; returns (metrics rows, stderr)."""
    path = os.path.join(TMP, tag + ".jsonl")
    cmd = mpirun(hosts, ["train", "--metrics", path, "--progress", "off"] + args)
    try:
        p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        fail(f"{tag}: `resync train` on {hosts} did not finish within {timeout} s")
    if p.returncode != 0:
        fail(f"{tag}: `resync train` on {hosts} exited {p.returncode}:\n{p.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(path)]
    if not rows or rows[-1].get("event") != "summary":
        fail(f"{tag}: the last metrics line is not the summary: {rows[-1:]}")
    return rows, p.stderr


def summary(rows):
    return rows[-1]


def last_eval(rows):
    evals = [r for r in rows if r["event"] == "eval"]
    return evals[-1] if evals else None


def node_sizes(log):
    """Rank 0's 'N ranks on this node' from the all-reducer's start-up line."""
    return [int(m) for m in re.findall(r"shared memory (\d+) ranks on this node", log)]


def expect_node_split(log, hosts, tag):
    """Rank 0 and its node: the shared-memory split (MPI_Comm_split_type SHARED) found exactly
    the ranks that `hosts` placed on n1, and the coordinator saw rank 0's hostname as n1."""
    n1 = int(hosts.split(",")[0].split(":")[1])
    sizes = node_sizes(log)
    if n1 == 1:
        if "shared memory off" not in log and sizes != [1]:
            fail(f"{tag}: rank 0 is alone on n1, but the log says shared memory {sizes}:\n"
                 f"{log[-2000:]}")
    elif sizes != [n1]:
        fail(f"{tag}: rank 0's node should hold {n1} ranks, the log says {sizes}:\n{log[-2000:]}")


# Quick plain-sync training (the e2e tests' QUICK), log level info for the start-up lines.
PLAIN = QUICK[:-2] + ["--log-level", "info", "--seed", "7", "--epochs", "1"]


def scenario_hostnames():
    """Ranks on different nodes run in different UTS and network namespaces: each reports its
    node's hostname and its own address, and the shared-memory split groups them by node."""
    up(2, 2)
    p = subprocess.run([VCLUSTER, "--name", NAME, "run", "--", "--host", "n1:2,n2:2",
                        "--oversubscribe", "--bind-to", "none", "sh", "-c",
                        'echo "$OMPI_COMM_WORLD_RANK $(hostname) $OMPI_COMM_WORLD_LOCAL_RANK '
                        '$(ip -4 -o addr show dev eth0 | awk \'{print $4}\')"'],
                       env=ENV, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        fail(f"mpirun on the cluster exited {p.returncode}:\n{p.stderr[-3000:]}")
    seen = sorted(tuple(line.split()) for line in p.stdout.splitlines() if line.strip())
    want = [("0", "n1", "0", "10.231.0.1/24"), ("1", "n1", "1", "10.231.0.1/24"),
            ("2", "n2", "0", "10.231.0.2/24"), ("3", "n2", "1", "10.231.0.2/24")]
    if seen != want:
        fail(f"ranks report {seen}, expected {want}")
    _, log = train("n1:2,n2:2", PLAIN + ["--steps", "5"], "split")
    expect_node_split(log, "n1:2,n2:2", "2x2")
    if "took the hier path" not in log:
        fail(f"a 2 x 2 all-reduce did not take the hierarchical path:\n{log[-2000:]}")


def scenario_checksum_topologies():
    up(2, 4)
    runs = {}
    for hosts in ["n1:1,n2:1", "n1:2", "n1:2,n2:2", "n1:4"]:
        for i in range(2):
            rows, log = train(hosts, PLAIN, f"{hosts.replace(':', '-')}-{i}")
            s = summary(rows)
            if s["ranks_agree"] is not True:
                fail(f"{hosts} run {i}: replicas disagree: {s}")
            expect_node_split(log, hosts, hosts)
            runs.setdefault(hosts, []).append((s, last_eval(rows), log))
    pair = [runs[h][0][0]["param_checksum"] for h in ("n1:1,n2:1", "n1:2")]
    if pair[0] != pair[1]:
        fail(f"2 x 1 (ring) and 1 x 2 (shared memory) differ: {pair}; with two ranks both sum "
             f"each element in one addition")
    print(f"2 x 1 and 1 x 2: checksum {pair[0]} on both")
    two_nodes, one_node = runs["n1:2,n2:2"], runs["n1:4"]
    # The step-0 line names the path: hierarchical across nodes, shared memory on one node.
    if "took the hier path" not in two_nodes[0][2]:
        fail(f"2 x 2 did not take the hierarchical path:\n{two_nodes[0][2][-2000:]}")
    if not re.search(r"took the shm(-direct|-small)? path", one_node[0][2]):
        fail(f"1 x 4 did not take a shared-memory path:\n{one_node[0][2][-2000:]}")
    for hosts, rs in runs.items():
        sums = [s["param_checksum"] for s, _, _ in rs]
        if len(set(sums)) != 1:
            fail(f"{hosts}: the same run twice gave different checksums {sums}")
    a, b = two_nodes[0][0], one_node[0][0]
    ea, eb = two_nodes[0][1], one_node[0][1]
    print(f"2 x 2: checksum {a['param_checksum']} test accuracy {ea['test_accuracy']:.4f} "
          f"loss {ea['test_loss']:.4f}; 1 x 4: checksum {b['param_checksum']} "
          f"test accuracy {eb['test_accuracy']:.4f} loss {eb['test_loss']:.4f}")
    if TOPOLOGIES_SUM_IN_SAME_ORDER:
        if a["param_checksum"] != b["param_checksum"]:
            fail(f"2 x 2 and 1 x 4 differ: {a['param_checksum']} vs {b['param_checksum']}")
        return
    # Different summation orders: the same training up to rounding. One epoch of the quick
    # model; the two trajectories may drift apart by rounding, never by a whole step's update.
    if abs(ea["test_accuracy"] - eb["test_accuracy"]) > 0.02:
        fail(f"test accuracy 2 x 2 {ea['test_accuracy']} vs 1 x 4 {eb['test_accuracy']}")
    if abs(ea["test_loss"] - eb["test_loss"]) > 0.02 * max(1.0, abs(eb["test_loss"])):
        fail(f"test loss 2 x 2 {ea['test_loss']} vs 1 x 4 {eb['test_loss']}")
    if a["param_checksum"] == b["param_checksum"]:
        print("2 x 2 and 1 x 4 now end with the same bits: set TOPOLOGIES_SUM_IN_SAME_ORDER")


def scenario_hier_check():
    """The hierarchical all-reduce across real (virtual) nodes, checked element by element by
    `resync bench allreduce --check` next to MPI_Allreduce: odd counts from 1 float to 1 MiB,
    over every rank and over participant subsets spread unevenly over the nodes."""
    up(2, 3)
    bench = ["bench", "allreduce", "--check", "-b", "4", "-e", "1M", "-f", "16",
             "--extra-elems", "1", "--warmup", "1", "--iters", "2", "--blocks", "1",
             "--check-iters", "2"]
    # (participants, whether some node holds two or more of them: then the path is hier). The
    # bench prints rank 0's choice, so the one-node subset lies on rank 0's node.
    for participants, hier in [(None, True), ("0,1,3", True), ("1,2,4,5", True),
                               ("0,3,4,5", True), ("2,5", False), ("1,2", False)]:
        args = bench + (["--participants", participants] if participants else [])
        cmd = mpirun("n1:3,n2:3", args)
        try:
            p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=100)
        except subprocess.TimeoutExpired:
            fail(f"bench allreduce over {participants or 'all ranks'} did not finish in 100 s")
        tag = participants or "all ranks"
        if p.returncode != 0:
            fail(f"bench allreduce --check over {tag} exited {p.returncode}:\n"
                 f"{p.stdout[-2000:]}{p.stderr[-2000:]}")
        rows = [line for line in p.stdout.splitlines() if line.strip() and
                not line.lstrip().startswith("#")]
        took_hier = any(" hier " in row for row in rows)
        if hier and not took_hier:
            fail(f"over {tag} (spread over the nodes) no row took the hier path:\n"
                 f"{p.stdout[-2000:]}")
        if not hier and took_hier:
            fail(f"over {tag} (at most one rank per node, or one node) a row took hier:\n"
                 f"{p.stdout[-2000:]}")
        print(f"{tag}: checked, {'hier' if hier else 'no hier'}")


def scenario_odd_shapes():
    shapes = [(3, 1, "n1:1,n2:1,n3:1"), (2, 3, "n1:3,n2:3"), (2, 3, "n1:1,n2:3")]
    for nodes, slots, hosts in shapes:
        up(nodes, slots)
        sums = []
        for i in range(2):
            rows, log = train(hosts, PLAIN[:-2] + ["--steps", "40"],
                              f"{hosts.replace(':', '-')}-{i}")
            s = summary(rows)
            if s["ranks_agree"] is not True:
                fail(f"{hosts} run {i}: replicas disagree: {s}")
            if s["steps"] != 40:
                fail(f"{hosts} run {i}: {s['steps']} steps, expected 40")
            steps = [r for r in rows if r["event"] == "step"]
            if not all(r["loss"] is not None and math.isfinite(r["loss"]) for r in steps):
                fail(f"{hosts} run {i}: a non-finite loss")
            expect_node_split(log, hosts, hosts)
            sums.append(s["param_checksum"])
        if sums[0] != sums[1]:
            fail(f"{hosts}: the same run twice gave different checksums {sums}")
        print(f"{hosts}: checksum {sums[0]} twice, replicas agree")


def last_step(path):
    try:
        with open(path) as f:
            steps = [json.loads(l)["step"] for l in f if '"event":"step"' in l]
        return steps[-1] if steps else -1
    except (OSError, ValueError):
        return -1


def in_node(pid, node):
    """Whether process `pid` lives in the network namespace of cluster node `node`."""
    try:
        ns = os.readlink(f"/proc/{pid}/ns/net")
        return ns == f"net:[{os.stat(f'/run/netns/{NAME}-{node}').st_ino}]"
    except OSError:
        return False


def start_long_run(metrics, extra, steps):
    args = ["train", "--data", "synthetic", "--synthetic-train", "16000", "--synthetic-test",
            "1000", "--hidden", "128", "--batch-size", "32", "--steps", str(steps),
            "--progress", "off", "--metrics", metrics] + extra
    return subprocess.Popen(mpirun("n1:2,n2:2", args), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def victim_pid(metrics, rank, job):
    pid = rank_pid(metrics, rank)
    if pid is None:
        fail(f"could not find the process of rank {rank}", job)
    if not in_node(pid, "n2"):
        fail(f"rank {rank} (pid {pid}) is not in node n2's network namespace", job)
    return pid


def drain(job):
    """Collects the job's stderr on a thread, so a long debug log never fills the pipe and
    stalls mpirun; returns a function giving what was read so far."""
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(job.stderr.readline, "")),
                              daemon=True)
    reader.start()

    def text(wait=False):
        if wait:
            reader.join(timeout=30)
        return "".join(chunks)
    return text


def steps_with(metrics, rank, after):
    """Step records after step `after` in which `rank` took part."""
    try:
        rows = [json.loads(l) for l in open(metrics) if l.strip()]
    except (OSError, ValueError):
        return []
    return [r for r in rows if r.get("event") == "step" and r["step"] > after and
            rank in r["participants"]]


def scenario_adamw_stragglers():
    """AdamW across 2 nodes with random stragglers and one backup worker: late ranks on n1 are
    caught up from their node peer's shared memory, the rank alone on n2 by MPI from n1 (only
    the moments when it is one step behind and a donor waits: then it recomputes its
    parameters); AdamW's two moments in every transfer, and the replicas end bit for bit
    equal."""
    up(2, 2)
    tries = []
    for i in range(3):  # the kinds of catch-up a run gets depend on timing
        rows, log = train("n1:2,n2:1", QUICK[:-2] + [
            "--log-level", "debug", "--steps", "150", "--optimizer", "adamw", "--lr", "0.003",
            "--grad-clip", "1", "--warmup-steps", "5", "--backup-workers", "1",
            "--inject-delay", "one:lognormal:2:1.0"], f"adamw-{i}")
        s = summary(rows)
        if s["ranks_agree"] is not True:
            fail(f"run {i}: replicas disagree after AdamW catch-ups: {s}")
        for bad in ("torn", "could not catch up"):
            if bad in log:
                fail(f"run {i}: a catch-up went wrong ({bad!r}):\n{log[-3000:]}")
        tries.append((s["catch_ups"], log.count("(shared memory)"),
                      log.count("(optimizer state only)")))
        if tries[-1][1] > 0 and tries[-1][0] > tries[-1][1]:
            break  # both kinds seen: shared-memory copies and MPI transfers
    print(f"catch-ups (all, shared memory, optimizer state only) per run: {tries}")
    if not any(t[1] > 0 for t in tries) or not any(t[0] > t[1] for t in tries):
        fail(f"{len(tries)} runs without both shared-memory and MPI catch-ups: {tries}")


def scenario_sigstop_backup_worker():
    """Rank 2 on node n2 frozen for 3 s with one backup worker: the others keep closing steps,
    it catches up after SIGCONT from its node peer (rank 3) out of shared memory, replicas
    agree. The run is open-ended and ends by SIGUSR1 once rank 2 is back, so a fast machine
    cannot finish training while it is frozen."""
    up(2, 2)
    victim, peer, stop_s = 2, 3, 3.0
    metrics = os.path.join(TMP, "sigstop.jsonl")
    job = start_long_run(metrics, ["--backup-workers", "1", "--ring-timeout-ms", "500",
                                   "--log-level", "debug"], 10**7)
    log_so_far = drain(job)
    wait_for(lambda: last_step(metrics) >= 100, 40, "step 100", job, fail)
    pid = victim_pid(metrics, victim, job)
    os.kill(pid, signal.SIGSTOP)
    stopped_at = last_step(metrics)
    time.sleep(stop_s)  # the fault's duration
    during = last_step(metrics)
    os.kill(pid, signal.SIGCONT)
    print(f"rank {victim} (pid {pid}, node n2) stopped at step {stopped_at}; "
          f"{stop_s} s later step {during}")
    if during < stopped_at + 20:
        os.kill(pid, signal.SIGKILL)  # ends the job: its log is then complete
        job.wait(timeout=30)
        open(os.path.join(TMP, "sigstop.log"), "w").write(log_so_far(wait=True))
        fail(f"the other ranks made only {during - stopped_at} steps while rank {victim} was "
             f"stopped (log: {TMP}/sigstop.log)", job)
    # Back in the steps, then a while longer (more catch-ups), then a stop at a step boundary.
    wait_for(lambda: len(steps_with(metrics, victim, during)) >= 50, 60,
             f"rank {victim} in 50 steps after SIGCONT", job, fail)
    os.kill(rank_pid(metrics, 0), signal.SIGUSR1)
    try:
        job.wait(timeout=60)
    except subprocess.TimeoutExpired:
        fail("the job did not stop within 60 s of SIGUSR1", job)
    log = log_so_far(wait=True)
    if job.returncode != 0:
        fail(f"job exited {job.returncode}:\n{log[-3000:]}")
    rows = [json.loads(l) for l in open(metrics)]
    s = summary(rows)
    if s.get("event") != "summary" or s["ranks_agree"] is not True:
        fail(f"replicas disagree at the end: {s}")
    steps = [r for r in rows if r["event"] == "step"]
    frozen = [r for r in steps if stopped_at < r["step"] <= during]
    if not any(victim in r["dropped"] for r in frozen):
        fail(f"rank {victim} is not recorded as dropped while it was stopped")
    # Only rank 0 logs below warn, so the catch-ups are read from its coordinator's decisions:
    # "control: rank L catches up early from rank D at step S[ (shared memory)]".
    ups = [(int(late), int(donor), int(step), bool(shm)) for late, donor, step, shm in
           re.findall(r"control: rank (\d+) catches up early from rank (\d+) at step (\d+)"
                      r"( \(shared memory\))?", log)]
    node = {0: "n1", 1: "n1", 2: "n2", 3: "n2"}
    mine = [u for u in ups if u[0] == victim]
    after = [u for u in mine if u[2] > during]
    if not after:
        open(os.path.join(TMP, "sigstop.log"), "w").write(log)
        fail(f"no catch-up of rank {victim} after SIGCONT in rank 0's log ({TMP}/sigstop.log)")
    # The catch-up right after the freeze comes from its node peer, out of shared memory.
    first = after[0]
    if first[1] != peer or not first[3]:
        fail(f"rank {victim}'s catch-up after the freeze (step {first[2]}) came from rank "
             f"{first[1]}{' (shared memory)' if first[3] else ' by MPI'}, not from rank {peer} "
             f"(its node) by shared memory")
    # Shared memory never crosses a node, and a donor on the late rank's own node is preferred
    # (another node's rank serves only when the node peer holds no fresh state itself).
    if any(shm and node[late] != node[donor] for late, donor, _, shm in ups):
        fail("a catch-up across nodes is logged as a shared-memory one")
    local = sum(1 for late, donor, _, shm in ups if node[late] == node[donor] and shm)
    if local * 10 < len(ups) * 9:
        fail(f"only {local} of {len(ups)} catch-ups came from the late rank's node by shared "
             f"memory")
    print(f"PASS: {s['steps']} steps, {len(ups)} early catch-ups, {local} from the late rank's "
          f"node by shared memory; rank {victim}: {len(mine)}, after the freeze from rank "
          f"{first[1]} at step {first[2]}; replicas agree")


def scenario_sigkill():
    """A rank on node n2 killed outright ends the whole job within seconds, non-zero, naming
    the rank."""
    up(2, 2)
    victim = 3
    metrics = os.path.join(TMP, "sigkill.jsonl")
    job = start_long_run(metrics, ["--log-level", "warn"], 5000)
    wait_for(lambda: last_step(metrics) >= 50, 40, "step 50", job, fail)
    pid = victim_pid(metrics, victim, job)
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    try:
        out, log = job.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        fail("the job still runs 20 s after a rank was killed", job)
    took = time.time() - killed
    if job.returncode == 0:
        fail(f"the job exited 0 after rank {victim} was killed:\n{log[-3000:]}")
    if took > 10:
        fail(f"the job took {took:.1f} s to end after rank {victim} was killed")
    named = [l for l in (out + log).splitlines() if re.search(rf"\brank {victim}\b", l)]
    if not named:
        fail(f"no line names rank {victim}:\n{log[-3000:]}")
    print(f"PASS: exit {job.returncode} {took:.1f} s after SIGKILL of rank {victim} on n2; "
          f"{named[0].strip()}")


def launched_run(tag, train_args, victim, victim_node):
    """Runs `resync train` on n1:2,n2:2 under `resync launch` with a shared checkpoint directory,
    SIGKILLs rank `victim` (a process of `victim_node`) after step 150, and expects one relaunch
    and a clean end. Returns (metrics rows, the launcher's stderr)."""
    metrics = os.path.join(TMP, tag + ".jsonl")
    args = ["train", "--data", "synthetic", "--synthetic-train", "16000", "--synthetic-test",
            "1000", "--hidden", "128", "--batch-size", "32", "--steps", "600", "--progress",
            "off", "--log-level", "warn", "--checkpoint-dir", os.path.join(TMP, tag + "_ckpt"),
            "--metrics", metrics] + train_args
    job = subprocess.Popen([RESYNC, "launch", "--max-restarts", "2", "--"] +
                           mpirun("n1:2,n2:2", args), env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = drain(job)
    wait_for(lambda: last_step(metrics) >= 150, 60, "step 150", job, fail)
    pid = rank_pid(metrics, victim)
    if pid is None or not in_node(pid, victim_node):
        fail(f"rank {victim} (pid {pid}) is not a process of node {victim_node}", job)
    os.kill(pid, signal.SIGKILL)
    try:
        job.wait(timeout=100)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        fail(f"{tag}: the launched job did not finish within 100 s after the kill:\n"
             f"{log(wait=True)[-3000:]}")
    err = log(wait=True)
    if job.returncode != 0:
        fail(f"{tag}: resync launch exited {job.returncode}:\n{err[-3000:]}")
    if err.count("relaunching with --resume") != 1:
        fail(f"{tag}: expected exactly one relaunch:\n{err[-3000:]}")
    rows = [json.loads(l) for l in open(metrics) if l.strip()]
    if not rows or rows[-1]["event"] != "summary" or rows[-1]["ranks_agree"] is not True:
        fail(f"{tag}: no agreeing summary at the end: {rows[-1:]}")
    return rows, err


def scenario_sync_relaunch():
    """Plain sync across nodes through a death: worker rank 3 on n2 is SIGKILLed, the survivors
    save, `resync launch` relaunches, and the run ends with the same param_checksum as the same
    run without the death on the same nodes, no step done twice."""
    up(2, 2)
    straight, _ = train("n1:2,n2:2", ["--data", "synthetic", "--synthetic-train", "16000",
                                      "--synthetic-test", "1000", "--hidden", "128",
                                      "--batch-size", "32", "--steps", "600", "--log-level",
                                      "warn"], "sync_straight")
    rows, _ = launched_run("sync_relaunch", [], victim=3, victim_node="n2")
    want, got = summary(straight)["param_checksum"], rows[-1]["param_checksum"]
    if got != want:
        fail(f"checksum {got} after the relaunch, {want} without the death")
    seen = {}
    for r in rows:
        if r["event"] == "step":
            seen[r["step"]] = seen.get(r["step"], 0) + 1
    twice = sorted(s for s, n in seen.items() if n > 1)
    if len(twice) > 1:
        fail(f"steps done more than once: {twice[:10]}")
    print(f"PASS: rank 3 on n2 killed; after one relaunch checksum {got} as without the death, "
          f"steps redone {twice}")


def scenario_async_server_relaunch():
    """Async mode across nodes: servers on n1, workers on n2. Server rank 1 is SIGKILLed; the
    workers on n2 save their copies of the parameters (the checkpoint directory is shared), the
    relaunched server 1 takes its shard from the freshest copy, and each worker redoes at most
    the step it had in flight."""
    up(2, 2)
    rows, err = launched_run("async_relaunch", ["--mode", "async", "--ps", "2", "--lr", "0.005",
                                                "--max-staleness", "8", "--checkpoint-every",
                                                "20"], victim=1, victim_node="n1")
    # The runs in the metrics: rank 0's step records start again after the relaunch.
    runs, prev = [], None
    for r in (r for r in rows if r["event"] == "step"):
        if prev is None or r["elapsed_s"] < prev:
            runs.append([])
        runs[-1].append(r)
        prev = r["elapsed_s"]
    if len(runs) != 2:
        fail(f"{len(runs)} run(s) in the step records, expected the first and one relaunch")
    last = {r["worker"]: r["step"] for r in runs[0]}
    first = {}
    for r in runs[1]:
        first.setdefault(r["worker"], r["step"])
    redone = {w: last[w] - first[w] + 1 for w in sorted(last) if w in first}
    if sorted(redone) != [2, 3] or max(redone.values()) > 1:
        fail(f"steps redone per worker {redone} (at most 1 each): last before the death {last}, "
             f"first after the relaunch {first}")
    if "come from" not in err:
        fail(f"server 1's shard did not resume from a worker's copy:\n{err[-3000:]}")
    print(f"PASS: server rank 1 on n1 killed at step {last}; the workers on n2 resumed at "
          f"{first} (redone {redone}) after one relaunch; replicas agree")


def main():
    scenario = globals().get("scenario_" + SCENARIO)
    if scenario is None:
        fail(f"unknown scenario {SCENARIO}")
    skip_unless_supported()

    def stop(signum, _frame):
        raise SystemExit(f"cluster.{SCENARIO}: signal {signum}")
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    started = time.time()
    try:
        scenario()
    finally:
        vcluster("down", check=False)
    print(f"PASS [cluster.{SCENARIO}] in {time.time() - started:.1f} s")


main()
