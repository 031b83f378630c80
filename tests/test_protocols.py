"""Protocol code in process: Twisted's StringTransport for the wire,
task.Clock for every timer, no reactor running, no sockets.

Beside the process tests (test_relay, test_control: a real daemon and a
real control endpoint over TLS), these drive the same protocol objects
byte by byte so that timers and orderings are exact:

- the relay's SMTP session (mailtresor.ingest.relay) over a real spool in
  a temporary directory: what is refused before TLS, STARTTLS, a whole
  MAIL/RCPT/DATA transaction into the spool, and the handshake, session
  and minimum-data-rate timers;
- the control endpoint's HTTP resource (mailtresor.control.server.make_site)
  with the peer certificate a TLS transport would report;
- the spool key's fetcher (mailtresor.keys.ring.KeyFetcher): its retry
  back-off, refresh, and revocation, on a Clock.
"""

from __future__ import annotations

import json
import queue
import random

import pytest
from OpenSSL import crypto as ossl
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailtresor.config import Connector as ConnectorCfg
from mailtresor.ingest.relay import Gate, RelayFactory
from mailtresor.ingest.spool import Spool
from mailtresor.keys import crypto
from mailtresor.keys.derive import SPOOL_KEY
from mailtresor.keys.ring import ControlUnreachable, KeyFetcher, KeyMaterial, KeyRefused, KeyRing

