"""The byte formats of what a shard stores, one codec per format version.

Three kinds of blob, each a header (magic, format, ...) followed by
AES-256-GCM ciphertext whose associated data binds tenant, shard, archive
id and the header (docs/FORMAT.md, "Archive store"):

- record   (`MTR1`): the message, zstd-compressed; header with the key
             version, the raw size and the SHA-256 of the raw bytes;
- metadata (`MTM1`): JSON (envelopes keyed by spool entry, the summary);
- listing  (`MTL1`): JSON of LISTING_FIELDS, kept in the index's document
             data so that a search reads no LMDB at all.

Writers use the codec of WRITE_FORMAT; readers look the header's format
byte up in the kind's table (RECORD_CODECS, META_CODECS, LISTING_CODECS).
A new on-disk format is a new codec class and one entry per table; the
blobs already written keep reading with the codec of their version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct

from mailtresor.archive.store.errors import RecordCorrupt
from mailtresor.keys import crypto

log = logging.getLogger("mailtresor.archive.store")

RECORD_MAGIC = b"MTR1"
META_MAGIC = b"MTM1"
LISTING_MAGIC = b"MTL1"
WRITE_FORMAT = 1                               # what new blobs are written in
FORMAT = WRITE_FORMAT                          # the name older code imports
_PREFIX = struct.Struct(">4sB")                # magic, format: common to every version

# What a search result line shows.  It is derived from the message bytes
# only, so it never goes stale.
# "to", "to_count": the first To: addresses and how many there are (records
# archived before they were added have neither; `reindex` fills them in).
LISTING_FIELDS = ("date", "from", "subject", "message_id", "size", "to", "to_count")


def _aad(kind: bytes, tenant: str, month: str, aid: bytes, head: bytes) -> bytes:
    return b"mailtresor/" + kind + b"/1\0" + tenant.encode() + b"\0" + month.encode() + b"\0" + aid + head


_ZC = None                 # the zstd compressor, made when first needed


def _compress(raw: bytes) -> bytes:
    global _ZC
    if _ZC is None:
        # Imported here: reading metadata (a search) needs no zstd.
        import zstandard
        _ZC = zstandard.ZstdCompressor(level=3)
    return _ZC.compress(raw)


class RecordV1:
    """Record format 1: (magic, 1, key version u32, raw size u64,
    SHA-256(raw)) + nonce + AES-256-GCM(zstd(raw))."""

    format = 1
    head = struct.Struct(">4sBIQ32s")

    def seal(self, raw: bytes, tenant: str, month: str, aid: bytes, version: int, key: bytes) -> bytes:
        head = self.head.pack(RECORD_MAGIC, self.format, version, len(raw), hashlib.sha256(raw).digest())
        return head + crypto.seal_blob(key, _compress(raw), _aad(b"record", tenant, month, aid, head))

    def header(self, blob: bytes) -> tuple[int, int, int, bytes]:
        if len(blob) < self.head.size:
            raise RecordCorrupt("record is truncated")
        _, fmt, version, size, digest = self.head.unpack_from(blob)
        return fmt, version, size, digest

    def open(self, blob: bytes, tenant: str, month: str, aid: bytes, keys) -> bytes:
        import zstandard
        _, version, size, digest = self.header(blob)
        head = blob[:self.head.size]
        try:
            packed = crypto.open_blob(keys.store_key(tenant, version), blob[self.head.size:],
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


class SealedJsonV1:
    """Metadata and listing format 1: (magic, 1, key version u32) + nonce +
    AES-256-GCM(JSON)."""

    format = 1
    head = struct.Struct(">4sBI")

    def __init__(self, magic: bytes, kind: bytes, what: str, *, ascii_only: bool, sort_keys: bool):
        self.magic, self.kind, self.what = magic, kind, what
        self._json = {"ensure_ascii": ascii_only, "sort_keys": sort_keys, "separators": (",", ":")}

    def seal(self, doc: dict, tenant: str, month: str, aid: bytes, version: int, key: bytes) -> bytes:
        head = self.head.pack(self.magic, self.format, version)
        body = json.dumps(doc, **self._json).encode()
        return head + crypto.seal_blob(key, body, _aad(self.kind, tenant, month, aid, head))

    def open(self, blob: bytes, tenant: str, month: str, aid: bytes, keys) -> dict:
        if len(blob) < self.head.size:
            raise RecordCorrupt(f"{self.what} is truncated")
        _, _, version = self.head.unpack_from(blob)
        try:
            body = crypto.open_blob(keys.store_key(tenant, version), blob[self.head.size:],
                                    _aad(self.kind, tenant, month, aid, blob[:self.head.size]))
        except crypto.DecryptionError:
            raise RecordCorrupt(f"{self.what} does not decrypt (altered, or not this tenant's)") from None
        return json.loads(body)


# format version -> codec, per kind of blob.
RECORD_CODECS = {1: RecordV1()}
META_CODECS = {1: SealedJsonV1(META_MAGIC, b"meta", "metadata", ascii_only=True, sort_keys=True)}
LISTING_CODECS = {1: SealedJsonV1(LISTING_MAGIC, b"listing", "listing", ascii_only=False, sort_keys=False)}


def _codec(table: dict, blob: bytes, magic: bytes, what: str, bad_magic: str):
    """The codec for a blob's format byte; RecordCorrupt naming the problem."""
    if len(blob) < _PREFIX.size or blob[:4] != magic:
        raise RecordCorrupt(bad_magic)
    fmt = blob[4]
    codec = table.get(fmt)
    if codec is None:
        raise RecordCorrupt(f"{what} format {fmt} is not supported")
    return codec


