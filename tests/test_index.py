"""The Xapian index: schema, writer, query language, search (real databases)."""

import calendar
import email
import email.header
import email.policy
import email.utils
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import xapian

from mailtresor.archive import index
from mailtresor.archive.index import (PREFIXES, SLOT_DATE, SLOT_SIZE, Hit, IndexLocked, QueryError,
                              ShardIndex, ids, indexed_seq, parse_query, query_date_bounds,
                              search)
from tests.conftest import corpus_files, corpus_message

try:
    from mailtresor.archive.parse import Attachment, Parsed
except ImportError:  # parse.py not there yet: the contract's shape
    @dataclass
    class Attachment:
        filename: str
        content_type: str
        size: int
        text: str
        flags: list[str] = field(default_factory=list)

    @dataclass
    class Parsed:
        message_id: str
        date: float | None
        from_header: str
        from_: list[str]
        to: list[str]
        cc: list[str]
        bcc: list[str]
        subject: str
        body_text: str
        attachments: list
        flags: list[str]
        size: int


def utc(y, mo, d, h=0, mi=0, s=0) -> float:
    return float(calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)))


def msg(**kw) -> Parsed:
    base = dict(message_id="<m1@example.com>", date=None, from_header="", from_=[], to=[], cc=[],
                bcc=[], subject="", body_text="", attachments=[], flags=[], size=1000)
    base.update(kw)
    return Parsed(**base)


def add(ix: ShardIndex, aid: str, parsed: Parsed | None = None, *, envelope=(), envelope_only=(),
        tags=(), date=None, size=None):
    parsed = parsed or msg()
    with ix.writer() as w:
        w.add(aid, parsed, envelope=list(envelope), envelope_only=list(envelope_only),
              tags=list(tags), date=utc(2002, 7, 15) if date is None else date,
              size=parsed.size if size is None else size)


def found(path: Path | list[Path], q: str, **kw) -> list[str]:
    paths = path if isinstance(path, list) else [path]
    total, hits = search(paths, q, limit=10_000, **kw)
    assert total >= len(hits)
    return [h.archive_id for h in hits]


ALICE = msg(
    message_id="<Invoice.2002.07@Example.COM>",
    from_header='"Alice Smith" <Alice.Smith+tax@Mail.Example.com>',
    from_=["Alice.Smith+tax@Mail.Example.com"],
    to=["Bob Jones <bob@corp.test>"],
    cc=["carol@cc.test"],
    bcc=["dave@bcc.test"],
    subject="Quarterly invoice for July",
    body_text="Please find the invoices attached. Payment is due in thirty days.",
    attachments=[Attachment("Q3 Report.pdf", "application/pdf", 52_000,
                            "Revenue grew strongly in the third quarter", ["encrypted"])],
    flags=["undecodable"],
    size=60_000)

OTHER = msg(
    message_id="<other@elsewhere.test>",
    from_header="Zed Other <zed@elsewhere.test>",
    from_=["zed@elsewhere.test"],
    to=["alice.smith@mail.example.com"],
    subject="Lunch on Friday",
    body_text="invoice quarterly: not a phrase here, Bob",
    size=2_000)


@pytest.fixture
def two(tmp_path):
    """A shard with ALICE (a1) and OTHER (o1)."""
    path = tmp_path / "2002-07" / "xapian"
    ix = ShardIndex(path)
    with ix.writer() as w:
        w.add("a1", ALICE, envelope=["alice.smith+tax@mail.example.com", "bob@corp.test",
                                     "erin@journal.test"],
              envelope_only=["erin@journal.test"], tags=["Legal", "hold"], date=utc(2002, 7, 10),
              size=60_000)
        w.add("o1", OTHER, envelope=["zed@elsewhere.test", "alice.smith@mail.example.com"],
              envelope_only=[], tags=["hold"], date=utc(2002, 7, 20), size=2_000)
    return path


# --- each field --------------------------------------------------------------

