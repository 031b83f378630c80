"""The TLS-only SMTP relay: the target of Exchange journal rules.

An ESMTP server engine on Twisted transports (Twisted's own `smtp.SMTP`
answers a failed end-of-data with a permanent 550 and hides bare line
feeds behind its line splitting; an archive needs both under control).

What it promises:
- nothing but EHLO/HELO/STARTTLS/NOOP/RSET/QUIT before TLS
  (`530 5.7.0 Must issue a STARTTLS command first`); an implicit-TLS port;
  TLS 1.2 at least;
- who may deliver is decided per connector: source network and/or client
  certificate; a connector may name its tenant;
- DATA is taken byte for byte: only `<CR><LF>.<CR><LF>` ends it and dot
  stuffing is undone only after `<CR><LF>`, so no `<LF>.<LF>` or
  `<CR>.<CR>` can end a message early (SMTP smuggling).  A bare <LF> or
  bare <CR> inside a message is kept as it came and the entry flagged
  `bare-newline`: a 5xx would make the sender bounce journal mail, which
  the archive would then never have.  `[relay] bare_newline = "reject"`
  refuses it with `550 5.5.2` instead (Postfix's
  `smtpd_forbid_bare_newline = reject`).  A bare <LF> or <CR> in a
  command is always refused (`550 5.5.2`, closed);
- nobody holds a connection for nothing: on an implicit-TLS port the
  connector networks and connection limits are checked when the TCP
  connection is accepted, before any TLS work; a handshake has
  `handshake_timeout`; sessions are limited per client address
  (`max_connections_per_client`, per process); a session ends at
  `session_timeout` whatever it does, and DATA slower than `min_data_rate`
  bytes/s over `data_rate_window` is cut (`421 4.4.2`; an unfinished
  message is aborted, never half-stored);
- parameters are RFC 5321 syntax in ASCII (`SIZE=²` is a `501`, never an
  exception);
- `250 2.0.0 Ok: queued as ID` only once the spool says the entry is
  durable; every storage failure is a 4xx (mailtresor.ingest.replies).

The engine knows nothing of storage: it talks to a `Sink` (the spool).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol as TypingProtocol

from OpenSSL import SSL, crypto as ossl
from twisted.internet import interfaces
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.protocols.policies import TimeoutMixin
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from mailtresor.ingest import replies
from mailtresor.ingest.replies import Reply
from mailtresor.ingest.spool import Envelope

log = logging.getLogger("mailtresor.ingest.relay")

MAX_COMMAND_LINE = 4096
MAX_ERRORS = 10
# After our last reply, a TLS close waits for the peer's close_notify; a peer
# that never sends it must not hold the session (and shutdown) open.
CLOSE_GRACE = 2.0


class Writer(TypingProtocol):
    id: str

    def write(self, data: bytes) -> None: ...

    def commit(self, envelope: Envelope): ...  # concurrent.futures.Future[str]

    def abort(self) -> None: ...


class Sink(TypingProtocol):
    def admit(self, size_hint: int = 0) -> None: ...

    def open_writer(self, size_hint: int = 0) -> Writer: ...


# --- TLS ----------------------------------------------------------------------------

class ServerTLS:
    """Server TLS context; asks for a client certificate without requiring
    one, and remembers (rather than refuses) certificates that do not verify,
    so that the SMTP dialogue can say precisely what is wrong."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None = None,
                 min_version: str = "1.2"):
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION if min_version == "1.3" else SSL.TLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
        ctx.set_cipher_list(b"ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:!aNULL:!MD5:!DSS")
        ctx.use_certificate_chain_file(str(cert_file))
        ctx.use_privatekey_file(str(key_file))
        ctx.check_privatekey()
        # No session resumption: the client-certificate verdict comes from
        # the verify callback, which does not run when a session is
        # resumed, so a resumed session of a refused certificate would
        # look trusted.  A full handshake per connection is what journaling
        # MTAs (few, long connections) cost anyway.
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_options(SSL.OP_NO_TICKET)
        self._failed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        if client_ca_file is not None:
            ctx.load_verify_locations(str(client_ca_file))
            ca = ossl.load_certificate(ossl.FILETYPE_PEM, Path(client_ca_file).read_bytes())
            ctx.set_client_ca_list([ca.get_subject()])
            ctx.set_verify(SSL.VERIFY_PEER, self._verify)
        self._ctx = ctx

    def _verify(self, conn, cert, errnum, depth, ok):
        if not ok:
            self._failed[conn] = errnum
        return True

    def getContext(self):
        return self._ctx

    def facts(self, conn: SSL.Connection) -> dict:
        facts = {"version": conn.get_protocol_version_name(), "cipher": conn.get_cipher_name(),
                 "client_cert": None}
        cert = conn.get_peer_certificate()
        if cert is not None:
            subject = dict(cert.get_subject().get_components())
            facts["client_cert"] = {
                "subject": ", ".join(f"{k.decode()}={v.decode('utf-8', 'replace')}"
                                     for k, v in cert.get_subject().get_components()),
                "cn": subject.get(b"CN", b"").decode("utf-8", "replace"),
                "issuer": ", ".join(f"{k.decode()}={v.decode('utf-8', 'replace')}"
                                    for k, v in cert.get_issuer().get_components()),
                "sha256": cert.digest("sha256").decode(),
                "trusted": conn not in self._failed,
            }
        return facts


