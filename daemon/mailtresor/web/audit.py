"""The auditor's pages: the audit trail with filters, the events view, the
anomalies the archive reports, and the trail's own verification.

Everything comes from the access core (Core.audit_records, events,
anomalies, audit_verify), which checks that the caller may read the trail
(a user or an administrator gets its Forbidden: a 403 page) and writes the
one audit record of each page.  What the trail holds is hostile input: a
login name someone typed at the login form, the terms a user searched
for, an object an API caller named.  It is shown as text only
(autoescaping, and `visible()` spells out control, format and line
characters), shortened with the whole value in a title attribute.
"""

from __future__ import annotations

import datetime as dt
import re
import urllib.parse

from mailtresor.access.audit import RECORD_ACTIONS, RESULTS
from mailtresor.access.http import HttpError
from mailtresor.web.i18n import N_

PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
SHORT = 48                      # characters of a field shown in the table (the rest in its title)
_AID = re.compile(r"[0-9a-f]{40}\Z")
_DATE = re.compile(r"\d{4}-\d\d-\d\d\Z")

ACTION_LABELS = {
    "login": N_("login"), "login-failed": N_("failed login"), "logout": N_("logout"), "search": N_("search"),
    "read": N_("read"), "download": N_("download"), "export": N_("export"), "admin": N_("administration"),
    "key-fetch": N_("key fetch"), "anomaly": N_("anomaly"), "audit-read": N_("audit trail read"),
    "retention-rule": N_("retention rule"), "retention": N_("retention run"), "hold": N_("legal hold"),
    "deletion-request": N_("deletion request"), "deletion": N_("deletion"), "tag": N_("case tag"),
    "gdpr": N_("GDPR"), "evidence": N_("evidence report"),
}
RESULT_LABELS = {"ok": N_("ok"), "denied": N_("denied"), "failed": N_("failed"), "not-found": N_("not found")}
KIND_LABELS = {"user": N_("user"), "token": N_("API token"), "local": N_("appliance shell"),
               "daemon": N_("appliance")}
# What each anomaly kind means (access/audit.py DaemonTrail.anomaly, the
# archiver's _failed and _anomalies, AuditLog._cut).
ANOMALY_KINDS = {
    "journal-untrusted": (
        N_("Untrusted journal report"),
        N_("A message carried a journal report but did not come through a trusted journal connector. "
           "Its journal recipients were not believed: the report may be forged to place mail in "
           "someone's mailbox. The message is archived and flagged journal-untrusted.")),
    "extraction-truncated": (
        N_("Text extraction cut short"),
        N_("Extracting the text of the message or an attachment stopped at the parser's budget. "
           "The message is archived in full, but words beyond the cut are not found by a search.")),
    "set-aside": (
        N_("Mail set aside"),
        N_("A spooled message could not be archived after its retries and was set aside for the "
           "operator (mailtresor archive set-aside --list).")),
    "audit-tail-cut": (
        N_("Audit trail: torn record cut"),
        N_("The audit trail ended in a partly written record (a crash while writing). Its bytes were cut "
           "off and kept in the file named; the trail goes on after the last complete record.")),
}
UNKNOWN_KIND = (N_("Anomaly"), N_("An anomaly of a kind this page does not describe; its details are below."))
DETAIL_LABELS = {"spool_id": N_("Spool entry"), "source": N_("Source"), "connector": N_("Connector"),
                 "reason": N_("Reason"), "offset": N_("Offset"), "bytes": N_("Bytes"), "sha256": N_("SHA-256"),
                 "kept_in": N_("Kept in"), "after_seq": N_("After record")}


# --- showing hostile values: pure functions --------------------------------------------