@pytest.mark.parametrize("q,expected", [
    # from: whole address, local part, without +detail, words, domain, parent domain, name
    ("from:alice.smith+tax@mail.example.com", ["a1"]),
    ("from:Alice.Smith+tax@Mail.Example.com", ["a1"]),
    ("from:<alice.smith+tax@mail.example.com>", ["a1"]),
    ("from:alice.smith", ["a1"]),
    ("from:alice", ["a1"]),
    ("from:mail.example.com", ["a1"]),
    ("from:example.com", ["a1"]),
    ("from:@example.com", ["a1"]),
    ("from:smith", ["a1"]),
    ('from:"Alice Smith"', ["a1"]),
    ("from:zed", ["o1"]),
    ("from:alices", []),              # addresses are not stemmed
    ("from:bob", []),
    ("from:ali*", ["a1"]),
    # to: / cc: / bcc: / envelope:
    ("to:bob@corp.test", ["a1"]),
    ("to:corp.test", ["a1"]),
    ("to:jones", ["a1"]),
    ("to:alice.smith@mail.example.com", ["o1"]),
    ("to:carol", []),
    ("cc:carol@cc.test", ["a1"]),
    ("cc:bob", []),
    ("bcc:dave@bcc.test", ["a1"]),
    ("bcc:erin@journal.test", ["a1"]),  # envelope-only recipient
    ("bcc:zed", []),
    ("envelope:erin@journal.test", ["a1"]),
    ("envelope:journal.test", ["a1"]),
    ("envelope:zed@elsewhere.test", ["o1"]),
    ("envelope:dave@bcc.test", []),     # a header Bcc is not an envelope address
    # text fields: stemmed words, capitalised words exact
    ("subject:invoice", ["a1"]),
    ("subject:invoices", ["a1"]),
    ("subject:Quarterly", ["a1"]),
    ("subject:lunch", ["o1"]),
    ("subject:payment", []),
    ("body:payment", ["a1"]),
    ("body:invoice", ["a1", "o1"]),
    ("body:revenue", []),
    ("attachment:report", ["a1"]),
    ("attachment:q3", ["a1"]),
    ("attachment:report.pdf", ["a1"]),
    ('attachment:"Q3 Report.pdf"', ["a1"]),
    ("attachment:q3*", ["a1"]),
    ("attachment:revenue", []),
    ("attachment-text:revenue", ["a1"]),
    ('attachment-text:"third quarter"', ["a1"]),
    ("attachment-text:payment", []),
    # boolean fields
    ("id:Invoice.2002.07@Example.COM", ["a1"]),
    ("id:<Invoice.2002.07@Example.COM>", ["a1"]),
    ("mid:other@elsewhere.test", ["o1"]),
    ("id:invoice.2002.07@example.com", []),   # Message-IDs are exact
    ("tag:Legal", ["a1"]),
    ("tag:legal", []),
    ("tag:hold", ["a1", "o1"]),
    ("flag:undecodable", ["a1"]),
    ("flag:Undecodable", ["a1"]),
    ("flag:encrypted", ["a1"]),               # an attachment's flag
    ("aid:o1", ["o1"]),
    ("aid:a1 OR aid:o1", ["a1", "o1"]),
])
def test_each_field(two, q, expected):
    assert sorted(found(two, q)) == expected


@pytest.mark.parametrize("q,expected", [
    ("invoice", ["a1", "o1"]),        # subject / body
    ("revenue", ["a1"]),              # attachment text
    ("report", ["a1"]),               # attachment name
    ("smith", ["a1", "o1"]),          # From: display name of a1, To: address of o1
    ("jones", ["a1"]),                # To: display name
    ("zed", ["o1"]),
    ("carol", []),                    # Cc: is not free text
    ("erin", []),                     # nor the envelope
    ("legal", []),                    # nor tags
    ('"alice.smith@mail.example.com"', ["o1"]),  # To: address as text
])
def test_free_text(two, q, expected):
    assert sorted(found(two, q)) == expected


def test_default_operator_is_and(two):
    assert found(two, "from:alice invoice") == ["a1"]
    assert found(two, "from:zed invoice") == ["o1"]
    assert found(two, "from:alice lunch") == []
    assert found(two, "invoice lunch") == ["o1"]
    assert found(two, "tag:hold tag:Legal") == ["a1"]         # several tags: all of them


def test_phrase(two):
    assert found(two, '"quarterly invoice"') == ["a1"]          # o1 has "invoice quarterly"
    assert sorted(found(two, "quarterly invoice")) == ["a1", "o1"]
    assert found(two, 'body:"payment is due"') == ["a1"]
    assert found(two, 'body:"due payment"') == []


@pytest.mark.parametrize("q,expected", [
    ("lunch OR revenue", ["a1", "o1"]),
    ("invoice AND NOT lunch", ["a1"]),
    ("invoice NOT lunch", ["a1"]),
    ("invoice -lunch", ["a1"]),
    ("NOT lunch", ["a1"]),
    ("NOT tag:Legal", ["o1"]),
    ("(from:zed OR from:alice) AND subject:lunch", ["o1"]),
    ("(lunch OR payment) tag:Legal", ["a1"]),
    ("lunch XOR invoice", ["a1"]),
    ("inv*", ["a1", "o1"]),
    ("subject:lun*", ["o1"]),
    ("", ["a1", "o1"]),               # the empty query lists everything
])
def test_boolean_operators(two, q, expected):
    assert sorted(found(two, q)) == expected


@pytest.mark.parametrize("q,expected", [
    # has:attachment is the format-2 value slot: a1 has an attachment, o1 none
    ("has:attachment", ["a1"]),
    ("has:attachments", ["a1"]),
    ("has:Attachment", ["a1"]),
    ("-has:attachment", ["o1"]),
    ("NOT has:attachment", ["o1"]),
    ("invoice has:attachment", ["a1"]),       # with other terms
    ("invoice -has:attachment", ["o1"]),
    ("lunch has:attachment", []),
    ("tag:hold -has:attachment", ["o1"]),
    ("from:zed OR has:attachment", ["a1", "o1"]),
    ("(invoice OR lunch) has:attachment", ["a1"]),
    ("has:attachment date:2002-07-01..2002-07-15", ["a1"]),
    ("has:attachment date:2002-07-15..", []),
    ("-has:attachment date:..2002-07-31", ["o1"]),
    ("-has:attachment -tag:Legal", ["o1"]),
    ("-has:attachment -tag:hold", []),
])
def test_has_attachment(two, q, expected):
    assert sorted(found(two, q)) == expected
    assert sorted(found(two, q, order="relevance")) == expected


