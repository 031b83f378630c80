"""The reading pages: search and message (over the access core, which
checks scope and writes the audit record of every read)."""

from __future__ import annotations

import datetime
import re
import time
import urllib.parse

from mailtresor.access.http import HttpError
from mailtresor.web import i18n
from mailtresor.web.i18n import N_

PAGE_SIZE = 25
MAX_BACK = 20           # earlier pages' cursors a search page's URL keeps (see docs/WEB.md, "The search page")
_MESSAGE_ID = re.compile(r"[0-9A-Za-z]{8,64}\Z")
_CURSOR = re.compile(r"[A-Za-z0-9_-]{1,100}\Z")     # the core's cursors: base64url, 54 characters
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}\Z")
# Operators that bind more loosely than the implicit AND (or change what
# follows them): a query holding one is put in parentheses before a term
# is added to it.
_OPERATOR = re.compile(r"(?:^|[\s(])(?:OR|XOR|AND|NOT)(?=[\s(]|$)")
# The parts of the search page app.js fetches alone, and their templates.
PARTS = {"results": "search_results.html", "answer": "search_answer.html"}
ORDERS = {"date-desc": N_("newest first"), "date-asc": N_("oldest first"), "relevance": N_("relevance")}
FACET_LABELS = {"year": N_("Year"), "month": N_("Month"), "sender_domain": N_("Sender domain"),
                "has_attachment": N_("Attachment"), "tag": N_("Tag"), "flag": N_("Flag")}
ATTACHMENT_VALUES = {"true": N_("with attachments"), "false": N_("without attachments")}


def facet_term(name: str, value: str) -> str | None:
    """The query-language term that narrows a search to a facet's value
    (None: a value no term can name, e.g. one with a space)."""
    if name == "has_attachment":
        return {"true": "has:attachment", "false": "-has:attachment"}.get(value)
    if not value or any(c in value for c in ' "()'):
        return None
    if name in ("year", "month"):
        return f"date:{value}..{value}"
    if name == "sender_domain":
        return f"from:{value}"
    if name in ("tag", "flag"):
        return f"{name}:{value}"
    return None


def narrow(query: str, term: str | None) -> str:
    """`query` AND `term`, in the query language.  A query with an operator
    in it is put in parentheses first ("a OR b" and a term is not "a OR (b
    AND term)"); quoted phrases are left alone."""
    query = query.strip()
    if not term:
        return query
    if not query:
        return term
    outside = "".join(query.split('"')[::2])
    if _OPERATOR.search(outside):
        query = f"({query})"
    return f"{query} {term}"


def date_term(start: str, end: str) -> tuple[str | None, tuple[str, dict] | None]:
    """(the date:FROM..TO term of the date fields, an error) from the
    fields' values (YYYY-MM-DD, as <input type="date"> sends them; either
    may be empty for an open end).  The error is (message, its parameters),
    a message to be translated."""
    start, end = start.strip(), end.strip()
    for wrong, value in ((N_("The start date %(value)s is not a date: use YYYY-MM-DD."), start),
                         (N_("The end date %(value)s is not a date: use YYYY-MM-DD."), end)):
        if not value:
            continue
        ok = bool(_DAY.fullmatch(value))
        if ok:
            try:
                datetime.date.fromisoformat(value)
            except ValueError:
                ok = False
        if not ok:
            return None, (wrong, {"value": value[:40]})
    if start and end and start > end:
        return None, (N_("The end date %(end)s is before the start date %(start)s."), {"start": start, "end": end})
    if not start and not end:
        return None, None
    return f"date:{start}..{end}", None


def query_args(request) -> dict[str, list[str]]:
    """Every value of every parameter of the request's query string (the
    back= stack repeats its name)."""
    _, _, qs = request.uri.partition(b"?")
    return urllib.parse.parse_qs(qs.decode("utf-8", "replace"), keep_blank_values=True)


def back_stack(values: list[str]) -> list[str]:
    """The earlier pages' cursors from back= parameters: "" for the first
    page, else a cursor's shape (the core checks it when it is used);
    anything else is dropped, and only the newest MAX_BACK are kept."""
    return [v for v in values if v == "" or _CURSOR.fullmatch(v)][-MAX_BACK:]


