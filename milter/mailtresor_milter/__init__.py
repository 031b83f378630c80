"""The milter ingest path: Postfix/Sendmail hand every message to us.

A thin pymilter adapter over the same spool as the relay: it collects the
envelope, the macros, the header fields and the body, writes them to a spool
writer as they arrive, and at end-of-message waits for the spool to say the
entry is durable.  It never modifies a message (no modification actions are
negotiated).

If the spool cannot take the message the MTA is told to try again later
(`on_failure = "tempfail"`, the default): mail is delayed, never let through
un-archived.  `on_failure = "accept"` lets it through and logs the loss
loudly, for sites that prefer delivery over completeness.

libmilter runs its own threads (one per MTA connection) and blocks in
`milter.main()`; `MilterServer` runs it in a thread of its own, off the
Twisted reactor.  The spool is thread-safe for this.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import Milter
import milter as _libmilter

from mailtresor import config as configmod
from mailtresor.ingest import replies
from mailtresor.ingest.spool import Envelope, MessageTooLarge

log = logging.getLogger("mailtresor.milter")

# Macros worth keeping with the envelope (Postfix and Sendmail names).
MACROS = ("i", "j", "_", "v", "{daemon_name}", "{daemon_addr}", "{client_addr}", "{client_port}",
          "{client_name}", "{client_ptr}", "{client_connections}", "{tls_version}", "{cipher}",
          "{cipher_bits}", "{cert_subject}", "{cert_issuer}", "{auth_type}", "{auth_authen}",
          "{auth_author}", "{mail_addr}", "{mail_host}", "{mail_mailer}", "{rcpt_addr}")


def _text(b) -> str:
    if isinstance(b, bytes):
        return b.decode("utf-8", "surrogateescape")
    return b or ""


def _strip_brackets(addr: str) -> str:
    addr = addr.strip()
    if addr.startswith("<") and addr.endswith(">"):
        return addr[1:-1]
    return addr


def size_hint(mail_params: dict) -> int:
    """MAIL FROM's SIZE= as a hint, 0 when absent or not plain ASCII digits
    (`"²".isdigit()` is true, and int() of it raises: an MTA that passes
    such a parameter on must not turn the message into a tempfail)."""
    size = mail_params.get("SIZE") or ""
    return int(size) if size.isascii() and size.isdigit() and len(size) <= 20 else 0


@Milter.header_leading_space
class ArchiveMilter(Milter.Base):
    """One MTA connection.  Never name an attribute `body`: it would hide
    the body() callback (pymilter then answers 451 untrapped exception)."""

    def __init__(self, server: "MilterServer"):
        self.server = server
        self.client_name = ""
        self.client_address = ""
        self.client_port = 0
        self.helo = ""
        self.writer = None
        self.mail_from = ""
        self.mail_params: dict = {}
        self.rcpt_to: list[str] = []
        self.rcpt_params: list[dict] = []
        self.refused = None

    # --- helpers ---

    def _refuse(self, reply: replies.Reply, why: str):
        """Tell the MTA; TEMPFAIL for 4xx, REJECT for 5xx.  In accept mode
        let this message through (never a whole connection: see connect)."""
        q = self.getsymval("i") or "-"
        if self.server.settings.on_failure == "accept":
            log.error("%s: NOT ARCHIVED, accepted by policy (on_failure=accept): %s", q, why)
            return Milter.ACCEPT
        log.warning("%s: %s %s %s: %s", q, reply.code, reply.enhanced, reply.text, why)
        try:
            self.setreply(str(reply.code), reply.enhanced, reply.text)
        except Exception:  # noqa: BLE001 - the action code alone still works
            pass
        return Milter.TEMPFAIL if reply.temporary else Milter.REJECT

    def _discard(self):
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
            self.server.transaction_ended()

    # --- callbacks ---

    def connect(self, hostname, family, hostaddr):
        self.client_name = hostname or ""
        if family in (socket.AF_INET, socket.AF_INET6) and isinstance(hostaddr, tuple):
            self.client_address, self.client_port = hostaddr[0], int(hostaddr[1])
        elif hostaddr:
            self.client_address = str(hostaddr)
        refusal, why = None, ""
        if self.server.shutting_down:
            refusal, why = replies.SHUTTING_DOWN, "shutting down"
        else:
            try:
                self.server.spool.admit(0)
            except Exception as e:  # noqa: BLE001
                refusal, why = replies.at_greeting(e), str(e)
        if refusal is None:
            return Milter.CONTINUE
        if self.server.settings.on_failure == "accept":
            # ACCEPT here would let every message of the connection through
            # unarchived, even once the spool is back: decide per message.
            log.warning("connection from %s while mail cannot be archived (%s); each message "
                        "is decided at MAIL FROM (on_failure=accept)", self.client_address or "-", why)
            return Milter.CONTINUE
        return self._refuse(refusal, why)

    def hello(self, heloname):
        self.helo = _text(heloname)
        return Milter.CONTINUE

    @Milter.decode("bytes")
    def envfrom(self, mailfrom, *params):
        self._discard()
        self.mail_from = _strip_brackets(_text(mailfrom))
        self.mail_params = {}
        for p in params:
            k, sep, v = _text(p).partition("=")
            self.mail_params[k.upper()] = v if sep else None
        self.rcpt_to, self.rcpt_params = [], []
        if self.server.shutting_down:
            return self._refuse(replies.SHUTTING_DOWN, "shutting down")
        try:
            self.writer = self.server.spool.open_writer(size_hint(self.mail_params))
        except Exception as e:  # noqa: BLE001 - every failure has its reply
            return self._refuse(replies.for_failure(e), str(e))
        self.server.transaction_started()
        return Milter.CONTINUE

    @Milter.decode("bytes")
    def envrcpt(self, to, *params):
        self.rcpt_to.append(_strip_brackets(_text(to)))
        pd = {}
        for p in params:
            k, sep, v = _text(p).partition("=")
            pd[k.upper()] = v if sep else None
        self.rcpt_params.append(pd)
        return Milter.CONTINUE

    @Milter.decode("bytes")
    def header(self, name, value):
        if self.writer is not None:
            if isinstance(name, str):
                name = name.encode("utf-8", "surrogateescape")
            # With leading-space negotiation the value is exactly what
            # followed the colon; folded lines arrive with bare LF inside.
            self.writer.write(name + b":" + value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n")
        return Milter.CONTINUE

    def eoh(self):
        if self.writer is not None:
            self.writer.write(b"\r\n")
        return Milter.CONTINUE

    def body(self, chunk):
        if self.writer is not None:
            self.writer.write(chunk)
        return Milter.CONTINUE

    def eom(self):
        writer, self.writer = self.writer, None
        if writer is None:
            return self._refuse(replies.INTERNAL, "end of message without a transaction")
        macros = {}
        for m in MACROS:
            try:
                v = self.getsymval(m)
            except Exception:  # noqa: BLE001
                v = None
            if v is not None:
                macros[m] = _text(v)
        tls = None
        if macros.get("{tls_version}"):
            tls = {"version": macros.get("{tls_version}"), "cipher": macros.get("{cipher}"),
                   "client_cert": ({"subject": macros["{cert_subject}"], "issuer": macros.get("{cert_issuer}")}
                                   if macros.get("{cert_subject}") else None)}
        env = Envelope(source="milter", mail_from=self.mail_from, rcpt_to=list(self.rcpt_to),
                       connector="milter", client_address=self.client_address or macros.get("{client_addr}", ""),
                       client_port=self.client_port, client_name=self.client_name, helo=self.helo,
                       tls=tls, mail_params=dict(self.mail_params), rcpt_params=list(self.rcpt_params),
                       macros=macros, queue_id=macros.get("i", ""), received_at=time.time())
        started = time.monotonic()
        try:
            entry_id = writer.commit(env).result(timeout=self.server.commit_timeout)
        except MessageTooLarge as e:
            return self._refuse(replies.TOO_LARGE, str(e))
        except Exception as e:  # noqa: BLE001 - including the future's TimeoutError
            return self._refuse(replies.for_failure(e), f"{type(e).__name__}: {e}")
        finally:
            self.server.transaction_ended()
        log.info("%s: %s: from=<%s> nrcpt=%d size=%d client=%s queued (%.1f ms)", env.queue_id or "-",
                 entry_id, self.mail_from.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
                 len(env.rcpt_to), env.size, env.client_address or env.client_name,
                 (time.monotonic() - started) * 1000)
        return Milter.CONTINUE

    def abort(self):
        self._discard()
        return Milter.CONTINUE

    def close(self):
        self._discard()
        return Milter.CONTINUE


class MilterServer:
    """Runs libmilter in a thread of its own."""

    def __init__(self, spool, settings: configmod.Milter, *, hostname: str = "",
                 name: str = "mailtresor", on_exit=None, socket: str | None = None,
                 socket_mode: int | None = None):
        """`socket` (libmilter's syntax) and `socket_mode` override
        settings.listen and settings.socket_mode: with socket activation
        libmilter listens on a private socket the daemon forwards to."""
        self.spool = spool
        self.settings = settings
        self.name = name
        self.hostname = hostname
        self.socket = socket or configmod.milter_socket(settings.listen)
        self.socket_mode = settings.socket_mode if socket_mode is None else socket_mode
        self.on_exit = on_exit or (lambda error: None)
        # Give up on a commit a little before the MTA gives up on us.
        self.commit_timeout = max(5, settings.timeout - 5)
        self.shutting_down = False
        self._lock = threading.Lock()
        self._open = 0
        self._thread = None
        self._stopped = False

    def transaction_started(self):
        with self._lock:
            self._open += 1

    def transaction_ended(self):
        with self._lock:
            self._open = max(0, self._open - 1)

    @property
    def open_transactions(self) -> int:
        with self._lock:
            return self._open

    def start(self):
        self._prepare_socket()
        Milter.factory = lambda: ArchiveMilter(self)
        _libmilter.set_flags(0)  # we never change a message
        self._thread = threading.Thread(target=self._run, name="milter", daemon=True)
        self._thread.start()

    def _prepare_socket(self):
        if self.socket.startswith("unix:"):
            path = self.socket[5:]
            os.makedirs(os.path.dirname(path), exist_ok=True)

    def _run(self):
        error = None
        try:
            _libmilter.set_connect_callback(Milter.connect_callback)
            _libmilter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
            _libmilter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
            _libmilter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
            _libmilter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
            _libmilter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
            _libmilter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
            _libmilter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
            _libmilter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
            _libmilter.set_close_callback(Milter.close_callback)
            _libmilter.setconn(self.socket)
            _libmilter.settimeout(self.settings.timeout)
            _libmilter.register(self.name, data=lambda ctx: ctx.getpriv().data(),
                                unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
                                negotiate=Milter.negotiate_callback)
            _libmilter.opensocket(True)
            if self.socket.startswith("unix:"):
                os.chmod(self.socket[5:], self.socket_mode)
            log.info("milter listening on %s (on_failure=%s)", self.socket, self.settings.on_failure)
            _libmilter.main()
        except Exception as e:  # noqa: BLE001 - reported to the daemon
            error = e
            log.error("milter failed: %s", e)
        if not self._stopped:
            self.on_exit(error)

    def begin_shutdown(self):
        self.shutting_down = True

    def wait_idle(self, reactor):
        """Deferred firing once no milter transaction is open."""
        from twisted.internet import task
        from twisted.internet.defer import Deferred

        d = Deferred()

        def check():
            if self.open_transactions == 0:
                loop.stop()
                d.callback(None)

        loop = task.LoopingCall(check)
        loop.clock = reactor
        loop.start(0.05, now=True)
        return d

    def abandon(self):
        log.warning("milter: %d transaction(s) still open at the shutdown timeout", self.open_transactions)
        with self._lock:
            self._open = 0

    def stop(self):
        """Called when the daemon exits.  New MTA connections must fail (the
        MTA then applies milter_default_action): remove the socket path.
        smfi_stop() is not called: it blocks for libmilter's 5-second poll,
        and the process is about to exit anyway (open transactions are
        finished, or were abandoned at the shutdown timeout)."""
        self._stopped = True
        self.shutting_down = True
        if self.socket.startswith("unix:"):
            try:
                os.unlink(self.socket[5:])
            except FileNotFoundError:
                pass