@pytest.mark.parametrize("q,expected", [
    # Xapian takes a query of excluded items only for a syntax error and
    # re-parses it without operators: -draft would find the drafts.
    ("-tag:Legal", ["o1"]),
    ("-lunch", ["a1"]),
    ('-"quarterly invoice"', ["o1"]),
    ("-lunch -tag:Legal", []),
    ("-(lunch OR tag:Legal)", []),
    ("-from:zed", ["a1"]),
    ("  -lunch  ", ["a1"]),
    ("lunch -tag:Legal", ["o1"]),             # unchanged when something is included
])
def test_only_excluded_items(two, q, expected):
    assert sorted(found(two, q)) == expected


def test_has_attachment_agrees_with_the_facet_and_needs_no_reindex(two):
    """The term reads the facet's own value slot: its count is the facet's."""
    counts = index.facets([two], "")["has_attachment"]
    assert search([two], "has:attachment", limit=0)[0] == counts["true"] == 1
    assert search([two], "-has:attachment", limit=0)[0] == counts["false"] == 1
    # has: is not a term prefix: nothing on disk changed for it
    assert "has" not in PREFIXES


def test_wildcard_expansion_is_bounded(tmp_path):
    ix = ShardIndex(tmp_path / "x")
    words = " ".join(f"zzw{i:05d}" for i in range(index.WILDCARD_LIMIT + 10))
    add(ix, "a", msg(body_text=words))
    assert found(tmp_path / "x", "zzw0000*") == ["a"]            # 10 terms: fine
    with pytest.raises(QueryError, match=r"more than 1024 terms.*longer"):
        search([tmp_path / "x"], "body:zzw*")
    with pytest.raises(QueryError, match="more than 1024"):
        search([tmp_path / "x"], "zzw*")


# --- date and size ranges ----------------------------------------------------

DATES = {
    "jun30-late": utc(2002, 6, 30, 23, 59, 59),
    "jul01-start": utc(2002, 7, 1, 0, 0, 0),
    "jul31-late": utc(2002, 7, 31, 23, 59, 59),
    "aug01-start": utc(2002, 8, 1, 0, 0, 0),
    "aug01-late": utc(2002, 8, 1, 23, 59, 59.0) + 0.999,
    "aug02-start": utc(2002, 8, 2, 0, 0, 0),
    "dec31-2001": utc(2001, 12, 31, 12),
    "jan01-2003": utc(2003, 1, 1, 0, 0, 0),
}


@pytest.fixture
def dated(tmp_path):
    path = tmp_path / "dated"
    with ShardIndex(path).writer() as w:
        for aid, t in DATES.items():
            w.add(aid, msg(subject=aid), envelope=[], envelope_only=[], tags=[], date=t,
                  size=100)
    return path


@pytest.mark.parametrize("q,expected", [
    ("date:2002-07-01..2002-08-01", ["jul01-start", "jul31-late", "aug01-start", "aug01-late"]),
    ("date:2002-07-01..2002-07-01", ["jul01-start"]),
    ("date:2002-07-01", ["jul01-start"]),
    ("date:..2002-07-31", ["dec31-2001", "jun30-late", "jul01-start", "jul31-late"]),
    ("date:2002-08-01..", ["aug01-start", "aug01-late", "aug02-start", "jan01-2003"]),
    ("date:2002-07", ["jul01-start", "jul31-late"]),
    ("date:2002-06..2002-07", ["jun30-late", "jul01-start", "jul31-late"]),
    ("date:2002", ["jun30-late", "jul01-start", "jul31-late", "aug01-start", "aug01-late",
                   "aug02-start"]),
    ("date:2001..2001", ["dec31-2001"]),
    ("date:2003-01..", ["jan01-2003"]),
    ("date:2002 date:2002-08", ["aug01-start", "aug01-late", "aug02-start"]),   # both
    ("date:2001 OR date:2003", ["dec31-2001", "jan01-2003"]),
    ("date:2002 -date:2002-07..2002-08", ["jun30-late"]),
])
def test_date_ranges(dated, q, expected):
    assert sorted(found(dated, q)) == sorted(expected)


def test_date_range_with_words(dated):
    assert found(dated, "subject:jul31 date:2002-07") == ["jul31-late"]
    assert found(dated, "subject:jul31 date:2002-08") == []


@pytest.fixture
def sized(tmp_path):
    path = tmp_path / "sized"
    with ShardIndex(path).writer() as w:
        for aid, size in {"s999": 999, "s1000": 1000, "s20000": 20000, "s20001": 20001,
                          "s1500k": 1_500_000, "s3M": 3_000_000}.items():
            w.add(aid, msg(size=size), envelope=[], envelope_only=[], tags=[],
                  date=utc(2002, 7, 1), size=size)
    return path


