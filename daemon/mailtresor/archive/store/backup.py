"""Backup and restore: a directory that holds no keys.

The backup is one append-only log per shard; it carries the chain entries
with the encrypted blobs they cover, and the seals.  `restore` replays
the logs into an empty store.  The frame layout is in docs/FORMAT.md.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import zlib
from pathlib import Path

from mailtresor.archive.store.chain import CHAIN_ENTRY, OP_ADD, OP_DELETE, OP_META, ChainEntry
from mailtresor.archive.store.errors import StoreError
from mailtresor.archive.store.fs import FILE_MODE, fsync_parent, private_dir
from mailtresor.archive.store.shard import Shard, Store

log = logging.getLogger("mailtresor.archive.store")

_FRAME = struct.Struct(">4sBQI")               # magic, kind, seq, payload length
FRAME_MAGIC = b"MTB1"
K_CHAIN, K_SEAL = 1, 2


class BackupDirectory:
    """Append-only logs, one per shard: `DIR/TENANT/YYYY-MM.log`.  Each frame
    is (magic, kind, sequence, length, payload, CRC-32); a chain frame's
    payload is the chain entry followed by the encrypted blob it covers, a
    seal frame's the seal.  Nothing here can be decrypted without the tenant
    key; restore replays the frames."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)

    def path(self, tenant: str, month: str) -> Path:
        return self.dir / tenant / f"{month}.log"

    def ship(self, shard: Shard) -> int:
        """Append what the shard has and the backup has not; fsync; then
        advance the shard's backup mark.  Returns the number of frames."""
        start = shard.backup_seq() + 1
        frames = []
        last = start - 1
        for e, raw, blob in shard.chain_entries(start):
            frames.append(_frame(K_CHAIN, e.seq, raw + (blob or b"")))
            last = e.seq
        shipped_seals = self._seal_mark(shard)
        new_seals = shard.seals_from(shipped_seals + 1)
        frames += [_frame(K_SEAL, n, raw) for n, raw in new_seals]
        if not frames:
            return 0
        path = self.path(shard.tenant, shard.month)
        private_dir(path.parent)
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            _truncate_torn_tail(fd, path)
            data = b"".join(frames)
            # Every byte, or an exception: on a filling disk write(2)
            # returns short before it fails, and a short write taken as
            # whole would advance the backup mark past frames the log never
            # got (the next ship drops the torn tail: a gap in the backup).
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            _checked_size[path] = _checked_size.get(path, 0) + len(data)
        except BaseException:
            _checked_size.pop(path, None)
            raise
        finally:
            os.close(fd)
        if created:
            fsync_parent(path)
        with shard.env.begin(write=True) as txn:
            txn.put(b"backup_seq", struct.pack(">Q", last), db=shard.state)
            if new_seals:
                txn.put(b"backup_seal", struct.pack(">Q", new_seals[-1][0]), db=shard.state)
        return len(frames)

    @staticmethod
    def _seal_mark(shard: Shard) -> int:
        with shard.env.begin() as txn:
            raw = txn.get(b"backup_seal", db=shard.state)
            return struct.unpack(">Q", raw)[0] if raw else 0

    def compact(self, tenant: str, month: str) -> dict:
        """Rewrite a shard's log without the encrypted blobs of deleted
        messages: an `add` or `meta` frame of an id that a later `delete`
        frame removes keeps its chain entry (so the chain still verifies
        from the log, `verify_log`) and loses its blob.  Seals, tombstones
        and everything live stay byte for byte.  Atomic: a new file beside
        the log, fsync, rename over it, fsync of the directory; a crash
        leaves the old log or the new one, and a leftover temporary file
        is removed by the next call.  Call it where ship() cannot run at
        the same time (the archiver's thread: Archiver.exclusive, or the
        store's writer lock).  Returns {"frames", "dropped", "bytes_before",
        "bytes_after"}."""
        path = self.path(tenant, month)
        tmp = path.with_name(f".{month}.compacting")
        if tmp.exists():
            tmp.unlink()
        if not path.exists():
            return {"frames": 0, "dropped": 0, "bytes_before": 0, "bytes_after": 0}
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            _truncate_torn_tail(fd, path)    # refuses a damaged log: the log is the backup
        finally:
            os.close(fd)
        before = path.stat().st_size
        last_delete: dict[bytes, int] = {}
        for kind, seq, payload in read_frames(path):
            if kind == K_CHAIN and payload[0] == OP_DELETE:
                last_delete[payload[1:21]] = seq
        frames = dropped = after = 0
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            with os.fdopen(out, "wb", closefd=False) as f:
                for kind, seq, payload in read_frames(path):
                    if (kind == K_CHAIN and payload[0] in (OP_ADD, OP_META) and len(payload) > CHAIN_ENTRY.size
                            and last_delete.get(payload[1:21], 0) > seq):
                        payload = payload[:CHAIN_ENTRY.size]
                        dropped += 1
                    data = _frame(kind, seq, payload)
                    f.write(data)
                    frames += 1
                    after += len(data)
            os.fsync(out)
        except BaseException:
            os.close(out)
            tmp.unlink(missing_ok=True)
            raise
        os.close(out)
        os.replace(tmp, path)
        fsync_parent(path)
        _checked_size[path] = after
        log.info("%s: compacted, %d blob(s) of deleted messages dropped, %d -> %d bytes",
                 path, dropped, before, after)
        return {"frames": frames, "dropped": dropped, "bytes_before": before, "bytes_after": after}

    def logs(self) -> list[tuple[str, str, Path]]:
        out = []
        if self.dir.is_dir():
            for tdir in sorted(p for p in self.dir.iterdir() if p.is_dir()):
                for log_path in sorted(tdir.glob("*.log")):
                    out.append((tdir.name, log_path.stem, log_path))
        return out


