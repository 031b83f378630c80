"""Files on the store's file systems: private modes, storage faults, LMDB
environments that leave nothing torn behind.

Everything that makes a directory or a file under the store, the index or
the backup goes through here, so that the modes and the handling of a full
disk are the same everywhere.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import lmdb

from mailtresor.durable import fsync_dir

# --- files only the daemon's user may read -----------------------------------------
# Directories 0700, files 0600, whatever the umask of the process that makes
# them (a `restore` or `reindex` from a root shell with umask 022 included):
# an index holds plaintext terms, a shard its metadata's sizes and times.
DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """mkdir -p with mode 0700 for every directory it creates (mkdir's mode
    is cut by the umask, which can only remove bits; an existing directory
    is left as it is)."""
    path = Path(path)
    if not path.is_dir():
        if path.parent != path:
            private_dir(path.parent)
        try:
            os.mkdir(path, DIR_MODE)
        except FileExistsError:
            pass
    return path


def private_tree(path: Path) -> None:
    """chmod go-rwx over a tree a library made with the process umask
    (Xapian creates its files 0666 & ~umask and takes no mode)."""
    for dirpath, dirnames, filenames in os.walk(path):
        for f in (dirpath, *(os.path.join(dirpath, n) for n in filenames)):
            mode = os.lstat(f).st_mode
            if mode & 0o077:
                os.chmod(f, mode & 0o700)


# --- storage faults: the disk's fault, not the message's ----------------------------

# errno -> how the status line names the fault.
_FAULTS = {errno.ENOSPC: "file system full", errno.EDQUOT: "quota exceeded",
           errno.EROFS: "file system read-only", errno.EIO: "I/O error"}


def storage_fault(e: BaseException) -> tuple[str, str] | None:
    """(what, reason) when `e` says that storage cannot take writes now
    (full, over quota, read-only, I/O error), else None.  Such a failure is
    no message's fault: the archiver pauses instead of counting tries.

    They come as OSError, as lmdb errors (lmdb.DiskError for ENOSPC at open,
    MapFullError, and a plain lmdb.Error whose text is the strerror: a short
    write of a page -- the disk filled in the middle of a commit -- is
    "mdb_txn_commit: Input/output error"), or as Xapian errors whose text
    ends with it ("Error writing block 5 (No space left on device)").  The
    exception chain is followed."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FAULTS:
            return _FAULTS[e.errno], os.strerror(e.errno)
        if isinstance(e, lmdb.MapFullError):
            return "shard map full", "the LMDB map size is reached"
        if isinstance(e, lmdb.DiskError):
            return _FAULTS[errno.ENOSPC], os.strerror(errno.ENOSPC)
        # Xapian's str() ends with the strerror in parentheses (its
        # get_error_string() can crash on an error not made by Xapian).
        if isinstance(e, lmdb.Error) or type(e).__module__.partition(".")[0] == "xapian":
            text = str(e)
            for code, what in _FAULTS.items():
                if os.strerror(code) in text:
                    return what, os.strerror(code)
        e = e.__cause__ or e.__context__
    return None


def describe_fault(kind: str, path: Path, e: BaseException) -> str | None:
    """`"store file system full (/srv/store): No space left on device"` for
    a storage fault at `path`; None for anything else.  LMDB reports a disk
    that filled in the middle of a commit as an I/O error: when the file
    system has (next to) no room left, it is called full."""
    f = storage_fault(e)
    if f is None:
        return None
    what, reason = f
    if what == "I/O error" and _nearly_full(path):
        # Said the same way as an ENOSPC: one reason, one log line a pause.
        what, reason = _FAULTS[errno.ENOSPC], os.strerror(errno.ENOSPC)
    return f"{kind} {what} ({path}): {reason}"


def _nearly_full(path: Path) -> bool:
    p = Path(path)
    while not p.exists() and p.parent != p:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


LOCK_FILE_BYTES = 64 << 10


def _allocate_lock_file(lmdb_dir: Path, name: str = "lock.mdb") -> None:
    """Give an LMDB lock file its blocks before LMDB maps it.  LMDB makes it
    with ftruncate (a sparse file) and writes its reader table through a
    shared mapping: on a full file system the first touch of an unbacked
    page is a SIGBUS that kills the daemon.  Allocated here, a full disk is
    an ENOSPC from posix_fallocate instead.  LMDB keeps a larger lock file
    as it is (it sizes its reader table to the file).  An existing lock
    file only gets its holes filled, never a new size: a process that has
    it mapped sized its reader table to it."""
    path = lmdb_dir / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size or LOCK_FILE_BYTES)
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
    finally:
        os.close(fd)


def open_env(path: Path, *, readonly: bool, **kw) -> lmdb.Environment:
    """lmdb.open() with private files and a preallocated lock file; an
    environment whose creation fails (a full disk) leaves no data.mdb
    (empty or torn) behind for months() and `verify` to trip over."""
    data = path / "data.mdb"
    fresh = not readonly and not data.exists()
    if not readonly:
        private_dir(path)
    try:
        if not readonly:
            _allocate_lock_file(path)
        return lmdb.open(str(path), readonly=readonly, mode=FILE_MODE, **kw)
    except BaseException:
        if fresh:
            # lmdb.open() failed on an environment it was creating: nothing
            # was ever committed to it (its meta pages may be torn).
            for n in ("data.mdb", "lock.mdb"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path / n)
        raise



def fsync_parent(path: Path) -> None:
    """fsync the directory that holds `path` (a new file's name is durable)."""
    fsync_dir(path.parent)