@pytest.mark.parametrize("q,expected", [
    ("size:1000..20000", ["s1000", "s20000"]),
    ("size:1k..20k", ["s1000", "s20000"]),
    ("size:1K..20kB", ["s1000", "s20000"]),
    ("size:..1000", ["s1000", "s999"]),
    ("size:20001..", ["s1500k", "s20001", "s3M"]),
    ("size:1M..2M", ["s1500k"]),
    ("size:1.5M..1.5M", ["s1500k"]),
    ("size:2M..", ["s3M"]),
    ("size:999", ["s999"]),
])
def test_size_ranges(sized, q, expected):
    assert sorted(found(sized, q)) == sorted(expected)


# --- query_date_bounds -------------------------------------------------------

@pytest.mark.parametrize("q,expected", [
    ("date:2002-07-01..2002-08-01", (utc(2002, 7, 1), utc(2002, 8, 2))),
    ("invoice date:2002-07", (utc(2002, 7, 1), utc(2002, 8, 1))),
    ("date:2002-07..", (utc(2002, 7, 1), None)),
    ("date:..2002-07", (None, utc(2002, 8, 1))),
    ("date:2002 date:2002-03..2003-06", (utc(2002, 3, 1), utc(2003, 1, 1))),
    ("(date:2002-07 from:alice) AND invoice", (utc(2002, 7, 1), utc(2002, 8, 1))),
    ("date:2002-07 -lunch", (utc(2002, 7, 1), utc(2002, 8, 1))),
    ("date:2002-07 OR invoice", None),
    ("invoice AND (date:2002-07 OR lunch)", None),
    ("NOT date:2002-07", None),
    ("invoice -date:2002-07", None),
    ("lunch XOR date:2002", None),
    ("invoice", None),
    ("size:1..2", None),
    ("", None),
])
def test_query_date_bounds(q, expected):
    got = query_date_bounds(q)
    if expected is None:
        assert got is None
    else:
        lo, hi = got
        assert lo == expected[0]
        if expected[1] is None:
            assert hi is None
        else:   # the last instant of the end period: inclusive, before the next one
            assert hi < expected[1] and expected[1] - hi < 1e-3


def test_query_date_bounds_matches_what_search_finds(dated):
    lo, hi = query_date_bounds("date:2002-07-01..2002-08-01")
    dates = [DATES[a] for a in found(dated, "date:2002-07-01..2002-08-01")]
    assert dates and all(lo <= d <= hi for d in dates)
    outside = [t for t in DATES.values() if not lo <= t <= hi]
    assert len(outside) == len(DATES) - len(dates)


def test_prepared_query_is_the_same_search(dated):
    for q in ("date:2002-07-01..2002-08-01", "invoice date:2002-07", "invoice", ""):
        pq = index.prepare(q)
        assert str(pq.query) == str(parse_query(q)) and pq.bounds == query_date_bounds(q)
        assert search([dated], pq, limit=1000) == search([dated], q, limit=1000)
    with pytest.raises(QueryError, match="unbalanced"):
        index.prepare("(invoice")


# --- bad queries -------------------------------------------------------------

@pytest.mark.parametrize("q,message", [
    ("(invoice OR lunch", r"unbalanced parentheses: 1 '\(' not closed"),
    ("invoice) lunch", r"unbalanced parentheses: a '\)' without"),
    ('"quarterly invoice', "unbalanced quotes"),
    ("date:2002-13", r"bad date '2002-13' in date:2002-13: month must be in 1\.\.12"),
    ("date:2002-02-30", "bad date '2002-02-30'.*day is out of range"),
    ("date:yesterday..", "bad date 'yesterday'.*use YYYY-MM-DD, YYYY-MM or YYYY"),
    ("date:02-07-2002", "bad date '02-07-2002'"),
    ("date:..", "needs at least one end"),
    ("date:2003..2002", "ends before it starts"),
    ("size:big", "bad size 'big'"),
    ("size:20k..1k", "ends before it starts"),
    ("invoice AND", "bad query: Syntax: <expression> AND <expression>"),
    ("OR lunch", "bad query: Syntax"),
    ("from:*", "wildcard needs at least one character"),
    ("tag:a*b*", "wildcard needs"),
    ("has:pictures", "has:pictures: has: takes attachment"),
])
def test_query_errors(q, message):
    with pytest.raises(QueryError, match=message):
        parse_query(q)
    with pytest.raises(QueryError, match=message):
        query_date_bounds(q)


def test_query_error_from_search(two):
    with pytest.raises(QueryError, match="bad date"):
        search([two], "date:2002-99")
    with pytest.raises(ValueError, match="order"):
        search([two], "invoice", order="sideways")


def test_parse_query_returns_a_query():
    q = parse_query("from:alice invoice")
    assert isinstance(q, xapian.Query)
    assert "XFROMalice" in str(q) and "ZXBODYinvoic" in str(q)
    assert PREFIXES["from"] == "XFROM" and PREFIXES["aid"] == "Q"
    assert set(PREFIXES) == {"from", "to", "cc", "bcc", "envelope", "subject", "body",
                             "attachment", "attachment-text", "id", "mid", "tag", "flag", "aid"}


