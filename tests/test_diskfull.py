"""Issue 12, part 5: a full disk pauses the archive; nothing is set aside for it.

On a real small file system (a tmpfs mounted for the test): the archiver's
pipeline with a real spool, store, index and backup directory, and the real
daemon behind the relay.  The disk fills, mail keeps coming, the archiver
pauses with the reason in `status`, no entry is set aside and no try is
counted; space returns, everything is archived and `verify` passes.  Plus
`mailtresor requeue` for what was set aside, and private modes whatever
the umask."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailtresor.archive import index
from mailtresor.archive.archiver import Pipeline, Router
from mailtresor.config import Tenant
from mailtresor.keys.ring import KeyMaterial, KeyRing
from mailtresor.ingest.spool import Envelope, Spool
from mailtresor.archive.store import BackupDirectory, Keys, Store, restore, verify_shard
from tests.conftest import REPO
from tests.harness.stack import Stack


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


needs_mount = pytest.mark.skipif(not _can_mount(), reason="mounting a tmpfs needs root")


@contextlib.contextmanager
def small_fs(path: Path, size: str, kind: str = "tmpfs"):
    """A tmpfs (or a loop-mounted ext4 image, no blocks reserved for root)
    of `size` at `path`, unmounted (lazily if busy) on the way out."""
    path.mkdir(parents=True, exist_ok=True)
    if kind == "ext4":
        image = path.with_name(path.name + ".img")
        subprocess.run(["truncate", "-s", size.upper(), str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(path)], check=True)
    else:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(fs: Path, leave: int = 0) -> Path:
    """Fill the file system but `leave` bytes (a file `filler`); the caller
    deletes it to give the space back."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            st = os.statvfs(fs)
            room = st.f_bavail * st.f_frsize - leave
            if room <= 0:
                break
            try:
                os.write(fd, b"\0" * min(room, 1 << 20))
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    return filler


