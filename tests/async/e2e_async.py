#!/usr/bin/env python3
"""End-to-end tests of `resync train --mode async` (parameter servers) under mpirun.

Usage: e2e_async.py RESYNC_BINARY MPIEXEC SCENARIO
Each scenario asserts and exits non-zero with a message naming what differed.
"""
import json
import os
import re
import struct
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from e2e_util import E2e  # noqa: E402

RESYNC, MPIEXEC, SCENARIO = sys.argv[1], sys.argv[2], sys.argv[3]
TMP = tempfile.mkdtemp(prefix="resync_async_e2e_")
E2E = E2e(RESYNC, MPIEXEC, SCENARIO)
fail, run, expect_bad_input = E2E.fail, E2E.run, E2E.expect_bad_input


# Each gradient is its own update, and on this small set momentum 0.9 (or lr 0.05) on top of the
# staleness of 3 interleaved workers diverges now and then (asynchrony acts as extra momentum);
# plain SGD at lr 0.02 learned it in every trial.
def quick(lr="0.02", momentum="0"):
    return ["--mode", "async", "--data", "synthetic", "--synthetic-train", "4000",
            "--synthetic-test", "1000", "--hidden", "64", "--batch-size", "32", "--lr", lr,
            "--momentum", momentum, "--log-level", "warn"]


QUICK = quick()


def train(np, args, name, timeout=120):
    path = os.path.join(TMP, name + ".jsonl")
    p = run(np, ["train", "--metrics", path] + args, timeout)
    if p.returncode != 0:
        fail(f"`resync train {' '.join(args)}` at np {np} exited {p.returncode}\n"
             f"{p.stderr[-3000:]}")
    return [json.loads(line) for line in open(path)]


def events(rows, kind):
    return [r for r in rows if r["event"] == kind]


def summary(rows):
    last = rows[-1]
    if last.get("event") != "summary":
        fail(f"last metrics line is not the summary: {last}")
    return last


def check_common(rows, np, ps, steps_per_worker):
    """What every async run must show: a step record per worker step, an eval, the summary."""
    s = summary(rows)
    workers = list(range(ps, np))
    steps = events(rows, "step")
    if any(r.get("mode") != "async" for r in steps):
        fail("a step record lacks \"mode\":\"async\"")
    for key in ["step", "epoch", "worker", "loss", "step_ms", "compute_ms", "delay_ms", "comm_ms",
                "staleness", "applied", "version", "elapsed_s"]:
        if key not in steps[0]:
            fail(f"step record lacks '{key}': {steps[0]}")
    for w in workers:
        mine = sorted(r["step"] for r in steps if r["worker"] == w)
        if mine != list(range(steps_per_worker)):
            fail(f"worker {w}: step records {mine[:5]}...{mine[-5:]} (count {len(mine)}), "
                 f"expected 0..{steps_per_worker - 1}")
    if {r["worker"] for r in steps} != set(workers):
        fail(f"step records name workers {sorted({r['worker'] for r in steps})}, "
             f"expected {workers}")
    if s["steps"] != len(workers) * steps_per_worker:
        fail(f"summary steps {s['steps']}, expected {len(workers)} x {steps_per_worker}")
    if s["ranks_agree"] is not True:
        fail(f"ranks do not hold the same final parameters: {s}")
    stale = events(rows, "staleness")
    if [r["server"] for r in stale] != list(range(ps)):
        fail(f"staleness records for servers {[r['server'] for r in stale]}, expected 0..{ps - 1}")
    for r in stale:
        if sum(r["histogram"]) != r["applied"]:
            fail(f"server {r['server']}: histogram sums to {sum(r['histogram'])}, "
                 f"applied {r['applied']}")
        if r["applied"] + r["dropped"] + (r["refreshed"] if r["server"] == 0 else 0) > s["steps"]:
            fail(f"server {r['server']}: more updates than worker steps: {r}")
    evals = events(rows, "eval")
    if not evals or evals[-1]["test_accuracy"] != s["test_accuracy"]:
        fail(f"the summary's accuracy is not the last evaluation's: {evals[-1:]} {s}")
    return s, steps, stale