def _frame(kind: int, seq: int, payload: bytes) -> bytes:
    head = _FRAME.pack(FRAME_MAGIC, kind, seq, len(payload))
    return head + payload + struct.pack(">I", zlib.crc32(head + payload))


def read_frames(path: Path):
    """(kind, seq, payload) of every complete frame; stops at a torn tail."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos + _FRAME.size <= len(data):
        magic, kind, seq, n = _FRAME.unpack_from(data, pos)
        end = pos + _FRAME.size + n + 4
        if magic != FRAME_MAGIC or end > len(data):
            return
        payload = data[pos + _FRAME.size:end - 4]
        if struct.unpack(">I", data[end - 4:end])[0] != zlib.crc32(data[pos:end - 4]):
            return
        yield kind, seq, payload
        pos = end


_checked_size: dict[Path, int] = {}     # log -> size known to end on a frame boundary


def _truncate_torn_tail(fd: int, path: Path) -> None:
    """Drop an incomplete last frame (a crash in the middle of an append).
    Anything else that does not read back -- a damaged frame with frames
    after it -- is refused, never truncated: the log is the backup."""
    size = os.fstat(fd).st_size
    if _checked_size.get(path) == size:
        return
    good = 0
    for kind, seq, payload in read_frames(path):
        good += _FRAME.size + len(payload) + 4
    if good != size:
        with open(path, "rb") as f:
            f.seek(good)
            rest = f.read(_FRAME.size)
        torn = len(rest) < _FRAME.size or (
            rest[:4] == FRAME_MAGIC and good + _FRAME.size + _FRAME.unpack(rest)[3] + 4 > size)
        if not torn:
            raise StoreError(f"{path}: damaged at byte {good} with {size - good} bytes after it; "
                             "not appending (move the log aside and run a full backup)")
        log.warning("%s: dropping a torn last frame of %d bytes", path, size - good)
        os.ftruncate(fd, good)
    _checked_size[path] = good


def verify_log(path: Path, tenant: str, month: str, seal_public=None) -> tuple[list[str], dict]:
    """Check one backup log on its own, without keys and without the store:
    every chain frame's hash and link, every blob against its entry's
    digest (a record, metadata or tombstone altered in the log), a blob
    that is absent only where a later `delete` frame removes its id (a
    compacted log), every seal against the chain and its signature (made
    by one of `seal_public`, when given), and a damaged frame.  Returns
    (problems, {"entries", "records", "tombstones", "seals"})."""
    from mailtresor.archive.store.chain import GENESIS, Seal, chain_hash, seal_message
    from mailtresor.keys import crypto
    publics = None if seal_public is None else (
        {seal_public} if isinstance(seal_public, bytes) else set(seal_public))
    problems: list[str] = []
    hashes: dict[int, bytes] = {}
    entries: dict[int, bytes] = {}
    blobless: list[tuple[int, bytes]] = []     # (seq, id) of add/meta frames without their blob
    deleted_at: dict[bytes, int] = {}
    live: set[bytes] = set()
    seals: list[tuple[int, bytes]] = []
    prev, last = GENESIS, 0
    good = 0
    for kind, seq, payload in read_frames(path):
        good += _FRAME.size + len(payload) + 4
        if kind == K_SEAL:
            seals.append((seq, payload))
            continue
        if kind != K_CHAIN:
            problems.append(f"frame of unknown kind {kind} (seq {seq})")
            continue
        raw, blob = payload[:CHAIN_ENTRY.size], payload[CHAIN_ENTRY.size:]
        if seq <= last:
            if entries.get(seq) != raw:
                problems.append(f"two different chain entries {seq}")
            continue
        if seq != last + 1:
            problems.append(f"chain entries {last + 1}..{seq - 1} are missing")
        try:
            e = ChainEntry.decode(seq, raw)
        except struct.error:
            problems.append(f"chain entry {seq} is malformed")
            last = seq
            continue
        aid = bytes.fromhex(e.aid)
        if e.prev != prev:
            problems.append(f"chain entry {seq} does not link to entry {seq - 1}")
        if chain_hash(seq, e.op, aid, e.digest, e.time, e.prev) != e.hash:
            problems.append(f"chain entry {seq} was altered")
        if blob and hashlib.sha256(blob).digest() != e.digest:
            what = {OP_ADD: "record", OP_META: "metadata", OP_DELETE: "tombstone"}.get(e.op, "blob")
            problems.append(f"{e.aid}: the {what} of chain entry {seq} differs from what the chain recorded")
        if e.op == OP_ADD:
            live.add(aid)
        elif e.op == OP_DELETE:
            live.discard(aid)
            deleted_at[aid] = seq
            if not blob:
                problems.append(f"{e.aid}: chain entry {seq} (delete) has no tombstone")
        if not blob and e.op in (OP_ADD, OP_META):
            blobless.append((seq, aid))
        entries[seq], hashes[seq] = raw, e.hash
        prev, last = e.hash, seq
    for seq, aid in blobless:
        if deleted_at.get(aid, 0) <= seq:
            problems.append(f"{aid.hex()}: chain entry {seq} has no blob and no later delete")
    size = path.stat().st_size
    if good != size:
        problems.append(f"damaged or torn at byte {good} ({size - good} bytes not read)")
    for number, raw in seals:
        try:
            s = Seal.decode(number, raw)
        except (StoreError, struct.error):
            problems.append(f"seal {number} is malformed")
            continue
        if hashes.get(s.seq) != s.head:
            problems.append(f"seal {number} does not match chain entry {s.seq}")
        if publics is not None and s.public_key not in publics:
            problems.append(f"seal {number} was made with another key")
        try:
            crypto.ed25519_verify(s.public_key, s.signature, seal_message(tenant, month, s.seq, s.head, s.time))
        except crypto.SignatureError:
            problems.append(f"seal {number}: signature does not verify")
    return problems, {"entries": last, "records": len(live), "tombstones": len(set(deleted_at) - live),
                      "seals": len(seals)}


def restore(backup: BackupDirectory, root: Path, tenant: str | None = None) -> dict[str, int]:
    """Rebuild shards from backup logs into an empty store root.  Returns
    records restored per shard.  Duplicate frames (a re-ship after a crash)
    are skipped when identical and refused when they differ."""
    counts = {}
    store = Store(root)
    try:
        for t, month, path in backup.logs():
            if tenant is not None and t != tenant:
                continue
            if (root / t / month / "lmdb" / "data.mdb").exists():
                raise StoreError(f"{root / t / month} exists: restore only into an empty store")
            shard = store.shard(t, month)
            last_seq = last_seal = 0
            with shard.env.begin(write=True) as txn:
                for kind, seq, payload in read_frames(path):
                    if kind == K_CHAIN:
                        raw, blob = payload[:CHAIN_ENTRY.size], payload[CHAIN_ENTRY.size:]
                        if seq <= last_seq:
                            if txn.get(struct.pack(">Q", seq), db=shard.chain) != raw:
                                raise StoreError(f"{path}: two different chain entries {seq}")
                            continue
                        if seq != last_seq + 1:
                            raise StoreError(f"{path}: chain entries {last_seq + 1}..{seq - 1} are missing")
                        e = ChainEntry.decode(seq, raw)
                        aid = bytes.fromhex(e.aid)
                        txn.put(struct.pack(">Q", seq), raw, db=shard.chain)
                        # An empty blob: the record was deleted before it was
                        # shipped, or the log was compacted (BackupDirectory.
                        # compact); its delete frame follows.  Nothing is put:
                        # without one, verify reports the record missing.
                        if e.op == OP_ADD and blob:
                            txn.put(aid, blob, db=shard.records)
                        elif e.op == OP_META and blob:
                            txn.put(aid, blob, db=shard.meta)
                        elif e.op == OP_DELETE:
                            txn.delete(aid, db=shard.records)
                            txn.delete(aid, db=shard.meta)
                            txn.put(b"tomb:" + aid, blob, db=shard.state)
                        txn.put(b"head", struct.pack(">Q32s", seq, e.hash), db=shard.state)
                        last_seq = seq
                    elif kind == K_SEAL:
                        if seq <= last_seal:
                            continue
                        txn.put(struct.pack(">Q", seq), payload, db=shard.seals)
                        last_seal = seq
                txn.put(b"backup_seq", struct.pack(">Q", last_seq), db=shard.state)
                if last_seal:
                    txn.put(b"backup_seal", struct.pack(">Q", last_seal), db=shard.state)
            ids = shard.ids()
            store.catalog_put(t, [(a, month) for a in ids])
            counts[f"{t}/{month}"] = len(ids)
    finally:
        store.close()
    return counts