def noise(n: int, seed: int) -> str:
    """Text that zstd cannot shrink much (each message takes room on disk)
    in words too long to index (the index stays small)."""
    h = os.urandom(n // 2).hex()
    return "\r\n".join(h[i:i + 998] for i in range(0, len(h), 998)) + f"\r\n{seed}\r\n"


def raw_msg(n: int, to: str = "b@acme.example", size: int = 24_000) -> bytes:
    return (f"From: a@elsewhere.example\r\nTo: {to}\r\nSubject: message {n}\r\n"
            f"Date: Thu, 22 Aug 2002 10:00:00 +0000\r\nMessage-ID: <{n}.{os.getpid()}@elsewhere.example>\r\n\r\n"
            + noise(size, n)).encode()


def spool_one(spool: Spool, raw: bytes, to: str = "b@acme.example") -> str:
    w = spool.open_writer(0)
    w.write(raw)
    return w.commit(Envelope(source="relay", mail_from="a@elsewhere.example",
                             rcpt_to=[a.strip() for a in to.split(",")])).result()


def ring_for(*tenants: str) -> KeyRing:
    ring = KeyRing()
    for name in ("spool", "seal", *(f"tenant.{t}" for t in tenants)):
        ring.put(KeyMaterial(name, 1, os.urandom(32)), current=True)
    return ring


def drain(pipe: Pipeline, spool: Spool, batches: int = 20) -> None:
    for _ in range(batches):                       # bounded
        if not spool.ready():
            return
        pipe.run_batch()
    assert spool.ready() == []


def check_store(store: Store, keys: Keys, tenant: str, want: int) -> None:
    """Every record is there, the chain and records verify, the index holds
    exactly the live ids and is complete up to the chain head."""
    total = 0
    for m in store.months(tenant):
        shard = store.shard(tenant, m)
        problems, live = verify_shard(shard, keys, None)
        assert problems == []
        assert index.ids(shard.index_dir) == live
        assert index.indexed_seq(shard.index_dir) == shard.head()[0]
        total += len(live)
    assert total == want


# --- the pipeline on a full store file system -----------------------------------------

@needs_mount
@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
@pytest.mark.parametrize("leave", [0, 48 << 10], ids=["no-room", "room-for-half-a-batch"])
def test_full_store_pauses_and_sets_nothing_aside(tmp_path, leave, kind):
    """Today's loss: a full store file system set aside every waiting entry
    (bad/) after max_tries batches.  Now: no try counted, nothing set
    aside, the reason says what and where; space returns and everything is
    archived, the chain verifies, the index is complete, the backup
    restores.  `leave` > 0 makes the disk fill in the middle of a commit
    (LMDB then reports a short write as an I/O error)."""
    if kind == "ext4" and not shutil.which("mkfs.ext4"):
        pytest.skip("no mkfs.ext4")
    with small_fs(tmp_path / "fs", "8m", kind) as fs:
        ring = ring_for("acme", "globex")
        keys = Keys(ring)
        spool = Spool(tmp_path / "spool", ring, max_tries=2, sync="fsync")     # elsewhere: accepting goes on
        store = Store(fs / "store")
        backup = BackupDirectory(fs / "backup")
        pipe = Pipeline(spool, store, keys, Router([Tenant("acme", ("acme.example",)),
                                                    Tenant("globex", ("globex.example",))]),
                        backup=backup, batch_size=8)
        try:
            for n in range(3):                     # the shards exist before the disk fills
                to = "b@acme.example, c@globex.example"
                spool_one(spool, raw_msg(n, to), to)
            drain(pipe, spool)
            filler = fill(fs, leave)
            waiting = [spool_one(spool, raw_msg(n)) for n in range(3, 15)]
            results = [pipe.run_batch() for _ in range(spool.max_tries + 3)]
            assert os.listdir(spool.bad_dir) == [], "entries were set aside for a full disk"
            assert os.listdir(spool.tries_dir) == [], "tries were counted for a full disk"
            assert sorted(spool.ready()) == sorted(waiting)
            assert all(r.archived == 0 and r.failed == 0 and r.set_aside == 0 for r in results)
            why = results[-1].paused
            assert why.startswith(f"store file system full ({fs / 'store'}): "), why
            assert "No space left on device" in why
            assert pipe.totals.paused == why and pipe.totals.failed == 0

            filler.unlink()                        # space returns
            drain(pipe, spool)
            assert pipe.totals.paused == "" and os.listdir(spool.bad_dir) == []
            check_store(store, keys, "acme", 15)
            check_store(store, keys, "globex", 3)
            store.close()
            restored = tmp_path / "restored"
            counts = restore(backup, restored)     # no gap in the backup logs
            assert sum(counts.values()) == 18
        finally:
            store.close()
            spool.close()


@needs_mount
def test_a_new_shard_on_a_full_disk_neither_crashes_nor_leaves_debris(tmp_path):
    """A month and a tenant the store has not seen yet: LMDB would make a
    sparse lock file and SIGBUS the process at its first touch on a full
    tmpfs; and a data.mdb left empty by a failed creation is a shard that
    no reader can open.  The pipeline runs in a child process so that a
    SIGBUS fails this test instead of killing pytest."""
    with small_fs(tmp_path / "fs", "2m") as fs:
        code = f"""
import os, sys
sys.path.insert(0, {str(REPO / 'daemon')!r}); sys.path.insert(0, {str(REPO)!r})
from tests.test_diskfull import *
fs = Path({str(fs)!r})
ring = ring_for("acme")
spool = Spool(Path({str(tmp_path / 'spool')!r}), ring, max_tries=2, sync="fsync")
store = Store(fs / "store")
os.makedirs(fs / "store", mode=0o700)
filler = fill(fs)
pipe = Pipeline(spool, store, Keys(ring), Router([Tenant("acme", ("acme.example",))]), batch_size=8)
ids = [spool_one(spool, raw_msg(n)) for n in range(4)]
for _ in range(4):
    r = pipe.run_batch()
assert os.listdir(spool.bad_dir) == [] and sorted(spool.ready()) == sorted(ids), (os.listdir(spool.bad_dir), r)
assert r.paused.startswith("store file system full"), r.paused
assert Store(fs / "store", readonly=True).months("acme") == []
filler.unlink()
drain(pipe, spool)
check_store(store, Keys(ring), "acme", 4)
store.close(); spool.close()
print("ok")
"""
        p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=120)
        assert p.returncode == 0 and p.stdout.strip() == b"ok", (p.returncode, p.stderr.decode()[-3000:])