# --- records ----------------------------------------------------------------------

def seal_record(raw: bytes, tenant: str, month: str, aid: bytes, version: int, key: bytes) -> bytes:
    return RECORD_CODECS[WRITE_FORMAT].seal(raw, tenant, month, aid, version, key)


def record_header(blob: bytes) -> tuple[int, int, int, bytes]:
    """(format, key version, raw size, sha256) of a record blob."""
    return _codec(RECORD_CODECS, blob, RECORD_MAGIC, "record", "not a record (bad magic)").header(blob)


def open_record(blob: bytes, tenant: str, month: str, aid: bytes, keys) -> bytes:
    """The message bytes of a record; RecordCorrupt if it does not read back."""
    return _codec(RECORD_CODECS, blob, RECORD_MAGIC, "record", "not a record (bad magic)").open(
        blob, tenant, month, aid, keys)


# --- metadata -------------------------------------------------------------------

def seal_meta(doc: dict, tenant: str, month: str, aid: bytes, version: int, key: bytes) -> bytes:
    return META_CODECS[WRITE_FORMAT].seal(doc, tenant, month, aid, version, key)


def open_meta(blob: bytes, tenant: str, month: str, aid: bytes, keys) -> dict:
    return _codec(META_CODECS, blob, META_MAGIC, "metadata", "not a metadata blob (bad magic)").open(
        blob, tenant, month, aid, keys)


# --- listings ---------------------------------------------------------------------

def seal_listing(summary: dict, tenant: str, month: str, aid: bytes, keys) -> bytes:
    """The listing of a record with this summary, under the tenant's current key."""
    version, key = keys.current(tenant)
    return LISTING_CODECS[WRITE_FORMAT].seal({f: summary.get(f) for f in LISTING_FIELDS},
                                             tenant, month, aid, version, key)


def open_listing(blob: bytes, tenant: str, month: str, aid: bytes, keys) -> dict:
    """The listing fields of one search hit; RecordCorrupt if the blob is
    not one, or does not decrypt for this tenant, shard and id."""
    return _codec(LISTING_CODECS, blob, LISTING_MAGIC, "listing", "not a listing blob (bad magic)").open(
        blob, tenant, month, aid, keys)


def index_listing(blob: bytes, tenant: str, month: str, aid: str, keys) -> dict | None:
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
