"""The archive's maintenance commands: verify, reindex, restore, import,
reroute, requeue.  They work on the appliance's files directly (store,
spool, backup), beside a running daemon where that is safe (the store's
writer lock, the spool's rename protocol)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from mailtresor.cli.common import (EXIT_USAGE, UserError, archive_section, backup_source, fetching_keys,
                                   known_tenant, minute)

# The store, index, spool and archiver are imported inside each command:
# every command builds the whole parser (this module's register() too), and
# `mailtresor search` must not pay for what only these commands use.


def register(subparsers) -> None:
    s = subparsers.add_parser("verify", help="check every record's hash, the chains, the seals and the index")
    s.add_argument("--tenant")
    s.add_argument("--quiet", action="store_true", help="do not list shards with unsealed entries")
    s.set_defaults(func=run_verify)

    s = subparsers.add_parser("import", help="mbox files, Maildir folders, .eml files or directories, via the spool")
    s.add_argument("--tenant", required=True, help="the tenant whose archive receives every message")
    s.add_argument("--journal-reports", action="store_true",
                   help="the files are this tenant's own Exchange journal reports (an exported journal "
                        "mailbox): unwrap them; without it a journal report is archived as it is, flagged")
    s.add_argument("--wait", type=float, default=600.0, help="seconds to wait for a running daemon to archive")
    s.add_argument("paths", nargs="+")
    s.set_defaults(func=run_import)

    s = subparsers.add_parser("reindex", help="rebuild the Xapian indexes from the store")
    s.add_argument("--tenant")
    s.add_argument("--missing", action="store_true", help="only add what the index lacks")
    s.set_defaults(func=run_reindex)

    s = subparsers.add_parser("restore", help="rebuild the store from the backup directory")
    s.add_argument("--tenant")
    s.add_argument("--from", dest="backup", help="backup directory (default: archive.backup_directory)")
    s.add_argument("--to", help="store directory to create (default: archive.directory; must be empty)")
    s.set_defaults(func=run_restore)

    s = subparsers.add_parser("reroute", help="give unrouted mail to the archiver again (after adding a tenant)")
    s.set_defaults(func=run_reroute)

    s = subparsers.add_parser(
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
    s.set_defaults(func=run_requeue)


# --- verify / reindex -------------------------------------------------------------------

def run_verify(cfg, args) -> int:
    from mailtresor.archive import index, tsa
    from mailtresor.archive.store import Store, verify_shard
    from mailtresor.keys import crypto
    from mailtresor.keys.ring import KeyUnavailable
    a = archive_section(cfg)
    tenants = [known_tenant(cfg, args.tenant)] if args.tenant else [t.name for t in cfg.tenant]
    keys = fetching_keys(cfg)
    try:
        seal_public = {crypto.ed25519_public(seed) for seed in keys.seal_seeds()}
    except KeyUnavailable as e:
        raise UserError(f"cannot get the seal key to check seals against: {e}")
    store = Store(a.directory, readonly=True)
    bad = checked = shards = tombs = 0
    try:
        for t in tenants:
            if t not in store.tenants():
                continue
            for m in store.months(t):
                shard = store.shard(t, m)
                stats: dict = {}
                problems, live = verify_shard(shard, keys, seal_public, stats)
                lines = [str(p) for p in problems]
                if a.tsa_ca_file is not None:
                    lines += tsa.check_seals(shard.tenant, shard.month, shard.seals_from(1), a.tsa_ca_file)[1]
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
                tombs += stats["tombstones"]
                shards += 1
    finally:
        store.close()
    gone = f" and {tombs} tombstone(s) of deleted ones" if tombs else ""
    print(f"verify: {checked} record(s){gone} in {shards} shard(s): "
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


def run_reindex(cfg, args) -> int:
    import shutil

    from mailtresor.archive import index, parse
    from mailtresor.archive.archiver import arrival_of, index_terms
    from mailtresor.archive.index import ShardIndex
    from mailtresor.archive.store import Store, effective_date, seal_listing
    a = archive_section(cfg)
    tenants = [known_tenant(cfg, args.tenant)] if args.tenant else [t.name for t in cfg.tenant]
    keys = fetching_keys(cfg)
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
                                      date=effective_date(p.date, arrival_of(meta)),
                                      size=len(raw), arrival=arrival_of(meta),
                                      listing=seal_listing(_listed(meta.get("summary") or {}, p), t, m,
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


def _listed(summary: dict, p) -> dict:
    """The summary a listing is sealed from: a record archived before the
    summary held the To: addresses gets them from its parse here (the
    stored summary itself never changes)."""
    if "to" in summary:
        return summary
    from mailtresor.archive.archiver import SUMMARY_TO
    return {**summary, "to": list(p.to[:SUMMARY_TO]), "to_count": len(p.to)}


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

def run_restore(cfg, args) -> int:
    from mailtresor.archive.store import BackupDirectory, restore
    a = archive_section(cfg)
    src = backup_source(a, args.backup)
    target = Path(args.to) if args.to else a.directory
    tenant = known_tenant(cfg, args.tenant) if args.tenant else None
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


def run_import(cfg, args) -> int:
    from mailtresor.assemble import build_pipeline, build_spool, build_store
    from mailtresor.ingest.spool import Envelope
    from mailtresor.archive.store import StoreLocked, WriterLock
    a = archive_section(cfg)
    tenant = known_tenant(cfg, args.tenant)
    keys = fetching_keys(cfg)
    ring = keys.ring
    spool_key = keys.fetch("spool", None)
    ring.put(spool_key, current=True)
    spool = build_spool(cfg, ring)
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
        spool = build_spool(cfg, ring, tool=True)
        store = build_store(cfg)
        pipe = build_pipeline(cfg, spool, store, keys, timestamps=False)
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
        spool = build_spool(cfg, ring, tool=True)
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
    from mailtresor.assemble import build_spool
    from mailtresor.archive.store import Store
    ring = keys.ring
    spool = build_spool(cfg, ring, tool=True)
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


def run_reroute(cfg, args) -> int:
    from mailtresor.assemble import build_spool
    from mailtresor.keys.ring import KeyRing
    spool = build_spool(cfg, KeyRing(), tool=True)
    try:
        n = spool.reroute()
    finally:
        spool.close()
    print(f"reroute: {n} unrouted message(s) back in the spool for the archiver")
    return 0


def run_requeue(cfg, args) -> int:
    """Set-aside entries (spool bad/) back into the queue: by id, or all;
    or list them with why they were set aside."""
    from mailtresor.assemble import build_spool
    from mailtresor.keys.ring import KeyRing
    from mailtresor.ingest.spool import NotSetAside
    if not (args.list or args.all or args.ids):
        raise UserError("name the entries to put back (IDs), or give --all, or --list to see them", EXIT_USAGE)
    if args.list and (args.all or args.ids):
        raise UserError("--list only lists: give it alone", EXIT_USAGE)
    if args.all and args.ids:
        raise UserError("give either --all or IDs, not both", EXIT_USAGE)
    # No key: entries move between directories as they are, still encrypted.
    spool = build_spool(cfg, KeyRing(), tool=True)
    try:
        notes = spool.set_aside_notes()
        if args.list:
            if args.json:
                print(json.dumps([{"id": i, **{k: v for k, v in n.items() if k != "id"}}
                                  for i, n in notes.items()], indent=1, sort_keys=True))
            elif not notes:
                print("requeue: nothing is set aside", file=sys.stderr)
            for i, n in ([] if args.json else notes.items()):
                when = minute(n["time"]) if isinstance(n.get("time"), (int, float)) else "?"
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


