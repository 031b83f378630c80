"""`mailtresor search` and `mailtresor show`: reading the archive.

A thin adapter over the access core (mailtresor.access.core), which alone
checks who may see what and writes the audit record.  Two ways to reach it,
with the same answers:

- the daemon runs: over its API socket (RUNTIME_DIRECTORY/api.sock, see
  cli/client.py), where the daemon's core answers with its keys and open
  indexes, and audits the socket's peer as a local principal;
- it does not (no socket, connection refused): a core in this process, over
  the store opened read-only, keys fetched from the control endpoint, the
  same audit trail, and a local principal for the user running the command.

Either way the answer is the core's: a document, or an error with an HTTP
status and a reason.  This module turns both into the same output, error
lines and exit codes (tests/test_read.py runs every case both ways).
"""

from __future__ import annotations

import json
import os
import sys

from mailtresor.cli.common import (EXIT_FAIL, EXIT_USAGE, UserError, archive_section, clip, fetching_keys,
                                   known_tenant, minute)

MAX_PAGE = 200          # the core's largest page; longer listings are fetched page by page


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "search", help="search a tenant's archive (Xapian query syntax)",
        description="Search a tenant's archive, through the running daemon, or in this process when "
                    "it does not run. Prints one line per message (id, date, sender, subject) and, on "
                    "standard error, how many matched; every search is recorded in the audit trail.")
    s.add_argument("--tenant", required=True)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--limit", type=_positive, default=50, help="at most this many messages (default 50)")
    s.add_argument("--offset", type=_count, default=0, help="leave out the first N matches (default 0)")
    s.add_argument("--order", choices=("date-desc", "date-asc", "relevance"), default="date-desc")
    s.add_argument("query", nargs="+", help="e.g. from:alice subject:invoice date:2002-07-01..2002-08-01 has:attachment "
                        "(-has:attachment: without)")
    s.set_defaults(func=run_search)

    s = subparsers.add_parser("show", help="a message's original bytes, as received")
    s.add_argument("--tenant", required=True)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--headers", action="store_true", help="only the header section")
    g.add_argument("--envelope", action="store_true", help="envelopes, journal recipients, parse flags (JSON)")
    s.add_argument("id")
    s.set_defaults(func=run_show)


def _positive(text: str) -> int:
    return _number(text, 1)


def _count(text: str) -> int:
    return _number(text, 0)


def _number(text: str, least: int) -> int:
    import argparse
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}: {n}")
    return n


# --- the two ways to the core --------------------------------------------------------------

class AccessFailed(Exception):
    """The core's refusal, whichever way it came: HTTP status and reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Unavailable(Exception):
    """The daemon does not answer on its socket."""


class Daemon:
    """The core of the running daemon, over its API socket."""

    def __init__(self, runtime_directory):
        # Here, not at the top: every command builds the parser (imports this
        # module); only search and show need HTTP.
        from mailtresor.cli import client
        self.client = client
        self.conn = client.Client(runtime_directory)

    def _call(self, fn, *a):
        try:
            return fn(*a)
        except self.client.ApiError as e:
            raise AccessFailed(e.status, e.reason) from None
        except self.client.DaemonUnavailable as e:
            raise Unavailable(str(e)) from None

    def search(self, tenant, *, query, cursor, limit, order) -> dict:
        return self._call(self.conn.json, "GET", f"{self.client.API}/search",
                          {"tenant": tenant, "q": query, "cursor": cursor, "limit": limit, "order": order})

    def message(self, tenant, aid) -> dict:
        return self._call(self.conn.json, "GET", self._path(aid), {"tenant": tenant})

    def raw(self, tenant, aid) -> bytes:
        return self._call(self.conn.bytes, self._path(aid) + "/raw", {"tenant": tenant})

    def _path(self, aid: str) -> str:
        return f"{self.client.API}/messages/{self.client.quote(aid)}"

    def close(self) -> None:
        self.conn.close()


class InProcess:
    """A core of this process's own (the daemon does not run): the store
    read-only, keys fetched from the control endpoint, the daemon's audit
    trail (appended under its lock), a local principal for this user."""

    def __init__(self, cfg):
        from mailtresor.access.core import AccessError
        from mailtresor.access.principal import Principal
        self.cfg = cfg
        self._errors = AccessError
        uid = os.geteuid()
        # The principal the daemon makes of a socket peer (client
        # "unix:uid=...,pid=..."), but "local:": the trail tells that the
        # command read the archive in its own process.
        self.who = Principal(kind="local", name=f"uid={uid}", tenant=None, roles=frozenset(),
                             client=f"local:uid={uid},pid={os.getpid()}")
        self._core = None
        self._closing: list = []

    def core(self):
        if self._core is None:
            self._core = self._build()
        return self._core

    def _build(self):
        import shutil
        import tempfile

        from mailtresor import assemble
        archive_section(self.cfg)               # a UserError naming the missing [archive]
        keys = fetching_keys(self.cfg)
        store = assemble.build_store(self.cfg, readonly=True)
        self._closing.append(store.close)
        audit = assemble.build_audit(self.cfg, keys, name="mailtresor")
        self._closing.append(lambda: audit.close(seal=False))
        # search and show export nothing; the core wants a directory of its
        # own for exports all the same (not the daemon's: root would own it).
        exports = tempfile.mkdtemp(prefix="mailtresor-cli-")
        self._closing.append(lambda: shutil.rmtree(exports, ignore_errors=True))
        return assemble.build_core(self.cfg, store, keys, audit, exports_dir=exports)

    def _call(self, method: str, *a, **kw):
        try:
            return getattr(self.core(), method)(self.who, *a, **kw)
        except self._errors as e:
            raise AccessFailed(e.status, e.reason) from None

    def search(self, tenant, *, query, cursor, limit, order) -> dict:
        return self._call("search", tenant=tenant, query=query, cursor=cursor, limit=limit, order=order)

    def message(self, tenant, aid) -> dict:
        return self._call("message", aid, tenant=tenant)

    def raw(self, tenant, aid) -> bytes:
        return self._call("raw", aid, tenant=tenant)

    def close(self) -> None:
        while self._closing:
            self._closing.pop()()


class WentAway(Exception):
    """The daemon answered, then went away: what it gave (a cursor) means
    nothing to a core of our own; start again."""


class Reader:
    """The daemon's core while it answers; from the first request it does
    not (no socket, connection refused), a core in this process."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.way = Daemon(cfg.appliance.runtime_directory)
        self.own = False                   # the way is a core of our own
        self.answered = False              # the daemon has answered a request

    def _do(self, method: str, *a, **kw):
        if not self.own:
            try:
                value = getattr(self.way, method)(*a, **kw)
                self.answered = True
                return value
            except Unavailable:
                self.way.close()
                self.way, self.own = InProcess(self.cfg), True
                if self.answered:
                    raise WentAway() from None
        return getattr(self.way, method)(*a, **kw)

    def search(self, tenant, **kw) -> dict:
        return self._do("search", tenant, **kw)

    def message(self, tenant, aid) -> dict:
        return self._do("message", tenant, aid)

    def raw(self, tenant, aid) -> bytes:
        return self._do("raw", tenant, aid)

    def close(self) -> None:
        self.way.close()


