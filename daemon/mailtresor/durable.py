"""Durable writes with the standard library only: every file the appliance
must not lose (spool entries, the audit trail, the access files, the
store's side files) is written whole and its directory flushed, the same
way, by these functions.  Importing this costs nothing beyond `os`, so
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


def own_like_directory(fd: int, directory: Path | str) -> None:
    """Give a file root just made (the `mailtresor` command run by the
    administrator) to the owner of its directory, the daemon's user, who
    must go on reading and writing it: a root-owned 0600 file in the
    daemon's directory locks the daemon out until a StateDirectory= chown,
    and there is none without systemd.  Nothing to do for anyone else."""
    if os.geteuid() != 0:
        return
    st = os.stat(directory)
    if (st.st_uid, st.st_gid) != (0, 0):
        os.fchown(fd, st.st_uid, st.st_gid)
