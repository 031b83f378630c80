"""The permanent archive: per tenant and month one LMDB environment.

One module per concern (docs/ARCHITECTURE.md has the map):

    codecs.py   the byte formats of records, metadata and listings, with a
                format version -> codec table (a newer format is one entry)
    chain.py    the hash chain over every change, and the seals over it
    shard.py    Shard (one LMDB environment), Store (the tenants' shards and
                catalogs, at most a few open), Item/Outcome, month_of
    verify.py   verify_shard: chain, records, metadata, seals
    backup.py   BackupDirectory (append-only logs that hold no keys), restore
    lock.py     WriterLock: one writing process at a time
    fs.py       private files and directories, storage faults (a full disk is
                no message's fault), LMDB environments that leave nothing torn
    errors.py   StoreError, RecordCorrupt, StoreLocked

The keys (tenant sub-keys, archive ids) are in mailtresor.keys.derive.  The
byte formats are in docs/FORMAT.md ("Archive store").  This package knows
nothing of SMTP, the spool or Xapian.

The names below are what the rest of the daemon, the CLI and the tests
import from `mailtresor.archive.store`; new code may import from the module
that defines a name.
"""

from __future__ import annotations

from mailtresor.archive.store.backup import BackupDirectory, _checked_size, read_frames, restore
from mailtresor.archive.store.chain import (CHAIN_ENTRY, GENESIS, OP_ADD, OP_DELETE, OP_META, OP_NAMES, ChainEntry,
                                            Seal, chain_hash, seal_message)
from mailtresor.archive.store.codecs import (FORMAT, LISTING_FIELDS, LISTING_MAGIC, META_MAGIC, RECORD_MAGIC,
                                             index_listing, open_listing, open_meta, open_record, record_header,
                                             seal_listing, seal_meta, seal_record)
from mailtresor.archive.store.errors import RecordCorrupt, StoreError, StoreLocked
from mailtresor.archive.store.fs import (DIR_MODE, FILE_MODE, describe_fault, private_dir, private_tree,
                                         storage_fault)
from mailtresor.archive.store.lock import WriterLock
from mailtresor.archive.store.shard import (UNROUTED, Item, Outcome, Shard, Store, effective_date, month_of)
from mailtresor.archive.store.verify import Problem, verify_shard
# Re-exported only because code written before the split imports them from
# here; their home is mailtresor.keys.derive.
from mailtresor.keys.derive import FetchingKeys, KeyMissing, Keys

_CHAIN = CHAIN_ENTRY        # the name tests/test_store.py imports

__all__ = [
    "BackupDirectory", "read_frames", "restore",
    "CHAIN_ENTRY", "GENESIS", "OP_ADD", "OP_DELETE", "OP_META", "OP_NAMES", "ChainEntry", "Seal",
    "chain_hash", "seal_message",
    "FORMAT", "LISTING_FIELDS", "LISTING_MAGIC", "META_MAGIC", "RECORD_MAGIC", "index_listing",
    "open_listing", "open_meta", "open_record", "record_header", "seal_listing", "seal_meta", "seal_record",
    "RecordCorrupt", "StoreError", "StoreLocked",
    "DIR_MODE", "FILE_MODE", "describe_fault", "private_dir", "private_tree", "storage_fault",
    "WriterLock",
    "UNROUTED", "Item", "Outcome", "Shard", "Store", "effective_date", "month_of",
    "Problem", "verify_shard",
    "FetchingKeys", "KeyMissing", "Keys",
]
