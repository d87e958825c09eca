#!/usr/bin/env python3
"""The GPU check: runs resync's CUDA path from a prepared bundle and prints PASS/FAIL/SKIP lines.

Started by scripts/gpu/check.sh (see its header and the README's "GPU check"); the bundle comes
from scripts/gpu/prepare.sh. Standard library only: it runs on the bare GPU node's python3.

  check.py [--bundle DIR] [--out DIR] [--work DIR] [--budget-s 360] [--only STEP,...]
           [--models gpt,mlp,cnn] [--no-dpkg] [--keep-work]
  check.py --make-cpu-ref FILE [...]     (prepare.sh: the CPU reference figures, same runner)

Steps (--only takes these names): libs, info, tests, train, bench. Each check prints one line
  PASS|FAIL|SKIP  <name>  <figures or reason>
then a summary; the exit code is 1 if any check FAILed, else 0. Where no GPU is usable, every
check that needs one is a SKIP naming the reason, and the run goes on. Checks not started before
--budget-s seconds have passed are SKIPs too, so the whole run ends inside the device's 10-minute
command limit. Full logs, metrics files and the summary go to --out (default $OUT, which the
device tool returns, else .gpu-check-out/): check.log, summary.txt, logs.tar.gz.
"""
import argparse
import glob
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# One epoch of each; the CPU reference (prepare.sh) runs the same list with --device cpu.
# (name, ranks, extra flags, CPU reference key, tolerance factor)
TRAIN_CONFIGS = [
    ("np1", 1, [], "np1", 1),
    ("np2", 2, [], "np2", 1),
    ("np3", 3, [], "np3", 1),
    # Rank 2 sleeps 10 ms before every READY: with one backup worker the steps close without it.
    # Which gradients are dropped depends on timing, so two runs differ even on the CPU (cnn:
    # 0.8442 and 0.8616 in a rehearsal): twice the tolerance.
    ("np3-backup1-straggler", 3, ["--backup-workers", "1", "--inject-delay", "fixed:2:10"],
     "np3-backup1-straggler", 2),
    ("np1-nccl", 1, ["--collective", "nccl"], "np1", 1),  # NCCL needs cuda: CPU np1 is its twin
]
NOISE_SEEDS = [2, 3]  # extra CPU np1 runs (seeds 2, 3 beside 1) measure one epoch's spread
MIN_ACC_TOL = 0.015   # the accuracy tolerance is max(this, the spread over seeds 1-3)
# Accuracy after one epoch below which a run has not learned (cnn ~0.86, mlp ~0.84 on the CPU).
MIN_ACC = {"mlp": 0.75, "cnn": 0.75}

# gpt (--models gpt): a short AdamW run of the default shape (L4 H4 C128 T128, 842,496
# parameters) on the bundle's text (the first 1 MB of the King James Bible), np 1 and np 2 (two
# ranks sharing the GPU over the host-staged ring), against the same runs with --device cpu
# (prepare.sh). Same seed, data order and initial parameters: the step-0 loss must agree to
# rounding, the validation loss after GPT_STEPS steps within GPT_LOSS_TOL nats (rounding grows
# over the steps; the CPU's own spread over seeds is in the reference as a guide).
GPT_STEPS = 150
GPT_CONTEXT = 128
GPT_FLAGS = ["--steps", str(GPT_STEPS), "--context", str(GPT_CONTEXT), "--batch-size", "16",
             "--optimizer", "adamw", "--lr",
             "1e-3", "--warmup-steps", "20", "--lr-schedule", "cosine", "--min-lr", "1e-4",
             "--weight-decay", "0.1", "--grad-clip", "1"]
GPT_CONFIGS = [("np1", 1), ("np2", 2)]
GPT_NOISE_SEEDS = [2]  # an extra CPU np1 run: how much the validation loss moves with the seed
GPT_LOSS_TOL = 0.05    # nats, validation loss, cuda vs cpu
GPT_STEP0_RTOL = 1e-3  # relative, the first step's loss (rank 0's batch), cuda vs cpu
GPT_MAX_LOSS = 3.0     # nats: below the byte-frequency plateau (~3.1), the model uses context

GTESTS = [
    # (name, binary, ranks or None for a direct run, needs a device to PASS rather than SKIP)
    ("cuda_kernels_test", "cuda_kernels_test", None),
    ("device_model_cuda_test", "device_model_cuda_test", None),  # gpt loss + every gradient
    ("replica_cuda_test", "replica_cuda_test", None),
    ("cuda_context_test", "cuda_context_test", None),
    ("nccl_allreduce_gpu_test.np1", "nccl_allreduce_gpu_test", 1),
    ("nccl_allreduce_gpu_test.np2", "nccl_allreduce_gpu_test", 2),  # skips: one GPU, two ranks
    ("nccl_allreduce_test.np2", "nccl_allreduce_test", 2),
]

# What the bundle leaves to the node (see prepare.sh), looked for where ldd is missing.
CUDA_SONAMES = ["libcublas.so.13", "libcublasLt.so.13", "libnccl.so.2"]

MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_plm": "isolated",          # one node: no ssh/rsh agent needed (none on the node)
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMPI_MCA_pml": "ob1",
    "OMPI_MCA_btl": "self,vader,tcp",
    "OMPI_MCA_btl_tcp_if_include": "lo",
    "OMPI_MCA_oob_tcp_if_include": "lo",
    "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
    "OMPI_MCA_btl_base_warn_component_unused": "0",
}


