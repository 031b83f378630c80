"""Socket activation: listening sockets handed over by systemd.

A listen address may be ``systemd:name=NAME`` wherever the configuration
names one (``[[relay.listener]] endpoint``, ``[api] listen``, ``[milter]
listen``).  NAME is the ``FileDescriptorName=`` of a ``.socket`` unit; systemd
passes the sockets with the protocol of sd_listen_fds(3): ``LISTEN_PID`` (the
process they are meant for), ``LISTEN_FDS`` (how many, from fd 3 on) and
``LISTEN_FDNAMES`` (their names, ':'-separated).

Sockets are found by name, never by position: with several ``.socket``
units the order of the descriptors is not something to rely on (Twisted's
own ``systemd:domain=INET:index=N`` endpoint has only the position).

The variables are read once, early in the main process, through libsystemd
(python3-systemd's ``listen_fds_with_names``: it checks LISTEN_PID and sets
FD_CLOEXEC), and unset at once, from the C environment and from Python's
``os.environ``, so that no child (relay workers, parse workers, an MTA hook)
ever sees them and takes sockets that are not its own.
"""

from __future__ import annotations

import os
import socket
import stat

VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
PREFIX = "systemd:"
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class ActivationError(Exception):
    """A socket named in the configuration cannot be used; the message says which and why."""


def is_activated(endpoint: str) -> bool:
    """Whether a configured endpoint asks for a socket from systemd."""
    return endpoint.startswith(PREFIX)


def endpoint_name(endpoint: str) -> str:
    """``systemd:name=NAME`` -> NAME; anything else after ``systemd:`` is a
    ValueError that says what to write instead.  Pure."""
    if not is_activated(endpoint):
        raise ValueError(f"{endpoint!r} is not a systemd: endpoint")
    rest = endpoint[len(PREFIX):]
    key, eq, name = rest.partition("=")
    if key != "name" or not eq:
        raise ValueError(f"{endpoint!r}: write systemd:name=NAME, NAME being the FileDescriptorName= of the "
                         ".socket unit (sockets are found by name: the order of several .socket units' "
                         "descriptors is not fixed, so index= is not supported)")
    # FileDescriptorName=: at most 255 printable ASCII characters, no ':'.
    if not name or len(name) > 255 or not set(name) <= _NAME_CHARS:
        raise ValueError(f"{endpoint!r}: {name!r} is not a socket name (letters, digits, '-', '_', '.')")
    return name


class Activated:
    """The sockets systemd passed to this process, by name.

    ``names`` maps a name to its descriptors (a .socket unit with several
    Listen*= lines passes several under one name; a configured endpoint
    takes exactly one).  ``note`` says why there are none when variables
    were set but not for this process."""

    def __init__(self, names: dict[str, list[int]] | None = None, note: str = ""):
        self.names = {k: list(v) for k, v in (names or {}).items()}
        self.note = note
        self.taken: set[str] = set()

    def __repr__(self):
        return f"Activated({self.names!r})"

    def describe(self) -> str:
        if self.names:
            return "systemd passed " + ", ".join(f"{n!r} (fd {', '.join(map(str, fds))})"
                                                 for n, fds in sorted(self.names.items()))
        return self.note or "systemd passed no sockets (LISTEN_FDS is not set)"

    def take(self, endpoint: str, families: tuple[int, ...], what: str) -> tuple[int, int]:
        """The listening socket for ``systemd:name=NAME`` -> (fd, family).

        ActivationError, naming the endpoint and the setting (`what`), when
        no socket of that name was passed, when it was passed more than
        once, or when it is not a listening stream socket of one of
        `families` (e.g. an AF_UNIX socket where the relay needs TCP)."""
        try:
            name = endpoint_name(endpoint)
        except ValueError as e:
            raise ActivationError(f"{what}: {e}") from None
        fds = self.names.get(name)
        if not fds:
            raise ActivationError(f"{what} = {endpoint!r}: no socket named {name!r} was passed by systemd "
                                  f"({self.describe()}); enable the .socket unit with FileDescriptorName={name} "
                                  "and start the daemon through it")
        if len(fds) != 1:
            raise ActivationError(f"{what} = {endpoint!r}: systemd passed {len(fds)} sockets named {name!r}; "
                                  "give each Listen*= line a .socket unit (and name) of its own")
        if name in self.taken:
            raise ActivationError(f"{what} = {endpoint!r}: the socket {name!r} is already used by another "
                                  "setting; each endpoint needs a socket of its own")
        fd = fds[0]
        family = check_listening(fd, families, f"{what} = {endpoint!r}")
        self.taken.add(name)
        return fd, family

    def unused(self) -> list[str]:
        """Names passed but taken by no setting (said in the log)."""
        return sorted(set(self.names) - self.taken)


_FAMILY_NAMES = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6", socket.AF_UNIX: "unix"}


