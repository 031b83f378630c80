"""The hash chain and the seals over it.

Every change to a shard (a record added, metadata written, a record
deleted) appends a chain entry that hashes the previous one; a seal is an
Ed25519 signature over (tenant, shard, sequence, chain head), optionally
with an RFC 3161 time-stamp token.  The byte layout is in docs/FORMAT.md.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from mailtresor.archive.store.errors import RecordCorrupt

CHAIN_ENTRY = struct.Struct(">B20s32sd32s32s")     # op, id, blob digest, time, prev hash, hash
SEAL_HEAD = struct.Struct(">Q32sd32s64sI")         # seq, head, time, public key, signature, tsa token length
OP_ADD, OP_META, OP_DELETE = 1, 2, 3
OP_NAMES = {OP_ADD: "add", OP_META: "meta", OP_DELETE: "delete"}
GENESIS = bytes(32)


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
        op, aid, digest, when, prev, h = CHAIN_ENTRY.unpack(raw)
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
        return SEAL_HEAD.pack(self.seq, self.head, self.time, self.public_key, self.signature,
                              len(self.tsa_token)) + self.tsa_token

    @classmethod
    def decode(cls, number: int, raw: bytes) -> "Seal":
        seq, head, when, pub, sig, n = SEAL_HEAD.unpack_from(raw)
        token = raw[SEAL_HEAD.size:SEAL_HEAD.size + n]
        if len(token) != n:
            raise RecordCorrupt(f"seal {number} is truncated")
        return cls(number, seq, head, when, pub, sig, token)


def encode_entry(op: int, aid: bytes, digest: bytes, when: float, prev: bytes, h: bytes) -> bytes:
    return CHAIN_ENTRY.pack(op, aid, digest, when, prev, h)
