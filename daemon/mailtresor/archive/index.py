"""The archive's one Xapian schema: term prefixes, value slots, the writer,
the query language and search.

One Xapian database per shard (`store/TENANT/YYYY-MM/xapian/`).  The index
is derived data: the store (LMDB) is the truth and `mailtresor reindex`
rebuilds an index from it.  A document's data is its archive id (and the
store's encrypted listing); its values are its date and size and (format 2)
what the facets count: month, sender domain, has-attachment, tags, flags --
what the terms hold already.  No subject, body, name or local part is
stored as document data or value.  The terms themselves are the words and
addresses of the message, not encrypted, and with their positions (kept for
phrase search) the word order of a text field can be rebuilt: the index
directory is as sensitive as the messages and must be protected as such.

Writers are batched: `ShardIndex.writer()` opens the database, the caller
adds a batch, the batch and the `mt:indexed_seq` mark are committed together
and the database is closed again, so that the CLI can take the write lock
between two batches of a running daemon.
"""

from __future__ import annotations

import os
import typing

import calendar
import contextlib
import datetime
import hashlib
import logging
import math
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import xapian


if TYPE_CHECKING:  # parse.py is the producer of what is indexed here
    from mailtresor.archive.parse import Parsed

log = logging.getLogger("mailtresor.archive.index")

# --------------------------------------------------------------------------
# The schema (cf. notmuch lib/prefix.cc).  Change nothing here without a
# reindex: the terms on disk are made from this table.
#
# field            prefix       kind      what is indexed
# ---------------  -----------  --------  ------------------------------------
# from:            XFROM        address   From: addresses and display-name words
# to:              XTO          address   To:
# cc:              XCC          address   Cc:
# bcc:             XBCC         address   Bcc: header plus envelope-only
#                                         recipients (in RCPT TO / the journal
#                                         report, in no header)
# envelope:        XENV         address   every envelope address: MAIL FROM,
#                                         RCPT TO, journal report recipients
# subject:         XSUBJECT     text      Subject:
# body:            XBODY        text      the body text parse.py extracted
# attachment:      XATTACHMENT  text      attachment file names: their words,
#                                         and the whole name lower-cased as
#                                         one term (for attachment:report*)
# attachment-text: XATEXT       text      text extracted from attachments
# id:, mid:        XMID         boolean   Message-ID, exact, without <>
# tag:             K            boolean   tenant tags, exact (case-sensitive)
# flag:            XFLAG        boolean   parse flags of the message and of
#                                         its attachments (lower-case)
# aid:             Q            boolean   archive id; the unique term of a
#                                         document (replace_document by it)
# (free text)      XNAME        text      internal: From: and To: as text
#                                         (names and address words), so free
#                                         text finds senders and recipients
#
# address:         (several)    address   any of from/to/cc/bcc/envelope; a bare
#                                         word with an @ (no field, not quoted)
#                                         is searched as address:WORD, so an
#                                         address only in the envelope (a Bcc,
#                                         an expanded list) is found too
#
# Free text (no field) searches subject, body, attachment names, attachment
# text and XNAME.  date: and size: are ranges over the value slots below;
# has:attachment is the has-attachment value slot (format 2), no term.
#
# kind "text": TermGenerator, english stemmer, STEM_SOME (the unstemmed word
#   with positions, for phrases; Z+prefix+stem for plain words), words over
#   64 bytes skipped, CJK n-grams.
# kind "address": exact lower-cased terms, no stemming, no positions.  For
#   "Alice Smith <Alice.Smith+tax@Mail.Example.com>":
#     alice.smith+tax@mail.example.com   the whole address
#     alice.smith+tax, alice.smith       local part, without +detail
#     alice, smith, tax                  words of the local part
#     mail.example.com, example.com      domain and parent domains (2 labels+)
#     alice, smith                       display-name words
# kind "boolean": exact terms, filters (no weight).
#
# Multi-character prefixes followed by an upper-case letter get a ':' in
# between (Xapian's convention).  Terms over 245 bytes (Xapian's limit) are
# cut and end in '#' and a hash of the whole term, on both the indexing and
# the query side, so an over-long address or Message-ID is still found
# exactly.
# --------------------------------------------------------------------------

PREFIXES: dict[str, str] = {
    "from": "XFROM",
    "to": "XTO",
    "cc": "XCC",
    "bcc": "XBCC",
    "envelope": "XENV",
    "subject": "XSUBJECT",
    "body": "XBODY",
    "attachment": "XATTACHMENT",
    "attachment-text": "XATEXT",
    "id": "XMID",
    "mid": "XMID",
    "tag": "K",
    "flag": "XFLAG",
    "aid": "Q",
}
_NAME_PREFIX = "XNAME"
_ADDRESS_FIELDS = ("from", "to", "cc", "bcc", "envelope")
_TEXT_FIELDS = ("subject", "body", "attachment", "attachment-text")
FREE_TEXT_PREFIXES = (PREFIXES["subject"], PREFIXES["body"], PREFIXES["attachment"],
                      PREFIXES["attachment-text"], _NAME_PREFIX)

SLOT_DATE = 0   # xapian.sortable_serialise(unix time)
SLOT_SIZE = 1   # xapian.sortable_serialise(size in bytes)
# Format 2: what the facets count (xapian.ValueCountMatchSpy) and a result
# row shows without a store read.  Multi-valued facets (tags, flags) keep
# their sorted set in one value, joined by "\n": the spy counts each set,
# facets() adds the sets up per member.
SLOT_MONTH = 2          # "YYYY-MM" of the date (UTC); the year facet is summed from it
SLOT_SENDER_DOMAIN = 3  # lower-cased domain of the first From: address, "" if none
SLOT_HAS_ATTACHMENT = 4  # "1" if the message has attachments, else "0"
SLOT_TAGS = 5           # sorted tags, "\n"-joined
SLOT_FLAGS = 6          # sorted flags (message and attachments, lower-case), "\n"-joined
# Format 3: when the message first arrived (xapian.sortable_serialise(unix
# time)): retention periods counted from arrival rather than from the date.
# A document of an older index has none: such a rule falls back to the date
# slot for it (lifecycle/protect.py) until `mailtresor reindex`.
SLOT_ARRIVAL = 7

META_INDEXED_SEQ = "mt:indexed_seq"
# The index format a database was created with.  An index without the mark
# is format 1 (before the facet slots); `mailtresor reindex` rebuilds it as
# the current one.  Documents added later to an older index do get the new
# slots, but the older ones lack them: format() says which indexes to rebuild.
META_FORMAT = "mt:format"
INDEX_FORMAT = 3

MAX_TERM = 245              # bytes, Xapian's limit (glass backend)
MAX_WORD = 64               # bytes, longer words are not indexed (base64 debris)
WILDCARD_LIMIT = 1024       # a wildcard expanding to more terms is an error
MAX_WILDCARDS = 8           # wildcards in one query: each may expand to WILDCARD_LIMIT terms (per field)
_POS_GAP = 100              # between fields/attachments: no phrase across them

