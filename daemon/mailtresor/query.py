"""The daemon's query socket: `mailtresor search` and `mailtresor show`
answered by the running daemon.

A command line that searches on its own starts Python, imports the index,
store and key modules, fetches the tenant's key from the control endpoint
(one key release there per search) and opens every shard index it needs.
The daemon has all of that in hand already.  So when it runs, the
`mailtresor` command (daemon/bin/mailtresor.c, a small C program that
starts no interpreter for it) sends it the command line instead, and
prints what comes back.  The command runs here through the same code as in the
command's own process (mailtresor.cli.main, with a Session of the daemon's:
its keys, its open index readers, its store behind the archiver's lock),
so its output, errors and exit codes are the same either way.

The socket is RUNTIME_DIRECTORY/query.sock, mode 0600, owned by the
daemon's user; the daemon also answers only root and its own user (peer
credentials), the two who could run the command themselves.  Every
answer is logged: who asked (uid, pid), the command, the tenant, the exit
code.  Not the query: it may quote mail.

Protocol (all lengths 4 bytes, big-endian):

    request   b"MTQ1" length payload
              payload: NUL-separated UTF-8 (surrogateescape) fields: the
              real path of the configuration file the command line would
              use, then its arguments from the command name on
    answer    frames: kind (1 byte) length data, until the connection closes
              b"o" bytes for stdout     b"e" bytes for stderr
              b"x" exit code (ASCII), the last frame
              b"d" declined (reason, ASCII): the command line runs the
                   command itself.  Sent when the command line uses another
                   configuration file than the daemon, or the file changed
                   since the daemon read it, or a search asks for more than
                   MAX_SERVED_HITS hits.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path

from twisted.internet import defer, endpoints, protocol, threads
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.protocols.policies import TimeoutMixin
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailtresor.cli import main as cli
from mailtresor.archive import index

log = logging.getLogger("mailtresor.query")

# The protocol's names.  daemon/bin/mailtresor.c spells them too
# (tests/test_query.py checks that they agree).
SERVED = ("search", "show")          # the commands answered here (they take a cli.Session)
SOCKET_NAME = "query.sock"
MAGIC = b"MTQ1"
OUT, ERR, EXIT, DECLINE = b"o", b"e", b"x", b"d"
NO_DAEMON_ENV_VAR = "MAILTRESOR_NO_DAEMON"   # set, not "": the command never asks

MAX_REQUEST = 64 * 1024
# A search for more hits than this runs in the command's own process: its
# listings would be built in the daemon's memory, beside the archiver.
MAX_SERVED_HITS = 10_000
IDLE_TIMEOUT = 30.0          # seconds a client may take to send its request
_PEERCRED = struct.Struct("3i")   # struct ucred: pid, uid, gid


def frame(kind: bytes, data: bytes) -> bytes:
    return kind + len(data).to_bytes(4, "big") + data


def encode_request(config_path: str, argv: list[str]) -> bytes:
    """The request daemon/bin/mailtresor.c sends, built in Python (for the tests)."""
    payload = b"\0".join(x.encode("utf-8", "surrogateescape") for x in [config_path, *argv])
    return MAGIC + len(payload).to_bytes(4, "big") + payload


def decode_request(payload: bytes) -> tuple[str, list[str]]:
    fields = [f.decode("utf-8", "surrogateescape") for f in payload.split(b"\0")]
    return fields[0], fields[1:]


def _identity(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _tenant_of(argv: list[str]) -> str:
    """The --tenant of a command line, as it may go into the log."""
    name = "-"
    for i, a in enumerate(argv):
        if a == "--tenant" and i + 1 < len(argv):
            name = argv[i + 1]
        elif a.startswith("--tenant="):
            name = a[len("--tenant="):]
    ok = name.isprintable() and " " not in name and len(name) <= 64
    return name if ok else repr(name[:64])


class _ParserExit(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class Declined(Exception):
    """The command line should run this command itself (the reason)."""


_request = threading.local()          # .session: the session of this thread's request


class _Parser(cli._Parser):
    """The command line's parser, writing help and usage errors to the
    session of the thread's request, and raising instead of exiting."""

    def _print_message(self, message, file=None):
        if not message:
            return
        if file is None or file is sys.stdout:          # --help
            _request.session.write(message)
        else:                                           # usage of a usage error
            _request.session.note(message.rstrip("\n"))

    def exit(self, status=0, message=None):
        if message:
            _request.session.note(message.rstrip("\n"))
        raise _ParserExit(status)