# --- who may deliver ---------------------------------------------------------------------

@dataclass(frozen=True)
class Connector:
    name: str
    networks: tuple = ()
    client_cert: str = "optional"       # "required" | "optional"
    client_cert_names: tuple = ()
    tenant: str = ""
    recipients: frozenset = frozenset()     # lower case; empty: any
    journal: bool = False               # a journaling connector (config.Connector.journal)
    exchange_tenant_id: str = ""        # the X-MS-Exchange-CrossTenant-Id its reports must carry

    def network_ok(self, ip) -> bool:
        return not self.networks or any(ip in n for n in self.networks)

    def recipient_ok(self, address: str) -> bool:
        return not self.recipients or address.lower() in self.recipients

    def journaling(self) -> dict | None:
        """What the spool envelope records of this connector's trust in
        journal reports (spool.Envelope.journaling): decided here, at
        acceptance, from configuration alone -- never from the message."""
        if not self.journal:
            return None
        return {"tenant_id": self.exchange_tenant_id.lower()}


class Gate:
    """Connector decisions; pure, so it is tested without sockets."""

    def __init__(self, connectors):
        self.connectors = [Connector(c.name, tuple(ipaddress.ip_network(n, strict=False) for n in c.networks),
                                     c.client_cert, tuple(c.client_cert_names), c.tenant,
                                     frozenset(r.lower() for r in c.recipients),
                                     getattr(c, "journal", False), getattr(c, "exchange_tenant_id", ""))
                           for c in connectors]

    def may_connect(self, address: str) -> bool:
        ip = _ip(address)
        return ip is not None and any(c.network_ok(ip) for c in self.connectors)

    def choose(self, address: str, tls: dict | None) -> tuple[Connector | None, Reply | None]:
        """The first connector this client satisfies, or the reply saying why none."""
        found, refusal = self.candidates(address, tls)
        return (found[0], None) if found else (None, refusal)

    def candidates(self, address: str, tls: dict | None) -> tuple[list[Connector], Reply | None]:
        """Every connector this client satisfies, in configuration order, or
        the reply saying why none.  Several Exchange Online organisations
        present the same certificate from the same networks: their
        connectors differ only in their journal addresses, so the first
        RCPT TO decides among them (`for_recipient`)."""
        ip = _ip(address)
        cert = (tls or {}).get("client_cert")
        trusted = bool(cert and cert["trusted"])
        wanted_cert = False
        found = []
        for c in self.connectors:
            if ip is None or not c.network_ok(ip):
                continue
            if c.client_cert_names:
                if trusted and cert["cn"] in c.client_cert_names:
                    found.append(c)
                else:
                    wanted_cert = True
                continue
            if c.client_cert == "required":
                if trusted:
                    found.append(c)
                else:
                    wanted_cert = True
                continue
            found.append(c)
        if found:
            return found, None
        if cert and not trusted:
            return [], Reply(550, "5.7.1", "Error: client certificate not issued by a trusted CA")
        if cert and wanted_cert:
            return [], Reply(550, "5.7.1", f"Error: client certificate {cert['cn']!r} is not authorised here")
        if wanted_cert:
            return [], Reply(530, "5.7.0", "Error: a client certificate is required")
        return [], Reply(550, "5.7.1", "Error: client not authorised")

    @staticmethod
    def for_recipient(candidates: list[Connector], address: str) -> list[Connector]:
        """The candidates that take this recipient (first one: the connector)."""
        return [c for c in candidates if c.recipient_ok(address)]


def _ip(address: str):
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    # On a dual-stack socket (a .socket unit's ListenStream=25) an IPv4
    # client is ::ffff:a.b.c.d: the connector networks are written in IPv4.
    return (ip.ipv4_mapped or ip) if ip.version == 6 else ip


# --- DATA -------------------------------------------------------------------------------------

class BareLineEnding(Exception):
    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


