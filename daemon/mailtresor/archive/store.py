"""The permanent archive: per tenant and month one LMDB environment.

A shard (`store/TENANT/YYYY-MM/lmdb/`) holds five named databases:

- `records`  archive id (20 bytes) -> record blob: versioned header (format,
             key version, raw size, SHA-256 of the raw bytes) + AES-256-GCM
             over zstd(raw); the AAD binds tenant, shard, id and the header.
- `meta`     archive id -> metadata blob (JSON: envelopes keyed by spool
             entry, a summary of the parsed headers), encrypted the same way.
- `chain`    sequence number (u64 big-endian) -> chain entry: operation
             (add / meta / delete), id, SHA-256 of the stored blob, time,
             previous entry's hash, this entry's hash.  Append-only.
- `seals`    seal number -> Ed25519 signature over (tenant, shard, sequence,
             chain head), optionally with an RFC 3161 time-stamp token.
- `state`    next sequence, head hash, what has been shipped to the backup.

The byte formats are in docs/FORMAT.md ("Archive store").  This module knows
nothing of SMTP, the spool or Xapian; `verify_shard` checks records, chain and
seals; the caller adds the index check.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

import lmdb

from mailtresor.keys import crypto
from mailtresor.lazylog import LazyLogger

log = LazyLogger("mailtresor.archive.store")

ID_BYTES = 20
RECORD_MAGIC = b"MTR1"
META_MAGIC = b"MTM1"
LISTING_MAGIC = b"MTL1"
FORMAT = 1
_REC_HEAD = struct.Struct(">4sBIQ32s")        # magic, format, key version, raw size, sha256(raw)
_META_HEAD = struct.Struct(">4sBI")           # magic, format, key version
_CHAIN = struct.Struct(">B20s32sd32s32s")     # op, id, blob digest, time, prev hash, hash
_SEAL_HEAD = struct.Struct(">Q32sd32s64sI")   # seq, head, time, public key, signature, tsa token length
OP_ADD, OP_META, OP_DELETE = 1, 2, 3
OP_NAMES = {OP_ADD: "add", OP_META: "meta", OP_DELETE: "delete"}
GENESIS = bytes(32)
MAP_SIZE = 1 << 36                            # 64 GiB of address space per shard; the file grows as used
CATALOG_MAP_SIZE = 1 << 34
MAX_OPEN_SHARDS = 4

ID_INFO = b"mailtresor/archive-id"
STORE_INFO = b"mailtresor/store/v1"
AUDIT_INFO = b"mailtresor audit terms v1"      # search terms in the audit trail (access/audit.py)
UNROUTED = "unrouted"


# --- files only the daemon's user may read -----------------------------------------
# Directories 0700, files 0600, whatever the umask of the process that makes
# them (a `restore` or `reindex` from a root shell with umask 022 included):
# an index holds plaintext terms, a shard its metadata's sizes and times.
DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """mkdir -p with mode 0700 for every directory it creates (mkdir's mode
    is cut by the umask, which can only remove bits; an existing directory
    is left as it is)."""
    path = Path(path)
    if not path.is_dir():
        if path.parent != path:
            private_dir(path.parent)
        try:
            os.mkdir(path, DIR_MODE)
        except FileExistsError:
            pass
    return path


def private_tree(path: Path) -> None:
    """chmod go-rwx over a tree a library made with the process umask
    (Xapian creates its files 0666 & ~umask and takes no mode)."""
    for dirpath, dirnames, filenames in os.walk(path):
        for f in (dirpath, *(os.path.join(dirpath, n) for n in filenames)):
            mode = os.lstat(f).st_mode
            if mode & 0o077:
                os.chmod(f, mode & 0o700)


# --- storage faults: the disk's fault, not the message's ----------------------------

# errno -> how the status line names the fault.
_FAULTS = {errno.ENOSPC: "file system full", errno.EDQUOT: "quota exceeded",
           errno.EROFS: "file system read-only", errno.EIO: "I/O error"}


def storage_fault(e: BaseException) -> tuple[str, str] | None:
    """(what, reason) when `e` says that storage cannot take writes now
    (full, over quota, read-only, I/O error), else None.  Such a failure is
    no message's fault: the archiver pauses instead of counting tries.

    They come as OSError, as lmdb errors (lmdb.DiskError for ENOSPC at open,
    MapFullError, and a plain lmdb.Error whose text is the strerror: a short
    write of a page -- the disk filled in the middle of a commit -- is
    "mdb_txn_commit: Input/output error"), or as Xapian errors whose text
    ends with it ("Error writing block 5 (No space left on device)").  The
    exception chain is followed."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FAULTS:
            return _FAULTS[e.errno], os.strerror(e.errno)
        if isinstance(e, lmdb.MapFullError):
            return "shard map full", "the LMDB map size is reached"
        if isinstance(e, lmdb.DiskError):
            return _FAULTS[errno.ENOSPC], os.strerror(errno.ENOSPC)
        # Xapian's str() ends with the strerror in parentheses (its
        # get_error_string() can crash on an error not made by Xapian).
        if isinstance(e, lmdb.Error) or type(e).__module__.partition(".")[0] == "xapian":
            text = str(e)
            for code, what in _FAULTS.items():
                if os.strerror(code) in text:
                    return what, os.strerror(code)
        e = e.__cause__ or e.__context__
    return None


