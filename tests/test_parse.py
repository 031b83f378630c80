"""parse_message: never raises, extracts what the index needs, from the whole
corpus and from the broken shapes mail arrives in."""

import base64
import email
import email.generator
import email.header
import email.policy
import email.utils
import io
import quopri
import random
import re
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import pytest

from mailtresor.archive import parse
from mailtresor.archive.parse import Attachment, Parsed, parse_message
from tests.conftest import corpus_files, corpus_message
from tests.harness import hostile

_HIGH = re.compile(rb"[\x80-\xff]")


def message(headers: list[str] | list[bytes], body: bytes = b"", nl: bytes = b"\r\n") -> bytes:
    lines = [h.encode() if isinstance(h, str) else h for h in headers]
    return nl.join(lines) + nl + nl + body


def multipart(headers: list[str], parts: list[bytes], boundary: str = "==b==",
              subtype: str = "mixed") -> bytes:
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts)
    body += b"--" + boundary.encode() + b"--\r\n"
    return message([*headers, "MIME-Version: 1.0",
                    f'Content-Type: multipart/{subtype}; boundary="{boundary}"'], body)


def part(headers: list[str], body: bytes) -> bytes:
    return message(headers, body)


def raw_header(raw: bytes, name: bytes) -> bytes | None:
    head = raw.split(b"\r\n\r\n", 1)[0]
    m = re.search(rb"(?im)^" + name + rb":[ \t]*(.*(?:\r\n[ \t].*)*)", head)
    return m.group(1) if m else None


# ------------------------------------------------------------- the whole corpus

@pytest.mark.slow
def test_whole_corpus_parses_without_raising_and_fast():
    """Every one of the 4,650 messages, as an SMTP client sends it (CRLF):
    no exception, well-formed results, and the whole run in well under 30 s."""
    files = corpus_files()
    assert len(files) == 4650
    raws = [corpus_message(f) for f in files]
    started = time.process_time()
    results = [parse_message(r) for r in raws]
    elapsed = time.process_time() - started
    print(f"\nparsed {len(raws)} corpus messages in {elapsed:.2f} s CPU "
          f"({1000 * elapsed / len(raws):.2f} ms each)")
    assert elapsed < 30
    flagged = 0
    for raw, p in zip(raws, results):
        assert isinstance(p, Parsed)
        assert p.size == len(raw)
        assert "parse-error" not in p.flags
        assert "extraction-truncated" not in p.flags   # ordinary mail is never over budget
        for s in (p.message_id, p.from_header, p.subject, p.body_text,
                  *p.from_, *p.to, *p.cc, *p.bcc,
                  *(a.text for a in p.attachments), *(a.filename for a in p.attachments)):
            assert isinstance(s, str)
            s.encode("utf-8")   # no lone surrogates: the index must be able to store it
        assert all(a == a.lower() for a in (*p.from_, *p.to, *p.cc, *p.bcc))
        assert len(p.body_text) <= parse.MAX_TEXT
        assert p.date is None or isinstance(p.date, float)
        for a in p.attachments:
            assert isinstance(a, Attachment) and a.content_type == a.content_type.lower()
            assert "/" in a.content_type and a.size >= 0
        flagged += bool(p.flags)
    # the corpus is known to hold broken messages: the flags must say so
    assert flagged > 20


@pytest.mark.slow
def test_tree_split_under_compat32_reads_the_same_as_under_policy_default(monkeypatch):
    """parse.py splits the MIME tree with the compat32 policy because it is a
    third faster; the default policy must not have given a different result
    for any corpus message (CRLF as sent, and LF as published)."""
    files = corpus_files()
    raws = [corpus_message(f) for f in files] + [f.read_bytes() for f in files[::7]]
    fast = [parse_message(r) for r in raws]
    monkeypatch.setattr(parse, "_TREE", email.policy.default)
    slow = [parse_message(r) for r in raws]
    assert parse._TREE is email.policy.default
    differ = [i for i, (a, b) in enumerate(zip(fast, slow)) if a != b]
    assert differ == [], f"{len(differ)} messages differ, first {files[differ[0] % len(files)]}"


@pytest.mark.slow
def test_corpus_as_published_lf_and_mbox_line():
    """The hard folders once more, bytes exactly as in the files (LF line
    endings, some with stray CRs, mbox From line included)."""
    for f in corpus_files():
        if f.parent.name in ("spam-1", "hard-ham-1"):
            raw = f.read_bytes()
            p = parse_message(raw)
            assert p.size == len(raw) and "parse-error" not in p.flags


