"""Who is this?  Password (local or LDAP) and TOTP logins, API tokens.

One generic failure for everything a guesser could learn from ("wrong user
name, password or code"), and the same work for an unknown user as for a
wrong password: a name with no local user (and no directory to ask) costs
an argon2 verify against a dummy hash.

TOTP trade-off: a login without a code for a user who has TOTP enabled
fails with ``needs_totp=True`` so that the client can ask for the code -
but only once the password was right.  That tells whoever has the password
that it is right (and that TOTP is on); without it a client could not know
to ask for a code.  The second factor is what still stands then, and wrong
codes count as failures for throttling like wrong passwords.
"""

from __future__ import annotations

import logging
import time
import unicodedata

from mailtresor.access import users as usersmod
from mailtresor.access.principal import Principal
from mailtresor.access.sessions import Throttle, Throttled  # noqa: F401  (Throttled is part of this module's API)

log = logging.getLogger("mailtresor.access.auth")

GENERIC = "wrong user name, password or code"
MAX_NAME = 256


def throttle_client(client: str) -> str:
    """The form of a client address its throttle counter is kept under: an
    IPv6 address by its /64 (one host is given a whole /64 and picks any
    address in it: per address, each would get the free failures anew), an
    IPv4-mapped one as IPv4; anything else as it is.  Pure."""
    import ipaddress
    try:
        ip = ipaddress.ip_address(client.strip("[]"))
    except ValueError:
        return client
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


def throttle_name(name: str) -> str:
    """The form of a user name its throttle counter is kept under: every
    spelling a directory takes for the same entry counts together.  LDAP
    matches uid with insignificant spaces removed, case folded and Unicode
    compatibility-normalised ("Alice", " alice ", "ａｌｉｃｅ" are one
    user), so each of them being a counter of its own would let a guesser
    try 5 passwords per spelling.  Pure."""
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


class LoginFailed(Exception):
    """A login or token was refused.  The message is always GENERIC;
    `needs_totp` is True only when the password was right and the second
    factor is missing."""

    def __init__(self, needs_totp: bool = False, *, unavailable: bool = False):
        super().__init__(GENERIC)
        self.needs_totp = needs_totp
        # The tenant's directory could not answer (logged with the reason):
        # not the user's fault, so not counted against them.
        self.unavailable = unavailable
        self.reason = GENERIC


