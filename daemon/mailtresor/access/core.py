"""The access core: the one place that reads the archive for someone.

Every way out of the archive (the HTTPS API, the `mailtresor` command over
the daemon's socket, later the web UI and IMAP) is a thin adapter over
`Core`.  Each method of Core

1. resolves the tenant (`tenant_of`: nobody crosses tenants, and a tenant
   that is not the caller's is "not found", whether it exists or not),
2. checks the caller's scope: an auditor, a local administrator and an API
   token with the search (export) scope read the whole tenant; a user reads
   the mail where one of their addresses is in the envelope or in
   From/To/Cc/Bcc -- a Xapian filter in searches and exports, checked again
   on every message read, so that a guessed id is "not found"; an
   administrator reads no mail,
3. writes exactly one audit record (ok, denied, not-found or failed),
   search terms passed as `terms=` so that the trail keeps them encrypted.

The core is blocking (LMDB, Xapian, parsing): the API calls it from a thread
pool.  The store is shared by those threads under one lock (a `Store` keeps
an LRU of open shards and is not thread-safe); the index readers
(`index.Readers`) are thread-safe on their own.

Messages are rendered in this process, with the parser's budget
(`parse.Limits`): rendering needs only the MIME split and the decoding of
the parts (`parse.mime_parts`, `parse.headers`), never the text
extractors (pdftotext, Office) that make parsing dangerous, and these
messages were already parsed once, confined, when they were archived.
A round trip through the parser pool would cost more than the split.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from mailtresor.access.principal import Principal
from mailtresor.archive import index, parse

MAX_PAGE = 200                      # results per search page
MAX_AUDIT_PAGE = 1000               # records per audit/events page
ANOMALIES_KEPT = 500                # newest anomaly records a Core keeps per tenant (Core.anomalies)
VERIFY_SHOWN = 100                  # problems of a trail verification handed out (and the count)
MAX_FILTER_NAME = 200               # characters of the principal an audit filter names
EXPORT_MAX = 100_000                # messages per export (Core(export_max=...))
EXPORT_TTL = 24 * 3600.0            # seconds a finished export is kept
EXPORTS_RUNNING = 2                 # exports one principal may have running at once
EXPORTS_KEPT = 10                   # exports (and their files) one principal keeps; the oldest finished goes
MAX_QUERY = 4096                    # characters of a search string (the audit record keeps them)
FILENAME_MAX = 200                  # characters of an attachment's file name handed out
ORDERS = ("date-desc", "date-asc", "relevance")
FORMATS = ("mbox", "zip")

_AID = re.compile(r"[0-9a-f]{40}")
_MIME_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")
_JOB = re.compile(r"[0-9a-f]{32}")
_EXTRA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")    # an extra file of a zip: no directory, no dot file


class AccessError(Exception):
    """What the caller is told: an HTTP status and a reason (no traceback)."""
    status = 500
    result = "failed"               # the audit record's result

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class BadRequest(AccessError):
    """400: the request cannot be run; the reason names the problem."""
    status = 400


def _hide_case_tags(doc: dict) -> None:
    """A search answer for a principal who reads only their own mail:
    without the auditors' case tags (rows and the tag facet)."""
    from mailtresor.archive.classify import is_case_tag
    for row in doc.get("results", []):
        row["tags"] = [t for t in row.get("tags", []) if not is_case_tag(t)]
    tag = (doc.get("facets") or {}).get("tag")
    if isinstance(tag, dict):
        doc["facets"]["tag"] = {k: v for k, v in tag.items() if not is_case_tag(k)}


class BadQuery(BadRequest):
    """400 for a query that does not parse.  The reason quotes the query
    (what the user must fix); the audit record says only "bad query": the
    terms are kept encrypted (`terms=`), never in clear in a reason."""
    audit_reason = "bad query"


class Forbidden(AccessError):
    """403: the caller's role does not allow it (audited as denied)."""
    status = 403
    result = "denied"


class NotFound(AccessError):
    """404: no such message -- also another tenant's, one outside a user's
    scope, and every malformed id (no existence leak)."""
    status = 404
    result = "not-found"

    def __init__(self, reason: str = "no such message"):
        super().__init__(reason)


class HeldElsewhere(NotFound):
    """404 for a message this appliance finds only in a peer's shards
    (mailtresor.federation): the reason names the appliance to read it on.
    Message bodies are not carried between appliances."""

    def __init__(self, appliance: str):
        super().__init__(f"this message is held by appliance {appliance}: read it there")
        self.appliance = appliance


def iso(t: float | None) -> str | None:
    """ISO 8601 UTC, to the second."""
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(t)))


def months_in(months: list[str], bounds) -> list[str]:
    """The shards (YYYY-MM) that can hold mail dated within `bounds` (see
    index.query_date_bounds); generous by two days for time zones."""
    if bounds is None:
        return months
    lo, hi = bounds
    out = []
    for m in months:
        y, mo = int(m[:4]), int(m[5:7])
        start = calendar.timegm((y, mo, 1, 0, 0, 0)) - 86400 * 2
        end = calendar.timegm((y + (mo == 12), 1 if mo == 12 else mo + 1, 1, 0, 0, 0)) + 86400 * 2
        if (lo is None or end >= lo) and (hi is None or start <= hi):
            out.append(m)
    return out


def _terms(query) -> str | None:
    """What the audit record keeps of a query: the query, or None when it
    is no string or too long to be one (refused: MAX_QUERY)."""
    return query if isinstance(query, str) and len(query) <= MAX_QUERY else None


def safe_filename(name: str, n: int) -> str:
    """An attachment's file name as it may be handed out: the last path
    component (no "/", "\\", "..": a client that saves it stays in its
    directory), no control, format (bidi overrides) or line-separator
    characters and no double quote (nothing to break a Content-Disposition
    header with), no leading dot, at most FILENAME_MAX characters keeping a
    short extension; "attachment-N" when nothing is left.  Pure."""
    name = (name or "").replace("\\", "/").rpartition("/")[2]
    name = "".join(c for c in name if c.isprintable() and c != '"')
    name = name.strip().lstrip(".").strip()
    if len(name) > FILENAME_MAX:
        stem, dot, ext = name.rpartition(".")
        name = (stem[:FILENAME_MAX - len(ext) - 1] + "." + ext) if dot and stem and len(ext) <= 16 \
            else name[:FILENAME_MAX]
    return name or f"attachment-{n}"


def safe_content_type(ctype: str) -> str:
    """An attachment's content type as it may be handed out (and put in a
    Content-Type header): a plain type/subtype token pair, else
    application/octet-stream.  The message's own value may hold a folded
    line (CR/LF), quotes or markup.  Pure."""
    return ctype if isinstance(ctype, str) and _MIME_TYPE.fullmatch(ctype) else "application/octet-stream"


