"""The mutual-TLS tunnel between appliances that carries Xapian's remote
protocol.

Serving side: a TLS listener (federation.serve) that requires a client
certificate issued by the appliances' CA.  The first line inside TLS names
the tenant ("mailtresor-federation/1 TENANT\\n"); the connection is
forwarded to that tenant's xapian-tcpsrv on 127.0.0.1 only when the
certificate's common name is one of a configured peer's and the tenant is
in that peer's `serve` list.  Anything else is answered "refused REASON",
logged, and closed.  The answer "ok" precedes the forwarded bytes.

Searching side: one listener on 127.0.0.1 per (peer, tenant); each
connection Xapian's remote backend makes to it (xapian.remote_open) is
carried over TLS to the peer, whose certificate must be issued by the same
CA and name the peer (hostname check against its DNS name).

This is a byte pipe, not a protocol of our own: the tenant line and the
one-line answer are all it adds to Xapian's.
"""

from __future__ import annotations

import logging
import os
import re

from twisted.internet.protocol import Factory, Protocol

log = logging.getLogger("mailtresor.federation.tunnel")

MAGIC = b"mailtresor-federation/1 "
MAX_LINE = 200                  # bytes of the tenant line / the answer
LINE_TIMEOUT = 10.0             # seconds for a peer to send its tenant line
_TENANT = re.compile(rb"[a-z0-9][a-z0-9_-]{0,62}")


def parse_request(line: bytes) -> str | None:
    """The tenant a tunnel's first line asks for, or None if it is not one.  Pure."""
    if not line.startswith(MAGIC):
        return None
    name = line[len(MAGIC):]
    return name.decode("ascii") if _TENANT.fullmatch(name) else None


def peer_names(transport) -> list[str]:
    """The common names of the TLS peer's certificate ([] if none)."""
    get = getattr(transport, "getPeerCertificate", None)
    cert = get() if get is not None else None
    if cert is None:
        return []
    return [v.decode("utf-8", "replace") for k, v in cert.get_subject().get_components() if k == b"CN"]


def _nodelay(transport) -> None:
    """TCP_NODELAY on the TCP connection under `transport` (under TLS too):
    Xapian's remote protocol is many small requests and answers, and Nagle's
    algorithm with delayed acknowledgements would add ~40 ms to each."""
    seen = 0
    while transport is not None and seen < 4:
        if hasattr(transport, "setTcpNoDelay"):
            try:
                transport.setTcpNoDelay(True)
            except OSError:
                pass
            return
        transport = getattr(transport, "transport", None)
        seen += 1


def socket_owned_here(client_port: int, server_port: int, proc: str = "/proc") -> bool:
    """Whether the loopback TCP connection 127.0.0.1:client_port ->
    127.0.0.1:server_port was made by this process: its socket's inode (in
    /proc/net/tcp) is one of this process's file descriptors.  The tunnel's
    local ends listen on 127.0.0.1, where any local process could connect;
    only this process's own Xapian may use them."""
    want = (f"0100007F:{client_port:04X}", f"0100007F:{server_port:04X}")
    inode = None
    try:
        with open(f"{proc}/net/tcp") as f:
            next(f, None)
            for line in f:
                cols = line.split()
                if len(cols) > 9 and (cols[1], cols[2]) == want:
                    inode = cols[9]
                    break
    except OSError:
        return False
    if not inode or inode == "0":
        return False
    target = f"socket:[{inode}]"
    try:
        for fd in os.listdir(f"{proc}/self/fd"):
            try:
                if os.readlink(f"{proc}/self/fd/{fd}") == target:
                    return True
            except OSError:
                continue
    except OSError:
        return False
    return False


def _where(transport) -> str:
    p = transport.getPeer()
    return f"{getattr(p, 'host', '?')}:{getattr(p, 'port', '?')}"


class _Pipe(Protocol):
    """One end of a splice: what arrives goes to `other` (buffered until it
    is connected)."""

    def __init__(self):
        self.other = None
        self.pending: list[bytes] = []

    def dataReceived(self, data):
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)
        else:
            self.pending.append(data)

    def join(self, other: "_Pipe") -> None:
        self.other = other
        data, self.pending = b"".join(self.pending), []
        if data:
            other.transport.write(data)

    def connectionLost(self, reason=None):
        if self.other is not None and self.other.transport is not None:
            self.other.transport.loseConnection()


# --- the serving side -------------------------------------------------------------

