"""The API's HTTP layer in process: twisted.web over StringTransport, a
task.Clock for timeouts, the real Sessions / UserDB / TokenDB /
Authenticator / AuditLog, and a small stand-in for the access core (the
core has tests of its own; tests/test_api.py drives the real one through a
real daemon).  Every answer is checked against openapi.json."""

from __future__ import annotations

import json
import logging
import os
import socket
import types

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailtresor import config as configmod
from mailtresor.access.api import Api
from mailtresor.access.audit import AuditLog
from mailtresor.access.auth import Authenticator
from mailtresor.access.sessions import Sessions
from mailtresor.access.tokens import TokenDB
from mailtresor.access.users import UserDB

from tests.harness import openapi

AID = "0123456789abcdef0123456789abcdef"


class Reactor(task.Clock):
    """A task.Clock that also runs callFromThread at once (with SyncPool)."""

    def callFromThread(self, f, *a, **kw):
        f(*a, **kw)


class SyncPool:
    """What deferToThreadPool needs of a ThreadPool, run in the caller."""

    def callInThreadWithCallback(self, on_result, f, *a, **kw):
        try:
            r = f(*a, **kw)
        except BaseException:  # noqa: BLE001
            on_result(False, Failure())
        else:
            on_result(True, r)


class Core:
    """Stands in for access.core.Core: fixed answers, the core's error types by shape."""

    class Err(Exception):
        def __init__(self, status, reason):
            super().__init__(reason)
            self.status, self.reason = status, reason

    def __init__(self):
        self.calls = []

    def search(self, who, *, tenant=None, query, cursor=None, limit=50, order="date-desc", facets=False):
        self.calls.append(("search", who, tenant, query))
        if query == "boom":
            raise RuntimeError("secret detail /var/lib/x")
        if query == "(":
            raise self.Err(400, "bad query: unbalanced parenthesis")
        if not who.can("read-own") and not who.can("read-tenant"):
            raise self.Err(403, "this role reads no mail")
        return {"total": 1, "next_cursor": None,
                "results": [{"id": AID, "date": "2024-03-01T10:00:00Z", "from": "a@acme.example", "subject": "hi",
                             "size": 10, "message_id": "<1@x>", "has_attachments": False, "to": ["b@acme.example"], "to_count": 1, "flags": [], "tags": []}]}

    def message(self, who, aid, *, tenant=None):
        if aid != AID:
            raise self.Err(404, "no such message")
        return {"id": aid}

    def raw(self, who, aid, *, tenant=None):
        return b"Subject: hi\r\n\r\nbody\r\n"

    def html(self, who, aid, *, tenant=None):
        return "<p>hi</p>"

    def text(self, who, aid, *, tenant=None):
        return "hi"

    def attachment(self, who, aid, n, *, tenant=None):
        return ("../../evil\".html", "text/html", b"<script>alert(1)</script>")

    def export_path(self, who, job_id):
        return self.export_file


@pytest.fixture(scope="module")
def users_db(tmp_path_factory):
    """The users, hashed once (argon2 is slow on purpose); each test copies the file."""
    path = tmp_path_factory.mktemp("users") / "users.db"
    key = os.urandom(32)
    users = UserDB(path, key)
    users.add("acme", "alice", "alice-password-1", {"user"}, ["alice@acme.example"])
    users.add("acme", "adam", "adam-password-1", {"admin"}, [])
    users.add(None, "root", "root-password-1", {"appliance-admin"}, [])
    return path, key


@pytest.fixture
def world(tmp_path, users_db):
    import shutil
    reactor = Reactor()
    cfg = types.SimpleNamespace(access=configmod.Access(throttle_failures=3),
                                tenant=(configmod.Tenant("acme", ("acme.example",)),
                                        configmod.Tenant("globex", ("globex.example",))))
    shutil.copy(users_db[0], tmp_path / "users.db")
    users = UserDB(tmp_path / "users.db", users_db[1])
    tokens = TokenDB(tmp_path / "tokens.db", os.urandom(32))
    auth = Authenticator(cfg, users, tokens, clock=reactor.seconds)
    sessions = Sessions(clock=reactor.seconds)
    audit = AuditLog(tmp_path / "audit", keys=None)
    core = Core()
    ready = {"ok": (True, "ok")}
    api = Api(reactor=reactor, pool=SyncPool(), core=core, auth=auth, sessions=sessions, audit=audit,
              users=users, tokens=tokens, tenants=("acme", "globex"), status=lambda: {"state": "running",
                                                                                      "status": "fine"},
              health=lambda: ready["ok"], facts=lambda: {"spool_depth": 3, "archived": 7, "archive_lag": 1.5,
                                                         "keys": [{"name": "spool", "version": 1,
                                                                   "current": True, "age": 5}]})
    w = types.SimpleNamespace(api=api, reactor=reactor, core=core, users=users, tokens=tokens, audit=audit,
                              sessions=sessions, ready=ready, tmp=tmp_path, key=users_db[1])
    yield w
    audit.close(seal=False)


