"""The retention pages: a tenant's rules, adding and changing one with a
preview first, removing one, and the dry run.

    GET  /retention                      the rules (lifecycle-read); auditors also
                                         get the form for a new rule
    GET  /retention/rules/<id>           a rule's change form (auditors)
    POST /retention/preview              the candidate rule -> exactly what the dry
                                         run would delete and keep, and why; "Save"
    POST /retention/save                 the rule saved (added, or <id> changed)
    GET  /retention/rules/<id>/remove    confirmation; POST removes it
    GET  /retention/dry-run              the dry run now (auditors; audited)

No check is made here that the API does not make: every page calls the
same function as the API's route (mailtresor.access.retention: the role,
the tenant -- another tenant's rule is "not found" --, the validation, the
audit record).  What this module adds is the form handling: CSRF on every
POST (site.py checks it before any handler; checked again here), the
preview step before any save (the Save form carries the previewed rule as
it was previewed), post/redirect/get with a fixed confirmation key, and a
400 page that keeps what was typed.  Who may only read (an administrator)
sees the rules and no form.  No JavaScript.
"""

from __future__ import annotations

import time
import urllib.parse

from mailtresor.access import retention as ops
from mailtresor.access.http import HttpError
from mailtresor.web.i18n import N_

DONE = {
    "added": N_("The rule was saved. The next retention run applies it to all mail."),
    "changed": N_("The rule was changed. The next retention run applies it to all mail."),
    "removed": N_("The rule was removed."),
}
BASIS_LABELS = {"date": N_("the message's date (its Date: header)"),
                "arrival": N_("its arrival in the archive")}
LIST_FIELDS = (("senders", N_("Senders (addresses or domains, one a line)")),
               ("recipients", N_("Recipients (addresses or domains, one a line)")),
               ("tags", N_("Tags (one a line)")),
               ("flags", N_("Flags (one a line)")))
FORM_FIELDS = ("name", "basis", "minimum", "maximum", "query") + tuple(k for k, _ in LIST_FIELDS)


def when(t) -> str:
    """A unix time as a UTC date for the tables."""
    return time.strftime("%Y-%m-%d", time.gmtime(float(t))) if t else ""


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in (text or "").replace(",", "\n").splitlines() if ln.strip()]


def _tenant(web, who, value: str | None) -> str | None:
    """A tenant's principal: theirs (a different name is passed on for the
    API's check to refuse); the appliance administrator: the one named, else
    the first."""
    value = (value or "").strip()
    if who.tenant is not None:
        return value or who.tenant
    return value or (web.api.tenant_names[0] if web.api.tenant_names else None)


def _tenant_choices(web, who):
    return [] if who.tenant is not None else [(t, t) for t in web.api.tenant_names]


def rule_doc(f: dict) -> dict:
    """A rule's fields as the API takes them, from the form.  Pure."""
    match = {k: _lines(f.get(k, "")) for k, _ in LIST_FIELDS}
    match = {k: v for k, v in match.items() if v}
    if f.get("query", "").strip():
        match["query"] = f["query"].strip()
    return {"name": f.get("name", ""), "basis": f.get("basis", "date") or "date", "match": match,
            "minimum": f.get("minimum", "").strip() or None, "maximum": f.get("maximum", "").strip() or None}


def entered_of(rule: dict) -> dict:
    """A rule (or a rule_doc) as the form's values.  Pure."""
    m = rule.get("match") or {}
    out = {"name": rule.get("name") or "", "basis": rule.get("basis") or "date",
           "minimum": rule.get("minimum") or "", "maximum": rule.get("maximum") or "",
           "query": m.get("query") or ""}
    for k, _ in LIST_FIELDS:
        out[k] = "\n".join(m.get(k) or [])
    return out


def _refusal(e: Exception) -> str | None:
    if getattr(e, "status", None) == 400 and isinstance(getattr(e, "reason", None), str):
        return e.reason
    return None


def _render(web, request, who, csrf, template, **kw):
    web.render(request, template, who, csrf, basis_labels=BASIS_LABELS, list_fields=LIST_FIELDS, when=when,
               **kw)


# --- the rules ------------------------------------------------------------------------------

async def rules(web, request, who, csrf):
    q = web.query(request)
    tenant = _tenant(web, who, q.get("tenant"))
    await _rules_page(web, request, who, csrf, tenant, done=DONE.get(q.get("done", "")))


