#!/usr/bin/env python3
"""Debian packages that the given ELF files need at run time, beyond a bare CUDA + PyTorch image.

Usage: deps.py [--report] FILE...
Runs `ldd` on every FILE, maps each resolved library to the Debian package that ships it
(`dpkg -S`), and prints the package names, one a line, leaving out the base every Linux image has
(libc6: libc, libm, libpthread, libdl, librt, ld.so; libstdc++6; libgcc-s1) and whatever comes from
the CUDA toolkit under /usr/local/cuda (cuBLAS, NCCL: the GPU node has its own). A library no
package owns (outside /usr/local/cuda) or one that does not resolve is an error (exit 1).
--report prints, on stderr, which file needed which library of which package.
"""
import os
import re
import subprocess
import sys

BASE = {"libc6", "libstdc++6", "libgcc-s1"}
CUDA_PREFIXES = ("/usr/local/cuda",)


def ldd(path):
    out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
    libs = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+) => (\S+|not found)", line)
        if m:
            libs[m.group(1)] = m.group(2)
    return libs


_owner_cache = {}


def owner(path):
    """The Debian package shipping `path` (usr-merge aware), or None."""
    if path in _owner_cache:
        return _owner_cache[path]
    cands = {path, os.path.realpath(path)}
    for p in list(cands):
        if p.startswith("/usr/lib/"):
            cands.add(p[4:])
        elif p.startswith("/lib/"):
            cands.add("/usr" + p)
    pkg = None
    for c in sorted(cands):
        r = subprocess.run(["dpkg", "-S", c], capture_output=True, text=True)
        if r.returncode == 0:
            pkg = r.stdout.split(":")[0].strip()
            break
    _owner_cache[path] = pkg
    return pkg


def main():
    args = sys.argv[1:]
    report = "--report" in args
    files = [a for a in args if a != "--report"]
    pkgs, bad = set(), []
    for f in files:
        for soname, path in ldd(f).items():
            if path == "not found":
                bad.append(f"{f}: {soname} not found")
                continue
            if os.path.realpath(path).startswith(CUDA_PREFIXES) or path.startswith(CUDA_PREFIXES):
                continue
            pkg = owner(path)
            if pkg is None:
                bad.append(f"{f}: {soname} => {path} belongs to no Debian package")
                continue
            if report:
                print(f"{os.path.basename(f)}: {soname} ({pkg})", file=sys.stderr)
            if pkg not in BASE:
                pkgs.add(pkg)
    for b in bad:
        print(f"deps.py: {b}", file=sys.stderr)
    for p in sorted(pkgs):
        print(p)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
