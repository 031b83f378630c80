"""Local users: argon2id password hashes, roles, addresses, a TOTP second
factor and single-use recovery codes, in one encrypted file (sealed.py).

Users belong to a tenant; tenant None is the appliance administrator's
namespace (role "appliance-admin" only).  Nothing secret leaves this module
in clear except what the operator must see once: the otpauth URI and the
recovery codes at `totp_enable` (the command), the recovery codes at
`totp_set` and `new_recovery_codes` (the web UI's account page, which holds
a candidate secret in memory until a code proves the app has it).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import argon2
import pyotp

from mailtresor.access.principal import ROLES
from mailtresor.access.sealed import SealedFile, StoreError  # noqa: F401  (StoreError is part of this module's API)

_AAD = b"mailtresor access users v1"
_CODE = re.compile(r"[0-9]{6}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024                   # argon2 takes any length; a megabyte "password" is an attack
RECOVERY_CODES = 10
TOTP_ISSUER = "mailtresor"
APPLIANCE = ""                        # the document's key for tenant None (no tenant name is empty)

# argon2-cffi's defaults for argon2id (Debian 12's 21.1: t=2, m=100 MiB,
# p=8; about 0.1-0.4 s a verify on a small appliance).  check_needs_rehash
# upgrades stored hashes when a newer library raises them.
_hasher = argon2.PasswordHasher()
# Verified against for a user who does not exist, so that an unknown name
# costs what a wrong password costs (auth.py).
DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))
# Password checks running at once, in this process.  Each takes the hash's
# memory (100 MiB) and its lanes: logins from many addresses at once (each
# within its throttle) must queue, not take the appliance's memory.
VERIFY_SLOTS = 2
_verify_slots = threading.BoundedSemaphore(VERIFY_SLOTS)


class UserError(ValueError):
    """A request the database refuses (unknown user, bad name, weak password…);
    the message names the problem and never holds a secret."""


@dataclass(frozen=True)
class User:
    tenant: str | None
    name: str
    roles: frozenset[str]
    addresses: frozenset[str]
    disabled: bool
    totp: bool                          # a second factor is enabled
    recovery_left: int
    created: str

    def public(self) -> dict:
        """What `list` shows (no hash, no TOTP secret)."""
        return {"tenant": self.tenant, "name": self.name, "roles": sorted(self.roles),
                "addresses": sorted(self.addresses), "disabled": self.disabled, "totp": self.totp,
                "recovery_codes_left": self.recovery_left, "created": self.created}


def verify_password(stored_hash: str, password: str) -> bool:
    """argon2 verify; False (never an exception) for a wrong password or a
    malformed hash.  Every password check in access/ goes through here (tests
    count the calls)."""
    with _verify_slots:
        try:
            return _hasher.verify(stored_hash, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHash):
            return False


def dummy_verify(password: str) -> None:
    """The cost of a password check, for a name that has no user."""
    verify_password(DUMMY_HASH, password)


def hash_recovery(code: str) -> str:
    # Recovery codes are 80 random bits: a fast hash is enough (no dictionary
    # to try), and the file around it is encrypted anyway.
    return hashlib.sha256(_norm_code(code).encode()).hexdigest()


def _norm_code(code: str) -> str:
    return code.replace("-", "").replace(" ", "").lower()


def new_recovery_code() -> str:
    raw = "".join(secrets.choice("abcdefghjkmnpqrstuvwxyz23456789") for _ in range(16))
    return "-".join(raw[i:i + 4] for i in range(0, 16, 4))


def new_totp_secret() -> str:
    """A new TOTP secret (160 bits, base32), not stored anywhere yet."""
    return pyotp.random_base32(32)


def totp_uri(tenant: str | None, name: str, secret: str) -> str:
    """The otpauth:// URI an authenticator app takes (issuer "mailtresor",
    account "name@tenant").  Pure."""
    label = name if tenant is None else f"{name}@{tenant}"
    return pyotp.TOTP(secret).provisioning_uri(name=label, issuer_name=TOTP_ISSUER)


def totp_step(secret: str, code: str, now: float, *, after: int = 0) -> int | None:
    """The time step (±1 step of 30 s around `now`) whose code is CODE and
    that is later than `after` (the last step used), or None.  The one
    check of a TOTP code: logins (check_totp) and enrolment use it.  Pure."""
    code = (code or "").strip().replace(" ", "")
    if not _CODE.fullmatch(code):
        return None
    totp = pyotp.TOTP(secret)
    step = int(now // totp.interval)
    for s in (step - 1, step, step + 1):
        if s > after and secrets.compare_digest(totp.at(s * totp.interval), code):
            return s
    return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise UserError(f"invalid user name {name!r}: letters, digits, '.', '_', '@', '+', '-', "
                        "starting with a letter or digit, at most 128")
    return name


def check_password(password: str) -> str:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise UserError(f"the password is too short (at least {MIN_PASSWORD} characters)")
    if len(password) > MAX_PASSWORD:
        raise UserError(f"the password is too long (at most {MAX_PASSWORD} characters)")
    return password


def check_roles(tenant: str | None, roles) -> frozenset[str]:
    roles = frozenset(roles)
    bad = roles - set(ROLES)
    if bad:
        raise UserError(f"unknown role(s) {', '.join(sorted(bad))} (roles: {', '.join(ROLES)})")
    if not roles:
        raise UserError("a user needs at least one role")
    if tenant is None and roles != {"appliance-admin"}:
        raise UserError("an appliance administrator (no tenant) has the role appliance-admin and no other")
    if tenant is not None and "appliance-admin" in roles:
        raise UserError("appliance-admin is not a tenant role (add the user without a tenant)")
    return roles


def check_addresses(addresses) -> frozenset[str]:
    out = set()
    for a in addresses:
        a = a.strip().lower()
        local, at, domain = a.rpartition("@")
        if not at or not local or not domain or any(c.isspace() or c in "<>,;" for c in a):
            raise UserError(f"{a!r} is not a mail address (local@domain)")
        out.add(a)
    return frozenset(out)


class UserDB:
    """The local users of every tenant, in `path`, encrypted under `key`
    (32 bytes, derived from the control key named "access")."""

    def __init__(self, path: Path, key: bytes, *, clock=time.time):
        self._file = SealedFile(path, key, _AAD, lambda: {"version": 1, "users": {}})
        self.path = self._file.path
        self._clock = clock
        self._listeners: list = []

    def on_change(self, fn) -> None:
        """Call fn(tenant, name, change) after a user is disabled, removed,
        given a new password, new roles or addresses, or a new second
        factor (change: "disable", "remove", "passwd", "update", "totp").
        The API registers `lambda t, n, c: sessions.drop_user(t, n)` so that
        no open session outlives the change; a listener that raises does
        not undo the change (it is written already)."""
        self._listeners.append(fn)

    def _changed(self, tenant: str | None, name: str, change: str) -> None:
        for fn in list(self._listeners):
            try:
                fn(tenant, name, change)
            except Exception:  # noqa: BLE001 - see on_change
                pass

    # --- reading ---

    def _rec(self, data: dict, tenant: str | None, name: str) -> dict | None:
        return data["users"].get(tenant or APPLIANCE, {}).get(name)

    def _need(self, data: dict, tenant: str | None, name: str) -> dict:
        rec = self._rec(data, tenant, name)
        if rec is None:
            where = f"tenant {tenant!r}" if tenant else "the appliance"
            raise UserError(f"no user {name!r} in {where}")
        return rec

    @staticmethod
    def _user(tenant, name, rec) -> User:
        return User(tenant=tenant, name=name, roles=frozenset(rec["roles"]),
                    addresses=frozenset(rec["addresses"]), disabled=rec["disabled"],
                    totp=rec.get("totp") is not None, recovery_left=len(rec.get("recovery", [])),
                    created=rec["created"])

    def get(self, tenant: str | None, name: str) -> User | None:
        rec = self._rec(self._file.load(), tenant, name)
        return None if rec is None else self._user(tenant, name, rec)

    def password_hash(self, tenant: str | None, name: str) -> str | None:
        rec = self._rec(self._file.load(), tenant, name)
        return None if rec is None else rec["hash"]

    def list(self, tenant: str | None) -> list[User]:
        users = self._file.load()["users"].get(tenant or APPLIANCE, {})
        return [self._user(tenant, n, r) for n, r in sorted(users.items())]

    # --- changing ---

    def add(self, tenant: str | None, name: str, password: str, roles, addresses=()) -> User:
        check_name(name)
        check_password(password)
        roles = check_roles(tenant, roles)
        addresses = check_addresses(addresses)
        h = _hasher.hash(password)              # outside the lock: it takes a while

        def do(data):
            users = data["users"].setdefault(tenant or APPLIANCE, {})
            if name in users:
                raise UserError(f"user {name!r} exists already")
            users[name] = {"hash": h, "roles": sorted(roles), "addresses": sorted(addresses),
                           "disabled": False, "created": _now(), "totp": None, "recovery": []}
            return self._user(tenant, name, users[name])
        return self._file.modify(do)

    def passwd(self, tenant: str | None, name: str, password: str) -> None:
        check_password(password)
        h = _hasher.hash(password)

        def do(data):
            self._need(data, tenant, name)["hash"] = h
        self._file.modify(do)
        self._changed(tenant, name, "passwd")

    def set_disabled(self, tenant: str | None, name: str, disabled: bool) -> None:
        def do(data):
            self._need(data, tenant, name)["disabled"] = bool(disabled)
        self._file.modify(do)
        if disabled:
            self._changed(tenant, name, "disable")

    def disable(self, tenant: str | None, name: str) -> None:
        self.set_disabled(tenant, name, True)

    def enable(self, tenant: str | None, name: str) -> None:
        self.set_disabled(tenant, name, False)

    def update(self, tenant: str | None, name: str, *, roles=None, addresses=None) -> User:
        roles = None if roles is None else check_roles(tenant, roles)
        addresses = None if addresses is None else check_addresses(addresses)

        def do(data):
            rec = self._need(data, tenant, name)
            if roles is not None:
                rec["roles"] = sorted(roles)
            if addresses is not None:
                rec["addresses"] = sorted(addresses)
            return self._user(tenant, name, rec)
        user = self._file.modify(do)
        self._changed(tenant, name, "update")
        return user

    def remove(self, tenant: str | None, name: str) -> None:
        def do(data):
            self._need(data, tenant, name)
            del data["users"][tenant or APPLIANCE][name]
        self._file.modify(do)
        self._changed(tenant, name, "remove")

    def rehash(self, tenant: str | None, name: str, password: str) -> None:
        """Re-hash a password that verified against a hash with older
        parameters (argon2's check_needs_rehash)."""
        current = self.password_hash(tenant, name)
        if current is None or not _hasher.check_needs_rehash(current):
            return
        h = _hasher.hash(password)

        def do(data):
            rec = self._rec(data, tenant, name)
            if rec is not None and rec["hash"] == current:
                rec["hash"] = h
        self._file.modify(do)

    # --- second factor ---

    def totp_enable(self, tenant: str | None, name: str) -> tuple[str, list[str]]:
        """A new TOTP secret and RECOVERY_CODES new recovery codes (any old
        ones are replaced); returns (otpauth URI, recovery codes): shown once.
        The command's way (it shows the URI at once); the web UI enrols in
        two steps (new_totp_secret, then totp_set once a code proves the
        app has it)."""
        secret = new_totp_secret()
        codes = self.totp_set(tenant, name, secret)
        return totp_uri(tenant, name, secret), codes

    def totp_set(self, tenant: str | None, name: str, secret: str, *, last_step: int = 0) -> list[str]:
        """Store SECRET as the user's TOTP secret with RECOVERY_CODES new
        recovery codes (old secret and codes replaced); the codes, to be
        shown once.  `last_step`: the step of a code already used to prove
        the secret (from totp_step), so that code cannot log in again."""
        pyotp.TOTP(secret).now()             # a malformed secret fails here, before anything is written
        codes = [new_recovery_code() for _ in range(RECOVERY_CODES)]

        def do(data):
            rec = self._need(data, tenant, name)
            rec["totp"] = {"secret": secret, "last_step": int(last_step)}
            rec["recovery"] = [hash_recovery(c) for c in codes]
        self._file.modify(do)
        self._changed(tenant, name, "totp")
        return codes

    def new_recovery_codes(self, tenant: str | None, name: str) -> list[str]:
        """RECOVERY_CODES new recovery codes for a user with TOTP on; the old
        ones stop working.  UserError if the user has no second factor."""
        codes = [new_recovery_code() for _ in range(RECOVERY_CODES)]

        def do(data):
            rec = self._need(data, tenant, name)
            if rec.get("totp") is None:
                raise UserError(f"user {name!r} has no second factor")
            rec["recovery"] = [hash_recovery(c) for c in codes]
        self._file.modify(do)
        self._changed(tenant, name, "totp")
        return codes

    def totp_disable(self, tenant: str | None, name: str) -> None:
        def do(data):
            rec = self._need(data, tenant, name)
            rec["totp"] = None
            rec["recovery"] = []
        self._file.modify(do)
        self._changed(tenant, name, "totp")

    def check_totp(self, tenant: str | None, name: str, code: str) -> bool:
        """True once for a current code (±1 step of 30 s); the step is then
        recorded so the same code (or an older one) is refused afterwards."""
        if not _CODE.fullmatch((code or "").strip().replace(" ", "")):
            return False                # no lock, no file read for what cannot be a code
        now = self._clock()

        def do(data):
            rec = self._rec(data, tenant, name)
            if rec is None or rec.get("totp") is None:
                raise _NoChange(False)
            t = rec["totp"]
            s = totp_step(t["secret"], code, now, after=t["last_step"])
            if s is None:
                raise _NoChange(False)
            t["last_step"] = s
            return True
        return self._modify_maybe(do)

    def use_recovery(self, tenant: str | None, name: str, code: str) -> bool:
        """True once per recovery code; the code is struck off."""
        if not code or len(_norm_code(code)) != 16:
            return False
        h = hash_recovery(code)

        def do(data):
            rec = self._rec(data, tenant, name)
            if rec is None:
                raise _NoChange(False)
            for i, stored in enumerate(rec.get("recovery", [])):
                if secrets.compare_digest(stored, h):
                    del rec["recovery"][i]
                    return True
            raise _NoChange(False)
        return self._modify_maybe(do)

    def _modify_maybe(self, fn):
        """modify() that writes nothing when fn raises _NoChange (a wrong code
        is not worth an fsync)."""
        try:
            return self._file.modify(fn)
        except _NoChange as e:
            return e.value


class _NoChange(Exception):
    def __init__(self, value):
        super().__init__()
        self.value = value
