"""Deleting mail with proof afterwards, on a real daemon's store (LMDB,
Xapian, backup directory): the deleter leaves tombstones in the chain,
`mailtresor verify` passes and counts them, the backup log carries them and
a restore reproduces the deletion, deleting twice is idempotent, the index
and the catalog forget the message (archived again, it is stored anew).
And the attacks: a record removed without a tombstone, a tombstone altered,
inserted or removed, a backup log altered -- each reported."""

from __future__ import annotations

import json
import shutil

import pytest

from mailtresor.archive import index
from mailtresor.archive.archiver import Pipeline, Router
from mailtresor.archive.deleter import Victim, delete_messages
from mailtresor.archive.store import BackupDirectory, Store, read_frames, verify_shard
from mailtresor.archive.store.backup import verify_log
from mailtresor.archive.store.chain import CHAIN_ENTRY, OP_ADD, OP_DELETE
from mailtresor.assemble import build_backup, build_keys
from tests.harness.stack import Stack
from tests.test_archive import ON, cli, msg, search, wait_archived

MONTH = "2002-08"
TOMB = {"kind": "retention", "rule": "r1", "by": "retention job", "reason": "period over", "at": 1.0}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("deletion") / "stack", ON)
    s.start()
    with s.smtp() as c:
        for i in range(8):
            c.sendmail("alice@globex.example", ["bob@acme.example"], msg(f"Doomed {i}"))
    wait_archived(s)
    s.stop_daemon()                 # seals every shard and ships the seals
    yield s
    s.close()


class Piped:
    """The archiver's pipeline over the stack's store and backup, with its
    writer lock, as Archiver.exclusive runs the deleter."""

    def __init__(self, stack):
        self.keys = build_keys(stack.cfg)
        self.store = Store(stack.cfg.archive.directory)
        self.p = Pipeline(None, self.store, self.keys, Router(stack.cfg.tenant), backup=build_backup(stack.cfg),
                          seal_seed=self.keys.seal_seed, seal_interval=0)

    def __enter__(self):
        self.p.lock.acquire()
        return self.p

    def __exit__(self, *exc):
        self.store.close()
        self.p.lock.release()


def subjects(stack) -> dict[str, str]:
    return {h["subject"]: h["id"] for h in search(stack, "acme", "subject:doomed")}


def live_ids(stack) -> set[str]:
    st = Store(stack.cfg.archive.directory, readonly=True)
    try:
        return set(st.shard("acme", MONTH).ids())
    finally:
        st.close()


def test_deletion_leaves_tombstones_and_verify_passes(world):
    ids = subjects(world)
    assert len(ids) == 8
    doomed = [ids["Doomed 0"], ids["Doomed 1"], ids["Doomed 2"]]
    with Piped(world) as p:
        out = delete_messages(p, "acme", [Victim(doomed[0], MONTH, TOMB), Victim(doomed[1], None, TOMB),
                                          Victim(doomed[2], MONTH, {**TOMB, "rule": "r2"})], now=2.0)
        assert sorted(a for a, _ in out.deleted) == sorted(doomed) and out.missing == []
        assert out.shards == [("acme", MONTH)]
        shard = p.store.shard("acme", MONTH)
        t = shard.tombstone(doomed[2])
        assert t["rule"] == "r2" and t["month"] == MONTH and t["kind"] == "retention"
        assert len(t["record_sha256"]) == 64 and not shard.has(doomed[2])
        stats: dict = {}
        problems, live = verify_shard(shard, p.keys, None, stats)
        assert problems == [] and stats == {"records": 5, "tombstones": 3}
        assert not set(doomed) & live
        # The deleter sealed the changed shard (seal_interval 0) and shipped it.
        assert shard.last_seal().seq == shard.head()[0] == shard.backup_seq()
        # The index no longer finds them; the catalog forgot them.
        assert not set(doomed) & index.ids(shard.index_dir)
        assert [p.store.locate("acme", a) for a in doomed] == [None] * 3
    r = cli(world, "verify", "--tenant", "acme", check=0)
    assert b"5 record(s) and 3 tombstone(s) of deleted ones in 1 shard(s): all good" in r.stderr, r.stderr
    assert set(subjects(world)) == {f"Doomed {i}" for i in range(3, 8)}


def test_deleting_twice_is_idempotent(world):
    ids = subjects(world)
    with Piped(world) as p:
        out = delete_messages(p, "acme", [Victim(ids["Doomed 3"], MONTH, TOMB)], now=3.0)
        assert [a for a, _ in out.deleted] == [ids["Doomed 3"]]
        head = p.store.shard("acme", MONTH).head()
        again = delete_messages(p, "acme", [Victim(ids["Doomed 3"], MONTH, TOMB),
                                            Victim(ids["Doomed 3"], None, TOMB)], now=4.0)
        assert again.deleted == [] and again.missing == [ids["Doomed 3"]] * 2 and again.shards == []
        assert p.store.shard("acme", MONTH).head() == head          # no second tombstone
    cli(world, "verify", "--tenant", "acme", check=0)