def describe_fault(kind: str, path: Path, e: BaseException) -> str | None:
    """`"store file system full (/srv/store): No space left on device"` for
    a storage fault at `path`; None for anything else.  LMDB reports a disk
    that filled in the middle of a commit as an I/O error: when the file
    system has (next to) no room left, it is called full."""
    f = storage_fault(e)
    if f is None:
        return None
    what, reason = f
    if what == "I/O error" and _nearly_full(path):
        # Said the same way as an ENOSPC: one reason, one log line a pause.
        what, reason = _FAULTS[errno.ENOSPC], os.strerror(errno.ENOSPC)
    return f"{kind} {what} ({path}): {reason}"


def _nearly_full(path: Path) -> bool:
    p = Path(path)
    while not p.exists() and p.parent != p:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


LOCK_FILE_BYTES = 64 << 10


def _allocate_lock_file(lmdb_dir: Path, name: str = "lock.mdb") -> None:
    """Give an LMDB lock file its blocks before LMDB maps it.  LMDB makes it
    with ftruncate (a sparse file) and writes its reader table through a
    shared mapping: on a full file system the first touch of an unbacked
    page is a SIGBUS that kills the daemon.  Allocated here, a full disk is
    an ENOSPC from posix_fallocate instead.  LMDB keeps a larger lock file
    as it is (it sizes its reader table to the file).  An existing lock
    file only gets its holes filled, never a new size: a process that has
    it mapped sized its reader table to it."""
    path = lmdb_dir / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size or LOCK_FILE_BYTES)
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
    finally:
        os.close(fd)


def _open_env(path: Path, *, readonly: bool, **kw) -> lmdb.Environment:
    """lmdb.open() with private files and a preallocated lock file; an
    environment whose creation fails (a full disk) leaves no data.mdb
    (empty or torn) behind for months() and `verify` to trip over."""
    data = path / "data.mdb"
    fresh = not readonly and not data.exists()
    if not readonly:
        private_dir(path)
    try:
        if not readonly:
            _allocate_lock_file(path)
        return lmdb.open(str(path), readonly=readonly, mode=FILE_MODE, **kw)
    except BaseException:
        if fresh:
            # lmdb.open() failed on an environment it was creating: nothing
            # was ever committed to it (its meta pages may be torn).
            for n in ("data.mdb", "lock.mdb"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path / n)
        raise


class StoreError(Exception):
    """A problem with the store the user can act on (message says which)."""


class KeyMissing(StoreError):
    def __init__(self, name: str, version: int | None = None):
        super().__init__(f"key {name}" + (f" version {version}" if version else "") + " is not held")
        self.name, self.version = name, version


class RecordCorrupt(StoreError):
    pass


def tenant_key_name(tenant: str) -> str:
    return f"tenant.{tenant}"


def effective_date(date: float | None, received_at: float) -> float:
    """A message's date for the archive (its shard, its place in date order,
    `date:` searches): the Date: header when that is plausible (1970 .. a
    day after arrival), else the arrival time.  A spam Date: of 2099 must
    not sort first for ever."""
    if date is not None and 0 <= date <= received_at + 86400:
        return date
    return received_at


def month_of(date: float | None, received_at: float) -> str:
    """The shard a message goes to: the month (UTC) of its effective_date."""
    return time.strftime("%Y-%m", time.gmtime(effective_date(date, received_at)))


def chain_hash(seq: int, op: int, aid: bytes, digest: bytes, when: float, prev: bytes) -> bytes:
    return hashlib.sha256(b"mailtresor/chain/1\0" + struct.pack(">QB", seq, op) + aid + digest
                          + struct.pack(">d", when) + prev).digest()


def seal_message(tenant: str, month: str, seq: int, head: bytes, when: float) -> bytes:
    """What a seal signs (and what an RFC 3161 token time-stamps)."""
    return (b"mailtresor/seal/1\0" + tenant.encode() + b"\0" + month.encode() + b"\0"
            + struct.pack(">Q", seq) + head + struct.pack(">d", when))


@dataclass(frozen=True)
class ChainEntry:
    seq: int
    op: int
    aid: str
    digest: bytes
    time: float
    prev: bytes
    hash: bytes

    @classmethod
    def decode(cls, seq: int, raw: bytes) -> "ChainEntry":
        op, aid, digest, when, prev, h = _CHAIN.unpack(raw)
        return cls(seq, op, aid.hex(), digest, when, prev, h)


@dataclass(frozen=True)
class Seal:
    number: int
    seq: int
    head: bytes
    time: float
    public_key: bytes
    signature: bytes
    tsa_token: bytes

    def encode(self) -> bytes:
        return _SEAL_HEAD.pack(self.seq, self.head, self.time, self.public_key, self.signature,
                               len(self.tsa_token)) + self.tsa_token

    @classmethod
    def decode(cls, number: int, raw: bytes) -> "Seal":
        seq, head, when, pub, sig, n = _SEAL_HEAD.unpack_from(raw)
        token = raw[_SEAL_HEAD.size:_SEAL_HEAD.size + n]
        if len(token) != n:
            raise RecordCorrupt(f"seal {number} is truncated")
        return cls(number, seq, head, when, pub, sig, token)