class Check:
    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.results = []  # (status, name, detail)
        self.bundle = os.path.abspath(args.bundle)
        self.work = os.path.abspath(args.work)
        self.out = os.path.abspath(args.out)
        self.logs = os.path.join(self.work, "logs")
        self.root = os.path.join(self.work, "root")  # the unpacked Debian packages
        self.bin = None
        self.env = None          # environment of every resync / mpirun process
        self.gpu = None          # None: not known yet; True / False after `resync info`
        self.no_gpu_reason = ""
        self.ready = False       # the libraries resolve
        self.cpu_ref = {}
        self.manifest = {}
        self.log_file = None

    # ---- output -------------------------------------------------------------------------
    def say(self, line=""):
        print(line, flush=True)
        if self.log_file:
            self.log_file.write(line + "\n")
            self.log_file.flush()

    def record(self, status, name, detail=""):
        self.results.append((status, name, detail))
        self.say(f"{status:<5} {name:<34} {detail}".rstrip())

    def elapsed(self):
        return time.monotonic() - self.t0

    def over_budget(self, name):
        if self.elapsed() > self.args.budget_s:
            self.record("SKIP", name, f"time budget ({self.args.budget_s:.0f} s) spent")
            return True
        return False

    def log_path(self, name):
        return os.path.join(self.logs, re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".log")

    # ---- processes ----------------------------------------------------------------------
    def run(self, name, cmd, timeout, env=None, cwd=None):
        """Runs cmd in its own session (so a timeout kills mpirun and every rank); returns
        (exit code or 'timeout', combined output). The output is kept in logs/<name>.log."""
        env = self.env if env is None else env
        if not self.args.make_cpu_ref:  # never run far past the budget
            timeout = max(30.0, min(timeout, self.args.budget_s + 60 - self.elapsed()))
        t = time.monotonic()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                             cwd=cwd or self.work, start_new_session=True, text=True,
                             errors="replace")
        try:
            out, _ = p.communicate(timeout=timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
            rc = "timeout"
        with open(self.log_path(name), "w") as f:
            f.write(f"$ {' '.join(cmd)}\n# exit {rc} after {time.monotonic() - t:.1f} s\n{out}")
        return rc, out

    def mpirun(self, np_, argv):
        return [self.mpirun_path, "-np", str(np_), "--oversubscribe", "--bind-to", "none"] + argv

    # ---- set-up: unpack and resolve -----------------------------------------------------
    def unpack(self):
        t = time.monotonic()
        debs = sorted(glob.glob(os.path.join(self.bundle, "debs", "*.deb")))
        if not debs:
            raise RuntimeError(f"no .deb files under {self.bundle}/debs (run prepare.sh)")
        shutil.rmtree(self.root, ignore_errors=True)
        os.makedirs(self.root)
        use_dpkg = shutil.which("dpkg") and not self.args.no_dpkg
        if use_dpkg:
            for d in debs:
                subprocess.run(["dpkg", "-x", d, self.root], check=True)
        else:
            subprocess.run([sys.executable, os.path.join(HERE, "deb_extract.py"), self.root] + debs,
                           check=True)
        bins_tar = os.path.join(self.bundle, "bin.tar.xz")
        if os.path.exists(bins_tar):
            self.bin = os.path.join(self.work, "bin")
            shutil.rmtree(self.bin, ignore_errors=True)
            with tarfile.open(bins_tar) as tar:
                tar.extractall(self.work)
        else:
            self.bin = os.path.join(self.bundle, "bin")
        return len(debs), time.monotonic() - t, "dpkg -x" if use_dpkg else "deb_extract.py"

    def cuda_lib_dirs(self):
        """Directories that may hold cuBLAS and NCCL on this machine, best first: the toolkit,
        then the nvidia-* wheels PyTorch brings, then the linker cache."""
        dirs = []
        for var in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"):
            if os.environ.get(var):
                dirs += [os.path.join(os.environ[var], "lib64"), os.path.join(os.environ[var], "lib")]
        dirs += ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
        dirs += sorted(glob.glob("/usr/local/cuda-*/lib64"), reverse=True)
        site_dirs = set()
        try:
            r = subprocess.run(["python3", "-c", "import site, sys; print('\\n'.join("
                                "site.getsitepackages() + [site.getusersitepackages()] + sys.path))"],
                               capture_output=True, text=True, timeout=30)
            site_dirs.update(p for p in r.stdout.split() if os.path.isdir(p))
        except (OSError, subprocess.SubprocessError):
            pass
        site_dirs.update(glob.glob("/opt/*/.venv/lib/python3*/site-packages"))
        site_dirs.update(glob.glob("/usr/local/lib/python3*/dist-packages"))
        for sp in sorted(site_dirs):
            dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "lib")))
            dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "*", "lib")))
        dirs += ["/usr/lib/x86_64-linux-gnu", "/usr/lib64"]
        seen, out = set(), []
        for d in dirs:
            if os.path.isdir(d) and os.path.realpath(d) not in seen:
                seen.add(os.path.realpath(d))
                out.append(d)
        return out

    def build_env(self, extra_dirs):
        lib = os.path.join(self.root, "usr", "lib", "x86_64-linux-gnu")
        bundle_dirs = [os.path.join(lib, "openmpi", "lib"), lib,
                       os.path.join(self.root, "lib", "x86_64-linux-gnu"),
                       os.path.join(lib, "openblas-pthread"), os.path.join(lib, "pmix2", "lib"),
                       os.path.join(self.root, "usr", "lib", "libpsm1")]
        dirs = [d for d in bundle_dirs if os.path.isdir(d)] + extra_dirs
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("OMPI_", "OPAL_", "PMIX_", "PRTE_"))}
        env.update(MPI_ENV)
        env["LD_LIBRARY_PATH"] = ":".join(dirs)
        env["PATH"] = os.path.join(self.root, "usr", "bin") + ":" + os.environ.get("PATH", "/usr/bin:/bin")
        # A relocated Open MPI (Debian's, configured for /usr) and its external PMIx.
        env["OPAL_PREFIX"] = os.path.join(self.root, "usr")
        env["OPAL_SYSCONFDIR"] = os.path.join(self.root, "etc", "openmpi")
        pmix = os.path.join(lib, "pmix2")
        env.update({"PMIX_PREFIX": pmix, "PMIX_LIBDIR": os.path.join(pmix, "lib"),
                    "PMIX_PKGLIBDIR": os.path.join(pmix, "lib", "pmix"),
                    "PMIX_DATADIR": os.path.join(pmix, "share"),
                    "PMIX_PKGDATADIR": os.path.join(pmix, "share", "pmix"),
                    "PMIX_SYSCONFDIR": os.path.join(pmix, "share"),
                    "PMIX_MCA_mca_base_component_path": os.path.join(pmix, "lib", "pmix")})
        env["TMPDIR"] = os.path.join(self.work, "tmp")
        os.makedirs(env["TMPDIR"], exist_ok=True)
        if not os.access("/dev/shm", os.W_OK):  # shared-memory transport's files elsewhere
            env["OMPI_MCA_btl_vader_backing_directory"] = env["TMPDIR"]
        return env

    def elf_files(self):
        files = sorted(os.path.join(self.bin, f) for f in os.listdir(self.bin))
        files += [os.path.join(self.root, "usr", "bin", b) for b in ("orterun", "orted")]
        return files

    def ldd_missing(self, env):
        missing, resolved = {}, {}
        if not shutil.which("ldd"):  # not expected (glibc's libc-bin has it): look by name
            for soname in CUDA_SONAMES:
                if not any(os.path.exists(os.path.join(d, soname))
                           for d in env["LD_LIBRARY_PATH"].split(":")):
                    missing[soname] = ["resync"]
            return missing, resolved
        for f in self.elf_files():
            r = subprocess.run(["ldd", f], capture_output=True, text=True, env=env)
            if r.returncode != 0 or "error" in r.stderr:
                # e.g. "error while loading shared libraries: X: file too short"
                err = (r.stderr.strip().splitlines() or [f"ldd exit {r.returncode}"])[-1]
                missing.setdefault(err[-160:], []).append(os.path.basename(f))
            for line in (r.stdout + r.stderr).splitlines():
                m = re.match(r"\s*(\S+) => (.*?)(?: \(0x[0-9a-f]+\))?$", line)
                if m and "not found" in m.group(2):
                    missing.setdefault(m.group(1), []).append(os.path.basename(f))
                elif m:
                    resolved[m.group(1)] = m.group(2)
                elif "not found" in line:  # "version `GLIBCXX_3.4.30' not found (required by ...)"
                    missing.setdefault(line.strip(), []).append(os.path.basename(f))
        return missing, resolved

    def step_libs(self):
        try:
            n_debs, secs, how = self.unpack()
        except Exception as e:  # noqa: BLE001 - reported as one line
            self.record("FAIL", "bundle unpack", str(e))
            return
        self.record("PASS", "bundle unpack", f"{n_debs} .deb files with {how} in {secs:.1f} s")
        self.mpirun_path = os.path.join(self.root, "usr", "bin", "orterun")
        env = self.build_env([])
        missing, _ = self.ldd_missing(env)
        # What the bundle leaves to the machine: cuBLAS and NCCL (hundreds of MB), libc, libstdc++.
        extra = []
        if missing:
            wanted = [m for m in missing if m.startswith("lib")]
            for d in self.cuda_lib_dirs():
                if any(os.path.exists(os.path.join(d, w)) for w in wanted):
                    extra.append(d)
                    wanted = [w for w in wanted if not os.path.exists(os.path.join(d, w))]
                if not wanted:
                    break
        env = self.build_env(extra)
        missing, resolved = self.ldd_missing(env)
        if any("GLIBCXX" in m or "CXXABI" in m or "GCC_" in m for m in missing):
            # This machine's libstdc++ is older than bookworm's: use the one the bundle carries.
            fallback = os.path.join(self.work, "fallback")
            fb_debs = sorted(glob.glob(os.path.join(self.bundle, "debs", "fallback", "*.deb")))
            if fb_debs:
                subprocess.run([sys.executable, os.path.join(HERE, "deb_extract.py"), fallback]
                               + fb_debs, check=True)
                extra.append(os.path.join(fallback, "usr", "lib", "x86_64-linux-gnu"))
                env = self.build_env(extra)
                missing, resolved = self.ldd_missing(env)
                self.say(f"INFO  libstdc++ from the bundle's fallback ({len(fb_debs)} debs)")
        self.env = env
        where = {k: resolved.get(k, "?") for k in ("libcublas.so.13", "libnccl.so.2", "libmpi.so.40",
                                                  "libopenblas.so.0", "libstdc++.so.6")}
        for k, v in where.items():
            self.say(f"INFO  {k:<18} {v}")
        if missing:
            detail = "; ".join(f"{k} (needed by {', '.join(sorted(set(v))[:3])})"
                               for k, v in sorted(missing.items()))
            self.record("FAIL", "libraries resolve", detail)
            return
        outside = [f"{k} => {v}" for k, v in resolved.items()
                   if not v.startswith((self.root, self.work)) and not any(
                       v.startswith(d) for d in extra) and not re.search(
                       r"/(libc|libm|libdl|librt|libpthread|ld-linux-x86-64|libstdc\+\+|libgcc_s)"
                       r"\.so", v)]
        if outside:
            self.say("INFO  from the machine, not the bundle: " + "; ".join(sorted(outside)))
        self.ready = True
        self.record("PASS", "libraries resolve",
                    f"{len(self.elf_files())} programs; cuBLAS/NCCL from "
                    f"{', '.join(extra) if extra else 'the bundle/system'}")

    # ---- resync info ----------------------------------------------------------------------
    def step_info(self):
        rc, out = self.run("info", self.mpirun(1, [self.resync, "info"]), 60)
        cuda = [l.strip() for l in out.splitlines()
                if l.startswith(("CUDA:", "MPI:", "BLAS:")) or l.startswith(" " * 9)]
        for l in cuda:
            self.say(f"INFO  {l}")
        if rc != 0:
            self.record("FAIL", "resync info (mpirun -np 1)", f"exit {rc}: {out.strip()[-300:]}")
            self.gpu = False
            self.no_gpu_reason = "resync info failed"
            return
        devices = re.findall(r"device (\d+): (.*)", out)
        none = re.search(r"no CUDA device available \((.*)\)", out)
        cuda_line = next((l for l in cuda if l.startswith("CUDA:")), "CUDA: (no line)")
        cuda_line = cuda_line.split(":", 1)[1].strip()
        if self.args.rehearse_on_cpu:
            self.gpu = True  # every GPU check runs with --device cpu: rehearses the runner
            self.record("SKIP" if not devices else "PASS", "resync info",
                        f"{cuda_line}; REHEARSAL: GPU checks run with --device cpu")
        elif devices:
            self.gpu = True
            self.record("PASS", "resync info", f"{cuda_line}; device {devices[0][1]}")
        else:
            self.gpu = False
            why = none.group(1) if none else "none listed"
            code = re.search(r"\((cuda\w+)\)", why)
            self.no_gpu_reason = f"no device ({code.group(1) if code else why})"
            if "CUDA:" not in out:
                self.record("FAIL", "resync info", "built without CUDA (no 'CUDA:' line)")
            else:
                self.record("SKIP", "resync info (device)", f"{self.no_gpu_reason}; {cuda_line}")

    # ---- gtest binaries -------------------------------------------------------------------
    def step_tests(self):
        for name, binary, np_ in GTESTS:
            if self.over_budget(f"test {name}"):
                continue
            path = os.path.join(self.bin, binary)
            if not os.path.exists(path):
                self.record("FAIL", f"test {name}", f"{binary} is not in the bundle")
                continue
            cmd = [path] if np_ is None else self.mpirun(np_, [path])
            t = time.monotonic()
            rc, out = self.run(f"test-{name}", cmd + ["--gtest_color=no"], 180)
            secs = time.monotonic() - t
            ran = re.search(r"\[==========\] (\d+) tests? from .* ran", out)
            passed = re.search(r"\[  PASSED  \] (\d+) test", out)
            skipped = re.search(r"\[  SKIPPED \] (\d+) test", out)
            failed = re.findall(r"\[  FAILED  \] (\S+)", out)
            n_run = int(ran.group(1)) if ran else 0
            n_pass = int(passed.group(1)) if passed else 0
            n_skip = int(skipped.group(1)) if skipped else 0
            figures = f"{n_pass} passed, {n_skip} skipped of {n_run} in {secs:.1f} s"
            if rc != 0 or failed:
                names = ", ".join(sorted(set(failed))[:4])
                self.record("FAIL", f"test {name}", f"exit {rc}; {figures}; failed: {names}")
            elif n_run > 0 and n_skip == n_run:
                reason = re.search(r"Skipped\s*\n?(.*)", out)
                why = reason.group(1).strip() if reason else ""
                code = re.search(r"\((cuda\w+)\)", why)
                why = self.no_gpu_reason or (f"no CUDA device ({code.group(1)})" if code
                                             else why[:120])
                self.record("SKIP", f"test {name}", f"{figures} ({why})")
            else:
                self.record("PASS", f"test {name}", figures)

    # ---- training -------------------------------------------------------------------------
    def train(self, name, device, model, np_, extra, seed=1, timeout=180):
        metrics = os.path.join(self.logs, f"{name}.jsonl")
        if os.path.exists(metrics):
            os.remove(metrics)
        data = ["--data", f"text:{self.text}"] + GPT_FLAGS if model == "gpt" else \
            ["--data", f"idx:{self.data}", "--epochs", "1"]
        argv = [self.resync, "train", "--device", device, "--model", model] + data + [
                "--seed", str(seed), "--metrics", metrics, "--log-level", "warn",
                "--progress", "off"] + extra
        t = time.monotonic()
        rc, out = self.run(name, self.mpirun(np_, argv), timeout)
        wall = time.monotonic() - t
        if rc != 0 or not os.path.exists(metrics):
            lines = [l for l in out.splitlines() if "error" in l.lower()] or out.splitlines()[-3:]
            return None, f"exit {rc} after {wall:.0f} s: {' | '.join(lines[-2:])[:300]}"
        rows = [json.loads(l) for l in open(metrics) if l.strip()]
        summary = next((r for r in reversed(rows) if r.get("event") == "summary"), None)
        if summary is None:
            return None, "no summary record in the metrics"
        steps = [r for r in rows if r.get("event") == "step"]
        evals = [r for r in rows if r.get("event") == "eval"]
        fig = {"acc": summary.get("test_accuracy"), "agree": summary.get("ranks_agree"),
               "loss": evals[-1].get("test_loss") if evals else None,
               "bpb": evals[-1].get("test_bits_per_byte") if evals else None,
               "step0_loss": steps[0].get("loss") if steps else None,
               "sps": summary.get("samples_per_s"), "steps": summary.get("steps"),
               "checksum": summary.get("param_checksum"),
               "dropped": summary.get("dropped_gradients"), "catch_ups": summary.get("catch_ups"),
               "wall_s": round(wall, 1)}
        for key in ("step_ms", "compute_ms", "comm_ms", "wait_ms"):
            vals = [r[key] for r in steps[len(steps) // 10:] if key in r]  # the first 10% warm up
            fig[key] = statistics.fmean(vals) if vals else None
        return fig, ""

    def step_train(self):
        for model in self.models:
            if model == "gpt":
                self.train_gpt()
                continue
            for cfg, np_, extra, ref_key, tol_factor in TRAIN_CONFIGS:
                name = f"train {model} {cfg}"
                if not self.gpu:
                    self.record("SKIP", name, self.no_gpu_reason)
                    continue
                if self.args.rehearse_on_cpu and "--collective" in extra:
                    self.record("SKIP", name, "REHEARSAL: NCCL needs --device cuda")
                    continue
                if self.over_budget(name):
                    continue
                fig, err = self.train(f"{self.device}-{model}-{cfg}", self.device, model, np_,
                                      extra)
                if fig is None:
                    self.record("FAIL", name, err)
                    continue
                ref = self.cpu_ref.get(f"{model}.{ref_key}")
                tol = tol_factor * self.cpu_ref.get(f"{model}.tolerance", MIN_ACC_TOL)
                problems = []
                if fig["agree"] is not True:
                    problems.append("replicas DISAGREE")
                if fig["acc"] is None or fig["acc"] < MIN_ACC[model]:
                    problems.append(f"accuracy {fig['acc']} below {MIN_ACC[model]}")
                cmp = "no CPU reference"
                if ref:
                    diff = fig["acc"] - ref["acc"]
                    cmp = f"CPU {ref['acc']:.4f} ({diff:+.4f}, tolerance {tol:.4f})"
                    if abs(diff) > tol:
                        problems.append(f"accuracy {fig['acc']:.4f} vs CPU {ref['acc']:.4f}")
                if "backup" in cfg and not fig["dropped"]:
                    problems.append("no gradient dropped: the straggler was waited for")
                share = ""
                if fig["step_ms"] and fig["comm_ms"] is not None and np_ > 1:
                    share = (f", exchange {fig['comm_ms']:.3f} of {fig['step_ms']:.3f} ms/step "
                             f"({100 * fig['comm_ms'] / fig['step_ms']:.0f}%)")
                detail = (f"acc {fig['acc']:.4f} vs {cmp}; agree {fig['agree']}; "
                          f"{fig['sps']:.0f} samples/s; {fig['steps']} steps{share}; "
                          f"dropped {fig['dropped']}, catch-ups {fig['catch_ups']}; {fig['wall_s']} s")
                self.record("FAIL" if problems else "PASS", name,
                            ("; ".join(problems) + " -- " if problems else "") + detail)
                self.train_figs[f"{model}.{cfg}"] = fig

    def train_gpt(self):
        """gpt on text, --device cuda against the CPU reference with the same flags."""
        for cfg, np_ in GPT_CONFIGS:
            name = f"train gpt {cfg}"
            if not self.gpu:
                self.record("SKIP", name, self.no_gpu_reason)
                continue
            if self.over_budget(name):
                continue
            fig, err = self.train(f"{self.device}-gpt-{cfg}", self.device, "gpt", np_, [])
            if fig is None:
                self.record("FAIL", name, err)
                continue
            ref = self.cpu_ref.get(f"gpt.{cfg}")
            problems = []
            if fig["agree"] is not True:
                problems.append("replicas DISAGREE")
            if fig["loss"] is None or not fig["loss"] < GPT_MAX_LOSS:
                problems.append(f"validation loss {fig['loss']} not below {GPT_MAX_LOSS}")
            cmp = "no CPU reference"
            if ref and fig["loss"] is not None:
                diff = fig["loss"] - ref["loss"]
                cmp = (f"CPU {ref['loss']:.4f} ({diff:+.4f}, tolerance {GPT_LOSS_TOL}; CPU seed "
                       f"spread {self.cpu_ref.get('gpt.seed_spread', float('nan')):.4f})")
                if abs(diff) > GPT_LOSS_TOL:
                    problems.append(f"validation loss {fig['loss']:.4f} vs CPU {ref['loss']:.4f}")
                if fig["step0_loss"] is not None and ref.get("step0_loss") is not None:
                    d0 = abs(fig["step0_loss"] - ref["step0_loss"])
                    cmp += f"; step-0 loss {fig['step0_loss']:.6f} vs CPU {ref['step0_loss']:.6f}"
                    if d0 > GPT_STEP0_RTOL * abs(ref["step0_loss"]):
                        problems.append(f"step-0 loss {fig['step0_loss']:.6f} vs CPU "
                                        f"{ref['step0_loss']:.6f}")
            tokens = fig["sps"] * GPT_CONTEXT if fig["sps"] else 0
            share = ""
            if fig["step_ms"] and fig["comm_ms"] is not None and np_ > 1:
                share = (f", exchange {fig['comm_ms']:.3f} of {fig['step_ms']:.3f} ms/step "
                         f"({100 * fig['comm_ms'] / fig['step_ms']:.0f}%)")
            loss = f"{fig['loss']:.4f}" if fig["loss"] is not None else "?"
            detail = (f"val loss {loss} nats ({fig['bpb']} bits/byte) vs {cmp}; agree "
                      f"{fig['agree']}; {fig['sps']:.0f} samples/s = {tokens:.0f} tokens/s; "
                      f"{fig['steps']} steps{share}; {fig['wall_s']} s")
            self.record("FAIL" if problems else "PASS", name,
                        ("; ".join(problems) + " -- " if problems else "") + detail)
            self.train_figs[f"gpt.{cfg}"] = fig

    def step_cpu_control(self):
        """The CPU path through the same bundle on this machine: --device cpu, np 2, against the
        reference prepare.sh stored (bit-identical where the BLAS takes the same code path)."""
        name = "train mlp np2 --device cpu"
        if self.over_budget(name):
            return
        fig, err = self.train("cpu-mlp-np2", "cpu", "mlp", 2, [])
        if fig is None:
            self.record("FAIL", name, err)
            return
        ref = self.cpu_ref.get("mlp.np2")
        tol = self.cpu_ref.get("mlp.tolerance", MIN_ACC_TOL)
        problems = [] if fig["agree"] is True else ["replicas DISAGREE"]
        cmp = "no reference"
        if ref:
            same = "same checksum" if fig["checksum"] == ref["checksum"] else "other checksum"
            cmp = f"reference {ref['acc']:.4f} ({same})"
            if abs(fig["acc"] - ref["acc"]) > tol:
                problems.append(f"accuracy {fig['acc']:.4f} vs reference {ref['acc']:.4f}")
        self.record("FAIL" if problems else "PASS", name,
                    ("; ".join(problems) + " -- " if problems else "")
                    + f"acc {fig['acc']:.4f}, {cmp}; agree {fig['agree']}; "
                    f"{fig['sps']:.0f} samples/s; {fig['wall_s']} s")

    # ---- benchmarks -----------------------------------------------------------------------
    def step_bench(self):
        torch_rows = {}
        bench_models = [m for m in self.models if m != "gpt"]  # gpt: figures in its train line
        if bench_models and self.gpu and not self.over_budget("bench torch eager"):
            # PyTorch in the machine's own environment: not the bundle's libraries.
            rc, out = self.run("bench-torch", [self.args.torch_python or sys.executable,
                                               os.path.join(HERE, "torch_step.py"), "--device",
                                               self.device, "--model",
                                               bench_models[0] if len(bench_models) == 1
                                               else "all"], 240, env=dict(os.environ))
            for m in re.finditer(r"^torch (\S+) (\S+) batch \d+ iters \d+ ms/step (\S+) "
                                 r"samples/s (\S+) loss \S+ device (.*)$", out, re.M):
                torch_rows[(m.group(1), m.group(2))] = (float(m.group(3)), float(m.group(4)),
                                                        m.group(5))
            head = next((l for l in out.splitlines() if l.startswith("# torch")), "")
            if rc == 0 and torch_rows:
                self.record("PASS", "bench torch eager", head[2:])
            elif rc == 3:
                self.record("SKIP", "bench torch eager", out.strip().splitlines()[-1][:200])
            else:
                self.record("FAIL", "bench torch eager", f"exit {rc}: {out.strip()[-300:]}")
        for model in bench_models:
            name = f"bench step {model}"
            if not self.gpu:
                # The CPU figure alone, so the benchmark's path still runs without a device.
                rc, out = self.run(f"bench-cpu-{model}", self.mpirun(1, [
                    self.resync, "bench", "step", "--device", "cpu", "--model", model,
                    "--batch-size", "64", "--iters", "20", "--warmup", "3"]), 120)
                row = re.search(r"^\s+cpu\s+64\s+\d+\s+(\S+)\s+(\S+)", out, re.M)
                fig = f"; cpu {float(row.group(2)):.0f} samples/s" if rc == 0 and row else \
                    f"; cpu bench exit {rc}"
                self.record("SKIP", name, self.no_gpu_reason + fig)
                continue
            if self.over_budget(name):
                continue
            rc, out = self.run(f"bench-cuda-{model}", self.mpirun(1, [
                self.resync, "bench", "step", "--device", self.device, "--model", model,
                "--batch-size", "64", "--iters", str(self.args.bench_iters), "--warmup",
                str(max(3, self.args.bench_iters // 10))]), 240)
            rows = {m.group(1).split(":")[0]: (float(m.group(2)), float(m.group(3)))
                    for m in re.finditer(r"^\s+(cuda:\d+|cpu)\s+64\s+\d+\s+(\S+)\s+(\S+)", out, re.M)}
            if rc != 0 or self.device not in rows:
                self.record("FAIL", name, f"exit {rc}: {out.strip()[-300:]}")
                continue
            ms, sps = rows[self.device]
            parts = [f"{self.device} {sps:.0f} samples/s ({ms:.3f} ms/step)"]
            if "cpu" in rows and self.device != "cpu":
                parts.append(f"cpu (1 BLAS thread) {rows['cpu'][1]:.0f} "
                             f"({sps / rows['cpu'][1]:.1f}x)")
            ts = torch_rows.get((model, "sync"))
            ta = torch_rows.get((model, "async"))
            if ts:
                parts.append(f"torch eager {ts[1]:.0f} ({sps / ts[1]:.2f}x)")
            if ta:
                parts.append(f"torch eager no per-step sync {ta[1]:.0f} ({sps / ta[1]:.2f}x)")
            self.record("PASS", name, "; ".join(parts))
            if model == "cnn" and ts:
                goal = "met" if sps >= ts[1] else "NOT met"
                self.say(f"GOAL  cnn step >= 1.0x PyTorch eager (batch 64): {goal} "
                         f"({sps / ts[1]:.2f}x; not counted in the exit code)")
            for np_ in (2, 3):
                fig = self.train_figs.get(f"{model}.np{np_}")
                if fig and fig["step_ms"] and fig["comm_ms"] is not None:
                    self.say(f"INFO  {model} np {np_} host-staged ring: exchange (comm_ms: "
                             f"staged all-reduce + update) {fig['comm_ms']:.3f} ms of a "
                             f"{fig['step_ms']:.3f} ms step "
                             f"({100 * fig['comm_ms'] / fig['step_ms']:.0f}%), compute "
                             f"{fig['compute_ms']:.3f} ms, wait {fig['wait_ms']:.3f} ms")

    # ---- CPU reference (prepare.sh) ---------------------------------------------------------
    def make_cpu_ref(self, path):
        ref = {"created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": os.uname().nodename,
               "nproc": os.cpu_count(), "runs": {}}
        for model in self.models:
            if model == "gpt":
                self.make_gpt_ref(ref)
                continue
            accs = []
            for cfg, np_, extra, ref_key, _ in TRAIN_CONFIGS:
                if ref_key != cfg:
                    continue
                fig, err = self.train(f"ref-{model}-{cfg}", "cpu", model, np_, extra, timeout=900)
                if fig is None:
                    raise RuntimeError(f"CPU reference {model} {cfg}: {err}")
                ref[f"{model}.{cfg}"] = fig
                self.say(f"REF   {model} {cfg}: acc {fig['acc']:.4f} agree {fig['agree']} "
                         f"{fig['sps']:.0f} samples/s {fig['wall_s']} s")
                if cfg == "np1":
                    accs.append(fig["acc"])
            for seed in NOISE_SEEDS:
                fig, err = self.train(f"ref-{model}-np1-seed{seed}", "cpu", model, 1, [],
                                      seed=seed, timeout=900)
                if fig is None:
                    raise RuntimeError(f"CPU reference {model} seed {seed}: {err}")
                accs.append(fig["acc"])
                self.say(f"REF   {model} np1 seed {seed}: acc {fig['acc']:.4f}")
            ref[f"{model}.np1.seed_accuracies"] = accs
            ref[f"{model}.tolerance"] = max(MIN_ACC_TOL, max(accs) - min(accs))
            self.say(f"REF   {model} tolerance {ref[f'{model}.tolerance']:.4f} "
                     f"(spread over seeds 1-3: {max(accs) - min(accs):.4f})")
        with open(path, "w") as f:
            json.dump(ref, f, indent=1, sort_keys=True)

    def make_gpt_ref(self, ref):
        for cfg, np_ in GPT_CONFIGS:
            fig, err = self.train(f"ref-gpt-{cfg}", "cpu", "gpt", np_, [], timeout=900)
            if fig is None:
                raise RuntimeError(f"CPU reference gpt {cfg}: {err}")
            ref[f"gpt.{cfg}"] = fig
            self.say(f"REF   gpt {cfg}: val loss {fig['loss']:.4f} step-0 loss "
                     f"{fig['step0_loss']:.6f} agree {fig['agree']} {fig['sps']:.1f} samples/s "
                     f"{fig['wall_s']} s")
        losses = [ref["gpt.np1"]["loss"]]
        for seed in GPT_NOISE_SEEDS:
            fig, err = self.train(f"ref-gpt-np1-seed{seed}", "cpu", "gpt", 1, [], seed=seed,
                                  timeout=900)
            if fig is None:
                raise RuntimeError(f"CPU reference gpt seed {seed}: {err}")
            losses.append(fig["loss"])
            self.say(f"REF   gpt np1 seed {seed}: val loss {fig['loss']:.4f}")
        ref["gpt.seed_spread"] = max(losses) - min(losses)

    # ---- main -----------------------------------------------------------------------------
    def main(self):
        os.makedirs(self.logs, exist_ok=True)
        os.makedirs(self.out, exist_ok=True)
        self.log_file = open(os.path.join(self.out, "check.log"), "w")
        self.models = self.args.models.split(",")
        self.device = "cpu" if self.args.rehearse_on_cpu else "cuda"
        self.train_figs = {}
        only = set(self.args.only.split(",")) if self.args.only else None
        try:
            self.manifest = json.load(open(os.path.join(self.bundle, "MANIFEST.json")))
        except (OSError, ValueError):
            self.manifest = {}
        self.say(f"# resync GPU check, {time.strftime('%Y-%m-%d %H:%M:%S %Z')} on "
                 f"{os.uname().nodename} ({os.cpu_count()} cores, {os.uname().release})")
        self.say(f"# bundle {self.bundle}: commit {self.manifest.get('commit', '?')}, built "
                 f"{self.manifest.get('built', '?')}, CUDA archs {self.manifest.get('cuda_archs', '?')}")
        self.host_info()
        self.data = os.path.join(self.bundle, "data", "fashion-mnist")
        self.text = os.path.join(self.bundle, "data", "bible-kjv-1m.txt")
        ref_path = os.path.join(self.bundle, "ref", "cpu_ref.json")
        if os.path.exists(ref_path) and not self.args.make_cpu_ref:
            self.cpu_ref = json.load(open(ref_path))

        self.step_libs()
        self.resync = os.path.join(self.bin, "resync") if self.bin else "resync"
        if not self.ready:
            self.say("# the libraries do not resolve: nothing else can run")
            return self.finish()
        if self.args.make_cpu_ref:
            self.make_cpu_ref(self.args.make_cpu_ref)
            return self.finish()
        self.guard(self.step_info)  # always: it decides whether a device is there
        if only is None or "tests" in only:
            self.guard(self.step_tests)
        if only is None or "train" in only:
            self.guard(self.step_cpu_control)
            self.guard(self.step_train)
        if only is None or "bench" in only:
            self.guard(self.step_bench)
        return self.finish()

    def guard(self, step):
        """A bug of this script in one step is that step's FAIL, not the end of the check."""
        try:
            step()
        except Exception as e:  # noqa: BLE001
            self.record("FAIL", f"{step.__name__} (check.py)", f"{type(e).__name__}: {e}")

    def host_info(self):
        glibc = subprocess.run(["ldd", "--version"], capture_output=True, text=True).stdout \
            if shutil.which("ldd") else ""
        self.say(f"INFO  glibc {glibc.splitlines()[0].split()[-1] if glibc else '?'} (bundle "
                 f"needs {self.manifest.get('glibc_needed', '?')}); python "
                 f"{sys.version.split()[0]}")
        if shutil.which("nvidia-smi"):
            r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                                "compute_cap", "--format=csv,noheader"], capture_output=True,
                               text=True)
            self.say(f"INFO  nvidia-smi: {(r.stdout or r.stderr).strip()[:200]}")
        else:
            self.say("INFO  nvidia-smi: not on PATH")

    def finish(self):
        counts = {s: sum(1 for r in self.results if r[0] == s) for s in ("PASS", "FAIL", "SKIP")}
        verdict = "FAIL" if counts["FAIL"] else "PASS"
        self.say(f"# {verdict}: {counts['PASS']} passed, {counts['FAIL']} failed, "
                 f"{counts['SKIP']} skipped in {self.elapsed():.0f} s")
        with open(os.path.join(self.out, "summary.txt"), "w") as f:
            for s, n, d in self.results:
                f.write(f"{s:<5} {n:<34} {d}\n".replace("  \n", "\n"))
            f.write(f"# {verdict}: {counts['PASS']} passed, {counts['FAIL']} failed, "
                    f"{counts['SKIP']} skipped in {self.elapsed():.0f} s\n")
        with tarfile.open(os.path.join(self.out, "logs.tar.gz"), "w:gz") as tar:
            tar.add(self.logs, arcname="logs")
        self.log_file.close()
        if not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        return 1 if counts["FAIL"] else 0


def main():
    ap = argparse.ArgumentParser(description="resync's GPU check (see scripts/gpu/check.sh)")
    ap.add_argument("--bundle", default=os.path.join(REPO, ".gpu-bundle"))
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, ".gpu-check-out"))
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                   f"resync-gpu-check.{os.getpid()}"))
    ap.add_argument("--budget-s", type=float, default=360.0,
                    help="start no check after this many seconds, and stop any at 60 s past "
                         "them (default 360: the whole run ends inside 7 minutes)")
    ap.add_argument("--only", default="", help="comma-separated steps: tests,train,bench")
    ap.add_argument("--models", default="gpt,mlp,cnn",
                    help="mlp and cnn: Fashion-MNIST runs and bench step; gpt: text runs")
    ap.add_argument("--no-dpkg", action="store_true", help="unpack with deb_extract.py")
    ap.add_argument("--keep-work", action="store_true")
    ap.add_argument("--torch-python", default=None, help="python with PyTorch (default: this one)")
    ap.add_argument("--make-cpu-ref", metavar="FILE", default="")
    ap.add_argument("--bench-iters", type=int, default=300, help="timed steps of bench step")
    ap.add_argument("--rehearse-on-cpu", action="store_true",
                    help="run every GPU check with --device cpu instead (no GPU needed): "
                         "rehearses the runner, its parsing and its comparisons")
    args = ap.parse_args()
    return Check(args).main()


if __name__ == "__main__":
    sys.exit(main())