class ServeProtocol(_Pipe):
    """A peer's connection to this appliance's tunnel (inside TLS)."""

    def __init__(self, fed):
        super().__init__()
        self.fed = fed
        self.line = b""
        self.decided = False
        self.timer = None

    def connectionMade(self):
        _nodelay(self.transport)
        self.timer = self.fed.reactor.callLater(LINE_TIMEOUT, self._too_slow)

    def _too_slow(self):
        self.timer = None
        if not self.decided:
            self._refuse("no tenant line in time", peer_names(self.transport))

    def _refuse(self, reason: str, names: list[str], tenant: str | None = None) -> None:
        self.decided = True
        self.fed.refused += 1
        log.warning("federation: refused %s (certificate %s, tenant %s): %s", _where(self.transport),
                    names or "none", tenant or "-", reason)
        self.transport.write(b"refused " + reason.encode()[:MAX_LINE] + b"\n")
        self.transport.loseConnection()

    def dataReceived(self, data):
        if self.decided:
            return super().dataReceived(data)
        self.line += data
        if b"\n" not in self.line:
            if len(self.line) > MAX_LINE:
                self._refuse("no tenant line", peer_names(self.transport))
            return
        line, _, rest = self.line.partition(b"\n")
        self.line = b""
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        names = peer_names(self.transport)
        peer = self.fed.peer_by_cert(names)
        tenant = parse_request(line)
        if peer is None:
            return self._refuse("the certificate names no peer of this appliance", names)
        if tenant is None:
            return self._refuse("not a tenant request", names)
        server = self.fed.servers.get(tenant)
        if tenant not in peer.serve or server is None:
            # The same answer whether the tenant exists or not.
            return self._refuse(f"tenant {tenant} is not served to {peer.name}", names, tenant)
        self.decided = True
        if rest:
            self.pending.append(rest)
        try:
            server.refresh()
        except OSError as e:
            log.error("federation: cannot write the stub of %s: %s", tenant, e)
        log.info("federation: %s (%s) searches tenant %s", peer.name, _where(self.transport), tenant)
        self.fed.served += 1
        self.transport.pauseProducing()
        from twisted.internet.endpoints import TCP4ClientEndpoint
        back = _Pipe()
        d = TCP4ClientEndpoint(self.fed.reactor, "127.0.0.1", server.port, timeout=5).connect(
            _OneFactory(back))

        def connected(_):
            _nodelay(back.transport)
            self.transport.write(b"ok\n")
            back.other = self
            self.join(back)
            self.transport.resumeProducing()

        def failed(f):
            log.error("federation: xapian-tcpsrv of %s does not answer: %s", tenant, f.getErrorMessage())
            self.transport.write(b"refused the index server is not running\n")
            self.transport.loseConnection()
        d.addCallbacks(connected, failed)

    def connectionLost(self, reason=None):
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if not self.decided:
            # A handshake refused by OpenSSL (no certificate, another CA)
            # ends here without a line.
            self.fed.refused += 1
            log.warning("federation: refused %s: %s", _where(self.transport),
                        reason.getErrorMessage() if reason is not None else "closed")
        super().connectionLost(reason)


class _OneFactory(Factory):
    def __init__(self, proto):
        self.proto = proto

    def buildProtocol(self, addr):
        return self.proto


def serve_factory(fed, options):
    """The TLS listening factory of the serving side."""
    from twisted.protocols.tls import TLSMemoryBIOFactory

    class F(Factory):
        def buildProtocol(self, addr):
            return ServeProtocol(fed)
    return TLSMemoryBIOFactory(options, False, F())


# --- the searching side -------------------------------------------------------------

class _Remote(_Pipe):
    """The TLS connection to the peer: sends the tenant line, waits for "ok"."""

    def __init__(self, local: "LocalProtocol"):
        super().__init__()
        self.local = local
        self.answer = b""
        self.ready = False

    def connectionMade(self):
        _nodelay(self.transport)
        self.transport.write(MAGIC + self.local.tenant.encode() + b"\n")

    def dataReceived(self, data):
        if self.ready:
            return super().dataReceived(data)
        self.answer += data
        if b"\n" not in self.answer:
            if len(self.answer) > MAX_LINE:
                self.transport.loseConnection()
            return
        line, _, rest = self.answer.partition(b"\n")
        if line != b"ok":
            log.warning("federation: peer %s refused tenant %s: %s", self.local.peer.name, self.local.tenant,
                        line.decode("utf-8", "replace")[:MAX_LINE])
            self.transport.loseConnection()
            return
        self.ready = True
        self.other = self.local
        self.local.join(self)
        if rest:
            self.local.transport.write(rest)

    def connectionLost(self, reason=None):
        if not self.ready:
            log.warning("federation: peer %s (%s) for tenant %s: %s", self.local.peer.name,
                        self.local.peer.address, self.local.tenant,
                        reason.getErrorMessage() if reason is not None else "closed")
        if self.local.transport is not None:
            self.local.transport.loseConnection()


class LocalProtocol(_Pipe):
    """A connection from this process's Xapian to 127.0.0.1: carried to the peer."""

    def __init__(self, fed, peer, tenant: str):
        super().__init__()
        self.fed, self.peer, self.tenant = fed, peer, tenant
        self.remote = None

    def connectionMade(self):
        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
        client, server = self.transport.getPeer(), self.transport.getHost()
        if not socket_owned_here(client.port, server.port):
            self.fed.refused += 1
            log.warning("federation: refused a local connection to the tunnel end of %s/%s from "
                        "127.0.0.1:%d: not made by this process", self.peer.name, self.tenant, client.port)
            self.transport.abortConnection()
            return
        _nodelay(self.transport)
        host, _, port = self.peer.address.rpartition(":")
        ep = wrapClientTLS(self.fed.client_options(self.peer),
                           HostnameEndpoint(self.fed.reactor, host.strip("[]"), int(port),
                                            timeout=self.fed.cfg.connect_timeout))
        self.remote = _Remote(self)
        d = ep.connect(_OneFactory(self.remote))

        def failed(f):
            log.warning("federation: cannot reach peer %s at %s: %s", self.peer.name, self.peer.address,
                        f.getErrorMessage())
            if self.transport is not None:
                self.transport.loseConnection()
        d.addErrback(failed)

    def connectionLost(self, reason=None):
        if self.remote is not None and self.remote.transport is not None:
            self.remote.transport.loseConnection()


def local_factory(fed, peer, tenant: str) -> Factory:
    class F(Factory):
        def buildProtocol(self, addr):
            return LocalProtocol(fed, peer, tenant)
    return F()