@dataclass
class Item:
    """One message for one tenant, ready to be stored."""
    aid: str
    month: str
    raw: bytes
    envelope_key: str            # spool entry id (or import id): makes re-processing idempotent
    envelope: dict               # what is kept of the envelope (spool envelope + journal facts)
    summary: dict                # parsed facts for listings: date, from, subject, message_id, size, flags


@dataclass
class Outcome:
    aid: str
    month: str
    new_record: bool
    new_envelope: bool
    meta: dict = field(default_factory=dict)


class Keys:
    """Tenant sub-keys from a key ring (mailtresor.keys.ring.KeyRing), derived
    once and cached in memory."""

    def __init__(self, ring):
        self.ring = ring
        self._cache: dict[tuple[str, int, bytes], bytes] = {}

    def _sub(self, tenant: str, version: int, info: bytes) -> bytes:
        k = (tenant, version, info)
        sub = self._cache.get(k)
        if sub is None:
            key = self.ring.get(tenant_key_name(tenant), version)
            if key is None:
                raise KeyMissing(tenant_key_name(tenant), version)
            sub = self._cache[k] = crypto.derive(key, b"", info)
        return sub

    def id_key(self, tenant: str) -> bytes:
        return self._sub(tenant, 1, ID_INFO)

    def current(self, tenant: str) -> tuple[int, bytes]:
        cur = self.ring.current(tenant_key_name(tenant))
        if cur is None:
            raise KeyMissing(tenant_key_name(tenant))
        return cur[0], self._sub(tenant, cur[0], STORE_INFO)

    def store_key(self, tenant: str, version: int) -> bytes:
        return self._sub(tenant, version, STORE_INFO)

    def archive_id(self, tenant: str, raw: bytes) -> str:
        return hmac.digest(self.id_key(tenant), raw, "sha256")[:ID_BYTES].hex()

    def audit_key(self, tenant: str, version: int | None = None) -> tuple[int, bytes]:
        """(version, key) for the search terms the audit trail keeps of
        this tenant: the current version of its key, or `version`."""
        if version is None:
            version = self.current(tenant)[0]
        return version, self._sub(tenant, version, AUDIT_INFO)

    def seal_seed(self) -> bytes:
        """The current seal key (an Ed25519 seed) from the ring."""
        cur = self.ring.current(SEAL_KEY)
        if cur is None:
            raise KeyMissing(SEAL_KEY)
        return cur[1]

    def seal_seeds(self) -> list[bytes]:
        """Every version of the seal key the ring holds, oldest first."""
        cur = self.ring.current(SEAL_KEY)
        if cur is None:
            raise KeyMissing(SEAL_KEY)
        return [k for k in (self.ring.get(SEAL_KEY, v) for v in range(1, cur[0] + 1)) if k is not None]


SEAL_KEY = "seal"


class FetchingKeys(Keys):
    """Tenant keys fetched from the control endpoint when first needed
    (blocking: the archiver thread and the CLI), kept in memory only.
    `fetch(name, version|None) -> KeyMaterial` raises KeyUnavailable
    (mailtresor.keys.ring.control_fetcher makes one)."""

    def __init__(self, ring, fetch):
        super().__init__(ring)
        self.fetch = fetch

    def _sub(self, tenant, version, info):
        name = tenant_key_name(tenant)
        if self.ring.get(name, version) is None:
            self.ring.put(self.fetch(name, version))
        return super()._sub(tenant, version, info)

    def current(self, tenant):
        name = tenant_key_name(tenant)
        if self.ring.current(name) is None:
            m = self.fetch(name, None)
            self.ring.put(m, current=True)
        return super().current(tenant)

    def seal_seed(self) -> bytes:
        cur = self.ring.current(SEAL_KEY)
        if cur is None:
            self.ring.put(self.fetch(SEAL_KEY, None), current=True)
            cur = self.ring.current(SEAL_KEY)
        return cur[1]

    def seal_seeds(self) -> list[bytes]:
        """Every version of the seal key, oldest first: seals made before a
        rotation stay verifiable."""
        self.seal_seed()
        version = self.ring.current(SEAL_KEY)[0]
        out = []
        for v in range(1, version + 1):
            if self.ring.get(SEAL_KEY, v) is None:
                self.ring.put(self.fetch(SEAL_KEY, v))
            out.append(self.ring.get(SEAL_KEY, v))
        return out

    def forget(self) -> None:
        self._cache.clear()


def _aad(kind: bytes, tenant: str, month: str, aid: bytes, head: bytes) -> bytes:
    return b"mailtresor/" + kind + b"/1\0" + tenant.encode() + b"\0" + month.encode() + b"\0" + aid + head


_ZC = None                 # the zstd compressor, made when first needed


def seal_record(raw: bytes, tenant: str, month: str, aid: bytes, version: int, key: bytes) -> bytes:
    global _ZC
    if _ZC is None:
        # Imported here: reading metadata (a CLI search) needs no zstd.
        import zstandard
        _ZC = zstandard.ZstdCompressor(level=3)
    head = _REC_HEAD.pack(RECORD_MAGIC, FORMAT, version, len(raw), hashlib.sha256(raw).digest())
    return head + crypto.seal_blob(key, _ZC.compress(raw), _aad(b"record", tenant, month, aid, head))