@functools.cache
def _parser():
    # Built once (building it costs more than a search): parse_args()
    # keeps nothing of a call in the parser, so threads may share it.
    return cli.build_parser(_Parser)


def run_command(cfg, argv: list[str], session: "Served") -> int:
    """`mailtresor ARGV...` as the command line runs it (mailtresor.cli.main),
    with `session` for its reading and writing and the daemon's
    configuration.  Only the SERVED commands; others get a usage error."""
    if not argv or argv[0] not in SERVED:
        session.note(f"mailtresor: the daemon answers only {' and '.join(SERVED)}")
        return cli.EXIT_USAGE
    _request.session = session
    try:
        args = _parser().parse_args(argv)
    except _ParserExit as e:
        return e.code
    finally:
        _request.session = None
    if getattr(args, "offset", 0) + getattr(args, "limit", 0) > MAX_SERVED_HITS:
        raise Declined(f"more than {MAX_SERVED_HITS} hits asked for")
    return cli.run(cfg, args, session)


class Served(cli.Session):
    """A command's session inside the daemon: the daemon's keys and index
    readers; its store while holding the archiver's lock; output kept and
    sent back."""

    def __init__(self, cfg, store, store_lock, keys, readers: index.Readers):
        super().__init__(cfg)
        self._shared_store, self._lock, self._shared_keys = store, store_lock, keys
        self.readers = readers
        self.out: list[bytes] = []
        self.err: list[bytes] = []

    def __exit__(self, *exc):
        pass                                # nothing of this session's own to close

    def write(self, text: str) -> None:
        self.out.append(text.encode("utf-8", "surrogateescape"))

    def write_bytes(self, data: bytes) -> None:
        self.out.append(bytes(data))

    def note(self, text: str) -> None:
        self.err.append(text.encode("utf-8", "surrogateescape") + b"\n")

    def keys(self):
        return self._shared_keys

    def root(self):
        return self._shared_store           # months and index paths: no environment opened

    @contextlib.contextmanager
    def store(self):
        with self._lock:
            yield self._shared_store