@needs_mount
def test_backup_on_a_full_disk_pauses_and_leaves_no_gap(tmp_path):
    """The backup log's file system fills in the middle of an append:
    write(2) returns short before it fails.  Taken as whole, the backup
    mark moved past frames the log never got, and the next append (after
    the torn tail was dropped) left a gap that `restore` refuses.  Now the
    append fails, the archiver pauses (backup ...: full), and after the
    space returns the log restores to the same shard."""
    with small_fs(tmp_path / "fs", "2m") as fs:
        ring = ring_for("acme")
        keys = Keys(ring)
        spool = Spool(tmp_path / "spool", ring, max_tries=2, sync="fsync")
        store = Store(tmp_path / "store")
        backup = BackupDirectory(fs / "backup")
        pipe = Pipeline(spool, store, keys, Router([Tenant("acme", ("acme.example",))]), backup=backup,
                        batch_size=8)
        try:
            spool_one(spool, raw_msg(0))
            drain(pipe, spool)
            filler = fill(fs, leave=40 << 10)     # room for two or three frames of eight
            waiting = [spool_one(spool, raw_msg(n)) for n in range(1, 9)]
            r = pipe.run_batch()
            left = spool.ready()
            filler.unlink()
            drain(pipe, spool)
            check_store(store, keys, "acme", 9)
            month = store.months("acme")[0]
            before = store.shard("acme", month).dump()
            store.close()
            restore(backup, tmp_path / "restored")     # before the fix: records missing from the backup
            again = Store(tmp_path / "restored")
            try:
                after = again.shard("acme", month).dump()
            finally:
                again.close()
            assert after["records"] == before["records"] and after["chain"] == before["chain"]
            assert r.paused.startswith(f"backup file system full ({fs / 'backup'}): "), r.paused
            assert sorted(left) == sorted(waiting) and os.listdir(spool.bad_dir) == [], r
        finally:
            store.close()
            spool.close()


@needs_mount
def test_full_index_pauses_and_the_index_is_whole_after(tmp_path):
    """The shard's Xapian directory on a file system of its own, filled:
    the records commit, Xapian fails (`Error writing block N (No space left
    on device)`), the archiver pauses with no try counted; after the space
    returns the entries come again and the index holds every live id, up
    to the chain head."""
    ring = ring_for("acme")
    keys = Keys(ring)
    spool = Spool(tmp_path / "spool", ring, max_tries=2, sync="fsync")
    store = Store(tmp_path / "store")
    pipe = Pipeline(spool, store, keys, Router([Tenant("acme", ("acme.example",))]), batch_size=8)
    try:
        spool_one(spool, raw_msg(0))
        drain(pipe, spool)
        xdir = store.shard("acme", store.months("acme")[0]).index_dir
        store.close()
        saved = tmp_path / "saved-index"
        shutil.copytree(xdir, saved)
        with small_fs(xdir, "2m") as fs:
            shutil.copytree(saved, fs, dirs_exist_ok=True)
            filler = fill(fs)
            waiting = [spool_one(spool, raw_msg(n, size=2_000) + b" ".join(
                b"word%d%d" % (n, i) for i in range(500))) for n in range(1, 9)]
            rs = [pipe.run_batch() for _ in range(spool.max_tries + 2)]
            assert sorted(spool.ready()) == sorted(waiting)
            assert os.listdir(spool.bad_dir) == [] and os.listdir(spool.tries_dir) == []
            assert rs[-1].paused == f"index file system full ({xdir}): No space left on device", rs[-1]
            assert rs[0].stored == 8 and rs[-1].duplicates == 8       # stored once, indexed when it can be
            filler.unlink()
            r = pipe.run_batch()
            assert r.archived == 8, (r, os.statvfs(fs).f_bavail)
            check_store(store, keys, "acme", 9)
            store.close()
    finally:
        store.close()
        spool.close()


@needs_mount
def test_read_only_store_pauses(tmp_path):
    """A store remounted read-only (what ext4 does after an I/O error)."""
    with small_fs(tmp_path / "fs", "4m") as fs:
        ring = ring_for("acme")
        spool = Spool(tmp_path / "spool", ring, max_tries=2, sync="fsync")
        store = Store(fs / "store")
        pipe = Pipeline(spool, store, Keys(ring), Router([Tenant("acme", ("acme.example",))]), batch_size=8)
        try:
            spool_one(spool, raw_msg(0))
            drain(pipe, spool)
            subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
            ids = [spool_one(spool, raw_msg(n)) for n in range(1, 4)]
            rs = [pipe.run_batch() for _ in range(4)]
            assert sorted(spool.ready()) == sorted(ids)
            assert os.listdir(spool.bad_dir) == [] and os.listdir(spool.tries_dir) == []
            assert rs[-1].paused.startswith(f"store file system read-only ({fs / 'store'}): "), rs[-1].paused
            subprocess.run(["mount", "-o", "remount,rw", str(fs)], check=True)
            drain(pipe, spool)
            check_store(store, Keys(ring), "acme", 4)
        finally:
            store.close()
            spool.close()