def scenario_synthetic():
    # 1 server, 3 workers, 3 epochs of each worker's shard: learns, one eval per epoch.
    spe = 4000 // 3 // 32
    rows = train(4, QUICK + ["--ps", "1", "--epochs", "3"], "synthetic")
    s, steps, stale = check_common(rows, 4, 1, 3 * spe)
    if not s["test_accuracy"] > 0.85:
        fail(f"synthetic set not learned: test accuracy {s['test_accuracy']}")
    if [e["epoch"] for e in events(rows, "eval")] != [0, 1, 2]:
        fail(f"eval epochs {[e['epoch'] for e in events(rows, 'eval')]}, expected [0, 1, 2]")
    if s["dropped_gradients"] != 0 or stale[0]["dropped"] != 0:
        fail(f"gradients dropped without --max-staleness: {s} {stale[0]}")
    if stale[0]["applied"] != 3 * 3 * spe:
        fail(f"server applied {stale[0]['applied']} gradients, expected {3 * 3 * spe}")
    versions = sorted(r["version"] for r in steps)
    if versions != list(range(1, 3 * 3 * spe + 1)):
        fail("server versions in the step records are not 1..N, one per applied gradient")


def scenario_fashion_mnist():
    if not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"):
        print("SKIP: Debian dataset-fashion-mnist is not installed")
        sys.exit(77)
    # 1 server and 3 workers, two passes over the data (~10 s on 2 idle cores). Every gradient
    # is its own update, so the step is smaller than sync mode's default 0.05.
    rows = train(4, ["--mode", "async", "--ps", "1", "--epochs", "2", "--lr", "0.02",
                     "--log-level", "warn"], "fmnist", timeout=170)
    spe = 60000 // 3 // 64
    s, _, _ = check_common(rows, 4, 1, 2 * spe)
    if not s["test_accuracy"] >= 0.80:
        fail(f"Fashion-MNIST, --ps 1, 3 workers, 2 epochs: test accuracy "
             f"{s['test_accuracy']} < 0.80")
    print(f"Fashion-MNIST, --ps 1, 3 workers, 2 epochs: test accuracy {s['test_accuracy']}, "
          f"{s['elapsed_s']:.1f} s")


def scenario_single_worker_staleness_zero():
    # With one worker nobody else moves the servers between its pull and its push.
    for np, ps in ((2, 1), (3, 2)):
        # Sync mode's defaults: with one worker they are exactly as stable as in sync mode.
        rows = train(np, quick("0.05", "0.9") + ["--ps", str(ps), "--steps", "100"], f"single{np}")
        s, steps, stale = check_common(rows, np, ps, 100)
        bad = [r for r in steps if r["staleness"] != 0 or not r["applied"]]
        if bad:
            fail(f"np {np} --ps {ps}: one worker, yet staleness {bad[0]['staleness']} at step "
                 f"{bad[0]['step']}")
        for r in stale:
            if r["max_staleness"] != 0 or r["histogram"] != [100]:
                fail(f"np {np} --ps {ps}: server {r['server']} staleness record {r}")
        if not s["test_accuracy"] > 0.8:
            fail(f"np {np} --ps {ps}: accuracy {s['test_accuracy']}")


def scenario_staleness_bound():
    # Worker 3 sleeps 15 ms per step while workers 1 and 2 push: its copy is always several
    # versions old. With --max-staleness 1 no applied gradient may be staler than 1, and its
    # stale steps are refreshed (or dropped by the server) and counted.
    bound = 1
    rows = train(4, QUICK + ["--ps", "1", "--steps", "80", "--max-staleness", str(bound),
                             "--inject-delay", "fixed:3:15"], "bound")
    s = summary(rows)
    steps = events(rows, "step")
    stale = events(rows, "staleness")
    applied = [r for r in steps if r["applied"]]
    worst = max(r["staleness"] for r in applied)
    if worst > bound:
        fail(f"an applied gradient had staleness {worst} > --max-staleness {bound}")
    if stale[0]["max_staleness"] > bound or len(stale[0]["histogram"]) > bound + 1:
        fail(f"staleness record exceeds the bound: {stale[0]}")
    if s["dropped_gradients"] < 1:
        fail(f"a worker 15 ms behind was never refreshed or dropped: {s}")
    dropped_at_server = sum(1 for r in steps if not r["applied"])
    if s["dropped_gradients"] != s["catch_ups"] + dropped_at_server:
        fail(f"dropped_gradients {s['dropped_gradients']} != refreshed {s['catch_ups']} + "
             f"dropped by the server {dropped_at_server}")
    if stale[0]["applied"] + dropped_at_server + s["catch_ups"] != s["steps"]:
        fail(f"applied + dropped + refreshed != worker steps: {stale[0]} {s}")
    if s["ranks_agree"] is not True:
        fail("ranks disagree")
    # Without the bound the same run applies stale gradients.
    rows = train(4, QUICK + ["--ps", "1", "--steps", "80", "--inject-delay", "fixed:3:15"],
                 "unbounded")
    if max(r["staleness"] for r in events(rows, "step")) <= bound:
        fail("without --max-staleness the slow worker's gradients were never stale: the bound "
             "test proves nothing")


