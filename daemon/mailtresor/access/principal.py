"""Who is asking: the principal every access-layer call carries, and the role table.

A Principal is built by the Authenticator (password or LDAP login, API token)
or by the API for a unix-socket peer (kind "local"); the access core asks
``can()`` and checks the tenant itself.  The table here is the one place that
says which role may do what.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("user", "auditor", "admin", "appliance-admin")
SCOPES = ("events", "search", "export")  # API token scopes

KINDS = ("user", "token", "local")

# What each verb needs.  A principal may do `what` if one of its roles is in
# the role set, or (tokens) one of its scopes is in the scope set.
#   read-own      a user's own mail (one of `addresses` on the envelope or in
#                 From/To/Cc/Bcc); the core applies the address filter.
#   read-tenant   the whole tenant, read-only.
#   export        start an export job: auditors and export-scoped tokens over
#                 the whole tenant; users over their own mail (the core
#                 narrows a principal without read-tenant to read-own).
#   audit-read    /audit.
#   events        /events (the SOC's pull).
#   manage-users, manage-tokens   admins of the tenant; the appliance
#                 administrator for any tenant (incl. creating tenant admins).
#   lifecycle-read   see the tenant's retention rules, holds, deletion
#                 requests and evidence (auditors and admins: an admin must
#                 see why mail goes, though not the mail).
#   retention-manage add, change, remove retention rules and run the job by
#                 hand: auditors (the compliance officer's decision; every
#                 change is previewed and audited).
#   hold-manage   place and lift legal holds: auditors only.
#   deletion-request, deletion-decide   four-eyes deletion: one auditor asks,
#                 another decides (the core refuses the same principal).
#   tag-case      auditors' case tags on messages (the stored message is
#                 unchanged; the tag is metadata).
#   gdpr          subject access / portability exports and Art. 30 records
#                 for the tenant: auditors.
# admin and appliance-admin read no mail unless they are also auditors: they
# are in no read row.
_TABLE: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "read-own": (frozenset({"user"}), frozenset()),
    "read-tenant": (frozenset({"auditor"}), frozenset({"search", "export"})),
    "export": (frozenset({"user", "auditor"}), frozenset({"export"})),
    "audit-read": (frozenset({"auditor"}), frozenset()),
    "events": (frozenset({"auditor"}), frozenset({"events"})),
    "manage-users": (frozenset({"admin", "appliance-admin"}), frozenset()),
    "manage-tokens": (frozenset({"admin", "appliance-admin"}), frozenset()),
    "manage-tenants": (frozenset({"appliance-admin"}), frozenset()),
    "lifecycle-read": (frozenset({"auditor", "admin", "appliance-admin"}), frozenset()),
    "retention-manage": (frozenset({"auditor"}), frozenset()),
    "hold-manage": (frozenset({"auditor"}), frozenset()),
    "deletion-request": (frozenset({"auditor"}), frozenset()),
    "deletion-decide": (frozenset({"auditor"}), frozenset()),
    "tag-case": (frozenset({"auditor"}), frozenset()),
    "gdpr": (frozenset({"auditor"}), frozenset()),
}
VERBS = tuple(_TABLE)

# A local principal (root or the daemon's user on the unix socket) acts as
# auditor + admin of the tenant named in the request.
LOCAL_ROLES = frozenset({"auditor", "admin"})


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    kind: "user" (password/LDAP login) | "token" | "local" (unix socket peer).
    name: login name; token id; "uid=0" for local.
    tenant: None for the appliance administrator or a local principal.
    roles: subset of ROLES (tokens: empty).  scopes: tokens only, subset of SCOPES.
    addresses: lower-cased mail addresses (role "user").
    client: the client address for the audit trail.
    """

    kind: str
    name: str
    tenant: str | None
    roles: frozenset[str]
    scopes: frozenset[str] = frozenset()
    addresses: frozenset[str] = frozenset()
    client: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"principal kind {self.kind!r}: must be one of {', '.join(KINDS)}")
        bad = set(self.roles) - set(ROLES)
        if bad:
            raise ValueError(f"unknown role(s) {', '.join(sorted(bad))}")
        bad = set(self.scopes) - set(SCOPES)
        if bad:
            raise ValueError(f"unknown scope(s) {', '.join(sorted(bad))}")
        # Coerce to frozensets so callers may pass sets/lists and equality holds.
        for f in ("roles", "scopes", "addresses"):
            v = getattr(self, f)
            if not isinstance(v, frozenset):
                object.__setattr__(self, f, frozenset(v))

    @property
    def effective_roles(self) -> frozenset[str]:
        """The roles the table is checked against (local principals act as auditor + admin)."""
        if self.kind == "local":
            return self.roles | LOCAL_ROLES
        return self.roles

    def can(self, what: str) -> bool:
        """Whether the role table lets this principal do `what` (one of VERBS).

        Only the verb: the tenant (nobody crosses tenants) and, for
        "read-own", the address filter are the access core's to apply.
        """
        try:
            roles, scopes = _TABLE[what]
        except KeyError:
            raise ValueError(f"unknown verb {what!r}: must be one of {', '.join(VERBS)}") from None
        if self.kind == "token":
            return bool(self.scopes & scopes)
        return bool(self.effective_roles & roles)