def test_corpus_headers_agree_with_an_independent_reading():
    """Subject, Message-ID, From addresses and Date, computed independently
    with the compat32 parser wherever the raw header is plain ASCII."""
    checked = {"subject": 0, "from": 0, "date": 0, "message-id": 0}
    for f in corpus_files()[::3]:
        raw = corpus_message(f)
        m = email.message_from_bytes(raw, policy=email.policy.compat32)
        p = parse_message(raw)
        subj = m.get("subject")
        if isinstance(subj, str) and subj.isascii() and "=?" not in subj:
            assert p.subject == re.sub(r"\r?\n", "", subj).strip(), f
            checked["subject"] += 1
        frm = m.get("from")
        if isinstance(frm, str) and frm.isascii() and "=?" not in frm:
            assert p.from_ == [a.lower() for _, a in email.utils.getaddresses([frm]) if a], f
            checked["from"] += 1
        mid = m.get("message-id")
        if isinstance(mid, str) and mid.strip().startswith("<"):
            assert p.message_id == mid.strip()[1:].split(">", 1)[0].strip(), f
            checked["message-id"] += 1
        date = m.get("date")
        if isinstance(date, str):
            try:
                dt = email.utils.parsedate_to_datetime(date)
            except (TypeError, ValueError):
                dt = None
            if dt is not None and dt.tzinfo is not None:
                assert p.date == dt.timestamp(), f
                checked["date"] += 1
    assert min(checked.values()) > 1000, checked


def test_eight_bit_subjects_read_in_the_message_charset():
    """Spam with raw 8-bit Subject bytes: decoded in the charset its text part
    declares (the default policy alone gives U+FFFD), or cp1252 / UTF-8."""
    seen = 0
    for f in corpus_files():
        raw = corpus_message(f)
        subj = raw_header(raw, b"subject")
        if subj is None or not _HIGH.search(subj) or b"=?" in subj:
            continue
        p = parse_message(raw)
        assert "\ufffd" not in p.subject, (f, p.subject)
        m = email.message_from_bytes(raw, policy=email.policy.compat32)
        charsets = [c for c in m.get_charsets() if c and c not in ("us-ascii",)]
        candidates = ["utf-8", *charsets, "cp1252"]
        unfolded = re.sub(rb"\r\n", b"", subj).strip()
        for cs in candidates:
            try:
                expected = unfolded.decode(cs)
                break
            except (UnicodeDecodeError, LookupError):
                continue
        assert p.subject == expected, (f, cs)
        seen += 1
    assert seen >= 10


def test_html_only_corpus_messages_lose_their_markup():
    TAGS = re.compile(r"<(html|body|td|tr|table|font|div|p|br|img|span|center|head|style|script)\b[^>]*>"
                      r"|&(nbsp|lt|gt|quot);", re.I)
    seen = 0
    for f in corpus_files():
        raw = corpus_message(f)
        m = email.message_from_bytes(raw, policy=email.policy.compat32)
        if m.get_content_type() != "text/html" or m.get_filename():
            continue
        markup = m.get_payload(decode=True).decode("latin-1")
        p = parse_message(raw)
        assert not TAGS.search(p.body_text), (f, TAGS.search(p.body_text).group(0))
        # words standing alone between two tags, outside what a browser does not show
        markup = re.sub(r"(?is)<(script|style|title|xml)\b.*?</\1\s*>|<!--.*?-->", "", markup)
        words = re.findall(r">\s*([A-Za-z]{6,})\s*<", markup)
        if words:
            assert words[0] in p.body_text, f
            seen += 1
    assert seen > 100


# ------------------------------------------------------------- headers

def test_default_policy_raising_headers_fall_back_to_compat32():
    # values the default policy's header classes raise on (found by fuzzing; see the docstring)
    cases = [("From", '"'), ("To", "x@y.example, .x@y.example"), ("Cc", "?a\x7f<"),
             ("From", "Joe <joe@a.example>, .b@c.example")]
    for name, value in cases:
        with pytest.raises(Exception):
            h = email.policy.default.header_factory(name, value)
            str(h), [a.addr_spec for a in h.addresses]
        raw = message(["Subject: broken header", f"{name}: {value}", "Message-ID: <m1@x.example>"],
                      b"still readable\r\n")
        p = parse_message(raw)
        assert f"bad-header:{name.lower()}" in p.flags
        assert p.subject == "broken header" and p.body_text == "still readable"
        addrs = {"From": p.from_, "To": p.to, "Cc": p.cc}[name]
        if "@" in value:
            assert addrs and all("@" in a for a in addrs)
        if name == "From":
            assert p.from_header