def scenario_two_servers():
    # 2 servers, 3 workers: mid-run evaluations pull shard 1 from rank 1; both shards serve.
    spe = 4000 // 3 // 32
    rows = train(5, QUICK + ["--ps", "2", "--epochs", "3"], "two_servers")
    s, _, stale = check_common(rows, 5, 2, 3 * spe)
    evals = events(rows, "eval")
    if [e["epoch"] for e in evals] != [0, 1, 2]:
        fail(f"eval epochs {[e['epoch'] for e in evals]}")
    # Chance is 0.1: a mid-run evaluation of torn or missing shards would show it.
    if min(e["test_accuracy"] for e in evals[:2]) < 0.2:
        fail(f"mid-run evaluation with two shards looks wrong: {evals[:2]}")
    if not s["test_accuracy"] > 0.85:
        fail(f"accuracy {s['test_accuracy']}")
    if [r["applied"] for r in stale] != [3 * 3 * spe] * 2:
        fail(f"each server should apply every gradient: {stale}")


def scenario_one_worker_equals_sync():
    # One worker: the servers apply exactly the updates sync mode applies on one rank, in the
    # same order, with the same kernels, so the parameters match bit for bit (also sharded).
    args = quick("0.05", "0.9")[2:] + ["--steps", "100", "--seed", "7"]
    ref = summary(train(1, args, "sync1"))
    for np, ps in ((2, 1), (3, 2)):
        got = summary(train(np, ["--mode", "async", "--ps", str(ps)] + args, f"async{np}"))
        if got["param_checksum"] != ref["param_checksum"]:
            fail(f"np {np} --ps {ps}: checksum {got['param_checksum']}, sync on one rank "
                 f"{ref['param_checksum']}")
        if got["test_accuracy"] != ref["test_accuracy"]:
            fail(f"np {np} --ps {ps}: accuracy {got['test_accuracy']} != {ref['test_accuracy']}")


ADAMW = ["--optimizer", "adamw", "--grad-clip", "1", "--warmup-steps", "5", "--lr-schedule",
         "cosine", "--min-lr", "0.0002"]


def scenario_adamw():
    # Servers keep AdamW's moments per shard and count their own updates (bias correction,
    # schedule); each worker clips its own gradient. Two servers, two workers: it trains.
    spe = 4000 // 2 // 32
    rows = train(4, quick("0.002") + ADAMW + ["--ps", "2", "--epochs", "2"], "adamw")
    s, steps, _ = check_common(rows, 4, 2, 2 * spe)
    losses = [r["loss"] for r in sorted(steps, key=lambda r: (r["step"], r["worker"]))]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    if not last < 0.5 * first:
        fail(f"AdamW in async mode: mean loss of the first 20 pushes {first:.3f}, of the last 20 "
             f"{last:.3f}")
    if not s["test_accuracy"] > 0.85:
        fail(f"AdamW in async mode: test accuracy {s['test_accuracy']}")
    # One worker: the servers' AdamW (clipping on the worker, the schedule over its updates) is
    # sync mode's on one rank, bit for bit, also sharded.
    args = quick("0.002")[2:] + ADAMW + ["--steps", "60", "--seed", "7"]
    ref = summary(train(1, args, "adamw_sync1"))
    for np, ps in ((2, 1), (3, 2)):
        got = summary(train(np, ["--mode", "async", "--ps", str(ps)] + args, f"adamw_async{np}"))
        if got["param_checksum"] != ref["param_checksum"]:
            fail(f"AdamW np {np} --ps {ps}: checksum {got['param_checksum']}, sync on one rank "
                 f"{ref['param_checksum']}")


