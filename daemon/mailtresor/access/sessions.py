"""Browser sessions and login throttling, in memory only.

Session ids and CSRF tokens are 32 random bytes (base64url) that live in
this process's memory and in the browser's cookie, never on disk: a daemon
restart logs everybody out, which is the price of having no session secret
to steal from the disk.  The clock is injectable so that tests drive the idle
and absolute timeouts without sleeping.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from dataclasses import dataclass

from mailtresor.access.principal import Principal


@dataclass
class _Session:
    principal: Principal
    csrf: str
    created: float
    last: float


class Sessions:
    """sid -> (principal, CSRF token), with an idle and an absolute timeout."""

    def __init__(self, *, idle: float = 1800, absolute: float = 43200, clock=time.time,
                 max_sessions: int = 100_000, per_principal: int = 20):
        self.idle, self.absolute = float(idle), float(absolute)
        self._clock = clock
        self._max = max_sessions
        # One account logging in again and again must not fill the table and
        # push everybody else's sessions out: its own oldest go first.
        self._per = per_principal
        self._lock = threading.Lock()
        self._s: dict[str, _Session] = {}
        self._spared = threading.local()

    def __len__(self) -> int:
        return len(self._s)

    def _alive(self, s: _Session, now: float) -> bool:
        return now - s.last < self.idle and now - s.created < self.absolute

    def create(self, principal: Principal) -> tuple[str, str]:
        """A new session: (session id for the cookie, CSRF token)."""
        sid = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        now = self._clock()
        who = (principal.kind, principal.tenant, principal.name)
        with self._lock:
            mine = [k for k, s in self._s.items()
                    if (s.principal.kind, s.principal.tenant, s.principal.name) == who]
            while len(mine) >= self._per:
                del self._s[min(mine, key=lambda k: self._s[k].last)]
                mine = [k for k in mine if k in self._s]
            if len(self._s) >= self._max:
                self._prune(now)
                if len(self._s) >= self._max:          # still full: the oldest goes
                    del self._s[min(self._s, key=lambda k: self._s[k].last)]
            self._s[sid] = _Session(principal, csrf, now, now)
        return sid, csrf

    def get(self, sid: str) -> tuple[Principal, str] | None:
        """(principal, CSRF token) of a live session, which counts as activity;
        None for an unknown or expired one (an expired one is forgotten)."""
        if not isinstance(sid, str):
            return None
        now = self._clock()
        with self._lock:
            s = self._s.get(sid)
            if s is None:
                return None
            if not self._alive(s, now):
                del self._s[sid]
                return None
            s.last = now
            return s.principal, s.csrf

    def check_csrf(self, sid: str, token: str | None) -> bool:
        """Whether `token` is the CSRF token of the live session `sid`
        (compared in constant time); does not count as activity."""
        with self._lock:
            s = self._s.get(sid) if isinstance(sid, str) else None
            if s is None or not isinstance(token, str) or not self._alive(s, self._clock()):
                return False
            return secrets.compare_digest(s.csrf.encode(), token.encode("utf-8", "replace"))

    def drop(self, sid: str) -> None:
        """Logout."""
        with self._lock:
            self._s.pop(sid, None)

    def drop_user(self, tenant: str | None, name: str, *, keep: str | None = None) -> int:
        """End every session of a user (disabled, password changed) but
        `keep` (the session that made the change) and any session spared by
        sparing() in this thread; how many ended."""
        spared = getattr(self._spared, "sid", None)
        with self._lock:
            gone = [k for k, s in self._s.items()
                    if s.principal.kind == "user" and s.principal.tenant == tenant and s.principal.name == name
                    and k != keep and k != spared]
            for k in gone:
                del self._s[k]
        return len(gone)

    @contextlib.contextmanager
    def sparing(self, sid: str):
        """Within this block, in this thread, drop_user() keeps session SID.

        A user changing their own password or second factor on the account
        page: UserDB.on_change() ends the user's sessions (the API wires it
        to drop_user), and the session that made the change, which has just
        proved the password again, is the one to keep.  Thread-local: the
        change and its listener run in the same pool thread; nobody else's
        drop is affected."""
        before = getattr(self._spared, "sid", None)
        self._spared.sid = sid
        try:
            yield
        finally:
            self._spared.sid = before

    def _prune(self, now: float) -> None:
        for k in [k for k, s in self._s.items() if not self._alive(s, now)]:
            del self._s[k]


class Throttled(Exception):
    """Too many failed logins for this user name or client address; try
    again after `retry_after` seconds."""

    def __init__(self, retry_after: float):
        super().__init__(f"too many failed logins; try again in {retry_after:.0f} s")
        self.retry_after = retry_after


class Throttle:
    """Failed-login counters per key ("user:TENANT/NAME", "addr:CLIENT").

    Up to `failures` failures within `window` seconds are free; from then on
    each further attempt must wait base * 2**(n - failures) seconds after the
    last failure, capped at `max_delay`.  A key's count is forgotten once it
    has been quiet for its back-off plus `window`.
    """

    def __init__(self, *, failures: int = 5, window: float = 300.0, base: float = 1.0,
                 max_delay: float = 900.0, clock=time.time, max_keys: int = 100_000):
        self.failures, self.window, self.base, self.max_delay = failures, window, base, max_delay
        self._clock = clock
        self._max = max_keys
        self._lock = threading.Lock()
        self._k: dict[str, tuple[int, float]] = {}     # key -> (failures, time of the last)

    def _delay(self, n: int) -> float:
        if n < self.failures:
            return 0.0
        return min(self.max_delay, self.base * 2.0 ** min(n - self.failures, 60))

    def _current(self, key: str, now: float) -> tuple[int, float]:
        n, last = self._k.get(key, (0, 0.0))
        if n and now - last > self._delay(n) + self.window:
            del self._k[key]
            return 0, 0.0
        return n, last

    def check(self, keys) -> None:
        """Raise Throttled if any key must still wait."""
        now = self._clock()
        wait = 0.0
        with self._lock:
            for key in keys:
                n, last = self._current(key, now)
                wait = max(wait, last + self._delay(n) - now)
        if wait > 0:
            raise Throttled(wait)

    def failure(self, keys) -> None:
        now = self._clock()
        with self._lock:
            if len(self._k) >= self._max:
                for k in [k for k, (n, last) in self._k.items() if now - last > self._delay(n) + self.window]:
                    del self._k[k]
                while len(self._k) >= self._max:
                    del self._k[next(iter(self._k))]   # oldest inserted
            for key in keys:
                n, _ = self._current(key, now)
                self._k[key] = (n + 1, now)

    def success(self, keys) -> None:
        """Forget the counts of `keys` (the user's, not the address's: one
        good account must not reset an address that guesses at others)."""
        with self._lock:
            for key in keys:
                self._k.pop(key, None)