def test_encoded_words_and_addresses():
    subject = "Grüße aus Köln – 東京 ✓"
    name = "Jürgen Weiß"
    raw = message([
        f"Subject: {email.header.Header(subject, 'utf-8').encode()}",
        f"From: {email.utils.formataddr((name, 'Juergen@Example.COM'), 'iso-8859-1')}",
        "To: a@one.example, \"Group, Inc\" <B@Two.Example>",
        "To: third@three.example",
        "Cc: team: c1@x.example, C2@x.example;",
        "Bcc: hidden@x.example",
        "Message-ID:\r\n <Abc.123@Host.Example> ",
    ], b"hi\r\n")
    p = parse_message(raw)
    assert p.subject == subject
    assert name in p.from_header and "juergen@example.com" in p.from_header.lower()
    assert p.from_ == ["juergen@example.com"]
    assert p.to == ["a@one.example", "b@two.example", "third@three.example"]
    assert p.cc == ["c1@x.example", "c2@x.example"]
    assert p.bcc == ["hidden@x.example"]
    assert p.message_id == "Abc.123@Host.Example"
    assert not [f for f in p.flags if f.startswith("bad-header")]


def test_folded_subject_is_unfolded():
    raw = message(["Subject: a long subject\r\n\tcontinued here\r\n  and here"], b"x")
    assert parse_message(raw).subject == "a long subject\tcontinued here  and here"


@pytest.mark.parametrize("value,expected", [
    ("Tue, 8 Oct 2002 11:26:32 -0400", datetime(2002, 10, 8, 15, 26, 32, tzinfo=timezone.utc)),
    ("8 Oct 2002 11:26:32 GMT", datetime(2002, 10, 8, 11, 26, 32, tzinfo=timezone.utc)),
    ("Tue, 08 Oct 02 11:26:32 +0200", datetime(2002, 10, 8, 9, 26, 32, tzinfo=timezone.utc)),
    ("Tue, 8 Oct 2002 11:26:32", datetime(2002, 10, 8, 11, 26, 32, tzinfo=timezone.utc)),  # no zone: UTC
    ("yesterday at noon", None),
    ("", None),
    (None, None),
])
def test_date(value, expected):
    headers = ["Subject: d"] + ([f"Date: {value}"] if value is not None else [])
    p = parse_message(message(headers, b"x"))
    assert p.date == (expected.timestamp() if expected else None)


def test_no_headers_at_all_and_empty_input():
    for raw in (b"", b"\r\n", b"just a line without colon", b"\x00\xff" * 100, b"Subject"):
        p = parse_message(raw)
        assert p.size == len(raw) and p.message_id == "" and p.subject == "" and p.date is None


# ------------------------------------------------------------- bodies and charsets

@pytest.mark.parametrize("charset", ["koi8-r", "iso-2022-jp", "big5", "gb2312", "euc-kr",
                                     "windows-1251", "iso-8859-7", "utf-8", "utf-16"])
@pytest.mark.parametrize("cte", ["8bit", "base64", "quoted-printable"])
def test_body_in_every_charset(charset, cte):
    text = {"koi8-r": "Привет, мир", "windows-1251": "Привет, мир", "iso-2022-jp": "こんにちは世界",
            "big5": "你好世界", "gb2312": "你好世界", "euc-kr": "안녕하세요 세계",
            "iso-8859-7": "Γειά σου Κόσμε", "utf-8": "Grüße 🌍", "utf-16": "Grüße"}[charset]
    data = text.encode(charset)
    if cte == "base64":
        data = base64.encodebytes(data).replace(b"\n", b"\r\n")
    elif cte == "quoted-printable":
        data = quopri.encodestring(data)
    raw = message(["Subject: cs", f"Content-Type: text/plain; charset={charset}",
                   f"Content-Transfer-Encoding: {cte}"], data)
    p = parse_message(raw)
    assert p.body_text == text
    assert "undecodable-part" not in p.flags and "unknown-charset" not in p.flags


def test_unknown_and_lying_charsets():
    # unknown name, UTF-8 bytes: read as UTF-8, flagged
    p = parse_message(message(["Content-Type: text/plain; charset=x-bogus-42"], "Grüße".encode()))
    assert p.body_text == "Grüße" and "unknown-charset" in p.flags
    # declared us-ascii, windows-1252 bytes: read as cp1252, flagged
    p = parse_message(message(["Content-Type: text/plain; charset=us-ascii"], "café “quoted”".encode("cp1252")))
    assert p.body_text == "café “quoted”" and "undecodable-part" in p.flags
    # declared utf-8, invalid bytes: replacement characters, flagged
    p = parse_message(message(["Content-Type: text/plain; charset=utf-8"], b"ok \xff\xfe ok"))
    assert p.body_text.startswith("ok") and "\ufffd" in p.body_text and "undecodable-part" in p.flags
    # a codec that is no text encoding
    p = parse_message(message(["Content-Type: text/plain; charset=zlib"], b"plain words"))
    assert p.body_text == "plain words" and "unknown-charset" in p.flags
    # no charset at all, 8-bit: windows-1252 guess
    p = parse_message(message(["Subject: x"], "naïve".encode("cp1252")))
    assert p.body_text == "naïve"