_STEM_LANGUAGE = "english"


class QueryError(Exception):
    """A query that cannot be run; the message names the problem."""


class IndexLocked(Exception):
    """Another writer held the shard's index lock past the timeout."""


@dataclass(frozen=True)
class Hit:
    archive_id: str
    shard_path: Path
    date: float
    size: int
    rank: int
    listing: bytes = b""     # the store's encrypted listing blob; empty in an older index
    # From the format-2 value slots; None for a document of an older index.
    has_attachments: bool | None = None
    flags: tuple[str, ...] | None = None
    tags: tuple[str, ...] | None = None
    # A hit from a peer appliance's shards (Remote): that appliance's name
    # and the hit's shard month (SLOT_MONTH: there is no local shard path).
    appliance: str | None = None
    month: str | None = None


@dataclass(frozen=True)
class Remote:
    """A peer appliance's shard indexes of one tenant, as one database of
    Xapian's remote backend (mailtresor.federation: xapian-tcpsrv on the
    peer, reached through the local end of a mutual-TLS tunnel at
    host:port).  search() and facets() take it among their paths: one
    query then runs over the local shards and the peer's with global
    statistics.  Timeouts in seconds."""
    appliance: str
    host: str
    port: int
    timeout: float = 10.0
    connect_timeout: float = 3.0

    def open(self) -> xapian.Database:
        """Raises xapian.NetworkError (or another xapian.Error) when the peer
        cannot be reached or refuses."""
        return xapian.remote_open(self.host, self.port, int(self.timeout * 1000),
                                  int(self.connect_timeout * 1000))


# --- terms -----------------------------------------------------------------

def _term(prefix: str, value: str) -> str | None:
    """prefix + value as a Xapian term, within the term length limit."""
    if not value:
        return None
    if len(prefix) > 1 and "A" <= value[0] <= "Z":
        value = ":" + value
    term = prefix + value
    raw = term.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_TERM:
        return term
    digest = hashlib.blake2b(raw, digest_size=8).hexdigest()
    head = raw[:MAX_TERM - 1 - len(digest)].decode("utf-8", "ignore")
    return f"{head}#{digest}"


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _address_values(addr: str) -> list[str]:
    """The exact values an address is found by (see the table above)."""
    a = addr.strip().strip("<>").strip().lower()
    if not a:
        return []
    values = [a]
    if "@" in a:
        local, _, domain = a.rpartition("@")
        # A local part with an @ of its own ("bob@corp"@evil, bob@corp@evil)
        # is not indexed whole: it would be a term that is another whole
        # address, which a user's scope (address_filter) takes for theirs.
        if local and "@" not in local:
            values.append(local)
            if "+" in local:
                values.append(local.split("+", 1)[0])
            values.extend(_words(local))
        labels = [label for label in domain.split(".") if label]
        if len(labels) == 1:
            values.append(labels[0])
        for i in range(len(labels) - 1):
            values.append(".".join(labels[i:]))
    else:
        values.extend(_words(a))
    return values


# A bare address, as parse.py and envelopes give them: getaddresses() would
# return it unchanged, with an empty name (tests/test_index.py checks this
# against the corpus), at a tenth of the cost.
_BARE_ADDRESS = re.compile(r"[^\s<>()\[\]\\,;:\"@]+@[^\s<>()\[\]\\,;:\"@]+")


def _split_addresses(items: Iterable[str]) -> list[tuple[str, str]]:
    """(display name, address) pairs from header values or bare addresses;
    never raises, whatever the header looks like."""
    import email.utils      # here: searching (the CLI's status, search) needs no email package
    out: list[tuple[str, str]] = []
    for item in items:
        if not item or not isinstance(item, str):
            continue
        if _BARE_ADDRESS.fullmatch(item):
            out.append(("", item))
            continue
        try:
            pairs = [(n, a) for n, a in email.utils.getaddresses([item]) if n or a]
        except Exception:  # noqa: BLE001 - header parsing of hostile input
            pairs = []
        if not pairs:
            item = item.strip()
            pairs = [("", item)] if "@" in item and " " not in item else [(item, "")]
        out.extend(pairs)
    return out


# --- writing ---------------------------------------------------------------

def sender_domain(from_: list[str]) -> str:
    """The domain of the first From: address, lower-cased ("" if none)."""
    for a in from_:
        a = a.strip().strip("<>").lower()
        if "@" in a:
            return a.rpartition("@")[2].strip(".")[:200]
    return ""


def _join_set(items: Iterable[str], lower: bool = False) -> str:
    """A set of tags or flags as one value (see SLOT_TAGS)."""
    return "\n".join(sorted({(i.lower() if lower else i).replace("\n", " ") for i in items if i}))


def _split_set(value: bytes | str) -> tuple[str, ...]:
    value = _text(value)
    return tuple(v for v in value.split("\n") if v) if value else ()


def _has_db(path: Path | str) -> bool:
    """Whether `path` holds a Xapian database (its version file is written
    last when one is created)."""
    return any(os.path.exists(os.path.join(path, name)) for name in ("iamglass", "iamchert"))


