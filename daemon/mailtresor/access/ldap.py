"""A tenant's LDAP directory: find the user, bind as the user, read roles
and addresses.

Search-then-bind, as every directory login must be:
1. find exactly one entry with the configured filter, the login name escaped
   (RFC 4515, ldap3's escape_filter_chars: "*)(uid=*" matches nobody), over a
   connection bound with the service account (bind_dn) or anonymous;
2. bind as that entry's DN with the password, on a connection of its own
   (an empty password is refused before: an empty simple bind is an
   *anonymous* bind that "succeeds");
3. roles: the groups that list the DN as member/uniqueMember (and memberOf,
   where the directory has it), mapped by the configured group DN -> role;
4. addresses: the configured attributes (mail, proxyAddresses...),
   lower-cased, "smtp:" prefixes stripped, other proxy types dropped.

The search connection stays open between logins (a login then costs about
one TLS handshake and one bind, like a bare bind); the certificate is
verified against ca_file.  Blocking: the API calls it from a thread.
"""

from __future__ import annotations

import logging
import secrets
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import ldap3
from ldap3.core import exceptions as ldap_exc
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import parse_dn

log = logging.getLogger("mailtresor.access.ldap")


class DirectoryUnavailable(Exception):
    """The directory cannot be reached or refuses the service bind; the
    message says why (never a password)."""


@dataclass(frozen=True)
class DirectoryUser:
    dn: str
    name: str
    roles: frozenset[str]
    addresses: frozenset[str]


def normalise_dn(dn: str) -> str:
    """A DN in a form two spellings of one DN share (case, spaces)."""
    try:
        return ",".join(f"{a.lower()}={v.lower()}" for a, v, _ in parse_dn(dn, escape=False, strip=True))
    except ldap_exc.LDAPException:
        return dn.strip().lower()
    except Exception:
        return dn.strip().lower()


def within(dn: str, base: str) -> bool:
    """Whether `dn` is `base` or below it (RDN by RDN, as normalise_dn
    spells them).  Pure."""
    d, b = normalise_dn(dn).split(","), normalise_dn(base).split(",")
    return bool(b) and len(d) >= len(b) and d[len(d) - len(b):] == b


def addresses_from(values) -> set[str]:
    """Mail addresses from attribute values: "smtp:"/"SMTP:" prefixes
    stripped, other proxy address types ("x500:", "sip:") dropped,
    lower-cased; only values that look like local@domain.  Pure."""
    out = set()
    for v in values:
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        v = str(v).strip()
        kind, colon, rest = v.partition(":")
        if colon and "@" not in kind:
            if kind.lower() != "smtp":
                continue
            v = rest
        v = v.strip().lower()
        local, at, domain = v.rpartition("@")
        if at and local and domain and not any(c.isspace() or c in "<>,;" for c in v):
            out.add(v)
    return out


def user_filter(template: str, username: str) -> str:
    """The search filter for `username`, escaped.  Pure."""
    return template.replace("{username}", escape_filter_chars(username))