# --- the writer ----------------------------------------------------------------

def test_readd_is_idempotent_and_replaces(tmp_path):
    path = tmp_path / "x"
    ix = ShardIndex(path)
    add(ix, "a", msg(subject="first version"))
    add(ix, "a", msg(subject="second version"))
    with ix.writer() as w:       # twice in one batch too
        w.add("a", msg(subject="second version"), envelope=[], envelope_only=[], tags=[],
              date=utc(2002, 7, 1), size=1)
        w.add("a", msg(subject="second version"), envelope=[], envelope_only=[], tags=[],
              date=utc(2002, 7, 1), size=1)
    db = xapian.Database(str(path))
    assert db.get_doccount() == 1
    db.close()
    assert found(path, "subject:second") == ["a"]
    assert found(path, "subject:first") == []
    assert ids(path) == {"a"}


def test_delete(tmp_path):
    path = tmp_path / "x"
    ix = ShardIndex(path)
    with ix.writer() as w:
        for aid in ("a", "b", "c"):
            w.add(aid, msg(subject=f"note {aid}"), envelope=[], envelope_only=[], tags=[],
                  date=utc(2002, 7, 1), size=1)
    with ix.writer() as w:
        w.delete("b")
        w.delete("never-indexed")       # no error
    assert ids(path) == {"a", "c"}
    assert sorted(found(path, "note")) == ["a", "c"]
    assert found(path, "aid:b") == []


def test_indexed_seq_round_trip(tmp_path):
    path = tmp_path / "x"
    assert indexed_seq(path) == 0                 # no database
    (tmp_path / "empty").mkdir()
    assert indexed_seq(tmp_path / "empty") == 0   # an empty directory is no database
    ix = ShardIndex(path)
    with ix.writer() as w:
        w.add("a", msg(), envelope=[], envelope_only=[], tags=[], date=0.0, size=1)
        w.set_indexed_seq(41)
    assert indexed_seq(path) == 41
    with ix.writer() as w:
        w.set_indexed_seq(1_000_000_007)
    assert indexed_seq(path) == 1_000_000_007
    db = xapian.Database(str(path))
    assert db.get_metadata("mt:indexed_seq") == b"1000000007"
    db.close()


def test_failed_batch_commits_nothing(tmp_path):
    path = tmp_path / "x"
    ix = ShardIndex(path)
    add(ix, "a")
    with ix.writer() as w:
        w.set_indexed_seq(5)
    with pytest.raises(RuntimeError):
        with ix.writer() as w:
            w.add("b", msg(), envelope=[], envelope_only=[], tags=[], date=0.0, size=1)
            w.set_indexed_seq(6)
            raise RuntimeError("archiver failed mid-batch")
    assert ids(path) == {"a"}
    assert indexed_seq(path) == 5
    with ix.writer(timeout=0.5) as w:             # and the lock was released
        w.set_indexed_seq(7)
    assert indexed_seq(path) == 7


def test_writer_waits_for_the_lock(tmp_path):
    path = tmp_path / "x"
    ix = ShardIndex(path)
    add(ix, "a")
    other = xapian.WritableDatabase(str(path), xapian.DB_OPEN)   # e.g. `mailtresor reindex`
    release = threading.Timer(0.4, other.close)
    release.start()
    t0 = time.monotonic()
    try:
        with ix.writer(timeout=10) as w:
            w.add("b", msg(), envelope=[], envelope_only=[], tags=[], date=0.0, size=1)
    finally:
        release.join()
    waited = time.monotonic() - t0
    assert 0.35 < waited < 5
    assert ids(path) == {"a", "b"}


def test_writer_gives_up_with_index_locked(tmp_path):
    path = tmp_path / "x"
    ix = ShardIndex(path)
    add(ix, "a")
    other = xapian.WritableDatabase(str(path), xapian.DB_OPEN)
    try:
        t0 = time.monotonic()
        with pytest.raises(IndexLocked, match=r"locked by another writer \(waited 0.3s\)") as e:
            with ix.writer(timeout=0.3):
                pytest.fail("writer opened a locked index")
        assert str(path) in str(e.value)
        assert 0.3 <= time.monotonic() - t0 < 3
    finally:
        other.close()
    with ix.writer(timeout=1) as w:
        w.delete("a")
    assert ids(path) == set()


def test_long_garbage_terms_do_not_raise(tmp_path):
    path = tmp_path / "x"
    garbage = "QUJD" * 2500                      # a 10 kB base64 "word"
    long_local = "x" * 300
    long_mid = "<" + "m" * 400 + "@example.com>"
    long_name = "ü" * 300 + ".pdf"
    parsed = msg(message_id=long_mid, from_header=f"{'Ü' * 250} <{long_local}@example.com>",
                 from_=[f"{long_local}@example.com"], to=[garbage], cc=["é" * 500],
                 subject=garbage, body_text=f"before {garbage} after\n" * 3,
                 attachments=[Attachment(long_name, "application/pdf", 1, garbage, [garbage])],
                 flags=["f" * 1000])
    add(ShardIndex(path), "a", parsed, envelope=[garbage + "@x.test"], envelope_only=[garbage],
        tags=["t" * 1000])
    assert found(path, "body:before body:after") == ["a"]
    assert found(path, f"from:{long_local}@example.com") == ["a"]   # cut + hashed, still exact
    assert found(path, f"id:{long_mid}") == ["a"]
    assert found(path, f"id:{'m' * 399}x@example.com") == []
    assert found(path, f"tag:{'t' * 1000}") == ["a"]
    db = xapian.Database(str(path))
    assert all(len(t.term) <= 245 for t in db.allterms())
    db.close()