class Authenticator:
    """Logins against a tenant's local users, else its LDAP directory; tokens.

    `cfg` is the whole configuration (its [access] numbers and the tenants'
    [tenant.ldap] tables).  `directories` may map tenant -> ldap.Directory
    (tests, the benchmark); otherwise they are built from the configuration
    when first needed.
    """

    def __init__(self, cfg, users: "usersmod.UserDB", tokens, clock=time.time, *, directories=None):
        self.cfg = cfg
        self.users = users
        self.tokens = tokens
        self._clock = clock
        a = cfg.access
        self.throttle = Throttle(failures=a.throttle_failures, window=a.throttle_window,
                                 base=a.throttle_base, max_delay=a.throttle_max_delay, clock=clock)
        self._tenants = {t.name: t for t in cfg.tenant}
        self._dirs = dict(directories or {})

    def directory(self, tenant: str):
        d = self._dirs.get(tenant)
        if d is None:
            t = self._tenants.get(tenant)
            if t is None or t.ldap is None:
                return None
            from mailtresor.access.ldap import Directory
            d = self._dirs[tenant] = Directory(t.ldap, tenant=tenant)
        return d

    def login(self, *, tenant: str | None, username: str, password: str, totp: str | None,
              client: str) -> Principal:
        """A Principal for a right user name, password (and code); else
        LoginFailed, or Throttled when this name or address must wait."""
        name = username if isinstance(username, str) else ""
        if len(name) > MAX_NAME:
            name = name[:MAX_NAME] + "\x00"      # no user has it; bounds the throttle key
        password = password if isinstance(password, str) else ""
        user_key, keys = self._throttle_keys(tenant, name, client)
        self.throttle.check(keys)
        try:
            p = self._login(tenant, name, password, totp, client)
        except LoginFailed as e:
            if not (e.needs_totp or e.unavailable):   # a right password without its code is no guess
                self.throttle.failure(keys)
            raise
        self.throttle.success((user_key,))
        return p

    @staticmethod
    def _throttle_keys(tenant, name, client) -> tuple[str, tuple[str, str]]:
        # Throttle keys: the name case-folded (so "Alice" and "alice" count
        # together), and the client address.
        user_key = f"user:{tenant or ''}/{throttle_name(name)}"
        return user_key, (user_key, f"addr:{throttle_client(client if isinstance(client, str) else '')}")

    def reauthenticate(self, principal: Principal, password: str, totp: str | None = None) -> None:
        """Check again, for a change to the account (a new password, the
        second factor), that the logged-in local user knows the password
        (and, when `totp` is given, a current TOTP code or a recovery code,
        as at login).  The same counters as login(): a wrong password here
        counts against the name and the client address, and a throttled
        name or address must wait here too, so the account page guesses no
        faster than the login form.  LoginFailed (generic) or Throttled;
        None when right.  A recovery code given as `totp` is struck off."""
        name, tenant = principal.name, principal.tenant
        password = password if isinstance(password, str) else ""
        user_key, keys = self._throttle_keys(tenant, name, principal.client)
        self.throttle.check(keys)
        stored = self.users.password_hash(tenant, name) if principal.kind == "user" else None
        checkable = stored is not None and bool(password) and len(password) <= usersmod.MAX_PASSWORD
        ok = checkable and usersmod.verify_password(stored, password)
        if not checkable:
            usersmod.dummy_verify(password[:usersmod.MAX_PASSWORD])     # the same cost either way
        if ok and totp is not None:
            ok = self.users.check_totp(tenant, name, totp) or self.users.use_recovery(tenant, name, totp)
        if not ok:
            self.throttle.failure(keys)
            raise LoginFailed()
        self.throttle.success((user_key,))

    def _login(self, tenant, name, password, totp, client) -> Principal:
        if len(password) > usersmod.MAX_PASSWORD or (tenant is not None and tenant not in self._tenants):
            usersmod.dummy_verify(password[:usersmod.MAX_PASSWORD])
            raise LoginFailed()
        stored = self.users.password_hash(tenant, name) if name else None
        if stored is None:
            d = self.directory(tenant) if tenant is not None else None
            if d is None:
                usersmod.dummy_verify(password)
                raise LoginFailed()
            return self._ldap_login(d, tenant, name, password, client)
        if not password or not usersmod.verify_password(stored, password):
            if not password:
                usersmod.dummy_verify(password)
            raise LoginFailed()
        user = self.users.get(tenant, name)
        if user is None or user.disabled:
            raise LoginFailed()
        if user.totp:
            if not totp:
                raise LoginFailed(needs_totp=True)
            if not (self.users.check_totp(tenant, name, totp) or self.users.use_recovery(tenant, name, totp)):
                raise LoginFailed()
        self.users.rehash(tenant, name, password)
        return Principal(kind="user", name=name, tenant=tenant, roles=user.roles,
                         addresses=user.addresses, client=client)

    def _ldap_login(self, d, tenant, name, password, client) -> Principal:
        from mailtresor.access.ldap import DirectoryUnavailable
        try:
            found = d.authenticate(name, password)
        except DirectoryUnavailable as e:
            log.warning("login to tenant %s: %s", tenant, e)
            raise LoginFailed(unavailable=True) from None
        if found is None:
            raise LoginFailed()
        return Principal(kind="user", name=name, tenant=tenant, roles=found.roles,
                         addresses=found.addresses, client=client)

    def still_valid(self, principal: Principal) -> bool:
        """Whether a session's principal may still act: for a local user,
        that the user still exists, is not disabled and has the roles and
        addresses the session was opened with (users.db is re-read when it
        changed: `mailtresor user disable` in another process counts at
        once).  The API asks this on every request made with a session
        cookie and drops the session when it is False; in this process,
        UserDB.on_change() ends the sessions at once (Sessions.drop_user).
        A directory user keeps the session until its timeouts."""
        if principal.kind != "user":
            return True
        if self.users.password_hash(principal.tenant, principal.name) is None:
            return principal.tenant is not None and self.directory(principal.tenant) is not None
        user = self.users.get(principal.tenant, principal.name)
        return (user is not None and not user.disabled and user.roles == principal.roles
                and user.addresses == principal.addresses)

    def token(self, secret: str, client: str) -> Principal:
        """The Principal of a valid API token; LoginFailed for an unknown,
        malformed, revoked or expired one."""
        t = self.tokens.check(secret)
        if t is None:
            raise LoginFailed()
        return Principal(kind="token", name=t.id, tenant=t.tenant, roles=frozenset(), scopes=t.scopes,
                         client=client)


def open_databases(cfg, fetch) -> tuple["usersmod.UserDB", "TokenDB"]:
    """users.db and tokens.db in [access] directory, under the key derived
    from the control key "access"; `fetch(name, version)` -> KeyMaterial
    (keys.control_fetcher(cfg) in the CLI, the daemon's fetcher there)."""
    from mailtresor import config as configmod
    from mailtresor.access.sealed import ACCESS_KEY_NAME, ACCESS_KEY_VERSION, file_key
    from mailtresor.access.tokens import TokenDB
    key = file_key(fetch(ACCESS_KEY_NAME, ACCESS_KEY_VERSION).key)
    d = configmod.access_directory(cfg)
    return usersmod.UserDB(d / "users.db", key), TokenDB(d / "tokens.db", key)