class Directory:
    """One tenant's directory, from its [tenant.ldap] configuration."""

    def __init__(self, cfg, *, tenant: str = ""):
        self.cfg = cfg
        self.tenant = tenant
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, version=ssl.PROTOCOL_TLS_CLIENT,
                        ca_certs_file=str(cfg.ca_file) if cfg.ca_file else None)
        self.server = ldap3.Server(cfg.url, use_ssl=cfg.url.startswith("ldaps://"), tls=tls,
                                   get_info=ldap3.NONE, connect_timeout=cfg.timeout)
        self._roles = {normalise_dn(dn): role for dn, role in cfg.roles.items()}
        self._group_base = cfg.group_base or cfg.base
        self._lock = threading.Lock()
        self._conn: ldap3.Connection | None = None
        self._attrs = sorted(set(cfg.address_attributes) | {"memberOf"})

    def _service_password(self) -> str | None:
        if not self.cfg.bind_dn:
            return None
        try:
            return Path(self.cfg.bind_password_file).read_text().strip("\r\n")
        except OSError as e:
            raise DirectoryUnavailable(f"tenant {self.tenant}: ldap bind_password_file "
                                       f"{self.cfg.bind_password_file}: {e.strerror or e}") from None

    def _connect(self, user: str | None, password: str | None) -> ldap3.Connection:
        conn = ldap3.Connection(self.server, user=user, password=password,
                                authentication=ldap3.SIMPLE if user else ldap3.ANONYMOUS,
                                receive_timeout=max(1, int(self.cfg.timeout)), raise_exceptions=False,
                                read_only=True, auto_referrals=False)
        conn.open()
        # Each request is one small write answered before the next: without
        # TCP_NODELAY the bind after the handshake waits out the peer's
        # delayed ACK (about 40 ms, most of a login; bench/ldap_login).
        sock = getattr(conn, "socket", None)
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass                        # not TCP (ldapi://): nothing to wait out
        if self.cfg.start_tls and not conn.start_tls():
            # Never carry on in clear: the next thing sent is a password.
            conn.unbind()
            raise DirectoryUnavailable(f"tenant {self.tenant}: directory {self.cfg.url} refused StartTLS")
        return conn

    def _search_conn(self) -> ldap3.Connection:
        """The open service (or anonymous) connection; called with _lock held."""
        if self._conn is not None and not self._conn.closed and self._conn.bound:
            return self._conn
        self._conn = None
        try:
            conn = self._connect(self.cfg.bind_dn or None, self._service_password())
            if not conn.bind():
                desc = conn.result.get("description", "refused") if conn.result else "refused"
                conn.unbind()
                raise DirectoryUnavailable(f"tenant {self.tenant}: the directory refused the "
                                           f"{'service' if self.cfg.bind_dn else 'anonymous'} bind ({desc})")
        except ldap_exc.LDAPException as e:
            raise DirectoryUnavailable(f"tenant {self.tenant}: directory {self.cfg.url}: {e}") from None
        self._conn = conn
        return conn

    def _search(self, base, flt, attrs, scope=ldap3.SUBTREE):
        """Search on the shared connection, reconnecting once if it went away."""
        with self._lock:
            for attempt in (1, 2):
                conn = self._search_conn()
                try:
                    ok = conn.search(base, flt, search_scope=scope, attributes=attrs, size_limit=10)
                except ldap_exc.LDAPException as e:
                    self._drop()
                    if attempt == 2:
                        raise DirectoryUnavailable(f"tenant {self.tenant}: directory search failed: {e}") from None
                    continue
                res = conn.result or {}
                if not ok and res.get("result") not in (0, 4, 32):   # success, size limit, no such object
                    self._drop()
                    if attempt == 2:
                        raise DirectoryUnavailable(f"tenant {self.tenant}: directory search failed: "
                                                   f"{res.get('description')}")
                    continue
                return [e for e in conn.response or () if e.get("type") == "searchResEntry"]
        return []

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.unbind()
            except Exception:
                pass
        self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    def authenticate(self, username: str, password: str) -> DirectoryUser | None:
        """The user, if `username` names exactly one entry and `password`
        binds as it; None otherwise.  Raises DirectoryUnavailable when the
        directory cannot answer (not the user's fault)."""
        if not password or not username or "\x00" in username or "\x00" in password:
            return None                 # empty password = anonymous bind: never "succeeds" here
        found = self._search(self.cfg.base, user_filter(self.cfg.filter, username), self._attrs)
        # An entry outside the base (an alias dereferenced to it, a referral
        # chased by a proxy, a directory that ignores the base) is no user of
        # this tenant: several tenants may share one directory.
        found = [e for e in found if isinstance(e.get("dn"), str) and within(e["dn"], self.cfg.base)]
        if len(found) != 1:
            # Bind as a DN that does not exist, so that an unknown name costs
            # the TLS handshake and bind that a wrong password costs.
            self._bind_ok(f"cn={secrets.token_hex(16)},{self.cfg.base}", password)
            return None
        entry = found[0]
        dn = entry["dn"]
        attrs = entry.get("attributes") or {}
        try:
            conn = self._connect(dn, password)
            try:
                ok = conn.bind()
                groups = set()
                if ok and not self.cfg.bind_dn:
                    groups = self._groups(dn, conn)      # anonymous search: ask as the user
            finally:
                conn.unbind()
        except ldap_exc.LDAPException as e:
            raise DirectoryUnavailable(f"tenant {self.tenant}: directory {self.cfg.url}: {e}") from None
        if not ok:
            return None
        if self.cfg.bind_dn:
            groups = self._groups(dn, None)
        groups |= {normalise_dn(g) for g in _values(attrs.get("memberOf"))}
        roles = set(self.cfg.default_roles) | {self._roles[g] for g in groups if g in self._roles}
        addresses = set()
        for a in self.cfg.address_attributes:
            addresses |= addresses_from(_values(attrs.get(a)))
        return DirectoryUser(dn=dn, name=username, roles=frozenset(roles), addresses=frozenset(addresses))

    def _bind_ok(self, dn: str, password: str) -> bool:
        try:
            conn = self._connect(dn, password)
            try:
                return bool(conn.bind())
            finally:
                conn.unbind()
        except ldap_exc.LDAPException:
            return False

    def _groups(self, dn: str, conn) -> set[str]:
        e = escape_filter_chars(dn)
        flt = f"(|(member={e})(uniqueMember={e}))"
        if conn is None:
            found = self._search(self._group_base, flt, [])
        else:
            conn.search(self._group_base, flt, attributes=[], size_limit=1000)
            found = [x for x in conn.response or () if x.get("type") == "searchResEntry"]
        return {normalise_dn(x["dn"]) for x in found}


def _values(v) -> list:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return list(v)
    return [v]
