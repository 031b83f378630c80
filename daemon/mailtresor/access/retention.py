"""The API's retention section: a tenant's rules, the preview, the run.

    GET    /api/v1/retention/rules          lifecycle-read (auditors, admins)
    POST   /api/v1/retention/rules          retention-manage (auditors): a rule; the
                                            answer has the preview of what it deletes now
    PUT    /api/v1/retention/rules/{id}     retention-manage
    DELETE /api/v1/retention/rules/{id}     retention-manage
    POST   /api/v1/retention/preview        retention-manage: a candidate rule, not saved
    POST   /api/v1/retention/run            retention-manage: {"tenant", "dry_run"}

Each operation is one function here that checks (the role first, a
refusal audited by Api._deny; then the tenant through the core's
tenant_of: another tenant's rule is "not found"), validates
(lifecycle/retention.py), changes lifecycle.db and writes the one audit
record ("retention-rule" with op add/change/remove/preview, the rule's
query in the encrypted terms, never in the detail; "retention" for a run).
The API's handlers and the web pages (mailtresor.web.retention) both call
them, so the two cannot drift apart.

A preview runs a query over the tenant's mail and answers with message
ids: it needs retention-manage (an auditor), not lifecycle-read, so an
administrator who reads no mail cannot probe it with queries.
"""

from __future__ import annotations

import re

from mailtresor.lifecycle import retention

from .api import Answer, Call, HttpError, Route, V1, member

_RULE_ID = re.compile(r"[0-9a-f]{1,64}")
BUSY = "a retention run for this tenant is under way; try again when it has finished"

ROUTES = (
    Route("GET", f"{V1}/retention/rules", "retention_rules", args=("tenant",)),
    Route("POST", f"{V1}/retention/rules", "retention_rule_add"),
    Route("PUT", f"{V1}/retention/rules/{{id}}", "retention_rule_change", args=("tenant",)),
    Route("DELETE", f"{V1}/retention/rules/{{id}}", "retention_rule_remove", args=("tenant",)),
    Route("POST", f"{V1}/retention/preview", "retention_preview"),
    Route("POST", f"{V1}/retention/run", "retention_run"),
)

RULE_FIELDS = ("name", "basis", "match", "minimum", "maximum")


# --- checks ---------------------------------------------------------------------------------

def need_db(api):
    if api.lifecycle is None:
        raise HttpError(503, "the lifecycle database is not available yet")
    return api.lifecycle


def tenant_for(api, who, asked, verb: str, action: str, obj: str) -> str:
    """The tenant of a call, checked: the role first (a 403, audited), then
    the tenant (an auditor only their own: another is 404; a local
    principal or the appliance administrator names one)."""
    if asked is not None and not isinstance(asked, str):
        raise HttpError(400, "tenant must be a name")
    if not who.can(verb):
        reason = ("retention rules are for auditors and administrators" if verb == "lifecycle-read"
                  else "changing retention rules and running retention needs the auditor role")
        api._deny(who, who.tenant if who.tenant is not None else (asked if asked in api.tenant_names else None),
                  action, obj, reason)
    tenant = api._need_core().tenant_of(who, asked or None)
    need_db(api)
    return tenant


def rule_id(value: str) -> str:
    if not _RULE_ID.fullmatch(value or ""):
        raise HttpError(404, "no such rule")
    return value


def fields_of(doc) -> dict:
    """A rule's fields from a body (HttpError 400 naming the problem)."""
    if not isinstance(doc, dict):
        raise HttpError(400, "a rule is a JSON object")
    try:
        return retention.validate({k: doc[k] for k in RULE_FIELDS if k in doc})
    except retention.RuleError as e:
        raise HttpError(400, str(e)) from None


def _audit(api, who, tenant, obj: str, op: str, rule: dict, result: str = "ok") -> None:
    if api.audit is None:
        return
    q = retention.query_of(rule)
    api.audit.append(principal=who, tenant=tenant, action="retention-rule", object=obj, result=result,
                     client=who.client, terms=q or None,
                     detail={"op": op, "name": rule.get("name", "")[:retention.MAX_NAME],
                             "basis": rule.get("basis"), "minimum": rule.get("minimum"),
                             "maximum": rule.get("maximum")})


def _paths(api, tenant):
    return retention.Context.of(api).paths(tenant)


# --- the operations (blocking: call them in the API's pool) ------------------------------

def rules_list(api, who, tenant) -> dict:
    tenant = tenant_for(api, who, tenant, "lifecycle-read", "retention-rule", "rules")
    return {"tenant": tenant, "rules": retention.rules_of(api.lifecycle.section(tenant))}


def rule_get(api, who, tenant, rid) -> dict:
    """One rule (for the web's change form); 404 if not the tenant's."""
    tenant = tenant_for(api, who, tenant, "lifecycle-read", "retention-rule", f"rule:{rid}")
    try:
        return retention.public(retention.get_rule(api.lifecycle.section(tenant), rule_id(rid)))
    except retention.RuleMissing:
        raise HttpError(404, "no such rule") from None