def test_no_plaintext_stored(tmp_path):
    path = tmp_path / "x"
    add(ShardIndex(path), "a1", ALICE, envelope=["bob@corp.test"], tags=["Legal"],
        date=utc(2002, 7, 10), size=60_000)
    db = xapian.Database(str(path))
    doc = db.get_document(db.postlist("Qa1").__next__().docid)
    assert doc.get_data() == b"a1"
    values = {v.num: v.value for v in doc.values()}
    # Format 2: the facet slots hold the month, the sender's domain, whether
    # there are attachments, tags and flags -- what the terms hold already;
    # no subject, body, name or local part.  Format 3: the arrival time.
    assert set(values) == {SLOT_DATE, SLOT_SIZE, 2, 3, 4, 5, 6, 7}
    assert values[2] == b"2002-07" and values[4] in (b"0", b"1") and values[5] == b"Legal"
    assert xapian.sortable_unserialise(values[SLOT_DATE]) == utc(2002, 7, 10)
    assert xapian.sortable_unserialise(values[SLOT_SIZE]) == 60_000
    blob = doc.get_data() + b"".join(values.values())
    for secret in (b"Quarterly", b"invoice", b"Alice", b"alice", b"Payment", b"Revenue"):
        assert secret not in blob
    db.close()


def test_ids_of_missing_index_is_empty(tmp_path):
    assert ids(tmp_path / "nothing") == set()


# --- search ------------------------------------------------------------------

@pytest.fixture
def shards(tmp_path):
    """Two month shards, three messages each."""
    out = []
    for month in (7, 8):
        path = tmp_path / f"2002-{month:02d}" / "xapian"
        with ShardIndex(path).writer() as w:
            for day in (5, 15, 25):
                aid = f"m{month}d{day}"
                w.add(aid, msg(subject=f"report {aid}", size=day * 100), envelope=[],
                      envelope_only=[], tags=[], date=utc(2002, month, day), size=day * 100)
        out.append(path)
    return out


def test_search_across_shards_in_date_order(shards):
    total, hits = search(shards, "report")
    assert total == 6
    assert [h.archive_id for h in hits] == ["m8d25", "m8d15", "m8d5", "m7d25", "m7d15", "m7d5"]
    assert [h.rank for h in hits] == list(range(6))
    total, hits = search(shards, "report", order="date-asc")
    assert [h.archive_id for h in hits] == ["m7d5", "m7d15", "m7d25", "m8d5", "m8d15", "m8d25"]
    for h in hits:
        assert isinstance(h, Hit)
        assert h.shard_path == shards[0 if h.archive_id.startswith("m7") else 1]
        assert h.date == utc(2002, int(h.archive_id[1]), int(h.archive_id.split("d")[1]))
        assert h.size == int(h.archive_id.split("d")[1]) * 100


def test_search_offset_limit_and_relevance(shards):
    total, hits = search(shards, "report", offset=2, limit=2)
    assert total == 6
    assert [h.archive_id for h in hits] == ["m8d5", "m7d25"]
    assert [h.rank for h in hits] == [2, 3]
    total, hits = search(shards, "report OR m7d15", order="relevance", limit=1)
    assert [h.archive_id for h in hits] == ["m7d15"]
    total, hits = search(shards, "date:2002-08-10.. size:..2000", order="date-asc")
    assert (total, [h.archive_id for h in hits]) == (1, ["m8d15"])


