"""Legal holds: what a case needs kept, kept, until an auditor lifts it.

A hold has a name (the case: [A-Za-z0-9._-]{1,64}, unique in its tenant
for ever), a search query and/or a list of archive ids, a reason, who
placed it and when (the shape is lifecycle/protect.py's).  It is not
stamped on anything: protect.held() evaluates its query whenever a
deletion is about to happen, so mail that arrives after the hold was
placed and matches its query is covered too.

Lifting keeps the hold with a "lifted" record (who, when, why, how many
messages it covered then): the evidence of a case needs to show that a
hold existed and who ended it.  For the same reason a lifted hold's name
cannot be used again -- a new hold under the old name would make the
lift look as if it never happened.

Everything here is blocking (lifecycle.db, Xapian) and pure of roles:
the callers (access/holds.py, the API's and the web's one way in) check
who may do it, resolve the tenant and write the audit record.  Problems
are LifecycleError with an HTTP status and a reason naming the problem.
"""

from __future__ import annotations

import re

import xapian

from mailtresor.archive import index
from mailtresor.lifecycle import protect

NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
AID = re.compile(r"[0-9a-f]{40}")
MAX_IDS = 10_000            # ids one hold (or one deletion request) names
MAX_QUERY = 4096            # characters of a hold's query (as a search's)
MAX_REASON = 2000           # characters of a reason
SHOWN_UNKNOWN = 10          # unknown ids named in an error


class LifecycleError(Exception):
    """A hold or request operation that cannot be done: `status` (400,
    403, 404, 409) and `reason` naming the problem (the API's and the
    web's error handling show it as it is)."""

    def __init__(self, status: int, reason: str, audit_reason: str | None = None):
        super().__init__(reason)
        self.status, self.reason = status, reason
        # What the audit record says: a bad query's reason quotes the query,
        # which the trail keeps only encrypted (as the core's BadQuery).
        self.audit_reason = audit_reason or reason


def check_name(name) -> str:
    """A hold's name as given; LifecycleError 400 otherwise.  Pure."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise LifecycleError(400, "a hold's name is 1 to 64 letters, digits, '.', '_' or '-' (the case, "
                                  "e.g. \"case-2026-017\")")
    return name


def check_reason(reason, what: str = "a reason") -> str:
    """A required free-text reason, stripped; LifecycleError 400.  Pure."""
    if not isinstance(reason, str) or not reason.strip():
        raise LifecycleError(400, f"{what} is required")
    reason = reason.strip()
    if len(reason) > MAX_REASON:
        raise LifecycleError(400, f"{what} is over {MAX_REASON} characters")
    if any(ord(c) < 0x20 and c not in "\n\t" for c in reason):
        raise LifecycleError(400, f"{what} has control characters")
    return reason


def check_query(query) -> str:
    """A hold's (or request's) query, stripped ("" = none); it must parse
    (index.parse_query, without hold: -- a hold is not defined by another);
    LifecycleError 400 naming the problem.  Pure."""
    if query is None:
        return ""
    if not isinstance(query, str):
        raise LifecycleError(400, "the query must be a string")
    query = query.strip()
    if len(query) > MAX_QUERY:
        raise LifecycleError(400, f"the query is over {MAX_QUERY} characters")
    if query:
        def nested(_name):
            raise index.QueryError("a hold's query cannot name a hold (hold:...): name the mail itself")
        try:
            index.parse_query(query, resolvers={"hold": nested})
        except index.QueryError as e:
            raise LifecycleError(400, f"bad query: {e}", "bad query") from None
    return query


def check_ids(ids) -> list[str]:
    """Archive ids as given (lower-cased, de-duplicated, in order);
    LifecycleError 400 for anything that is not one.  Pure."""
    if ids is None:
        return []
    if not isinstance(ids, list):
        raise LifecycleError(400, "\"ids\" must be a list of archive ids")
    if len(ids) > MAX_IDS:
        raise LifecycleError(400, f"at most {MAX_IDS} ids at once")
    out = []
    for i in ids:
        if not isinstance(i, str) or not AID.fullmatch(i.strip().lower()):
            raise LifecycleError(400, f"{str(i)[:80]!r} is not an archive id (40 hex digits)")
        out.append(i.strip().lower())
    return list(dict.fromkeys(out))


def paths_of(core, tenant: str) -> list[str]:
    """The tenant's shard indexes (every month), read under the core's
    store lock."""
    with core._store_lock:
        if not core.store.has_archive(tenant):
            return []
        return core.store.index_paths(tenant, core.store.months(tenant, check=False))


def stored(paths, ids: list[str]) -> set[str]:
    """Which of `ids` the tenant's indexes hold."""
    return set(protect.matching(paths, "", aids=ids)) if ids else set()