def check_listening(fd: int, families: tuple[int, ...], where: str) -> int:
    """The socket family of `fd` if it is a listening stream socket of one
    of `families`; else ActivationError saying what it is instead."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise ActivationError(f"{where}: file descriptor {fd}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ActivationError(f"{where}: file descriptor {fd} is not a socket")
    s = socket.socket(fileno=os.dup(fd))
    try:
        family, kind = s.family, s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        accepting = s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    finally:
        s.close()
    if kind != socket.SOCK_STREAM:
        raise ActivationError(f"{where}: file descriptor {fd} is not a stream socket (ListenStream= in "
                              "the .socket unit, not ListenDatagram= or ListenSequentialPacket=)")
    if not accepting:
        raise ActivationError(f"{where}: file descriptor {fd} is not listening (Accept=no in the .socket "
                              "unit: the daemon accepts the connections itself)")
    if family not in families:
        want = " or ".join(_FAMILY_NAMES.get(f, str(f)) for f in families)
        raise ActivationError(f"{where}: file descriptor {fd} is a {_FAMILY_NAMES.get(family, family)} "
                              f"socket; this setting needs {want}")
    return family


def from_environment(environ=None) -> Activated:
    """Read the sd_listen_fds(3) variables once and unset them.

    Through libsystemd when python3-systemd is there (it checks LISTEN_PID
    against this process and marks the descriptors close-on-exec); the
    variables are then also removed from `environ` (``os.environ`` by
    default), whose copy libsystemd's unsetenv() does not touch.  With a
    LISTEN_PID that is not this process the sockets are ignored, as
    sd_listen_fds(3) says, and `note` says so for the error a configured
    name then gets."""
    environ = os.environ if environ is None else environ
    seen = {k: environ.get(k) for k in VARIABLES}
    try:
        if seen["LISTEN_FDS"] is None:
            return Activated()
        pid = seen["LISTEN_PID"]
        if pid is None or not pid.isdigit() or int(pid) != os.getpid():
            return Activated(note=f"the sockets systemd passed were meant for process {pid or '(none)'} "
                             f"(LISTEN_PID), not this one ({os.getpid()}): ignored, as sd_listen_fds(3) says")
        try:
            from systemd.daemon import listen_fds_with_names
        except ImportError:
            by_fd = _parse(seen)
        else:
            try:
                by_fd = listen_fds_with_names(unset_environment=True)
            except OSError as e:        # libsystemd's -EINVAL etc. for malformed variables
                raise ActivationError(f"LISTEN_FDS={seen['LISTEN_FDS']!r}, LISTEN_FDNAMES="
                                      f"{seen['LISTEN_FDNAMES']!r}: {e.strerror or e}") from None
        names: dict[str, list[int]] = {}
        for fd, name in sorted(by_fd.items()):
            names.setdefault(name, []).append(fd)
        return Activated(names)
    finally:
        for k in VARIABLES:
            environ.pop(k, None)          # os.environ.pop also unsetenv()s


def _parse(seen: dict) -> dict[int, str]:
    """sd_listen_fds_with_names(3) by hand (LISTEN_PID already checked):
    fds 3..3+LISTEN_FDS-1, named by LISTEN_FDNAMES or "unknown"."""
    import fcntl
    count = seen["LISTEN_FDS"] or ""
    if not count.isdigit():
        raise ActivationError(f"LISTEN_FDS={count!r} is not a number")
    n = int(count)
    names = (seen.get("LISTEN_FDNAMES") or "").split(":") if seen.get("LISTEN_FDNAMES") else []
    if names and len(names) != n:
        raise ActivationError(f"LISTEN_FDNAMES names {len(names)} sockets, LISTEN_FDS says {n}")
    out = {}
    for i in range(n):
        fd = 3 + i
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        out[fd] = names[i] if names else "unknown"
    return out


INET = (socket.AF_INET, socket.AF_INET6)


def resolve(cfg, activated: Activated) -> dict:
    """Every ``systemd:name=`` endpoint of the configuration -> (fd, family),
    checked before the daemon starts anything: ``("relay", i)`` for
    ``relay.listener[i]``, ``"api"``, ``"milter"``.  The relay and the API
    take TCP sockets (the relay's connector rules and the API's per-client
    limits read the peer's address); the milter also a unix one (the MTA's
    chroot).  ActivationError names the first setting that cannot be served."""
    out = {}
    for i, lst in enumerate(cfg.relay.listener):
        if is_activated(lst.endpoint):
            out[("relay", i)] = activated.take(lst.endpoint, INET, f"relay.listener[{i}].endpoint")
    if cfg.api.enabled and is_activated(cfg.api.listen):
        out["api"] = activated.take(cfg.api.listen, INET, "api.listen")
    if cfg.milter is not None and cfg.milter.enabled and is_activated(cfg.milter.listen):
        out["milter"] = activated.take(cfg.milter.listen, INET + (socket.AF_UNIX,), "milter.listen")
    return out


def forward_factory(reactor, path: str, *, attempts: int = 50, delay: float = 0.1):
    """A server factory that joins each accepted connection to the unix
    socket `path` and copies the bytes both ways (the milter: libmilter
    listens only on a socket it opens itself; see docs/SYSTEMD.md).  While
    `path` is not there yet (libmilter's thread is starting) the connection
    waits, up to attempts x delay seconds, then is closed."""
    from twisted.internet.protocol import ClientFactory
    from twisted.protocols import portforward

    class Client(portforward.ProxyClient):
        noisy = False

    class Server(portforward.ProxyServer):
        noisy = False

        def connectionMade(self):
            self.transport.pauseProducing()       # nothing read until the other side is there
            self._attempt(1)

        def _attempt(self, n):
            server = self

            class Factory(ClientFactory):
                def buildProtocol(self, addr):
                    p = Client()
                    p.setPeer(server)
                    return p

                def clientConnectionFailed(self, connector, reason):
                    if n < attempts and server.transport.connected:
                        reactor.callLater(delay, server._attempt, n + 1)
                    else:
                        server.transport.loseConnection()

            reactor.connectUNIX(path, Factory(), timeout=5)

    class Forward(portforward.ProxyFactory):
        protocol = Server
        noisy = False

        def __init__(self):
            pass

    return Forward()
