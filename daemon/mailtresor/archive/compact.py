"""Compacting closed months: space back after deletions, swapped in safely.

An LMDB file never shrinks (freed pages are reused, not returned) and a
Xapian database keeps its B-trees' free space and the old revisions' blocks;
after a retention run deletes a tenth of a month both still take the space
they took before.  A month that no longer changes -- before the current
month AND no chain entry for `quiet_days` -- is rewritten once:

1. LMDB: a packed copy in DIR/lmdb.compact: every database written afresh
   in key order (MDB_APPEND), so leaf pages are full -- LMDB's compacting
   copy (`env.copy(compact=True)`) only drops free pages and keeps the
   two-thirds-full leaves that random archive ids leave (see
   _make_lmdb_copy);
2. Xapian: `xapian.Database.compact(DIR/xapian.compact)` (full blocks, one
   revision; the docids kept);
3. both copies are checked against the originals -- LMDB: the entries of
   every database, the chain head, the backup marks, and the copy's every
   record, metadata blob, tombstone and seal against its own chain
   (verify_shard without keys); Xapian: the document count, the last
   docid, the indexed_seq mark -- and refused if anything differs (nothing
   is swapped, the original stays);
4. each copy is swapped with its original by one atomic renameat2(2)
   RENAME_EXCHANGE (on a file system without it: two renames, see
   recover()), the month's directory fsynced, and only then the original
   removed;
5. a mark (state "compacted" = the chain head at the time) keeps the month
   from being compacted again while it is unchanged.

The archiver's thread runs it (Archiver.exclusive(compact_closed, now)):
the store's writer lock is held, no index writer is open, and the store
(shared with the access core under the same lock) is closed before a
swap, so that no LMDB environment of the old file stays open.  The core's
index readers (index.Readers) know an index by its directory's inode: the
swapped-in directory is a new inode, so the next search opens it afresh
instead of reopening the removed one.

A crash leaves at most a `*.compact` or `*.old` directory beside the
month's `lmdb` and `xapian`: nothing reads those names, and recover()
(called at the start of every run and when a Shard opens) removes them,
or -- the window between two plain renames -- puts the original back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import struct
import time
from pathlib import Path

import lmdb

from mailtresor.archive.store.fs import describe_fault, private_tree
from mailtresor.archive.store.shard import Shard
from mailtresor.archive.store.verify import verify_shard
from mailtresor.durable import fsync_dir

log = logging.getLogger("mailtresor.archive.compact")

COPY, OLD = ".compact", ".old"
PARTS = ("lmdb", "xapian")
MARK = b"compacted"          # state key: u64 chain head when the month was last compacted
DBS = (b"records", b"meta", b"chain", b"seals", b"state")


class CompactionRefused(Exception):
    """A copy does not match its original: nothing was swapped."""


# --- swapping directories --------------------------------------------------------------

_RENAME_EXCHANGE = 2
_libc = None


def _renameat2():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return getattr(_libc, "renameat2", None)


def exchange(a: Path, b: Path) -> None:
    """Swap two directories atomically (renameat2 RENAME_EXCHANGE): at every
    moment each name holds a complete directory.  Where the file system or
    libc cannot, two renames (b -> b.old, a -> b; the original then is
    at a's name again after a final rename), with recover() for a crash in
    between."""
    fn = _renameat2()
    if fn is not None:
        AT_FDCWD = -100
        if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(e, os.strerror(e), str(b))
    old = b.with_name(b.name + OLD)
    os.rename(b, old)           # a crash here: recover() renames old back
    os.rename(a, b)
    os.rename(old, a)


def recover(month_dir: Path) -> None:
    """Tidy what a crashed compaction left in a month's directory: an
    original moved aside (`lmdb.old`) without its copy in place goes back;
    a copy or an original after a swap (`*.compact`, `*.old`) is removed.
    Cheap when there is nothing to do (one listdir)."""
    month_dir = Path(month_dir)
    try:
        names = set(os.listdir(month_dir))
    except FileNotFoundError:
        return
    if not any(n.endswith((COPY, OLD)) for n in names):
        return
    for part in PARTS:
        if part not in names and part + OLD in names:
            os.rename(month_dir / (part + OLD), month_dir / part)
            log.warning("%s: a compaction was cut short; the original %s is back", month_dir, part)
        for leftover in (part + COPY, part + OLD):
            if leftover in names and (month_dir / part).exists():
                shutil.rmtree(month_dir / leftover, ignore_errors=True)
    fsync_dir(month_dir)


# --- what is due ------------------------------------------------------------------------

def _last_change(shard) -> tuple[int, float, int]:
    """(chain head seq, time of the last chain entry (0: none), compacted mark)."""
    from mailtresor.archive.store.chain import ChainEntry
    with shard.env.begin() as txn:
        seq, _ = shard._state(txn)
        when = 0.0
        if seq:
            raw = txn.get(struct.pack(">Q", seq), db=shard.chain)
            if raw is not None:
                when = ChainEntry.decode(seq, bytes(raw)).time
        mark = txn.get(MARK, db=shard.state)
    return seq, when, (struct.unpack(">Q", mark)[0] if mark else 0)


def why_not(month: str, now: float, head: int, last: float, mark: int, quiet_days: float) -> str | None:
    """Why a month is not due for compaction (None: it is).  Pure."""
    if month >= time.strftime("%Y-%m", time.gmtime(now)):
        return "the current month"
    if head == 0:
        return "empty"
    if mark == head:
        return "unchanged since its last compaction"
    if now - last < quiet_days * 86400:
        return f"changed less than {quiet_days:g} day(s) ago"
    return None


def size_of(path: Path) -> int:
    """Bytes on disk (allocated blocks) of a file or directory tree."""
    path = Path(path)
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in os.walk(path) for f in fs)


# --- the copies -------------------------------------------------------------------------

def _lmdb_facts(env: lmdb.Environment) -> dict:
    out = {}
    with env.begin() as txn:
        for name in DBS:
            db = env.open_db(name, txn=txn, create=False)
            out[name.decode()] = txn.stat(db)["entries"]
        state = env.open_db(b"state", txn=txn, create=False)
        for key in (b"head", b"backup_seq", b"backup_seal"):
            v = txn.get(key, db=state)
            out[key.decode()] = None if v is None else bytes(v).hex()
    return out


def copy_lmdb(shard, target: Path) -> dict:
    """The shard's compacting copy in `target` (a new directory), checked
    against the original.  Returns the facts compared."""
    shutil.rmtree(target, ignore_errors=True)
    os.mkdir(target, 0o700)
    want = _lmdb_facts(shard.env)
    _make_lmdb_copy(shard.env, target)
    copy = _Copy(target, shard.tenant, shard.month)
    try:
        got = _lmdb_facts(copy.env)
        if got != want:
            raise CompactionRefused(f"{target}: the compacted copy differs from the shard: {got} != {want}")
        # Every record, metadata blob, tombstone and seal of the copy against
        # its chain (no key needed): a copy with a record swapped, or one
        # whose chain no longer holds together, never replaces the shard.
        problems, _ = verify_shard(copy, None, None)
        if problems:
            raise CompactionRefused(f"{target}: the compacted copy does not verify: {problems[0]}"
                                    + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    finally:
        copy.close()
    return want


class _Copy(Shard):
    """A compacting copy opened read-only for checking (no lock file: no
    one else knows of it)."""

    def __init__(self, lmdb_dir: Path, tenant: str, month: str):
        self.dir, self.tenant, self.month = lmdb_dir.parent, tenant, month
        self.lmdb_dir, self.index_dir = lmdb_dir, None
        self.env = lmdb.open(str(lmdb_dir), readonly=True, lock=False, max_dbs=8, subdir=True)
        try:
            for name in DBS:
                setattr(self, name.decode(), self.env.open_db(name, create=False))
        except BaseException:
            self.env.close()
            raise


def _make_lmdb_copy(env: lmdb.Environment, target: Path) -> None:
    """A packed copy: every database written afresh in key order with
    MDB_APPEND, so each leaf page is filled before the next is begun.
    LMDB's own compacting copy (env.copy(compact=True), mdb_env_copy2 with
    MDB_CP_COMPACT) only leaves out free pages and copies the rest as they
    are; archive ids are random, so after the inserts of a month the leaf
    pages are about two thirds full, and it saved 7% of a bench shard where
    this saves 21% (docs/BENCHMARKS.md "Lifecycle").  Synced before the
    check; the caller checks it like any copy."""
    from mailtresor.archive.store.shard import MAP_SIZE
    dst = lmdb.open(str(target), map_size=MAP_SIZE, max_dbs=8, subdir=True, sync=False, metasync=False,
                    mode=0o600)
    try:
        with env.begin() as src, dst.begin(write=True) as out:
            for name in DBS:
                a = env.open_db(name, txn=src, create=False)
                b = dst.open_db(name, txn=out)
                out.cursor(db=b).putmulti(((bytes(k), bytes(v)) for k, v in src.cursor(db=a)), append=True)
        dst.sync(True)
    finally:
        dst.close()
    lock = target / "lock.mdb"
    if lock.exists():
        lock.unlink()       # made for this process only; the shard's next opener makes its own
    os.chmod(target / "data.mdb", 0o600)
    fsync_dir(target)


def _make_xapian_copy(source: Path, target: Path) -> None:
    import xapian
    src = xapian.Database(str(source))
    try:
        src.compact(str(target), xapian.DBCOMPACT_NO_RENUMBER | xapian.Compactor.FULLER)
    finally:
        src.close()


def copy_xapian(source: Path, target: Path) -> dict:
    """The index's compacted copy in `target`, checked against the
    original (document count, last docid, indexed_seq).  Prefers the
    python binding (xapian.Database.compact); the Debian tool
    xapian-compact does the same from the shell."""
    import xapian
    from mailtresor.archive.index import META_INDEXED_SEQ
    shutil.rmtree(target, ignore_errors=True)
    src = xapian.Database(str(source))
    try:
        want = {"doccount": src.get_doccount(), "lastdocid": src.get_lastdocid(),
                "indexed_seq": src.get_metadata(META_INDEXED_SEQ)}
    finally:
        src.close()
    _make_xapian_copy(source, target)
    private_tree(target)
    _fsync_tree(target)
    return _check_xapian(target, want)


def _fsync_tree(d: Path) -> None:
    """fsync every file of a directory and the directory: the copy is on
    disk before its name replaces the original's."""
    for name in os.listdir(d):
        fd = os.open(d / name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(d)


def _check_xapian(target: Path, want: dict) -> dict:
    import xapian
    from mailtresor.archive.index import META_INDEXED_SEQ
    dst = xapian.Database(str(target))
    try:
        got = {"doccount": dst.get_doccount(), "lastdocid": dst.get_lastdocid(),
               "indexed_seq": dst.get_metadata(META_INDEXED_SEQ)}
    finally:
        dst.close()
    if got != want:
        raise CompactionRefused(f"{target}: the compacted index differs from the original: {got} != {want}")
    return want


# --- the run ----------------------------------------------------------------------------

def compact_month(pipeline, tenant: str, month: str) -> dict:
    """Compact one month now (whether due or not; compact_closed decides).
    Returns {"tenant", "month", "status": "compacted", "records", "documents",
    "lmdb_before", "lmdb_after", "xapian_before", "xapian_after",
    "backup": {...} | None}.  Raises CompactionRefused (nothing swapped)."""
    store = pipeline.store
    shard = store.shard(tenant, month)
    d = shard.dir
    recover(d)
    lmdb_dir, xap_dir = shard.lmdb_dir, shard.index_dir
    lmdb_copy, xap_copy = d / ("lmdb" + COPY), d / ("xapian" + COPY)
    before = {"lmdb": size_of(lmdb_dir), "xapian": size_of(xap_dir)}
    head = shard.head()[0]
    try:
        facts = copy_lmdb(shard, lmdb_copy)
        docs = None
        if (xap_dir / "iamglass").exists():
            docs = copy_xapian(xap_dir, xap_copy)["doccount"]
        # No environment of the old file may stay open past the swap: the
        # store (and the core, which shares it under the same lock) opens
        # the new one at its next use.
        store.close()
        fsync_dir(d)
        exchange(lmdb_copy, lmdb_dir)
        if docs is not None:
            exchange(xap_copy, xap_dir)
        fsync_dir(d)
    except BaseException:
        store.close()
        recover(d)
        _remove_unswapped(d)
        raise
    shutil.rmtree(lmdb_copy, ignore_errors=True)          # the originals, now under the copy's name
    shutil.rmtree(xap_copy, ignore_errors=True)
    fsync_dir(d)
    shard = store.shard(tenant, month)
    with shard.env.begin(write=True) as txn:
        txn.put(MARK, struct.pack(">Q", head), db=shard.state)
    backup = None
    if pipeline.backup is not None and pipeline.backup.path(tenant, month).exists():
        backup = pipeline.backup.compact(tenant, month)
    out = {"tenant": tenant, "month": month, "status": "compacted", "records": facts["records"],
           "documents": docs, "lmdb_before": before["lmdb"], "lmdb_after": size_of(lmdb_dir),
           "xapian_before": before["xapian"], "xapian_after": size_of(xap_dir), "backup": backup}
    log.info("%s/%s compacted: LMDB %d -> %d bytes, Xapian %d -> %d bytes", tenant, month,
             out["lmdb_before"], out["lmdb_after"], out["xapian_before"], out["xapian_after"])
    return out


def _remove_unswapped(d: Path) -> None:
    """After a failure before or during the swaps: a `*.compact` next to a
    complete directory is either a copy that was refused or never swapped
    in, or (after its exchange) the original; the name in place is whole
    and checked either way."""
    for part in PARTS:
        if (d / part).exists():
            shutil.rmtree(d / (part + COPY), ignore_errors=True)


def compact_closed(pipeline, now: float | None = None, *, quiet_days: float = 7,
                   tenant: str | None = None, month: str | None = None) -> list[dict]:
    """Compact every month that no longer changes (see why_not), of every
    tenant or of `tenant`, every month or `month`.  Run it on the archiver's
    thread (Archiver.exclusive).  Returns one dict per month considered:
    {"tenant", "month", "status": "compacted" | "skipped" | "failed", ...}
    ("reason" for skipped and failed ones)."""
    now = time.time() if now is None else now
    store = pipeline.store
    out = []
    tenants = [tenant] if tenant is not None else store.tenants()
    for t in tenants:
        for m in store.months(t):
            if month is not None and m != month:
                continue
            recover(store.root / t / m)
            head, last, mark = _last_change(store.shard(t, m))
            reason = why_not(m, now, head, last, mark, quiet_days)
            if reason is not None:
                out.append({"tenant": t, "month": m, "status": "skipped", "reason": reason})
                continue
            try:
                out.append(compact_month(pipeline, t, m))
            except CompactionRefused as e:
                log.error("%s/%s: compaction refused: %s", t, m, e)
                out.append({"tenant": t, "month": m, "status": "failed", "reason": str(e)})
            except Exception as e:  # noqa: BLE001 - one month's failure (a full disk) is that month's
                why = describe_fault("store", store.root, e) or f"{type(e).__name__}: {e}"
                log.error("%s/%s: compaction failed: %s", t, m, why)
                out.append({"tenant": t, "month": m, "status": "failed", "reason": why})
    return out
