#!/usr/bin/env python3
"""End-to-end tests of `resync train` under mpirun: outputs, determinism, bad input.

Usage: e2e_train.py RESYNC_BINARY MPIEXEC SCENARIO
Each scenario asserts and exits non-zero with a message naming what differed.
"""
import array
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from e2e_util import ENV, QUICK, E2e  # noqa: E402

RESYNC, MPIEXEC, SCENARIO = sys.argv[1], sys.argv[2], sys.argv[3]
TMP = tempfile.mkdtemp(prefix="resync_e2e_")
E2E = E2e(RESYNC, MPIEXEC, SCENARIO)
fail, run, expect_bad_input = E2E.fail, E2E.run, E2E.expect_bad_input


LAST_STDERR = [""]  # the log of the last train() run


def train(np, args, name, timeout=120):
    path = os.path.join(TMP, name + ".jsonl")
    p = run(np, ["train", "--metrics", path] + args, timeout)
    LAST_STDERR[0] = p.stderr
    if p.returncode != 0:
        fail(f"`resync train {' '.join(args)}` at np {np} exited {p.returncode}\n{p.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(path)]
    return rows


def summary(rows):
    last = rows[-1]
    if last.get("event") != "summary":
        fail(f"last metrics line is not the summary: {last}")
    return last


def scenario_metrics():
    rows = train(2, QUICK + ["--epochs", "2", "--metrics-every", "5"], "metrics")
    steps = [r for r in rows if r["event"] == "step"]
    evals = [r for r in rows if r["event"] == "eval"]
    s = summary(rows)
    spe = 4000 // 2 // 32
    if s["steps"] != 2 * spe:
        fail(f"summary steps {s['steps']}, expected {2 * spe}")
    for key in ["step", "epoch", "loss", "step_ms", "compute_ms", "comm_ms", "wait_ms",
                "participants", "dropped", "late"]:
        if key not in steps[0]:
            fail(f"step record lacks '{key}': {steps[0]}")
    if [r["step"] for r in steps[:3]] != [0, 5, 10]:
        fail(f"--metrics-every 5 wrote steps {[r['step'] for r in steps[:3]]}")
    if steps[-1]["step"] != 2 * spe - 1:
        fail(f"last step record is step {steps[-1]['step']}, expected {2 * spe - 1}")
    if [e["epoch"] for e in evals] != [0, 1]:
        fail(f"eval epochs {[e['epoch'] for e in evals]}, expected [0, 1]")
    for key in ["steps", "elapsed_s", "samples_per_s", "test_accuracy", "param_checksum",
                "ranks_agree", "dropped_gradients", "catch_ups"]:
        if key not in s:
            fail(f"summary lacks '{key}': {s}")
    if s["ranks_agree"] is not True:
        fail(f"ranks disagree: {s}")
    if not s["test_accuracy"] > 0.9:
        fail(f"synthetic set not learned: test accuracy {s['test_accuracy']}")
    if steps[0]["participants"] != [0, 1]:
        fail(f"participants {steps[0]['participants']}")


def scenario_determinism():
    for np in (1, 3):
        a = summary(train(np, QUICK + ["--steps", "40", "--seed", "5"], f"a{np}"))
        b = summary(train(np, QUICK + ["--steps", "40", "--seed", "5"], f"b{np}"))
        c = summary(train(np, QUICK + ["--steps", "40", "--seed", "6"], f"c{np}"))
        if a["param_checksum"] != b["param_checksum"]:
            fail(f"np {np}: same seed, different checksums {a['param_checksum']} {b['param_checksum']}")
        if a["param_checksum"] == c["param_checksum"]:
            fail(f"np {np}: different seeds gave the same checksum")
        if not (a["ranks_agree"] and b["ranks_agree"]):
            fail(f"np {np}: ranks disagree")


def scenario_config_file():
    cfg = os.path.join(TMP, "run.toml")
    with open(cfg, "w") as f:
        f.write('data = "synthetic"\nsynthetic-train = 4000\nsynthetic-test = 1000\n'
                'hidden = [64]\nbatch-size = 32\nlog-level = "warn"\nsteps = 30\nseed = 11\n'
                'lr = 0.02\n')
    from_file = summary(train(2, ["--config", cfg], "cfgfile"))
    from_flags = summary(train(2, QUICK + ["--steps", "30", "--seed", "11", "--lr", "0.02"], "cfgflags"))
    if from_file["param_checksum"] != from_flags["param_checksum"]:
        fail("config file and the same flags gave different parameters")


def scenario_bad_input():
    bad_toml = os.path.join(TMP, "bad.toml")
    with open(bad_toml, "w") as f:
        f.write("lr = -3\n")
    unknown_toml = os.path.join(TMP, "unknown.toml")
    with open(unknown_toml, "w") as f:
        f.write("learning_rate = 0.1\n")
    corrupt = os.path.join(TMP, "corrupt")
    os.makedirs(corrupt, exist_ok=True)
    for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]:
        with open(os.path.join(corrupt, name), "wb") as f:
            f.write(b"\x00\x00\x08\x03\x00\x00\x00\x05")  # header cut short
    cases = [
        (1, ["train", "--lr", "-1"], "--lr"),
        (1, ["train", "--batch-size", "0"], "--batch-size"),
        (1, ["train", "--model", "transformer"], "--model"),
        (1, ["train", "--hidden", "512,0"], "--hidden"),
        (1, ["train", "--epochs", "many"], "--epochs"),
        (1, ["train", "--no-such-flag"], "no-such-flag"),
        (1, ["train", "--log-level", "loud"], "--log-level"),
        (1, ["train", "--inject-delay", "fixed:1"], "inject-delay"),
        (1, ["train", "--data", "idx:/nonexistent/dir"], "/nonexistent/dir"),
        (1, ["train", "--data", "idx:" + corrupt], "corrupt"),
        (1, ["train", "--config", "/nonexistent.toml"], "nonexistent.toml"),
        (1, ["train", "--config", bad_toml], "lr"),
        (1, ["train", "--config", unknown_toml], "learning_rate"),
        (1, ["train"] + QUICK + ["--metrics", "/nonexistent/dir/m.jsonl"], "--metrics"),
        (2, ["train"] + QUICK + ["--backup-workers", "2"], "--backup-workers"),
        (2, ["train"] + QUICK + ["--min-quorum", "3"], "--min-quorum"),
        (2, ["train"] + QUICK + ["--inject-delay", "fixed:5:10"], "rank 5"),
        (2, ["train"] + QUICK + ["--batch-size", "5000"], "--batch-size"),
        (1, ["train", "--optimizer", "adam"], "--optimizer"),
        (1, ["train", "--optimizer", "adamw", "--beta1", "1"], "--beta1"),
        (1, ["train", "--optimizer", "adamw", "--beta2", "nan"], "--beta2"),
        (1, ["train", "--optimizer", "adamw", "--eps", "0"], "--eps"),
        (1, ["train", "--optimizer", "adamw", "--eps", "inf"], "--eps"),
        (1, ["train", "--grad-clip", "-1"], "--grad-clip"),
        (1, ["train", "--lr-schedule", "linear"], "--lr-schedule"),
        (1, ["train", "--warmup-steps", "-3"], "--warmup-steps"),
        (1, ["train", "--min-lr", "nan"], "--min-lr"),
    ]
    for np, args, mention in cases:
        expect_bad_input(np, args, mention)