class DataReader:
    """Undo dot stuffing and find the end of DATA, byte for byte.

    `feed()` returns (content, rest, done): content to store, and when
    `done`, the bytes that followed `.<CR><LF>` (pipelined commands).

    Only `<CR><LF>.<CR><LF>` ends DATA and a dot is unstuffed only at the
    start of a line that follows `<CR><LF>`: an `<LF>.<LF>`, `<LF>.<CR><LF>`
    or `<CR>.<CR>` is message content like any other bytes, so nothing can
    be smuggled past the end of a message (SMTP smuggling), and nothing of
    it is changed either.  A bare <LF> (without <CR>) or bare <CR> (without
    <LF>) is noted in `bare` ({"LF", "CR"}); with `strict`, it raises
    BareLineEnding instead (the site's choice to refuse such mail).
    """

    LONG_LINE = 8192

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.bare: set[str] = set()
        self._pending = b""
        self._line_start = True   # does _pending begin a line (after <CR><LF>)?

    def _bare(self, what: str) -> None:
        if self.strict:
            raise BareLineEnding(what)
        self.bare.add(what)

    def feed(self, data: bytes) -> tuple[bytes, bytes, bool]:
        buf, self._pending = self._pending + data, b""
        if self._line_start and buf[:3] == b".\r\n":
            return b"", buf[3:], True
        end = buf.find(b"\r\n.\r\n")
        if end >= 0:
            segment, tail, rest, done = buf[:end + 2], b"", buf[end + 5:], True
        else:
            cut = buf.rfind(b"\r\n")
            segment, tail = (b"", buf) if cut < 0 else (buf[:cut + 2], buf[cut + 2:])
            rest, done = b"", False
        # Every <LF> should follow a <CR> and every <CR> precede an <LF>; a
        # <CR> at the very end of the buffer may still meet its <LF>.
        # Remove the proper line ends; any <CR> or <LF> left is bare.
        rest_of_lines = segment.replace(b"\r\n", b"")
        if b"\n" in rest_of_lines or b"\n" in tail:
            self._bare("LF")
        if b"\r" in rest_of_lines or b"\r" in tail[:-1]:
            self._bare("CR")
        out = segment
        if out:
            if self._line_start and out[:1] == b".":
                out = out[1:]
            out = out.replace(b"\r\n.", b"\r\n")
            self._line_start = True
        if len(tail) > self.LONG_LINE:
            # A long line: pass it on but for a possible final <CR>.
            keep = 1 if tail.endswith(b"\r") else 0
            head, tail = tail[:len(tail) - keep], tail[len(tail) - keep:]
            if self._line_start and head[:1] == b".":
                head = head[1:]
            out += head
            self._line_start = False
        self._pending = tail
        return out, rest, done


# --- the protocol --------------------------------------------------------------------------

@dataclass
class Transaction:
    mail_from: str
    mail_params: dict
    connector: Connector
    # The connectors still possible (Gate.candidates, narrowed by each RCPT
    # TO); `connector` is the first of them.
    candidates: list = field(default_factory=list)
    rcpt_to: list = field(default_factory=list)
    rcpt_params: list = field(default_factory=list)
    writer: Writer | None = None
    reader: DataReader | None = None
    size_hint: int = 0              # MAIL FROM's SIZE=, checked


ADDRESS = re.compile(r"^<(?P<addr>[^<>]*)>(?P<params>(?: +\S+)*) *$")
# RFC 5321 esmtp-keyword; ASCII only: str.upper() maps "ſ" to "S" and "ı"
# to "I", and str.isdigit() takes "²", so only these patterns decide.
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*", re.ASCII)
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_verb = re.compile(rb"^([A-Za-z]+)(?: (.*))?$", re.S)


