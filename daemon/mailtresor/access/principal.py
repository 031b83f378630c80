"""Who is asking: the principal every access decision is made for.

A Principal is made by a login (local user or LDAP), an API token, or the
peer credentials of the daemon's local socket, and is immutable from then
on.  `can()` answers the role table; the access core (mailtresor.access.core)
is the one place that applies it, together with the tenant and address
scope."""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("user", "auditor", "admin", "appliance-admin")
SCOPES = ("events", "search", "export")          # what an API token may be issued for

# verb -> roles that grant it; token scopes are mapped in can().
_ROLE_VERBS = {
    "read-own": {"user"},
    "read-tenant": {"auditor"},
    "export": {"user", "auditor"},
    "audit-read": {"auditor"},
    "events": {"auditor"},
    "manage-users": {"admin", "appliance-admin"},
    "manage-tokens": {"admin", "appliance-admin"},
    "manage-tenants": {"appliance-admin"},
}
_SCOPE_VERBS = {
    "read-tenant": {"search", "export"},
    "export": {"export"},
    "events": {"events"},
}
VERBS = tuple(_ROLE_VERBS)


@dataclass(frozen=True)
class Principal:
    kind: str                                   # "user" | "token" | "local"
    name: str                                   # login name; token id; "uid=0" for local
    tenant: str | None                          # None: appliance administrator or local
    roles: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()        # tokens only
    addresses: frozenset[str] = frozenset()     # lower-cased; what role "user" may read
    client: str = ""                            # for the audit trail

    def __post_init__(self):
        if self.kind not in ("user", "token", "local"):
            raise ValueError(f"unknown principal kind {self.kind!r}")
        bad = set(self.roles) - set(ROLES)
        if bad:
            raise ValueError(f"unknown role(s): {', '.join(sorted(bad))}")
        bad = set(self.scopes) - set(SCOPES)
        if bad:
            raise ValueError(f"unknown token scope(s): {', '.join(sorted(bad))}")

    def can(self, verb: str) -> bool:
        """Whether the role table grants `verb` (see VERBS).  The local
        principal (root or the daemon's user on the appliance) acts as
        auditor and administrator of the tenant it names; the tenant and
        address scope is the access core's to check."""
        if verb not in _ROLE_VERBS:
            raise ValueError(f"unknown verb {verb!r}")
        if self.kind == "local":
            return verb != "read-own"
        if self.kind == "token":
            return bool(self.scopes & _SCOPE_VERBS.get(verb, set()))
        return bool(self.roles & _ROLE_VERBS[verb])

    @property
    def label(self) -> str:
        """How the audit trail names this principal."""
        where = f"@{self.tenant}" if self.tenant else ""
        return f"{self.kind}:{self.name}{where}"