def owner(who: Principal) -> str:
    """Who a cursor or an export job belongs to: kind, name and tenant (a
    user of the same name in another tenant is someone else)."""
    return json.dumps([who.kind, who.name, who.tenant])


def envelope_addresses(env: dict) -> list[str]:
    """Every address of one stored envelope (see archiver.envelope_addresses)."""
    from mailtresor.archive.archiver import envelope_addresses as addrs
    return addrs(env)


def audit_time(name: str, text) -> int:
    """An ISO 8601 date ("2026-12-03": its midnight) or date-time
    ("2026-12-03T10:00", "...:00Z", "...+01:00"; without a zone: UTC) as
    microseconds since the epoch; BadRequest naming `name` otherwise.  Pure."""
    import datetime as dt
    if not isinstance(text, str) or len(text) > 40 or not re.fullmatch(r"\d{4}-\d\d-\d\d([T ][0-9:.+\-Z]+)?", text):
        raise BadRequest(f"{name} must be a date (YYYY-MM-DD) or a date and time (YYYY-MM-DDTHH:MM:SSZ), UTC; "
                         f"not {str(text)[:40]!r}")
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"{name}: {text!r} is not a valid date") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return int(when.timestamp()) * 1_000_000 + when.microsecond


def audit_filter(*, principal: str | None = None, action: str | None = None, result: str | None = None,
                 after: str | None = None, before: str | None = None):
    """The audit.Filter for a reader's filters, each checked: BadRequest
    naming the problem (an unknown action or result, a malformed date, a
    window that ends before it begins).  Pure."""
    from mailtresor.access import audit as trail
    if principal is not None:
        if not isinstance(principal, str) or not principal or len(principal) > MAX_FILTER_NAME \
                or not principal.isprintable():
            raise BadRequest(f"principal must be a login name (1 to {MAX_FILTER_NAME} printable characters)")
    if action is not None and action not in trail.RECORD_ACTIONS:
        raise BadRequest(f"action must be one of {', '.join(trail.RECORD_ACTIONS)}")
    if result is not None and result not in trail.RESULTS:
        raise BadRequest(f"result must be one of {', '.join(trail.RESULTS)}")
    lo = audit_time("after", after) if after is not None else None
    hi = audit_time("before", before) if before is not None else None
    if lo is not None and hi is not None and hi <= lo:
        raise BadRequest("before must be later than after")
    return trail.Filter(principal=principal, actions=frozenset({action}) if action else None,
                        results=frozenset({result}) if result else None, after=lo, before=hi)


@dataclass
class _Job:
    id: str
    owner: str                      # owner(principal)
    tenant: str
    format: str
    query: str | None
    items: list[tuple[str, str | None]]     # (archive id, month or None: locate it)
    scope: frozenset[str] | None
    created: float
    path: Path
    state: str = "queued"           # queued, running, done, failed
    done: int = 0
    size: int = 0
    missing: int = 0
    error: str = ""
    finished: float | None = None
    thread: threading.Thread | None = field(default=None, repr=False)
    # Files a zip carries beside the messages (name -> bytes), e.g. the
    # processing report of a GDPR subject access (lifecycle/gdpr.py).
    extra: dict[str, bytes] = field(default_factory=dict, repr=False)
    # Matches of the query held by peer appliances (federation), which an
    # export here does not carry: appliance -> count (None: not reachable).
    elsewhere: dict[str, int | None] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.items)

    def public(self) -> dict:
        # "query": what was exported, for its owner's list (None: a list of ids).
        d = {"id": self.id, "state": self.state, "done": self.done, "total": self.total,
             "format": self.format, "size": self.size, "missing": self.missing,
             "created": iso(self.created), "expires": iso(self.created + EXPORT_TTL), "query": self.query}
        if self.error:
            d["error"] = self.error
        if self.elsewhere:
            d["elsewhere"] = dict(self.elsewhere)
        return d


