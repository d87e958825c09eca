#!/usr/bin/env python3
"""`resync bench step` end to end: the cpu step prints a samples/s figure; `--device cuda` either
measures (with the cpu figure beside it) or, without a device or without CUDA in the build, exits 1
with one line naming the reason.

Usage: bench_step_test.py RESYNC_BINARY SCENARIO   (SCENARIO: cpu | cuda)
"""
import re
import subprocess
import sys

RESYNC, SCENARIO = sys.argv[1], sys.argv[2]
QUICK = ["--batch-size", "16", "--iters", "3", "--warmup", "1", "--hidden", "32"]
# device, batch, iters, ms/step, samples/s, tokens/s, loss, model
ROW = re.compile(r"^\s+(cpu|cuda:\d+)\s+16\s+3\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.naif-]+)\s+(\S.*)$")
GPT_SHAPE = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--context", "16"]


def fail(msg):
    print(f"FAIL [{SCENARIO}]: {msg}", file=sys.stderr)
    sys.exit(1)


def run(args):
    return subprocess.run([RESYNC] + args, capture_output=True, text=True, timeout=120)


def rows(p):
    found = {}
    for line in p.stdout.splitlines():
        m = ROW.match(line)
        if m:
            found[m.group(1)] = float(m.group(3))
    return found


def scenario_cpu():
    for model in ("mlp", "cnn", "gpt"):
        shape = GPT_SHAPE if model == "gpt" else []
        p = run(["bench", "step", "--device", "cpu", "--model", model] + QUICK + shape)
        if p.returncode != 0:
            fail(f"bench step --model {model} exited {p.returncode}\n{p.stderr}")
        r = rows(p)
        if list(r) != ["cpu"] or not r["cpu"] > 0:
            fail(f"--model {model}: expected one cpu row with samples/s > 0, got {r}\n{p.stdout}")
        if model not in p.stdout:
            fail(f"the table does not name the model {model}:\n{p.stdout}")
        tokens = [float(ROW.match(l).group(4)) for l in p.stdout.splitlines() if ROW.match(l)]
        per_sample = 16 if model == "gpt" else 1  # gpt: a label per position of --context 16
        if abs(tokens[0] / r["cpu"] - per_sample) > 1e-3 * per_sample:
            fail(f"--model {model}: tokens/s {tokens[0]} is not {per_sample} x samples/s {r['cpu']}")
    p = run(["bench", "step", "--device", "tpu"])
    if p.returncode != 2:
        fail(f"--device tpu exited {p.returncode}, expected 2 (bad input)\n{p.stderr}")


def scenario_cuda():
    info = run(["info"]).stdout
    p = run(["bench", "step", "--device", "cuda"] + QUICK)
    if "CUDA:    not built" in info:
        expected = "this build has no CUDA support"
    elif "no CUDA device available" in info:
        expected = "no CUDA device is available ("
    else:
        if p.returncode != 0:
            fail(f"bench step --device cuda exited {p.returncode} on a GPU machine\n{p.stderr}")
        r = rows(p)
        if "cpu" not in r or not any(k.startswith("cuda:") for k in r):
            fail(f"expected a cuda row and the cpu figure beside it, got {r}\n{p.stdout}")
        return
    if p.returncode != 1:
        fail(f"exited {p.returncode}, expected 1\nstdout: {p.stdout}\nstderr: {p.stderr}")
    err = p.stderr.strip().splitlines()
    if len(err) != 1 or expected not in err[0]:
        fail(f"expected one stderr line containing '{expected}', got {err}")
    if p.stdout.strip():
        fail(f"nothing should be printed to stdout, got:\n{p.stdout}")


{"cpu": scenario_cpu, "cuda": scenario_cuda}[SCENARIO]()
print(f"bench_step_test {SCENARIO}: ok")
