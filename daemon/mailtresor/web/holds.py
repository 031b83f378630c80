"""The pages of legal holds and four-eyes deletion requests.

    /holds                         the tenant's holds; place one (auditors)
    /holds/NAME                    one hold: what it covers now, a search
                                   for it (hold:NAME), lift it (auditors)
    /deletion-requests             the tenant's requests
    /deletion-requests/new         ask for a deletion: ids (typed, from a
                                   message's page, or posted by the search
                                   page's selection) or a query
    /deletion-requests/ID          one request: its messages, what would
                                   refuse it (or refused it), approve or
                                   reject for another auditor

No check is made here that the API does not make: every page calls the
same function as the API's route (mailtresor.access.holds: hold_list,
hold_place, request_approve, ...), which checks the role and the tenant
(another tenant's hold or request is "not found"), applies the four-eyes
rule, does the work and writes the audit record.  What this module adds
is the form handling: post/redirect/get with a fixed confirmation key, a
400 page that keeps what was typed, and not offering the requester the
buttons that would refuse them.
"""

from __future__ import annotations

import time
import urllib.parse

from mailtresor.access import holds as ops
from mailtresor.access.http import HttpError
from mailtresor.web.exports import form_values
from mailtresor.web.i18n import N_

DONE = {
    "placed": N_("The hold was placed."),
    "lifted": N_("The hold was lifted. It stays on record, and its name is not used again."),
    "requested": N_("The deletion was requested. Another auditor must approve or reject it."),
    "approved": N_("The request was approved and the messages were deleted."),
    "refused": N_("The request was refused: a legal hold or a retention minimum covers messages of it. Nothing was deleted."),
    "rejected": N_("The request was rejected."),
}
STATES = {"pending": N_("pending"), "deleting": N_("deleting"), "approved": N_("approved"),
          "rejected": N_("rejected"), "refused": N_("refused")}


def when(t) -> str:
    """Unix time as "YYYY-MM-DD HH:MM UTC" ("" for none).  Pure."""
    if t is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(t)))


def _asked(web, who, value: str | None) -> str | None:
    """The tenant a page is about: an auditor's own; a tenant-less
    principal (the appliance administrator) names one (default: the first)."""
    value = (value or "").strip() or None
    if who.tenant is None and value is None and web.api.tenant_names:
        return web.api.tenant_names[0]
    return value


def _link(path: str, tenant: str | None, **more) -> str:
    args = {k: v for k, v in {"tenant": tenant, **more}.items() if v}
    return path + ("?" + urllib.parse.urlencode(args) if args else "")


def _ids(text: str) -> list[str]:
    """Archive ids typed one per line (or separated by spaces or commas).  Pure."""
    return [t for t in text.replace(",", " ").split() if t]


def _problem(e: Exception) -> str | None:
    """The reason of a 400/409 refusal to show beside the form, or None."""
    if getattr(e, "status", None) in (400, 409) and isinstance(getattr(e, "reason", None), str):
        return e.reason
    return None


# --- holds ----------------------------------------------------------------------------

async def holds(web, request, who, csrf):
    if request.method == b"POST":
        return await _place(web, request, who, csrf)
    q = web.query(request)
    await _holds_page(web, request, who, csrf, _asked(web, who, q.get("tenant")), done=DONE.get(q.get("done", "")))


async def _holds_page(web, request, who, csrf, asked, *, status=200, error=None, entered=None, done=None):
    doc = await web.api.run(ops.hold_list, web.api, who, asked)
    web.render(request, "holds.html", who, csrf, status=status, tenant=doc["tenant"], holds=doc["holds"],
               when=when, error=error, entered=entered or {}, done=done, view="holds",
               tenant_param=doc["tenant"] if who.tenant is None else None)


async def _place(web, request, who, csrf):
    f = web.form(request)
    asked = _asked(web, who, f.get("tenant"))
    entered = {k: f.get(k, "") for k in ("name", "reason", "query", "ids")}
    try:
        hold = await web.api.run(ops.hold_place, web.api, who, asked, name=entered["name"].strip(),
                                 reason=entered["reason"], query=entered["query"] or None,
                                 ids=_ids(entered["ids"]) or None)
    except Exception as e:  # noqa: BLE001 - a 400/409 goes beside the form, the rest to the error page
        reason = _problem(e)
        if reason is None:
            raise
        return await _holds_page(web, request, who, csrf, asked, status=400, error=reason, entered=entered)
    web.redirect(request, _link(f"/holds/{urllib.parse.quote(hold['name'])}", asked if who.tenant is None else None,
                                done="placed"))


async def hold(web, request, who, csrf, name, *, status=200, error=None, entered=None, done=None):
    q = web.query(request)
    asked = _asked(web, who, q.get("tenant"))
    h = await web.api.run(ops.hold_show, web.api, who, asked, name)
    web.render(request, "hold.html", who, csrf, status=status, h=h, when=when, error=error, entered=entered or {},
               done=done or DONE.get(q.get("done", "")), view="holds",
               tenant_param=asked if who.tenant is None else None,
               search_link="/search?" + urllib.parse.urlencode({"q": f"hold:{h['name']}"}))


