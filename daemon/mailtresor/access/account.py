"""A user's changes to their own account: a new password, the TOTP second
factor (two-step enrolment), recovery codes.  The one implementation the
web UI's account pages (mailtresor.web.account) and the API's /api/v1/me/
routes call; blocking (argon2, users.db, the audit trail): run it in the
API's pool.

Every change proves the password again (Authenticator.reauthenticate: the
login's check on the login's throttle counters, so this guesses no faster
than a login), and a change to the second factor a current code too.  TOTP
is enrolled in two steps so that a user who never scans the code is not
locked out: `totp_begin` makes a candidate secret that lives only in this
process's memory, bound to the session, for ENROL_TTL seconds;
`totp_confirm` stores it only once a code from the app matches it.

A change ends the user's other sessions (UserDB.on_change, which the API
wires to Sessions.drop_user; the session that made the change is spared)
and writes one audit record, as the API's user administration does
(action "admin", object "user:NAME", detail {"op": ...}, the user as the
principal): ok, failed (wrong password or code) or denied (throttled).
No password, secret or code goes into a record or the log.

Refusals are `Refused`: an HTTP status and an English message (a msgid:
the web page translates it with its values; the API answers `reason`).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from mailtresor.access import users as usersmod

ENROL_TTL = 600.0           # seconds a candidate TOTP secret waits for its first code
MAX_ENROLMENTS = 1000       # candidates held at once (the oldest is forgotten first)


def N_(message: str) -> str:  # noqa: N802 - the gettext convention
    """Mark MESSAGE for translation (as mailtresor.web.i18n.N_; the access
    layer does not import the web package)."""
    return message


WRONG = N_("The password or the code is not right.")
THROTTLED = N_("Too many failed attempts; try again in %(seconds)s seconds.")
DIRECTORY_PASSWORD = N_("Your password is managed by your directory; change it there.")
DIRECTORY_TOTP = N_("Two-factor authentication for a directory account is set up in the directory.")
NOT_ON = N_("Two-factor authentication is not on.")
NO_CANDIDATE = N_("No two-factor set-up is under way, or it took longer than 10 minutes; start again.")
WRONG_CODE = N_("That code is not right. Check the time on your phone and enter the code the app shows now.")
NO_SESSION = N_("This needs a logged-in user's session (not a token).")


class Refused(Exception):
    """A change refused: `status` (400, 401, 429), `message` (English, a
    msgid) with `values` for its %(name)s fields, `headers` (Retry-After).
    `reason` is the message filled in: what the API answers, and what
    mailtresor.web's and the API's error handling show for any exception
    with an int `status` and a str `reason`."""

    def __init__(self, status: int, message: str, values: dict | None = None, headers: dict | None = None):
        self.status, self.message, self.values, self.headers = status, message, dict(values or {}), headers or {}
        self.reason = message % self.values if self.values else message
        super().__init__(self.reason)


def password_rule(password: str) -> tuple[str, dict] | None:
    """None if users.check_password takes PASSWORD, else the words for the
    rule it broke (message, values).  The rules are check_password's; only
    the wording is chosen here."""
    try:
        usersmod.check_password(password)
    except usersmod.UserError as e:
        if not isinstance(password, str):
            return N_("The new password is not accepted: %(rule)s"), {"rule": str(e)}
        if len(password) < usersmod.MIN_PASSWORD:
            return N_("The new password is too short: it needs at least %(n)s characters."), \
                {"n": usersmod.MIN_PASSWORD}
        if len(password) > usersmod.MAX_PASSWORD:
            return N_("The new password is too long: at most %(n)s characters."), {"n": usersmod.MAX_PASSWORD}
        return N_("The new password is not accepted: %(rule)s"), {"rule": str(e)}
    return None


# --- candidate secrets (memory only) ----------------------------------------------

@dataclass
class Candidate:
    expires: float
    tenant: str | None
    name: str
    secret: str

    @property
    def uri(self) -> str:
        return usersmod.totp_uri(self.tenant, self.name, self.secret)


class Enrolments:
    """Candidate TOTP secrets by session id, in memory only, each for at
    most `ttl` seconds; bounded (the oldest goes first).  A candidate is
    only handed back to the session that made it, for the same user."""

    def __init__(self, clock, ttl: float = ENROL_TTL, limit: int = MAX_ENROLMENTS):
        self._clock, self.ttl, self.limit = clock, ttl, limit
        self._lock = threading.Lock()
        self._c: dict[str, Candidate] = {}

    def _expire(self, now: float) -> None:
        for k in [k for k, c in self._c.items() if c.expires <= now]:
            del self._c[k]

    def begin(self, sid: str, tenant: str | None, name: str) -> Candidate:
        """A new candidate for this session (replacing any it had)."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            self._c.pop(sid, None)
            while len(self._c) >= self.limit:
                del self._c[next(iter(self._c))]
            c = self._c[sid] = Candidate(now + self.ttl, tenant, name, usersmod.new_totp_secret())
            return c

    def get(self, sid: str, tenant: str | None, name: str) -> Candidate | None:
        with self._lock:
            self._expire(self._clock())
            c = self._c.get(sid)
            return c if c is not None and (c.tenant, c.name) == (tenant, name) else None

    def drop(self, sid: str) -> None:
        with self._lock:
            self._c.pop(sid, None)

    def __len__(self) -> int:
        return len(self._c)