def _failed(e: AccessFailed) -> UserError:
    """The one line and exit code for a refusal of the core: its reason;
    exit 2 for a bad request (a usage error), else 1."""
    return UserError(e.reason, EXIT_USAGE if e.status == 400 else EXIT_FAIL)


# --- the commands -----------------------------------------------------------------------------

def run_search(cfg, args) -> int:
    archive_section(cfg)
    tenant = known_tenant(cfg, args.tenant)
    query = " ".join(args.query)
    want = args.offset + args.limit
    core = Reader(cfg)
    try:
        rows, page = _rows(core, tenant, query, args.order, want)
    except AccessFailed as e:
        raise _failed(e) from None
    finally:
        core.close()
    rows = rows[args.offset:]
    total = page["total"]
    if args.json:
        sys.stdout.write(json.dumps({"total": total, "results": rows}, indent=1, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write("".join(f"{r['id']}  {minute(r.get('date'))}  {clip(r.get('from', ''), 32):32}  "
                                 f"{clip(r.get('subject', ''), 80)}\n" for r in rows))
        print(f"{len(rows)} of about {total} message(s)", file=sys.stderr)
    return 0


def _rows(core, tenant: str, query: str, order: str, want: int) -> tuple[list, dict]:
    """_pages(), once more from the start if the daemon went away between two."""
    try:
        return _pages(core, tenant, query, order, want)
    except WentAway:
        return _pages(core, tenant, query, order, want)


def _pages(core, tenant: str, query: str, order: str, want: int) -> tuple[list, dict]:
    """The first `want` rows, page by page (the core gives at most MAX_PAGE
    at a time; a cursor is good only in the process that made it, so the
    paging stays in this command), and the last page."""
    rows: list = []
    cursor = None
    while True:
        page = core.search(tenant, query=query, cursor=cursor, order=order, limit=min(MAX_PAGE, want - len(rows)))
        rows += page["results"]
        cursor = page.get("next_cursor")
        if not cursor or len(rows) >= want:
            return rows, page


def run_show(cfg, args) -> int:
    archive_section(cfg)
    tenant = known_tenant(cfg, args.tenant)
    aid = args.id.lower()
    if len(aid) != 40 or any(c not in "0123456789abcdef" for c in aid):
        raise UserError(f"{args.id!r} is not an archive id (40 hex digits, as `search` prints)", EXIT_USAGE)
    core = Reader(cfg)
    try:
        if args.envelope:
            doc = core.message(tenant, aid)
            sys.stdout.write(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
            return 0
        raw = core.raw(tenant, aid)
    except AccessFailed as e:
        if e.status == 404:
            raise UserError(f"no message {aid} in the archive of {tenant}") from None
        raise _failed(e) from None
    finally:
        core.close()
    if args.headers:
        end = raw.find(b"\r\n\r\n")
        end2 = raw.find(b"\n\n")
        cut = min(end if end >= 0 else len(raw), end2 if end2 >= 0 else len(raw))
        raw = raw[:cut] + (b"\r\n" if raw[cut:cut + 1] == b"\r" else b"\n")
    sys.stdout.flush()
    sys.stdout.buffer.write(raw)
    sys.stdout.buffer.flush()
    return 0