async def hold_lift(web, request, who, csrf, name):
    f = web.form(request)
    asked = _asked(web, who, f.get("tenant"))
    try:
        await web.api.run(ops.hold_lift, web.api, who, asked, name, reason=f.get("reason", ""))
    except Exception as e:  # noqa: BLE001
        reason = _problem(e)
        if reason is None:
            raise
        return await hold(web, request, who, csrf, name, status=400, error=reason,
                          entered={"reason": f.get("reason", "")})
    web.redirect(request, _link(f"/holds/{urllib.parse.quote(name)}", asked if who.tenant is None else None,
                                done="lifted"))


# --- deletion requests ----------------------------------------------------------------

async def requests(web, request, who, csrf):
    q = web.query(request)
    doc = await web.api.run(ops.request_list, web.api, who, _asked(web, who, q.get("tenant")))
    web.render(request, "requests.html", who, csrf, tenant=doc["tenant"], requests=doc["requests"], when=when,
               states=STATES, view="requests", tenant_param=doc["tenant"] if who.tenant is None else None)


async def request_new(web, request, who, csrf):
    if request.method == b"GET":
        q = urllib.parse.parse_qs(request.uri.partition(b"?")[2].decode("utf-8", "replace"))
        asked = _asked(web, who, (q.get("tenant") or [""])[0])
        return _new_page(web, request, who, csrf, asked, entered={"ids": "\n".join(q.get("id", []))})
    request.content.seek(0)
    fields = form_values(request.content.read())
    asked = _asked(web, who, (fields.get("tenant") or [""])[0])
    ids = [i.strip() for i in fields.get("id", []) if i.strip()]
    if "reason" not in fields:
        # The search page's selection (its export form, another button):
        # the form, filled in, to give the reason and send.
        return _new_page(web, request, who, csrf, asked, entered={"ids": "\n".join(ids)})
    entered = {k: (fields.get(k) or [""])[0] for k in ("reason", "query", "ids")}
    ids = _ids(entered["ids"])
    query = entered["query"].strip()
    try:
        req = await web.api.run(ops.request_create, web.api, who, asked, reason=entered["reason"],
                                ids=ids if ids or not query else None, query=query or None)
    except Exception as e:  # noqa: BLE001
        reason = _problem(e)
        if reason is None:
            raise
        return _new_page(web, request, who, csrf, asked, status=400, error=reason, entered=entered)
    web.redirect(request, _link(f"/deletion-requests/{req['id']}", asked if who.tenant is None else None,
                                done="requested"))


def _new_page(web, request, who, csrf, asked, *, status=200, error=None, entered=None):
    if not who.can("deletion-request"):
        # The API's check, audited, with its reason (the page would only fail on sending).
        ops.gate(web.api, who, asked, "deletion-request", "deletion-request")
    web.render(request, "request_new.html", who, csrf, status=status, error=error, entered=entered or {},
               view="requests", tenant_param=asked if who.tenant is None else None)


async def deletion_request(web, request, who, csrf, rid):
    q = web.query(request)
    asked = _asked(web, who, q.get("tenant"))
    r = await web.api.run(ops.request_show, web.api, who, asked, rid)
    from mailtresor.lifecycle.requests import same_person
    web.render(request, "request.html", who, csrf, r=r, when=when, states=STATES, error=None,
               done=DONE.get(q.get("done", "")), view="requests", own=same_person(r["by"], who.name),
               tenant_param=asked if who.tenant is None else None,
               reasons=sorted(((r.get("decision") or {}).get("refusals") or r.get("would_refuse") or {}).items()))


async def request_decide(web, request, who, csrf, rid, op):
    f = web.form(request)
    asked = _asked(web, who, f.get("tenant"))
    if op == "approve":
        r = await ops.request_approve(web.api, who, asked, rid)
        done = "refused" if r["state"] == "refused" else "approved"
    else:
        try:
            await web.api.run(ops.request_reject, web.api, who, asked, rid, reason=f.get("reason", ""))
        except Exception as e:  # noqa: BLE001
            if _problem(e) is None:
                raise
            raise HttpError(400, _problem(e)) from None
        done = "rejected"
    web.redirect(request, _link(f"/deletion-requests/{rid}", asked if who.tenant is None else None, done=done))


async def request_approve(web, request, who, csrf, rid):
    return await request_decide(web, request, who, csrf, rid, "approve")


async def request_reject(web, request, who, csrf, rid):
    return await request_decide(web, request, who, csrf, rid, "reject")


ROUTES = (
    ("GET POST", r"/holds", holds),
    ("GET", r"/holds/(?P<name>[A-Za-z0-9._-]{1,64})", hold),
    ("POST", r"/holds/(?P<name>[A-Za-z0-9._-]{1,64})/lift", hold_lift),
    ("GET", r"/deletion-requests", requests),
    ("GET POST", r"/deletion-requests/new", request_new),
    ("GET", r"/deletion-requests/(?P<rid>[0-9a-f]{1,64})", deletion_request),
    ("POST", r"/deletion-requests/(?P<rid>[0-9a-f]{1,64})/approve", request_approve),
    ("POST", r"/deletion-requests/(?P<rid>[0-9a-f]{1,64})/reject", request_reject),
)
