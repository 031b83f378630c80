"""`mailtresor`: the administrator's command line, working on the local
appliance (its configuration, spool and store).

User errors (unknown tenant, bad query, no key, unreadable configuration)
print one line naming the problem and exit non-zero; no tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from pathlib import Path

from mailtresor import CONFIG_ENV_VAR, CONFIG_PATH

EXIT_USAGE = 2
EXIT_FAIL = 1


class UserError(Exception):
    """A problem the user can fix; printed without a traceback."""

    def __init__(self, message: str, code: int = EXIT_FAIL):
        super().__init__(message)
        self.code = code


def _count(d: Path) -> int:
    try:
        return sum(1 for n in os.listdir(d) if not n.startswith("."))
    except FileNotFoundError:
        return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def daemon_status(cfg) -> dict:
    """What the daemon last published (status.json in the runtime
    directory), checked against the process table, plus what the spool
    directory shows right now."""
    doc: dict = {"daemon": "not running"}
    path = cfg.appliance.runtime_directory / "status.json"
    try:
        published = json.loads(path.read_text())
    except FileNotFoundError:
        published = None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable status file: {e}")
    if published is not None:
        alive = _pid_alive(int(published.get("pid", 0))) and published.get("state") != "stopped"
        doc["daemon"] = "running" if alive else "not running"
        doc["state"] = published.get("state")
        doc["status"] = published.get("status")
        doc["status_age_seconds"] = round(time.time() - float(published.get("time", 0)), 1)
        doc["keys"] = published.get("keys")
        doc["listeners"] = published.get("listeners")
        doc["milter"] = published.get("milter")
        doc["relay_processes"] = published.get("relay_processes")
        doc["archiver"] = published.get("archive")
        doc["query_socket"] = published.get("query_socket")
    spool = cfg.spool.directory
    names = sorted(n for n in _list(spool / "new") if not n.startswith("."))
    doc["spool"] = {"directory": str(spool), "ready": len(names),
                    "in_progress": _count(spool / "tmp"),
                    "set_aside": sum(1 for n in _list(spool / "bad") if not n.endswith(".why") and not n.startswith(".")),
                    "unrouted": _count(spool / "unrouted")}
    if names:
        try:
            oldest = (spool / "new" / names[0]).stat().st_mtime
            doc["spool"]["archive_lag_seconds"] = round(time.time() - oldest, 1)
        except FileNotFoundError:
            pass
    if cfg.archive is not None:
        doc["shards"] = _shards(cfg.archive.directory)
    doc["audit"] = _audit_status(cfg, published)
    return doc


def _audit_status(cfg, published: dict | None) -> dict:
    """The audit trail's last seal (its head file: a removed tail shows
    against it) and, from a running daemon, its last seq and unsealed count."""
    d = cfg.audit.directory
    out: dict = {"directory": str(d), "last_seal": None}
    try:
        head = json.loads((d / "head").read_text())
        out["last_seal"], out["last_seal_hash"] = head.get("seal_seq"), head.get("seal_hash")
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        out["head_error"] = f"{d / 'head'}: {getattr(e, 'strerror', None) or e}"
    if published is not None and published.get("state") != "stopped" and published.get("audit"):
        out["daemon"] = published["audit"]
    return out


def _list(d: Path) -> list[str]:
    try:
        return os.listdir(d)
    except FileNotFoundError:
        return []


def _shards(root: Path) -> list[dict]:
    from mailtresor.archive import index
    from mailtresor.archive.store import Store
    out = []
    store = Store(root, readonly=True)
    try:
        for t in store.tenants():
            for m in store.months(t):
                sh = store.shard(t, m)
                head = sh.head()[0]
                seal = sh.last_seal()
                out.append({"shard": f"{t}/{m}", "records": sh.count(), "chain": head,
                            "index_lag": max(0, head - index.indexed_seq(sh.index_dir)),
                            "backup_lag": max(0, head - sh.backup_seq()),
                            "unsealed": head - (seal.seq if seal else 0)})
    finally:
        store.close()
    return out


def cmd_status(cfg, args) -> int:
    doc = daemon_status(cfg)
    if args.json:
        print(json.dumps(doc, indent=1, sort_keys=True))
    else:
        print(f"daemon:   {doc['daemon']}" + (f" ({doc['state']}: {doc['status']})" if doc.get("state") else ""))
        for lst in doc.get("listeners") or []:
            print(f"relay:    {lst}")
        if doc.get("milter"):
            print(f"milter:   {doc['milter']}")
        if doc.get("keys"):
            print(f"keys:     {doc['keys']}")
        sp = doc["spool"]
        print(f"spool:    {sp['ready']} ready, {sp['in_progress']} being written, "
              f"{sp['set_aside']} set aside, {sp['unrouted']} unrouted ({sp['directory']})"
              + (f"; oldest waits {sp['archive_lag_seconds']}s" if "archive_lag_seconds" in sp else ""))
        if sp["set_aside"]:
            print("          set aside: `mailtresor requeue --list` says why, "
                  "`mailtresor requeue --all` puts them back")
        if doc.get("query_socket"):
            q = doc["query_socket"]
            print(f"queries:  {q['path']} ({'listening' if q['listening'] else 'not listening'}; "
                  f"{q['answered']} answered since start)")
        if doc.get("archiver"):
            ar = doc["archiver"]
            counts = (f"{ar.get('archived')} archived, {ar.get('stored')} stored, "
                      f"{ar.get('duplicates')} duplicates, {ar.get('failed')} failed since start")
            if ar.get("paused"):
                # The reason is a sentence of its own (it has colons): the counters go below.
                print(f"archiver: {ar.get('state')}")
                print(f"          {counts}")
            else:
                print(f"archiver: {ar.get('state')}: {counts}")
            if ar.get("journal_untrusted"):
                # Someone tried to pass mail off as a journal report (or a
                # journaling connector's tenant id does not match): each is
                # archived as received; flag:journal-untrusted lists them.
                print(f"archiver: {ar['journal_untrusted']} message(s) with an untrusted journal report header "
                      "archived as received (search flag:journal-untrusted)")
        au = doc["audit"]
        live = au.get("daemon") or {}
        print(f"audit:    " + (f"up to seq {live['seq']}, {live['unsealed']} unsealed; " if "seq" in live else "")
              + (f"last seal at seq {au['last_seal']}" if au["last_seal"] else "no seal yet")
              + f" ({au['directory']})" + (f"; {au['head_error']}" if "head_error" in au else "")
              + (f"; {live['error'] or live.get('seal_problem')}" if live.get("error") or live.get("seal_problem")
                 else ""))
        for sh in doc.get("shards") or []:
            print(f"shard:    {sh['shard']}: {sh['records']} records, chain {sh['chain']}, "
                  f"index lag {sh['index_lag']}, backup lag {sh['backup_lag']}, {sh['unsealed']} unsealed")
    return 0 if doc["daemon"] == "running" else 3   # 3: "not running", as LSB status actions


# --- shared helpers -------------------------------------------------------------

def _archive_cfg(cfg):
    if cfg.archive is None:
        raise UserError(f"{cfg.source}: no [archive] section: this appliance keeps no archive")
    return cfg.archive


def _tenant(cfg, name: str) -> str:
    names = [t.name for t in cfg.tenant]
    if name not in names:
        raise UserError(f"unknown tenant {name!r} (configured: {', '.join(names) or 'none'})")
    return name


def _keys(cfg):
    from mailtresor.keys.ring import KeyRing, control_fetcher
    from mailtresor.archive.store import FetchingKeys
    return FetchingKeys(KeyRing(), control_fetcher(cfg))


def _key_errors():
    from mailtresor.keys.ring import KeyUnavailable
    from mailtresor.archive.store import KeyMissing, StoreError
    return KeyUnavailable, KeyMissing, StoreError


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


def _iso(t) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(float(t)))


# --- search / show ------------------------------------------------------------------

class Session:
    """Where `search` and `show` read and write.

    This one is the command's own process: output to stdout and stderr,
    the store opened read-only, keys fetched from the control endpoint.
    When the daemon runs, the `mailtresor` command asks it instead, over
    its query socket (mailtresor.query): there the same commands run with
    the daemon's keys, its open indexes and, behind the archiver's lock,
    its store, and their output is sent back."""

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
            self._keys = _keys(self.cfg)
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
            self._store = Store(_archive_cfg(self.cfg).directory, readonly=True)
        return self._store


def cmd_search(cfg, args, session: Session | None = None) -> int:
    from mailtresor.archive import index
    from mailtresor.archive.store import index_listing
    _archive_cfg(cfg)
    with session or Session(cfg) as s:
        tenant = _tenant(cfg, args.tenant)
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
            s.write("".join(f"{r['id']}  {_iso(r['date'])}  {_clip(r['from'], 32):32}  {_clip(r['subject'], 80)}\n"
                            for r in rows))
            s.note(f"{len(rows)} of about {total} message(s)")
    return 0


def _clip(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 1] + "…"


def cmd_show(cfg, args, session: Session | None = None) -> int:
    _archive_cfg(cfg)
    with session or Session(cfg) as s:
        tenant = _tenant(cfg, args.tenant)
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


# --- verify / reindex -------------------------------------------------------------------

def cmd_verify(cfg, args) -> int:
    from mailtresor.keys import crypto
    from mailtresor.archive import index
    from mailtresor.archive.store import Store, verify_shard
    a = _archive_cfg(cfg)
    tenants = [_tenant(cfg, args.tenant)] if args.tenant else [t.name for t in cfg.tenant]
    keys = _keys(cfg)
    try:
        seal_public = {crypto.ed25519_public(seed) for seed in keys.seal_seeds()}
    except _key_errors()[0] as e:
        raise UserError(f"cannot get the seal key to check seals against: {e}")
    store = Store(a.directory, readonly=True)
    bad = checked = shards = 0
    try:
        for t in tenants:
            if t not in store.tenants():
                continue
            for m in store.months(t):
                shard = store.shard(t, m)
                problems, live = verify_shard(shard, keys, seal_public)
                lines = [str(p) for p in problems]
                if a.tsa_ca_file is not None:
                    lines += _check_timestamps(shard, a.tsa_ca_file)
                docs = index.listings(shard.index_dir)
                indexed = set(docs)
                lines += [f"{t}/{m}: {x}: not in the index (mailtresor reindex --missing mends it)"
                          for x in sorted(live - indexed)]
                lines += [f"{t}/{m}: {x}: in the index but not in the store" for x in sorted(indexed - live)]
                lines += _check_listings(t, m, docs, live, keys)
                seal = shard.last_seal()
                head = shard.head()[0]
                if head and (seal is None or seal.seq < head):
                    note = f"{t}/{m}: chain entries {(seal.seq if seal else 0) + 1}..{head} not sealed yet"
                    if not args.quiet:
                        print(note)
                for line in lines:
                    print(line)
                bad += len(lines)
                checked += len(live)
                shards += 1
    finally:
        store.close()
    print(f"verify: {checked} record(s) in {shards} shard(s): "
          + ("all good" if not bad else f"{bad} problem(s)"), file=sys.stderr)
    return 1 if bad else 0


def _check_listings(tenant: str, month: str, docs: dict, live: set, keys) -> list[str]:
    """An index document's listing (what search shows) must open for its
    own tenant, shard and id; one without a listing (an index built before
    they existed) is not a problem: search reads the store instead."""
    from mailtresor.archive.store import RecordCorrupt, open_listing
    out = []
    for aid in sorted(live & set(docs)):
        if not docs[aid]:
            continue
        try:
            open_listing(docs[aid], tenant, month, bytes.fromhex(aid), keys)
        except (RecordCorrupt, ValueError) as e:
            out.append(f"{tenant}/{month}: {aid}: the index's listing is damaged ({e}); "
                       "mailtresor reindex mends it")
    return out


def _check_timestamps(shard, ca_file) -> list[str]:
    import struct
    from mailtresor.archive import tsa
    from mailtresor.archive.store import Seal, seal_message
    out = []
    for number, raw in shard.seals_from(1):
        try:
            s = Seal.decode(number, raw)
        except (struct.error, _key_errors()[2]):
            continue                                   # reported by verify_shard
        if not s.tsa_token:
            continue
        try:
            tsa.verify(s.tsa_token, seal_message(shard.tenant, shard.month, s.seq, s.head, s.time), ca_file)
        except tsa.TimestampError as e:
            out.append(f"{shard.tenant}/{shard.month}: seal {number}: time stamp does not verify: {e}")
    return out


def _arrival(meta: dict) -> float:
    """When a record's message first arrived: its earliest envelope's
    received_at, else when it was first stored."""
    times = [e.get("received_at") for e in meta.get("envelopes", {}).values() if e.get("received_at")]
    return min(times) if times else float(meta.get("first_seen") or 0.0)


def cmd_reindex(cfg, args) -> int:
    import shutil

    from mailtresor.archive import index, parse
    from mailtresor.archive.archiver import index_terms
    from mailtresor.archive.index import ShardIndex
    from mailtresor.archive.store import Store, effective_date, seal_listing
    a = _archive_cfg(cfg)
    tenants = [_tenant(cfg, args.tenant)] if args.tenant else [t.name for t in cfg.tenant]
    keys = _keys(cfg)
    total = 0
    with _writer(a.directory):
        store = Store(a.directory)
        try:
            for t in tenants:
                for m in store.months(t):
                    shard = store.shard(t, m)
                    live = shard.ids()
                    if args.missing:
                        todo = sorted(set(live) - index.ids(shard.index_dir))
                    else:
                        shutil.rmtree(shard.index_dir, ignore_errors=True)
                        todo = live
                    # A writer per 500 documents: Xapian keeps a transaction in memory.
                    for start in range(0, max(len(todo), 1), 500):
                        with ShardIndex(shard.index_dir).writer() as w:
                            for aid in todo[start:start + 500]:
                                raw, meta = shard.get(aid, keys)
                                p = parse.parse_message(raw, parse.limits_of(a))
                                # What ingest and the archiver flagged (bare-newline,
                                # journal-untrusted...) is in the stored summary, not in
                                # the bytes: kept, so flag: and the flag facet survive.
                                for f in (meta.get("summary") or {}).get("flags") or []:
                                    if f not in p.flags:
                                        p.flags.append(f)
                                addrs, env_only, tags = index_terms(meta, p)
                                w.add(aid, p, envelope=addrs, envelope_only=env_only, tags=tags,
                                      date=effective_date(p.date, _arrival(meta)),
                                      size=len(raw),
                                      listing=seal_listing(meta.get("summary") or {}, t, m,
                                                           bytes.fromhex(aid), keys))
                            if start + 500 >= len(todo):
                                w.set_indexed_seq(shard.head()[0])
                    if todo or not args.missing:
                        print(f"{t}/{m}: {len(todo)} message(s) indexed", file=sys.stderr)
                    total += len(todo)
        finally:
            store.close()
    print(f"reindex: {total} message(s) indexed", file=sys.stderr)
    return 0


class _writer:
    """Take the store's writer lock, waiting a little for a batch of the
    running daemon to end."""

    def __init__(self, root):
        from mailtresor.archive.store import WriterLock
        self.lock = WriterLock(root)

    def __enter__(self):
        self.lock.acquire(timeout=30.0)
        return self.lock

    def __exit__(self, *exc):
        self.lock.release()


# --- restore ------------------------------------------------------------------------------

def cmd_restore(cfg, args) -> int:
    from mailtresor.archive.store import BackupDirectory, restore
    a = _archive_cfg(cfg)
    src = Path(args.backup) if args.backup else a.backup_directory
    if src is None:
        raise UserError("no backup directory: give --from or set archive.backup_directory")
    if not Path(src).is_dir():
        raise UserError(f"{src}: no such backup directory")
    target = Path(args.to) if args.to else a.directory
    tenant = _tenant(cfg, args.tenant) if args.tenant else None
    with _writer(target):
        counts = restore(BackupDirectory(src), target, tenant)
    for shard, n in sorted(counts.items()):
        print(f"{shard}: {n} record(s) restored", file=sys.stderr)
    print(f"restore: {sum(counts.values())} record(s) in {len(counts)} shard(s) into {target}; "
          "the index is derived: run `mailtresor reindex` next", file=sys.stderr)
    return 0


# --- import ---------------------------------------------------------------------------------

def _messages(paths: list[str]):
    """(label, raw bytes) of every message under the paths: .eml files,
    directories of them, Maildir folders, mbox files."""
    import mailbox
    for p in map(Path, paths):
        if not p.exists():
            yield str(p), UserError(f"{p}: no such file or directory")
        elif p.is_dir() and (p / "cur").is_dir() and (p / "new").is_dir():
            md = mailbox.Maildir(p, factory=None, create=False)
            for key in sorted(md.keys()):
                yield f"{p}:{key}", md.get_bytes(key)
        elif p.is_dir():
            for f in sorted(x for x in p.rglob("*") if x.is_file()):
                if f.suffix.lower() == ".eml" or f.parent.name in ("cur", "new"):
                    yield str(f), f.read_bytes()
        else:
            head = p.open("rb").read(5)
            if head == b"From ":
                mb = mailbox.mbox(p, factory=None, create=False)
                for i, key in enumerate(mb.keys()):
                    yield f"{p}#{i + 1}", mb.get_bytes(key)
            else:
                yield str(p), p.read_bytes()


def cmd_import(cfg, args) -> int:
    from mailtresor.archive import parse
    from mailtresor.archive.archiver import Pipeline, Router, make_parser
    from mailtresor.ingest.spool import Envelope, Spool
    from mailtresor.archive.store import BackupDirectory, Store, StoreLocked, WriterLock
    a = _archive_cfg(cfg)
    tenant = _tenant(cfg, args.tenant)
    keys = _keys(cfg)
    ring = keys.ring
    spool_key = keys.fetch("spool", None)
    ring.put(spool_key, current=True)
    sp = cfg.spool
    spool = Spool(sp.directory, ring, max_message_size=sp.max_message_size, min_free_bytes=sp.min_free_bytes,
                  max_entries=sp.max_entries, sync=sp.sync, max_tries=sp.max_tries)
    spooled: dict[str, tuple[str, str]] = {}   # spool id -> (where from, archive id)
    skipped: list[str] = []
    started = time.time()
    try:
        for label, raw in _messages(args.paths):
            if isinstance(raw, Exception):
                skipped.append(str(raw))
                continue
            if not raw.strip():
                skipped.append(f"{label}: empty")
                continue
            try:
                w = spool.open_writer(len(raw))
                w.write(raw)
                # The operator's authority: the named tenant only; and journal
                # reports are unwrapped only when the operator vouches for them
                # (mail exported from users' mailboxes may carry forged ones).
                env = Envelope(source="import", connector="import", tenant=tenant, received_at=time.time(),
                               size=len(raw), client_name=label[-200:],
                               journaling={"tenant_id": ""} if args.journal_reports else None)
                w.commit(env).result(timeout=60)
                spooled[w.id] = (label, keys.archive_id(tenant, _stored_bytes(raw, args.journal_reports)))
            except Exception as e:  # noqa: BLE001 - named, counted, the rest goes on
                skipped.append(f"{label}: {type(e).__name__}: {e}")
            _progress("spooled", len(spooled), len(skipped))
        _progress_end()
    finally:
        spool.close(timeout=60)
    # Archive: here, when no daemon is archiving; else wait for the daemon.
    lock = WriterLock(a.directory)
    ids = set(spooled)
    try:
        lock.acquire()
        mine = True
    except StoreLocked:
        mine = False
    if mine:
        spool = Spool(sp.directory, ring, min_free_bytes=0, max_tries=sp.max_tries)
        store = Store(a.directory, max_open_shards=a.max_open_shards)
        pipe = Pipeline(spool, store, keys, Router(cfg.tenant),
                        backup=BackupDirectory(a.backup_directory) if a.backup_directory else None,
                        seal_seed=keys.seal_seed, batch_size=a.batch_size,
                        parser=make_parser(a.parse_processes, parse.limits_of(a)))
        pipe.lock = lock
        pipe.hold_lock = True
        try:
            while ids & set(spool.ready()):
                r = pipe.run_batch()
                if r.waiting_for_key or r.paused:
                    raise UserError(f"cannot archive: {r.paused or r.waiting_for_key} "
                                    "(the messages wait in the spool; the daemon archives them when it can)")
                _progress("archived", len(ids - set(spool.ready())), 0)
            pipe.seal_all()
        finally:
            if pipe.parser is not None:
                pipe.parser.close()
            store.close()
            spool.close()
            lock.release()
        _progress_end()
    else:
        deadline = time.time() + args.wait
        spool = Spool(sp.directory, ring, min_free_bytes=0)
        try:
            while ids & set(spool.ready()) and time.time() < deadline:
                _progress("archived by the daemon", len(ids - set(spool.ready())), 0)
                time.sleep(0.5)
            left = ids & set(spool.ready())
        finally:
            spool.close()
        _progress_end()
        if left:
            print(f"import: {len(left)} message(s) still wait in the spool for the daemon", file=sys.stderr)
    return _import_summary(cfg, a, tenant, keys, spooled, skipped, started)


def _stored_bytes(raw: bytes, journal_reports: bool) -> bytes:
    """What the archive stores for these bytes (a journal report imported
    with --journal-reports: its original)."""
    from mailtresor.archive import journal
    if journal_reports and journal.is_journal_report(raw):
        try:
            return journal.unwrap(raw).original
        except journal.JournalError:
            pass
    return raw


_progress_shown = False


def _progress(what: str, n: int, bad: int) -> None:
    global _progress_shown
    if sys.stderr.isatty() or os.environ.get("MAILTRESOR_PROGRESS"):
        sys.stderr.write(f"\r{what}: {n}" + (f" ({bad} skipped)" if bad else "") + " " * 8)
        sys.stderr.flush()
        _progress_shown = True


def _progress_end() -> None:
    global _progress_shown
    if _progress_shown:
        sys.stderr.write("\n")
        _progress_shown = False


def _import_summary(cfg, a, tenant, keys, spooled, skipped, started) -> int:
    from mailtresor.ingest.spool import Spool
    from mailtresor.archive.store import Store
    ring = keys.ring
    spool = Spool(cfg.spool.directory, ring, min_free_bytes=0)
    reasons = spool.set_aside_reasons()
    unrouted = set(spool.unrouted_entries())
    spool.close()
    imported = duplicates = 0
    aside = []
    store = Store(a.directory, readonly=True) if (Path(a.directory) / tenant / "catalog").exists() else None
    try:
        for sid, (label, aid) in spooled.items():
            if sid in reasons:
                aside.append(f"{label}: {reasons[sid]}")
                continue
            if sid in unrouted:
                aside.append(f"{label}: held as unrouted")
                continue
            month = store.locate(tenant, aid) if store is not None else None
            meta = store.shard(tenant, month).get_meta(aid, keys) if month else None
            if not meta:
                continue                      # still waiting in the spool
            envs = meta.get("envelopes", {})
            first = min(envs, key=lambda k: (envs[k].get("received_at") or 0, k))
            if first == sid:
                imported += 1
            else:
                duplicates += 1
    finally:
        if store is not None:
            store.close()
    print(f"import into {tenant}: {imported} imported, {duplicates} duplicate(s), "
          f"{len(aside)} set aside, {len(skipped)} skipped ({time.time() - started:.1f}s)")
    for line in aside:
        print(f"  set aside: {line}")
    for line in skipped:
        print(f"  skipped: {line}")
    return 1 if (aside or skipped) else 0


def cmd_reroute(cfg, args) -> int:
    from mailtresor.keys.ring import KeyRing
    from mailtresor.ingest.spool import Spool
    spool = Spool(cfg.spool.directory, KeyRing(), min_free_bytes=0)
    try:
        n = spool.reroute()
    finally:
        spool.close()
    print(f"reroute: {n} unrouted message(s) back in the spool for the archiver")
    return 0


def cmd_requeue(cfg, args) -> int:
    """Set-aside entries (spool bad/) back into the queue: by id, or all;
    or list them with why they were set aside."""
    from mailtresor.keys.ring import KeyRing
    from mailtresor.ingest.spool import NotSetAside, Spool
    if not (args.list or args.all or args.ids):
        raise UserError("name the entries to put back (IDs), or give --all, or --list to see them", EXIT_USAGE)
    if args.list and (args.all or args.ids):
        raise UserError("--list only lists: give it alone", EXIT_USAGE)
    if args.all and args.ids:
        raise UserError("give either --all or IDs, not both", EXIT_USAGE)
    # No key: entries move between directories as they are, still encrypted.
    spool = Spool(cfg.spool.directory, KeyRing(), min_free_bytes=0)
    try:
        notes = spool.set_aside_notes()
        if args.list:
            if args.json:
                print(json.dumps([{"id": i, **{k: v for k, v in n.items() if k != "id"}}
                                  for i, n in notes.items()], indent=1, sort_keys=True))
            elif not notes:
                print("requeue: nothing is set aside", file=sys.stderr)
            for i, n in ([] if args.json else notes.items()):
                when = _iso(n["time"]) if isinstance(n.get("time"), (int, float)) else "?"
                tries = n.get("tries")
                print(f"{i}  set aside {when}" + (f" after {tries} tr{'y' if tries == 1 else 'ies'}" if tries else "")
                      + f": {n['reason']}")
            return 0
        ids = list(notes) if args.all else list(dict.fromkeys(args.ids))
        unknown = [i for i in ids if i not in notes]
        if unknown:
            # Nothing moves when one id is wrong: the command does all it was told or nothing.
            raise UserError(f"not set aside: {', '.join(unknown)} (`mailtresor requeue --list` shows what is)")
        moved, gone = 0, []
        for i in ids:
            try:
                spool.requeue(i)
                moved += 1
            except NotSetAside:
                gone.append(i)                # another requeue took it meanwhile
    finally:
        spool.close()
    for i in gone:
        print(f"requeue: {i} was no longer set aside", file=sys.stderr)
    print(f"requeue: {moved} set-aside entr{'y' if moved == 1 else 'ies'} back in the queue; "
          "the archiver takes them at its next batch, with their tries counted from zero", file=sys.stderr)
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, told the width it would use (the terminal's, less 2):
    argparse makes a formatter for every argument added and imports shutil
    to ask the terminal each time (about 2 ms of every command)."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        super().__init__(prog, indent_increment, max_help_position, _columns() - 2 if width is None else width)


@functools.cache
def _columns() -> int:
    """shutil.get_terminal_size().columns, asked once."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class _Parser(argparse.ArgumentParser):
    """Uses _HelpFormatter; add_subparsers() makes its parsers of this class too."""

    def __init__(self, *args, formatter_class=_HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def build_parser(parser_class: type = None) -> argparse.ArgumentParser:
    p = (parser_class or _Parser)(prog="mailtresor", description="mailtresor archive administration")
    p.add_argument("--config", help=f"configuration file (default ${CONFIG_ENV_VAR} or {CONFIG_PATH})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("status", help="daemon state, keys held, spool depth, archive and index lag, shards")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("search", help="search a tenant's archive (Xapian query syntax)")
    s.add_argument("--tenant", required=True)
    s.add_argument("--json", action="store_true")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--offset", type=int, default=0)
    s.add_argument("--order", choices=("date-desc", "date-asc", "relevance"), default="date-desc")
    s.add_argument("query", nargs="+", help="e.g. from:alice subject:invoice date:2002-07-01..2002-08-01")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("show", help="a message's original bytes, as received")
    s.add_argument("--tenant", required=True)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--headers", action="store_true", help="only the header section")
    g.add_argument("--envelope", action="store_true", help="envelopes, journal recipients, parse flags (JSON)")
    s.add_argument("id")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("verify", help="check every record's hash, the chains, the seals and the index")
    s.add_argument("--tenant")
    s.add_argument("--quiet", action="store_true", help="do not list shards with unsealed entries")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("import", help="mbox files, Maildir folders, .eml files or directories, via the spool")
    s.add_argument("--tenant", required=True, help="the tenant whose archive receives every message")
    s.add_argument("--journal-reports", action="store_true",
                   help="the files are this tenant's own Exchange journal reports (an exported journal "
                        "mailbox): unwrap them; without it a journal report is archived as it is, flagged")
    s.add_argument("--wait", type=float, default=600.0, help="seconds to wait for a running daemon to archive")
    s.add_argument("paths", nargs="+")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("reindex", help="rebuild the Xapian indexes from the store")
    s.add_argument("--tenant")
    s.add_argument("--missing", action="store_true", help="only add what the index lacks")
    s.set_defaults(func=cmd_reindex)

    s = sub.add_parser("restore", help="rebuild the store from the backup directory")
    s.add_argument("--tenant")
    s.add_argument("--from", dest="backup", help="backup directory (default: archive.backup_directory)")
    s.add_argument("--to", help="store directory to create (default: archive.directory; must be empty)")
    s.set_defaults(func=cmd_restore)

    s = sub.add_parser("reroute", help="give unrouted mail to the archiver again (after adding a tenant)")
    s.set_defaults(func=cmd_reroute)

    s = sub.add_parser(
        "requeue", help="put set-aside mail (spool bad/) back into the archiver's queue",
        description="Put entries the archiver set aside (spool bad/, after max_tries failures) back into "
                    "its queue, whatever they were set aside for, with their tries counted from zero. "
                    "Safe while the daemon runs. A full or failing disk sets nothing aside (the archiver "
                    "pauses; see `mailtresor status`). Unrouted mail (no tenant claims it) is not set "
                    "aside: `mailtresor reroute` gives it back after adding a tenant.")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--all", action="store_true", help="every set-aside entry")
    g.add_argument("--list", action="store_true", help="list set-aside entries and why; move nothing")
    s.add_argument("--json", action="store_true", help="with --list: machine-readable output")
    s.add_argument("ids", nargs="*", metavar="ID", help="spool entry ids (as --list shows them)")
    s.set_defaults(func=cmd_requeue)

    from mailtresor.cli import audit as cli_audit
    cli_audit.register(sub)
    from mailtresor.cli import user as cli_user              # becomes COMMAND_MODULES in cli/main.py
    cli_user.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from mailtresor import no_core_dumps, private_umask
    no_core_dumps()                       # some commands hold tenant keys and mail
    private_umask()                       # reindex/restore/import from a root shell: private files
    args = build_parser().parse_args(argv)
    from mailtresor import config as configmod     # here: --help and usage errors need none of it
    try:
        cfg = configmod.load(configmod.locate(args.config))
    except configmod.ConfigError as e:
        print(f"mailtresor: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run(cfg, args, None)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def run(cfg, args, session: Session | None) -> int:
    """Run a parsed command; a user error becomes its line and exit code."""
    note = session.note if session is not None else lambda text: print(text, file=sys.stderr)
    try:
        if session is not None:
            return args.func(cfg, args, session)
        return args.func(cfg, args)
    except UserError as e:
        note(f"mailtresor: {e}")
        return e.code
    except Exception as e:
        message = _failure(e)
        if message is None:
            raise
        note(f"mailtresor: {message}")
        return EXIT_FAIL


def _failure(e: Exception) -> str | None:
    """The line to print for a missing key or a store problem; None for
    anything else.  Their classes are looked up only in modules already
    imported (an instance cannot exist otherwise), so that `status` and
    the rest need not import the key client and the store just for this."""
    keys = sys.modules.get("mailtresor.keys.ring")
    if keys is not None and isinstance(e, keys.KeyUnavailable):
        return f"no key: {e}"
    store = sys.modules.get("mailtresor.archive.store")
    if store is not None and isinstance(e, store.StoreError):
        return str(e)
    return None


if __name__ == "__main__":
    # Run as mailtresor.cli.main, not as a second copy named __main__: command
    # modules (cli/audit.py) raise mailtresor.cli.main.UserError, which run() catches.
    from mailtresor.cli import main as _cli
    sys.exit(_cli.main())
