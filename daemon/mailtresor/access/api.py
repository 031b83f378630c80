"""The HTTPS API: HTTP in front of the access core, on the daemon's reactor.

A thin adapter.  It finds the route, works out who is asking (a session
cookie with its CSRF token, a Bearer token, or the unix socket's peer),
hands the call to the access core (mailtresor.access.core) in a bounded
thread pool (the core blocks: LMDB, Xapian, argon2), and turns the answer
or the core's AccessError into JSON.  The core checks scope and writes the
audit record; this module audits only what happens here: logins, logouts,
user and token administration, and refusals it makes itself.

Routes: see ROUTES and openapi.json beside this module (the tests validate
every answer against it).  Errors are {"error": reason} with the status; an
unexpected exception is a 500 {"error": "internal error"}, its traceback in
the log only.

Nothing here touches the global reactor: the daemon (mailtresor.service)
passes its reactor and thread pool in.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import math
import re
import secrets
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from twisted.internet import defer, threads
from twisted.web import resource, server, static

from .http import (HTML_CSP, JSON_TYPE, SECURITY_HEADERS, ConnectionGate, HttpError, LimitedRequest,
                   bool_arg, content_disposition, download_type, int_arg, json_bytes, member,
                   parse_json_object, query_args)
from .core import MAX_AUDIT_PAGE, MAX_PAGE
from .principal import Principal

log = logging.getLogger("mailtresor.access.api")

OPENAPI_PATH = Path(__file__).with_name("openapi.json")
COOKIE = b"mt_session"
# "/": the web UI (mailtresor.web) on the same listener shares the session.
COOKIE_PATH = b"/"
CSRF_HEADER = b"x-csrf-token"
ORDERS = ("date-desc", "date-asc", "relevance")
EXPORT_FORMATS = ("mbox", "zip")
MAX_EXPORT_IDS = 100_000
STATE_CHANGING = (b"POST", b"PUT", b"PATCH", b"DELETE")

# What a path segment may be before anything is looked up: anything else
# (an encoded slash, "..", a NUL...) is "not found" without a lookup.
_MESSAGE_ID = re.compile(r"[0-9A-Za-z]{8,64}")
_JOB_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
_TOKEN_ID = re.compile(r"[0-9a-f]{1,64}")
_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
_ATTACHMENT = re.compile(r"[0-9]{1,4}")


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str            # "/api/v1/messages/{id}"; also the metrics label
    handler: str            # Api.h_<handler>
    login: bool = True      # needs a principal
    args: tuple[str, ...] = ()      # query parameters it takes

    def regex(self) -> re.Pattern:
        return re.compile(re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", re.escape(self.pattern).replace(r"\{", "{")
                                 .replace(r"\}", "}")) + r"\Z")


V1 = "/api/v1"
ROUTES = (
    Route("POST", f"{V1}/login", "login", login=False),
    Route("POST", f"{V1}/logout", "logout"),
    Route("GET", f"{V1}/me", "me"),
    Route("POST", f"{V1}/me/password", "me_password"),
    Route("POST", f"{V1}/me/totp/begin", "me_totp_begin"),
    Route("POST", f"{V1}/me/totp/confirm", "me_totp_confirm"),
    Route("POST", f"{V1}/me/totp/recovery-codes", "me_recovery_codes"),
    Route("POST", f"{V1}/me/totp/off", "me_totp_off"),
    Route("GET", f"{V1}/search", "search", args=("q", "cursor", "limit", "order", "facets", "tenant")),
    Route("GET", f"{V1}/messages/{{id}}", "message", args=("tenant",)),
    Route("GET", f"{V1}/messages/{{id}}/raw", "raw", args=("tenant",)),
    Route("GET", f"{V1}/messages/{{id}}/text", "text", args=("tenant",)),
    Route("GET", f"{V1}/messages/{{id}}/html", "html", args=("tenant",)),
    Route("GET", f"{V1}/messages/{{id}}/attachments/{{n}}", "attachment", args=("tenant",)),
    Route("GET", f"{V1}/exports", "export_list"),
    Route("POST", f"{V1}/exports", "export_start"),
    Route("GET", f"{V1}/exports/{{id}}", "export_status"),
    Route("GET", f"{V1}/exports/{{id}}/download", "export_download"),
    Route("GET", f"{V1}/audit", "audit", args=("since", "limit", "tenant", "principal", "action", "result",
                                               "after", "before")),
    Route("GET", f"{V1}/events", "events", args=("since", "limit", "tenant")),
    Route("GET", f"{V1}/users", "users", args=("tenant",)),
    Route("POST", f"{V1}/users", "user_add"),
    Route("PATCH", f"{V1}/users/{{name}}", "user_update", args=("tenant",)),
    Route("POST", f"{V1}/users/{{name}}/disable", "user_disable", args=("tenant",)),
    Route("POST", f"{V1}/users/{{name}}/enable", "user_enable", args=("tenant",)),
    Route("POST", f"{V1}/users/{{name}}/password", "user_password", args=("tenant",)),
    Route("GET", f"{V1}/tokens", "tokens", args=("tenant",)),
    Route("POST", f"{V1}/tokens", "token_issue"),
    Route("DELETE", f"{V1}/tokens/{{id}}", "token_revoke", args=("tenant",)),
    Route("GET", f"{V1}/tenants", "tenants"),
    Route("GET", f"{V1}/status", "status"),
    Route("GET", f"{V1}/openapi.json", "openapi", login=False),
    Route("GET", "/healthz", "healthz", login=False),
    Route("GET", "/metrics", "metrics", login=False),
)

# Sections of the API that live in modules of their own (the lifecycle:
# retention, holds, deletion requests, tags, GDPR, evidence).  Each
# mailtresor.access.<name> module has
#     ROUTES      a tuple of Route, as above
#     h_<handler> async functions (api: Api, c: Call) -> Answer
# and openapi-<name>.json beside this module holds its paths and schemas
# (merged into the one document /api/v1/openapi.json serves).  A section is
# one line here.
API_EXTENSIONS: tuple[str, ...] = ("gdpr", "retention", "tags", "holds", "maintenance")


@functools.cache
def extensions() -> tuple:
    return tuple(importlib.import_module(f"mailtresor.access.{name}") for name in API_EXTENSIONS)


@functools.cache
def all_routes() -> tuple[Route, ...]:
    return ROUTES + tuple(r for mod in extensions() for r in mod.ROUTES)


@functools.cache
def _compiled() -> list:
    return [(r, r.regex()) for r in all_routes()]


@functools.cache
def openapi_doc() -> dict:
    """openapi.json with every extension's openapi-<name>.json merged in
    (its "paths", and its "components" "schemas" / "parameters")."""
    doc = json.loads(OPENAPI_PATH.read_text())
    for name in API_EXTENSIONS:
        part = json.loads(OPENAPI_PATH.with_name(f"openapi-{name}.json").read_text())
        for path, item in part.get("paths", {}).items():
            if path in doc["paths"]:
                raise ValueError(f"openapi-{name}.json: path {path} is already described")
            doc["paths"][path] = item
        for kind, items in part.get("components", {}).items():
            have = doc.setdefault("components", {}).setdefault(kind, {})
            clash = set(have) & set(items)
            if clash:
                raise ValueError(f"openapi-{name}.json: components {kind} {sorted(clash)} already defined")
            have.update(items)
    return doc


def _handler(api: "Api", name: str):
    fn = getattr(api, "h_" + name, None)
    if fn is not None:
        return fn
    for mod in extensions():
        f = getattr(mod, "h_" + name, None)
        if f is not None:
            return functools.partial(f, api)
    raise LookupError(f"no handler h_{name}")


def match(method: str, path: str) -> tuple[Route, dict[str, str]]:
    """The route for a request; HttpError 404 (no such path) or 405 (with
    Allow) otherwise.  HEAD is answered as GET.  Pure."""
    found = [(r, m) for r, rx in _compiled() if (m := rx.match(path))]
    if not found:
        raise HttpError(404, "no such resource")
    want = "GET" if method == "HEAD" else method
    for r, m in found:
        if r.method == want:
            return r, m.groupdict()
    allow = sorted({r.method for r, _ in found} | ({"HEAD"} if any(r.method == "GET" for r, _ in found) else set()))
    raise HttpError(405, f"method {method} not allowed here (allowed: {', '.join(allow)})",
                    headers={b"Allow": ", ".join(allow).encode()})


def check_export(fmt, query, ids) -> None:
    """An export request's shape, before the core sees it (the API's JSON
    and the web UI's form): a format of EXPORT_FORMATS and either a query or
    1 to MAX_EXPORT_IDS message ids.  HttpError 400 naming the problem.  Pure."""
    if fmt not in EXPORT_FORMATS:
        raise HttpError(400, f"format must be one of {', '.join(EXPORT_FORMATS)}")
    if (query is None) == (ids is None):
        raise HttpError(400, "give either \"query\" or \"ids\"")
    if ids is not None:
        if not ids or len(ids) > MAX_EXPORT_IDS:
            raise HttpError(400, f"\"ids\" must hold 1 to {MAX_EXPORT_IDS} message ids")
        for i in ids:
            if not isinstance(i, str) or not _MESSAGE_ID.fullmatch(i):
                raise HttpError(400, f"{str(i)[:80]!r} is not a message id")


def principal_doc(p: Principal) -> dict:
    return {"kind": p.kind, "name": p.name, "tenant": p.tenant, "roles": sorted(p.roles),
            "scopes": sorted(p.scopes), "addresses": sorted(p.addresses)}


def _segment(value: str, rx: re.Pattern, what: str) -> str:
    if not rx.fullmatch(value):
        raise HttpError(404, f"no such {what}")
    return value


# --- answers -------------------------------------------------------------------

@dataclass
class Answer:
    status: int = 200
    doc: object = None                  # JSON, or
    body: bytes | None = None           # bytes of `content_type`
    content_type: bytes = JSON_TYPE
    headers: dict = dataclasses.field(default_factory=dict)
    file: Path | None = None            # served with Range by twisted.web.static.File


@dataclass
class Call:
    request: server.Request
    route: Route
    params: dict[str, str]
    args: dict[str, str]
    who: Principal | None
    client: str
    sid: str | None = None

    def body(self, *, required=(), optional=()) -> dict:
        ctype = header(self.request, b"content-type").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            # A browser's cross-site form cannot send application/json
            # without a CORS preflight, which this API never grants.
            raise HttpError(415, "send the body as Content-Type: application/json")
        self.request.content.seek(0)
        return parse_json_object(self.request.content.read(), required=required, optional=optional)


def header(request, name: bytes) -> str:
    """A request header as text ("" if absent)."""
    return (request.getHeader(name) or b"").decode("latin-1")


def _access_error(e: Exception) -> tuple[int, str] | None:
    """The core's AccessError (and our HttpError): an exception with an int
    4xx `status` and a str `reason`."""
    status, reason = getattr(e, "status", None), getattr(e, "reason", None)
    if isinstance(status, int) and 400 <= status < 500 and isinstance(reason, str):
        return status, reason
    return None


class Api:
    """The API's state: the core, logins, sessions, the daemon's facts.

    core      access.core.Core (None: the archive is not enabled; its routes answer 503)
    auth      access.auth.Authenticator; users/tokens its UserDB and TokenDB
    sessions  access.sessions.Sessions
    audit     access.audit.AuditLog (logins, logouts, administration)
    tenants   the configured tenant names
    directories  tenant -> config.Ldap or None (the directory settings page)
    status    () -> the daemon's status document (/api/v1/status)
    health    () -> (ready, reason) for /healthz
    facts     () -> the numbers /metrics shows (see access.metrics)
    lifecycle lifecycle.state.LifecycleDB (opened with users.db; None until then)
    archiver  archive.archiver.Archiver of the daemon (None in tests without
              one): writes to the store (deletions, tags) go through its
              exclusive(), on its thread, under its lock
    cfg       the daemon's configuration (None in tests without one)
    """

    def __init__(self, *, reactor, pool, core=None, auth=None, sessions=None, audit=None, users=None,
                 tokens=None, tenants=(), status=lambda: {}, health=lambda: (True, "ok"),
                 facts=lambda: {}, metrics_networks=("127.0.0.0/8", "::1/128"), clock=time.time,
                 openapi: bytes | None = None, web: bool = False, directories=None):
        import ipaddress

        from .metrics import Metrics

        self.reactor, self.pool = reactor, pool
        self.core, self.auth, self.sessions, self.audit = core, auth, sessions, audit
        self.users, self.tokens = users, tokens
        self.lifecycle = None
        self.archiver = None
        self.cfg = None
        self.tenant_names = tuple(tenants)
        # tenant -> its [tenant.ldap] (config.Ldap) or None: shown read-only.
        self.directories = dict(directories or {})
        self.status_doc, self.health = status, health
        self.metrics = Metrics(facts)
        self.metrics_networks = [ipaddress.ip_network(n, strict=False) for n in metrics_networks]
        self.clock = clock
        self.logins_unavailable = "logins are not available yet (the access key is being fetched)"
        self.openapi_bytes = openapi if openapi is not None else json.dumps(openapi_doc(), indent=1).encode()
        self.root = ApiResource(self)
        # A user's own password and second factor (/me/..., the web's /account).
        from .account import Account
        self.account = Account(self, clock)
        # The web UI: every path outside the API's (see ApiResource).
        self.web = None
        if web:
            from mailtresor.web import Web
            self.web = Web(self)

    # --- plumbing ---

    def run(self, fn, *args, **kw) -> defer.Deferred:
        """fn in the API's thread pool (the core's calls block)."""
        return threads.deferToThreadPool(self.reactor, self.pool, fn, *args, **kw)

    def site(self, *, timeout: float = 60.0, max_body: int = 1 << 20) -> server.Site:
        s = server.Site(self.root, timeout=timeout, reactor=self.reactor)
        s.requestFactory = LimitedRequest
        s.max_body = max_body
        s.displayTracebacks = False
        s.on_refused = lambda request, status: self.metrics.observe("(body limit)", status, 0.0)
        s.noisy = False
        # No access log: URIs hold search terms, which are kept only
        # encrypted (in the audit trail); errors name the route template.
        s.log = lambda request: None
        return s

    def factory(self, *, unix: bool = False, timeout: float = 60.0, max_body: int = 1 << 20,
                max_connections: int = 256, max_per_client: int = 32, allowed_uids=()) -> ConnectionGate:
        """The protocol factory to listen with: the Site behind the
        connection limits (TCP) or the peer check (the unix socket)."""
        return ConnectionGate(self.site(timeout=timeout, max_body=max_body), unix=unix,
                              max_connections=max_connections, max_per_client=max_per_client,
                              allowed_uids=allowed_uids, make_local=self.local_principal)

    @staticmethod
    def local_principal(uid: int, pid: int) -> Principal:
        return Principal(kind="local", name=f"uid={uid}", tenant=None, roles=frozenset(), client=f"unix:uid={uid},pid={pid}")

    @staticmethod
    def client_of(request) -> str:
        local = getattr(getattr(request.channel, "transport", None), "local", None)
        if local is not None:
            return local.client
        return getattr(request.getClientAddress(), "host", "") or "?"

    # --- one request ---

    def serve(self, request) -> None:
        t0 = time.monotonic()
        label = ["(no route)"]
        for k, v in SECURITY_HEADERS.items():
            request.setHeader(k, v)
        request.setHeader(b"server", b"mailtresor")      # not the Twisted version

        def finished(_):
            self.metrics.observe(label[0], request.code, time.monotonic() - t0)
        request.notifyFinish().addBoth(finished)
        d = defer.ensureDeferred(self._handle(request, label))
        d.addErrback(self._crashed, request)

    async def _handle(self, request, label) -> None:
        try:
            path = request.path.decode("latin-1")
            route, params = match(request.method.decode("latin-1"), path)
            label[0] = route.pattern
            client = self.client_of(request)
            # From the URL only (request.args would mix in a form body).
            _, _, qs = request.uri.partition(b"?")
            args = query_args(urllib.parse.parse_qs(qs, keep_blank_values=True), route.args)
            who, sid = await self._who(request, route, client)
            call = Call(request, route, params, args, who, client, sid)
            answer = await _handler(self, route.handler)(call)
        except HttpError as e:
            answer = Answer(e.status, {"error": e.reason, **e.extra}, headers=e.headers)
        except Exception as e:  # noqa: BLE001 - no traceback in any answer
            known = _access_error(e)
            if known is None:
                log.error("api: %s %s failed", request.method.decode("latin-1"), label[0], exc_info=True)
                answer = Answer(500, {"error": "internal error"})
            else:
                answer = Answer(known[0], {"error": known[1]})
        self._send(request, answer)

    def _crashed(self, failure, request) -> None:
        log.error("api: answering failed: %s", failure.getTraceback())
        if not request.finished and not request._disconnected:
            try:
                request.setResponseCode(500)
                request.setHeader(b"content-type", JSON_TYPE)
                request.write(json_bytes({"error": "internal error"}))
                request.finish()
            except Exception:  # noqa: BLE001
                pass

    def _send(self, request, a: Answer) -> None:
        if request._disconnected or request.finished:
            return
        request.setResponseCode(a.status)
        for k, v in a.headers.items():
            request.setHeader(k, v)
        if a.file is not None:
            request.setHeader(b"content-type", a.content_type)
            f = static.File(str(a.file), defaultType=a.content_type.decode())
            f.type, f.encoding = a.content_type.decode(), None
            out = f.render(request)
            if out is not server.NOT_DONE_YET:
                request.write(out)
                request.finish()
            return
        body = a.body if a.body is not None else (json_bytes(a.doc) if a.doc is not None else b"")
        request.setHeader(b"content-type", a.content_type)
        request.setHeader(b"content-length", str(len(body)).encode())
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    async def _who(self, request, route: Route, client: str) -> tuple[Principal | None, str | None]:
        """Who asks: the unix socket's peer, a Bearer token, or a session
        cookie (with its CSRF token on a state-changing request)."""
        local = getattr(getattr(request.channel, "transport", None), "local", None)
        if local is not None:
            return local, None
        if not route.login:
            return None, None       # login, openapi.json, healthz: credentials play no part
        authz = header(request, b"authorization")
        if authz:
            scheme, _, secret = authz.strip().partition(" ")
            if scheme.lower() != "bearer" or not secret.strip():
                raise HttpError(401, "the Authorization header must be 'Bearer <token>'",
                                headers={b"WWW-Authenticate": b'Bearer realm="mailtresor"'})
            from .auth import LoginFailed
            try:
                who = await self.run(self._need_auth().token, secret.strip(), client)
            except LoginFailed:
                raise HttpError(401, "unknown, expired or revoked token",
                                headers={b"WWW-Authenticate": b'Bearer realm="mailtresor", error="invalid_token"'}) \
                    from None
            return who, None
        cookie = request.getCookie(COOKIE)
        if cookie:
            sid = cookie.decode("ascii", "replace")
            got = self.sessions.get(sid) if self.sessions is not None else None
            if got is not None:
                who, csrf = got
                if self.auth is not None and not self.auth.still_valid(who):
                    # Disabled, removed, or its roles or addresses changed
                    # (perhaps by `mailtresor user` in another process).
                    self.sessions.drop(sid)
                    raise HttpError(401, "the session has ended (the account changed); log in again")
                if request.method in STATE_CHANGING:
                    sent = request.getHeader(CSRF_HEADER) or b""
                    if not secrets.compare_digest(sent, csrf.encode()):
                        raise HttpError(403, "missing or wrong CSRF token: send the login's \"csrf\" "
                                        "in the X-CSRF-Token header")
                return dataclasses.replace(who, client=client), sid
            raise HttpError(401, "the session has expired or ended; log in again")
        raise HttpError(401, "not logged in (log in at /api/v1/login, or send a Bearer token)")

    def _need_auth(self):
        if self.auth is None:
            raise HttpError(503, self.logins_unavailable)
        return self.auth

    def _need_core(self):
        if self.core is None:
            raise HttpError(503, "the archive is not enabled on this appliance")
        return self.core

    def _deny(self, who: Principal, tenant, action: str, obj, reason: str):
        """A refusal made here (not by the core): audited, then 403."""
        if self.audit is not None:
            self.audit.append(principal=who, tenant=tenant, action=action, object=obj, result="denied",
                              client=who.client, detail={"reason": reason})
        raise HttpError(403, reason)

    # --- logins ---

    async def h_login(self, c: Call) -> Answer:
        from .auth import LoginFailed
        from .sessions import Throttled

        doc = c.body(required=("username", "password"), optional=("tenant", "totp"))
        tenant = member(doc, "tenant", str)
        username = member(doc, "username", str)
        password = member(doc, "password", str)
        totp = member(doc, "totp", str)
        who, _sid, csrf = await self.login_session(c.request, tenant=tenant, username=username,
                                                   password=password, totp=totp, client=c.client)
        return Answer(200, {"principal": principal_doc(who), "csrf": csrf})

    async def login_session(self, request, *, tenant, username, password, totp, client):
        """A login that makes a session (cookie set on `request`): the API's
        and the web UI's one way in (throttling, audit).  (principal, sid,
        csrf); HttpError 401 (totp_required in .extra), 429 or 503."""
        from .auth import LoginFailed
        from .sessions import Throttled
        # An unknown tenant fails like a wrong password, in the same time
        # (the Authenticator sees to it): no tenant enumeration.
        try:
            who = await self.run(self._need_auth().login, tenant=tenant, username=username, password=password,
                                 totp=totp, client=client)
        except Throttled as e:
            await self.run(self._audit_login, None, tenant, username, client, "denied", "throttled")
            wait = max(1, math.ceil(e.retry_after))
            raise HttpError(429, f"too many failed logins; try again in {wait} s",
                            headers={b"Retry-After": str(wait).encode()}) from None
        except LoginFailed as e:
            await self.run(self._audit_login, None, tenant, username, client, "failed", None)
            extra = {"totp_required": True} if e.needs_totp else {}
            raise HttpError(401, e.reason, **extra) from None
        sid, csrf = self.sessions.create(who)
        request.addCookie(COOKIE, sid.encode(), path=COOKIE_PATH, secure=True, httpOnly=True,
                          sameSite="strict")
        await self.run(self._audit_login, who, who.tenant, who.name, client, "ok", None)
        return who, sid, csrf

    def _audit_login(self, who, tenant, username, client, result, why) -> None:
        if self.audit is None:
            return
        tenant = tenant if tenant in self.tenant_names else None
        name = who if who is not None else f"user:{str(username)[:128]}" + (f"@{tenant}" if tenant else "")
        self.audit.append(principal=name, tenant=tenant, action="login" if result == "ok" else "login-failed",
                          object=None, result="ok" if result == "ok" else result, client=client,
                          detail={"reason": why} if why else None)

    async def h_logout(self, c: Call) -> Answer:
        if c.sid is None:
            raise HttpError(400, "logout ends a browser session; this request has none")
        await self.end_session(c.request, c.who, c.sid)
        return Answer(200, {"logged_out": True})

    async def end_session(self, request, who: Principal, sid: str) -> None:
        """Logout, for the API and the web UI: the session dropped, the cookie cleared, audited."""
        self.sessions.drop(sid)
        request.addCookie(COOKIE, b"", path=COOKIE_PATH, secure=True, httpOnly=True, sameSite="strict",
                          max_age=b"0")
        if self.audit is not None:
            await self.run(self.audit.append, principal=who, tenant=who.tenant, action="logout",
                           object=None, result="ok", client=who.client)

    async def h_me(self, c: Call) -> Answer:
        return Answer(200, {"principal": principal_doc(c.who)})

    # --- one's own account (access/account.py; the web's /account too) ---

    async def _me(self, fn, *args):
        from .account import Refused
        try:
            return await self.run(fn, *args)
        except Refused as e:
            raise HttpError(e.status, e.reason, headers=e.headers) from None

    async def h_me_password(self, c: Call) -> Answer:
        doc = c.body(required=("current", "new"))
        await self._me(self.account.change_password, c.who, c.sid, member(doc, "current", str),
                       member(doc, "new", str))
        return Answer(200, {"changed": True})

    async def h_me_totp_begin(self, c: Call) -> Answer:
        doc = c.body(required=("password",), optional=("code",))
        cand = await self._me(self.account.totp_begin, c.who, c.sid, member(doc, "password", str),
                              member(doc, "code", str))
        return Answer(200, {"secret": cand.secret, "uri": cand.uri,
                            "expires_in": max(0, math.floor(cand.expires - self.clock()))})

    async def h_me_totp_confirm(self, c: Call) -> Answer:
        doc = c.body(required=("code",))
        codes = await self._me(self.account.totp_confirm, c.who, c.sid, member(doc, "code", str))
        return Answer(200, {"recovery_codes": codes})

    async def h_me_recovery_codes(self, c: Call) -> Answer:
        doc = c.body(required=("password", "code"))
        codes = await self._me(self.account.new_recovery_codes, c.who, c.sid, member(doc, "password", str),
                               member(doc, "code", str))
        return Answer(200, {"recovery_codes": codes})

    async def h_me_totp_off(self, c: Call) -> Answer:
        doc = c.body(required=("password", "code"))
        await self._me(self.account.totp_off, c.who, c.sid, member(doc, "password", str), member(doc, "code", str))
        return Answer(200, {"totp": False})

    # --- the archive (the core checks and audits) ---

    async def h_search(self, c: Call) -> Answer:
        a = c.args
        limit = int_arg(a, "limit", 50, 1, MAX_PAGE)
        order = a.get("order", "date-desc")
        if order not in ORDERS:
            raise HttpError(400, f"order must be one of {', '.join(ORDERS)}")
        doc = await self.run(self._need_core().search, c.who, tenant=a.get("tenant"), query=a.get("q", ""),
                             cursor=a.get("cursor") or None, limit=limit, order=order,
                             facets=bool_arg(a, "facets"))
        return Answer(200, doc)

    def _aid(self, c: Call) -> str:
        return _segment(c.params["id"], _MESSAGE_ID, "message")

    async def h_message(self, c: Call) -> Answer:
        aid = self._aid(c)
        return Answer(200, await self.run(self._need_core().message, c.who, aid, tenant=c.args.get("tenant")))

    async def h_raw(self, c: Call) -> Answer:
        aid = self._aid(c)
        data = await self.run(self._need_core().raw, c.who, aid, tenant=c.args.get("tenant"))
        return Answer(200, body=data, content_type=b"message/rfc822",
                      headers={b"Content-Disposition": content_disposition(f"{aid}.eml", "message.eml")})

    async def h_text(self, c: Call) -> Answer:
        aid = self._aid(c)
        text = await self.run(self._need_core().text, c.who, aid, tenant=c.args.get("tenant"))
        return Answer(200, body=text.encode("utf-8"), content_type=b"text/plain; charset=utf-8")

    async def h_html(self, c: Call) -> Answer:
        aid = self._aid(c)
        html = await self.run(self._need_core().html, c.who, aid, tenant=c.args.get("tenant"))
        return Answer(200, body=html.encode("utf-8"), content_type=b"text/html; charset=utf-8",
                      headers={b"Content-Security-Policy": HTML_CSP})

    async def h_attachment(self, c: Call) -> Answer:
        aid = self._aid(c)
        n = int(_segment(c.params["n"], _ATTACHMENT, "attachment"))
        name, ctype, data = await self.run(self._need_core().attachment, c.who, aid, n,
                                           tenant=c.args.get("tenant"))
        return Answer(200, body=data, content_type=download_type(ctype),
                      headers={b"Content-Disposition": content_disposition(name, f"attachment-{n}")})

    async def h_export_start(self, c: Call) -> Answer:
        doc = c.body(required=("format",), optional=("query", "ids", "tenant"))
        fmt = member(doc, "format", str)
        query, ids = member(doc, "query", str), member(doc, "ids", list)
        check_export(fmt, query, ids)
        job = await self.run(self._need_core().export_start, c.who, tenant=member(doc, "tenant", str),
                             query=query, ids=ids, format=fmt)
        return Answer(202, job, headers={b"Location": f"{V1}/exports/{job['id']}".encode()})

    async def h_export_list(self, c: Call) -> Answer:
        return Answer(200, await self.run(self._need_core().export_list, c.who))

    async def h_export_status(self, c: Call) -> Answer:
        job_id = _segment(c.params["id"], _JOB_ID, "export")
        return Answer(200, await self.run(self._need_core().export_status, c.who, job_id))

    async def h_export_download(self, c: Call) -> Answer:
        job_id = _segment(c.params["id"], _JOB_ID, "export")
        path = Path(await self.run(self._need_core().export_path, c.who, job_id))
        ctype = b"application/zip" if path.suffix == ".zip" else b"application/mbox"
        return Answer(200, file=path, content_type=ctype,
                      headers={b"Content-Disposition": content_disposition(f"export-{job_id}{path.suffix}",
                                                                           "export")})

    async def h_audit(self, c: Call) -> Answer:
        a = c.args
        # The filters are checked by the core (a 400 naming the problem).
        doc = await self.run(self._need_core().audit_records, c.who, tenant=a.get("tenant"),
                             since=int_arg(a, "since", 0, 0, 2**62),
                             limit=int_arg(a, "limit", 100, 1, MAX_AUDIT_PAGE),
                             **{k: a[k] for k in ("principal", "action", "result", "after", "before") if a.get(k)})
        return Answer(200, doc)

    async def h_events(self, c: Call) -> Answer:
        a = c.args
        doc = await self.run(self._need_core().events, c.who, tenant=a.get("tenant"),
                             since=int_arg(a, "since", 0, 0, 2**62),
                             limit=int_arg(a, "limit", 100, 1, MAX_AUDIT_PAGE))
        return Answer(200, doc)

    # --- administration (checked and audited here: the core reads mail) ---

    def _manage_tenant(self, who: Principal, asked, verb: str, action_obj: str) -> str | None:
        """The tenant an administrative call is about, checked.  Another
        tenant's is 404 (no existence leak), a missing right 403."""
        self._need_auth()                   # users.db and tokens.db
        if asked is not None and asked not in self.tenant_names:
            raise HttpError(404, "no such tenant")
        if not who.can(verb):
            self._deny(who, who.tenant if who.tenant is not None else asked, "admin", action_obj,
                       f"{verb.replace('-', ' ')} needs the admin role")
        if who.tenant is not None:
            if asked is not None and asked != who.tenant:
                raise HttpError(404, "no such tenant")
            return who.tenant
        return asked                        # appliance administrator / local: any tenant, or none

    def _admin_audit(self, who, tenant, obj, op, result="ok") -> None:
        if self.audit is not None:
            self.audit.append(principal=who, tenant=tenant, action="admin", object=obj, result=result,
                              client=who.client, detail={"op": op})

    # Each user/token operation is one method that checks (the tenant and the
    # role via _manage_tenant), validates, changes and writes the audit
    # record; the API's handlers and the web UI's pages (mailtresor.web.admin)
    # both call it, so the two cannot drift apart.  They block (UserDB,
    # argon2): call them in the pool (Api.run).  Errors are HttpError.

    def users_list(self, who: Principal, tenant: str | None) -> list[dict]:
        """The local users of `tenant` (public fields only)."""
        tenant = self._manage_tenant(who, tenant, "manage-users", "users")
        return [u.public() for u in self.users.list(tenant)]

    def user_add(self, who: Principal, tenant: str | None, name, password, roles, addresses=()) -> dict:
        """Add a local user; HttpError 400 (bad name, weak password, unknown
        role...), 409 (exists), 403/404 (not yours)."""
        from .users import UserError
        tenant = self._manage_tenant(who, tenant, "manage-users", f"user:{name}")
        if "appliance-admin" in roles and who.tenant is not None:
            self._deny(who, tenant, "admin", f"user:{name}",
                       "only the appliance administrator creates appliance administrators")
        try:
            if self.users.get(tenant, name) is not None:
                raise HttpError(409, f"user {name!r} exists already")
            user = self.users.add(tenant, name, password, roles, addresses)
        except UserError as e:
            raise HttpError(400, str(e)) from None
        self._admin_audit(who, tenant, f"user:{name}", "add")
        return user.public()

    def _known_user(self, who: Principal, tenant, name: str):
        _segment(name, _USER_NAME, "user")
        tenant = self._manage_tenant(who, tenant, "manage-users", f"user:{name}")
        if self.users.get(tenant, name) is None:
            raise HttpError(404, "no such user")
        return tenant

    @staticmethod
    def _is_self(who: Principal, tenant, name: str) -> bool:
        return who.kind == "user" and who.tenant == tenant and who.name == name

    def user_change(self, who: Principal, tenant: str | None, name: str, op: str,
                    password: str | None = None) -> dict:
        """op "disable", "enable" or "password" (with `password`); a disabled
        user or one with a new password loses their sessions."""
        from .users import UserError
        if op not in ("disable", "enable", "password"):
            raise ValueError(op)
        tenant = self._known_user(who, tenant, name)
        if op == "disable" and self._is_self(who, tenant, name):
            # Nobody locks themselves out (a tenant's last admin would be gone).
            raise HttpError(400, "you cannot disable your own account")
        try:
            if op == "disable":
                self.users.disable(tenant, name)
            elif op == "enable":
                self.users.enable(tenant, name)
            else:
                self.users.passwd(tenant, name, password)
        except UserError as e:
            raise HttpError(400, str(e)) from None
        if op != "enable" and self.sessions is not None:
            self.sessions.drop_user(tenant, name)      # a disabled user or an old password: out
        self._admin_audit(who, tenant, f"user:{name}", op)
        return self.users.get(tenant, name).public()

    def user_update(self, who: Principal, tenant: str | None, name: str, *, roles=None, addresses=None) -> dict:
        """New roles and/or addresses for a local user (their sessions end:
        still_valid compares them)."""
        from .users import UserError
        tenant = self._known_user(who, tenant, name)
        if roles is None and addresses is None:
            raise HttpError(400, "give \"roles\" or \"addresses\"")
        if roles is not None:
            if "appliance-admin" in roles and who.tenant is not None:
                self._deny(who, tenant, "admin", f"user:{name}",
                           "only the appliance administrator creates appliance administrators")
            if self._is_self(who, tenant, name) and not set(roles) & {"admin", "appliance-admin"}:
                raise HttpError(400, "you cannot take the admin role from your own account")
        try:
            user = self.users.update(tenant, name, roles=roles, addresses=addresses)
        except UserError as e:
            raise HttpError(400, str(e)) from None
        self._admin_audit(who, tenant, f"user:{name}", "update")
        return user.public()

    def tokens_list(self, who: Principal, tenant: str | None) -> list[dict]:
        """The tokens of `tenant` (every tenant's for the appliance
        administrator without one); never a secret or its hash."""
        tenant = self._manage_tenant(who, tenant, "manage-tokens", "tokens")
        return [t.public() for t in (self.tokens.list(tenant) if tenant is not None else self.tokens.list())]

    def token_issue(self, who: Principal, tenant: str | None, name, scopes, expires_in: int | None = None) -> dict:
        """A new token: its public fields and, under "token", the secret -
        returned here once, never stored, logged or audited."""
        from .tokens import TokenError
        tenant = self._manage_tenant(who, tenant, "manage-tokens", f"token:{name}")
        if tenant is None:
            raise HttpError(400, "a token belongs to a tenant: give \"tenant\"")
        expires = self.clock() + expires_in if expires_in else None
        try:
            tid, secret = self.tokens.issue(tenant, name, scopes, expires)
        except TokenError as e:
            raise HttpError(400, str(e)) from None
        self._admin_audit(who, tenant, f"token:{tid}", "issue")
        pub = next(t.public() for t in self.tokens.list(tenant) if t.id == tid)
        return {**pub, "token": secret}

    def token_revoke(self, who: Principal, tenant: str | None, tid: str) -> dict:
        from .tokens import TokenError
        _segment(tid, _TOKEN_ID, "token")
        tenant = self._manage_tenant(who, tenant, "manage-tokens", f"token:{tid}")
        try:
            if tenant is None:
                self.tokens.revoke(tid)
            else:
                self.tokens.revoke(tid, tenant)
        except TokenError:
            raise HttpError(404, "no such token") from None
        self._admin_audit(who, tenant, f"token:{tid}", "revoke")
        return {"revoked": tid}

    def directory_settings(self, who: Principal, tenant: str | None) -> dict | None:
        """The tenant's [tenant.ldap] as the configuration has it, for
        reading (None: the tenant has no directory).  The bind password is
        never read: only whether a file for it is configured."""
        tenant = self._manage_tenant(who, tenant, "manage-users", "directory")
        ld = self.directories.get(tenant) if tenant is not None else None
        if ld is None:
            return None
        return {"url": ld.url, "base": ld.base, "filter": ld.filter, "start_tls": ld.start_tls,
                "ca_file": str(ld.ca_file) if ld.ca_file else None, "bind_dn": ld.bind_dn or None,
                "bind_password_set": ld.bind_password_file is not None,
                "address_attributes": list(ld.address_attributes), "group_base": ld.group_base or ld.base,
                "roles": dict(ld.roles), "default_roles": list(ld.default_roles), "timeout": ld.timeout}

    def status_for(self, who: Principal) -> dict:
        """The daemon's status document, for the appliance administrator
        (and the unix socket); 403, audited, for anyone else."""
        self._appliance_only(who, "status")
        return self.status_doc()

    async def h_users(self, c: Call) -> Answer:
        return Answer(200, {"users": await self.run(self.users_list, c.who, c.args.get("tenant"))})

    async def h_user_add(self, c: Call) -> Answer:
        doc = c.body(required=("name", "password", "roles"), optional=("addresses", "tenant"))
        name, password = member(doc, "name", str), member(doc, "password", str)
        roles, addresses = member(doc, "roles", list), member(doc, "addresses", list, default=[]) or []
        return Answer(201, await self.run(self.user_add, c.who, member(doc, "tenant", str), name, password,
                                          roles, addresses))

    def _user_name(self, c: Call) -> str:
        return _segment(urllib.parse.unquote(c.params["name"]), _USER_NAME, "user")

    async def h_user_disable(self, c: Call) -> Answer:
        return Answer(200, await self.run(self.user_change, c.who, c.args.get("tenant"), self._user_name(c),
                                          "disable"))

    async def h_user_enable(self, c: Call) -> Answer:
        return Answer(200, await self.run(self.user_change, c.who, c.args.get("tenant"), self._user_name(c),
                                          "enable"))

    async def h_user_password(self, c: Call) -> Answer:
        name = self._user_name(c)
        doc = c.body(required=("password",))
        return Answer(200, await self.run(self.user_change, c.who, c.args.get("tenant"), name, "password",
                                          member(doc, "password", str)))

    async def h_user_update(self, c: Call) -> Answer:
        name = self._user_name(c)
        doc = c.body(optional=("roles", "addresses"))
        return Answer(200, await self.run(self.user_update, c.who, c.args.get("tenant"), name,
                                          roles=member(doc, "roles", list), addresses=member(doc, "addresses", list)))

    async def h_tokens(self, c: Call) -> Answer:
        return Answer(200, {"tokens": await self.run(self.tokens_list, c.who, c.args.get("tenant"))})

    async def h_token_issue(self, c: Call) -> Answer:
        doc = c.body(required=("name", "scopes"), optional=("tenant", "expires_in"))
        return Answer(201, await self.run(self.token_issue, c.who, member(doc, "tenant", str),
                                          member(doc, "name", str), member(doc, "scopes", list),
                                          member(doc, "expires_in", int)))

    async def h_token_revoke(self, c: Call) -> Answer:
        tid = _segment(c.params["id"], _TOKEN_ID, "token")
        return Answer(200, await self.run(self.token_revoke, c.who, c.args.get("tenant"), tid))

    # --- the appliance ---

    def _appliance_only(self, who: Principal, what: str) -> None:
        if who.kind != "local" and "appliance-admin" not in who.roles:
            self._deny(who, who.tenant, "admin", what, f"{what} is for the appliance administrator only")

    async def h_tenants(self, c: Call) -> Answer:
        await self.run(self._appliance_only, c.who, "tenants")
        return Answer(200, {"tenants": list(self.tenant_names)})

    async def h_status(self, c: Call) -> Answer:
        return Answer(200, await self.run(self.status_for, c.who))

    async def h_openapi(self, c: Call) -> Answer:
        return Answer(200, body=self.openapi_bytes, content_type=JSON_TYPE)

    async def h_healthz(self, c: Call) -> Answer:
        ok, reason = await self.run(self.health)     # may list the spool: off the reactor
        if not ok:
            return Answer(503, {"error": reason})
        return Answer(200, body=b"ok\n", content_type=b"text/plain; charset=utf-8")

    async def h_metrics(self, c: Call) -> Answer:
        """Open to the configured networks (a Prometheus scraper has no
        login) and the unix socket; else to the appliance administrator."""
        if not self._metrics_network(c):
            who, _ = await self._who(c.request, dataclasses.replace(c.route, login=True), c.client)
            await self.run(self._appliance_only, who, "metrics")
        from .metrics import CONTENT_TYPE
        # The facts list the spool's oldest entry: off the reactor.
        return Answer(200, body=await self.run(self.metrics.render), content_type=CONTENT_TYPE.encode())

    def _metrics_network(self, c: Call) -> bool:
        import ipaddress
        if getattr(getattr(c.request.channel, "transport", None), "local", None) is not None:
            return True
        try:
            addr = ipaddress.ip_address(c.client)
        except ValueError:
            return False
        return any(addr in n for n in self.metrics_networks)


