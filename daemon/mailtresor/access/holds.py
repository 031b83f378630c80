"""The API section "holds": legal holds and four-eyes deletion requests.

Routes (paths and schemas in openapi-holds.json):

    GET  /api/v1/holds                     lifecycle-read   the tenant's holds
    POST /api/v1/holds                     hold-manage      place one
    GET  /api/v1/holds/{name}              lifecycle-read   one, with what it covers now
    POST /api/v1/holds/{name}/lift         hold-manage      lift it (kept, with the lift)
    GET  /api/v1/deletion-requests         lifecycle-read   the tenant's requests
    POST /api/v1/deletion-requests         deletion-request ask for a deletion
    GET  /api/v1/deletion-requests/{id}    lifecycle-read   one (pending: what would refuse it now)
    POST /api/v1/deletion-requests/{id}/approve  deletion-decide  another auditor: delete, or refused
    POST /api/v1/deletion-requests/{id}/reject   deletion-decide  another auditor, with a reason

Each operation is one function here that checks the role (a missing one
is 403, audited through Api._deny), resolves the tenant (Core.tenant_of:
another tenant's hold or request is "not found"), does the work
(lifecycle/holds.py, requests.py) and writes its audit record; the API's
handlers and the web pages (mailtresor.web.holds) both call these, so the
two cannot drift apart.  A hold's query goes into the trail encrypted
(`terms=`), never in clear.
"""

from __future__ import annotations

from mailtresor.access.api import V1, Answer, HttpError, Route
from mailtresor.access.audit import principal_name
from mailtresor.access.http import member
from mailtresor.lifecycle import holds as holdsmod
from mailtresor.lifecycle import requests as reqmod
from mailtresor.lifecycle.holds import LifecycleError

ROUTES = (
    Route("GET", f"{V1}/holds", "holds", args=("tenant",)),
    Route("POST", f"{V1}/holds", "hold_place"),
    Route("GET", f"{V1}/holds/{{name}}", "hold", args=("tenant",)),
    Route("POST", f"{V1}/holds/{{name}}/lift", "hold_lift", args=("tenant",)),
    Route("GET", f"{V1}/deletion-requests", "deletion_requests", args=("tenant", "state")),
    Route("POST", f"{V1}/deletion-requests", "deletion_request"),
    Route("GET", f"{V1}/deletion-requests/{{id}}", "deletion_request_show", args=("tenant",)),
    Route("POST", f"{V1}/deletion-requests/{{id}}/approve", "deletion_approve", args=("tenant",)),
    Route("POST", f"{V1}/deletion-requests/{{id}}/reject", "deletion_reject", args=("tenant",)),
)

_NEEDS = {
    "lifecycle-read": "seeing holds and deletion requests needs the auditor or administrator role",
    "hold-manage": "placing and lifting legal holds needs the auditor role",
    "deletion-request": "asking for a deletion needs the auditor role",
    "deletion-decide": "deciding on a deletion needs the auditor role",
}
_RESULT = {403: "denied", 404: "not-found"}


# --- the shared steps -----------------------------------------------------------------

def gate(api, who, asked, verb: str, action: str, obj=None):
    """(tenant, lifecycle db) of a call, after the role check (403,
    audited) and the tenant check (another tenant is 404)."""
    core = api._need_core()
    if not who.can(verb):
        tenant = who.tenant if who.tenant is not None else (asked if asked in api.tenant_names else None)
        api._deny(who, tenant, action, obj if isinstance(obj, str) and len(obj) <= 64 else None, _NEEDS[verb])
    tenant = core.tenant_of(who, asked)
    if api.lifecycle is None:
        raise HttpError(503, "the lifecycle database is not available yet")
    return tenant, api.lifecycle


def _audit(api, who, tenant, action, obj, result, *, terms=None, **detail) -> None:
    if api.audit is not None:
        api.audit.append(principal=who, tenant=tenant, action=action, object=obj, result=result,
                         client=who.client, terms=terms or None, detail=detail)


def _audited(api, who, tenant, action, obj, op, fn, *, terms=None):
    """fn(), and an audit record of `action` (op in detail) if it fails
    (a refusal is "denied", a missing object "not-found"); the caller
    writes the record of a success, with what it did."""
    try:
        value = fn()
    except LifecycleError as e:
        _audit(api, who, tenant, action, obj if isinstance(obj, str) and len(obj) <= 64 else None,
               _RESULT.get(e.status, "failed"), terms=terms, op=op, reason=e.audit_reason[:200])
        raise
    except Exception:
        _audit(api, who, tenant, action, obj if isinstance(obj, str) and len(obj) <= 64 else None, "failed",
               terms=terms, op=op)
        raise
    return value