class Core:
    """Search, read and export a tenant's archive on behalf of a Principal.

    `store` is a mailtresor.archive.store.Store (read-only, or the daemon's
    own), `keys` its Keys, `audit` an AuditLog (append/read), `readers` an
    index.Readers to keep shard indexes open between searches.  Optional:
    `tenants` (the configured tenant names; without it, the tenants that
    have an archive), `limits` (parse.Limits for rendering), `export_max`,
    `cursor_key` (32 bytes; default: random per process, so a cursor does
    not outlive the process that made it)."""

    def __init__(self, *, store, keys, audit, readers=None, exports_dir: Path, clock=time.time,
                 tenants=None, limits: parse.Limits | None = None, export_max: int = EXPORT_MAX,
                 cursor_key: bytes | None = None, store_lock: threading.Lock | None = None):
        self.store = store
        self.keys = keys
        self.audit = audit
        self.readers = readers if readers is not None else index.Readers()
        self.exports_dir = Path(exports_dir)
        self.clock = clock
        self.tenants = None if tenants is None else frozenset(tenants)
        self.limits = limits
        self.export_max = export_max
        self._cursor_key = cursor_key or secrets.token_bytes(32)
        # Held around every use of `store`: shared with the archiver when
        # both use one Store (LMDB opens an environment once per process).
        self._store_lock = store_lock if store_lock is not None else threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._jobs_lock = threading.Lock()
        # tenant -> (seq read up to, anomalies counted, the newest kept): Core.anomalies
        self._anomaly_cache: dict[str, tuple[int, int, tuple]] = {}
        self._anomaly_lock = threading.Lock()
        self._verify_lock = threading.Lock()
        # lifecycle.db (lifecycle.state.LifecycleDB), set by the API once
        # the access key is there: hold:NAME in searches and the holds in
        # the message view, for principals who may see holds.  None: none.
        self.lifecycle = None
        # mailtresor.federation.Federation, set by the daemon when peers hold
        # shards of some tenant: their shards are searched too (remotes()).
        self.federation = None
        from mailtresor.archive.store import private_dir
        private_dir(self.exports_dir)
        self._sweep_files()

    # --- who may do what ---------------------------------------------------

    def _known(self, tenant: str) -> bool:
        if self.tenants is not None:
            return tenant in self.tenants
        with self._store_lock:
            return tenant in self.store.tenants()

    def tenant_of(self, who: Principal, asked: str | None) -> str:
        """The tenant a request is about.  A principal of tenant X gets X
        (asking for any other tenant is "not found", whether it exists or
        not); a local principal and an appliance administrator must name
        one."""
        if asked is not None and not isinstance(asked, str):
            raise BadRequest("tenant must be a name")
        if who.tenant is not None:
            if asked not in (None, "", who.tenant):
                raise NotFound("no such tenant")
            return who.tenant
        if not asked:
            raise BadRequest("name a tenant (tenant=)")
        if not self._known(asked):
            raise NotFound("no such tenant")
        return asked

    def _read_scope(self, who: Principal, export: bool = False) -> frozenset[str] | None:
        """None: the whole tenant; else the addresses the caller's mail is
        found by.  Raises Forbidden."""
        if who.tenant is None and who.kind != "local":
            # Only a local administrator names the tenant it reads: a
            # tenant-less token or user with a read right would read them all.
            raise Forbidden("administrators do not read mail" if who.roles & {"admin", "appliance-admin"}
                            else "a principal without a tenant reads no mail")
        if who.can("read-tenant"):
            scope = None
        elif who.can("read-own"):
            scope = frozenset(a.strip().lower() for a in who.addresses if a.strip())
        elif who.roles & {"admin", "appliance-admin"}:
            raise Forbidden("administrators do not read mail")
        elif who.kind == "token":
            raise Forbidden("this token has no search scope")
        else:
            raise Forbidden("not allowed to read mail")
        if export and not who.can("export"):
            raise Forbidden("this token has no export scope" if who.kind == "token"
                            else "this principal may not export")
        return scope

    def _audited(self, who: Principal, action: str, fn, *, asked: str | None = None,
                 obj: str | None = None, terms: str | None = None, detail=None, gate=None,
                 resolve: bool = True):
        """Run fn(tenant) -> (result, object) and append its one audit
        record, also when it raises.  `gate()` runs first (a role check:
        an administrator is refused before any tenant is looked at);
        without `resolve`, fn(None) -> (result, object, tenant)."""
        tenant = who.tenant
        try:
            if gate is not None:
                gate()
            if resolve:
                tenant = self.tenant_of(who, asked)
                value, obj = fn(tenant)
            else:
                value, obj, tenant = fn(None)
        except AccessError as e:
            self._append(who, tenant if tenant is not None and self._tenant_ok(tenant) else who.tenant,
                         action, obj, e.result, terms,
                         {"reason": getattr(e, "audit_reason", e.reason), **(detail or {})})
            raise
        except Exception:
            self._append(who, tenant if tenant is not None and self._tenant_ok(tenant) else who.tenant,
                         action, obj, "failed", terms, detail)
            raise
        self._append(who, tenant, action, obj, "ok", terms, detail)
        return value

    def _tenant_ok(self, tenant: str) -> bool:
        # A tenant the caller named but that does not exist is not written
        # into the trail as a tenant (its terms would need a key it has not).
        return self.tenants is None or tenant in self.tenants

    def _append(self, who, tenant, action, obj, result, terms, detail) -> None:
        if tenant is None:
            terms = None            # terms are kept under a tenant's key only: none, none kept
        self.audit.append(principal=who, tenant=tenant, action=action, object=obj, result=result,
                          client=who.client, terms=terms, detail=detail)

    # --- search --------------------------------------------------------------

    def _cursor(self, who: Principal, tenant: str, query: str, order: str, offset: int) -> str:
        body = offset.to_bytes(8, "big") + self._binding(who, tenant, query, order)
        mac = hmac.new(self._cursor_key, body, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(body + mac).decode().rstrip("=")

    def _binding(self, who: Principal, tenant: str, query: str, order: str) -> bytes:
        # A cursor is good for the same principal, tenant, query and order only.
        return hashlib.sha256(json.dumps([owner(who), tenant, query, order]).encode()).digest()[:16]

    def _offset(self, cursor: str, who: Principal, tenant: str, query: str, order: str) -> int:
        try:
            if not isinstance(cursor, str) or len(cursor) > 100:
                raise ValueError
            data = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        except ValueError:
            raise BadRequest("bad cursor") from None
        if len(data) != 40:
            raise BadRequest("bad cursor")
        body, mac = data[:24], data[24:]
        good = hmac.new(self._cursor_key, body, hashlib.sha256).digest()[:16]
        if not hmac.compare_digest(mac, good) or body[8:] != self._binding(who, tenant, query, order):
            raise BadRequest("bad cursor")
        return int.from_bytes(body[:8], "big")

    def _hold_resolver(self, who: Principal, tenant: str):
        """{"hold": resolve} for a principal who may see holds (hold:NAME
        is what the tenant's hold covers: its ids OR its query), else None:
        for anyone else hold: is no field, answered as any unknown field
        is, so that a search cannot tell whether a hold exists."""
        if not who.can("lifecycle-read"):
            return None
        from mailtresor.lifecycle.holds import hold_query
        db = self.lifecycle
        cache: dict = {}

        def resolve(name: str):
            if db is None:
                raise index.QueryError("hold: the lifecycle database is not available yet")
            if "holds" not in cache:
                cache["holds"] = db.section(tenant)["holds"]
            hold = cache["holds"].get(name)
            if hold is None:
                raise index.QueryError(f"no hold named {name}")
            return hold_query(hold)
        return {"hold": resolve}

    def _prepared(self, query: str, scope: frozenset[str] | None, resolvers=None) -> index.Prepared:
        if not isinstance(query, str):
            raise BadRequest("bad query: the query must be a string")
        if len(query) > MAX_QUERY:
            raise BadRequest(f"the query is over {MAX_QUERY} characters")
        try:
            prepared = index.prepare(query, resolvers=resolvers)
        except index.QueryError as e:
            raise BadQuery(f"bad query: {e}") from None
        if scope is not None:
            # Case tags are the auditors': a user must not learn by
            # searching that their mail is under a case (docs/lifecycle/tags.md).
            from mailtresor.archive.classify import touches_case_tags
            if touches_case_tags(prepared.query):
                raise BadQuery("bad query: case tags (tag:case:...) are for auditors")
            prepared = index.restrict(prepared, index.address_filter(scope))
        return prepared

    def _paths(self, tenant: str, prepared: index.Prepared) -> list[str]:
        with self._store_lock:
            months = self.store.months(tenant, check=False)
            return self.store.index_paths(tenant, months_in(months, prepared.bounds))

    def _remotes(self, tenant: str) -> list:
        """The peers' shards of the tenant (index.Remote), [] without federation."""
        return self.federation.remotes(tenant) if self.federation is not None else []

    def search(self, who: Principal, *, tenant: str | None = None, query: str = "", cursor: str | None = None,
               limit: int = 50, order: str = "date-desc", facets: bool = False) -> dict:
        """One page of the matches of `query` (the CLI's query language,
        index.parse_query) in the tenant, within the caller's scope:
        {"total", "results": [Row], "next_cursor", "facets" (if asked)}.
        Row: id, date (ISO 8601 UTC), from, to (the first To: addresses),
        to_count (how many To: addresses), subject, size, message_id,
        has_attachments, flags, tags.  `hold:NAME` finds what a hold
        covers, for principals who may see holds (lifecycle-read).

        A tenant with shards on peer appliances (federation) is searched
        there too, in the same query; their rows carry "appliance", and
        the answer "unavailable": the peers that could not be searched
        ([] when all answered; the audit record names them too)."""
        detail = {"order": order if order in ORDERS else "invalid", "page": bool(cursor)}

        def run(t: str):
            if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
                raise BadRequest(f"limit must be a number from 1 to {MAX_PAGE}")
            if order not in ORDERS:
                raise BadRequest(f"order must be one of {', '.join(ORDERS)}")
            scope = self._read_scope(who)
            prepared = self._prepared(query, scope, self._hold_resolver(who, t))
            offset = self._offset(cursor, who, t, query, order) if cursor else 0
            remotes = self._remotes(t)
            paths = self._paths(t, prepared) + remotes
            down: set[str] = set()
            try:
                total, hits = index.search(paths, prepared, offset=offset, limit=limit, order=order,
                                           readers=self.readers, unavailable=down)
                doc = {"total": total, "results": [self._row(t, h) for h in hits]}
                doc["next_cursor"] = (self._cursor(who, t, query, order, offset + limit)
                                      if hits and offset + limit < total else None)
                if facets:
                    doc["facets"] = index.facets(paths, prepared, readers=self.readers, unavailable=down)
                if remotes:
                    # Never a silent partial answer: the peers not searched are named.
                    doc["unavailable"] = sorted(down)
                    if down:
                        detail["unavailable"] = sorted(down)
                if scope is not None:
                    _hide_case_tags(doc)
            except index.QueryError as e:
                raise BadQuery(f"bad query: {e}") from None
            return doc, None
        return self._audited(who, "search", run, asked=tenant, terms=_terms(query),
                             gate=lambda: self._read_scope(who), detail=detail)

    def _row(self, tenant: str, h: index.Hit) -> dict:
        from mailtresor.archive.store import index_listing
        month = h.month if h.appliance is not None else os.path.basename(os.path.dirname(h.shard_path))
        sm = index_listing(h.listing, tenant, month or "", h.archive_id, self.keys)
        meta = None
        if h.appliance is not None:
            # A peer's hit: its store is not here; what the index holds is all.
            sm = sm if sm is not None else {}
        elif sm is None or h.flags is None:
            with self._store_lock:
                meta = self.store.shard(tenant, month).get_meta(h.archive_id, self.keys) or {}
            sm = sm if sm is not None else (meta.get("summary") or {})
        summary = (meta or {}).get("summary") or {}
        date = sm.get("date") if sm.get("date") is not None else h.date
        # Records archived before summaries held To: have none (until `reindex`): [] and 0.
        to = sm.get("to") if sm.get("to") is not None else summary.get("to")
        to = [a for a in to if isinstance(a, str)] if isinstance(to, list) else []
        to_count = sm.get("to_count") if sm.get("to_count") is not None else summary.get("to_count")
        return {"id": h.archive_id, "date": iso(date), "from": sm.get("from") or "",
                "to": to, "to_count": to_count if isinstance(to_count, int) and to_count >= len(to) else len(to),
                "subject": sm.get("subject") or "", "size": sm.get("size") or h.size,
                "message_id": sm.get("message_id") or "",
                # An index older than format 2 lacks these: from the stored summary.
                "has_attachments": h.has_attachments if h.has_attachments is not None
                else bool(summary.get("attachments")),
                "flags": list(h.flags) if h.flags is not None else sorted(summary.get("flags") or []),
                "tags": list(h.tags) if h.tags is not None else [],
                **({"appliance": h.appliance} if h.appliance is not None else {})}

    # --- one message -----------------------------------------------------------

    def _load(self, who: Principal, tenant: str, aid) -> tuple[str, bytes, dict, dict]:
        """(month, raw, meta, headers) of a message the caller may read;
        NotFound for anything else."""
        scope = self._read_scope(who)
        if not isinstance(aid, str) or not _AID.fullmatch(aid.lower()):
            raise NotFound()
        aid = aid.lower()           # as `mailtresor show` takes it
        if scope is not None and not self._indexed_in_scope(tenant, aid, scope):
            self._elsewhere(tenant, aid, scope)
            raise NotFound()
        try:
            with self._store_lock:
                try:
                    if not self.store.has_archive(tenant):
                        raise NotFound()
                    month = self.store.locate(tenant, aid)
                    if month is None:
                        raise NotFound()
                    raw, meta = self.store.shard(tenant, month).get(aid, self.keys)
                except NotFound:
                    raise
                except Exception as e:
                    from mailtresor.archive.store import RecordCorrupt, StoreError
                    if isinstance(e, StoreError) and not isinstance(e, RecordCorrupt) and "no message" in str(e):
                        raise NotFound() from None
                    raise
        except NotFound:
            # Not here: perhaps on a peer (federation), outside the store lock.
            self._elsewhere(tenant, aid, scope)
            raise
        head = parse.headers(raw)
        if scope is not None and not self._visible(scope, meta, head):
            raise NotFound()
        return month, raw, meta, head

    def _elsewhere(self, tenant: str, aid: str, scope: frozenset[str] | None) -> None:
        """Raise HeldElsewhere if a peer's shards hold `aid` (within the
        caller's scope); return quietly if none does or none answers."""
        remotes = self._remotes(tenant)
        if not remotes:
            return
        prepared = index.prepare(f"aid:{aid}")
        if scope is not None:
            prepared = index.restrict(prepared, index.address_filter(scope))
        _, hits = index.search(remotes, prepared, limit=1, unavailable=set())
        if hits:
            raise HeldElsewhere(hits[0].appliance)

    def _indexed_in_scope(self, tenant: str, aid: str, scope: frozenset[str]) -> bool:
        """Whether the index has `aid` within a user's scope.  Asked before
        the store is touched, so that another user's message and a message
        that does not exist cost the same work (one term lookup per shard
        index) and take the same time: no decryption, no parsing for mail
        that is not the caller's.  Mail not indexed yet is not found yet
        (as it is not found by a search)."""
        prepared = index.restrict(index.prepare(f"aid:{aid}"), index.address_filter(scope))
        with self._store_lock:
            if not self.store.has_archive(tenant):
                return False
            paths = self.store.index_paths(tenant, self.store.months(tenant, check=False))
        total, _ = index.search(paths, prepared, limit=0, readers=self.readers)
        return total > 0

    @staticmethod
    def _visible(scope: frozenset[str], meta: dict, head: dict) -> bool:
        """Whether one of a user's addresses is in an envelope of the
        message or in its From/To/Cc/Bcc."""
        if not scope:
            return False
        for env in (meta.get("envelopes") or {}).values():
            if scope.intersection(envelope_addresses(env)):
                return True
        for name in ("from", "to", "cc", "bcc"):
            if scope.intersection(a.lower() for a in head.get(name) or ()):
                return True
        return False

    def _read(self, who, action, aid, tenant, fn):
        return self._audited(who, action, lambda t: (fn(t, *self._load(who, t, aid)), aid if isinstance(aid, str)
                                                     and len(aid) <= 64 else None),
                             asked=tenant, obj=aid if isinstance(aid, str) and len(aid) <= 64 else None,
                             gate=lambda: self._read_scope(who))

    def message(self, who: Principal, aid: str, *, tenant: str | None = None) -> dict:
        """The metadata of one message: id, tenant, date, from, to, cc,
        bcc, subject, message_id, size, sha256 (of the raw message),
        envelopes (each: mail_from, recipients, received_at, source,
        connector, journal recipients), journal_recipients, flags, tags
        (for a user: without the auditors' case tags), classification_tags,
        case_tags (only for those who read the whole tenant),
        attachments [{n, filename, content_type, size}]; holds (the names
        of the active legal holds that cover it: only for principals who
        may see holds)."""
        def run(t, month, raw, meta, head):
            from mailtresor.archive.archiver import case_tags, classification_tags, index_terms
            summary = meta.get("summary") or {}
            parts = parse.mime_parts(raw, self.limits)
            envelopes, journal_rcpts = [], []
            for env in sorted((meta.get("envelopes") or {}).values(), key=lambda e: e.get("received_at") or 0):
                e = {"mail_from": env.get("mail_from") or "", "recipients": list(env.get("rcpt_to") or []),
                     "received_at": iso(env.get("received_at")), "source": env.get("source"),
                     "connector": env.get("connector"), "flags": list(env.get("flags") or [])}
                j = env.get("journal")
                if j:
                    e["journal"] = {"sender": j.get("sender") or "",
                                    "recipients": [{k: r[k] for k in ("address", "expanded", "forwarded")
                                                    if r.get(k)} for r in j.get("recipients", [])]}
                    journal_rcpts += [r["address"] for r in j.get("recipients", []) if r.get("address")]
                if env.get("journal_untrusted"):
                    e["journal_untrusted"] = str(env["journal_untrusted"])
                envelopes.append(e)
            fake = parse.Parsed(message_id="", date=None, from_header="", from_=head["from"], to=head["to"],
                                cc=head["cc"], bcc=head["bcc"], subject="", body_text="", attachments=[],
                                flags=[], size=len(raw))
            tags = index_terms(meta, fake)[2]
            if not who.can("read-tenant"):        # a user's own mail: not the auditors' case tags
                from mailtresor.archive.classify import without_case_tags
                tags = without_case_tags(tags)
            date = summary.get("date") if summary.get("date") is not None else head.get("date")
            extra = {}
            if who.can("lifecycle-read") and self.lifecycle is not None:
                from mailtresor.lifecycle.holds import names_on
                extra["holds"] = names_on(self.lifecycle, self, t, aid.lower())
            return {**extra, "id": aid.lower(), "tenant": t, "date": iso(date),
                    "from": head.get("from_header") or summary.get("from") or "",
                    "to": head["to"], "cc": head["cc"], "bcc": head["bcc"],
                    "subject": head.get("subject") or summary.get("subject") or "",
                    "message_id": head.get("message_id") or "", "size": len(raw),
                    "sha256": hashlib.sha256(raw).hexdigest(), "first_seen": iso(meta.get("first_seen")),
                    "envelopes": envelopes, "journal_recipients": list(dict.fromkeys(journal_rcpts)),
                    "flags": sorted(set(summary.get("flags") or [])), "tags": tags,
                    # Which of the tags are whose (docs/lifecycle/tags.md).
                    "classification_tags": classification_tags(meta),
                    "case_tags": case_tags(meta) if who.can("read-tenant") else [],
                    "attachments": [{"n": p.n, "filename": safe_filename(p.filename, p.n),
                                     "content_type": safe_content_type(p.content_type),
                                     "size": len(p.data)} for p in parts if p.n]}
        return self._read(who, "read", aid, tenant, run)

    def raw(self, who: Principal, aid: str, *, tenant: str | None = None) -> bytes:
        """The message as it was archived, byte for byte (what `mailtresor
        show` prints)."""
        return self._read(who, "download", aid, tenant, lambda t, month, raw, meta, head: raw)

    def attachment(self, who: Principal, aid: str, n: int, *, tenant: str | None = None) -> tuple[str, str, bytes]:
        """(file name, content type, decoded bytes) of attachment `n` (as
        numbered in message()["attachments"])."""
        def run(t, month, raw, meta, head):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise NotFound("no such attachment")
            for p in parse.mime_parts(raw, self.limits):
                if p.n == n:
                    return safe_filename(p.filename, n), safe_content_type(p.content_type), p.data
            raise NotFound("no such attachment")
        return self._read(who, "download", aid, tenant, run)

    def text(self, who: Principal, aid: str, *, tenant: str | None = None) -> str:
        """A plain-text rendering: a summary of the headers, the body text
        (the text/plain parts, else the text of the HTML parts) and the
        list of attachments."""
        def run(t, month, raw, meta, head):
            parts = parse.mime_parts(raw, self.limits)
            lines = [f"From: {head.get('from_header') or ''}"]
            for name in ("to", "cc", "bcc"):
                if head.get(name):
                    lines.append(f"{name.capitalize()}: {', '.join(head[name])}")
            if head.get("date") is not None:
                lines.append(f"Date: {iso(head['date'])}")
            lines.append(f"Subject: {head.get('subject') or ''}")
            plain = [parse.decode_text(p) for p in parts if not p.n and p.content_type == "text/plain"]
            if not plain:
                plain = [parse.html_to_text(parse.decode_text(p)) for p in parts
                         if not p.n and p.content_type == "text/html"]
            body = "\n\n".join(s.replace("\r\n", "\n").strip("\n") for s in plain)
            atts = [f"[{p.n}] {safe_filename(p.filename, p.n)} ({safe_content_type(p.content_type)}, "
                    f"{len(p.data)} bytes)"
                    for p in parts if p.n]
            return "\n".join(lines) + "\n\n" + body + ("\n\nAttachments:\n" + "\n".join(atts) if atts else "") + "\n"
        return self._read(who, "read", aid, tenant, run)

    def html(self, who: Principal, aid: str, *, tenant: str | None = None) -> str:
        """An HTML rendering of the body, sanitised (mailtresor.access.render):
        no script, form, frame, style or remote content; cid: images of the
        message's own parts as data: URIs; links with rel="noopener
        noreferrer".  A message without HTML: its text, escaped, in <pre>."""
        def run(t, month, raw, meta, head):
            from mailtresor.access import render
            return render.message_html(parse.mime_parts(raw, self.limits))
        return self._read(who, "read", aid, tenant, run)

    # --- exports -----------------------------------------------------------------

    def export_start(self, who: Principal, *, tenant: str | None = None, query: str | None = None,
                     ids: list[str] | None = None, format: str = "mbox",   # noqa: A002 - the API's name
                     extra: dict[str, bytes] | None = None) -> dict:
        """Start a background export of the matches of `query`, or of the
        messages `ids` (in that order), as an mbox (mboxrd) or a zip of
        .eml files with manifest.json.  Messages outside the caller's scope
        or not stored are left out and counted as `missing` (the same for
        both: no existence leak).  `extra` (zip only): more files for the
        zip, name -> bytes, listed in the manifest's "files" (a GDPR subject
        access adds its processing report: lifecycle/gdpr.py)."""
        extra = dict(extra or {})

        def run(t):
            if format not in FORMATS:
                raise BadRequest(f"format must be one of {', '.join(FORMATS)}")
            if extra and (format != "zip" or any(not isinstance(n, str) or not _EXTRA_NAME.fullmatch(n)
                                                 or n == "manifest.json" or _AID.fullmatch(n[:40])
                                                 or not isinstance(b, bytes) for n, b in extra.items())):
                raise BadRequest("extra files go into a zip, under plain names of their own")
            if (query is None) == (ids is None):
                raise BadRequest("give either a query or a list of ids")
            scope = self._read_scope(who, export=True)
            self._expire()
            with self._jobs_lock:
                running = sum(1 for j in self._jobs.values() if j.owner == owner(who)
                              and j.state in ("queued", "running"))
            if running >= EXPORTS_RUNNING:
                raise BadRequest(f"{running} exports are running already; wait for one to finish")
            self._keep_room(owner(who))
            if ids is not None:
                if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                    raise BadRequest("ids must be a list of archive ids")
                if not ids and not extra:       # a subject access that finds nothing still has its report
                    raise BadRequest("ids is empty")
                if len(ids) > self.export_max:
                    raise BadRequest(f"{len(ids)} messages are over the export limit of {self.export_max}")
                items = [(i.lower(), None) for i in dict.fromkeys(ids)]
            else:
                prepared = self._prepared(query, scope)
                paths = self._paths(t, prepared)
                try:
                    total, _ = index.search(paths, prepared, limit=0, readers=self.readers)
                    if total > self.export_max:
                        raise BadRequest(f"the query matches {total} messages, over the export limit "
                                         f"of {self.export_max}")
                    _, hits = index.search(paths, prepared, limit=total, order="date-asc", readers=self.readers)
                except index.QueryError as e:
                    raise BadQuery(f"bad query: {e}") from None
                items = [(h.archive_id, os.path.basename(os.path.dirname(h.shard_path))) for h in hits]
            elsewhere = self._held_elsewhere(t, prepared) if ids is None else {}
            if elsewhere:
                # Not a silent partial export: the job and its audit record name them.
                detail["elsewhere"] = elsewhere
            jid = secrets.token_hex(16)
            job = _Job(id=jid, owner=owner(who), tenant=t, format=format, query=query, items=items,
                       scope=scope, created=self.clock(), extra=extra, elsewhere=elsewhere,
                       path=self.exports_dir / f"{jid}.{'mbox' if format == 'mbox' else 'zip'}")
            return job, jid
        # The job runs only once its audit record is written: an export the
        # trail could not record never produces a file.
        detail = {"format": format if format in FORMATS else "invalid",
                  "ids": len(ids) if isinstance(ids, list) else None}
        job = self._audited(who, "export", run, asked=tenant, terms=_terms(query),
                             gate=lambda: self._read_scope(who, export=True), detail=detail)
        with self._jobs_lock:
            self._jobs[job.id] = job
        job.thread = threading.Thread(target=self._run_export, args=(job,), name=f"export-{job.id[:8]}",
                                      daemon=True)
        job.thread.start()
        return job.public()

    def _held_elsewhere(self, tenant: str, prepared: index.Prepared) -> dict[str, int | None]:
        """Matches of an export's query on each peer holding the tenant
        (None: not reachable); an export carries this appliance's messages
        only (message bodies do not cross appliances)."""
        out: dict[str, int | None] = {}
        for r in self._remotes(tenant):
            down: set[str] = set()
            n, _ = index.search([r], prepared, limit=0, unavailable=down)
            if down or n:
                out[r.appliance] = None if down else n
        return out

    def _keep_room(self, who_owner: str) -> None:
        """Forget the owner's oldest finished exports (and remove their
        files) so that a new one leaves it at most EXPORTS_KEPT: one user
        starting export after export cannot fill the disk within EXPORT_TTL."""
        with self._jobs_lock:
            mine = sorted((j for j in self._jobs.values() if j.owner == who_owner), key=lambda j: j.created)
            finished = [j for j in mine if j.state in ("done", "failed")]
            drop = finished[:max(0, len(mine) - EXPORTS_KEPT + 1)]
            for j in drop:
                del self._jobs[j.id]
        for j in drop:
            try:
                os.unlink(j.path)
            except OSError:
                pass

    def _job(self, who: Principal, job_id) -> _Job:
        if not isinstance(job_id, str) or not _JOB.fullmatch(job_id):
            raise NotFound("no such export")
        self._expire()
        with self._jobs_lock:
            job = self._jobs.get(job_id)
        if job is None or job.owner != owner(who):
            raise NotFound("no such export")
        return job

    def export_status(self, who: Principal, job_id: str) -> dict:
        """The job: id, state (queued, running, done, failed), done, total,
        format, size, missing."""
        def run(_):
            job = self._job(who, job_id)
            return job.public(), job.id, job.tenant
        return self._audited(who, "export", run, resolve=False, detail={"status": True},
                             obj=job_id if isinstance(job_id, str) and len(job_id) <= 64 else None)

    def export_list(self, who: Principal) -> dict:
        """The caller's own exports, newest first: {"exports": [job, ...]},
        each as export_status gives it.  Only jobs of owner(who): another
        principal's, even an auditor's of the same tenant, are never listed
        (there are at most EXPORTS_KEPT + EXPORTS_RUNNING of them).  Needs
        the export right like export_start (an administrator is refused);
        one audit record, action "export", detail {"list": true}."""
        def run(_):
            self._expire()
            me = owner(who)
            with self._jobs_lock:
                # Newest first; jobs of the same instant in reverse start order.
                mine = [j for j in reversed(list(self._jobs.values())) if j.owner == me]
            mine.sort(key=lambda j: j.created, reverse=True)
            return {"exports": [j.public() for j in mine]}, None, who.tenant
        return self._audited(who, "export", run, resolve=False, detail={"list": True},
                             gate=lambda: self._read_scope(who, export=True))

    def export_path(self, who: Principal, job_id: str) -> Path:
        """The finished export's file (the API serves it with Range)."""
        def run(_):
            job = self._job(who, job_id)
            if job.state != "done":
                raise BadRequest(f"the export is {job.state}, not finished")
            return job.path, job.id, job.tenant
        return self._audited(who, "download", run, resolve=False,
                             obj=job_id if isinstance(job_id, str) and len(job_id) <= 64 else None)

    def wait_exports(self, timeout: float = 60.0) -> None:
        """Wait for the running exports (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._jobs_lock:
            threads = [j.thread for j in self._jobs.values() if j.thread is not None]
        for th in threads:
            th.join(max(0.0, deadline - time.monotonic()))

    def _run_export(self, job: _Job) -> None:
        part = job.path.with_suffix(job.path.suffix + ".part")
        job.state = "running"
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                if job.format == "mbox":
                    self._write_mbox(job, f)
                else:
                    self._write_zip(job, f)
                f.flush()
                os.fsync(f.fileno())
            os.rename(part, job.path)
            job.size = job.path.stat().st_size
            job.state = "done"
        except Exception as e:  # noqa: BLE001 - the job says it failed; the reason is the type only
            job.state = "failed"
            job.error = f"export failed ({type(e).__name__})"
            try:
                os.unlink(part)
            except OSError:
                pass
        job.finished = self.clock()

    def _messages(self, job: _Job):
        """(aid, raw, meta) of each message of the job the owner may read;
        the others are counted as missing."""
        for aid, month in job.items:
            try:
                if not _AID.fullmatch(aid):
                    raise NotFound()
                if job.scope is not None and month is None and not self._indexed_in_scope(job.tenant, aid,
                                                                                          job.scope):
                    raise NotFound()
                with self._store_lock:
                    if month is None:
                        month = self.store.locate(job.tenant, aid) if self.store.has_archive(job.tenant) else None
                        if month is None:
                            raise NotFound()
                    raw, meta = self.store.shard(job.tenant, month).get(aid, self.keys)
                if job.scope is not None and not self._visible(job.scope, meta, parse.headers(raw)):
                    raise NotFound()
            except NotFound:
                job.missing += 1
                job.done += 1
                continue
            yield aid, raw, meta
            job.done += 1

    def _write_mbox(self, job: _Job, f) -> None:
        for aid, raw, meta in self._messages(job):
            f.write(mbox_entry(raw, meta))
            job.size = f.tell()

    def _write_zip(self, job: _Job, f) -> None:
        manifest = {"tenant": job.tenant, "created": iso(job.created), "query": job.query, "messages": []}
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
            for aid, raw, meta in self._messages(job):
                name = f"{aid}.eml"
                z.writestr(name, raw)
                summary = meta.get("summary") or {}
                manifest["messages"].append({
                    "id": aid, "file": name, "sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw),
                    "date": iso(summary.get("date")), "first_seen": iso(meta.get("first_seen")),
                    "envelopes": [{"mail_from": e.get("mail_from") or "", "recipients": list(e.get("rcpt_to") or []),
                                   "received_at": iso(e.get("received_at")), "source": e.get("source"),
                                   "journal_recipients": [r.get("address") for r in
                                                          (e.get("journal") or {}).get("recipients", [])]}
                                  for e in (meta.get("envelopes") or {}).values()]})
                job.size = f.tell()
            manifest["missing"] = job.missing
            if job.extra:
                manifest["files"] = []
                for name, data in job.extra.items():
                    z.writestr(name, data)
                    manifest["files"].append({"file": name, "sha256": hashlib.sha256(data).hexdigest(),
                                              "size": len(data)})
            z.writestr("manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False))

    def _expire(self) -> None:
        """Forget exports older than EXPORT_TTL and remove their files."""
        now = self.clock()
        with self._jobs_lock:
            old = [j for j in self._jobs.values()
                   if j.state in ("done", "failed") and now - j.created > EXPORT_TTL]
            for j in old:
                del self._jobs[j.id]
        for j in old:
            try:
                os.unlink(j.path)
            except OSError:
                pass

    def _sweep_files(self) -> None:
        """Exports a previous process left (their jobs are gone with it):
        removed once they are older than EXPORT_TTL; unfinished ones at once."""
        now = time.time()
        for p in self.exports_dir.iterdir():
            try:
                if p.suffix == ".part" or now - p.stat().st_mtime > EXPORT_TTL:
                    p.unlink()
            except OSError:
                pass

    # --- the audit trail ---------------------------------------------------------

    def audit_records(self, who: Principal, *, tenant: str | None = None, since: int = 0, limit: int = 100,
                      principal: str | None = None, action: str | None = None, result: str | None = None,
                      after: str | None = None, before: str | None = None,
                      anomaly_count: bool = False) -> dict:
        """The tenant's audit records after `since`, search terms decrypted
        (auditors and local administrators): {"records": [...], "next":
        seq, "more": bool}.  Filters (see audit_filter): `principal` a
        login name, `action` one of audit.RECORD_ACTIONS, `result` one of
        audit.RESULTS, `after` (inclusive) / `before` (exclusive) ISO dates
        or date-times, UTC.  `next` pages on through the filtered records;
        `more` is False once the end of the trail (or of the window) is
        reached.  `anomaly_count`: also "anomalies", how many anomaly
        records the tenant has (the web UI's navigation; one record for both)."""
        asked = {k: v for k, v in (("principal", principal), ("action", action), ("result", result),
                                   ("after", after), ("before", before)) if v not in (None, "")}

        def run(t):
            self._audit_gate(who)
            since_, limit_ = self._page(since, limit)
            flt = audit_filter(**asked)
            p = self.audit.page(tenant=t, since=since_, limit=limit_, with_terms=True, filter=flt)
            doc = {"records": p.records, "next": p.next, "more": p.more}
            if anomaly_count:
                doc["anomalies"] = self._anomalies(t)[0]
            return doc, "audit"
        # The filters asked are part of the record (bounded: audit_filter
        # refuses long or odd ones before anything is read).
        shown = {k: (v if isinstance(v, str) and len(v) <= 200 else "(invalid)") for k, v in asked.items()}
        return self._audited(who, "audit-read", run, asked=tenant, obj="audit",
                             detail={"filter": shown} if shown else None)

    @staticmethod
    def _audit_gate(who: Principal) -> None:
        if not who.can("audit-read") or (who.tenant is None and who.kind != "local"):
            raise Forbidden("only auditors read the audit trail")

    def anomalies(self, who: Principal, *, tenant: str | None = None, limit: int = 100) -> dict:
        """What the archive reports as anomalies in the tenant (the trail's
        `anomaly` records: journal reports from an untrusted path,
        extraction cut short, ...): {"anomalies": the newest `limit`,
        newest first, "count": how many there are}.  The trail is read
        forward once per tenant and process, then only what was added
        since (the anomalies kept: ANOMALIES_KEPT per tenant)."""
        def run(t):
            self._audit_gate(who)
            if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= ANOMALIES_KEPT:
                raise BadRequest(f"limit must be a number from 1 to {ANOMALIES_KEPT}")
            count, kept = self._anomalies(t)
            return {"anomalies": kept[::-1][:limit], "count": count}, "anomalies"
        return self._audited(who, "audit-read", run, asked=tenant, obj="anomalies")

    def _anomalies(self, tenant: str) -> tuple[int, list[dict]]:
        """(count, the newest ANOMALIES_KEPT oldest first) of the tenant's
        anomaly records: read on from where the last call stopped."""
        with self._anomaly_lock:
            since, count, kept = self._anomaly_cache.get(tenant, (0, 0, ()))
            kept = list(kept)
            while True:
                p = self.audit.page(tenant=tenant, since=since, limit=MAX_AUDIT_PAGE, actions={"anomaly"})
                count += len(p.records)
                kept = (kept + p.records)[-ANOMALIES_KEPT:]
                since = p.next
                if not p.more:
                    break
            self._anomaly_cache[tenant] = (since, count, tuple(kept))
            return count, kept

    def audit_verify(self, who: Principal, *, tenant: str | None = None) -> dict:
        """Check the whole trail as `mailtresor audit verify` does (chain,
        seals against every version of the seal key, head file) for an
        auditor: {"sound", "problems" (the first VERIFY_SHOWN), "problem_count",
        "notes", "records", "seals", "last_seq", "last_seal" ({seq, time}
        or None)}.  It reads every record and holds the trail's shared
        lock meanwhile (appends wait): one at a time per process, on
        request only (BadRequest while one runs)."""
        from mailtresor.access import audit as trail
        from mailtresor.archive.store import KeyMissing
        from mailtresor.keys.ring import KeyUnavailable

        def run(t):
            self._audit_gate(who)
            if not self._verify_lock.acquire(blocking=False):
                raise BadRequest("a verification of the trail is running; try again when it is done")
            try:
                directory = Path(self.audit.directory)
                try:
                    rep = trail.check(directory, self.audit.keys)
                except (KeyMissing, KeyUnavailable) as e:
                    rep = trail.check(directory, None)
                    rep.problems.insert(0, f"the seal key cannot be had ({type(e).__name__}): seals were "
                                           "checked against the keys they carry only")
                try:
                    head = trail.read_head(directory)
                except trail.Malformed:
                    head = None
            finally:
                self._verify_lock.release()
            return {"sound": not rep.problems, "problems": rep.problems[:VERIFY_SHOWN],
                    "problem_count": len(rep.problems), "notes": rep.notes, "records": rep.records,
                    "seals": rep.seals, "last_seq": rep.last_seq,
                    "last_seal": {"seq": head["seal_seq"], "time": head.get("time")} if head else None}, \
                "audit-verify"
        return self._audited(who, "audit-read", run, asked=tenant, obj="audit-verify")

    def events(self, who: Principal, *, since: int = 0, limit: int = 100, tenant: str | None = None) -> dict:
        """The tenant's events for a SOC (logins, searches, reads,
        downloads, exports, administrative changes, key fetches, anomalies),
        terms left encrypted: {"events": [...], "next": seq}."""
        def run(t):
            if not who.can("events") or (who.tenant is None and who.kind != "local"):
                raise Forbidden("this principal may not read events")
            since_, limit_ = self._page(since, limit)
            from mailtresor.access.audit import EVENT_ACTIONS
            records, nxt = self.audit.read(tenant=t, since=since_, limit=limit_, actions=set(EVENT_ACTIONS))
            return {"events": records, "next": nxt}, "events"
        return self._audited(who, "audit-read", run, asked=tenant, obj="events")

    @staticmethod
    def _page(since, limit) -> tuple[int, int]:
        if isinstance(since, bool) or not isinstance(since, int) or since < 0:
            raise BadRequest("since must be a record number (0 or more)")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_AUDIT_PAGE:
            raise BadRequest(f"limit must be a number from 1 to {MAX_AUDIT_PAGE}")
        return since, limit


# --- mbox -------------------------------------------------------------------------

_FROM_LINE = re.compile(rb"^(>*From )", re.M)


def mbox_entry(raw: bytes, meta: dict) -> bytes:
    """One message of an mboxrd file: a `From ` line (the envelope sender
    and the arrival time), the message with every line that starts with
    ">*From " given one more ">", and a blank line.  Reading it back
    (mbox_messages) gives `raw` byte for byte when `raw` ends with a line
    feed (a message without one gets one)."""
    envs = sorted((meta.get("envelopes") or {}).values(), key=lambda e: e.get("received_at") or 0)
    sender = (envs[0].get("mail_from") if envs else "") or "MAILER-DAEMON"
    sender = re.sub(r"\s", "_", sender) or "MAILER-DAEMON"
    when = (envs[0].get("received_at") if envs else None) or meta.get("first_seen") or 0
    head = f"From {sender} {time.asctime(time.gmtime(float(when)))}\n".encode("utf-8", "replace")
    # Every line the pattern quotes holds "From ": without one (most
    # messages) the regex, a scan of every line start, is skipped; it was
    # a fifth of a 10,000-message export's time (docs/BENCHMARKS.md).
    body = _FROM_LINE.sub(rb">\1", raw) if b"From " in raw else raw
    if not body.endswith(b"\n"):
        body += b"\n"
    return head + body + b"\n"


def mbox_messages(data: bytes) -> list[bytes]:
    """The messages of an mboxrd file written by mbox_entry(), unquoted."""
    out = []
    chunks = re.split(rb"(?:^|\n)From [^\n]*\n", data)[1:]
    for i, c in enumerate(chunks):
        if i == len(chunks) - 1 and c.endswith(b"\n"):
            c = c[:-1]      # the blank line after the last message (the others' went with the split)
        out.append(re.sub(rb"^>(>*From )", rb"\1", c, flags=re.M))
    return out
