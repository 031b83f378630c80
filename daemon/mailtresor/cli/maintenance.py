"""`mailtresor compact` and `mailtresor verify-backup`: space back after
deletions, and the backup checked on its own.

`compact` asks the running daemon (POST /api/v1/maintenance/compact over
its unix socket): the compaction runs on the archiver's thread under its
locks, swaps files the daemon has open, and is audited there.
`verify-backup` reads the backup directory directly: it holds no keys and
needs none (the seal key's public halves are fetched to check who sealed).
"""

from __future__ import annotations

import re
import sys


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "compact", help="compact the months that no longer change (LMDB, Xapian, backup log)",
        description="For each month before the current one with no change for --quiet-days and changed "
                    "since its last compaction: an LMDB compacting copy and a Xapian compaction, checked "
                    "against the originals and swapped in atomically, and the backup log without the "
                    "blobs of deleted messages. Runs in the daemon; audited.")
    s.add_argument("--tenant", help="only this tenant (default: every tenant)")
    s.add_argument("--month", help="only this month (YYYY-MM)")
    s.add_argument("--quiet-days", type=int, help="days without a change before a month counts as closed "
                                                  "(default: [lifecycle] compact_quiet_days, 7)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=run_compact)

    s = subparsers.add_parser(
        "verify-backup", help="check the backup logs on their own: chain, blobs, tombstones, seals",
        description="Every chain frame's hash and link, every record, metadata and tombstone against its "
                    "chain entry, a blob missing only where a later deletion removed it (a compacted "
                    "log), every seal. Needs no tenant key.")
    s.add_argument("--tenant")
    s.add_argument("--from", dest="backup", help="backup directory (default: archive.backup_directory)")
    s.set_defaults(func=run_verify_backup)


def describe(m: dict) -> str:
    """One line for one month of a compaction's answer.  Pure."""
    from mailtresor.cli.common import size
    name = f"{m['tenant']}/{m['month']}"
    if m["status"] != "compacted":
        return f"{name}: {m['status']}: {m.get('reason', '')}"
    line = (f"{name}: compacted, LMDB {size(m['lmdb_before'])} -> {size(m['lmdb_after'])}, "
            f"Xapian {size(m['xapian_before'])} -> {size(m['xapian_after'])}")
    b = m.get("backup")
    if b:
        line += f", backup log {size(b['bytes_before'])} -> {size(b['bytes_after'])}"
    return line


def run_compact(cfg, args) -> int:
    import json

    from mailtresor.cli import client
    from mailtresor.cli.common import UserError, archive_section, known_tenant
    archive_section(cfg)
    body = {}
    if args.tenant:
        body["tenant"] = known_tenant(cfg, args.tenant)
    if args.month:
        if not re.fullmatch(r"[0-9]{4}-(0[1-9]|1[0-2])", args.month):
            raise UserError(f"--month {args.month!r}: give a month as YYYY-MM")
        body["month"] = args.month
    if args.quiet_days is not None:
        body["quiet_days"] = args.quiet_days
    try:
        with client.Client(cfg.appliance.runtime_directory, timeout=24 * 3600.0) as c:
            doc = c.json("POST", f"{client.API}/maintenance/compact", body=body)
    except client.DaemonUnavailable as e:
        raise UserError(f"compaction runs in the daemon, which does not answer ({e})")
    except client.ApiError as e:
        raise UserError(f"compaction refused: {e.reason}")
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        for m in doc["months"]:
            print(describe(m))
    done = [m for m in doc["months"] if m["status"] == "compacted"]
    failed = [m for m in doc["months"] if m["status"] == "failed"]
    print(f"compact: {len(done)} month(s) compacted" + (f", {len(failed)} failed" if failed else ""),
          file=sys.stderr)
    return 1 if failed else 0


def run_verify_backup(cfg, args) -> int:
    from mailtresor.archive.store import BackupDirectory
    from mailtresor.archive.store.backup import verify_log
    from mailtresor.cli.common import UserError, archive_section, backup_source, fetching_keys, known_tenant
    from mailtresor.keys import crypto
    from mailtresor.keys.ring import KeyUnavailable
    a = archive_section(cfg)
    src = backup_source(a, args.backup)
    tenant = known_tenant(cfg, args.tenant) if args.tenant else None
    try:
        publics = {crypto.ed25519_public(seed) for seed in fetching_keys(cfg).seal_seeds()}
    except KeyUnavailable as e:
        raise UserError(f"cannot get the seal key to check seals against: {e}")
    bad = logs = entries = tombs = 0
    for t, month, path in BackupDirectory(src).logs():
        if tenant is not None and t != tenant:
            continue
        problems, facts = verify_log(path, t, month, publics)
        for p in problems:
            print(f"{t}/{month}: {p}")
        bad += len(problems)
        logs += 1
        entries += facts["entries"]
        tombs += facts["tombstones"]
    print(f"verify-backup: {entries} chain entries, {tombs} tombstone(s) in {logs} log(s): "
          + ("all good" if not bad else f"{bad} problem(s)"), file=sys.stderr)
    return 1 if bad else 0