def visible(value) -> str:
    """A value from the trail as plain visible text: None as "", every
    character that is not printable (line ends, escape sequences, bidi
    overrides, zero-width characters) spelled as \\n, \\x1b, \\u202e.  Pure."""
    if value is None:
        return ""
    s = value if isinstance(value, str) else str(value)
    if s.isprintable():
        return s
    out = []
    for c in s:
        if c.isprintable():
            out.append(c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\r":
            out.append("\\r")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 0x100:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
    return "".join(out)


def cell(value, n: int = SHORT) -> tuple[str, str | None]:
    """(text shown, the whole text for a title attribute, or None when
    nothing was cut).  Pure."""
    s = visible(value)
    if len(s) <= n:
        return s, None
    return s[:n - 1] + "…", s


def detail_text(detail) -> str:
    """A record's detail (a small JSON object) as one line: "key: value;
    ...".  Pure."""
    if detail is None:
        return ""
    if not isinstance(detail, dict):
        return visible(detail)
    parts = []
    for k, v in detail.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={visible(b)}" for a, b in v.items())
        parts.append(f"{visible(k)}: {visible(v)}")
    return "; ".join(parts)


def who_of(principal) -> tuple[str, str]:
    """(kind, name) of a record's principal: "user:alice" -> (user, alice);
    the daemon's own records -> (daemon, mailtresord).  Pure."""
    p = principal if isinstance(principal, str) else ""
    kind, sep, name = p.partition(":")
    if sep and kind in ("user", "token", "local"):
        return kind, name
    return "daemon", p


def row(r: dict, *, can_read: bool) -> dict:
    """What the table shows of one record."""
    kind, name = who_of(r.get("principal"))
    obj = r.get("object")
    return {"seq": r.get("seq"), "time": visible(r.get("time", "")).replace("T", " ").rstrip("Z")[:19],
            "time_full": visible(r.get("time", "")), "kind": kind, "name": cell(name), "client": cell(r.get("client")),
            "action": r.get("action") or "", "object": cell(obj),
            "link": f"/message/{obj}" if can_read and isinstance(obj, str) and _AID.fullmatch(obj) else None,
            "result": r.get("result") or "", "detail": cell(detail_text(r.get("detail")), 60),
            "terms": cell(r["terms"], 60) if "terms" in r else ("", None)}


# --- the filter form ------------------------------------------------------------------

def filters_of(q: dict, who) -> tuple[dict, dict, list[str]]:
    """(the form's values, the core's keyword arguments, errors) of the
    page's query.  Dates are YYYY-MM-DD, UTC; "to" is inclusive (the core's
    `before` is the next day).  Pure."""
    form = {k: q.get(k, "").strip() for k in ("who", "action", "result", "from", "to", "tenant")}
    kw: dict = {}
    errors: list[str] = []
    if form["who"]:
        kw["principal"] = form["who"]
    if form["action"]:
        kw["action"] = form["action"]
    if form["result"]:
        kw["result"] = form["result"]
    for field, arg, label in (("from", "after", N_("From (UTC)")), ("to", "before", N_("To (UTC, inclusive)"))):
        text = form[field]
        if not text:
            continue
        try:
            if not _DATE.fullmatch(text):
                raise ValueError
            day = dt.date.fromisoformat(text)
        except ValueError:
            errors.append((N_("%(field)s: not a date; use YYYY-MM-DD"), label))
            continue
        if field == "to":
            day += dt.timedelta(days=1)
        kw[arg] = day.isoformat()
    if who.tenant is None and form["tenant"]:
        kw["tenant"] = form["tenant"]
    return form, kw, errors


def _link(path: str, form: dict, **over) -> str:
    args = {**{k: v for k, v in form.items() if v}, **{k: v for k, v in over.items() if v is not None}}
    return path + ("?" + urllib.parse.urlencode(args) if args else "")


def _paging(q: dict) -> tuple[int, int, int]:
    """(since, limit, page number shown) of a page's query; a bad one is a 400."""
    since, limit = q.get("since", "0") or "0", q.get("limit", str(PAGE_SIZE)) or str(PAGE_SIZE)
    if not since.isdigit() or len(since) > 18:
        raise HttpError(400, N_("since must be a record number"))
    if not limit.isdigit() or not 1 <= int(limit) <= MAX_PAGE_SIZE:
        raise HttpError(400, N_("limit must be a number from 1 to 200"))
    page = int(q["page"]) if q.get("page", "").isdigit() and 0 < int(q["page"]) < 10**6 else 1
    return int(since), int(limit), page if int(since) else 1


def _common(who) -> dict:
    return {"action_labels": ACTION_LABELS, "result_labels": RESULT_LABELS, "kind_labels": KIND_LABELS,
            "can_read": who.can("read-tenant"), "anomaly_count": None}


# --- pages ---------------------------------------------------------------------------

async def trail(web, request, who, csrf):
    q = web.query(request)
    form, kw, errors = filters_of(q, who)
    since, limit, page = _paging(q)
    doc, error = None, None
    if not errors:
        try:
            doc = await web.api.run(web.core.audit_records, who, since=since, limit=limit, anomaly_count=True,
                                    **kw)
        except Exception as e:  # noqa: BLE001 - a bad filter is said on the page; the rest is error.html
            if getattr(e, "status", None) != 400:
                raise
            error = e.reason
    extra = {"limit": str(limit) if limit != PAGE_SIZE else None}
    rows = [row(r, can_read=who.can("read-tenant")) for r in (doc or {}).get("records", [])]
    web.render(request, "audit.html", who, csrf, view="trail", form=form, rows=rows, doc=doc, error=error,
               errors=errors, page=page, actions=RECORD_ACTIONS, results=RESULTS,
               **{**_common(who), "anomaly_count": (doc or {}).get("anomalies")},
               next_link=_link("/audit", form, since=str(doc["next"]), page=str(page + 1), **extra)
               if doc and doc.get("more") else None,
               first_link=_link("/audit", form, **extra) if since else None)


async def events(web, request, who, csrf):
    q = web.query(request)
    since, limit, page = _paging(q)
    doc = await web.api.run(web.core.events, who, since=since, limit=limit)
    extra = {"limit": str(limit) if limit != PAGE_SIZE else None}
    rows = [row(r, can_read=who.can("read-tenant")) for r in doc["events"]]
    web.render(request, "audit_events.html", who, csrf, view="events", rows=rows, doc=doc, page=page,
               next_link=_link("/audit/events", {}, since=str(doc["next"]), page=str(page + 1), **extra)
               if len(doc["events"]) >= limit else None,
               first_link=_link("/audit/events", {}, **extra) if since else None, **_common(who))


def anomaly_row(r: dict, *, can_read: bool) -> dict:
    """What the anomalies page shows of one anomaly record."""
    detail = r.get("detail") if isinstance(r.get("detail"), dict) else {}
    kind = detail.get("kind") if isinstance(detail.get("kind"), str) else ""
    title, text = ANOMALY_KINDS.get(kind, UNKNOWN_KIND)
    base = row(r, can_read=can_read)
    facts = [(DETAIL_LABELS.get(k), visible(k), cell(v, 80)) for k, v in detail.items() if k != "kind"]
    return {**base, "kind_code": visible(kind), "title": title, "text": text, "facts": facts}


async def anomalies(web, request, who, csrf):
    doc = await web.api.run(web.core.anomalies, who, limit=100)
    items = [anomaly_row(r, can_read=who.can("read-tenant")) for r in doc["anomalies"]]
    web.render(request, "audit_anomalies.html", who, csrf, view="anomalies", items=items, count=doc["count"],
               **{**_common(who), "anomaly_count": doc["count"]})


async def verify(web, request, who, csrf):
    """POST: verify the whole trail (Core.audit_verify: expensive, so on
    request only, never on a page view); GET: the anomalies page, where
    the button is."""
    if request.method != b"POST":
        return web.redirect(request, "/audit/anomalies#verify")
    web.check_csrf(web.form(request), csrf)
    report = await web.api.run(web.core.audit_verify, who)
    web.render(request, "audit_verify.html", who, csrf, view="verify", report=report, **_common(who))


ROUTES = (
    ("GET", r"/audit", trail),
    ("GET", r"/audit/events", events),
    ("GET", r"/audit/anomalies", anomalies),
    ("GET POST", r"/audit/verify", verify),
)
