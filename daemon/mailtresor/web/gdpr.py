"""The GDPR and evidence pages: subject access, the Art. 30 record, evidence.

    /gdpr            subject access form (address, format); POST starts the
                     export and goes to its job page (web/exports.py's)
    /gdpr/records    the tenant's Art. 30 record of processing activities
    /evidence        the live proof; POST (the "run verify now" button)
                     shows it with a verification of every shard

Everything goes through access/gdpr.py (the API's functions: role and
tenant checks, the audit record), in the API's thread pool, so the pages
and the API cannot drift apart.  An appliance administrator names the
tenant of the evidence page with ?tenant=.
"""

from __future__ import annotations

from mailtresor.access import gdpr as api_gdpr
from mailtresor.access.http import HttpError
from mailtresor.web.i18n import N_

FORMATS = {"zip": N_("zip of .eml files with a manifest and the report"), "mbox": N_("mbox (one file)")}
# The report's and the record's English terms the pages translate (the
# rest, e.g. configured names and rule texts, is shown as it is).
MEASURES = {
    "encryption at rest": N_("encryption at rest"),
    "key custody": N_("key custody"),
    "encrypted transport for ingest": N_("encrypted transport for ingest"),
    "encrypted transport for access": N_("encrypted transport for access"),
    "integrity: hash chain and seals": N_("integrity: hash chain and seals"),
    "trusted time stamps (RFC 3161)": N_("trusted time stamps (RFC 3161)"),
    "audit trail": N_("audit trail"),
    "access control": N_("access control"),
    "deletion with four eyes, legal holds": N_("deletion with four eyes, legal holds"),
    "backup": N_("backup"),
    "encrypted volumes": N_("encrypted volumes"),
}

# The API's refusals these pages show, translated (web.site's |reason).
REASONS = (N_("subject access and records of processing need the auditor role"),
           N_("evidence needs the auditor or administrator role"),
           N_("the lifecycle database is not available yet"),
           N_("a verification is running; try again when it is done"),
           N_("give the data subject's mail address"),
           N_("give one mail address (local@domain), without a name, spaces or brackets"))


async def subject_access(web, request, who, csrf):
    if request.method == b"POST":
        f = web.form(request)
        web.check_csrf(f, csrf)
        address, fmt = f.get("address", ""), f.get("format", "zip")
        try:
            ans = await web.api.run(api_gdpr.subject_access, web.api, who, None, address, fmt)
        except HttpError as e:
            if e.status != 400:
                raise
            return web.render(request, "gdpr.html", who, csrf, status=400, formats=FORMATS, address=address,
                              format=fmt if fmt in FORMATS else "zip", error=e.reason, empty=False)
        if ans["export"] is None:          # an mbox of no message: nothing to download
            return web.render(request, "gdpr.html", who, csrf, formats=FORMATS, address=address, format=fmt,
                              error=None, empty=True)
        return web.redirect(request, f"/exports/{ans['export']['id']}")
    if not who.can("gdpr"):
        raise HttpError(403, N_("subject access and records of processing need the auditor role"))
    web.render(request, "gdpr.html", who, csrf, formats=FORMATS, address="", format="zip", error=None,
               empty=False)


async def records(web, request, who, csrf):
    doc = await web.api.run(api_gdpr.records_doc, web.api, who, None)
    web.render(request, "gdpr_records.html", who, csrf, doc=doc, measures=MEASURES)


async def evidence(web, request, who, csrf):
    verify = False
    tenant = web.query(request).get("tenant") or None
    if request.method == b"POST":
        f = web.form(request)
        web.check_csrf(f, csrf)
        verify = True
        tenant = f.get("tenant") or tenant
    if who.tenant is None and not tenant and who.can("lifecycle-read"):
        # An appliance administrator (or the local principal) names the tenant.
        return web.render(request, "evidence.html", who, csrf, doc=None, tenant="",
                          tenants=list(web.api.tenant_names))
    doc = await web.api.run(api_gdpr.evidence_doc, web.api, who, tenant, verify)
    web.render(request, "evidence.html", who, csrf, doc=doc, tenant=tenant or "")


ROUTES = (
    ("GET POST", r"/gdpr", subject_access),
    ("GET", r"/gdpr/records", records),
    ("GET POST", r"/evidence", evidence),
)