def record_header(blob: bytes) -> tuple[int, int, int, bytes]:
    """(format, key version, raw size, sha256) of a record blob."""
    if len(blob) < _REC_HEAD.size or blob[:4] != RECORD_MAGIC:
        raise RecordCorrupt("not a record (bad magic)")
    magic, fmt, version, size, digest = _REC_HEAD.unpack_from(blob)
    if fmt != FORMAT:
        raise RecordCorrupt(f"record format {fmt} is not supported")
    return fmt, version, size, digest


def open_record(blob: bytes, tenant: str, month: str, aid: bytes, keys: Keys) -> bytes:
    import zstandard
    _, version, size, digest = record_header(blob)
    head = blob[:_REC_HEAD.size]
    try:
        packed = crypto.open_blob(keys.store_key(tenant, version), blob[_REC_HEAD.size:],
                                  _aad(b"record", tenant, month, aid, head))
    except crypto.DecryptionError:
        raise RecordCorrupt("record does not decrypt (altered, or not this tenant's)") from None
    try:
        raw = zstandard.ZstdDecompressor().decompress(packed, max_output_size=max(size, 1))
    except zstandard.ZstdError as e:
        raise RecordCorrupt(f"record does not decompress: {e}") from None
    if len(raw) != size or hashlib.sha256(raw).digest() != digest:
        raise RecordCorrupt("record's SHA-256 does not match its contents")
    return raw


def seal_meta(doc: dict, tenant: str, month: str, aid: bytes, version: int, key: bytes) -> bytes:
    head = _META_HEAD.pack(META_MAGIC, FORMAT, version)
    body = json.dumps(doc, ensure_ascii=True, separators=(",", ":"), sort_keys=True).encode()
    return head + crypto.seal_blob(key, body, _aad(b"meta", tenant, month, aid, head))


# What a search result line shows, kept (encrypted like the metadata) in the
# shard index's document data so that a search reads no LMDB at all.  It is
# derived from the message bytes only, so it never goes stale.
LISTING_FIELDS = ("date", "from", "subject", "message_id", "size")


def seal_listing(summary: dict, tenant: str, month: str, aid: bytes, keys: Keys) -> bytes:
    """The listing of a record with this summary, under the tenant's current key."""
    version, key = keys.current(tenant)
    head = _META_HEAD.pack(LISTING_MAGIC, FORMAT, version)
    body = json.dumps({f: summary.get(f) for f in LISTING_FIELDS},
                      ensure_ascii=False, separators=(",", ":")).encode()
    return head + crypto.seal_blob(key, body, _aad(b"listing", tenant, month, aid, head))


def open_listing(blob: bytes, tenant: str, month: str, aid: bytes, keys: Keys) -> dict:
    """The listing fields of one search hit; RecordCorrupt if the blob is
    not one, or does not decrypt for this tenant, shard and id."""
    return _open_json(blob, LISTING_MAGIC, b"listing", "listing", tenant, month, aid, keys)


def open_meta(blob: bytes, tenant: str, month: str, aid: bytes, keys: Keys) -> dict:
    return _open_json(blob, META_MAGIC, b"meta", "metadata", tenant, month, aid, keys)


def _open_json(blob: bytes, magic: bytes, kind: bytes, what: str, tenant: str, month: str, aid: bytes,
               keys: Keys) -> dict:
    """A metadata or listing blob: header (magic, format, key version),
    then the AEAD-sealed JSON document."""
    if len(blob) < _META_HEAD.size or blob[:4] != magic:
        raise RecordCorrupt(f"not a {what} blob (bad magic)")
    _, fmt, version = _META_HEAD.unpack_from(blob)
    if fmt != FORMAT:
        raise RecordCorrupt(f"{what} format {fmt} is not supported")
    try:
        body = crypto.open_blob(keys.store_key(tenant, version), blob[_META_HEAD.size:],
                                _aad(kind, tenant, month, aid, blob[:_META_HEAD.size]))
    except crypto.DecryptionError:
        raise RecordCorrupt(f"{what} does not decrypt (altered, or not this tenant's)") from None
    return json.loads(body)


# --- one shard -----------------------------------------------------------------

def index_listing(blob: bytes, tenant: str, month: str, aid: str, keys: Keys) -> dict | None:
    """The listing the index holds for a record; None when it holds none
    (an index built before listings) or one that does not open, so that
    the caller reads the record's metadata instead (Store.listing)."""
    if not blob:
        return None
    try:
        return open_listing(blob, tenant, month, bytes.fromhex(aid), keys)
    except (RecordCorrupt, ValueError):
        log.warning("%s/%s: the index's listing of %s does not open; read from the store",
                    tenant, month, aid)
        return None


