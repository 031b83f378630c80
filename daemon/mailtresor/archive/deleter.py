"""Deleting messages from the archive, with proof: the one way mail leaves it.

Retention runs and approved four-eyes requests (mailtresor.lifecycle) decide
*what* goes; this module does the deleting, on the archiver's thread under
its locks (`Archiver.exclusive(delete_messages, tenant, victims)`):

per shard, in one LMDB transaction, each record and its metadata go and a
tombstone takes their place in the shard's hash chain (store/shard.py
delete_many); then the index documents go, the catalog forgets the ids,
the backup log gets the tombstones (so a restore reproduces the deletion),
and the shard is marked for sealing.  A crash between the steps leaves the
store deleted and an index that still lists the message: the access core
answers "no such message" for it, `verify` reports the stale document and
the next run (or `reindex --missing`) removes it.  Deleting an id that is
already gone is not an error: it is reported as missing.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field

from mailtresor.archive.index import ShardIndex

log = logging.getLogger("mailtresor.archive.deleter")


@dataclass
class Victim:
    """One message to delete: its archive id, its month (None: looked up
    in the catalog) and the tombstone's facts (why, by which rule or
    request, by whom -- never message content)."""
    aid: str
    month: str | None
    tomb: dict


@dataclass
class Deleted:
    deleted: list[tuple[str, str]] = field(default_factory=list)     # (aid, month)
    missing: list[str] = field(default_factory=list)                 # not stored (already gone)
    shards: list[tuple[str, str]] = field(default_factory=list)      # (tenant, month) changed


def _empty_index(shard) -> None:
    """Replace a shard's index by an empty one (marked as indexed up to the
    chain head): built beside it, swapped in by one atomic exchange (the
    core's index readers see a new directory and open it), the old one
    removed.  A crash leaves `xapian.empty` beside it, which nothing reads
    and the next call removes."""
    from mailtresor.archive.compact import exchange
    from mailtresor.durable import fsync_dir
    fresh = shard.index_dir.with_name("xapian.empty")
    shutil.rmtree(fresh, ignore_errors=True)
    with ShardIndex(fresh).writer() as w:
        w.set_indexed_seq(shard.head()[0])
    if shard.index_dir.exists():
        exchange(fresh, shard.index_dir)
        fsync_dir(shard.dir)
        shutil.rmtree(fresh)
    else:
        os.rename(fresh, shard.index_dir)
    fsync_dir(shard.dir)


def delete_messages(pipeline, tenant: str, victims: list[Victim], *, now: float | None = None) -> Deleted:
    """Delete `victims` of `tenant` through the archiver's pipeline (its
    store, backup and sealing).  Call it on the archiver's thread
    (Archiver.exclusive) or with the store's writer lock held."""
    now = time.time() if now is None else now
    store = pipeline.store
    out = Deleted()
    by_month: dict[str, list[Victim]] = defaultdict(list)
    for v in victims:
        month = v.month or store.locate(tenant, v.aid)
        if month is None:
            out.missing.append(v.aid)
            continue
        by_month[month].append(v)
    for month, group in sorted(by_month.items()):
        shard = store.shard(tenant, month)
        done = set(shard.delete_many([(v.aid, {**v.tomb, "month": month}) for v in group], now))
        out.missing += [v.aid for v in group if v.aid not in done]
        if not done:
            continue
        if shard.count() == 0:
            # The whole month went (retention by date empties old months
            # whole): a new empty index swapped in costs milliseconds, where
            # Xapian's delete_document costs about a millisecond a document
            # (it reads each document's term list and updates every posting
            # list it names).
            _empty_index(shard)
        else:
            with ShardIndex(shard.index_dir).writer() as w:
                for aid in sorted(done):
                    w.delete(aid)
                w.set_indexed_seq(shard.head()[0])
        store.catalog_delete(tenant, sorted(done))
        if pipeline.backup is not None:
            pipeline.backup.ship(shard)
        pipeline._dirty.setdefault((tenant, month), pipeline.clock())
        out.deleted += [(aid, month) for aid in sorted(done)]
        out.shards.append((tenant, month))
        log.info("%s/%s: %d message(s) deleted (tombstones in the chain)", tenant, month, len(done))
    pipeline._seal_due()
    return out