def scenario_fashion_mnist():
    if not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"):
        print("SKIP: Debian dataset-fashion-mnist is not installed")
        sys.exit(77)
    rows = train(2, ["--steps", "300", "--log-level", "warn"], "fmnist", timeout=300)
    s = summary(rows)
    if not s["test_accuracy"] > 0.75:
        fail(f"Fashion-MNIST after 300 steps: test accuracy {s['test_accuracy']} <= 0.75")
    if not s["ranks_agree"]:
        fail("ranks disagree")


def steps_of(rows):
    return [r for r in rows if r["event"] == "step"]


def scenario_backup_workers():
    # A rank that is always slow is left out of every step and caught up; odd rank counts too.
    for np, slow in ((3, 2), (5, 1)):
        rows = train(np, QUICK + ["--steps", "80", "--backup-workers", "1",
                                  "--inject-delay", f"fixed:{slow}:40"], f"bw{np}")
        s = summary(rows)
        if not s["ranks_agree"]:
            fail(f"np {np}: ranks disagree after catch-ups: {s}")
        steps = steps_of(rows)
        others = [r for r in range(np) if r != slow]
        left_out = [r for r in steps if r["participants"] == others and r["dropped"] == [slow]]
        if len(left_out) < len(steps) // 2:
            fail(f"np {np}: slow rank {slow} was left out of only {len(left_out)} of {len(steps)} steps")
        # The slow rank is busy (in its injected delay) when its steps close: it joins their
        # all-reduce with a zero gradient, so its gradients are dropped but need no catch-up.
        if s["dropped_gradients"] < len(left_out):
            fail(f"np {np}: {s['dropped_gradients']} dropped gradients for {len(left_out)} "
                 f"steps without rank {slow}: {s}")
        if "torn" in LAST_STDERR[0] or "could not catch up" in LAST_STDERR[0]:
            fail(f"np {np}: a catch-up failed:\n{LAST_STDERR[0][-3000:]}")
        if any(len(r["participants"]) != np - 1 for r in steps):
            fail(f"np {np}: a step closed with other than W-b participants")
        if not s["test_accuracy"] > 0.8:
            fail(f"np {np}: accuracy {s['test_accuracy']} with a dropped straggler")