async def _rules_page(web, request, who, csrf, tenant, *, status=200, error=None, entered=None, done=None):
    doc = await web.api.run(ops.rules_list, web.api, who, tenant)
    _render(web, request, who, csrf, "retention.html", status=status, tenant=doc["tenant"], rules=doc["rules"],
            tenants=_tenant_choices(web, who), manage=who.can("retention-manage"), error=error,
            entered=entered or entered_of({}), done=done)


async def rule(web, request, who, csrf, rid):
    q = web.query(request)
    tenant = _tenant(web, who, q.get("tenant"))
    found = await web.api.run(ops.rule_get, web.api, who, tenant, rid)
    if not who.can("retention-manage"):
        raise HttpError(403, N_("changing retention rules needs the auditor role"))
    _render(web, request, who, csrf, "retention_rule.html", tenant=tenant, rule=found, entered=entered_of(found))


async def _form_page(web, request, who, csrf, tenant, rid, *, error, entered):
    """The form again, with what was typed and why it was refused (400)."""
    if rid:
        found = await web.api.run(ops.rule_get, web.api, who, tenant, rid)
        return _render(web, request, who, csrf, "retention_rule.html", status=400, tenant=tenant, rule=found,
                       entered=entered, error=error)
    return await _rules_page(web, request, who, csrf, tenant, status=400, error=error, entered=entered)


async def preview(web, request, who, csrf):
    f = web.form(request)
    web.check_csrf(f, csrf)
    tenant = _tenant(web, who, f.get("tenant"))
    rid = f.get("id", "").strip() or None
    doc = rule_doc(f)
    try:
        got = await web.api.run(ops.rule_preview, web.api, who, tenant, doc, rid)
    except Exception as e:  # noqa: BLE001 - a refusal is shown beside the form
        error = _refusal(e)
        if error is None:
            raise
        return await _form_page(web, request, who, csrf, tenant, rid, error=error, entered=entered_of(doc))
    # The Save form carries the rule exactly as previewed (normalised).
    _render(web, request, who, csrf, "retention_preview.html", tenant=got["tenant"], rid=rid,
            candidate=got["candidate"], entered=entered_of(got["candidate"]), plan=got["preview"])


async def save(web, request, who, csrf):
    f = web.form(request)
    web.check_csrf(f, csrf)
    tenant = _tenant(web, who, f.get("tenant"))
    rid = f.get("id", "").strip() or None
    doc = rule_doc(f)
    try:
        if rid:
            await web.api.run(ops.rule_change, web.api, who, tenant, rid, doc)
        else:
            await web.api.run(ops.rule_add, web.api, who, tenant, doc)
    except Exception as e:  # noqa: BLE001 - a refusal is shown beside the form
        error = _refusal(e)
        if error is None:
            raise
        return await _form_page(web, request, who, csrf, tenant, rid, error=error, entered=entered_of(doc))
    web.redirect(request, "/retention?" + urllib.parse.urlencode({"tenant": tenant or "",
                                                                   "done": "changed" if rid else "added"}))


async def remove(web, request, who, csrf, rid):
    if request.method == b"POST":
        f = web.form(request)
        web.check_csrf(f, csrf)
        tenant = _tenant(web, who, f.get("tenant"))
        await web.api.run(ops.rule_remove, web.api, who, tenant, rid)
        return web.redirect(request, "/retention?" + urllib.parse.urlencode({"tenant": tenant or "",
                                                                             "done": "removed"}))
    tenant = _tenant(web, who, web.query(request).get("tenant"))
    found = await web.api.run(ops.rule_get, web.api, who, tenant, rid)
    if not who.can("retention-manage"):
        raise HttpError(403, N_("changing retention rules needs the auditor role"))
    _render(web, request, who, csrf, "retention_remove.html", tenant=tenant, rule=found)


async def dry_run(web, request, who, csrf):
    tenant = _tenant(web, who, web.query(request).get("tenant"))
    report = await ops.run(web.api, who, tenant, dry_run=True)
    _render(web, request, who, csrf, "retention_dry_run.html", tenant=report["tenant"], plan=report,
            tenants=_tenant_choices(web, who))


ROUTES = (
    ("GET", r"/retention", rules),
    ("POST", r"/retention/preview", preview),
    ("POST", r"/retention/save", save),
    ("GET", r"/retention/dry-run", dry_run),
    ("GET", r"/retention/rules/(?P<rid>[0-9a-f]{1,64})", rule),
    ("GET POST", r"/retention/rules/(?P<rid>[0-9a-f]{1,64})/remove", remove),
)
