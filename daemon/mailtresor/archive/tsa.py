"""RFC 3161 time stamps for shard seals, with the `openssl ts` tool.

A seal may carry the reply of a time-stamping authority over the bytes the
seal signs (store.seal_message): proof from a third party that the chain head
existed at that time.  Queries and replies are built and checked by
`openssl ts` (Debian's openssl package), sent over HTTP(S) with the
standard library.  What is time-stamped is a hash of the chain head: no
message content, no key, leaves the appliance.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path


class TimestampError(Exception):
    """The TSA could not be reached, refused, or its reply does not verify."""


def _openssl(args: list[str], data: bytes | None = None, timeout: float = 20.0) -> bytes:
    try:
        p = subprocess.run(["openssl", "ts", *args], input=data, capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TimestampError(f"openssl ts: {e}") from None
    if p.returncode != 0:
        raise TimestampError("openssl ts " + args[0] + ": " + p.stderr.decode(errors="replace").strip()[-300:])
    return p.stdout


def query(message: bytes) -> bytes:
    """A DER time-stamp query (SHA-256 of `message`, asking for the TSA's certificate)."""
    return _openssl(["-query", "-data", "/dev/stdin", "-sha256", "-cert"], message)


def timestamp(url: str, message: bytes, ca_file: Path | None = None, timeout: float = 20.0) -> bytes:
    """The TSA's DER reply for `message`; checked against `ca_file` when given."""
    req = urllib.request.Request(url, data=query(message), method="POST",
                                 headers={"Content-Type": "application/timestamp-query"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            reply = resp.read(1 << 20)
    except (urllib.error.URLError, OSError) as e:
        raise TimestampError(f"time-stamping authority {url}: {e}") from None
    if ca_file is not None:
        verify(reply, message, ca_file)
    return reply


def verify(reply: bytes, message: bytes, ca_file: Path) -> str:
    """Check a reply against `message` and the TSA's CA; returns the time it states."""
    return _stated_time(reply, ["-verify", "-data", "/dev/stdin", "-CAfile", str(ca_file)], message)


def reply_time(reply: bytes) -> str:
    """The time an RFC 3161 reply states (its TSTInfo genTime, as `openssl
    ts -reply -text` prints it, e.g. "Dec  3 12:00:00 2026 GMT"), without
    checking it against a CA (verify() does that); "" if it states none.
    Raises TimestampError for a reply openssl cannot read."""
    return _stated_time(reply)


def _stated_time(reply: bytes, check: list[str] | None = None, message: bytes = b"") -> str:
    """The reply in a private temporary file for openssl: first `check`
    (`openssl ts` arguments, `-in` added; `message` on its stdin) if given,
    then the time the reply states ("" if none)."""
    fd, path = tempfile.mkstemp(prefix="mailtresor-tsr-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(reply)
        if check is not None:
            _openssl([check[0], "-in", path, *check[1:]], message)
        text = _openssl(["-reply", "-in", path, "-text"]).decode(errors="replace")
    finally:
        os.unlink(path)
    for line in text.splitlines():
        if line.startswith("Time stamp:"):
            return line.split(":", 1)[1].strip()
    return ""


def check_seals(tenant: str, month: str, seals, ca_file) -> tuple[int, list[str]]:
    """Check every seal's RFC 3161 token (`seals`: (number, raw seal) pairs,
    Shard.seals_from) against the TSA's CA: (tokens checked, problems).
    `mailtresor verify` and the evidence report both ask this; a seal that
    does not decode is verify_shard's to report."""
    import struct

    from mailtresor.archive.store import Seal, StoreError, seal_message
    checked, out = 0, []
    for number, raw in seals:
        try:
            s = Seal.decode(number, raw)
        except (struct.error, StoreError):
            continue
        if not s.tsa_token:
            continue
        checked += 1
        try:
            verify(s.tsa_token, seal_message(tenant, month, s.seq, s.head, s.time), ca_file)
        except TimestampError as e:
            out.append(f"{tenant}/{month}: seal {number}: time stamp does not verify: {e}")
    return checked, out
