"""Compacting closed months on a real daemon's store: the LMDB compacting
copy and the Xapian compaction shrink a shard with deletions, `verify`
passes after, search finds the same mail (a search right after a
compaction through the daemon, whose index readers were open on the old
index, too), a restore from the compacted backup log gives the same
shard, a month is compacted once while unchanged; a copy that does not
match (forged, or cut short by a crash) is never swapped in."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from mailtresor.archive import compact
from mailtresor.archive.deleter import Victim, delete_messages
from mailtresor.archive.store import BackupDirectory, Store, verify_shard
from mailtresor.archive.store.backup import verify_log
from tests.harness.stack import Stack
from tests.test_archive import ON, cli, msg, search, wait_archived
from tests.test_deletion import Piped

MONTH = "2002-08"
LATER = time.time() + 30 * 86400            # the month has been quiet for a while
TOMB = {"kind": "request", "request": "q1", "by": "aud", "reason": "Art. 17", "at": 1.0}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("compact") / "stack", ON)
    s.start()
    body = "".join(f"Line {i} of a long report about widgets and gadgets number {i * 7}.\r\n" for i in range(60))
    with s.smtp() as c:
        for i in range(40):
            c.sendmail("alice@globex.example", ["bob@acme.example"], msg(f"Report {i}", body=body))
    wait_archived(s)
    s.stop_daemon()
    yield s
    s.close()


def found(stack) -> dict[str, str]:
    return {h["subject"]: h["id"] for h in search(stack, "acme", "subject:report")}


def dump(stack) -> dict:
    st = Store(stack.cfg.archive.directory, readonly=True)
    try:
        d = st.shard("acme", MONTH).dump()
        d["state"] = {k: v for k, v in d["state"].items() if k.startswith((b"tomb:", b"head"))}
        return d
    finally:
        st.close()


def test_compaction_shrinks_a_shard_with_deletions_and_everything_still_holds(world):
    ids = found(world)
    assert len(ids) == 40
    doomed = [ids[f"Report {i}"] for i in range(0, 40, 2)]
    with Piped(world) as p:
        delete_messages(p, "acme", [Victim(a, MONTH, TOMB) for a in doomed])
        # Not yet: the month changed just now.
        (m,) = [r for r in compact.compact_closed(p, time.time(), quiet_days=7) if r["tenant"] == "acme"]
        assert m["status"] == "skipped" and "changed less than 7 day(s) ago" in m["reason"]
    kept = found(world)
    before = dump(world)
    log_path = BackupDirectory(world.cfg.archive.backup_directory).path("acme", MONTH)
    log_before = log_path.stat().st_size
    xdir = world.cfg.archive.directory / "acme" / MONTH / "xapian"
    inode = os.stat(xdir).st_ino

    with Piped(world) as p:
        out = {(r["tenant"], r["month"]): r for r in compact.compact_closed(p, LATER, quiet_days=7)}
        m = out[("acme", MONTH)]
        assert m["status"] == "compacted", m
        assert m["lmdb_after"] < m["lmdb_before"] and m["xapian_after"] < m["xapian_before"], m
        assert m["records"] == 20 and m["documents"] == 20
        assert m["backup"]["dropped"] == 40 and m["backup"]["bytes_after"] < log_before
        # Once is enough while the month does not change.
        again = {(r["tenant"], r["month"]): r for r in compact.compact_closed(p, LATER, quiet_days=7)}
        assert again[("acme", MONTH)] == {"tenant": "acme", "month": MONTH, "status": "skipped",
                                          "reason": "unchanged since its last compaction"}
        shard = p.store.shard("acme", MONTH)
        assert verify_shard(shard, p.keys, None)[0] == []
    assert os.stat(xdir).st_ino != inode
    assert sorted(os.listdir(xdir.parent)) == ["lmdb", "xapian"]      # nothing left beside them
    assert dump(world) == before
    assert found(world) == kept
    assert b"20 record(s) and 20 tombstone(s)" in cli(world, "verify", "--tenant", "acme", check=0).stderr
    problems, facts = verify_log(log_path, "acme", MONTH)
    assert problems == [] and facts["tombstones"] == 20
    assert b"all good" in cli(world, "verify-backup", check=0).stderr

    # A restore from the compacted log gives the same shard.
    root = world.cfg.archive.directory
    shutil.move(root, root.with_name("store.compacted"))
    try:
        cli(world, "restore", "--tenant", "acme", check=0)
        cli(world, "reindex", "--tenant", "acme", check=0)
        assert dump(world) == before
        cli(world, "verify", "--tenant", "acme", check=0)
        assert found(world) == kept
    finally:
        shutil.rmtree(root)
        shutil.move(root.with_name("store.compacted"), root)


def test_through_the_daemon_a_search_right_after_sees_the_compacted_index(world):
    world.start_daemon()
    try:
        ids = found(world)                         # the daemon's index readers open the shard's index
        victim = sorted(ids)[0]
        r = cli(world, "compact", "--tenant", "acme", "--month", MONTH, "--quiet-days", "0", "--json")
        doc = json.loads(r.stdout)
        assert r.returncode == 0 and doc["months"][0]["reason"] == "unchanged since its last compaction"
        # Delete one more through the store's own path, then compact through the daemon.
        world.stop_daemon()
        with Piped(world) as p:
            delete_messages(p, "acme", [Victim(ids[victim], MONTH, TOMB)])
        world.start_daemon()
        before = found(world)                      # readers open on the index about to be replaced
        assert victim not in before
        r = cli(world, "compact", "--tenant", "acme", "--month", MONTH, "--quiet-days", "0", check=0)
        assert f"acme/{MONTH}: compacted, LMDB ".encode() in r.stdout, r.stdout
        assert found(world) == before              # at once, from the new index, through the same daemon
        p = cli(world, "compact", "--month", "2002-13")
        assert p.returncode != 0 and b"YYYY-MM" in p.stderr and b"Traceback" not in p.stderr
        audit = json.loads(cli(world, "audit", "show", "--action", "admin", "--json", check=0).stdout)
        ops = [a for a in (audit if isinstance(audit, list) else audit.get("records", []))
               if (a.get("detail") or {}).get("op") == "compact"]
        assert ops and ops[-1]["result"] == "ok" and ops[-1]["object"] == f"acme/{MONTH}"
    finally:
        world.stop_daemon()
    cli(world, "verify", "--tenant", "acme", check=0)


def _month_dir(world):
    return world.cfg.archive.directory / "acme" / MONTH


def _tombstone_count(world) -> int:
    st = Store(world.cfg.archive.directory, readonly=True)
    try:
        stats: dict = {}
        verify_shard(st.shard("acme", MONTH), None, None, stats)
        return stats["tombstones"]
    finally:
        st.close()


def _due_again(world):
    """Make the month due for compaction again (one more deletion)."""
    with Piped(world) as p:
        aid = sorted(p.store.shard("acme", MONTH).ids())[0]
        delete_messages(p, "acme", [Victim(aid, MONTH, TOMB)])


def test_a_forged_or_mismatching_copy_is_never_swapped_in(world, monkeypatch):
    _due_again(world)
    before = dump(world)
    lmdb_ino = os.stat(_month_dir(world) / "lmdb").st_ino
    real = compact._make_lmdb_copy

    def forged(env, target):
        # The copy with one record's blob swapped for another's (same count,
        # same chain head): only checking the copy against its chain sees it.
        real(env, target)
        import lmdb
        e = lmdb.open(str(target), max_dbs=8, lock=False)
        try:
            recs = e.open_db(b"records")
            with e.begin(write=True) as txn:
                keys = [bytes(k) for k in txn.cursor(db=recs).iternext(values=False)]
                txn.put(keys[0], txn.get(keys[1], db=recs), db=recs)
        finally:
            e.close()
    monkeypatch.setattr(compact, "_make_lmdb_copy", forged)
    with Piped(world) as p:
        (m,) = [r for r in compact.compact_closed(p, LATER) if r["tenant"] == "acme"]
    assert m["status"] == "failed" and "does not verify" in m["reason"] and "record differs" in m["reason"]
    assert os.stat(_month_dir(world) / "lmdb").st_ino == lmdb_ino and dump(world) == before
    assert sorted(os.listdir(_month_dir(world))) == ["lmdb", "xapian"]
    monkeypatch.setattr(compact, "_make_lmdb_copy", real)

    # An index copy that lost a document.
    real_x = compact._make_xapian_copy

    def short(source, target):
        import xapian
        real_x(source, target)
        db = xapian.WritableDatabase(str(target), xapian.DB_OPEN)
        db.delete_document(next(iter(db.postlist(""))).docid)
        db.commit()
        db.close()
    monkeypatch.setattr(compact, "_make_xapian_copy", short)
    with Piped(world) as p:
        (m,) = [r for r in compact.compact_closed(p, LATER) if r["tenant"] == "acme"]
    assert m["status"] == "failed" and "compacted index differs" in m["reason"]
    assert os.stat(_month_dir(world) / "lmdb").st_ino == lmdb_ino and dump(world) == before
    assert sorted(os.listdir(_month_dir(world))) == ["lmdb", "xapian"]
    cli(world, "verify", "--tenant", "acme", check=0)


def test_a_crash_leaves_nothing_that_is_read_and_the_next_run_tidies_it(world, monkeypatch):
    d = _month_dir(world)
    kept = found(world)
    # A half-made copy (a crash while copying): ignored, removed at the next run.
    (d / "lmdb.compact").mkdir()
    (d / "lmdb.compact" / "data.mdb").write_bytes(b"\0" * 4096)
    shutil.copytree(d / "xapian", d / "xapian.compact")
    assert found(world) == kept
    cli(world, "verify", "--tenant", "acme", check=0)
    # A crash between the two plain renames of a file system without
    # RENAME_EXCHANGE: the original is back before anything opens the shard.
    os.rename(d / "lmdb", d / "lmdb.old")
    st = Store(world.cfg.archive.directory)
    try:
        assert st.shard("acme", MONTH).count() == len(kept)
    finally:
        st.close()
    assert not (d / "lmdb.old").exists()
    # The next run tidies the rest and compacts with the two-rename
    # fallback as well.
    _due_again(world)
    monkeypatch.setattr(compact, "_renameat2", lambda: None)
    with Piped(world) as p:
        (m,) = [r for r in compact.compact_closed(p, LATER) if r["tenant"] == "acme"]
    assert m["status"] == "compacted", m
    assert sorted(os.listdir(d)) == ["lmdb", "xapian"]
    assert len(found(world)) == len(kept) - 1
    cli(world, "verify", "--tenant", "acme", check=0)
    assert _tombstone_count(world) == 23


def test_what_is_due_is_decided_by_month_quiet_days_and_mark():
    now = time.mktime((2026, 12, 3, 12, 0, 0, 0, 0, 0))
    assert compact.why_not("2026-12", now, 5, 0, 0, 7) == "the current month"
    assert compact.why_not("2026-11", now, 0, 0, 0, 7) == "empty"
    assert compact.why_not("2026-11", now, 5, now - 86400, 0, 7) == "changed less than 7 day(s) ago"
    assert compact.why_not("2026-11", now, 5, now - 8 * 86400, 5, 7) == "unchanged since its last compaction"
    assert compact.why_not("2026-11", now, 6, now - 8 * 86400, 5, 7) is None


def test_ships_after_a_backup_compaction_append_and_restore_still_gives_the_same_shard(world):
    """The earlier tests compacted the log, then shipped more deletions to
    it and compacted it again: it still verifies on its own, a new ship
    appends to it, and a restore from it gives the live shard."""
    _due_again(world)                                  # one more ship after the last compaction
    backup = BackupDirectory(world.cfg.archive.backup_directory)
    problems, facts = verify_log(backup.path("acme", MONTH), "acme", MONTH)
    assert problems == [] and facts["tombstones"] == _tombstone_count(world) == 24
    before = dump(world)
    kept = found(world)
    root = world.cfg.archive.directory
    shutil.move(root, root.with_name("store.live"))
    try:
        cli(world, "restore", "--tenant", "acme", check=0)
        cli(world, "reindex", "--tenant", "acme", check=0)
        assert dump(world) == before and found(world) == kept
        cli(world, "verify", "--tenant", "acme", check=0)
    finally:
        shutil.rmtree(root)
        shutil.move(root.with_name("store.live"), root)
