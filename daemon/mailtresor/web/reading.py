"""The reading pages: search and message (over the access core, which
checks scope and writes the audit record of every read)."""

from __future__ import annotations

import re
import time
import urllib.parse

from mailtresor.access.http import HttpError

PAGE_SIZE = 25
_MESSAGE_ID = re.compile(r"[0-9A-Za-z]{8,64}\Z")
ORDERS = {"date-desc": "newest first", "date-asc": "oldest first", "relevance": "relevance"}


def facet_term(name: str, value: str) -> str | None:
    """The query-language term that narrows a search to a facet's value
    (None: the language has no term for it yet, e.g. has_attachment)."""
    if not value or any(c in value for c in ' "()'):
        return None
    if name in ("year", "month"):
        return f"date:{value}..{value}"
    if name == "sender_domain":
        return f"from:{value}"
    if name in ("tag", "flag"):
        return f"{name}:{value}"
    return None



async def search(web, request, who, csrf):
    q = web.query(request)
    query = q.get("q", "")
    order = q.get("order", "date-desc")
    if order not in ORDERS:
        order = "date-desc"
    cursor = q.get("cursor") or None
    # The page number is only shown; the cursor is what the core pages by.
    page = int(q["page"]) if cursor and q.get("page", "").isdigit() and 0 < int(q["page"]) < 10**6 else 1
    limit = int(q["limit"]) if q.get("limit", "").isdigit() and 1 <= int(q["limit"]) <= 100 else PAGE_SIZE
    doc, error, took = None, None, None
    if "q" in q:
        t0 = time.monotonic()
        try:
            doc = await web.api.run(web.core.search, who, query=query, cursor=cursor,
                                    limit=limit, order=order, facets=not cursor)
        except Exception as e:  # noqa: BLE001
            if getattr(e, "status", None) == 400:
                error = e.reason
            else:
                raise
        took = time.monotonic() - t0

    def link(**over):
        args = {"q": query, "order": order, "limit": str(limit) if limit != PAGE_SIZE else None, **over}
        return "/search?" + urllib.parse.urlencode({k: v for k, v in args.items() if v is not None})
    facets = []
    if doc and doc.get("facets"):
        for name, counts in doc["facets"].items():
            items = []
            for v, n in list(counts.items())[:12]:
                term = facet_term(name, str(v))
                shown = {"true": "with attachments", "false": "without"}.get(str(v), str(v)) \
                    if name == "has_attachment" else str(v)
                items.append((shown, n, link(q=f"{query} {term}".strip()) if term else None))
            if items:
                facets.append((name, items))
    web.render(request, "search.html", who, csrf, query=query, order=order, orders=ORDERS, doc=doc,
               error=error, took=took, facets=facets, page=page,
               next_link=link(cursor=doc["next_cursor"], page=str(page + 1)) if doc and doc.get("next_cursor")
               else None,
               first_link=link() if cursor else None)


def _aid(aid: str) -> str:
    if not _MESSAGE_ID.fullmatch(aid):
        raise HttpError(404, "no such message")
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