def test_broken_base64_is_flagged_and_partly_read():
    good = base64.b64encode(b"readable start of the text " * 4)
    p = parse_message(message(["Content-Type: text/plain", "Content-Transfer-Encoding: base64"],
                              good + b"\r\n!!!not base64 at all###\r\n"))
    assert "readable start" in p.body_text
    assert "defects" in p.flags or "undecodable-part" in p.flags


def test_html_part_text():
    html = ("<html><head><title>T</title><style>.x{color:red}</style>"
            "<script>var secret = 'SCRIPT-ONLY';</script></head>"
            "<body><p>Fish &amp; chips &eacute;t&eacute; &#8364;5</p><table><tr><td>a</td><td>b</td></tr></table>"
            "<img src=x alt='logo text'><!-- a comment COMMENT-ONLY --></body></html>")
    raw = multipart(["Subject: h"], [
        part(["Content-Type: text/plain; charset=utf-8"], b"the plain alternative"),
        part(["Content-Type: text/html; charset=utf-8"], html.encode()),
    ], subtype="alternative")
    p = parse_message(raw)
    assert "the plain alternative" in p.body_text
    assert "Fish & chips été €5" in p.body_text
    assert "logo text" in p.body_text
    for absent in ("SCRIPT-ONLY", "color:red", "COMMENT-ONLY", "<p>", "&amp;", "<td>"):
        assert absent not in p.body_text
    assert p.attachments == []


def test_html_charset_from_meta():
    html = ('<html><head><meta http-equiv="Content-Type" content="text/html; charset=koi8-r"></head>'
            '<body>Привет</body></html>')
    p = parse_message(message(["Content-Type: text/html"], html.encode("koi8-r")))
    assert p.body_text == "Привет"


