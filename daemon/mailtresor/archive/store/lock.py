"""The writer lock: one process writes to the store at a time."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from mailtresor.archive.store.errors import StoreLocked
from mailtresor.archive.store.fs import FILE_MODE, private_dir


class WriterLock:
    """One writer for the whole store across processes: the daemon's
    archiver holds it for each batch, a CLI tool that writes (import,
    reindex, restore) for its whole run.  flock(2): released when the
    holder dies."""

    def __init__(self, root: Path):
        self.path = Path(root) / ".writer.lock"
        self.fd = None

    def acquire(self, timeout: float = 0.0) -> None:
        private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.fd = fd
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise StoreLocked(f"{self.path.parent}: another process is writing to the store") from None
                time.sleep(0.1)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        if self.fd is None:
            self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