def parse_response(data: bytes):
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers.setdefault(k.strip().lower().decode(), []).append(v.strip().decode())
    if "content-length" in headers:
        n = int(headers["content-length"][0])
        body, rest = rest[:n], rest[n:]
    elif headers.get("transfer-encoding") == ["chunked"]:
        body = b""
        while True:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                rest = rest[2:]
                break
            body, rest = body + rest[:n], rest[n + 2:]
    else:
        body, rest = rest, b""
    return types.SimpleNamespace(status=status, headers=headers, body=body,
                                 header=lambda k: (headers.get(k.lower()) or [None])[0]), rest


class Conn:
    """One client connection to the API's factory over a StringTransport."""

    def __init__(self, w, host="127.0.0.1", factory=None):
        self.w = w
        self.factory = factory or w.api.factory(timeout=30, max_body=4096, max_per_client=3)
        addr = IPv4Address("TCP", host, 40000)
        self.proto = self.factory.buildProtocol(addr)
        self.t = StringTransport(peerAddress=addr)
        self.proto.makeConnection(self.t)
        self.cookie = None
        self.csrf = None

    def send(self, method, path, body=None, headers=None, raw_body=None, validate=True):
        h = {"Host": "archive.test"}
        if self.cookie:
            h["Cookie"] = f"mt_session={self.cookie}"
        if body is not None:
            raw_body = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        if raw_body is not None:
            h["Content-Length"] = str(len(raw_body))
        h.update(headers or {})
        req = f"{method} {path} HTTP/1.1\r\n".encode() + b"".join(
            f"{k}: {v}\r\n".encode() for k, v in h.items()) + b"\r\n" + (raw_body or b"")
        self.t.clear()
        self.proto.dataReceived(req)
        channel = self.t.producer          # the HTTPChannel
        for _ in range(1000):
            # static.File's pull producer, which Twisted drives with the
            # global cooperator (not running here): pumped by hand.
            pull = getattr(channel, "_requestProducer", None)
            if pull is None or not hasattr(pull, "_producer"):
                break
            pull._producer.resumeProducing()
        r, _ = parse_response(self.t.value())
        for name, value in SECURITY_EXPECTED.items():
            assert r.header(name) == value, (name, r.headers)
        assert b"Traceback" not in r.body
        if validate:
            openapi.check(method, path, r.status, r.header("content-type"), r.body)
        return r

    def login(self, username, password, tenant="acme"):
        r = self.send("POST", "/api/v1/login", {"tenant": tenant, "username": username, "password": password})
        assert r.status == 200, r.body
        cookie = next(c for c in r.headers["set-cookie"] if c.startswith("mt_session="))
        self.cookie = cookie.split(";", 1)[0].split("=", 1)[1]
        self.csrf = json.loads(r.body)["csrf"]
        return r


SECURITY_EXPECTED = {"strict-transport-security": "max-age=31536000", "x-content-type-options": "nosniff",
                     "referrer-policy": "no-referrer", "cache-control": "no-store", "x-frame-options": "DENY"}


def test_openapi_document_is_valid_and_matches_the_routes():
    from mailtresor.access.api import all_routes
    openapi.check_document()
    documented = {(m.upper(), t) for t, item in openapi.document()["paths"].items() for m in item}
    assert documented == {(r.method, r.pattern) for r in all_routes()}