def scenario_shared_catch_ups():
    # Random stragglers at 4 ranks on one node: late ranks are caught up by copying a peer's
    # state out of shared memory (no message, no work for the peer) and then compute the open
    # step; every rank ends with the same parameters.
    rows = train(4, QUICK[:-2] + ["--log-level", "debug", "--steps", "150", "--backup-workers", "1",
                                  "--inject-delay", "one:lognormal:2:1.0"], "shared")
    s = summary(rows)
    log = LAST_STDERR[0]
    if not s["ranks_agree"]:
        fail(f"ranks disagree after shared catch-ups: {s}")
    shared = log.count("(shared memory)")
    if s["catch_ups"] == 0 or shared == 0:
        fail(f"no shared-memory catch-up happened ({s['catch_ups']} catch-ups, {shared} shared "
             f"in the log):\n{log[-3000:]}")
    for bad in ("torn", "could not catch up"):
        if bad in log:
            fail(f"a catch-up went wrong ({bad!r}):\n{log[-3000:]}")
    # A copy may miss a donor that already finished the next step (steps here are tiny): the
    # late rank asks again. That must stay the exception.
    failed = log.count("shared memory to step")
    if failed * 2 > shared:
        fail(f"{failed} of {shared} shared-memory catch-ups failed:\n{log[-3000:]}")


def scenario_straggler_timeout():
    rows = train(3, QUICK + ["--steps", "20", "--straggler-timeout-ms", "15",
                             "--inject-delay", "fixed:1:120"], "timeout")
    s = summary(rows)
    steps = steps_of(rows)
    if not s["ranks_agree"]:
        fail(f"ranks disagree: {s}")
    timed = [r for r in steps if r["participants"] == [0, 2]]
    if len(timed) < len(steps) // 2:
        fail(f"timeout closed only {len(timed)} of {len(steps)} steps without rank 1")
    if max(r["wait_ms"] for r in steps) > 110:
        fail(f"a step waited {max(r['wait_ms'] for r in steps)} ms despite a 15 ms timeout")


def scenario_plain_sync_unchanged_by_delays():
    # b = 0 and no timeout: a straggler only slows the job down, the result bits are the same.
    a = summary(train(3, QUICK + ["--steps", "20"], "plain"))
    b = summary(train(3, QUICK + ["--steps", "20", "--inject-delay", "fixed:1:15"], "plain_slow"))
    if a["param_checksum"] != b["param_checksum"]:
        fail("plain sync with an injected straggler changed the parameters")
    if b["dropped_gradients"] != 0 or b["catch_ups"] != 0:
        fail(f"plain sync dropped gradients: {b}")


