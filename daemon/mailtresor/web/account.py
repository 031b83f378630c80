"""The account pages: who you are, a new password, the TOTP second factor.

An adapter over mailtresor.access.account (the same code as the API's
/api/v1/me/ routes): it checks CSRF, takes the form, and shows the answer.
Every change proves the password again (on the login's throttle
counters); TOTP is enrolled in two steps (a candidate secret in memory,
bound to the session, stored only once a code from the app matches it);
the recovery codes are shown once, on the answer to the POST that made
them (no redirect could carry them without putting them in a URL).
Password fields are never filled back in.
"""

from __future__ import annotations

import base64
import math

from mailtresor.access import account as accountmod
from mailtresor.access import users as usersmod
from mailtresor.access.account import Refused
from mailtresor.access.http import HttpError
from mailtresor.web.i18n import N_

# What the success notice on /account says (?done=...).
DONE = {
    "password": N_("Your password was changed. Your other sessions were ended."),
    "totp-off": N_("Two-factor authentication is off."),
}


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


def _sid(web, request) -> str:
    s = web.session(request)
    if s is None:
        raise HttpError(401, "the session has expired; log in again")
    return s[1]


def _account(web) -> accountmod.Account:
    return web.api.account


async def _account_page(web, request, who, csrf, *, done=None, refused: Refused | None = None,
                        section: str | None = None):
    """/account, with a success notice or a refused form's error (shown
    beside that form: section "password" or "totp")."""
    user = await web.api.run(_account(web).local_user, who)
    body = web.page("account.html", who, csrf=csrf, user=user, done=done, error_section=section,
                    min_password=usersmod.MIN_PASSWORD,
                    error=refused.message if refused else None, error_args=refused.values if refused else {})
    web._send(request, refused.status if refused else 200, body, headers=refused.headers if refused else None)


def _totp_page(web, request, who, csrf, c, *, status=200, error=None):
    web.render(request, "account_totp.html", who, csrf, status=status, qr=qr_data_uri(c.uri),
               secret=group_secret(c.secret), label=c.name if c.tenant is None else f"{c.name}@{c.tenant}",
               issuer=usersmod.TOTP_ISSUER, minutes=max(1, math.ceil((c.expires - web.clock()) / 60)),
               error=error)


def _posted(web, request, csrf) -> tuple[dict, str]:
    f = web.form(request)
    web.check_csrf(f, csrf)
    return f, _sid(web, request)


# --- pages --------------------------------------------------------------------------

async def account(web, request, who, csrf):
    await _account_page(web, request, who, csrf, done=DONE.get(web.query(request).get("done", "")))


async def password(web, request, who, csrf):
    f, sid = _posted(web, request, csrf)
    try:
        await web.api.run(_account(web).change_password, who, sid, f.get("current", ""), f.get("new", ""),
                          f.get("again", ""))
    except Refused as e:
        return await _account_page(web, request, who, csrf, refused=e, section="password")
    web.redirect(request, "/account?done=password")


async def totp_begin(web, request, who, csrf):
    f, sid = _posted(web, request, csrf)
    try:
        c = await web.api.run(_account(web).totp_begin, who, sid, f.get("password", ""), f.get("code", ""))
    except Refused as e:
        return await _account_page(web, request, who, csrf, refused=e, section="totp")
    _totp_page(web, request, who, csrf, c)


async def totp_show(web, request, who, csrf):
    """The enrolment page again (a reload), while its candidate lives."""
    c = _account(web).totp_candidate(who, _sid(web, request))
    if c is None:
        return web.redirect(request, "/account")
    _totp_page(web, request, who, csrf, c)


async def totp_confirm(web, request, who, csrf):
    f, sid = _posted(web, request, csrf)
    acc = _account(web)
    try:
        codes = await web.api.run(acc.totp_confirm, who, sid, f.get("code", ""))
    except Refused as e:
        c = acc.totp_candidate(who, sid)
        if c is None:
            raise
        # A wrong code: the page again, the candidate kept until it expires.
        return _totp_page(web, request, who, csrf, c, status=e.status, error=e.message)
    web.render(request, "account_codes.html", who, csrf, codes=codes, enabled=True)


async def totp_cancel(web, request, who, csrf):
    _f, sid = _posted(web, request, csrf)
    _account(web).totp_cancel(sid)
    web.redirect(request, "/account")


async def recovery_codes(web, request, who, csrf):
    f, sid = _posted(web, request, csrf)
    try:
        codes = await web.api.run(_account(web).new_recovery_codes, who, sid, f.get("password", ""),
                                  f.get("code", ""))
    except Refused as e:
        return await _account_page(web, request, who, csrf, refused=e, section="totp")
    web.render(request, "account_codes.html", who, csrf, codes=codes, enabled=False)


async def totp_off(web, request, who, csrf):
    f, sid = _posted(web, request, csrf)
    try:
        await web.api.run(_account(web).totp_off, who, sid, f.get("password", ""), f.get("code", ""))
    except Refused as e:
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