@implementer(interfaces.IHandshakeListener)
class RelayProtocol(Protocol, TimeoutMixin):
    def __init__(self, factory: "RelayFactory", implicit_tls: bool):
        self.factory = factory
        self.implicit_tls = implicit_tls
        self.tls: dict | None = None
        self.helo = ""
        self.esmtp = False
        self.txn: Transaction | None = None
        self.buffer = b""
        self.mode = "command"          # command | data | tls | busy | closed
        self.errors = 0
        self.peer = ("", 0)
        self.cid = 0
        self.callLater = factory.clock.callLater
        self.messages = 0
        self._abort_call = None
        self._handshake_call = None     # a TLS handshake must finish by then
        self._deadline_call = None      # the session's overall deadline
        self._rate_call = None          # the next minimum-data-rate check in DATA
        self._rate_bytes = 0            # bytes received in DATA since the last check
        self._expired = False           # deadline passed while a commit was running
        self.log = factory.log
        self._out: list[bytes] | None = None   # replies batched while handling input

    # --- connection ---

    def connectionMade(self):
        f = self.factory
        peer = self.transport.getPeer()
        self.peer = (getattr(peer, "host", ""), getattr(peer, "port", 0))
        self.cid = f.next_cid()
        f.active.add(self)
        f.clients.add(self.peer[0])
        self.log.info("conn %d: connect from [%s]:%s on %s", self.cid, self.peer[0], self.peer[1], f.listener_name)
        self.setTimeout(f.timeout)
        if f.session_timeout:
            self._deadline_call = self.callLater(f.session_timeout, self._session_expired)
        if self.implicit_tls:
            # The connector networks, the connection limits and the
            # per-client limit were checked before the handshake
            # (ImplicitTLSFactory); the greeting waits for the handshake.
            self.mode = "tls"
            self._expect_handshake()
            return
        self._greet()

    def _expect_handshake(self):
        self._handshake_call = self.callLater(self.factory.handshake_timeout, self._handshake_expired)

    def _handshake_expired(self):
        """No finished handshake in time: nothing can be said in TLS yet, and
        nothing in the clear, so the connection is just dropped."""
        self._handshake_call = None
        if self.mode != "tls":
            return
        self.log.info("conn %d: TLS handshake not finished within %g s from [%s]; dropped", self.cid,
                      self.factory.handshake_timeout, self.peer[0])
        self._reset()
        self.mode = "closed"
        self.setTimeout(None)
        self.transport.abortConnection()

    def _session_expired(self):
        """The session's overall deadline.  A commit in progress finishes (its
        250 is owed); anything unfinished is dropped, never half-stored."""
        self._deadline_call = None
        if self.mode == "closed":
            return
        if self.mode == "busy":
            self._expired = True
            return
        self.log.info("conn %d: session time limit (%g s) reached%s from [%s]", self.cid,
                      self.factory.session_timeout, " in DATA" if self.mode == "data" else "", self.peer[0])
        self._cut(Reply(421, "4.4.2", f"{self.factory.hostname} Error: session time limit exceeded"))

    def _cut(self, reply: Reply):
        """End the session on our initiative: an unfinished transaction is
        aborted (nothing of it was acknowledged), then 421 and close."""
        if self.mode == "tls":
            self.mode = "closed"
            self.setTimeout(None)
            return self.transport.abortConnection()
        self._reset()
        self._close_with(reply)

    def _check_data_rate(self):
        """Every data_rate_window seconds of DATA: at least min_data_rate
        bytes a second must have come, or the session is cut (slow loris)."""
        f = self.factory
        self._rate_call = None
        if self.mode != "data":
            return
        if self._rate_bytes < f.min_data_rate * f.data_rate_window:
            self.log.warning("conn %d: DATA too slow from [%s]: %d bytes in %g s (minimum %d bytes/s); cut",
                             self.cid, self.peer[0], self._rate_bytes, f.data_rate_window, f.min_data_rate)
            return self._cut(Reply(421, "4.4.2", f"{f.hostname} Error: data rate too low, closing"))
        self._rate_bytes = 0
        self._rate_call = self.callLater(f.data_rate_window, self._check_data_rate)

    def _stop_data_rate(self):
        if self._rate_call is not None and self._rate_call.active():
            self._rate_call.cancel()
        self._rate_call = None

    def handshakeCompleted(self):
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None
        if self.mode == "closed":
            return
        self.tls = self.factory.tls.facts(self.transport.getHandle())
        cert = self.tls["client_cert"]
        self.log.info("conn %d: TLS %s %s%s", self.cid, self.tls["version"], self.tls["cipher"],
                 f", client certificate CN={cert['cn']} ({'trusted' if cert['trusted'] else 'NOT trusted'})"
                 if cert else "")
        if self.implicit_tls and self.mode == "tls":
            self.mode = "command"
            self._greet()
            self._process()
        elif self.mode == "tls":
            self.mode = "command"
            self._process()

    def _greet(self):
        f = self.factory
        if f.shutting_down:
            return self._close_with(replies.SHUTTING_DOWN)
        if len(f.active) > f.max_connections:
            return self._close_with(Reply(421, "4.7.0", "Error: too many connections, try again later"))
        if f.clients.over(self.peer[0], f.max_connections_per_client):
            self.log.warning("conn %d: reject: [%s] already has %d connections (limit %d per client)", self.cid,
                             self.peer[0], f.clients.count(self.peer[0]) - 1, f.max_connections_per_client)
            return self._close_with(Reply(421, "4.7.0", "Error: too many connections from your address, "
                                                        "try again later"))
        if not f.gate.may_connect(self.peer[0]):
            self.log.warning("conn %d: reject: [%s] is in no connector's networks", self.cid, self.peer[0])
            return self._close_with(Reply(554, "5.7.1", f"Access denied: client {self.peer[0]} is not allowed"))
        try:
            f.sink.admit(0)
        except Exception as e:  # noqa: BLE001 - only some failures refuse a greeting
            refusal = replies.at_greeting(e)
            if refusal is not None:
                self.log.warning("conn %d: refused [%s]: %s", self.cid, self.peer[0], e)
                return self._close_with(refusal)
        self._send(f"220 {f.hostname} ESMTP mailtresor\r\n".encode())

    def connectionLost(self, reason=None):
        self.setTimeout(None)
        for call in (self._abort_call, self._handshake_call, self._deadline_call, self._rate_call):
            if call is not None and call.active():
                call.cancel()
        if self in self.factory.active:
            self.factory.clients.remove(self.peer[0])
        self.factory.active.discard(self)
        if self.txn is not None and self.txn.writer is not None and self.mode != "busy":
            self.txn.writer.abort()
        self.mode = "closed"
        self.log.info("conn %d: disconnect from [%s] messages=%d", self.cid, self.peer[0], self.messages)
        self.factory.connection_closed(self)

    def timeoutConnection(self):
        self.log.info("conn %d: timeout after %s from [%s]", self.cid,
                 {"data": "DATA", "tls": "TLS handshake"}.get(self.mode, "command"), self.peer[0])
        self._cut(Reply(421, "4.4.2", f"{self.factory.hostname} Error: timeout exceeded"))

    def _send(self, data: bytes):
        if self.mode == "closed":
            return
        if self._out is not None:
            self._out.append(data)
        else:
            self.transport.write(data)

    def _batched(self, fn, *args):
        """Run fn, sending the replies it produces as one write (one TLS
        record for a whole pipelined group)."""
        if self._out is not None:
            return fn(*args)
        self._out = []
        try:
            return fn(*args)
        finally:
            out, self._out = self._out, None
            if out:
                self.transport.write(b"".join(out))

    def _reply(self, reply: Reply):
        self._send(reply.line())

    def _close_with(self, reply: Reply):
        self._reply(reply)
        if self._out:
            self.transport.write(b"".join(self._out))
            self._out.clear()
        self.mode = "closed"
        self.setTimeout(None)
        self.transport.loseConnection()
        self._abort_call = self.callLater(CLOSE_GRACE, self.transport.abortConnection)

    # --- input ---

    def dataReceived(self, data: bytes):
        if self.mode == "closed":
            return
        self.resetTimeout()
        self.buffer += data
        self._batched(self._process)

    def _process(self):
        while self.buffer and self.mode in ("command", "data"):
            if self.mode == "data":
                self._data_input()
                continue
            nl = self.buffer.find(b"\n")
            if nl < 0:
                if len(self.buffer) > MAX_COMMAND_LINE:
                    self._close_with(Reply(500, "5.5.2", "Error: line too long"))
                return
            line, self.buffer = self.buffer[:nl + 1], self.buffer[nl + 1:]
            if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
                self.log.warning("conn %d: bare <%s> in a command from [%s]", self.cid,
                            "LF" if not line.endswith(b"\r\n") else "CR", self.peer[0])
                self._close_with(Reply(550, "5.5.2", "Error: bare <LF> received"
                                       if not line.endswith(b"\r\n") else "Error: bare <CR> received"))
                return
            if len(line) > MAX_COMMAND_LINE:
                self._close_with(Reply(500, "5.5.2", "Error: line too long"))
                return
            self._command(line[:-2])

    def _command(self, line: bytes):
        f = self.factory
        m = _verb.match(line)
        verb = m.group(1).upper().decode() if m else ""
        arg_b = (m.group(2) or b"") if m else b""
        arg = arg_b.decode("utf-8", "surrogateescape")
        if f.shutting_down and self.txn is None and verb != "QUIT":
            return self._close_with(replies.SHUTTING_DOWN)
        handler = getattr(self, f"smtp_{verb}", None) if verb else None
        if handler is None:
            return self._error(Reply(502, "5.5.2", "Error: command not recognized"))
        handler(arg)

    def _error(self, reply: Reply):
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            return self._close_with(Reply(421, "4.7.0", f"{self.factory.hostname} Error: too many errors"))
        self._reply(reply)

    # --- commands ---

    def smtp_EHLO(self, arg):
        if not arg.strip():
            return self._error(Reply(501, "5.5.4", "Syntax: EHLO hostname"))
        self._reset()
        self.helo, self.esmtp = arg.strip(), True
        f = self.factory
        lines = [f.hostname, "PIPELINING", f"SIZE {f.max_size}", "8BITMIME", "SMTPUTF8",
                 "ENHANCEDSTATUSCODES"]
        if not self.implicit_tls and self.tls is None:
            lines.append("STARTTLS")
        out = "".join(f"250-{ln}\r\n" for ln in lines[:-1]) + f"250 {lines[-1]}\r\n"
        self._send(out.encode())

    def smtp_HELO(self, arg):
        if not arg.strip():
            return self._error(Reply(501, "5.5.4", "Syntax: HELO hostname"))
        self._reset()
        self.helo, self.esmtp = arg.strip(), False
        self._send(f"250 {self.factory.hostname}\r\n".encode())

    def smtp_STARTTLS(self, arg):
        if arg:
            return self._error(Reply(501, "5.5.4", "Syntax: STARTTLS"))
        if self.tls is not None or self.implicit_tls:
            return self._error(Reply(554, "5.5.1", "Error: TLS already active"))
        self._reply(Reply(220, "2.0.0", "Ready to start TLS"))
        if self._out:   # the 220 must leave in the clear, before the switch
            self.transport.write(b"".join(self._out))
            self._out.clear()
        # Anything the client pipelined after STARTTLS was sent in the clear:
        # drop it (CVE-2011-0411 style command injection).
        self.buffer = b""
        self._reset()
        self.helo, self.esmtp = "", False
        self.mode = "tls"
        self._expect_handshake()
        self.transport.startTLS(self.factory.tls)

    def smtp_NOOP(self, arg):
        self._reply(Reply(250, "2.0.0", "Ok"))

    def smtp_RSET(self, arg):
        self._reset()
        self._reply(Reply(250, "2.0.0", "Ok"))

    def smtp_QUIT(self, arg):
        self._close_with(Reply(221, "2.0.0", "Bye"))

    def smtp_VRFY(self, arg):
        self._reply(Reply(502, "5.5.1", "VRFY command is disabled"))

    def smtp_HELP(self, arg):
        self._reply(Reply(214, "2.0.0", "See RFC 5321"))

    def smtp_MAIL(self, arg):
        f = self.factory
        if not self.helo:
            return self._error(Reply(503, "5.5.1", "Error: send HELO/EHLO first"))
        if self.tls is None:
            self.log.warning("conn %d: reject: MAIL before STARTTLS from [%s]", self.cid, self.peer[0])
            return self._error(Reply(530, "5.7.0", "Must issue a STARTTLS command first"))
        if self.txn is not None:
            return self._error(Reply(503, "5.5.1", "Error: nested MAIL command"))
        if not arg[:5].upper() == "FROM:":
            return self._error(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
        parsed = _address(arg[5:])
        if parsed is None:
            return self._error(Reply(501, "5.1.7", "Bad sender address syntax"))
        addr, params = parsed
        size_hint, refusal = mail_parameters(params, self.esmtp)
        if refusal is not None:
            return self._error(refusal)
        if size_hint > f.max_size:
            self.log.warning("conn %d: reject: SIZE=%d over the limit from [%s]", self.cid, size_hint,
                             self.peer[0])
            return self._error(replies.TOO_LARGE)
        candidates, refusal = f.gate.candidates(self.peer[0], self.tls)
        if not candidates:
            self.log.warning("conn %d: reject: MAIL from [%s]: %d %s %s", self.cid, self.peer[0], *refusal)
            return self._error(refusal)
        try:
            f.sink.admit(size_hint)
        except Exception as e:  # noqa: BLE001 - every failure has a reply
            reply = replies.for_failure(e)
            self.log.warning("conn %d: reject: MAIL from [%s]: %d %s %s (%s)", self.cid, self.peer[0],
                        *reply, e)
            return self._reply(reply)
        self.txn = Transaction(addr, params, candidates[0], candidates, size_hint=size_hint)
        self._reply(Reply(250, "2.1.0", "Ok"))

    def smtp_RCPT(self, arg):
        if self.txn is None:
            return self._error(Reply(503, "5.5.1", "Error: need MAIL command"))
        if not arg[:3].upper() == "TO:":
            return self._error(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
        parsed = _address(arg[3:])
        if parsed is None or not parsed[0]:
            return self._error(Reply(501, "5.1.3", "Bad recipient address syntax"))
        addr, params = parsed
        if params:
            k = next(iter(params))
            if not _KEYWORD.fullmatch(k):
                return self._error(Reply(501, "5.5.4", "Syntax error in parameters"))
            return self._error(Reply(555, "5.5.4", f"Unsupported option: {k}"))
        still = self.factory.gate.for_recipient(self.txn.candidates or [self.txn.connector], addr)
        if not still:
            # Not a journal address of this connector: an unguessable
            # journal address only protects the archive if others bounce.
            self.log.warning("conn %d: reject: RCPT from [%s]: not a recipient of connector %s",
                             self.cid, self.peer[0], self.txn.connector.name)
            return self._reply(Reply(550, "5.1.1", "Error: recipient address rejected: "
                                                   "not a journal address of this connector"))
        if len(self.txn.rcpt_to) >= self.factory.max_recipients:
            return self._reply(Reply(452, "4.5.3", "Error: too many recipients"))
        # Every recipient of a transaction is one connector's: the message is
        # stored once, under one connector's authority.
        self.txn.candidates, self.txn.connector = still, still[0]
        self.txn.rcpt_to.append(addr)
        self.txn.rcpt_params.append(params)
        self._reply(Reply(250, "2.1.5", "Ok"))

    def smtp_DATA(self, arg):
        if arg:
            return self._error(Reply(501, "5.5.4", "Syntax: DATA"))
        if self.txn is None:
            return self._error(Reply(503, "5.5.1", "Error: need MAIL command"))
        if not self.txn.rcpt_to:
            return self._error(Reply(503, "5.5.1", "Error: need RCPT command"))
        try:
            self.txn.writer = self.factory.sink.open_writer(self.txn.size_hint)
        except Exception as e:  # noqa: BLE001
            reply = replies.for_failure(e)
            self.log.warning("conn %d: reject: DATA from [%s]: %d %s %s (%s)", self.cid, self.peer[0], *reply, e)
            self._reset()
            return self._reply(reply)
        f = self.factory
        self.txn.reader = DataReader(strict=f.bare_newline == "reject")
        self.mode = "data"
        if f.min_data_rate:
            self._rate_bytes = 0
            self._rate_call = self.callLater(f.data_rate_window, self._check_data_rate)
        self._send(b"354 End data with <CR><LF>.<CR><LF>\r\n")

    # --- DATA ---

    def _data_input(self):
        txn = self.txn
        data, self.buffer = self.buffer, b""
        self._rate_bytes += len(data)
        try:
            content, rest, done = txn.reader.feed(data)
        except BareLineEnding as e:
            # Only with [relay] bare_newline = "reject": the sender bounces it.
            self.log.warning("conn %d: reject: bare <%s> in DATA from [%s]", self.cid, e.what, self.peer[0])
            self._reset()
            return self._close_with(Reply(550, "5.5.2", f"Error: bare <{e.what}> received"))
        if content:
            txn.writer.write(content)
        if done:
            self.buffer = rest
            self._end_of_data()

    def _end_of_data(self):
        txn, f = self.txn, self.factory
        self._stop_data_rate()
        flags = []
        if txn.reader.bare:
            # Kept byte for byte; the flag lets an auditor find such mail
            # (flag:bare-newline), whose line ends an MTA might have changed.
            flags.append("bare-newline")
            self.log.warning("conn %d: bare <%s> in DATA from [%s]: kept as received, flagged bare-newline",
                             self.cid, "> and <".join(sorted(txn.reader.bare, reverse=True)), self.peer[0])
        env = Envelope(
            source="relay", mail_from=txn.mail_from, rcpt_to=list(txn.rcpt_to),
            connector=txn.connector.name, tenant=txn.connector.tenant,
            journaling=txn.connector.journaling(),
            client_address=self.peer[0], client_port=self.peer[1], helo=self.helo,
            tls=self.tls, mail_params={k: v for k, v in txn.mail_params.items()},
            rcpt_params=list(txn.rcpt_params), received_at=time.time(), flags=flags)
        self.mode = "busy"
        self.setTimeout(None)
        self.transport.pauseProducing()
        started = time.monotonic()
        fut = txn.writer.commit(env)
        f.inflight += 1

        def finished(entry_id, error):
            f.inflight -= 1
            if self.mode == "closed":
                if error is None:
                    self.log.warning("conn %d: %s: queued, but the client left before the reply", self.cid, entry_id)
                return
            self.txn = None
            if error is None:
                self.messages += 1
                self.log.info("conn %d: %s: from=<%s> nrcpt=%d size=%d connector=%s%s tls=%s queued (%.1f ms)",
                         self.cid, entry_id, _printable(env.mail_from), len(env.rcpt_to), env.size,
                         env.connector, f" tenant={env.tenant}" if env.tenant else "",
                         (self.tls or {}).get("version"), (time.monotonic() - started) * 1000)
                self._reply(Reply(250, "2.0.0", f"Ok: queued as {entry_id}"))
            else:
                reply = replies.for_failure(error)
                self.log.warning("conn %d: not queued: from=<%s> size=%d: %d %s %s (%s)", self.cid,
                            _printable(env.mail_from), env.size, *reply, error)
                self._reply(reply)
            self.mode = "command"
            if f.shutting_down:
                return self._close_with(replies.SHUTTING_DOWN)
            if self._expired:
                self.log.info("conn %d: session time limit (%g s) reached from [%s]", self.cid,
                              f.session_timeout, self.peer[0])
                return self._close_with(Reply(421, "4.4.2", f"{f.hostname} Error: session time limit exceeded"))
            self.setTimeout(f.timeout)
            self.transport.resumeProducing()
            self._process()

        fut.add_done_callback(lambda fu: f.call_from_thread(
            self._batched, finished, *((fu.result(), None) if fu.exception() is None else (None, fu.exception()))))

    def _reset(self):
        self._stop_data_rate()
        if self.txn is not None and self.txn.writer is not None:
            self.txn.writer.abort()
        self.txn = None

    # --- shutdown ---

    def shutdown(self):
        """Stop accepting: idle sessions are told 421 4.3.2 now; a session in
        a transaction finishes it and is told at its next command."""
        if self.mode in ("command", "tls") and self.txn is None:
            self._close_with(replies.SHUTTING_DOWN)

    def abandon(self):
        """Shutdown timeout: drop whatever is left.  Nothing here was
        acknowledged; a commit already handed to the spool still completes."""
        if self.mode not in ("closed", "busy"):
            self._reset()
            self._reply(replies.SHUTTING_DOWN)
        self.mode = "closed"
        self.transport.abortConnection()


class ImplicitTLSFactory(TLSMemoryBIOFactory):
    """The implicit-TLS port: the relay behind TLS, with the connection-time
    checks (connector networks, connection limits) made when the TCP
    connection is accepted, before any TLS work is done for it."""

    def __init__(self, tls: ServerTLS, relay: "RelayFactory"):
        super().__init__(tls, False, relay)
        self.relay = relay

    def buildProtocol(self, addr):
        host = getattr(addr, "host", "")
        why = self.relay.refusal_at_connect(host)
        if why is not None:
            self.relay.log.warning("reject: [%s] on %s before TLS: %s", host, self.relay.listener_name, why)
            return None     # Twisted closes the socket at once
        return super().buildProtocol(addr)


def _printable(s: str) -> str:
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def mail_parameters(params: dict, esmtp: bool) -> tuple[int, Reply | None]:
    """Check MAIL FROM's parameters (as `_address` returns them): the SIZE
    hint and None, or 0 and the reply that refuses them.  Pure: no input,
    however odd (8-bit, non-ASCII digits, huge numbers), gets past it
    unchecked or makes it raise."""
    known = {"SIZE", "BODY", "SMTPUTF8"} if esmtp else set()
    for k in params:
        if not _KEYWORD.fullmatch(k):
            return 0, Reply(501, "5.5.4", "Syntax error in parameters")
        if k not in known:
            return 0, Reply(555, "5.5.4", f"Unsupported option: {k}")
    size_hint = 0
    if "SIZE" in params:
        v = params["SIZE"] or ""
        if not _DIGITS.fullmatch(v):
            return 0, Reply(501, "5.5.4", "Bad SIZE parameter")
        # More digits than any size could need is "too large", without an
        # int() of thousands of digits.
        size_hint = int(v) if len(v) <= 20 else 1 << 64
    body = params.get("BODY") or ""
    if "BODY" in params and not (body.isascii() and body.upper() in ("7BIT", "8BITMIME")):
        return 0, Reply(501, "5.5.4", "Bad BODY parameter")
    if "SMTPUTF8" in params and params["SMTPUTF8"] is not None:
        return 0, Reply(501, "5.5.4", "Bad SMTPUTF8 parameter (it takes no value)")
    return size_hint, None


def _address(text: str):
    """'<a@b> K=V K2' -> ('a@b', {'K': 'V', 'K2': None}); None if malformed.
    Keywords are upper-cased only when they are RFC 5321 keywords (ASCII);
    any other is returned as sent, for the caller to refuse."""
    m = ADDRESS.match(text.strip())
    if not m:
        return None
    addr = m.group("addr")
    if ":" in addr and addr.startswith("@"):      # source route: @a,@b:user@c
        addr = addr.split(":", 1)[1]
    if any(c in addr for c in " \t\r\n") and not addr.startswith('"'):
        return None
    params = {}
    for p in m.group("params").split():
        k, _, v = p.partition("=")
        params[k.upper() if _KEYWORD.fullmatch(k) else k] = v if _ else None
    return addr, params


class ClientCounts:
    """Open sessions per client address, shared by the listeners of one
    process.  Relay worker processes each keep their own: the limit is per
    process (sharing it would cost a round trip per connection)."""

    def __init__(self):
        self._n: dict[str, int] = {}

    def add(self, host: str) -> None:
        self._n[host] = self._n.get(host, 0) + 1

    def remove(self, host: str) -> None:
        n = self._n.get(host, 0) - 1
        if n > 0:
            self._n[host] = n
        else:
            self._n.pop(host, None)

    def count(self, host: str) -> int:
        return self._n.get(host, 0)

    def over(self, host: str, limit: int) -> bool:
        """Counting the session itself, is `host` over `limit` (0: none)?"""
        return bool(limit) and self.count(host) > limit


class RelayFactory(ServerFactory):
    """The SMTP sessions of one listener.  `clock` (IReactorTime: the
    reactor, or a task.Clock in tests) runs every timer of a session;
    `call_from_thread` brings the spool's commit results back to the
    reactor's thread.  Neither defaults to the global reactor: the caller
    (mailtresor.service) passes its own."""

    def __init__(self, *, sink: Sink, gate: Gate, tls: ServerTLS, hostname: str, max_size: int,
                 clock, call_from_thread,
                 max_recipients: int = 1000, max_connections: int = 100, timeout: float = 300.0,
                 max_connections_per_client: int = 0, handshake_timeout: float = 10.0,
                 session_timeout: float = 0.0, min_data_rate: int = 0, data_rate_window: float = 30.0,
                 bare_newline: str = "keep", clients: ClientCounts | None = None,
                 implicit_tls: bool = False, listener_name: str = "",
                 log_name: str = "mailtresor.ingest.relay"):
        self.sink, self.gate, self.tls = sink, gate, tls
        self.hostname, self.max_size = hostname, max_size
        self.max_recipients, self.max_connections = max_recipients, max_connections
        self.max_connections_per_client = max_connections_per_client
        self.handshake_timeout, self.session_timeout = handshake_timeout, session_timeout
        self.min_data_rate, self.data_rate_window = min_data_rate, data_rate_window
        if bare_newline not in ("keep", "reject"):
            raise ValueError(f"bare_newline must be 'keep' or 'reject', not {bare_newline!r}")
        self.bare_newline = bare_newline
        self.clients = clients if clients is not None else ClientCounts()
        self.timeout, self.implicit_tls, self.listener_name = timeout, implicit_tls, listener_name
        self.clock = clock
        self.call_from_thread = call_from_thread
        self.log = logging.getLogger(log_name)
        self.active: set[RelayProtocol] = set()
        self.shutting_down = False
        self.inflight = 0
        self._cid = 0
        self._idle_waiters = []

    def next_cid(self) -> int:
        self._cid += 1
        return self._cid

    def buildProtocol(self, addr):
        p = RelayProtocol(self, self.implicit_tls)
        p.factory = self
        return p

    def refusal_at_connect(self, host: str) -> str | None:
        """Why a new implicit-TLS connection from `host` is dropped before
        its handshake, or None.  A refused client costs no TLS handshake
        and gets no reply: there is no channel to say it in yet."""
        if not self.gate.may_connect(host):
            return "in no connector's networks"
        if len(self.active) >= self.max_connections:
            return f"too many connections ({len(self.active)})"
        if self.max_connections_per_client and self.clients.count(host) >= self.max_connections_per_client:
            return (f"already has {self.clients.count(host)} connections "
                    f"(limit {self.max_connections_per_client} per client)")
        return None

    def connection_closed(self, proto):
        if self.shutting_down and not self.active:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def shutdown(self):
        """Deferred firing when every session has ended."""
        from twisted.internet.defer import Deferred, succeed
        self.shutting_down = True
        for p in list(self.active):
            p.shutdown()
        if not self.active:
            return succeed(None)
        d = Deferred()
        self._idle_waiters.append(d)
        return d

    def abandon(self):
        for p in list(self.active):
            p.abandon()