def test_shard_walk_equals_one_combined_sort(tmp_path):
    """search() in date order walks the shards by the dates they hold and
    only counts the rest; it must give what one sort over all of them gives,
    also when shards' date ranges overlap (a late message with an old Date:,
    a future one) and when dates tie."""
    import random
    rnd = random.Random(7)
    paths = []
    for k in range(5):
        path = tmp_path / f"s{k}"
        with ShardIndex(path).writer() as w:
            for i in range(120):
                if i % 10 == 0:
                    date = utc(2001, 1, 1) + rnd.randrange(5 * 31 * 86400)    # anywhere
                else:
                    date = utc(2002, k + 1, 1) + rnd.randrange(28 * 86400)
                if i % 25 == 0:
                    date = utc(2002, 3, 3)                                       # ties across shards
                words = " ".join(w_ for w_, p in (("alpha", 2), ("beta", 3), ("gamma", 7), ("delta", 37))
                                 if i % p == 0)
                w.add(f"s{k}m{i}", msg(subject=f"report {words}"), envelope=[], envelope_only=[], tags=[],
                      date=date, size=i)
        paths.append(path)
    paths.append(tmp_path / "no-index")
    rnd.shuffle(paths)

    def reference(q, offset, limit, descending):
        db = xapian.Database()
        for p in paths:
            if (p / "iamglass").exists():
                db.add_database(xapian.Database(str(p)))
        enq = xapian.Enquire(db)
        enq.set_query(parse_query(q))
        enq.set_sort_by_value(SLOT_DATE, descending)
        mset = enq.get_mset(0, 10_000, db.get_doccount())
        dates = [xapian.sortable_unserialise(m.document.get_value(SLOT_DATE)) for m in mset]
        return mset.get_matches_estimated(), dates[offset:offset + limit]

    for q in ("report", "alpha", "gamma", "delta", "beta -alpha", "alpha OR gamma", "nothing", "date:2002-03",
              "delta OR date:2001"):
        for offset, limit in ((0, 20), (0, 1), (7, 13), (100, 50), (590, 20), (0, 0), (0, 10_000)):
            for order in ("date-desc", "date-asc"):
                total, hits = search(paths, q, offset=offset, limit=limit, order=order)
                want_total, want_dates = reference(q, offset, limit, order == "date-desc")
                assert total == want_total, (q, offset, limit, order)
                assert [h.date for h in hits] == want_dates, (q, offset, limit, order)
                assert [h.rank for h in hits] == list(range(offset, offset + len(hits)))
                assert len({h.archive_id for h in hits}) == len(hits)
                for h in hits:
                    assert h.shard_path.name == h.archive_id.split("m")[0]


def test_search_counts_exactly(tmp_path):
    path = tmp_path / "x"
    with ShardIndex(path).writer() as w:
        for i in range(3000):
            w.add(f"a{i}", msg(subject="common" + (" rare" if i % 7 == 0 else "")),
                  envelope=[], envelope_only=[], tags=[], date=utc(2002, 7, 1) + i,
                  size=500 if i % 3 == 0 else 5000)
    for q, n in (("size:..1000", 1000), ("common", 3000), ("rare", 429), ("common -rare", 2571)):
        for order in ("date-desc", "date-asc", "relevance"):
            total, hits = search([path], q, limit=5, order=order)
            assert (total, len(hits)) == (n, 5), (q, order)


def test_search_without_shards(tmp_path, shards):
    assert search([], "report") == (0, [])
    assert search([tmp_path / "no-such-month"], "report") == (0, [])
    total, hits = search([tmp_path / "no-such-month", shards[1]], "report")
    assert total == 3 and all(h.shard_path == shards[1] for h in hits)


def test_search_sees_later_batches(tmp_path):
    path = tmp_path / "x"
    ix = ShardIndex(path)
    add(ix, "a", msg(subject="alpha"))
    assert found(path, "alpha") == ["a"]
    add(ix, "b", msg(subject="alpha"))
    assert sorted(found(path, "alpha")) == ["a", "b"]


# --- the corpus ----------------------------------------------------------------

def _decode(value) -> str:
    if value is None:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(str(value))))
    except Exception:
        return str(value)


def _stdlib_parse(raw: bytes) -> Parsed:
    m = email.message_from_bytes(raw, policy=email.policy.compat32)
    bodies, attachments = [], []
    for part in m.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True) or b""
        charset = part.get_content_charset() or "latin-1"
        try:
            text = payload.decode(charset, "replace")
        except LookupError:
            text = payload.decode("latin-1")
        if part.get_filename():
            attachments.append(Attachment(_decode(part.get_filename()), part.get_content_type(),
                                          len(payload), "", []))
        elif part.get_content_maintype() == "text":
            bodies.append(text)

    def addrs(name):
        return [a for _, a in email.utils.getaddresses(m.get_all(name, [])) if a]

    try:
        date = email.utils.parsedate_to_datetime(m["Date"]).timestamp() if m["Date"] else None
    except Exception:
        date = None
    return Parsed(message_id=_decode(m["Message-ID"]).strip(), date=date,
                  from_header=_decode(m["From"]), from_=addrs("From"), to=addrs("To"),
                  cc=addrs("Cc"), bcc=addrs("Bcc"), subject=_decode(m["Subject"]),
                  body_text="\n".join(bodies), attachments=attachments, flags=[],
                  size=len(raw))


def _parser():
    try:
        from mailtresor.archive.parse import parse_message
        return parse_message
    except ImportError:
        return _stdlib_parse


