#!/usr/bin/env python3
"""`dpkg -x DEB DIR` for machines without dpkg: unpacks a .deb's data archive into DIR.

Usage: deb_extract.py DIR DEB...
A .deb is an ar archive holding debian-binary, control.tar.* and data.tar.{xz,gz,bz2} (Debian
bookworm uses xz, which Python's tarfile reads; zstd, used by some Ubuntu releases, is not).
"""
import io
import os
import sys
import tarfile


def data_member(path):
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{path}: not an ar archive")
        while True:
            header = f.read(60)
            if len(header) < 60:
                raise ValueError(f"{path}: no data.tar member")
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            body = f.read(size)
            if size % 2:
                f.read(1)
            if name.startswith("data.tar"):
                return name, body


def extract(deb, dest):
    name, body = data_member(deb)
    if name.endswith(".zst"):
        raise ValueError(f"{deb}: {name} is zstd-compressed, which Python's tarfile cannot read")
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
        if hasattr(tarfile, "fully_trusted_filter"):
            tar.extractall(dest, filter="fully_trusted")  # Debian's own packages
        else:
            tar.extractall(dest)


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    dest = sys.argv[1]
    os.makedirs(dest, exist_ok=True)
    for deb in sys.argv[2:]:
        extract(deb, dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
