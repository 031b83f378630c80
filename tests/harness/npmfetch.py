"""Fetch one package from the npm registry, checked against a pinned
integrity hash, and unpack it where `npm install` would put it.

    python3 tests/harness/npmfetch.py NAME VERSION INTEGRITY PREFIX

The browser tests need axe-core's axe.min.js; a fresh Debian 12 machine has
no node or npm, and Debian's npm would pull a JavaScript toolchain in for
one file.  The registry serves packages as plain tarballs with an SRI hash
(`sha512-...`), which is all this needs: the standard library fetches, the
pinned hash is compared before anything is unpacked, and members that
would land outside the package's directory are refused.  Run by `make
deps`, never at run time."""

from __future__ import annotations

import base64
import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

REGISTRY = "https://registry.npmjs.org"


def fetch(name: str, version: str, integrity: str, prefix: Path) -> Path:
    algo, _, want = integrity.partition("-")
    if algo != "sha512" or not want:
        raise SystemExit(f"npmfetch: {integrity!r} is not a sha512 integrity value")
    url = f"{REGISTRY}/{name}/-/{name.split('/')[-1]}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=60) as r:
        data = r.read()
    got = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if got != want:
        raise SystemExit(f"npmfetch: {url}: integrity mismatch (got sha512-{got})")
    dest = prefix / "node_modules" / name
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar.getmembers():
            rel = Path(*Path(m.name).parts[1:])          # strip "package/"
            if not m.isfile() or not rel.parts or ".." in rel.parts or rel.is_absolute():
                continue
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(m).read())
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    print(fetch(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])))