def test_corpus_batch(tmp_path):
    files = corpus_files()[:2000]
    parse = _parser()
    path = tmp_path / "corpus"
    ix = ShardIndex(path)
    docs = []
    for i, f in enumerate(files):
        raw = corpus_message(f)
        docs.append((f"c{i:05d}", parse(raw), len(raw)))
    for start in range(0, len(docs), 200):
        with ix.writer() as w:
            for aid, parsed, size in docs[start:start + 200]:
                w.add(aid, parsed, envelope=["archive@tenant.test"], envelope_only=[], tags=[],
                      date=parsed.date or utc(2002, 7, 1), size=size)
            w.set_indexed_seq(start + 200)
    assert ids(path) == {aid for aid, _, _ in docs}
    assert indexed_seq(path) == 2000
    total, _ = search([path], "envelope:archive@tenant.test", limit=0)
    assert total == 2000

    checked_subjects = checked_senders = 0
    for aid, parsed, _ in docs[::97]:
        words = [w for w in index._words(parsed.subject) if w.isalpha() and len(w) > 3][:3]
        if len(words) >= 2:
            phrase = " ".join(parsed.subject.replace('"', " ").split()[:6])
            assert aid in found(path, f'subject:"{phrase}"'), (aid, parsed.subject)
            assert aid in found(path, " ".join(f"subject:{w}" for w in words)), words
            assert aid in found(path, " ".join(words)), words
            checked_subjects += 1
        sender = next((a for a in parsed.from_ if "@" in a and " " not in a), None)
        if sender:
            assert aid in found(path, f"from:{sender}"), sender
            assert aid in found(path, f"from:{sender.rpartition('@')[2]}"), sender
            checked_senders += 1
        if parsed.message_id.strip("<>") and " " not in parsed.message_id:
            assert aid in found(path, f"id:{parsed.message_id}")
    assert checked_subjects >= 10 and checked_senders >= 10


def test_a_creation_cut_short_by_a_crash_is_replaced(tmp_path):
    """kill -9 during the first commit leaves a directory with table files
    but no revision file; Xapian will not open it. Nothing was ever
    committed there, so the writer starts it afresh."""
    path = tmp_path / "xapian"
    path.mkdir()
    for name in ("flintlock", "postlist.glass", "termlist.glass", "v.tmp"):
        (path / name).write_bytes(b"\0" * 64)
    with pytest.raises(xapian.DatabaseError):
        xapian.WritableDatabase(str(path), xapian.DB_CREATE_OR_OPEN)
    with index.ShardIndex(path).writer() as w:
        w.set_indexed_seq(7)
    assert index.indexed_seq(path) == 7 and index.ids(path) == set()


def test_bare_address_shortcut_agrees_with_getaddresses():
    """_split_addresses() skips email.utils.getaddresses() for a bare
    address; for every address parse.py finds in the corpus, and for the
    odd shapes below, that must give what getaddresses() gives."""
    from mailtresor.archive.parse import parse_message
    addrs = set()
    for f in corpus_files():
        p = parse_message(corpus_message(f))
        addrs.update(p.from_ + p.to + p.cc + p.bcc)
    addrs |= {"a@b", "first.last+tag@sub.example.co.uk", "o'brien@example.ie", "x@[127.0.0.1]",
              "a@b@c", "@example.com", "user@", "a b@c", '"q"@example.com', "a,b@c", "a@b.",
              "UPPER@Example.COM", "ümlaut@exämple.de", "a;b@c", "a:b@c", "(c)a@b"}
    shortcut = 0
    for a in sorted(addrs):
        if index._BARE_ADDRESS.fullmatch(a):
            shortcut += 1
            full = [(n, x) for n, x in email.utils.getaddresses([a]) if n or x]
            assert full == [("", a)], a
            assert index._split_addresses([a]) == full
    assert shortcut > 2000           # the corpus's addresses do take the shortcut
    for odd in ("a@b@c", '"q"@example.com', "a b@c", "x@[127.0.0.1]", "(c)a@b"):
        assert not index._BARE_ADDRESS.fullmatch(odd)


def test_readers_keep_shards_open_and_see_new_commits_and_rebuilds(tmp_path):
    """index.Readers (the daemon's query socket): a reader given back is
    used again, brought up to the newest commit; an index rebuilt in a new
    directory (`reindex`) is opened afresh; at most `limit` stay open."""
    paths = [tmp_path / f"s{k}" for k in range(3)]
    for k, p in enumerate(paths):
        add(ShardIndex(p), f"s{k}m0", msg(subject="first"), date=utc(2002, 1, 1))
    readers = index.Readers(limit=2)
    total, hits = index.search(paths, "first", readers=readers)
    assert total == 3 and readers.open_count() == 2          # the least recently used one closed
    kept = readers.take(paths[2])
    readers.give(paths[2], kept)
    # New commits in a shard whose reader is cached: seen by the next search.
    add(ShardIndex(paths[2]), "s2m1", msg(subject="second"), date=utc(2002, 1, 2))
    assert [h.archive_id for h in index.search(paths, "second", readers=readers)[1]] == ["s2m1"]
    again = readers.take(paths[2])
    assert again is kept                                     # reused, not opened again
    readers.give(paths[2], again)
    # Rebuilt from nothing, as `reindex` does: the old reader is not reused.
    shutil.rmtree(paths[2])
    add(ShardIndex(paths[2]), "s2new", msg(subject="rebuilt"), date=utc(2002, 1, 3))
    ids = [h.archive_id for h in index.search(paths, "rebuilt OR second OR first", readers=readers)[1]]
    assert ids[0] == "s2new" and sorted(ids[1:]) == ["s0m0", "s1m0"]
    # Removed altogether: skipped like a month without mail.
    shutil.rmtree(paths[1])
    assert index.search(paths, "first", readers=readers)[0] == 1
    readers.close()
    assert readers.open_count() == 0
