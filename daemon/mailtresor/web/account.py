"""The account pages: who you are, a new password, the TOTP second factor.

Every change here proves the password again (Authenticator.reauthenticate:
the login's check and the login's throttle counters, so the page guesses
no faster than the login form), and the second-factor changes a current
code too.  TOTP is enrolled in two steps so that a user who never scans the
code is not locked out: `begin` makes a candidate secret that lives only in
this process's memory, bound to the session, for ENROL_TTL seconds;
`confirm` stores it only once a code from the app matches it.  Recovery
codes are shown once, on the answer to the POST that made them (no
redirect could carry them without putting them in a URL).

A change ends the user's other sessions (UserDB.on_change, which the API
wires to Sessions.drop_user; the session that made the change is spared)
and writes one audit record, as the API's user administration does
(action "admin", object "user:NAME", detail {"op": ...}).  No password,
secret or code reaches the audit trail, the log or a page it was not made
for; password fields are never filled back in.
"""

from __future__ import annotations

import base64
import math
import threading
import weakref
from dataclasses import dataclass

from mailtresor.access import users as usersmod
from mailtresor.access.http import HttpError
from mailtresor.web.i18n import N_

ENROL_TTL = 600.0           # seconds a candidate TOTP secret waits for its first code
MAX_ENROLMENTS = 1000       # candidates held at once (the oldest is forgotten first)

# What the success notice on /account says (?done=...).
DONE = {
    "password": N_("Your password was changed. Your other sessions were ended."),
    "totp-off": N_("Two-factor authentication is off."),
}
WRONG = N_("The password or the code is not right.")
THROTTLED = N_("Too many failed attempts; try again in %(seconds)s seconds.")


# --- candidate secrets (memory only) ----------------------------------------------

@dataclass
class _Candidate:
    expires: float
    tenant: str | None
    name: str
    secret: str


class Enrolments:
    """Candidate TOTP secrets by session id, in memory only, each for at
    most `ttl` seconds; bounded (the oldest goes first).  A candidate is
    only handed back to the session that made it and for the same user."""

    def __init__(self, clock, ttl: float = ENROL_TTL, limit: int = MAX_ENROLMENTS):
        self._clock, self.ttl, self.limit = clock, ttl, limit
        self._lock = threading.Lock()
        self._c: dict[str, _Candidate] = {}

    def _expire(self, now: float) -> None:
        for k in [k for k, c in self._c.items() if c.expires <= now]:
            del self._c[k]

    def begin(self, sid: str, tenant: str | None, name: str) -> _Candidate:
        """A new candidate for this session (replacing any it had)."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            self._c.pop(sid, None)
            while len(self._c) >= self.limit:
                del self._c[next(iter(self._c))]
            c = self._c[sid] = _Candidate(now + self.ttl, tenant, name, usersmod.new_totp_secret())
            return c

    def get(self, sid: str, tenant: str | None, name: str) -> _Candidate | None:
        with self._lock:
            self._expire(self._clock())
            c = self._c.get(sid)
            return c if c is not None and (c.tenant, c.name) == (tenant, name) else None

    def drop(self, sid: str) -> None:
        with self._lock:
            self._c.pop(sid, None)

    def __len__(self) -> int:
        return len(self._c)


_ENROLMENTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def enrolments(web) -> Enrolments:
    """The Web's candidates (one table per Web, on its clock)."""
    e = _ENROLMENTS.get(web)
    if e is None:
        e = _ENROLMENTS[web] = Enrolments(web.clock)
    return e


# --- pure helpers -----------------------------------------------------------------

def group_secret(secret: str) -> str:
    """A base32 secret in groups of four, for typing it in.  Pure."""
    return " ".join(secret[i:i + 4] for i in range(0, len(secret), 4))


def qr_data_uri(text: str) -> str:
    """TEXT as a QR code: an SVG (python3-qrcode) in a data: URI, which the
    pages' CSP allows for images (img-src data:) and which needs no request
    that could be cached or logged."""
    import qrcode
    import qrcode.image.svg
    img = qrcode.make(text, image_factory=qrcode.image.svg.SvgPathFillImage, box_size=10, border=4)
    svg = img.to_string(encoding="unicode").encode("utf-8")
    return "data:image/svg+xml;base64," + base64.b64encode(svg).decode("ascii")