PEER = IPv4Address("TCP", "127.0.0.1", 40000)
TLS_FACTS = {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384", "client_cert": None}


# --- the relay's SMTP session -----------------------------------------------------------

class TLSStringTransport(StringTransport):
    """A StringTransport that records STARTTLS instead of doing it; the
    test then says when the handshake is done (handshakeCompleted)."""

    def __init__(self):
        super().__init__(peerAddress=PEER)
        self.tls_started_with = None
        self.aborted = False

    def startTLS(self, ctx):
        self.tls_started_with = ctx

    def getHandle(self):
        return None

    def abortConnection(self):
        self.aborted = True
        self.loseConnection()


class FakeServerTLS:
    """The relay's ServerTLS as the session sees it: the facts of a
    finished handshake."""

    def facts(self, handle):
        return dict(TLS_FACTS)


class Relay:
    """A RelayFactory over a real spool, its timers on a Clock, and the
    spool's commit results brought back the way the reactor would
    (call_from_thread), but only when the test pumps them."""

    def __init__(self, tmp_path, **kw):
        self.clock = Clock()
        self.ring = KeyRing()
        self.ring.put(KeyMaterial(SPOOL_KEY, 1, crypto.random_key()), current=True)
        self.spool = Spool(tmp_path / "spool", self.ring, min_free_bytes=0, sync="fsync")
        self.from_threads: queue.Queue = queue.Queue()
        kw.setdefault("timeout", 300.0)
        self.factory = RelayFactory(
            sink=self.spool, gate=Gate([ConnectorCfg("local", ("127.0.0.1/32",))]), tls=FakeServerTLS(),
            hostname="archive.test", max_size=1 << 20, clock=self.clock,
            call_from_thread=lambda fn, *a: self.from_threads.put((fn, a)), **kw)

    def connect(self):
        p = self.factory.buildProtocol(PEER)
        t = TLSStringTransport()
        p.makeConnection(t)
        return p, t

    def pump(self, timeout: float = 30.0) -> None:
        """Run one callback the spool's committer thread handed back."""
        fn, a = self.from_threads.get(timeout=timeout)
        fn(*a)

    def close(self):
        self.spool.close(timeout=30)


def replies_of(t) -> list[bytes]:
    out = t.value().split(b"\r\n")
    t.clear()
    return [ln for ln in out if ln]


@pytest.fixture
def relay(tmp_path):
    r = Relay(tmp_path)
    yield r
    r.close()


def after_tls(p, t):
    """STARTTLS, the handshake done, EHLO again: a session ready for MAIL."""
    p.dataReceived(b"EHLO client.test\r\nSTARTTLS\r\n")
    assert replies_of(t)[-1].startswith(b"220 ")
    p.handshakeCompleted()
    p.dataReceived(b"EHLO client.test\r\n")
    ehlo = replies_of(t)
    assert ehlo[-1].startswith(b"250 ") and not any(b"STARTTLS" in ln for ln in ehlo)


def test_before_tls_only_ehlo_and_starttls(relay):
    p, t = relay.connect()
    assert replies_of(t) == [b"220 archive.test ESMTP mailtresor"]
    p.dataReceived(b"EHLO client.test\r\n")
    ehlo = replies_of(t)
    assert ehlo[0] == b"250-archive.test" and ehlo[-1] == b"250 STARTTLS"
    p.dataReceived(b"MAIL FROM:<a@globex.example>\r\n")
    assert replies_of(t) == [b"530 5.7.0 Must issue a STARTTLS command first"]
    p.dataReceived(b"RCPT TO:<b@acme.example>\r\nDATA\r\n")
    assert [r[:1] for r in replies_of(t)] == [b"5", b"5"]
    assert p.txn is None and relay.spool.ready() == []


def test_starttls_drops_what_was_pipelined_in_the_clear(relay):
    p, t = relay.connect()
    t.clear()
    p.dataReceived(b"EHLO client.test\r\nSTARTTLS\r\nMAIL FROM:<evil@example>\r\n")
    assert replies_of(t)[-1] == b"220 2.0.0 Ready to start TLS"
    assert t.tls_started_with is relay.factory.tls
    p.handshakeCompleted()
    assert replies_of(t) == []                    # the injected MAIL got no answer: it was dropped
    # The session starts over after TLS: EHLO first.
    p.dataReceived(b"MAIL FROM:<a@globex.example>\r\n")
    assert replies_of(t) == [b"503 5.5.1 Error: send HELO/EHLO first"]
    p.dataReceived(b"STARTTLS\r\n")               # not twice
    assert replies_of(t)[-1].startswith(b"554 5.5.1")


def test_a_transaction_goes_into_the_spool(relay):
    p, t = relay.connect()
    after_tls(p, t)
    p.dataReceived(b"MAIL FROM:<a@globex.example>\r\nRCPT TO:<b@acme.example>\r\nDATA\r\n")
    assert [r[:3] for r in replies_of(t)] == [b"250", b"250", b"354"]
    body = b"Subject: in process\r\n\r\nhello\r\n..a dot-stuffed line\r\n"
    p.dataReceived(body + b".\r\n")
    assert replies_of(t) == []                    # no 250 before the spool says it is durable
    relay.pump()
    (line,) = replies_of(t)
    assert line.startswith(b"250 2.0.0 Ok: queued as ")
    entry_id = line.rsplit(b" ", 1)[1].decode()
    assert relay.spool.ready() == [entry_id]
    e = relay.spool.read(entry_id)
    assert e.data == b"Subject: in process\r\n\r\nhello\r\n.a dot-stuffed line\r\n"
    assert e.envelope.mail_from == "a@globex.example" and e.envelope.rcpt_to == ["b@acme.example"]
    assert e.envelope.tls == TLS_FACTS and e.envelope.connector == "local"
    p.dataReceived(b"QUIT\r\n")
    assert replies_of(t)[0].startswith(b"221 ") and t.disconnecting


def test_the_handshake_timer(tmp_path):
    r = Relay(tmp_path, handshake_timeout=10.0)
    try:
        p, t = r.connect()
        p.dataReceived(b"EHLO client.test\r\nSTARTTLS\r\n")
        r.clock.advance(9.9)
        assert not t.aborted
        r.clock.advance(0.2)
        assert t.aborted                           # nothing to say in TLS yet, nothing in the clear
        # A handshake done in time cancels it.
        p, t = r.connect()
        p.dataReceived(b"EHLO client.test\r\nSTARTTLS\r\n")
        r.clock.advance(5)
        p.handshakeCompleted()
        r.clock.advance(60)
        assert not t.aborted and not t.disconnecting
    finally:
        r.close()


def test_the_session_timer_cuts_an_unfinished_message(tmp_path):
    r = Relay(tmp_path, session_timeout=120.0)
    try:
        p, t = r.connect()
        after_tls(p, t)
        p.dataReceived(b"MAIL FROM:<a@globex.example>\r\nRCPT TO:<b@acme.example>\r\nDATA\r\n")
        replies_of(t)
        for _ in range(11):                        # busy all along: a byte every 10 s
            p.dataReceived(b"x" * 100)
            r.clock.advance(10)
        assert not t.disconnecting
        r.clock.advance(10)
        assert replies_of(t)[-1].startswith(b"421 4.4.2 ") and t.disconnecting
        assert r.spool.ready() == []               # aborted, never half-stored
    finally:
        r.close()


def test_the_minimum_data_rate(tmp_path):
    r = Relay(tmp_path, min_data_rate=100, data_rate_window=30.0)
    try:
        p, t = r.connect()
        after_tls(p, t)
        p.dataReceived(b"MAIL FROM:<a@globex.example>\r\nRCPT TO:<b@acme.example>\r\nDATA\r\n")
        replies_of(t)
        p.dataReceived(b"x" * 3000)                # 100 bytes/s over the first window: enough
        r.clock.advance(30)
        assert not t.disconnecting
        for _ in range(15):                        # then a byte every 2 s: a slow loris
            p.dataReceived(b"x")
            r.clock.advance(2)
        assert replies_of(t)[-1].startswith(b"421 4.4.2 ") and t.disconnecting
        assert r.spool.ready() == []
    finally:
        r.close()


# --- the control endpoint's HTTP resource ------------------------------------------------

class CertTransport(StringTransport):
    """What the control endpoint's TLS transport reports: the peer's
    certificate (only its subject is read)."""

    def __init__(self, cn: str | None):
        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.10", 48858))
        self.cert = None
        if cn is not None:
            self.cert = ossl.X509()
            self.cert.get_subject().CN = cn

    def getPeerCertificate(self):
        return self.cert


@pytest.fixture
def control_site(tmp_path):
    from mailtresor.control.server import AuditLog, KeyStore, make_site

    store = KeyStore(tmp_path / "keys.json", b"a master secret for the in-process test")
    store.init()
    store.create("archive1", "spool")
    store.create("archive2", "spool")
    audit = AuditLog(tmp_path / "audit.log")
    clock = Clock()
    site = make_site(store, audit, {"archive1.test": "archive1", "archive2.test": "archive2"},
                     idle_timeout=30.0, reactor=clock)
    return site, store, audit, clock


def http_get(site, path: bytes, cn: str | None = "archive1.test", method: bytes = b"GET"):
    channel = site.buildProtocol(None)
    t = CertTransport(cn)
    channel.makeConnection(t)
    channel.dataReceived(method + b" " + path + b" HTTP/1.1\r\nHost: control.test\r\n\r\n")
    head, _, body = t.value().partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = dict(ln.split(b": ", 1) for ln in head.split(b"\r\n")[1:])
    return status, headers, body, channel, t


def test_control_releases_a_key_to_its_owner_only(control_site):
    site, store, audit, _ = control_site
    status, headers, body, *_ = http_get(site, b"/v1/keys/spool")
    assert status == 200 and headers[b"Content-Type"] == b"application/json"
    assert headers[b"Cache-Control"] == b"no-store"
    doc = json.loads(body)
    assert doc["name"] == "spool" and doc["version"] == 1
    assert doc["key"] != json.loads(http_get(site, b"/v1/keys/spool", cn="archive2.test")[2])["key"]
    status, _, body, *_ = http_get(site, b"/v1/keys/spool", cn="somebody.else")
    assert status == 403 and json.loads(body) == {"error": "this client certificate belongs to no appliance"}
    status, _, body, *_ = http_get(site, b"/v1/keys/spool", cn=None)
    assert status == 403
    events = [json.loads(ln) for ln in (audit.path.read_text().splitlines())]
    assert [e["event"] for e in events] == ["release", "release", "deny", "deny"]
    assert audit.verify() == []


@pytest.mark.parametrize("path, method, status", [
    (b"/v1/keys/spool/0", b"GET", 400),
    (b"/v1/keys/Spool", b"GET", 400),
    (b"/v1/keys/spool/2", b"GET", 404),
    (b"/v1/keys/tenant.acme", b"GET", 404),
    (b"/v1/nothing", b"GET", 404),
    (b"/v1/keys/spool", b"POST", 405),
])
def test_control_refusals_are_json_and_audited(control_site, path, method, status):
    site, _, audit, _ = control_site
    got, headers, body, *_ = http_get(site, path, method=method)
    assert got == status and headers[b"Content-Type"] == b"application/json"
    assert "error" in json.loads(body) and b"Traceback" not in body
    (event,) = [json.loads(ln) for ln in audit.path.read_text().splitlines()]
    assert event["event"] == "deny" and event["status"] == status


def test_control_idle_connection_timer_runs_on_the_given_clock(control_site):
    site, _, _, clock = control_site
    *_, channel, t = http_get(site, b"/v1/health")
    assert not t.disconnecting
    clock.advance(29)
    assert not t.disconnecting
    clock.advance(2)
    assert t.disconnecting                        # closed by the site's own timeout, on our clock


# --- the key fetcher's retry back-off ----------------------------------------------------

class ScriptedClient:
    """A control client whose answers the test gives: each fetch() is a
    Deferred the test fires."""

    def __init__(self):
        self.calls: list[tuple[str, int | None, defer.Deferred]] = []

    def fetch(self, name, version=None):
        d = defer.Deferred()
        self.calls.append((name, version, d))
        return d


class MidRandom(random.Random):
    def random(self):
        return 0.5                               # jitter factor 0.8 + 0.4 * 0.5 = 1.0: exact delays


def fetcher(**kw):
    clock, client, ring = Clock(), ScriptedClient(), KeyRing(clock=lambda: 0.0)
    statuses, revoked = [], []
    f = KeyFetcher(clock, client, ring, retry_initial=1.0, retry_max=8.0, refresh_interval=600.0,
                   on_status=statuses.append, on_revoke=revoked.append, rng=MidRandom(), **kw)
    return f, clock, client, ring, statuses, revoked


def material(version=1):
    return KeyMaterial(SPOOL_KEY, version, bytes([version]) * 32)


def test_key_fetcher_backs_off_exponentially_up_to_the_maximum():
    f, clock, client, ring, statuses, _ = fetcher()
    ready = f.start(SPOOL_KEY)
    waits = []
    for _ in range(6):
        client.calls[-1][2].errback(ControlUnreachable("control endpoint unreachable: refused"))
        n = len(client.calls)
        # The next attempt comes exactly after the announced wait, not before.
        wait = clock.getDelayedCalls()[0].getTime() - clock.seconds()
        waits.append(round(wait, 6))
        clock.advance(wait - 0.01)
        assert len(client.calls) == n
        clock.advance(0.02)
        assert len(client.calls) == n + 1
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert "retrying in 8s" in statuses[-1] and "attempt 6" in statuses[-1]
    assert not ready.called and ring.current(SPOOL_KEY) is None
    client.calls[-1][2].callback(material(1))
    assert ready.called and ring.current(SPOOL_KEY)[0] == 1 and f.last_error == ""
    # Held now: the next fetch is the refresh, a refresh interval later.
    (call,) = clock.getDelayedCalls()
    assert call.getTime() - clock.seconds() == 600.0
    f.stop()
    assert clock.getDelayedCalls() == []


def test_key_fetcher_keeps_a_held_key_through_an_outage_and_drops_a_revoked_one():
    f, clock, client, ring, _, revoked = fetcher()
    f.start(SPOOL_KEY)
    client.calls[-1][2].callback(material(1))
    clock.advance(600)
    client.calls[-1][2].errback(ControlUnreachable("control endpoint unreachable: timed out"))
    assert ring.current(SPOOL_KEY)[0] == 1          # an outage: kept
    assert clock.getDelayedCalls()[0].getTime() - clock.seconds() == 600.0
    clock.advance(600)
    client.calls[-1][2].errback(KeyRefused("control endpoint refused key 'spool': 404 no such key", 404))
    assert ring.current(SPOOL_KEY) is None and revoked == [SPOOL_KEY]
    # Asked again as at a start: back-off from the initial delay.
    assert clock.getDelayedCalls()[0].getTime() - clock.seconds() == 1.0
    clock.advance(1)
    client.calls[-1][2].callback(material(2))
    assert ring.current(SPOOL_KEY)[0] == 2
    f.stop()
