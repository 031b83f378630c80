"""Case tags: auditors tag archived messages later ("case:acme-v-smith")
without changing the stored message.

The tags live in the record's metadata (meta["case_tags"]); a change is a
metadata change through the shard's hash chain (Shard.update_meta: an
OP_META entry with the new blob's digest), so the record's bytes stay as
they are and `verify` checks the change like any other.  The index
document gets the new tag terms and tag slot without re-parsing
(IndexWriter.set_tags); the backup log gets the chain entry.  Run only on
the archiver's thread: `Archiver.exclusive(change_case_tags, tenant, aid,
add, remove)`.

Classification tags (archive/classify.py) are facts of the arrival and
cannot be removed here; `remove` only removes case tags.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from mailtresor.archive.archiver import case_tags, classification_tags, record_tags
from mailtresor.archive.classify import CASE_PREFIX, is_case_tag, valid_tag
from mailtresor.archive.index import ShardIndex

log = logging.getLogger("mailtresor.archive.casetags")

MAX_CASE_TAGS = 100          # case tags on one message
MAX_CHANGE = 50              # tags named in one change


class CaseTagError(ValueError):
    """A change that cannot be made (a bad tag name, too many tags)."""


@dataclass
class Changed:
    month: str
    changed: bool
    case_tags: list[str] = field(default_factory=list)
    classification_tags: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)              # every tag (what `tag:` finds)


def check_change(add, remove) -> tuple[list[str], list[str]]:
    """The lists of a change, checked: tag names, at most MAX_CHANGE, not
    both empty."""
    out = []
    for name, items in (("add", add), ("remove", remove)):
        items = [] if items is None else items
        if not isinstance(items, list):
            raise CaseTagError(f"{name}: expected a list of tags")
        if len(items) > MAX_CHANGE:
            raise CaseTagError(f"{name}: at most {MAX_CHANGE} tags at once")
        for t in items:
            if not valid_tag(t):
                raise CaseTagError(f"{name}: {str(t)[:80]!r} is not a tag name (1-64 of A-Z a-z 0-9 . _ : -)")
            if not is_case_tag(t) or len(t) == len(CASE_PREFIX):
                raise CaseTagError(f"{name}: {t!r}: a case tag begins with {CASE_PREFIX!r} and names the case "
                                   f"(e.g. {CASE_PREFIX}acme-v-smith)")
        out.append(list(dict.fromkeys(items)))
    if not out[0] and not out[1]:
        raise CaseTagError("nothing to change: give tags to add or remove")
    return out[0], out[1]


def change_case_tags(pipeline, tenant: str, aid: str, add: list[str], remove: list[str], *,
                     now: float | None = None) -> Changed | None:
    """Add and remove case tags of one message of `tenant` (a tag both
    added and removed is removed).  None if the message is not stored.
    Raises CaseTagError if the message would carry more than MAX_CASE_TAGS."""
    add, remove = check_change(add, remove)
    now = time.time() if now is None else now
    store = pipeline.store
    month = store.locate(tenant, aid)
    if month is None:
        return None
    shard = store.shard(tenant, month)

    changed = False

    def change(meta: dict) -> bool:
        nonlocal changed
        before = set(meta.get("case_tags") or ())
        after = (before | set(add)) - set(remove)
        if after == before:
            return False
        if len(after) > MAX_CASE_TAGS:
            raise CaseTagError(f"a message carries at most {MAX_CASE_TAGS} case tags")
        meta["case_tags"] = sorted(after)
        changed = True
        return True

    meta = shard.update_meta(aid, change, pipeline.keys, now)
    if meta is None:
        return None
    out = Changed(month, changed, case_tags(meta), classification_tags(meta), record_tags(meta))
    if changed:
        # Index after the commit: a crash in between leaves the store right
        # and the index behind (index_lag in status; `reindex` mends it:
        # it takes the tags from the metadata).
        with ShardIndex(shard.index_dir).writer() as w:
            if not w.set_tags(aid, out.tags):
                log.warning("%s/%s: %s has no index document; run `mailtresor reindex --missing`",
                            tenant, month, aid)
            w.set_indexed_seq(shard.head()[0])
        if pipeline.backup is not None:
            pipeline.backup.ship(shard)
        pipeline._dirty.setdefault((tenant, month), pipeline.clock())
        pipeline._seal_due()
    return out