async def search(web, request, who, csrf):
    """The search page; with part=results only its result section (what
    app.js swaps in when paging), with part=answer everything under the
    search form: errors, results, export form and facets (what app.js
    swaps in for a new search, without a page load)."""
    args = query_args(request)
    q = {k: v[0] for k, v in args.items()}
    query = q.get("q", "")
    order = q.get("order", "date-desc")
    if order not in ORDERS:
        order = "date-desc"
    cursor = q.get("cursor") or None
    part = q.get("part") if q.get("part") in PARTS else None
    start, end = q.get("from", "")[:40], q.get("to", "")[:40]
    back = back_stack(args.get("back", [])) if cursor else []
    # The page number is only shown; the cursor is what the core pages by.
    page = int(q["page"]) if cursor and q.get("page", "").isdigit() and 0 < int(q["page"]) < 10**6 else 1
    limit = int(q["limit"]) if q.get("limit", "").isdigit() and 1 <= int(q["limit"]) <= 100 else PAGE_SIZE
    term, error = date_term(start, end)
    # What the core is asked: the box's query with the date fields folded in.
    searched = narrow(query, term)
    doc, took, reason = None, None, None
    if error is None and ("q" in q or term):
        t0 = time.monotonic()
        try:
            doc = await web.api.run(web.core.search, who, query=searched, cursor=cursor,
                                    limit=limit, order=order, facets=not cursor and part != "results")
        except Exception as e:  # noqa: BLE001
            if getattr(e, "status", None) == 400:
                reason = e.reason
            else:
                raise
        took = time.monotonic() - t0

    def link(**over):
        args = {"q": query, "order": order, "limit": str(limit) if limit != PAGE_SIZE else None,
                "from": start or None, "to": end or None, **over}
        return "/search?" + urllib.parse.urlencode({k: v for k, v in args.items() if v is not None}, doseq=True)
    facets = []
    if doc and doc.get("facets"):
        for name, counts in doc["facets"].items():
            items = []
            for v, n in list(counts.items())[:12]:
                term_ = facet_term(name, str(v))
                shown = ATTACHMENT_VALUES.get(str(v), str(v)) if name == "has_attachment" else str(v)
                items.append((shown, n, link(q=narrow(query, term_)) if term_ else None,
                              name == "has_attachment"))
            if items:
                facets.append((FACET_LABELS.get(name, name), items))
    next_link = prev_link = None
    if doc and doc.get("next_cursor"):
        next_link = link(cursor=doc["next_cursor"], page=str(page + 1), back=(back + [cursor or ""])[-MAX_BACK:])
    if cursor and back:
        earlier = back[-1]
        prev_link = link(cursor=earlier, page=str(max(page - 1, 2)), back=back[:-1]) if earlier else link()
    status = 400 if error or reason else 200
    kw = dict(query=query, order=order, orders=ORDERS, doc=doc, error=error, reason=reason, took=took,
              facets=facets, page=page, start=start, end=end, searched=searched, next_link=next_link,
              prev_link=prev_link, first_link=link() if cursor else None, can_export=who.can("export"),
              limit=limit if limit != PAGE_SIZE else None)
    if part:
        lang = i18n.request_language(request)
        web._send(request, status, web.page(PARTS[part], who, csrf=csrf, lang=lang, **kw),
                  headers={b"content-language": lang.encode(), b"vary": b"Accept-Language, Cookie"})
    else:
        web.render(request, "search.html", who, csrf, status=status, **kw)


def _aid(aid: str) -> str:
    if not _MESSAGE_ID.fullmatch(aid):
        raise HttpError(404, N_("no such message"))
    return aid


async def message(web, request, who, csrf, aid):
    aid = _aid(aid)
    view = web.query(request).get("view", "html")
    doc = await web.api.run(web.core.message, who, aid)
    text = await web.api.run(web.core.text, who, aid) if view == "text" else None
    web.render(request, "message.html", who, csrf, m=doc, view=view, text=text)


async def message_html(web, request, who, csrf, aid):
    from mailtresor.web.site import FRAME_CSP
    html = await web.api.run(web.core.html, who, _aid(aid))
    web._send(request, 200, html.encode("utf-8"),
              headers={b"content-security-policy": FRAME_CSP, b"x-frame-options": b"SAMEORIGIN"})


ROUTES = (
    ("GET", r"/search", search),
    ("GET", r"/message/(?P<aid>[^/]+)", message),
    ("GET", r"/message/(?P<aid>[^/]+)/html", message_html),
)
