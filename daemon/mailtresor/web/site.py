"""Routes, sessions and rendering of the web UI (see __init__)."""

from __future__ import annotations

import gettext
import importlib
import logging
import re
import secrets
import time
import urllib.parse
from pathlib import Path

import jinja2
from markupsafe import escape
from twisted.internet import defer

from mailtresor.access.http import HTML_CSP, SECURITY_HEADERS, HttpError

from . import i18n
from .i18n import N_

log = logging.getLogger("mailtresor.web")

HERE = Path(__file__).parent
STATIC = HERE / "static"
LOGIN_COOKIE = b"mt_login"          # the login form's double-submit CSRF token
PENDING_TTL = 300.0                 # seconds a password-checked login waits for its TOTP code
MAX_PENDING = 1000                  # such logins held at once (the oldest is forgotten first)

# Pages: only the appliance's own scripts, styles and images; frames only
# of the appliance's own (sanitised, sandboxed) message rendering.
CSP = (b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       b"frame-src 'self'; form-action 'self'; base-uri 'none'; object-src 'none'; frame-ancestors 'none'")
# The message's HTML, inside the page's iframe: the API's policy, framed by us only.
FRAME_CSP = HTML_CSP + b"; frame-ancestors 'self'"

# The modules that hold the pages.  Each has ROUTES: a sequence of
# (methods, path regex, handler), methods space-separated ("GET POST"), the
# regex matched against the whole path with named groups passed on as
# keywords: `async def handler(web, request, who, csrf, **groups)`.  Every
# route needs a live session (else: GET to the login and back, others 401);
# the handler checks roles through the core or the API and CSRF on POST
# (web.check_csrf).  /static/, /login and /logout are this module's own.
PAGE_MODULES = ("reading", "exports", "audit", "admin", "account", "gdpr", "retention", "tags", "holds")

STATIC_TYPES = {".css": b"text/css; charset=utf-8", ".js": b"text/javascript; charset=utf-8",
                ".svg": b"image/svg+xml"}
_STATIC_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\.(css|js|svg)\Z")