def test_backup_log_carries_tombstones_and_restore_reproduces_the_deletion(world):
    root = world.cfg.archive.directory
    backup = BackupDirectory(world.cfg.archive.backup_directory)
    path = backup.path("acme", MONTH)
    st = Store(root, readonly=True)
    try:
        shard = st.shard("acme", MONTH)
        before = shard.dump()
        tombs = {k: v for k, v in before["state"].items() if k.startswith(b"tomb:")}
    finally:
        st.close()
    assert len(tombs) == 4
    in_log = {payload[1:21]: payload[CHAIN_ENTRY.size:] for kind, _, payload in read_frames(path)
              if kind == 1 and payload[0] == OP_DELETE}
    assert {b"tomb:" + a: t for a, t in in_log.items()} == tombs
    problems, facts = verify_log(path, "acme", MONTH)
    assert problems == [] and facts["tombstones"] == 4 and facts["records"] == 4

    # Restore from the backup alone into an empty store: the same shard
    # (records, metadata, chain, seals, tombstones), no deleted record, and
    # verify passes after the index is rebuilt.
    shutil.move(root, root.with_name("store.before-restore"))
    try:
        cli(world, "restore", "--tenant", "acme", check=0)
        cli(world, "reindex", "--tenant", "acme", check=0)
        st = Store(root, readonly=True)
        try:
            after = st.shard("acme", MONTH).dump()
            assert {n: after[n] for n in ("records", "meta", "chain", "seals")} == \
                   {n: before[n] for n in ("records", "meta", "chain", "seals")}
            assert {k: v for k, v in after["state"].items() if k.startswith(b"tomb:")} == tombs
            assert not {k[5:].hex() for k in tombs} & set(st.shard("acme", MONTH).ids())
        finally:
            st.close()
        r = cli(world, "verify", "--tenant", "acme", check=0)
        assert b"and 4 tombstone(s)" in r.stderr
        assert len(subjects(world)) == 4
    finally:
        # globex's shard is not restored here: put the whole original back.
        shutil.rmtree(root)
        shutil.move(root.with_name("store.before-restore"), root)


def test_the_same_message_archived_again_is_stored_anew(world):
    ids = subjects(world)
    assert "Doomed 0" not in ids
    world.start_daemon()
    try:
        with world.smtp() as c:
            c.sendmail("alice@globex.example", ["bob@acme.example"], msg("Doomed 0"))
        wait_archived(world)
        again = subjects(world)
    finally:
        world.stop_daemon()
    st = Store(world.cfg.archive.directory, readonly=True)
    try:
        shard = st.shard("acme", MONTH)
        aid = again["Doomed 0"]
        assert shard.has(aid) and st.locate("acme", aid) == MONTH
        assert shard.tombstone(aid) is not None           # the deletion stays proven
        stats: dict = {}
        assert verify_shard(shard, None, None, stats)[0] == [] and stats == {"records": 5, "tombstones": 3}
    finally:
        st.close()
    cli(world, "verify", "--tenant", "acme", check=0)


# --- attacks ------------------------------------------------------------------------------

def _tampered(world, change) -> str:
    """Apply change(shard, txn) to the shard, run `verify`, put the shard
    back; the verify output."""
    root = world.cfg.archive.directory
    lmdb_dir = root / "acme" / MONTH / "lmdb"
    shutil.copytree(lmdb_dir, lmdb_dir.with_name("lmdb.pristine"))
    try:
        st = Store(root)
        try:
            shard = st.shard("acme", MONTH)
            with shard.env.begin(write=True) as txn:
                change(shard, txn)
        finally:
            st.close()
        r = cli(world, "verify", "--tenant", "acme", check=1)
        return r.stdout.decode()
    finally:
        shutil.rmtree(lmdb_dir)
        lmdb_dir.with_name("lmdb.pristine").rename(lmdb_dir)


def _tombstones(world) -> list[bytes]:
    st = Store(world.cfg.archive.directory, readonly=True)
    try:
        return sorted(k for k in st.shard("acme", MONTH).dump()["state"] if k.startswith(b"tomb:"))
    finally:
        st.close()


def _a_tombstone(world) -> bytes:
    return _tombstones(world)[0]


def test_a_record_removed_without_a_tombstone_is_reported(world):
    victim = sorted(live_ids(world))[0]
    out = _tampered(world, lambda sh, txn: (txn.delete(bytes.fromhex(victim), db=sh.records),
                                            txn.delete(bytes.fromhex(victim), db=sh.meta)))
    assert f"{victim}: record is missing (deleted without a tombstone)" in out