# --- holds ----------------------------------------------------------------------------

def hold_list(api, who, asked) -> dict:
    tenant, db = gate(api, who, asked, "lifecycle-read", "hold")
    return {"tenant": tenant, "holds": holdsmod.listing(db, tenant)}


def hold_show(api, who, asked, name) -> dict:
    tenant, db = gate(api, who, asked, "lifecycle-read", "hold", name)
    return holdsmod.show(db, api._need_core(), tenant, name)


def hold_place(api, who, asked, *, name, reason, query=None, ids=None) -> dict:
    tenant, db = gate(api, who, asked, "hold-manage", "hold", name)
    q = query.strip() if isinstance(query, str) and query.strip() else None
    hold = _audited(api, who, tenant, "hold", name, "place",
                    lambda: holdsmod.place(db, api._need_core(), tenant, by=who.name, name=name, reason=reason,
                                           query=query, ids=ids, now=api.clock()),
                    terms=q if q and len(q) <= holdsmod.MAX_QUERY else None)
    _audit(api, who, tenant, "hold", hold["name"], "ok", terms=hold["query"] or None, op="place",
           ids=len(hold["ids"]), by_query=bool(hold["query"]))
    return holdsmod.public(hold)


def hold_lift(api, who, asked, name, *, reason) -> dict:
    tenant, db = gate(api, who, asked, "hold-manage", "hold", name)
    hold = _audited(api, who, tenant, "hold", name, "lift",
                    lambda: holdsmod.lift(db, api._need_core(), tenant, name, by=who.name, reason=reason,
                                          now=api.clock()))
    _audit(api, who, tenant, "hold", hold["name"], "ok", op="lift", covered=hold["lifted"]["covered"])
    return holdsmod.public(hold)


# --- deletion requests ----------------------------------------------------------------

def request_list(api, who, asked, state=None) -> dict:
    tenant, db = gate(api, who, asked, "lifecycle-read", "deletion-request")
    return {"tenant": tenant, "requests": reqmod.listing(db, tenant, state or None)}


def request_show(api, who, asked, rid) -> dict:
    tenant, db = gate(api, who, asked, "lifecycle-read", "deletion-request", rid)
    return reqmod.show(db, api._need_core(), tenant, rid, api.clock())


def request_create(api, who, asked, *, reason, ids=None, query=None) -> dict:
    tenant, db = gate(api, who, asked, "deletion-request", "deletion-request")
    q = query.strip() if isinstance(query, str) and query.strip() else None
    req = _audited(api, who, tenant, "deletion-request", None, "request",
                   lambda: reqmod.create(db, api._need_core(), tenant, by=who.name, reason=reason, ids=ids,
                                         query=query, now=api.clock()),
                   terms=q if q and len(q) <= holdsmod.MAX_QUERY else None)
    _audit(api, who, tenant, "deletion-request", req["id"], "ok", terms=req["query"] or None, op="request",
           messages=len(req["ids"]), by_query=bool(req["query"]))
    return req


def request_reject(api, who, asked, rid, *, reason) -> dict:
    tenant, db = gate(api, who, asked, "deletion-decide", "deletion-request", rid)
    req = _audited(api, who, tenant, "deletion-request", rid, "reject",
                   lambda: reqmod.reject(db, tenant, rid, by=who.name, reason=reason, now=api.clock()))
    _audit(api, who, tenant, "deletion-request", rid, "ok", op="reject", messages=len(req["ids"]))
    return req


def _decide(api, who, asked, rid):
    tenant, db = gate(api, who, asked, "deletion-decide", "deletion-request", rid)
    req = _audited(api, who, tenant, "deletion-request", rid, "approve",
                   lambda: reqmod.decide(db, api._need_core(), tenant, rid, by=who.name, now=api.clock()))
    if req["state"] == "refused":
        refusals = req["decision"]["refusals"]
        holds = sorted({r["hold"] for rs in refusals.values() for r in rs if r["kind"] == "hold"})
        rules = sorted({r["rule"] for rs in refusals.values() for r in rs if r["kind"] == "minimum"})
        _audit(api, who, tenant, "deletion-request", rid, "ok", op="refuse", messages=len(req["ids"]),
               protected=len(refusals), holds=holds, rules=rules)
    return tenant, db, req


