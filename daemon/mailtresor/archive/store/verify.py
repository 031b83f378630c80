"""Checking a shard: the chain's links, every record and metadata blob
against the chain, every record's SHA-256, every seal.  The caller
(`mailtresor verify`) adds the index check."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailtresor.archive.store.chain import GENESIS, OP_ADD, OP_DELETE, OP_META, ChainEntry, Seal, chain_hash, seal_message
from mailtresor.archive.store.codecs import open_record
from mailtresor.archive.store.errors import RecordCorrupt
from mailtresor.archive.store.shard import Shard
from mailtresor.keys import crypto
from mailtresor.keys.derive import KeyMissing, Keys

if TYPE_CHECKING:
    from collections.abc import Iterable


@dataclass
class Problem:
    shard: str
    aid: str            # "" for shard-level problems
    what: str

    def __str__(self) -> str:
        return f"{self.shard}: " + (f"{self.aid}: " if self.aid else "") + self.what


def verify_shard(shard: Shard, keys: Keys | None,
                 seal_public: bytes | Iterable[bytes] | None,
                 stats: dict | None = None) -> tuple[list[Problem], set[str]]:
    """Check the chain's links, every record and metadata blob against the
    chain, every record's SHA-256 (when `keys` is given), every tombstone
    against its `delete` entry (and the record digest it names against the
    `add` entry it replaced), and every seal (made by one of the public
    keys `seal_public`, when given: every version of the appliance's seal
    key).  Returns the problems and the set of live ids (for the caller's
    index check).  `stats`, when given, receives "records" (live ids) and
    "tombstones" (ids whose last chain entry is a delete)."""
    publics = None if seal_public is None else (
        {seal_public} if isinstance(seal_public, bytes) else set(seal_public))
    name = f"{shard.tenant}/{shard.month}"
    problems: list[Problem] = []
    live_add: dict[bytes, bytes] = {}          # id -> digest of its record, per the chain
    last_meta: dict[bytes, bytes] = {}
    # id -> (digest of its tombstone, digest of the record it replaced), per
    # the chain's last delete entry of that id (a message archived again
    # after a deletion and deleted again has the newer tombstone)
    tombs: dict[bytes, tuple[bytes, bytes | None]] = {}
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
                tombs[aid] = (e.digest, live_add.pop(aid, None))
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
        problems += _check_tombstones(txn, shard, name, tombs)
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
    if stats is not None:
        stats["records"] = len(live_add)
        stats["tombstones"] = sum(1 for a in tombs if a not in live_add)
    return problems, {a.hex() for a in live_add}


def _check_tombstones(txn, shard: Shard, name: str, tombs: dict) -> list[Problem]:
    """Each stored tombstone (state "tomb:" + id) against the chain: its
    SHA-256 is the last delete entry's digest for that id, and the record
    digest it names is the one the chain's add entry recorded.  A tombstone
    without a delete entry was put there by hand; a delete entry without
    its tombstone lost its proof of why."""
    problems = []
    stored = shard.tombstones(txn)
    for aid, blob in stored.items():
        if aid not in tombs:
            problems.append(Problem(name, aid.hex(), "tombstone is not in the chain (inserted)"))
            continue
        digest, record = tombs[aid]
        if hashlib.sha256(blob).digest() != digest:
            problems.append(Problem(name, aid.hex(), "tombstone differs from what the chain recorded (altered)"))
            continue
        try:
            named = json.loads(blob).get("record_sha256")
        except (ValueError, AttributeError):
            named = None
        if record is not None and named is not None and named != record.hex():
            problems.append(Problem(name, aid.hex(), "tombstone names another record than the one the chain "
                                                     "deleted"))
    for aid in tombs.keys() - stored.keys():
        problems.append(Problem(name, aid.hex(), "tombstone is missing (the delete entry's proof is gone)"))
    return problems