def test_a_tampered_tombstone_is_detected(world):
    key = _a_tombstone(world)

    def alter(sh, txn):
        t = json.loads(bytes(txn.get(key, db=sh.state)))
        t["reason"] = "asked by the data subject"         # a nicer story afterwards
        txn.put(key, json.dumps(t, sort_keys=True).encode(), db=sh.state)
    out = _tampered(world, alter)
    assert f"{key[5:].hex()}: tombstone differs from what the chain recorded (altered)" in out

    out = _tampered(world, lambda sh, txn: txn.delete(key, db=sh.state))
    assert f"{key[5:].hex()}: tombstone is missing" in out

    # A tombstone for a message that was never deleted (an alibi for one
    # removed by hand): not in the chain.
    live = sorted(live_ids(world) - {k[5:].hex() for k in _tombstones(world)})[0]
    out = _tampered(world, lambda sh, txn: txn.put(b"tomb:" + bytes.fromhex(live), b'{"reason": "x"}',
                                                   db=sh.state))
    assert f"{live}: tombstone is not in the chain (inserted)" in out


def test_a_tampered_backup_log_is_detected(world, tmp_path):
    src = BackupDirectory(world.cfg.archive.backup_directory).path("acme", MONTH)
    frames = list(read_frames(src))
    bad = tmp_path / "acme" / f"{MONTH}.log"
    bad.parent.mkdir()
    from mailtresor.archive.store.backup import _frame

    def write(fr):
        bad.write_bytes(b"".join(_frame(k, s, p) for k, s, p in fr))

    # A tombstone altered in the log (its frame's CRC made good again).
    i = next(i for i, (k, _, p) in enumerate(frames) if k == 1 and p[0] == OP_DELETE)
    k, s, p = frames[i]
    write(frames[:i] + [(k, s, p[:CHAIN_ENTRY.size] + p[CHAIN_ENTRY.size:].replace(b"period", b"PERIOD"))]
          + frames[i + 1:])
    problems, _ = verify_log(bad, "acme", MONTH)
    assert any("the tombstone of chain entry" in x for x in problems), problems
    # A record's blob dropped from a frame although its id was never
    # deleted: not a compacted log, a loss.
    j = next(j for j, (k, _, p) in enumerate(frames) if k == 1 and p[0] == OP_ADD
             and not any(k2 == 1 and p2[0] == OP_DELETE and p2[1:21] == p[1:21] for k2, _, p2 in frames))
    k, s, p = frames[j]
    write(frames[:j] + [(k, s, p[:CHAIN_ENTRY.size])] + frames[j + 1:])
    problems, _ = verify_log(bad, "acme", MONTH)
    assert any("has no blob and no later delete" in x for x in problems), problems
    # A chain frame removed (a deletion hidden from the backup).
    write(frames[:i] + frames[i + 1:])
    problems, _ = verify_log(bad, "acme", MONTH)
    assert any("does not link" in x or "are missing" in x for x in problems), problems
    r = cli(world, "verify-backup", "--from", str(tmp_path), check=1)
    assert f"acme/{MONTH}: ".encode() in r.stdout and b"problem(s)" in r.stderr and b"Traceback" not in r.stderr


def test_a_month_deleted_whole_gets_an_empty_index_and_takes_mail_again(world):
    """Retention by date empties old months whole: the index is swapped for
    an empty one instead of deleting document by document (the readers see
    a new directory), verify passes, and the month takes mail again."""
    import os
    xdir = world.cfg.archive.directory / "globex" / MONTH / "xapian"
    inode = os.stat(xdir).st_ino
    st = Store(world.cfg.archive.directory, readonly=True)
    try:
        every = st.shard("globex", MONTH).ids()
    finally:
        st.close()
    assert len(every) >= 8
    with Piped(world) as p:
        out = delete_messages(p, "globex", [Victim(a, None, TOMB) for a in every])
        assert len(out.deleted) == len(every)
        shard = p.store.shard("globex", MONTH)
        assert shard.count() == 0 and index.ids(shard.index_dir) == set()
        assert index.indexed_seq(shard.index_dir) == shard.head()[0]
    assert os.stat(xdir).st_ino != inode
    assert sorted(os.listdir(xdir.parent)) == ["lmdb", "xapian"]
    r = cli(world, "verify", "--tenant", "globex", check=0)
    assert f"0 record(s) and {len(every)} tombstone(s)".encode() in r.stderr, r.stderr
    assert search(world, "globex", "subject:doomed") == []
    world.start_daemon()
    try:
        with world.smtp() as c:
            c.sendmail("alice@globex.example", ["bob@acme.example"], msg("Doomed 5"))
        wait_archived(world)
        assert [h["subject"] for h in search(world, "globex", "subject:doomed")] == ["Doomed 5"]
    finally:
        world.stop_daemon()
    cli(world, "verify", "--tenant", "globex", check=0)