class IndexWriter:
    """Adds and deletes documents of one shard inside one batch
    (`ShardIndex.writer()`); nothing is visible before the batch commits."""

    def __init__(self, db: xapian.WritableDatabase):
        self._db = db
        self._tg = xapian.TermGenerator()
        self._tg.set_stemmer(xapian.Stem(_STEM_LANGUAGE))
        self._tg.set_stemming_strategy(xapian.TermGenerator.STEM_SOME)
        self._tg.set_flags(xapian.TermGenerator.FLAG_CJK_NGRAM)
        self._tg.set_max_word_length(MAX_WORD)
        self.added = 0
        self.deleted = 0

    def add(self, archive_id: str, parsed: "Parsed", *, envelope: list[str],
            envelope_only: list[str], tags: list[str], date: float, size: int,
            listing: bytes = b"", arrival: float | None = None) -> None:
        """Index (or re-index) one message under its archive id.  `listing`
        is the store's encrypted listing blob (what a result line shows),
        kept in the document data after the id.  `arrival`: when it first
        arrived (archiver.arrival_of; default: `date`)."""
        unique = _term(PREFIXES["aid"], archive_id)
        if unique is None:
            raise ValueError("empty archive id")
        doc = xapian.Document()
        doc.set_data(archive_id.encode() + listing)
        doc.add_boolean_term(unique)
        doc.add_value(SLOT_DATE, xapian.sortable_serialise(float(date)))
        doc.add_value(SLOT_SIZE, xapian.sortable_serialise(float(size)))
        doc.add_value(SLOT_ARRIVAL, xapian.sortable_serialise(float(date if arrival is None else arrival)))
        doc.add_value(SLOT_MONTH, time.strftime("%Y-%m", time.gmtime(float(date))))
        doc.add_value(SLOT_SENDER_DOMAIN, sender_domain(parsed.from_))
        doc.add_value(SLOT_HAS_ATTACHMENT, "1" if parsed.attachments else "0")
        doc.add_value(SLOT_TAGS, _join_set(tags))
        doc.add_value(SLOT_FLAGS, _join_set([*parsed.flags, *(f for a in parsed.attachments for f in a.flags)],
                                            lower=True))

        def boolean(field: str, value: str) -> None:
            term = _term(PREFIXES[field], value)
            if term is not None:
                doc.add_boolean_term(term)

        def addresses(field: str, items: Iterable[str]) -> None:
            prefix = PREFIXES[field]
            for name, addr in _split_addresses(items):
                for value in _address_values(addr) + _words(name):
                    term = _term(prefix, value)
                    if term is not None:
                        doc.add_term(term, 0)   # wdf 0: a filter, like boolean terms

        addresses("from", [parsed.from_header, *parsed.from_])
        addresses("to", parsed.to)
        addresses("cc", parsed.cc)
        addresses("bcc", [*parsed.bcc, *envelope_only])
        addresses("envelope", [*envelope, *envelope_only])

        mid = (parsed.message_id or "").strip().strip("<>").strip()
        boolean("id", mid)
        for tag in tags:
            boolean("tag", tag)
        for flag in parsed.flags:
            boolean("flag", flag.lower())
        for att in parsed.attachments:
            for flag in att.flags:
                boolean("flag", flag.lower())

        tg = self._tg
        tg.set_document(doc)
        tg.set_termpos(0)

        def text(prefix: str, value: str) -> None:
            if value:
                tg.index_text(value, 1, prefix)
                tg.increase_termpos(_POS_GAP)

        text(PREFIXES["subject"], parsed.subject)
        text(PREFIXES["body"], parsed.body_text)
        for att in parsed.attachments:
            if att.filename:
                text(PREFIXES["attachment"], att.filename)
                term = _term(PREFIXES["attachment"], att.filename.strip().lower())
                if term is not None:
                    doc.add_term(term, 0)
            text(PREFIXES["attachment-text"], att.text)
        text(_NAME_PREFIX, parsed.from_header or " ".join(parsed.from_))
        for item in parsed.to:
            text(_NAME_PREFIX, item)

        self._db.replace_document(unique, doc)
        self.added += 1

    def delete(self, archive_id: str) -> None:
        """Remove a message's document; no error if there is none."""
        unique = _term(PREFIXES["aid"], archive_id)
        if unique is not None:
            self._db.delete_document(unique)
            self.deleted += 1

    def set_tags(self, archive_id: str, tags: list[str]) -> bool:
        """Give an indexed message exactly these tags (its `tag:` terms and
        SLOT_TAGS, what the tag facet counts), leaving the rest of its
        document as it is: no re-parsing (case tags, archive/casetags.py).
        False if the message has no document."""
        unique = _term(PREFIXES["aid"], archive_id)
        if unique is None:
            return False
        post = self._db.postlist(unique)
        try:
            docid = next(post).docid
        except StopIteration:
            return False
        doc = self._db.get_document(docid)
        prefix = PREFIXES["tag"]
        old = [t.term for t in doc.termlist() if t.term.startswith(prefix.encode())]
        for term in old:
            doc.remove_term(term)
        for tag in tags:
            term = _term(prefix, tag)
            if term is not None:
                doc.add_boolean_term(term)
        doc.add_value(SLOT_TAGS, _join_set(tags))
        self._db.replace_document(docid, doc)
        return True

    def set_indexed_seq(self, seq: int) -> None:
        """The store sequence number this index is complete up to; committed
        with the batch's documents."""
        self._db.set_metadata(META_INDEXED_SEQ, str(int(seq)))


class ShardIndex:
    """The Xapian database of one shard."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _create(self) -> None:
        """Make the database atomically: an empty one is committed beside it
        and renamed into place.  A directory without a revision file
        (`iam*`) is a creation cut short by a crash: it never held a
        committed document, and Xapian refuses to open it, so it goes."""
        import shutil

        from mailtresor.archive.store.fs import DIR_MODE, private_dir, private_tree
        private_dir(self.path.parent)
        fresh = self.path.with_name(self.path.name + ".new")
        shutil.rmtree(fresh, ignore_errors=True)
        # Xapian takes no file mode: the directory is made 0700 first and
        # what Xapian put in it is made private before it is renamed into place.
        os.mkdir(fresh, DIR_MODE)
        db = xapian.WritableDatabase(str(fresh), xapian.DB_CREATE)
        db.set_metadata(META_FORMAT, str(INDEX_FORMAT))
        db.commit()
        db.close()
        private_tree(fresh)
        if self.path.exists():
            shutil.rmtree(self.path)
        os.rename(fresh, self.path)

    def _open(self, timeout: float) -> xapian.WritableDatabase:
        if not _has_db(self.path):
            self._create()
        deadline = time.monotonic() + timeout
        pause = 0.01
        while True:
            try:
                return xapian.WritableDatabase(str(self.path), xapian.DB_CREATE_OR_OPEN)
            except xapian.DatabaseLockError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise IndexLocked(f"index {self.path} is locked by another writer "
                                      f"(waited {timeout:g}s)") from None
                time.sleep(min(pause, left))
                pause = min(pause * 2, 0.5)

    @contextmanager
    def writer(self, timeout: float = 30.0) -> Iterator[IndexWriter]:
        """Open the index for one batch: commits the batch on a clean exit,
        discards it on an exception, and always releases the lock."""
        db = self._open(timeout)
        try:
            db.begin_transaction(True)
            w = IndexWriter(db)
            try:
                yield w
                db.commit_transaction()
            except BaseException:
                try:
                    db.cancel_transaction()
                except xapian.Error:
                    pass
                raise
        finally:
            db.close()
        # Glass makes some tables at their first use (position.glass), with
        # the process umask, which a root shell may leave at 022.
        from mailtresor.archive.store.fs import private_tree
        private_tree(self.path)


_LISTING_MAGIC = b"MTL1"   # store.LISTING_MAGIC; never in a (lower-case hex) archive id


def split_data(data: bytes | str) -> tuple[str, bytes]:
    """A document's data: (archive id, the listing blob after it or b"")."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    cut = data.find(_LISTING_MAGIC)
    if cut < 0:
        return data.decode("utf-8", "surrogateescape"), b""
    return data[:cut].decode("utf-8", "surrogateescape"), data[cut:]


def indexed_seq(path: Path) -> int:
    """The `mt:indexed_seq` mark of a shard index; 0 if there is no index."""
    path = Path(path)
    if not _has_db(path):
        return 0
    db = xapian.Database(str(path))
    try:
        value = db.get_metadata(META_INDEXED_SEQ)
        return int(value.decode() if isinstance(value, bytes) else value) if value else 0
    finally:
        db.close()


def index_format(path: Path) -> int:
    """The format a shard index was created with (see META_FORMAT); 0 if
    there is no index."""
    path = Path(path)
    if not _has_db(path):
        return 0
    db = xapian.Database(str(path))
    try:
        value = _text(db.get_metadata(META_FORMAT))
        return int(value) if value else 1
    finally:
        db.close()