def rule_add(api, who, tenant, doc, *, now=None) -> dict:
    now = api.clock() if now is None else now
    tenant = tenant_for(api, who, tenant, "retention-manage", "retention-rule", "rule:(new)")
    fields = fields_of(doc)
    try:
        rule = retention.add_rule(api.lifecycle, tenant, fields, retention.who_name(who), now)
    except retention.RuleError as e:
        raise HttpError(400, str(e)) from None
    _audit(api, who, tenant, f"rule:{rule['id']}", "add", rule)
    sec = api.lifecycle.section(tenant)
    return {"rule": retention.public(rule), "preview": _preview_of(api, tenant, sec, rule, now)}


def rule_change(api, who, tenant, rid, doc, *, now=None) -> dict:
    now = api.clock() if now is None else now
    rid = rule_id(rid)
    tenant = tenant_for(api, who, tenant, "retention-manage", "retention-rule", f"rule:{rid}")
    fields = fields_of(doc)
    try:
        _old, rule = retention.change_rule(api.lifecycle, tenant, rid, fields, retention.who_name(who), now)
    except retention.RuleMissing:
        raise HttpError(404, "no such rule") from None
    _audit(api, who, tenant, f"rule:{rid}", "change", rule)
    sec = api.lifecycle.section(tenant)
    return {"rule": retention.public(rule), "preview": _preview_of(api, tenant, sec, rule, now)}


def rule_remove(api, who, tenant, rid) -> dict:
    rid = rule_id(rid)
    tenant = tenant_for(api, who, tenant, "retention-manage", "retention-rule", f"rule:{rid}")
    try:
        old = retention.remove_rule(api.lifecycle, tenant, rid)
    except retention.RuleMissing:
        raise HttpError(404, "no such rule") from None
    _audit(api, who, tenant, f"rule:{rid}", "remove", old)
    return {"removed": rid}


def _preview_of(api, tenant, section, rule, now, rid=None) -> dict:
    fields = {k: rule.get(k) for k in RULE_FIELDS}
    return retention.preview(_paths(api, tenant), section, fields, now, rid=rid or rule.get("id"))


def rule_preview(api, who, tenant, doc, rid=None, *, now=None) -> dict:
    """What the dry run would delete and keep if this rule were saved (as
    a new one, or in place of rule `rid`).  Audited: it runs a query."""
    now = api.clock() if now is None else now
    tenant = tenant_for(api, who, tenant, "retention-manage", "retention-rule", f"rule:{rid or '(new)'}")
    fields = fields_of(doc)
    sec = api.lifecycle.section(tenant)
    if rid is not None:
        rid = rule_id(rid)
        if rid not in sec["rules"]:
            raise HttpError(404, "no such rule")
    _audit(api, who, tenant, f"rule:{rid or '(new)'}", "preview", fields)
    return {"tenant": tenant, "candidate": fields,
            "preview": retention.preview(_paths(api, tenant), sec, fields, now, rid=rid)}


async def run(api, who, tenant, *, dry_run: bool) -> dict:
    """A retention run (or dry run) of the tenant, now, as `who`."""
    tenant = await api.run(tenant_for, api, who, tenant, "retention-manage", "retention", "run")
    if not dry_run:
        if api.archiver is None:
            raise HttpError(503, "the archiver is not running: nothing can be deleted")
        if api.archiver.paused:
            raise HttpError(503, "archiving is paused (the store cannot take writes): "
                                 "retention runs when it has resumed")
    try:
        return await retention.run(retention.Context.of(api), tenant, who, dry_run=dry_run, now=api.clock(),
                                   client=who.client)
    except retention.RunBusy:
        raise HttpError(409, BUSY) from None


# --- the handlers ---------------------------------------------------------------------------

def _body(c: Call) -> dict:
    return c.body(optional=("tenant", "id") + RULE_FIELDS)


async def h_retention_rules(api, c: Call) -> Answer:
    return Answer(200, await api.run(rules_list, api, c.who, c.args.get("tenant")))


async def h_retention_rule_add(api, c: Call) -> Answer:
    doc = _body(c)
    return Answer(201, await api.run(rule_add, api, c.who, member(doc, "tenant", str), doc))


async def h_retention_rule_change(api, c: Call) -> Answer:
    doc = _body(c)
    return Answer(200, await api.run(rule_change, api, c.who, c.args.get("tenant") or member(doc, "tenant", str),
                                     c.params["id"], doc))


async def h_retention_rule_remove(api, c: Call) -> Answer:
    return Answer(200, await api.run(rule_remove, api, c.who, c.args.get("tenant"), c.params["id"]))


async def h_retention_preview(api, c: Call) -> Answer:
    doc = _body(c)
    return Answer(200, await api.run(rule_preview, api, c.who, member(doc, "tenant", str), doc,
                                     member(doc, "id", str)))


async def h_retention_run(api, c: Call) -> Answer:
    doc = c.body(optional=("tenant", "dry_run"))
    dry = member(doc, "dry_run", bool)
    if dry is None:
        # No default: a forgotten field must neither delete mail nor
        # pretend to have run.
        raise HttpError(400, "give \"dry_run\": true (list what would go) or false (delete it)")
    return Answer(200, await run(api, c.who, member(doc, "tenant", str), dry_run=dry))