# --- the changes ------------------------------------------------------------------

class Account:
    """A user's own account changes over `api` (access.api.Api: its users,
    auth, sessions and audit).  `sid` is the session making the change:
    the one kept when the user's sessions end, and the one a TOTP candidate
    is bound to."""

    def __init__(self, api, clock):
        self.api = api
        self.clock = clock
        self.enrolments = Enrolments(clock)

    def local_user(self, who) -> usersmod.User | None:
        """The local user behind the principal, or None (a directory user)."""
        if who is None or who.kind != "user" or self.api.users is None:
            return None
        return self.api.users.get(who.tenant, who.name)

    def _audit(self, who, op: str, result: str = "ok") -> None:
        self.api._admin_audit(who, who.tenant, f"user:{who.name}", op, result)

    def _reauthenticate(self, who, op: str, password, code=None) -> None:
        from mailtresor.access.auth import LoginFailed
        from mailtresor.access.sessions import Throttled
        try:
            self.api._need_auth().reauthenticate(who, password, code)
        except Throttled as e:
            self._audit(who, op, "denied")
            wait = max(1, math.ceil(e.retry_after))
            raise Refused(429, THROTTLED, {"seconds": wait}, {b"Retry-After": str(wait).encode()}) from None
        except LoginFailed:
            self._audit(who, op, "failed")
            raise Refused(401, WRONG) from None

    def _need(self, who, sid, directory_message: str) -> usersmod.User:
        if not sid:
            raise Refused(400, NO_SESSION)
        user = self.local_user(who)
        if user is None:
            raise Refused(400, directory_message)
        return user

    def change_password(self, who, sid: str, current, new, again=None) -> None:
        """The password of WHO becomes NEW (checked: check_password's rules,
        `again` equal when given, CURRENT right); the user's other sessions
        end; audited (op "password", as the administrator's change)."""
        self._need(who, sid, DIRECTORY_PASSWORD)
        if again is not None and new != again:
            raise Refused(400, N_("The two new passwords are not the same."))
        rule = password_rule(new)
        if rule is not None:
            raise Refused(400, *rule)
        self._reauthenticate(who, "password", current)
        if new == current:
            raise Refused(400, N_("The new password is the current one."))
        sessions = self.api.sessions
        with sessions.sparing(sid):
            self.api.users.passwd(who.tenant, who.name, new)
        sessions.drop_user(who.tenant, who.name, keep=sid)     # also when no listener is wired
        self._audit(who, "password")

    def totp_begin(self, who, sid: str, password, code=None) -> Candidate:
        """A candidate secret for this session, after the password (and,
        when TOTP is on already, a code: a new app replaces the old).
        Nothing is stored."""
        user = self._need(who, sid, DIRECTORY_TOTP)
        self._reauthenticate(who, "totp-enable", password, (code or "") if user.totp else None)
        return self.enrolments.begin(sid, who.tenant, who.name)

    def totp_candidate(self, who, sid: str) -> Candidate | None:
        return self.enrolments.get(sid, who.tenant, who.name) if sid else None

    def totp_confirm(self, who, sid: str, code) -> list[str]:
        """Store the session's candidate if CODE is its current code (the
        login's check); the new recovery codes, to be shown once.  A wrong
        code leaves the candidate for another try."""
        c = self.totp_candidate(who, sid)
        if c is None:
            raise Refused(400, NO_CANDIDATE)
        step = usersmod.totp_step(c.secret, code if isinstance(code, str) else "", self.clock())
        if step is None:
            raise Refused(400, WRONG_CODE)
        with self.api.sessions.sparing(sid):
            codes = self.api.users.totp_set(who.tenant, who.name, c.secret, last_step=step)
        self.enrolments.drop(sid)
        self._audit(who, "totp-enable")
        return codes

    def totp_cancel(self, sid: str) -> None:
        if sid:
            self.enrolments.drop(sid)

    def new_recovery_codes(self, who, sid: str, password, code) -> list[str]:
        """New recovery codes (the old ones stop working), after the
        password and a current code."""
        user = self._need(who, sid, DIRECTORY_TOTP)
        if not user.totp:
            raise Refused(400, NOT_ON)
        self._reauthenticate(who, "recovery-codes", password, code or "")
        with self.api.sessions.sparing(sid):
            codes = self.api.users.new_recovery_codes(who.tenant, who.name)
        self._audit(who, "recovery-codes")
        return codes

    def totp_off(self, who, sid: str, password, code) -> None:
        """Turn the second factor off, after the password and a code.  The
        configuration has no tenant policy that requires TOTP: a user may
        turn it off; it is audited."""
        user = self._need(who, sid, DIRECTORY_TOTP)
        if not user.totp:
            raise Refused(400, NOT_ON)
        self._reauthenticate(who, "totp-disable", password, code or "")
        with self.api.sessions.sparing(sid):
            self.api.users.totp_disable(who.tenant, who.name)
        self._audit(who, "totp-disable")
