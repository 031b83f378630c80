"""The API's GDPR and evidence section: subject access, Art. 30 records, evidence.

    POST /api/v1/gdpr/subject-access   {"address", "format": "zip"|"mbox", "tenant"?}
                                       -> 202 {"export": job | null, "messages", "report"}
    GET  /api/v1/gdpr/records          ?tenant=   -> the Art. 30 record (JSON)
    GET  /api/v1/evidence              ?tenant=&verify=1   -> the evidence document

Subject access and the records need the "gdpr" verb (auditors); evidence
"lifecycle-read" (auditors and administrators: it shows no mail).  Another
tenant is 404 (core.tenant_of), a missing role 403 (audited as denied).
Each call is one audit record: action "gdpr" (op "subject-access" or
"records"; the address only in the record's encrypted terms) or
"evidence".  The subject access export is an ordinary export job of the
caller's (GET /api/v1/exports/{id}, .../download), its zip carrying the
report (report.json, report.txt, report.html) beside the messages.

The blocking functions (subject_access, records_doc, evidence_doc) are
what the web pages call too (web/gdpr.py), in the API's pool.
"""

from __future__ import annotations

import threading

from mailtresor.access.api import V1, Answer, Call, Route
from mailtresor.access.http import HttpError, bool_arg, member

FORMATS = ("zip", "mbox")

ROUTES = (
    Route("POST", f"{V1}/gdpr/subject-access", "gdpr_subject_access"),
    Route("GET", f"{V1}/gdpr/records", "gdpr_records", args=("tenant",)),
    Route("GET", f"{V1}/evidence", "evidence", args=("tenant", "verify")),
)

_verify_lock = threading.Lock()         # one verification at a time per process


def _lifecycle(api):
    if api.lifecycle is None:
        raise HttpError(503, "the lifecycle database is not available yet")
    return api.lifecycle


def _audited(api, who, verb: str, action: str, op: str | None, asked, fn, *, terms_of=None):
    """Check the role, resolve the tenant, run fn(core, tenant) -> (value,
    detail) and write the one audit record of the call (also when it fails:
    denied, not-found, failed).  `terms_of(tenant)` -> what goes into the
    record's encrypted terms."""
    core = api._need_core()
    base = {"op": op} if op else {}
    if not who.can(verb):
        api._deny(who, who.tenant, action, op or action,
                  "subject access and records of processing need the auditor role" if verb == "gdpr"
                  else "evidence needs the auditor or administrator role")
    tenant = who.tenant
    try:
        tenant = core.tenant_of(who, asked)
        value, detail = fn(core, tenant)
    except Exception as e:
        status = getattr(e, "status", 500)
        result = {403: "denied", 404: "not-found"}.get(status, "failed")
        known = tenant if tenant is not None and core._tenant_ok(tenant) else who.tenant
        if api.audit is not None:
            reason = getattr(e, "reason", None) if isinstance(getattr(e, "reason", None), str) else type(e).__name__
            api.audit.append(principal=who, tenant=known, action=action, object=op, result=result,
                             client=who.client, terms=terms_of(known) if terms_of and known else None,
                             detail={**base, "reason": reason[:200]})
        raise
    if api.audit is not None:
        api.audit.append(principal=who, tenant=tenant, action=action, object=op, result="ok", client=who.client,
                         terms=terms_of(tenant) if terms_of else None, detail={**base, **detail})
    return value


def subject_access(api, who, asked, address, fmt) -> dict:
    """Blocking: start the subject access export of `address` in the
    caller's tenant (see the module's docstring)."""
    from mailtresor.lifecycle import gdpr

    def run(core, tenant):
        if fmt not in FORMATS:
            raise HttpError(400, f"format must be one of {', '.join(FORMATS)}")
        try:
            addr = gdpr.check_address(address)
            hits = gdpr.subject_hits(core, tenant, addr)
        except gdpr.GdprError as e:
            raise HttpError(400, str(e)) from None
        section = _lifecycle(api).section(tenant)
        with core._store_lock:
            paths = core.store.index_paths(tenant, core.store.months(tenant, check=False))
        report = gdpr.report(cfg=api.cfg, tenant=tenant, address=addr, hits=hits, paths=paths, section=section,
                             audit=core.audit, now=api.clock())
        job = None
        ids = report["ids"]
        if fmt == "zip" or ids:
            job = core.export_start(who, tenant=tenant, ids=ids, format=fmt,
                                    extra=gdpr.report_files(report) if fmt == "zip" else None)
        shown = {k: v for k, v in report.items() if k != "ids"}
        return ({"export": job, "messages": len(ids), "report": shown},
                {"format": fmt, "messages": len(ids), "export": job["id"] if job else None})
    return _audited(api, who, "gdpr", "gdpr", "subject-access", asked, run,
                    terms_of=lambda t: address if isinstance(address, str) and len(address) <= 1000 else None)


def records_doc(api, who, asked) -> dict:
    """Blocking: the tenant's Art. 30 record (lifecycle.gdpr.records)."""
    from mailtresor.lifecycle import gdpr

    def run(core, tenant):
        section = _lifecycle(api).section(tenant)
        roles = None
        if api.users is not None:
            roles = {}
            for u in api.users.list(tenant):
                if not u.disabled:
                    for r in u.roles:
                        roles[r] = roles.get(r, 0) + 1
        return gdpr.records(api.cfg, tenant, roles=roles, section=section, now=api.clock()), {}
    return _audited(api, who, "gdpr", "gdpr", "records", asked, run)


def evidence_doc(api, who, asked, verify: bool = False) -> dict:
    """Blocking: the tenant's evidence document (lifecycle.evidence);
    `verify` runs the shard verification too (one at a time: 409)."""
    from mailtresor.lifecycle import evidence

    def run(core, tenant):
        section = _lifecycle(api).section(tenant)
        checked = None
        if verify:
            if not _verify_lock.acquire(blocking=False):
                raise HttpError(409, "a verification is running; try again when it is done")
            try:
                a = getattr(api.cfg, "archive", None)
                checked = evidence.run_verify(store=core.store, store_lock=core._store_lock, keys=core.keys,
                                              tenant=tenant, tsa_ca_file=a.tsa_ca_file if a else None)
            finally:
                _verify_lock.release()
        doc = evidence.evidence(store=core.store, store_lock=core._store_lock, audit=core.audit, tenant=tenant,
                                section=section, now=api.clock(), verify=checked)
        detail = {"verify": verify}
        if checked is not None:
            detail.update(sound=checked["sound"], problems=checked["problem_count"])
        return doc, detail
    return _audited(api, who, "lifecycle-read", "evidence", None, asked, run)


async def h_gdpr_subject_access(api, c: Call) -> Answer:
    doc = c.body(required=("address",), optional=("format", "tenant"))
    address = member(doc, "address", str)
    fmt = member(doc, "format", str, "zip")
    answer = await api.run(subject_access, api, c.who, member(doc, "tenant", str), address, fmt)
    headers = {}
    if answer["export"] is not None:
        headers[b"Location"] = f"{V1}/exports/{answer['export']['id']}".encode()
    return Answer(202, answer, headers=headers)


async def h_gdpr_records(api, c: Call) -> Answer:
    return Answer(200, await api.run(records_doc, api, c.who, c.args.get("tenant")))


async def h_evidence(api, c: Call) -> Answer:
    verify = bool_arg(c.args, "verify")
    return Answer(200, await api.run(evidence_doc, api, c.who, c.args.get("tenant"), verify))
