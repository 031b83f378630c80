"""Deletion on request, with four eyes (e.g. an erasure under GDPR Art. 17).

One auditor asks for the deletion of messages -- by ids, or by a query
that is resolved to ids when the request is made and shown as such, so the
approver decides on exactly what will go -- with a reason.  Another auditor
(another principal name: the requester cannot approve their own request)
approves or rejects it (a rejection needs a reason).

At approval protect.protections() is asked, under lifecycle.db's lock (so
a hold placed at the same moment is either seen or placed after the
decision): if a hold or a retention minimum covers any of the messages the
request is refused, with the reasons per message, and nothing is deleted.
Otherwise the messages go through the archiver's deleter with a tombstone
{"kind": "request", "request": id, "by": approver, "reason", "at"}.

A request (lifecycle.db "requests", keyed by id):

    {"id", "ids": [...], "query": "" | the query it was made from,
     "reason", "by", "at",
     "state": "pending" | "deleting" | "approved" | "rejected" | "refused",
     "decision": None | {"by", "at", "reason"?, "refusals"?: {aid: [reason]},
                         "deleted"?: n, "missing"?: n}}

"deleting" is the short time between the decision and the deletion's end;
a deletion that fails goes back to "pending" (nothing is lost: the
deleter's steps are each safe to repeat).  A request left "deleting" by a
daemon that stopped mid-way may be approved again after STALE_DELETING
seconds (protections are asked again; what is already gone counts as
missing).  Roles and audit records are the
caller's (access/holds.py).
"""

from __future__ import annotations

from mailtresor.lifecycle import protect
from mailtresor.lifecycle.holds import (MAX_IDS, LifecycleError, check_ids, check_query, check_reason, paths_of,
                                        stored, unknown_error)
from mailtresor.lifecycle.state import new_id

STATES = ("pending", "deleting", "approved", "rejected", "refused")
STALE_DELETING = 3600.0     # seconds after which a "deleting" request counts as interrupted
_ID_CHARS = set("0123456789abcdef")


def same_person(a: str, b: str) -> bool:
    """Whether two principal names are the same person for the four-eyes
    rule (names compare without case: a directory login "Aud" is "aud").  Pure."""
    return a.casefold() == b.casefold()


def public_reasons(refusals: dict) -> dict:
    """protections()' answer as stored and shown: per id, a list of
    {"kind": "hold", "hold"} / {"kind": "minimum", "rule", "name", "until"}."""
    return {aid: [dict(r) for r in reasons] for aid, reasons in sorted(refusals.items())}


def create(db, core, tenant: str, *, by: str, reason, ids=None, query=None, now: float) -> dict:
    """A pending request; its query (if any) resolved to ids now.
    LifecycleError 400: no reason, neither or both of ids and query, a bad
    query, unknown ids (listed, bounded), nothing matched, too many."""
    reason = check_reason(reason)
    if (ids is None) == (query is None):
        raise LifecycleError(400, "give either \"ids\" or \"query\"")
    paths = paths_of(core, tenant)
    if query is not None:
        query = check_query(query)
        if not query:
            raise LifecycleError(400, "the query is empty: a request by query must name what it deletes")
        found = sorted(protect.matching(paths, query))
        if len(found) > MAX_IDS:
            raise LifecycleError(400, f"the query matches {len(found)} messages: at most {MAX_IDS} in one request")
        if not found:
            raise LifecycleError(400, "the query matches no message")
        ids = found
    else:
        ids = check_ids(ids)
        if not ids:
            raise LifecycleError(400, "name at least one message")
        missing = sorted(set(ids) - stored(paths, ids))
        if missing:
            raise unknown_error(missing)
        query = ""
    req = {"id": new_id(), "ids": ids, "query": query, "reason": reason, "by": by, "at": now,
           "state": "pending", "decision": None}

    def add(section):
        section["requests"][req["id"]] = req
    db.change(tenant, add)
    return req


def get(db, tenant: str, rid) -> dict:
    """One request; LifecycleError 404 (also a malformed id, another tenant's)."""
    if not isinstance(rid, str) or not 1 <= len(rid) <= 64 or not set(rid) <= _ID_CHARS:
        raise LifecycleError(404, "no such deletion request")
    req = db.section(tenant)["requests"].get(rid)
    if req is None:
        raise LifecycleError(404, "no such deletion request")
    return req