class ApiResource(resource.Resource):
    """The one Resource: every path goes through Api.serve (route table,
    404/405, login, errors) so that no path escapes the security headers
    and the error format."""

    isLeaf = True

    def __init__(self, api: Api):
        super().__init__()
        self.api = api

    API_PREFIXES = (b"/api/", b"/healthz", b"/metrics")

    def render(self, request):
        web = self.api.web
        if web is not None and not request.path.startswith(self.API_PREFIXES) and request.path != b"/api":
            web.serve(request)
        else:
            self.api.serve(request)
        return server.NOT_DONE_YET


# --- in the daemon ---------------------------------------------------------------

class ApiServer:
    """The API as the daemon runs it: the thread pool, the core over the
    archiver's store, logins, and the two listeners ([api] listen, TLS only;
    RUNTIME_DIRECTORY/api.sock for root and the daemon's user).

    `daemon` is the mailtresor.service.Daemon; what is read of it: cfg,
    archiver (store, store_lock, keys), trail (the audit log), and the
    status_doc / health / facts methods."""

    SOCKET_NAME = "api.sock"

    def __init__(self, cfg, reactor, daemon):
        from twisted.python.threadpool import ThreadPool

        from .sessions import Sessions

        self.cfg, self.reactor, self.daemon = cfg, reactor, daemon
        a = cfg.api
        self.pool = ThreadPool(1, a.threads, name="api")
        self.path = Path(cfg.appliance.runtime_directory) / self.SOCKET_NAME
        self.ports = []
        core = None
        archiver = daemon.archiver
        audit = daemon.trail.log if daemon.trail is not None else None
        if archiver is not None and audit is not None:
            from mailtresor import assemble
            # One Store in the process (LMDB allows an environment to be
            # open once per process): the core reads the archiver's, under
            # the archiver's lock.
            core = assemble.build_core(cfg, archiver.store, archiver.keys, audit,
                                       store_lock=archiver.store_lock)
        self.api = Api(reactor=reactor, pool=self.pool, core=core, audit=audit,
                       sessions=Sessions(idle=cfg.access.session_idle, absolute=cfg.access.session_absolute),
                       tenants=[t.name for t in cfg.tenant], status=self.status_doc, health=daemon.health,
                       facts=daemon.metrics_facts, metrics_networks=a.metrics_networks, web=True,
                       directories={t.name: t.ldap for t in cfg.tenant})
        self.api.archiver, self.api.cfg = archiver, cfg
        # The daily lifecycle job (retention, then compaction): here, where
        # lifecycle.db, the archiver and the audit trail meet.
        self.job = None
        if archiver is not None and cfg.lifecycle.enabled:
            from mailtresor.lifecycle.job import DailyJob
            self.job = DailyJob(self.api, cfg.lifecycle, reactor)

    def start(self) -> defer.Deferred:
        import os

        from twisted.internet import endpoints

        from mailtresor import config as configmod

        a = self.cfg.api
        self.pool.start()
        self.run_logins()
        if self.job is not None:
            self.job.start()

        def listening(port_, what):
            self.ports.append(port_)
            log.info("api listening on %s", what)
            return port_
        kw = dict(timeout=a.timeout, max_body=a.max_body)
        cert = a.cert_file or (self.cfg.tls.cert_file if self.cfg.tls is not None else None)
        key = a.key_file or (self.cfg.tls.key_file if self.cfg.tls is not None else None)
        if cert is None:
            log.warning("api: no certificate (api.cert_file or [tls]): HTTPS is off, only %s answers", self.path)
            d1 = defer.succeed(None)
        elif "api" in getattr(self.daemon, "sockets", {}):
            # A socket from mailtresor-api.socket: TLS added here, as for ssl:.
            from twisted.protocols.tls import TLSMemoryBIOFactory
            factory = TLSMemoryBIOFactory(_tls_context(cert, key), False,
                                          self.api.factory(max_connections=a.max_connections,
                                                           max_per_client=a.max_connections_per_client, **kw))
            d1 = self.daemon._adopt(self.daemon.sockets["api"], factory)
            d1.addCallback(listening, f"{a.listen} (HTTPS)")
        else:
            port, interface = configmod.api_listen(a.listen)
            tcp = endpoints.SSL4ServerEndpoint(self.reactor, port, _tls_context(cert, key), interface=interface)
            d1 = tcp.listen(self.api.factory(max_connections=a.max_connections,
                                             max_per_client=a.max_connections_per_client, **kw))
            d1.addCallback(listening, f"https://{interface or '*'}:{port}/api/v1/")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        unix = endpoints.UNIXServerEndpoint(self.reactor, str(self.path), mode=0o660, wantPID=True)
        d2 = unix.listen(self.api.factory(unix=True, allowed_uids={0, os.geteuid()}, **kw))

        d2.addCallback(listening, str(self.path))
        d2.addErrback(lambda f: log.warning("api socket %s: cannot listen (%s)", self.path, f.getErrorMessage()))
        return d1

    def run_logins(self, delay: float = 1.0) -> None:
        """users.db and tokens.db need the control key "access": fetched
        in a pool thread, again with backoff while it cannot be had (the
        control endpoint not up yet); until then logins and tokens answer
        503 and say why."""
        from .auth import Authenticator, open_databases

        self._retry = None

        def opened(dbs):
            users, tokens, lifecycle = dbs
            self.api.users, self.api.tokens = users, tokens
            self.api.lifecycle = lifecycle
            if self.api.core is not None:
                self.api.core.lifecycle = lifecycle     # hold:NAME, a message's holds
            self.api.auth = Authenticator(self.cfg, users, tokens)
            # A user disabled, removed or given a new password in this
            # process loses its sessions at once; a change made by the
            # command in another process is caught per request (still_valid).
            users.on_change(lambda tenant, name, _change: self.api.sessions.drop_user(tenant, name))
            log.info("api: logins and tokens available")

        def failed(f):
            why = f.getErrorMessage()
            if why != getattr(self, "_login_problem", None):
                log.warning("api: logins are not available: %s; trying again", why)
            self._login_problem = why
            # The client is told that, not why (the log says): no internal
            # addresses in an answer to anyone who asks.
            self.api.logins_unavailable = "logins are not available yet (the access key cannot be had); " \
                "the appliance's log says why"
            if self.pool.started and not self.pool.joined:
                self._retry = self.reactor.callLater(delay, self.run_logins, min(delay * 2, 60.0))

        # The daemon's one client to the control endpoint, its blocking face (in the pool).
        def open_all(cfg, fetch):
            from mailtresor.lifecycle.state import open_for
            return (*open_databases(cfg, fetch), open_for(cfg, fetch))
        self.api.run(open_all, self.cfg, self.daemon.control.fetch_blocking).addCallbacks(opened, failed)

    def stop(self) -> defer.Deferred:
        """Stop listening (first, at shutdown); requests under way finish
        in the pool, which then stops."""
        ports, self.ports = self.ports, []
        if getattr(self, "_retry", None) is not None and self._retry.active():
            self._retry.cancel()
        waits = [defer.maybeDeferred(p.stopListening) for p in ports]
        if self.job is not None:
            waits.append(self.job.stop())       # a run under way ends with its batch
        d = defer.gatherResults(waits, consumeErrors=True)

        def done(_):
            # ThreadPool.stop() joins its threads: off the reactor's thread,
            # so a long search delays the shutdown (bounded by the daemon's
            # shutdown_timeout) but never the reactor.
            return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.pool.stop)
        return d.addBoth(done)

    def status_doc(self) -> dict:
        """GET /api/v1/status (and the web's status page): the daemon's
        status document plus its shards' figures, read from the archiver's
        Store under its lock (as `mailtresor status` reads them from disk)."""
        doc = self.daemon.status_doc()
        archiver = self.daemon.archiver
        if archiver is not None:
            from mailtresor.cli.status import shard_figures
            try:
                with archiver.store_lock:
                    doc["shards"] = shard_figures(archiver.store)
            except Exception as e:  # noqa: BLE001 - the rest of the status still answers
                log.warning("status: cannot read the shards: %s", e)
        return doc

    def status(self) -> dict:
        return {"listen": self.cfg.api.listen, "socket": str(self.path), "listening": len(self.ports),
                "logins": self.api.auth is not None}


def _tls_context(cert_file, key_file):
    """The API's TLS: 1.2 or later, forward-secret AEAD ciphers, the appliance's certificate."""
    from OpenSSL import SSL

    class Context:
        def __init__(self):
            ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
            ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
            ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
            ctx.set_cipher_list(b"ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!MD5:!DSS")
            ctx.use_certificate_chain_file(str(cert_file))
            ctx.use_privatekey_file(str(key_file))
            ctx.check_privatekey()
            self._ctx = ctx

        def getContext(self):
            return self._ctx
    return Context()