def test_a_message_at_fault_still_counts_tries(tmp_path):
    """Only storage faults pause: an entry that cannot be read (its own
    fault) is still tried max_tries times and set aside, and the rest goes on."""
    ring = ring_for("acme")
    spool = Spool(tmp_path / "spool", ring, max_tries=2, sync="fsync")
    store = Store(tmp_path / "store")
    pipe = Pipeline(spool, store, Keys(ring), Router([Tenant("acme", ("acme.example",))]), batch_size=8)
    try:
        bad = spool_one(spool, raw_msg(0))
        good = spool_one(spool, raw_msg(1))
        path = spool.new_dir / bad
        data = bytearray(path.read_bytes())
        data[-5] ^= 1                              # a torn/tampered entry
        path.write_bytes(bytes(data))
        r1, r2 = pipe.run_batch(), pipe.run_batch()
        assert r1.paused == "" and r1.archived == 1 and r1.failed == 1
        assert r2.set_aside == 1 and spool.set_aside_entries() == [bad] and spool.ready() == []
        assert good not in spool.set_aside_entries()
    finally:
        store.close()
        spool.close()


def test_storage_fault_reads_oserror_lmdb_and_xapian():
    import lmdb
    import xapian

    from mailtresor.archive.store import storage_fault
    assert storage_fault(OSError(errno.ENOSPC, "x")) == ("file system full", os.strerror(errno.ENOSPC))
    assert storage_fault(OSError(errno.EDQUOT, "x"))[0] == "quota exceeded"
    assert storage_fault(OSError(errno.EROFS, "x"))[0] == "file system read-only"
    assert storage_fault(OSError(errno.EIO, "x"))[0] == "I/O error"
    assert storage_fault(lmdb.Error("mdb_txn_commit: Input/output error"))[0] == "I/O error"
    assert storage_fault(lmdb.DiskError("/x: No space left on device"))[0] == "file system full"
    assert storage_fault(lmdb.MapFullError("mdb_put: MDB_MAP_FULL"))[0] == "shard map full"
    assert storage_fault(xapian.DatabaseError("Error writing block 0", "", "No space left on device"))[0] \
        == "file system full"
    try:
        try:
            raise OSError(errno.ENOSPC, "inner")
        except OSError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as e:
        assert storage_fault(e)[0] == "file system full"
    # A message's own faults are not storage faults.
    for e in (ValueError("bad"), KeyError("x"), OSError(errno.ENOENT, "gone"), lmdb.BadValsizeError("x"),
              xapian.DatabaseCorruptError("broken")):
        assert storage_fault(e) is None, e


# --- requeue ---------------------------------------------------------------------------

def test_requeue_puts_back_resets_tries_and_names_unknown_ids(tmp_path):
    from mailtresor.ingest.spool import NotSetAside
    ring = ring_for("acme")
    spool = Spool(tmp_path / "spool", ring, max_tries=2, sync="fsync")
    try:
        a, b = spool_one(spool, raw_msg(0)), spool_one(spool, raw_msg(1))
        assert not spool.failed(a, "cannot prepare: ValueError")
        assert spool.failed(a, "cannot prepare: ValueError")      # set aside after 2
        spool.set_aside(b, "by hand")
        notes = spool.set_aside_notes()
        assert notes[a]["reason"] == "cannot prepare: ValueError" and notes[a]["tries"] == 2
        assert notes[b]["reason"] == "by hand"
        spool.requeue(a)
        assert spool.ready() == [a] and spool.tries(a) == 0
        assert not (spool.bad_dir / f"{a}.why").exists()
        with pytest.raises(NotSetAside, match="not set aside"):
            spool.requeue(a)
        with pytest.raises(NotSetAside, match="not a spool entry id"):
            spool.requeue("../new/x")
        assert spool.set_aside_entries() == [b]
    finally:
        spool.close()