def would_refuse(db, core, tenant: str, req: dict, now: float) -> dict:
    """What would refuse the request now: {aid: [reasons]} ({} = nothing)."""
    return public_reasons(protect.protections(paths_of(core, tenant), db.section(tenant), now, req["ids"]))


def show(db, core, tenant: str, rid, now: float) -> dict:
    """A request; while pending, with "would_refuse" (what covers its
    messages now)."""
    req = get(db, tenant, rid)
    if req["state"] == "pending":
        req = {**req, "would_refuse": would_refuse(db, core, tenant, req, now)}
    return req


def listing(db, tenant: str, state: str | None = None) -> list[dict]:
    """The tenant's requests, newest first, without their id lists (a
    count instead)."""
    if state is not None and state not in STATES:
        raise LifecycleError(400, f"state must be one of {', '.join(STATES)}")
    out = []
    for r in sorted(db.section(tenant)["requests"].values(), key=lambda r: (-(r.get("at") or 0), r["id"])):
        if state is None or r["state"] == state:
            out.append({k: v for k, v in r.items() if k != "ids"} | {"count": len(r["ids"])})
    return out


def _pending(section: dict, rid: str, now: float | None = None) -> dict:
    """The request, if it may be decided: pending, or (`now` given: an
    approval) left "deleting" for longer than STALE_DELETING."""
    req = section["requests"].get(rid)
    if req is None:
        raise LifecycleError(404, "no such deletion request")
    stale = (now is not None and req["state"] == "deleting"
             and now - ((req.get("decision") or {}).get("at") or 0) > STALE_DELETING)
    if req["state"] != "pending" and not stale:
        raise LifecycleError(409, f"the request is {req['state']}, not pending")
    return req


def check_decider(req: dict, by: str, what: str) -> None:
    """The four-eyes rule: LifecycleError 403 when the requester decides."""
    if same_person(req["by"], by):
        raise LifecycleError(403, f"four eyes: {by} asked for this deletion and cannot {what} it; "
                                  "another auditor must decide")


def reject(db, tenant: str, rid, *, by: str, reason, now: float) -> dict:
    """Reject a pending request (reason required; not by its requester)."""
    reason = check_reason(reason, "a reason for the rejection")
    get(db, tenant, rid)

    def mark(section):
        req = _pending(section, rid)
        check_decider(req, by, "reject")
        req["state"] = "rejected"
        req["decision"] = {"by": by, "at": now, "reason": reason}
        return req
    return db.change(tenant, mark)


def decide(db, core, tenant: str, rid, *, by: str, now: float) -> dict:
    """The approval's decision, under lifecycle.db's lock: the request
    becomes "refused" (decision.refusals per message: what covers it) or
    "deleting" (the caller deletes, then finish()).  Returns the request.
    LifecycleError 403 (the requester), 404, 409 (not pending)."""
    get(db, tenant, rid)
    paths = paths_of(core, tenant)

    def mark(section):
        req = _pending(section, rid, now)
        check_decider(req, by, "approve")
        refusals = protect.protections(paths, section, now, req["ids"])
        if refusals:
            req["state"] = "refused"
            req["decision"] = {"by": by, "at": now, "refusals": public_reasons(refusals)}
        else:
            req["state"] = "deleting"
            req["decision"] = {"by": by, "at": now}
        return req
    return db.change(tenant, mark)


def finish(db, tenant: str, rid: str, *, deleted: int, missing: int, now: float) -> dict:
    """The deletion of an approved request is done: "approved", with counts."""
    def mark(section):
        req = section["requests"][rid]
        req["state"] = "approved"
        req["decision"] = {**(req.get("decision") or {}), "deleted": deleted, "missing": missing, "done": now}
        return req
    return db.change(tenant, mark)


def undo(db, tenant: str, rid: str) -> dict:
    """The deletion failed: the request is pending again (to be decided again)."""
    def mark(section):
        req = section["requests"][rid]
        req["state"] = "pending"
        req["decision"] = None
        return req
    return db.change(tenant, mark)