def scenario_bad_input():
    cases = [
        (2, ["train"] + QUICK + ["--ps", "2"], "--ps"),        # S = W: no worker
        (2, ["train"] + QUICK + ["--ps", "3"], "--ps"),        # S > W
        (1, ["train"] + QUICK + ["--ps", "1"], "--ps"),        # one rank cannot be both
        (1, ["train"] + QUICK + ["--ps", "0"], "--ps"),        # S < 1 (a flag error)
        (3, ["train"] + QUICK + ["--backup-workers", "1"], "--backup-workers"),
        (3, ["train"] + QUICK + ["--straggler-timeout-ms", "10"], "--straggler-timeout-ms"),
        (3, ["train"] + QUICK + ["--inject-delay", "fixed:0:10"], "parameter server"),
        (1, ["train"] + QUICK + ["--max-staleness", "-2"], "--max-staleness"),
    ]
    for np, args, mention in cases:
        expect_bad_input(np, args, mention)
    # --resume from a shard checkpoint that cannot continue this run: one line, exit 2 on
    # every rank (agreed on), whether the optimizer differs or its workers' steps do not fit.
    ckpt = os.path.join(TMP, "bad_resume_ckpt")
    small = QUICK + ["--ps", "1", "--steps", "10", "--checkpoint-dir", ckpt]
    train(3, small, "bad_resume")
    expect_bad_input(3, ["train"] + small + ["--resume", "--optimizer", "adamw"], "--optimizer")
    shard = os.path.join(ckpt, "server-0")
    path = os.path.join(shard, sorted(os.listdir(shard))[-1])
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if struct.unpack_from("<I", data, 8)[0] != 3:
        fail(f"{path}: an async shard checkpoint should be format version 3 (worker steps and "
             f"its version)")
    struct.pack_into("<I", data, 32, 4)  # world size 4: 3 workers, but it records 2
    struct.pack_into("<I", data, 12, zlib.crc32(bytes(data[:12]) + bytes(data[16:])))
    with open(path, "wb") as f:
        f.write(data)
    expect_bad_input(3, ["train"] + small + ["--resume"], "steps of 2 workers")


def scenario_non_finite_flags():
    # NaN and inf are bad input (exit 2, one line) on every floating-point flag, in async mode too.
    for flag in ["--lr", "--momentum", "--weight-decay", "--stall-warning-s", "--stall-abort-s",
                 "--progress-every-s"]:
        expect_bad_input(4, ["train"] + QUICK + ["--ps", "1", flag, "nan"], flag)
    expect_bad_input(4, ["train"] + QUICK + ["--ps", "1", "--lr", "inf"], "--lr")


def scenario_diverging():
    # lr 100 with weight decay 1 multiplies the parameters by about -99 per update: they overflow
    # within about 8 steps (lr 100 alone only kills every ReLU and stays finite). The workers'
    # NaN loss must end the whole job at once: exit 1, one line (from rank 0, on the first
    # worker's report) naming the worker's step and rank, no hang.
    args = quick("100", "0.9") + ["--weight-decay", "1", "--ps", "1", "--steps", "2000",
                                  "--metrics", os.path.join(TMP, "diverging.jsonl")]
    t0 = time.time()
    p = run(4, ["train"] + args, timeout=90)
    elapsed = time.time() - t0
    if p.returncode != 1:
        fail(f"a diverging run exited {p.returncode}, expected 1\n{p.stderr[-3000:]}")
    ours = [line for line in p.stderr.splitlines() if line.startswith("resync: error")]
    if len(ours) != 1:
        fail(f"expected one 'resync: error' line, got {ours}\n{p.stderr[-3000:]}")
    m = re.fullmatch(r"resync: error: non-finite (loss|gradient) \((.+?)\) at step (\d+) on "
                     r"rank (\d+)", ours[0])
    if not m:
        fail(f"the error line does not name a non-finite loss or gradient, its step and rank: "
             f"{ours[0]}")
    step, rank = int(m.group(3)), int(m.group(4))
    if rank not in (1, 2, 3):
        fail(f"the error names rank {rank}, not a worker (1..3): {ours[0]}")
    if step >= 2000:
        fail(f"the error names step {step}, past the run's 2000 steps")
    path = os.path.join(TMP, "diverging.jsonl")
    if os.path.exists(path) and any('"event":"summary"' in line for line in open(path)):
        fail("a diverged run wrote a summary")
    print(f"diverged: {ours[0]} after {elapsed:.1f} s")


globals()["scenario_" + SCENARIO]()
print(f"PASS [{SCENARIO}]")