def scenario_stranger_refused():
    # A connection to the control port without the job token is refused; the run goes on.
    import re
    import socket
    import time
    path = os.path.join(TMP, "stranger.jsonl")
    cmd = [MPIEXEC, "-np", "2", "--oversubscribe", "--bind-to", "none", RESYNC, "train",
           "--metrics", path] + QUICK[:-2] + ["--steps", "3000", "--log-level", "info"]
    job = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    address = None
    deadline = time.time() + 60
    while address is None and time.time() < deadline:
        line = job.stdout.readline()
        if not line:
            break
        log.append(line)
        m = re.search(r"coordinator listening on ([^ ]+):(\d+)", line)
        if m:
            address = (m.group(1), int(m.group(2)))
    if address is None:
        job.kill()
        fail("the coordinator's address never appeared in the log:\n" + "".join(log[-20:]))
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"\x00" * 64)
        s.settimeout(10)
        try:
            closed = s.recv(1) == b""
        except ConnectionResetError:
            closed = True
    if not closed:
        job.kill()
        fail("the coordinator kept a connection that presented no job token")
    out, _ = job.communicate(timeout=240)
    log.append(out)
    text = "".join(log)
    if job.returncode != 0:
        fail(f"the run did not survive a stranger's connection (exit {job.returncode}):\n{text[-3000:]}")
    if "refus" not in text:
        fail("the refused connection was not logged")
    if not summary([json.loads(l) for l in open(path)])["ranks_agree"]:
        fail("ranks disagree")


def scenario_device_cuda_without_gpu():
    """`--device cuda` where no GPU can be used: exit 1 and one error line on every rank count,
    for mlp and for gpt (whose layers all have device twins, so the device is what is missing)."""
    info = subprocess.run([MPIEXEC, "-np", "1", RESYNC, "info"], env=ENV, capture_output=True,
                          text=True, timeout=60)
    if "no CUDA device" not in info.stdout and "CUDA:    not built" not in info.stdout and \
            "no CUDA support" not in info.stdout:
        print("SKIPPED: this machine has a CUDA device (the GPU tests cover it)")
        sys.exit(77)
    text = os.path.join(TMP, "text.txt")
    with open(text, "w") as f:
        f.write("In the beginning was the word, and the word was with the bytes. " * 40)
    gpt = ["--model", "gpt", "--data", f"text:{text}", "--n-layer", "1", "--n-head", "2",
           "--n-embd", "16", "--context", "16", "--batch-size", "4", "--log-level", "warn"]
    for np, model_args in ((1, QUICK), (2, QUICK), (1, gpt), (2, gpt)):
        p = run(np, ["train", "--device", "cuda"] + model_args + ["--steps", "3"])
        what = f"--device cuda {'--model gpt ' if model_args is gpt else ''}without a GPU at np {np}"
        if p.returncode != 1:
            fail(f"{what} exited {p.returncode}, expected 1\n{p.stderr[-2000:]}")
        ours = [l for l in p.stderr.splitlines() if l.startswith("resync: error")]
        if len(ours) != 1 or "cuda" not in ours[0].lower():
            fail(f"expected one 'resync: error' line about CUDA ({what}), got {ours}")
        # The gpt's layers all have device twins now: the refusal is the missing device.
        if "implementation" in ours[0]:
            fail(f"{what}: refused by the device plan, not for the missing device: {ours[0]}")
    expect_bad_input(1, ["train", "--collective", "nccl"] + QUICK, "--device cuda")


def checkpoint_values(path):
    """The step, parameters and momentum of a checkpoint file (runtime/io/checkpoint.h)."""
    data = open(path, "rb").read()
    if data[:8] != b"RSYNCKPT":
        fail(f"{path} is not a checkpoint")
    off = 24
    step, _world, _reserved, _seed, _batch, model_len = struct.unpack_from("<QIIQQI", data, off)
    off += 36 + model_len
    values = []
    for _ in range(2):  # parameters, then the optimizer state
        (n,) = struct.unpack_from("<Q", data, off)
        off += 8
        values.append(array.array("f", data[off:off + 4 * n]))
        off += 4 * n
    return step, values[0], values[1]