class Shard:
    """One LMDB environment.  Writers: one process, one thread at a time
    (the archiver, or a CLI restore); readers anywhere."""

    def __init__(self, directory: Path, tenant: str, month: str, *, readonly: bool = False):
        self.dir = Path(directory)
        self.tenant, self.month = tenant, month
        self.lmdb_dir = self.dir / "lmdb"
        self.index_dir = self.dir / "xapian"
        if readonly and not (self.lmdb_dir / "data.mdb").exists():
            raise StoreError(f"no shard {tenant}/{month}")
        self.env = _open_env(self.lmdb_dir, readonly=readonly, map_size=MAP_SIZE, max_dbs=8, subdir=True,
                             metasync=True, sync=True, max_readers=256)
        create = not readonly
        try:
            self.records = self.env.open_db(b"records", create=create)
            self.meta = self.env.open_db(b"meta", create=create)
            self.chain = self.env.open_db(b"chain", create=create)
            self.seals = self.env.open_db(b"seals", create=create)
            self.state = self.env.open_db(b"state", create=create)
        except BaseException:
            self.env.close()
            raise

    def close(self) -> None:
        self.env.close()

    # --- state ---

    def _state(self, txn) -> tuple[int, bytes]:
        raw = txn.get(b"head", db=self.state)
        if raw is None:
            return 0, GENESIS
        seq, head = struct.unpack(">Q32s", raw)
        return seq, head

    def head(self) -> tuple[int, bytes]:
        """(last sequence number, its hash); (0, zeros) when empty."""
        with self.env.begin() as txn:
            return self._state(txn)

    def backup_seq(self) -> int:
        with self.env.begin() as txn:
            raw = txn.get(b"backup_seq", db=self.state)
            return struct.unpack(">Q", raw)[0] if raw else 0

    def set_backup_seq(self, seq: int) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(b"backup_seq", struct.pack(">Q", seq), db=self.state)

    def _append(self, txn, op: int, aid: bytes, digest: bytes, when: float) -> int:
        seq, prev = self._state(txn)
        seq += 1
        h = chain_hash(seq, op, aid, digest, when, prev)
        txn.put(struct.pack(">Q", seq), _CHAIN.pack(op, aid, digest, when, prev, h), db=self.chain,
                overwrite=False)
        txn.put(b"head", struct.pack(">Q32s", seq, h), db=self.state)
        return seq

    # --- writing ---

    def store(self, items: list[Item], keys: Keys, now: float | None = None) -> list[Outcome]:
        """Store records (once per id) and merge envelopes, in one
        transaction.  Idempotent: an item already stored with the same
        envelope key changes nothing."""
        now = time.time() if now is None else now
        version, key = keys.current(self.tenant)
        out = []
        with self.env.begin(write=True) as txn:
            for it in items:
                aid = bytes.fromhex(it.aid)
                new_record = False
                if txn.get(aid, db=self.records) is None:
                    blob = seal_record(it.raw, self.tenant, self.month, aid, version, key)
                    txn.put(aid, blob, db=self.records)
                    self._append(txn, OP_ADD, aid, hashlib.sha256(blob).digest(), now)
                    new_record = True
                old = txn.get(aid, db=self.meta)
                meta = open_meta(old, self.tenant, self.month, aid, keys) if old is not None else {
                    "id": it.aid, "tenant": self.tenant, "summary": it.summary, "envelopes": {},
                    "first_seen": now}
                new_env = it.envelope_key not in meta["envelopes"]
                if new_env:
                    meta["envelopes"][it.envelope_key] = it.envelope
                    blob = seal_meta(meta, self.tenant, self.month, aid, version, key)
                    txn.put(aid, blob, db=self.meta)
                    self._append(txn, OP_META, aid, hashlib.sha256(blob).digest(), now)
                out.append(Outcome(it.aid, self.month, new_record, new_env, meta))
        return out

    def delete(self, aid_hex: str, reason: str, now: float | None = None) -> bool:
        """Remove a record and its metadata, leaving a tombstone in the chain.
        `reason` is stored in the clear (digest of it in the chain): no
        message content."""
        aid = bytes.fromhex(aid_hex)
        with self.env.begin(write=True) as txn:
            if txn.get(aid, db=self.records) is None:
                return False
            txn.delete(aid, db=self.records)
            txn.delete(aid, db=self.meta)
            tomb = json.dumps({"reason": reason}, sort_keys=True).encode()
            txn.put(b"tomb:" + aid, tomb, db=self.state)
            self._append(txn, OP_DELETE, aid, hashlib.sha256(tomb).digest(),
                         time.time() if now is None else now)
        return True

    def seal(self, seed: bytes, *, timestamper=None, now: float | None = None) -> Seal | None:
        """Sign the chain head (nothing to do if the last seal covers it).
        `timestamper(message) -> token bytes` adds an RFC 3161 token."""
        now = time.time() if now is None else now
        with self.env.begin() as txn:
            seq, head = self._state(txn)
            last = self._last_seal(txn)
        if seq == 0 or (last is not None and last.seq == seq):
            return None
        msg = seal_message(self.tenant, self.month, seq, head, now)
        token = timestamper(msg) if timestamper is not None else b""
        with self.env.begin(write=True) as txn:
            if self._state(txn)[0] != seq:        # a writer got in between: seal next time
                return None
            last = self._last_seal(txn)
            number = 1 if last is None else last.number + 1
            s = Seal(number, seq, head, now, crypto.ed25519_public(seed), crypto.ed25519_sign(seed, msg), token)
            txn.put(struct.pack(">Q", number), s.encode(), db=self.seals)
        return s

    def _last_seal(self, txn) -> Seal | None:
        cur = txn.cursor(db=self.seals)
        if not cur.last():
            return None
        return Seal.decode(struct.unpack(">Q", cur.key())[0], cur.value())

    def last_seal(self) -> Seal | None:
        with self.env.begin() as txn:
            return self._last_seal(txn)

    # --- reading ---

    def get(self, aid_hex: str, keys: Keys) -> tuple[bytes, dict]:
        aid = bytes.fromhex(aid_hex)
        with self.env.begin() as txn:
            rec, meta = txn.get(aid, db=self.records), txn.get(aid, db=self.meta)
        if rec is None:
            raise StoreError(f"no message {aid_hex} in {self.tenant}/{self.month}")
        raw = open_record(rec, self.tenant, self.month, aid, keys)
        return raw, (open_meta(meta, self.tenant, self.month, aid, keys) if meta is not None else {})

    def get_meta(self, aid_hex: str, keys: Keys) -> dict | None:
        aid = bytes.fromhex(aid_hex)
        with self.env.begin() as txn:
            meta = txn.get(aid, db=self.meta)
        return None if meta is None else open_meta(meta, self.tenant, self.month, aid, keys)

    def has(self, aid_hex: str) -> bool:
        with self.env.begin() as txn:
            return txn.get(bytes.fromhex(aid_hex), db=self.records) is not None

    def ids(self) -> list[str]:
        with self.env.begin() as txn:
            return [k.hex() for k in txn.cursor(db=self.records).iternext(keys=True, values=False)]

    def count(self) -> int:
        with self.env.begin() as txn:
            return txn.stat(self.records)["entries"]

    def chain_entries(self, start: int = 1):
        """Chain entries from `start` on, each with the blob it covers as
        stored now (None if gone): what the backup ships."""
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.chain)
            if not cur.set_range(struct.pack(">Q", start)):
                return
            for k, v in cur:
                e = ChainEntry.decode(struct.unpack(">Q", k)[0], v)
                aid = bytes.fromhex(e.aid)
                if e.op == OP_ADD:
                    blob = txn.get(aid, db=self.records)
                elif e.op == OP_META:
                    blob = txn.get(aid, db=self.meta)
                else:
                    blob = txn.get(b"tomb:" + aid, db=self.state)
                yield e, v, (bytes(blob) if blob is not None else None)

    def seals_from(self, start: int = 1) -> list[tuple[int, bytes]]:
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.seals)
            if not cur.set_range(struct.pack(">Q", start)):
                return []
            return [(struct.unpack(">Q", k)[0], bytes(v)) for k, v in cur]

    def dump(self) -> dict[str, dict[bytes, bytes]]:
        """Every key and value of every database (tests compare restores)."""
        out = {}
        with self.env.begin() as txn:
            for name, db in (("records", self.records), ("meta", self.meta), ("chain", self.chain),
                             ("seals", self.seals), ("state", self.state)):
                out[name] = {bytes(k): bytes(v) for k, v in txn.cursor(db=db)}
        return out