class QueryService:
    """The socket, and the threads that answer on it."""

    def __init__(self, cfg, reactor, archiver, *, max_threads: int = 2):
        self.cfg, self.reactor, self.archiver = cfg, reactor, archiver
        self.path = Path(cfg.appliance.runtime_directory) / SOCKET_NAME
        self.config_path = os.path.realpath(cfg.source)
        self.config_identity = _identity(Path(self.config_path))
        self.readers = index.Readers()
        self.pool = ThreadPool(1, max_threads, name="query")
        self.port = None
        self.answered = 0

    def start(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.pool.start()
        # wantPID: a lock file beside the socket; a socket left by a daemon
        # that died is replaced, one of a live daemon is not.
        ep = endpoints.UNIXServerEndpoint(self.reactor, str(self.path), mode=0o600, wantPID=True)
        d = ep.listen(QueryFactory(self))

        def listening(port):
            self.port = port
            log.info("query socket %s: `mailtresor search` and `show` are answered here", self.path)
            return port

        def failed(f):
            # Not fatal: the command line then searches on its own.
            log.warning("query socket %s: cannot listen (%s); `mailtresor search` runs without the daemon",
                        self.path, f.getErrorMessage())
        return d.addCallbacks(listening, failed)

    def stop(self):
        d = defer.maybeDeferred(self.port.stopListening) if self.port is not None else defer.succeed(None)
        self.port = None

        def done(_):
            self.pool.stop()
            self.readers.close()
        return d.addBoth(done)

    def status(self) -> dict:
        return {"path": str(self.path), "listening": self.port is not None, "answered": self.answered}

    def declines(self, config_path: str) -> str | None:
        """Why the command line should run the command itself, if it should."""
        if config_path != self.config_path:
            return "another configuration file"
        if _identity(Path(self.config_path)) != self.config_identity:
            return "the configuration file changed since the daemon read it"
        return None

    def answer(self, config_path: str, argv: list[str], uid: int, pid: int) -> bytes:
        """Run the command (in a pool thread); the answer's frames."""
        t0 = time.monotonic()
        why = self.declines(config_path)
        archiver = self.archiver
        session = Served(self.cfg, archiver.store, archiver.store_lock, archiver.keys, self.readers)
        try:
            if why is None:
                code = run_command(self.cfg, argv, session)
        except Declined as e:
            why = str(e)
        except Exception as e:  # noqa: BLE001 - a failed answer must not take the daemon down
            log.error("query socket: %s for uid %d failed: %s", argv[0] if argv else "?", uid,
                      type(e).__name__, exc_info=log.isEnabledFor(logging.DEBUG))
            session.out.clear()
            session.note(f"mailtresor: the daemon could not answer ({type(e).__name__}); see its log")
            code = cli.EXIT_FAIL
        if why is not None:
            log.info("query socket: uid %d (pid %d): declined (%s)", uid, pid, why)
            return frame(DECLINE, why.encode())
        self.answered += 1
        log.info("query socket: uid %d (pid %d): %s --tenant %s: exit %d, %.1f ms", uid, pid,
                 argv[0] if argv else "?", _tenant_of(argv), code, (time.monotonic() - t0) * 1000)
        return frame(OUT, b"".join(session.out)) + frame(ERR, b"".join(session.err)) + \
            frame(EXIT, str(code).encode())

    def refuse(self, uid: int, pid: int) -> bytes:
        log.warning("query socket: refused uid %d (pid %d): only root and the daemon's user may ask", uid, pid)
        return frame(ERR, f"mailtresor: the daemon answers only root and its own user, not uid {uid}\n".encode()) + \
            frame(EXIT, str(cli.EXIT_FAIL).encode())


@implementer(IHalfCloseableProtocol)
class QueryProtocol(protocol.Protocol, TimeoutMixin):
    """One connection: one request, one answer.  A client may close its
    side once the request is sent (half-close); the answer still comes."""

    def __init__(self, service: QueryService):
        self.service = service
        self.buf = b""
        self.busy = False

    def connectionMade(self):
        self.setTimeout(IDLE_TIMEOUT)

    def dataReceived(self, data):
        if self.busy:
            return                          # one request per connection
        self.buf += data
        if self.buf[:4] != MAGIC[:len(self.buf[:4])]:
            return self._bad("not a mailtresor query")
        if len(self.buf) < 8:
            return
        n = int.from_bytes(self.buf[4:8], "big")
        if n > MAX_REQUEST:
            return self._bad("request too long")
        if len(self.buf) < 8 + n:
            return
        self.busy = True
        self.setTimeout(None)
        config_path, argv = decode_request(self.buf[8:8 + n])
        pid, uid, _gid = self._peer()
        service = self.service
        if uid not in (0, os.geteuid()):
            return self._send(service.refuse(uid, pid))
        d = threads.deferToThreadPool(service.reactor, service.pool, service.answer, config_path, argv, uid, pid)
        d.addCallback(self._send)
        d.addErrback(self._failed)

    def _peer(self) -> tuple[int, int, int]:
        sock = self.transport.getHandle()
        return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))

    def _send(self, data: bytes) -> None:
        self.transport.write(data)
        self.transport.loseConnection()

    def _failed(self, f) -> None:
        log.error("query socket: %s", f.getErrorMessage())
        self.transport.loseConnection()

    def _bad(self, why: str) -> None:
        self.busy = True
        log.warning("query socket: %s; connection closed", why)
        self.transport.loseConnection()

    def timeoutConnection(self):
        self.transport.loseConnection()

    def readConnectionLost(self):
        if not self.busy:                   # the request was cut off
            self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


class QueryFactory(protocol.Factory):
    def __init__(self, service: QueryService):
        self.service = service

    def buildProtocol(self, addr):
        return QueryProtocol(self.service)
