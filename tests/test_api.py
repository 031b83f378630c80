"""The HTTPS API against a real daemon (tests/harness/stack.py): real TLS
with the generated CA, the real access core over an archive of real mail,
users and tokens made through UserDB/TokenDB, the unix socket.

The matrix drives every route as every role of two tenants (user, auditor,
admin of acme and of globex), the appliance administrator, a token per
scope, the local principal over the unix socket, and nobody, and checks the
status against EXPECTED.  Every answer is checked against openapi.json
(tests/harness/openapi.py) and for the word "Traceback"."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from email.message import EmailMessage

import pytest

from mailtresor.access.auth import open_databases
from mailtresor.keys.client import control_fetcher

from tests.harness import openapi
from tests.harness.stack import Stack


PASSWORDS = {name: f"{name}-password-1" for name in
             ("alice", "aud", "adm", "gina", "gaud", "gadm", "root", "victim")}


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=30):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.path))


class Client:
    """One principal's keep-alive connection: a session (cookie + CSRF), a
    Bearer token, the unix socket, or nothing."""

    def __init__(self, stack, *, unix=False, token=None, source=None):
        self.stack, self.unix, self.token, self.source = stack, unix, token, source
        self.cookie = self.csrf = None
        self.conn = None

    def _connect(self):
        if self.unix:
            return UnixHTTPConnection(self.stack.cfg.appliance.runtime_directory / "api.sock")
        return http.client.HTTPSConnection("127.0.0.1", self.stack.api_port, context=self.stack.client_context(),
                                           timeout=30, source_address=(self.source, 0) if self.source else None)

    def request(self, method, path, body=None, headers=None, csrf=True, raw_body=None):
        h = dict(headers or {})
        if self.cookie:
            h["Cookie"] = f"mt_session={self.cookie}"
            if csrf and self.csrf and method in ("POST", "PUT", "PATCH", "DELETE"):
                h["X-CSRF-Token"] = self.csrf
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        if body is not None:
            raw_body = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = self._connect()
            try:
                self.conn.request(method, path, body=raw_body, headers=h)
                r = self.conn.getresponse()
                data = r.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ssl.SSLEOFError):
                # The server closed the idle keep-alive connection ([api] timeout).
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        if r.getheader("Connection", "").lower() == "close":
            self.conn.close()
            self.conn = None
        assert b"Traceback" not in data, data[:500]
        openapi.check(method, path, r.status, r.getheader("Content-Type"), data)
        r.data = data
        r.json = (lambda: json.loads(data))
        return r

    def login(self, name, tenant):
        r = self.request("POST", "/api/v1/login", {"tenant": tenant, "username": name, "password": PASSWORDS[name]})
        assert r.status == 200, r.data
        cookie = [v for k, v in r.getheaders() if k.lower() == "set-cookie" and v.startswith("mt_session=")][0]
        self.cookie = cookie.split(";", 1)[0].split("=", 1)[1]
        self.csrf = r.json()["csrf"]
        self.set_cookie = cookie
        return self

    def close(self):
        if self.conn is not None:
            self.conn.close()


def mail(sender, to, subject, attachment=None) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = sender, to, subject
    m["Message-ID"] = f"<{subject.replace(' ', '.')}@test>"
    m["Date"] = "Fri, 01 Mar 2024 10:00:00 +0000"
    m.set_content(f"The body of {subject}.\n")
    if attachment:
        m.add_attachment(attachment, maintype="application", subtype="octet-stream", filename="data.bin")
    return m.as_bytes()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    stack = Stack(d, {"archive": {"enabled": True},
                      # /metrics: not open to loopback here, so the matrix sees who may log in for it
                      "api": {"metrics_networks": ["192.0.2.0/24"], "timeout": 20},
                      "access": {"throttle_failures": 3}}, milter=False)
    stack.start_control()
    users, tokens = open_databases(stack.cfg, control_fetcher(stack.cfg))
    users.add("acme", "alice", PASSWORDS["alice"], {"user"}, ["alice@acme.example"])
    users.add("acme", "aud", PASSWORDS["aud"], {"auditor"}, [])
    users.add("acme", "adm", PASSWORDS["adm"], {"admin"}, [])
    users.add("acme", "victim", PASSWORDS["victim"], {"user"}, ["victim@acme.example"])
    users.add("globex", "gina", PASSWORDS["gina"], {"user"}, ["gina@globex.example"])
    users.add("globex", "gaud", PASSWORDS["gaud"], {"auditor"}, [])
    users.add("globex", "gadm", PASSWORDS["gadm"], {"admin"}, [])
    users.add(None, "root", PASSWORDS["root"], {"appliance-admin"}, [])
    toks = {scope: tokens.issue("acme", f"t-{scope}", {scope}, time.time() + 3600)[1]
            for scope in ("search", "export", "events")}
    stack.start_daemon()
    with stack.smtp() as s:
        s.sendmail("bob@acme.example", ["alice@acme.example"],
                   mail("bob@acme.example", "alice@acme.example", "for alice", attachment=b"\x00\x01payload"))
        s.sendmail("carol@acme.example", ["dave@acme.example"],
                   mail("carol@acme.example", "dave@acme.example", "not for alice"))
        s.sendmail("hank@globex.example", ["gina@globex.example"],
                   mail("hank@globex.example", "gina@globex.example", "for gina"))
    aud = Client(stack).login("aud", "acme")
    gaud = Client(stack).login("gaud", "globex")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        a, g = aud.request("GET", "/api/v1/search?q="), gaud.request("GET", "/api/v1/search?q=")
        if a.status == 200 and g.status == 200 and a.json()["total"] == 2 and g.json()["total"] == 1:
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"mail not archived: {a.data[:300]} {g.data[:300]}\n{stack.log()[-3000:]}")
    ids = {r["subject"]: r["id"] for r in a.json()["results"] + g.json()["results"]}
    clients = {"anon": Client(stack), "aud": aud, "gaud": gaud, "local": Client(stack, unix=True)}
    for name, tenant in (("alice", "acme"), ("adm", "acme"), ("gina", "globex"), ("gadm", "globex"),
                         ("root", None)):
        clients[name] = Client(stack).login(name, tenant)
    for scope, secret in toks.items():
        clients[f"tok-{scope}"] = Client(stack, token=secret)
    yield type("World", (), {"stack": stack, "ids": ids, "clients": clients, "users": users, "tokens": tokens})
    for c in clients.values():
        c.close()
    stack.close()


PRINCIPALS = ("anon", "alice", "aud", "adm", "gina", "gaud", "gadm", "root", "tok-search", "tok-export",
              "tok-events", "local")

# route -> expected status per principal, in PRINCIPALS order.  Reading:
#   alice: acme user (own mail: "for alice"); aud/gaud: auditors; adm/gadm:
#   admins (read no mail); root: appliance administrator (reads no mail);
#   tokens: acme; local: the unix socket, acts as auditor + admin of the
#   tenant it names (these requests name none: 400 where one is needed).
E = dict
EXPECTED = [
    ("POST", "/api/v1/login", {"tenant": "acme", "username": "victim", "password": "victim-password-1"},
     E(**{p: 200 for p in PRINCIPALS})),
    ("GET", "/api/v1/me", None,
     E(anon=401, alice=200, aud=200, adm=200, gina=200, gaud=200, gadm=200, root=200, **{
         "tok-search": 200, "tok-export": 200, "tok-events": 200}, local=200)),
    ("GET", "/api/v1/search?q=", None,
     E(anon=401, alice=200, aud=200, adm=403, gina=200, gaud=200, gadm=403, root=403, **{
         "tok-search": 200, "tok-export": 200, "tok-events": 403}, local=400)),
    ("GET", "/api/v1/search?q=&tenant=acme", None,
     E(anon=401, alice=200, aud=200, adm=403, gina=404, gaud=404, gadm=403, root=403, **{
         "tok-search": 200, "tok-export": 200, "tok-events": 403}, local=200)),
    ("GET", "/api/v1/messages/{alice}", None,
     E(anon=401, alice=200, aud=200, adm=403, gina=404, gaud=404, gadm=403, root=403, **{
         "tok-search": 200, "tok-export": 200, "tok-events": 403}, local=400)),
    ("GET", "/api/v1/messages/{alice}?tenant=acme", None,
     E(anon=401, alice=200, aud=200, adm=403, gina=404, gaud=404, gadm=403, root=403, **{
         "tok-search": 200, "tok-export": 200, "tok-events": 403}, local=200)),
    ("GET", "/api/v1/messages/{other}", None,
     E(anon=401, alice=404, aud=200, adm=403, gina=404, gaud=404, gadm=403, root=403, **{
         "tok-search": 200, "tok-export": 200, "tok-events": 403}, local=400)),
    ("GET", "/api/v1/messages/{alice}/raw", None,
     E(anon=401, alice=200, aud=200, adm=403, gina=404, gaud=404, gadm=403, root=403, **{
         "tok-search": 200, "tok-export": 200, "tok-events": 403}, local=400)),
    ("GET", "/api/v1/messages/{other}/text", None,
     E(anon=401, alice=404, aud=200, adm=403, gina=404, gaud=404, gadm=403, root=403, **{
         "tok-search": 200, "tok-export": 200, "tok-events": 403}, local=400)),
    ("GET", "/api/v1/messages/{alice}/html", None,
     E(anon=401, alice=200, aud=200, adm=403, gina=404, gaud=404, gadm=403, root=403, **{
         "tok-search": 200, "tok-export": 200, "tok-events": 403}, local=400)),
    ("GET", "/api/v1/messages/{alice}/attachments/1", None,
     E(anon=401, alice=200, aud=200, adm=403, gina=404, gaud=404, gadm=403, root=403, **{
         "tok-search": 200, "tok-export": 200, "tok-events": 403}, local=400)),
    ("GET", "/api/v1/messages/{gina}", None,
     E(anon=401, alice=404, aud=404, adm=403, gina=200, gaud=200, gadm=403, root=403, **{
         "tok-search": 404, "tok-export": 404, "tok-events": 403}, local=400)),
    ("POST", "/api/v1/exports", {"ids": ["{alice}"], "format": "mbox"},
     E(anon=401, alice=202, aud=202, adm=403, gina=202, gaud=202, gadm=403, root=403, **{
         "tok-search": 403, "tok-export": 202, "tok-events": 403}, local=400)),
    ("GET", "/api/v1/exports", None,
     E(anon=401, alice=200, aud=200, adm=403, gina=200, gaud=200, gadm=403, root=403, **{
         "tok-search": 403, "tok-export": 200, "tok-events": 403}, local=200)),
    ("GET", "/api/v1/exports/00000000000000000000000000000000", None,
     E(anon=401, alice=404, aud=404, adm=404, gina=404, gaud=404, gadm=404, root=404, **{
         "tok-search": 404, "tok-export": 404, "tok-events": 404}, local=404)),
    ("GET", "/api/v1/audit?tenant=acme", None,
     E(anon=401, alice=403, aud=200, adm=403, gina=404, gaud=404, gadm=404, root=403, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=200)),
    ("GET", "/api/v1/events?tenant=acme", None,
     E(anon=401, alice=403, aud=200, adm=403, gina=404, gaud=404, gadm=404, root=403, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 200}, local=200)),
    ("GET", "/api/v1/exports/00000000000000000000000000000000/download", None,
     E(anon=401, alice=404, aud=404, adm=404, gina=404, gaud=404, gadm=404, root=404, **{
         "tok-search": 404, "tok-export": 404, "tok-events": 404}, local=404)),
    ("GET", "/api/v1/audit", None,
     E(anon=401, alice=403, aud=200, adm=403, gina=403, gaud=200, gadm=403, root=400, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=400)),
    ("GET", "/api/v1/events", None,
     E(anon=401, alice=403, aud=200, adm=403, gina=403, gaud=200, gadm=403, root=400, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 200}, local=400)),
    ("GET", "/api/v1/users", None,
     E(anon=401, alice=403, aud=403, adm=200, gina=403, gaud=403, gadm=200, root=200, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=200)),
    ("POST", "/api/v1/users", {"name": "new-{who}", "password": "new-password-1", "roles": ["user"]},
     E(anon=401, alice=403, aud=403, adm=201, gina=403, gaud=403, gadm=201, root=400, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=400)),
    ("PATCH", "/api/v1/users/victim", {"roles": ["user"], "addresses": ["victim@acme.example"]},
     E(anon=401, alice=403, aud=403, adm=200, gina=403, gaud=403, gadm=404, root=404, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=404)),
    ("POST", "/api/v1/users/victim/disable", None,
     E(anon=401, alice=403, aud=403, adm=200, gina=403, gaud=403, gadm=404, root=404, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=404)),
    ("POST", "/api/v1/users/victim/enable?tenant=acme", None,
     E(anon=401, alice=403, aud=403, adm=200, gina=403, gaud=403, gadm=404, root=200, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=200)),
    ("POST", "/api/v1/users/victim/password", {"password": "victim-password-1"},
     E(anon=401, alice=403, aud=403, adm=200, gina=403, gaud=403, gadm=404, root=404, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=404)),
    ("GET", "/api/v1/tokens", None,
     E(anon=401, alice=403, aud=403, adm=200, gina=403, gaud=403, gadm=200, root=200, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=200)),
    ("POST", "/api/v1/tokens", {"name": "t-{who}", "scopes": ["search"]},
     E(anon=401, alice=403, aud=403, adm=201, gina=403, gaud=403, gadm=201, root=400, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=400)),
    ("DELETE", "/api/v1/tokens/0123456789abcdef", None,
     E(anon=401, alice=403, aud=403, adm=404, gina=403, gaud=403, gadm=404, root=404, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=404)),
    ("GET", "/api/v1/tenants", None,
     E(anon=401, alice=403, aud=403, adm=403, gina=403, gaud=403, gadm=403, root=200, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=200)),
    ("GET", "/api/v1/status", None,
     E(anon=401, alice=403, aud=403, adm=403, gina=403, gaud=403, gadm=403, root=200, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=200)),
    ("GET", "/api/v1/openapi.json", None, E(**{p: 200 for p in PRINCIPALS})),
    ("GET", "/healthz", None, E(**{p: 200 for p in PRINCIPALS})),
    ("GET", "/metrics", None,
     E(anon=401, alice=403, aud=403, adm=403, gina=403, gaud=403, gadm=403, root=200, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=200)),
    # One's own account: bodies refused before any password check (no
    # throttle counted, nothing changed); tests/test_web_account.py drives them.
    ("POST", "/api/v1/me/password", {"current": "x", "new": "short"},
     E(anon=401, alice=400, aud=400, adm=400, gina=400, gaud=400, gadm=400, root=400, **{
         "tok-search": 400, "tok-export": 400, "tok-events": 400}, local=400)),
    ("POST", "/api/v1/me/totp/begin", {},
     E(anon=401, alice=400, aud=400, adm=400, gina=400, gaud=400, gadm=400, root=400, **{
         "tok-search": 400, "tok-export": 400, "tok-events": 400}, local=400)),
    ("POST", "/api/v1/me/totp/confirm", {"code": "123456"},
     E(anon=401, alice=400, aud=400, adm=400, gina=400, gaud=400, gadm=400, root=400, **{
         "tok-search": 400, "tok-export": 400, "tok-events": 400}, local=400)),
    ("POST", "/api/v1/me/totp/recovery-codes", {},
     E(anon=401, alice=400, aud=400, adm=400, gina=400, gaud=400, gadm=400, root=400, **{
         "tok-search": 400, "tok-export": 400, "tok-events": 400}, local=400)),
    ("POST", "/api/v1/me/totp/off", {},
     E(anon=401, alice=400, aud=400, adm=400, gina=400, gaud=400, gadm=400, root=400, **{
         "tok-search": 400, "tok-export": 400, "tok-events": 400}, local=400)),
    # GDPR and evidence (access/gdpr.py): subject access and Art. 30 records
    # for auditors ("gdpr"), evidence for auditors and administrators
    # ("lifecycle-read"); another tenant's is 404.
    ("POST", "/api/v1/gdpr/subject-access", {"address": "alice@acme.example", "format": "zip"},
     E(anon=401, alice=403, aud=202, adm=403, gina=403, gaud=202, gadm=403, root=403, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=400)),
    ("POST", "/api/v1/gdpr/subject-access", {"address": "alice@acme.example", "format": "mbox", "tenant": "acme"},
     E(anon=401, alice=403, aud=202, adm=403, gina=403, gaud=404, gadm=403, root=403, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=202)),
    ("GET", "/api/v1/gdpr/records", None,
     E(anon=401, alice=403, aud=200, adm=403, gina=403, gaud=200, gadm=403, root=403, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=400)),
    ("GET", "/api/v1/gdpr/records?tenant=acme", None,
     E(anon=401, alice=403, aud=200, adm=403, gina=403, gaud=404, gadm=403, root=403, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=200)),
    ("GET", "/api/v1/evidence", None,
     E(anon=401, alice=403, aud=200, adm=200, gina=403, gaud=200, gadm=200, root=400, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=400)),
    ("GET", "/api/v1/evidence?tenant=acme&verify=1", None,
     E(anon=401, alice=403, aud=200, adm=200, gina=403, gaud=404, gadm=404, root=200, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=200)),
    # Retention (access/retention.py): lifecycle-read to list, retention-manage
    # (auditors; local) to change, preview and run; rules of 100 years delete
    # nothing here, runs are dry.  Another tenant's is 404 (after the role check).
    ("GET", "/api/v1/retention/rules", None,
     E(anon=401, alice=403, aud=200, adm=200, gina=403, gaud=200, gadm=200, root=400, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=400)),
    ("GET", "/api/v1/retention/rules?tenant=acme", None,
     E(anon=401, alice=403, aud=200, adm=200, gina=403, gaud=404, gadm=404, root=200, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=200)),
    ("POST", "/api/v1/retention/rules", {"name": "keep-{who}", "maximum": "100y"},
     E(anon=401, alice=403, aud=201, adm=403, gina=403, gaud=201, gadm=403, root=403, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=400)),
    ("PUT", "/api/v1/retention/rules/0123456789ab", {"name": "x", "maximum": "100y"},
     E(anon=401, alice=403, aud=404, adm=403, gina=403, gaud=404, gadm=403, root=403, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=400)),
    ("DELETE", "/api/v1/retention/rules/0123456789ab?tenant=acme", None,
     E(anon=401, alice=403, aud=404, adm=403, gina=403, gaud=404, gadm=403, root=403, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=404)),
    ("POST", "/api/v1/retention/preview", {"name": "p", "maximum": "100y"},
     E(anon=401, alice=403, aud=200, adm=403, gina=403, gaud=200, gadm=403, root=403, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=400)),
    ("POST", "/api/v1/retention/run", {"tenant": "acme", "dry_run": True},
     E(anon=401, alice=403, aud=200, adm=403, gina=403, gaud=404, gadm=403, root=403, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=200)),
    # Case tags (access/tags.py): auditors of the message's tenant only.
    ("POST", "/api/v1/messages/{other}/tags", {"add": ["case:matrix"]},
     E(anon=401, alice=403, aud=200, adm=403, gina=403, gaud=404, gadm=403, root=403, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=400)),
    ("POST", "/api/v1/messages/{other}/tags?tenant=acme", {"remove": ["case:matrix"]},
     E(anon=401, alice=403, aud=200, adm=403, gina=403, gaud=404, gadm=403, root=403, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=200)),
    # Legal holds and four-eyes deletion requests (access/holds.py;
    # tests/test_holds.py drives them).  lifecycle-read: auditors and
    # admins; hold-manage, deletion-request, deletion-decide: auditors.
    ("GET", "/api/v1/holds", None,
     E(anon=401, alice=403, aud=200, adm=200, gina=403, gaud=200, gadm=200, root=400, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=400)),
    ("GET", "/api/v1/holds?tenant=acme", None,
     E(anon=401, alice=403, aud=200, adm=200, gina=403, gaud=404, gadm=404, root=200, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=200)),
    ("POST", "/api/v1/holds", {"name": "m-{who}", "reason": "matrix", "query": "subject:alice"},
     E(anon=401, alice=403, aud=201, adm=403, gina=403, gaud=201, gadm=403, root=403, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=400)),
    ("GET", "/api/v1/holds/m-aud", None,
     E(anon=401, alice=403, aud=200, adm=200, gina=403, gaud=404, gadm=404, root=400, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=400)),
    ("POST", "/api/v1/holds/m-aud/lift", {"reason": "matrix"},
     E(anon=401, alice=403, aud=200, adm=403, gina=403, gaud=404, gadm=403, root=403, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=400)),
    ("GET", "/api/v1/deletion-requests", None,
     E(anon=401, alice=403, aud=200, adm=200, gina=403, gaud=200, gadm=200, root=400, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=400)),
    ("POST", "/api/v1/deletion-requests", {"reason": "matrix", "ids": ["{alice}"]},
     E(anon=401, alice=403, aud=201, adm=403, gina=403, gaud=400, gadm=403, root=403, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=400)),
    ("GET", "/api/v1/deletion-requests/ffffffffffff", None,
     E(anon=401, alice=403, aud=404, adm=404, gina=403, gaud=404, gadm=404, root=400, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=400)),
    ("POST", "/api/v1/deletion-requests/ffffffffffff/approve", None,
     E(anon=401, alice=403, aud=404, adm=403, gina=403, gaud=404, gadm=403, root=403, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=400)),
    ("POST", "/api/v1/deletion-requests/ffffffffffff/reject", {"reason": "matrix"},
     E(anon=401, alice=403, aud=404, adm=403, gina=403, gaud=404, gadm=403, root=403, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=400)),
    # Maintenance (the appliance's housekeeping): the appliance administrator
    # and local principals only; a month with no shard changes nothing.
    ("POST", "/api/v1/maintenance/compact", {"month": "1999-01"},
     E(anon=401, alice=403, aud=403, adm=403, gina=403, gaud=403, gadm=403, root=200, **{
         "tok-search": 403, "tok-export": 403, "tok-events": 403}, local=200)),
    ("POST", "/api/v1/logout", None,
     E(anon=401, alice=200, aud=200, adm=200, gina=200, gaud=200, gadm=200, root=200, **{
         "tok-search": 400, "tok-export": 400, "tok-events": 400}, local=400)),
]


def _fill(text: str, ids: dict, who: str) -> str:
    return (text.replace("{alice}", ids["for alice"]).replace("{other}", ids["not for alice"])
            .replace("{gina}", ids["for gina"]).replace("{who}", who))


def test_matrix_every_route_every_principal(world):
    documented = {(m.upper(), t) for t, item in openapi.document()["paths"].items() for m in item}
    covered = {(m, openapi.operation(m, _fill(p, world.ids, "x"))[0]) for m, p, _, _ in EXPECTED}
    assert documented - covered == set(), "routes the matrix does not drive"
    got, wrong = {}, []
    for method, path, body, expected in EXPECTED:
        assert set(expected) == set(PRINCIPALS), path
        for who in PRINCIPALS:
            c = world.clients[who]      # the sessions end at the last row (logout)
            b = json.loads(_fill(json.dumps(body), world.ids, who)) if body is not None else None
            r = c.request(method, _fill(path, world.ids, who), b)
            got[(method, path, who)] = r.status
            if r.status != expected[who]:
                wrong.append(f"{method} {path} as {who}: {r.status} (expected {expected[who]}) {r.data[:160]!r}")
            if r.status >= 400:
                assert set(r.json()) <= {"error", "totp_required"} and r.json()["error"]
    assert not wrong, "\n".join(wrong)


def test_denials_are_audited(world):
    aud = Client(world.stack).login("aud", "acme")
    adm = Client(world.stack).login("adm", "acme")
    assert adm.request("GET", f"/api/v1/messages/{world.ids['for alice']}").status == 403
    assert Client(world.stack).login("alice", "acme").request("GET", "/api/v1/users").status == 403
    records = aud.request("GET", "/api/v1/audit?limit=1000").json()["records"]
    denied = [(r["principal"], r["action"]) for r in records if r["result"] == "denied"]
    assert any("adm" in p and a == "read" for p, a in denied), denied
    assert any("alice" in p and a == "admin" for p, a in denied), denied


def test_cookie_attributes_and_csrf(world):
    c = Client(world.stack).login("alice", "acme")
    attrs = [a.strip().lower() for a in c.set_cookie.split(";")[1:]]
    assert "secure" in attrs and "httponly" in attrs and "samesite=strict" in attrs and "path=/" in attrs
    for method, path, body in (("POST", "/api/v1/logout", None),
                               ("POST", "/api/v1/exports", {"ids": [world.ids["for alice"]], "format": "mbox"})):
        r = c.request(method, path, body, csrf=False)
        assert r.status == 403 and "CSRF" in r.json()["error"], r.data
        r = c.request(method, path, body, headers={"X-CSRF-Token": "x" * 43}, csrf=False)
        assert r.status == 403
    assert c.request("GET", "/api/v1/me").status == 200       # still logged in: nothing happened


def test_security_headers_on_every_answer(world):
    c = Client(world.stack).login("alice", "acme")
    aid = world.ids["for alice"]
    for path in ("/api/v1/me", "/api/v1/nothing", f"/api/v1/messages/{aid}/raw", f"/api/v1/messages/{aid}/html",
                 "/healthz"):
        r = c.request("GET", path)
        assert r.getheader("Strict-Transport-Security") and r.getheader("X-Content-Type-Options") == "nosniff"
        assert r.getheader("Referrer-Policy") == "no-referrer" and r.getheader("Cache-Control") == "no-store"
        assert r.getheader("X-Frame-Options") == "DENY"
    r = c.request("GET", f"/api/v1/messages/{aid}/html")
    assert r.getheader("Content-Security-Policy").startswith("default-src 'none'")
    assert "sandbox" in r.getheader("Content-Security-Policy")
    r = c.request("GET", f"/api/v1/messages/{aid}/raw")
    assert r.getheader("Content-Type") == "message/rfc822"
    assert r.getheader("Content-Disposition").startswith("attachment;")
    assert b"Subject: for alice" in r.data
    r = c.request("GET", f"/api/v1/messages/{aid}/attachments/1")
    assert r.getheader("Content-Type") == "application/octet-stream" and r.data == b"\x00\x01payload"
    assert r.getheader("Content-Disposition").startswith('attachment; filename="data.bin"')


def test_bad_input(world):
    c = Client(world.stack).login("aud", "acme")
    r = c.request("GET", "/api/v1/search?q=&limit=201")
    assert r.status == 400 and "limit" in r.json()["error"]
    r = c.request("GET", "/api/v1/search?q=from:(")
    assert r.status == 400, r.data
    r = c.request("GET", "/api/v1/search?q=&cursor=AAAA")
    assert r.status == 400 and "cursor" in r.json()["error"]
    r = c.request("POST", "/api/v1/exports", raw_body=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status == 400 and r.json()["error"].startswith("malformed JSON")
    for path in ("/api/v1/messages/..%2F..%2Fetc%2Fpasswd", "/api/v1/messages/../../../etc/passwd",
                 "/api/v1/messages/" + "0" * 40, "/api/v1/exports/..%2f/download"):
        assert c.request("GET", path).status == 404, path
    r = c.request("PUT", "/api/v1/search")
    assert r.status == 405 and r.getheader("Allow") == "GET, HEAD"
    assert c.request("GET", "/api/v1/nope").status == 404


def test_oversized_body_413(world):
    s = socket.create_connection(("127.0.0.1", world.stack.api_port))
    tls = world.stack.client_context().wrap_socket(s, server_hostname="127.0.0.1")
    tls.sendall(b"POST /api/v1/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 2000000\r\n\r\n" + b"x" * 1000)
    data = b""
    while True:
        chunk = tls.recv(65536)
        if not chunk:
            break
        data += chunk
    tls.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), data[:200]
    assert json.loads(body)["error"].startswith("the request body is larger than")
    openapi.check("POST", "/api/v1/login", 413, "application/json", body)


def test_login_throttled_429_with_retry_after(world):
    c = Client(world.stack, source="127.0.0.2")
    for _ in range(3):
        r = c.request("POST", "/api/v1/login", {"tenant": "acme", "username": "gaud", "password": "wrong-password"})
        assert r.status == 401
    r = c.request("POST", "/api/v1/login", {"tenant": "acme", "username": "gaud", "password": "wrong-password"})
    assert r.status == 429 and int(r.getheader("Retry-After")) >= 1


def test_export_download_resumes_with_range(world):
    c = Client(world.stack).login("aud", "acme")
    r = c.request("POST", "/api/v1/exports", {"query": "", "format": "mbox"})
    assert r.status == 202, r.data
    job = r.json()
    deadline = time.monotonic() + 60
    while job["state"] not in ("done", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
        job = c.request("GET", f"/api/v1/exports/{job['id']}").json()
    assert job["state"] == "done", job
    whole = c.request("GET", f"/api/v1/exports/{job['id']}/download")
    assert whole.status == 200 and len(whole.data) == job["size"] and whole.getheader("Accept-Ranges") == "bytes"
    assert b"Subject: for alice" in whole.data and b"Subject: not for alice" in whole.data
    half = len(whole.data) // 2
    rest = c.request("GET", f"/api/v1/exports/{job['id']}/download", headers={"Range": f"bytes={half}-"})
    assert rest.status == 206 and whole.data[:half] + rest.data == whole.data
    assert rest.getheader("Content-Range") == f"bytes {half}-{len(whole.data) - 1}/{len(whole.data)}"
    r = c.request("GET", f"/api/v1/exports/{job['id']}/download", headers={"Range": f"bytes={len(whole.data) + 10}-"})
    assert r.status == 416
    # Another principal of the same tenant does not get someone else's export.
    assert world.clients["tok-export"].request("GET", f"/api/v1/exports/{job['id']}/download").status == 404


def _finished(c, job_id):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = c.request("GET", f"/api/v1/exports/{job_id}").json()
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(job)


def test_export_list_is_the_callers_own(world):
    """GET /api/v1/exports: the caller's jobs only, newest first; another
    user's and an auditor's jobs are neither listed nor reachable by id."""
    alice = Client(world.stack).login("alice", "acme")
    aud = Client(world.stack).login("aud", "acme")
    mine = []
    for body in ({"ids": [world.ids["for alice"]], "format": "mbox"}, {"query": "alice", "format": "zip"}):
        r = alice.request("POST", "/api/v1/exports", body)
        assert r.status == 202, r.data
        mine.append(_finished(alice, r.json()["id"]))
    r = aud.request("POST", "/api/v1/exports", {"query": "", "format": "mbox"})
    theirs = _finished(aud, r.json()["id"])
    listed = alice.request("GET", "/api/v1/exports").json()["exports"]
    assert [j["id"] for j in listed][:2] == [mine[1]["id"], mine[0]["id"]]
    assert listed[0]["query"] == "alice" and listed[1]["query"] is None and listed[1]["total"] == 1
    assert theirs["id"] not in {j["id"] for j in listed}
    assert all(j["state"] == "done" for j in listed)
    aud_listed = {j["id"] for j in aud.request("GET", "/api/v1/exports").json()["exports"]}
    assert theirs["id"] in aud_listed and not aud_listed & {j["id"] for j in mine}
    for path in (f"/api/v1/exports/{theirs['id']}", f"/api/v1/exports/{theirs['id']}/download"):
        assert alice.request("GET", path).status == 404
    for path in (f"/api/v1/exports/{mine[0]['id']}", f"/api/v1/exports/{mine[0]['id']}/download"):
        assert aud.request("GET", path).status == 404
    r = Client(world.stack).login("adm", "acme").request("GET", "/api/v1/exports")
    assert r.status == 403 and r.json()["error"] == "administrators do not read mail"
    records = aud.request("GET", "/api/v1/audit?limit=1000").json()["records"]
    lists = [r for r in records if r["action"] == "export" and (r.get("detail") or {}).get("list")]
    assert any(r["principal"] == "user:alice" and r["result"] == "ok" for r in lists), lists[-3:]
    assert any(r["principal"] == "user:adm" and r["result"] == "denied" for r in lists), lists[-3:]
    # A non-string id is a clear 400, not a crash.
    r = alice.request("POST", "/api/v1/exports", {"ids": [7], "format": "mbox"})
    assert r.status == 400 and "ids" in r.json()["error"]


def test_unix_socket_is_0660_and_local_principal(world):
    import os
    import stat
    path = world.stack.cfg.appliance.runtime_directory / "api.sock"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    r = world.clients["local"].request("GET", "/api/v1/me")
    p = r.json()["principal"]
    assert p["kind"] == "local" and p["name"] == f"uid={os.geteuid()}"


def test_metrics_numbers(world):
    r = Client(world.stack).login("root", None).request("GET", "/metrics")
    text = r.data.decode()
    for name in ("mailtresor_spool_depth", "mailtresor_messages_archived_total 3.0", "mailtresor_archive_lag_seconds",
                 "mailtresor_index_lag_seconds", 'mailtresor_key_cached{current="true",name="spool"',
                 'mailtresor_http_request_duration_seconds_bucket{le="0.005",route="/api/v1/search",status="200"}'):
        assert name in text, name


def test_search_terms_stay_out_of_the_log(world):
    c = Client(world.stack).login("aud", "acme")
    assert c.request("GET", "/api/v1/search?q=zebrafinchsecret").status == 200
    assert c.request("GET", "/api/v1/search?q=zebrafinchsecret&limit=9999").status == 400
    assert "zebrafinchsecret" not in world.stack.log()