def ids(path: Path) -> set[str]:
    """Every archive id in a shard index."""
    path = Path(path)
    if not _has_db(path):
        return set()
    db = xapian.Database(str(path))
    try:
        prefix = PREFIXES["aid"]
        out = set()
        for item in db.allterms(prefix):
            term = item.term.decode("utf-8", "surrogateescape")
            out.add(term[len(prefix):])
        return out
    finally:
        db.close()


def listings(path: Path) -> dict[str, bytes]:
    """Every archive id in a shard index, with the listing blob its document
    carries (b"" for none)."""
    path = Path(path)
    if not _has_db(path):
        return {}
    db = xapian.Database(str(path))
    try:
        out = {}
        for item in db.postlist(""):
            aid, listing = split_data(db.get_document(item.docid).get_data())
            out[aid] = listing
        return out
    finally:
        db.close()


# --- the query language ----------------------------------------------------

def _text(s) -> str:
    return s.decode("utf-8", "replace") if isinstance(s, bytes) else s


def _wildcard(prefix: str, value: str, field: str) -> xapian.Query:
    stem = value[:-1]
    if not stem or "*" in stem:
        raise QueryError(f"{field}:{value}: a wildcard needs at least one character "
                         "before a single trailing '*'")
    term = _term(prefix, stem)
    return xapian.Query(xapian.Query.OP_WILDCARD, term, WILDCARD_LIMIT,
                        xapian.Query.WILDCARD_LIMIT_ERROR)


class _Field(xapian.FieldProcessor):
    """A field processor that does not raise through Xapian (an exception
    through the SWIG director leaks a little each time): the first error is
    kept and raised by _parse() once parse_query() has returned."""

    def __init__(self, errors: list[Exception]):
        super().__init__()
        self.errors = errors

    def __call__(self, raw) -> xapian.Query:
        try:
            return self.make(_text(raw).strip())
        except Exception as e:  # noqa: BLE001 - re-raised by _parse()
            self.errors.append(e)
            return xapian.Query.MatchNothing

    # Each field kind below defines make(value) -> xapian.Query.
    make: typing.Callable[[str], "xapian.Query"]


class _AddressField(_Field):
    def __init__(self, errors: list[Exception], field: str):
        super().__init__(errors)
        self.field = field
        self.prefix = PREFIXES[field]

    def make(self, value: str) -> xapian.Query:
        if value.endswith("*"):
            return _wildcard(self.prefix, value.lower().lstrip("<"), self.field)
        value = value.strip("<>").strip().lower()
        if value.startswith("@"):
            value = value[1:]
        words = _words(value)
        if not value or not words:
            raise QueryError(f"{self.field}: needs an address, a part of one or a name")
        if any(c.isspace() for c in value):
            return xapian.Query(xapian.Query.OP_AND, [xapian.Query(_term(self.prefix, w))
                                                      for w in words])
        exact = xapian.Query(_term(self.prefix, value))
        if "@" in value or words == [value]:
            return exact
        # alice.smith: the local part alice.smith, or the words alice and smith
        return xapian.Query(xapian.Query.OP_OR, [exact, xapian.Query(
            xapian.Query.OP_AND, [xapian.Query(_term(self.prefix, w)) for w in words])])


class _AnyAddressField(_Field):
    """address:VALUE, and a bare word that looks like an address: any of the
    address fields (From, To, Cc, Bcc and the envelope, which holds MAIL
    FROM, RCPT TO and a journal report's recipients), so that mail where
    the address is only in the envelope (an expanded list, a Bcc) is found."""

    def __init__(self, errors: list[Exception]):
        super().__init__(errors)
        self.fields = [_AddressField(errors, f) for f in _ADDRESS_FIELDS]

    def make(self, value: str) -> xapian.Query:
        if not _words(value.strip("<>*")):
            raise QueryError("address: needs an address, a part of one or a name")
        return xapian.Query(xapian.Query.OP_OR, [f.make(value) for f in self.fields])


class _BooleanField(_Field):
    def __init__(self, errors: list[Exception], field: str, normalise=lambda v: v):
        super().__init__(errors)
        self.field = field
        self.prefix = PREFIXES[field]
        self.normalise = normalise

    def make(self, value: str) -> xapian.Query:
        value = self.normalise(value)
        if not value:
            raise QueryError(f"{self.field}: needs a value")
        if value.endswith("*"):
            return _wildcard(self.prefix, value, self.field)
        return xapian.Query(_term(self.prefix, value))


_DATE_RE = re.compile(r"^(\d{4})(?:-(\d{1,2})(?:-(\d{1,2}))?)?$")


def _date_period(text: str, whole: str) -> tuple[float, float]:
    """(first instant, first instant after) of YYYY, YYYY-MM or YYYY-MM-DD, UTC."""
    m = _DATE_RE.match(text)
    if not m:
        raise QueryError(f"bad date {text!r} in date:{whole}: "
                         "use YYYY-MM-DD, YYYY-MM or YYYY")
    year, month, day = int(m[1]), m[2], m[3]
    try:
        if day is not None:
            start = datetime.date(year, int(month), int(day))
            end = start + datetime.timedelta(days=1)
        elif month is not None:
            start = datetime.date(year, int(month), 1)
            end = datetime.date(year + (start.month == 12), start.month % 12 + 1, 1)
        else:
            start = datetime.date(year, 1, 1)
            end = datetime.date(year + 1, 1, 1)
    except ValueError as e:
        raise QueryError(f"bad date {text!r} in date:{whole}: {e}") from None
    return (float(calendar.timegm(start.timetuple())), float(calendar.timegm(end.timetuple())))


def _split_range(value: str, field: str) -> tuple[str, str]:
    if ".." in value:
        lo, _, hi = value.partition("..")
        if ".." in hi:
            raise QueryError(f"{field}:{value}: a range is FROM..TO")
        if not lo and not hi:
            raise QueryError(f"{field}:{value}: a range needs at least one end")
        return lo.strip(), hi.strip()
    if not value:
        raise QueryError(f"{field}: needs a value or a range FROM..TO")
    return value, value


def _value_query(slot: int, lo: float | None, hi: float | None) -> xapian.Query:
    if lo is not None and hi is not None:
        return xapian.Query(xapian.Query.OP_VALUE_RANGE, slot,
                            xapian.sortable_serialise(lo), xapian.sortable_serialise(hi))
    if lo is not None:
        return xapian.Query(xapian.Query.OP_VALUE_GE, slot, xapian.sortable_serialise(lo))
    return xapian.Query(xapian.Query.OP_VALUE_LE, slot, xapian.sortable_serialise(hi))