def scenario_diverging():
    # lr 100 with weight decay 1 multiplies the parameters by about -99 per step: they overflow
    # within about 8 steps (lr 100 alone only kills every ReLU and stays finite). The NaN loss or
    # gradient must end the whole job at once: exit 1, one line naming the step and the rank, no
    # hang, and no checkpoint written from the non-finite state (one is written after every
    # finite step).
    d = os.path.join(TMP, "ck")
    args = QUICK + ["--lr", "100", "--weight-decay", "1", "--steps", "2000", "--checkpoint-dir",
                    d, "--checkpoint-every", "1", "--checkpoint-keep", "1000000"]
    t0 = time.time()
    p = run(2, ["train"] + args, timeout=90)
    elapsed = time.time() - t0
    if p.returncode != 1:
        fail(f"a diverging run exited {p.returncode}, expected 1\n{p.stderr[-3000:]}")
    ours = [line for line in p.stderr.splitlines() if line.startswith("resync: error")]
    if len(ours) != 1:
        fail(f"expected one 'resync: error' line, got {ours}\n{p.stderr[-3000:]}")
    m = re.fullmatch(r"resync: error: non-finite (\S+ )*\((.+?)\) at step (\d+) on rank (\d+)",
                     ours[0])
    if not m:
        fail(f"the error line does not name a non-finite value, its step and rank: {ours[0]}")
    step, rank = int(m.group(3)), int(m.group(4))
    if rank not in (0, 1) or step >= 2000:
        fail(f"the error names step {step} on rank {rank}: {ours[0]}")
    files = sorted(f for f in os.listdir(d) if f.endswith(".rsck")) if os.path.isdir(d) else []
    for name in files:
        ck_step, params, momentum = checkpoint_values(os.path.join(d, name))
        bad = [v for v in list(params) + list(momentum) if v != v or v in (float("inf"),
                                                                            float("-inf"))]
        if bad:
            fail(f"checkpoint {name} (step {ck_step}) holds {len(bad)} non-finite values")
        if ck_step > step:
            fail(f"checkpoint {name} is of step {ck_step}, after the failing step {step}")
    print(f"diverged: {ours[0]} after {elapsed:.1f} s; {len(files)} finite checkpoints before it")


def scenario_overlap():
    # Plain sync with the gradient all-reduced in buckets during the backward pass: replicas agree,
    # the result is deterministic for a seed, it learns like the step without overlap, and with
    # backup workers the step keeps its protocol (a warning, no overlap).
    args = ["--data", "synthetic", "--synthetic-train", "4000", "--synthetic-test", "1000",
            "--hidden", "256,128", "--batch-size", "32", "--steps", "60", "--seed", "5",
            "--bucket-kib", "64", "--log-level", "info", "--progress", "off"]
    for np in (2, 3):
        a = summary(train(np, args + ["--overlap", "on"], f"ov_a{np}"))
        if "buckets overlapped with the backward pass" not in LAST_STDERR[0]:
            fail(f"np {np}: --overlap on did not overlap:\n{LAST_STDERR[0][-2000:]}")
        b = summary(train(np, args + ["--overlap", "on"], f"ov_b{np}"))
        off = summary(train(np, args + ["--overlap", "off"], f"ov_off{np}"))
        if not (a["ranks_agree"] and b["ranks_agree"]):
            fail(f"np {np}: ranks disagree with overlap")
        if a["param_checksum"] != b["param_checksum"]:
            fail(f"np {np}: overlap is not deterministic: {a['param_checksum']} "
                 f"{b['param_checksum']}")
        if abs(a["test_accuracy"] - off["test_accuracy"]) > 0.02:
            fail(f"np {np}: accuracy {a['test_accuracy']} with overlap, {off['test_accuracy']} "
                 f"without")
    train(3, args + ["--overlap", "on", "--backup-workers", "1"], "ov_backup")
    if "--overlap on: not with backup workers" not in LAST_STDERR[0]:
        fail(f"--overlap on with backup workers did not say it keeps the protocol:\n"
             f"{LAST_STDERR[0][-2000:]}")