def test_unknown_route_404_and_wrong_method_405_with_allow(world):
    c = Conn(world)
    r = c.send("GET", "/api/v1/nothing")
    assert r.status == 404 and json.loads(r.body) == {"error": "no such resource"}
    r = c.send("DELETE", "/api/v1/search")
    assert r.status == 405 and r.header("allow") == "GET, HEAD"
    assert "not allowed" in json.loads(r.body)["error"]
    r = c.send("PUT", "/api/v1/users")
    assert r.status == 405 and r.header("allow") == "GET, HEAD, POST"
    r = c.send("HEAD", "/healthz")
    assert r.status == 200 and r.body == b"" and r.header("content-length") == "3"


def test_not_logged_in_401(world):
    c = Conn(world)
    for path in ("/api/v1/me", "/api/v1/search?q=x", f"/api/v1/messages/{AID}", "/api/v1/users"):
        r = c.send("GET", path)
        assert r.status == 401, path
        assert "not logged in" in json.loads(r.body)["error"]
    r = c.send("GET", "/api/v1/me", headers={"Authorization": "Basic eDp5"})
    assert r.status == 401 and r.header("www-authenticate").startswith("Bearer")
    r = c.send("GET", "/api/v1/me", headers={"Authorization": "Bearer mt_0011_nope"})
    assert r.status == 401 and "token" in json.loads(r.body)["error"]


def test_login_cookie_attributes_session_and_csrf(world):
    c = Conn(world)
    r = c.login("alice", "alice-password-1")
    cookie = next(x for x in r.headers["set-cookie"] if x.startswith("mt_session="))
    attrs = {a.strip().split("=")[0].lower(): a for a in cookie.split(";")[1:]}
    assert {"secure", "httponly", "samesite", "path"} <= set(attrs), cookie
    assert attrs["samesite"].strip().lower() == "samesite=strict" and attrs["path"].strip() == "Path=/"
    doc = json.loads(r.body)
    assert doc["principal"] == {"kind": "user", "name": "alice", "tenant": "acme", "roles": ["user"],
                                "scopes": [], "addresses": ["alice@acme.example"]}
    assert json.loads(c.send("GET", "/api/v1/me").body)["principal"]["name"] == "alice"
    # A state-changing request without, or with a wrong, CSRF token: 403.
    r = c.send("POST", "/api/v1/logout")
    assert r.status == 403 and "CSRF" in json.loads(r.body)["error"]
    r = c.send("POST", "/api/v1/logout", headers={"X-CSRF-Token": c.csrf[:-1] + "x"})
    assert r.status == 403
    assert c.send("GET", "/api/v1/me").status == 200           # still logged in
    r = c.send("POST", "/api/v1/logout", headers={"X-CSRF-Token": c.csrf})
    assert r.status == 200
    assert "Max-Age=0" in next(x for x in r.headers["set-cookie"] if x.startswith("mt_session="))
    r = c.send("GET", "/api/v1/me")
    assert r.status == 401 and "expired or ended" in json.loads(r.body)["error"]
    records, _ = world.audit.read(tenant="acme")
    assert [x["action"] for x in records] == ["login", "logout"]


def test_a_user_disabled_elsewhere_loses_the_session(world):
    """`mailtresor user disable` runs in another process: its UserDB is not
    the API's, so no on_change reaches the API's sessions.  The next request
    with the old cookie is refused all the same (Authenticator.still_valid),
    and the session is gone, not merely refused once."""
    c = Conn(world)
    c.login("alice", "alice-password-1")
    assert c.send("GET", "/api/v1/me").status == 200
    other = UserDB(world.tmp / "users.db", world.key)     # the command's own handle
    other.disable("acme", "alice")
    r = c.send("GET", "/api/v1/me")
    assert r.status == 401 and "account changed" in json.loads(r.body)["error"]
    other.enable("acme", "alice")
    assert c.send("GET", "/api/v1/me").status == 401                # the session is gone for good


def test_a_user_disabled_in_this_process_loses_the_session_at_once(world):
    """Through the API's own UserDB (as the admin route does), the change
    listener drops the user's sessions as the change is written."""
    world.users.on_change(lambda t, n, _c: world.sessions.drop_user(t, n))
    c = Conn(world)
    c.login("alice", "alice-password-1")
    world.users.passwd("acme", "alice", "alice-password-2")
    assert world.sessions.get(c.cookie) is None
    assert c.send("GET", "/api/v1/me").status == 401