def test_body_text_is_bounded():
    line = b"all work and no play makes jack a dull boy\r\n"
    raw = message(["Subject: long"], line * (parse.MAX_TEXT // len(line) + 1000))
    p = parse_message(raw)
    assert len(p.body_text) <= parse.MAX_TEXT
    assert "text-truncated" in p.flags
    assert p.body_text.startswith(line.decode().strip())


# ------------------------------------------------------------- attachments

def test_attachment_filenames_rfc2231_and_rfc2047():
    raw = multipart(["Subject: att"], [
        part(["Content-Type: text/plain"], b"see attached"),
        part(["Content-Type: text/plain; charset=utf-8",
              "Content-Disposition: attachment; filename*=utf-8''%C3%A9t%C3%A9%20r%C3%A9sum%C3%A9.txt"],
             "résumé text".encode()),
        part(["Content-Type: application/octet-stream; name=\"=?utf-8?b?" +
              base64.b64encode("Übersicht.bin".encode()).decode() + "?=\"",
              "Content-Transfer-Encoding: base64"], base64.b64encode(bytes(range(256)))),
        part(["Content-Type: application/x-thing",
              "Content-Disposition: attachment;\r\n filename*0*=iso-8859-1''na%EFve;\r\n filename*1=\"-part.dat\""],
             b"1234567"),
    ])
    p = parse_message(raw)
    assert p.body_text == "see attached"
    names = [a.filename for a in p.attachments]
    assert names == ["été résumé.txt", "Übersicht.bin", "naïve-part.dat"]
    txt, binary, thing = p.attachments
    assert (txt.content_type, txt.text, txt.size) == ("text/plain", "résumé text", len("résumé text".encode()))
    assert (binary.content_type, binary.size, binary.text) == ("application/octet-stream", 256, "")
    assert "unsupported-type" in binary.flags
    assert thing.size == 7


def test_text_part_with_filename_is_an_attachment_and_non_text_parts_too():
    raw = multipart(["Subject: s"], [
        part(["Content-Type: text/plain"], b"body words"),
        part(["Content-Type: text/plain; name=notes.txt"], b"notes words"),
        part(["Content-Type: text/html", "Content-Disposition: attachment"], b"<b>html words</b>"),
        part(["Content-Type: image/gif", "Content-Transfer-Encoding: base64"], base64.b64encode(b"GIF89a...")),
    ])
    p = parse_message(raw)
    assert p.body_text == "body words"
    assert [(a.content_type, a.text) for a in p.attachments] == [
        ("text/plain", "notes words"), ("text/html", "html words"), ("image/gif", "")]
    assert p.attachments[2].size == len(b"GIF89a...")


def make_pdf(text: str) -> bytes:
    """A one-page PDF showing `text` in Helvetica (built by hand, with a correct xref)."""
    stream = f"BT /F1 18 Tf 72 700 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    return hostile.pdf_file(objects)


def attach(data: bytes, ctype: str, filename: str, body: bytes = b"see attachment") -> bytes:
    return multipart(["Subject: with attachment"], [
        part(["Content-Type: text/plain"], body),
        part([f"Content-Type: {ctype}", f'Content-Disposition: attachment; filename="{filename}"',
              "Content-Transfer-Encoding: base64"], base64.encodebytes(data).replace(b"\n", b"\r\n")),
    ])


def test_pdf_attachment_text_via_pdftotext():
    pdf = make_pdf("Quarterly figures ACME 7731")
    p = parse_message(attach(pdf, "application/pdf", "report.pdf"))
    (a,) = p.attachments
    assert a.filename == "report.pdf" and a.size == len(pdf) and a.flags == []
    assert "Quarterly figures ACME 7731" in a.text
    # sent as octet-stream: recognised by its magic bytes
    (a,) = parse_message(attach(pdf, "application/octet-stream", "scan")).attachments
    assert "Quarterly figures ACME 7731" in a.text


def test_broken_pdf_is_a_flag_not_an_exception(monkeypatch):
    (a,) = parse_message(attach(b"%PDF-1.4\nthis is not a pdf\n%%EOF", "application/pdf", "bad.pdf")).attachments
    assert a.text == "" and "pdftotext-failed" in a.flags
    monkeypatch.setattr(parse, "PDF_MAX_BYTES", 100)
    (a,) = parse_message(attach(make_pdf("x" * 50), "application/pdf", "big.pdf")).attachments
    assert a.text == "" and "too-large" in a.flags
    monkeypatch.setattr(parse, "PDF_MAX_BYTES", 10**9)
    monkeypatch.setenv("PATH", "/nonexistent")
    (a,) = parse_message(attach(make_pdf("x"), "application/pdf", "x.pdf")).attachments
    assert "pdftotext-failed" in a.flags


def ooxml(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", b'<?xml version="1.0"?><Types/>')
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


W = b'<?xml version="1.0" encoding="UTF-8"?><w:document xmlns:w="w"><w:body>%s</w:body></w:document>'


def test_docx_xlsx_pptx_text():
    docx = ooxml({"word/document.xml": W % (
        b'<w:p><w:r><w:t>Merger with</w:t></w:r><w:r><w:t xml:space="preserve"> Globex &amp; Co</w:t></w:r></w:p>'
        b'<w:p><w:r><w:t>closes Friday \xe2\x82\xac</w:t></w:r></w:p>')})
    xlsx = ooxml({"xl/sharedStrings.xml":
                  b'<sst><si><t>Revenue</t></si><si><r><t>Q3 </t></r><r><t>2002</t></r></si></sst>',
                  "xl/worksheets/sheet1.xml": b"<worksheet/>"})
    pptx = ooxml({f"ppt/slides/slide{n}.xml": b"<p:sld><a:p><a:r><a:t>Slide %d text</a:t></a:r></a:p></p:sld>" % n
                  for n in (10, 2, 1)})
    mime = "application/vnd.openxmlformats-officedocument."
    for data, ctype, name, expected in [
            (docx, mime + "wordprocessingml.document", "memo.docx", "Merger with Globex & Co\ncloses Friday €"),
            (xlsx, "application/octet-stream", "figures.xlsx", "Revenue\nQ3 2002"),
            (pptx, "application/octet-stream", "deck.bin", "Slide 1 text\n\nSlide 2 text\n\nSlide 10 text")]:
        (a,) = parse_message(attach(data, ctype, name)).attachments
        assert a.flags == [], (name, a.flags)
        assert a.text == expected, name


def test_ooxml_zip_bomb_is_capped(monkeypatch):
    monkeypatch.setattr(parse, "OOXML_MAX_UNCOMPRESSED", 1024 * 1024)
    node = b"<w:p><w:r><w:t>bomb</w:t></w:r></w:p>"
    big = W % (node * (8 * 1024 * 1024 // len(node)))   # 8 MiB of XML, a few KiB compressed
    data = ooxml({"word/document.xml": big})
    assert len(data) < len(big) // 100
    started = time.monotonic()
    (a,) = parse_message(attach(data, "application/octet-stream", "bomb.docx")).attachments
    assert "ooxml-limit" in a.flags
    assert 0 < len(a.text) <= 1024 * 1024
    assert time.monotonic() - started < 5


def test_ooxml_garbage_is_a_flag():
    for data in (b"PK\x03\x04 not really a zip", ooxml({"other.xml": b"<x/>"})):
        (a,) = parse_message(attach(data, "application/octet-stream", "broken.docx")).attachments
        assert a.text == "" and "ooxml-failed" in a.flags


# ------------------------------------------------------------- attached messages

def corpus_pick(folder: str, pred) -> tuple[Path, bytes]:
    for f in corpus_files():
        if f.parent.name == folder:
            raw = corpus_message(f)
            if pred(raw):
                return f, raw
    pytest.skip(f"no such message in {folder}")


def forward(inner: bytes, cte: str | None = None, subject: str = "Fwd: see below") -> bytes:
    headers = ["Content-Type: message/rfc822", "Content-Disposition: inline"]
    if cte == "base64":
        inner = base64.encodebytes(inner).replace(b"\n", b"\r\n")
        headers.append("Content-Transfer-Encoding: base64")
    return multipart([f"Subject: {subject}", "From: fwd@example.org"], [
        part(["Content-Type: text/plain"], b"forwarding this"),
        part(headers, inner),
    ], boundary=f"fwd-{abs(hash(subject))}")


def test_attached_message_is_indexed_as_text():
    _, inner = corpus_pick("hard-ham-1", lambda r: b"multipart/" in r and b"name=" in r)
    expected = parse_message(inner)
    for cte in (None, "base64"):   # base64 message/rfc822: not allowed, but sent
        p = parse_message(forward(inner, cte))
        assert p.body_text == "forwarding this"
        a = p.attachments[0]
        assert a.content_type == "message/rfc822"
        assert f"Subject: {expected.subject}" in a.text
        assert expected.from_header and expected.from_header in a.text
        assert expected.body_text[:200] in a.text
        # its own attachments follow it, flattened
        assert [(x.filename, x.content_type, x.size) for x in p.attachments[1:]] == \
               [(x.filename, x.content_type, x.size) for x in expected.attachments]
        assert abs(a.size - len(inner)) < len(inner) // 10


def test_corpus_forwarded_messages_are_read():
    seen = 0
    for f in corpus_files():
        raw = corpus_message(f)
        if b"message/rfc822" not in raw.lower():
            continue
        m = email.message_from_bytes(raw, policy=email.policy.compat32)
        inner = [x.get_payload(0) for x in m.walk() if x.get_content_type() == "message/rfc822"]
        if not inner:
            continue
        p = parse_message(raw)
        texts = [a.text for a in p.attachments if a.content_type == "message/rfc822"]
        subj = inner[0].get("subject")
        if isinstance(subj, str) and subj.isascii():
            assert any(" ".join(subj.split()) in " ".join(t.split()) for t in texts), f
            seen += 1
    assert seen >= 3


def test_nested_messages_stop_at_max_depth():
    _, raw = corpus_pick("easy-ham-1", lambda r: True)
    for level in range(parse.MAX_DEPTH + 2):
        raw = forward(raw, subject=f"level {level}")
    p = parse_message(raw)
    rfc = [a for a in p.attachments if a.content_type == "message/rfc822"]
    assert len(rfc) == parse.MAX_DEPTH + 1
    assert [("depth-limit" in a.flags) for a in rfc] == [False] * parse.MAX_DEPTH + [True]
    assert f"level {parse.MAX_DEPTH}" in rfc[0].text


# ------------------------------------------------------------- hostile shapes

def test_deep_multipart_nesting_does_not_raise():
    for n in (parse.MAX_NESTING + 10, 3000):
        head = b"Subject: deep\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"
        body = b"".join(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i - 1, i)
                        for i in range(1, n))
        body += b"--b%d\r\nContent-Type: text/plain\r\n\r\ndeepest\r\n" % (n - 1)
        body += b"".join(b"--b%d--\r\n" % i for i in reversed(range(n)))
        p = parse_message(head + body)
        assert p.subject == "deep"
        assert "too-deep" in p.flags or "parse-error" in p.flags


def test_many_parts_are_bounded():
    raw = multipart(["Subject: many"], [part(["Content-Type: text/plain"], b"p%d" % i)
                                         for i in range(parse.MAX_PARTS + 500)])
    started = time.monotonic()
    p = parse_message(raw)
    assert "too-many-parts" in p.flags
    assert p.body_text.count("\n\n") < parse.MAX_PARTS
    assert time.monotonic() - started < 10


def test_multipart_without_its_boundary_keeps_the_text():
    raw = message(["Subject: lost", "MIME-Version: 1.0", 'Content-Type: multipart/mixed; boundary="nowhere"'],
                  b"--elsewhere\r\nContent-Type: text/plain\r\n\r\nthe actual words\r\n--elsewhere--\r\n")
    p = parse_message(raw)
    assert "the actual words" in p.body_text and "defects" in p.flags


def test_parse_never_reserialises(monkeypatch):
    """The raw bytes are the archive's; parsing must not render a message again."""
    def refuse(*a, **k):
        raise AssertionError("a generator was used")
    monkeypatch.setattr(email.generator.Generator, "flatten", refuse)
    monkeypatch.setattr(email.generator.BytesGenerator, "flatten", refuse)
    _, inner = corpus_pick("hard-ham-1", lambda r: b"multipart/" in r)
    for raw in (forward(inner), forward(inner, "base64"), inner):
        p = parse_message(raw)
        assert "parse-error" not in p.flags and p.subject


def test_mutated_corpus_messages_parse_without_parser_errors():
    """Random damage to real multipart messages: flags, never an exception
    (and not the catch-all either: "parse-error" would mean a code path that
    raised)."""
    rng = random.Random(4650)
    sources = [corpus_message(f) for f in corpus_files()
               if f.parent.name in ("spam-1", "hard-ham-1")][:400]
    sources = [s for s in sources if b"multipart/" in s.lower() or b"=?" in s][:60]
    assert len(sources) >= 30
    for i in range(1500):
        raw = bytearray(rng.choice(sources))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(raw))
            op = rng.choice(("cut", "delete", "insert", "flip"))
            if op == "cut":
                del raw[max(at, 1):]
            elif op == "delete":
                del raw[at:at + rng.randint(1, 300)]
            elif op == "insert":
                raw[at:at] = rng.choice([
                    b"\r\n", b"\r\n--", b"=?utf-8?q?=FF?=", b"\xff\xfe", b'"', b"<", b";charset=zz",
                    b"\r\nContent-Type: multipart/mixed; boundary=x\r\n",
                    b"\r\nContent-Transfer-Encoding: base64\r\n", bytes(rng.randrange(256) for _ in range(8))])
            elif raw:
                raw[min(at, len(raw) - 1)] ^= 1 << rng.randrange(8)
        p = parse_message(bytes(raw))
        assert "parse-error" not in p.flags, bytes(raw)[:300]
        p.body_text.encode("utf-8")
        p.subject.encode("utf-8")


# ------------------------------------------------------------- the extraction budget (issue 12)

def _cost(raw: bytes, limits: "parse.Limits | None" = None):
    """parse_message(raw) and the CPU seconds it took, extractor processes included."""
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.thread_time()
    p = parse_message(raw, limits) if limits is not None else parse_message(raw)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return p, (time.thread_time() - started) + (after.ru_utime + after.ru_stime
                                                 - before.ru_utime - before.ru_stime)


def _all_text(p: Parsed) -> int:
    return len(p.body_text) + sum(len(a.text) for a in p.attachments)


def test_office_regex_bombs_cost_little():
    """40 tiny .docx/.xlsx of "<t <t <t ...": the old OOXML pattern scanned to
    the end of the member at every "<t " (quadratic: a minute per 300 KB).
    At 40 KB each the old code spent ~40 s; now a fraction of a second."""
    raw = hostile.office_regex_bombs(n=40, size=40_000)
    assert len(raw) < 100_000
    p, cpu = _cost(raw)
    assert len(p.attachments) == 40
    assert cpu < 3, cpu


def test_ooxml_token_pattern_is_linear():
    xml = b"<w:document>" + b"<t " * 100_000
    started = time.thread_time()
    assert parse._ooxml_chunk_text(xml) == ""
    assert time.thread_time() - started < 1


def test_total_text_of_a_message_is_bounded():
    """20 small .docx of a million characters each: 20 M characters before,
    now max_text in all, the message and the attachments past it flagged,
    every attachment still listed."""
    raw = hostile.expanding_attachments(n=20, chars=1_000_000)
    assert len(raw) < 200_000
    p, cpu = _cost(raw)
    assert len(p.attachments) == 20
    assert _all_text(p) <= parse.LIMITS.max_text
    assert "extraction-truncated" in p.flags
    assert p.attachments[0].text.startswith("lorem lorem") and "extraction-truncated" not in p.attachments[0].flags
    assert "extraction-truncated" in p.attachments[-1].flags and p.attachments[-1].text == ""
    assert [a.filename for a in p.attachments] == [f"a{i}.docx" for i in range(20)]
    # the body counts too
    small = parse.Limits(max_text=100)
    p = parse_message(hostile.ordinary("x" * 300), small)
    assert len(p.body_text) <= 100 and "extraction-truncated" in p.flags


def test_decompressed_bytes_of_a_message_are_bounded():
    """Six .docx inflating to 16 MiB each against a budget of 32 MiB: the
    rest is not inflated, and the message says so."""
    raw = hostile.office_zip_bombs(n=6, size=16 * 1024 * 1024)
    limits = parse.Limits(max_expanded=32 * 1024 * 1024)
    p, cpu = _cost(raw, limits)
    assert "extraction-truncated" in p.flags
    assert len(p.attachments) == 6
    assert "extraction-truncated" in p.attachments[-1].flags


def test_cpu_budget_bounds_a_message_and_pdftotext():
    """A PDF of a few KB that kept pdftotext busy for its whole 20 s (and
    the parse failed): now pdftotext gets the message's CPU budget, is
    killed as a group, and the message is flagged, not failed."""
    raw = hostile.pdf_busy()
    assert len(raw) < 200_000
    started = time.monotonic()
    p, cpu = _cost(raw)
    assert "extraction-truncated" in p.flags
    (a,) = p.attachments
    assert "extraction-truncated" in a.flags and "pdftotext-failed" not in a.flags
    assert cpu < parse.LIMITS.cpu_seconds + 2, cpu
    assert time.monotonic() - started < 15      # a generous bound; it was 20 s of CPU


def test_cpu_budget_of_zero_lists_the_parts_without_text():
    raw = hostile.office_regex_bombs(n=5, size=3_000)
    p = parse_message(raw, parse.Limits(cpu_seconds=0, cpu_seconds_per_mib=0))
    assert "extraction-truncated" in p.flags
    assert [a.filename for a in p.attachments] == ["memo0.docx", "figures1.xlsx", "memo2.docx",
                                                   "figures3.xlsx", "memo4.docx"]
    assert all("extraction-truncated" in a.flags for a in p.attachments)


def test_huge_headers_are_cut_and_cheap():
    """A 1 MB Subject of encoded words took the default policy a minute, and
    30,000 Cc addresses were de-duplicated quadratically."""
    raw = hostile.huge_headers(subject_bytes=400_000, recipients=20_000)
    p, cpu = _cost(raw)
    assert cpu < 3, cpu
    assert "extraction-truncated" in p.flags
    assert p.subject.startswith("cafécafé") and len(p.subject) <= parse.HEADER_CUT   # (RFC 2047: no space between encoded words)
    assert 1000 < len(p.cc) <= 20_000 and p.cc[0] == "user0@acme.example"
    assert p.body_text == "huge headers"


def test_xml_bombs_are_not_expanded():
    p, cpu = _cost(hostile.office_xml_bomb(text_node=8 * 1024 * 1024))
    (a,) = p.attachments
    assert "lollol" not in a.text and cpu < 3
    assert "text-truncated" in a.flags and len(a.text) == parse.MAX_TEXT


def test_pdf_flate_bomb_costs_at_most_the_budget():
    p, cpu = _cost(hostile.pdf_flate_bomb())
    assert cpu < parse.LIMITS.cpu_seconds + 2, cpu


def test_depth_parts_and_nesting_limits_come_from_the_budget():
    p = parse_message(hostile.thousand_parts(n=50), parse.Limits(max_parts=10))
    assert "too-many-parts" in p.flags and len(p.attachments) == 8
    p = parse_message(hostile.nested_multiparts(depth=20), parse.Limits(max_nesting=5))
    assert "too-deep" in p.flags
    p = parse_message(hostile.nested_multiparts(depth=20))
    assert "too-deep" not in p.flags and p.body_text == "deep down"
    inner = hostile.ordinary("inner")
    outer = hostile.mixed("fwd", [b"Content-Type: message/rfc822\r\n\r\n" + inner])
    (a,) = parse_message(outer, parse.Limits(max_depth=0)).attachments
    assert "depth-limit" in a.flags
    (a,) = parse_message(outer).attachments
    assert "inner" in a.text


def test_every_hostile_message_is_parsed_within_a_few_seconds():
    """The whole generator, each message at its default size (the shapes the
    issue names), parsed with the default budget."""
    for name, make in hostile.ALL.items():
        raw = make()
        p, cpu = _cost(raw)
        assert isinstance(p, Parsed) and "parse-error" not in p.flags, name
        assert cpu < parse.LIMITS.cpu_seconds + parse.LIMITS.cpu_seconds_per_mib * len(raw) / 2**20 + 2, (name, cpu)
        assert _all_text(p) <= parse.LIMITS.max_text + parse.MAX_TEXT, name


def test_ordinary_corpus_messages_are_never_over_budget():
    files = corpus_files()[::5]
    for f in files:
        p = parse_message(corpus_message(f))
        assert "extraction-truncated" not in p.flags, f
        assert not any("extraction-truncated" in a.flags for a in p.attachments), f