# AdamW with every option: warm-up, cosine decay and clipping of the averaged gradient.
ADAMW = ["--optimizer", "adamw", "--lr", "0.003", "--grad-clip", "1", "--warmup-steps", "5",
         "--lr-schedule", "cosine", "--min-lr", "0.0003"]


def scenario_adamw():
    # Plain sync with AdamW: deterministic for a seed at np 1 and 3, ranks agree, it learns the
    # synthetic set, and it is another optimizer than SGD (other parameters).
    adamw = {}
    for np in (1, 3):
        a = adamw[np] = summary(train(np, QUICK + ADAMW + ["--steps", "40", "--seed", "5"],
                                      f"aw_a{np}"))
        b = summary(train(np, QUICK + ADAMW + ["--steps", "40", "--seed", "5"], f"aw_b{np}"))
        if a["param_checksum"] != b["param_checksum"]:
            fail(f"np {np}: AdamW, same seed, different checksums {a['param_checksum']} "
                 f"{b['param_checksum']}")
        if not (a["ranks_agree"] and b["ranks_agree"]):
            fail(f"np {np}: ranks disagree with AdamW")
    sgd = summary(train(1, QUICK + ["--steps", "40", "--seed", "5"], "aw_sgd1"))
    if sgd["param_checksum"] == adamw[1]["param_checksum"]:
        fail("--optimizer adamw gave SGD's parameters")
    rows = train(2, QUICK + ADAMW + ["--epochs", "2"], "aw_learn")
    s = summary(rows)
    if not s["test_accuracy"] > 0.9:
        fail(f"AdamW did not learn the synthetic set: test accuracy {s['test_accuracy']}")
    losses = [r["loss"] for r in steps_of(rows)]
    if not sum(losses[-10:]) < sum(losses[:10]):
        fail(f"AdamW's loss did not decrease: first {losses[:10]}, last {losses[-10:]}")


def scenario_adamw_catch_ups():
    # Backup workers with AdamW: a slow rank left out and caught up, and random stragglers caught
    # up from a node peer's shared memory; AdamW's two buffers travel in every catch-up and the
    # ranks end bit for bit equal.
    rows = train(3, QUICK + ADAMW + ["--steps", "80", "--backup-workers", "1",
                                     "--inject-delay", "fixed:2:40"], "aw_bw3")
    s = summary(rows)
    if not s["ranks_agree"]:
        fail(f"np 3: ranks disagree after AdamW catch-ups: {s}")
    if s["dropped_gradients"] == 0:
        fail(f"np 3: the slow rank was never left out: {s}")
    rows = train(4, QUICK[:-2] + ADAMW + ["--log-level", "debug", "--steps", "150",
                                          "--backup-workers", "1",
                                          "--inject-delay", "one:lognormal:2:1.0"], "aw_shared")
    s = summary(rows)
    log = LAST_STDERR[0]
    if not s["ranks_agree"]:
        fail(f"np 4: ranks disagree after AdamW shared catch-ups: {s}")
    shared = log.count("(shared memory)")
    if s["catch_ups"] == 0 or shared == 0:
        fail(f"np 4: no shared-memory catch-up happened ({s['catch_ups']} catch-ups, {shared} "
             f"shared in the log):\n{log[-3000:]}")
    for bad in ("torn", "could not catch up"):
        if bad in log:
            fail(f"a catch-up went wrong ({bad!r}):\n{log[-3000:]}")
    if not s["test_accuracy"] > 0.8:
        fail(f"np 4: accuracy {s['test_accuracy']} with AdamW and stragglers")


globals()["scenario_" + SCENARIO]()
print(f"PASS [{SCENARIO}]")
