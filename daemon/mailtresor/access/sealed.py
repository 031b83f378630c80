"""One small encrypted JSON document on disk, shared by the CLI and the daemon.

users.db and tokens.db are each such a file: AES-GCM (crypto.seal_blob) under
a key the caller passes, written atomically (temp file, fsync, rename, fsync
of the directory), mode 0600.  Writers take an flock on a lock file beside it
(not on the file itself: a rename replaces the inode a lock would sit on) and
re-read under the lock before they change anything, so the CLI and the
daemon never lose each other's updates.  Readers look at the file's inode,
size and mtime and re-read only when they changed, so the daemon sees what
the CLI did without a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from pathlib import Path
from typing import Callable

from mailtresor.durable import fsync_dir, own_like_directory
from mailtresor.keys import crypto
# The control key "access" and how the file key comes from it (one home: keys/derive.py).
from mailtresor.keys.derive import ACCESS_KEY_NAME, ACCESS_KEY_VERSION, access_file_key as file_key  # noqa: F401


class StoreError(Exception):
    """The file cannot be read or written; the message names it (never a secret)."""


class SealedFile:
    def __init__(self, path: Path, key: bytes, aad: bytes, empty: Callable[[], dict]):
        if not isinstance(key, bytes) or len(key) != crypto.KEY_SIZE:
            raise ValueError("the access file key must be 32 bytes")
        self.path = Path(path)
        self._key = key
        self._aad = aad
        self._empty = empty
        self._stamp: tuple | None = None
        self._data: dict | None = None
        self._mutex = threading.RLock()     # the daemon's threads; flock is per open file

    def __repr__(self) -> str:                # never the key
        return f"SealedFile({str(self.path)!r})"

    def _stat(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def load(self) -> dict:
        """The current document (re-read if the file changed since last time).
        Callers must not change what they get: use modify()."""
        with self._mutex:
            stamp = self._stat()
            if self._data is not None and stamp == self._stamp:
                return self._data
            if stamp is None:
                data = self._empty()
            else:
                try:
                    blob = self.path.read_bytes()
                except OSError as e:
                    raise StoreError(f"{self.path}: {e.strerror or e}") from None
                try:
                    data = json.loads(crypto.open_blob(self._key, blob, self._aad))
                except crypto.DecryptionError:
                    raise StoreError(f"{self.path}: does not decrypt with the access key "
                                     "(wrong key, or the file was altered)") from None
                except ValueError:
                    raise StoreError(f"{self.path}: decrypts but is not a document") from None
            self._data, self._stamp = data, stamp
            return data

    @contextlib.contextmanager
    def _locked(self):
        if not self.path.parent.is_dir():
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                own_like_directory(dfd, self.path.parent.parent)
            finally:
                os.close(dfd)
        fd = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            own_like_directory(fd, self.path.parent)
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)                      # releases the lock

    def modify(self, fn: Callable[[dict], object]):
        """Run fn on a fresh copy of the document under the lock and write it
        back if fn returns without raising; fn's result is returned."""
        with self._mutex, self._locked():
            self._data = None                 # re-read: another process may have written
            data = json.loads(json.dumps(self.load()))   # a private copy: fn may fail half-way
            result = fn(data)
            self._write(data)
            return result

    def _write(self, data: dict) -> None:
        blob = crypto.seal_blob(self._key, json.dumps(data, sort_keys=True).encode(), self._aad)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            own_like_directory(fd, self.path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(self.path.parent)
        self._data, self._stamp = data, self._stat()