def _cli(stack, *args, umask: int | None = None):
    return subprocess.run([sys.executable, "-m", "mailtresor", "--config", str(stack.config_path), *args],
                          cwd=REPO, capture_output=True, timeout=300,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:                        # bounded
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _msg(subject: str) -> bytes:
    return (f"From: Alice <alice@globex.example>\r\nTo: bob@acme.example\r\nSubject: {subject}\r\n"
            f"Date: Thu, 22 Aug 2002 10:00:00 +0000\r\nMessage-ID: <{subject.replace(' ', '.')}@globex.example>\r\n"
            f"\r\n{noise(20_000, 0)}").encode()


def _hits(stack, query: str) -> int:
    p = _cli(stack, "search", "--tenant", "acme", "--json", "--limit", "1000", query)
    assert p.returncode == 0, p.stderr
    return len(json.loads(p.stdout)["results"])


def test_cli_requeue(tmp_path):
    """Entries set aside (one by max_tries of a real failure, one by hand)
    are listed with why, an unknown id is named with exit 1, and `requeue`
    puts them back: one while the daemon is stopped, the rest with --all
    while it runs; every one ends up archived."""
    stack = Stack(tmp_path / "stack")              # archiving off: the mail waits in the spool
    stack.start()
    try:
        with stack.smtp() as s:
            for n in range(3):
                s.sendmail("alice@globex.example", ["bob@acme.example"], _msg(f"requeued {n}"))
        stack.stop_daemon()
        spool = stack.open_spool()
        try:
            ids = spool.ready()
            assert len(ids) == 3
            for _ in range(spool.max_tries):
                spool.failed(ids[0], "cannot prepare: ParserDied")
            spool.set_aside(ids[1], "cannot store for acme: RecordCorrupt")
        finally:
            spool.close()

        p = _cli(stack, "requeue", "--list")
        assert p.returncode == 0
        out = p.stdout.decode()
        assert f"{ids[0]}  set aside" in out and "cannot prepare: ParserDied" in out
        assert f"{ids[1]}  set aside" in out and "cannot store for acme: RecordCorrupt" in out
        assert "{'" not in out and "[{" not in out, out                # words, not reprs
        listed = json.loads(_cli(stack, "requeue", "--list", "--json").stdout)
        assert sorted(e["id"] for e in listed) == sorted(ids[:2])
        st = _cli(stack, "status", "--json")
        assert json.loads(st.stdout)["spool"]["set_aside"] == 2

        p = _cli(stack, "requeue", "01NOTANID", ids[0])
        assert p.returncode == 1 and b"not set aside: 01NOTANID" in p.stderr
        assert (stack.spool_dir / "bad" / ids[0]).exists()          # nothing moved
        p = _cli(stack, "requeue")
        assert p.returncode == 2 and b"--all" in p.stderr
        assert b"reroute" in _cli(stack, "requeue", "--help").stdout

        p = _cli(stack, "requeue", ids[0])
        assert p.returncode == 0 and b"1 set-aside entry back in the queue" in p.stderr
        assert (stack.spool_dir / "new" / ids[0]).exists()

        stack.reconfigure({"archive": {"enabled": True}})
        stack.start_daemon()
        _wait(lambda: not (stack.spool_dir / "new" / ids[0]).exists()
              and not (stack.spool_dir / "new" / ids[2]).exists(), 60, "the requeued entry archived")
        p = _cli(stack, "requeue", "--all")                        # the daemon is running
        assert p.returncode == 0 and b"1 set-aside entry back" in p.stderr
        _wait(lambda: not any((stack.spool_dir / "new").iterdir()), 60, "the spool drained")
        assert list((stack.spool_dir / "bad").iterdir()) == []
        assert _hits(stack, "subject:requeued") == 3
    finally:
        stack.close()


# --- the real daemon on a full store ----------------------------------------------------

@needs_mount
def test_daemon_pauses_on_a_full_store_and_resumes(tmp_path):
    """Mail through the relay while the store's file system is full: it is
    accepted (the spool is elsewhere), `status` says why the archiver
    waits, nothing is set aside; space returns and every message is
    archived, the shards verify and the backup restores."""
    fs_dir = tmp_path / "fs"
    with small_fs(fs_dir, "6m") as fs:
        stack = Stack(tmp_path / "stack", {"archive": {"enabled": True, "directory": str(fs / "store"),
                                                       "backup_directory": str(fs / "backup")},
                                           "spool": {"max_tries": 2}})
        stack.start()
        try:
            with stack.smtp() as s:
                for n in range(2):
                    s.sendmail("alice@globex.example", ["bob@acme.example"], _msg(f"before {n}"))
            _wait(lambda: not any((stack.spool_dir / "new").iterdir()), 60, "the first mail archived")
            filler = fill(fs)
            with stack.smtp() as s:
                for n in range(10):
                    s.sendmail("alice@globex.example", ["bob@acme.example"], _msg(f"during {n}"))

            def paused():
                doc = json.loads(_cli(stack, "status", "--json").stdout)
                ar = doc.get("archiver") or {}
                return ar if ar.get("paused") else None
            ar = _wait(paused, 60, "the archiver to say it is paused")
            assert ar["paused"].startswith(f"store file system full ({fs / 'store'}): No space left on device"), ar
            assert ar["state"].startswith("paused: store file system full (") and "; next try in " in ar["state"]
            text = _cli(stack, "status").stdout.decode()
            assert "Archiver: paused: store file system full (" in text and "Error(" not in text
            assert "Paused: store file system full (" in text and "{'" not in text
            time.sleep(4)                          # several tries (retry_max is 1 s here): still nothing aside
            assert list((stack.spool_dir / "bad").iterdir()) == []
            assert list((stack.spool_dir / "tries").iterdir()) == []
            assert len(list((stack.spool_dir / "new").iterdir())) == 10

            filler.unlink()
            _wait(lambda: not any((stack.spool_dir / "new").iterdir()), 120, "the spool drained after space returned")
            _wait(lambda: not paused(), 30, "the pause to end in status")
            assert list((stack.spool_dir / "bad").iterdir()) == []
            log = stack.log()
            assert 1 <= log.count("archiver paused: store file system full") <= 2, log[-3000:]
            assert "archiver resumed" in log
            assert _hits(stack, "subject:during") == 10 and _hits(stack, "subject:before") == 2
            stack.stop_daemon()
            p = _cli(stack, "verify")
            assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
            p = _cli(stack, "restore", "--to", str(tmp_path / "restored"))
            assert p.returncode == 0 and b"restore: 24 record(s)" in p.stderr, p.stderr
        finally:
            stack.close()


# --- private files whatever the umask ---------------------------------------------------

def _open_modes(*roots: Path) -> list[str]:
    bad = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for p in (dirpath, *(os.path.join(dirpath, n) for n in filenames)):
                mode = os.lstat(p).st_mode
                if not stat.S_ISLNK(mode) and mode & 0o077:
                    bad.append(f"{p} {stat.filemode(mode)}")
    return bad


def test_store_index_and_backup_are_private_whatever_the_umask(tmp_path):
    """The daemon, `restore`, `reindex` and `import` run with umask 022 (a
    root shell): no directory or file under the store, the index or the
    backup is group- or world-accessible."""
    old = os.umask(0o022)                          # the daemon inherits it from this process
    try:
        stack = Stack(tmp_path / "stack", {"archive": {"enabled": True}})
        stack.start()
    finally:
        os.umask(old)
    try:
        with stack.smtp() as s:
            for n in range(3):
                s.sendmail("alice@globex.example", ["bob@acme.example"], _msg(f"private {n}"))
        _wait(lambda: not any((stack.spool_dir / "new").iterdir()), 60, "the mail archived")
        stack.stop_daemon()
        store, backup = stack.cfg.archive.directory, stack.cfg.archive.backup_directory
        assert _open_modes(store, backup) == []
        restored = tmp_path / "restored"
        p = _cli(stack, "restore", "--to", str(restored), umask=0o022)
        assert p.returncode == 0, p.stderr
        p = _cli(stack, "reindex", umask=0o022)
        assert p.returncode == 0, p.stderr
        eml = tmp_path / "imported.eml"             # another month: a new shard, catalog entry, index
        eml.write_bytes(_msg("private imported").replace(b"Aug 2002", b"Mar 2003"))
        p = _cli(stack, "import", "--tenant", "acme", str(eml), umask=0o022)
        assert p.returncode == 0, p.stderr
        assert (store / "acme" / "2003-03" / "xapian").is_dir()
        assert _open_modes(store, backup, restored) == []
        assert stat.S_IMODE(os.stat(restored).st_mode) == 0o700
        assert _hits(stack, "subject:private") == 4
    finally:
        stack.close()


def test_store_modes_without_the_umask_helper(tmp_path):
    """The store makes its files private by itself (a process that never
    set umask 077, e.g. a test or a tool importing the package)."""
    old = os.umask(0o022)
    try:
        ring = ring_for("acme")
        spool = Spool(tmp_path / "spool", ring, sync="fsync")
        store = Store(tmp_path / "store")
        backup = BackupDirectory(tmp_path / "backup")
        pipe = Pipeline(spool, store, Keys(ring), Router([Tenant("acme", ("acme.example",))]), backup=backup)
        try:
            spool_one(spool, raw_msg(0))
            drain(pipe, spool)
        finally:
            store.close()
            spool.close()
        assert _open_modes(tmp_path / "store", tmp_path / "backup") == []
    finally:
        os.umask(old)