# --- verification ----------------------------------------------------------------

@dataclass
class Problem:
    shard: str
    aid: str            # "" for shard-level problems
    what: str

    def __str__(self) -> str:
        return f"{self.shard}: " + (f"{self.aid}: " if self.aid else "") + self.what


def verify_shard(shard: Shard, keys: Keys | None,
                 seal_public: bytes | Iterable[bytes] | None) -> tuple[list[Problem], set[str]]:
    """Check the chain's links, every record and metadata blob against the
    chain, every record's SHA-256 (when `keys` is given), and every seal
    (made by one of the public keys `seal_public`, when given: every
    version of the appliance's seal key).  Returns the problems and the set
    of live ids (for the caller's index check)."""
    publics = None if seal_public is None else (
        {seal_public} if isinstance(seal_public, bytes) else set(seal_public))
    name = f"{shard.tenant}/{shard.month}"
    problems: list[Problem] = []
    live_add: dict[bytes, bytes] = {}          # id -> digest of its record, per the chain
    last_meta: dict[bytes, bytes] = {}
    hashes: dict[int, bytes] = {}
    with shard.env.begin() as txn:
        prev, expect = GENESIS, 1
        for k, v in txn.cursor(db=shard.chain):
            seq = struct.unpack(">Q", k)[0]
            try:
                e = ChainEntry.decode(seq, v)
            except struct.error:
                problems.append(Problem(name, "", f"chain entry {seq} is malformed"))
                continue
            if seq != expect:
                problems.append(Problem(name, "", f"chain entries {expect}..{seq - 1} are missing"))
            expect = seq + 1
            aid = bytes.fromhex(e.aid)
            if e.prev != prev:
                problems.append(Problem(name, e.aid, f"chain entry {seq} does not link to entry {seq - 1} "
                                                     "(removed, inserted or reordered)"))
            if chain_hash(seq, e.op, aid, e.digest, e.time, e.prev) != e.hash:
                problems.append(Problem(name, e.aid, f"chain entry {seq} was altered"))
            prev = e.hash
            hashes[seq] = e.hash
            if e.op == OP_ADD:
                live_add[aid] = e.digest
            elif e.op == OP_META:
                last_meta[aid] = e.digest
            elif e.op == OP_DELETE:
                live_add.pop(aid, None)
                last_meta.pop(aid, None)
        head_seq, head = shard._state(txn)
        if head_seq != expect - 1 or (head_seq and head != prev):
            problems.append(Problem(name, "", f"state says the chain ends at {head_seq}, "
                                              f"the chain ends at {expect - 1}"))
        seen = set()
        for k, blob in txn.cursor(db=shard.records):
            aid = bytes(k)
            seen.add(aid)
            want = live_add.get(aid)
            if want is None:
                problems.append(Problem(name, aid.hex(), "record is not in the chain (inserted)"))
                continue
            if hashlib.sha256(blob).digest() != want:
                problems.append(Problem(name, aid.hex(), "record differs from what the chain recorded "
                                                         "(altered or swapped)"))
                continue
            if keys is not None:
                try:
                    open_record(bytes(blob), shard.tenant, shard.month, aid, keys)
                except RecordCorrupt as err:
                    problems.append(Problem(name, aid.hex(), str(err)))
                except KeyMissing as err:
                    problems.append(Problem(name, aid.hex(), f"cannot check: {err}"))
        for aid in live_add.keys() - seen:
            problems.append(Problem(name, aid.hex(), "record is missing (deleted without a tombstone)"))
        for k, blob in txn.cursor(db=shard.meta):
            aid = bytes(k)
            if hashlib.sha256(blob).digest() != last_meta.get(aid):
                problems.append(Problem(name, aid.hex(), "metadata differs from what the chain recorded"))
        for aid in last_meta.keys() - {bytes(k) for k in txn.cursor(db=shard.meta).iternext(values=False)}:
            problems.append(Problem(name, aid.hex(), "metadata is missing"))
        seals = [(struct.unpack(">Q", k)[0], bytes(v)) for k, v in txn.cursor(db=shard.seals)]
    for number, raw in seals:
        try:
            s = Seal.decode(number, raw)
        except (RecordCorrupt, struct.error):
            problems.append(Problem(name, "", f"seal {number} is malformed"))
            continue
        if s.seq not in hashes:
            problems.append(Problem(name, "", f"seal {number} covers chain entry {s.seq}, which is gone "
                                              "(chain truncated)"))
            continue
        if hashes[s.seq] != s.head:
            problems.append(Problem(name, "", f"seal {number} does not match chain entry {s.seq} "
                                              "(chain rewritten)"))
        if publics is not None and not any(hmac.compare_digest(s.public_key, k) for k in publics):
            problems.append(Problem(name, "", f"seal {number} was made with another key"))
        try:
            crypto.ed25519_verify(s.public_key, s.signature,
                                  seal_message(shard.tenant, shard.month, s.seq, s.head, s.time))
        except crypto.SignatureError:
            problems.append(Problem(name, "", f"seal {number}: signature does not verify"))
    return problems, {a.hex() for a in live_add}