async def request_approve(api, who, asked, rid) -> dict:
    """Approve: refused (nothing deleted) while a hold or minimum covers a
    message; else the messages are deleted through the archiver."""
    from mailtresor.archive.deleter import Victim, delete_messages
    tenant, db, req = await api.run(_decide, api, who, asked, rid)
    if req["state"] == "refused":
        return req
    now = req["decision"]["at"]
    # "by" as the trail names principals (as retention's tombstones do).
    tomb = {"kind": "request", "request": rid, "by": principal_name(who), "reason": req["reason"], "at": now}
    try:
        if api.archiver is None:
            raise HttpError(503, "the archiver is not running: nothing was deleted; approve again later")
        done = await api.archiver.exclusive(delete_messages, tenant, [Victim(a, None, tomb) for a in req["ids"]])
    except Exception as e:
        await api.run(reqmod.undo, db, tenant, rid)
        await api.run(_audit, api, who, tenant, "deletion", rid, "failed", op="request", request=rid,
                      reason=str(getattr(e, "reason", "") or type(e).__name__)[:200])
        await api.run(_audit, api, who, tenant, "deletion-request", rid, "failed", op="approve")
        if isinstance(e, HttpError):
            raise
        raise HttpError(503, "the deletion could not be done (the appliance's log says why); the request is "
                             "pending again") from None
    req = await api.run(reqmod.finish, db, tenant, rid, deleted=len(done.deleted), missing=len(done.missing),
                        now=api.clock())
    await api.run(_audit, api, who, tenant, "deletion", rid, "ok", op="request", request=rid,
                  deleted=len(done.deleted), missing=len(done.missing),
                  months=sorted({m for _, m in done.deleted}))
    await api.run(_audit, api, who, tenant, "deletion-request", rid, "ok", op="approve",
                  messages=len(req["ids"]), deleted=len(done.deleted))
    return req


# --- the handlers ---------------------------------------------------------------------

def _name(c) -> str:
    return c.params["name"]


async def h_holds(api, c) -> Answer:
    return Answer(200, await api.run(hold_list, api, c.who, c.args.get("tenant")))


async def h_hold(api, c) -> Answer:
    return Answer(200, await api.run(hold_show, api, c.who, c.args.get("tenant"), _name(c)))


async def h_hold_place(api, c) -> Answer:
    doc = c.body(required=("name", "reason"), optional=("query", "ids", "tenant"))
    hold = await api.run(hold_place, api, c.who, member(doc, "tenant", str), name=member(doc, "name", str),
                         reason=member(doc, "reason", str), query=member(doc, "query", str),
                         ids=member(doc, "ids", list))
    return Answer(201, hold, headers={b"Location": f"{V1}/holds/{hold['name']}".encode()})


async def h_hold_lift(api, c) -> Answer:
    doc = c.body(required=("reason",))
    return Answer(200, await api.run(hold_lift, api, c.who, c.args.get("tenant"), _name(c),
                                     reason=member(doc, "reason", str)))


async def h_deletion_requests(api, c) -> Answer:
    return Answer(200, await api.run(request_list, api, c.who, c.args.get("tenant"), c.args.get("state")))


async def h_deletion_request(api, c) -> Answer:
    doc = c.body(required=("reason",), optional=("ids", "query", "tenant"))
    req = await api.run(request_create, api, c.who, member(doc, "tenant", str), reason=member(doc, "reason", str),
                        ids=member(doc, "ids", list), query=member(doc, "query", str))
    return Answer(201, req, headers={b"Location": f"{V1}/deletion-requests/{req['id']}".encode()})


async def h_deletion_request_show(api, c) -> Answer:
    return Answer(200, await api.run(request_show, api, c.who, c.args.get("tenant"), c.params["id"]))


async def h_deletion_approve(api, c) -> Answer:
    return Answer(200, await request_approve(api, c.who, c.args.get("tenant"), c.params["id"]))


async def h_deletion_reject(api, c) -> Answer:
    doc = c.body(required=("reason",))
    return Answer(200, await api.run(request_reject, api, c.who, c.args.get("tenant"), c.params["id"],
                                     reason=member(doc, "reason", str)))