class _DateField(_Field):
    """date:2002-07-01..2002-08-01, date:..2002-08, date:2002.., date:2002-07.
    Both ends inclusive (to the last instant of the end's day, month or
    year), UTC."""

    def __init__(self, errors: list[Exception]):
        super().__init__(errors)
        self.seen: dict[str, tuple[float | None, float | None]] = {}

    def make(self, value: str) -> xapian.Query:
        a, b = _split_range(value, "date")
        lo = _date_period(a, value)[0] if a else None
        hi = math.nextafter(_date_period(b, value)[1], -math.inf) if b else None
        if lo is not None and hi is not None and lo > hi:
            raise QueryError(f"date:{value}: the range ends before it starts")
        q = _value_query(SLOT_DATE, lo, hi)
        self.seen[str(q)] = (lo, hi)
        return q


_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kKmMgG]?)[bB]?$")
_SIZE_UNIT = {"": 1, "k": 1000, "m": 1000 ** 2, "g": 1000 ** 3}


def _size(text: str, whole: str) -> float:
    m = _SIZE_RE.match(text)
    if not m:
        raise QueryError(f"bad size {text!r} in size:{whole}: use bytes, "
                         "or k, M, G (powers of 1000), e.g. size:10k..2M")
    return float(math.floor(float(m[1]) * _SIZE_UNIT[m[2].lower()]))


class _HasField(_Field):
    """has:attachment (also has:attachments): mail with attachments, from
    the format-2 value slot SLOT_HAS_ATTACHMENT, so no reindex is needed
    for it.  Negated (-has:attachment, NOT has:attachment) it is mail
    without; a document of a format-1 index has no value there and counts
    as without."""

    WHAT = {"attachment": SLOT_HAS_ATTACHMENT, "attachments": SLOT_HAS_ATTACHMENT}

    def make(self, value: str) -> xapian.Query:
        slot = self.WHAT.get(value.lower())
        if slot is None:
            raise QueryError(f"has:{value}: has: takes attachment (has:attachment, -has:attachment)")
        return xapian.Query(xapian.Query.OP_VALUE_RANGE, slot, "1", "1")


class _ResolvedField(_Field):
    """A field whose value the caller resolves (Prepared by prepare(...,
    resolvers=)): e.g. hold:NAME, which the access core resolves to what
    the tenant's hold covers, for principals who may see holds.  The
    callable returns a xapian.Query or raises QueryError naming the
    problem ("no hold named X")."""

    def __init__(self, errors: list[Exception], field: str, resolve):
        super().__init__(errors)
        self.field, self.resolve = field, resolve

    def make(self, value: str) -> xapian.Query:
        if not value:
            raise QueryError(f"{self.field}: needs a value")
        return self.resolve(value)


class _SizeField(_Field):
    def make(self, value: str) -> xapian.Query:
        a, b = _split_range(value, "size")
        lo = _size(a, value) if a else None
        hi = _size(b, value) if b else None
        if lo is not None and hi is not None and lo > hi:
            raise QueryError(f"size:{value}: the range ends before it starts")
        return _value_query(SLOT_SIZE, lo, hi)


_FLAGS = (xapian.QueryParser.FLAG_BOOLEAN | xapian.QueryParser.FLAG_PHRASE
          | xapian.QueryParser.FLAG_LOVEHATE | xapian.QueryParser.FLAG_WILDCARD
          | xapian.QueryParser.FLAG_PURE_NOT | xapian.QueryParser.FLAG_CJK_NGRAM)

# Xapian field names are word characters only; "attachment-text:" is
# rewritten to this before parsing (outside quotes).
_ATTACHMENT_TEXT_ALIAS = "attachment_text"
_ATTACHMENT_TEXT_RE = re.compile(r"(^|[\s(+\-])attachment-text:")
# A bare word with an @ in it (no field before it, outside quotes): an
# address, searched in every address field (address:).
_BARE_ADDRESS_WORD = re.compile(r"(?<![^\s(])([+\-]?)(<?[^\s()\"<>:@+\-][^\s()\"<>:@]*@[^\s()\"<>:@]+>?)(?=$|[\s)])")


def _precheck(text: str) -> str:
    """What Xapian would silently re-parse as plain words (it retries a query
    it cannot parse without its operators) is an error here."""
    parts = text.split('"')
    if len(parts) % 2 == 0:
        raise QueryError('unbalanced quotes: a phrase is missing its closing "')
    depth = 0
    for outside in parts[::2]:
        for c in outside:
            if c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
                if depth < 0:
                    raise QueryError("unbalanced parentheses: a ')' without its '('")
    if depth > 0:
        raise QueryError(f"unbalanced parentheses: {depth} '(' not closed")
    # Each wildcard is an OR of up to WILDCARD_LIMIT terms (in every field it
    # names): hundreds of them in one query are seconds of work per request.
    stars = sum(outside.count("*") for outside in parts[::2])
    if stars > MAX_WILDCARDS:
        raise QueryError(f"{stars} wildcards: at most {MAX_WILDCARDS} in one query")
    parts = _only_excluded(text).split('"')
    for i in range(0, len(parts), 2):
        parts[i] = _ATTACHMENT_TEXT_RE.sub(rf"\1{_ATTACHMENT_TEXT_ALIAS}:", parts[i])
        parts[i] = _BARE_ADDRESS_WORD.sub(r"\1address:\2", parts[i])
    return '"'.join(parts)


def _top_level_items(text: str) -> list[str]:
    """The whitespace-separated items of `text` outside quotes and
    parentheses ("-a (b c)" -> ["-a", "(b c)"]); quotes are balanced."""
    items, cur, depth, quoted = [], [], 0, False
    for c in text:
        if c == '"':
            quoted = not quoted
        elif not quoted and c == "(":
            depth += 1
        elif not quoted and c == ")":
            depth -= 1
        if c.isspace() and not quoted and depth == 0:
            if cur:
                items.append("".join(cur))
                cur = []
        else:
            cur.append(c)
    if cur:
        items.append("".join(cur))
    return items


def _only_excluded(text: str) -> str:
    """A query made of excluded items only ("-draft", "-has:attachment
    -tag:hold") as "NOT (draft OR ...)": Xapian takes a lone -item for a
    syntax error and silently re-parses it without its operators, which
    would find exactly the mail that was to be left out."""
    items = _top_level_items(text)
    if not items or not all(len(i) > 1 and i[0] == "-" for i in items):
        return text
    return "NOT (" + " OR ".join(f"({i[1:]})" for i in items) + ")"