# --- the store: tenants, shards, catalog -------------------------------------------

class StoreLocked(StoreError):
    pass


class WriterLock:
    """One writer for the whole store across processes: the daemon's
    archiver holds it for each batch, a CLI tool that writes (import,
    reindex, restore) for its whole run.  flock(2): released when the
    holder dies."""

    def __init__(self, root: Path):
        self.path = Path(root) / ".writer.lock"
        self.fd = None

    def acquire(self, timeout: float = 0.0) -> None:
        import fcntl
        private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.fd = fd
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise StoreLocked(f"{self.path.parent}: another process is writing to the store") from None
                time.sleep(0.1)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        if self.fd is None:
            self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

class Store:
    """The tenants' shards and catalogs under one root.

    At most `max_open_shards` shard environments stay open; the least
    recently used one is closed when another is opened.  An open LMDB
    environment keeps its pages mapped, and the archiver touches every leaf
    page of the shard it writes (archive ids are random), so without a limit
    a long-running archiver's RSS grows with the archive (bench/archive
    measured 119 -> 667 MiB over 10k -> 100k messages).  A `Shard` returned
    by `shard()` is therefore valid until the next `shard()` call: use it,
    do not keep it."""

    def __init__(self, root: Path, *, readonly: bool = False, max_open_shards: int = MAX_OPEN_SHARDS):
        if max_open_shards < 1:
            raise ValueError("max_open_shards must be at least 1")
        self.root = Path(root)
        self.readonly = readonly
        self.max_open_shards = max_open_shards
        # Insertion order is recency order: shard() moves a hit to the end.
        self._shards: dict[tuple[str, str], Shard] = {}
        self._catalogs: dict[str, tuple[lmdb.Environment, object]] = {}

    def close(self) -> None:
        """Close (unmap) every open environment.  The store stays usable:
        the next access opens what it needs again."""
        for s in self._shards.values():
            s.close()
        for env, _ in self._catalogs.values():
            env.close()
        self._shards.clear()
        self._catalogs.clear()

    def tenants(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def months(self, tenant: str, *, check: bool = True) -> list[str]:
        """The tenant's shards (YYYY-MM), oldest first.  `check=False` skips
        the test that each has its LMDB file (a search, which only opens
        the indexes, lists them every time)."""
        d = os.path.join(self.root, tenant)
        try:
            names = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(n for n in names if len(n) == 7 and n[4] == "-" and n[:4].isdigit() and n[5:].isdigit()
                      and (not check or os.path.exists(os.path.join(d, n, "lmdb", "data.mdb"))))

    def index_paths(self, tenant: str, months: list[str]) -> list[str]:
        """The Xapian directories of these shards (whether they exist or not)."""
        d = os.path.join(self.root, tenant)
        return [os.path.join(d, m, "xapian") for m in months]

    def shard(self, tenant: str, month: str) -> Shard:
        key = (tenant, month)
        s = self._shards.pop(key, None)
        if s is None:
            s = Shard(self.root / tenant / month, tenant, month, readonly=self.readonly)
            while len(self._shards) >= self.max_open_shards:
                oldest = next(iter(self._shards))
                self._shards.pop(oldest).close()
        self._shards[key] = s
        return s

    def listing(self, tenant: str, month: str, aid: str, blob: bytes, keys: Keys) -> dict:
        """What a search result shows of one record: from the index's
        listing blob, or from the record's metadata when the index has none
        (built before listings) or one that does not open (the index is
        derived, the store is the truth; `verify` reports such an index)."""
        found = index_listing(blob, tenant, month, aid, keys)
        return found if found is not None else self.stored_listing(tenant, month, aid, keys)

    def stored_listing(self, tenant: str, month: str, aid: str, keys: Keys) -> dict:
        """The listing from the record's metadata in the shard."""
        meta = self.shard(tenant, month).get_meta(aid, keys) or {}
        return meta.get("summary") or {}

    def open_shards(self) -> list[tuple[str, str]]:
        """(tenant, month) of the shards open now, least recently used first."""
        return list(self._shards)

    def _catalog(self, tenant: str):
        c = self._catalogs.get(tenant)
        if c is None:
            d = self.root / tenant / "catalog"
            if self.readonly and not (d / "data.mdb").exists():
                raise StoreError(f"no archive for tenant {tenant}")
            env = _open_env(d, readonly=self.readonly, map_size=CATALOG_MAP_SIZE, max_dbs=2)
            try:
                db = env.open_db(b"ids", create=not self.readonly)
            except BaseException:
                env.close()
                raise
            c = self._catalogs[tenant] = (env, db)
        return c

    def has_archive(self, tenant: str) -> bool:
        """Whether the tenant has a catalog (any mail stored), found
        without creating one."""
        return tenant in self._catalogs or (self.root / tenant / "catalog" / "data.mdb").exists()

    def locate(self, tenant: str, aid: str) -> str | None:
        """The month (shard) that holds `aid`, if stored.  A lookup never
        creates a catalog: without one, nothing is stored (a read-only
        store says so with StoreError, as before)."""
        if not self.has_archive(tenant):
            if self.readonly:
                raise StoreError(f"no archive for tenant {tenant}")
            return None
        env, db = self._catalog(tenant)
        with env.begin() as txn:
            m = txn.get(bytes.fromhex(aid), db=db)
        return None if m is None else bytes(m).decode()

    def catalog_put(self, tenant: str, pairs: list[tuple[str, str]]) -> None:
        env, db = self._catalog(tenant)
        with env.begin(write=True) as txn:
            for aid, month in pairs:
                txn.put(bytes.fromhex(aid), month.encode(), db=db)

    def store(self, tenant: str, items: list[Item], keys: Keys) -> list[Outcome]:
        """Store a batch for one tenant.  An id already in the catalog goes
        to the shard that holds it, whatever month this copy suggests."""
        by_month: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            it.month = self.locate(tenant, it.aid) or it.month
            by_month.setdefault(it.month, []).append(i)
        out: list[Outcome | None] = [None] * len(items)
        for month, idx in sorted(by_month.items()):
            # Outcomes in the order of `items`: callers zip them together.
            for i, o in zip(idx, self.shard(tenant, month).store([items[i] for i in idx], keys)):
                out[i] = o
        # After the shard commit: a crash before this line leaves an entry
        # that the spool will bring again, and locate() then still misses;
        # month_of() gives the same month for the same spool entry.
        self.catalog_put(tenant, [(o.aid, o.month) for o in out])
        return out


# --- backup: a directory that holds no keys -------------------------------------------

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
            _fsync_parent(path)
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

    def logs(self) -> list[tuple[str, str, Path]]:
        out = []
        if self.dir.is_dir():
            for tdir in sorted(p for p in self.dir.iterdir() if p.is_dir()):
                for log_path in sorted(tdir.glob("*.log")):
                    out.append((tdir.name, log_path.stem, log_path))
        return out


def _fsync_parent(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
                        raw, blob = payload[:_CHAIN.size], payload[_CHAIN.size:]
                        if seq <= last_seq:
                            if txn.get(struct.pack(">Q", seq), db=shard.chain) != raw:
                                raise StoreError(f"{path}: two different chain entries {seq}")
                            continue
                        if seq != last_seq + 1:
                            raise StoreError(f"{path}: chain entries {last_seq + 1}..{seq - 1} are missing")
                        e = ChainEntry.decode(seq, raw)
                        aid = bytes.fromhex(e.aid)
                        txn.put(struct.pack(">Q", seq), raw, db=shard.chain)
                        if e.op == OP_ADD:
                            txn.put(aid, blob, db=shard.records)
                        elif e.op == OP_META:
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
