"""The export pages: start an export (from the search page's form or this
section's own), follow its progress, download it, list one's own exports.

Everything goes through the access core, which checks scope, the export
limits and ownership and writes the audit record: `Core.export_start`,
`export_status`, `export_list`.  The download is the API's own route
(`/api/v1/exports/{id}/download`, authorised by the same session cookie),
and so is the progress the page's script polls (`/api/v1/exports/{id}`).
"""

from __future__ import annotations

import re
import urllib.parse

from mailtresor.access.api import check_export
from mailtresor.access.http import HttpError
from mailtresor.web.i18n import N_

# A job id as the core makes them (secrets.token_hex(16)); anything else is
# "not found" before the core is asked (and no audit record for garbage).
_JOB_ID = re.compile(r"[0-9a-f]{32}\Z")

# How a job's state is shown (translated in the template).
STATES = {"queued": N_("queued"), "running": N_("running"), "done": N_("done"), "failed": N_("failed")}
FORMATS = {"zip": N_("zip of .eml files with a manifest"), "mbox": N_("mbox (one file)")}


def form_values(body: bytes) -> dict[str, list[str]]:
    """Every value of every field of an urlencoded form body (a selection
    sends `id` once per message).  Pure."""
    return urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)


def selection(fields: dict[str, list[str]]) -> tuple[str, str | None, list[str] | None]:
    """(format, query, ids) of the export form: `format`, and either `q` (the
    query as searched) or one or more `id`.  HttpError 400 naming what is
    wrong; the shape checks are the API's (check_export).  Pure."""
    fmt = (fields.get("format") or [""])[0]
    q = fields.get("q")
    ids = [i.strip() for i in fields.get("id", []) if i.strip()] or None
    query = q[0].strip() if q else None
    if query is not None and ids is not None:
        raise HttpError(400, N_("Export either a search or selected messages, not both."))
    if query is None and ids is None:
        raise HttpError(400, N_("Select messages or enter a search to export."))
    check_export(fmt, query, ids)
    return fmt, query, ids


async def _listing(web, who) -> list[dict]:
    return (await web.api.run(web.core.export_list, who))["exports"]


async def exports(web, request, who, csrf):
    if request.method == b"POST":
        return await start(web, request, who, csrf)
    web.render(request, "exports.html", who, csrf, jobs=await _listing(web, who), states=STATES,
               formats=FORMATS, error=None, query="", format="zip")


async def start(web, request, who, csrf):
    """POST /exports: start the job, then its progress page (303)."""
    f = web.form(request)           # also: 415 for anything but a form
    web.check_csrf(f, csrf)
    request.content.seek(0)
    fields = form_values(request.content.read())
    try:
        fmt, query, ids = selection(fields)
        job = await web.api.run(web.core.export_start, who, query=query, ids=ids, format=fmt)
    except Exception as e:  # noqa: BLE001 - a refusal the user can act on is shown on the page
        # Bad format, no selection, over the limit, too many running, a bad
        # query: the exports page with the reason.  Forbidden (an
        # administrator) and anything else: the error page.
        if getattr(e, "status", None) != 400:
            raise
        q = (fields.get("q") or [""])[0]
        fmt = (fields.get("format") or ["zip"])[0]
        return web.render(request, "exports.html", who, csrf, status=400, jobs=await _listing(web, who),
                          states=STATES, formats=FORMATS, error=e.reason, query=q,
                          format=fmt if fmt in FORMATS else "zip")
    web.redirect(request, f"/exports/{job['id']}")


async def job_page(web, request, who, csrf, jid):
    if not _JOB_ID.fullmatch(jid):
        raise HttpError(404, N_("no such export"))
    job = await web.api.run(web.core.export_status, who, jid)
    web.render(request, "export.html", who, csrf, job=job, states=STATES, formats=FORMATS)


ROUTES = (
    ("GET POST", r"/exports", exports),
    ("GET", r"/exports/(?P<jid>[^/]+)", job_page),
)