def unknown_error(unknown: list[str]) -> LifecycleError:
    shown = ", ".join(sorted(unknown)[:SHOWN_UNKNOWN])
    more = f" and {len(unknown) - SHOWN_UNKNOWN} more" if len(unknown) > SHOWN_UNKNOWN else ""
    return LifecycleError(400, f"{len(unknown)} id(s) are not messages of this tenant: {shown}{more}")


def covered(paths, hold: dict) -> set[str]:
    """The stored messages the hold would cover now (lifted or not): its
    ids that are still stored and every match of its query."""
    out = stored(paths, list(hold.get("ids") or []))
    if (hold.get("query") or "").strip():
        out |= set(protect.matching(paths, hold["query"]))
    return out


def hold_query(hold: dict | None) -> xapian.Query:
    """The search query `hold:NAME` stands for: its ids OR its query;
    nothing for a lifted hold (it covers nothing any more)."""
    if hold is None or hold.get("lifted"):
        return xapian.Query.MatchNothing
    parts = [xapian.Query(t) for t in (index._term(index.PREFIXES["aid"], a) for a in hold.get("ids") or [])
             if t]
    if (hold.get("query") or "").strip():
        parts.append(index.parse_query(hold["query"]))
    if not parts:
        return xapian.Query.MatchNothing
    return xapian.Query(xapian.Query.OP_OR, parts)


def public(hold: dict, covers: int | None = None) -> dict:
    """A hold as the API shows it (times as unix seconds, as stored)."""
    out = {"name": hold["name"], "query": hold.get("query") or "", "ids": list(hold.get("ids") or []),
           "reason": hold.get("reason") or "", "by": hold.get("by") or "", "at": hold.get("at"),
           "lifted": hold.get("lifted")}
    if covers is not None:
        out["covers"] = covers
    return out


# --- the operations (roles and audit are the caller's) ---------------------------------

def place(db, core, tenant: str, *, by: str, name, reason, query=None, ids=None, now: float) -> dict:
    """Place a hold; the new hold.  LifecycleError 400 (bad name, reason,
    query, ids; unknown ids listed, bounded) or 409 (the name exists, or
    existed)."""
    name = check_name(name)
    reason = check_reason(reason)
    query = check_query(query)
    ids = check_ids(ids)
    if not query and not ids:
        raise LifecycleError(400, "a hold needs a query, ids, or both")
    if ids:
        missing = sorted(set(ids) - stored(paths_of(core, tenant), ids))
        if missing:
            raise unknown_error(missing)
    hold = {"name": name, "query": query, "ids": ids, "reason": reason, "by": by, "at": now, "lifted": None}

    def add(section):
        old = section["holds"].get(name)
        if old is not None:
            raise LifecycleError(409, f"the hold {name!r} was lifted; a lifted hold's name is not used again"
                                 if old.get("lifted") else f"there is already a hold named {name!r}")
        section["holds"][name] = hold
    db.change(tenant, add)
    return hold


def get(db, tenant: str, name) -> dict:
    """One hold of the tenant; LifecycleError 404 (also for a malformed name)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise LifecycleError(404, "no such hold")
    hold = db.section(tenant)["holds"].get(name)
    if hold is None:
        raise LifecycleError(404, "no such hold")
    return hold


def show(db, core, tenant: str, name) -> dict:
    """One hold with "covers": how many stored messages it covers now (0
    once lifted; the lift record keeps the count at the time)."""
    hold = get(db, tenant, name)
    n = 0 if hold.get("lifted") else len(covered(paths_of(core, tenant), hold))
    return public(hold, n)


def listing(db, tenant: str) -> list[dict]:
    """The tenant's holds, active first, newest first within each."""
    holds = db.section(tenant)["holds"].values()
    return [public(h) for h in sorted(holds, key=lambda h: (bool(h.get("lifted")), -(h.get("at") or 0),
                                                            h["name"]))]


def lift(db, core, tenant: str, name, *, by: str, reason, now: float) -> dict:
    """Lift a hold: kept, with {"by", "at", "reason", "covered"}; the lifted
    hold.  LifecycleError 400 (no reason), 404, 409 (already lifted)."""
    reason = check_reason(reason)
    hold = get(db, tenant, name)
    if hold.get("lifted"):
        raise LifecycleError(409, f"the hold {name!r} is already lifted")
    n = len(covered(paths_of(core, tenant), hold))

    def mark(section):
        h = section["holds"].get(name)
        if h is None:
            raise LifecycleError(404, "no such hold")
        if h.get("lifted"):
            raise LifecycleError(409, f"the hold {name!r} is already lifted")
        h["lifted"] = {"by": by, "at": now, "reason": reason, "covered": n}
        return h
    return db.change(tenant, mark)


def names_on(db, core, tenant: str, aid: str) -> list[str]:
    """The active holds that cover one message (the message view)."""
    holds = db.section(tenant)["holds"]
    if not any(not h.get("lifted") for h in holds.values()):
        return []
    return sorted(protect.held(paths_of(core, tenant), holds, {aid}).get(aid, []))