def _parse(text: str, resolvers=None) -> tuple[xapian.Query, _DateField]:
    errors: list[Exception] = []
    dates = _DateField(errors)
    if not text or not text.strip():
        return xapian.Query.MatchAll, dates
    qp = xapian.QueryParser()
    qp.set_stemmer(xapian.Stem(_STEM_LANGUAGE))
    qp.set_stemming_strategy(xapian.QueryParser.STEM_SOME)
    qp.set_default_op(xapian.Query.OP_AND)
    qp.set_max_expansion(WILDCARD_LIMIT, xapian.Query.WILDCARD_LIMIT_ERROR,
                         xapian.QueryParser.FLAG_WILDCARD)
    for prefix in FREE_TEXT_PREFIXES:
        qp.add_prefix("", prefix)
    for field in _TEXT_FIELDS:
        name = _ATTACHMENT_TEXT_ALIAS if field == "attachment-text" else field
        qp.add_prefix(name, PREFIXES[field])
    # (field, processor, grouping): False = several must all match, True or a
    # group name = any of them (a message has one id).  The processors must
    # outlive parse_query(): this list holds them.
    strip_id = lambda v: v.strip("<>").strip()  # noqa: E731
    fields: list[tuple[str, xapian.FieldProcessor, bool | str]] = [
        ("date", dates, False),
        ("size", _SizeField(errors), False),
        ("has", _HasField(errors), False),
        *((f, _AddressField(errors, f), False) for f in _ADDRESS_FIELDS),
        ("address", _AnyAddressField(errors), False),
        ("id", _BooleanField(errors, "id", strip_id), "id"),
        ("mid", _BooleanField(errors, "mid", strip_id), "id"),
        ("aid", _BooleanField(errors, "aid"), True),
        ("tag", _BooleanField(errors, "tag"), False),
        ("flag", _BooleanField(errors, "flag", str.lower), False),
    ]
    # Fields the caller resolves (hold:NAME): without them the name is
    # no field at all, and "hold:x" is searched as any unknown field is.
    for name, resolve in sorted((resolvers or {}).items()):
        if name in PREFIXES or name in ("date", "size", "has", "address"):
            raise ValueError(f"{name}: is a field of the index already")
        fields.append((name, _ResolvedField(errors, name, resolve), False))
    for name, proc, grouping in fields:
        qp.add_boolean_prefix(name, proc, grouping)
    try:
        query = qp.parse_query(_precheck(text), _FLAGS)
    except xapian.QueryParserError as e:
        raise QueryError(f"bad query: {e.get_msg()}") from None
    if errors:
        raise errors[0]
    return query, dates


def address_filter(addresses: Iterable[str]) -> xapian.Query:
    """Mail where one of `addresses` (whole addresses) is in From, To, Cc,
    Bcc or the envelope (MAIL FROM, RCPT TO, a journal report's
    recipients): the scope of a user who reads their own mail.  No
    address: matches nothing."""
    terms = []
    for addr in sorted({a.strip().strip("<>").strip().lower() for a in addresses}):
        if "@" not in addr.strip("@"):
            continue        # not a whole address: a word or a domain matches parts of others' addresses
        for field in _ADDRESS_FIELDS:
            term = _term(PREFIXES[field], addr)
            if term is not None:
                terms.append(xapian.Query(term))
    return xapian.Query(xapian.Query.OP_OR, terms) if terms else xapian.Query.MatchNothing


def restrict(prepared: Prepared, scope: xapian.Query) -> Prepared:
    """`prepared` with its matches limited to those of `scope` (a filter:
    it changes no relevance weight)."""
    return Prepared(prepared.text, xapian.Query(xapian.Query.OP_FILTER, prepared.query, scope),
                    prepared.bounds)


def parse_query(text: str, *, resolvers=None) -> xapian.Query:
    """The Xapian query for a search string; raises QueryError.
    `resolvers`: {field name: callable(value) -> xapian.Query} for fields
    the caller resolves (see _ResolvedField).

    AND, OR, NOT, XOR (capitals), parentheses, "phrases", +must -mustnot,
    trailing-* wildcards, field:value (see PREFIXES), date:FROM..TO,
    size:FROM..TO and has:attachment.  Words without an operator between
    them must all match.  An empty string matches every message."""
    return _parse(text, resolvers)[0]


_CONJUNCTIVE = (xapian.Query.OP_AND, xapian.Query.OP_FILTER)
_FIRST_ONLY = (xapian.Query.OP_AND_NOT, xapian.Query.OP_AND_MAYBE, xapian.Query.OP_SCALE_WEIGHT)
_VALUE_OPS = (xapian.Query.OP_VALUE_RANGE, xapian.Query.OP_VALUE_GE, xapian.Query.OP_VALUE_LE)


def _bounds(q: xapian.Query, seen: dict) -> tuple[float | None, float | None] | None:
    op = q.get_type()
    if op in _CONJUNCTIVE:
        lo = hi = None
        restricted = False
        for i in range(q.get_num_subqueries()):
            b = _bounds(q.get_subquery(i), seen)
            if b is None:
                continue
            restricted = True
            if b[0] is not None:
                lo = b[0] if lo is None else max(lo, b[0])
            if b[1] is not None:
                hi = b[1] if hi is None else min(hi, b[1])
        return (lo, hi) if restricted else None
    if op in _FIRST_ONLY:
        return _bounds(q.get_subquery(0), seen)
    if op in _VALUE_OPS:
        return seen.get(str(q))
    return None   # OR, XOR, NEAR, leaf terms...: no restriction known


def query_date_bounds(text: str) -> tuple[float | None, float | None] | None:
    """The (first, last) instants (UTC unix time, either may be None for an
    open end) that every match of `text` lies in, or None if the query does
    not restrict the date.  Conservative: a date: under OR, XOR or NOT does
    not count.  Raises QueryError like parse_query()."""
    return prepare(text).bounds


@dataclass(frozen=True)
class Prepared:
    """A search string parsed once: its Xapian query and its date bounds
    (see query_date_bounds)."""
    text: str
    query: xapian.Query
    bounds: tuple[float | None, float | None] | None


def prepare(text: str, *, resolvers=None) -> Prepared:
    """parse_query() and query_date_bounds() in one parse; search() takes
    the result in place of the string.  Raises QueryError.  `resolvers`:
    as parse_query's (a resolved field's own dates do not bound the search)."""
    query, dates = _parse(text, resolvers)
    return Prepared(text, query, _bounds(query, dates.seen) if dates.seen else None)


# --- searching -------------------------------------------------------------

_ORDERS = ("date-desc", "date-asc", "relevance")
EXACT_COUNT = 10_000


def _user_wildcard_message(msg: str) -> str:
    for field, prefix in sorted(PREFIXES.items(), key=lambda fp: -len(fp[1])):
        if msg.startswith("Wildcard " + prefix):
            return f"Wildcard {field}:{msg[len('Wildcard ' + prefix):]}"
    for prefix in FREE_TEXT_PREFIXES:
        if msg.startswith("Wildcard " + prefix):
            return "Wildcard " + msg[len("Wildcard " + prefix):]
    return msg


def _open_reader(path: Path | str) -> xapian.Database:
    # Glass named outright: no probing for other backends' files.
    return xapian.Database(os.fspath(path), xapian.DB_BACKEND_GLASS)