def password_rule(password: str) -> tuple[str, dict] | None:
    """None if users.check_password takes PASSWORD, else the page's words
    for the rule it broke (message, arguments).  The rules are
    check_password's; only the wording is chosen here."""
    try:
        usersmod.check_password(password)
    except usersmod.UserError as e:
        if len(password) < usersmod.MIN_PASSWORD:
            return N_("The new password is too short: it needs at least %(n)s characters."), \
                {"n": usersmod.MIN_PASSWORD}
        if len(password) > usersmod.MAX_PASSWORD:
            return N_("The new password is too long: at most %(n)s characters."), {"n": usersmod.MAX_PASSWORD}
        return N_("The new password is not accepted: %(rule)s"), {"rule": str(e)}
    return None


# --- plumbing ---------------------------------------------------------------------

class _Refused(Exception):
    """A form refused: shown on the form's page with its status."""

    def __init__(self, status: int, message: str, args: dict | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.values, self.headers = status, message, args or {}, headers


def _sid(web, request) -> str:
    s = web.session(request)
    if s is None:
        raise HttpError(401, "the session has expired; log in again")
    return s[1]


def _local_user(web, who):
    """The local user behind the session, or None (a directory user)."""
    if who.kind != "user" or web.api.users is None:
        return None
    return web.api.users.get(who.tenant, who.name)


def _audit(web, who, op: str, result: str = "ok") -> None:
    # The record the API's user administration writes, the user as actor.
    web.api._admin_audit(who, who.tenant, f"user:{who.name}", op, result)


def _reauthenticate(web, who, op: str, password: str, code: str | None = None) -> None:
    """The password (and code) again, throttled like a login; a refusal is
    audited (failed, or denied when throttled) and raised as _Refused."""
    from mailtresor.access.auth import LoginFailed
    from mailtresor.access.sessions import Throttled
    auth = web.api._need_auth()
    try:
        auth.reauthenticate(who, password, code)
    except Throttled as e:
        _audit(web, who, op, "denied")
        wait = max(1, math.ceil(e.retry_after))
        raise _Refused(429, THROTTLED, {"seconds": wait}, {b"Retry-After": str(wait).encode()}) from None
    except LoginFailed:
        _audit(web, who, op, "failed")
        raise _Refused(401, WRONG) from None


async def _account_page(web, request, who, csrf, *, done=None, refused: _Refused | None = None,
                        section: str | None = None):
    """/account, with a success notice or a refused form's error (shown
    beside that form: section "password" or "totp")."""
    user = await web.api.run(_local_user, web, who)
    body = web.page("account.html", who, csrf=csrf, user=user, done=done, error_section=section,
                    min_password=usersmod.MIN_PASSWORD,
                    error=refused.message if refused else None, error_args=refused.values if refused else {})
    web._send(request, refused.status if refused else 200, body, headers=refused.headers if refused else None)


# --- pages --------------------------------------------------------------------------

async def account(web, request, who, csrf):
    done = DONE.get(web.query(request).get("done", ""))
    await _account_page(web, request, who, csrf, done=done)


async def password(web, request, who, csrf):
    f = web.form(request)
    web.check_csrf(f, csrf)
    sid = _sid(web, request)
    current, new, again = f.get("current", ""), f.get("new", ""), f.get("again", "")

    def do():
        if _local_user(web, who) is None:
            raise _Refused(400, N_("Your password is managed by your directory; change it there."))
        if new != again:
            raise _Refused(400, N_("The two new passwords are not the same."))
        rule = password_rule(new)
        if rule is not None:
            raise _Refused(400, *rule)
        _reauthenticate(web, who, "password", current)
        if new == current:
            raise _Refused(400, N_("The new password is the current one."))
        sessions = web.api.sessions
        with sessions.sparing(sid):
            web.api.users.passwd(who.tenant, who.name, new)
        sessions.drop_user(who.tenant, who.name, keep=sid)     # also when no listener is wired
        _audit(web, who, "password")
    try:
        await web.api.run(do)
    except _Refused as e:
        return await _account_page(web, request, who, csrf, refused=e, section="password")
    web.redirect(request, "/account?done=password")


def _totp_page(web, request, who, csrf, c, *, status=200, error=None):
    uri = usersmod.totp_uri(c.tenant, c.name, c.secret)
    left = max(1, math.ceil((c.expires - web.clock()) / 60))
    web.render(request, "account_totp.html", who, csrf, status=status, qr=qr_data_uri(uri),
               secret=group_secret(c.secret), label=c.name if c.tenant is None else f"{c.name}@{c.tenant}",
               issuer=usersmod.TOTP_ISSUER, minutes=left, error=error)


async def totp_begin(web, request, who, csrf):
    f = web.form(request)
    web.check_csrf(f, csrf)
    sid = _sid(web, request)

    def do():
        user = _local_user(web, who)
        if user is None:
            raise _Refused(400, N_("Two-factor authentication for a directory account is set up in the "
                                   "directory."))
        # Replacing a second factor that is on needs a code from it too.
        _reauthenticate(web, who, "totp-enable", f.get("password", ""),
                        f.get("code", "") if user.totp else None)
        return enrolments(web).begin(sid, who.tenant, who.name)
    try:
        c = await web.api.run(do)
    except _Refused as e:
        return await _account_page(web, request, who, csrf, refused=e, section="totp")
    _totp_page(web, request, who, csrf, c)


async def totp_show(web, request, who, csrf):
    """The enrolment page again (a reload), while its candidate lives."""
    c = enrolments(web).get(_sid(web, request), who.tenant, who.name)
    if c is None:
        return web.redirect(request, "/account")
    _totp_page(web, request, who, csrf, c)


async def totp_confirm(web, request, who, csrf):
    f = web.form(request)
    web.check_csrf(f, csrf)
    sid = _sid(web, request)
    table = enrolments(web)
    c = table.get(sid, who.tenant, who.name)
    if c is None:
        raise HttpError(400, N_("No two-factor set-up is under way, or it took longer than 10 minutes; "
                                "start again."))
    step = usersmod.totp_step(c.secret, f.get("code", ""), web.clock())
    if step is None:
        # The candidate stays: the user may try again until it expires.
        return _totp_page(web, request, who, csrf, c, status=400,
                          error=N_("That code is not right. Check the time on your phone and enter the code "
                                   "the app shows now."))

    def do():
        with web.api.sessions.sparing(sid):
            codes = web.api.users.totp_set(who.tenant, who.name, c.secret, last_step=step)
        _audit(web, who, "totp-enable")
        return codes
    codes = await web.api.run(do)
    table.drop(sid)
    web.render(request, "account_codes.html", who, csrf, codes=codes, enabled=True)


async def totp_cancel(web, request, who, csrf):
    f = web.form(request)
    web.check_csrf(f, csrf)
    enrolments(web).drop(_sid(web, request))
    web.redirect(request, "/account")


async def recovery_codes(web, request, who, csrf):
    f = web.form(request)
    web.check_csrf(f, csrf)
    sid = _sid(web, request)

    def do():
        user = _local_user(web, who)
        if user is None or not user.totp:
            raise _Refused(400, N_("Two-factor authentication is not on."))
        _reauthenticate(web, who, "recovery-codes", f.get("password", ""), f.get("code", ""))
        with web.api.sessions.sparing(sid):
            codes = web.api.users.new_recovery_codes(who.tenant, who.name)
        _audit(web, who, "recovery-codes")
        return codes
    try:
        codes = await web.api.run(do)
    except _Refused as e:
        return await _account_page(web, request, who, csrf, refused=e, section="totp")
    web.render(request, "account_codes.html", who, csrf, codes=codes, enabled=False)


async def totp_off(web, request, who, csrf):
    f = web.form(request)
    web.check_csrf(f, csrf)
    sid = _sid(web, request)

    def do():
        user = _local_user(web, who)
        if user is None or not user.totp:
            raise _Refused(400, N_("Two-factor authentication is not on."))
        # The configuration has no tenant policy that requires TOTP: a user
        # may turn it off (with the password and a code); it is audited.
        _reauthenticate(web, who, "totp-disable", f.get("password", ""), f.get("code", ""))
        with web.api.sessions.sparing(sid):
            web.api.users.totp_disable(who.tenant, who.name)
        _audit(web, who, "totp-disable")
    try:
        await web.api.run(do)
    except _Refused as e:
        return await _account_page(web, request, who, csrf, refused=e, section="totp")
    web.redirect(request, "/account?done=totp-off")


ROUTES = (
    ("GET", r"/account", account),
    ("POST", r"/account/password", password),
    ("GET", r"/account/totp", totp_show),
    ("POST", r"/account/totp/begin", totp_begin),
    ("POST", r"/account/totp/confirm", totp_confirm),
    ("POST", r"/account/totp/cancel", totp_cancel),
    ("POST", r"/account/totp/codes", recovery_codes),
    ("POST", r"/account/totp/off", totp_off),
)

