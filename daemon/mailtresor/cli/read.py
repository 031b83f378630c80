"""`mailtresor search` and `mailtresor show`: reading the archive."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from mailtresor.cli.common import (EXIT_USAGE, UserError, archive_section, clip, fetching_keys, known_tenant,
                                   minute)


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "search", help="search a tenant's archive (Xapian query syntax)",
        description="Search a tenant's archive, through the running daemon, or in this process when "
                    "it does not run. Prints one line per message (id, date, sender, subject) and, on "
                    "standard error, how many matched; every search is recorded in the audit trail.")
    s.add_argument("--tenant", required=True)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--limit", type=int, default=50, help="at most this many messages (default 50)")
    s.add_argument("--offset", type=int, default=0)
    s.add_argument("--order", choices=("date-desc", "date-asc", "relevance"), default="date-desc")
    s.add_argument("query", nargs="+", help="e.g. from:alice subject:invoice date:2002-07-01..2002-08-01")
    s.set_defaults(func=run_search)

    s = subparsers.add_parser("show", help="a message's original bytes, as received")
    s.add_argument("--tenant", required=True)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--headers", action="store_true", help="only the header section")
    g.add_argument("--envelope", action="store_true", help="envelopes, journal recipients, parse flags (JSON)")
    s.add_argument("id")
    s.set_defaults(func=run_show)


def _months_in(months: list[str], bounds) -> list[str]:
    if bounds is None:
        return months
    lo, hi = bounds
    out = []
    for m in months:
        y, mo = int(m[:4]), int(m[5:7])
        start = time.mktime((y, mo, 1, 0, 0, 0, 0, 0, 0)) - 86400 * 2      # generous: time zones
        end = time.mktime((y + (mo == 12), 1 if mo == 12 else mo + 1, 1, 0, 0, 0, 0, 0, 0)) + 86400 * 2
        if (lo is None or end >= lo) and (hi is None or start <= hi):
            out.append(m)
    return out


# --- search / show ------------------------------------------------------------------

class Session:
    """Where `search` and `show` read and write.

    The command's own process: output to stdout and stderr, the store
    opened read-only, keys fetched from the control endpoint."""

    readers = None          # an index.Readers in a process that searches again and again

    def __init__(self, cfg):
        self.cfg = cfg
        self._keys = None
        self._store = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._store is not None:
            self._store.close()
            self._store = None

    def write(self, text: str) -> None:
        sys.stdout.write(text)

    def write_bytes(self, data: bytes) -> None:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    def note(self, text: str) -> None:
        print(text, file=sys.stderr)

    def keys(self):
        if self._keys is None:
            self._keys = fetching_keys(self.cfg)
        return self._keys

    def root(self):
        """A Store for what needs no environment open (months, index paths)."""
        return self._open_store()

    @contextlib.contextmanager
    def store(self):
        """The store, for reading records, metadata and the catalog."""
        yield self._open_store()

    def _open_store(self):
        if self._store is None:
            from mailtresor.archive.store import Store
            self._store = Store(archive_section(self.cfg).directory, readonly=True)
        return self._store


def run_search(cfg, args, session: Session | None = None) -> int:
    from mailtresor.archive import index
    from mailtresor.archive.store import index_listing
    archive_section(cfg)
    with session or Session(cfg) as s:
        tenant = known_tenant(cfg, args.tenant)
        query = " ".join(args.query)
        try:
            prepared = index.prepare(query)
        except index.QueryError as e:
            raise UserError(f"bad query: {e}", EXIT_USAGE)
        root = s.root()
        months = _months_in(root.months(tenant, check=False), prepared.bounds)
        total, hits = index.search(root.index_paths(tenant, months), prepared, offset=args.offset,
                                   limit=args.limit, order=args.order, readers=s.readers)
        keys = s.keys() if hits else None
        rows = []
        for h in hits:
            month = os.path.basename(os.path.dirname(h.shard_path))
            sm = index_listing(h.listing, tenant, month, h.archive_id, keys)
            if sm is None:
                with s.store() as store:
                    sm = store.stored_listing(tenant, month, h.archive_id, keys)
            rows.append({"id": h.archive_id, "shard": f"{tenant}/{month}",
                         "date": sm.get("date") if sm.get("date") is not None else h.date,
                         "from": sm.get("from", ""), "subject": sm.get("subject", ""),
                         "size": sm.get("size", h.size), "message_id": sm.get("message_id", "")})
        if args.json:
            s.write(json.dumps({"total": total, "results": rows}, indent=1, ensure_ascii=False) + "\n")
        else:
            s.write("".join(f"{r['id']}  {minute(r['date'])}  {clip(r['from'], 32):32}  {clip(r['subject'], 80)}\n"
                            for r in rows))
            s.note(f"{len(rows)} of about {total} message(s)")
    return 0


def run_show(cfg, args, session: Session | None = None) -> int:
    archive_section(cfg)
    with session or Session(cfg) as s:
        tenant = known_tenant(cfg, args.tenant)
        aid = args.id.lower()
        if len(aid) != 40 or any(c not in "0123456789abcdef" for c in aid):
            raise UserError(f"{args.id!r} is not an archive id (40 hex digits, as `search` prints)", EXIT_USAGE)
        with s.store() as store:
            # Asked first: the daemon's store is not read-only, and its
            # locate() answers "not stored" rather than "no archive".
            if not store.has_archive(tenant):
                raise UserError(f"no archive for tenant {tenant}")
            month = store.locate(tenant, aid)
            if month is None:
                raise UserError(f"no message {aid} in the archive of {tenant}")
            raw, meta = store.shard(tenant, month).get(aid, s.keys())
        if args.envelope:
            s.write(json.dumps({"id": aid, "tenant": tenant, "shard": f"{tenant}/{month}",
                                "summary": meta.get("summary"), "first_seen": meta.get("first_seen"),
                                "envelopes": meta.get("envelopes")}, indent=1, ensure_ascii=False) + "\n")
            return 0
        if args.headers:
            end = raw.find(b"\r\n\r\n")
            end2 = raw.find(b"\n\n")
            cut = min(x for x in (end if end >= 0 else len(raw), end2 if end2 >= 0 else len(raw)))
            raw = raw[:cut] + (b"\r\n" if raw[cut:cut + 1] == b"\r" else b"\n")
        s.write_bytes(raw)
    return 0