def test_login_failures_same_answer_and_throttled_429(world):
    c = Conn(world)
    answers = []
    for body in ({"tenant": "acme", "username": "alice", "password": "wrong-password"},
                 {"tenant": "acme", "username": "nobody", "password": "wrong-password"},
                 {"tenant": "nosuch", "username": "alice", "password": "wrong-password"}):
        r = c.send("POST", "/api/v1/login", body)
        answers.append((r.status, r.body))
    assert len(set(answers)) == 1 and answers[0][0] == 401
    # throttle_failures=3 per address: the fourth try waits, right password or not.
    r = c.send("POST", "/api/v1/login", {"tenant": "acme", "username": "alice", "password": "alice-password-1"})
    assert r.status == 429 and int(r.header("retry-after")) >= 1
    assert "try again" in json.loads(r.body)["error"]
    records, _ = world.audit.read(tenant="acme")
    assert {x["action"] for x in records} == {"login-failed"}


def test_bad_json_bodies_400_415(world):
    c = Conn(world)
    r = c.send("POST", "/api/v1/login", raw_body=b'{"username": "a",', headers={"Content-Type": "application/json"})
    assert r.status == 400 and json.loads(r.body)["error"].startswith("malformed JSON")
    r = c.send("POST", "/api/v1/login", raw_body=b'[1]', headers={"Content-Type": "application/json"})
    assert r.status == 400 and "object" in json.loads(r.body)["error"]
    r = c.send("POST", "/api/v1/login", {"username": "a", "password": "b", "admin": True})
    assert r.status == 400 and "'admin'" in json.loads(r.body)["error"]
    r = c.send("POST", "/api/v1/login", {"username": "a"})
    assert r.status == 400 and "'password'" in json.loads(r.body)["error"]
    r = c.send("POST", "/api/v1/login", {"username": 1, "password": "b"})
    assert r.status == 400 and "'username' must be a string" == json.loads(r.body)["error"]
    r = c.send("POST", "/api/v1/login", raw_body=b'username=a&password=b',
               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 415


def test_body_over_the_limit_413_and_connection_closed(world):
    c = Conn(world)
    r = c.send("POST", "/api/v1/login", raw_body=b"x" * 10, headers={"Content-Length": "5000",
                                                                      "Content-Type": "application/json"})
    assert r.status == 413 and "larger than 4096" in json.loads(r.body)["error"]
    assert c.t.disconnecting
    # Chunked, without a length: refused once the chunks pass the limit.
    c = Conn(world)
    c.t.clear()
    c.proto.dataReceived(b"POST /api/v1/login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                         b"Content-Type: application/json\r\n\r\n")
    for _ in range(5):
        if not c.t.disconnecting:
            c.proto.dataReceived(b"400\r\n" + b"x" * 1024 + b"\r\n")
    r, _ = parse_response(c.t.value())
    assert r.status == 413 and c.t.disconnecting
    openapi.check("POST", "/api/v1/login", r.status, r.header("content-type"), r.body)


def test_parameters_checked(world):
    c = Conn(world)
    c.login("alice", "alice-password-1")
    r = c.send("GET", "/api/v1/search?q=x&limit=201")
    assert r.status == 400 and "'limit' must be between 1 and 200" == json.loads(r.body)["error"]
    r = c.send("GET", "/api/v1/search?q=x&limit=ten")
    assert r.status == 400
    r = c.send("GET", "/api/v1/search?q=x&sort=up")
    assert r.status == 400 and "unknown parameter 'sort'" in json.loads(r.body)["error"]
    r = c.send("GET", "/api/v1/search?q=x&q=y")
    assert r.status == 400 and "more than once" in json.loads(r.body)["error"]
    r = c.send("GET", "/api/v1/search?q=x&order=sideways")
    assert r.status == 400
    r = c.send("GET", "/api/v1/search?q=(")
    assert r.status == 400 and json.loads(r.body)["error"] == "bad query: unbalanced parenthesis"
    r = c.send("GET", "/api/v1/search?q=x&limit=200")
    assert r.status == 200 and json.loads(r.body)["total"] == 1


@pytest.mark.parametrize("path", ["/api/v1/messages/..%2f..%2fetc%2fpasswd", "/api/v1/messages/../../etc/passwd",
                                  "/api/v1/messages/%2e%2e", f"/api/v1/messages/{AID}%00",
                                  f"/api/v1/messages/{AID}/attachments/-1", f"/api/v1/messages/{AID}/attachments/1e3",
                                  "/api/v1/exports/..%2fx/download", "/api/v1/messages/" + "a" * 65])
def test_path_tricks_are_404(world, path):
    c = Conn(world)
    c.login("alice", "alice-password-1")
    n = len(world.core.calls)
    r = c.send("GET", path)
    assert r.status == 404, (path, r.body)
    assert len(world.core.calls) == n


def test_internal_error_is_500_without_traceback(world, caplog):
    c = Conn(world)
    c.login("alice", "alice-password-1")
    with caplog.at_level(logging.ERROR, logger="mailtresor.access.api"):
        r = c.send("GET", "/api/v1/search?q=boom")
    assert r.status == 500 and json.loads(r.body) == {"error": "internal error"}
    assert b"secret detail" not in r.body
    assert "RuntimeError: secret detail" in caplog.text         # the traceback is in the log


def test_renderings_and_downloads_headers(world):
    c = Conn(world)
    c.login("alice", "alice-password-1")
    r = c.send("GET", f"/api/v1/messages/{AID}/html")
    assert r.header("content-security-policy") == "default-src 'none'; img-src data:; style-src 'unsafe-inline'; sandbox"
    r = c.send("GET", f"/api/v1/messages/{AID}/raw")
    assert r.header("content-type") == "message/rfc822" and r.header("content-disposition").startswith("attachment;")
    assert r.body == b"Subject: hi\r\n\r\nbody\r\n"
    r = c.send("GET", f"/api/v1/messages/{AID}/attachments/0")
    # text/html from the mail is never served as HTML, nor under its own path.
    assert r.header("content-type") == "application/octet-stream"
    disp = r.header("content-disposition")
    assert disp.startswith('attachment; filename="evil.html"') and "/" not in disp.split(";")[1]


def test_export_download_range_resume(world):
    f = world.tmp / "export.mbox"
    data = bytes(range(256)) * 40
    f.write_bytes(data)
    world.core.export_file = f
    c = Conn(world)
    c.login("alice", "alice-password-1")
    r = c.send("GET", "/api/v1/exports/job1/download")
    assert r.status == 200 and r.body == data and r.header("accept-ranges") == "bytes"
    assert r.header("content-disposition").startswith("attachment;")
    r = c.send("GET", "/api/v1/exports/job1/download", headers={"Range": "bytes=1000-"})
    assert r.status == 206 and r.body == data[1000:]
    assert r.header("content-range") == f"bytes 1000-{len(data) - 1}/{len(data)}"
    r = c.send("GET", "/api/v1/exports/job1/download", headers={"Range": f"bytes={len(data) + 5}-"})
    assert r.status == 416


def test_idle_connection_is_closed(world):
    c = Conn(world)
    c.send("GET", "/healthz")
    assert not c.t.disconnecting
    world.reactor.advance(31)
    assert c.t.disconnecting


def test_a_trickled_request_is_cut_at_the_timeout(world):
    c = Conn(world)
    c.proto.dataReceived(b"GET /healthz HTTP/1.1\r\n")
    for i in range(3):                    # a header line every 12 s: never idle for 30 s
        world.reactor.advance(12)
        if c.t.disconnecting:
            break
        c.proto.dataReceived(b"X-Slow-%d: 1\r\n" % i)
    assert c.t.disconnecting
    # A request that comes in time is not cut, however long it is answered.
    c = Conn(world)
    c.send("GET", "/healthz")
    world.reactor.advance(29)
    c.send("GET", "/healthz")
    assert not c.t.disconnecting


def test_connections_per_client_limited(world):
    factory = world.api.factory(max_per_client=2)
    a, b = Conn(world, factory=factory), Conn(world, factory=factory)
    third = Conn(world, factory=factory)
    assert third.t.disconnecting and not a.t.disconnecting and not b.t.disconnecting
    other = Conn(world, host="127.0.0.2", factory=factory)
    assert not other.t.disconnecting
    a.proto.connectionLost(Failure(Exception("gone")))
    fourth = Conn(world, factory=factory)
    assert not fourth.t.disconnecting


def test_unix_socket_peer_credentials(world):
    s1, s2 = socket.socketpair()
    try:
        for allowed, ok in (({os.geteuid()}, True), ({os.geteuid() + 1}, False)):
            factory = world.api.factory(unix=True, allowed_uids=allowed)
            proto = factory.buildProtocol(UNIXAddress(None))
            t = StringTransport()
            t.getHandle = lambda: s1
            proto.makeConnection(t)
            assert t.disconnecting is (not ok)
            if ok:
                proto.dataReceived(b"GET /api/v1/me HTTP/1.1\r\nHost: x\r\n\r\n")
                r, _ = parse_response(t.value())
                assert r.status == 200
                p = json.loads(r.body)["principal"]
                assert p["kind"] == "local" and p["name"] == f"uid={os.geteuid()}"
    finally:
        s1.close()
        s2.close()


def test_healthz_and_metrics(world):
    c = Conn(world)
    r = c.send("GET", "/healthz")
    assert r.status == 200 and r.body == b"ok\n"
    world.ready["ok"] = (False, "waiting for the spool key")
    r = c.send("GET", "/healthz")
    assert r.status == 503 and json.loads(r.body)["error"] == "waiting for the spool key"
    r = c.send("GET", "/metrics")
    assert r.status == 200 and r.header("content-type").startswith("text/plain")
    text = r.body.decode()
    for line in ("mailtresor_spool_depth 3.0", "mailtresor_messages_archived_total 7.0",
                 "mailtresor_archive_lag_seconds 1.5", 'mailtresor_key_cached{current="true",name="spool",version="1"} 1.0'):
        assert line in text, line
    assert 'mailtresor_http_request_duration_seconds_count{route="/healthz",status="503"} 1.0' in text
    # From elsewhere: only the appliance administrator.
    far = Conn(world, host="192.0.2.7")
    assert far.send("GET", "/metrics").status == 401
    far.login("alice", "alice-password-1")
    r = far.send("GET", "/metrics")
    assert r.status == 403
    far.login("root", "root-password-1", tenant=None)
    assert far.send("GET", "/metrics").status == 200


def test_admin_routes_check_role_and_tenant(world):
    c = Conn(world)
    c.login("alice", "alice-password-1")
    r = c.send("GET", "/api/v1/users")
    assert r.status == 403 and "admin role" in json.loads(r.body)["error"]
    c.login("adam", "adam-password-1")
    assert json.loads(c.send("GET", "/api/v1/users").body)["users"][0]["tenant"] == "acme"
    assert c.send("GET", "/api/v1/users?tenant=globex").status == 404
    r = c.send("POST", "/api/v1/users", {"name": "bob", "password": "bob-password-1", "roles": ["user"],
                                         "addresses": ["bob@acme.example"]}, headers={"X-CSRF-Token": c.csrf})
    assert r.status == 201 and json.loads(r.body)["tenant"] == "acme"
    r = c.send("POST", "/api/v1/users", {"name": "bob", "password": "bob-password-1", "roles": ["user"]},
               headers={"X-CSRF-Token": c.csrf})
    assert r.status == 409
    r = c.send("POST", "/api/v1/users", {"name": "eve", "password": "x", "roles": ["user"]},
               headers={"X-CSRF-Token": c.csrf})
    assert r.status == 400 and "too short" in json.loads(r.body)["error"]
    r = c.send("POST", "/api/v1/tokens", {"name": "soc", "scopes": ["events"]}, headers={"X-CSRF-Token": c.csrf})
    assert r.status == 201
    tok = json.loads(r.body)
    t = Conn(world)
    r = t.send("GET", "/api/v1/me", headers={"Authorization": f"Bearer {tok['token']}"})
    assert json.loads(r.body)["principal"]["scopes"] == ["events"]
    assert c.send("DELETE", f"/api/v1/tokens/{tok['id']}", headers={"X-CSRF-Token": c.csrf}).status == 200
    assert t.send("GET", "/api/v1/me", headers={"Authorization": f"Bearer {tok['token']}"}).status == 401
    assert c.send("GET", "/api/v1/tenants").status == 403
    assert c.send("GET", "/api/v1/status").status == 403
    records, _ = world.audit.read(tenant="acme")
    assert ("admin", "denied") in {(x["action"], x["result"]) for x in records}
