"""The serving side's Xapian: one `xapian-tcpsrv` per served tenant, on
127.0.0.1, read-only, over a stub database that lists the tenant's shard
indexes.

xapian-tcpsrv opens its databases for each connection (it forks one
server per connection, and the stub file is read when that server opens
it; tests/test_federation.py checks it): rewriting the stub before a
connection is forwarded to it is enough for a new month's shard to be
searched, and a search under way keeps the view it opened with.  The stub
is replaced by rename, never written in place, so a connection never reads
half a stub.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path

log = logging.getLogger("mailtresor.federation.tcpsrv")

_MONTH = re.compile(r"[0-9]{4}-[0-9]{2}")
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)   # seconds before a restart, by failures in a row


def shard_indexes(store_root: Path, tenant: str) -> list[str]:
    """The tenant's shard index directories that hold a Xapian database,
    oldest month first (the layout of archive/store: TENANT/YYYY-MM/xapian)."""
    from mailtresor.archive.index import _has_db
    d = Path(store_root) / tenant
    try:
        months = sorted(m for m in os.listdir(d) if _MONTH.fullmatch(m))
    except FileNotFoundError:
        return []
    return [str(d / m / "xapian") for m in months if _has_db(d / m / "xapian")]


def stub_text(paths: list[str]) -> str:
    """A Xapian stub database file listing glass databases.  Pure."""
    for p in paths:
        if "\n" in p or not os.path.isabs(p):
            raise ValueError(f"not an absolute path for a stub file: {p!r}")
    return "".join(f"glass {p}\n" for p in paths)


def write_stub(stub: Path, paths: list[str]) -> bool:
    """Replace `stub` with one listing `paths` if it lists others; whether
    it changed."""
    text = stub_text(paths)
    try:
        if stub.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    tmp = stub.with_name(stub.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.rename(tmp, stub)
    return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (xapian-tcpsrv takes no port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TcpServer:
    """One supervised xapian-tcpsrv serving one tenant read-only on
    127.0.0.1:port.  Restarted after it exits (backing off), until stop()."""

    def __init__(self, reactor, *, program: str, tenant: str, store_root: Path, stub: Path,
                 timeout_ms: int = 60_000):
        self.reactor = reactor
        self.program, self.tenant = program, tenant
        self.store_root, self.stub = Path(store_root), Path(stub)
        self.timeout_ms = timeout_ms
        self.port = free_port()
        self.process = None
        self.failures = 0
        self._stopping = False
        self._restart = None
        self._ended = None

    def refresh(self) -> None:
        """Bring the stub up to the shards on disk (before each forwarded
        connection: cheap, one directory listing)."""
        paths = shard_indexes(self.store_root, self.tenant)
        if write_stub(self.stub, paths):
            log.info("federation: serving %d shard index(es) of %s", len(paths), self.tenant)

    def start(self) -> None:
        from twisted.internet.protocol import ProcessProtocol

        self.refresh()
        server = self

        class Proto(ProcessProtocol):
            def errReceived(self, data):
                for line in data.decode("utf-8", "replace").splitlines():
                    log.warning("xapian-tcpsrv (%s): %s", server.tenant, line[:300])

            def outReceived(self, data):
                pass

            def processEnded(self, reason):
                server._exited(reason)

        args = [self.program, "--quiet", "--interface", "127.0.0.1", "--port", str(self.port),
                "--timeout", str(self.timeout_ms), str(self.stub)]
        try:
            self.process = self.reactor.spawnProcess(Proto(), self.program, args, env={"PATH": os.defpath},
                                                     childFDs={0: "w", 1: "r", 2: "r"})
        except OSError as e:
            log.error("federation: cannot run %s: %s", self.program, e)
            self._exited(None)
            return
        log.info("federation: serving tenant %s read-only with xapian-tcpsrv on 127.0.0.1:%d (pid %s)",
                 self.tenant, self.port, self.process.pid)

    def _exited(self, reason) -> None:
        self.process = None
        if self._stopping:
            if self._ended is not None:
                d, self._ended = self._ended, None
                d.callback(None)
            return
        delay = RESTART_DELAYS[min(self.failures, len(RESTART_DELAYS) - 1)]
        self.failures += 1
        log.warning("federation: xapian-tcpsrv for %s exited (%s); restarting in %g s", self.tenant,
                    getattr(getattr(reason, "value", None), "exitCode", "not started"), delay)
        # A port taken meanwhile by someone else: a fresh one.
        self.port = free_port()
        self._restart = self.reactor.callLater(delay, self.start)

    def stop(self):
        """A Deferred that fires when the server has exited."""
        from twisted.internet import defer
        self._stopping = True
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        if self.process is None:
            return defer.succeed(None)
        self._ended = defer.Deferred()
        try:
            self.process.signalProcess("TERM")
        except Exception:  # noqa: BLE001 - already gone
            pass
        return self._ended