def safe_next(value: str | None, default: str = "/search") -> str:
    """Where to go after login: a path of this site only (no //host, no scheme)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value \
            or value.startswith("/api/") or any(ord(ch) < 0x20 for ch in value):
        return default
    return value


def landing(who) -> str:
    """The first section WHO can use: the search for anyone who reads mail
    (users, auditors), the administration for an admin who reads none, else
    the account page."""
    if who.can("read-own") or who.can("read-tenant"):
        return "/search"
    if who.can("manage-users") or who.can("manage-tokens"):
        return "/admin"
    if who.can("audit-read"):
        return "/audit"
    return "/account"


def human_size(n) -> str:
    n = int(n or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


_ENGLISH = gettext.NullTranslations()


def _translations(ctx):
    """The translations of the page being rendered: the render's own
    (Web.page puts them in its context), never shared state."""
    return ctx.get("mt_translations") or _ENGLISH


# The template functions look the render's translations up in its context,
# so one Environment serves every language and concurrent renders do not
# meet.  What they return is escaped: a msgid is text, not HTML, and a
# `_(variable)` that is not one of our constants cannot inject markup.
@jinja2.pass_context
def _gettext(ctx, message, **variables):
    """`_()` and `gettext()` in a template (jinja2's newstyle, but a string
    without values is only unescaped, '%%' -> '%', never formatted: a '%'
    in text that is not ours cannot break the page)."""
    rv = escape(_translations(ctx).gettext(message))
    return rv % variables if variables else rv.replace("%%", "%")


@jinja2.pass_context
def _ngettext(ctx, singular, plural, n):
    return escape(_translations(ctx).ngettext(singular, plural, n))


@jinja2.pass_context
def _pgettext(ctx, context, message, **variables):
    rv = escape(_translations(ctx).pgettext(context, message))
    return rv % variables if variables else rv.replace("%%", "%")


@jinja2.pass_context
def _npgettext(ctx, context, singular, plural, n):
    return escape(_translations(ctx).npgettext(context, singular, plural, n))


@jinja2.pass_context
def _reason(ctx, text):
    """`{{ reason|reason }}`: a reason (the core's, the API's) in the page's
    language if the catalogue knows it, else as it is; escaped."""
    return i18n.translate_reason(_translations(ctx), text)


class Web:
    """The web UI over `api` (mailtresor.access.api.Api): its sessions,
    logins and core."""

    def __init__(self, api, clock=time.time):
        self.api, self.clock = api, clock
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")),
                                      autoescape=True, trim_blocks=True, lstrip_blocks=True,
                                      extensions=["jinja2.ext.i18n"])
        # Every user-visible string in a template is _("...") (or ngettext),
        # in the language of the request (see page()).
        self.translations = i18n.load_all()
        self.env.install_gettext_callables(_gettext, _ngettext, newstyle=True, pgettext=_pgettext,
                                           npgettext=_npgettext)
        # gettext and pgettext format (or not) themselves; ngettext's
        # always have a value (num), jinja2's newstyle wrapper formats them.
        self.env.globals.update(gettext=_gettext, pgettext=_pgettext)
        self.env.filters["size"] = human_size
        self.env.filters["reason"] = _reason
        self.pending: dict[str, tuple[float, str | None, str, str]] = {}
        # (regex, methods, handler) of every page module's ROUTES.
        self.routes = []
        for name in PAGE_MODULES:
            mod = importlib.import_module(f"mailtresor.web.{name}")
            for methods, pattern, handler in mod.ROUTES:
                self.routes.append((re.compile(pattern), frozenset(methods.split()), handler))

    # --- plumbing ---

    def serve(self, request) -> None:
        t0 = time.monotonic()
        metrics = getattr(self.api, "metrics", None)
        if metrics is not None:
            # One label for all pages: paths hold message ids and search terms.
            request.notifyFinish().addBoth(
                lambda _: metrics.observe("(web)", request.code, time.monotonic() - t0))
        for k, v in SECURITY_HEADERS.items():
            request.setHeader(k, v)
        request.setHeader(b"content-security-policy", CSP)
        request.setHeader(b"server", b"mailtresor")
        d = defer.ensureDeferred(self._handle(request))
        d.addErrback(self._crashed, request)

    def _crashed(self, failure, request):
        log.error("web: answering failed: %s", failure.getTraceback())
        if not request.finished and not request._disconnected:
            self._send(request, 500, self.page("error.html", None, lang=i18n.request_language(request),
                                               status=500, reason=N_("internal error")))

    def _send(self, request, status: int, body: bytes, ctype: bytes = b"text/html; charset=utf-8",
              headers: dict | None = None):
        if request.finished or request._disconnected:
            return
        request.setResponseCode(status)
        for k, v in (headers or {}).items():
            request.setHeader(k, v)
        request.setHeader(b"content-type", ctype)
        request.setHeader(b"content-length", str(len(body)).encode())
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def redirect(self, request, to: str, headers: dict | None = None):
        request.setHeader(b"location", to.encode("utf-8"))
        self._send(request, 303, b"", b"text/plain; charset=utf-8", headers)

    def page(self, template: str, who, *, lang: str = i18n.DEFAULT, **kw) -> bytes:
        """TEMPLATE rendered in LANG (render() picks the request's).  The
        templates see `lang` (for <html lang>) and `here` (the page's own
        local URL, where the language switch comes back to)."""
        kw.setdefault("csrf", None)
        kw.setdefault("here", "/")
        return self.env.get_template(template).render(
            who=who, lang=lang, mt_translations=self.translations[lang], **kw).encode("utf-8")

    @staticmethod
    def form(request) -> dict[str, str]:
        ctype = (request.getHeader(b"content-type") or b"").split(b";", 1)[0].strip().lower()
        if ctype != b"application/x-www-form-urlencoded":
            raise HttpError(415, N_("send the form as application/x-www-form-urlencoded"))
        request.content.seek(0)
        got = urllib.parse.parse_qs(request.content.read().decode("utf-8", "replace"), keep_blank_values=True)
        return {k: v[0] for k, v in got.items()}

    @staticmethod
    def query(request) -> dict[str, str]:
        _, _, qs = request.uri.partition(b"?")
        got = urllib.parse.parse_qs(qs.decode("utf-8", "replace"), keep_blank_values=True)
        return {k: v[0] for k, v in got.items()}

    def session(self, request):
        """(principal, sid, csrf) of the request's API session, or None."""
        cookie = request.getCookie(b"mt_session")
        sessions = self.api.sessions
        if not cookie or sessions is None:
            return None
        sid = cookie.decode("ascii", "replace")
        got = sessions.get(sid)
        if got is None:
            return None
        who, csrf = got
        if self.api.auth is not None and not self.api.auth.still_valid(who):
            sessions.drop(sid)
            return None
        import dataclasses
        return dataclasses.replace(who, client=self.api.client_of(request)), sid, csrf

    # --- routing ---

    async def _handle(self, request) -> None:
        path = request.path.decode("utf-8", "replace")
        method = request.method.decode("latin-1")
        get = method in ("GET", "HEAD")
        try:
            if path.startswith("/static/") and get:
                return self.static(request, path[len("/static/"):])
            if path == "/login":
                s = self.session(request)
                if s is not None and get:
                    return self.redirect(request, landing(s[0]))
                if get:
                    return self.login_form(request)
                if method == "POST":
                    return await self.login_post(request)
                raise HttpError(405, N_("method not allowed here"))
            if path == "/logout":
                if method == "POST":
                    return await self.logout(request)
                raise HttpError(405, N_("method not allowed here"))
            if path == "/":
                s = self.session(request)
                return self.redirect(request, landing(s[0]) if s else "/login")
            if path == "/language":
                if get:
                    return self.set_language(request)
                raise HttpError(405, N_("method not allowed here"))
            handler, groups = self.route(method, path)
            s = self.session(request)
            if s is None:
                if not get:
                    raise HttpError(401, N_("the session has expired; log in again"))
                # Back to this page after the login.
                return self.redirect(request, "/login?" + urllib.parse.urlencode(
                    {"next": request.uri.decode("utf-8", "replace")}))
            who, sid, csrf = s
            if not get:
                # Every state-changing request of every section carries the
                # session's token; checked here, before any handler, so a
                # page added later cannot forget it (handlers check again).
                self.check_csrf(self.form(request), csrf)
            return await handler(self, request, who, csrf, **groups)
        except Exception as e:  # noqa: BLE001 - pages, never tracebacks
            status, reason = getattr(e, "status", None), getattr(e, "reason", None)
            if not (isinstance(status, int) and 400 <= status < 500 and isinstance(reason, str)):
                log.error("web: %s %s failed", method, path, exc_info=True)
                status, reason = 500, N_("internal error")
            s = self.session(request)
            self.render(request, "error.html", s[0] if s else None, s[2] if s else None, status=status,
                        headers=getattr(e, "headers", None), reason=reason)

    def route(self, method: str, path: str):
        """(handler, groups) of the page module route for METHOD PATH;
        HttpError 404 (no such page) or 405 (not with this method)."""
        allowed = False
        for rx, methods, handler in self.routes:
            m = rx.fullmatch(path)
            if m is None:
                continue
            if method in methods or (method == "HEAD" and "GET" in methods):
                return handler, m.groupdict()
            allowed = True
        if allowed:
            raise HttpError(405, N_("method not allowed here"))
        raise HttpError(404, N_("no such page"))

    def check_csrf(self, form: dict, csrf: str) -> None:
        """A state-changing form must carry the session's CSRF token."""
        if not secrets.compare_digest(form.get("csrf", "").encode(), (csrf or "").encode()):
            raise HttpError(403, N_("missing or wrong CSRF token"))

    def render(self, request, template: str, who, csrf, status: int = 200, headers: dict | None = None,
               **kw) -> None:
        """Send a page rendered from TEMPLATE in the request's language (the
        template also sees `status`, the page's HTTP status)."""
        lang = i18n.request_language(request)
        kw.setdefault("here", request.uri.decode("utf-8", "replace"))
        # The page depends on the language cookie and the header: caches
        # must keep the variants apart.
        headers = {**(headers or {}), b"content-language": lang.encode(),
                   b"vary": b"Accept-Language, Cookie"}
        self._send(request, status, self.page(template, who, lang=lang, csrf=csrf, status=status, **kw),
                   headers=headers)

    def set_language(self, request):
        """GET /language?set=de&next=/path: the language switch.  Remembers
        the choice in a cookie (a year) and goes back to `next` -- a local
        path only (safe_next), never another site."""
        q = self.query(request)
        lang = q.get("set", "")
        if lang not in i18n.LANGUAGES:
            raise HttpError(400, N_("unknown language"))
        request.addCookie(i18n.COOKIE, lang.encode(), path=b"/", max_age=str(i18n.COOKIE_MAX_AGE).encode(),
                          secure=True, httpOnly=True, sameSite="lax")
        self.redirect(request, safe_next(q.get("next")))

    @property
    def core(self):
        return self.api._need_core()

    def static(self, request, name: str):
        if not _STATIC_NAME.fullmatch(name) or not (STATIC / name).is_file():
            raise HttpError(404, N_("no such file"))
        body = (STATIC / name).read_bytes()
        # Static assets are the package's own: cacheable for a while.
        self._send(request, 200, body, STATIC_TYPES[Path(name).suffix], {b"cache-control": b"max-age=3600"})

    # --- logins ---

    def login_form(self, request, *, error=None, status=200, next_=None, totp=None, tenant="", username=""):
        token = secrets.token_urlsafe(32)
        request.addCookie(LOGIN_COOKIE, token.encode(), path=b"/login", secure=True, httpOnly=True,
                          sameSite="strict")
        q = self.query(request)
        nxt = safe_next(next_ or q.get("next"), "")     # "": the user's landing page (by role)
        # The language switch comes back to this login, with its next.
        here = "/login" + ("?" + urllib.parse.urlencode({"next": nxt}) if nxt else "")
        self.render(request, "login.html", None, None, status=status, here=here,
                    login_csrf=token, error=error, next=nxt,
                    totp=totp, tenant=tenant or q.get("tenant", ""), username=username,
                    expired=bool(q.get("next")) and error is None and totp is None)

    def _expire_pending(self):
        now = self.clock()
        for k in [k for k, v in self.pending.items() if v[0] < now]:
            del self.pending[k]

    async def login_post(self, request):
        f = self.form(request)
        cookie = (request.getCookie(LOGIN_COOKIE) or b"").decode("ascii", "replace")
        if not cookie or not secrets.compare_digest(cookie, f.get("login_csrf", "")):
            raise HttpError(403, N_("the login form expired or came from elsewhere; load it again"))
        nxt = safe_next(f.get("next"), "")      # "": the user's landing page (by role)
        self._expire_pending()
        pending = f.get("pending")
        if pending:
            # The TOTP step: the name and password checked a moment ago.
            got = self.pending.pop(pending, None)
            if got is None:
                return self.login_form(request, error=N_("The login took too long; start again."), status=401,
                                       next_=nxt)
            _, tenant, username, password = got
            totp = f.get("totp", "").strip()
        else:
            tenant = f.get("tenant", "").strip() or None
            username, password, totp = f.get("username", "").strip(), f.get("password", ""), None
        try:
            who, sid, csrf = await self.api.login_session(request, tenant=tenant, username=username,
                                                          password=password, totp=totp,
                                                          client=self.api.client_of(request))
        except HttpError as e:
            if e.extra.get("totp_required"):
                token = secrets.token_urlsafe(32)
                while len(self.pending) >= MAX_PENDING:
                    del self.pending[next(iter(self.pending))]
                self.pending[token] = (self.clock() + PENDING_TTL, tenant, username, password)
                return self.login_form(request, totp=token, next_=nxt, status=200,
                                       error=N_("That code was not right.") if totp else None)
            # The API's words: the same for an unknown user and a wrong password.
            return self.login_form(request, error=e.reason, status=e.status, next_=nxt, tenant=tenant or "",
                                   username=username, )
        self.redirect(request, nxt or landing(who))

    async def logout(self, request):
        s = self.session(request)
        f = self.form(request)
        if s is None:
            return self.redirect(request, "/login")
        who, sid, csrf = s
        if not secrets.compare_digest(f.get("csrf", ""), csrf):
            raise HttpError(403, N_("missing or wrong CSRF token"))
        await self.api.end_session(request, who, sid)
        self.redirect(request, "/login")
