#!/usr/bin/env python3
"""`cmake --install` of a resync build, then an outside project built against it.

Installs the build into a temporary prefix; checks the installed `resync` runs (`resync info`);
configures and builds docs/examples/custom_model with CMAKE_PREFIX_PATH=<prefix> (its
CMakeLists.txt does find_package(resync REQUIRED)); trains its own model ("tanh-net") under
mpirun -np 2 on synthetic data and checks the metrics summary; checks a bad --model still exits 2.
Every failure names the step and what differed.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

STEPS = 20


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def run(step, cmd, timeout, expect=0, env=None):
    print(f"[{step}] {' '.join(cmd)}", flush=True)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        fail(f"{step}: still running after {timeout} s")
    if p.returncode != expect:
        fail(f"{step}: exit code {p.returncode}, expected {expect}\n"
             f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


def main():
    ap = argparse.ArgumentParser()
    for flag in ["--cmake", "--build-dir", "--config", "--example", "--mpiexec", "--cxx"]:
        ap.add_argument(flag, required=True)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="resync_install_")
    try:
        prefix = os.path.join(tmp, "prefix")
        install_cmd = [a.cmake, "--install", a.build_dir, "--prefix", prefix]
        if a.config:
            install_cmd += ["--config", a.config]
        run("install", install_cmd, 120)
        for rel in ["bin/resync", "lib/libresync_runtime.a", "include/resync/runtime/io/cli.h",
                    "include/resync/models/model.h", "lib/cmake/resync/resyncConfig.cmake",
                    "lib/cmake/resync/resyncConfigVersion.cmake",
                    "lib/cmake/resync/resyncTargets.cmake"]:
            if not os.path.exists(os.path.join(prefix, rel)):
                fail(f"install: {rel} missing under the prefix {prefix}")

        info = run("installed resync info", [os.path.join(prefix, "bin/resync"), "info"], 60)
        if not info.stdout.startswith("resync ") or "MPI:" not in info.stdout:
            fail(f"installed resync info: unexpected output:\n{info.stdout}")

        build = os.path.join(tmp, "build")
        run("configure example",
            [a.cmake, "-S", a.example, "-B", build, f"-DCMAKE_PREFIX_PATH={prefix}",
             f"-DCMAKE_CXX_COMPILER={a.cxx}", "-DCMAKE_BUILD_TYPE=Release"], 120)
        run("build example", [a.cmake, "--build", build, "-j2"], 180)
        example = os.path.join(build, "custom_model")

        metrics = os.path.join(tmp, "metrics.jsonl")
        train = run("train tanh-net under mpirun -np 2",
                    [a.mpiexec, "-np", "2", "--oversubscribe", "--bind-to", "none", example,
                     "train", "--model", "tanh-net", "--hidden", "32", "--data", "synthetic",
                     "--synthetic-train", "2000", "--synthetic-test", "500", "--steps",
                     str(STEPS), "--batch-size", "32", "--metrics", metrics], 120)
        if "tanh-net 784-32-10" not in train.stdout + train.stderr:
            fail("train: the log does not name the custom model 'tanh-net 784-32-10'")
        rows = [json.loads(line) for line in open(metrics)]
        summary = rows[-1] if rows else {}
        if summary.get("event") != "summary":
            fail(f"train: last metrics record is not the summary: {summary}")
        if summary.get("steps") != STEPS:
            fail(f"train: summary steps {summary.get('steps')}, expected {STEPS}")
        if summary.get("ranks_agree") is not True:
            fail(f"train: ranks_agree {summary.get('ranks_agree')}, expected true")
        # Ten classes: chance is 0.1. Twenty steps of the tanh net reach ~0.6 on this data.
        if not summary.get("test_accuracy", 0) > 0.2:
            fail(f"train: test_accuracy {summary.get('test_accuracy')}, expected > 0.2 "
                 "(the custom model did not learn)")

        bad = run("unknown model", [example, "train", "--model", "no-such-model"], 60, expect=2)
        if "tanh-net" not in bad.stderr:
            fail(f"unknown model: the error does not list the registered models:\n{bad.stderr}")
        print(f"install: prefix, `resync info`, example build, {STEPS} steps of tanh-net at "
              f"np 2 (test accuracy {summary['test_accuracy']}) and the bad-model check passed")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
