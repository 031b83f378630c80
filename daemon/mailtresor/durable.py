"""Durable writes with the standard library only: every file the appliance
must not lose (spool entries, the audit trail, the access files, the
store's side files) is written whole and its directory flushed, the same
way, by these two functions.  Importing this costs nothing beyond `os`, so
the relay's hot path and the command line may both use it."""

from __future__ import annotations

import os
from pathlib import Path


def write_all(fd: int, data) -> None:
    """os.write until every byte of `data` is written (a write may be short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(path: Path | str) -> None:
    """fsync a directory, so that the names created, renamed or removed in
    it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
