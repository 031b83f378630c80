"""Shards and the store: per tenant and month one LMDB environment, and
per tenant a catalog (archive id -> month).

A shard (`store/TENANT/YYYY-MM/lmdb/`) holds five named databases:

- `records`  archive id (20 bytes) -> record blob (codecs.py)
- `meta`     archive id -> metadata blob (codecs.py)
- `chain`    sequence number (u64 big-endian) -> chain entry (chain.py).  Append-only.
- `seals`    seal number -> seal (chain.py)
- `state`    next sequence, head hash, what has been shipped to the backup.

This module knows nothing of SMTP, the spool or Xapian.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from mailtresor.archive.store.chain import (GENESIS, OP_ADD, OP_DELETE, OP_META, ChainEntry, Seal, chain_hash,
                                            encode_entry, seal_message)
from mailtresor.archive.store.codecs import index_listing, open_meta, open_record, seal_meta, seal_record
from mailtresor.archive.store.errors import StoreError
from mailtresor.archive.store.fs import open_env
from mailtresor.keys import crypto
from mailtresor.keys.derive import Keys

MAP_SIZE = 1 << 36                            # 64 GiB of address space per shard; the file grows as used
CATALOG_MAP_SIZE = 1 << 34
MAX_OPEN_SHARDS = 4
UNROUTED = "unrouted"


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


class Shard:
    """One LMDB environment.  Writers: one process, one thread at a time
    (the archiver, or a CLI restore); readers anywhere."""

    def __init__(self, directory: Path, tenant: str, month: str, *, readonly: bool = False):
        self.dir = Path(directory)
        self.tenant, self.month = tenant, month
        self.lmdb_dir = self.dir / "lmdb"
        self.index_dir = self.dir / "xapian"
        if not readonly and not (self.lmdb_dir / "data.mdb").exists() and (self.dir / "lmdb.old").is_dir():
            # A compaction (archive/compact.py) cut short between its two
            # renames: the original goes back before anything can create
            # an empty environment in its place.
            os.rename(self.dir / "lmdb.old", self.lmdb_dir)
        if readonly and not (self.lmdb_dir / "data.mdb").exists():
            raise StoreError(f"no shard {tenant}/{month}")
        self.env = open_env(self.lmdb_dir, readonly=readonly, map_size=MAP_SIZE, max_dbs=8, subdir=True,
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
        txn.put(struct.pack(">Q", seq), encode_entry(op, aid, digest, when, prev, h), db=self.chain,
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
        return bool(self.delete_many([(aid_hex, {"reason": reason})], now))

    def delete_many(self, victims: list[tuple[str, dict]], now: float | None = None) -> list[str]:
        """Remove records and their metadata in one transaction, each leaving
        a tombstone: the caller's dict (why, by whom: no message content)
        plus the SHA-256 of the record blob it replaces, stored in the clear
        under state "tomb:<id>", its digest in the chain entry.  Returns the
        ids deleted (an id not stored is skipped)."""
        now = time.time() if now is None else now
        done = []
        with self.env.begin(write=True) as txn:
            for aid_hex, why in victims:
                aid = bytes.fromhex(aid_hex)
                rec = txn.get(aid, db=self.records)
                if rec is None:
                    continue
                txn.delete(aid, db=self.records)
                txn.delete(aid, db=self.meta)
                tomb = json.dumps({**why, "record_sha256": hashlib.sha256(rec).hexdigest()},
                                  sort_keys=True).encode()
                txn.put(b"tomb:" + aid, tomb, db=self.state)
                self._append(txn, OP_DELETE, aid, hashlib.sha256(tomb).digest(), now)
                done.append(aid_hex)
        return done

    def tombstones(self, txn=None) -> dict[bytes, bytes]:
        """Every tombstone the shard keeps: id (20 bytes) -> the tomb JSON
        as stored (verify checks each against its chain entry; evidence
        lists them).  In `txn` if given (a reader's consistent view)."""
        if txn is None:
            with self.env.begin() as t:
                return self.tombstones(t)
        out = {}
        cur = txn.cursor(db=self.state)
        if cur.set_range(b"tomb:"):
            for k, v in cur:
                k = bytes(k)
                if not k.startswith(b"tomb:"):
                    break
                out[k[5:]] = bytes(v)
        return out

    def tombstone(self, aid_hex: str) -> dict | None:
        """The tombstone of a deleted record (None if it was never deleted)."""
        with self.env.begin() as txn:
            raw = txn.get(b"tomb:" + bytes.fromhex(aid_hex), db=self.state)
        return None if raw is None else json.loads(bytes(raw))

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

    def update_meta(self, aid_hex: str, fn, keys: Keys, now: float | None = None) -> dict | None:
        """Change a record's metadata (never the record): `fn(meta) -> bool`
        changes the opened metadata in place and says whether it did; the
        new blob is written, sealed with the tenant's current key, and an
        OP_META entry with its digest is appended to the chain, in one
        transaction (so `verify` checks it like any other metadata).
        Returns the metadata (changed or not), None if the record is not
        stored.  Used for case tags (archive/casetags.py)."""
        now = time.time() if now is None else now
        aid = bytes.fromhex(aid_hex)
        with self.env.begin(write=True) as txn:
            if txn.get(aid, db=self.records) is None:
                return None
            old = txn.get(aid, db=self.meta)
            meta = open_meta(old, self.tenant, self.month, aid, keys) if old is not None else {
                "id": aid_hex, "tenant": self.tenant, "envelopes": {}}
            if fn(meta):
                version, key = keys.current(self.tenant)
                blob = seal_meta(meta, self.tenant, self.month, aid, version, key)
                txn.put(aid, blob, db=self.meta)
                self._append(txn, OP_META, aid, hashlib.sha256(blob).digest(), now)
        return meta


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
            env = open_env(d, readonly=self.readonly, map_size=CATALOG_MAP_SIZE, max_dbs=2)
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

    def catalog_delete(self, tenant: str, aids: list[str]) -> None:
        """Forget where these ids were (after their records were deleted):
        a message archived again later is a new record in its own month."""
        if not self.has_archive(tenant):
            return
        env, db = self._catalog(tenant)
        with env.begin(write=True) as txn:
            for aid in aids:
                txn.delete(bytes.fromhex(aid), db=db)

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