class Readers:
    """Shard indexes kept open between searches, for a long-running process
    (the daemon's query socket) that searches again and again: opening a
    shard's tables costs more than many a search in it.

    A reader is taken out for one search and given back after it, so two
    threads never share one (a Xapian object is not thread-safe).  Taken
    out, it is brought up to the newest committed revision (reopen(), one
    read of the version file), so a search sees what the archiver committed
    before it began.  At most `limit` stay open; the least recently used
    is closed first."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        # path -> readers not in use, each with the identity (device, inode)
        # of the directory it was opened in
        self._idle: dict[str, list[tuple[xapian.Database, tuple]]] = {}
        self._order: list[str] = []         # paths by last use, oldest first
        self._lock = threading.Lock()
        self._taken: dict[int, tuple] = {}  # id(reader) -> its directory's identity

    def take(self, path: Path | str) -> xapian.Database:
        """Raises xapian.DatabaseNotFoundError when there is no index."""
        key = os.fspath(path)
        try:
            st = os.stat(key)
            ident = (st.st_dev, st.st_ino)
        except OSError:
            ident = None
        with self._lock:
            idle = self._idle.get(key)
            db, was = idle.pop() if idle else (None, None)
        if db is not None:
            # An index rebuilt in a new directory (`reindex` removes the
            # old one) is opened afresh; one that only got new commits is
            # brought up to the newest.
            try:
                if was == ident and ident is not None:
                    db.reopen()
                else:
                    db.close()
                    db = None
            except xapian.Error:
                db.close()
                db = None
        if db is None:
            db = _open_reader(key)
        with self._lock:
            self._taken[id(db)] = ident
        return db

    def give(self, path: Path | str, db: xapian.Database) -> None:
        key = os.fspath(path)
        closing = []
        with self._lock:
            ident = self._taken.pop(id(db), None)
            self._idle.setdefault(key, []).append((db, ident))
            if key in self._order:
                self._order.remove(key)
            self._order.append(key)
            while sum(len(v) for v in self._idle.values()) > self.limit and self._order:
                oldest = self._order[0]
                dbs = self._idle.get(oldest)
                if dbs:
                    closing.append(dbs.pop(0)[0])
                if not dbs:
                    self._idle.pop(oldest, None)
                    self._order.pop(0)
        for d in closing:
            d.close()

    def open_count(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._idle.values())

    def close(self) -> None:
        with self._lock:
            dbs = [d for v in self._idle.values() for d, _ in v]
            self._idle.clear()
            self._order.clear()
        for d in dbs:
            d.close()


def search(paths: list, query: str | Prepared, *, offset: int = 0, limit: int = 50,
           order: str = "date-desc", readers: Readers | None = None,
           unavailable: set[str] | None = None) -> tuple[int, list[Hit]]:
    """Search several shard indexes as one: (number of matches, hits).

    `query` is a search string or what prepare() made of one.  The number
    is exact in date order, and in relevance order up to EXACT_COUNT
    matches (an estimate beyond).  Paths without an index (a month with no
    mail) are skipped.  With `readers`, the shards are taken from and given
    back to that cache instead of being opened and closed here.  Raises
    QueryError.

    A path may be a Remote (a peer's shards): a peer that cannot be reached,
    or that fails during the search, is left out and its name added to
    `unavailable` (pass a set to learn it: the caller must say that the
    answer is partial)."""
    if order not in _ORDERS:
        raise ValueError(f"order must be one of {', '.join(_ORDERS)}, not {order!r}")
    if offset < 0 or limit < 0:
        raise ValueError("offset and limit must not be negative")
    q = query.query if isinstance(query, Prepared) else parse_query(query)
    down = unavailable if unavailable is not None else set()
    for attempt in range(3 + sum(isinstance(p, Remote) for p in paths)):
        live = [p for p in paths if not (isinstance(p, Remote) and p.appliance in down)]
        try:
            with _opened(live, readers, down) as (shards, dbs):
                try:
                    if not shards:
                        return 0, []
                    if order == "relevance":
                        return _by_relevance(shards, dbs, q, offset, limit)
                    return _by_date(shards, dbs, q, offset, limit, descending=(order == "date-desc"))
                except xapian.NetworkError:
                    if not _find_dead(shards, dbs, down):
                        raise
        except xapian.WildcardError as e:
            raise QueryError(f"{_user_wildcard_message(e.get_msg())}: "
                             "make the wildcard longer") from None
        except xapian.DatabaseModifiedError:
            if attempt >= 2:
                raise
    raise AssertionError("unreachable")


def _find_dead(shards: list, dbs: list, down: set[str]) -> bool:
    """After a network error in a search: add the peers that no longer
    answer to `down`; whether there was one (else the error is not a peer's)."""
    found = False
    for p, db in zip(shards, dbs):
        if isinstance(p, Remote):
            try:
                db.keep_alive()
            except xapian.Error:
                log.warning("peer %s failed during a search; answering without it", p.appliance)
                down.add(p.appliance)
                found = True
    return found


@contextlib.contextmanager
def _opened(paths: list, readers: Readers | None, down: set[str] | None = None):
    """(shards, databases) of the paths that have an index (a month
    without mail has none), taken from `readers` or opened here, and given
    back or closed on the way out.  A Remote that does not open is left
    out and named in `down`."""
    dbs, shards = [], []
    try:
        for p in paths:
            if isinstance(p, Remote):
                try:
                    dbs.append(p.open())
                except xapian.Error as e:
                    log.warning("peer %s (%s:%d) is unavailable: %s", p.appliance, p.host, p.port,
                                e.get_msg() if hasattr(e, "get_msg") else e)
                    if down is not None:
                        down.add(p.appliance)
                    continue
                shards.append(p)
                continue
            try:
                dbs.append(readers.take(p) if readers is not None else _open_reader(p))
            except xapian.DatabaseNotFoundError:
                continue
            shards.append(p)
        yield shards, dbs
    finally:
        for p, db in zip(shards, dbs):
            if readers is not None and not isinstance(p, Remote):
                readers.give(p, db)
            elif isinstance(p, Remote):
                try:
                    db.close()
                except xapian.Error:
                    pass                # a peer gone meanwhile: nothing to close there
            else:
                db.close()


FACETS = ("year", "month", "sender_domain", "has_attachment", "tag", "flag")
_FACET_SLOTS = {"month": SLOT_MONTH, "sender_domain": SLOT_SENDER_DOMAIN,
                "has_attachment": SLOT_HAS_ATTACHMENT, "tag": SLOT_TAGS, "flag": SLOT_FLAGS}
FACET_TOP = 100          # values kept per facet (the most frequent; months and years: all)


def facets(paths: list, query: str | Prepared, *, readers: Readers | None = None,
           top: int = FACET_TOP, unavailable: set[str] | None = None) -> dict[str, dict[str, int]]:
    """Counts of the matches of `query` over several shard indexes, per
    value of each facet (FACETS): {"year": {"2024": 12}, "month": {"2024-03": 4},
    "sender_domain": {...}, "has_attachment": {"true": n, "false": m},
    "tag": {...}, "flag": {...}}.  Exact: every match is counted, by
    Xapian's ValueCountMatchSpy over the format-2 value slots (documents of
    an older index have none and are counted nowhere: `reindex`).  A tag
    or flag counts each message that has it.  Raises QueryError.  Paths
    may be Remote, as in search(); an unreachable peer is left out and
    named in `unavailable`."""
    q = query.query if isinstance(query, Prepared) else parse_query(query)
    out: dict[str, dict[str, int]] = {f: {} for f in FACETS}
    down = unavailable if unavailable is not None else set()
    paths = [p for p in paths if not (isinstance(p, Remote) and p.appliance in down)]
    with _opened(paths, readers, down) as (shards, dbs):
        if not shards:
            return out
        db = xapian.Database()
        for d in dbs:
            db.add_database(d)
        enq = _date_enquire(db, q)
        spies = {name: xapian.ValueCountMatchSpy(slot) for name, slot in _FACET_SLOTS.items()}
        for spy in spies.values():
            enq.add_matchspy(spy)
        try:
            enq.get_mset(0, 0, db.get_doccount())
        except xapian.NetworkError:
            if not _find_dead(shards, dbs, down):
                raise
            return facets([p for p in paths if not (isinstance(p, Remote) and p.appliance in down)],
                          query, readers=readers, top=top, unavailable=down)
        except xapian.WildcardError as e:
            raise QueryError(f"{_user_wildcard_message(e.get_msg())}: make the wildcard longer") from None
        counts = {name: [(_text(item.term), item.termfreq) for item in spy.values()]
                  for name, spy in spies.items()}
    for value, n in counts["month"]:
        if value:
            out["month"][value] = n
            out["year"][value[:4]] = out["year"].get(value[:4], 0) + n
    for value, n in counts["has_attachment"]:
        if value in ("0", "1"):
            out["has_attachment"]["true" if value == "1" else "false"] = n
    for value, n in counts["sender_domain"]:
        if value:
            out["sender_domain"][value] = n
    for name in ("tag", "flag"):
        for value, n in counts[name]:
            for member in _split_set(value):
                out[name][member] = out[name].get(member, 0) + n
    for name in ("sender_domain", "tag", "flag"):
        if len(out[name]) > top:
            out[name] = dict(sorted(out[name].items(), key=lambda kv: (-kv[1], kv[0]))[:top])
    return out


def _hit(doc: xapian.Document, path, rank: int) -> Hit:
    aid, listing = split_data(doc.get_data())
    has_att = _text(doc.get_value(SLOT_HAS_ATTACHMENT))
    new = bool(has_att)          # a format-2 document always has "0" or "1" there
    remote = isinstance(path, Remote)
    return Hit(archive_id=aid, listing=listing, rank=rank,
               shard_path=Path() if remote else Path(path),
               appliance=path.appliance if remote else None,
               month=_text(doc.get_value(SLOT_MONTH)) if remote else None,
               date=xapian.sortable_unserialise(doc.get_value(SLOT_DATE)),
               size=int(xapian.sortable_unserialise(doc.get_value(SLOT_SIZE))),
               has_attachments=(has_att == "1") if new else None,
               flags=_split_set(doc.get_value(SLOT_FLAGS)) if new else None,
               tags=_split_set(doc.get_value(SLOT_TAGS)) if new else None)


def _by_relevance(shards: list[Path], dbs: list, q: xapian.Query, offset: int,
                  limit: int) -> tuple[int, list[Hit]]:
    # Relevance needs the statistics of all shards together: one combined
    # database.  Exact up to EXACT_COUNT matches, Xapian's estimate beyond.
    db = xapian.Database()
    for d in dbs:
        db.add_database(d)
    enq = xapian.Enquire(db)
    enq.set_query(q)
    enq.set_sort_by_relevance_then_value(SLOT_DATE, True)
    mset = enq.get_mset(offset, limit, min(db.get_doccount(), max(EXACT_COUNT, offset + limit)))
    return mset.get_matches_estimated(), [_hit(m.document, shards[(m.docid - 1) % len(shards)], m.rank)
                                          for m in mset]


def _date_enquire(db, q: xapian.Query) -> xapian.Enquire:
    enq = xapian.Enquire(db)
    enq.set_query(q)
    # No relevance weights: the order is the date's (notmuch does the
    # same), which spares a weight computation for every match.
    enq.set_weighting_scheme(xapian.BoolWeight())
    return enq


# Matches per shard below which the shards left are sorted together (one
# Enquire: cheaper when there are few matches to sort) rather than one by one.
_SPARSE = 200


def _by_date(shards: list[Path], dbs: list, q: xapian.Query, offset: int, limit: int,
             descending: bool) -> tuple[int, list[Hit]]:
    """Shard by shard, the newest (oldest) first by the date range each
    holds.  Once `offset + limit` hits are in hand that sort before every
    date the next shard holds, the shards left are only counted (together),
    which costs no sorting and no document reads.  When the shards walked
    so far suggest that few matches are left, the rest are sorted together
    in one go.  Counts are exact: Xapian is asked to check every document."""
    need = offset + limit
    order = []
    for i, db in enumerate(dbs):
        bound = db.get_value_upper_bound(SLOT_DATE) if descending else db.get_value_lower_bound(SLOT_DATE)
        if not bound:
            continue                        # no documents
        edge = xapian.sortable_unserialise(bound)
        order.append((-edge if descending else edge, i))
    order.sort()
    total = 0
    cands: list[tuple] = []     # (sort key, place in the walk, rank there, document, shard)

    def take(mset, place, shard_of) -> None:
        for m in mset:
            date = xapian.sortable_unserialise(m.document.get_value(SLOT_DATE))
            cands.append((-date if descending else date, place, m.rank, m.document, shard_of(m.docid)))
        cands.sort(key=lambda c: c[:3])
        del cands[need:]

    def done(edge_key: float) -> bool:
        # The bounds are sorted: no shard after this one can reach the page either.
        return need == 0 or (len(cands) >= need and cands[need - 1][0] < edge_key)

    walked = seen_docs = 0
    for n, (edge_key, i) in enumerate(order):
        if done(edge_key):
            break
        left = sum(dbs[j].get_doccount() for _, j in order[n:])
        if seen_docs and total * left <= _SPARSE * (len(order) - n) * seen_docs:
            break
        enq = _date_enquire(dbs[i], q)
        enq.set_sort_by_value(SLOT_DATE, descending)
        mset = enq.get_mset(0, need, dbs[i].get_doccount())
        total += mset.get_matches_estimated()
        take(mset, n, lambda docid, i=i: i)
        walked, seen_docs = n + 1, seen_docs + dbs[i].get_doccount()
    rest = [i for _, i in order[walked:]]
    if rest:
        db = xapian.Database()
        for i in rest:
            db.add_database(dbs[i])
        enq = _date_enquire(db, q)
        if done(order[walked][0]):
            total += enq.get_mset(0, 0, db.get_doccount()).get_matches_estimated()
        else:
            enq.set_sort_by_value(SLOT_DATE, descending)
            mset = enq.get_mset(0, need, db.get_doccount())
            total += mset.get_matches_estimated()
            take(mset, walked, lambda docid: rest[(docid - 1) % len(rest)])
    return total, [_hit(c[3], shards[c[4]], offset + r) for r, c in enumerate(cands[offset:])]
